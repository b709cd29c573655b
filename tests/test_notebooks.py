"""The reproduction notebooks run end to end (tiny settings) and show what they promise.

Each notebook is executed with ``nbclient`` from ``notebooks/`` as working directory, with the
``AVALANCHE_D2L_NB_*`` environment variables of its parameters cell set to a quick, one-seed, two-
strategy setting writing to ``tmp_path``. The kernel is a ``python3`` kernel spec written to a
temporary ``JUPYTER_PATH`` that starts this very interpreter, so the notebooks import the package
under test whatever kernel specs the machine has.

To keep the file fast, Genifer reads a short config through ``AVALANCHE_D2L_GENIFER_CONFIG``, and a
tiny random dreamer is saved where D2L's quick mode looks for its stand-in dreamer (in a private
``AVALANCHE_D2L_CACHE``), so the stand-in is not pretrained here: its pretraining is tested in
``test_dreamer.py``; this file checks the notebooks.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
CELL_TIMEOUT_S = 600


def _stand_in_name() -> str:
    """Cache folder where ``build_d2l``'s quick mode looks for its stand-in dreamer (16 px)."""
    from avalanche_d2l.dreaming.pretrain import _cache_name
    from avalanche_d2l.strategies.d2l import QUICK_DREAMER_STEPS

    return _cache_name(16, QUICK_DREAMER_STEPS, 0)


STAND_IN = _stand_in_name()


@pytest.fixture(scope="module")
def kernel_env(tmp_path_factory):
    """Environment of the notebook kernels: kernel spec, package path, caches, tiny configs."""
    from tiny_models import tiny_pixel_dreamer

    from avalanche_d2l.strategies.genifer import GeniferConfig

    base = tmp_path_factory.mktemp("notebook_env")
    # 1. a "python3" kernel spec that runs this interpreter (first on JUPYTER_PATH)
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
    # 2. the dreamer cache: a tiny random pixel dreamer where quick mode finds its stand-in
    cache = base / "cache"
    dreamer = tiny_pixel_dreamer(output_size=16)
    dreamer.save_pretrained(cache / STAND_IN)
    # 3. a short Genifer config
    genifer_cfg = base / "genifer_tiny.json"
    GeniferConfig(gan_steps_first=10, gan_steps=10, gan_batch_size=16, progress=False).to_json(
        genifer_cfg
    )
    return {
        "JUPYTER_PATH": _prepend(base / "jupyter", "JUPYTER_PATH"),
        "PYTHONPATH": _prepend(ROOT, "PYTHONPATH"),
        "AVALANCHE_D2L_CACHE": str(cache),
        "AVALANCHE_D2L_GENIFER_CONFIG": str(genifer_cfg),
        "TQDM_DISABLE": "1",
        "AVALANCHE_D2L_NB_QUICK": "1",
        "AVALANCHE_D2L_NB_SEEDS": "0",
        "AVALANCHE_D2L_NB_EPOCHS": "1",
    }


def _prepend(path: Path, var: str) -> str:
    rest = os.environ.get(var, "")
    return str(path) + (os.pathsep + rest if rest else "")


def execute(name: str, env: dict[str, str], *, extra_cells: tuple[str, ...] = ()):
    """Run ``notebooks/<name>.ipynb`` (plus ``extra_cells``) with ``env``; return the notebook."""
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nb.cells.extend(nbformat.v4.new_code_cell(src) for src in extra_cells)
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        client = nbclient.NotebookClient(
            nb,
            kernel_name="python3",
            timeout=CELL_TIMEOUT_S,
            resources={"metadata": {"path": str(NOTEBOOKS)}},
        )
        client.execute()
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
    assert not [
        o
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if o["output_type"] == "error"
    ]
    results = json.loads((out / "results.json").read_text())
    assert sorted((r["strategy"], r["seed"]) for r in results["runs"]) == sorted(
        (s, 0) for s in strategies
    )
    assert results["config"]["quick"] is True and results["config"]["epochs"] == 1
    table = "".join(outputs(tagged(nb, "results-table"), "text/markdown"))
    assert table == (out / "results.md").read_text()
    for s in strategies:
        assert f"| {s} |" in table
    assert outputs(tagged(nb, "accuracy-plot"), "image/png")


