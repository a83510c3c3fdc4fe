from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest_asyncio

from tests.unit.fakes import ProtocolRig

MakeRig = Callable[..., ProtocolRig]


@pytest_asyncio.fixture
async def make_rig() -> AsyncIterator[MakeRig]:
    """Build :class:`ProtocolRig` s; afterwards, fail if the loop reported any error."""
    rigs: list[ProtocolRig] = []

    def make(routes: dict[str, list[str]], **kwargs: Any) -> ProtocolRig:
        rig = ProtocolRig.create(routes, **kwargs)
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        await rig.settle()
        rig.check_loop_errors()
