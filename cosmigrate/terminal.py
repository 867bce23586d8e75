"""Text that reaches an operator's terminal: names from the source, shown, never obeyed.

Collections are named by the customer's applications, and MongoDB takes
escape sequences, bidi overrides and zero-width characters in a name. Printed
raw, such a name could recolour, rewrite or hide what `ctl status`, `batches
list` or a console log shows. `printable` makes those characters visible as
escapes instead.
"""

from __future__ import annotations

import unicodedata

# Unicode categories that move the cursor, recolour, reorder or hide text: control (C0/C1, incl. ESC),
# format (bidi overrides, zero-width), surrogates, private use, unassigned, line/paragraph separators.
_HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def printable(text: object) -> str:
    """`text` with every control or format character shown as an escape (`\\x1b`, `\\u202e`), never sent raw."""
    value = str(text)
    if value.isprintable():
        return value
    out = []
    for ch in value:
        if unicodedata.category(ch) in _HIDDEN_CATEGORIES:
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}")
        else:
            out.append(ch)
    return "".join(out)
