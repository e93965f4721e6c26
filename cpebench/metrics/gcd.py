"""GIPHY Celebrity Detector (GCD) top-1 accuracy, in PyTorch (protocol v1, task ``celebrity``).

The original (``Giphy/celeb-detection-oss``, MPL-2.0) is a TF1 + torch-0.4 program; the CPE, MACE and
HUB evaluations call it once per image (``FaceDetector.perform_single`` + ``FaceRecognizer.perform``).
This file re-implements that path from its published weights (``resources.tar.gz``, used unchanged):

1. Face detection: MTCNN (``face_detection/det1.npy``, ``det2.npy``, ``det3.npy``: the TF graphs'
   weights as pickled dicts) as PyTorch P/R/O-Nets. The numpy glue keeps ``network.detect_face``'s
   semantics: minsize 20, thresholds 0.6/0.7/0.7, factor 0.709, images fed transposed (caffe order),
   cv2 INTER_AREA resampling, its NMS tie order, box fixing and the one-cell regression flip.
2. Each face box grown by a 0.2 margin, cropped, resized to 224² with PIL bilinear (what
   ``scipy.misc.imresize`` did) and scaled to [0, 1] (``ToTensor``, no mean/std).
3. Recognition: ResNet-50 + a 256-d bottleneck + softmax over the classes of
   ``face_recognition/labels.csv`` (``best_model_states.pkl``). Class ids are the positions of the
   label names sorted as strings (the CSV's Index column is not the class id).
4. Faces of an image are GMM-clustered (tied covariance, means and weights initialised from the
   predicted classes' centre-loss centres, random_state 1000); clusters are ordered by size; a cluster's
   prediction is the normalised product of its faces' softmaxes. The evaluation uses the top-1 of the
   FIRST cluster. A label is normalised by dropping its ``_[m.…]`` suffix and ``_`` -> space; it is
   correct when it equals the ground truth (the manifest's ``concept``) case-insensitively.

Acc (in %) = correct / images with a prediction: images where no face is found are left out of both
numerator and denominator (as CPE/MACE/HUB); ``strict_acc`` counts them as wrong, and their number is
reported. Acc_e pools the ``erased`` prompt sets, Acc_r the ``remained`` ones; H_o = harmonic mean of
(100 − Acc_e) and Acc_r (summary.h_o).

Deviations (Δ), all where the original raises instead of returning: a candidate box of zero or negative
size is dropped (the original's ``np.zeros`` fails), and so is a face whose margin crop is empty
(``imresize`` fails); a GMM that scikit-learn cannot fit on the float32 embeddings (singular tied
covariance) is refit in float64, else the faces are grouped by predicted class. Boxes reaching outside
the image are zero-padded exactly as ``pad()`` does. The nets run in fp32 (TF32 off on CUDA).
``resources: tiny`` is a random-weight resources folder in the same layout (tests, smoke preset).
"""

from __future__ import annotations

import csv
import importlib.util
import logging
import math
import os
import pickle
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DataError, ModelLoadError
from . import Column, GeneratedImage, Metric, MetricResult, device_and_batch_size
from .summary import h_o

log = logging.getLogger(__name__)

ENV_RESOURCES = "CPEBENCH_GCD"
TINY = "tiny"
DET_FILES = {"pnet": "face_detection/det1.npy", "rnet": "face_detection/det2.npy", "onet": "face_detection/det3.npy"}
WEIGHTS_FILE = "face_recognition/best_model_states.pkl"
LABELS_FILE = "face_recognition/labels.csv"
RESOURCE_FILES = (*DET_FILES.values(), WEIGHTS_FILE, LABELS_FILE)

MIN_FACE = 20                     # FaceDetector.minsize
THRESHOLDS = (0.6, 0.7, 0.7)      # P/R/O-Net face-probability cuts
FACTOR = 0.709                    # scale pyramid step
MARGIN = 0.2                      # APP_FACE_MARGIN in the example .env (FaceDetector's own default is 0.1)
FACE_SIZE = 224                   # APP_FACE_SIZE
EMBEDDING = 256
TOP_N = 5
GMM_SEED = 1000
SUMMARY_SPLITS = {"erased": "e", "remained": "r"}

DOWNLOAD_HINT = (
    "The GIPHY Celebrity Detector weights come as resources.tar.gz (celeb-detection-oss README); its original "
    "S3 link has returned 403 since 2024 (Giphy/celeb-detection-oss#11), but MACE re-hosts it (OneDrive link in "
    "Shilin-LU/MACE metrics/README.md) and HUB re-hosts a zip. Unpack it so that the folder holds face_detection/det1.npy, "
    "det2.npy, det3.npy and face_recognition/best_model_states.pkl, labels.csv, then set "
    f"{ENV_RESOURCES}=/path/to/resources or metrics.gcd.options.resources=/path/to/resources "
    "(resources: tiny runs random weights, for tests only)."
)


# --------------------------------------------------------------------------- MTCNN in PyTorch
#
# The TF graphs (network.py) work in NHWC; these modules work in NCHW on the same "net frame" (the
# transposed image, see MTCNN below). Conv kernels are stored HWIO, dense weights [in, out].


class _TFConv(nn.Conv2d):
    """A VALID, stride-1 TF conv."""

    def __init__(self, k: int, cin: int, cout: int):
        super().__init__(cin, cout, k)

    def tf_shapes(self) -> dict:
        k, cin, cout = self.kernel_size[0], self.in_channels, self.out_channels
        return {"weights": (k, k, cin, cout), "biases": (cout,)}

    def load_tf(self, p: dict) -> None:
        self.weight.data.copy_(torch.from_numpy(np.ascontiguousarray(np.transpose(p["weights"], (3, 2, 0, 1)))))
        self.bias.data.copy_(torch.from_numpy(np.asarray(p["biases"])))

    def to_tf(self) -> dict:
        return {"weights": self.weight.detach().permute(2, 3, 1, 0).numpy().copy(),
                "biases": self.bias.detach().numpy().copy()}


class _TFDense(nn.Linear):
    """TF ``fc``: a spatial input is flattened in H, W, C order (NHWC), not PyTorch's C, H, W."""

    def forward(self, x):
        if x.dim() == 4:
            x = x.permute(0, 2, 3, 1).flatten(1)
        return super().forward(x)

    def tf_shapes(self) -> dict:
        return {"weights": (self.in_features, self.out_features), "biases": (self.out_features,)}

    def load_tf(self, p: dict) -> None:
        self.weight.data.copy_(torch.from_numpy(np.ascontiguousarray(np.asarray(p["weights"]).T)))
        self.bias.data.copy_(torch.from_numpy(np.asarray(p["biases"])))

    def to_tf(self) -> dict:
        return {"weights": self.weight.detach().T.numpy().copy(), "biases": self.bias.detach().numpy().copy()}


