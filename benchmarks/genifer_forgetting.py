"""Where Genifer forgets: after every experience, per earlier experience, the classifier on its
real test images beside the replay of its classes.

Genifer's fidelity figures are measured while an experience's real images are at hand, i.e. on
the generator of that experience's own GAN phase. This diagnostic follows every class pair down
the stream (the same user CNN, stream and defaults as ``genifer_fidelity.py``) and, after each
experience ``i`` (its training and its GAN phase), for each experience ``j <= i`` reports

* ``real``: the classifier's accuracy on the real test images of ``j`` (all output units seen so
  far compete);
* ``probe``: the worst class of a fresh probe trained only on the current EMA generator's replay of
  ``j``'s classes and scored on their real test images (fidelity (a), measured again later in the
  stream: does the replay itself drift?);
* ``on replay``: the worst class of the classifier's accuracy on that replay (does the classifier
  keep even the images it is trained on?).

The test images are the benchmark's test stream; they are read only here, never by the method.
Writes ``benchmarks/results/genifer_fidelity/forgetting_<tag>.md`` and ``.json``::

    python benchmarks/genifer_forgetting.py --stream split_digits_28 --seed 1
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

import torch
from genifer_fidelity import OUT, STREAMS, genifer_config, user_setup  # the runs' script

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from avalanche_d2l.experiments.report import atomic_write  # noqa: E402
from avalanche_d2l.genifer.fidelity import (  # noqa: E402
    ProbeSettings,
    classifier_accuracy,
    probe_accuracy,
    replay_pool,
)
from avalanche_d2l.strategies import Genifer  # noqa: E402


def _tensors(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*[(dataset[i][0], dataset[i][1]) for i in range(len(dataset))])
    return torch.stack(xs), torch.as_tensor(ys)


def follow(stream: str, seed: int, epochs: int, config: dict) -> dict:
    """Train Genifer (user CNN, feature layer ``block3``) on ``stream`` and measure every earlier
    experience after every experience (see the module docstring)."""
    bench = STREAMS[stream](seed)
    model, opt, common = user_setup(bench, seed, epochs)  # as genifer_fidelity.py's runs
    cfg = genifer_config(config, seed)
    strategy = Genifer(model=model, optimizer=opt, feature_layer="block3", config=cfg, **common)
    tests = [_tensors(e.dataset) for e in bench.test_stream]
    pairs = [[int(c) for c in e.classes_in_this_experience] for e in bench.train_stream]
    rng = torch.Generator().manual_seed(seed)
    rows = []
    t0 = time.perf_counter()
    for i, exp in enumerate(bench.train_stream):
        strategy.train(exp)
        model.eval()
        plugin = strategy.genifer
        g = plugin.generator_ema
        row = []
        for j in range(i + 1):
            x, y = tests[j]
            with torch.no_grad():
                logits = plugin.mask_logits(
                    torch.cat([model(x[k : k + 256]) for k in range(0, len(x), 256)])
                )
            cell = {
                "experience": j,
                "classes": pairs[j],
                "real": float((logits.argmax(1) == y).float().mean()),
            }
            if g is not None and set(pairs[j]) <= set(plugin.generated_classes):
                gen = torch.Generator().manual_seed(seed * 1000 + i)

                def sample(labels: torch.Tensor, g=g, gen=gen) -> torch.Tensor:
                    return g.clamp(g.generate(len(labels), labels, generator=gen))

                rx, ry = replay_pool(sample, pairs[j], 128, torch.device("cpu"))
                probe = probe_accuracy(rx, ry, x, y, pairs[j], ProbeSettings(), rng)
                on_replay = classifier_accuracy(model, rx, ry, plugin.active_classes)
                cell["probe_min"] = min(probe.values())
                cell["on_replay_min"] = min(on_replay.values())
            row.append(cell)
        rows.append(row)
        print(f"after experience {i}: " + "; ".join(_cell(c) for c in row), flush=True)
    return {
        "stream": stream,
        "seed": seed,
        "epochs": epochs,
        "config_overrides": config,
        "wall_s": time.perf_counter() - t0,
        "after": rows,
    }


def _cell(c: dict) -> str:
    text = f"E{c['experience']} real {c['real']:.2f}"
    if "probe_min" in c:
        text += f", probe {c['probe_min']:.2f}, on replay {c['on_replay_min']:.2f}"
    return text


def markdown(result: dict, argv: list[str]) -> str:
    n = len(result["after"])
    lines = [
        f"# Where Genifer forgets: {result['stream']}, seed {result['seed']}, user CNN (block3)",
        "",
        "Rows: after experience i (its training and its GAN phase). Cells: for experience j, "
        "the classifier's accuracy on its real test images / the worst class of a probe trained "
        "on the current generator's replay of its classes, scored on those real images / the "
        "worst class of the classifier on that replay (`-`: no replay of it yet).",
        "",
        "| after | " + " | ".join(f"E{j}" for j in range(n)) + " |",
        "|---|" + "---|" * n,
    ]
    for i, row in enumerate(result["after"]):
        cells = []
        for c in row:
            if "probe_min" in c:
                cells.append(f"{c['real']:.2f} / {c['probe_min']:.2f} / {c['on_replay_min']:.2f}")
            else:
                cells.append(f"{c['real']:.2f} / - / -")
        lines.append(f"| {i} | " + " | ".join(cells + [""] * (n - len(cells))) + " |")
    lines += [
        "",
        f"Changes to the defaults: `{json.dumps(result['config_overrides'])}`; "
        f"{result['epochs']} epochs; {result['wall_s']:.0f} s.",
        "",
        f"Command: `python benchmarks/genifer_forgetting.py {shlex.join(argv)}`",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stream", default="split_digits_28", choices=list(STREAMS))
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--config", default="{}", help="JSON GeniferConfig overrides (a variant)")
    p.add_argument("--tag", default=None, help="file suffix (default: <stream>_s<seed>)")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    result = follow(args.stream, args.seed, args.epochs, json.loads(args.config))
    tag = args.tag or f"{args.stream}_s{args.seed}"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / f"forgetting_{tag}.json", json.dumps(result, indent=2) + "\n")
    md = markdown(result, sys.argv[1:] if argv is None else argv)
    atomic_write(out / f"forgetting_{tag}.md", md)
    print(md)
    return result


if __name__ == "__main__":
    main()
