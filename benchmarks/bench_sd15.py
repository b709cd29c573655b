"""Full-size Stable Diffusion 1.5 dreaming on CPU, and the cost of the paper experiments on a GPU.

1. Builds the SD-1.5 architecture from its configs with random weights (UNet2DConditionModel,
   860M parameters; AutoencoderKL; CLIP ViT-L/14 text encoder; the PNDM scheduler config of
   SD-1.4, which lacks ``clip_sample``), saves it in the diffusers layout (about 4 GB, once, in
   ``--cache``) and loads it through ``Dreamer.from_pretrained(path)`` like a downloaded
   checkpoint (speed and memory do not depend on the weights).
2. On CPU at 8x8 latents (64 px decoded): peak RSS and seconds of a dreaming phase with one prompt
   step and generation, for 1, 4 and 20 dream classes with one class per pass -- the peak must be
   flat -- and, for contrast, 4 classes in one pass.
3. Runs :func:`avalanche_d2l.dreaming.preflight` on that dreamer with a ResNet-18 learner.
4. For each paper experiment (the shipped ``d2l_*`` experiments): FLOPs and saved activations
   of one prompt pass, one generated image and one learner step counted on the meta device at
   the paper's sizes (32x32 latents, bf16), turned into GPU memory and GPU-hours per run by
   :func:`~avalanche_d2l.dreaming.preflight.estimate_paper_cost`. These GPU figures are
   estimates: no GPU was used.

Writes ``benchmarks/results/bench_sd15.json`` and ``.md``::

    nice python benchmarks/bench_sd15.py [--cache DIR] [--classes 1 4 20] [--skip-cpu]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

try:
    import avalanche_d2l  # noqa: F401
except ImportError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from avalanche_d2l.d2l.config import DreamConfig
from avalanche_d2l.d2l.dreaming import DreamJob, dream
from avalanche_d2l.d2l.oracle import LearnedOracle
from avalanche_d2l.dreaming import Dreamer, DreamerConfig
from avalanche_d2l.dreaming.dreamer import latent_size_for
from avalanche_d2l.dreaming.measure import largest_block_bytes
from avalanche_d2l.dreaming.preflight import (
    GiB,
    GpuSpec,
    count_flops,
    estimate_paper_cost,
    peak_memory,
    preflight,
    saved_activation_bytes,
)

ROOT = Path(__file__).resolve().parents[1]

# The public diffusers configs of runwayml/stable-diffusion-v1-5 (UNet, VAE) and the text part of
# openai/clip-vit-large-patch14.
SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ),
    "up_block_types": (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ),
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}
SD15_VAE = {
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}
SD15_SCHEDULER = {
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}
#: SD-1.4's scheduler config: PNDM, no ``clip_sample`` (the loader must turn it off for DDIM).
SD14_PNDM_SCHEDULER = {
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
}
CLIP_TEXT = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}

#: Training images per class of each paper benchmark (the learner's steps per run): Mini-ImageNet
#: 500 of its 600, ImageNet-R ~24k of 30k over 200 classes, FG-ImageNet the ImageNet train split.
TRAIN_IMAGES_PER_CLASS = {"mini_imagenet": 500, "imagenet_r": 120, "fg_imagenet": 1300}
GPUS = (
    GpuSpec("A100-80GB", 80.0, 312.0, 0.35, 0.10),
    GpuSpec("H100-80GB", 80.0, 989.0, 0.30, 0.08),
)


# ------------------------------------------------------------------------------------------------
# 1. the random-weight SD-1.5 checkpoint in the diffusers layout


def _toy_clip_tokenizer(folder: Path):
    """A CLIP tokenizer with a letters-only vocabulary (the real BPE files cannot be fetched
    here); it pads to 77 tokens like SD's, and the text encoder keeps its full 49408 rows."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(
        vocab_file=str(folder / "vocab.json"),
        merges_file=str(folder / "merges.txt"),
        model_max_length=77,
    )


