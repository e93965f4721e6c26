"""Identity consistency: is the person in an image still the person the unedited model drew?

For every scored image, insightface finds the faces in it and in the unedited model's image of the
same key (same prompt row, seed and image index: the reference run, as for KID), and the score is the
cosine similarity of the two ArcFace embeddings. High means the identity survived the edit; on an
erased celebrity set a low value means it was removed. No gallery of celebrity photos is needed.

* Models: an insightface model pack (``buffalo_l``: SCRFD-10G detector + ArcFace R50 trained on
  WebFace600K), loaded by insightface's own ``FaceAnalysis`` from a local directory; it is never
  downloaded here (the pack's licence is non-commercial research use, so getting it is the user's
  step). ``tiny`` is a pack of two tiny random ONNX graphs that insightface recognises as a SCRFD
  detector and an ArcFace recogniser, for tests and the smoke preset.
* Per image: SCRFD at ``det_size`` (one scale, 640² as in insightface <= 0.7 and its examples; 2.1's
  FaceAnalysis would default to two scales, 128² and 640²), aspect-kept and zero-padded, with
  insightface's own pre/post-processing and NMS; detections with score >= ``det_thresh`` (0.5,
  insightface's default) are faces. The face used is the one with the largest box area (ties:
  higher detection score), in the image and in the reference alike. It is aligned by insightface's ``norm_crop`` (5 keypoints -> the 112² ArcFace template)
  and embedded; the embedding is L2-normalised in float64.
* Reported per prompt set ``<set>``: the mean (``<set>``) and std similarity over pairs where both
  images have a face, the pair count ``<set>_n``, the images ``<set>_images``, and how many generated
  / reference images have no face (``_no_face`` / ``_no_ref_face``: those pairs are counted, never
  scored). Sets whose split is ``erased`` are lower-is-better, the others higher-is-better.
* Embeddings are cached per image in ``<run>/identity/<pack>-<fingerprint>/`` (for the scored run
  and for the reference run), keyed by image key and PNG sha256, so ten methods scored against one
  SD run embed its images once. A run of the unedited model is its own reference (similarity 1).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError, ModelLoadError
from . import Column, GeneratedImage, Metric, MetricResult

log = logging.getLogger(__name__)

PACK = "buffalo_l"
ENV_PACK = "CPEBENCH_INSIGHTFACE"
TINY = "tiny"
TASKS = ("detection", "recognition")
SELECTION = "largest box area (ties: higher detection score), same rule for the reference image"
# Bump when what an embedding means changes (selection, alignment, normalisation): old caches are ignored.
EMBEDDING_VERSION = 1


# --------------------------------------------------------------------------- tiny pack


def _tiny_detector(rng: np.random.RandomState):
    """A SCRFD-shaped graph (9 outputs: scores/boxes/keypoints at strides 8, 16, 32, two anchors each,
    rank-2 outputs, dynamic height/width) that insightface routes to its SCRFD class. Only stride 32
    fires: its score is sigmoid(4 + 8·mean normalised intensity + small random terms), so any ordinary
    image has faces and a black one has none; boxes are ~6 strides wide, keypoints are the ArcFace
    template laid over the box, both nudged by the pixels so different images give different crops."""
    from insightface.utils.face_align import arcface_dst
    from onnx import TensorProto, helper, numpy_helper

    anchors, strides = 2, (8, 16, 32)
    inits, nodes = [], []
    template = ((arcface_dst - 56.0) * 6.0 / 112.0).reshape(-1).astype(np.float32)   # in stride units

    def conv(name, src, out_ch, bias, scale):
        w = (rng.randn(out_ch, 3, 1, 1) * scale).astype(np.float32)
        inits.extend([numpy_helper.from_array(w, f"{name}_w"), numpy_helper.from_array(bias.astype(np.float32), f"{name}_b")])
        nodes.append(helper.make_node("Conv", [src, f"{name}_w", f"{name}_b"], [f"{name}_conv"], name=f"{name}_conv"))
        return f"{name}_conv"

    def flat(name, src, width):
        nodes.append(helper.make_node("Transpose", [src], [f"{name}_t"], perm=[0, 2, 3, 1], name=f"{name}_t"))
        inits.append(numpy_helper.from_array(np.array([-1, width], dtype=np.int64), f"{name}_shape"))
        nodes.append(helper.make_node("Reshape", [f"{name}_t", f"{name}_shape"], [name], name=f"{name}_reshape"))

    for s in strides:
        nodes.append(helper.make_node("AveragePool", ["input.1"], [f"pool{s}"], kernel_shape=[s, s], strides=[s, s],
                                      name=f"pool{s}"))
    for s in strides:   # scores
        live = s == 32
        logit = conv(f"score{s}", f"pool{s}", anchors, np.full(anchors, 4.0 if live else -30.0), 0.3 if live else 0.0)
        if live:        # + 8 · channel mean: brightness decides whether there is a face at all
            inits.append(numpy_helper.from_array(np.full((anchors, 3, 1, 1), 8.0 / 3, np.float32), "bright_w"))
            nodes.append(helper.make_node("Conv", [f"pool{s}", "bright_w"], ["bright"], name="bright_conv"))
            nodes.append(helper.make_node("Add", [logit, "bright"], ["score32_logit"], name="score32_add"))
            logit = "score32_logit"
        nodes.append(helper.make_node("Sigmoid", [logit], [f"score{s}_sig"], name=f"score{s}_sigmoid"))
        flat(f"score_{s}", f"score{s}_sig", 1)
    for s in strides:   # box distances (left, top, right, bottom) in strides, always > 0
        flat(f"bbox_{s}", conv(f"bbox{s}", f"pool{s}", anchors * 4, np.full(anchors * 4, 3.0), 0.4), 4)
    for s in strides:   # 5 keypoints as offsets from the anchor centre, in strides
        flat(f"kps_{s}", conv(f"kps{s}", f"pool{s}", anchors * 10, np.tile(template, anchors), 0.05), 10)

    outputs = [helper.make_tensor_value_info(f"{kind}_{s}", TensorProto.FLOAT, [f"n{s}", width])
               for kind, width in (("score", 1), ("bbox", 4), ("kps", 10)) for s in strides]
    graph = helper.make_graph(nodes, "tiny_scrfd",
                              [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "height", "width"])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8,
                             producer_name="cpebench-tiny")


def _tiny_recogniser(rng: np.random.RandomState, dim: int = 64):
    """An ArcFace-shaped graph: [N, 3, 112, 112] -> [N, dim] (random conv + linear layer)."""
    from onnx import TensorProto, helper, numpy_helper

    w1 = (rng.randn(8, 3, 8, 8) * 0.05).astype(np.float32)
    w2 = (rng.randn(8 * 14 * 14, dim) * 0.05).astype(np.float32)
    inits = [numpy_helper.from_array(w1, "conv_w"), numpy_helper.from_array(np.zeros(8, np.float32), "conv_b"),
             numpy_helper.from_array(w2, "fc_w"), numpy_helper.from_array(np.zeros(dim, np.float32), "fc_b")]
    nodes = [helper.make_node("Conv", ["input.1", "conv_w", "conv_b"], ["c"], kernel_shape=[8, 8], strides=[8, 8], name="conv"),
             helper.make_node("Tanh", ["c"], ["t"], name="tanh"),
             helper.make_node("Flatten", ["t"], ["f"], axis=1, name="flatten"),
             helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["embedding"], name="fc")]
    graph = helper.make_graph(nodes, "tiny_arcface",
                              [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["batch", 3, 112, 112])],
                              [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, ["batch", dim])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8,
                             producer_name="cpebench-tiny")


def save_tiny_pack(path: str | Path, seed: int = 0) -> Path:
    """Write the tiny pack (det_tiny.onnx, rec_tiny.onnx) into ``path``, laid out like buffalo_l."""
    import onnx

    rng = np.random.RandomState(seed)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for name, model in (("det_tiny.onnx", _tiny_detector(rng)), ("rec_tiny.onnx", _tiny_recogniser(rng))):
        onnx.checker.check_model(model)
        onnx.save(model, str(path / name))
    return path


def tiny_insightface_pack(seed: int = 0) -> Path:
    """The tiny pack, built once into the cache (same bytes for the same seed and onnx version)."""
    import onnx

    from .. import data
    from ..models import build_once

    tag = f"tiny-insightface-seed{seed}-onnx{onnx.__version__}"
    return build_once(data.cache_dir() / "models" / tag, "rec_tiny.onnx", lambda d: save_tiny_pack(d, seed))


# --------------------------------------------------------------------------- locating a pack


def _insightface_root_pack(name: str = PACK) -> Path:
    """Where insightface itself keeps a pack: ~/.insightface/models/<name>."""
    return Path("~/.insightface").expanduser() / "models" / name


def pack_candidates() -> list[Path]:
    """Where ``models: auto`` looks, in order: $CPEBENCH_INSIGHTFACE, insightface's own root, our cache."""
    from .. import data

    found = []
    env = os.environ.get(ENV_PACK)
    if env:
        p = Path(env).expanduser()
        found.append(p / "models" / PACK if (p / "models" / PACK).is_dir() else p)   # a pack dir, or an insightface root
    return found + [_insightface_root_pack(), data.cache_dir() / "models" / "insightface" / PACK]


