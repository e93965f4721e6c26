"""Tests for cpebench.data: manifest, resolution order, downloads (local server only), loaders."""

from __future__ import annotations

import csv
import hashlib
import http.server
import shutil
import threading
from pathlib import Path

import pytest
import yaml

from cpebench import data
from cpebench.data import (
    DATA_FILES,
    DEFAULT_BASE_URL,
    LOADERS,
    PINNED_COMMIT,
    PromptRecord,
    cache_dir,
    default_data_dir,
    fetch,
    load_prompt_set,
    records_from_inline,
    resolve_data_file,
    sha256_file,
)
from cpebench.errors import DataError

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

needs_shared = pytest.mark.skipif(
    not (SHARED_DATA / "prompts").is_dir(), reason=f"shared data folder not found at {SHARED_DATA}"
)


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    """No test may reach the internet or the real user cache."""
    monkeypatch.setenv("CPEBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("CPEBENCH_DATA", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("CPEBENCH_OFFLINE", "1")
    # A dead local URL as a safety net, should offline mode ever be lifted by mistake.
    monkeypatch.setenv("CPEBENCH_DATA_URL", "http://127.0.0.1:9/no-such-mirror")
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


def _shared(name: str) -> Path:
    p = SHARED_DATA / name
    if not p.is_file():
        pytest.skip(f"{p} not available")
    return p


# --------------------------------------------------------------------------- manifest


def test_manifest_shape():
    cpe = [f for f in DATA_FILES.values() if f.repo == "Hyun1A/CPE"]
    others = [f for f in DATA_FILES.values() if f.repo != "Hyun1A/CPE"]
    assert len(cpe) == 18 and sum(f.size for f in cpe) == 4_942_337
    # the attack and object sets: 32 files of 3,919,074 bytes in six repositories, of which 6 are licences
    assert len(others) == 26 and sum(f.size for f in others) == 3_919_074 - 16_715
    assert DEFAULT_BASE_URL == f"https://raw.githubusercontent.com/Hyun1A/CPE/{PINNED_COMMIT}"
    for name, f in DATA_FILES.items():
        assert f.name == name
        assert len(f.sha256) == 64 and int(f.sha256, 16) >= 0
        assert f.origin and "\n" not in f.origin
    assert DATA_FILES["train/celeb_targets.yaml"].source_path == "configs/train_celeb/prompt.yaml"


def test_url_default_and_override(monkeypatch):
    f = DATA_FILES["prompts/coco_30k.csv"]
    monkeypatch.delenv("CPEBENCH_DATA_URL")
    assert f.url == f"{DEFAULT_BASE_URL}/generation_prompts/coco_30k.csv"
    monkeypatch.setenv("CPEBENCH_DATA_URL", "http://mirror.example/cpe/")
    assert f.url == "http://mirror.example/cpe/generation_prompts/coco_30k.csv"


@needs_shared
@pytest.mark.parametrize("name", sorted(DATA_FILES))
def test_manifest_matches_real_files(name):
    p = _shared(name)
    f = DATA_FILES[name]
    assert p.stat().st_size == f.size
    assert sha256_file(p) == f.sha256


def test_cache_and_data_dir_env(monkeypatch, tmp_path):
    assert cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("CPEBENCH_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "cpebench"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "cpebench"
    assert default_data_dir() is None
    monkeypatch.setenv("CPEBENCH_DATA", str(tmp_path / "d"))
    assert default_data_dir() == tmp_path / "d"


# --------------------------------------------------------------------------- resolution


NAME_SMALL = "train/explicit_targets.yaml"  # 994 bytes
NAME_SMALL2 = "train/explicit_prompt_templates.csv"  # 1,435 bytes


def _copy_into(root: Path, name: str, layout: str = "local") -> Path:
    f = DATA_FILES[name]
    dest = root / (f.name if layout == "local" else f.source_path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_shared(name), dest)
    return dest


@needs_shared
def test_resolve_data_dir_hit(tmp_path, monkeypatch):
    d = tmp_path / "mydata"
    p = _copy_into(d, NAME_SMALL)
    assert resolve_data_file(NAME_SMALL, d) == p
    # via the env variable too
    monkeypatch.setenv("CPEBENCH_DATA", str(d))
    assert resolve_data_file(NAME_SMALL) == p
    # and straight from the real shared folder
    assert resolve_data_file(NAME_SMALL, SHARED_DATA) == SHARED_DATA / NAME_SMALL


@needs_shared
def test_resolve_data_dir_in_cpe_layout(tmp_path):
    d = tmp_path / "CPE"
    p = _copy_into(d, NAME_SMALL, layout="source")
    assert resolve_data_file(NAME_SMALL, d) == p


@needs_shared
def test_resolve_data_dir_miss_falls_through_to_cache(tmp_path):
    cached = _copy_into(tmp_path / "cache" / "data", NAME_SMALL)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert resolve_data_file(NAME_SMALL, empty) == cached


@needs_shared
def test_resolve_data_dir_checksum_mismatch(tmp_path):
    d = tmp_path / "mydata"
    p = _copy_into(d, NAME_SMALL)
    p.write_bytes(p.read_bytes() + b"# tampered\n")
    # a good cached copy must not mask a bad file the user pointed at
    _copy_into(tmp_path / "cache" / "data", NAME_SMALL)
    with pytest.raises(DataError) as ei:
        resolve_data_file(NAME_SMALL, d)
    msg = str(ei.value)
    assert str(p) in msg
    assert DATA_FILES[NAME_SMALL].sha256 in msg
    assert hashlib.sha256(p.read_bytes()).hexdigest() in msg


@pytest.mark.parametrize("env", ["CPEBENCH_OFFLINE", "HF_HUB_OFFLINE", None])
def test_offline_nothing_cached(monkeypatch, tmp_path, env):
    monkeypatch.delenv("CPEBENCH_OFFLINE")
    kwargs = {}
    if env:
        monkeypatch.setenv(env, "1")
    else:
        kwargs["download"] = False
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as ei:
        resolve_data_file(NAME_SMALL, tmp_path / "empty", **kwargs)
    msg = str(ei.value)
    assert NAME_SMALL in msg and "--data-dir" in msg and "CPEBENCH_DATA" in msg
    assert "cpebench data fetch" in msg


def test_unknown_name():
    with pytest.raises(DataError) as ei:
        resolve_data_file("prompts/nope.csv")
    assert "prompts/coco_30k.csv" in str(ei.value)


# --------------------------------------------------------------------------- downloads


class _Server:
    """A local http.server over a folder laid out like Hyun1A/CPE; counts GET requests."""

    def __init__(self, root: Path):
        self.root = root
        self.requests: list[str] = []
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **kw):
                super().__init__(*a, directory=str(root), **kw)

            def do_GET(self):  # noqa: N802
                server.requests.append(self.path)
                super().do_GET()

            def log_message(self, *a):  # keep test output quiet
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(5)


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    root = tmp_path / "mirror"
    for name in (NAME_SMALL, NAME_SMALL2):
        _copy_into(root, name, layout="source")
    monkeypatch.delenv("CPEBENCH_OFFLINE")
    with _Server(root) as srv:
        monkeypatch.setenv("CPEBENCH_DATA_URL", srv.url)
        yield srv


@needs_shared
def test_download_into_cache_once(mirror, tmp_path):
    f = DATA_FILES[NAME_SMALL]
    p = resolve_data_file(NAME_SMALL)
    assert p == tmp_path / "cache" / "data" / NAME_SMALL
    assert sha256_file(p) == f.sha256
    assert mirror.requests == ["/" + f.source_path]
    # second resolve: verified cache hit, no request
    assert resolve_data_file(NAME_SMALL) == p
    assert len(mirror.requests) == 1
    # no temp files left behind
    assert sorted(x.name for x in p.parent.iterdir()) == [Path(NAME_SMALL).name]


@needs_shared
def test_fetch_several(mirror, tmp_path, capsys):
    paths = fetch([NAME_SMALL, NAME_SMALL2], progress=True)
    assert [p.name for p in paths] == ["explicit_targets.yaml", "explicit_prompt_templates.csv"]
    assert all(sha256_file(p) == DATA_FILES[n].sha256 for p, n in zip(paths, [NAME_SMALL, NAME_SMALL2]))
    assert "downloading" in capsys.readouterr().err
    assert yaml.safe_load(paths[0].read_text())[0]["target"] == "nudity"


@needs_shared
def test_corrupt_cache_is_replaced(mirror, tmp_path):
    bad = tmp_path / "cache" / "data" / NAME_SMALL
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"garbage")
    p = resolve_data_file(NAME_SMALL)
    assert p == bad and sha256_file(p) == DATA_FILES[NAME_SMALL].sha256
    assert len(mirror.requests) == 1


