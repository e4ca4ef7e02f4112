"""aioboto3 plumbing for the ECS and Batch backends, and the only place that reads botocore's
errors.

- `AwsApi`: one service client (created in `start`, closed in `close`) with botocore's `standard`
  retry mode for transport retries, every call paced by the token bucket of its AWS throttle
  family, each throttled attempt (even one botocore retried away) shrinking that bucket.
- `map_error`: a botocore/aiohttp exception → one typed `errors.AwsError` leaf, by error code.
- `client_options` (a backend's settings → `AwsApi` arguments) and `telemetry` (call and
  throttle counts for the metrics endpoint).

Endpoint and credentials come from the standard AWS chain (env, profile, instance/task role,
`AWS_ENDPOINT_URL`), so the same daemon runs against AWS or a local moto server unchanged.
Building and checking the kwargs of a call is `aws_kwargs`; what the two backends share on top
of their clients is `aws_base`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import re
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import aioboto3
import botocore.config
import botocore.exceptions
import structlog
from botocore.model import OperationModel, ServiceModel

from orchestrator import errors
from orchestrator.backends import base
from orchestrator.ratelimit import Priority, TokenBucket
from orchestrator.settings import AwsBackendSettings

log = structlog.get_logger("orchestrator.aws")

# botocore's list (retries/standard.py) of codes that mean "slow down".
THROTTLING_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottledException",
        "TooManyRequestsException",
        "ProvisionedThroughputExceededException",
        "TransactionInProgressException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "LimitExceededException",
        "RequestThrottled",
        "SlowDown",
        "PriorRequestNotComplete",
        "EC2ThrottledException",
    }
)
# ECS reports EC2-side throttling during RunTask as InvalidParameterException "… Rate exceeded".
# The code is shared with real parameter errors, so here alone the message decides.
_RATE_EXCEEDED = re.compile(r"rate exceeded", re.IGNORECASE)
_SERVER_CODES = frozenset(
    {"ServerException", "InternalFailure", "ServiceUnavailable", "InternalError"}
)


def error_code(parsed: Mapping[str, Any]) -> tuple[str, str]:
    error = parsed.get("Error") or {}
    return str(error.get("Code") or ""), str(error.get("Message") or parsed.get("message") or "")


def is_throttling(code: str, message: str) -> bool:
    return code in THROTTLING_CODES or (
        code == "InvalidParameterException" and bool(_RATE_EXCEEDED.search(message))
    )


# Errors that say the caller's credentials or signature were refused, not the request: the
# access-key and session-token errors of the AWS common errors reference
# (https://docs.aws.amazon.com/ecs/latest/APIReference/CommonErrors.html, the same list for
# Batch): ExpiredTokenException, InvalidClientTokenId, UnrecognizedClientException,
# RequestExpired, InvalidSignatureException (also what a clock skewed past 5 minutes gets),
# MissingAuthenticationToken; STS's ExpiredToken; S3-style SignatureDoesNotMatch. Not
# AccessDenied: that is a request this identity may not make (a job's fault or the
# configuration's, refused as such).
CREDENTIAL_CODES = frozenset(
    {
        "ExpiredToken",
        "ExpiredTokenException",
        "InvalidClientTokenId",
        "UnrecognizedClientException",
        "RequestExpired",
        "InvalidSignatureException",
        "SignatureDoesNotMatch",
        "MissingAuthenticationToken",
        "MissingAuthenticationTokenException",
    }
)
_CREDENTIAL_EXCEPTIONS = (
    botocore.exceptions.NoCredentialsError,
    botocore.exceptions.PartialCredentialsError,
    botocore.exceptions.CredentialRetrievalError,
    botocore.exceptions.TokenRetrievalError,
)


_REFRESH_EVERY_S = 30.0  # fresh clients after refused credentials, at most this often


def map_error(exc: BaseException, service: str, operation: str) -> errors.AwsError:
    """One typed error for any failure of an AWS call."""
    if isinstance(exc, botocore.exceptions.ClientError):
        code, message = error_code(exc.response)
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if is_throttling(code, message):
            return errors.AwsThrottled(service, operation, code, message, status)
        if code in CREDENTIAL_CODES:
            return errors.AwsCredentials(service, operation, code, message, status)
        if code in _SERVER_CODES or (status is not None and status >= 500):
            return errors.AwsServerFault(service, operation, code or str(status), message, status)
        return errors.AwsRejected(service, operation, code or str(status), message, status)
    if isinstance(exc, _CREDENTIAL_EXCEPTIONS):
        return errors.AwsCredentials(service, operation, type(exc).__name__, str(exc))
    if isinstance(exc, botocore.exceptions.NoRegionError):
        return errors.AwsRejected(service, operation, type(exc).__name__, str(exc))
    if isinstance(exc, botocore.exceptions.ProfileNotFound):
        return errors.AwsRejected(service, operation, "ProfileNotFound", str(exc))
    # Connection refused, DNS, timeouts: nothing came back, so nothing is known.
    return errors.AwsUnreachable(service, operation, type(exc).__name__, str(exc))


@dataclass
class _CallState:
    """What the attempts of one call went through (botocore retries inside a call)."""

    ambiguous: bool = False  # an attempt timed out or got a 5xx: it may have taken effect


_call_state: contextvars.ContextVar[_CallState | None] = contextvars.ContextVar(
    "aws_call_state", default=None
)


class AwsApi:
    """One AWS service client, its buckets per operation, and call accounting.

    `single_attempt` operations go through a second client that never retries: for calls that
    are not idempotent (Batch SubmitJob has no token), a botocore retry after a timeout could
    create a second job; such a failure is reported instead, for the caller to settle.
    """

    def __init__(
        self,
        service: str,
        *,
        region_name: str | None,
        profile: str | None,
        max_attempts: int,
        connect_timeout_s: float,
        read_timeout_s: float,
        buckets: Mapping[str, TokenBucket],
        single_attempt: frozenset[str] = frozenset(),
    ) -> None:
        self.service = service
        self._region_name = region_name
        self._profile = profile
        self._config = botocore.config.Config(
            retries={"mode": "standard", "total_max_attempts": max_attempts},
            connect_timeout=connect_timeout_s,
            read_timeout=read_timeout_s,
            max_pool_connections=32,
        )
        self._single_attempt = single_attempt
        self._buckets = dict(buckets)  # operation → bucket
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None
        self._once: Any = None  # the client that never retries, if any operation needs it
        self._starting = asyncio.Lock()
        self._model: ServiceModel | None = None
        self._refreshed_at = -_REFRESH_EVERY_S
        self.calls: Counter[str] = Counter()
        self.throttles: Counter[str] = Counter()

    async def start(self) -> None:
        session = aioboto3.Session(profile_name=self._profile, region_name=self._region_name)
        try:
            self._client = await self._stack.enter_async_context(
                session.client(self.service, config=self._config)
            )
            if self._single_attempt:
                once = self._config.merge(
                    botocore.config.Config(retries={"mode": "standard", "total_max_attempts": 1})
                )
                self._once = await self._stack.enter_async_context(
                    session.client(self.service, config=once)
                )
        except botocore.exceptions.BotoCoreError as exc:
            raise map_error(exc, self.service, "CreateClient") from exc
        self._model = self._client.meta.service_model  # loaded once, by the client
        for client in (self._client, self._once):
            if client is not None:
                client.meta.events.register(f"needs-retry.{self.service}", self._on_attempt)

    async def close(self) -> None:
        await self._stack.aclose()
        self._client = self._once = None

    async def ensure_started(self) -> None:
        """`start`, unless this client is started already (or being started)."""
        if self._client is None:
            async with self._starting:
                if self._client is None:
                    await self.start()

    def _on_attempt(
        self,
        response: Any = None,
        operation: Any = None,
        caught_exception: BaseException | None = None,
        **_: Any,
    ) -> None:
        """Every attempt passes here (botocore's own retries included): a throttled one
        shrinks its bucket; one that may have reached AWS without an answer marks its call
        ambiguous. Returns None: the retry decision stays botocore's."""
        if operation is None:
            return
        state = _call_state.get()
        if response is None:
            if caught_exception is not None and state is not None:
                state.ambiguous = True  # sent, perhaps received, never answered
            return
        status = response[0].status_code if response[0] is not None else None
        if state is not None and status is not None and status >= 500:
            state.ambiguous = True
        code, message = error_code(response[1] or {})
        if is_throttling(code, message):
            self.throttles[operation.name] += 1
            log.warning("aws.throttled", service=self.service, operation=operation.name, code=code)
            if (bucket := self._buckets.get(operation.name)) is not None:
                bucket.throttled()

    async def call(
        self, operation: str, priority: Priority = Priority.NORMAL, **kwargs: Any
    ) -> dict[str, Any]:
        """Call `operation` (e.g. "RunTask") when its bucket allows; raise a typed AwsError
        (`maybe_took_effect` set if any attempt of the call may have reached AWS unanswered).
        A client not started yet is started on first use (CloudWatch Logs: only if asked)."""
        await self.ensure_started()
        bucket = self._buckets.get(operation)
        if bucket is not None:
            await bucket.acquire(priority)
        client = self._once if operation in self._single_attempt else self._client
        method = getattr(client, _snake(operation))
        self.calls[operation] += 1
        state = _CallState()
        token = _call_state.set(state)
        try:
            response: dict[str, Any] = await method(**kwargs)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = map_error(exc, self.service, operation)
            error.maybe_took_effect = state.ambiguous or isinstance(
                error, errors.AwsServerFault | errors.AwsUnreachable
            )
            if isinstance(error, errors.AwsCredentials):
                self._refresh_credentials(error)
            raise error from exc
        finally:
            _call_state.reset(token)
        if bucket is not None:
            bucket.succeeded()
        return response

    def _refresh_credentials(self, error: errors.AwsError) -> None:
        """Credentials refused: the next call goes through clients made afresh, which resolve
        the credential chain again (a rotated key in the environment file, a new profile, a
        role's new session), at most once per `_REFRESH_EVERY_S`. The old clients are closed
        with the rest at `close()`: calls in flight on them finish undisturbed."""
        now = time.monotonic()
        if now - self._refreshed_at < _REFRESH_EVERY_S:
            return
        self._refreshed_at = now
        log.warning(
            "aws.credentials_refused",
            service=self.service,
            operation=error.operation,
            code=error.aws_code,
            action="clients made afresh for the next call",
        )
        self._client = self._once = None

    def operation(self, name: str) -> OperationModel:
        """botocore's model of `name` (available once started)."""
        assert self._model is not None, "start() loads the service model"
        return self._model.operation_model(name)


def _snake(operation: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", operation).lower()


def telemetry(apis: Iterable[AwsApi], buckets: Iterable[TokenBucket]) -> base.Telemetry:
    calls = [
        (api.service, operation, count, api.throttles[operation])
        for api in apis
        for operation, count in sorted(api.calls.items())
    ]
    rates = [(b.name, b.rate_per_s, b.configured_rate_per_s) for b in buckets]
    return base.Telemetry(calls=calls, buckets=rates)


def client_options(settings: AwsBackendSettings) -> dict[str, Any]:
    """The `AwsApi` keyword arguments a backend's settings give."""
    return {
        "region_name": settings.region_name,
        "profile": settings.profile,
        "max_attempts": settings.max_attempts,
        "connect_timeout_s": settings.connect_timeout_s,
        "read_timeout_s": settings.read_timeout_s,
    }
