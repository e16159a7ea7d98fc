"""Training that starts from existing weights (`train.pretrained_weights`): both backbones
from the file (specialized on load), heads from a dinospec run or warmed up alone with the
backbones frozen, then the backbone's own lr warm-up; bad files stop the run at once."""

import pickle
from dataclasses import replace

import pytest
import torch
from helpers import randomize
from train_helpers import TINY, read_metrics, tiny_config

from dinospec.cli import main
from dinospec.config import ConfigError, SpecializeConfig
from dinospec.models import build_backbone
from dinospec.models.checkpoints import CheckpointError, load_backbone, save_backbone
from dinospec.train.loop import Trainer, schedules_for, train
from dinospec.train.schedules import dinov2_schedules

VANILLA = [
    "model.specialize.norm1_blocks=none",
    "model.specialize.norm2_blocks=none",
    "model.specialize.qkv_blocks=none",
]


def _vanilla_file(tmp_path, **changes):
    """A hub-layout `.pth` of a random vanilla backbone with the tiny config's shapes."""
    model_config = tiny_config(tmp_path / "unused").model
    vanilla = build_backbone(replace(model_config, specialize=SpecializeConfig(), **changes))
    path = tmp_path / "pretrained.pth"
    save_backbone(randomize(vanilla), path)
    return path


def _params(module):
    return {k: v.detach().clone() for k, v in module.named_parameters()}


def _unchanged(module, before):
    return all(torch.equal(p, before[k]) for k, p in module.named_parameters())


def test_warm_up_trains_heads_alone_then_the_backbone_with_its_own_warm_up(tmp_path, capsys):
    path = _vanilla_file(tmp_path)
    overrides = (f"train.pretrained_weights={path}", "optim.backbone_warmup_epochs=1")
    run_dir = tmp_path / "run"
    trainer = Trainer(tiny_config(run_dir, *overrides, "train.max_iterations=4"))
    model = trainer.model
    assert "records no head count, model.num_heads=4 taken from the config" in (
        capsys.readouterr().out
    )
    vanilla = load_backbone(path, num_heads=4).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():  # specialized on load, same function, teacher from the same weights
        assert torch.equal(model.teacher.backbone(x), vanilla(x))
        assert torch.equal(model.student.backbone.eval()(x), vanilla(x))
    model.train()
    backbones = {part: _params(getattr(model, part).backbone) for part in ("student", "teacher")}
    heads = {part: _params(getattr(model, part).dino_head) for part in ("student", "teacher")}
    center = model.dino_loss.center.clone()

    trainer.run()  # the head warm-up: one epoch of 4 iterations
    for part in ("student", "teacher"):
        assert _unchanged(getattr(model, part).backbone, backbones[part]), part
        assert not _unchanged(getattr(model, part).dino_head, heads[part]), part
    assert not torch.equal(model.dino_loss.center, center)
    for param in model.student.backbone.parameters():  # no gradient reached AdamW
        state = trainer.optimizer.state.get(param, {})
        assert all(not v.any() for k, v in state.items() if k.startswith("exp_avg"))

    resumed = Trainer(tiny_config(run_dir, *overrides, "train.max_iterations=7"))
    resumed.run()
    for part in ("student", "teacher"):
        assert not _unchanged(getattr(resumed.model, part).backbone, backbones[part]), part
    metrics = read_metrics(run_dir)
    backbone_lr = [m["backbone_lr"] for m in metrics]
    assert backbone_lr[:5] == [0.0] * 5  # frozen, then the ramp starts at 0
    assert 0 < backbone_lr[5] < backbone_lr[6] < metrics[6]["lr"]
    assert backbone_lr[5] == pytest.approx(metrics[5]["lr"] / 4)
    assert all(m["lr"] > 0 for m in metrics[1:])  # heads follow the usual schedule


def test_backbone_schedule_values():
    s = dinov2_schedules(
        epochs=10, epoch_length=10, warmup_epochs=0, head_warmup_epochs=2,
        backbone_warmup_epochs=4,
    )  # fmt: skip
    assert [s.backbone_frozen(i) for i in (0, 19, 20)] == [True, True, False]
    assert s.backbone_lr(19) == 0.0 and s.backbone_lr(20) == 0.0
    assert s.backbone_lr(30) == pytest.approx(s.lr(30) * 10 / 40)
    assert s.backbone_lr(60) == s.lr(60)
    plain = dinov2_schedules(epochs=10, epoch_length=10)
    assert not plain.backbone_frozen(0)
    assert all(plain.at(i)["backbone_lr"] == plain.lr(i) for i in range(100))


