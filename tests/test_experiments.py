"""The experiment engine and its command line: schema, shipped files, runner, resume, faults.

Runs use ``--quick`` (2 epochs) on the offline split_digits stream with Avalanche's baselines;
the methods' own end-to-end runs are in ``test_paper_experiments.py``.
"""

from __future__ import annotations

import json
import os
import pickle
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from avalanche.training import Naive

from avalanche_d2l import registry
from avalanche_d2l.cli import main
from avalanche_d2l.experiments import (
    Experiment,
    OptimSchedule,
    OptimSpec,
    default_experiment,
    experiment_files,
    load_experiment,
    run_experiment,
)
from avalanche_d2l.experiments.one_run import run_environment, source_fingerprint
from avalanche_d2l.models.classifiers import small_cnn
from avalanche_d2l.scenarios import tensor_benchmark

#: what two runs of the same settings must share (wall time and memory aside)
SAME = (
    "final_accuracy",
    "avg_incremental_accuracy",
    "forgetting",
    "bwt",
    "forward_transfer",
    "accuracy_matrix",
    "seen_accuracy",
    "accuracy_at_start",
    "fingerprint",
)


def _metrics(results: dict) -> list[dict]:
    return [{k: r[k] for k in ("strategy", "seed", "mem_size", *SAME)} for r in results["runs"]]


@pytest.fixture
def restore_registry():
    saved = dict(registry._REGISTRY)
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved)


def _baselines(tmp_path: Path, **edits) -> Path:
    data = json.loads(experiment_files()["split_digits"].read_text())
    data["strategies"] = {"naive": {}, "replay": {}}
    data.update(edits)
    path = tmp_path / "exp.json"
    path.write_text(json.dumps(data))
    return path


# ---- schema and shipped files --------------------------------------------------------------


def test_every_shipped_experiment_loads_and_resolves():
    files = experiment_files()
    assert {
        "split_digits",
        "split_color_digits",
        "genifer_cifar100",
        "d2l_mini_imagenet",
        "d2l_imagenet_r",
        "d2l_fg_imagenet",
    } <= set(files)
    for name in files:
        exp = load_experiment(name)
        resolved = exp.to_dict()
        assert set(resolved["strategies"]) == set(exp.strategies)
        json.dumps(resolved)  # the resolved experiment is what results.json records
    for name in ("d2l_mini_imagenet", "d2l_imagenet_r", "d2l_fg_imagenet"):
        exp = load_experiment(name)
        # the paper measures ER, ER-ACE and DER++ each with and without D2L
        assert {"replay", "er_ace", "der", "d2l", "er_ace_d2l", "der_d2l"} <= set(exp.strategies)
        assert exp.to_dict()["strategies"]["der_d2l"] == exp.to_dict()["strategies"]["d2l"]


def test_cifar100_genifer_resolves_to_reference_optimisers():
    exp = load_experiment("genifer_cifar100")
    first, later = exp.training.first, exp.training.optimizer
    # task 0 (reference pretrain_classifier.json + trainer): SGD Nesterov 0.9, lr 0.1, wd 5e-4
    assert (first.name, first.lr, first.momentum, first.nesterov, first.weight_decay) == (
        "sgd",
        0.1,
        0.9,
        True,
        5e-4,
    )
    assert (first.epochs, first.milestones, first.gamma) == (100, (30, 60, 80), 0.2)
    # later tasks: RAdam lr 1e-4 with decoupled weight decay 5e-4, 100 epochs, 30/60/80 x0.2
    assert (later.name, later.lr, later.weight_decay, later.decoupled_weight_decay) == (
        "radam",
        1e-4,
        5e-4,
        True,
    )
    assert (later.epochs, later.milestones, later.gamma) == (100, (30, 60, 80), 0.2)
    assert exp.training.train_mb_size == 32 and exp.training.fresh_optimizer_each_experience
    opt = first.build(small_cnn(10, 3).parameters())
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["weight_decay"] == 5e-4
    opt = later.build(small_cnn(10, 3).parameters())
    assert isinstance(opt, torch.optim.RAdam) and opt.defaults["decoupled_weight_decay"]
    assert exp.benchmark == {
        "name": "split_cifar100",
        "n_experiences": 6,
        "first_experience_classes": 50,
        "class_order": "icarl",
        "expected_classes": 100,
    }


