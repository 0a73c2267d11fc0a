"""``bnfold inspect|fold|optimize MODEL.onnx``: the CLI side of the ONNX fold (:mod:`bnfold.passes.onnx`).

The torch commands hand a ``.onnx`` model here (:func:`is_onnx`); the options they share mean the same thing.
``fold`` writes the folded model (external data kept external), then checks parity with ONNX Runtime; ``optimize``
writes ``OUT_DIR/folded.onnx``, ``report.json`` and ``report.txt`` (and ``tvm/`` when a TVM target is asked for).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bnfold.errors import InputError

__all__ = ["fold", "inspect", "is_onnx", "optimize", "parity_batches"]


def is_onnx(path: str | None) -> bool:
    return bool(path) and Path(str(path)).suffix.lower() == ".onnx"


def _refuse_torch_only(args: argparse.Namespace) -> None:
    for opt in ("until", "model_factory"):
        if getattr(args, opt, None):
            raise InputError(f"--{opt.replace('_', '-')} does not apply to an .onnx model")
    if getattr(args, "dump_ir", False):
        raise InputError("--dump-ir does not apply to an .onnx model")


def parity_batches(model: Any, args: argparse.Namespace, data: str | None = None
                   ) -> list[tuple[torch.Tensor, ...]] | None:
    """The user's batches for parity (``data``, cast to the model's floating input dtype), random ones shaped by
    ``--input-shape``, or None (random inputs from the model's declared shapes)."""
    from bnfold.parity.ort import NUMPY_DTYPES, graph_inputs

    specs = graph_inputs(model)
    np_types = [NUMPY_DTYPES.get(s.type.tensor_type.elem_type) for s in specs]
    float_dtype = next((torch.from_numpy(np.zeros(1, t)).dtype for t in np_types
                        if t is not None and np.issubdtype(t, np.floating)), torch.float32)
    if data:
        from bnfold.io.data import load_tensors, split_batches

        raw = load_tensors(data, keys=getattr(args, "key", None), dtype=float_dtype)
        dims = [s.type.tensor_type.shape.dim for s in specs]
        fixed = {int(d[0].dim_value) for d in dims if len(d) and d[0].HasField("dim_value")}
        default = next(iter(fixed)) if len(fixed) == 1 else 64  # a fixed-batch model runs only that batch size
        batches = split_batches(raw, getattr(args, "batch_size", None) or default)
        for b in batches:
            if len(b) != len(specs):
                raise InputError(f"{data} holds {len(b)} arrays per sample but the model takes {len(specs)} inputs "
                                 f"({', '.join(s.name for s in specs)})")
        return batches
    shapes = getattr(args, "input_shape", None)
    if shapes:
        from bnfold.io.models import parse_shapes

        made = parse_shapes(shapes, str(float_dtype).removeprefix("torch."))
        assert made is not None
        if len(made) != len(specs):
            raise InputError(f"{len(made)} --input-shape given but the model takes {len(specs)} inputs "
                             f"({', '.join(s.name for s in specs)})")
        return [made]
    return None


def _json(report: Any) -> str:
    from bnfold.report import json_safe

    return json.dumps(json_safe(report.to_dict()), indent=2, default=str, allow_nan=False)


def inspect(args: argparse.Namespace) -> int:
    from bnfold.onnx_fold import fold_model, load_onnx

    _refuse_torch_only(args)
    loaded = load_onnx(args.model)
    report = fold_model(loaded.model, base_dir=str(loaded.path.parent), dry_run=True)
    print(_json(report) if args.json else report.render(explain=args.explain))
    return 0


def _fold_and_check(args: argparse.Namespace, dest: Path, protect: list[str], data: str | None = None) -> Any:
    """Fold ``args.model`` into ``dest`` (checked, atomic) and judge parity with ONNX Runtime; the report."""
    import onnx

    from bnfold.onnx_fold import file_size, fold_model, load_onnx, save_onnx
    from bnfold.parity.ort import onnx_parity
    from bnfold.targets.onnx import METADATA_KEY

    loaded = load_onnx(args.model)
    batches = parity_batches(loaded.model, args, data)  # before the fold: a bad --input-shape costs nothing
    original = onnx.ModelProto()
    original.CopyFrom(loaded.model)
    report = fold_model(loaded.model, base_dir=str(loaded.path.parent))
    if not any(p.key == METADATA_KEY for p in loaded.model.metadata_props):  # how --force knows its own output
        from bnfold import __version__

        meta = loaded.model.metadata_props.add()
        meta.key, meta.value = METADATA_KEY, json.dumps({"target": "onnx", "writer": "bnfold fold (ONNX graph)",
                                                           "version": __version__})
    written = save_onnx(loaded.model, dest, external=loaded.external, threshold=loaded.threshold, protect=protect)
    report.sizes = {"before": loaded.size, "after": sum(file_size(p) for p in written)}
    if loaded.external:
        report.notes.append(f"the input kept its weights in external data; so does the output ({written[-1].name})")
    try:
        parity = onnx_parity(original, dest, batches, random_batches=batches is not None and not data)
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"ONNX Runtime could not run the model: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''}",
                         hint="check the inputs (--input-shape) against the model's inputs") from exc
    report.parity = parity.summary()
    report.notes.extend(parity.notes)
    return report