@needs_shared
def test_corrupt_download_refused(mirror, tmp_path):
    f = DATA_FILES[NAME_SMALL]
    served = mirror.root / f.source_path
    served.write_bytes(served.read_bytes().replace(b"nudity", b"nudeee"))
    with pytest.raises(DataError) as ei:
        resolve_data_file(NAME_SMALL)
    msg = str(ei.value)
    assert mirror.url in msg and f.sha256 in msg
    assert hashlib.sha256(served.read_bytes()).hexdigest() in msg
    folder = tmp_path / "cache" / "data" / "train"
    assert not folder.exists() or list(folder.iterdir()) == []


def test_download_http_error(mirror):
    # the mirror does not hold this file: 404
    with pytest.raises(DataError) as ei:
        resolve_data_file("prompts/coco_30k.csv")
    msg = str(ei.value)
    assert mirror.url + "/generation_prompts/coco_30k.csv" in msg and "--data-dir" in msg


def test_download_network_error(monkeypatch):
    monkeypatch.delenv("CPEBENCH_OFFLINE")
    with _Server(Path(".")) as srv:
        dead = srv.url  # the port is closed once the server is gone
    monkeypatch.setenv("CPEBENCH_DATA_URL", dead)
    with pytest.raises(DataError) as ei:
        resolve_data_file(NAME_SMALL)
    assert dead in str(ei.value) and "--data-dir" in str(ei.value)


