"""Config: include inheritance, key/type validation with file + dotted key, run resolution, round trips."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import yaml

from cpebench import config, data
from cpebench.config import (OPERATIONAL_KEYS, MethodConfig, RunConfig, TaskConfig, config_differences, dump_yaml,
                             load_method_config, load_preset, load_task, resolve_run)
from cpebench.errors import ConfigError
from cpebench.microworld.prompts import TASKS as MICRO_TASKS
from cpebench.runner import config_from_dict

# --------------------------------------------------------------------------- helpers


@pytest.fixture
def bench(tmp_path, monkeypatch):
    """An empty benchmarks dir (tasks/, methods/, presets/) that config.* reads instead of the real one."""
    root = tmp_path / "benchmarks"
    for d in ("tasks", "tasks/sets", "methods", "presets"):
        (root / d).mkdir(parents=True)
    monkeypatch.setenv("CPEBENCH_BENCHMARKS", str(root))
    return root


@pytest.fixture
def real_bench(monkeypatch):
    """The repository's benchmarks/ dir, whatever the environment says."""
    monkeypatch.delenv("CPEBENCH_BENCHMARKS", raising=False)
    return config.benchmarks_dir()


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def error_of(fn, *args, **kw) -> str:
    with pytest.raises(ConfigError) as e:
        fn(*args, **kw)
    return str(e.value)


def test_benchmarks_dir_follows_env(bench):
    assert config.benchmarks_dir() == bench
    write(bench / "tasks" / "zeta.yaml", "name: zeta\n")
    write(bench / "tasks" / "_hidden.yaml", "{}\n")
    assert config.task_names() == ["zeta"]  # files starting with _ are fragments, not tasks


# --------------------------------------------------------------------------- include inheritance


def test_included_values_are_overridden_by_including_file(bench):
    write(bench / "tasks" / "_base.yaml", """
description: from base
concepts: [a, b]
protocol: {steps: 10, guidance: 3.0, scheduler: ddim}
""")
    write(bench / "tasks" / "t.yaml", """
include: _base.yaml
protocol: {steps: 20}
concepts: [c]
""")
    task, _ = load_task("t")
    assert task.protocol.steps == 20                 # including file wins
    assert task.protocol.guidance == 3.0             # merged (deep) from the include
    assert task.protocol.scheduler == "ddim"
    assert task.description == "from base"
    assert task.concepts == ("c",)                   # lists are replaced, not concatenated
    assert task.name == "t"                          # defaults to the file stem


def test_nested_includes_resolve_relative_to_each_file(bench):
    # t.yaml -> sets/outer.yaml -> inner.yaml (relative to sets/, not to tasks/)
    write(bench / "tasks" / "sets" / "inner.yaml", """
protocol: {steps: 11, height: 128}
prompt_sets:
  x: {file: prompts/a.csv, format: coco, split: inner, images_per_row: 3}
""")
    write(bench / "tasks" / "sets" / "outer.yaml", """
include: [inner.yaml]
protocol: {steps: 22}
prompt_sets:
  x: {split: outer}
""")
    write(bench / "tasks" / "t.yaml", """
include: [sets/outer.yaml]
protocol: {height: 256}
""")
    task, _ = load_task("t")
    assert task.protocol.steps == 22 and task.protocol.height == 256
    x = task.prompt_sets["x"]
    assert (x.file, x.format, x.split, x.images_per_row) == ("prompts/a.csv", "coco", "outer", 3)


def test_later_include_in_list_wins(bench):
    write(bench / "tasks" / "_one.yaml", "protocol: {steps: 1, eta: 0.5}\n")
    write(bench / "tasks" / "_two.yaml", "protocol: {steps: 2}\n")
    write(bench / "tasks" / "t.yaml", "include: [_one.yaml, _two.yaml]\n")
    task, _ = load_task("t")
    assert task.protocol.steps == 2 and task.protocol.eta == 0.5


