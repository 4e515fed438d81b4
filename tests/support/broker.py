"""A real Mosquitto for the tests, with the shipped accounts where asked, a subscriber that records what a PLC
would see, and the Prometheus text the runtime serves."""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import paho.mqtt.client as mqtt


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Mosquitto:
    """A real Mosquitto broker on loopback, with persistence so queued QoS 1 messages survive a restart."""

    def __init__(self, workdir: Path, port: int | None = None, settings: str = "allow_anonymous true\n"):
        import shutil

        if shutil.which("mosquitto") is None:
            raise RuntimeError("mosquitto is not installed: apt-get install mosquitto (the tests need a real broker)")
        self.port = port or free_port()
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.conf = workdir / "mosquitto.conf"
        import os

        stay = "user root\n" if os.geteuid() == 0 else ""  # as root it would drop to 'mosquitto', locked out of tmp
        self.conf.write_text(f"{stay}listener {self.port} 127.0.0.1\n{settings}persistence true\n"
                             f"persistence_location {workdir}/\nmax_queued_messages 100000\n")
        self.process = None

    def start(self) -> Mosquitto:
        import socket
        import subprocess
        import time

        self.process = subprocess.Popen(["mosquitto", "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                        stderr=open(self.workdir / "mosquitto.log", "a"))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not start on port {self.port}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


def acl_broker(tmp_path: Path, acl: Path, settings: str = "") -> Mosquitto:
    """A Mosquitto with the shipped accounts (lines l1 and l2, plc, scada, operator; password <user>-pw) and the
    given ACL."""
    passwords = tmp_path / "passwd"
    for i, user in enumerate(("l1", "l2", "plc", "scada", "operator")):
        subprocess.run(["mosquitto_passwd", "-b", *(["-c"] if i == 0 else []), str(passwords), user, f"{user}-pw"],
                       check=True, capture_output=True)
    return Mosquitto(tmp_path / "broker", settings=f"allow_anonymous false\npassword_file {passwords}\n"
                                                   f"acl_file {acl}\n{settings}").start()


class Subscriber:
    """A PLC-like subscriber with a persistent session, so QoS 1 messages wait for it across broker restarts."""

    def __init__(self, port: int, topic: str = "coft/#", username: str | None = None, password: str | None = None):
        self.messages: list[tuple[str, bytes]] = []
        self.lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{username or 'plc'}-{port}",
                                  clean_session=False)
        if username:
            self.client.username_pw_set(username, password)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.2, 1)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        time.sleep(0.3)

    def _on_message(self, client, userdata, message):
        with self.lock:
            self.messages.append((message.topic, message.payload))

    def payloads(self, leaf: str) -> list:
        with self.lock:
            items = list(self.messages)
        out = []
        for topic, payload in items:
            if topic.endswith("/" + leaf):
                try:
                    out.append(json.loads(payload))
                except ValueError:
                    out.append(payload.decode())
        return out

    def wait_for(self, leaf: str, count: int, timeout: float = 30) -> list:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(self.payloads(leaf)) < count:
            time.sleep(0.1)
        return self.payloads(leaf)

    def close(self):
        self.client.loop_stop()
        self.client.disconnect()


def metric(port: int, name: str, camera: str | None = None) -> float | None:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    label = f'{{camera="{camera}"}}' if camera else ""
    for line in text.splitlines():
        if line.startswith(f"{name}{label} "):
            return float(line.split()[-1])
    return None
