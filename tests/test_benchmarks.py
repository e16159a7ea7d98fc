"""The benchmark scripts run end to end and print complete tables.

Their figures are measured by hand (BENCHMARKS.md) and often on a lent GPU whose time is
short, so a script broken by a change elsewhere must be found here, on a CPU, with tiny
sizes. Nothing is timed: the tests check that every row and ratio is printed and that the
scripts' own correctness checks (same weights, same outputs) pass. real_probe.py is left
out: its parts (pretraining, segmentation and classification probes) are what
test_quickstart and test_eval_runs run, and one pass costs about 100 s of CamVid
sliding-window evaluation.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import SHARED

REPO = Path(__file__).resolve().parents[1]
NUMBER = r"[0-9]+(?:\.[0-9]+)?"


def run_benchmark(script: str, *args: str) -> str:
    """Stdout of benchmarks/<script> on one CPU thread; fails with its output if it fails."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, str(REPO / "benchmarks" / script), *args]
    done = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env)
    assert done.returncode == 0, (
        f"{script} exited {done.returncode}:\n{done.stdout}{done.stderr[-3000:]}"
    )
    return done.stdout


def ratio_after(label: str, text: str) -> float:
    """The number printed after `label`, which must be a finite positive ratio."""
    found = re.search(re.escape(label) + r"\s*(" + NUMBER + ")", text)
    assert found, f"no '{label}' figure in:\n{text}"
    value = float(found.group(1))
    assert math.isfinite(value) and value > 0, text
    return value


@pytest.mark.slow
def test_train_step_prints_both_variants_with_mfu_and_progress() -> None:
    """Vanilla and specialized, each per crop and in one pass (--multi-crop-attention)."""
    out = run_benchmark(
        "train_step.py",
        *("--models", "s", "--batch", "2", "--global-size", "56", "--local-size", "28"),
        *("--prototypes", "256", "--rounds", "2", "--warmup", "1", "--peak-tflops", "1"),
        *("--profile", "3", "--multi-crop-attention", "per_crop,one_pass"),
    )
    contenders = [f"{v} {m}" for m in ("per_crop", "one_pass") for v in ("vanilla", "specialized")]
    for name in contenders:
        assert f"ViT-S/14 {name}: one step's top 3 operators by self_cpu_time_total" in out
    assert out.count("aten::mm") >= 4, out
    rounds = re.findall(
        r"\[ViT-S/14\] round (\d)/2: vanilla per_crop .* spec/van ("
        + NUMBER
        + "), ("
        + NUMBER
        + "), vanilla one_pass/per_crop: ("
        + NUMBER
        + ")",
        out,
    )
    assert [r[0] for r in rounds] == ["1", "2"], out
    rows = {
        (variant, mode): re.search(rf"ViT-S/14\s+{variant}\s+{mode}\s+(.*)", out)
        for variant in ("vanilla", "specialized")
        for mode in ("per_crop", "one_pass")
    }
    assert all(rows.values()), out
    # median s, img/s, peak GiB (n/a on a CPU), TFLOP/s, MFU against the given 1 TFLOP/s,
    # then spec/van (specialized rows) and /per_crop (one_pass rows).
    for (variant, mode), row in rows.items():
        fields = row.group(1).split()
        median_s, images_per_s, tflops = float(fields[0]), float(fields[1]), float(fields[3])
        assert fields[2] == "n/a", row.group(0)
        assert images_per_s == pytest.approx(2 / median_s, rel=0.01, abs=0.06), row.group(0)
        assert float(fields[4].rstrip("%")) == pytest.approx(100 * tflops, abs=0.15), row.group(0)
        assert tflops > 0, row.group(0)
        expected = 5 + (variant == "specialized") + (mode == "one_pass")
        assert len(fields) == expected, f"{variant} {mode} row: {row.group(0)}"
        assert all(float(f) > 0 for f in fields[5:]), row.group(0)


@pytest.mark.slow
def test_backbone_vs_timm_matches_weights_before_timing() -> None:
    out = run_benchmark(
        "backbone_vs_reference.py", "--batch", "1", "--img-size", "56", "--rounds", "1"
    )
    assert "same weights; largest difference (tokens, relative grads): 0.0e+00" in out, out
    for model in ("ours", "timm"):
        assert re.search(rf"^{model}\s+{NUMBER}", out, re.MULTILINE), out
    ratio_after("ours / timm, median of per-round ratios:", out)


@pytest.mark.slow
def test_specialize_overhead_counts_more_kernels_for_the_specialized_twin() -> None:
    out = run_benchmark(
        "specialize_overhead.py", "--batch", "1", "--img-size", "56", "--rounds", "1"
    )
    kernels = {
        name: int(re.search(rf"^{name}\s+.*\s(\d+)$", out, re.MULTILINE).group(1))
        for name in ("vanilla", "specialized")
    }
    # Separate norms and QKV for the prefix tokens are extra operators on a CPU's eager path.
    assert kernels["specialized"] > kernels["vanilla"] > 0, out
    ratio_after("specialized / vanilla, median of per-round ratios:", out)


@pytest.mark.slow
def test_optimizer_step_times_fused_and_foreach() -> None:
    out = run_benchmark("optimizer_step.py", "--rounds", "1", "--steps", "1")
    for kernel in ("foreach", "fused"):
        assert re.search(rf"^{kernel}\s+{NUMBER}$", out, re.MULTILINE), out
    ratio_after("fused / foreach, median of per-round ratios:", out)


@pytest.mark.slow
def test_data_pipeline_times_ours_reference_and_the_loader() -> None:
    out = run_benchmark(
        "data_pipeline.py",
        *("--data", str(SHARED / "data" / "imagenette"), "--images", "4", "--rounds", "1"),
        *("--workers", "1", "--loader-images", "8", "--batch", "4"),
    )
    median = re.search(rf"^median\s+({NUMBER})\s+({NUMBER})\s+({NUMBER})$", out, re.MULTILINE)
    assert median, out
    ours, reference, ratio = (float(g) for g in median.groups())
    assert ratio == pytest.approx(ours / reference, abs=0.01), median.group(0)
    ratio_after("DataLoader, 1 workers, batch 4:", out)


@pytest.mark.slow
def test_gpu_checks_pass_on_the_same_code_paths_on_a_cpu() -> None:
    """The GPU run's first part: flash attention against math, bf16, compiled, one-pass
    and FSDP2 steps against their references; here on CPU kernels (gloo for FSDP2)."""
    out = run_benchmark("gpu/checks.py", "--device", "cpu")
    rows = re.findall(rf"^(.+?)\s+({NUMBER}e[-+][0-9]+)\s+{NUMBER}e[-+][0-9]+\s+(\S+)", out, re.M)
    names = [name.strip() for name, _, _ in rows]
    expected = ["flash attention", "bf16 step", "compiled step", "one-pass step", "FSDP2 bf16 step"]
    assert names == expected, out
    assert all(result == "ok" for _, _, result in rows), out
    # bf16 moves the numbers, or the check compared a path with itself
    assert all(float(difference) > 0 for _, difference, _ in rows[:2]), out
