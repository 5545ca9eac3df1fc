"""scikit-learn's bundled handwritten digits (1797 8x8 images, 10 classes) as an ImageFolder tree.

The quickstart's dataset: it installs from the package registries with scikit-learn (no download at run
time) and is written once as PNG files under ``$VIM_CACHE/digits`` (default ``~/.cache/vim/digits``),
``train/<digit>/<n>.png`` and ``val/<digit>/<n>.png``, so training on it runs exactly the ImageNet code
path of :class:`~vim.data.images.ImageDataModule`.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from vim.data.generated.cache import cache_dir, write_once
from vim.data.images import ImageDataModule

DIGIT_CLASSES = [str(d) for d in range(10)]


def write_digits_tree(root: str | os.PathLike, image_size: int = 32, val_fraction: float = 0.2, seed: int = 0) -> Path:
    """Write the digits as ``root/{train,val}/<digit>/<n>.png`` (grayscale, upscaled to ``image_size``) once.

    The split is stratified and fixed by ``seed``. A finished tree is never rewritten; an interrupted write is redone
    (:func:`~vim.data.generated.cache.write_once`). Returns ``root``.
    """

    def write(root: Path) -> None:
        from sklearn.datasets import load_digits  # only when writing: scikit-learn is slow to import
        from sklearn.model_selection import train_test_split

        digits = load_digits()
        pixels = np.round(digits.images * (255 / 16)).astype(np.uint8)  # (1797, 8, 8), values 0..16 in the source
        indices = np.arange(len(pixels))
        train, val = train_test_split(indices, test_size=val_fraction, random_state=seed, stratify=digits.target)
        for split, split_indices in (("train", train), ("val", val)):
            for label in DIGIT_CLASSES:
                (root / split / label).mkdir(parents=True, exist_ok=True)
            for i in tqdm(sorted(split_indices), desc=f"writing digits/{split}", leave=False):
                image = Image.fromarray(pixels[i], mode="L").resize((image_size, image_size), Image.Resampling.BICUBIC)
                image.save(root / split / str(digits.target[i]) / f"{i:04d}.png")

    return write_once(root, write)


class DigitsDataModule(ImageDataModule):
    """:class:`ImageDataModule` on the digits tree, written under ``root`` (default ``$VIM_CACHE/digits``) if missing.

    Args:
        root: where the tree lives; None for the cache directory.
        **kwargs: any :class:`ImageDataModule` argument except the roots (transforms, batch size, workers, ...).
    """

    def __init__(self, root: str | None = None, predict_root: str | None = None, **kwargs) -> None:
        folder = Path(root) if root is not None else cache_dir() / "digits"
        super().__init__(train_root=str(folder / "train"), val_root=str(folder / "val"), predict_root=predict_root, **kwargs)
        self.root = folder

    def prepare_data(self) -> None:
        write_digits_tree(self.root)

    def read_classes(self) -> list[str]:
        return DIGIT_CLASSES
