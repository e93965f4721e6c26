"""Methods: the Artifact format (bit-exact, atomic, checked), the cache fingerprint, the ``sd`` method."""

from __future__ import annotations

import json

import pytest

from cpebench.errors import ConfigError
import torch

from cpebench.errors import CpebenchError
from cpebench.methods import META_FILE, WEIGHTS_FILE, Artifact, Concept, Method, artifact_fingerprint
from cpebench.methods.sd import BaseModel
from cpebench.registry import METHODS


def make_artifact(dtype=torch.float32) -> Artifact:
    g = torch.Generator().manual_seed(0)
    t = {
        "down.attn2.to_k.weight": torch.randn(8, 5, generator=g).to(dtype),
        "down.attn2.to_v.weight": (torch.randn(5, 8, generator=g) * 1e-3).to(dtype).t(),   # non-contiguous
        "scalar": torch.tensor(3.25, dtype=dtype),
        "special": torch.tensor([float("inf"), -float("inf"), -0.0, 1e-30, 65504.0], dtype=torch.float32).to(dtype),
    }
    return Artifact(method="esd", tensors=t,
                    metadata={"concepts": ["nudity", "Anne Hathaway"], "hparams": {"lr": 1e-5, "iters": 3},
                              "base_model": "tiny", "nested": {"a": [1, 2, None]}})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_artifact_round_trip_is_bit_exact(tmp_path, dtype):
    a = make_artifact(dtype)
    out = a.save(tmp_path / "art")
    assert out == tmp_path / "art"
    assert (out / WEIGHTS_FILE).is_file() and (out / META_FILE).is_file()
    b = Artifact.load(out)
    assert b.method == "esd"
    assert set(b.tensors) == set(a.tensors)
    for k, t in a.tensors.items():
        u = b.tensors[k]
        assert u.dtype == t.dtype == dtype and u.shape == t.shape
        assert torch.equal(u, t)
        # bit-exact, including -0.0 and infinities (torch.equal treats -0.0 == 0.0)
        assert torch.equal(u.contiguous().view(-1).view(torch.uint8), t.contiguous().view(-1).view(torch.uint8))
    for k, v in a.metadata.items():
        assert b.metadata[k] == v
    meta = json.loads((out / META_FILE).read_text())
    assert meta["method"] == "esd" and len(meta["weights_sha256"]) == 64


def test_sha256_is_a_content_hash():
    a, b = make_artifact(), make_artifact()
    assert a.sha256 == b.sha256 and len(a.sha256) == 64
    b.tensors["scalar"] = torch.tensor(3.5)
    assert b.sha256 != a.sha256
    c = make_artifact()
    c.metadata["concepts"] = ["nudity"]
    assert c.sha256 != a.sha256
    d = make_artifact()
    d.tensors["scalar"] = d.tensors["scalar"].to(torch.float64)   # same value, other dtype
    assert d.sha256 != a.sha256
    assert make_artifact(torch.float16).sha256 != a.sha256


def test_sha256_hashes_what_defines_the_erased_model_only():
    """A retrain with the same bits has another date, timings and code version: same hash."""
    a, b = make_artifact(), make_artifact()
    b.metadata.update(created="2030-01-01T00:00:00+00:00", seconds=12.5, code_version="0.2.0+g123",
                      stage_seconds={"stage1": 1.0}, operational_hparams={"concept_batch": 4}, fingerprint="f" * 16)
    assert b.sha256 == a.sha256
    for key, value in [("hparams", {"lr": 2e-5, "iters": 3}), ("base_model", "other"), ("method_version", "2"),
                       ("precision", {"dtype": "fp16"}), ("base_revision", "abc")]:
        c = make_artifact()
        c.metadata[key] = value
        assert c.sha256 != a.sha256, key


def test_sha256_is_stable_across_loads(tmp_path):
    a = make_artifact(torch.bfloat16)
    a.save(tmp_path / "art")
    assert Artifact.load(tmp_path / "art").sha256 == Artifact.load(tmp_path / "art").sha256


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sha256_identical_after_save_load(tmp_path, dtype):
    a = make_artifact(dtype)
    before = a.sha256
    b = Artifact.load(a.save(tmp_path / "art"))
    assert a.sha256 == before
    assert b.sha256 == before
    assert b.metadata == a.metadata


