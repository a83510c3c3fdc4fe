"""Placement of instances on nodes and the deployment lifecycle (embedded in the edge).

- ``placement``: the pure function from (nodes, demand) to assignments and per-region
  shortfalls; spreads replicas, fills the least-loaded node, never overcommits.

The lifecycle arrives with its own issue. Nothing here does I/O, and the package imports
neither ``edge`` nor ``agent``.
"""
