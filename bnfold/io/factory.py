"""A model from its code and a ``state_dict`` file: ``--model-factory package.module:callable`` (+ kwargs).

``load_factory_model(spec, weights)`` imports ``package.module`` (the user's own code: naming it is their consent
to run it), calls ``callable(**kwargs)``, and loads the weights with ``torch.load(weights_only=True)`` — the file
itself can run no code — into the module with ``load_state_dict(strict=False)``:

* a checkpoint dict wrapping the weights under ``state_dict`` / ``model_state_dict`` / ``model`` is unwrapped, and a
  ``module.`` prefix (DataParallel) is stripped when every key has it;
* *missing* keys are an error (the model would run with its random initialization), except BatchNorm's
  ``num_batches_tracked`` counters, unless ``allow_missing``; *unexpected* keys are reported (a checkpoint may carry
  extra heads) — both lists are returned so the CLI can print them;
* a shape mismatch, an import error, a factory that raises or returns something other than an ``nn.Module`` is an
  :class:`~bnfold.errors.InputError` (the CLI exits 2 and writes nothing).
"""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bnfold.errors import InputError

__all__ = ["FactoryModel", "import_callable", "load_factory_model", "parse_factory_kwargs"]

_WRAPPERS = ("state_dict", "model_state_dict", "model")
_SHOWN = 8


@dataclass
class FactoryModel:
    module: nn.Module
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)


def parse_factory_kwargs(text: str | None, option: str = "--factory-kwargs") -> dict[str, Any]:
    """``--factory-kwargs`` JSON (an object) → keyword arguments (``option``: the flag, for messages)."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"{option} is not valid JSON: {exc.msg} (at character {exc.pos})",
                         hint='write it like \'{"num_classes": 10}\'') from exc
    if not isinstance(value, dict):
        raise InputError(f"{option} must be a JSON object, got {type(value).__name__}",
                         hint='write it like \'{"num_classes": 10}\'')
    return value


def import_callable(spec: str, option: str = "--model-factory",
                    example: str = "torchvision.models:resnet18") -> Any:
    """The callable ``package.module:attr`` names (importing the user's module: naming it is consent to run it);
    ``option``/``example`` word the messages."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise InputError(f"{option} {spec!r} is not 'package.module:callable'", hint=f"e.g. {option} {example}")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise InputError(f"{option}: importing {module_name!r} failed: {type(exc).__name__}: {exc}",
                         hint="is the package installed, or its folder on PYTHONPATH?") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise InputError(f"{option}: {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise InputError(f"{option}: {spec} is a {type(obj).__name__}, not a callable")
    return obj


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise InputError(f"{path}: no such file" if not path.exists() else f"{path} is not a file")
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise InputError(f"{path} could not be loaded as weights (torch.load weights_only=True): "
                         f"{type(exc).__name__}: {first}",
                         hint="a state_dict saved with torch.save(model.state_dict(), path); pickled modules need "
                              "--trust-pickle without --model-factory") from exc
    for key in _WRAPPERS:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict) and not all(
                isinstance(v, torch.Tensor) for v in obj.values()):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                       for k, v in obj.items()):
        raise InputError(f"{path} does not hold a state_dict (a dict of parameter names to tensors)")
    if all(k.startswith("module.") for k in obj):
        obj = {k.removeprefix("module."): v for k, v in obj.items()}
    return obj


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN])
    return shown + (f", … ({len(keys)} in all)" if len(keys) > _SHOWN else "")


def load_factory_model(spec: str, weights: str | os.PathLike[str], *, kwargs: dict[str, Any] | None = None,
                       allow_missing: bool = False) -> FactoryModel:
    """Build ``spec(**kwargs)`` and load ``weights`` into it (module docstring); the module is in eval mode."""
    state = _state_dict(Path(weights))  # before running the user's code: a bad file costs nothing
    factory = import_callable(spec)
    try:
        module = factory(**(kwargs or {}))
    except Exception as exc:
        raise InputError(f"--model-factory {spec} raised {type(exc).__name__}: {exc}",
                         hint="check --factory-kwargs") from exc
    if not isinstance(module, nn.Module):
        raise InputError(f"--model-factory {spec} returned a {type(module).__name__}, not a torch nn.Module")
    try:
        result = module.load_state_dict(state, strict=False)
    except Exception as exc:
        first = str(exc).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:4])
        raise InputError(f"the weights in {weights} do not fit {spec}: {detail}",
                         hint="same architecture and --factory-kwargs (e.g. num_classes) as when they were saved?"
                         ) from exc
    missing = [k for k in result.missing_keys if not k.endswith("num_batches_tracked")]
    unexpected = list(result.unexpected_keys)
    if missing and not allow_missing:
        raise InputError(f"{len(missing)} parameters of {spec} are missing from {weights}: {_listed(missing)}",
                         hint="they would keep their random initialization; pass --allow-missing-keys if that is "
                              "intended")
    return FactoryModel(module.eval(), missing, unexpected)
