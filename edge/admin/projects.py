"""(routes of this area: being written)."""

from __future__ import annotations

from edge.admin.api import Api

api = Api()
