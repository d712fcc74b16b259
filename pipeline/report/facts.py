"""The run facts of the report's "Run" section: the record's settings, pool, counts and times in
words (plain text; the template escapes it)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from pipeline.config.typed import to_plain

if TYPE_CHECKING:
    from pipeline.run.record import RunRecord

__all__ = ["facts_text", "run_facts", "section_text"]


def run_facts(record: RunRecord | None, params: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(label, text) facts of a run from its record; facts the record lacks are left out.

    Args:
        record: the run's ``run.json`` record, or ``None`` for a run folder without one (then
            only the audit parameters are shown).
        params: audit parameters (``group_by``, ``threshold``, ``min_images``, ``confidence``,
            ``bootstrap``, ``seed``).
    """
    audit = (
        f"group by {', '.join(params['group_by'])}; threshold {params['threshold']}; "
        f"min_images {params['min_images']}; confidence {params['confidence']}; "
        f"bootstrap {params['bootstrap']} resamples, seed {params['seed']}"
    )
    if record is None:
        return [("Audit", audit)]
    dataset, occ = record.config.dataset, record.config.occlusion
    unused = occ.unused_settings  # shown, they would only mislead
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
