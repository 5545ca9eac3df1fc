"""Point-cloud classification data, by concern: :mod:`~vim.data.points.readers` (``.npy``, ``.ply``, ``.off``; checks),
:mod:`~vim.data.points.transforms` (resampling, normalisation, augmentation for every caller),
:mod:`~vim.data.points.sources` (HDF5 files, point files), :mod:`~vim.data.points.dataset` (clouds, batches) and
:mod:`~vim.data.points.datamodule` (:class:`PointCloudDataModule`)."""

from vim.data.points.datamodule import PointCloudDataModule
from vim.data.points.dataset import LoadedCloud, PointBatch, PointClouds, collate_clouds
from vim.data.points.readers import (
    MESH_SURFACE_POINTS,
    POINT_EXTENSIONS,
    check_point_array,
    read_off,
    read_ply_vertices,
    read_point_file,
    sample_mesh_surface,
)
from vim.data.points.sources import (
    HDF5_EXTENSIONS,
    HDF5Clouds,
    PointFiles,
    expand_hdf5_paths,
    list_point_files,
    open_point_hdf5,
)
from vim.data.points.transforms import (
    PointAugment,
    farthest_points,
    normalize_unit_sphere,
    prepare_points,
    resample_points,
    up_axis_rotation,
)

__all__ = [
    "HDF5_EXTENSIONS",
    "MESH_SURFACE_POINTS",
    "POINT_EXTENSIONS",
    "HDF5Clouds",
    "LoadedCloud",
    "PointAugment",
    "PointBatch",
    "PointCloudDataModule",
    "PointClouds",
    "PointFiles",
    "check_point_array",
    "collate_clouds",
    "expand_hdf5_paths",
    "farthest_points",
    "list_point_files",
    "normalize_unit_sphere",
    "open_point_hdf5",
    "prepare_points",
    "read_off",
    "read_ply_vertices",
    "read_point_file",
    "resample_points",
    "sample_mesh_surface",
    "up_axis_rotation",
]
