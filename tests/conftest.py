import atexit
import hashlib
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.datasets import CIFAR100

os.environ.setdefault("TQDM_DISABLE", "1")
# Tests never read or fill the user's dreamer cache: they pretrain small stand-ins here.
_CACHE = tempfile.mkdtemp(prefix="avalanche_d2l_test_cache_")
os.environ["AVALANCHE_D2L_CACHE"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)  # one per test process
# Tiny models: one thread is much faster than two on a shared, loaded 2-core machine.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


# ---- a tiny CIFAR-100 copy (torchvision's pickle format, 100 classes x 1 image per split) ----


def write_cifar100(root: Path, n_classes: int = 100) -> dict[str, str]:
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    labels = list(range(n_classes))
    data = np.stack([np.full(3072, 2 * c, dtype=np.uint8) for c in labels])  # value encodes class
    for name in ("train", "test"):
        with open(folder / name, "wb") as f:
            pickle.dump({"data": data, "fine_labels": labels, "coarse_labels": [0] * n_classes}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"class_{c}" for c in labels]}, f)
    return {
        n: hashlib.md5((folder / n).read_bytes()).hexdigest() for n in ("train", "test", "meta")
    }


@pytest.fixture
def cifar_root(tmp_path, monkeypatch):
    """A tiny CIFAR-100 copy; torchvision's MD5 table is pointed at it for the test."""
    md5 = write_cifar100(tmp_path)
    monkeypatch.setattr(CIFAR100, "train_list", [["train", md5["train"]]])
    monkeypatch.setattr(CIFAR100, "test_list", [["test", md5["test"]]])
    monkeypatch.setattr(CIFAR100, "meta", {**CIFAR100.meta, "md5": md5["meta"]})
    return tmp_path
