"""Engine: per-row determinism, per-row knobs, NaN handling, resumability, sharding."""

import os
import json

import numpy as np
import pytest
import torch
from PIL import Image

from cpebench.attention import KVEdit
from cpebench.config import ProtocolConfig
from cpebench.data import PromptRecord
from cpebench.engine import (Engine, WorkItem, initial_noise, merge_manifests, plan_items, read_jsonl, read_manifest)
from cpebench.errors import ConfigError

PROTO = ProtocolConfig(model="tiny", steps=3, height=64, width=64)


def rec(i, seed=None, prompt=None, guidance=None):
    return PromptRecord(id=str(i), prompt=prompt or f"a photo number {i}", seed=seed if seed is not None else 1000 + i,
                        guidance=guidance, split="test", concept=None)


def items(n, **kw):
    return plan_items("s", [rec(i) for i in range(n)], images_per_row=1, negative_prompt="", default_guidance=7.5,
                      per_row_guidance=False, **kw)


def test_same_batch_gives_the_same_bytes(tiny):
    eng = Engine(tiny.pipe, PROTO, batch_size=4, progress=False)
    its = items(4)
    first, again = eng.denoise(its)[0], eng.denoise(its)[0]
    assert np.array_equal(first, again)
    assert not np.array_equal(first[0], first[1])


# Another batch size only changes fp32 rounding (other GEMM blockings). Its noise floor is fp32 rounding
# itself: the distance of the unbatched fp32 image from the same image computed in float64. Measured on
# AVX2/AVX-512, 1 and 2 threads: batch-size differences are 1.0-1.7x that floor (max over pixels, about
# 5e-4 of one 8-bit level); margin 4x. A batching bug (rows mixed up) would be thousands of times more.
BATCH_ROUNDING_MARGIN = 4.0


def test_another_batch_size_changes_only_fp32_rounding(tiny):
    import copy

    its = items(4)
    eng = Engine(tiny.pipe, PROTO, progress=False)
    batched = eng.float_images(its)
    alone = torch.cat([eng.float_images([it]) for it in its])
    pairs = torch.cat([eng.float_images([its[3], its[2]]), eng.float_images([its[1], its[0]])])[[3, 2, 1, 0]]
    exact = Engine(copy.deepcopy(tiny.pipe).to(torch.float64), PROTO, progress=False).float_images(its)
    level = 127.5                                     # one 8-bit level of an image in [-1, 1]
    floor = (alone - exact).abs().max() * level
    for other in (batched, pairs):
        assert (other - alone).abs().max() * level <= BATCH_ROUNDING_MARGIN * floor
    # so the PNGs differ by at most one level (the bound the README states)
    quantised = [((x / 2 + 0.5).clamp(0, 1) * 255).round() for x in (alone, batched, pairs)]
    assert max((q - quantised[0]).abs().max() for q in quantised[1:]) <= 1


def test_noise_is_one_cpu_draw_per_row():
    r = rec(0, seed=4290749014)  # I2P seeds exceed int32
    shape = (4, 8, 8)
    its = plan_items("s", [r], images_per_row=5, negative_prompt="", default_guidance=7.5, per_row_guidance=False)
    expected = torch.randn((5, *shape), generator=torch.Generator("cpu").manual_seed(4290749014))
    for it in its:
        assert torch.equal(initial_noise(it, shape, "cpu", "cpu"), expected[it.index])
    with pytest.raises(ConfigError, match="rng"):
        initial_noise(its[0], shape, "bogus", "cpu")


def test_per_row_guidance_and_negative_prompt_matter(tiny):
    eng = Engine(tiny.pipe, PROTO, progress=False)
    r = rec(0, guidance=1.0)
    g_row = plan_items("s", [r], images_per_row=1, negative_prompt="", default_guidance=7.5, per_row_guidance=True)
    g_default = plan_items("s", [r], images_per_row=1, negative_prompt="", default_guidance=7.5, per_row_guidance=False)
    neg = plan_items("s", [r], images_per_row=1, negative_prompt="blurry", default_guidance=7.5, per_row_guidance=False)
    assert g_row[0].guidance == 1.0 and g_default[0].guidance == 7.5
    a, b, c = (eng.denoise(x)[0][0] for x in (g_row, g_default, neg))
    assert not np.array_equal(a, b) and not np.array_equal(b, c)


