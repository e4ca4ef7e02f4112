"""One backend's lane: the jobs it is to launch, in order, and the jobs it has in flight.

A job is in at most one of: `ready` (to launch now), waiting on a timer (a start retry), or in
flight (being launched, settled, or submitted and not yet terminal). `queued` holds the ids of
jobs ready or waiting for a retry. Timers also carry queue deadlines (`expire`) and looks again at
attempts whose outcome is unknown (`settle`). `due(now)` hands out what is due: jobs to launch, as
many as the cap on jobs in flight allows, attempts to settle, jobs to expire.

Whatever frees a slot or adds work calls `wake` (the shell's event): the lane's loop never sleeps
while something is due.

Which ready job goes first: the one with the lowest key, then the one enqueued first. The
dispatcher gives each job the key `queued_at - priority * aging_s`: a job of priority p is
launched before the jobs of priority 0 that came up to p * aging_s before it and after those
that came earlier — so priority orders the queue, and waiting long enough beats any priority
(no job starves). With every key equal, the lane is first come, first served.

Devices (the local backend's GPUs, `local.gpus`): a lane given some hands them out. A job that
needs `gpus` of them is launched only when that many are free — the jobs behind it that fit go
first meanwhile — and holds those it was given (`devices_of`) until it leaves flight; a job
adopted after a restart holds the ones its launch recorded.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

_Kind = Literal["dispatch", "expire", "settle", "resubmit"]


@dataclass(frozen=True, slots=True)
class Launch:
    """Begin the job's next attempt (it holds a slot of the lane from now on)."""

    job_id: str


@dataclass(frozen=True, slots=True)
class Expire:
    """The job's queue deadline has passed while it waited to launch: stop it."""

    job_id: str


@dataclass(frozen=True, slots=True)
class Settle:
    """Look again at the job's attempt whose outcome is unknown."""

    job_id: str


@dataclass(frozen=True, slots=True)
class Resubmit:
    """Submit the job's current attempt again (same token): the last try provably started
    nothing, for a reason that was not the job's (the backend's credentials were refused)."""

    job_id: str


Action = Launch | Expire | Settle | Resubmit


