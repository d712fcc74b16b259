"""The words and the pages of the data-curation report: sentences, page content, templates.

The pages are jinja2 templates (``templates/``), rendered with autoescape: every value from data
(group names, paths, error messages, captions) is escaped by jinja2, and nothing is marked safe
by hand. Figures are files in the report folder (``img/``), linked by relative paths; the one
script, ``report.js``, is a static file beside the pages that holds no data. Every page carries
the same Content-Security-Policy (``templates/_macros.html.j2``): files of its own origin only, no
inline script, no request elsewhere.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, StrictUndefined

from pipeline.report.figures import STATUS_COLORS, fmt_threshold
from pipeline.report.names import group_label, missing
from pipeline.storage.atomic import write_text

__all__ = [
    "MAX_FINDINGS",
    "REVIEW",
    "SCRIPT",
    "Chart",
    "Failure",
    "Page",
    "environment",
    "finding_sentence",
    "fix_quotes",
    "fmt",
    "fmt_threshold",
    "group_label",
    "render_page",
    "summary_notes",
    "write_script",
]

SCRIPT = "report.js"  # sorting, filtering and the map opacity, beside every page folder
REVIEW = ("flagged", "inconclusive")  # the statuses the findings name
_TEMPLATE = "report.html.j2"
_MAX_FAILURES = 50  # failures listed on the page; curation.csv has them all
MAX_FINDINGS = 10  # findings named one by one; the rest are a filter of the table away
# markupsafe spells escaped quotes &#34; and &#39;; the page has always used html.escape's
# &quot; and &#x27;. Same characters; the swap keeps the page text stable across versions.
_QUOTE_ENTITIES = (("&#34;", "&quot;"), ("&#39;", "&#x27;"))


def fmt(x: Any, digits: int = 2) -> str:
    """A number for people: ``n/a`` for NaN/None, else fixed or (tiny/huge) scientific."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    if isinstance(x, float) and not (10**-digits <= abs(x) < 10**4) and x != 0:
        return f"{x:.{digits}g}"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def finding_sentence(
    row: Mapping[str, Any], group_by: Sequence[str], params: Mapping, label: str | None = None
) -> str:
    """The plain-sentence verdict on one flagged or inconclusive group (plain text); ``label``
    names the group (default :func:`~pipeline.report.names.group_label`)."""
    t = fmt_threshold(float(params["threshold"]))
    ci = f"{float(params['confidence']) * 100:g}% CI {fmt(row['ci_low'])}-{fmt(row['ci_high'])}"
    stat = f"geometric-mean fg/bg ratio {fmt(row['gmean_ratio'])} ({ci})"
    unusable = int(row["n"]) - int(row["n_valid"])
    over = f"over {row['n_valid']} images"
    if unusable:
        over += f" ({unusable} more without a usable ratio: {row['n_error']} errors, "
        over += f"{row['n_nan']} undefined)"
    q = row.get("q_value")
    q_text = "" if missing(q) else f", q-value {fmt(float(q), 3)}"
    if row["status"] == "flagged":
        text = f"the model relies on background — {stat} below the threshold {t}{q_text} {over}"
    elif float(row["ci_high"]) < float(params["threshold"]):
        text = (
            f"inconclusive — {stat} {over} lies below the threshold {t}, but not clearly enough "
            f"among this many groups{q_text}; more images would settle it"
        )
    else:
        text = (
            f"inconclusive — {stat} {over} includes the threshold {t}; more images would settle it"
        )
    text = f"{label or group_label(row, group_by)}: {text}"
    return text + "."


