"""Replay fidelity: the figures tell faithful replay from collapsed replay, the GAN phase stops
on them, and they reach the plugin's state, the evaluator's metrics and a warning."""

from __future__ import annotations

import pytest
import torch
from avalanche.evaluation.metrics import accuracy_metrics
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin
from torch.nn import functional as F

from avalanche_d2l.genifer import ProbeSettings, measure_fidelity
from avalanche_d2l.genifer import monitor as monitor_mod
from avalanche_d2l.genifer.monitor import ReplayMonitor, StopRule
from avalanche_d2l.models.classifiers import small_cnn
from avalanche_d2l.scenarios import tensor_benchmark
from avalanche_d2l.strategies import GeniferConfig, GeniferPlugin
from avalanche_d2l.utils import seed_everything

FAST = ProbeSettings(steps=60, n_per_class=64)


def _digits(classes=(0, 1)):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target)
    keep = torch.isin(y, torch.tensor(classes))
    x, y = x[keep], y[keep]
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    return x[perm], y[perm]


class _Sampler:
    """A stand-in generator: real images of the asked class, or one image for every class."""

    def __init__(self, x, y, collapsed: bool):
        self.x, self.y, self.collapsed = x, y, collapsed

    def __call__(self, labels):
        if self.collapsed:
            return self.x[:1].expand(len(labels), *self.x.shape[1:]).clone()
        out = torch.empty(len(labels), *self.x.shape[1:])
        g = torch.Generator().manual_seed(len(labels))
        for c in labels.unique():
            pool = self.x[self.y == c]
            where = labels == c
            out[where] = pool[torch.randint(len(pool), (int(where.sum()),), generator=g)]
        return out


def _measure(collapsed: bool):
    x, y = _digits()
    train, test = (x[:200], y[:200]), (x[200:], y[200:])
    clf = small_cnn(num_classes=2, in_channels=1, width=8).eval()
    return measure_fidelity(
        sample=_Sampler(*train, collapsed=collapsed),
        classifier=clf,
        features=lambda t: clf.block3(clf.block2(clf.block1(t))),
        real_train=train,
        real_test=test,
        classes=[0, 1],
        replay_classes=[0, 1],
        active=[0, 1],
        settings=FAST,
        rng=torch.Generator().manual_seed(0),
    )


def test_fidelity_tells_faithful_from_collapsed_replay():
    good, bad = _measure(collapsed=False), _measure(collapsed=True)
    assert min(good.probe.values()) >= 0.9  # real images as replay: the probe transfers
    assert min(bad.probe.values()) <= 0.5  # one image for both labels: one class is lost
    assert good.separability < 0.7 < bad.separability  # 0.5 = indistinguishable
    assert min(good.diversity.values()) > 0.5 and max(bad.diversity.values()) < 0.01
    assert min(good.probe_real.values()) >= 0.9  # the probe's ceiling on this data
    d = good.as_dict()
    assert set(d["probe"]) == {"0", "1"} and d["probe_min"] == min(good.probe.values())


@pytest.mark.parametrize(
    "stream, seed, exp",
    [("split_digits_28", 1, 3), ("split_color_digits", 2, 4)],
    ids=["28px", "colour"],
)
def test_probe_trained_on_real_images_clears_the_threshold(stream, seed, exp):
    """The stop's test can be passed: the default probe trained on *real* images (its ceiling)
    scores >= 0.85 on every class, on the monitor's own split and seeds. Control: the earlier
    probe (global average pooling, ``pool=1``) falls below on these experiences (0.00 and 0.43
    on the worst class), so no replay could have passed there."""
    from avalanche_d2l.genifer.fidelity import probe_accuracy
    from avalanche_d2l.scenarios import split_color_digits, split_digits

    if stream == "split_digits_28":
        bench = split_digits(image_size=28, seed=seed)
    else:
        bench = split_color_digits(seed=seed)
    experience = bench.train_stream[exp]
    split_seed, probe_seed = monitor_mod.phase_seeds(seed, exp)
    _, real_train, real_test = monitor_mod.split_holdout(
        experience.dataset, 0.2, torch.Generator().manual_seed(split_seed)
    )
    classes = sorted(int(c) for c in experience.classes_in_this_experience)

    def worst(pool: int) -> float:
        rng = torch.Generator().manual_seed(probe_seed)
        acc = probe_accuracy(*real_train, *real_test, classes, ProbeSettings(pool=pool), rng)
        return min(acc.values())

    assert ProbeSettings().pool == GeniferConfig().gan.probe_pool == 4
    assert worst(4) >= 0.85
    assert worst(1) < 0.85


