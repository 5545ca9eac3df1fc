"""Moving handwritten digits: a small real video dataset, generated on first use, for the video quickstart.

Each clip shows one of scikit-learn's bundled handwritten digits (installed with the package, no download)
gliding across a dark canvas in a straight line. Clips are labelled by the direction of motion (``left``,
``right``, ``up``, ``down``: telling them apart needs more than one frame) or by the digit. They are
written once as actual video files (H.264 in MP4 when PyAV has libx264, else MPEG-4 Part 2) under
``$VIM_CACHE/moving_digits_<label>`` (default ``~/.cache/vim``), ``train/<class>/<n>.mp4`` and
``val/<class>/<n>.mp4``, so training decodes them with exactly the Kinetics code path of
:class:`~vim.data.video.VideoClipDataModule`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image
from tqdm import tqdm

from vim.data.generated.cache import cache_dir, write_once
from vim.data.generated.digits import DIGIT_CLASSES
from vim.data.video.datamodule import VideoClipDataModule
from vim.data.video.decoding import _pyav

DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}
"""Class name -> unit motion (rows, columns) per frame."""
LabelType = Literal["direction", "digit"]


def video_codec() -> str:
    """``libx264`` when this PyAV build can encode it, else ``mpeg4``."""
    return "libx264" if "libx264" in _pyav().codecs_available else "mpeg4"


def render_clip(digit: np.ndarray, direction: str, rng: np.random.Generator, num_frames: int, canvas: int) -> np.ndarray:
    """(num_frames, canvas, canvas, 3) uint8 frames of ``digit`` (s, s) in [0, 1] moving in ``direction``.

    The digit travels in a straight line at a random speed, entirely inside the canvas, tinted a random color.
    """
    size = digit.shape[0]
    room = canvas - size
    speed = rng.uniform(0.6, 1.0) * room / max(num_frames - 1, 1)  # pixels per frame
    d_row, d_col = DIRECTIONS[direction]
    travel = speed * (num_frames - 1)

    def start(step: int) -> float:  # a start from which the whole path stays on the canvas
        low, high = (0.0, room - travel) if step > 0 else (travel, room) if step < 0 else (0.0, room)
        return rng.uniform(low, high)

    row0, col0 = start(d_row), start(d_col)
    color = rng.uniform(0.5, 1.0, size=3)
    frames = np.zeros((num_frames, canvas, canvas, 3), dtype=np.float32)
    for t in range(num_frames):
        row, col = round(row0 + d_row * speed * t), round(col0 + d_col * speed * t)
        frames[t, row : row + size, col : col + size] = digit[..., None] * color
    return (frames * 255).round().astype(np.uint8)


def write_video(path: str | os.PathLike, frames: np.ndarray, fps: int = 8, codec: str | None = None) -> None:
    """Encode (T, H, W, 3) uint8 RGB ``frames`` (even H and W) as a video file with PyAV.

    Each frame is converted to YUV 4:2:0 here: left to the encoder's own conversion, the same frames sometimes came out
    as other pixels (33 of the quickstart's 641 clips differed between two writes on a busy machine, all frames of a
    clip slightly brighter), and the video quickstart's score moved with them."""
    av = _pyav()
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec or video_codec(), rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        if stream.codec_context.name == "libx264":
            stream.options = {"crf": "12"}
        else:
            stream.bit_rate = 2_000_000
        for frame in frames:
            yuv = av.VideoFrame.from_ndarray(frame, format="rgb24").reformat(format="yuv420p")  # converted here, once
            container.mux(stream.encode(yuv))
        container.mux(stream.encode())


def write_moving_digits(
    root: str | os.PathLike,
    label: LabelType = "direction",
    num_train: int = 480,
    num_val: int = 160,
    num_frames: int = 16,
    canvas: int = 32,
    digit_size: int = 12,
    seed: int = 0,
) -> Path:
    """Write ``root/{train,val}/<class>/<n>.mp4`` once (:func:`~vim.data.generated.cache.write_once`). Returns ``root``.

    Args:
        root: output folder.
        label: "direction" (4 classes) or "digit" (10 classes).
        num_train, num_val: clips per split (classes balanced, digits drawn from disjoint image sets).
        num_frames: frames per clip.
        canvas: frame side in pixels (even).
        digit_size: digit side in pixels after upscaling from 8 x 8.
        seed: seed of every random choice.
    """
    if label not in ("direction", "digit"):
        raise ValueError(f"label must be 'direction' or 'digit', got {label!r}")
    if canvas % 2 or canvas <= digit_size:
        raise ValueError(f"canvas={canvas} must be even and larger than digit_size={digit_size}")

    def write(root: Path) -> None:
        from sklearn.datasets import load_digits  # only when writing: scikit-learn is slow to import

        digits = load_digits()
        images = [
            np.asarray(Image.fromarray((im * 255 / 16).astype(np.uint8)).resize((digit_size,) * 2, Image.Resampling.BICUBIC))
            for im in digits.images
        ]
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(images))
        pools = {"train": order[: len(order) * 3 // 4], "val": order[len(order) * 3 // 4 :]}
        classes = list(DIRECTIONS) if label == "direction" else DIGIT_CLASSES
        for split, count in (("train", num_train), ("val", num_val)):
            for name in classes:
                (root / split / name).mkdir(parents=True, exist_ok=True)
            for n in tqdm(range(count), desc=f"writing moving digits/{split}", leave=False):
                if label == "direction":
                    image_index, direction = rng.choice(pools[split]), classes[n % len(classes)]
                else:
                    candidates = pools[split][digits.target[pools[split]] == n % 10]
                    image_index, direction = rng.choice(candidates), list(DIRECTIONS)[rng.integers(len(DIRECTIONS))]
                name = direction if label == "direction" else str(digits.target[image_index])
                clip = render_clip(images[image_index] / 255.0, direction, rng, num_frames, canvas)
                write_video(root / split / name / f"{n:05d}.mp4", clip)

    return write_once(root, write)


class MovingDigitsDataModule(VideoClipDataModule):
    """:class:`VideoClipDataModule` on the moving-digits videos, written under ``root`` on first use.

    Args:
        root: where the tree lives; None for ``$VIM_CACHE/moving_digits_<label>``.
        label: "direction" or "digit".
        num_train, num_val, clip_frames, canvas: passed to :func:`write_moving_digits` (``clip_frames`` frames
            are written; ``num_frames`` of them are sampled per clip).
        **kwargs: :class:`VideoClipDataModule` arguments (``num_frames``, ``img_size``, ``batch_size``, ...).
    """

    def __init__(
        self,
        root: str | None = None,
        label: LabelType = "direction",
        num_train: int = 480,
        num_val: int = 160,
        clip_frames: int = 16,
        canvas: int = 32,
        **kwargs,
    ) -> None:
        folder = Path(root) if root is not None else cache_dir() / f"moving_digits_{label}"
        super().__init__(train_root=str(folder / "train"), val_root=str(folder / "val"), **kwargs)
        self.root, self.label = folder, label
        self.generator: dict[str, Any] = dict(
            label=label, num_train=num_train, num_val=num_val, num_frames=clip_frames, canvas=canvas
        )

    def prepare_data(self) -> None:
        write_moving_digits(self.root, **self.generator)

    def read_classes(self) -> list[str]:
        return sorted(DIRECTIONS) if self.label == "direction" else DIGIT_CLASSES
