"""Benchmarks of the Zeitwork edge, run as modules: ``python -m bench`` for the proxy suite
(:mod:`bench.proxy`), ``python -m bench.propagation`` and the others for the rest."""
