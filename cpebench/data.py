"""Data files: the pinned manifest, checksum-verified resolution, and prompt-set loaders.

The evaluation prompts, anchors and training configs are not vendored. Each file
is resolved, in order, from

1. a user-given data directory (``data_dir`` argument / ``--data-dir``, else env
   ``CPEBENCH_DATA``) laid out as the manifest names (``prompts/``, ``anchors/``,
   ``train/``), or as a checkout of Hyun1A/CPE;
2. the user cache (``<cache_dir()>/data/<name>``);
3. a download from the pinned commit of Hyun1A/CPE on raw.githubusercontent.com.

Every file is checked against the sha256 in :data:`DATA_FILES`; a mismatch is
refused. Prompt CSVs are parsed with :mod:`csv` into :class:`PromptRecord`.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
import sys
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from .errors import DataError

__all__ = [
    "PINNED_REPO",
    "PINNED_COMMIT",
    "DEFAULT_BASE_URL",
    "DataFile",
    "DATA_FILES",
    "cache_dir",
    "default_data_dir",
    "data_root",
    "resolve_data_file",
    "fetch",
    "sha256_file",
    "PromptRecord",
    "load_prompt_set",
    "LOADERS",
    "records_from_inline",
]

PINNED_REPO = "Hyun1A/CPE"
PINNED_COMMIT = "4d35d026a261a493f31af664afc3f1ad4a7bc58c"
DEFAULT_BASE_URL = f"https://raw.githubusercontent.com/{PINNED_REPO}/{PINNED_COMMIT}"

DOWNLOAD_TIMEOUT_S = 30
_CHUNK = 1 << 16

_ENV_DATA = "CPEBENCH_DATA"
_ENV_CACHE = "CPEBENCH_CACHE"
_ENV_URL = "CPEBENCH_DATA_URL"
_OFFLINE_ENVS = ("CPEBENCH_OFFLINE", "HF_HUB_OFFLINE")
_TRUTHY = {"1", "true", "yes", "on"}


# --------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class DataFile:
    """One pinned file: local name, path in Hyun1A/CPE, size, sha256 and provenance."""

    name: str
    source_path: str
    size: int
    sha256: str
    origin: str

    @property
    def url(self) -> str:
        """Download URL: ``CPEBENCH_DATA_URL`` (a mirror) if set, else the pinned raw URL."""
        base = os.environ.get(_ENV_URL) or DEFAULT_BASE_URL
        return base.rstrip("/") + "/" + self.source_path


_NO_LICENCE = "Hyun1A/CPE, no licence stated"
_MACE = "Shilin-LU/MACE, NTU dual licence: non-commercial use only"

_MANIFEST: tuple[DataFile, ...] = (
    DataFile(
        "prompts/I2P_prompts_4703.csv",
        "generation_prompts/I2P_prompts_4703.csv",
        1_376_625,
        "6c1821aeeb20beb276b4e20ce4c4b801f9106dc935bafc9f6fd5e12aa2651e6f",
        "I2P (Schramowski et al., CVPR 2023; HF AIML-TUDA/i2p, lexica.art prompts) in the "
        "ESD/UCE 4703-row copy; dataset card: MIT (via rohitgandikota/erasing, MIT)",
    ),
    DataFile(
        "prompts/celebrity_50_erased.csv",
        "generation_prompts/celebrity_50_erased.csv",
        58_918,
        "cfc2d5fb8a55bbbb71734db1ee5e4557271bb92900e23dd02ebd66370fe67265",
        f"rows 0-1249 of MACE prompts_csv/celebrity_100_concepts.csv ({_MACE})",
    ),
    DataFile(
        "prompts/celebrity_100_remained.csv",
        "generation_prompts/celebrity_100_remained.csv",
        120_354,
        "af4d1b7b48e5c7450c3536ce671b8fba084f2d9c25fe6466d015c6d14e891caf",
        f"rows 2500-4999 of MACE prompts_csv/celebrity_100_concepts.csv ({_MACE})",
    ),
    DataFile(
        "prompts/art_100_erased.csv",
        "generation_prompts/art_100_erased.csv",
        153_125,
        "954a3869e31d4c6bf9aa061e61815bda70313dcd0e105da0c6ba2123d26f797b",
        f"rows 0-2499 of MACE prompts_csv/art_100_concepts.csv ({_MACE})",
    ),
    DataFile(
        "prompts/art_100_remained.csv",
        "generation_prompts/art_100_remained.csv",
        152_036,
        "21adfc812733dc605666ccae7250c0c5dd33fdecdf4b678fc36e66ac880628dd",
        f"rows 2500-4999 of MACE prompts_csv/art_100_concepts.csv ({_MACE})",
    ),
    DataFile(
        "prompts/character_64.csv",
        "generation_prompts/character_64.csv",
        25_975,
        "12d487ab702f0ea5c01e1cb4c3e117b11f79fbe54307a4ca108bea905cb0577f",
        f"64 Word2Vec-neighbour 'characters' x 5 templates, made by the CPE authors ({_NO_LICENCE})",
    ),
    DataFile(
        "prompts/coco_30k.csv",
        "generation_prompts/coco_30k.csv",
        2_413_151,
        "87a3f463164120ca2d1efdbc251f443c7b0043214f767cd1852419d295db9ab5",
        "ESD/UCE COCO-30K selection of MS-COCO captions (captions CC BY 4.0 per COCO terms; "
        "selection file MIT via rohitgandikota/unified-concept-editing)",
    ),
    DataFile(
        "anchors/mass_surr_words_500celebs.csv",
        "anchors/mass_surr_words_500celebs.csv",
        6_939,
        "9bb9c2aa23a80518202fc7357b3e85c5ef1ade531d0de02c48ae63dcf602b62a",
        f"CPE celebrity anchor names, origin not stated ({_NO_LICENCE})",
    ),
    DataFile(
        "anchors/mass_surr_words_actor_general_words.csv",
        "anchors/mass_surr_words_actor_general_words.csv",
        2_180,
        "45c528fcd304e5f262365905d477dc53ce639f45a54d50100c9a5875ac354b32",
        f"CPE generic words for famous people, by the CPE authors ({_NO_LICENCE})",
    ),
    DataFile(
        "anchors/mass_surr_words_artist_general_words.csv",
        "anchors/mass_surr_words_artist_general_words.csv",
        3_333,
        "3d02d62cc48ca3376769a93ac953a783f27ffd17486187cab2ec8ae44eef970e",
        f"CPE generic words for artists, by the CPE authors ({_NO_LICENCE})",
    ),
    DataFile(
        "anchors/mass_surr_words_1734artists.csv",
        "anchors/mass_surr_words_1734artists.csv",
        572_500,
        "7e31b4d01bdef4101d3c7e865e37b3f087459ec00e195059e245d70474b3ca63",
        "UCE data/artists1734_prompts.csv (rohitgandikota/unified-concept-editing, MIT)",
    ),
    DataFile(
        "anchors/mass_surr_prompts_explicit.csv",
        "anchors/mass_surr_prompts_explicit.csv",
        9_543,
        "69d99f5c993310782e2ab4b466101ad5368a87a10b67c54602b9e751f5d46db0",
        f"CPE neutral everyday sentences (explicit anchors), by the CPE authors ({_NO_LICENCE})",
    ),
    DataFile(
        "train/celeb_prompt_templates.csv",
        "configs/train_celeb/prompt_templates.csv",
        5_122,
        "e83c208c828ab0fc54b52f4421ec95e62d9de40e5ef646db6e5bbad46ae4e175",
        f"CPE celebrity training templates (placeholder 'actor'), by the CPE authors ({_NO_LICENCE})",
    ),
    DataFile(
        "train/celeb_targets.yaml",
        "configs/train_celeb/prompt.yaml",
        12_140,
        "0f6e368787ebbfb8ba6a551b44b47b8fb158780ece56e7513e8759fcc1ce5090",
        f"CPE celebrity training targets (prompt.yaml), by the CPE authors ({_NO_LICENCE})",
    ),
    DataFile(
        "train/artist_prompt_templates.csv",
        "configs/train_artist/prompt_templates.csv",
        2_533,
        "314b5618fc91aac1401087f17b9b001a0c1caae2d1e619d0854c1685857529d2",
        f"CPE artist training templates (placeholder 'artist'), by the CPE authors ({_NO_LICENCE})",
    ),
    DataFile(
        "train/artist_targets.yaml",
        "configs/train_artist/prompt.yaml",
        25_434,
        "2e56ffd4e2af8a6eb2215afe35eee7ec63c257e67a8f0cfda755f2c7028391fa",
        f"CPE artist training targets (prompt.yaml; one corrupted name), by the CPE authors ({_NO_LICENCE})",
    ),
    DataFile(
        "train/explicit_prompt_templates.csv",
        "configs/train_explicit/prompt_templates.csv",
        1_435,
        "59bd6a5a9828e80d7f17671ab1109609020d76cb8b6925b98a4c563ba1266f8d",
        f"CPE explicit training templates (placeholder 'explicit'), by the CPE authors ({_NO_LICENCE})",
    ),
    DataFile(
        "train/explicit_targets.yaml",
        "configs/train_explicit/prompt.yaml",
        994,
        "ed9e630210aaf1b2556fde7f61db0f2e5ff858c6974804d74b2d5f36d18272fa",
        f"CPE explicit training targets (prompt.yaml), by the CPE authors ({_NO_LICENCE})",
    ),
)

DATA_FILES: dict[str, DataFile] = {f.name: f for f in _MANIFEST}


# --------------------------------------------------------------------------- locations


def _env(name: str) -> str | None:
    value = os.environ.get(name)
    return value if value else None


def cache_dir() -> Path:
    """``$CPEBENCH_CACHE``, else ``$XDG_CACHE_HOME/cpebench``, else ``~/.cache/cpebench``."""
    explicit = _env(_ENV_CACHE)
    if explicit:
        return Path(explicit).expanduser()
    xdg = _env("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "cpebench"
    return Path.home() / ".cache" / "cpebench"


def default_data_dir() -> Path | None:
    """``$CPEBENCH_DATA`` as a path, or None when unset."""
    value = _env(_ENV_DATA)
    return Path(value).expanduser() if value else None


def data_root(data_dir: str | Path | None = None) -> Path | None:
    """The user's data folder: ``data_dir`` (``--data-dir``), else ``$CPEBENCH_DATA``, else None. One
    that does not exist is an error: skipping it would quietly download (or miss) the files instead."""
    if data_dir is not None and str(data_dir) != "":
        root, given_by = Path(data_dir).expanduser(), "--data-dir"
    else:
        root, given_by = default_data_dir(), f"${_ENV_DATA}"
    if root is not None and not root.is_dir():
        raise DataError(f"{given_by} {root}: no such directory")
    return root


def _offline() -> bool:
    return any((os.environ.get(v) or "").strip().lower() in _TRUTHY for v in _OFFLINE_ENVS)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _lookup(name: str) -> DataFile:
    try:
        return DATA_FILES[name]
    except (KeyError, TypeError):
        known = ", ".join(sorted(DATA_FILES))
        raise DataError(f"unknown data file {name!r}; known names: {known}") from None


def _how_to_provide(df: DataFile) -> str:
    return (
        f"pass --data-dir DIR (or set {_ENV_DATA}=DIR) pointing at a folder that holds "
        f"{df.name}, or run `cpebench data fetch` while online to fill the cache"
    )


# --------------------------------------------------------------------------- resolution


def resolve_data_file(
    name: str,
    data_dir: str | Path | None = None,
    *,
    download: bool = True,
    progress: bool = False,
) -> Path:
    """Return a local, sha256-verified path for the manifest file ``name``.

    Order: ``data_dir`` (else ``$CPEBENCH_DATA``), then the cache, then a download
    into the cache (unless ``download`` is False or offline mode is set).
    """
    df = _lookup(name)

    # (1) user data dir: a present file must match; an absent one falls through.
    root = data_root(data_dir)
    if root is not None:
        # The manifest's layout (prompts/, anchors/, train/) first, then the original Hyun1A/CPE layout (a CPE checkout).
        for candidate in (root / df.name, root / df.source_path):
            if candidate.is_file():
                actual = sha256_file(candidate)
                if actual != df.sha256:
                    raise DataError(
                        f"{candidate}: sha256 mismatch for {df.name}: expected {df.sha256}, "
                        f"got {actual}; the file is not the pinned copy from "
                        f"{PINNED_REPO}@{PINNED_COMMIT[:7]}"
                    )
                return candidate

    # (2) user cache: a verified file is never re-downloaded; a bad one is replaced.
    cached = cache_dir() / "data" / df.name
    if cached.is_file():
        if sha256_file(cached) == df.sha256:
            return cached
        try:
            cached.unlink()
        except FileNotFoundError:
            pass

    # (3) download.
    if not download or _offline():
        why = "downloads are disabled" if not download else "offline mode is set (" + ", ".join(
            f"{v}={os.environ.get(v)}" for v in _OFFLINE_ENVS if os.environ.get(v)
        ) + ")"
        where = f"the data dir {root}" if root is not None else "a data dir (none given)"
        raise DataError(
            f"data file {df.name} is in neither {where} nor the cache {cached.parent.parent}, "
            f"and {why}; {_how_to_provide(df)}"
        )
    _download(df, cached, progress=progress)
    return cached


def _download(df: DataFile, dest: Path, *, progress: bool) -> None:
    url = df.url
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    except OSError as e:
        raise DataError(f"cannot write to the cache folder {dest.parent}: {e}") from e
    tmp = Path(tmp_name)
    try:
        h = hashlib.sha256()
        n = 0
        if progress:
            print(f"cpebench: downloading {df.name} from {url} ...", file=sys.stderr, flush=True)
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp:
                while True:
                    chunk = resp.read(_CHUNK)
                    if not chunk:
                        break
                    n += len(chunk)
                    if n > df.size:
                        break  # larger than the pinned file: cannot match, stop reading
                    h.update(chunk)
                    out.write(chunk)
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", None) or e
            raise DataError(
                f"could not download {df.name} from {url}: {reason}; "
                f"check the network, or {_how_to_provide(df)}"
            ) from e
        actual = h.hexdigest()
        if n != df.size or actual != df.sha256:
            raise DataError(
                f"{url}: sha256 mismatch for {df.name}: expected {df.sha256} ({df.size} bytes), "
                f"got {actual} ({n}{'+' if n > df.size else ''} bytes); nothing was cached"
            )
        os.replace(tmp, dest)
        if progress:
            print(f"cpebench: {df.name}: {n} bytes, sha256 ok -> {dest}", file=sys.stderr, flush=True)
    finally:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass


def fetch(names: Iterable[str], data_dir: str | Path | None = None, progress: bool = True) -> list[Path]:
    """Resolve (downloading where needed) each name; return the verified local paths."""
    if isinstance(names, str):
        names = [names]
    return [resolve_data_file(n, data_dir, download=True, progress=progress) for n in names]


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class PromptRecord:
    """One prompt row: id (unique in its set), text, seed, optional per-row CFG."""

    id: str
    prompt: str
    seed: int
    guidance: float | None
    split: str
    concept: str | None
    extras: Mapping[str, Any] = field(default_factory=dict, hash=False, compare=True)

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "prompt": self.prompt,
            "seed": self.seed,
            "guidance": self.guidance,
            "split": self.split,
            "concept": self.concept,
            "extras": dict(self.extras),
        }


class _Where:
    """Location of a cell, for error messages: file, 1-based data row, row id, column."""

    __slots__ = ("source", "row", "row_id")

    def __init__(self, source: str, row: int, row_id: str | None = None):
        self.source = source
        self.row = row
        self.row_id = row_id

    def at(self, column: str | None = None) -> str:
        s = f"{self.source}: row {self.row}"
        if self.row_id is not None and self.row_id != "":
            s += f" (id {self.row_id!r})"
        if column is not None:
            s += f", column {column!r}"
        return s


def _parse_int(value: Any, where: _Where, column: str, *, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(value, bool):
        raise DataError(f"{where.at(column)}: expected an integer, got {value!r}")
    if isinstance(value, int):
        out = value
    else:
        text = str(value).strip() if value is not None else ""
        try:
            d = Decimal(text)
        except InvalidOperation:
            raise DataError(f"{where.at(column)}: expected an integer, got {value!r}") from None
        if not d.is_finite() or d != d.to_integral_value():
            raise DataError(f"{where.at(column)}: expected an integer, got {value!r}")
        out = int(d)
    if (lo is not None and out < lo) or (hi is not None and out > hi):
        raise DataError(f"{where.at(column)}: value {out} is outside [{lo}, {hi}]")
    return out


def _parse_seed(value: Any, where: _Where, column: str) -> int:
    # torch.Generator.manual_seed takes a uint64; negative seeds are refused here.
    return _parse_int(value, where, column, lo=0, hi=2**64 - 1)


def _parse_float(value: Any, where: _Where, column: str) -> float:
    if isinstance(value, bool):
        raise DataError(f"{where.at(column)}: expected a number, got {value!r}")
    try:
        out = float(value if isinstance(value, (int, float)) else str(value).strip())
    except (TypeError, ValueError):
        raise DataError(f"{where.at(column)}: expected a number, got {value!r}") from None
    if out != out or out in (float("inf"), float("-inf")):
        raise DataError(f"{where.at(column)}: expected a finite number, got {value!r}")
    return out


def _read_csv(path: Path, required: Iterable[str]) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Read a CSV into (header, [(1-based data row, row dict)]), checking the columns."""
    try:
        f = open(path, encoding="utf-8-sig", newline="")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e}") from e
    rows: list[tuple[int, dict[str, str]]] = []
    with f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path}: empty file, no header row")
            missing = [c for c in required if c not in header]
            if missing:
                raise DataError(
                    f"{path}: missing column(s) {', '.join(repr(c) for c in missing)}; "
                    f"columns found: {', '.join(repr(c) for c in header)}"
                )
            n = 0
            for cells in reader:
                if not cells:
                    continue  # a blank line
                n += 1
                if len(cells) != len(header):
                    raise DataError(
                        f"{path}: row {n} (line {reader.line_num}) has {len(cells)} fields, "
                        f"the header has {len(header)}"
                    )
                rows.append((n, dict(zip(header, cells))))
        except csv.Error as e:
            raise DataError(f"{path}: CSV error near line {reader.line_num}: {e}") from e
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not valid UTF-8: {e}") from e
    return header, rows


