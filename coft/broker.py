"""An embedded MQTT broker (amqtt) so that `coft demo` needs nothing installed; lines use a real one."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time


class EmbeddedBroker:
    """amqtt on loopback in a background thread; use as a context manager."""

    def __init__(self, port: int = 0):
        if not port:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
        self.port = port
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._serve, name="embedded-broker", daemon=True)
        self.ready = threading.Event()
        self.broker = None

    def _serve(self) -> None:
        from amqtt.broker import Broker

        asyncio.set_event_loop(self.loop)
        self.broker = Broker({"listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}"}},
                              "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}},
                             loop=self.loop)
        self.loop.run_until_complete(self.broker.start())
        self.ready.set()
        self.loop.run_forever()

    def __enter__(self) -> EmbeddedBroker:
        logging.getLogger("amqtt").setLevel(logging.ERROR)
        logging.getLogger("transitions").setLevel(logging.ERROR)
        self.thread.start()
        if not self.ready.wait(15):
            raise RuntimeError("the embedded MQTT broker did not start; pass --broker HOST:PORT to use another")
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self.broker.shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        time.sleep(0.1)
