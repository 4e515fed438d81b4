"""The model store's two links: `current` (what the runtime loads) and `previous` (what a rollback returns to).
Moved in renames only, so a reader sees the old model or the new one; the box's commands (box/install.py) and the
line's own revisions (line/revisions.py) switch through here."""

from __future__ import annotations

import os
from pathlib import Path


def point(link: Path, target: Path) -> None:
    """Make `link` point at `target` in one rename."""
    tmp = link.with_name(f".{link.name}.tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)


def resolved(link: Path) -> Path | None:
    return link.resolve() if link.is_symlink() else None


def settle(current: Path) -> None:
    """Finish a switch a kill cut short: its rollback target waits in `.previous.pending` until `current` has moved."""
    pending = current.with_name(".previous.pending")
    if pending.is_symlink():
        if resolved(pending) == resolved(current):  # killed before `current` moved: nothing changed
            pending.unlink()
        else:
            os.replace(pending, current.with_name("previous"))


def switch(current: Path, target: Path) -> Path | None:
    """Point `current` at `target` and its sibling `previous` at what `current` pointed to; returns that. The
    rollback target is written first under another name and renamed last, so a kill at any step leaves either
    the old pair or the new one (after `settle`), never a `previous` that forgot it."""
    settle(current)
    old = resolved(current)
    pending = current.with_name(".previous.pending")
    if old is not None:
        point(pending, old)
    point(current, target)
    if old is not None:
        os.replace(pending, current.with_name("previous"))
    return old
