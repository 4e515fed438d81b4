"""Fixtures made by the tests: small textured 'parts', good and defective, written as real image files."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

SIZE = (96, 96)  # model input for tests: small, so the real backbone runs fast


def _cuda_missing() -> str | None:
    """Why the GPU tests cannot run here (no pycuda, or no GPU), or None where they can."""
    try:
        import pycuda.autoinit  # noqa: F401
    except Exception as exc:  # ImportError, or a driver error without a GPU
        return f"no CUDA GPU through pycuda ({type(exc).__name__})"
    return None


CUDA_MISSING = _cuda_missing()


def good_part(rng: np.random.Generator, side: int = 128) -> np.ndarray:
    """A grey machined surface: fine stripes with a random phase, mild noise."""
    y, x = np.mgrid[0:side, 0:side].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi)
    surface = 128 + 12 * np.sin(x / 3.0 + phase) + rng.normal(0, 4, (side, side))
    return np.clip(surface, 0, 255).astype(np.uint8)


def defective_part(rng: np.random.Generator, kind: str, side: int = 128) -> np.ndarray:
    image = good_part(rng, side)
    if kind == "scratch":
        p1 = tuple(int(v) for v in rng.integers(10, side - 10, 2))
        p2 = tuple(int(v) for v in rng.integers(10, side - 10, 2))
        cv2.line(image, p1, p2, 20, thickness=5)
    else:  # stain
        centre = tuple(int(v) for v in rng.integers(25, side - 25, 2))
        cv2.circle(image, centre, int(rng.integers(10, 18)), 235, thickness=-1)
    return image


@pytest.fixture(scope="session")
def parts(tmp_path_factory) -> Path:
    """train/good (8 images) and test/good + test/defect/{scratch,stain}, as 8-bit grayscale PNGs."""
    root = tmp_path_factory.mktemp("parts")
    rng = np.random.default_rng(0)
    folders = {"train/good": 8, "test/good": 12}
    for folder, n in folders.items():
        (root / folder).mkdir(parents=True)
        for i in range(n):
            cv2.imwrite(str(root / folder / f"part{i:02d}.png"), good_part(rng))
    for kind in ("scratch", "stain"):
        (root / "test/defect" / kind).mkdir(parents=True)
        for i in range(8):
            cv2.imwrite(str(root / "test/defect" / kind / f"{kind}{i:02d}.png"), defective_part(rng, kind))
    return root


@pytest.fixture(scope="session")
def frozen_bundle(parts, tmp_path_factory) -> Path:
    from coft.train.pipeline import TrainOptions, train_bundle

    out = tmp_path_factory.mktemp("bundles") / "frozen.bundle"  # the global scorer; tests/test_patch.py has the patch one
    return train_bundle(parts / "train/good", out, TrainOptions(backbone="efficientnet_lite0", size=SIZE, method="frozen", scorer="global", views=6,
                                                                progress=False))


@pytest.fixture(scope="session")
def exported_bundle(frozen_bundle, tmp_path_factory) -> Path:
    import shutil

    from coft.export.onnx import export_onnx

    bundle_dir = tmp_path_factory.mktemp("export") / "b"
    shutil.copytree(frozen_bundle, bundle_dir)
    export_onnx(bundle_dir, max_batch=8)
    return bundle_dir


CLIENTS = Path(__file__).parent / "clients"  # third-party clients (npm), installed by tests/run


def node_client(script: str, args: dict, timeout: float = 120) -> dict:
    """Run one of tests/clients' Node.js scripts (node-opcua, Tahu's sparkplug-payload, MQTT.js) with `args`;
    what it printed, as JSON."""
    import json
    import subprocess

    if not (CLIENTS / "node_modules").is_dir():
        pytest.fail("the Node.js test clients are not installed: run tests/run (it runs npm ci in tests/clients)")
    done = subprocess.run(["node", str(CLIENTS / script), json.dumps(args)], capture_output=True, text=True,
                          timeout=timeout, cwd=CLIENTS)
    assert done.returncode == 0, f"{script} failed:\n{done.stderr[-3000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Mosquitto:
    """A real Mosquitto broker on loopback, with persistence so queued QoS 1 messages survive a restart."""

    def __init__(self, workdir: Path, port: int | None = None, settings: str = "allow_anonymous true\n"):
        import shutil

        if shutil.which("mosquitto") is None:
            raise RuntimeError("mosquitto is not installed: apt-get install mosquitto (the tests need a real broker)")
        self.port = port or free_port()
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.conf = workdir / "mosquitto.conf"
        import os

        stay = "user root\n" if os.geteuid() == 0 else ""  # as root it would drop to 'mosquitto', locked out of tmp
        self.conf.write_text(f"{stay}listener {self.port} 127.0.0.1\n{settings}persistence true\n"
                             f"persistence_location {workdir}/\nmax_queued_messages 100000\n")
        self.process = None

    def start(self) -> Mosquitto:
        import socket
        import subprocess
        import time

        self.process = subprocess.Popen(["mosquitto", "-c", str(self.conf)], stdout=subprocess.DEVNULL,
                                        stderr=open(self.workdir / "mosquitto.log", "a"))
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"mosquitto did not start on port {self.port}")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


@pytest.fixture
def mosquitto(tmp_path):
    broker = Mosquitto(tmp_path / "broker").start()
    yield broker
    broker.stop()


class Tmpfs:
    """Small real filesystems for disk faults: one that fills up, one that turns read-only (needs root)."""

    def __init__(self, root: Path):
        self.root, self.mounts = root, []

    def __call__(self, size_mb: float) -> Path:
        import subprocess

        path = self.root / f"fs{len(self.mounts)}"
        path.mkdir(parents=True)
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(size_mb * 1024)}k", "tmpfs", str(path)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs to inject disk faults ({result.stderr.strip()}); run the tests as root")
        self.mounts.append(path)
        return path

    def read_only(self, path: Path) -> None:
        import subprocess

        subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)

    def unmount_all(self) -> None:
        import subprocess

        for path in reversed(self.mounts):
            subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def tmpfs(tmp_path):
    mounts = Tmpfs(tmp_path / "mounts")
    yield mounts
    mounts.unmount_all()
