"""A fault-injecting reverse proxy for AWS API calls, for tests.

It sits between botocore and moto server (or anything else speaking the AWS wire protocols),
relays every request, counts it by (service, operation), and can answer in the upstream's place:
throttling and other errors in the exact shapes botocore parses, ECS RunTask placement failures,
and ECS ``clientToken`` idempotency, which moto ignores::

    async with FaultProxy(moto.endpoint_url) as proxy:
        proxy.throttle("ecs", "DescribeTasks", times=2)
        ...  # point the client at proxy.endpoint_url

    with ThreadedFaultProxy(moto.endpoint_url) as proxy:  # from synchronous code
        ...

Services are named by their SigV4 signing name (``ecs``, ``batch``, ``logs``, ``ec2``, ``iam``)
and operations by their API name (``DescribeTasks``, ``SubmitJob``). Every public method except
``start``/``close`` is thread-safe, so a test may change the rules while a daemon in another
thread or process talks through the proxy.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import json
import random
import re
import socket
import threading
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from types import TracebackType
from typing import Any, Self, TypedDict, Unpack
from xml.sax.saxutils import escape

import aiohttp
import yarl
from aiohttp import web
from botocore import exceptions as botocore_errors
from botocore import loaders
from multidict import CIMultiDict

OperationKey = tuple[str, str]

ACCOUNT_ID = "123456789012"  # moto's default account
# Headers that describe one connection, not the message: never relayed.
# fmt: off
_HOP_BY_HOP = frozenset({
    "connection", "content-length", "host", "keep-alive", "proxy-authenticate",
    "proxy-authorization", "te", "trailer", "trailers", "transfer-encoding", "upgrade",
})
# fmt: on
_CREDENTIAL_SCOPE = re.compile(r"[^/,\s]+/\d{8}/(?P<region>[^/]+)/(?P<service>[^/]+)/aws4_request")
# How each service reports throttling: (HTTP status, error code, message). Codes are the ones
# botocore's standard retry mode treats as throttling.
_THROTTLES: dict[str, tuple[int, str, str]] = {
    "batch": (429, "TooManyRequestsException", "Too Many Requests"),
    "ec2": (503, "RequestLimitExceeded", "Request limit exceeded."),
    "iam": (400, "Throttling", "Rate exceeded"),
    "sts": (400, "Throttling", "Rate exceeded"),
}
_DEFAULT_THROTTLE = (400, "ThrottlingException", "Rate exceeded")


@dataclasses.dataclass(frozen=True)
class Request:
    """One request as the proxy received it."""

    service: str
    operation: str
    region: str
    method: str
    path_qs: str
    headers: Mapping[str, str]
    body: bytes

    @property
    def key(self) -> OperationKey:
        return (self.service, self.operation)

    def json(self) -> Any:
        """The body parsed as JSON (``{}`` when empty)."""
        return json.loads(self.body) if self.body else {}


@dataclasses.dataclass(frozen=True)
class Reply:
    """A complete HTTP response, canned or relayed."""

    status: int
    body: bytes
    headers: Mapping[str, str]

    def json(self) -> Any:
        return json.loads(self.body) if self.body else {}


Responder = Callable[[Request], Reply]


class When(TypedDict, total=False):
    """Which matching requests a rule answers; see `Rule`."""

    times: int | None
    every: int
    probability: float
    skip: int


@dataclasses.dataclass(eq=False)
class Rule:
    """Answer requests for service/operation (None: any operation) with `respond`.

    Of the matching requests the first `skip` pass through; after that every `every`-th one is
    answered, each with `probability`, at most `times` times in all (None: no limit). Rules are
    tried in the order they were added and the first that answers wins (later rules never see
    that request); a request no rule answers is forwarded. `seen` and `fired` count matching and
    answered requests.
    """

    service: str
    operation: str | None
    respond: Responder
    times: int | None = 1
    every: int = 1
    probability: float = 1.0
    skip: int = 0
    seen: int = 0
    fired: int = 0

    def __post_init__(self) -> None:
        if self.every < 1 or self.skip < 0 or not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"bad rule pattern: {self!r}")

    def matches(self, key: OperationKey) -> bool:
        return key[0] == self.service and self.operation in (None, key[1])

    def decide(self, rng: random.Random) -> bool:
        """Count one matching request; say whether this rule answers it."""
        self.seen += 1
        position = self.seen - self.skip
        if position <= 0 or position % self.every:
            return False
        if self.times is not None and self.fired >= self.times:
            return False
        if self.probability < 1.0 and rng.random() >= self.probability:
            return False
        self.fired += 1
        return True


def error_reply(protocol: str, status: int, code: str, message: str, **fields: Any) -> Reply:
    """An AWS error response in the wire shape of `protocol` (a botocore model protocol)."""
    request_id = str(uuid.uuid4())
    if protocol == "json":
        body = {"__type": code, "message": message, **fields}
        headers = {"Content-Type": "application/x-amz-json-1.1", "x-amzn-RequestId": request_id}
        return Reply(status, json.dumps(body).encode(), headers)
    if protocol == "rest-json":
        headers = {
            "Content-Type": "application/json",
            "x-amzn-ErrorType": code,
            "x-amzn-RequestId": request_id,
        }
        return Reply(status, json.dumps({"message": message, **fields}).encode(), headers)
    error = f"<Code>{escape(code)}</Code><Message>{escape(message)}</Message>"
    if protocol == "ec2":
        xml = (
            f"<Response><Errors><Error>{error}</Error></Errors><RequestID>{request_id}</RequestID>"
        )
        xml += "</Response>"
    elif protocol in ("query", "rest-xml"):
        xml = f"<ErrorResponse><Error><Type>Sender</Type>{error}</Error>"
        xml += f"<RequestId>{request_id}</RequestId></ErrorResponse>"
    else:
        raise ValueError(f"no error shape for protocol {protocol!r}")
    return Reply(status, xml.encode(), {"Content-Type": "text/xml", "x-amzn-RequestId": request_id})


@dataclasses.dataclass(frozen=True)
class _Route:
    placeholders: int
    method: str
    pattern: re.Pattern[str]
    operation: str


@dataclasses.dataclass(frozen=True)
class _ServiceModel:
    protocol: str
    routes: tuple[_Route, ...]  # literal paths first


@dataclasses.dataclass(frozen=True)
class _IssuedTask:
    params: Mapping[str, Any]
    reply: Reply

    @property
    def task_arns(self) -> list[str]:
        tasks = self.reply.json().get("tasks", [])
        return [task["taskArn"] for task in tasks if "taskArn" in task]


@dataclasses.dataclass
class _KeyLock:
    lock: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    users: int = 0


class FaultProxy:
    """A reverse proxy on 127.0.0.1 that counts requests and injects faults by rules."""

    def __init__(
        self,
        upstream_url: str,
        *,
        honour_client_token: bool = False,
        seed: int = 0,
        upstream_timeout_s: float = 30.0,
    ) -> None:
        self._upstream = upstream_url.rstrip("/")
        self._upstream_timeout_s = upstream_timeout_s
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._rng = random.Random(seed)
        self._loader = loaders.create_loader()
        self._models: dict[str, _ServiceModel | None] = {}
        self._honour_client_token = honour_client_token
        self._counts: collections.Counter[OperationKey] = collections.Counter()
        self._forwarded: collections.Counter[OperationKey] = collections.Counter()
        self._recording: set[OperationKey] = set()
        self._recorded: dict[OperationKey, list[Request]] = collections.defaultdict(list)
        self._rules: list[Rule] = []
        self._latency_s: dict[tuple[str, str | None], float] = {}
        self._tokens: dict[tuple[str, str], _IssuedTask] = {}
        self._token_locks: dict[tuple[str, str], _KeyLock] = {}  # touched by the loop only
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._endpoint_url: str | None = None

    # -- lifecycle (call from the proxy's own event loop) --

    async def start(self) -> None:
        app = web.Application(client_max_size=16 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._session = aiohttp.ClientSession(
            auto_decompress=False,
            timeout=aiohttp.ClientTimeout(total=self._upstream_timeout_s),
            skip_auto_headers=("Accept-Encoding", "User-Agent"),
        )
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        try:
            await self._runner.setup()
            await web.SockSite(self._runner, _listening_socket()).start()
            host, port = self._runner.addresses[0][:2]
            self._endpoint_url = f"http://{host}:{port}"
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        # Stop accepting first so no request can reach a closed upstream session.
        self._endpoint_url = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def endpoint_url(self) -> str:
        if self._endpoint_url is None:
            raise RuntimeError("the fault proxy is not started")
        return self._endpoint_url

    # -- observation --

    @property
    def counts(self) -> collections.Counter[OperationKey]:
        """Requests received per (service, operation), answered or forwarded (a snapshot)."""
        with self._lock:
            return self._counts.copy()

    @property
    def forwarded(self) -> collections.Counter[OperationKey]:
        """Requests relayed to the upstream per (service, operation) (a snapshot)."""
        with self._lock:
            return self._forwarded.copy()

    def record(self, service: str, operation: str) -> None:
        """Keep every later request for this operation; read them with `requests`."""
        with self._lock:
            self._recording.add((service, operation))

    def requests(self, service: str, operation: str) -> list[Request]:
        with self._lock:
            return list(self._recorded.get((service, operation), ()))

    def wait_for_count(self, service: str, operation: str, at_least: int, timeout_s: float) -> int:
        """Block until `at_least` such requests arrived; return the count or raise TimeoutError.

        For synchronous code talking to a `ThreadedFaultProxy`; never call it from the proxy's
        own event loop.
        """
        key = (service, operation)
        with self._changed:
            if not self._changed.wait_for(lambda: self._counts[key] >= at_least, timeout_s):
                raise TimeoutError(f"{key}: {self._counts[key]} of {at_least} requests")
            return self._counts[key]

    # -- faults --

    def add_rule(self, rule: Rule) -> Rule:
        with self._lock:
            self._rules.append(rule)
        return rule

    def remove_rule(self, rule: Rule) -> None:
        with self._lock:
            self._rules.remove(rule)

    def throttle(self, service: str, operation: str | None = None, **when: Unpack[When]) -> Rule:
        """Answer with the throttling error `service` really sends (ECS/Logs: 400
        ThrottlingException; Batch: 429 TooManyRequestsException)."""
        status, code, message = _THROTTLES.get(service, _DEFAULT_THROTTLE)
        return self.error(service, operation, status, code, message, **when)

    def ecs_rate_exceeded(self, operation: str = "RunTask", **when: Unpack[When]) -> Rule:
        """ECS passing on EC2 throttling: 400 InvalidParameterException, "... Rate exceeded"."""
        message = "Error retrieving subnet information: Rate exceeded"
        return self.error("ecs", operation, 400, "InvalidParameterException", message, **when)

    def error(
        self,
        service: str,
        operation: str | None,
        status: int,
        code: str,
        message: str,
        **when: Unpack[When],
    ) -> Rule:
        """Answer with an AWS error in the service's protocol (JSON, REST-JSON, XML)."""
        protocol = self._protocol(service)
        error_reply(protocol, status, code, message)  # fail now on an unsupported protocol
        return self.add_rule(
            Rule(service, operation, lambda _: error_reply(protocol, status, code, message), **when)
        )

    def http_5xx(
        self,
        service: str,
        operation: str | None = None,
        status: int = 503,
        code: str = "ServiceUnavailable",
        **when: Unpack[When],
    ) -> Rule:
        """Answer with a 5xx error, which botocore retries whatever its code."""
        return self.error(service, operation, status, code, "Service Unavailable", **when)

    def runtask_failures(self, reason: str = "RESOURCE:MEMORY", **when: Unpack[When]) -> Rule:
        """Answer RunTask with HTTP 200, no tasks and one placement failure."""

        def respond(request: Request) -> Reply:
            cluster = _cluster_name(request.json().get("cluster"))
            instance = f"container-instance/{cluster}/{uuid.uuid4().hex}"
            arn = f"arn:aws:ecs:{request.region}:{ACCOUNT_ID}:{instance}"
            body = {"tasks": [], "failures": [{"arn": arn, "reason": reason}]}
            headers = {"Content-Type": "application/x-amz-json-1.1"}
            return Reply(200, json.dumps(body).encode(), headers)

        return self.add_rule(Rule("ecs", "RunTask", respond, **when))

    def latency(self, service: str, operation: str | None, seconds: float) -> None:
        """Delay every request for the operation (None: the whole service); 0 removes it."""
        with self._lock:
            if seconds > 0:
                self._latency_s[(service, operation)] = seconds
            else:
                self._latency_s.pop((service, operation), None)

    @property
    def honour_client_token(self) -> bool:
        return self._honour_client_token

    @honour_client_token.setter
    def honour_client_token(self, value: bool) -> None:
        with self._lock:
            self._honour_client_token = value

    def reset(self) -> None:
        """Forget counts, recordings, rules, latencies and remembered client tokens."""
        with self._lock:
            self._counts.clear()
            self._forwarded.clear()
            self._recording.clear()
            self._recorded.clear()
            self._rules.clear()
            self._latency_s.clear()
            self._tokens.clear()

    # -- request path (the proxy's event loop) --

    async def _handle(self, http_request: web.Request) -> web.StreamResponse:
        request = self._describe(http_request, await http_request.read())
        with self._changed:
            self._counts[request.key] += 1
            if request.key in self._recording:
                self._recorded[request.key].append(request)
            delay_s = self._latency_s.get(request.key) or self._latency_s.get(
                (request.service, None), 0.0
            )
            rule = next(
                (r for r in self._rules if r.matches(request.key) and r.decide(self._rng)), None
            )
            honour_token = self._honour_client_token
            self._changed.notify_all()
        if delay_s:
            await asyncio.sleep(delay_s)
        if rule is not None:
            reply = rule.respond(request)
        elif honour_token and request.key == ("ecs", "RunTask"):
            reply = await self._run_task_once(request)
        else:
            reply = await self._forward(request)
        return web.Response(status=reply.status, body=reply.body, headers=reply.headers)

    async def _forward(self, request: Request) -> Reply:
        if self._session is None:
            raise RuntimeError("the fault proxy is not started")
        with self._lock:
            self._forwarded[request.key] += 1
        headers = CIMultiDict(
            (k, v) for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP
        )
        url = yarl.URL(self._upstream + request.path_qs, encoded=True)
        try:
            async with self._session.request(
                request.method, url, headers=headers, data=request.body, allow_redirects=False
            ) as response:
                body = await response.read()
                relayed = CIMultiDict(
                    (k, v) for k, v in response.headers.items() if k.lower() not in _HOP_BY_HOP
                )
                return Reply(response.status, body, relayed)
        except (aiohttp.ClientError, TimeoutError) as exc:
            message = f"fault proxy: upstream failed: {exc!r}".encode()
            return Reply(502, message, {"Content-Type": "text/plain"})

    async def _run_task_once(self, request: Request) -> Reply:
        """RunTask as ECS does it: a repeated clientToken (per cluster) returns the first answer.

        Only successful answers are remembered, so a throttled or failed RunTask may be retried
        with the same token. A reused token with other parameters gets ECS's ConflictException:
        botocore's ECS model (2014-11-13) lists it for RunTask with one member, `resourceIds`,
        "the existing task ARNs which are already associated with the clientToken".
        """
        params = request.json()
        token = params.pop("clientToken", None)
        if not isinstance(token, str):
            return await self._forward(request)
        key = (_cluster_name(params.get("cluster")), token)
        async with self._token_guard(key):
            with self._lock:
                issued = self._tokens.get(key)
            if issued is None:
                reply = await self._forward(request)
                if reply.status == 200:
                    with self._lock:
                        self._tokens[key] = _IssuedTask(params, reply)
                return reply
        if issued.params == params:
            return issued.reply
        message = f"The clientToken {token!r} is already in use with different parameters."
        return error_reply("json", 400, "ConflictException", message, resourceIds=issued.task_arns)

    @contextlib.asynccontextmanager
    async def _token_guard(self, key: tuple[str, str]) -> AsyncIterator[None]:
        """Serialise RunTask calls that share a token, so only the first one reaches upstream."""
        entry = self._token_locks.get(key)
        if entry is None:
            entry = self._token_locks[key] = _KeyLock()
        entry.users += 1
        try:
            async with entry.lock:
                yield
        finally:
            entry.users -= 1
            if entry.users == 0:
                del self._token_locks[key]

    def _describe(self, http_request: web.Request, body: bytes) -> Request:
        region, service = _credential_scope(http_request)
        target = http_request.headers.get("X-Amz-Target")
        if target:
            operation = target.rpartition(".")[2]
        else:
            operation = self._operation(service, http_request, body)
        return Request(
            service=service,
            operation=operation,
            region=region,
            method=http_request.method,
            path_qs=http_request.raw_path,
            headers=CIMultiDict(http_request.headers),
            body=body,
        )

    def _operation(self, service: str, http_request: web.Request, body: bytes) -> str:
        action = http_request.query.get("Action")
        if action is None and http_request.content_type == "application/x-www-form-urlencoded":
            action = next(iter(urllib.parse.parse_qs(body.decode()).get("Action", [])), None)
        if action is not None:
            return action
        model = self._model(service)
        path = http_request.raw_path.partition("?")[0]
        for route in model.routes if model else ():
            if route.method == http_request.method and route.pattern.fullmatch(path):
                return route.operation
        return "Unknown"

    def _protocol(self, service: str) -> str:
        model = self._model(service)
        return model.protocol if model else "json"

    def _model(self, service: str) -> _ServiceModel | None:
        with self._lock:
            if service not in self._models:
                self._models[service] = _load_model(self._loader, service)
            return self._models[service]