@pytest.mark.parametrize(
    "edit, match",
    [
        ({"colour": 1}, r"unknown key\(s\) \['colour'\].*valid keys"),
        ({"benchmark": {"name": "mnist"}}, "unknown benchmark 'mnist'; valid names: split_digits"),
        ({"benchmark": {"name": "split_digits", "size": 3}}, r"unknown key\(s\) \['size'\]"),
        ({"strategies": {"bogus": {}}}, "unknown strategy 'bogus'; valid: .*replay"),
        ({"strategies": {"lwf": {"alpah": 1}}}, r"unknown key\(s\) \['alpah'\].*alpha"),
        ({"strategies": {"replay": {}, "er": {}}}, "listed twice"),
        ({"seeds": [0, 0]}, r"seed\(s\) \[0\] given twice"),
        ({"seeds": [-1]}, "non-negative"),
        ({"mem_sizes": [-5]}, ">= 0"),
        (
            {"training": {"optimizer": {"name": "adam", "lr": 1e-3, "epochs": 0}}},
            "epochs must be a whole number >= 1",
        ),
        (
            {"training": {"optimizer": {"name": "lion", "lr": 1e-3, "epochs": 1}}},
            "unknown optimizer",
        ),
    ],
)
def test_bad_experiment_files_say_what_is_valid(tmp_path, edit, match):
    with pytest.raises(ValueError, match=match):
        Experiment.from_file(_baselines(tmp_path, **edit))


def test_optim_schedule_switches_optimiser_and_decays_lr():
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(60, 1, 8, 8, generator=g), torch.arange(6).repeat(10)
    bench = tensor_benchmark(x, y, x, y, n_experiences=3, seed=0)
    model = small_cnn(6, 1, width=4)
    first = OptimSpec(name="SGD", lr=0.1, epochs=1, momentum=0.9, nesterov=True)
    later = OptimSpec(name="RAdam", lr=0.01, epochs=3, milestones=(1, 2), gamma=0.5)
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
                    )
                )

    strategy = Naive(
        model=model,
        optimizer=first.build(model.parameters()),
        train_mb_size=20,
        train_epochs=99,
        device="cpu",
        evaluator=None,
        plugins=[OptimSchedule(first=first, later=later), Spy()],
    )
    for exp in bench.train_stream:
        strategy.train(exp)
    assert seen[0] == (0, "SGD", 0.1)
    assert [s[:2] for s in seen[1:]] == [(1, "RAdam")] * 3 + [(2, "RAdam")] * 3
    assert [s[2] for s in seen[1:4]] == pytest.approx([0.01, 0.005, 0.0025])


# ---- command line ---------------------------------------------------------------------------


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "avalanche_d2l", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


def test_run_list_and_errors_from_any_directory(tmp_path, monkeypatch, capsys):
    done = _cli("run", "--list", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    for name in ("split_digits", "genifer_cifar100", "d2l_mini_imagenet"):
        assert name in done.stdout
    monkeypatch.chdir(tmp_path)  # the same command-line code in this process: 10 s less
    assert main(["run", "nope"]) == 2
    err = capsys.readouterr().err
    assert "neither a shipped experiment nor a file" in err and "Traceback" not in err


def _code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exit_:  # argparse's own errors
        return int(exit_.code)


@pytest.mark.parametrize(
    "args, match",
    [
        (["--strategies", ","], "give at least one strategy"),
        (["--strategies", "naive,naive"], "given twice"),
        (["--strategies", "naive,bogus"], "unknown strategy 'bogus'"),
        (["--seeds", "0", "0"], "given twice"),
        (["--seeds", "-1"], "non-negative"),
        (["--epochs", "0"], "epochs must be >= 1"),
        (["--mem-size", "-5"], ">= 0"),
        (["--threads", "0"], "threads must be >= 1"),
        (["--device", "banana"], "not a torch device"),
        (["--device", "cuda"], "no CUDA GPU"),
        (["--benchmark", "split_cifar100"], "pass --data-root"),
    ],
)
def test_bad_arguments_are_one_sentence_before_any_work(tmp_path, capsys, args, match):
    if args == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code = _code(
        ["compare", "--out", str(tmp_path / "o"), "--strategies", "naive", "--no-progress", *args]
    )
    err = capsys.readouterr().err
    assert code == 2 and match in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "o" / "runs").exists()  # nothing ran


def test_out_that_is_a_file_or_unwritable(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["compare", "--strategies", "naive", "--out", str(f)]) == 2
    assert "is a file" in capsys.readouterr().err
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        assert main(["compare", "--strategies", "naive", "--out", str(ro / "x")]) == 2
        assert "cannot write" in capsys.readouterr().err


# ---- runner: results, resume, changed settings, faults --------------------------------------


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp")
    code = main(
        [
            "compare",
            "--strategies",
            "naive,replay",
            "--seeds",
            "0",
            "--out",
            str(out),
            "--quick",
            "--epochs",
            "3",
            "--no-progress",
        ]
    )
    assert code == 0
    return out


