"""Upstream PointMamba, re-written for the tests from its released code: state dicts and the forward pass.

Nothing here uses ``vim.models``: the tests compare our models against these functions (the scan is the
sequential reference, ``vim.kernels.selective_scan_ref``).

* :func:`pointnet2_kernel_fps`: pointnet2_ops' CUDA ``furthest_point_sampling_kernel``, thread by thread.
* :func:`bit_array_hilbert`: the Hilbert encoding of PointMamba's ``hilbert.py`` (numpy-hilbert-curve's layout).
* :func:`official_state_dict`: a ``PointMambaScan`` / pre-training state dict with upstream's key names and
  shapes (LMD0311/PointMamba ``models/point_mamba_scan.py``), random values.
* :func:`official_forward`: ``PointMambaScan.forward`` in float64 on such a state dict.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from vim.kernels import selective_scan_ref


def pointnet2_kernel_fps(points: np.ndarray, count: int) -> list[int]:
    """pointnet2_ops' CUDA furthest_point_sampling_kernel, thread by thread, in float32 (one cloud)."""
    n = len(points)
    threads = max(min(2 ** int(np.log(n) / np.log(2)), 512), 1)  # opt_n_threads
    x = points.astype(np.float32)
    temp = np.full(n, 1e10, dtype=np.float32)
    chosen = [0]
    for _ in range(count - 1):
        x1, y1, z1 = x[chosen[-1]]
        best, best_index = np.full(threads, -1.0, dtype=np.float32), np.zeros(threads, dtype=np.int64)
        for tid in range(threads):
            for k in range(tid, n, threads):
                x2, y2, z2 = x[k]
                if float(x2 * x2 + y2 * y2 + z2 * z2) <= 1e-3:  # float compared with a double literal
                    continue
                d2 = min((x2 - x1) * (x2 - x1) + (y2 - y1) * (y2 - y1) + (z2 - z1) * (z2 - z1), temp[k])
                temp[k] = d2
                if d2 > best[tid]:
                    best[tid], best_index[tid] = d2, k
        stride = threads // 2
        while stride >= 1:  # the shared-memory tree reduction; the lower slot wins ties
            for tid in range(stride):
                if best[tid + stride] > best[tid]:
                    best[tid], best_index[tid] = best[tid + stride], best_index[tid + stride]
            stride //= 2
        chosen.append(int(best_index[0]))
    return chosen


def bit_array_hilbert(cells: np.ndarray, bits: int) -> np.ndarray:
    """Skilling's transform on (n, 3, bits) bit arrays, most significant bit first, the layout of the
    numpy-hilbert-curve code that PointMamba's hilbert.py adapts: per bit and axis invert or exchange the
    lower bits, interleave the axes bit by bit, then Gray-decode the whole string (a running XOR)."""
    gray = ((cells[:, :, None] >> np.arange(bits - 1, -1, -1)) & 1).astype(bool)  # (n, 3, bits)
    for bit in range(bits):
        for axis in range(3):
            on = gray[:, axis, bit].copy()
            gray[:, 0, bit + 1 :] ^= on[:, None]
            swap = ~on[:, None] & (gray[:, 0, bit + 1 :] ^ gray[:, axis, bit + 1 :])
            gray[:, axis, bit + 1 :] ^= swap
            gray[:, 0, bit + 1 :] ^= swap
    binary = np.logical_xor.accumulate(gray.transpose(0, 2, 1).reshape(len(cells), -1), axis=1)
    return (binary * (1 << np.arange(3 * bits - 1, -1, -1))).sum(1)


# ------------------------------------------------------------------------------------------ state dicts
def _batch_norm(prefix: str, width: int) -> dict[str, tuple]:
    return {f"{prefix}.{name}": (width,) for name in ("weight", "bias", "running_mean", "running_var")} | {
        f"{prefix}.num_batches_tracked": ()
    }


