"""The TVM target (bnfold/targets/tvm*.py): compile, run, save/load, ISA and batch checks, CUDA, CLI.

Default tests never tune (untuned builds compile in seconds); tuning tests are ``@pytest.mark.slow``.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import warnings
from pathlib import Path

import pytest
import torch
from helpers import randomize_bn
from torch import nn

tvm = pytest.importorskip("tvm")

import bnfold  # noqa: E402
from bnfold.errors import BnfoldError, InputError  # noqa: E402
from bnfold.targets.tvm import UntunedKernelsWarning, compile, load_artifact  # noqa: E402
from bnfold.targets.tvm.artifact import MANIFEST, check_cuda_arch  # noqa: E402
from bnfold.targets.tvm.budget import LADDER, allocate_trials, group_by_budget  # noqa: E402
from bnfold.targets.tvm.isa import LLVM_TO_CPUINFO, IsaMismatchError, check_host_supports, host_cpu_flags  # noqa: E402

torchvision = pytest.importorskip("torchvision")

HAS_GPU = bool(tvm.cuda(0).exist)
_USER_ENV = {k: os.environ.get(k) for k in ("TVM_NUM_THREADS", "TVM_BIND_THREADS", "TVM_THREAD_POOL_SPIN_COUNT")}
HAS_NVCC = shutil.which("nvcc") is not None


class SmallNet(nn.Module):
    """conv-BN-ReLU → conv-BN-ReLU → avg-pool → linear: a few kernels, compiles in seconds."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x))


def _folded(model: nn.Module, x: torch.Tensor) -> torch.fx.GraphModule:
    return bnfold.fold(randomize_bn(model), (x,)).module


@pytest.fixture(scope="module")
def small() -> tuple[torch.fx.GraphModule, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    return _folded(SmallNet(), x), x


@pytest.fixture(scope="module")
def small_artifact(small, tmp_path_factory):
    gm, x = small
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UntunedKernelsWarning)
        return compile(gm, (x,), cache_dir=tmp_path_factory.mktemp("cache"))


# ---------------------------------------------------------------- budget (pure)

def test_allocate_trials_respects_budget_and_floor():
    costs = [230e6] * 6 + [13e6] * 3 + [0.0] * 3
    for total in (12, 50, 300, 2000):
        alloc = allocate_trials(costs, total)
        assert sum(alloc) <= total
        assert min(alloc) >= 1  # no task left untuned
        assert all(a in LADDER for a in alloc)
        assert max(alloc[:6]) >= max(alloc[6:])  # the costly tasks get the most trials
    big = allocate_trials(costs, 2000)
    assert min(big[:6]) > max(big[9:])
    assert sum(big) >= 0.6 * 2000  # snapping must not throw most of the budget away


def test_allocate_trials_refuses_budget_below_task_count():
    with pytest.raises(ValueError, match="cannot tune 5 tasks"):
        allocate_trials([1.0] * 5, 4)


def test_split_budget_smaller_than_task_count_goes_to_the_costliest():
    from bnfold.targets.tvm.tuning import split_budget

    assert split_budget([1.0, 5.0, 3.0, 0.0], 2) == [0, 1, 1, 0]
    assert sum(split_budget([1.0, 5.0, 3.0, 0.0], 40)) <= 40


def test_group_by_budget_largest_first():
    assert group_by_budget([8, 2, 8, 0, 4]) == [(8, [0, 2]), (4, [4]), (2, [1])]


# ---------------------------------------------------------------- ISA / arch rules (pure)

def test_isa_check_names_missing_instructions():
    isa = {"arch": "x86_64", "mcpu": "znver5", "features": ["avx2", "avx512f", "fma"]}
    check_host_supports(isa, host_flags={"avx2", "avx512f", "fma"}, host_arch="x86_64")
    with pytest.raises(IsaMismatchError, match="avx512f") as err:
        check_host_supports(isa, host_flags={"avx2", "fma"}, host_arch="x86_64")
    assert "illegal instruction" in str(err.value)
    with pytest.raises(IsaMismatchError, match="compiled for x86_64"):
        check_host_supports(isa, host_flags=set(), host_arch="aarch64")