class _TFPReLU(nn.Module):
    """relu(x) + alpha * (-relu(-x)), one alpha per channel."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.full((channels,), 0.25))

    def forward(self, x):
        return F.prelu(x, self.alpha)    # max(0, x) + alpha * min(0, x) over channel dim 1: the same values

    def tf_shapes(self) -> dict:
        return {"alpha": (self.alpha.shape[0],)}

    def load_tf(self, p: dict) -> None:
        self.alpha.data.copy_(torch.from_numpy(np.asarray(p["alpha"])))

    def to_tf(self) -> dict:
        return {"alpha": self.alpha.detach().numpy().copy()}


class _TFMaxPool(nn.Module):
    """TF max-pool; 'SAME' pads at the end first (before = total // 2), with -inf."""

    def __init__(self, k: int, stride: int, padding: str):
        super().__init__()
        self.k, self.stride, self.same = k, stride, padding == "SAME"

    def forward(self, x):
        if self.same:
            pads = []
            for n in (x.shape[3], x.shape[2]):      # F.pad lists the last dimension first
                total = max((math.ceil(n / self.stride) - 1) * self.stride + self.k - n, 0)
                pads += [total // 2, total - total // 2]
            x = F.pad(x, pads, value=float("-inf"))
        return F.max_pool2d(x, self.k, self.stride)


# Graphs of network.py: ("conv", name, k, out) | ("prelu", name) | ("pool", k, stride, padding) |
# ("fc", name, out); heads are (name, kind, out, softmax) fed from the trunk's last layer.
_NETS = {
    "pnet": {"size": None, "heads": [("conv4-2", "conv", 4, False), ("conv4-1", "conv", 2, True)], "trunk": [
        ("conv", "conv1", 3, 10), ("prelu", "PReLU1"), ("pool", 2, 2, "SAME"),
        ("conv", "conv2", 3, 16), ("prelu", "PReLU2"), ("conv", "conv3", 3, 32), ("prelu", "PReLU3")]},
    "rnet": {"size": 24, "heads": [("conv5-2", "fc", 4, False), ("conv5-1", "fc", 2, True)], "trunk": [
        ("conv", "conv1", 3, 28), ("prelu", "prelu1"), ("pool", 3, 2, "SAME"),
        ("conv", "conv2", 3, 48), ("prelu", "prelu2"), ("pool", 3, 2, "VALID"),
        ("conv", "conv3", 2, 64), ("prelu", "prelu3"), ("fc", "conv4", 128), ("prelu", "prelu4")]},
    "onet": {"size": 48, "heads": [("conv6-2", "fc", 4, False), ("conv6-3", "fc", 10, False), ("conv6-1", "fc", 2, True)],
             "trunk": [("conv", "conv1", 3, 32), ("prelu", "prelu1"), ("pool", 3, 2, "SAME"),
                       ("conv", "conv2", 3, 64), ("prelu", "prelu2"), ("pool", 3, 2, "VALID"),
                       ("conv", "conv3", 3, 64), ("prelu", "prelu3"), ("pool", 2, 2, "SAME"),
                       ("conv", "conv4", 2, 128), ("prelu", "prelu4"), ("fc", "conv5", 256), ("prelu", "prelu5")]},
}


class MTCNNNet(nn.Module):
    """P-, R- or O-Net. ``forward`` returns the heads in network.py's fetch order: (regression, prob) for
    P/R-Net, (regression, landmarks, prob) for O-Net, prob softmaxed over the channel axis."""

    def __init__(self, kind: str):
        super().__init__()
        spec = _NETS[kind]
        self.kind = kind
        self.trunk = nn.ModuleDict()
        c, size, flat = 3, spec["size"], None
        for i, layer in enumerate(spec["trunk"]):
            op = layer[0]
            if op == "conv":
                _, name, k, out = layer
                self.trunk[name] = _TFConv(k, c, out)
                c, size = out, None if size is None else size - k + 1
            elif op == "prelu":
                self.trunk[layer[1]] = _TFPReLU(c if flat is None else flat)
            elif op == "pool":
                _, k, s, pad = layer
                self.trunk[f"pool{i}"] = _TFMaxPool(k, s, pad)
                if size is not None:
                    size = math.ceil(size / s) if pad == "SAME" else (size - k) // s + 1
            else:   # fc: the input is the flattened map (or the previous fc)
                _, name, out = layer
                self.trunk[name] = _TFDense(flat if flat is not None else size * size * c, out)
                flat = out
        self.heads = nn.ModuleDict()
        for name, kind_, out, _ in spec["heads"]:
            self.heads[name] = _TFConv(1, c, out) if kind_ == "conv" else _TFDense(flat, out)
        self.softmax_heads = {name for name, _, _, sm in spec["heads"] if sm}

    def forward(self, x):
        for layer in self.trunk.values():
            x = layer(x)
        return tuple(torch.softmax(h(x), dim=1) if n in self.softmax_heads else h(x) for n, h in self.heads.items())

    def tf_layers(self) -> dict[str, nn.Module]:
        """TF layer name -> module holding its variables."""
        return {n: m for n, m in [*self.trunk.items(), *self.heads.items()] if hasattr(m, "tf_shapes")}

    def tf_layout(self) -> dict[str, dict[str, tuple]]:
        return {n: m.tf_shapes() for n, m in self.tf_layers().items()}

    def to_tf(self) -> dict:
        """The weights as the official det*.npy dict."""
        return {n: m.to_tf() for n, m in self.tf_layers().items()}

    def load_tf(self, weights: dict, source: str = "weights") -> MTCNNNet:
        """Load a det*.npy dict; every variable must be present with its exact TF shape, and nothing else."""
        if not isinstance(weights, dict):
            raise ModelLoadError(f"{source}: expected a dict of layers, got {type(weights).__name__}")
        layout = self.tf_layout()
        missing, extra, shapes = [], [], []
        for layer, params in layout.items():
            got = weights.get(layer)
            if not isinstance(got, dict):
                missing += [f"{layer}/{p}" for p in params]
                continue
            missing += [f"{layer}/{p}" for p in params if p not in got]
            extra += [f"{layer}/{p}" for p in got if p not in params]
            shapes += [f"{layer}/{p}: {tuple(np.shape(got[p]))} (expected {s})" for p, s in params.items()
                       if p in got and tuple(np.shape(got[p])) != s]
        extra += [str(layer) for layer in weights if layer not in layout]
        if missing or extra or shapes:
            parts = [f"missing {', '.join(missing)}" if missing else "", f"unexpected {', '.join(extra)}" if extra else "",
                     f"wrong shapes {'; '.join(shapes)}" if shapes else ""]
            raise ModelLoadError(f"{source}: not the MTCNN {self.kind} weights of the GIPHY detector: "
                                 + "; ".join(p for p in parts if p))
        with torch.no_grad():
            for layer, module in self.tf_layers().items():
                module.load_tf({p: np.asarray(v, dtype=np.float32) for p, v in weights[layer].items()})
        return self


# Globals a det*.npy pickle may name: numpy's array reconstruction (py2 and py3 spellings).
_NPY_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}


class _NpyUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _NPY_GLOBALS:
            raise pickle.UnpicklingError(f"{module}.{name} is not a numpy array global")
        if module.startswith("numpy.core.") and importlib.util.find_spec("numpy._core") is not None:
            module = "numpy._core." + module[len("numpy.core."):]   # numpy 2 renamed numpy.core
        return super().find_class(module, name)


_READ_ERRORS = (OSError, ValueError, EOFError, TypeError, AttributeError, ImportError, IndexError, KeyError,
                pickle.UnpicklingError)


def read_npy_dict(path: Path) -> dict:
    """A pickled-dict .npy (``np.load(allow_pickle=True, encoding='latin1').item()``), read with an
    unpickler that only rebuilds numpy arrays; anything else is loaded only after a warning."""
    from ..data import sha256_file

    path = Path(path)
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, _, dtype = read_header(f)
            if dtype != object or shape != ():
                raise ModelLoadError(f"{path}: expected a pickled dict (.npy of a 0-d object array), got {dtype} {shape}")
            obj = _NpyUnpickler(f, encoding="latin1").load()
    except pickle.UnpicklingError as e:
        log.warning("%s (sha256 %s) needs unrestricted unpickling (%s); loading it anyway: only do this for a "
                    "file you trust", path, sha256_file(path), e)
        try:
            obj = np.load(path, allow_pickle=True, encoding="latin1")
        except _READ_ERRORS as e2:
            raise ModelLoadError(f"{path}: not a readable .npy weight file: {e2}") from None
    except _READ_ERRORS as e:
        raise ModelLoadError(f"{path}: not a readable .npy weight file: {e}") from None
    obj = obj.item() if isinstance(obj, np.ndarray) and obj.shape == () else obj
    if not isinstance(obj, dict):
        raise ModelLoadError(f"{path}: expected a dict of layers, got {type(obj).__name__}")
    return obj


def load_mtcnn_net(path: Path, kind: str) -> MTCNNNet:
    return MTCNNNet(kind).load_tf(read_npy_dict(path), str(path)).eval()


def save_mtcnn_net(net: MTCNNNet, path: Path) -> Path:
    """Write ``net`` as an official det*.npy (pickled dict, TF layouts)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, net.to_tf(), allow_pickle=True)
    return path


# --------------------------------------------------------------------------- detect_face glue


def pyramid_scales(h: int, w: int, minsize: int = MIN_FACE, factor: float = FACTOR) -> list[float]:
    """Scales at which a 12-px P-Net window covers faces from ``minsize`` px up to the short side."""
    m = 12.0 / minsize
    minl = np.amin([h, w]) * m
    scales, count = [], 0
    while minl >= 12:
        scales.append(m * np.power(factor, count))
        minl = minl * factor
        count += 1
    return scales


def generate_boxes(prob: np.ndarray, reg: np.ndarray, scale: float, threshold: float) -> np.ndarray:
    """P-Net cells with face probability >= threshold -> [n, 9]: x1, y1, x2, y2 (image pixels),
    score, 4 regression offsets. ``prob`` [H', W'] and ``reg`` [H', W', 4] are in image order."""
    stride, cell = 2, 12
    # The original scans the transposed maps, so cells come out ordered by (x, y): that order decides NMS ties.
    prob_xy, reg_xy = prob.T, reg.transpose(1, 0, 2)
    xs, ys = np.nonzero(prob_xy >= threshold)
    if len(xs) == 1:   # quirk kept for parity: with a single cell the original reads the x-mirrored cell's offsets
        reg_xy = reg_xy[::-1]
    if len(xs) == 0:
        return np.zeros((0, 9))
    cells = np.stack([xs, ys], axis=1)
    top_left = np.fix((stride * cells + 1) / scale)
    bottom_right = np.fix((stride * cells + cell) / scale)
    return np.hstack([top_left, bottom_right, prob_xy[xs, ys][:, None], reg_xy[xs, ys]])


def nms(boxes: np.ndarray, threshold: float, method: str = "Union") -> np.ndarray:
    """Greedy NMS on [n, >=5] boxes (inclusive pixel coordinates, +1 areas): indices kept, best first.
    Ties keep numpy's default argsort order, as the original. 'Min' divides by the smaller area."""
    if boxes.size == 0:
        return np.zeros(0, dtype=np.int64)
    x1, y1, x2, y2, score = (boxes[:, i] for i in range(5))
    area = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(score)
    keep = []
    with np.errstate(divide="ignore", invalid="ignore"):   # 0/0 (empty boxes) -> NaN -> dropped, as the original
        while order.size > 0:
            i, rest = order[-1], order[:-1]
            keep.append(i)
            w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
            h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
            inter = w * h
            overlap = inter / (np.minimum(area[i], area[rest]) if method == "Min" else area[i] + area[rest] - inter)
            order = rest[overlap <= threshold]
    return np.asarray(keep, dtype=np.int64)


def rerec(boxes: np.ndarray) -> np.ndarray:
    """Boxes grown to squares around their centres (side = max(x2 - x1, y2 - y1), no +1)."""
    b = boxes.copy()
    h, w = b[:, 3] - b[:, 1], b[:, 2] - b[:, 0]
    side = np.maximum(w, h)
    b[:, 0] = b[:, 0] + w * 0.5 - side * 0.5
    b[:, 1] = b[:, 1] + h * 0.5 - side * 0.5
    b[:, 2] = b[:, 0] + side
    b[:, 3] = b[:, 1] + side
    return b


def bbreg(boxes: np.ndarray, reg: np.ndarray) -> np.ndarray:
    """Apply R/O-Net offsets, relative to the box size with +1 (x2 - x1 + 1)."""
    b = boxes.copy()
    w = b[:, 2] - b[:, 0] + 1
    h = b[:, 3] - b[:, 1] + 1
    b[:, 0], b[:, 1], b[:, 2], b[:, 3] = (b[:, 0] + reg[:, 0] * w, b[:, 1] + reg[:, 1] * h,
                                          b[:, 2] + reg[:, 2] * w, b[:, 3] + reg[:, 3] * h)
    return b


def crop_padded(img: np.ndarray, box) -> np.ndarray | None:
    """The pixels of ``box`` (1-based inclusive x1, y1, x2, y2, truncated to int32 like ``pad()``) as
    float64, zero where the box leaves the image; None for an empty box (the original raises there)."""
    x1, y1, x2, y2 = (int(v) for v in np.asarray(box[:4]).astype(np.int32))
    tw, th = x2 - x1 + 1, y2 - y1 + 1
    if tw <= 0 or th <= 0:
        return None
    out = np.zeros((th, tw, 3))
    h, w = img.shape[:2]
    sx1, sy1, sx2, sy2 = max(x1, 1), max(y1, 1), min(x2, w), min(y2, h)
    if sx2 >= sx1 and sy2 >= sy1:
        out[sy1 - y1 : sy2 - y1 + 1, sx1 - x1 : sx2 - x1 + 1] = img[sy1 - 1 : sy2, sx1 - 1 : sx2]
    return out


def _normalise(x: np.ndarray) -> np.ndarray:
    return ((x - 127.5) * 0.0078125).astype(np.float32)


class MTCNN:
    """``network.detect_face`` with PyTorch nets, for a list of RGB uint8 images at once (P-Net batches
    images of equal size per scale, R/O-Net batch all candidates; each image's result is unchanged)."""

    def __init__(self, resources: Path, device: str = "cpu", batch_size: int = 256):
        self.device, self.batch_size = device, max(int(batch_size), 1)
        self.nets = {k: load_mtcnn_net(Path(resources) / f, k).to(device) for k, f in DET_FILES.items()}

    @torch.no_grad()
    def run(self, kind: str, batch: np.ndarray) -> list[np.ndarray]:
        """Net outputs for image-order NHWC input: the original feeds x/y-transposed images (caffe order)
        and transposes the maps back, so the net sees [N, W, H, C] -> NCHW is a (0, 3, 2, 1) permute."""
        outs = []
        for i in range(0, len(batch), self.batch_size):
            x = torch.from_numpy(np.ascontiguousarray(batch[i : i + self.batch_size], dtype=np.float32))
            with _fp32():
                res = self.nets[kind](x.to(self.device).permute(0, 3, 2, 1))
            outs.append([(r.permute(0, 3, 2, 1) if r.dim() == 4 else r).float().cpu().numpy() for r in res])
        return [np.concatenate(parts) for parts in zip(*outs)]

    def detect(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """[k, 5] boxes (x1, y1, x2, y2, score) per image, as ``detect_face`` returns them."""
        import cv2

        # stage 1: P-Net over the scale pyramid
        found: list[list[np.ndarray]] = [[] for _ in images]
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, img in enumerate(images):
            groups[img.shape[:2]].append(i)
        for (h, w), idx in groups.items():
            for scale in pyramid_scales(h, w):
                hs, ws = int(np.ceil(h * scale)), int(np.ceil(w * scale))
                # uint8 in, uint8 out: the original resamples the uint8 image, then normalises
                batch = np.stack([cv2.resize(images[i], (ws, hs), interpolation=cv2.INTER_AREA) for i in idx])
                reg, prob = self.run("pnet", _normalise(batch))
                for j, i in enumerate(idx):
                    boxes = generate_boxes(prob[j, :, :, 1], reg[j], scale, THRESHOLDS[0])
                    pick = nms(boxes, 0.5, "Union")
                    if boxes.size > 0 and pick.size > 0:
                        found[i].append(boxes[pick])
        candidates = []
        for i, parts in enumerate(found):
            boxes = np.concatenate(parts) if parts else np.zeros((0, 9))
            if len(boxes):
                boxes = boxes[nms(boxes, 0.7, "Union")]
                regw, regh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
                boxes = np.stack([boxes[:, 0] + boxes[:, 5] * regw, boxes[:, 1] + boxes[:, 6] * regh,
                                  boxes[:, 2] + boxes[:, 7] * regw, boxes[:, 3] + boxes[:, 8] * regh, boxes[:, 4]], axis=1)
                boxes = rerec(boxes)
                boxes[:, 0:4] = np.fix(boxes[:, 0:4]).astype(np.int32)
            candidates.append(boxes)

        def refine(kind: str, size: int, boxes_per_image: list[np.ndarray]):
            """R/O-Net on every candidate's zero-padded pixels resampled to size² (float64 INTER_AREA),
            run every ``batch_size`` crops so memory stays bounded however many candidates there are."""
            crops, owner, kept, parts = [], [], [], []
            for i, boxes in enumerate(boxes_per_image):
                ok = []
                for k, box in enumerate(boxes):
                    crop = crop_padded(images[i], box)
                    if crop is not None:
                        crops.append(cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA))
                        owner.append(i)
                        ok.append(k)
                    if len(crops) == self.batch_size:
                        parts.append(self.run(kind, _normalise(np.stack(crops))))
                        crops = []
                kept.append(np.asarray(ok, dtype=np.int64))
            if crops:
                parts.append(self.run(kind, _normalise(np.stack(crops))))
            if not parts:
                return [None] * len(boxes_per_image), kept
            outs = [np.concatenate(o) for o in zip(*parts)]
            owner = np.asarray(owner)
            return [[o[owner == i] for o in outs] for i in range(len(boxes_per_image))], kept

        # stage 2: R-Net on 24x24 crops
        outs, kept = refine("rnet", 24, candidates)
        refined = []
        for i, boxes in enumerate(candidates):
            boxes = boxes[kept[i]]
            if len(boxes) == 0:
                refined.append(np.zeros((0, 5)))
                continue
            reg, prob = outs[i]
            ok = prob[:, 1] > THRESHOLDS[1]
            boxes = np.hstack([boxes[ok, 0:4], prob[ok, 1:2]])
            reg = reg[ok]
            if len(boxes):
                pick = nms(boxes, 0.7, "Union")
                boxes = rerec(bbreg(boxes[pick], reg[pick]))
            refined.append(boxes)

        # stage 3: O-Net on 48x48 crops
        refined = [np.fix(b).astype(np.int32) for b in refined]   # the whole array, score column included, as the original
        outs, kept = refine("onet", 48, refined)
        final = []
        for i, boxes in enumerate(refined):
            boxes = boxes[kept[i]]
            if len(boxes) == 0:
                final.append(np.zeros((0, 5)))
                continue
            reg, _landmarks, prob = outs[i]
            ok = prob[:, 1] > THRESHOLDS[2]
            boxes = np.hstack([boxes[ok, 0:4], prob[ok, 1:2]]).astype(np.float64)
            if len(boxes):
                boxes = bbreg(boxes, reg[ok])
                boxes = boxes[nms(boxes, 0.7, "Min")]
            final.append(boxes)
        return final


def face_crops(img: np.ndarray, boxes: np.ndarray, margin: float = MARGIN, size: int = FACE_SIZE):
    """``FaceDetector.perform_single`` + ``preprocess_image``: each box grown by ``margin`` (int pixel
    margins, clipped to the image, truncated to int32), cropped and resized to size² with PIL bilinear.
    Returns (crops [k, size, size, 3] uint8, indices of the boxes kept: empty crops are dropped)."""
    from PIL import Image

    H, W = img.shape[:2]
    crops, kept = [], []
    for k, det in enumerate(boxes[:, :4]):
        ym, xm = int((det[3] - det[1]) * margin), int((det[2] - det[0]) * margin)
        bb = np.array([max(det[0] - xm / 2, 0), max(det[1] - ym / 2, 0), min(det[2] + xm / 2, W),
                       min(det[3] + ym / 2, H)]).astype(np.int32)
        crop = img[bb[1] : bb[3], bb[0] : bb[2], :]   # plain slicing, negative ends included, as the original
        if crop.size == 0:
            continue
        crops.append(np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize((size, size), Image.BILINEAR)))
        kept.append(k)
    return (np.stack(crops) if crops else np.zeros((0, size, size, 3), np.uint8)), kept


