"""The live view in a real headless browser (Debian's chromium through its chromedriver), served by a real
runtime process that scores real solar-cell images (elpv-dataset) and publishes to a real Mosquitto.

Set COFT_SCREENSHOTS=FOLDER to keep the screenshots (the docs' come from here).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.support.broker import Mosquitto, Subscriber, free_port
from tests.support.runtime import ROOT, api, start_runtime, write_config
from tests.support.wait import wait_until

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
TOKEN = "op-7f3a-line-token"
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="needs Debian's chromium and chromium-driver: tests/run installs them")


@pytest.fixture(scope="module")
def line(tmp_path_factory):
    """A patch bundle (maps and defect boxes) on 10 good mono cells, and a line folder of 24 good and 8 cracked ones."""
    from coft.demo import elpv_cells
    from coft.export.onnx import export_onnx
    from coft.train.pipeline import TrainOptions, train_bundle

    root = tmp_path_factory.mktemp("web")
    paths, defect_probability, cell_type = elpv_cells()
    mono = [i for i, t in enumerate(cell_type) if t == "mono"]
    good = [paths[i] for i in mono if defect_probability[i] == 0]
    cracked = [paths[i] for i in mono if defect_probability[i] == 1]
    (root / "good").mkdir()
    (root / "line").mkdir()
    for path in good[:10]:
        shutil.copy(path, root / "good" / path.name)
    for n, path in enumerate([p for pair in zip(good[10:34:3], cracked[:8]) for p in pair] + good[40:56]):
        shutil.copy(path, root / "line" / f"{n:03d}-{path.name}")
    bundle = train_bundle(root / "good", root / "b.bundle", TrainOptions(
        backbone="efficientnet_lite0", method="frozen", scorer="patch", views=4, progress=False))
    export_onnx(bundle, max_batch=8)
    return root, bundle


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1500"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


@pytest.mark.broker
def test_live_view_in_a_real_browser(line, browser, tmp_path):
    from selenium.webdriver.common.by import By

    root, bundle = line
    shots = Path(os.environ.get("COFT_SCREENSHOTS") or tmp_path / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    (tmp_path / "token").write_text(TOKEN)
    broker = Mosquitto(tmp_path / "broker").start()
    plc = Subscriber(broker.port)
    port = free_port()
    config = write_config(tmp_path, bundle, broker.port, [{"name": "cam1", "source": str(root / "line"), "loop": True,
                                                           "fps": 6}],
                          evidence={"dir": str(tmp_path / "evidence")},
                          harvest={"dir": str(tmp_path / "harvest"), "every_nth_pass": 50},
                          web={"port": port, "token_file": str(tmp_path / "token"), "live_fps": 5})
    log = tmp_path / "runtime.log"
    runtime = start_runtime(config, log)
    try:
        wait_until(lambda: _answers(port), what="the web page to answer")
        browser.get(f"http://127.0.0.1:{port}/")
        section = wait_until(lambda: browser.find_elements(By.ID, "camera-cam1"), what="the camera's section")[0]

        # a verdict appears once a frame is scored, with what /api/verdicts says
        rows = wait_until(lambda: section.find_elements(By.CSS_SELECTOR, ".verdicts tbody tr"), what="a verdict row")
        seq = int(rows[0].find_elements(By.TAG_NAME, "td")[0].text)
        known = {v["seq"]: v for v in api(port, "/api/verdicts?camera=cam1&limit=300")[1]["verdicts"]}
        assert seq in known and rows[0].get_attribute("class") == known[seq]["verdict"]
        assert "delivering" in section.find_element(By.CSS_SELECTOR, ".camera-state").text
        assert "connected" in section.find_element(By.CSS_SELECTOR, ".broker-state").text

        # the live image is a picture, and it changes as frames are scored
        image = section.find_element(By.CSS_SELECTOR, ".live-image")
        wait_until(lambda: browser.execute_script("return arguments[0].naturalWidth", image) > 0, what="the live image")
        first = image.screenshot_as_png
        wait_until(lambda: image.screenshot_as_png != first, timeout=10, what="the live image to change")

        # the gallery shows rejects (raw and annotated) once some cracked cells went by
        tile = wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, "#gallery .tile"), timeout=60,
                          what="a rejected frame in the gallery")[0]
        browser.save_screenshot(str(shots / "live-view.png"))
        section.find_element(By.CSS_SELECTOR, ".live-image").screenshot(str(shots / "live-frame.png"))

        # changing the threshold without the token is refused and changes nothing
        old = api(port, "/api/status")[1]["cameras"]["cam1"]["threshold"]
        new = round(old * 1.5, 4)
        field = section.find_element(By.CSS_SELECTOR, ".threshold-input")
        field.clear()
        field.send_keys(str(new))
        section.find_element(By.CSS_SELECTOR, ".threshold-form button").click()
        message = section.find_element(By.CSS_SELECTOR, ".threshold-message")
        wait_until(lambda: "refused" in message.text, what="the refusal")
        assert "operator token missing or wrong" in message.text
        assert api(port, "/api/status")[1]["cameras"]["cam1"]["threshold"] == old

        # with the token it round-trips: page, runtime, the MQTT state topic, the audit log
        browser.find_element(By.ID, "token").send_keys(TOKEN)
        section.find_element(By.CSS_SELECTOR, ".threshold-form button").click()
        wait_until(lambda: "threshold now" in message.text, what="the accepted change")
        status = api(port, "/api/status")[1]["cameras"]["cam1"]
        assert status["threshold"] == pytest.approx(new) and status["source"] == "web:127.0.0.1"
        wait_until(lambda: any(s.get("threshold") == pytest.approx(new) for s in plc.payloads("state")
                               if isinstance(s, dict)), what="the new threshold on the state topic")
        wait_until(lambda: any(v["threshold"] == pytest.approx(new) for v in
                               api(port, "/api/verdicts?camera=cam1&limit=5")[1]["verdicts"]),
                   what="verdicts judged at the new threshold")
        assert api(port, "/api/cameras/cam1/threshold", {"threshold": old * 100}, TOKEN)[0] == 400  # out of bounds

        # an operator calls a reject a good part: it goes to the harvest's good/ for retraining
        tile = browser.find_elements(By.CSS_SELECTOR, "#gallery .tile")[0]
        stem = tile.get_attribute("data-stem")
        tile.find_element(By.CSS_SELECTOR, ".mark-good").click()
        wait_until(lambda: "marked good" in " ".join(  # the gallery may be redrawn meanwhile: look the tile up again
            e.text for e in browser.find_elements(By.CSS_SELECTOR, f'#gallery .tile[data-stem="{stem}"] .feedback')),
            what="the feedback")
        kept = json.loads((tmp_path / "harvest/good" / f"{stem}.json").read_text())
        assert kept["operator"]["verdict"] == "good" and kept["seq"] == int(stem.split("-")[1])
        assert cv2.imread(str(tmp_path / "harvest/good" / f"{stem}.jpg")) is not None
        assert not (tmp_path / "harvest/cam1" / f"{stem}.jpg").exists()  # moved, so retraining sees it once
        # the operator changes their mind, it is a real defect: the frame moves to the harvest's defect/ (coft learn
        # makes defect rows of it), never both good and a defect
        browser.find_element(By.CSS_SELECTOR, f'#gallery .tile[data-stem="{stem}"] .mark-defect').click()
        wait_until(lambda: "marked defect" in " ".join(
            e.text for e in browser.find_elements(By.CSS_SELECTOR, f'#gallery .tile[data-stem="{stem}"] .feedback')),
            what="the defect mark")
        assert json.loads((tmp_path / "harvest/defect" / f"{stem}.json").read_text())["operator"]["verdict"] == "defect"
        assert (tmp_path / "harvest/defect" / f"{stem}.jpg").is_file() and not (tmp_path / "harvest/good" / f"{stem}.jpg").exists()
        assert {e["stem"]: e["marked"] for e in api(port, "/api/evidence?limit=50")[1]["evidence"]}[stem] == "defect"
        browser.execute_script("document.getElementById('gallery-section').scrollIntoView()")
        browser.save_screenshot(str(shots / "gallery.png"))
        annotated = cv2.imread(str(tmp_path / "evidence/cam1" / f"{stem}-annotated.jpg"))
        raw = cv2.imread(str(tmp_path / "evidence/cam1" / f"{stem}.jpg"))
        assert annotated.shape == raw.shape and np.abs(annotated.astype(int) - raw).mean() > 5
    finally:
        runtime.send_signal(signal.SIGTERM)
        code = runtime.wait(timeout=30)
        plc.close()
        broker.stop()
    text = log.read_text()
    assert code == 0, text[-3000:]
    assert TOKEN not in text  # never in the log
    assert "AUDIT threshold camera=cam1" in text and "via=web:127.0.0.1" in text
    assert "AUDIT feedback camera=cam1" in text
    assert text.count("operator token missing or wrong") == 1
    assert "Traceback" not in text


def test_the_commissioning_review_sorts_rejected_frames_one_click_each_and_the_promise_tightens(
        line, browser, tmp_path, mosquitto):
    from selenium.webdriver.common.by import By

    from coft.demo import elpv_cells

    _, bundle = line
    paths, defect_probability, cell_type = elpv_cells()  # 110 mono cells, one in eleven cracked: parts count once
    mono = [i for i, t in enumerate(cell_type) if t == "mono"]
    good = [paths[i] for i in mono if defect_probability[i] == 0][60:160]
    cracked = [paths[i] for i in mono if defect_probability[i] == 1][8:18]
    (tmp_path / "line").mkdir()
    for n, path in enumerate(good):
        shutil.copy(path, tmp_path / "line" / f"{n:03d}-{path.name}")
        if n % 10 == 5:
            shutil.copy(cracked[n // 10], tmp_path / "line" / f"{n:03d}-c-{cracked[n // 10].name}")
    (tmp_path / "token").write_text(TOKEN)
    port = free_port()
    config = write_config(tmp_path, bundle, mosquitto.port, [{"name": "cam1", "source": str(tmp_path / "line"),
                                                             "fps": 25}],
                          commissioning={"frames": 100}, web={"port": port, "token_file": str(tmp_path / "token")})
    log = tmp_path / "runtime.log"
    runtime = start_runtime(config, log)
    try:
        before = wait_until(lambda: _review(port), timeout=120, what="commissioning to finish")
        assert before["queue"] and before["left"] == len(before["queue"]) and before["sorted"] == 0
        assert before["promise"] == before["stated_at_commissioning"]  # nothing sorted yet: what commissioning said
        assert [item["score"] for item in before["queue"]] == sorted((i["score"] for i in before["queue"]), reverse=True)
        browser.get(f"http://127.0.0.1:{port}/")
        tiles = wait_until(lambda: browser.find_elements(By.CSS_SELECTOR, "#review .tile"), what="the review's frames")
        worst = tiles[0].get_attribute("data-file")
        assert worst == before["queue"][0]["file"]
        wait_until(lambda: _click(browser, f'#review .tile[data-file="{worst}"] .sort-defect'),
                   what="the worst frame's button")  # no token yet: refused, nothing moves
        wait_until(lambda: "refused" in browser.find_element(By.CSS_SELECTOR, f'#review .tile[data-file="{worst}"] '
                                                                               ".feedback").text, what="the refusal")
        assert _review(port)["sorted"] == 0
        browser.find_element(By.ID, "token").send_keys(TOKEN)
        for n, item in enumerate(before["queue"]):  # an operator sorts the whole queue, one click a frame
            label = "defect" if n % 2 == 0 else "good"
            wait_until(lambda f=item["file"], b=label: _click(browser, f'#review .tile[data-file="{f}"] .sort-{b}'),
                       what="the frame's button")
            wait_until(lambda f=item["file"]: any(i["file"] == f and i["sorted"] for i in _review(port)["queue"]),
                       what="the sorting")
        after = _review(port)
        assert after["left"] == 0 and after["sorted"] == len(before["queue"])
        assert after["false_reject_rate"] < before["false_reject_rate"]  # defects no longer count as false rejects
        wait_until(lambda: browser.find_element(By.ID, "review-promise").text == f"Promise now: {after['promise']}.",
                   what="the page's promise to follow")
        wait_until(lambda: "run 'coft learn" in browser.find_element(By.ID, "review-learning").text,
                   what="the page to say how the line learns from the sorted review (this line does not by itself)")
        folder = next(tmp_path.glob("commissioning-*"))
        moved = {i["file"]: i["sorted"] for i in after["queue"]}
        assert all((folder / label / name).is_file() and not (folder / name).exists() for name, label in moved.items())
        browser.execute_script("document.getElementById('review-section').scrollIntoView()")
        shots = Path(os.environ.get("COFT_SCREENSHOTS") or tmp_path)
        browser.save_screenshot(str(shots / "commissioning-review.png"))
    finally:
        runtime.send_signal(signal.SIGTERM)
        code = runtime.wait(timeout=30)
    text = log.read_text()
    assert code == 0, text[-3000:]
    assert text.count("AUDIT commissioning-review") == len(before["queue"]) and TOKEN not in text
    assert "Traceback" not in text


def _click(browser, css: str) -> bool:
    """Click the element if it is there (the review is redrawn after each sorting: an element found may be gone)."""
    from selenium.common.exceptions import StaleElementReferenceException
    try:
        found = browser.find_elements("css selector", css)
        if found:
            found[0].click()
        return bool(found)
    except StaleElementReferenceException:
        return False


def _review(port: int) -> dict | None:
    try:
        status, answer = api(port, "/api/commissioning/review")
    except OSError:
        return None
    return answer if status == 200 else None


def _plain_line(line, tmp_path: Path, mosquitto) -> tuple[subprocess.Popen, int]:
    """The runtime on the line folder (played once), with the page and no operator token; and the page's port."""
    root, bundle = line
    port = free_port()
    config = write_config(tmp_path, bundle, mosquitto.port, [{"name": "cam1", "source": str(root / "line")}],
                          web={"port": port})
    return start_runtime(config, tmp_path / "runtime.log"), port


