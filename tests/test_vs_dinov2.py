"""The peer benchmark against DINOv2's own training step runs, and its checks pass.

benchmarks/vs_dinov2.py imports the reference (../shared/reference/dinov2) with stand-ins
and stops before timing anything if dinospec's loss terms or gradients differ from
DINOv2's for the same weights and batch. At the tiny size this is a quick end-to-end
equivalence test of the whole training step against the reference code itself. Nothing
is timed here.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
from test_benchmarks import NUMBER, run_benchmark

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def output() -> str:
    return run_benchmark("vs_dinov2.py", "--size", "tiny", "--rounds", "1")


def reported(label: str, text: str) -> float:
    found = re.search(re.escape(label) + r".*max relative difference (\S+) ", text)
    assert found, f"no '{label}' line in:\n{text}"
    return float(found.group(1))


@pytest.mark.slow
def test_losses_gradients_and_update_agree_with_dinov2(output: str) -> None:
    for variant in ("vanilla", "specialized"):
        assert reported(f"{variant} losses", output) <= 1e-5, output
        assert reported(f"{variant} gradients", output) <= 1e-4, output
    for term in ("dino_global", "dino_local", "ibot", "koleo"):
        assert term in output, output
    assert reported("vanilla Trainer.step losses", output) <= 1e-5, output
    assert reported("one whole step", output) <= 5e-4, output
    assert "WARNING" not in output, output


@pytest.mark.slow
def test_table_has_a_row_with_every_ratio(output: str) -> None:
    row = re.search(r"^tiny\s+2x56\+2x28\s+256\s+8\s+(.*)$", output, re.MULTILINE)
    assert row, output
    fields = row.group(1).split()
    assert len(fields) == 11, row.group(0)
    assert all(re.fullmatch(NUMBER, f) and float(f) > 0 for f in fields), row.group(0)
    assert "threads, wall clock," in output, output


def test_live_tensor_bytes_counts_views_once_and_frees() -> None:
    """The CPU peak-memory count: storages from their operator until they are freed."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from vs_dinov2_memory import LiveTensorBytes

    held = torch.zeros(256)
    with LiveTensorBytes([held]) as tracker:
        a = torch.ones(1024)
        b = (a * 2).view(2, 512)
        del a
        c = b.view(1024) + 1
        del b
    assert tracker.peak == held.nbytes + 2 * c.nbytes
    assert tracker.live == held.nbytes + c.nbytes


@pytest.mark.slow
def test_one_pass_student_agrees_with_dinov2() -> None:
    """dinospec's student with its crops in one sequence (model.multi_crop_attention=
    one_pass) against DINOv2's step: the same checks as the per-crop path passes. Timed
    on the CPU clock, so that option runs too."""
    output = run_benchmark(
        *("vs_dinov2.py", "--size", "tiny", "--rounds", "1", "--multi-crop-attention", "one_pass"),
        *("--clock", "cpu", "--threads", "1"),
    )
    assert "dinospec multi-crop=one_pass" in output, output
    assert "1 threads, cpu clock," in output, output
    for variant in ("vanilla", "specialized"):
        assert reported(f"{variant} losses", output) <= 1e-5, output
        assert reported(f"{variant} gradients", output) <= 1e-4, output
    assert reported("one whole step", output) <= 5e-4, output
    assert "WARNING" not in output, output


def test_cpu_clock_is_refused_on_cuda(monkeypatch, capsys) -> None:
    """The process's CPU seconds do not include a GPU's work, so they cannot time it."""
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    from vs_dinov2 import parse_args

    monkeypatch.setattr(sys, "argv", ["vs_dinov2.py", "--device", "cuda", "--clock", "cpu"])
    with pytest.raises(SystemExit) as exited:
        parse_args()
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert "--clock cpu measures host work only: use it with --device cpu" in error, error