@pytest.mark.parametrize("layout", ["self", "pair", "triangle"])
def test_include_cycle_is_config_error(bench, layout):
    t = bench / "tasks"
    if layout == "self":
        write(t / "t.yaml", "include: t.yaml\n")
    elif layout == "pair":
        write(t / "t.yaml", "include: sets/a.yaml\n")
        write(t / "sets" / "a.yaml", "include: ../t.yaml\n")
    else:
        write(t / "t.yaml", "include: _a.yaml\n")
        write(t / "_a.yaml", "include: _b.yaml\n")
        write(t / "_b.yaml", "include: _a.yaml\n")
    msg = error_of(load_task, "t")
    assert "include cycle" in msg


def test_diamond_include_is_not_a_cycle(bench):
    write(bench / "tasks" / "_base.yaml", "protocol: {steps: 5}\n")
    write(bench / "tasks" / "_a.yaml", "include: _base.yaml\ndescription: a\n")
    write(bench / "tasks" / "_b.yaml", "include: _base.yaml\nconcepts: [b]\n")
    write(bench / "tasks" / "t.yaml", "include: [_a.yaml, _b.yaml]\n")
    task, _ = load_task("t")
    assert (task.protocol.steps, task.description, task.concepts) == (5, "a", ("b",))


def test_missing_include_names_the_file(bench):
    write(bench / "tasks" / "t.yaml", "include: nowhere.yaml\n")
    msg = error_of(load_task, "t")
    assert "nowhere.yaml" in msg and "not found" in msg


# --------------------------------------------------------------------------- unknown keys


@pytest.mark.parametrize("body, key", [
    ("bogus: 1\n", "bogus"),
    ("protocol: {steps: 3, bogus: 1}\n", "protocol.bogus"),
    ("prompt_sets:\n  x: {file: prompts/a.csv, bogus: 1}\n", "prompt_sets.x.bogus"),
    ("metrics:\n  m: {prompt_sets: [x], bogus: 1}\n", "metrics.m.bogus"),
])
def test_unknown_key_names_file_and_dotted_key(bench, body, key):
    path = write(bench / "tasks" / "t.yaml", body)
    msg = error_of(load_task, "t")
    assert str(path.resolve()) in msg
    assert repr(key) in msg


@pytest.mark.parametrize("body, key, hint", [
    ("protocol: {stpes: 3}\n", "protocol.stpes", "steps"),
    ("descripton: x\n", "descripton", "description"),
    ("prompt_sets:\n  x: {negative_promt: ''}\n", "prompt_sets.x.negative_promt", "negative_prompt"),
    ("metrics:\n  m: {option: {}}\n", "metrics.m.option", "options"),
])
def test_misspelled_key_gets_did_you_mean(bench, body, key, hint):
    write(bench / "tasks" / "t.yaml", body)
    msg = error_of(load_task, "t")
    assert repr(key) in msg
    assert f"Did you mean {hint!r}" in msg


def test_unknown_key_in_included_file_names_the_included_file(bench):
    inc = write(bench / "tasks" / "sets" / "s.yaml", "prompt_sets:\n  x: {file: prompts/a.csv, formt: coco}\n")
    top = write(bench / "tasks" / "t.yaml", "include: sets/s.yaml\nname: t\n")
    msg = error_of(load_task, "t")
    assert str(inc.resolve()) in msg
    assert str(top.resolve()) not in msg
    assert "'prompt_sets.x.formt'" in msg and "Did you mean 'format'" in msg


def test_unknown_key_in_method_and_preset_files(bench):
    m = write(bench / "methods" / "m.yaml", "hparams: {}\nhparms: {lr: 1}\n")
    msg = error_of(load_method_config, "m")
    assert str(m.resolve()) in msg and "'hparms'" in msg and "Did you mean 'hparams'" in msg
    p = write(bench / "presets" / "p.yaml", "protocl: {steps: 1}\n")
    msg = error_of(load_preset, "p")
    assert str(p.resolve()) in msg and "'protocl'" in msg and "Did you mean 'protocol'" in msg


