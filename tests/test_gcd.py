"""GCD: the PyTorch MTCNN against a numpy transcription of the TF graphs, detect_face's box helpers,
the first-cluster rule, labels, the accuracy bookkeeping, and score() end to end on tiny resources."""

import copy
import csv
import logging
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view
from PIL import Image

from cpebench.data import sha256_file
from cpebench.errors import DataError, ModelLoadError
from cpebench.metrics import GeneratedImage, gcd
from cpebench.metrics.gcd import GCD
from cpebench.metrics.summary import h_o

# ---------------------------------------------------------------- the TF graphs of network.py, by hand

SHAPES = {
    "pnet": {"conv1": (3, 3, 3, 10), "PReLU1": (10,), "conv2": (3, 3, 10, 16), "PReLU2": (16,),
             "conv3": (3, 3, 16, 32), "PReLU3": (32,), "conv4-1": (1, 1, 32, 2), "conv4-2": (1, 1, 32, 4)},
    "rnet": {"conv1": (3, 3, 3, 28), "prelu1": (28,), "conv2": (3, 3, 28, 48), "prelu2": (48,),
             "conv3": (2, 2, 48, 64), "prelu3": (64,), "conv4": (576, 128), "prelu4": (128,),
             "conv5-1": (128, 2), "conv5-2": (128, 4)},
    "onet": {"conv1": (3, 3, 3, 32), "prelu1": (32,), "conv2": (3, 3, 32, 64), "prelu2": (64,),
             "conv3": (3, 3, 64, 64), "prelu3": (64,), "conv4": (2, 2, 64, 128), "prelu4": (128,),
             "conv5": (1152, 256), "prelu5": (256,), "conv6-1": (256, 2), "conv6-2": (256, 4), "conv6-3": (256, 10)},
}
GRAPH = {   # trunk ops in order; heads: (name, softmax) in the fetch order of create_mtcnn
    "pnet": ([("conv1",), ("PReLU1",), ("pool", 2, 2, "SAME"), ("conv2",), ("PReLU2",), ("conv3",), ("PReLU3",)],
             [("conv4-2", False), ("conv4-1", True)]),
    "rnet": ([("conv1",), ("prelu1",), ("pool", 3, 2, "SAME"), ("conv2",), ("prelu2",), ("pool", 3, 2, "VALID"),
              ("conv3",), ("prelu3",), ("conv4",), ("prelu4",)], [("conv5-2", False), ("conv5-1", True)]),
    "onet": ([("conv1",), ("prelu1",), ("pool", 3, 2, "SAME"), ("conv2",), ("prelu2",), ("pool", 3, 2, "VALID"),
              ("conv3",), ("prelu3",), ("pool", 2, 2, "SAME"), ("conv4",), ("prelu4",), ("conv5",), ("prelu5",)],
             [("conv6-2", False), ("conv6-3", False), ("conv6-1", True)]),
}


