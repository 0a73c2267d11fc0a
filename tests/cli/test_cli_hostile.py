"""Hostile and careless inputs through every subcommand, as a table: files, command, expected exit code and
message. After every row: the marker a hostile payload would create does not exist, every file that was in
the folder (subfolders and ONNX external data included) has the checksum it had before, and no stray file (partial
output, staging folder) is left; the message is for people (no traceback, no "internal error", no "check the
warnings above" without warnings)."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
from hostile_files import TVM_BREAKS, break_tvm_folder, build_files, build_tvm_artifact

from bnfold.cli import main

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

TVM_WHY = {"truncated-so": "model.so is truncated",  # was SIGBUS in dlopen
           "random-so": "model.so is not a shared library",  # was exit 3 (TVMError)
           "foreign-so": "model.so",  # another library (its constructor would create the marker): was exit 3
           "pickle-params": "params.pt is",  # unpickling it would create the marker: was exit 3
           "no-signature": "manifest.json is not a valid bnfold TVM manifest: signature must be"}  # was KeyError
assert set(TVM_WHY) == set(TVM_BREAKS)

# id, command ({name} = the file's path in the row's folder, {d} = the folder), exit code, message fragment,
# outputs the row creates (relative to the folder)
ROWS: list[tuple[str, str, int, str, tuple[str, ...]]] = [
    # -- code in model files -----------------------------------------------------------------------------------
    ("pt2-sample-inputs-fold", "fold {evil_inputs.pt2} -o {d}/o.pt2", 2, "data/sample_inputs/model.pt", ()),
    ("pt2-sample-inputs-inspect", "inspect {evil_inputs.pt2}", 2, "--input-shape", ()),
    ("pt2-sample-inputs-check", "check {evil_inputs.pt2} {model.pt2}", 2, "sample_inputs", ()),
    ("pt2-sample-inputs-check-with-data", "check {evil_inputs.pt2} {model.pt2} --data {calib.npz} --no-localize", 0,
     "parity PASS", ()),
    ("pt2-sample-inputs-optimize", "optimize {evil_inputs.pt2} -o {d}/out --target none --no-onnx", 2,
     "could run code", ()),
    ("pt2-sample-inputs-skipped-with-data", "diagnose {evil_inputs.pt2} --data {calib.npz}", 0, "drift verdict", ()),
    ("pt2-sample-inputs-export-onnx", "export-onnx {evil_inputs.pt2} -o {d}/o.onnx", 2, "sample_inputs", ()),
    ("pt2-sample-inputs-skipped", "inspect {evil_inputs.pt2} --input-shape 2,3,8,8", 0, "would fold", ()),
    ("pt2-pickled-weight", "inspect {evil_weight.pt2}", 2, "is a pickled tensor (conv.weight)", ()),
    ("pt2-opaque-object", "inspect {evil_object.pt2} --input-shape 2,3,8,8", 2, "custom object", ()),
    ("pt2-guard-code", "fold {evil_guard.pt2} -o {d}/o.pt2", 2, "guard code", ()),
    ("pt2-sympify", "inspect {evil_sympy.pt2}", 2, "symbolic expression", ()),
    ("pt2-call-target", "inspect {evil_target.pt2}", 2, "not a torch operator", ()),
    ("pt2-aoti", "inspect {evil_aoti.pt2}", 2, "AOTInductor", ()),
    ("pt2-truncated", "inspect {truncated.pt2}", 2, "truncated", ()),
    ("pickle-untrusted", "inspect {pickled.pt} --input-shape 2,3,8,8", 2, "--trust-pickle", ()),
    ("npz-objects", "diagnose {model.pt2} --data {objects.npz}", 2, "without unpickling", ()),
    ("pt-data-pickle", "diagnose {model.pt2} --data {evil_data.pt}", 2, "weights_only=True", ()),
    ("tvm-folder-untrusted", "check {model.pt2} {d}/art_tvm --input-shape 2,3,8,8", 2, "--trust-pickle", ()),
    ("onnx-external-escape", "check {model.pt2} {escape.onnx} --input-shape 4", 2, "outside the model's folder", ()),
    # -- inputs and files bnfold did not write are never lost ---------------------------------------------------
    ("optimize-into-input-folder", "optimize {model.pt2} --data {calib.npz} -o {d} --force --target none", 2,
     "contains the input", ()),
    ("fold-over-input", "fold {model.pt2} -o {model.pt2} --force", 2, "refusing to overwrite the input", ()),
    ("fold-over-symlink-to-input", "fold {model.pt2} -o {d}/link.pt2 --force", 2, "refusing", ()),
    ("fold-over-hardlink-to-input", "fold {model.pt2} -o {d}/hard.pt2 --force", 2, "refusing to overwrite", ()),
    ("recalibrate-over-data", "recalibrate {model.pt2} --data {calib.npz} -o {calib.npz}", 2,
     "refusing to overwrite the input file", ()),
    ("fold-over-user-file", "fold {model.pt2} -o {notes.txt}", 2, "already exists", ()),
    ("fold-force-over-user-file", "fold {model.pt2} -o {notes.txt} --force", 2, "bnfold did not write it", ()),
    ("optimize-force-foreign-folder", "optimize {model.pt2} --data {calib.npz} -o {d}/notes --force --target none",
     2, "not a bnfold", ()),
    ("compile-force-folder-with-input", "compile {d}/art/model.pt2 -o {d}/art --force", 2, "contains the input", ()),
    ("export-onnx-over-input", "export-onnx {model.pt2} -o {model.pt2}", 2, "refusing to overwrite", ()),
    # -- bad data -------------------------------------------------------------------------------------------------
    ("diagnose-nan", "diagnose {model.pt2} --data {nan.npz} --check", 2, "sample 5 holds NaN", ()),
    ("diagnose-nan-json", "diagnose {model.pt2} --data {nan.npz} --json", 2, "array 'x', sample 5 holds NaN", ()),
    ("check-inf", "check {model.pt2} {model.pt2} --data {inf.npz}", 2, "sample 9 holds Inf", ()),
    ("check-zero-samples", "check {model.pt2} {model.pt2} --data {zero.npz}", 2, "zero samples", ()),
    ("optimize-validate-nan", "optimize {model.pt2} --validate {nan.npz} -o {d}/out --target none", 2, "NaN", ()),
    ("recalibrate-wrong-shape", "recalibrate {model.pt2} --data {wrong_shape.npz} -o {d}/r.pt2", 2,
     "has shape (4, 5, 8, 8) but the model expects (N, 3, 8, 8)", ()),
    ("pickled-model-misfit-data", "diagnose {pickled.pt} --trust-pickle --data {wrong_shape.npz}", 2,
     "the model cannot run on", ()),
    ("pickled-model-misfit-shape", "export-onnx {pickled.pt} --trust-pickle -o {d}/o.onnx --input-shape 2,5,8,8", 2,
     "the model cannot run on --input-shape", ()),
    ("diagnose-wrong-rank", "diagnose {model.pt2} --data {wrong_rank.npz}", 2, "rank 4", ()),
    ("diagnose-int-data", "diagnose {model.pt2} --data {ints.npz}", 2, "is int64 but the model takes float32", ()),
    ("check-bool-data", "check {model.pt2} {model.pt2} --data {bools.npz}", 2, "is bool", ()),
    ("check-mixed-batches", "check {model.pt2} {model.pt2} --data {mixed.pt}", 2, "batch 1", ()),
    # -- options checked before any work -----------------------------------------------------------------------
    ("until-typo", "fold {model.pt2} -o {d}/o.pt2 --until canonicalise", 2, "names no pass", ()),
    ("opset-too-old", "export-onnx {model.pt2} -o {d}/o.onnx --opset 3", 2, "18..23", ()),
    ("cache-dir-is-a-file", "compile {model.pt2} -o {d}/out --cache-dir {notes.txt}", 2, "is a file, not a folder",
     ()),
    ("tune-trials-negative", "optimize {model.pt2} -o {d}/out --tune-trials -5", 2, "--tune-trials", ()),
    ("input-shape-absurd", "inspect {model.pt2} --input-shape 64,3,100000,100000", 2, "GiB", ()),
    ("input-shape-misfit", "fold {model.pt2} -o {d}/o.pt2 --input-shape 2,4,8,8", 2, "does not fit", ()),
    ("input-shape-wrong-dtype", "export-onnx {model.pt2} -o {d}/o.onnx --input-shape 2,3,8,8 --dtype float16", 2,
     "pass --dtype float32", ()),
    ("arch-misspelled", "optimize {model.pt2} -o {d}/out --target cuda --arch sm_bogus", 2, "not a CUDA", ()),
    ("arch-without-cuda", "compile {model.pt2} -o {d}/out --arch sm_90", 2, "only to --target cuda", ()),
    ("threshold-nan", "diagnose {model.pt2} --data {calib.npz} --threshold nan", 2, "--threshold", ()),
    ("batch-size-zero", "check {model.pt2} {model.pt2} --data {calib.npz} --batch-size 0", 2, "--batch-size", ()),
    ("pt2-missing-member", "inspect {missing_weight.pt2}", 2, "is incomplete: member data/weights/", ()),
    # -- ONNX external data follows the output rules (issue 28) ------------------------------------------------
    ("onnx-renamed-model-data", "fold {orig.onnx} -o {d}/model.onnx", 2,
     "model.onnx.data, the external data of the input", ()),
    ("onnx-renamed-model-data-force", "fold {orig.onnx} -o {d}/model.onnx --force", 2, "the external data of the input",
     ()),
    ("onnx-users-data-file", "fold {ext.onnx} -o {d}/out.onnx", 2, "out.onnx.data (the external data of -o", ()),
    ("onnx-users-data-file-force", "fold {ext.onnx} -o {d}/out.onnx --force", 2, "bnfold did not write it", ()),
    ("onnx-data-symlink-to-input-data", "fold {ext.onnx} -o {d}/f.onnx --force", 2,
     "ext.onnx.data, the external data of the input", ()),
    ("onnx-optimize-into-data-folder", "optimize {nested.onnx} -o {d}/weights --force --target none", 2,
     "the external data of the input", ()),
    # -- compiled TVM folders the user trusts, broken (issue 28) ------------------------------------------------
    *[(f"tvm-trusted-{how}", f"check {{model.pt2}} {{d}}/tvm_{how} --data {{calib.npz}} --batch-size 2 --trust-pickle "
       "--no-localize", 2, f"{{d}}/tvm_{how}/{why}", ()) for how, why in TVM_WHY.items()],
    # -- bad data and options on an .onnx model: checked before any work (issue 28) -----------------------------
    ("onnx-fold-nan", "fold {bn.onnx} -o {d}/o.onnx --data {nan.npz}", 2, "sample 5 holds NaN", ()),
    ("onnx-fold-inf", "fold {bn.onnx} -o {d}/o.onnx --data {inf.npz}", 2, "sample 9 holds Inf", ()),
    ("onnx-fold-zero-samples", "fold {bn.onnx} -o {d}/o.onnx --data {zero.npz}", 2, "zero samples", ()),
    ("onnx-fold-wrong-shape", "fold {bn.onnx} -o {d}/o.onnx --data {wrong_shape.npz}", 2,
     "has shape (4, 5, 8, 8) but the model expects (N, 3, 8, 8)", ()),
    ("onnx-fold-wrong-rank", "fold {bn.onnx} -o {d}/o.onnx --data {wrong_rank.npz}", 2, "rank 4", ()),
    ("onnx-fold-int-data", "fold {bn.onnx} -o {d}/o.onnx --data {ints.npz}", 2, "is int64 but the model takes float32",
     ()),
    ("onnx-fold-mixed-batches", "fold {bn.onnx} -o {d}/o.onnx --data {mixed.pt}", 2, "batch 1", ()),
    ("onnx-optimize-validate-nan", "optimize {bn.onnx} --validate {nan.npz} -o {d}/out --target none", 2,
     "sample 5 holds NaN", ()),
    ("onnx-input-shape-misfit", "fold {bn.onnx} -o {d}/o.onnx --input-shape 2,4,8,8", 2, "dimension 1 differs", ()),
    ("onnx-custom-domain-op", "fold {custom.onnx} -o {d}/o.onnx", 2, "custom domain(s) com.example.vision", ()),
    ("onnx-reparameterize", "fold {bn.onnx} -o {d}/o.onnx --reparameterize", 2,
     "--reparameterize does not apply to an .onnx model", ()),
    ("onnx-optimize-reparameterize", "optimize {bn.onnx} -o {d}/out --target none --reparameterize", 2,
     "--reparameterize does not apply", ()),
    ("onnx-capture", "inspect {bn.onnx} --capture export", 2, "--capture does not apply", ()),
    ("onnx-trust-pickle", "fold {bn.onnx} -o {d}/o.onnx --trust-pickle", 2, "--trust-pickle does not apply", ()),
    ("onnx-optimize-num-samples", "optimize {bn.onnx} -o {d}/out --target none --num-samples 4", 2,
     "--num-samples does not apply", ()),
    ("onnx-dtype", "fold {bn.onnx} -o {d}/o.onnx --input-shape 2,3,8,8 --dtype float16", 2, "--dtype float16", ()),
    ("pt2-batch-size-is-for-onnx", "fold {model.pt2} -o {d}/o.pt2 --batch-size 4", 2, "applies to an .onnx model", ()),
    # -- what must still work --------------------------------------------------------------------------------------
    ("plain-pt2-folds", "fold {model.pt2} -o {d}/o.pt2", 0, "", ("o.pt2",)),
    ("onnx-external-data-folds", "fold {ext.onnx} -o {d}/f.onnx --data {calib.npz}", 0, "parity PASS",
     ("f.onnx", "f.onnx.data")),
    ("tvm-trusted-intact", "check {model.pt2} {d}/tvm_intact --data {calib.npz} --batch-size 2 --trust-pickle "
     "--no-localize", 0, "parity PASS", ()),
]


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("hostile")
    marker = folder.parent / f"{folder.name}-MARKER"
    build_files(folder, marker)
    return folder, marker


@pytest.fixture(scope="module")
def tvm_artifact(library: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``model.pt2`` compiled untuned with TVM (outside the rows' folders; each TVM row copies and breaks it)."""
    pytest.importorskip("tvm")
    return build_tvm_artifact(library[0] / "model.pt2", tmp_path_factory.mktemp("tvm") / "art")


