"""onnxruntime and AOTInductor against PyTorch eager and torch.compile on the same CPU: samples/s of exported backbones.

Usage::

    python tools/bench_deploy.py   # Vim-Ti at 224 and 512 px, VideoMamba-Ti at 8 frames of 224 px, VMamba-T; batch 1
    python tools/bench_deploy.py --threads 1 2 --rounds 2   # both thread counts, interleaved
    python tools/bench_deploy.py --configs test_vim:32 test_videomamba:4x32 --iters 2 --out-dir /tmp/bench   # tiny

A configuration is ``model:size``: ``vim_tiny_patch16_224:512`` (images of 512 px), ``videomamba_tiny:8x224``
(clips of 8 frames of 224 px) or ``pointmamba_small:1024`` (clouds of 1024 points). For each, the model
(random weights, classifier kept) is exported once for each runtime that runs a file and timed on the same batch in
every runtime, each in a fresh process (so that no runtime's threads or caches disturb another's):

* ``onnxruntime``: the file :func:`vim.deploy.export_onnx` wrote (the scan as an ONNX ``Scan`` loop over chunks of
  steps), CPU execution provider, onnxruntime's default session options (all graph optimisations);
* ``aoti``: the package :func:`vim.deploy.export_aoti` compiled (vim's ops decomposed as for ONNX, the scan loop a
  ``while_loop`` in C++: it runs without vim), loaded with ``torch._inductor.aoti_load_package``;
* ``eager``: the PyTorch model (the scan through vim's op, whose CPU kernel is the fused C scan);
* ``compile``: ``torch.compile(model)`` (Inductor; the scan op is called as is), after a compiling call.

Every runtime gets the same number of threads; ``--threads 1 2`` measures each count. On a machine shared with other
jobs the load changes from minute to minute, so ``--rounds`` repeats the whole sequence (every thread count and
runtime, eager first) that many times, interleaved, and a row's rate is the batch size over the median of all its
rounds' ``--iters`` timed calls (each after ``--warmup`` untimed ones); each row also records the highest load average
seen while it ran. Also recorded: each export's time and file size, the compile time, and each runtime's largest
difference from eager's outputs.

Writes ``benchmarks/deploy_cpu.{json,md}`` (``--out-dir``, ``--tag``) with the machine, the library
versions and the date, rewritten after every configuration (an interrupted run keeps what it measured).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import os
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

DEFAULT_CONFIGS = ["vim_tiny_patch16_224:224", "vim_tiny_patch16_224:512", "videomamba_tiny:8x224", "vmamba_tiny_s1l8:224"]
RUNTIMES = ("onnxruntime", "aoti", "eager", "compile")
EXPORTED = {"onnxruntime": "model.onnx", "aoti": "model.pt2"}
"""The runtimes that run an exported file, and its name in the work folder."""
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


def call_seconds(run: Callable[[], object], warmup: int, iters: int) -> list[float]:
    """Seconds of each of ``iters`` timed calls of ``run`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


def export(config: str, runtime: str, workdir: Path) -> dict:
    """The configuration's model exported for ``runtime`` to ``workdir`` (:func:`vim.deploy.export_onnx`, or
    :func:`vim.deploy.export_aoti` with vim's ops decomposed, a package that runs without vim), and the cost."""
    from vim.deploy import export_aoti, export_onnx

    torch.manual_seed(0)  # the same random weights in every runtime's process
    model, sample = build(*parse_config(config))
    start = time.perf_counter()
    if runtime == "onnxruntime":
        path = export_onnx(model, workdir / EXPORTED[runtime], input_size=sample, progress=False)
    else:
        path = export_aoti(model, workdir / EXPORTED[runtime], input_size=sample, progress=False)
    return dict(export_s=time.perf_counter() - start, file_mib=path.stat().st_size / 2**20)


def prepare(runtime: str, model: TimmBackbone, batch: torch.Tensor, threads: int, workdir: Path) -> tuple[Callable, dict]:
    """A call of ``runtime`` on ``batch`` returning its outputs as an array, and what preparing it cost."""
    if runtime == "onnxruntime":
        import onnxruntime as ort

        options = ort.SessionOptions()  # graph optimisations: onnxruntime's default, all of them
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        session = ort.InferenceSession(str(workdir / "model.onnx"), options, providers=["CPUExecutionProvider"])
        feed = {model.modality: batch.numpy()}  # the graph's input is named after it
        return (lambda: session.run(None, feed)[0]), {}
    if runtime == "aoti":
        package = torch._inductor.aoti_load_package(str(workdir / EXPORTED[runtime]))

        def run_package() -> np.ndarray:
            with torch.inference_mode():
                return package(batch).numpy()

        return run_package, {}
    module = model if runtime == "eager" else torch.compile(model)

    def call() -> np.ndarray:
        with torch.inference_mode():
            return module(batch).numpy()

    start = time.perf_counter()
    call()  # compiles under torch.compile
    return call, dict(compile_s=time.perf_counter() - start) if runtime == "compile" else {}


def measure(config: str, runtime: str, threads: int, args: argparse.Namespace, workdir: Path) -> dict:
    """One runtime on one configuration at ``threads`` threads, in a process of its own: its call times and preparation
    cost; its outputs are saved to ``workdir/<runtime>.npy``."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)  # the same random weights in every runtime's process
    model, sample = build(*parse_config(config))
    batch = torch.randn(args.batch, *sample, generator=torch.Generator().manual_seed(1))
    call, info = prepare(runtime, model, batch, threads, workdir)
    load = os.getloadavg()[0]
    times = call_seconds(call, args.warmup, args.iters)
    np.save(workdir / f"{runtime}.npy", call())
    return dict(times=times, load=max(load, os.getloadavg()[0]), unit=UNITS[model.modality], input=list(sample), **info)


def in_fresh_process(function: Callable, *arguments) -> dict:
    """``function(*arguments)`` in a process of its own (no runtime's threads or caches disturb another's)."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(function, *arguments).result()


def measure_config(config: str, args: argparse.Namespace, bar: tqdm) -> list[dict]:
    """One row per thread count and runtime: the export once, then ``--rounds`` rounds that each run every thread count
    and runtime once (interleaved, so that a change of the machine's load touches them alike), each in a fresh process.
    A row's time is the median of all its rounds' calls; its load, the highest load average seen while it ran."""
    name, sizes = parse_config(config)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        exported: dict[str, dict] = {}
        for runtime in (runtime for runtime in EXPORTED if runtime in args.runtimes):
            bar.set_postfix_str(f"{config}: export for {runtime}")
            try:
                exported[runtime] = in_fresh_process(export, config, runtime, workdir)
            except Exception as error:  # recorded, so that the other runtimes still run
                exported[runtime] = dict(status=_failure(error))
        found: dict[tuple[int, str], list[dict]] = {}
        for _ in range(args.rounds):
            for threads in args.threads:
                for runtime in sorted(args.runtimes, key=lambda runtime: runtime != "eager"):  # eager's outputs first
                    bar.set_postfix_str(f"{config}: {runtime}, {threads} threads")
                    if "status" in exported.get(runtime, {}):
                        result = dict(status=exported[runtime]["status"])
                    else:
                        try:
                            result = in_fresh_process(measure, config, runtime, threads, args, workdir)
                            result["max_abs_diff_vs_eager"] = _difference(workdir, runtime)
                        except Exception as error:
                            result = dict(status=_failure(error))
                    found.setdefault((threads, runtime), []).append(result)
                    bar.update()
    rows = [
        _row(name, sizes, threads, runtime, results, args, exported.get(runtime, {}))
        for (threads, runtime), results in found.items()
    ]
    for row in rows:
        eager = [other for other in rows if other["threads"] == row["threads"] and other["runtime"] == "eager"]
        if row["status"] == "ok" and eager and eager[0]["status"] == "ok":
            row["x_eager"] = row["rate"] / eager[0]["rate"]
    return rows


def _failure(error: Exception) -> str:
    return f"failed: {type(error).__name__}: {error}".replace("\n", " ")[:300]


def _difference(workdir: Path, runtime: str) -> float | None:
    """The largest difference of ``runtime``'s outputs from eager's, once eager has run in this configuration."""
    if not (workdir / "eager.npy").exists():
        return None
    return float(np.abs(np.load(workdir / f"{runtime}.npy") - np.load(workdir / "eager.npy")).max())


def _row(name: str, sizes: list[int], threads: int, runtime: str, results: list[dict], args, exported: dict) -> dict:
    """One runtime's row from its rounds' results (failed if any round failed)."""
    failed = [result["status"] for result in results if "status" in result]
    row = dict(model=name, input=sizes, batch=args.batch, threads=threads, runtime=runtime)
    if failed:
        return dict(row, status=failed[0])
    seconds = statistics.median(t for result in results for t in result["times"])
    differences = [result["max_abs_diff_vs_eager"] for result in results if result["max_abs_diff_vs_eager"] is not None]
    info = exported or {k: v for k, v in results[0].items() if k == "compile_s"}
    return dict(
        row,
        input=results[0]["input"],
        status="ok",
        median_ms=seconds * 1e3,
        rate=args.batch / seconds,
        unit=results[0]["unit"],
        load=max(result["load"] for result in results),
        max_abs_diff_vs_eager=max(differences) if differences else None,
        **info,
    )


def environment(args: argparse.Namespace) -> dict:
    """The machine (see :func:`benchmark_report.machine`; its device under ``machine``), onnx, onnxruntime, settings."""
    described = machine("cpu", max(args.threads))
    return dict(
        machine=described.pop("device"),
        **described,
        threads=args.threads,
        onnx=version("onnx"),
        onnxruntime=version("onnxruntime"),
        batch=args.batch,
        rounds=args.rounds,
        warmup=args.warmup,
        iters=args.iters,
    )


def _number(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _prepared(row: dict) -> str:
    """What preparing the runtime cost: the export (ONNX file or AOTInductor package), or the compile."""
    if "export_s" in row:
        kind = "ONNX" if row["runtime"] == "onnxruntime" else "AOTInductor"
        return f"{kind} export {row['export_s']:.0f} s, {row['file_mib']:.1f} MiB"
    if "compile_s" in row:
        return f"compile {row['compile_s']:.0f} s"
    return ""


def write_markdown_table(path: Path, env: dict, rows: list[dict]) -> None:
    """A table of each runtime's rate and difference from eager per configuration, under the machine and settings."""
    settings = (
        f"Machine: {env['machine']} (each runtime the same) · load average {env['load_average']} at the start (per row: the "
        "highest 1-minute load average seen while it ran) · "
        f"torch {env['torch']} · "
        f"onnx {env['onnx']} · onnxruntime {env['onnxruntime']} · timm {env['timm']} · python {env['python']} · "
        f"fp32 · batch {env['batch']} · median of {env['rounds']} interleaved rounds of {env['iters']} timed calls after "
        f"{env['warmup']} warm-up · {env['date']}"
    )
    cells = []
    for row in rows:
        first = [row["model"], "x".join(map(str, row["input"])), str(row["threads"]), row["runtime"]]
        if row["status"] != "ok":
            cells.append([*first, row["status"], "", "", "", "", ""])
            continue
        cells.append(
            [
                *first,
                f"{row['rate']:.2f} {row['unit']}",
                f"{row['median_ms']:.1f}",
                _number(row.get("x_eager"), ".2f"),
                _number(row.get("max_abs_diff_vs_eager"), ".1e"),
                f"{row['load']:.1f}",
                _prepared(row),
            ]
        )
    columns = ["model", "input", "threads", "runtime", "rate", "ms / batch", "x eager", "max abs diff vs eager", "load"]
    columns.append("prepare")
    table = markdown_table(columns, cells, right_aligned=columns[4:9])
    title = "Exported vim backbones: onnxruntime and AOTInductor vs PyTorch eager and torch.compile (CPU)"
    write_markdown(path, title, [settings], table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS, help="model:SIZE or model:FRAMESxSIZE")
    parser.add_argument("--runtimes", nargs="+", choices=RUNTIMES, default=list(RUNTIMES))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per runtime")
    parser.add_argument("--iters", type=int, default=10, help="timed calls per runtime")
    parser.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()], help="thread counts, each runtime")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds of every thread count and runtime")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parents[1] / "benchmarks")
    parser.add_argument("--tag", default="cpu", help="output file suffix")
    args = parser.parse_args(argv)
    for config in args.configs:
        try:
            parse_config(config)
        except argparse.ArgumentTypeError as error:
            parser.error(str(error))
    if min(args.batch, args.iters, args.rounds, *args.threads) < 1 or args.warmup < 0:
        parser.error("--batch, --iters, --rounds and --threads must be positive, --warmup not negative")

    env = environment(args)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"deploy_{args.tag}"
    rows: list[dict] = []
    runs = len(args.configs) * args.rounds * len(args.threads) * len(args.runtimes)
    with tqdm(total=runs, desc="benchmark", unit="run") as bar:
        for config in args.configs:
            rows += measure_config(config, args, bar)
            write_json(stem.with_suffix(".json"), environment=env, results=rows)
            write_markdown_table(stem.with_suffix(".md"), env, rows)
    print(f"wrote {stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
