"""MQTT for one camera: verdicts from the outbox at QoS 1, a retained status with a Last
Will, live threshold changes and part triggers.

Topics under `<prefix>/<line>/<camera>/`:
  verdict        JSON per inspected frame, QoS 1 (from the outbox)
  reject         minimal JSON for PLCs, QoS 1 (from the outbox)
  status         retained: online / offline (Last Will) / stopped / stalled (frames waited stall_s with no
                 verdict) / failed (another health check failed); the last two come just before exit status 2
  state          retained: current threshold and model, echoed after every change
  heartbeat      QoS 0 every heartbeat_s: counters and outbox depth
  error          QoS 1: a command that was refused, and why
  set/threshold  subscribed unless control.threshold is false: a new threshold for this camera
  trigger        subscribed: a part id (at most control.trigger_max_bytes); the next frame is inspected for it,
                 and the part is answered on `result` within control.trigger_deadline_ms (runtime/line/failsafe.py)
  result         QoS 1, triggered parts only: accept or reject, the reason, trigger-to-answer time
  gap            QoS 1: sequence numbers of verdicts that could not be stored (disk full), sent with the next
                 verdict that could
Under `<prefix>/<line>/`: `trigger` takes {"camera": ..., "part_id": ...} for any camera (one PLC
output for the whole line); a refused one is reported on `<prefix>/<line>/error`.

One paho client per camera, driven by a network thread of ours (so a refused or failed
connection, TLS included, is logged with its cause, and the thread's life is ours to
check). Callbacks are kept thin and guarded: paho re-raises what a callback raises and
its network thread dies with it, while heartbeats would go on saying all is well.
Acks go through a queue to the sender thread, which alone touches the outbox
bookkeeping (paho calls on_publish while holding its own locks).
"""

from __future__ import annotations

import functools
import json
import logging
import queue
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt

from coft.runtime.comms.outbox import Message, Outbox
from coft.runtime.config import BrokerConfig
from coft.runtime.model.errors import CoftError
from coft.runtime.process.logs import Throttled

log = logging.getLogger(__name__)

INFLIGHT_WINDOW = 32


def _path(path: Path | str | None) -> str | None:
    return str(path) if path else None


def camera_topic(broker: BrokerConfig, camera: str, leaf: str) -> str:
    return f"{broker.prefix}/{broker.line}/{camera}/{leaf}"


