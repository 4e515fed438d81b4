"""The model bundle: the one contract between training, export and the runtime.

A bundle is a directory with `manifest.json` (what the model is, how to feed it, its
threshold, how it was trained, the SHA-256 of every other file, and a digest of itself)
beside the files it names, and optionally `manifest.sig` (see runtime.manifest).
Training writes it into a hidden temporary directory and renames it into place, so a
crash never leaves a half-written bundle; the runtime refuses any bundle whose files or
manifest do not match their checksums. A single-file tar archive carries it to the edge.
A bundle is never changed in place once a box may have seen it: a new threshold makes a
new revision with a new model id (`revise`).
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import re
import shutil
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from coft.runtime.model import manifest as manifests
from coft.runtime.model.errors import CoftError, NoRoom
from coft.runtime.model.scoring import Gaussian, MemoryBank
from coft.runtime.model.tiles import Tiling

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: the manifest carries its own digest
MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
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
    return {p.name: sha256(p) for p in sorted(directory.iterdir())
            if p.is_file() and p.name not in (MANIFEST, SIGNATURE) and not p.name.startswith(".")}


def _write_json_atomically(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False, allow_nan=False) + "\n")
    os.replace(tmp, path)


def _seal(directory: Path, manifest: dict[str, Any]) -> None:
    """List every file's checksum, digest the manifest and write it; an old signature no longer applies."""
    manifest["format_version"] = FORMAT_VERSION
    manifest["files"] = _checksums(directory)
    manifest[manifests.DIGEST_KEY] = manifests.digest(manifest)
    _write_json_atomically(directory / MANIFEST, manifest)
    if (directory / SIGNATURE).exists():
        (directory / SIGNATURE).unlink()
        log.warning("%s: its signature was removed because the manifest changed; sign it again with 'coft sign'",
                    directory)


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
        _seal(staging, manifest)
        staging.chmod(0o755)  # mkdtemp makes it private; a bundle is meant to be shared
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def update_manifest(bundle_dir: str | Path, changes: dict[str, Any],
                    files: dict[str, Callable[[Path], object]] | None = None) -> dict[str, Any]:
    """Add what export derives from the model (ONNX graph, engine), or retraining decided, and re-seal; `files`
    (name -> a function that writes it to a path) replace files through a new one, as `revise` says why."""
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    manifest.update(changes)
    for name, write in (files or {}).items():
        write(bundle_dir / f"new-{name}")
        os.replace(bundle_dir / f"new-{name}", bundle_dir / name)
    _seal(bundle_dir, manifest)
    return manifest


MAX_UNPACKED = 8 << 30  # bytes an archive may unpack to: a bundle is a graph, weights and a bank
STAGING = (".*.partial-*", ".*.graph", ".unpack-*", ".install-*")  # what a write in flight leaves if it is killed
STALE_S = 600  # staging untouched this long is a killed run's, not one in flight (a bundle is written in seconds)


def clean_staging(folder: Path, stale_s: float = STALE_S) -> tuple[int, int]:
    """Remove what killed runs of learn, revise, unpack or install left in `folder`; (items, bytes) removed."""
    removed, freed, now = 0, 0, time.time()
    for pattern in STAGING:
        for path in Path(folder).glob(pattern):
            try:
                if now - path.lstat().st_mtime < stale_s:
                    continue
                files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
                freed += sum(f.lstat().st_size for f in files)
                shutil.rmtree(path) if path.is_dir() else path.unlink()
                removed += 1
            except OSError as exc:
                log.warning("cannot remove %s, left by a killed run (%s)", path, exc)
    if removed:
        log.warning("removed %d staging folders and files of killed runs in %s (%.0f MB)", removed, folder, freed / 2**20)
    return removed, freed


def room_for(folder: Path, size: int, what: str) -> None:
    """A one-line refusal where `folder`'s filesystem has not `size` bytes free (with 10% to spare)."""
    free = shutil.disk_usage(folder).free
    if size * 1.1 > free:
        raise NoRoom(f"{what} needs {size / 2**20:.0f} MB and {folder} has {free / 2**20:.0f} MB free; free disk "
                        "space or write elsewhere (--out)")


