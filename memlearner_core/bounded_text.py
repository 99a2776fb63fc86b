"""Bounded quotes of what a file or a request holds, for error messages.

ComfyUI stores a node's error message with the prompt's history and sends it to every connected client, so a
10 MB metadata string quoted whole is a 10 MB message to each of them. Every value a message quotes goes through
``shown``; every message of the pack is at most ``MESSAGE_LIMIT`` characters.
"""

from __future__ import annotations

QUOTE_LIMIT = 80
QUOTE_LONG = 200  # a value or path the trainer's one-line messages quote
MESSAGE_LIMIT = 1000


def shown(value, limit: int = QUOTE_LIMIT) -> str:
    """``repr(value)`` on one line, cut to ``limit`` characters with the full length said."""
    return _plain(repr(value), limit)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _plain(text: str, limit: int) -> str:
    return _cut(text.replace("\n", "\\n").replace("\r", "\\r"), limit)


def cut(text, limit: int = QUOTE_LONG) -> str:
    """``text`` (an error's message) on one line, line breaks as spaces, cut to ``limit`` characters, the cut
    said."""
    return _cut(str(text).replace("\r", " ").replace("\n", " "), limit)


def shown_path(path, limit: int = QUOTE_LONG) -> str:
    """A path for a one-line message: whole when short, else its last ``limit`` characters (the file's own name
    is at the end), line breaks escaped."""
    text = str(path).replace("\n", "\\n").replace("\r", "\\r")
    return text if len(text) <= limit else f"...{text[-limit:]}"


def listed(names, limit: int = 8, quote: bool = True) -> str:
    """The first ``limit`` of ``names`` (each ``shown``, or without quotes: names a file holds), and how many there
    are in all."""
    names = list(names)
    head = ", ".join(shown(n, 40) if quote else _plain(str(n), 40) for n in names[:limit])
    return head + (f" ... ({len(names)} in all)" if len(names) > limit else "")


def bounded(message: str, limit: int = MESSAGE_LIMIT) -> str:
    """``message`` cut to ``limit`` characters, the cut said."""
    return message if len(message) <= limit else f"{message[:limit]}... (message cut, {len(message)} characters)"
