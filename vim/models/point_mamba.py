"""PointMamba point-cloud backbones on the shared bidirectional Mamba trunk, registered with timm.

API::

    import vim, timm
    model = timm.create_model("pointmamba_small", num_classes=40)
    logits = model(points)                                  # (B, N, 3) xyz -> (B, 40)
    tokens = model.forward_features(points)                 # (B, S * G, D), S serialisation orders of G groups
    pooled = model.forward_head(tokens, pre_logits=True)    # (B, head_hidden_size)
    final, inter = model.forward_intermediates(points, indices=[3, 11])

PointMamba (arXiv 2402.10739, LMD0311/PointMamba): farthest point sampling picks G centres, each
takes its K nearest points (relative to the centre), a mini-PointNet (:class:`PointGroupEncoder`,
Point-MAE's "Encoder") turns each group into a token and an MLP embeds the centre's position. The
tokens are serialised along several space-filling curves (:func:`~vim.models.point_ops.serialization_order`;
by default a Hilbert curve and the Hilbert curve with x and y swapped), each order's tokens get
their own learned scale and shift (PointMamba's order indicator), and the sequences are concatenated
and run through the same bidirectional Mamba blocks as every other modality
(:class:`~vim.models.backbone.MambaBackbone`). The mean of the final tokens goes through PointMamba's
MLP head (Linear-BN-ReLU-Dropout twice, then the classifier ``head.fc``).

Registered: ``pointmamba_small`` (64 groups, ModelNet40's 1024 points), ``pointmamba_small_g128``
(128 groups, ScanObjectNN's 2048 points) and the tiny ``test_pointmamba``.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from .backbone import MambaBackbone, init_linear_, new_classifier
from .point_ops import ORDERS, gather_points, group_points, serialization_order

__all__ = ["PointGroupEncoder", "PointMamba", "PointMambaHead", "check_point_batch"]

PoolType = Literal["avg", "max", ""]


def check_point_batch(points: torch.Tensor, min_points: int) -> None:
    """ValueError unless ``points`` is a (B, N, 3) float batch with N >= ``min_points`` and finite values."""
    if points.dim() != 3 or points.shape[-1] != 3:
        raise ValueError(f"points must have shape (B, N, 3) (xyz per point), got {tuple(points.shape)}")
    if not points.is_floating_point():
        raise ValueError(f"points must be a floating-point tensor, got {points.dtype}")
    if points.shape[1] < min_points:
        raise ValueError(
            f"points: {points.shape[1]} points per cloud, the model needs at least {min_points} (num_groups, group_size)"
        )
    # a check of the values cannot be part of an exported graph: there NaN points give NaN outputs
    if not torch.compiler.is_exporting() and not torch.isfinite(points).all():
        raise ValueError("points holds NaN or infinite coordinates")


class PointGroupEncoder(nn.Module):
    """Mini-PointNet of Point-MAE / PointMamba: one token per group, (B, G, K, 3) -> (B, G, C).

    Shared point MLP 3 -> 128 -> 256, max-pool over the K points, the pooled feature concatenated to
    every point (512), point MLP 512 -> 512 -> C, max-pool again.
    """

    def __init__(self, out_dim: int, device=None, dtype=None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.out_dim = out_dim
        self.first_conv = nn.Sequential(
            nn.Conv1d(3, 128, 1, **dd), nn.BatchNorm1d(128, **dd), nn.ReLU(inplace=True), nn.Conv1d(128, 256, 1, **dd)
        )
        self.second_conv = nn.Sequential(
            nn.Conv1d(512, 512, 1, **dd), nn.BatchNorm1d(512, **dd), nn.ReLU(inplace=True), nn.Conv1d(512, out_dim, 1, **dd)
        )

    def forward(self, groups: torch.Tensor) -> torch.Tensor:
        """(B, G, K, 3) centred groups -> (B, G, C) group tokens."""
        batch, num_groups, group_size, _ = groups.shape
        x = self.first_conv(groups.reshape(batch * num_groups, group_size, 3).transpose(1, 2))  # (BG, 256, K)
        pooled = x.amax(dim=2, keepdim=True)
        x = self.second_conv(torch.cat([pooled.expand(-1, -1, group_size), x], dim=1))  # (BG, C, K)
        return x.amax(dim=2).reshape(batch, num_groups, self.out_dim)


class PointMambaHead(nn.Module):
    """PointMamba's classifier: ``pre_logits`` (Linear-BN-ReLU-Dropout x 2) then ``fc``, (B, D) -> (B, num_classes)."""

    def __init__(self, in_features: int, hidden_size: int, num_classes: int, drop_rate: float, device=None, dtype=None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.hidden_size = hidden_size

        def layer(width_in: int) -> list[nn.Module]:
            return [
                nn.Linear(width_in, hidden_size, **dd),
                nn.BatchNorm1d(hidden_size, **dd),
                nn.ReLU(inplace=True),
                nn.Dropout(drop_rate),
            ]

        self.pre_logits = nn.Sequential(*layer(in_features), *layer(hidden_size))
        self.fc = nn.Identity()
        self.reset(num_classes)

    def reset(self, num_classes: int) -> None:
        """A new, initialised ``fc`` for ``num_classes`` outputs (0: none)."""
        self.fc = new_classifier(self.hidden_size, num_classes, like=self.pre_logits[0].weight)

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.pre_logits(x)
        return x if pre_logits else self.fc(x)


class PointMamba(MambaBackbone):
    """PointMamba classifier of (B, N, 3) point clouds, behaving like a timm model.

    Args:
        num_classes: classifier outputs, 0 for none (``head.fc`` becomes the identity).
        num_groups: G, the number of patches (FPS centres) per cloud.
        group_size: K, points per patch (nearest neighbours of the centre).
        embed_dim: token width D.
        depth: number of Mamba blocks.
        orders: serialisation orders (see :data:`~vim.models.point_ops.ORDERS`); the sequence has
            ``len(orders) * G`` tokens.
        serial_bits: resolution (bits per axis) of the grid the curves are computed on.
        global_pool: "avg" (PointMamba), "max" or "" (no pooling; the head then cannot run).
        head_hidden_size: width of the MLP head.
        d_state: SSM state size N.
        expand: mixer inner width ``expand * embed_dim``.
        drop_rate: dropout inside the MLP head.
        drop_path_rate: stochastic depth of the last block and of the final norm.
        norm_eps: RMSNorm epsilon.
        scan_backend: selective-scan backend, None for ``$VIM_SCAN_BACKEND`` or "auto".
    """

    pool_types = get_args(PoolType)
    stem_no_weight_decay = ("order_scale", "order_shift")
    stem_pattern = r"^encoder|^pos_embed|^order_"

    def __init__(
        self,
        num_classes: int = 40,
        num_groups: int = 64,
        group_size: int = 32,
        embed_dim: int = 384,
        depth: int = 12,
        orders: tuple[str, ...] = ("hilbert", "hilbert-trans"),
        serial_bits: int = 10,
        global_pool: PoolType = "avg",
        head_hidden_size: int = 256,
        d_state: int = 16,
        expand: int = 2,
        drop_rate: float = 0.5,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-5,
        scan_backend: str | None = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.init_head_attributes(num_classes, global_pool, embed_dim, head_hidden_size)
        orders = tuple(orders)
        unknown = [order for order in orders if order not in ORDERS]
        if not orders or unknown:
            raise ValueError(f"orders must be a non-empty sequence of {ORDERS}, got {orders}")
        if num_groups < 1 or group_size < 1:
            raise ValueError(f"num_groups={num_groups} and group_size={group_size} must be positive")
        self.num_groups, self.group_size = num_groups, group_size
        self.orders, self.serial_bits = orders, serial_bits

        self.encoder = PointGroupEncoder(embed_dim, **dd)
        self.pos_embed = nn.Sequential(nn.Linear(3, 128, **dd), nn.GELU(), nn.Linear(128, embed_dim, **dd))
        self.order_scale = nn.Parameter(torch.empty(len(orders), embed_dim, **dd))
        self.order_shift = nn.Parameter(torch.empty(len(orders), embed_dim, **dd))
        self.build_trunk(
            embed_dim, depth, drop_path_rate=drop_path_rate, norm_eps=norm_eps,
            d_state=d_state, expand=expand, divide_out=True, scan_backend=scan_backend, **dd,
        )  # fmt: skip
        self.head = PointMambaHead(embed_dim, head_hidden_size, num_classes, drop_rate, **dd)
        self.feature_info = [dict(module=f"layers.{i}", num_chs=embed_dim, reduction=1) for i in range(depth)]
        self.init_weights()

    @property
    def min_points(self) -> int:
        """Fewest points per cloud the tokenizer accepts: max(num_groups, group_size)."""
        return max(self.num_groups, self.group_size)

    @torch.no_grad()
    def init_weights(self, mode: str = "") -> None:
        """PointMamba's init: trunc-normal (0.02) tokenizer and head, order scale ~ N(1, 0.02); Mamba init for the trunk."""
        for module in (*self.encoder.modules(), *self.pos_embed.modules(), *self.head.modules()):
            if isinstance(module, (nn.Linear, nn.Conv1d)):
                init_linear_(module)
            elif isinstance(module, nn.BatchNorm1d):
                module.reset_parameters()
        nn.init.normal_(self.order_scale, mean=1.0, std=0.02)
        nn.init.normal_(self.order_shift, std=0.02)
        self.init_trunk_weights()

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def _reset_head(self, num_classes: int) -> None:
        """Replace ``head.fc`` with a new (initialised) one for ``num_classes`` outputs (0: none)."""
        self.head.reset(num_classes)

    def serialize(self, centres: torch.Tensor) -> torch.Tensor:
        """(B, G, 3) patch centres -> (S, B, G) index permutations, one per serialisation order."""
        return torch.stack([serialization_order(centres, order, self.serial_bits) for order in self.orders])

    def _embed(self, points: torch.Tensor) -> torch.Tensor:
        """(B, N, 3) points -> (B, S * G, D) tokens: each order's serialised group tokens, order-scaled, plus position."""
        check_point_batch(points, self.min_points)
        groups, centres = group_points(points, self.num_groups, self.group_size)
        dtype = self.order_scale.dtype
        tokens = self.encoder(groups.to(dtype))  # (B, G, D)
        pos = self.pos_embed(centres.to(dtype))
        sequences = [
            gather_points(tokens, perm) * scale + shift + gather_points(pos, perm)
            for perm, scale, shift in zip(self.serialize(centres), self.order_scale, self.order_shift)
        ]
        return torch.cat(sequences, dim=1)

    def forward_features(self, points: torch.Tensor) -> torch.Tensor:
        """(B, N, 3) -> (B, S * G, D) normalised tokens, order by order."""
        return self.forward_trunk(self._embed(points))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, L, D) tokens -> logits (B, num_classes), or the MLP head's (B, head_hidden_size) with ``pre_logits``."""
        return self.head(self.pool(x), pre_logits=pre_logits)

    def forward_intermediates(
        self,
        points: torch.Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NLC",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Forward pass that also returns the residual stream after selected blocks.

        Args:
            points: (B, N, 3).
            indices: the last n blocks if an int, these blocks if a list, all if None.
            norm: apply the final norm to the intermediates.
            stop_early: skip the blocks after the last selected one.
            output_fmt: "NLC" only: (B, S * G, D) tokens in sequence order.
            intermediates_only: return the intermediates only.

        Returns:
            ``(final_tokens (B, S * G, D), intermediates)`` or the intermediates alone.
        """
        if output_fmt != "NLC":
            raise ValueError(f"output_fmt must be 'NLC' for point clouds (tokens have no grid), got {output_fmt!r}")
        final, intermediates = self.forward_trunk_intermediates(self._embed(points), indices, norm=norm, stop_early=stop_early)
        return intermediates if intermediates_only else (final, intermediates)


def _create_point_mamba(variant: str, pretrained: bool = False, **kwargs) -> PointMamba:
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(
        PointMamba,
        variant,
        pretrained,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter", output_fmt="NLC"),
        kwargs_filter=("in_chans",),  # timm derives it from input_size; a cloud always has 3 coordinates
        **kwargs,
    )


def _cfg(num_points: int = 1024, num_classes: int = 40, **kwargs) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": num_classes,
        "input_size": (3, 1, num_points),  # timm wants (C, H, W): 3 coordinates of num_points points
        "fixed_input_size": False,
        "mean": (0.0, 0.0, 0.0),
        "std": (1.0, 1.0, 1.0),
        "classifier": "head.fc",
        "license": "apache-2.0",
        "paper_ids": "arXiv:2402.10739",
        "paper_name": "PointMamba: A Simple State Space Model for Point Cloud Analysis",
        "origin_url": "https://github.com/LMD0311/PointMamba",
        "notes": ("input: (B, N, 3) xyz, centred and scaled to the unit sphere; N = input_size[-1]",),
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "pointmamba_small.untrained": _cfg(),
        "pointmamba_small_g128.untrained": _cfg(num_points=2048, num_classes=15),
        "test_pointmamba.untrained": _cfg(num_points=128, num_classes=10),
    }
)


@register_model
def pointmamba_small(pretrained: bool = False, **kwargs) -> PointMamba:
    """PointMamba (12 blocks, width 384), 64 groups of 32 points: ModelNet40 with 1024 points."""
    model_args = dict(num_groups=64, group_size=32, embed_dim=384, depth=12)
    return _create_point_mamba("pointmamba_small", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def pointmamba_small_g128(pretrained: bool = False, **kwargs) -> PointMamba:
    """PointMamba (12 blocks, width 384), 128 groups of 32 points: ScanObjectNN with 2048 points."""
    model_args = dict(num_groups=128, group_size=32, embed_dim=384, depth=12)
    return _create_point_mamba("pointmamba_small_g128", pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def test_pointmamba(pretrained: bool = False, **kwargs) -> PointMamba:
    """A tiny PointMamba for tests: 16 groups of 8 points, 2 blocks of width 32, head width 32."""
    model_args = dict(num_groups=16, group_size=8, embed_dim=32, depth=2, d_state=8, head_hidden_size=32)
    return _create_point_mamba("test_pointmamba", pretrained=pretrained, **dict(model_args, **kwargs))
