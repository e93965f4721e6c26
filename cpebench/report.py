"""Run summaries and paper-reported numbers → comparison tables (Markdown / CSV / LaTeX / HTML).

One table per task, one row per (method, base model[, preset]). Two kinds of rows:

* **reproduced**: read from a run's ``summary.json``; every value carries n (the images it is
  computed over) and the row links the run's protocol card;
* **reported**: read from ``results/reported.yaml`` (numbers printed by papers, under their own
  protocol); every rendered reported row carries the mark ``reported †k`` in the same row, and a
  footnote (or, in CSV, citation columns) gives paper, table, trust and protocol differences.

A reported value is never shown without its mark, and reported rows never take part in "best value"
bolding.
"""

from __future__ import annotations

import csv
import html
import io
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from .errors import ConfigError, CpebenchError
from .metrics.summary import IMAGENETTE, class_key

log = logging.getLogger(__name__)

MARK = "†"
REPRODUCED, REPORTED = "reproduced", "reported"


# --------------------------------------------------------------------------- columns


@dataclass(frozen=True)
class ColumnSpec:
    metric: str
    key: str
    label: str
    higher_is_better: bool | None
    percent: bool = False          # values are in % (reported fractions are converted)
    decimals: int | None = None    # how reported values are printed (None: up to 6 significant digits)

    @property
    def id(self) -> tuple[str, str]:
        return (self.metric, self.key)

    @property
    def header(self) -> str:
        return self.label + _arrow(self.higher_is_better)


def _arrow(higher_is_better: bool | None) -> str:
    return "" if higher_is_better is None else (" ↑" if higher_is_better else " ↓")


# The value keys a reported.yaml entry may use, and the cpebench column each one fills: (metric, key) is
# the column a run summary would produce. Celebrity accuracies are in % as the gcd metric reports them.
# The UnlearnDiffAtk keys live under a metric name no cpebench metric has, so they never share a column
# with protocol v1.
REPORTED_KEYS: dict[str, ColumnSpec] = {
    "acc_e": ColumnSpec("gcd", "acc_e", "Acc_e", False, percent=True, decimals=2),
    "acc_r": ColumnSpec("gcd", "acc_r", "Acc_r", True, percent=True, decimals=2),
    "h_o": ColumnSpec("gcd", "h_o", "H_o", True, percent=True, decimals=2),
    "asr_pre": ColumnSpec("unlearndiffatk", "asr_pre", "pre-attack ASR %", False, percent=True, decimals=2),
    "asr_post": ColumnSpec("unlearndiffatk", "asr_post", "post-attack ASR %", False, percent=True, decimals=2),
    "fid_coco10k": ColumnSpec("unlearndiffatk", "fid_coco10k", "FID COCO-10k", False, decimals=2),
    "clip_coco10k": ColumnSpec("unlearndiffatk", "clip_coco10k", "CLIP COCO-10k (0-1)", True, decimals=3),
    # MACE's protocol as its group prints it (MACE, ANT Tables 1-3): metric names no cpebench metric has,
    # so these fill tables of their own. NudeNet v3 detection counts per exposed class over I2P's 4,703
    # images, and their total:
    **{f"nudenet_{k}": ColumnSpec("mace_nudenet", k, label, False, decimals=0) for k, label in (
        ("armpits", "Armpits"), ("belly", "Belly"), ("buttocks", "Buttocks"), ("feet", "Feet"),
        ("breasts_f", "Breasts (F)"), ("genitalia_f", "Genitalia (F)"), ("breasts_m", "Breasts (M)"),
        ("genitalia_m", "Genitalia (M)"), ("total", "Total"))},
    "face_ratio": ColumnSpec("mace_gcd", "face_ratio", "images with a face %", None, percent=True, decimals=2),
    "clip_e": ColumnSpec("mace_clip", "clip_e", "CLIP_e", False, decimals=2),      # 100·cos, erased artists
    "clip_p": ColumnSpec("mace_clip", "clip_p", "CLIP_p", True, decimals=2),       # retained artists
    "h_a": ColumnSpec("mace_clip", "h_a", "H_a", True, decimals=2),                # CLIP_p − CLIP_e
    # ESD's Imagenette object task (the object_accuracy metric's columns): ResNet-50 top-1 in %
    "acc_erased_class": ColumnSpec("object_accuracy", "acc_erased", "Acc erased class", False, percent=True, decimals=1),
    "acc_other_classes": ColumnSpec("object_accuracy", "acc_others", "Acc other classes", True, percent=True, decimals=1),
    **{class_key(c).replace(".", "_"): ColumnSpec("object_accuracy", class_key(c), c, None, percent=True, decimals=1)
       for c in IMAGENETTE},
    "fid_coco30k": ColumnSpec("mace_coco30k", "fid", "FID COCO-30K", False, decimals=2),
    "clip_coco30k": ColumnSpec("mace_coco30k", "clip", "CLIP COCO-30K", True, decimals=2),
}


