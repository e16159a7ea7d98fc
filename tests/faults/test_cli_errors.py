"""A bad weight file given to `dinospec analyze` or `dinospec pca` is a one-line error
naming the file (status 2), not a traceback."""

from __future__ import annotations

import pytest

from dinospec.cli import main


@pytest.mark.parametrize("command", ["analyze", "pca"])
def test_a_corrupt_checkpoint_is_a_clean_error(tmp_path, capsys, command):
    weights = tmp_path / "teacher.pth"
    weights.write_bytes(b"PK\x03\x04 not a zip archive")
    assert main([command, str(weights), "--images", "synthetic"]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("dinospec: checkpoint error: ") and str(weights) in line
