"""OPC UA server (asyncua) for controllers that read a server directly (Siemens S7-1500, Beckhoff ...).

Address space, under Objects/<line> (namespace urn:coft:<line>):
  Heartbeat                 UInt64, +1 per runtime heartbeat: a PLC rejects by default when it stops
  ModelId                   String
  <camera>/Verdict/...      Seq, PartId, FrameId, Result, Reject, Reason, Score, Threshold, Box,
                            LatencyMs, Time, and Json (the whole verdict, one atomic value);
                            written in order, once per verdict, so a subscription with a queue sees every one
  <camera>/Counters/...     Frames, Dropped, Accepts, Rejects
  <camera>/State/...        Camera, BrokerConnected
  <camera>/Threshold        Double; writable (opcua.threshold_writable and control.threshold) through the
                            same guards and AUDIT line as MQTT; a refused value is BadOutOfRange for that
                            node alone (a Write of several nodes changes exactly those answered Good)
  <camera>/Trigger          String, writable on trigger cameras: a part id, answered like an MQTT trigger

Security: Basic256Sha256 (sign and encrypt by default) with the server's certificate (made, self-signed,
on first start if the files do not exist), user name and password, anonymous access off unless the config
says so, and optionally only the client certificates listed in `trusted_clients`. The server runs on its
own thread and event loop; the inspection loop only hands it each verdict.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
from datetime import datetime, timezone
from pathlib import Path

from asyncua import Server, ua
from asyncua.crypto.cert_gen import setup_self_signed_certificate
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.common.utils import ServiceError
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID

from coft.runtime.config import OpcUaConfig
from coft.runtime.errors import CoftError
from coft.runtime.logs import Throttled
from coft.runtime.loops import LoopService

log = logging.getLogger(__name__)
audit = logging.getLogger("coft.audit")

POLICIES = {"Basic256Sha256_SignAndEncrypt": ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
            "Basic256Sha256_Sign": ua.SecurityPolicyType.Basic256Sha256_Sign,
            "None": ua.SecurityPolicyType.NoSecurity}
VERDICT_NODES = [  # (browse name, variant type, from a verdict)
    ("Seq", ua.VariantType.UInt64, lambda v: v["seq"]),
    ("PartId", ua.VariantType.String, lambda v: v.get("part_id") or ""),
    ("FrameId", ua.VariantType.UInt64, lambda v: v.get("frame_id") or 0),
    ("Result", ua.VariantType.String, lambda v: v["verdict"]),
    ("Reject", ua.VariantType.Boolean, lambda v: v["verdict"] == "reject"),
    ("Reason", ua.VariantType.String, lambda v: v.get("reason") or ("score" if v["verdict"] == "reject" else "")),
    ("Score", ua.VariantType.Double, lambda v: float("nan") if v["score"] is None else v["score"]),
    ("Threshold", ua.VariantType.Double, lambda v: v["threshold"]),
    ("Box", ua.VariantType.String, lambda v: json.dumps((v.get("defect") or {}).get("box"))),
    ("LatencyMs", ua.VariantType.Double, lambda v: v.get("latency_ms") or 0.0),
    ("Time", ua.VariantType.DateTime, lambda v: datetime.fromtimestamp(v["capture_ts"], timezone.utc)),
    ("Json", ua.VariantType.String, json.dumps),  # last: a client that sees it has seen the rest
]


def _not_a_refusal(record: logging.LogRecord) -> bool:
    """asyncua logs every refused request at ERROR; ours say which and why, once: keep asyncua's other errors."""
    return not record.getMessage().startswith("sending service fault response")


