"""``bash benchmarks/gpu_check.sh --cpu-smoke``: the GPU check's steps on the CPU with tiny models.

The check is run once on a lent GPU machine with no second try, so its every step is run here as
it will run there (same script, same commands, tiny sizes). The SD build, D2L's dreaming phase,
the dry run and Genifer's GAN timing must succeed and write their figures; the 2-process step
(2 processes, then 1 for comparison, capped at 90 s here) must record what happened: when it ends
"ok" both runs exited 0 and wrote results; tests/test_distributed.py tests the 2-process training
itself.

Marked ``slow`` (about 80 s of the 2-core machine, the suite's longest item): run it with
``python -m pytest -m slow tests/test_gpu_check.py`` before spending a lent GPU's minutes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("gpu_check")
    env = {
        **os.environ,
        "PY": sys.executable,
        "OUT": str(tmp / "out"),
        "WORK": str(tmp / "work"),
        "SITE": str(tmp / "site"),
        "DEADLINE_S": "400",  # generous: a loaded CI machine must not skip steps
    }
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--cpu-smoke"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads((tmp / "out" / "gpu_check.json").read_text())
    return {"data": data, "out": tmp / "out", "work": tmp / "work", "stdout": proc.stdout}


def _ok(data: dict, name: str) -> dict:
    step = data["steps"][name]
    assert step["status"] == "ok", f"{name}: {step.get('error')}\n{step.get('traceback', '')}"
    return step


def test_record_is_complete(smoke):
    data = smoke["data"]
    assert data["mode"] == "cpu-smoke" and data["finished"] is True
    assert data["env"]["device"] == "cpu" and data["env"]["torch"]
    assert list(data["steps"]) == ["sd15", "dream", "dry_run", "genifer", "two_proc"]
    assert (smoke["out"] / "gpu_check.log").stat().st_size > 0  # the script's whole output
    assert "missing: none" in smoke["stdout"]  # nothing to install where the package is


def test_sd_folder_in_the_diffusers_layout(smoke):
    step = _ok(smoke["data"], "sd15")
    folder = Path(step["path"])
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (folder / part).is_dir(), part
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert step["tiny"] is True and step["build_s"] > 0
    assert step["params_total"] == sum(step["params"].values()) > 0
    assert step["bytes_on_disk"] > 4 * step["params_total"] * 0.9  # fp32 weights written


def test_dreaming_phase_measured_through_d2l(smoke):
    step = _ok(smoke["data"], "dream")
    few, many = step["classes"]
    phases = step["phases"]
    assert set(phases) == {f"{few}x1", f"{many}x1", f"{few}x2", f"{many}x2"}
    for key, phase in phases.items():
        n, s = (int(v) for v in key.split("x"))
        assert phase["dream_classes"] == n and phase["steps"] == s
        assert phase["phase_s"] > 0
        assert phase["peak_alloc_gib"] is None  # CPU: no device memory to read
        reported = phase["reported"]
        if "steps" in reported:  # D2L's own account: the phase optimised as many steps
            assert reported["steps"] == s
    # micro-batches of whole classes: more dream classes, more passes per step
    assert phases[f"{many}x1"]["passes_per_step"] > phases[f"{few}x1"]["passes_per_step"] >= 1
    for n in (few, many):
        figures = step["per_classes"][str(n)]
        assert isinstance(figures["s_per_step"], float)
        assert isinstance(figures["s_per_pass"], float)
        assert figures["phase_s"] == phases[f"{n}x2"]["phase_s"]
    assert step["warmup"]["dream_classes"] == many


def test_readme_dry_run_with_a_local_dreamer(smoke):
    step = _ok(smoke["data"], "dry_run")
    assert step["rc"] == 0
    assert "--dreamer" in step["command"] and "--dry-run" in step["command"]
    assert "preflight on cpu (dreamer on cpu, precision no)" in step["log_tail"]
    (report,) = step["reports"]
    assert report["strategy"] == "d2l" and report["train_step_s"] > 0


def test_genifer_gan_steps_per_second(smoke):
    step = _ok(smoke["data"], "genifer")
    assert step["gan_steps_per_s"] > 0 and step["gan_images_per_s"] > 0
    assert step["image_shape"] == [3, 32, 32] and step["feature_layer"] == "layer3"


def test_two_processes_recorded(smoke):
    step = smoke["data"]["steps"]["two_proc"]
    assert step["status"] in ("ok", "error", "timeout", "skipped")
    if step["status"] == "skipped":
        assert "needed" in step["reason"]
        return
    assert "--nproc_per_node 2" in step["command"]
    if step["status"] == "ok":
        assert step["rc"] == 0 and step["one_proc"]["rc"] == 0
        assert set(step["final_accuracy"]) == {"one", "two"}
    else:
        assert step["error"]  # what failed, in words
        assert (smoke["out"] / "two_proc.log").is_file()
