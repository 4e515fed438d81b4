"""What a bundle's manifest may say, and how a box knows nobody changed it.

Checksums protect the files a manifest lists; the manifest itself carries a digest of
its canonical form (sorted keys, no whitespace), so a threshold edited by hand or a
file dropped from `files` is refused like a corrupt weight file. A digest stops
accidents, not attackers: a box given trusted Ed25519 public keys also demands a
signature (`manifest.sig`, written by `coft sign`) from one of them.

Every field the runtime reads is validated here (type, finite, in range), and every
file a manifest names must be a plain name inside the bundle and listed in `files`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from coft.runtime.model.errors import CoftError

DIGEST_KEY = "digest"
FILE_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"  # a plain name: no folders, no '..', not hidden


class Loose(BaseModel):
    """Known fields are checked; unknown ones are kept for newer tools (forward compatible)."""
    model_config = ConfigDict(extra="allow", strict=True)


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


class InputSpec(Loose):
    height: int = Field(ge=14, le=8192, description="the model input's height in pixels (frames are resized to it)")
    width: int = Field(ge=14, le=8192, description="the model input's width in pixels")


class Normalisation(Loose):
    mean: list[float] = Field(default=[0.0, 0.0, 0.0], min_length=3, max_length=3,
                              description="per-channel mean subtracted inside the graph (RGB, 0-1 scale)")
    std: list[float] = Field(default=[1.0, 1.0, 1.0], min_length=3, max_length=3,
                             description="per-channel standard deviation the graph divides by (positive)")

    @field_validator("mean", "std")
    @classmethod
    def _finite_values(cls, values, info):
        for v in values:
            _finite(v)
            if info.field_name == "std" and v <= 0:
                raise ValueError("standard deviations must be positive")
        return values


class ThresholdSpec(Loose):
    value: float = Field(gt=0, le=1e7, description="a score above it rejects the part")
    method: str = Field(description="how it was chosen (a conformal fit on good frames, commissioning, an operator...)")
    target_false_reject_rate: float | None = Field(None, gt=0, lt=1, description="the false-reject rate it aims at")
    promise: PromiseSpec | None = Field(None, description="what it promises, where enough frames were fitted")

    @field_validator("value")
    @classmethod
    def _finite_value(cls, value):
        return _finite(value)


class TilesSpec(Loose):
    window: list[int] = Field(min_length=2, max_length=2, description="a window's [height, width] in frame pixels")
    origins: list[list[int]] = Field(min_length=1, max_length=4096, description="each window's [y, x] in the frame")
    count: int = Field(ge=1, le=4096, description="windows per frame: the graph scores them as one batch")
    scale: float = Field(gt=0, le=1, description="the frame's scale before it is cut (1: the camera's own pixels)")


class PatchSpec(Loose):
    stride: int = Field(ge=1, le=1024, description="input pixels per patch")
    grid: list[int] = Field(min_length=2, max_length=2, description="patches per [row, column] of the input")
    pooling: Literal["max", "top1pct"] = Field(description="image score: the worst patch, or the mean of the worst 1%")
    blur_sigma: float = Field(ge=0, le=1000, description="Gaussian blur of the anomaly map, in patches")
    tiles: TilesSpec | None = Field(None, description="a frame scored in overlapping windows (runtime/model/tiles.py)")


class NamedFile(Loose):
    file: str = Field(pattern=FILE_NAME, description="a plain file name inside the bundle, listed in files")


class OnnxSpec(NamedFile):
    max_batch: int = Field(ge=1, le=4096, description="the most frames the graph takes at once")


class EngineSpec(NamedFile):
    max_batch: int = Field(ge=1, le=4096, description="the most frames the engine takes at once")
    precision: str = Field("fp32", description="what the engine was built in: fp32, fp16 or int8")
    half_factor: bool = Field(False, description="the fused kernel's factor or bank is stored in fp16")
    tensorrt_version: str | None = Field(None, description="the TensorRT that built it: another refuses it")
    gpu: str | None = Field(None, description="the GPU it was built for: another refuses it")
    onnx_sha256: str | None = Field(None, description="the graph it was built from: another refuses it")


class ParentSpec(Loose):
    folder: str = Field(description="the bundle this box revision was made from, beside it")
    digest: str = Field(description="that bundle's manifest digest: the revision loads only beside exactly it")


class PromiseSpec(Loose):
    false_reject_rate: float | None = Field(None, ge=0, le=1, description="the false-reject rate promised")


class LineRecord(Loose):
    cameras: list[str] = Field(default=[], description="the cameras whose frames it used")
    frames: int | None = Field(None, ge=0, description="how many frames it used")
    frames_folder: str | None = Field(None, description="where it kept its frames (commissioning's: the review's queue)")
    engine: str | None = Field(None, description="the engine that scored them")
    precision: str | None = Field(None, description="that engine's arithmetic: the threshold holds on it only")


class LearningRecord(LineRecord):
    frames_in_bank: int | None = Field(None, ge=0, description="frames that gave the grown bank rows")
    suspects: int | None = Field(None, ge=0, description="frames left out as suspects")
    rows_added: int | None = Field(None, ge=0, description="rows the line's frames added to the bank")


class BackboneSpec(Loose):
    name: str = Field(description="the backbone (efficientnet_lite0, dinov2_vits14, ...)")
    weights: str | None = Field(None, pattern=FILE_NAME, description="its weights file in the bundle, if any")


class KnnSpec(Loose):
    bank: str = Field(pattern=FILE_NAME, description="the memory bank's file (bank.npz)")
    coreset_cap: int | None = Field(None, ge=0, description="most rows the coreset keeps (0: all); learning keeps it")
    block_weights: list[float] | None = Field(None, description="each ViT block's weight (bank.npz holds them)")


class ManifestSchema(Loose):
    format_version: int = Field(description="the bundle layout's version; a runtime refuses one it does not know")
    model_id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$",
                          description="the model's name on every verdict; a revision adds -rN")
    backbone: BackboneSpec = Field(description="the network that turns a frame into features")
    input: InputSpec = Field(description="the size frames are resized to")
    normalisation: Normalisation = Field(description="what the graph does to pixels before the backbone")
    embedding_dim: int = Field(ge=1, le=65536, description="feature size per patch (or per image)")
    scorer: str = Field("global", description="global, patch or knn (runtime/model/bundle.py names those it knows)")
    revision_of: str | None = Field(None, description="the model a box revision (commissioning, learning) came from")
    parent: ParentSpec | None = Field(None, description="a box revision's parent bundle")
    commissioning: LineRecord | None = Field(None, description="what commissioning on the line did")
    learning: LearningRecord | None = Field(None, description="what coft learn on the line did")
    patch: PatchSpec | None = Field(None, description="patch scorers: the grid, pooling and tiles")
    knn: KnnSpec | None = Field(None, description="the knn scorer's memory bank")
    threshold: ThresholdSpec = Field(description="the threshold in force and what it promises")
    files: dict[str, str] = Field(description="SHA-256 of every other file in the bundle, by plain name")
    onnx: OnnxSpec | None = Field(None, description="the exported graph, after coft export")
    engine: EngineSpec | None = Field(None, description="the TensorRT engine, after coft build-engine on the box")

    @field_validator("files")
    @classmethod
    def _plain_names(cls, files):
        for name, digest in files.items():
            if not re.fullmatch(FILE_NAME, name):
                raise ValueError(f"file name {name!r} is not a plain name inside the bundle")
            if not re.fullmatch(r"[0-9a-f]{64}", str(digest)):
                raise ValueError(f"checksum of {name} is not a SHA-256 hex digest")
        return files


def field_table() -> list[str]:
    """docs/bundle.md's table of the manifest fields the runtime checks, made from ManifestSchema (so the two
    cannot disagree: tests/test_bundle.py compares them)."""
    schema = ManifestSchema.model_json_schema()
    defs = schema.get("$defs", {})

    def kind(prop: dict) -> str:
        if "enum" in prop:
            return " or ".join(f"`{v}`" for v in prop["enum"])
        if prop.get("type") == "array":
            return f"list of {kind(prop['items'])}"
        if prop.get("type") == "object":
            return "name -> text"
        return prop.get("type", "object")

    def limits(prop: dict) -> str:
        said = [f"{word} {prop[key]:g}" for key, word in (("minimum", ">="), ("exclusiveMinimum", ">"),
                                                           ("maximum", "<="), ("exclusiveMaximum", "<")) if key in prop]
        if "minItems" in prop:
            low, high = prop["minItems"], prop["maxItems"]
            said.append(f"{low} items" if low == high else f"{low} to {high} items")
        if "pattern" in prop:
            said.append("a plain name: letters, digits, `._-`, at most 128")
        return ", ".join(said)

    def rows(model: dict, prefix: str) -> list[str]:
        out = []
        for name, prop in model["properties"].items():
            options = [p for p in prop.get("anyOf", [prop]) if p.get("type") != "null"]
            inner = options[0]
            optional = "" if name in model.get("required", []) else " (optional)"
            if "$ref" in inner:
                nested = defs[inner["$ref"].split("/")[-1]]
                out.append(f"| `{prefix}{name}` | object{optional} |  | {prop.get('description', '')} |")
                out += rows(nested, f"{prefix}{name}.")
            else:
                out.append(f"| `{prefix}{name}` | {kind(inner)}{optional} | {limits(inner)} | "
                           f"{prop.get('description', '')} |")
        return out
    return ["| field | type | limits | what |", "|---|---|---|---|", *rows(schema, "")]


def canonical(manifest: dict[str, Any]) -> bytes:
    """The bytes the digest and the signature cover: the manifest without its digest, keys sorted."""
    body = {k: v for k, v in manifest.items() if k != DIGEST_KEY}
    try:
        return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    except ValueError as exc:
        raise CoftError(f"manifest holds a number JSON cannot carry ({exc}); retrain the bundle") from None


def digest(manifest: dict[str, Any]) -> str:
    return "sha256:" + hashlib.sha256(canonical(manifest)).hexdigest()


def validate(manifest: dict[str, Any], where: Path) -> ManifestSchema:
    """Refuse a manifest that was edited, or names files outside the bundle, or holds impossible values."""
    try:
        expected = digest(manifest)
    except CoftError as exc:
        raise CoftError(f"{where}: {exc}") from None
    if manifest.get(DIGEST_KEY) != expected:
        raise CoftError(f"{where}: manifest digest does not match its content (edited by hand or corrupt); "
                        "change thresholds with 'coft eval --recalibrate', or copy the bundle again")
    try:
        spec = ManifestSchema.model_validate(manifest)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()[:3])
        raise CoftError(f"{where}: invalid manifest ({problems}); retrain or re-export the bundle") from None
    named = [f.file for f in (spec.onnx, spec.engine) if f] + [spec.backbone.weights or ""] + \
        ([spec.knn.bank] if spec.knn else [])
    unlisted = [name for name in named if name and name not in spec.files]
    if unlisted:
        raise CoftError(f"{where}: manifest names {', '.join(unlisted)} but does not list its checksum; re-export the bundle")
    if spec.scorer == "knn" and spec.threshold.value > 2:
        raise CoftError(f"{where}: threshold {spec.threshold.value} is above 2, the largest cosine distance: "
                        "nothing would ever be rejected; recalibrate with 'coft eval --recalibrate'")
    return spec


# -- signatures ------------------------------------------------------------------------------
def _parsed_key(path: Path, loaders, unreadable: str):
    """The first key one of `loaders` makes of the file, or None; a file that cannot be read is a one-line error."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise CoftError(f"{path}: cannot read the {unreadable.format(exc.strerror)}") from None
    for loader in loaders:
        try:
            return loader(data)
        except (ValueError, TypeError):
            continue
    return None