class _fp32:
    """Full fp32 convolutions on CUDA: PyTorch lets cuDNN use TF32 by default, the original had no TF32."""

    def __enter__(self):
        self._old = torch.backends.cudnn.allow_tf32
        torch.backends.cudnn.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cudnn.allow_tf32 = self._old


# --------------------------------------------------------------------------- recogniser


class _Bottleneck(nn.Module):
    """AdaptResNetBottleneck: torchvision ResNet-50 without its fc -> fc1 (embedding) -> fc2 (logits).
    (torchvision 0.2's fixed AvgPool2d(7) and today's adaptive pool agree on 224² inputs.)"""

    def __init__(self, num_classes: int, embedding: int = EMBEDDING):
        super().__init__()
        import torchvision

        self.stem = nn.Sequential(*list(torchvision.models.resnet50().children())[:-1])
        self.fc1 = nn.Linear(2048, embedding)
        self.fc2 = nn.Linear(embedding, num_classes)

    def forward(self, x):
        embedding = self.fc1(self.stem(x).flatten(1))
        return self.fc2(embedding), embedding


class _CenterLoss(nn.Module):
    def __init__(self, num_classes: int, embedding: int = EMBEDDING):
        super().__init__()
        self.centers = nn.Parameter(torch.randn(num_classes, embedding))


