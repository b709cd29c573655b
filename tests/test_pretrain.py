"""Tests of the offline glyph world and the offline dreamer's pretraining and cache (tiny, CPU)."""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import pytest
import torch
from tiny_models import TINY_UNET, tiny_pixel_dreamer

from avalanche_d2l.dreaming import Dreamer
from avalanche_d2l.dreaming import folders as folders_mod
from avalanche_d2l.dreaming import pretrain as pretrain_mod
from avalanche_d2l.dreaming.dreamer import make_reference
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
            assert x3[i][:, m].mean() > x3[i][:, ~m].mean()
    # grey and coloured dreamers live in different cache folders
    grey_key = pretrain_mod.dreamer_key(*pretrain_mod.resolve_pretrain_config(channels=1))
    rgb_key = pretrain_mod.dreamer_key(*pretrain_mod.resolve_pretrain_config(channels=3))
    assert grey_key != rgb_key and "_rgb_" in rgb_key
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        pretrain_offline_dreamer("unused", steps=1, channels=2)


# ---- cache: keys, atomic writes, damaged folders (a fake trainer: no real pretraining) ----------


def tiny_trained(pc, gc) -> Dreamer:
    """What ``_train`` would return for these settings, made instantly: a tiny random dreamer
    with a reference network, at the requested native size and channels."""
    from avalanche_d2l.models.classifiers import small_cnn

    C = 3 if gc.color else 1
    d = tiny_dreamer(image_size=pc.image_size, channels=C, seed=pc.seed)
    spec = {
        "arch": "small_cnn",
        "num_classes": 5,
        "in_channels": C,
        "width": 4,
        "in_size": pc.image_size,
    }
    d._reference = make_reference(small_cnn(5, C, 4), spec=spec, config=d.config)
    return d


@pytest.fixture
def fake_train(monkeypatch, tmp_path):
    """Replace the training (not the saving) with :func:`tiny_trained`; records its calls."""
    calls = []

    def train(out_dir, pc, gc, progress):
        calls.append((pc, gc))
        d = tiny_trained(pc, gc)
        info = {
            "fake": True,
            "seed": pc.seed,
            "loss_first": 1.0,
            "loss_final": 0.5,
            "train_seconds": 0.0,
            "reference_accuracy_on_samples": {},
            "chance": 0.2,
        }
        d.save_pretrained(out_dir, training_info=info)
        return d

    monkeypatch.setattr(pretrain_mod, "_train", train)
    monkeypatch.setenv("AVALANCHE_D2L_CACHE", str(tmp_path / "cache"))
    return calls


def cache_entries() -> list[str]:
    root = pretrain_mod.default_cache_dir()
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def small_request(**kw):
    """Load-or-pretrain settings that are never the shipped dreamer's."""
    return {"steps": 7, "progress": False, **kw}


def test_cache_is_reused_and_keyed_by_every_setting(fake_train):
    assert pretrain_mod.offline_dreamer_available(steps=7) is None
    a = pretrain_mod.load_or_pretrain_offline_dreamer(**small_request())
    assert a.offline_source["source"] == "pretrained" and len(fake_train) == 1
    assert pretrain_mod.offline_dreamer_available(steps=7) == "cache"
    b = pretrain_mod.load_or_pretrain_offline_dreamer(**small_request())
    assert b.offline_source["source"] == "cache" and len(fake_train) == 1
    assert b.training_info["fake"] and b.training_info["seed"] == 0
    assert cache_entries() == [a.offline_source["key"]]  # no temporary folders left
    # every setting that changes the weights gets its own folder
    for kw in (
        {"steps": 8},
        {"seed": 1},
        {"batch_size": 8},
        {"lr": 1e-3},
        {"image_size": 8},
        {"channels": 3},
        {"glyph_config": GlyphConfig(chars="ABC")},
    ):
        pretrain_mod.load_or_pretrain_offline_dreamer(**small_request(**kw))
    assert len(fake_train) == 8 and len(cache_entries()) == 8
    pc, gc = fake_train[-1]
    assert gc.chars == "ABC" and pc.steps == 7
    # the manifest records the settings, the command and the hashes
    folder = pretrain_mod.default_cache_dir() / a.offline_source["key"]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["key"] == folder.name
    assert manifest["fingerprint"]["pretrain"]["steps"] == 7
    assert manifest["command"].startswith("avalanche-d2l pretrain-dreamer --image-size 16 ")
    assert "--steps 7 --batch-size 64" in manifest["command"]
    assert manifest["weights_digest"] == pretrain_mod.weights_digest(b)