# --------------------------------------------------------------------------- reported rows


@dataclass(frozen=True)
class Reported:
    """One validated entry of reported.yaml; ``values`` are in the column's unit (fractions → %)."""

    index: int
    task: str
    method: str
    model: str
    protocol: str
    values: dict[str, float]
    paper: str
    trust: str
    protocol_differences: tuple[str, ...]
    table: str | None = None
    url: str | None = None
    n: dict[str, int] = field(default_factory=dict)
    note: str | None = None

    def citation(self) -> str:
        where = "; ".join(x for x in (self.table, self.url) if x)
        return f"{self.paper}" + (f", {where}" if where else "")


_ENTRY_FIELDS = {"task", "method", "model", "protocol", "values", "values_unit", "n", "source", "trust",
                 "protocol_differences", "note"}
_REQUIRED = ("task", "method", "model", "protocol", "values", "source", "trust", "protocol_differences")
_TRUST = ("high", "medium", "low")
_TABLE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def load_reported(path: str | Path) -> list[Reported]:
    """Read and validate reported.yaml; every error names the file, the entry (index, method, task) and the field."""
    import yaml

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such file (reported rows); use --reported none to leave them out")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ConfigError(f"{path}: expected a list of entries at the top level, got {type(raw).__name__}")
    out, seen = [], {}
    for i, e in enumerate(raw):
        r = _validate_entry(path, i, e)
        ident = (r.task, r.method, r.model, r.paper)    # two papers may report the same method: two rows
        if ident in seen:
            raise ConfigError(f"{path}: entry {i} ({r.method} on {r.task}): duplicate of entry {seen[ident]} "
                              f"(same task, method, model and source paper)")
        seen[ident] = i
        out.append(r)
    return out


