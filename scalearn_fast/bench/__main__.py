"""``python -m scalearn_fast.bench report RUN/raw.json [more.json ...] [--out DIR] [--publish [DIR]]``.

The report goes into ``--out`` (default: the first input's folder, i.e. the run's own folder);
``--publish`` copies it into ``bench/results/`` as well, the committed results."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .report import PUBLISH_DIR, write_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scalearn_fast.bench")
    sub = parser.add_subparsers(dest="command", required=True)
    rep = sub.add_parser("report", help="run rows (JSON) -> results JSON, markdown table, PNG plots")
    rep.add_argument("inputs", nargs="+", type=Path, help="row files of the suite (or pytest-benchmark JSON)")
    rep.add_argument(
        "--out", type=Path, default=None, help="output folder (default: the folder of the first input)"
    )
    rep.add_argument(
        "--publish",
        type=Path,
        nargs="?",
        const=PUBLISH_DIR,
        default=None,
        help=f"also copy the report into this folder (bare --publish: {PUBLISH_DIR}, the committed results)",
    )
    rep.add_argument("--no-plots", action="store_true", help="skip the matplotlib plots")
    args = parser.parse_args(argv)
    out = args.out if args.out is not None else args.inputs[0].parent
    try:
        written = write_report(args.inputs, out, plots=not args.no_plots, publish=args.publish)
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
