"""Typed options of every target: one frozen dataclass per back end, checked where they are made.

``get_target(name).lower(gm, inputs, options)`` takes the target's options class (:class:`TorchOptions`,
:class:`OnnxOptions`, :class:`TvmOptions`) or, as before, a mapping of the same names. A mapping goes through
:func:`target_options`: a key the class does not have (``{"tune_trails": 64}``) is an
:class:`~bnfold.errors.InputError` naming the valid keys (exit 2 from the CLI), never silently ignored.

:func:`parse_option` turns a CLI ``KEY=VALUE`` into the field's type (``--tvm-option layout=NHWC``).

This module imports neither torch, ONNX nor TVM: the step's configuration (:mod:`bnfold.deploy.config`) composes
these classes without loading any back end.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from bnfold.errors import InputError

__all__ = ["OnnxOptions", "TorchOptions", "TvmOptions", "option_names", "parse_option", "target_options"]

PathLike = str | os.PathLike[str]


@dataclass(frozen=True)
class TorchOptions:
    """``export``: how the artifact runs ``torch.export`` when saved (default ``torch.export.export``);
    ``dynamic_shapes``: the dims it keeps dynamic (``torch.export``'s format)."""

    export: Callable[..., Any] | None = None
    dynamic_shapes: Any = None


@dataclass(frozen=True)
class OnnxOptions:
    """``path``: where the ``.onnx`` file goes (default: a new temporary folder); ``simplify``: run onnxsim;
    ``dynamic_batch``: export the batch dimension dynamic; ``opset``: ONNX opset (18..23, default: the exporter's);
    ``providers``: ONNX Runtime execution providers (default: CPU); ``protect``: paths ``path`` must never be (the
    user's inputs); ``dynamic_shapes``: the dims to export dynamic (``torch.export``'s format)."""

    path: PathLike | None = None
    simplify: bool = True
    dynamic_batch: bool = True
    opset: int | None = None
    providers: Sequence[str] | None = None
    protect: Sequence[PathLike] = ()
    dynamic_shapes: Any = None


@dataclass(frozen=True)
class TvmOptions:
    """:func:`bnfold.compile`'s keyword arguments. ``target``: ``"llvm"`` (this CPU) or ``"cuda"`` (with ``arch``,
    e.g. ``"sm_90a"``); ``tune_trials``: total MetaSchedule trials (0: apply the tuning database only);
    ``cache_dir``: the shared tuning database; ``mcpu``/``num_cores``: override the host CPU; ``dynamic_batch``:
    ``(lo, hi)`` batch range; ``prepack``/``layout``: CPU weight and activation layouts (``"NCHWc"``, ``"NCHW"``,
    ``"NHWC"``); ``retune``: tune again what the database has; ``progress``: tqdm bar (True), log lines (False) or
    a callable."""

    target: str = "llvm"
    tune_trials: int = 0
    cache_dir: PathLike | None = None
    arch: str | None = None
    mcpu: str | None = None
    num_cores: int | None = None
    dynamic_batch: tuple[int, int] | None = None
    prepack: bool | None = None
    layout: str | None = None
    retune: bool = False
    progress: bool | Callable[..., None] = True

    def __post_init__(self) -> None:
        if not isinstance(self.tune_trials, int) or self.tune_trials < 0:
            raise InputError(f"tune_trials must be an integer >= 0, got {self.tune_trials!r}")
        if self.layout not in (None, "NCHWc", "NCHW", "NHWC"):
            raise InputError(f"unknown TVM layout {self.layout!r}", hint="use NCHWc, NCHW or NHWC")
        if self.num_cores is not None and (not isinstance(self.num_cores, int) or self.num_cores <= 0):
            raise InputError(f"num_cores must be a positive integer, got {self.num_cores!r}")


Options = TypeVar("Options", TorchOptions, OnnxOptions, TvmOptions)


def option_names(cls: type[Any]) -> list[str]:
    """The option names ``cls`` accepts, in declaration order."""
    return [f.name for f in dataclasses.fields(cls)]


def _unknown(cls: type[Any], what: str, bad: Sequence[str]) -> InputError:
    valid = option_names(cls)
    near = {b: _closest(b, valid) for b in bad}
    hint = "; ".join(f"{b!r}: did you mean {n!r}?" for b, n in near.items() if n) or None
    return InputError(f"unknown {what} option{'s' if len(bad) > 1 else ''} {', '.join(map(repr, bad))}; valid: "
                      f"{', '.join(valid)}", hint=hint)


def target_options(cls: type[Options], options: Options | Mapping[str, Any] | None, *, what: str) -> Options:
    """``options`` as an instance of ``cls``: an instance passes through, ``None`` gives the defaults, a mapping's
    keys must all be fields of ``cls`` (an unknown key is an :class:`InputError` naming the valid ones)."""
    if options is None:
        return cls()
    if isinstance(options, cls):
        return options
    if not isinstance(options, Mapping):
        raise InputError(f"{what} options must be a {cls.__name__} or a mapping, got {type(options).__name__}")
    valid = set(option_names(cls))
    bad = sorted(str(k) for k in options if k not in valid)
    if bad:
        raise _unknown(cls, what, bad)
    return cls(**dict(options))


def parse_option(cls: type[Any], text: str, *, what: str) -> tuple[str, Any]:
    """``"KEY=VALUE"`` (a CLI ``--tvm-option``) as ``(key, value)``, the value converted to the field's type:
    ``none`` for an optional field, ``true``/``false`` for a flag, an integer for a count, else the string."""
    key, sep, raw = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key:
        raise InputError(f"{what} option {text!r} is not KEY=VALUE", hint=f"e.g. {option_names(cls)[0]}=...")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if key not in fields:
        raise _unknown(cls, what, [key])
    kind = str(fields[key].type)
    value = raw.strip()
    if value.lower() == "none" and "None" in kind:
        return key, None
    if kind.startswith("bool"):
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise InputError(f"{what} option {key} takes true or false, got {value!r}")
        return key, value.lower() in ("true", "1", "yes")
    if kind.startswith("int"):
        try:
            return key, int(value)
        except ValueError as exc:
            raise InputError(f"{what} option {key} takes an integer, got {value!r}") from exc
    if kind.startswith("tuple[int, int]"):
        lo, _, hi = value.partition("..")
        try:
            return key, (int(lo), int(hi))
        except ValueError as exc:
            raise InputError(f"{what} option {key} takes LO..HI, got {value!r}") from exc
    if key == "cache_dir":
        return key, Path(value)
    if not kind.startswith(("str", "PathLike")):
        raise InputError(f"{what} option {key} cannot be set from the command line",
                         hint="use the Python API (bnfold.optimize / bnfold.compile)")
    return key, value


def _closest(word: str, choices: Sequence[str]) -> str | None:
    import difflib

    hits = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return hits[0] if hits else None
