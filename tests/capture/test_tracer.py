"""``bnfold.capture.tracer``: plain symbolic tracing where it works (shape-generic, no decisions), tracing guided by
the example inputs where the model branches on shapes or dtypes (decisions recorded, inputs checked), a clear error
on data-dependent control flow, and ``auto`` falling back to export when symbolic capture fails."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import bnfold
from bnfold.capture import capture
from bnfold.capture.tracer import BnfoldTracer, DataDependentControlFlow, check_example_input, symbolic_trace
from bnfold.errors import CaptureError
from bnfold.parity import compare

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


def _randomize(model: nn.Module) -> nn.Module:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
    return model.eval()


class Plain(nn.Module):
    """LayerNorm → Linear, no Python decision on the input."""

    def __init__(self) -> None:
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x))


class OptionalMask(Plain):
    """An optional argument left at its default: it must stay ``None`` while tracing, not become an input."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm(x)
        if mask is not None:
            h = h * mask
        return self.fc(h)


class ShapeBranches(Plain):
    """Branches on a length, a rank, a dtype, and slices a buffer by a traced length, like transformers' models
    (``if batch != position_ids.shape[0]``, ``position_ids[:, :seq_len]``, ``if x.dtype != weight.dtype``)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("positions", torch.arange(16.0).unsqueeze(-1) / 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.fc.weight.dtype:
            x = x.to(self.fc.weight.dtype)
        batch, seq, _ = x.shape
        pos = self.positions[:seq]
        if batch != pos.shape[0]:
            pos = pos.unsqueeze(0).expand(batch, -1, -1)
        if len(x.shape) == 3 and seq > 1:
            x = x + pos
        return self.fc(self.norm(x))


class ValueBranch(Plain):
    """Branches on the input's values: no graph can hold that."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        if h.sum() > 0:  # the line the error names
            h = -h
        return self.fc(h)


class DataDependentShape(Plain):
    """Branches on a shape that depends on values (``nonzero``): its fake value cannot be computed."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        if torch.nonzero(h).shape[0] > 0:
            h = -h
        return self.fc(h)


class TensorCheck(Plain):
    """Refuses anything but a real tensor, which a symbolic proxy is not (``torch.export`` passes one)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(x):
            raise TypeError("TensorCheck takes a tensor")
        return self.fc(self.norm(x))


X = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))


def test_plain_model_is_traced_without_decisions_or_input_checks() -> None:
    model = _randomize(Plain())
    traced = symbolic_trace(model, (X,))
    assert traced.decisions == ()
    assert not [n for n in traced.module.graph.nodes if n.target is check_example_input]
    torch.testing.assert_close(traced.module(X[:1, :3]), model(X[:1, :3]))  # any shape


def test_optional_argument_keeps_its_default() -> None:
    """Regression: fx made ``mask`` a second input, so ``mask is not None`` held while tracing and the graph
    multiplied by an input nobody passes."""
    model = _randomize(OptionalMask())
    traced = symbolic_trace(model, (X,))
    assert [n.target for n in traced.module.graph.nodes if n.op == "placeholder"] == ["x"]
    assert "mul" not in traced.module.code
    torch.testing.assert_close(traced.module(X), model(X))


def test_shape_branches_are_taken_on_the_example_and_recorded() -> None:
    model = _randomize(ShapeBranches())
    with pytest.raises(torch.fx.proxy.TraceError, match="cannot be used as inputs to control flow"):
        BnfoldTracer(n_inputs=1).trace(model)  # plain symbolic tracing gives up
    traced = symbolic_trace(model, (X,))
    torch.testing.assert_close(traced.module(X), model(X), rtol=0, atol=0)
    assert traced.decisions and all("test_tracer.py:" in d for d in traced.decisions), traced.decisions
    assert any("bool = True" in d for d in traced.decisions)
    assert "positions" in traced.module.code  # the buffer is read in the graph, sliced by the traced length


def test_specialized_graph_refuses_other_shapes() -> None:
    """The graph holds for the example shapes only: another shape is refused (as an exported program refuses
    it), naming the input and the shape it was traced for."""
    traced = symbolic_trace(_randomize(ShapeBranches()), (X,))
    with pytest.raises(ValueError, match=r"input 'x' is \(2, 4, 8\) torch.float32, but this graph was traced for "
                                         r"\(2, 5, 8\) torch.float32 only"):
        traced.module(X[:, :4])


def test_specialized_trace_is_refused_with_dynamic_shapes() -> None:
    model = _randomize(ShapeBranches())
    with pytest.raises(torch.fx.proxy.TraceError, match="would hold for those shapes only"):
        symbolic_trace(model, (X,), specialize=False)
    batch = torch.export.Dim("batch", min=2, max=8)
    with pytest.raises(CaptureError, match=r"symbolic: TraceError: tracing takes .* decisions"):
        capture(model, (X,), "symbolic", dynamic_shapes=({0: batch},))


