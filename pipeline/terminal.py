"""Text from the data, made safe to print on a terminal.

Image ids, group values, labels, paths and the messages that quote them come from datasets
nobody here wrote. Printed raw, an ESC or BEL in them is a terminal command: ``\\x1b]0;...\\x07``
sets the window title, ``\\x1b[2J`` clears the screen, a bidi override reorders what is shown.
Every line the CLI prints from the data goes through :func:`printable`, which shows such
characters as Python escapes (``\\x1b``, ``\\x07``, ``\\u202e``) and keeps printable Unicode.
"""

from __future__ import annotations

import unicodedata

__all__ = ["printable"]


def printable(value: object, *, lines: bool = False) -> str:
    """``str(value)`` with every character a terminal would act on shown as its escape.

    Control characters (C0, DEL, C1), format characters (bidi overrides, zero-width ones), line
    and paragraph separators and lone surrogates become ``\\xNN``, ``\\uNNNN`` or ``\\n``-style
    escapes; letters, digits, punctuation, symbols and spaces of any script are kept.

    Args:
        value: anything; its ``str`` is escaped.
        lines: keep ``\\n`` (text of several lines built by the caller); else it is escaped too,
            so that one record stays on one line.

    Example:
        >>> printable("cat\\x1b]0;pwned\\x07 ü")
        'cat\\\\x1b]0;pwned\\\\x07 ü'
    """
    text = str(value)
    if text.isprintable():  # the common case: nothing to escape
        return text
    return "".join(ch if _kept(ch, lines) else _escape(ch) for ch in text)


def _kept(ch: str, lines: bool) -> bool:
    # isprintable() is False for every space but " " (no-break, ideographic): those are kept
    return ch.isprintable() or unicodedata.category(ch) == "Zs" or (lines and ch == "\n")


def _escape(ch: str) -> str:
    code = ord(ch)
    if ch in "\n\r\t":
        return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}[ch]
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
