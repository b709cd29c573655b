"""Preflight of a D2L run: measured passes, extrapolation, the overflow error, cost estimates."""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_dreaming_scale import TinyHeads
from tiny_models import tiny_pixel_dreamer
from torch import nn

from avalanche_d2l.dreaming.preflight import (
    GpuSpec,
    PreflightError,
    count_flops,
    dreaming_plan,
    estimate_paper_cost,
    preflight,
    saved_activation_bytes,
)
from avalanche_d2l.dreaming.prompts import DreamConfig


def _config(**kw) -> DreamConfig:
    base = dict(
        steps=5,
        batch_per_class=2,
        samples_per_class=10,
        generate_batch_size=8,
        micro_batch=4,
        progress=False,
    )
    base.update(kw)
    return DreamConfig(**base)


def test_preflight_measures_and_extrapolates():
    dreamer = tiny_pixel_dreamer(num_inference_steps=3)
    model = TinyHeads()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = preflight(
        dreamer=dreamer,
        classifier=model,
        dream_config=_config(sleep_epochs=1),
        image_shape=(1, 8, 8),
        n_dream_classes=5,
        n_dreaming_phases=4,
        train_batch=6,
        device="cpu",
        train_steps=100,
    )
    s, ph, run = report.settings, report.phase, report.run
    assert s["micro_batch"] == 4 and s["num_inference_steps"] == 3 and s["dream_batch"] == 6
    # 5 classes, 2 per pass -> 3 passes per prompt step, for 5 steps + the judging pass
    assert ph["passes_per_prompt_step"] == 3 and ph["prompt_passes"] == 18
    assert ph["generate_batches"] == math.ceil(50 / 8) and ph["sleep_steps"] == math.ceil(50 / 6)
    expect = (
        18 * report.prompt_pass.seconds
        + 7 * report.generate_batch.seconds
        + 9 * report.train_step.seconds
    )
    assert ph["seconds"] == pytest.approx(expect)
    assert run["dreaming_seconds"] == pytest.approx(4 * expect)
    assert run["training_seconds"] == pytest.approx(100 * report.train_step.seconds)
    assert report.prompt_pass.seconds > 0 and report.train_step.seconds > 0
    assert report.fits == {"cpu": None}  # nothing to compare a CPU with unless given
    rss = report.prompt_pass.peak_bytes.get("cpu_rss")
    if rss is not None:  # Linux: the kernel's peak-RSS counter
        assert rss >= report.prompt_pass.rss_before > 0
    text = report.to_text()
    assert "prompt pass (4 images" in text and "per run (4 dreaming phases)" in text
    json.dumps(report.to_dict())
    for k, v in model.state_dict().items():  # the training step was undone
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)


def test_preflight_names_the_settings_to_change_when_it_does_not_fit():
    dreamer = tiny_pixel_dreamer()
    with pytest.raises(PreflightError, match="micro_batch.*generate_batch_size"):
        preflight(
            dreamer=dreamer,
            classifier=nn.Sequential(nn.Flatten(), nn.Linear(64, 7)),  # a plain classifier
            dream_config=_config(),
            image_shape=(1, 8, 8),
            n_dream_classes=3,
            n_dreaming_phases=2,
            train_batch=4,
            device="cpu",
            device_memory={"cpu_rss": 2**20},  # a 1 MiB budget
        )


def test_flops_and_saved_bytes_on_the_meta_device():
    with torch.device("meta"):
        lin = nn.Linear(64, 32, bias=False)
        x = torch.randn(16, 64, requires_grad=True)

    def step():
        lin(x).sum().backward()

    # forward 2*16*64*32, backward twice that (input and weight gradients)
    assert count_flops(step) == 3 * 2 * 16 * 64 * 32
    # the input is saved; the weight too (for the input gradient), unless excluded
    assert saved_activation_bytes(lambda: lin(x)) == (16 * 64 + 64 * 32) * 4
    assert saved_activation_bytes(lambda: lin(x), exclude=lin.parameters()) == 16 * 64 * 4


def test_estimate_paper_cost_arithmetic():
    cfg = _config(steps=9, batch_per_class=4, samples_per_class=10, sleep_epochs=1)
    gpu = GpuSpec(
        name="toy", memory_gib=1.0, peak_tflops=1.0, utilisation=1.0, learner_utilisation=0.5
    )
    kw = dict(
        dream_config=cfg,
        n_dream_classes=2,
        n_dreaming_phases=3,
        prompt_pass_flops=4e12,  # 4 images per pass: 1e12 per image
        prompt_pass_images=4,
        generate_flops_per_image=1e11,
        train_step_flops=1e10,
        train_steps_per_run=1000,
        weight_bytes=2**29,
        prompt_pass_activation_bytes=2**28,
        generate_activation_bytes=2**27,
        dream_batch=5,
        gpu=gpu,
        overhead=1.0,
    )
    out = estimate_paper_cost(**kw)
    prompt = 10 * 8 * 1e12  # (steps + 1) x 2 classes x 4 images
    gen, sleep = 20 * 1e11, 4 * 1e10
    phase = (prompt + gen + 2 * sleep) / 1e12  # the learner's FLOPs at half the rate
    assert out["phase_gpu_hours"] == pytest.approx(phase / 3600)
    assert out["run_gpu_hours"] == pytest.approx((3 * phase + 2 * 1000 * 1e10 / 1e12) / 3600)
    assert out["memory_gib"] == pytest.approx(0.75) and out["fits"] is True
    # backward recomputes the largest checkpointed block on top of what the pass saved
    more = estimate_paper_cost(**kw, recompute_bytes=2**27)
    assert more["memory_gib"] == pytest.approx(0.875) and more["recompute_gib"] == 0.125


def test_largest_block_bytes_is_the_biggest_blocks_saved_activations():
    from avalanche_d2l.dreaming.measure import largest_block_bytes

    small, big = nn.Linear(8, 8), nn.Sequential(nn.Linear(8, 256), nn.ReLU(), nn.Linear(256, 8))
    net = nn.Sequential(small, big)
    x = torch.randn(4, 8)
    params = list(net.parameters())
    h = small(x).detach()
    alone = saved_activation_bytes(lambda: big(h), exclude=params)
    assert largest_block_bytes(lambda: net(x), [small, big], exclude=params) == alone > 0
    assert largest_block_bytes(lambda: net(x), [small], exclude=params) < alone
    assert not small._forward_pre_hooks and not big._forward_hooks  # hooks removed


def test_dreaming_plan_of_the_paper_streams():
    mini = DreamConfig(max_dream_classes=20)
    assert dreaming_plan(n_classes=100, n_experiences=20, dream_config=mini) == (20, 19)
    assert dreaming_plan(n_classes=10, n_experiences=5, dream_config=DreamConfig()) == (8, 4)
    late = DreamConfig(dream_after_last=True)
    assert dreaming_plan(n_classes=10, n_experiences=5, dream_config=late, n_extra_heads=2) == (
        10,
        5,
    )
