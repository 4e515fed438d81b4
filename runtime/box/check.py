"""`coft run --check`: everything `coft run` would refuse before it inspects, tried without starting the line,
so that a config that passes the check does not fail at the first start on the box."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from coft.runtime.cameras.sources import source_kind
from coft.runtime.config import RuntimeConfig
from coft.runtime.model.bundle import Bundle, load_bundle
from coft.runtime.model.errors import CoftError

KERNEL_FILESYSTEMS = (Path("/proc"), Path("/sys"), Path("/dev"))


def graph_loads(bundle: Bundle, backend: str = "onnxruntime", threads: int = 1) -> str:
    """Open the bundle's graph with the engine the box would use (a sealed bundle can still hold a graph no
    engine reads); returns the engine's name or raises a one-line CoftError."""
    from coft.runtime.engines import fitted_precision, open_engine
    return open_engine(bundle, backend, threads, fitted_precision(bundle.manifest)).name


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


def check(config: RuntimeConfig, config_path: Path) -> str:
    """Raise the first problem as a one-line CoftError, or say what was found (the broker's state included)."""
    for camera in config.cameras:
        if source_kind(camera) in ("file", "folder") and not Path(str(camera.source)).exists():
            raise CoftError(f"{config_path}: camera {camera.name}: {camera.source} does not exist; give the path "
                            "of a video file or image folder on this box")
    bundle = load_bundle(config.bundle, config.trusted_keys)
    engine = graph_loads(bundle, config.backend, config.threads or 1)
    config.broker.password()
    if config.web:
        config.web.token()
    if config.opcua:
        from coft.runtime.comms import opcua_identity
        from coft.runtime.comms.opcua import trusted_fingerprints
        config.opcua.password()
        trusted_fingerprints(config.opcua.trusted_clients)
        if config.opcua.certificate.exists() or config.opcua.private_key.exists():  # else made at first start
            opcua_identity.verify(config.opcua.certificate, config.opcua.private_key)
    writable_file(config.outbox.path, "outbox.path")
    writable_file(config.state_path, "state_file")
    for name, block in (("evidence", config.evidence), ("harvest", config.harvest)):
        if block:
            writable_file(block.dir / ".coft-check", f"{name}.dir")
    try:
        socket.create_connection((config.broker.host, config.broker.port), timeout=3).close()
        broker = f"broker {config.broker.host}:{config.broker.port} reachable"
    except OSError as exc:
        broker = (f"broker {config.broker.host}:{config.broker.port} NOT reachable now ({exc.strerror or exc}); "
                  "verdicts wait in the outbox until it is")
    return f"{len(config.cameras)} camera(s), model {bundle.model_id} on {engine}, {broker}"