class Passwords:
    """asyncua's user manager: the one configured user name and password (compared in constant time), or
    anonymous where the config allows it, on a channel secured by one of the configured policies; every refusal
    is logged once per user name.

    asyncua opens a SecurityPolicy None channel whatever policies are configured (discovery needs one) and lets a
    session be activated on it: a client without a certificate then sends the password in clear, and bypasses
    `trusted_clients`. A session's channel without a client certificate is a None channel: refused unless None
    is a configured policy."""

    def __init__(self, username: str | None, password: str | None, anonymous: bool, unsecured: bool,
                 throttled: Throttled):
        self.username, self.password, self.anonymous, self.throttled = username, password, anonymous, throttled
        self.unsecured = unsecured

    def get_user(self, iserver, username=None, password=None, certificate=None):
        if certificate is None and not self.unsecured:
            self.throttled.log(logging.WARNING, ("unsecured", username), "opcua: refused a session for %s on an "
                               "unsecured channel (SecurityPolicy None): connect with Basic256Sha256 and the client's "
                               "certificate", f"user {username!r}" if username else "an anonymous client")
            return None
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


def _per_node_refusals(server: Server) -> None:
    """A value our setter refuses answers that node alone (BadOutOfRange, BadInvalidArgument) in a Good response:
    asyncua turns a setter's exception into a ServiceFault for the whole Write, though the nodes before it were
    changed, so a client was told "failed" about a change that happened (OPC UA Part 4, 5.10.4: per-node results)."""
    aspace = server.iserver.aspace
    write_one = aspace.write_attribute_value

    async def answered(nodeid: ua.NodeId, attr: ua.AttributeIds, value: ua.DataValue) -> ua.StatusCode:
        try:
            return await write_one(nodeid, attr, value)
        except ua.UaStatusCodeError as exc:
            return ua.StatusCode(exc.code)

    aspace.write_attribute_value = answered


