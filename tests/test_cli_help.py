"""A CLI that explains itself: `dinospec config show`, `dinospec train --help`, the
launchers' --help, `launch.submit --dry-run`, and clean errors with no tracebacks and no
warnings that tell the user nothing."""

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from train_helpers import run_cli, tiny_config

from dinospec.cli import main as dinospec_main
from dinospec.config import Config
from dinospec.config.docs import KEY_DOCS, SECTION_DOCS
from dinospec.config.show import flat_config
from dinospec.train.loop import train
from launch.local import main as local_main
from launch.submit import main as submit_main

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = str(REPO / "configs" / "quickstart.yaml")


def test_every_key_and_section_of_the_schema_has_one_line_of_documentation():
    keys = set(flat_config(Config()))
    assert keys - KEY_DOCS.keys() == set(), "document these keys in dinospec/config/docs.py"
    assert KEY_DOCS.keys() - keys == set(), "docs of keys the schema no longer has"
    assert {key.split(".")[0] for key in keys} == SECTION_DOCS.keys()
    assert all(doc and "\n" not in doc for doc in KEY_DOCS.values())


def test_config_show_prints_every_key_with_value_doc_default_and_source(capsys):
    assert dinospec_main(["config", "show", QUICKSTART, "train.seed=3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    shown = [line for line in lines if " = " in line]
    assert len(shown) == len(KEY_DOCS)
    assert "# evaluation: " + SECTION_DOCS["evaluation"] in lines
    assert f"train.seed = 3  # {KEY_DOCS['train.seed']} [default 0, set by command line]" in lines
    assert (
        f"model.depth = 4  # {KEY_DOCS['model.depth']} [default 12, set by {QUICKSTART}]" in lines
    )
    assert f"train.keep_last = 3  # {KEY_DOCS['train.keep_last']}" in lines  # the default


def test_config_show_reports_a_bad_key_like_training_does(capsys):
    assert dinospec_main(["config", "show", QUICKSTART, "evaluation.k=0"]) == 2
    err = capsys.readouterr().err
    assert "command line: evaluation.k=0: must be in [1, inf)" in err


def test_train_help_lists_the_sections_and_points_to_config_show(capsys):
    with pytest.raises(SystemExit) as exit_:
        dinospec_main(["train", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "dinospec config show CONFIG" in out
    for section, doc in SECTION_DOCS.items():
        assert f"  {section:<12}{doc}" in out


@pytest.mark.parametrize(
    ("module", "options"),
    [("launch.submit", ("--dry-run", "--nodes", "--partition")), ("launch.local", ("--nproc",))],
)
def test_each_launcher_lists_its_options(module, options):
    for args in (["--help"], ["train", "--help"]):
        done = subprocess.run(
            [sys.executable, "-m", module, *args], capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stderr
        assert all(option in done.stdout for option in ("--output-dir", *options)), done.stdout


def test_dry_run_prints_the_submission_and_submits_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)  # no sbatch on this machine
    run_dir = tmp_path / "run"
    argv = ["train", QUICKSTART, f"train.output_dir={run_dir}", "--nodes", "2"]
    argv += ["--gpus-per-node", "4", "--partition", "gpu", "--timeout", "90", "--dry-run"]
    assert submit_main(argv) == 0
    out = capsys.readouterr().out
    assert f"run dir:    {run_dir} (new run)" in out
    assert "processes:  2 node(s) x 4 task(s) = 8; 4 GPU(s) per node" in out
    for line in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--partition=gpu"):
        assert f"#SBATCH {line}\n" in out
    assert "#SBATCH --time=90\n" in out and "#SBATCH --signal=USR2@120\n" in out
    assert "-m submitit.core._submit" in out and "--kill-on-bad-exit=1" in out
    assert f"submit it:  python -m launch.submit train {QUICKSTART}" in out
    assert "--dry-run" not in out.split("submit it:")[1].splitlines()[0]
    assert not run_dir.exists()


def test_dry_run_of_a_sweep_lists_its_points(tmp_path, capsys):
    argv = ["train", QUICKSTART, f"train.output_dir={tmp_path}", "--sweep", "train.seed=0,1"]
    assert submit_main([*argv, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"train.seed=1 -> {tmp_path / 'train.seed-1'}" in out
    assert not list(tmp_path.iterdir())


def test_a_run_directory_that_cannot_be_made_is_a_message_not_a_traceback(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    done = run_cli(tmp_path / "cli", f"train.output_dir={blocker / 'run'}")
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert f"dinospec: error: Not a directory: {blocker}" in done.stderr
    assert local_main(["train", QUICKSTART, f"train.output_dir={blocker / 'run'}"]) == 2
    assert "Traceback" not in capsys.readouterr().err


def test_checkpoints_raise_no_warning_but_the_filter_stays_local(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(tiny_config(tmp_path / "run", "train.max_iterations=2"))
        assert not [w for w in caught if "torch.distributed is disabled" in str(w.message)]
        warnings.warn("torch.distributed is disabled (raised by the test)", UserWarning, 1)
    assert any("raised by the test" in str(w.message) for w in caught)