def lineage(model_id: str) -> str:
    """The model id a bundle's revisions share (without -r2, -r3 ...)."""
    return re.sub(r"(-r\d+)+$", "", model_id)


def _model_ids(folder: Path) -> set[str]:
    """The model ids of the bundles in a folder (staging ones included: a learn in flight has taken its id)."""
    ids = set()
    for manifest in folder.glob(f"*/{MANIFEST}"):
        try:
            ids.add(json.loads(manifest.read_text())["model_id"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a bundle: it holds no id
    return ids


def next_revision(bundle_dir: Path, model_id: str, beside: Path | None = None) -> tuple[Path, str]:
    """Where the next revision of a bundle goes (in `beside`, default beside the bundle itself, links resolved) and
    its model id, NAME-r2, NAME-r3 ...: the first number neither a folder nor a bundle's model id there has taken,
    so two revisions never share an id, whoever made them and wherever the bundle was named from."""
    bundle_dir = bundle_dir.resolve()
    folder = (beside or bundle_dir.parent).resolve()
    match = re.fullmatch(r"(.*)-r(\d+)", model_id)
    base_id, number = (match.group(1), int(match.group(2)) + 1) if match else (model_id, 2)
    base_dir, taken = re.sub(r"-r\d+$", "", bundle_dir.name), _model_ids(folder) | _model_ids(bundle_dir.parent)
    while (folder / f"{base_dir}-r{number}").exists() or f"{base_id}-r{number}" in taken:
        number += 1
    return folder / f"{base_dir}-r{number}", f"{base_id}-r{number}"


def commissioned_revision(bundle_dir: Path, model_id: str, cameras: list[str]) -> Path | None:
    """The newest revision beside `bundle_dir` that commissioning made of this model for these cameras, if any:
    a config that names the bundle itself (not a box's `current` link) must not commission at every start."""
    bundle_dir = Path(bundle_dir).resolve()  # a box's `current` link: its revisions lie beside the bundle, not it
    base = re.sub(r"-r\d+$", "", bundle_dir.name)
    found = []
    for candidate in bundle_dir.parent.glob(f"{glob.escape(base)}-r*"):
        try:
            manifest = json.loads((candidate / MANIFEST).read_text())
            match = re.fullmatch(r".*-r(\d+)", candidate.name)
            if (match and manifest.get("revision_of") == model_id
                    and set(cameras) <= set((manifest.get("commissioning") or {}).get("cameras", []))):
                found.append((int(match.group(1)), candidate))
        except (OSError, ValueError, AttributeError):
            continue  # not a bundle, or a broken one: load_bundle would say why if it were chosen
    return max(found)[1] if found else None


def commissioned_ancestor(bundle_dir: str | Path, manifest: dict[str, Any]) -> tuple[Path, dict] | None:
    """The revision commissioning wrote for this model (this one, or the one it grew from) and the threshold it
    fitted: learning keeps the commissioning block, but its frames were scored on the commissioned model's scale,
    not the grown one's, and learning again starts from it. None where no revision in its line of parents (revise's
    `parent`, beside it) was commissioned."""
    folder = Path(bundle_dir).resolve()
    for _ in range(256):  # a chain of revisions is short; a loop of parents must not hang the page
        if str(manifest["threshold"].get("method", "")).startswith("commissioning"):
            return folder, manifest["threshold"]
        parent = (manifest.get("parent") or {}).get("folder")
        if not parent:
            return None
        folder = folder.parent / parent
        try:
            manifest = json.loads((folder / MANIFEST).read_text())
        except (OSError, ValueError):
            return None
    return None


def revise(bundle_dir: str | Path, changes: dict[str, Any], out: str | Path | None = None,
           files: dict[str, Callable[[Path], object]] | None = None) -> Path:
    """A new bundle revision beside the old one: the same files, `changes` applied, a new model id.

    The old bundle stays as it was, so a box running it (and the live threshold it saved
    for that model id) is never changed behind its back, and `coft rollback` still has it.
    Unchanged files are hard links to the old ones where the filesystem allows: a threshold
    change costs a manifest, not another copy of the model (every writer of a bundle file
    replaces it through a new file, so a shared one is never changed in place). `files`
    names the files the revision writes anew: name -> a function that writes it to a path.
    """
    bundle_dir = Path(bundle_dir)
    old = read_manifest(bundle_dir)
    default_out, model_id = next_revision(bundle_dir, old["model_id"], Path(out).parent if out else None)
    out = Path(out or default_out)
    manifest = {k: v for k, v in old.items() if k not in ("files", manifests.DIGEST_KEY)}
    manifest.update(changes, model_id=model_id, revision_of=old["model_id"],
                    parent={"folder": bundle_dir.resolve().name, "digest": manifests.digest(old)})
    with new_bundle(out, manifest) as staging:
        for name, write in (files or {}).items():
            write(staging / name)
        for name in set(old["files"]) - set(files or {}):
            try:
                os.link(bundle_dir / name, staging / name)
            except OSError:  # another filesystem, or one without hard links
                shutil.copy2(bundle_dir / name, staging / name)
    return out


def sign(bundle_dir: str | Path, key: str | Path) -> str:
    """Write manifest.sig with an Ed25519 key; returns the key id a box will see."""
    bundle_dir = Path(bundle_dir)
    manifest = read_manifest(bundle_dir)
    signature = manifests.signature_for(manifest, Path(key))
    _write_json_atomically(bundle_dir / SIGNATURE, signature)
    return signature["key_id"]


def read_manifest(bundle_dir: str | Path, trusted_keys: list[Path] | tuple = ()) -> dict[str, Any]:
    """Read and verify a bundle's manifest: known format, its own digest, valid fields, every file present
    and intact, and a trusted signature where the box has trusted keys."""
    bundle_dir = Path(bundle_dir)
    path = bundle_dir / MANIFEST
    if not bundle_dir.exists():
        raise CoftError(f"{bundle_dir}: no such file or directory; check the path")
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
        fix = "retrain it with this coft" if isinstance(version, int) and version < FORMAT_VERSION else "upgrade coft"
        raise CoftError(f"{bundle_dir}: bundle format version {version!r} is not supported (this runtime reads "
                        f"{FORMAT_VERSION}); {fix}")
    missing = [key for key in REQUIRED_KEYS if key not in manifest]
    if missing:
        raise CoftError(f"{path}: missing keys {', '.join(missing)}; retrain or re-export the bundle")
    manifests.validate(manifest, bundle_dir)
    signature = None
    if (bundle_dir / SIGNATURE).is_file():
        try:
            signature = json.loads((bundle_dir / SIGNATURE).read_text())
        except (ValueError, UnicodeDecodeError):
            raise CoftError(f"{bundle_dir}: {SIGNATURE} is not valid JSON; sign the bundle again") from None
    if trusted_keys and signature is None and isinstance(manifest.get("parent"), dict):
        _check_parent(bundle_dir, manifest, trusted_keys)
    else:
        manifests.check_signature(manifest, signature if isinstance(signature, dict) else None, list(trusted_keys),
                                  bundle_dir)
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


# What a revision made on a box (commissioning, learning, a new threshold) may change of the bundle it revises:
# the rest must be its parent's, byte for byte, for the parent's signature to vouch for it.
BOX_MAY_CHANGE = {"model_id", "revision_of", "parent", "threshold", "commissioning", "learning", "knn", "engine",
                  "files", manifests.DIGEST_KEY}


def _check_parent(bundle_dir: Path, manifest: dict, trusted_keys: list[Path] | tuple) -> None:
    """The digest chain: an unsigned revision is trusted where its parent, beside it, verifies (signed, or itself
    such a revision), its manifest names the parent's digest, and it changed only what a box may."""
    parent = manifest["parent"]
    parent_dir = bundle_dir.parent / str(parent.get("folder"))
    try:
        before = read_manifest(parent_dir, trusted_keys)
    except CoftError as exc:
        raise CoftError(f"{bundle_dir}: unsigned, and the bundle it revises does not verify ({exc})") from None
    if manifests.digest(before) != parent.get("digest"):
        raise CoftError(f"{bundle_dir}: unsigned, and {parent_dir.name} is not the bundle it revised (digest "
                        "differs); sign the revision with a trusted key")
    changed = sorted(k for k in set(manifest) | set(before) if k not in BOX_MAY_CHANGE and manifest.get(k) != before.get(k))
    files = sorted(n for n, sha in manifest["files"].items()
                   if n not in (BANK, before.get("onnx", {}).get("file")) and before["files"].get(n) != sha)
    if changed or files:
        raise CoftError(f"{bundle_dir}: unsigned, and it changed {', '.join(changed + files)} of the signed "
                        f"{parent_dir.name}, more than a box's revision may; sign it with a trusted key")


@dataclass(frozen=True)
class Bundle:
    """A verified bundle: its directory, manifest (`spec`, validated; `manifest`, as written, for revisions that
    copy it) and what scores a part (a Gaussian or a memory bank)."""

    path: Path
    manifest: dict[str, Any]
    scoring: Gaussian | MemoryBank
    spec: manifests.ManifestSchema

    @property
    def gaussian(self) -> Gaussian:
        if not isinstance(self.scoring, Gaussian):
            raise CoftError(f"{self.path}: a {self.spec.scorer} bundle has no Gaussian")
        return self.scoring

    @property
    def bank(self) -> MemoryBank:
        if not isinstance(self.scoring, MemoryBank):
            raise CoftError(f"{self.path}: a {self.spec.scorer} bundle has no memory bank")
        return self.scoring

    @property
    def scores_patches(self) -> bool:
        return self.spec.scorer in PATCH_SCORERS

    @property
    def model_id(self) -> str:
        return self.spec.model_id

    @property
    def input_size(self) -> tuple[int, int]:
        return self.spec.input.height, self.spec.input.width

    @property
    def threshold(self) -> float:
        return self.spec.threshold.value

    @property
    def patch(self) -> manifests.PatchSpec:
        """A patch scorer's grid, pooling and tiles (a global scorer has none)."""
        if self.spec.patch is None:
            raise CoftError(f"{self.path}: a {self.spec.scorer} bundle scores no patches")
        return self.spec.patch

    @cached_property
    def tiling(self) -> Tiling | None:
        """The windows a tiled bundle scores its frames in (runtime/model/tiles.py), or None: one window; read and
        checked once (the TensorRT path stitches every batch with it)."""
        return Tiling.from_manifest(self.manifest["patch"], self.input_size) if self.spec.patch else None

    @property
    def patch_rows(self) -> int:
        """Rows of patch features the graph gives a frame: its grid's, every window's of a tiled bundle; 0 for a
        global scorer."""
        if not self.scores_patches:
            return 0
        tiling = self.tiling
        if tiling is not None:
            return len(tiling) * tiling.window_grid[0] * tiling.window_grid[1]
        rows, cols = self.patch.grid
        return rows * cols

    @property
    def window_size(self) -> tuple[int, int]:
        """What the backbone sees at once: a window of a tiled frame, or the whole input."""
        tiling = self.tiling
        return tiling.window if tiling else self.input_size


def load_bundle(path: str | Path, trusted_keys: list[Path] | tuple = ()) -> Bundle:
    """Verify and load a bundle directory (see `unpack` for an archive)."""
    path = Path(path)
    manifest = read_manifest(path, trusted_keys)
    spec = manifests.ManifestSchema.model_validate(manifest)  # read_manifest refused what does not validate
    scoring = MemoryBank.load(path / BANK) if spec.scorer == "knn" else Gaussian.load(path / GAUSSIAN)
    if scoring.dim != spec.embedding_dim:
        raise CoftError(f"{path}: scoring parameters of dimension {scoring.dim} but manifest says {spec.embedding_dim}; retrain the bundle")
    bundle = Bundle(path, manifest, scoring, spec)
    bundle.tiling  # noqa: B018  (refused at load, not at the first frame)
    return bundle


def require_graph(manifest: dict, bundle_dir: Path) -> None:
    """A box runs exported bundles only: refuse one without its ONNX graph before it travels or is installed."""
    if "onnx" not in manifest:
        raise CoftError(f"{bundle_dir}: the bundle has no ONNX graph (model.onnx) and cannot run on a box; run "
                        f"'coft export {bundle_dir}' first")


def pack(bundle_dir: str | Path, archive: str | Path) -> Path:
    """Write a verified, exported bundle as one tar file for flashing to a box (never over an existing file)."""
    bundle_dir, archive = Path(bundle_dir), Path(archive)
    if archive.exists():
        raise CoftError(f"{archive}: already exists; remove it or choose another --out")
    manifest = read_manifest(bundle_dir)
    require_graph(manifest, bundle_dir)
    tmp = archive.with_name(f".{archive.name}.tmp")
    extra = [SIGNATURE] if (bundle_dir / SIGNATURE).is_file() else []
    with tarfile.open(tmp, "w") as tar:
        for name in [MANIFEST, *extra, *manifest["files"]]:
            tar.add(bundle_dir / name, arcname=f"{bundle_dir.name}/{name}")
    os.replace(tmp, archive)
    return archive


def _bundle_root(archive: Path, names: list[str]) -> tuple[str, str]:
    """(folder inside the archive holding manifest.json, name to give the bundle): 'coft pack' archives hold
    one folder; 'tar -C bundle -cf x.tar .' ones hold the files themselves, named after the archive."""
    parts = [Path(n).parts for n in names if Path(n).parts]
    if (MANIFEST,) in parts:
        return "", archive.name.split(".")[0]
    tops = {p[0] for p in parts}
    if len(tops) != 1:
        raise CoftError(f"{archive}: expected one bundle directory in the archive, found {len(tops)}; pack it with 'coft pack'")
    top = tops.pop()
    return top, top


def unpack(archive: str | Path, dest_dir: str | Path, trusted_keys: list[Path] | tuple = ()) -> Bundle:
    """Extract a bundle archive under `dest_dir` and verify it; a bad archive leaves nothing behind."""
    archive, dest_dir = Path(archive), Path(dest_dir)
    if not archive.is_file():
        raise CoftError(f"{archive}: no such file; check the path")
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CoftError(f"{dest_dir}: cannot create the folder to unpack into ({exc.strerror}); give a writable "
                        "--unpack-to") from None
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()  # reads the headers only; nothing is written before the size is known
            size = sum(m.size for m in members if m.isfile())
            if size > MAX_UNPACKED:
                raise CoftError(f"{archive}: unpacks to {size / 2**30:.1f} GiB, more than a bundle holds "
                                f"({MAX_UNPACKED / 2**30:.0f} GiB); not extracted (a damaged or hostile archive?)")
            room_for(dest_dir, size, f"unpacking {archive.name}")
            inside, name = _bundle_root(archive, [m.name for m in members])
            target = dest_dir / name
            if target.exists():
                raise CoftError(f"{target}: already exists; remove it or unpack elsewhere (--unpack-to)")
            staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=dest_dir))
            try:
                tar.extractall(staging, filter="data")
                extracted = staging / inside
                load_bundle(extracted, trusted_keys)
                extracted.chmod(0o755)
                os.rename(extracted, target)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    except (tarfile.TarError, OSError) as exc:
        raise CoftError(f"{archive}: not a readable bundle archive ({exc}); copy it again") from exc
    return load_bundle(target, trusted_keys)