def test_unknown_protocol_key_in_preset_names_the_preset_file(bench):
    write(bench / "tasks" / "t.yaml", "name: t\n")
    p = write(bench / "presets" / "p.yaml", "protocol: {stpes: 1}\n")
    msg = error_of(resolve_run, "sd", "t", preset="p")
    assert "'protocol.stpes'" in msg
    assert str(p.resolve()) in msg


def test_non_mapping_sections_are_config_errors(bench):
    write(bench / "tasks" / "t.yaml", "protocol: [1, 2]\n")
    assert "protocol" in error_of(load_task, "t")
    write(bench / "tasks" / "u.yaml", "prompt_sets: [a, b]\n")
    assert "prompt_sets" in error_of(load_task, "u")
    write(bench / "tasks" / "v.yaml", "- just\n- a list\n")
    assert "top level must be a mapping" in error_of(load_task, "v")
    write(bench / "tasks" / "w.yaml", "protocol: {steps: [unclosed\n")
    assert "invalid YAML" in error_of(load_task, "w")


# --------------------------------------------------------------------------- type errors


@pytest.mark.parametrize("body, key", [
    ("protocol: {steps: abc}\n", "protocol.steps"),
    ("protocol: {steps: 7.5}\n", "protocol.steps"),
    ("protocol: {guidance: high}\n", "protocol.guidance"),
    ("protocol: {model: [a, b]}\n", "protocol.model"),
    ("prompt_sets:\n  x: {per_row_guidance: maybe}\n", "prompt_sets.x.per_row_guidance"),
    ("prompt_sets:\n  x: {images_per_row: five}\n", "prompt_sets.x.images_per_row"),
    ("metrics:\n  m: {options: 3}\n", "metrics.m.options"),
])
def test_type_error_names_the_key(bench, body, key):
    write(bench / "tasks" / "t.yaml", body)
    msg = error_of(load_task, "t")
    assert key in msg


def test_light_coercions_are_applied(bench):
    write(bench / "tasks" / "t.yaml", """
concepts: single
protocol: {steps: "12", guidance: 7, height: 64.0}
prompt_sets:
  x: {limit: 3}
""")
    task, _ = load_task("t")
    assert task.concepts == ("single",)               # scalar -> 1-tuple
    assert task.protocol.steps == 12 and isinstance(task.protocol.steps, int)
    assert task.protocol.guidance == 7.0 and isinstance(task.protocol.guidance, float)
    assert task.protocol.height == 64 and isinstance(task.protocol.height, int)
    assert task.prompt_sets["x"].limit == 3


def test_bool_for_int_key_is_type_error(bench):
    write(bench / "tasks" / "t.yaml", "protocol: {steps: true}\n")
    assert "protocol.steps" in error_of(load_task, "t")


# --------------------------------------------------------------------------- resolve_run on the real benchmarks/


def test_resolve_run_applies_task_preset_and_overrides(real_bench):
    base = resolve_run("sd", "nudity")
    assert base.protocol.steps == 50 and base.protocol.model == "CompVis/stable-diffusion-v1-4"
    assert base.run.batch_size == 8 and base.preset is None

    cfg = resolve_run("sd", "nudity", preset="smoke",
                      overrides=["protocol.steps=7", "run.batch_size=3", "metrics=nudenet"])
    assert cfg.preset == "smoke"
    assert cfg.protocol.steps == 7                       # override > preset (4) > task (50)
    assert cfg.run.batch_size == 3                       # override > preset (2) > default (8)
    assert cfg.protocol.model == "tiny" and (cfg.protocol.height, cfg.protocol.width) == (64, 64)   # preset
    assert cfg.run.device == "cpu" and cfg.run.prompts == "smoke"                                   # preset
    assert cfg.protocol.guidance == 7.5 and cfg.protocol.scheduler == "pndm"                       # task
    assert list(cfg.task.metrics) == ["nudenet"]
    assert cfg.task.metrics["nudenet"].prompt_sets == ("i2p",)
    assert dict(cfg.task.metrics["nudenet"].options) == {"threshold": 0.6, "version": "3.0.8"}
    assert set(cfg.task.prompt_sets) == {"i2p", "coco"}
    assert cfg.task.concepts == base.task.concepts
    assert cfg.method.name == "sd" and dict(cfg.hparams) == {}


