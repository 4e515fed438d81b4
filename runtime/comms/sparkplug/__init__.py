"""Sparkplug B (Eclipse Sparkplug 3.0) for SCADA hosts such as Ignition: the box is an edge node, each
camera a device.

    spBv1.0/<group>/NBIRTH/<node>            bdSeq, Node Control/Rebirth, node info; seq 0
    spBv1.0/<group>/DBIRTH/<node>/<camera>   every metric with its name, alias and datatype
    spBv1.0/<group>/DDATA/<node>/<camera>    one per verdict: by exception (what changed), alias only, no datatype;
                                             a verdict captured before this birth (an outage's backlog) carries
                                             its capture time and is_historical
    spBv1.0/<group>/DDEATH/<node>/<camera>   the camera was lost (DBIRTH again when it delivers frames)
    spBv1.0/<group>/NDEATH/<node>            the MQTT Last Will (bdSeq of the session it ends)
    spBv1.0/<group>/NCMD/<node>              Node Control/Rebirth = true: births again
    spBv1.0/<group>/DCMD/<node>/<camera>     Control/Threshold (Double): the guarded threshold path
    spBv1.0/STATE/<primary_host_id>          read: with a primary host, births and data only while it is online;
                                             when it goes offline, NDEATH and a new connection that waits for it

`seq` runs 0-255 over every message of a session, wrapping; bdSeq 0-255 grows with each
connection and survives restarts (a file beside the outbox). Verdicts reach the node through
the same durable outbox as the plain MQTT topics (channel `@sparkplug`), and a DDATA is
encoded when it is sent, so an outage or a restart loses none: they go out after the births
of the next session; a lost camera's verdicts (its fail-safe rejects) wait in the outbox for its DBIRTH. DDATA
goes at QoS 0 as the specification requires (`data_qos: 1` makes
the broker acknowledge each, and sends the births at QoS 1 too, so that none overtakes data). A command with an unknown metric or a wrong type changes
nothing and says why on `<prefix>/<line>/<camera>/error` (or `<prefix>/<line>/error`), once per message; one
message rebirths once at most and has its first COMMAND_METRICS metrics read.
Payloads are protobuf, from `sparkplug_b.proto` in this folder.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt

from coft.runtime.comms.mqtt import Link, _guarded, camera_topic
from coft.runtime.comms.outbox import SPARKPLUG_CHANNEL, Message, Outbox
from coft.runtime.comms.service import Service
from coft.runtime.comms.sparkplug.sparkplug_b_pb2 import DataType, Payload
from coft.runtime.config import BrokerConfig, SparkplugConfig
from coft.runtime.line.verdict import Verdict, plc_field
from coft.runtime.model.errors import CoftError
from coft.runtime.process.metrics import Metrics

log = logging.getLogger(__name__)
__all__ = ["DEVICE_METRICS", "SparkplugNode"]

NAMESPACE = "spBv1.0"
REBIRTH = "Node Control/Rebirth"
THRESHOLD = "Control/Threshold"
# (metric, datatype, from a verdict): what each camera's DBIRTH declares and each DDATA carries
DEVICE_METRICS = [  # (metric, datatype, from a verdict): line/verdict.py's PLC_FIELDS as Sparkplug says them
    ("Verdict/Seq", DataType.UInt64, plc_field("seq")),
    ("Verdict/Epoch", DataType.String, plc_field("epoch", "")),
    ("Verdict/Part ID", DataType.String, plc_field("part_id", "")),
    ("Verdict/Frame ID", DataType.UInt64, plc_field("frame_id")),
    ("Verdict/Reject", DataType.Boolean, plc_field("reject")),
    ("Verdict/Reason", DataType.String, plc_field("reason")),
    ("Verdict/Score", DataType.Double, plc_field("score")),
    ("Verdict/Threshold", DataType.Double, plc_field("threshold")),
    ("Verdict/Box", DataType.String, plc_field("box")),
    ("Verdict/Latency ms", DataType.Double, plc_field("latency_ms")),
    ("Verdict/Time", DataType.DateTime, lambda v: round(plc_field("capture_ts")(v) * 1000)),
]
NODE_ALIASES = {"bdSeq": 1, REBIRTH: 2, "Node Info/Model ID": 3, "Node Info/Line": 4}
COMMAND_METRICS = 64  # metrics read from one NCMD/DCMD: a rebirth, or a threshold, needs one; the rest are refused
# A STATE stamped further ahead of this box's clock than this is judged by its arrival, as if stamped now: a
# retained STATE from a clock that ran ahead must not make every later STATE of the host look older forever.
STATE_SKEW_MS = 60_000


def put(metric: Payload.Metric, datatype: int, value, typed: bool = True) -> None:
    """A metric's value in the field its datatype calls for (is_null for None), and the datatype where `typed`
    (births and commands; 3.0: data messages SHOULD NOT repeat it)."""
    if typed:
        metric.datatype = datatype
    if value is None:
        metric.is_null = True
    elif datatype in (DataType.Int8, DataType.Int16, DataType.Int32, DataType.UInt8, DataType.UInt16, DataType.UInt32):
        metric.int_value = int(value)
    elif datatype in (DataType.Int64, DataType.UInt64, DataType.DateTime):
        metric.long_value = int(value)
    elif datatype == DataType.Float:
        metric.float_value = float(value)
    elif datatype == DataType.Double:
        metric.double_value = float(value)
    elif datatype == DataType.Boolean:
        metric.boolean_value = bool(value)
    else:
        metric.string_value = str(value)


def _value(metric: Payload.Metric):
    return None if metric.is_null else getattr(metric, metric.WhichOneof("value"))


class SparkplugNode(Link, Service):
    def __init__(self, broker: BrokerConfig, config: SparkplugConfig, outbox: Outbox, cameras: list[str],
                 bdseq_file: Path, on_threshold: Callable[[str, float], dict], threshold: Callable[[str], float],
                 verdict_counts: Callable[[str], dict], model_id: Callable[[], str], metrics: Metrics):
        node = config.edge_node_id or f"coft-{broker.line}"
        super().__init__(broker, f"sparkplug {node}", SPARKPLUG_CHANNEL, outbox,
                         f"{broker.client_id or 'coft-' + broker.line}-spb")
        self.config, self.node, self.cameras, self.bdseq_file = config, node, cameras, bdseq_file
        self.on_threshold, self.threshold, self.model_id = on_threshold, threshold, model_id
        self.verdict_counts = verdict_counts  # camera -> {"accepts", "rejects"}: read for every DDATA
        self.metrics = metrics
        self.aliases = {camera: {name: 100 * (i + 1) + k for k, name in
                                 enumerate([m[0] for m in DEVICE_METRICS] + ["Counters/Accepts", "Counters/Rejects",
                                                                             THRESHOLD, "State/Model ID"])}
                        for i, camera in enumerate(cameras)}
        self.last: dict[str, Verdict] = {}  # camera -> last verdict sent, for the values a rebirth declares
        self.reported: dict[str, dict[int, object]] = {}  # camera -> {alias: value} the host holds (by exception)
        self.born_at: dict[str, int] = {}  # camera -> its DBIRTH's timestamp in this session (epoch ms, as sent)
        self.lost: set[str] = set()  # cameras not delivering frames: DDEATH sent, DBIRTH when they are back
        self.seq = 0
        self.connections = self.born_in = 0  # connections made; the one whose births numbered the seq
        self.session_bdseq = self._stored_bdseq()  # the last session's
        self.bdseq = self.session_bdseq
        self.sequence = threading.Lock()  # seq numbers and publishes in one order, whichever thread publishes
        # paho, and the broker towards a host, hold back QoS 1 messages beyond their in-flight limit but send QoS 0
        # at once: with data_qos 1 a QoS 0 rebirth (seq 0) overtook DDATA numbered before it. So every seq-numbered
        # message goes at data_qos (births at 0 as 3.0 says, unless data_qos 1 is asked for), and paho's limit is
        # off here (the outbox's window bounds what is in flight).
        self.client.max_inflight_messages_set(0)
        self.host_online = config.primary_host_id is None  # no primary host: as if one were always online
        self.host_stamp = -1  # the STATE timestamp last taken: older ones (a retained echo) are ignored

    def topic(self, kind: str, device: str | None = None) -> str:
        return f"{NAMESPACE}/{self.config.group_id}/{kind}/{self.node}" + (f"/{device}" if device else "")

    # -- sessions: bdSeq, births, death ------------------------------------------------------------
    def _stored_bdseq(self) -> int:
        try:
            return int(self.bdseq_file.read_text())
        except (OSError, ValueError):
            return -1  # the first connection uses 0

    def before_connect(self) -> None:
        """Each CONNECT starts a new session: the bdSeq after the last session's, in a new NDEATH will. An attempt
        that never reached the broker (no CONNECT sent) leaves the number for the next one."""
        self.bdseq = (self.session_bdseq + 1) % 256
        self.client.will_set(self.topic("NDEATH"), self._death(), qos=1, retain=False)

    def connected_now(self) -> None:
        with self.sequence:  # no DDATA goes out in this connection before its births
            self.connections += 1
            self._forget_last_session()
        self.session_bdseq = self.bdseq
        try:  # kept on disk, so that a restart goes on counting
            tmp = self.bdseq_file.with_name(f".{self.bdseq_file.name}.tmp")
            tmp.write_text(str(self.bdseq))
            os.replace(tmp, self.bdseq_file)
        except OSError as exc:  # a host may then see an older bdSeq after a restart: say so, go on
            self.throttled.log(logging.ERROR, "bdseq", "sparkplug: cannot keep bdSeq in %s (%s)", self.bdseq_file,
                               exc.strerror)
        topics = [(self.topic("NCMD"), 1), (self.topic("DCMD", "+"), 1)]  # QoS 1: the 3.0 spec's MUST
        if self.config.primary_host_id:
            topics.append((f"{NAMESPACE}/STATE/{self.config.primary_host_id}", 1))
        self.client.subscribe(topics)

    def born(self) -> bool:
        """Connected, with this connection's births sent: a host sees our tags as Good."""
        return self.connected.is_set() and self.born_in == self.connections

    def verdict(self, verdict: Verdict) -> None:
        self.notify()  # it is in the outbox, on this node's channel

    def heartbeat(self, beat: int, counters: dict[str, dict]) -> None:
        self.metrics.sparkplug_up.set(int(self.born()))

    def _forget_last_session(self) -> None:
        """paho sends its unacknowledged messages again at the next CONNACK, carrying the last session's seq: a host
        would see old numbers in the new session. The outbox sends them again after the births, numbered anew, so
        paho's copies of our Sparkplug messages are dropped (paho has no public call for it)."""
        with self.client._out_message_mutex:
            for mid, message in list(self.client._out_messages.items()):
                if message.topic.startswith(f"{NAMESPACE}/"):
                    del self.client._out_messages[mid]
            self.client._inflight_messages = sum(
                1 for m in self.client._out_messages.values() if m.state != mqtt.mqtt_ms_queued)

    def _death(self) -> bytes:
        payload = Payload(timestamp=round(time.time() * 1000))
        metric = payload.metrics.add(name="bdSeq", alias=NODE_ALIASES["bdSeq"])
        put(metric, DataType.Int64, self.bdseq)  # Sparkplug 3.0: bdSeq is an Int64
        return payload.SerializeToString()

    def session_started(self) -> None:
        self.births()

    def births(self) -> None:
        """NBIRTH (seq 0) and each camera's DBIRTH, declaring every metric with its alias and current value; with
        a primary host, only while it is online (its STATE brings them when it comes)."""
        if not self.host_online:
            log.info("sparkplug: waiting for primary host %s to be online (%s/STATE/%s) before births; verdicts wait "
                     "in the outbox", self.config.primary_host_id, NAMESPACE, self.config.primary_host_id)
            return
        with self.sequence:
            now = round(time.time() * 1000)
            node = Payload(timestamp=now, seq=0)
            for name, datatype, value in [("bdSeq", DataType.Int64, self.bdseq), (REBIRTH, DataType.Boolean, False),
                                          ("Node Info/Model ID", DataType.String, self.model_id()),
                                          ("Node Info/Line", DataType.String, self.broker.line)]:
                metric = node.metrics.add(name=name, timestamp=now)
                if name != REBIRTH:  # a host asks for a rebirth by name: Node Control/Rebirth carries no alias
                    metric.alias = NODE_ALIASES[name]
                put(metric, datatype, value)
            self.seq, self.born_in = 0, self.connections
            self.client.publish(self.topic("NBIRTH"), node.SerializeToString(), qos=self.config.data_qos)
            for camera in self.cameras:
                if camera not in self.lost:
                    self._device_birth(camera)
        log.info("sparkplug: births published as edge node %s/%s (bdSeq %d)", self.config.group_id, self.node,
                 self.bdseq)

    def _device_birth(self, camera: str) -> None:
        """A camera's DBIRTH (under the seq lock): every metric, typed, named, with its current value."""
        birth = self._device_payload(camera, self.last.get(camera), names=True)
        self.client.publish(self.topic("DBIRTH", camera), birth.SerializeToString(), qos=self.config.data_qos)
        self.born_at[camera] = birth.timestamp  # a verdict stamped before it is history

    def camera_state(self, camera: str, up: bool) -> None:
        """A camera lost is a DDEATH, one found again a DBIRTH (3.0: a host must not keep a dead device's tags
        Good). Called on every state report; acts on changes. Outside a born session only remembered: the next
        births leave a lost camera out."""
        with self.sequence:
            if up == (camera not in self.lost):
                return
            if up:  # set first: its verdicts held back are no stall until they have had stall_s to go
                self.released_at = time.time()
            (self.lost.discard if up else self.lost.add)(camera)
            if self.born_in != self.connections or not self.connected.is_set():
                return
            if up:
                self._device_birth(camera)
                self.notify_all()  # its verdicts held back meanwhile go out now
            else:
                self._numbered(self.topic("DDEATH", camera), Payload(timestamp=round(time.time() * 1000),
                                                                       seq=self._next_seq()))
        log.info("sparkplug: %s for camera %s", "DBIRTH" if up else "DDEATH", camera)

    def holding_back(self) -> bool:
        return bool(self.lost) or not self.host_online  # a lost camera's verdicts wait for its DBIRTH, all for the host

    def _next_seq(self) -> int:
        self.seq = (self.seq + 1) % 256
        return self.seq

    def _device_payload(self, camera: str, verdict: Verdict | None, names: bool, historical: bool = False) -> Payload:
        """A camera's metrics at the next seq: every one, named and typed, for a birth; for data, by alias and
        by exception (those whose value the host does not hold yet); for a historical verdict, its own metrics
        at its capture time, leaving the host's current values alone."""
        now = round(time.time() * 1000)
        payload = Payload(timestamp=now, seq=self._next_seq())
        aliases = self.aliases[camera]
        values = [(name, datatype, read(verdict) if verdict else None) for name, datatype, read in DEVICE_METRICS]
        if not historical:
            counters = self.verdict_counts(camera)
            values += [("Counters/Accepts", DataType.UInt64, counters["accepts"]),
                       ("Counters/Rejects", DataType.UInt64, counters["rejects"]),
                       (THRESHOLD, DataType.Double, self.threshold(camera)),
                       ("State/Model ID", DataType.String, self.model_id())]
        held = self.reported.setdefault(camera, {})
        stamp = round(verdict.capture_ts * 1000) if historical and verdict else now
        for name, datatype, value in values:
            metric = Payload.Metric(alias=aliases[name], timestamp=stamp)
            if names:
                metric.name = name
            put(metric, datatype, value, typed=names)
            if historical:
                metric.is_historical = True
            elif not names and aliases[name] in held and held[aliases[name]] == _value(metric):
                continue  # unchanged: not reported again
            else:
                held[aliases[name]] = _value(metric)
            payload.metrics.append(metric)
        return payload

    def publish_message(self, message: Message) -> mqtt.MQTTMessageInfo:
        """A verdict from the outbox as the camera's DDATA, numbered now (after this session's births); None for
        a lost camera's, which waits in the outbox for its DBIRTH (no data for a dead device)."""
        camera, verdict = message.topic, Verdict.from_json(json.loads(message.payload))
        with self.sequence:
            if self.born_in != self.connections:  # reconnected, births not yet sent: the sender sends them first
                info = mqtt.MQTTMessageInfo(0)
                info.rc = mqtt.MQTT_ERR_NO_CONN
                return info
            if camera in self.lost:
                return None
            # in the milliseconds a host compares: a frame 0.3 ms before the birth is stamped the birth's ms
            historical = round(verdict.capture_ts * 1000) < self.born_at.get(camera, 0)
            data = self._device_payload(camera, verdict, names=False, historical=historical)
            info = self._numbered(self.topic("DDATA", camera), data)
        if not historical:
            self.last[camera] = verdict
        return info

    def _numbered(self, topic: str, data: Payload) -> mqtt.MQTTMessageInfo:
        """Publish a payload that took the next seq; one paho would not take (its queue full, not connected)
        gives its number back, so a host never sees a gap within a session."""
        info = self.client.publish(topic, data.SerializeToString(), qos=self.config.data_qos)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            self.seq = (self.seq - 1) % 256
        return info

    def saying_goodbye(self) -> None:
        self.client.publish(self.topic("NDEATH"), self._death(), qos=1).wait_for_publish(timeout=2)

    def report(self, command: str, error: str, camera: str | None = None) -> None:
        """A refusal or fault in plain JSON on `<prefix>/<line>/<camera>/error` (or the line's), for people and tools."""
        topic = camera_topic(self.broker, camera, "error") if camera else f"{self.broker.prefix}/{self.broker.line}/error"
        self.client.publish(topic, json.dumps({"command": f"sparkplug {command}", "error": error}), qos=1)

    # -- commands -------------------------------------------------------------------------------
    def _host_state(self, payload: bytes) -> None:
        """The primary host's STATE (3.0: JSON, `online` a boolean, `timestamp` integer UTC ms; an older timestamp is
        ignored, a stamp beyond STATE_SKEW_MS ahead of this clock is taken as now)."""
        try:
            state = json.loads(payload)
            online, stamp = state["online"], state["timestamp"]
        except (ValueError, KeyError, TypeError, RecursionError):
            online, stamp = None, None
        if not isinstance(online, bool) or not isinstance(stamp, int) or isinstance(stamp, bool):
            self.throttled.log(logging.WARNING, "state", "sparkplug: primary host STATE %r is not 3.0's JSON "
                               "{\"online\": true|false, \"timestamp\": <integer UTC ms>}: ignored", payload[:100])
            return
        now = round(time.time() * 1000)
        if stamp > now + STATE_SKEW_MS:
            self.throttled.log(logging.WARNING, "state-skew", "sparkplug: primary host STATE is stamped %.0f s ahead "
                               "of this box's clock: taken as stamped now (check the SCADA and box clocks, NTP)",
                               (stamp - now) / 1000)
            stamp = now
        if stamp < self.host_stamp or online == self.host_online:
            self.host_stamp = max(stamp, self.host_stamp)
            return
        if online:  # set first: the backlog held for the host is no stall until it has had stall_s to go
            self.released_at = time.time()
        self.host_stamp, self.host_online = stamp, online
        log.info("sparkplug: primary host %s is %s", self.config.primary_host_id, "online" if online else "offline")
        if online:
            self.births()
            self.notify_all()
        elif self.born_in == self.connections:  # 3.0: the edge node disconnects (and will wait for the host)
            self.client.publish(self.topic("NDEATH"), self._death(), qos=1)
            self.client.disconnect()

    @_guarded
    def _on_message(self, client, userdata, message):
        if message.topic.startswith(f"{NAMESPACE}/STATE/"):
            self._host_state(message.payload)
            return
        device = message.topic.split("/")[4] if message.topic.count("/") == 4 else None
        command = "NCMD" if device is None else "DCMD"
        try:
            payload = Payload.FromString(message.payload)
        except Exception:  # protobuf's DecodeError, and whatever a truncated payload raises
            self._refuse(device, command, "payload is not a Sparkplug B protobuf")
            return
        refused, rebirth = [], False
        for metric in payload.metrics[:COMMAND_METRICS]:
            try:
                if device is None:
                    rebirth = self._node_command(metric) or rebirth
                else:
                    self._device_command(device, metric)
            except CoftError as exc:
                refused.append(str(exc))
        if rebirth:  # once per message, however many metrics ask for it
            log.info("sparkplug: rebirth requested")
            self.births()
        unread = len(payload.metrics) - COMMAND_METRICS
        said = [f"{len(refused)} of its metrics refused; the first: {refused[0]}"] if len(refused) > 1 else refused
        if unread > 0:
            said.append(f"{unread} metrics beyond the first {COMMAND_METRICS} not read (one message carries a "
                        "command or a few)")
        if said:
            self._refuse(device, command, "; ".join(said))

    def _named(self, metric: Payload.Metric, aliases: dict[str, int]) -> str:
        if metric.HasField("name") and metric.name:
            return metric.name
        by_alias = {alias: name for name, alias in aliases.items()}
        if metric.alias in by_alias:
            return by_alias[metric.alias]
        raise CoftError(f"unknown metric alias {metric.alias}")

    def _node_command(self, metric: Payload.Metric) -> bool:
        """Whether the metric asks for a rebirth."""
        name = self._named(metric, NODE_ALIASES)
        if name != REBIRTH:
            raise CoftError(f"unknown node metric {name!r}; the node takes {REBIRTH!r}")
        if metric.WhichOneof("value") != "boolean_value":
            raise CoftError(f"{REBIRTH} must be a Boolean")
        return metric.boolean_value

    def _device_command(self, device: str, metric: Payload.Metric) -> None:
        if device not in self.aliases:
            raise CoftError(f"unknown device {device!r}; devices: {', '.join(self.cameras)}")
        name = self._named(metric, self.aliases[device])
        if name != THRESHOLD:
            raise CoftError(f"metric {name!r} is not writable; only {THRESHOLD!r} is")
        kind = metric.WhichOneof("value")
        if kind not in ("double_value", "float_value"):
            raise CoftError(f"{THRESHOLD} must be a Double or Float, got {kind or 'no value'}")
        self.on_threshold(device, getattr(metric, kind))
        with self.sequence:  # report by exception: the new threshold, at once (or in the births still to come)
            if self.born_in != self.connections or device in self.lost:
                return
            alias = self.aliases[device][THRESHOLD]
            now = round(time.time() * 1000)
            metric = Payload.Metric(alias=alias, timestamp=now)
            put(metric, DataType.Double, self.threshold(device), typed=False)
            self.reported.setdefault(device, {})[alias] = _value(metric)
            self._numbered(self.topic("DDATA", device), Payload(timestamp=now, seq=self._next_seq(), metrics=[metric]))

    def _refuse(self, device: str | None, command: str, error: str) -> None:
        self.throttled.log(logging.WARNING, ("command", device), "sparkplug: %s%s ignored: %s", command,
                           f" for {device}" if device else "", error)
        self.report(command, error, device if device in self.aliases else None)
