"""`dinospec sweep --slurm` against the one-node SLURM cluster of tests/cluster/start.sh:
a 2-cell tiny sweep is one job array (train, then k-NN, per task) and a report job that
runs after it and writes the table.

CI starts the cluster, so there a missing cluster fails this test. Elsewhere it is skipped
with the command that starts it.
"""

import csv
import json
import subprocess
import sys

import pytest
import yaml
from test_launch_cluster import (
    REPO,
    Jobs,
    cluster,  # noqa: F401 (the fixture that skips without a cluster)
    rank0_log,
    wait_until_done,
)
from test_sweep import sweep_dict

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


@pytest.fixture
def jobs(cluster):  # noqa: F811
    jobs = Jobs()
    yield jobs
    jobs.cancel_all()


def test_sweep_cells_run_as_one_job_array_then_the_report(jobs, tmp_path):
    spec = sweep_dict(tmp_path, REPO.parent / "shared" / "data" / "imagenette")
    spec["variants"] = {"paper": []}
    spec["seeds"] = [1, 2]
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    command = [sys.executable, "-m", "launch.sweep.cli", str(path), "--slurm", "--timeout", "30"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    out = tmp_path / "sweep"
    submission = json.loads((out / "job.json").read_text())["submissions"][-1]
    cells = submission["cells"]
    jobs.ids.extend([*cells.values(), submission["job_id"]])
    assert list(cells) == ["paper/seed1", "paper/seed2"]
    assert len({job_id.split("_")[0] for job_id in cells.values()}) == 1
    for key, job_id in cells.items():
        state = wait_until_done(job_id)["JobState"]
        assert state == "COMPLETED", rank0_log(out, job_id) + (out / key / "cell.json").read_text()
    assert wait_until_done(submission["job_id"])["JobState"] == "COMPLETED"
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert [r["status"] for r in rows if r["row"] == "seed"] == ["done", "done"]
    assert [r["knn.top1_n"] for r in rows if r["row"] == "mean"] == ["2"]
