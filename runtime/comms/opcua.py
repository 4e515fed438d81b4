"""OPC UA server (asyncua) for controllers that read a server directly (Siemens S7-1500, Beckhoff ...).

Address space, under Objects/<line> (namespace urn:coft:<line>), every node with a string NodeId from the line and
camera names that does not move when cameras are added or reordered (ns=<urn:coft:line>;s=l1.cam1.Threshold):
  Heartbeat                 UInt64, +1 per runtime heartbeat: a PLC rejects by default when it stops
  ModelId                   String
  <camera>/Verdict/...      Seq, PartId, FrameId, Result, Reject, Reason, Score, Threshold, Box,
                            LatencyMs, Time, and Json (the whole verdict, one atomic value);
                            written in order, once per verdict, so a subscription with a queue sees every one;
                            BadWaitingForInitialData until the camera's first verdict, never Good zeros
  <camera>/Counters/...     Frames, Dropped, Accepts, Rejects
  <camera>/State/...        Camera, BrokerConnected
  <camera>/Threshold        Double; writable (opcua.threshold_writable and control.threshold) through the
                            same guards and AUDIT line as MQTT, as a Double or a Float (an S7 REAL); a refused
                            value is BadOutOfRange for that node alone (a Write of several nodes changes exactly
                            those answered Good)
  Score, Threshold and LatencyMs carry EngineeringUnits (UNECE) and EURange properties.
  <camera>/Trigger          String, writable on trigger cameras: a part id, answered like an MQTT trigger

Security: Basic256Sha256 (sign and encrypt by default) with the server's certificate (opcua_identity: made once,
kept for years, renewed only by an operator), user name and password, anonymous access off unless the config
says so, and optionally only the client certificates listed in `trusted_clients`. The server runs on its
own thread and event loop; the inspection loop only hands it each verdict.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import socket
import weakref
from datetime import datetime, timezone
from importlib.metadata import version
from pathlib import Path

from asyncua import Server, ua
from asyncua.common.utils import ServiceError
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.crypto.security_policies import SecurityPolicyNone
from asyncua.server.uaprocessor import UaProcessor
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from coft.runtime.comms import opcua_identity
from coft.runtime.comms.loops import LoopService
from coft.runtime.comms.service import Service
from coft.runtime.comms.view import LineControls, LineView
from coft.runtime.config import OpcUaConfig
from coft.runtime.line.verdict import Verdict, plc_field
from coft.runtime.model.errors import CoftError
from coft.runtime.process.logs import Throttled
from coft.runtime.process.metrics import Metrics

log = logging.getLogger(__name__)
audit = logging.getLogger("coft.audit")

POLICIES = {"Basic256Sha256_SignAndEncrypt": ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
            "Basic256Sha256_Sign": ua.SecurityPolicyType.Basic256Sha256_Sign,
            "None": ua.SecurityPolicyType.NoSecurity}
VERDICT_NODES = [  # (browse name, variant type, from a verdict): line/verdict.py's PLC_FIELDS as OPC UA says them
    ("Seq", ua.VariantType.UInt64, plc_field("seq")),
    ("Epoch", ua.VariantType.String, plc_field("epoch", "")),
    ("PartId", ua.VariantType.String, plc_field("part_id", "")),
    ("FrameId", ua.VariantType.UInt64, plc_field("frame_id", 0)),
    ("Result", ua.VariantType.String, plc_field("result")),
    ("Reject", ua.VariantType.Boolean, plc_field("reject")),
    ("Reason", ua.VariantType.String, plc_field("reason")),
    ("Score", ua.VariantType.Double, plc_field("score", float("nan"))),
    ("Threshold", ua.VariantType.Double, plc_field("threshold")),
    ("Box", ua.VariantType.String, plc_field("box")),
    ("LatencyMs", ua.VariantType.Double, plc_field("latency_ms", 0.0)),
    ("Time", ua.VariantType.DateTime, lambda v: datetime.fromtimestamp(plc_field("capture_ts")(v), timezone.utc)),
    ("Json", ua.VariantType.String, plc_field("json")),  # last: a client that sees it has seen the rest
]
UNECE = "http://www.opcfoundation.org/UA/units/un/cefact"
MILLISECOND, ONE = ("C26", "ms"), ("C62", "")  # UNECE common codes; OPC 10000-8, 5.6.3: UnitId from the code's bytes
PRODUCT_URI = "urn:coft:runtime"


def _units(code_and_name: tuple[str, str]) -> ua.EUInformation:
    code, name = code_and_name
    return ua.EUInformation(NamespaceUri=UNECE, UnitId=int.from_bytes(code.encode(), "big"),
                            DisplayName=ua.LocalizedText(name), Description=ua.LocalizedText(name))


def _endpoint_host(config: OpcUaConfig) -> str:
    """The host in the endpoint URL clients are told: never 0.0.0.0, which no client can dial."""
    if config.endpoint_host:
        return config.endpoint_host
    return socket.gethostname() if config.bind in ("0.0.0.0", "::", "") else config.bind


def _not_a_refusal(record: logging.LogRecord) -> bool:
    """asyncua logs every refused request at ERROR; ours say which and why, once: keep asyncua's other errors."""
    return not record.getMessage().startswith("sending service fault response")


