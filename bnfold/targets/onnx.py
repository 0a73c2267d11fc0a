"""ONNX target: ``torch.export`` → ``torch.onnx.export`` → onnxsim → ONNX Runtime.

Lowering only (the model is folded before it gets here):

1. The module is exported with ``torch.export.export(strict=False)``, with the caller's ``dynamic_shapes``
   or else dimension 0 of every input marked ``Dim.AUTO`` (a batch of 1 is doubled first so it is not
   specialized); if that fails the batch stays fixed (``build_info["dynamic_batch"] = False``). A
   ``torch.export`` GraphModule's ``_guards_fn`` (which restates the shapes it was captured with) is dropped
   from a copy first. The caller's module is never changed.
2. ``torch.onnx.export(exported_program, dynamo=True)`` translates it. The TorchScript exporter
   (``dynamo=False``) is not used: with torch 2.14 it fails on both kinds of GraphModule bnfold produces
   (symbolic-traced: ``'Graph' object has no attribute 'outputs'``; ``ExportedProgram.module()``:
   ``Calling train() is not supported``).
3. onnxsim simplifies it, checking the result on a random input (``check_n=1``); a failed check is an error.
4. A model that declares a dynamic batch is run by ONNX Runtime at a batch size other than the example's
   (:func:`check_dynamic_batch`). A graph captured by ``torch.export`` at a fixed batch has that batch baked
   into its ``view``/``reshape`` sizes, and re-exporting it with a dynamic dim does not undo that: the file
   would declare a dynamic batch and fail at any other size. Such a model is exported again with the example's
   fixed batch, ``build_info["static_reason"]`` says why, and a :class:`StaticBatchWarning` is issued (fold
   with ``dynamic_shapes`` — or from a ``.pt2`` with a dynamic batch — to get a graph that stays dynamic).
5. ``onnx.checker`` validates the model; it is written atomically (temporary file + rename), with how it was
   built stored as JSON in the metadata property ``bnfold.build_info``.

:class:`OnnxRuntimeModel` runs the file with ONNX Runtime and is callable on torch tensors, so
:func:`bnfold.parity.compare` judges it like any module.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.fx
from torch import nn

from bnfold import dynamic as dynamic_dims
from bnfold.errors import BnfoldError, InputError
from bnfold.io.outputs import atomic_output

__all__ = ["OnnxExport", "OnnxRuntimeModel", "OnnxTarget", "StaticBatchWarning", "check_dynamic_batch",
           "export_onnx"]

log = logging.getLogger(__name__)

METADATA_KEY = "bnfold.build_info"
_MAX_PROTO_BYTES = 2**31 - 1


def _require(module: str) -> Any:
    try:
        return __import__(module)
    except ImportError as exc:
        raise BnfoldError(f"the ONNX target needs the '{module}' package, which is not installed",
                          hint="pip install 'bnfold[onnx]'") from exc


class StaticBatchWarning(UserWarning):
    """An ONNX model was asked for with a dynamic batch but written with a fixed one (the reason is the message
    and ``build_info["static_reason"]``)."""


@dataclass
class OnnxExport:
    """Where :func:`export_onnx` wrote the model and how it was built."""

    path: Path
    build_info: dict[str, Any]


def _without_guards(module: nn.Module) -> nn.Module:
    """``module`` in eval mode with any ``torch.export`` shape guards removed — a copy when anything changes."""
    guards = isinstance(module, torch.fx.GraphModule) and any(
        n.op == "call_module" and n.target == "_guards_fn" for n in module.graph.nodes)
    if not guards and not module.training:
        return module
    module = copy.deepcopy(module).eval()
    if guards:
        assert isinstance(module, torch.fx.GraphModule)
        for n in list(module.graph.nodes):
            if n.op == "call_module" and n.target == "_guards_fn" and not n.users:
                module.graph.erase_node(n)
        module.recompile()
    return module


def _dynamic_batch(ep: torch.export.ExportedProgram) -> bool:
    user = [n for n in ep.graph.nodes if n.op == "placeholder" and n.name in ep.graph_signature.user_inputs]
    return any(isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].dim() > 0
               and not isinstance(n.meta["val"].shape[0], int) for n in user)


def _export_program(module: nn.Module, inputs: tuple[torch.Tensor, ...], dynamic_batch: bool,
                    dynamic_shapes: Any = None) -> tuple[torch.export.ExportedProgram, str | None]:
    """The exported program, and why its batch is fixed when a dynamic one was asked for (else ``None``)."""
    if not dynamic_batch:
        return torch.export.export(module, inputs, strict=False), None
    if not inputs or not all(t.dim() > 0 for t in inputs):
        return torch.export.export(module, inputs, strict=False), "an input has no batch dimension"
    dims = dynamic_shapes if dynamic_shapes is not None else tuple({0: torch.export.Dim.AUTO} for _ in inputs)
    try:
        ep = dynamic_dims.export(module, inputs, dims)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else ""
        reason = f"exporting with a dynamic batch dimension failed ({type(exc).__name__}: {first[:200]})"
        return torch.export.export(module, inputs, strict=False), reason
    if _dynamic_batch(ep):
        return ep, None
    return ep, ("torch.export kept the batch dimension fixed: the graph specializes on the example's batch "
                "(an export capture at a fixed batch: fold with dynamic_shapes)")


def _name_batch_dim(model: Any) -> None:
    """Rename the exporter's symbol for dimension 0 of the inputs (``s77``) to ``batch`` everywhere."""
    symbols = {i.type.tensor_type.shape.dim[0].dim_param for i in model.graph.input
               if i.type.tensor_type.shape.dim and i.type.tensor_type.shape.dim[0].dim_param}
    if len(symbols) != 1:
        return
    old = symbols.pop()
    for vi in [*model.graph.input, *model.graph.output, *model.graph.value_info]:
        for d in vi.type.tensor_type.shape.dim:
            if d.dim_param == old:
                d.dim_param = "batch"


