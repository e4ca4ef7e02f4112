"""The AWS backends' lease and the nodes' presence on PostgreSQL (issue #16), as SQL: one row
in `leases` whose expiry is on the database's clock and whose fencing token grows at every
acquisition; one row per node in `nodes`. `cluster.Cluster` drives them; the store's writes
check `still_current` in their own transactions (`PostgresStore._fence`)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from asyncpg import Record

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

    _Conn = PoolConnectionProxy[Record]

LEASE = "aws"  # the one lease: who dispatches and tracks the AWS backends
_RETURNING = (
    " RETURNING holder, token, extract(epoch FROM acquired_at), "
    "extract(epoch FROM expires_at), extract(epoch FROM clock_timestamp())"
)


@dataclasses.dataclass(frozen=True, slots=True)
class Lease:
    """The lease as the database holds it; times on the database's clock."""

    holder: str  # the node
    token: int  # the fencing token: one higher at every acquisition
    acquired_at: float
    expires_at: float
    now: float  # the database's clock when it was read

    @property
    def current(self) -> bool:
        return self.expires_at > self.now


def _lease(row: Record | None) -> Lease | None:
    return None if row is None else Lease(str(row[0]), int(row[1]), *map(float, row[2:]))


async def read(conn: _Conn) -> Lease | None:
    return _lease(
        await conn.fetchrow(
            "SELECT holder, token, extract(epoch FROM acquired_at), "
            "extract(epoch FROM expires_at), extract(epoch FROM clock_timestamp()) "
            "FROM leases WHERE name = $1",
            LEASE,
        )
    )


async def acquire(conn: _Conn, node: str, ttl_s: float) -> Lease | None:
    """The lease for `node` if nobody holds it or it lapsed; None if another holds it."""
    return _lease(
        await conn.fetchrow(
            "INSERT INTO leases AS l (name, holder, token, acquired_at, expires_at) "
            "VALUES ($1, $2, 1, clock_timestamp(), clock_timestamp() + $3 * interval '1s') "
            "ON CONFLICT (name) DO UPDATE SET holder = EXCLUDED.holder, "
            "token = l.token + 1, acquired_at = EXCLUDED.acquired_at, "
            "expires_at = EXCLUDED.expires_at WHERE l.expires_at <= clock_timestamp()" + _RETURNING,
            LEASE,
            node,
            ttl_s,
        )
    )


async def renew(conn: _Conn, token: int, ttl_s: float) -> Lease | None:
    """The lease held with `token`, extended; None if it lapsed or passed to another."""
    return _lease(
        await conn.fetchrow(
            "UPDATE leases SET expires_at = clock_timestamp() + $3 * interval '1s' "
            "WHERE name = $1 AND token = $2 AND expires_at > clock_timestamp()" + _RETURNING,
            LEASE,
            token,
            ttl_s,
        )
    )


async def release(conn: _Conn, token: int) -> None:
    await conn.execute(
        "UPDATE leases SET expires_at = clock_timestamp() WHERE name = $1 AND token = $2",
        LEASE,
        token,
    )


async def still_current(conn: _Conn, token: int) -> bool:
    """Whether `token` is the lease's current, unexpired one — the row locked (FOR SHARE) until
    the caller's transaction ends, so that no acquisition commits in between."""
    found: Any = await conn.fetchval(
        "SELECT token FROM leases WHERE name = $1 AND token = $2 "
        "AND expires_at > clock_timestamp() FOR SHARE",
        LEASE,
        token,
    )
    return found is not None


async def heartbeat(conn: _Conn, node: str, host: str, pid: int, version: str) -> None:
    await conn.execute(
        "INSERT INTO nodes (node, started_at, seen_at, pid, version, host) "
        "VALUES ($1, clock_timestamp(), clock_timestamp(), $2, $3, $4) "
        "ON CONFLICT (node) DO UPDATE SET seen_at = clock_timestamp(), "
        "pid = EXCLUDED.pid, version = EXCLUDED.version, host = EXCLUDED.host",
        node,
        pid,
        version,
        host,
    )


@dataclasses.dataclass(frozen=True, slots=True)
class Presence:
    """A node's row: where its daemon said it was, and how long ago (the database's clock)."""

    host: str | None
    pid: int | None
    seen_s_ago: float


async def presence(conn: _Conn, node: str) -> Presence | None:
    row = await conn.fetchrow(
        "SELECT host, pid, extract(epoch FROM clock_timestamp() - seen_at) FROM nodes "
        "WHERE node = $1",
        node,
    )
    if row is None:
        return None
    return Presence(row[0], None if row[1] is None else int(row[1]), float(row[2]))