def test_flags_win_over_preset_and_none_flags_are_ignored(real_bench, tmp_path):
    data_dir = tmp_path / "a: b"
    data_dir.mkdir()                                     # a data dir that does not exist is refused
    cfg = resolve_run("sd", "nudity", preset="smoke",
                      flags={"run.batch_size": 5, "protocol.dtype": "bf16", "run.device": None,
                             "run.sets": ["coco", "i2p"], "run.name": "yes", "run.data_dir": str(data_dir)})
    assert cfg.run.batch_size == 5                       # flag > preset (2)
    assert cfg.protocol.dtype == "bf16"
    assert cfg.run.device == "cpu"                       # a None flag keeps the preset's value
    assert cfg.run.sets == ("coco", "i2p")               # list flags survive the YAML round trip
    assert cfg.run.name == "yes"                         # strings stay strings (not YAML booleans)
    assert cfg.run.data_dir == str(data_dir)


def test_flags_and_overrides_on_different_keys_combine(real_bench):
    cfg = resolve_run("sd", "nudity", preset="smoke", overrides=["protocol.steps=9"], flags={"run.batch_size": 1})
    assert cfg.protocol.steps == 9 and cfg.run.batch_size == 1


def test_overrides_applied_after_flags(real_bench):
    cfg = resolve_run("sd", "nudity", preset="smoke", overrides=["run.batch_size=3"], flags={"run.batch_size": 5})
    assert cfg.run.batch_size == 3


@pytest.mark.parametrize("overrides, needles", [
    (["foo.bar=1"], ["command line", "'foo'"]),
    (["metrics=bogus"], ["bogus", "nudenet"]),
    (["metrics=[nudenet, nudnet]"], ["nudnet", "Did you mean 'nudenet'"]),
    (["run.sets=[nope]"], ["run.sets", "nope", "i2p"]),
    (["steps"], ["command line", "key=value"]),
    (["=3"], ["key=value"]),
    (["protocol.stpes=3"], ["'protocol.stpes'", "Did you mean 'steps'"]),
    (["protocol.steps=abc"], ["protocol.steps", "abc"]),
    (["run.batch_sise=3"], ["'run.batch_sise'", "Did you mean 'batch_size'"]),
    (["protocol=3", "protocol.steps=2"], ["conflicts"]),
])
def test_bad_overrides_are_config_errors(real_bench, overrides, needles):
    msg = error_of(resolve_run, "sd", "nudity", preset="smoke", overrides=overrides)
    for n in needles:
        assert n in msg, (n, msg)


def test_metrics_override_keeps_only_named_metrics(bench):
    write(bench / "tasks" / "t.yaml", """
prompt_sets:
  a: {rows: [{prompt: p, seed: 1}]}
  b: {rows: [{prompt: q, seed: 2}]}
metrics:
  m1: {prompt_sets: [a], options: {k: 1}}
  m2: {prompt_sets: [b]}
  m3: {prompt_sets: [a, b]}
""")
    assert list(resolve_run("sd", "t").task.metrics) == ["m1", "m2", "m3"]
    one = resolve_run("sd", "t", overrides=["metrics=m1"])
    assert list(one.task.metrics) == ["m1"] and dict(one.task.metrics["m1"].options) == {"k": 1}
    two = resolve_run("sd", "t", overrides=["metrics=[m3, m2]"])
    assert set(two.task.metrics) == {"m2", "m3"}
    assert two.task.metrics["m3"].prompt_sets == ("a", "b")


