"""The q16 metric (UnlearnDiffAtk's harm judge) and the harm-attacks task."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from cpebench.cli import main
from cpebench.errors import ModelLoadError
from cpebench.metrics import GeneratedImage
from cpebench.metrics import q16 as Q


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_prompts_are_read_as_a_numpy_array_and_nothing_else(tmp_path):
    good = tmp_path / "prompts.p"
    arr = np.arange(8, dtype=np.float16).reshape(2, 4)
    good.write_bytes(pickle.dumps(arr))
    assert np.array_equal(Q.read_prompts(good), arr)
    bad = tmp_path / "evil.p"
    bad.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(ModelLoadError, match="posix.system is not part of a numpy array|nt.system is not part"):
        Q.read_prompts(bad)
    wrong = tmp_path / "wrong.p"
    wrong.write_bytes(pickle.dumps(np.zeros((3, 4), dtype=np.float16)))
    with pytest.raises(ModelLoadError, match="2×D array"):
        Q.read_prompts(wrong)


def images(tmp_path, sets):
    rng = np.random.default_rng(0)
    out = []
    for i, s in enumerate(sets):
        p = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(p)
        out.append(GeneratedImage(p, {"key": str(i), "set": s}))
    return out


def test_an_image_is_flagged_when_the_inappropriate_prompt_is_nearer(tmp_path):
    """flag == argmax over 100·cos(fp16 image embedding, the two prompts) is index 1, recomputed here
    independently from the same CLIP; per set the rate is flagged / n."""
    m = Q.Q16(clip="tiny", prompts="tiny", device="cpu", batch_size=2)
    clip, processor, prompts = m.model()
    ims = images(tmp_path, ["a", "a", "a", "b"])
    details = m.update(ims)
    with torch.no_grad():
        x = processor(images=[im.load() for im in ims], return_tensors="pt").pixel_values
        f = clip.get_image_features(pixel_values=x)
        f = getattr(f, "pooler_output", f).half().float()
        raw = torch.from_numpy(Q.read_prompts(m._prompts_path(f.shape[1])).astype(np.float32))
        cos = torch.nn.functional.normalize(f, dim=1) @ torch.nn.functional.normalize(raw, dim=1).T
    want = (cos[:, 1] > cos[:, 0]).tolist()
    assert [d["flag"] for d in details] == want
    assert all(d["scores"] == pytest.approx((100 * c).tolist(), abs=2e-4) for d, c in zip(details, cos))
    v = m.compute().values
    assert v["asr.a"] == pytest.approx(100 * sum(want[:3]) / 3) and v["asr.a_n"] == 3
    assert v["asr.b"] == 100.0 * want[3] and v["asr.b_n"] == 1
    card = m.protocol()
    assert card["prompts"] == "tiny" and card["is_release"] is False and len(card["prompts_sha256"]) == 64


def test_missing_prompts_say_where_to_get_them(monkeypatch, tmp_path):
    monkeypatch.delenv(Q.ENV_PROMPTS, raising=False)
    with pytest.raises(ModelLoadError, match="Diffusion-MU-Attack.*CPEBENCH_Q16"):
        Q.Q16(clip="tiny").check()
    with pytest.raises(ModelLoadError, match="no such file"):
        Q.Q16(clip="tiny", prompts=str(tmp_path / "nope.p")).check()


def test_harm_attacks_erases_its_own_concept_with_the_nudity_recipe(tmp_path, one_thread):
    """harm-attacks erases 'violence' even for a method whose paper code erases its own nudity list;
    nudity-attacks (the nudity task's concepts) keeps that list."""
    from cpebench.config import resolve_run
    from cpebench.runner import task_concepts

    assert task_concepts(resolve_run("uce", "harm-attacks")) == ["violence"]
    assert task_concepts(resolve_run("uce", "nudity-attacks")) == ["nudity"]
    out = tmp_path / "runs"
    assert main(["-q", "run", "--method", "uce", "--task", "harm-attacks", "--preset", "smoke", "--out", str(out),
                 "protocol.steps=2", "--sets", "unlearndiffatk_violence,erasurebench_horror"]) == 0
    s = json.loads((out / "uce-harm-attacks-tiny-smoke" / "summary.json").read_text())
    assert s["protocol_card"]["method"]["concepts"] == ["violence"]
    assert s["protocol_card"]["method"]["concepts_differ_from_paper"] is None
    v = s["metrics"]["q16"]["values"]
    assert v["asr.unlearndiffatk_violence_n"] == 2 and v["asr.erasurebench_horror_n"] == 2


def test_every_harm_set_loads_from_the_real_files(data_env):
    from cpebench.config import resolve_run
    from cpebench.runner import load_records

    cfg = resolve_run("sd", "harm-attacks", flags={"run.data_dir": str(data_env)})
    counts = {name: len(load_records(cfg, name)[0]) for name in cfg.task.prompt_sets}
    assert counts["unlearndiffatk_violence"] == 756 and counts["unlearndiffatk_illegal"] == 727
    assert all(n > 0 for n in counts.values()), counts
