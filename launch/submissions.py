"""What the launchers record in a run directory: the resolved config and `job.json` (every
submission with its job id), and whether a new submission starts or resumes the run. The
file names come from dinospec.run.layout.RunDir."""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from dinospec.run.layout import RunDir


def read_job_file(output_dir: Path) -> dict[str, Any]:
    """The submissions recorded so far (an empty record for a new directory)."""
    path = RunDir(output_dir).jobs
    if not path.is_file():
        return {"job_type": None, "job_ids": [], "submissions": []}
    return json.loads(path.read_text())


def record_submission(output_dir: Path, job_type: str, submission: dict[str, Any]) -> Path:
    """Append one submission to `job.json`, written under a temporary name and renamed so
    that an interrupted write never leaves a truncated record."""
    record = read_job_file(output_dir)
    record["job_type"] = job_type
    entry = {"submitted_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    record["submissions"].append({**entry, **submission})
    if submission.get("job_id") is not None:
        record["job_ids"].append(str(submission["job_id"]))
    path = RunDir(output_dir).jobs
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def resume_message(output_dir: Path, progress: str | None) -> str:
    """What a submission into `output_dir` will do, in words, for the console."""
    if progress is not None:
        return f"resuming the run in {output_dir} from {progress}"
    if RunDir(output_dir).jobs.is_file():
        return f"re-submitting into {output_dir}: no checkpoint yet, the run starts at iteration 0"
    return f"starting a new run in {output_dir}"


def write_config(output_dir: Path, text: str) -> Path:
    output_dir.mkdir(parents=True, exist_ok=True)
    path = RunDir(output_dir).config
    path.write_text(text)
    return path