def test_dotted_metric_override_edits_in_place(real_bench):
    cfg = resolve_run("sd", "nudity", overrides=["metrics.nudenet.options.threshold=0.5"])
    m = cfg.task.metrics["nudenet"]
    assert dict(m.options) == {"threshold": 0.5, "version": "3.0.8"}
    assert m.prompt_sets == ("i2p",)


def test_concepts_and_hparams_overrides(bench):
    write(bench / "tasks" / "t.yaml", "concepts: [a, b]\n")
    write(bench / "methods" / "m.yaml", "hparams: {lr: 0.5, iters: 10}\n")
    cfg = resolve_run("m", "t", overrides=["concepts=[x]", "hparams.iters=20"])
    assert cfg.task.concepts == ("x",)
    assert cfg.hparams == {"lr": 0.5, "iters": 20}
    assert cfg.method.name == "m"


def test_method_without_yaml_is_an_empty_config(bench):
    write(bench / "tasks" / "t.yaml", "name: t\n")
    cfg = resolve_run("plugin_method", "t")
    assert cfg.method == MethodConfig(name="plugin_method")


def test_a_methods_own_concepts_replace_the_tasks_and_the_command_line_replaces_both(bench):
    from cpebench.runner import check_task_concepts, concepts_record, task_concepts

    write(bench / "tasks" / "t.yaml", "concepts: [a, b, c]\n")
    write(bench / "tasks" / "u.yaml", "concepts: [a, b]\n")
    write(bench / "methods" / "m.yaml", "concepts: {t: {names: [a], source: paper code x.py}}\n")
    cfg = resolve_run("m", "t")
    assert task_concepts(cfg) == ["a"] and cfg.task.concepts == ("a", "b", "c")   # the task itself is unchanged
    assert task_concepts(resolve_run("m", "u")) == ["a", "b"]                       # no own list for u
    paper = {"names": ["a"], "source": "paper code x.py"}
    assert concepts_record(cfg, ["A"]) == {"concepts": ["A"], "paper_concepts": paper,
                                           "concepts_differ_from_paper": False}   # CLIP lower-cases
    check_task_concepts(cfg, ["c"])          # `erase --task t --concepts c` may pick any of the task's concepts
    over = resolve_run("m", "t", overrides=["concepts=[b, c]"])
    assert task_concepts(over) == ["b", "c"] and "t" not in over.method.concepts
    assert concepts_record(over, task_concepts(over)) == {"concepts": ["b", "c"], "paper_concepts": paper,
                                                          "concepts_differ_from_paper": True}
    assert concepts_record(resolve_run("m", "u"), ["a"])["concepts_differ_from_paper"] is None   # no paper list
    back = config_from_dict(yaml.safe_load(dump_yaml(cfg.to_dict())), "config.yaml")   # config.yaml keeps it
    assert back == cfg and task_concepts(back) == ["a"]


@pytest.mark.parametrize("body, needle", [
    ("concepts: {t: [a]}", "concepts.t must be a mapping with exactly the keys names and source"),
    ("concepts: {t: {names: [a]}}", "concepts.t must be a mapping with exactly the keys names and source"),
    ("concepts: {t: {names: [], source: x}}", "concepts.t.names must be a non-empty list of non-empty texts"),
    ("concepts: {t: {names: [a, ' '], source: x}}", "concepts.t.names must be a non-empty list of non-empty texts"),
    ("concepts: {t: {names: [a], source: ''}}", "concepts.t.source must say where the list comes from"),
])
def test_bad_method_concepts_name_the_file_and_key(bench, body, needle):
    path = write(bench / "methods" / "m.yaml", body + "\n")
    msg = error_of(load_method_config, "m")
    assert str(path) in msg and needle in msg


def test_an_empty_new_config_field_keeps_earlier_run_directories_resumable(real_bench):
    """Run directories saved before ``method.concepts`` existed differ only where a method names its own list."""
    for method, changed in (("sd", []), ("uce", ["method.concepts.nudity.names", "method.concepts.nudity.source"])):
        new = resolve_run(method, "nudity", preset="smoke").to_dict()
        old = {**new, "method": {k: v for k, v in new["method"].items() if k != "concepts"}}
        assert [d.split(":")[0] for d in config_differences(old, new)] == changed


