"""The parameters of an aggregation: explicit overrides, else the run's ``audit`` config."""

from __future__ import annotations

from typing import Any

from pipeline.config import AuditSettings
from pipeline.run.record import RunRecord

__all__ = ["audit_params"]


def audit_params(record: RunRecord | None, **overrides: Any) -> dict[str, Any]:
    """Audit parameters: explicit overrides, else the run's ``audit`` config, else its defaults.

    Args:
        record: the run record, or None (then :class:`AuditSettings` defaults apply).
        overrides: ``group_by``, ``threshold``, ``min_images``, ``confidence``, ``seed``,
            ``n_boot``, ``max_error_share``, ``fdr`` (``"off"``: the per-group interval rule);
            ``None`` means "not given".

    Returns:
        A dict with all eight keys; ``group_by`` is a tuple of column names.

    Raises:
        ValueError: no group columns anywhere, or a confidence outside (0, 1).
    """
    settings = AuditSettings() if record is None else record.config.audit
    found = {
        "group_by": None if record is None else record.config.dataset.group_by,
        "threshold": settings.threshold,
        "min_images": settings.min_images,
        "confidence": settings.confidence,
        "seed": settings.seed,
        "n_boot": settings.bootstrap,
        "max_error_share": settings.max_error_share,
        "fdr": settings.fdr,
    }
    params: dict[str, Any] = {
        k: v if (v := overrides.get(k)) is not None else found[k] for k in found
    }
    if params["fdr"] == "off":  # the per-group interval rule, asked for explicitly
        params["fdr"] = None
    if params["fdr"] is not None:
        params["fdr"] = float(params["fdr"])
        if not 0 < params["fdr"] < 1:
            raise ValueError(f"fdr must lie strictly between 0 and 1, got {params['fdr']!r}")
    if params["group_by"] is None:
        raise ValueError("no group columns: pass group_by=[...] or set dataset.group_by")
    if isinstance(params["group_by"], str):
        params["group_by"] = [params["group_by"]]
    params["group_by"] = tuple(params["group_by"])
    numbers = ("threshold", float), ("confidence", float), ("min_images", int)
    for name, kind in (*numbers, ("max_error_share", float)):
        params[name] = kind(params[name])
    params["seed"], params["n_boot"] = int(params["seed"]), max(1, int(params["n_boot"]))
    if not 0 <= params["max_error_share"] <= 1:
        raise ValueError(f"max_error_share must lie in [0, 1], got {params['max_error_share']!r}")
    if not 0 < params["confidence"] < 1:
        raise ValueError(f"confidence must lie in (0, 1), got {params['confidence']!r}")
    return params