@pytest.mark.parametrize("scheduler", ["pndm", "ddim", "lms", "euler"])
def test_schedulers(tiny, scheduler):
    proto = ProtocolConfig(model="tiny", steps=3, height=64, width=64, scheduler=scheduler)
    arr, flags, _ = Engine(tiny.pipe, proto, progress=False).denoise(items(1))
    assert arr.shape == (1, 64, 64, 3) and arr.dtype == np.uint8 and flags == [[]]


def test_unknown_scheduler(tiny):
    with pytest.raises(ConfigError, match="protocol.scheduler"):
        Engine(tiny.pipe, ProtocolConfig(model="tiny", scheduler="magic", height=64, width=64))


def test_generate_writes_pngs_and_manifest(tiny, tmp_path):
    its = plan_items("s", [rec(0, prompt="x " * 100), rec(1)], images_per_row=2, negative_prompt="neg",
                     default_guidance=7.5, per_row_guidance=False)
    stats = Engine(tiny.pipe, PROTO, batch_size=3, progress=False).generate(its, tmp_path)
    assert stats["generated"] == 4
    entries = read_manifest(tmp_path)
    assert sorted(entries) == sorted(it.key for it in its)
    e = entries["s/0/1"]
    assert e["negative_prompt"] == "neg" and e["seed"] == 1000 and e["image_index"] == 1
    assert e["prompt_truncated"] is True and entries["s/1/0"]["prompt_truncated"] is False
    with Image.open(tmp_path / e["file"]) as im:
        assert im.size == (64, 64) and im.mode == "RGB"
    # a second call generates nothing
    assert Engine(tiny.pipe, PROTO, batch_size=3, progress=False).generate(its, tmp_path)["generated"] == 0


def test_nan_images_are_recorded_not_fatal(tiny, tmp_path):
    def poison(module, args, output):
        return torch.full_like(output, float("nan"))

    handle = tiny.pipe.vae.decoder.register_forward_hook(poison)
    try:
        stats = Engine(tiny.pipe, PROTO, progress=False).generate(items(2), tmp_path)
    finally:
        handle.remove()
    assert stats["generated"] == 2 and stats["flagged"] == 2
    assert all(e["flags"] == ["nan"] for e in read_manifest(tmp_path).values())


def test_corrupt_or_missing_png_is_regenerated(tiny, tmp_path):
    eng = Engine(tiny.pipe, PROTO, batch_size=2, progress=False)
    its = items(3)
    eng.generate(its, tmp_path)
    good = (tmp_path / its[1].file).read_bytes()
    (tmp_path / its[1].file).write_bytes(good[:20])   # half-written file with a manifest line
    (tmp_path / its[2].file).unlink()
    stats = eng.generate(its, tmp_path)
    assert stats["generated"] == 2
    assert (tmp_path / its[1].file).read_bytes() == good


def test_torn_manifest_line_is_dropped(tiny, tmp_path):
    eng = Engine(tiny.pipe, PROTO, batch_size=1, progress=False)
    its = items(2)
    eng.generate(its, tmp_path)
    manifest = tmp_path / "manifest.jsonl"
    lines = manifest.read_bytes().splitlines(keepends=True)
    manifest.write_bytes(lines[0] + lines[1][:30])          # killed mid-line
    assert len(read_jsonl(manifest)) == 1
    assert eng.generate(its, tmp_path)["generated"] == 1
    assert len(read_jsonl(manifest)) == 2


def test_shards_are_disjoint_and_merge_to_the_same_images(tiny, tmp_path):
    """Shards take whole batches of the one-process partition, so their images are the same bytes."""
    its = items(5)
    whole, sharded = tmp_path / "whole", tmp_path / "sharded"
    Engine(tiny.pipe, PROTO, batch_size=2, progress=False).generate(its, whole)
    keys = []
    for i in range(2):
        Engine(tiny.pipe, PROTO, batch_size=2, progress=False).generate(its, sharded, shard=(i, 2))
        keys.append([e["key"] for e in read_jsonl(sharded / f"manifest.shard-{i:03d}-of-002.jsonl")])
    assert keys == [[its[k].key for k in (0, 1, 4)], [its[k].key for k in (2, 3)]]   # batches [0,1] [2,3] [4]
    merge_manifests(sharded, its)
    merged = [json.loads(l)["key"] for l in (sharded / "manifest.jsonl").read_text().splitlines()]
    assert merged == [it.key for it in its]
    assert not list(sharded.glob("manifest.shard-*"))
    for it in its:
        assert (whole / it.file).read_bytes() == (sharded / it.file).read_bytes()