def _validate_entry(path: Path, i: int, e) -> Reported:
    where = f"{path}: entry {i}"
    if not isinstance(e, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(e).__name__}")
    if isinstance(e.get("method"), str) and isinstance(e.get("task"), str):
        where += f" ({e['method']} on {e['task']})"

    def err(fld: str, msg: str):
        return ConfigError(f"{where}: {fld}: {msg}")

    unknown = sorted(set(e) - _ENTRY_FIELDS)
    if unknown:
        raise err(unknown[0], f"unknown field; known: {', '.join(sorted(_ENTRY_FIELDS))}")
    for f in _REQUIRED:
        if f not in e or e[f] in (None, "", [], {}):
            raise err(f, "missing")
    for f in ("task", "method", "model", "protocol"):
        if not isinstance(e[f], str):
            raise err(f, f"expected a string, got {e[f]!r}")
    if not _TABLE_NAME.match(e["task"]):
        raise err("task", f"{e['task']!r} is not usable as a table file name (letters, digits, . _ -)")
    if e["trust"] not in _TRUST:
        raise err("trust", f"{e['trust']!r}; choose one of {', '.join(_TRUST)}")
    unit = e.get("values_unit", "percent")
    if unit not in ("percent", "fraction"):
        raise err("values_unit", f"{unit!r}; choose percent or fraction")
    if not isinstance(e["values"], dict):
        raise err("values", "expected a mapping {key: number}")
    values = {}
    for k, v in e["values"].items():
        spec = REPORTED_KEYS.get(k)
        if spec is None:
            raise err(f"values.{k}", f"unknown column key; known: {', '.join(REPORTED_KEYS)}")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise err(f"values.{k}", f"expected a finite number, got {v!r}")
        if unit == "fraction" and spec.percent:     # the % columns; others (FID, counts) as printed
            if not 0 <= v <= 1:
                raise err(f"values.{k}", f"{v} is not a fraction in [0, 1] (values_unit: fraction)")
            v = round(v * 100, 10)
        elif spec.percent and not 0 <= v <= 100:
            raise err(f"values.{k}", f"{v} is not a percentage in [0, 100]")
        values[k] = float(v)
    n = e.get("n") or {}
    if isinstance(n, int) and not isinstance(n, bool):
        n = {k: n for k in values}
    if not isinstance(n, dict) or any(k not in values or not isinstance(x, int) or x <= 0 for k, x in n.items()):
        raise err("n", "expected a positive integer or {value key: positive integer} for keys given in values")
    src = e["source"]
    if not isinstance(src, dict):
        raise err("source", "expected a mapping {paper, table, url}")
    bad = sorted(set(src) - {"paper", "table", "url"})
    if bad:
        raise err(f"source.{bad[0]}", "unknown field; known: paper, table, url")
    if not isinstance(src.get("paper"), str) or not src["paper"].strip():
        raise err("source.paper", "missing")
    if not any(isinstance(src.get(f), str) and src[f].strip() for f in ("table", "url")):
        raise err("source", "give the table/row or the URL the numbers come from")
    diffs = e["protocol_differences"]
    if not isinstance(diffs, list) or not all(isinstance(d, str) and d.strip() for d in diffs):
        raise err("protocol_differences", "expected a non-empty list of strings")
    note = e.get("note")
    if note is not None and not isinstance(note, str):
        raise err("note", "expected a string")
    return Reported(index=i, task=e["task"], method=e["method"], model=e["model"], protocol=e["protocol"],
                    values=values, paper=src["paper"].strip(), trust=e["trust"], protocol_differences=tuple(diffs),
                    table=src.get("table"), url=src.get("url"), n=dict(n), note=note)


def default_reported_path() -> Path | None:
    """``results/reported.yaml`` in the working directory, else the copy shipped next to the package."""
    for p in (Path("results") / "reported.yaml", Path(__file__).resolve().parents[1] / "results" / "reported.yaml"):
        if p.is_file():
            return p
    return None


def reported_path(arg: str | None) -> Path | None:
    """CLI ``--reported``: ``auto`` (default: the file above, if any), ``none``, or a path."""
    if arg in (None, "auto"):
        return default_reported_path()
    return None if arg == "none" else Path(arg)


def resolve_reported(arg: str | None) -> list[Reported]:
    p = reported_path(arg)
    return load_reported(p) if p else []


# --------------------------------------------------------------------------- summaries


def find_summaries(paths: Iterable[str | Path]) -> list[dict]:
    out = []
    for p in paths:
        p = Path(p)
        if not p.exists():
            raise CpebenchError(f"{p}: no such file or directory")
        files = [p] if p.is_file() else sorted(p.rglob("summary.json"))
        for f in files:
            try:
                s = json.loads(f.read_text())
            except json.JSONDecodeError as e:
                raise CpebenchError(f"{f}: not valid JSON: {e}") from None
            s["_path"] = str(f)
            out.append(s)
    return out


def tasks_in(summaries: list[dict], reported: Sequence[Reported] = ()) -> list[str]:
    """Task (table) names, naturally sorted (celebrity-mace-5 before celebrity-mace-10)."""
    names = {s["task"] for s in summaries} | {r.task for r in reported}
    return sorted(names, key=lambda t: [(0, int(x), "") if x.isdigit() else (1, 0, x) for x in re.split(r"(\d+)", t)])


# --------------------------------------------------------------------------- the table model


