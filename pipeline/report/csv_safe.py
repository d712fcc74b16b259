"""CSV text a spreadsheet opens as data: every CSV file the package writes (the report's
``summary.csv``, ``flags.csv``, ``curation.csv`` and ``export --to csv``) goes through
:func:`csv_text`.

A spreadsheet runs a cell that starts with ``=``, ``+``, ``-``, ``@``, tab or carriage return as a
formula (OWASP, "CSV Injection"); ids, group values, labels and error messages come from the data,
so such text cells get a leading ``'``. Numbers are left as they are.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

__all__ = ["csv_text", "escape_formula"]

_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def escape_formula(value: Any) -> Any:
    """A CSV cell a spreadsheet shows as text: a string starting ``=``, ``+``, ``-``, ``@``, tab or
    carriage return gets a leading ``'``; anything else (numbers included) is returned as is.

    Example:
        >>> escape_formula("=HYPERLINK(1)"), escape_formula(-0.5), escape_formula("kitchen")
        ("'=HYPERLINK(1)", -0.5, 'kitchen')
    """
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def csv_text(df: pd.DataFrame) -> str:
    """``df`` as CSV text (no index), its header and text cells passed through
    :func:`escape_formula`; numeric and boolean columns are written as they are. Rows end with
    CRLF (RFC 4180), which also makes the writer quote a cell holding a lone carriage return
    (with ``\\n`` it would not, and a reader would split the row there)."""
    safe = df.rename(columns=escape_formula)
    for k in range(safe.shape[1]):
        col = safe.iloc[:, k]
        if not (pd.api.types.is_numeric_dtype(col) or pd.api.types.is_bool_dtype(col)):
            safe.isetitem(k, col.astype(object).map(escape_formula))
    return safe.to_csv(index=False, lineterminator="\r\n")