def test_host_cpu_flags_parses_cpuinfo():
    text = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f\n\nprocessor\t: 1\nflags\t\t: fpu sse avx2 avx512f\n"
    assert host_cpu_flags(text) == {"fpu", "sse", "avx2", "avx512f"}
    assert host_cpu_flags("model name : x\n") is None


def test_host_cpu_model_features_hidden_by_a_vm_are_switched_off():
    from bnfold.targets.tvm.target import _hidden_host_features

    config = {"kind": "llvm", "mcpu": "skylake-avx512"}
    avx2_only = {"sse", "sse2", "pni", "ssse3", "sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "bmi1", "bmi2",
                 "popcnt", "abm", "movbe"}
    hidden = _hidden_host_features(config, avx2_only)
    assert "avx512f" in hidden and "avx2" not in hidden
    assert _hidden_host_features(config, avx2_only | {LLVM_TO_CPUINFO[f] for f in hidden}) == []


def test_cuda_arch_rule():
    assert check_cuda_arch("sm_90a", (9, 0)) is None
    assert "only on compute capability 9.0" in check_cuda_arch("sm_90a", (10, 0))
    assert check_cuda_arch("sm_80", (8, 6)) is None
    assert check_cuda_arch("sm_86", (8, 0)) is not None
    assert check_cuda_arch("sm_80", (9, 0)) is not None


# ---------------------------------------------------------------- CPU compile, untuned

def test_untuned_build_runs_default_schedules_and_matches(small, tmp_path):
    """Without tuning every kernel gets bnfold's hand schedule (blocked NCHWc convs): nothing is left as plain
    loops, so no UntunedKernelsWarning, and the artifact matches the folded model."""
    gm, x = small
    with warnings.catch_warnings():
        warnings.simplefilter("error", UntunedKernelsWarning)
        art = compile(gm, (x,), cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache").exists()  # an untuned build does not create a database
    info = art.build_info
    assert info["tuning"]["untuned"] == [] and all(t["trials"] == 0 for t in info["tuning"]["tasks"])
    assert any("conv2d" in k for k in info["tuning"]["default_scheduled"])
    assert bnfold.compare(gm, art, (x,)).passed


def test_kernels_without_any_schedule_are_named_in_a_warning():
    from bnfold.targets.tvm import _warn_untuned

    manifest = {"tuning": {"untuned": ["fused_conv2d_add"], "tasks": [{"name": "fused_conv2d_add", "flops": 2.0,
                                                                       "weight": 1}]},
                "signature": {"batch_range": None}}
    with pytest.warns(UntunedKernelsWarning, match=r"NO schedule.*100%.*fused_conv2d_add"):
        _warn_untuned(manifest)


def test_manifest_records_versions_target_isa_and_signature(small_artifact):
    info = small_artifact.build_info
    assert info["versions"]["tvm"] == tvm.__version__
    assert info["versions"]["torch"] == torch.__version__
    assert info["versions"]["bnfold"] == bnfold.__version__
    assert info["target"]["kind"] == "llvm"
    assert info["target"]["mcpu"] == tvm.target.codegen.llvm_get_system_cpu()
    assert info["target"]["mcpu"] != "generic"  # the host ISA, not SSE-only generic code
    flags = host_cpu_flags()
    if flags and "avx2" in flags:
        assert "avx2" in info["isa"]["features"]
    assert info["signature"]["inputs"] == [{"shape": [2, 3, 16, 16], "dtype": "float32"}]
    assert info["entry"]["transform_params"] == "main_transform_params"


def test_tvm_uses_all_usable_cores_without_pinning(small_artifact, small):
    from bnfold.targets.tvm.target import usable_cores

    if any(v is not None for v in _USER_ENV.values()):
        pytest.skip("the user configured TVM's threads: bnfold leaves them alone")
    small_artifact(small[1])
    # TVM's own default would be hardware_concurrency/2 threads (1 on a 2-vCPU machine), pinned to cores,
    # spinning 300000 times after each kernel
    assert tvm.get_global_func("runtime.NumThreads")() == usable_cores()
    assert small_artifact.build_info["target"]["num_cores"] == usable_cores()
    assert os.environ["TVM_BIND_THREADS"] == "0"
    assert os.environ["TVM_THREAD_POOL_SPIN_COUNT"] == "1000"  # a short, yielding spin, not TVM's 300000


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2"])
def test_torchvision_parity_untuned(arch, tmp_path):
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 64)
    gm = _folded(getattr(torchvision.models, arch)(), x)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UntunedKernelsWarning)
        art = compile(gm, (x,), cache_dir=tmp_path)
    report = bnfold.compare(gm, art, (x,))
    assert report.passed, report.summary()


