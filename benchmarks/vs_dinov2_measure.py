"""Measuring one row of vs_dinov2.py: step times, peak memory and the operator profile.

Kept apart from the contenders so that how a step is timed (which clock, the rotating
order, the CUDA synchronization) and how its memory is counted can be read in one place.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from vs_dinov2_contenders import CONTENDERS, Contender, Run, Setting
from vs_dinov2_memory import LiveTensorBytes, storage_bytes

# Wall time counts the waits for a core that neighbours on a shared machine cause; the
# process's CPU time does not (with one thread it is the time of the thread doing the work).
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


@dataclass
class Row:
    """One table row: a configuration at one batch size and local-crop count."""

    config: str
    setting: Setting
    batch: int
    times: dict[str, list[float]] = field(default_factory=dict)
    peaks: dict[str, int] = field(default_factory=dict)


def step_seconds(contender: Contender, device: torch.device, clock: Callable[[], float]) -> float:
    """Seconds of one step on `clock`, waiting for a CUDA device to finish it."""
    start = clock()
    contender.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return clock() - start


def peak_bytes(contender: Contender, others: list[Contender], device: torch.device) -> int:
    """Peak memory of one step (see vs_dinov2.py's docstring for what it counts)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        contender.step()
        torch.cuda.synchronize(device)
        held_by_others = storage_bytes(t for o in others for t in o.held())
        return torch.cuda.max_memory_allocated(device) - held_by_others
    with LiveTensorBytes(contender.held()) as tracker:
        contender.step()
    return tracker.peak


def measure_row(
    run: Run, row: Row, dtype: str, rounds: int, warmup: int, clock: Callable[[], float]
) -> dict[str, Contender]:
    """Warm-up steps, then `rounds` rounds of one step per contender, the order rotating,
    then each contender's peak memory in one more step. Returns the contenders, which may
    still be profiled."""
    contenders = run.build_all(dtype)
    names = list(contenders)
    for name in names:
        for _ in range(warmup):
            contenders[name].step()
    row.times = {name: [] for name in names}
    for i in range(rounds):
        order = names[i % len(names) :] + names[: i % len(names)]
        for name in order:
            row.times[name].append(step_seconds(contenders[name], run.device, clock))
        times = ", ".join(f"{n} {row.times[n][-1]:.3f} s" for n in names)
        print(f"[{row.config} batch {row.batch}] round {i + 1}/{rounds}: {times}", flush=True)
    for name, contender in contenders.items():
        others = [c for n, c in contenders.items() if n != name]
        row.peaks[name] = peak_bytes(contender, others, run.device)
    return contenders


def operator_times(contender: Contender, device: torch.device) -> dict[str, tuple[float, int]]:
    """Self time (ms) and calls of each operator in one step."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        contender.step()
    clock = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return {e.key: (getattr(e, clock) / 1000, e.count) for e in profiler.key_averages()}


def print_profile(contenders: dict[str, Contender], device: torch.device, rows: int) -> None:
    """Each contender's top operators by self time, then the operators whose time differs
    most between each dinospec variant and the reference."""
    profiles = {name: operator_times(c, device) for name, c in contenders.items()}
    for name, ops in profiles.items():
        total = sum(ms for ms, _ in ops.values())
        print(f"{name}: top {rows} operators by self time (one step, {total:.0f} ms in all)")
        for op, (ms, calls) in sorted(ops.items(), key=lambda kv: -kv[1][0])[:rows]:
            print(f"  {op:<48}{ms:>10.1f} ms{calls:>8} calls")
    reference = profiles["reference"]
    for name in CONTENDERS[1:]:
        ops = profiles[name]
        keys = reference.keys() | ops.keys()

        def diff(op: str, ops: dict = ops) -> float:
            return ops.get(op, (0.0, 0))[0] - reference.get(op, (0.0, 0))[0]

        print(f"{name} - reference: the {rows} operators whose self time differs most")
        print(f"  {'operator':<48}{'reference ms':>14}{name + ' ms':>16}{'diff ms':>10}")
        for op in sorted(keys, key=lambda k: -abs(diff(k)))[:rows]:
            theirs, ours = reference.get(op, (0.0, 0)), ops.get(op, (0.0, 0))
            print(
                f"  {op:<48}{theirs[0]:>9.1f} ({theirs[1]:>3}){ours[0]:>11.1f} ({ours[1]:>3})"
                f"{diff(op):>10.1f}"
            )
