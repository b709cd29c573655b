"""Experiment files: wrong types, infinite numbers and non-UTF-8 files are refused with one
sentence that names the file and the key's path, before any work."""

import copy
import json

import pytest

from avalanche_d2l.experiments.schema import Experiment
from avalanche_d2l.fields import check_value

BASE = {
    "benchmark": {"name": "split_digits", "n_experiences": 2},
    "model": {"name": "small_cnn", "feature_layer": "features"},
    "training": {"optimizer": {"name": "sgd", "lr": 0.1, "epochs": 1}},
    "strategies": {"naive": {}, "lwf": {}},
    "seeds": [0],
    "mem_sizes": [10],
}


def _load(tmp_path, change):
    data = copy.deepcopy(BASE)
    change(data)
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(data))
    return Experiment.from_file(path)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda d: d.update(seeds="12"), "seeds must be a list, got a string"),
        (lambda d: d.update(seeds=[0.5]), "seeds[0] must be a whole number, got 0.5"),
        (lambda d: d.update(mem_sizes=100), "mem_sizes must be a list, got 100"),
        (
            lambda d: d["training"]["optimizer"].update(lr=float("inf")),
            "training.optimizer.lr must be a finite number, got inf",
        ),
        (
            lambda d: d["training"]["optimizer"].update(lr="fast"),
            "training.optimizer.lr must be a finite number, got 'fast'",
        ),
        (
            lambda d: d["training"]["optimizer"].update(epochs=1.9),
            "training.optimizer.epochs must be a whole number, got 1.9",
        ),
        (
            lambda d: d["training"]["optimizer"].update(epochs="10"),
            "training.optimizer.epochs must be a whole number, got '10'",
        ),
        (
            lambda d: d["training"]["optimizer"].update(milestones=["a"]),
            "training.optimizer.milestones[0] must be a whole number, got 'a'",
        ),
        (
            lambda d: d["training"].update(train_mb_size=True),
            "training.train_mb_size must be a whole number, got True",
        ),
        (
            lambda d: d["strategies"].update(lwf={"alpha": "big"}),
            "alpha must be a finite number, got 'big'",
        ),
    ],
)
def test_wrong_types_name_the_file_and_the_key(tmp_path, change, message):
    with pytest.raises(ValueError) as err:
        _load(tmp_path, change)
    text = str(err.value)
    assert text.startswith(str(tmp_path / "mine.json")), text
    assert message in text, text


def test_json_infinity_literal_is_refused(tmp_path):
    path = tmp_path / "inf.json"
    text = json.dumps(BASE).replace('"lr": 0.1', '"lr": 1e309')  # json reads 1e309 as inf
    path.write_text(text)
    with pytest.raises(ValueError, match="training.optimizer.lr must be a finite number"):
        Experiment.from_file(path)


def test_non_utf8_file_names_the_file(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes(
        json.dumps({**BASE, "description": "caf\u00e9"}, ensure_ascii=False).encode("latin-1")
    )
    with pytest.raises(ValueError, match=r"latin1\.json is not UTF-8 text"):
        Experiment.from_file(path)


def test_valid_values_are_converted_not_refused(tmp_path):
    exp = _load(tmp_path, lambda d: d["training"]["optimizer"].update(epochs=2.0, milestones=[1]))
    assert exp.training.optimizer.epochs == 2 and isinstance(exp.training.optimizer.epochs, int)
    assert exp.training.optimizer.milestones == (1,)
    assert check_value(None, int | None, "x") is None
    assert check_value(3, float, "x") == 3.0 and isinstance(check_value(3, float, "x"), float)


def test_a_diverging_run_stops_with_one_sentence_and_is_not_recorded(tmp_path, capsys):
    from avalanche_d2l.cli import main

    data = copy.deepcopy(BASE)
    data["strategies"] = {"naive": {}}
    data["training"]["optimizer"]["lr"] = 1e30  # finite, but the weights overflow at once
    path = tmp_path / "diverge.json"
    path.write_text(json.dumps(data))
    out = tmp_path / "o"
    code = main(["run", str(path), "--out", str(out), "--max-experiences", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "the training loss became" in err and "in experience 0" in err, err
    assert "Traceback" not in err
    assert not list((out / "runs").glob("*.json"))  # nothing recorded as a result