def test_target_and_artifact_follow_the_targets_protocols(small_artifact, small):
    from bnfold.targets import Artifact, Target
    from bnfold.targets.tvm import TvmTarget

    assert isinstance(TvmTarget(), Target) and isinstance(small_artifact, Artifact)
    gm, x = small
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UntunedKernelsWarning)
        art = TvmTarget().lower(gm, (x,), {"tune_trials": 0})
    assert torch.allclose(art(x), small_artifact(x), atol=1e-5, rtol=1e-5)


def test_outputs_are_fresh_tensors_and_odd_inputs_work(small_artifact, small):
    gm, x = small
    y1 = small_artifact(x)
    keep = y1.clone()
    y2 = small_artifact(x * 2)
    assert torch.equal(y1, keep)  # the second call did not overwrite the first result
    assert not torch.equal(y1, y2)
    odd = torch.randn(2, 16, 16, 3).permute(0, 3, 1, 2)  # non-contiguous
    assert torch.allclose(small_artifact(odd), gm(odd), atol=1e-5, rtol=1e-4)
    unaligned = torch.randn(2 * 3 * 16 * 16 + 1)[1:].view(2, 3, 16, 16)  # 4-byte offset: not 64-aligned
    assert torch.allclose(small_artifact(unaligned), gm(unaligned), atol=1e-5, rtol=1e-4)


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        f = self.conv(x).mean((2, 3))
        return f * s, {"logits": self.fc(f)}


def test_several_inputs_and_nested_outputs_keep_their_structure(tmp_path):
    torch.manual_seed(0)
    model = TwoHeads().eval()
    args = (torch.randn(2, 3, 8, 8), torch.randn(2, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UntunedKernelsWarning)
        art = compile(model, args, cache_dir=tmp_path)
    out = art(*args)
    ref = model(*args)
    assert isinstance(out, tuple) and isinstance(out[1], dict) and set(out[1]) == {"logits"}
    assert torch.allclose(out[0], ref[0], atol=1e-5) and torch.allclose(out[1]["logits"], ref[1]["logits"], atol=1e-5)
    assert bnfold.compare(model, art, args).passed


def test_wrong_inputs_are_refused_clearly(small_artifact):
    with pytest.raises(InputError, match=r"compiled for \(2, 3, 16, 16\)"):
        small_artifact(torch.randn(2, 3, 17, 16))
    with pytest.raises(InputError, match="dtype float64"):
        small_artifact(torch.randn(2, 3, 16, 16, dtype=torch.float64))
    with pytest.raises(InputError, match="takes 1 input"):
        small_artifact(torch.randn(2, 3, 16, 16), torch.randn(1))


# ---------------------------------------------------------------- save / load

def test_save_load_roundtrip(small_artifact, small, tmp_path):
    _, x = small
    out = small_artifact.save(tmp_path / "art")
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "model.so", "params.pt"]
    loaded = load_artifact(out)
    assert torch.equal(loaded(x), small_artifact(x))
    assert loaded.build_info["isa"] == small_artifact.build_info["isa"]
    assert bnfold.load_artifact is load_artifact