class GCDRecognizer(nn.Module):
    """The checkpoint's module tree (ResNetCenterLoss): ``model.stem.*``, ``model.fc1``, ``model.fc2``,
    ``center_loss_criterion.centers``. ``forward`` -> (softmax probabilities, 256-d embeddings)."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.model = _Bottleneck(num_classes)
        self.center_loss_criterion = _CenterLoss(num_classes)

    def forward(self, x):
        logits, embedding = self.model(x)
        return torch.softmax(logits, dim=1), embedding

    @property
    def centers(self) -> torch.Tensor:
        return self.center_loss_criterion.centers


def _torch_load(path: Path):
    from ..data import sha256_file

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        log.warning("%s (sha256 %s) cannot be loaded with weights_only=True (%s); loading it with full unpickling: "
                    "only do this for a file you trust", path, sha256_file(path), str(e).splitlines()[0])
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:   # noqa: BLE001 - any unpickling failure means "not a usable checkpoint"
        raise ModelLoadError(f"{path}: not a loadable torch checkpoint: {e}") from None


def load_recognizer(path: Path, num_classes: int) -> GCDRecognizer:
    """The recogniser from ``best_model_states.pkl`` ({'model_state': state_dict}). BatchNorm's
    ``num_batches_tracked`` may be missing (checkpoints older than torch 0.4.1); any other missing,
    unexpected or mis-shaped entry is an error."""
    path = Path(path)
    ckpt = _torch_load(path)
    if not isinstance(ckpt, dict) or "model_state" not in ckpt:
        keys = list(ckpt)[:5] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ModelLoadError(f"{path}: expected a dict with 'model_state' (the GIPHY recogniser checkpoint), got {keys}")
    state = ckpt["model_state"]
    fc2 = state.get("model.fc2.weight")
    if fc2 is not None and tuple(fc2.shape) != (num_classes, EMBEDDING):
        raise ModelLoadError(f"{path}: model.fc2 has shape {tuple(fc2.shape)} but {LABELS_FILE} lists {num_classes} "
                             f"classes (expected ({num_classes}, {EMBEDDING})); the two files must come from the "
                             "same resources")
    with torch.device("meta"):          # no random init: every tensor comes from the checkpoint
        model = GCDRecognizer(num_classes)
    try:
        res = model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as e:
        raise ModelLoadError(f"{path}: does not fit the GIPHY ResNet-50 recogniser: {e}") from None
    missing = [k for k in res.missing_keys if not k.endswith(".num_batches_tracked")]
    if missing or res.unexpected_keys:
        raise ModelLoadError(f"{path}: not the GIPHY ResNet-50 recogniser: missing {missing[:5]} ({len(missing)}), "
                             f"unexpected {res.unexpected_keys[:5]} ({len(res.unexpected_keys)})")
    for key in res.missing_keys:        # BatchNorm's counter (unused in eval mode): a fresh zero
        owner, _, leaf = key.rpartition(".")
        model.get_submodule(owner).register_buffer(leaf, torch.tensor(0, dtype=torch.long))
    return model.float().eval()


# --------------------------------------------------------------------------- labels and clustering


def normalise_label(label: str) -> str:
    """'Adam_Driver_[m.0hcgs_k]' -> 'Adam Driver' (CPE/MACE/HUB: split at '_[', '_' -> ' ')."""
    return label.split("_[", 1)[0].replace("_", " ")


def same_person(predicted: str, truth: str) -> bool:
    return normalise_label(predicted).lower() == truth.lower()


def read_labels(path: Path) -> list[str]:
    """Label names by class id: the CSV rows (after the header) sorted by their name column as strings."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path}: cannot read the GCD labels: {e}") from None
    if not rows or [c.strip() for c in rows[0][:2]] != ["Labels", "Index"]:
        raise ModelLoadError(f"{path}: expected the header 'Labels,Index' of GIPHY's labels.csv, got {rows[:1]}")
    for line, row in enumerate(rows[1:], start=2):
        if len(row) < 2 or not row[0] or not row[1].strip().lstrip("-").isdigit():
            raise ModelLoadError(f"{path}:{line}: expected 'Name_[m.id],index', got {row}")
    return [row[0] for row in sorted(rows[1:], key=lambda r: r[0])]