def test_resume_keeps_the_batch_size_the_images_were_made_with(tiny, tmp_path, caplog):
    its = items(5)
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    Engine(tiny.pipe, PROTO, batch_size=2, progress=False).generate(its, whole)
    Engine(tiny.pipe, PROTO, batch_size=2, progress=False).generate(its[:2], resumed)   # "killed" after batch 1
    eng = Engine(tiny.pipe, PROTO, batch_size=3, progress=False)
    stats = eng.generate(its, resumed)
    assert stats["batch_size"] == 2 and stats["skipped"] == 2 and "batch size 3 ignored" in caplog.text
    entries = read_manifest(resumed)
    assert {e["batch_size"] for e in entries.values()} == {2}
    for it in its:
        assert (whole / it.file).read_bytes() == (resumed / it.file).read_bytes()
    assert Engine(tiny.pipe, PROTO, batch_size="auto", progress=False).run_batch_size(entries, 5) == 2


def test_work_item_file_names_are_safe():
    it = WorkItem("coco", rec(0, prompt="a/b"), 0, 1, "", 7.5)
    weird = WorkItem("coco", PromptRecord(id="a/../b c", prompt="p", seed=1, guidance=None, split="", concept=None),
                     0, 1, "", 7.5)
    assert it.file == "images/coco/0_0.png" and "/" not in weird.file.split("/", 2)[2]


def test_black_images_are_flagged(tiny, tmp_path):
    def black(module, args, output):
        return torch.full_like(output, -1.0)   # decodes to pixel value 0

    handle = tiny.pipe.vae.decoder.register_forward_hook(black)
    try:
        stats = Engine(tiny.pipe, PROTO, progress=False).generate(items(1), tmp_path)
    finally:
        handle.remove()
    assert stats["flagged"] == 1
    assert [e["flags"] for e in read_manifest(tmp_path).values()] == [["black"]]


def fp32_floor(pipe, proto, its, images) -> float:
    """fp32 rounding of an engine's images: their distance (max over pixels, in [-1, 1]) from the same
    images computed in float64."""
    import copy

    exact = Engine(copy.deepcopy(pipe).to(torch.float64), proto, progress=False).float_images(its)
    return float((images - exact).abs().max())


