"""The node agent: runs a worker node's instances and reports on them to the admin API.

Nothing here yet: the agent arrives with its own issue. It speaks HTTP to the admin API and
imports neither ``edge`` nor ``scheduler``.
"""
