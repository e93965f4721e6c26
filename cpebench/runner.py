"""The stages of a run: resolve → erase → generate → score → report.

Run directory layout (``runs/<name>/``)::

    config.yaml        the resolved config (checked on resume; a different one is refused)
    images/<set>/...   PNGs named by row id and image index
    manifest.jsonl     one line per image: prompt, seed, knobs, sha256, flags
    generation.json    how the images were made (model revision, scheduler config, artifact, versions)
    scores.jsonl       one line per (metric, image): per-image details
    summary.json       metric values + the protocol card
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import functools
import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

import yaml

from . import __version__, data, provenance
from .config import (
    MethodConfig,
    PromptSetConfig,
    ProtocolConfig,
    RunConfig,
    RunOptions,
    TaskConfig,
    build,
    config_differences,
    dump_yaml,
    scoring_only,
)
from .engine import (
    Engine,
    WorkItem,
    barrier,
    distributed_shard,
    merge_manifests,
    plan_items,
    read_jsonl,
    read_manifest,
)
from .errors import ConfigError, CpebenchError, DataError, RunStateError
from .methods import Artifact, Concept, EraseContext, Method, artifact_fingerprint
from .metrics import GeneratedImage, Metric
from .models import MICRO, TINY, LoadedModel, load_pipeline
from .registry import METHODS, METRICS

log = logging.getLogger(__name__)

# Rough cost of one SD-1.x image at 512², 50 steps (UNet 677 GFLOP/forward ×2 for CFG, VAE ~2.5 TFLOP),
# and what a CPU sustains; used only to tell a user why a full run on CPU is a bad idea.
UNET_FLOP_512 = 677e9
VAE_FLOP_512 = 2.5e12
CPU_FLOPS = 3e11


# --------------------------------------------------------------------------- run directory


def run_name(cfg: RunConfig) -> str:
    if cfg.run.name:
        return cfg.run.name
    model = cfg.protocol.model.rstrip("/").split("/")[-1]
    concepts = f"-{concepts_slug(cfg.task.concepts)}" if cfg.task.erase_each and cfg.method.name != "sd" else ""
    return f"{cfg.method.name}-{cfg.task.name}{concepts}-{model}" + (f"-{cfg.preset}" if cfg.preset else "")


def concepts_slug(concepts) -> str:
    """'garbage truck' -> 'garbage_truck'; several concepts: the first and their number."""
    first = re.sub(r"[^a-z0-9]+", "_", concepts[0].lower()).strip("_") if concepts else "none"
    return first if len(concepts) <= 1 else f"{first}+{len(concepts) - 1}"


def prepare_run_dir(cfg: RunConfig, *, force: bool = False) -> Path:
    """Create or reopen the run directory. A directory made with a different config is refused
    (listing the keys that differ) unless ``force``, which starts it anew. Differences only in the
    metrics (options, sets, metrics added or removed) keep the images: the new config is saved and
    ``score`` redoes exactly the metrics whose options changed."""
    run_dir = Path(cfg.run.out) / run_name(cfg)
    saved = run_dir / "config.yaml"
    new = cfg.to_dict()
    rewrite = force
    if saved.exists():
        old = yaml.safe_load(saved.read_text()) or {}
        diffs = config_differences(old, new)
        if diffs and all(scoring_only(d) for d in diffs) and not force:
            log.info("%s: metric configuration changed (%s); images are kept, changed metrics are re-scored",
                     run_dir, "; ".join(diffs[:4]))
            diffs, rewrite = [], True
        if diffs and not force:
            raise RunStateError(
                f"{run_dir} was made with a different config; differing keys: {'; '.join(diffs[:8])}"
                f"{' …' if len(diffs) > 8 else ''}. Use --force to start it anew, or --name for a new run."
            )
    if force and run_dir.exists():
        for p in run_dir.iterdir():          # all but the lock, which stays held while the run starts anew
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.name != LOCK_FILE:
                p.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    if not saved.exists() or rewrite:
        (run_dir / "config.yaml").write_text(dump_yaml(new))
    return run_dir


LOCK_FILE = ".lock"


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """Hold ``<run>/.lock`` (an exclusive flock) while this process writes into the run: a second
    cpebench on the same run stops at once instead of generating every image a second time."""
    import fcntl

    path = Path(run_dir) / LOCK_FILE
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except (FileNotFoundError, NotADirectoryError):
            raise RunStateError(f"{run_dir}: no such run directory") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunStateError(f"{run_dir} is in use by another cpebench process (pid {holder}); wait for it to "
                                "finish, or use --name for a separate run") from None
        try:
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)        # the file was removed (a failed run's folder) between open and lock: retry
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        os.ftruncate(fd, 0)
        os.close(fd)


@contextlib.contextmanager
def open_run(cfg: RunConfig, *, force: bool = False):
    """``prepare_run_dir`` under the run's lock, for a command that generates into it. A folder this
    command made (or emptied with ``force``) is removed again if the command fails before its first
    image, so the corrected command is not refused as "a different config". Of a sharded run
    (torchrun, accelerate) rank 0 holds the lock and cleans up for all ranks."""
    run_dir = Path(cfg.run.out) / run_name(cfg)
    fresh = force or not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:      # --out (or a folder above it) is a file, or not writable
        raise RunStateError(f"--out {cfg.run.out}: cannot make the run directory {run_dir} ({e.strerror})") from None
    if int(os.environ.get("RANK", "0")) != 0:
        yield prepare_run_dir(cfg, force=force)
        return
    with run_lock(run_dir):
        try:
            yield prepare_run_dir(cfg, force=force)
        except BaseException:
            if fresh and not any((run_dir / "images").rglob("*.png")):
                shutil.rmtree(run_dir, ignore_errors=True)
            raise


def config_from_dict(d: dict, source: str) -> RunConfig:
    return RunConfig(
        task=build(TaskConfig, d.get("task", {}), source, "task."),
        method=build(MethodConfig, d.get("method", {}), source, "method."),
        protocol=build(ProtocolConfig, d.get("protocol", {}), source, "protocol."),
        run=build(RunOptions, d.get("run", {}), source, "run."),
        preset=d.get("preset"),
    )


def load_run_config(run_dir: Path) -> RunConfig:
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise RunStateError(f"{run_dir} is not a run directory (no config.yaml); create one with `cpebench generate`")
    return config_from_dict(yaml.safe_load(path.read_text()) or {}, str(path))


# --------------------------------------------------------------------------- prompts


def sets_to_generate(cfg: RunConfig) -> list[str]:
    """The prompt sets the task's metrics use (or run.sets if given), in task order. A gated set the user
    has no copy of is left out (and said so) unless run.sets names it, where its absence is an error."""
    if cfg.run.sets:
        return list(cfg.run.sets)
    used = {s for m in cfg.task.metrics.values() for s in m.prompt_sets}
    return [s for s in cfg.task.prompt_sets if s in used and set_available(cfg, s)]


def set_available(cfg: RunConfig, set_name: str) -> bool:
    """False for a set whose CSV the user has not given: a gated file without a copy, or found prompts
    without a path (smoke runs use every set's inline stand-ins)."""
    ps = cfg.task.prompt_sets[set_name]
    if cfg.run.prompts == "smoke":
        return True
    if ps.format not in ("inline", "micro") and not ps.file and not ps.path:
        log.info("prompt set %s: no path given (a set of found prompts: prompt_sets.%s.path=...); left out",
                 set_name, set_name)
        return False
    if ps.file not in data.GATED_FILES:
        return True
    try:
        data.resolve_gated(ps.file, cfg.run.data_dir, ps.path)
    except data.GatedFileMissing:      # a copy that is there but wrong is an error, not a skip
        log.warning("prompt set %s: no copy of the gated file %s; left out (see `cpebench ls prompt-sets`)",
                    set_name, ps.file)
        return False
    return True


def load_records(cfg: RunConfig, set_name: str) -> tuple[list[data.PromptRecord], dict]:
    """Records of one prompt set plus their provenance (file, sha256, filters)."""
    ps: PromptSetConfig = cfg.task.prompt_sets[set_name]
    limits = [x for x in (ps.limit, cfg.run.limit) if x is not None]
    limit = min(limits) if limits else None
    source = f"task {cfg.task.name!r}, prompt set {set_name!r}"
    if cfg.run.prompts == "smoke":
        if not ps.smoke_rows:
            raise ConfigError(f"{source} has no smoke_rows for the smoke preset")
        recs = data.records_from_inline([dict(r) for r in ps.smoke_rows], split=ps.split, source=source + " smoke_rows")
        info = {"file": None, "inline": "smoke_rows"}
    elif ps.format == "inline":
        recs = data.records_from_inline([dict(r) for r in ps.rows], split=ps.split, source=source)
        info = {"file": None, "inline": "rows"}
    elif ps.format == "micro":     # a micro-world set: a pure function of its name (no file)
        from .microworld import prompts as micro_prompts

        recs = micro_prompts.records(set_name)
        if ps.split != micro_prompts.split_of(set_name):
            raise ConfigError(f"{source}: split {ps.split!r}, but the micro world's set {set_name!r} is "
                              f"{micro_prompts.split_of(set_name)!r}")
        info = {"file": None, "micro_world": set_name, "sha256": micro_prompts.sha256(set_name)}
    else:
        if not ps.file and not ps.path:
            raise ConfigError(f"{source}: format {ps.format!r} needs a file (or a path to a CSV of yours, e.g. an "
                              f"attack's found_prompts.csv: prompt_sets.{set_name}.path=...)")
        if not ps.file:
            path = Path(ps.path).expanduser()
            if not path.is_file():
                raise ConfigError(f"{source}: path {path} does not exist")
        elif ps.file in data.GATED_FILES:
            path = data.resolve_gated(ps.file, cfg.run.data_dir, ps.path, where=f"prompt_sets.{set_name}")
        else:
            path = data.resolve_data_file(ps.file, cfg.run.data_dir, progress=True)
        df = data.DATA_FILES.get(ps.file)
        recs = data.load_prompt_set(path, ps.format, split=ps.split, drop_empty=ps.drop_empty, dedupe=ps.dedupe)
        info = {"file": ps.file, "sha256": df.sha256 if df else data.sha256_file(path), "origin": df.origin if df else None,
                "source": df.url if df else str(path), "gated": ps.file in data.GATED_FILES}
        if ps.clean_file:
            recs = with_clean_prompts(recs, ps, cfg.run.data_dir, source)
            info["clean_file"] = {"file": ps.clean_file, "sha256": data.DATA_FILES[ps.clean_file].sha256}
        if ps.file in data.GATED_FILES:
            info["fixed_seed"] = data.FIXED_SEEDS.get(ps.format)
    if limit is not None:
        recs = recs[:limit]
    info.update({"format": ps.format, "rows": len(recs), "drop_empty": ps.drop_empty, "dedupe": ps.dedupe,
                 "limit": limit, "images_per_row": ps.images_per_row, "negative_prompt": ps.negative_prompt,
                 "guidance": "per_row (evaluation_guidance)" if ps.per_row_guidance else cfg.protocol.guidance,
                 "split": ps.split})
    return recs, info


def with_clean_prompts(recs: list[data.PromptRecord], ps: PromptSetConfig, data_dir, source: str):
    """Each record with ``extras.clean_prompt``: the prompt of the same row id in ``ps.clean_file``."""
    if ps.clean_file not in data.DATA_FILES:
        raise ConfigError(f"{source}: clean_file {ps.clean_file!r} is not a pinned data file")
    path = data.resolve_data_file(ps.clean_file, data_dir, progress=True)
    clean = {r.id: r.prompt for r in data.load_prompt_set(path, ps.format, split=ps.split)}
    missing = [r.id for r in recs if r.id not in clean]
    if missing:
        raise DataError(f"{source}: {ps.clean_file} has no row {missing[0]!r} ({len(missing)} rows unmatched)")
    return [dataclasses.replace(r, extras={**r.extras, "clean_prompt": clean[r.id]}) for r in recs]


def work_items(cfg: RunConfig) -> tuple[list[WorkItem], dict]:
    items, infos = [], {}
    for s in sets_to_generate(cfg):
        ps = cfg.task.prompt_sets[s]
        recs, infos[s] = load_records(cfg, s)
        items += plan_items(s, recs, images_per_row=ps.images_per_row, negative_prompt=ps.negative_prompt,
                            default_guidance=cfg.protocol.guidance, per_row_guidance=ps.per_row_guidance)
    return items, infos


# --------------------------------------------------------------------------- device


def choose_device(cfg: RunConfig, n_images: int) -> str:
    """``auto`` → CUDA if present. A full-size model on CPU is refused unless --device cpu."""
    import torch

    requested = cfg.run.device
    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if cfg.protocol.model not in (TINY, MICRO):   # both are made for the CPU
            p = cfg.protocol
            scale = (p.height * p.width) / 512**2
            seconds = n_images * scale * (2 * p.steps * UNET_FLOP_512 + VAE_FLOP_512) / CPU_FLOPS
            raise CpebenchError(
                f"no GPU found: {n_images} images with {p.model} at {p.width}x{p.height}, {p.steps} steps would take "
                f"about {_human(seconds)} on this CPU. Use --preset smoke for the whole pipeline on a tiny model in "
                f"minutes, or --device cpu to force the full run."
            )
        return "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise CpebenchError(f"--device {requested}: CUDA is not available on this machine")
    return requested


def _human(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.0f} minutes"
    if seconds < 86400 * 2:
        return f"{seconds / 3600:.1f} hours"
    return f"{seconds / 86400:.1f} days"


# --------------------------------------------------------------------------- erase


def task_concepts(cfg: RunConfig) -> list[str]:
    """The concepts to erase: the method's own list for the task (its YAML ``concepts:``, what its paper
    code erases there) if it has one, else the task's (``own_task_concepts``). Concepts given on the
    command line have already replaced both (``config.without_method_concepts``). A task that erases as
    another (``erase_as``) takes the method's list for that task only when it erases that task's concepts
    (nudity-attacks); with concepts of its own (harm-attacks: violence) it erases those."""
    entry = None if erases_own_concepts(cfg) else cfg.method.concepts.get(cfg.task.method_task)
    return list(entry["names"]) if entry else own_task_concepts(cfg)


def erases_own_concepts(cfg: RunConfig) -> bool:
    """A task that erases as another (``erase_as``) but names concepts of its own (style-attacks: Van Gogh
    with the artist recipe): a method's paper list for the other task does not apply."""
    return bool(cfg.task.erase_as) and tuple(cfg.task.concepts) != _task_concepts_of(cfg.task.erase_as)


@functools.lru_cache(maxsize=None)
def _task_concepts_of(task: str) -> tuple:
    from .config import load_task

    return tuple(load_task(task)[0].concepts)


def own_task_concepts(cfg: RunConfig) -> list[str]:
    """The task's list, or the distinct concepts of ``concepts_from``'s prompt set."""
    if cfg.task.concepts or not cfg.task.concepts_from:
        return list(cfg.task.concepts)
    records, _ = load_records(dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, limit=None)),
                              cfg.task.concepts_from)
    return list(dict.fromkeys(r.concept for r in records if r.concept))


