"""Dreamer folders on disk: the cache location, the shipped dreamers, manifests with hashes,
verification, and atomic replacement (temporary siblings, dead temporaries removed)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch

from .config import CONFIG_NAME
from .dreamer import Dreamer

NATIVE_SIZE = 16
#: written last into every dreamer folder: settings, key, the command, sha256 of every file
MANIFEST_NAME = "manifest.json"
#: the files that hold weights (their sha256 is the folder's ``weights_sha256``)
WEIGHT_FILES = ("unet/diffusion_pytorch_model.safetensors", "concepts.pt", "reference/model.pt")
#: where the package's pretrained dreamers live (package data)
SHIPPED_ROOT = Path(__file__).resolve().parents[1] / "data" / "dreamers"


def _sha256_json(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def default_cache_dir() -> Path:
    """``$AVALANCHE_D2L_CACHE`` or ``~/.cache/avalanche_d2l``."""
    env = os.environ.get("AVALANCHE_D2L_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "avalanche_d2l"


def _versions() -> dict[str, str]:
    import diffusers
    import matplotlib

    return {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "matplotlib": matplotlib.__version__,
    }


def weights_digest(dreamer: Dreamer) -> str:
    """sha256 of the dreamer's weights as float32 values (UNet, concepts, reference network).

    Independent of the file format, so a reproduction can be compared with a saved dreamer.
    """
    tensors: dict[str, torch.Tensor] = {
        f"unet.{k}": v for k, v in dreamer.unet.state_dict().items()
    }
    for name in ("concept_table", "null_prompt"):
        t = getattr(dreamer, name)
        if t is not None:
            tensors[name] = t
    ref = dreamer.reference_network()
    if ref is not None:
        tensors.update({f"reference.{k}": v for k, v in ref.net.state_dict().items()})
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        if t.is_floating_point():
            t = t.float()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


class DreamerFolderError(RuntimeError):
    """A dreamer folder is incomplete, corrupt or does not load (``path`` says which)."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


def verify_dreamer_dir(folder: str | os.PathLike) -> dict | None:
    """Check a dreamer folder against its ``manifest.json``; the manifest, or ``None`` without one.

    Raises:
        DreamerFolderError: no ``dreamer_config.json``, an unreadable manifest, or a file
            missing or with another sha256 than recorded.
    """
    folder = Path(folder)
    if not (folder / CONFIG_NAME).is_file():
        raise DreamerFolderError(folder, f"no {CONFIG_NAME} (not a complete dreamer folder)")
    path = folder / MANIFEST_NAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        files = dict(manifest["files"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DreamerFolderError(folder, f"unreadable {MANIFEST_NAME} ({err})") from err
    for rel, expected in files.items():
        p = folder / rel
        if not p.is_file():
            raise DreamerFolderError(folder, f"{rel} is missing")
        if _sha256_file(p) != expected:
            raise DreamerFolderError(folder, f"{rel} does not match its recorded sha256")
    return manifest


# ------------------------------------------------------------------------------------------------
# atomic folders


def _make_temp_sibling(target: Path) -> Path:
    """A fresh temporary folder beside ``target`` (same file system: the rename is atomic)."""
    if target.exists() and not target.is_dir():
        raise ValueError(f"{target} is a file; pass a folder path for the dreamer")
    if target.is_dir() and any(target.iterdir()):
        if not (target / CONFIG_NAME).is_file():
            raise ValueError(
                f"{target} is a non-empty folder that does not hold a saved dreamer; pass a new "
                "or empty folder (a dreamer folder is replaced as a whole)"
            )
        others = _files_not_in_manifest(target)
        if others:
            raise ValueError(
                f"{target} holds a saved dreamer and other files ({', '.join(others[:3])}"
                f"{', ...' if len(others) > 3 else ''}), which replacing it would delete; move "
                "them out or pass another folder"
            )
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        _remove_dead_temps(target)
        return Path(tempfile.mkdtemp(prefix=_temp_prefix(target, "tmp"), dir=target.parent))
    except OSError as err:
        raise OSError(
            f"cannot write beside {target} ({err.strerror or err}); pass a folder in a "
            "writable location"
        ) from err


def _files_not_in_manifest(folder: Path) -> list[str]:
    """Files under ``folder`` that its manifest does not list (none without a manifest: a folder
    saved before manifests existed is taken as a whole)."""
    try:
        listed = set(json.loads((folder / MANIFEST_NAME).read_text())["files"]) | {MANIFEST_NAME}
    except (OSError, ValueError, KeyError, TypeError):
        return []
    found = (p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    return sorted(rel for rel in found if rel not in listed)


def _temp_prefix(target: Path, kind: str) -> str:
    """``.<name>.<kind>-<host>-<pid>-``: hidden, and says which process owns it."""
    host = "".join(c if c.isalnum() else "_" for c in socket.gethostname())
    return f".{target.name}.{kind}-{host}-{os.getpid()}-"


def _remove_dead_temps(target: Path) -> None:
    """Remove temporary siblings of ``target`` left by killed processes of this host (a
    SIGKILL skips the clean-up); those of running processes and other hosts are kept."""
    host = "".join(c if c.isalnum() else "_" for c in socket.gethostname())
    for kind in ("tmp", "old"):
        for p in target.parent.glob(f".{target.name}.{kind}-{host}-*-*"):
            pid = p.name[len(f".{target.name}.{kind}-{host}-") :].split("-")[0]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def _replace_dir(tmp: Path, target: Path) -> None:
    """Move the finished ``tmp`` to ``target``, replacing an existing folder as a whole."""
    try:
        os.rename(tmp, target)  # target absent (or an empty folder): one atomic step
        return
    except OSError:
        if not target.is_dir():
            raise
    old = target.with_name(_temp_prefix(target, "old") + uuid.uuid4().hex[:8])
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# shipped dreamers, cache, loading


def shipped_dreamers() -> dict[str, Path]:
    """``{key: folder}`` of the dreamers shipped with the package (see :func:`dreamer_key`)."""
    out = {}
    if SHIPPED_ROOT.is_dir():
        for manifest in sorted(SHIPPED_ROOT.glob(f"*/{MANIFEST_NAME}")):
            try:
                out[json.loads(manifest.read_text())["key"]] = manifest.parent
            except (OSError, ValueError, KeyError, TypeError):
                continue  # reported by verify_dreamer_dir when that folder is requested
    return out