_CELEB_TEMPLATES = tuple(
    re.compile(p)
    for p in (
        r"A portrait of (?P<c>.+)",
        r"An image capturing (?P<c>.+) at a public event",
        r"An oil painting of (?P<c>.+)",
        r"A sketch of (?P<c>.+)",
        r"(?P<c>.+) in an official photo",
    )
)


def _celebrity_name(prompt: str, where: _Where) -> str:
    for pat in _CELEB_TEMPLATES:
        m = pat.fullmatch(prompt)
        if m and m.group("c").strip():
            return m.group("c").strip()
    raise DataError(
        f"{where.at('prompt')}: prompt {prompt!r} matches none of the 5 celebrity templates "
        "('A portrait of X', 'An image capturing X at a public event', 'An oil painting of X', "
        "'A sketch of X', 'X in an official photo'), so the celebrity name cannot be derived"
    )


# Per format: (id column, required columns, row -> (guidance, concept, extras)).
_RowFn = Callable[[dict, _Where, str], tuple]


def _i2p_row(row: dict[str, str], where: _Where, prompt: str):
    guidance = _parse_float(row["evaluation_guidance"], where, "evaluation_guidance")
    extras: dict[str, Any] = {}
    if "categories" in row:
        extras["categories"] = row["categories"].strip()
    if "hard" in row:
        extras["hard"] = _parse_int(row["hard"], where, "hard")
    for col in ("inappropriate_percentage", "nudity_percentage"):
        if col in row:
            extras[col] = _parse_float(row[col], where, col)
    for col in ("sd_image_width", "sd_image_height"):
        if col in row:
            extras[col] = _parse_int(row[col], where, col, lo=1)
    return guidance, None, extras


