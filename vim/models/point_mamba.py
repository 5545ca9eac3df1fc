"""PointMamba point-cloud backbones on the shared Mamba trunk, registered with timm: ours and the released architecture.

API::

    import vim, timm
    model = timm.create_model("pointmamba_small", num_classes=40)               # ours, trained by our recipes
    model = timm.create_model("pointmamba_scan_small.modelnet40", pretrained=True)   # PointMamba's released weights
    logits = model(points)                                  # (B, N, 3) xyz -> (B, 40)
    tokens = model.forward_features(points)                 # (B, S * G, D), S serialisation orders of G groups
    pooled = model.forward_head(tokens, pre_logits=True)    # (B, head_hidden_size)
    final, inter = model.forward_intermediates(points, indices=[3, 11])

PointMamba (arXiv 2402.10739, LMD0311/PointMamba): farthest point sampling picks G centres, each
takes its K nearest points (relative to the centre), a mini-PointNet (:class:`PointGroupEncoder`,
Point-MAE's "Encoder") turns each group into a token and an MLP embeds the centre's position. The
tokens are serialised along several space-filling curves (:func:`~vim.models.point_ops.serialization_order`;
by default a Hilbert curve and the Hilbert curve with x and y swapped), each order's tokens get
their own learned scale and shift (PointMamba's order indicator), the position embedding is added
once, and the sequences are concatenated and run through the trunk every modality shares
(:class:`~vim.models.backbone.MambaBackbone`). The mean of the final tokens goes through PointMamba's
MLP head (Linear-BN-ReLU-Dropout twice, then a linear classifier).

Two families, one class each:

* :class:`PointMamba` (``pointmamba_small``, ``pointmamba_small_g128``): ours. Bidirectional RMSNorm
  blocks, exact FPS, curves on a 2^10 grid over each cloud's bounding cube, the MLP head's output as
  ``pre_logits`` (classifier ``head.fc``). No released weights: train them (``configs/pointmamba_*.yaml``).
* :class:`PointMambaScan` (``pointmamba_scan_small``, ``pointmamba_scan_small_g128``): the released
  architecture, upstream's ``PointMambaScan`` in its numerics, loading its released files. Unidirectional
  Mamba mixers in pre-norm LayerNorm blocks (``x + mixer(LayerNorm(x))``) and a final LayerNorm,
  FPS exactly as pointnet2_ops picks, curves on 0.02-sized cells (Pointcept's serialisation), mean (or
  ``catavgmax``: mean and max) pooling, and the whole MLP head ``cls_head_finetune`` as the classifier
  (``pre_logits`` is the pooled feature, which the pre-training checkpoint also has).

:func:`checkpoint_filter_fn` reads upstream's files as they are (weights under ``base_model``; the
pre-training file's ``MAE_encoder.`` prefix; the decoder dropped) and maps their three container names onto
the shared trunk and head: ``blocks.layers.*`` -> ``layers.*``, ``blocks.norm_f`` -> ``norm_f``,
``cls_head_finetune.*`` -> ``head.*``, ``OrderScale_gamma_i`` / ``OrderScale_beta_i`` -> row i - 1 of
``order_scale`` / ``order_shift``; every other name (encoder, position MLP, mixers, norms) is upstream's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, TypeVar, cast, get_args

import torch
from timm.models import generate_default_cfgs, register_model
from torch import nn

from .backbone import MambaBackbone
from .block import NormLayer
from .builder import build_backbone
from .checkpoint import CUSTOM_LOAD, checked, classifier_keys, unwrap_state_dict
from .point_ops import ORDERS, gather_points, group_points, serialization_order
from .timm_api import InputAxis, init_linear_, new_classifier

__all__ = [
    "PointGroupEncoder",
    "PointMamba",
    "PointMambaHead",
    "PointMambaScan",
    "check_point_batch",
    "checkpoint_filter_fn",
    "trained_on_unit_sphere",
]

PoolType = Literal["avg", "max", ""]
Sampling = Literal["exact", "pointnet2"]


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


def mlp_head_layers(in_features: int, hidden_size: int, drop_rate: float, device=None, dtype=None) -> list[nn.Module]:
    """PointMamba's head before its classifier: (Linear-BN-ReLU-Dropout) twice, (B, in_features) -> (B, hidden_size)."""
    dd = {"device": device, "dtype": dtype}
    layers: list[nn.Module] = []
    for width_in in (in_features, hidden_size):
        layers += [nn.Linear(width_in, hidden_size, **dd), nn.BatchNorm1d(hidden_size, **dd), nn.ReLU(inplace=True)]
        layers.append(nn.Dropout(drop_rate))
    return layers


