"""Building the micro world's model: a few steps per stage run end to end, two builds give the same
bytes, a build interrupted in either stage resumes to those bytes, and the result loads through
``load_pipeline`` and generates through the Engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cpebench.errors import CpebenchError
from cpebench.microworld import build, judges, world
from cpebench.models import CLIP_VOCAB_SIZE, load_pipeline

# A handful of steps on tiny batches: the real architecture, trained just enough to exercise every path.
RECIPE = build.Recipe(n_train=64, vae_steps=4, unet_steps=4, vae_batch=4, unet_batch=4, checkpoint_every=2,
                      judge_steps=3, judge_n_train=64)


@pytest.fixture(autouse=True)
def _one_thread():
    """Bytes are compared between builds, so every build runs on the same number of threads."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    return build.build(tmp_path_factory.mktemp("a") / "micro", RECIPE, progress=False)


def _files(folder: Path) -> dict[str, bytes]:
    """Every file's bytes, except the record's timings (wall-clock seconds differ between builds)."""
    out = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    record = json.loads(out.pop(build.RECIPE_FILE))
    for stage in record["stages"].values():
        stage.pop("seconds")
    record.pop("render_seconds")
    out[build.RECIPE_FILE] = json.dumps(record, sort_keys=True).encode()
    return out


def test_two_builds_give_the_same_bytes(built, tmp_path):
    again = build.build(tmp_path / "micro", RECIPE, progress=False)
    assert _files(again) == _files(built)
    assert not (tmp_path / ".micro.build").exists()      # the training state is removed when done


def test_interrupted_build_resumes_to_the_same_bytes(built, tmp_path):
    out = tmp_path / "micro"
    stops = {("vae", 3), ("unet", 3)}    # one step past a checkpoint: that step is lost and redone

    def kill(stage, done):
        if (stage, done) in stops:
            stops.discard((stage, done))
            raise KeyboardInterrupt

    for _ in range(2):
        with pytest.raises(KeyboardInterrupt):
            build.build(out, RECIPE, progress=False, on_step=kill)
        assert not out.exists() and (tmp_path / ".micro.build" / "state.pt").exists()
    with pytest.raises(CpebenchError, match="another recipe"):
        build.build(out, build.Recipe(**{**RECIPE.__dict__, "unet_steps": 5}), progress=False)
    build.build(out, RECIPE, progress=False)
    assert _files(out) == _files(built)


def test_loads_and_generates_through_the_engine(built):
    loaded = load_pipeline(str(built))
    pipe = loaded.pipe
    record = json.loads((built / build.RECIPE_FILE).read_text())
    assert len(pipe.tokenizer) == CLIP_VOCAB_SIZE
    assert type(pipe.scheduler).__name__ == "DDIMScheduler" and pipe.scheduler.config.clip_sample is False
    assert pipe.vae.config.scaling_factor == record["scaling_factor"]
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size == RECIPE.text_width
    acc = build.evaluate(loaded, 4, judge=judges.Judge(), steps=2, batch_size=4)
    assert acc["n"] == 4 and {"colour", "shape"} <= set(acc)
    assert all(0 <= v <= 1 for k, v in acc.items() if k != "n")


class _Reader:
    """A stand-in judge that reads the labels back, with one kind read wrong."""

    def __init__(self, labels, wrong: str):
        self.out = {k: [lab[k] or judges.NONE for lab in labels] for k in judges.CLASSES}
        self.out[wrong] = ["?"] * len(labels)

    def predict(self, images):
        return self.out


def test_score_counts_only_what_the_prompt_states():
    images, captions, labels = world.batch("heldout", 40)
    acc = build.score(_Reader(labels, "colour"), images, captions, labels)
    assert acc["colour"] == 0 and acc["shape"] == 1 and acc["n"] == 40
    # backgrounds are scored only where the caption names one
    assert "background" in acc and acc["background"] == 1
    named = [c for c, lab in zip(captions, labels) if lab["background"] in c.split()]
    assert 0 < len(named) < len(captions)


def test_refuses_a_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CpebenchError, match="not a micro-world model"):
        build.build(tmp_path, RECIPE, progress=False)


@pytest.mark.slow
def test_cli_builds(tmp_path, capsys):
    from cpebench.cli import main

    out = tmp_path / "m"
    assert main(["-q", "microworld", "build", "--out", str(out), "--vae-steps", "1", "--unet-steps", "1",
                 "--n-train", "64", "--judge-steps", "1"]) == 0
    assert (out / "model_index.json").exists() and str(out) in capsys.readouterr().out
    assert json.loads((out / build.RECIPE_FILE).read_text())["recipe"]["unet_steps"] == 1

