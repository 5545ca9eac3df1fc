"""Run the README's quickstarts as a user would and check the scores it states: each command of the README's quickstart
table, whole (its data generated on first use into a fresh ``$VIM_CACHE``, in a fresh working folder), timed, and its
printed final score compared with the table's.

    python tools/check_quickstarts.py                        # every quickstart (about 10 minutes on 2 cores)
    python tools/check_quickstarts.py --only segmentation    # the rows whose first cell starts so

A stated score is met when each percentage of the table's score cell ("95.0%, EMA 94.2%", "mIoU 88.2%") is printed
in the run's final report line (``Final validation ...``), to within ``--tolerance`` points (default 0: exactly as
printed; CI allows 2 points: two CPUs round the same training differently, e.g. the video quickstart's 96 validation
clips by one, 1.04 points); the wall time is recorded beside the stated
one (times depend on the machine and its load, so they are reported, not checked). Exits 1 when a score is not met.

Writes ``benchmarks/quickstarts_<device>.{json,md}`` with the machine, versions, date and load.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmark_report import machine, markdown_table, write_json, write_markdown

ROOT = Path(__file__).resolve().parents[1]
TABLE_HEADER = re.compile(r"^\| quickstart \| command \| wall time \| (.+) \|$", re.MULTILINE)
PERCENT = re.compile(r"\d+(?:\.\d+)?%")


@dataclass(frozen=True)
class Quickstart:
    """A row of the README's quickstart table."""

    name: str
    command: str
    stated_time: str
    stated_score: str


@dataclass
class Outcome:
    """What a quickstart's run printed and how it compares with its row."""

    name: str
    command: str
    stated_time: str
    wall_seconds: float
    stated_score: str
    final_line: str | None
    score_met: bool
    exit_status: int


def readme_quickstarts(readme: str) -> list[Quickstart]:
    """The rows of the README's quickstart table (``| quickstart | command | wall time | <score> |``), commands unquoted."""
    header = TABLE_HEADER.search(readme)
    if header is None:
        raise ValueError("the README has no quickstart table (| quickstart | command | wall time | ... |)")
    rows = []
    for line in readme[header.end() :].splitlines()[2:]:  # the separator row, then the rows until the table ends
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows.append(Quickstart(cells[0], cells[1].strip("`"), cells[2], cells[3]))
    return rows


def final_score_line(output: str) -> str | None:
    """The last ``Final validation ...`` line that a ``vimkit fit`` printed, or None."""
    lines = [line for line in output.splitlines() if line.startswith("Final validation")]
    return lines[-1] if lines else None


def percentages(text: str) -> list[float]:
    return [float(value.rstrip("%")) for value in PERCENT.findall(text)]


def score_met(stated: str, final_line: str | None, tolerance: float = 0.0) -> bool:
    """Whether every percentage of the stated score cell is printed in the final line (as ``vimkit fit`` rounds it), to
    within ``tolerance`` points."""
    wanted = percentages(stated)
    if not wanted or final_line is None:
        return False
    printed = percentages(final_line)
    return all(any(abs(value - shown) <= tolerance + 1e-9 for shown in printed) for value in wanted)


def run_quickstart(quickstart: Quickstart, tolerance: float = 0.0) -> Outcome:
    """Run the quickstart's command in a fresh folder with a fresh ``$VIM_CACHE``; its output streams through."""
    words = shlex.split(quickstart.command)
    if words[:1] != ["vimkit"]:
        raise ValueError(f"quickstart {quickstart.name!r}: {quickstart.command!r} is not a vimkit command")
    config = ROOT / words[words.index("--config") + 1]
    words[words.index("--config") + 1] = str(config)
    with tempfile.TemporaryDirectory(prefix="quickstart_") as folder:
        env = {**os.environ, "VIM_CACHE": str(Path(folder, "cache"))}
        start = time.perf_counter()
        process = subprocess.run(
            [sys.executable, "-m", "vim", *words[1:]], cwd=folder, env=env, capture_output=True, text=True, check=False
        )
        seconds = time.perf_counter() - start
    sys.stdout.write(process.stdout[-2000:])
    line = final_score_line(process.stdout)
    met = process.returncode == 0 and score_met(quickstart.stated_score, line, tolerance)
    q = quickstart
    return Outcome(q.name, q.command, q.stated_time, seconds, q.stated_score, line, met, process.returncode)


def printed(outcome: Outcome) -> str:
    """The run's final score line, or its exit status when it printed none."""
    return outcome.final_line or f"exit {outcome.exit_status}"


def minutes(seconds: float) -> str:
    """``1 min 2 s`` as the README writes times."""
    whole = round(seconds)
    return f"{whole // 60} min {whole % 60} s" if whole >= 60 else f"{whole} s"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", help="the quickstarts whose name starts with one of these")
    parser.add_argument("--tolerance", type=float, default=0.0, help="points a printed score may differ by")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks")
    args = parser.parse_args(argv)
    quickstarts = readme_quickstarts(args.readme.read_text())
    if args.only:
        quickstarts = [q for q in quickstarts if any(q.name.startswith(prefix) for prefix in args.only)]
    env = machine("cpu")
    outcomes = []
    for quickstart in quickstarts:
        print(f"== {quickstart.name}: {quickstart.command}", flush=True)
        outcomes.append(run_quickstart(quickstart, args.tolerance))
        print(f"== {minutes(outcomes[-1].wall_seconds)}; stated score met: {outcomes[-1].score_met}", flush=True)
    stem = args.out / "quickstarts_cpu"
    write_json(stem.with_suffix(".json"), meta=env, results=[asdict(outcome) for outcome in outcomes])
    columns = ["quickstart", "wall time (stated)", "stated score", "printed", "met"]
    rows = [
        [o.name, f"{minutes(o.wall_seconds)} ({o.stated_time})", o.stated_score, printed(o), "yes" if o.score_met else "NO"]
        for o in outcomes
    ]
    preamble = [
        f"Machine: {env['device']} · load average {env['load_average']} at the start · torch {env['torch']} · {env['date']}",
        "Each README quickstart command run whole, as written, in a fresh folder with a fresh $VIM_CACHE; scores met "
        f"to within {args.tolerance:g} points.",
    ]
    write_markdown(stem.with_suffix(".md"), "The README's quickstarts, run", preamble, markdown_table(columns, rows))
    print(f"wrote {stem}.json and .md")
    return 0 if all(outcome.score_met for outcome in outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
