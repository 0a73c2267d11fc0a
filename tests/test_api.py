"""Issue 2 acceptance: bnfold.fold on real torchvision architectures, both capture modes."""

from __future__ import annotations

import pytest
import torch
import torchvision
from helpers import count_batchnorm, randomize_bn, tiny_vit
from torch import nn

import bnfold
from bnfold.parity import Tolerance, rounding_depth

MODELS = {
    "resnet18": (lambda: torchvision.models.resnet18(), (1, 3, 64, 64)),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(), (1, 3, 64, 64)),
    "r3d_18": (lambda: torchvision.models.video.r3d_18(), (1, 3, 4, 32, 32)),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_fold_torchvision_leaves_no_batchnorm(name: str, capture_mode: str) -> None:
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = randomize_bn(build())
    x = torch.randn(shape)
    result = bnfold.fold(model, (x,), capture=capture_mode)
    n_bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert result.report.capture == capture_mode
    assert len(result.report.folded) == n_bn, result.report
    assert result.report.skipped == []
    assert count_batchnorm(result.module) == 0
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in result.module.modules())
    # parity: vs the unfolded fp32 model and the float64 reference
    assert result.report.parity is not None and result.report.parity["passed"], result.report.parity
    with torch.no_grad():
        ref = model(x)
        got = result.module(x)
        ref64 = model.double()(x.double())
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    err_folded = float((got.double() - ref64).pow(2).mean().sqrt())
    err_orig = float((ref.double() - ref64).pow(2).mean().sqrt())
    tol = Tolerance.for_dtype(torch.float32, rounding_depth(model))
    assert err_folded <= tol.bound(err_orig, float(ref64.pow(2).mean().sqrt()))


def test_fold_does_not_modify_the_callers_model() -> None:
    model = randomize_bn(torchvision.models.resnet18())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    bnfold.fold(model, (torch.randn(1, 3, 32, 32),))
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


