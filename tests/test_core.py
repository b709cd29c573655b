"""The shared plumbing of :mod:`avalanche_d2l.core`: one atomic write, one set-aside, one config
base, one seeder, and a registry that knows no strategy."""

from __future__ import annotations

import ast
import os
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch

from avalanche_d2l.core import (
    ConfigBase,
    WriteFailed,
    atomic_write,
    seed_everything,
    set_aside,
    temporary_name,
)

CORE = Path(__file__).resolve().parents[1] / "avalanche_d2l" / "core"


def test_atomic_write_text_bytes_and_writer(tmp_path):
    target = tmp_path / "sub" / "a.json"
    assert atomic_write(target, "one") == target
    assert target.read_text() == "one"
    atomic_write(target, b"two")
    assert target.read_bytes() == b"two"
    atomic_write(target, lambda tmp: torch.save({"x": torch.ones(2)}, tmp))
    assert torch.equal(torch.load(target, weights_only=True)["x"], torch.ones(2))
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.json"]
    assert str(os.getpid()) in temporary_name(target).name


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "ckpt.pt"
    target.write_text("previous")

    def disk_full(tmp):
        Path(tmp).write_bytes(b"partial")
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    with pytest.raises(WriteFailed, match=r"could not write the cache .*ckpt.pt .*free disk") as e:
        atomic_write(target, disk_full, what="the cache")
    assert "\n" not in str(e.value) and e.value.__cause__ is None
    assert isinstance(e.value, OSError)
    assert target.read_text() == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]


def test_set_aside_files_and_stamped_folders(tmp_path):
    f = tmp_path / "run.json"
    f.write_text("bad")
    assert set_aside(f) == tmp_path / "run.json.corrupt"
    assert not f.exists() and (tmp_path / "run.json.corrupt").read_text() == "bad"
    f.write_text("old settings")
    assert set_aside(f, "stale").name == "run.json.stale"
    folder = tmp_path / "dreamer"
    asides = []
    for _ in range(2):
        folder.mkdir()
        (folder / "w.bin").write_text("x")
        asides.append(set_aside(folder, "broken", stamped=True))
    assert len(set(asides)) == 2 and all(a.name.startswith("dreamer.broken-") for a in asides)
    assert all((a / "w.bin").exists() for a in asides) and not folder.exists()


def test_seed_everything_draws_what_accelerate_set_seed_draws():
    from accelerate.utils import set_seed

    def draws():
        return random.random(), float(np.random.rand()), torch.rand(3).tolist()

    set_seed(7)
    expected = draws()
    seed_everything(7)
    assert draws() == expected
    seed_everything(2**32 + 7)  # per-experience seeds may exceed NumPy's range
    assert draws() != expected


@dataclass
class _Inner(ConfigBase):
    size: int = 2
    progress: bool = True


@dataclass
class _Outer(ConfigBase):
    rate: float = 0.5
    widths: tuple[int, ...] = (1, 2)
    inner: _Inner = field(default_factory=_Inner)
    notes: list[str] = field(default_factory=list)

    not_saved = ("notes",)
    not_fingerprinted = ("inner.progress",)

    def __post_init__(self):
        if isinstance(self.inner, dict):
            self.inner = _Inner.from_dict(self.inner)


def test_config_base_round_trip_unknown_keys_types_and_fingerprint():
    c = _Outer(rate=0.25, widths=(3, 4), inner=_Inner(size=5), notes=["run-time"])
    d = c.to_dict()
    assert d == {"rate": 0.25, "widths": [3, 4], "inner": {"size": 5, "progress": True}}
    back = _Outer.from_dict(d)
    assert back.widths == (3, 4) and back.inner == _Inner(size=5) and back.notes == []
    with pytest.raises(ValueError, match=r"unknown _Outer keys \['rte'\]; valid keys: .*'rate'"):
        _Outer.from_dict({"rte": 1})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['rte'\] in strategies.x; valid"):
        _Outer.from_dict({"rte": 1}, where="strategies.x")
    with pytest.raises(ValueError, match=r"strategies.x.rate must be a finite number"):
        _Outer.from_dict({"rate": "fast"}, where="strategies.x")
    assert _Outer.from_dict({"rate": 1}).rate == 1.0 and isinstance(
        _Outer.from_dict({"rate": 1}).rate, float
    )
    quiet = _Outer(inner=_Inner(progress=False))
    assert quiet.fingerprint() == _Outer().fingerprint()
    assert _Outer(rate=0.1).fingerprint() != _Outer().fingerprint()


def test_core_imports_no_method_and_no_higher_layer():
    """The bottom layer: core imports only itself and the JSON type checks (``fields``)."""
    allowed = ("avalanche_d2l.core", "avalanche_d2l.fields")
    for path in CORE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom):
                package = ["avalanche_d2l", "core"][: max(0, 3 - node.level)] if node.level else []
                names = [".".join([*package, node.module or ""]).strip(".")]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            for name in names:
                if name.startswith("avalanche_d2l"):
                    assert name.startswith(allowed), f"{path.name} imports {name}"


def test_every_strategy_is_registered_by_importing_the_package():
    from avalanche_d2l.registry import strategy_names
    from avalanche_d2l.strategies import baselines

    assert {"naive", "lwf", "bic", "d2l", "genifer"} <= set(strategy_names())
    assert baselines.LwFConfig.from_dict({"alpha": 0.3}).alpha == 0.3
