"""CLI subcommands. Each module has ``register(subparsers)``; :data:`COMMANDS` lists them in help order."""

from __future__ import annotations

from bnfold.commands import check_cmd, compile_cmd, demo, fold_cmd, optimize_cmd, recalibrate_cmd

COMMANDS = [fold_cmd, check_cmd, demo, recalibrate_cmd, compile_cmd, optimize_cmd]
