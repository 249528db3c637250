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


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """A tiny BERT pool (alpha: 2 classes, beta: 3) with adaptation and labeled data files, one per test module."""
    import hf_tiny

    root = tmp_path_factory.mktemp("bert")
    pre, experts = hf_tiny.make_pool(root, "bert", hf_tiny.LABELS)
    adapt, evals = hf_tiny.write_data(root, hf_tiny.LABELS)
    return {"root": root, "pre": pre, "experts": experts, "adapt": adapt, "eval": evals}