# --------------------------------------------------------------------------- loaders on real files


def _load(name, fmt, **kw):
    return load_prompt_set(_shared(name), fmt, **kw)


@needs_shared
def test_i2p():
    raw_rows = list(csv.reader(open(_shared("prompts/I2P_prompts_4703.csv"), encoding="utf-8", newline="")))
    assert len(raw_rows) - 1 == 4703
    with pytest.raises(DataError) as ei:
        _load("prompts/I2P_prompts_4703.csv", "i2p", split="erased")
    msg = str(ei.value)
    assert "I2P_prompts_4703.csv" in msg and "row 2261" in msg and "'2260'" in msg and "'prompt'" in msg
    recs = _load("prompts/I2P_prompts_4703.csv", "i2p", split="erased", drop_empty=True)
    assert len(recs) == 4702
    assert "2260" not in {r.id for r in recs}
    r0 = recs[0]
    assert r0.id == "0" and r0.seed == 4261553411 and r0.guidance == 13.0 and r0.split == "erased"
    assert r0.concept is None
    assert r0.prompt.startswith("weird and disturbing") and r0.prompt == r0.prompt.strip()
    assert r0.extras["categories"] == "violence, self-harm" and r0.extras["hard"] == 1
    assert r0.extras["nudity_percentage"] == 0.0 and r0.extras["sd_image_width"] == 512
    seeds = [r.seed for r in recs]
    assert max(seeds) == 4_290_749_014 and sum(s > 2**31 for s in seeds) > 0
    assert all(type(s) is int for s in seeds)
    guid = [r.guidance for r in recs]
    assert min(guid) == 1.0 and max(guid) == 255.0
    assert sum(g == 7.0 for g in guid) == 3728  # 3,729 rows minus the empty case 2260
    assert sum("sexual" in r.extras["categories"] for r in recs) == 931
    assert len(_load("prompts/I2P_prompts_4703.csv", "i2p", split="x", drop_empty=True, limit=10)) == 10


@needs_shared
def test_coco():
    recs = _load("prompts/coco_30k.csv", "coco", split="coco")
    assert len(recs) == 30000
    assert [r.id for r in recs[:3]] == ["0", "1", "2"]
    assert recs[0].extras == {"coco_id": 203564} and recs[0].seed == 41337 and recs[0].guidance is None
    assert all(r.prompt == r.prompt.strip() and r.prompt for r in recs)
    assert len({r.extras["coco_id"] for r in recs}) == 30000


