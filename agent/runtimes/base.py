"""The interface between the agent and a runtime driver.

The agent owns the decisions (what to run, health, reports); a driver only does what it is
told for one instance at a time: ``prepare`` (resources: network, limits, directories),
``start`` (launch; the address the instance will listen on), ``status``, ``stop`` (SIGTERM,
then SIGKILL after the grace period, and release every resource ``prepare`` took) and
``address``. ``sweep`` runs once when the agent starts: it stops whatever a previous agent run
left behind, so a restarted agent never leaves orphans (it then starts its assignments
again). The instance's output reaches the agent line by line through the ``on_output``
callback given to the driver.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

Stream = Literal["stdout", "stderr"]
# A line of an instance's output: (instance id, stream, line without its newline).
OutputCallback = Callable[[str, Stream, str], None]


class RuntimeFailure(Exception):
    """A driver could not do what it was asked (the message says what and why)."""


@dataclass(frozen=True, slots=True)
class InstanceSpec:
    """What an instance runs with (from the agent's assignment)."""

    instance_id: str
    deployment_id: str
    deployment_name: str
    command: str | None
    image: str | None
    app_port: int
    vcpu: float
    memory_mb: int
    env: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int


InstanceState = Literal["running", "exited", "missing"]


@dataclass(frozen=True, slots=True)
class InstanceStatus:
    state: InstanceState
    # Set once the process exited.
    exit_code: int | None = None


class Runtime(Protocol):
    name: str

    async def prepare(self, spec: InstanceSpec) -> None: ...

    async def start(self, spec: InstanceSpec) -> Address: ...

    async def status(self, instance_id: str) -> InstanceStatus: ...

    async def stop(self, instance_id: str, grace: float) -> None: ...

    def address(self, instance_id: str) -> Address | None: ...

    async def sweep(self) -> list[str]: ...
