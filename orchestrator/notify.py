"""systemd's notify protocol in a few lines: datagrams to $NOTIFY_SOCKET, a no-op when unset."""

from __future__ import annotations

import os
import socket


def send(*assignments: str) -> bool:
    """Send `READY=1`, `STATUS=…`, `WATCHDOG=1`, `STOPPING=1`…; True if a manager listened."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    # Non-blocking: a manager that does not read its queue costs a notification, never a
    # stalled event loop.
    flags = socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
    with socket.socket(socket.AF_UNIX, flags) as sock:
        try:
            sock.sendto("\n".join(assignments).encode(), address)
        except OSError:
            return False
    return True


def watchdog_interval_s() -> float | None:
    """Half of systemd's WATCHDOG_USEC when the watchdog is meant for this process, else None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 1e6 / 2