@needs_shared
def test_celebrity_sets():
    erased = _load("prompts/celebrity_50_erased.csv", "celebrity", split="erased")
    assert len(erased) == 1250
    concepts = list(dict.fromkeys(r.concept for r in erased))
    assert len(concepts) == 50 and concepts[0] == "Adam Driver" and concepts[-1] == "Jennifer Lawrence"
    assert {r.seed for r in erased} == {1, 2, 3, 4, 5}
    assert erased[0].extras == {"type": "erased"} and erased[-1].id == "1249"
    remained = _load("prompts/celebrity_100_remained.csv", "celebrity", split="remained")
    assert len(remained) == 2500
    assert remained[0].id == "2500" and remained[-1].id == "4999"
    names = list(dict.fromkeys(r.concept for r in remained))
    assert len(names) == 100 and names[0] == "Aaron Paul" and names[-1] == "Robert De Niro"
    # every concept gets exactly 5 templates x 5 seeds
    for name in concepts:
        assert sum(r.concept == name for r in erased) == 25


@needs_shared
def test_artist_sets():
    erased = _load("prompts/art_100_erased.csv", "artist", split="erased")
    assert len(erased) == 2500
    artists = list(dict.fromkeys(r.concept for r in erased))
    assert len(artists) == 100 and artists[0] == "Brent Heighton" and artists[-1] == "Clemens Ascher"
    assert erased[0].extras == {"type": "0"}
    remained = _load("prompts/art_100_remained.csv", "artist", split="remained")
    assert len(remained) == 2500 and remained[0].id == "2500" and remained[0].concept == "A.J.Casson"


@needs_shared
def test_character():
    raw = _load("prompts/character_64.csv", "character", split="character")
    assert len(raw) == 325
    assert all(r.seed == 0 for r in raw)
    recs = _load("prompts/character_64.csv", "character", split="character", dedupe=True)
    assert len(recs) == 320
    assert [r.id for r in recs] == [str(i) for i in range(320)]
    assert len({r.concept for r in recs}) == 64
    assert recs[0].concept == "mario" and recs[0].extras["target"] == "luigi"
    assert recs[0].extras["sim"] == 0.8099433183670044     # the file's decimal string, parsed: exact
    assert len({r.extras["target"] for r in recs}) == 17


# --------------------------------------------------------------------------- bad inputs


def _write(tmp_path: Path, text: str, name: str = "bad.csv") -> Path:
    p = tmp_path / name
    p.write_text(text, encoding="utf-8", newline="")
    return p


def test_missing_column(tmp_path):
    p = _write(tmp_path, ",type,prompt\n0,erased,A portrait of X\n")
    with pytest.raises(DataError) as ei:
        load_prompt_set(p, "celebrity", split="erased")
    msg = str(ei.value)
    assert "bad.csv" in msg and "'evaluation_seed'" in msg and "'type'" in msg


def test_empty_prompt(tmp_path):
    p = _write(tmp_path, ",type,prompt,evaluation_seed\n7,erased,A portrait of X,1\n8,erased,\"  \n\",2\n")
    with pytest.raises(DataError) as ei:
        load_prompt_set(p, "celebrity", split="erased")
    msg = str(ei.value)
    assert "bad.csv" in msg and "row 2" in msg and "'8'" in msg and "'prompt'" in msg
    recs = load_prompt_set(p, "celebrity", split="erased", drop_empty=True)
    assert [r.id for r in recs] == ["7"]


@pytest.mark.parametrize("seed", ["x", "1.5", "", "-3", "nan"])
def test_bad_seed(tmp_path, seed):
    p = _write(tmp_path, f"case_number,source,prompt,evaluation_seed,coco_id\n0,c,a cat,1,5\n1,c,a dog,{seed},6\n")
    with pytest.raises(DataError) as ei:
        load_prompt_set(p, "coco", split="coco")
    msg = str(ei.value)
    assert "bad.csv" in msg and "row 2" in msg and "'1'" in msg and "'evaluation_seed'" in msg


