"""The DINO, iBOT and KoLeo losses reproduce the reference DINOv2 losses (../shared/golden).

The reference exponentiates teacher logits / temperature directly in its Sinkhorn-Knopp,
and the golden logits (up to about 12, temperature 0.07) overflow float32 there, so the
golden Sinkhorn-Knopp targets, and the two losses computed from them, are NaN. Those are
checked instead against the published algorithm evaluated in float64, where nothing
overflows, and the iBOT loss against its definition on the golden softmax targets.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.testing import assert_close

from dinospec.losses import DINOLoss, IBOTPatchLoss, KoLeoLoss
from launch.local import free_port

TOL = {"rtol": 1e-5, "atol": 1e-6}
WORLD_SIZE = 2


@pytest.fixture(scope="module")
def golden(golden_dir: Path) -> tuple[dict, dict]:
    data = torch.load(golden_dir / "losses.pt", weights_only=True)
    return data, json.loads(data["config"])


def _step(data: dict, step: int, key: str) -> torch.Tensor:
    return data[f"step{step}.{key}"]


def _published_sinkhorn_knopp(logits: torch.Tensor, temp: float, n_iterations: int) -> torch.Tensor:
    """Sinkhorn-Knopp as published (plain exponential, explicit 1/K and 1/B marginals) in
    float64, whose range holds exp(12 / 0.07)."""
    q = torch.exp(logits.double() / temp)
    n_samples, n_prototypes = q.shape
    q = q / q.sum()
    for _ in range(n_iterations):
        q = q / q.sum(dim=0, keepdim=True) / n_prototypes
        q = q / q.sum(dim=1, keepdim=True) / n_samples
    return (q * n_samples).float()


def test_reference_values_over_steps(golden):
    data, cfg = golden
    dino = DINOLoss(cfg["K"], cfg["student_temp"], cfg["center_momentum"])
    ibot = IBOTPatchLoss(cfg["K"], cfg["student_temp"], cfg["center_momentum"])
    koleo = KoLeoLoss()
    temp = cfg["teacher_temp"]
    for s in range(cfg["steps"]):
        teacher = _step(data, s, "teacher")
        targets = dino.softmax_center_teacher(teacher, temp)
        dino.update_center(teacher)
        assert_close(targets, _step(data, s, "softmax_centered"), **TOL)
        # All n_global + n_local student chunks against both teacher chunks, same view
        # included, summed without normalization.
        student_chunks = _step(data, s, "student").chunk(cfg["n_global"] + cfg["n_local"])
        loss = dino(student_chunks, targets.chunk(cfg["n_global"]))
        assert_close(loss, _step(data, s, "dino_loss_softmax"), **TOL)

        ibot_teacher = _step(data, s, "ibot_teacher")
        ibot_targets = ibot.softmax_center_teacher(ibot_teacher, temp)
        ibot.update_center(ibot_teacher)
        assert_close(ibot_targets, _step(data, s, "ibot_softmax_centered"), **TOL)

        assert_close(koleo(_step(data, s, "koleo_input")), _step(data, s, "koleo_loss"), **TOL)
    dino.apply_center_update()
    ibot.apply_center_update()
    assert_close(dino.center, data["final.dino_center"], **TOL)
    assert_close(ibot.center, data["final.ibot_center"], **TOL)


def test_sinkhorn_knopp_where_the_reference_overflowed(golden):
    data, cfg = golden
    temp, n_iter = cfg["teacher_temp"], cfg["sk_iterations"]
    dino, ibot = DINOLoss(cfg["K"]), IBOTPatchLoss(cfg["K"])
    for s in range(cfg["steps"]):
        for loss, logits_key, golden_key in (
            (dino, "teacher", "sinkhorn_knopp"),
            (ibot, "ibot_teacher", "ibot_sinkhorn_knopp"),
        ):
            logits = _step(data, s, logits_key)
            assert torch.isinf(torch.exp(logits / temp)).any(), "logits no longer overflow"
            assert _step(data, s, golden_key).isnan().all(), "golden is finite: compare to it"
            targets = loss.sinkhorn_knopp_teacher(logits, temp, n_iterations=n_iter)
            assert_close(targets, _published_sinkhorn_knopp(logits, temp, n_iter), **TOL)
        for key in ("dino_loss_sk", "ibot_loss"):
            assert _step(data, s, key).isnan(), "golden is finite: compare to it"


def test_ibot_loss_weights_each_masked_image_equally(golden):
    """Mean cross-entropy per masked image, summed and divided by all images; the golden
    masks cover every image, so unmasked images (last in the batch) are appended."""
    data, cfg = golden
    ibot = IBOTPatchLoss(cfg["K"], cfg["student_temp"])
    for s in range(cfg["steps"]):
        masks = _step(data, s, "ibot_masks")
        masks = torch.cat([masks, torch.zeros(s + 1, masks.shape[1], dtype=torch.bool)])
        student = _step(data, s, "ibot_student")
        targets = _step(data, s, "ibot_softmax_centered")
        per_patch = -(targets * F.log_softmax(student / cfg["student_temp"], dim=-1)).sum(-1)
        image_means = [
            chunk.mean() for chunk in per_patch.split(masks.sum(-1).tolist()) if len(chunk)
        ]
        expected = torch.stack(image_means).sum() / len(masks)
        assert_close(ibot.forward_masked(student, targets, masks), expected, **TOL)


def test_ibot_loss_with_padded_buffers_and_given_weights(golden):
    """Rows past n_masked_patches are padding and must not count; given weights replace
    the computed ones (doubled here, so ignoring them would show)."""
    data, cfg = golden
    ibot = IBOTPatchLoss(cfg["K"])
    masks = _step(data, 0, "ibot_masks")
    student, targets = _step(data, 0, "ibot_student"), _step(data, 0, "ibot_softmax_centered")
    padding = torch.randn(7, student.shape[1])
    weights = 2 / masks.sum(-1, keepdim=True).expand_as(masks)[masks]
    padded = ibot.forward_masked(
        torch.cat([student, padding]),
        torch.cat([targets, padding.softmax(-1)]),
        masks,
        n_masked_patches=len(student),
        masks_weight=weights,
    )
    assert_close(padded, 2 * ibot.forward_masked(student, targets, masks), **TOL)


def test_koleo_is_finite_on_duplicates():
    vectors = torch.randn(4, 32).repeat(2, 1).requires_grad_()
    loss = KoLeoLoss()(vectors)
    loss.backward()
    # Every vector's nearest neighbour is its copy, at distance eps * sqrt(dim).
    expected = -torch.log(torch.tensor(1e-8 * 32**0.5 + 1e-8))
    assert_close(loss.detach(), expected, **TOL)
    assert torch.isfinite(vectors.grad).all()
    assert torch.isfinite(KoLeoLoss()(torch.ones(5, 32)))


def test_pending_center_update_is_saved_with_the_state_dict():
    loss = DINOLoss(8)
    teacher = torch.randn(6, 8)
    loss.update_center(teacher)
    restored = DINOLoss(8)
    restored.load_state_dict(loss.state_dict())
    assert_close(restored.center, 0.1 * teacher.mean(0, keepdim=True), **TOL)


def test_sinkhorn_knopp_iteration_count_is_keyword_only():
    with pytest.raises(TypeError):
        IBOTPatchLoss(8).sinkhorn_knopp_teacher(torch.randn(4, 8), 0.07, torch.tensor([4]))


def _shard_results(
    dino_teacher: torch.Tensor, ibot_teacher: torch.Tensor, shards: dict, temp: float
) -> dict[str, torch.Tensor]:
    """Center updates and Sinkhorn-Knopp targets from this rank's shard of each input;
    uninitialized torch.distributed with one shard each gives the single-process result."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    dino_rows = dino_teacher.split(shards["dino"])[rank]
    ibot_rows = ibot_teacher.split(shards["ibot"])[rank]
    dino, ibot = DINOLoss(dino_teacher.shape[1]), IBOTPatchLoss(ibot_teacher.shape[1])
    dino.update_center(dino_rows)
    ibot.update_center(ibot_rows)
    dino.apply_center_update()
    ibot.apply_center_update()
    return {
        "dino_center": dino.center,
        "ibot_center": ibot.center,
        "dino_sk": dino.sinkhorn_knopp_teacher(dino_rows, temp),
        "ibot_sk": ibot.sinkhorn_knopp_teacher(ibot_rows, temp),
        "ibot_sk_one_rank": ibot.sinkhorn_knopp_teacher(
            ibot_teacher.split(shards["ibot_one_rank"])[rank], temp
        ),
    }


