"""Placement of instances on nodes and the deployment lifecycle (embedded in the edge).

- ``placement``: the pure function from (nodes, demand) to assignments and per-region
  shortfalls; spreads replicas, fills the least-loaded node, never overcommits.
- ``lifecycle``: the deployment statuses and their transition table.
- ``reconciler``: one scheduler pass as a pure function from a snapshot of the platform to a
  plan of changes (placements, stops, status transitions, the current deployment's flip, nodes
  down or drained).

Nothing here does I/O, and the package imports neither ``edge`` nor ``agent``: the edge's
leader loads the snapshot and applies the plan (``edge.scheduling``).
"""
