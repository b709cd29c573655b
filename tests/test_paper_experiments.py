"""The shipped paper experiments through the engine, on tiny local folders, on CPU.

The runs use copies of the shipped files with tiny sizes: a 6-class image-folder dataset of 16 px
PNGs in the Mini-ImageNet layout, a narrow CIFAR-stem ResNet-18 and a tiny random dreamer saved
with ``Dreamer.save_pretrained`` and named as the file's ``dreamer``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import tiny_pixel_dreamer

from avalanche_d2l.cli import main
from avalanche_d2l.experiments import (
    Experiment,
    OptimSchedule,
    build_model,
    experiment_files,
    load_experiment,
    run_experiment,
)
from avalanche_d2l.models.classifiers import ResNetCifar

N_CLASSES = 6


def _shipped(name: str) -> dict:
    return json.loads(experiment_files()[name].read_text())


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


def _tiny_d2l(tmp_path: Path, dreamer_dir: Path, n_experiences: int = 3) -> Path:
    data = copy.deepcopy(_shipped("d2l_mini_imagenet"))
    data["benchmark"].update(expected_classes=N_CLASSES, n_experiences=n_experiences, image_size=16)
    data["model"]["width"] = 8
    section = data["strategies"]["d2l"]
    section["dreamer"] = str(dreamer_dir)
    section["dreamer_overrides"].pop("latent_size")  # the tiny dreamer is pixel-space
    section["dreamer_overrides"].update(
        num_inference_steps=2,
        backprop_steps=1,
        gradient_checkpointing=False,
        mixed_precision="no",
        output_size=16,
    )
    section["dream"].update(
        max_dream_classes=2,
        steps=1,
        batch_per_class=2,
        samples_per_class=4,
        generate_inference_steps=None,
        generate_batch_size=8,
    )
    data["training"].update(train_mb_size=8, eval_mb_size=32)
    data["training"]["optimizer"]["epochs"] = 1
    data["strategies"] = {"d2l": section, "replay": {}}
    data.update(mem_sizes=[6], seeds=[0], device="cpu", precision="no")
    return _write(tmp_path / "d2l_tiny.json", data)


# ---- models ---------------------------------------------------------------------------------


def test_model_mapping():
    small, layer = build_model("resnet18", "features", 5, (3, 16, 16))
    assert isinstance(small, ResNetCifar) and layer == "features"
    large, layer = build_model("resnet18", "features", 5, (3, 72, 72))
    assert type(large).__module__.startswith("torchvision") and layer == "avgpool"
    assert large(torch.zeros(1, 3, 72, 72)).shape == (1, 5)
    with pytest.raises(ValueError, match="layer3"):  # the message lists the valid names
        build_model("resnet18", "block9", 5, (3, 72, 72))


PAPER_FILES = {  # file -> (experiences, image size)
    "d2l_mini_imagenet": (10, 84),
    "d2l_mini_imagenet_20tasks": (20, 84),
    "d2l_fg_imagenet": (10, 256),
    "d2l_fg_imagenet_20tasks": (20, 256),
    "d2l_imagenet_r": (10, 224),
}


@pytest.mark.parametrize("name", sorted(PAPER_FILES))
def test_paper_files_follow_the_papers_protocol(name):
    """10 tasks by default (20 in the variants), the small-stem ResNet-18 at the file's own
    resolution, ER / ER-ACE / DER++ with and without D2L and BiC, sources in the description."""
    data = _shipped(name)
    n_exp, size = PAPER_FILES[name]
    assert data["benchmark"]["n_experiences"] == n_exp
    assert data["benchmark"]["image_size"] == size
    model, layer = build_model(data["model"]["name"], data["model"]["feature_layer"], 5, (3, 8, 8))
    big, _ = build_model(data["model"]["name"], data["model"]["feature_layer"], 5, (3, size, size))
    assert isinstance(model, ResNetCifar) and isinstance(big, ResNetCifar) and layer == "features"
    assert {"replay", "er_ace", "der", "bic", "d2l", "er_ace_d2l", "der_d2l"} <= set(
        data["strategies"]
    )
    assert "papers/d2l.md" in data["description"] and "silent" in data["description"]
    if name.endswith("_20tasks"):  # a variant: only the split (and its description) differ
        default = _shipped(name.removesuffix("_20tasks"))
        for d in (data, default):
            d["benchmark"].pop("n_experiences"), d.pop("description")
        assert data == default


# ---- BiC beside the rehearsal baselines ------------------------------------------------------


def _tiny_bic(tmp_path: Path) -> Path:
    data = copy.deepcopy(_shipped("d2l_mini_imagenet"))
    data["benchmark"].update(expected_classes=N_CLASSES, n_experiences=3, image_size=16)
    data["model"]["width"] = 8
    data["training"].update(train_mb_size=8, eval_mb_size=32)
    data["training"]["optimizer"]["epochs"] = 1
    data["strategies"] = {"bic": {"stage_2_epochs": 3, "stage_2_lr": 0.5}}
    data.update(mem_sizes=[12], seeds=[0], device="cpu", precision="no")
    return _write(tmp_path / "bic_tiny.json", data)


def test_bic_runs_in_the_engine_and_fits_its_bias_layer(tmp_path, data_root):
    from avalanche.training.plugins.bic import BiCPlugin

    from avalanche_d2l.experiments.runner import RunKey, RunOptions, build_run

    exp = Experiment.from_file(_tiny_bic(tmp_path))
    assert exp.keeps_buffer("bic")
    opts = RunOptions(data_root=str(data_root), progress=False)
    bench, strategy = build_run(exp, RunKey("bic", 0, 12), opts)
    plugin = next(p for p in strategy.plugins if isinstance(p, BiCPlugin))
    assert (plugin.mem_size, plugin.stage_2_epochs, plugin.lr) == (12, 3, 0.5)
    for experience in bench.train_stream[:2]:
        strategy.train(experience, eval_streams=[])
    # after the second experience the bias layer was fitted on the held-out samples
    assert plugin.bias_layer is not None
    assert float(plugin.bias_layer.alpha) != 1.0 or float(plugin.bias_layer.beta) != 0.0
    assert len(plugin.storage_policy.buffer) == 12
    results = run_experiment(
        exp, data_root=data_root, out=tmp_path / "out", max_experiences=2, progress=False
    )
    (run,) = results["runs"]
    assert run["strategy"] == "bic" and run["mem_size"] == 12
    assert run["settings"]["config"]["stage_2_epochs"] == 3
    # a plain classifier: the lab protocol sees BiC's corrected outputs like the masked one
    assert run["lab_accuracy_matrix"] == run["accuracy_matrix"]


# ---- clear errors before any training --------------------------------------------------------


def test_missing_data_root_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="train/"):
        run_experiment(
            load_experiment("d2l_mini_imagenet"),
            data_root=tmp_path / "none",
            out=tmp_path / "out",
            device="cpu",
            progress=False,
        )
    with pytest.raises(ValueError, match="--data-root"):
        run_experiment(
            load_experiment("d2l_imagenet_r"), out=tmp_path / "out", device="cpu", progress=False
        )
    code = main(
        [
            "run",
            "genifer_cifar100",
            "--data-root",
            str(tmp_path / "none"),
            "--out",
            str(tmp_path / "out"),
            "--device",
            "cpu",
            "--no-progress",
        ]
    )
    assert code == 2
    assert "cifar-100-python" in capsys.readouterr().err


def test_compare_runs_a_paper_loader_from_a_local_root(tmp_path, cifar_root, capsys):
    """``compare --benchmark split_cifar100 --data-root`` on a tiny CIFAR-100 copy (100 classes,
    one image each): the benchmark's default classifier and protocol (50 + 5 x 10)."""
    code = main(
        [
            "compare",
            "--benchmark",
            "split_cifar100",
            "--data-root",
            str(cifar_root),
            "--strategies",
            "naive",
            "--seeds",
            "0",
            "--epochs",
            "1",
            "--no-progress",
            "--out",
            str(tmp_path / "o"),
        ]
    )
    assert code == 0, capsys.readouterr().err
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert [r["strategy"] for r in results["runs"]] == ["naive"]
    assert results["experiment"]["model"] == {
        "name": "resnet18_cifar",
        "feature_layer": "layer3",
        "width": None,
    }
    assert all(len(r["accuracy_matrix"]) == 6 for r in results["runs"])


