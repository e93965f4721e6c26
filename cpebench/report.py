"""Run summaries → comparison tables (Markdown / CSV): one row per (method, model) per task."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Iterable

from .errors import CpebenchError


def find_summaries(paths: Iterable[str | Path]) -> list[dict]:
    out = []
    for p in paths:
        p = Path(p)
        files = [p] if p.is_file() else sorted(p.rglob("summary.json"))
        if not p.exists():
            raise CpebenchError(f"{p}: no such file or directory")
        for f in files:
            try:
                s = json.loads(f.read_text())
            except json.JSONDecodeError as e:
                raise CpebenchError(f"{f}: not valid JSON: {e}") from None
            s["_path"] = str(f)
            out.append(s)
    return out


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float) and v.is_integer():   # counts
        return str(int(v))
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1 else f"{v:.2f}"
    return str(v)


def table_rows(summaries: list[dict], task: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows for one task. The latest run of each (method, model, preset) wins."""
    latest: dict[tuple, dict] = {}
    for s in summaries:
        if s.get("task") != task:
            continue
        key = (s["method"], s["model"], s.get("preset"))
        if key not in latest or s.get("created", "") > latest[key].get("created", ""):
            latest[key] = s
    columns: list[tuple[str, str, str]] = []  # (metric, value key, header)
    for s in latest.values():
        for mname, m in s["metrics"].items():
            for c in m.get("columns", []):
                arrow = "" if c["higher_is_better"] is None else (" ↑" if c["higher_is_better"] else " ↓")
                col = (mname, c["key"], c["label"] + arrow)
                if col not in columns:
                    columns.append(col)
    metric_names = list(dict.fromkeys(c[0] for c in columns))
    header = ["method", "model", "preset"] + [c[2] for c in columns] + [f"n ({m})" for m in metric_names] + ["protocol", "run"]
    rows = []
    for (method, model, preset), s in sorted(latest.items(), key=lambda kv: (kv[0][0] != "sd", kv[0])):
        ms = s["metrics"]
        row = [method, model, preset or ""]
        row += [_fmt(ms.get(m, {}).get("values", {}).get(k)) for m, k, _ in columns]
        row += [str(ms[m]["n"]) if m in ms else "–" for m in metric_names]
        row += [s.get("protocol_card", {}).get("protocol", ""), s.get("run", "")]
        rows.append(row)
    return header, rows


def render(summaries: list[dict], task: str, fmt: str = "md") -> str:
    header, rows = table_rows(summaries, task)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
        return buf.getvalue()
    if fmt != "md":
        raise CpebenchError(f"--format {fmt!r}: choose md or csv")
    lines = [f"### {task} (reproduced by cpebench)", "", "| " + " | ".join(header) + " |",
             "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def tasks_in(summaries: list[dict]) -> list[str]:
    return sorted({s["task"] for s in summaries})
