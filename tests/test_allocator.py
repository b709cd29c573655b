"""The CPU allocator setting of the command's processes: fewer page faults, the same numbers.

The setting is process-wide, so its effect is measured in child processes (the test process's
own allocator is left alone)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from avalanche_d2l import cli
from avalanche_d2l.core import allocator

# a conv layer's training step at the size of a Genifer GAN step's first feature maps (64 x 32 x
# 16 x 16 floats = 2 MiB per map): page faults per step and the loss, with or without the setting
WORKLOAD = textwrap.dedent(
    """
    import json, resource, sys, torch
    from torch import nn
    torch.set_num_threads(1)
    info = None
    if sys.argv[1] == "reuse":
        from avalanche_d2l.core.allocator import reuse_freed_memory
        info = reuse_freed_memory()
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(),
    )
    x = torch.rand(64, 1, 16, 16)
    def step():
        loss = net(x).square().mean()
        loss.backward()
        return loss.item()
    for _ in range(3):
        step()
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    losses = [step() for _ in range(20)]
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / 20
    print(json.dumps({"faults": faults, "losses": losses, "info": info}))
    """
)

glibc = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only"
)


def _workload(mode: str, env: dict | None = None) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", WORKLOAD, mode],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc
def test_reusing_freed_memory_removes_the_page_faults_and_keeps_the_numbers():
    default = _workload("default")
    reused = _workload("reuse")
    assert reused["info"] == {
        "allocator": "glibc",
        "mmap_threshold_mb": 256,
        "trim_threshold_mb": 512,
    }
    # glibc's defaults give the 2 MiB maps back and fault them in again on every step
    assert default["faults"] > 500, default["faults"]
    assert reused["faults"] < default["faults"] / 20, (reused["faults"], default["faults"])
    assert reused["losses"] == default["losses"]  # where memory comes from, never a value


@glibc
def test_the_environment_switch_leaves_the_defaults():
    off = _workload("reuse", {allocator.ENV_VAR: "default"})
    assert off["info"] == {"allocator": "unchanged", "reason": f"{allocator.ENV_VAR}=default"}
    assert off["faults"] > 500


def test_thresholds_glibc_refuses_are_rejected_before_anything_is_set():
    with pytest.raises(ValueError, match="between 1 and 2047"):
        allocator.reuse_freed_memory(mmap_threshold_mb=4096)


def test_the_command_sets_the_allocator_before_running_main(monkeypatch):
    calls = []
    monkeypatch.setattr(allocator, "reuse_freed_memory", lambda: calls.append("reuse") or {})
    monkeypatch.setattr(cli, "main", lambda argv=None: calls.append("main") or 0)
    assert cli.entry() == 0
    assert calls == ["reuse", "main"]
