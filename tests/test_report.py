"""Leaderboard tables, reported rows, LaTeX, the per-run grid and HTML report: hand-made summaries and
tiny PNGs, no generation."""

from __future__ import annotations

import csv
import io
import json
import random
import re
from pathlib import Path

import pytest
import yaml

from cpebench import report
from cpebench.errors import ConfigError
from cpebench.grid import cell_origin, comparable_runs, grid_size, make_grid, sample_keys, write_run_report
from cpebench.report import MARK, build_table, leaderboard, load_reported, render

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- helpers

def col(key, label, hib):
    return {"key": key, "label": label, "higher_is_better": hib}


def make_summary(task="celebrity", method="sd", model="m", preset=None, run=None, values=None, n=50,
                 created="2025-01-01T00:00:00+00:00", extra_card=None):
    values = values or {"acc_e": 90.0, "acc_r": 90.0, "h_o": 50.0}
    cols = [col("acc_e", "Acc_e", False), col("acc_r", "Acc_r", True), col("h_o", "H_o", True)]
    return {"task": task, "method": method, "model": model, "preset": preset,
            "run": run or f"{method}-{task}-{model}", "created": created,
            "metrics": {"gcd": {"name": "gcd", "values": values, "n": n, "info": {}, "columns": cols}},
            "protocol_card": {"protocol": "v1", **(extra_card or {})}}


def write_summary(runs: Path, s: dict) -> Path:
    d = runs / s["run"]
    d.mkdir(parents=True, exist_ok=True)
    (d / "summary.json").write_text(json.dumps(s))
    return d


def reported_entry(task="celebrity", method="paper-m", values=None, **kw):
    e = {"task": task, "method": method, "model": "CompVis/stable-diffusion-v1-4", "protocol": "their protocol",
         "values": values or {"acc_e": 1.5, "acc_r": 95.0}, "source": {"paper": "Some paper", "table": "Tab. 1"},
         "trust": "high", "protocol_differences": ["different sampler"]}
    e.update(kw)
    return e


def write_yaml(path: Path, entries) -> Path:
    path.write_text(yaml.safe_dump(entries, sort_keys=False))
    return path


def summaries_from(runs: Path) -> list[dict]:
    return report.find_summaries([runs])


def md_rows(text: str) -> list[list[str]]:
    """Data rows of the (only) Markdown table in ``text`` as cell lists (header and separator dropped)."""
    lines = [l for l in text.splitlines() if l.startswith("|")]
    return [[c.strip() for c in re.split(r"(?<!\\)\|", l)[1:-1]] for l in lines[2:]]


def latex_rows(text: str) -> list[str]:
    body = text.split("\\midrule", 1)[1].split("\\bottomrule", 1)[0]
    return [l for l in body.splitlines() if l.strip().endswith("\\\\")]


# --------------------------------------------------------------------------- reported.yaml


def test_shipped_reported_yaml_loads_and_validates():
    entries = load_reported(REPO / "results" / "reported.yaml")
    assert entries
    assert all(e.paper and (e.table or e.url) and e.trust in ("high", "medium", "low") and e.protocol_differences
               for e in entries)
    assert not [e for e in entries if e.method == "cpe" or "CPE" in e.paper]   # the CPE paper's numbers: none available
    gloce = [e for e in entries if e.method == "gloce"]
    assert len(gloce) == 1 and gloce[0].task == "celebrity" and gloce[0].trust == "medium"
    assert gloce[0].values == {"acc_e": 1.17, "acc_r": 95.17, "h_o": 96.97}
    # MACE issue 16's fractions are shown in % (as the gcd metric reports): UCE, 10 celebrities, ACC_e 0.0042
    uce10 = next(e for e in entries if e.task == "celebrity-mace-10" and e.method == "uce")
    assert uce10.values["acc_e"] == pytest.approx(0.42) and uce10.values["acc_r"] == pytest.approx(83.51)
    # MACE's protocol never shares the cpebench 50-celebrity table; UnlearnDiffAtk never a v1 nudity column
    assert {e.task for e in entries if "Shilin-LU/MACE/issues/16" in (e.url or "")} == {f"celebrity-mace-{k}" for k in (1, 5, 10, 100)}
    uda = [e for e in entries if "UnlearnDiffAtk" in e.paper]
    assert uda and {e.task for e in uda} == {"nudity-unlearndiffatk"}
    assert all(report.REPORTED_KEYS[k].metric == "unlearndiffatk" for e in uda for k in e.values)


