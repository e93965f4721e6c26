"""FID/KID core: the properties the scoring issue asks for, on Gaussians and on a tiny Inception stand-in."""

import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cpebench.errors import ModelLoadError
from cpebench.metrics.fid import (
    GaussianStats,
    InceptionFeatures,
    clean_resize,
    fid_from_stats,
    find_inception,
    frechet_distance,
    kernel_inception_distance,
)


def gaussian(n, d, shift=0.0, scale=1.0, seed=0):
    return np.random.default_rng(seed).normal(shift, scale, size=(n, d))


def stats(x):
    s = GaussianStats(x.shape[1])
    s.update(x)
    return s


def test_fid_of_a_set_against_itself_is_zero():
    x = gaussian(500, 16)
    # float64: tr(2Σ − 2√(ΣΣ)) with tr Σ ≈ 16; sqrtm is accurate to ~1e-12 relative here (measured: exactly 0)
    assert abs(fid_from_stats(stats(x), stats(x))) < 1e-6


def test_fid_matches_the_closed_form_for_gaussians():
    # N(mu1, s1² I) vs N(mu2, s2² I): ||mu1 - mu2||² + d (s1 - s2)²
    d = 4
    closed = frechet_distance(np.zeros(d), np.eye(d), np.full(d, 0.5), 4 * np.eye(d))
    assert closed == pytest.approx(d * 0.25 + d * (1 - 2) ** 2)
    a, b = gaussian(200_000, d, 0.0, 1.0, seed=1), gaussian(200_000, d, 0.5, 2.0, seed=2)
    # sampling error, not rounding: each estimated σ is off by ~σ/√(2n), which moves d(σ1 − σ2)² by ~0.4 % (one
    # standard error); 2 % is 5 of them (measured 0.4 %; seeded, so the same draw everywhere)
    assert fid_from_stats(stats(a), stats(b)) == pytest.approx(closed, rel=0.02)


def test_streaming_and_shard_merged_stats_equal_numpy_and_a_single_pass():
    x = gaussian(1000, 8, 1.0, 3.0)
    whole = stats(x)
    shards = [stats(x[:300]), stats(x[300:301]), stats(x[301:])]
    merged = GaussianStats(8)
    for s in shards:
        merged.merge(s)
    # float64 sums of 1000 rows in other orders: ≤ n·eps ≈ 1e-13 relative (measured ≤ 4e-14); numpy's two-pass
    # covariance vs the streaming Σxxᵀ − nμμᵀ also cancels (μ/σ = 1/3): 1e-9 (measured 1e-14)
    np.testing.assert_allclose(merged.mean(), x.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(merged.cov(), np.cov(x, rowvar=False), rtol=1e-9)
    np.testing.assert_allclose(merged.cov(), whole.cov(), rtol=1e-12)


def test_kid_is_unbiased_on_identical_distributions_and_positive_when_shifted():
    d = 32
    values = [kernel_inception_distance(gaussian(400, d, seed=10 + i), gaussian(400, d, seed=100 + i),
                                        num_subsets=20, seed=i) for i in range(10)]
    # unbiased: the mean over independent draws is within 3 standard errors of 0 (measured 0.26 of that), not
    # the positive bias of the V-statistic
    assert abs(np.mean(values)) < 3 * np.std(values) / np.sqrt(len(values))
    # the floor: the largest value between identical distributions; a shift is far beyond it (measured 89x)
    shifted = kernel_inception_distance(gaussian(400, d, seed=1), gaussian(400, d, 0.5, seed=2), num_subsets=20)
    assert shifted > 10 * max(abs(v) for v in values)


def test_kid_with_seed_reproduces_clean_fid_global_state_draws():
    a, b = gaussian(50, 8, seed=1), gaussian(60, 8, 0.2, seed=2)
    np.random.seed(0)
    global_state = kernel_inception_distance(a, b, num_subsets=5, seed=None)
    assert kernel_inception_distance(a, b, num_subsets=5, seed=0) == pytest.approx(global_state, rel=1e-12)


def test_clean_resize_is_float_bicubic_per_channel():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 48, 3), dtype=np.uint8))
    out = clean_resize(img)
    assert out.shape == (299, 299, 3) and out.dtype == np.float32
    assert not np.allclose(out, np.round(out))       # not quantised
    ref = np.asarray(Image.fromarray(np.asarray(img)[:, :, 1].astype(np.float32), mode="F").resize((299, 299), Image.BICUBIC))
    np.testing.assert_array_equal(out[:, :, 1], ref)


