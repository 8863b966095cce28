"""The demo report: one HTML page (with PNGs beside it) that also reads as markdown.

Pure presentation: it receives numbers and image arrays and lays them out; it computes no
metric itself, so what the page shows is exactly what the evaluation returned.
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image


def to_uint8(images: np.ndarray) -> np.ndarray:
    """(N,3,H,W) floats in [0,1] -> (N,H,W,3) uint8."""
    arr = np.asarray(images, dtype=np.float32)
    if arr.ndim != 4 or arr.shape[1] != 3:
        raise ValueError(f"expected images shaped (N, 3, H, W), got {arr.shape}")
    return (np.clip(arr, 0, 1).transpose(0, 2, 3, 1) * 255 + 0.5).astype(np.uint8)


GRID_CELL, GRID_PAD = 96, 2


def image_grid(rows: Sequence[np.ndarray], cell: int = GRID_CELL, pad: int = GRID_PAD) -> Image.Image:
    """Tile rows of images (each (n,3,H,W) in [0,1]) into one picture, upscaled to ``cell`` px."""
    n_cols = max(len(r) for r in rows)
    width = n_cols * (cell + pad) + pad
    height = len(rows) * (cell + pad) + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    for i, row in enumerate(rows):
        for j, tile in enumerate(to_uint8(row)):
            img = Image.fromarray(tile).resize((cell, cell), Image.NEAREST)
            canvas.paste(img, (pad + j * (cell + pad), pad + i * (cell + pad)))
    return canvas


def read_grid_row(path: str | Path, cell: int = GRID_CELL, pad: int = GRID_PAD) -> np.ndarray:
    """Inverse of a one-row :func:`image_grid`: (n, 3, cell, cell) floats in [0, 1]."""
    arr = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    n = (arr.shape[1] - pad) // (cell + pad)
    tiles = [arr[pad:pad + cell, pad + j * (cell + pad):pad + j * (cell + pad) + cell] for j in range(n)]
    return np.stack(tiles).transpose(0, 3, 1, 2)


def pairs_grid(gt: np.ndarray, recon: np.ndarray | Sequence[np.ndarray], per_row: int = 8,
               cell: int = 96) -> Image.Image:
    """Ground truth above reconstruction (or above each of several reconstructions of the same
    stimuli, e.g. one per subject), ``per_row`` stimuli per band."""
    recons = [recon] if isinstance(recon, np.ndarray) else list(recon)
    rows = []
    for start in range(0, len(gt), per_row):
        rows += [gt[start:start + per_row], *(r[start:start + per_row] for r in recons)]
    return image_grid(rows, cell=cell)


def format_value(value, kind: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if kind == "rate":  # {rate, low, high, valid}: a world-reader rate with its 95 % interval
        if not value.get("valid", True):
            ceiling = value.get("ceiling")  # the reader's rate on the stimuli themselves
            return "not readable" + (f" (reader {100 * ceiling:.0f}% on stimuli)" if ceiling is not None else "")
        return f"{100 * value['rate']:.0f}% [{100 * value['low']:.0f}–{100 * value['high']:.0f}]"
    if kind == "percent":
        return f"{100 * value:.2f}%"  # two decimals, as MindEye2 reports (e.g. 97.91)
    return f"{value:.3f}"


def metric_table_markdown(rows: list[tuple[str, dict]], columns: list[tuple[str, str, str]]) -> str:
    """Markdown table. ``columns`` = [(key, header, kind)] with kind 'percent' or 'float'."""
    head = "| | " + " | ".join(h for _, h, _ in columns) + " |"
    sep = "|---|" + "---|" * len(columns)
    body = [
        f"| {name} | " + " | ".join(format_value(vals.get(k), kind) for k, _, kind in columns) + " |"
        for name, vals in rows
    ]
    return "\n".join([head, sep, *body])


def write_report(
    out_dir: str | Path,
    *,
    title: str,
    intro: str,
    settings: dict,
    metric_rows: list[tuple[str, dict]],
    columns: list[tuple[str, str, str]],
    gt: np.ndarray,
    recon: np.ndarray | list[tuple[str, np.ndarray]],
    strips: list[tuple[str, np.ndarray]] | None = None,
    timings: dict[str, float] | None = None,
    notes: list[str] | None = None,
    extra_tables: list[dict] | None = None,
) -> dict[str, Path]:
    """Write report.html, report.md, report.json and the PNGs into ``out_dir``.

    ``recon``: the reconstructions of ``gt``, or [(label, reconstructions)] for several sets of
    the same stimuli (e.g. per subject), drawn in that order under each stimulus.

    ``extra_tables``: further tables after the metrics, each a dict with ``key`` (its name in
    report.json), ``title``, ``intro``, ``rows`` and ``columns`` (as ``metric_rows`` / ``columns``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    labelled = isinstance(recon, list)
    pairs_grid(gt, [r for _, r in recon] if labelled else recon).save(out / "reconstructions.png")
    strip_files = []
    for i, (label, strip) in enumerate(strips or []):
        name = f"coarse_to_fine_{i}.png"
        image_grid([strip]).save(out / name)
        strip_files.append((label, name))
    table = metric_table_markdown(metric_rows, columns)
    md = [f"# {title}", "", intro, "", "## Setting", ""]
    md += [f"- **{k}**: {v}" for k, v in settings.items()]
    md += ["", "## Metrics", "", table, ""]
    md += [f"- {n}" for n in (notes or [])]
    for extra in extra_tables or []:
        md += ["", f"## {extra['title']}", "", extra["intro"], "",
               metric_table_markdown(extra["rows"], extra["columns"])]
    caption = (f"each band: stimulus, then {', '.join(label for label, _ in recon)}" if labelled
               else "top: stimulus, bottom: reconstruction")
    md += ["", f"## Reconstructions ({caption})", "", "![reconstructions](reconstructions.png)", ""]
    if strip_files:
        md += ["## Coarse to fine (the image after each scale)", ""]
        md += [f"**{label}**\n\n![{label}]({name})\n" for label, name in strip_files]
    if timings:
        md += ["## Timings", "", "| stage | seconds |", "|---|---|"]
        md += [f"| {k} | {v:.1f} |" for k, v in timings.items()]
    (out / "report.md").write_text("\n".join(md) + "\n")
    (out / "report.html").write_text(markdown_to_html(title, "\n".join(md)))
    (out / "report.json").write_text(json.dumps(
        {"settings": settings, "metrics": dict(metric_rows), "timings": timings or {},
         **{extra["key"]: dict(extra["rows"]) for extra in extra_tables or []}},
        indent=2, default=str))
    return {"html": out / "report.html", "md": out / "report.md", "json": out / "report.json"}


def markdown_to_html(title: str, md: str) -> str:
    """Just enough markdown (headings, lists, tables, images, bold) for our own report."""
    out, in_table, in_list = [], False, False
    for line in md.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if set("".join(cells)) <= set("-"):
                continue
            tag = "th" if not in_table else "td"
            if not in_table:
                out.append("<table>")
                in_table = True
            out.append("<tr>" + "".join(f"<{tag}>{_inline(c)}</{tag}>" for c in cells) + "</tr>")
            continue
        if in_table:
            out.append("</table>")
            in_table = False
        if line.startswith("- "):
            if not in_list:
                out.append("<ul>")
                in_list = True
            out.append(f"<li>{_inline(line[2:])}</li>")
            continue
        if in_list:
            out.append("</ul>")
            in_list = False
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{_inline(line.lstrip('#').strip())}</h{level}>")
        elif line.startswith("!["):
            alt, src = line[2:].split("](", 1)
            out.append(f'<p><img src="{html.escape(src.rstrip(")"))}" alt="{html.escape(alt)}"></p>')
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
    if in_table:
        out.append("</table>")
    if in_list:
        out.append("</ul>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:"
             "collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
             "td:first-child,th:first-child{text-align:left}img{image-rendering:pixelated}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(out) + "\n</body></html>\n")


def _inline(text: str) -> str:
    text = html.escape(text)
    parts = text.split("**")
    return "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))