@pytest.mark.parametrize("bad, needle", [
    ({"values": {"acc_x": 1.0}}, "values.acc_x: unknown column key"),
    ({"trust": "very"}, "trust: 'very'"),
    ({"trust": None}, "trust: missing"),
    ({"values_unit": "fraction", "values": {"acc_e": 12.0}}, "values.acc_e: 12.0 is not a fraction"),
    ({"values": {"acc_e": 140.0}}, "not a percentage"),
    ({"values": {"acc_e": "low"}}, "values.acc_e: expected a finite number"),
    ({"source": {"paper": "P"}}, "source: give the table/row or the URL"),
    ({"source": {"paper": "P", "page": 3, "table": "T"}}, "source.page: unknown field"),
    ({"colour": "red"}, "colour: unknown field"),
    ({"protocol_differences": "none"}, "protocol_differences: expected a non-empty list"),
    ({"task": "a/b"}, "not usable as a table file name"),
    ({"n": {"acc_r": 3}, "values": {"acc_e": 1.0}}, "n: expected"),
])
def test_bad_reported_yaml_names_the_entry_and_field(tmp_path, bad, needle):
    entries = [reported_entry(method="ok"), reported_entry(method="broken", **bad)]
    with pytest.raises(ConfigError) as e:
        load_reported(write_yaml(tmp_path / "r.yaml", entries))
    msg = str(e.value)
    assert "r.yaml: entry 1" in msg and needle in msg, msg


def test_fraction_unit_converts_only_percent_columns(tmp_path):
    """A paper printing accuracies as fractions next to FID and counts in one row (ANT Table 2): the
    fractions become %, the rest is kept as printed."""
    e = reported_entry(values_unit="fraction", values={"acc_e": 0.043, "face_ratio": 0.982, "fid_coco30k": 12.82})
    (r,) = load_reported(write_yaml(tmp_path / "f.yaml", [e]))
    assert r.values == {"acc_e": 4.3, "face_ratio": 98.2, "fid_coco30k": 12.82}


def test_bad_reported_yaml_shape_and_duplicates(tmp_path):
    with pytest.raises(ConfigError, match="expected a list of entries"):
        load_reported(write_yaml(tmp_path / "a.yaml", {"task": "x"}))
    with pytest.raises(ConfigError, match=r"entry 2 \(m on celebrity\): duplicate of entry 0"):
        load_reported(write_yaml(tmp_path / "b.yaml", [reported_entry(method="m"), reported_entry(method="n"),
                                                         reported_entry(method="m")]))
    # the same method from another paper is another row (each with its own mark)
    other = reported_entry(method="m", source={"paper": "Another paper", "table": "Tab. 2"})
    assert len(load_reported(write_yaml(tmp_path / "b2.yaml", [reported_entry(method="m"), other]))) == 2
    with pytest.raises(ConfigError, match="entry 0: expected a mapping"):
        load_reported(write_yaml(tmp_path / "c.yaml", ["just a string"]))
    with pytest.raises(ConfigError, match="no such file"):
        load_reported(tmp_path / "missing.yaml")


# --------------------------------------------------------------------------- the mark (property)