def random_tf_weights(kind, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in SHAPES[kind].items():
        if len(shape) == 1:
            out[name] = {"alpha": rng.uniform(0.05, 0.5, shape).astype(np.float32)}
        else:
            fan_in = int(np.prod(shape[:-1]))
            out[name] = {"weights": rng.normal(0, 1 / math.sqrt(fan_in), shape).astype(np.float32),
                         "biases": rng.normal(0, 0.1, shape[-1:]).astype(np.float32)}
    return out


def np_layer(x, p):
    """VALID stride-1 conv (HWIO), or dense ([in, out], NHWC flattened in H, W, C order), or PReLU."""
    if "alpha" in p:
        return np.maximum(x, 0) + p["alpha"] * np.minimum(x, 0)
    w, b = p["weights"].astype(np.float64), p["biases"]
    if w.ndim == 4:
        patches = sliding_window_view(x, w.shape[:2], axis=(1, 2))      # [N, H', W', C, kh, kw]
        return np.einsum("nhwcij,ijco->nhwo", patches, w) + b
    return x.reshape(len(x), -1) @ w + b


def np_pool(x, k, s, padding):
    if padding == "SAME":
        pads = []
        for n in x.shape[1:3]:
            total = max((-(-n // s) - 1) * s + k - n, 0)
            pads.append((total // 2, total - total // 2))
        x = np.pad(x, [(0, 0), *pads, (0, 0)], constant_values=-np.inf)
    return sliding_window_view(x, (k, k), axis=(1, 2))[:, ::s, ::s].max(axis=(-2, -1))


def np_softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def np_net(kind, w, x):
    """The TF graph on an NHWC input (the net's own frame)."""
    trunk, heads = GRAPH[kind]
    for op in trunk:
        x = np_pool(x, *op[1:]) if op[0] == "pool" else np_layer(x, w[op[0]])
    return [np_softmax(np_layer(x, w[h])) if sm else np_layer(x, w[h]) for h, sm in heads]


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def res():
    return gcd.tiny_gcd_resources()


@pytest.fixture(scope="module")
def metric(res):
    return GCD(resources="tiny", device="cpu", batch_size=4)


@pytest.fixture(scope="module")
def noface_res(res, tmp_path_factory):
    """The tiny resources with P-Net's face logit pushed far down: no candidate can pass 0.6."""
    d = tmp_path_factory.mktemp("gcd-noface")
    for f in gcd.RESOURCE_FILES:
        (d / f).parent.mkdir(parents=True, exist_ok=True)
        (d / f).symlink_to(res / f)
    (d / gcd.DET_FILES["pnet"]).unlink()
    w = gcd.read_npy_dict(res / gcd.DET_FILES["pnet"])
    w["conv4-1"]["biases"] = np.array([10.0, -10.0], np.float32)
    np.save(d / gcd.DET_FILES["pnet"], w, allow_pickle=True)
    return d


def png(d, name, size, seed):
    path = d / f"{name}.png"
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)).save(path)
    return path


def image(path, key, concept, split="erased"):
    return GeneratedImage(path, {"key": key, "prompt": f"A portrait of {concept}", "set": f"celebrity_{split}",
                                 "split": split, "concept": concept})


# ---------------------------------------------------------------- MTCNN weights and layout


def test_tf_layout_is_the_one_of_network_py():
    for kind, shapes in SHAPES.items():
        layout = gcd.MTCNNNet(kind).tf_layout()
        got = {name: p.get("weights", p.get("alpha")) for name, p in layout.items()}
        assert got == shapes, kind
        assert all(set(p) == ({"alpha"} if len(shapes[n]) == 1 else {"weights", "biases"}) for n, p in layout.items())


@pytest.mark.parametrize("kind,size", [("pnet", (13, 17)), ("rnet", (24, 24)), ("onet", (48, 48))])
def test_torch_nets_equal_the_tf_graph_in_numpy(kind, size, tmp_path):
    w = random_tf_weights(kind)
    path = tmp_path / f"{kind}.npy"
    np.save(path, w, allow_pickle=True)                   # the official file format: a pickled dict
    net = gcd.load_mtcnn_net(path, kind).double()          # both in float64: only the summation order differs
    x = np.random.default_rng(1).normal(0, 1, (2, *size, 3))
    with torch.no_grad():
        got = [t.numpy() for t in net(torch.from_numpy(x).permute(0, 3, 1, 2))]
    want = np_net(kind, w, x)
    assert len(got) == len(want)
    for g, e in zip(got, want):
        g = np.moveaxis(g, 1, -1) if g.ndim == 4 else g      # NCHW -> NHWC
        assert g.shape == e.shape
        # float64 eps × the few-hundred-term sums of these small nets: measured ≤ 3e-15 of the output's scale
        np.testing.assert_allclose(g, e, rtol=0, atol=1e-10 * np.abs(e).max())
    assert np.ptp(want[0]) > 0.1 and np.ptp(want[-1][..., 1]) > 1e-3   # outputs vary far beyond the tolerance


def test_detector_feeds_transposed_images_like_caffe(res):
    det = gcd.MTCNN(res)
    w = gcd.read_npy_dict(res / gcd.DET_FILES["pnet"])
    img = np.random.default_rng(2).normal(0, 1, (1, 15, 21, 3))
    reg, prob = det.run("pnet", img)
    want_reg, want_prob = (np.transpose(o, (0, 2, 1, 3)) for o in np_net("pnet", w, np.transpose(img, (0, 2, 1, 3))))
    assert reg.shape == (1, 3, 6, 4) and prob.shape == (1, 3, 6, 2)   # image order: [N, H', W', C]
    # run() is fp32; its floor: the net's own fp32 distance from float64 on the transposed input (measured: the
    # whole difference from the float64 reference, on AVX2/AVX-512, forced and not, 1 and 2 threads); margin 4x
    x = torch.from_numpy(img).permute(0, 3, 2, 1)
    with torch.no_grad():
        pairs = zip(det.nets["pnet"](x.float()), copy.deepcopy(det.nets["pnet"]).double()(x))
        floor = max(float((a.double() - b).abs().max()) for a, b in pairs)
    np.testing.assert_allclose(reg, want_reg, rtol=0, atol=4 * floor)
    np.testing.assert_allclose(prob, want_prob, rtol=0, atol=4 * floor)


def test_loader_rejects_missing_extra_and_misshaped_tensors(tmp_path):
    def load(w):
        np.save(tmp_path / "det2.npy", w, allow_pickle=True)
        return gcd.load_mtcnn_net(tmp_path / "det2.npy", "rnet")

    load(random_tf_weights("rnet"))
    w = random_tf_weights("rnet")
    del w["conv4"]["biases"]
    with pytest.raises(ModelLoadError, match=r"det2\.npy.*missing conv4/biases"):
        load(w)
    w = random_tf_weights("rnet")
    w["conv9"] = {"weights": np.zeros(3)}
    w["prelu1"]["beta"] = np.zeros(28)
    with pytest.raises(ModelLoadError, match=r"unexpected prelu1/beta, conv9"):
        load(w)
    w = random_tf_weights("rnet")
    w["conv4"]["weights"] = w["conv4"]["weights"].T        # [out, in]: the PyTorch layout is not accepted
    with pytest.raises(ModelLoadError, match=r"conv4/weights: \(128, 576\) \(expected \(576, 128\)\)"):
        load(w)
    with pytest.raises(ModelLoadError, match="ONet|onet"):
        gcd.load_mtcnn_net(tmp_path / "det2.npy", "onet")


def test_npy_reader_loads_non_array_pickles_only_with_a_warning(tmp_path, caplog):
    from collections import OrderedDict

    w = OrderedDict(random_tf_weights("pnet"))
    np.save(tmp_path / "det1.npy", w, allow_pickle=True)
    with caplog.at_level(logging.WARNING):
        got = gcd.read_npy_dict(tmp_path / "det1.npy")
    assert "collections.OrderedDict" in caplog.text and sha256_file(tmp_path / "det1.npy") in caplog.text
    assert list(got) == list(w)
    caplog.clear()
    np.save(tmp_path / "plain.npy", dict(w), allow_pickle=True)
    with caplog.at_level(logging.WARNING):
        gcd.read_npy_dict(tmp_path / "plain.npy")
    assert caplog.text == ""                               # numpy arrays alone need no unrestricted unpickling
    np.save(tmp_path / "array.npy", np.zeros(3))
    with pytest.raises(ModelLoadError, match="array.npy: expected a pickled dict"):
        gcd.read_npy_dict(tmp_path / "array.npy")


# ---------------------------------------------------------------- recogniser checkpoint


def test_recognizer_checkpoint_round_trips_bit_exactly(res, tmp_path):
    path = res / gcd.WEIGHTS_FILE
    saved = torch.load(path, weights_only=True)["model_state"]
    assert not any(k.endswith("num_batches_tracked") for k in saved)    # like the 2018 checkpoint
    assert {"model.stem.0.weight", "model.stem.7.2.bn3.running_var", "model.fc1.weight", "model.fc2.bias",
            "center_loss_criterion.centers"} <= set(saved)
    model = gcd.load_recognizer(path, len(gcd.TINY_LABELS))
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in saved.items())
    assert set(state) - set(saved) == {k for k in state if k.endswith("num_batches_tracked")}
    assert tuple(model.centers.shape) == (len(gcd.TINY_LABELS), 256)

    with pytest.raises(ModelLoadError, match=r"model\.fc2 has shape \(6, 256\).*lists 7 classes"):
        gcd.load_recognizer(path, 7)
    bad = dict(saved)
    bad["model.extra.weight"] = torch.zeros(1)
    del bad["model.fc1.bias"]
    torch.save({"model_state": bad}, tmp_path / "bad.pkl")
    with pytest.raises(ModelLoadError, match=r"bad\.pkl.*missing \['model\.fc1\.bias'\].*unexpected \['model\.extra"):
        gcd.load_recognizer(tmp_path / "bad.pkl", len(gcd.TINY_LABELS))
    torch.save({"state": saved}, tmp_path / "nokey.pkl")
    with pytest.raises(ModelLoadError, match="nokey.pkl: expected a dict with 'model_state'"):
        gcd.load_recognizer(tmp_path / "nokey.pkl", len(gcd.TINY_LABELS))


# ---------------------------------------------------------------- detect_face helpers


def test_pyramid_scales():
    s = gcd.pyramid_scales(64, 80)                          # short side 64 -> 38.4, 27.2, 19.3, 13.7 (>= 12), 9.7 stops
    assert s == pytest.approx([0.6 * 0.709 ** k for k in range(4)], rel=1e-12)
    assert gcd.pyramid_scales(19, 300) == []                # smaller than the minimum face


def test_generate_boxes_orders_cells_by_x_and_maps_them_to_pixels():
    prob = np.zeros((3, 4), np.float32)                      # [H', W'] in image order
    prob[1, 2], prob[2, 0], prob[0, 3] = 0.9, 0.7, 0.5
    reg = np.arange(3 * 4 * 4, dtype=np.float32).reshape(3, 4, 4) / 100
    b = gcd.generate_boxes(prob, reg, 0.5, 0.6)
    # cell (x=0, y=2) first, then (x=2, y=1); corners fix((2*cell + 1)/scale) and fix((2*cell + 12)/scale)
    np.testing.assert_array_equal(b[:, :4], [[2, 10, 24, 32], [10, 6, 32, 28]])
    np.testing.assert_allclose(b[:, 4], [0.7, 0.9], rtol=1e-6)
    np.testing.assert_allclose(b[:, 5:], [reg[2, 0], reg[1, 2]])


def test_generate_boxes_single_cell_reads_the_mirrored_offsets():
    prob = np.zeros((3, 4), np.float32)
    prob[1, 2] = 0.9
    reg = np.random.default_rng(0).normal(size=(3, 4, 4)).astype(np.float32)
    b = gcd.generate_boxes(prob, reg, 1.0, 0.6)
    np.testing.assert_array_equal(b[0, :4], [5, 3, 16, 14])
    np.testing.assert_allclose(b[0, 5:], reg[1, 4 - 1 - 2])   # x mirrored across the map (the original's flipud)
    assert gcd.generate_boxes(prob, reg, 1.0, 0.95).shape == (0, 9)


def test_nms_union_min_and_tie_order():
    boxes = np.array([[0, 0, 9, 9, 0.9],        # area 100
                      [1, 1, 10, 10, 0.8],      # IoU with 0: 81 / 119 = 0.68
                      [20, 20, 29, 29, 0.7],
                      [2, 2, 5, 5, 0.95]])      # inside box 0: IoU 0.16, intersection / min area = 1
    assert gcd.nms(boxes, 0.5).tolist() == [3, 0, 2]
    assert gcd.nms(boxes, 0.7).tolist() == [3, 0, 1, 2]
    assert gcd.nms(boxes, 0.7, "Min").tolist() == [3, 2]           # 0 and 1 both contain 3 entirely
    tie = np.array([[0, 0, 9, 9, 0.5], [0, 0, 9, 9, 0.5]])
    assert gcd.nms(tie, 0.5).tolist() == [1]                        # argsort puts index 1 last: it wins
    assert gcd.nms(np.zeros((0, 5)), 0.5).size == 0


def test_rerec_and_bbreg():
    sq = gcd.rerec(np.array([[0.0, 0.0, 9.0, 19.0, 0.8]]))
    np.testing.assert_allclose(sq, [[-5.0, 0.0, 14.0, 19.0, 0.8]])  # side max(9, 19), centred, no +1
    moved = gcd.bbreg(np.array([[10.0, 20.0, 19.0, 39.0, 0.9]]), np.array([[0.1, -0.05, 0.2, 0.5]], np.float32))
    np.testing.assert_allclose(moved, [[11.0, 19.0, 21.0, 49.0, 0.9]], rtol=1e-6)   # w = 10, h = 20 (+1)


def pad_crop_as_network_py(img, box):
    """detect_face's pad() + tmp[dy-1:edy, dx-1:edx] = img[y-1:ey, x-1:ex], transcribed literally."""
    h, w = img.shape[:2]
    tmpw, tmph = int(box[2] - box[0] + 1), int(box[3] - box[1] + 1)
    dx, dy, edx, edy = 1, 1, tmpw, tmph
    x, y, ex, ey = (int(v) for v in box[:4])
    if ex > w:
        edx, ex = -ex + w + tmpw, w
    if ey > h:
        edy, ey = -ey + h + tmph, h
    if x < 1:
        dx, x = 2 - x, 1
    if y < 1:
        dy, y = 2 - y, 1
    tmp = np.zeros((tmph, tmpw, 3))
    tmp[dy - 1 : edy, dx - 1 : edx, :] = img[y - 1 : ey, x - 1 : ex, :]
    return tmp


def test_crop_padded_equals_the_original_pad_where_the_original_runs():
    img = np.random.default_rng(0).integers(0, 255, (10, 12, 3)).astype(np.uint8)
    boxes = [[3, 4, 8, 9], [-2, -3, 5, 4], [9, 6, 15, 13], [-4, -4, 16, 14], [13, 3, 15, 5], [1, 1, 1, 1]]
    for b in boxes:
        np.testing.assert_array_equal(gcd.crop_padded(img, np.array(b, float)), pad_crop_as_network_py(img, b), str(b))
    assert not gcd.crop_padded(img, np.array([13.0, 3, 15, 5])).any()   # wholly outside: zeros
    assert gcd.crop_padded(img, np.array([5.0, 5, 3, 9])) is None        # negative width: dropped


def test_face_crops_margin_and_resize():
    img = np.random.default_rng(0).integers(0, 255, (50, 64, 3), dtype=np.uint8)
    boxes = np.array([[10.7, 20.2, 30.9, 45.5, 0.99], [70.0, 10.0, 90.0, 30.0, 0.9]])   # the second lies right of the image
    crops, kept = gcd.face_crops(img, boxes)
    # margins int(20.2 * 0.2) = 4, int(25.3 * 0.2) = 5 -> [8.7, 17.7, 32.9, 48] truncated -> img[17:48, 8:32]
    want = np.asarray(Image.fromarray(img[17:48, 8:32]).resize((224, 224), Image.BILINEAR))
    assert kept == [0] and crops.shape == (1, 224, 224, 3)
    np.testing.assert_array_equal(crops[0], want)


# ---------------------------------------------------------------- labels and clusters


def test_labels_sorted_by_name_and_normalised(tmp_path):
    path = tmp_path / "labels.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([["Labels", "Index"], ["b_lower_[m.1]", 0], ["Zed_[m.2]", 1],
                                 ["Adam_Driver_[m.0hcgs_k]", 16], ["Some_Band_[g.11b6]", 2], ["Drake", 3]])
    labels = gcd.read_labels(path)
    assert labels == ["Adam_Driver_[m.0hcgs_k]", "Drake", "Some_Band_[g.11b6]", "Zed_[m.2]", "b_lower_[m.1]"]
    assert [gcd.normalise_label(x) for x in labels] == ["Adam Driver", "Drake", "Some Band", "Zed", "b lower"]
    assert gcd.same_person("Adam_Driver_[m.0hcgs_k]", "adam driver") and not gcd.same_person("Drake", "Drake Bell")
    path.write_text("Name,Id\nDrake,3\n")
    with pytest.raises(ModelLoadError, match="header 'Labels,Index'"):
        gcd.read_labels(path)
    path.write_text("Labels,Index\nDrake,3\nOops\n")
    with pytest.raises(ModelLoadError, match=r"labels\.csv:3"):
        gcd.read_labels(path)
    assert gcd.read_labels(Path(gcd.tiny_gcd_resources()) / gcd.LABELS_FILE)[0] == "Aaron_Paul_[m.0f2ygp]"


CENTERS = np.array([[10.0, 0.0], [0.0, 10.0], [-10.0, 0.0]], np.float32)


def test_single_face_is_its_own_cluster():
    p = np.array([[0.1, 0.6, 0.3]], np.float32)
    clusters, how = gcd.cluster_predictions(p, np.array([[0.0, 9.0]], np.float32), CENTERS, top_n=2)
    assert how == "single" and len(clusters) == 1 and clusters[0]["faces"] == [0]
    assert [c for c, _ in clusters[0]["top"]] == [1, 2]
    assert clusters[0]["top"][0][1] == pytest.approx(0.6) and clusters[0]["is_known"] == pytest.approx(0.6)


def test_two_faces_of_one_class_form_one_cluster_with_the_normalised_product():
    p = np.array([[0.5, 0.3, 0.2], [0.6, 0.1, 0.3]], np.float32)
    clusters, how = gcd.cluster_predictions(p, np.array([[9.0, 1.0], [11.0, -1.0]], np.float32), CENTERS)
    assert how.startswith("gmm") and len(clusters) == 1 and clusters[0]["faces"] == [0, 1]
    prod = np.array([0.30, 0.03, 0.06]) / 0.39                        # per class
    assert [c for c, _ in clusters[0]["top"]] == [0, 2, 1]
    assert [v for _, v in clusters[0]["top"]] == pytest.approx(prod[[0, 2, 1]].tolist(), rel=1e-5)


def test_majority_cluster_comes_first():
    p = np.array([[0.2, 0.7, 0.1], [0.8, 0.1, 0.1], [0.3, 0.6, 0.1]], np.float32)
    emb = np.array([[0.5, 9.5], [9.8, 0.3], [-0.4, 10.2]], np.float32)   # faces 0 and 2 sit at class 1's centre
    clusters, how = gcd.cluster_predictions(p, emb, CENTERS)
    assert how.startswith("gmm")
    assert [c["faces"] for c in clusters] == [[0, 2], [1]]
    assert clusters[0]["top"][0][0] == 1 and clusters[1]["top"][0][0] == 0
    assert clusters[0]["top"][0][1] == pytest.approx(0.42 / (0.06 + 0.42 + 0.01), rel=1e-5)


def test_gmm_failure_falls_back_to_grouping_by_class(monkeypatch):
    from sklearn.mixture import GaussianMixture

    def fail(self, X, y=None):
        raise ValueError("ill-defined empirical covariance")

    monkeypatch.setattr(GaussianMixture, "fit", fail)
    p = np.array([[0.2, 0.7, 0.1], [0.8, 0.1, 0.1], [0.3, 0.6, 0.1]], np.float32)
    clusters, how = gcd.cluster_predictions(p, np.zeros((3, 2), np.float32), CENTERS)
    assert how == "by-class" and [c["faces"] for c in clusters] == [[0, 2], [1]]


def test_a_cluster_whose_product_underflows_is_dropped():
    p = np.array([[1e-30, 1e-30, 1e-30], [1e-30, 1e-30, 1e-30]], np.float32)
    clusters, how = gcd.cluster_predictions(p, np.array([[9.0, 1.0], [11.0, -1.0]], np.float32), CENTERS)
    assert clusters == [] and how.startswith("gmm")


# ---------------------------------------------------------------- accuracy bookkeeping


def detail(set_name, split, correct=None, concept="Adam Driver", known=True):
    no_face = correct is None
    return {"set": set_name, "split": split, "concept": concept, "gt_in_labels": known, "faces": [] if no_face else [{}],
            "no_face": no_face, "correct": correct, "prediction": None}


ERASED = [detail("celebrity_erased", "erased", c) for c in (True, True, False, None)]
REMAINED = [detail("celebrity_remained", "remained", c) for c in (True, False, False, False, None, None)]


def test_accuracy_excludes_face_less_images_and_strict_counts_them_wrong():
    m = GCD(resources="tiny")
    m.accumulate(ERASED + REMAINED)
    v = m.compute().values
    assert v["acc_e"] == pytest.approx(200 / 3) and v["strict_acc_e"] == pytest.approx(50.0)
    assert v["acc_r"] == pytest.approx(25.0) and v["strict_acc_r"] == pytest.approx(100 / 6)
    assert (v["no_face_e"], v["no_face_r"], v["n_e"], v["n_r"]) == (1, 2, 4, 6)
    assert v["celebrity_erased_n_with_face"] == 3 and v["celebrity_remained_n_with_face"] == 4
    assert v["h_o"] == pytest.approx(5000 / 175)        # 2·(100/3)·25 / (100/3 + 25)
    # the n a table prints next to each value is its denominator: face-detected images for Acc
    assert (v["acc_e_n"], v["acc_r_n"], v["h_o_n"], v["no_face_e_n"]) == (3, 4, 7, 4)
    m.accumulate([detail("celebrity_erased", "erased", None)])
    v2 = m.compute().values
    assert v2["acc_e"] == v["acc_e"] and v2["strict_acc_e"] == pytest.approx(40.0) and v2["no_face_e"] == 2


def test_columns_and_unknown_ground_truth():
    m = GCD(resources="tiny")
    m.accumulate(ERASED + REMAINED + [detail("custom", "", True, concept="Nobody", known=False)])
    r = m.compute()
    cols = {c.key: c for c in r.columns}
    assert cols["acc_e"].header == "Acc_e ↓" and cols["acc_r"].header == "Acc_r ↑" and cols["h_o"].header == "H_o ↑"
    assert cols["no_face_e"].higher_is_better is None and cols["custom_acc"].higher_is_better is None
    assert r.values["custom_acc"] == 100.0 and r.n == 11
    assert r.info["ground_truth_not_in_labels"] == ["Nobody"]


def test_h_o_only_with_both_splits_and_nan_without_faces():
    m = GCD(resources="tiny")
    m.accumulate([detail("celebrity_erased", "erased", None)] * 2)
    v = m.compute().values
    assert math.isnan(v["acc_e"]) and v["strict_acc_e"] == 0.0 and v["no_face_e"] == 2
    assert "h_o" not in v and "acc_r" not in v
    assert h_o(0.0, 100.0) == 100.0 and h_o(100.0, 0.0) == 0.0


def test_shard_merge_equals_a_single_pass():
    whole = GCD(resources="tiny")
    whole.accumulate(ERASED + REMAINED)
    a, b = GCD(resources="tiny"), GCD(resources="tiny")
    a.accumulate(ERASED[:1] + REMAINED[3:])
    b.accumulate(ERASED[1:] + REMAINED[:3] + [detail("celebrity_remained", "remained", True, "X", known=False)])
    whole.accumulate([detail("celebrity_remained", "remained", True, "X", known=False)])
    a.merge(b)
    got, want = a.compute(), whole.compute()
    assert got.values.keys() == want.values.keys()
    assert all(got.values[k] == want.values[k] for k in want.values)
    assert got.info["ground_truth_not_in_labels"] == ["X"] and got.n == want.n


# ---------------------------------------------------------------- resources, protocol


def test_protocol_records_the_sha256_of_every_resource(res):
    info = GCD(resources="tiny").protocol()
    assert info["sha256"] == {f: sha256_file(res / f) for f in gcd.RESOURCE_FILES}
    assert info["num_classes"] == len(gcd.TINY_LABELS) and "first face cluster" in info["prediction"]
    assert "no-face images excluded" in info["denominator"]


def test_missing_resources_give_a_clear_error(tmp_path, monkeypatch, res):
    with pytest.raises(ModelLoadError, match=r"nope .*does not exist.*resources\.tar\.gz.*MACE"):
        GCD(resources=str(tmp_path / "nope")).check()
    monkeypatch.setenv("CPEBENCH_GCD", str(tmp_path / "env"))
    with pytest.raises(ModelLoadError, match="CPEBENCH_GCD="):
        GCD(resources="auto").check()
    part = tmp_path / "part"
    shutil.copytree(res / "face_detection", part / "face_detection")
    with pytest.raises(ModelLoadError, match=r"lacks face_recognition/best_model_states\.pkl, face_recognition/labels\.csv"):
        GCD(resources=str(part)).check()
    (tmp_path / "unpacked").mkdir()
    (tmp_path / "unpacked" / "resources").symlink_to(res)      # the folder the tarball was unpacked into
    monkeypatch.setenv("CPEBENCH_GCD", str(tmp_path / "unpacked"))
    assert gcd.find_resources("auto") == tmp_path / "unpacked" / "resources"


# ---------------------------------------------------------------- score() end to end


def test_score_without_faces_excludes_the_images(noface_res, tmp_path):
    m = GCD(resources=str(noface_res), device="cpu")
    ims = [image(png(tmp_path, "a", (48, 40), 0), "a", "Adam Driver"), image(png(tmp_path, "b", (40, 48), 1), "b", "Drake")]
    details = m.update(ims)
    assert [d["no_face"] for d in details] == [True, True] and all(d["faces"] == [] for d in details)
    assert [d["correct"] for d in details] == [None, None] and details[1]["gt_in_labels"] is False
    assert m._recognizer is None                             # no face: the recogniser is never needed
    v = m.compute().values
    assert math.isnan(v["acc_e"]) and v["strict_acc_e"] == 0.0 and v["no_face_e"] == 2


def test_score_recognises_a_detected_face_end_to_end(metric, tmp_path):
    """One face on a 24² image: the detail's top-5 equal the recogniser run by hand on the margin crop."""
    path = png(tmp_path, "one", (24, 24), 3)
    [d] = metric.score([image(path, "one", "Aaron Paul", "remained")])
    assert not d["no_face"] and len(d["faces"]) == 1 and d["clustering"] == "single"
    img = np.asarray(Image.open(path).convert("RGB"))
    [boxes] = metric.detector().detect([img])
    x1, y1, x2, y2 = boxes[0, :4]
    xm, ym = int((x2 - x1) * 0.2), int((y2 - y1) * 0.2)
    bb = [int(max(x1 - xm / 2, 0)), int(max(y1 - ym / 2, 0)), int(min(x2 + xm / 2, 24)), int(min(y2 + ym / 2, 24))]
    crop = np.array(Image.fromarray(img[bb[1] : bb[3], bb[0] : bb[2]]).resize((224, 224), Image.BILINEAR))
    with torch.no_grad():   # a batch of one in NHWC order, as the metric feeds it (the strides pick the kernels)
        logits, _ = metric.recognizer().model(torch.from_numpy(crop[None]).permute(0, 3, 1, 2).float() / 255)
    probs = torch.softmax(logits, 1)[0].numpy()
    order = np.argsort(-probs)[:5]
    assert [n for n, _ in d["top5"]] == [metric.labels[i] for i in order]
    # the same kernels on the same input, then the single face's product renormalised and rounded to 6 decimals
    # as the detail stores it: equal (another input layout alone moves the probabilities by ~5e-7)
    assert [p for _, p in d["top5"]] == [round(float(x), 6) for x in (probs / probs.sum())[order]]
    assert d["prediction"] == gcd.normalise_label(metric.labels[order[0]])
    assert d["correct"] == (d["prediction"].lower() == "aaron paul")


def test_score_with_several_faces_clusters_them(metric, tmp_path):
    [d] = metric.score([image(png(tmp_path, "two", (72, 72), 4), "two", "Adam Driver")])
    assert len(d["faces"]) >= 2 and d["clustering"] in ("gmm", "gmm-float64", "by-class")
    assert sum(d["clusters"]) == len(d["faces"]) and d["clusters"] == sorted(d["clusters"], reverse=True)
    probs = [p for _, p in d["top5"]]
    # stored rounded to 6 decimals: five of them sum to at most 1 + 5 · 5e-7 (+ the fp32 renormalisation's ~1e-7)
    assert len(probs) == 5 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-5
    assert d["prediction"] == gcd.normalise_label(d["top5"][0][0]) and d["correct"] == (d["prediction"] == "Adam Driver")
    assert all(f["class"] in {gcd.normalise_label(n) for n in metric.labels} for f in d["faces"])


def assert_same_boxes(a, b):
    """Up to fp32 rounding: the nets' fp32 outputs (regression offsets times box sizes of a few dozen pixels)
    move a box by about one fp32 ulp of its coordinates. Measured on AVX2/AVX-512, forced and not, 1 and 2
    threads: ≤ 0.5 ulp; bound 16 ulps of the largest coordinate (~1e-4 pixel here)."""
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, rtol=0, atol=16 * float(np.spacing(np.float32(np.abs(b).max()))))


def test_detection_is_batch_invariant(metric):
    rng = np.random.default_rng(6)
    images = [rng.integers(0, 255, s, dtype=np.uint8) for s in [(72, 72, 3), (72, 72, 3), (40, 56, 3)]]
    together = metric.detector().detect(images)          # the two 72² images share P-Net batches
    for img, boxes in zip(images, together):
        [alone] = metric.detector().detect([img])
        assert len(boxes) >= 1
        assert_same_boxes(boxes, alone)
    # R/O-Net run every batch_size candidates (bounded memory): a tiny chunk finds the same faces
    small = gcd.MTCNN(metric.path, batch_size=3)
    for img, boxes in zip(images, together):
        [chunked] = small.detect([img])
        assert_same_boxes(chunked, boxes)


def test_missing_ground_truth_is_an_error(metric, tmp_path):
    im = GeneratedImage(png(tmp_path, "x", (24, 24), 0), {"key": "x", "set": "coco", "split": "coco", "concept": None})
    with pytest.raises(DataError, match="image x .*no concept"):
        metric.score([im])
