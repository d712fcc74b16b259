"""The verdict line shared by the scaling benchmarks: does a peak stay flat as the input grows."""

from __future__ import annotations

from typing import Any

FLAT = 1.2  # a peak within 20% of the smaller run's counts as flat


def flat_line(rows: list[dict[str, Any]], size: str, peak: str, what: str) -> str:
    """``what`` first -> last row's ``size``: their ``peak`` MB, the ratio, and whether it is
    flat (within :data:`FLAT`)."""
    a, b = rows[0], rows[-1]
    ratio = b[peak] / a[peak]
    return (
        f"{what} {a[size]} -> {b[size]}: {a[peak]} -> {b[peak]} MB "
        f"(x{ratio:.2f}; flat within 20%: {'yes' if ratio <= FLAT else 'NO'})"
    )
