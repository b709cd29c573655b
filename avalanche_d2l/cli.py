"""Command line (argument parsing only; the work is done by :mod:`avalanche_d2l.experiments`).

* ``avalanche-d2l compare --benchmark NAME --strategies a,b,...``: registered strategies on one
  benchmark with the same model, optimiser and epochs, several seeds.
* ``avalanche-d2l run EXPERIMENT``: a shipped experiment (``--list``) or an experiment file.
* ``avalanche-d2l pretrain-dreamer``: pretrain the offline glyph dreamer of D2L.

Both ``compare`` and ``run`` write ``results.json`` (every run, with the resolved settings that
made it), ``results.md`` (mean ± std over seeds), ``accuracy.png`` and ``summary.png``, checkpoint
every run after each experience, and resume when run again into the same ``--out``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["main"]

DEFAULT_STRATEGIES = "naive,lwf,ewc,replay,der,er_ace,generative_replay,cumulative"


def _strategy_list(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",")]
    if not any(names):
        raise argparse.ArgumentTypeError("give at least one strategy name")
    if not all(names):
        raise argparse.ArgumentTypeError(f"empty name in {text!r}; separate names by one comma")
    return names


def _add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", default=None, help="the dataset's folder (paper benchmarks)")
    p.add_argument(
        "--strategies",
        type=_strategy_list,
        default=None,
        help="comma-separated strategy names (see --help of compare for the list)",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=None)
    p.add_argument("--epochs", type=int, default=None, help="epochs per experience")
    p.add_argument(
        "--mem-size",
        dest="mem_sizes",
        type=int,
        nargs="+",
        default=None,
        help="buffer size(s) of the rehearsal strategies",
    )
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N")
    p.add_argument(
        "--dreamer",
        metavar="PATH_OR_ID",
        default=None,
        help="D2L's dreamer (a local folder or a Hugging Face hub id) for every strategy of the "
        "command that has one (default: the experiment's)",
    )
    p.add_argument(
        "--dreamer-device", default=None, help="device of D2L's frozen dreamer (default: --device)"
    )
    p.add_argument(
        "--precision",
        choices=("no", "bf16", "fp16"),
        default=None,
        help="mixed precision of the generative parts",
    )
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="independent runs at once, one process each (e.g. the number of cores)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads per run (default 1: fastest for the small models)",
    )
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers")
    p.add_argument(
        "--max-experiences",
        type=int,
        default=None,
        help="train only the first K experiences (smoke test on real data)",
    )
    p.add_argument("--quick", action="store_true", help="tiny settings for smoke tests")
    p.add_argument(
        "--check-data",
        action="store_true",
        help="decode every image once before training; list unreadable files",
    )
    p.add_argument("--no-progress", action="store_true")


def _parser() -> argparse.ArgumentParser:
    from avalanche_d2l.experiments import BENCHMARKS
    from avalanche_d2l.registry import get_strategy, strategy_names

    # no abbreviations: `--dreamer` must never be read as `--dreamer-device`
    parser = argparse.ArgumentParser(
        prog="avalanche-d2l", description=__doc__.split("\n")[0], allow_abbrev=False
    )
    sub = parser.add_subparsers(dest="command", required=True)
    listing = "\n".join(f"  {n:<18} {get_strategy(n).description}" for n in strategy_names())
    cmp_ = sub.add_parser(
        "compare",
        help="compare strategies on a benchmark",
        allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="strategies:\n"
        + listing
        + "\nbenchmarks:\n"
        + "\n".join(f"  {n:<20} {b.description}" for n, b in BENCHMARKS.items()),
    )
    cmp_.add_argument(
        "--benchmark",
        default="split_digits",
        choices=list(BENCHMARKS),
        metavar="NAME",
        help=f"one of: {', '.join(BENCHMARKS)}",
    )
    cmp_.add_argument(
        "--out",
        default=None,
        help="output folder (default results/BENCHMARK; resumes if it exists)",
    )
    _add_run_options(cmp_)
    run = sub.add_parser(
        "run", help="run an experiment file or a shipped experiment", allow_abbrev=False
    )
    run.add_argument("experiment", nargs="?", help="a shipped experiment's name or a JSON file")
    run.add_argument("--list", action="store_true", help="list the shipped experiments")
    run.add_argument("--out", default=None, help="output folder (default results/EXPERIMENT)")
    run.add_argument(
        "--dry-run",
        action="store_true",
        help="build everything, time one training step and one dreaming "
        "micro-batch, print the estimates; no training",
    )
    _add_run_options(run)
    sub.add_parser(
        "pretrain-dreamer",
        add_help=False,
        help="pretrain the offline glyph dreamer used by D2L on CPU",
    )
    return parser


def _run_kwargs(args) -> dict:
    return dict(
        data_root=args.data_root,
        strategies=args.strategies,
        seeds=args.seeds,
        mem_sizes=args.mem_sizes,
        epochs=args.epochs,
        device=args.device,
        precision=args.precision,
        dreamer_device=args.dreamer_device,
        dreamer=args.dreamer,
        quick=args.quick,
        max_experiences=args.max_experiences,
        progress=not args.no_progress,
        threads=args.threads,
        jobs=args.jobs,
        num_workers=args.num_workers,
        check_images=args.check_data,
    )


def _dry_run_experiment(exp, args):
    """``exp`` with the overrides that ``run`` applies and ``dry_run`` does not take itself:
    ``--dreamer`` (every strategy of the command that has a dreamer), ``--dreamer-device`` and
    ``--precision``, checked as ``run`` checks them."""
    import dataclasses

    from avalanche_d2l.experiments.runner import check_device, with_dreamer
    from avalanche_d2l.experiments.schema import resolve_name

    if args.dreamer is not None:
        names = [resolve_name(s) for s in (args.strategies or exp.strategies)]
        exp = with_dreamer(exp, args.dreamer, names)
    if args.precision is not None:
        exp = dataclasses.replace(exp, precision=args.precision)
    if args.dreamer_device is not None:
        exp = dataclasses.replace(exp, dreamer_device=check_device(args.dreamer_device))
    return exp


def _main(args) -> int:
    from avalanche_d2l import experiments as ex

    if args.command == "run" and args.list:
        for name, description in ex.list_experiments():
            print(f"{name:<22} {description}")
        return 0
    if args.command == "run":
        if not args.experiment:
            raise ValueError("name an experiment (avalanche-d2l run --list) or a JSON file")
        exp = ex.load_experiment(args.experiment)
        if args.dry_run:
            ex.dry_run(
                _dry_run_experiment(exp, args),
                data_root=args.data_root,
                strategies=args.strategies,
                seeds=args.seeds,
                device=args.device,
                quick=args.quick,
            )
            return 0
        out = Path(args.out or Path("results") / exp.name)
    else:
        exp = ex.default_experiment(args.benchmark)
        if args.strategies is None:
            args.strategies = DEFAULT_STRATEGIES.split(",")
        out = Path(args.out or Path("results") / args.benchmark)
    results = ex.run_experiment(exp, out=out, **_run_kwargs(args))
    print((out / "results.md").read_text())
    print(
        f"wrote {out}/results.json, results.md, accuracy.png, summary.png "
        f"({len(results['runs'])} runs)"
    )
    return 0


def _one_sentence(err: BaseException) -> str:
    """The error's own sentence; for an error raised in a ``DataLoader`` worker (which torch
    re-raises with the worker's whole traceback in the message) its last line only."""
    text = str(err)
    if "Original Traceback" in text:
        lines = [line for line in text.splitlines() if line.strip()]
        last = lines[-1]
        return last.split(": ", 1)[1] if last.startswith(type(err).__name__ + ": ") else last
    return text


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["pretrain-dreamer"]:
        from avalanche_d2l.dreaming.pretrain import main as pretrain_main

        return pretrain_main(argv[1:])
    args = _parser().parse_args(argv)
    try:
        return _main(args)
    except (ValueError, OSError) as err:
        print(f"avalanche-d2l: error: {_one_sentence(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:  # Ctrl-C: one line, the conventional exit status 130
        print(
            f"avalanche-d2l: {err or 'interrupted; run the same command to resume'}",
            file=sys.stderr,
        )
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