def _answers(port: int) -> bool:
    try:
        return api(port, "/api/status")[0] == 200
    except OSError:
        return False


def test_live_view_refuses_what_it_cannot_do(line, tmp_path, mosquitto):
    """Without a token the page is read-only; unknown cameras and evidence files are one-line JSON errors;
    a port in use is a one-line error at start, before any frame is scored."""
    root, bundle = line
    runtime, port = _plain_line(line, tmp_path, mosquitto)
    try:
        wait_until(lambda: _answers(port), what="the web page to answer")
        code, answer = api(port, "/api/cameras/cam1/threshold", {"threshold": 1.0}, "anything")
        assert code == 403 and "web.token_file" in answer["error"]
        assert api(port, "/api/verdicts?camera=cam9")[1] == {"error": "no camera named 'cam9'; cameras: cam1"}
        code, answer = api(port, "/api/evidence")
        assert code == 404 and "evidence: block" in answer["error"]
        assert api(port, "/api/verdicts?after=x")[0] == 400
        for host, expected in (("evil.example", 421), (f"evil.example:{port}", 421), (f"localhost:{port}", 200),
                               (f"127.0.0.1:{port}", 200)):  # a foreign name reaching the box is DNS rebinding
            request = urllib.request.Request(f"http://127.0.0.1:{port}/api/status", headers={"Host": host})
            try:
                code = urllib.request.urlopen(request, timeout=10).status
            except urllib.error.HTTPError as exc:
                code = exc.code
                assert "web.allowed_hosts" in json.loads(exc.read())["error"]
            assert code == expected, host
        (tmp_path / "second").mkdir()
        busy = write_config(tmp_path / "second", bundle, mosquitto.port, [{"name": "cam1", "source": str(root / "line")}],
                            web={"port": port})
        second = subprocess.run([sys.executable, "-m", "coft.runtime", "--config", str(busy)], capture_output=True,
                                text=True, timeout=60, cwd=ROOT)
        assert second.returncode == 2
        assert second.stderr.strip().splitlines()[-1].startswith(f"coft: error: web.port {port} on 127.0.0.1: "
                                                                  "cannot listen")
    finally:
        runtime.send_signal(signal.SIGTERM)
        assert runtime.wait(timeout=30) == 0


