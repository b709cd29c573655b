"""Tests of the diffusion dreamer: sampling, gradients, loading and saving (tiny, CPU)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tiny_models import TINY_UNET, tiny_pixel_dreamer

from avalanche_d2l.dreaming import Dreamer, DreamerConfig, from_classifier_space

UNET = {**TINY_UNET, "layers_per_block": 1}


def tiny_dreamer(**overrides) -> Dreamer:
    d = tiny_pixel_dreamer(unet=UNET, num_concepts=5, **{"prompt_dim": 8, **overrides})
    # a non-zero null prompt so that guidance has an effect
    d.null_prompt = torch.randn(2, 8, generator=torch.Generator().manual_seed(1))
    return d


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- sampling: shapes, range, classifier space --------------------------------------------------


def test_sample_shape_and_range_native():
    d = tiny_dreamer()
    x = d.sample(d.random_prompt(3, generator=gen()), generator=gen(1))
    assert x.shape == (3, 1, 8, 8) == (3, *d.output_shape)
    assert x.min() >= 0 and x.max() <= 1
    assert x.std() > 0  # not a constant image


def test_sample_resize_channels_and_normalisation():
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    d = tiny_dreamer(output_size=12, output_channels=3, output_mean=mean, output_std=std)
    x = d.sample(d.random_prompt(2, generator=gen()), generator=gen(1))
    assert x.shape == (2, 3, 12, 12)
    x01 = from_classifier_space(x, mean=mean, std=std)
    assert x01.min() >= -1e-5 and x01.max() <= 1 + 1e-5
    # grey -> RGB repeats the channel
    torch.testing.assert_close(x01[:, 0], x01[:, 1])
    assert not torch.allclose(x[:, 0], x[:, 1])  # but normalised per channel
    # same images as the native-size sampler, resized
    d_native = tiny_dreamer()
    y = d_native.sample(d.random_prompt(2, generator=gen()), generator=gen(1))
    y = torch.nn.functional.interpolate(y, size=(12, 12), mode="bilinear", align_corners=False)
    torch.testing.assert_close(x01[:, :1], y, atol=1e-5, rtol=0)


def test_rgb_to_grey_and_bad_config():
    d = tiny_dreamer(channels=3, output_channels=1)
    x = d.sample(d.random_prompt(2, generator=gen()), generator=gen(1))
    assert x.shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="output_mean"):
        DreamerConfig(
            kind="pixel", image_size=8, channels=1, prompt_len=2, prompt_dim=8, output_mean=(0.5,)
        )
    with pytest.raises(ValueError, match="kind"):
        DreamerConfig(kind="video", image_size=8, channels=1, prompt_len=2, prompt_dim=8)
    with pytest.raises(ValueError, match=r"\(B, 2, 8\)"):
        d.sample(torch.zeros(2, 3, 8))


# ---- gradients reach the prompt, never the dreamer ---------------------------------------------


@pytest.mark.parametrize("backprop_steps", [None, 1])
def test_gradient_reaches_prompt_only(backprop_steps):
    d = tiny_dreamer(num_inference_steps=3)
    before = copy.deepcopy(d.state_dict())
    prompt = d.random_prompt(2, generator=gen()).requires_grad_(True)
    x = d.sample(prompt, generator=gen(1), backprop_steps=backprop_steps)
    (x - 0.3).pow(2).mean().backward()
    assert prompt.grad is not None and prompt.grad.abs().sum() > 0
    assert all(not p.requires_grad and p.grad is None for p in d.parameters())
    for k, v in d.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)
    assert not d.training
    d.train()  # stays frozen in eval mode
    assert not d.training and not d.unet.training


def test_truncated_backprop_differs_and_no_grad_mode():
    d = tiny_dreamer(num_inference_steps=3)
    grads = []
    for k in (1, 3):
        p = d.random_prompt(2, generator=gen()).requires_grad_(True)
        d.sample(p, generator=gen(1), backprop_steps=k).sum().backward()
        grads.append(p.grad.clone())
    assert not torch.allclose(grads[0], grads[1])
    p = d.random_prompt(2, generator=gen()).requires_grad_(True)
    assert d.sample(p, generator=gen(1), grad=False).grad_fn is None


def test_gradient_checkpointing_and_cfg_same_gradient_path():
    d = tiny_dreamer(guidance_scale=2.0)
    p = d.random_prompt(2, generator=gen()).requires_grad_(True)
    x = d.sample(p, generator=gen(1))
    x.sum().backward()
    g_plain = p.grad.clone()
    d.config.gradient_checkpointing = True
    p.grad = None
    x_ckpt = d.sample(p, generator=gen(1))
    x_ckpt.sum().backward()
    torch.testing.assert_close(x_ckpt, x)
    torch.testing.assert_close(p.grad, g_plain, atol=1e-5, rtol=1e-4)
    d.config.gradient_checkpointing = False
    d.config.guidance_scale = 1.0
    assert not torch.allclose(d.sample(p, generator=gen(1)), x)  # guidance changes the images


def test_bf16_autocast_keeps_gradient_and_float32_output():
    d = tiny_dreamer(mixed_precision="bf16")
    p = d.random_prompt(2, generator=gen()).requires_grad_(True)
    x = d.sample(p, generator=gen(1))
    assert x.dtype == torch.float32
    x.mean().backward()
    assert p.grad.abs().sum() > 0
    x_fp32 = tiny_dreamer().sample(p.detach(), generator=gen(1))
    diff = (x.detach() - x_fp32).abs()
    assert 0 < diff.max() and diff.mean() < 0.05  # autocast active; same images up to rounding
    with pytest.raises(ValueError, match="mixed_precision"):
        DreamerConfig(
            kind="pixel",
            image_size=8,
            channels=1,
            prompt_len=2,
            prompt_dim=8,
            mixed_precision="fp8",
        )


# ---- determinism, generate contract, prompts ----------------------------------------------------


def test_seeded_determinism_and_noise_argument():
    d = tiny_dreamer(eta=0.5)  # eta > 0 also draws step noise from the generator
    p = d.random_prompt(4, generator=gen(3))
    torch.testing.assert_close(p, d.random_prompt(4, generator=gen(3)), rtol=0, atol=0)
    a = d.sample(p, generator=gen(7))
    b = d.sample(p, generator=gen(7))
    c = d.sample(p, generator=gen(8))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.allclose(a, c)
    d.config.eta = 0.0
    noise = torch.randn(4, 1, 8, 8, generator=gen(2))
    torch.testing.assert_close(d.sample(p, noise=noise), d.sample(p, noise=noise.clone()))


def test_generate_contract():
    d = tiny_dreamer()
    cond = d.random_prompt(1, generator=gen())[0]
    x = d.generate(5, cond, generator=gen(1), batch_size=2)
    assert x.shape == (5, 1, 8, 8) and x.grad_fn is None
    ids = torch.tensor([0, 1, 2, 3, 4])
    y = d.generate(5, ids, generator=gen(1), batch_size=5)
    # batch size does not change results for the same noise stream order
    assert y.shape == (5, 1, 8, 8)
    with pytest.raises(ValueError, match="condition"):
        d.generate(3, torch.zeros(2, 2, 8))


def test_random_prompt_near_concepts():
    d = tiny_dreamer()
    table = d.concept_embeddings()
    assert table.shape == (5, 2, 8)
    p = d.random_prompt(200, generator=gen())
    assert p.shape == (200, 2, 8) and not p.requires_grad
    # convex mixes: inside the concepts' range up to the small noise
    lo, hi = table.min(0).values, table.max(0).values
    slack = 4 * d.config.prompt_noise * table.std(0)
    assert ((p >= lo - slack) & (p <= hi + slack)).float().mean() > 0.99
    assert p.std(0).mean() > 0.1 * table.std(0).mean()  # not all the same prompt


def test_latent_size_for_learner_resolution():
    from avalanche_d2l.dreaming.dreamer import latent_size_for

    assert [latent_size_for(r) for r in (28, 84, 224, 256, 257, 512)] == [32, 32, 32, 32, 40, 64]
    assert latent_size_for(84, 8, min_latent=8) == 16
    with pytest.raises(ValueError, match="resolution"):
        latent_size_for(0)


def test_encode_text_pixel_kind_errors():
    with pytest.raises(RuntimeError, match="concept table"):
        tiny_dreamer().encode_text(["a cat"])


def test_dill_pickle_roundtrip():
    dill = pytest.importorskip("dill")
    d = tiny_dreamer()
    d2 = dill.loads(dill.dumps(d))
    p = d.random_prompt(2, generator=gen())
    torch.testing.assert_close(d.sample(p, generator=gen(1)), d2.sample(p, generator=gen(1)))


# ---- persistence ---------------------------------------------------------------------------------


def test_save_load_roundtrip_with_reference(tmp_path):
    from avalanche_d2l.dreaming.dreamer import make_reference
    from avalanche_d2l.models.classifiers import small_cnn

    d = tiny_dreamer(output_size=10)
    torch.manual_seed(0)
    net = small_cnn(num_classes=5, in_channels=1, width=4).eval()
    spec = {"arch": "small_cnn", "num_classes": 5, "in_channels": 1, "width": 4, "in_size": 8}
    d._reference = make_reference(net, spec=spec, config=d.config)
    d.save_pretrained(tmp_path / "dreamer", training_info={"steps": 3})
    d2 = Dreamer.from_pretrained(tmp_path / "dreamer", device="cpu")
    assert d2.config == d.config and d2.training_info == {"steps": 3}
    p = d.random_prompt(3, generator=gen())
    x = d.sample(p, generator=gen(1))
    torch.testing.assert_close(d2.sample(p, generator=gen(1)), x, rtol=0, atol=0)
    torch.testing.assert_close(d2.concept_embeddings(), d.concept_embeddings())
    torch.testing.assert_close(d2.reference_network()(x), d.reference_network()(x))
    assert all(not q.requires_grad for q in d2.parameters())
    # config overrides at load time
    d3 = Dreamer.from_pretrained(tmp_path / "dreamer", device="cpu", num_inference_steps=1)
    assert d3.config.num_inference_steps == 1
    with pytest.raises(ValueError, match="unknown DreamerConfig overrides"):
        Dreamer.from_pretrained(tmp_path / "dreamer", num_steps=1)
    with pytest.raises(OSError, match="save_pretrained"):
        Dreamer.from_pretrained(tmp_path / "missing", local_files_only=True)


def _tiny_tokenizer(path):
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    path.mkdir()
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(
        vocab_file=str(path / "vocab.json"),
        merges_file=str(path / "merges.txt"),
        model_max_length=6,
    ), len(vocab)


def test_latent_dreamer_from_diffusers_layout(tmp_path, monkeypatch):
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        PNDMScheduler,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    root = tmp_path / "sd"
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=4,
        sample_size=16,
    )
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, cross_attention_dim=16, **UNET
    )
    vae.save_pretrained(root / "vae")
    unet.save_pretrained(root / "unet")
    # an SD checkpoint ships a PNDM scheduler config: it must become DDIM
    PNDMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, skip_prk_steps=True
    ).save_pretrained(root / "scheduler")
    tok, n_vocab = _tiny_tokenizer(tmp_path / "tokfiles")
    tok.save_pretrained(root / "tokenizer")
    CLIPTextModel(
        CLIPTextConfig(
            vocab_size=n_vocab,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=6,
        )
    ).save_pretrained(root / "text_encoder")

    d = Dreamer.from_pretrained(
        root,
        device="cpu",
        local_files_only=True,
        num_inference_steps=2,
        output_size=12,
        concept_captions=["a cat", "a dog", "a fish"],
    )
    assert isinstance(d.scheduler, DDIMScheduler)
    # as the diffusers SD pipeline does: a config without clip_sample must not clip latents
    assert d.scheduler.config.clip_sample is False and d.scheduler.config.steps_offset == 1
    assert d.config.kind == "latent" and d.config.image_size == 16 and d.config.latent_size == 8
    assert d.prompt_shape == (6, 16)
    emb = d.encode_text(["a cat", "a dog"])
    assert emb.shape == (2, 6, 16)
    assert d.concept_embeddings().shape == (3, 6, 16)
    prompt = d.random_prompt(2, generator=gen()).requires_grad_(True)
    x = d.sample(prompt, generator=gen(1))
    assert x.shape == (2, 3, 12, 12) and 0 <= x.min() and x.max() <= 1
    x.mean().backward()
    assert prompt.grad.abs().sum() > 0
    assert all(p.grad is None for p in d.parameters())
    # per-block checkpointing of the UNet and of the VAE decoder: same images and gradient
    g_plain = prompt.grad.clone()
    prompt.grad = None
    d.config.gradient_checkpointing = True
    x_ckpt = d.sample(prompt, generator=gen(1))
    assert d.unet.is_gradient_checkpointing and d.vae.is_gradient_checkpointing
    x_ckpt.mean().backward()
    torch.testing.assert_close(x_ckpt, x)
    torch.testing.assert_close(prompt.grad, g_plain, atol=1e-6, rtol=1e-4)
    d.config.gradient_checkpointing = False
    # guidance with the CLIP empty prompt, and our own save/load round trip
    d.config.guidance_scale = 3.0
    y = d.sample(prompt.detach(), generator=gen(1))
    d.save_pretrained(tmp_path / "ours")
    d2 = Dreamer.from_pretrained(tmp_path / "ours", device="cpu")
    torch.testing.assert_close(d2.sample(prompt.detach(), generator=gen(1)), y)
    torch.testing.assert_close(d2.encode_text(["a cat"]), emb[:1])
    # the learner's resolution picks the latent size (at least 32, a multiple of 8)
    d3 = Dreamer.from_pretrained(root, device="cpu", local_files_only=True, resolution=20)
    assert (d3.config.latent_size, d3.config.image_size, d3.config.out_size) == (32, 64, 20)
    with pytest.raises(ValueError, match="latent_size=8 x VAE scale factor 2"):
        Dreamer.from_pretrained(root, device="cpu", local_files_only=True, image_size=20)
    # no ImageNet weights in the (empty) torch hub cache: None with a warning, no download
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.warns(UserWarning, match="no reference network"):
        assert d2.reference_network() is None