def check_task_concepts(cfg: RunConfig, concepts) -> None:
    """``erase --task T --concepts ...`` erases a subset of T's concepts (so T's metrics still apply);
    arbitrary concepts go with ``--preset T`` instead."""
    known = list(dict.fromkeys(own_task_concepts(cfg) + task_concepts(cfg)))
    lowered = {c.lower(): c for c in known}
    for c in concepts:
        if c.lower() not in lowered:
            import difflib

            close = difflib.get_close_matches(c, known, n=1, cutoff=0.5)
            where = f"prompt set {cfg.task.concepts_from!r}" if cfg.task.concepts_from and not cfg.task.concepts else "its YAML"
            raise ConfigError(f"concept {c!r} is not among the {len(known)} concepts of task {cfg.task.name!r} ({where})"
                              + (f"; did you mean {close[0]!r}?" if close else "")
                              + f" To erase other concepts with this task's hyperparameters use --preset {cfg.task.name} "
                              "without --task")


def paper_concepts(cfg: RunConfig) -> dict | None:
    """The method's own list for the task, {names, source} (read from its YAML when the command line
    replaced it), or None when the method names none for this task."""
    from .config import load_method_config

    task = cfg.task.method_task
    if erases_own_concepts(cfg):
        return None
    return cfg.method.concepts.get(task) or load_method_config(cfg.method.name).concepts.get(task)


