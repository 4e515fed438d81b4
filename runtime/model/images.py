"""Reading images from disk the same way in training, evaluation and replay.

Everything becomes 8-bit, 3-channel BGR (OpenCV's order): grayscale line-scan cameras,
RGBA exports and 16-bit sensors all end up in the one format the model bundle expects.
Images and frames above MAX_PIXELS are refused before they are decoded (a 20000x20000
PNG of a few hundred kilobytes would otherwise take gigabytes).
"""

from __future__ import annotations

import io
import logging
import os
import re
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, UnidentifiedImageError

from coft.runtime.model.errors import CoftError

log = logging.getLogger(__name__)

MAX_PIXELS = int(os.environ.get("COFT_MAX_PIXELS", 100_000_000))  # 100 MP: above the largest area-scan sensors

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".pgm", ".ppm"}


def list_images(folder: str | Path, recursive: bool = False) -> list[Path]:
    """Image files in `folder`, sorted so that seeded choices are reproducible."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CoftError(f"{folder}: not a folder of images; give the path of a folder that holds .png/.jpg files")
    pattern = "**/*" if recursive else "*"
    named = [p for p in folder.glob(pattern) if p.suffix.lower() in IMAGE_SUFFIXES]
    broken = [p for p in named if p.is_symlink() and not p.exists()]
    if broken:  # an operator's mark made as a link that points nowhere is lost otherwise, without a word
        log.warning("%s: %d image links point nowhere and are left out, e.g. %s -> %s; link to absolute paths",
                    folder, len(broken), broken[0], os.readlink(broken[0]))
    return sorted(p for p in named if p.is_file())


def check_pixels(height: int, width: int, source: str) -> None:
    if height * width > MAX_PIXELS:
        size = f"{width}x{height}" if width > 1 else f"{height} pixels"
        raise CoftError(f"{source}: {size} is above the {MAX_PIXELS / 1e6:.0f} megapixel limit; "
                        "scale it down (or raise COFT_MAX_PIXELS)")


def header_size(data: np.ndarray, source: str = "image") -> tuple[int, int] | None:
    """(height, width) from an encoded image's header, without decoding it; None when Pillow cannot tell.
    Pillow's own decompression-bomb guard stays on for the whole process (other code may rely on it): an
    image it refuses already on its header is refused here too."""
    try:
        with Image.open(io.BytesIO(data.tobytes())) as image:
            return image.height, image.width
    except Image.DecompressionBombError as exc:  # its message names the pixel count: our limit says it first
        pixels = re.search(r"\((\d+) pixels\)", str(exc))
        if pixels:
            check_pixels(int(pixels.group(1)), 1, source)
        raise CoftError(f"{source}: {exc}; scale it down") from None
    except (UnidentifiedImageError, OSError, ValueError):
        return None


def to_bgr8(image: np.ndarray, source: str = "image") -> np.ndarray:
    """Convert a decoded image of any common depth and channel count to uint8 BGR."""
    if image.dtype == np.uint16:
        image = (image.astype(np.float32) / 257.0 + 0.5).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise CoftError(f"{source}: pixel type {image.dtype} is not supported; save it as 8- or 16-bit PNG or JPEG")
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    channels = image.shape[2]
    if channels == 1:
        return cv2.cvtColor(image[:, :, 0], cv2.COLOR_GRAY2BGR)
    if channels == 3:
        return image
    if channels == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    raise CoftError(f"{source}: {channels} channels; expected 1 (gray), 3 (colour) or 4 (with alpha)")


def read_image(path: str | Path) -> np.ndarray | None:
    """Decode one file to uint8 BGR, or None (with a warning naming it) if it is not a readable image."""
    path = Path(path)
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as exc:
        log.warning("skipping %s: cannot read it (%s)", path, exc)
        return None
    try:
        size = header_size(data, str(path)) if data.size else None
        if size:
            check_pixels(*size, str(path))
        image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
        if image is None:
            log.warning("skipping %s: not a readable image (corrupt or not an image file)", path)
            return None
        return to_bgr8(image, str(path))
    except CoftError as exc:
        log.warning("skipping %s", exc)
        return None
    except cv2.error as exc:
        log.warning("skipping %s: OpenCV cannot decode it (%s)", path, str(exc).strip().splitlines()[-1])
        return None


def load_folder(folder: str | Path) -> tuple[list[Path], list[np.ndarray]]:
    """All readable images of a folder; unreadable files are skipped with a warning, none at all is an error."""
    paths = list_images(folder)
    if not paths:
        raise CoftError(f"{folder}: no image files found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    kept_paths, images = [], []
    for path in paths:
        image = read_image(path)
        if image is not None:
            kept_paths.append(path)
            images.append(image)
    if not images:
        raise CoftError(f"{folder}: none of the {len(paths)} image files could be read; check that they are not corrupt")
    return kept_paths, images


def resize_to_input(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a BGR frame to the bundle's (height, width); area averaging keeps thin defects visible."""
    height, width = size
    if image.shape[:2] == (height, width):
        return image
    shrinking = image.shape[0] > height or image.shape[1] > width
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
