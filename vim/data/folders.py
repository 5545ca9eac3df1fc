"""The class-folder layout every modality reads: ``root/<class>/<sample>`` (ImageNet's ImageFolder layout).

Class names are the sorted folder names; a sample is any file (or, for video, folder of frames) that the
modality's lister finds under its class folder. An empty class folder is reported, not turned into a class without
samples. A validation or test tree is labelled by folder name against the training classes
(:func:`labelled_class_folders`), never by its folders' own positions: a split that lacks a class keeps every other
label.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from vim.data.samples import DataWarning


def find_classes(root: str | os.PathLike, argument: str) -> list[str]:
    """Sorted class folder names under ``root``; ``argument`` names the setting in error messages."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{argument}: data root '{root}' does not exist or is not a directory")
    classes = sorted(entry.name for entry in root.iterdir() if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise ValueError(f"{argument}: '{root}' has no class folders; expected the ImageFolder layout {root}/<class>/<image>")
    return classes


def walk_tree(root: str | os.PathLike, keep: Callable[[str], bool]) -> Iterator[tuple[Path, list[str], list[str]]]:
    """``(folder, subfolder names, file names)`` for every folder under ``root``, top-down as
    ``os.walk(followlinks=True)``: names sorted, hidden folders left out, only the files whose name passes ``keep``.
    Emptying the yielded subfolder list (in place) keeps the walk out of them.

    Links are followed, so a class folder may be a link to data elsewhere, but each real folder is entered once (by its
    ``(st_dev, st_ino)``) and each real file listed once (by its resolved path), under the first path the walk reaches
    it by: without this, a link back up the tree (``self -> .``) lists the tree again at every depth up to the path
    length limit, and two such links never finish. One :class:`DataWarning` per walk names ``root`` and how many
    folders and files were skipped this way.
    """
    seen_folders: set[tuple[int, int]] = set()
    seen_files: set[Path] = set()
    skipped_folders = skipped_files = 0
    for name, subfolders, files in os.walk(str(root), followlinks=True):
        folder, status = Path(name), Path(name).stat()
        if (status.st_dev, status.st_ino) in seen_folders:
            skipped_folders += 1
            subfolders[:] = []
            continue
        seen_folders.add((status.st_dev, status.st_ino))
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        wanted = sorted(f for f in files if keep(f))
        kept = unseen_files(folder, wanted, seen_files)
        skipped_files += len(wanted) - len(kept)
        yield folder, subfolders, kept
    if skipped_folders or skipped_files:
        warnings.warn(
            f"'{root}': skipped {skipped_folders} links to folders already walked (symlink loops, or several links to "
            f"one folder) and {skipped_files} links to files already listed; each real file is listed once",
            DataWarning,
            stacklevel=1,
        )


def unseen_files(folder: Path, names: Sequence[str], seen: set[Path]) -> list[str]:
    """The ``names`` of files in ``folder`` whose resolved path is not in ``seen``, which gains them."""
    real_folder = folder.resolve()
    unseen = []
    for name in names:
        # only a file that is itself a link can resolve outside its (already resolved) folder: one lstat, not a resolve
        real = (folder / name).resolve() if (folder / name).is_symlink() else real_folder / name
        if real not in seen:
            seen.add(real)
            unseen.append(name)
    return unseen


def walk_files(root: str | os.PathLike, keep: Callable[[str], bool]) -> list[Path]:
    """Files under ``root`` whose name passes ``keep``, recursively, in sorted order, each real file once
    (:func:`walk_tree`); hidden folders skipped."""
    return [Path(folder, name) for folder, _, files in walk_tree(root, keep) for name in files]


def labelled_files(
    root: str | os.PathLike,
    classes: Sequence[str],
    argument: str,
    list_files: Callable[[Path], Sequence[str | os.PathLike]],
    kind: str,
    extensions: Sequence[str],
    empty_is_error: bool = True,
) -> list[tuple[str, int]]:
    """``(path, class index)`` for every sample ``list_files`` finds under ``root/<class>/``, classes in the order given.

    A class folder without samples is an error naming it (``empty_is_error``: a class the model would learn from no
    example), else a :class:`DataWarning` (a validation or test split may lack a class). ValueError naming ``argument``,
    what it looks for (``kind``, e.g. "image files", and their ``extensions``) when no folder has any.
    """
    found = {name: [str(path) for path in list_files(Path(root, name))] for name in classes}
    if not any(found.values()):
        raise ValueError(f"{argument}: no {kind} ({', '.join(extensions)}) in the class folders of '{root}'")
    empty = [str(Path(root, name)) for name, paths in found.items() if not paths]
    if empty:
        message = f"{argument}: class folders without {kind} ({', '.join(extensions)}): {first_ten(empty)}"
        if empty_is_error:
            raise ValueError(f"{message}; add samples or remove the folders")
        warnings.warn(f"{message}; these classes are not evaluated", DataWarning, stacklevel=2)
    return [(path, target) for target, name in enumerate(classes) for path in found[name]]


def labelled_class_folders(
    root: str | os.PathLike,
    classes: Sequence[str],
    argument: str,
    list_files: Callable[[Path], Sequence[str | os.PathLike]],
    kind: str,
    extensions: Sequence[str],
    empty_is_error: bool = True,
) -> list[tuple[str, int]]:
    """``(path, index in classes)`` for every sample under ``root/<class>/``, each folder labelled by its name's place in
    ``classes`` (the classes the model is trained on), not by its place among ``root``'s own folders.

    A tree may lack some of ``classes`` (a validation split evaluates fewer classes; :func:`labelled_files` warns about
    an empty folder, or refuses it when ``empty_is_error``); a folder whose name is not in ``classes`` is a ValueError
    naming it and the known classes, since no output of the model stands for it.
    """
    folders = find_classes(root, argument)
    known = set(classes)
    unknown = [name for name in folders if name not in known]
    if unknown:
        raise ValueError(
            f"{argument}: class folders {first_ten(unknown)} of '{root}' are not among the {len(classes)} classes "
            f"{first_ten(classes)} the model is trained on"
        )
    index = {name: i for i, name in enumerate(classes)}
    samples = labelled_files(root, folders, argument, list_files, kind, extensions, empty_is_error)
    return [(path, index[folders[target]]) for path, target in samples]


def first_ten(names: Sequence[str]) -> str:
    """``names`` for a message: the first ten as a list, `` ...`` when there are more."""
    return f"{list(names[:10])}{' ...' if len(names) > 10 else ''}"


def check_same_classes(train_classes: Sequence[str], other_classes: Sequence[str], other: str = "val_root") -> None:
    """ValueError naming the folders that only one of the train root and the ``other`` root has."""
    if list(train_classes) == list(other_classes):
        return
    only_train = sorted(set(train_classes) - set(other_classes))
    only_other = sorted(set(other_classes) - set(train_classes))
    raise ValueError(
        f"train_root and {other} have different class folders: only in train_root {first_ten(only_train)}, "
        f"only in {other} {first_ten(only_other)}"
    )