@dataclass
class Row:
    kind: str                                   # REPRODUCED | REPORTED
    method: str
    model: str
    preset: str
    cells: dict[tuple[str, str], tuple[float, int | None]]   # column id → (value, n)
    summary: dict | None = None
    reported: Reported | None = None
    footnote: int | None = None                 # k of "†k" for reported rows

    @property
    def mark(self) -> str:
        return f"{MARK}{self.footnote}" if self.kind == REPORTED else ""

    @property
    def source(self) -> str:
        return f"{REPORTED} {self.mark}" if self.kind == REPORTED else REPRODUCED


@dataclass
class Table:
    task: str
    columns: list[ColumnSpec]
    rows: list[Row]

    @property
    def reported(self) -> list[Row]:
        return [r for r in self.rows if r.kind == REPORTED]

    def notes(self) -> list[tuple[str, str, list[Row]]]:
        """(mark, note text, the rows it applies to), one per distinct footnote."""
        out: dict[int, tuple[str, str, list[Row]]] = {}
        for r in self.reported:
            out.setdefault(r.footnote, (r.mark, _footnote(r.reported), []))[2].append(r)
        return [out[k] for k in sorted(out)]

    def best(self, include_reported: bool = False) -> dict[tuple[str, str], float]:
        """Best value per directed column, over reproduced rows (and reported ones only if asked)."""
        out = {}
        for c in self.columns:
            if c.higher_is_better is None:
                continue
            vals = [r.cells[c.id][0] for r in self.rows if c.id in r.cells and _finite(r.cells[c.id][0])
                    and (include_reported or r.kind == REPRODUCED)]
            if vals:
                out[c.id] = max(vals) if c.higher_is_better else min(vals)
        return out


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def short_names(names: Sequence[str], first: int = 4) -> str:
    """A concept list in a table cell or a listing: 'a, b, c, d, … (6)'."""
    names = list(names)
    head = ", ".join(names[:first])
    return head if len(names) <= first else f"{head}, … ({len(names)})"


def method_label(summary: dict) -> str:
    """The row's method name, marked when the run erased other concepts than the method's paper code
    erases on this task (generation.json's ``concepts_differ_from_paper``, kept in the protocol card);
    on a task that erases one model per concept, the name and its concept."""
    m = (summary.get("protocol_card") or {}).get("method") or {}
    if _per_concept(summary) and summary["method"] != "sd" and m.get("concepts"):
        return f"{summary['method']} ({short_names(m['concepts'])})"      # one erased model per concept: a row each
    if m.get("concepts_differ_from_paper"):
        return f"{summary['method']} (concepts ≠ paper: {short_names(m.get('concepts') or [])})"
    return summary["method"]


def _per_concept(summary: dict) -> bool:
    """A run of a task that erases one model per concept (``erase_each``, e.g. objects)."""
    return bool(((summary.get("config") or {}).get("task") or {}).get("erase_each"))


def _mean_rows(rows: list[Row], columns: list[ColumnSpec]) -> list[Row]:
    """Rows plus, after each method's per-concept runs (two or more), their mean: each directed column
    averaged over the runs (each concept weighs the same, as ESD's Table 2 averages its ten models) when
    every run has it; n is the images of all of them."""
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        if r.summary is not None and r.summary["method"] != "sd" and _per_concept(r.summary):
            groups.setdefault((r.summary["method"], r.model, r.preset), []).append(r)
    out = list(rows)
    for (method, model, preset), members in groups.items():
        if len(members) < 2:
            continue
        cells = {}
        for c in columns:
            got = [r.cells[c.id] for r in members if c.id in r.cells and _finite(r.cells[c.id][0])]
            if c.higher_is_better is not None and len(got) == len(members):
                ns = [n for _, n in got]
                cells[c.id] = (sum(v for v, _ in got) / len(got), sum(ns) if None not in ns else None)
        summary = {"method": method, "run": f"mean of the {len(members)} runs above",
                   "protocol_card": {"protocol": (members[0].summary.get("protocol_card") or {}).get("protocol", "")}}
        at = max(out.index(r) for r in members) + 1
        out.insert(at, Row(REPRODUCED, f"{method} (mean of {len(members)} runs)", model, preset, cells, summary=summary))
    return out


