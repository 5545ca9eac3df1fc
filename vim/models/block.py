"""One residual block built from its parts (a token mixer, an optional MLP, a norm) in Vision Mamba's Add -> Norm -> Mixer order.

API::

    norm = norm_factory("rmsnorm", eps=1e-5)                                   # or "layernorm"
    block = MambaBlock(dim, partial(MambaMixer, divide_out=True), norm_cls=norm, drop_path=0.1)          # Vim
    block = MambaBlock(dim, partial(MambaMixer, directions=1), norm_cls=norm_factory("layernorm"))       # PointMamba
    block = MambaBlock(dim, mixer_cls, mlp_cls=partial(Mlp, hidden_features=4 * dim), norm_cls=norm)    # mixer + MLP
    hidden, residual = block(hidden, residual)   # (B, L, D) each; residual None for the first block

The parts are factories called as ``part(dim, device=..., dtype=...)`` (mamba_ssm's ``Block(dim, mixer_cls, mlp_cls,
norm_cls)``): ``mixer_cls`` and ``mlp_cls`` map (B, L, D) -> (B, L, D), ``norm_cls`` builds an ``nn.RMSNorm`` or
``nn.LayerNorm`` (the two norms the fused add + norm computes).

The block first adds the previous branch's output to the residual stream (through stochastic depth), keeps that
stream in float32, then mixes the normalised stream: ``residual = residual + drop_path(hidden)``;
``hidden = mixer(norm(residual))``. With an MLP the same step follows once more inside the block:
``residual = residual + drop_path(hidden)``; ``hidden = mlp(norm2(residual))``. A chain of these blocks computes
the pre-norm residual ``x + mixer(norm(x))`` (then ``x + mlp(norm2(x))``) of each block, as PointMamba writes it:
each addition is only deferred to the next step (or the trunk's final norm). Each add and norm runs as one
:func:`vim.kernels.add_norm` (a fused kernel on CUDA, the PyTorch ops on CPU). Parameter names (``norm.weight``,
``norm.bias`` for LayerNorm, ``mixer.*``; ``norm2.*``, ``mlp.*`` with an MLP) follow the official checkpoints.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Literal, get_args

import torch
from timm.layers import DropPath
from torch import nn

from vim.kernels import add_norm

__all__ = ["NORM_LAYERS", "MambaBlock", "NormLayer", "PartFactory", "add_and_norm", "norm_factory", "reset_part"]

# a leaf for torch.fx (timm's feature extraction): its argument checks cannot run on symbolic tensors
torch.fx.wrap("add_norm")

NormLayer = Literal["rmsnorm", "layernorm"]
NORM_LAYERS: tuple[str, ...] = get_args(NormLayer)

PartFactory = Callable[..., nn.Module]
"""A block part's constructor, called as ``part(dim, device=..., dtype=...)``: a class or a ``functools.partial``."""

RESIDUAL_PROJECTIONS = ("out_proj", "proj", "fc2")
"""The names of a mixer's or MLP's last projection (Mamba's, timm's attention, timm's MLP): the one writing into the
residual stream, which the trunk's init rescales for depth."""


def norm_factory(norm_layer: str, eps: float = 1e-5) -> PartFactory:
    """The norm of a block or trunk by name: "rmsnorm" (Vim, VideoMamba) or "layernorm" (PointMamba), over the last axis D.

    ValueError naming the choices for another name.
    """
    if norm_layer == "rmsnorm":
        return partial(nn.RMSNorm, eps=eps)
    if norm_layer == "layernorm":
        return partial(nn.LayerNorm, eps=eps)
    raise ValueError(f"norm_layer must be one of {NORM_LAYERS}, got {norm_layer!r}")


