"""``bnfold inspect|fold|optimize MODEL.onnx``: the CLI side of the ONNX fold (:mod:`bnfold.passes.onnx`).

The torch commands hand a ``.onnx`` model here (:func:`is_onnx`); the options they share mean the same thing, and
those that mean nothing for an ONNX model (:data:`TORCH_ONLY`) are refused. Before any work: every output is planned
(:class:`~bnfold.io.outputs.OutputPlan`: ``-o OUT.onnx`` and, when the input keeps external data, ``OUT.onnx.data``),
the data is checked against the model's inputs, and ONNX Runtime loads the original. ``fold`` then folds, writes the
folded model (external data kept external) to a staging folder beside ``OUT.onnx``, checks parity with ONNX Runtime
there and publishes it; ``optimize`` writes ``OUT_DIR/folded.onnx``, ``report.json`` and ``report.txt`` (and
``tvm/`` when a TVM target is asked for).
"""

from __future__ import annotations

import argparse
import functools
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import torch

from bnfold.errors import InputError

__all__ = ["TORCH_ONLY", "compile_onnx", "fold", "fold_onnx_file", "inspect", "is_onnx", "onnx_input_specs",
           "optimize", "parity_batches", "refuse_torch_only"]


def is_onnx(path: str | None) -> bool:
    return bool(path) and Path(str(path)).suffix.lower() == ".onnx"


TORCH_ONLY: dict[str, tuple[str, object, str]] = {
    "model_factory": ("--model-factory", None, "it loads a state_dict into a torch model"),
    "factory_kwargs": ("--factory-kwargs", None, "it goes with --model-factory"),
    "allow_missing_keys": ("--allow-missing-keys", False, "it goes with --model-factory"),
    "reparameterize": ("--reparameterize", (None, False), "the ONNX rules fold normalizations only; merging "
                       "parallel branches is done on a torch model"),
    "capture": ("--capture", "auto", "it chooses how a torch model is captured"),
    "trust_pickle": ("--trust-pickle", False, "an .onnx file is read without unpickling or running code"),
    "num_samples": ("--num-samples", None, "it limits the calibration data, and an .onnx model is not recalibrated"),
    "num_batches": ("--num-batches", None, "it limits the calibration data, and an .onnx model is not recalibrated"),
    "mode": ("--mode", "batch", "it is the recalibration mode, and an .onnx model is not recalibrated"),
    "data_factory": ("--data-factory", None, "it gives calibration data, and an .onnx model is not recalibrated"),
    "data_kwargs": ("--data-kwargs", None, "it goes with --data-factory"),
    "no_onnx": ("--no-onnx", False, "it skips the ONNX export of a torch model; the model here is ONNX already"),
}
"""Options of the torch commands that do not apply to an ``.onnx`` model: ``dest → (spelling, value(s) meaning
"not given", why)``. Given anyway, they are refused (exit 2) rather than silently ignored."""


def refuse_torch_only(args: argparse.Namespace) -> None:
    """Refuse every option in :data:`TORCH_ONLY` that ``args`` sets (before any work)."""
    for dest, (spelled, unset, why) in TORCH_ONLY.items():
        if not hasattr(args, dest):
            continue
        value = getattr(args, dest)
        if value in (unset if isinstance(unset, tuple) else (unset,)):
            continue
        raise InputError(f"{spelled} does not apply to an .onnx model: {why}",
                         hint=f"drop {spelled}, or pass the torch model (.pt2)")


def onnx_input_specs(model: Any) -> list[Any] | None:
    """What ``model`` takes, as :class:`~bnfold.io.data_checks.InputSpec` (static sizes exact, symbolic or unknown
    ones ``None``); ``None`` when an input has no declared shape or an element type torch has no dtype for."""
    from bnfold.io.data_checks import InputSpec
    from bnfold.parity.ort import graph_inputs

    specs = []
    for vi in graph_inputs(model):
        tt = vi.type.tensor_type
        dtype = _torch_dtypes().get(tt.elem_type)
        if dtype is None or not tt.HasField("shape"):
            return None
        specs.append(InputSpec(tuple(int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else None
                                     for d in tt.shape.dim), dtype))
    return specs


@functools.cache
def _torch_dtypes() -> dict[int, torch.dtype]:
    """ONNX element type → torch dtype (built on first use: importing this module must not import onnx)."""
    import onnx

    t = onnx.TensorProto
    return {t.FLOAT: torch.float32, t.DOUBLE: torch.float64, t.FLOAT16: torch.float16, t.BFLOAT16: torch.bfloat16,
            t.INT64: torch.int64, t.INT32: torch.int32, t.INT16: torch.int16, t.INT8: torch.int8,
            t.UINT8: torch.uint8, t.BOOL: torch.bool}