class PointMambaHead(nn.Module):
    """PointMamba's classifier: ``pre_logits`` (Linear-BN-ReLU-Dropout x 2) then ``fc``, (B, D) -> (B, num_classes)."""

    def __init__(self, in_features: int, hidden_size: int, num_classes: int, drop_rate: float, device=None, dtype=None) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.pre_logits = nn.Sequential(*mlp_head_layers(in_features, hidden_size, drop_rate, device=device, dtype=dtype))
        self.fc: nn.Module = nn.Identity()
        self.reset(num_classes)

    def reset(self, num_classes: int) -> None:
        """A new, initialised ``fc`` for ``num_classes`` outputs (0: none)."""
        self.fc = new_classifier(self.hidden_size, num_classes, like=next(self.pre_logits.parameters()))

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
        serial_bits: resolution (bits per axis) of the grid over each cloud's bounding cube the curves run on.
        serial_cell_size: run the curves on cells of this size instead (PointMamba's 0.02; the depth is the batch's).
        sampling: "exact" farthest point sampling (ties to the lowest index) or "pointnet2" (as pointnet2_ops'
            CUDA kernel picks, see :func:`~vim.models.point_ops.farthest_point_sample`).
        global_pool: "avg" (PointMamba), "max" or "" (no pooling; the head then cannot run).
        head_hidden_size: width of the MLP head.
        d_state: SSM state size N.
        expand: mixer inner width ``expand * embed_dim``.
        directions: 2 (bidirectional mixers, ours) or 1 (Mamba's own, PointMamba's).
        norm_layer: "rmsnorm" (ours) or "layernorm" (PointMamba's) in every block and the final norm.
        drop_rate: dropout inside the MLP head.
        drop_path_rate: stochastic depth of the last block and of the final norm.
        norm_eps: the norms' epsilon.
        kernel_backend: backend of the kernels (scan, conv + SiLU, add + norm), None for ``$VIM_SCAN_BACKEND`` or "auto".
    """

    pool_types = get_args(PoolType)
    num_prefix_tokens = 0
    stem_no_weight_decay = ("order_scale", "order_shift")
    stem_pattern = r"^encoder|^pos_embed|^order_"
    modality = "points"
    input_kind = "point clouds"

    def __init__(
        self,
        num_classes: int = 40,
        num_groups: int = 64,
        group_size: int = 32,
        embed_dim: int = 384,
        depth: int = 12,
        orders: tuple[str, ...] = ("hilbert", "hilbert-trans"),
        serial_bits: int = 10,
        serial_cell_size: float | None = None,
        sampling: Sampling = "exact",
        global_pool: PoolType = "avg",
        head_hidden_size: int = 256,
        d_state: int = 16,
        expand: int = 2,
        directions: int = 2,
        norm_layer: NormLayer = "rmsnorm",
        drop_rate: float = 0.5,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-5,
        kernel_backend: str | None = None,
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
        if sampling not in get_args(Sampling):
            raise ValueError(f"sampling must be one of {get_args(Sampling)}, got {sampling!r}")
        self.num_groups, self.group_size, self.sampling = num_groups, group_size, sampling
        self.orders, self.serial_bits, self.serial_cell_size = orders, serial_bits, serial_cell_size
        self.drop_rate, self.mlp_width = drop_rate, head_hidden_size

        self.encoder = PointGroupEncoder(embed_dim, **dd)
        self.pos_embed = nn.Sequential(nn.Linear(3, 128, **dd), nn.GELU(), nn.Linear(128, embed_dim, **dd))
        self.order_scale = nn.Parameter(torch.empty(len(orders), embed_dim, **dd))
        self.order_shift = nn.Parameter(torch.empty(len(orders), embed_dim, **dd))
        self.build_trunk(
            embed_dim, depth, drop_path_rate=drop_path_rate, norm_layer=norm_layer, norm_eps=norm_eps,
            d_state=d_state, expand=expand, directions=directions, divide_out=True, kernel_backend=kernel_backend, **dd,
        )  # fmt: skip
        self.head = self._new_head(num_classes, **dd)
        self.feature_info = self.describe_features([embed_dim] * depth, [1] * depth)  # tokens without a grid
        self.init_weights()

    @property
    def pooled_width(self) -> int:
        """Width of the pooled feature the head takes: D, or 2 D for "catavgmax"."""
        return self.embed_dim * (2 if self.global_pool == "catavgmax" else 1)

    def _new_head(self, num_classes: int, device=None, dtype=None) -> nn.Module:
        return PointMambaHead(self.pooled_width, self.mlp_width, num_classes, self.drop_rate, device=device, dtype=dtype)

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

    @property
    def _mlp_head(self) -> PointMambaHead:
        """``head``, the :class:`PointMambaHead` this class builds (:class:`PointMambaScan` builds another)."""
        return cast(PointMambaHead, self.head)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self._mlp_head.fc

    def _reset_head(self, num_classes: int) -> None:
        """Replace ``head.fc`` with a new (initialised) one for ``num_classes`` outputs (0: none)."""
        self._mlp_head.reset(num_classes)

    def checkpoint_filter(self, state_dict: Mapping) -> dict[str, torch.Tensor]:
        return checkpoint_filter_fn(state_dict, self)

    def serialize(self, centres: torch.Tensor) -> torch.Tensor:
        """(B, G, 3) patch centres -> (S, B, G) index permutations, one per serialisation order."""
        return torch.stack(
            [serialization_order(centres, order, self.serial_bits, cell_size=self.serial_cell_size) for order in self.orders]
        )

    def input_axes(self) -> tuple[InputAxis, ...]:
        """(B, N, 3): N points of 3 coordinates (xyz)."""
        return ("B", "N", (3, "coordinates"))

    def nominal_input_shape(self) -> tuple[int, ...]:
        """(N, 3): the cloud size of the pretrained config (``input_size[-1]``), at least :attr:`min_points`."""
        input_size = getattr(self, "pretrained_cfg", {}).get("input_size")
        return (max(input_size[-1] if input_size else 0, self.min_points), 3)

    def set_input_size(self, num_points: int | None = None) -> None:
        """Change the nominal cloud size (``pretrained_cfg["input_size"]``); the model itself takes any size from
        :attr:`min_points` on. None keeps it."""
        if num_points is not None:
            if num_points < self.min_points:
                raise ValueError(f"num_points={num_points}: {self.model_name} takes clouds of at least {self.min_points} points")
            self.pretrained_cfg = {**getattr(self, "pretrained_cfg", {}), "input_size": (3, 1, num_points)}

    def _embed(self, points: torch.Tensor) -> torch.Tensor:
        """(B, N, 3) points -> (B, S * G, D) tokens: each order's serialised group tokens, order-scaled, plus position."""
        check_point_batch(points, self.min_points)
        groups, centres = group_points(points, self.num_groups, self.group_size, pointnet2=self.sampling == "pointnet2")
        dtype = self.order_scale.dtype
        tokens = self.encoder(groups.to(dtype))  # (B, G, D)
        pos = self.pos_embed(centres.to(dtype))
        sequences = [
            gather_points(tokens, perm) * scale + shift + gather_points(pos, perm)
            for perm, scale, shift in zip(self.serialize(centres), self.order_scale, self.order_shift)
        ]
        return torch.cat(sequences, dim=1)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, L, D) tokens -> logits (B, num_classes), or the MLP head's (B, head_hidden_size) with ``pre_logits``."""
        return self.head(self.pool(x), pre_logits=pre_logits)


