"""Video clip data: segment sampling, PyAV decoding, frame folders, annotation lists, views, and bad input."""

from __future__ import annotations

import itertools
import json
import random
import re
import warnings
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from vim.data.generated import write_video
from vim.data.samples import Unreadable
from vim.data.video import (
    ToClip,
    VideoClipDataModule,
    VideoClips,
    open_frames,
    read_annotations,
    segment_indices,
    spatial_crops,
)


def gray_frames(num_frames: int, height: int = 32, width: int = 32) -> np.ndarray:
    """Frame t is a flat gray of value 10 + 12 t: its index can be read back from a decoded frame's mean."""
    return np.stack([np.full((height, width, 3), 10 + 12 * t, dtype=np.uint8) for t in range(num_frames)])


def frame_index(clip: torch.Tensor) -> list[int]:
    """Indices of the frames of a (3, T, H, W) uint8 clip made from :func:`gray_frames`."""
    return [round((float(clip[:, t].float().mean()) - 10) / 12) for t in range(clip.shape[1])]


def test_segment_indices_hand_values():
    assert segment_indices(17, 4) == [2, 6, 10, 14]  # segments of 4 frames, centre offset int(4 / 2)
    assert segment_indices(17, 4, clip=0, num_clips=2) == [1, 5, 9, 13]  # offsets int(4 / 3), int(8 / 3)
    assert segment_indices(17, 4, clip=1, num_clips=2) == [2, 6, 10, 14]
    assert segment_indices(3, 8) == [0, 0, 0, 1, 1, 1, 2, 2]  # short clip: frames repeat, in order
    rng = random.Random(0)
    for _ in range(50):
        indices = segment_indices(17, 4, rng)
        assert all(4 * i <= j <= 4 * (i + 1) for i, j in enumerate(indices))
    with pytest.raises(ValueError, match="num_available >= 1"):
        segment_indices(0, 8)


def test_decoded_clip_holds_the_sampled_frames(tmp_path):
    write_video(tmp_path / "a.mp4", gray_frames(17))
    assert len(open_frames(str(tmp_path / "a.mp4"))) == 17
    clips = VideoClips([(str(tmp_path / "a.mp4"), 0)], num_frames=4, transform=ToClip(), num_clips=1)
    assert frame_index(clips[0].clip) == [2, 6, 10, 14]
    frames_dir = tmp_path / "frames"
    frames_dir.mkdir()
    for t, frame in enumerate(gray_frames(12)):  # natural order: img_2 before img_10
        Image.fromarray(frame).save(frames_dir / f"img_{t + 1}.png")
    folder = VideoClips([(str(frames_dir), 1)], num_frames=4, transform=ToClip())[0]
    assert frame_index(folder.clip) == [1, 4, 7, 9] and folder.notes == ()  # round(2.75 i) + int(2.75 / 2)


def test_spatial_crops_left_centre_right():
    video = torch.arange(10 * 16).reshape(1, 1, 10, 16).float()
    crops = spatial_crops(video, 10, 3)
    torch.testing.assert_close(crops[0], video[..., 0:10])
    torch.testing.assert_close(crops[1], video[..., 3:13])
    torch.testing.assert_close(crops[2], video[..., 6:16])
    torch.testing.assert_close(spatial_crops(video.transpose(-1, -2), 10, 1)[0], video.transpose(-1, -2)[..., 3:13, :])


