"""Point tokenisation primitives against straightforward re-implementations: FPS, kNN, grouping, curves."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vim.models.point_ops import (
    farthest_point_sample,
    grid_cells,
    group_points,
    hilbert_encode,
    knn_indices,
    quantize_to_grid,
    serialization_order,
    z_order_encode,
)

from reference.pointmamba import bit_array_hilbert, pointnet2_kernel_fps


def loop_fps(points: np.ndarray, count: int) -> list[int]:
    chosen, nearest = [0], np.full(len(points), np.inf)
    for _ in range(count - 1):
        nearest = np.minimum(nearest, ((points - points[chosen[-1]]) ** 2).sum(-1))
        chosen.append(int(nearest.argmax()))
    return chosen


def all_cells(bits: int) -> torch.Tensor:
    r = torch.arange(2**bits)
    return torch.stack(torch.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)


def test_fps_and_knn_match_loops():
    points = torch.rand(3, 50, 3, generator=torch.Generator().manual_seed(0))
    fps = farthest_point_sample(points, 7)
    for b in range(3):
        assert fps[b].tolist() == loop_fps(points[b].double().numpy(), 7)
    queries = points[:, :4]
    knn = knn_indices(queries, points, 5)
    for b in range(3):
        for g in range(4):
            distances = ((points[b] - queries[b, g]) ** 2).sum(-1).numpy()
            assert knn[b, g].tolist() == np.argsort(distances)[:5].tolist()


def test_knn_breaks_distance_ties_by_index():
    """On a lattice the k-th neighbour often ties with others: the lowest indices win, as in ONNX TopK."""
    lattice = torch.cartesian_prod(*[torch.arange(4.0)] * 3)  # 64 points, integer coordinates: exact distances
    order = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    points = lattice[order][None]
    queries = points[:, [0, 5, 17, 40]]
    knn = knn_indices(queries, points, 11)  # 1 + 6 at distance 1 + 4 of the 12 at sqrt(2): a tie cut
    for g in range(4):
        squared = ((points[0] - queries[0, g]) ** 2).sum(-1).tolist()  # integers, computed apart from cdist
        expected = sorted(range(64), key=lambda i: (squared[i], i))[:11]
        assert knn[0, g].tolist() == expected


@pytest.mark.parametrize(
    ("name", "points"),
    [
        ("random", torch.rand(2, 100, 3, generator=torch.Generator().manual_seed(0)) * 2 - 1),  # 64 threads
        ("lattice ties", torch.cartesian_prod(*[torch.arange(-2.0, 3.0)] * 3)[None] / 2),  # 125 points, many ties
        ("near the origin", torch.cat([torch.zeros(1, 3, 3), torch.full((1, 5, 3), 0.01), torch.rand(1, 40, 3) + 0.5], 1)),
        ("all skipped", torch.full((1, 20, 3), 0.001)),
        ("more than 512", torch.randint(-3, 4, (1, 1100, 3), generator=torch.Generator().manual_seed(1)).float()),
    ],
)
def test_pointnet2_fps_picks_as_the_cuda_kernel(name, points):
    """Start at 0, never a point within sqrt(1e-3) of the origin, ties in the kernel's thread-reduction order."""
    count = 6 if points.shape[1] > 500 else 12
    fps = farthest_point_sample(points, count, pointnet2=True)
    for b in range(points.shape[0]):
        assert fps[b].tolist() == pointnet2_kernel_fps(points[b].numpy(), count), name
    if name == "near the origin":
        assert not (fps[0, 1:] < 6).any()  # the zeros and the 0.01-points are never picked after point 0


def test_group_points_are_centred_neighbourhoods():
    points = torch.rand(2, 40, 3, generator=torch.Generator().manual_seed(1))
    groups, centres = group_points(points, num_groups=5, group_size=6)
    assert groups.shape == (2, 5, 6, 3) and centres.shape == (2, 5, 3)
    assert torch.equal(centres[:, 0], points[:, 0])  # FPS starts at point 0
    assert torch.allclose(groups[:, :, 0], torch.zeros(2, 5, 3))  # a centre is its own nearest neighbour
    b, g = 1, 3
    nearest = ((points[b] - centres[b, g]) ** 2).sum(-1).argsort()[:6]
    assert torch.allclose(groups[b, g] + centres[b, g], points[b, nearest])


