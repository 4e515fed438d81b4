"""The runtime's one YAML file, validated on load: unknown keys are errors, and every
error names the key and its line so an integrator can fix it without reading code.
See deploy/line.yaml for an annotated example.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from coft.runtime.model.errors import CoftError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)  # .inf or .nan is never a setting


RESERVED_CAMERA_NAMES = ("good", "defect", "feedback", "feedback-defect")  # folders the harvest and evidence keep labels in


class CameraConfig(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$", description="used in MQTT topics and logs")
    source: str | int = Field(description="USB index or /dev/videoN, rtsp:// URL, GStreamer pipeline ending in appsink, video file, or image folder")
    kind: Literal["auto", "usb", "rtsp", "gstreamer", "file", "folder"] = "auto"
    roi: tuple[int, int, int, int] | None = Field(None, description="x, y, width, height crop before resizing")
    loop: bool = Field(False, description="replay a video file or folder forever (testing)")
    fps: float | None = Field(None, gt=0, description="inspect at most this many frames per second (a file or folder "
                                                     "replays at this pace; without it, at the engine's, dropping none)")
    trigger: bool = Field(False, description="inspect only the newest frame when an MQTT trigger with a part id arrives")
    reconnect_max_s: float = Field(30.0, gt=0, description="longest wait between reconnect attempts")
    open_timeout_s: float = Field(10.0, gt=0)

    @field_validator("name")
    @classmethod
    def _not_a_label(cls, name):
        if name.lower() in RESERVED_CAMERA_NAMES:
            raise ValueError(f"{name!r} is the name of a folder the harvest keeps labelled frames in "
                             f"({', '.join(RESERVED_CAMERA_NAMES)}); name the camera after its station, e.g. {name}-cam")
        return name

    @field_validator("roi")
    @classmethod
    def _roi_positive(cls, roi):
        if roi is not None and (roi[2] <= 0 or roi[3] <= 0 or roi[0] < 0 or roi[1] < 0):
            raise ValueError("roi is x, y, width, height with x, y >= 0 and width, height > 0")
        return roi


class TlsConfig(Strict):
    ca: Path | None = Field(None, description="CA certificate that signed the broker's (default: the system's)")
    cert: Path | None = None
    key: Path | None = None
    insecure: bool = Field(False, description="skip hostname verification (test benches only)")


class BrokerConfig(Strict):
    host: str = "localhost"
    port: int = Field(1883, ge=1, le=65535)
    client_id: str | None = Field(None, description="default: coft-<line>-<camera>")
    username: str | None = None
    password_env: str | None = Field(None, description="environment variable holding the password")
    password_file: Path | None = Field(None, description="file holding the password (e.g. a Docker or systemd secret)")
    tls: TlsConfig | None = None
    keepalive_s: int = Field(30, ge=5)
    protocol: Literal["5", "3.1.1"] = Field("5", description="MQTT version: 5 tells the runtime when the broker "
                                                             "refuses a publish or a subscription (its ACL); 3.1.1 "
                                                             "brokers acknowledge refused messages silently")
    prefix: str = Field("coft", pattern=r"^[^#+/\x00]([^#+\x00]*[^#+/\x00])?$",
                        description="topic prefix: no MQTT wildcards (# +), no leading or trailing /")
    line: str = Field("line1", pattern=r"^[A-Za-z0-9_-]+$")

    @model_validator(mode="after")
    def _password_needs_user(self):
        if (self.password_env or self.password_file) and not self.username:
            raise ValueError("password_env/password_file given without username")
        if self.password_env and self.password_file:
            raise ValueError("give password_env or password_file, not both")
        return self

    def password(self) -> str | None:
        return secret(self.password_env, self.password_file, "broker.password")


def secret(env: str | None, file: Path | None, key: str) -> str | None:
    """A password or token from an environment variable or a file (a Docker or systemd secret), never the config."""
    if env:
        if env not in os.environ:
            raise CoftError(f"{key}_env: environment variable {env} is not set")
        return os.environ[env]
    if file:
        try:
            value = file.read_text().strip()
        except OSError as exc:
            raise CoftError(f"{key}_file: cannot read {file} ({exc.strerror})") from exc
        if not value:
            raise CoftError(f"{key}_file: {file} is empty; put the secret in it (one line)")
        return value
    return None


class OutboxConfig(Strict):
    path: Path = Path("/var/lib/coft/outbox.db")
    max_messages: int = Field(100_000, ge=100, description="when full, the oldest accept verdicts go first; rejects last")
    max_mb: float = Field(256, gt=0, description="the same rule once the messages waiting hold this many megabytes")
    fsync: bool = Field(True, description="fsync every verdict: survives power loss; false: survives crashes and "
                                          "restarts but not power loss, and saves a disk flush per verdict")
    reserve_mb: float = Field(64, ge=0, description="free space kept for verdicts on the outbox's filesystem: "
                                                    "harvest, evidence and commissioning frames stop writing first "
                                                    "(SQLite's write-ahead log alone takes up to ~4 MB)")


class EvidenceConfig(Strict):
    dir: Path
    save_rejects: bool = True
    every_nth_pass: int = Field(0, ge=0, description="also keep every Nth accepted frame (0: none)")
    max_mb: float = Field(500, gt=0, description="disk budget; the oldest evidence is deleted beyond it")


class ControlConfig(Strict):
    """What the broker may change at the line: every change is an AUDIT line in the log."""
    threshold: bool = Field(True, description="accept <prefix>/<line>/<camera>/set/threshold")
    threshold_factor: float = Field(4.0, gt=1, description="a new threshold must lie within the bundle's "
                                                             "threshold divided or multiplied by this")
    trigger_max_bytes: int = Field(256, ge=8, le=4096, description="longest part id a trigger may carry")
    trigger_deadline_ms: int = Field(500, ge=10, le=60_000, description="every triggered part is answered within "
                                                                         "this: its verdict, or a fail-safe reject")


class CommissioningConfig(Strict):
    """Fit the threshold on the line's own first frames (mostly good, unlabelled) and write a new bundle revision."""
    frames: int = Field(300, ge=100, description="frames the threshold is fitted on (at least 100; a 1% target needs 299 to be promised: below, commissioning says so and keeps the bundle's threshold unless its fit is shown to do as well)")
    target_false_reject_rate: float = Field(0.01, gt=0, lt=0.5)
    keep_frames: bool = Field(True, description="save the frames (JPEG) and their scores beside the outbox")
    rejects: bool = Field(True, description="fire rejects at the bundle's threshold while commissioning (flagged "
                                            "commissioning: true); false lets every part pass until it is done")
    learn: bool = Field(False, description="then grow a knn bundle's bank from the kept frames (coft learn), in "
                                           "the background at low priority, and run that revision; off by default: "
                                           "it helps a line with few defects and harms one with many (docs/learning.md)")
    keep_operator_threshold: bool = Field(True, description="a threshold an operator set stays in force after "
                                                            "commissioning until an operator sets the fitted one; "
                                                            "false: the fitted one replaces it")