def add_and_norm(
    norm: nn.Module, hidden: torch.Tensor, residual: torch.Tensor | None, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``norm`` of the float32 stream ``residual + hidden`` (``hidden`` alone for None), in the norm's dtype.

    Args:
        norm: an ``nn.RMSNorm`` or ``nn.LayerNorm`` (its weight, bias and eps are used; RMSNorm has no bias).
        hidden: (B, L, D) a branch's output (after stochastic depth) or the embedded tokens.
        residual: (B, L, D) float32 residual stream, or None.
        backend: :func:`vim.kernels.add_norm`'s backend.

    Returns:
        The normalised stream (B, L, D) in ``norm.weight.dtype`` and the float32 stream (B, L, D).
    """
    if not isinstance(norm, (nn.RMSNorm, nn.LayerNorm)):
        raise TypeError(f"the fused add + norm computes nn.RMSNorm or nn.LayerNorm, got a {type(norm).__name__}")
    kind = "rms" if isinstance(norm, nn.RMSNorm) else "layer"
    return add_norm(hidden, residual, norm.weight, getattr(norm, "bias", None), norm.eps, norm=kind, backend=backend)


@torch.no_grad()
def reset_part(module: nn.Module) -> None:
    """Initialise ``module`` by its own ``reset_parameters`` (a Mamba mixer's Mamba init), else each child's in turn."""
    reset = getattr(module, "reset_parameters", None)
    if callable(reset):
        reset()
        return
    for child in module.children():
        reset_part(child)


class MambaBlock(nn.Module):
    """Residual block of a token mixer, an optional MLP and their norms; see the module docstring.

    Args:
        dim: token width D.
        mixer_cls: the token mixer's factory, ``mixer_cls(dim, device=, dtype=)`` (B, L, D) -> (B, L, D).
        mlp_cls: the MLP's factory (same call), None for a block without MLP (Vim, VideoMamba, PointMamba).
        norm_cls: the norms' factory (``norm`` before the mixer, ``norm2`` before the MLP), see :func:`norm_factory`.
        drop_path: stochastic-depth rate of each branch output entering the residual stream here: the incoming
            one (the previous block's last branch) and, with an MLP, this block's mixer output.
        kernel_backend: :func:`vim.kernels.add_norm`'s backend, None for ``$VIM_SCAN_BACKEND`` or "auto".
    """

    norm2: nn.Module | None
    mlp: nn.Module | None

    def __init__(
        self,
        dim: int,
        mixer_cls: PartFactory,
        mlp_cls: PartFactory | None = None,
        norm_cls: PartFactory = nn.RMSNorm,
        drop_path: float = 0.0,
        kernel_backend: str | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.kernel_backend = kernel_backend
        self.norm = norm_cls(dim, **dd)
        self.mixer = mixer_cls(dim, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = None if mlp_cls is None else norm_cls(dim, **dd)
        self.mlp = None if mlp_cls is None else mlp_cls(dim, **dd)

    @property
    def branches(self) -> int:
        """How many branches write into the residual stream: 1 (the mixer), 2 with an MLP."""
        return 1 if self.mlp is None else 2

    @torch.no_grad()
    def reset_parameters(self, depth: int = 1) -> None:
        """Each part's own init, then the branches' last projections (:data:`RESIDUAL_PROJECTIONS`) divided by
        ``sqrt(depth * branches)``: the GPT-2 scheme of mamba_ssm for a trunk of ``depth`` blocks."""
        branches = [self.mixer] if self.mlp is None else [self.mixer, self.mlp]
        for part in (self.norm, self.mixer, self.norm2, self.mlp):
            if part is not None:
                reset_part(part)  # the norms draw nothing: the mixer's random draws come first, as they always have
        for branch in branches:
            for name in RESIDUAL_PROJECTIONS:
                projection = getattr(branch, name, None)
                if isinstance(projection, nn.Linear):
                    projection.weight.div_(math.sqrt(depth * self.branches))

    def forward(
        self, hidden_states: torch.Tensor, residual: torch.Tensor | None = None, grid: tuple[int, ...] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Advance the residual stream by one block.

        Args:
            hidden_states: (B, L, D) the previous block's last branch output, or the embedded tokens for the first block.
            residual: (B, L, D) the residual stream, None for the first block.
            grid: the tokens' grid (H, W), given to a mixer that reads it as ``mixer(x, grid=grid)`` (VMamba's SS2D);
                None: the mixer is called on the tokens alone.

        Returns:
            This block's last branch output (B, L, D) (the mixer's, or the MLP's) and the float32 residual stream (B, L, D).
        """
        if residual is not None:
            hidden_states = self.drop_path(hidden_states)
        normed, residual = add_and_norm(self.norm, hidden_states, residual, self.kernel_backend)
        hidden_states = self.mixer(normed) if grid is None else self.mixer(normed, grid=grid)
        if self.mlp is not None:
            assert self.norm2 is not None
            normed, residual = add_and_norm(self.norm2, self.drop_path(hidden_states), residual, self.kernel_backend)
            hidden_states = self.mlp(normed)
        return hidden_states, residual
