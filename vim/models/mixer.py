"""The bidirectional Mamba mixer ("bimamba v2" of Vision Mamba), shared by every modality.

API::

    mixer = BiMambaMixer(d_model, d_state=16, d_conv=4, expand=2, divide_out=True)
    y = mixer(x)              # x, y: (B, L, d_model)
    mixer.reset_parameters()  # Mamba initialisation of every parameter (used after ``to_empty``)

One shared ``in_proj`` splits each token into the scan input ``x`` and the gate ``z``; each
direction has its own depthwise conv, ``x_proj``, ``dt_proj``, ``A_log`` and ``D`` (the backward
ones carry the suffix ``_b``, as in the official checkpoints); ``out_proj`` maps the average
(Vim, ``divide_out=True``) or the sum (VideoMamba, ``divide_out=False``) of the two gated
directions back to ``d_model``.

The backward direction is the forward computation applied to the reversed sequence, output
reversed back. No reversed copy is ever made: its causal conv runs as an anti-causal conv with the
flipped 4-tap kernel, and both scans run in one :func:`vim.kernels.bidirectional_selective_scan`
launch, whose second direction reads the sequence from the last token to the first.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_module
from torch import nn

from vim.kernels import bidirectional_selective_scan

__all__ = ["BiMambaMixer"]


@register_notrace_module
class BiMambaMixer(nn.Module):
    """Bidirectional selective-state-space token mixer, (B, L, d_model) -> (B, L, d_model).

    Args:
        d_model: token width D.
        d_state: SSM state size N.
        d_conv: width of the depthwise causal convolution.
        expand: inner width ``d_inner = expand * d_model``.
        dt_rank: rank of the step-size projection, ``ceil(d_model / 16)`` if None.
        divide_out: average the two directions (Vim) instead of summing them (VideoMamba).
        dt_min, dt_max, dt_init_floor: range of the initial step sizes.
        scan_backend: selective-scan backend, None for ``$VIM_SCAN_BACKEND`` or "auto".
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | None = None,
        divide_out: bool = True,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        scan_backend: str | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.d_inner = expand * d_model
        self.dt_rank = dt_rank or math.ceil(d_model / 16)
        self.divide_out = divide_out
        self.dt_range = (dt_min, dt_max, dt_init_floor)
        self.scan_backend = scan_backend

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False, **dd)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False, **dd)
        for suffix in ("", "_b"):
            self.add_module(f"conv1d{suffix}", nn.Conv1d(self.d_inner, self.d_inner, d_conv, groups=self.d_inner, **dd))
            self.add_module(f"x_proj{suffix}", nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **dd))
            self.add_module(f"dt_proj{suffix}", nn.Linear(self.dt_rank, self.d_inner, bias=True, **dd))
            # the scan reads A and D as float32 whatever the parameters' dtype
            self.register_parameter(f"A{suffix}_log", nn.Parameter(torch.empty(self.d_inner, d_state, **dd)))
            self.register_parameter(f"D{suffix}", nn.Parameter(torch.empty(self.d_inner, **dd)))
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Mamba's initialisation: S4D-real A, D = 1, dt log-uniform in [dt_min, dt_max].

        ``in_proj``, ``x_proj``, ``out_proj`` and the convs get PyTorch's default init; the
        backbone rescales ``out_proj`` for depth afterwards.
        """
        dt_min, dt_max, dt_floor = self.dt_range
        for module in (self.in_proj, self.out_proj, self.conv1d, self.conv1d_b, self.x_proj, self.x_proj_b):
            module.reset_parameters()
        for suffix in ("", "_b"):
            dt_proj = getattr(self, f"dt_proj{suffix}")
            nn.init.uniform_(dt_proj.weight, -(self.dt_rank**-0.5), self.dt_rank**-0.5)
            log_dt = torch.rand(self.d_inner, device=dt_proj.bias.device) * (math.log(dt_max) - math.log(dt_min))
            dt = torch.exp(log_dt + math.log(dt_min)).clamp(min=dt_floor)
            dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
            state_index = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=dt_proj.bias.device)
            getattr(self, f"A{suffix}_log").copy_(torch.log(state_index).expand(self.d_inner, -1))
            getattr(self, f"D{suffix}").fill_(1.0)

    def _conv_both_directions(self, x: torch.Tensor) -> torch.Tensor:
        """Depthwise conv + SiLU of both directions in one grouped conv.

        Args:
            x: (B, d_inner, L), any strides.

        Returns:
            (2, B, L, d_inner) contiguous: index 0 the causal conv, index 1 the anti-causal conv with
            the flipped kernel (the backward direction's causal conv, seen from the original order).
        """
        length, pad = x.shape[-1], self.d_conv - 1
        # group g maps input channel g to output channels (2g, 2g + 1): forward and backward taps
        weight = torch.stack([self.conv1d.weight, self.conv1d_b.weight.flip(-1)], dim=1).flatten(0, 1)
        bias = torch.stack([self.conv1d.bias, self.conv1d_b.bias], dim=1).flatten()
        y = F.conv1d(x, weight, bias, padding=pad, groups=self.d_inner)  # (B, 2 * d_inner, L + pad)
        y = y.unflatten(1, (self.d_inner, 2))
        both = torch.stack([y[:, :, 0, :length].transpose(1, 2), y[:, :, 1, pad:].transpose(1, 2)])  # one copy
        return F.silu(both)

    def _project_both_directions(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Input-dependent step sizes and B, C of both directions, each from one batched matmul.

        Args:
            u: (2, B, L, d_inner) conv output.

        Returns:
            delta (2, B, d_inner, L), B and C (2, B, N, L), all views of channels-last memory.
        """
        batch, length = u.shape[1], u.shape[2]
        x_proj = torch.stack([self.x_proj.weight, self.x_proj_b.weight])  # (2, R + 2N, d_inner)
        dt_proj = torch.stack([self.dt_proj.weight, self.dt_proj_b.weight])  # (2, d_inner, R)
        x_dbl = torch.bmm(u.flatten(1, 2), x_proj.transpose(1, 2))  # (2, B * L, R + 2N)
        dt, B, C = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = torch.bmm(dt, dt_proj.transpose(1, 2))  # (2, B * L, d_inner)

        def channels_first(t: torch.Tensor) -> torch.Tensor:
            return t.unflatten(1, (batch, length)).transpose(-1, -2)

        return channels_first(delta), channels_first(B), channels_first(C)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, L, d_model) -> (B, L, d_model)."""
        x, z = self.in_proj(hidden_states).chunk(2, dim=-1)  # (B, L, d_inner) each
        u = self._conv_both_directions(x.transpose(1, 2))  # (2, B, L, d_inner)
        delta, B, C = self._project_both_directions(u)
        y = bidirectional_selective_scan(
            u.transpose(-1, -2),
            delta,
            -torch.exp(torch.stack([self.A_log, self.A_b_log]).float()),
            B,
            C,
            D=torch.stack([self.D, self.D_b]).float(),
            z=z.transpose(1, 2),
            delta_bias=torch.stack([self.dt_proj.bias, self.dt_proj_b.bias]).float(),
            delta_softplus=True,
            backend=self.scan_backend,
        )  # (2, B, d_inner, L)
        y = y[0] + y[1]
        if self.divide_out:
            y = y / 2
        return self.out_proj(y.transpose(1, 2))

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_inner={self.d_inner}, d_state={self.d_state}, divide_out={self.divide_out}"
