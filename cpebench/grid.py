"""Per-run contact sheet (``<run>/grid.png``) and static HTML report (``<run>/report.html``).

The grid's rows are a deterministic sample of the run's prompts (the first few rows of each prompt set,
in manifest order); its columns are this run and every sibling run (same parent folder) of the same task
under the same protocol whose manifest holds the same keys with the same prompt, seed, negative prompt
and guidance — so every cell of a row started from the same noise. The unedited ``sd`` run comes first.
"""

from __future__ import annotations

import html
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import yaml

from .errors import RunStateError

log = logging.getLogger(__name__)

CELL = 128          # px per image cell
GAP = 4             # px between cells and around the grid
LABEL_W = 240       # px of the prompt column at the left
HEADER_H = 28       # px of the method-name row at the top
PER_SET = 4         # prompts per prompt set
MAX_ROWS = 12       # prompts in all
BACKGROUND = (255, 255, 255)
MISSING = (200, 200, 200)
SAME_IMAGE = ("prompt", "seed", "negative_prompt", "guidance")   # what makes two runs' cells comparable


@dataclass(frozen=True)
class GridColumn:
    run_dir: Path
    method: str
    label: str
    entries: dict[str, dict]


def grid_size(rows: int, cols: int, cell: int = CELL) -> tuple[int, int]:
    """(width, height) of a grid with ``rows`` prompts and ``cols`` runs."""
    return LABEL_W + GAP + cols * (cell + GAP), HEADER_H + GAP + rows * (cell + GAP)


def cell_origin(row: int, col: int, cell: int = CELL) -> tuple[int, int]:
    """Top-left pixel of the (row, col) image cell; images are fitted inside cell × cell and centred."""
    return LABEL_W + GAP + col * (cell + GAP), HEADER_H + GAP + row * (cell + GAP)


