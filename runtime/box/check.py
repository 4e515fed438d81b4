"""`coft run --check`: everything `coft run` would refuse before it inspects, tried without starting the line,
so that a config that passes the check does not fail at the first start on the box."""

from __future__ import annotations

import os
import socket
import ssl
import time
from pathlib import Path

from coft.runtime.cameras.sources import source_kind
from coft.runtime.comms.mqtt import connect_failure, mqtt_client
from coft.runtime.config import BrokerConfig, RuntimeConfig
from coft.runtime.model.bundle import Bundle, load_bundle
from coft.runtime.model.errors import CoftError

KERNEL_FILESYSTEMS = (Path("/proc"), Path("/sys"), Path("/dev"))


def graph_loads(bundle: Bundle, backend: str = "onnxruntime", threads: int = 1) -> str:
    """Open the bundle's graph with the engine the box would use (a sealed bundle can still hold a graph no
    engine reads); returns the engine's name or raises a one-line CoftError."""
    from coft.runtime.engines import fitted_precision, open_engine
    return open_engine(bundle, backend, threads, fitted_precision(bundle.spec)).name


def writable_file(path: Path, key: str) -> None:
    """A file the runtime will create or rewrite: not a folder, not on a kernel filesystem, and writable (or
    creatable) by this user. Nothing is created here: a check run as root must not leave root's files behind."""
    resolved = path.resolve()
    kernel = next((top for top in KERNEL_FILESYSTEMS if resolved.is_relative_to(top)), None)
    if kernel:
        raise CoftError(f"{key}: {path} is on the kernel's {kernel} filesystem; give a file on a disk, e.g. "
                        "/var/lib/coft/outbox.db")
    if path.is_dir():
        raise CoftError(f"{key}: {path} is a folder; name the file in it, e.g. {path}/{'outbox.db' if 'outbox' in key else 'state.json'}")
    if path.exists():
        if not os.access(path, os.W_OK):
            raise CoftError(f"{key}: {path} is not writable by this user; fix its owner or permissions")
        return
    folder = path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
        raise CoftError(f"{key}: cannot create {path}: {folder} is not a writable folder for this user")


def gstreamer_in_opencv() -> bool:
    import cv2
    return any(line.strip().startswith("GStreamer:") and "YES" in line
               for line in cv2.getBuildInformation().splitlines())


def local_address(address: str, key: str) -> None:
    """An address this box can listen on (0.0.0.0 and its own), or a one-line refusal."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as probe:
            probe.bind((address, 0))
    except OSError as exc:
        raise CoftError(f"{key}: {address!r} is not an address of this box ({exc.strerror or exc}); give one of its "
                        "own, 127.0.0.1 or 0.0.0.0") from None


def distinct_ports(config: RuntimeConfig) -> None:
    """The page, the metrics and OPC UA each need a port of their own."""
    taken: dict[int, str] = {}
    for key, port in (("web.port", config.web.port if config.web else 0), ("metrics_port", config.metrics_port),
                      ("opcua.port", config.opcua.port if config.opcua else 0)):
        if port and port in taken:
            raise CoftError(f"{key} {port} is also {taken[port]}: give each listener a port of its own")
        taken[port] = key


def validate(config: RuntimeConfig) -> None:
    """What `coft run` refuses before anything starts, and `coft run --check` tries first: one function, so the
    two cannot disagree. Raises the first problem as a one-line CoftError."""
    for camera in config.cameras:
        if source_kind(camera) in ("file", "folder") and not Path(str(camera.source)).exists():
            raise CoftError(f"camera {camera.name}: {camera.source} does not exist; give the path of a video file or "
                            "image folder on this box")
        if source_kind(camera) == "gstreamer" and not gstreamer_in_opencv():
            raise CoftError(f"camera {camera.name}: a GStreamer pipeline, and this box's OpenCV was built without "
                            "GStreamer (pip's opencv-python is); install the distribution's python3-opencv or give an "
                            "rtsp:// URL or device instead")
    if not config.broker.host.strip():
        raise CoftError("broker.host is empty; give the broker's host name or address (localhost on the box)")
    config.broker.password()
    if config.web:
        config.web.token()
        local_address(config.web.bind, "web.bind")
    if config.metrics_port:
        local_address(config.metrics_bind, "metrics_bind")
    distinct_ports(config)
    if config.opcua:
        from coft.runtime.comms import opcua_identity
        from coft.runtime.comms.opcua import trusted_fingerprints
        if not config.opcua.allow_anonymous and not (config.opcua.username and config.opcua.password()):
            raise CoftError("opcua: no user a PLC could log in as (username and password_env or password_file), and "
                            "allow_anonymous is false; give the PLC's user, or allow_anonymous: true on a test bench")
        config.opcua.password()
        local_address(config.opcua.bind, "opcua.bind")
        trusted_fingerprints(config.opcua.trusted_clients)
        if config.opcua.certificate.exists() or config.opcua.private_key.exists():  # else made at first start
            opcua_identity.verify(config.opcua.certificate, config.opcua.private_key)
    writable_file(config.outbox.path, "outbox.path")
    writable_file(config.state_path, "state_file")
    for name, block in (("evidence", config.evidence), ("harvest", config.harvest)):
        if block:
            writable_file(block.dir / ".coft-check", f"{name}.dir")


def check(config: RuntimeConfig) -> str:
    """validate, the bundle and its graph on the engine the box would use, and a login to the broker (TLS
    included): raise the first problem as a one-line CoftError, or say what was found."""
    validate(config)
    bundle = load_bundle(config.bundle, config.trusted_keys)
    engine = graph_loads(bundle, config.backend, config.threads or 1)
    return f"{len(config.cameras)} camera(s), model {bundle.model_id} on {engine}, {broker_login(config.broker)}"


def broker_login(broker: BrokerConfig, timeout: float = 5.0) -> str:
    """Connect and log in as the runtime will (its account, its TLS); a refused login or handshake is an error,
    a broker that is away only a note (verdicts wait in the outbox)."""
    where = f"broker {broker.host}:{broker.port}"
    client = mqtt_client(broker, f"{broker.client_id or 'coft-' + broker.line}-check-{os.getpid()}")
    answer: list = []
    client.on_connect = lambda c, userdata, flags, reason_code, properties: answer.append(reason_code)
    try:
        client.connect(broker.host, broker.port, keepalive=broker.keepalive_s)
        deadline = time.monotonic() + timeout
        while not answer and time.monotonic() < deadline:
            client.loop(timeout=0.2)
    except ssl.SSLError as exc:
        raise CoftError(f"{where}: {connect_failure(exc, broker)}") from None
    except OSError as exc:
        return f"{where} NOT reachable now ({connect_failure(exc, broker)}); verdicts wait in the outbox until it is"
    finally:
        client.disconnect()
    if not answer:
        return f"{where} reachable, but it did not answer the login within {timeout:.0f}s"
    if answer[0].is_failure:
        raise CoftError(f"{where} refused the login ({answer[0]}); check broker.username, its password and the "
                        "broker's accounts")
    return f"{where}: logged in as {broker.username or '(anonymous)'}{' over TLS' if broker.tls else ''}"
