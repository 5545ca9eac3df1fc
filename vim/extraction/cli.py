"""``vimkit extract``: the command line of :func:`~vim.extraction.api.extract`, and what it prints."""

from __future__ import annotations

import argparse
import json
from typing import Any

from lightning.pytorch.utilities import rank_zero_only

from vim.data.modalities import MODALITIES
from vim.data.workers import default_num_workers

from .api import extract
from .loop import STRATEGIES
from .manifest import FORMATS, MANIFEST

__all__ = ["command_parser", "main"]


def _weights_and_inputs(parser: argparse.ArgumentParser) -> None:
    """The model, its weights, the inputs and the output folder."""
    parser.add_argument("--model", help="timm model name (optional with a Lightning .ckpt, which records it)")
    parser.add_argument(
        "--checkpoint",
        help="weights: .safetensors / .pth, or a Lightning .ckpt from vimkit fit (default: the model tag's released weights)",
    )
    parser.add_argument("--random-weights", action="store_true", help="without --checkpoint: seeded random weights")
    parser.add_argument("--seed", type=int, default=0, help="seed of --random-weights")
    parser.add_argument("--model-kwargs", type=json.loads, default=None, help="JSON timm arguments, e.g. '{\"img_size\": 32}'")
    parser.add_argument(
        "--input", required=True, help="folder, list file (.txt/.lst/.csv), HDF5 file of point clouds, or one file"
    )
    parser.add_argument("--out", required=True, help="output folder (a rerun resumes it)")
    parser.add_argument("--modality", choices=sorted(MODALITIES), help="expected modality (default: from the file extensions)")
    parser.add_argument(
        "--num-points", type=int, default=None, help="points per cloud (default: a .ckpt's data.num_points, else the model's)"
    )


def _features_and_processes(parser: argparse.ArgumentParser) -> None:
    """What is written, in which shards, and on which devices."""
    parser.add_argument("--tokens", action="store_true", help="also write the final per-token features")
    parser.add_argument(
        "--layers", type=int, nargs="+", default=None, help="also write the per-token features after these blocks"
    )
    parser.add_argument("--format", choices=FORMATS, default="npy")
    parser.add_argument("--shard-size", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--num-workers", type=int, default=None,
        help="loader processes of each device's process (default: one per core they leave free, at most 8)",
    )  # fmt: skip
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, mps, ... (default: a GPU if there is one)")
    parser.add_argument("--devices", type=int, default=1, help="processes per node, one device each (DDP when more than 1)")
    parser.add_argument("--num-nodes", "--num_nodes", type=int, default=1, help="nodes (each runs this command; see README)")
    parser.add_argument("--strategy", choices=STRATEGIES, default="auto", help="Lightning strategy (default: DDP for several)")


def command_parser() -> argparse.ArgumentParser:
    """The argument parser of ``vimkit extract``."""
    parser = argparse.ArgumentParser(
        prog="vimkit extract", description="Extract features of images, video clips or point clouds."
    )
    _weights_and_inputs(parser)
    _features_and_processes(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    """``vimkit extract --model NAME [--checkpoint FILE] --input PATH --out DIR [options]``."""
    args = command_parser().parse_args(argv)
    num_workers = default_num_workers(processes=args.devices) if args.num_workers is None else args.num_workers
    manifest = extract(
        args.model, args.input, args.out, checkpoint=args.checkpoint, model_kwargs=args.model_kwargs, modality=args.modality,
        tokens=args.tokens, layers=args.layers, format=args.format, shard_size=args.shard_size, batch_size=args.batch_size,
        num_workers=num_workers, device=args.device, num_points=args.num_points, random_weights=args.random_weights,
        seed=args.seed, devices=args.devices, num_nodes=args.num_nodes, strategy=args.strategy,
    )  # fmt: skip
    _report(manifest, args.out)


@rank_zero_only
def _report(manifest: dict[str, Any], out: str) -> None:
    """What ``vimkit extract`` prints (once, by rank 0)."""
    failed = manifest["failed"]
    print(f"Features of {manifest['num_rows']} inputs in {out} ({len(manifest['shards'])} shards, manifest {MANIFEST})")
    if failed:
        print(f"{len(failed)} inputs failed (listed in the manifest), e.g. {failed[0]['input']}: {failed[0]['reason']}")