def concepts_record(cfg: RunConfig, erased) -> dict:
    """The concepts erased next to the paper's list for the task (artifact metadata, generation.json).
    ``concepts_differ_from_paper`` is None when it cannot be told: no paper list, or an artifact that
    does not say what it erased (e.g. an official checkpoint given by --artifact)."""
    paper = paper_concepts(cfg)
    differ = None
    if paper is not None and erased:
        differ = {c.casefold() for c in erased} != {c.casefold() for c in paper["names"]}
    return {"concepts": list(erased), "paper_concepts": dict(paper) if paper else None,
            "concepts_differ_from_paper": differ}


def get_method(name: str) -> Method:
    cls = METHODS.get(name)
    return cls()


def method_hparams(cfg: RunConfig) -> dict:
    """The run's hyperparameters as its method parses them (checked, typed, defaults filled in): done
    once, before the model loads, so a bad value fails at once."""
    return get_method(cfg.method.name).parse_hparams(cfg.hparams)


def erase_precision(cfg: RunConfig) -> dict:
    """The precision an erase runs in (part of the cache key: the same erase in fp16 gives other weights)."""
    p = cfg.protocol
    return {"dtype": p.dtype, "vae_dtype": p.vae_dtype or p.dtype, "tf32": p.tf32}


def erase(cfg: RunConfig, loaded: LoadedModel, *, cache: bool = True, progress: bool = True,
          hparams: dict | None = None) -> tuple[Artifact, Path | None]:
    """Train (or load the cached, or the user's ``run.artifact``) erased-model artifact. ``hparams``:
    ``method_hparams(cfg)`` if the caller has parsed them already."""
    method = get_method(cfg.method.name)
    if cfg.run.artifact:
        artifact = method.load_artifact(cfg.run.artifact)
        log.info("using the given artifact %s (%d concepts)", cfg.run.artifact, len(artifact.metadata.get("concepts", [])))
        return artifact, Path(cfg.run.artifact)
    concepts = [Concept(c) for c in task_concepts(cfg)]
    hparams = method_hparams(cfg) if hparams is None else hparams
    ctx = EraseContext(device=str(loaded.pipe.unet.device), data_dir=cfg.run.data_dir, progress=progress)
    if not method.trains:
        return method.erase(loaded.pipe, concepts, hparams, ctx), None
    if not concepts:
        raise ConfigError(f"task {cfg.task.name!r} names no concepts to erase; "
                          f"use `cpebench erase --method {method.name} --concepts NAME ... --preset {cfg.task.name}`")
    fingerprinted = {k: v for k, v in hparams.items() if k not in method.operational_hparams}
    precision = erase_precision(cfg)
    key = artifact_fingerprint(method.name, method.version, concepts, fingerprinted, loaded.model_id, loaded.revision,
                               __version__, precision)  # not the git hash: unrelated commits keep the cache
    path = data.cache_dir() / "artifacts" / method.name / key
    if cache and (path / "artifact.json").exists():
        log.info("reusing cached artifact %s", path)
        return Artifact.load(path), path
    ctx.workdir = path.with_name(key + ".partial")   # resumable training state (per stage)
    artifact = method.erase(loaded.pipe, concepts, hparams, ctx)
    artifact.metadata.update({
        **concepts_record(cfg, [c.name for c in concepts]), "hparams": fingerprinted,
        "operational_hparams": {k: v for k, v in hparams.items() if k in method.operational_hparams},
        "precision": precision, "base_model": loaded.model_id, "base_revision": loaded.revision,
        "code_version": provenance.code_version(), "method_version": method.version, "fingerprint": key, "created": _now(),
    })
    saved = artifact.save(path)
    shutil.rmtree(ctx.workdir, ignore_errors=True)
    return artifact, saved


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# --------------------------------------------------------------------------- generate