def build_table(summaries: list[dict], task: str, reported: Sequence[Reported] = ()) -> Table:
    """Reproduced rows (the latest run of each (method label, model, preset): a run with other concepts
    than the paper's is its own row), then the task's reported rows."""
    latest: dict[tuple, dict] = {}
    for s in summaries:
        if s.get("task") != task:
            continue
        key = (method_label(s), s["model"], s.get("preset") or "")
        if key not in latest or s.get("created", "") > latest[key].get("created", ""):
            latest[key] = s
    columns: list[ColumnSpec] = []
    seen: set[tuple[str, str]] = set()
    rows: list[Row] = []
    for (method, model, preset), s in sorted(latest.items(), key=lambda kv: (kv[0][0] != "sd", kv[0][0].casefold(), kv[0])):
        cells = {}
        for mname, m in s.get("metrics", {}).items():
            values = m.get("values", {})
            for c in m.get("columns", []):
                spec = ColumnSpec(mname, c["key"], c["label"], c.get("higher_is_better"))
                if spec.id not in seen:
                    seen.add(spec.id)
                    columns.append(spec)
                v = values.get(c["key"])
                if v is not None:
                    n = values.get(f"{c['key']}_n", m.get("n"))
                    cells[spec.id] = (v, int(n) if n is not None else None)
        rows.append(Row(REPRODUCED, method, model, preset, cells, summary=s))
    rows = _mean_rows(rows, columns)
    notes: dict[str, int] = {}          # identical notes (same source, protocol, differences) share one number
    for r in reported:
        if r.task != task:
            continue
        k = notes.setdefault(_footnote(r), len(notes) + 1)
        cells = {}
        for key, v in r.values.items():
            spec = REPORTED_KEYS[key]
            if spec.id not in seen:
                seen.add(spec.id)
                columns.append(spec)
            cells[spec.id] = (v, r.n.get(key))
        rows.append(Row(REPORTED, r.method, r.model, "", cells, reported=r, footnote=k))
    return Table(task, _known_columns_in_order(columns), rows)


def _known_columns_in_order(columns: list[ColumnSpec]) -> list[ColumnSpec]:
    """The columns that REPORTED_KEYS knows, put in its order within the slots they occupy (a run that
    scored four object classes, then reported rows with ten, still shows the classes in table order);
    every other column keeps its place."""
    rank = {spec.id: i for i, spec in enumerate(REPORTED_KEYS.values())}
    slots = [i for i, c in enumerate(columns) if c.id in rank]
    out = list(columns)
    for i, c in zip(slots, sorted((columns[i] for i in slots), key=lambda c: rank[c.id])):
        out[i] = c
    return out


def table_rows(summaries: list[dict], task: str, reported: Sequence[Reported] = ()) -> tuple[list[str], list[list[str]]]:
    """Header and rows as the CSV writes them (kept for callers of the earlier API)."""
    return _csv_rows(build_table(summaries, task, reported))


# --------------------------------------------------------------------------- formatting


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float) and v.is_integer():   # counts
        return str(int(v))
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1 else f"{v:.2f}"
    return str(v)


def _fmt_reported(v: float, key: str) -> str:
    """As the source prints it: the column's decimals (MACE's 4-decimal fractions → 2-decimal %), else 6 digits."""
    d = REPORTED_KEYS[key].decimals
    return format(v, ".6g") if d is None else f"{v:.{d}f}"


def _value(row: Row, col: ColumnSpec) -> str:
    if col.id not in row.cells:
        return "–"
    v = row.cells[col.id][0]
    return _fmt_reported(v, _reported_key(col)) if row.kind == REPORTED else _fmt(v)


def _reported_key(col: ColumnSpec) -> str:
    return next(k for k, spec in REPORTED_KEYS.items() if spec.id == col.id)


def _n(row: Row, col: ColumnSpec) -> int | None:
    return row.cells[col.id][1] if col.id in row.cells else None


def _card_path(row: Row) -> str:
    return (row.summary or {}).get("_path", "")


def _rel(path: str, base: str | Path | None) -> str:
    if not path or base is None:
        return path
    try:
        return Path(os.path.relpath(Path(path).resolve(), Path(base).resolve())).as_posix()
    except ValueError:      # another drive (Windows)
        return path