def export_onnx(module: nn.Module | torch.export.ExportedProgram, example_inputs: Sequence[torch.Tensor],
                path: str | os.PathLike[str], *, simplify: bool = True, dynamic_batch: bool = True,
                opset: int | None = None, protect: Sequence[str | os.PathLike[str]] = (),
                dynamic_shapes: Any = None) -> OnnxExport:
    """Export ``module`` to an ONNX file at ``path`` (steps in the module docstring).

    ``example_inputs``: one batch of positional inputs (a batch dimension first when ``dynamic_batch``).
    ``dynamic_shapes``: the dims to export dynamic (``torch.export``'s format; default: dimension 0 of every
    input, ``Dim.AUTO``). ``protect``: paths that must not be overwritten (the user's input files).
    """
    onnx = _require("onnx")
    inputs = tuple(example_inputs)
    with atomic_output(path, protect=protect) as tmp:  # checks the destination before the (slow) export
        model, static_reason = _to_onnx(module, inputs, dynamic_batch, opset, dynamic_shapes)
        simplified = False
        if simplify:
            model, simplified = _simplify(model, inputs)
        if dynamic_batch and static_reason is None:
            static_reason = check_dynamic_batch(model, inputs)
            if static_reason is not None:  # declared dynamic but is not: write it with the example's batch
                model, _ = _to_onnx(module, inputs, False, opset)
                if simplify:
                    model, simplified = _simplify(model, inputs)
        if static_reason is not None:
            batch = inputs[0].shape[0] if inputs and inputs[0].dim() else "?"
            warnings.warn(StaticBatchWarning(f"the ONNX model is written with a fixed batch of {batch}: "
                                             f"{static_reason}"), stacklevel=2)
            log.warning("ONNX export: fixed batch (%s)", static_reason)
        dynamic = dynamic_batch and static_reason is None
        onnx.checker.check_model(model)
        info = _build_info(model, dynamic, simplified, opset)
        if static_reason is not None:
            info["static_reason"] = static_reason
        meta = model.metadata_props.add()
        meta.key, meta.value = METADATA_KEY, json.dumps(info)
        if model.ByteSize() > _MAX_PROTO_BYTES:
            raise BnfoldError("the ONNX model is larger than 2 GB, which a single .onnx file cannot hold",
                              hint="use torch.onnx.export with external_data=True directly")
        onnx.save(model, str(tmp))
    log.info("wrote %s (%d nodes, opset %s)", path, len(model.graph.node), info["opset"])
    return OnnxExport(Path(path), info)


