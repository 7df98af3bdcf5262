"""Endpoint choice: weighted round-robin over a provider's endpoints, skipping ejected ones
(passive outlier ejection) and, on a retry, the endpoints already tried."""

from __future__ import annotations

from resolver.errors import NoHealthyEndpoint

from .deadlines import monotonic


class _State:
    __slots__ = ("failures", "ejections", "until", "service")

    def __init__(self) -> None:
        self.failures = 0
        self.ejections = 0
        self.until = 0.0
        self.service = ""


class EndpointHealth:
    def __init__(self, *, consecutive_failures: int = 5, base_ejection_s: float = 30.0,
                 max_ejected_ratio: float = 0.5) -> None:
        self.consecutive = consecutive_failures
        self.base = base_ejection_s
        self.max_ratio = max_ejected_ratio
        self.state: dict[str, _State] = {}  # endpoints that have failed: address -> state
        self._ejected: set[str] = set()

    def __repr__(self) -> str:
        return f"<EndpointHealth tracked={len(self.state)} ejected={len(self._ejected)}>"

    def pick(self, route, tried: list | None):
        picks = route.picks
        n = len(picks)
        i = route.rr
        route.rr = i + 1
        if not self._ejected and not tried:  # the common case: one dict-free step
            return picks[i % n]
        now = monotonic()
        fallback = None
        for k in range(n):
            ep = picks[(i + k) % n]
            if ep.address in self._ejected and not self._readmit(ep.address, now):
                continue
            if tried and ep in tried:
                fallback = fallback or ep
                continue
            return ep
        if fallback is not None:
            return fallback
        raise NoHealthyEndpoint(f"every endpoint of {route.service} ({route.kind}:{route.provider_env}) is ejected")

    def _readmit(self, address: str, now: float) -> bool:
        st = self.state[address]
        if st.until <= now:
            self._ejected.discard(address)
            st.failures = 0
            return True
        return False

    def success(self, ep) -> None:
        """Callers skip this while `state` is empty (no endpoint has ever failed)."""
        st = self.state.get(ep.address)
        if st is not None:
            st.failures = 0

    def failure(self, ep, route) -> None:
        if ep is None:
            return
        st = self.state.get(ep.address)
        if st is None:
            st = self.state[ep.address] = _State()
        st.failures += 1
        if st.failures < self.consecutive or ep.address in self._ejected:
            return
        endpoints = route.endpoints
        ejected_here = sum(1 for e in endpoints if e.address in self._ejected)
        if ejected_here + 1 > int(len(endpoints) * self.max_ratio) or ejected_here + 1 >= len(endpoints):
            return  # never more than half a provider, never its last endpoint
        st.ejections += 1
        st.until = monotonic() + self.base * st.ejections
        st.service = route.service
        st.failures = 0
        self._ejected.add(ep.address)

    def ejected_by_service(self) -> dict[str, int]:
        now = monotonic()
        out: dict[str, int] = {}
        for address in list(self._ejected):
            st = self.state[address]
            if st.until <= now:
                continue
            out[st.service] = out.get(st.service, 0) + 1
        return out


class BudgetCell:
    """One service's retry-budget counts: the current window and the one before. Cached on
    the Route (like its metrics cell), so counting a request is one integer bump."""

    __slots__ = ("start", "requests", "retries", "prev_requests", "prev_retries")

    def __init__(self, start: float) -> None:
        self.start = start
        self.requests = self.retries = self.prev_requests = self.prev_retries = 0


class RetryBudget:
    """Retries may add at most `ratio` extra requests per service over a sliding `window`,
    so retries cannot amplify an outage. A floor lets a quiet service retry at all."""

    def __init__(self, *, ratio: float = 0.2, window_s: float = 10.0, min_retries: int = 10) -> None:
        self.ratio = ratio
        self.window = window_s
        self.min_retries = min_retries
        self._cells: dict[str, BudgetCell] = {}
        self.exhausted_total = 0

    def cell(self, service: str) -> BudgetCell:
        cell = self._cells.get(service)
        if cell is None:
            cell = self._cells[service] = BudgetCell(monotonic())
        return cell

    def rotate(self, now: float) -> None:
        """Called by the runtime's 1 s sweeper, so counting a request needs no clock read."""
        for cell in self._cells.values():
            if now - cell.start >= self.window:
                fresh = now - cell.start < 2 * self.window
                cell.prev_requests = cell.requests if fresh else 0
                cell.prev_retries = cell.retries if fresh else 0
                cell.start, cell.requests, cell.retries = now, 0, 0

    def allow_retry(self, service: str) -> bool:
        now = monotonic()
        cell = self.cell(service)
        weight = max(0.0, 1 - (now - cell.start) / self.window)  # fraction of the previous bucket still in the window
        requests = cell.requests + cell.prev_requests * weight
        retries = cell.retries + cell.prev_retries * weight
        if retries + 1 > max(self.min_retries, requests * self.ratio):
            self.exhausted_total += 1
            return False
        cell.retries += 1
        return True
