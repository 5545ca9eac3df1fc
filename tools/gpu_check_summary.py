"""The summary of a ``tools/gpu_check.sh`` run: one line per result, from the files its stages wrote.

    python tools/gpu_check_summary.py OUTDIR --speed-pair vim_tiny_patch16_224 deit_tiny_patch16_224 \
        --training-pair vim_small_patch16_224 deit_small_patch16_224

Writes ``OUTDIR/summary.txt`` (and prints it): the machine and versions; each stage's exit status and
time; PASS/FAIL of the GPU tests with every failing test named; the Triton scan against the measured
copy bandwidth (the HBM roofline) per sequence length; Vim against DeiT at the largest image size
(inference images/s and peak memory) and in training. A missing file (a stage that failed or ran out
of time) gives a line that says so instead of a number.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import xml.etree.ElementTree as ElementTree
from pathlib import Path


def machine() -> list[str]:
    """Device, driver and versions."""
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    if torch.cuda.is_available():
        device = f"{torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).multi_processor_count} SMs)"
    else:
        device = f"CPU only ({platform.machine()}, {torch.get_num_threads()} threads)"
    driver = "no nvidia-smi"
    if shutil.which("nvidia-smi"):
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        driver = subprocess.run(query, capture_output=True, text=True).stdout.strip() or "unknown"
    return [
        f"device: {device}",
        f"driver: {driver}, CUDA {torch.version.cuda}",
        f"versions: torch {torch.__version__}, triton {triton_version}, python {platform.python_version()}",
    ]


def stage_statuses(out: Path) -> dict[str, tuple[str, str]]:
    """(exit status, seconds) of each stage, from stages.txt."""
    path = out / "stages.txt"
    rows = (line.split() for line in path.read_text().splitlines() if line.strip()) if path.exists() else ()
    return {name: (status, seconds) for name, status, seconds in rows}


def stages(out: Path) -> list[str]:
    """One line per stage: exit status and seconds."""
    lines = []
    for name, (status, seconds) in stage_statuses(out).items():
        verdict = {"0": "ok", "124": "TIMEOUT", "137": "KILLED"}.get(status, f"exit {status}")
        lines.append(f"stage {name}: {verdict} in {seconds} s (log: {name}.log)")
    return lines or ["FAIL stages: no stages.txt"]


def tests(out: Path, name: str) -> list[str]:
    """PASS/FAIL of a pytest run from its JUnit XML, with each failing test on its own line."""
    path = out / f"{name}.xml"
    if not path.exists():
        return [f"FAIL {name}: no report (the stage did not finish; see {name}.log)"]
    cases = ElementTree.parse(path).getroot().iter("testcase")
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    failures = []
    for case in cases:
        if case.get("name") is None:  # the test an interrupt stopped
            continue
        test = f"{case.get('classname')}::{case.get('name')}"
        if case.find("failure") is not None or case.find("error") is not None:
            counts["failed"] += 1
            failures.append(f"FAIL {test}")
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    ran = counts["passed"] + counts["failed"]
    interrupted = stage_statuses(out).get(name, ("0",))[0] in ("124", "137")
    verdict = "FAIL" if counts["failed"] or interrupted else "PASS" if ran else "SKIP"
    summary = ", ".join(f"{n} {k}" for k, n in counts.items())
    if interrupted:
        summary += " before the stage ran out of time: the rest did not run"
    elif not ran:
        summary += " (nothing ran: no CUDA device)"
    return [f"{verdict} {name}: {summary}", *failures]


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def scan(out: Path) -> list[str]:
    """The Triton scan (or, on CPU, each backend) per length: ms, effective GB/s and the fraction of the copy bandwidth."""
    found = _load(out / "scan_cuda.json") or _load(out / "scan_cpu.json")
    if found is None:
        return ["scan benchmark: no results (see bench_scan.log)"]
    meta = found["meta"]
    roofline = meta.get("copy_bandwidth_GBps")
    lines = [f"scan benchmark: dim {meta['dim']}, N {meta['state']}, {meta['dtype']}, batch {meta['batch']}"]
    lines.append(f"copy bandwidth (roofline): {roofline:.0f} GB/s" if roofline else "copy bandwidth: not measured (no GPU)")
    for row in found["results"]:
        parts = [f"scan {row['backend']} L={row['length']} batch {row['batch']}:"]
        for phase, label in (("forward", "fwd"), ("forward_backward", "fwd+bwd")):
            part = f"{label} {row[f'{phase}_ms']:.3g} ms, {row[f'{phase}_GBps']:.3g} GB/s"
            if f"{phase}_roofline_fraction" in row:
                part += f" = {row[f'{phase}_roofline_fraction']:.0%} of roofline"
            parts.append(part + ";")
        lines.append(" ".join(parts).rstrip(";"))
    return lines


MODES = ("inference", "training")
HIERARCHICAL_PAIRS = ("vmamba_tiny_s1l8", "swin_tiny_patch4_window7_224", "mambavision_tiny", "convnext_tiny")


def _rows(found: dict | None, model: str, mode: str) -> dict[int, dict]:
    """Successful results of one model and mode by image size."""
    if found is None:
        return {}
    return {r["size"]: r for r in found["results"] if r["model"] == model and r["mode"] == mode and r["status"] == "ok"}


def _speed_and_memory(result: dict) -> str:
    if result["status"] != "ok":
        return result["status"]
    peak = result["peak_memory_mib"]
    return f"{result['images_per_s']:.1f} images/s, peak memory " + ("not measured" if peak is None else f"{peak:.0f} MiB")


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "n/a"


def models(out: Path, speed_pair: list[str], training_pair: list[str]) -> list[str]:
    """Vim against DeiT: every inference size, the ratios at the largest one, and training."""
    inference, training = _load(out / "models_inference.json"), _load(out / "models_training.json")
    lines = []
    if inference is None:
        lines.append("model inference benchmark: no results (see bench_models_inference.log)")
    else:
        for r in inference["results"]:
            lines.append(f"inference {r['model']} {r['size']} px batch {r.get('batch')}: {_speed_and_memory(r)}")
        vim, deit = (_rows(inference, model, "inference") for model in speed_pair)
        common = sorted(vim.keys() & deit.keys())
        if common:
            size = common[-1]
            speed = _ratio(vim[size]["images_per_s"], deit[size]["images_per_s"])
            memory = _ratio(vim[size]["peak_memory_mib"], deit[size]["peak_memory_mib"])
            pair = f"{speed_pair[0]} vs {speed_pair[1]}"
            lines.append(f"RATIO {pair} at {size} px inference: {speed} images/s, {memory} peak memory")
        else:
            lines.append(f"RATIO {speed_pair[0]} vs {speed_pair[1]}: no size where both ran")
    if training is None:
        lines.append("model training benchmark: no results (see bench_models_training.log)")
    else:
        vim, deit = (_rows(training, model, "training") for model in training_pair)
        for model, rows in zip(training_pair, (vim, deit)):
            lines += [f"training {model} {size} px batch {r['batch']}: {_speed_and_memory(r)}" for size, r in rows.items()]
        common = sorted(vim.keys() & deit.keys())
        if common:
            size = common[0]
            speed = _ratio(vim[size]["images_per_s"], deit[size]["images_per_s"])
            lines.append(f"RATIO {training_pair[0]} vs {training_pair[1]} training at {size} px: {speed} images/s")
        else:
            lines.append(f"RATIO {training_pair[0]} vs {training_pair[1]} training: no size where both ran")
    return lines


def hierarchical(out: Path, pairs: list[str]) -> list[str]:
    """The hierarchical families against the models a user would pick instead (VMamba-T vs Swin-T, MambaVision-T vs
    ConvNeXt-T; ``pairs`` flat, two names a pair): images/s of each, and the ratio, per mode at 224 px."""
    found = _load(out / "models_hierarchical.json")
    if found is None:
        return ["hierarchical model benchmark: no results (see bench_hierarchical.log)"]
    lines = [f"{r['mode']} {r['model']} {r['size']} px batch {r.get('batch')}: {_speed_and_memory(r)}" for r in found["results"]]
    for ours, theirs in zip(pairs[::2], pairs[1::2]):
        for mode in MODES:
            a, b = _rows(found, ours, mode), _rows(found, theirs, mode)
            for size in sorted(a.keys() & b.keys()):
                speed = _ratio(a[size]["images_per_s"], b[size]["images_per_s"])
                lines.append(f"RATIO {ours} vs {theirs} {mode} at {size} px: {speed} images/s")
    return lines


def cross_scan(out: Path) -> list[str]:
    """The 4-direction scan in one launch against cross-scan copies + scan + merge: both times and the speed-up."""
    found = _load(out / "cross_scan_cuda.json") or _load(out / "cross_scan_cpu.json")
    if found is None:
        return ["cross scan benchmark: no results (see bench_cross_scan.log)"]
    return [
        f"RATIO cross scan stage {r['stage']} ({r['grid']}, dim {r['dim']}) {r['backend']}: one launch "
        f"{r['fused_forward_ms']:.3g} / {r['fused_forward_backward_ms']:.3g} ms vs copies {r['copy_forward_ms']:.3g} / "
        f"{r['copy_forward_backward_ms']:.3g} ms (fwd / fwd+bwd): {r['forward_speedup']:.2f}x / "
        f"{r['forward_backward_speedup']:.2f}x"
        for r in found["results"]
    ]


def resources(out: Path) -> list[str]:
    """The Triton kernel variants compiled for sm_80/sm_90 on this machine's Triton: spills and registers."""
    found = _load(out / "triton_resources.json")
    if found is None:
        return ["triton resources: no results (see triton_resources.log)"]
    variants = found["variants"]
    spilling = [v for v in variants if v["stack_bytes"] or v["local_bytes"]]
    verdict = "FAIL" if spilling else "PASS"
    most = max(variants, key=lambda v: v["registers"])
    line = f"{verdict} triton resources (triton {found['meta']['triton']}): {len(variants)} variants, {len(spilling)} spill"
    line += f"; most registers {most['registers']} ({most['kernel']} {most['size']} {most['dtype']} sm_{most['arch']})"
    return [line]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--speed-pair", nargs=2, default=["vim_tiny_patch16_224", "deit_tiny_patch16_224"])
    parser.add_argument("--training-pair", nargs=2, default=["vim_small_patch16_224", "deit_small_patch16_224"])
    parser.add_argument("--hierarchical-pairs", nargs="+", default=list(HIERARCHICAL_PAIRS), help="ours theirs ...")
    args = parser.parse_args(argv)
    if len(args.hierarchical_pairs) % 2:
        parser.error("--hierarchical-pairs takes pairs: ours theirs [ours theirs ...]")
    lines = [
        *machine(),
        *stages(args.out),
        *tests(args.out, "gpu_tests"),
        *resources(args.out),
        *scan(args.out),
        *models(args.out, args.speed_pair, args.training_pair),
        *hierarchical(args.out, args.hierarchical_pairs),
        *cross_scan(args.out),
    ]
    text = "\n".join(lines) + "\n"
    (args.out / "summary.txt").write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
