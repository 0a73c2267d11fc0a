"""Distributed recalibration: 2 CPU processes (gloo) over a split of the data equal 1 process over all of it.

Twice: with the demo model's randomized statistics, and with every stored mean moved 10^6 standard deviations
away ("far"), so that each rank moves its shifts to its own first batch's means and the ranks' sums must be
rebased to a common shift before they are added (without that, float64 cancellation alone costs ~1e-4)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import randomize_bn
from torch import nn

import bnfold
from bnfold.demo.model import DigitsNet

SIZES = (7, 64, 33, 2, 100, 1, 40)  # uneven batches; rank 0 gets 4 of them, rank 1 gets 3
MODES = ("batch", "sequential")
CASES = tuple((mode, far) for far in (False, True) for mode in MODES)


def _model(far: bool = False) -> nn.Module:
    torch.manual_seed(0)
    model = randomize_bn(DigitsNet(width=8), seed=0)
    if far:
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.running_mean.add_(1e6 * m.running_var.sqrt())
    return model


def _batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.rand(n, 1, 8, 8, generator=g) * 3 + 1 for n in SIZES]


def _stats(report: bnfold.RecalibrationReport) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {e.name: (e.mean, e.var) for e in report.layers}


def _worker(rank: int, world_size: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        mine = _batches()[rank::world_size]
        result: dict[str, object] = {}
        for mode, far in CASES:
            report = bnfold.recalibrate(_model(far), mine, mode=mode)
            result[mode, far] = {"stats": _stats(report), "samples": report.samples, "world": report.world_size}
        drift = bnfold.diagnose(_model(), mine)
        result["diagnose"] = {layer.name: layer.score for layer in drift.layers}
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one_process_over_the_union(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    torch.set_num_threads(1)
    for case in CASES:
        mode, far = case
        single = _stats(bnfold.recalibrate(_model(far), _batches(), mode=mode))
        for got in ranks:
            assert got[case]["world"] == 2 and got[case]["samples"] == sum(SIZES)
            assert got[case]["stats"].keys() == single.keys()
            for name, (mean, var) in single.items():
                g_mean, g_var = got[case]["stats"][name]
                # every layer sees the same values in both runs (batch statistics are per batch): relative to
                # |mean| unless the mean is float64 noise (< 1e-9 std)
                scale = torch.maximum(mean.abs(), 1e-9 * var.sqrt())
                assert float(((g_mean - mean).abs() / scale).max()) <= 1e-6, (case, name)
                assert float(((g_var - var).abs() / var).max()) <= 1e-6, (case, name)
    single_drift = {layer.name: layer.score for layer in bnfold.diagnose(_model(), _batches()).layers}
    for got in ranks:
        for name, score in single_drift.items():
            assert abs(got["diagnose"][name] - score) <= 1e-6 * score
