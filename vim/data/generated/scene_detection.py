"""The generated shape scenes (:mod:`vim.data.generated.scenes`) as COCO detection data: the detection quickstart's."""

from __future__ import annotations

from typing import Any

from vim.data.detection import DetectionDataModule
from vim.data.generated.scenes import SCENE_CLASSES, scenes_root, write_scenes


class SceneDetectionDataModule(DetectionDataModule):
    """:class:`~vim.data.detection.DetectionDataModule` on the scenes' ``images/{train,val}`` and
    ``annotations/instances_{train,val}.json``, written under ``root`` (default ``$VIM_CACHE/scenes``) if missing.

    Args:
        root: where the scenes live; None for the cache directory.
        predict_root: folder of images to detect shapes in with ``predict``.
        **kwargs: any :class:`~vim.data.detection.DetectionDataModule` argument except the splits (sizes, masks, batch
            size, workers, ...).
    """

    def __init__(self, root: str | None = None, predict_root: str | None = None, **kwargs: Any) -> None:
        folder = scenes_root(root)
        super().__init__(
            train_images=str(folder / "images" / "train"),
            train_annotations=str(folder / "annotations" / "instances_train.json"),
            val_images=str(folder / "images" / "val"),
            val_annotations=str(folder / "annotations" / "instances_val.json"),
            predict_root=predict_root,
            **kwargs,
        )
        self.root = folder

    def prepare_data(self) -> None:
        write_scenes(self.root)

    def categories(self) -> list[tuple[int, str]]:
        """The scenes' shapes, category ids 1.. (known before the scenes are written)."""
        return [(i + 1, name) for i, name in enumerate(SCENE_CLASSES)]