def test_compare_records_runs_with_resolved_settings(quick_run):
    results = json.loads((quick_run / "results.json").read_text())
    runs = {r["strategy"]: r for r in results["runs"]}
    assert set(runs) == {"naive", "replay"}
    assert runs["replay"]["final_accuracy"] > runs["naive"]["final_accuracy"] + 0.1
    assert runs["replay"]["forgetting"] < runs["naive"]["forgetting"]
    naive = runs["naive"]["accuracy_matrix"]
    assert naive[0][0] > 0.5 and naive[-1][0] < 0.2  # naive forgets experience 0
    settings = runs["replay"]["settings"]
    assert settings["mem_size"] == 100 and runs["naive"]["settings"]["mem_size"] is None
    assert settings["experiment"]["training"]["optimizer"]["epochs"] == 3
    assert settings["package_version"] and settings["quick"] is True
    assert results["experiment"]["strategies"] == {"naive": {}, "replay": {}}
    md = (quick_run / "results.md").read_text()
    assert "| naive |" in md and "| replay (mem 100) |" in md
    assert (quick_run / "accuracy.png").stat().st_size > 1000
    assert (quick_run / "summary.png").stat().st_size > 1000
    assert sorted(p.name for p in (quick_run / "runs").iterdir()) == [
        "naive_seed0.json",
        "replay_seed0_mem100.json",
    ]
    assert not list((quick_run / "checkpoints").iterdir())


