"""The object task (ESD's Imagenette protocol): the object_accuracy metric, one erased model per class from
the CLI, and the table's per-class rows with their mean."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cpebench.cli import main
from cpebench.errors import ConfigError, DataError, ModelLoadError
from cpebench.metrics import GeneratedImage
from cpebench.metrics import object_accuracy as OA
from cpebench.metrics.summary import IMAGENETTE, class_key

REPO = Path(__file__).resolve().parents[1]


def test_imagenette_classes_have_the_imagenet_indices_of_the_protocol():
    # ESD's Table 2 classes and the ILSVRC-2012 indices UnlearnDiffAtk's classifier_.py uses for them
    expected = {"cassette player": 482, "chain saw": 491, "church": 497, "gas pump": 571, "tench": 0,
                "garbage truck": 569, "English springer": 217, "golf ball": 574, "parachute": 701, "French horn": 566}
    assert {c: OA.class_index(c) for c in IMAGENETTE} == expected
    with pytest.raises(DataError, match="'garbage trucks' is not an ImageNet-1k category"):
        OA.class_index("garbage trucks")


def details(cls, correct, n, wrong_pred=1):
    label = OA.class_index(cls)
    return [{"label": label, "class": cls, "top5": [label if i < correct else wrong_pred, 2, 3, 4, 5],
             "top1_imagenette": label} for i in range(n)]


def test_accuracies_are_per_class_and_averaged_over_classes():
    m = OA.ObjectAccuracy(weights="tiny", erased=["church"], device="cpu")
    m.accumulate(details("church", 1, 4) + details("tench", 3, 3) + details("parachute", 1, 2))
    r = m.compute()
    v = r.values
    assert v[class_key("church")] == 25.0 and v[class_key("tench")] == 100.0 and v[class_key("parachute")] == 50.0
    assert v["acc_erased"] == 25.0 and v["acc_erased_n"] == 4
    assert v["acc_others"] == 75.0 and v["acc_others_n"] == 5     # mean of classes (100, 50), not pooled 4/5 = 80
    assert v["acc_mean"] == pytest.approx(175 / 3) and r.n == 9
    assert [c.key for c in r.columns] == ["acc_erased", "acc_others", "acc.church", "acc.tench", "acc.parachute"]
    # a second shard merges into the same numbers
    a, b = OA.ObjectAccuracy(weights="tiny", erased=["church"]), OA.ObjectAccuracy(weights="tiny", erased=["church"])
    a.accumulate(details("church", 1, 4) + details("tench", 3, 3))
    b.accumulate(details("parachute", 1, 2))
    a.merge(b)
    assert a.compute().values == v
    # the 10-way variant reads the restricted argmax instead
    t = OA.ObjectAccuracy(weights="tiny", head="imagenette10")
    t.accumulate(details("church", 1, 4))
    assert t.compute().values["acc_others"] == 100.0 and "acc_erased" not in t.compute().values


def test_options_are_checked():
    with pytest.raises(ConfigError, match="options.classifier"):
        OA.ObjectAccuracy(classifier="vit")
    with pytest.raises(ConfigError, match="options.head"):
        OA.ObjectAccuracy(head="top5")
    with pytest.raises(ConfigError, match="options.erased"):
        OA.ObjectAccuracy(erased="church")
    with pytest.raises(DataError, match="'churches'"):
        OA.ObjectAccuracy(erased=["churches"])


def images(tmp_path, classes):
    out = []
    rng = np.random.default_rng(0)
    for i, c in enumerate(classes):
        p = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(p)
        out.append(GeneratedImage(p, {"key": str(i), "set": "imagenette", "concept": c}))
    return out


def rig(linear: torch.nn.Linear, first: int, second: int) -> None:
    """Logits that ignore the image: ``first`` highest, ``second`` next."""
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.zero_()
        linear.bias[first], linear.bias[second] = 2.0, 1.0


def test_score_labels_images_by_their_class_through_the_classifier(tmp_path):
    m = OA.ObjectAccuracy(weights="tiny", erased=["garbage truck"], device="cpu", batch_size=2)
    model, _ = m.model()
    rig(model.fc, 5, OA.class_index("church"))      # 1000-way: class 5 (not Imagenette); 10-way: church
    ims = images(tmp_path, ["garbage truck", "church", "church"])
    d = m.update(ims)
    assert [x["label"] for x in d] == [569, 497, 497] and all(x["top5"][:2] == [5, 497] for x in d)
    assert all(x["top1_imagenette"] == 497 for x in d)
    assert m.compute().values["acc_others"] == 0.0
    ten = OA.ObjectAccuracy(weights="tiny", head="imagenette10", erased=["garbage truck"])
    ten.accumulate(d)
    v = ten.compute().values
    assert v["acc_erased"] == 0.0 and v["acc_others"] == 100.0
    with pytest.raises(DataError, match="no class"):
        m.score([GeneratedImage(ims[0].path, {"key": "x", "set": "s"})])


def test_torchvision_weights_file_and_hf_folder_load(tmp_path):
    from torchvision.models import resnet50

    path = tmp_path / "resnet50-random.pth"
    torch.manual_seed(0)
    torch.save(resnet50().state_dict(), path)
    m = OA.ObjectAccuracy(weights=str(path), device="cpu")
    m.check()
    card = m.protocol()
    assert card["file"] == path.name and len(card["sha256"]) == 64 and card["weights"] == "ResNet50_Weights.IMAGENET1K_V2"
    torch.save(OA.tiny_torchvision_resnet().state_dict(), tmp_path / "tiny.pth")
    with pytest.raises(ModelLoadError, match="not a torchvision ResNet-50 state dict"):
        OA.ObjectAccuracy(weights=str(tmp_path / "tiny.pth")).check()
    with pytest.raises(ModelLoadError, match="does not exist"):
        OA.ObjectAccuracy(weights=str(tmp_path / "missing.pth")).check()

    folder = OA.save_tiny_hf_resnet(tmp_path / "hf")
    h = OA.ObjectAccuracy(classifier="hf", weights=str(folder), erased=["tench"], device="cpu")
    model, _ = h.model()
    rig(model.model.classifier[-1], OA.class_index("tench"), 1)
    h.update(images(tmp_path, ["tench", "church"]))
    v = h.compute().values
    assert v["acc_erased"] == 100.0 and v["acc_others"] == 0.0


def test_auto_weights_offline_without_a_cache_say_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(ModelLoadError, match="offline mode is set; download them once"):
        OA.ObjectAccuracy().check()


def test_objects_task_one_run_per_class_and_the_mean_row(tmp_path, one_thread):
    out = tmp_path / "runs"
    base = ["-q", "run", "--task", "objects", "--preset", "smoke", "--out", str(out), "protocol.steps=2"]
    assert main(base + ["--method", "uce", "--concepts", "garbage truck"]) == 0
    summary = json.loads((out / "uce-objects-garbage_truck-tiny-smoke" / "summary.json").read_text())
    v = summary["metrics"]["object_accuracy"]["values"]
    assert summary["protocol_card"]["method"]["concepts"] == ["garbage truck"]
    assert summary["metrics"]["object_accuracy"]["info"]["erased"] == ["garbage truck"]
    assert v["acc_erased_n"] == 1 and v["acc_others_n"] == 3      # the smoke rows: one image of each of 4 classes
    assert main(base + ["--method", "uce", "--concepts", "garbage truck", "--name", "x"]) == 0
    assert main(base + ["--method", "uce", "--name", "x"]) == 2      # ten runs cannot share one name

    assert main(base + ["--method", "uce"]) == 0                        # one erased model per class
    runs = sorted(p.name for p in out.glob("uce-objects-*-tiny-smoke"))
    assert len(runs) == 10 and "uce-objects-english_springer-tiny-smoke" in runs
    assert main(base + ["--method", "sd"]) == 0                         # the unedited model: one run, none erased
    sd = json.loads((out / "sd-objects-tiny-smoke" / "summary.json").read_text())["metrics"]["object_accuracy"]
    assert sd["info"]["erased"] == [] and sd["values"]["acc_others_n"] == 4

    from cpebench.report import REPORTED_KEYS, build_table, find_summaries, load_reported

    reported = [r for r in load_reported(REPO / "results" / "reported.yaml") if r.task == "objects"]
    table = build_table(find_summaries([out]), "objects", reported)
    labels = [r.method for r in table.rows if r.kind == "reproduced"]
    assert labels[0] == "sd" and labels[1:11] == [f"uce ({c})" for c in sorted(IMAGENETTE, key=str.casefold)]
    assert labels[11] == "uce (mean of 10 runs)"
    others = REPORTED_KEYS["acc_other_classes"].id
    rows = [r for r in table.rows if r.method.startswith("uce (") and "mean" not in r.method]
    mean = table.rows[[r.method for r in table.rows].index("uce (mean of 10 runs)")]
    assert mean.cells[others][0] == pytest.approx(sum(r.cells[others][0] for r in rows) / 10)
    assert mean.cells[others][1] == sum(r.cells[others][1] for r in rows)
    # 6 of the 10 erased classes have no smoke image: no mean of the erased-class column
    assert REPORTED_KEYS["acc_erased_class"].id not in mean.cells
    # ESD's Table 2 sits beside them, its classes in the table's order
    assert [c.label for c in table.columns[2:]] == list(IMAGENETTE)
    assert len([r for r in table.rows if r.kind == "reported"]) == 12
