"""Batched, deterministic, resumable image generation.

Determinism contract (protocol v1, G9): every prompt row has its own CPU generator seeded with the
row's seed; the row's ``(k, 4, H/8, W/8)`` noise is drawn in one call and image i is slice i. So an
image depends on its row, never on the batch it shared.

Resumability: each PNG is written atomically (temp file + rename) and only then recorded in the
manifest (one JSON line, flushed and fsynced). A killed run restarts with the batch that was in
flight; batches are a fixed partition of the shard's work list, so a resumed run computes every
image with exactly the same batch as an uninterrupted run would.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import re
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .config import ProtocolConfig
from .data import PromptRecord
from .errors import ConfigError, CpebenchError

log = logging.getLogger(__name__)

SCHEDULERS = {
    "pndm": "PNDMScheduler",
    "ddim": "DDIMScheduler",
    "lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpm": "DPMSolverMultistepScheduler",
}
MANIFEST = "manifest.jsonl"


@dataclass(frozen=True)
class WorkItem:
    """One image to generate: (prompt set, row, image index) plus the sampling knobs of its row."""

    set_name: str
    record: PromptRecord
    index: int                 # image index within the row
    images_per_row: int
    negative_prompt: str
    guidance: float

    @property
    def key(self) -> str:
        return f"{self.set_name}/{self.record.id}/{self.index}"

    @property
    def file(self) -> str:
        safe_id = re.sub(r"[^A-Za-z0-9._-]", "_", self.record.id)
        return f"images/{self.set_name}/{safe_id}_{self.index}.png"


def plan_items(set_name: str, records: Sequence[PromptRecord], *, images_per_row: int, negative_prompt: str,
               default_guidance: float, per_row_guidance: bool) -> list[WorkItem]:
    items = []
    for r in records:
        g = r.guidance if (per_row_guidance and r.guidance is not None) else default_guidance
        for i in range(images_per_row):
            items.append(WorkItem(set_name, r, i, images_per_row, negative_prompt, float(g)))
    return items


def make_scheduler(name: str, base_config):
    import diffusers

    if name not in SCHEDULERS:
        raise ConfigError(f"protocol.scheduler: unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    cls = getattr(diffusers, SCHEDULERS[name])
    scheduler = cls.from_config(base_config)
    # As diffusers' StableDiffusionPipeline does on load: SD-1.x needs steps_offset=1, and x0 clipping
    # (DDIM's default clip_sample=True) is meant for pixel-space models, not SD's latents.
    fixes = {}
    if getattr(scheduler.config, "clip_sample", False):
        fixes["clip_sample"] = False
    if getattr(scheduler.config, "steps_offset", 1) != 1:
        fixes["steps_offset"] = 1
    if not fixes:
        return scheduler
    public = {k: v for k, v in scheduler.config.items() if not k.startswith("_")}  # _use_default_values would undo fixes
    return cls.from_config({**public, **fixes})


def initial_noise(item: WorkItem, shape: tuple, rng: str, device) -> torch.Tensor:
    """The row's noise, image ``item.index`` of it (float32)."""
    k = item.images_per_row
    if rng == "cpu":
        g = torch.Generator("cpu").manual_seed(int(item.record.seed))
        return torch.randn((k, *shape), generator=g, dtype=torch.float32)[item.index]
    if rng == "cuda_default":  # CPE's code: re-seed the default CUDA generator per row
        if not torch.cuda.is_available():
            raise ConfigError("protocol.rng=cuda_default needs a CUDA device")
        torch.cuda.manual_seed(int(item.record.seed))
        return torch.randn((k, *shape), device="cuda", dtype=torch.float32)[item.index].cpu()
    raise ConfigError(f"protocol.rng: unknown {rng!r}; choose cpu or cuda_default")


