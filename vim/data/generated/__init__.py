"""The quickstarts' datasets, generated on first use under ``$VIM_CACHE`` (default ``~/.cache/vim``), no download:
scikit-learn's handwritten digits as an ImageFolder tree (:class:`DigitsDataModule`), the same digits moving across
a canvas as real video files (:class:`MovingDigitsDataModule`), noisy geometric solids as point files
(:class:`ShapesDataModule`), and scenes of coloured shapes with their class masks (:class:`SceneSegmentationDataModule`)
and COCO instances (:class:`SceneDetectionDataModule`). Each is written once as files, so training on it runs exactly
the code path of real folder data."""

from vim.data.generated.cache import cache_dir, write_once
from vim.data.generated.digits import DIGIT_CLASSES, DigitsDataModule, write_digits_tree
from vim.data.generated.moving_digits import DIRECTIONS, MovingDigitsDataModule, render_clip, write_moving_digits, write_video
from vim.data.generated.scene_detection import SceneDetectionDataModule
from vim.data.generated.scenes import SCENE_CLASSES, SceneSegmentationDataModule, write_scenes
from vim.data.generated.shapes import SHAPE_CLASSES, ShapesDataModule, make_shape, write_shapes_tree

__all__ = [
    "DIGIT_CLASSES",
    "DIRECTIONS",
    "SCENE_CLASSES",
    "SHAPE_CLASSES",
    "DigitsDataModule",
    "MovingDigitsDataModule",
    "SceneDetectionDataModule",
    "SceneSegmentationDataModule",
    "ShapesDataModule",
    "cache_dir",
    "make_shape",
    "render_clip",
    "write_digits_tree",
    "write_moving_digits",
    "write_once",
    "write_scenes",
    "write_shapes_tree",
    "write_video",
]
