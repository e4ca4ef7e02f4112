"""Why the daemon is degraded, if it is: the store's problems and the backends'.

A degraded daemon still serves. The store reports its own (`Store.problems`); a backend whose
credentials AWS refuses is reported here by the dispatcher (on launches) and the poller (on
describes) until a call of that kind succeeds again. `ping`, `/metrics`
(`orchestrator_degraded{reason}`) and systemd's STATUS line read `problems()`.
"""

from __future__ import annotations

from orchestrator.store import Problem, Store


class Health:
    def __init__(self, store: Store) -> None:
        self._store = store
        self._backends: dict[tuple[str, str], str] = {}  # (backend, "launch"|"describe") → why
        self._events: dict[str, str] = {}  # backend → why its events stopped (polled meanwhile)

    def backend_refused(self, backend: str, kind: str, why: str) -> bool:
        """The backend's credentials were refused on calls of `kind`; True if that is news."""
        news = (backend, kind) not in self._backends
        self._backends[(backend, kind)] = why
        return news

    def backend_ok(self, backend: str, kind: str) -> bool:
        """A call of `kind` succeeded; True if the backend was degraded for it until now."""
        return self._backends.pop((backend, kind), None) is not None

    def events_stopped(self, backend: str, why: str) -> None:
        """The backend's events stopped flowing: it is tracked by full polling meanwhile."""
        self._events[backend] = why

    def events_flowing(self, backend: str) -> None:
        self._events.pop(backend, None)

    def problems(self) -> list[Problem]:
        problems = list(self._store.problems())
        problems += [
            Problem("backend_credentials", f"{backend}: {why}")
            for (backend, _), why in sorted(self._backends.items())
        ]
        problems += [
            Problem("events_stopped", f"{backend}: tracked by polling until events flow: {why}")
            for backend, why in sorted(self._events.items())
        ]
        return problems
