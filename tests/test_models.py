import json
import shutil
import time

import pytest
import torch

from cpebench.errors import ModelLoadError
from cpebench.models import (CLIP_VOCAB_SIZE, check_tokenizer, clip_tokenizer, cross_attention_names, load_pipeline,
                             resolve_model_dir)


def test_clip_tokenizer_is_the_real_sd_vocabulary():
    tok = clip_tokenizer()
    assert len(tok) == CLIP_VOCAB_SIZE
    ids = tok("a photo of an astronaut").input_ids
    assert ids[0] == 49406 and ids[-1] == 49407
    assert tok.convert_ids_to_tokens(ids[1:-1]) == ["a</w>", "photo</w>", "of</w>", "an</w>", "astronaut</w>"]
    assert tok.pad_token_id == 49407


def test_tiny_pipeline_loads_through_from_pretrained(tiny, tiny_dir):
    assert (tiny_dir / "model_index.json").exists()
    assert len(tiny.pipe.tokenizer) == CLIP_VOCAB_SIZE
    assert len(cross_attention_names(tiny.pipe.unet)) == 16
    assert type(tiny.pipe.scheduler).__name__ == "PNDMScheduler"
    assert tiny.pipe.safety_checker is None
    assert tiny.info["local_path"] == str(tiny_dir)


def test_local_directory_path_is_the_same_model(tiny, tiny_dir):
    again = load_pipeline(str(tiny_dir))
    a, b = tiny.pipe.unet.state_dict(), again.pipe.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert again.revision is None


def test_two_token_tokenizer_is_refused(tiny_dir, tmp_path):
    broken = tmp_path / "model"
    shutil.copytree(tiny_dir, broken)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    (broken / "tokenizer" / "vocab.json").write_text(json.dumps(vocab))
    (broken / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
    (broken / "tokenizer" / "tokenizer.json").unlink(missing_ok=True)  # else the fast file wins
    with pytest.raises(ModelLoadError, match="49408"):
        load_pipeline(str(broken))


def test_check_tokenizer_message_names_source():
    class Two:
        def __len__(self):
            return 2

    with pytest.raises(ModelLoadError, match="from somewhere has 2 tokens"):
        check_tokenizer(Two(), "somewhere")


def test_missing_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_pipeline(str(tmp_path / "nope"))


def test_directory_that_is_not_sd(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "Foo", "unet": ["x", "y"]}))
    with pytest.raises(ModelLoadError, match="not a Stable Diffusion 1.x pipeline"):
        load_pipeline(str(tmp_path))
    (tmp_path / "model_index.json").unlink()
    with pytest.raises(ModelLoadError, match="no model_index.json"):
        load_pipeline(str(tmp_path))


def test_offline_hub_id_fails_fast_with_instructions(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    t = time.time()
    with pytest.raises(ModelLoadError) as e:
        resolve_model_dir("CompVis/stable-diffusion-v1-4")
    assert time.time() - t < 30
    msg = str(e.value)
    assert "CompVis/stable-diffusion-v1-4" in msg and "HF_HUB_OFFLINE" in msg and "--model /path/to" in msg


def test_bad_dtype(tiny_dir):
    with pytest.raises(ModelLoadError, match="dtype 'fp8'"):
        load_pipeline(str(tiny_dir), dtype="fp8")
