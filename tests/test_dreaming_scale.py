"""Dreaming at scale, on CPU: micro-batch invariance, 2-process sharding (gloo), loss scaling
(:func:`avalanche_d2l.d2l.dreaming.dream` on a tiny diffusers dreamer)."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_pixel_dreamer
from torch import nn

from avalanche_d2l.d2l.config import DreamConfig
from avalanche_d2l.d2l.dreaming import DreamJob, dream
from avalanche_d2l.d2l.oracle import LearnedOracle
from avalanche_d2l.dreaming import accel

HEADS, SOURCES, SEEN = [3, 4, 6, 7, 9], [0, 1, 0, 1, 0], [0, 1]


class TinyHeads(nn.Module):
    """A small learner with head-space logits and pooled features."""

    def __init__(self, n_heads: int = 10, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.features = nn.Sequential(
            nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(2)
        )
        self.head = nn.Linear(24, n_heads)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            bn = self.features[1]
            bn.running_mean.copy_(torch.randn(6, generator=g) * 0.1)
            bn.running_var.copy_(torch.rand(6, generator=g) + 0.5)

    def forward_heads(self, x, *, return_features: bool = False):
        f = self.features(x).flatten(1)
        logits = self.head(f)
        return (logits, f) if return_features else logits


def _jobs(dreamer):
    """Anchored dream classes: 6 random 'buffer images' per source class, a prototype each."""
    g = torch.Generator().manual_seed(1)
    anchors = {c: torch.rand(6, 1, 8, 8, generator=g) for c in SEEN}
    protos = {c: torch.nn.functional.normalize(torch.randn(24, generator=g), dim=0) for c in SEEN}
    prompts = dreamer.random_prompt(len(HEADS), generator=g)
    return [
        DreamJob(h, c, prompts[i], anchors[c], protos[c], torch.zeros(24))
        for i, (h, c) in enumerate(zip(HEADS, SOURCES))
    ]


def _setup(**cfg):
    dreamer = tiny_pixel_dreamer(num_inference_steps=2)
    base = dict(
        steps=3,
        lr=0.2,
        batch_per_class=2,
        samples_per_class=3,
        generate_batch_size=4,
        oracle_min_labels=2,
        progress=False,
    )
    base.update(cfg)
    return dreamer, TinyHeads(), DreamConfig(**base)


def _run(dreamer, model, config, **kw):
    return dream(
        dreamer=dreamer,
        learner=model,
        jobs=_jobs(dreamer),
        seen_heads=SEEN,
        config=config,
        oracle=LearnedOracle(min_labels=2),
        **kw,
    )


def _assert_same(a, b, atol=1e-5):
    torch.testing.assert_close(a.prompts, b.prompts, atol=atol, rtol=1e-4)
    torch.testing.assert_close(a.images, b.images, atol=atol, rtol=1e-4)
    assert a.labels.tolist() == b.labels.tolist() and a.heads.tolist() == b.heads.tolist()
    assert {h: s["reason"] for h, s in a.history["stops"].items()} == {
        h: s["reason"] for h, s in b.history["stops"].items()
    }
    for name in ("distinctness", "coherence"):
        torch.testing.assert_close(
            torch.tensor(a.history[name]), torch.tensor(b.history[name]), atol=atol, rtol=1e-4
        )
    for name, values in a.history["terms"].items():
        torch.testing.assert_close(
            torch.tensor(values), torch.tensor(b.history["terms"][name]), atol=atol, rtol=1e-4
        )


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_result_does_not_depend_on_micro_batch(eta):
    runs = {}
    for mb in (None, 2, 4, 7):  # all classes in one pass; 1; 2; 3 (7 rounds down to 3 x 2)
        dreamer, model, config = _setup(micro_batch=mb, stop="fixed")
        dreamer.config.eta = eta
        runs[mb] = _run(dreamer, model, config)
    ref = runs[None]
    assert ref.history["steps"] == 3 and ref.history["micro_batch"] == 10
    assert runs[2].history["micro_batch"] == 2 and runs[7].history["micro_batch"] == 6
    # the terms that couple classes are on: the prompts moved because of them too
    assert max(ref.history["terms"]["distinct"]) > 0
    for mb in (2, 4, 7):
        _assert_same(runs[mb], ref)
    assert ref.images.shape == (15, 1, 8, 8)
    # micro_batch is not part of the fingerprint: caches stay valid when it changes
    assert DreamConfig(micro_batch=2).fingerprint() == DreamConfig(micro_batch=None).fingerprint()


def test_micro_batch_bounds_the_images_per_pass():
    dreamer, model, config = _setup(micro_batch=4, steps=1)
    sizes = []
    orig = dreamer.sample

    def spy(prompt_embeds, **kw):
        if kw.get("grad", True):
            sizes.append(prompt_embeds.shape[0])
        return orig(prompt_embeds, **kw)

    dreamer.sample = spy
    _run(dreamer, model, config)
    assert sizes == [4, 4, 2]  # 5 classes x 2 images, 2 classes per pass


def test_stops_and_the_oracle_are_recorded():
    dreamer, model, config = _setup(steps=6)
    result = _run(dreamer, model, config)
    hist = result.history
    assert set(hist["stops"]) == set(HEADS)
    assert {s["reason"] for s in hist["stops"].values()} <= {"oracle", "step_cap"}
    assert hist["oracle"]["type"] == "learned" and hist["oracle"]["labels"] > 0


def test_reference_network_from_a_transformers_directory(tmp_path):
    from transformers import ResNetConfig, ResNetForImageClassification

    torch.manual_seed(0)
    net = ResNetForImageClassification(
        ResNetConfig(
            num_channels=3, embedding_size=8, hidden_sizes=[8, 8], depths=[1, 1], num_labels=4
        )
    )
    net.save_pretrained(tmp_path / "ref")
    dreamer = tiny_pixel_dreamer(num_inference_steps=2)
    dreamer.set_reference(tmp_path / "ref")
    assert dreamer.reference_info()["present"]
    images = dreamer.generate(2, dreamer.random_prompt(1)[0])
    assert dreamer.reference_network()(images).shape == (2, 4)  # grey 8 px -> RGB 224 px
    with pytest.raises(OSError, match="no reference network"):
        dreamer.set_reference(tmp_path / "missing", local_files_only=True)


def test_prompt_loss_scaler_skips_only_the_overflowing_prompt():
    a = nn.Parameter(torch.ones(3))
    b = nn.Parameter(torch.ones(3))
    scaler = accel.PromptLossScaler(enabled=True, init_scale=2.0**10, growth_interval=2)
    loss = scaler.scale_loss((a * 2).sum() + (b * 3).sum())
    loss.backward()
    assert torch.equal(a.grad, torch.full((3,), 2.0**11))
    assert scaler.unscale_([a, b]) == []
    assert torch.equal(a.grad, torch.full((3,), 2.0)) and torch.equal(b.grad, torch.full((3,), 3.0))
    b.grad = torch.tensor([1.0, float("inf"), 0.0])
    a.grad = torch.ones(3)
    assert scaler.unscale_([a, b]) == [b]
    assert b.grad is None and a.grad is not None and scaler.scale == 2.0**9
    off = accel.PromptLossScaler(enabled=False)
    assert off.scale_loss(torch.tensor(3.0)) == 3.0
    assert accel.resolve_precision("auto", "cpu") == "no"
    assert accel.resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="precision"):
        accel.resolve_precision("fp8", "cpu")


@pytest.mark.parametrize(("native", "expected"), [(True, "bf16"), (False, "fp16")])
def test_auto_precision_uses_bf16_only_where_the_gpu_has_it(monkeypatch, native, expected):
    """A GPU with emulated bf16 only (torch's default answer counts emulation) gets fp16."""
    import contextlib

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        return native or including_emulation

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device", lambda d: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert accel.resolve_precision("auto", "cuda:0") == expected


# ---- two processes (gloo, through accelerate's PartialState) ----------------------------------


def _worker(rank: int, world: int, port: int, out: str, tests_dir: str) -> None:
    sys.path.insert(0, tests_dir)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    from accelerate.state import PartialState

    PartialState._reset_state()  # a forked child must not inherit the parent's (single) state
    state = accel.distributed_state(cpu=True)  # accelerate initialises the gloo process group
    assert state.num_processes == world and accel.process_index() == rank
    dreamer, model, config = _setup(micro_batch=2)
    result = _run(dreamer, model, config)
    if accel.is_main_process():
        torch.save(
            {"prompts": result.prompts, "images": result.images, "history": result.history},
            out + ".tmp",
        )
        os.replace(out + ".tmp", out)
    else:  # the other process ends with the same full result
        torch.save({"prompts": result.prompts, "images": result.images}, out + f".{rank}")
    accel.wait_for_everyone()
    state.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_equal_one(tmp_path):
    import torch.multiprocessing as mp

    out = str(tmp_path / "rank0.pt")
    tests_dir = str(Path(__file__).resolve().parent)
    # fork: the children start at once with the modules already imported (spawn re-imports
    # avalanche and diffusers in each child, tens of seconds on a loaded machine)
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(
        _worker, args=(2, _free_port(), out, tests_dir), nprocs=2, join=True, start_method=method
    )
    dreamer, model, config = _setup(micro_batch=4)
    single = _run(dreamer, model, config, distributed=False)
    got = torch.load(out, weights_only=False)
    other = torch.load(out + ".1", weights_only=False)
    assert got["history"]["processes"] == 2 and single.history["processes"] == 1
    torch.testing.assert_close(got["prompts"], single.prompts, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(got["images"], single.images, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(other["images"], got["images"], atol=0, rtol=0)
    torch.testing.assert_close(
        torch.tensor(got["history"]["terms"]["loss"]),
        torch.tensor(single.history["terms"]["loss"]),
        atol=1e-5,
        rtol=1e-4,
    )
    assert accel.is_main_process() and accel.num_processes() == 1  # this process: no group


# ---- the full-size Stable Diffusion 1.5 path (slow: builds a ~4 GB checkpoint) ----------------


@pytest.mark.slow
def test_full_size_sd15_end_to_end(tmp_path):
    """Random-weight SD-1.5 in the diffusers layout -> Dreamer.from_pretrained -> dreaming.

    Set ``AVALANCHE_D2L_SD15`` to a folder to keep (and reuse) the checkpoint."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_sd15.py"
    spec = importlib.util.spec_from_file_location("bench_sd15", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    root = bench.build_sd15(Path(os.environ.get("AVALANCHE_D2L_SD15", tmp_path / "sd15")))
    dreamer = bench.load_cpu_dreamer(root)
    assert sum(p.numel() for p in dreamer.unet.parameters()) > 8.5e8
    # SD-1.4's PNDM config has no clip_sample: DDIM must not clip the latents
    assert dreamer.scheduler.config.clip_sample is False
    assert dreamer.config.latent_size == 8 and dreamer.config.image_size == 64
    rows = bench.measure_classes(dreamer, [1, 3])
    assert all(r["finite_prompts"] for r in rows)
    peaks = [r["peak_rss_gib"] for r in rows]
    assert max(peaks) - min(peaks) < 0.1 * max(peaks)  # one class per pass: a flat peak


def test_dream_config_from_an_experiment_file(tmp_path):
    """The dream settings sit in the d2l strategy section of the experiment files."""
    exp = {"strategies": {"d2l": {"dream": {"steps": 7, "micro_batch": 8}}, "er": {}}}
    (tmp_path / "exp.json").write_text(json.dumps(exp))
    cfg = DreamConfig.from_json(tmp_path / "exp.json")
    assert cfg.steps == 7 and cfg.micro_batch == 8
    (tmp_path / "old.json").write_text(json.dumps({"dream": {"steps": 3}}))
    assert DreamConfig.from_json(tmp_path / "old.json").steps == 3
    (tmp_path / "bad.json").write_text(json.dumps({"dream": {"stpes": 3}}))
    with pytest.raises(ValueError, match="stpes"):
        DreamConfig.from_json(tmp_path / "bad.json")