def test_seed_float_form_and_multiline(tmp_path):
    p = _write(
        tmp_path,
        "case_number,source,prompt,evaluation_seed,coco_id\r\n0,c,\"  a cat\non a mat\n\",4290749014.0,5\r\n",
    )
    (r,) = load_prompt_set(p, "coco", split="coco")
    assert r.seed == 4290749014 and type(r.seed) is int and r.prompt == "a cat\non a mat"


def test_bad_guidance(tmp_path):
    p = _write(tmp_path, "case_number,prompt,evaluation_seed,evaluation_guidance\n0,a cat,1,high\n")
    with pytest.raises(DataError) as ei:
        load_prompt_set(p, "i2p", split="erased")
    assert "row 1" in str(ei.value) and "'evaluation_guidance'" in str(ei.value)


def test_celebrity_no_template(tmp_path):
    p = _write(tmp_path, ",type,prompt,evaluation_seed\n0,erased,A photo of Adam Driver,1\n")
    with pytest.raises(DataError) as ei:
        load_prompt_set(p, "celebrity", split="erased")
    msg = str(ei.value)
    assert "bad.csv" in msg and "row 1" in msg and "'0'" in msg and "template" in msg


def test_unknown_format(tmp_path):
    p = _write(tmp_path, "a\n1\n")
    with pytest.raises(DataError) as ei:
        load_prompt_set(p, "parquet", split="x")
    for k in LOADERS:
        assert k in str(ei.value)


def test_duplicate_ids_and_dedupe(tmp_path):
    text = ",type,artist,prompt,evaluation_seed\n0,0,Y,Art inspired by Y,1\n0,0,Y,Art inspired by Y,1\n"
    p = _write(tmp_path, text)
    with pytest.raises(DataError) as ei:
        load_prompt_set(p, "artist", split="erased")
    assert "duplicate" in str(ei.value) and "row 2" in str(ei.value)
    assert len(load_prompt_set(p, "artist", split="erased", dedupe=True)) == 1


def test_ragged_row_and_missing_file(tmp_path):
    p = _write(tmp_path, ",type,prompt,evaluation_seed\n0,erased,A sketch of Z\n")
    with pytest.raises(DataError, match="row 1"):
        load_prompt_set(p, "celebrity", split="e")
    with pytest.raises(DataError, match="not found"):
        load_prompt_set(tmp_path / "missing.csv", "celebrity", split="e")


# --------------------------------------------------------------------------- inline / records


def test_records_from_inline():
    rows = [
        {"prompt": " a cat ", "seed": 3},
        {"id": 10, "prompt": "a dog", "seed": "4", "guidance": 5, "concept": "dog", "tag": "pets"},
    ]
    recs = records_from_inline(rows, split="custom", source="task.yaml")
    assert recs[0] == PromptRecord("0", "a cat", 3, None, "custom", None, {})
    assert recs[1].id == "10" and recs[1].guidance == 5.0 and recs[1].concept == "dog"
    assert recs[1].extras == {"tag": "pets"}
    assert recs[1].to_dict() == {
        "id": "10", "prompt": "a dog", "seed": 4, "guidance": 5.0,
        "split": "custom", "concept": "dog", "extras": {"tag": "pets"},
    }
    hash(recs[1])  # frozen and hashable despite the dict extras


@pytest.mark.parametrize(
    "rows, col",
    [
        ([{"seed": 1}], "prompt"),
        ([{"prompt": "x"}], "seed"),
        ([{"prompt": "", "seed": 1}], "prompt"),
        ([{"prompt": "x", "seed": "abc"}], "seed"),
        ([{"prompt": "x", "seed": 1, "id": "a"}, {"prompt": "y", "seed": 1, "id": "a"}], "id"),
    ],
)
def test_records_from_inline_errors(rows, col):
    with pytest.raises(DataError) as ei:
        records_from_inline(rows, split="s", source="task.yaml")
    msg = str(ei.value)
    assert "task.yaml" in msg and "row " in msg and f"'{col}'" in msg


def test_public_names():
    for n in data.__all__:
        assert hasattr(data, n)
    assert set(LOADERS) == {"i2p", "coco", "celebrity", "artist", "character", "attack", "erasurebench", "style_attack",
                            "objects", "coco10k", "mma"}
