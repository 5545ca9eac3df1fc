"""Segmentation forward speed at 512 x 512: UperNet on Vim-Ti (``vim.dense.segmentation.UPerNet``, the simple feature
pyramid from blocks 5 / 11 / 17 / 23, as Vim's ADE20K config) against UperNet on Swin-T (timm's backbone through
smp's ``tu-`` encoder), both with 150 classes and a decoder of the same width.

    python tools/bench_segmentation.py                      # batch 1, decoder 512, 5 interleaved rounds
    python tools/bench_segmentation.py --batch 2 --decoder-channels 192
    python tools/bench_segmentation.py --vim test_vim --layers 0 1 2 3 --vim-kwargs '{"stride": 16}' --other resnet18 --size 64

The models alternate within each round (A, B, A, B, ...), so a change in the machine's load reaches both; each
round's time is a median over repeated calls, and the table gives the median over rounds (images per second) and
the ratio. Random weights (speed does not depend on them); eval mode, no gradients.

Writes ``benchmarks/segmentation_<device>.{json,md}`` with the machine, versions, date and load.
"""

from __future__ import annotations

import argparse
import json
import statistics
from functools import partial
from pathlib import Path
from typing import Any

import segmentation_models_pytorch as smp
import torch
from benchmark_report import machine, markdown_table, median_seconds, write_json, write_markdown
from torch import nn

from vim.dense.segmentation import UPerNet

CLASSES = 150


def vim_upernet(name: str, layers: list[int], decoder_channels: int, size: int, **kwargs: Any) -> nn.Module:
    """Our UperNet on a Vim's simple feature pyramid from ``layers`` (``kwargs``: more ``timm.create_model`` arguments)."""
    return UPerNet(name, CLASSES, layers=layers, decoder_channels=decoder_channels, img_size=size, **kwargs)


def smp_upernet(name: str, decoder_channels: int, size: int) -> nn.Module:
    """smp's UperNet on timm's model ``name`` (a ``tu-`` encoder); ``img_size`` for timm's models that take one."""
    size_argument = {"img_size": size} if "swin" in name else {}
    return smp.UPerNet(
        encoder_name=f"tu-{name}", encoder_weights=None, classes=CLASSES, decoder_channels=decoder_channels, **size_argument
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vim", default="vim_tiny_patch16_224", help="the Vim of the first UperNet")
    parser.add_argument("--layers", type=int, nargs=4, default=[5, 11, 17, 23], help="its blocks feeding the pyramid")
    parser.add_argument("--vim-kwargs", type=json.loads, default={}, help="its other timm arguments, e.g. '{\"stride\": 16}'")
    parser.add_argument("--other", default="swin_tiny_patch4_window7_224", help="timm backbone of smp's UperNet")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--decoder-channels", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--min-seconds", type=float, default=2.0, help="timing of each model in a round, at least")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks"))
    args = parser.parse_args(argv)
    images = torch.randn(args.batch, 3, args.size, args.size, generator=torch.Generator().manual_seed(0)).to(args.device)
    models = {
        f"{args.vim} + UperNet": vim_upernet(args.vim, args.layers, args.decoder_channels, args.size, **args.vim_kwargs),
        f"{args.other} + UperNet (smp)": smp_upernet(args.other, args.decoder_channels, args.size),
    }
    models = {name: model.to(args.device).eval() for name, model in models.items()}
    seconds: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for name, model in models.items():
            assert model(images).shape == (args.batch, CLASSES, args.size, args.size), name
        for round_index in range(args.rounds):
            for name, model in models.items():
                seconds[name].append(median_seconds(partial(model, images), args.device, args.min_seconds))
            print(f"round {round_index + 1}: " + ", ".join(f"{n} {s[-1]:.3f} s" for n, s in seconds.items()), flush=True)
    records = [
        dict(
            model=name,
            parameters=sum(p.numel() for p in models[name].parameters()),
            median_seconds=statistics.median(times),
            images_per_second=args.batch / statistics.median(times),
            rounds=times,
        )
        for name, times in seconds.items()
    ]
    (vim_name, vim_rate), (other_name, other_rate) = ((r["model"], r["images_per_second"]) for r in records)
    env = dict(machine(args.device), batch=args.batch, size=args.size, decoder_channels=args.decoder_channels)
    stem = args.out / f"segmentation_{torch.device(args.device).type}"
    write_json(stem.with_suffix(".json"), meta=env, results=records, vim_over_other=vim_rate / other_rate)
    columns = ["model", "parameters", "median s / batch", "images / s"]
    rows = [
        [r["model"], f"{r['parameters'] / 1e6:.1f}M", f"{r['median_seconds']:.3f}", f"{r['images_per_second']:.2f}"]
        for r in records
    ]
    preamble = [
        f"Device: {env['device']} · load average {env['load_average']} · torch {env['torch']} · timm {env['timm']} · "
        f"batch {args.batch} at {args.size} x {args.size} · decoder width {args.decoder_channels} · {CLASSES} classes · "
        f"{args.rounds} interleaved rounds · {env['date']}",
        f"{vim_name} runs at {vim_rate / other_rate:.2f}x the images per second of {other_name}.",
    ]
    title = f"Segmentation forward: UperNet on {args.vim} vs {args.other}"
    write_markdown(stem.with_suffix(".md"), title, preamble, markdown_table(columns, rows))
    print(f"wrote {stem}.json and .md")


if __name__ == "__main__":
    main()