def check_dynamic_batch(model: Any, inputs: tuple[torch.Tensor, ...]) -> str | None:
    """Run ``model`` (a ModelProto declaring a dynamic batch) in ONNX Runtime at a batch size other than the
    example's: ``None`` when it runs and every output that had the example's batch has the new one, else why not.
    """
    ort = _require("onnxruntime")
    import numpy as np

    b = int(inputs[0].shape[0])
    other = b + 1
    gen = torch.Generator().manual_seed(0)
    feed = {}
    for spec, t in zip(model.graph.input, inputs, strict=False):
        shape = (other, *t.shape[1:])
        x = torch.randn(shape, generator=gen, dtype=torch.float64) if t.is_floating_point() else \
            t[:1].expand(shape).clone()  # integer inputs (token ids): repeat a valid row
        feed[spec.name] = x.to(t.dtype).numpy() if t.dtype != torch.bfloat16 else x.float().numpy()
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 4  # the failure is reported here, not on stderr
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        outs = session.run(None, feed)
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return (f"at batch {other} ONNX Runtime fails ({first[:200]}); the graph has the example batch {b} baked "
                "into its shapes (a torch.export capture at a fixed batch: fold with dynamic_shapes)")
    declared = [o.type.tensor_type.shape.dim for o in model.graph.output]
    for k, (o, dims) in enumerate(zip(outs, declared, strict=False)):
        batched = bool(dims) and (dims[0].dim_param or dims[0].dim_value == b)
        if batched and (np.ndim(o) == 0 or o.shape[0] != other):
            return f"at batch {other} output {k} has shape {tuple(np.shape(o))}: its batch is fixed at {b}"
    return None


def _to_onnx(module: nn.Module | torch.export.ExportedProgram, inputs: tuple[torch.Tensor, ...],
             dynamic_batch: bool, opset: int | None, dynamic_shapes: Any = None) -> tuple[Any, str | None]:
    """The exporter's ModelProto, and why its batch is fixed when a dynamic one was asked for (else ``None``)."""
    reason = None
    if isinstance(module, torch.export.ExportedProgram) and dynamic_batch:
        ep = module
        if not _dynamic_batch(ep):
            reason = "the ExportedProgram has a fixed batch"
    else:
        if isinstance(module, torch.export.ExportedProgram):
            module = module.module()
        ep, reason = _export_program(_without_guards(module), inputs, dynamic_batch, dynamic_shapes)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            program = torch.onnx.export(ep, (), None, dynamo=True, external_data=False, optimize=True,
                                        opset_version=opset, verbose=False)
    except Exception as exc:
        raise BnfoldError(f"torch.onnx.export failed: {type(exc).__name__}: {str(exc).splitlines()[0]}",
                          hint="run with -vv for the exporter's traceback; ops without an ONNX translation need "
                               "a custom_translation_table") from exc
    model = program.model_proto
    if dynamic_batch and reason is None:
        _name_batch_dim(model)
    return model, reason


def _simplify(model: Any, inputs: tuple[torch.Tensor, ...]) -> tuple[Any, bool]:
    onnxsim = _require("onnxsim")
    shapes = {i.name: list(t.shape) for i, t in zip(model.graph.input, inputs, strict=False)}
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            simplified, ok = onnxsim.simplify(model, check_n=1, test_input_shapes=shapes)
    except Exception as exc:
        raise BnfoldError(f"onnxsim could not simplify the model: {type(exc).__name__}: {exc}",
                          hint="export with simplify=False (--no-simplify)") from exc
    if not ok:
        raise BnfoldError("onnxsim's check failed: the simplified model computes something else than the exported one",
                          hint="export with simplify=False (--no-simplify) and report the model to onnxsim")
    return simplified, True


def _version(module: str) -> str | None:
    try:
        return str(__import__(module).__version__)
    except Exception:
        return None


