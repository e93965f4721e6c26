"""Configuration: frozen dataclasses loaded from YAML with ``include:`` inheritance.

A run is resolved from four layers, later ones winning:
task YAML (which includes the protocol YAML) → method YAML → preset YAML → CLI ``key=value``.
Every file is checked on its own, so an unknown key is reported with the file it is in.
The resolved config is saved with every run (``config.yaml``) and compared on resume.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

from .errors import ConfigError
from .models import MICRO
from .registry import did_you_mean

# --------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class ProtocolConfig:
    """Everything that changes an image. Two results are comparable only if these are equal."""

    name: str = "v1"
    model: str = "CompVis/stable-diffusion-v1-4"  # hub id, local directory, or "tiny" (in-process test model)
    revision: str | None = None                   # hub commit; recorded after loading if None
    scheduler: str = "pndm"                       # see engine.SCHEDULERS
    steps: int = 50
    guidance: float = 7.5                         # used where a prompt set has no per-row guidance
    eta: float = 0.0                              # DDIM only
    height: int = 512
    width: int = 512
    dtype: str = "fp32"                           # fp32 | fp16 | bf16: UNet and text encoder
    vae_dtype: str | None = None                  # the VAE's own precision; None = dtype
    tf32: bool = False                            # TF32 matmuls and convolutions on CUDA (False: strict fp32)
    rng: str = "cpu"                              # cpu: one CPU generator per row (v1) | cuda_default (CPE's code)


@dataclass(frozen=True)
class PromptSetConfig:
    file: str | None = None          # name in data.DATA_FILES, e.g. prompts/I2P_prompts_4703.csv (or data.GATED_FILES)
    path: str | None = None          # a user's CSV: a gated file's copy (default <data dir>/<file>), or found prompts
    format: str = "inline"           # loader in data.LOADERS, or inline (rows below)
    split: str = ""                  # erased | remained | coco | ...
    negative_prompt: str = ""
    images_per_row: int = 1
    per_row_guidance: bool = False   # take CFG from the file (I2P evaluation_guidance)
    clean_file: str | None = None    # a row-aligned file of the same format: its prompt becomes each row's
                                     # extras.clean_prompt (Six-CD's dual version: the scene without the concept)
    drop_empty: bool = False         # protocol row filter (I2P case 2260)
    dedupe: bool = False             # protocol row filter (character_64 rows 320-324)
    limit: int | None = None
    rows: tuple = ()                 # inline rows (format: inline)
    smoke_rows: tuple = ()           # a few inline rows used by the smoke preset (run.prompts: smoke)


@dataclass(frozen=True)
class MetricConfig:
    prompt_sets: tuple = ()
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskConfig:
    name: str = ""
    description: str = ""
    concepts: tuple = ()
    concepts_from: str | None = None   # or: the distinct `concept`s of this prompt set, in file order
    protocol: ProtocolConfig = field(default_factory=ProtocolConfig)
    prompt_sets: Mapping[str, PromptSetConfig] = field(default_factory=dict)
    metrics: Mapping[str, MetricConfig] = field(default_factory=dict)
    # The task whose concepts and method hyperparameters erase the model (e.g. nudity-attacks erases as
    # nudity, so the same cached artifact meets the attack sets); default: this task.
    erase_as: str = ""
    # One erased model per concept (ESD's object task: ten models, each erasing one class): `run` without
    # --concepts makes one run per concept, each named after it; the unedited model (sd) makes one run.
    erase_each: bool = False

    @property
    def method_task(self) -> str:
        return self.erase_as or self.name


@dataclass(frozen=True)
class MethodConfig:
    name: str = ""
    description: str = ""
    source: str = ""                 # paper / code the defaults come from
    hparams: Mapping[str, Any] = field(default_factory=dict)
    tasks: Mapping[str, Any] = field(default_factory=dict)   # per-task hparam overrides
    # per task, the concepts the method's paper code erases there, {names: [...], source: "..."}; a task
    # without an entry erases the task's own list. Concepts given on the command line replace both.
    concepts: Mapping[str, Any] = field(default_factory=dict)
    # the micro world's overrides, {source: "...", hparams: {...every micro task...}, tasks: {micro-x: {...}}};
    # load_method_config folds them into ``tasks`` (the paper's values are for SD-1.4, not the micro model)
    micro: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RunOptions:
    """Operational settings: they never change an image (except device, which is recorded)."""

    out: str = "runs"
    name: str | None = None
    device: str = "auto"             # auto | cpu | cuda | cuda:N
    batch_size: int | str = 8        # images per batch, or auto (from free GPU memory)
    compile: str = "none"            # none | regional (the repeated blocks) | full (the whole UNet): torch.compile
    cuda_graphs: bool = False        # replay each compiled region as a CUDA graph (torch.compile reduce-overhead)
    channels_last: str = "auto"      # auto (on with CUDA) | on | off: NHWC convolutions
    overlap_scoring: bool = True     # score finished images while the next batches generate (single process)
    limit: int | None = None         # first N rows of every prompt set
    prompts: str = "full"            # full | smoke (the task's smoke_rows)
    sets: tuple = ()                 # prompt sets to generate; () = those the task's metrics use
    data_dir: str | None = None
    png_compress_level: int = 6
    artifact: str | None = None      # use this erased-model artifact instead of erasing (a cpebench artifact
                                     # folder, or a method's own format, e.g. CPE's official checkpoints)


@dataclass(frozen=True)
class PresetConfig:
    description: str = ""
    task: str | None = None          # the task whose hyperparameters `erase --concepts ... --preset` uses
    protocol: Mapping[str, Any] = field(default_factory=dict)
    run: Mapping[str, Any] = field(default_factory=dict)
    hparams: Mapping[str, Any] = field(default_factory=dict)   # per method: {cpe: {stages: 2, ...}}
    metric_options: Mapping[str, Any] = field(default_factory=dict)   # per metric: {clip_score: {model: tiny}}
    metrics_off: tuple = ()          # metrics this preset cannot run (e.g. FID without real COCO images)


@dataclass(frozen=True)
class RunConfig:
    task: TaskConfig
    method: MethodConfig
    protocol: ProtocolConfig
    run: RunOptions
    preset: str | None = None

    @property
    def hparams(self) -> dict:
        """Method hyperparameters with the task's overrides applied."""
        out = dict(self.method.hparams)
        out.update(self.method.tasks.get(self.task.method_task, {}) or {})
        return out

    def to_dict(self) -> dict:
        return plain(dataclasses.asdict(self))


