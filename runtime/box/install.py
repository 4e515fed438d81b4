"""The models on a box: install a bundle archive (or adopt a revision the box wrote), switch atomically, roll back.

Layout under the root (default /opt/coft):
    models/<bundle>/     verified bundles, one directory each
    current -> models/X  what the runtime loads (line.yaml: bundle: /opt/coft/current)
    previous -> models/Y what `coft rollback` returns to
    incoming/            archives as `coft flash` copies them
    trusted-keys/*.pub   when present, only bundles signed by one of these keys install

A bundle is verified (every checksum) before anything changes; the switch is a symlink
renamed over the old one, so the runtime sees either the old model or the new one.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

from coft.runtime.model.bundle import clean_staging, load_bundle, read_manifest, require_graph, unpack
from coft.runtime.model.errors import CoftError
from coft.runtime.model.store import resolved, settle, switch

log = logging.getLogger(__name__)

DEFAULT_ROOT = Path("/opt/coft")


def restart_service(service: str | None) -> str:
    if not service:
        return "not restarted (no service given)"
    if shutil.which("systemctl") is None:
        return "not restarted (no systemctl on this box)"
    result = subprocess.run(["systemctl", "restart", service], capture_output=True, text=True)
    if result.returncode != 0:
        raise CoftError(f"systemctl restart {service} failed: {result.stderr.strip()}; the new model is active, "
                        f"check the service with journalctl -u {service}")
    return f"{service} restarted"


EngineBuilder = Callable[[Path], Path]  # bundle folder -> the engine file it wrote (export/tensorrt.py's)


def build_engine_if_possible(bundle_dir: Path, mode: str, build: EngineBuilder | None) -> str:
    if mode == "no":
        return "skipped (--engine no)"
    from coft.runtime.engines.tensorrt import TRT_MISSING
    missing = TRT_MISSING or (None if build else "no engine builder was given (coft install passes export's)")
    if missing or build is None:
        if mode == "yes":
            raise CoftError(f"{missing}; install with --engine auto to run on ONNX Runtime instead")
        return f"skipped ({missing}); the runtime uses ONNX Runtime"
    return f"built {build(bundle_dir)}"


def trusted_keys(root: Path, extra: list[Path] | tuple = ()) -> list[Path]:
    return sorted((root / "trusted-keys").glob("*.pub")) + list(extra)


def install(archive: str | Path, root: str | Path = DEFAULT_ROOT, engine: str = "auto",
            service: str | None = None, trust: list[Path] | tuple = (), build: EngineBuilder | None = None) -> dict:
    """Verify and unpack an archive, build its engine where TensorRT exists (with `build`, which the command line
    takes from export/: the box room never imports a stage), make it current."""
    root = Path(root).resolve()  # the links must name absolute paths, whatever the caller's folder
    models = root / "models"
    models.mkdir(parents=True, exist_ok=True)
    clean_staging(models)  # what killed installs left
    staging = Path(tempfile.mkdtemp(prefix=".install-", dir=models))
    try:
        bundle = unpack(archive, staging, trusted_keys(root, trust))  # refuses a bad archive before anything changes
        require_graph(bundle.manifest, Path(archive))
        target = models / bundle.path.name
        if target.exists():
            raise CoftError(f"{target}: a bundle of that name is installed already; rename the bundle or remove it")
        engine_note = build_engine_if_possible(bundle.path, engine, build)
        bundle.path.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    old = switch(root / "current", target)
    log.info("active model is now %s (previous: %s)", target.name, old.name if old else "none")
    return {"active": target.name, "previous": old.name if old else None, "engine": engine_note,
            "service": restart_service(service)}


def adopt(bundle_dir: str | Path, root: str | Path = DEFAULT_ROOT, service: str | None = None,
          trust: list[Path] | tuple = ()) -> dict:
    """Make a revision the box wrote (coft learn, a commissioning kept aside) the active model, as install does for
    an archive: verified first (a box with trusted keys: signed, or a revision of a bundle that is), then switched."""
    root, target = Path(root).resolve(), Path(bundle_dir).resolve()
    if target.parent != root / "models":
        raise CoftError(f"{target}: not in {root / 'models'}; adopt takes a revision written beside the installed "
                        f"bundles (coft learn {root / 'current'} ... writes it there), or install an archive")
    load_bundle(target, trusted_keys(root, trust))
    require_graph(read_manifest(target), target)
    old = switch(root / "current", target)
    log.info("active model is now %s (previous: %s)", target.name, old.name if old else "none")
    return {"active": target.name, "previous": old.name if old else None, "service": restart_service(service)}


def rollback(root: str | Path = DEFAULT_ROOT, service: str | None = None) -> dict:
    root = Path(root)
    settle(root / "current")
    new = resolved(root / "previous")
    if new is None or not new.is_dir():
        raise CoftError(f"{root}: no previous model to roll back to")
    old = switch(root / "current", new)
    log.info("rolled back to %s", new.name)
    return {"active": new.name, "previous": old.name if old else None, "service": restart_service(service)}


def describe(root: str | Path = DEFAULT_ROOT) -> str:
    root = Path(root)
    settle(root / "current")
    current, previous = resolved(root / "current"), resolved(root / "previous")
    return json.dumps({"active": current.name if current else None, "previous": previous.name if previous else None})
