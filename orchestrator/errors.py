"""Every exception class of the daemon: one root, `OrchestratorError`, each leaf named for what
happened and carrying its data; and a few internal signals (the "Internal signals" section).

A leaf's docstring is its default message. Leaves that can reach a client carry a stable `code`
that the socket protocol puts on the wire.
"""

from __future__ import annotations

import errno
from typing import ClassVar


class OrchestratorError(Exception):
    """Something went wrong in orchestrator."""

    code: ClassVar[str] = "internal"

    def __init__(self, message: str | None = None) -> None:
        self.message = message or (self.__doc__ or self.__class__.__name__).strip()
        super().__init__(self.message)


class ConfigError(OrchestratorError):
    """The configuration is invalid."""

    code = "invalid_config"


class ProtocolError(OrchestratorError):
    """The request could not be understood."""

    code = "bad_request"


class InvalidJson(ProtocolError):
    """The line is not valid JSON."""

    code = "invalid_json"


class LineTooLong(ProtocolError):
    """The line is longer than the server accepts."""

    code = "line_too_long"

    def __init__(self, limit: int) -> None:
        self.limit = limit
        super().__init__(f"line longer than {limit} bytes; split the request or raise the limit")


class UnsupportedVersion(ProtocolError):
    """The protocol version is not supported."""

    code = "unsupported_version"


class UnknownOperation(ProtocolError):
    """The operation does not exist."""

    code = "unknown_op"

    def __init__(self, op: str) -> None:
        self.op = op
        super().__init__(f"unknown op {op!r}")


class InvalidRequest(ProtocolError):
    """A field of the request is missing, unknown or of the wrong type."""

    code = "invalid_request"


class InvalidJob(OrchestratorError):
    """The job spec cannot be run; `path` names the offending field."""

    code = "invalid_job"

    def __init__(self, message: str, path: str | None = None) -> None:
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


class JobNotFound(OrchestratorError):
    """No such job."""

    code = "not_found"

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        super().__init__(f"no job with id, id prefix or name {job_id!r}")


class AmbiguousJob(OrchestratorError):
    """A job was named by an id prefix or a name that more than one job has."""

    code = "ambiguous_job"


class StaleState(OrchestratorError):
    """The job changed since it was read; the compare-and-set found another state."""

    code = "conflict"

    def __init__(self, job_id: str, expected: str, actual: str) -> None:
        self.job_id = job_id
        self.expected = expected
        self.actual = actual
        super().__init__(f"job {job_id} is {actual}, expected {expected}")


class IllegalTransition(OrchestratorError):
    """That state change is not allowed."""

    code = "conflict"

    def __init__(self, job_id: str, old: str, new: str) -> None:
        self.job_id = job_id
        self.old = old
        self.new = new
        super().__init__(f"job {job_id}: {old} → {new} is not a legal transition")


class Forbidden(OrchestratorError):
    """The peer is not allowed to use this socket."""

    code = "forbidden"


class Overloaded(OrchestratorError):
    """The daemon refuses more work of this kind right now."""

    code = "overloaded"


class ShuttingDown(OrchestratorError):
    """The daemon is shutting down and takes no new work."""

    code = "shutting_down"


class BackendUnavailable(OrchestratorError):
    """The job names a backend that is not configured on this daemon."""

    code = "backend_unavailable"

    def __init__(self, backend: str) -> None:
        self.backend = backend
        super().__init__(f"backend {backend!r} is not enabled on this daemon")


class StartFailed(OrchestratorError):
    """The backend could not start the job."""

    code = "start_failed"

    def __init__(self, reason: str, *, retryable: bool, failure: str = "start") -> None:
        self.reason = reason
        self.retryable = retryable
        self.failure = failure  # `start`: it never ran; `rejected`: AWS refused the request
        super().__init__(reason)


class StartDeferred(OrchestratorError):
    """The backend cannot start anything now for a reason that is not the job's (its
    credentials were refused): nothing started; the same attempt is tried again later."""

    code = "start_deferred"

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class StoreError(OrchestratorError):
    """The job store failed."""

    code = "store_error"