def reference_config(cfg: RunConfig) -> RunConfig:
    """The unedited model under the same protocol and prompt sets (KID's reference run)."""
    from .config import load_method_config

    return dataclasses.replace(cfg, method=load_method_config("sd"),
                               run=dataclasses.replace(cfg.run, name=None, artifact=None))


def reference_run_dir(cfg: RunConfig) -> Path:
    return Path(cfg.run.out) / run_name(reference_config(cfg))


def _auto_reference(cfg: RunConfig, name: str) -> bool:
    """Metric ``name`` compares with the reference run, which the runner locates (``reference_run: auto``)."""
    return (getattr(METRICS.get(name), "uses_reference_run", False)
            and cfg.task.metrics[name].options.get("reference_run", "auto") == "auto")


def metric_options(cfg: RunConfig, name: str) -> dict:
    """The metric's options with ``reference_run: auto`` resolved to the reference run's directory, and
    ``erased: auto`` to the concepts this run erases (none for the unedited model)."""
    options = dict(cfg.task.metrics[name].options)
    if _auto_reference(cfg, name):
        options["reference_run"] = str(reference_run_dir(cfg))
    if getattr(METRICS.get(name), "erased_classes_auto", False) and options.get("erased", "auto") == "auto":
        options["erased"] = [] if cfg.method.name == "sd" else task_concepts(cfg)
    return options


