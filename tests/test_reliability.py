"""Reliability: nothing executes from a planted file, failed writes leave nothing behind, one
command per output folder, unreadable images are named before any training."""

import json
import os
import pickle

import pytest
import torch
from avalanche.training import Naive

from avalanche_d2l.checkpointing import UntrustedCheckpoint, load_strategy, save_strategy


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _strategy():
    model = torch.nn.Linear(4, 2)
    return Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))


def test_a_planted_checkpoint_is_refused_before_unpickling(tmp_path):
    ckpt = tmp_path / "naive_s0.pkl"
    marker = tmp_path / "payload_ran"
    ckpt.write_bytes(pickle.dumps(_Payload(str(marker))))
    with pytest.raises(UntrustedCheckpoint, match="was not unpickled"):
        load_strategy(_strategy(), ckpt)
    assert not marker.exists()


def test_a_checkpoint_changed_after_writing_is_refused(tmp_path):
    ckpt = tmp_path / "naive_s0.pkl"
    save_strategy(_strategy(), ckpt)
    _, start = load_strategy(_strategy(), ckpt)  # the package's own file loads
    assert start == 0
    marker = tmp_path / "payload_ran"
    ckpt.write_bytes(pickle.dumps(_Payload(str(marker))))  # replaced, record kept
    with pytest.raises(UntrustedCheckpoint):
        load_strategy(_strategy(), ckpt)
    assert not marker.exists()


def test_a_failed_checkpoint_write_is_one_oserror_and_leaves_no_temporary(tmp_path, monkeypatch):
    import avalanche.checkpointing

    def disk_full(strategy, fname, **kwargs):
        with open(fname, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc] . PytorchStreamWriter failed")

    monkeypatch.setattr(avalanche.checkpointing, "save_checkpoint", disk_full)
    with pytest.raises(OSError, match="could not write the checkpoint"):
        save_strategy(_strategy(), tmp_path / "naive_s0.pkl")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_compare_sets_a_planted_checkpoint_aside_without_running_it(tmp_path):
    from avalanche_d2l.experiments import default_experiment, run_experiment

    exp = default_experiment("split_digits")
    kw = dict(strategies=["naive"], seeds=[0], quick=True, epochs=1, progress=False)
    clean = run_experiment(exp, out=tmp_path / "clean", **kw)
    ckpt = tmp_path / "bad" / "checkpoints" / "naive_seed0.pkl"
    ckpt.parent.mkdir(parents=True)
    marker = tmp_path / "payload_ran"
    ckpt.write_bytes(pickle.dumps(_Payload(str(marker))))
    # with the settings record of a run of these settings: the digest check is what refuses it
    record = json.loads((tmp_path / "clean" / "runs" / "naive_seed0.json").read_text())
    (ckpt.parent / "naive_seed0.settings").write_text(record["fingerprint"] + "\n")
    with pytest.warns(UserWarning, match="was not unpickled"):
        bad = run_experiment(exp, out=tmp_path / "bad", **kw)
    assert not marker.exists()
    assert bad["runs"][0]["final_accuracy"] == clean["runs"][0]["final_accuracy"]
    assert ckpt.with_name(ckpt.name + ".corrupt").exists()


def test_a_second_command_on_the_same_out_is_refused_naming_the_first(tmp_path, capsys):
    from avalanche_d2l.cli import main
    from avalanche_d2l.experiments.lock import OutputLock

    out = tmp_path / "o"
    out.mkdir()
    with OutputLock(out):  # the first command, still running
        code = main(["compare", "--strategies", "naive", "--quick", "--out", str(out)])
        err = capsys.readouterr().err
        assert code == 2 and "is in use by another command (pid" in err, err
        assert not (out / "runs").exists()
    with OutputLock(out):  # released when the first command ends
        pass


def test_files_that_are_not_images_are_named_before_any_training(tmp_path):
    import numpy as np
    from PIL import Image

    from avalanche_d2l.scenarios import split_mini_imagenet

    for c in range(4):
        for split, n in (("train", 3), ("test", 2)):
            folder = tmp_path / split / f"n0000000{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(np.full((8, 8, 3), 40 * c, np.uint8)).save(folder / f"{i}.png")
    empty = tmp_path / "train" / "n00000001" / "3.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "train" / "n00000002" / "notes.png"
    text.write_text("not an image")
    with pytest.raises(ValueError, match="2 file\\(s\\) under .* are not readable images") as err:
        split_mini_imagenet(tmp_path, n_experiences=2, image_size=8)
    assert str(empty) in str(err.value) and str(text) in str(err.value)


class _BadImages(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        raise OSError("cannot read image /data/a.png: truncated (remove or replace the file)")


def test_an_unreadable_image_in_a_loader_worker_is_one_sentence():
    from avalanche_d2l.cli import _one_sentence

    loader = torch.utils.data.DataLoader(_BadImages(), num_workers=1)
    with pytest.raises(OSError) as err:
        next(iter(loader))
    assert "Original Traceback" in str(err.value)  # torch's message: the worker's traceback
    assert _one_sentence(err.value) == (
        "cannot read image /data/a.png: truncated (remove or replace the file)"
    )


def test_num_workers_inside_jobs_is_refused_before_any_work(tmp_path, capsys):
    from avalanche_d2l.cli import main

    out = tmp_path / "o"
    args = ["compare", "--strategies", "naive,lwf", "--jobs", "2", "--num-workers", "2"]
    assert main([*args, "--quick", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--num-workers 2 with --jobs 2" in err and "Traceback" not in err
    assert not (out / "runs").exists()


class _Planted:
    """Unpickling it would create a file: the sign that a data file executed code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_planted_notebook_cache_is_not_unpickled_but_recomputed(tmp_path):
    from avalanche_d2l.experiments.notebook import cached

    path, marker = tmp_path / "grid.pt", tmp_path / "executed"
    torch.save({"key": {"a": 1}, "value": _Planted(marker)}, path)
    value, reused = cached(path, {"a": 1}, lambda: {"images": torch.ones(2), "names": ["x"]})
    assert not marker.exists() and not reused
    again, reused = cached(path, {"a": 1}, lambda: pytest.fail("recomputed a valid cache"))
    assert reused and torch.equal(again["images"], torch.ones(2)) and again["names"] == ["x"]
    with pytest.raises(pickle.UnpicklingError):  # an unsafe value is refused when written
        cached(tmp_path / "bad.pt", {"a": 1}, lambda: _Planted(marker))
    assert not marker.exists()
