"""Command line (argument parsing only; the work is done by :mod:`avalanche_d2l.experiments`).

* ``avalanche-d2l compare --benchmark NAME --strategies a,b,...``: registered strategies on one
  benchmark with the same model, optimiser and epochs, several seeds.
* ``avalanche-d2l run EXPERIMENT``: a shipped experiment (``--list``) or an experiment file.
* ``avalanche-d2l pretrain-dreamer``: pretrain the offline glyph dreamer of D2L.

Both ``compare`` and ``run`` write ``results.json`` (every run, with the resolved settings that
made it), ``results.md`` (mean ± std over seeds), ``accuracy.png`` and ``summary.png``, checkpoint
every run after each experience, and resume when run again into the same ``--out``. Any setting of
the experiment can be changed with ``--set key.path=value`` (checked as the file's own values are);
``--lr``, ``--batch-size``, ``--model``, ``--n-experiences`` are short forms of ``--set`` paths;
``--show`` prints the experiment that would run.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["entry", "main"]

DEFAULT_STRATEGIES = "naive,lwf,ewc,replay,der,er_ace,generative_replay,cumulative"


def _strategy_list(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",")]
    if not any(names):
        raise argparse.ArgumentTypeError("give at least one strategy name")
    if not all(names):
        raise argparse.ArgumentTypeError(f"empty name in {text!r}; separate names by one comma")
    return names


#: Short options -> the experiment path they set (Mammoth's names).
SHORTCUTS = {
    "lr": "training.optimizer.lr",
    "batch_size": "training.train_mb_size",
    "model": "model.name",
    "n_experiences": "benchmark.n_experiences",
}


def _assignment(text: str):
    from avalanche_d2l.experiments.schema import parse_assignment

    try:
        return parse_assignment(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _add_setting_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("experiment settings (applied before the experiment is checked)")
    g.add_argument(
        "--set",
        dest="assignments",
        metavar="KEY.PATH=VALUE",
        type=_assignment,
        action="append",
        default=[],
        help="set any field of the experiment, e.g. training.optimizer.lr=0.01, "
        "strategies.d2l.dream.steps=5, benchmark.image_size=64; VALUE is read as JSON when it "
        "parses (5, 0.1, true, [0,1]), else as text; repeat for several",
    )
    g.add_argument(
        "--lr",
        metavar="LR",
        help="= --set training.optimizer.lr=LR (the optimiser of every experience; of the later "
        "ones when the experiment has training.first_experience)",
    )
    g.add_argument("--batch-size", metavar="N", help="= --set training.train_mb_size=N")
    g.add_argument(
        "--model",
        metavar="NAME",
        help="= --set model.name=NAME: small_cnn, resnet18, resnet18_cifar, or your own as "
        "package.module:callable, called with the number of classes and returning a "
        "torch.nn.Module (D2L and Genifer read its model.feature_layer, default 'features')",
    )
    g.add_argument("--n-experiences", metavar="N", help="= --set benchmark.n_experiences=N")
    g.add_argument(
        "--show", action="store_true", help="print the resolved experiment as JSON and exit"
    )
    g = p.add_argument_group("logs (one sub-folder or run per strategy, seed and buffer size)")
    g.add_argument("--tensorboard", metavar="DIR", help="TensorBoard event files in DIR/<run>/")
    g.add_argument("--csv", metavar="DIR", help="Avalanche's CSV logs in DIR/<run>/")
    g.add_argument(
        "--wandb", metavar="PROJECT", help="log to Weights & Biases (needs pip install wandb)"
    )
    g.add_argument("--text-log", metavar="DIR", help="Avalanche's text log in DIR/<run>.log")


def _add_run_options(p: argparse.ArgumentParser) -> None:
    _add_setting_options(p)
    p.add_argument(
        "--data-root",
        default=None,
        help="the dataset's folder (paper benchmarks; image_folder: the folder holding train/ "
        "and test/)",
    )
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
        "--buffer-size",
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
        help="output folder (default results/BENCHMARK, for image_folder results/<the folder's "
        "name>; resumes if it exists)",
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
    sub.add_parser(
        "report",
        add_help=False,
        help="redraw results.md and the figures of output folders from their results.json",
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
        logs=_logs(args),
    )


def _logs(args):
    from avalanche_d2l.experiments.builders import RunLogs, check_wandb

    if args.wandb is not None:
        check_wandb()
    dirs = (args.tensorboard, args.csv, args.wandb, args.text_log)
    return None if all(d is None for d in dirs) else RunLogs(*dirs)


def _overrides(args) -> list:
    """The shortcuts as ``--set`` assignments, then the ``--set`` ones (which win)."""
    from avalanche_d2l.experiments.schema import parse_assignment

    out = []
    for dest, path in SHORTCUTS.items():
        raw = getattr(args, dest)
        if raw is not None:  # a model name is text; numbers are read as --set reads them
            out.append((path, raw) if dest == "model" else parse_assignment(f"{path}={raw}"))
    return out + list(args.assignments)


def _experiment(args):
    """The experiment of the command with every --set (and shortcut) applied, checked."""
    from avalanche_d2l import experiments as ex
    from avalanche_d2l.experiments.builders import import_model

    overrides = _overrides(args)
    if args.command == "run":
        if not args.experiment:
            raise ValueError("name an experiment (avalanche-d2l run --list) or a JSON file")
        exp = ex.load_experiment(args.experiment, overrides)
    else:
        title = Path(args.data_root).expanduser().resolve().name if args.data_root else ""
        exp = ex.default_experiment(
            args.benchmark, overrides, title=title if args.benchmark == "image_folder" else ""
        )
    if ":" in exp.model.name:
        import_model(exp.model.name)  # one sentence now if it cannot be imported
    return exp


def _shown(exp, args) -> dict:
    """``exp`` as ``run_experiment`` resolves it with the command's other options."""
    import dataclasses

    from avalanche_d2l.experiments.runner import QUICK_EPOCHS, with_dreamer
    from avalanche_d2l.experiments.schema import resolve_name

    if args.strategies is not None:
        names = [resolve_name(s) for s in args.strategies]
        exp = dataclasses.replace(exp, strategies={n: exp.strategies.get(n, {}) for n in names})
    if args.dreamer is not None:
        exp = with_dreamer(exp, args.dreamer, list(exp.strategies))
    epochs = args.epochs
    if epochs is None and args.quick and exp.training.optimizer.epochs > QUICK_EPOCHS:
        epochs = QUICK_EPOCHS
    if epochs is not None:
        exp = dataclasses.replace(exp, training=exp.training.with_epochs(epochs))
    changes = {
        "seeds": args.seeds,
        "mem_sizes": args.mem_sizes,
        "device": args.device,
        "precision": args.precision,
        "dreamer_device": args.dreamer_device,
    }
    exp = dataclasses.replace(exp, **{k: v for k, v in changes.items() if v is not None})
    return exp.to_dict()


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
    if args.command == "compare" and args.strategies is None:
        args.strategies = DEFAULT_STRATEGIES.split(",")
    exp = _experiment(args)
    if args.show:
        print(json.dumps(_shown(exp, args), indent=2))
        return 0
    if args.command == "run":
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
        out = Path(args.out or Path("results") / (exp.title or args.benchmark))
    world = _start_processes(args.device or exp.device)
    results = ex.run_experiment(exp, out=out, **_run_kwargs(args))
    if world > 1 and not _is_main():
        return 0  # process 0 wrote and prints the results
    print((out / "results.md").read_text())
    print(
        f"wrote {out}/results.json, results.md, accuracy.png, summary.png "
        f"({len(results['runs'])} runs{f', {world} processes' if world > 1 else ''})"
    )
    return 0


