"""Zeitwork edge: the reverse proxy data plane and (later) the operator process."""

__version__ = "0.1.0"
