"""VMamba's SS2D token mixer: the ``v05_noz`` forward of its released v2 classification models, on an (H, W) grid.

API::

    mixer = SS2D(d_model, d_state=1, ssm_ratio=1.0)   # VMamba-T (s1l8); ssm_ratio=2.0 for VMamba-S / -B (s2l15)
    y = mixer(x)               # x, y: (B, H, W, d_model), channels-last
    y = mixer(tokens, grid=(H, W))   # tokens, y: (B, H * W, d_model), as a block of a hierarchical trunk calls it
    mixer.reset_parameters()   # VMamba's ``ssm_init="v0"`` (used after ``to_empty``)

Forward (upstream MzeroMiko/VMamba ``classification/models/vmamba.py``, ``SS2D.forwardv2`` with
``forward_corev2``, no gate ``z``): ``in_proj`` -> depthwise ``d_conv x d_conv`` conv2d -> SiLU -> per direction
``x_proj`` (step-size rank R, then B and C) -> ``dt_projs`` -> the selective scan of the four directions (rows,
columns, both reversed) with ``A = -exp(A_logs)``, ``Ds``, ``delta_bias = dt_projs_bias`` and softplus -> the sum
of the four directions in grid order -> ``out_norm`` (LayerNorm) -> ``out_proj``.

Parameters have upstream's names and shapes (K = 4 directions, D_inner = ``ssm_ratio * d_model``,
R = ``ceil(d_model / 16)``, N = ``d_state``), so a released block's ``op.*`` weights load as they are:

======================  ============================  ======================================================
name                    shape                         notes
======================  ============================  ======================================================
``in_proj.weight``      (D_inner, d_model)            no bias; 2-D although upstream's ln2d models apply it
                                                      as a 1x1 conv (its ``Linear2d`` is an ``nn.Linear``)
``conv2d.weight``       (D_inner, 1, d_conv, d_conv)  depthwise; ``conv2d.bias`` (D_inner,) if ``conv_bias``
``x_proj_weight``       (K, R + 2N, D_inner)          direction k's ``x_proj``
``dt_projs_weight``     (K, D_inner, R)
``dt_projs_bias``       (K, D_inner)
``A_logs``              (K * D_inner, N)              direction-major
``Ds``                  (K * D_inner,)                direction-major
``out_norm.weight``     (D_inner,)                    and ``out_norm.bias``; eps 1e-5
``out_proj.weight``     (d_model, D_inner)            no bias
======================  ============================  ======================================================

Layout: channels-last ``(B, H, W, C)``. Upstream's ln2d models run channels-first ``(B, C, H, W)``; here the
tokens stay channels-last, so the projections are matmuls over the last axis, the conv runs on a channels-last
view (no copy) and the scan reads its native layout, a ``(B, D_inner, L)`` view of ``(B, L, D_inner)`` memory.

No cross-scanned copy is made: ``x_proj`` and ``dt_projs`` are per-token maps, so they are applied to the tokens
in grid order, and :func:`vim.kernels.cross_selective_scan` reads each direction's steps from those tensors
through index arithmetic and writes each output back at its tokens' own positions, all four in one launch (on
the "native" and "triton" backends; "torch" gathers the column orders into its own buffers, "reference" scans
explicit copies).

Numerics: the scan computes in float32 (float64 for float64 input) whatever the input dtype. Upstream's scan
kernel (``oflex``) returns float32 for fp16 / bf16 input and merges the directions and runs ``out_norm`` in
float32, casting back to the activations' dtype before ``out_proj``; here the scan reads the conv output as
float32, so it too returns and merges in float32 (one float32 copy of the conv output under mixed precision),
``out_norm`` runs in its weight's dtype (float32 under autocast) and the result is cast back to the conv output's
dtype before ``out_proj``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_module
from torch import nn

from vim.kernels import cross_selective_scan

from .mixer import init_scan_parameters

__all__ = ["SS2D"]

DIRECTIONS = 4
"""VMamba's cross scan: rows, columns, rows reversed, columns reversed (the default orders of the kernel)."""