def test_rerun_reuses_finished_runs_and_reruns_changed_ones(quick_run, tmp_path, capsys):
    quick_run = Path(shutil.copytree(quick_run, tmp_path / "copy"))
    before = json.loads((quick_run / "results.json").read_text())
    exp = default_experiment("split_digits")
    again = run_experiment(
        exp,
        out=quick_run,
        strategies=["naive", "replay"],
        seeds=[0],
        quick=True,
        epochs=3,
        progress=False,
    )
    assert _metrics(again) == _metrics(before)
    out = capsys.readouterr().out
    assert "2 finished run(s) reused" in out and "other code" not in out
    # a finished run made by other code, or with other package versions or on another CPU, is
    # still reused (its settings match) but named
    assert before["runs"][0]["source"] == source_fingerprint()
    assert before["runs"][0]["environment"] == run_environment()
    env = run_environment()
    assert {"torch", "avalanche-lib", "numpy", "cpu", "torch_cpu_capability"} <= set(env)
    # what tells two machines of one CPU name apart: torch's kernel family and the CPU's flags
    assert env["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    if Path("/proc/cpuinfo").exists() and platform.machine() == "x86_64":
        assert "avx" in env["cpu_vector_flags"].split()
    path = quick_run / "runs" / "replay_seed0_mem100.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "source": "0123456789ab"}))
    again = run_experiment(
        exp, out=quick_run, strategies=["replay"], seeds=[0], quick=True, epochs=3, progress=False
    )
    assert [m for m in _metrics(again) if m["strategy"] == "replay"] == _metrics(before)[1:]
    out = capsys.readouterr().out
    assert "1 of them were made by other code" in out and "replay_seed0_mem100" in out
    path = quick_run / "runs" / "naive_seed0.json"
    rec = json.loads(path.read_text())
    path.write_text(json.dumps({**rec, "environment": {**rec["environment"], "torch": "2.0.0"}}))
    # a changed baseline hyper-parameter re-runs that strategy only, and says so
    data = exp.strategies | {"replay": {}, "lwf": {"alpha": 0.5}}
    changed = run_experiment(
        Experiment(**{**exp.__dict__, "strategies": data}),
        out=quick_run,
        strategies=["naive", "lwf"],
        seeds=[0],
        quick=True,
        epochs=3,
        progress=False,
    )
    assert _metrics(changed)[0] == _metrics(before)[0]
    assert changed["runs"][1]["settings"]["config"] == {"alpha": 0.5, "temperature": 2.0}
    out = capsys.readouterr().out  # naive was reused: its edited environment is named
    named = out.split("other code")[-1]
    assert "1 of them were made by other code" in out and "naive_seed0" in named
    changed = run_experiment(
        exp, out=quick_run, strategies=["naive"], seeds=[0], quick=True, epochs=2, progress=False
    )
    out = capsys.readouterr().out
    assert "naive_seed0: settings changed since it ran (experiment); running it again" in out
    assert changed["runs"][0]["fingerprint"] != before["runs"][0]["fingerprint"]


def test_source_fingerprint_follows_the_code_not_its_comments_or_docstrings(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "a.py").write_text('"""Module."""\n\n\ndef f(x):\n    """Doc."""\n    return x + 1\n')
    first = source_fingerprint(pkg)
    assert first != source_fingerprint()  # another tree
    (pkg / "a.py").write_text(
        '"""Another docstring."""\n# a comment\n\n\ndef f(x):  # why\n    """Other."""\n\n'
        "    return x + 1\n"
    )
    assert source_fingerprint(pkg) == first
    (pkg / "a.py").write_text('"""Module."""\n\n\ndef f(x):\n    """Doc."""\n    return x + 2\n')
    assert source_fingerprint(pkg) != first
    (pkg / "a.py").write_text('"""Module."""\n\n\ndef f(x):\n    """Doc."""\n    return x + 1\n')
    (pkg / "b.py").write_text("")
    assert source_fingerprint(pkg) != first  # a new file counts


def test_truncated_results_json_names_file_and_backup(tmp_path, capsys):
    args = [
        "compare",
        "--strategies",
        "naive",
        "--seeds",
        "0",
        "--quick",
        "--epochs",
        "1",
        "--no-progress",
        "--out",
        str(tmp_path),
    ]
    assert main(args) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    text = (tmp_path / "results.json").read_text()
    (tmp_path / "results.json").write_text(text[: len(text) // 2])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "results.json") in err and "results.json.bak" in err and "runs" in err
    # the finished run is still in runs/: moving results.json away rebuilds it, nothing re-runs
    (tmp_path / "results.json").rename(tmp_path / "broken.json")
    assert main(args) == 0
    assert _metrics(json.loads((tmp_path / "results.json").read_text())) == _metrics(results)
    assert "1 finished run(s) reused" in capsys.readouterr().out


def test_corrupt_checkpoint_is_moved_aside_and_run_restarts(tmp_path):
    exp = default_experiment("split_digits")
    kw = dict(strategies=["naive"], seeds=[0], quick=True, epochs=1, progress=False)
    clean = run_experiment(exp, out=tmp_path / "clean", **kw)
    (tmp_path / "bad" / "checkpoints").mkdir(parents=True)
    ckpt = tmp_path / "bad" / "checkpoints" / "naive_seed0.pkl"
    ckpt.write_bytes(os.urandom(300))
    record = json.loads((tmp_path / "clean" / "runs" / "naive_seed0.json").read_text())
    (ckpt.parent / "naive_seed0.settings").write_text(record["fingerprint"] + "\n")
    with pytest.warns(UserWarning, match=f"checkpoint {ckpt} could not be read"):
        bad = run_experiment(exp, out=tmp_path / "bad", **kw)
    assert _metrics(bad) == _metrics(clean)
    assert ckpt.with_name(ckpt.name + ".corrupt").exists()


def test_progress_is_avalanches_interactive_logger_and_changes_no_number(tmp_path, capsys):
    from avalanche.logging import InteractiveLogger

    from avalanche_d2l.experiments.one_run import RunProgress

    exp = default_experiment("split_digits")
    kw = dict(strategies=["naive"], seeds=[0], quick=True, epochs=1)
    quiet = run_experiment(exp, out=tmp_path / "quiet", progress=False, **kw)
    capsys.readouterr()
    shown = run_experiment(exp, out=tmp_path / "shown", progress=True, **kw)
    err = capsys.readouterr().err
    assert "naive s0 exp 0" in err and "naive s0 exp 4" in err and "naive s0 eval" in err
    assert _metrics(shown) == _metrics(quiet)
    bar = pickle.loads(pickle.dumps(RunProgress("naive s0")))  # checkpoints pickle it
    assert isinstance(bar, InteractiveLogger) and bar.desc == "naive s0" and bar._pbar is None


def test_jobs_2_equals_jobs_1(tmp_path, restore_registry):
    # "script_replay" is registered here, as a user's script would: the spawned worker processes
    # must receive it (they only discover the package's own strategies)
    replay = registry.get_strategy("replay")
    registry.register_strategy("script_replay", replay.factory, keeps_buffer=True)
    base = default_experiment("split_digits")
    sections = {"naive": {}, "script_replay": {}}
    exp = type(base).from_dict({**base.to_dict(), "strategies": sections}, name=base.name)
    kw = dict(seeds=[0], quick=True, epochs=1, progress=False)
    one = run_experiment(exp, out=tmp_path / "one", jobs=1, **kw)
    two = run_experiment(exp, out=tmp_path / "two", jobs=2, **kw)
    assert _metrics(two) == _metrics(one)
    assert {r["strategy"] for r in two["runs"]} == {"naive", "script_replay"}

    registry.register_strategy("lambda_replay", lambda **k: replay.factory(**k), overwrite=True)
    exp = type(base).from_dict(
        {**base.to_dict(), "strategies": {"naive": {}, "lambda_replay": {}}}, name=base.name
    )
    with pytest.raises(ValueError, match="cannot be sent to a worker process.*jobs=1"):
        run_experiment(exp, out=tmp_path / "three", jobs=2, **kw)


def _kill_when(out: Path, ready, args: list[str]) -> None:
    """Start a comparison in a subprocess and SIGKILL it as soon as ``ready(out)`` holds."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "avalanche_d2l", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while not ready(out) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_sigkill_at_any_point_resumes_to_the_same_numbers(tmp_path, quick_run):
    """Killed mid-run (after a checkpoint) and between runs: the finished comparison equals the
    uninterrupted one (``quick_run``), and no finished run is lost."""
    out = tmp_path / "killed"
    args = [
        "compare",
        "--strategies",
        "naive,replay",
        "--seeds",
        "0",
        "--quick",
        "--epochs",
        "3",
        "--no-progress",
        "--out",
        str(out),
    ]
    _kill_when(out, lambda o: any((o / "checkpoints").glob("naive*.pkl")), args)
    assert not (out / "runs" / "naive_seed0.json").exists()
    _kill_when(out, lambda o: (o / "runs" / "naive_seed0.json").exists(), args)
    assert (out / "runs" / "naive_seed0.json").exists()
    assert main(args) == 0
    resumed = json.loads((out / "results.json").read_text())
    assert _metrics(resumed) == _metrics(json.loads((quick_run / "results.json").read_text()))


def test_a_checkpoint_made_with_other_settings_is_set_aside_not_resumed(
    tmp_path, quick_run, capsys
):
    """A run killed after a checkpoint, then asked for with other settings (here the learning
    rate; a changed default does the same): resuming would train on with the old settings and
    record the new ones. The checkpoint is set aside and the run starts again, so it equals the
    uninterrupted run of the new settings (``quick_run``)."""
    out = tmp_path / "changed"
    args = ["compare", "--strategies", "naive", "--seeds", "0", "--quick", "--epochs", "3"]
    args += ["--no-progress", "--out", str(out)]
    _kill_when(out, lambda o: any((o / "checkpoints").glob("naive*.pkl")), [*args, "--lr", "0.2"])
    assert (out / "checkpoints" / "naive_seed0.pkl").exists()
    assert not (out / "runs" / "naive_seed0.json").exists()
    capsys.readouterr()
    assert main(args) == 0
    said = capsys.readouterr().out
    assert "naive_seed0: its checkpoint was made with other settings" in said, said
    assert (out / "checkpoints" / "naive_seed0.pkl.other-settings").exists()
    again = json.loads((out / "results.json").read_text())
    reference = json.loads((quick_run / "results.json").read_text())
    assert _metrics(again) == [m for m in _metrics(reference) if m["strategy"] == "naive"]


def test_task_incremental_benchmark_is_refused():
    from avalanche.benchmarks import nc_benchmark

    from avalanche_d2l.experiments import check_class_incremental
    from avalanche_d2l.scenarios import split_digits

    bench = split_digits()
    x = torch.stack([bench.train_stream[0].dataset[i][0] for i in range(40)])
    y = torch.arange(4).repeat(10)
    from avalanche.benchmarks.utils import _make_taskaware_tensor_classification_dataset as mk

    ds = mk(x, y, task_labels=0)
    ti = nc_benchmark(ds, ds, n_experiences=2, task_labels=True, seed=0)
    with pytest.raises(ValueError, match="task-incremental"):
        check_class_incremental(ti)
    check_class_incremental(bench)


def test_registry_decorator_warns_on_overwrite_and_lists_metadata(restore_registry):
    @registry.register_strategy("tmp_naive", description="a test strategy")
    def tmp(**kw):
        return None

    assert registry.get_strategy("tmp_naive").description == "a test strategy"
    with pytest.warns(UserWarning, match="already registered"):
        registry.register_strategy("tmp_naive", tmp)
    info = registry.get_strategy("replay")
    assert info.keeps_buffer and info.config_type is None
    assert registry.get_strategy("der").make_config({"alpha": 0.3}).alpha == 0.3
    assert not registry.get_strategy("lwf").keeps_buffer


# Several processes: tests/test_distributed.py (torchrun, 2 processes). `accelerate launch --cpu
# --num_processes 2` starts one process on CPU (accelerate needs MPI for several CPU processes).
