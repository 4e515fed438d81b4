"""Recent frames of the same camera as references for a frame's image score (MuSc's RsCIN, made causal).

A frame unlike the shots but like the line's recent good frames (a new batch of material, the afternoon's light)
scores high against the bank alone, and so do its recent look-alikes. Scored relative to the look-alikes, what they
share falls away and what is its own stays: score - (mean score of its k most similar recent frames - the shots'
median). Only the past is used (a verdict cannot wait for the future), and only frames the line accepted and nobody
marked as defects enter the window, so a defect that repeats is compared with the good frames before it, not with
its own earlier copies. A frame's look is its descriptor: the mean of its unit patch features, unit length.
"""

from __future__ import annotations

import numpy as np

WINDOW = 100  # recent accepted frames kept per camera
NEIGHBOURS = 5  # most similar of them a score is judged against


class RecentFrames:
    """A bounded window of accepted frames' descriptors and image scores, seeded with the shots."""

    def __init__(self, descriptors: np.ndarray, scores: np.ndarray, window: int = WINDOW,
                 neighbours: int = NEIGHBOURS):
        """`descriptors` [k, C] and leave-one-out `scores` [k] of the shots: the window's first members and the
        level a frame like them is expected to score."""
        if len(descriptors) != len(scores) or not len(scores):
            raise ValueError(f"{len(descriptors)} descriptors for {len(scores)} shot scores: give one per shot")
        self.window, self.neighbours = max(window, len(scores)), neighbours
        self.baseline = float(np.median(scores))
        self._descriptors = np.zeros((self.window, descriptors.shape[1]), dtype=np.float32)
        self._scores = np.zeros(self.window, dtype=np.float32)
        self._filled, self._next = 0, 0
        for descriptor, score in zip(descriptors, scores):
            self.admit(descriptor, float(score))

    def __len__(self) -> int:
        return self._filled

    def reference(self, descriptor: np.ndarray) -> float:
        """Mean score of the `neighbours` window members most similar to this descriptor."""
        similarity = self._descriptors[:self._filled] @ descriptor
        k = min(self.neighbours, self._filled)
        nearest = np.argpartition(-similarity, k - 1)[:k]
        return float(self._scores[nearest].mean())

    def rescore(self, descriptor: np.ndarray, score: float) -> float:
        """The image score judged against the frame's recent look-alikes instead of the shots alone."""
        return score - (self.reference(descriptor) - self.baseline)

    def admit(self, descriptor: np.ndarray, score: float) -> None:
        """An accepted, unmarked frame joins the window; the oldest leaves when it is full."""
        self._descriptors[self._next] = descriptor
        self._scores[self._next] = score
        self._next = (self._next + 1) % self.window
        self._filled = min(self._filled + 1, self.window)


def descriptor(patch_features: np.ndarray) -> np.ndarray:
    """A frame's look: the mean of its unit patch features [P, C], unit length."""
    mean = patch_features.mean(axis=0)
    return (mean / max(float(np.linalg.norm(mean)), 1e-12)).astype(np.float32)
