"""Placement of instances on nodes and the deployment lifecycle (embedded in the edge).

Nothing here yet: the scheduler arrives with its own issue. It will import neither ``edge``
nor ``agent``.
"""