@pytest.mark.parametrize("bits", [1, 2, 3])
def test_hilbert_is_a_continuous_bijection(bits):
    cells = all_cells(bits)
    codes = hilbert_encode(cells, bits)
    assert torch.equal(codes.sort().values, torch.arange(8**bits))  # every cell once
    path = cells[codes.argsort()]
    steps = (path[1:] - path[:-1]).abs().sum(-1)
    assert torch.all(steps == 1)  # consecutive cells are face neighbours: a Hilbert curve, not a z-order


@pytest.mark.parametrize("bits", [1, 3, 6, 7])
def test_hilbert_equals_the_official_bit_array_encoding(bits):
    cells = np.random.default_rng(bits).integers(0, 2**bits, size=(300, 3))
    assert hilbert_encode(torch.from_numpy(cells), bits).tolist() == bit_array_hilbert(cells, bits).tolist()


def test_fixed_cell_serialisation_is_pointmambas():
    """floor(p / 0.02) minus each cloud's minimum per axis; depth = bit length of the batch's largest cell."""
    generator = torch.Generator().manual_seed(4)
    small, large = torch.rand(1, 40, 3, generator=generator) * 0.6, torch.rand(1, 40, 3, generator=generator) * 2 - 1
    batch = torch.cat([small, large])
    cells, bits = grid_cells(batch, 0.02)
    reference = np.floor(batch.numpy() / np.float32(0.02)).astype(np.int64)
    reference -= reference.min(axis=1, keepdims=True)
    assert cells.tolist() == reference.tolist() and bits == int(reference.max()).bit_length() == 7
    for order, axes in (("hilbert", [0, 1, 2]), ("hilbert-trans", [1, 0, 2])):
        perm = serialization_order(batch, order, cell_size=0.02)
        for b in range(2):
            codes = bit_array_hilbert(reference[b][:, axes], bits)
            assert perm[b].tolist() == np.argsort(codes, kind="stable").tolist()
    # alone, the small cloud needs 5 bits, and the curve's orientation changes with the depth: as upstream
    # (Pointcept computes the depth over the batch), its order depends on the batch it is in
    assert grid_cells(small, 0.02)[1] == 5
    assert not torch.equal(
        serialization_order(small, "hilbert", cell_size=0.02)[0], serialization_order(batch, "hilbert", cell_size=0.02)[0]
    )


def test_z_order_is_bit_interleaving():
    cells = torch.tensor([[5, 3, 6], [0, 0, 1], [7, 7, 7]])
    expected = []
    for x, y, z in cells.tolist():
        bits = "".join(f"{x >> b & 1}{y >> b & 1}{z >> b & 1}" for b in range(2, -1, -1))
        expected.append(int(bits, 2))
    assert z_order_encode(cells, 3).tolist() == expected
    steps = (lambda p: (p[1:] - p[:-1]).abs().sum(-1))(all_cells(2)[z_order_encode(all_cells(2), 2).argsort()])
    assert steps.max() > 1  # z-order jumps, unlike the Hilbert curve


def test_serialization_orders():
    centres = torch.rand(2, 30, 3, generator=torch.Generator().manual_seed(2)) * 5 + 3
    grid = quantize_to_grid(centres, 4)
    assert grid.min() == 0 and grid.max() == 15
    assert torch.equal(quantize_to_grid(centres * 0.1 - 7, 4), grid)  # scale- and translation-invariant
    for order, encode, axes in (("hilbert", hilbert_encode, [0, 1, 2]), ("hilbert-trans", hilbert_encode, [1, 0, 2]),
                                ("z", z_order_encode, [0, 1, 2]), ("z-trans", z_order_encode, [1, 0, 2])):  # fmt: skip
        perm = serialization_order(centres, order, bits=4)
        assert torch.equal(perm.sort(dim=1).values, torch.arange(30).expand(2, -1))
        codes = encode(grid[..., axes], 4)
        assert torch.all(codes.gather(1, perm).diff(dim=1) >= 0)
    with pytest.raises(ValueError, match="unknown serialisation order 'spiral'"):
        serialization_order(centres, "spiral")