def _load_private_key(path: Path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key, load_ssh_private_key

    key = _parsed_key(path, (lambda data: load_pem_private_key(data, password=None),
                             lambda data: load_ssh_private_key(data, password=None)), "signing key ({})")
    if key is None:
        raise CoftError(f"{path}: not a readable unencrypted private key (PEM or OpenSSH); make one with 'coft keygen'")
    if not isinstance(key, Ed25519PrivateKey):
        raise CoftError(f"{path}: not an Ed25519 key; make one with 'coft keygen' or 'ssh-keygen -t ed25519'")
    return key


def load_public_key(path: Path):
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import load_pem_public_key, load_ssh_public_key

    key = _parsed_key(path, (load_pem_public_key, load_ssh_public_key), "trusted key ({}); check trusted_keys")
    if not isinstance(key, Ed25519PublicKey):
        raise CoftError(f"{path}: not an Ed25519 public key (PEM or OpenSSH .pub); use the .pub from 'coft keygen'")
    return key


def key_id(public_key) -> str:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return hashlib.sha256(public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)).hexdigest()[:16]


def keygen(stem: Path) -> tuple[Path, Path]:
    """A new Ed25519 key pair: STEM.key (owner-only, keep it off the boxes) and STEM.pub (give to every box)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, PublicFormat

    private, public = stem.with_suffix(".key"), stem.with_suffix(".pub")
    for path in (private, public):
        if path.exists():
            raise CoftError(f"{path}: already exists; choose another name")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    with open(private, "xb", opener=lambda p, flags: os.open(p, flags, 0o600)) as f:
        f.write(pem)
    public.write_bytes(key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    return private, public


def signature_for(manifest: dict[str, Any], key_path: Path) -> dict[str, str]:
    key = _load_private_key(key_path)
    return {"key_id": key_id(key.public_key()),
            "signature": base64.b64encode(key.sign(canonical(manifest))).decode()}


def check_signature(manifest: dict[str, Any], signature: dict | None, trusted: list[Path], where: Path) -> str | None:
    """With trusted keys: the key id that signed it, or a one-line refusal. Without: None (nothing demanded)."""
    if not trusted:
        return None
    if signature is None:
        raise CoftError(f"{where}: bundle is not signed and this box only accepts bundles signed by a trusted key; "
                        "sign it with 'coft sign BUNDLE --key KEY'")
    from cryptography.exceptions import InvalidSignature

    keys = {key_id(k): k for k in (load_public_key(p) for p in trusted)}
    key = keys.get(str(signature.get("key_id")))
    if key is None:
        raise CoftError(f"{where}: signed by key {signature.get('key_id')!r}, which is not among this box's "
                        f"{len(keys)} trusted key(s); sign it with a trusted key or add its .pub to trusted_keys")
    try:
        key.verify(base64.b64decode(str(signature.get("signature", "")), validate=True), canonical(manifest))
    except (InvalidSignature, ValueError):
        raise CoftError(f"{where}: signature does not match the manifest (edited after signing); copy the bundle "
                        "again or sign it again") from None
    return key_id(key)