def test_annotation_lists_kinetics_csv_and_ssv2_json(tmp_path):
    (tmp_path / "list.txt").write_text("videos/a.mp4,3\nvideos/b c.mp4,0\n")
    samples, classes = read_annotations(tmp_path / "list.txt", data_root="/data")
    assert samples == [("/data/videos/a.mp4", 3), ("/data/videos/b c.mp4", 0)] and classes == ["0", "1", "2", "3"]
    (tmp_path / "k400.csv").write_text(
        "label,youtube_id,time_start,time_end,split\nzumba,abc,5,15,train\nabseiling,xyz,0,10,train\n"
    )
    samples, classes = read_annotations(tmp_path / "k400.csv", data_root="/k")
    assert classes == ["abseiling", "zumba"]
    assert samples == [("/k/abc_000005_000015.mp4", 1), ("/k/xyz_000000_000010.mp4", 0)]
    (tmp_path / "labels.json").write_text(json.dumps({"Pushing something": "1", "Holding something": "0"}))
    (tmp_path / "train.json").write_text(json.dumps([{"id": "7", "template": "Pushing [something]", "placeholders": ["pen"]}]))
    data = VideoClipDataModule(
        train_list=str(tmp_path / "train.json"), data_root="/s", classes_file=str(tmp_path / "labels.json")
    )
    assert data.classes == ["Holding something", "Pushing something"]
    assert data.labelled_samples("train") == [("/s/7.webm", 1)]
    (tmp_path / "bad.txt").write_text("a.mp4 7\n")
    with pytest.raises(ValueError, match="train_list: labels span"):
        read_annotations(tmp_path / "bad.txt", classes=["x", "y"])


def write_bad_tree(root: Path) -> dict[str, Path]:
    """Two good videos and one of each kind of bad input, in class folders."""
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
    files = {"good": root / "a" / "good.mp4", "good2": root / "b" / "good2.mp4"}
    write_video(files["good"], gray_frames(10))
    write_video(files["good2"], gray_frames(10))
    files["empty"] = root / "a" / "empty.mp4"
    files["empty"].write_bytes(b"")
    files["corrupt"] = root / "a" / "corrupt.avi"
    files["corrupt"].write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    files["truncated"] = root / "b" / "truncated.mp4"
    files["truncated"].write_bytes(files["good"].read_bytes()[:600])
    files["short"] = root / "b" / "short.mp4"
    write_video(files["short"], gray_frames(3))
    files["odd"] = root / "b" / "odd.mkv"
    write_video(files["odd"], gray_frames(6, 13, 19), codec="ffv1")  # odd frame size, smaller than min_image_size
    files["no_frames"] = root / "a" / "no_frames.mkv"  # a header and a video stream, zero frames
    with av.open(str(files["no_frames"]), "w") as container:
        stream = container.add_stream("ffv1", rate=8)
        stream.width = stream.height = 32
        container.start_encoding()
    files["vfr"] = root / "a" / "vfr.mkv"
    with av.open(str(files["vfr"]), "w") as container:
        stream = container.add_stream("ffv1", rate=25)
        stream.width = stream.height = 32
        stream.codec_context.time_base = stream.time_base = Fraction(1, 1000)
        for pts, frame in zip((0, 40, 80, 300, 340, 700, 740), gray_frames(7)):
            video_frame = av.VideoFrame.from_ndarray(frame, format="rgb24")
            video_frame.pts, video_frame.time_base = pts, Fraction(1, 1000)
            container.mux(stream.encode(video_frame))
        container.mux(stream.encode())
    return files


def test_bad_videos_are_skipped_or_reported_and_never_stop_an_epoch(tmp_path):
    write_bad_tree(tmp_path / "train")
    data = VideoClipDataModule(
        num_frames=4,
        train_root=str(tmp_path / "train"),
        img_size=16,
        batch_size=3,
        num_workers=0,
        auto_augment="rand-m5-n2",
        re_prob=0.25,
        min_image_size=16,
    )
    data.setup("fit")
    dataset = data.datasets["train"]
    results = {Path(path).name: dataset[i] for i, (path, _) in enumerate(dataset.samples)}
    unreadable = {name for name, item in results.items() if isinstance(item, Unreadable)}
    assert unreadable == {"empty.mp4", "corrupt.avi", "truncated.mp4", "no_frames.mkv"}
    assert "0 bytes" in results["empty.mp4"].reason and "VideoReadError" in results["no_frames.mkv"].reason
    notes = {name: " ".join(item.notes) for name, item in results.items() if name not in unreadable}
    assert "only 3 frames for num_frames=4" in notes["short.mp4"]
    assert "13x19 are smaller than min_image_size=16" in notes["odd.mkv"]
    assert "variable frame rate" in notes["vfr.mkv"] and notes["good.mp4"] == ""
    assert all(item.clip.shape == (3, 4, 16, 16) for name, item in results.items() if name not in unreadable)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches = [data.on_before_batch_transfer(batch, 0) for batch in data.train_dataloader()]
    messages = [str(w.message) for w in caught]
    assert sum(len(b.targets) for b in batches) + data.num_skipped == len(batches) * 3
    assert any("skipped unreadable video" in m and "skipped so far" in m for m in messages)
    assert data.num_skipped >= 1