def check_metrics(cfg: RunConfig) -> None:
    """Build every metric of the task and let it fail now, not after hours of generation."""
    for name in cfg.task.metrics:
        build_metric(name, metric_options(cfg, name)).check()


def ensure_reference_run(cfg: RunConfig, *, progress: bool = True) -> Path | None:
    """Generate (or complete) the unedited model's run that reference-run metrics compare against."""
    needs = [n for n in cfg.task.metrics if _auto_reference(cfg, n)]
    if not needs:
        return None
    ref_dir = reference_run_dir(cfg)
    if cfg.method.name == "sd" and Path(cfg.run.out) / run_name(cfg) == ref_dir:
        return ref_dir                       # this run is its own reference
    log.info("%s: generating the unedited model's reference run %s", ", ".join(needs), ref_dir)
    ref = reference_config(cfg)
    with open_run(ref) as run_dir:
        generate(ref, run_dir, progress=progress)
    return ref_dir


def generate(cfg: RunConfig, run_dir: Path, *, progress: bool = True, on_written=None) -> dict:
    """Generate the run's images (resumable). ``on_written(entry)`` sees each image once it is on disk."""
    items, set_infos = work_items(cfg)
    if not items:
        raise ConfigError(f"task {cfg.task.name!r} has nothing to generate (no metric uses a prompt set; pick sets "
                          f"with --sets {','.join(cfg.task.prompt_sets)})")
    hparams = method_hparams(cfg) if not cfg.run.artifact else cfg.hparams
    shard, accel_device = distributed_shard()
    device = accel_device or choose_device(cfg, len(items))
    loaded = load_pipeline(cfg.protocol.model, revision=cfg.protocol.revision, dtype=cfg.protocol.dtype, device=device,
                           vae_dtype=cfg.protocol.vae_dtype)
    if shard[1] > 1 and shard[0] != 0:
        barrier()               # rank 0 trains (or loads) the artifact; the others then read it from the cache
    artifact, artifact_path = erase(cfg, loaded, progress=progress, hparams=hparams)
    if shard[1] > 1 and shard[0] == 0:
        barrier()
    method = get_method(cfg.method.name)
    made_with = {e.get("artifact_sha256") for e in read_manifest(run_dir).values()} - {None, artifact.sha256}
    if made_with:
        raise RunStateError(
            f"{run_dir}: its images were made with another erased model (artifact {sorted(made_with)[0][:16]}, now "
            f"{artifact.sha256[:16]}: retrained, or another --artifact); use --force to start anew or --name for a new run")
    engine = Engine(loaded.pipe, cfg.protocol, device=device, batch_size=cfg.run.batch_size,
                    png_compress_level=cfg.run.png_compress_level, progress=progress, compile=cfg.run.compile,
                    cuda_graphs=cfg.run.cuda_graphs, channels_last=cfg.run.channels_last)
    if engine.batch_size == "auto":
        # Resolve it here: the memory probe runs the UNet on its own, which must not count as a call of the
        # method's per-batch hooks (GLoCE's step counter, SAFREE's announced prompts).
        engine.batch_size = engine.run_batch_size(read_manifest(run_dir), len(items), shard[1])
    with method.apply(loaded.pipe, artifact):
        attention_backend = sorted({type(p).__name__ for k, p in loaded.pipe.unet.attn_processors.items()
                                    if k.endswith("attn2.processor")})
        stats = engine.generate(items, run_dir, shard=shard, extra={"artifact_sha256": artifact.sha256},
                                on_written=on_written)
    if shard[1] > 1:
        barrier()               # every shard's manifest is complete before rank 0 merges them
        if shard[0] != 0:
            return stats
    merge_manifests(run_dir, items)
    entries = read_manifest(run_dir)
    missing = [it.key for it in items if it.key not in entries]
    if missing:
        raise RunStateError(f"{run_dir}: {len(missing)} images missing after generation (first: {missing[0]})")
    scheduler = engine_scheduler_config(engine)
    info = {
        "created": _now(),
        "model": loaded.info,
        "method": {"name": method.name, "version": method.version,
                   **concepts_record(cfg, artifact.metadata.get("concepts", [])), "hparams": hparams, "artifact_sha256": artifact.sha256,
                   "artifact_path": str(artifact_path) if artifact_path else None,
                   "applies_to_negative_branch": True},
        "sampler": {"scheduler": scheduler, "steps": cfg.protocol.steps, "eta": cfg.protocol.eta,
                    "resolution": [cfg.protocol.height, cfg.protocol.width], "dtype": cfg.protocol.dtype,
                    "vae_dtype": cfg.protocol.vae_dtype or cfg.protocol.dtype, "tf32": cfg.protocol.tf32,
                    "attention_processors_attn2": attention_backend, "cfg_formula": "eps_u + s*(eps_c - eps_u)",
                    "safety_checker": False},
        "noise": {"rng": cfg.protocol.rng, "granularity": "one generator per prompt row",
                  "k_images_per_row": "one (k,4,H/8,W/8) float32 draw per row; image i = slice i",
                  "seed_column": "evaluation_seed"},
        "engine": engine.settings(),
        "prompt_sets": set_infos,
        "images": {"total": len(items), "flagged": sum(1 for e in entries.values() if e.get("flags")),
                   "format": "PNG", "naming": "images/<set>/<row id>_<image index>.png"},
        "hardware": provenance.hardware(device),
        "versions": provenance.package_versions(),
        "cpebench": {"version": provenance.code_version(), **provenance.git_state()},
    }
    (run_dir / "generation.json").write_text(json.dumps(info, indent=2, default=str))
    return stats


