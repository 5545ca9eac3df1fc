"""Reading point clouds: ``.npy`` arrays, ``.ply`` vertices, ``.off`` meshes (their surface sampled), and the checks
that make an array a usable cloud."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

POINT_EXTENSIONS = (".npy", ".ply", ".off")
MESH_SURFACE_POINTS = 8192
"""Points sampled (uniformly by area, fixed seed) from the surface of a mesh file."""


def check_point_array(array: np.ndarray, source: str, min_points: int = 1) -> np.ndarray:
    """The (N, 3) float32 xyz of an (N, 3) or (N, 6) array; ValueError naming ``source`` when it is not a usable cloud."""
    array = np.asarray(array)
    if array.ndim != 2 or array.shape[1] not in (3, 6):
        raise ValueError(f"{source}: expected an (N, 3) array of xyz points (or (N, 6) with normals), got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.number):
        raise ValueError(f"{source}: expected numeric coordinates, got dtype {array.dtype}")
    xyz = array[:, :3].astype(np.float32)
    bad = int((~np.isfinite(xyz)).any(axis=1).sum())
    if bad:
        raise ValueError(f"{source}: {bad} of {len(xyz)} points have NaN or infinite coordinates")
    if len(xyz) < min_points:
        raise ValueError(
            f"{source}: {len(xyz)} points, fewer than the {min_points} the model needs (its group size / group count)"
        )
    return xyz


def read_point_file(path: str | os.PathLike) -> np.ndarray:
    """Read a ``.npy``, ``.ply`` or ``.off`` file as an (N, C) array (meshes: :data:`MESH_SURFACE_POINTS` surface points)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return np.load(path, allow_pickle=False)
    if suffix == ".ply":
        return read_ply_vertices(path)
    if suffix == ".off":
        vertices, faces = read_off(path)
        return sample_mesh_surface(vertices, faces, MESH_SURFACE_POINTS) if len(faces) else vertices
    raise ValueError(f"{path}: not a point-cloud file (expected one of {', '.join(POINT_EXTENSIONS)})")


_PLY_TYPES = {
    "char": "i1", "int8": "i1", "uchar": "u1", "uint8": "u1", "short": "i2", "int16": "i2", "ushort": "u2", "uint16": "u2",
    "int": "i4", "int32": "i4", "uint": "u4", "uint32": "u4", "float": "f4", "float32": "f4", "double": "f8", "float64": "f8",
}  # fmt: skip


def read_ply_vertices(path: str | os.PathLike) -> np.ndarray:
    """The x, y, z of the ``vertex`` element of an ASCII or binary PLY file, (N, 3). Faces are ignored.

    The vertex element must come first, or after elements without list properties.
    """
    with Path(path).open("rb") as file:
        if file.readline().strip() != b"ply":
            raise ValueError(f"{path}: not a PLY file (no 'ply' magic line)")
        fmt: str | None = None
        elements: list[tuple[str, int, list[tuple[str, str]]]] = []  # (name, count, [(property, type)])
        while (line := file.readline()) and line.strip() != b"end_header":
            words = line.decode("ascii", "replace").split()
            if words[:1] == ["format"]:
                fmt = words[1]
            elif words[:1] == ["element"]:
                elements.append((words[1], int(words[2]), []))
            elif words[:1] == ["property"] and elements:
                elements[-1][2].append((words[-1], "list" if words[1] == "list" else _PLY_TYPES.get(words[1], "?")))
        if not line:
            raise ValueError(f"{path}: PLY header has no 'end_header' line")
        if fmt not in ("ascii", "binary_little_endian", "binary_big_endian"):
            raise ValueError(f"{path}: unsupported PLY format {fmt!r}")
        endian = ">" if fmt == "binary_big_endian" else "<"
        for name, count, properties in elements:
            if any(kind in ("list", "?") for _, kind in properties):
                raise ValueError(f"{path}: PLY element '{name}' before 'vertex' has list or unknown properties; cannot skip it")
            dtype = np.dtype([(prop, endian + kind) for prop, kind in properties])
            if fmt == "ascii":
                rows = [file.readline().split() for _ in range(count)]
                table = np.array([tuple(row[: len(properties)]) for row in rows], dtype=dtype) if count else np.empty(0, dtype)
            else:
                table = np.frombuffer(file.read(dtype.itemsize * count), dtype=dtype, count=count)
            if name == "vertex":
                missing = {"x", "y", "z"} - set(table.dtype.names or ())
                if missing:
                    raise ValueError(f"{path}: PLY vertices have no {sorted(missing)} properties")
                return np.stack([table["x"], table["y"], table["z"]], axis=1).astype(np.float32)
    raise ValueError(f"{path}: PLY file has no 'vertex' element")


def read_off(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Vertices (V, 3) and triangles (F, 3) of an ASCII OFF file (polygons are fanned into triangles)."""
    with Path(path).open() as file:
        tokens = [word for line in file for word in line.split("#")[0].split()]
    if not tokens or not tokens[0].startswith("OFF"):
        raise ValueError(f"{path}: not an OFF file (no 'OFF' header)")
    head = tokens[0][3:]  # ModelNet writes "OFF490 518 0" without a line break
    tokens = ([head] if head else []) + tokens[1:]
    try:
        num_vertices, num_faces = int(tokens[0]), int(tokens[1])
        vertices = np.array(tokens[3 : 3 + 3 * num_vertices], dtype=np.float64).reshape(num_vertices, 3)
        triangles, position = [], 3 + 3 * num_vertices
        for _ in range(num_faces):
            size = int(tokens[position])
            corners = [int(t) for t in tokens[position + 1 : position + 1 + size]]
            triangles += [(corners[0], corners[i], corners[i + 1]) for i in range(1, size - 1)]
            position += 1 + size
    except (IndexError, ValueError) as err:
        raise ValueError(f"{path}: truncated or malformed OFF file ({err})") from None
    faces = np.array(triangles, dtype=np.int64).reshape(-1, 3)
    if faces.size and (faces.min() < 0 or faces.max() >= num_vertices):
        raise ValueError(f"{path}: OFF faces refer to vertices outside 0..{num_vertices - 1}")
    return vertices.astype(np.float32), faces


def sample_mesh_surface(vertices: np.ndarray, faces: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """``count`` points uniformly distributed over a triangle mesh's surface (by area), (count, 3) float32."""
    corners = vertices[faces].astype(np.float64)  # (F, 3, 3)
    areas = 0.5 * np.linalg.norm(np.cross(corners[:, 1] - corners[:, 0], corners[:, 2] - corners[:, 0]), axis=1)
    if not areas.sum() > 0:
        return vertices
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(faces), size=count, p=areas / areas.sum())
    u, v = rng.random((2, count, 1))
    flip = (u + v) > 1
    u, v = np.where(flip, 1 - u, u), np.where(flip, 1 - v, v)
    a, b, c = corners[chosen, 0], corners[chosen, 1], corners[chosen, 2]
    return (a + u * (b - a) + v * (c - a)).astype(np.float32)
