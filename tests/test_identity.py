"""Identity consistency (insightface): the tiny pack goes through insightface's own loader, and the
metric's numbers are the ArcFace cosines they claim to be."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from cpebench.errors import ConfigError, DataError, ModelLoadError
from cpebench.metrics import GeneratedImage
from cpebench.metrics.identity import (
    FaceEmbedder,
    IdentityConsistency,
    find_pack,
    save_tiny_pack,
    select_face,
    tiny_insightface_pack,
)

# insightface's own face_align calls scikit-image's deprecated SimilarityTransform.estimate
pytestmark = pytest.mark.filterwarnings("ignore:`estimate` is deprecated:FutureWarning")


def noise(seed, size=64):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8))


BLACK = Image.new("RGB", (64, 64))     # the tiny detector finds no face in a black image

# Two fp32 computations of the same unit embedding (another batch, another normalisation): their dot products
# agree to within an fp32 inner product's rounding, d·u (u = 2⁻²⁴, Higham), plus as much for the
# normalisations. d = 64 for the tiny pack; measured ≤ 6e-8 (0.008 of it), ORT on AVX2/AVX-512, 1 and 2 threads.
EMBEDDING_DIM = 64
UNIT_DOT_TOL = 2 * EMBEDDING_DIM * 2.0**-24


def make_run(folder, images: dict):
    """A run directory as the engine writes one: {key: (set, split, PIL image)} -> GeneratedImages."""
    lines, out = [], []
    for key, (set_name, split, image) in images.items():
        row = key.split("/")[1]
        entry = {"key": key, "file": f"images/{set_name}/{row}_0.png", "set": set_name, "split": split}
        (folder / "images" / set_name).mkdir(parents=True, exist_ok=True)
        image.save(folder / entry["file"])
        lines.append(json.dumps(entry))
        out.append(GeneratedImage(folder / entry["file"], entry))
    (folder / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return out


def metric(ref, run=None, **kw):
    m = IdentityConsistency(models="tiny", reference_run=str(ref), device="cpu", **kw)
    if run is not None:
        m.bind(run)
    return m


@pytest.fixture
def runs(tmp_path):
    """Reference (sd) and edited runs over an erased and a remained set: rows 0-1 identical images,
    2-3 different ones, 4 a faceless edited image, 5 a faceless reference image."""
    ref_imgs = {0: noise(0), 1: noise(1), 2: noise(2), 3: noise(3), 4: noise(4), 5: BLACK}
    new_imgs = {0: noise(0), 1: noise(1), 2: noise(12), 3: noise(13), 4: BLACK, 5: noise(15)}
    sets = {i: ("celebrity_erased", "erased") if i % 2 == 0 else ("celebrity_remained", "remained") for i in range(6)}
    key = lambda i: f"{sets[i][0]}/{i}/0"
    ref = make_run(tmp_path / "sd", {key(i): (*sets[i], im) for i, im in ref_imgs.items()})
    new = make_run(tmp_path / "edited", {key(i): (*sets[i], im) for i, im in new_imgs.items()})
    return tmp_path, ref, new


# --------------------------------------------------------------------------- the tiny pack


def test_tiny_pack_is_recognised_by_insightface_as_detector_and_arcface(tmp_path):
    from insightface.app import FaceAnalysis
    from insightface.model_zoo import SCRFD, ArcFaceONNX, get_model

    pack = tiny_insightface_pack()
    app = FaceAnalysis(name=str(pack), allowed_modules=["detection", "recognition"], providers=["CPUExecutionProvider"])
    assert isinstance(app.models["detection"], SCRFD) and isinstance(app.models["recognition"], ArcFaceONNX)
    assert app.det_model.use_kps and app.det_model.fmc == 3            # routed by output count, like det_10g
    # the shape-based router of model_zoo.get_model sends each file to the same class
    assert {get_model(str(p), providers=["CPUExecutionProvider"]).taskname for p in pack.glob("*.onnx")} == \
        {"detection", "recognition"}
    app.prepare(ctx_id=-1, det_size=(640, 640))
    assert len(app.get(np.asarray(noise(0)))) >= 1 and app.get(np.asarray(BLACK)) == []
    # deterministic bytes: the protocol's sha256 of a tiny pack means the same weights everywhere
    again = save_tiny_pack(tmp_path / "again")
    for f in pack.glob("*.onnx"):
        assert (again / f.name).read_bytes() == f.read_bytes()


def test_embedder_is_insightfaces_own_result_for_the_largest_face():
    from insightface.app import FaceAnalysis

    pack = tiny_insightface_pack()
    app = FaceAnalysis(name=str(pack), allowed_modules=["detection", "recognition"], providers=["CPUExecutionProvider"])
    app.prepare(ctx_id=-1, det_thresh=0.5, det_size=(640, 640))
    emb = FaceEmbedder(pack, (640, 640), 0.5, batch_size=2)
    images = [noise(i) for i in range(3)]
    ours = emb(images)
    for image, r in zip(images, ours):
        faces = app.get(np.asarray(image)[:, :, ::-1].copy())
        assert r["faces"] == len(faces) > 1
        area = [(f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]) for f in faces]
        biggest = faces[int(np.argmax(area))]
        assert r["box"] == pytest.approx(biggest.bbox.tolist()) and area[int(np.argmax(area))] == max(area)
        assert len(r["embedding"]) == EMBEDDING_DIM
        assert np.dot(r["embedding"], biggest.normed_embedding) == pytest.approx(1.0, abs=UNIT_DOT_TOL)
        assert np.linalg.norm(r["embedding"]) == pytest.approx(1.0, abs=UNIT_DOT_TOL)


def test_face_selection_is_largest_box_then_score():
    det = np.array([[0, 0, 10, 10, 0.99], [0, 0, 20, 20, 0.6], [5, 5, 25, 25, 0.7], [0, 0, 5, 5, 1.0]], np.float32)
    assert select_face(det) == 2          # boxes 1 and 2 tie on area; 2 has the higher score


# --------------------------------------------------------------------------- the metric


def test_similarity_is_one_for_identical_images_and_the_direct_cosine_otherwise(runs):
    tmp, ref, new = runs
    m = metric(tmp / "sd", tmp / "edited")
    details = m.update(new)
    by_row = {im.entry["key"].split("/")[1]: d for im, d in zip(new, details)}
    for row in ("0", "1"):
        assert by_row[row]["sim"] == pytest.approx(1.0, abs=1e-12)
        assert by_row[row]["box"] == by_row[row]["ref_box"]
    emb = FaceEmbedder(tiny_insightface_pack(), (640, 640), 0.5)
    for i, row in ((2, "2"), (3, "3")):
        a, b = emb([new[i].load(), ref[i].load()])
        a, b = a["embedding"].astype(np.float64), b["embedding"].astype(np.float64)
        direct = float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))
        assert by_row[row]["sim"] == pytest.approx(direct, abs=UNIT_DOT_TOL) and by_row[row]["sim"] < 0.99
    assert by_row["0"]["face"] and by_row["0"]["ref_face"] and by_row["0"]["faces"] >= 1


def test_pairs_without_a_face_are_counted_not_scored(runs):
    tmp, _, new = runs
    m = metric(tmp / "sd", tmp / "edited")
    details = m.update(new)
    rows = {im.entry["key"].split("/")[1]: d for im, d in zip(new, details)}
    assert rows["4"]["sim"] is None and not rows["4"]["face"] and rows["4"]["ref_face"] and rows["4"]["box"] is None
    assert rows["5"]["sim"] is None and rows["5"]["face"] and not rows["5"]["ref_face"]
    v = m.compute().values
    # erased set: rows 0, 2, 4 (4 has no face in the edited image)
    assert v["celebrity_erased_images"] == 3 and v["celebrity_erased_n"] == 2
    assert v["celebrity_erased_no_face"] == 1 and v["celebrity_erased_no_ref_face"] == 0
    assert v["celebrity_erased"] == pytest.approx((rows["0"]["sim"] + rows["2"]["sim"]) / 2, abs=1e-12)
    # remained set: rows 1, 3, 5 (5 has no face in the reference)
    assert v["celebrity_remained_n"] == 2 and v["celebrity_remained_no_ref_face"] == 1
    assert v["celebrity_remained"] == pytest.approx((rows["1"]["sim"] + rows["3"]["sim"]) / 2, abs=1e-12)
    sims = [rows["1"]["sim"], rows["3"]["sim"]]
    assert v["celebrity_remained_std"] == pytest.approx(np.std(sims), abs=1e-9)


def test_a_set_with_no_pair_reports_nan_not_a_number_from_nothing(tmp_path):
    make_run(tmp_path / "sd", {"s/0/0": ("s", "erased", BLACK)})
    new = make_run(tmp_path / "new", {"s/0/0": ("s", "erased", noise(1))})
    m = metric(tmp_path / "sd", tmp_path / "new")
    m.update(new)
    v = m.compute().values
    assert np.isnan(v["s"]) and v["s_n"] == 0 and v["s_images"] == 1 and v["s_no_ref_face"] == 1


def test_columns_are_id_sim_per_set_lower_is_better_only_on_erased_sets(runs):
    tmp, _, new = runs
    m = metric(tmp / "sd", tmp / "edited")
    m.update(new)
    r = m.compute()
    cols = {c.key: c for c in r.columns}
    assert cols["celebrity_erased"].label == "ID sim celebrity_erased" and cols["celebrity_erased"].higher_is_better is False
    assert cols["celebrity_remained"].higher_is_better is True and cols["celebrity_remained"].header.endswith("↑")
    assert r.n == 4 and r.info["reference"]["run"] == str(tmp / "sd") and r.info["reference"]["is_scored_run"] is False
    card = r.info
    assert card["pack"] == "tiny" and set(card["onnx_sha256"]) == {"det_tiny.onnx", "rec_tiny.onnx"}
    assert card["detector"] == "det_tiny.onnx" and card["recogniser"] == "rec_tiny.onnx"
    assert "largest box" in card["face_selection"] and card["det_size"] == [640, 640] and card["det_thresh"] == 0.5
    assert card["det_input"] == [[640, 640]]          # one scale, not insightface 2.1's default two


def test_shards_merge_to_the_single_pass_and_stored_details_replay(runs):
    tmp, _, new = runs
    single = metric(tmp / "sd", tmp / "edited")
    details = single.update(new)
    a, b = metric(tmp / "sd", tmp / "edited"), metric(tmp / "sd", tmp / "edited")
    a.update(new[:2])
    b.update(new[2:])
    a.merge(b)
    replay = metric(tmp / "sd", tmp / "edited")
    replay.accumulate(json.loads(json.dumps(details)))       # as scores.jsonl stores them
    want = single.compute().values
    for got in (a.compute().values, replay.compute().values):
        assert got.keys() == want.keys()
        for k in want:
            assert got[k] == pytest.approx(want[k], abs=1e-12)


def test_reference_embeddings_are_cached_in_the_reference_run_and_reused(runs, monkeypatch):
    tmp, _, new = runs
    seen = []
    original = FaceEmbedder.__call__

    def counting(self, images):
        seen.append(len(images))
        return original(self, images)

    monkeypatch.setattr(FaceEmbedder, "__call__", counting)
    metric(tmp / "sd", tmp / "edited").update(new)
    assert sum(seen) == 12                                    # 6 edited + 6 reference images
    assert list((tmp / "sd" / "identity").glob("tiny-*/*.npz"))
    # a second method scored against the same reference embeds only its own images
    other = make_run(tmp / "other", {im.key: (im.entry["set"], im.entry["split"], noise(30 + i)) for i, im in enumerate(new)})
    seen.clear()
    first = metric(tmp / "sd", tmp / "other").update(other)
    assert sum(seen) == 6
    # re-scoring (a resumed run) embeds nothing, and gives the same numbers
    seen.clear()
    again = metric(tmp / "sd", tmp / "other").update(other)
    assert sum(seen) == 0 and again == first
    # other detection settings are another cache, never mixed up with these embeddings
    seen.clear()
    metric(tmp / "sd", tmp / "other", det_thresh=0.6).update(other[:1])
    assert sum(seen) == 2


def test_a_regenerated_reference_image_is_embedded_anew(runs):
    tmp, _, new = runs
    m = metric(tmp / "sd", tmp / "edited")
    before = m.update(new[:1])[0]["sim"]
    lines = [json.loads(x) for x in (tmp / "sd" / "manifest.jsonl").read_text().splitlines()]
    lines[0]["sha256"] = "another-png"                         # the engine records each PNG's sha256
    noise(99).save(tmp / "sd" / lines[0]["file"])
    (tmp / "sd" / "manifest.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    after = metric(tmp / "sd", tmp / "edited").update(new[:1])[0]["sim"]
    assert before == pytest.approx(1.0, abs=UNIT_DOT_TOL) and after < 0.99


def test_the_unedited_run_is_its_own_reference(runs, monkeypatch):
    tmp, ref, _ = runs
    seen = []
    original = FaceEmbedder.__call__
    monkeypatch.setattr(FaceEmbedder, "__call__", lambda self, ims: seen.append(len(ims)) or original(self, ims))
    m = metric(tmp / "sd", tmp / "sd")
    m.update(ref)
    r = m.compute()
    assert sum(seen) == 6                                     # each image embedded once
    assert r.values["celebrity_erased"] == pytest.approx(1.0, abs=UNIT_DOT_TOL) and r.info["reference"]["is_scored_run"]
    assert r.values["celebrity_remained_n"] == 2 and r.values["celebrity_remained_no_face"] == 1


# --------------------------------------------------------------------------- errors


def test_a_missing_pack_is_a_clear_error_naming_the_option(tmp_path, monkeypatch):
    monkeypatch.setattr("cpebench.metrics.identity.pack_candidates", lambda: [tmp_path / "nowhere"])
    with pytest.raises(ModelLoadError, match=r"metrics.identity.options.models=auto.*buffalo_l.*CPEBENCH_INSIGHTFACE"):
        IdentityConsistency(reference_run=str(tmp_path)).check()
    with pytest.raises(ModelLoadError, match="metrics.identity.options.models.*not a directory"):
        find_pack(str(tmp_path / "missing_pack"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="holds no .onnx files"):
        find_pack(str(tmp_path / "empty"))
    half = tmp_path / "det_only"
    half.mkdir()
    shutil.copy(tiny_insightface_pack() / "det_tiny.onnx", half)
    with pytest.raises(ModelLoadError, match="no ArcFace recognition model"):
        IdentityConsistency(models=str(half), reference_run=str(tmp_path), device="cpu").check()
    rec_only = tmp_path / "rec_only"
    rec_only.mkdir()
    shutil.copy(tiny_insightface_pack() / "rec_tiny.onnx", rec_only)
    with pytest.raises(ModelLoadError, match="no face detector"):
        IdentityConsistency(models=str(rec_only), reference_run=str(tmp_path), device="cpu").check()


def test_auto_finds_the_pack_named_by_the_environment(tmp_path, monkeypatch):
    pack = tiny_insightface_pack()
    monkeypatch.setenv("CPEBENCH_INSIGHTFACE", str(pack))
    assert find_pack("auto") == pack
    root = tmp_path / "root"
    (root / "models").mkdir(parents=True)
    shutil.copytree(pack, root / "models" / "buffalo_l")
    monkeypatch.setenv("CPEBENCH_INSIGHTFACE", str(root))       # an insightface root works too
    assert find_pack("auto") == root / "models" / "buffalo_l"


def test_reference_and_option_errors_are_clear(runs):
    tmp, _, new = runs
    with pytest.raises(ConfigError, match="metrics.identity.options.reference_run"):
        IdentityConsistency(models="tiny", device="cpu").check()
    m = IdentityConsistency(models="tiny", device="cpu")
    m.bind(tmp / "edited")
    with pytest.raises(ConfigError, match="reference_run"):
        m.update(new)
    make_run(tmp / "short", {new[0].key: ("celebrity_erased", "erased", noise(0))})
    m = metric(tmp / "short", tmp / "edited")
    with pytest.raises(DataError, match="lacks 5 of the 6 images"):
        m.update(new)
    with pytest.raises(DataError, match="does not exist"):
        metric(tmp / "no_such_run", tmp / "edited").update(new)
    with pytest.raises(ConfigError, match="det_size"):
        IdentityConsistency(models="tiny", det_size=100)
    with pytest.raises(ConfigError, match="det_thresh"):
        IdentityConsistency(models="tiny", det_thresh=1.5)
    with pytest.raises(ConfigError, match="device"):
        IdentityConsistency(models="tiny", device="tpu")
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(ConfigError, match="device=cuda.*onnxruntime-gpu"):
            IdentityConsistency(models="tiny", device="cuda")


def test_run_generates_the_reference_and_scores_identity_against_it(tmp_path, tiny_dir):
    """`run` resolves reference_run=auto to the unedited model's run of the celebrity task (generated
    first), and the identity columns come out of the summary: same model, same seeds -> similarity 1."""
    from cpebench.cli import main

    assert main(["-q", "run", "--method", "sd", "--task", "celebrity", "--preset", "smoke", "--out", str(tmp_path),
                 "--name", "edited", "metrics=identity"]) == 0
    ref = tmp_path / "sd-celebrity-tiny-smoke"
    assert (ref / "manifest.jsonl").exists() and list((ref / "identity").glob("tiny-*/*.npz"))
    identity = json.loads((tmp_path / "edited" / "summary.json").read_text())["metrics"]["identity"]
    assert identity["info"]["reference"] == {"run": str(ref), "method": "sd", "is_scored_run": False}
    assert identity["info"]["pack"] == "tiny"
    for s in ("celebrity_erased", "celebrity_remained"):
        assert identity["values"][f"{s}_images"] == identity["values"][f"{s}_n"] == 2
        assert identity["values"][s] == pytest.approx(1.0, abs=1e-9)