class Passwords:
    """asyncua's user manager: the one configured user name and password (compared in constant time), or
    anonymous where the config allows it; every refusal is logged once per user name."""

    def __init__(self, username: str | None, password: str | None, anonymous: bool, throttled: Throttled):
        self.username, self.password, self.anonymous, self.throttled = username, password, anonymous, throttled

    def get_user(self, iserver, username=None, password=None, certificate=None):
        if username is None:
            if self.anonymous:
                return User(role=UserRole.User)
            self.throttled.log(logging.WARNING, "anonymous", "opcua: refused an anonymous session: give the user name "
                               "and password of opcua.username")
            return None
        if self.username and username == self.username and \
                hmac.compare_digest((password or "").encode(), self.password.encode()):
            return User(role=UserRole.User, name=username)
        self.throttled.log(logging.WARNING, ("user", username), "opcua: refused user %r: wrong user name or password",
                           username)
        return None


SECURED_ONLY: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # asyncua servers refusing None channels' sessions
SESSION_REQUESTS = {ua.NodeId(ua.ObjectIds.CreateSessionRequest_Encoding_DefaultBinary),
                    ua.NodeId(ua.ObjectIds.ActivateSessionRequest_Encoding_DefaultBinary)}


def _sessions_on_secured_channels_only(iserver, throttled: Throttled) -> None:
    """asyncua opens a SecurityPolicy None channel whatever policies are configured (discovery needs one) and lets
    a session be created and activated on it: a client then sends the password in clear, and bypasses
    `trusted_clients` (node-opcua did, given the server's endpoint with the security taken out). Spec: a session
    only on an endpoint the server offers (OPC 10000-4, 5.6.2). asyncua has no hook for the channel's policy at
    CreateSession/ActivateSession: its processor is wrapped, once, for the servers listed in SECURED_ONLY."""
    SECURED_ONLY[iserver] = throttled
    if getattr(UaProcessor._process_message, "coft_secured_only", False):
        return
    process = UaProcessor._process_message

    async def secured_only(self, typeid, requesthdr, seqhdr, body):
        if typeid in SESSION_REQUESTS and self.iserver in SECURED_ONLY and \
                self._connection.security_policy.URI == SecurityPolicyNone.URI:
            peer = self.name[0] if isinstance(self.name, tuple) else self.name  # (address, port): once per address
            SECURED_ONLY[self.iserver].log(logging.WARNING, ("unsecured", peer), "opcua: refused a session from %s "
                                           "on an unsecured channel (SecurityPolicy None): connect with "
                                           "Basic256Sha256 and the client's certificate", peer)
            raise ServiceError(ua.StatusCodes.BadSecurityPolicyRejected)
        return await process(self, typeid, requesthdr, seqhdr, body)

    secured_only.coft_secured_only = True
    UaProcessor._process_message = secured_only


def fingerprint(certificate: x509.Certificate) -> bytes:
    return certificate.fingerprint(hashes.SHA256())


def trusted_fingerprints(paths: list[Path]) -> set[bytes]:
    """The client certificates of opcua.trusted_clients, or a one-line CoftError naming the file that is not one."""
    found = set()
    for i, path in enumerate(paths):
        try:
            data = path.read_bytes()
            certificate = x509.load_der_x509_certificate(data) if path.suffix.lower() == ".der" \
                else x509.load_pem_x509_certificate(data)
        except (OSError, ValueError) as exc:
            raise CoftError(f"opcua.trusted_clients.{i}: {path} is not a readable {'DER' if path.suffix.lower() == '.der' else 'PEM'} "
                            f"certificate ({getattr(exc, 'strerror', None) or str(exc).splitlines()[0]}); export the "
                            "PLC's certificate again (.der or .pem)") from None
        found.add(fingerprint(certificate))
    return found


