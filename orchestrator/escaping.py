"""Text from the daemon made safe to show a person (the CLI's lines, `orchestrator top`).

What a string from the daemon (a job's name, command or reason, a vendor's status, an error
message) could use to forge output: C0 controls (newline, carriage return, ESC…), DEL, C1
controls, Unicode line separators and bidirectional overrides. Human output shows them
escaped, as Python writes them (`\\n`, `\\x1b`, `\\u202e`); JSON output escapes by its own rules.
"""

from __future__ import annotations

_UNSAFE_CHARS = [
    *range(0x20),
    *range(0x7F, 0xA0),
    0x061C,
    0x200E,
    0x200F,
    0x2028,
    0x2029,
    *range(0x202A, 0x202F),
    *range(0x2066, 0x206A),
]


def _escaped(code: int) -> str:
    short = {0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r"}.get(code)
    return short or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


_ESCAPES = str.maketrans({code: _escaped(code) for code in _UNSAFE_CHARS})


def safe(text: str) -> str:
    """`text` with every character that could move the cursor or start a line escaped."""
    return text.translate(_ESCAPES)
