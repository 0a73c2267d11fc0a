"""Outputs: disk full and permission errors are clean exits saying what was not written, the umask is
honoured, leftovers of a killed run are cleaned (only bnfold's, only from dead runs), and ``--force`` replaces
only bnfold's own earlier output."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import randomize_bn
from torch import nn

from bnfold.cli import main
from bnfold.errors import OutputError

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")


@pytest.fixture(scope="module")
def pt2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    path = tmp_path_factory.mktemp("m") / "model.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(2, 3, 8, 8),)), str(path))
    return path


def _dead_pid() -> int:
    pid = 4_000_000
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid += 1


@pytest.fixture
def full_disk(tmp_path: Path):
    """A 64 KiB tmpfs, nearly full (needs root; skipped where mounting is not allowed)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        (mnt / "filler").write_bytes(b"\0" * (60 << 10))
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_fold_on_a_full_disk_exits_2(pt2: Path, full_disk: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Was SIGABRT from torch's C++ zip writer (exit -6, a C++ stack; here it would kill the test run)."""
    out = full_disk / "folded.pt2"
    assert main(["fold", str(pt2), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "disk is full" in err and str(out) in err
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler"]


def test_optimize_on_a_full_disk_exits_2(pt2: Path, full_disk: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = full_disk / "deploy"
    assert main(["optimize", str(pt2), "-o", str(out), "--target", "none", "--no-onnx"]) == 2
    assert "disk is full" in capsys.readouterr().err
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler"]


def test_issue28_optimize_with_room_for_the_reports_only_exits_2(full_disk: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 28: when folded.pt2 did not fit but the reports did, optimize recorded the write error as a failed
    stage and published a folder holding only report.json/report.txt (exit 1). A full disk is exit 2 and publishes
    nothing."""
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 64, 3), nn.BatchNorm2d(64), nn.Conv2d(64, 64, 3)))  # ~150 KB
    src = full_disk.parent / "big.pt2"
    torch.export.save(torch.export.export(model, (torch.randn(2, 3, 8, 8),)), str(src))
    (full_disk / "filler").unlink()
    (full_disk / "filler").write_bytes(b"\0" * (24 << 10))  # 40 KiB free: the reports fit, folded.pt2 does not
    assert main(["optimize", str(src), "-o", str(full_disk / "deploy"), "--target", "none", "--no-onnx"]) == 2
    err = capsys.readouterr().err
    assert "disk is full" in err and "folded.pt2" in err, err
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler"]


@pytest.mark.parametrize("free_pages", [0, 1])
def test_onnx_fold_with_external_data_on_a_full_disk_exits_2(full_disk: Path, capsys: pytest.CaptureFixture[str],
                                                             free_pages: int) -> None:
    """The data file and the model are published together or not at all (1 free page: the data file fits, the model
    does not)."""
    import onnx
    from helpers import onnx_conv_bn

    src = full_disk.parent / "in.onnx"
    onnx.save_model(onnx_conv_bn(channels=16), str(src), save_as_external_data=True, location="in.onnx.data",
                    size_threshold=0)
    (full_disk / "filler").unlink()
    (full_disk / "filler").write_bytes(b"\0" * ((64 - 4 * free_pages) << 10))
    assert main(["fold", str(src), "-o", str(full_disk / "out.onnx"), "--input-shape", "2,3,8,8"]) == 2
    assert "disk is full" in capsys.readouterr().err
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler"]


@pytest.mark.parametrize("code,words", [(errno.ENOSPC, "disk is full"), (errno.EACCES, "permission denied")])
def test_write_errors_are_clean(pt2: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture[str], code: int, words: str) -> None:
    def fail(_fd: int) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr("bnfold.io.outputs.os.fsync", fail)
    assert main(["fold", str(pt2), "-o", str(tmp_path / "o.pt2")]) == 2
    err = capsys.readouterr().err
    assert words in err and "nothing was written" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_outputs_follow_the_umask(pt2: Path, tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        assert main(["fold", str(pt2), "-o", str(tmp_path / "o.pt2")]) == 0
        assert main(["optimize", str(pt2), "-o", str(tmp_path / "d"), "--target", "none", "--no-onnx"]) == 0
    finally:
        os.umask(old)
    assert (tmp_path / "o.pt2").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o750


def test_leftovers_of_a_killed_run_are_cleaned(pt2: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    dead, alive = _dead_pid(), os.getppid()
    stale_file = tmp_path / f".o.bnfold-{dead}-k3j2_x.partial.pt2"
    stale_dir = tmp_path / f".d.bnfold-{dead}-a8b9.staging"
    live_file = tmp_path / f".o.bnfold-{alive}-zz.partial.pt2"  # a run still going: not touched
    users = tmp_path / ".o.partial.pt2"  # not bnfold's pattern: not touched
    stale_file.write_bytes(b"half")
    stale_dir.mkdir()
    (stale_dir / "folded.pt2").write_bytes(b"half")
    live_file.write_bytes(b"in progress")
    users.write_bytes(b"mine")
    assert main(["fold", str(pt2), "-o", str(tmp_path / "o.pt2")]) == 0
    assert not stale_file.exists() and not stale_dir.exists()
    assert live_file.exists() and users.exists()
    assert "interrupted bnfold run" in caplog.text


def test_force_replaces_only_bnfolds_own_output(pt2: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o.pt2"
    assert main(["fold", str(pt2), "-o", str(out)]) == 0
    assert main(["fold", str(pt2), "-o", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["fold", str(pt2), "-o", str(out), "--force"]) == 0
    deploy = tmp_path / "deploy"
    args = ["optimize", str(pt2), "-o", str(deploy), "--target", "none", "--no-onnx"]
    assert main(args) == 0
    assert main([*args, "--force"]) == 0  # its own earlier output: replaced
    (deploy / "notes.txt").write_text("mine")
    capsys.readouterr()
    assert main([*args, "--force"]) == 2
    assert "notes.txt" in capsys.readouterr().err
    assert (deploy / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


# -- files written together, and files the inputs reference (issue 28) ----------------------------------------------

def _external_onnx(path: Path, location: str) -> Path:
    """A small Conv→BN ONNX model at ``path`` whose weights live in ``location`` (beside it)."""
    import onnx
    from helpers import onnx_conv_bn

    model = onnx_conv_bn()
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=location, size_threshold=0)
    return path


def test_the_plan_protects_the_files_an_input_references(tmp_path: Path) -> None:
    """The renamed-model case: ``orig.onnx`` still reads ``model.onnx.data``; no output may be that file, by name or
    through a symlink, and no output folder may contain it."""
    from bnfold.errors import InputError
    from bnfold.io.outputs import OutputPlan

    src = _external_onnx(tmp_path / "orig.onnx", "model.onnx.data")
    plan = OutputPlan([src])
    with pytest.raises(InputError, match=r"model.onnx.data, the external data of the input .*orig.onnx"):
        plan.file(tmp_path / "model.onnx.data", role="the external data of -o model.onnx")
    os.symlink(tmp_path / "model.onnx.data", tmp_path / "alias.data")
    with pytest.raises(InputError, match="external data of the input"):
        plan.file(tmp_path / "alias.data", role="the external data of -o alias")
    (tmp_path / "weights").mkdir()
    nested = _external_onnx(tmp_path / "nested.onnx", "weights/w.bin")  # data in a subfolder of the model's
    with pytest.raises(InputError, match=r"contains .*w\.bin, the external data of the input"):
        OutputPlan([nested], force=True).folder(tmp_path / "weights")
    assert plan.file(tmp_path / "fresh.onnx") == tmp_path / "fresh.onnx"


def test_atomic_files_publish_together_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bnfold.io.outputs import atomic_files

    model, data = tmp_path / "m.onnx", tmp_path / "m.onnx.data"
    model.write_text("old model")
    data.write_text("old data")
    with pytest.raises(RuntimeError), atomic_files([model, data]) as (m, d):  # the block fails: nothing moves
        m.write_text("new model")
        d.write_text("new data")
        assert m.parent == d.parent != tmp_path and m.name == model.name  # final names, in a staging folder
        raise RuntimeError("parity could not run")
    assert (model.read_text(), data.read_text()) == ("old model", "old data")
    real_replace, calls = os.replace, []

    def replace_failing_on_the_model(src: os.PathLike[str], dst: os.PathLike[str]) -> None:
        calls.append(Path(dst).name)
        if Path(src).parent.name != ".old" and Path(dst) == model:  # publishing the model itself
            raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr("bnfold.io.outputs.os.replace", replace_failing_on_the_model)
    with pytest.raises(OutputError, match="disk is full"), atomic_files([model, data]) as (m, d):
        m.write_text("new model")
        d.write_text("new data")
    assert (model.read_text(), data.read_text()) == ("old model", "old data")  # the data put back too
    assert calls.index("m.onnx.data", 2) < calls.index("m.onnx", 2)  # data placed first, model last
    monkeypatch.setattr("bnfold.io.outputs.os.replace", real_replace)
    with atomic_files([model, data]) as (m, d):
        m.write_text("new model")
        d.write_text("new data")
    assert (model.read_text(), data.read_text()) == ("new model", "new data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]  # no staging folder left
