"""Upstream MambaVision, re-written for the tests from its released code: state dicts and forwards of its token
mixers and of the whole classifier.

Read from NVlabs/MambaVision ``mambavision/models/mamba_vision.py`` (``MambaVisionMixer``, ``Attention``, ``Block``,
``ConvBlock``, ``PatchEmbed``, ``Downsample``, ``MambaVisionLayer`` with ``window_partition`` / ``window_reverse``,
``MambaVision``); nothing here uses ``vim.models``, and the scan is the sequential reference,
``vim.kernels.selective_scan_ref``.

* :func:`official_mixer_shapes`: a ``MambaVisionMixer``'s keys and shapes as a MambaVision block builds it.
* :func:`official_state_dict`: random values of sensible size for such keys (and for a whole model's).
* :func:`official_mixer_forward`: ``MambaVisionMixer.forward`` in float64 on such a state dict.
* :func:`official_attention_forward`: ``Attention.forward`` written out as softmax(Q K^T / sqrt(d)) V, float64.
* :func:`official_model_shapes`, :func:`official_model_forward`: the whole ``MambaVision`` (eval mode), its state
  dict's keys as upstream names them, and its forward in float64, channels-first as upstream runs it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from vim.kernels import selective_scan_ref


def official_mixer_shapes(d_model: int, d_state: int = 8, d_conv: int = 3, expand: int = 1) -> dict[str, tuple]:
    """Upstream's Block builds the mixer with d_state 8, d_conv 3, expand 1; dt_rank is ceil(d_model / 16).

    Its convs get ``bias=conv_bias // 2`` with ``conv_bias=True``, i.e. no bias; in_proj and out_proj ``bias=False``.
    """
    inner, rank = expand * d_model, math.ceil(d_model / 16)
    half = inner // 2
    return {
        "in_proj.weight": (inner, d_model),
        "x_proj.weight": (rank + 2 * d_state, half),
        "dt_proj.weight": (half, rank),
        "dt_proj.bias": (half,),
        "A_log": (half, d_state),
        "D": (half,),
        "out_proj.weight": (d_model, inner),
        "conv1d_x.weight": (half, 1, d_conv),
        "conv1d_z.weight": (half, 1, d_conv),
    }


def official_state_dict(shapes: dict[str, tuple], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """Random float32 values: A_log near Mamba's log(1..N), D near 1, step-size biases around softplus^-1(0.05),
    norm weights and layer scales near 1, BatchNorm statistics of a trained model, other biases small, other weights
    scaled by their fan-in (taps kept large enough that the convs matter)."""
    out = {}
    for key, shape in shapes.items():
        name = key.rsplit(".", 1)[-1] if key.endswith(("weight", "bias", "running_mean", "running_var")) else key
        noise = torch.randn(shape, generator=generator)
        if key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(1000)
        elif key.endswith("A_log"):
            out[key] = torch.log(torch.arange(1, shape[1] + 1.0)).expand(shape) + 0.1 * noise
        elif key.endswith("D"):
            out[key] = 1 + 0.2 * noise
        elif key.endswith("dt_proj.bias"):
            out[key] = math.log(math.expm1(0.05)) + 0.5 * noise
        elif key.endswith("running_var"):
            out[key] = 0.5 + torch.rand(shape, generator=generator)
        elif key.endswith(("gamma", "gamma_1", "gamma_2")) or (name == "weight" and len(shape) == 1):
            out[key] = 1 + 0.2 * noise
        elif name in ("bias", "running_mean"):
            out[key] = 0.1 * noise
        else:
            out[key] = noise / math.sqrt(math.prod(shape[1:]))
    return out


def official_mixer_forward(sd: dict[str, torch.Tensor], hidden: torch.Tensor) -> torch.Tensor:
    """``MambaVisionMixer.forward`` in float64, (B, L, D) -> (B, L, D).

    Channels first as upstream: in_proj, split into x and z halves, each a centred depthwise conv (padding="same",
    no bias) and SiLU; x through x_proj / dt_proj (its bias included) into the scan, which gets ``dt_proj.bias`` once
    more as ``delta_bias`` (upstream passes both), D, softplus, no z gate; the scan's output concatenated with z,
    then out_proj.
    """
    sd = {k: v.double() for k, v in sd.items()}
    xz = (hidden.double() @ sd["in_proj.weight"].T).transpose(1, 2)  # (B, inner, L)
    x, z = xz.chunk(2, dim=1)
    half = x.shape[1]
    x = F.silu(F.conv1d(x, sd["conv1d_x.weight"], padding="same", groups=half))
    z = F.silu(F.conv1d(z, sd["conv1d_z.weight"], padding="same", groups=half))
    rank, d_state = sd["dt_proj.weight"].shape[1], sd["A_log"].shape[1]
    dt, B, C = (x.transpose(1, 2) @ sd["x_proj.weight"].T).split([rank, d_state, d_state], dim=-1)
    delta = (dt @ sd["dt_proj.weight"].T + sd["dt_proj.bias"]).transpose(1, 2)  # nn.Linear's bias, then delta_bias
    y = selective_scan_ref(
        x, delta, -torch.exp(sd["A_log"]), B.transpose(1, 2), C.transpose(1, 2), sd["D"],
        z=None, delta_bias=sd["dt_proj.bias"], delta_softplus=True,
    )  # fmt: skip
    return torch.cat([y, z], dim=1).transpose(1, 2) @ sd["out_proj.weight"].T


def official_attention_forward(sd: dict[str, torch.Tensor], x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """``Attention.forward`` (qkv with bias, no q/k norm, eval) in float64, (B, N, C) -> (B, N, C).

    The qkv output's channels are laid out (3, heads, head_dim); each head attends with softmax(q k^T / sqrt(d)) v.
    """
    sd = {k: v.double() for k, v in sd.items()}
    batch, tokens, width = x.shape
    qkv = x.double() @ sd["qkv.weight"].T + sd["qkv.bias"]
    q, k, v = qkv.reshape(batch, tokens, 3, num_heads, width // num_heads).permute(2, 0, 3, 1, 4)  # (B, H, N, d) each
    scores = q @ k.transpose(-1, -2) / math.sqrt(width // num_heads)
    weights = torch.exp(scores - scores.amax(-1, keepdim=True))
    heads = (weights / weights.sum(-1, keepdim=True)) @ v
    return heads.transpose(1, 2).reshape(batch, tokens, width) @ sd["proj.weight"].T + sd["proj.bias"]


# ----------------------------------------------------------------------------------------------- the whole model
def _batch_norm_shapes(prefix: str, channels: int) -> dict[str, tuple]:
    names = ("weight", "bias", "running_mean", "running_var")
    return {**{f"{prefix}.{name}": (channels,) for name in names}, f"{prefix}.num_batches_tracked": ()}


def official_transformer_blocks(depth: int) -> list[int]:
    """``MambaVision.__init__``'s ``transformer_blocks`` of a level of ``depth`` blocks, as upstream writes it."""
    return list(range(depth // 2 + 1, depth)) if depth % 2 != 0 else list(range(depth // 2, depth))


def official_model_shapes(
    dim: int, in_dim: int, depths: list[int], num_heads: list[int], layer_scale: bool = False, num_classes: int = 1000
) -> dict[str, tuple]:
    """The state dict's keys and shapes of ``MambaVision(dim, in_dim, depths, num_heads, mlp_ratio=4, ...)``: BatchNorm
    buffers included, ``gamma_1`` / ``gamma_2`` with ``layer_scale`` (B, L, L2, L3), no ConvBlock ``gamma``."""
    shapes = {
        "patch_embed.conv_down.0.weight": (in_dim, 3, 3, 3),
        **_batch_norm_shapes("patch_embed.conv_down.1", in_dim),
        "patch_embed.conv_down.3.weight": (dim, in_dim, 3, 3),
        **_batch_norm_shapes("patch_embed.conv_down.4", dim),
    }
    for i, depth in enumerate(depths):
        width = dim * 2**i
        for j in range(depth):
            block = f"levels.{i}.blocks.{j}"
            if i < 2:  # ConvBlock
                for conv, norm in (("conv1", "norm1"), ("conv2", "norm2")):
                    shapes |= {f"{block}.{conv}.weight": (width, width, 3, 3), f"{block}.{conv}.bias": (width,)}
                    shapes |= _batch_norm_shapes(f"{block}.{norm}", width)
                continue
            shapes |= {f"{block}.norm1.weight": (width,), f"{block}.norm1.bias": (width,)}
            if j in official_transformer_blocks(depth):
                mixer = {"qkv.weight": (3 * width, width), "qkv.bias": (3 * width,), "proj.weight": (width, width),
                         "proj.bias": (width,)}  # fmt: skip
            else:
                mixer = official_mixer_shapes(width)
            shapes |= {f"{block}.mixer.{key}": shape for key, shape in mixer.items()}
            shapes |= {f"{block}.norm2.weight": (width,), f"{block}.norm2.bias": (width,)}
            shapes |= {f"{block}.mlp.fc1.weight": (4 * width, width), f"{block}.mlp.fc1.bias": (4 * width,)}
            shapes |= {f"{block}.mlp.fc2.weight": (width, 4 * width), f"{block}.mlp.fc2.bias": (width,)}
            if layer_scale:
                shapes |= {f"{block}.gamma_1": (width,), f"{block}.gamma_2": (width,)}
        if i < 3:
            shapes[f"levels.{i}.downsample.reduction.0.weight"] = (2 * width, width, 3, 3)
    features = dim * 2 ** (len(depths) - 1)
    return {**shapes, **_batch_norm_shapes("norm", features), "head.weight": (num_classes, features), "head.bias": (num_classes,)}


def official_parameter_count(shapes: dict[str, tuple]) -> int:
    """The number of parameters among ``shapes`` (BatchNorm's running statistics and counters are buffers)."""
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    return sum(math.prod(shape) for key, shape in shapes.items() if not key.endswith(buffers))


def _sub(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {key.removeprefix(prefix): value for key, value in sd.items() if key.startswith(prefix)}


def _batch_norm(x: torch.Tensor, sd: dict[str, torch.Tensor], prefix: str, eps: float) -> torch.Tensor:
    """``nn.BatchNorm2d`` in eval mode on (B, C, H, W)."""
    mean, var = sd[f"{prefix}.running_mean"], sd[f"{prefix}.running_var"]
    scale = sd[f"{prefix}.weight"] / torch.sqrt(var + eps)
    return (x - mean[:, None, None]) * scale[:, None, None] + sd[f"{prefix}.bias"][:, None, None]


def _layer_norm(x: torch.Tensor, sd: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[f"{prefix}.weight"], sd[f"{prefix}.bias"], eps=1e-5)


def _window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """Upstream's ``window_partition``: (B, C, H, W) -> (B * H/w * W/w, w * w, C)."""
    batch, channels, height, width = x.shape
    x = x.view(batch, channels, height // window_size, window_size, width // window_size, window_size)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(-1, window_size * window_size, channels)


def _window_reverse(windows: torch.Tensor, window_size: int, height: int, width: int) -> torch.Tensor:
    """Upstream's ``window_reverse``: (B * H/w * W/w, w * w, C) -> (B, C, H, W)."""
    batch = int(windows.shape[0] / (height * width / window_size / window_size))
    x = windows.reshape(batch, height // window_size, width // window_size, window_size, window_size, -1)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(batch, windows.shape[2], height, width)


def _block(sd: dict[str, torch.Tensor], x: torch.Tensor, attention: bool, heads: int) -> torch.Tensor:
    """Upstream's ``Block.forward`` on (N, L, C) windows: x + g1 * mixer(norm1(x)), then x + g2 * mlp(norm2(x))."""
    mixer = _sub(sd, "mixer.")
    normed = _layer_norm(x, sd, "norm1")
    mixed = official_attention_forward(mixer, normed, heads) if attention else official_mixer_forward(mixer, normed)
    x = x + sd.get("gamma_1", 1.0) * mixed
    hidden = F.gelu(_layer_norm(x, sd, "norm2") @ sd["mlp.fc1.weight"].T + sd["mlp.fc1.bias"])
    return x + sd.get("gamma_2", 1.0) * (hidden @ sd["mlp.fc2.weight"].T + sd["mlp.fc2.bias"])


def _conv_block(sd: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Upstream's ``ConvBlock.forward`` on (B, C, H, W)."""
    y = _batch_norm(F.conv2d(x, sd["conv1.weight"], sd["conv1.bias"], padding=1), sd, "norm1", 1e-5)
    y = F.gelu(y, approximate="tanh")
    y = _batch_norm(F.conv2d(y, sd["conv2.weight"], sd["conv2.bias"], padding=1), sd, "norm2", 1e-5)
    return x + (y * sd["gamma"].view(1, -1, 1, 1) if "gamma" in sd else y)


def _level(sd: dict[str, torch.Tensor], x: torch.Tensor, depth: int, heads: int, window: int, conv: bool) -> torch.Tensor:
    """Upstream's ``MambaVisionLayer.forward`` on (B, C, H, W), its downsampling included when ``sd`` has one."""
    if conv:
        for j in range(depth):
            x = _conv_block(_sub(sd, f"blocks.{j}."), x)
    else:
        height, width = x.shape[-2:]
        pad_r, pad_b = (window - width % window) % window, (window - height % window) % window
        x = F.pad(x, (0, pad_r, 0, pad_b))
        padded_height, padded_width = x.shape[-2:]
        x = _window_partition(x, window)
        for j in range(depth):
            x = _block(_sub(sd, f"blocks.{j}."), x, j in official_transformer_blocks(depth), heads)
        x = _window_reverse(x, window, padded_height, padded_width)[:, :, :height, :width]
    if "downsample.reduction.0.weight" in sd:
        x = F.conv2d(x, sd["downsample.reduction.0.weight"], stride=2, padding=1)
    return x


def official_model_forward(
    sd: dict[str, torch.Tensor], images: torch.Tensor, depths: list[int], num_heads: list[int], window_size: list[int]
) -> torch.Tensor:
    """``MambaVision.forward`` in eval mode and float64: (B, 3, H, W) images -> (B, num_classes) logits."""
    sd = {key: value.double() for key, value in sd.items()}
    x = images.double()
    for conv, norm in ((0, 1), (3, 4)):
        x = F.conv2d(x, sd[f"patch_embed.conv_down.{conv}.weight"], stride=2, padding=1)
        x = F.relu(_batch_norm(x, sd, f"patch_embed.conv_down.{norm}", 1e-4))
    for i, depth in enumerate(depths):
        x = _level(_sub(sd, f"levels.{i}."), x, depth, num_heads[i], window_size[i], conv=i < 2)
    pooled = _batch_norm(x, sd, "norm", 1e-5).mean(dim=(2, 3))
    return pooled @ sd["head.weight"].T + sd["head.bias"]