@register_notrace_module
class SS2D(nn.Module):
    """VMamba's 2-D selective-scan mixer (``forward_type="v05_noz"``), (B, H, W, d_model) -> (B, H, W, d_model).

    Args:
        d_model: token width C.
        d_state: SSM state size N (1 in the released v2 models).
        ssm_ratio: inner width ``D_inner = int(ssm_ratio * d_model)``.
        dt_rank: rank R of the step-size projection, "auto" for ``ceil(d_model / 16)``.
        d_conv: side of the depthwise conv, odd (padded to keep H and W).
        conv_bias: give the depthwise conv a bias (the released models have none).
        dt_min, dt_max, dt_init_floor: range of the initial step sizes (``ssm_init="v0"``).
        kernel_backend: backend of the selective scan, None for ``$VIM_SCAN_BACKEND`` or "auto".
    """

    takes_grid = True
    """A :class:`~vim.models.block.MambaBlock` gives it the tokens' grid."""

    def __init__(
        self,
        d_model: int,
        d_state: int = 1,
        ssm_ratio: float = 1.0,
        dt_rank: int | str = "auto",
        d_conv: int = 3,
        conv_bias: bool = False,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        kernel_backend: str | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if d_conv < 1 or d_conv % 2 == 0:
            raise ValueError(f"d_conv must be odd (a depthwise conv padded to keep H and W), got {d_conv}")
        if dt_rank == "auto":
            dt_rank = math.ceil(d_model / 16)
        if not isinstance(dt_rank, int):
            raise ValueError(f"dt_rank must be an int or 'auto' (ceil(d_model / 16)), got {dt_rank!r}")
        dd = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.d_state = d_state
        self.d_inner = int(ssm_ratio * d_model)
        self.dt_rank = dt_rank
        self.dt_range = (dt_min, dt_max, dt_init_floor)
        self.kernel_backend = kernel_backend
        K, inner = DIRECTIONS, self.d_inner

        self.in_proj = nn.Linear(d_model, inner, bias=False, **dd)
        self.conv2d = nn.Conv2d(inner, inner, d_conv, padding=(d_conv - 1) // 2, groups=inner, bias=conv_bias, **dd)
        self.x_proj_weight = nn.Parameter(torch.empty(K, self.dt_rank + 2 * d_state, inner, **dd))
        self.dt_projs_weight = nn.Parameter(torch.empty(K, inner, self.dt_rank, **dd))
        self.dt_projs_bias = nn.Parameter(torch.empty(K, inner, **dd))
        # the scan reads A and D as float32 whatever the parameters' dtype
        self.A_logs = nn.Parameter(torch.empty(K * inner, d_state, **dd))
        self.Ds = nn.Parameter(torch.empty(K * inner, **dd))
        self.out_norm = nn.LayerNorm(inner, **dd)
        self.out_proj = nn.Linear(inner, d_model, bias=False, **dd)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """VMamba's ``ssm_init="v0"``: per direction an ``nn.Linear``-initialised ``x_proj`` and Mamba's dt, A, D.

        ``in_proj``, ``conv2d``, ``out_norm`` and ``out_proj`` get PyTorch's default init (upstream's VSSM then
        re-initialises every Linear with a truncated normal: the backbone's job).
        """
        dt_min, dt_max, dt_floor = self.dt_range
        for layer in (self.in_proj, self.conv2d, self.out_norm, self.out_proj):
            layer.reset_parameters()
        bound = self.d_inner**-0.5  # each direction's x_proj as nn.Linear(D_inner, R + 2N) initialises its weight
        nn.init.uniform_(self.x_proj_weight, -bound, bound)
        A_logs, Ds = self.A_logs.view(DIRECTIONS, self.d_inner, -1), self.Ds.view(DIRECTIONS, -1)
        for k in range(DIRECTIONS):
            init_scan_parameters(self.dt_projs_weight[k], self.dt_projs_bias[k], A_logs[k], Ds[k], dt_min, dt_max, dt_floor)

    def _conv(self, x: torch.Tensor) -> torch.Tensor:
        """Depthwise conv + SiLU on channels-last memory, (B, H, W, D_inner) -> (B, H, W, D_inner)."""
        return F.silu(self.conv2d(x.permute(0, 3, 1, 2))).permute(0, 2, 3, 1)

    def _project(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Step sizes and B, C of the four directions, computed on the tokens in grid order.

        Every direction projects the same tokens, so ``x_proj`` of all four is one matmul with the stacked weights
        (rather than Vim's batched matmul over per-direction inputs).

        Args:
            tokens: (B, L, D_inner) the conv output in grid (row-major) order.

        Returns:
            delta (K, B, D_inner, L), a view of channels-last memory, and B, C (K, B, N, L) views of the projection.
        """
        batch, length, _ = tokens.shape
        rank, n_state = self.dt_rank, self.d_state
        x_dbl = tokens @ self.x_proj_weight.flatten(0, 1).T  # (B, L, K * (R + 2N))
        x_dbl = x_dbl.view(batch, length, DIRECTIONS, rank + 2 * n_state).permute(2, 0, 3, 1)  # (K, B, R + 2N, L)
        dt, B, C = x_dbl.split([rank, n_state, n_state], dim=2)
        dt = dt.permute(0, 1, 3, 2).reshape(DIRECTIONS, batch * length, rank)
        delta = torch.bmm(dt, self.dt_projs_weight.transpose(1, 2))  # (K, B * L, D_inner)
        return delta.view(DIRECTIONS, batch, length, self.d_inner).transpose(-1, -2), B, C

    def forward(self, x: torch.Tensor, grid: tuple[int, ...] | None = None) -> torch.Tensor:
        """(B, H, W, d_model) -> (B, H, W, d_model), channels-last; or (B, H * W, d_model) tokens on ``grid`` (H, W)
        -> (B, H * W, d_model), as a :class:`~vim.models.block.MambaBlock` in a hierarchical trunk calls it."""
        if grid is not None:
            if x.dim() != 3 or x.shape[1] != math.prod(grid):
                raise ValueError(f"SS2D: tokens of shape {tuple(x.shape)} do not lie on the grid {tuple(grid)}")
            return self.forward(x.unflatten(1, grid)).flatten(1, 2)
        if x.dim() != 4 or x.shape[-1] != self.d_model:
            raise ValueError(f"SS2D expects channels-last tokens (B, H, W, {self.d_model}), got shape {tuple(x.shape)}")
        batch, height, width, _ = x.shape
        u = self._conv(self.in_proj(x)).reshape(batch, height * width, self.d_inner)  # (B, L, D_inner), a view
        delta, B, C = self._project(u)
        # float32 (float64 for float64 input): output and merge in float32 as upstream's oflex scan (module docstring)
        scan_dtype = torch.promote_types(u.dtype, torch.float32)
        y = cross_selective_scan(
            u.to(scan_dtype).transpose(1, 2),
            delta,
            -torch.exp(self.A_logs.to(scan_dtype)).view(DIRECTIONS, self.d_inner, -1),
            B,
            C,
            D=self.Ds.to(scan_dtype).view(DIRECTIONS, -1),
            delta_bias=self.dt_projs_bias.to(scan_dtype),
            delta_softplus=True,
            grid=(height, width),
            backend=self.kernel_backend,
        )  # (B, D_inner, L)
        y = self.out_norm(y.transpose(1, 2).to(self.out_norm.weight.dtype))
        return self.out_proj(y.to(u.dtype)).view(batch, height, width, self.d_model)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_inner={self.d_inner}, d_state={self.d_state}, dt_rank={self.dt_rank}"
