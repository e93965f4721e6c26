"""Registries: built-ins, entry points, register(), clear errors for unknown or broken names."""

from __future__ import annotations

import collections
import importlib.metadata

import pytest

from cpebench import registry
from cpebench.config import load_preset, load_task
from cpebench.errors import ConfigError, CpebenchError, RegistryError
from cpebench.methods import Method
from cpebench.metrics import Metric
from cpebench.registry import METHODS, METRICS, Registry, did_you_mean


def test_builtin_names_and_classes():
    assert "sd" in METHODS.names()
    assert "nudenet" in METRICS.names()
    sd = METHODS.get("sd")
    assert isinstance(sd, type) and issubclass(sd, Method) and sd.name == "sd"
    nn = METRICS.get("nudenet")
    assert isinstance(nn, type) and issubclass(nn, Metric) and nn.name == "nudenet"
    assert METHODS.get("sd") is sd  # resolved once, cached


def test_installed_entry_points_name_the_builtins():
    eps = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="cpebench.methods")}
    assert eps.get("sd") == "cpebench.methods.sd:BaseModel"
    eps = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="cpebench.metrics")}
    assert eps.get("nudenet") == "cpebench.metrics.nudenet:NudeNet"


@pytest.mark.parametrize("reg, name, known, hint", [
    (METRICS, "nudnet", "nudenet", "nudenet"),
    (METHODS, "sdd", "sd", "sd"),
    (METHODS, "zzzzzzzz", "sd", None),
])
def test_unknown_name_lists_known_and_suggests(reg, name, known, hint):
    with pytest.raises(RegistryError) as e:
        reg.get(name)
    msg = str(e.value)
    assert repr(name) in msg and "Known:" in msg and known in msg
    if hint:
        assert f"Did you mean {hint!r}?" in msg
    else:
        assert "Did you mean" not in msg
    assert isinstance(e.value, CpebenchError)


def test_did_you_mean_format():
    assert did_you_mean("nudnet", ["nudenet", "clip"]) == " Known: clip, nudenet. Did you mean 'nudenet'?"
    assert did_you_mean("x", []) == " Known: (none)."


@pytest.mark.parametrize("target, needle", [
    ("no_such_module_cpebench_xyz:Thing", "no_such_module_cpebench_xyz"),
    ("collections:NoSuchClass", "NoSuchClass"),
    ("collections:OrderedDict.nope", "nope"),
])
def test_unimportable_target_is_registry_error(target, needle):
    r = Registry("method", "cpebench.tests.no-such-group", {"broken": target})
    assert r.names() == ["broken"]
    with pytest.raises(RegistryError) as e:
        r.get("broken")
    msg = str(e.value)
    assert "'broken'" in msg and repr(target) in msg and needle in msg


def test_register_decorator_on_private_registry():
    r = Registry("method", "cpebench.tests.no-such-group")
    assert r.names() == []

    @r.register()
    class Foo:
        name = "foo"

    @r.register("alias")
    class Bar:
        name = "bar"

    assert isinstance(Foo, type) and Foo.name == "foo"   # the decorator returns the class unchanged
    assert r.names() == ["alias", "foo"]
    assert r.get("foo") is Foo and r.get("alias") is Bar
    with pytest.raises(RegistryError, match="Did you mean 'foo'"):
        r.get("fooo")
    # the module-level registries are not touched
    assert "foo" not in METHODS.names() and "alias" not in METHODS.names()


def _fake_entry_points(eps, calls):
    def entry_points(**kw):
        calls.append(kw)
        group = kw.get("group")
        return [ep for ep in eps if ep.group == group]
    return entry_points


def test_third_party_entry_point_is_discovered(monkeypatch):
    calls: list = []
    eps = [
        importlib.metadata.EntryPoint(name="fake", value="collections:OrderedDict", group="cpebench.methods"),
        importlib.metadata.EntryPoint(name="other", value="collections:Counter", group="cpebench.metrics"),
    ]
    monkeypatch.setattr(importlib.metadata, "entry_points", _fake_entry_points(eps, calls))
    assert registry.metadata.entry_points is importlib.metadata.entry_points   # the patch is the one registry uses

    r = Registry("method", "cpebench.methods")
    assert r.names() == ["fake"]                       # only its own group
    assert r.get("fake") is collections.OrderedDict
    assert calls == [{"group": "cpebench.methods"}]    # entry points are read once
    r.names()
    assert len(calls) == 1


def test_broken_entry_point_is_registry_error(monkeypatch):
    eps = [importlib.metadata.EntryPoint(name="plug", value="cpebench_missing_plugin:Method", group="cpebench.methods")]
    monkeypatch.setattr(importlib.metadata, "entry_points", _fake_entry_points(eps, []))
    r = Registry("method", "cpebench.methods", {"sd": "cpebench.methods.sd:BaseModel"})
    assert r.names() == ["plug", "sd"]
    with pytest.raises(RegistryError, match="cpebench_missing_plugin:Method"):
        r.get("plug")
    assert r.get("sd").name == "sd"


@pytest.fixture
def real_bench(monkeypatch):
    monkeypatch.delenv("CPEBENCH_BENCHMARKS", raising=False)


def test_unknown_task_and_preset_suggest(real_bench):
    with pytest.raises(ConfigError) as e:
        load_task("nudty")
    msg = str(e.value)
    assert "Unknown task 'nudty'" in msg and "Did you mean 'nudity'?" in msg and "celebrity" in msg
    assert "_protocol_v1" not in msg                   # fragments are not offered as tasks
    with pytest.raises(ConfigError) as e:
        load_preset("smok")
    assert "Unknown preset 'smok'" in str(e.value) and "Did you mean 'smoke'?" in str(e.value)