def random_case(rng: random.Random, tmp: Path):
    """Random reproduced summaries and reported entries for one task, reported methods sometimes sharing a
    reproduced method's name (e.g. a paper's own 'sd' row)."""
    runs = tmp / "runs"
    methods = rng.sample(["sd", "cpe", "esd", "uce", "mace", "rece"], rng.randint(0, 4))
    summaries = []
    for m in methods:
        vals = {k: round(rng.uniform(0, 100), 3) for k in ("acc_e", "acc_r", "h_o") if rng.random() < 0.9}
        summaries.append(make_summary(method=m, values=vals or {"acc_e": 1.0}, n=rng.randint(1, 2500)))
    for s in summaries:
        write_summary(runs, s)
    reported = []
    for i in range(rng.randint(0, 5)):
        keys = rng.sample(["acc_e", "acc_r", "h_o"], rng.randint(1, 3))
        name = rng.choice(methods + ["gloce", "fmn", "ac"]) if rng.random() < 0.5 else f"paper{i}"
        if any(e["method"] == name for e in reported):
            name = f"{name}-{i}"
        reported.append(reported_entry(method=name, values={k: round(rng.uniform(0, 100), 2) for k in keys},
                                       trust=rng.choice(["high", "medium", "low"]),
                                       note=rng.choice([None, "a note | with a pipe"])))
    if reported and rng.random() < 0.3:
        reported.append(reported_entry(task="other", method="elsewhere"))   # another table: never shown here
    rep = load_reported(write_yaml(tmp / "r.yaml", reported)) if reported else []
    return (summaries_from(runs) if summaries else []), rep


@pytest.mark.parametrize("seed", range(12))
def test_reported_rows_never_appear_without_their_mark(tmp_path, seed):
    rng = random.Random(seed)
    summaries, rep = random_case(rng, tmp_path)
    mine = [r for r in rep if r.task == "celebrity"]
    table = build_table(summaries, "celebrity", rep)

    # Markdown: every row is either a reproduced run (source "reproduced") or carries "reported †k" in its
    # method and source cells; the marked rows are exactly the reported entries, with their values.
    rows = md_rows(render(summaries, "celebrity", "md", rep))
    marked = [r for r in rows if r[-2].startswith(f"reported {MARK}")]
    assert len(marked) == len(mine)
    assert len(rows) - len(marked) == len(summaries)
    for r in rows:
        assert r[-2] in ("reproduced",) or re.fullmatch(rf"reported {MARK}\d+", r[-2]), r
        if r[-2] == "reproduced":
            assert MARK not in "".join(r)
        else:
            assert r[0].endswith(r[-2].split()[1])             # the method cell carries the same †k
    headers = [c.header for c in table.columns]
    for entry, r in zip(mine, marked):
        assert r[0].split()[0] == entry.method
        for k, v in entry.values.items():
            assert r[3 + headers.index(report.REPORTED_KEYS[k].header)] == f"{v:.2f}"
    text = render(summaries, "celebrity", "md", rep)
    for k in sorted({r.footnote for r in table.reported}):       # every mark has its note below the table
        assert re.search(rf"^{MARK}{k} .*reported by Some paper, Tab\. 1 \(trust: ", text, re.M)

    # CSV: a row's source and mark travel with its values.
    reader = list(csv.DictReader(io.StringIO(render(summaries, "celebrity", "csv", rep))))
    assert len(reader) == len(summaries) + len(mine)
    for row in reader:
        assert row["source"] in ("reproduced", "reported")
        if row["source"] == "reported":
            assert re.fullmatch(rf"{MARK}\d+", row["mark"]) and row["paper"] and row["trust"] and row["protocol_differences"]
        else:
            assert row["mark"] == "" and row["protocol_card"].endswith("summary.json") and not row["paper"]
    assert [r["method"] for r in reader if r["source"] == "reported"] == [e.method for e in mine]

    # LaTeX: each reported row has its dagger, none is bold; the note lines name every source.
    tex = render(summaries, "celebrity", "latex", rep)
    lines = latex_rows(tex)
    daggered = [l for l in lines if re.match(r"^[^&]*\$\^\{\\dagger\d+\}\$ &", l)]
    assert len(daggered) == len(mine) and len(lines) - len(daggered) == len(summaries)
    assert not [l for l in daggered if "\\textbf" in l]
    for entry, l in zip(mine, daggered):
        assert l.startswith(report.tex_escape(entry.method) + "$^{\\dagger")

    # HTML fragment (the per-run report): reported rows carry the class and the mark.
    frag = report.render_html_table(table)
    trs = re.findall(r'<tr class="([^"]*)">(.*?)</tr>', frag)
    assert sum("reported" in c.split() for c, _ in trs) == len(mine)
    assert all(f"<sup>{MARK}" in body and f"reported {MARK}" in body for c, body in trs if "reported" in c.split())