class PointMambaScan(PointMamba):
    """The released PointMamba architecture (LMD0311/PointMamba ``PointMambaScan``), loading its released weights.

    :class:`PointMamba` with upstream's choices (:data:`RELEASED_ARCHITECTURE`: one-direction Mamba mixers,
    LayerNorm, pointnet2_ops' sampling, 0.02-sized serialisation cells; any of them can still be overridden)
    and upstream's head: the whole MLP ``cls_head_finetune`` (Linear-BN-ReLU-Dropout x 2, Linear) is the
    classifier, named ``head``, and ``pre_logits`` is the pooled feature (B, D), or (B, 2 D) for
    ``global_pool="catavgmax"`` (upstream's ``avg_head`` + ``max_head``). ``num_classes=0`` removes the head,
    as the pre-training checkpoint has none; :meth:`reset_classifier` builds a new one.

    Upstream adds dropout (``drop_out``, 0 in every released config) after each block; it is not reproduced.
    """

    pool_types = ("avg", "max", "catavgmax", "")
    export_refusal = (
        "its serialisation takes the space-filling curve's depth from each cloud's extent, as upstream PointMamba does: "
        "a size that depends on the data, which torch.export (and so ONNX and AOTInductor) cannot trace. Run it in "
        "PyTorch, or export a pointmamba_small model"
    )

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**{**RELEASED_ARCHITECTURE, **kwargs})
        self.head_hidden_size = self.pooled_width

    def _new_head(self, num_classes: int, device=None, dtype=None) -> nn.Module:
        if num_classes <= 0:
            return nn.Identity()
        layers = mlp_head_layers(self.pooled_width, self.mlp_width, self.drop_rate, device=device, dtype=dtype)
        return nn.Sequential(*layers, nn.Linear(self.mlp_width, num_classes, device=device, dtype=dtype))

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def _reset_head(self, num_classes: int) -> None:
        """A new, initialised MLP head for ``num_classes`` outputs (0: none), on the model's device and dtype."""
        like = self.order_scale
        self.head_hidden_size = self.pooled_width  # global_pool may have changed
        self.head = self._new_head(num_classes, device=like.device, dtype=like.dtype)
        with torch.no_grad():
            for module in self.head.modules():
                if isinstance(module, nn.Linear):
                    init_linear_(module)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, L, D) tokens -> logits (B, num_classes), or the pooled (B, head_hidden_size) with ``pre_logits``."""
        x = self.pool(x)
        return x if pre_logits else self.head(x)


RELEASED_ARCHITECTURE = dict(
    directions=1, norm_layer="layernorm", sampling="pointnet2", serial_cell_size=0.02, orders=("hilbert", "hilbert-trans")
)
"""The choices of upstream's PointMambaScan where ours differ (its config files: rms_norm False, Mamba blocks)."""

