import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def toy_problem():
    from toy import build_toy_problem

    return build_toy_problem()