class WebConfig(Strict):
    """The live view: frames with the anomaly map, verdicts, counters, the evidence gallery, operator actions."""
    port: int = Field(8080, ge=1, le=65535)
    bind: str = Field("127.0.0.1", description="address the page listens on (0.0.0.0: every interface; put TLS "
                                                "and a login in front of it then)")
    token_env: str | None = Field(None, description="environment variable holding the operator token")
    token_file: Path | None = Field(None, description="file holding the operator token; without a token the "
                                                      "page is read-only")
    live_fps: float = Field(4.0, gt=0, le=30, description="most live frames per second sent to each viewer")
    max_viewers: int = Field(8, ge=1, le=256, description="live streams served at once; more get 503")
    max_connections: int = Field(64, ge=2, le=4096, description="open connections at once; more are closed at "
                                                                "once, so viewers never take the inspection's files")
    idle_timeout_s: float = Field(20.0, gt=0, le=600, description="a connection that sends no request, or a "
                                                                   "viewer that reads nothing, for this long is closed")
    allowed_hosts: list[str] = Field([], description="host names the page answers to besides this box's own, "
                                                     "localhost and IP addresses (a proxy's name); others get 421, "
                                                     "so a web page elsewhere cannot read it by DNS rebinding")

    @model_validator(mode="after")
    def _one_token(self):
        if self.token_env and self.token_file:
            raise ValueError("give token_env or token_file, not both")
        return self

    def token(self) -> str | None:
        return secret(self.token_env, self.token_file, "web.token")


class SparkplugConfig(Strict):
    """Sparkplug B for SCADA hosts (Ignition and others): this box an edge node, each camera a device. It uses
    the broker: settings, with its own client id."""
    group_id: str = Field("coft", pattern=r"^[^#+/\x00]+$", description="Sparkplug group id")
    edge_node_id: str | None = Field(None, pattern=r"^[^#+/\x00]+$", description="default: coft-<line>")
    data_qos: Literal[0, 1] = Field(0, description="DDATA QoS: 0 as the specification says; 1 has the broker "
                                                   "acknowledge each verdict before it leaves the outbox")
    primary_host_id: str | None = Field(None, pattern=r"^[^#+/\x00]+$",
                                        description="the SCADA host application (Ignition: its host id) whose "
                                                    "spBv1.0/STATE must say online before births and data; verdicts "
                                                    "wait in the outbox meanwhile. None: publish whenever connected")