# ---- end to end -------------------------------------------------------------------------------


def test_d2l_and_host_run_resume_and_record_their_settings(tmp_path, data_root, dreamer_dir):
    exp = Experiment.from_file(_tiny_d2l(tmp_path, dreamer_dir))
    out = tmp_path / "out"
    kw = dict(data_root=data_root, out=out, max_experiences=2, progress=False)
    results = run_experiment(exp, **kw)
    runs = {r["strategy"]: r for r in results["runs"]}
    assert set(runs) == {"d2l", "replay"}
    for r in runs.values():
        assert len(r["accuracy_matrix"]) == 2 and all(len(row) == 3 for row in r["accuracy_matrix"])
        assert r["mem_size"] == 6
    config = runs["d2l"]["settings"]["config"]
    assert config["dreamer"] == str(dreamer_dir) and config["dream"]["steps"] == 1
    assert not list((out / "checkpoints").glob("*.pkl"))
    md = (out / "results.md").read_text()
    assert "| d2l (mem 6) |" in md
    # the lab protocol headlines the table, the masked figures beside it, the legend below
    assert md.index("Final acc. (lab)") < md.index("Final acc. (masked)") and "*Lab*" in md
    for r in runs.values():
        lab, masked = r["lab_accuracy_matrix"], r["accuracy_matrix"]
        assert len(lab) == 2 and all(len(row) == 3 for row in lab)
        # the lab's final accuracy: the mean over the trained experiences of the last row
        assert r["lab_final_accuracy"] == pytest.approx((lab[-1][0] + lab[-1][1]) / 2)
        assert len(r["lab_accuracy_at_start"]) == 2
        # the lab protocol can only lose samples (to dream heads), never gain them
        assert all(a <= b + 1e-9 for lr, mr in zip(lab, masked) for a, b in zip(lr, mr))
    # a plain classifier: both protocols see the same per-experience accuracies
    assert runs["replay"]["lab_accuracy_matrix"] == runs["replay"]["accuracy_matrix"]
    # same again: nothing trains, same numbers
    again = run_experiment(exp, **kw)
    assert [r["fingerprint"] for r in again["runs"]] == [r["fingerprint"] for r in results["runs"]]
    assert again["runs"] == results["runs"]


