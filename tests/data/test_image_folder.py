"""data.datasets.base.image_folder: the image files of a folder given on the command line, sorted,
by suffix in any case; a missing folder or one without images refused with the option's name."""

from __future__ import annotations

import pytest

from hpc_reid.data.datasets.base import IMAGE_SUFFIXES, image_folder


class OptionError(ValueError):
    pass


def test_image_files_sorted_by_name_any_suffix_case_others_left_out(tmp_path):
    names = ["b.JPG", "a.png", "c.webp", "notes.txt", "d.tiff", "e"]
    for n in names:
        (tmp_path / n).write_bytes(b"")
    got = image_folder(tmp_path, "--query-dir")
    assert [p.name for p in got] == ["a.png", "b.JPG", "c.webp", "d.tiff"]
    assert all(p.suffix.lower() in IMAGE_SUFFIXES for p in got)


def test_missing_folder_and_folder_without_images_name_option_and_folder(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(OptionError, match=f"--check-images {missing} is not a folder"):
        image_folder(missing, "--check-images", OptionError)
    (tmp_path / "readme.md").write_text("x")
    with pytest.raises(OptionError, match=r"--query-dir .* holds no image file \(suffixes .jpg"):
        image_folder(tmp_path, "--query-dir", OptionError)
