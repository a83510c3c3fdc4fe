"""Benchmarks of the Zeitwork edge; run them as modules, e.g. ``python -m bench.proxy``."""