def _has_onnx(p: Path) -> bool:
    return p.is_dir() and any(p.glob("*.onnx"))


def _download_hint() -> str:
    try:
        from insightface.utils.storage import model_zoo_download_url

        url = model_zoo_download_url(f"{PACK}.zip")
    except ImportError:
        url = f"insightface's model zoo ({PACK}.zip)"
    return (f"download {url} once (non-commercial research licence) and unzip it so the .onnx files lie in "
            f"{_insightface_root_pack()} (insightface's own location), or anywhere and point to it with "
            f"{ENV_PACK}=DIR or metrics.identity.options.models=DIR")


def find_pack(spec: str = "auto") -> Path:
    """``tiny``, a pack directory, a pack name under ~/.insightface/models, or ``auto`` (buffalo_l in the
    known locations). Never downloads."""
    if spec == TINY:
        return tiny_insightface_pack()
    if spec != "auto":
        p = Path(str(spec)).expanduser()
        if not p.exists() and os.sep not in str(spec) and _has_onnx(_insightface_root_pack(str(spec))):
            p = _insightface_root_pack(str(spec))
        if not p.is_dir():
            raise ModelLoadError(f"metrics.identity.options.models: insightface model pack {spec!r} is not a directory "
                                 f"(nor a pack under {_insightface_root_pack('').parent}); {_download_hint()}")
        if not _has_onnx(p):
            raise ModelLoadError(f"metrics.identity.options.models: {p} holds no .onnx files; it should be an "
                                 f"unzipped insightface pack such as {PACK}")
        return p
    looked = pack_candidates()
    for p in looked:
        if _has_onnx(p):
            return p
    raise ModelLoadError(f"metrics.identity.options.models=auto: insightface's {PACK} pack is not on this machine "
                         f"(looked in {', '.join(map(str, looked))}); {_download_hint()}")


