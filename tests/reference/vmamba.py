"""Upstream VMamba's SS2D mixer and whole classifier (``VSSM``), re-written for the tests from its released code:
parameter shapes and the forward.

Nothing here uses ``vim.models`` or ``vim.kernels``: the tests compare :class:`vim.models.ss2d.SS2D` against these
functions. Upstream is MzeroMiko/VMamba ``classification/models/vmamba.py`` (``SS2D`` built by ``__initv2__`` with
``forward_type="v05_noz"``, ``channel_first=True`` for the ``ln2d`` models; its forward is ``forwardv2`` and
``forward_corev2``), ``csm_triton.py`` (``cross_scan_fwd`` / ``cross_merge_fwd``, ``scans=0``) and ``csms6s.py``
(``selective_scan_torch``, the sequential scan over ``K * D`` channels with one B, C group per direction).

* :func:`official_ss2d_shapes`: the keys and shapes of one SS2D's state dict.
* :func:`official_ss2d_state_dict`: random values of sensible size for those keys.
* :func:`official_ss2d_forward`: the forward pass in float64, channels-first as upstream's ln2d models run it,
  with explicit cross-scan copies, the sequential scan, an explicit cross-merge, LayerNorm2d and the projections.
* :func:`official_vssm_shapes`, :func:`official_vssm_state_dict`, :func:`official_vssm_forward`: the same for the
  whole ``VSSM`` of the released v2 classifiers (``vmamba_tiny_s1l8`` and co.: ``patchembed_version="v2"``,
  ``downsample_version="v3"``, ``norm_layer="ln2d"``, ``mlp_ratio`` 4 with GELU, ``classifier`` = norm, average
  pool, head), its keys as upstream's ``nn.Sequential`` indices name them.
* :func:`official_backbone_shapes`, :func:`official_backbone_forward`: the dense backbone of the detection and
  segmentation models (``MM_VSSM`` = ``Backbone_VSSM``: no classifier, a LayerNorm2d ``outnorm{i}`` per stage map).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

K = 4  # cross2d: rows, columns, rows reversed, columns reversed


def official_ss2d_shapes(d_model: int, d_state: int = 1, ssm_ratio: float = 1.0, d_conv: int = 3) -> dict[str, tuple]:
    """SS2D(d_model, d_state, ssm_ratio, dt_rank="auto", d_conv, conv_bias=False, forward_type="v05_noz",
    channel_first=True): ``in_proj`` / ``out_proj`` are ``Linear2d`` (an ``nn.Linear``: 2-D weights, bias=False),
    ``out_norm`` a ``LayerNorm2d`` (an ``nn.LayerNorm``), ``initialize="v0"`` stacks K copies of dt / A / D."""
    inner, rank = int(ssm_ratio * d_model), math.ceil(d_model / 16)
    return {
        "x_proj_weight": (K, rank + 2 * d_state, inner),
        "A_logs": (K * inner, d_state),
        "Ds": (K * inner,),
        "dt_projs_weight": (K, inner, rank),
        "dt_projs_bias": (K, inner),
        "out_norm.weight": (inner,),
        "out_norm.bias": (inner,),
        "in_proj.weight": (inner, d_model),
        "conv2d.weight": (inner, 1, d_conv, d_conv),
        "out_proj.weight": (d_model, inner),
    }


def official_ss2d_state_dict(shapes: dict[str, tuple], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random float32 values: A_logs near log(1..N), Ds and the norm's weight near 1, step sizes of a trained model's
    size (softplus(dt_projs_bias) around 0.01-0.1), weights of fan-in scale."""
    out = {}
    for key, shape in shapes.items():
        noise = torch.randn(shape, generator=generator)
        if key == "A_logs":
            out[key] = torch.log(torch.arange(1, shape[1] + 1.0)).expand(shape) + 0.3 * noise
        elif key in ("Ds", "out_norm.weight"):
            out[key] = 1 + 0.2 * noise
        elif key == "dt_projs_bias":
            out[key] = -3.5 + 0.5 * noise
        elif key == "out_norm.bias":
            out[key] = 0.1 * noise
        else:
            out[key] = noise / math.sqrt(math.prod(shape[1:]))
    return out


