"""The Mamba token mixer shared by every modality: bidirectional ("bimamba v2" of Vision Mamba) or one direction.

API::

    mixer = MambaMixer(d_model, d_state=16, d_conv=4, expand=2, divide_out=True)   # two directions (Vim)
    mixer = MambaMixer(d_model, directions=1)                                     # Mamba's own mixer (PointMamba)
    y = mixer(x)              # x, y: (B, L, d_model)
    mixer.reset_parameters()  # Mamba initialisation of every parameter (used after ``to_empty``)

One shared ``in_proj`` splits each token into the scan input ``x`` and the gate ``z``; each
direction has its own depthwise conv, ``x_proj``, ``dt_proj``, ``A_log`` and ``D`` (the backward
ones carry the suffix ``_b``, as in the official checkpoints); ``out_proj`` maps the average
(Vim, ``divide_out=True``) or the sum (VideoMamba, ``divide_out=False``) of the gated directions
back to ``d_model``. With ``directions=1`` there are no ``_b`` parameters and the mixer is the
unidirectional Mamba block of mamba_ssm (``mamba_simple.Mamba``), as PointMamba uses it.

The backward direction is the forward computation applied to the reversed sequence, output
reversed back. No reversed copy is ever made: both directions' depthwise conv + SiLU run in one
:func:`vim.kernels.causal_conv1d_silu` pass (the backward one as an anti-causal conv with the flipped
taps), and both scans in one :func:`vim.kernels.bidirectional_selective_scan` launch, whose second
direction reads the sequence from the last token to the first. One direction runs the K = 1 case of
the same kernels (:func:`vim.kernels.selective_scan` for the scan).
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import torch
from timm.layers import register_notrace_module
from torch import nn

from vim.kernels import bidirectional_selective_scan, causal_conv1d_silu, selective_scan

__all__ = ["MambaMixer", "init_scan_parameters"]


def __getattr__(name: str) -> type:
    """``BiMambaMixer``, the mixer's old name (it also runs one direction), still importable with a FutureWarning."""
    if name == "BiMambaMixer":
        warnings.warn("vim.models.mixer.BiMambaMixer is now called MambaMixer", FutureWarning, stacklevel=2)
        return MambaMixer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@torch.no_grad()
def init_scan_parameters(
    dt_weight: torch.Tensor,
    dt_bias: torch.Tensor,
    A_log: torch.Tensor,
    D: torch.Tensor,
    dt_min: float,
    dt_max: float,
    dt_init_floor: float,
) -> None:
    """Mamba's initialisation of one direction's scan parameters, in place (VMamba's ``ssm_init="v0"`` is the same).

    Args:
        dt_weight: (d_inner, R) the step-size projection, uniform in ``[-R ** -0.5, R ** -0.5]``.
        dt_bias: (d_inner,) the inverse softplus of step sizes log-uniform in ``[dt_min, dt_max]``, at least
            ``dt_init_floor``, so that ``softplus(dt_bias)`` starts in that range.
        A_log: (d_inner, N) ``log(1..N)`` on every channel (S4D-real: ``A = -exp(A_log) = -(1..N)``).
        D: (d_inner,) ones.
    """
    rank = dt_weight.shape[-1]
    nn.init.uniform_(dt_weight, -(rank**-0.5), rank**-0.5)
    log_dt = torch.rand(dt_bias.shape, device=dt_bias.device) * (math.log(dt_max) - math.log(dt_min))
    dt = torch.exp(log_dt + math.log(dt_min)).clamp(min=dt_init_floor)
    dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
    state_index = torch.arange(1, A_log.shape[-1] + 1, dtype=torch.float32, device=A_log.device)
    A_log.copy_(torch.log(state_index).expand_as(A_log))
    D.fill_(1.0)


class ScanWeights(NamedTuple):
    """The scan-side parameters of each direction stacked along a leading axis K (1 or 2; index 1 is the backward one)."""

    x_proj: torch.Tensor  # (K, R + 2N, d_inner)
    dt_proj: torch.Tensor  # (K, d_inner, R)
    dt_bias: torch.Tensor  # (K, d_inner) float32
    A: torch.Tensor  # (K, d_inner, N) float32, negative
    D: torch.Tensor  # (K, d_inner) float32