def test_without_pretrained_weights_there_is_no_warm_up(tmp_path):
    config = tiny_config(tmp_path / "run", "optim.head_warmup_epochs=2")
    schedules = schedules_for(config, 4)
    assert not schedules.backbone_frozen(0)
    assert schedules.at(5)["backbone_lr"] == schedules.at(5)["lr"]


def test_a_dinospec_run_gives_backbones_heads_and_centres(tmp_path, capsys):
    """Convert + specialize + continue: a vanilla run's teacher goes into a specialized
    model; its heads and centres come from the checkpoint of the exported iteration, so
    there is no warm-up."""
    first = train(tiny_config(tmp_path / "vanilla", *VANILLA, "train.max_iterations=2"))
    trainer = Trainer(
        tiny_config(
            tmp_path / "spec", f"train.pretrained_weights={first}", "train.max_iterations=1"
        )
    )
    assert f"heads and centres from {first / 'checkpoints' / 'iter_00000002'}" in (
        capsys.readouterr().out
    )
    assert not trainer.schedules.backbone_frozen(0)
    assert trainer.schedules.at(0)["backbone_lr"] == trainer.schedules.at(0)["lr"]
    model = trainer.model
    exported = load_backbone(first / "teacher_backbone.safetensors").state_dict()
    for part in (model.student, model.teacher):
        assert part.backbone.is_specialized
        state = part.backbone.state_dict()
        assert all(torch.equal(state[k], v) for k, v in exported.items())
        assert torch.equal(state["blocks.0.norm1.prefix_weight"], exported["blocks.0.norm1.weight"])

    reference = Trainer(tiny_config(first, *VANILLA, "train.max_iterations=2"))
    reference.resume()
    for part in ("student", "teacher"):
        ours = getattr(model, part).dino_head.state_dict()
        theirs = getattr(reference.model, part).dino_head.state_dict()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), part
    assert torch.equal(model.dino_loss.center, reference.model.dino_loss.center)
    assert torch.count_nonzero(model.dino_loss.center) > 0


def test_heads_of_another_size_in_the_run_are_an_error(tmp_path):
    first = train(tiny_config(tmp_path / "first", "train.max_iterations=2"))
    config = tiny_config(
        tmp_path / "second", f"train.pretrained_weights={first}", "dino.head_n_prototypes=32"
    )
    with pytest.raises(CheckpointError, match=r"heads in .*iter_00000002 do not fit"):
        Trainer(config)


def _fails_before_training(tmp_path, capsys, weights, *expected):
    run_dir = tmp_path / "run"
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    args = [
        str(config),
        *TINY,
        f"train.output_dir={run_dir}",
        f"train.pretrained_weights={weights}",
    ]
    assert main(["train", *args]) == 2
    err = capsys.readouterr().err
    assert f"train.pretrained_weights={weights}" in err
    for text in expected:
        assert text in err
    assert not (run_dir / "metrics.jsonl").exists()


def test_wrong_architecture_fails_before_training(tmp_path, capsys):
    path = _vanilla_file(tmp_path, embed_dim=48, depth=3, num_heads=4)
    _fails_before_training(
        tmp_path, capsys, path, str(path), "model.embed_dim: file 48 vs config 32",
        "model.depth: file 3 vs config 2",
    )  # fmt: skip


def test_truncated_file_fails_before_training(tmp_path, capsys):
    path = _vanilla_file(tmp_path)
    path.write_bytes(path.read_bytes()[:1000])
    _fails_before_training(tmp_path, capsys, path, str(path), "truncated or corrupt")


class _Payload:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_pickle_that_is_not_weights_only_fails_before_training(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"cls_token": _Payload()}, f, protocol=2)
    _fails_before_training(tmp_path, capsys, path, str(path), "refusing to unpickle")
    assert "this must never run" not in capsys.readouterr().out


def test_missing_file_fails_before_training(tmp_path, capsys):
    _fails_before_training(tmp_path, capsys, tmp_path / "nope.pth", "weight file not found")


def test_warm_ups_longer_than_the_run_are_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"optim\.head_warmup_epochs=3"):
        tiny_config(
            tmp_path / "run", f"train.pretrained_weights={tmp_path}", "optim.head_warmup_epochs=3"
        )
