"""Text from outside (file names, error messages, model metadata) made safe to show a person.

A name is the attacker's to choose: an escape sequence in it can retitle or clear a terminal, and a
bidirectional control (U+202E) makes ``cat_<U+202E>fdp.png`` read as ``cat_gnp.pdf``. ``visible`` writes every
such character as a visible escape (``\\u202e``, ``\\x1b``), so what is shown is what is there. The HTML report
shows the same escapes (its template engine escapes the rest). Plain names are returned unchanged.
"""

from __future__ import annotations

import re

# C0 controls (tab and newline included: one row, one line), DEL and C1 controls, the bidirectional
# embeddings, overrides and isolates, the implicit marks, and the line and paragraph separators
_INVISIBLE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff\ud800-\udfff]")


def _escape(m: re.Match) -> str:
    c = ord(m.group())
    if 0xDC80 <= c <= 0xDCFF:  # a byte that is not UTF-8, as os.fsdecode keeps it
        return f"\\x{c - 0xDC00:02x}"
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def visible(s: object) -> str:
    """``str(s)`` with control, bidirectional and invisible characters written as escapes."""
    s = str(s)
    return _INVISIBLE.sub(_escape, s) if _INVISIBLE.search(s) else s


def first_line(e: BaseException, limit: int = 200) -> str:
    """An exception's message for one line: its first line, at most ``limit`` characters (its type's name where
    it has no message). Third-party errors (pyarrow, Ray) can run to pages."""
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:limit]
