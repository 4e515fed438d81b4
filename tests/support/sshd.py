"""An OpenSSH server on loopback with its own host key, letting in one test key: a box `coft flash` and the
Ansible playbooks reach over real SSH."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.support.broker import free_port


@contextmanager
def sshd(work: Path) -> Iterator[dict]:
    if not Path("/usr/sbin/sshd").exists():
        pytest.fail("openssh-server is not installed: apt-get install openssh-server (see tests/run)")
    work.mkdir(parents=True, exist_ok=True)
    for name in ("host", "client"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(work / name)], check=True)
    (work / "authorized_keys").write_text((work / "client.pub").read_text())
    os.chmod(work / "authorized_keys", 0o600)
    Path("/run/sshd").mkdir(exist_ok=True)  # privilege separation directory
    port = free_port()
    (work / "sshd_config").write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {work / 'host'}\nAuthorizedKeysFile {work / 'authorized_keys'}\n"
        f"PidFile {work / 'sshd.pid'}\nStrictModes no\nUsePAM no\nPasswordAuthentication no\nPermitRootLogin yes\n"
        "KbdInteractiveAuthentication no\nSubsystem sftp internal-sftp\n")
    server = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(work / "sshd_config")],
                              stdout=subprocess.DEVNULL, stderr=open(work / "sshd.log", "w"))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    try:
        yield {"port": port, "identity": str(work / "client"), "user": os.environ.get("USER", "root"),
               "target": f"{os.environ.get('USER', 'root')}@127.0.0.1",
               "options": ["StrictHostKeyChecking=no", "UserKnownHostsFile=/dev/null", "LogLevel=ERROR"]}
    finally:
        server.terminate()
        server.wait()
