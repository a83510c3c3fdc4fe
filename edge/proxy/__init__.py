"""The HTTP/1.1 proxy hot path: asyncio protocols driving httptools parsers on both sides.

Everything here runs per request or per byte, so it follows the budget in DESIGN.md: no
streams, no per-request tasks, no regexes, one dict lookup per route, bytes joined once.
"""