def summary_notes(
    summary: Any,
    group_by: Sequence[str],
    params: Mapping,
    label: Callable[[Mapping[str, Any]], str] | None = None,
) -> list[str]:
    """Plain sentences under the findings: the all-clear, groups without a verdict, failures.

    Args:
        summary: the per-group summary DataFrame (``summary_schema`` columns).
        group_by: its group columns.
        params: audit parameters (``threshold``, ``min_images``, ``confidence``).
        label: names a group from its summary row (default
            :func:`~pipeline.report.names.group_label`).
    """
    name = label or (lambda s: group_label(s, group_by))
    t = fmt_threshold(float(params["threshold"]))
    status = summary["status"]
    fdr = params.get("fdr")
    if fdr is not None:
        rule = (
            f"A group is flagged when its q-value (Benjamini-Hochberg, across the "
            f"{int(summary['q_value'].notna().sum())} groups with a verdict) is at most {fdr:g}: "
            f"on average at most {fdr:.0%} of flagged groups are false alarms."
        )
    else:
        rule = (
            f"A group is flagged when its own {float(params['confidence']):.0%} interval lies "
            f"below the threshold {t}; over many groups some flags are chance."
        )
    notes = [rule]
    if int(summary["n_valid"].sum()) == 0 and int(summary["n_error"].sum()) < int(
        summary["n"].sum()
    ):
        notes.insert(
            0,
            (
                "No image has a usable foreground (no mask or box, or empty ones), so the fg/bg "
                "ratios are undefined and no group can be flagged; the Strategies section, when "
                "present, shows what the model looks at without masks."
            ),
        )
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
        f"{int((status == 'too-few').sum())} with too few images for a verdict, "
        f"{int((status == 'unreliable').sum())} unreliable (more than "
        f"{float(params.get('max_error_share', 1.0)):.0%} of their images failed)."
    )
    few = summary[status == "too-few"]
    if len(few):
        named = [f"{name(s)} ({s['n_valid']})" for _, s in few.head(10).iterrows()]
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


@dataclass(frozen=True)
class Chart:
    """A chart: its heading (also the image's alt text), PNG bytes, caption, and its file
    (``img/<name>.png``) once written."""

    heading: str
    png: bytes
    caption: str
    src: str = ""


@dataclass(frozen=True)
class Failure:
    """An image whose audit failed, and the error it failed with."""

    image_id: str
    error: str


@dataclass
class Page:
    """Everything the index shows, as plain text, file names and views (nothing pre-rendered)."""

    title: str
    findings: list[tuple[str, str, str]]  # (status, sentence, group page)
    more_findings: int  # flagged or inconclusive groups not named one by one
    notes: list[str]  # further plain sentences under the findings
    table: Any  # pipeline.report.table.Table of every group
    charts: list[Chart]
    galleries: list[Any]  # GroupView of the first flagged/inconclusive groups
    gallery_size: int
    more_galleries: int  # flagged or inconclusive groups whose images are on their pages only
    facts: list[tuple[str, str]]
    failures: list[Failure]
    files: list[str]
    review: Any = None  # the head of the review queue: a Table
    review_total: int = 0
    fiftyone: Mapping[str, Any] | None = None  # dataset and view of an export, when made
    evidence: list[Any] = field(default_factory=list)  # EvidenceBlock of the first flagged
    more_evidence: int = 0
    strategies: list[Any] = field(default_factory=list)  # GroupView with strategy tiles
    more_strategies: int = 0
    pool: Chart | None = None  # the actor timeline of the run section


@functools.cache
def environment() -> Environment:
    """The jinja2 environment of every page: autoescape on, undefined names are errors."""
    env = Environment(
        loader=PackageLoader("pipeline.report", "templates"),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.globals["status_colors"] = STATUS_COLORS
    env.globals["script"] = SCRIPT
    env.globals["fmt"] = fmt
    return env


def fix_quotes(text: str) -> str:
    """Rendered HTML with quotes spelled as the pages always spelled them."""
    for numeric, named in _QUOTE_ENTITIES:
        text = text.replace(numeric, named)
    return text


def render_page(page: Page) -> str:
    """The complete ``index.html`` text of ``page`` (template autoescaped)."""
    text = (
        environment().get_template(_TEMPLATE).render(page=page, max_failures=_MAX_FAILURES, root="")
    )
    return fix_quotes(text)


def write_script(folder: Path) -> Path:
    """Copy ``report.js`` (static, no data) into a page folder."""
    text = resources.files("pipeline.report").joinpath("static", SCRIPT).read_text("utf-8")
    return write_text(folder / SCRIPT, text)