def engine_scheduler_config(engine: Engine) -> dict:
    from .engine import make_scheduler

    s = make_scheduler(engine.protocol.scheduler, engine.pipe.scheduler.config)
    return {"class": type(s).__name__, "config": {k: v for k, v in dict(s.config).items() if not k.startswith("_")}}


# --------------------------------------------------------------------------- score


def build_metric(name: str, options: dict) -> Metric:
    cls = METRICS.get(name)
    try:
        return cls(**options)
    except TypeError as e:
        raise ConfigError(f"metrics.{name}.options: {e}") from None


def scorer_id(name: str, options: dict) -> str:
    """What makes a metric's per-image details reusable: its name, version and every option that can
    change a number (operational ones such as device or batch size excluded)."""
    cls = METRICS.get(name)
    kept = {k: v for k, v in options.items() if k not in cls.operational_options}
    blob = json.dumps({"metric": name, "version": cls.version, "options": kept}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def read_scores(scores_path: Path) -> dict[tuple[str, str], dict]:
    """The latest stored line per (metric, image key); rewrites the file without superseded lines."""
    lines = read_jsonl(scores_path, repair=True)
    latest = {(line["metric"], line["key"]): line for line in lines}
    if len(latest) < len(lines):
        tmp = scores_path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(line) + "\n" for line in latest.values()), encoding="utf-8")
        os.replace(tmp, scores_path)
    return latest