_HASHES: dict[tuple, dict[str, str]] = {}


def pack_hashes(pack: Path) -> dict[str, str]:
    """sha256 of every .onnx file of the pack (memoised by path, size and mtime)."""
    from ..data import sha256_file

    files = sorted(pack.glob("*.onnx"))
    key = tuple((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    if key not in _HASHES:
        _HASHES[key] = {f.name: sha256_file(f) for f in files}
    return dict(_HASHES[key])


def resolve_providers(device: str) -> tuple[list[str], int]:
    """onnxruntime providers and insightface's ctx_id for ``auto`` (CUDA when this onnxruntime has
    it), ``cpu`` or ``cuda``."""
    import onnxruntime

    have = onnxruntime.get_available_providers()
    if device == "auto":
        device = "cuda" if "CUDAExecutionProvider" in have else "cpu"
    if device == "cpu":
        return ["CPUExecutionProvider"], -1     # ctx_id < 0: insightface pins its sessions to the CPU
    if device.startswith("cuda"):
        if "CUDAExecutionProvider" not in have:
            raise ConfigError(f"metrics.identity.options.device={device}: this onnxruntime has no CUDAExecutionProvider "
                              f"(it offers {', '.join(have)}); install onnxruntime-gpu or use device=cpu")
        index = int(device.split(":", 1)[1]) if ":" in device else 0
        return [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"], index
    raise ConfigError(f"metrics.identity.options.device: {device!r} is not auto, cpu or cuda[:N]")


# --------------------------------------------------------------------------- faces -> embeddings


def select_face(det: np.ndarray) -> int:
    """Index of the face used: the largest box area, ties broken by the higher detection score."""
    area = (det[:, 2] - det[:, 0]) * (det[:, 3] - det[:, 1])
    return int(np.lexsort((det[:, 4], area))[-1])     # lexsort: last key is the primary one


class FaceEmbedder:
    """An insightface pack loaded by ``FaceAnalysis`` (detection + recognition only); images -> the
    selected face's box and L2-normalised ArcFace embedding."""

    def __init__(self, pack: Path, det_size: tuple[int, int] = (640, 640), det_thresh: float = 0.5,
                 providers: Sequence = ("CPUExecutionProvider",), ctx_id: int = -1, batch_size: int = 32):
        from insightface.app import FaceAnalysis

        self.pack = Path(pack)
        self.batch_size = int(batch_size)
        try:
            self.app = FaceAnalysis(name=str(self.pack), allowed_modules=list(TASKS), providers=list(providers))
        except AssertionError:   # FaceAnalysis asserts that the pack has a detector
            raise ModelLoadError(f"metrics.identity.options.models: insightface found no face detector in {self.pack} "
                                 f"(expected an insightface pack such as {PACK})") from None
        except Exception as e:  # noqa: BLE001  (onnxruntime raises its own types): name the pack, no traceback
            raise ModelLoadError(f"metrics.identity.options.models: insightface could not load the pack {self.pack}: "
                                 f"{type(e).__name__}: {e}") from None
        if "recognition" not in self.app.models:
            raise ModelLoadError(f"metrics.identity.options.models: {self.pack} has no ArcFace recognition model "
                                 f"(insightface recognised: {', '.join(self.app.models)})")
        self.app.prepare(ctx_id=ctx_id, det_thresh=float(det_thresh), det_size=tuple(det_size))
        self.det, self.rec = self.app.det_model, self.app.models["recognition"]
        if not getattr(self.det, "use_kps", False):
            raise ModelLoadError(f"metrics.identity.options.models: the detector {Path(self.det.model_file).name} gives no "
                                 "facial keypoints, which ArcFace alignment needs")

    def __call__(self, images) -> list[dict]:
        """Per image: faces (count), box, det_score and embedding (float32, unit norm) or None."""
        from insightface.utils import face_align

        out, crops = [], []
        for image in images:
            bgr = np.ascontiguousarray(np.asarray(image.convert("RGB"))[:, :, ::-1])   # insightface reads BGR
            det, kps = self.det.detect(bgr, max_num=0)
            if det.shape[0] == 0:
                out.append({"faces": 0, "box": None, "det_score": None, "embedding": None})
                continue
            i = select_face(det)
            out.append({"faces": int(det.shape[0]), "box": [float(x) for x in det[i, :4]],
                        "det_score": float(det[i, 4]), "embedding": len(crops)})
            with warnings.catch_warnings():   # scikit-image 0.26 deprecates the estimate() insightface calls
                warnings.simplefilter("ignore", FutureWarning)
                # the crop ArcFaceONNX.get makes for this face
                crops.append(face_align.norm_crop(bgr, landmark=kps[i], image_size=self.rec.input_size[0]))
        feats = [self.rec.get_feat(crops[j : j + self.batch_size]) for j in range(0, len(crops), self.batch_size)]
        if feats:
            f = np.concatenate(feats).astype(np.float64)
            f = (f / np.linalg.norm(f, axis=1, keepdims=True)).astype(np.float32)
        for r in out:
            if r["embedding"] is not None:
                r["embedding"] = f[r["embedding"]]
        return out

    def info(self) -> dict:
        return {"detector": Path(self.det.model_file).name, "recogniser": Path(self.rec.model_file).name,
                "det_input": [list(x) for x in self.det.input_sizes],   # a fixed-size detector ignores det_size
                "nms_thresh": float(self.det.nms_thresh), "arcface_input": list(self.rec.input_size),
                "embedding_dim": int(self.rec.output_shape[-1]) if isinstance(self.rec.output_shape[-1], int) else None}


class EmbeddingCache:
    """Per-image results in ``folder`` as .npz chunks written atomically: safe when several scoring
    processes share one reference run (the worst case is the same chunk computed twice)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.index: dict[tuple[str, str], dict] = {}
        self._read: set[str] = set()

    def refresh(self) -> None:
        if not self.folder.is_dir():
            return
        for p in sorted(self.folder.glob("*.npz")):
            if p.name in self._read:
                continue
            try:
                z = np.load(p)
                rows = zip(z["keys"], z["sha256"], z["faces"], z["box"], z["det_score"])
                for i, (k, sha, faces, box, score) in enumerate(rows):
                    self.index[(str(k), str(sha))] = {
                        "faces": int(faces), "box": [float(x) for x in box] if faces else None,
                        "det_score": float(score) if faces else None,
                        "embedding": z["embedding"][i] if faces else None}
            except (OSError, ValueError, KeyError) as e:    # a foreign or truncated file: recompute, do not trust it
                log.warning("identity cache: ignoring unreadable %s (%s)", p, e)
            self._read.add(p.name)

    def get(self, images: Sequence[GeneratedImage]) -> dict[str, dict]:
        wanted = {im.key: _cache_key(im) for im in images}
        if any(k not in self.index for k in wanted.values()):
            self.refresh()      # other processes may have added chunks since
        return {key: self.index[ck] for key, ck in wanted.items() if ck in self.index}

    def put(self, images: Sequence[GeneratedImage], records: Sequence[dict]) -> None:
        keys = [_cache_key(im) for im in images]
        dim = next((r["embedding"].shape[0] for r in records if r["embedding"] is not None), 0)
        emb = np.zeros((len(records), dim), np.float32)
        for i, r in enumerate(records):
            if r["embedding"] is not None:
                emb[i] = r["embedding"]
        arrays = {"keys": np.array([k for k, _ in keys]), "sha256": np.array([s for _, s in keys]),
                  "faces": np.array([r["faces"] for r in records], np.int32),
                  "box": np.array([r["box"] or [np.nan] * 4 for r in records], np.float32).reshape(-1, 4),
                  "det_score": np.array([np.nan if r["det_score"] is None else r["det_score"] for r in records], np.float32),
                  "embedding": emb}
        name = hashlib.sha256("\n".join(f"{k}:{s}" for k, s in keys).encode()).hexdigest()[:16] + ".npz"
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{name}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, self.folder / name)
        self._read.add(name)
        for k, r in zip(keys, records):
            self.index[k] = r


def _cache_key(im: GeneratedImage) -> tuple[str, str]:
    """The image key and its PNG's sha256 from the manifest: a regenerated image is never served stale."""
    return im.key, str(im.entry.get("sha256") or "")


# --------------------------------------------------------------------------- the metric


def _det_size(value) -> tuple[int, int]:
    try:
        size = (int(value), int(value)) if np.isscalar(value) else tuple(int(v) for v in value)
    except (TypeError, ValueError):
        size = ()
    if len(size) != 2 or min(size) <= 0 or any(v % 32 for v in size):
        raise ConfigError(f"metrics.identity.options.det_size: {value!r} should be a positive multiple of 32, "
                          "or [width, height] of such (SCRFD's coarsest stride is 32)")
    return size


class IdentityConsistency(Metric):
    """ArcFace cosine similarity between each image and the unedited model's image of the same key."""

    name = "identity"
    higher_is_better = True         # on remaining sets; columns of erased sets are lower-is-better
    uses_reference_run = True       # the runner resolves reference_run=auto to the unedited model's run
    description = ("identity consistency: ArcFace cosine (insightface) between each image and the unedited model's "
                   "image of the same prompt and seed; ↓ on erased sets, ↑ on remaining ones")

    def __init__(self, models: str = "auto", reference_run: str | None = None, det_size=640, det_thresh: float = 0.5,
                 device: str = "auto", batch_size: int = 32):
        self.models = str(models)
        self.reference_run = None if reference_run == "auto" else reference_run   # auto: resolved by the runner
        self.det_size = _det_size(det_size)
        self.det_thresh = float(det_thresh)
        if not 0.0 < self.det_thresh < 1.0:
            raise ConfigError(f"metrics.identity.options.det_thresh: {det_thresh} is not in (0, 1)")
        self.device = str(device)
        self.providers, self.ctx_id = resolve_providers(self.device)
        self.batch_size = int(batch_size)
        self.run_dir: Path | None = None
        self._embedder: FaceEmbedder | None = None
        self._pack: Path | None = None
        self._caches: dict[Path, EmbeddingCache] = {}
        self._ref_entries: dict[str, dict] | None = None
        super().__init__()

    # ---- set-up

    def bind(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)

    def pack(self) -> Path:
        if self._pack is None:
            self._pack = find_pack(self.models)
        return self._pack

    def embedder(self) -> FaceEmbedder:
        if self._embedder is None:
            self._embedder = FaceEmbedder(self.pack(), self.det_size, self.det_thresh, self.providers, self.ctx_id,
                                          self.batch_size)
        return self._embedder

    def check(self) -> None:
        if not self.reference_run:
            raise ConfigError("metrics.identity.options.reference_run: give the run directory of the unedited model "
                              "(`cpebench run` resolves `auto` to it and generates it when missing)")
        # load the pack now (on the CPU, then dropped) so a wrong pack fails before any image is generated
        FaceEmbedder(self.pack(), self.det_size, self.det_thresh)

    def fingerprint(self) -> str:
        """What a cached embedding depends on: the pack's bytes and the detection/selection settings."""
        import insightface

        spec = {"onnx": pack_hashes(self.pack()), "det_size": self.det_size, "det_thresh": self.det_thresh,
                "insightface": insightface.__version__, "version": EMBEDDING_VERSION}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]

    def _cache(self, run_dir: Path) -> EmbeddingCache:
        run_dir = Path(run_dir).resolve()
        if run_dir not in self._caches:
            label = TINY if self.models == TINY else self.pack().name
            self._caches[run_dir] = EmbeddingCache(run_dir / "identity" / f"{label}-{self.fingerprint()}")
        return self._caches[run_dir]

    def embeddings(self, run_dir: Path, images: Sequence[GeneratedImage]) -> list[dict]:
        """Face results of ``images`` (which live in ``run_dir``), from its cache or computed and cached."""
        cache = self._cache(run_dir)
        found = cache.get(images)
        todo = [im for im in images if im.key not in found]
        if todo:
            records = self.embedder()([im.load() for im in todo])
            cache.put(todo, records)
            found.update({im.key: r for im, r in zip(todo, records)})
        return [found[im.key] for im in images]

    def reference_images(self, images: Sequence[GeneratedImage]) -> tuple[Path, list[GeneratedImage]]:
        """The reference run's images with the keys of ``images``."""
        from ..engine import read_manifest

        if not self.reference_run:
            raise ConfigError("metrics.identity.options.reference_run: give the run directory of the unedited model "
                              "(`cpebench generate --method sd --task <task>` with the same protocol)")
        root = Path(self.reference_run).expanduser()
        keys = [im.key for im in images]
        if self._ref_entries is None or any(k not in self._ref_entries for k in keys):
            if not root.is_dir():
                raise DataError(f"metrics.identity.options.reference_run: {root} does not exist; generate the unedited "
                                "model's run first (`cpebench run` does it for reference_run=auto)")
            self._ref_entries = read_manifest(root)
        missing = [k for k in keys if k not in self._ref_entries]
        if missing:
            raise DataError(f"{root}: the reference run lacks {len(missing)} of the {len(keys)} images scored here "
                            f"(first: {missing[0]}); generate them with the unedited model and the same protocol")
        return root, [GeneratedImage(root / self._ref_entries[k]["file"], self._ref_entries[k]) for k in keys]

    # ---- scoring

    def score(self, images: Sequence[GeneratedImage]) -> list[dict]:
        if self.run_dir is None:
            raise RuntimeError("identity: bind(run_dir) must be called before scoring (embeddings are cached beside the run)")
        ref_root, ref_images = self.reference_images(images)
        gen = self.embeddings(self.run_dir, images)
        ref = self.embeddings(ref_root, ref_images)
        out = []
        for im, g, r in zip(images, gen, ref):
            both = g["embedding"] is not None and r["embedding"] is not None
            sim = cosine(g["embedding"], r["embedding"]) if both else None
            out.append({"set": im.entry["set"], "split": im.entry.get("split", ""), "sim": sim,
                        "face": g["faces"] > 0, "ref_face": r["faces"] > 0, "faces": g["faces"], "ref_faces": r["faces"],
                        "box": _rounded(g["box"]), "ref_box": _rounded(r["box"]),
                        "det_score": g["det_score"], "ref_det_score": r["det_score"]})
        return out

    def reset(self) -> None:
        self.sets: dict[str, dict] = {}

    @staticmethod
    def _empty(split: str) -> dict:
        return {"split": split, "n": 0, "pairs": 0, "sum": 0.0, "sumsq": 0.0, "no_face": 0, "no_ref_face": 0}

    def accumulate(self, details: Sequence[dict]) -> None:
        for d in details:
            st = self.sets.setdefault(d["set"], self._empty(d.get("split", "")))
            st["n"] += 1
            st["no_face"] += not d["face"]
            st["no_ref_face"] += not d["ref_face"]
            if d["sim"] is not None:       # both faces found: the only pairs that are scored
                st["pairs"] += 1
                st["sum"] += d["sim"]
                st["sumsq"] += d["sim"] * d["sim"]

    def merge(self, other: IdentityConsistency) -> None:
        for name, o in other.sets.items():
            st = self.sets.setdefault(name, self._empty(o["split"]))
            for k in ("n", "pairs", "sum", "sumsq", "no_face", "no_ref_face"):
                st[k] += o[k]

    def compute(self) -> MetricResult:
        values, columns, n = {}, [], 0
        for name, st in sorted(self.sets.items()):
            k = st["pairs"]
            mean = st["sum"] / k if k else float("nan")
            values[name] = mean
            values[f"{name}_std"] = float(np.sqrt(max(st["sumsq"] / k - mean * mean, 0.0))) if k else float("nan")
            values[f"{name}_n"] = k                  # the pairs the mean is over (what tables show as n)
            values[f"{name}_images"] = st["n"]
            values[f"{name}_no_face"] = st["no_face"]
            values[f"{name}_no_ref_face"] = st["no_ref_face"]
            n += k
            # erasing a celebrity should remove the identity; on every other set it should survive
            columns.append(Column(name, f"ID sim {name}", st["split"] != "erased"))
        return MetricResult(self.name, values, n, columns, {**self.protocol(), "reference": self.reference_info()})

    def reference_info(self) -> dict:
        info = {"run": str(self.reference_run) if self.reference_run else None, "method": None, "is_scored_run": False}
        if self.reference_run:
            root = Path(self.reference_run).expanduser()
            gen = root / "generation.json"
            if gen.exists():
                info["method"] = json.loads(gen.read_text()).get("method", {}).get("name")
            info["is_scored_run"] = self.run_dir is not None and root.resolve() == self.run_dir.resolve()
        return info

    def protocol(self) -> dict:
        import insightface
        import onnxruntime

        pack = self.pack()
        return {
            "package": "insightface", "version": insightface.__version__, "onnxruntime": onnxruntime.__version__,
            "pack": TINY if self.models == TINY else pack.name, "pack_path": str(pack), "onnx_sha256": pack_hashes(pack),
            **self.embedder().info(),
            "det_size": list(self.det_size), "det_thresh": self.det_thresh,
            "face_selection": SELECTION,
            "alignment": "insightface face_align.norm_crop: 5 detector keypoints -> ArcFace 112x112 template",
            "similarity": ("cosine of the L2-normalised ArcFace embeddings of the selected face in the image and in the "
                           "reference run's image of the same key (prompt row, seed, image index); mean over pairs "
                           "where both have a face (<set>_n), the other pairs counted (_no_face, _no_ref_face), not scored"),
            "direction": "lower is better on erased sets, higher elsewhere",
            "reference_images": "the unedited model's run under the same protocol",
            "providers": [p if isinstance(p, str) else p[0] for p in self.providers],
        }


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    """cos(a, b) in float64 (the stored embeddings are unit vectors in float32; renormalising makes an
    image against itself 1 to ~1e-16, not to float32's 1e-7)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


def _rounded(box):
    return None if box is None else [round(float(x), 2) for x in box]
