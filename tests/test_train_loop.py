"""End-to-end training runs on a tiny model: exact resume, distributed equivalence,
non-finite losses, bad data and checkpoints."""

import json
import math
import shutil

import pytest
import torch
import torch.multiprocessing as mp
from train_helpers import first_batch, read_metrics, run_cli, tiny_config

from dinospec.config import ConfigError
from dinospec.models.checkpoints import load_backbone
from dinospec.train.checkpoint import list_checkpoints
from dinospec.train.loop import NonFiniteLossError, Trainer, train
from dinospec.train.optim import apply_schedule_values
from launch.local import free_port, join_as_rank


def _losses(run_dir):
    return [(m["iteration"], m["loss"]) for m in read_metrics(run_dir)]


@pytest.mark.slow
def test_resume_is_bit_exact(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    first = run_cli(straight, "train.max_iterations=6")
    assert first.returncode == 0, first.stderr
    half = run_cli(resumed, "train.max_iterations=3", "train.checkpoint_every=3")
    assert half.returncode == 0, half.stderr
    rest = run_cli(resumed, "train.max_iterations=6", "train.checkpoint_every=3")
    assert rest.returncode == 0, rest.stderr
    assert "resumed from iteration 3" in rest.stdout
    assert _losses(straight) == _losses(resumed)
    assert len(_losses(straight)) == 6
    a = load_backbone(straight / "teacher_backbone.safetensors").state_dict()
    b = load_backbone(resumed / "teacher_backbone.safetensors").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_run_killed_between_checkpoints_logs_each_iteration_once(tmp_path, caplog):
    """Killed after logging iteration 5 (half-way through a last line) but before its
    checkpoint: the next run resumes at 4 and its metrics read as one straight run."""
    straight = train(tiny_config(tmp_path / "straight", "train.max_iterations=6"))
    run_dir = tmp_path / "killed"
    train(tiny_config(run_dir, "train.max_iterations=5"))
    shutil.rmtree(list_checkpoints(run_dir / "checkpoints")[-1])
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"iteration": 6, "lo')
    train(tiny_config(run_dir, "train.max_iterations=6"))
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [1, 2, 3, 4, 5, 6]
    assert _losses(run_dir) == _losses(straight)
    assert "metrics.jsonl:6: dropped an unreadable line" in caplog.text


def test_metrics_and_exports(tmp_path, capsys):
    run_dir = train(tiny_config(tmp_path / "run", "train.max_iterations=4"))
    metrics = read_metrics(run_dir)
    assert [m["iteration"] for m in metrics] == [1, 2, 3, 4]
    keys = {
        "loss_dino_global",
        "loss_dino_local",
        "loss_koleo",
        "loss_ibot",
        "lr",
        "wd",
        "momentum",
        "teacher_temp",
        "images_per_s",
        "data_time_s",
        "peak_memory_mb",
        "eta_s",
        "teacher_entropy",
        "student_cls_std",
    }
    assert keys <= metrics[0].keys()
    assert all(math.isfinite(m["loss"]) for m in metrics)
    assert all(m["loss_window_mean"] == m["loss"] for m in metrics)  # log_every=1
    assert metrics[0]["lr"] == 0.0 and metrics[-1]["lr"] > 0
    out = capsys.readouterr().out
    assert "it 4/4 loss" in out and "img/s" in out and "eta" in out
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == [
        "iter_00000002",
        "iter_00000004",
    ]
    teacher = load_backbone(run_dir / "teacher_backbone.pth", num_heads=4)
    assert teacher.blocks[0].attn.qkv.prefix_weight.shape == (96, 32)
    assert (run_dir / "config.yaml").is_file()


def test_logged_mean_loss_covers_the_iterations_since_the_last_line(tmp_path, capsys):
    every = train(tiny_config(tmp_path / "every", "train.max_iterations=6"))
    sparse = train(tiny_config(tmp_path / "sparse", "train.max_iterations=6", "train.log_every=3"))
    losses = [m["loss"] for m in read_metrics(every)]
    logged = read_metrics(sparse)
    assert [m["iteration"] for m in logged] == [3, 6]
    for record, window in zip(logged, (losses[:3], losses[3:]), strict=True):
        assert record["loss"] == window[-1]
        assert record["loss_window_mean"] == pytest.approx(sum(window) / 3, rel=1e-12)
    assert "mean of last 3" in capsys.readouterr().out


def test_teacher_gets_no_gradients_and_follows_ema(tmp_path):
    trainer = Trainer(tiny_config(tmp_path / "run", "train.max_iterations=1"))
    before = {k: v.clone() for k, v in trainer.model.teacher.state_dict().items()}
    trainer.run()
    assert all(p.grad is None for p in trainer.model.teacher.parameters())
    student = trainer.model.student.state_dict()
    m = trainer.schedules.momentum(0)
    for name, value in trainer.model.teacher.state_dict().items():
        torch.testing.assert_close(value, m * before[name] + (1 - m) * student[name])


def test_nonfinite_loss_skips_then_stops_naming_the_term(tmp_path, monkeypatch, capsys):
    from dinospec.losses import KoLeoLoss

    monkeypatch.setattr(KoLeoLoss, "forward", lambda self, x, eps=1e-8: x.sum() * float("nan"))
    config = tiny_config(tmp_path / "run", "train.max_nonfinite_skips=2")
    with pytest.raises(
        NonFiniteLossError,
        match=r"\['koleo'\].*Last checkpoint written before the divergence: none",
    ):
        train(config)
    assert capsys.readouterr().out.count("non-finite loss term(s) ['koleo']; update skipped") == 3
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_skipped_step_changes_nothing(tmp_path, monkeypatch):
    """The backward pass runs before the finiteness check (one wait for the device per
    step); a skipped step must still leave weights, optimizer state and centers as they
    were, with no gradients or center update left behind."""
    from dinospec.losses import KoLeoLoss

    trainer = Trainer(tiny_config(tmp_path / "run"))
    batch = first_batch(trainer)
    values = trainer.schedules.at(6)
    apply_schedule_values(trainer.optimizer, values)
    assert not trainer.step(batch, values).nonfinite
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    state = trainer.optimizer.state
    moments = {id(p): {k: v.clone() for k, v in s.items()} for p, s in state.items()}
    monkeypatch.setattr(KoLeoLoss, "forward", lambda self, x, eps=1e-8: x.sum() * float("nan"))
    assert trainer.step(batch, values).nonfinite == ["koleo"]
    after = trainer.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in trainer.model.parameters())
    for p, state in trainer.optimizer.state.items():
        assert all(torch.equal(v, moments[id(p)][k]) for k, v in state.items())
    assert trainer.model.dino_loss._pending is None and trainer.model.ibot_loss._pending is None


