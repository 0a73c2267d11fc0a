"""CLI subcommands. Each module has ``register(subparsers)``; :data:`COMMANDS` lists them in help order."""

from __future__ import annotations

from bnfold.commands import demo, fold_cmd

COMMANDS = [fold_cmd, demo]
