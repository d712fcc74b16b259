"""Sortable, filterable tables: the group table of the report, and those of the compare and
history pages.

A table is complete HTML: every row is there and readable without JavaScript. Each cell may
carry a sort value (``data-v``: a number, or text); ``report.js`` (a static file beside the page,
holding no data) sorts the rows on a header click and hides the rows a filter rules out. The
filter controls are hidden until that script shows them, so a page without it shows no dead
controls.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

__all__ = [
    "STATUS_RANK",
    "Cell",
    "Column",
    "Filter",
    "Row",
    "Table",
    "group_table",
    "num",
]

#: Sort order of the group statuses: the ones to act on first.
STATUS_RANK = {"flagged": 0, "inconclusive": 1, "unreliable": 2, "too-few": 3, "ok": 4}


@dataclass(frozen=True)
class Column:
    """A header: its title, the key filters name it by, and ``num``/``text``/``none`` sorting."""

    title: str
    key: str
    sort: str = "num"
    text: bool = False  # left-aligned text (group values, names)
    wrap: bool = False  # long text that may wrap (reasons)


@dataclass(frozen=True)
class Cell:
    """A cell: what it shows, its sort value (``None``: sort by its text), a link, and a status
    drawn as a coloured badge before the text (the badge alone when it is the text)."""

    text: str
    sort: str | None = None
    href: str | None = None
    badge: str = ""


@dataclass(frozen=True)
class Row:
    """A row: its cells, its status (the row's class) and ``data-*`` flags (``yes``/``no``)."""

    cells: list[Cell]
    status: str = ""
    flags: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Filter:
    """A filter control: ``text`` (any cell contains it), ``choice`` (a column equals one of
    ``choices``), ``max``/``min`` (a column's number at most/at least), ``flag`` (the row's
    ``data-<key>`` is ``yes``)."""

    kind: str
    key: str
    label: str
    choices: tuple[str, ...] = ()


@dataclass(frozen=True)
class Table:
    """A table with its element id, columns, rows and filters."""

    id: str
    columns: list[Column]
    rows: list[Row]
    filters: list[Filter] = field(default_factory=list)


def _value(value: Any) -> str:
    return "(missing)" if value is None or bool(pd.isna(value)) else str(value)


def num(x: Any) -> str:
    """A number's sort value: ``repr`` of a finite float, ``""`` (sorted last) otherwise."""
    try:
        value = float(x)
    except (TypeError, ValueError):
        return ""
    return repr(value) if math.isfinite(value) else ("1e308" if value > 0 else "")


def group_table(
    summary: Sequence[Mapping[str, Any]],
    group_by: Sequence[str],
    class_names: Sequence[str | None],
    pages: Sequence[str],
    fmt: Any,
) -> Table:
    """The report's table of every group, one row per summary row, in summary order.

    Args:
        summary: the per-group summary's rows.
        group_by: its group columns.
        class_names: each group's class name, or None (a ``class`` column when any is known).
        pages: each group's page, relative to the report folder.
        fmt: the number formatter of the page (``pipeline.report.html.fmt``).
    """
    named = any(n is not None for n in class_names)
    shown = list(group_by) or ["group"]  # one group of every image: a column to link it from
    columns = [Column(g, f"group:{g}", "text", text=True) for g in shown]
    if named:
        columns.append(Column("class", "class", "text", text=True))
    columns += [
        Column("status", "status", text=True),
        Column("n", "n"),
        Column("valid", "valid"),
        Column("errors", "errors"),
        Column("undefined", "undefined"),
        Column("gmean ratio", "ratio"),
        Column("interval", "interval", "none"),
        Column("q-value", "q"),
        Column("bg_reliance", "bg_reliance"),
        Column("swap flips", "swap_flip"),
        Column("median", "median"),
        Column("share < 1", "share_below_1"),
        Column("mean fg_share", "fg_share"),
        Column("mean fg_area", "fg_area"),
    ]
    rows = []
    for k, s in enumerate(summary):
        cells = []
        for j, g in enumerate(shown):
            value = "All images" if not group_by else _value(s[g])
            cells.append(Cell(value, value.lower(), href=pages[k] if j == 0 else None))
        if named:
            name = class_names[k] or ""
            cells.append(Cell(name, name.lower(), href=pages[k] if name else None))
        status = str(s["status"])
        cells.append(Cell(status, str(STATUS_RANK.get(status, 9)), badge=status))
        cells += [Cell(str(s[c]), num(s[c])) for c in ("n", "n_valid", "n_error", "n_nan")]
        cells.append(Cell(fmt(s["gmean_ratio"]), num(s["gmean_ratio"])))
        cells.append(Cell(f"{fmt(s['ci_low'])}-{fmt(s['ci_high'])}"))
        cells.append(Cell(fmt(s.get("q_value"), 3), num(s.get("q_value"))))
        for c in ("bg_reliance", "swap_flip_rate", "median_ratio", "share_below_1"):
            cells.append(Cell(fmt(s.get(c)), num(s.get(c))))
        for c in ("mean_fg_share", "mean_fg_area"):
            cells.append(Cell(fmt(s[c]), num(s[c])))
        rows.append(Row(cells, status))
    present = {str(s["status"]) for s in summary}
    statuses = tuple(s for s in STATUS_RANK if s in present)
    filters = [
        Filter("text", "", "name contains"),
        Filter("choice", "status", "status", statuses),
        Filter("max", "ratio", "gmean ratio ≤"),
        Filter("max", "q", "q-value ≤"),
        Filter("min", "bg_reliance", "bg_reliance ≥"),
        Filter("min", "n", "n ≥"),
    ]
    return Table("group-table", columns, rows, filters)