class StoreUnavailable(StoreError):
    """The store's server (PostgreSQL) cannot be reached now: nothing was written; the daemon
    reconnects by itself, and the same request later may succeed."""

    code = "store_unavailable"


class Fenced(StoreError):
    """A write refused because this daemon may no longer make it (issue #16): its lease on
    the AWS backends lapsed or passed to another daemon (the fencing token it wrote with is no
    longer the current one), or a local job belongs to another daemon. Nothing was written."""

    code = "fenced"


class StoreFull(StoreError):
    """The store's file system is short of space: new jobs are refused, accepted ones go on."""

    code = "store_full"

    def __init__(self, path: str, free_bytes: int, min_free_bytes: int) -> None:
        self.path = path
        self.free_bytes = free_bytes
        self.min_free_bytes = min_free_bytes
        super().__init__(
            f"the store {path} is short of space: its file system has {_size(free_bytes)} "
            f"free, below store.min_free_bytes={min_free_bytes}; new jobs are refused until "
            "space is freed (jobs already accepted are still tracked)"
        )


def _size(n: int) -> str:
    return f"{n} bytes ({n / 2**20:.1f} MiB)"


class StoreUnusable(ConfigError):
    """This daemon cannot use the configured store; restarting will not change that."""

    code = "store_unusable"


class StoreLocked(StoreUnusable):
    """Another daemon holds the store: one store is served by one daemon at a time."""

    def __init__(self, path: str, holder_pid: int | None) -> None:
        self.path = path
        self.holder_pid = holder_pid
        holder = "pid unknown" if holder_pid is None else f"pid {holder_pid}"
        super().__init__(
            f"store {path} is in use by another orchestrator daemon ({holder}); "
            "one store is served by one daemon at a time"
        )


class NotAStore(StoreUnusable):
    """The file at the store's path is not an orchestrator store; it is left untouched."""

    def __init__(self, path: str, why: str) -> None:
        self.path = path
        self.why = why
        super().__init__(
            f"{path} is not an orchestrator store ({why}); refusing to use it: point "
            "store.path at another file, or move this one away"
        )


class NodeInUse(StoreUnusable):
    """Another live daemon on the same database goes by this daemon's `cluster.node`."""

    code = "node_in_use"


class StoreTooNew(StoreUnusable):
    """The store was written by a newer orchestrator than this one."""

    def __init__(self, path: str, version: int, supported: int) -> None:
        self.path = path
        self.version = version
        self.supported = supported
        super().__init__(
            f"store {path} has schema_version {version}, newer than this orchestrator "
            f"understands ({supported}): run the newer version (downgrading is not supported)"
        )


class UnsafeSocketDirectory(ConfigError):
    """The socket's directory could be written by someone else: another user could put their
    own socket in place of the daemon's. Refused by the daemon (it does not bind there) and by
    a client on the default path (it sends nothing)."""

    code = "unsafe_socket_directory"

    def __init__(self, path: str, why: str, uid: int) -> None:
        self.path = path
        self.why = why
        super().__init__(
            f"refusing the socket directory {path}: {why}. It must be a directory (not a "
            f"symlink) owned by uid {uid} or root that neither group nor others can write: "
            "remove it (the daemon creates it mode 0700) or use another socket path"
        )


class CannotRunAsSubmitter(ConfigError):
    """`local.run_as` is "submitter", but this daemon cannot run jobs as other users."""

    code = "cannot_run_as_submitter"

    def __init__(self, why: str) -> None:
        self.why = why
        super().__init__(
            f'local.run_as = "submitter", but this daemon cannot run jobs as other users: {why}. '
            "It needs CAP_SETUID, CAP_SETGID and CAP_KILL: run it as root, or as a service user "
            "holding them as ambient capabilities (deploy/systemd/run-as-submitter.conf); or set "
            'local.run_as = "daemon"'
        )


class DaemonUnreachable(OrchestratorError):
    """The daemon's socket could not be reached."""

    code = "unreachable"

    def __init__(self, socket_path: str, why: str) -> None:
        self.socket_path = socket_path
        super().__init__(f"cannot reach orchestrator at {socket_path}: {why}")