def build_sd15(root: Path, *, seed: int = 0) -> Path:
    """Write the random-weight SD-1.5 checkpoint to ``root`` (atomic; reused when present)."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    root = Path(root)
    if (root / "model_index.json").is_file():
        return root
    tmp = root.with_name(root.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(seed)
    UNet2DConditionModel(**SD15_UNET).save_pretrained(tmp / "unet")
    gc.collect()
    AutoencoderKL(**SD15_VAE).save_pretrained(tmp / "vae")
    CLIPTextModel(CLIPTextConfig(**CLIP_TEXT)).save_pretrained(tmp / "text_encoder")
    gc.collect()
    _toy_clip_tokenizer(tmp / "tokfiles").save_pretrained(tmp / "tokenizer")
    shutil.rmtree(tmp / "tokfiles")
    PNDMScheduler(**SD14_PNDM_SCHEDULER).save_pretrained(tmp / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "note": "random weights (avalanche_d2l benchmarks/bench_sd15.py), for speed/memory only",
    }
    (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
    if root.exists():
        shutil.rmtree(root)
    os.replace(tmp, root)
    return root


def load_cpu_dreamer(root: Path, *, latent_size: int = 8, output_size: int = 32) -> Dreamer:
    """The checkpoint through ``Dreamer.from_pretrained``, at small latents for the CPU."""
    return Dreamer.from_pretrained(
        root,
        device="cpu",
        local_files_only=True,
        latent_size=latent_size,
        output_size=output_size,
        output_channels=3,
        num_inference_steps=2,
        backprop_steps=1,
        gradient_checkpointing=True,
        mixed_precision="no",
    )


class ResNetHeads(nn.Module):
    """torchvision ResNet-18 as a head classifier (features = the pooled last stage)."""

    def __init__(self, n_heads: int):
        super().__init__()
        from torchvision.models import resnet18

        self.net = resnet18(num_classes=n_heads)

    def forward_heads(self, x, *, return_features: bool = False):
        n = self.net
        x = n.maxpool(n.relu(n.bn1(n.conv1(x))))
        f = n.avgpool(n.layer4(n.layer3(n.layer2(n.layer1(x))))).flatten(1)
        out = n.fc(f)
        return (out, f) if return_features else out

    def forward(self, x):
        return self.forward_heads(x)


# ------------------------------------------------------------------------------------------------
# 2. CPU: a dreaming phase for 1, 4, 20 classes


def measure_classes(
    dreamer: Dreamer, counts: list[int], *, micro_batch: int | None = 2, size: int = 32
) -> list:
    """Peak RSS and seconds of D2L's dreaming phase (:func:`avalanche_d2l.d2l.dreaming.dream`,
    anchored on random ``3 x size x size`` images) with one prompt step, per number of
    classes."""
    rows = []
    n_seen = 5
    learner = ResNetHeads(n_seen + max(counts)).eval()
    for k in counts:
        config = DreamConfig(
            steps=1,
            batch_per_class=2,
            micro_batch=micro_batch,
            samples_per_class=2,
            generate_batch_size=2,
            generate_inference_steps=2,
            stop="fixed",
            progress=False,
        )
        g = torch.Generator().manual_seed(k)
        prompt = dreamer.concept_embeddings()[0].detach().clone()
        anchors = [torch.rand(4, 3, size, size, generator=g) * 2 - 1 for _ in range(k)]
        jobs = [DreamJob(n_seen + j, j % n_seen, prompt, a) for j, a in enumerate(anchors)]
        gc.collect()
        with peak_memory([torch.device("cpu")]) as m:
            result = dream(
                dreamer=dreamer,
                learner=learner,
                jobs=jobs,
                seen_heads=list(range(n_seen)),
                config=config,
                oracle=LearnedOracle(),
            )
        h = result.history
        rows.append(
            {
                "dream_classes": k,
                "micro_batch": h["micro_batch"],
                "images_per_prompt_step": k * config.batch_per_class,
                "peak_rss_gib": m.peak_bytes.get("cpu_rss", 0) / GiB,
                "rss_before_gib": (m.rss_before or 0) / GiB,
                "prompt_seconds": h["optim_seconds"],
                "prompt_seconds_per_class": h["optim_seconds"] / k,
                "seconds": m.seconds,
                "finite_prompts": bool(torch.isfinite(result.prompts).all()),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


# ------------------------------------------------------------------------------------------------
# 4. paper experiments: meta-device counts -> GPU memory and GPU-hours


def _experiment_files() -> list[Path]:
    from avalanche_d2l.experiments import experiment_files

    return [p for name, p in sorted(experiment_files().items()) if name.startswith("d2l_")]


def _d2l_section(data: dict) -> dict:
    strategies = data.get("strategies") or {}
    if isinstance(strategies.get("d2l"), dict):
        return strategies["d2l"]
    return data


def _d2l_runs(data: dict) -> int:
    strategies = data.get("strategies") or {}
    n_variants = (
        sum(1 for k, v in strategies.items() if k == "d2l" or v == "d2l") if strategies else 1
    )
    return n_variants * len(data.get("mem_sizes") or [1]) * len(data.get("seeds") or [1])


def _max_op_bytes(fn) -> int:
    """Largest ``inputs + outputs`` of one op while ``fn()`` runs (no-grad peak, doubled for
    the tensors a block keeps alive across ops, e.g. residuals)."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    biggest = 0

    class Track(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            nonlocal biggest
            out = func(*args, **(kwargs or {}))
            flat, _ = tree_flatten((args, kwargs, out))
            n = sum(t.numel() * t.element_size() for t in flat if isinstance(t, torch.Tensor))
            biggest = max(biggest, n)
            return out

    with Track():
        fn()
    return 2 * biggest


def _meta_dreamer(latent: int, out_size: int, overrides: dict) -> Dreamer:
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**{**SD15_UNET, "sample_size": latent}).to(torch.bfloat16)
        vae = AutoencoderKL(**SD15_VAE).to(torch.bfloat16)
    cfg = DreamerConfig(
        kind="latent",
        image_size=latent * 8,
        channels=3,
        prompt_len=77,
        prompt_dim=768,
        latent_channels=4,
        latent_size=latent,
        num_inference_steps=int(overrides.get("num_inference_steps", 10)),
        backprop_steps=overrides.get("backprop_steps", 2),
        gradient_checkpointing=bool(overrides.get("gradient_checkpointing", True)),
        mixed_precision="no",  # the weights are already bf16 (the GPU default)
        output_size=out_size,
        output_channels=3,
        has_null_prompt=False,
    )
    return Dreamer(
        config=cfg,
        unet=unet,
        scheduler=DDIMScheduler(**SD15_SCHEDULER),
        vae=vae,
        concept_table=torch.zeros(2, 77, 768),
    )