def _build_info(model: Any, dynamic: bool, simplified: bool, opset: int | None) -> dict[str, Any]:
    default = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), opset)
    return {
        "target": "onnx",
        "exporter": "torch.export + torch.onnx.export(dynamo=True)",
        "opset": default,
        "dynamic_batch": dynamic,
        "simplified": simplified,
        "nodes": len(model.graph.node),
        "op_types": dict(sorted(Counter(n.op_type for n in model.graph.node).items())),
        "versions": {m: _version(m) for m in ("torch", "onnx", "onnxsim", "onnxruntime", "onnxscript")},
    }


MIN_OPSET = 18
"""The oldest opset torch's dynamo exporter translates to (``TORCHLIB_OPSET``)."""
MAX_OPSET = 23
"""The newest opset torch 2.14's exporter knows (``ONNX_MAX_OPSET``)."""


def check_opset(opset: int | None) -> None:
    """Refuse an opset the exporter would not honour (it silently replaces one below 18)."""
    if opset is not None and not MIN_OPSET <= opset <= MAX_OPSET:
        raise InputError(f"--opset {opset} is outside what the exporter supports ({MIN_OPSET}..{MAX_OPSET})",
                         hint=f"use an opset between {MIN_OPSET} and {MAX_OPSET}, or leave it out")


def check_external_data(path: Path) -> None:
    """Refuse an ONNX model whose external data lives outside the model's folder (absolute paths, ``..``,
    symbolic links leading out): loading it would read arbitrary files."""
    onnx = _require("onnx")
    from onnx.external_data_helper import _get_all_tensors

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise InputError(f"{path} is not a readable ONNX model: {type(exc).__name__}: {exc}") from exc
    folder = os.path.realpath(path.parent)
    for tensor in _get_all_tensors(model):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        real = os.path.realpath(os.path.join(folder, location))
        if os.path.isabs(location) or not real.startswith(folder + os.sep):
            raise InputError(f"{path}: tensor {tensor.name!r} keeps its data in {location!r}, outside the model's "
                             "folder; bnfold does not read files outside it",
                             hint="keep external data files next to the .onnx file (relative names)")


def is_bnfold_onnx(path: Path) -> bool:
    """``path`` is an ONNX file bnfold wrote (its metadata carries bnfold's build info)."""
    try:
        onnx = _require("onnx")
        model = onnx.load(str(path), load_external_data=False)
    except Exception:
        return False
    return any(p.key == METADATA_KEY for p in model.metadata_props)


def is_bnfold_onnx_data(path: Path) -> bool:
    """``path`` (``OUT.onnx.data``) is the external data of an ONNX file bnfold wrote: the model beside it
    (``OUT.onnx``) is bnfold's and its external tensors reference exactly this file."""
    from bnfold.io.references import onnx_external_files

    path = Path(path)
    if path.is_symlink() or not path.is_file() or not path.name.endswith(".data"):
        return False
    model = path.with_name(path.name[: -len(".data")])
    if not model.is_file() or not is_bnfold_onnx(model):
        return False
    try:
        return onnx_external_files(model) == [path]
    except Exception:
        return False


