"""The reproduction notebooks run end to end (tiny settings) and show what they promise.

Each notebook is executed with ``nbclient`` from ``notebooks/`` as working directory, with the
``AVALANCHE_D2L_NB_*`` environment variables of its parameters cell set to a quick, one-seed,
two-strategy setting writing to ``tmp_path``. The kernel is a ``python3`` kernel spec written to a
temporary ``JUPYTER_PATH`` that starts this very interpreter, so the notebooks import the package
under test whatever kernel specs the machine has.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
CELL_TIMEOUT_S = 600


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    base = tmp_path_factory.mktemp("notebook_env")
    spec_dir = base / "jupyter" / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
                "display_name": "Python 3 (test)",
                "language": "python",
            }
        )
    )
    rest = os.environ.get("JUPYTER_PATH", "")
    return {
        "JUPYTER_PATH": str(base / "jupyter") + (os.pathsep + rest if rest else ""),
        "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "TQDM_DISABLE": "1",
        "AVALANCHE_D2L_NB_QUICK": "1",
        "AVALANCHE_D2L_NB_SEEDS": "0",
        "AVALANCHE_D2L_NB_EPOCHS": "1",
    }


def execute(name: str, env: dict[str, str]):
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        nbclient.NotebookClient(
            nb,
            kernel_name="python3",
            timeout=CELL_TIMEOUT_S,
            resources={"metadata": {"path": str(NOTEBOOKS)}},
        ).execute()
    return nb


def tagged(nb, tag: str):
    cells = [c for c in nb.cells if tag in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"expected one cell tagged {tag!r}, found {len(cells)}"
    return cells[0]


def outputs(cell, mime: str) -> list:
    return [o["data"][mime] for o in cell.outputs if mime in o.get("data", {})]


def stream_text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o["output_type"] == "stream")


def check_common(nb, out: Path, strategies: list[str]) -> None:
    errors = [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if o["output_type"] == "error"
    ]
    assert not errors, errors
    results = json.loads((out / "results.json").read_text())
    assert sorted((r["strategy"], r["seed"]) for r in results["runs"]) == sorted(
        (s, 0) for s in strategies
    )
    run = results["runs"][0]
    assert run["settings"]["quick"] is True
    assert run["settings"]["experiment"]["training"]["optimizer"]["epochs"] == 1
    table = "".join(outputs(tagged(nb, "results-table"), "text/markdown"))
    assert table == (out / "results.md").read_text()
    assert len(outputs(tagged(nb, "accuracy-plot"), "image/png")) == 2


@pytest.mark.slow  # executes the notebook twice (about a minute); its committed outputs below
def test_genifer_notebook_shows_table_plots_and_replay_grid(kernel_env, tmp_path):
    out = tmp_path / "genifer"
    env = {
        **kernel_env,
        "AVALANCHE_D2L_NB_OUT": str(out),
        "AVALANCHE_D2L_NB_STRATEGIES": "genifer,naive",
    }
    nb = execute("genifer", env)
    check_common(nb, out, ["genifer", "naive"])
    grid = tagged(nb, "replay-grid")
    assert "trained a Genifer run" in stream_text(grid)
    assert outputs(grid, "image/png") and (out / "genifer_replay_grid.png").stat().st_size > 1000
    # executed again: the comparison and the grid are read, nothing is trained
    mtime = (out / "runs" / "genifer_seed0.json").stat().st_mtime_ns
    nb = execute("genifer", env)
    assert "reused the saved samples" in stream_text(tagged(nb, "replay-grid"))
    assert (out / "runs" / "genifer_seed0.json").stat().st_mtime_ns == mtime


def clean_outputs(nb, *forbidden: str) -> None:
    """No warning and none of the ``forbidden`` strings (absolute paths) in any output."""
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            text = json.dumps(o.get("text", "")) + json.dumps(
                o.get("data", {}).get("text/plain", "")
            )
            assert "Warning" not in text, (cell.source[:60], text[:300])
            for bad in forbidden:
                assert bad not in text, (cell.source[:60], bad, text[:300])


@pytest.mark.parametrize(
    ("name", "shown"),
    [
        ("d2l", ("results-table", "fwt-plot", "control-table", "dream-grid")),
        ("genifer", ("results-table", "accuracy-plot", "replay-grid")),
    ],
)
def test_committed_notebook_shows_its_outputs_without_warning_or_absolute_path(name, shown):
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    for tag in shown:  # what the notebook promises, its committed outputs show
        assert tagged(nb, tag).get("outputs"), f"{name}.ipynb: no committed output for {tag}"
    clean_outputs(nb, str(ROOT), "site-packages", os.path.expanduser("~") + os.sep)


@pytest.mark.slow  # executes the notebook (one to two minutes); its committed outputs above
def test_d2l_notebook_shows_table_controls_fwt_and_dreams_from_the_stream(kernel_env, tmp_path):
    import torch

    from avalanche_d2l.scenarios import split_digits

    out = tmp_path / "d2l"
    env = {
        **kernel_env,
        "AVALANCHE_D2L_NB_OUT": str(out),
        "AVALANCHE_D2L_NB_STRATEGIES": "d2l,replay",
    }
    ablation = ROOT / "benchmarks" / "results" / "d2l_ablation" / "split_digits" / "results.json"
    before = ablation.read_bytes()
    nb = execute("d2l", env)
    check_common(nb, out, ["d2l", "replay"])
    assert ablation.read_bytes() == before  # the records are copied from it, it is not rewritten
    assert (out / "runs" / "d2l_unanchored_seed0_mem100.json").is_file()
    clean_outputs(nb, str(ROOT), "site-packages")  # OUT (tmp_path) is shown as a parameter
    assert outputs(tagged(nb, "fwt-plot"), "image/png")
    controls = "".join(outputs(tagged(nb, "control-table"), "text/markdown"))
    assert "d2l_unanchored" in controls and "Targets" in controls
    grid = tagged(nb, "dream-grid")
    assert outputs(grid, "image/png") and (out / "d2l_dreams.png").stat().st_size > 1000
    # each dream head is shown beside real training images of the class it grew from, a class
    # learned by then; its dreams are new images, not those buffer images
    rows = torch.load(out / "d2l_dreams.pt", weights_only=False)["value"]
    bench = split_digits(n_experiences=5, image_size=16, seed=0)
    train = [torch.stack([x for x, *_ in e.dataset]) for e in bench.train_stream]
    labels = [torch.tensor([int(y) for _, y, *_ in e.dataset]) for e in bench.train_stream]
    assert sorted(rows) == list(range(len(bench.train_stream) - 1))
    for k, row in rows.items():
        seen = set().union(
            *(bench.train_stream[j].classes_in_this_experience for j in range(k + 1))
        )
        assert row["dreams"] and len(row["sources"]) == len(row["dreams"])
        for c, sources, dreams in zip(row["source_classes"], row["sources"], row["dreams"]):
            assert c in seen
            pool = torch.cat([x[y == c] for x, y in zip(train, labels)]).flatten(1)
            gap = torch.cdist(sources.flatten(1), pool).min(1).values
            assert gap.max() < 0.1, f"experience {k}: a source image is not an image of class {c}"
            assert torch.cdist(dreams.flatten(1), sources.flatten(1)).min() > 0.1


def test_a_notebook_section_changes_one_setting_of_a_part_and_keeps_the_others():
    from avalanche_d2l.experiments import load_experiment
    from avalanche_d2l.experiments.notebook import with_section

    exp = load_experiment("genifer_cifar100")
    before = exp.strategies["genifer"]["gan"]
    assert len(before) > 1
    changed = with_section(exp, "genifer", {"gan": {"steps": 3}})
    assert changed.strategies["genifer"]["gan"] == {**before, "steps": 3}
    assert exp.strategies["genifer"]["gan"] == before  # the file's experiment is unchanged


def test_reused_run_records_are_read_and_their_folder_is_left_as_it_is(tmp_path):
    from avalanche_d2l.experiments import default_experiment, run_experiment
    from avalanche_d2l.experiments.notebook import reuse_runs

    exp = default_experiment("split_digits")
    kw = dict(strategies=["naive"], seeds=[0], quick=True, epochs=1, progress=False)
    first = run_experiment(exp, out=tmp_path / "a", **kw)
    before = (tmp_path / "a" / "results.json").read_bytes()
    assert reuse_runs(tmp_path / "a", tmp_path / "b") == 1
    assert reuse_runs(tmp_path / "a", tmp_path / "b") == 0  # what is there stays
    lines = []
    again = run_experiment(exp, out=tmp_path / "b", log=lines.append, **kw)
    assert any("1 finished run(s) reused" in line for line in lines)
    assert again["runs"] == first["runs"]
    assert (tmp_path / "a" / "results.json").read_bytes() == before
