"""Test setup: make the repo root (generate.py, remedi_patches) and SMDM/ (lit_gpt) importable
without an install, and pin the thread count so timings on the 2-core CI box stay stable."""
import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
for p in (REPO, REPO / "SMDM"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

DATA_DIR = Path(os.environ.get("REMEDI_DATA_DIR", REPO.parent / "shared" / "data"))

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA_DIR.is_dir():
        raise FileNotFoundError(
            f"evaluation data not found at {DATA_DIR}; set REMEDI_DATA_DIR to the folder holding gsm8k/ and math500/"
        )
    return DATA_DIR