def test_save_is_atomic_and_replaces(tmp_path):
    parent = tmp_path / "cache" / "artifacts" / "esd"
    a = make_artifact()
    a.save(parent / "k1")
    assert sorted(p.name for p in parent.iterdir()) == ["k1"]          # no temp dirs left behind
    assert sorted(p.name for p in (parent / "k1").iterdir()) == sorted([META_FILE, WEIGHTS_FILE])

    (parent / "k1" / "stale.txt").write_text("left over from an older artifact")
    b = Artifact(method="esd", tensors={"only": torch.ones(2, dtype=torch.float16)}, metadata={"concepts": ["x"]})
    b.save(parent / "k1")
    assert sorted(p.name for p in parent.iterdir()) == ["k1"]
    assert not (parent / "k1" / "stale.txt").exists()
    loaded = Artifact.load(parent / "k1")
    assert list(loaded.tensors) == ["only"] and torch.equal(loaded.tensors["only"], torch.ones(2, dtype=torch.float16))
    assert loaded.metadata["concepts"] == ["x"]


def test_empty_artifact_round_trip(tmp_path):
    a = Artifact(method="sd", metadata={"concepts": []})
    b = Artifact.load(a.save(tmp_path / "a"))
    assert b.method == "sd" and b.tensors == {} and b.metadata["concepts"] == []


def test_corrupt_weights_are_detected(tmp_path):
    d = make_artifact().save(tmp_path / "art")
    w = d / WEIGHTS_FILE
    raw = bytearray(w.read_bytes())
    raw[-1] ^= 0x01                                     # one bit of tensor data
    w.write_bytes(bytes(raw))
    with pytest.raises(CpebenchError, match="sha256"):
        Artifact.load(d)