def _start_processes(device: str) -> int:
    """Under ``torchrun`` / ``accelerate launch``: the process group on the run's device kind
    (before the output lock, which asks which process is the main one); each process says who it
    is on stderr. Returns the number of processes."""
    from avalanche_d2l.distributed import check_processes
    from avalanche_d2l.dreaming.accel import process_index
    from avalanche_d2l.experiments.runner import check_device

    world = check_processes(check_device(device))
    if world > 1:
        _say(f"avalanche-d2l: process {process_index()} of {world}")
    return world


def _say(line: str) -> None:
    """One line on stderr in a single write: ``print`` writes the text and its newline
    separately, so two processes sharing the pipe (``torchrun``) could splice their lines."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _is_main() -> bool:
    from avalanche_d2l.dreaming.accel import is_main_process

    return is_main_process()


def _end_processes() -> None:
    """Every process leaves the group together (a process that exits first can leave the others
    waiting in gloo's teardown)."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


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
    if argv[:1] == ["report"]:
        from avalanche_d2l.experiments.report import main as report_main

        return report_main(argv[1:], prog="avalanche-d2l report")
    args = _parser().parse_args(argv)
    for stream in (sys.stdout, sys.stderr):  # a redirected log fills line by line, as it goes
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)
    try:
        code = _main(args)
        _end_processes()
        return code
    except (ValueError, OSError) as err:
        _say(f"avalanche-d2l: error: {_one_sentence(err)}")
        return 2
    except KeyboardInterrupt as err:  # Ctrl-C: one line, the conventional exit status 130
        _say(f"avalanche-d2l: {err or 'interrupted; run the same command to resume'}")
        return 130


def entry() -> int:
    """The ``avalanche-d2l`` command and ``python -m avalanche_d2l``: the process keeps freed CPU
    memory for reuse (:func:`avalanche_d2l.core.allocator.reuse_freed_memory`; same numbers,
    fewer page faults), then :func:`main`. Tests call :func:`main`, which leaves the allocator
    of the calling process alone."""
    from avalanche_d2l.core.allocator import reuse_freed_memory

    reuse_freed_memory()
    return main()


if __name__ == "__main__":
    raise SystemExit(entry())