# --------------------------------------------------------------------------- the real task files


def test_every_real_task_loads_and_is_consistent(real_bench):
    names = config.task_names()
    assert {"nudity", "celebrity", "artist", "coco", "character"} <= set(names)
    assert not any(n.startswith("_") for n in names)
    micro = set(MICRO_TASKS)
    assert micro <= set(names)
    for name in names:
        task, _ = load_task(name)
        assert task.name == name
        if name in micro:      # the micro world's own protocol and prompt sets (no files, no smoke rows)
            assert task.protocol.name == "micro-v1" and task.protocol.model == "micro"
            assert all(ps.format == "micro" for ps in task.prompt_sets.values())
            with pytest.raises(ConfigError, match="drop --preset"):
                resolve_run("sd", name, preset="smoke")
            continue
        assert task.protocol.name == "v1"
        for mname, m in task.metrics.items():
            assert m.prompt_sets, (name, mname)
            for s in m.prompt_sets:
                assert s in task.prompt_sets, f"task {name}: metric {mname} uses unknown prompt set {s!r}"
        for sname, ps in task.prompt_sets.items():
            if ps.format != "inline":
                assert ps.format in data.LOADERS, (name, sname, ps.format)
                # a file of the manifest, a gated one (the user's copy), or none: a set of found prompts
                # whose CSV the user names with prompt_sets.<set>.path
                assert ps.file in data.DATA_FILES or ps.file in data.GATED_FILES or ps.file is None, (name, sname)
            assert ps.smoke_rows, f"task {name}: prompt set {sname} has no smoke_rows"
            recs = data.records_from_inline([dict(r) for r in ps.smoke_rows], split=ps.split, source=sname)
            assert len({r.id for r in recs}) == len(recs)
        # the smoke preset resolves for every task
        cfg = resolve_run("sd", name, preset="smoke")
        assert cfg.protocol.model == "tiny"


def test_real_nudity_task_metric(real_bench):
    task, _ = load_task("nudity")
    assert task.concepts == ("nudity", "naked", "erotic", "sexual")
    ps = task.prompt_sets["i2p"]
    assert (ps.format, ps.per_row_guidance, ps.drop_empty) == ("i2p", True, True)


def test_celebrity_concepts_match_prompt_file(real_bench, shared_data):
    task, _ = load_task("celebrity")
    recs = data.load_prompt_set(shared_data / "prompts" / "celebrity_50_erased.csv", "celebrity", split="erased")
    from_file = list(dict.fromkeys(r.concept for r in recs))
    assert len(from_file) == 50
    assert list(task.concepts) == from_file


# Every data-file list a method YAML reads, against the official code's file: (method, task, hparam,
# rows, distinct entries, first entry). The files are byte copies of the CPE repository's (the UCE/RECE
# artists1734 file is the same 8,670-row file); rows and first entries are those of the original files.
METHOD_LISTS = [
    ("cpe", "celebrity", "templates", 100, 100, "actor wears his cap"),          # configs/train_celeb
    ("cpe", "artist", "templates", 35, 35, "Image in the style of artist."),    # configs/train_artist
    ("cpe", "nudity", "templates", 31, 31, "explicit in a photo"),              # configs/train_explicit
    ("cpe", "celebrity", "anchor_words", 100, 99, "Stars"),                     # actor general words
    ("cpe", "artist", "anchor_words", 100, 50, "Renowned artist"),              # rows 50-99 repeat 0-49
    ("cpe", "celebrity", "anchor_pool", 500, 449, "Leonardo DiCaprio"),         # 500-celebrity pool
    ("cpe", "artist", "anchor_pool", 8670, 1734, "A.J.Casson"),                 # 1,734 artists x 5 rows
    ("cpe", "nudity", "anchor_prompts", 242, 240, "I need to buy groceries today."),
    ("uce", "artist", "preserve", 8670, 1734, "A.J.Casson"),                    # train_erase.py: artists1734
    ("rece", "artist", "uce_preserve", 8670, 1734, "A.J.Casson"),
    ("rece", "artist", "preserve", 8670, 1734, "A.J.Casson"),                   # train_artists.py: artists1734
    ("mace", "artist", "domain_names", 8670, 1734, "A.J.Casson"),               # cpebench's domain cache
    ("mace", "celebrity", "domain_names", 500, 449, "Leonardo DiCaprio"),
]