WIDENED = {ua.VariantType.Float, ua.VariantType.Int16, ua.VariantType.UInt16, ua.VariantType.Int32,
           ua.VariantType.UInt32}


def _per_node_refusals(server: Server, double_writes: set[ua.NodeId]) -> None:
    """A value our setter refuses answers that node alone (BadOutOfRange, BadInvalidArgument) in a Good response:
    asyncua turns a setter's exception into a ServiceFault for the whole Write, though the nodes before it were
    changed, so a client was told "failed" about a change that happened (OPC UA Part 4, 5.10.4: per-node results).
    A Float or integer written to one of `double_writes` is taken as a Double: an S7 writes a REAL, and asyncua
    would answer BadTypeMismatch."""
    aspace = server.iserver.aspace
    write_one = aspace.write_attribute_value

    async def answered(nodeid: ua.NodeId, attr: ua.AttributeIds, value: ua.DataValue) -> ua.StatusCode:
        if nodeid in double_writes and value.Value is not None and value.Value.VariantType in WIDENED:
            value = ua.DataValue(ua.Variant(float(value.Value.Value), ua.VariantType.Double), value.StatusCode,
                                 value.SourceTimestamp, value.ServerTimestamp)
        try:
            return await write_one(nodeid, attr, value)
        except ua.UaStatusCodeError as exc:
            return ua.StatusCode(exc.code)

    aspace.write_attribute_value = answered


