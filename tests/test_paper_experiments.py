"""benchmarks/run_config.py: experiment files parse, clear errors, tiny end-to-end runs on CPU.

The end-to-end runs use copies of the real files with tiny sizes, a 6-class image-folder dataset
of 16 px PNGs in the Mini-ImageNet layout, a narrow CIFAR-stem ResNet-18 and a tiny random dreamer
saved with ``Dreamer.save_pretrained`` and passed as ``--dreamer``.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from avalanche.training import Naive
from PIL import Image
from tiny_models import tiny_pixel_dreamer

from avalanche_d2l.models.classifiers import ResNetCifar, small_cnn
from avalanche_d2l.scenarios import tensor_benchmark

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "benchmarks" / "configs"
_spec = importlib.util.spec_from_file_location("run_config", ROOT / "benchmarks" / "run_config.py")
rc = importlib.util.module_from_spec(_spec)
sys.modules["run_config"] = rc  # dataclasses and pickling look the module up by name
_spec.loader.exec_module(rc)

N_CLASSES = 6


def _real(name: str) -> dict:
    return json.loads((CONFIGS / name).read_text())


def _write(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """Mini-ImageNet layout: train/<wnid>/*.png and test/<wnid>/*.png, 6 classes, 16 px."""
    root = tmp_path_factory.mktemp("mini")
    rng = np.random.default_rng(0)
    for c in range(N_CLASSES):
        colour = rng.integers(0, 256, 3)
        for split, n in (("train", 6), ("test", 3)):
            folder = root / split / f"n0000000{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                noise = rng.integers(-40, 40, (16, 16, 3))
                img = np.clip(colour + noise, 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def dreamer_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("dreamer") / "tiny"
    tiny_pixel_dreamer().save_pretrained(path)
    return path


def _tiny_d2l(tmp_path: Path, n_experiences: int = 3) -> Path:
    data = copy.deepcopy(_real("d2l_mini_imagenet.json"))
    data["benchmark"].update(n_classes=N_CLASSES, n_experiences=n_experiences, image_size=16)
    data["model"]["width"] = 8
    data["dreamer_overrides"].update(
        num_inference_steps=2,
        backprop_steps=1,
        gradient_checkpointing=False,
        mixed_precision="no",
        output_size=16,
    )
    data["training"].update(epochs=1, train_mb_size=8, eval_mb_size=32)
    data["mem_sizes"] = [6]
    data["baselines"] = ["er"]
    data["seeds"] = [0]
    data["dream"].update(
        max_dream_classes=2,
        steps=1,
        batch_per_class=2,
        samples_per_class=4,
        generate_inference_steps=None,
        generate_batch_size=8,
        progress=False,
    )
    return _write(tmp_path / "d2l_tiny.json", data)


def _tiny_genifer(tmp_path: Path) -> Path:
    data = copy.deepcopy(_real("genifer_cifar100_b50.json"))
    data["genifer"].update(
        resolution=16,
        num_classes=N_CLASSES,
        z_dim=16,
        embed_dim=8,
        w_dim=16,
        g_channel_base=64,
        g_channel_max=16,
        d_channels=8,
        mbstd_group=2,
        gan_steps_first=2,
        gan_steps=2,
        gan_batch_size=4,
        progress=False,
    )
    data["benchmark"] = {
        "name": "mini_imagenet",
        "n_classes": N_CLASSES,
        "n_experiences": 2,
        "image_size": 16,
    }
    data["classifier"]["model"] = "resnet18"
    data["classifier"]["width"] = 8
    data["classifier"]["later_tasks"].update(epochs=1, milestones=[1])
    data["classifier"]["train_mb_size"] = 8
    return _write(tmp_path / "genifer_tiny.json", data)


# ---------------------------------------------------------------------------------------------
# parsing


def test_every_real_config_parses():
    files = sorted(CONFIGS.glob("*.json"))
    assert len(files) >= 6
    for path in files:
        cfg = rc.load_config(path)
        assert cfg.method == path.name.split("_")[0]
        assert rc.resolve_strategies(None, cfg)[0] == cfg.method
    cifar = rc.load_config(CONFIGS / "genifer_cifar100_b50.json")
    assert cifar.benchmark.kwargs == {
        "class_order": "icarl",
        "n_experiences": 6,
        "first_experience_classes": 50,
        "expected_classes": 100,
    }
    assert (cifar.first.optimizer, cifar.first.nesterov, cifar.later.optimizer) == (
        "sgd",
        True,
        "radam",
    )
    # the first task's length and schedule come from later_tasks (the file states neither)
    assert cifar.first.epochs == cifar.later.epochs == 100
    assert cifar.later.lr_at(29) == pytest.approx(1e-4) and cifar.later.lr_at(60) == pytest.approx(
        1e-4 * 0.04
    )
    mini = rc.load_config(CONFIGS / "d2l_mini_imagenet.json")
    assert mini.baselines == ["replay", "er_ace", "der"] and mini.mem_sizes == [500, 1000]
    assert mini.dreamer_overrides["output_size"] == 84
    fg = rc.load_config(CONFIGS / "d2l_fg_imagenet.json")
    assert len(fg.benchmark.kwargs["wnids"]) == 100


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda d: d.update(seedz=[0]), "seedz"),
        (lambda d: d["benchmark"].update(n_clases=5), "n_clases"),
        (lambda d: d["training"].update(lr_decay=0.1), "lr_decay"),
        (lambda d: d["dreamer_overrides"].update(num_steps=3), "num_steps"),
        (lambda d: d["dream"].update(stepz=3), "stepz"),
        (lambda d: d["model"].update(name="vgg"), "unknown model"),
        (lambda d: d.update(baselines=["icarl2"]), "icarl2"),
        (lambda d: d["training"].update(optimizer="lion"), "lion"),
    ],
)
def test_unknown_keys_and_names_are_errors(tmp_path, edit, match):
    data = _real("d2l_mini_imagenet.json")
    edit(data)
    path = _write(tmp_path / "bad.json", data)
    with pytest.raises(ValueError, match=match):
        cfg = rc.load_config(path)
        rc.build_model(cfg.model, 10, (3, 84, 84))


def test_genifer_file_rejects_unknown_classifier_keys(tmp_path):
    data = _real("genifer_cifar100_b50.json")
    data["classifier"]["later_tasks"]["milestonez"] = [1]
    with pytest.raises(ValueError, match="milestonez"):
        rc.load_config(_write(tmp_path / "bad.json", data))
    cfg = rc.load_config(CONFIGS / "genifer_cifar100_b50.json")
    with pytest.raises(ValueError, match="configures 'genifer'"):
        rc.resolve_strategies("d2l", cfg)
    assert rc.resolve_strategies("genifer,er,derpp,er", cfg) == ["genifer", "replay", "der"]


def test_model_mapping():
    spec = rc.ModelSpec(name="resnet18", feature_layer="features")
    small, layer = rc.build_model(spec, 5, (3, 16, 16))
    assert isinstance(small, ResNetCifar) and layer == "features"
    large, layer = rc.build_model(spec, 5, (3, 72, 72))
    assert type(large).__module__.startswith("torchvision") and layer == "avgpool"
    assert large(torch.zeros(1, 3, 72, 72)).shape == (1, 5)
    with pytest.raises(ValueError, match="layer3"):  # the message lists the valid names
        rc.build_model(rc.ModelSpec(name="resnet18", feature_layer="block9"), 5, (3, 72, 72))


# ---------------------------------------------------------------------------------------------
# clear errors before any training


def test_missing_data_root_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="train/"):
        rc.run_config(
            CONFIGS / "d2l_mini_imagenet.json",
            data_root=tmp_path / "none",
            out=tmp_path / "out",
            progress=False,
        )
    with pytest.raises(ValueError, match="--data-root"):
        rc.run_config(CONFIGS / "d2l_imagenet_r.json", out=tmp_path / "out", progress=False)
    code = rc.main(
        [
            str(CONFIGS / "genifer_cifar100_b50.json"),
            "--data-root",
            str(tmp_path / "none"),
            "--out",
            str(tmp_path / "out"),
            "--no-progress",
        ]
    )
    assert code == 2
    assert "cifar-100-python" in capsys.readouterr().err


def test_unloadable_dreamer_says_what_to_do(tmp_path, data_root, dreamer_dir):
    with pytest.raises(OSError, match="internet is available.*--dreamer"):
        rc.load_dreamer("no-such-org/no-such-dreamer", {}, device="cpu", offline=True)
    data = json.loads(_tiny_d2l(tmp_path).read_text())
    data["dreamer_overrides"]["output_size"] = 8  # the data is 16 px
    with pytest.raises(ValueError, match="dreamer_overrides"):
        rc.run_config(
            _write(tmp_path / "c.json", data),
            data_root=data_root,
            out=tmp_path / "out",
            dreamer=str(dreamer_dir),
            progress=False,
        )


# ---------------------------------------------------------------------------------------------
# optimiser phases


@pytest.mark.parametrize("fresh", [False, True])
def test_optim_schedule_switches_optimiser_and_decays_lr(fresh):
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(60, 1, 8, 8, generator=g), torch.arange(6).repeat(10)
    bench = tensor_benchmark(x, y, x, y, n_experiences=3, seed=0)
    model = small_cnn(6, 1, width=4)
    first = rc.OptimSpec(optimizer="SGD", lr=0.1, epochs=1, momentum=0.9, nesterov=True)
    later = rc.OptimSpec(optimizer="RAdam", lr=0.01, epochs=3, milestones=(1, 2), gamma=0.5)
    seen = []

    class Spy:
        def before_training_iteration(self, strategy, **kwargs):
            if strategy.clock.train_epoch_iterations == 0:
                opt = strategy.optimizer
                seen.append(
                    (
                        strategy.experience.current_experience,
                        type(opt).__name__,
                        opt.param_groups[0]["lr"],
                        id(opt),
                    )
                )

    schedule = rc.OptimSchedule(first=first, later=later, fresh_each_experience=fresh)
    strategy = Naive(
        model=model,
        optimizer=first.build(model.parameters()),
        train_mb_size=20,
        train_epochs=99,
        device="cpu",
        evaluator=None,
        plugins=[schedule, Spy()],
    )
    for exp in bench.train_stream:
        strategy.train(exp)
    assert seen[0][:3] == (0, "SGD", 0.1)
    assert [s[:2] for s in seen[1:]] == [(1, "RAdam")] * 3 + [(2, "RAdam")] * 3
    assert [s[2] for s in seen[1:4]] == pytest.approx([0.01, 0.005, 0.0025])
    assert [s[2] for s in seen[4:]] == pytest.approx([0.01, 0.005, 0.0025])
    assert (seen[1][3] != seen[4][3]) == fresh  # a new optimiser per experience, or the same
    assert {id(p) for p in model.parameters()} == set(map(id, strategy.optimizer.state))


# ---------------------------------------------------------------------------------------------
# end to end


EXPECTED_RUN_KEYS = {
    "strategy",
    "seed",
    "final_accuracy",
    "avg_incremental_accuracy",
    "forgetting",
    "bwt",
    "forward_transfer",
    "accuracy_matrix",
    "wall_s",
    "peak_rss_mb",
}


def test_d2l_and_baseline_run_and_resume(tmp_path, data_root, dreamer_dir):
    config = _tiny_d2l(tmp_path)
    out = tmp_path / "out"
    kw = dict(
        data_root=data_root,
        out=out,
        dreamer=str(dreamer_dir),
        max_experiences=2,
        progress=False,
        offline=True,
    )
    results = rc.run_config(config, **kw)
    assert list(results) == ["mem6"]
    folder = out / "mem6"
    saved = json.loads((folder / "results.json").read_text())
    runs = {r["strategy"]: r for r in saved["runs"]}
    assert set(runs) == {"d2l", "replay"}
    for r in runs.values():
        assert EXPECTED_RUN_KEYS <= set(r)
        assert len(r["accuracy_matrix"]) == 2 and all(len(row) == 3 for row in r["accuracy_matrix"])
        assert 0.0 <= r["final_accuracy"] <= 1.0 and np.isfinite(r["forward_transfer"])
    assert saved["config"]["mem_size"] == 6
    assert saved["config"]["dreamer"] == str(dreamer_dir.resolve())
    assert saved["config"]["experiment"]["dream"]["steps"] == 1
    assert (folder / "work" / "d2l_seed0" / "dreams" / "dreams_exp0.pt").is_file()
    assert not list((folder / "checkpoints").glob("*.pkl"))
    assert "| d2l |" in (folder / "results.md").read_text()
    assert (folder / "accuracy.png").stat().st_size > 1000
    # same command again: nothing to train, same results; other settings are refused
    assert rc.run_config(config, **kw)["mem6"]["runs"] == saved["runs"]
    with pytest.raises(ValueError, match="different settings"):
        rc.run_config(config, **{**kw, "epochs": 2})


def test_genifer_run_and_buffer_free_runs_are_shared(tmp_path, data_root):
    config = _tiny_genifer(tmp_path)
    out = tmp_path / "out"
    kw = dict(data_root=data_root, out=out, progress=False)
    results = rc.run_config(config, **kw)
    (run,) = results["no_buffer"]["runs"]
    assert run["strategy"] == "genifer" and len(run["accuracy_matrix"]) == 2
    experiment = results["no_buffer"]["config"]["experiment"]
    assert experiment["later_experience_optimizer"]["optimizer"] == "radam"
    assert experiment["fresh_optimizer_each_experience"] is True
    # a buffer-free baseline runs once; the next buffer size reuses its result
    first = rc.run_config(config, strategies="naive,er", mem_size=4, **kw)["mem4"]["runs"]
    second = rc.run_config(config, strategies="naive,er", mem_size=8, **kw)["mem8"]["runs"]
    naive4, naive8 = (next(r for r in runs if r["strategy"] == "naive") for runs in (first, second))
    assert naive8["reused_from"] == "mem4"
    assert naive8["accuracy_matrix"] == naive4["accuracy_matrix"]
    assert {r["strategy"] for r in second} == {"naive", "replay"}


def test_killed_d2l_run_resumes_with_the_dreamer(tmp_path, data_root, dreamer_dir, monkeypatch):
    """A run killed at experience 1 restarts there; the checkpoint leaves the dreamer out and the
    resumed run dreams again with the loaded one."""
    config = _tiny_d2l(tmp_path)
    out = tmp_path / "out"
    kw = dict(
        data_root=data_root,
        out=out,
        dreamer=str(dreamer_dir),
        strategies="d2l",
        max_experiences=2,
        progress=False,
        offline=True,
    )
    original = rc.OptimSchedule.before_training_exp
    state = {"armed": True, "trained": []}

    def flaky(self, strategy, **kwargs):
        k = strategy.experience.current_experience
        if state["armed"] and k == 1:
            raise KeyboardInterrupt("simulated kill")
        state["trained"].append(k)
        original(self, strategy, **kwargs)

    monkeypatch.setattr(rc.OptimSchedule, "before_training_exp", flaky)
    with pytest.raises(KeyboardInterrupt):
        rc.run_config(config, **kw)
    ckpt = out / "mem6" / "checkpoints" / "d2l_seed0.pkl"
    assert ckpt.is_file() and state["trained"] == [0]
    state["armed"] = False
    (run,) = rc.run_config(config, **kw)["mem6"]["runs"]
    assert state["trained"] == [0, 1]  # experience 0 was not trained again
    assert len(run["accuracy_matrix"]) == 2 and not ckpt.exists()
    assert (out / "mem6" / "work" / "d2l_seed0" / "dreams" / "dreams_exp1.pt").is_file()
