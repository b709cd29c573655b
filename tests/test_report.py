"""Figures and tables a paper can use, from a small hand-made ``results.json``: PNG, PDF and SVG
of each figure, integer experience ticks, seeds as bands, legends beside the lines rather than on
them, one colour per method whatever the report, and no ``±`` for a single run."""

import json

import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_hex

from avalanche_d2l.experiments.report import (
    _accuracy_figure,
    _rows,
    _summary_figure,
    main,
    method_style,
    results_table,
    write_report,
)


def _run(strategy: str, seed: int, mem: int | None, final: float) -> dict:
    curve = [1.0, 0.5 + final / 2, final]
    return {
        "strategy": strategy,
        "seed": seed,
        "mem_size": mem,
        "final_accuracy": final,
        "forward_transfer": 0.05 * seed,
        "avg_incremental_accuracy": sum(curve) / 3,
        "forgetting": 1 - final,
        "bwt": final - 1,
        "seen_accuracy": curve,
        "lab_avg_accuracy": [v - 0.01 for v in curve],
        "lab_final_accuracy": final - 0.01,
        "lab_forward_transfer": 0.04 * seed,
        "wall_s": 1.5 + seed,
    }


def _results(strategies: list[tuple[str, int | None]], seeds: list[int]) -> dict:
    runs = [
        _run(name, seed, mem, final=0.3 + 0.1 * i + 0.02 * seed)
        for seed in seeds
        for i, (name, mem) in enumerate(strategies)
    ]
    experiment = {
        "benchmark": {"name": "toy"},
        "model": {"name": "small_cnn"},
        "training": {"first_experience": None, "optimizer": {"epochs": 2}},
    }
    return {"experiment": experiment, "runs": runs}


MAIN = [("naive", None), ("der", 20), ("replay", 20), ("der_d2l", 20), ("genifer", None)]


def test_report_writes_every_figure_as_png_pdf_and_svg(tmp_path):
    write_report(_results(MAIN, [0, 1]), tmp_path)
    magic = {"png": b"\x89PNG", "pdf": b"%PDF", "svg": b"<?xml"}
    for name in ("accuracy", "summary"):
        for fmt, head in magic.items():
            data = (tmp_path / f"{name}.{fmt}").read_bytes()
            assert data.startswith(head) and len(data) > 5000, (name, fmt)
    svg = (tmp_path / "accuracy.svg").read_text()
    assert "der_d2l (mem 20)" in svg  # text stays text in the SVG (editable in a paper)
    # no dates inside: an unchanged report gives unchanged files
    before = {p.name: p.read_bytes() for p in tmp_path.glob("*.*")}
    write_report(_results(MAIN, [0, 1]), tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.glob("*.*")} == before


def test_one_seed_table_has_no_plus_minus_and_several_seeds_do():
    one = results_table(_results(MAIN, [0]))
    assert "±" not in one and "| der (mem 20) | 0.390 |" in one
    several = results_table(_results(MAIN, [0, 1]))
    assert "| der (mem 20) | 0.400 ± 0.014 |" in several


def test_columns_no_run_records_are_left_out():
    results = _results(MAIN, [0])
    for run in results["runs"]:
        del run["lab_final_accuracy"], run["lab_forward_transfer"]
    table = results_table(results)
    assert "(lab)" not in table.splitlines()[2] and "Final acc. (masked)" in table


def _line_colours(fig) -> dict[str, str]:
    return {
        line.get_label(): to_hex(line.get_color())
        for ax in fig.axes
        for line in ax.get_lines()
        if not line.get_label().startswith("_")
    }


def test_a_method_has_one_colour_in_every_figure():
    a = _accuracy_figure(_rows(_results(MAIN, [0, 1])), "a")
    other = [("der", 20), ("ewc", None), ("er_ace_d2l", 20), ("naive", None)]
    b = _accuracy_figure(_rows(_results(other, [0])), "b")
    ca, cb = _line_colours(a), _line_colours(b)
    assert ca["der (mem 20)"] == cb["der (mem 20)"] and ca["naive"] == cb["naive"]
    assert len(set(ca.values())) == len(ca) - 1  # der and der_d2l share a hue, styles differ
    assert method_style("der")["linestyle"] != method_style("der_d2l")["linestyle"]
    # the summary's bars take the same colours
    rows = _rows(_results(MAIN, [0, 1]))
    bars = _summary_figure(rows, "a").axes[0].patches
    assert [to_hex(p.get_facecolor()[:3]) for p in bars] == [ca[label] for label, _ in rows]


def test_accuracy_figure_panels_ticks_bands_and_legends():
    fig = _accuracy_figure(_rows(_results(MAIN, [0, 1, 2])), "toy")
    FigureCanvasAgg(fig).draw()
    data_axes = [ax for ax in fig.axes if ax.get_lines()]
    # one column per group (no buffer, rehearsal, + D2L) x two protocols (lab, masked)
    assert len(data_axes) == 6
    assert sorted({ax.get_title() for ax in data_axes} - {""}) == [
        "+ D2L",
        "no buffer",
        "rehearsal",
    ]
    for ax in data_axes:
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks == [1, 2, 3]
        assert len(ax.collections) == len(ax.get_lines())  # one band (seeds) per line
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    assert len(legends) == 3
    renderer = fig.canvas.get_renderer()
    for legend in legends:
        box = legend.get_window_extent(renderer)
        assert not any(box.overlaps(ax.get_window_extent(renderer)) for ax in data_axes)
    one_seed = _accuracy_figure(_rows(_results(MAIN, [0])), "toy")
    assert not any(ax.collections for ax in one_seed.axes)  # no band for one seed


def test_redraw_from_results_json_without_training(tmp_path, capsys):
    (tmp_path / "results.json").write_text(json.dumps(_results(MAIN, [0])))
    (tmp_path / "results.md").write_text("kept")
    assert main([str(tmp_path), "--figures-only"]) == 0
    assert (tmp_path / "results.md").read_text() == "kept"
    assert (tmp_path / "summary.svg").is_file() and (tmp_path / "accuracy.pdf").is_file()
    assert main([str(tmp_path)]) == 0
    assert "| naive | 0.290 |" in (tmp_path / "results.md").read_text()
    assert main([str(tmp_path / "missing")]) == 2
    assert "give a folder `compare` wrote" in capsys.readouterr().err


def test_variants_and_user_strategies_keep_their_colour_whatever_the_report():
    a = _line_colours(
        _accuracy_figure(_rows(_results([("d2l_noise", 5), ("my_method", None)], [0])), "a")
    )
    b = _line_colours(
        _accuracy_figure(
            _rows(_results([("my_method", None), ("naive", None), ("d2l_noise", 5)], [0])), "b"
        )
    )
    assert a["d2l_noise (mem 5)"] == b["d2l_noise (mem 5)"] and a["my_method"] == b["my_method"]
    assert method_style("der@user_cnn") == method_style("der")  # a model variant of a method


def test_report_subcommand_of_the_installed_command_line(tmp_path, capsys):
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "results.json").write_text(json.dumps(_results(MAIN, [0, 1])))
    exe = Path(sys.executable).with_name("avalanche-d2l")
    done = subprocess.run([str(exe), "report", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "| naive |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "accuracy.svg").is_file() and (tmp_path / "summary.png").is_file()
    # a wrong folder and the help, through the same command-line code in this process (each
    # start of the installed command costs about 10 s of imports)
    from avalanche_d2l.cli import main as cli_main

    assert cli_main(["report", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert "give a folder `compare` wrote" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        cli_main(["--help"])
    assert "report" in capsys.readouterr().out