def test_tiny_inception_loads_through_torch_jit_and_features_are_deterministic():
    ext = InceptionFeatures("tiny", batch_size=2)
    rng = np.random.default_rng(0)
    imgs = [Image.fromarray(rng.integers(0, 255, (32, 40, 3), dtype=np.uint8)) for _ in range(3)]
    f1, f2 = ext(imgs), ext(imgs[::-1])     # batches of two: each image in another batch (or alone)
    # Up to fp32 rounding; the floor: the features' distance from the same network in float64 (3e-8; another
    # batch measured bit-identical on AVX2/AVX-512, forced and not, 1 and 2 threads); margin 4x.
    exact = InceptionFeatures("tiny", batch_size=2)
    with warnings.catch_warnings():      # .double() on a TorchScript module touches .grad of non-leaf tensors
        warnings.simplefilter("ignore", UserWarning)
        model64 = exact.model.double()
    exact.model = types.SimpleNamespace(layers=lambda x: model64.layers(x.double()))   # what the extractor calls
    assert f1.shape == (3, 64) and np.abs(f1 - f2[::-1]).max() <= 4 * np.abs(f1 - exact(imgs)).max()
    assert isinstance(ext.model, torch.jit.ScriptModule) and len(ext.info()["sha256"]) == 64


def test_missing_inception_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("cpebench.metrics.fid.inception_candidates", lambda: [tmp_path / "none.pt"])
    with pytest.raises(ModelLoadError, match="inception-2015-12-05.pt"):
        find_inception("auto")
    with pytest.raises(ModelLoadError, match="do not exist"):
        find_inception(str(tmp_path / "missing.pt"))


# --------------------------------------------------------------------------- the FID metric

from cpebench.errors import ConfigError, DataError  # noqa: E402
from cpebench.metrics import GeneratedImage  # noqa: E402
from cpebench.metrics.fid import FID, coco_id_of  # noqa: E402


def _images(folder, ids, seed, real=False):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    for i in ids:
        name = f"COCO_val2014_{i:012d}.jpg" if real else f"{i}_0.png"
        arr = rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / name, quality=95)
        out.append(GeneratedImage(folder / name, {"key": f"coco/{i}/0", "set": "coco", "extras": {"coco_id": i}}))
    return out


@pytest.fixture
def coco(tmp_path):
    ids = [9, 25, 30, 42, 73, 74, 77, 1000, 203564]
    real = _images(tmp_path / "val2014", ids + [5, 6], seed=1, real=True)     # extra images are not used
    gen = _images(tmp_path / "run" / "images", ids, seed=2)
    return tmp_path, ids, real, gen


def test_fid_metric_equals_the_direct_computation_and_is_zero_on_the_reference(coco):
    tmp, ids, real, gen = coco
    metric = FID(reference_images=str(tmp / "val2014"), inception="tiny", batch_size=4)
    metric.bind(tmp / "run")
    details = metric.update(gen)
    result = metric.compute()
    value = result.values["coco"]
    # fewer images than feature dimensions: the card says the value is only comparable at the same n
    assert result.values["coco_n"] <= metric.stats["coco"].dim and "rank-deficient" in result.info["sets"]["coco"]["warning"]
    ext = metric.extractor()
    direct = fid_from_stats(stats(ext([g.load() for g in gen])), stats(ext([r.load() for r in real[: len(ids)]])))
    assert value == pytest.approx(direct, rel=1e-9) and value > 0
    # replaying the stored details (a resumed run) gives the same number without recomputing features
    again = FID(reference_images=str(tmp / "val2014"), inception="tiny")
    again.bind(tmp / "run")
    again.accumulate(details)
    assert again.compute().values["coco"] == pytest.approx(value, rel=1e-12)
    # the real images themselves score 0 (float64 statistics and sqrtm, as in test_fid_of_a_set_against_itself_is_zero)
    self_metric = FID(reference_images=str(tmp / "val2014"), inception="tiny")
    self_metric.bind(tmp / "run2")
    self_metric.update(real[: len(ids)])
    assert abs(self_metric.compute().values["coco"]) < 1e-6


