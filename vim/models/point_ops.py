"""Point-cloud tokenisation primitives in plain PyTorch: sampling, grouping and space-filling-curve orders.

API::

    idx = farthest_point_sample(points, 64)                      # (B, N, 3) -> (B, 64) indices
    idx = knn_indices(centres, points, 32)                       # (B, G, 3), (B, N, 3) -> (B, G, 32)
    groups, centres = group_points(points, 64, 32)               # (B, 64, 32, 3) centred groups, (B, 64, 3)
    perm = serialization_order(centres, "hilbert")               # (B, G) permutation along a 3-D Hilbert curve
    code = hilbert_encode(grid, bits=10)                         # (..., 3) int64 cells -> (...,) curve index

Everything is batched and vectorised (no compiled extension): farthest point sampling loops over
the G centres only, the k-nearest-neighbour search is one exact pairwise-distance matrix and a
``topk``. Orders (:data:`ORDERS`): ``hilbert`` and ``z`` curves over the cloud's bounding cube and
their ``-trans`` variants with the x and y axes swapped, as in PointMamba (arXiv 2402.10739).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "ORDERS",
    "farthest_point_sample",
    "gather_points",
    "group_points",
    "hilbert_encode",
    "knn_indices",
    "quantize_to_grid",
    "serialization_order",
    "z_order_encode",
]

ORDERS = ("hilbert", "hilbert-trans", "z", "z-trans")
"""Serialisation orders: Hilbert and z-order (Morton) curves, ``-trans`` with the x and y axes swapped."""


def gather_points(values: Tensor, indices: Tensor) -> Tensor:
    """Pick entries of ``values`` (B, N, C) at ``indices`` (B, ...) along N; returns (B, ..., C)."""
    batch = values.shape[0]
    flat = indices.reshape(batch, -1, 1).expand(-1, -1, values.shape[-1])
    return values.gather(1, flat).reshape(*indices.shape, values.shape[-1])


@torch.no_grad()
def farthest_point_sample(points: Tensor, num_samples: int) -> Tensor:
    """Indices of ``num_samples`` points chosen by farthest point sampling, starting from point 0.

    Each new point is the one farthest (Euclidean) from all points chosen so far; ties go to the
    lowest index. Deterministic.

    Args:
        points: (B, N, 3).
        num_samples: G <= N.

    Returns:
        (B, G) int64 indices, the first column all zeros.
    """
    batch, num_points, _ = points.shape
    if not 0 < num_samples <= num_points:
        raise ValueError(f"farthest_point_sample: num_samples={num_samples} must lie in [1, {num_points}] (points per cloud)")
    points = points.float()
    chosen = torch.zeros(batch, num_samples, dtype=torch.long, device=points.device)
    nearest = torch.full((batch, num_points), float("inf"), device=points.device)
    latest = torch.zeros(batch, dtype=torch.long, device=points.device)
    rows = torch.arange(batch, device=points.device)
    for i in range(1, num_samples):
        distance = (points - points[rows, latest].unsqueeze(1)).square().sum(-1)  # (B, N)
        nearest = torch.minimum(nearest, distance)
        latest = nearest.argmax(dim=1)
        chosen[:, i] = latest
    return chosen


@torch.no_grad()
def knn_indices(queries: Tensor, points: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` nearest ``points`` of every query, nearest first (exact distances).

    Args:
        queries: (B, G, 3).
        points: (B, N, 3).
        k: neighbours per query, k <= N.

    Returns:
        (B, G, k) int64 indices into N.
    """
    if not 0 < k <= points.shape[1]:
        raise ValueError(f"knn_indices: k={k} must lie in [1, {points.shape[1]}] (points per cloud)")
    distance = torch.cdist(queries.float(), points.float(), compute_mode="donot_use_mm_for_euclid_dist")  # (B, G, N)
    return distance.topk(k, dim=-1, largest=False, sorted=True).indices