def test_test_views_are_clips_times_crops(tmp_path):
    (tmp_path / "c").mkdir()
    write_video(tmp_path / "c" / "v.mp4", gray_frames(9, 32, 48))
    data = VideoClipDataModule(
        num_frames=4, test_root=str(tmp_path), img_size=32, test_num_clips=2, test_num_crops=3, num_workers=0
    )
    data.setup("test")
    batch = next(iter(data.test_dataloader()))
    assert batch.clips.shape == (1, 6, 3, 4, 32, 32)
    settings = data.transform_settings
    mean, std = torch.tensor(settings["mean"]).view(3, 1), torch.tensor(settings["std"]).view(3, 1)
    pixel = (batch.clips[0, :, :, :, 16, 16] * std + mean) * 255  # (views, 3, T)
    expected_frames = [segment_indices(9, 4, clip=0, num_clips=2)] * 3 + [segment_indices(9, 4, clip=1, num_clips=2)] * 3
    torch.testing.assert_close(pixel[:, 0].round(), 10 + 12 * torch.tensor(expected_frames, dtype=torch.float32), atol=4, rtol=0)


def test_repeated_augmentation_gives_views_of_one_segment_sample(tmp_path):
    """repeated_aug 3: each video is sampled once in time and augmented three times; the batch holds 3 rows per video."""
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        write_video(tmp_path / name / "v.mp4", gray_frames(17))
    data = VideoClipDataModule(num_frames=4, train_root=str(tmp_path), img_size=16, batch_size=2, num_workers=0, repeated_aug=3)
    data.setup("fit")
    train = data.datasets["train"]
    calls = itertools.count()
    train.transform = lambda video: ToClip()(video) + next(calls) % 3  # view k of a video: brightness + k
    batch = data.collate_fn([train[0], train[1]])
    assert batch.clips.shape == (6, 3, 4, 32, 32) and batch.targets.tolist() == [0, 0, 0, 1, 1, 1]
    assert batch.paths == [str(tmp_path / "a" / "v.mp4")] * 3 + [str(tmp_path / "b" / "v.mp4")] * 3
    for video in batch.clips.view(2, 3, 3, 4, 32, 32):  # (views, 3, T, H, W)
        brightness = video.float().mean(dim=(1, 3, 4))  # (views, T)
        expected = brightness[0] + torch.arange(3.0)[:, None]  # the same frames, each view augmented on its own
        torch.testing.assert_close(brightness, expected)
    with pytest.raises(ValueError, match="repeated_aug must be at least 1"):
        VideoClipDataModule(train_root=str(tmp_path), repeated_aug=0)
    with pytest.raises(ValueError, match="train=True"):
        VideoClips([], num_frames=4, transform=ToClip(), repeats=2)