OFFICIAL_RENAMES = (("blocks.layers.", "layers."), ("blocks.norm_f.", "norm_f."), ("cls_head_finetune.", "head."))
"""Upstream's container names -> ours: the shared trunk's blocks and final norm, the head."""


def _official_to_ours(state_dict: dict[str, torch.Tensor], num_orders: int) -> dict[str, torch.Tensor]:
    """Rename an upstream PointMamba state dict; the order scales become rows of ``order_scale`` / ``order_shift``."""
    if any(key.startswith("MAE_encoder.") for key in state_dict):  # the pre-training file: keep the encoder only
        state_dict = {key.removeprefix("MAE_encoder."): v for key, v in state_dict.items() if key.startswith("MAE_encoder.")}
    out, scales = {}, {}
    for key, value in state_dict.items():
        if key.startswith("OrderScale_"):  # OrderScale_gamma_1, OrderScale_beta_1, ... for orders 1, 2, ...
            scales[key] = value
            continue
        for old, new in OFFICIAL_RENAMES:
            if key.startswith(old):
                key = new + key.removeprefix(old)
                break
        out[key] = value
    if scales:
        for ours, kind in (("order_scale", "gamma"), ("order_shift", "beta")):
            names = [f"OrderScale_{kind}_{i}" for i in range(1, num_orders + 1)]
            missing = [name for name in names if name not in scales]
            if missing:
                raise ValueError(f"checkpoint key {missing[0]!r} is missing (the model has {num_orders} serialisation orders)")
            out[ours] = torch.stack([scales.pop(name) for name in names])
        if scales:
            raise ValueError(f"checkpoint keys {sorted(scales)} do not fit the model's {num_orders} serialisation orders")
    return out


