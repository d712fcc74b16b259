"""The words and the page of the data-curation report: sentences, run facts, page content.

The page itself is the jinja2 template ``templates/report.html.j2``, rendered with autoescape:
every value from data (group names, paths, error messages, captions) is escaped by jinja2, and
nothing is marked safe by hand. Figures arrive as PNG bytes and are embedded as data URIs, so the
page makes no request of its own (its Content-Security-Policy forbids any).
"""

from __future__ import annotations

import base64
import functools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import pandas as pd
from jinja2 import Environment, PackageLoader, StrictUndefined

from pipeline.config.typed import to_plain
from pipeline.report.figures import STATUS_COLORS, fmt_threshold

if TYPE_CHECKING:
    from pipeline.run.record import RunRecord

__all__ = [
    "Chart",
    "Failure",
    "Gallery",
    "GalleryImage",
    "GalleryPlaceholder",
    "Page",
    "data_uri",
    "environment",
    "facts_text",
    "finding_sentence",
    "fmt",
    "fmt_threshold",
    "group_label",
    "group_table",
    "render_page",
    "run_facts",
    "summary_notes",
]

_TEMPLATE = "report.html.j2"
_MAX_FAILURES = 50  # failures listed on the page; curation.csv has them all
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


def group_label(values: Mapping[str, Any], group_by: Sequence[str]) -> str:
    """``Room kitchen`` or ``Room kitchen, class chair``; a missing value reads ``(missing)``."""
    parts = []
    for k, col in enumerate(group_by):
        name = col.replace("_", " ")
        value = values.get(col)
        shown = "(missing)" if _missing(value) else value
        parts.append(f"{name.capitalize() if k == 0 else name} {shown}")
    return ", ".join(parts) if parts else "All images"


def finding_sentence(row: Mapping[str, Any], group_by: Sequence[str], params: Mapping) -> str:
    """The plain-sentence verdict on one flagged or inconclusive group (plain text)."""
    t = fmt_threshold(float(params["threshold"]))
    ci = f"{float(params['confidence']) * 100:g}% CI {fmt(row['ci_low'])}-{fmt(row['ci_high'])}"
    stat = f"geometric-mean fg/bg ratio {fmt(row['gmean_ratio'])} ({ci})"
    unusable = int(row["n"]) - int(row["n_valid"])
    over = f"over {row['n_valid']} images"
    if unusable:
        over += f" ({unusable} more without a usable ratio: {row['n_error']} errors, "
        over += f"{row['n_nan']} undefined)"
    q = row.get("q_value")
    q_text = "" if _missing(q) else f", q-value {fmt(float(q), 3)}"
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


def group_table(
    summary: Any, group_by: Sequence[str]
) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """Columns and ``(status, cells)`` rows of the page's group table, one row per summary row."""
    columns = [*group_by, "status", "n", "valid", "errors", "undefined", "gmean ratio"]
    columns += ["interval", "q-value", "median", "share < 1", "mean fg_share", "mean fg_area"]
    rows = []
    for _, s in summary.iterrows():
        cells = [_group_value(s[c]) for c in group_by]
        cells += [s["status"], str(s["n"]), str(s["n_valid"]), str(s["n_error"]), str(s["n_nan"])]
        cells += [fmt(s["gmean_ratio"]), f"{fmt(s['ci_low'])}-{fmt(s['ci_high'])}"]
        cells += [fmt(s.get("q_value"), 3)]
        cells += [fmt(s[c]) for c in ("median_ratio", "share_below_1", "mean_fg_share")]
        rows.append((str(s["status"]), [*cells, fmt(s["mean_fg_area"])]))
    return columns, rows


def _group_value(value: Any) -> str:
    return "(missing)" if _missing(value) else str(value)


def _missing(value: Any) -> bool:
    """Whether a group value is missing: None, NaN or pandas' NA."""
    return value is None or bool(pd.isna(value))


