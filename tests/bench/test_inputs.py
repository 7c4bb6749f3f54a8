"""Reading the images a bench sends."""

from __future__ import annotations

import pytest

from cvserve.bench import ImageSourceError, load_images


def test_directory_of_real_images(data_dir):
    images = load_images(data_dir / "images")
    names = [im.name for im in images]
    assert names == sorted(names) and "small/dog.jpg" in names
    assert all(im.content_type == "image/jpeg" and im.data[:3] == b"\xff\xd8\xff" for im in images)
    bad = load_images(data_dir / "bad")  # all sorts of formats, sniffed by content
    types = {im.name: im.content_type for im in bad}
    assert types["hopper.webp"] == "image/webp" and types["hopper_lzw.tif"] == "image/tiff"
    assert types["hopper.bmp"] == "image/bmp"


def test_files_and_lists(data_dir, tmp_path):
    one = data_dir / "images" / "small" / "dog.jpg"
    assert [im.name for im in load_images(one)] == ["dog.jpg"]
    assert len(load_images([one, str(one)])) == 2
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden.jpg").write_bytes(one.read_bytes())
    (tmp_path / "photo").write_bytes(one.read_bytes())  # no extension: sniffed
    assert [(im.name, im.content_type) for im in load_images(tmp_path)] == [("photo", "image/jpeg")]


def test_errors(tmp_path):
    with pytest.raises(ImageSourceError, match="no image files"):
        load_images(tmp_path)
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(ImageSourceError, match="1 non-image file"):
        load_images(tmp_path)
    with pytest.raises(ImageSourceError, match="does not exist"):
        load_images(tmp_path / "missing")
    (tmp_path / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    with pytest.raises(ImageSourceError, match="cannot read images"):
        load_images(tmp_path)
    with pytest.raises(ImageSourceError, match="no image paths"):
        load_images([])