def test_missing_dataset_fails_before_the_model_is_built(tmp_path, monkeypatch):
    built = []
    monkeypatch.setattr("dinospec.train.loop.SSLModel", lambda *a: built.append(a))
    config = tiny_config(
        tmp_path / "run", "data.dataset=imagenet", f"data.path={tmp_path / 'nope'}"
    )
    with pytest.raises(ConfigError, match=r"data\.path=.*nope"):
        Trainer(config)
    assert not built
    with pytest.raises(ConfigError, match=r"data\.path"):
        tiny_config(tmp_path / "run", "data.dataset=folder")


def test_corrupt_checkpoint_falls_back_to_previous(tmp_path, capsys):
    run_dir = train(tiny_config(tmp_path / "run", "train.max_iterations=4"))
    newest = list_checkpoints(run_dir / "checkpoints")[-1]
    shard = next(newest.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:50])
    train(tiny_config(tmp_path / "run", "train.max_iterations=5"))
    out = capsys.readouterr().out
    assert "resumed from iteration 2" in out
    assert read_metrics(run_dir)[-1]["iteration"] == 5


def _worker(rank, world_size, port, output_dir):
    join_as_rank(rank, world_size, port)
    torch.set_num_threads(1)
    config = tiny_config(
        output_dir,
        "train.batch_size_per_gpu=2",
        "train.max_iterations=3",
        "dino.koleo_loss_weight=0",
        "train.centering=sinkhorn_knopp",
        "ibot.mask_stratification=global",
    )
    train(config)
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    """With masks stratified over the global batch and Sinkhorn-Knopp targets, which pool
    all ranks, the losses do not depend on the number of processes. DINOv2's defaults do:
    its masks are stratified per rank, and the iBOT center averages the ranks' means over
    their masked patches (tests/test_ibot_center_ranks.py)."""
    mp.spawn(_worker, args=(2, free_port(), tmp_path / "ws2"), nprocs=2)
    single = train(
        tiny_config(
            tmp_path / "ws1",
            "train.batch_size_per_gpu=4",
            "train.max_iterations=3",
            "dino.koleo_loss_weight=0",
            "train.centering=sinkhorn_knopp",
            "ibot.mask_stratification=global",
        )
    )
    ws2 = read_metrics(tmp_path / "ws2")
    ws1 = read_metrics(single)
    assert len(ws1) == len(ws2) == 3
    for a, b in zip(ws1, ws2, strict=True):
        for key in ("loss_dino_global", "loss_dino_local", "loss_ibot"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), (a["iteration"], key)


@pytest.mark.slow
def test_fsdp_in_one_process_matches_the_unsharded_run(tmp_path):
    """`train.fsdp=true` without torchrun: FSDP2 over a process group of one."""
    plain, sharded = tmp_path / "plain", tmp_path / "sharded"
    for run_dir, fsdp in ((plain, "false"), (sharded, "true")):
        done = run_cli(run_dir, "train.max_iterations=3", f"train.fsdp={fsdp}")
        assert done.returncode == 0, done.stderr
    for a, b in zip(read_metrics(plain), read_metrics(sharded), strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6), a["iteration"]


def test_training_without_local_crops(tmp_path):
    trainer = Trainer(tiny_config(tmp_path / "run", "crops.local_crops_number=0"))
    trainer.run()
    metrics = read_metrics(trainer.run_dir)
    assert all("loss_dino_local" not in m and math.isfinite(m["loss"]) for m in metrics)
    assert metrics[-1]["iteration"] == 12
