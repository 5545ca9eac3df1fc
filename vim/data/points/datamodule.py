"""Point-cloud classification data: ModelNet40 / ScanObjectNN HDF5 files and folders of point files per class."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vim.data.folders import find_classes, labelled_class_folders
from vim.data.labelled import LabelledDataModule
from vim.data.points.dataset import PointClouds, collate_clouds
from vim.data.points.readers import POINT_EXTENSIONS
from vim.data.points.sources import HDF5Clouds, PointFiles, expand_hdf5_paths, list_point_files
from vim.data.points.transforms import PointAugment
from vim.data.samples import UNLABELLED


class PointCloudDataModule(LabelledDataModule):
    """Point-cloud classification data (HDF5 or class folders) with PointMamba's sampling and augmentation.

    Sources (each split's ``*_path``): HDF5 files (``.h5`` / ``.hdf5``, a glob such as
    ``modelnet40_ply_hdf5_2048/ply_data_train*.h5`` or a list of files) with datasets ``data`` (M, P, 3+) and
    ``label`` (M,) or (M, 1), as in ModelNet40's HDF5 release and ScanObjectNN's ``h5_files``; or a folder
    ``root/<class>/<file>`` of ``.npy`` arrays (N, 3) or (N, 6), ``.ply`` point clouds or ``.off`` meshes.

    Each cloud is checked (shape, finite values, at least ``min_points`` points) and prepared by
    :func:`~vim.data.points.prepare_points`; in training it is augmented by a per-axis scale and a translation
    (PointMamba's ModelNet40 recipe) and/or a random rotation about the up axis (its ScanObjectNN recipe). Unreadable
    or invalid clouds are skipped with a warning naming the file, never a crash mid-epoch.

    Args:
        train_path: HDF5 file(s) / glob, or a ``<class>/<file>`` folder tree, for ``fit``.
        val_path: the training classes (all or some), for validation (and ``test`` unless ``test_path`` is given); a
            class folder is labelled by its name's index among the training classes, and one they lack is an error.
        test_path: data for ``test`` (class folders as in ``val_path``).
        predict_path: a folder of point files (any nesting) or HDF5 file(s) to classify with ``predict``.
        num_points: points per cloud fed to the model (1024 for ModelNet40, 2048 for ScanObjectNN).
        min_points: clouds with fewer points are skipped (use the model's group size).
        class_names: class names in label order (HDF5 labels; class folders are labelled by their name's index in it);
            None reads the class folders, ``shape_names.txt`` or numbers the labels.
        batch_size: clouds per device and step.
        num_workers: loader processes per device; None: one per free core (at most 8).
        pin_memory: page-locked host memory for faster copies to the GPU.
        seed: seed of the shuffling and of each sample's resampling and augmentation.
        scale: training per-axis scale range (None: off).
        translate: training translation range (0: off).
        rotate: training rotation about ``up_axis``.
        up_axis: the up axis of the data ("y" for ModelNet40 and ScanObjectNN).
        normalize: centre each cloud and scale it into the unit sphere (ModelNet40, ShapeNet); off keeps the data's
            own coordinates, as upstream PointMamba's ScanObjectNN training does.
    """

    skipped_sample = "point cloud"
    split_settings = "data.{split}_path (HDF5 files or a class-folder tree)"
    collate_fn = staticmethod(collate_clouds)

    def __init__(
        self,
        train_path: str | list[str] | None = None,
        val_path: str | list[str] | None = None,
        test_path: str | list[str] | None = None,
        predict_path: str | list[str] | None = None,
        num_points: int = 1024,
        min_points: int = 32,
        class_names: list[str] | None = None,
        batch_size: int = 32,
        num_workers: int | None = None,
        pin_memory: bool = True,
        seed: int = 0,
        scale: tuple[float, float] | None = (2.0 / 3.0, 1.5),
        translate: float = 0.2,
        rotate: bool = False,
        up_axis: str = "y",
        normalize: bool = True,
    ) -> None:
        super().__init__(batch_size, num_workers, pin_memory, seed)
        self.save_hyperparameters()
        if num_points < min_points:
            raise ValueError(f"num_points={num_points} is smaller than min_points={min_points}")
        self.paths = {"train": train_path, "val": val_path, "test": test_path, "predict": predict_path}
        self.num_points, self.min_points, self.class_names = num_points, min_points, class_names
        self.normalize = normalize
        self.augment = PointAugment(
            scale=None if scale is None else (scale[0], scale[1]), translate=translate, rotate=rotate, up_axis=up_axis
        )
        self._sources: dict[str, PointFiles | HDF5Clouds] = {}

    # --------------------------------------------------------------------------------------- sources
    def source(self, split: str) -> PointFiles | HDF5Clouds:
        """The (cached) labelled source of ``split`` ("train", "val" or "test")."""
        if split not in self._sources:
            argument = f"{split}_path"
            found = expand_hdf5_paths(self.path(split), argument)
            if isinstance(found, Path):  # a folder tree, labelled by folder name against the training classes
                samples = labelled_class_folders(
                    found, self.classes, argument, list_point_files, "point files", POINT_EXTENSIONS, split == "train"
                )
                self._sources[split] = PointFiles(samples)
            else:
                self._sources[split] = HDF5Clouds(found)
        return self._sources[split]

    def path(self, split: str) -> str | list[str]:
        """The ``{split}_path`` setting; ValueError naming it when it is not set."""
        path = self.paths[split]
        if path is None:
            raise ValueError(f"data.{split}_path is not set")
        return path

    def has_split(self, split: str) -> bool:
        return self.paths[split] is not None

    def read_classes(self) -> list[str] | None:
        """``class_names``, the class folders, ``shape_names.txt`` beside the HDF5 files, or the label numbers."""
        if self.class_names is not None:
            return list(self.class_names)
        split = next((split for split in ("train", "val", "test") if self.has_split(split)), None)
        if split is None:
            return None
        found = expand_hdf5_paths(self.path(split), f"{split}_path")
        if isinstance(found, Path):
            return find_classes(found, f"{split}_path")
        names_file = found[0].parent / "shape_names.txt"
        if names_file.is_file():
            return [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
        labels = self.labels(split)
        return [str(i) for i in range(int(labels.max()) + 1)] if len(labels) else []

    def labels(self, split: str) -> np.ndarray:
        """The class index of each sample of ``split``."""
        source = self.source(split)
        return source.labels if isinstance(source, HDF5Clouds) else np.array([t for _, t in source.samples])

    def check_labels(self, split: str) -> None:
        """ValueError when a split's labels fall outside the class list (e.g. HDF5 labels vs ``class_names``)."""
        labels, num_classes = self.labels(split), len(self.classes)
        if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
            raise ValueError(f"{split}_path: labels span {labels.min()}..{labels.max()} but there are {num_classes} classes")

    # --------------------------------------------------------------------------------------- datasets
    def labelled_dataset(self, split: str, source: str) -> PointClouds:
        self.check_labels(source)
        return self.clouds(self.source(source), self.augment if split == "train" else None)

    def unlabelled_dataset(self) -> PointClouds:
        path = self.paths["predict"]
        if path is None:
            raise ValueError("predict needs data.predict_path, a folder of point files or HDF5 file(s)")
        found = expand_hdf5_paths(path, "predict_path")
        if not isinstance(found, Path):
            return self.clouds(HDF5Clouds(found))
        files = list_point_files(found)
        if not files:
            raise ValueError(f"predict_path: no point files ({', '.join(POINT_EXTENSIONS)}) under '{path}'")
        return self.clouds(PointFiles([(str(f), UNLABELLED) for f in files]))

    def clouds(self, source: PointFiles | HDF5Clouds, augment: PointAugment | None = None) -> PointClouds:
        """``source`` prepared with this module's settings (cloud size, minimum size, normalisation)."""
        return PointClouds(source, self.num_points, self.min_points, augment, self.normalize)