def _sums(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*")) if not p.is_symlink()}


def _prepare(row_id: str, library: Path, d: Path, request: pytest.FixtureRequest, marker: Path) -> None:
    for p in library.iterdir():
        shutil.copy2(p, d / p.name)
    if row_id.startswith("tvm-trusted-"):
        how = row_id.removeprefix("tvm-trusted-")
        files = {p.name: d / p.name for p in d.iterdir()}
        break_tvm_folder(request.getfixturevalue("tvm_artifact"), d / f"tvm_{how}", how, files, marker)
    if row_id == "onnx-data-symlink-to-input-data":  # the output's data file is a link to the input's
        os.symlink(d / "ext.onnx.data", d / "f.onnx.data")
    if row_id == "onnx-optimize-into-data-folder":  # the model keeps its data in a subfolder: weights/w.bin
        import onnx
        from helpers import onnx_conv_bn

        (d / "weights").mkdir()
        onnx.save_model(onnx_conv_bn(), str(d / "nested.onnx"), save_as_external_data=True, location="weights/w.bin",
                        size_threshold=0)
        (d / "weights" / ".bnfold-output.json").write_text('{"writer": "bnfold", "entries": ["w.bin"]}')
    if row_id == "tvm-folder-untrusted":  # a compiled folder whose model.so runs code when loaded
        (d / "art_tvm").mkdir()
        shutil.copy2(d / "evil_tvm.so", d / "art_tvm" / "model.so")
        (d / "art_tvm" / "manifest.json").write_text('{"format": "bnfold-tvm-artifact", "format_version": 1}')
    if row_id == "fold-over-symlink-to-input":
        os.symlink(d / "model.pt2", d / "link.pt2")
    if row_id == "fold-over-hardlink-to-input":
        os.link(d / "model.pt2", d / "hard.pt2")
    if row_id == "optimize-force-foreign-folder":
        (d / "notes").mkdir()
        (d / "notes" / "keep.txt").write_text("mine")
    if row_id == "compile-force-folder-with-input":  # an earlier artifact folder that also holds the model
        (d / "art").mkdir()
        shutil.copy2(d / "model.pt2", d / "art" / "model.pt2")
        (d / "art" / "manifest.json").write_text('{"format": "bnfold-tvm-artifact", "files": {}}')


@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_hostile_input(row: tuple[str, str, int, str, tuple[str, ...]], library: tuple[Path, Path],
                       tmp_path: Path, capsys: pytest.CaptureFixture[str], request: pytest.FixtureRequest) -> None:
    row_id, command, code, fragment, creates = row
    folder, marker = library
    _prepare(row_id, folder, tmp_path, request, marker)
    before = _sums(tmp_path)
    for p in [*folder.iterdir(), *tmp_path.iterdir()]:
        command = command.replace("{" + p.name + "}", str(tmp_path / p.name))
    argv = command.replace("{d}", str(tmp_path)).split()
    assert main(argv) == code, capsys.readouterr()
    out = capsys.readouterr()
    text = out.err if code == 2 else out.out
    assert fragment.replace("{d}", str(tmp_path)) in text, text
    for wrong in ("Traceback", "internal error", "warnings above"):
        assert wrong not in out.err, out.err
    assert not marker.exists(), "code from a hostile file ran"
    assert all((tmp_path / c).is_file() for c in creates), creates
    after = _sums(tmp_path)
    assert {k: v for k, v in after.items() if k not in creates} == before  # inputs intact, nothing stray

