"""CCE (concept inversion): the token slot is an ordinary word position, only the learned row trains, a
resumed inversion equals an uninterrupted one, and ``cpebench attack --attack cce`` end to end."""

from __future__ import annotations

import json

import pytest
import torch

from attacks import cce as C
from cpebench.cli import main


def test_the_slot_is_an_ordinary_word_position(tiny, one_thread):
    """With v set to a word's own embedding, the marked prompt encodes exactly as the template filled with
    that word (same ops on the same numbers: bit-identical); outside the block the marker is read as
    itself."""
    pipe = tiny.pipe
    word = "dog"
    (wid,) = pipe.tokenizer(word, add_special_tokens=False).input_ids
    v = pipe.text_encoder.get_input_embeddings().weight[wid].detach()
    templates = C.TEMPLATES["object"][:3]
    marked = C.marked_ids(pipe.tokenizer, templates)
    filled = pipe.tokenizer([t.replace(C.SLOT, word) for t in templates], padding="max_length", max_length=77,
                            return_tensors="pt").input_ids
    slot = (marked == pipe.tokenizer.bos_token_id) & (torch.arange(77) > 0)
    assert slot.sum(1).tolist() == [1, 1, 1]
    assert torch.equal(torch.where(slot, wid, marked), filled)           # the marker stands where the word does
    with torch.no_grad():
        want = pipe.text_encoder(filled)[0]
        with C.learned_token(pipe.text_encoder, v, pipe.tokenizer.bos_token_id):
            assert torch.equal(pipe.text_encoder(marked)[0], want)
        assert not torch.equal(pipe.text_encoder(marked)[0], want)      # the hook is gone after the block


def posterior(pipe, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = pipe.unet.config.sample_size
    return torch.randn(n, 4, size, size, generator=g), torch.rand(n, 4, size, size, generator=g) * 0.1


def test_only_the_token_trains_and_a_resumed_inversion_equals_an_uninterrupted_one(tiny, one_thread):
    pipe = tiny.pipe
    s = C.Settings(steps=4, batch_size=2, lr=0.05, prop="object", initializer="dog", save_every=2)
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    grads = [p.requires_grad for p in pipe.unet.parameters()]
    whole = C.invert(pipe, posterior(pipe), s)
    assert all(torch.equal(v, pipe.unet.state_dict()[k]) for k, v in before.items())
    assert [p.requires_grad for p in pipe.unet.parameters()] == grads
    assert not torch.equal(whole.vector, C.initial_vector(pipe, "dog")) and len(whole.losses) == 4

    saved = {}

    def save(inv):
        saved.update(tensors={k: v.clone() for k, v in inv.state().items()}, step=inv.step_done, losses=list(inv.losses))
        if inv.step_done == 2:
            raise KeyboardInterrupt     # killed right after its state was written

    with pytest.raises(KeyboardInterrupt):
        C.invert(pipe, posterior(pipe), s, save=save)
    resumed = C.invert(pipe, posterior(pipe), s,
                       resume=lambda inv: inv.restore(saved["tensors"], saved["step"], saved["losses"]))
    assert torch.equal(resumed.vector, whole.vector) and resumed.losses == whole.losses


def test_cce_attack_end_to_end_and_resume(tmp_path, one_thread, monkeypatch):
    out = tmp_path / "runs"
    args = ["-q", "attack", "--method", "uce", "--task", "nudity", "--preset", "smoke", "--attack", "cce",
            "--steps", "3", "--out", str(out)]
    assert main(args) == 0
    (adir,) = out.glob("uce-nudity-*-attack-cce")
    card = json.loads((adir / "attack.json").read_text())
    assert card["settings"]["steps"] == 3 and card["target"] == {"concept": "nudity", "judge": "nudity"}
    assert card["asr"]["n"] == len(C.TEMPLATES["object"]) and 0 <= card["asr"]["post_asr"] <= 100
    summary = json.loads((adir / "summary.json").read_text())
    assert summary["task"] == "nudity-cce" and summary["metrics"]["cce"]["values"]["asr_post_n"] == card["asr"]["n"]
    assert (adir / "token.safetensors").is_file()
    assert len(list((adir / "images" / "post").glob("*.png"))) == card["asr"]["n"]
    # a rerun finds the finished inversion: no training step again
    steps = []
    real = C.Inversion.step
    monkeypatch.setattr(C.Inversion, "step", lambda self: steps.append(1) or real(self))
    assert main(args) == 0 and steps == []
