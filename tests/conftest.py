import os

import pytest
import torch

os.environ.setdefault("TQDM_DISABLE", "1")
# Tiny models: one thread is much faster than two on a shared, loaded 2-core machine.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