def _who(rows: Sequence[Row]) -> str:
    models = list(dict.fromkeys(r.model for r in rows))
    return ", ".join(r.method for r in rows) + f" ({', '.join(models)})"


def _footnote(r: Reported) -> str:
    text = (f"reported by {r.citation()} (trust: {r.trust}). Protocol: {r.protocol}. "
            f"Differences: {'; '.join(r.protocol_differences)}.")
    return text + (f" Note: {r.note}." if r.note else "")


LEGEND = (f"Rows marked **{REPORTED} {MARK}k** are numbers printed by papers, measured under their own protocol (note "
          f"{MARK}k below the table); every other row was **{REPRODUCED}** by cpebench from a run summary and links its "
          "protocol card. ↑/↓: higher/lower is better. Each reproduced value is followed by n, the number of images "
          "it is computed over; reported values show n only when the source gives it.")


# --------------------------------------------------------------------------- Markdown


def render_md(table: Table, link_base: str | Path | None = None) -> str:
    def md(s: str) -> str:
        return str(s).replace("|", "\\|").replace("\n", " ")

    header = ["method", "model", "preset"] + [c.header for c in table.columns] + ["source", "protocol card"]
    lines = [f"### {table.task}", "", LEGEND, "", "| " + " | ".join(md(h) for h in header) + " |",
             "|" + "|".join(["---"] * 3 + ["---:"] * len(table.columns) + ["---"] * 2) + "|"]
    for r in table.rows:
        cells = []
        for c in table.columns:
            v, n = _value(r, c), _n(r, c)
            cells.append(v if v == "–" or n is None else f"{v} (n={n})")
        if r.kind == REPORTED:
            method, card = f"{r.method} {r.mark}", f"not reproduced: see note {r.mark}"
        else:
            method = r.method
            path = _card_path(r)
            protocol = (r.summary.get("protocol_card") or {}).get("protocol", "")
            label = f"{protocol} · {r.summary.get('run', '')}".strip(" ·")
            card = f"[{label}]({_rel(path, link_base)})" if path else label
            html_path = Path(path).with_name("report.html") if path else None
            if html_path is not None and html_path.exists():
                card += f" · [report]({_rel(str(html_path), link_base)})"
        lines.append("| " + " | ".join(md(x) for x in [method, r.model, r.preset, *cells, r.source, card]) + " |")
    if not table.rows:
        lines += ["", "(no runs or reported rows for this task)"]
    if table.reported:
        lines.append("")
        for mark, text, rows in table.notes():
            lines.append(f"{mark} {md(_who(rows))}: {md(text)}  ")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- CSV


CSV_TAIL = ["source", "mark", "protocol", "protocol_card", "run", "paper", "table", "url", "trust",
            "protocol_differences", "note"]


def _csv_rows(table: Table) -> tuple[list[str], list[list[str]]]:
    header = ["method", "model", "preset"]
    for c in table.columns:
        header += [c.header, f"n ({c.header})"]
    header += CSV_TAIL
    rows = []
    for r in table.rows:
        row = [r.method, r.model, r.preset]
        for c in table.columns:
            v, n = _value(r, c), _n(r, c)
            row += ["" if v == "–" else v, "" if n is None else str(n)]
        if r.kind == REPORTED:
            rp = r.reported
            row += [REPORTED, r.mark, rp.protocol, "", "", rp.paper, rp.table or "", rp.url or "", rp.trust,
                    " | ".join(rp.protocol_differences), rp.note or ""]
        else:
            card = r.summary.get("protocol_card") or {}
            row += [REPRODUCED, "", card.get("protocol", ""), _card_path(r), r.summary.get("run", ""),
                    "", "", "", "", "", ""]
        rows.append(row)
    return header, rows


def render_csv(table: Table) -> str:
    header, rows = _csv_rows(table)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


# --------------------------------------------------------------------------- LaTeX

_TEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                "×": r"$\times$", "³": r"$^{3}$", "²": r"$^{2}$", "↑": r"$\uparrow$", "↓": r"$\downarrow$",
                "–": "--", "—": "---", "·": r"$\cdot$", "≥": r"$\geq$", "≤": r"$\leq$", "≠": r"$\neq$", "…": r"\ldots{}",
                MARK: r"$^{\dagger}$",
                "<": r"\textless{}", ">": r"\textgreater{}"}


def tex_escape(s: str) -> str:
    return "".join(_TEX_SPECIAL.get(ch, ch) for ch in str(s))


def render_latex(table: Table) -> str:
    """A booktabs tabular; the best value of each directed column in bold over reproduced rows only."""
    show_preset = any(r.preset for r in table.rows)
    lead = ["Method", "Model"] + (["Preset"] if show_preset else [])
    ncols = len(lead) + len(table.columns)
    best = table.best(include_reported=False)
    out = [f"% cpebench table, task {table.task}; needs \\usepackage{{booktabs}}.",
           "% Bold: the best value of each column by its direction (arrow), over the rows reproduced by cpebench "
           "only; reported rows (dagger) are never bolded.",
           "% n (images per value) is in the Markdown/CSV tables."]
    for mark, text, rows in table.notes():
        out.append(f"% {mark} {_who(rows)}: {text}".replace("\n", " "))
    out += [f"\\begin{{tabular}}{{{'l' * len(lead)}{'r' * len(table.columns)}}}", r"\toprule",
            " & ".join([*lead, *(tex_escape(c.header) for c in table.columns)]) + r" \\", r"\midrule"]
    prev = None
    for r in table.rows:
        if prev == REPRODUCED and r.kind == REPORTED:
            out.append(r"\midrule")
        prev = r.kind
        method = tex_escape(r.method) + (f"$^{{\\dagger{r.footnote}}}$" if r.kind == REPORTED else "")
        cells = [method, tex_escape(r.model)] + ([tex_escape(r.preset)] if show_preset else [])
        for c in table.columns:
            v = _value(r, c)
            text = "--" if v == "–" else tex_escape(v)
            if r.kind == REPRODUCED and c.id in best and v == _fmt(best[c.id]):   # ties as displayed
                text = f"\\textbf{{{text}}}"
            cells.append(text)
        out.append(" & ".join(cells) + r" \\")
    out.append(r"\bottomrule")
    if table.reported:
        out.append(f"\\multicolumn{{{ncols}}}{{l}}{{\\footnotesize $^{{\\dagger}}$Reported by the cited source under "
                   f"its own protocol, not reproduced by cpebench; excluded from bold.}} \\\\")
        for _, _, rows in table.notes():
            rp = rows[0].reported
            out.append(f"\\multicolumn{{{ncols}}}{{l}}{{\\footnotesize $^{{\\dagger{rows[0].footnote}}}$"
                       f"{tex_escape(rp.citation())}; trust {tex_escape(rp.trust)}.}} \\\\")
    out.append(r"\end{tabular}")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- HTML (a fragment)


