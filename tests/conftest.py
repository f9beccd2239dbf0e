import os
import sys
from pathlib import Path

import pytest
import torch

# test-only helpers (ldm writers, fixtures) live beside the tests
sys.path.insert(0, str(Path(__file__).resolve().parent))
# two cores: keep torch from oversubscribing them in the test process
# (OMP_NUM_THREADS, when set, wins: several test runs sharing the cores are far faster at 1 thread each)
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or min(2, os.cpu_count() or 1)))

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not present (the real sample clips live beside the repository)")
    return SHARED_DATA
