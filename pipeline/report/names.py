"""How the pages name a group: its values, the class name of a ``label`` value, and the file
name of its page.

A run grouped by ``label`` stores class indices ("277"); ``run.json`` keeps the names the source
knew (``class_names``: a ``ClassLabel``, COCO categories, class folders), so the pages say
"Label red fox (277)". Other group columns already hold names.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from pipeline.report.assets import file_key
from pipeline.schema import LABEL_GROUP

__all__ = ["GROUP_DIR", "GroupKey", "GroupNames", "group_key", "group_label", "missing"]

GROUP_DIR = "groups"  # one page per group, relative to the report folder
GroupKey = tuple[str | None, ...]


def missing(value: Any) -> bool:
    """Whether a group value is missing: None, NaN or pandas' NA."""
    return value is None or bool(pd.isna(value))


def group_key(values: Mapping[str, Any], group_by: Sequence[str]) -> GroupKey:
    """A group's values as text (``None`` where missing), in ``group_by`` order."""
    return tuple(None if missing(values[c]) else str(values[c]) for c in group_by)


def group_label(values: Mapping[str, Any], group_by: Sequence[str]) -> str:
    """``Room kitchen`` or ``Room kitchen, class chair``; a missing value reads ``(missing)``."""
    parts = []
    for k, col in enumerate(group_by):
        name = col.replace("_", " ")
        value = values.get(col)
        shown = "(missing)" if missing(value) else value
        parts.append(f"{name.capitalize() if k == 0 else name} {shown}")
    return ", ".join(parts) if parts else "All images"


@dataclass(frozen=True)
class GroupNames:
    """Names of a run's groups.

    Attributes:
        group_by: the group columns.
        classes: stored ``label`` text -> class name (``run.json`` ``class_names``); empty
            when the source knew none or the run is not grouped by ``label``.
    """

    group_by: tuple[str, ...]
    classes: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def of(cls, group_by: Sequence[str], record: Any) -> GroupNames:
        """The names of a run from its record (None: no record, no class names)."""
        names = dict(getattr(record, "class_names", None) or {})
        return cls(tuple(group_by), names if LABEL_GROUP in group_by else {})

    def class_name(self, values: Mapping[str, Any]) -> str | None:
        """The class name of the group's ``label`` value, when known."""
        if not self.classes:
            return None
        value = values.get(LABEL_GROUP)
        return None if missing(value) else self.classes.get(str(value))

    def label(self, values: Mapping[str, Any]) -> str:
        """The group in words: ``Label red fox (277)``, ``Room kitchen``."""
        name = self.class_name(values)
        if name is None:
            return group_label(values, self.group_by)
        shown = {**{c: values.get(c) for c in self.group_by}}
        shown[LABEL_GROUP] = f"{name} ({values[LABEL_GROUP]})"
        return group_label(shown, self.group_by)

    def page(self, values: Mapping[str, Any]) -> str:
        """The group page's file, relative to the report folder: ``groups/<words>-<hash>.html``.

        The words make the name readable, the hash of the exact values makes it unique and
        stable from one report to the next.
        """
        key = group_key(values, self.group_by)
        words = re.sub(r"[^a-z0-9]+", "-", self.label(values).lower()).strip("-")[:48]
        digest = file_key(*("\x00" if v is None else v for v in key))[:10]
        return f"{GROUP_DIR}/{words or 'group'}-{digest}.html"
