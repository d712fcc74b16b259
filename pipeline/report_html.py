"""HTML of the data-curation report: plain sentences, tables and embedded figures.

Everything that comes from data (group names, paths, error messages) passes through
``html.escape``; figures arrive as PNG bytes and are embedded as data URIs, so the page makes no
request of its own (its Content-Security-Policy forbids any).
"""

from __future__ import annotations

import base64
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from html import escape
from typing import Any

from .figures import STATUS_COLORS, fmt_threshold

__all__ = [
    "Gallery",
    "Page",
    "finding_sentence",
    "fmt",
    "fmt_threshold",
    "group_label",
    "render_page",
    "run_facts",
    "summary_notes",
]

_CSS = """
body{font:15px/1.5 system-ui,-apple-system,"Segoe UI",sans-serif;max-width:1100px;margin:2em auto;
 padding:0 1em;color:#1b1b1b}
h1{font-size:1.6em;margin-bottom:.2em}h2{margin-top:1.8em;border-bottom:1px solid #ddd}
.lede{color:#555;margin-top:0}
ul.findings li{margin:.35em 0}
.badge{display:inline-block;padding:0 .45em;border-radius:3px;color:#fff;font-size:.85em}
table{border-collapse:collapse;font-size:.88em}
td,th{padding:.25em .6em;border-bottom:1px solid #eee;text-align:right}td.t,th.t{text-align:left}
figure{margin:1em 0}figure.chart img{max-width:100%}
.gallery{display:flex;flex-wrap:wrap;gap:.8em}.item{margin:0;width:min-content}
.item figcaption{font-size:.78em;color:#444;word-break:break-all}
.ph{width:300px;height:150px;border:1px dashed #b00;color:#b00;padding:.6em;font-size:.85em;
 overflow:auto;box-sizing:border-box}
dl.facts{display:grid;grid-template-columns:max-content auto;gap:.2em 1em}
dl.facts dt{font-weight:600}
dl.facts dd{margin:0;word-break:break-word}
"""
_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
_MAX_FAILURES = 50  # failures listed on the page; curation.csv has them all