def parity_batches(model: Any, args: argparse.Namespace, data: str | None = None
                   ) -> tuple[list[tuple[torch.Tensor, ...]] | None, list[str]]:
    """The user's batches for parity (``data``, checked against the model's inputs before any work — counts,
    rank, static sizes, dtype kind, NaN/Inf, zero samples, mixed shapes, as for a ``.pt2`` — then cast to the
    model's floating input dtype and split into batches), random ones shaped by ``--input-shape`` (checked the same
    way), or None (random inputs from the model's declared shapes); and notes for the report."""
    from bnfold.io.data_checks import check_batches

    specs = onnx_input_specs(model)
    float_dtype = next((s.dtype for s in specs or () if s.dtype.is_floating_point), torch.float32)
    asked = getattr(args, "dtype", None)
    if asked not in (None, "float32") and asked != str(float_dtype).removeprefix("torch."):
        raise InputError(f"--dtype {asked}: the model's inputs are {str(float_dtype).removeprefix('torch.')}",
                         hint="drop --dtype: inputs for an .onnx model take its own dtype")
    size = getattr(args, "batch_size", None)
    if size is not None and size <= 0:
        raise InputError(f"--batch-size must be positive, got {size}")
    fixed = {s.sizes[0] for s in specs or () if s.sizes and s.sizes[0] is not None}
    fixed_batch = next(iter(fixed)) if len(fixed) == 1 else None
    if fixed_batch is not None and size is not None and size != fixed_batch:
        raise InputError(f"{args.model} has a fixed batch size of {fixed_batch}; --batch-size {size} cannot run",
                         hint=f"use --batch-size {fixed_batch}, or drop it")
    notes: list[str] = []
    if data:
        from bnfold.io.stream import open_data

        stream = open_data(data, keys=getattr(args, "key", None), batch_size=size or fixed_batch or 64,
                           preprocess=getattr(args, "preprocess", None), specs=specs, dtype=float_dtype,
                           exact=fixed_batch)
        batches = list(stream)  # parity compares every model on the same inputs: kept in memory
        if stream.dropped:
            notes.append(f"dropped the last {stream.dropped} samples of {data} (the model's batch size is fixed at "
                         f"{fixed_batch})")
        return batches, notes
    shapes = getattr(args, "input_shape", None)
    if shapes:
        from bnfold.io.models import parse_shapes

        made = parse_shapes(shapes, str(float_dtype).removeprefix("torch."))
        assert made is not None
        source = "--input-shape " + " ".join(shapes)
        check_batches([made], specs, source)
        if fixed_batch is not None and int(made[0].shape[0]) != fixed_batch:
            raise InputError(f"{source}: the model's batch size is fixed at {fixed_batch}",
                             hint=f"start the shape with {fixed_batch}")
        return [made], notes
    return None, notes


def _json(report: Any) -> str:
    from bnfold.report import json_safe

    return json.dumps(json_safe(report.to_dict()), indent=2, default=str, allow_nan=False)


def inspect(args: argparse.Namespace) -> int:
    from bnfold.onnx import fold_model, load_onnx

    refuse_torch_only(args)
    loaded = load_onnx(args.model)
    report = fold_model(loaded.model, base_dir=str(loaded.path.parent), dry_run=True)
    print(_json(report) if args.json else report.render(explain=args.explain))
    return 0


def _runtime(model: Any, path: Path) -> Any:
    """An ONNX Runtime session of the original model, made before any work: a model ONNX Runtime cannot load (an op
    from a custom domain without its library, say) is refused here, not after the fold."""
    from bnfold.parity.ort import OrtModel

    try:
        return OrtModel(model)
    except Exception as exc:
        custom = sorted({n.domain for n in model.graph.node if n.domain not in ("", "ai.onnx", "ai.onnx.ml",
                                                                                   "com.microsoft")})
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"ONNX Runtime cannot load {path}, so the fold could not be checked: {first}",
                         hint=(f"ops of the custom domain(s) {', '.join(custom)} need their ONNX Runtime library; "
                               if custom else "") + "bnfold folds only models ONNX Runtime can run") from exc


def fold_onnx_file(args: argparse.Namespace, dest: Path, protect: list[Any], data: str | None = None
                   ) -> tuple[Any, list[Path]]:
    """Fold ``args.model`` into ``dest`` and judge parity with ONNX Runtime; the report and the files written.

    The data is checked and ONNX Runtime loads the original before the fold; the folded model (and its external
    data) is written to a staging folder beside ``dest``, checked there, and published only when no error occurred
    (a parity *failure* is published, for inspection, and said in the report)."""
    import onnx

    from bnfold.cli.commands.common import dump_target
    from bnfold.onnx import file_size, fold_model, load_onnx, staged_onnx
    from bnfold.parity.ort import onnx_parity
    from bnfold.targets.onnx import METADATA_KEY

    loaded = load_onnx(args.model)
    batches, notes = parity_batches(loaded.model, args, data)  # before the fold: bad data costs nothing
    original = onnx.ModelProto()
    original.CopyFrom(loaded.model)
    reference = _runtime(original, loaded.path)
    report = fold_model(loaded.model, base_dir=str(loaded.path.parent), until=getattr(args, "until", None),
                        dump_ir=dump_target(getattr(args, "dump_ir", None), sys.stderr))
    if not any(p.key == METADATA_KEY for p in loaded.model.metadata_props):  # how --force knows its own output
        from bnfold import __version__

        meta = loaded.model.metadata_props.add()
        meta.key, meta.value = METADATA_KEY, json.dumps({"target": "onnx", "writer": "bnfold fold (ONNX graph)",
                                                           "version": __version__})
    with staged_onnx(loaded.model, dest, external=loaded.external, threshold=loaded.threshold,
                     protect=protect) as staged:
        report.sizes = {"before": loaded.size, "after": sum(file_size(p) for p in staged)}
        if len(staged) > 1:
            report.notes.append(f"the input kept its weights in external data; so does the output "
                                f"({dest.name}.data)")
        try:
            parity = onnx_parity(original, staged[0], batches, random_batches=batches is not None and not data,
                                 reference=reference)
        except InputError:
            raise
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InputError(f"ONNX Runtime could not run the model on the parity inputs: {type(exc).__name__}: "
                             f"{first}", hint="check the inputs (--data, --input-shape) against the model's "
                                              "inputs") from exc
    report.parity = parity.summary()
    report.notes.extend(notes + parity.notes)
    return report, [dest.parent / p.name for p in staged]


