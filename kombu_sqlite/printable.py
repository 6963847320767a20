"""Producer-controlled text made safe to show: queue names, headers, reasons.

Anyone who can publish chooses these strings, so a terminal or a metrics
scraper must never interpret them.  Control and format characters (ESC and OSC
sequences, BEL, newlines, bidirectional overrides) become visible escapes such
as ``\\x1b`` and ``\\u202e``; everything printable is kept as it is.  Rich markup
is a separate concern: the command hands rich ``Text`` objects, never markup.
"""
from __future__ import annotations


def printable(value) -> str:
    """``value`` as text with every non-printable character escaped."""
    text = str(value)
    if text.isprintable():
        return text
    return ''.join(ch if ch.isprintable() else ch.encode('unicode_escape').decode('ascii')
                   for ch in text)
