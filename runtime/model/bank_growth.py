"""A box grows its knn bank from its own frames, with numpy alone: no torch, no GPU server.

The bank is patch features and the exported graph already outputs them (`embedding`), so
a box can learn what its line's good parts look like from the frames it sees. Defects
among those frames must stay out of the bank, or the bank learns to accept them:

1. Frames the line rejected (by their verdicts, or above a commissioned threshold) and
   frames an operator sorted as defects offer no patch; frames sorted as good always do.
2. Every other frame is judged by the trimmed fit of the frames' scores (commissioning's
   fit; beyond 3 spreads a frame is a suspect), first against the shots' bank, then again, as FUN-AD reconstructs its
   memory bank, against the bank grown from the frames that passed, each frame scored
   without the rows it gave (a frame is never its own neighbour). The second look is
   sharper: defects the ten shots could not tell from good parts stand out against
   hundreds of good frames. The bundle's own threshold does not decide: before
   commissioning it is a few-shot estimate, and the good frames it rejects are the very
   variation the bank lacks.
3. The old bank and the passing frames' patches (as the camera shows them: the line's
   parts come in their own pose) are cut to the cap by the greedy coreset: farthest-first
   keeps every kind of patch once, old or new, so a shot's rows leave only where the
   line's frames cover them.

Measured and left out (docs/learning.md, The line learns): admitting a patch only where other frames
vouch for it. On magnetic tiles the defects that pass the frame filter were vouched for
by good frames, and every cut that removed any of their patches removed more rare good
patches, and lost AUROC.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, replace

import numpy as np

from coft.runtime.model.coreset import greedy_coreset
from coft.runtime.model.scoring import MemoryBank, pool
from coft.runtime.model.threshold import suspects
from coft.runtime.model.tiles import Tiling

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LearnConfig:
    looks: int = 2  # times the frames are judged: against the shots, then against the bank grown from the rest
    suspect_z: float = 3.0  # spreads of the fit beyond which a frame is a suspect: 2 left out more of the rare good
    # frames than defects (magnetic tiles, 2 seeds, 300 frames: AUROC 0.917 / 0.903 at 2, 0.920 / 0.904 at 3)
    cap: int = 16_384  # bank rows after growth: hundreds of line frames hold more than ten shots (measured at it)
    seed: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Growth:
    bank: MemoryBank
    owner: np.ndarray  # [rows] the frame each row of the grown bank came from; -1 for the old bank's rows
    scores_before: np.ndarray  # [frames] against the old bank
    scores_after: np.ndarray  # [frames] against the grown bank without the frame's own rows
    offered: np.ndarray  # [frames] bool: the frame's patches were candidates for the bank
    report: dict


DEFECT_PATCHES = 3  # a marked frame's worst patches that join the defect rows (1, 2, 3, 5 measured: docs/learning.md)
DEFECT_CAP = 1_024  # defect rows kept, the newest: a few dozen marks are what a line gives


def leave_one_out(bank: MemoryBank, owner: np.ndarray, patches: np.ndarray, pooling: str,
                  tiling: Tiling | None = None) -> np.ndarray:
    """Each frame's score [frames] against the bank without the rows it gave."""
    return np.array([pool(bank.score(frame, leave_out=owner == f)[None], pooling, tiling)[0]
                     for f, frame in enumerate(patches)])


def with_marked_defects(bank: MemoryBank, marked: np.ndarray) -> MemoryBank:
    """The bank with the worst patches of frames an operator marked as real defects [frames, patches, C] added to its
    defect rows: where a frame differs from the good parts is where its defect is (a mark has no outline)."""
    if not len(marked):
        return bank
    distances = replace(bank, defects=None).score(marked)  # to the good rows alone
    worst = np.argsort(distances, axis=1)[:, -DEFECT_PATCHES:]
    rows = np.take_along_axis(marked, worst[..., None], axis=1).reshape(-1, marked.shape[-1])
    kept = rows if bank.defects is None else np.concatenate([bank.defects, rows])
    return replace(bank, defects=np.ascontiguousarray(kept[-DEFECT_CAP:], np.float32))


def bank_of(bank: MemoryBank, patches: np.ndarray, offered: np.ndarray, config: LearnConfig
             ) -> tuple[MemoryBank, np.ndarray]:
    """The old bank and the offered frames' patches, cut to the cap; and each kept row's frame (-1: the old bank)."""
    frames = np.flatnonzero(offered)
    candidates = np.concatenate([bank.features, patches[frames].reshape(-1, patches.shape[-1])])
    owners = np.concatenate([np.full(len(bank), -1), np.repeat(frames, patches.shape[1])])
    keep = greedy_coreset(candidates, config.cap, config.seed)
    return replace(bank, features=np.ascontiguousarray(candidates[keep], np.float32)), owners[keep]


def grow(bank: MemoryBank, patches: np.ndarray, pooling: str, good: np.ndarray, barred: np.ndarray | None,
         config: LearnConfig = LearnConfig(), reject_above: float | None = None,
         scores: np.ndarray | None = None, tiling: Tiling | None = None) -> Growth:
    """The bank grown from the frames' patch features [frames, patches, C] (unit rows, as the graph gives them).

    `good`: frames an operator sorted as good (they offer patches whatever they score); `barred`: frames that
    must offer none (sorted defects, the line's own rejects); `reject_above`: a commissioned threshold, whose
    rejects are the line's too; `scores`: the frames' scores against `bank` where the engine already gave them;
    `tiling`: a tiled bundle's windows, whose patch scores are stitched before pooling."""
    scores = scores_before = pool(bank.score(patches), pooling, tiling) if scores is None else scores
    barred = np.zeros(len(patches), bool) if barred is None else barred.copy()
    if reject_above is not None:
        barred |= ~good & (scores_before > reject_above)
    unsure = ~good & ~barred
    looks = []
    grown, owner = bank, np.full(len(bank), -1)
    for look in range(config.looks):
        if look:
            scores = leave_one_out(grown, owner, patches, pooling, tiling)
        suspect = np.zeros(len(scores), bool)
        suspect[~barred] = suspects(scores[~barred], config.suspect_z)  # the barred are no good parts: not in the fit
        offered = good | (unsure & ~suspect)
        looks.append(int((unsure & ~offered).sum()))
        log.info("learn: look %d of %d, %d of %d frames pass, %d suspects", look + 1, config.looks,
                 int(offered.sum()), len(patches), looks[-1])
        grown, owner = bank_of(bank, patches, offered, config)
    scores_after = leave_one_out(grown, owner, patches, pooling, tiling)
    report = {"frames": len(patches), "sorted_good": int(good.sum()), "barred": int(barred.sum()),
              "suspects": looks[-1], "suspects_per_look": looks, "frames_offering": int(offered.sum()),
              "bank_rows_before": len(bank), "bank_rows_after": len(grown),
              "rows_added": int((owner >= 0).sum()), "rows_dropped": int(len(bank) - (owner < 0).sum()),
              "frames_in_bank": int(len(np.unique(owner[owner >= 0]))),
              "defect_rows": 0 if grown.defects is None else len(grown.defects), "config": config.as_dict()}
    return Growth(grown, owner, scores_before, scores_after, offered, report)
