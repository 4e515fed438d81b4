"""The bundle contract: sealed atomically, verified on load, refused with one clear line when wrong."""

import json
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from runtime.bundle import GAUSSIAN, MANIFEST, load_bundle, new_bundle, pack, unpack, update_manifest
from runtime.errors import CoftError
from runtime.scoring import Gaussian


def _manifest() -> dict:
    return {"model_id": "test-model", "backbone": {"name": "efficientnet_lite0", "weights": "backbone.pt"},
            "input": {"height": 32, "width": 32, "colour_order": "BGR"}, "normalisation": {},
            "embedding_dim": 4, "threshold": {"value": 1.5, "method": "test"}}


def _write(out):
    d = 4
    with new_bundle(out, _manifest()) as staging:
        Gaussian(np.zeros(d, np.float32), np.eye(d, dtype=np.float32), np.eye(d, dtype=np.float32)).save(staging / GAUSSIAN)
        (staging / "backbone.pt").write_bytes(b"weights")
    return out


def test_written_bundle_loads_and_lists_checksums(tmp_path):
    bundle = load_bundle(_write(tmp_path / "b"))
    assert bundle.model_id == "test-model" and bundle.threshold == 1.5 and bundle.input_size == (32, 32)
    assert set(bundle.manifest["files"]) == {GAUSSIAN, "backbone.pt"}
    assert bundle.manifest["format_version"] == 1
    assert list(tmp_path.iterdir()) == [tmp_path / "b"]  # no staging directory left behind


def test_wrong_checksum_is_refused(tmp_path):
    out = _write(tmp_path / "b")
    (out / "backbone.pt").write_bytes(b"tampered")
    with pytest.raises(CoftError, match="checksum mismatch for backbone.pt"):
        load_bundle(out)


def test_unknown_format_version_is_refused(tmp_path):
    out = _write(tmp_path / "b")
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["format_version"] = 99
    (out / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CoftError, match="format version 99 is not supported"):
        load_bundle(out)


def test_missing_file_and_missing_manifest_are_refused(tmp_path):
    out = _write(tmp_path / "b")
    (out / "backbone.pt").unlink()
    with pytest.raises(CoftError, match="backbone.pt listed in the manifest is missing"):
        load_bundle(out)
    (out / MANIFEST).unlink()
    with pytest.raises(CoftError, match="no manifest.json"):
        load_bundle(out)
    with pytest.raises(CoftError, match="not a model bundle directory"):
        load_bundle(tmp_path / "nowhere")


def test_existing_path_is_never_overwritten(tmp_path):
    out = _write(tmp_path / "b")
    with pytest.raises(CoftError, match="already exists"):
        _write(out)
    load_bundle(out)


def test_failure_inside_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with new_bundle(tmp_path / "b", _manifest()) as staging:
            (staging / "half.bin").write_bytes(b"x")
            raise RuntimeError("training crashed")
    assert list(tmp_path.iterdir()) == []


def test_archive_round_trip_and_corrupt_archive(tmp_path):
    out = _write(tmp_path / "b")
    archive = pack(out, tmp_path / "b.tar")
    (tmp_path / "box").mkdir()
    unpacked = unpack(archive, tmp_path / "box")
    assert unpacked.path == tmp_path / "box" / "b" and unpacked.model_id == "test-model"
    with pytest.raises(CoftError, match="already exists"):
        unpack(archive, tmp_path / "box")
    broken = tmp_path / "broken.tar"
    broken.write_bytes(archive.read_bytes()[:2000])
    (tmp_path / "box2").mkdir()
    with pytest.raises(CoftError):
        unpack(broken, tmp_path / "box2")
    assert list((tmp_path / "box2").iterdir()) == []


def test_tampered_archive_is_refused_and_leaves_nothing(tmp_path):
    out = _write(tmp_path / "b")
    (out / "backbone.pt").write_bytes(b"tampered")
    archive = tmp_path / "t.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(out, arcname="b")
    (tmp_path / "box").mkdir()
    with pytest.raises(CoftError, match="checksum mismatch"):
        unpack(archive, tmp_path / "box")
    assert list((tmp_path / "box").iterdir()) == []


def test_update_manifest_reseals(tmp_path):
    out = _write(tmp_path / "b")
    update_manifest(out, {"threshold": {"value": 2.0, "method": "labelled-f1-max"}})
    assert load_bundle(out).threshold == 2.0


def test_runtime_never_imports_torch(tmp_path):
    out = _write(tmp_path / "b")
    code = (
        "import sys; from runtime.cli import main; import runtime.bundle, runtime.images, runtime.scoring; "
        f"rc = main(['-q', 'verify', {str(out)!r}]); "
        "assert rc == 0, rc; assert 'torch' not in sys.modules, 'runtime imported torch'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert '"ok": true' in result.stdout