def group_points(points: Tensor, num_groups: int, group_size: int) -> tuple[Tensor, Tensor]:
    """Cut clouds into ``num_groups`` local patches of ``group_size`` points (FPS centres + kNN).

    Args:
        points: (B, N, 3).

    Returns:
        ``groups`` (B, G, K, 3): each patch's points relative to its centre, and ``centres`` (B, G, 3).
    """
    centres = gather_points(points, farthest_point_sample(points, num_groups))
    groups = gather_points(points, knn_indices(centres, points, group_size))
    return groups - centres.unsqueeze(2), centres


def quantize_to_grid(points: Tensor, bits: int) -> Tensor:
    """Integer cells of a ``2**bits`` grid laid over each cloud's bounding cube.

    Args:
        points: (B, G, 3).
        bits: grid resolution per axis, 1..20.

    Returns:
        (B, G, 3) int64 in ``[0, 2**bits)``; scale- and translation-invariant.
    """
    if not 1 <= bits <= 20:
        raise ValueError(f"bits={bits} must lie in [1, 20] (the curve index must fit in 63 bits)")
    points = points.float()
    lowest = points.amin(dim=1, keepdim=True)
    extent = (points.amax(dim=1, keepdim=True) - lowest).amax(dim=-1, keepdim=True).clamp_min(1e-12)
    cells = torch.floor((points - lowest) / extent * 2**bits)
    return cells.clamp_(0, 2**bits - 1).long()


def _interleave(axes: list[Tensor], bits: int) -> Tensor:
    """Interleave the bits of three (...,) int64 tensors, most significant first, axis 0 leading each triple."""
    code = torch.zeros_like(axes[0])
    for bit in range(bits - 1, -1, -1):
        for axis in axes:
            code = (code << 1) | ((axis >> bit) & 1)
    return code


def z_order_encode(grid: Tensor, bits: int) -> Tensor:
    """Z-order (Morton) index of integer cells ``grid`` (..., 3) in ``[0, 2**bits)``; returns (...,) int64."""
    return _interleave([grid[..., i] for i in range(3)], bits)


def hilbert_encode(grid: Tensor, bits: int) -> Tensor:
    """Index along the 3-D Hilbert curve of integer cells ``grid`` (..., 3) in ``[0, 2**bits)``.

    Skilling's algorithm ("Programming the Hilbert curve", AIP Conf. Proc. 707, 2004): undo the
    excess work of the curve's rotations and reflections, Gray-encode, then interleave the bits.
    Cells with consecutive indices are face neighbours. Returns (...,) int64 in ``[0, 2**(3 * bits))``.
    """
    x = [grid[..., i].long() for i in range(3)]
    top = 1 << (bits - 1)
    q = top
    while q > 1:  # inverse undo
        p = q - 1
        x[0] = torch.where((x[0] & q) != 0, x[0] ^ p, x[0])
        for i in (1, 2):
            flip = (x[i] & q) != 0
            swap = (x[0] ^ x[i]) & p
            x[0], x[i] = torch.where(flip, x[0] ^ p, x[0] ^ swap), torch.where(flip, x[i], x[i] ^ swap)
        q >>= 1
    for i in (1, 2):  # Gray encode
        x[i] = x[i] ^ x[i - 1]
    t = torch.zeros_like(x[0])
    q = top
    while q > 1:
        t = torch.where((x[2] & q) != 0, t ^ (q - 1), t)
        q >>= 1
    return _interleave([axis ^ t for axis in x], bits)


_ENCODERS = {"hilbert": hilbert_encode, "z": z_order_encode}


@torch.no_grad()
def serialization_order(centres: Tensor, order: str, bits: int = 10) -> Tensor:
    """The permutation that sorts each cloud's centres along a space-filling curve.

    Args:
        centres: (B, G, 3).
        order: one of :data:`ORDERS`.
        bits: grid resolution per axis of :func:`quantize_to_grid`.

    Returns:
        (B, G) int64: ``centres[b, perm[b]]`` visits the centres in curve order (ties keep index order).
    """
    if order not in ORDERS:
        raise ValueError(f"unknown serialisation order {order!r}; expected one of {ORDERS}")
    grid = quantize_to_grid(centres, bits)
    curve, _, transposed = order.partition("-")
    if transposed:
        grid = grid[..., [1, 0, 2]]
    return torch.argsort(_ENCODERS[curve](grid, bits), dim=1, stable=True)