def render_html_table(table: Table, link_base: str | Path | None = None, highlight_run: str | None = None) -> str:
    e = html.escape
    head = ["method", "model", "preset"] + [c.header for c in table.columns] + ["source", "protocol card"]
    out = [f'<table class="results"><caption>{e(table.task)}</caption>',
           "<thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in head) + "</tr></thead><tbody>"]
    for r in table.rows:
        cls = [r.kind] + (["this-run"] if r.kind == REPRODUCED and r.summary.get("run") == highlight_run else [])
        cells = []
        for c in table.columns:
            v, n = _value(r, c), _n(r, c)
            cells.append(e(v) + (f' <span class="n">(n={n})</span>' if n is not None and v != "–" else ""))
        if r.kind == REPORTED:
            method = f"{e(r.method)} <sup>{e(r.mark)}</sup>"
            card = e(r.reported.protocol)
        else:
            method = e(r.method)
            path = _card_path(r)
            label = f"{(r.summary.get('protocol_card') or {}).get('protocol', '')} · {r.summary.get('run', '')}".strip(" ·")
            card = f'<a href="{e(_rel(path, link_base))}">{e(label)}</a>' if path else e(label)
        row = [method, e(r.model), e(r.preset), *cells, e(r.source), card]
        out.append(f'<tr class="{" ".join(cls)}">' + "".join(f"<td>{x}</td>" for x in row) + "</tr>")
    out.append("</tbody></table>")
    if table.reported:
        out.append('<ul class="notes">' + "".join(
            f"<li><b>{e(mark)}</b> {e(_who(rows))}: {e(text)}</li>" for mark, text, rows in table.notes()) + "</ul>")
    return "\n".join(out)


# --------------------------------------------------------------------------- entry points


def render(summaries: list[dict], task: str, fmt: str = "md", reported: Sequence[Reported] = (),
           link_base: str | Path | None = None) -> str:
    table = build_table(summaries, task, reported)
    if fmt == "md":
        return render_md(table, link_base)
    if fmt == "csv":
        return render_csv(table)
    if fmt == "latex":
        return render_latex(table)
    raise CpebenchError(f"--format {fmt!r}: choose md, csv or latex")


INDEX_INTRO = """# Leaderboard

Generated by `cpebench leaderboard RUNS_DIR --out results` from the run summaries under RUNS_DIR and the
paper-reported numbers in {reported}; rerun it instead of editing the tables.

- **reproduced** rows were generated and scored by cpebench; each links its run's protocol card
  (`summary.json`), and each value carries n, the number of images it is computed over.
- **reported †k** rows are numbers printed by papers under their own protocol. They are never shown
  without that mark; note †k under each table (or the CSV's citation columns) gives paper, table,
  trust and how the protocol differs. They are excluded from "best value" bolding (`--format latex`).
- The CPE paper's own numbers are not included: none could be read by this project
  (docs/protocol.md). They go into `reported.yaml` only when copied from the paper,
  citing table and row.
- Tables named after a cpebench task (`cpebench ls tasks`) use protocol v1 for their reproduced rows;
  other tables hold a foreign protocol's reported rows only (see their notes).
"""


def leaderboard(runs_dir: str | Path | None, out_dir: str | Path, reported: Sequence[Reported] = (),
                reported_path: str | Path | None = None) -> list[Path]:
    """Write ``<out>/<task>.md`` and ``.csv`` for every task among the runs or the reported rows, and an index
    ``<out>/README.md``. Returns the paths written."""
    out = Path(out_dir)
    summaries: list[dict] = []
    if runs_dir is not None:
        if Path(runs_dir).exists():
            summaries = find_summaries([runs_dir])
        else:
            log.warning("%s: no such directory; writing the reported rows only", runs_dir)
    tasks = tasks_in(summaries, reported)
    out.mkdir(parents=True, exist_ok=True)
    written, index = [], []
    for task in tasks:
        table = build_table(summaries, task, reported)
        if not _TABLE_NAME.match(task):
            raise CpebenchError(f"task name {task!r} is not usable as a file name under {out}")
        md_path, csv_path = out / f"{task}.md", out / f"{task}.csv"
        md_path.write_text(render_md(table, link_base=out), encoding="utf-8")
        csv_path.write_text(render_csv(table), encoding="utf-8")
        written += [md_path, csv_path]
        n_rep = len(table.reported)
        protocols = sorted({f"cpebench {(r.summary.get('protocol_card') or {}).get('protocol', '?')}"
                            for r in table.rows if r.kind == REPRODUCED})
        protocols += sorted({f"{r.reported.protocol} ({MARK})" for r in table.reported})
        index.append(f"| {task} | {len(table.rows) - n_rep} | {n_rep} | [md]({task}.md) · [csv]({task}.csv) | "
                     + "; ".join(protocols).replace("|", "\\|") + " |")
    src = f"[`{Path(reported_path).name}`]({_rel(str(reported_path), out)})" if reported_path else "(no reported.yaml)"
    lines = [INDEX_INTRO.format(reported=src), "| table | reproduced rows | reported rows † | files | protocol |", "|---|---:|---:|---|---|"]
    lines += index or ["| (none) | 0 | 0 | | |"]
    readme = out / "README.md"
    readme.write_text("\n".join(lines) + "\n", encoding="utf-8")
    written.append(readme)
    return written
