"""Distributed recalibration: 2 CPU processes (gloo) over a split of the data equal 1 process over all of it."""

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


def _model() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(DigitsNet(width=8), seed=0)


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
        for mode in MODES:
            report = bnfold.recalibrate(_model(), mine, mode=mode)
            result[mode] = {"stats": _stats(report), "samples": report.samples, "world": report.world_size}
        drift = bnfold.diagnose(_model(), mine)
        result["diagnose"] = {layer.name: layer.score for layer in drift.layers}
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one_process_over_the_union(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    torch.set_num_threads(1)
    for mode in MODES:
        single = _stats(bnfold.recalibrate(_model(), _batches(), mode=mode))
        for got in ranks:
            assert got[mode]["world"] == 2 and got[mode]["samples"] == sum(SIZES)
            assert got[mode]["stats"].keys() == single.keys()
            for name, (mean, var) in single.items():
                g_mean, g_var = got[mode]["stats"][name]
                # the mean relative to max(|mean|, std), as in tests/test_recalibrate.py::_mean_err
                assert float(((g_mean - mean).abs() / torch.maximum(mean.abs(), var.sqrt())).max()) <= 1e-6, \
                    (mode, name)
                assert float(((g_var - var).abs() / var).max()) <= 1e-6, (mode, name)
    single_drift = {layer.name: layer.score for layer in bnfold.diagnose(_model(), _batches()).layers}
    for got in ranks:
        for name, score in single_drift.items():
            assert abs(got["diagnose"][name] - score) <= 1e-6 * score