class SharedConv(nn.Module):
    """conv output feeds a BN *and* another op: the BN must stay (folding would change the other path)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.bn(y) + torch.sigmoid(y)


def test_multi_user_producer_keeps_its_bn(capture_mode: str) -> None:
    model = randomize_bn(SharedConv())
    x = torch.randn(2, 3, 10, 10)
    result = bnfold.fold(model, (x,), capture=capture_mode)
    assert result.report.folded == []
    (skipped,) = result.report.skipped
    assert "also feeds" in skipped.reason
    assert result.report.parity and result.report.parity["passed"]
    torch.testing.assert_close(result.module(x), model(x), rtol=1e-5, atol=1e-5)


class ConvBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def test_training_mode_bn_is_left_with_reason() -> None:
    model = randomize_bn(ConvBN())
    model.bn.train()
    report = bnfold.inspect(model, (torch.randn(2, 3, 8, 8),), capture="symbolic")
    assert report.folded == []
    (skipped,) = report.skipped
    assert "training mode" in skipped.reason and "eval()" in skipped.reason


def test_track_running_stats_false_is_left_with_reason(capture_mode: str) -> None:
    model = ConvBN().eval()
    model.bn = nn.BatchNorm2d(8, track_running_stats=False).eval()
    report = bnfold.inspect(model, (torch.randn(2, 3, 8, 8),), capture=capture_mode)
    assert report.folded == []
    (skipped,) = report.skipped
    assert "running stat" in skipped.reason or "track_running_stats" in skipped.reason


def test_report_formats() -> None:
    model = randomize_bn(ConvBN())
    result = bnfold.fold(model, (torch.randn(2, 3, 8, 8),))
    d = result.report.to_dict()
    assert d["candidates"] == 1 and len(d["folded"]) == 1 and d["skipped"] == []
    text = str(result.report)
    assert "1 folded" in text and "bn" in text and "parity PASS" in text
    module, report = result  # tuple-unpacking convenience
    assert module is result.module and report is result.report


def test_second_fold_changes_nothing(capture_mode: str) -> None:
    model = randomize_bn(torchvision.models.resnet18())
    x = torch.randn(1, 3, 32, 32)
    once = bnfold.fold(model, (x,), capture=capture_mode).module
    again = bnfold.fold(once, (x,), capture=capture_mode)
    assert again.report.folded == [] and again.report.skipped == []
    assert not again.report.modified, again.report.changes


def test_folded_module_is_a_plain_compiled_graph_module() -> None:
    """Symbolic capture generates no code for the graph as traced (nothing runs it: issue 25); the folded module is
    a plain GraphModule, named after the model, whose code is that of its folded graph."""
    from torch.fx._lazy_graph_module import _LazyGraphModule

    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval())
    x = torch.randn(2, 3, 8, 8)
    gm = bnfold.fold(model, x, capture="symbolic", check=False).module
    assert isinstance(gm, torch.fx.GraphModule) and not isinstance(gm, _LazyGraphModule)
    assert type(gm).__name__ == "Sequential"
    assert gm.code == gm.graph.python_code("self").src and "batch_norm" not in gm.code
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-4, atol=1e-5)


def test_report_times_the_parity_check_apart() -> None:
    """The default check is timed on its own (issue 25): one forward of the folded module and one of a float64
    copy of the model — no batch-independence forwards (tests/parity/test_lazy_reference.py counts them)."""
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval())
    x = torch.randn(2, 3, 8, 8)
    report = bnfold.fold(model, x, capture="symbolic").report
    assert set(report.timings) == {"capture", "fold", "check", "total"}
    assert report.timings["total"] >= report.timings["capture"] + report.timings["fold"] + report.timings["check"]
    assert report.parity is not None and report.parity["passed"] and "batch_independent" not in report.parity
    assert "parity check" in report.render() and report.to_dict()["timings"] == report.timings
    assert "check" not in bnfold.fold(model, x, capture="symbolic", check=False).report.timings


def test_the_garbage_collector_is_left_as_it_was() -> None:
    """fold pauses Python's cyclic collector during a symbolic capture and the passes (issue 25: their full
    collections grow with the square of the graph), and leaves it as it found it — also after a failure."""
    import gc

    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval())
    x = torch.randn(2, 3, 8, 8)
    assert gc.isenabled()
    bnfold.fold(model, x, capture="symbolic", check=False)
    assert gc.isenabled()
    with pytest.raises(bnfold.errors.CaptureError):
        bnfold.fold(model, torch.randn(2, 5, 8, 8), capture="symbolic", check=False)  # wrong channel count
    assert gc.isenabled()
    gc.disable()
    try:
        bnfold.fold(model, x, capture="symbolic", check=False)
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_import_is_cheap_and_no_submodule_hides_an_api_name() -> None:
    """``import bnfold`` imports neither torch, ONNX nor TVM (the CLI starts fast); the API is imported on first
    use; no API name is a submodule's, so importing every subpackage first (``bnfold.recalibration``,
    ``bnfold.deploy``, ``bnfold.quantization``) leaves ``bnfold.recalibrate``/``optimize``/``quantize`` the functions
    — with a plain module, no class swap."""
    import subprocess
    import sys

    code = ("import sys, types, bnfold; assert not {'torch', 'onnx', 'tvm'} & set(sys.modules), sorted(sys.modules)\n"
            "assert type(bnfold) is types.ModuleType\n"
            "import bnfold.recalibration.core, bnfold.deploy.step, bnfold.quantization.core\n"
            "import pkgutil, importlib\n"
            "subs = {m.name for m in pkgutil.iter_modules(bnfold.__path__)}\n"
            "assert not subs & set(bnfold.__all__), subs & set(bnfold.__all__)\n"
            "for name in ('recalibrate', 'optimize', 'quantize', 'diagnose', 'compile'):\n"
            "    f = getattr(bnfold, name)\n"
            "    assert callable(f) and f.__name__ == name and not isinstance(f, types.ModuleType), name\n"
            "assert bnfold.fold.__module__ == 'bnfold.api' and set(dir(bnfold)) >= set(bnfold.__all__)\n")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- capture="auto" keeps the better fold; reports name module paths (issue 12) ---------------------------------

def _assert_exact(model: nn.Module, folded: nn.Module, *batches: torch.Tensor) -> None:
    from bnfold.parity import compare

    report = compare(model, folded, [(b,) for b in batches])  # vs the unfolded model and a float64 reference
    assert report.passed, report.to_dict()


def test_auto_folds_as_many_as_the_better_capture() -> None:
    model, x = tiny_vit(), torch.randn(2, 3, 32, 32)
    symbolic = bnfold.fold(model, x, capture="symbolic").report
    export = bnfold.fold(model, x, capture="export").report
    assert len(symbolic.folded) < len(export.folded) == 5  # symbolic loses the two attention-input norms
    result = bnfold.fold(model, x)
    report = result.report
    assert report.capture == "export" and len(report.folded) == len(export.folded)
    assert report.capture_choice == f"it folds 5, symbolic folds {len(symbolic.folded)}"
    assert report.capture_alternatives is not None
    assert report.capture_alternatives["symbolic"]["folded"] == len(symbolic.folded)
    assert report.capture_alternatives["export"]["folded"] == 5
    assert "capture: export (it folds 5" in report.render()
    _assert_exact(model, result.module, x)


def test_auto_prefers_symbolic_on_a_tie() -> None:
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.BatchNorm2d(8),
                                       nn.ReLU()).eval())  # the second BN is left, so export runs too
    report = bnfold.fold(model, torch.randn(2, 3, 16, 16)).report
    assert report.capture == "symbolic" and len(report.folded) == 1 and len(report.skipped) == 1
    assert report.capture_choice is not None and "symbolic keeps the model's modules" in report.capture_choice
    assert report.to_dict()["capture_alternatives"]["export"]["folded"] == 1


def test_auto_stops_when_symbolic_leaves_nothing_to_gain() -> None:
    """Every candidate folded (or none at all): export cannot fold more, so it does not run (issue 25); the
    report says so."""
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()).eval())
    x = torch.randn(2, 3, 16, 16)
    report = bnfold.fold(model, x).report
    assert report.capture == "symbolic" and len(report.folded) == 1
    assert report.capture_choice == "symbolic capture folds every candidate (1): nothing left for export to gain, " \
                                    "so it was not run"
    assert list(report.capture_alternatives or {}) == ["symbolic"]
    report = bnfold.fold(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()), x).report
    assert report.capture_choice is not None and report.capture_choice.startswith(
        "symbolic capture finds no normalization to fold")


class _Encoder(nn.Module):
    """A pre-LN transformer layer: ``nn.TransformerEncoderLayer`` is a leaf of symbolic tracing (a torch.nn
    module), so its LayerNorms are candidates of the export capture only."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True, norm_first=True)
        self.head = nn.Linear(16, 4)
        for ln in (self.enc.norm1, self.enc.norm2):
            nn.init.normal_(ln.weight)
            nn.init.normal_(ln.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.enc(x))


