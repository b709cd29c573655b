"""The command line's experiment settings: ``--set`` and its short forms checked by the schema,
``--show``, a user's model by ``package.module:callable``, the ``image_folder`` benchmark, and the
optimiser schedule on torch's ``MultiStepLR`` + Avalanche's ``LRSchedulerPlugin``."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from avalanche.training import Naive
from PIL import Image

from avalanche_d2l.cli import main
from avalanche_d2l.experiments import OptimSchedule, OptimSpec, apply_overrides
from avalanche_d2l.experiments.builders import build_model
from avalanche_d2l.models import small_cnn
from avalanche_d2l.scenarios import image_folder, tensor_benchmark

torch.set_num_threads(1)


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


# ---- --set and its short forms ----------------------------------------------------------------


def test_set_values_are_checked_by_the_schema(capsys):
    rc, _, err = _cli(capsys, "compare", "--set", "training.optimizer.lr=fast", "--show")
    assert rc == 2
    assert "training.optimizer.lr must be a finite number, got 'fast'" in err
    rc, _, err = _cli(capsys, "compare", "--batch-size", "ten", "--show")
    assert rc == 2 and "training.train_mb_size must be a whole number, got 'ten'" in err


def test_unknown_set_paths_name_the_valid_keys(capsys):
    rc, _, err = _cli(capsys, "compare", "--set", "training.optimizr.lr=0.1", "--show")
    assert rc == 2
    assert "unknown key 'optimizr' in training; valid keys: eval_mb_size, first_experience" in err
    rc, _, err = _cli(capsys, "run", "split_digits", "--set", "strategies.d2l.dreem.steps=5")
    assert rc == 2 and "unknown key 'dreem' in strategies.d2l; valid keys:" in err
    assert "dream" in err
    rc, _, err = _cli(capsys, "compare", "--set", "benchmark.n_exp=2", "--show")
    assert rc == 2 and "valid keys:" in err and "n_experiences" in err
    with pytest.raises(SystemExit):  # not KEY=VALUE: argparse's usage error
        main(["compare", "--set", "training.optimizer.lr"])


def test_shortcuts_and_strategy_settings_reach_the_resolved_experiment(capsys):
    rc, out, err = _cli(
        capsys,
        "compare",
        "--strategies",
        "replay,d2l",
        "--lr",
        "0.05",
        "--batch-size",
        "8",
        "--buffer-size",
        "20",
        "--model",
        "resnet18_cifar",
        "--set",
        "strategies.d2l.dream.steps=5",
        "--set",
        "benchmark.n_experiences=5",
        "--set",
        "seeds=[3]",
        "--show",
    )
    assert rc == 0, err
    shown = json.loads(out)
    assert shown["training"]["optimizer"]["lr"] == 0.05
    assert shown["training"]["train_mb_size"] == 8
    assert shown["mem_sizes"] == [20]
    assert shown["model"]["name"] == "resnet18_cifar"
    assert shown["seeds"] == [3]
    assert list(shown["strategies"]) == ["replay", "d2l"]
    assert shown["strategies"]["d2l"]["dream"]["steps"] == 5


def test_set_on_a_shared_strategy_section_changes_only_that_strategy():
    data = {"strategies": {"d2l": {"dream": {"steps": 3}}, "er_ace_d2l": "d2l"}}
    out = apply_overrides(data, [("strategies.er_ace_d2l.dream.steps", 7)])
    assert out["strategies"]["er_ace_d2l"] == {"dream": {"steps": 7}}
    assert out["strategies"]["d2l"] == {"dream": {"steps": 3}}
    assert data["strategies"]["er_ace_d2l"] == "d2l"  # the input is not changed
    with pytest.raises(ValueError, match="training.optimizer is 'adam', not a section"):
        apply_overrides({"training": {"optimizer": "adam"}}, [("training.optimizer.lr", 1)])


# ---- a user's model ---------------------------------------------------------------------------

MODEL_SOURCE = """
from torch import nn

