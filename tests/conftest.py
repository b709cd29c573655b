import os
import tempfile

import pytest
import torch

os.environ.setdefault("TQDM_DISABLE", "1")
# Tests never read or fill the user's dreamer cache: they pretrain small stand-ins here.
_CACHE = tempfile.mkdtemp(prefix="avalanche_d2l_test_cache_")
os.environ["AVALANCHE_D2L_CACHE"] = _CACHE
# Tiny models: one thread is much faster than two on a shared, loaded 2-core machine.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
