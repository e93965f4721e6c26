"""Batched, deterministic, resumable image generation.

Noise (protocol v1): every prompt row has its own CPU generator seeded with the row's seed; the row's
``(k, 4, H/8, W/8)`` noise is drawn in one call and image i is slice i. So an image's noise depends on
its row, never on the batch it shares.

Resumability: each PNG is written atomically (temp file + rename) and only then recorded in the
manifest (one JSON line, flushed and fsynced). A killed run restarts with the batch that was in
flight; batches are a fixed partition of the whole work list (at the batch size recorded with the
run's images), and shards take whole batches, so a resumed or multi-process run computes every image
in exactly the batch one uninterrupted process would.

What is bit-identical: the same image (row, seed, index) from the same batch — same batch size, same
model, settings, hardware, library versions and threads per process. Another batch size changes only
fp32 rounding (GEMM blocking): at most 1 level of 256 per pixel (tests/test_engine.py).
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

from .attention import announce_batch
from .config import ProtocolConfig, check_speed_settings
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


# Module classes compiled by ``compile: regional``: the blocks repeated through the UNet and the VAE
# decoder. Every instance of a class shares one compiled code object (one graph per distinct shape).
REGIONAL_BLOCKS = ("BasicTransformerBlock", "ResnetBlock2D")
MAX_IN_FLIGHT = 2         # batches enqueued on the device ahead of the one being written out
MAX_PENDING_WRITES = 4    # batches of PNGs queued for the writer threads before generation waits


@dataclass
class InFlight:
    """A batch enqueued on the device; ``Engine.finish`` waits for it and brings its pixels home."""

    items: list
    pixels: torch.Tensor        # uint8 [B,H,W,3]: host (pinned) memory once ``ready`` has fired
    nan: torch.Tensor           # bool [B]: some pixel of the decoded image was NaN
    truncated: list[bool]
    ready: object | None        # torch.cuda.Event, None on CPU (already computed)


class Engine:
    """One loaded pipeline; generates WorkItems into a run directory.

    Speed knobs (``compile``, ``cuda_graphs``, ``channels_last``, ``batch_size="auto"``) are operational:
    they do not change what is computed, only how. Precision (``protocol.dtype``, ``vae_dtype``,
    ``tf32``) is part of the protocol. ``compile_backend`` is for tests (e.g. "eager")."""

    def __init__(self, pipe, protocol: ProtocolConfig, *, device: str | torch.device = "cpu",
                 batch_size: int | str = 8, png_compress_level: int = 6, progress: bool = True,
                 writer_threads: int = 4, compile: str = "none", cuda_graphs: bool = False,
                 channels_last: str = "auto", compile_backend: str = "inductor"):
        self.pipe = pipe
        self.protocol = protocol
        self.device = torch.device(device)
        check_speed_settings(batch_size, compile, cuda_graphs, channels_last)
        self.batch_size = batch_size
        self.png_compress_level = png_compress_level
        self.progress = progress
        self.writer_threads = writer_threads
        self.dtype = pipe.unet.dtype
        self.vae_factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        if protocol.height % self.vae_factor or protocol.width % self.vae_factor:
            raise ConfigError(f"protocol.height/width must be multiples of {self.vae_factor}")
        make_scheduler(protocol.scheduler, pipe.scheduler.config)  # fail early on a bad name
        self.cuda = self.device.type == "cuda"
        self.compile, self.cuda_graphs = compile, bool(cuda_graphs)
        self.channels_last = channels_last == "on" or (channels_last == "auto" and self.cuda)
        self.cross_kv: str | None = None     # how the last generate computed attn2 K/V (see settings)
        self.tf32 = set_tf32(bool(getattr(protocol, "tf32", False))) if self.cuda else None
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        for m in (pipe.unet, pipe.vae):
            m.to(memory_format=memory_format)
        compile_model(pipe, compile, mode="reduce-overhead" if self.cuda_graphs else None, backend=compile_backend)

    def settings(self) -> dict:
        """How images are computed, for generation.json (precision is in the protocol)."""
        return {
            "batch_size": self.batch_size, "compile": self.compile, "cuda_graphs": self.cuda_graphs,
            "channels_last": self.channels_last, "tf32": self.tf32, "unet_dtype": str(self.dtype),
            "vae_dtype": str(self.pipe.vae.dtype), "latents_dtype": "torch.float32",
            "last_batch_padded": self.compile != "none", "max_batches_in_flight": MAX_IN_FLIGHT,
            "sdpa_backends": sdpa_backends() if self.cuda else None,
            "cross_attention_kv": self.cross_kv,
        }

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
        from .attention import fixed_cross_kv

        with fixed_cross_kv(self.pipe.unet) as set_context:
            return self.finish(self.launch(items, set_context))

    @torch.no_grad()
    def float_images(self, items: Sequence[WorkItem]) -> torch.Tensor:
        """The batch's decoded images before quantisation: float32 [B,3,H,W] in [-1, 1] (NaN kept)."""
        from .attention import fixed_cross_kv

        with fixed_cross_kv(self.pipe.unet) as set_context:
            return self.decode(items, set_context)[0]

    @torch.no_grad()
    def launch(self, items: Sequence[WorkItem], set_context=None) -> InFlight:
        """Enqueue one batch on the device (noise, text encoding, denoising, VAE decode, conversion to
        uint8) without waiting for it, so the host prepares the next batch while the device computes.
        ``set_context`` (from ``attention.fixed_cross_kv``) fixes the cross-attention K/V once per batch."""
        image, truncated = self.decode(items, set_context)
        nan = torch.isnan(image).flatten(1).any(1)
        image = torch.nan_to_num(image, nan=-1.0)
        pixels = ((image / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1) * 255).round().to(torch.uint8)
        if not self.cuda:
            return InFlight(list(items), pixels, nan, truncated, None)
        host_pixels = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True)
        host_nan = torch.empty(nan.shape, dtype=torch.bool, pin_memory=True)
        host_pixels.copy_(pixels, non_blocking=True)
        host_nan.copy_(nan, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return InFlight(list(items), host_pixels, host_nan, truncated, ready)

    @torch.no_grad()
    def decode(self, items: Sequence[WorkItem], set_context=None) -> tuple[torch.Tensor, list[bool]]:
        """Noise, text encoding, denoising and VAE decode of one batch: float32 images [B,3,H,W] in
        [-1, 1], and whether each prompt was truncated to the tokenizer's length."""
        p = self.protocol
        shape = (self.pipe.unet.config.in_channels, p.height // self.vae_factor, p.width // self.vae_factor)
        noise = torch.stack([initial_noise(it, shape, p.rng, self.device) for it in items])
        scheduler = make_scheduler(p.scheduler, self.pipe.scheduler.config)
        # The scheduler keeps its timesteps (and sigmas) on the CPU: stepping it with a device timestep
        # would make the host wait for the device at every step (`if prev_timestep >= 0`, `.item()`).
        # The UNet gets the same timesteps from one device copy per batch. Host-to-device copies are
        # non_blocking, so preparing a batch never waits for the one before it.
        scheduler.set_timesteps(p.steps)
        unet_timesteps = scheduler.timesteps.to(self.device, non_blocking=True)
        # Latents and the scheduler's arithmetic stay in float32 in every precision mode; only the
        # UNet runs in protocol.dtype (in fp32 this is the reference computation, bit for bit).
        latents = noise.to(self.device, non_blocking=True) * scheduler.init_noise_sigma

        prompts, negatives = [it.record.prompt for it in items], [it.negative_prompt for it in items]
        cond, truncated = self.encode(prompts)
        uncond, _ = self.encode(negatives)
        context = torch.cat([uncond, cond])   # one tensor for all steps: K/V edits are cached on it
        announce_batch(self.pipe.unet, context, prompts, negatives)
        if set_context is not None:
            set_context(context)
        guidance = torch.tensor([it.guidance for it in items]).view(-1, 1, 1, 1).to(self.device, non_blocking=True)
        step_kwargs = {"eta": p.eta} if p.scheduler == "ddim" else {}
        for i, t in enumerate(scheduler.timesteps):
            latent_in = scheduler.scale_model_input(torch.cat([latents, latents]), t).to(self.dtype)
            if self.channels_last:
                latent_in = latent_in.contiguous(memory_format=torch.channels_last)
            if self.cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            eps = self.pipe.unet(latent_in, unet_timesteps[i], encoder_hidden_states=context, return_dict=False)[0].float()
            eps_u, eps_c = eps.chunk(2)
            eps = eps_u + guidance * (eps_c - eps_u)
            latents = scheduler.step(eps, t, latents, return_dict=False, **step_kwargs)[0]

        vae = self.pipe.vae
        return vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0].float(), truncated

    def finish(self, batch: InFlight) -> tuple[np.ndarray, list[list[str]], list[bool]]:
        """Wait for a launched batch: uint8 images [B,H,W,3], per-image flags, per-image truncation."""
        if batch.ready is not None:
            batch.ready.synchronize()
        arrays = batch.pixels.numpy()
        flags = [["nan"] if bool(n) else [] for n in batch.nan]
        for f, a in zip(flags, arrays):
            if a.max() == 0 and "nan" not in f:
                f.append("black")
        return arrays, flags, batch.truncated

    # ---- the job
    def generate(self, items: Sequence[WorkItem], run_dir: str | Path, *, shard: tuple[int, int] = (0, 1),
                 resume: bool = True, extra: dict | None = None, on_written=None) -> dict:
        """Generate this shard's share of ``items`` into ``run_dir``. Returns counts. ``on_written(entry)``
        is called (from this thread) for each image once its PNG and manifest line are on disk."""
        from .attention import fixed_cross_kv

        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        items = list(items)
        index, count = shard
        manifest = run_dir / (MANIFEST if count == 1 else f"manifest.shard-{index:03d}-of-{count:03d}.jsonl")
        for p in manifest_paths(run_dir):
            read_jsonl(p, repair=True)
        if remove_stale_temp_files(run_dir):
            log.info("%s: removed half-written images of an interrupted run", run_dir)
        entries = read_manifest(run_dir) if resume else {}
        done = completed(run_dir, entries) if resume else set()
        self.batch_size = self.run_batch_size(entries, len(items), count)
        # The batches are a fixed partition of the whole work list, and shards take whole batches: a run
        # on N processes, or resumed after a kill, computes every image in the very batch one
        # uninterrupted process would (same batch size) — so its bytes are the same.
        batches = [items[i : i + self.batch_size] for i in range(0, len(items), self.batch_size)][index::count]
        mine = [it for batch in batches for it in batch]
        todo = sum(1 for it in mine if it.key not in done)
        stats = {"total": len(mine), "skipped": len(mine) - todo, "generated": 0, "flagged": 0,
                 "batch_size": self.batch_size}
        if todo == 0:
            return stats

        from tqdm.auto import tqdm

        bar = tqdm(total=len(mine), initial=len(mine) - todo, unit="img", disable=not self.progress,
                   desc=f"generate{'' if count == 1 else f' shard {index}/{count}'}", dynamic_ncols=True)
        started = time.perf_counter()
        pending: list[tuple[Future, dict]] = []
        in_flight: list[InFlight] = []
        with ThreadPoolExecutor(self.writer_threads) as pool, open(manifest, "a", encoding="utf-8") as mf, \
                fixed_cross_kv(self.pipe.unet) as set_context:
            self.cross_kv = "once per batch" if set_context is not None else "every step (non-cacheable edit)"

            def drain(keep: int) -> None:
                """Record finished writes in order; wait while more than ``keep`` are queued (so slow
                disks hold back generation instead of filling memory with pixels)."""
                while pending and (len(pending) > keep or pending[0][0].done()):
                    fut, entry = pending.pop(0)
                    entry["sha256"] = fut.result()
                    mf.write(json.dumps(entry, ensure_ascii=False) + "\n")
                    mf.flush()
                    os.fsync(mf.fileno())
                    bar.update(1)
                    stats["generated"] += 1
                    if on_written is not None:
                        on_written(entry)

            def write_out(launched: InFlight) -> None:
                arrays, flags, truncated = self.finish(launched)
                for it, arr, fl, tr in zip(launched.items, arrays, flags, truncated):
                    if it is None or it.key in done:   # None: padding of a short last batch
                        continue
                    if fl:
                        stats["flagged"] += 1
                        log.warning("%s: image flagged %s (recorded; the run continues)", it.key, ",".join(fl))
                    entry = self._entry(it, fl, tr, extra)
                    pending.append((pool.submit(self._write_png, run_dir / it.file, arr), entry))

            for batch in batches:
                if all(it.key in done for it in batch):
                    continue
                launched = self.launch(self._padded(batch), set_context)
                launched.items = list(batch) + [None] * (len(launched.items) - len(batch))
                in_flight.append(launched)
                if len(in_flight) >= MAX_IN_FLIGHT:
                    write_out(in_flight.pop(0))
                drain(keep=MAX_PENDING_WRITES * self.batch_size)
                rate = stats["generated"] / max(time.perf_counter() - started, 1e-9)
                bar.set_postfix_str(f"{rate:.2f} img/s")
            while in_flight:
                write_out(in_flight.pop(0))
            drain(keep=0)
        bar.close()
        stats["seconds"] = time.perf_counter() - started
        return stats

    def run_batch_size(self, entries: dict[str, dict], n_images: int, n_shards: int = 1) -> int:
        """The batch size of this run: the one its recorded images were made with (so a resumed run,
        whatever --batch-size now says, batches exactly as before), else the requested one (``auto``:
        from ``n_images`` and free memory). Sharded processes agree on the smallest of theirs."""
        recorded = {e.get("batch_size") for e in entries.values()} - {None}
        if len(recorded) == 1:
            size = recorded.pop()
            if self.batch_size not in ("auto", size):
                log.warning("resuming with batch size %d, the one this run's images were made with "
                            "(batch size %s ignored: another batch size changes images by rounding)", size, self.batch_size)
        else:
            if recorded:
                log.warning("this run's images were made with batch sizes %s; the rest uses %s", sorted(recorded),
                            self.batch_size)
            size = self.batch_size if self.batch_size != "auto" else self.auto_batch_size(n_images)
            if self.batch_size == "auto":
                log.info("batch size %d (auto%s)", size, ": from free device memory" if self.cuda else " on a CPU")
        return agree_across_shards(size) if n_shards > 1 else size

    def _padded(self, batch: Sequence[WorkItem]) -> list[WorkItem]:
        """A compiled model keeps one shape: a short last batch is filled up with copies of its last
        item (their images are discarded; per-row noise makes the others independent of them)."""
        if self.compile == "none" or len(batch) >= self.batch_size:
            return list(batch)
        return list(batch) + [batch[-1]] * (self.batch_size - len(batch))

    def auto_batch_size(self, n_images: int, limit: int = 64) -> int:
        """The largest batch (a multiple of 8 from 8 up) whose measured peak memory fits in 80 % of the
        device's free memory; 4 on a CPU. Two eager probes of one denoising step and one decode
        (batches 1 and 2) give the fixed and the per-image memory."""
        if not self.cuda:
            return max(1, min(4, n_images))
        per_image, fixed = self._memory_per_image()
        free, _ = torch.cuda.mem_get_info(self.device)
        fits = int((0.8 * free - fixed) // max(per_image, 1))
        b = min(limit, fits, n_images)
        if b >= 8:
            b -= b % 8
        return max(1, b)

    @torch.no_grad()
    def _memory_per_image(self) -> tuple[float, float]:
        p = self.protocol
        shape = (self.pipe.unet.config.in_channels, p.height // self.vae_factor, p.width // self.vae_factor)
        peaks = []
        with torch.compiler.set_stance("force_eager"):
            for b in (1, 2):
                torch.cuda.synchronize(self.device)
                torch.cuda.empty_cache()
                base = torch.cuda.memory_allocated(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
                context = torch.cat([self.encode([""] * b)[0]] * 2)
                latents = torch.zeros((2 * b, *shape), device=self.device, dtype=self.dtype)
                self.pipe.unet(latents, 999, encoder_hidden_states=context, return_dict=False)
                vae = self.pipe.vae
                vae.decode(latents[:b].to(vae.dtype), return_dict=False)
                torch.cuda.synchronize(self.device)
                peaks.append(torch.cuda.max_memory_allocated(self.device) - base)
        per_image = max(peaks[1] - peaks[0], 1)
        return per_image, peaks[0] - per_image

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
            "prompt_truncated": truncated, "batch_size": self.batch_size, **(extra or {}),
        }


def set_tf32(enabled: bool) -> bool:
    """TF32 for CUDA matmuls and convolutions, both or neither. Off is strict fp32; note PyTorch's own
    default (which the official scripts ran with) is TF32 convolutions but fp32 matmuls."""
    mode = "tf32" if enabled else "ieee"
    torch.backends.cuda.matmul.fp32_precision = mode
    torch.backends.cudnn.conv.fp32_precision = mode
    return enabled


def sdpa_backends() -> dict:
    b = torch.backends.cuda
    return {"flash": b.flash_sdp_enabled(), "mem_efficient": b.mem_efficient_sdp_enabled(),
            "cudnn": b.cudnn_sdp_enabled(), "math": b.math_sdp_enabled()}


def compile_model(pipe, how: str, *, mode: str | None = None, backend: str = "inductor") -> None:
    """``full``: torch.compile the whole UNet. ``regional``: compile only the blocks repeated through
    the UNet and the VAE decoder (REGIONAL_BLOCKS); one compiled code object per class, so compiling
    takes a minute or two where the whole UNet takes many. ``none`` undoes an earlier compile. The
    setting belongs to the pipeline (the last engine made on it sets it); an engine made again with
    the same settings keeps the compiled code."""
    key = (how, mode, backend)
    if pipe.unet.__dict__.get("_cpebench_compiled", ("none", None, "inductor")) == key:
        return
    modules = [*pipe.unet.modules(), *pipe.vae.modules()]
    for m in modules:
        m._compiled_call_impl = None                 # what nn.Module.compile sets
    if how == "regional":
        # Every distinct (channels, resolution) of a block class is one more graph of the same code
        # object; past torch's default limit of 8 the rest would silently run eagerly.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        for m in [*pipe.unet.modules(), *pipe.vae.decoder.modules()]:
            if type(m).__name__ in REGIONAL_BLOCKS:
                m.compile(mode=mode, backend=backend, dynamic=False)
    elif how == "full":
        pipe.unet.compile(mode=mode, backend=backend, dynamic=False)
    pipe.unet.__dict__["_cpebench_compiled"] = key


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


def agree_across_shards(batch_size: int) -> int:
    """The smallest batch size of all processes (``auto`` may measure different free memory on each),
    so every process cuts the work list into the same batches."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return batch_size
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    size = torch.tensor([batch_size], device=device)
    dist.all_reduce(size, op=dist.ReduceOp.MIN)
    return int(size.item())


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
