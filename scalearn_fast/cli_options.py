"""Options that several ``scalearn-fast`` subcommands declare, defined once."""

from __future__ import annotations

import argparse


def add_sources_option(p: argparse.ArgumentParser, help: str, *, required: bool = False) -> None:
    """``--sources``: one or more source adapter folders; ``help`` says what they are to the command."""
    p.add_argument("--sources", nargs="+", required=required, default=None, help=help)


def add_backend_argument(p: argparse.ArgumentParser) -> None:
    """``--backend``: how the stage's fused layers compute."""
    p.add_argument(
        "--backend",
        choices=("auto", "torch", "triton", "reference"),
        default="auto",
        help="how the fused layer computes (auto: the fastest measured on the device)",
    )