def test_save_is_atomic_and_never_clobbers(small_artifact, tmp_path):
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty"):
        small_artifact.save(other)
    with pytest.raises(InputError, match="not a bnfold artifact"):
        small_artifact.save(other, overwrite=True)
    assert (other / "keep.txt").read_text() == "mine"
    first = small_artifact.save(tmp_path / "art")
    small_artifact.save(first, overwrite=True)  # replacing an earlier artifact is allowed
    assert (first / MANIFEST).exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folders left


def test_load_refuses_artifact_for_missing_cpu_features(small_artifact, tmp_path):
    flags = host_cpu_flags()
    if flags is None:
        pytest.skip("no /proc/cpuinfo: host features unknown")
    missing = next((f for f, flag in LLVM_TO_CPUINFO.items() if flag not in flags and f.startswith(("amx", "avx"))),
                   None)
    if missing is None:
        pytest.skip("this host has every checked x86 extension")
    out = small_artifact.save(tmp_path / "art")
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["isa"]["features"].append(missing)
    (out / MANIFEST).write_text(json.dumps(manifest))
    (out / "model.so").write_bytes(b"not a library")  # proves the check runs before the .so is loaded
    with pytest.raises(IsaMismatchError, match=missing):
        load_artifact(out)


def test_cross_compiled_cpu_artifact_saves_but_refuses_to_run_here(small, tmp_path):
    flags = host_cpu_flags()
    if flags is None or "amx_tile" in flags:
        pytest.skip("needs a Linux host without AMX")
    gm, x = small
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UntunedKernelsWarning)
        art = compile(gm, (x,), mcpu="sapphirerapids", cache_dir=tmp_path / "c")
    assert "amx-tile" in art.build_info["isa"]["features"]
    assert not art.runnable
    with pytest.raises(IsaMismatchError, match="amx"):
        art(x)
    out = art.save(tmp_path / "spr")
    with pytest.raises(IsaMismatchError, match="sapphirerapids"):
        load_artifact(out)


def _corrupt(name: str, out: Path, marker: Path) -> None:
    """Break the saved artifact ``out`` the way ``name`` says (issue 28's hostile folders)."""
    import pickle
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from hostile_files import evil_torch_save

    lib, params, manifest = out / "model.so", out / "params.pt", json.loads((out / MANIFEST).read_text())
    if name == "truncated-library":
        lib.write_bytes(lib.read_bytes()[:20000])
    elif name == "random-library":
        lib.write_bytes(os.urandom(lib.stat().st_size))
    elif name == "foreign-library":  # a real shared object of this host, not this build's
        import _ctypes

        shutil.copy(_ctypes.__file__, lib)
    elif name == "pickle-params":  # unpickling it would create the marker
        params.write_bytes(evil_torch_save(marker))
    elif name == "plain-pickle-params":
        params.write_bytes(pickle.dumps({"weights": 1}))
    elif name == "wrong-count-params":
        torch.save([torch.zeros(3)], params)
    elif name == "no-signature":
        del manifest["signature"]
    elif name == "bad-input-spec":
        manifest["signature"]["inputs"] = [{"shape": "2x3", "dtype": "float32"}]
    elif name == "bad-num-params":
        manifest["entry"]["num_params"] = "two"
    if name.startswith(("truncated", "random", "foreign", "pickle", "plain", "wrong")) and "old" in out.name:
        manifest.pop("integrity")  # an artifact without recorded checksums: the structural checks alone
    (out / MANIFEST).write_text(json.dumps(manifest))