def test_auto_runs_export_for_norms_hidden_in_a_whole_module() -> None:
    model, x = _Encoder().eval(), torch.randn(2, 5, 16)
    assert bnfold.fold(model, x, capture="symbolic").report.folded == []
    result = bnfold.fold(model, x)
    assert result.report.capture == "export" and len(result.report.folded) == 2
    assert result.report.capture_choice == "it folds 2, symbolic folds 0"
    _assert_exact(model, result.module, x)


class _QKV(nn.Module):
    """One LayerNorm feeding three separate projections (Llama-style q/k/v)."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.q, self.k, self.v = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)
        nn.init.normal_(self.norm.weight)
        nn.init.normal_(self.norm.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return torch.softmax(self.q(h) @ self.k(h).transpose(-1, -2), -1) @ self.v(h)


def test_a_norm_folded_into_several_linears_names_all_of_them(capture_mode: str) -> None:
    model, x = _QKV().eval(), torch.randn(2, 5, 16)
    result = bnfold.fold(model, x, capture=capture_mode)
    [entry] = result.report.folded
    assert entry.path == "norm"
    assert entry.into == "q, k, v"  # module paths in both captures, not export's node names
    _assert_exact(model, result.module, x)


def test_an_exported_program_reports_module_paths_and_keeps_its_dynamic_batch(tmp_path) -> None:
    from bnfold.io.models import load_model

    model = randomize_bn(torchvision.models.resnet18(num_classes=10).eval())
    x = torch.randn(2, 3, 32, 32)
    batch = torch.export.Dim("batch", min=1, max=16)
    torch.export.save(torch.export.export(model, (x,), dynamic_shapes=({0: batch},)), str(tmp_path / "r.pt2"))
    loaded = load_model(tmp_path / "r.pt2")
    result = bnfold.fold(loaded.module, loaded.example_inputs)
    report = result.report
    assert report.capture == "export" and "exported program" in (report.capture_choice or "")
    paths = {e.path: e.into for e in report.folded}
    assert paths["bn1"] == "conv1" and paths["layer4.1.bn2"] == "layer4.1.conv2"  # not batch_norm_default_…
    assert report.dynamic_shapes == [{"input": 0, "dim": 0, "name": "batch", "min": 1, "max": 16}]
    assert result.dynamic_shapes is not None
    _assert_exact(model, result.module, *(torch.randn(b, 3, 32, 32) for b in (1, 3, 7)))


def test_fold_with_dynamic_shapes_runs_at_other_batch_sizes() -> None:
    model, x = tiny_vit(), torch.randn(2, 3, 32, 32)
    batch = torch.export.Dim("batch", min=1, max=16)
    result = bnfold.fold(model, x, capture="export", dynamic_shapes=({0: batch},))
    assert len(result.report.folded) == 5
    assert result.report.dynamic_shapes == [{"input": 0, "dim": 0, "name": "batch", "min": 1, "max": 16}]
    _assert_exact(model, result.module, *(torch.randn(b, 3, 32, 32) for b in (1, 3, 7)))
    static = bnfold.fold(model, x, capture="export", check=False).module
    with pytest.raises((RuntimeError, AssertionError)):  # without dynamic_shapes: fixed at the example batch
        static(torch.randn(3, 3, 32, 32))
