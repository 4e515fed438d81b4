"""deploy/ansible run as a plant runs it: ansible-playbook over real SSH to three boxes (sshd on loopback ports,
each box with its own root), their lines' accounts on a real Mosquitto through the shipped ACL, real runtimes.
systemd cannot run here, so the boxes' service manager is a restart command doing what systemd's restart does."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import onnx
import pytest
import yaml
from onnx import TensorProto, helper

from coft.runtime.model.bundle import update_manifest
from coft.runtime.model.manifest import keygen
from tests.support.broker import Mosquitto, free_port
from tests.support.sshd import sshd

ROOT = Path(__file__).resolve().parents[1]
PLAYBOOKS = ROOT / "deploy/ansible"
BIN = Path(sys.executable).parent
COFT = str(BIN / "coft")
LINES = ("l1", "l2", "l3")

# What systemd's restart does, for boxes without systemd: stop (TERM, KILL after 5 s), start detached.
RESTART = f"""#!/bin/sh
box=$1
if [ -f "$box/run.pid" ]; then
    pid=$(cat "$box/run.pid"); kill "$pid" 2>/dev/null; i=0
    while [ -d "/proc/$pid" ] && ! grep -q '^State:.*Z' "/proc/$pid/status" 2>/dev/null && [ $i -lt 25 ]; do
        sleep 0.2; i=$((i+1)); done
    kill -9 "$pid" 2>/dev/null
fi
setsid nohup {COFT} run --config "$box/etc/line.yaml" >> "$box/runtime.log" 2>&1 < /dev/null &
echo $! > "$box/run.pid"
"""


def ansible(playbook: str, inventory: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "ANSIBLE_CONFIG": str(PLAYBOOKS / "ansible.cfg"), "ANSIBLE_HOST_KEY_CHECKING": "False",
           "PATH": f"{BIN}:{os.environ['PATH']}", "ANSIBLE_LOCAL_TEMP": str(inventory.parent / "ansible-tmp")}
    return subprocess.run([str(BIN / "ansible-playbook"), "-i", str(inventory), str(PLAYBOOKS / playbook), *extra],
                          capture_output=True, text=True, env=env, cwd=PLAYBOOKS, timeout=600)


def recap(result: subprocess.CompletedProcess) -> dict[str, dict[str, int]]:
    """PLAY RECAP's counts per host."""
    counts = {}
    for host, fields in re.findall(r"^(\S+)\s+: (ok=.*)$", result.stdout, re.M):
        counts[host] = {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", fields)}
    return counts


def health(box: Path) -> dict:
    out = subprocess.run([COFT, "status", "--json", "--config", str(box / "etc/line.yaml")], capture_output=True,
                         text=True)
    return json.loads(out.stdout)


def bundle_named(source: Path, model_id: str, tmp_path: Path) -> Path:
    target = tmp_path / model_id
    shutil.copytree(source, target)
    update_manifest(target, {"model_id": model_id})
    return target


def hanging(source: Path, tmp_path: Path) -> Path:
    """A bundle whose graph never returns: its score waits on a Loop of 2^62 turns seeded by the score itself
    (so no optimiser can fold it away), the way a broken engine build or driver hangs."""
    target = bundle_named(source, "hangs", tmp_path)
    model = onnx.load(target / "model.onnx")
    graph = model.graph
    producer = next(node for node in graph.node if "score" in node.output)
    producer.output[list(producer.output).index("score")] = "score_raw"
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Add", ["v_in", "one"], ["v_out"])],
        "spin", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                 helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                 helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [])],
        [helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])])
    graph.initializer.extend([helper.make_tensor("turns", TensorProto.INT64, [], [1 << 62]),
                              helper.make_tensor("go", TensorProto.BOOL, [], [True]),
                              helper.make_tensor("nothing", TensorProto.FLOAT, [], [0.0])])
    graph.node.extend([helper.make_node("ReduceMax", ["score_raw"], ["seed"], keepdims=0),
                       helper.make_node("Loop", ["turns", "go", "seed"], ["spun"], body=body),
                       helper.make_node("Mul", ["spun", "nothing"], ["zero"]),
                       helper.make_node("Add", ["score_raw", "zero"], ["score"])])
    update_manifest(target, {}, files={"model.onnx": lambda path: onnx.save(model, path)})
    return target


