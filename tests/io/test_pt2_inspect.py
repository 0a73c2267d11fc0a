"""``.pt2`` archives are inspected before loading: every member that would unpickle or run code is refused
(naming it) unless trusted. Each hostile archive is also shown to run code through plain ``torch.export`` (on a torch
that reads the member: ``TORCH_READS_IT``)."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest
import torch
from hostile_files import build_files

from bnfold.errors import InputError
from bnfold.io.models import load_model
from bnfold.io.pt2_inspect import inspect_archive

# archive → (member named in the refusal, how plain torch gets to run its code)
HOSTILE = {
    "evil_inputs.pt2": ("data/sample_inputs/model.pt", "load"),
    "evil_weight.pt2": ("data/weights/weight_", "load"),
    "evil_object.pt2": ("data/constants/opaque_obj_0", "load"),
    "evil_guard.pt2": ("models/model.json", "run"),
    "evil_sympy.pt2": ("models/model.json", "load"),
}
# the first torch whose plain loader reads the member (older ones ignore data/constants/opaque_obj_N; bnfold refuses
# it on every torch, as a newer one would unpickle it)
TORCH_READS_IT = {"evil_object.pt2": (2, 13)}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Path], Path]:
    folder = tmp_path_factory.mktemp("pt2")
    marker = folder / "MARKER"
    return build_files(folder, marker), marker


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_member_runs_code_in_torch_but_not_in_bnfold(name: str, files: tuple[dict[str, Path], Path]) -> None:
    paths, marker = files
    member, when = HOSTILE[name]
    marker.unlink(missing_ok=True)
    with pytest.raises(InputError, match=member) as err:
        load_model(paths[name])
    assert "--trust-pickle" in str(err.value)
    assert not marker.exists()
    if torch.torch_version.TorchVersion(torch.__version__) < TORCH_READS_IT.get(name, (0,)):
        pytest.skip(f"refused; torch {torch.__version__} does not read {member}: no payload to show running")
    # the archive really is hostile: plain torch runs its payload
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.disable(logging.CRITICAL)
        try:
            module = torch.export.load(str(paths[name])).module()
            if when == "run":
                module(torch.randn(2, 3, 8, 8))
        except Exception:
            pass
        finally:
            logging.disable(logging.NOTSET)
    assert marker.exists(), f"{name} did not run code in plain torch: the test lost its teeth"
    marker.unlink()


def test_plain_archive_loads_without_the_flag_with_its_example_inputs(files: tuple[dict[str, Path], Path]) -> None:
    paths, _ = files
    assert inspect_archive(paths["model.pt2"].read_bytes(), paths["model.pt2"]).findings == []
    loaded = load_model(paths["model.pt2"])
    assert loaded.example_inputs is not None and loaded.example_inputs[0].shape == (2, 3, 8, 8)


def test_unsafe_example_inputs_are_skipped_when_the_caller_has_its_own(files: tuple[dict[str, Path], Path]) -> None:
    paths, marker = files
    marker.unlink(missing_ok=True)
    loaded = load_model(paths["evil_inputs.pt2"], own_example_inputs=True)
    assert loaded.example_inputs is None
    assert loaded.module(torch.randn(3, 3, 8, 8)).shape == (3, 4, 8, 8)
    assert not marker.exists()
    with pytest.raises(InputError, match="data/weights/weight_"):  # only example inputs can be skipped
        load_model(paths["evil_weight.pt2"], own_example_inputs=True)


@pytest.mark.parametrize("name,fragment", [("evil_target.pt2", "not a torch operator"),
                                           ("evil_aoti.pt2", "AOTInductor")])
def test_defence_in_depth_members(name: str, fragment: str, files: tuple[dict[str, Path], Path]) -> None:
    """Call targets outside torch.ops (torch's verifier also refuses them) and AOTInductor libraries."""
    paths, _ = files
    with pytest.raises(InputError, match=fragment):
        load_model(paths[name])


class _Dynamic(torch.nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 3:
            return x[:, :4] * 2 + y.sum() + x.shape[1] / 3.0  # a float symbolic expression: Float('3.0')
        return x


def test_legitimate_dynamic_archive_has_no_findings(tmp_path: Path) -> None:
    dims = ({0: torch.export.Dim("b", min=4, max=64), 1: torch.export.Dim("c", min=5)}, {0: torch.export.Dim.AUTO})
    ep = torch.export.export(_Dynamic(), (torch.randn(8, 6), torch.randn(3)), dynamic_shapes=dims)
    path = tmp_path / "dyn.pt2"
    torch.export.save(ep, str(path))
    assert inspect_archive(path.read_bytes(), path).findings == []
    assert load_model(path).module(torch.randn(5, 7), torch.randn(2)).shape == (5, 4)


@pytest.mark.parametrize("guard,safe", [
    ("L['x'].size()[0] == 3", True),
    ("2 <= L['x'].size()[0] and L['y'].stride()[1] == 1", True),
    ("L['x'].size()[0] % 8 == 0", True),
    ("__import__('os').system('true')", False),
    ("L['x'].__class__", False),
    ("open('f', 'w') is None", False),
    ("[c for c in ()]", False),
])
def test_guard_code_allows_shape_checks_only(guard: str, safe: bool) -> None:
    from bnfold.io.pt2_inspect import _safe_guard

    assert _safe_guard(guard) is safe


def test_archive_tricks_are_refused(files: tuple[dict[str, Path], Path], tmp_path: Path) -> None:
    """Members torch would read that a naive inspection would not: a duplicated member (two zip readers may
    pick different copies), and a pre-2.8 archive (pickled throughout)."""
    import zipfile

    paths, _ = files
    src = zipfile.ZipFile(paths["evil_inputs.pt2"])
    good = zipfile.ZipFile(paths["model.pt2"])
    dup = tmp_path / "dup.pt2"
    with zipfile.ZipFile(dup, "w") as z, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Duplicate name"
        for info in src.infolist():
            z.writestr(info.filename, src.read(info.filename))
        name = next(n for n in good.namelist() if n.endswith("data/sample_inputs/model.pt"))
        z.writestr(name, good.read(name))  # a clean copy last: what zipfile.read returns
    with pytest.raises(InputError, match="more than once"):
        load_model(dup)
    old = tmp_path / "old.pt2"
    with zipfile.ZipFile(old, "w") as z:
        z.writestr("old/version", "8.1")
        z.writestr("old/serialized_state_dict.pt", b"pickle")
    with pytest.raises(InputError, match=r"pre-2\.8"):
        load_model(old)


def test_issue28_missing_member_is_named(files: tuple[dict[str, Path], Path], tmp_path: Path) -> None:
    """Issue 28: a .pt2 missing a member said "Please check the warnings above for possible errors" (torch's words,
    with its warnings silenced: none were printed). Every member torch's reader needs is now checked first and the
    one missing is named, trusted or not."""
    import zipfile

    paths, _ = files
    good = zipfile.ZipFile(paths["model.pt2"])
    wanted = {"data/weights/weight_0": "conv.weight", "data/weights/model_weights_config.json": "weights",
              "data/constants/model_constants_config.json": "constants", "models/model.json": "the program"}
    for member, what in wanted.items():
        cut = tmp_path / f"cut_{member.replace('/', '_')}.pt2"
        with zipfile.ZipFile(cut, "w") as z:
            for info in good.infolist():
                if not info.filename.endswith(member):
                    z.writestr(info.filename, good.read(info.filename))
        for trusted in (False, True):
            with pytest.raises(InputError, match="is incomplete") as err:
                load_model(cut, trusted_pickle=trusted)
            text = str(err.value)
            assert what in text and "warnings above" not in text, text
            assert member in text or member.startswith("models/"), text
