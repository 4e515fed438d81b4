"""Progress bars for training's slow steps (embedding, coreset, calibration), so a long run is never silent.

On unless the command runs with -q (`TrainOptions.progress`); log lines go through tqdm
(coft's command line redirects logging) so bars are not torn.
"""

from __future__ import annotations

from tqdm import tqdm

shown = True


def bar(iterable=None, desc: str = "", total: int | None = None, unit: str = "batch") -> tqdm:
    """A bar that disappears when done (the stage's log line stays), or a silent pass-through with -q."""
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=not shown, leave=False, dynamic_ncols=True)
