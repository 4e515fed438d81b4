"""Every image format a line produces ends up as uint8 BGR; bad files are named and skipped."""

import logging

import cv2
import numpy as np
import pytest

from coft.runtime.model.errors import CoftError
from coft.runtime.model.images import load_folder, read_image, resize_to_input


def test_grayscale_rgba_and_16_bit_become_bgr8(tmp_path):
    gray = np.full((20, 30), 100, np.uint8)
    rgba = np.dstack([np.full((20, 30), c, np.uint8) for c in (10, 20, 30, 255)])
    deep = np.full((20, 30), 65535, np.uint16)
    cv2.imwrite(str(tmp_path / "gray.png"), gray)
    cv2.imwrite(str(tmp_path / "rgba.png"), rgba)
    cv2.imwrite(str(tmp_path / "deep.png"), deep)
    for name, expected in [("gray", (100, 100, 100)), ("rgba", (10, 20, 30)), ("deep", (255, 255, 255))]:
        image = read_image(tmp_path / f"{name}.png")
        assert image.dtype == np.uint8 and image.shape == (20, 30, 3), name
        assert tuple(image[0, 0]) == expected, name


def test_corrupt_and_non_image_files_are_skipped_by_name(tmp_path, caplog):
    cv2.imwrite(str(tmp_path / "ok.png"), np.zeros((8, 8), np.uint8))
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "marked.png").symlink_to("elsewhere/marked.png")  # a relative link made from another folder
    with caplog.at_level(logging.WARNING):
        paths, images = load_folder(tmp_path)
    assert [p.name for p in paths] == ["ok.png"] and len(images) == 1
    assert "broken.jpg" in caplog.text and "empty.png" in caplog.text
    assert "1 image links point nowhere and are left out" in caplog.text and "elsewhere/marked.png" in caplog.text


def test_folder_with_no_readable_image_is_an_error(tmp_path):
    with pytest.raises(CoftError, match="no image files found"):
        load_folder(tmp_path)
    (tmp_path / "a.png").write_bytes(b"junk")
    with pytest.raises(CoftError, match="none of the 1 image files could be read"):
        load_folder(tmp_path)
    with pytest.raises(CoftError, match="not a folder"):
        load_folder(tmp_path / "a.png")


def test_mixed_sizes_resize_to_the_model_input():
    small, large = np.zeros((50, 80, 3), np.uint8), np.zeros((600, 400, 3), np.uint8)
    assert resize_to_input(small, (96, 128)).shape == (96, 128, 3)
    assert resize_to_input(large, (96, 128)).shape == (96, 128, 3)