def fold(args: argparse.Namespace) -> int:
    from bnfold.io.outputs import check_output_file
    from bnfold.targets.onnx import is_bnfold_onnx

    _refuse_torch_only(args)
    if not is_onnx(args.output):
        raise InputError(f"-o {args.output}: an .onnx model is folded into an .onnx file",
                         hint="name the output like model_folded.onnx")
    inputs = [p for p in (args.model, getattr(args, "data", None)) if p]
    check_output_file(args.output, inputs, force=args.force, is_ours=is_bnfold_onnx)
    report = _fold_and_check(args, Path(args.output), inputs, data=getattr(args, "data", None))
    print(_json(report) if args.json else report)
    if not args.json:
        print(f"\nwrote {args.output}")
    return 0 if (report.parity or {}).get("passed", True) else 1


def optimize(args: argparse.Namespace) -> int:
    """``bnfold optimize MODEL.onnx -o OUT_DIR``: fold, parity with ONNX Runtime, optional TVM build."""
    from bnfold.io.outputs import check_output_dir, staged_output
    from bnfold.optimize import owned_entries, write_ownership

    if args.data:
        raise InputError("--data recalibrates BatchNorm statistics, which needs the torch model; an .onnx model is "
                         "folded with the statistics it holds",
                         hint="use --validate DATA for the parity check, or pass the torch model (.pt2) to recalibrate")
    if getattr(args, "model_factory", None):
        raise InputError("--model-factory loads a state_dict into a torch model; the model here is an .onnx file")
    inputs_given = [p for p in (args.model, args.validate) if p]
    out = check_output_dir(args.output, inputs_given, force=args.force, owned=owned_entries)
    with staged_output(out) as staging:
        report = _fold_and_check(args, staging / "folded.onnx", inputs_given, data=args.validate)
        stages: dict[str, Any] = {"fold": report.to_dict()}
        passed = bool((report.parity or {}).get("passed", True))
        if args.target != "none":
            info = _compile(staging / "folded.onnx", staging / "tvm", args, data=args.validate)
            stages["tvm"] = info
            passed = passed and bool(info.get("parity_vs_folded", {}).get("passed", True))
        text = str(report) + (f"\n\nTVM ({args.target}): {_tvm_line(stages['tvm'])}" if "tvm" in stages else "")
        from bnfold.report import json_safe

        (staging / "report.json").write_text(json.dumps(json_safe({"model": args.model, "passed": passed,
                                                                   "stages": stages}), indent=2, default=str,
                                                        allow_nan=False) + "\n")
        (staging / "report.txt").write_text(text + "\n")
        write_ownership(staging)
    print(json.dumps({"passed": passed, "stages": stages}, indent=2, default=str) if args.json else text)
    if not args.json:
        print(f"\nwrote {out}/ (folded.onnx, report.json, report.txt{', tvm/' if args.target != 'none' else ''})")
    return 0 if passed else 1


def _tvm_line(info: dict[str, Any]) -> str:
    p = info.get("parity_vs_folded")
    return "compiled" + (f"; parity vs folded ONNX: {'PASS' if p['passed'] else 'FAIL'} (max abs {p['max_abs']:.3g})"
                         if p else "")