def _coco_row(row: dict[str, str], where: _Where, prompt: str):
    return None, None, {"coco_id": _parse_int(row["coco_id"], where, "coco_id", lo=0)}


def _typed_extras(row: dict[str, str]) -> dict[str, Any]:
    return {"type": row["type"].strip()} if "type" in row else {}


def _celebrity_row(row: dict[str, str], where: _Where, prompt: str):
    return None, _celebrity_name(prompt, where), _typed_extras(row)


def _artist_row(row: dict[str, str], where: _Where, prompt: str):
    artist = row["artist"].strip()
    if not artist:
        raise DataError(f"{where.at('artist')}: empty artist name")
    return None, artist, _typed_extras(row)


def _character_row(row: dict[str, str], where: _Where, prompt: str):
    pre = row["pre"].strip()
    if not pre:
        raise DataError(f"{where.at('pre')}: empty character word")
    return None, pre, {"target": row["target"].strip(), "sim": _parse_float(row["sim"], where, "sim")}


_FORMATS: dict[str, tuple[str, tuple[str, ...], _RowFn]] = {
    "i2p": ("case_number", ("case_number", "prompt", "evaluation_seed", "evaluation_guidance"), _i2p_row),
    "coco": ("case_number", ("case_number", "prompt", "evaluation_seed", "coco_id"), _coco_row),
    "celebrity": ("", ("", "prompt", "evaluation_seed"), _celebrity_row),
    "artist": ("", ("", "artist", "prompt", "evaluation_seed"), _artist_row),
    "character": ("", ("", "pre", "target", "sim", "prompt", "evaluation_seed"), _character_row),
}


