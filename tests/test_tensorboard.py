"""TensorBoard and console output of a run: the event file's scalars and PCA picture, the
silence without tensorboard, the progress bar on a terminal, plain lines elsewhere, and
the closing summary."""

import io
import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from train_helpers import read_metrics, tiny_config

from dinospec.train.loop import train
from dinospec.train.progress import ProgressDisplay, schedule_line
from dinospec.train.tensorboard import scalar_tag

EVAL = [
    "evaluation.dataset=synthetic",
    "evaluation.image_size=32",
    "evaluation.train_per_class=4",
    "evaluation.val_per_class=2",
    "evaluation.k=4",
    "evaluation.num_workers=0",
    "evaluation.pca_images=3",
]


def test_scalars_are_grouped_by_what_they_are():
    assert scalar_tag("loss") == "loss/total"
    assert scalar_tag("loss_ibot") == "loss/ibot"
    assert scalar_tag("teacher_temp") == "schedule/teacher_temp"
    assert scalar_tag("teacher_entropy") == "monitor/teacher_entropy"
    assert scalar_tag("peak_memory_mb") == "speed/peak_memory_mb"
    assert scalar_tag("eval_knn_top1") == "eval/knn_top1"
    assert scalar_tag("iteration") is None and scalar_tag("phase_offset") is None


def test_a_run_writes_its_metrics_and_pca_picture_to_tensorboard(tmp_path, capsys):
    run_dir = train(tiny_config(tmp_path / "run", "train.max_iterations=2", *EVAL))
    events = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()
    for tag in (
        "loss/total",
        "loss/ibot",
        "schedule/lr",
        "schedule/wd",
        "schedule/momentum",
        "schedule/teacher_temp",
        "monitor/teacher_entropy",
        "speed/images_per_s",
        "speed/peak_memory_mb",
        "eval/knn_top1",
        "eval/time_s",
    ):
        assert tag in tags["scalars"], tag
    records = read_metrics(run_dir)
    losses = [(e.step, e.value) for e in events.Scalars("loss/total")]
    assert losses == [
        (r["iteration"], pytest.approx(r["loss"], rel=1e-6)) for r in records if "loss" in r
    ]
    knn = [(e.step, e.value) for e in events.Scalars("eval/knn_top1")]
    expected = [(r["iteration"], r["eval_knn_top1"]) for r in records if "eval_knn_top1" in r]
    assert [s for s, _ in knn] == [s for s, _ in expected] == [0, 2]
    pictures = events.Images("eval/pca_patch_features")
    assert [p.step for p in pictures] == [0, 2]
    # three 32 px images above their PCA maps
    assert (pictures[0].width, pictures[0].height) == (3 * 32, 2 * 32)
    assert f"tensorboard --logdir {run_dir / 'tensorboard'}" in capsys.readouterr().out


def test_without_tensorboard_a_run_writes_none_and_says_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    run_dir = train(tiny_config(tmp_path / "run", "train.max_iterations=1"))
    out = capsys.readouterr()
    assert not (run_dir / "tensorboard").exists()
    assert "tensorboard --logdir" not in out.out + out.err  # the summary names no board
    assert (run_dir / "metrics.jsonl").is_file()


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_terminal_gets_a_bar_with_rate_and_eta_and_a_log_gets_lines():
    terminal = Terminal()
    display = ProgressDisplay(start=2, stop=10, enabled=True, stream=terminal)
    for _ in range(3):
        display.advance(1.5)
    display.write("it 5/10 loss 1.5")
    display.close()
    shown = terminal.getvalue()
    assert "5/10" in shown and "it/s" in shown and "<" in shown  # tqdm's elapsed<remaining
    assert "loss=1.5000" in shown and "it 5/10 loss 1.5\n" in shown
    log = io.StringIO()
    display = ProgressDisplay(start=2, stop=10, enabled=True, stream=log)
    display.advance(1.5)
    display.write("it 3/10 loss 1.5")
    display.close()
    assert log.getvalue() == "it 3/10 loss 1.5\n"
    quiet = io.StringIO()
    other_rank = ProgressDisplay(start=0, stop=10, enabled=False, stream=quiet)
    other_rank.write("x")
    other_rank.advance(1.0)
    assert quiet.getvalue() == ""


def test_a_run_stopped_before_its_schedule_ends_says_so_and_sums_up(tmp_path, capsys):
    assert "stopping" not in schedule_line(0, 12, 12, tmp_path)
    run_dir = train(tiny_config(tmp_path / "run", "train.max_iterations=4"))
    out = capsys.readouterr().out
    assert "stopping at 4 of 12 (train.max_iterations); schedules follow 12" in out
    summary = out[out.index("done: iterations 0..4") :]
    last = read_metrics(run_dir)[-1]
    assert f"final losses: loss={last['loss']:.4f}" in summary
    assert f"checkpoint:   {run_dir / 'checkpoints' / 'iter_00000004'}" in summary
    assert str(run_dir / "teacher_backbone.safetensors") in summary
    assert f"metrics:      {run_dir / 'metrics.jsonl'}" in summary