# Keys of RunConfig.to_dict() that may differ between two invocations of the same run.
OPERATIONAL_KEYS = ("run.batch_size", "run.out", "run.name", "run.png_compress_level", "run.data_dir", "run.sets",
                    "run.compile", "run.cuda_graphs", "run.channels_last", "run.overlap_scoring")

# --------------------------------------------------------------------------- paths


def benchmarks_dir() -> Path:
    """The benchmarks/ folder (tasks, methods, presets). Overridable for plugins/tests."""
    env = os.environ.get("CPEBENCH_BENCHMARKS")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "benchmarks"


def _yaml_names(kind: str) -> list[str]:
    d = benchmarks_dir() / kind
    return sorted(p.stem for p in d.glob("*.yaml") if not p.stem.startswith("_")) if d.is_dir() else []


def task_names() -> list[str]:
    return _yaml_names("tasks")


def method_config_names() -> list[str]:
    return _yaml_names("methods")


def preset_names() -> list[str]:
    return _yaml_names("presets")


# --------------------------------------------------------------------------- YAML loading


def _read_yaml(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    return data


def deep_merge(base: dict, over: Mapping) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_yaml_with_includes(path: Path, schema: type, _seen: tuple = ()) -> dict:
    """Load ``path``; ``include:`` (str or list, relative to the file) is merged underneath.
    Each file's keys are validated against ``schema`` before merging, so errors name the file."""
    path = Path(path).resolve()
    if path in _seen:
        raise ConfigError(f"{path}: include cycle ({' -> '.join(str(p) for p in _seen + (path,))})")
    data = _read_yaml(path)
    includes = data.pop("include", [])
    includes = [includes] if isinstance(includes, str) else list(includes or [])
    check_keys(data, schema, str(path))
    merged: dict = {}
    for inc in includes:
        merged = deep_merge(merged, load_yaml_with_includes(path.parent / inc, schema, _seen + (path,)))
    return deep_merge(merged, data)


# Fields that are a mapping from a user-chosen name to a nested dataclass.
_NAMED_CHILDREN = {(TaskConfig, "prompt_sets"): PromptSetConfig, (TaskConfig, "metrics"): MetricConfig}
_NESTED = {(TaskConfig, "protocol"): ProtocolConfig}


def check_keys(data: Mapping, schema: type, source: str, prefix: str = "") -> None:
    """Raise ConfigError naming ``source`` and the dotted key for any key ``schema`` lacks."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'top level'} must be a mapping")
    names = {f.name for f in fields(schema)}
    for key, value in data.items():
        if key not in names:
            raise ConfigError(f"{source}: unknown key {prefix + str(key)!r}.{did_you_mean(str(key), names)}")
        if (schema, key) in _NESTED and value is not None:
            check_keys(value, _NESTED[(schema, key)], source, f"{prefix}{key}.")
        if (schema, key) in _NAMED_CHILDREN and value is not None:
            if not isinstance(value, Mapping):
                raise ConfigError(f"{source}: {prefix}{key} must be a mapping of name -> settings")
            for child_name, child in value.items():
                check_keys(child or {}, _NAMED_CHILDREN[(schema, key)], source, f"{prefix}{key}.{child_name}.")


def _coerce(value: Any, f: dataclasses.Field, source: str, key: str) -> Any:
    """Light type coercion with a clear error: YAML lists become tuples, ints become floats."""
    t = str(f.type)
    if value is None:
        return None
    if t.startswith("tuple"):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            value = [value]
        return tuple(_freeze(v) for v in value)
    if t.startswith("Mapping"):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{source}: {key} must be a mapping, got {value!r}")
        return dict(value)
    base = t.split("|")[0].strip()
    try:
        if base in ("int", "float") and isinstance(value, bool):
            raise ValueError
        if base == "int" and "str" in t and isinstance(value, str):
            return value                 # int | str fields take a keyword (checked by their section's check)
        if base == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if base == "float":
            return float(value)
        if base == "bool":
            if isinstance(value, bool):
                return value
            raise ValueError
        if base == "str":
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: {key} must be {base}, got {value!r}") from None
    return value


def _freeze(v: Any) -> Any:
    return dict(v) if isinstance(v, Mapping) else v


def build(schema: type, data: Mapping, source: str, prefix: str = ""):
    check_keys(data, schema, source, prefix)
    kwargs = {}
    for f in fields(schema):
        if f.name not in data:
            continue
        value = data[f.name]
        key = prefix + f.name
        if (schema, f.name) in _NESTED:
            value = build(_NESTED[(schema, f.name)], value or {}, source, key + ".")
        elif (schema, f.name) in _NAMED_CHILDREN:
            child_schema = _NAMED_CHILDREN[(schema, f.name)]
            value = {str(n): build(child_schema, c or {}, source, f"{key}.{n}.") for n, c in (value or {}).items()}
        else:
            value = _coerce(value, f, source, key)
        kwargs[f.name] = value
    return schema(**kwargs)


# --------------------------------------------------------------------------- overrides


def set_dotted(tree: dict, key: str, value: Any, source: str) -> None:
    """``tree["a"]["b"]["c"] = value`` for key ``a.b.c``."""
    node = tree
    parts = key.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{source}: {key!r} conflicts with another setting of {p!r}")
    node[parts[-1]] = value


def parse_overrides(items: list[str]) -> dict:
    """``a.b.c=value`` strings → nested dict; values parsed as YAML scalars/lists."""
    out: dict = {}
    for item in items:
        key, eq, raw = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"command line: override {item!r} must look like key=value (e.g. protocol.steps=25)")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        set_dotted(out, key, value, f"command line: override {item!r}")
    return out


_OVERRIDE_SECTIONS = ("protocol", "run", "hparams", "prompt_sets", "metrics", "concepts")


# --------------------------------------------------------------------------- resolution


def _resolve_yaml(kind: str, name: str, known: list[str]) -> Path:
    p = Path(name)
    if p.suffix in (".yaml", ".yml") and p.exists():
        return p
    path = benchmarks_dir() / kind / f"{name}.yaml"
    if not path.exists():
        singular = kind.rstrip("s")
        raise ConfigError(f"Unknown {singular} {name!r}.{did_you_mean(name, known)}")
    return path


def load_task(name: str) -> tuple[TaskConfig, dict]:
    path = _resolve_yaml("tasks", name, task_names())
    raw = load_yaml_with_includes(path, TaskConfig)
    raw.setdefault("name", path.stem)
    return build(TaskConfig, raw, str(path)), raw


def method_config_path(name: str) -> Path | None:
    """``benchmarks/methods/<name>.yaml``, else the YAML a plugin ships in its own package (its Method
    class's ``config_file``, relative to the module that defines the class), else None."""
    import inspect

    from .errors import RegistryError
    from .registry import METHODS

    path = benchmarks_dir() / "methods" / f"{name}.yaml"
    if path.exists():
        return path
    try:
        cls = METHODS.get(name)
    except RegistryError:
        return None
    shipped = getattr(cls, "config_file", None)
    if not shipped:
        return None
    path = Path(inspect.getfile(cls)).resolve().parent / shipped
    if not path.exists():
        raise ConfigError(f"method {name!r}: its config_file {str(shipped)!r} is not at {path} "
                          "(ship it as package data next to the module)")
    return path


def load_method_config(name: str) -> MethodConfig:
    """A method's YAML (``method_config_path``), or an empty config if the method has none."""
    path = method_config_path(name)
    if path is None:
        return MethodConfig(name=name)
    raw = load_yaml_with_includes(path, MethodConfig)
    raw.setdefault("name", name)
    mc = build(MethodConfig, raw, str(path))
    return dataclasses.replace(mc, concepts=check_method_concepts(mc.concepts, str(path)),
                               tasks={**mc.tasks, **micro_task_hparams(mc.micro, str(path))})


def micro_task_hparams(micro: Mapping[str, Any], source: str) -> dict:
    """A method YAML's ``micro:`` section as per-task overrides of every micro-world task."""
    from .microworld.prompts import TASKS as MICRO_TASKS

    if not micro:
        return {}
    where = f"{source}: micro"
    unknown = set(micro) - {"source", "hparams", "tasks"}
    if unknown:
        raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r}; expected source, hparams, tasks")
    if not isinstance(micro.get("source"), str) or not micro["source"].strip():
        raise ConfigError(f"{where}.source must say where the micro values come from")
    tasks = micro.get("tasks") or {}
    for t in tasks:
        if t not in MICRO_TASKS:
            raise ConfigError(f"{where}.tasks: unknown micro task {t!r}.{did_you_mean(str(t), MICRO_TASKS)}")
    common = dict(micro.get("hparams") or {})
    return {t: {**common, **(tasks.get(t) or {})} for t in MICRO_TASKS}


def check_method_concepts(entries: Mapping[str, Any], source: str) -> dict:
    """A method YAML's ``concepts:`` block: per task ``{names: [non-empty texts], source: text}``."""
    out = {}
    for task, entry in entries.items():
        where = f"{source}: concepts.{task}"
        if not isinstance(entry, Mapping) or set(entry) != {"names", "source"}:
            raise ConfigError(f"{where} must be a mapping with exactly the keys names and source, got {entry!r}")
        names = entry["names"]
        if (not isinstance(names, (list, tuple)) or not names
                or not all(isinstance(n, str) and n.strip() for n in names)):
            raise ConfigError(f"{where}.names must be a non-empty list of non-empty texts, got {names!r}")
        if not isinstance(entry["source"], str) or not entry["source"].strip():
            raise ConfigError(f"{where}.source must say where the list comes from (paper, code file@commit)")
        out[str(task)] = {"names": [n.strip() for n in names], "source": entry["source"].strip()}
    return out


def without_method_concepts(method: MethodConfig, task: str) -> MethodConfig:
    """``method`` minus its own concept list for ``task``: concepts given on the command line replace it."""
    return dataclasses.replace(method, concepts={t: e for t, e in method.concepts.items() if t != task})


def load_preset(name: str) -> PresetConfig:
    path = _resolve_yaml("presets", name, preset_names())
    preset = build(PresetConfig, load_yaml_with_includes(path, PresetConfig), str(path))
    check_keys(preset.protocol, ProtocolConfig, str(path), "protocol.")
    check_keys(preset.run, RunOptions, str(path), "run.")
    return preset


def resolve_run(
    method: str,
    task: str,
    *,
    preset: str | None = None,
    overrides: list[str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> RunConfig:
    """Build the RunConfig for ``cpebench run/generate``.

    ``flags`` are the explicit CLI options (e.g. {"protocol.model": ..., "run.device": ...}); they
    win over presets. ``overrides`` are ``key=value`` strings, applied last (they beat flags)."""
    task_cfg, task_raw = load_task(task)
    method_cfg = load_method_config(method)
    protocol_raw = dataclasses.asdict(task_cfg.protocol)
    run_raw: dict = {}
    preset_hparams: dict = {}
    if preset:
        p = load_preset(preset)
        if p.task and p.task != task_cfg.name:
            raise ConfigError(f"preset {preset!r} selects task {p.task!r}'s hyperparameters; it cannot be combined "
                              f"with task {task_cfg.name!r} (drop --preset, or use --task {p.task})")
        if task_cfg.protocol.model == MICRO and p.protocol.get("model", MICRO) != MICRO:
            raise ConfigError(f"task {task_cfg.name!r} runs on the micro world's model, which is already made for "
                              f"the CPU; preset {preset!r} would replace it with {p.protocol['model']!r} (drop --preset)")
        protocol_raw = deep_merge(protocol_raw, p.protocol)
        run_raw = deep_merge(run_raw, p.run)
        preset_hparams = dict(p.hparams.get(method) or {})
        used = {m: {"options": dict(o)} for m, o in p.metric_options.items() if m in task_cfg.metrics}
        if used or any(m in task_cfg.metrics for m in p.metrics_off):   # the command line still wins
            task_raw = deep_merge(task_raw, {"metrics": used})
            task_raw["metrics"] = {k: v for k, v in task_raw["metrics"].items() if k not in p.metrics_off}
            task_cfg = build(TaskConfig, task_raw, f"preset {preset}")

    over: dict = {}
    for k, v in (flags or {}).items():
        if v is not None:
            set_dotted(over, k, list(v) if isinstance(v, tuple) else v, "command line")
    over = deep_merge(over, parse_overrides(list(overrides or [])))   # key=value last
    unknown = [k for k in over if k not in _OVERRIDE_SECTIONS]
    if unknown:
        raise ConfigError(
            f"command line: unknown key {unknown[0]!r}; overrides start with one of "
            f"{', '.join(_OVERRIDE_SECTIONS)} (e.g. protocol.steps=25, run.batch_size=4)"
        )
    protocol_raw = deep_merge(protocol_raw, over.get("protocol", {}))
    run_raw = deep_merge(run_raw, over.get("run", {}))
    if any(k in over for k in ("prompt_sets", "metrics", "concepts")):
        task_over = {k: over[k] for k in ("prompt_sets", "metrics", "concepts") if k in over}
        if "metrics" in task_over and not isinstance(task_over["metrics"], Mapping):
            task_raw = {**task_raw, "metrics": {}}  # metrics=a or metrics=[a,b] keeps only those
            task_over["metrics"] = _metrics_override(task_over["metrics"], task_cfg)
        task_cfg = build(TaskConfig, deep_merge(task_raw, task_over), "command line")
        if "concepts" in over:
            method_cfg = without_method_concepts(method_cfg, task_cfg.method_task)
    if preset_hparams or "hparams" in over:  # preset, then command line, beat the YAML's per-task values
        tasks = dict(method_cfg.tasks)
        key = task_cfg.method_task
        tasks[key] = {**(tasks.get(key) or {}), **preset_hparams, **over.get("hparams", {})}
        method_cfg = dataclasses.replace(method_cfg, tasks=tasks)

    protocol_cfg = build(ProtocolConfig, protocol_raw, "command line/preset", "protocol.")
    run_cfg = build(RunOptions, run_raw, "command line/preset", "run.")
    if task_cfg.concepts_from and task_cfg.concepts_from not in task_cfg.prompt_sets:
        raise ConfigError(f"task {task_cfg.name!r}: concepts_from names no prompt set "
                          f"({task_cfg.concepts_from!r}).{did_you_mean(task_cfg.concepts_from, task_cfg.prompt_sets)}")
    check_engine_settings(protocol_cfg, run_cfg)
    check_values(task_cfg, protocol_cfg, run_cfg)
    for s in run_cfg.sets:
        if s not in task_cfg.prompt_sets:
            raise ConfigError(f"run.sets: task {task_cfg.name!r} has no prompt set {s!r}.{did_you_mean(s, task_cfg.prompt_sets)}")
    return RunConfig(task=task_cfg, method=method_cfg, protocol=protocol_cfg, run=run_cfg, preset=preset)


DTYPES = ("fp32", "fp16", "bf16")
COMPILE_MODES = ("none", "regional", "full")


def _one_of(key: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: unknown value {value!r}.{did_you_mean(str(value), map(str, allowed))}")


def check_engine_settings(protocol: ProtocolConfig, run: RunOptions) -> None:
    """The precision and speed knobs, each error naming its key."""
    _one_of("protocol.dtype", protocol.dtype, DTYPES)
    if protocol.vae_dtype is not None:
        _one_of("protocol.vae_dtype", protocol.vae_dtype, DTYPES)
    check_speed_settings(run.batch_size, run.compile, run.cuda_graphs, run.channels_last)


def check_speed_settings(batch_size, compile: str, cuda_graphs: bool, channels_last: str) -> None:
    """run.batch_size / compile / cuda_graphs / channels_last (also checked by ``Engine`` itself)."""
    _one_of("run.compile", compile, COMPILE_MODES)
    _one_of("run.channels_last", channels_last, ("auto", "on", "off"))
    if not (batch_size == "auto" or (isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size >= 1)):
        raise ConfigError(f"run.batch_size: {batch_size!r} must be a positive integer or auto")
    if cuda_graphs and compile == "none":
        raise ConfigError("run.cuda_graphs: CUDA graphs are captured by torch.compile; set run.compile to regional or full")


def check_values(task: TaskConfig, protocol: ProtocolConfig, run: RunOptions) -> None:
    """Values a run cannot start with, each error naming its key (and flag): a bad one must fail here,
    not hours later, nor run as something else (a negative limit would slice from the end)."""
    from .data import data_root
    from .engine import SCHEDULERS

    _one_of("protocol.scheduler", protocol.scheduler, SCHEDULERS)
    _one_of("protocol.rng", protocol.rng, ("cpu", "cuda_default"))
    _one_of("run.prompts", run.prompts, ("full", "smoke"))
    counts = [("protocol.steps", protocol.steps), ("protocol.height", protocol.height),
              ("protocol.width", protocol.width), ("run.limit (--limit)", run.limit)]
    for name, ps in task.prompt_sets.items():
        counts += [(f"prompt_sets.{name}.limit", ps.limit), (f"prompt_sets.{name}.images_per_row", ps.images_per_row)]
    for key, value in counts:
        if value is not None and value < 1:
            raise ConfigError(f"{key}: {value!r} must be >= 1")
    check_device(run.device)
    data_root(run.data_dir)


def check_device(device: str) -> None:
    """``auto`` or a device torch knows of a kind cpebench runs on (cpu, cuda, cuda:N, mps)."""
    if device == "auto":
        return
    import torch

    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError):
        kind = None
    if kind not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"run.device (--device): {device!r} is not a device; use auto, cpu, cuda, cuda:N or mps")


def _metrics_override(value: Any, task: TaskConfig) -> dict:
    """``metrics=nudenet``, ``metrics=a,b`` or ``metrics=[a,b]`` keeps only those metrics of the task."""
    names = [n.strip() for n in value.split(",")] if isinstance(value, str) else list(value)
    out = {}
    for n in names:
        if n not in task.metrics:
            raise ConfigError(f"command line: metrics: task {task.name!r} has no metric {n!r}.{did_you_mean(n, task.metrics)}")
        out[n] = dataclasses.asdict(task.metrics[n])
    return out


# --------------------------------------------------------------------------- saved configs


def plain(obj: Any) -> Any:
    """Tuples → lists, mappings → dicts: a YAML/JSON-safe tree."""
    if isinstance(obj, Mapping):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    return obj


def flatten(tree: Mapping, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def scoring_only(key_diff: str) -> bool:
    """A difference (as ``config_differences`` words it) in how images are scored, not made."""
    return key_diff.startswith("task.metrics.") or key_diff.startswith("task.metrics:")


def _unset(value: Any) -> bool:
    return value is None or value is False or (isinstance(value, (str, Mapping, list, tuple)) and not value) \
        or value == "<absent>"


def config_differences(old: Mapping, new: Mapping, ignore: tuple = OPERATIONAL_KEYS) -> list[str]:
    """Human-readable list of keys whose values differ (operational keys ignored)."""
    a, b = flatten(old), flatten(new)
    diffs = []
    for key in sorted(set(a) | set(b)):
        if any(key == i or key.startswith(i + ".") for i in ignore):
            continue
        va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
        # an empty default equals an absent key: a field added later (task.erase_each, a prompt set's path,
        # method.concepts) defaults to what runs did before it existed, so it must not make earlier run
        # directories "different"
        if va != vb and not (_unset(va) and _unset(vb)):
            diffs.append(f"{key}: {va!r} -> {vb!r}")
    return diffs


def dump_yaml(tree: Mapping) -> str:
    return yaml.safe_dump(plain(tree), sort_keys=False, allow_unicode=True, width=120)