@register_notrace_module
class MambaMixer(nn.Module):
    """Selective-state-space token mixer over one or both directions, (B, L, d_model) -> (B, L, d_model).

    Args:
        d_model: token width D.
        d_state: SSM state size N.
        d_conv: width of the depthwise causal convolution.
        expand: inner width ``d_inner = expand * d_model``.
        dt_rank: rank of the step-size projection, ``ceil(d_model / 16)`` if None.
        directions: 2 (forward and backward, Vim / VideoMamba) or 1 (forward only, Mamba / PointMamba).
        divide_out: average the two directions (Vim) instead of summing them (VideoMamba).
        dt_min, dt_max, dt_init_floor: range of the initial step sizes.
        kernel_backend: backend of the selective scan and the conv + SiLU, None for ``$VIM_SCAN_BACKEND`` or "auto".
    """

    conv1d_b: nn.Conv1d | None
    x_proj_b: nn.Linear | None
    dt_proj_b: nn.Linear | None
    A_b_log: nn.Parameter | None
    D_b: nn.Parameter | None

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | None = None,
        directions: int = 2,
        divide_out: bool = True,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        kernel_backend: str | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if directions not in (1, 2):
            raise ValueError(f"directions must be 1 (forward) or 2 (forward and backward), got {directions}")
        dd = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.d_inner = expand * d_model
        self.dt_rank = dt_rank or math.ceil(d_model / 16)
        self.directions = directions
        self.divide_out = divide_out
        self.dt_range = (dt_min, dt_max, dt_init_floor)
        self.kernel_backend = kernel_backend

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False, **dd)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False, **dd)
        # forward direction; the scan reads A and D as float32 whatever the parameters' dtype
        self.conv1d = self._new_conv(**dd)
        self.x_proj = self._new_x_proj(**dd)
        self.dt_proj = self._new_dt_proj(**dd)
        self.A_log = nn.Parameter(torch.empty(self.d_inner, d_state, **dd))
        self.D = nn.Parameter(torch.empty(self.d_inner, **dd))
        # backward direction (absent for a single direction)
        bidirectional = directions == 2
        self.conv1d_b = self._new_conv(**dd) if bidirectional else None
        self.x_proj_b = self._new_x_proj(**dd) if bidirectional else None
        self.dt_proj_b = self._new_dt_proj(**dd) if bidirectional else None
        self.A_b_log = nn.Parameter(torch.empty(self.d_inner, d_state, **dd)) if bidirectional else None
        self.D_b = nn.Parameter(torch.empty(self.d_inner, **dd)) if bidirectional else None
        self.reset_parameters()

    def _new_conv(self, device=None, dtype=None) -> nn.Conv1d:
        return nn.Conv1d(self.d_inner, self.d_inner, self.d_conv, groups=self.d_inner, device=device, dtype=dtype)

    def _new_x_proj(self, device=None, dtype=None) -> nn.Linear:
        return nn.Linear(self.d_inner, self.dt_rank + 2 * self.d_state, bias=False, device=device, dtype=dtype)

    def _new_dt_proj(self, device=None, dtype=None) -> nn.Linear:
        return nn.Linear(self.dt_rank, self.d_inner, bias=True, device=device, dtype=dtype)

    def _per_direction(self) -> list[tuple[nn.Conv1d, nn.Linear, nn.Linear, nn.Parameter, nn.Parameter]]:
        """(conv1d, x_proj, dt_proj, A_log, D) of each direction, the forward one first."""
        directions = [(self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D)]
        if self.conv1d_b is not None:
            assert self.x_proj_b is not None and self.dt_proj_b is not None
            assert self.A_b_log is not None and self.D_b is not None
            directions.append((self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b))
        return directions

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Mamba's initialisation: S4D-real A, D = 1, dt log-uniform in [dt_min, dt_max].

        ``in_proj``, ``x_proj``, ``out_proj`` and the convs get PyTorch's default init; the
        backbone rescales ``out_proj`` for depth afterwards.
        """
        dt_min, dt_max, dt_floor = self.dt_range
        directions = self._per_direction()
        # this order of random draws keeps the initialisation of a given seed what it has always been
        convs, x_projs = [d[0] for d in directions], [d[1] for d in directions]
        layers: list[nn.Linear | nn.Conv1d] = [self.in_proj, self.out_proj, *convs, *x_projs]
        for layer in layers:
            layer.reset_parameters()
        for _, _, dt_proj, A_log, D in directions:
            init_scan_parameters(dt_proj.weight, dt_proj.bias, A_log, D, dt_min, dt_max, dt_floor)

    def _scan_weights(self) -> ScanWeights:
        # a few KiB per block, stacked on each call: about 50 us a block on one CPU thread, 1% of a Vim-Ti forward
        # at batch 1, so no cached copy that the optimizer or load_state_dict could leave stale
        _, x_proj, dt_proj, A_log, D = zip(*self._per_direction())
        return ScanWeights(
            x_proj=torch.stack([proj.weight for proj in x_proj]),
            dt_proj=torch.stack([proj.weight for proj in dt_proj]),
            dt_bias=torch.stack([proj.bias for proj in dt_proj]).float(),
            A=-torch.exp(torch.stack(A_log).float()),
            D=torch.stack(D).float(),
        )

    def _conv(self, x: torch.Tensor) -> torch.Tensor:
        """Depthwise causal conv + SiLU of every direction in one fused pass.

        Args:
            x: (B, L, d_inner), any strides (the first half of ``in_proj``'s output, not copied).

        Returns:
            (K, B, L, d_inner) contiguous: index 0 the causal conv, index 1 (two directions) the backward
            direction's causal conv seen from the original order (an anti-causal conv with the flipped taps).
        """
        backward = self.conv1d_b
        return causal_conv1d_silu(
            x,
            self.conv1d.weight,
            self.conv1d.bias,
            None if backward is None else backward.weight,
            None if backward is None else backward.bias,
            backend=self.kernel_backend,
        )

    def _project(self, u: torch.Tensor, weights: ScanWeights) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Input-dependent step sizes and B, C of every direction, each from one batched matmul.

        Args:
            u: (K, B, L, d_inner) conv output.

        Returns:
            delta (K, B, d_inner, L), B and C (K, B, N, L), all views of channels-last memory.
        """
        batch, length = u.shape[1], u.shape[2]
        x_dbl = torch.bmm(u.flatten(1, 2), weights.x_proj.transpose(1, 2))  # (K, B * L, R + 2N)
        dt, B, C = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = torch.bmm(dt, weights.dt_proj.transpose(1, 2))  # (K, B * L, d_inner)

        def channels_first(t: torch.Tensor) -> torch.Tensor:
            return t.unflatten(1, (batch, length)).transpose(-1, -2)

        return channels_first(delta), channels_first(B), channels_first(C)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, L, d_model) -> (B, L, d_model)."""
        weights = self._scan_weights()
        x, z = self.in_proj(hidden_states).chunk(2, dim=-1)  # (B, L, d_inner) each
        u = self._conv(x)  # (K, B, L, d_inner)
        delta, B, C = self._project(u, weights)
        scan_args = dict(z=z.transpose(1, 2), delta_softplus=True, backend=self.kernel_backend)
        if self.directions == 1:
            y = selective_scan(
                u[0].transpose(-1, -2),
                delta[0],
                weights.A[0],
                B[0],
                C[0],
                D=weights.D[0],
                delta_bias=weights.dt_bias[0],
                **scan_args,
            )
        else:
            y = bidirectional_selective_scan(
                u.transpose(-1, -2), delta, weights.A, B, C, D=weights.D, delta_bias=weights.dt_bias, **scan_args
            )  # (2, B, d_inner, L), channels-last
            # one reduction over the directions of the (2, B, L, d_inner) memory: it runs at memory speed, and its
            # gradient reaches the scan channels-last as the C kernel reads it (y[0] + y[1] is a slow op on these views,
            # and hands the scan a channels-first copy of zeros filled in twice)
            directions = y.transpose(-1, -2)
            return self.out_proj(directions.mean(0) if self.divide_out else directions.sum(0))
        return self.out_proj(y.transpose(1, 2))

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_inner={self.d_inner}, d_state={self.d_state}, directions={self.directions}, "
            f"divide_out={self.divide_out}"
        )
