"""Camera sources through OpenCV: USB (V4L2), RTSP, GStreamer pipelines, video files, image folders.

Every frame leaves here with its camera, a per-camera frame id and the wall-clock time
it was captured, so a verdict can always be traced back and its latency measured. A
source that fails or disconnects is reopened with exponential backoff, and each
attempt is logged once.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import cv2
import numpy as np

from runtime.config import CameraConfig
from runtime.errors import CoftError
from runtime.images import list_images, read_image, to_bgr8

log = logging.getLogger(__name__)

# TCP for RTSP (no lost UDP packets on a busy plant network), and bounded waits.
os.environ.setdefault("OPENCV_FFMPEG_CAPTURE_OPTIONS", "rtsp_transport;tcp")


@dataclass
class Frame:
    camera: str
    frame_id: int
    captured_at: float  # time.time() when OpenCV returned it
    image: np.ndarray  # uint8 BGR, after the ROI crop
    part_id: str | None = None


class SourceEnded(Exception):
    """A finite source (file, folder) has no more frames."""


def source_kind(camera: CameraConfig) -> str:
    if camera.kind != "auto":
        return camera.kind
    source = camera.source
    if isinstance(source, int) or str(source).isdigit() or str(source).startswith("/dev/video"):
        return "usb"
    text = str(source)
    if text.startswith(("rtsp://", "rtsps://")):
        return "rtsp"
    if "appsink" in text or "!" in text:
        return "gstreamer"
    return "folder" if Path(text).is_dir() else "file"


class FolderReader:
    """Replays an image folder as a camera (sorted order); each file's name is its part id."""

    def __init__(self, folder: str, loop: bool):
        self.paths, self.loop, self.index = list_images(folder), loop, 0
        if not self.paths:
            raise OSError(f"no images in {folder}")

    def read(self) -> tuple[np.ndarray | None, str | None]:
        while True:
            if self.index == len(self.paths):
                if not self.loop:
                    raise SourceEnded
                self.index = 0
            path = self.paths[self.index]
            self.index += 1
            image = read_image(path)
            if image is not None:
                return image, path.stem

    def release(self) -> None:
        pass


class CaptureReader:
    """cv2.VideoCapture for devices, streams, pipelines and files."""

    def __init__(self, camera: CameraConfig, kind: str):
        source = camera.source
        timeout_ms = int(camera.open_timeout_s * 1000)
        params = [cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, timeout_ms, cv2.CAP_PROP_READ_TIMEOUT_MSEC, timeout_ms]
        if kind == "usb":
            index = int(source) if str(source).isdigit() else str(source)
            self.capture = cv2.VideoCapture(index, cv2.CAP_V4L2, params)
        elif kind == "gstreamer":
            self.capture = cv2.VideoCapture(str(source), cv2.CAP_GSTREAMER)
        elif kind == "rtsp":
            self.capture = cv2.VideoCapture(str(source), cv2.CAP_FFMPEG, params)
        else:
            if not Path(str(source)).is_file():
                raise OSError(f"video file {source} not found")
            self.capture = cv2.VideoCapture(str(source), cv2.CAP_FFMPEG)
        self.kind, self.loop = kind, camera.loop
        if not self.capture.isOpened():
            raise OSError(f"OpenCV could not open {kind} source {source}")

    def read(self) -> tuple[np.ndarray | None, str | None]:
        ok, image = self.capture.read()
        if ok and image is not None:
            return to_bgr8(image), None
        if self.kind == "file":
            if self.loop and self.capture.set(cv2.CAP_PROP_POS_FRAMES, 0):
                ok, image = self.capture.read()
                if ok:
                    return to_bgr8(image), None
            raise SourceEnded
        return None, None  # a live source hiccuped: the caller reconnects

    def release(self) -> None:
        self.capture.release()


def open_reader(camera: CameraConfig):
    kind = source_kind(camera)
    return FolderReader(str(camera.source), camera.loop) if kind == "folder" else CaptureReader(camera, kind)


def crop(image: np.ndarray, roi: tuple[int, int, int, int] | None) -> np.ndarray:
    if roi is None:
        return image
    x, y, w, h = roi
    cropped = image[y:y + h, x:x + w]
    if cropped.shape[0] != h or cropped.shape[1] != w:
        raise ValueError(f"roi {roi} lies outside the {image.shape[1]}x{image.shape[0]} frame")
    return cropped


class CameraThread(threading.Thread):
    """Reads one camera forever, reconnecting with backoff, and hands each frame to `deliver`."""

    def __init__(self, camera: CameraConfig, deliver: Callable[[Frame], None], stop: threading.Event,
                 on_state: Callable[[str, bool], None] | None = None):
        super().__init__(name=f"camera-{camera.name}", daemon=True)
        self.camera, self.deliver, self.stop_event = camera, deliver, stop
        self.on_state = on_state or (lambda name, up: None)
        self.frame_id = 0
        self.ended = threading.Event()

    def run(self) -> None:
        backoff = 0.5
        min_interval = 1.0 / self.camera.fps if self.camera.fps else 0.0
        replay = source_kind(self.camera) in ("file", "folder")  # replays are paced; live cameras skip frames
        while not self.stop_event.is_set():
            try:
                reader = open_reader(self.camera)
            except OSError as exc:
                log.warning("camera %s: cannot open (%s); retrying in %.1fs", self.camera.name, exc, backoff)
                self.on_state(self.camera.name, False)
                self.stop_event.wait(backoff)
                backoff = min(backoff * 2, self.camera.reconnect_max_s)
                continue
            log.info("camera %s: opened %s source", self.camera.name, source_kind(self.camera))
            self.on_state(self.camera.name, True)
            backoff, last = 0.5, 0.0
            try:
                while not self.stop_event.is_set():
                    try:
                        image, part_id = reader.read()
                    except CoftError as exc:  # a frame OpenCV decoded into something we cannot use
                        log.error("camera %s: %s; skipping the frame", self.camera.name, exc)
                        continue
                    if image is None:
                        log.warning("camera %s: lost the stream; reconnecting", self.camera.name)
                        self.on_state(self.camera.name, False)
                        break
                    now = time.time()
                    if min_interval and now - last < min_interval:
                        if not replay:
                            continue
                        self.stop_event.wait(min_interval - (now - last))
                        now = time.time()
                    last = now
                    try:
                        image = crop(image, self.camera.roi)
                    except ValueError as exc:
                        log.error("camera %s: %s; fix cameras.roi in the config", self.camera.name, exc)
                        continue
                    self.frame_id += 1
                    self.deliver(Frame(self.camera.name, self.frame_id, now, image, part_id))
            except SourceEnded:
                log.info("camera %s: source ended after %d frames", self.camera.name, self.frame_id)
                self.ended.set()
                return
            finally:
                reader.release()