def test_stop_rule_needs_every_class_to_pass_and_a_plateau(monkeypatch):
    script = iter([{0: 0.9, 1: 0.5}, {0: 0.9, 1: 0.88}, {0: 0.9, 1: 0.885}])
    monkeypatch.setattr(monitor_mod, "probe_accuracy", lambda *a, **k: next(script))
    monkeypatch.setattr(monitor_mod, "replay_pool", lambda *a, **k: (None, None))
    x, y = _digits()
    mon = ReplayMonitor(
        generator=None,
        classifier=None,
        features=None,
        classes=[0, 1],
        replay_classes=[0, 1],
        active=[0, 1],
        real_train=(x, y),
        real_test=(x, y),
        rule=StopRule(threshold=0.85, min_delta=0.01, min_steps=100),
        settings=FAST,
        seed=0,
    )
    assert mon(50) is False and mon.trace == []  # below the floor: not even checked
    assert mon(100) is False  # class 1 below the threshold
    assert mon(150) is False  # every class passes, but the mean still improves
    assert mon(200) is True  # passes and gains less than min_delta: stop
    assert [t["step"] for t in mon.trace] == [100, 150, 200]


def _run(cfg: GeniferConfig):
    x, y = _digits(classes=(0, 1, 2, 3))
    x = F.interpolate(x, size=8)
    n = len(y) * 3 // 4
    bench = tensor_benchmark(x[:n], y[:n], x[n:], y[n:], n_experiences=2, class_order=[0, 1, 2, 3])
    seed_everything(0)
    model = small_cnn(num_classes=4, in_channels=1, width=8)
    plugin = GeniferPlugin(feature_layer="block3", config=cfg)
    evaluator = EvaluationPlugin(accuracy_metrics(stream=True), loggers=[])
    strategy = Naive(
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-3),
        train_mb_size=32,
        train_epochs=2,
        evaluator=evaluator,
        plugins=[plugin],
    )
    strategy.train(bench.train_stream[0])
    return plugin, evaluator


CHEAP = GeniferConfig(
    generator={"output_range": (0.0, 1.0)},
    gan={
        "steps_first": 40,
        "min_steps": 20,
        "check_every": 20,
        "probe_steps": 20,
        "batch_size": 16,
    },
    progress=False,
)


def test_unreachable_threshold_runs_to_the_cap_and_warns_naming_classes():
    cfg = CHEAP.merged({"gan": {"threshold": 1.01}})  # no replay can pass
    with pytest.warns(UserWarning, match=r"replay of classes \[0, 1\]"):
        plugin, evaluator = _run(cfg)
    (phase,) = plugin.history
    assert phase["steps"] == phase["max_steps"] == 40
    fid = phase["fidelity"]
    assert fid["below_threshold"] == [0, 1]
    assert [c["step"] for c in fid["checks"]] == [20, 40]  # checked every 20 from the floor
    assert set(fid) >= {"probe", "classifier", "diversity", "separability", "probe_real"}
    # the same figures reach the evaluator (and so its loggers) and the results
    last = evaluator.get_last_metrics()
    assert last["ReplayFidelity/probe_min/Exp000"] == pytest.approx(fid["probe_min"])
    assert last["ReplayFidelity/separability/Exp000"] == pytest.approx(fid["separability"])
    assert "ReplayFidelity/probe/Exp000/Class001" in last
    assert plugin.fidelity_results()[0]["fidelity"]["probe_min"] == fid["probe_min"]


def test_fixed_length_phase_ignores_the_monitor_but_still_measures():
    cfg = CHEAP.merged({"gan": {"stop": "fixed", "steps_first": 30, "threshold": 0}})
    plugin, _ = _run(cfg)
    (phase,) = plugin.history
    assert phase["steps"] == 30 and phase["fidelity"]["checks"] == []
    assert phase["fidelity"]["below_threshold"] == []
