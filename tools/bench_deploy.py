"""onnxruntime against PyTorch eager and torch.compile on the same CPU: samples/s of exported vim backbones.

Usage::

    python tools/bench_deploy.py        # Vim-Ti at 224 and 512 px, VideoMamba-Ti at 8 frames of 224 px; batch 1
    python tools/bench_deploy.py --configs test_vim:32 test_videomamba:4x32 --iters 2 --out-dir /tmp/bench   # tiny

A configuration is ``model:size``: ``vim_tiny_patch16_224:512`` (images of 512 px), ``videomamba_tiny:8x224``
(clips of 8 frames of 224 px) or ``pointmamba_small:1024`` (clouds of 1024 points). For each, the model
(random weights, classifier kept) is timed on the same batch in three runtimes, each in a fresh process
(so that no runtime's threads or caches disturb another's):

* ``onnxruntime``: the model exported by :func:`vim.deploy.export_onnx` (the scan as an ONNX ``Scan`` loop),
  CPU execution provider, all graph optimisations;
* ``eager``: the PyTorch model (the scan through vim's op, whose CPU kernel is the fused C scan);
* ``compile``: ``torch.compile(model)`` (Inductor; the scan op is called as is), after a compiling call.

Every runtime gets the same number of threads (``--threads``, default torch's; on a machine shared with
other jobs, 1 is far steadier: idle-waiting threads of a busy core slow everything). The rate is the batch
size over the median of ``--iters`` timed calls after ``--warmup`` untimed ones. Also recorded: the ONNX
export time and file size, the compile time, and each runtime's largest difference from eager's outputs.

Writes ``benchmarks/deploy_cpu.{json,md}`` (``--out-dir``, ``--tag``) with the machine, the library
versions and the date, rewritten after every configuration (an interrupted run keeps what it measured).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from benchmark_report import machine, markdown_table, version, write_json, write_markdown
from tqdm import tqdm

if TYPE_CHECKING:  # for annotations: vim is imported inside the functions that use it
    from vim.models.timm_api import TimmBackbone

DEFAULT_CONFIGS = ["vim_tiny_patch16_224:224", "vim_tiny_patch16_224:512", "videomamba_tiny:8x224"]
RUNTIMES = ("onnxruntime", "eager", "compile")
UNITS = {"images": "images/s", "video": "clips/s", "points": "clouds/s"}


def parse_config(config: str) -> tuple[str, list[int]]:
    """``model:size`` -> (model, [size]) or ``model:TxS`` -> (model, [T, S])."""
    name, _, size = config.partition(":")
    try:
        sizes = [int(part) for part in size.split("x")]
    except ValueError:
        sizes = []
    if not name or len(sizes) not in (1, 2) or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"configuration {config!r}: expected model:SIZE or model:FRAMESxSIZE")
    return name, sizes


def build(name: str, sizes: list[int]) -> tuple[TimmBackbone, tuple[int, ...]]:
    """The model (random weights, eval mode) at the configuration's size, and one sample's input shape."""
    from vim.deploy import load_model, nominal_input_size, set_input_size

    model = load_model(name)
    if model.modality == "points":
        set_input_size(model, num_points=sizes[-1])
    elif model.modality == "video" and len(sizes) == 2:
        set_input_size(model, num_frames=sizes[0], img_size=sizes[1])
    else:
        set_input_size(model, img_size=sizes[-1])
    return model, nominal_input_size(model)


def median_seconds(run: Callable[[], object], warmup: int, iters: int) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def prepare(runtime: str, model: TimmBackbone, batch: torch.Tensor, threads: int, workdir: Path) -> tuple[Callable, dict]:
    """A call of ``runtime`` on ``batch`` returning its outputs as an array, and what preparing it cost."""
    if runtime == "onnxruntime":
        import onnxruntime as ort

        from vim.deploy import export_onnx

        start = time.perf_counter()
        path = export_onnx(model, workdir / "model.onnx", input_size=tuple(batch.shape[1:]), progress=False)
        exported = time.perf_counter() - start
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {model.modality: batch.numpy()}  # the graph's input is named after it
        return (lambda: session.run(None, feed)[0]), dict(export_s=exported, onnx_mib=path.stat().st_size / 2**20)
    module = model if runtime == "eager" else torch.compile(model)

    def call() -> np.ndarray:
        with torch.inference_mode():
            return module(batch).numpy()

    start = time.perf_counter()
    call()  # compiles under torch.compile
    return call, dict(compile_s=time.perf_counter() - start) if runtime == "compile" else {}


def measure(config: str, runtime: str, args: argparse.Namespace, workdir: Path) -> dict:
    """One runtime on one configuration, in a process of its own; its outputs are saved to ``workdir/<runtime>.npy``."""
    torch.set_num_threads(args.threads)
    name, sizes = parse_config(config)
    torch.manual_seed(0)  # the same random weights in every runtime's process
    model, sample = build(name, sizes)
    batch = torch.randn(args.batch, *sample, generator=torch.Generator().manual_seed(1))
    call, info = prepare(runtime, model, batch, args.threads, workdir)
    seconds = median_seconds(call, args.warmup, args.iters)
    np.save(workdir / f"{runtime}.npy", call())
    row = dict(model=name, input=list(sample), batch=args.batch, runtime=runtime, status="ok", median_ms=seconds * 1e3)
    return dict(row, rate=args.batch / seconds, unit=UNITS[model.modality], **info)


def measure_config(config: str, args: argparse.Namespace, bar: tqdm) -> list[dict]:
    """One row per runtime, each measured in a fresh process (no runtime's threads or caches disturb another's)."""
    rows = []
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as workdir:
        for runtime in args.runtimes:
            bar.set_postfix_str(f"{config}: {runtime}")
            with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
                try:
                    rows.append(pool.submit(measure, config, runtime, args, Path(workdir)).result())
                except Exception as error:  # recorded, so that one runtime cannot lose the others
                    name, sizes = parse_config(config)
                    failure = f"failed: {type(error).__name__}: {error}".replace("\n", " ")[:300]
                    rows.append(dict(model=name, input=sizes, runtime=runtime, status=failure))
            bar.update()
        eager_rows = [row for row in rows if row["runtime"] == "eager" and row["status"] == "ok"]
        if eager_rows:
            reference = np.load(Path(workdir) / "eager.npy")
            for row in rows:
                if row["status"] == "ok":
                    row["x_eager"] = row["rate"] / eager_rows[0]["rate"]
                    row["max_abs_diff_vs_eager"] = float(
                        np.abs(np.load(Path(workdir) / f"{row['runtime']}.npy") - reference).max()
                    )
    return rows


def environment(args: argparse.Namespace) -> dict:
    """The machine (see :func:`benchmark_report.machine`; its device under ``machine``), onnx, onnxruntime, settings."""
    described = machine("cpu", args.threads)
    return dict(
        machine=described.pop("device"),
        **described,
        threads=args.threads,
        onnx=version("onnx"),
        onnxruntime=version("onnxruntime"),
        batch=args.batch,
        warmup=args.warmup,
        iters=args.iters,
    )


def _number(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _prepared(row: dict) -> str:
    """What preparing the runtime cost: the ONNX export, or the compile."""
    if "export_s" in row:
        return f"ONNX export {row['export_s']:.0f} s, {row['onnx_mib']:.1f} MiB"
    if "compile_s" in row:
        return f"compile {row['compile_s']:.0f} s"
    return ""


def write_markdown_table(path: Path, env: dict, rows: list[dict]) -> None:
    """A table of each runtime's rate and difference from eager per configuration, under the machine and settings."""
    settings = (
        f"Machine: {env['machine']} (each runtime the same) · load average {env['load_average']} at the start · "
        f"torch {env['torch']} · "
        f"onnx {env['onnx']} · onnxruntime {env['onnxruntime']} · timm {env['timm']} · python {env['python']} · "
        f"fp32 · batch {env['batch']} · median of {env['iters']} timed calls after {env['warmup']} warm-up · {env['date']}"
    )
    cells = []
    for row in rows:
        first = [row["model"], "x".join(map(str, row["input"])), row["runtime"]]
        if row["status"] != "ok":
            cells.append([*first, row["status"], "", "", "", ""])
            continue
        cells.append(
            [
                *first,
                f"{row['rate']:.2f} {row['unit']}",
                f"{row['median_ms']:.1f}",
                _number(row.get("x_eager"), ".2f"),
                _number(row.get("max_abs_diff_vs_eager"), ".1e"),
                _prepared(row),
            ]
        )
    columns = ["model", "input", "runtime", "rate", "ms / batch", "x eager", "max abs diff vs eager", "prepare"]
    table = markdown_table(columns, cells, right_aligned=columns[3:7])
    title = "Exported vim backbones: onnxruntime vs PyTorch eager and torch.compile (CPU)"
    write_markdown(path, title, [settings], table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, help="model:SIZE or model:FRAMESxSIZE")
    parser.add_argument("--runtimes", nargs="+", choices=RUNTIMES, default=list(RUNTIMES))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per runtime")
    parser.add_argument("--iters", type=int, default=10, help="timed calls per runtime")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="threads of every runtime")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parents[1] / "benchmarks")
    parser.add_argument("--tag", default="cpu", help="output file suffix")
    args = parser.parse_args(argv)
    for config in args.configs:
        try:
            parse_config(config)
        except argparse.ArgumentTypeError as error:
            parser.error(str(error))
    if min(args.batch, args.iters, args.threads) < 1 or args.warmup < 0:
        parser.error("--batch, --iters and --threads must be positive, --warmup not negative")

    torch.set_num_threads(args.threads)
    env = environment(args)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"deploy_{args.tag}"
    rows: list[dict] = []
    with tqdm(total=len(args.configs) * len(args.runtimes), desc="benchmark", unit="run") as bar:
        for config in args.configs:
            rows += measure_config(config, args, bar)
            write_json(stem.with_suffix(".json"), environment=env, results=rows)
            write_markdown_table(stem.with_suffix(".md"), env, rows)
    print(f"wrote {stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
