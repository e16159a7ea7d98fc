"""Shared fixtures.

MKL picks its GEMM kernel by the number of rows, so by default the same row can round
differently when it is multiplied alone or among many. Function-preserving conversion is
checked bit for bit, which needs row-independent results: MKL's strict conditional
numerical reproducibility mode gives them for matrices of four rows or more (smaller ones
take another kernel, so bit-exact tests use batches of at least four). It must be set
before torch loads MKL.
"""

import os

os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    path = SHARED / "golden"
    if not path.is_dir():
        pytest.fail(f"reference tensors not found at {path}: ../shared must sit beside the repo")
    return path


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
