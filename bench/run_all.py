"""Runs every benchmark in bench/, each in its own subprocess, and prints one table:
each figure, the floor measured in the same run, their ratio, the target and whether
it is met.

    .venv/bin/python bench/run_all.py [--smoke] [--only NAME ...]
        [--args NAME="--rounds 1"] [--timeout SECONDS]

`make bench` runs the full sizes (many minutes); `--smoke` the tiny ones the test suite
runs (tests/test_benchmarks.py), whose numbers mean nothing. `--args` passes more
arguments to one benchmark (`--args job_list="--jobs 20000 --sqlite-only"`), for a
full run at a reduced size, say. Each benchmark's own output is shown as it runs.

The exit status is 1 when a benchmark failed to run: it exited non-zero (the soak also
does when it lost or duplicated a job) or reported no rows. A missed target shows in
the table and leaves the exit status alone: timings depend on the machine.
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import benchlib
from rich.console import Console
from rich.markup import escape
from rich.table import Table


@dataclass
class Outcome:
    bench: str
    returncode: int
    seconds: float
    rows: list[dict[str, Any]] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return self.returncode != 0 or not self.rows


def run_bench(
    name: str, smoke: bool, extra: list[str], results: Path, timeout: float | None
) -> Outcome:
    """Runs bench/<name>.py to the end (its output goes straight to this terminal)."""
    cmd = [sys.executable, str(benchlib.BENCH_DIR / f"{name}.py"), "--results", str(results)]
    if smoke:
        cmd.append("--smoke")
    cmd += extra
    started = time.monotonic()
    returncode = benchlib.run_bench(cmd, timeout, cwd=benchlib.REPO).returncode
    return Outcome(name, returncode, time.monotonic() - started, benchlib.read_rows(results))


def number(x: float) -> str:
    if not math.isfinite(x):
        return str(x)
    if x == int(x):
        return f"{int(x):,}"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    return f"{x:.3g}" if abs(x) < 10 else f"{x:.1f}"


def table(outcomes: list[Outcome], smoke: bool) -> Table:
    title = "benchmarks at smoke sizes (the numbers mean nothing)" if smoke else "benchmarks"
    t = Table(title=title, title_justify="left")
    for column in ("benchmark", "measure", "figure", "floor (same run)", "ratio"):
        t.add_column(
            column, justify="right" if column in ("figure", "floor (same run)", "ratio") else "left"
        )
    t.add_column("target")
    t.add_column("met", justify="center")
    for outcome in outcomes:
        first = outcome.bench
        for row in outcome.rows:
            met = {True: "[green]yes[/]", False: "[red]no[/]", None: "-"}[row["met"]]
            t.add_row(
                first,
                escape(row["name"]),
                escape(f"{number(row['figure'])} {row['unit']}"),
                escape(f"{number(row['floor'])} {row['unit']}"),
                number(row["ratio"]),
                escape(row["target"]) or "-",
                met,
            )
            first = ""
        if outcome.failed:
            why = f"exit {outcome.returncode}" if outcome.returncode else "no rows"
            t.add_row(first, f"[red]failed to run ({why})[/]", "", "", "", "", "")
        t.add_section()
    return t


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds each")
    parser.add_argument("--only", nargs="+", choices=benchlib.discover(), metavar="NAME")
    parser.add_argument(
        "--args",
        action="append",
        default=[],
        metavar='NAME="ARGS"',
        help="more arguments for one benchmark (repeatable)",
    )
    parser.add_argument("--timeout", type=float, default=None, help="seconds per benchmark")
    args = parser.parse_args()
    extra: dict[str, list[str]] = {}
    for item in args.args:
        name, _, rest = item.partition("=")
        if name not in benchlib.discover():
            parser.error(f"--args {item!r}: no benchmark {name!r}")
        extra.setdefault(name, []).extend(shlex.split(rest))

    # Piped (make bench > file, the tests): wide enough that no column wraps.
    console = Console(width=None if sys.stdout.isatty() else 160)
    outcomes = []
    with tempfile.TemporaryDirectory(prefix="trainyard-bench-") as tmp:
        for name in args.only or benchlib.discover():
            console.rule(f"bench/{name}.py")
            results = Path(tmp) / f"{name}.jsonl"
            outcomes.append(run_bench(name, args.smoke, extra.get(name, []), results, args.timeout))
    console.print()
    console.print(table(outcomes, args.smoke))
    for o in outcomes:
        status = "[red]FAILED[/]" if o.failed else "ok"
        console.print(f"{o.bench}: {status} in {o.seconds:.1f} s ({len(o.rows)} rows)")
    return 1 if any(o.failed for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