# --------------------------------------------------------------------------- LaTeX


def test_best_value_bold_follows_direction_and_ignores_reported(tmp_path):
    runs = tmp_path / "runs"
    write_summary(runs, make_summary(method="sd", values={"acc_e": 90.0, "acc_r": 80.0, "h_o": 20.0}))
    write_summary(runs, make_summary(method="cpe", values={"acc_e": 3.0, "acc_r": 70.0, "h_o": 80.0}))
    write_summary(runs, make_summary(method="esd", values={"acc_e": 5.0, "acc_r": 80.0, "h_o": 60.0}))
    rep = load_reported(write_yaml(tmp_path / "r.yaml", [reported_entry(method="gloce",
                                                                       values={"acc_e": 0.5, "acc_r": 99.0, "h_o": 99.0})]))
    tex = render(summaries_from(runs), "celebrity", "latex", rep)
    rows = {l.split(" & ")[0]: l.rstrip(" \\").split(" & ") for l in latex_rows(tex)}
    # Acc_e is lower-is-better: the minimum (3, cpe) is bold, not the reported 0.5; Acc_r ties are both bold.
    assert rows["cpe"][2] == r"\textbf{3}" and rows["sd"][2] == "90" and rows["esd"][2] == "5"
    assert rows["sd"][3] == r"\textbf{80}" and rows["esd"][3] == r"\textbf{80}" and rows["cpe"][3] == "70"
    assert rows["cpe"][4] == r"\textbf{80}"
    reported_row = next(v for k, v in rows.items() if k.startswith("gloce"))
    assert reported_row[2:] == ["0.50", "99.00", "99.00"]
    assert "reproduced by cpebench only" in tex and tex.count(r"\toprule") == 1 and r"\end{tabular}" in tex


def test_undirected_columns_are_never_bold(tmp_path):
    s1 = make_summary(method="a", values={"x": 1.0})
    s1["metrics"]["gcd"]["columns"] = [col("x", "x", None)]
    s2 = make_summary(method="b", values={"x": 2.0})
    s2["metrics"]["gcd"]["columns"] = [col("x", "x", None)]
    assert "\\textbf" not in render([s1, s2], "celebrity", "latex")


def test_latex_escapes_names_and_labels():
    s = make_summary(method="my_method & co 100% #1", model="org/model_v1", values={"acc_e": 1.0})
    s["metrics"]["gcd"]["columns"] = [col("acc_e", "KID×10³ art_remained {x}", False)]
    tex = render([s], "celebrity", "latex")
    (row,) = latex_rows(tex)
    assert row.startswith(r"my\_method \& co 100\% \#1 & org/model\_v1 & ")
    assert len(re.findall(r"(?<!\\)&", row)) == 2          # 3 columns: no unescaped & from the name
    assert r"KID$\times$10$^{3}$ art\_remained \{x\} $\downarrow$" in tex
    assert "%" not in row.replace(r"\%", "")


# --------------------------------------------------------------------------- Markdown / CSV details