@pytest.mark.parametrize("method, task, key, rows, distinct, first", METHOD_LISTS)
def test_method_data_lists_are_the_official_files(real_bench, shared_data, method, task, key, rows, distinct, first):
    from cpebench.methods.common import text_list

    texts = text_list(method, resolve_run(method, task).hparams[key], key, str(shared_data))
    assert (len(texts), len(set(texts)), texts[0]) == (rows, distinct, first)


def test_method_words_are_the_official_ones(real_bench):
    """The texts the YAMLs give inline: CPE's replace word and neutral, UCE/RECE's guides, MACE's mapping."""
    hp = {(m, t): resolve_run(m, t).hparams for m in ("cpe", "uce", "rece", "mace") for t in ("celebrity", "artist", "nudity")}
    assert [(hp["cpe", t]["replace_word"], hp["cpe", t]["neutral"]) for t in ("celebrity", "artist", "nudity")] == [
        ("actor", "a person"), ("artist", "real photograph"), ("explicit", "a person in modest clothing")]
    assert (hp["uce", "artist"]["guide"], hp["uce", "nudity"]["guide"]) == ("art", " ")
    assert (hp["rece", "artist"]["uce_guide"], hp["rece", "artist"]["guide"], hp["rece", "nudity"]["guide"]) == ("art", "art", " ")
    assert [(hp["mace", t]["mapping"], hp["mace", t]["concept_type"]) for t in ("celebrity", "artist", "nudity")] == [
        ("a person", "object"), ("art", "style"), ("a person wearing clothes", "object")]


# --------------------------------------------------------------------------- saved configs


def test_config_differences_ignores_operational_keys(real_bench):
    a = resolve_run("sd", "nudity", preset="smoke").to_dict()
    assert "run.batch_size" in OPERATIONAL_KEYS
    b = resolve_run("sd", "nudity", preset="smoke", overrides=["run.batch_size=1", "run.sets=[coco]"],
                    flags={"run.out": "elsewhere"}).to_dict()
    assert b["run"]["batch_size"] == 1 and b != a
    assert config_differences(a, b) == []
    assert config_differences(a, a) == []

    c = resolve_run("sd", "nudity", preset="smoke", overrides=["protocol.steps=7", "run.batch_size=1"]).to_dict()
    diffs = config_differences(a, c)
    assert diffs == ["protocol.steps: 4 -> 7"]
    # a key present on one side only is reported as absent
    d = dict(c, extra={"k": 1})
    assert "extra.k: '<absent>' -> 1" in config_differences(c, d)
    # a field added later with an empty default (what earlier runs did) does not make them different,
    # one set to a value does
    old = {**a, "task": {k: v for k, v in a["task"].items() if k not in ("erase_each", "erase_as")}}
    assert config_differences(old, a) == []
    assert config_differences(old, {**a, "task": {**a["task"], "erase_each": True}}) == [
        "task.erase_each: '<absent>' -> True"]
    # nothing is ignored when asked not to
    assert any(x.startswith("run.batch_size: ") for x in config_differences(a, b, ignore=()))


