"""Where a split's videos come from: a folder per class, or an annotation list.

Annotation lists: lines ``path label`` (space, tab or comma separated; label an index or a class name; VideoMAE /
VideoMamba's lists), the official Kinetics CSV (``label,youtube_id,time_start,time_end,split``; files
``<youtube_id>_<start:06d>_<end:06d>.mp4``), or the official Something-Something v2 JSON (``[{"id", "template", ...}]``,
files ``<id>.webm``, class indices from ``labels.json``). Relative paths are taken under ``data_root``.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from vim.data.folders import walk_tree
from vim.data.images.dataset import IMAGE_EXTENSIONS
from vim.data.video.decoding import VIDEO_EXTENSIONS


def classes_from_file(path: str | os.PathLike) -> list[str]:
    """Class names by index: JSON ``{name: index}`` (SSv2's labels.json) or ``[names]``, or a text file, one name per line."""
    text = Path(path).read_text()
    if str(path).endswith(".json"):
        data = json.loads(text)
        if isinstance(data, dict):
            return [name for name, _ in sorted(data.items(), key=lambda item: int(item[1]))]
        return [str(name) for name in data]
    return [line.strip() for line in text.splitlines() if line.strip()]


def _resolve(data_root: str | None, path: str) -> str:
    return path if data_root is None or Path(path).is_absolute() else str(Path(data_root, path))


def _ssv2_samples(entries: list[dict], data_root: str | None, classes: list[str], argument: str) -> list[tuple[str, int]]:
    index = {name: i for i, name in enumerate(classes)}
    samples = []
    for entry in entries:
        label = entry["template"].replace("[", "").replace("]", "")
        if label not in index:
            raise ValueError(f"{argument}: label {label!r} of video {entry['id']} is not in classes_file")
        samples.append((_resolve(data_root, f"{entry['id']}.webm"), index[label]))
    return samples


def _kinetics_csv_samples(rows: list[dict], data_root: str | None) -> list[tuple[str, str]]:
    return [
        (_resolve(data_root, f"{row['youtube_id']}_{int(row['time_start']):06d}_{int(row['time_end']):06d}.mp4"), row["label"])
        for row in rows
    ]


def _list_samples(lines: list[str]) -> list[tuple[str, str]]:
    samples = []
    for line in lines:
        separator = "," if "," in line else None
        parts = line.rsplit(separator, 1)
        if len(parts) != 2:
            raise ValueError(f"annotation line {line!r} is not 'path label'")
        samples.append((parts[0].strip(), parts[1].strip()))
    return samples


def read_annotations(
    path: str | os.PathLike, data_root: str | None = None, classes: list[str] | None = None, argument: str = "train_list"
) -> tuple[list[tuple[str, int]], list[str]]:
    """``(video path, class index)`` samples of an annotation file, and the class names.

    Args:
        path: a ``path label`` list, the official Kinetics CSV or the official Something-Something v2 JSON.
        data_root: prefix of relative video paths.
        classes: class names by index (required for SSv2; else taken from integer labels or sorted label names).
        argument: the setting's name, for error messages.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{argument}: annotation file '{path}' does not exist")
    if path.suffix == ".json":
        if classes is None:
            raise ValueError(f"{argument}: a Something-Something JSON list needs classes_file (labels.json)")
        return _ssv2_samples(json.loads(path.read_text()), data_root, classes, argument), classes
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{argument}: annotation file '{path}' is empty")
    if "youtube_id" in lines[0]:
        named = _kinetics_csv_samples(list(csv.DictReader(lines)), data_root)
    else:
        named = [(_resolve(data_root, p), label) for p, label in _list_samples(lines)]
    if all(label.lstrip("-").isdigit() for _, label in named):
        targets = [int(label) for _, label in named]
        classes = classes or [str(i) for i in range(max(targets) + 1)]
        if min(targets) < 0 or max(targets) >= len(classes):
            raise ValueError(f"{argument}: labels span [{min(targets)}, {max(targets)}] but there are {len(classes)} classes")
        return [(p, t) for (p, _), t in zip(named, targets)], classes
    classes = classes or sorted({label for _, label in named})
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted({label for _, label in named} - set(index))
    if unknown:
        raise ValueError(f"{argument}: labels {unknown[:5]} are not among the {len(classes)} classes")
    return [(p, index[label]) for p, label in named], classes


def list_videos(root: str | os.PathLike) -> list[str]:
    """Samples under ``root``: video files (by extension) and folders holding frame images, recursively, sorted; each
    real file or folder once (:func:`~vim.data.folders.walk_tree`: links followed, loops skipped with a warning)."""
    found = []
    for folder, subfolders, files in walk_tree(root, lambda name: name.lower().endswith(IMAGE_EXTENSIONS + VIDEO_EXTENSIONS)):
        if folder != Path(root) and any(f.lower().endswith(IMAGE_EXTENSIONS) for f in files):
            found.append(str(folder))  # a frame folder is one sample
            subfolders[:] = []
            continue
        found += [str(folder / f) for f in files if f.lower().endswith(VIDEO_EXTENSIONS)]
    return found
