"""Fault tests import the shared helpers of tests/ (train_helpers, helpers) by name, as the
tests one level up do."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