CORRUPTIONS = {
    "truncated-library": "truncated|bytes but the manifest records",
    "random-library": "not a shared library|bytes but the manifest records|SHA-256",
    "foreign-library": "bytes but the manifest records|TVM cannot load it",
    "pickle-params": "bytes but the manifest records|weights_only=True",
    "plain-pickle-params": "bytes but the manifest records|weights_only=True",
    "wrong-count-params": r"bytes but the manifest records|does not hold the \d+ tensors",
    "no-signature": "signature must be an object",
    "bad-input-spec": "signature.inputs must be",
    "bad-num-params": "entry.num_params must be a count",
}


@pytest.mark.parametrize("recorded", ["with-checksums", "old-without-checksums"])
@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_issue28_broken_artifact_is_an_input_error_naming_the_file(small_artifact, tmp_path, name, recorded):
    """Issue 28: a truncated model.so killed the process with SIGBUS inside dlopen; random bytes, another library, a
    pickle as params.pt or a manifest without its signature were exit 3 (KeyError, TVMError, UnpicklingError). Each
    is now an InputError naming the file — with the recorded checksums and, for older artifacts, without them."""
    out = small_artifact.save(tmp_path / ("old" if recorded.startswith("old") else "art"))
    marker = tmp_path / "MARKER"
    _corrupt(name, out, marker)
    with pytest.raises(InputError, match=CORRUPTIONS[name]) as err:
        load_artifact(out)
    assert str(out) in str(err.value)
    assert not marker.exists()


def test_load_rejects_non_artifacts(tmp_path):
    with pytest.raises(InputError, match="not a bnfold TVM artifact"):
        load_artifact(tmp_path)


# ---------------------------------------------------------------- dynamic batch

def test_dynamic_batch_range(small, tmp_path):
    gm, _ = small
    x1 = torch.randn(1, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UntunedKernelsWarning)
        art = compile(gm, (x1,), dynamic_batch=(1, 4), cache_dir=tmp_path)
    assert art.build_info["signature"]["batch_range"] == [1, 4]
    assert art.build_info["signature"]["inputs"][0]["shape"] == ["batch", 3, 16, 16]
    for b in (1, 3, 4):
        xb = torch.randn(b, 3, 16, 16)
        assert bnfold.compare(gm, art, (xb,)).passed
    with pytest.raises(InputError, match=r"batch size 5 is outside the compiled range 1\.\.4"):
        art(torch.randn(5, 3, 16, 16))


def test_dynamic_batch_cannot_be_tuned(small, tmp_path):
    gm, x = small
    with pytest.raises(InputError, match="static shapes"):
        compile(gm, (x,), dynamic_batch=(1, 8), tune_trials=16, cache_dir=tmp_path)


def test_budget_below_kernel_count_is_refused(small, tmp_path):
    gm, x = small
    with pytest.raises(InputError, match="cannot tune the"):
        compile(gm, (x,), tune_trials=1, cache_dir=tmp_path)


# ---------------------------------------------------------------- CUDA

def _fatbin_arches(data: bytes) -> list[tuple[int, int]]:
    """(kind, sm) of each entry of an NVIDIA fatbin (kind 1 = PTX, 2 = ELF/cubin)."""
    magic, _version, header = struct.unpack_from("<IHH", data, 0)
    assert magic == 0xBA55ED50, "not a fatbin"
    out, off = [], header
    while off + 32 <= len(data):
        kind, _v, entry_header = struct.unpack_from("<HHI", data, off)
        size = struct.unpack_from("<Q", data, off + 8)[0]
        if kind not in (1, 2):
            break
        out.append((kind, struct.unpack_from("<I", data, off + 28)[0]))
        off += entry_header + size
    return out