def checkpoint_filter_fn(state_dict: Mapping, model: PointMamba) -> dict[str, torch.Tensor]:
    """Map a PointMamba state dict onto ``model``: ours as it is, upstream's (LMD0311/PointMamba) renamed.

    Upstream's files keep the weights under ``base_model``; the pre-training file (``pretrain.pth``) holds the
    whole masked autoencoder, whose ``MAE_encoder.*`` is kept (prefix stripped) and whose decoder
    (``mask_token``, ``decoder_pos_embed``, ``MAE_decoder``, ``increase_dim``) is dropped. See the module
    docstring for the renames.

    Raises:
        ValueError: naming the key, when a tensor does not fit the model (shape, or an order scale the model
            lacks). The classifier is left to the loader, which drops it when it does not fit.
    """
    state_dict = unwrap_state_dict(state_dict)
    if any(key.startswith(("MAE_encoder.", "blocks.", "cls_head_finetune.", "OrderScale_")) for key in state_dict):
        state_dict = _official_to_ours(state_dict, len(model.orders))
    expected = model.state_dict()
    classifier = classifier_keys(model, state_dict)
    return {key: checked(key, value, expected, classifier) for key, value in state_dict.items()}


ModelT = TypeVar("ModelT", bound=PointMamba)


def _create_point_mamba(model_cls: type[ModelT], variant: str, pretrained: bool, **kwargs) -> ModelT:
    return build_backbone(
        model_cls,
        variant,
        pretrained,
        feature_cfg=dict(output_fmt="NLC"),
        kwargs_filter=("in_chans",),  # timm derives it from input_size; a cloud always has 3 coordinates
        **kwargs,
    )


def trained_on_unit_sphere(model: nn.Module) -> bool:
    """Whether ``model``'s weights saw clouds centred and scaled into the unit sphere: all but upstream's ScanObjectNN
    fine-tunes (``*.scanobjectnn_*`` tags), which were trained on the scans as they are."""
    return not str(getattr(model, "pretrained_cfg", {}).get("tag") or "").startswith("scanobjectnn")


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
        "custom_load": CUSTOM_LOAD,
        **kwargs,
    }


RELEASE_URL = "https://github.com/LMD0311/PointMamba/releases/download/ckpts-2/"


def _released(file: str, num_points: int, num_classes: int) -> dict[str, Any]:
    """A cfg for one of upstream's released files; torch hub caches it as ``pointmamba_<file>`` (its names are generic)."""
    return _cfg(num_points, num_classes, url=(RELEASE_URL + file, f"pointmamba_{file}"), classifier="head")


