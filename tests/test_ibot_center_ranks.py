"""The iBOT center across ranks that mask different numbers of patches, against DINOv2.

DINOv2's iBOTPatchLoss all-reduces each rank's mean over its masked patches and divides by
the world size, then applies the EMA (momentum 0.9) lazily, at the next targets. Two gloo
processes with 7 and 30 masked patches run dinospec's loss and the reference's
(../shared/reference/dinov2) side by side from the same non-zero center.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import dinov2
from torch.testing import assert_close

from dinospec.losses import IBOTPatchLoss
from launch.local import free_port

WORLD_SIZE = 2
K = 16
MOMENTUM = 0.9
TEMP = 0.07
TOL = {"rtol": 1e-6, "atol": 1e-6}


def _inputs() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "center": torch.randn(1, 1, K, generator=generator),
        "rank0": torch.randn(7, K, generator=generator) * 3,
        "rank1": torch.randn(30, K, generator=generator) * 3 + 1,
        "probe": torch.randn(5, K, generator=generator) * 3,
    }


def _reference_loss(center: torch.Tensor) -> torch.nn.Module:
    loss = dinov2("dinov2.loss.ibot_patch_loss").iBOTPatchLoss(K, center_momentum=MOMENTUM)
    loss.center = center.clone()
    return loss


def _one_update(rows: torch.Tensor, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """dinospec's and DINOv2's centers and targets after one update with this rank's rows,
    passed as ssl_meta_arch.py passes them (unsqueezed to (1, n, K)) to the reference."""
    ours = IBOTPatchLoss(K, center_momentum=MOMENTUM)
    ours.center.copy_(inputs["center"])
    ours.update_center(rows)
    ours_targets = ours.softmax_center_teacher(inputs["probe"], TEMP)
    reference = _reference_loss(inputs["center"])
    reference.update_center(rows.unsqueeze(0))
    reference_targets = reference.softmax_center_teacher(inputs["probe"].unsqueeze(0), TEMP)
    return {
        "center": ours.center.clone(),
        "targets": ours_targets,
        "reference_center": reference.center.clone(),
        "reference_targets": reference_targets.squeeze(0),
    }


def _worker(rank: int, port: int, inputs: dict[str, torch.Tensor], out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=timedelta(seconds=60))
    try:
        result = _one_update(inputs[f"rank{rank}"], inputs)
        ours = IBOTPatchLoss(K, center_momentum=MOMENTUM)
        ours.center.copy_(inputs["center"])
        ours.update_center(inputs["rank0"][: 7 * (1 - rank)])  # rank 1 masked nothing
        ours.apply_center_update()
        result["center_one_rank_empty"] = ours.center.clone()
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ibot_center_averages_the_ranks_means_as_dinov2(tmp_path):
    inputs = _inputs()
    mp.spawn(_worker, args=(free_port(), inputs, str(tmp_path)), nprocs=WORLD_SIZE)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]

    rank_means = (inputs["rank0"].mean(0) + inputs["rank1"].mean(0)) / WORLD_SIZE
    by_hand = inputs["center"] * MOMENTUM + rank_means * (1 - MOMENTUM)
    pooled_mean = torch.cat([inputs["rank0"], inputs["rank1"]]).mean(0)
    pooled = inputs["center"] * MOMENTUM + pooled_mean * (1 - MOMENTUM)
    assert (by_hand - pooled).abs().max() > 0.01, "inputs too alike to tell the formulas apart"
    for result in ranks:
        assert_close(result["reference_center"], by_hand, **TOL)
        assert_close(result["center"], by_hand, **TOL)
        assert_close(result["targets"], result["reference_targets"], **TOL)
        only_rank0 = inputs["center"] * MOMENTUM + inputs["rank0"].mean(0) * (1 - MOMENTUM)
        assert_close(result["center_one_rank_empty"], only_rank0, **TOL)


def test_single_process_center_is_the_mean_of_its_patches():
    """One rank: the average of one mean is that mean, as before (bit for bit)."""
    inputs = _inputs()
    result = _one_update(inputs["rank1"], inputs)
    expected = inputs["center"] * MOMENTUM + inputs["rank1"].sum(0) / 30 * (1 - MOMENTUM)
    assert torch.equal(result["center"], expected)
    assert_close(result["center"], result["reference_center"], **TOL)
    assert_close(result["targets"], result["reference_targets"], **TOL)


def test_no_masked_patches_anywhere_leaves_the_center():
    loss = IBOTPatchLoss(K)
    loss.center.copy_(_inputs()["center"])
    loss.update_center(torch.empty(0, K))
    loss.apply_center_update()
    assert torch.equal(loss.center, _inputs()["center"])