def _mamba_block(prefix: str, d: int, d_state: int) -> dict[str, tuple]:
    """mamba_ssm Mamba(d) (expand 2, d_conv 4, dt_rank ceil(d / 16)) in Block(norm=LayerNorm)."""
    inner, rank = 2 * d, math.ceil(d / 16)
    return {
        f"{prefix}.mixer.A_log": (inner, d_state),
        f"{prefix}.mixer.D": (inner,),
        f"{prefix}.mixer.in_proj.weight": (2 * inner, d),
        f"{prefix}.mixer.conv1d.weight": (inner, 1, 4),
        f"{prefix}.mixer.conv1d.bias": (inner,),
        f"{prefix}.mixer.x_proj.weight": (rank + 2 * d_state, inner),
        f"{prefix}.mixer.dt_proj.weight": (inner, rank),
        f"{prefix}.mixer.dt_proj.bias": (inner,),
        f"{prefix}.mixer.out_proj.weight": (d, inner),
        f"{prefix}.norm.weight": (d,),
        f"{prefix}.norm.bias": (d,),
    }


def _encoder_and_blocks(d: int, depth: int, d_state: int, prefix: str = "") -> dict[str, tuple]:
    """Encoder (mini-PointNet), pos_embed, MixerModel ``blocks`` and the two order scales."""
    shapes = {
        "encoder.first_conv.0.weight": (128, 3, 1),
        "encoder.first_conv.0.bias": (128,),
        **_batch_norm("encoder.first_conv.1", 128),
        "encoder.first_conv.3.weight": (256, 128, 1),
        "encoder.first_conv.3.bias": (256,),
        "encoder.second_conv.0.weight": (512, 512, 1),
        "encoder.second_conv.0.bias": (512,),
        **_batch_norm("encoder.second_conv.1", 512),
        "encoder.second_conv.3.weight": (d, 512, 1),
        "encoder.second_conv.3.bias": (d,),
        "pos_embed.0.weight": (128, 3),
        "pos_embed.0.bias": (128,),
        "pos_embed.2.weight": (d, 128),
        "pos_embed.2.bias": (d,),
        "blocks.norm_f.weight": (d,),
        "blocks.norm_f.bias": (d,),
        **{k: v for i in range(depth) for k, v in _mamba_block(f"blocks.layers.{i}", d, d_state).items()},
        **{f"OrderScale_{kind}_{i}": (d,) for kind in ("gamma", "beta") for i in (1, 2)},
    }
    return {prefix + key: shape for key, shape in shapes.items()}


def official_shapes(
    num_classes: int | None, d: int = 384, depth: int = 12, d_state: int = 16, head_width: int = 256
) -> dict[str, tuple]:
    """Keys and shapes of a released file's ``base_model``: a fine-tuned ``PointMambaScan`` (avg head) or, for
    ``num_classes=None``, the pre-training ``Point_MAE_Mamba_serializationV2`` (encoder under ``MAE_encoder.``,
    a 4-block decoder)."""
    if num_classes is None:
        return {
            **_encoder_and_blocks(d, depth, d_state, prefix="MAE_encoder."),
            "mask_token": (1, 1, d),
            "decoder_pos_embed.0.weight": (128, 3),
            "decoder_pos_embed.0.bias": (128,),
            "decoder_pos_embed.2.weight": (d, 128),
            "decoder_pos_embed.2.bias": (d,),
            **{k: v for i in range(4) for k, v in _mamba_block(f"MAE_decoder.blocks.layers.{i}", d, d_state).items()},
            "MAE_decoder.blocks.norm_f.weight": (d,),
            "MAE_decoder.blocks.norm_f.bias": (d,),
            "increase_dim.0.weight": (3 * 32, d, 1),
            "increase_dim.0.bias": (3 * 32,),
        }
    return {
        **_encoder_and_blocks(d, depth, d_state),
        "cls_head_finetune.0.weight": (head_width, d),
        "cls_head_finetune.0.bias": (head_width,),
        **_batch_norm("cls_head_finetune.1", head_width),
        "cls_head_finetune.4.weight": (head_width, head_width),
        "cls_head_finetune.4.bias": (head_width,),
        **_batch_norm("cls_head_finetune.5", head_width),
        "cls_head_finetune.8.weight": (num_classes, head_width),
        "cls_head_finetune.8.bias": (num_classes,),
    }


