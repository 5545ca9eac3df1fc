"""Image classification data in the ImageFolder (ImageNet) layout: ``root/<class>/<image>``.

:class:`ImageDataModule` reads train/val/test roots with timm's transforms (RandAugment, color jitter,
random erasing, bicubic resize for training; resize + center crop for evaluation) and a folder of
unlabelled images for ``predict``. Robust to real-world folders: every image is converted to RGB
(grayscale, palette, RGBA), unreadable or corrupt files are skipped with a warning and a running count
(never a crash mid-epoch), and images smaller than ``min_image_size`` (one patch) are upsampled by the
transform with a warning.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torch.utils.data import DataLoader, Dataset

from vim.data.sampling import ResumableSampler, SampleKey, seed_everything_from

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")
UNLABELLED = -1


class LoadedImage(NamedTuple):
    """One transformed image: ``image`` (3, H, W), its class index (``UNLABELLED`` for predict) and file."""

    image: torch.Tensor
    target: int
    path: str
    was_small: bool


class UnreadableImage(NamedTuple):
    """A file that could not be decoded, and why."""

    path: str
    reason: str


class ImageBatch(NamedTuple):
    """A collated batch: ``images`` (B, 3, H, W), ``targets`` (B,), the B file paths, and what was left out or upsampled."""

    images: torch.Tensor
    targets: torch.Tensor
    paths: list[str]
    skipped: list[UnreadableImage]
    small: list[str]


def find_classes(root: str | os.PathLike, argument: str) -> list[str]:
    """Sorted class folder names under ``root``; ``argument`` names the setting in error messages."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{argument}: data root '{root}' does not exist or is not a directory")
    classes = sorted(entry.name for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise ValueError(f"{argument}: '{root}' has no class folders; expected the ImageFolder layout {root}/<class>/<image>")
    return classes


def walk_files(root: str | os.PathLike, keep: Callable[[str], bool]) -> list[Path]:
    """Files under ``root`` whose name passes ``keep``, recursively, in sorted order; hidden folders skipped."""
    found = []
    for folder, subfolders, files in os.walk(root, followlinks=True):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        found += [Path(folder, f) for f in sorted(files) if keep(f)]
    return found


def list_images(root: str | os.PathLike) -> list[Path]:
    """All image files (by extension) under ``root``, recursively, in sorted order."""
    return walk_files(root, lambda name: name.lower().endswith(IMAGE_EXTENSIONS))


def labelled_files(
    root: str | os.PathLike,
    classes: Sequence[str],
    argument: str,
    list_files: Callable[[Path], list] = list_images,
    kind: str = "image",
    extensions: Sequence[str] = IMAGE_EXTENSIONS,
) -> list[tuple[str, int]]:
    """``(path, class index)`` for every file ``list_files`` finds under ``root/<class>/`` (images by default);
    ValueError naming ``argument``, the ``kind`` of file and its ``extensions`` when there are none."""
    samples = [(str(path), target) for target, name in enumerate(classes) for path in list_files(Path(root, name))]
    if not samples:
        raise ValueError(f"{argument}: no {kind} files ({', '.join(extensions)}) in the class folders of '{root}'")
    return samples


def check_same_classes(train_classes: Sequence[str], val_classes: Sequence[str]) -> None:
    """ValueError naming the folders that only one of the train and val roots has."""
    if list(train_classes) == list(val_classes):
        return
    only_train = sorted(set(train_classes) - set(val_classes))
    only_val = sorted(set(val_classes) - set(train_classes))
    raise ValueError(
        f"train_root and val_root have different class folders: only in train_root {only_train[:10]}"
        f"{' ...' if len(only_train) > 10 else ''}, only in val_root {only_val[:10]}{' ...' if len(only_val) > 10 else ''}"
    )


def read_rgb(path: str) -> Image.Image:
    """Decode an image file fully and convert it to RGB (grayscale, palette, CMYK and RGBA images alike)."""
    with Image.open(path) as image:
        image.load()
        return image.convert("RGB")


class ImageFiles(Dataset):
    """Image files with class indices, read as RGB and transformed.

    Indexed by an int or a :class:`SampleKey`; with a key, the global random generators are seeded from
    ``key.seed`` first, so the random augmentation of a sample does not depend on worker scheduling.
    Unreadable files come back as :class:`UnreadableImage` (left out by :func:`collate_images`).
    """

    def __init__(self, samples: Sequence[tuple[str, int]], transform, min_image_size: int = 0) -> None:
        self.samples = list(samples)
        self.transform = transform
        self.min_image_size = min_image_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | SampleKey) -> LoadedImage | UnreadableImage:
        index = key.index if isinstance(key, SampleKey) else key
        path, target = self.samples[index]
        try:
            image = read_rgb(path)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:  # PIL raises all of these
            return UnreadableImage(path, f"{type(err).__name__}: {err}")
        if isinstance(key, SampleKey):
            seed_everything_from(key.seed)
        return LoadedImage(self.transform(image), target, path, min(image.size) < self.min_image_size)


