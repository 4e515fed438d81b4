"""Camera sources through OpenCV: USB (V4L2), RTSP, GStreamer pipelines, video files, image folders.

Every frame leaves here with its camera, a per-camera frame id and the wall-clock time
it was captured, so a verdict can always be traced back and its latency measured. A
source that fails, disconnects or raises anything at all is reopened with exponential
backoff; a looping file or folder is reopened when it ends; a finite one that ends says
so. Each state change reaches `on_state` (the camera gauge and `coft status`), and
repeated identical errors are logged once, then counted.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from coft.runtime.config import CameraConfig
from coft.runtime.model.errors import CoftError
from coft.runtime.model.images import check_pixels, list_images, read_image, to_bgr8
from coft.runtime.process.logs import Throttled

log = logging.getLogger(__name__)

RTSP_OPTIONS = "rtsp_transport;tcp"  # TCP for RTSP: no lost UDP packets on a busy plant network


@dataclass
class Frame:
    camera: str
    frame_id: int
    captured_at: float  # time.time() when OpenCV returned it
    image: np.ndarray  # uint8 BGR, after the ROI crop
    part_id: str | None = None
    part: Any = None  # the triggered part (line/failsafe.py's Part) it is inspected for: cameras do not know the line
    model_input: np.ndarray | None = None  # resized to the model's input on the capture thread, off the engine's path
    captured_mono: float = field(default_factory=time.monotonic)  # for latencies: the wall clock can step back


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
        if not Path(folder).is_dir():
            raise OSError(f"folder {folder} does not exist")
        self.folder, self.paths, self.loop, self.index = folder, list_images(folder), loop, 0
        if not self.paths:
            raise OSError(f"no images in {folder}")

    def read(self) -> tuple[np.ndarray | None, str | None]:
        """The next readable image; an unreadable one is dropped from the replay (read_image said why, once)."""
        while self.paths:
            if self.index >= len(self.paths):
                if not self.loop:
                    raise SourceEnded
                self.index = 0
            path = self.paths[self.index]
            if not Path(self.folder).is_dir():
                raise OSError(f"folder {self.folder} has gone")
            image = read_image(path)
            if image is None:
                del self.paths[self.index]
                continue
            self.index += 1
            return image, path.stem
        raise OSError(f"none of the images in {self.folder} can be read (any more)")

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
            # OpenCV reads FFmpeg's options from the environment at each open, and nowhere else: set only when a
            # stream is opened (not at import), and never over the integrator's own
            os.environ.setdefault("OPENCV_FFMPEG_CAPTURE_OPTIONS", RTSP_OPTIONS)
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
            raise SourceEnded  # the camera thread reopens it when it loops
        return None, None  # a live source hiccuped: the caller reconnects

    def release(self) -> None:
        self.capture.release()


def open_reader(camera: CameraConfig, kind: str):
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
    """Reads one camera forever, reconnecting with backoff, and hands each frame to `deliver`.

    `state` says what the camera is doing, in words, for `coft status` and the heartbeat.
    """

    def __init__(self, camera: CameraConfig, deliver: Callable[[Frame], None], stop: threading.Event,
                 on_state: Callable[[str, bool], None] | None = None):
        super().__init__(name=f"camera-{camera.name}", daemon=True)
        self.camera, self.deliver, self.stop_event = camera, deliver, stop
        self.on_state = on_state or (lambda name, up: None)
        self.frame_id = 0
        self.ended = threading.Event()
        self.state = "starting"
        self.throttled = Throttled(log)
        self.kind = source_kind(camera)  # once: a folder that vanishes is still a folder
        self.replay = self.kind in ("file", "folder")  # replays are paced; live cameras skip frames

    def _down(self, why: str, backoff: float) -> None:
        self.state = f"reconnecting: {why}"
        self.on_state(self.camera.name, False)
        self.throttled.log(logging.WARNING, "down", "camera %s: %s; retrying in %.1fs", self.camera.name, why, backoff)
        self.stop_event.wait(backoff)

    def run(self) -> None:
        backoff = 0.5
        while not self.stop_event.is_set():
            try:
                reader = open_reader(self.camera, self.kind)
            except Exception as exc:  # OSError, CoftError, cv2.error: any of them means not now
                self._down(f"cannot open ({exc})", backoff)
                backoff = min(backoff * 2, self.camera.reconnect_max_s)
                continue
            self.throttled.log(logging.INFO, "open", "camera %s: opened %s source", self.camera.name, self.kind)
            self.state = "delivering"
            self.on_state(self.camera.name, True)
            first_frame = self.frame_id + 1
            try:
                delivered = self._read_frames(reader)
            except SourceEnded:
                if not self.camera.loop:
                    log.info("camera %s: source ended after %d frames", self.camera.name, self.frame_id)
                    self.state = f"ended after {self.frame_id} frames (the file or folder has no more)"
                    self.ended.set()
                    self.on_state(self.camera.name, False)
                    return
                delivered = self.frame_id >= first_frame
                if delivered:
                    self.throttled.log(logging.INFO, "loop", "camera %s: reached the end; starting again (loop: true)",
                                       self.camera.name)
                else:
                    self._down("the source ended without a single frame", backoff)
            except Exception as exc:  # whatever OpenCV or a reader raises: log it, reopen the source
                delivered = False
                self._down(f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}",
                           backoff)
            finally:
                reader.release()
            backoff = 0.5 if delivered else min(backoff * 2, self.camera.reconnect_max_s)

    def _read_frames(self, reader) -> bool:
        """Deliver frames until the stream is lost (returns whether any was delivered) or the source ends."""
        min_interval = 1.0 / self.camera.fps if self.camera.fps else 0.0
        last, delivered = 0.0, False
        while not self.stop_event.is_set():
            try:
                image, part_id = reader.read()
                if image is not None:
                    height, width = image.shape[:2]
                    check_pixels(height, width, f"camera {self.camera.name}")
                    image = crop(image, self.camera.roi)
            except (CoftError, ValueError) as exc:  # a frame we cannot use: skip it, say so once
                self.throttled.log(logging.ERROR, "frame", "camera %s: %s; skipping such frames (fix the camera or "
                                   "cameras.roi)", self.camera.name, exc)
                self.stop_event.wait(0.01 if self.replay else 0)
                continue
            if image is None:
                self.throttled.log(logging.WARNING, "lost", "camera %s: lost the stream; reconnecting", self.camera.name)
                self.on_state(self.camera.name, False)
                return delivered
            self.throttled.clear("frame")
            now = time.time()
            if min_interval and now - last < min_interval:
                if not self.replay:
                    continue
                self.stop_event.wait(min_interval - (now - last))
                now = time.time()
            last = now
            self.frame_id += 1
            self.deliver(Frame(self.camera.name, self.frame_id, now, image, part_id))
            if not delivered:
                self.throttled.clear("down")
                delivered = True
        return delivered