class MyNet(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.features = nn.Sequential(nn.Flatten(), nn.LazyLinear(8), nn.ReLU())
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(self.features(x))

def broken(num_classes):
    raise RuntimeError("no GPU here")

def not_a_model(num_classes):
    return 42
"""


@pytest.fixture
def user_package(tmp_path, monkeypatch):
    pkg = tmp_path / "userpkg_overrides"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(MODEL_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "userpkg_overrides.nets"
    for name in [m for m in sys.modules if m.startswith("userpkg_overrides")]:
        del sys.modules[name]


def test_user_model_is_called_with_the_number_of_classes(user_package):
    model, layer = build_model(f"{user_package}:MyNet", "features", 7, (3, 8, 8))
    assert type(model).__name__ == "MyNet" and layer == "features"
    assert model(torch.zeros(2, 3, 8, 8)).shape == (2, 7)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("nowhere_pkg.nets:MyNet", "cannot import 'nowhere_pkg.nets'"),
        ("{pkg}:Missing", "has no 'Missing'"),
    ],
)
def test_user_model_that_cannot_be_imported_is_named_before_any_work(
    capsys, user_package, spec, message
):
    rc, _, err = _cli(capsys, "compare", "--model", spec.format(pkg=user_package), "--show")
    assert rc == 2 and message in err and "Traceback" not in err


@pytest.mark.parametrize(
    "spec, message",
    [
        ("{pkg}:broken", "calling it with the number of classes (10) failed (RuntimeError"),
        ("{pkg}:not_a_model", "returned int, not a torch.nn.Module"),
        ("{pkg}", "unknown model"),
    ],
)
def test_user_model_that_cannot_be_called_is_one_sentence(user_package, spec, message):
    with pytest.raises(ValueError) as info:
        build_model(spec.format(pkg=user_package), "features", 10, (1, 16, 16))
    assert message in str(info.value)


# ---- image_folder ------------------------------------------------------------------------------


def _folder(root, classes=("ant", "bee", "cat", "dog", "eel"), n_train=3, n_test=1):
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for c in classes:
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 255, (10, 12, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(d / f"{i}.png")
    return root


def test_image_folder_splits_classes_with_a_seeded_order(tmp_path):
    root = _folder(tmp_path / "pets")
    (root / "train" / ".ipynb_checkpoints").mkdir()  # hidden folders are not classes
    (root / "train" / "ant" / "._0.png").write_bytes(b"")  # nor hidden files
    a = image_folder(root, seed=1)
    orders = [list(e.classes_in_this_experience) for e in a.train_stream]
    assert [len(o) for o in orders] == [3, 2]  # 5 classes, two each: the first takes the rest
    assert sorted(sum(orders, [])) == list(range(5))
    again = image_folder(root, seed=1)
    assert [list(e.classes_in_this_experience) for e in again.train_stream] == orders
    others = {
        tuple(tuple(e.classes_in_this_experience) for e in image_folder(root, seed=s).train_stream)
        for s in range(2, 6)
    }
    assert len(others | {tuple(map(tuple, orders))}) > 1  # the order follows the seed
    five = image_folder(root, n_experiences=5, image_size=16, seed=0)
    assert len(five.train_stream) == 5 and len(five.test_stream[0].dataset) == 1
    assert five.train_stream[0].dataset[0][0].shape == (3, 16, 16)
    with pytest.raises(ValueError, match="n_experiences must be a whole number from 1 to the 5"):
        image_folder(root, n_experiences=6)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda r: __import__("shutil").rmtree(r / "test"), "missing test/ (or val/)"),
        (lambda r: [p.unlink() for p in (r / "train" / "bee").iterdir()], "without image files"),
        (lambda r: (r / "test" / "fox").mkdir(), "class folders that train/ lacks: fox"),
        (lambda r: (r / "train" / "cat" / "9.png").write_bytes(b"oops"), "not readable images"),
    ],
)
def test_image_folder_errors_name_the_problem(tmp_path, damage, message):
    root = _folder(tmp_path / "pets")
    damage(root)
    with pytest.raises((ValueError, FileNotFoundError), match="image_folder") as info:
        image_folder(root)
    assert message in str(info.value)


# ---- the optimiser schedule --------------------------------------------------------------------


class _LrSpy:
    def __init__(self):
        self.seen = []

    def before_training_epoch(self, strategy, **kwargs):
        opt = strategy.optimizer
        k = strategy.experience.current_experience
        self.seen.append((k, type(opt).__name__, opt.param_groups[0]["lr"]))


def test_schedule_gives_the_same_lr_per_epoch_as_the_closed_form():
    """Every epoch's rate equals ``OptimSpec.lr_at`` bit for bit (the rule results were recorded
    with), across an optimiser switch, fresh optimisers, and a milestone at epoch 0."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(60, 1, 8, 8, generator=g), torch.arange(6).repeat(10)
    bench = tensor_benchmark(x, y, x, y, n_experiences=3, seed=0)
    first = OptimSpec(name="sgd", lr=0.1, epochs=4, momentum=0.9, milestones=(0, 2, 3), gamma=0.3)
    later = OptimSpec(name="radam", lr=0.01, epochs=4, milestones=(1, 2, 3), gamma=0.2)
    for fresh in (False, True):
        model = small_cnn(6, 1, width=4)
        spy = _LrSpy()

        strategy = Naive(
            model=model,
            optimizer=first.build(model.parameters()),
            train_mb_size=30,
            device="cpu",
            evaluator=None,
            plugins=[OptimSchedule(first=first, later=later, fresh_each_experience=fresh), spy],
        )
        for exp in bench.train_stream:
            strategy.train(exp)
        expected = [(0, "SGD", first.lr_at(e)) for e in range(4)]
        expected += [(k, "RAdam", later.lr_at(e)) for k in (1, 2) for e in range(4)]
        assert spy.seen == expected  # exact floats, not approx


# ---- Avalanche's own CIFAR-100 split ----------------------------------------------------------


def _split(bench) -> list[tuple[list[int], list[int]]]:
    return [
        (sorted(int(c) for c in e.classes_in_this_experience), sorted(e.dataset.targets))
        for e in bench.train_stream
    ]


def test_split_cifar100_is_the_split_of_avalanches_split_cifar100(cifar_root):
    """Our loader and Avalanche's ``SplitCIFAR100`` give the same experiences, for iCaRL's order
    (Genifer's 50 + 5 x 10) and for a seeded shuffle (10 x 10), on a tiny CIFAR-100 copy."""
    from avalanche.benchmarks.classic import SplitCIFAR100

    from avalanche_d2l.scenarios import icarl_class_order, split_cifar100

    ours = split_cifar100(cifar_root)
    theirs = SplitCIFAR100(
        6,
        first_exp_with_half_classes=True,
        fixed_class_order=icarl_class_order(),
        dataset_root=cifar_root,
    )
    assert _split(ours) == _split(theirs)
    assert list(ours.classes_order) == list(theirs.classes_order) == icarl_class_order()
    ours = split_cifar100(
        cifar_root, n_experiences=10, first_experience_classes=None, class_order=None, seed=3
    )
    theirs = SplitCIFAR100(10, seed=3, dataset_root=cifar_root)
    assert _split(ours) == _split(theirs)
    assert list(ours.classes_order) == list(theirs.classes_order)
