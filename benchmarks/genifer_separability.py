"""Does the replay become harder to tell from real images as a GAN phase runs longer?

Issue 23's remaining gap: a probe tells Genifer's replay from real images at 0.91-1.00 after
every phase (``separability``; 0.5 = indistinguishable). This script runs the *first* GAN phase of
a stream, on the user CNN of ``genifer_fidelity.py`` (feature layer ``block3``, trained on the
first experience through Genifer's public constructor), for a fixed number of steps, and
measures every fidelity figure of the EMA generator's replay every ``--every`` steps: the probe
trained on the replay and scored on held-out real images (worst class), the separability, the
frozen classifier on the replay. One line per variant (``--variants``: name -> GeniferConfig
changes on top of the defaults), so the generator-side changes can be compared over the phase's
length. Writes ``benchmarks/results/genifer_fidelity/separability_<stream>_s<seed>.md/json``::

    python benchmarks/genifer_separability.py --stream split_digits_28 --seed 1 --steps 1600 \\
        --every 200 --variants '{"default": {}, "img1": {"gan": {"image_weight": 1.0}}}'
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings

from genifer_fidelity import OUT, STREAMS, atomic_write, genifer_config, user_setup

from avalanche_d2l.genifer import monitor as monitor_module
from avalanche_d2l.strategies import Genifer


def _phase_trace(stream: str, seed: int, steps: int, every: int, change: dict, epochs: int):
    """The first experience and its GAN phase with ``change``; fidelity every ``every`` steps."""
    bench = STREAMS[stream](seed)
    model, opt, common = user_setup(bench, seed, epochs)
    gan = {**change.get("gan", {}), "stop": "fixed", "steps_first": steps}
    cfg = genifer_config({**change, "gan": gan}, seed)
    strategy = Genifer(model=model, optimizer=opt, feature_layer="block3", config=cfg, **common)
    plugin = strategy.genifer
    monitors: list = []
    for_phase = monitor_module.ReplayMonitor.for_phase.__func__

    def capture(cls, *a, **k):
        dataset, mon = for_phase(cls, *a, **k)
        monitors.append(mon)
        return dataset, mon

    train_phase = plugin.gan.train_phase
    trace: list[dict] = []
    t0 = time.perf_counter()

    def measure(done: int) -> bool:  # the trainer lets the classifier run whole meanwhile
        fid = monitors[-1].finish({"steps": done, "max_steps": steps}, "block3")
        trace.append(
            {
                "step": done,
                "probe_min": min(fid["probe"].values()),
                "separability": fid["separability"],
                "classifier_mean": fid["classifier_mean"],
                "diversity_mean": fid["diversity_mean"],
                "wall_s": time.perf_counter() - t0,
            }
        )
        return False  # never stop: the phase runs its fixed length

    def traced_phase(**kw):
        return train_phase(**{**kw, "monitor": measure, "monitor_every": every})

    monitor_module.ReplayMonitor.for_phase = classmethod(capture)
    plugin.gan.train_phase = traced_phase
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            strategy.train(bench.train_stream[0])
    finally:
        monitor_module.ReplayMonitor.for_phase = classmethod(for_phase)
    return trace


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stream", default="split_digits_28", choices=list(STREAMS))
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--steps", type=int, default=1600)
    p.add_argument("--every", type=int, default=200)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--variants", default='{"default": {}}', help="JSON: name -> config changes")
    args = p.parse_args(argv)
    variants = json.loads(args.variants)
    if not isinstance(variants, dict) or not variants:
        raise SystemExit("--variants must be a JSON object: name -> GeniferConfig changes")
    for change in variants.values():  # bad keys fail here, before any training
        genifer_config(change, args.seed)
    stem = f"separability_{args.stream}_s{args.seed}"
    path = OUT / f"{stem}.json"
    data = json.loads(path.read_text()) if path.exists() else {"runs": {}}
    for name, change in variants.items():
        trace = _phase_trace(args.stream, args.seed, args.steps, args.every, change, args.epochs)
        data["runs"][name] = {"change": change, "steps": args.steps, "trace": trace}
        data["command"] = "python benchmarks/genifer_separability.py " + " ".join(
            argv if argv is not None else sys.argv[1:]
        )
        atomic_write(path, json.dumps(data, indent=1))
        print(name, trace)
    lines = [
        f"# First GAN phase of `{args.stream}`, seed {args.seed}: fidelity as the phase runs",
        "",
        "| variant | change | step | probe min (worst class) | separability | "
        "classifier on replay | diversity | wall s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, run in data["runs"].items():
        for t in run["trace"]:
            lines.append(
                f"| {name} | `{json.dumps(run['change'])}` | {t['step']} | {t['probe_min']:.2f} | "
                f"{t['separability']:.2f} | {t['classifier_mean']:.2f} | "
                f"{t['diversity_mean']:.2f} | {t['wall_s']:.0f} |"
            )
    atomic_write(OUT / f"{stem}.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
