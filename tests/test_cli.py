"""The command line reads like the stages and fails with one line."""

import subprocess
import sys

import pytest

from coft.cli import main


def _coft(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "coft.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_help_lists_the_stages():
    result = _coft("--help")
    assert result.returncode == 0
    listed = [line.split()[0] for line in result.stdout.split("COMMAND\n", 1)[1].split("\noptions:")[0].splitlines()
              if line.startswith("    ") and not line.startswith("     ")]  # a command's line, not its wrapped help
    assert listed == ["train", "eval", "retrain", "learn", "export", "build-engine", "run", "commission", "status",
                      "opcua-certificate", "flash", "install", "adopt", "rollback", "pack", "verify", "sign", "keygen", "demo"]
    assert "Stages: train -> eval -> export -> (sign) -> flash" in " ".join(result.stdout.split())


def test_every_option_says_what_it_does():
    import argparse

    from coft.cli import build_parser

    def silent(parser, name):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                yield from (found for command, sub in action.choices.items() for found in silent(sub, command))
            elif not action.help and action.dest != "help":
                yield f"{name} {'/'.join(action.option_strings) or action.dest}"
    assert list(silent(build_parser(), "coft")) == []
    version = _coft("--version")
    assert version.returncode == 0 and version.stdout.startswith("coft ")


def test_a_missing_input_is_reported_before_torch_is_loaded():
    probe = ("import sys\nfrom coft.cli import main\ntry:\n    main(['train', '/no/such/folder'])\n"
             "except SystemExit as exc:\n    print(exc.code, 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.stdout.split() == ["2", "False"]
    assert result.stderr == "coft train: error: argument good_dir: '/no/such/folder': no such folder " \
                            "(see coft train --help)\n"


def test_progress_is_plain_lines_where_stderr_is_not_a_terminal_and_the_lr_follows_the_backbone(parts, tmp_path):
    from coft.cli import _training_options, build_parser
    result = subprocess.run([sys.executable, "-m", "coft.cli", "train", str(parts / "train/good"), "--out",
                             str(tmp_path / "b"), "--size", "96", "--views", "4", "--backbone", "efficientnet_lite0"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "\r" not in result.stderr  # a CI log or journald gets lines, not redraws
    lr = {backbone: _training_options(build_parser().parse_args(["train", str(parts), "--backbone", backbone]))
          .finetune.lr for backbone in ("dinov2_vits14", "efficientnet_lite0")}
    assert lr == {"dinov2_vits14": 1e-5, "efficientnet_lite0": 1e-4}


@pytest.mark.parametrize("args,message", [
    (["train", "/no/such/folder"], "no such folder"),
    (["train", "--unlabelled", "/no/such/folder"], "no such folder"),
    (["eval", "/no/such/bundle", "/tmp"], "argument bundle: '/no/such/bundle': no such folder"),
    (["export", "/no/such/bundle"], "no such folder"),
    (["verify", "/no/such/bundle"], "no such file or directory"),
])
def test_errors_are_one_line(args, message):
    result = _coft("-q", *args)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_train_pack_verify_install_from_the_command_line(parts, tmp_path, capsys, monkeypatch):
    bundle = tmp_path / "line3.bundle"
    assert main(["-q", "train", str(parts / "train/good"), "--out", str(bundle), "--size", "96", "--views", "4"]) == 0
    assert main(["-q", "pack", str(bundle)]) == 2  # a bundle without its graph cannot run on a box
    assert f"run 'coft export {bundle}' first" in capsys.readouterr().err
    assert main(["-q", "export", str(bundle)]) == 0
    assert main(["-q", "pack", str(bundle)]) == 0
    assert main(["-q", "verify", str(tmp_path / "line3.bundle.tar"), "--unpack-to", str(tmp_path / "box")]) == 0
    assert '"ok": true' in capsys.readouterr().out  # --unpack-to made the missing folder
    assert (tmp_path / "box" / "line3.bundle" / "manifest.json").is_file()
    monkeypatch.chdir(tmp_path)  # a relative --root still writes links that resolve
    assert main(["-q", "install", "line3.bundle.tar", "--root", "relbox", "--engine", "no"]) == 0
    assert (tmp_path / "relbox/current").resolve() == tmp_path / "relbox/models/line3.bundle"
    assert (tmp_path / "relbox/current/manifest.json").is_file()


def test_demo_runs_end_to_end_on_real_solar_cells(tmp_path, capsys):
    rc = main(["-q", "demo", "--out", str(tmp_path / "demo"), "--test-limit", "15", "--method", "coftad",
               "--steps", "2", "--views", "4", "--size", "96", "--stream", "12", "--commission", "0"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "image AUROC" in out and "15 good + 15 defective" in out
    assert "12 cells through the runtime" in out  # every streamed cell reached the PLC over MQTT
    assert (tmp_path / "demo" / "report" / "roc.png").is_file()
    assert (tmp_path / "demo" / "bundle" / "model.onnx").is_file()
