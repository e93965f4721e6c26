"""The style_classifier metric (UnlearnDiffAtk's 129-artist judge) and the style-attacks task."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cpebench.cli import main
from cpebench.errors import ConfigError, DataError, ModelLoadError
from cpebench.metrics import GeneratedImage
from cpebench.metrics import style_classifier as SC


def test_artist_names_map_to_the_classifiers_slugs():
    assert SC.artist_slug("Vincent van Gogh") == "vincent-van-gogh"
    assert SC.artist_slug("  Pierre-Auguste Renoir ") == "pierre-auguste-renoir"


def details(set_name, ranks):
    """One detail per image: the artist at ``rank`` (0-based) of the stored labels, or absent (None)."""
    out = []
    for r in ranks:
        top = [f"other-{i}" for i in range(SC.STORED)]
        if r is not None:
            top[r] = "vincent-van-gogh"
        out.append({"set": set_name, "artist": "vincent-van-gogh", "top": top})
    return out


def test_top_k_rates_are_counted_from_the_stored_labels():
    m = SC.StyleClassifier(weights="tiny", top_k=3, device="cpu")
    m.accumulate(details("a", [0, 1, 2, 3, None]) + details("b", [9, None]))
    v = m.compute().values
    assert (v["top1.a"], v["top3.a"], v["top5.a"], v["top10.a"]) == (20.0, 60.0, 80.0, 80.0)
    assert v["asr.a"] == 60.0 and v["asr.a_n"] == 5                 # top_k = 3
    assert (v["top1.b"], v["top10.b"], v["asr.b"]) == (0.0, 50.0, 0.0)
    other = SC.StyleClassifier(weights="tiny", top_k=3)
    other.accumulate(details("a", [0]))
    m.merge(other)
    assert m.compute().values["top1.a"] == pytest.approx(100 * 2 / 6)
    with pytest.raises(ConfigError, match="top_k"):
        SC.StyleClassifier(top_k=11)


def image(tmp_path, i, artist="Vincent van Gogh"):
    p = tmp_path / f"{i}.png"
    Image.fromarray(np.random.default_rng(i).integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(p)
    return GeneratedImage(p, {"key": str(i), "set": "vangogh", "concept": artist})


def test_scores_images_through_the_classifier(tmp_path):
    m = SC.StyleClassifier(weights="tiny", top_k=1, device="cpu", batch_size=2)
    model, _, labels = m.model()
    assert len(labels) == 129 and labels[0] == "Unknown Artist" and labels[22] == "vincent-van-gogh"
    with torch.no_grad():                      # logits that ignore the image: label 5 first, Van Gogh second
        model.classifier.weight.zero_()
        model.classifier.bias.zero_()
        model.classifier.bias[5], model.classifier.bias[22] = 2.0, 1.0
    d = m.update([image(tmp_path, i) for i in range(3)])
    assert all(x["top"][:2] == [labels[5], "vincent-van-gogh"] and len(x["top"]) == SC.STORED for x in d)
    v = m.compute().values
    assert v["asr.vangogh"] == 0.0 and v["top3.vangogh"] == 100.0 and v["asr.vangogh_n"] == 3
    card = m.protocol()
    assert card["weights"] == "tiny" and len(card["sha256"]) == 64 and card["is_release"] is False
    with pytest.raises(DataError, match="'Nobody Known'.*not one of the classifier's labels"):
        m.score([image(tmp_path, 9, "Nobody Known")])


def test_missing_weights_say_where_to_get_them(tmp_path, monkeypatch):
    monkeypatch.delenv(SC.ENV_WEIGHTS, raising=False)
    with pytest.raises(ModelLoadError, match="Artist classifier.*CPEBENCH_STYLE_CLASSIFIER"):
        SC.StyleClassifier().check()
    with pytest.raises(ModelLoadError, match="no config.json"):
        SC.StyleClassifier(weights=str(tmp_path)).check()
    folder = SC.save_tiny_style_classifier(tmp_path / "ckpt")
    monkeypatch.setenv(SC.ENV_WEIGHTS, str(folder))
    m = SC.StyleClassifier()
    m.check()
    assert m.protocol()["weights"] == str(folder)


def test_style_attacks_task_end_to_end(tmp_path, one_thread):
    out = tmp_path / "runs"
    assert main(["-q", "run", "--method", "uce", "--task", "style-attacks", "--preset", "smoke", "--out", str(out),
                 "protocol.steps=2"]) == 0
    s = json.loads((out / "uce-style-attacks-tiny-smoke" / "summary.json").read_text())
    assert s["protocol_card"]["method"]["concepts"] == ["Vincent van Gogh"]
    v = s["metrics"]["style_classifier"]["values"]
    assert v["asr.unlearndiffatk_vangogh_n"] == 2 and 0 <= v["asr.unlearndiffatk_vangogh"] <= 100