def test_killed_d2l_run_resumes_with_the_dreamer(tmp_path, data_root, dreamer_dir, monkeypatch):
    """A run killed at experience 1 restarts there; the resumed run dreams with the loaded
    dreamer and ends with the numbers of an uninterrupted run."""
    exp = Experiment.from_file(_tiny_d2l(tmp_path, dreamer_dir))
    kw = dict(data_root=data_root, strategies=["d2l"], max_experiences=2, progress=False)
    clean = run_experiment(exp, out=tmp_path / "clean", **kw)
    original = OptimSchedule.before_training_exp
    state = {"armed": True, "trained": []}

    def flaky(self, strategy, **kwargs):
        k = strategy.experience.current_experience
        if state["armed"] and k == 1:
            raise KeyboardInterrupt("simulated kill")
        state["trained"].append(k)
        original(self, strategy, **kwargs)

    monkeypatch.setattr(OptimSchedule, "before_training_exp", flaky)
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        run_experiment(exp, out=out, **kw)
    ckpt = out / "checkpoints" / "d2l_seed0_mem6.pkl"
    assert ckpt.is_file() and state["trained"] == [0]
    state["armed"] = False
    resumed = run_experiment(exp, out=out, **kw)
    assert state["trained"] == [0, 1]  # experience 0 was not trained again
    assert not ckpt.exists()
    keys = ("final_accuracy", "accuracy_matrix", "forward_transfer", "fingerprint")
    assert [{k: r[k] for k in keys} for r in resumed["runs"]] == [
        {k: r[k] for k in keys} for r in clean["runs"]
    ]


def test_truncated_image_is_named_and_check_data_lists_it(tmp_path, data_root, dreamer_dir, capsys):
    import shutil

    root = Path(shutil.copytree(data_root, tmp_path / "data"))
    bad = sorted((root / "train" / "n00000002").glob("*.png"))[0]
    bad.write_bytes(bad.read_bytes()[:60])  # a truncated PNG
    args = [
        "run",
        str(_tiny_d2l(tmp_path, dreamer_dir)),
        "--data-root",
        str(root),
        "--strategies",
        "naive",
        "--no-progress",
        "--out",
        str(tmp_path / "o"),
    ]
    assert main([*args, "--check-data"]) == 2
    err = capsys.readouterr().err
    assert "1 item(s) could not be read" in err and str(bad) in err
    assert not (tmp_path / "o" / "runs").exists()  # stopped before training
    assert main(args) == 2  # without the check, training stops at the file, naming it
    assert str(bad) in capsys.readouterr().err


def test_dry_run_estimates_dreaming_and_training_without_training(
    tmp_path, data_root, dreamer_dir, capsys
):
    path = _tiny_d2l(tmp_path, dreamer_dir)
    code = main(
        ["run", str(path), "--data-root", str(data_root), "--dry-run", "--out", str(tmp_path / "o")]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "per dreaming phase (2 dream classes" in out and "per run (2 dreaming phases)" in out
    assert '"strategy": "replay"' in out and "train_step_s" in out
    assert not (tmp_path / "o").exists()  # nothing trained, nothing written