def _compile(model_path: Path, dest: Path, args: argparse.Namespace, data: str | None = None) -> dict[str, Any]:
    """Compile a folded ONNX file with TVM (Relax ONNX frontend) into ``dest``; parity vs ONNX Runtime on CPU."""
    import onnx

    from bnfold.parity import compare
    from bnfold.parity.ort import OrtModel, random_onnx_inputs
    from bnfold.targets.tvm import compile as tvm_compile

    model = onnx.load(str(model_path))
    batches = parity_batches(model, args, data)
    example = batches[0] if batches else random_onnx_inputs(model)[0]
    dynamic, note = _tvm_batch(model, args, [int(b[0].shape[0]) for b in (batches or [example]) if b[0].dim()])
    def build(batch_range: tuple[int, int] | None) -> Any:
        return tvm_compile(model, example, target=args.target, tune_trials=getattr(args, "tune_trials", 0),
                           cache_dir=getattr(args, "cache_dir", None), arch=getattr(args, "arch", None),
                           dynamic_batch=batch_range, progress=not getattr(args, "no_progress", False))

    try:
        artifact = build(dynamic)
    except InputError as exc:
        if dynamic is None or getattr(args, "dynamic_batch", None):
            raise
        note = (f"the ONNX inputs have a dynamic batch, but TVM could not build it with one ({exc}); compiled "
                f"static at batch {int(example[0].shape[0])}")
        artifact = build(None)
    info = artifact.build_info
    if note:
        info.setdefault("notes", []).append(note)
    if info["target"]["kind"] == "llvm":
        info["parity_vs_folded"] = compare(OrtModel(model_path), artifact, batches or [example],
                                           batch_independence=False, localize=False).summary()
    artifact.save(dest)
    return dict(info)


ONNX_DYNAMIC_BATCH = (1, 64)
"""Batch range of an untuned TVM build of an ONNX file whose inputs have a dynamic batch (``--dynamic-batch``
overrides it where the command has it)."""


def _tvm_batch(model: Any, args: argparse.Namespace, sizes: list[int]) -> tuple[tuple[int, int] | None, str | None]:
    """The dynamic batch range for the TVM build of ``model`` (None: static) and a note when a dynamic ONNX batch
    is compiled static."""
    from bnfold.parity.ort import graph_inputs

    specs = graph_inputs(model)
    dims = [s.type.tensor_type.shape.dim for s in specs]
    dynamic = bool(specs) and all(len(d) > 0 and not d[0].HasField("dim_value") for d in dims)
    asked = getattr(args, "dynamic_batch", None)
    if not dynamic:
        return (tuple(asked) if asked else None), None
    if getattr(args, "tune_trials", 0):
        return None, (f"the ONNX inputs have a dynamic batch; compiled static at batch {sizes[0] if sizes else '?'} "
                      "because MetaSchedule tunes static shapes only")
    lo, hi = tuple(asked) if asked else ONNX_DYNAMIC_BATCH
    return (lo, max(hi, *sizes, 2)), None


def compile_onnx(args: argparse.Namespace) -> int:
    """``bnfold compile MODEL.onnx -o OUT_DIR``: fold (ONNX rules) and compile the folded graph with TVM."""
    import tempfile

    from bnfold.io.outputs import check_output_dir, staged_output
    from bnfold.report import json_safe
    from bnfold.targets.tvm.artifact import artifact_entries

    _refuse_torch_only(args)
    check_output_dir(args.output, [args.model], force=args.force, owned=artifact_entries)
    with tempfile.TemporaryDirectory(prefix="bnfold-onnx-") as tmp:
        report = _fold_and_check(args, Path(tmp) / "folded.onnx", [args.model])
        staging = Path(tmp) / "tvm"
        info = _compile(Path(tmp) / "folded.onnx", staging, args)
        info["fold"] = {"folded": len(report.folded), "left": len(report.skipped), "parity": report.parity}
        with staged_output(args.output) as final:
            shutil.copytree(staging, final, dirs_exist_ok=True)
    passed = bool(info.get("parity_vs_folded", {}).get("passed", True)) and bool(
        (report.parity or {}).get("passed", True))
    if args.json:
        print(json.dumps(json_safe(info), indent=2, default=str, allow_nan=False))
    else:
        print(f"folded {len(report.folded)} of {len(report.folded) + len(report.skipped)} normalizations; "
              f"compiled for {info['target']['kind']}: {_tvm_line(info)}")
        print(f"wrote {args.output}/", file=sys.stdout)
    return 0 if passed else 1