def official_state_dict(shapes: dict[str, tuple], generator: torch.Generator, device: str = "cpu") -> dict[str, torch.Tensor]:
    """Random values of sensible size for each key: norms and order scales near 1, variances positive, A_log like Mamba's."""
    out = {}
    for key, shape in shapes.items():
        if device == "meta":
            out[key] = torch.empty(shape, device="meta", dtype=torch.long if key.endswith("num_batches_tracked") else None)
        elif key.endswith("num_batches_tracked"):
            out[key] = torch.tensor(1000)
        elif key.endswith("running_var"):
            out[key] = 0.5 + torch.rand(shape, generator=generator)
        elif key.endswith("A_log"):
            out[key] = torch.log(torch.arange(1, shape[1] + 1.0)).expand(shape) + 0.1 * torch.randn(shape, generator=generator)
        elif key.endswith(("norm.weight", "norm_f.weight", "1.weight", "5.weight")) or "gamma" in key or key.endswith(".D"):
            out[key] = 1 + 0.2 * torch.randn(shape, generator=generator)
        else:
            fan_in = math.prod(shape[1:]) if len(shape) > 1 else 16
            out[key] = torch.randn(shape, generator=generator) / math.sqrt(fan_in)
    return out


def released_file(base_model: dict[str, torch.Tensor], accuracy: float = 93.6) -> dict:
    """What upstream's builder.save_checkpoint writes: the weights beside optimizer state, epoch and metrics."""
    return {
        "base_model": base_model,
        "optimizer": {"state": {}, "param_groups": [{"lr": 5e-4, "weight_decay": 0.05, "params": [0, 1]}]},
        "epoch": 299,
        "metrics": {"acc": torch.tensor(accuracy)},
        "best_metrics": {"acc": torch.tensor(accuracy)},
    }


# ------------------------------------------------------------------------------------------ forward
def _conv1x1(x: torch.Tensor, sd: dict, prefix: str) -> torch.Tensor:
    """(..., C_in) -> (..., C_out) for a kernel-size-1 Conv1d."""
    return x @ sd[f"{prefix}.weight"][..., 0].T + sd[f"{prefix}.bias"]


def _linear(x: torch.Tensor, sd: dict, prefix: str) -> torch.Tensor:
    bias = sd.get(f"{prefix}.bias")
    return x @ sd[f"{prefix}.weight"].T + (0 if bias is None else bias)


def _batch_norm_eval(x: torch.Tensor, sd: dict, prefix: str) -> torch.Tensor:
    scale = sd[f"{prefix}.weight"] / torch.sqrt(sd[f"{prefix}.running_var"] + 1e-5)
    return (x - sd[f"{prefix}.running_mean"]) * scale + sd[f"{prefix}.bias"]


def _layer_norm(x: torch.Tensor, sd: dict, prefix: str) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * sd[f"{prefix}.weight"] + sd[f"{prefix}.bias"]


def _mamba(x: torch.Tensor, sd: dict, prefix: str) -> torch.Tensor:
    """mamba_ssm's Mamba.forward, (B, L, D) -> (B, L, D): causal depthwise conv, SiLU, selective scan gated by z."""
    length = x.shape[1]
    xz = _linear(x, sd, f"{prefix}.in_proj")
    u, z = xz.chunk(2, dim=-1)  # (B, L, inner)
    weight = sd[f"{prefix}.conv1d.weight"]  # (inner, 1, 4)
    padded = F.pad(u.transpose(1, 2), (weight.shape[-1] - 1, 0))
    u = F.silu(F.conv1d(padded, weight, sd[f"{prefix}.conv1d.bias"], groups=weight.shape[0]))[..., :length]
    rank, d_state = sd[f"{prefix}.dt_proj.weight"].shape[1], sd[f"{prefix}.A_log"].shape[1]
    dt, B, C = (u.transpose(1, 2) @ sd[f"{prefix}.x_proj.weight"].T).split([rank, d_state, d_state], dim=-1)
    delta = (dt @ sd[f"{prefix}.dt_proj.weight"].T).transpose(1, 2)
    y = selective_scan_ref(
        u, delta, -torch.exp(sd[f"{prefix}.A_log"]), B.transpose(1, 2), C.transpose(1, 2), sd[f"{prefix}.D"],
        z=z.transpose(1, 2), delta_bias=sd[f"{prefix}.dt_proj.bias"], delta_softplus=True,
    )  # fmt: skip
    return _linear(y.transpose(1, 2), sd, f"{prefix}.out_proj")


