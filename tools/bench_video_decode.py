"""Peak memory of reading one clip from a long video: the decoder before and after decoding only the frames a clip needs.

    python tools/bench_video_decode.py                     # 1500 frames of 640x360 (60 s at 25 fps), 8-frame clips
    python tools/bench_video_decode.py --frames 9000 --width 1920 --height 1080 --codec libx264   # 6 min of 1080p

A long video of moving noise is written once (``--video`` reuses a file). Each (implementation, mode) then runs in a
fresh process, which reports how much its peak resident set grew while it read one sample through
:class:`~vim.data.video.VideoClips`: ``train`` (one clip by random segment sampling), ``eval`` (the centre clip, as
validation, ``predict`` and ``vimkit extract`` take it) and ``test`` (4 clips). ``before`` is
``vim/data/video.py`` as of ``--before`` (a git revision: it decoded every frame of the file and kept them),
``after`` the working tree's. Writes ``benchmarks/video_decode_memory.{json,md}`` with the machine, versions and
date. Seconds are reported too, but they come from one run on a shared CPU: read them as rough.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmark_report import machine, markdown_table, write_json, write_markdown

REPO = Path(__file__).resolve().parents[1]
MODES: dict[str, dict[str, Any]] = {"train": dict(train=True), "eval": dict(num_clips=1), "test": dict(num_clips=4)}


def write_long_video(path: Path, frames: int, width: int, height: int, codec: str, fps: int = 25) -> None:
    """``frames`` frames of coarse random blocks drifting sideways (content the encoder cannot make free), encoded one
    frame at a time (the toolkit's ``write_video`` takes all frames as one array)."""
    import av
    import numpy as np

    blocks = np.random.default_rng(0).integers(0, 256, (height // 8, width // 8 + frames, 3), dtype=np.uint8)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width, stream.pix_fmt = height, width, "yuv420p"
        for t in range(frames):
            frame = np.repeat(np.repeat(blocks[:, t : t + width // 8], 8, axis=0), 8, axis=1)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())


def describe(path: Path) -> dict:
    """Frames, size and codec of ``path``'s first video stream, and the file's size."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = stream.frames or sum(1 for packet in container.demux(stream) if packet.size)
        info = {"frames": frames, "width": stream.width, "height": stream.height, "codec": stream.codec_context.name}
    return {**info, "video_mib": path.stat().st_size / 2**20}


def load_video_module(revision: str | None):
    """``vim.data.video`` of the working tree (None), or the file as of a git ``revision`` loaded under another name."""
    if revision is None:
        import vim.data.video

        return vim.data.video
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{revision}:vim/data/video.py"], capture_output=True, text=True)
    if source.returncode != 0:
        raise RuntimeError(f"git show {revision}:vim/data/video.py failed: {source.stderr.strip()}")
    file = Path(tempfile.mkdtemp()) / f"video_{revision}.py"
    file.write_text(source.stdout)
    spec = importlib.util.spec_from_file_location(f"video_{revision}", file)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load {file} as a module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux


def measure(video: str, revision: str | None, mode: str, num_frames: int) -> dict:
    """Growth of this process's peak RSS (MiB) while one sample of ``video`` is read, and the seconds it took."""
    import av

    module = load_video_module(revision)
    clips = module.VideoClips([(video, 0)], num_frames=num_frames, transform=module.ToClip(), **MODES[mode])
    with av.open(video) as container:  # load PyAV and the codec before measuring: one frame, converted
        next(container.decode(video=0)).to_ndarray(format="rgb24")
    before = peak_mib()
    start = time.perf_counter()
    item = clips[0]
    seconds = time.perf_counter() - start
    if not isinstance(item, module.LoadedClip):
        raise RuntimeError(f"{video}: {item.reason}")
    return {"added_peak_mib": peak_mib() - before, "seconds": seconds, "clip_shape": list(item.clip.shape)}


def run_isolated(video: Path, revision: str | None, mode: str, num_frames: int) -> dict:
    """:func:`measure` in a fresh process (its peak is its own); a failure becomes ``{"error": ...}``."""
    command = [sys.executable, __file__, "--single", str(video), mode, str(num_frames)] + (
        ["--revision", revision] if revision else []
    )
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1][:200]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def environment() -> dict:
    """The machine (see :func:`benchmark_report.machine`; its device under ``machine``), PyAV and libavcodec."""
    import av

    described = machine("cpu")
    return {
        "machine": described.pop("device"),
        **described,
        "pyav": av.__version__,
        "libavcodec": ".".join(str(v) for v in av.library_versions.get("libavcodec", ())),
    }


def write_reports(results: list[dict], meta: dict, out: Path) -> None:
    """``out``.json (everything) and ``out``.md (peak memory and seconds per mode, before against after)."""
    write_json(out.with_suffix(".json"), meta=meta, results=results)
    settings = (
        f"{meta['date']}, {meta['machine']}, Python {meta['python']}, torch {meta['torch']}, PyAV {meta['pyav']}; "
        f"{meta['frames']} frames of {meta['width']}x{meta['height']} ({meta['codec']}, {meta['video_mib']:.0f} MiB file), "
        f"{meta['num_frames']}-frame clips. Peak = growth of the process's max RSS while reading the sample; "
        f"before = vim/data/video.py at {meta['before']}, after = this tree. Seconds from one run on a shared CPU."
    )
    by_key = {(r["version"], r["mode"]): r for r in results}

    def row(mode: str) -> list[str]:
        """The mode, the peak MiB before and after, the seconds before and after (or a run's error)."""
        cells = [mode]
        for key, fmt in (("added_peak_mib", ".0f"), ("seconds", ".2f")):
            for version in ("before", "after"):
                result = by_key.get((version, mode), {})
                cells.append(result["error"] if "error" in result else format(result[key], fmt) if key in result else "")
        return cells

    columns = ["mode", "before: peak MiB", "after: peak MiB", "before: s", "after: s"]
    rows = [row(mode) for mode in dict.fromkeys(r["mode"] for r in results)]
    table = markdown_table(columns, rows, right_aligned=columns[1:])
    title = "Video decoding: peak memory of reading one sample from a long video"
    write_markdown(out.with_suffix(".md"), title, [settings], table)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=1500)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--height", type=int, default=360)
    parser.add_argument("--codec", default="mpeg4", help="encoder of the generated video (mpeg4, libx264, ...)")
    parser.add_argument("--video", type=Path, help="an existing video to read instead of generating one")
    parser.add_argument("--num-frames", type=int, default=8, help="frames per clip")
    parser.add_argument("--modes", nargs="+", choices=sorted(MODES), default=list(MODES))
    parser.add_argument("--before", default="4ed84d1", help="git revision of the decoder to compare with")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "video_decode_memory")
    parser.add_argument("--single", nargs=3, metavar=("VIDEO", "MODE", "FRAMES"), help=argparse.SUPPRESS)
    parser.add_argument("--revision", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.single:
        print(json.dumps(measure(args.single[0], args.revision, args.single[1], int(args.single[2]))))
        return

    from tqdm import tqdm

    with tempfile.TemporaryDirectory() as scratch:
        video = args.video or Path(scratch) / f"long.{'mp4' if args.codec == 'libx264' else 'avi'}"
        if args.video is None:
            print(f"writing {args.frames} frames of {args.width}x{args.height} ({args.codec}) to {video}")
            write_long_video(video, args.frames, args.width, args.height, args.codec)
        runs = [(version, mode) for mode in args.modes for version in ("before", "after")]
        results = []
        for version, mode in tqdm(runs, desc="decode memory"):
            revision = args.before if version == "before" else None
            results.append({"version": version, "mode": mode, **run_isolated(video, revision, mode, args.num_frames)})
        meta = {**environment(), **describe(video), "num_frames": args.num_frames, "before": args.before}
    out = args.out if args.out.suffix == "" else args.out.with_suffix("")
    write_reports(results, meta, out)
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
