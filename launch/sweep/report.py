"""The sweep's table and plot, from whatever cells have a record: `results.md` and
`results.csv` (one row per seed, one per group with the mean and the sample standard
deviation over seeds, ddof=1) and `<metric>.png`, the plotted metric per group with every
seed as a dot. Cells not done are listed with their status and log."""

from __future__ import annotations

import csv
import io
import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launch.sweep.record import DONE, read_record
from launch.sweep.spec import Cell, Sweep

MARKDOWN, CSV = "results.md", "results.csv"


@dataclass(frozen=True)
class Stats:
    mean: float
    std: float  # sample standard deviation (ddof=1); NaN with fewer than two values
    n: int


def stats(values: list[float]) -> Stats:
    """Over the seeds that have a value (NaN, an undefined score, counts as none)."""
    kept = [v for v in values if not math.isnan(v)]
    if not kept:
        return Stats(math.nan, math.nan, 0)
    std = statistics.stdev(kept) if len(kept) > 1 else math.nan
    return Stats(statistics.fmean(kept), std, len(kept))


def _number(value: float) -> str:
    return "–" if math.isnan(value) else f"{value:.4f}"


def _replace(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


class Table:
    """The records of a sweep's cells, grouped by label (variant, grid point, init)."""

    def __init__(self, sweep: Sweep) -> None:
        self.sweep = sweep
        self.columns = sweep.columns()
        self.cells = [(cell, read_record(cell)) for cell in sweep.cells()]
        self.labels = list(dict.fromkeys(cell.label for cell, _ in self.cells))

    def value(self, record: dict[str, Any] | None, column: str) -> float:
        found = (record or {}).get("metrics", {}).get(column)
        return math.nan if found is None else float(found)

    def group(self, label: str) -> list[tuple[Cell, dict[str, Any] | None]]:
        return [(cell, record) for cell, record in self.cells if cell.label == label]

    def group_stats(self, label: str, column: str) -> Stats:
        return stats([self.value(record, column) for _, record in self.group(label)])

    def not_done(self) -> list[tuple[Cell, dict[str, Any] | None]]:
        return [(c, r) for c, r in self.cells if (r or {}).get("status") != DONE]


def _describe(cell: Cell) -> list[str]:
    return [cell.variant, " ".join(cell.point), "init" if cell.random_init else "trained"]


def markdown(table: Table) -> str:
    sweep = table.sweep
    done = len(table.cells) - len(table.not_done())
    lines = [
        f"# Sweep `{sweep.name}`",
        "",
        f"{done} of {len(table.cells)} cells done. Training config `{sweep.train_config}`"
        f"{', overrides ' + ' '.join(sweep.overrides) if sweep.overrides else ''}.",
        "",
        "## Mean ± sample standard deviation (ddof=1) over seeds",
        "",
        "n: seeds with a value; – where there is none (or, for the deviation, only one).",
        "",
        "| variant | grid | weights | " + " | ".join(table.columns) + " |",
        "|" + " --- |" * (3 + len(table.columns)),
    ]
    for label in table.labels:
        cell = table.group(label)[0][0]
        cells = []
        for column in table.columns:
            s = table.group_stats(label, column)
            cells.append(f"{_number(s.mean)} ± {_number(s.std)} (n={s.n})")
        lines.append("| " + " | ".join(_describe(cell) + cells) + " |")
    lines += [
        "",
        "## Per seed",
        "",
        "| variant | grid | weights | seed | status | " + " | ".join(table.columns) + " |",
        "|" + " --- |" * (5 + len(table.columns)),
    ]
    for cell, record in table.cells:
        status = (record or {}).get("status", "not started")
        values = [_number(table.value(record, column)) for column in table.columns]
        lines.append("| " + " | ".join([*_describe(cell), str(cell.seed), status, *values]) + " |")
    missing = table.not_done()
    if missing:
        lines += ["", "## Cells not done", ""]
        for cell, record in missing:
            record = record or {}
            error = f": {record['error']}" if record.get("error") else ""
            log = record.get("log") or (str(cell.log) if cell.log.is_file() else "none yet")
            lines.append(
                f"- `{cell.key}` {record.get('status', 'not started')}{error} (log: {log})"
            )
    return "\n".join(lines) + "\n"


def csv_text(table: Table) -> str:
    """Per-seed rows (`row` = seed) and per-group rows (`row` = mean, with `_std` and
    `_n` columns) in one rectangular table."""
    out = io.StringIO()
    writer = csv.writer(out)
    metric_headers = [f"{c}{suffix}" for c in table.columns for suffix in ("", "_std", "_n")]
    writer.writerow(["row", "variant", "grid", "weights", "seed", "status", *metric_headers])
    for cell, record in table.cells:
        values = []
        for column in table.columns:
            value = table.value(record, column)
            values += ["" if math.isnan(value) else value, "", 0 if math.isnan(value) else 1]
        status = (record or {}).get("status", "not started")
        writer.writerow(["seed", *_describe(cell), cell.seed, status, *values])
    for label in table.labels:
        cell = table.group(label)[0][0]
        values = []
        for column in table.columns:
            s = table.group_stats(label, column)
            values += ["" if math.isnan(v) else v for v in (s.mean, s.std)] + [s.n]
        writer.writerow(["mean", *_describe(cell), "", "", *values])
    return out.getvalue()


def _spread(n: int) -> list[float]:
    """x offsets of n dots, side by side within a group's slot."""
    if n < 2:
        return [0.0] * n
    return [0.3 * (i / (n - 1) - 0.5) for i in range(n)]


def plot(table: Table, column: str, path: Path) -> None:
    """Each group on its own x position: seeds as dots, the mean with a sample-std bar;
    random-init groups in grey beside their trained group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(max(4.0, 1.1 * len(table.labels) + 1.5), 4.0))
    for x, label in enumerate(table.labels):
        group = table.group(label)
        colour = "0.55" if group[0][0].random_init else "tab:blue"
        values = [table.value(record, column) for _, record in group]
        values = [v for v in values if not math.isnan(v)]
        offsets = _spread(len(values))
        axes.scatter([x + o for o in offsets], values, s=18, color=colour, alpha=0.7, zorder=3)
        s = stats(values)
        if s.n:
            error = 0.0 if math.isnan(s.std) else s.std
            axes.errorbar(x, s.mean, yerr=error, fmt="_", markersize=18, capsize=6,
                          color="black", zorder=4)  # fmt: skip
    axes.set_xticks(range(len(table.labels)), table.labels, rotation=30, ha="right")
    axes.set_ylabel(column)
    axes.set_title(f"{table.sweep.name}: dots are seeds, bars mean ± sample std", fontsize=9)
    axes.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_report(sweep: Sweep) -> list[Path]:
    """Write the table (Markdown, CSV) and the plot into the sweep directory."""
    table = Table(sweep)
    sweep.output_dir.mkdir(parents=True, exist_ok=True)
    paths = [sweep.output_dir / MARKDOWN, sweep.output_dir / CSV]
    _replace(paths[0], markdown(table))
    _replace(paths[1], csv_text(table))
    figure = sweep.output_dir / f"{sweep.plot}.png"
    tmp = figure.with_name(f".{os.getpid()}.{figure.name}")
    plot(table, sweep.plot, tmp)
    os.replace(tmp, figure)
    return [*paths, figure]