SCORE_CHUNK = 16


def bound_metric(cfg: RunConfig, name: str, run_dir: Path) -> tuple[Metric, str]:
    """Task metric ``name`` built with its resolved options and bound to ``run_dir``, and its scorer id."""
    options = metric_options(cfg, name)
    metric = build_metric(name, options)
    metric.bind(run_dir)
    return metric, scorer_id(name, options)


def score_chunk(metric: Metric, name: str, scorer: str, run_dir: Path, entries: list[dict], out) -> list[dict]:
    """Score images (manifest entries) and append their lines to the open scores.jsonl ``out``."""
    details = metric.score([GeneratedImage(run_dir / e["file"], e) for e in entries])
    out.write("".join(json.dumps({"metric": name, "key": e["key"], "scorer": scorer, "details": det}) + "\n"
                      for e, det in zip(entries, details)))
    out.flush()
    return details


class BackgroundScorer:
    """Scores images while the engine generates the next batches (``cpebench run``), so scoring keeps
    up with generation instead of starting after it. It writes the lines ``score`` would write (same
    scorer ids); the final ``score`` then finds them stored and only accumulates and computes.
    Metrics that compare with the reference run are left to ``score`` (the reference may not exist
    yet). A failure here never stops generation: it is logged and ``score`` redoes what is missing."""

    def __init__(self, run_dir: Path, metrics: list[tuple[str, Metric, str, set | None]]):
        """``metrics``: (name, metric, scorer id, prompt sets it scores or None for all)."""
        import queue
        import threading

        self.run_dir, self.error = Path(run_dir), None
        stored = read_scores(self.run_dir / "scores.jsonl")
        self.metrics = []
        for name, metric, scorer, sets in metrics:
            done = {key for (m, key), line in stored.items() if m == name and line.get("scorer") == scorer}
            self.metrics.append((name, metric, scorer, sets, done, []))
        self.queue: queue.Queue = queue.Queue()
        self.abandon = threading.Event()
        self.thread = threading.Thread(target=self._work, name="cpebench-scorer", daemon=True)
        self.thread.start()

    @classmethod
    def for_run(cls, run_dir: Path, cfg: RunConfig) -> BackgroundScorer:
        metrics = []
        for name, mcfg in cfg.task.metrics.items():
            if getattr(METRICS.get(name), "uses_reference_run", False):
                continue
            metrics.append((name, *bound_metric(cfg, name, Path(run_dir)), set(mcfg.prompt_sets)))
        return cls(run_dir, metrics)

    def __call__(self, entry: dict) -> None:
        self.queue.put(entry)

    def _work(self) -> None:
        with open(self.run_dir / "scores.jsonl", "a", encoding="utf-8") as out:
            while True:
                entry = self.queue.get()
                if self.abandon.is_set():
                    return                   # interrupted: `score` does the rest on the next run
                for name, metric, scorer, sets, done, buffer in self.metrics:
                    if entry is not None and (sets is None or entry["set"] in sets) and entry["key"] not in done:
                        buffer.append(entry)
                    if buffer and (len(buffer) >= SCORE_CHUNK or entry is None) and self.error is None:
                        try:
                            score_chunk(metric, name, scorer, self.run_dir, buffer, out)
                        except Exception as e:   # noqa: BLE001 - generation goes on; `score` redoes it
                            self.error = f"{name}: {type(e).__name__}: {e}"
                            log.warning("scoring during generation stopped (%s); images are scored afterwards",
                                        self.error)
                        buffer.clear()
                if entry is None:
                    return

    def close(self, finish: bool = True) -> None:
        """Score what is left in the buffers and wait for it; ``finish=False`` (generation failed or was
        interrupted) drops the backlog instead, so Ctrl-C does not wait for it."""
        if not finish:
            self.abandon.set()
        self.queue.put(None)
        self.thread.join()


