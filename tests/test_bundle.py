"""The bundle contract: sealed atomically, verified on load, refused with one clear line when wrong."""

import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from coft.runtime.model.bundle import (
    GAUSSIAN,
    MANIFEST,
    SIGNATURE,
    load_bundle,
    new_bundle,
    pack,
    revise,
    sign,
    unpack,
    update_manifest,
)
from coft.runtime.model.errors import CoftError
from coft.runtime.model.manifest import digest, keygen
from coft.runtime.model.scoring import Gaussian


def _manifest() -> dict:
    return {"model_id": "test-model", "backbone": {"name": "efficientnet_lite0", "weights": "backbone.pt"},
            "input": {"height": 32, "width": 32, "colour_order": "BGR"}, "normalisation": {},
            "embedding_dim": 4, "threshold": {"value": 1.5, "method": "test"}}


def _write(out, exported: bool = False):
    """A small bundle; `exported`: with an (unloadable) ONNX graph, as pack, install and flash require."""
    d = 4
    manifest = {**_manifest(), **({"onnx": {"file": "model.onnx", "opset": 18, "max_batch": 1}} if exported else {})}
    with new_bundle(out, manifest) as staging:
        Gaussian(np.zeros(d, np.float32), np.eye(d, dtype=np.float32), np.eye(d, dtype=np.float32)).save(staging / GAUSSIAN)
        (staging / "backbone.pt").write_bytes(b"weights")
        if exported:
            (staging / "model.onnx").write_bytes(b"graph")
    return out


def test_written_bundle_loads_and_lists_checksums(tmp_path):
    bundle = load_bundle(_write(tmp_path / "b"))
    assert bundle.model_id == "test-model" and bundle.threshold == 1.5 and bundle.input_size == (32, 32)
    assert set(bundle.manifest["files"]) == {GAUSSIAN, "backbone.pt"}
    assert bundle.manifest["format_version"] == 2 and bundle.manifest["digest"].startswith("sha256:")
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
    with pytest.raises(CoftError, match="no such file or directory"):
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
    out = _write(tmp_path / "b", exported=True)
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
    update_manifest(out, {"onnx": {"file": "backbone.pt", "max_batch": 8}})
    assert load_bundle(out).spec.onnx.max_batch == 8


def test_a_new_threshold_is_a_new_revision_and_the_old_bundle_is_untouched(tmp_path):
    out = _write(tmp_path / "b")
    before = (out / MANIFEST).read_bytes()
    r2 = revise(out, {"threshold": {"value": 2.0, "method": "labelled-f1-max"}})
    r3 = revise(r2, {"threshold": {"value": 3.0, "method": "labelled-f1-max"}})
    assert (r2.name, r3.name) == ("b-r2", "b-r3") and (out / MANIFEST).read_bytes() == before
    new = load_bundle(r3)
    assert new.threshold == 3.0 and new.model_id == "test-model-r3" and new.manifest["revision_of"] == "test-model-r2"
    for name in (GAUSSIAN, "backbone.pt"):  # unchanged files are shared, not copied: ten revisions, one model
        assert (out / name).stat().st_ino == (r3 / name).stat().st_ino and (out / name).stat().st_nlink == 3
    import shutil
    shutil.rmtree(r2)  # removing one revision leaves the others whole
    assert load_bundle(out).threshold == 1.5 and load_bundle(r3).threshold == 3.0


