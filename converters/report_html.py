"""A self-contained HTML conversion report: the per-variant table and a latency/accuracy chart.

Standard library only (no plotting package): the chart is inline SVG, so the file opens
anywhere, offline, and can be attached to a release ticket as is.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["render_report_html"]

_W, _H, _PAD = 640, 360, 56


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return html.escape(str(value))


def _quality(row: Mapping[str, Any]) -> float | None:
    quality = row.get("quality") or {}
    value = quality.get("accuracy")
    if value is None:
        value = quality.get("top1_agreement")
    return float(value) if isinstance(value, (int, float)) else None


def _chart(rows: Sequence[Mapping[str, Any]], chosen: str) -> str:
    points = []
    for row in rows:
        latency = ((row.get("latency") or {}).get("batch_1") or {}).get("p50_ms")
        quality = _quality(row)
        if isinstance(latency, (int, float)) and quality is not None:
            points.append((str(row.get("recipe")), float(latency), quality))
    if not points:
        return "<p>No candidate has both a latency and a quality figure to chart.</p>"
    lat = [p[1] for p in points]
    qual = [p[2] for p in points]
    x_lo, x_hi = 0.0, max(lat) * 1.15 or 1.0
    y_lo, y_hi = min(qual) - 0.02, min(1.0, max(qual) + 0.01)
    if y_hi - y_lo < 0.02:
        y_lo = y_hi - 0.02

    def sx(v: float) -> float:
        return _PAD + (v - x_lo) / (x_hi - x_lo) * (_W - 2 * _PAD)

    def sy(v: float) -> float:
        return _H - _PAD - (v - y_lo) / (y_hi - y_lo) * (_H - 2 * _PAD)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" role="img" '
        'aria-label="latency versus quality per variant">',
        f'<line x1="{_PAD}" y1="{_H - _PAD}" x2="{_W - _PAD}" y2="{_H - _PAD}" stroke="#555"/>',
        f'<line x1="{_PAD}" y1="{_PAD}" x2="{_PAD}" y2="{_H - _PAD}" stroke="#555"/>',
        f'<text x="{_W / 2}" y="{_H - 16}" text-anchor="middle">batch-1 latency p50 (ms)</text>',
        f'<text x="16" y="{_H / 2}" transform="rotate(-90 16 {_H / 2})" '
        'text-anchor="middle">accuracy (or top-1 agreement)</text>',
    ]
    for i in range(5):
        xv = x_lo + (x_hi - x_lo) * i / 4
        yv = y_lo + (y_hi - y_lo) * i / 4
        parts.append(
            f'<text x="{sx(xv):.1f}" y="{_H - _PAD + 16}" font-size="11" '
            f'text-anchor="middle">{xv:.3g}</text>'
        )
        parts.append(
            f'<text x="{_PAD - 6}" y="{sy(yv) + 4:.1f}" font-size="11" '
            f'text-anchor="end">{yv:.3f}</text>'
        )
    for name, latency, quality in points:
        colour = "#d62728" if name == chosen else "#1f77b4"
        parts.append(
            f'<circle cx="{sx(latency):.1f}" cy="{sy(quality):.1f}" r="6" '
            f'fill="{colour}"><title>{html.escape(name)}</title></circle>'
        )
        parts.append(
            f'<text x="{sx(latency) + 9:.1f}" y="{sy(quality) - 7:.1f}" '
            f'font-size="12">{html.escape(name)}</text>'
        )
    parts.append("</svg>")
    return "\n".join(parts)


def render_report_html(report: Mapping[str, Any], *, title: str) -> str:
    """Render ``report`` (the ``report.json`` dict of a conversion) as one HTML page."""
    candidates: Sequence[Mapping[str, Any]] = report.get("candidates") or []
    rows = [c.get("measurement") or {} for c in candidates]
    verdicts = {
        (c.get("measurement") or {}).get("recipe"): c.get("verdict") or {} for c in candidates
    }
    selection = report.get("selection") or {}
    chosen = str(selection.get("chosen", ""))
    header = (
        "variant",
        "precision",
        "size (KiB)",
        "accuracy",
        "top-1 agreement",
        "drop",
        "max |err|",
        "cosine",
        "b1 p50 ms",
        "b1 p95 ms",
        "bN p50 ms/sample",
        "peak mem MiB",
        "verdict",
    )
    body = []
    for row in rows:
        quality = row.get("quality") or {}
        latency = row.get("latency") or {}
        b1 = latency.get("batch_1") or {}
        bn = latency.get("batch_n") or {}
        memory = (row.get("memory") or {}).get("peak_rss_delta_bytes")
        verdict = verdicts.get(row.get("recipe"), {})
        status = (
            "reference"
            if row.get("reference")
            else (
                "eligible" if verdict.get("eligible") else "; ".join(verdict.get("reasons") or [])
            )
        )
        cells = [
            row.get("recipe"),
            row.get("precision"),
            (row.get("file_size_bytes") or 0) / 1024,
            quality.get("accuracy"),
            quality.get("top1_agreement"),
            verdict.get("drop"),
            quality.get("max_abs_error"),
            quality.get("cosine"),
            b1.get("p50_ms"),
            b1.get("p95_ms"),
            bn.get("per_sample_p50_ms"),
            memory / 2**20 if isinstance(memory, int) else None,
            status,
        ]
        mark = ' class="chosen"' if row.get("recipe") == chosen else ""
        body.append(f"<tr{mark}>" + "".join(f"<td>{_fmt(c)}</td>" for c in cells) + "</tr>")
    warnings = "".join(f"<li>{html.escape(str(w))}</li>" for w in report.get("warnings") or [])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem; color: #222; }}
table {{ border-collapse: collapse; font-size: 14px; }}
td, th {{ border: 1px solid #ccc; padding: 4px 8px; text-align: right; }}
td:first-child, th:first-child, td:last-child {{ text-align: left; }}
tr.chosen {{ background: #fdecea; font-weight: 600; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>Chosen: <strong>{html.escape(chosen)}</strong>{
        " (fallback)" if selection.get("fallback") else ""
    }. Latencies were measured on the converting
machine; devices differ.</p>
<table><thead><tr>{"".join(f"<th>{h}</th>" for h in header)}</tr></thead>
<tbody>{"".join(body)}</tbody></table>
<h2>Latency and quality</h2>
{_chart(rows, chosen)}
{f"<h2>Warnings</h2><ul>{warnings}</ul>" if warnings else ""}
</body></html>
"""