def test_fold_through_guided_capture_matches_export() -> None:
    model = _randomize(ShapeBranches())
    results = {mode: bnfold.fold(model, (X,), capture=mode) for mode in ("symbolic", "export")}
    for mode, r in results.items():
        assert r.report.capture == mode
        assert [e.path for e in r.report.folded] == ["norm"], (mode, r.report)
        assert compare(model, r.module, [X]).passed


def test_data_dependent_control_flow_fails_naming_the_line() -> None:
    model = _randomize(ValueBranch())
    with pytest.raises(DataDependentControlFlow, match=r"data-dependent control flow at .*test_tracer.py:\d+: bool "
                                                       r"of a tensor's values"):
        symbolic_trace(model, (X,))
    with pytest.raises(CaptureError, match="symbolic: DataDependentControlFlow: data-dependent control flow at"):
        capture(model, (X,), "symbolic")


def test_a_value_that_cannot_be_computed_is_named_with_the_reason() -> None:
    with pytest.raises(torch.fx.proxy.TraceError, match=r"bool of .* at .*test_tracer.py:\d+, whose fake value could "
                                                        r"not be computed \(.*nonzero"):
        symbolic_trace(_randomize(DataDependentShape()), (X,))


def test_auto_falls_back_to_export_when_symbolic_capture_fails() -> None:
    model = _randomize(TensorCheck())
    result = bnfold.fold(model, (X,), capture="auto")
    assert result.report.capture == "export"
    assert "TensorCheck takes a tensor" in result.report.capture_alternatives["symbolic"]["error"]
    assert [e.path for e in result.report.folded] == ["norm"]


# -- modules called by the model that are not its submodules (transformers 5.25's hub-kernel wrappers) ----------


class _RotaryKernel(nn.Module):
    """A parameter-free module standing for a function, as ``kernels.use_kernel_forward_from_hub`` makes of
    ``transformers``' ``apply_rotary_pos_emb`` (5.25): called by the model, never registered in it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


_ROTATE = _RotaryKernel()  # held in a global
_SCALE = nn.Linear(8, 8)  # a module with parameters, held in a global


class CallsOutsideModules(Plain):
    """LayerNorm → (a global parameter-free module) → (a global module with parameters) → (a module held in a
    closure) → Linear: none of the three is a submodule."""

    def __init__(self) -> None:
        super().__init__()
        shift = nn.LayerNorm(8)
        with torch.no_grad():
            shift.bias.fill_(0.5)
        self.shifted = lambda h: shift(h)  # a closure: not registered either

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = _ROTATE(self.norm(x))
        return self.fc(self.shifted(_SCALE(h)) + h)


class OutsideModuleThenBranch(CallsOutsideModules):
    """The same, with a shape decision, so the guided tracer has to inline them too."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] > 1:
            x = x * 2
        return super().forward(x)


@pytest.mark.parametrize("model_cls", [CallsOutsideModules, OutsideModuleThenBranch])
def test_modules_outside_the_model_are_inlined_not_an_error(model_cls: type[nn.Module]) -> None:
    """Regression (transformers 5.25, ``NameError: module is not installed as a submodule``): a module that the
    model calls but does not hold is traced through as its forward; its weights become the graph's own copies, so
    folding never writes into it, and symbolic capture folds what export folds."""
    model = _randomize(model_cls())
    outside = {k: v.clone() for k, v in _SCALE.state_dict().items()}
    traced = symbolic_trace(model, (X,))
    assert not [n for n in traced.module.graph.nodes if n.op == "call_module" and n.target not in ("norm", "fc")]
    torch.testing.assert_close(traced.module(X), model(X), rtol=0, atol=0)
    results = {mode: bnfold.fold(model, (X,), capture=mode) for mode in ("symbolic", "export")}
    assert results["symbolic"].report.capture == "symbolic"
    assert [e.path for e in results["symbolic"].report.folded] == [e.path for e in results["export"].report.folded]
    for r in results.values():
        assert compare(model, r.module, [X]).passed
    for k, v in _SCALE.state_dict().items():
        assert torch.equal(v, outside[k]), k  # the module outside the model is untouched


def test_capture_error_keeps_its_cause() -> None:
    """A wrapped failure is chained (``raise ... from``), so ``-v`` and a debugger show where it came from."""
    with pytest.raises(CaptureError) as info:
        capture(_randomize(ValueBranch()), (X,), "symbolic")
    assert isinstance(info.value.__cause__, DataDependentControlFlow)
