"""``python -m scalearn_fast.bench report <pytest-benchmark json...> [--out DIR] [--no-plots]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .report import write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scalearn_fast.bench")
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="pytest-benchmark JSON -> results JSON, markdown table, PNG plots")
    rep.add_argument("inputs", nargs="+", type=Path, help="pytest-benchmark --benchmark-json files")
    rep.add_argument("--out", type=Path, default=Path("bench/results"), help="output folder")
    rep.add_argument("--no-plots", action="store_true", help="skip the matplotlib plots")
    args = parser.parse_args(argv)
    try:
        written = write_report(args.inputs, args.out, plots=not args.no_plots)
    except (OSError, ValueError) as exc:
        print(f"report: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:
        if exc.name != "matplotlib":
            raise
        print(
            "report: the plots need matplotlib (pip install 'scalearn-fast[bench]') or pass --no-plots",
            file=sys.stderr,
        )
        return 2
    for key, path in written.items():
        print(f"{key}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