def png_bytes(array: np.ndarray, compress_level: int = 6) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def atomic_write(path: Path, payload: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def remove_stale_temp_files(run_dir: Path) -> int:
    """Delete the half-written ``.<name>.tmp<pid>`` files of writers that are gone (a killed run);
    a live process's file (another rank on this machine) is left alone."""
    removed = 0
    for tmp in Path(run_dir).glob("images/**/.*.tmp*"):
        pid = tmp.name.rsplit(".tmp", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and _alive(int(pid)):
            continue
        tmp.unlink(missing_ok=True)
        removed += 1
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --------------------------------------------------------------------------- manifest


def manifest_paths(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("manifest*.jsonl"))


def read_jsonl(path: Path, repair: bool = False) -> list[dict]:
    """Read a JSON-lines file; a torn last line (killed mid-write) is dropped (and cut off if ``repair``)."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    out, good_bytes = [], 0
    for i, line in enumerate(lines):
        if not line.strip():
            good_bytes += len(line) + (1 if i < len(lines) - 1 else 0)
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1 and any(l.strip() for l in lines[i + 1:]):
                raise CpebenchError(f"{path}: line {i + 1} is not valid JSON (the file was edited or corrupted)")
            log.warning("%s: dropping a torn last line (interrupted write)", path)
            if repair:
                with open(path, "r+b") as f:
                    f.truncate(good_bytes)
            break
        good_bytes += len(line) + 1
    return out


def read_manifest(run_dir: Path) -> dict[str, dict]:
    """key -> entry, over the merged manifest and any shard manifests."""
    entries: dict[str, dict] = {}
    for p in manifest_paths(run_dir):
        for e in read_jsonl(p):
            entries[e["key"]] = e
    return entries


def merge_manifests(run_dir: Path, order: Sequence[WorkItem] | None = None) -> Path:
    """Fold shard manifests into one ``manifest.jsonl`` (in work-list order if given)."""
    entries = read_manifest(run_dir)
    if order is not None:
        rank = {it.key: i for i, it in enumerate(order)}
        keys = sorted(entries, key=lambda k: (rank.get(k, math.inf), k))
    else:
        keys = sorted(entries)
    target = run_dir / MANIFEST
    atomic_write(target, "".join(json.dumps(entries[k], ensure_ascii=False) + "\n" for k in keys).encode())
    for p in manifest_paths(run_dir):
        if p != target:
            p.unlink()
    return target


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def completed(run_dir: Path, entries: dict[str, dict], verify: bool = True) -> set[str]:
    """Keys whose PNG exists (and, with ``verify``, matches its recorded sha256)."""
    done = set()
    for key, e in entries.items():
        p = run_dir / e["file"]
        if p.exists() and (not verify or _file_sha256(p) == e.get("sha256")):
            done.add(key)
    return done


# --------------------------------------------------------------------------- engine


class Engine:
    """One loaded pipeline; generates WorkItems into a run directory."""

    def __init__(self, pipe, protocol: ProtocolConfig, *, device: str | torch.device = "cpu", batch_size: int = 8,
                 png_compress_level: int = 6, progress: bool = True, writer_threads: int = 4):
        self.pipe = pipe
        self.protocol = protocol
        self.device = torch.device(device)
        self.batch_size = max(1, int(batch_size))
        self.png_compress_level = png_compress_level
        self.progress = progress
        self.writer_threads = writer_threads
        self.dtype = pipe.unet.dtype
        self.vae_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        if protocol.height % self.vae_factor or protocol.width % self.vae_factor:
            raise ConfigError(f"protocol.height/width must be multiples of {self.vae_factor}")
        make_scheduler(protocol.scheduler, pipe.scheduler.config)  # fail early on a bad name

    # ---- the math
    @torch.no_grad()
    def encode(self, prompts: Sequence[str]) -> tuple[torch.Tensor, list[bool]]:
        from .models import text_embeddings

        tok = self.pipe.tokenizer
        full_lengths = [len(x) for x in tok(list(prompts), truncation=False).input_ids]
        emb = text_embeddings(self.pipe, prompts, self.device)
        return emb.to(self.dtype), [n > tok.model_max_length for n in full_lengths]

    @torch.no_grad()
    def denoise(self, items: Sequence[WorkItem]) -> tuple[np.ndarray, list[list[str]], list[bool]]:
        """Generate one batch: uint8 images [B,H,W,3], per-image flags, per-image truncation."""
        p = self.protocol
        shape = (self.pipe.unet.config.in_channels, p.height // self.vae_factor, p.width // self.vae_factor)
        noise = torch.stack([initial_noise(it, shape, p.rng, self.device) for it in items])
        scheduler = make_scheduler(p.scheduler, self.pipe.scheduler.config)
        scheduler.set_timesteps(p.steps, device=self.device)
        latents = (noise.to(self.device) * scheduler.init_noise_sigma).to(self.dtype)

        cond, truncated = self.encode([it.record.prompt for it in items])
        uncond, _ = self.encode([it.negative_prompt for it in items])
        context = torch.cat([uncond, cond])   # one tensor for all steps: K/V edits are cached on it
        guidance = torch.tensor([it.guidance for it in items], device=self.device, dtype=self.dtype).view(-1, 1, 1, 1)
        step_kwargs = {"eta": p.eta} if p.scheduler == "ddim" else {}
        for t in scheduler.timesteps:
            latent_in = scheduler.scale_model_input(torch.cat([latents, latents]), t)
            eps = self.pipe.unet(latent_in, t, encoder_hidden_states=context, return_dict=False)[0]
            eps_u, eps_c = eps.chunk(2)
            eps = eps_u + guidance * (eps_c - eps_u)
            latents = scheduler.step(eps, t, latents, return_dict=False, **step_kwargs)[0]

        vae = self.pipe.vae
        image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        image = image.float()
        flags = [["nan"] if torch.isnan(x).any() else [] for x in image]
        image = torch.nan_to_num(image, nan=-1.0)
        image = (image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
        arrays = (image * 255).round().astype(np.uint8)
        for f, a in zip(flags, arrays):
            if a.max() == 0 and "nan" not in f:
                f.append("black")
        return arrays, flags, truncated

    # ---- the job
    def generate(self, items: Sequence[WorkItem], run_dir: str | Path, *, shard: tuple[int, int] = (0, 1),
                 resume: bool = True, extra: dict | None = None) -> dict:
        """Generate this shard's share of ``items`` into ``run_dir``. Returns counts."""
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        index, count = shard
        mine = list(items)[index::count]
        manifest = run_dir / (MANIFEST if count == 1 else f"manifest.shard-{index:03d}-of-{count:03d}.jsonl")
        for p in manifest_paths(run_dir):
            read_jsonl(p, repair=True)
        if remove_stale_temp_files(run_dir):
            log.info("%s: removed half-written images of an interrupted run", run_dir)
        entries = read_manifest(run_dir) if resume else {}
        done = completed(run_dir, entries) if resume else set()
        batches = [mine[i : i + self.batch_size] for i in range(0, len(mine), self.batch_size)]
        todo = sum(1 for it in mine if it.key not in done)
        stats = {"total": len(mine), "skipped": len(mine) - todo, "generated": 0, "flagged": 0}
        if todo == 0:
            return stats

        from tqdm.auto import tqdm

        bar = tqdm(total=len(mine), initial=len(mine) - todo, unit="img", disable=not self.progress,
                   desc=f"generate{'' if count == 1 else f' shard {index}/{count}'}", dynamic_ncols=True)
        started = time.perf_counter()
        pending: list[tuple[Future, dict]] = []
        with ThreadPoolExecutor(self.writer_threads) as pool, open(manifest, "a", encoding="utf-8") as mf:

            def drain(block: bool) -> None:
                while pending and (block or pending[0][0].done()):
                    fut, entry = pending.pop(0)
                    entry["sha256"] = fut.result()
                    mf.write(json.dumps(entry, ensure_ascii=False) + "\n")
                    mf.flush()
                    os.fsync(mf.fileno())
                    bar.update(1)
                    stats["generated"] += 1

            for batch in batches:
                if all(it.key in done for it in batch):
                    continue
                arrays, flags, truncated = self.denoise(batch)
                for it, arr, fl, tr in zip(batch, arrays, flags, truncated):
                    if it.key in done:
                        continue
                    if fl:
                        stats["flagged"] += 1
                        log.warning("%s: image flagged %s (recorded; the run continues)", it.key, ",".join(fl))
                    entry = self._entry(it, fl, tr, extra)
                    pending.append((pool.submit(self._write_png, run_dir / it.file, arr), entry))
                drain(block=False)
                rate = stats["generated"] / max(time.perf_counter() - started, 1e-9)
                bar.set_postfix_str(f"{rate:.2f} img/s")
            drain(block=True)
        bar.close()
        stats["seconds"] = time.perf_counter() - started
        return stats

    def _write_png(self, path: Path, array: np.ndarray) -> str:
        payload = png_bytes(array, self.png_compress_level)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, payload)
        return hashlib.sha256(payload).hexdigest()

    def _entry(self, it: WorkItem, flags: list[str], truncated: bool, extra: dict | None) -> dict:
        r = it.record
        return {
            "key": it.key, "file": it.file, "set": it.set_name, "row_id": r.id, "image_index": it.index,
            "prompt": r.prompt, "negative_prompt": it.negative_prompt, "seed": int(r.seed), "guidance": it.guidance,
            "split": r.split, "concept": r.concept, "extras": dict(r.extras), "flags": flags,
            "prompt_truncated": truncated, **(extra or {}),
        }


def distributed_shard() -> tuple[tuple[int, int], str | None]:
    """(index, count) and device when started by ``accelerate launch`` or ``torchrun`` (they set
    RANK/WORLD_SIZE/LOCAL_RANK); ((0, 1), None) otherwise. Joins the process group for the barrier."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return (0, 1), None
    import torch.distributed as dist

    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    if not dist.is_initialized():
        if device.startswith("cuda"):
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return (rank, world), device


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
