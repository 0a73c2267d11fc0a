"""The bnfold CLI on real saved files: inspect, fold, and errors that are for people."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import count_batchnorm, randomize_bn
from torch import nn

from bnfold.cli import main


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


@pytest.fixture(scope="module")
def pt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = randomize_bn(Net())
    path = tmp_path_factory.mktemp("models") / "net.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(2, 3, 8, 8),)), str(path))
    return path


def test_inspect_explain(pt2: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(pt2), "--explain"]) == 0
    out = capsys.readouterr().out
    assert "1 would fold" in out and "fold_into_producer" in out


def test_inspect_json(pt2: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    assert main(["inspect", str(pt2), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["candidates"] == 1 and data["dry_run"] is True


def test_fold_writes_a_loadable_pt2(pt2: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "folded.pt2"
    before = pt2.read_bytes()
    assert main(["fold", str(pt2), "-o", str(out)]) == 0
    assert "parity PASS" in capsys.readouterr().out
    assert pt2.read_bytes() == before  # input untouched
    ep = torch.export.load(str(out))
    gm = ep.module()
    assert count_batchnorm(gm) == 0
    x = torch.randn(2, 3, 8, 8)
    ref = torch.export.load(str(pt2)).module()(x)
    torch.testing.assert_close(gm(x), ref, rtol=1e-4, atol=1e-5)


def test_fold_with_input_shape(pt2: Path, tmp_path: Path) -> None:
    assert main(["fold", str(pt2), "-o", str(tmp_path / "o.pt2"), "--input-shape", "2,3,8,8"]) == 0


def test_refuses_to_overwrite_input(pt2: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = pt2.read_bytes()
    assert main(["fold", str(pt2), "-o", str(pt2)]) == 2
    assert "refusing to overwrite the input" in capsys.readouterr().err
    assert pt2.read_bytes() == before


@pytest.mark.parametrize("content,expect", [
    (None, "no such file"),
    (b"not a zip at all", "not a torch.export archive"),
])
def test_bad_input_files(tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes | None,
                         expect: str) -> None:
    path = tmp_path / "model.pt2"
    if content is not None:
        path.write_bytes(content)
    out = tmp_path / "out.pt2"
    assert main(["fold", str(path), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert expect in err and "Traceback" not in err
    assert not out.exists()
    assert not list(tmp_path.glob(".out.*"))  # no half-written temp file left behind


def test_truncated_pt2(pt2: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "trunc.pt2"
    bad.write_bytes(pt2.read_bytes()[: pt2.stat().st_size // 2])
    assert main(["inspect", str(bad)]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_verbose_and_debug_show_what_caused_an_error(pt2: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The message stays one sentence for people; ``-v`` adds the wrapped library error, ``BNFOLD_DEBUG=1`` the
    whole traceback (issue: ``CaptureError`` and friends lost their cause)."""
    bad = tmp_path / "junk.pt2"  # a zip, but not what torch.export.load reads: its error is wrapped
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("archive/data.pkl", b"not a pickle")
    assert main(["inspect", str(bad)]) == 2
    assert "caused by" not in capsys.readouterr().err
    assert main(["-v", "inspect", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "  caused by: " in err and "Traceback" not in err
    monkeypatch.setenv("BNFOLD_DEBUG", "1")
    assert main(["inspect", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "The above exception was the direct cause" in err


def test_pickle_needs_trust(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "m.pt"
    torch.save(randomize_bn(Net()), str(path))
    assert main(["inspect", str(path), "--input-shape", "1,3,8,8"]) == 2
    assert "--trust-pickle" in capsys.readouterr().err
    assert main(["inspect", str(path), "--input-shape", "1,3,8,8", "--trust-pickle"]) == 0


def test_bad_shape_and_missing_output_folder(pt2: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(pt2), "--input-shape", "1,three"]) == 2
    assert "comma-separated" in capsys.readouterr().err
    assert main(["fold", str(pt2), "-o", str(tmp_path / "nope" / "o.pt2")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_console_entry_point_help() -> None:
    out = subprocess.run([sys.executable, "-m", "bnfold.cli", "--help"], capture_output=True, text=True, check=True)
    assert "inspect" in out.stdout and "fold" in out.stdout and "demo" in out.stdout


def test_help_and_version_start_without_torch() -> None:
    """`bnfold --help` / `--version` list every command from bnfold.cli.commands.SUMMARY without importing torch,
    ONNX or TVM (issue 11: they took 4–5.5 s); a command's own --help imports only its module."""
    code = ("import sys, contextlib, io\n"
            "from bnfold.cli import main\n"
            "for argv in (['--version'], ['--help']):\n"
            "    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
            "        main(argv)\n"
            "assert not {'torch', 'onnx', 'tvm'} & set(sys.modules), sorted(m for m in sys.modules if 'torch' in m)\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_every_summarized_command_is_registered_by_its_module() -> None:
    from bnfold.cli import build_parser
    from bnfold.cli.commands import SUMMARY

    for name in SUMMARY:
        parser = build_parser(name)
        with pytest.raises(SystemExit) as exc:
            parser.parse_args([name, "--help"])
        assert exc.value.code == 0, name


@pytest.mark.parametrize("delay", [0.3, 0.9, 1.6])
def test_issue28_ctrl_c_early_is_one_line_not_a_traceback(pt2: Path, tmp_path: Path, delay: float) -> None:
    """Issue 28: Ctrl-C in the first ~1.5 s (while torch is imported) printed a traceback. At any point it is exit
    130 and "bnfold: interrupted" (an import cut short may surface as another exception, e.g. numpy's
    RecursionError: still an interrupt). A run that finished before the signal is fine too."""
    import signal
    import time

    out = tmp_path / "o.pt2"
    proc = subprocess.Popen([sys.executable, "-m", "bnfold.cli", "fold", str(pt2), "-o", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert "Traceback" not in stderr, stderr
    assert proc.returncode in (0, 130), (proc.returncode, stderr)
    if proc.returncode == 130:
        assert stderr.strip().endswith("bnfold: interrupted") and not out.exists(), stderr
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left