def _cross_scan(x: torch.Tensor) -> torch.Tensor:
    """csm_triton.cross_scan_fwd (channels-first, scans=0): (B, D, H, W) -> (B, K, D, L) copies in each scan order."""
    rows, columns = x.flatten(2, 3), x.transpose(2, 3).flatten(2, 3)
    return torch.stack([rows, columns, rows.flip(-1), columns.flip(-1)], dim=1)


def _cross_merge(ys: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """csm_triton.cross_merge_fwd (channels-first, scans=0): (B, K, D, L) in scan order -> (B, D, L) in grid order."""
    batch, _, dim, length = ys.shape
    ys = ys[:, 0:2] + ys[:, 2:4].flip(-1)
    return ys[:, 0] + ys[:, 1].view(batch, dim, width, height).transpose(2, 3).reshape(batch, dim, length)


def _selective_scan(u, delta, A, B, C, D, delta_bias) -> torch.Tensor:
    """csms6s.selective_scan_torch (softplus on): u, delta (B, K * D, L), A (K * D, N), B, C (B, K, N, L), D and
    delta_bias (K * D,) -> (B, K * D, L); direction k's B and C serve its D channels. One step at a time."""
    batch, groups, n_state, length = B.shape
    channels = u.shape[1]
    delta = F.softplus(delta + delta_bias[:, None])
    B = B.repeat_interleave(channels // groups, dim=1)  # (B, K * D, N, L)
    C = C.repeat_interleave(channels // groups, dim=1)
    state = u.new_zeros(batch, channels, n_state)
    ys = []
    for t in range(length):
        state = torch.exp(delta[:, :, t, None] * A) * state + (delta[:, :, t] * u[:, :, t])[..., None] * B[..., t]
        ys.append((state * C[..., t]).sum(-1))
    return torch.stack(ys, dim=-1) + u * D[:, None]


def official_ss2d_forward(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """SS2D.forwardv2 with forward_corev2 (v05_noz: no gate, no einsum, ln2d) in float64: (B, C, H, W) -> (B, C, H, W)."""
    sd = {k: v.double() for k, v in sd.items()}
    x = x.double()
    batch, _, height, width = x.shape
    length = height * width
    inner, n_state = sd["A_logs"].shape[0] // K, sd["A_logs"].shape[1]
    rank = sd["dt_projs_weight"].shape[-1]

    x = F.conv2d(x, sd["in_proj.weight"][:, :, None, None])  # Linear2d
    weight = sd["conv2d.weight"]
    x = F.silu(F.conv2d(x, weight, padding=(weight.shape[-1] - 1) // 2, groups=inner))

    xs = _cross_scan(x)  # (B, K, D, L)
    x_dbl = F.conv1d(xs.reshape(batch, K * inner, length), sd["x_proj_weight"].reshape(-1, inner, 1), groups=K)
    dts, Bs, Cs = x_dbl.view(batch, K, -1, length).split([rank, n_state, n_state], dim=2)
    dts = F.conv1d(dts.reshape(batch, K * rank, length), sd["dt_projs_weight"].reshape(K * inner, rank, 1), groups=K)
    ys = _selective_scan(
        xs.reshape(batch, K * inner, length), dts, -torch.exp(sd["A_logs"]), Bs, Cs, sd["Ds"], sd["dt_projs_bias"].flatten()
    )
    y = _cross_merge(ys.view(batch, K, inner, length), height, width).view(batch, inner, height, width)

    y = _layer_norm_2d(y, sd["out_norm.weight"], sd["out_norm.bias"])
    return F.conv2d(y, sd["out_proj.weight"][:, :, None, None])  # Linear2d


def _layer_norm_2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """LayerNorm2d (eps 1e-5): over the channels of each position, (B, C, H, W) -> (B, C, H, W)."""
    mean = x.mean(1, keepdim=True)
    var = ((x - mean) ** 2).mean(1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * weight[:, None, None] + bias[:, None, None]


def _conv3x3_s2(x: torch.Tensor, sd: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    """nn.Conv2d(kernel_size=3, stride=2, padding=1) with bias: the patch embed's and downsample v3's convs."""
    return F.conv2d(x, sd[f"{prefix}.weight"], sd[f"{prefix}.bias"], stride=2, padding=1)


def _norm_shapes(prefix: str, dim: int) -> dict[str, tuple]:
    return {f"{prefix}.weight": (dim,), f"{prefix}.bias": (dim,)}


def official_vssm_shapes(
    dims: list[int], depths: list[int], ssm_ratio: float, in_chans: int = 3, num_classes: int = 1000, mlp_ratio: float = 4.0
) -> dict[str, tuple]:
    """The keys and shapes of ``VSSM(dims, depths, ssm_d_state=1, ssm_ratio, ssm_conv=3, ssm_conv_bias=False,
    forward_type="v05_noz", patchembed_version="v2", downsample_version="v3", norm_layer="ln2d")``'s state dict."""
    half = dims[0] // 2
    shapes = {
        "patch_embed.0.weight": (half, in_chans, 3, 3), "patch_embed.0.bias": (half,), **_norm_shapes("patch_embed.2", half),
        "patch_embed.5.weight": (dims[0], half, 3, 3), "patch_embed.5.bias": (dims[0],),
        **_norm_shapes("patch_embed.7", dims[0]),
    }  # fmt: skip
    for i, (dim, depth) in enumerate(zip(dims, depths)):
        hidden = int(dim * mlp_ratio)
        for j in range(depth):
            block = f"layers.{i}.blocks.{j}"
            shapes.update(_norm_shapes(f"{block}.norm", dim))
            shapes.update({f"{block}.op.{key}": shape for key, shape in official_ss2d_shapes(dim, 1, ssm_ratio).items()})
            shapes.update(_norm_shapes(f"{block}.norm2", dim))
            shapes.update({
                f"{block}.mlp.fc1.weight": (hidden, dim), f"{block}.mlp.fc1.bias": (hidden,),
                f"{block}.mlp.fc2.weight": (dim, hidden), f"{block}.mlp.fc2.bias": (dim,),
            })  # fmt: skip
        if i < len(dims) - 1:  # the last layer's downsample is an nn.Identity
            shapes[f"layers.{i}.downsample.1.weight"] = (dims[i + 1], dim, 3, 3)
            shapes[f"layers.{i}.downsample.1.bias"] = (dims[i + 1],)
            shapes.update(_norm_shapes(f"layers.{i}.downsample.3", dims[i + 1]))
    shapes.update(_norm_shapes("classifier.norm", dims[-1]))
    shapes.update({"classifier.head.weight": (num_classes, dims[-1]), "classifier.head.bias": (num_classes,)})
    return shapes


def official_vssm_state_dict(shapes: dict[str, tuple], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random float32 values for :func:`official_vssm_shapes`: each SS2D's as :func:`official_ss2d_state_dict`, norms
    near (1, 0), biases small, weights of fan-in scale."""
    ss2d = official_ss2d_state_dict({key: shape for key, shape in shapes.items() if ".op." in key}, generator)
    out = {}
    for key, shape in shapes.items():
        noise = torch.randn(shape, generator=generator)
        if ".op." in key:
            out[key] = ss2d[key]
        elif key.endswith(".bias"):
            out[key] = 0.1 * noise
        elif len(shape) == 1:  # a norm's weight
            out[key] = 1 + 0.2 * noise
        else:
            out[key] = noise / math.sqrt(math.prod(shape[1:]))
    return out


def _stage_outputs(sd: dict[str, torch.Tensor], x: torch.Tensor, depths: list[int]) -> list[torch.Tensor]:
    """The stem and each layer's blocks in float64 (sd in float64), channels-first: (B, C, H, W) images -> each
    layer's blocks' output (B, C_i, H_i, W_i), before its downsample (what ``Backbone_VSSM.forward`` normalises)."""
    x = _conv3x3_s2(x.double(), sd, "patch_embed.0")
    x = F.gelu(_layer_norm_2d(x, sd["patch_embed.2.weight"], sd["patch_embed.2.bias"]))
    x = _conv3x3_s2(x, sd, "patch_embed.5")
    x = _layer_norm_2d(x, sd["patch_embed.7.weight"], sd["patch_embed.7.bias"])
    outputs = []
    for i, depth in enumerate(depths):
        for j in range(depth):
            block = f"layers.{i}.blocks.{j}"
            op = {key.removeprefix(f"{block}.op."): v for key, v in sd.items() if key.startswith(f"{block}.op.")}
            x = x + official_ss2d_forward(op, _layer_norm_2d(x, sd[f"{block}.norm.weight"], sd[f"{block}.norm.bias"]))
            h = _layer_norm_2d(x, sd[f"{block}.norm2.weight"], sd[f"{block}.norm2.bias"])
            h = F.gelu(F.conv2d(h, sd[f"{block}.mlp.fc1.weight"][:, :, None, None], sd[f"{block}.mlp.fc1.bias"]))
            x = x + F.conv2d(h, sd[f"{block}.mlp.fc2.weight"][:, :, None, None], sd[f"{block}.mlp.fc2.bias"])
        outputs.append(x)
        if i < len(depths) - 1:
            x = _conv3x3_s2(x, sd, f"layers.{i}.downsample.1")
            x = _layer_norm_2d(x, sd[f"layers.{i}.downsample.3.weight"], sd[f"layers.{i}.downsample.3.bias"])
    return outputs


def official_vssm_forward(sd: dict[str, torch.Tensor], x: torch.Tensor, depths: list[int]) -> torch.Tensor:
    """VSSM.forward of the ln2d v2 classifiers in float64, channels-first: (B, C, H, W) images -> (B, num_classes)."""
    sd = {k: v.double() for k, v in sd.items()}
    x = _stage_outputs(sd, x, depths)[-1]
    x = _layer_norm_2d(x, sd["classifier.norm.weight"], sd["classifier.norm.bias"]).mean(dim=(2, 3))
    return F.linear(x, sd["classifier.head.weight"], sd["classifier.head.bias"])


def official_backbone_shapes(dims: list[int], depths: list[int], ssm_ratio: float) -> dict[str, tuple]:
    """The keys and shapes of ``MM_VSSM(out_indices=(0, 1, 2, 3), ...)``'s state dict (detection/model.py, the
    ``Backbone_VSSM`` of classification/models/vmamba.py), the same settings as :func:`official_vssm_shapes`: the
    ``VSSM`` without its ``classifier`` (deleted), plus a LayerNorm2d ``outnorm{i}`` of width ``dims[i]`` per stage."""
    shapes = {k: v for k, v in official_vssm_shapes(dims, depths, ssm_ratio).items() if not k.startswith("classifier.")}
    for i, dim in enumerate(dims):
        shapes.update(_norm_shapes(f"outnorm{i}", dim))
    return shapes


def official_backbone_forward(sd: dict[str, torch.Tensor], x: torch.Tensor, depths: list[int]) -> list[torch.Tensor]:
    """``Backbone_VSSM.forward`` (ln2d: channels-first, no permute) in float64: (B, C, H, W) images -> for each stage i
    ``outnorm{i}`` of its blocks' output, (B, C_i, H_i, W_i)."""
    sd = {k: v.double() for k, v in sd.items()}
    outputs = _stage_outputs(sd, x, depths)
    return [_layer_norm_2d(y, sd[f"outnorm{i}.weight"], sd[f"outnorm{i}.bias"]) for i, y in enumerate(outputs)]