def fmt(x: Any, digits: int = 2) -> str:
    """A number for people: ``n/a`` for NaN/None, else fixed or (tiny/huge) scientific."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if isinstance(x, float) and not (10**-digits <= abs(x) < 10**4) and x != 0:
        return f"{x:.{digits}g}"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def group_label(values: Mapping[str, Any], group_by: Sequence[str]) -> str:
    """``Room kitchen`` or ``Room kitchen, class chair``; a missing value reads ``(missing)``."""
    parts = []
    for k, col in enumerate(group_by):
        name = col.replace("_", " ")
        value = values.get(col)
        missing = value is None or (isinstance(value, float) and math.isnan(value))
        parts.append(f"{name.capitalize() if k == 0 else name} {'(missing)' if missing else value}")
    return ", ".join(parts) if parts else "All images"


def finding_sentence(row: Mapping[str, Any], group_by: Sequence[str], params: Mapping) -> str:
    """The plain-sentence verdict on one flagged or inconclusive group (not escaped)."""
    t = fmt_threshold(float(params["threshold"]))
    ci = f"{float(params['confidence']) * 100:g}% CI {fmt(row['ci_low'])}-{fmt(row['ci_high'])}"
    stat = f"geometric-mean fg/bg ratio {fmt(row['gmean_ratio'])} ({ci})"
    unusable = int(row["n"]) - int(row["n_valid"])
    over = f"over {row['n_valid']} images"
    if unusable:
        over += f" ({unusable} more without a usable ratio: {row['n_error']} errors, "
        over += f"{row['n_nan']} undefined)"
    if row["status"] == "flagged":
        text = f"the model relies on background — {stat} < threshold {t} {over}"
    else:
        text = (
            f"inconclusive — {stat} {over} includes the threshold {t}; more images would settle it"
        )
    text = f"{group_label(row, group_by)}: {text}"
    return text + "."


def summary_notes(summary: Any, group_by: Sequence[str], params: Mapping) -> list[str]:
    """Plain sentences under the findings: the all-clear, groups without a verdict, failures.

    Args:
        summary: the per-group summary DataFrame (``summary_schema`` columns).
        group_by: its group columns.
        params: audit parameters (``threshold``, ``min_images``, ``confidence``).
    """
    t = fmt_threshold(float(params["threshold"]))
    status = summary["status"]
    notes = []
    if not status.isin(["flagged", "inconclusive"]).any():
        notes.append(
            f"No group was flagged or inconclusive: every group with at least "
            f"{params['min_images']} valid images has a geometric-mean fg/bg ratio confidently "
            f"above the threshold {t}."
        )
    n_ok = int((status == "ok").sum())
    notes.append(
        f"{len(summary)} groups by {', '.join(group_by) or 'nothing'}; {n_ok} ok "
        f"(interval above threshold {t}), {int((status == 'flagged').sum())} flagged, "
        f"{int((status == 'inconclusive').sum())} inconclusive, "
        f"{int((status == 'too-few').sum())} with too few images for a verdict."
    )
    few = summary[status == "too-few"]
    if len(few):
        named = [f"{group_label(s, group_by)} ({s['n_valid']})" for _, s in few.head(10).iterrows()]
        more = f" and {len(few) - 10} more" if len(few) > 10 else ""
        notes.append(
            f"Fewer than {params['min_images']} valid images, so no verdict: "
            f"{'; '.join(named)}{more}."
        )
    n, n_error, n_nan = (int(summary[c].sum()) for c in ("n", "n_error", "n_nan"))
    if n_error or n_nan:
        notes.append(
            f"Of {n} images, {n_error} failed (error) and {n_nan} have an undefined ratio (empty "
            f"mask or background, or an all-zero map); curation.csv lists them with the reason."
        )
    return notes


def run_facts(info: Mapping[str, Any], params: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(label, text) facts of a run from its run.json dict; missing keys are left out."""
    config = info.get("config") or {}
    dataset = config.get("dataset") or {}
    counts = info.get("counts") or {}
    timings = info.get("timings") or {}
    facts = [
        ("Run", info.get("name")),
        ("Model", facts_text(config.get("model")) if config.get("model") else None),
        ("Model hash", info.get("model_hash")),
        ("Engine", info.get("engine")),
        ("Manifest", dataset.get("manifest")),
        ("Image root", dataset.get("root")),
        ("Image size", facts_text(dataset.get("image_size")) if "image_size" in dataset else None),
        ("Occlusion", facts_text(config.get("occlusion")) if config.get("occlusion") else None),
        (
            "Audit",
            f"group by {', '.join(params['group_by'])}; threshold {params['threshold']}; "
            f"min_images {params['min_images']}; confidence {params['confidence']}; "
            f"bootstrap {params['n_boot']} resamples, seed {params['seed']}",
        ),
        ("Images", facts_text(counts) if counts else None),
        ("Time", facts_text(timings) if timings else None),
        ("Started", info.get("started_at")),
        ("Finished", info.get("finished_at")),
        ("Versions", facts_text(info.get("versions")) if info.get("versions") else None),
    ]
    return [(k, str(v)) for k, v in facts if v not in (None, "")]


@dataclass
class Gallery:
    """The most background-reliant images of one group, as ready HTML items."""

    label: str
    status: str
    items: list[str] = field(default_factory=list)


@dataclass
class Page:
    """Everything the report page shows; HTML fragments in ``galleries`` are already escaped."""

    title: str
    findings: list[tuple[str, str]]  # (status, sentence)
    notes: list[str]  # further plain sentences under the findings
    table_columns: list[str]
    table_rows: list[tuple[str, list[str]]]  # (status, cells)
    charts: list[tuple[str, bytes, str]]  # (heading, PNG, caption)
    galleries: list[Gallery]
    facts: list[tuple[str, str]]
    failures: list[Mapping[str, Any]]  # run.json "failures": {"image_id", "error"}
    files: list[str]