class OpcUaServer(LoopService, Service):
    def __init__(self, view: LineView, controls: LineControls, config: OpcUaConfig, metrics: Metrics):
        """`view`: what the server shows (comms/view.py); `controls`: what a PLC may write."""
        super().__init__("opcua")
        self.view, self.controls, self.config, self.metrics = view, controls, config, metrics
        self.password = config.password()
        if not config.allow_anonymous and not (config.username and self.password):
            raise CoftError("opcua: give username and password_file (or password_env), or allow_anonymous: true")
        self.trusted = trusted_fingerprints(config.trusted_clients)
        self.throttled = Throttled(log)
        logging.getLogger("asyncua.server.uaprocessor").addFilter(_not_a_refusal)
        self.queue: asyncio.Queue | None = None
        self.nodes: dict[str, dict[str, object]] = {}
        self.heartbeat_node = None
        self.certificate: x509.Certificate | None = None  # the server's, once made or loaded (SecurityPolicy None: none)

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Listen, or raise a one-line CoftError (port taken, bad certificate) before inspection starts."""
        try:
            self.launch()
        except Exception as exc:  # a port in use, a certificate it cannot read, asyncua's own complaints
            raise CoftError(f"opcua: cannot serve on {self.config.bind}:{self.config.port} "
                            f"({getattr(exc, 'strerror', None) or exc}); change opcua.port or opcua.bind, "
                            "or check opcua.certificate and opcua.private_key") from None
        log.info("opcua: serving opc.tcp://%s:%d/ on %s (%s; %s)", _endpoint_host(self.config), self.config.port,
                 self.config.bind, ", ".join(self.config.security), "anonymous allowed" if self.config.allow_anonymous
                 else f"user {self.config.username}")
        if self.certificate is not None:  # made or loaded by now; it does not change while the server runs
            self.metrics.opcua_certificate_expiry.set(self.certificate.not_valid_after_utc.timestamp())

    def health(self, stall_s: float) -> str | None:  # noqa: ARG002
        return None if self.alive() else "the OPC UA server stopped"

    async def teardown(self, server: Server) -> None:
        await server.stop()

    async def setup(self) -> Server:
        line = self.view.config.broker.line
        uri = f"urn:coft:{line}"
        server = Server(user_manager=Passwords(self.config.username, self.password, self.config.allow_anonymous,
                                               self.throttled))
        if "None" not in self.config.security:
            _sessions_on_secured_channels_only(server.iserver, self.throttled)
        server.product_uri, server.manufacturer_name = PRODUCT_URI, "coft"
        await server.init()
        server.set_endpoint(f"opc.tcp://{_endpoint_host(self.config)}:{self.config.port}/")
        server.socket_address = (self.config.bind, self.config.port)
        server.set_server_name(f"coft {line}")
        await server.set_application_uri(uri)
        software = version("coft")
        await server.set_build_info(PRODUCT_URI, "coft", "coft runtime", software, software,
                                    datetime.fromtimestamp(Path(__file__).stat().st_mtime, timezone.utc))
        policies = [POLICIES[p] for p in self.config.security]
        server.set_security_policy(policies)
        server.set_identity_tokens([ua.UserNameIdentityToken] +
                                   ([ua.AnonymousIdentityToken] if self.config.allow_anonymous else []))
        if any(p != ua.SecurityPolicyType.NoSecurity for p in policies):
            self.certificate = opcua_identity.ensure(self.config.certificate, self.config.private_key, uri,
                                                     f"coft {line}")
            await server.load_certificate(str(self.config.certificate))
            await server.load_private_key(str(self.config.private_key))
        if self.trusted:
            server.set_certificate_validator(self._validate)
        index = await server.register_namespace(uri)
        root = await server.nodes.objects.add_object(ua.NodeId(line, index), ua.QualifiedName(line, index))

        async def variable(parent, path: str, value, kind: ua.VariantType):
            name = path.rsplit(".", 1)[-1]
            return await parent.add_variable(ua.NodeId(f"{line}.{path}", index), ua.QualifiedName(name, index),
                                             value, kind)

        self.heartbeat_node = await variable(root, "Heartbeat", 0, ua.VariantType.UInt64)
        self.model_node = await variable(root, "ModelId", self.view.model_id, ua.VariantType.String)
        writable = self.config.threshold_writable and self.view.config.control.threshold
        waiting = ua.DataValue(StatusCode=ua.StatusCode(ua.StatusCodes.BadWaitingForInitialData))
        bounds = self.view.thresholds
        ranges = {"Score": (ONE, 0.0, bounds.high), "Threshold": (ONE, bounds.low, bounds.high),
                  "LatencyMs": (MILLISECOND, 0.0, float(self.view.config.control.trigger_deadline_ms))}
        doubles = set()
        for camera in self.view.config.cameras:
            name = camera.name
            node = await root.add_object(ua.NodeId(f"{line}.{name}", index), ua.QualifiedName(name, index))
            folders = {folder: await node.add_object(ua.NodeId(f"{line}.{name}.{folder}", index),
                                                     ua.QualifiedName(folder, index))
                       for folder in ("Verdict", "Counters", "State")}
            nodes = {}
            for leaf, kind, _ in VERDICT_NODES:
                nodes[f"Verdict/{leaf}"] = await variable(folders["Verdict"], f"{name}.Verdict.{leaf}",
                                                          ua.get_default_value(kind), kind)
                await nodes[f"Verdict/{leaf}"].write_value(waiting)
            for leaf in ("Frames", "Dropped", "Accepts", "Rejects"):
                nodes[f"Counters/{leaf}"] = await variable(folders["Counters"], f"{name}.Counters.{leaf}", 0,
                                                           ua.VariantType.UInt64)
            nodes["State/Camera"] = await variable(folders["State"], f"{name}.State.Camera", "starting",
                                                   ua.VariantType.String)
            nodes["State/BrokerConnected"] = await variable(folders["State"], f"{name}.State.BrokerConnected", False,
                                                            ua.VariantType.Boolean)
            threshold = await variable(node, f"{name}.Threshold", self.view.threshold_of(name),
                                       ua.VariantType.Double)
            nodes["Threshold"] = threshold
            for analog, (units, low, high) in ranges.items():  # the standard properties' names are in namespace 0
                target = threshold if analog == "Threshold" else nodes[f"Verdict/{analog}"]
                at = target.nodeid.Identifier
                await target.add_property(ua.NodeId(f"{at}.EngineeringUnits", index),
                                          ua.QualifiedName("EngineeringUnits", 0), _units(units))
                await target.add_property(ua.NodeId(f"{at}.EURange", index), ua.QualifiedName("EURange", 0),
                                          ua.Range(low, high))
            if writable:
                await threshold.set_writable()
                server.set_attribute_value_setter(threshold.nodeid, self._threshold_setter(name))
                doubles.add(threshold.nodeid)
            if camera.trigger:
                trigger = await variable(node, f"{name}.Trigger", "", ua.VariantType.String)
                await trigger.set_writable()
                server.set_attribute_value_setter(trigger.nodeid, self._trigger_setter(name))
            self.nodes[name] = nodes
        _per_node_refusals(server, doubles)
        await server.start()
        self.queue = asyncio.Queue()
        return server

    async def serve(self, server: Server) -> None:
        """Write verdicts in the order they came, until stop()."""
        while not self.stopping.is_set():
            try:
                camera, verdict = await asyncio.wait_for(self.queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                continue
            nodes = self.nodes[camera]
            for name, kind, read in VERDICT_NODES:
                await nodes[f"Verdict/{name}"].write_value(ua.Variant(read(verdict), kind))

    async def _validate(self, certificate: x509.Certificate, description: ua.ApplicationDescription) -> None:
        if fingerprint(certificate) not in self.trusted:
            self.throttled.log(logging.WARNING, ("certificate", description.ApplicationUri),
                               "opcua: refused client %s: its certificate is not in opcua.trusted_clients",
                               description.ApplicationUri)
            raise ServiceError(ua.StatusCodes.BadCertificateUntrusted)

    # -- writes from clients (the server's event loop) -----------------------------------------------
    def _threshold_setter(self, camera: str):
        def setter(node, attribute, value: ua.DataValue) -> None:
            if value.Value.Value == self.view.threshold_of(camera):  # the heartbeat showing the value in force
                node.attributes[attribute].value = value
                return
            try:  # the same guards, saving and AUDIT line as MQTT; a refusal changes nothing
                state = self.controls.set_threshold(camera, repr(float(value.Value.Value)), "opcua")
            except (CoftError, TypeError, ValueError) as exc:
                log.warning("opcua: threshold for camera %s refused: %s", camera, exc)
                raise ua.uaerrors.BadOutOfRange from None
            node.attributes[attribute].value = ua.DataValue(ua.Variant(state["threshold"], ua.VariantType.Double))
        return setter

    def _trigger_setter(self, camera: str):
        def setter(node, attribute, value: ua.DataValue) -> None:
            part = str(value.Value.Value or "").strip()
            try:
                self.controls.trigger(camera, part)
            except CoftError as exc:
                log.warning("opcua: trigger for camera %s refused: %s", camera, exc)
                raise ua.uaerrors.BadInvalidArgument from None
            node.attributes[attribute].value = value
        return setter

    # -- from the runtime's threads ---------------------------------------------------------------------
    def verdict(self, verdict: Verdict) -> None:
        """Hand a verdict to the server's loop (in order; nothing here blocks the inspection loop)."""
        if self.loop and self.queue is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (verdict.camera, verdict))

    def heartbeat(self, beat: int, status: dict) -> None:
        self.metrics.opcua_up.set(int(self.alive()))
        if self.loop and not self.loop.is_closed():
            asyncio.run_coroutine_threadsafe(self._heartbeat(beat, status), self.loop).add_done_callback(self._said)

    def _said(self, done) -> None:
        """A heartbeat that could not be written is logged: its node then stands still, and the PLC rejects."""
        if not done.cancelled() and done.exception() is not None:
            exc = done.exception()
            self.throttled.log(logging.ERROR, "heartbeat", "opcua: cannot update the heartbeat and counters: %s: %s",
                               type(exc).__name__, exc)

    async def _heartbeat(self, beat: int, counters: dict) -> None:
        await self.heartbeat_node.write_value(ua.Variant(beat, ua.VariantType.UInt64))
        await self.model_node.write_value(ua.Variant(self.view.model_id, ua.VariantType.String))
        for camera, c in counters.items():
            nodes = self.nodes[camera]
            for name, key in (("Frames", "frames"), ("Dropped", "dropped"), ("Accepts", "accepts"), ("Rejects", "rejects")):
                await nodes[f"Counters/{name}"].write_value(ua.Variant(int(c[key]), ua.VariantType.UInt64))
            await nodes["State/Camera"].write_value(ua.Variant(c["camera"], ua.VariantType.String))
            await nodes["State/BrokerConnected"].write_value(ua.Variant(c["broker_connected"], ua.VariantType.Boolean))
            await nodes["Threshold"].write_value(ua.Variant(self.view.threshold_of(camera), ua.VariantType.Double))