def _sharded_worker(rank: int, port: int, inputs: tuple, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD_SIZE, timeout=timedelta(seconds=60))
    try:
        torch.save(_shard_results(*inputs), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_sharded_matches_single_process(tmp_path):
    # Uneven iBOT shards (ranks mask different numbers of patches), one of them empty.
    dino_teacher, ibot_teacher = torch.randn(16, 32) * 4, torch.randn(37, 32) * 4
    sharded = {"dino": [8, 8], "ibot": [25, 12], "ibot_one_rank": [37, 0]}
    whole = {name: [sum(split)] for name, split in sharded.items()}
    expected = _shard_results(dino_teacher, ibot_teacher, whole, 0.07)

    inputs = (dino_teacher, ibot_teacher, sharded, 0.07)
    mp.spawn(_sharded_worker, args=(free_port(), inputs, str(tmp_path)), nprocs=WORLD_SIZE)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]

    # The iBOT center follows the average of the ranks' means, as DINOv2's (see
    # tests/test_ibot_center_ranks.py), not the mean of the 37 patches.
    ibot_shards = ibot_teacher.split(sharded["ibot"])
    expected["ibot_center"] = 0.1 * sum(s.mean(0) for s in ibot_shards) / WORLD_SIZE
    for key in ("dino_center", "ibot_center"):
        for result in ranks:
            assert_close(result[key].flatten(), expected[key].flatten(), rtol=1e-6, atol=1e-6)
    for key in ("dino_sk", "ibot_sk", "ibot_sk_one_rank"):
        assert_close(torch.cat([r[key] for r in ranks]), expected[key], rtol=1e-6, atol=1e-6)