class OpcUaConfig(Strict):
    """An OPC UA server for controllers that read one (Siemens S7-1500, Beckhoff ...): verdicts, counters,
    states and a heartbeat per camera; the threshold and, for trigger cameras, a trigger writable."""
    port: int = Field(4840, ge=1, le=65535)
    bind: str = Field("0.0.0.0", description="address to listen on (the PLC is on the network)")
    endpoint_host: str | None = Field(None, description="host name or address in the endpoint URL clients are "
                                                        "told (default: bind, or this box's host name for 0.0.0.0)")
    security: list[Literal["Basic256Sha256_SignAndEncrypt", "Basic256Sha256_Sign", "None"]] = Field(
        ["Basic256Sha256_SignAndEncrypt"], min_length=1, description="endpoints offered")
    certificate: Path = Field(Path("/var/lib/coft/opcua-server.der"),
                              description="server certificate (DER); made, self-signed, on first start if missing")
    private_key: Path = Field(Path("/var/lib/coft/opcua-server.pem"), description="its private key (PEM)")
    username: str | None = Field(None, description="the user a PLC logs in as")
    password_env: str | None = Field(None, description="environment variable holding that user's password")
    password_file: Path | None = Field(None, description="file holding that user's password")
    allow_anonymous: bool = Field(False, description="let clients in without a user (test benches)")
    trusted_clients: list[Path] = Field([], description="client certificates (DER or PEM) allowed to connect; "
                                                        "empty: any client that knows the password")
    threshold_writable: bool = Field(True, description="the Threshold node takes writes (with control.threshold)")

    def password(self) -> str | None:
        return secret(self.password_env, self.password_file, "opcua.password")


class RuntimeConfig(Strict):
    bundle: Path
    backend: Literal["auto", "onnxruntime", "openvino", "openvino-bf16", "onnxruntime-int8", "tensorrt"] = Field(
        "auto", description="auto: TensorRT where the bundle has an engine, else the fastest installed CPU engine")
    threads: int = Field(0, ge=0, description="CPU engine threads (0: all cores)")
    max_batch: int = Field(8, ge=1, description="frames scored together when several are waiting")
    queue_size: int = Field(8, ge=1, description="frames waiting for inference; the oldest are dropped (and counted) beyond it")
    cameras: list[CameraConfig] = Field(min_length=1)
    broker: BrokerConfig = BrokerConfig()
    outbox: OutboxConfig = OutboxConfig()
    evidence: EvidenceConfig | None = None
    harvest: EvidenceConfig | None = Field(None, description="frames kept to retrain on (coft retrain): raw, with "
                                                             "their verdicts; every_nth_pass accepts and all rejects")
    web: WebConfig | None = Field(None, description="present: serve the live view and /api/status")
    sparkplug: SparkplugConfig | None = Field(None, description="present: also publish as a Sparkplug B edge node")
    opcua: OpcUaConfig | None = Field(None, description="present: also serve verdicts over OPC UA")
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus endpoint (0: off)")
    metrics_bind: str = Field("127.0.0.1", description="address the metrics endpoint listens on (0.0.0.0: every interface)")
    heartbeat_s: float = Field(1.0, ge=0.01, description="heartbeat period; its counter is what a PLC watches to "
                                                          "reject by default when the runtime is gone (at least 0.01: "
                                                          "faster floods the broker, not the PLC's view)")
    stall_s: float = Field(60.0, ge=1, le=3600, description="a broker link that is connected but has had no "
                                                            "acknowledgement for this long, or frames waiting this long "
                                                            "with no verdict (a hung engine, a failing one), ends the "
                                                            "process with exit status 2 so systemd restarts it")
    state_file: Path | None = Field(None, description="live threshold changes persist here (default: beside the outbox)")
    control: ControlConfig = ControlConfig()
    commissioning: CommissioningConfig | None = Field(None, description="present: commission at start unless the "
                                                                          "bundle already was for these cameras")
    trusted_keys: list[Path] = Field([], description="public keys (.pub) of which one must have signed the bundle")

    @model_validator(mode="after")
    def _unique_cameras(self):
        names = [c.name for c in self.cameras]
        if len(set(names)) != len(names):
            raise ValueError(f"camera names must be unique, got {names}")
        return self

    @property
    def state_path(self) -> Path:
        return self.state_file or self.outbox.path.with_name("state.json")


