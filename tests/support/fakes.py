"""Stand-ins for the unit tier (tests/unit): an engine without a graph and a bundle that is only what judging
reads. The rest of the suite runs real bundles through real engines."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from coft.runtime.engines.base import Inference
from coft.runtime.model.manifest import ManifestSchema, ThresholdSpec


class ScriptedEngine:
    """Scores frames by the brightness of their first pixel, or raises while `fail` is set: what a graph does
    to the inspector, without one."""
    name, precision = "scripted", "f32"

    def __init__(self):
        self.fail: Exception | None = None
        self.calls = 0

    def infer(self, frames: np.ndarray) -> Inference:
        self.calls += 1
        if self.fail:
            raise self.fail
        scores = frames[:, 0, 0, 0].astype(np.float64) / 100
        scores[frames[:, 0, 0, 1] == 255] = math.nan  # a frame the "model" cannot judge
        return Inference(scores=scores, embeddings=np.zeros((len(frames), 4), np.float32))


def judging_bundle(model_id: str, threshold: float, size: tuple[int, int], path: Path | None = None) -> SimpleNamespace:
    """What the inspector and the revisions read of a bundle: its id, threshold, input size, manifest and folder."""
    spec = ManifestSchema.model_construct(scorer="knn", revision_of=None, commissioning=None, learning=None,
                                          threshold=ThresholdSpec.model_construct(value=threshold, method="fixed",
                                                                                  promise=None))
    return SimpleNamespace(model_id=model_id, threshold=threshold, input_size=size, path=path, spec=spec,
                           manifest={"threshold": {"value": threshold}, "scorer": "knn"})