def test_a_viewer_who_comes_after_the_last_part_sees_it_at_once_with_its_age(line, browser, tmp_path, mosquitto):
    """A camera that has gone quiet (a replay that ended, a triggered line between parts): the page shows the last
    scored frame straight away, says how old it is, and its picture box keeps one height."""
    runtime, port = _plain_line(line, tmp_path, mosquitto)
    try:
        wait_until(lambda: _answers(port) and api(port, "/api/status")[1]["cameras"]["cam1"]["ended"], 60,
                   "the line folder to end")
        time.sleep(3)  # nothing new is coming
        browser.get(f"http://127.0.0.1:{port}/")
        image = wait_until(lambda: browser.find_elements("css selector", ".live-image"), what="the live image")[0]
        empty_height = image.size["height"]
        wait_until(lambda: browser.execute_script("return arguments[0].naturalWidth", image) > 0, 10,
                   "the last frame to show without a new one")
        pixels = cv2.imdecode(np.frombuffer(image.screenshot_as_png, np.uint8), cv2.IMREAD_GRAYSCALE)
        assert pixels.mean() > 40, "the live picture is (nearly) black"
        assert image.size["height"] == empty_height  # the box did not jump when the picture came
        age = wait_until(lambda: browser.find_element("css selector", ".live-age").text, what="the frame's age")
        assert age.endswith("s ago") or age.endswith("min ago"), age
    finally:
        runtime.send_signal(signal.SIGTERM)
        assert runtime.wait(timeout=30) == 0