class ThreadedFaultProxy:
    """A `FaultProxy` on its own event loop in a background thread, for synchronous code.

    ``with ThreadedFaultProxy(url) as proxy:`` yields the running `FaultProxy`; its rule and
    observation methods are thread-safe.
    """

    def __init__(
        self,
        upstream_url: str,
        *,
        honour_client_token: bool = False,
        seed: int = 0,
        timeout_s: float = 10.0,
    ) -> None:
        self.proxy = FaultProxy(upstream_url, honour_client_token=honour_client_token, seed=seed)
        self._timeout_s = timeout_s
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None

    def start(self) -> FaultProxy:
        self._thread = threading.Thread(
            target=asyncio.run, args=(self._serve(),), name="fault-proxy", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(self._timeout_s):
            raise TimeoutError(f"fault proxy not ready within {self._timeout_s} s")
        if self._error is not None:
            self._thread.join(self._timeout_s)
            raise RuntimeError("fault proxy failed to start") from self._error
        return self.proxy

    def stop(self) -> None:
        if self._thread is None:
            return
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(self._timeout_s)
        if self._thread.is_alive():
            raise TimeoutError(f"fault proxy did not stop within {self._timeout_s} s")
        self._thread = None
        if self._error is not None:
            raise RuntimeError("fault proxy failed") from self._error

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            async with self.proxy:
                self._ready.set()
                await self._stop.wait()
        except Exception as exc:  # reported to the starting or stopping thread
            self._error = exc
        finally:
            self._ready.set()


def _credential_scope(http_request: web.Request) -> tuple[str, str]:
    """(region, signing service) from the SigV4 Authorization header or presigned query."""
    headers, query = http_request.headers, http_request.query
    source = headers.get("Authorization") or query.get("X-Amz-Credential", "")
    match = _CREDENTIAL_SCOPE.search(source)
    if match is None:
        return ("unknown", "unknown")
    return (match["region"], match["service"])


def _listening_socket() -> socket.socket:
    """A TCP socket bound to 127.0.0.1 on a port the OS picks; the server takes it over."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
    except BaseException:
        sock.close()
        raise
    return sock


def _cluster_name(cluster: object) -> str:
    """ECS accepts a cluster's name or ARN and defaults to "default"."""
    if not isinstance(cluster, str) or not cluster:
        return "default"
    return cluster.rpartition("/")[2] if cluster.startswith("arn:") else cluster


def _load_model(loader: Any, service: str) -> _ServiceModel | None:
    try:
        model = loader.load_service_model(service, "service-2")
    except botocore_errors.DataNotFoundError:  # an unknown service: no model, no routes
        return None
    routes = [_route(name, op["http"]) for name, op in model["operations"].items()]
    # Literal paths before templated ones, so /v1/tags/{arn} never shadows a fixed path.
    routes.sort(key=lambda route: route.placeholders)
    return _ServiceModel(protocol=model["metadata"]["protocol"], routes=tuple(routes))


def _route(operation: str, http: Mapping[str, str]) -> _Route:
    """Match a botocore requestUri template such as ``/v1/tags/{resourceArn}``."""
    parts = re.split(r"(\{[^}]+\})", http["requestUri"].partition("?")[0])
    regex = "".join(
        (".+" if part.endswith("+}") else "[^/]+") if part.startswith("{") else re.escape(part)
        for part in parts
    )
    placeholders = sum(part.startswith("{") for part in parts)
    return _Route(placeholders, http["method"], re.compile(regex), operation)