def collate_images(samples: Sequence[LoadedImage | UnreadableImage]) -> ImageBatch:
    """Stack the readable samples into an :class:`ImageBatch`; unreadable ones are listed in ``skipped``."""
    loaded = [s for s in samples if isinstance(s, LoadedImage)]
    skipped = [s for s in samples if isinstance(s, UnreadableImage)]
    images = torch.stack([s.image for s in loaded]) if loaded else torch.empty(0, 3, 0, 0)
    targets = torch.tensor([s.target for s in loaded], dtype=torch.long)
    return ImageBatch(images, targets, [s.path for s in loaded], skipped, [s.path for s in loaded if s.was_small])


def train_batches_per_epoch(trainer: Trainer, loader_batches: int) -> int:
    """Batches Lightning runs per training epoch: the loader's, cut by ``limit_train_batches``."""
    limit = trainer.limit_train_batches
    if isinstance(limit, float):
        return max(int(loader_batches * limit), 1)
    return max(min(loader_batches, int(limit)), 1) if limit is not None else loader_batches


def train_batches_run(trainer: Trainer) -> int:
    """Training batches the fit loop has run so far, over all epochs: every batch taken from the loader, including
    those inside a gradient-accumulation window and those whose samples were all unreadable.

    Where a resumed run's sampler starts. Optimizer steps times ``accumulate_grad_batches`` is not this count:
    an epoch ends with a step over the batches left, however few.
    """
    return trainer.fit_loop.epoch_loop.batch_progress.total.processed