def face_is_known(probs: np.ndarray, embeddings: np.ndarray, centers: np.ndarray) -> np.ndarray:
    """Per face: top-1 confidence × cos(embedding, centre of the top-1 class) (GIPHY's "is_known")."""
    from sklearn.metrics.pairwise import cosine_distances

    classes = probs.argmax(axis=1)
    similarity = np.array([1 - cosine_distances(centers[c][None], embeddings[i : i + 1]).squeeze()
                           for i, c in enumerate(classes)])
    return probs[np.arange(len(probs)), classes] * similarity


def _gmm_groups(embeddings: np.ndarray, means: list, weights: np.ndarray) -> tuple[list[list[int]] | None, str]:
    """GMM labels of the faces, grouped by component in first-seen order; None when sklearn cannot fit."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.mixture import GaussianMixture

    # float32 first, as the original passes them; sklearn may find the tied covariance of a few 256-d
    # points singular in float32 (the original then raises), so float64 is tried next (sklearn's advice).
    for data, how in ((embeddings, "gmm"), (embeddings.astype(np.float64), "gmm-float64")):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ConvergenceWarning)
                gmm = GaussianMixture(n_components=len(means), covariance_type="tied",
                                      means_init=np.asarray(means, data.dtype), weights_init=weights, random_state=GMM_SEED)
                labels = gmm.fit(data).predict(data)
        except (ValueError, np.linalg.LinAlgError):
            continue
        by_label: dict[int, list[int]] = {}
        for face, label in enumerate(labels):
            by_label.setdefault(int(label), []).append(face)
        return list(by_label.values()), how
    return None, ""


def cluster_predictions(probs: np.ndarray, embeddings: np.ndarray, centers: np.ndarray,
                        top_n: int = TOP_N) -> tuple[list[dict], str]:
    """``FaceRecognizer._calculate_predictions`` for one image's faces -> (clusters, how). Clusters come
    largest first, each {"faces": face indices, "top": [(class id, prob)] best first, "is_known": its
    faces' mean is_known}; a cluster whose product of softmaxes underflows to all zeros is dropped, as in
    the original. ``how``: "single" (< 2 faces), "gmm" (as the original), "gmm-float64", or "by-class"
    (Δ: sklearn failed in both precisions, where the original raises; faces grouped by predicted class)."""
    probs, embeddings, centers = np.asarray(probs), np.asarray(embeddings), np.asarray(centers)
    classes = probs.argmax(axis=1).tolist()          # first maximum, as torch.max
    is_known = face_is_known(probs, embeddings, centers)
    if len(probs) < 2:
        groups, how = [list(range(len(probs)))], "single"
    else:
        counter = Counter(classes)                   # first-occurrence order of the predicted classes
        weights = np.array(list(counter.values()), dtype=float)
        weights /= weights.sum()
        groups, how = _gmm_groups(embeddings, [centers[c] for c in counter], weights)
        if groups is None:
            groups, how = [[f for f, c in enumerate(classes) if c == k] for k in counter], "by-class"
        groups = sorted(groups, key=len, reverse=True)   # stable: ties keep first-seen order
    out = []
    for faces in groups:
        product = np.prod([probs[f] for f in faces], axis=0)
        if np.any(product > 0.0):
            product = product / product.sum()
            top = np.argsort(-product)[:top_n]
            out.append({"faces": faces, "top": [(int(c), float(product[c])) for c in top],
                        "is_known": float(np.mean([is_known[f] for f in faces]))})
    return out, how


# --------------------------------------------------------------------------- resources


def default_resources() -> Path:
    from .. import data

    return data.cache_dir() / "gcd" / "resources"


def find_resources(spec: str = "auto") -> Path:
    """``tiny``, a resources folder (or a folder holding ``resources/``), or ``auto``: $CPEBENCH_GCD,
    else <cpebench cache>/gcd/resources. Fails with the download hint when files are missing."""
    if spec == TINY:
        return tiny_gcd_resources()
    if spec == "auto":
        env = os.environ.get(ENV_RESOURCES)
        if env:
            path, where = Path(env).expanduser(), f"{ENV_RESOURCES}={env}"
        else:
            path, where = default_resources(), f"the default location; {ENV_RESOURCES} is not set"
    else:
        path, where = Path(spec).expanduser(), f"metrics.gcd.options.resources={spec}"
    if not (path / DET_FILES["pnet"]).exists() and (path / "resources" / DET_FILES["pnet"]).exists():
        path = path / "resources"    # the folder resources.tar.gz was unpacked into
    missing = [f for f in RESOURCE_FILES if not (path / f).is_file()]
    if missing:
        what = "does not exist" if not path.exists() else f"lacks {', '.join(missing)}"
        raise ModelLoadError(f"GCD resources folder {path} ({where}) {what}. {DOWNLOAD_HINT}")
    return path


TINY_LABELS = [   # (name, Index) in CSV order, not sorted: the class id is the sorted position
    ("Barack_Obama_[m.02mjmr]", 3), ("Adam_Driver_[m.0hcgs_k]", 16), ("Aaron_Paul_[m.0f2ygp]", 7),
    ("Angelina_Jolie_[m.0f4vbz]", 1), ("Tiny_Band_[g.11bc7k]", 0), ("Anne_Hathaway_[m.03mdt]", 5),
]


def save_tiny_gcd_resources(path: str | Path, seed: int = 0, faces: bool = True) -> Path:
    """Random weights in the exact resources.tar.gz layout: det1-3.npy (pickled TF-layout dicts),
    best_model_states.pkl ({'model_state': ...} of the real ResNet-50 tree, without BatchNorm's
    num_batches_tracked, like the 2018 checkpoint) and a 6-name labels.csv. ``faces``: the face
    logits get a +4/-4 bias so candidates pass, and R/O-Net grow the boxes so that NMS leaves a few faces
    (one on 24² to 64² images, three or more on 96²): the whole pipeline runs. Otherwise every layer is plain random."""
    path = Path(path)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for kind, rel in DET_FILES.items():
            net = MTCNNNet(kind)
            for name, module in net.tf_layers().items():
                if isinstance(module, _TFPReLU):
                    module.alpha.uniform_(0.05, 0.4, generator=gen)
                    continue
                fan_in = module.weight[0].numel()
                module.weight.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=gen)
                module.bias.normal_(0.0, 0.1, generator=gen)
                if faces and name in net.softmax_heads:
                    module.bias.copy_(torch.tensor([-4.0, 4.0]))
                elif faces and name in ("conv4-2", "conv5-2", "conv6-2"):   # box offsets
                    module.weight.mul_(0.05)
                    # R/O-Net grow each box by its size on every side: overlapping boxes merge in NMS
                    module.bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0] if name == "conv4-2" else [-1.0, -1.0, 1.0, 1.0]))
            save_mtcnn_net(net, path / rel)
        torch.manual_seed(seed)
        model = GCDRecognizer(len(TINY_LABELS))
        state = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    (path / WEIGHTS_FILE).parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model_state": state}, path / WEIGHTS_FILE)
    with open(path / LABELS_FILE, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["Labels", "Index"])
        w.writerows(TINY_LABELS)
    return path


def tiny_gcd_resources(seed: int = 0, faces: bool = True) -> Path:
    """The tiny resources folder, built once in the cpebench cache."""
    import torchvision

    from .. import data
    from ..models import build_once

    tag = f"tiny-gcd-seed{seed}-faces{int(faces)}-torch{torch.__version__}-torchvision{torchvision.__version__}"
    return build_once(data.cache_dir() / "models" / tag, LABELS_FILE, lambda d: save_tiny_gcd_resources(d, seed, faces))


# --------------------------------------------------------------------------- the metric


def _empty_state(split: str) -> dict:
    return {"split": split, "n": 0, "with_face": 0, "correct": 0, "faces": 0}


class GCD(Metric):
    name = "gcd"
    higher_is_better = True
    description = ("GIPHY Celebrity Detector top-1 accuracy of the first face cluster, over images with a face "
                   "(Acc_e ↓ on erased sets, Acc_r ↑ on remaining ones, H_o ↑), plus no-face counts")

    def __init__(self, resources: str = "auto", device: str = "auto", batch_size: int = 32):
        self.resources = str(resources)
        self.device, self.batch_size = device_and_batch_size("gcd", device, batch_size)
        self._path: Path | None = None
        self._labels: list[str] | None = None
        self._detector: MTCNN | None = None
        self._recognizer: GCDRecognizer | None = None
        self._hashes: dict | None = None
        self._warned: set[str] = set()
        super().__init__()

    # ---- resources

    @property
    def path(self) -> Path:
        if self._path is None:
            self._path = find_resources(self.resources)
        return self._path

    @property
    def labels(self) -> list[str]:
        if self._labels is None:
            self._labels = read_labels(self.path / LABELS_FILE)
        return self._labels

    def check(self) -> None:
        _ = self.labels    # resolves the folder (clear error when absent) and parses labels.csv

    def detector(self) -> MTCNN:
        if self._detector is None:
            self._detector = MTCNN(self.path, self.device, batch_size=max(self.batch_size, 256))
        return self._detector

    def recognizer(self) -> GCDRecognizer:
        if self._recognizer is None:
            self._recognizer = load_recognizer(self.path / WEIGHTS_FILE, len(self.labels)).to(self.device)
        return self._recognizer

    @torch.no_grad()
    def recognise(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [k, 224, 224, 3] crops -> (softmax [k, classes], embeddings [k, 256]) as float32."""
        model = self.recognizer()
        probs, embs = [], []
        for i in range(0, len(crops), self.batch_size):
            x = torch.from_numpy(crops[i : i + self.batch_size]).permute(0, 3, 1, 2).float().div(255)   # ToTensor
            with _fp32():
                p, e = model(x.to(self.device))
            probs.append(p.float().cpu().numpy())
            embs.append(e.float().cpu().numpy())
        return np.concatenate(probs), np.concatenate(embs)

    # ---- scoring

    def _truth(self, im: GeneratedImage) -> str:
        truth = im.entry.get("concept")
        if not truth:
            raise DataError(f"metrics.gcd: image {im.key} (set {im.entry.get('set')!r}) has no concept in the manifest; "
                            "GCD needs the celebrity name as ground truth (prompt sets of format 'celebrity')")
        return truth

    def score(self, images: Sequence[GeneratedImage]) -> list[dict]:
        truths = [self._truth(im) for im in images]
        known = {normalise_label(n).lower() for n in self.labels}
        arrays = [np.asarray(im.load(), dtype=np.uint8) for im in images]
        boxes = self.detector().detect(arrays)
        crops, owners, kept_boxes = [], [], []
        for i, (img, b) in enumerate(zip(arrays, boxes)):
            c, kept = face_crops(img, b)
            crops.append(c)
            owners += [i] * len(kept)
            kept_boxes.append(b[kept])
        owners = np.asarray(owners, dtype=np.int64)
        if len(owners):
            probs, embs = self.recognise(np.concatenate(crops))
            centers = self.recognizer().centers.detach().float().cpu().numpy()
        out = []
        for i, (im, truth) in enumerate(zip(images, truths)):
            gt_known = truth.lower() in known
            if not gt_known and truth not in self._warned:
                self._warned.add(truth)
                log.warning("GCD: ground truth %r is not among the %d labels of %s; its images can never be correct",
                            truth, len(self.labels), self.path / LABELS_FILE)
            detail = {"set": im.entry.get("set", ""), "split": im.entry.get("split", ""), "concept": truth,
                      "gt_in_labels": gt_known, "faces": [], "dropped_faces": int(len(boxes[i]) - len(kept_boxes[i])),
                      "clustering": None, "clusters": [], "top5": [], "prediction": None, "no_face": True,
                      "correct": None}
            mine = np.nonzero(owners == i)[0]
            if len(mine):
                p, e = probs[mine], embs[mine]
                clusters, detail["clustering"] = cluster_predictions(p, e, centers)
                cls, known_k = p.argmax(axis=1), face_is_known(p, e, centers)
                detail["faces"] = [{"box": [round(float(v), 2) for v in kept_boxes[i][k, :4]],
                                    "score": round(float(kept_boxes[i][k, 4]), 6),
                                    "class": normalise_label(self.labels[cls[k]]), "confidence": round(float(p[k, cls[k]]), 6),
                                    "is_known": round(float(known_k[k]), 6)}
                                   for k in range(len(mine))]
                detail["clusters"] = [len(c["faces"]) for c in clusters]
                if clusters:   # all clusters can underflow to zero: then no prediction, as the original
                    first = clusters[0]
                    detail["top5"] = [[self.labels[c], round(pr, 6)] for c, pr in first["top"]]
                    detail["prediction"] = normalise_label(self.labels[first["top"][0][0]])
                    detail["is_known"] = round(first["is_known"], 6)
                    detail["no_face"] = False
                    detail["correct"] = same_person(self.labels[first["top"][0][0]], truth)
            out.append(detail)
        return out

    # ---- aggregation

    def reset(self) -> None:
        self.sets: dict[str, dict] = {}
        self.unknown_truth: set[str] = set()

    def accumulate(self, details: Sequence[dict]) -> None:
        for d in details:
            st = self.sets.setdefault(d["set"], _empty_state(d.get("split", "")))
            st["n"] += 1
            st["faces"] += len(d.get("faces", []))
            if not d["no_face"]:
                st["with_face"] += 1
                st["correct"] += bool(d["correct"])
            if not d.get("gt_in_labels", True):
                self.unknown_truth.add(d["concept"])

    def merge(self, other: GCD) -> None:
        for name, o in other.sets.items():
            st = self.sets.setdefault(name, _empty_state(o["split"]))
            for k in ("n", "with_face", "correct", "faces"):
                st[k] += o[k]
        self.unknown_truth |= other.unknown_truth

    @staticmethod
    def _rates(correct: int, with_face: int, n: int) -> tuple[float, float]:
        acc = 100.0 * correct / with_face if with_face else float("nan")
        strict = 100.0 * correct / n if n else float("nan")
        return acc, strict

    def compute(self) -> MetricResult:
        values, columns, n = {}, [], 0
        pooled = {s: _empty_state(s) for s in SUMMARY_SPLITS}
        for name, st in sorted(self.sets.items()):
            acc, strict = self._rates(st["correct"], st["with_face"], st["n"])
            values.update({f"{name}_acc": acc, f"{name}_strict_acc": strict,
                           f"{name}_no_face": float(st["n"] - st["with_face"]), f"{name}_n_with_face": float(st["with_face"]),
                           f"{name}_n": float(st["n"]), f"{name}_faces": float(st["faces"]),
                           f"{name}_acc_n": float(st["with_face"])})   # tables show a value's n as <key>_n
            n += st["n"]
            if st["split"] in pooled:
                for k in ("n", "with_face", "correct", "faces"):
                    pooled[st["split"]][k] += st[k]
            else:
                columns.append(Column(f"{name}_acc", f"GCD Acc {name}", None))
        for split, suffix in SUMMARY_SPLITS.items():
            st = pooled[split]
            if st["n"]:
                acc, strict = self._rates(st["correct"], st["with_face"], st["n"])
                values.update({f"acc_{suffix}": acc, f"strict_acc_{suffix}": strict,
                               f"no_face_{suffix}": float(st["n"] - st["with_face"]), f"n_{suffix}": float(st["n"]),
                               f"acc_{suffix}_n": float(st["with_face"]), f"no_face_{suffix}_n": float(st["n"])})
        if "acc_e" in values:
            columns.append(Column("acc_e", "Acc_e", False))
        if "acc_r" in values:
            columns.append(Column("acc_r", "Acc_r", True))
        if "acc_e" in values and "acc_r" in values:
            values["h_o"] = h_o(values["acc_e"], values["acc_r"])
            values["h_o_n"] = values["acc_e_n"] + values["acc_r_n"]
            columns.append(Column("h_o", "H_o", True))
        columns += [Column(f"no_face_{s}", f"no-face {s}", None)
                    for s in SUMMARY_SPLITS.values() if f"no_face_{s}" in values]
        info = self.protocol()
        if self.unknown_truth:
            log.warning("GCD: %d ground-truth names are not GCD labels and count as wrong: %s",
                        len(self.unknown_truth), ", ".join(sorted(self.unknown_truth)))
        info["ground_truth_not_in_labels"] = sorted(self.unknown_truth)
        return MetricResult(self.name, values, n, columns, info)

    def protocol(self) -> dict:
        import cv2
        import sklearn
        import torchvision
        from PIL import __version__ as pillow

        from ..data import sha256_file

        if self._hashes is None:
            self._hashes = {f: sha256_file(self.path / f) for f in RESOURCE_FILES}
        return {
            "detector": "GIPHY Celebrity Detector (Giphy/celeb-detection-oss), cpebench PyTorch port",
            "resources": self.resources if self.resources == TINY else str(self.path),
            "sha256": dict(self._hashes),
            "num_classes": len(self.labels),
            "face_detection": {"model": "MTCNN det1-3.npy", "minsize": MIN_FACE, "thresholds": list(THRESHOLDS),
                               "factor": FACTOR, "margin": MARGIN, "mode": "detect_face (single image)"},
            "recognition": {"model": "ResNet-50 + 256-d bottleneck, softmax", "input": f"{FACE_SIZE}² PIL bilinear, "
                            "[0,1], no mean/std", "precision": "fp32 (TF32 off)"},
            "prediction": f"top-1 of the first face cluster (GMM tied, random_state {GMM_SEED}, clusters by size, "
                          "product of softmaxes); top-5 kept in details",
            "label_normalisation": "drop the '_[m.…]' suffix, '_' -> ' ', case-insensitive comparison",
            "ground_truth": "the manifest's concept (celebrity name from the prompt CSV)",
            "denominator": "acc: images with >=1 face prediction (no-face images excluded); strict_acc: all images",
            "scale": "percent",
            "deviations": "boxes/crops of zero size are dropped, and a GMM sklearn cannot fit in float32 is refit in "
                          "float64 (else faces grouped by class), where the original raises",
            "reference_environment": "celeb-detection-oss requirements_cpu.txt: scikit-learn 0.19.1, "
                                     "opencv-python 3.4.0.12, scipy 1.1.0 (misc.imresize), TF1 MTCNN",
            "versions": {"torch": torch.__version__, "torchvision": torchvision.__version__,
                         "scikit-learn": sklearn.__version__, "opencv": cv2.__version__, "pillow": pillow},
        }