def _line_of(root: yaml.Node | None, loc: tuple) -> int | None:
    """Line (1-based) of the YAML node at a pydantic error location, as deep as it exists."""
    node, line = root, None
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            match = [v for k, v in node.value if k.value == key]
            if not match:
                break
            node = match[0]
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            break
        line = node.start_mark.line + 1
    return line


def _duplicate_key(node: yaml.Node | None) -> str | None:
    """'line A and line B both set KEY' for the first key given twice in one mapping (PyYAML keeps the last)."""
    if isinstance(node, yaml.MappingNode):
        seen: dict = {}
        for key, value in node.value:
            if isinstance(key, yaml.ScalarNode):
                if key.value in seen:
                    return (f"line {seen[key.value]} and line {key.start_mark.line + 1} both set {key.value!r}; "
                            "keep one of them")
                seen[key.value] = key.start_mark.line + 1
            found = _duplicate_key(value)
            if found:
                return found
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            found = _duplicate_key(item)
            if found:
                return found
    return None


def load_config(path: str | Path) -> RuntimeConfig:
    """Parse and validate the runtime YAML; relative paths are taken from the file's folder."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise CoftError(f"{path}: cannot read the config ({exc.strerror}); pass --config with the path of line.yaml") from exc
    try:
        data, root = yaml.safe_load(text), yaml.compose(text)
    except yaml.YAMLError as exc:
        raise CoftError(f"{path}: not valid YAML: {str(exc).splitlines()[0]} {getattr(exc, 'problem_mark', '')}".strip()) from exc
    if not isinstance(data, dict):
        raise CoftError(f"{path}: expected a mapping of settings (bundle:, cameras:, broker: ...)")
    duplicate = _duplicate_key(root)
    if duplicate:
        raise CoftError(f"{path}: {duplicate}")
    try:
        config = RuntimeConfig.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            key = ".".join(str(part) for part in error["loc"])
            line = _line_of(root, error["loc"])
            where = f"line {line}, " if line else ""
            problems.append(f"{where}{key}: {error['msg']}")
        raise CoftError(f"{path}: {'; '.join(problems)}") from None
    base = path.resolve().parent
    tls = config.broker.tls
    for holder, attr in [(config, "bundle"), (config.outbox, "path"), (config, "state_file"),
                         (config.broker, "password_file")] + \
            [(folder, "dir") for folder in (config.evidence, config.harvest) if folder] + \
            ([(config.web, "token_file")] if config.web else []) + \
            ([(config.opcua, a) for a in ("certificate", "private_key", "password_file")] if config.opcua else []) + \
            ([(tls, "ca"), (tls, "cert"), (tls, "key")] if tls else []):
        value = getattr(holder, attr)
        if value is not None and not value.is_absolute():
            setattr(holder, attr, base / value)
    config.trusted_keys = [key if key.is_absolute() else base / key for key in config.trusted_keys]
    if config.opcua:
        config.opcua.trusted_clients = [c if c.is_absolute() else base / c for c in config.opcua.trusted_clients]
    for key, value in [(f"broker.tls.{a}", getattr(tls, a)) for a in ("ca", "cert", "key") if tls] + \
            [(f"trusted_keys.{i}", k) for i, k in enumerate(config.trusted_keys)] + \
            ([(f"opcua.trusted_clients.{i}", c) for i, c in enumerate(config.opcua.trusted_clients)] if config.opcua else []):
        if value is not None and not value.is_file():
            raise CoftError(f"{path}: {key}: file {value} does not exist; give the path of the file on this box")
    for camera in config.cameras:  # files and folders, not devices, URLs or pipelines
        source = str(camera.source)
        if camera.kind in ("auto", "file", "folder") and not source.isdigit() and "://" not in source \
                and "!" not in source and not source.startswith("/"):
            camera.source = str(base / source)
    return config


DECIMAL = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")  # what a PLC or a person types


def valid_threshold(text: str | bytes) -> float:
    """A threshold from a command: a finite, positive number in plain ASCII decimals, or a one-line error.
    (Python's float() also takes '2_5' and Arabic-Indic digits, which no controller means as 25.)"""
    text = text.decode(errors="replace") if isinstance(text, bytes) else str(text)
    if not DECIMAL.fullmatch(text.strip()):
        raise CoftError(f"threshold {text[:40]!r} is not a number (plain decimals, e.g. 0.42 or 4.2e-1)")
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise CoftError(f"threshold {value} must be a positive finite number")
    return value