default_cfgs = generate_default_cfgs(
    {
        "pointmamba_small.untrained": _cfg(),
        "pointmamba_small_g128.untrained": _cfg(num_points=2048, num_classes=15),
        "test_pointmamba.untrained": _cfg(num_points=128, num_classes=10),
        # upstream's releases (the "ckpts-2" assets of LMD0311/PointMamba)
        "pointmamba_scan_small.modelnet40": _released("finetune_modelnet.pth", 1024, 40),
        "pointmamba_scan_small.shapenet_pretrain": _released("pretrain.pth", 1024, 0),
        "pointmamba_scan_small_g128.scanobjectnn_objbg": _released("finetune_scan_objbg.pth", 2048, 15),
        "pointmamba_scan_small_g128.scanobjectnn_objonly": _released("finetune_scan_only.pth", 2048, 15),
        "pointmamba_scan_small_g128.scanobjectnn_hardest": _released("finetune_scan_hardest.pth", 2048, 15),
        "pointmamba_scan_small_g128.shapenet_pretrain": _released("pretrain.pth", 2048, 0),
        "test_pointmamba_scan.untrained": _cfg(num_points=128, num_classes=10, classifier="head"),
    }
)


@register_model
def pointmamba_small(pretrained: bool = False, **kwargs) -> PointMamba:
    """PointMamba (12 blocks, width 384), 64 groups of 32 points: ModelNet40 with 1024 points."""
    model_args = dict(num_groups=64, group_size=32, embed_dim=384, depth=12)
    return _create_point_mamba(PointMamba, "pointmamba_small", pretrained, **dict(model_args, **kwargs))


@register_model
def pointmamba_small_g128(pretrained: bool = False, **kwargs) -> PointMamba:
    """PointMamba (12 blocks, width 384), 128 groups of 32 points: ScanObjectNN with 2048 points."""
    model_args = dict(num_groups=128, group_size=32, embed_dim=384, depth=12)
    return _create_point_mamba(PointMamba, "pointmamba_small_g128", pretrained, **dict(model_args, **kwargs))


@register_model
def test_pointmamba(pretrained: bool = False, **kwargs) -> PointMamba:
    """A tiny PointMamba for tests: 16 groups of 8 points, 2 blocks of width 32, head width 32."""
    model_args = dict(num_groups=16, group_size=8, embed_dim=32, depth=2, d_state=8, head_hidden_size=32)
    return _create_point_mamba(PointMamba, "test_pointmamba", pretrained, **dict(model_args, **kwargs))


@register_model
def pointmamba_scan_small(pretrained: bool = False, **kwargs) -> PointMambaScan:
    """Upstream's PointMamba (12 blocks, width 384), 64 groups of 32 points: ModelNet40 (1024 points), ShapeNet pre-training."""
    model_args = dict(num_groups=64, group_size=32, embed_dim=384, depth=12)
    return _create_point_mamba(PointMambaScan, "pointmamba_scan_small", pretrained, **dict(model_args, **kwargs))


@register_model
def pointmamba_scan_small_g128(pretrained: bool = False, **kwargs) -> PointMambaScan:
    """Upstream's PointMamba (12 blocks, width 384), 128 groups of 32 points: ScanObjectNN (2048 points)."""
    model_args = dict(num_groups=128, group_size=32, embed_dim=384, depth=12)
    return _create_point_mamba(PointMambaScan, "pointmamba_scan_small_g128", pretrained, **dict(model_args, **kwargs))


@register_model
def test_pointmamba_scan(pretrained: bool = False, **kwargs) -> PointMambaScan:
    """A tiny upstream-architecture PointMamba for tests: 16 groups of 8 points, 2 blocks of width 32, head width 32."""
    model_args = dict(num_groups=16, group_size=8, embed_dim=32, depth=2, d_state=8, head_hidden_size=32)
    return _create_point_mamba(PointMambaScan, "test_pointmamba_scan", pretrained, **dict(model_args, **kwargs))
