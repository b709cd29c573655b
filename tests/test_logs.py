"""Logs a researcher can watch: TensorBoard, CSV and text logs through Avalanche's loggers, one
sub-folder per run; the newcomer's command on their own folder and model, as installed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from avalanche_d2l.experiments import Experiment, RunKey, RunOptions, build_run
from avalanche_d2l.experiments.builders import RunLogs
from avalanche_d2l.experiments.runner import train_with_checkpoints

torch.set_num_threads(1)

ACC = "Top1_Acc_Stream/eval_phase/test_stream/Task000"

MODEL_SOURCE = """
from torch import nn

class MyNet(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 8), nn.ReLU())
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        return self.fc(self.features(x))
"""


def _scalars(run_dir: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_newcomer_command_on_own_folder_and_model_writes_tensorboard(tmp_path):
    """``avalanche-d2l compare --benchmark image_folder --data-root DIR --model
    mypkg.nets:MyNet --strategies replay,naive --lr 0.01 --tensorboard tb/``, through the installed
    command, with nothing edited: the user's module is on PYTHONPATH."""
    rng = np.random.default_rng(0)
    data = tmp_path / "my_photos"
    for split, n in (("train", 4), ("test", 2)):
        for c in ("ant", "bee", "cat", "dog"):
            (data / split / c).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(data / split / c / f"{i}.jpg")
    code = tmp_path / "code" / "mypkg"
    code.mkdir(parents=True)
    (code / "__init__.py").write_text("")
    (code / "nets.py").write_text(MODEL_SOURCE)
    command = Path(sys.executable).parent / "avalanche-d2l"
    env = {
        **os.environ,
        "PYTHONPATH": str(tmp_path / "code"),
        "PYTHONWARNINGS": "ignore",
        "OMP_NUM_THREADS": "1",
    }
    done = subprocess.run(
        [str(command), "compare", "--benchmark", "image_folder", "--data-root", str(data)]
        + ["--model", "mypkg.nets:MyNet", "--strategies", "replay,naive", "--lr", "0.01"]
        + ["--tensorboard", "tb/", "--csv", "csv/", "--quick", "--seeds", "0", "--no-progress"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "results" / "my_photos"  # the report is the folder's
    assert (out / "results.md").is_file() and (out / "accuracy.png").is_file()
    runs = sorted(p.name for p in (tmp_path / "tb").iterdir())
    assert runs == ["naive_seed0", "replay_seed0_mem100"]
    for run in runs:
        scalars = _scalars(tmp_path / "tb" / run)
        assert len(scalars[ACC]) == 2  # one point per experience (4 classes, 2 a piece)
        csv = (tmp_path / "csv" / run / "eval_results.csv").read_text().splitlines()
        assert csv[0].startswith("eval_exp,training_exp,eval_accuracy")
        assert len(csv) == 1 + 2 * 2  # header + every experience evaluated after each
    settings = (out / "results.json").read_text()
    assert '"mypkg.nets:MyNet"' in settings and '"lr": 0.01' in settings


def _tiny_experiment() -> Experiment:
    return Experiment.from_dict(
        {
            "benchmark": {"name": "split_digits", "n_experiences": 2, "image_size": 8},
            "model": {"name": "small_cnn", "feature_layer": "block3", "width": 4},
            "training": {"optimizer": {"name": "adam", "lr": 1e-3, "epochs": 1}},
            "strategies": {"naive": {}},
        }
    )


def test_logs_survive_a_checkpoint_resume_and_the_text_log_is_written_as_it_goes(tmp_path):
    """The loggers travel in the strategy's checkpoint; the text log holds each experience as
    soon as it is trained (not only when the process exits), also after a resume."""
    exp = _tiny_experiment()
    key = RunKey("naive", 0, None)
    logs = RunLogs(tensorboard_dir=str(tmp_path / "tb"), text_dir=str(tmp_path / "txt"))
    opts = RunOptions(progress=False, logs=logs)
    ckpt = tmp_path / "ckpt.pkl"
    bench, strategy = build_run(exp, key, opts)
    train_with_checkpoints(strategy, bench, seed=0, ckpt=ckpt, n_train=1)
    text = tmp_path / "txt" / "naive_seed0.log"
    assert "Starting training on experience 0" in text.read_text()  # while the run is alive
    bench, strategy = build_run(exp, key, opts)  # a new process would do the same
    train_with_checkpoints(strategy, bench, seed=0, ckpt=ckpt, n_train=2)
    log = text.read_text()
    assert "Resuming from checkpoint" in log and "Starting training on experience 1" in log
    assert "Starting training on experience 0" in log.split("Resuming from checkpoint")[0]
    del strategy
    import gc

    gc.collect()  # the writers close with their loggers
    assert len(_scalars(tmp_path / "tb" / "naive_seed0")[ACC]) >= 2


def test_wandb_without_the_package_is_one_sentence_before_any_work(tmp_path, monkeypatch, capsys):
    import importlib.util

    from avalanche_d2l.cli import main

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    out = tmp_path / "out"
    rc = main(["compare", "--strategies", "naive", "--wandb", "my-project", "--out", str(out)])
    assert rc == 2
    assert "--wandb needs the wandb package: pip install wandb" in capsys.readouterr().err
    assert not out.exists()
