"""Run every benchmark in bench/ (``make bench``).

A benchmark is any ``bench/<name>.py`` other than this file and ``common.py`` that defines
``main(argv)``; each runs as its own process (so one's crash or memory does not touch the
others), with ``--rounds`` passed on when given here. Exit status of a benchmark: 0 ok,
77 skipped (a tool is missing), anything else failed. This script exits 1 if any failed.

    python bench/run.py                      # everything, each with its default rounds
    python bench/run.py --rounds 2           # fewer rounds everywhere
    python bench/run.py --only blob_rss -- --sizes 256MiB   # arguments after -- go to each
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
NOT_BENCHMARKS = {"common", "run"}
SKIPPED = 77


def discover() -> list[str]:
    names = []
    for path in sorted(BENCH_DIR.glob("*.py")):
        if path.stem in NOT_BENCHMARKS or path.stem.startswith("_"):
            continue
        if re.search(r"^def main\(", path.read_text(), re.MULTILINE):
            names.append(path.stem)
    return names


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    passthrough: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, passthrough = argv[:i], argv[i + 1 :]
    p = argparse.ArgumentParser(description="Run the benchmarks in bench/.")
    p.add_argument("--rounds", type=int, help="rounds per measurement, passed to every benchmark")
    p.add_argument("--only", help="comma-separated benchmark names (default: all)")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = p.parse_args(argv)

    available = discover()
    if args.list:
        print("\n".join(available))
        return 0
    selected = available
    if args.only:
        wanted = [n.strip().removesuffix(".py") for n in args.only.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in available]
        if unknown:
            p.error(f"unknown benchmark(s) {', '.join(unknown)}; available: {', '.join(available)}")
        selected = wanted

    forwarded = ([f"--rounds={args.rounds}"] if args.rounds is not None else []) + passthrough
    outcome: dict[str, str] = {}
    for name in selected:
        print(f"=== {name} ===", flush=True)
        t0 = time.monotonic()
        rc = subprocess.call([sys.executable, str(BENCH_DIR / f"{name}.py"), *forwarded])
        took = time.monotonic() - t0
        outcome[name] = (
            "ok" if rc == 0 else "skipped" if rc == SKIPPED else f"FAILED (exit {rc})"
        ) + f", {took:.0f} s"
        print(flush=True)
    print("=== summary ===")
    for name, what in outcome.items():
        print(f"{name}: {what}")
    return 1 if any("FAILED" in w for w in outcome.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