def test_fid_shards_merge_to_the_single_pass_value(coco):
    tmp, ids, real, gen = coco
    single = FID(reference_images=str(tmp / "val2014"), inception="tiny")
    single.bind(tmp / "run")
    single.update(gen)
    a, b = FID(reference_images=str(tmp / "val2014"), inception="tiny"), FID(reference_images=str(tmp / "val2014"), inception="tiny")
    for m, part in ((a, gen[:4]), (b, gen[4:])):
        m.bind(tmp / "run")
        m.update(part)
    a.merge(b)
    assert a.compute().values["coco"] == pytest.approx(single.compute().values["coco"], rel=1e-9)


def test_fid_reference_stats_are_cached_by_ids_and_extractor(coco, monkeypatch):
    tmp, ids, real, gen = coco
    m = FID(reference_images=str(tmp / "val2014"), inception="tiny")
    m.bind(tmp / "run")
    m.update(gen)
    first = m.compute()
    cached = first.info["sets"]["coco"]["reference_stats"]
    assert "n9" in cached and "clean299" in cached and "inception" in cached
    import shutil

    shutil.rmtree(tmp / "val2014")          # the cache answers without the images
    assert m.compute().values["coco"] == first.values["coco"]


def test_fid_reference_errors_are_clear(coco, monkeypatch):
    tmp, ids, real, gen = coco
    monkeypatch.setenv("CPEBENCH_CACHE", str(tmp / "cache"))     # no cached reference statistics
    m = FID(inception="tiny")
    m.bind(tmp / "run")
    m.update(gen)
    with pytest.raises(ConfigError, match="reference_images"):
        m.compute()
    (tmp / "val2014" / "COCO_val2014_000000000042.jpg").unlink()
    m = FID(reference_images=str(tmp / "val2014"), inception="tiny")
    m.bind(tmp / "run")
    m.update(gen)
    with pytest.raises(DataError, match="1 of 9 COCO ids have no image.*000000000042"):
        m.compute()
    assert coco_id_of(Path("COCO_val2014_000000203564.jpg")) == 203564 and coco_id_of(Path("x_12.jpg")) is None


# --------------------------------------------------------------------------- the KID metric

import json  # noqa: E402

from cpebench.metrics.fid import KID  # noqa: E402


def _run(folder, n, seed, shift=0):
    """A run directory with a manifest, as the engine writes one."""
    (folder / "images" / "art").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines, images = [], []
    for i in range(n):
        arr = np.clip(rng.integers(0, 200, (40, 40, 3)) + shift, 0, 255).astype(np.uint8)
        entry = {"key": f"art/{i}/0", "file": f"images/art/{i}_0.png", "set": "art"}
        Image.fromarray(arr).save(folder / entry["file"])
        lines.append(json.dumps(entry))
        images.append(GeneratedImage(folder / entry["file"], entry))
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return images


def test_kid_metric_equals_the_direct_computation_against_the_reference_run(tmp_path):
    ref_images = _run(tmp_path / "sd", 12, seed=1)
    edited = _run(tmp_path / "cpe", 12, seed=2, shift=40)
    m = KID(reference_run=str(tmp_path / "sd"), inception="tiny", num_subsets=10)
    m.bind(tmp_path / "cpe")
    m.update(edited)
    r = m.compute()
    ext = m.extractor()
    direct = kernel_inception_distance(ext([e.load() for e in edited]), ext([e.load() for e in ref_images]), 10, seed=0)
    assert r.values["art_raw"] == pytest.approx(direct, rel=1e-9) and r.values["art"] == pytest.approx(direct * 1e3)
    assert r.columns[0].label == "KID×10³ art" and r.columns[0].higher_is_better is False
    assert list((tmp_path / "sd" / "features").glob("inception-*.npy"))      # reference features cached there
    # the unedited model against its own images: far below the edited model's value (measured 5e-4 of it; an
    # unedited run with other seeds, 1e-4 of it)
    same = KID(reference_run=str(tmp_path / "sd"), inception="tiny", num_subsets=10)
    same.bind(tmp_path / "sd")
    same.update(ref_images)
    assert abs(same.compute().values["art_raw"]) < 0.2 * direct


