"""Fixtures made by the tests (small textured parts as real image files, bundles, a broker, small filesystems), and
the markers that let a run leave out what a machine lacks: `bash tests/run -m "not browser and not gpu"`."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.support.broker import Mosquitto
from tests.support.parts import SIZE, STAIN, defective_part, good_part, stained


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


@pytest.fixture(scope="session")
def masked_set(tmp_path_factory):
    """good/, defect/stain/ and mask/stain/ (magnetic-tile layout), with the stain's true pixels."""
    root = tmp_path_factory.mktemp("masked")
    rng = np.random.default_rng(3)
    for folder in ("train/good", "test/good", "test/defect/stain", "test/mask/stain"):
        (root / folder).mkdir(parents=True)
    for i in range(8):
        cv2.imwrite(str(root / f"train/good/g{i}.png"), good_part(rng))
        cv2.imwrite(str(root / f"test/good/g{i}.png"), good_part(rng))
        cv2.imwrite(str(root / f"test/defect/stain/s{i}.png"), stained(rng))
        mask = np.zeros((128, 128), np.uint8)
        cv2.circle(mask, STAIN[:2], STAIN[2], 255, thickness=-1)
        cv2.imwrite(str(root / f"test/mask/stain/s{i}.png"), mask)
    return root


NEEDS = {  # marker -> the fixtures that bring what it names; a test that starts such a service itself says so with
    "broker": {"mosquitto"},  # @pytest.mark.broker (or ssh, browser, root) above it: --strict-markers holds the names
    "ssh": {"sshd"},
    "browser": {"browser"},
    "root": {"tmpfs"},
}


def pytest_collection_modifyitems(items):
    """Mark each test by the fixtures it takes (what a test starts itself is marked where it is written)."""
    for item in items:
        for marker, fixtures in NEEDS.items():
            if set(item.fixturenames) & fixtures:
                item.add_marker(marker)