def data_uri(png: bytes) -> str:
    """``data:image/png;base64,...`` for an ``<img src>``."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def image_item(png: bytes, alt: str, caption: str) -> str:
    """A gallery figure with its caption (both escaped here)."""
    return (
        f'<figure class="item"><img src="{data_uri(png)}" alt="{escape(alt)}">'
        f"<figcaption>{escape(caption)}</figcaption></figure>"
    )


def placeholder_item(message: str, caption: str) -> str:
    """A gallery slot for an image that could not be drawn, showing why."""
    return (
        f'<figure class="item placeholder"><div class="ph">{escape(message)}</div>'
        f"<figcaption>{escape(caption)}</figcaption></figure>"
    )


def facts_text(value: Any) -> str:
    """A config value as compact text: mappings as ``key: value; ...``, lists as JSON."""
    if isinstance(value, Mapping):
        return "; ".join(f"{k}: {facts_text(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return json.dumps(list(value))
    return "n/a" if value is None else str(value)


def _badge(status: str) -> str:
    color = STATUS_COLORS.get(status, "#333")
    return f'<span class="badge" style="background:{color}">{escape(status)}</span>'


def _table(
    columns: Sequence[str],
    rows: Sequence[tuple[str, list[str]]],
    n_text: int,
    badge_col: int | None = None,
) -> str:
    """A table; the first ``n_text`` columns are text, cell ``badge_col`` shows a status badge."""
    head = "".join(
        f'<th class="{"t" if k < n_text else ""}">{escape(c)}</th>' for k, c in enumerate(columns)
    )
    body = []
    for status, cells in rows:
        tds = []
        for k, c in enumerate(cells):
            text = _badge(c) if k == badge_col else escape(c)
            tds.append(f'<td class="t">{text}</td>' if k < n_text else f"<td>{text}</td>")
        body.append(f'<tr class="{escape(status)}">{"".join(tds)}</tr>')
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def render_page(page: Page, n_text_columns: int) -> str:
    """The complete, self-contained ``index.html`` text.

    Args:
        page: content to show.
        n_text_columns: leading table columns that hold text: the group values, then the status.
    """
    out = [
        '<!doctype html><html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(page.title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{escape(page.title)}</h1>",
        '<section id="findings"><h2>Findings</h2><ul class="findings">',
    ]
    out += [f'<li class="{escape(s)}">{_badge(s)} {escape(text)}</li>' for s, text in page.findings]
    out.append("</ul>")
    out += [f"<p>{escape(note)}</p>" for note in page.notes]
    out.append('</section><section id="groups"><h2>Groups</h2>')
    table = _table(page.table_columns, page.table_rows, n_text_columns, n_text_columns - 1)
    out.append(table)
    out.append("</section>")
    for k, (heading, png, caption) in enumerate(page.charts):
        out.append(
            f'<section id="chart-{k}"><h2>{escape(heading)}</h2><figure class="chart">'
            f'<img src="{data_uri(png)}" alt="{escape(heading)}">'
            f"<figcaption>{escape(caption)}</figcaption></figure></section>"
        )
    if page.galleries:
        out.append('<section id="galleries"><h2>Most background-reliant images</h2>')
        out.append(
            "<p>Per flagged or inconclusive group, the images with the lowest fg/bg ratio: the "
            "image with its foreground outline, and the occlusion map (red: occluding there "
            "lowers the score, blue: raises it; colour scale centred on zero).</p>"
        )
        for g in page.galleries:
            out.append(f'<div class="group" data-status="{escape(g.status)}">')
            out.append(f"<h3>{escape(g.label)} {_badge(g.status)}</h3>")
            out.append(f'<div class="gallery">{"".join(g.items)}</div></div>')
        out.append("</section>")
    out.append('<section id="run"><h2>Run</h2><dl class="facts">')
    out += [f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in page.facts]
    out.append("</dl>")
    if page.failures:
        out.append(f"<h3>Failures ({len(page.failures)})</h3>")
        shown = page.failures[:_MAX_FAILURES]
        rows = [("", [str(f.get("image_id", "")), str(f.get("error", ""))]) for f in shown]
        out.append(_table(["image_id", "error"], rows, 2))
        if len(page.failures) > len(shown):
            out.append(f"<p>{len(page.failures) - len(shown)} more in curation.csv.</p>")
    links = " · ".join(f'<a href="{escape(f)}">{escape(f)}</a>' for f in page.files)
    out.append(f"<p>Files: {links}</p></section></body></html>")
    return "\n".join(out)
