"""The parameters of an aggregation: explicit overrides, else the run's ``audit`` config."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from pipeline.config import AuditSettings, ConfigError
from pipeline.run.record import RunRecord

__all__ = ["audit_params"]


# aggregate's keyword (and CLI flag) -> the audit setting it overrides
_SETTINGS = {
    "threshold": "threshold",
    "min_images": "min_images",
    "confidence": "confidence",
    "seed": "seed",
    "bootstrap": "bootstrap",
    "max_error_share": "max_error_share",
    "fdr": "fdr",
}


def audit_params(record: RunRecord | None, **overrides: Any) -> dict[str, Any]:
    """Audit parameters: explicit overrides, else the run's ``audit`` config, else its defaults.

    Overrides go through the validation of :class:`~pipeline.config.AuditSettings`, the one
    place each of these settings is checked, so ``--threshold 0`` or ``nan`` is refused like
    ``audit.threshold: 0`` in a config.

    Args:
        record: the run record, or None (then :class:`AuditSettings` defaults apply).
        overrides: ``group_by``, ``threshold``, ``min_images``, ``confidence``, ``seed``,
            ``bootstrap``, ``max_error_share``, ``fdr`` (``"off"``: the per-group interval rule);
            ``None`` means "not given".

    Returns:
        A dict with all eight keys; ``group_by`` is a tuple of column names.

    Raises:
        ConfigError: an override out of range, naming its ``audit.`` key.
        ValueError: no group columns anywhere.
    """
    settings = AuditSettings() if record is None else record.config.audit
    given = {_SETTINGS[k]: v for k, v in overrides.items() if k in _SETTINGS and v is not None}
    fdr = given.get("fdr")
    if isinstance(fdr, str):  # from the command line: a rate, or off
        try:
            given["fdr"] = None if fdr == "off" else float(fdr)
        except ValueError:
            msg = f"must be a rate in (0, 1) or 'off', got {fdr!r}"
            raise ConfigError("audit.fdr", msg) from None
    try:
        settings = replace(settings, **given)
    except ConfigError as e:
        raise ConfigError(f"audit.{e.key}", e.message) from None
    except (TypeError, ValueError) as e:  # a value of the wrong type, e.g. fdr="sometimes"
        raise ConfigError("audit", str(e)) from None
    group_by = overrides.get("group_by")
    if group_by is None and record is not None:
        group_by = record.config.dataset.group_by
    if group_by is None:
        raise ValueError("no group columns: pass group_by=[...] or set dataset.group_by")
    return {
        "group_by": (group_by,) if isinstance(group_by, str) else tuple(group_by),
        "threshold": float(settings.threshold),
        "min_images": int(settings.min_images),
        "confidence": float(settings.confidence),
        "seed": int(settings.seed),
        "bootstrap": int(settings.bootstrap),
        "max_error_share": float(settings.max_error_share),
        "fdr": None if settings.fdr is None else float(settings.fdr),
    }