class OpcUaServer(LoopService):
    def __init__(self, runtime, config: OpcUaConfig):
        super().__init__("opcua")
        self.runtime, self.config = runtime, config
        self.password = config.password()
        if not config.allow_anonymous and not (config.username and self.password):
            raise CoftError("opcua: give username and password_file (or password_env), or allow_anonymous: true")
        self.trusted = trusted_fingerprints(config.trusted_clients)
        self.throttled = Throttled(log)
        logging.getLogger("asyncua.server.uaprocessor").addFilter(_not_a_refusal)
        self.queue: asyncio.Queue | None = None
        self.nodes: dict[str, dict[str, object]] = {}
        self.heartbeat_node = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Listen, or raise a one-line CoftError (port taken, bad certificate) before inspection starts."""
        try:
            self.launch()
        except Exception as exc:  # a port in use, a certificate it cannot read, asyncua's own complaints
            raise CoftError(f"opcua: cannot serve on {self.config.bind}:{self.config.port} "
                            f"({getattr(exc, 'strerror', None) or exc}); change opcua.port or opcua.bind, "
                            "or check opcua.certificate and opcua.private_key") from None
        log.info("opcua: serving opc.tcp://%s:%d/ (%s; %s)", self.config.bind, self.config.port,
                 ", ".join(self.config.security), "anonymous allowed" if self.config.allow_anonymous else
                 f"user {self.config.username}")

    async def teardown(self, server: Server) -> None:
        await server.stop()

    async def setup(self) -> Server:
        line = self.runtime.config.broker.line
        uri = f"urn:coft:{line}"
        server = Server(user_manager=Passwords(self.config.username, self.password, self.config.allow_anonymous,
                                               "None" in self.config.security, self.throttled))
        await server.init()
        server.set_endpoint(f"opc.tcp://{self.config.bind}:{self.config.port}/")
        server.set_server_name(f"coft {line}")
        await server.set_application_uri(uri)
        policies = [POLICIES[p] for p in self.config.security]
        server.set_security_policy(policies)
        server.set_identity_tokens([ua.UserNameIdentityToken] +
                                   ([ua.AnonymousIdentityToken] if self.config.allow_anonymous else []))
        if any(p != ua.SecurityPolicyType.NoSecurity for p in policies):
            await setup_self_signed_certificate(self.config.private_key, self.config.certificate, uri,
                                                socket.gethostname(), [ExtendedKeyUsageOID.SERVER_AUTH],
                                                {"organizationName": "coft"})
            await server.load_certificate(str(self.config.certificate))
            await server.load_private_key(str(self.config.private_key))
        if self.trusted:
            server.set_certificate_validator(self._validate)
        _per_node_refusals(server)
        index = await server.register_namespace(uri)
        root = await server.nodes.objects.add_object(index, line)
        self.heartbeat_node = await root.add_variable(index, "Heartbeat", 0, ua.VariantType.UInt64)
        self.model_node = await root.add_variable(index, "ModelId", self.runtime.bundle.model_id, ua.VariantType.String)
        writable = self.config.threshold_writable and self.runtime.config.control.threshold
        for camera in self.runtime.config.cameras:
            node = await root.add_object(index, camera.name)
            folders = {name: await node.add_object(index, name) for name in ("Verdict", "Counters", "State")}
            nodes = {f"Verdict/{name}": await folders["Verdict"].add_variable(index, name, "" if kind == ua.VariantType.String
                                                                              else ua.get_default_value(kind), kind)
                     for name, kind, _ in VERDICT_NODES}
            for name in ("Frames", "Dropped", "Accepts", "Rejects"):
                nodes[f"Counters/{name}"] = await folders["Counters"].add_variable(index, name, 0, ua.VariantType.UInt64)
            nodes["State/Camera"] = await folders["State"].add_variable(index, "Camera", "starting", ua.VariantType.String)
            nodes["State/BrokerConnected"] = await folders["State"].add_variable(index, "BrokerConnected", False,
                                                                                 ua.VariantType.Boolean)
            threshold = await node.add_variable(index, "Threshold", self.runtime.threshold_of(camera.name),
                                                ua.VariantType.Double)
            nodes["Threshold"] = threshold
            if writable:
                await threshold.set_writable()
                server.set_attribute_value_setter(threshold.nodeid, self._threshold_setter(camera.name))
            if camera.trigger:
                trigger = await node.add_variable(index, "Trigger", "", ua.VariantType.String)
                await trigger.set_writable()
                server.set_attribute_value_setter(trigger.nodeid, self._trigger_setter(camera.name))
            self.nodes[camera.name] = nodes
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
            if value.Value.Value == self.runtime.threshold_of(camera):  # the heartbeat showing the value in force
                node.attributes[attribute].value = value
                return
            try:  # the same guards, saving and AUDIT line as MQTT; a refusal changes nothing
                state = self.runtime.set_threshold(camera, repr(float(value.Value.Value)), "opcua")
            except (CoftError, TypeError, ValueError) as exc:
                log.warning("opcua: threshold for camera %s refused: %s", camera, exc)
                raise ua.uaerrors.BadOutOfRange from None
            node.attributes[attribute].value = ua.DataValue(ua.Variant(state["threshold"], ua.VariantType.Double))
        return setter

    def _trigger_setter(self, camera: str):
        def setter(node, attribute, value: ua.DataValue) -> None:
            part = str(value.Value.Value or "").strip()
            try:
                self.runtime.trigger_from_plc(camera, part)
            except CoftError as exc:
                log.warning("opcua: trigger for camera %s refused: %s", camera, exc)
                raise ua.uaerrors.BadInvalidArgument from None
            node.attributes[attribute].value = value
        return setter

    # -- from the runtime's threads ---------------------------------------------------------------------
    def publish(self, verdict: dict) -> None:
        """Hand a verdict to the server's loop (in order; nothing here blocks the inspection loop)."""
        if self.loop and self.queue is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (verdict["camera"], verdict))

    def heartbeat(self, beat: int, status: dict) -> None:
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
        await self.model_node.write_value(ua.Variant(self.runtime.bundle.model_id, ua.VariantType.String))
        for camera, c in counters.items():
            nodes = self.nodes[camera]
            for name, key in (("Frames", "frames"), ("Dropped", "dropped"), ("Accepts", "accepts"), ("Rejects", "rejects")):
                await nodes[f"Counters/{name}"].write_value(ua.Variant(int(c[key]), ua.VariantType.UInt64))
            await nodes["State/Camera"].write_value(ua.Variant(c["camera"], ua.VariantType.String))
            await nodes["State/BrokerConnected"].write_value(ua.Variant(c["broker_connected"], ua.VariantType.Boolean))
            await nodes["Threshold"].write_value(ua.Variant(self.runtime.threshold_of(camera), ua.VariantType.Double))