def test_md_shows_n_per_cell_arrows_and_links_the_protocol_card(tmp_path):
    runs = tmp_path / "runs"
    s = make_summary(method="cpe", values={"acc_e": 2.5, "acc_r": 91.25, "h_o": 94.1, "acc_r_n": 2400}, n=1250)
    d = write_summary(runs, s)
    text = render(summaries_from(runs), "celebrity", "md", link_base=tmp_path)
    assert "| Acc_e ↓ | Acc_r ↑ | H_o ↑ |" in text
    (row,) = md_rows(text)
    assert row[3:6] == ["2.50 (n=1250)", "91.25 (n=2400)", "94.10 (n=1250)"]      # per-column n when recorded
    assert row[-2] == "reproduced" and f"(runs/{d.name}/summary.json)" in row[-1]


def test_latest_run_wins_and_sd_comes_first(tmp_path):
    runs = tmp_path / "runs"
    write_summary(runs, make_summary(method="cpe", run="old", values={"acc_e": 9.0}, created="2025-01-01"))
    write_summary(runs, make_summary(method="cpe", run="new", values={"acc_e": 1.0}, created="2025-02-01"))
    write_summary(runs, make_summary(method="sd", values={"acc_e": 95.0}))
    rows = md_rows(render(summaries_from(runs), "celebrity", "md"))
    assert [r[0] for r in rows] == ["sd", "cpe"] and rows[1][3] == "1 (n=50)"


def test_a_run_with_other_concepts_than_the_papers_is_its_own_marked_row(tmp_path):
    """generation.json's method block (kept in the protocol card) says whether the run erased the method
    paper's list for the task; a run that did not gets a labelled row of its own in every format."""
    def method_block(concepts, differ):
        return {"method": {"name": "uce", "concepts": concepts, "concepts_differ_from_paper": differ,
                           "paper_concepts": {"names": ["nudity"], "source": "train_erase.py --concepts nudity"}}}

    runs = tmp_path / "runs"
    write_summary(runs, make_summary(method="uce", run="paper", extra_card=method_block(["nudity"], False)))
    five = ["nudity", "naked", "erotic", "sexual", "nsfw"]
    write_summary(runs, make_summary(method="uce", run="other", extra_card=method_block(five, True)))
    label = "uce (concepts ≠ paper: nudity, naked, erotic, sexual, … (5))"
    summaries = summaries_from(runs)
    assert sorted(r[0] for r in md_rows(render(summaries, "celebrity", "md"))) == ["uce", label]
    assert sorted(r[0] for r in csv.reader(io.StringIO(render(summaries, "celebrity", "csv")))) == ["method", "uce", label]
    assert sorted(r.split(" & ")[0] for r in latex_rows(render(summaries, "celebrity", "latex"))) == [
        "uce", r"uce (concepts $\neq$ paper: nudity, naked, erotic, sexual, \ldots{} (5))"]


# --------------------------------------------------------------------------- leaderboard


def test_leaderboard_writes_one_file_pair_per_task(tmp_path):
    runs = tmp_path / "runs"
    write_summary(runs, make_summary(task="celebrity", method="sd"))
    write_summary(runs, make_summary(task="celebrity", method="cpe"))
    write_summary(runs, make_summary(task="nudity", method="sd"))
    path = write_yaml(tmp_path / "r.yaml", [reported_entry(task="celebrity", method="gloce"),
                                             reported_entry(task="celebrity-mace-10", method="uce"),
                                             reported_entry(task="celebrity-mace-5", method="uce")])
    out = tmp_path / "results"
    written = leaderboard(runs, out, load_reported(path), reported_path=path)
    tasks = ["celebrity", "celebrity-mace-5", "celebrity-mace-10", "nudity"]
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{t}.{x}" for t in tasks for x in ("md", "csv")]
                                                           + ["README.md"])
    assert len(written) == 2 * len(tasks) + 1
    index = (out / "README.md").read_text()
    assert [l.split("|")[1].strip() for l in index.splitlines() if l.startswith("| celebrity") or l.startswith("| nudity")] == tasks
    assert "[`r.yaml`](../r.yaml)" in index
    celeb = (out / "celebrity.md").read_text()
    assert "](../runs/sd-celebrity-m/summary.json)" in celeb and f"gloce {MARK}1" in celeb
    # a task with only reported rows
    assert md_rows((out / "celebrity-mace-10.md").read_text())[0][-2] == f"reported {MARK}1"
    # runs folder missing: the reported tables alone
    out2 = tmp_path / "results2"
    leaderboard(tmp_path / "nope", out2, load_reported(path))
    assert sorted(p.stem for p in out2.glob("*.csv")) == sorted(tasks[:3])


