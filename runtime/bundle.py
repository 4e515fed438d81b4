"""The model bundle: the one contract between training, export and the runtime.

A bundle is a directory with `manifest.json` (what the model is, how to feed it, its
threshold, how it was trained, and the SHA-256 of every other file) beside the files it
names. Training writes it into a hidden temporary directory and renames it into place,
so a crash never leaves a half-written bundle; the runtime refuses any bundle whose
files do not match their checksums. A single-file tar archive carries it to the edge.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from runtime.errors import CoftError
from runtime.scoring import Gaussian, MemoryBank

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
GAUSSIAN = "gaussian.npz"
BANK = "bank.npz"
SCORERS = ("global", "patch", "knn")
PATCH_SCORERS = ("patch", "knn")  # score every patch: anomaly maps, defect boxes
REQUIRED_KEYS = ("format_version", "model_id", "backbone", "input", "normalisation", "embedding_dim", "threshold", "files")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _checksums(directory: Path) -> dict[str, str]:
    return {p.name: sha256(p) for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST}


def _write_json_atomically(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


@contextmanager
def new_bundle(out: str | Path, manifest: dict[str, Any]) -> Iterator[Path]:
    """Yield a staging directory to write files into; on success, seal it with checksums and move it to `out`.

    The caller may still fill `manifest` inside the block. On any error the staging
    directory is removed and `out` is never created.
    """
    out = Path(out)
    if out.exists():
        raise CoftError(f"{out}: already exists; choose another --out or remove it first")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield staging
        manifest["format_version"] = FORMAT_VERSION
        manifest["files"] = _checksums(staging)
        _write_json_atomically(staging / MANIFEST, manifest)
        staging.chmod(0o755)  # mkdtemp makes it private; a bundle is meant to be shared
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def update_manifest(bundle_dir: str | Path, changes: dict[str, Any]) -> dict[str, Any]:
    """Merge top-level `changes` into a verified bundle's manifest and re-seal its checksums."""
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    manifest.update(changes)
    manifest["files"] = _checksums(bundle_dir)
    _write_json_atomically(bundle_dir / MANIFEST, manifest)
    return manifest


def read_manifest(bundle_dir: str | Path) -> dict[str, Any]:
    """Read and verify a bundle's manifest: known format, required keys, every file present and intact."""
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / MANIFEST
    if not bundle_dir.is_dir():
        raise CoftError(f"{bundle_dir}: not a model bundle directory; train one with 'coft train' or unpack its archive")
    if not path.is_file():
        raise CoftError(f"{bundle_dir}: no {MANIFEST}; this is not a model bundle (or it was copied incompletely)")
    try:
        manifest = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise CoftError(f"{path}: not valid JSON ({exc}); copy the bundle again") from exc
    if not isinstance(manifest, dict):
        raise CoftError(f"{path}: expected a JSON object; copy the bundle again")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise CoftError(f"{bundle_dir}: bundle format version {version!r} is not supported (this runtime reads {FORMAT_VERSION}); upgrade coft or re-export the bundle")
    missing = [key for key in REQUIRED_KEYS if key not in manifest]
    if missing:
        raise CoftError(f"{path}: missing keys {', '.join(missing)}; retrain or re-export the bundle")
    for name, expected in manifest["files"].items():
        file = bundle_dir / name
        if not file.is_file():
            raise CoftError(f"{bundle_dir}: file {name} listed in the manifest is missing; copy the whole bundle again")
        if sha256(file) != expected:
            raise CoftError(f"{bundle_dir}: checksum mismatch for {name} (corrupt or edited); copy the bundle again")
    scorer = manifest.get("scorer", "global")
    if scorer not in SCORERS:
        raise CoftError(f"{bundle_dir}: scorer {scorer!r} is unknown to this runtime (it knows {', '.join(SCORERS)}); upgrade coft")
    scoring_file = BANK if scorer == "knn" else GAUSSIAN
    if scoring_file not in manifest["files"]:
        raise CoftError(f"{bundle_dir}: manifest does not list {scoring_file}; retrain the bundle")
    if scorer in PATCH_SCORERS and not {"stride", "grid", "pooling", "blur_sigma"} <= set(manifest.get("patch", {})):
        raise CoftError(f"{bundle_dir}: {scorer} scorer without its 'patch' settings in the manifest; retrain the bundle")
    return manifest


@dataclass(frozen=True)
class Bundle:
    """A verified bundle: its directory, manifest and what scores a part (a Gaussian or a memory bank)."""

    path: Path
    manifest: dict[str, Any]
    scoring: Gaussian | MemoryBank

    @property
    def gaussian(self) -> Gaussian:
        if not isinstance(self.scoring, Gaussian):
            raise CoftError(f"{self.path}: a {self.manifest['scorer']} bundle has no Gaussian")
        return self.scoring

    @property
    def scores_patches(self) -> bool:
        return self.manifest.get("scorer", "global") in PATCH_SCORERS

    @property
    def model_id(self) -> str:
        return self.manifest["model_id"]

    @property
    def input_size(self) -> tuple[int, int]:
        return self.manifest["input"]["height"], self.manifest["input"]["width"]

    @property
    def threshold(self) -> float:
        return float(self.manifest["threshold"]["value"])


def load_bundle(path: str | Path) -> Bundle:
    """Verify and load a bundle directory (see `unpack` for an archive)."""
    path = Path(path)
    manifest = read_manifest(path)
    scoring = MemoryBank.load(path / BANK) if manifest.get("scorer") == "knn" else Gaussian.load(path / GAUSSIAN)
    if scoring.dim != manifest["embedding_dim"]:
        raise CoftError(f"{path}: scoring parameters of dimension {scoring.dim} but manifest says {manifest['embedding_dim']}; retrain the bundle")
    return Bundle(path, manifest, scoring)


def pack(bundle_dir: str | Path, archive: str | Path) -> Path:
    """Write a verified bundle as one tar file for flashing to a box."""
    bundle_dir, archive = Path(bundle_dir), Path(archive)
    manifest = read_manifest(bundle_dir)
    tmp = archive.with_name(f".{archive.name}.tmp")
    with tarfile.open(tmp, "w") as tar:
        for name in [MANIFEST, *manifest["files"]]:
            tar.add(bundle_dir / name, arcname=f"{bundle_dir.name}/{name}")
    os.replace(tmp, archive)
    return archive


def unpack(archive: str | Path, dest_dir: str | Path) -> Bundle:
    """Extract a bundle archive under `dest_dir` and verify it; a bad archive leaves nothing behind."""
    archive, dest_dir = Path(archive), Path(dest_dir)
    try:
        with tarfile.open(archive) as tar:
            tops = {Path(m.name).parts[0] for m in tar.getmembers()}
            if len(tops) != 1:
                raise CoftError(f"{archive}: expected one bundle directory in the archive, found {len(tops)}; pack it with 'coft pack'")
            target = dest_dir / tops.pop()
            if target.exists():
                raise CoftError(f"{target}: already exists; remove it or unpack elsewhere")
            staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=dest_dir))
            try:
                tar.extractall(staging, filter="data")
                load_bundle(staging / target.name)
                os.rename(staging / target.name, target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except (tarfile.TarError, OSError) as exc:
        raise CoftError(f"{archive}: not a readable bundle archive ({exc}); copy it again") from exc
    return load_bundle(target)