def fold(args: argparse.Namespace) -> int:
    from bnfold.cli.commands.common import check_until
    from bnfold.io.outputs import OutputPlan
    from bnfold.io.references import referenced_files
    from bnfold.onnx import data_file
    from bnfold.targets.onnx import is_bnfold_onnx, is_bnfold_onnx_data

    refuse_torch_only(args)
    check_until(args.until, onnx=True)
    if not is_onnx(args.output):
        raise InputError(f"-o {args.output}: an .onnx model is folded into an .onnx file",
                         hint="name the output like model_folded.onnx")
    plan = OutputPlan([args.model, getattr(args, "data", None)], force=args.force)
    out = plan.file(args.output, is_ours=is_bnfold_onnx)
    if referenced_files(args.model):  # the output keeps its weights external too: OUT.onnx.data
        plan.file(data_file(out), is_ours=is_bnfold_onnx_data, role=f"the external data of -o {out}")
    report, written = fold_onnx_file(args, out, plan.protect, data=getattr(args, "data", None))
    print(_json(report) if args.json else report)
    if not args.json:
        print(f"\nwrote {' and '.join(str(p) for p in written)}")
    return 0 if (report.parity or {}).get("passed", True) else 1


def optimize(args: argparse.Namespace) -> int:
    """``bnfold optimize MODEL.onnx -o OUT_DIR``: fold, parity with ONNX Runtime, optional TVM build."""
    from bnfold.deploy.ownership import owned_entries, write_ownership
    from bnfold.io.outputs import OutputPlan, staged_output

    if args.data:
        raise InputError("--data recalibrates BatchNorm statistics, which needs the torch model; an .onnx model is "
                         "folded with the statistics it holds",
                         hint="use --validate DATA for the parity check, or pass the torch model (.pt2) to recalibrate")
    refuse_torch_only(args)
    plan = OutputPlan([args.model, args.validate], force=args.force)
    out = plan.folder(args.output, owned=owned_entries)
    with staged_output(out) as staging:
        report, _ = fold_onnx_file(args, staging / "folded.onnx", plan.protect, data=args.validate)
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
        if not getattr(args, "no_html", False):
            from bnfold.htmlreport import onnx_optimize_page

            (staging / "report.html").write_text(onnx_optimize_page(args.model, report, stages.get("tvm"), passed),
                                                 encoding="utf-8")
        write_ownership(staging)
    print(json.dumps({"passed": passed, "stages": stages}, indent=2, default=str) if args.json else text)
    if not args.json:
        html = "" if getattr(args, "no_html", False) else ", report.html"
        print(f"\nwrote {out}/ (folded.onnx, report.json, report.txt{html}{', tvm/' if args.target != 'none' else ''})")
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
    batches, _ = parity_batches(model, args, data)
    example = batches[0] if batches else random_onnx_inputs(model)[0]
    dynamic, note = _tvm_batch(model, args, [int(b[0].shape[0]) for b in (batches or [example]) if b[0].dim()])

    def build(batch_range: tuple[int, int] | None) -> Any:  # compile's options, as `bnfold compile` spells them
        return tvm_compile(model, example, target=args.target, tune_trials=getattr(args, "tune_trials", 0),
                           cache_dir=getattr(args, "cache_dir", None), arch=getattr(args, "arch", None),
                           mcpu=getattr(args, "mcpu", None), retune=getattr(args, "retune", False),
                           prepack=None if getattr(args, "prepack", True) else False,
                           layout=getattr(args, "layout", None), dynamic_batch=batch_range,
                           progress=not getattr(args, "no_progress", False))

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

    from bnfold.io.outputs import OutputPlan, staged_output
    from bnfold.report import json_safe
    from bnfold.targets.tvm.artifact import artifact_entries

    refuse_torch_only(args)
    plan = OutputPlan([args.model], force=args.force)
    plan.folder(args.output, owned=artifact_entries)
    with tempfile.TemporaryDirectory(prefix="bnfold-onnx-") as tmp:
        report, _ = fold_onnx_file(args, Path(tmp) / "folded.onnx", plan.protect)
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
