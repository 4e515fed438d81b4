"""Commissioning: the first frames of a line set its threshold (model/threshold.py fits it and says why)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from coft.runtime.model.errors import CoftError
from coft.runtime.model.promise import best_promise, frames_to_promise
from coft.runtime.model.threshold import fit_threshold, spread_ratio
from coft.runtime.process.disk import Reserve

log = logging.getLogger(__name__)


class Commissioning:
    """Collects the scores (and frames) of the first `frames` inspected parts, then fits the line's threshold.

    Premise check: the line's frames must be mostly good. When more than half of them score
    above the old threshold, or their scores spread more than PREMISE_SPREAD times wider
    than the good parts' did at training, the stream is likely mostly defective (or the
    camera's images no longer look like training): the old threshold is kept.
    """

    PREMISE_SPREAD = 4.0

    def __init__(self, frames: int, target: float, folder: Path | None, reserve: Reserve | None = None):
        self.wanted, self.target, self.folder, self.reserve = frames, target, folder, reserve
        needed = frames_to_promise(target)
        if frames < needed:
            log.warning("commissioning: %d frames can promise at best false-reject <= %.1f%% at 95%%; %d are needed "
                        "for %.0f%% (commissioning.frames): the fit is taken only where frames it was not fitted on "
                        "show it delivers as well as the bundle's threshold", frames, 100 * best_promise(frames),
                        needed, 100 * target)
        self.scores: list[float] = []
        self.parts: set[tuple[str, str]] = set()  # (camera, part id) already counted
        self.idle = 0  # frames in a row that added nothing
        self.rows: list[str] = ["file,camera,frame_id,score"]
        if folder:
            try:
                folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            except OSError as exc:
                raise CoftError(f"commissioning: cannot create {folder} ({exc.strerror}); make the outbox's folder "
                                "writable or set commissioning.keep_frames: false") from None

    @property
    def complete(self) -> bool:
        return len(self.scores) >= self.wanted

    def add(self, camera: str, frame_id: int, image: np.ndarray, score: float, part_id: str | None = None) -> None:
        if self.complete:
            return
        if not np.isfinite(score) or (camera, part_id) in self.parts:
            self.idle += 1
            if self.idle == max(self.wanted, 100):  # said once: commissioning that cannot finish must not wait mutely
                log.warning("commissioning: %d frames in a row added nothing (%d / %d counted): every part counts once "
                            "and a score must be finite; a looped replay with %d distinct parts cannot reach %d: lower "
                            "commissioning.frames or give more parts", self.idle, len(self.scores), self.wanted,
                            len(self.parts), self.wanted)
            return
        self.idle = 0
        if part_id:
            self.parts.add((camera, part_id))
        self.scores.append(score)
        if len(self.scores) % max(1, self.wanted // 10) == 0:
            log.info("commissioning: %d / %d frames", len(self.scores), self.wanted)
        name = ""
        if self.folder and (self.reserve is None or self.reserve.allows(self.folder, image.nbytes // 4,
                                                                        "commissioning frames")):
            import cv2

            name = f"{len(self.scores):06d}-{camera}-{frame_id}.jpg"
            if not cv2.imwrite(str(self.folder / name), image, [cv2.IMWRITE_JPEG_QUALITY, 95]):
                log.error("commissioning: could not write %s (disk full?); its score is kept", self.folder / name)
                name = ""
        self.rows.append(f"{name},{camera},{frame_id},{score:.6g}")

    def fit(self, bundle_threshold: dict) -> dict:
        """The new threshold, or a one-line CoftError saying why the old one stays."""
        scores = np.array(self.scores)
        if self.folder:
            try:
                (self.folder / "scores.csv").write_text("\n".join(self.rows) + "\n")
            except OSError as exc:
                log.error("commissioning: could not write %s (%s); fitting on the scores in memory",
                          self.folder / "scores.csv", exc.strerror)
        fitted = fit_threshold(scores, self.target, bundle=bundle_threshold["value"])
        checked = fitted.get("held_out")
        if checked:
            log.info("commissioning: on the %d frames each was not fitted on, the fit (%.6g) rejected %.1f%% and the "
                     "bundle's threshold (%.6g) %.1f%% against a %.0f%% target: keeping the %s's", checked["frames"],
                     checked["fit"], 100 * checked["fit_false_reject"], checked["bundle"],
                     100 * checked["bundle_false_reject"], 100 * self.target,
                     "fit" if checked["kept"] == "fit" else "bundle")
        ratio = spread_ratio(scores, bundle_threshold)
        share_above = float((scores > bundle_threshold["value"]).mean())
        fitted.update(spread_vs_training=ratio and round(ratio, 2), share_above_old_threshold=round(share_above, 4),
                      previous=bundle_threshold["value"])
        if share_above > 0.5 or (ratio is not None and ratio > self.PREMISE_SPREAD):
            where = f"; look at the frames in {self.folder}" if self.folder else ""
            raise CoftError(f"{share_above:.0%} of the {len(scores)} commissioning frames score above the old threshold "
                            f"and they spread {ratio or float('nan'):.1f}x as wide as the good parts at training: the "
                            "stream does not look mostly good (a defective batch, another product, or a camera whose "
                            f"images differ from training){where}; keeping the old threshold")
        return fitted

    def traded(self, old: float, new: float, marked: list[float]) -> dict:
        """What the new threshold trades against the old: the share of the commissioning frames each rejects and,
        where an operator marked frames as real defects, the share of those each lets pass (else: unknown)."""
        scores, defects = np.array(self.scores), np.array(marked, np.float64)
        return {"rejected": [round(float((scores > t).mean()), 4) for t in (old, new)],
                "marked_defects": len(defects),
                "escape": [round(float((defects <= t).mean()), 4) for t in (old, new)] if len(defects) else None}

    @staticmethod
    def say_traded(traded: dict) -> str:
        before, after = traded["rejected"]
        line = f"it rejects {after:.1%} of the commissioning frames (the bundle's threshold {before:.1%})"
        if traded["escape"]:
            was, now = traded["escape"]
            return line + (f"; of the {traded['marked_defects']} frames marked defects it lets {now:.0%} pass (the "
                           f"bundle's threshold {was:.0%})")
        return line + ("; how many defects it lets pass is unknown: no frame is marked a defect (mark a few rejects "
                       "that are real defects on the page, or put them in the harvest's defect/ folder)")

    def histogram(self, old: float, new: float, bins: int = 12) -> str:
        """A text histogram of the scores with both thresholds marked (for the log), and a PNG where matplotlib is."""
        scores = np.array(self.scores)
        edges = np.geomspace(scores.min(), scores.max(), bins + 1)
        counts, _ = np.histogram(scores, edges)
        lines = []
        for count, low, high in zip(counts, edges, edges[1:]):
            marks = "".join(m for m, t in (("  <- old threshold", old), ("  <- new threshold", new)) if low <= t < high)
            lines.append(f"{low:10.4g} .. {high:<10.4g} {'#' * int(40 * count / counts.max())} {count}{marks}")
        if self.folder:
            try:
                import matplotlib
                matplotlib.use("Agg")
                import matplotlib.pyplot as plt
            except ImportError:
                pass
            else:
                figure, axis = plt.subplots(figsize=(7, 3.5))
                axis.hist(scores, bins=np.geomspace(scores.min(), scores.max(), 40).tolist(), color="#888")
                axis.set_xscale("log")
                for value, label, colour in ((old, "old threshold", "#c33"), (new, "new threshold", "#393")):
                    axis.axvline(value, color=colour, label=f"{label} {value:.4g}")
                axis.set_xlabel("score")
                axis.set_ylabel("frames")
                axis.legend()
                figure.tight_layout()
                try:
                    figure.savefig(self.folder / "histogram.png", dpi=110)
                except OSError as exc:
                    log.error("commissioning: could not write %s (%s)", self.folder / "histogram.png", exc.strerror)
                plt.close(figure)
        return "\n".join(lines)
