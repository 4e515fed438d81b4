"""Training writes a working bundle; evaluation reports it honestly; bad input fails cleanly."""

import json

import numpy as np
import pytest

from coft.runtime.model.bundle import load_bundle
from coft.runtime.model.errors import CoftError
from coft.train.coftad import FinetuneConfig
from coft.train.evaluate import evaluate
from coft.train.pipeline import TrainOptions, train_bundle
from coft.train.scorers.gaussian import global_fit
from coft.train.threshold import good_only_threshold, labelled_threshold
from tests.support.parts import SIZE


def test_frozen_bundle_is_complete_and_verifiable(frozen_bundle):
    bundle = load_bundle(frozen_bundle)
    m = bundle.manifest
    assert m["backbone"]["name"] == "efficientnet_lite0" and m["embedding_dim"] == 1280
    assert m["input"] == {"height": 96, "width": 96, "colour_order": "BGR", "dtype": "uint8", "layout": "NHWC",
                          "size_from": "--size"}  # the tests give the size; a user who does not gets the shots' shape
    assert m["normalisation"]["mean"] == [127.0] * 3 and m["normalisation"]["std"] == [128.0] * 3
    assert m["threshold"]["method"] == "leave-one-out" and m["threshold"]["value"] > 0
    assert m["training"]["shots"] == 8 and len(m["training"]["dataset_fingerprint"]) == 64
    assert set(m["files"]) == {"gaussian.npz", "backbone.pt", "calibration.npz"}


def test_eval_separates_defects_writes_the_report_and_states_the_operating_point(frozen_bundle, parts, tmp_path,
                                                                               caplog):
    import shutil
    data = shutil.copytree(parts / "test", tmp_path / "data")
    for shot in sorted((parts / "train/good").iterdir())[:2]:  # two training shots slipped into the test folder
        shutil.copy(shot, data / "good" / f"shot-{shot.name}")
    report = evaluate(frozen_bundle, data, tmp_path / "report", progress=False)
    assert report["counts"] == {"good": 12, "defect": 16, "unreadable": 0, "training_shots_left_out": 2}
    assert "2 of the 30 images are the bundle's own training shots" in caplog.text
    m = report["metrics"]
    assert m["auroc"] > 0.9 and 0 <= m["escape_at_5pct_frr"] <= m["escape_at_1pct_frr"] <= 1
    assert report["promise"].startswith("an estimate from 8 good images, no promise: 8 images can promise at best "
                                        "false-reject <= 31%")
    assert "escape at 1% false-reject" in (tmp_path / "report/report.md").read_text()
    assert set(report["per_type"]) == {"scratch", "stain"}
    for name in ("report.json", "report.md", "roc.png", "histogram.png", "scores.csv"):
        assert (tmp_path / "report" / name).stat().st_size > 0, name
    assert json.loads((tmp_path / "report/report.json").read_text())["model_id"] == report["model_id"]


def test_recalibration_from_labels_writes_a_new_revision(frozen_bundle, parts, tmp_path):
    copy = tmp_path / "b"
    import shutil
    shutil.copytree(frozen_bundle, copy)
    original = load_bundle(copy).manifest
    report = evaluate(copy, parts / "test", tmp_path / "r", recalibrate="escape=0", progress=False)
    assert report["at_threshold"]["escape_rate"] == 0.0 and report["revision"] == str(tmp_path / "b-r2")
    # held out, "no escapes" cannot hold: the fold with the lowest-scoring defect was fitted without it
    assert report["held_out"]["escape_rate"] > 0
    revised = load_bundle(report["revision"])
    assert revised.manifest["threshold"]["method"] == "labelled-escape-rate"
    assert revised.model_id == original["model_id"] + "-r2" and load_bundle(copy).manifest == original
    report = evaluate(revised.path, parts / "test", tmp_path / "r2", recalibrate="f1", progress=False)
    assert load_bundle(tmp_path / "b-r3").threshold == pytest.approx(report["metrics"]["f1_max_threshold"])
    held = report["held_out"]  # the rates of a threshold on parts it was not fitted on, beside the flattering ones
    n_good, n_defect = report["counts"]["good"], report["counts"]["defect"]
    assert held["folds"] == 5  # whole parts: rates are counts over the set's parts, not fractions of a fit
    assert (held["false_reject_rate"] * n_good) == pytest.approx(round(held["false_reject_rate"] * n_good))
    assert (held["escape_rate"] * n_defect) == pytest.approx(round(held["escape_rate"] * n_defect))
    assert "held out (5-fold" in (tmp_path / "r2/report.md").read_text()


def test_eval_from_the_command_line_says_what_it_did_and_keeps_earlier_reports(frozen_bundle, parts, tmp_path, capsys):
    from coft.cli import main
    from coft.runtime.model.bundle import revise

    lax = revise(frozen_bundle, {"threshold": {**load_bundle(frozen_bundle).manifest["threshold"], "value": 1e6}},
                 tmp_path / "lax.bundle")  # a threshold that lets every defect pass
    assert main(["-q", "eval", str(lax), str(parts / "test")]) == 0
    assert main(["-q", "eval", str(lax), str(parts / "test"), "--recalibrate", "f1"]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "lax.bundle.report/report.md").is_file() and (tmp_path / "lax.bundle.report-2/report.md").is_file()
    first, second = out.split("report: ")[:2]
    assert "warning: 100% of these defects pass at the bundle's threshold; next:" in first
    assert "escape at 1% / 5% false-reject" in first and "F1-max is rarely a line's operating point" in second