def _serialization_order(center: torch.Tensor, transposed: bool) -> torch.Tensor:
    """Pointcept's serialisation as PointMamba calls it (grid 0.02, depth from the batch), (B, G) per-cloud order."""
    grid = torch.floor(center.float() / 0.02).to(torch.int64)  # upstream divides the float32 centres
    grid = grid - grid.min(dim=1, keepdim=True).values
    depth = int(grid.max()).bit_length()
    flat = grid.flatten(0, 1).numpy()
    codes = bit_array_hilbert(flat[:, [1, 0, 2]] if transposed else flat, depth)
    batch = np.repeat(np.arange(center.shape[0]), center.shape[1])
    order = np.argsort(batch << (3 * depth) | codes, kind="stable")  # one sort over the batch, clouds kept apart
    return torch.from_numpy(order).reshape(center.shape[:2]) - torch.arange(center.shape[0])[:, None] * center.shape[1]


def official_forward(
    sd: dict[str, torch.Tensor], points: torch.Tensor, num_groups: int, group_size: int, depth: int
) -> torch.Tensor:
    """``PointMambaScan.forward`` (eval mode, avg head) in float64: (B, N, 3) float32 points -> (B, num_classes)."""
    sd = {k: v.double() for k, v in sd.items()}
    centres, groups = [], []
    for cloud in points:  # Group: FPS centres (pointnet2_ops), then the K nearest points of each, centred
        centre = cloud[pointnet2_kernel_fps(cloud.numpy(), num_groups)]
        distance = ((cloud[None].double() - centre[:, None].double()) ** 2).sum(-1)
        neighbours = cloud[distance.argsort(dim=1)[:, :group_size]]
        centres.append(centre)
        groups.append(neighbours.double() - centre[:, None].double())
    center, neighborhood = torch.stack(centres), torch.stack(groups)  # (B, G, 3) float32, (B, G, K, 3)

    feature = _conv1x1(neighborhood, sd, "encoder.first_conv.0")
    feature = _conv1x1(F.relu(_batch_norm_eval(feature, sd, "encoder.first_conv.1")), sd, "encoder.first_conv.3")
    feature = torch.cat([feature.amax(dim=2, keepdim=True).expand_as(feature), feature], dim=-1)  # (B, G, K, 512)
    feature = _conv1x1(feature, sd, "encoder.second_conv.0")
    feature = _conv1x1(F.relu(_batch_norm_eval(feature, sd, "encoder.second_conv.1")), sd, "encoder.second_conv.3")
    tokens = feature.amax(dim=2)  # (B, G, D)
    pos = _linear(F.gelu(_linear(center.double(), sd, "pos_embed.0")), sd, "pos_embed.2")

    sequences, positions = [], []
    for index, transposed in ((1, False), (2, True)):
        order = _serialization_order(center, transposed)
        reordered = torch.stack([t[o] for t, o in zip(tokens, order)])
        sequences.append(reordered * sd[f"OrderScale_gamma_{index}"] + sd[f"OrderScale_beta_{index}"])
        positions.append(torch.stack([p[o] for p, o in zip(pos, order)]))
    x = torch.cat(sequences, dim=1) + torch.cat(positions, dim=1)  # MixerModel adds the position once
    for i in range(depth):
        x = x + _mamba(_layer_norm(x, sd, f"blocks.layers.{i}.norm"), sd, f"blocks.layers.{i}.mixer")
    x = _layer_norm(x, sd, "blocks.norm_f").mean(dim=1)
    for linear, norm in (("cls_head_finetune.0", "cls_head_finetune.1"), ("cls_head_finetune.4", "cls_head_finetune.5")):
        x = F.relu(_batch_norm_eval(_linear(x, sd, linear), sd, norm))  # dropout: identity in eval
    return _linear(x, sd, "cls_head_finetune.8")
