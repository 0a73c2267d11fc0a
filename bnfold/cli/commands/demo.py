"""``bnfold demo``: run the whole pipeline on the embedded digits CNN and print the report."""

from __future__ import annotations

import argparse
import json

from bnfold.cli.commands import SUMMARY
from bnfold.demo.run import run_demo

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help=SUMMARY["demo"][1])
    p.add_argument("--json", metavar="FILE", help="also write every stage's results as JSON to FILE")
    p.set_defaults(func=_demo)


def _demo(args: argparse.Namespace) -> int:
    ctx = run_demo()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(ctx.results, f, indent=2, default=str)
    return 0