def test_edited_metadata_hash_is_detected(tmp_path):
    d = make_artifact().save(tmp_path / "art")
    meta = json.loads((d / META_FILE).read_text())
    meta["weights_sha256"] = "0" * 64
    (d / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(CpebenchError, match="sha256"):
        Artifact.load(d)


@pytest.mark.parametrize("missing", [META_FILE, WEIGHTS_FILE])
def test_incomplete_dir_is_not_an_artifact(tmp_path, missing):
    d = make_artifact().save(tmp_path / "art")
    (d / missing).unlink()
    with pytest.raises(CpebenchError) as e:
        Artifact.load(d)
    assert META_FILE in str(e.value) and str(d) in str(e.value)


def test_nonexistent_dir_is_not_an_artifact(tmp_path):
    with pytest.raises(CpebenchError, match="not a cpebench artifact"):
        Artifact.load(tmp_path / "nothing")


# --------------------------------------------------------------------------- fingerprint

BASE = dict(method="esd", method_version="1", concepts=[Concept("nudity"), Concept("naked")],
            hparams={"lr": 1e-5, "iters": 1000}, base_model="CompVis/stable-diffusion-v1-4",
            base_revision="abc123", code_version="0.1.0")


def fp(**changes):
    return artifact_fingerprint(**{**BASE, **changes})


def test_fingerprint_is_stable():
    ref = fp()
    assert len(ref) == 16 and all(c in "0123456789abcdef" for c in ref)
    assert fp() == ref
    assert fp(hparams={"iters": 1000, "lr": 1e-5}) == ref                         # dict order does not matter
    assert fp(concepts=[Concept("nudity", {"note": 1}), Concept("naked")]) == ref  # extras are not the concept


@pytest.mark.parametrize("change", [
    {"concepts": [Concept("nudity")]},
    {"concepts": [Concept("nudity"), Concept("Naked")]},
    {"concepts": [Concept("naked"), Concept("nudity")]},
    {"hparams": {"lr": 2e-5, "iters": 1000}},
    {"hparams": {"lr": 1e-5, "iters": 1000, "extra": None}},
    {"base_revision": "def456"},
    {"base_revision": None},
    {"code_version": "0.1.1"},
    {"method_version": "2"},
    {"method": "uce"},
    {"base_model": "tiny"},
    {"precision": {"dtype": "fp16", "vae_dtype": "fp16", "tf32": False}},
])
def test_fingerprint_changes(change):
    assert fp(**change) != fp()


def test_fingerprint_precision_of_fp32_bf16_and_tf32_differ():
    p32 = {"dtype": "fp32", "vae_dtype": "fp32", "tf32": False}
    keys = {fp(precision=p) for p in (p32, {**p32, "dtype": "bf16"}, {**p32, "vae_dtype": "fp16"}, {**p32, "tf32": True})}
    assert len(keys) == 4


def _every_method_and_task():
    from cpebench.config import load_method_config

    for name in METHODS.names():
        tasks = list(load_method_config(name).tasks)
        for task in tasks or [None]:
            yield name, task


@pytest.mark.parametrize("name,task", list(_every_method_and_task()))
def test_parsed_hparams_parse_to_themselves(name, task):
    """The cache key hashes parsed values; parsing them again must change nothing, and the textual
    forms of one number (1e-5 from the command line, 1.0e-5 from YAML) must parse alike."""
    from cpebench.config import load_method_config

    mc = load_method_config(name)
    raw = {**mc.hparams, **(mc.tasks.get(task) or {})}
    method = METHODS.get(name)()
    parsed = method.parse_hparams(raw)
    assert method.parse_hparams(parsed) == parsed
    assert json.loads(json.dumps(parsed)) == parsed          # what the artifact metadata stores
    floats = {k: v for k, v in parsed.items() if isinstance(v, float)}
    if floats:
        as_text = {k: f"{v:e}" for k, v in floats.items()}    # e.g. '1.000000e-05': YAML gives such strings
        assert method.parse_hparams({**raw, **as_text}) == parsed


# --------------------------------------------------------------------------- the sd method


def test_sd_is_registered_and_free():
    cls = METHODS.get("sd")
    assert cls is BaseModel and issubclass(cls, Method)
    assert cls.trains is False and cls.name == "sd"


def test_sd_erase_returns_empty_artifact(tiny):
    art = BaseModel().erase(tiny.pipe, [Concept("nudity"), Concept("naked")])
    assert isinstance(art, Artifact) and art.method == "sd"
    assert art.tensors == {}
    assert art.metadata["concepts"] == ["nudity", "naked"]
    assert art.metadata["hparams"] == {}
    assert art.sha256 == BaseModel().erase(tiny.pipe, [Concept("nudity"), Concept("naked")]).sha256


def test_sd_rejects_hparams(tiny):
    with pytest.raises(ConfigError, match="lr"):
        BaseModel().erase(tiny.pipe, [Concept("nudity")], {"lr": 1e-5})


def _unet_out(pipe):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ctx = torch.randn(2, 77, pipe.unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        return [pipe.unet(x, t, encoder_hidden_states=ctx).sample for t in (999, 500, 1)]


def test_sd_apply_leaves_unet_bit_identical(tiny):
    pipe = tiny.pipe
    method = BaseModel()
    art = method.erase(pipe, [Concept("nudity")])
    state_before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    procs_before = dict(pipe.unet.attn_processors)
    before = _unet_out(pipe)
    assert not torch.equal(before[0], before[1])   # the outputs depend on the inputs (a real check)
    with method.apply(pipe, art):
        inside = _unet_out(pipe)
    after = _unet_out(pipe)
    for a, b, c in zip(before, inside, after):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert pipe.unet.attn_processors == procs_before
    for k, v in pipe.unet.state_dict().items():
        assert torch.equal(v, state_before[k])


def test_no_method_imports_another():
    """Methods share cpebench.methods (the interface), .common and .closed_form, never each other's files."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    shared = {"__init__", "common", "closed_form"}
    methods = {p.stem: p for p in (root / "baselines").glob("*.py") if p.stem != "__init__"}
    methods |= {p.stem: p for p in (root / "cpebench" / "methods").glob("*.py") if p.stem not in shared}
    assert {"uce", "rece", "mace", "esd", "cpe", "sd"} <= set(methods)
    found = []
    for name, path in methods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                parts = [*(node.module or "").split("."), *(a.name for a in node.names)]
            elif isinstance(node, ast.Import):
                parts = [p for a in node.names for p in a.name.split(".")]
            else:
                continue
            hits = [p for p in parts if p in methods and p != name]
            if hits:
                found.append(f"{path.relative_to(root)}:{node.lineno} imports {hits}")
    assert not found, found
