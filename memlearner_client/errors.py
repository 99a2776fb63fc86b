"""The client's one error type."""

from __future__ import annotations


class Fail(Exception):
    """A one-line (or listed) message for the user, and the exit code."""

    def __init__(self, message: str, code: int = 1):
        super().__init__(message)
        self.code = code