class ImageDataModule(LightningDataModule):
    """ImageFolder-layout image classification data with timm's training and evaluation transforms.

    Args:
        train_root: ``<class>/<image>`` tree for ``fit``.
        val_root: same classes, for validation (and ``test`` unless ``test_root`` is given).
        test_root: tree for ``test``.
        predict_root: folder of images (any nesting) to classify with ``predict``.
        img_size: side of the square model input.
        batch_size: images per device and step (global batch = batch_size x devices x nodes).
        num_workers: loader processes per device.
        pin_memory: page-locked host memory for faster copies to the GPU.
        seed: seed of the shuffling and of each sample's augmentation (same on every rank).
        auto_augment: timm auto-augment policy, e.g. ``rand-m9-mstd0.5-inc1`` (RandAugment), or None.
        color_jitter: color jitter strength.
        re_prob: random erasing probability.
        interpolation: resize interpolation (``bicubic``, ``bilinear``, ...).
        hflip: horizontal flip probability.
        scale: random-resized-crop area range.
        crop_pct: evaluation center-crop fraction (resize to img_size / crop_pct, then crop).
        mean: per-channel normalization mean.
        std: per-channel normalization std.
        min_image_size: images with a shorter side below this (use the model's patch size) are reported as upsampled.
    """

    collate_fn = staticmethod(collate_images)
    """Turns a list of dataset items into a batch; a modality's subclass replaces it."""

    def __init__(
        self,
        train_root: str | None = None,
        val_root: str | None = None,
        test_root: str | None = None,
        predict_root: str | None = None,
        img_size: int = 224,
        batch_size: int = 128,
        num_workers: int = 8,
        pin_memory: bool = True,
        seed: int = 0,
        auto_augment: str | None = "rand-m9-mstd0.5-inc1",
        color_jitter: float = 0.3,
        re_prob: float = 0.25,
        interpolation: str = "bicubic",
        hflip: float = 0.5,
        scale: tuple[float, float] = (0.08, 1.0),
        crop_pct: float = 0.875,
        mean: tuple[float, float, float] = IMAGENET_DEFAULT_MEAN,
        std: tuple[float, float, float] = IMAGENET_DEFAULT_STD,
        min_image_size: int = 16,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be at least 1 (samples per device and step), got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"data.num_workers must be 0 (load in the main process) or more, got {num_workers}")
        self.save_hyperparameters()
        # Read settings from attributes, not self.hparams: under LightningCLI hparams hold what the config gave.
        self.roots = {"train_root": train_root, "val_root": val_root, "test_root": test_root, "predict_root": predict_root}
        self.img_size, self.batch_size, self.seed = img_size, batch_size, seed
        self.num_workers, self.pin_memory, self.min_image_size = num_workers, pin_memory, min_image_size
        self.augmentation = dict(
            auto_augment=auto_augment, color_jitter=color_jitter, re_prob=re_prob, hflip=hflip, scale=tuple(scale)
        )
        self.interpolation, self.crop_pct, self.mean, self.std = interpolation, crop_pct, tuple(mean), tuple(std)
        self.datasets: dict[str, ImageFiles] = {}
        self.num_skipped = 0
        self._restored_batches_run: int | None = None

    @property
    def classes(self) -> list[str]:
        """Class names, from the train root (or the val/test root when there is none)."""
        for argument in ("train_root", "val_root", "test_root"):
            if self.roots[argument] is not None:
                return find_classes(self.roots[argument], argument)
        raise ValueError("no labelled data: set data.train_root, data.val_root or data.test_root")

    def train_transform(self):
        return create_transform(
            self.img_size,
            is_training=True,
            re_mode="pixel",
            interpolation=self.interpolation,
            mean=self.mean,
            std=self.std,
            **self.augmentation,
        )

    def eval_transform(self):
        return create_transform(
            self.img_size,
            is_training=False,
            interpolation=self.interpolation,
            crop_pct=self.crop_pct,
            mean=self.mean,
            std=self.std,
        )

    def labelled_split(self, argument: str, transform) -> ImageFiles:
        root = self.roots[argument]
        classes = find_classes(root, argument)
        if self.roots["train_root"] is not None and argument != "train_root":
            check_same_classes(find_classes(self.roots["train_root"], "train_root"), classes)
        return ImageFiles(labelled_files(root, classes, argument), transform, self.min_image_size)

    def setup(self, stage: str) -> None:
        hp = self.roots
        if stage == "fit":
            if hp["train_root"] is None:
                raise ValueError("fit needs data.train_root (an ImageFolder tree)")
            self.datasets["train"] = self.labelled_split("train_root", self.train_transform())
        if stage in ("fit", "validate") and hp["val_root"] is not None:
            self.datasets["val"] = self.labelled_split("val_root", self.eval_transform())
        if stage == "validate" and hp["val_root"] is None:
            raise ValueError("validate needs data.val_root (an ImageFolder tree)")
        if stage == "test":
            argument = "test_root" if hp["test_root"] is not None else "val_root"
            if hp[argument] is None:
                raise ValueError("test needs data.test_root or data.val_root (an ImageFolder tree)")
            self.datasets["test"] = self.labelled_split(argument, self.eval_transform())
        if stage == "predict":
            self.datasets["predict"] = self.unlabelled_split()

    def unlabelled_split(self) -> ImageFiles:
        root = self.roots["predict_root"]
        if root is None or not Path(root).is_dir():
            raise ValueError(f"predict needs data.predict_root, a folder of images; got '{root}'")
        files = list_images(root)
        if not files:
            raise ValueError(f"predict_root: no image files ({', '.join(IMAGE_EXTENSIONS)}) under '{root}'")
        return ImageFiles([(str(f), UNLABELLED) for f in files], self.eval_transform(), self.min_image_size)

    def loader(self, dataset: Dataset, sampler=None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=sampler is not None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory and torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
            collate_fn=self.collate_fn,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled per epoch from ``seed``; after a resume it starts where the interrupted run stopped."""
        dataset, batch_size = self.datasets["train"], self.batch_size
        trainer = self.trainer
        if trainer is None:
            return self.loader(dataset, ResumableSampler(dataset, seed=self.seed, drop_last=True))
        sampler = ResumableSampler(
            dataset, num_replicas=trainer.world_size, rank=trainer.global_rank, seed=self.seed, drop_last=True
        )
        epoch, batches_done = divmod(self.train_batches_run(), train_batches_per_epoch(trainer, len(sampler) // batch_size))
        sampler.set_epoch(epoch)
        sampler.skip_once(batches_done * batch_size)
        # The sampler resumes mid-epoch itself, which Lightning cannot see: silence its warning about that.
        warnings.filterwarnings("ignore", "You're resuming from a checkpoint that ended before", PossibleUserWarning)
        return self.loader(dataset, sampler)

    def train_batches_run(self) -> int:
        """Training batches run so far: from the checkpoint being resumed (once), else from the trainer."""
        if self._restored_batches_run is not None:
            seen, self._restored_batches_run = self._restored_batches_run, None
            return seen
        return train_batches_run(self.trainer)

    def state_dict(self) -> dict[str, int]:
        """Saved in checkpoints. Lightning restores it before it builds the loaders; the fit loop's own progress
        (:func:`train_batches_run`) comes back only later, after ``configure_optimizers`` has built them."""
        return {"train_batches_seen": train_batches_run(self.trainer)} if self.trainer else {}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._restored_batches_run = state_dict.get("train_batches_seen")

    def val_dataloader(self) -> DataLoader | list:
        return self.loader(self.datasets["val"]) if "val" in self.datasets else []

    def test_dataloader(self) -> DataLoader:
        return self.loader(self.datasets["test"])

    def predict_dataloader(self) -> DataLoader:
        return self.loader(self.datasets["predict"])

    def report_skipped(self, skipped: Sequence[tuple[str, str]], what: str) -> None:
        """Warn about each skipped ``(path, reason)`` sample (``what``: "unreadable image", ...) with a running count.

        Called from ``on_before_batch_transfer``; the warning points at that hook's caller.
        """
        for path, reason in skipped:
            self.num_skipped += 1
            warnings.warn(f"skipped {what} '{path}' ({reason}); {self.num_skipped} skipped so far", stacklevel=3)

    def on_before_batch_transfer(self, batch: ImageBatch, dataloader_idx: int) -> ImageBatch:
        """Report skipped (unreadable) and upsampled (smaller than ``min_image_size``) images as they occur."""
        self.report_skipped(batch.skipped, "unreadable image")
        for path in batch.small:
            warnings.warn(
                f"image '{path}' is smaller than min_image_size={self.min_image_size} px (one patch); "
                f"it is upsampled to img_size={self.img_size}",
                stacklevel=2,
            )
        return batch