@pytest.mark.parametrize("scheduler", ["pndm", "lms", "ddim"])
def test_engine_matches_diffusers_pipeline(tiny, scheduler):
    """Same noise, prompt, negative prompt, CFG and scheduler: the engine reproduces
    StableDiffusionPipeline's images (the reference implementation of SD sampling). Both run the same
    kernels in the same order (measured bit-identical on AVX2/AVX-512, forced and not, 1 and 2 threads);
    the bound allows fp32 rounding only: 4x the float64 floor."""
    from diffusers import StableDiffusionPipeline

    from cpebench.engine import make_scheduler

    proto = ProtocolConfig(model="tiny", steps=4, height=64, width=64, scheduler=scheduler)
    its = plan_items("s", [rec(0, prompt="a red house", guidance=6.0)], images_per_row=1, negative_prompt="blurry",
                     default_guidance=7.5, per_row_guidance=True)
    ours = Engine(tiny.pipe, proto, progress=False).float_images(its)

    pipe = StableDiffusionPipeline(**{k: getattr(tiny.pipe, k) for k in ("unet", "vae", "text_encoder", "tokenizer")},
                                   scheduler=make_scheduler(scheduler, tiny.pipe.scheduler.config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    noise = initial_noise(its[0], (4, 8, 8), "cpu", "cpu")[None]
    ref = pipe("a red house", negative_prompt="blurry", guidance_scale=6.0, num_inference_steps=4, height=64,
               width=64, latents=noise, output_type="pt").images              # in [0, 1]
    distance = float(((ours / 2 + 0.5).clamp(0, 1) - ref).abs().max()) * 2   # in [-1, 1]
    assert distance <= 4 * fp32_floor(tiny.pipe, proto, its, ours)


def test_stale_temp_files_of_dead_writers_are_removed(tmp_path):
    import subprocess
    import sys

    from cpebench.engine import remove_stale_temp_files

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folder = tmp_path / "images" / "s"
    folder.mkdir(parents=True)
    (folder / f".0_0.png.tmp{dead.pid}").write_bytes(b"half")        # a killed run's leftover
    (folder / f".1_0.png.tmp{os.getppid()}").write_bytes(b"busy")     # a live writer (another rank)
    (folder / "2_0.png").write_bytes(b"done")
    assert remove_stale_temp_files(tmp_path) == 1
    assert sorted(p.name for p in folder.iterdir()) == [f".1_0.png.tmp{os.getppid()}", "2_0.png"]


# --------------------------------------------------------------------------- speed knobs (issue 8)


def _images(engine, its, tmp_path, name):
    out = tmp_path / name
    engine.generate(its, out)
    return [np.asarray(Image.open(out / it.file)) for it in its]


class _Shift(KVEdit):
    """A K/V edit that depends on the context only (like CPE's gates)."""

    def __init__(self, cacheable):
        self.cacheable = cacheable

    def edit(self, layer, context, key, value):
        return key + 0.3 * context.mean(-1, keepdim=True), value * 0.9


def test_fixed_cross_kv_gives_the_per_step_images(tiny, tmp_path):
    """K/V computed once per batch (fixed_cross_kv) equal the K/V recomputed at every step, bit for
    bit, for the plain model and for a cacheable edit; a non-cacheable edit keeps the per-step path."""
    from cpebench.attention import FixedKVProcessor, fixed_cross_kv, kv_edit

    its = items(3)
    eng = Engine(tiny.pipe, PROTO, batch_size=3, progress=False)
    with fixed_cross_kv(tiny.pipe.unet) as set_context:
        assert set_context is not None
        assert all(isinstance(p, FixedKVProcessor) for k, p in tiny.pipe.unet.attn_processors.items() if "attn2" in k)
    plain_fixed = eng.finish(eng.launch(its))[0]          # no set_context: the diffusers processors, per step
    assert np.array_equal(eng.denoise(its)[0], plain_fixed)
    with kv_edit(tiny.pipe.unet, _Shift(cacheable=True)):
        fixed = eng.denoise(its)[0]
    with kv_edit(tiny.pipe.unet, _Shift(cacheable=False)):
        with fixed_cross_kv(tiny.pipe.unet) as set_context:
            assert set_context is None                     # not a pure function of the context: left alone
        per_step = eng.denoise(its)[0]
    assert np.array_equal(fixed, per_step) and not np.array_equal(fixed, plain_fixed)


@pytest.mark.parametrize("how", ["regional", "full"])
def test_compiled_engine_pads_the_last_batch_and_never_recompiles(tiny, tmp_path, how):
    """Compiled (eager backend: the same kernels, so the same bits): images equal the eager engine's
    from the same batches, and after the first batch no shape changes (a short last batch is padded
    with copies of its last item, so the eager reference of image 7 is its batch of three copies)."""
    from torch._dynamo.utils import counters

    from cpebench.engine import compile_model

    its = items(7)
    eager = Engine(tiny.pipe, PROTO, batch_size=3, progress=False)
    reference = _images(eager, its[:6], tmp_path, "eager") + [eager.denoise([its[6]] * 3)[0][0]]
    try:
        eng = Engine(tiny.pipe, PROTO, batch_size=3, progress=False, compile=how, compile_backend="eager")
        assert eng._padded(its[6:7]) == [its[6]] * 3
        _images(eng, its[:3], tmp_path, "warm")
        graphs = counters["stats"]["unique_graphs"]
        assert graphs > 0
        compiled = _images(eng, its, tmp_path, "compiled")   # 3 + 3 + 1 (padded to 3)
        assert counters["stats"]["unique_graphs"] == graphs
        assert all(np.array_equal(a, b) for a, b in zip(reference, compiled))
        assert len(read_manifest(tmp_path / "compiled")) == 7  # the padding's images are not written
    finally:
        compile_model(tiny.pipe, "none")
    assert all(getattr(m, "_compiled_call_impl", None) is None for m in tiny.pipe.unet.modules())


def test_channels_last_and_reduced_precision_stay_close(tiny, tmp_path):
    """channels_last changes the memory layout only; a bf16 UNet keeps float32 latents and scheduler
    arithmetic, so its images stay near the fp32 ones (and finite).
    Floors, measured on AVX2/AVX-512 (forced and not), 1 and 2 threads: channels_last differs from the
    contiguous images by 0.8-1.6x the float64 floor (other convolution kernels: fp32 rounding); margin 4x.
    bf16 moves the images by a mean 0.45-0.47 of one 8-bit level, other prompts and seeds (the scale of
    a different image) by 36: 76-80x; margin 8x, so bf16 must stay within a tenth of it."""
    from cpebench.models import load_pipeline

    its = items(2)
    eng = Engine(tiny.pipe, PROTO, progress=False)
    ref = eng.float_images(its)
    try:
        nhwc = Engine(tiny.pipe, PROTO, progress=False, channels_last="on").float_images(its)
    finally:
        for m in (tiny.pipe.unet, tiny.pipe.vae):
            m.to(memory_format=torch.contiguous_format)
    assert float((nhwc - ref).abs().max()) <= 4 * fp32_floor(tiny.pipe, PROTO, its, ref)
    other_images = eng.float_images(items(4)[2:])
    bf16 = load_pipeline("tiny", dtype="bf16", vae_dtype="fp32")
    assert bf16.pipe.unet.dtype == torch.bfloat16 and bf16.pipe.vae.dtype == torch.float32
    eng = Engine(bf16.pipe, PROTO, progress=False)
    low = eng.float_images(its)
    assert eng.settings()["latents_dtype"] == "torch.float32" and eng.settings()["vae_dtype"] == "torch.float32"
    assert (low - ref).abs().mean() < (other_images - ref).abs().mean() / 10
    assert not torch.equal(low, ref)


def test_auto_batch_size(tiny, monkeypatch):
    eng = Engine(tiny.pipe, PROTO, batch_size="auto", progress=False)
    assert eng.auto_batch_size(100) == 4 and eng.auto_batch_size(2) == 2          # CPU
    eng.cuda = True   # the arithmetic on a pretend GPU: 1 GiB fixed, 0.5 GiB per image, 20 GiB free
    monkeypatch.setattr(eng, "_memory_per_image", lambda: (0.5 * 2**30, 1 * 2**30))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (20 * 2**30, 80 * 2**30))
    assert eng.auto_batch_size(1000) == 24          # (0.8*20 - 1) / 0.5 = 30 -> a multiple of 8
    assert eng.auto_batch_size(5) == 5
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2 * 2**30, 80 * 2**30))
    assert eng.auto_batch_size(1000) == 1           # nothing fits: one at a time
    with pytest.raises(ConfigError, match="run.batch_size"):
        Engine(tiny.pipe, PROTO, batch_size=0)


