"""What an exported ONNX file is made of, block by block, and where onnxruntime spends its time running it.

Usage::

    python tools/onnx_graph_report.py vim_t.onnx                 # node histogram of each block and of the Scan body
    python tools/onnx_graph_report.py vim_t.onnx --profile 5     # and onnxruntime's kernel time per op type, 1 thread

The blocks are the model's top-level child modules as torch's exporter records them on each node (the name scope
metadata, e.g. ``layers.3``); blocks with the same histogram are printed once. ``--profile N`` runs N calls on a
random batch of 1 with onnxruntime's profiler (CPU, default graph optimisations, ``--threads``) and sums each op
type's kernel time per call: the ``Scan`` row is the whole loop, its body's ops are the ``(in Scan)`` rows.
"""

from __future__ import annotations

import argparse
import ast
import collections
import json
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

OUTSIDE = "(outside blocks)"


def block_of(node) -> str:
    """The block (top-level module scope, such as ``layers.3``) an ONNX node was exported from, or :data:`OUTSIDE`."""
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            scopes = ast.literal_eval(prop.value)
            return scopes[1] if len(scopes) > 2 else OUTSIDE
    return OUTSIDE


def loop_bodies(nodes: Iterable) -> list:
    """The body graphs of the ``Scan`` and ``Loop`` nodes among ``nodes``."""
    return [attr.g for node in nodes if node.op_type in ("Scan", "Loop") for attr in node.attribute if attr.name == "body"]


def block_histograms(graph) -> dict[str, collections.Counter]:
    """Op type counts of each block's nodes (loop bodies not included), in graph order."""
    histograms: dict[str, collections.Counter] = {}
    for node in graph.node:
        histograms.setdefault(block_of(node), collections.Counter())[node.op_type] += 1
    return histograms


def _format(histogram: collections.Counter) -> str:
    return f"{sum(histogram.values())} nodes: " + ", ".join(f"{op} {count}" for op, count in histogram.most_common())


def print_graph(model) -> None:
    """Each distinct block histogram (with the blocks that have it) and each distinct loop body's."""
    groups: dict[str, list[str]] = {}
    for block, histogram in block_histograms(model.graph).items():
        groups.setdefault(_format(histogram), []).append(block)
    print(f"{len(model.graph.node)} nodes at the top level")
    for text, blocks in groups.items():
        print(f"  {', '.join(blocks) if len(blocks) <= 3 else f'{blocks[0]} .. {blocks[-1]} ({len(blocks)} blocks)'}: {text}")
    bodies = collections.Counter(
        _format(collections.Counter(node.op_type for node in body.node)) for body in loop_bodies(model.graph.node)
    )
    for text, count in bodies.items():
        print(f"  loop body (x{count}): {text}")


def profile(path: Path, calls: int, threads: int, body_nodes: set[str]) -> collections.Counter:
    """onnxruntime's kernel microseconds per call, per op type (a body's ops marked ``(in Scan)``)."""
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        options.profile_file_prefix = str(Path(tmp) / "profile")
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        graph_input = session.get_inputs()[0]
        batch = np.random.default_rng(0).standard_normal((1, *graph_input.shape[1:])).astype(np.float32)
        for _ in range(calls):
            session.run(None, {graph_input.name: batch})
        events = json.loads(Path(session.end_profiling()).read_text())
    times: collections.Counter = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            node = event["name"].removesuffix("_kernel_time")
            inside = " (in Scan)" if node in body_nodes or node.split("/")[0] in body_nodes else ""
            times[event["args"]["op_name"] + inside] += event["dur"] / calls
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help="an .onnx file")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="profile N calls in onnxruntime")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--top", type=int, default=20, help="op types shown in the profile")
    args = parser.parse_args(argv)
    import onnx

    model = onnx.load(str(args.model))
    print_graph(model)
    if args.profile > 0:
        body_nodes = {node.name for body in loop_bodies(model.graph.node) for node in body.node}
        times = profile(args.model, args.profile, args.threads, body_nodes)
        total = sum(time for op, time in times.items() if op != "Scan")
        print(f"onnxruntime kernel time per call, {args.threads} thread(s): {total / 1e3:.1f} ms (Scan: the loop, body included)")
        for op, time in times.most_common(args.top):
            print(f"  {op:28s} {time / 1e3:8.2f} ms  {100 * time / total:5.1f} %")
    return 0


if __name__ == "__main__":
    sys.exit(main())
