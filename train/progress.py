"""Progress bars for training's slow steps (embedding, coreset, calibration), so a long run is never silent.

On unless the command runs with -q (`TrainOptions.progress`); log lines go through tqdm
(coft's command line redirects logging) so bars are not torn. Where stderr is not a terminal
(a CI log, journald, a file), each bar becomes a plain line at most every 15 seconds instead
of carriage-return redraws that pile up.
"""

from __future__ import annotations

import sys

from tqdm import tqdm

shown = True
PLAIN_EVERY_S = 15.0


class _Lines:
    """tqdm's output for a stderr that is not a terminal: each redraw a plain line of its own."""

    def write(self, text: str) -> None:
        text = text.replace("\r", "").strip()
        if text:
            sys.stderr.write(text + "\n")

    def flush(self) -> None:
        sys.stderr.flush()


def bar(iterable=None, desc: str = "", total: int | None = None, unit: str = "batch", show: bool | None = None) -> tqdm:
    """A bar that disappears when done (the stage's log line stays), a plain line now and then where stderr is
    not a terminal, or a silent pass-through with -q; `show` decides for this bar alone where given."""
    terminal = sys.stderr.isatty()
    return tqdm(iterable, desc=desc, total=total, unit=unit, disable=not (shown if show is None else show), leave=False,
                dynamic_ncols=terminal, file=None if terminal else _Lines(), mininterval=0.1 if terminal else PLAIN_EVERY_S)
