"""What the runtime does with each optional part a config block turns on (web:, opcua:, sparkplug:): one list,
each started, checked, told and stopped the same way. A part that is not configured is not in the list, so the
composition root asks no question about which protocols a line speaks."""

from __future__ import annotations

from coft.runtime.line.verdict import Verdict


class Service:
    """The defaults: a service overrides what it takes part in."""

    def start(self) -> None:
        """Before the cameras: raise a one-line CoftError (a port in use, a certificate) and the line does not start."""

    def health(self, stall_s: float) -> str | None:  # noqa: ARG002  (a link's stall limit; most need none)
        """Why this part cannot be trusted to go on (the runtime exits 2 for systemd), or None."""
        return None

    def verdict(self, verdict: Verdict) -> None:
        """A verdict the outbox has stored: shown or sent; never blocks the inspector."""

    def camera_state(self, camera: str, up: bool) -> None:
        """A camera delivering frames again, or lost."""

    def heartbeat(self, beat: int, counters: dict[str, dict]) -> None:
        """Each heartbeat: the counter a PLC watches and each camera's counters (with broker_connected)."""

    def status_fields(self) -> dict:
        """What it adds to /api/status."""
        return {}

    def stop(self, drain_s: float) -> None:
        """After the cameras: `drain_s` for what is still to be sent."""
