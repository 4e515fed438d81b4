"""What the broker may change at the line: each camera's live threshold, within bounds, audited.

A threshold arrives on `<prefix>/<line>/<camera>/set/threshold`, is checked (a finite
number within `control.threshold_factor` of the bundle's threshold), saved to the state
file before it takes effect (a change that cannot survive a restart is refused, not
half-applied), and logged as an AUDIT line with the previous value. The saved values
belong to one model id: a new bundle (or revision) starts from its own threshold.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

from coft.runtime.config import ControlConfig, valid_threshold
from coft.runtime.model.errors import CoftError

log = logging.getLogger(__name__)
audit = logging.getLogger("coft.audit")


STATE_ERRORS = (OSError, ValueError, KeyError, TypeError, AttributeError)  # what a spoilt state file raises


def read_state(path: Path) -> tuple[str, dict]:
    """(model id, {camera: threshold}) saved in a state file; raises one of STATE_ERRORS when it is spoilt."""
    saved = json.loads(path.read_text())
    cameras = saved["cameras"]
    if not isinstance(cameras, dict):
        raise ValueError("'cameras' is not a mapping")
    return saved["model_id"], cameras


class ThresholdState:
    def __init__(self, path: Path, bundle_threshold: float, model_id: str, cameras: list[str],
                 control: ControlConfig | None = None):
        control = control or ControlConfig()
        self.path, self.model_id, self.bundle_threshold = path, model_id, bundle_threshold
        factor = control.threshold_factor
        self.changeable = control.threshold
        self.low, self.high = bundle_threshold / factor, bundle_threshold * factor
        self.values = {camera: bundle_threshold for camera in cameras}
        self.sources = {camera: "bundle" for camera in cameras}  # where each camera's threshold came from
        self.lock = threading.Lock()
        for camera, value in self._saved().items():
            if camera in self.values:
                try:
                    self.values[camera] = self._in_bounds(valid_threshold(str(value)))
                    self.sources[camera] = "saved"
                    log.info("camera %s: threshold %.6g restored from %s", camera, value, path)
                except CoftError as exc:
                    log.warning("camera %s: ignoring the saved threshold (%s); using the bundle's", camera, exc)

    def _saved(self) -> dict:
        if not self.path.is_file():
            return {}
        try:
            model_id, cameras = read_state(self.path)
            return cameras if model_id == self.model_id else {}
        except STATE_ERRORS as exc:
            log.warning("ignoring %s (%s); every camera uses the bundle's threshold", self.path, exc)
            return {}

    def _in_bounds(self, value: float) -> float:
        if not self.low <= value <= self.high:
            raise CoftError(f"threshold {value:.6g} is outside the allowed {self.low:.6g} .. {self.high:.6g} "
                            f"(control.threshold_factor around the bundle's {self.bundle_threshold:.6g})")
        return value

    def value(self, camera: str) -> float:
        return self.values[camera]

    def set(self, camera: str, payload: bytes, via: str = "mqtt") -> dict:
        """Apply a threshold command for one camera, or raise a one-line CoftError and change nothing.
        `via` says who asked (mqtt, web with the operator's address, opcua, sparkplug) in the AUDIT line. Every
        path that changes a threshold comes here, so control.threshold: false and the bounds hold for all."""
        if not self.changeable:
            raise CoftError("threshold changes are off (control.threshold: false in line.yaml)")
        if len(payload) > 64:  # a number is a few bytes; cutting a long payload would judge a part of it
            raise CoftError(f"threshold command of {len(payload)} bytes is too long: send the number alone, e.g. 0.42")
        value = self._in_bounds(valid_threshold(payload.decode(errors="replace").strip()))
        previous = self._apply(camera, value, via)
        audit.info("AUDIT threshold camera=%s previous=%.6g new=%.6g model=%s via=%s", camera, previous, value,
                   self.model_id, via)
        return self.describe(camera, via)

    def keep(self, camera: str, value: float, source: str) -> None:
        """Carry an operator's threshold over to this state (a new revision of the same model), saved like a
        change; a CoftError when it lies outside this state's bounds."""
        self._apply(camera, self._in_bounds(value), source)

    def _apply(self, camera: str, value: float, source: str) -> float:
        """Save, then take the camera's new threshold (a change that cannot be saved is not made); the previous."""
        with self.lock:
            previous = self.values[camera]
            values = {**self.values, camera: value}
            self._save(values)
            self.values = values
            self.sources[camera] = source
        return previous

    def operators(self) -> dict[str, tuple[float, str]]:
        """Cameras whose threshold an operator set (or a saved one restored): {camera: (value, source)}."""
        return {camera: (self.values[camera], source) for camera, source in self.sources.items() if source != "bundle"}

    def _save(self, values: dict[str, float]) -> None:
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
                json.dump({"model_id": self.model_id, "cameras": values}, f)
            os.replace(tmp, self.path)
        except OSError as exc:
            raise CoftError(f"cannot save the threshold to {self.path} ({exc.strerror}); the threshold is unchanged; "
                            "make state_file's folder writable") from None

    def describe(self, camera: str, source: str) -> dict:
        return {"threshold": self.values[camera], "model_id": self.model_id, "source": source,
                "bounds": [self.low, self.high]}