def sample_keys(entries: dict[str, dict], per_set: int = PER_SET, max_rows: int = MAX_ROWS) -> list[str]:
    """The first prompt rows of each set (image index 0 first), sets in manifest order, ``max_rows`` in all
    (shared evenly between sets). Deterministic: depends only on the manifest."""
    by_set: dict[str, list[str]] = {}
    seen_rows: set[tuple[str, str]] = set()
    for key, e in entries.items():
        row = (e.get("set", ""), str(e.get("row_id", key)))
        if row in seen_rows:
            continue
        seen_rows.add(row)
        by_set.setdefault(row[0], []).append(key)
    if not by_set:
        return []
    k = max(1, min(per_set, max_rows // len(by_set)))
    keys = [key for ks in by_set.values() for key in ks[:k]]
    return keys[:max_rows]


def _run_identity(run_dir: Path) -> tuple[str, str, dict] | None:
    """(task name, method name, protocol) from the run's config.yaml, or None if it is not a run."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    try:
        cfg = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError:
        return None
    return ((cfg.get("task") or {}).get("name", ""), (cfg.get("method") or {}).get("name", run_dir.name),
            cfg.get("protocol") or {})


def comparable_runs(run_dir: str | Path, keys: Sequence[str]) -> list[GridColumn]:
    """This run and its siblings with the same task and protocol whose manifests hold ``keys`` with the same
    prompt, seed, negative prompt and guidance. Order: ``sd`` first, then by method and run name."""
    from .engine import read_manifest

    run_dir = Path(run_dir)
    me = _run_identity(run_dir)
    if me is None:
        raise RunStateError(f"{run_dir} is not a run directory (no config.yaml)")
    mine = read_manifest(run_dir)
    cols = []
    siblings = sorted(p for p in run_dir.parent.iterdir() if p.is_dir()) if run_dir.parent.exists() else [run_dir]
    for d in siblings:
        ident = me if d == run_dir else _run_identity(d)
        if ident is None or ident[0] != me[0] or ident[2] != me[2]:
            continue
        entries = mine if d == run_dir else read_manifest(d)
        if d != run_dir and not all(k in entries and all(entries[k].get(f) == mine[k].get(f) for f in SAME_IMAGE)
                                    for k in keys):
            log.info("grid: %s differs in prompts/seeds; left out", d.name)
            continue
        cols.append(GridColumn(d, ident[1], ident[1], entries))
    cols.sort(key=lambda c: (c.method != "sd", c.method, c.run_dir.name))
    methods = [c.method for c in cols]
    return [GridColumn(c.run_dir, c.method, c.run_dir.name if methods.count(c.method) > 1 else c.method, c.entries)
            for c in cols]


def _font(size: int = 12):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:          # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _fit(draw, text: str, font, width: int) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def _wrap(draw, text: str, font, width: int, max_lines: int) -> list[str]:
    words, lines, cur = text.split(), [], ""
    for w in words:
        cand = f"{cur} {w}".strip()
        if draw.textlength(cand, font=font) <= width or not cur:
            cur = cand
        else:
            lines.append(cur)
            cur = w
    if cur:
        lines.append(cur)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = _fit(draw, lines[-1] + " …", font, width)
    return [_fit(draw, line, font, width) for line in lines]


def make_grid(run_dir: str | Path, out: str | Path | None = None, *, per_set: int = PER_SET,
              max_rows: int = MAX_ROWS, cell: int = CELL) -> Path | None:
    """Write the contact sheet (default ``<run>/grid.png``); None when the run has no images yet."""
    from PIL import Image, ImageDraw, ImageOps

    from .engine import read_manifest

    run_dir = Path(run_dir)
    entries = read_manifest(run_dir)
    keys = sample_keys(entries, per_set, max_rows)
    if not keys:
        return None
    cols = comparable_runs(run_dir, keys)
    width, height = grid_size(len(keys), len(cols), cell)
    sheet = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    font, small = _font(12), _font(10)
    line_h = 14
    for j, c in enumerate(cols):
        x, _ = cell_origin(0, j, cell)
        label = _fit(draw, c.label, font, cell)
        draw.text((x + (cell - draw.textlength(label, font=font)) / 2, (HEADER_H - line_h) / 2), label,
                  fill=(0, 0, 0), font=font)
    for i, key in enumerate(keys):
        e = entries[key]
        _, y = cell_origin(i, 0, cell)
        meta = f"{e.get('set', '')} #{e.get('row_id', '')} · seed {e.get('seed', '')}"
        draw.text((GAP, y), _fit(draw, meta, small, LABEL_W - 2 * GAP), fill=(90, 90, 90), font=small)
        lines = _wrap(draw, str(e.get("prompt", "")).replace("\n", " "), font, LABEL_W - 2 * GAP,
                      max(1, (cell - line_h) // line_h))
        for n, line in enumerate(lines):
            draw.text((GAP, y + line_h * (n + 1)), line, fill=(0, 0, 0), font=font)
        for j, c in enumerate(cols):
            x, y = cell_origin(i, j, cell)
            path = c.run_dir / c.entries[key]["file"]
            if not path.is_file():
                draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=MISSING)
                draw.text((x + 4, y + 4), "missing", fill=(0, 0, 0), font=small)
                continue
            with Image.open(path) as im:
                im = ImageOps.contain(im.convert("RGB"), (cell, cell), Image.Resampling.LANCZOS)
            sheet.paste(im, (x + (cell - im.width) // 2, y + (cell - im.height) // 2))
    out = Path(out) if out else run_dir / "grid.png"
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp.png")
    sheet.save(tmp, optimize=False)
    os.replace(tmp, out)
    return out


# --------------------------------------------------------------------------- HTML report

_CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em; color: #222; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 1.8em; }
table.results { border-collapse: collapse; font-size: 13px; }
table.results caption { text-align: left; font-weight: bold; padding-bottom: .4em; }
table.results th, table.results td { border: 1px solid #ccc; padding: 3px 6px; white-space: nowrap; }
table.results td { text-align: right; } table.results td:nth-child(-n+3) { text-align: left; }
tr.reported { background: #fff6e0; font-style: italic; } tr.this-run { background: #e8f1ff; font-weight: bold; }
span.n { color: #777; font-size: 11px; } ul.notes { font-size: 12px; color: #444; }
pre { background: #f6f6f6; padding: 1em; overflow: auto; font-size: 12px; }
img.grid { max-width: 100%; border: 1px solid #ddd; }
"""


def write_html(run_dir: str | Path, *, reported=(), grid: Path | None = None) -> Path:
    """``<run>/report.html``: the task's table (this run, its sibling runs, reported rows), the grid and
    the protocol card. Self-contained except for the grid image (``grid.png`` next to it)."""
    from .report import build_table, find_summaries, render_html_table

    run_dir = Path(run_dir)
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
    ident = _run_identity(run_dir)
    task = summary["task"] if summary else (ident[0] if ident else "")
    title = f"cpebench · {run_dir.name}"
    e = html.escape
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{e(title)}</title>"
             f"<style>{_CSS}</style></head><body>", f"<h1>{e(title)}</h1>"]
    if summary:
        parts.append(f"<p>task <b>{e(task)}</b> · method <b>{e(summary['method'])}</b> · model "
                     f"<b>{e(str(summary['model']))}</b>" + (f" · preset <b>{e(summary['preset'])}</b>"
                                                            if summary.get("preset") else "")
                     + f" · scored {e(str(summary.get('created', '')))}</p>")
        siblings = [p for p in sorted(run_dir.parent.glob("*/summary.json"))]
        summaries = find_summaries(siblings) if siblings else []
        table = build_table(summaries, task, reported)
        parts += ["<h2>Results</h2>", render_html_table(table, link_base=run_dir, highlight_run=summary.get("run"))]
    else:
        parts.append("<p>Not scored yet: run <code>cpebench score</code> on this run directory.</p>")
    if grid is not None:
        parts += ["<h2>Images</h2>", "<p>Rows: prompts (set, row, seed); columns: runs of the same task and "
                  "protocol with the same prompts and seeds (unedited <code>sd</code> first).</p>",
                  f'<img class="grid" src="{e(os.path.relpath(grid, run_dir))}" alt="contact sheet">']
    card = summary.get("protocol_card") if summary else None
    if card is None and (run_dir / "generation.json").exists():
        card = json.loads((run_dir / "generation.json").read_text())
    if card is not None:
        parts += ["<h2>Protocol card</h2>",
                  f'<pre class="protocol-card">{e(json.dumps(card, indent=2, ensure_ascii=False, default=str))}</pre>']
    parts.append("</body></html>\n")
    out = run_dir / "report.html"
    out.write_text("\n".join(parts), encoding="utf-8")
    return out


def write_run_report(run_dir: str | Path, *, reported=(), per_set: int = PER_SET, max_rows: int = MAX_ROWS,
                     cell: int = CELL) -> tuple[Path | None, Path]:
    """The grid and the HTML report of one run."""
    grid = make_grid(run_dir, per_set=per_set, max_rows=max_rows, cell=cell)
    return grid, write_html(run_dir, reported=reported, grid=grid)
