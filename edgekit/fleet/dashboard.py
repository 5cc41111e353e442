"""The dashboard: one server-rendered HTML page, refreshed by the browser every few seconds.

No JavaScript framework and no build step: the page is a function of the data the REST API
already returns, rendered with the standard library and escaped everywhere, so what an
operator sees on it is exactly what ``edgekit fleet devices`` and ``edgekit rollout status``
print. Progress bars are ``<meter>``-like divs sized with inline styles; the only "script" is
``<meta http-equiv="refresh">``.
"""

from __future__ import annotations

import html
import time
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["render_dashboard", "render_login"]

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{font-size:1.4em;margin:0 0 .2em} h2{font-size:1.1em;margin:1.4em 0 .4em}
table{border-collapse:collapse;width:100%;background:#fff}
th,td{text-align:left;padding:.25em .6em;border-bottom:1px solid #e4e4e4;white-space:nowrap}
th{background:#f0f0f0;font-weight:600}
.cards{display:flex;gap:1em;flex-wrap:wrap}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:.6em 1em;min-width:8em}
.card b{display:block;font-size:1.6em}
.on{color:#1a7f37}.off{color:#b42318}.stale{color:#9a6700}.muted{color:#777}
.bar{display:flex;width:16em;height:.9em;background:#eee;border-radius:3px;overflow:hidden}
.bar span{display:block;height:100%}
.ok{background:#2da44e}.bad{background:#cf222e}.wait{background:#d4a72c}
.state{font-weight:600}
"""


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _ago(ts: float | None, now: float) -> str:
    if not ts:
        return "never"
    delta = max(0.0, now - ts)
    if delta < 60:
        return f"{delta:.0f}s ago"
    if delta < 3600:
        return f"{delta / 60:.0f}m ago"
    if delta < 86400:
        return f"{delta / 3600:.1f}h ago"
    return f"{delta / 86400:.1f}d ago"


def _num(value: object, fmt: str = "{:.1f}") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return fmt.format(value)
    return _e(value)


def _model(model: Mapping[str, Any] | None) -> str:
    if not model:
        return '<span class="muted">none</span>'
    return f"{_e(model.get('name'))}:{_e(model.get('version'))}"


def _bar(wave: Mapping[str, Any]) -> str:
    total = max(int(wave.get("devices") or 0), 1)
    parts = []
    for key, css in (("succeeded", "ok"), ("failed", "bad"), ("pending", "wait")):
        share = 100.0 * int(wave.get(key) or 0) / total
        if share > 0:
            parts.append(f'<span class="{css}" style="width:{share:.1f}%"></span>')
    return f'<div class="bar" role="progressbar">{"".join(parts)}</div>'


def _rollout_section(rollout: Mapping[str, Any]) -> str:
    rows = []
    current = int(rollout.get("wave") or 0)
    for wave in rollout.get("wave_stats", []):
        index = int(wave["index"]) + 1
        marker = " ◀" if index == current and rollout.get("state") in ("running", "waiting") else ""
        rows.append(
            "<tr>"
            f"<td>wave {index}{marker}</td>"
            f"<td>{wave['share'] * 100:.0f}%</td>"
            f"<td>{_bar(wave)}</td>"
            f"<td>{_e(wave['devices'])}</td>"
            f"<td>{_e(wave['succeeded'])}</td>"
            f"<td>{_e(wave['failed'])}</td>"
            f"<td>{_e(wave['pending'])}</td>"
            f"<td>{_e(wave['excluded'])}</td>"
            f"<td>{_e(wave['rolled_back'])}</td>"
            "</tr>"
        )
    late = rollout.get("late") or {}
    if late.get("devices"):
        rows.append(
            f"<tr><td>late joiners</td><td></td><td>{_bar(late)}</td>"
            f"<td>{_e(late['devices'])}</td><td>{_e(late['succeeded'])}</td>"
            f"<td>{_e(late['failed'])}</td><td>{_e(late['pending'])}</td>"
            f"<td>{_e(late['excluded'])}</td><td>{_e(late['rolled_back'])}</td></tr>"
        )
    gates = "".join(
        f"<li>{_e(g.get('gate'))}: <b>{_e(g.get('verdict'))}</b>"
        f" (value {_num(g.get('value'), '{:.4g}')}, {_e(g.get('devices'))} devices)</li>"
        for g in rollout.get("gate_results") or []
    )
    reason = rollout.get("reason")
    return (
        f'<h3 id="rollout-{_e(rollout["id"])}">{_e(rollout["id"])} '
        f"{_e(rollout.get('bundle'))}:{_e(rollout.get('version'))} → fleet "
        f"{_e(rollout.get('fleet'))}: "
        f'<span class="state rollout-state">{_e(rollout.get("state"))}</span>'
        f" (wave {_e(rollout.get('wave'))}/{_e(rollout.get('waves'))})</h3>"
        + (f"<p>reason: {_e(reason)}</p>" if reason else "")
        + (f"<ul>{gates}</ul>" if gates else "")
        + '<table class="waves"><tr><th>wave</th><th>share</th><th>progress</th>'
        "<th>devices</th><th>succeeded</th><th>failed</th><th>pending</th>"
        "<th>excluded</th><th>rolled back</th></tr>" + "".join(rows) + "</table>"
    )


def render_dashboard(
    *,
    summary: Mapping[str, Any],
    devices: Sequence[Mapping[str, Any]],
    rollouts: Sequence[Mapping[str, Any]],
    audit: Sequence[Mapping[str, Any]],
    stats: Mapping[str, Any],
    refresh_s: int = 5,
    now: float | None = None,
    device_limit: int = 200,
) -> str:
    """The whole page. ``devices`` are the API's device summaries, newest telemetry first."""
    now = time.time() if now is None else now
    models = "".join(
        f"<tr><td>{_e(m['model'])}</td><td>{_e(m['devices'])}</td></tr>"
        for m in summary.get("models", [])
    )
    device_rows = []
    for d in devices[:device_limit]:
        if d.get("online"):
            presence = '<span class="on">online</span>'
            if d.get("stale"):
                presence = '<span class="stale">online (silent)</span>'
        else:
            presence = '<span class="off">offline</span>'
        t = d.get("telemetry") or {}
        device_rows.append(
            f'<tr class="device"><td>{_e(d["fleet"])}</td><td>{_e(d["device"])}</td>'
            f"<td>{presence}</td><td>{_model(d.get('current'))}</td>"
            f"<td>{_e(', '.join(d.get('groups') or []))}</td>"
            f"<td>{_e(d.get('update_state'))}</td>"
            f"<td>{_ago(d.get('last_seen'), now)}</td>"
            f"<td>{_num(t.get('p95_ms'))}</td><td>{_num(t.get('inferences'))}</td>"
            f"<td>{_num(t.get('errors'))}</td><td>{_num(t.get('drift_psi'), '{:.3f}')}</td>"
            f"<td>{_num(t.get('cpu_percent'))}</td></tr>"
        )
    more = len(devices) - device_limit
    recent = sorted(
        (d for d in devices if d.get("telemetry")),
        key=lambda d: -float(d["telemetry"]["at"] or 0),
    )[:15]
    telemetry_rows = "".join(
        f"<tr><td>{_ago(d['telemetry']['at'], now)}</td><td>{_e(d['device'])}</td>"
        f"<td>{_model(d['telemetry'].get('model'))}</td>"
        f"<td>{_num(d['telemetry'].get('inferences'))}</td>"
        f"<td>{_num(d['telemetry'].get('p95_ms'))}</td>"
        f"<td>{_num(d['telemetry'].get('errors'))}</td>"
        f"<td>{_e(d['telemetry'].get('self_test_ok'))}</td></tr>"
        for d in recent
    )
    audit_rows = "".join(
        f"<tr><td>{_ago(a['ts'], now)}</td><td>{_e(a['actor'])}</td><td>{_e(a['action'])}</td>"
        f"<td>{_e(a.get('rollout_id'))}</td><td>{_e(a.get('device'))}</td></tr>"
        for a in audit[:20]
    )
    ingest = stats.get("ingest", {})
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        f'<meta http-equiv="refresh" content="{int(refresh_s)}">'
        "<title>edgekit fleet</title>"
        f"<style>{_STYLE}</style></head><body>"
        "<h1>edgekit fleet</h1>"
        f'<p class="muted">updated {time.strftime("%H:%M:%S", time.localtime(now))}, '
        f"refreshes every {int(refresh_s)}s</p>"
        '<div class="cards">'
        f'<div class="card" id="devices-total"><b>{_e(summary.get("devices"))}</b>devices</div>'
        f'<div class="card" id="devices-online"><b class="on">{_e(summary.get("online"))}</b>'
        "online</div>"
        f'<div class="card" id="devices-offline"><b class="off">{_e(summary.get("offline"))}'
        "</b>offline</div>"
        f'<div class="card"><b>{_e(ingest.get("processed_total", 0))}</b>messages</div>'
        f'<div class="card"><b>{_e(ingest.get("malformed_total", 0))}</b>malformed</div>'
        "</div>"
        "<h2>Rollouts</h2>"
        + ("".join(_rollout_section(r) for r in rollouts) or '<p class="muted">none yet</p>')
        + "<h2>Model versions</h2><table><tr><th>model</th><th>devices</th></tr>"
        + models
        + "</table><h2>Devices</h2>"
        '<table id="devices"><tr><th>fleet</th><th>device</th><th>presence</th><th>model</th>'
        "<th>groups</th><th>update</th><th>last seen</th><th>p95 ms</th><th>inferences</th>"
        "<th>errors</th><th>drift</th><th>cpu %</th></tr>"
        + "".join(device_rows)
        + "</table>"
        + (f'<p class="muted">and {more} more (see the API)</p>' if more > 0 else "")
        + "<h2>Recent telemetry</h2><table><tr><th>when</th><th>device</th><th>model</th>"
        "<th>inferences</th><th>p95 ms</th><th>errors</th><th>golden</th></tr>"
        + telemetry_rows
        + "</table><h2>Audit log</h2><table><tr><th>when</th><th>actor</th><th>action</th>"
        "<th>rollout</th><th>device</th></tr>" + audit_rows + "</table></body></html>"
    )


def render_login(*, message: str = "") -> str:
    """Asked for when the browser has no session cookie; the token travels once, then a
    cookie (holding a keyed hash, not the token) carries the session."""
    return (
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>edgekit fleet</title>"
        f"<style>{_STYLE}</style></head><body><h1>edgekit fleet</h1>"
        + (f'<p class="off">{_e(message)}</p>' if message else "")
        + '<form method="get" action="/dashboard"><label>API token '
        '<input type="password" name="token" autocomplete="current-password"></label> '
        '<button type="submit">Open</button></form></body></html>'
    )
