"""What a result must carry to be comparable: versions, git hash, hardware."""

from __future__ import annotations

import platform
import subprocess
from functools import lru_cache
from importlib import metadata
from pathlib import Path

from . import __version__

PACKAGES = ("torch", "diffusers", "transformers", "accelerate", "safetensors", "nudenet", "onnxruntime",
            "open_clip_torch", "clean-fid", "numpy", "pillow")


def package_versions() -> dict[str, str | None]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


@lru_cache(maxsize=1)
def git_state() -> dict:
    """Commit and dirtiness of the cpebench checkout (None when installed from a wheel)."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return {"commit": None, "dirty": None}
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10)
        return {"commit": commit.stdout.strip(), "dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}


def code_version() -> str:
    g = git_state()
    return f"{__version__}+{g['commit'][:10]}{'.dirty' if g['dirty'] else ''}" if g["commit"] else __version__


def hardware(device: str) -> dict:
    import torch

    info = {"device": device, "cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads()}
    if str(device).startswith("cuda") and torch.cuda.is_available():
        idx = torch.device(device).index or 0
        info["gpu"] = torch.cuda.get_device_name(idx)
        info["cuda"] = torch.version.cuda
    return info