def test_coftad_is_deterministic_with_a_seed(parts, tmp_path):
    options = dict(backbone="efficientnet_lite0", scorer="patch", size=SIZE, method="coftad", views=4, progress=False,
                   finetune=FinetuneConfig(steps=3, batch=4, negatives=True, view_pool=4))
    a = load_bundle(train_bundle(parts / "train/good", tmp_path / "a", TrainOptions(**options)))
    b = load_bundle(train_bundle(parts / "train/good", tmp_path / "b", TrainOptions(**options)))
    np.testing.assert_array_equal(a.gaussian.mean, b.gaussian.mean)
    losses = a.manifest["training"]["final_losses"]
    assert losses["np"] >= 0 and losses["con"] > 0
    assert a.manifest["training"]["finetune"]["steps"] == 3


def test_coftad_without_view_pool_and_with_shots(parts, tmp_path):
    options = TrainOptions(size=SIZE, method="coftad", views=4, shots=3, seed=1, progress=False,
                           finetune=FinetuneConfig(steps=2, batch=4, view_pool=0))
    bundle = load_bundle(train_bundle(parts / "train/good", tmp_path / "b", options))
    assert len(bundle.manifest["training"]["images"]) == 3


def test_bad_training_input(parts, tmp_path):
    with pytest.raises(CoftError, match="only 8 readable images"):
        train_bundle(parts / "train/good", tmp_path / "x", TrainOptions(size=SIZE, shots=12, progress=False))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CoftError, match="no image files"):
        train_bundle(tmp_path / "empty", tmp_path / "y", TrainOptions(size=SIZE, progress=False))
    (tmp_path / "taken").mkdir()
    with pytest.raises(CoftError, match="already exists"):
        train_bundle(parts / "train/good", tmp_path / "taken", TrainOptions(size=SIZE, progress=False))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "taken"]


def test_threshold_from_good_images_only(caplog):
    rng = np.random.default_rng(0)
    views = rng.normal(size=(2, 8, 6)) + 4
    info = good_only_threshold(views, 0.01, global_fit())
    assert info["method"] == "held-out-views" and info["calibration_scores"] == 8
    assert "train on 3 or more images" in caplog.text  # views of 2 parts say little about the next part
    assert good_only_threshold(rng.normal(size=(5, 3, 6)), 0.01, global_fit())["method"] == "leave-one-out"
    with pytest.raises(CoftError, match="--views 4"):
        good_only_threshold(views[:, :2], 0.01, global_fit())
    with pytest.raises(CoftError, match="between 0 and 1"):
        good_only_threshold(views, 1.5, global_fit())


def test_labelled_threshold_rules():
    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    scores = np.array([1.0, 2.0, 3.0, 2.5, 4.0, 5.0, 6.0])
    t = labelled_threshold(labels, scores, "escape=0.25")["value"]
    assert (scores[labels == 1] <= t).sum() <= 1 and t >= 2.5 - 1e-6
    assert labelled_threshold(labels, scores, "escape=0")["value"] < 2.5
    with pytest.raises(CoftError, match="escape=0.01"):
        labelled_threshold(labels, scores, "escape=lots")
    with pytest.raises(CoftError, match="both good and defective"):
        labelled_threshold(np.zeros(3), scores[:3], "f1")


def test_tile_titles_keep_the_end_of_a_file_name_where_frames_differ():
    from coft.train.evaluate import short_name
    assert short_name("cam1-000000123-reject.jpg") == "…000123-reject.jpg" and short_name("a.png") == "a.png"
    assert short_name("cam1-000000123-reject.jpg") != short_name("cam1-000000124-reject.jpg")


def test_the_input_size_follows_the_shots_shape_unless_they_disagree():
    from coft.train.shape import PATCH, input_size, size_for_aspect

    size, why = input_size([(230, 100, 3)] * 9 + [(240, 100, 3)])  # a tall part, photographed the same way
    assert size == (518, 224) and size[0] % PATCH == 0  # the short side kept, the long one 2.3 times it
    assert "height/width 2.30" in why and "2.3x the patches" in why
    assert input_size([(100, 230, 3)] * 10)[0] == (224, 518)  # and lying down
    assert input_size([(300, 300, 3)] * 10)[0] == (224, 224)  # square parts stay square
    mixed, why = input_size([(230, 100, 3), (400, 600, 3), (300, 300, 3)])  # a folder of several shapes
    assert mixed == (224, 224) and "vary from 0.67 to 2.30" in why
    assert size_for_aspect(40.0) == size_for_aspect(4.0) == (896, 224)  # clamped at 4:1
