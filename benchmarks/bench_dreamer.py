"""Dreamer throughput: images/s of ``generate`` and steps/s of differentiable sample + backward.

Two settings:

* ``offline``: the glyph dreamer at 16 px on CPU (loaded from the cache, pretrained if missing;
  ``--random-offline`` uses a randomly initialised one of the same size instead, which has the
  same speed).
* ``sd15``: a Stable-Diffusion-1.5-sized dreamer: UNet and VAE randomly initialised from the
  SD-1.5 configs (speed does not depend on the weights), fp16 on GPU, 512 px decoded and resized
  to 224 px, gradient checkpointing on. Skipped with a message when no GPU is available.

Writes ``benchmarks/results/bench_dreamer.json`` and ``.md``::

    python benchmarks/bench_dreamer.py [--quick] [--random-offline] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import torch

try:
    import avalanche_d2l  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from avalanche_d2l.dreaming import Dreamer, DreamerConfig
from avalanche_d2l.dreaming.pretrain import load_or_pretrain_offline_dreamer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_sd15 import SD15_SCHEDULER, SD15_UNET, SD15_VAE  # noqa: E402  (one copy of the configs)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(
    dreamer: Dreamer, *, gen_n: int, gen_batch: int, opt_batch: int, opt_iters: int, warmup: int = 1
) -> dict:
    """Time ``generate`` and prompt-optimisation iterations (sample + backward + Adam step)."""
    dev = dreamer.device
    g = torch.Generator().manual_seed(0)
    cond = dreamer.random_prompt(1, generator=g)[0].to(dev)
    dreamer.generate(min(gen_n, gen_batch), cond, generator=g, batch_size=gen_batch)  # warm-up
    _sync(dev)
    t = time.perf_counter()
    dreamer.generate(gen_n, cond, generator=g, batch_size=gen_batch)
    _sync(dev)
    gen_s = time.perf_counter() - t

    prompt = dreamer.random_prompt(opt_batch, generator=g).to(dev).requires_grad_(True)
    opt = torch.optim.Adam([prompt], lr=1e-2)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for i in range(warmup + opt_iters):
        if i == warmup:
            _sync(dev)
            t = time.perf_counter()
        x = dreamer.sample(prompt, generator=g)
        loss = (x - 0.5).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _sync(dev)
    opt_s = time.perf_counter() - t
    out = {
        "generate_images_per_s": gen_n / gen_s,
        "generate_n": gen_n,
        "generate_batch": gen_batch,
        "opt_steps_per_s": opt_iters / opt_s,
        "opt_images_per_s": opt_iters * opt_batch / opt_s,
        "opt_batch": opt_batch,
        "opt_iters": opt_iters,
        "num_inference_steps": dreamer.config.num_inference_steps,
        "backprop_steps": dreamer.config.backprop_steps,
    }
    if dev.type == "cuda":
        out["peak_gpu_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def bench_offline(args) -> dict:
    if args.random_offline:
        cfg = DreamerConfig(kind="pixel", image_size=16, channels=1, prompt_len=4, prompt_dim=32)
        dreamer = Dreamer.from_config(cfg, num_concepts=100)
        source = "random init (same architecture as the pretrained glyph dreamer)"
    else:
        dreamer = load_or_pretrain_offline_dreamer(progress=not args.no_progress)
        source = "pretrained glyph dreamer (cache)"
    rows = {}
    for k in (None, 1):
        dreamer.config.backprop_steps = k
        rows[f"backprop_{k or 'all'}"] = measure(
            dreamer,
            gen_n=64 if args.quick else 512,
            gen_batch=64 if args.quick else 256,
            opt_batch=16,
            opt_iters=3 if args.quick else 10,
        )
    return {
        "setting": "offline glyph dreamer, 16 px, CPU",
        "source": source,
        "device": "cpu",
        "torch_threads": torch.get_num_threads(),
        "config": dataclasses.asdict(dreamer.config),
        "results": rows,
    }


def bench_sd15(args) -> dict:
    if not torch.cuda.is_available():
        msg = "skipped: no CUDA GPU (the SD-1.5-sized dreamer is benchmarked in fp16 on GPU only)"
        print(msg)
        return {"setting": "SD-1.5-sized latent dreamer, fp16, GPU", "skipped": msg}
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    dtype = torch.float16
    unet = UNet2DConditionModel(**SD15_UNET).to("cuda", dtype)
    vae = AutoencoderKL(**SD15_VAE).to("cuda", dtype)
    cfg = DreamerConfig(
        kind="latent",
        image_size=512,
        channels=3,
        prompt_len=77,
        prompt_dim=768,
        latent_channels=4,
        latent_size=64,
        num_inference_steps=4,
        gradient_checkpointing=True,
        output_size=224,
        mixed_precision="fp16",
        has_null_prompt=False,
    )
    table = torch.randn(16, 77, 768) * 0.5  # stand-in for CLIP caption embeddings
    dreamer = Dreamer(
        config=cfg,
        unet=unet,
        scheduler=DDIMScheduler(**SD15_SCHEDULER),
        vae=vae,
        concept_table=table,
    ).to("cuda")
    rows = {}
    for k in (None, 1):
        dreamer.config.backprop_steps = k
        rows[f"backprop_{k or 'all'}"] = measure(
            dreamer,
            gen_n=8 if args.quick else 32,
            gen_batch=8,
            opt_batch=2,
            opt_iters=2 if args.quick else 5,
        )
    return {
        "setting": "SD-1.5-sized latent dreamer (random init), fp16, 512 px -> 224",
        "device": torch.cuda.get_device_name(0),
        "config": dataclasses.asdict(cfg),
        "results": rows,
    }


def to_markdown(report: dict) -> str:
    lines = [
        "# Dreamer throughput",
        "",
        f"torch {report['torch']}, {report['platform']}, quick={report['quick']}",
        "",
    ]
    for entry in report["settings"]:
        lines.append(f"## {entry['setting']}")
        if "skipped" in entry:
            lines += ["", entry["skipped"], ""]
            continue
        lines += [
            "",
            f"device: {entry['device']}",
            "",
            (
                "| backprop | generate img/s | opt steps/s (sample+backward) | opt img/s |"
                " steps | peak GPU MB |"
            ),
            "|---|---|---|---|---|---|",
        ]
        for name, r in entry["results"].items():
            mem = f"{r['peak_gpu_mem_mb']:.0f}" if "peak_gpu_mem_mb" in r else "-"
            lines.append(
                f"| {name} | {r['generate_images_per_s']:.1f} | {r['opt_steps_per_s']:.2f} | "
                f"{r['opt_images_per_s']:.1f} | {r['num_inference_steps']} | {mem} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument("--quick", action="store_true", help="fewer images/iterations")
    p.add_argument(
        "--random-offline",
        action="store_true",
        help="time a random-init glyph-sized dreamer (no pretraining needed)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = {
        "torch": torch.__version__,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "quick": args.quick,
        "seed": 0,
        "settings": [bench_offline(args), bench_sd15(args)],
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_dreamer.json").write_text(json.dumps(report, indent=2, default=str))
    md = to_markdown(report)
    (args.out / "bench_dreamer.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