@pytest.mark.skipif(not HAS_NVCC, reason="nvcc not installed")
def test_cuda_resnet18_sm90a_compiles_here(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(1, 3, 224, 224)
    gm = _folded(torchvision.models.resnet18(), x)
    art = compile(gm, (x,), target="cuda", arch="sm_90a")
    info = art.build_info
    assert info["target"]["kind"] == "cuda" and info["target"]["arch"] == "sm_90a"
    assert json.loads(info["target"]["description"])["arch"] == "sm_90a"
    assert info["cuda"]["kernels"] > 10
    assert info["isa"]["mcpu"] == tvm.target.codegen.llvm_get_system_cpu()  # host code: this CPU
    out = art.save(tmp_path / "r18_cuda")
    fatbin = (out / "kernels.fatbin").read_bytes()
    assert (2, 90) in _fatbin_arches(fatbin)  # a cubin for SM 9.0 ...
    assert b"sm_90a" in fatbin  # ... of the arch-specific 9.0a flavour
    saved = json.loads((out / MANIFEST).read_text())
    assert saved["target"]["arch"] == "sm_90a" and saved["files"]["cuda_fatbin"] == "kernels.fatbin"
    if not HAS_GPU:
        with pytest.raises(BnfoldError, match="no CUDA GPU"):
            art(x)
        assert not load_artifact(out).runnable


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
def test_cuda_artifact_runs_on_gpu(small):
    gm, x = small
    art = compile(gm, (x,), target="cuda")
    y = art(x.cuda())
    assert y.is_cuda
    assert bnfold.compare(gm, lambda t: art(t.cuda()).cpu(), (x,)).passed


def test_cuda_without_arch_and_without_gpu_asks_for_arch(small):
    if HAS_GPU:
        pytest.skip("a GPU is visible: its arch is detected")
    gm, x = small
    with pytest.raises(InputError, match="needs an architecture"):
        compile(gm, (x,), target="cuda")


# ---------------------------------------------------------------- CLI

def test_cli_compile_writes_artifact_folder(tmp_path, capsys):
    from bnfold.cli import main

    torch.manual_seed(0)
    model = randomize_bn(SmallNet())
    x = torch.randn(2, 3, 16, 16)
    src = tmp_path / "net.pt2"
    torch.export.save(torch.export.export(model, (x,)), str(src))
    out = tmp_path / "net_tvm"
    args = ["compile", str(src), "-o", str(out), "--cache-dir", str(tmp_path / "cache")]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "parity vs folded model: PASS" in captured.out
    assert "untuned kernels: 0" in captured.out and "NO schedule" not in captured.err
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["parity_vs_folded"]["passed"] is True
    loaded = load_artifact(out)
    assert torch.allclose(loaded(x), model(x), atol=1e-4, rtol=1e-4)  # folded + compiled ≈ original
    assert main(args) == 2  # refuses to overwrite
    assert "already exists" in capsys.readouterr().err
    assert main([*args, "--force"]) == 0


# ---------------------------------------------------------------- tuning (slow)

@pytest.mark.slow
def test_tiny_budget_tunes_every_kernel_and_second_compile_reuses_the_database(small, tmp_path):
    gm, x = small
    cache = tmp_path / "cache"
    with warnings.catch_warnings():
        warnings.simplefilter("error", UntunedKernelsWarning)  # every kernel must get a schedule
        first = compile(gm, (x,), tune_trials=8, cache_dir=cache, progress=False)
    tuning = first.build_info["tuning"]
    assert tuning["untuned"] == [] and tuning["trials_run"] >= len(tuning["tasks"])
    e2e = tuning["end_to_end"]  # timed beside the default schedules, the faster kept
    assert e2e["kept"] == ("tuned" if e2e["tuned_ms"] <= e2e["default_ms"] else "default")
    assert bnfold.compare(gm, first, (x,)).passed
    db = Path(tuning["database"])
    assert db.parent == cache and (db / "database_tuning_record.json").stat().st_size > 0
    second = compile(gm, (x,), tune_trials=8, cache_dir=cache, progress=False)
    assert second.build_info["tuning"]["trials_run"] == 0  # nothing left to tune
    assert "reused" in second.build_info["tuning"]["note"]
    assert second.build_info["tuning"]["untuned"] == []
    more = compile(gm, (x,), tune_trials=16, cache_dir=cache, progress=False)  # a bigger budget tops up
    assert 0 < more.build_info["tuning"]["trials_run"] <= 16 - tuning["trials_run"] + len(tuning["tasks"])
    assert "topped up" in more.build_info["tuning"]["note"]
    assert bnfold.compare(gm, more, (x,)).passed


def test_tvm_18703_19574_unfolded_bn_runs_in_inference_mode(tmp_path):
    """apache/tvm#18703, #19574: BatchNorm imported (or legalized) in training mode made the compiled model
    normalize with the batch's statistics. A model compiled with its BN left unfolded must use the running
    statistics: each sample's output equals the eval-mode model's and does not depend on the rest of the batch."""
    torch.manual_seed(0)
    model = randomize_bn(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))).eval()
    x = torch.randn(4, 3, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UntunedKernelsWarning)
        art = compile(model, (x,), cache_dir=tmp_path)  # the BN is not folded: TVM imports and lowers it
    other = x.clone()
    other[1:] = torch.randn(3, 3, 8, 8) * 10 + 5  # very different batch statistics
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(art(x), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(art(other)[0], art(x)[0], rtol=1e-5, atol=1e-5)


def test_default_schedules_for_an_avx2_cpu_compile_and_match(small, tmp_path):
    """The hand schedules take their vector width from the target's ISA: an AVX2 build (8 fp32 lanes, 16
    registers; runs on any AVX2 or AVX-512 host) compiles every kernel and matches the folded model."""
    from bnfold.targets.tvm.schedules import params_for
    from bnfold.targets.tvm.target import cpu_target

    flags = host_cpu_flags()
    if not flags or "avx2" not in flags:
        pytest.skip("this host cannot run AVX2 code")
    assert params_for(cpu_target("x86-64-v3").target).lanes == 8
    assert params_for(cpu_target("x86-64-v4").target).lanes == 16
    assert params_for(cpu_target("x86-64").target).lanes == 4
    gm, x = small
    with warnings.catch_warnings():
        warnings.simplefilter("error", UntunedKernelsWarning)
        art = compile(gm, (x,), mcpu="x86-64-v3", cache_dir=tmp_path / "cache")
    assert art.build_info["target"]["mcpu"] == "x86-64-v3" and art.build_info["tuning"]["default_scheduled"]
    assert bnfold.compare(gm, art, (x,)).passed


@pytest.mark.slow
def test_tiny_budget_tunes_for_an_avx2_cpu(small, tmp_path):
    """Tuning works for an AVX2 target too (what an AMD Zen 3 host compiles for): every kernel gets a measured
    schedule, none left unscheduled."""
    flags = host_cpu_flags()
    if not flags or "avx2" not in flags:
        pytest.skip("this host cannot run AVX2 code")
    gm, x = small
    art = compile(gm, (x,), mcpu="x86-64-v3", tune_trials=8, cache_dir=tmp_path / "cache", progress=False)
    tuning = art.build_info["tuning"]
    assert tuning["untuned"] == [] and tuning["trials_run"] >= len(tuning["tasks"])
    assert all(t.get("best_us") for t in tuning["tasks"])
    assert bnfold.compare(gm, art, (x,)).passed


@pytest.mark.slow
def test_tuning_stops_after_a_first_batch_that_all_fails(small, tmp_path, monkeypatch):
    """Every build timing out (here: a 1 ms build timeout) stops tuning at once with the first error, instead of
    spending the budget; nothing is written to the database."""
    from bnfold.errors import BnfoldError

    monkeypatch.setenv("BNFOLD_TVM_BUILD_TIMEOUT", "0.001")
    gm, x = small
    with pytest.raises(BnfoldError, match=r"tuning stopped after its first batch.*timed out"):
        compile(gm, (x,), tune_trials=64, cache_dir=tmp_path / "cache", progress=False)
    runs = list((tmp_path / "cache").rglob("database_tuning_record.json"))
    assert all(p.stat().st_size == 0 or "runs" in p.parts for p in runs)


def test_build_timeout_from_the_environment(monkeypatch):
    from bnfold.errors import BnfoldError
    from bnfold.targets.tvm.tuning import build_timeout_s

    monkeypatch.delenv("BNFOLD_TVM_BUILD_TIMEOUT", raising=False)
    assert build_timeout_s() == 60.0
    monkeypatch.setenv("BNFOLD_TVM_BUILD_TIMEOUT", "150")
    assert build_timeout_s() == 150.0
    monkeypatch.setenv("BNFOLD_TVM_BUILD_TIMEOUT", "soon")
    with pytest.raises(BnfoldError, match="not a positive number"):
        build_timeout_s()


def test_a_foreign_handler_on_metaschedules_logger_survives_tuning_setup(tmp_path):
    """MetaSchedule's logging setup fails on a handler it did not create (pytest's capture handler, a user's):
    bnfold sets such handlers aside for the setup and puts them back."""
    import logging

    from tvm.s_tir.meta_schedule.logging import get_loggers_from_work_dir

    from bnfold.targets.tvm.tuning import _foreign_handlers_set_aside

    logger = logging.getLogger("tvm.s_tir.meta_schedule")
    mine = logging.NullHandler()  # no name
    logger.addHandler(mine)
    try:
        with pytest.raises(AttributeError):
            get_loggers_from_work_dir(str(tmp_path / "a"), ["task"])  # TVM's own behaviour
        logger.addHandler(mine)
        with _foreign_handlers_set_aside(logger):
            get_loggers_from_work_dir(str(tmp_path / "b"), ["task"])
        assert mine in logger.handlers
    finally:
        logger.removeHandler(mine)


def test_measured_kernels_get_valid_integer_arguments():
    """Tuning measures candidates on zero integer/boolean arguments (valid indices for any gather) and random
    floats, not MetaSchedule's random bits, which made every ``take`` candidate read outside its table and crash
    the runner's subprocess."""
    import tvm

    from bnfold.targets.tvm.measure_inputs import valid_alloc_argument

    infos = [("TENSOR", "int64", [4, 3]), ("TENSOR", "float32", [64]), ("TENSOR", "bool", [5]),
             ("TENSOR", "int32", [2])]
    lists = valid_alloc_argument(tvm.cpu(0), infos, 2)
    assert len(lists) == 2
    for args in lists:
        ids, floats, mask, small = (a.numpy() for a in args)
        assert ids.shape == (4, 3) and ids.dtype == "int64" and not ids.any()
        assert small.dtype == "int32" and not small.any() and mask.dtype == bool and not mask.any()
        assert floats.dtype == "float32" and len(set(floats.tolist())) > 32  # randomly filled


class _Lookup(nn.Module):
    """Token and position embeddings (two gathers) and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.pos, self.fc = nn.Embedding(1000, 64), nn.Embedding(32, 64), nn.Linear(64, 10)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(self.emb(ids) + self.pos(torch.arange(ids.shape[1]).unsqueeze(0)))


@pytest.mark.slow
def test_tuning_a_gather_loses_no_runner_worker(tmp_path):
    """Measured (2-core Zen 5): with MetaSchedule's random integer arguments, 2 of this model's 12 trials were
    lost ("LocalRunner: An exception occurred / Subprocess terminated": the ``take`` kernels read outside the
    table); with valid ones, none."""
    torch.manual_seed(0)
    model, x = _Lookup().eval(), torch.randint(0, 1000, (1, 32))
    gm = bnfold.fold(model, (x,), check=False).module
    art = compile(gm, (x,), tune_trials=12, cache_dir=tmp_path, progress=False)
    tuning = art.build_info["tuning"]
    assert any(t["name"].startswith("take") and t["trials"] for t in tuning["tasks"]), tuning["tasks"]
    assert tuning["trials_run"] >= 12 and tuning["failed_runs"] == 0 and tuning["failed_builds"] == 0, tuning
    assert bnfold.compare(gm, art, (x,)).passed