def connect_failure(exc: OSError, broker: BrokerConfig) -> str:
    """Why a connection attempt failed, and what to check."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS handshake failed (certificate verify failed: {exc.verify_message}); check broker.tls.ca and broker.host"
    if isinstance(exc, ssl.SSLError):
        return f"TLS handshake failed ({exc.reason or exc}); check broker.tls"
    if isinstance(exc, ConnectionResetError) and broker.tls:
        return f"connection reset during the TLS handshake; is port {broker.port} the broker's TLS listener?"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused; is the broker running and listening on that port?"
    return f"{exc.strerror or exc}; check broker.host and the network"


TAKEN_OVER = 0x8E  # MQTT 5's "Session taken over": another client connected with this client id


def mqtt_client(broker: BrokerConfig, client_id: str) -> mqtt.Client:
    """A paho client as the runtime connects: its protocol, account and TLS (`coft run --check` logs in with it)."""
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                         **({"protocol": mqtt.MQTTv5} if broker.protocol == "5"
                            else {"protocol": mqtt.MQTTv311, "clean_session": True}))
    if broker.username:
        client.username_pw_set(broker.username, broker.password())
    if broker.tls:
        try:
            client.tls_set(ca_certs=_path(broker.tls.ca), certfile=_path(broker.tls.cert),
                           keyfile=_path(broker.tls.key), cert_reqs=ssl.CERT_REQUIRED)
        except (OSError, ValueError) as exc:
            raise CoftError(f"broker.tls: cannot load the certificates ({exc}); check tls.ca, tls.cert and tls.key") from None
        client.tls_insecure_set(broker.tls.insecure)
    return client


def _guarded(callback):
    """Run a paho callback; anything it raises is logged and reported on the error topic, and the link lives on."""
    @functools.wraps(callback)
    def guarded(self, *args):
        try:
            return callback(self, *args)
        except Exception as exc:
            self.throttled.log(logging.ERROR, callback.__name__, "mqtt %s: %s failed: %s: %s; the link keeps running",
                               self.name, callback.__name__.lstrip("_"), type(exc).__name__, exc, exc_info=exc)
            self.report(callback.__name__.lstrip("_"), f"{type(exc).__name__}: {exc}")
    return guarded


class Link:
    """One paho client driven by threads of ours: a network thread that connects and reconnects with backoff,
    and a sender that publishes one channel of the outbox in order, removing each message on its ack.

    Subclasses say what a session starts with (`_on_connect`, `session_started`), how a stored message goes
    out (`publish_message`) and where refusals are reported (`report`)."""

    def __init__(self, broker: BrokerConfig, name: str, channel: str, outbox: Outbox, client_id: str):
        self.broker, self.name, self.channel, self.outbox, self.client_id = broker, name, channel, outbox, client_id
        self.throttled = Throttled(log)
        self.connected = threading.Event()
        self.wake = threading.Event()
        self.stopping = threading.Event()  # the sender stops
        self.closing = threading.Event()  # the network thread stops
        self.acks: queue.SimpleQueue[tuple[int, mqtt.ReasonCode]] = queue.SimpleQueue()  # (mid, the broker's answer)
        self.reconnected = threading.Event()
        self.rescan = threading.Event()  # notify_all: held-back messages may go now
        self.connected_at = self.last_ack_at = 0.0
        self.released_at = 0.0  # when messages held back on purpose were last let go: their waiting counts from then
        self.on_connection: Callable[[str, bool], None] = lambda name, up: None
        self.v5 = broker.protocol == "5"
        client = mqtt_client(broker, client_id)
        client.max_inflight_messages_set(INFLIGHT_WINDOW)
        client.max_queued_messages_set(INFLIGHT_WINDOW * 4)  # the outbox, not paho's memory, holds the backlog
        client.on_connect, client.on_disconnect = self._on_connect, self._on_disconnect
        client.on_publish, client.on_message = self._on_publish, self._on_message
        client.on_subscribe = self._on_subscribe
        # The socket is written by the network thread alone: without a write callback, paho's publish() (from the
        # sender, heartbeat or command threads) writes at once from the caller's thread, which on a TLS link meets
        # the network thread inside an SSL read: dropped links ("unexpected eof", "bad record mac") and segfaults.
        # With one, a publish only queues the packet and wakes the network thread's select.
        client.on_socket_register_write = lambda client, userdata, sock: None
        # hears of each publish or subscription the broker refused (MQTT 5 reason codes: its ACL, mostly)
        self.on_refused: Callable[[str, str], None] = lambda name, what: None
        self.client = client
        self.network = threading.Thread(target=self._network_loop, name=f"mqtt-net-{name}", daemon=True)
        self.sender = threading.Thread(target=self._send_loop, name=f"mqtt-{name}", daemon=True)

    # -- what subclasses decide ------------------------------------------------------------------
    def connected_now(self) -> None:
        """The broker accepted the connection (network thread): subscribe, say online."""

    def before_connect(self) -> None:
        """Just before each connection attempt (network thread): e.g. a new Last Will."""

    def session_started(self) -> None:
        """After each (re)connect, before the outbox is resent (sender thread): e.g. birth certificates."""

    def publish_message(self, message: Message) -> mqtt.MQTTMessageInfo:
        return self.client.publish(message.topic, message.payload, qos=1)

    def holding_back(self) -> bool:
        """Whether publish_message holds some messages back on purpose (their waiting is no stall); a subclass
        that lets them go sets released_at."""
        return False

    def saying_goodbye(self) -> None:
        """Still connected, about to disconnect on purpose."""

    def report(self, command: str, error: str) -> None:
        raise NotImplementedError

    @_guarded
    def _on_message(self, client, userdata, message) -> None:
        pass  # a link that subscribes to nothing

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        log.info("mqtt %s: connecting to %s:%d as %s", self.name, self.broker.host, self.broker.port, self.client_id)
        if self.v5:
            self.client.connect_async(self.broker.host, self.broker.port, keepalive=self.broker.keepalive_s,
                                      clean_start=True)
        else:
            self.client.connect_async(self.broker.host, self.broker.port, keepalive=self.broker.keepalive_s)
        self.network.start()
        self.sender.start()

    def stop(self, drain_s: float = 5.0) -> None:
        """Give the outbox up to `drain_s` to reach the broker (reconnecting if need be), say 'stopped', disconnect."""
        deadline = time.monotonic() + drain_s
        while self.outbox.depth(self.channel) and time.monotonic() < deadline and self.network.is_alive():
            time.sleep(0.05)
        self.stopping.set()
        self.wake.set()
        self.sender.join(timeout=2)
        if self.connected.is_set():
            self.saying_goodbye()
        self.closing.set()
        self.client.disconnect()
        self.network.join(timeout=3)

    def health(self, stall_s: float) -> str | None:
        """Why this link cannot be trusted to deliver, or None while it is alive and making progress."""
        for thread in (self.network, self.sender):
            if not thread.is_alive():
                return f"mqtt {self.name}: thread {thread.name} died"
        if not self.connected.is_set():
            return None  # the broker is away: verdicts wait in the outbox, and the broker gauge says so
        oldest = self.outbox.oldest_created(self.channel)
        if oldest is None or self.holding_back():
            return None
        waited = time.time() - max(oldest, self.connected_at, self.last_ack_at, self.released_at)
        if waited > stall_s:
            return (f"mqtt {self.name}: connected but no acknowledgement for {waited:.0f}s with "
                    f"{self.outbox.depth(self.channel)} messages waiting")
        return None

    def _network_loop(self) -> None:
        """Connect, run paho's loop until the connection drops, reconnect with backoff; until stop()."""
        delay = 1.0
        while not self.closing.is_set():
            try:
                self.before_connect()
                self.client.reconnect()
            except OSError as exc:
                self.throttled.log(logging.WARNING, "connect", "mqtt %s: cannot connect to %s:%d: %s; retrying",
                                   self.name, self.broker.host, self.broker.port, connect_failure(exc, self.broker))
                self.closing.wait(delay)
                delay = min(delay * 2, 8.0)
                continue
            rc = mqtt.MQTT_ERR_SUCCESS
            while rc == mqtt.MQTT_ERR_SUCCESS:
                rc = self.client.loop(timeout=0.5)
            if self.connected.is_set():
                delay = 1.0
            self.closing.wait(delay)

    @_guarded
    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            self.throttled.log(logging.ERROR, "connect", "mqtt %s: broker refused the connection: %s; check broker "
                               "credentials and its ACL", self.name, reason_code)
            return
        self.throttled.clear("connect")
        log.info("mqtt %s: connected", self.name)
        self.connected_now()
        self.connected_at = time.time()
        self.reconnected.set()
        self.connected.set()
        self.on_connection(self.name, True)
        self.wake.set()

    @_guarded
    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        if self.stopping.is_set():
            log.info("mqtt %s: disconnected", self.name)
        elif self.connected.is_set() and getattr(reason_code, "value", None) == TAKEN_OVER:
            self.throttled.log(logging.ERROR, "taken-over", "mqtt %s: the broker gave this connection to another "
                               "client with the same client id (%s): a second runtime on this line? stop it, or give "
                               "each box its own broker.client_id and broker.line", self.name, self.client_id)
        elif self.connected.is_set():
            log.warning("mqtt %s: disconnected (%s); verdicts wait in the outbox", self.name, reason_code)
        self.connected.clear()
        self.on_connection(self.name, False)

    @_guarded
    def _on_publish(self, client, userdata, mid, reason_code, properties):
        self.acks.put((mid, reason_code))
        self.wake.set()

    @_guarded
    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        for code in reason_codes:
            if code.is_failure:
                self.refuse(f"subscription refused by the broker ({code})")

    def refuse(self, what: str) -> None:
        """The broker said no: count it, log it (throttled), and say so where the line's watchers look."""
        self.on_refused(self.name, what)
        self.throttled.log(logging.ERROR, ("refused", what), "mqtt %s: %s; check the broker's ACL for user %s "
                           "(deploy/mosquitto/coft.acl)", self.name, what, self.broker.username or "(anonymous)")

    def notify(self) -> None:
        """New messages are in the outbox."""
        self.wake.set()

    def notify_all(self) -> None:
        """Messages held back earlier (publish_message said None) may go now: look at the whole outbox again."""
        self.rescan.set()
        self.wake.set()

    def _send_loop(self) -> None:
        inflight: dict[int, tuple[int, str]] = {}  # paho mid -> (outbox message id, topic)
        held: set[str] = set()  # topics with a message held back: theirs wait for the rescan, in order
        last_sent = 0
        while not self.stopping.is_set():
            self.wake.wait(timeout=0.5)
            self.wake.clear()
            if self.reconnected.is_set():  # resend everything unacked, in order (duplicates carry their seq)
                self.reconnected.clear()
                inflight.clear()
                held.clear()
                last_sent = 0
                try:
                    self.session_started()
                except Exception as exc:  # the session goes on; what it lacks is said
                    self.throttled.log(logging.ERROR, "session", "mqtt %s: starting the session failed: %s: %s",
                                       self.name, type(exc).__name__, exc, exc_info=exc)
            if self.rescan.is_set():
                self.rescan.clear()
                held.clear()
                last_sent = 0
            try:
                last_sent = self._send_pending(inflight, last_sent, held)
            except Exception as exc:  # the outbox's disk, most likely: say so, keep trying
                self.throttled.log(logging.ERROR, "send", "mqtt %s: sending from the outbox failed: %s: %s; retrying",
                                   self.name, type(exc).__name__, exc)
                self.stopping.wait(1.0)
            else:
                self.throttled.clear("send")

    def _send_pending(self, inflight: dict[int, tuple[int, str]], last_sent: int, held: set[str]) -> int:
        """Settle the acks that arrived, then publish what the window has room for; returns the last id sent. A
        topic with a message held back sends nothing more until the rescan: a camera's verdicts never overtake
        each other (a host saw seq 43 before 42 when a camera came back between two passes)."""
        while True:
            try:
                mid, reason = self.acks.get_nowait()
            except queue.Empty:
                break
            sent = inflight.pop(mid, None)
            if sent is not None:
                message_id, topic = sent
                self.outbox.ack(message_id)  # a refused message would be refused again: it leaves, counted
                self.last_ack_at = time.time()
                if reason.is_failure:
                    self.refuse(f"publish to {topic} refused by the broker ({reason})")
        if not self.connected.is_set():
            return last_sent
        room = INFLIGHT_WINDOW - len(inflight)
        flying = {message_id for message_id, _ in inflight.values()}
        for message in self.outbox.pending(self.channel, after_id=last_sent, limit=room) if room > 0 else []:
            if message.id in flying:  # sent, its ack still to come (a rescan sees it again)
                last_sent = message.id
                continue
            info = None if message.topic in held else self.publish_message(message)
            if info is None:  # held back by the link (a Sparkplug device that is dead): it stays in the outbox
                held.add(message.topic)
                last_sent = message.id
                continue
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                break  # not connected any more: the reconnect resends from the outbox
            inflight[info.mid] = (message.id, message.topic)
            last_sent = message.id
        return last_sent


