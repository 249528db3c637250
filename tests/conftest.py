import sys
from pathlib import Path

import pytest
import torch

# Tiny models gain nothing from a second thread, and OpenMP spin-waits make two threads ~3x slower on a shared machine.
torch.set_num_threads(1)

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def toy_problem():
    from toy import build_toy_problem

    return build_toy_problem()
