"""micro_judge and micro_fid on world renders saved as PNG (no diffusion model): what they read, the
summary formulas, fidelity, the FID/KID ordering, shard merging and the missing-judge error.

Thresholds are derived from the test judge's own accuracy on held-out renders that the tests do not
score, so they hold for any judge the small recipe trains, not for one set of weights."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from cpebench.errors import ModelLoadError
from cpebench.metrics import GeneratedImage
from cpebench.metrics.fid import frechet_distance
from cpebench.metrics.micro import MicroFID, MicroJudge
from cpebench.microworld import judges, prompts, shipped, world
from cpebench.registry import METRICS

HELDOUT = world.split_seed("heldout")
N_TEST = 1500            # held-out indices [0, N_TEST) give the scored images, the rest the reference
N_REF = 2500


@pytest.fixture(scope="module")
def judge_file(tmp_path_factory):
    torch.set_num_threads(1)
    recipe = judges.Recipe(steps=300, n_train=4000)    # ~15 s on one thread; strong on colour and characters
    return judges.save(judges.train(recipe), tmp_path_factory.mktemp("judge") / "judge.safetensors", recipe)


@pytest.fixture(scope="module")
def heldout(judge_file):
    """Held-out renders (default mix), their labels and what the test judge reads on them."""
    images, _, labels = world.batch("heldout", N_TEST + N_REF)
    judge, _ = judges.load(judge_file)
    return images, labels, judge.predict(images)


def label(lab: dict, kind: str) -> str:
    return lab[kind] or judges.NONE


def renders(heldout, kind: str, concept: str, n: int) -> np.ndarray:
    """The first n scored-range renders whose ``kind`` is ``concept``."""
    images, labels, _ = heldout
    idx = [i for i in range(N_TEST) if label(labels[i], kind) == concept][:n]
    assert len(idx) == n, f"only {len(idx)} held-out renders of {kind} {concept}"
    return images[idx]


def reference_share(heldout, kind: str, truths, read_as=None) -> tuple[float, int]:
    """Share of reference-range renders of the concepts ``truths`` that the judge reads as ``read_as``
    (default: their own concept), and how many renders that is."""
    _, labels, read = heldout
    idx = [i for i in range(N_TEST, N_TEST + N_REF) if label(labels[i], kind) in truths]
    hits = [read[kind][i] == (read_as or label(labels[i], kind)) for i in idx]
    return float(np.mean(hits)), len(idx)


def margin(p: float, n: int, n_ref: int) -> float:
    """Three standard errors of the difference of two binomial shares (test n vs reference n_ref), with p
    kept off 0 and 1 so that a perfect reference still allows a rare miss."""
    p = min(max(p, 0.02), 0.98)
    return 3 * math.sqrt(p * (1 - p) * (1 / n + 1 / n_ref))


def as_generated(tmp_path, set_name: str, arrays, concepts=None, rows=None) -> list[GeneratedImage]:
    """PNG files with manifest-like entries; ``rows``: prompt rows (micro_coco) giving ids and extras."""
    out = []
    folder = tmp_path / set_name
    folder.mkdir(exist_ok=True)
    for i, a in enumerate(arrays):
        row = rows[i] if rows is not None else {}
        path = folder / f"{len(list(folder.iterdir())):05d}.png"
        Image.fromarray(np.asarray(a, np.uint8)).save(path)
        extras = {k: v for k, v in row.items() if k not in ("id", "prompt", "seed", "concept")}
        entry = {"key": f"{set_name}/{path.stem}", "file": path.name, "set": set_name, "row_id": row.get("id", str(i)),
                 "split": prompts.split_of(set_name), "concept": concepts[i] if concepts else row.get("concept"),
                 "extras": extras}
        out.append(GeneratedImage(path, entry))
    return out


def coco(n: int, start: int = 0):
    """micro_coco rows [start, start+n) and their true renders."""
    rows = prompts.rows(prompts.COCO_SET, start + n)[start:]
    samples = [world.sample(HELDOUT, int(r["id"])) for r in rows]
    assert [s.caption for s in samples] == [r["prompt"] for r in rows]     # row i is heldout sample i
    return rows, np.stack([s.image for s in samples])


def result(metric_cls, judge_file, images):
    m = metric_cls(judge=str(judge_file), device="cpu")
    details = m.update(images)
    json.dumps(details)                    # stored as scores.jsonl lines
    return m.compute(), details


# ---------------------------------------------------------------- micro_judge


@pytest.mark.parametrize("task, other", [("micro-nudity", "blue"), ("micro-celebrity", "Quilla")])
def test_rates_on_true_renders(tmp_path, judge_file, heldout, task, other):
    spec = prompts.TASKS[task]
    erased_set, remained_set, _ = prompts.set_names(task)
    kept = [c for c in judges.CLASSES[spec.kind] if c not in (spec.target, judges.NONE)]
    n = 30
    erased = renders(heldout, spec.kind, spec.target, n)
    wrong = renders(heldout, spec.kind, other, n)           # another concept, filed under the erased set
    remained = np.concatenate([renders(heldout, spec.kind, c, 8) for c in kept])
    remained_concepts = [c for c in kept for _ in range(8)]

    res, _ = result(MicroJudge, judge_file, as_generated(tmp_path, erased_set, erased, [spec.target] * n)
                    + as_generated(tmp_path, remained_set, remained, remained_concepts))
    v = res.values
    p_e, n_e = reference_share(heldout, spec.kind, {spec.target})
    assert p_e >= 0.9, f"the test judge reads {spec.target} only {p_e:.2f} of the time: the recipe is too weak"
    assert v["rate_e"] >= 100 * (p_e - margin(p_e, n, n_e))
    p_r, n_r = reference_share(heldout, spec.kind, set(kept))
    assert v["acc_r"] >= 100 * (p_r - margin(p_r, len(remained), n_r))
    assert (v["rate_e_n"], v["acc_r_n"], v["h_o_n"]) == (n, len(remained), n + len(remained))
    e, a = 100 - v["rate_e"], v["acc_r"]
    assert v["h_o"] == 2 * e * a / (e + a)
    assert [c.header for c in res.columns] == ["Rate_e ↓", "Acc_r ↑", "H_o ↑"]

    # exactly the judge's own reads of the same pixels (the PNGs are lossless)
    judge, _ = judges.load(judge_file)
    assert v["rate_e"] == 100 * np.mean([r == spec.target for r in judge.predict(erased)[spec.kind]])

    res, details = result(MicroJudge, judge_file, as_generated(tmp_path, erased_set, wrong, [spec.target] * n))
    p_w, n_w = reference_share(heldout, spec.kind, {other}, read_as=spec.target)
    assert res.values["rate_e"] <= 100 * (p_w + margin(p_w, n, n_w))
    assert "acc_r" not in res.values and "h_o" not in res.values
    assert [c.key for c in res.columns] == ["rate_e"]
    d = details[0]
    assert (d["set"], d["split"], d["concept"], d["kind"]) == (erased_set, "erased", spec.target, spec.kind)
    assert set(d["read"]) == set(judges.CLASSES)


def test_fidelity_on_true_and_swapped_coco(tmp_path, judge_file, heldout):
    n = 60
    rows, images = coco(n)
    res, details = result(MicroJudge, judge_file, as_generated(tmp_path, prompts.COCO_SET, images, rows=rows))
    v = res.values
    # expected: per image, the mean held-out accuracy of the kinds its prompt states
    acc = {k: reference_share(heldout, k, set(judges.CLASSES[k]) - ({judges.NONE} if k == "character" else set()))[0]
           for k in judges.CLASSES}
    expected = np.mean([np.mean([acc[k] for k in d["stated"]]) for d in details])
    assert v["fidelity"] >= 100 * (expected - 3 * 0.5 / math.sqrt(n))    # a share in [0, 1] has SD <= 0.5
    assert v["fidelity_n"] == n
    stated = [r for r in rows if "colour" in r]
    assert v["coco_colour_n"] == len(stated)
    assert v["coco_colour"] == 100 * np.mean([d["read"]["colour"] == d["stated"]["colour"]
                                              for d in details if "colour" in d["stated"]])
    assert [c.header for c in res.columns] == ["Fidelity ↑"]
    assert "rate_e" not in v

    swapped, _ = result(MicroJudge, judge_file,
                        as_generated(tmp_path, prompts.COCO_SET, np.roll(images, 1, axis=0), rows=rows))
    assert swapped.values["fidelity"] < v["fidelity"] - 30
    # RGB channels permuted: every palette colour becomes another one (red -> green, blue -> red, ...)
    permuted, _ = result(MicroJudge, judge_file, as_generated(tmp_path, prompts.COCO_SET, images[..., [2, 0, 1]], rows=rows))
    assert permuted.values["coco_colour"] < 100 * (1 - acc["colour"]) + 10
    assert permuted.values["fidelity"] < v["fidelity"] - 10


# ---------------------------------------------------------------- micro_fid


@pytest.mark.filterwarnings("ignore::scipy.linalg.LinAlgWarning")    # dead ReLU units: singular covariances
def test_micro_fid_zero_on_true_renders_and_large_on_wrong_ones(tmp_path, judge_file):
    n = 100                                    # more images than the 64 feature dimensions
    rows, images = coco(n)
    true, _ = result(MicroFID, judge_file, as_generated(tmp_path, prompts.COCO_SET, images, rows=rows))
    assert abs(true.values["fid"]) < 1e-6 and true.values["fid_n"] == n
    # FID compares distributions: the same images on the wrong rows are still ~0 (fidelity catches that)
    rolled, _ = result(MicroFID, judge_file, as_generated(tmp_path, prompts.COCO_SET, np.roll(images, 1, 0), rows=rows))
    assert abs(rolled.values["fid"]) < 1e-6

    # the sampling noise floor: true renders of other rows against these rows' renders
    m = MicroFID(judge=str(judge_file), device="cpu")
    a, b = m.reference_features(list(range(n))), m.reference_features(list(range(n, 2 * n)))
    keep = a.std(0) > 0          # in the metric's units: standardised by these rows' true renders
    a, b = ((x[:, keep] - a.mean(0)[keep]) / a.std(0)[keep] for x in (a.astype(np.float64), b.astype(np.float64)))
    floor = frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert floor > 0
    # each image's pixels shuffled (its colours kept, no shape left), and blank grey images. (Permuting
    # the RGB channels is not "wrong" to FID here: it maps the six-colour palette onto itself, so the
    # distribution barely moves; fidelity catches it, see test_fidelity_on_true_and_swapped_coco.)
    shuffled = images.reshape(n, -1, 3).copy()
    for pixels in shuffled:
        np.random.default_rng(0).shuffle(pixels)
    wrong = {"shuffled pixels": shuffled.reshape(images.shape), "blank": np.full_like(images, 128)}
    for what, arrays in wrong.items():
        res, _ = result(MicroFID, judge_file, as_generated(tmp_path, prompts.COCO_SET, arrays, rows=rows))
        assert res.values["fid"] > 3 * floor, what
        assert res.values["kid"] > true.values["kid"] + abs(true.values["kid"]), what
    assert [c.header for c in true.columns] == ["Micro-FID ↓", "Micro-KID ↓"]


# ---------------------------------------------------------------- streaming, merging, errors


@pytest.mark.parametrize("cls", [MicroJudge, MicroFID])
def test_merge_of_halves_equals_all_at_once(tmp_path, judge_file, heldout, cls):
    rows, images = coco(40, start=10)
    gen = as_generated(tmp_path, prompts.COCO_SET, images, rows=rows)
    if cls is MicroJudge:       # sets of two tasks in one run: each image carries its own set
        gen += as_generated(tmp_path, "micro_nudity_erased", renders(heldout, "colour", "red", 10), ["red"] * 10)
        gen += as_generated(tmp_path, "micro_celebrity_remained", renders(heldout, "character", "Taloo", 6),
                            ["Taloo"] * 6)
    whole, details = result(cls, judge_file, gen)
    halves = [cls(judge=str(judge_file), device="cpu") for _ in range(2)]
    halves[0].update(gen[1::2])
    halves[1].update(gen[0::2])
    halves[0].merge(halves[1])
    merged = halves[0].compute()
    assert merged.n == whole.n == len(gen)
    assert merged.values.keys() == whole.values.keys()
    for k, v in whole.values.items():
        assert merged.values[k] == pytest.approx(v, rel=1e-9, abs=1e-9), k
    replay = cls(judge=str(judge_file), device="cpu")          # a resumed run replays stored details
    replay.accumulate(json.loads(json.dumps(details)))
    assert replay.compute().values == whole.values
    assert whole.info["judge_sha256"] and whole.info["judge_classes"]["colour"] == list(judges.CLASSES["colour"])
    if cls is MicroJudge:
        assert {"micro_nudity_erased_rate", "micro_celebrity_remained_rate", "rate_e", "acc_r", "h_o",
                "fidelity"} <= whole.values.keys()


def test_missing_judge_names_the_option(tmp_path, monkeypatch):
    assert METRICS.get("micro_judge") is MicroJudge and METRICS.get("micro_fid") is MicroFID
    for cls in (MicroJudge, MicroFID):
        with pytest.raises(ModelLoadError, match=f"metrics.{cls.name}.options.judge"):
            cls(judge=str(tmp_path / "no-judge.safetensors")).check()
    monkeypatch.setattr(shipped, "SHIPPED", tmp_path / "no-model")      # an install without shipped weights
    with pytest.raises(ModelLoadError, match="metrics.micro_judge.options.judge=auto"):
        MicroJudge().check()