def _finish(records: list[PromptRecord], *, dedupe: bool, limit: int | None, source: str,
            rows: list[int]) -> list[PromptRecord]:
    """Dedupe by prompt text, refuse duplicate ids, apply the limit."""
    out: list[PromptRecord] = []
    seen_prompts: set[str] = set()
    seen_ids: dict[str, int] = {}
    for rec, n in zip(records, rows):
        if dedupe:
            if rec.prompt in seen_prompts:
                continue
            seen_prompts.add(rec.prompt)
        if rec.id in seen_ids:
            raise DataError(
                f"{source}: row {n} (id {rec.id!r}), column 'id': duplicate row id, "
                f"first used on row {seen_ids[rec.id]}"
            )
        seen_ids[rec.id] = n
        out.append(rec)
    if limit is not None:
        out = out[:limit]
    return out


def _check_limit(limit: int | None, source: str) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise DataError(f"{source}: limit must be a non-negative integer or None, got {limit!r}")


def _make_loader(fmt: str) -> Callable[..., list[PromptRecord]]:
    id_col, required, row_fn = _FORMATS[fmt]

    def loader(
        path: str | Path,
        *,
        split: str,
        drop_empty: bool = False,
        dedupe: bool = False,
        limit: int | None = None,
    ) -> list[PromptRecord]:
        path = Path(path)
        source = str(path)
        _check_limit(limit, source)
        _, rows = _read_csv(path, required)
        records: list[PromptRecord] = []
        numbers: list[int] = []
        for n, row in rows:
            rid = row[id_col].strip()
            where = _Where(source, n, rid)
            if not rid:
                raise DataError(f"{where.at(id_col)}: empty row id")
            prompt = row["prompt"].strip()
            if not prompt:
                if drop_empty:
                    continue
                raise DataError(f"{where.at('prompt')}: empty prompt (load with drop_empty=True to skip such rows)")
            seed = _parse_seed(row["evaluation_seed"], where, "evaluation_seed")
            guidance, concept, extras = row_fn(row, where, prompt)
            records.append(PromptRecord(rid, prompt, seed, guidance, split, concept, extras))
            numbers.append(n)
        return _finish(records, dedupe=dedupe, limit=limit, source=source, rows=numbers)

    loader.__name__ = f"load_{fmt}"
    loader.__qualname__ = loader.__name__
    loader.__doc__ = (
        f"Load a {fmt!r} prompt CSV (required columns: {', '.join(repr(c) for c in required)}; "
        f"row id column {id_col!r})."
    )
    return loader


