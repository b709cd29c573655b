"""Tests of the offline glyph world and the offline dreamer's pretraining and cache (tiny, CPU)."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import TINY_UNET, tiny_pixel_dreamer

from avalanche_d2l.dreaming import Dreamer
from avalanche_d2l.dreaming import pretrain as pretrain_mod
from avalanche_d2l.dreaming.glyphs import DEFAULT_GLYPHS, GlyphBank, GlyphConfig
from avalanche_d2l.dreaming.pretrain import PretrainConfig, pretrain_offline_dreamer

UNET = {**TINY_UNET, "layers_per_block": 1}


def tiny_dreamer(**overrides) -> Dreamer:
    d = tiny_pixel_dreamer(unet=UNET, num_concepts=5, **{"prompt_dim": 8, **overrides})
    d.null_prompt = torch.randn(2, 8, generator=torch.Generator().manual_seed(1))
    return d


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- glyph world ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bank():
    return GlyphBank(GlyphConfig(image_size=16))


def test_glyphs_have_no_digits_and_are_digit_like(bank):
    assert not set("0123456789") & set(bank.class_names)
    assert not set("0123456789") & set(DEFAULT_GLYPHS)
    assert bank.num_classes >= 60 and len(bank.config.fonts) >= 5
    with pytest.raises(ValueError, match="digits"):
        GlyphConfig(chars="AB7")
    x, y = bank.sample(64, generator=gen())
    assert x.shape == (64, 1, 16, 16) and y.shape == (64,)
    assert x.min() >= 0 and x.max() <= 1 and x.dtype == torch.float32
    assert int(y.max()) < bank.num_classes
    # white strokes on black: border mostly dark, centre brighter
    assert x[..., 0, :].mean() < x[..., 4:12, 4:12].mean()
    x2, y2 = bank.sample(64, generator=gen())
    torch.testing.assert_close(x, x2, rtol=0, atol=0)
    assert torch.equal(y, y2)
    xc, yc = bank.sample(3, generator=gen(), classes=torch.tensor([0, 0, 1]))
    assert yc.tolist() == [0, 0, 1]
    assert not torch.allclose(xc[0], xc[1])  # jitter


# ---- pretraining ---------------------------------------------------------------------------------


def test_short_pretraining_writes_loadable_dir(tmp_path):
    pc = PretrainConfig(
        block_out_channels=(8, 16),
        prompt_len=2,
        prompt_dim=8,
        reference_steps=5,
        reference_width=4,
        eval_per_class=1,
        lr=3e-3,
        ema_decay=0.0,
    )
    gc = GlyphConfig(chars="ABCoxz?")
    d = pretrain_offline_dreamer(
        tmp_path / "g",
        image_size=8,
        steps=40,
        batch_size=16,
        progress=False,
        config=pc,
        glyph_config=gc,
    )
    info = json.loads((tmp_path / "g" / "training_info.json").read_text())
    assert info["loss_final"] < info["loss_first"]
    assert info["data"]["glyphs"] == "ABCoxz?" and info["data"]["fonts"]
    assert set(info["reference_accuracy_on_samples"]) and (tmp_path / "g" / "samples.png").is_file()
    assert (tmp_path / "g" / "TRAINED_ON.md").is_file()
    d2 = Dreamer.from_pretrained(tmp_path / "g", device="cpu")
    assert d2.config.concept_names == list("ABCoxz?")
    assert d2.concept_embeddings().shape == (7, 2, 8)
    assert d2.reference_network() is not None
    p = d2.random_prompt(2, generator=gen())
    torch.testing.assert_close(d2.sample(p, generator=gen(1)), d.sample(p, generator=gen(1)))


def test_load_or_pretrain_uses_cache(tmp_path, monkeypatch):
    calls = []

    def fake_pretrain(out_dir, **kwargs):
        calls.append(kwargs)
        tiny_dreamer().save_pretrained(out_dir, training_info={"fake": True})

    monkeypatch.setattr(pretrain_mod, "pretrain_offline_dreamer", fake_pretrain)
    monkeypatch.setenv("AVALANCHE_D2L_CACHE", str(tmp_path))
    a = pretrain_mod.load_or_pretrain_offline_dreamer(steps=7, progress=False)
    b = pretrain_mod.load_or_pretrain_offline_dreamer(steps=7, progress=False)
    assert len(calls) == 1 and calls[0]["steps"] == 7
    assert a.training_info == b.training_info == {"fake": True}
    assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 1  # no temp dirs left
    pretrain_mod.load_or_pretrain_offline_dreamer(steps=8, progress=False)
    assert len(calls) == 2


def test_pretrain_cli_parses_and_runs(tmp_path, monkeypatch):
    seen = {}

    def fake_pretrain(out_dir, **kwargs):
        seen.update(kwargs, out=out_dir)
        d = tiny_dreamer()
        d.training_info = {
            "loss_first": 1.0,
            "loss_final": 0.5,
            "train_seconds": 1.0,
            "reference_accuracy_on_samples": {"steps4_cfg1": 0.5},
            "chance": 0.1,
        }
        return d

    monkeypatch.setattr(pretrain_mod, "pretrain_offline_dreamer", fake_pretrain)
    rc = pretrain_mod.main(
        [
            "--out",
            str(tmp_path / "x"),
            "--steps",
            "12",
            "--image-size",
            "16",
            "--seed",
            "3",
            "--batch-size",
            "8",
            "--no-progress",
        ]
    )
    assert rc == 0
    assert seen["steps"] == 12 and seen["seed"] == 3 and seen["batch_size"] == 8
    assert seen["image_size"] == 16 and seen["progress"] is False


def test_coloured_glyph_world_for_rgb_streams():
    grey = GlyphBank(GlyphConfig(chars="abc"))
    rgb = GlyphBank(GlyphConfig(chars="abc", color=True))
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    x1, y1 = grey.sample(16, generator=g1)
    x3, y3 = rgb.sample(16, generator=g2)
    assert rgb.channels == 3 and x3.shape == (16, 3, 16, 16) and torch.equal(y1, y3)
    assert 0.0 <= float(x3.min()) and float(x3.max()) <= 1.0
    # each image has its own colours: channels differ, and the stroke is brighter than the ground
    assert not torch.allclose(x3[:, 0], x3[:, 1])
    stroke = x1 > 0.5
    for i in range(16):
        if stroke[i].any() and (~stroke[i]).any():
            m = stroke[i, 0]
            assert (x3[i][:, m].mean() > x3[i][:, ~m].mean())
    # grey and coloured dreamers live in different cache folders
    assert pretrain_mod._cache_name(16, 600, 0, 3) != pretrain_mod._cache_name(16, 600, 0)
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        pretrain_offline_dreamer("unused", steps=1, channels=2)