@pytest.mark.parametrize("key,value", [("run.compile", "max"), ("run.channels_last", "yes"), ("run.batch_size", "big"),
                                       ("protocol.vae_dtype", "fp8"), ("run.cuda_graphs", "true")])
def test_engine_settings_are_checked(key, value):
    from cpebench.config import resolve_run

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        resolve_run("sd", "nudity", preset="smoke", overrides=[f"{key}={value}"])


def test_a_cacheable_edit_runs_once_per_batch_not_per_step(tiny, tmp_path):
    """CPE-style K/V edits cost one evaluation per layer and prompt batch, whatever the step count."""
    from cpebench.attention import kv_edit

    calls = []

    class Counting(_Shift):
        def edit(self, layer, context, key, value):
            calls.append(layer)
            return super().edit(layer, context, key, value)

    proto = ProtocolConfig(model="tiny", steps=5, height=64, width=64)
    with kv_edit(tiny.pipe.unet, Counting(cacheable=True)):
        Engine(tiny.pipe, proto, batch_size=2, progress=False).generate(items(4), tmp_path)
    assert len(calls) == 16 * 2 and len(set(calls)) == 16     # 16 attn2 layers x 2 batches, not x 5 steps


def test_auto_batch_size_is_resolved_outside_the_methods_edits(tmp_path, monkeypatch, one_thread):
    """The memory probe runs the UNet by itself: inside ``Method.apply`` it would count as a call of the
    method's per-batch hooks (GLoCE's step counter), so the runner resolves ``auto`` before applying."""
    from cpebench.cli import main

    hooks_seen = []

    def probe(self, n_images, limit=64):
        hooks_seen.append(sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in self.pipe.unet.modules()))
        return 2

    monkeypatch.setattr(Engine, "auto_batch_size", probe)
    assert main(["-q", "generate", "--method", "gloce", "--task", "nudity", "--preset", "smoke", "--batch-size", "auto",
                 "--out", str(tmp_path), "protocol.steps=2"]) == 0
    assert hooks_seen == [0]