def test_genifer_notebook_runs_and_shows_table_plot_and_replay_grid(kernel_env, tmp_path):
    out = tmp_path / "genifer"
    env = {
        **kernel_env,
        "AVALANCHE_D2L_NB_OUT": str(out),
        "AVALANCHE_D2L_NB_STRATEGIES": "genifer,naive",
    }
    nb = execute("genifer", env, extra_cells=("import sys; print(sys.executable)",))
    # the kernel is this interpreter
    assert os.path.realpath(stream_text(nb.cells[-1]).strip()) == os.path.realpath(sys.executable)
    check_common(nb, out, ["genifer", "naive"])
    # the Genifer run behind the grid: all 10 classes generated, 10 GAN steps per phase
    saved = torch.load(out / "genifer_replay_grid.pt", weights_only=False)
    assert saved["classes"] == list(range(10))
    assert saved["grid"].shape == (10 * 8, 1, 16, 16)
    assert [h["steps"] for h in saved["history"]] == [10] * 5
    assert "GAN phases" in "".join(outputs(tagged(nb, "genifer-run"), "text/markdown"))
    assert outputs(tagged(nb, "replay-grid"), "image/png")
    assert (out / "genifer_replay_grid.png").stat().st_size > 1000


@pytest.mark.slow
def test_genifer_notebook_executed_again_reads_results_and_reuses_samples(kernel_env, tmp_path):
    out = tmp_path / "genifer"
    env = {
        **kernel_env,
        "AVALANCHE_D2L_NB_OUT": str(out),
        "AVALANCHE_D2L_NB_STRATEGIES": "genifer,naive",
    }
    execute("genifer", env)
    results = (out / "results.json").read_text()
    mtime = (out / "genifer_replay_grid.pt").stat().st_mtime_ns
    nb = execute("genifer", env)
    assert "reusing the samples" in stream_text(tagged(nb, "genifer-run"))
    assert (out / "genifer_replay_grid.pt").stat().st_mtime_ns == mtime
    assert json.loads((out / "results.json").read_text()) == json.loads(results)
    assert outputs(tagged(nb, "replay-grid"), "image/png")


def test_d2l_notebook_runs_and_shows_table_fwt_and_dream_grid(kernel_env, tmp_path):
    out = tmp_path / "d2l"
    env = {
        **kernel_env,
        "AVALANCHE_D2L_NB_OUT": str(out),
        "AVALANCHE_D2L_NB_STRATEGIES": "d2l,replay",
    }
    nb = execute("d2l", env)
    check_common(nb, out, ["d2l", "replay"])
    assert outputs(tagged(nb, "fwt-plot"), "image/png")
    assert (out / "forward_transfer.png").stat().st_size > 1000
    # dream sets of the comparison's D2L run: one per experience but the last
    dream_files = sorted((out / "work" / "d2l_seed0" / "dreams").glob("dreams_exp*.pt"))
    assert [p.name for p in dream_files] == [f"dreams_exp{k}.pt" for k in range(4)]
    grid_cell = tagged(nb, "dream-grid")
    summary = "".join(outputs(grid_cell, "text/markdown"))
    assert summary.count("\n| ") == 4 + 1  # header + one row per dream set
    assert outputs(grid_cell, "image/png")
    assert (out / "d2l_dreams_seed0.png").stat().st_size > 1000
    # the planted stand-in dreamer was used: nothing was pretrained into the cache
    cache = Path(kernel_env["AVALANCHE_D2L_CACHE"])
    assert [p.name for p in cache.iterdir()] == [STAND_IN], (
        "D2L's quick mode did not find the planted stand-in dreamer and pretrained one "
        "(slow): update STAND_IN to where build_d2l now looks"
    )