@pytest.fixture
def plant(tmp_path, parts):
    """Three boxes (one line each) and the shared broker; the broker's files start with an account that is not a
    line's (the operator's) and an empty ACL, which site.yml must fill."""
    with ExitStack() as stack:
        servers = [stack.enter_context(sshd(tmp_path / f"sshd{i}")) for i in range(3)]
        broker_dir = tmp_path / "mosquitto"
        broker_dir.mkdir()
        subprocess.run(["mosquitto_passwd", "-c", "-b", str(broker_dir / "passwd"), "operator", "operator-pw"],
                       check=True)
        (broker_dir / "coft.acl").write_text("")
        broker = Mosquitto(tmp_path / "broker", settings=f"allow_anonymous false\npassword_file {broker_dir}/passwd\n"
                                                        f"acl_file {broker_dir}/coft.acl\n").start()
        stack.callback(broker.stop)
        restart = tmp_path / "restart.sh"
        restart.write_text(RESTART)
        boxes = [tmp_path / f"box{i + 1}" for i in range(3)]
        stack.callback(lambda: [subprocess.run(["pkill", "-9", "-f", f"{box}/etc/line.yaml"]) for box in boxes])

        def ssh(server: dict) -> dict:
            return {"ansible_host": "127.0.0.1", "ansible_port": server["port"], "ansible_user": server["user"],
                    "ansible_ssh_private_key_file": server["identity"], "ansible_python_interpreter": sys.executable,
                    "ansible_ssh_common_args": "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null"}

        lines = {}
        for line, box, server in zip(LINES, boxes, servers):
            lines[line] = {"hosts": {box.name: ssh(server)}, "vars": {
                "coft_line": line, "coft_mqtt_password": f"{line}-secret",
                "coft_cameras": [{"name": "cam1", "source": str(parts / "test/good"), "loop": True, "fps": 5}],
                "coft_root": str(box / "opt"), "coft_etc": str(box / "etc"), "coft_state": str(box / "state"),
                "coft_web_port": free_port(), "coft_metrics_port": 0,
                "coft_harvest": {"every_nth_pass": 1, "max_mb": 20},
                "coft_line_extra": {"stall_s": 10, "backend": "onnxruntime"},
                "coft_restart_command": f"sh {restart} {box}"}}
        common = {"coft_become": False, "coft_create_user": False, "coft_user": "root", "coft_group": "root",
                  "coft_install": "present", "coft_command": COFT, "coft_service_manager": "command",
                  "coft_broker_port": broker.port, "coft_healthy_within_s": 60, "coft_health_poll_s": 1,
                  "coft_controller_command": COFT, "coft_collect_controller_dir": str(tmp_path / "collected"),
                  "coft_training_root": str(tmp_path / "training")}
        private, public = keygen(tmp_path / "vendor")  # the controller signs; every box runs only what it signed
        common.update(coft_signing_key=str(private), coft_trusted_key=str(public))
        inventory = tmp_path / "plant.yml"
        inventory.write_text(yaml.safe_dump({"all": {"vars": common, "children": {
            "coft_boxes": {"children": lines},
            "coft_broker": {"hosts": {"broker": {**ssh(servers[0]), "coft_broker_mosquitto_dir": str(broker_dir),
                                                 "coft_broker_service_manager": "command",
                                                 "coft_broker_reload_command": f"kill -HUP {broker.process.pid}"}}},
            "coft_training": {"hosts": {"training": ssh(servers[2])}}}}}))
        yield {"inventory": inventory, "boxes": boxes, "broker": broker, "tmp": tmp_path}


@pytest.mark.broker
@pytest.mark.ssh
def test_the_playbooks_provision_roll_out_with_a_canary_roll_back_and_collect(plant, exported_bundle, tmp_path):
    inventory, boxes = plant["inventory"], plant["boxes"]
    first = ansible("site.yml", inventory)
    assert first.returncode == 0, first.stdout[-3000:]
    assert all(counts["changed"] > 0 for counts in recap(first).values())
    line_yaml = yaml.safe_load((boxes[0] / "etc/line.yaml").read_text())
    assert line_yaml["broker"] == {"host": "localhost", "port": plant["broker"].port, "line": "l1", "username": "l1",
                                   "password_file": f"{boxes[0]}/etc/mqtt-password"}
    passwd = (plant["tmp"] / "mosquitto/passwd").read_text()
    assert [row.split(":")[0] for row in passwd.splitlines()] == ["operator", "l1", "l2", "l3"]
    assert (plant["tmp"] / "mosquitto/coft.acl").read_text() == (ROOT / "deploy/mosquitto/coft.acl").read_text()
    assert line_yaml["trusted_keys"] == [f"{boxes[0]}/opt/trusted-keys/vendor.pub"]

    again = ansible("site.yml", inventory)
    assert again.returncode == 0 and all(c["changed"] == 0 for c in recap(again).values()), again.stdout[-3000:]

    for model in ("v1", "v2"):
        rollout = ansible("rollout.yml", inventory, "-e", f"bundle={bundle_named(exported_bundle, model, tmp_path)}",
                          "-e", "coft_batch=2")
        assert rollout.returncode == 0, rollout.stdout[-3000:]
        assert [health(box)["model_id"] for box in boxes] == [model] * 3  # each runs it, verdicts coming
        assert all(health(box)["healthy"] for box in boxes)
    assert rollout.stdout.rindex("[box1]") < rollout.stdout.index("[box2]")  # the canary done before the rest

    stuck = ansible("rollout.yml", inventory, "-e", f"bundle={hanging(exported_bundle, tmp_path)}",
                    "-e", "coft_healthy_within_s=25")
    assert stuck.returncode != 0
    assert "rolled back to its previous model, the rollout stops here" in stuck.stdout
    assert "box2" not in recap(stuck) or recap(stuck)["box2"]["changed"] == 0, stuck.stdout[-3000:]
    assert [(box / "opt/current").resolve().name for box in boxes] == ["v2", "v2", "v2"]
    wait = ansible("rollback.yml", inventory, "--limit", "l3")  # line 3 goes back one model
    assert wait.returncode == 0, wait.stdout[-3000:]
    assert [health(box)["model_id"] for box in boxes] == ["v2", "v2", "v1"]

    collect = ansible("collect.yml", inventory)
    assert collect.returncode == 0, collect.stdout[-3000:]
    for line, box in zip(LINES, boxes):
        kept = list((plant["tmp"] / "training" / line / box.name / "harvest/cam1").glob("*.jpg"))
        assert kept and all(frame.with_suffix(".json").is_file() for frame in kept), f"{box.name}: {kept[:3]}"


def test_the_playbooks_are_ansible_lint_clean():
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    result = subprocess.run([str(BIN / "ansible-lint"), "--offline", "--nocolor", "."], capture_output=True,
                            text=True, cwd=PLAYBOOKS, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
