"""``--dreamer PATH_OR_ID`` on ``run`` and ``compare``, and ``--dry-run`` honouring
``--dreamer-device`` and ``--precision`` (issue 20 item 3).

Before: argparse read ``--dreamer`` as an abbreviation of ``--dreamer-device`` (``device '...' is
not a torch device``) and the dry run ignored both device and precision overrides.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from avalanche_d2l.cli import _parser, main
from avalanche_d2l.experiments import experiment_files


def _command() -> list[str]:
    """The installed console script (``python -m avalanche_d2l`` where it is not on disk)."""
    script = Path(sys.executable).with_name("avalanche-d2l")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "avalanche_d2l"]


def _tiny_sd(root: Path) -> Path:
    """A Stable Diffusion folder in the diffusers layout, built from tiny configs."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    AutoencoderKL(
        block_out_channels=(8, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=16,
    ).save_pretrained(root / "vae")
    UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=16,
        attention_head_dim=2,
    ).save_pretrained(root / "unet")
    PNDMScheduler(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, skip_prk_steps=True
    ).save_pretrained(root / "scheduler")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    files = root / "tokfiles"
    files.mkdir(parents=True)
    (files / "vocab.json").write_text(json.dumps(vocab))
    (files / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(
        vocab_file=str(files / "vocab.json"),
        merges_file=str(files / "merges.txt"),
        model_max_length=8,
    ).save_pretrained(root / "tokenizer")
    CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=8,
        )
    ).save_pretrained(root / "text_encoder")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return root


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """A tiny SD folder, a 10-class Mini-ImageNet-layout folder (16 px), and the shipped
    ``d2l_mini_imagenet`` at CPU sizes whose own dreamer does not exist and whose dreamer
    overrides leave the precision to the command line."""
    tmp = tmp_path_factory.mktemp("cli_dreamer")
    rng = np.random.default_rng(0)
    for c in range(10):
        for split, n in (("train", 2), ("test", 1)):
            folder = tmp / "mini" / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 256, (16, 16, 3)).astype(np.uint8)
                Image.fromarray(img).save(folder / f"{i}.png")
    data = json.loads(experiment_files()["d2l_mini_imagenet"].read_text())
    data = copy.deepcopy(data)
    data["benchmark"].update(expected_classes=10, n_experiences=5, image_size=16)
    data["model"]["width"] = 8
    section = data["strategies"]["d2l"]
    section["dreamer"] = str(tmp / "no_such_dreamer")
    section["dreamer_overrides"] = {"num_inference_steps": 2, "backprop_steps": 1}
    data["strategies"] = {"d2l": section}
    data.update(mem_sizes=[10], seeds=[0], device="cpu", precision="no")
    (tmp / "exp.json").write_text(json.dumps(data))
    return {"sd": _tiny_sd(tmp / "sd"), "mini": tmp / "mini", "exp": tmp / "exp.json"}


def test_dry_run_uses_dreamer_dreamer_device_and_precision(folders):
    """Through the installed command: the file's dreamer does not exist, so the dry run only
    works with --dreamer; the preflight line names the dreamer's device and the precision."""
    cmd = [
        *_command(),
        "run",
        str(folders["exp"]),
        "--data-root",
        str(folders["mini"]),
        "--dreamer",
        str(folders["sd"]),
        "--dreamer-device",
        "cpu",
        "--precision",
        "bf16",
        "--device",
        "cpu",
        "--quick",
        "--dry-run",
        "--no-progress",
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "preflight on cpu (dreamer on cpu, precision bf16)" in proc.stdout
    (report,) = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    assert report["strategy"] == "d2l" and report["train_step_s"] > 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_dry_run_checks_the_dreamer_device(folders, capsys):
    """--dreamer-device is no longer ignored by --dry-run: a device that is not there stops it
    with the runner's message (exit 2) before anything is built."""
    code = main(
        ["run", str(folders["exp"]), "--data-root", str(folders["mini"]), "--dry-run"]
        + ["--dreamer", str(folders["sd"]), "--dreamer-device", "cuda:0"]
    )
    assert code == 2
    assert "torch sees no CUDA GPU" in capsys.readouterr().err


def test_dreamer_is_its_own_flag_on_run_and_compare():
    parser = _parser()
    for command in (["run", "x"], ["compare"]):
        args = parser.parse_args([*command, "--dreamer", "org/model"])
        assert args.dreamer == "org/model" and args.dreamer_device is None
        with pytest.raises(SystemExit):  # abbreviations are refused, not guessed
            parser.parse_args([*command, "--dreamer-dev", "cpu"])


def test_compare_dreamer_reaches_the_experiment(capsys):
    """compare --dreamer is applied to the strategies that have a dreamer; with none among
    them the command says so (exit 2) instead of ignoring the flag."""
    code = main(["compare", "--strategies", "naive", "--dreamer", "org/model", "--no-progress"])
    assert code == 2
    assert "--dreamer given, but none of naive uses a dreamer" in capsys.readouterr().err