LOADERS: dict[str, Callable[..., list[PromptRecord]]] = {fmt: _make_loader(fmt) for fmt in _FORMATS}


def load_prompt_set(
    path: str | Path,
    format: str,
    *,
    split: str,
    drop_empty: bool = False,
    dedupe: bool = False,
    limit: int | None = None,
) -> list[PromptRecord]:
    """Parse a prompt CSV of the given format into records (see :data:`LOADERS`)."""
    loader = LOADERS.get(format) if isinstance(format, str) else None
    if loader is None:
        raise DataError(
            f"{path}: unknown prompt-set format {format!r}; known formats: {', '.join(sorted(LOADERS))}"
        )
    return loader(path, split=split, drop_empty=drop_empty, dedupe=dedupe, limit=limit)


_INLINE_KEYS = ("id", "prompt", "seed", "guidance", "concept")


def records_from_inline(rows: list[dict], *, split: str, source: str) -> list[PromptRecord]:
    """Records from a YAML-inlined prompt list.

    Each item is a mapping with ``prompt`` and ``seed`` (required), and optionally
    ``id`` (default: the 0-based position), ``guidance``, ``concept``; any other
    key goes to ``extras``. ``source`` names the YAML file in error messages.
    """
    if not isinstance(rows, (list, tuple)):
        raise DataError(f"{source}: the prompt list must be a list of mappings, got {type(rows).__name__}")
    records: list[PromptRecord] = []
    numbers: list[int] = []
    for i, row in enumerate(rows):
        n = i + 1
        if not isinstance(row, Mapping):
            raise DataError(f"{source}: row {n}: expected a mapping with 'prompt' and 'seed', got {row!r}")
        raw_id = row.get("id")
        rid = str(i) if raw_id is None else str(raw_id).strip()
        where = _Where(source, n, rid)
        if not rid:
            raise DataError(f"{where.at('id')}: empty row id")
        for key in ("prompt", "seed"):
            if key not in row:
                raise DataError(f"{where.at(key)}: missing required key {key!r}; keys found: {sorted(map(str, row))}")
        if not isinstance(row["prompt"], str):
            raise DataError(f"{where.at('prompt')}: expected a string, got {row['prompt']!r}")
        prompt = row["prompt"].strip()
        if not prompt:
            raise DataError(f"{where.at('prompt')}: empty prompt")
        seed = _parse_seed(row["seed"], where, "seed")
        guidance = None if row.get("guidance") is None else _parse_float(row["guidance"], where, "guidance")
        concept = row.get("concept")
        if concept is not None:
            if not isinstance(concept, str):
                raise DataError(f"{where.at('concept')}: expected a string, got {concept!r}")
            concept = concept.strip() or None
        extras = {str(k): v for k, v in row.items() if k not in _INLINE_KEYS}
        records.append(PromptRecord(rid, prompt, seed, guidance, split, concept, extras))
        numbers.append(n)
    return _finish(records, dedupe=False, limit=None, source=source, rows=numbers)
