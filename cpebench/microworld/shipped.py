"""The micro-world model that ships with cpebench (``--model micro``) and its judge.

The package holds the pipeline's weights (fp16 safetensors), configs and build record in ``model/``,
without the tokenizer: its 3.5 MB of vocab.json/merges.txt are the real CLIP BPE that open_clip's wheel
already ships. On first use the folder is completed into a full diffusers pipeline folder in the user
cache (``<cache>/models/micro-<hash of the shipped files>``), so every later load is the ordinary
``StableDiffusionPipeline.from_pretrained`` path.

``python -m cpebench.microworld.shipped DIR`` copies a finished ``cpebench microworld build --out DIR``
into the package (what a maintainer does after rebuilding the model).
"""

from __future__ import annotations

import functools
import hashlib
import shutil
import sys
from pathlib import Path

from ..errors import ModelLoadError
from .build import JUDGE_FILE

SHIPPED = Path(__file__).parent / "model"
_NOT_SHIPPED = ("tokenizer",)          # rebuilt from open_clip's wheel


def files(root: Path = SHIPPED) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.relative_to(root).parts[0] not in _NOT_SHIPPED)


@functools.lru_cache(maxsize=4)
def fingerprint(root: Path = SHIPPED) -> str:
    """sha256 over the shipped files' relative paths and bytes."""
    h = hashlib.sha256()
    for p in files(root):
        h.update(p.relative_to(root).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def _check_shipped() -> None:
    if not (SHIPPED / "model_index.json").is_file():
        raise ModelLoadError(
            f"--model micro: this cpebench install has no micro-world weights ({SHIPPED}); build them with "
            "`cpebench microworld build --out DIR` and pass --model DIR")


def model_dir() -> Path:
    """The shipped model as a complete diffusers folder in the user cache (made once)."""
    from .. import data
    from ..models import build_once, write_clip_tokenizer_files

    _check_shipped()

    def materialise(tmp: Path) -> None:
        for p in files():
            dest = tmp / p.relative_to(SHIPPED)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(p, dest)
        write_clip_tokenizer_files(tmp / "tokenizer")

    return build_once(data.cache_dir() / "models" / f"micro-{fingerprint()[:16]}", "model_index.json", materialise)


def judge_path() -> Path:
    _check_shipped()
    return SHIPPED / JUDGE_FILE


def install(build_dir: str | Path) -> None:
    """Copy a finished build into the package (replacing the shipped model)."""
    src = Path(build_dir)
    if not (src / "model_index.json").is_file() or not (src / JUDGE_FILE).is_file():
        raise ModelLoadError(f"{src}: not a finished `cpebench microworld build` folder (model_index.json and "
                             f"{JUDGE_FILE} expected)")
    shutil.rmtree(SHIPPED, ignore_errors=True)
    fingerprint.cache_clear()
    for p in files(src):
        dest = SHIPPED / p.relative_to(src)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(p, dest)
    size = sum(p.stat().st_size for p in files())
    print(f"installed {len(files())} files, {size / 2**20:.1f} MiB, into {SHIPPED}")


if __name__ == "__main__":
    install(sys.argv[1])
