"""Errors of the proxy benchmark: each deserves one clear message rather than a traceback."""

from __future__ import annotations


class BenchError(Exception):
    """A failure that deserves one clear message rather than a traceback."""


class ToolMissingError(BenchError):
    """An external tool the chosen scenarios need (nginx, wrk, haproxy ...) is not installed."""


class WrkParseError(BenchError):
    """wrk printed something this benchmark does not understand."""