class OnnxRuntimeModel:
    """An ONNX file run by ONNX Runtime, callable on torch tensors: ``model(*tensors)`` returns a tensor (one
    output) or a tuple of tensors, on the CPU.

    Inputs must have the dtypes the model declares (no silent casts). A model exported with a fixed batch size
    ``b`` also accepts ``N = k·b`` samples: it runs ``k`` chunks and concatenates the outputs along dimension 0.
    """

    def __init__(self, path: str | os.PathLike[str], *, providers: Sequence[str] | None = None,
                 threads: int | None = None) -> None:
        ort = _require("onnxruntime")
        self.path = Path(path)
        if not self.path.is_file():
            raise InputError(f"{self.path}: no such ONNX file")
        check_external_data(self.path)
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(self.path), options,
                                                providers=list(providers or ["CPUExecutionProvider"]))
        except Exception as exc:
            raise InputError(f"{self.path} could not be loaded by ONNX Runtime: {type(exc).__name__}: {exc}",
                             hint="is it an ONNX model file? was it truncated?") from exc
        self._inputs = self.session.get_inputs()
        self.input_names = [i.name for i in self._inputs]
        self.output_names = [o.name for o in self.session.get_outputs()]
        meta = self.session.get_modelmeta().custom_metadata_map
        self.build_info: dict[str, Any] = json.loads(meta[METADATA_KEY]) if METADATA_KEY in meta else {
            "target": "onnx", "exporter": "unknown (not written by bnfold)"}

    def __repr__(self) -> str:
        return f"OnnxRuntimeModel({str(self.path)!r}, inputs={self.input_names}, outputs={self.output_names})"

    def _fixed_batch(self) -> int | None:
        dims = [i.shape[0] for i in self._inputs if i.shape]
        return dims[0] if dims and all(isinstance(d, int) for d in dims) and len(set(dims)) == 1 else None

    def _feed(self, inputs: Sequence[torch.Tensor]) -> dict[str, Any]:
        import numpy as np

        feed = {}
        for spec, t in zip(self._inputs, inputs, strict=True):
            if not isinstance(t, torch.Tensor):
                raise InputError(f"ONNX input '{spec.name}' got a {type(t).__name__}, not a tensor")
            if t.dtype == torch.bfloat16:
                raise InputError(f"ONNX input '{spec.name}' got bfloat16, which numpy cannot hold")
            array = t.detach().cpu().contiguous().numpy()
            expected = _ORT_TYPES.get(spec.type)
            if expected is not None and array.dtype != np.dtype(expected):
                raise InputError(f"ONNX input '{spec.name}' expects {expected}, got {array.dtype}",
                                 hint=f"cast the input, e.g. x.to(torch.{expected})")
            feed[spec.name] = array
        return feed

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        if len(inputs) != len(self._inputs):
            raise InputError(f"{self.path.name} takes {len(self._inputs)} inputs ({', '.join(self.input_names)}), "
                             f"got {len(inputs)}")
        b = self._fixed_batch()
        n = inputs[0].shape[0] if inputs and inputs[0].dim() else None
        if b is not None and n is not None and n != b and n % b == 0 \
                and all(t.dim() and t.shape[0] == n for t in inputs):
            chunks = [self._run([t[i:i + b] for t in inputs]) for i in range(0, n, b)]
            outs = [torch.cat(parts) for parts in zip(*chunks, strict=True)]
        else:
            outs = self._run(list(inputs))
        return outs[0] if len(outs) == 1 else tuple(outs)

    def _run(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        try:
            results = self.session.run(None, self._feed(inputs))
        except InputError:
            raise
        except Exception as exc:
            first = str(exc).splitlines()[0] if str(exc) else ""
            raise InputError(f"ONNX Runtime failed on {self.path.name}: {type(exc).__name__}: {first}",
                             hint="check the input shapes against the model's: "
                                  + ", ".join(f"{i.name} {i.shape}" for i in self._inputs)) from exc
        return [torch.from_numpy(r) for r in results]

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Copy the model file to ``path`` (atomically)."""
        with atomic_output(path, protect=[self.path]) as tmp:
            shutil.copyfile(self.path, tmp)
        return Path(path)


_ORT_TYPES = {
    "tensor(float)": "float32", "tensor(double)": "float64", "tensor(float16)": "float16",
    "tensor(int64)": "int64", "tensor(int32)": "int32", "tensor(int8)": "int8", "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}


class OnnxTarget:
    """The :class:`~bnfold.targets.Target` for ONNX. ``options``: ``path`` (default: a new temporary folder),
    ``simplify`` (True), ``dynamic_batch`` (True), ``opset`` (exporter default), ``providers`` (CPU),
    ``protect`` (paths ``path`` must not be: the user's input files), ``dynamic_shapes`` (see
    :func:`export_onnx`)."""

    name = "onnx"

    def lower(self, gm: torch.fx.GraphModule, example_inputs: Sequence[torch.Tensor],
              options: Mapping[str, Any] | None = None) -> OnnxRuntimeModel:
        opts = dict(options or {})
        path = opts.get("path") or Path(tempfile.mkdtemp(prefix="bnfold-onnx-")) / "model.onnx"
        export_onnx(gm, example_inputs, path, simplify=bool(opts.get("simplify", True)),
                    dynamic_batch=bool(opts.get("dynamic_batch", True)), opset=opts.get("opset"),
                    protect=opts.get("protect", ()), dynamic_shapes=opts.get("dynamic_shapes"))
        return OnnxRuntimeModel(path, providers=opts.get("providers"))
