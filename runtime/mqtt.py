"""MQTT for one camera: verdicts from the outbox at QoS 1, a retained status with a Last
Will, live threshold changes and part triggers.

Topics under `<prefix>/<line>/<camera>/`:
  verdict        JSON per inspected frame, QoS 1 (from the outbox)
  reject         minimal JSON for PLCs, QoS 1 (from the outbox)
  status         retained: online / offline (Last Will) / stopped
  state          retained: current threshold and model, echoed after every change
  heartbeat      QoS 0 every heartbeat_s: counters and outbox depth
  error          QoS 1: a command that was refused, and why
  set/threshold  subscribed: a new threshold (a positive number)
  trigger        subscribed: a part id; the newest frame is inspected for it

One paho client per camera, callbacks kept thin: acks go through a queue to the sender
thread, which alone touches the outbox bookkeeping (paho calls on_publish while
holding its own locks, so doing more there could deadlock with publish()).
"""

from __future__ import annotations

import json
import logging
import queue
import ssl
import threading
import time
from typing import Callable

import paho.mqtt.client as mqtt

from runtime.config import BrokerConfig
from runtime.outbox import Outbox

log = logging.getLogger(__name__)

INFLIGHT_WINDOW = 32


def camera_topic(broker: BrokerConfig, camera: str, leaf: str) -> str:
    return f"{broker.prefix}/{broker.line}/{camera}/{leaf}"


class CameraLink:
    def __init__(self, broker: BrokerConfig, camera: str, outbox: Outbox,
                 on_threshold: Callable[[bytes], dict], on_trigger: Callable[[str], None],
                 on_connection: Callable[[str, bool], None] = lambda camera, up: None):
        self.broker, self.camera, self.outbox = broker, camera, outbox
        self.on_threshold, self.on_trigger, self.on_connection = on_threshold, on_trigger, on_connection
        self.connected = threading.Event()
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.acks: queue.SimpleQueue[int] = queue.SimpleQueue()
        self.reconnected = threading.Event()
        self.client_id = f"{broker.client_id}-{camera}" if broker.client_id else f"coft-{broker.line}-{camera}"
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=self.client_id, clean_session=True)
        client.will_set(self.topic("status"), "offline", qos=1, retain=True)
        if broker.username:
            client.username_pw_set(broker.username, broker.password())
        if broker.tls:
            client.tls_set(ca_certs=broker.tls.ca and str(broker.tls.ca), certfile=broker.tls.cert and str(broker.tls.cert),
                           keyfile=broker.tls.key and str(broker.tls.key), cert_reqs=ssl.CERT_REQUIRED)
            client.tls_insecure_set(broker.tls.insecure)
        client.max_inflight_messages_set(INFLIGHT_WINDOW)
        client.max_queued_messages_set(INFLIGHT_WINDOW * 4)  # the outbox, not paho's memory, holds the backlog
        client.reconnect_delay_set(min_delay=1, max_delay=8)
        client.on_connect, client.on_disconnect = self._on_connect, self._on_disconnect
        client.on_publish, client.on_message = self._on_publish, self._on_message
        self.client = client
        self.sender = threading.Thread(target=self._send_loop, name=f"mqtt-{camera}", daemon=True)

    def topic(self, leaf: str) -> str:
        return camera_topic(self.broker, self.camera, leaf)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        log.info("mqtt %s: connecting to %s:%d as %s", self.camera, self.broker.host, self.broker.port, self.client_id)
        self.client.connect_async(self.broker.host, self.broker.port, keepalive=self.broker.keepalive_s)
        self.client.loop_start()
        self.sender.start()

    def stop(self, drain_s: float = 5.0) -> None:
        """Give the outbox up to `drain_s` to reach the broker (reconnecting if need be), say 'stopped', disconnect."""
        deadline = time.monotonic() + drain_s
        while self.outbox.depth(self.camera) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.stopping.set()
        self.wake.set()
        self.sender.join(timeout=2)
        if self.connected.is_set():
            self.client.publish(self.topic("status"), "stopped", qos=1, retain=True).wait_for_publish(timeout=2)
        self.client.disconnect()
        self.client.loop_stop()

    # -- paho callbacks (network thread): kept thin --------------------------------------------
    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            log.error("mqtt %s: broker refused the connection: %s; check broker credentials", self.camera, reason_code)
            return
        log.info("mqtt %s: connected", self.camera)
        client.publish(self.topic("status"), "online", qos=1, retain=True)
        client.subscribe([(self.topic("set/threshold"), 1), (self.topic("trigger"), 1)])
        self.reconnected.set()
        self.connected.set()
        self.on_connection(self.camera, True)
        self.wake.set()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        if self.stopping.is_set():
            log.info("mqtt %s: disconnected", self.camera)
        elif self.connected.is_set():
            log.warning("mqtt %s: disconnected (%s); verdicts wait in the outbox", self.camera, reason_code)
        self.connected.clear()
        self.on_connection(self.camera, False)

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        self.acks.put(mid)
        self.wake.set()

    def _on_message(self, client, userdata, message):
        if message.topic.endswith("/set/threshold"):
            state = self.on_threshold(message.payload)
            if "error" in state:
                client.publish(self.topic("error"), json.dumps({"command": "set/threshold", **state}), qos=1)
            else:
                self.publish_state(state)
        elif message.topic.endswith("/trigger"):
            self.on_trigger(message.payload.decode(errors="replace").strip())

    # -- sending -------------------------------------------------------------------------------
    def publish_state(self, state: dict) -> None:
        self.client.publish(self.topic("state"), json.dumps(state), qos=1, retain=True)

    def heartbeat(self, counters: dict) -> None:
        if self.connected.is_set():
            self.client.publish(self.topic("heartbeat"), json.dumps(counters), qos=0)

    def notify(self) -> None:
        """New messages are in the outbox."""
        self.wake.set()

    def _send_loop(self) -> None:
        inflight: dict[int, int] = {}  # paho mid -> outbox message id
        last_sent = 0
        while not self.stopping.is_set():
            self.wake.wait(timeout=0.5)
            self.wake.clear()
            if self.reconnected.is_set():  # resend everything unacked, in order (duplicates carry their seq)
                self.reconnected.clear()
                inflight.clear()
                last_sent = 0
            while True:
                try:
                    mid = self.acks.get_nowait()
                except queue.Empty:
                    break
                message_id = inflight.pop(mid, None)
                if message_id is not None:
                    self.outbox.ack(message_id)
            if not self.connected.is_set():
                continue
            room = INFLIGHT_WINDOW - len(inflight)
            for message in self.outbox.pending(self.camera, after_id=last_sent, limit=room) if room > 0 else []:
                info = self.client.publish(message.topic, message.payload, qos=1)
                if info.rc != mqtt.MQTT_ERR_SUCCESS:
                    break  # not connected any more: the reconnect resends from the outbox
                inflight[info.mid] = message.id
                last_sent = message.id
