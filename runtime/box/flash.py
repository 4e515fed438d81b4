"""`coft flash BUNDLE user@host`: copy a bundle to a box over SSH and make it the active model.

Uses the OpenSSH client in batch mode, so it works with the keys and ~/.ssh/config an
integrator already has. The archive travels on ssh's stdin into `cat > PATH`, with the
path quoted for the remote shell (scp's remote path is shell-parsed by OpenSSH before
9.0 and with `scp -O`, so a folder with a space or `;` in it would break or run code). On the box, `coft install` verifies the archive,
builds the TensorRT engine where TensorRT exists, switches atomically and restarts the
service; if any step fails, the box keeps the model it had.
"""

from __future__ import annotations

import shlex
import subprocess
import tempfile
from pathlib import Path

from coft.runtime.model.bundle import pack, require_graph, unpack
from coft.runtime.model.errors import CoftError


def _ssh_options(identity: str | None, options: list[str]) -> list[str]:
    out = ["-o", "BatchMode=yes", "-o", "ConnectTimeout=10"]
    if identity:
        out += ["-i", identity]
    for option in options:
        out += ["-o", option]
    return out


def flash(bundle_dir: str | Path, target: str, root: str = "/opt/coft", port: int | None = None,
          identity: str | None = None, ssh_options: list[str] | None = None, remote_coft: str = "coft",
          engine: str = "auto", service: str | None = "coft-runtime") -> str:
    bundle_dir = Path(bundle_dir)
    options = _ssh_options(identity, ssh_options or [])
    ssh = ["ssh", *options, *(["-p", str(port)] if port else []), target]
    incoming = f"{root}/incoming"
    with tempfile.TemporaryDirectory() as tmp:
        if bundle_dir.is_file():  # an archive from coft pack: checked here before it travels, sent as it is
            require_graph(unpack(bundle_dir, tmp).manifest, bundle_dir)
            archive = bundle_dir
        else:
            archive = pack(bundle_dir, Path(tmp) / f"{bundle_dir.name}.tar")
        step = subprocess.run([*ssh, f"mkdir -p {shlex.quote(incoming)}"], capture_output=True, text=True)
        if step.returncode != 0:
            raise CoftError(f"cannot reach {target} over SSH: {step.stderr.strip() or step.stdout.strip()}; "
                            "check the address, the key (--identity) and that sshd runs on the box")
        remote_archive = f"{incoming}/{archive.name}"
        with open(archive, "rb") as data:
            step = subprocess.run([*ssh, f"cat > {shlex.quote(remote_archive)}"], stdin=data, capture_output=True,
                                  text=True)
        if step.returncode != 0:
            raise CoftError(f"copying to {target} failed: {step.stderr.strip()}; the box keeps its previous model")
    command = [remote_coft, "install", remote_archive, "--root", root, "--engine", engine]
    if service:
        command += ["--service", service]
    step = subprocess.run([*ssh, shlex.join(command)], capture_output=True, text=True)
    subprocess.run([*ssh, f"rm -f {shlex.quote(remote_archive)}"], capture_output=True)
    if step.returncode != 0:
        detail = (step.stderr.strip().splitlines() or ["no output"])[-1]
        raise CoftError(f"install on {target} failed: {detail}; the box keeps its previous model")
    return step.stdout.strip()
