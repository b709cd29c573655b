import json

import pytest

from avalanche_d2l import registry
from avalanche_d2l.cli import main, run_compare

EXPECTED_RUN_KEYS = {
    "strategy", "seed", "final_accuracy", "avg_incremental_accuracy", "forgetting", "bwt",
    "forward_transfer", "accuracy_matrix", "wall_s", "peak_rss_mb",
}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cmp")
    code = main(["compare", "--strategies", "naive,replay", "--seeds", "0", "--out", str(out),
                 "--quick", "--epochs", "4", "--no-progress"])
    assert code == 0
    return out


def test_compare_writes_results_and_replay_beats_naive(quick_run):
    results = json.loads((quick_run / "results.json").read_text())
    runs = {r["strategy"]: r for r in results["runs"]}
    assert set(runs) == {"naive", "replay"}
    for r in runs.values():
        assert EXPECTED_RUN_KEYS <= set(r)
        assert len(r["accuracy_matrix"]) == 5 and all(len(row) == 5 for row in r["accuracy_matrix"])
        assert r["peak_rss_mb"] > 0 and r["wall_s"] > 0
    assert runs["replay"]["final_accuracy"] > runs["naive"]["final_accuracy"] + 0.1
    assert runs["replay"]["forgetting"] < runs["naive"]["forgetting"]
    # Naive forgets all but the last experience: the first row's diagonal is lost at the end.
    naive = runs["naive"]["accuracy_matrix"]
    assert naive[0][0] > 0.5 and naive[-1][0] < 0.2
    md = (quick_run / "results.md").read_text()
    assert "| naive |" in md and "| replay |" in md
    assert (quick_run / "accuracy.png").stat().st_size > 1000
    assert results["config"]["epochs"] == 4 and results["config"]["quick"] is True


def test_rerun_skips_finished_runs(quick_run):
    before = json.loads((quick_run / "results.json").read_text())
    results = run_compare("split_digits", "naive,replay", [0], quick_run, epochs=4, quick=True,
                          progress=False)
    assert results["runs"] == before["runs"]


def test_rerun_with_other_settings_is_refused(quick_run):
    with pytest.raises(ValueError, match="different settings"):
        run_compare("split_digits", "naive", [0], quick_run, epochs=3, quick=True,
                    progress=False)


class _CrashOnce:
    """Raises at the start of experience 2 while `armed`: a run killed midway."""

    armed = True

    def before_training_exp(self, strategy, **kwargs):
        if _CrashOnce.armed and strategy.experience.current_experience == 2:
            raise KeyboardInterrupt("simulated kill")


def _crashing_naive(*, plugins=None, **kw):
    return registry.get_strategy_factory("naive")(plugins=list(plugins or []) + [_CrashOnce()],
                                                  **kw)


def test_killed_run_resumes_from_checkpoint(tmp_path):
    registry.register_strategy("crash_naive", _crashing_naive, overwrite=True)
    with pytest.raises(KeyboardInterrupt):
        run_compare("split_digits", "crash_naive", [0], tmp_path, quick=True, progress=False)
    ckpt = tmp_path / "checkpoints" / "crash_naive_seed0.pkl"
    assert ckpt.exists()
    _CrashOnce.armed = False
    trained = []

    class Spy:
        def before_training_exp(self, strategy, **kwargs):
            trained.append(strategy.experience.current_experience)

    registry.register_strategy(
        "crash_naive", lambda *, plugins=None, **kw: _crashing_naive(
            plugins=list(plugins or []) + [Spy()], **kw), overwrite=True)
    results = run_compare("split_digits", "crash_naive", [0], tmp_path, quick=True,
                          progress=False)
    # the checkpoint restores the plugins saved with the strategy (no Spy): nothing recorded
    # means experiences 0 and 1 were not trained again by a fresh strategy
    assert 0 not in trained and 1 not in trained
    (run,) = results["runs"]
    assert len(run["accuracy_matrix"]) == 5
    assert not ckpt.exists()


def test_unknown_strategy_lists_valid_names(tmp_path, capsys):
    code = main(["compare", "--strategies", "naive,bogus", "--out", str(tmp_path)])
    assert code == 2
    err = capsys.readouterr().err
    assert "'bogus'" in err and "replay" in err and "genifer" in err and "d2l" in err


def test_unknown_benchmark_is_clear(tmp_path):
    with pytest.raises(ValueError, match="unknown benchmark 'mnist'.*split_digits"):
        run_compare("mnist", "naive", [0], tmp_path)


def test_registry_warns_on_overwrite():
    registry.register_strategy("tmp_naive", registry.get_strategy_factory("naive"))
    with pytest.warns(UserWarning, match="already registered"):
        registry.register_strategy("tmp_naive", registry.get_strategy_factory("naive"))
