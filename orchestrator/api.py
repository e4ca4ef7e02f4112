"""What each socket operation does. The server hands decoded requests here; replies go back
through `send`, one encoded line at a time."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import structlog

from orchestrator import __version__, access, errors, events, faults, models, protocol, snapshot
from orchestrator.backends import base
from orchestrator.backends.base import Backend
from orchestrator.drivers import Router
from orchestrator.engine import arrays
from orchestrator.health import Health
from orchestrator.settings import JobDefaults
from orchestrator.store import JobQuery, Store

log = structlog.get_logger("orchestrator.api")

Send = Callable[[bytes], Awaitable[None]]
_Outcome = tuple[models.Job, bool] | errors.OrchestratorError
_Intake = tuple[list[tuple[models.JobSpec, str]], models.Peer, asyncio.Future[list[_Outcome]]]
_LOG_FOLLOW_MIN_S = 0.25
_LOG_FOLLOW_MAX_S = 2.0


class Api:
    def __init__(
        self,
        defaults: JobDefaults,
        store: Store,
        drivers: Router,
        backends: Mapping[str, Backend],
        hub: events.Hub,
        *,
        policy: access.Policy,
        crash: faults.Faults | None = None,
        health: Health | None = None,
        cluster: Callable[[], dict[str, Any]] | None = None,
    ) -> None:
        self._crash = crash or faults.Faults()
        self._health = health or Health(store)
        self._defaults = defaults
        self._retry = defaults.retry.policy()
        # What a job that gives no policy stores (None: the built-in one, `DEFAULT_RETRY`).
        self._stored_retry = None if self._retry == models.DEFAULT_RETRY else self._retry
        self._policy = policy
        self._store = store
        self._drivers = drivers  # who launches and tracks each backend's jobs here
        self._cluster = cluster  # a shared PostgreSQL: who this daemon is, who leads
        self._backends = backends
        self._hub = hub
        self._started = time.monotonic()
        self.accepting = True
        self._intake: list[_Intake] = []  # submissions waiting for the next store operation
        self._intake_task: asyncio.Task[None] | None = None
        # What `shutdown` calls: the daemon's own stop (set by the daemon; a bare Api has none).
        self.on_shutdown: Callable[[], None] = lambda: None

    async def answer(self, request: protocol.Request, peer: models.Peer) -> bytes:
        """The one reply line of a unary request; errors become error replies, never
        exceptions. Nothing is sent here: the connection sends the line, so a deadline that
        fires while the client is slow to read can never produce a second reply."""
        rid = request.id
        try:
            match request.params:
                case protocol.Ping():
                    return protocol.reply(rid, **await self.ping(peer))
                case protocol.Shutdown():
                    return protocol.reply(rid, **self.shutdown(peer))
                case protocol.Submit(job=spec):
                    job, created = await self.submit(spec, peer)
                    return protocol.reply(rid, job=job.to_dict(), created=created)
                case protocol.SubmitMany(jobs=raw):
                    return protocol.reply(rid, results=await self.submit_many(raw, peer))
                case protocol.Get(job_id=ref, history=history):
                    job = await self.resolve(ref, peer, children=True)
                    return protocol.reply(rid, job=await self.get(job, history=history))
                case protocol.ListJobs() as listing:
                    return await self._list(rid, peer, listing)
                case protocol.Cancel(job_id=ref):
                    job, recorded = await self.cancel((await self.resolve(ref, peer)).id)
                    # Ended otherwise than by a cancel (this one or an earlier one).
                    ended = job.state.terminal and job.state != models.JobState.CANCELLED
                    return protocol.reply(
                        rid, job=job.to_dict(), recorded=recorded, already_ended=ended
                    )
                case protocol.Top(state=states, backend=backend, limit=limit, failures=failures):
                    query = snapshot.Query(states, backend, limit, failures)
                    return protocol.reply(rid, **await self.top(query, peer))
                case _:
                    raise errors.UnknownOperation(request.op)
        except errors.OrchestratorError as exc:
            return protocol.error(rid, exc.code, exc.message)

    async def stream(self, request: protocol.Request, peer: models.Peer, send: Send) -> None:
        """A streaming request: any number of lines through `send`, the last with `end` (or
        an error line)."""
        rid = request.id
        try:
            match request.params:
                case protocol.Wait(job_id=ref):
                    job_id = (await self.resolve(ref, peer)).id
                    await send(protocol.end(rid, job=(await self.wait(job_id, peer)).to_dict()))
                case protocol.Watch(job_id=ref, since=since):
                    one = None if ref is None else (await self.resolve(ref, peer)).id
                    await self.watch(rid, one, peer, send, since=since)
                case protocol.Logs(job_id=ref, follow=follow, cursor=cursor, attempt=attempt):
                    resume = None if attempt is None else (attempt, cursor)
                    job = await self.resolve(ref, peer, children=True)
                    if arrays.expands(job):
                        raise errors.InvalidRequest(
                            f"{job.id} is an array job: the output is its children's "
                            f"(`logs {job.id}:<index>`, `ls --children {job.id}`)"
                        )
                    if job.info.get("array_child_of") is not None:  # a Batch child: not stored
                        await self._child_logs(rid, job, peer, follow, send)
                    else:
                        await self.logs(rid, job.id, peer, follow, send, resume=resume)
                case _:
                    raise errors.UnknownOperation(request.op)
        except errors.OrchestratorError as exc:
            await send(protocol.error(rid, exc.code, exc.message))

    async def _list(
        self, rid: protocol.RequestId, peer: models.Peer, query: protocol.ListJobs
    ) -> bytes:
        """One page of at most `protocol.MAX_PAGE` jobs; `next_cursor` says whether (and
        where) the listing goes on. A peer lists the jobs it may see, and only those: the store
        filters them (and by state, backend, name glob, acceptance time), so every page but
        the last is full and the cursor skips none."""
        page = min(query.limit, protocol.MAX_PAGE)
        jobs = await self._store.list_jobs(
            JobQuery.of(
                query.state,
                backend=query.backend,
                limit=page + 1,
                before=query.cursor,
                peer_uid=self._policy.owner(peer),
                name=query.name,
                since=query.since,
                labels=query.labels,
                target=query.target,
                id_prefix=None if query.parent is None else f"{query.parent}{arrays.SEPARATOR}",
                children=query.parent is not None,
            )
        )
        more = len(jobs) > page
        del jobs[page:]
        next_cursor = jobs[-1].id if more else None
        return protocol.reply(rid, jobs=[job.to_dict() for job in jobs], next_cursor=next_cursor)

    def shutdown(self, peer: models.Peer) -> dict[str, object]:
        """Stop the daemon as SIGTERM does: only an admin may; the reply comes first."""
        if not self._policy.is_admin(peer):
            raise errors.Forbidden(f"uid {peer.uid} may not stop the daemon (admins only)")
        log.info("daemon.shutdown_requested", peer_uid=peer.uid, peer_pid=peer.pid)
        asyncio.get_running_loop().call_soon(self.on_shutdown)
        return {"stopping": True, "pid": os.getpid()}

    async def ping(self, peer: models.Peer) -> dict[str, object]:
        # Touches the store: a health check. Counts of the jobs the peer may see (an admin's:
        # all), as other users' jobs are not its business.
        try:
            counts: dict[str, int] | None = await self._store.count_by_state(
                self._policy.owner(peer)
            )
        except errors.StoreError:  # the daemon answers all the same: its store is a problem
            counts = None
        problems = self._health.problems()
        return {
            "pong": True,
            "status": "degraded" if problems else "ok",
            "problems": [{"reason": p.reason, "message": p.message} for p in problems],
            "store_free_bytes": self._store.free_bytes(),
            "version": __version__,
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self._started, 3),
            "jobs": counts,
            "backends": sorted(self._backends),
            **({} if self._cluster is None else {"cluster": self._cluster()}),
            **({"events": feeds} if (feeds := self._events()) else {}),
        }

    def _events(self) -> dict[str, object]:
        return {name: feed.describe() for name, feed in self._drivers.feeds().items()}

    async def top(self, query: snapshot.Query, peer: models.Peer) -> dict[str, object]:
        """What `orchestrator top` shows (`snapshot.py`), of the jobs `peer` may see; the
        lanes (every user's jobs in flight and queued) to an admin only."""
        found = await snapshot.build(
            self._store,
            query,
            owner=self._policy.owner(peer),
            telemetry={name: backend.telemetry() for name, backend in self._backends.items()},
            lanes={
                name: snapshot.Lane(in_flight, self._drivers.queued(name) or 0)
                for name in self._backends
                if (in_flight := self._drivers.in_flight(name)) is not None
            },
            show_lanes=self._policy.is_admin(peer),
            problems=self._health.problems(),
            now=time.time(),
        )
        return {
            **found,
            "version": __version__,
            "pid": os.getpid(),
            "uptime_s": round(time.monotonic() - self._started, 3),
            "store_free_bytes": self._store.free_bytes(),
        }

    async def submit(self, spec: models.JobSpec, peer: models.Peer) -> tuple[models.Job, bool]:
        self._store.check_room()
        spec = await self._dependencies(spec, peer, {})
        (outcome,) = await self._accept_all([self._prepare(spec, peer)], peer)
        if isinstance(outcome, errors.OrchestratorError):
            raise outcome
        return outcome

    async def submit_many(self, raw: list[Any], peer: models.Peer) -> list[dict[str, Any]]:
        """Validate each spec alone; accept the valid ones in one store operation; report
        each outcome in order (a compact job, or the error that names the field). A store short
        of space refuses the whole request."""
        self._store.check_room()
        outcomes = await self._accept_in_waves(raw, peer)
        results: list[dict[str, Any]] = []
        for outcome in outcomes:
            if isinstance(outcome, errors.OrchestratorError):
                results.append({"ok": False, "code": outcome.code, "message": outcome.message})
            else:
                job, created = outcome
                results.append(
                    {
                        "ok": True,
                        "id": job.id,
                        "name": job.name,
                        "state": job.state.value,
                        "created": created,
                    }
                )
        return results

    async def _accept_in_waves(self, raw: list[Any], peer: models.Peer) -> list[_Outcome]:
        """Accept `raw` specs in order, as few store operations as their `ref:NAME`
        dependencies allow: a spec that names an earlier one of this request is accepted once
        that one is (its id is then known)."""
        outcomes: list[_Outcome | None] = [None] * len(raw)
        wave: list[tuple[int, tuple[models.JobSpec, str]]] = []
        refs: dict[str, str] = {}  # name → id, of this request's accepted specs

        async def flush() -> None:
            if not wave:
                return
            done = await self._accept_all([p for _, p in wave], peer)
            for (index, (spec, _)), outcome in zip(wave, done, strict=True):
                outcomes[index] = outcome
                if spec.name and not isinstance(outcome, errors.OrchestratorError):
                    refs.setdefault(spec.name, outcome[0].id)
            wave.clear()

        for index, value in enumerate(raw):
            try:
                spec = protocol.job_spec(value, ("job",))
                if any(dep.startswith(_REF) for dep in spec.depends_on):
                    await flush()  # what it names is accepted before it
                spec = await self._dependencies(spec, peer, refs)
                wave.append((index, self._prepare(spec, peer)))
                if spec.name:
                    refs.pop(spec.name, None)  # a later spec of that name is the one meant
            except errors.OrchestratorError as exc:
                outcomes[index] = exc
        await flush()
        return [outcome for outcome in outcomes if outcome is not None]

    async def _dependencies(
        self, spec: models.JobSpec, peer: models.Peer, refs: Mapping[str, str]
    ) -> models.JobSpec:
        """The spec with its `depends_on` as ids: each named by id, unique id prefix, unique
        name (among the jobs `peer` may see) or `ref:NAME` (an earlier spec of the request).
        A job cannot depend on one that does not exist yet, so no cycle can be made."""
        if not spec.depends_on:
            return spec
        ids: list[str] = []
        for index, ref in enumerate(spec.depends_on):
            try:
                if ref.startswith(_REF):
                    name = ref[len(_REF) :]
                    if name not in refs:
                        raise errors.JobNotFound(ref)
                    found = refs[name]
                else:
                    found = (await self.resolve(ref, peer)).id
            except (errors.JobNotFound, errors.AmbiguousJob) as exc:
                hint = "; ref:NAME names an earlier spec of the same submit_many"
                raise errors.InvalidJob(
                    exc.message + (hint if ref.startswith(_REF) else ""),
                    f"job.depends_on[{index}]",
                ) from None
            if found not in ids:
                ids.append(found)
        return spec.model_copy(update={"depends_on": ids})

    def _prepare(self, spec: models.JobSpec, peer: models.Peer) -> tuple[models.JobSpec, str]:
        """The spec with the daemon's defaults filled in, checked by its backend (and, for a
        local job, whether this daemon runs local jobs of this peer)."""
        if not self.accepting:
            raise errors.ShuttingDown
        name = spec.backend or self._defaults.backend
        backend = self._backends.get(name)
        if backend is None:
            raise errors.BackendUnavailable(name)
        if name == "local":
            self._policy.check_local(peer)
        # The daemon's default timeouts and retry policy become the job's own, to survive a
        # restart with other defaults. (The backend is stored beside the spec, not in it.)
        # A policy equal to the built-in one is stored as None (`models.DEFAULT_RETRY`).
        if spec.retry is None:
            retry = self._stored_retry  # the common case: nothing to merge or compare
        else:
            merged = spec.retry.over(self._retry)
            retry = None if merged == models.DEFAULT_RETRY else merged
        own: dict[str, object] = {
            "timeout_s": spec.timeout_s or self._defaults.timeout_s,
            "queue_timeout_s": spec.queue_timeout_s or self._defaults.queue_timeout_s,
            "retry": retry,
        }
        if any(getattr(spec, key) != value for key, value in own.items()):
            spec = spec.model_copy(update=own)
        backend.validate(spec)
        return spec, name

    async def _accept_all(
        self, specs: list[tuple[models.JobSpec, str]], peer: models.Peer
    ) -> list[_Outcome]:
        """Accept `specs` together with whatever other requests are being accepted now: while
        one batch commits the next gathers, so a burst of one-job requests costs the store a
        few operations, not one each (group commit, one level up)."""
        future: asyncio.Future[list[_Outcome]] = asyncio.get_running_loop().create_future()
        self._intake.append((specs, peer, future))
        if self._intake_task is None:
            self._intake_task = asyncio.create_task(self._drain_intake(), name="accept")
        # Cancelling the caller cancels only its future: the batch still commits, and what it
        # committed still reaches the dispatcher.
        return await future

    async def _drain_intake(self) -> None:
        try:
            while self._intake:
                batch, self._intake = self._intake, []
                for peer, run in itertools.groupby(batch, key=lambda item: item[1]):
                    requests = list(run)
                    specs = [spec for request in requests for spec in request[0]]
                    try:
                        outcomes = await self._accept(specs, peer)
                    except Exception as exc:
                        for _, _, future in requests:
                            if not future.done():
                                future.set_exception(exc)
                        continue
                    start = 0
                    for request_specs, _, future in requests:
                        end = start + len(request_specs)
                        if not future.done():
                            future.set_result(outcomes[start:end])
                        start = end
        finally:
            self._intake_task = None

    async def _accept(
        self, specs: list[tuple[models.JobSpec, str]], peer: models.Peer
    ) -> list[_Outcome]:
        outcomes = await self._store.accept_many(specs, peer)
        self._crash.crashpoint("server.after_accept")
        for outcome in outcomes:
            if isinstance(outcome, errors.OrchestratorError):
                continue
            job = outcome[0]
            if not outcome[1]:
                # Asked again under its key: in hand already, unless the first ask's commit was
                # never answered (then nothing here took it): take it if not (a no-op if so).
                self._drivers.take(job)
                continue
            spec = job.spec
            log.info(
                "job.accepted",
                job_id=job.id,
                backend=job.backend,
                name=job.name,
                peer_uid=peer.uid,
                peer_pid=peer.pid,
                **({"image": spec.image} if spec.image else {}),
                **({"array_size": spec.array_size} if spec.array_size else {}),
            )
            self._drivers.enqueue(job)
        return outcomes

    async def resolve(self, ref: str, peer: models.Peer, *, children: bool = False) -> models.Job:
        """The job `ref` names for `peer`, as git and docker allow: by its id, else by a
        prefix of one id (4 characters at least), else by the name of one job — among the jobs
        `peer` may see. `AmbiguousJob` when a prefix or name fits several, `JobNotFound` when
        none. `<parent>:<index>` names an array job's child, the parent named any of those
        ways; with `children`, also a child of a Batch array job, as Batch tells it now
        (`array_child`). A child is named so or by its whole id, never by a prefix or a name
        (those name the arrays, whose children share their ids' beginnings)."""
        owner = self._policy.owner(peer)
        with contextlib.suppress(errors.JobNotFound):
            return await self._job(ref, peer)
        if (child := arrays.split(ref)) is not None:
            return await self._child(ref, child, peer, children=children)
        if len(ref) >= _MIN_PREFIX:
            by_id = await self._store.list_jobs(
                JobQuery(limit=3, peer_uid=owner, id_prefix=ref.lower(), children=False)
            )
            if len(by_id) == 1:
                return by_id[0]
            if by_id:
                raise errors.AmbiguousJob(
                    f"{ref!r} starts the ids of several jobs ({_some(by_id)}): give more of it"
                )
        if not any(char in ref for char in "*?["):  # a name, not a glob
            named = await self._store.list_jobs(
                JobQuery(limit=3, peer_uid=owner, name=ref, children=False)
            )
            if len(named) == 1:
                return named[0]
            if named:
                raise errors.AmbiguousJob(
                    f"several jobs are named {ref!r} ({_some(named)}): name one by its id"
                )
        raise errors.JobNotFound(ref)

    async def _child(
        self, ref: str, child: tuple[str, int], peer: models.Peer, *, children: bool
    ) -> models.Job:
        """The child `ref` (`<parent>:<index>`) names: of an expanded array, the stored job;
        of a Batch array, as Batch tells it (`children`) or a refusal saying what to do."""
        try:
            parent = await self.resolve(child[0], peer)
        except errors.JobNotFound:
            raise errors.JobNotFound(ref) from None
        if arrays.expands(parent):
            try:
                return await self._job(arrays.child_id(parent.id, child[1]), peer)
            except errors.JobNotFound:
                raise errors.JobNotFound(ref) from None
        if children:
            return await self.array_child(parent, child[1])
        if parent.spec.array_size is not None:
            raise errors.InvalidRequest(
                f"{ref} is a child of the {parent.backend} array job {parent.id}: `status` "
                f"and `logs` show it; wait for, cancel or depend on the whole array"
            )
        raise errors.JobNotFound(ref)

    async def array_child(self, parent: models.Job, index: int) -> models.Job:
        """Child `index` of a Batch array job, described now: a job of its own for `status`
        and `logs` (the store keeps the parent only; `info.array_child_of` names it)."""
        size = parent.spec.array_size
        backend = self._backends.get(parent.backend)
        if size is None or arrays.expands(parent) or not isinstance(backend, base.ArrayBackend):
            raise errors.JobNotFound(arrays.child_id(parent.id, index))
        if index >= size:
            raise errors.JobNotFound(
                f"{arrays.child_id(parent.id, index)} (array job {parent.id} has {size} children)"
            )
        try:
            seen = await backend.describe_child(parent, index)
        except errors.AwsError as exc:
            raise errors.BackendUnavailable(f"{parent.backend}: {exc}") from exc
        info: dict[str, object] = {"array_child_of": parent.id, "array_index": index}
        return dataclasses.replace(
            parent,
            id=arrays.child_id(parent.id, index),
            spec=parent.spec.model_copy(update={"array_size": None, "name": None}),
            state=models.JobState.QUEUED if seen is None else seen.state,
            external_id=None if seen is None else seen.external_id,
            exit_code=None if seen is None else seen.exit_code,
            reason=None if seen is None else seen.reason,
            vendor_status=None if seen is None else seen.vendor_status,
            info=info if seen is None else {**seen.info, **info},
        )

    async def _child_logs(
        self,
        rid: protocol.RequestId,
        child: models.Job,
        peer: models.Peer,
        follow: bool,
        send: Send,
    ) -> None:
        """A Batch array child's output: its own log stream, read until it has ended (and its
        last lines have had time to arrive) when following."""
        backend = self._backends[child.backend]
        cursor: object = None
        interval_s = _LOG_FOLLOW_MIN_S
        while True:
            page = await backend.read_logs(child, cursor)
            cursor = page.cursor
            for chunk in page.chunks:
                await send(protocol.reply(rid, stream=chunk.stream, data=chunk.data))
            if page.chunks:
                continue
            if not follow or child.state.terminal:
                break
            await asyncio.sleep(interval_s)
            interval_s = min(_LOG_FOLLOW_MAX_S, interval_s * 1.5)
            parent = await self._job(str(child.info["array_child_of"]), peer)
            child = await self.array_child(parent, int(child.info["array_index"]))
        await send(protocol.end(rid, state=child.state.value))

    async def _job(self, job_id: str, peer: models.Peer) -> models.Job:
        """The job, if `peer` may see it; to anyone else it does not exist (`not_found`)."""
        job = await self._store.get(job_id)
        self._policy.check_visible(peer, job)
        return job

    async def get(self, job: models.Job, *, history: bool) -> dict[str, object]:
        """A job the peer may see (`resolve` found it), with its history if asked."""
        out = job.to_dict()
        if history and job.info.get("array_child_of") is None:  # a Batch child has none stored
            out["history"] = await self._store.history(job.id)
            out["attempts"] = await self._store.attempts(job.id)
            out["dependents"] = await self._store.dependents(job.id)
        return out

    async def cancel(self, job_id: str) -> tuple[models.Job, bool]:
        """Record the stop of a job the peer may see (`resolve` found it: who submitted a job
        never changes), then have it issued; and whether it was recorded. A store that cannot
        write (a full disk) does not keep a job from being cancelled: it is signalled at once
        and launched no more, and the stop is recorded as soon as the store can write."""
        try:
            job = await self._store.request_stop(job_id, "cancel")
        except errors.StoreError as exc:
            return await self._cancel_unrecorded(job_id, exc)
        log.info("job.cancel_requested", job_id=job_id, state=job.state.value)
        if arrays.expands(job) and not job.state.terminal:
            self._drivers.watch_array(job)  # its children are stopped with it
        else:
            self._drivers.update(job)
        return job, True

    async def _cancel_unrecorded(
        self, job_id: str, exc: errors.StoreError
    ) -> tuple[models.Job, bool]:
        job = await self._store.get(job_id)  # reads work on a full disk
        if job.state.terminal or job.stop_reason is not None:
            return job, True  # nothing new to record: it ended, or is being stopped already
        log.warning(
            "job.cancel_unrecorded", job_id=job_id, state=job.state.value, error=exc.message
        )
        self._drivers.stop_unrecorded(job, "cancel")  # records it, retrying; gates dispatch
        job = dataclasses.replace(job, stop_reason="cancel")
        backend = self._backends.get(job.backend)
        if backend is not None and job.external_id is not None:
            try:
                await backend.stop(job)
            except Exception:  # one job's stop; the poller issues it again on every round
                log.exception("job.stop_failed", job_id=job_id, backend=job.backend)
        return job, False

    async def wait(self, job_id: str, peer: models.Peer) -> models.Job:
        async with self._hub.subscribe(
            job_id
        ) as sub:  # subscribe first, then read: no change slips between
            job = await self._job(job_id, peer)
            while not job.state.terminal:
                event = await sub.get()
                if event.to_state.terminal:
                    job = await self._store.get(job_id)
        return job

    async def watch(
        self,
        rid: protocol.RequestId,
        job_id: str | None,
        peer: models.Peer,
        send: Send,
        *,
        since: int | None = None,
    ) -> None:
        """The job's (or every visible job's) events as they are committed; with `since`, the
        ones committed after that number first, from the store (a watcher resuming)."""
        # Watching all jobs, a peer sees the events of the jobs it may see, and no others.
        peer_uid = self._policy.owner(peer) if job_id is None else None
        async with self._hub.subscribe(job_id, peer_uid=peer_uid) as sub:  # before any read
            job, seq = None, self._hub.last_seq  # whatever comes later is after this one
            if job_id is not None:
                job = await self._job(job_id, peer)
                await send(protocol.reply(rid, watching=True, seq=seq, job=job.to_dict()))
            else:
                await send(protocol.reply(rid, watching=True, seq=seq))
            last = since
            while last is not None:  # catch up, a page at a time
                missed = await self._store.events_since(
                    last, job_id=job_id, peer_uid=peer_uid, limit=protocol.MAX_PAGE
                )
                for event in missed:
                    await send(protocol.reply(rid, event=event.to_dict()))
                    if job_id is not None and event.to_state.terminal:
                        await send(protocol.end(rid))
                        return
                if missed:
                    last = missed[-1].seq
                if len(missed) < protocol.MAX_PAGE:
                    break
            if job is not None and job.state.terminal:
                await send(protocol.end(rid))
                return
            try:
                while True:
                    event = await sub.get()
                    if last is not None and event.seq <= last:
                        continue  # sent while catching up
                    await send(protocol.reply(rid, event=event.to_dict()))
                    if job_id is not None and event.to_state.terminal:
                        await send(protocol.end(rid))
                        return
            except errors.WatcherTooSlow:
                raise errors.Overloaded("watcher fell too far behind and was dropped") from None

    async def logs(
        self,
        rid: protocol.RequestId,
        job_id: str,
        peer: models.Peer,
        follow: bool,
        send: Send,
        *,
        resume: tuple[int, object] | None = None,
    ) -> None:
        """The job's output, a page at a time (following it with `follow`). The last line of
        each page carries where the page ends (`cursor`) and its `attempt`: sent back as
        `resume`, reading goes on from there — if that attempt is still the job's, else from
        the start of the job's current attempt."""
        # Subscribed before the first read, so that a change of the job's state (a new attempt,
        # the end) wakes a follower at once. Nothing signals new output (a local job writes its
        # own files; CloudWatch is only asked) nor `observe`/`relocate` (a Batch log stream, a
        # task found again): those are polled, less often the longer the job stays quiet
        # (CloudWatch reads draw from a bucket every follower shares).
        async with self._hub.subscribe(job_id) as changes:
            job = await self._job(job_id, peer)
            backend = self._backends.get(job.backend)
            if backend is None:
                raise errors.BackendUnavailable(job.backend)
            if self._cluster is not None and job.owner not in (None, self._cluster()["node"]):
                raise errors.LogsUnavailable(
                    f"job {job.id} runs on the daemon of node {job.owner}, and its output is on "
                    "that host: ask that daemon (orchestrator logs on that host)"
                )
            cursor: object = None
            attempt = job.attempt
            if resume is not None and resume[0] == attempt:
                cursor = resume[1]
            interval_s = _LOG_FOLLOW_MIN_S
            while True:
                page = await backend.read_logs(job, cursor)
                cursor = page.cursor
                last = len(page.chunks) - 1
                for i, chunk in enumerate(page.chunks):
                    where = {"cursor": cursor, "attempt": attempt} if i == last else {}
                    await send(protocol.reply(rid, stream=chunk.stream, data=chunk.data, **where))
                if page.chunks:
                    interval_s = _LOG_FOLLOW_MIN_S
                    continue  # more may be waiting right behind
                if not follow:
                    break
                # An ended job's last lines can arrive late (CloudWatch): read on for a while.
                if job.state.terminal and time.time() - job.updated_at >= backend.log_delivery_s:
                    break
                if await _changed(changes, interval_s):
                    interval_s = _LOG_FOLLOW_MIN_S
                else:
                    interval_s = min(_LOG_FOLLOW_MAX_S, interval_s * 1.5)
                job = await self._store.get(job_id)
                if job.attempt != attempt:  # a new attempt writes new logs
                    attempt, cursor = job.attempt, None
        await send(protocol.end(rid, state=job.state.value))


async def _changed(changes: events.Subscription, timeout_s: float) -> bool:
    """Whether the job's state changed within `timeout_s`; the changes queued meanwhile are
    consumed (the follower reads the job from the store: the wake-up is what counts)."""
    if changes.dropped:  # thousands of unread changes of one job: not in practice; poll on
        await asyncio.sleep(timeout_s)
        return False
    try:
        async with asyncio.timeout(timeout_s):
            await changes.get()
    except TimeoutError:
        return False
    with contextlib.suppress(errors.WatcherTooSlow):
        while changes.get_nowait() is not None:
            pass
    return True


_MIN_PREFIX = 4  # characters of an id that may name its job (git's shortest)
_REF = "ref:"  # in `depends_on`: an earlier spec of the same submit_many, by name


def _some(jobs: list[models.Job]) -> str:
    """A few of `jobs`' ids, for a message (more than two: "…, and more")."""
    shown = ", ".join(job.id for job in jobs[:2])
    return shown + (", and more" if len(jobs) > 2 else "")