def test_cli_table_leaderboard_report(tmp_path, capsys):
    from cpebench.cli import main

    runs = tmp_path / "runs"
    write_summary(runs, make_summary(method="sd"))
    path = write_yaml(tmp_path / "r.yaml", [reported_entry(method="gloce")])
    capsys.readouterr()
    assert main(["-q", "table", str(runs), "--format", "latex", "--reported", str(path)]) == 0
    out = capsys.readouterr().out
    assert "\\begin{tabular}" in out and "gloce$^{\\dagger1}$" in out
    assert main(["-q", "table", str(runs), "--task", "celebrity", "--format", "csv", "--reported", "none"]) == 0
    assert "reported" not in capsys.readouterr().out.splitlines()[1]
    assert main(["-q", "table", str(runs), "--reported", str(tmp_path / "missing.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["-q", "leaderboard", str(runs), "--out", str(tmp_path / "res"), "--reported", str(path)]) == 0
    assert (tmp_path / "res" / "celebrity.csv").exists()


# --------------------------------------------------------------------------- grid and HTML


PROTOCOL = {"name": "v1", "model": "tiny", "steps": 4, "height": 64, "width": 64}


def make_run(root: Path, name: str, method: str, rows, *, task="nudity", protocol=PROTOCOL, color_seed=0,
             summary=None) -> Path:
    """A run folder with config.yaml, manifest.jsonl and random 64² PNGs. rows: (set, row_id, prompt, seed)."""
    import numpy as np
    from PIL import Image

    d = root / name
    (d / "images").mkdir(parents=True)
    (d / "config.yaml").write_text(yaml.safe_dump({"task": {"name": task}, "method": {"name": method},
                                                   "protocol": protocol}))
    rng = np.random.default_rng(color_seed)
    lines = []
    for set_name, row_id, prompt, seed in rows:
        f = f"images/{set_name}/{row_id}_0.png"
        (d / f).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(d / f)
        lines.append(json.dumps({"key": f"{set_name}/{row_id}/0", "file": f, "set": set_name, "row_id": row_id,
                                 "image_index": 0, "prompt": prompt, "negative_prompt": "", "seed": seed,
                                 "guidance": 7.5}))
    (d / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    if summary is not None:
        (d / "summary.json").write_text(json.dumps(summary))
    return d


ROWS = [("i2p", str(i), f"prompt number {i} " + "word " * i, 100 + i) for i in range(5)] + \
       [("coco", str(i), f"a caption {i}", 200 + i) for i in range(3)]


def test_sample_keys_is_deterministic_and_shares_rows_between_sets():
    entries = {f"{s}/{r}/{k}": {"set": s, "row_id": r} for s, r, _, _ in ROWS for k in range(2)}
    assert sample_keys(entries, per_set=2, max_rows=12) == ["i2p/0/0", "i2p/1/0", "coco/0/0", "coco/1/0"]
    assert sample_keys(entries, per_set=4, max_rows=4) == ["i2p/0/0", "i2p/1/0", "coco/0/0", "coco/1/0"]
    assert sample_keys(entries, per_set=4, max_rows=3) == ["i2p/0/0", "coco/0/0"]
    assert sample_keys({}, 4, 12) == []


def test_grid_size_columns_and_cells_equal_the_resized_sources(tmp_path):
    from PIL import Image, ImageOps

    runs = tmp_path / "runs"
    me = make_run(runs, "a-cpe", "cpe", ROWS, color_seed=1)
    make_run(runs, "z-sd", "sd", ROWS, color_seed=2)                         # the unedited run: first column
    make_run(runs, "b-esd", "esd", ROWS, color_seed=3)
    make_run(runs, "c-other-seeds", "uce", [(s, r, p, seed + 1) for s, r, p, seed in ROWS])   # other noise
    make_run(runs, "d-other-protocol", "rece", ROWS, protocol={**PROTOCOL, "steps": 2})
    make_run(runs, "e-other-task", "mace", ROWS, task="celebrity")
    (runs / "not-a-run").mkdir()
    cell = 32
    path = make_grid(me, per_set=2, max_rows=12, cell=cell)
    assert path == me / "grid.png"
    keys = ["i2p/0/0", "i2p/1/0", "coco/0/0", "coco/1/0"]
    cols = comparable_runs(me, keys)
    assert [c.run_dir.name for c in cols] == ["z-sd", "a-cpe", "b-esd"]
    with Image.open(path) as grid:
        assert grid.size == grid_size(len(keys), 3, cell)
        grid = grid.convert("RGB")
        for i, key in enumerate(keys):
            set_name, row_id, _ = key.split("/")
            for j, c in enumerate(cols):
                with Image.open(c.run_dir / f"images/{set_name}/{row_id}_0.png") as src:
                    want = ImageOps.contain(src.convert("RGB"), (cell, cell), Image.Resampling.LANCZOS)
                x, y = cell_origin(i, j, cell)
                assert list(grid.crop((x, y, x + cell, y + cell)).getdata()) == list(want.getdata()), (key, c.method)


def test_grid_runs_alone_and_marks_missing_images(tmp_path):
    from PIL import Image

    me = make_run(tmp_path / "runs", "solo", "cpe", ROWS[:2])
    (me / "images/i2p/1_0.png").unlink()
    path = make_grid(me, cell=40)
    with Image.open(path) as grid:
        assert grid.size == grid_size(2, 1, 40)
        x, y = cell_origin(1, 0, 40)
        assert grid.convert("RGB").getpixel((x + 39, y + 39)) == (200, 200, 200)


def test_html_report_shows_table_grid_and_protocol_card(tmp_path):
    runs = tmp_path / "runs"
    card_marker = {"sampler": {"scheduler": {"class": "PNDMScheduler"}, "steps": 4}, "marker": "card-<&>-42"}
    me = make_run(runs, "cpe-nudity-tiny", "cpe", ROWS[:3], task="celebrity",
                  summary=make_summary(method="cpe", run="cpe-nudity-tiny", extra_card=card_marker))
    make_run(runs, "sd-nudity-tiny", "sd", ROWS[:3], task="celebrity",
             summary=make_summary(method="sd", run="sd-nudity-tiny"))
    rep = load_reported(write_yaml(tmp_path / "r.yaml", [reported_entry(method="gloce")]))
    grid, page = write_run_report(me, reported=rep, cell=32)
    text = page.read_text()
    assert grid.exists() and page == me / "report.html"
    assert '<img class="grid" src="grid.png"' in text
    assert "PNDMScheduler" in text and "card-&lt;&amp;&gt;-42" in text          # the card, escaped
    card = json.loads(html_unescape(re.search(r'<pre class="protocol-card">(.*?)</pre>', text, re.S).group(1)))
    assert card["marker"] == "card-<&>-42" and card["protocol"] == "v1"
    assert '<tr class="reproduced this-run"><td>cpe</td>' in text and "<td>sd</td>" in text
    assert '<tr class="reported"><td>gloce <sup>†1</sup></td>' in text
    assert 'href="summary.json"' in text and 'href="../sd-nudity-tiny/summary.json"' in text
    assert "<script" not in text and "http" not in text.split("<h2>Protocol card</h2>")[0].replace("https://", "")


def html_unescape(s: str) -> str:
    import html

    return html.unescape(s)


def test_report_hook_never_raises(tmp_path, caplog):
    from cpebench.cli import _write_run_report

    _write_run_report(tmp_path / "not-a-run")
    assert "could not write the grid/HTML report" in caplog.text
