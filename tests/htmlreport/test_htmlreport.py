"""report.html: self-contained, every model string escaped, charts that say ∞/n/a instead of lying, written like every
other output; and, in a real headless Chromium, rendered with no console error and every chart present."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from browser import load_page, require_chromium
from helpers import randomize_bn
from torch import nn

import bnfold
from bnfold.cli import main
from bnfold.demo import load_digits, load_pretrained, shift_images
from bnfold.htmlreport import drift_page, is_bnfold_html, optimize_page, parity_page
from bnfold.htmlreport.svg import Series, bar_chart

HOSTILE = "<script>alert(1)</script>"
LEFT = "&amp;<b>"


class Hostile(nn.Module):
    """A conv-BN net whose module names are HTML: a report that does not escape them would run a script."""

    def __init__(self) -> None:
        super().__init__()
        self.add_module(HOSTILE, nn.Conv2d(3, 8, 3, padding=1))
        self.add_module("bn<img src=x onerror=alert(1)>", nn.BatchNorm2d(8))
        self.add_module(LEFT, nn.BatchNorm2d(8, track_running_stats=False))  # left, with a reason

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mods = dict(self.named_children())
        y = mods["bn<img src=x onerror=alert(1)>"](mods[HOSTILE](x))
        return mods[LEFT](y).relu()


@pytest.fixture(scope="module")
def hostile_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = randomize_bn(Hostile()).eval()
    calib = [(torch.randn(4, 3, 16, 16) * 2 + 1,) for _ in range(3)]
    out = tmp_path_factory.mktemp("hostile") / "deploy"
    bnfold.optimize(model, (torch.randn(4, 3, 16, 16),), out, calibration=calib, tvm_target=None)
    return out


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    digits = load_digits()
    calib = [(shift_images(digits.x_train[i:i + 128]),) for i in range(0, 512, 128)]
    out = tmp_path_factory.mktemp("digits") / "deploy"
    bnfold.optimize(load_pretrained(), (digits.x_test[:16],), out, calibration=calib,
                    validation=[(shift_images(digits.x_test, seed=1),)], tvm_target=None)
    return out


def _no_markup_from_the_model(page: str, escaped: str = "&lt;script&gt;alert(1)&lt;/script&gt;") -> None:
    assert "<script" not in page.lower() and "<img" not in page.lower()
    assert escaped in page


def test_page_escapes_every_model_string(hostile_run: Path) -> None:
    page = (hostile_run / "report.html").read_text()
    _no_markup_from_the_model(page)
    assert "bn&lt;img src=x onerror=alert(1)&gt;" in page and "&amp;amp;&lt;b&gt;" in page
    report = json.loads((hostile_run / "report.json").read_text())  # the JSON twin keeps the names as they are
    assert any(e["path"] == LEFT for e in report["fold"]["skipped"]), report["fold"]
    assert re.search(r"<svg[^>]*id=\"drift-chart\"", page) and 'id="sqnr-chart"' in page


def test_page_is_self_contained(digits_run: Path) -> None:
    page = (digits_run / "report.html").read_text()
    assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:|//)", page), "an external reference"
    assert "<script" not in page and "@import" not in page and "url(" not in page
    assert "default-src &#x27;none&#x27;" in page and is_bnfold_html(digits_run / "report.html")
    assert json.loads((digits_run / "report.json").read_text())["artifacts"]["report_html"] == "report.html"
    names = {p.name for p in digits_run.iterdir()}
    assert {"report.html", "report.json", "report.txt"} <= names


def test_chart_writes_nonfinite_values_as_text() -> None:
    svg = bar_chart(["a", "b", "c", "d"], [Series("s", [math.inf, math.nan, None, 0.0])], title="t", log=True)
    bars = re.findall(r'<rect x="\d+" y="[\d.]+" width="([\d.]+)"[^>]*class="bar"', svg)
    assert bars == []  # ∞, NaN, missing and 0 on a log axis: no bar drawn
    assert ">∞<" in svg and svg.count(">n/a<") == 2 and ">0<" in svg
    svg = bar_chart(["x", "y"], [Series("s", [1.0, 100.0])], title="t", log=True, threshold=10.0)
    widths = [float(w) for w in re.findall(r'width="([\d.]+)" height="\d+" fill="[^"]+" class="bar"', svg)]
    assert widths[0] < widths[1] and 'class="threshold"' in svg


def test_pages_of_diagnose_and_check_escape_names() -> None:
    from bnfold.parity import compare
    from bnfold.recalibration.drift import diagnose

    torch.manual_seed(0)
    model = randomize_bn(Hostile()).eval()
    report = diagnose(model, [(torch.randn(4, 3, 16, 16),)], progress=False)
    _no_markup_from_the_model(drift_page(report, HOSTILE), "bn&lt;img src=x onerror=alert(1)&gt;")
    page = parity_page(compare(model, model, [(torch.randn(4, 3, 16, 16),)]), HOSTILE, "b.onnx")
    _no_markup_from_the_model(page)
    assert ">∞<" in page  # identical: SQNR is infinite, written, not drawn


def test_diagnose_and_check_html_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    digits = load_digits()
    model = load_pretrained()
    pt2 = tmp_path / "digits.pt2"
    torch.export.save(torch.export.export(model, (digits.x_test[:16],)), str(pt2))
    data = tmp_path / "data.npz"
    np.savez(data, x=shift_images(digits.x_test[:64]).numpy())
    html = tmp_path / "drift.html"
    assert main(["diagnose", str(pt2), "--data", str(data), "--html", str(html), "--no-progress"]) == 0
    assert 'id="drift-chart"' in html.read_text() and is_bnfold_html(html)
    assert main(["diagnose", str(pt2), "--data", str(data), "--html", str(html), "--no-progress"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["diagnose", str(pt2), "--data", str(data), "--html", str(html), "--force", "--no-progress"]) == 0
    # never over an input, never over a file bnfold did not write
    assert main(["diagnose", str(pt2), "--data", str(data), "--html", str(data), "--force"]) == 2
    assert "refusing" in capsys.readouterr().err and np.load(data)["x"].shape == (64, 1, 8, 8)
    foreign = tmp_path / "notes.html"
    foreign.write_text("<p>mine</p>")
    assert main(["check", str(pt2), str(pt2), "--data", str(data), "--html", str(foreign), "--force"]) == 2
    assert foreign.read_text() == "<p>mine</p>"
    page = tmp_path / "check.html"
    assert main(["check", str(pt2), str(pt2), "--data", str(data), "--html", str(page)]) == 0
    assert 'id="sqnr-chart"' in page.read_text() and [p.name for p in tmp_path.glob(".*partial*")] == []


def test_optimize_page_renders_from_the_result_alone(digits_run: Path) -> None:
    """The page is a function of the result: the same result twice gives the same page but for the time stamp."""
    from bnfold.deploy import OptimizeResult

    empty = OptimizeResult(digits_run, None, None, None)
    page = optimize_page(empty)
    assert "<svg" not in page and "FAIL" in page  # nothing ran: no chart drawn from nothing


# -- a real browser ---------------------------------------------------------------------------------------------

def _assert_renders(chromium: str, page: Path, charts: set[str]) -> None:
    load = load_page(chromium, page)
    assert load.problems == [], load.problems
    facts = load.facts
    assert facts["scripts"] == 0 and facts["resources"] == [], facts
    drawn = {c["id"]: c for c in facts["charts"]}
    assert charts <= set(drawn), (charts, sorted(drawn))
    assert all(c["width"] > 100 and c["height"] > 40 for c in drawn.values()), drawn


def test_report_renders_in_headless_chromium(digits_run: Path) -> None:
    chromium = require_chromium()
    _assert_renders(chromium, digits_run / "report.html", {"drift-chart", "sqnr-chart", "maxerr-chart",
                                                           "top1-chart", "latency-chart"})


def test_hostile_report_runs_nothing_in_chromium(hostile_run: Path) -> None:
    chromium = require_chromium()
    _assert_renders(chromium, hostile_run / "report.html", {"drift-chart", "sqnr-chart"})
    load = load_page(chromium, hostile_run / "report.html")
    assert not any("alert" in c for c in load.console)


def test_browser_check_can_fail(tmp_path: Path) -> None:
    """The negative twin: a page that logs an error, loads a remote image and runs a script is caught."""
    chromium = require_chromium()
    page = tmp_path / "bad.html"
    page.write_text('<!DOCTYPE html><html><head><meta charset="utf-8"><title>bad</title></head><body>'
                    '<script>console.error("boom")</script><img src="file:///nonexistent/x.png"></body></html>')
    load = load_page(chromium, page)
    assert any("boom" in p for p in load.problems), load.problems
    assert load.facts["scripts"] == 1


def test_missing_browser_fails_under_ci_and_skips_elsewhere(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BNFOLD_CHROMIUM", "/nonexistent/chromium")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI is set"):
        require_chromium()
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        require_chromium()


def test_kernel_times_when_measured_else_flops_share() -> None:
    from bnfold.htmlreport.sections import kernels_section

    tasks = [{"name": "fused_conv2d_a", "flops": 2e6, "weight": 1, "trials": 8, "best_us": 10.0},
             {"name": "fused_dense_b", "flops": 1e6, "weight": 3, "trials": 8, "best_us": 5.0},
             {"name": "<b>", "flops": 1e3, "weight": 1, "trials": 0, "best_us": None}]
    html = kernels_section(tasks)
    assert "2 of 3 kernels measured" in html and "µs per model call" in html
    labels = re.findall(r'class="label"><title>([^<]*)</title>', html)
    assert labels == ["fused_dense_b", "fused_conv2d_a"]  # 3 × 5 µs = 15 before 10 µs: ordered by time per call
    untuned = kernels_section([{**t, "best_us": None} for t in tasks])
    assert "not measured" in untuned and "% of the model" in untuned and "&lt;b&gt;" in untuned
