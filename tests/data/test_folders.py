"""The folder walk every modality lists its samples with: links followed, each real file or folder once, loops skipped."""

from __future__ import annotations

import multiprocessing
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from vim.data.folders import walk_files
from vim.data.images import ImageDataModule
from vim.data.samples import DataWarning
from vim.data.video import list_videos

WALK_SECONDS = 20
"""Time limit of one walk of a few files: a walk that follows a loop never finishes (or takes minutes)."""


def _walk_and_send(connection, walk: Callable[[], list]) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = [str(path) for path in walk()]
    connection.send((found, [(w.category.__name__, str(w.message)) for w in caught]))


def walk_in_time(walk: Callable[[], list]) -> tuple[list[str], list[tuple[str, str]]]:
    """``walk()``'s paths and its warnings (category name, message), run in a forked process that is killed, failing
    the test, if it takes longer than :data:`WALK_SECONDS` (a thread could not be stopped)."""
    context = multiprocessing.get_context("fork")
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_walk_and_send, args=(send, walk))
    process.start()
    send.close()  # so that a child that dies ends the wait (EOFError) rather than running out the time
    finished = receive.poll(WALK_SECONDS)
    if not finished:
        process.kill()
    process.join()
    assert finished, f"the walk did not finish in {WALK_SECONDS} s (a symlink loop followed?)"
    return receive.recv()


def three_images(folder: Path) -> list[Path]:
    """folder/0.png, 1.png, 2.png (4x4 RGB), in sorted order."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{i}.png" for i in range(3)]
    for i, path in enumerate(paths):
        Image.fromarray(np.full((4, 4, 3), 40 * i, dtype=np.uint8)).save(path)
    return paths


def is_image(name: str) -> bool:
    return name.endswith(".png")


def test_two_links_to_the_folder_itself_finish_with_each_file_once(tmp_path):
    images = three_images(tmp_path / "a")
    (tmp_path / "a" / "s1").symlink_to(".")
    (tmp_path / "a" / "s2").symlink_to(".")
    found, caught = walk_in_time(lambda: walk_files(tmp_path / "a", is_image))
    assert found == [str(p) for p in images]
    assert len(caught) == 1 and caught[0][0] == "DataWarning"
    assert f"'{tmp_path / 'a'}': skipped 2 links to folders already walked" in caught[0][1]


def test_a_link_to_the_folder_itself_lists_each_file_once_and_warns_once(tmp_path):
    images = three_images(tmp_path / "a")
    (tmp_path / "a" / "self").symlink_to(".")
    (tmp_path / "a" / "b").mkdir()
    (tmp_path / "a" / "b" / "up").symlink_to("..")  # a loop through a real subfolder
    (tmp_path / "a" / "b" / "again.png").symlink_to(images[1])  # a file linked twice
    found, caught = walk_in_time(lambda: walk_files(tmp_path / "a", is_image))
    assert found == [str(p) for p in images]
    assert [category for category, _ in caught] == ["DataWarning"]
    assert "skipped 2 links to folders already walked" in caught[0][1] and "1 links to files already listed" in caught[0][1]


def test_links_out_of_the_tree_are_followed_without_a_warning(tmp_path):
    """A class folder that is a link to data elsewhere, and a linked file, are listed under their link's path."""
    elsewhere = three_images(tmp_path / "elsewhere" / "cats")
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "cat").symlink_to(tmp_path / "elsewhere" / "cats", target_is_directory=True)
    (tmp_path / "root" / "dog").mkdir()
    (extra,) = three_images(tmp_path / "elsewhere" / "dogs")[:1]
    (tmp_path / "root" / "dog" / "0.png").symlink_to(extra)
    found, caught = walk_in_time(lambda: walk_files(tmp_path / "root", is_image))
    linked = [str(tmp_path / "root" / "cat" / p.name) for p in elsewhere]
    assert found == [*linked, str(tmp_path / "root" / "dog" / "0.png")] and caught == []
    assert walk_in_time(lambda: walk_files(tmp_path / "root" / "cat", is_image)) == (linked, [])


def test_video_samples_are_listed_once_through_links(tmp_path):
    """Frame folders and video files: a loop is skipped with one warning, a frame folder linked from outside is one
    sample under its link's path, a second link to a frame folder already listed is skipped."""
    root = tmp_path / "videos"
    three_images(root / "clip")
    (root / "b.mp4").write_bytes(b"")  # listed by name; never decoded here
    three_images(tmp_path / "elsewhere" / "frames")
    (root / "linked").symlink_to(tmp_path / "elsewhere" / "frames", target_is_directory=True)
    (root / "s1").symlink_to(".")
    (root / "s2").symlink_to(".")
    (root / "z").symlink_to("clip")
    found, caught = walk_in_time(lambda: list_videos(root))
    assert found == [str(root / "b.mp4"), str(root / "clip"), str(root / "linked")]
    assert len(caught) == 1 and caught[0][0] == "DataWarning" and "skipped 3 links to folders already walked" in caught[0][1]


def test_the_image_data_module_reads_each_real_file_once(tmp_path):
    """End to end: a class folder with a loop gives as many training samples as it has real images."""
    for name in ("cat", "dog"):
        three_images(tmp_path / "train" / name)
    (tmp_path / "train" / "cat" / "self").symlink_to(".")
    module = ImageDataModule(train_root=str(tmp_path / "train"), img_size=16, batch_size=4, num_workers=0, auto_augment=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module.setup("fit")
    listed = sorted(Path(path).relative_to(tmp_path / "train").as_posix() for path, _ in module.datasets["train"].samples)
    assert listed == [f"{name}/{i}.png" for name in ("cat", "dog") for i in range(3)]
    assert [w.category for w in caught] == [DataWarning]