def score(run_dir: Path, cfg: RunConfig | None = None, *, progress: bool = True) -> dict:
    """Score every metric of the task on its prompt sets; resumable; writes summary.json. Stored
    per-image details are reused only when they were made with the same metric options."""
    run_dir = Path(run_dir)
    cfg = cfg or load_run_config(run_dir)
    entries = read_manifest(run_dir)
    if not entries:
        raise RunStateError(f"{run_dir}: no images in the manifest; run `cpebench generate` first")
    check_complete(run_dir, entries)
    scores_path = run_dir / "scores.jsonl"
    lines = read_scores(scores_path)
    results = {}
    from tqdm.auto import tqdm

    with open(scores_path, "a", encoding="utf-8") as out:
        for name, mcfg in cfg.task.metrics.items():
            metric, scorer = bound_metric(cfg, name, run_dir)
            mine = [e for e in entries.values() if e["set"] in mcfg.prompt_sets]
            if not mine:
                log.warning("metric %s: no generated images in sets %s", name, list(mcfg.prompt_sets))
                continue
            stored = {k: line["details"] for k, line in lines.items() if line.get("scorer") == scorer}
            stale = sum(1 for e in mine if (name, e["key"]) in lines and (name, e["key"]) not in stored)
            if stale:
                log.info("metric %s: %d images were scored with other options; scoring them again", name, stale)
            todo = [e for e in mine if (name, e["key"]) not in stored]
            for e in todo:
                check_image(run_dir, e)
            metric.accumulate([stored[(name, e["key"])] for e in mine if (name, e["key"]) in stored])
            bar = tqdm(total=len(mine), initial=len(mine) - len(todo), unit="img", desc=f"score {name}",
                       disable=not progress, dynamic_ncols=True)
            for i in range(0, len(todo), SCORE_CHUNK):
                chunk = todo[i : i + SCORE_CHUNK]
                metric.accumulate(score_chunk(metric, name, scorer, run_dir, chunk, out))
                bar.update(len(chunk))
            bar.close()
            results[name] = metric.compute()
    summary = make_summary(run_dir, cfg, results)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str, ensure_ascii=False))
    return summary


def generation_info(run_dir: Path) -> dict:
    """generation.json: written once every image of the run is on disk ({} before)."""
    path = run_dir / "generation.json"
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except ValueError as e:
        raise RunStateError(f"{path}: not valid JSON ({e})") from None


RERUN = "rerun the `cpebench generate` (or `run`) command that made the run to complete it"


def check_complete(run_dir: Path, entries: dict) -> None:
    """A summary is over the whole run or not written: a run whose generation has not finished, or
    whose manifest lost lines (a torn last line), is refused rather than scored in part."""
    total = (generation_info(run_dir).get("images") or {}).get("total")
    if total is None:
        raise RunStateError(f"{run_dir}: its generation has not finished (no generation.json; {len(entries)} images so "
                            f"far); {RERUN}")
    if len(entries) < total:
        raise RunStateError(f"{run_dir}: manifest.jsonl lists {len(entries)} of the run's {total} images (cut short "
                            f"or edited); {RERUN}, then score it")


def check_image(run_dir: Path, entry: dict) -> None:
    """The PNG of a manifest line is there and is the one generated (its recorded sha256): a damaged
    file is named here instead of failing somewhere inside a metric."""
    path = run_dir / entry["file"]
    if not path.is_file():
        raise RunStateError(f"{path}: image missing (manifest key {entry['key']}); {RERUN}")
    if entry.get("sha256") and data.sha256_file(path) != entry["sha256"]:
        raise RunStateError(f"{path}: truncated or modified (its sha256 is not the one in manifest.jsonl); {RERUN}, "
                            "which makes it again")


def make_summary(run_dir: Path, cfg: RunConfig, results: dict) -> dict:
    generation = generation_info(run_dir)
    card = {
        "protocol": cfg.protocol.name,
        "model": {"id": cfg.protocol.model, "revision": generation.get("model", {}).get("revision")},
        "method": generation.get("method"),
        "sampler": generation.get("sampler"),
        "engine": generation.get("engine"),
        "guidance": cfg.protocol.guidance,
        "noise": generation.get("noise"),
        "prompts": generation.get("prompt_sets"),
        "detectors": {n: r.info for n, r in results.items()},
        "hardware": generation.get("hardware"),
        "versions": generation.get("versions"),
        "cpebench": generation.get("cpebench"),
    }
    return {
        "task": cfg.task.name, "method": cfg.method.name, "model": cfg.protocol.model, "preset": cfg.preset,
        "run": run_dir.name, "created": _now(),
        "metrics": {n: r.to_dict() for n, r in results.items()},
        "images": generation.get("images"),
        "protocol_card": card,
        "config": cfg.to_dict(),
    }
