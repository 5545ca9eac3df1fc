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
from timm.layers import DropPath, LayerScale, Mlp
from torch import nn

from vim.kernels import add_norm

__all__ = [
    "NORM_LAYERS",
    "ConvBlock",
    "MambaBlock",
    "NormLayer",
    "PartFactory",
    "TrunkBlock",
    "add_and_norm",
    "gelu_mlp",
    "norm_factory",
    "reset_part",
]

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
        layer_scale: the initial value of a learned per-channel scale of each branch output (timm's ``LayerScale``:
            ``ls1`` of the mixer's, ``ls2`` of the MLP's), None for none.
        kernel_backend: :func:`vim.kernels.add_norm`'s backend, None for ``$VIM_SCAN_BACKEND`` or "auto".

    A mixer whose class sets ``takes_grid = True`` (VMamba's SS2D) is called as ``mixer(x, grid=grid)`` with the
    tokens' grid; any other on the tokens alone.
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
        layer_scale: float | None = None,
        kernel_backend: str | None = None,
        device=None,
        dtype=None,
    ):
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.kernel_backend = kernel_backend
        self.norm = norm_cls(dim, **dd)
        self.mixer = mixer_cls(dim, **dd)
        self.mixer_takes_grid = bool(getattr(self.mixer, "takes_grid", False))
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = None if mlp_cls is None else norm_cls(dim, **dd)
        self.mlp = None if mlp_cls is None else mlp_cls(dim, **dd)
        self.ls1 = _layer_scale(dim, layer_scale, **dd)
        self.ls2 = _layer_scale(dim, layer_scale if mlp_cls is not None else None, **dd)

    @property
    def branches(self) -> int:
        """How many branches write into the residual stream: 1 (the mixer), 2 with an MLP."""
        return 1 if self.mlp is None else 2

    @torch.no_grad()
    def reset_parameters(self, depth: int = 1) -> None:
        """Each part's own init, then the branches' last projections (:data:`RESIDUAL_PROJECTIONS`) divided by
        ``sqrt(depth * branches)``: the GPT-2 scheme of mamba_ssm for a trunk of ``depth`` blocks."""
        branches = [self.mixer] if self.mlp is None else [self.mixer, self.mlp]
        for part in (self.norm, self.mixer, self.norm2, self.mlp, self.ls1, self.ls2):
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
            grid: the tokens' grid (H, W), given to a mixer that takes it (``takes_grid``: VMamba's SS2D).

        Returns:
            This block's last branch output (B, L, D) (the mixer's, or the MLP's) and the float32 residual stream (B, L, D).
        """
        if residual is not None:
            hidden_states = self.drop_path(hidden_states)
        normed, residual = add_and_norm(self.norm, hidden_states, residual, self.kernel_backend)
        hidden_states = self.ls1(self.mixer(normed, grid=grid) if self.mixer_takes_grid else self.mixer(normed))
        if self.mlp is not None:
            assert self.norm2 is not None
            normed, residual = add_and_norm(self.norm2, self.drop_path(hidden_states), residual, self.kernel_backend)
            hidden_states = self.ls2(self.mlp(normed))
        return hidden_states, residual


class ConvBlock(nn.Module):
    """A residual block of two 3x3 convolutions over the token grid (MambaVision's conv stages), called as a MambaBlock.

    ``stream + ls(BN2(conv2(GELU_tanh(BN1(conv1(stream))))))``: the convs 3x3 with bias, each BatchNorm of eps 1e-5,
    the GELU's tanh approximation, ``ls`` timm's ``LayerScale`` when ``layer_scale`` is given. Parameter names are
    MambaVision's (``conv1``, ``norm1``, ``conv2``, ``norm2``; its ``gamma`` is ``ls.gamma``). As in
    :class:`MambaBlock`, the incoming branch output joins the stream here through ``drop_path``, and the block returns
    its own branch output with the stream before it.

    Args:
        dim: channels C.
        drop_path: stochastic-depth rate of the incoming branch output.
        layer_scale: the initial layer scale, None for none.
        kernel_size: the convs' side (odd).
    """

    def __init__(
        self, dim: int, drop_path: float = 0.0, layer_scale: float | None = None, kernel_size: int = 3, device=None, dtype=None
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.conv1 = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, **dd)
        self.norm1 = nn.BatchNorm2d(dim, **dd)
        self.act1 = nn.GELU(approximate="tanh")
        self.conv2 = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, **dd)
        self.norm2 = nn.BatchNorm2d(dim, **dd)
        self.ls = _layer_scale(dim, layer_scale, **dd)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    @torch.no_grad()
    def reset_parameters(self, depth: int = 1) -> None:
        """PyTorch's init of the convs and norms, the layer scale at ``layer_scale`` (``depth`` is not used)."""
        for part in (self.conv1, self.norm1, self.conv2, self.norm2, self.ls):
            reset_part(part)

    def forward(
        self, hidden_states: torch.Tensor, residual: torch.Tensor | None = None, grid: tuple[int, ...] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, H * W, C) branch output and stream on ``grid`` (H, W) -> this block's branch output and the stream."""
        if grid is None:
            raise ValueError("ConvBlock convolves the token grid: give the tokens' grid (H, W)")
        stream = hidden_states if residual is None else residual + self.drop_path(hidden_states)
        x = stream.unflatten(1, grid).movedim(-1, 1)  # (B, C, H, W), channels-last in memory
        x = self.norm2(self.conv2(self.act1(self.norm1(self.conv1(x.to(self.conv1.weight.dtype))))))
        return self.ls(x.flatten(2).transpose(1, 2)), stream


TrunkBlock = MambaBlock | ConvBlock
"""A block of a trunk: ``block(hidden, residual, grid) -> (hidden, residual)`` and ``drop_path``."""


def _layer_scale(dim: int, init_values: float | None, device=None, dtype=None) -> nn.Module:
    """timm's ``LayerScale`` (a learned per-channel scale, (B, L, D) -> (B, L, D)) from ``init_values``; the identity for None."""
    return nn.Identity() if init_values is None else LayerScale(dim, init_values, device=device, dtype=dtype)


def gelu_mlp(dim: int, mlp_ratio: float = 4.0, drop: float = 0.0, device=None, dtype=None) -> Mlp:
    """timm's ``Mlp`` (``fc1`` -> exact GELU -> ``fc2``, hidden ``int(dim * mlp_ratio)``, dropout ``drop`` after each),
    (B, L, D) -> (B, L, D): the MLP of VMamba's and MambaVision's blocks."""
    return Mlp(dim, int(dim * mlp_ratio), drop=drop, device=device, dtype=dtype)