def test_kid_reference_errors_are_clear(tmp_path):
    _run(tmp_path / "sd", 3, seed=1)
    edited = _run(tmp_path / "cpe", 5, seed=2)
    m = KID(inception="tiny")
    m.bind(tmp_path / "cpe")
    m.update(edited)
    with pytest.raises(ConfigError, match="reference_run"):
        m.compute()
    m = KID(reference_run=str(tmp_path / "sd"), inception="tiny")
    m.bind(tmp_path / "cpe")
    m.update(edited)
    with pytest.raises(DataError, match="lacks 2 of the 5 images.*art/3/0"):
        m.compute()


def test_fid_through_the_cli_on_the_smoke_coco_rows(tmp_path, tiny_dir):
    from cpebench.cli import main

    real = tmp_path / "val2014"
    real.mkdir()
    rng = np.random.default_rng(0)
    for i in (0, 1):   # the coco_ids of the smoke rows
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(real / f"COCO_val2014_{i:012d}.jpg")
    assert main(["-q", "run", "--method", "sd", "--task", "coco", "--preset", "smoke", "--out", str(tmp_path / "runs"),
                 "metrics.fid.prompt_sets=[coco]", f"metrics.fid.options.reference_images={real}",
                 "metrics.fid.options.inception=tiny"]) == 0
    summary = json.loads((tmp_path / "runs" / "sd-coco-tiny-smoke" / "summary.json").read_text())
    fid = summary["metrics"]["fid"]
    assert fid["n"] == 2 and fid["values"]["coco"] > 0 and fid["info"]["sets"]["coco"]["reference_n"] == 2
    assert len(list((tmp_path / "runs" / "sd-coco-tiny-smoke" / "features").glob("inception-*.npy"))) == 1


def test_fid_in_a_task_fails_before_generation_without_real_images(tmp_path, tiny_dir, monkeypatch, capsys):
    from cpebench.cli import main
    from cpebench.config import resolve_run

    monkeypatch.delenv("CPEBENCH_COCO", raising=False)
    assert "fid" in resolve_run("sd", "coco").task.metrics
    assert "fid" not in resolve_run("sd", "coco", preset="smoke").task.metrics      # the smoke preset turns it off
    assert main(["-q", "run", "--method", "sd", "--task", "coco", "--model", "tiny", "--device", "cpu",
                 "--out", str(tmp_path)]) == 2
    assert "CPEBENCH_COCO" in capsys.readouterr().err
    assert not (tmp_path / "sd-coco-tiny").exists()                                # nothing was generated
    monkeypatch.setenv("CPEBENCH_COCO", str(tmp_path))
    assert FID().reference_images == str(tmp_path)


def test_kid_reference_run_auto_is_generated_by_run(tmp_path, tiny_dir):
    """`run` resolves reference_run=auto to the unedited model's run and generates it when missing."""
    from cpebench.cli import main
    from cpebench.config import resolve_run
    from cpebench.runner import metric_options

    cfg = resolve_run("cpe", "character", preset="smoke", overrides=[f"run.out={tmp_path}"])
    assert metric_options(cfg, "kid")["reference_run"] == str(tmp_path / "sd-character-tiny-smoke")
    assert main(["-q", "run", "--method", "sd", "--task", "character", "--preset", "smoke", "--out", str(tmp_path),
                 "--name", "edited", "prompt_sets.character.images_per_row=2"]) == 0
    ref = tmp_path / "sd-character-tiny-smoke"
    assert (ref / "manifest.jsonl").exists()                          # generated first, same protocol and keys
    summary = json.loads((tmp_path / "edited" / "summary.json").read_text())
    kid = summary["metrics"]["kid"]
    assert kid["info"]["sets"]["character"]["reference_run"] == str(ref) and kid["n"] == 2