def _edit(out, change, reseal: bool) -> None:
    """Edit the manifest as someone with a text editor would (reseal: and recompute its digest too)."""
    manifest = json.loads((out / MANIFEST).read_text())
    change(manifest)
    if reseal:
        manifest["digest"] = digest(manifest)
    (out / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("change, reseal, message", [
    (lambda m: m["threshold"].update(value=1e9), False, "manifest digest does not match"),
    (lambda m: m["files"].pop("backbone.pt"), False, "manifest digest does not match"),
    (lambda m: m["threshold"].update(value=float("nan")), False, "number JSON cannot carry"),
    (lambda m: m["threshold"].update(value=1e-300 * 0), True, "threshold.value: Input should be greater than 0"),
    (lambda m: m["threshold"].update(value="1.5"), True, "threshold.value: Input should be a valid number"),
    (lambda m: m["input"].update(height="32"), True, "input.height: Input should be a valid integer"),
    (lambda m: m.update(onnx={"file": "../../etc/passwd"}), True, "onnx.file: String should match pattern"),
    (lambda m: m.update(onnx={"file": "model.onnx", "max_batch": 8}), True, "names model.onnx but does not list its checksum"),
    (lambda m: m["files"].update({"../x": "0" * 64}), True, "not a plain name inside the bundle"),
])
def test_edited_or_impossible_manifest_is_refused_in_one_line(tmp_path, change, reseal, message):
    out = _write(tmp_path / "b")
    _edit(out, change, reseal)
    with pytest.raises(CoftError, match=message) as error:
        load_bundle(out)
    assert "\n" not in str(error.value)


def test_signed_bundles_on_a_box_that_trusts_keys(tmp_path):
    out = _write(tmp_path / "b", exported=True)
    vendor_key, vendor_pub = keygen(tmp_path / "vendor")
    _, stranger_pub = keygen(tmp_path / "stranger")
    assert vendor_key.stat().st_mode & 0o777 == 0o600
    load_bundle(out)  # no trusted keys: nothing demanded
    with pytest.raises(CoftError, match="bundle is not signed"):
        load_bundle(out, [vendor_pub])
    key_id = sign(out, vendor_key)
    assert load_bundle(out, [stranger_pub, vendor_pub]).model_id == "test-model"
    with pytest.raises(CoftError, match=f"signed by key '{key_id}', which is not among this box's 1 trusted"):
        load_bundle(out, [stranger_pub])
    archive = pack(out, tmp_path / "b.tar")  # the signature travels in the archive
    (tmp_path / "box").mkdir()
    assert unpack(archive, tmp_path / "box", [vendor_pub]).model_id == "test-model"
    _edit(out, lambda m: m["threshold"].update(value=2.0), reseal=True)  # digest recomputed: only the key can tell
    with pytest.raises(CoftError, match="signature does not match the manifest"):
        load_bundle(out, [vendor_pub])
    box = tmp_path / "box" / "b"
    r2 = revise(box, {"threshold": {"value": 2.0, "method": "x"}})  # commissioning on the box
    assert not (r2 / SIGNATURE).exists()
    r3 = revise(r2, {"threshold": {"value": 2.5, "method": "x"}})
    assert load_bundle(r3, [vendor_pub]).threshold == 2.5  # trusted through the chain to the signed bundle
    forged = revise(box, {"backbone": {"name": "efficientnet_lite0", "weights": "backbone.pt", "x": 1}},
                    files={"backbone.pt": lambda path: path.write_bytes(b"other weights")})
    with pytest.raises(CoftError, match="unsigned, and it changed backbone, backbone.pt of the signed b"):
        load_bundle(forged, [vendor_pub])
    load_bundle(forged)  # a box without trusted keys demands nothing
    _edit(box, lambda m: m["threshold"].update(value=3.0), reseal=True)  # the parent edited after the fact
    with pytest.raises(CoftError, match="unsigned, and the bundle it revises does not verify"):
        load_bundle(r3, [vendor_pub])


def test_archive_of_the_bundle_folder_contents_unpacks(tmp_path):
    out = _write(tmp_path / "b")
    archive = tmp_path / "x.tar"
    subprocess.run(["tar", "-C", str(out), "-cf", str(archive), "."], check=True)
    (tmp_path / "box").mkdir()
    assert unpack(archive, tmp_path / "box").path == tmp_path / "box" / "x"


def test_pack_never_overwrites_and_verify_names_a_missing_file(tmp_path):
    with pytest.raises(CoftError, match="has no ONNX graph .* run 'coft export .*' first"):
        pack(_write(tmp_path / "plain"), tmp_path / "plain.tar")
    assert not (tmp_path / "plain.tar").exists()
    out = _write(tmp_path / "b", exported=True)
    pack(out, tmp_path / "b.tar")
    with pytest.raises(CoftError, match="b.tar: already exists"):
        pack(out, tmp_path / "b.tar")
    with pytest.raises(CoftError, match="no such file"):
        unpack(tmp_path / "missing.tar", tmp_path)
    with pytest.raises(CoftError, match="no such file or directory"):
        load_bundle(tmp_path / "missing")


def test_runtime_never_imports_torch(tmp_path):
    out = _write(tmp_path / "b")
    code = (
        "import sys; from coft.cli import main; import coft.runtime.model.bundle, coft.runtime.model.images, coft.runtime.model.scoring; "
        f"rc = main(['-q', 'verify', {str(out)!r}]); "
        "assert rc == 0, rc; assert 'torch' not in sys.modules, 'runtime imported torch'"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert '"ok": true' in result.stdout


def test_revisions_never_share_a_model_id_however_the_bundle_is_named(tmp_path):
    """Issue 34: `coft learn box/current` twice wrote X-r2 and X-r3 whose manifests both said X-r2. Each revision
    made through a box's `current` link, into an --out of its own, or beside a folder named otherwise, takes an
    id no bundle there holds."""
    models = tmp_path / "models"
    out = _write(models / "line1")
    current = tmp_path / "current"
    current.symlink_to(out)
    first = revise(current, {"threshold": {"value": 2.0, "method": "x"}})
    second = revise(current, {"threshold": {"value": 2.5, "method": "x"}})
    elsewhere = revise(current, {"threshold": {"value": 3.0, "method": "x"}}, models / "by-hand")
    ids = [load_bundle(p).model_id for p in (out, first, second, elsewhere)]
    assert (first.parent, first.name, second.name) == (models, "line1-r2", "line1-r3")
    assert len(set(ids)) == 4, ids


def test_commissioning_finds_its_revision_beside_the_bundle_a_link_names(tmp_path):
    from coft.runtime.model.bundle import commissioned_revision
    out = _write(tmp_path / "models" / "line1")
    current = tmp_path / "current"
    current.symlink_to(out)
    done = revise(current, {"commissioning": {"cameras": ["cam1"]}})
    assert commissioned_revision(current, "test-model", ["cam1"]) == done


@pytest.mark.parametrize("killed_after", [1, 2])
def test_a_switch_killed_between_its_steps_never_forgets_the_rollback_target(tmp_path, monkeypatch, killed_after):
    """The links move in three steps; a kill after the first leaves the old pair, after the second the new one."""
    import os

    from coft.runtime.box import install
    from coft.runtime.model import store
    root = tmp_path / "box"
    a, b, c = (_write(root / "models" / n) for n in ("a", "b", "c"))
    install.switch(root / "current", a)
    install.switch(root / "current", b)  # current -> b, previous -> a
    real, steps = os.replace, []

    def dying_replace(src, dst):
        steps.append(dst)
        if len(steps) > killed_after:
            raise KeyboardInterrupt("killed")
        real(src, dst)
    monkeypatch.setattr(store.os, "replace", dying_replace)
    with pytest.raises(KeyboardInterrupt):
        install.switch(root / "current", c)
    monkeypatch.setattr(store.os, "replace", real)
    described = json.loads(install.describe(root))
    assert described == ({"active": "b", "previous": "a"} if killed_after == 1 else {"active": "c", "previous": "b"})
    assert install.rollback(root)["active"] == described["previous"]


def test_staging_of_killed_runs_is_cleaned_and_runs_in_flight_are_not(tmp_path):
    """Issue 34: `.X-rN.partial-*` and `.X-rN.graph` of killed learns (74 MB each) and `.install-*` stayed forever."""
    import os
    import time

    from coft.runtime.model.bundle import clean_staging
    killed = [tmp_path / ".b-r2.partial-x1y2", tmp_path / ".install-abc", tmp_path / ".unpack-q"]
    for folder in killed:
        (folder / "sub").mkdir(parents=True)
        (folder / "sub" / "model.onnx").write_bytes(b"x" * 1000)
    graph = tmp_path / ".b-r3.graph"
    graph.write_bytes(b"y" * 500)
    in_flight = tmp_path / ".b-r4.partial-zz"
    in_flight.mkdir()
    keep = _write(tmp_path / "b")
    old = time.time() - 3600
    for path in [*killed, graph]:
        os.utime(path, (old, old))
    assert clean_staging(tmp_path) == (4, 3500)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".b-r4.partial-zz", "b"] and load_bundle(keep)


def test_an_archive_that_unpacks_beyond_the_disk_is_refused_before_anything_is_written(tmp_path, tmpfs):
    """Issue 34: a 2 MB gzip bomb filled the disk before the archive's signature was checked."""
    import io
    bomb = tmp_path / "bomb.tar.gz"
    with tarfile.open(bomb, "w:gz") as tar:
        info = tarfile.TarInfo("b/model.onnx")
        info.size = 8 << 20
        tar.addfile(info, io.BytesIO(bytes(info.size)))
    assert bomb.stat().st_size < 100_000
    disk = tmpfs(2)
    with pytest.raises(CoftError, match="needs 8 MB and .* has [0-9]+ MB free"):
        unpack(bomb, disk)
    assert list(disk.iterdir()) == []


def test_the_commissioning_review_keeps_its_threshold_after_learning_grew_the_bank(tmp_path):
    """Known since three sessions: the page's review answered 404 once learning had replaced the commissioned
    revision. The review's frames were scored on the commissioned model, so it is judged on that threshold,
    found through the learned revision's parents, beside it (or through a box's `current` link)."""
    from coft.runtime.model.bundle import commissioned_ancestor
    out = _write(tmp_path / "models" / "line1")
    fitted = {"value": 2.0, "method": "commissioning-conformal", "target_false_reject_rate": 0.01}
    commissioned = revise(out, {"threshold": fitted, "commissioning": {"cameras": ["cam1"], "frames_folder": "f"}})
    learned = revise(commissioned, {"threshold": {"value": 0.7, "method": "learn-conformal", "previous": 2.0}})
    again = revise(learned, {"threshold": {"value": 0.6, "method": "learn-conformal", "previous": 0.7}})
    current = tmp_path / "current"
    current.symlink_to(again)
    assert commissioned_ancestor(current, load_bundle(current).manifest) == (commissioned.resolve(), fitted)
    assert commissioned_ancestor(out, load_bundle(out).manifest) is None  # never commissioned: no review
    shutil.rmtree(commissioned)  # its revision removed by hand: no threshold to judge on, said as none
    assert commissioned_ancestor(current, load_bundle(current).manifest) is None


def test_docs_list_the_manifest_fields_the_schema_checks():
    """docs/bundle.md's field table is ManifestSchema's: a field added, tightened or described anew shows there."""
    from coft.runtime.model.manifest import field_table

    docs = (Path(__file__).resolve().parents[1] / "docs" / "bundle.md").read_text()
    shown = docs.split("<!-- manifest fields: begin -->\n")[1].split("<!-- manifest fields: end -->")[0]
    assert shown.splitlines() == field_table(), ("docs/bundle.md's manifest table differs from ManifestSchema; paste "
                                                 "coft.runtime.model.manifest.field_table() between its markers")
