"""Test setup: the evaluation data folder, a pinned thread count so timings on the 2-core CI box stay stable, and
the longest test first.

The project's modules (generate, eval_gsm_math, remedi_patches, lit_gpt, ...) come from the editable install;
test helper modules (toy_models, eval_fixtures, cli_helpers) and bench/ scripts are on pytest.ini's pythonpath.
"""
import os
from pathlib import Path

import pytest
import torch

from eval_fixtures import tiny_smdm_dir

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("REMEDI_DATA_DIR", REPO.parent / "shared" / "data"))

# `make test` runs two pytest-xdist workers (-n 2): the cores are shared between them
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // WORKERS)))


def pytest_collection_modifyitems(items):
    """The README test (minutes of subprocesses) first, so that a parallel run overlaps it with everything else
    instead of ending on it."""
    items.sort(key=lambda item: item.path.name != "test_readme_commands.py")  # stable: the rest keep their order


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA_DIR.is_dir():
        raise FileNotFoundError(
            f"evaluation data not found at {DATA_DIR}; set REMEDI_DATA_DIR to the folder holding gsm8k/ and math500/"
        )
    return DATA_DIR


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, data_dir) -> Path:
    """A tiny SMDM export (2 layers, width 32, 400-piece tokenizer), random UPS head at tiny/ups_head.safetensors."""
    return tiny_smdm_dir(tmp_path_factory.mktemp("tiny_smdm"), data_dir)


@pytest.fixture
def one_thread():
    """One intra-op thread: tiny models on the 2 shared CI cores run faster without thrashing. Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
