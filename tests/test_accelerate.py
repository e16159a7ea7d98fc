"""Activation checkpointing and torch.compile of the blocks: same numbers, same keys; bf16
steps (autocast, FSDP2 mixed precision) close to fp32."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from helpers import PAPER, randomize, tiny_vit
from train_helpers import first_batch, read_metrics, run_cli, tiny_config

from dinospec.config import ConfigError
from dinospec.distributed import shard_model
from dinospec.train.accelerate import (
    autocast_dtype,
    checkpoint_blocks,
    compile_blocks,
    compile_enabled,
)
from dinospec.train.loop import Trainer, train
from dinospec.train.optim import apply_schedule_values

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def _one_step(tmp_path, *overrides):
    """Loss terms and gradients of one full training step (teacher, losses, backward,
    clipping, AdamW, EMA) after the lr warm-up, with a fixed seed for stochastic depth."""
    trainer = Trainer(tiny_config(tmp_path, *overrides))
    batch = first_batch(trainer)
    values = trainer.schedules.at(6)
    apply_schedule_values(trainer.optimizer, values)
    torch.manual_seed(1)
    result = trainer.step(batch, values)
    grads = {n: p.grad for n, p in trainer.model.student.named_parameters()}
    return result.losses, grads, trainer.model.state_dict()


@pytest.mark.parametrize("drop_path", ["0.1", "0.3"])  # DINOv2's mask and subset schemes
def test_activation_checkpointing_gives_the_same_step(tmp_path, drop_path):
    rate = f"model.drop_path_rate={drop_path}"
    losses, grads, weights = _one_step(tmp_path / "plain", rate)
    losses_ac, grads_ac, weights_ac = _one_step(
        tmp_path / "ac", rate, "train.activation_checkpointing=true"
    )
    # the recomputation runs the same kernels on the same inputs: equal bit for bit
    assert losses_ac == losses
    assert grads_ac.keys() == grads.keys()
    assert all(torch.equal(grads_ac[name], grad) for name, grad in grads.items())
    assert all(torch.equal(weights_ac[name], value) for name, value in weights.items())


def test_wrappers_keep_state_dict_keys(tmp_path):
    plain = Trainer(tiny_config(tmp_path / "plain")).model
    wrapped = Trainer(
        tiny_config(tmp_path / "wrapped", "train.activation_checkpointing=true", "train.compile=on")
    ).model
    assert list(wrapped.state_dict()) == list(plain.state_dict())
    assert [n for n, _ in wrapped.named_parameters()] == [n for n, _ in plain.named_parameters()]
    assert isinstance(wrapped.student.backbone.blocks[0], type(plain.student.backbone.blocks[0]))


def test_checkpointed_run_saves_resumes_and_exports(tmp_path, capsys):
    config = ("train.activation_checkpointing=true", "model.drop_path_rate=0.3")
    train(tiny_config(tmp_path / "run", "train.max_iterations=2", *config))
    run_dir = train(tiny_config(tmp_path / "run", "train.max_iterations=3", *config))
    assert "resumed from iteration 2" in capsys.readouterr().out
    assert (run_dir / "teacher_backbone.safetensors").is_file()
    assert (run_dir / "checkpoints" / "iter_00000003").is_dir()


def test_compile_auto_is_off_on_cpu_and_on_with_cuda():
    assert not compile_enabled("auto", CPU)
    assert compile_enabled("auto", CUDA)
    assert compile_enabled("on", CPU) and not compile_enabled("off", CUDA)
    assert compile_enabled("True", CPU)  # an unquoted YAML `on` arrives as 'True'
    assert autocast_dtype("auto", CPU) is None and autocast_dtype("auto", CUDA) == torch.bfloat16
    assert autocast_dtype("bf16", CPU) == torch.bfloat16 and autocast_dtype("fp32", CUDA) is None


def test_fsdp_on_a_cpu_without_stream_events_is_refused(monkeypatch):
    """torch 2.6's CPU streams lack record_event, which FSDP2 calls in its first forward
    pass; the trainer must say so while sharding instead."""
    monkeypatch.setattr(torch.cpu, "current_stream", lambda *_: object())
    with pytest.raises(RuntimeError, match=r"FSDP2 on a CPU needs torch >= 2\.7"):
        shard_model(tiny_vit(PAPER, depth=1), [], mixed_precision=False)


@pytest.mark.parametrize("key, value", [("compile", "fast"), ("precision", "fp16")])
def test_bad_values_are_config_errors(tmp_path, key, value):
    with pytest.raises(ConfigError, match=rf"command line: train\.{key}='{value}': must be one of"):
        tiny_config(tmp_path, f"train.{key}={value}")


def _multicrop_step(model):
    x = [torch.randn(4, 3, 32, 32), torch.randn(8, 3, 16, 16)]
    masks = [torch.rand(4, 16) > 0.5, None]
    global_out, local_out = model(x, masks=masks, is_training=True)
    (
        global_out["x_norm_patchtokens"].square().mean() + local_out["x_norm_clstoken"].sum()
    ).backward()
    return global_out, local_out


def test_checkpointed_blocks_match_plain_blocks_on_multicrop():
    plain = randomize(tiny_vit(PAPER, depth=2))
    wrapped = randomize(tiny_vit(PAPER, depth=2))
    checkpoint_blocks(wrapped.blocks)
    calls = []
    wrapped.blocks[1].attn.register_forward_hook(lambda *_: calls.append(1))
    torch.manual_seed(3)
    expected = _multicrop_step(plain)
    torch.manual_seed(3)
    got = _multicrop_step(wrapped)
    assert len(calls) == 4  # two crop sizes, each run in the forward and again in backward
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a["x_norm_patchtokens"], b["x_norm_patchtokens"])
    for (name, p), q in zip(wrapped.named_parameters(), plain.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name


@pytest.mark.slow
def test_compiled_blocks_match_eager_on_cpu():
    """Inductor on a CPU (it needs a C compiler; CI has gcc). One crop size keeps the
    compilation to about a minute here; the checkpointing test covers multi-crop calls."""
    eager = randomize(tiny_vit(PAPER, depth=2))
    compiled = randomize(tiny_vit(PAPER, depth=2))
    compile_blocks(compiled.blocks)
    x, masks = torch.randn(4, 3, 32, 32), torch.rand(4, 16) > 0.5
    outputs = []
    for model in (eager, compiled):
        out = model(x, masks=masks, is_training=True)
        (out["x_norm_patchtokens"].square().mean() + out["x_norm_clstoken"].sum()).backward()
        outputs.append(out)
    for key in ("x_norm_clstoken", "x_norm_patchtokens", "x_prenorm"):
        torch.testing.assert_close(outputs[1][key], outputs[0][key], atol=1e-5, rtol=1e-5)
    for (name, p), q in zip(compiled.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", ["false", "true"])
def test_bf16_step_tracks_fp32(tmp_path, fsdp):
    """CUDA's default precision, run on a CPU so that a dtype mismatch in the bf16 paths
    (autocast alone; FSDP2 with bf16 parameters and fp32 reduction, over a group of one)
    shows up here rather than on a GPU. No LayerScale: at 1e-5 the tiny model's [CLS]
    outputs coincide to within bf16 resolution, where KoLeo's log distance to the nearest
    neighbour is ill-conditioned in any precision."""
    spread = "model.init_values=null"
    reference, reference_grads, _ = _one_step(tmp_path / "fp32", spread, "train.precision=fp32")
    try:
        losses, grads, _ = _one_step(
            tmp_path / "bf16", spread, "train.precision=bf16", f"train.fsdp={fsdp}"
        )
        # sharded gradients are gathered over the group, so before it is destroyed
        grads = {n: g.full_tensor() if hasattr(g, "full_tensor") else g for n, g in grads.items()}
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert losses.keys() == reference.keys()
    assert any(float(losses[t]) != float(reference[t]) for t in reference), "bf16 did not run"
    for term, value in reference.items():
        assert float(losses[term]) == pytest.approx(float(value), rel=1e-2), term
    for name, expected in reference_grads.items():
        grad = grads[name]
        assert grad.dtype == torch.float32, name
        cosine = F.cosine_similarity(grad.flatten(), expected.flatten(), dim=0)
        assert cosine > 0.99, (name, float(cosine))


@pytest.mark.slow
def test_compiled_blocks_under_fsdp_match_eager(tmp_path):
    """With more than one GPU the default step shards with FSDP2 and compiles the blocks;
    the two must compose (FSDP's gather hooks around compiled branches) and give the eager
    numbers. Run here over a process group of one, each in its own process; without
    LayerScale, for the reason given in the bf16 test (compiled kernels round differently,
    and KoLeo on near-duplicate features turns that into a 1% loss difference by step 3)."""
    runs = {}
    for mode in ("off", "on"):
        run_dir = tmp_path / mode
        done = run_cli(
            run_dir,
            "train.max_iterations=3",
            "model.init_values=null",
            "train.fsdp=true",
            f"train.compile={mode}",
        )
        assert done.returncode == 0, done.stderr
        runs[mode] = read_metrics(run_dir)
    for eager, compiled in zip(runs["off"], runs["on"], strict=True):
        assert compiled["loss"] == pytest.approx(eager["loss"], rel=1e-5), eager["iteration"]