class RemoteError(OrchestratorError):
    """The daemon answered a request with an error (client side): `code` is the daemon's
    (`not_found`, `invalid_job`, …), `detail` its message. `orchestrator.client` raises the
    subclass of the code where there is one (`client.NotFound`, `client.InvalidJob`, …)."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code  # type: ignore[misc]  # the daemon's, per instance
        self.remote_code = code  # its older name
        self.detail = message
        super().__init__(f"{code}: {message}")


class OutcomeUnknown(OrchestratorError):
    """The backend may or may not have started the job (a timeout or a 5xx after sending)."""

    code = "outcome_unknown"


class AwsError(OrchestratorError):
    """An AWS API call failed."""

    code = "aws_error"

    def __init__(
        self, service: str, operation: str, aws_code: str, message: str, status: int | None = None
    ) -> None:
        self.service = service
        self.operation = operation
        self.aws_code = aws_code
        self.aws_message = message
        self.status = status
        self.maybe_took_effect = False  # set by the caller that knows the call's attempts
        super().__init__(f"{service} {operation}: {aws_code}: {message}")


class AwsThrottled(AwsError):
    """AWS refused the call for its rate (after botocore's own retries)."""

    code = "aws_throttled"


class AwsServerFault(AwsError):
    """AWS failed on its side (5xx): the call may or may not have taken effect."""

    code = "aws_server_fault"


class AwsRejected(AwsError):
    """AWS rejected the request as invalid or not allowed (4xx): retrying will not help."""

    code = "aws_rejected"


class AwsCredentials(AwsError):
    """AWS refused the caller's credentials or request signature (expired, unknown, a clock
    skewed): the daemon's trouble, not the job's. Nothing was done."""

    code = "aws_credentials"


class AwsUnreachable(AwsError):
    """The AWS endpoint could not be reached, or did not answer in time."""

    code = "aws_unreachable"


# -- Internal signals ---------------------------------------------------------------------------
# Raised and caught inside the daemon, never put on the wire as they are. They derive from
# Exception, not OrchestratorError, so that no `except OrchestratorError` meant for a request's
# errors can swallow one.


class BadRequest(Exception):
    """A request that failed to decode, with the id to answer it under (if one was readable)."""

    def __init__(self, request_id: str | int | None, error: ProtocolError | InvalidJob) -> None:
        self.request_id = request_id
        self.error = error
        super().__init__(error.message)


class WatcherTooSlow(Exception):
    """The watcher's queue filled up; it was dropped so the daemon would not wait for it."""


class KeeperUnavailable(Exception):
    """No local job keeper could be started or reached: nothing was sent to it."""


class LaunchFailed(Exception):
    """The local job keeper says nothing ran (an errno, and why)."""

    def __init__(self, code: int, why: str) -> None:
        super().__init__(why)
        self.errno = code
        self.why = why


class ReadUnsure(Exception):
    """A read about a local job failed without proving anything (EMFILE, ENOMEM, EIO, a garbled
    line): the job keeps its state until a later read tells."""

    def __init__(self, what: str, error: Exception) -> None:
        self.what = what
        self.errno_name = (
            errno.errorcode.get(error.errno, str(error.errno))
            if isinstance(error, OSError) and error.errno is not None
            else "corrupt"
        )
        self.detail = str(error)
        super().__init__(f"{what}: {error}")


class CheckFailed(Exception):
    """A check of `orchestrator check` found something wrong; the message says what."""


class CgroupUnusable(Exception):
    """No cgroup may be made for jobs here; the message says why."""


class HealthCheckFailed(OrchestratorError):
    """A backend's start-up check failed: credentials, permissions or resources are wrong."""

    code = "health_check_failed"


class LogsUnavailable(OrchestratorError):
    """The job's output cannot be read right now (e.g. the daemon is out of descriptors)."""

    code = "logs_unavailable"


class IdempotencyConflict(OrchestratorError):
    """The idempotency key belongs to a job with a different spec."""

    code = "idempotency_conflict"
