"""An asyncio service (the live view, the OPC UA server) on a thread and event loop of its own, so the
inspection loop never waits for it and a failed set-up (a port in use) is known before inspection starts."""

from __future__ import annotations

import asyncio
import threading

from coft.runtime.model.errors import CoftError


class LoopService:
    """Subclasses say how to set up (`setup`, returning what `serve` and `teardown` get), serve and tear down.
    `launch()` returns once set-up is done, raising what it raised; `stop()` ends `serve` and waits for the
    teardown; `alive()` is for the runtime's health check."""

    def __init__(self, name: str):
        self.name = name
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self.stopping = threading.Event()

    async def setup(self):
        raise NotImplementedError

    async def serve(self, resource) -> None:
        """Until stop(): a service that only answers requests has nothing else to do."""
        while not self.stopping.is_set():
            await asyncio.sleep(0.2)

    async def teardown(self, resource) -> None:
        raise NotImplementedError

    def launch(self, timeout_s: float = 60) -> None:
        ready, failure = threading.Event(), []

        def run() -> None:
            self.loop = asyncio.new_event_loop()
            try:
                resource = self.loop.run_until_complete(self.setup())
            except Exception as exc:  # raised again in launch(), on the caller's thread
                failure.append(exc)
                ready.set()
                return
            ready.set()
            try:
                self.loop.run_until_complete(self.serve(resource))
            finally:
                self.loop.run_until_complete(self.teardown(resource))
                self.loop.close()

        self.thread = threading.Thread(target=run, name=self.name, daemon=True)
        self.thread.start()
        if not ready.wait(timeout_s):
            raise CoftError(f"{self.name}: setting up took longer than {timeout_s:.0f}s; see the errors above, or "
                            "the service it waits on (a certificate, a port)")
        if failure:
            raise failure[0]

    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def stop(self, timeout_s: float = 10) -> None:
        self.stopping.set()
        if self.thread is not None and self.thread.is_alive():
            self.thread.join(timeout=timeout_s)