def checkpointed_blocks(d: Dreamer) -> list[torch.nn.Module]:
    """The modules diffusers checkpoints one by one when gradient checkpointing is on: the
    UNet's down, mid and up blocks and the VAE decoder's mid and up blocks."""
    unet, dec = d.unet, d.vae.decoder
    return [*unet.down_blocks, unet.mid_block, *unet.up_blocks, dec.mid_block, *dec.up_blocks]


#: Classes of the benchmarks whose experiment file does not state them.
N_CLASSES = {"fg_imagenet": 100, "mini_imagenet": 100, "imagenet_r": 200}


def count_pass(
    *,
    latent: int,
    size: int,
    n_classes: int,
    overrides: dict,
    dream: DreamConfig,
    micro: int,
    train_batch: int,
) -> dict[str, float]:
    """FLOPs and bytes of a prompt pass, a generated image and a learner step, on the meta device
    at full size (SD-1.5 in bf16, a ResNet-18 learner)."""
    from torchvision.models import resnet18

    d = _meta_dreamer(latent, size, overrides)
    gen_steps = int(dream.generate_inference_steps or d.config.num_inference_steps)
    with torch.device("meta"):
        learner = resnet18(num_classes=n_classes)
        prompt = torch.randn(micro, 77, 768, requires_grad=True)
        noise = torch.randn(micro, 4, latent, latent)
        one = torch.randn(1, 4, latent, latent)
        gen_noise = torch.randn(dream.generate_batch_size, 4, latent, latent)
        x_train = torch.randn(train_batch, 3, size, size)
        cond1 = torch.zeros(1, 77, 768, dtype=torch.bfloat16)
    cond_b = cond1.expand(dream.generate_batch_size, -1, -1)
    learner.requires_grad_(False)

    def forward_only():
        img = d.sample(prompt.to(torch.bfloat16), noise=noise)
        return learner(img.float())

    def prompt_pass():
        forward_only().logsumexp(1).mean().backward()

    out = {
        "generate_inference_steps": gen_steps,
        "num_inference_steps": d.config.num_inference_steps,
        "backprop_steps": d.config.backprop_steps,
    }
    out["pass_flops"] = count_flops(prompt_pass)
    out["pass_bytes"] = saved_activation_bytes(
        forward_only, exclude=[*d.parameters(), *learner.parameters()]
    )
    # backward recomputes one checkpointed block at a time: the largest one's activations,
    # counted on the same pass without checkpointing
    flat = _meta_dreamer(latent, size, {**overrides, "gradient_checkpointing": False})

    def flat_forward():
        return learner(flat.sample(prompt.to(torch.bfloat16), noise=noise).float())

    out["recompute_bytes"] = largest_block_bytes(
        flat_forward,
        checkpointed_blocks(flat),
        exclude=[*flat.parameters(), *learner.parameters()],
    )
    with torch.no_grad():
        out["gen_flops"] = count_flops(
            lambda: d.sample(cond1, noise=one, num_inference_steps=gen_steps, grad=False)
        )
        out["gen_bytes"] = _max_op_bytes(
            lambda: d.sample(cond_b, noise=gen_noise, num_inference_steps=1, grad=False)
        )
    learner.requires_grad_(True)
    out["train_flops"] = count_flops(lambda: learner(x_train).logsumexp(1).mean().backward())
    out["train_bytes"] = saved_activation_bytes(
        lambda: learner(x_train), exclude=list(learner.parameters())
    )
    n_dreamer = sum(q.numel() for q in d.parameters()) + 123_060_480  # + CLIP text encoder
    n_learner = sum(q.numel() for q in learner.parameters())
    # dreamer in bf16; learner fp32 weights + grads + momentum; reference ResNet-50 in fp32
    out["weights"] = 2 * n_dreamer + 3 * 4 * n_learner + 4 * 25_557_032
    return out


