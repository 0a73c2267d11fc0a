"""Typed target options and the step's typed configuration: a misspelled option is an error naming the valid ones
(exit 2 from the CLI), never silently ignored."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import bnfold
from bnfold.cli import main
from bnfold.deploy import FoldStage, OptimizeConfig, RecalibrateStage
from bnfold.errors import InputError
from bnfold.targets import get_target
from bnfold.targets.options import OnnxOptions, TorchOptions, TvmOptions, option_names, parse_option, target_options


def _gm() -> torch.fx.GraphModule:
    return torch.fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval())


@pytest.mark.parametrize(("name", "bad", "near"), [("torch", "dynamic_shape", "dynamic_shapes"),
                                                   ("onnx", "simplfy", "simplify"),
                                                   ("tvm", "tune_trails", "tune_trials")])
def test_misspelled_target_option_names_the_valid_ones(name: str, bad: str, near: str) -> None:
    target = get_target(name)
    with pytest.raises(InputError) as err:
        target.lower(_gm(), (torch.randn(1, 3, 8, 8),), {bad: 1})
    text = str(err.value)
    assert repr(bad) in text and f"did you mean {near!r}" in text
    assert all(n in text for n in option_names(target.options_type))


def test_typed_and_mapping_options_are_the_same() -> None:
    assert target_options(TvmOptions, {"tune_trials": 3, "layout": "NHWC"}, what="tvm") == \
        TvmOptions(tune_trials=3, layout="NHWC")
    assert target_options(OnnxOptions, None, what="onnx") == OnnxOptions()
    opts = TorchOptions(dynamic_shapes=None)
    assert target_options(TorchOptions, opts, what="torch") is opts
    with pytest.raises(InputError, match="must be a TorchOptions or a mapping"):
        target_options(TorchOptions, ["export"], what="torch")  # type: ignore[arg-type]


def test_torch_target_with_typed_options_runs() -> None:
    gm, x = _gm(), torch.randn(1, 3, 8, 8)
    artifact = get_target("torch").lower(gm, (x,), TorchOptions())
    torch.testing.assert_close(artifact(x), gm(x), rtol=0, atol=0)


@pytest.mark.parametrize(("field", "value", "match"), [("tune_trials", -1, "tune_trials must be"),
                                                       ("layout", "NWHC", "unknown TVM layout"),
                                                       ("num_cores", 0, "num_cores must be")])
def test_tvm_option_values_are_checked(field: str, value: object, match: str) -> None:
    with pytest.raises(InputError, match=match):
        TvmOptions(**{field: value})


def test_parse_option_converts_to_the_field_type() -> None:
    assert parse_option(TvmOptions, "num-cores=4", what="TVM") == ("num_cores", 4)
    assert parse_option(TvmOptions, "prepack=false", what="TVM") == ("prepack", False)
    assert parse_option(TvmOptions, "layout=none", what="TVM") == ("layout", None)
    assert parse_option(TvmOptions, "dynamic_batch=1..8", what="TVM") == ("dynamic_batch", (1, 8))
    for text, match in (("layout", "not KEY=VALUE"), ("num_cores=four", "takes an integer"),
                        ("prepack=maybe", "true or false"), ("lay_out=NHWC", "did you mean 'layout'"),
                        ("num_cores=", "takes an integer")):
        with pytest.raises(InputError, match=match):
            parse_option(TvmOptions, text, what="TVM")
    with pytest.raises(InputError, match="cannot be set from the command line"):
        parse_option(OnnxOptions, "providers=CPU", what="ONNX")


def test_optimize_config_checks_every_stage() -> None:
    with pytest.raises(InputError, match="unknown recalibration mode 'sequental'; valid: batch, sequential"):
        RecalibrateStage(mode="sequental")
    with pytest.raises(InputError, match="unknown capture 'exprt'; valid: symbolic, export, auto"):
        FoldStage(capture="exprt")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="unknown TVM target 'metal'"):
        OptimizeConfig(tvm=TvmOptions(target="metal"))
    with pytest.raises(InputError, match=r"OptimizeConfig\.onnx must be a OnnxOptions or None, got dict"):
        OptimizeConfig(onnx={"simplify": False})  # type: ignore[arg-type]
    assert OptimizeConfig().replace(tvm=None).tvm is None


def test_optimize_takes_one_config_and_refuses_both(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    x = torch.randn(2, 3, 8, 8)
    config = OptimizeConfig(onnx=None, tvm=None, html=False)
    with pytest.raises(InputError, match="either config= or the options capture, tune_trials"):
        bnfold.optimize(model, (x,), tmp_path / "a", config=config, capture="export", tune_trials=4)
    result = bnfold.optimize(model, (x,), tmp_path / "b", config=config, protect=[])  # [] is the default ()
    assert result.passed and sorted(result.artifacts) == ["folded", "report"]
    assert not (tmp_path / "b" / "report.html").exists()


def test_cli_tvm_option_misspelled_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    x = torch.randn(2, 3, 8, 8)
    pt2 = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(model, (x,)), str(pt2))
    np.save(tmp_path / "x.npy", x.numpy())
    out = tmp_path / "out"
    assert main(["optimize", str(pt2), "-o", str(out), "--tvm-option", "layuot=NHWC"]) == 2
    err = capsys.readouterr().err
    assert "unknown TVM option 'layuot'" in err and "did you mean 'layout'" in err and "num_cores" in err
    assert main(["optimize", str(pt2), "-o", str(out), "--target", "none", "--tvm-option", "layout=NHWC"]) == 2
    assert main(["optimize", str(pt2), "-o", str(out), "--tvm-option", "tune_trials=8"]) == 2
    assert "--tune-trials" in capsys.readouterr().err
    assert not out.exists()
