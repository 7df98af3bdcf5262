"""The request path's counter cells (compiled with it: see setup.py's HOT_PATH): one per
(service, kind), cached on the Route, bumped once per request. proxy/metrics.py turns them
into Prometheus metric families only when /metrics is scraped."""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from resolver.snapshot import Route

# tuple[float, ...]: a literal tuple would be compiled to a C struct, boxed again when read
BUCKETS: Final[tuple[float, ...]] = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_CLASSES: Final[tuple[str, ...]] = ("1xx", "2xx", "3xx", "4xx", "5xx")
# status -> index into _CLASSES (outside 100-599 counts as 5xx): one look-up per request.
# Statuses have three digits (llhttp refuses a longer one; stax's own are 4xx/5xx).
_CLASS_OF: Final = tuple(min(max(s // 100 - 1, 4 if s < 100 else 0), 4) for s in range(1000))


class _Cell:
    __slots__ = ("service", "kind", "codes", "buckets", "total_s")

    def __init__(self, service: str, kind: str) -> None:
        self.service, self.kind = service, kind
        self.codes = [0, 0, 0, 0, 0]
        self.buckets = [0] * (len(BUCKETS) + 1)
        self.total_s = 0.0


class Stats:
    def __init__(self, mode: str) -> None:
        self.mode = mode
        self._cells: dict[tuple[str, str], _Cell] = {}
        self.local_errors: dict[str, int] = {}  # stax-generated error responses by code

    def __repr__(self) -> str:
        total = sum(sum(c.codes) for c in self._cells.values())
        return f"<Stats mode={self.mode} cells={len(self._cells)} requests={total}>"

    def _cell(self, service: str, kind: str) -> _Cell:
        key = (service, kind)
        cell = self._cells.get(key)
        if cell is None:
            cell = self._cells[key] = _Cell(service, kind)
        return cell

    def observe(self, route: Route | None, status: int, duration_s: float) -> None:
        cell: _Cell
        if route is None:
            cell = self._cell("", "")
        else:
            cached = route.stats  # Any on the Route (resolver/ does not import proxy/)
            if cached is None:
                cell = route.stats = self._cell(route.service, route.kind)
            else:
                cell = cached  # typed: compiled code reaches its fields directly
            # the first bucket whose bound is >= duration_s (bisect_left): a compiled loop
            # ends in one or two steps for the sub-millisecond answers nearly all requests get
            i = 0
            while i < len(BUCKETS) and BUCKETS[i] < duration_s:
                i += 1
            cell.buckets[i] += 1
            cell.total_s += duration_s
        cell.codes[_CLASS_OF[status]] += 1

    def error(self, code: str) -> None:
        self.local_errors[code] = self.local_errors.get(code, 0) + 1
