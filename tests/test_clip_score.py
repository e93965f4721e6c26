"""CLIP score on a tiny random CLIP saved with save_pretrained and loaded like a hub model."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from cpebench.errors import ModelLoadError
from cpebench.metrics import GeneratedImage
from cpebench.metrics.clip_score import ClipScore, load_clip, tiny_clip_dir


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    out = []
    prompts = ["a photo of a cat", "Image in the style of Claude Monet", "a red car", "an oil painting of a ship",
               " ".join(["a very long caption"] * 40)]          # > 77 tokens: truncated, not skipped
    for i, p in enumerate(prompts):
        path = d / f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(path)
        split = "erased" if i < 2 else "remained"
        out.append(GeneratedImage(path, {"key": f"k{i}", "prompt": p, "set": "art_erased" if i < 2 else "art_remained",
                                         "split": split}))
    return out


def test_score_equals_a_direct_clip_forward(images):
    metric = ClipScore(model="tiny", device="cpu", batch_size=2)
    details = metric.score(images)
    clip, processor, info = load_clip("tiny")
    assert info["id"] == "tiny" and len(processor.tokenizer) == 49408
    with torch.no_grad():
        text = processor.tokenizer([im.entry["prompt"] for im in images], padding=True, truncation=True,
                                   max_length=77, return_tensors="pt")
        pixels = processor.image_processor(images=[im.load() for im in images], return_tensors="pt").pixel_values
        out = clip(input_ids=text.input_ids, attention_mask=text.attention_mask, pixel_values=pixels)
    direct = (out.logits_per_image.diagonal() / clip.logit_scale.exp()).tolist()   # = cos
    assert [d["cos"] for d in details] == pytest.approx(direct, abs=1e-5)
    assert len({round(d["cos"], 6) for d in details}) == len(details)               # a real, image-dependent score


def test_per_set_values_and_h_a_on_hand_made_details():
    m = ClipScore(model="tiny")
    m.accumulate([{"cos": 0.30, "set": "art_erased", "split": "erased"}, {"cos": 0.20, "set": "art_erased", "split": "erased"},
                  {"cos": 0.31, "set": "art_remained", "split": "remained"}, {"cos": 0.29, "set": "coco", "split": "coco"}])
    r = m.compute()
    assert r.values["art_erased"] == pytest.approx(25.0) and r.values["art_erased_std"] == pytest.approx(5.0)
    assert r.values["art_remained"] == pytest.approx(31.0) and r.values["coco"] == pytest.approx(29.0)
    assert r.values["h_a"] == pytest.approx(31.0 - 25.0)
    cols = {c.key: c for c in r.columns}
    assert cols["art_erased"].higher_is_better is False and cols["art_remained"].higher_is_better is True
    assert cols["art_erased"].label.startswith("CS_e") and r.n == 4


def test_floor_at_zero_variant():
    plain, floored = ClipScore(model="tiny"), ClipScore(model="tiny", floor_at_zero=True)
    d = [{"cos": -0.1, "set": "coco", "split": "coco"}, {"cos": 0.3, "set": "coco", "split": "coco"}]
    plain.accumulate(d)
    floored.accumulate(d)
    assert plain.compute().values["coco"] == pytest.approx(10.0)
    assert floored.compute().values["coco"] == pytest.approx(15.0)


def test_shard_merge_equals_a_single_pass(images):
    whole = ClipScore(model="tiny")
    details = whole.update(images)
    a, b = ClipScore(model="tiny"), ClipScore(model="tiny")
    a.accumulate(details[:2])
    b.accumulate(details[2:])
    a.merge(b)
    got, want = a.compute().values, whole.compute().values
    assert got.keys() == want.keys() and all(math.isclose(got[k], want[k], rel_tol=1e-12) for k in want)


def test_missing_model_offline_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelLoadError, match=r"metrics.clip_score.options.model=/path/to/clip-vit-base-patch32"):
        load_clip("openai/clip-vit-base-patch32")


def test_local_directory_loads_through_the_same_path():
    clip, _, info = load_clip(str(tiny_clip_dir()))
    assert info["revision"] is None and clip.config.projection_dim == 16


def test_summary_scores_on_hand_made_values():
    from cpebench.metrics.summary import h_a, h_o

    assert h_o(1.17, 95.17) == pytest.approx(96.97, abs=0.005)      # a (Acc_e, Acc_r, H_o) triple from Hyun1A/GLoCE issue 2
    assert h_o(0.0, 100.0) == 100.0 and h_o(100.0, 0.0) == 0.0 and h_o(50.0, 50.0) == pytest.approx(50.0)
    assert h_o(20.0, 60.0) == pytest.approx(2 * 80 * 60 / 140)
    assert h_a(cs_erased=20.5, cs_remained=29.0) == pytest.approx(8.5)


# --------------------------------------------------------------------------- open_clip backend


def test_open_clip_backend_equals_a_direct_open_clip_computation(tmp_path):
    """``model: open_clip:<config.json>`` + ``pretrained: <weights file>`` loads through open_clip's own
    factory; the metric's cosines equal open_clip's embeddings computed by hand."""
    import json

    import open_clip
    from PIL import Image

    config = {"embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
              "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    cfg_path = tmp_path / "tiny-oc.json"
    cfg_path.write_text(json.dumps(config))
    open_clip.add_model_config(str(cfg_path))
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-oc")
    weights = tmp_path / "tiny-oc.pt"
    torch.save(model.state_dict(), weights)

    metric = ClipScore(model=f"open_clip:{cfg_path}", pretrained=str(weights), device="cpu")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for _ in range(3)]
    prompts = ["a red car", "a portrait of a person " * 30, "a bowl of fruit"]     # the long one is truncated
    got = metric.cosines(images, prompts)

    _, _, preprocess = open_clip.create_model_and_transforms("tiny-oc", pretrained=str(weights))
    with torch.no_grad():
        img = model.eval().encode_image(torch.stack([preprocess(im) for im in images]))
        txt = model.encode_text(open_clip.get_tokenizer("tiny-oc")(prompts))
    want = torch.nn.functional.cosine_similarity(img, txt, dim=-1).tolist()
    assert got == pytest.approx(want, abs=1e-6)
    info = metric.protocol()
    assert info["id"] == "open_clip:tiny-oc" and info["weights_sha256"] and "open_clip" in info["preprocessing"]


def test_open_clip_bad_options_are_clear(tmp_path):
    from cpebench.errors import ConfigError, ModelLoadError

    with pytest.raises(ConfigError, match="pretrained is for open_clip"):
        ClipScore(model="tiny", pretrained="openai")
    with pytest.raises(ModelLoadError, match="not an open_clip model"):
        ClipScore(model="open_clip:No-Such-Arch", device="cpu").cosines([], [])
    with pytest.raises(ModelLoadError, match="does not exist"):
        ClipScore(model=f"open_clip:{tmp_path / 'missing.json'}", device="cpu").cosines([], [])


def test_in_prompt_score_reads_each_images_clean_prompt(images):
    """text: clean_prompt (Six-CD's in-prompt CLIP score) scores an image against its row's clean prompt:
    equal to the plain score of the same image whose prompt is that text; a higher-is-better column."""
    from dataclasses import replace

    from cpebench.errors import ConfigError, DataError

    clean = ["a cat", "a garden", "a car", "a ship", "a caption"]
    tagged = [replace(im, entry={**im.entry, "extras": {"clean_prompt": c}}) for im, c in zip(images, clean)]
    as_prompt = [replace(im, entry={**im.entry, "prompt": c}) for im, c in zip(images, clean)]
    inprompt = ClipScore(model="tiny", device="cpu", text="clean_prompt")
    assert [d["cos"] for d in inprompt.update(tagged)] == [d["cos"] for d in ClipScore(model="tiny").score(as_prompt)]
    cols = inprompt.compute().columns
    assert [c.higher_is_better for c in cols] == [True, True] and "h_a" not in inprompt.compute().values
    with pytest.raises(DataError, match="no clean_prompt"):
        inprompt.score(images[:1])
    with pytest.raises(ConfigError, match="options.text"):
        ClipScore(model="tiny", text="caption")