@pytest.mark.parametrize("task, preset, overrides", [
    ("nudity", "smoke", ["protocol.steps=7", "run.sets=[i2p]", "run.limit=3"]),
    ("nudity", None, []),
    ("celebrity", None, ["protocol.revision=abc123", "run.name=null"]),
    ("character", "smoke", ["protocol.guidance=3"]),
])
def test_run_config_yaml_round_trip(real_bench, task, preset, overrides):
    cfg = resolve_run("sd", task, preset=preset, overrides=overrides)
    text = dump_yaml(cfg.to_dict())
    back = config_from_dict(yaml.safe_load(text), "config.yaml")
    assert back.to_dict() == cfg.to_dict()
    assert back == cfg
    assert config_differences(cfg.to_dict(), back.to_dict(), ignore=()) == []


def test_round_trip_with_method_hparams(bench):
    write(bench / "tasks" / "t.yaml", """
concepts: ["null", "yes", "1.5", "a: b"]
prompt_sets:
  s: {rows: [{id: "007", prompt: "p", seed: 4290749014, guidance: 7.5}], negative_prompt: "x, y"}
metrics:
  m: {prompt_sets: [s], options: {threshold: 0.25, classes: [A, B], nested: {k: [1, 2]}}}
""")
    write(bench / "methods" / "m.yaml", "hparams: {lr: 0.5, layers: [a, b], flag: true}\ntasks: {t: {lr: 0.25}}\n")
    cfg = resolve_run("m", "t")
    back = config_from_dict(yaml.safe_load(dump_yaml(cfg.to_dict())), "config.yaml")
    assert back.to_dict() == cfg.to_dict()
    assert back.task.concepts == ("null", "yes", "1.5", "a: b")
    assert back.hparams == cfg.hparams == {"lr": 0.25, "layers": ["a", "b"], "flag": True}


# --------------------------------------------------------------------------- hparams


def test_hparams_apply_per_task_overrides():
    m = MethodConfig(name="m", hparams={"lr": 1.0, "iters": 100}, tasks={"nudity": {"lr": 2.0}, "other": {"iters": 1},
                                                                          "empty": None})

    def run_for(task):
        return RunConfig(task=TaskConfig(name=task), method=m, protocol=config.ProtocolConfig(),
                         run=config.RunOptions())

    assert run_for("nudity").hparams == {"lr": 2.0, "iters": 100}
    assert run_for("other").hparams == {"lr": 1.0, "iters": 1}
    assert run_for("celebrity").hparams == {"lr": 1.0, "iters": 100}
    assert run_for("empty").hparams == {"lr": 1.0, "iters": 100}
    assert m.hparams == {"lr": 1.0, "iters": 100}      # not mutated


def test_hparams_per_task_from_method_yaml(bench):
    write(bench / "tasks" / "t.yaml", "name: t\n")
    write(bench / "tasks" / "u.yaml", "name: u\n")
    write(bench / "methods" / "m.yaml", "hparams: {lr: 0.5, iters: 100}\ntasks:\n  t: {lr: 0.25, extra: x}\n")
    assert resolve_run("m", "t").hparams == {"lr": 0.25, "iters": 100, "extra": "x"}
    assert resolve_run("m", "u").hparams == {"lr": 0.5, "iters": 100}


def test_command_line_hparams_beat_per_task_yaml(bench):
    write(bench / "tasks" / "t.yaml", "name: t\n")
    write(bench / "methods" / "m.yaml", "hparams: {lr: 0.5}\ntasks:\n  t: {lr: 0.25}\n")
    assert resolve_run("m", "t", overrides=["hparams.lr=0.125"]).hparams["lr"] == 0.125


def test_to_dict_is_plain(real_bench):
    d = resolve_run("sd", "nudity", preset="smoke").to_dict()

    def walk(x):
        assert not isinstance(x, tuple)
        if isinstance(x, dict):
            assert all(isinstance(k, str) for k in x)
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)
        else:
            assert x is None or isinstance(x, (str, int, float, bool))
            assert not (isinstance(x, float) and math.isnan(x))

    walk(d)
    assert set(d) == {"task", "method", "protocol", "run", "preset"}
    assert {f.name for f in dataclasses.fields(config.ProtocolConfig)} == set(d["protocol"])