def test_cli_batch_size_changes_the_cache_folder(fake_train, capsys):
    assert pretrain_mod.main(["--steps", "5", "--batch-size", "8", "--no-progress"]) == 0
    assert pretrain_mod.main(["--steps", "5", "--batch-size", "16", "--no-progress"]) == 0
    names = cache_entries()
    assert len(names) == 2 and {n.split("_b")[1][:2] for n in names} == {"8_", "16"}
    assert [pc.batch_size for pc, _ in fake_train] == [8, 16]
    # what the command wrote is what the strategies load for the same settings
    d = pretrain_mod.load_or_pretrain_offline_dreamer(**small_request(steps=5, batch_size=8))
    assert d.offline_source["source"] == "cache" and len(fake_train) == 2
    assert "weights digest" in capsys.readouterr().out


def test_interrupt_while_saving_leaves_nothing_and_next_call_rebuilds(fake_train, monkeypatch):
    real_save = Dreamer.save_pretrained

    def save_then_interrupt(self, path, **kw):
        Path(path).mkdir(parents=True, exist_ok=True)
        (Path(path) / "dreamer_config.json").write_text(json.dumps(self.config.to_dict()))
        raise KeyboardInterrupt  # SIGINT after the config, before the weights

    monkeypatch.setattr(Dreamer, "save_pretrained", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        pretrain_mod.load_or_pretrain_offline_dreamer(**small_request())
    assert cache_entries() == []  # no half folder, no temporary folder
    monkeypatch.setattr(Dreamer, "save_pretrained", real_save)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing broken to report: it simply builds
        d = pretrain_mod.load_or_pretrain_offline_dreamer(**small_request())
    assert d.offline_source["source"] == "pretrained" and len(fake_train) == 2
    assert d.sample(d.random_prompt(2, generator=gen()), generator=gen()).shape == (2, 1, 16, 16)


SIGINT_CHILD = """
import json, sys, time
from pathlib import Path
import torch
from avalanche_d2l.dreaming import pretrain as P
from tiny_models import tiny_pixel_dreamer

def train(out_dir, pc, gc, progress):
    d = tiny_pixel_dreamer(image_size=pc.image_size)
    (Path(out_dir) / "dreamer_config.json").write_text(json.dumps(d.config.to_dict()))
    Path(sys.argv[1]).write_text("saving")  # the parent sends SIGINT now
    time.sleep(60)
    d.save_pretrained(out_dir)
    return d

P._train = train
P.load_or_pretrain_offline_dreamer(steps=7, progress=False)
"""


@pytest.mark.slow  # a fresh interpreter imports torch and diffusers: ~10-25 s
def test_real_sigint_while_saving_then_next_call_rebuilds(fake_train, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    marker = tmp_path / "marker"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]
        ),
    }
    child = subprocess.Popen(
        [sys.executable, "-c", SIGINT_CHILD, str(marker)],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while not marker.exists() and child.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert marker.exists(), child.stderr.read() if child.poll() is not None else "timeout"
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
    assert child.returncode != 0 and "KeyboardInterrupt" in err
    assert cache_entries() == []  # no half folder, no temporary folder
    d = pretrain_mod.load_or_pretrain_offline_dreamer(**small_request())
    assert d.offline_source["source"] == "pretrained" and len(fake_train) == 1


def test_temporary_folders_of_killed_processes_are_removed(fake_train, tmp_path):
    import subprocess
    import sys

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    out = tmp_path / "d"
    live = Path(folders_mod._temp_prefix(out, "tmp") + "x")  # this process: running
    stale = Path(folders_mod._temp_prefix(out, "tmp").replace(f"-{os.getpid()}-", f"-{dead}-"))
    for p in (tmp_path / live, tmp_path / (stale.name + "x")):
        p.mkdir()
        (p / "unet").mkdir()
    assert pretrain_mod.main(["--out", str(out), "--steps", "5", "--no-progress"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["d", live.name])


def test_cli_interrupt_keeps_the_previous_out_folder(fake_train, monkeypatch, tmp_path, capsys):
    out = tmp_path / "out"
    assert pretrain_mod.main(["--out", str(out), "--steps", "5", "--no-progress"]) == 0
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def interrupt(self, path, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(Dreamer, "save_pretrained", interrupt)
    assert (
        pretrain_mod.main(["--out", str(out), "--steps", "5", "--seed", "1", "--no-progress"])
        == 130
    )
    assert "left as it was" in capsys.readouterr().err
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before and sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_half_written_or_corrupt_cache_is_moved_aside_and_rebuilt(fake_train):
    d = pretrain_mod.load_or_pretrain_offline_dreamer(**small_request())
    folder = pretrain_mod.default_cache_dir() / d.offline_source["key"]
    # 1. random bytes in a weight file: fails its recorded sha256
    weights = folder / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(os.urandom(64))
    with pytest.warns(UserWarning, match=re.escape(str(folder))) as rec:
        d2 = pretrain_mod.load_or_pretrain_offline_dreamer(**small_request())
    assert "sha256" in str(rec[0].message) and "moved it to" in str(rec[0].message)
    assert d2.offline_source["source"] == "pretrained" and len(fake_train) == 2
    broken = [n for n in cache_entries() if ".broken-" in n]
    assert len(broken) == 1 and broken[0].startswith(folder.name)
    assert pretrain_mod.verify_dreamer_dir(folder)["key"] == folder.name  # rebuilt, intact
    # 2. the old non-atomic failure: a config without weights (and no manifest)
    for p in sorted(folder.rglob("*"), reverse=True):
        if p.name != "dreamer_config.json":
            p.unlink() if p.is_file() else p.rmdir()
    with pytest.warns(UserWarning, match="does not load"):
        d3 = pretrain_mod.load_or_pretrain_offline_dreamer(**small_request())
    assert d3.offline_source["source"] == "pretrained" and len(fake_train) == 3
    assert len([n for n in cache_entries() if ".broken-" in n]) == 2


def test_out_folder_is_replaced_whole_and_bad_out_is_refused(fake_train, tmp_path, capsys):
    out = tmp_path / "dreamer"
    assert pretrain_mod.main(["--out", str(out), "--steps", "5", "--no-progress"]) == 0
    # a file the saved dreamer does not list would be lost: refused before any training
    stale = out / "unet" / "notes.txt"
    stale.write_text("mine")
    assert pretrain_mod.main(["--out", str(out), "--steps", "6", "--no-progress"]) == 2
    assert "unet/notes.txt" in capsys.readouterr().err and stale.read_text() == "mine"
    assert len(fake_train) == 1
    stale.unlink()
    assert pretrain_mod.main(["--out", str(out), "--steps", "6", "--no-progress"]) == 0
    assert json.loads((out / "manifest.json").read_text())["fingerprint"]["pretrain"]["steps"] == 6
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dreamer"]
    # a folder of other files, and a file, are refused before any training
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    assert pretrain_mod.main(["--out", str(other), "--steps", "5", "--no-progress"]) == 2
    assert "does not hold a saved dreamer" in capsys.readouterr().err
    assert (other / "keep.txt").read_text() == "mine"
    assert pretrain_mod.main(["--out", str(other / "keep.txt"), "--no-progress"]) == 2
    assert "is a file" in capsys.readouterr().err
    assert len(fake_train) == 2


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--threads", "0"], "--threads: must be >= 1"),
        (["--steps", "0"], "--steps: must be >= 1"),
        (["--batch-size", "-3"], "--batch-size: must be >= 1"),
        (["--seed", "-1"], "--seed: must be >= 0"),
        (["--lr", "0"], "--lr: must be a finite number > 0"),
        (["--steps", "ten"], "--steps: must be a whole number"),
        (["--image-size", "10"], "multiple of 4"),
        (["--channels", "2"], "invalid choice"),
        (["--glyphs", "AB7"], "must not contain digits"),
        (["--glyphs", "A"], "at least 2 characters"),
    ],
)
def test_cli_bad_arguments_are_one_sentence(argv, message, capsys, fake_train):
    with pytest.raises(SystemExit) as exc:
        pretrain_mod.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert fake_train == []


def test_cli_help_lists_the_settings(capsys):
    with pytest.raises(SystemExit) as exc:
        pretrain_mod.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in (
        "--out",
        "--image-size",
        "--channels",
        "--steps",
        "--batch-size",
        "--lr",
        "--seed",
        "--glyphs",
        "--threads",
    ):
        assert flag in out


# ---- the shipped dreamer ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped():
    dreamers = pretrain_mod.shipped_dreamers()
    key = pretrain_mod.dreamer_key(*pretrain_mod.resolve_pretrain_config())
    assert key in dreamers, f"the default 16 px grey dreamer is not shipped: {sorted(dreamers)}"
    return dreamers[key]


def test_shipped_dreamer_matches_its_recorded_hash_and_config(shipped):
    manifest = pretrain_mod.verify_dreamer_dir(shipped)  # every file against its sha256
    assert manifest is not None
    pc, gc = pretrain_mod.resolve_pretrain_config()
    assert manifest["fingerprint"] == pretrain_mod._fingerprint(pc, gc)
    assert manifest["command"] == pretrain_mod.pretrain_command(pc, gc)
    assert manifest["command"].startswith("avalanche-d2l pretrain-dreamer ")
    info = json.loads((shipped / "training_info.json").read_text())
    assert info["pretrain_config"] == dataclasses_asdict(pc)
    assert info["data"]["glyphs"] == gc.chars
    files = manifest["files"]
    assert manifest["weights_sha256"] == pretrain_mod._sha256_json(
        {f: files[f] for f in pretrain_mod.WEIGHT_FILES}
    )
    # recognisable samples: the reference classifier far above chance
    assert min(info["reference_accuracy_on_samples"].values()) > 10 * info["chance"]
    # the files are package data: setup.cfg ships them
    setup = (Path(__file__).resolve().parents[1] / "setup.cfg").read_text()
    assert "data/dreamers/*/*" in setup and "data/dreamers/*/*/*" in setup


def dataclasses_asdict(pc):
    import dataclasses

    return json.loads(json.dumps(dataclasses.asdict(pc)))


def test_default_request_gets_the_shipped_dreamer_at_any_learner_shape(
    shipped, monkeypatch, tmp_path
):
    def no_pretraining(*a, **k):
        raise AssertionError("the shipped dreamer must serve this request without pretraining")

    monkeypatch.setattr(pretrain_mod, "pretrain_offline_dreamer", no_pretraining)
    monkeypatch.setenv("AVALANCHE_D2L_CACHE", str(tmp_path / "cache"))
    assert pretrain_mod.offline_dreamer_available() == "shipped"
    manifest = json.loads((shipped / "manifest.json").read_text())
    for c, s in ((1, 16), (1, 28), (3, 32)):
        d = pretrain_mod.load_or_pretrain_offline_dreamer(
            output_size=s, output_channels=c, progress=False
        )
        src = d.offline_source
        assert src["source"] == "shipped" and Path(src["path"]) == shipped
        assert src["native_shape"] == (1, 16, 16) and src["output_shape"] == (c, s, s)
        assert d.dtype == torch.float32 and not d.training
        x = d.generate(3, torch.tensor([0, 1, 2]), generator=gen())
        assert x.shape == (3, c, s, s) and x.dtype == torch.float32
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0 and float(x.std()) > 0.05
        if c == 3:
            torch.testing.assert_close(x[:, 0], x[:, 2])  # the grey world, repeated
            # mapped samples stay recognisable: the reference (which maps them back) is far
            # above chance (1/85) on one sample per concept
            assert pretrain_mod.evaluate_dreamer(d, per_class=1, guidance_scale=2.0) > 0.3
    assert pretrain_mod.weights_digest(d) == manifest["weights_digest"]
    assert not (tmp_path / "cache").exists()  # the cache is not touched


def test_a_device_error_while_loading_is_not_taken_for_a_damaged_folder(tmp_path, monkeypatch):
    P = pretrain_mod
    """A CUDA failure (out of memory, a busy device) while a dreamer folder loads is raised as
    it is: the folder is neither reported as damaged nor moved aside; a file error still is."""
    folder = tmp_path / "d"
    folder.mkdir()
    monkeypatch.setattr(P, "verify_dreamer_dir", lambda f: None)

    def cuda_fails(*a, **kw):
        raise RuntimeError("CUDA error: out of memory")

    monkeypatch.setattr(Dreamer, "from_pretrained", cuda_fails)
    with pytest.raises(RuntimeError, match="CUDA error"):
        P._load_folder(folder, device="cpu", overrides={})
    assert folder.is_dir()

    def file_fails(*a, **kw):
        raise OSError("unexpected end of file")

    monkeypatch.setattr(Dreamer, "from_pretrained", file_fails)
    with pytest.raises(P.DreamerFolderError, match="does not load"):
        P._load_folder(folder, device="cpu", overrides={})
    assert P.is_device_error(RuntimeError("CUDA error: device-side assert triggered"))
    assert not P.is_device_error(RuntimeError("size mismatch for conv.weight"))