def run_facts(record: RunRecord | None, params: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(label, text) facts of a run from its record; facts the record lacks are left out.

    Args:
        record: the run's ``run.json`` record, or ``None`` for a run folder without one (then
            only the audit parameters are shown).
        params: audit parameters (``group_by``, ``threshold``, ``min_images``, ``confidence``,
            ``n_boot``, ``seed``).
    """
    audit = (
        f"group by {', '.join(params['group_by'])}; threshold {params['threshold']}; "
        f"min_images {params['min_images']}; confidence {params['confidence']}; "
        f"bootstrap {params['n_boot']} resamples, seed {params['seed']}"
    )
    if record is None:
        return [("Audit", audit)]
    dataset, occ = record.config.dataset, record.config.occlusion
    # token-drop has no baseline: its fill settings would only mislead
    unused = ("baseline", "value", "blur_sigma") if str(occ.mode) == "token-drop" else ()
    counts = to_plain(record.counts)
    facts = [
        ("Run", record.name),
        ("Model", section_text(record.config.model)),
        ("Model hash", record.model_hash),
        ("Engine", facts_text(record.engine) if record.engine else None),
        ("Pool", _pool_text(record.pool) if record.pool else None),
        ("Manifest", dataset.manifest),
        ("Image root", dataset.root),
        ("Image size", facts_text(dataset.image_size)),
        ("Occlusion", section_text(occ, unused)),
        ("Audit", audit),
        ("Images", facts_text(counts) if any(counts.values()) else None),  # zeros: not counted yet
        ("Time", facts_text(record.timings) if record.timings else None),
        ("Started", record.started_at),
        ("Finished", record.finished_at),
        ("Versions", facts_text(record.versions) if record.versions else None),
    ]
    return [(k, str(v)) for k, v in facts if v not in (None, "")]


def _pool_text(pool: Mapping[str, Any]) -> str:
    """The pool a run asked for, in words: device and why, most actors, each one's share."""
    if "device" not in pool:  # a record written before the pool chose its device
        return facts_text(pool)
    return (
        f"{pool['device']} ({pool.get('why', '')}); up to {pool.get('actors')} actor(s) of "
        f"{pool.get('num_gpus', 0):g} GPU and {pool.get('num_cpus', 0):g} CPU each"
    )


def facts_text(value: Any) -> str:
    """A config value as compact text: mappings as ``key: value; ...``, lists as JSON."""
    if isinstance(value, Mapping):
        return "; ".join(f"{k}: {facts_text(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return json.dumps(list(value))
    return "n/a" if value is None else str(value)


def section_text(section: Any, unused: Sequence[str] = ()) -> str:
    """A config section (dataclass) as :func:`facts_text`, unset (None or empty) and ``unused``
    keys left out."""
    plain = {k: v for k, v in to_plain(section).items() if k not in unused}
    return facts_text({k: v for k, v in plain.items() if v not in (None, {}, [])})


def data_uri(png: bytes) -> str:
    """``data:image/png;base64,...`` for an ``<img src>``."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


@dataclass(frozen=True)
class GalleryImage:
    """A drawn gallery figure: PNG bytes, the image's alt text and its caption."""

    kind: ClassVar[str] = "image"
    png: bytes
    alt: str
    caption: str


@dataclass(frozen=True)
class GalleryPlaceholder:
    """A gallery slot for an image that could not be drawn: why, and its caption."""

    kind: ClassVar[str] = "placeholder"
    message: str
    caption: str


@dataclass
class Gallery:
    """The most background-reliant images of one group."""

    label: str
    status: str
    items: list[GalleryImage | GalleryPlaceholder] = field(default_factory=list)


@dataclass(frozen=True)
class Chart:
    """A chart section: its heading (also the image's alt text), PNG bytes and caption."""

    heading: str
    png: bytes
    caption: str


@dataclass(frozen=True)
class Failure:
    """An image whose audit failed, and the error it failed with."""

    image_id: str
    error: str


@dataclass
class Page:
    """Everything the report page shows, as plain text and PNG bytes (nothing pre-rendered)."""

    title: str
    findings: list[tuple[str, str]]  # (status, sentence)
    notes: list[str]  # further plain sentences under the findings
    table_columns: list[str]
    table_rows: list[tuple[str, list[str]]]  # (status, cells)
    n_text_columns: int  # leading table columns that hold text: group values, then the status
    charts: list[Chart]
    galleries: list[Gallery]
    facts: list[tuple[str, str]]
    failures: list[Failure]
    files: list[str]
    evidence: list[Any] = field(default_factory=list)  # EvidenceBlock per flagged group
    strategies: list[Any] = field(default_factory=list)  # (group label, StrategyTiles)
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
    env.filters["data_uri"] = data_uri
    env.globals["status_colors"] = STATUS_COLORS
    return env


def render_page(page: Page) -> str:
    """The complete, self-contained ``index.html`` text of ``page`` (template autoescaped)."""
    text = environment().get_template(_TEMPLATE).render(page=page, max_failures=_MAX_FAILURES)
    for numeric, named in _QUOTE_ENTITIES:
        text = text.replace(numeric, named)
    return text