def write_gop_video(path: Path, frames: np.ndarray, codec: str, gop: int = 8, b_frames: int = 0, options=None) -> Path:
    """Encode (T, H, W, 3) frames with a keyframe every ``gop`` frames and up to ``b_frames`` B-frames between others."""
    with av.open(str(path), "w", options=options or {}) as container:
        stream = container.add_stream(codec, rate=8)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p" if codec != "ffv1" else "yuv444p"
        stream.codec_context.gop_size, stream.codec_context.max_b_frames = gop, b_frames
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def decode_all(path: Path) -> np.ndarray:
    """Every frame of the file, decoded in order from the start: the reference for seeking decodes."""
    with av.open(str(path)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


CONTAINERS = [("mp4", "libx264", 2), ("mkv", "libx264", 2), ("mkv", "ffv1", 0), ("avi", "mpeg4", 0), ("ts", "mpeg2video", 0)]
CONTAINERS += [("webm", "libvpx-vp9", 0)]


@pytest.mark.parametrize(("extension", "codec", "b_frames"), CONTAINERS, ids=[f"{e}-{c}" for e, c, _ in CONTAINERS])
def test_taken_frames_equal_a_full_decode(tmp_path, extension, codec, b_frames):
    """Seeking to keyframes (every 8 frames; B-frames where the codec has them) gives exactly the frames that decoding
    the whole file in order gives, for clip index lists in any order, with repeats, at the start and the end."""
    frames = np.random.default_rng(0).integers(0, 256, (48, 32, 32, 3), dtype=np.uint8)
    path = write_gop_video(tmp_path / f"v.{extension}", frames, codec, b_frames=b_frames)
    reference = decode_all(path)
    video = open_frames(str(path))
    assert len(video) == len(reference) == 48 and video.notes == [] and video.frame_size == (32, 32)
    rng = random.Random(0)
    index_lists = [[0], [47], [5, 17, 33, 46], [40, 3, 3, 41], segment_indices(48, 8, rng), segment_indices(48, 8, None, 1, 2)]
    for indices in index_lists:
        taken = video.take(indices).permute(0, 2, 3, 1).numpy()
        np.testing.assert_array_equal(taken, reference[indices], err_msg=f"{indices}")


def test_decoding_stops_after_the_last_frame_a_clip_needs(tmp_path):
    """The second half of the file is garbage (header intact): a clip from the first half decodes cleanly, because
    nothing past its last frame is decoded; a clip reaching into the garbage is told that the stream breaks off."""
    frames = np.random.default_rng(0).integers(0, 256, (60, 32, 32, 3), dtype=np.uint8)
    path = tmp_path / "v.mp4"
    write_video(path, frames, codec="libx264")
    reference = decode_all(path)
    data = bytearray(path.read_bytes())
    half, end = len(data) // 2, len(data) * 9 // 10
    data[half:end] = np.random.default_rng(1).integers(0, 256, end - half, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    video = open_frames(str(path))
    assert len(video) == 60 and video.notes == []  # the header's 60 frames; nothing decoded yet
    np.testing.assert_array_equal(video.take([0, 4, 9]).permute(0, 2, 3, 1).numpy(), reference[[0, 4, 9]])
    assert video.notes == []
    video.take([0, 59])
    assert any("breaks off" in note for note in video.notes)


def truncate(path: Path, fraction: float, multiple_of: int = 1) -> Path:
    data = path.read_bytes()
    size = int(len(data) * fraction)
    path.write_bytes(data[: size - (size % multiple_of == 0)])  # cut inside a block of `multiple_of` bytes
    return path


@pytest.mark.parametrize(
    ("extension", "codec", "options", "expected"),
    [
        ("mkv", "ffv1", None, r"holds [\d.]+ s of video where its header states 5.00 s \(truncated\?\)"),
        ("mkv", "libx264", None, r"holds [\d.]+ s of video where its header states 5.00 s \(truncated\?\)"),
        ("ts", "mpeg2video", None, r"ends inside a transport-stream packet \(truncated\?\)"),
        ("mp4", "libx264", {"movflags": "faststart"}, r"holds \d+ of the 40 frames its header states \(truncated\?\)"),
    ],
    ids=["mkv-ffv1", "mkv-h264", "ts", "mp4-faststart"],
)
def test_truncated_files_are_reported(tmp_path, extension, codec, options, expected):
    """A file cut at 60% still opens; the clip is made from the frames it holds, with a note (a warning in training)."""
    frames = np.random.default_rng(0).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    path = truncate(write_gop_video(tmp_path / f"v.{extension}", frames, codec, options=options), 0.6, multiple_of=188)
    item = VideoClips([(str(path), 0)], num_frames=4, transform=ToClip())[0]
    assert not isinstance(item, Unreadable), item
    assert any(re.search(expected, note) for note in item.notes), item.notes
    intact = write_gop_video(tmp_path / f"intact.{extension}", frames, codec, options=options)
    assert VideoClips([(str(intact), 0)], num_frames=4, transform=ToClip())[0].notes == ()