class CameraLink(Link):
    """A camera's verdicts and commands under `<prefix>/<line>/<camera>/`, with a retained status whose Last
    Will says `offline` the moment the runtime's connection drops."""

    def __init__(self, broker: BrokerConfig, camera: str, outbox: Outbox,
                 on_threshold: Callable[[bytes], dict] | None, on_trigger: Callable[[str, str], None],
                 on_connection: Callable[[str, bool], None] = lambda camera, up: None, trigger_max_bytes: int = 256,
                 line_trigger: bool = False, cameras: tuple[str, ...] = ()):
        super().__init__(broker, camera, camera, outbox,
                         f"{broker.client_id}-{camera}" if broker.client_id else f"coft-{broker.line}-{camera}")
        self.camera = camera
        self.line_trigger = line_trigger  # this link also takes the line's trigger topic (one link per runtime does)
        self.cameras = cameras  # the line's: the line link answers a command for any other camera on the line
        self.on_threshold, self.on_trigger, self.on_connection = on_threshold, on_trigger, on_connection
        self.trigger_max_bytes = trigger_max_bytes
        self.on_foreign: Callable[[str, str], None] = lambda camera, epoch: None  # another runtime's heartbeat seen
        self.goodbye = "stopped"  # the retained status left behind on purpose: stalled or failed before exit 2
        self.state: str | None = None  # the last retained state, published again at every reconnect (without
        # persistence a restarted broker has none); the first connect sends what was queued before it
        self.client.will_set(self.topic("status"), "offline", qos=1, retain=True)

    def publish_status(self, status: str) -> None:
        self.client.publish(self.topic("status"), status, qos=1, retain=True)

    def saying_goodbye(self) -> None:
        self.client.publish(self.topic("status"), self.goodbye, qos=1, retain=True).wait_for_publish(timeout=2)

    def topic(self, leaf: str) -> str:
        return camera_topic(self.broker, self.camera, leaf)

    def line_topic(self, leaf: str) -> str:
        return f"{self.broker.prefix}/{self.broker.line}/{leaf}"

    def connected_now(self) -> None:
        self.publish_status("online")
        if self.state and self.connected_at:  # a reconnect: a broker restarted without its store has it again
            self.client.publish(self.topic("state"), self.state, qos=1, retain=True)
        commands = self.line_topic("+/set/threshold") if self.line_trigger else self.topic("set/threshold")
        self.client.subscribe([(self.topic("trigger"), 1)]
                              + ([(commands, 1)] if self.on_threshold or self.line_trigger else [])
                              + ([(self.line_topic("trigger"), 1)] if self.line_trigger else []))
        # another runtime on this line and camera shows itself by its heartbeat's epoch (ours come back over 3.1.1)
        self.client.subscribe(self.topic("heartbeat"), options=mqtt.SubscribeOptions(qos=0, noLocal=self.v5))

    def foreign(self, payload: bytes) -> None:
        """A heartbeat on this camera's topic: another runtime's, where its epoch is not this outbox's."""
        try:
            epoch = json.loads(payload).get("epoch")
        except (ValueError, AttributeError):
            epoch = None
        if epoch and epoch != self.outbox.epoch:
            self.on_foreign(self.camera, str(epoch))
            self.throttled.log(logging.ERROR, "foreign", "mqtt %s: ANOTHER RUNTIME publishes verdicts for line %s, "
                               "camera %s (its epoch %s, this one's %s): their sequence numbers collide; stop one, or "
                               "give each its own broker.line", self.camera, self.broker.line, self.camera, epoch,
                               self.outbox.epoch)

    @_guarded
    def _on_message(self, client, userdata, message):
        if message.topic == self.topic("heartbeat"):
            self.foreign(message.payload)
            return
        if message.topic == self.line_topic("trigger"):
            try:
                camera, part = self.line_part(message.payload)
                self.on_trigger(camera, part)
            except CoftError as exc:
                log.warning("mqtt %s: line trigger refused: %s", self.camera, exc)
                self.report_line("trigger", str(exc))
            return
        command = "set/threshold" if message.topic.endswith("/set/threshold") else "trigger"
        camera = message.topic.split("/")[-3] if command == "set/threshold" else self.camera
        if camera != self.camera:  # the line link's wildcard: another camera's link answers its own
            if camera not in self.cameras:
                self.report_line(f"{camera}/set/threshold",
                                 f"camera {camera!r} is not on this line; cameras: {', '.join(self.cameras)}")
            return
        if command == "set/threshold" and not self.on_threshold:
            self.report(command, "threshold changes are off (control.threshold: false in line.yaml)")
            return
        try:
            if command == "set/threshold":
                self.publish_state(self.on_threshold(message.payload))
            elif command == "trigger":
                self.on_trigger(self.camera, self.part_id(message.payload))
        except CoftError as exc:
            log.warning("mqtt %s: %s refused: %s", self.camera, command, exc)
            self.report(command, str(exc))

    def line_part(self, payload: bytes) -> tuple[str, str]:
        """(camera, part id) from the line's trigger topic: {"camera": "cam1", "part_id": "A-1017"}."""
        if len(payload) > self.trigger_max_bytes + 128:
            raise CoftError(f"line trigger of {len(payload)} bytes is too long (part ids: control.trigger_max_bytes)")
        try:
            message = json.loads(payload)
            camera, part = message["camera"], message["part_id"]
        except (ValueError, TypeError, KeyError):
            raise CoftError('a line trigger is JSON like {"camera": "cam1", "part_id": "A-1017"}') from None
        if not isinstance(camera, str) or not isinstance(part, str):
            raise CoftError("camera and part_id must be strings")
        return camera, self.part_id(part.encode())

    def part_id(self, payload: bytes) -> str:
        if len(payload) > self.trigger_max_bytes:
            raise CoftError(f"part id of {len(payload)} bytes is longer than control.trigger_max_bytes "
                            f"({self.trigger_max_bytes})")
        try:
            part = payload.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise CoftError("part id is not UTF-8 text") from None
        if not part.isprintable():
            raise CoftError("part id holds control characters")
        return part

    def report(self, command: str, error: str) -> None:
        """A refused command or a fault, on the error topic for whoever watches the line."""
        self.client.publish(self.topic("error"), json.dumps({"command": command, "error": error}), qos=1)

    def report_line(self, command: str, error: str) -> None:
        """A refused command that names no camera of this runtime, on the line's error topic."""
        self.client.publish(self.line_topic("error"), json.dumps({"command": command, "error": error}), qos=1)

    def publish_state(self, state: dict) -> None:
        self.state = json.dumps(state)
        self.client.publish(self.topic("state"), self.state, qos=1, retain=True)

    def heartbeat(self, counters: dict) -> None:
        if self.connected.is_set():
            self.client.publish(self.topic("heartbeat"), json.dumps(counters), qos=0)
