"""systemd notifications: READY when the runtime is up, WATCHDOG while its loop turns, STOPPING at the end.

The protocol is one datagram per message to $NOTIFY_SOCKET; outside systemd (no such
variable) every call does nothing. With WatchdogSec= in the unit, a runtime whose main
loop hangs stops feeding the watchdog and systemd restarts it.
"""

from __future__ import annotations

import os
import socket
import time


class Watchdog:
    def __init__(self):
        address = os.environ.get("NOTIFY_SOCKET")
        if address and address.startswith("@"):
            address = "\0" + address[1:]  # abstract namespace
        self.address = address
        usec = int(os.environ.get("WATCHDOG_USEC", "0") or 0)
        self.interval = usec / 2e6 if usec else None  # feed at twice the rate systemd expects
        self.last = 0.0

    def notify(self, message: str) -> None:
        if not self.address:
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(self.address)
            sock.sendall(message.encode())

    def ready(self, status: str) -> None:
        self.notify(f"READY=1\nSTATUS={status}")

    def feed(self) -> None:
        now = time.monotonic()
        if self.interval and now - self.last >= self.interval:
            self.notify("WATCHDOG=1")
            self.last = now

    def stopping(self) -> None:
        self.notify("STOPPING=1")