class Lane:
    def __init__(
        self,
        name: str,
        cap: int,
        *,
        max_attempts: int,
        budget_s: float,
        wake: Callable[[], None] = lambda: None,
        devices: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.cap = cap  # jobs in flight at most
        self.max_attempts = max_attempts  # attempts at starting a job
        self.budget_s = budget_s  # wall-clock budget for them
        self._wake = wake
        self._ready: list[tuple[float, int, str]] = []  # a heap: (key, seq, job id)
        self._keys: dict[str, float] = {}  # the order key of each job the lane holds
        self._queued: set[str] = set()
        self._in_flight: set[str] = set()
        self._timers: list[tuple[float, int, str, _Kind]] = []
        self._seq = itertools.count()
        self._settle_tries: dict[str, int] = {}
        self._deadlines: dict[str, float] = {}  # queue deadlines of the jobs the lane holds
        self._paused = False  # no launches while the backend cannot start anything
        self.devices = tuple(devices)
        self._free = list(devices)  # the devices no job holds, in their configured order
        self._held: dict[str, tuple[str, ...]] = {}  # by job
        self._needs: dict[str, int] = {}  # devices each job needs (only those that need some)

    # -- what it holds ---------------------------------------------------------------------

    @property
    def queued(self) -> int:
        return len(self._queued)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def is_queued(self, job_id: str) -> bool:
        return job_id in self._queued

    def is_in_flight(self, job_id: str) -> bool:
        return job_id in self._in_flight

    @property
    def paused(self) -> bool:
        return self._paused

    def next_timer(self) -> float | None:
        """When the earliest timer is due (None: none is set)."""
        return self._timers[0][0] if self._timers else None

    # -- inputs ----------------------------------------------------------------------------

    def devices_of(self, job_id: str) -> tuple[str, ...]:
        """The devices the job holds (none unless it needs some and is in flight)."""
        return self._held.get(job_id, ())

    def enqueue(
        self, job_id: str, queue_deadline: float | None = None, key: float = 0.0, gpus: int = 0
    ) -> None:
        """A QUEUED job is ready for its (next) attempt, launched in the order of `key` (then
        of enqueueing) once `gpus` of the lane's devices are free; a no-op if the lane has it
        already."""
        if job_id in self._queued or job_id in self._in_flight:
            return
        self._queued.add(job_id)
        self._keys[job_id] = key
        self._need(job_id, gpus)
        self._make_ready(job_id)
        if queue_deadline is not None:
            self._deadlines[job_id] = queue_deadline
            self._push(queue_deadline, job_id, "expire")
        self._wake()

    def adopt(self, job_id: str, devices: Sequence[str] = ()) -> None:
        """Count a job past dispatch (recovered at start-up) against the cap, holding the
        `devices` its launch recorded (those the lane has)."""
        self._in_flight.add(job_id)
        if held := tuple(d for d in devices if d in self._free):
            self._held[job_id] = held
            self._free = [d for d in self._free if d not in held]

    def release(self, job_id: str) -> None:
        """The job no longer holds a slot (it ended, never launched, or failed to start), nor
        devices."""
        if self._let_go(job_id):
            self._wake()

    def _let_go(self, job_id: str) -> bool:
        """The job out of flight, its devices free; whether that freed anything."""
        freed = self._held.pop(job_id, ())
        if freed:
            self._free = [d for d in self.devices if d in self._free or d in freed]
        in_flight = job_id in self._in_flight
        self._in_flight.discard(job_id)
        return in_flight or bool(freed)

    def ended(self, job_id: str) -> None:
        """The job is terminal: out of the queue and out of flight."""
        self._queued.discard(job_id)
        self._keys.pop(job_id, None)
        self._settle_tries.pop(job_id, None)
        self._deadlines.pop(job_id, None)
        self._needs.pop(job_id, None)
        self.release(job_id)

    def retry_at(self, job_id: str, at: float) -> None:
        """A start that failed is tried again at `at` (unless its queue deadline has passed by
        then: it is expired instead): the slot is freed meanwhile, and its devices."""
        self._let_go(job_id)
        self._queued.add(job_id)
        self._push(at, job_id, "dispatch")
        self._wake()

    def requeue_at(
        self,
        job_id: str,
        at: float,
        queue_deadline: float | None = None,
        key: float = 0.0,
        gpus: int = 0,
    ) -> None:
        """The job's attempt ended in a failure its retry policy retries: out of flight, its
        next attempt is launched at `at` (in the order of `key` then) — unless its new queue
        deadline passes first."""
        self.ended(job_id)
        self._keys[job_id] = key
        self._need(job_id, gpus)
        if queue_deadline is not None:
            self._deadlines[job_id] = queue_deadline
            self._push(queue_deadline, job_id, "expire")
        self.retry_at(job_id, at)

    def resubmit_at(self, job_id: str, at: float) -> None:
        """The job's attempt started nothing for the backend's reason: try the same attempt
        again at `at` (it keeps its slot). Launches pause until a start succeeds (`resume`):
        the backend cannot start anything now, and each new launch would only find that out
        again."""
        self._paused = True
        self._push(at, job_id, "resubmit")
        self._wake()

    def resume(self) -> None:
        """A start succeeded: launches go on."""
        if self._paused:
            self._paused = False
            self._wake()

    def settle_at(self, job_id: str, at: float) -> None:
        """Look again at the job's unsettled attempt at `at` (it keeps its slot)."""
        self._push(at, job_id, "settle")
        self._wake()

    def begin_settle(self, job_id: str) -> int:
        """A look at the job's unsettled attempt begins: it holds a slot; how many looks at
        this attempt, this one included."""
        self._in_flight.add(job_id)
        tries = self._settle_tries[job_id] = self._settle_tries.get(job_id, 0) + 1
        return tries

    def settled(self, job_id: str) -> None:
        """The attempt's outcome is known: its looks are counted afresh for the next one."""
        self._settle_tries.pop(job_id, None)

    # -- outputs ---------------------------------------------------------------------------

    def due(self, now: float) -> list[Action]:
        """What is due at `now`: timers first, then launches while the cap allows. A job is
        never both expired and launched: one whose queue deadline has passed when its turn
        comes (it waited for a slot, or for a retry after a start that failed) is expired."""
        actions: list[Action] = []
        while self._timers and self._timers[0][0] <= now:
            _, _, job_id, kind = heapq.heappop(self._timers)
            if kind == "dispatch":
                self._make_ready(job_id)
            elif kind == "settle":
                actions.append(Settle(job_id))
            elif kind == "resubmit":
                actions.append(Resubmit(job_id))
            elif job_id in self._queued and job_id not in self._in_flight:
                actions.append(self._expire(job_id))
            # An expiry while the job is in flight: its launch goes on (the poller stops a job
            # that launched and is not running by its deadline); a retry is expired above.
        waiting: list[tuple[float, int, str]] = []  # ready, but their devices are not free
        while self._ready and len(self._in_flight) < self.cap and not self._paused:
            entry = heapq.heappop(self._ready)
            job_id = entry[2]
            if job_id not in self._queued:
                continue  # ended or expired while it waited
            deadline = self._deadlines.get(job_id)
            if deadline is not None and deadline <= now:
                actions.append(self._expire(job_id))
                continue
            need = self._needs.get(job_id, 0)
            if need > len(self._free):
                waiting.append(entry)
                continue
            if need:
                self._held[job_id], self._free = tuple(self._free[:need]), self._free[need:]
            self._queued.discard(job_id)
            self._in_flight.add(job_id)
            actions.append(Launch(job_id))
        for entry in waiting:
            heapq.heappush(self._ready, entry)  # in their place: (key, seq) as they were
        return actions

    def _need(self, job_id: str, gpus: int) -> None:
        if gpus:
            self._needs[job_id] = gpus
        else:
            self._needs.pop(job_id, None)

    def _expire(self, job_id: str) -> Expire:
        """Out of the queue for good: it is to be stopped, not launched."""
        self._queued.discard(job_id)
        self._deadlines.pop(job_id, None)
        self._keys.pop(job_id, None)
        self._needs.pop(job_id, None)
        return Expire(job_id)

    def _make_ready(self, job_id: str) -> None:
        heapq.heappush(self._ready, (self._keys.get(job_id, 0.0), next(self._seq), job_id))

    def _push(self, at: float, job_id: str, kind: _Kind) -> None:
        heapq.heappush(self._timers, (at, next(self._seq), job_id, kind))
