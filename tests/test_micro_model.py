"""The shipped micro-world model: small, loaded by ``--model micro`` through the ordinary diffusers path,
with SD-1.x's component types, and it draws what its prompts ask for."""

from __future__ import annotations

import json

import pytest
import torch

from cpebench.microworld import build, judges, shipped, world
from cpebench.models import CLIP_VOCAB_SIZE, MICRO, cross_attention_names, load_pipeline

pytestmark = pytest.mark.skipif(not (shipped.SHIPPED / "model_index.json").is_file(),
                                reason="no shipped micro-world model in this checkout")


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    return load_pipeline(MICRO)


def test_shipped_files_are_small_and_complete():
    files = shipped.files()
    assert sum(p.stat().st_size for p in files) <= 20 * 2**20            # the budget
    names = {p.relative_to(shipped.SHIPPED).as_posix() for p in files}
    assert {"model_index.json", "unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
            "text_encoder/model.safetensors", "scheduler/scheduler_config.json", build.RECIPE_FILE,
            build.JUDGE_FILE} <= names
    assert not any(n.startswith("tokenizer/") for n in names)          # rebuilt from open_clip's wheel


def test_shipped_record_meets_the_quality_goals():
    """The build's own held-out evaluation, recorded with the weights (``--eval 240``), meets the issue's
    goals: attribute and object >= 0.95, character >= 0.9, style >= 0.9."""
    record = json.loads((shipped.SHIPPED / build.RECIPE_FILE).read_text())
    ev = record["evaluation"]
    assert (ev["split"], ev["steps"], ev["guidance"], ev["judge"]) == ("heldout", build.EVAL_STEPS,
                                                                       build.EVAL_GUIDANCE, build.JUDGE_FILE)
    acc = ev["accuracy"]
    assert acc["n"] >= 240
    assert min(acc["colour"], acc["shape"]) >= 0.95 and acc["character"] >= 0.9 and acc["style"] >= 0.9, acc


def test_loads_as_an_sd1x_pipeline(micro):
    pipe = micro.pipe
    assert len(pipe.tokenizer) == CLIP_VOCAB_SIZE and pipe.tokenizer("red").input_ids[0] == 49406
    assert len(cross_attention_names(pipe.unet)) == 16
    assert type(pipe.scheduler).__name__ == "DDIMScheduler" and pipe.scheduler.config.clip_sample is False
    assert all(p.dtype == torch.float32 for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters())
    record = json.loads((shipped.SHIPPED / build.RECIPE_FILE).read_text())
    assert pipe.vae.config.scaling_factor == pytest.approx(record["scaling_factor"], rel=1e-6)
    # the same folder every time: the cache is keyed by the shipped files' hash
    assert load_pipeline(MICRO).local_path == micro.local_path


def test_judge_reads_the_world(micro):
    judge, _ = judges.load(shipped.judge_path())
    images, _, labels = world.batch("heldout", 300)
    acc = judges.accuracy(judge, images, labels)
    assert min(acc[k] for k in judges.CLASSES) >= 0.95, acc


@pytest.mark.slow
def test_draws_what_the_prompt_asks(micro):
    """A held-out sample of 60 prompts: colour, the micro-nudity task's kind, is read right at least
    85 % of the time (the shipped build's figures over 240 prompts are in microworld_build.json)."""
    acc = build.evaluate(micro, 60, judge=shipped.judge_path(), guidance=5.0, batch_size=30)
    assert acc["colour"] >= 0.85, acc


def test_build_evaluates_under_the_micro_protocol():
    from cpebench.config import load_task

    for task in ("micro-nudity", "micro-celebrity", "micro-artist", "micro-objects"):
        p = load_task(task)[0].protocol
        assert (p.model, p.scheduler, p.steps, p.guidance, p.height) == (MICRO, "ddim", build.EVAL_STEPS,
                                                                         build.EVAL_GUIDANCE, world.SIZE)
