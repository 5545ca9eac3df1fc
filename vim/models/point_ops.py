"""Point-cloud tokenisation primitives in plain PyTorch: sampling, grouping and space-filling-curve orders.

API::

    idx = farthest_point_sample(points, 64)                      # (B, N, 3) -> (B, 64) indices
    idx = farthest_point_sample(points, 64, pointnet2=True)      # as pointnet2_ops' CUDA kernel picks them
    idx = knn_indices(centres, points, 32)                       # (B, G, 3), (B, N, 3) -> (B, G, 32)
    groups, centres = group_points(points, 64, 32)               # (B, 64, 32, 3) centred groups, (B, 64, 3)
    perm = serialization_order(centres, "hilbert")               # (B, G) permutation along a 3-D Hilbert curve
    perm = serialization_order(centres, "hilbert", cell_size=0.02)   # on PointMamba's fixed grid
    code = hilbert_encode(grid, bits=10)                         # (..., 3) int64 cells -> (...,) curve index

Everything is batched and vectorised (no compiled extension): farthest point sampling loops over
the G centres only, the k-nearest-neighbour search is one exact pairwise-distance matrix and a
``topk``. Orders (:data:`ORDERS`): ``hilbert`` and ``z`` curves and their ``-trans`` variants with
the x and y axes swapped, as in PointMamba (arXiv 2402.10739), on one of two grids: a ``2**bits``
grid over each cloud's bounding cube (scale-invariant; our PointMamba models), or cells of a fixed
size as the official PointMamba (Pointcept's serialisation) computes them (:func:`grid_cells`).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

__all__ = [
    "ORDERS",
    "farthest_point_sample",
    "gather_points",
    "grid_cells",
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
    batch, picks = values.shape[0], math.prod(indices.shape[1:])
    flat = indices.reshape(batch, picks, 1).expand(-1, -1, values.shape[-1])  # picks spelled out: -1 fails for B = 0
    return values.gather(1, flat).reshape(*indices.shape, values.shape[-1])


POINTNET2_MAX_THREADS = 512
POINTNET2_MIN_SQUARED_NORM = 1e-3
"""pointnet2_ops' sampling kernel skips points with x^2 + y^2 + z^2 <= this (at or near the origin)."""


