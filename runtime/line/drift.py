"""Has the camera drifted from what the bundle was trained on? Watch the median score.

A line's parts are mostly good, so the median of a camera's recent scores is a good
part's score. When it climbs more than halfway (on a log scale) from where good parts
scored at training or commissioning towards the threshold, the images no longer look
like training (lighting, focus, a codec or colour-range change in the video path) and
false rejects follow: say so in one line with the figures, once per window.
"""

from __future__ import annotations

import logging
import math
from collections import deque

import numpy as np

from coft.runtime.model.threshold import reference_median

log = logging.getLogger(__name__)

WINDOW = 200


def drifted(median: float, reference: float, threshold: float) -> bool:
    return math.log(median / reference) > 0.5 * math.log(threshold / reference)


class DriftWatch:
    def __init__(self, threshold: dict):
        self.reference, self.threshold = reference_median(threshold), threshold["value"]
        self.windows: dict[str, deque] = {}

    def add(self, camera: str, score: float) -> float | None:
        """Record a score; every WINDOW scores of a camera, return their median (and warn if it drifted)."""
        window = self.windows.setdefault(camera, deque(maxlen=WINDOW))
        window.append(score)
        if len(window) < WINDOW:
            return None
        scores = np.array(window)
        window.clear()
        median = float(np.median(scores))
        if self.reference and median > 0 and drifted(median, self.reference, self.threshold):
            log.warning("camera %s: drift: the median score of the last %d frames is %.4g, good parts scored %.4g "
                        "when the threshold (%.4g) was set, and %.0f%% are above it; the images differ from training "
                        "(lighting, focus, video codec or colour range?): fix the camera or run 'coft commission'",
                        camera, WINDOW, median, self.reference, self.threshold, 100 * (scores > self.threshold).mean())
        return median