def paper_estimates() -> list[dict[str, Any]]:
    rows = []
    for path in _experiment_files():
        data = json.loads(path.read_text())
        sec = _d2l_section(data)
        dream = DreamConfig.from_json(path)
        bench = data["benchmark"]
        name = str(bench["name"])
        size = int(bench["image_size"])
        n_exp = int(bench["n_experiences"])
        n_classes = bench.get("expected_classes") or bench.get("n_classes")
        if n_classes is None:
            n_classes = next(v for key, v in N_CLASSES.items() if key in name)
        n_classes = int(n_classes)
        training = data.get("training", {})
        epochs = int(training.get("epochs") or training.get("optimizer", {}).get("epochs", 50))
        mb = int(training.get("train_mb_size", 32))
        overrides = sec.get("dreamer_overrides") or data.get("dreamer_overrides") or {}
        latent = latent_size_for(size)
        free = n_classes - n_classes // n_exp
        k = min(dream.max_dream_classes or free, free)
        phases = n_exp - (0 if dream.dream_after_last else 1)
        b = dream.batch_per_class
        micro = max(b, (dream.micro_batch or k * b) // b * b)
        t0 = time.perf_counter()
        c = count_pass(
            latent=latent,
            size=size,
            n_classes=n_classes,
            overrides=overrides,
            dream=dream,
            micro=micro,
            train_batch=3 * mb,  # real + replay + dreams
        )
        per_class = next((v for key, v in TRAIN_IMAGES_PER_CLASS.items() if key in name), 500)
        train_steps = epochs * n_exp * math.ceil(per_class * (n_classes // n_exp) / mb)
        est = {
            gpu.name: estimate_paper_cost(
                dream_config=dream,
                n_dream_classes=k,
                n_dreaming_phases=phases,
                prompt_pass_flops=c["pass_flops"],
                prompt_pass_images=micro,
                generate_flops_per_image=c["gen_flops"],
                train_step_flops=c["train_flops"],
                train_steps_per_run=train_steps,
                weight_bytes=c["weights"],
                prompt_pass_activation_bytes=c["pass_bytes"],
                recompute_bytes=c["recompute_bytes"],
                generate_activation_bytes=c["gen_bytes"],
                train_step_bytes=c["train_bytes"],
                dream_batch=mb,
                gpu=gpu,
            )
            for gpu in GPUS
        }
        rows.append(
            {
                "experiment": path.name,
                "file": str(path.relative_to(ROOT)),
                "image_size": size,
                "latent_size": latent,
                "n_dream_classes": k,
                "n_dreaming_phases": phases,
                "micro_batch": micro,
                "micro_batch_configured": dream.micro_batch,
                "num_inference_steps": c["num_inference_steps"],
                "backprop_steps": c["backprop_steps"],
                "generate_inference_steps": c["generate_inference_steps"],
                "generate_batch_size": dream.generate_batch_size,
                "steps_cap": dream.steps,
                "samples_per_class": dream.samples_per_class,
                "learner_train_steps": train_steps,
                "prompt_pass_tflops": c["pass_flops"] / 1e12,
                "generate_tflops_per_image": c["gen_flops"] / 1e12,
                "train_step_tflops": c["train_flops"] / 1e12,
                "prompt_pass_saved_gib": c["pass_bytes"] / GiB,
                "generate_peak_gib": c["gen_bytes"] / GiB,
                "train_step_saved_gib": c["train_bytes"] / GiB,
                "weights_gib": c["weights"] / GiB,
                "d2l_runs_in_file": _d2l_runs(data),
                "estimates": est,
                "count_seconds": time.perf_counter() - t0,
            }
        )
        print(json.dumps({key: v for key, v in rows[-1].items() if key != "estimates"}), flush=True)
        gc.collect()
    return rows


# ------------------------------------------------------------------------------------------------
# report


def to_markdown(report: dict) -> str:
    lines = [
        "# Full-size SD-1.5 dreaming (random weights): CPU measurements, GPU estimates",
        "",
        f"torch {report['torch']}, {report['platform']}, {report['torch_threads']} CPU thread(s); "
        f"command: `{report['command']}`. **No GPU was used: every GPU figure below is an "
        "estimate** (FLOPs and saved activations counted on the meta device at the paper's sizes,"
        " time at an assumed utilisation).",
        "",
    ]
    cpu = report.get("cpu")
    if cpu:
        lines += [
            "## CPU: one dreaming phase with one prompt step, 8x8 latents (64 px), 2 images/class",
            "",
            "Loaded with `Dreamer.from_pretrained` from the diffusers layout "
            f"({cpu['load_seconds']:.0f} s); scheduler after loading: {cpu['scheduler']}.",
            "",
            "| dream classes | images per pass | peak RSS GiB | RSS before GiB | prompt step s "
            "| s per class | phase s |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in cpu["rows"] + cpu.get("contrast", []):
            lines.append(
                f"| {r['dream_classes']} | {r['micro_batch']} | {r['peak_rss_gib']:.2f} | "
                f"{r['rss_before_gib']:.2f} | {r['prompt_seconds']:.1f} | "
                f"{r['prompt_seconds_per_class']:.1f} | {r['seconds']:.1f} |"
            )
        lines += ["", cpu["flat"], ""]
        if cpu.get("preflight_text"):
            lines += ["Preflight on this dreamer:", "", "```", cpu["preflight_text"], "```", ""]
    lines += [
        "## Paper experiments: estimated GPU memory and GPU-hours per run",
        "",
        "Upper bound: every dream class runs the whole prompt-step cap (the oracle may stop "
        "classes earlier). Memory: dreamer weights in bf16 + learner (fp32, grads, momentum) + "
        "reference ResNet-50 + 1.25 x (the largest pass's saved activations + the largest "
        "checkpointed block's, which backward recomputes and holds on top). Learner steps counted "
        "with batches of real + replay + dream images.",
        "",
        "| experiment | px | latents | dream classes x phases | micro-batch | TFLOP/pass | "
        "pass act. GiB | recompute GiB | GPU mem GiB | A100 h/run | H100 h/run | D2L runs | "
        "A100 h all runs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["paper"]:
        a, h = r["estimates"]["A100-80GB"], r["estimates"]["H100-80GB"]
        lines.append(
            f"| {r['experiment']} | {r['image_size']} | {r['latent_size']} | "
            f"{r['n_dream_classes']} x {r['n_dreaming_phases']} | {r['micro_batch']} | "
            f"{r['prompt_pass_tflops']:.1f} | {r['prompt_pass_saved_gib']:.2f} | "
            f"{a['recompute_gib']:.2f} | {a['memory_gib']:.1f} | {a['run_gpu_hours']:.1f} | "
            f"{h['run_gpu_hours']:.1f} | "
            f"{r['d2l_runs_in_file']} | {a['run_gpu_hours'] * r['d2l_runs_in_file']:.0f} |"
        )
    lines += ["", "Per run on an A100-80GB (dreaming / learner training):", ""]
    for r in report["paper"]:
        a = r["estimates"]["A100-80GB"]
        lines.append(
            f"- {r['experiment']}: dreaming {a['dreaming_gpu_hours']:.1f} h "
            f"({a['phase_gpu_hours'] * 60:.0f} min per phase), training "
            f"{a['training_gpu_hours']:.1f} h ({r['learner_train_steps']} steps); fits in 80 GB: "
            f"{'yes' if a['fits'] else 'NO'}"
        )
    lines += ["", f"Assumptions: {report['paper'][0]['estimates']['A100-80GB']['assumptions']}."]
    lines.append("")
    return "\n".join(lines)


def _write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    p.add_argument(
        "--cache",
        type=Path,
        default=Path(os.environ.get("AVALANCHE_D2L_CACHE", Path.home() / ".cache/avalanche_d2l"))
        / "sd15-random",
        help="where the random-weight SD-1.5 checkpoint is written (about 4 GB)",
    )
    p.add_argument("--classes", type=int, nargs="+", default=[1, 4, 20])
    p.add_argument("--no-contrast", action="store_true", help="skip 4 classes in one pass")
    p.add_argument("--skip-cpu", action="store_true", help="only the paper estimates")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    report: dict[str, Any] = {
        "torch": torch.__version__,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "command": "nice python benchmarks/bench_sd15.py " + " ".join(argv or sys.argv[1:]),
    }
    if not args.skip_cpu:
        t = time.perf_counter()
        root = build_sd15(args.cache)
        build_s = time.perf_counter() - t
        t = time.perf_counter()
        dreamer = load_cpu_dreamer(root)
        load_s = time.perf_counter() - t
        sc = dreamer.scheduler.config
        cpu: dict[str, Any] = {
            "checkpoint": str(root),
            "build_seconds": build_s,
            "load_seconds": load_s,
            "unet_parameters": sum(q.numel() for q in dreamer.unet.parameters()),
            "scheduler": f"{type(dreamer.scheduler).__name__}(clip_sample={sc.clip_sample}, "
            f"steps_offset={sc.steps_offset})",
            "dreamer_config": dreamer.config.to_dict(),
        }
        cpu["rows"] = measure_classes(dreamer, sorted(args.classes))
        peaks = [r["peak_rss_gib"] for r in cpu["rows"]]
        spread = max(peaks) - min(peaks)
        cpu["flat"] = (
            f"Peak RSS over {sorted(args.classes)} dream classes: {min(peaks):.2f}-"
            f"{max(peaks):.2f} GiB (spread {spread:.2f} GiB, "
            f"{'flat' if spread < 0.1 * max(peaks) else 'NOT flat'})."
        )
        if not args.no_contrast:
            cpu["contrast"] = measure_classes(dreamer, [4], micro_batch=None)
        learner = ResNetHeads(25)
        rep = preflight(
            dreamer=dreamer,
            classifier=learner,
            dream_config=DreamConfig(
                steps=50,
                batch_per_class=2,
                micro_batch=2,
                samples_per_class=100,
                generate_batch_size=4,
                generate_inference_steps=25,
                progress=False,
            ),
            image_shape=(3, 32, 32),
            n_dream_classes=20,
            n_dreaming_phases=19,
            train_batch=32,
            device="cpu",
            generate_inference_steps=2,
        )
        cpu["preflight"] = rep.to_dict()
        cpu["preflight_text"] = rep.to_text()
        report["cpu"] = cpu
        del dreamer
        gc.collect()
    report["paper"] = paper_estimates()
    args.out.mkdir(parents=True, exist_ok=True)
    _write(args.out / "bench_sd15.json", json.dumps(report, indent=2, default=str))
    md = to_markdown(report)
    _write(args.out / "bench_sd15.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
