"""Frozen graph model: Graph -> Env -> Overlay -> Endpoint.

Built only by resolver.validate.parse_graph, which checks every rule first; nothing here
mutates after construction, so a snapshot can be shared by every request without locks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

EMPTY: MappingProxyType = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Endpoint:
    scheme: str  # "http" | "https"
    host: str
    port: int
    weight: int = 1
    attrs: MappingProxyType = field(default_factory=lambda: EMPTY)  # region, cluster, jurisdiction, ... (room for relocation)
    # "scheme://host:port", computed once: the upstream pool is keyed by it on every request
    address: str = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "address", f"{self.scheme}://{self.host}:{self.port}")

    def __str__(self) -> str:
        return self.address

    def to_doc(self) -> Any:
        if self.weight == 1 and not self.attrs:
            return self.address
        doc: dict[str, Any] = {"address": self.address}
        if self.weight != 1:
            doc["weight"] = self.weight
        doc.update(self.attrs)
        return doc


@dataclass(frozen=True, slots=True)
class Overlay:
    service: str
    endpoints: tuple[Endpoint, ...]

    def to_doc(self) -> dict:
        return {"endpoints": [e.to_doc() for e in self.endpoints]}


@dataclass(frozen=True, slots=True)
class Env:
    name: str
    parent: str | None
    services: MappingProxyType  # service -> Overlay
    config: MappingProxyType  # key -> value
    private: bool = False

    def to_doc(self) -> dict:
        doc: dict[str, Any] = {}
        if self.parent is not None:
            doc["parent"] = self.parent
        if self.private:
            doc["private"] = True
        doc["services"] = {s: o.to_doc() for s, o in self.services.items()}
        if self.config:
            doc["config"] = dict(self.config)
        return doc


@dataclass(frozen=True, slots=True)
class Graph:
    baseline: str
    shared: MappingProxyType  # service -> Overlay
    envs: MappingProxyType  # name -> Env
    version: int = 1
    epoch: str = ""  # identifies one store lineage; a lower version in the same epoch is a regression
    services: frozenset = field(default=frozenset())  # every service name the graph knows
    private_envs: frozenset = field(default=frozenset())  # envs that always need a signed context

    def to_doc(self) -> dict:
        """The canonical document (graph file format); parse_graph(to_doc()) == self."""
        doc: dict[str, Any] = {"version": self.version, "baseline": self.baseline}
        if self.epoch:
            doc["epoch"] = self.epoch
        doc["shared"] = {s: o.to_doc() for s, o in self.shared.items()}
        doc["envs"] = {n: e.to_doc() for n, e in self.envs.items()}
        return doc

    def __repr__(self) -> str:
        return (
            f"<Graph v{self.version} baseline={self.baseline} envs={len(self.envs)} "
            f"services={len(self.services)} shared={len(self.shared)}>"
        )