@functools.lru_cache(maxsize=16)
def pointnet2_tie_order(num_points: int) -> Tensor:
    """Point indices in the order pointnet2_ops' CUDA ``furthest_point_sample`` prefers them among equally far points.

    The kernel runs T threads per cloud, T the largest power of two <= N, at most 512 (``opt_n_threads``);
    thread t scans points t, t + T, t + 2T, ... and keeps the first of its farthest, then a tree reduction
    merges slot t + T/2 into t, t + T/4 into t, ..., keeping the lower slot on a tie. The winner among tied
    threads is therefore the one whose index, read with its bits reversed, is smallest; within a thread, the
    earliest point. Returns the (N,) int64 permutation that lists points from most to least preferred.
    """
    threads = max(min(1 << int(math.log(num_points) / math.log(2)), POINTNET2_MAX_THREADS), 1)
    bits = threads.bit_length() - 1
    index = torch.arange(num_points)
    thread = index % threads
    reversed_thread = torch.zeros_like(thread)
    for bit in range(bits):
        reversed_thread |= ((thread >> bit) & 1) << (bits - 1 - bit)
    return torch.argsort(reversed_thread * (-(-num_points // threads)) + index // threads)


def _squared_norm(x: Tensor) -> Tensor:
    """(..., 3) -> (...,) x^2 + y^2 + z^2, summed left to right as the CUDA kernels write it."""
    return x[..., 0] * x[..., 0] + x[..., 1] * x[..., 1] + x[..., 2] * x[..., 2]


@torch.no_grad()
def farthest_point_sample(points: Tensor, num_samples: int, pointnet2: bool = False) -> Tensor:
    """Indices of ``num_samples`` points chosen by farthest point sampling, starting from point 0.

    Each new point is the one farthest (Euclidean, squared distances in float32) from all points chosen so
    far; ties go to the lowest index. Deterministic.

    With ``pointnet2=True`` the choice is exactly that of pointnet2_ops' CUDA ``furthest_point_sample``
    (erikwijmans/Pointnet2_PyTorch), which the official PointMamba uses: it also starts at point 0, but never
    picks a point with ``x^2 + y^2 + z^2 <= 1e-3`` (unless every point is one; then it repeats point 0), starts
    from distances of 1e10 and breaks ties in the order of its thread reduction (:func:`pointnet2_tie_order`).
    (nvcc may fuse the kernel's multiply-adds, so on a GPU a distance can differ in its last bit: only exact
    ties between such distances could then go another way.)

    Args:
        points: (B, N, 3).
        num_samples: G <= N.
        pointnet2: pick as pointnet2_ops does.

    Returns:
        (B, G) int64 indices, the first column all zeros.
    """
    batch, num_points, _ = points.shape
    if not 0 < num_samples <= num_points:
        raise ValueError(f"farthest_point_sample: num_samples={num_samples} must lie in [1, {num_points}] (points per cloud)")
    points = points.float()
    device = points.device
    preference = pointnet2_tie_order(num_points).to(device) if pointnet2 else None
    if preference is not None:  # lay points out in the kernel's preference order: argmax's first maximum is its choice
        points = points[:, preference]
        never_picked = _squared_norm(points).double() <= POINTNET2_MIN_SQUARED_NORM  # the kernel compares in double
    chosen = torch.zeros(batch, num_samples, dtype=torch.long, device=device)
    nearest = torch.full((batch, num_points), 1e10 if pointnet2 else float("inf"), device=device)
    latest = torch.zeros(batch, dtype=torch.long, device=device)  # point 0 (first in the preference order too)
    rows = torch.arange(batch, device=device)
    for i in range(1, num_samples):
        nearest = torch.minimum(nearest, _squared_norm(points - points[rows, latest].unsqueeze(1)))  # (B, N)
        candidates = nearest if preference is None else nearest.masked_fill(never_picked, -1.0)
        latest = candidates.argmax(dim=1)
        chosen[:, i] = latest
    return chosen if preference is None else preference[chosen]


@torch.no_grad()
def knn_indices(queries: Tensor, points: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` nearest ``points`` of every query, nearest first (exact distances); points at the same
    distance in index order, so clouds on a lattice group alike on every device and in ONNX (whose TopK does so).

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
    return distance.sort(dim=-1, stable=True).indices[..., :k]


def group_points(points: Tensor, num_groups: int, group_size: int, pointnet2: bool = False) -> tuple[Tensor, Tensor]:
    """Cut clouds into ``num_groups`` local patches of ``group_size`` points (FPS centres + kNN).

    Args:
        points: (B, N, 3).
        pointnet2: sample the centres as pointnet2_ops does (see :func:`farthest_point_sample`).

    Returns:
        ``groups`` (B, G, K, 3): each patch's points relative to its centre, and ``centres`` (B, G, 3).
    """
    centres = gather_points(points, farthest_point_sample(points, num_groups, pointnet2=pointnet2))
    groups = gather_points(points, knn_indices(centres, points, group_size))
    return groups - centres.unsqueeze(2), centres


MAX_CURVE_BITS = 20
"""Bits per axis of the curve index, at most (three axes must fit in 63 bits)."""


def quantize_to_grid(points: Tensor, bits: int) -> Tensor:
    """Integer cells of a ``2**bits`` grid laid over each cloud's bounding cube.

    Args:
        points: (B, G, 3).
        bits: grid resolution per axis, 1..20.

    Returns:
        (B, G, 3) int64 in ``[0, 2**bits)``; scale- and translation-invariant.
    """
    if not 1 <= bits <= MAX_CURVE_BITS:
        raise ValueError(f"bits={bits} must lie in [1, {MAX_CURVE_BITS}] (the curve index must fit in 63 bits)")
    points = points.float()
    lowest = points.amin(dim=1, keepdim=True)
    extent = (points.amax(dim=1, keepdim=True) - lowest).amax(dim=-1, keepdim=True).clamp_min(1e-12)
    cells = torch.floor((points - lowest) / extent * 2**bits)
    return cells.clamp_(0, 2**bits - 1).long()


def grid_cells(points: Tensor, cell_size: float) -> tuple[Tensor, int]:
    """Cells of side ``cell_size`` as the official PointMamba (Pointcept's serialisation) computes them.

    ``floor(points / cell_size)`` in the points' dtype, shifted so that each cloud's lowest cell on each axis is
    0; the curve depth is the bit length of the largest cell index in the whole batch (so, as upstream, a
    cloud's order can depend on the other clouds of its batch).

    Args:
        points: (B, G, 3) float.
        cell_size: side of a cell in the points' units (PointMamba: 0.02 on clouds scaled to the unit sphere).

    Returns:
        (B, G, 3) int64 cells and the number of bits per axis.
    """
    cells = torch.floor(points / cell_size).long()
    cells = cells - cells.amin(dim=1, keepdim=True)
    bits = max(int(cells.max()).bit_length() if cells.numel() else 0, 1)  # an empty batch has no cells
    if bits > MAX_CURVE_BITS:
        raise ValueError(
            f"points span {int(cells.max()) + 1} cells of size {cell_size} along an axis, more than 2**{MAX_CURVE_BITS}: "
            "scale the clouds (e.g. to the unit sphere)"
        )
    return cells, bits


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
def serialization_order(centres: Tensor, order: str, bits: int = 10, cell_size: float | None = None) -> Tensor:
    """The permutation that sorts each cloud's centres along a space-filling curve.

    Args:
        centres: (B, G, 3).
        order: one of :data:`ORDERS`.
        bits: grid resolution per axis of :func:`quantize_to_grid` (each cloud's bounding cube).
        cell_size: use cells of this size instead (:func:`grid_cells`, the official PointMamba's grid); ``bits``
            is then the batch's.

    Returns:
        (B, G) int64: ``centres[b, perm[b]]`` visits the centres in curve order (ties keep index order).
    """
    if order not in ORDERS:
        raise ValueError(f"unknown serialisation order {order!r}; expected one of {ORDERS}")
    if cell_size is None:
        grid = quantize_to_grid(centres, bits)
    else:
        grid, bits = grid_cells(centres, cell_size)
    curve, _, transposed = order.partition("-")
    if transposed:
        grid = grid[..., [1, 0, 2]]
    return torch.argsort(_ENCODERS[curve](grid, bits), dim=1, stable=True)
