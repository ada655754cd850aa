"""Decoding: bad input is refused with the asset and the cause; odd valid images work."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from plugin.errors import ImageError
from plugin.imaging import decode

PORTRAIT = "library/events/2024-summit/IMG_2041.jpg"  # 1126x661, two faces


def test_zero_byte_file(tmp_path):
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty\.jpg: not a recognised image"):
        decode(p)


def test_text_with_jpg_name(tmp_path):
    p = tmp_path / "notes.jpg"
    p.write_text("meeting notes, not a photo\n")
    with pytest.raises(ImageError, match="not a recognised image"):
        decode(p)


def test_truncated_jpeg(tmp_path, demo_data):
    data = (demo_data / PORTRAIT).read_bytes()
    p = tmp_path / "cut.jpg"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageError, match="truncated or corrupt"):
        decode(p)


def test_decompression_bomb_refused_before_decoding(tmp_path):
    p = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(p, optimize=True)
    assert p.stat().st_size < 2_000_000
    with pytest.raises(ImageError, match=r"\(400 MP\), over the 100 MP limit"):
        decode(p)


def test_directory_named_like_an_image(tmp_path):
    d = tmp_path / "album.jpg"
    d.mkdir()
    with pytest.raises(ImageError, match="is a directory"):
        decode(d)


def test_vanished_file(tmp_path):
    with pytest.raises(ImageError, match="vanished"):
        decode(tmp_path / "gone.jpg")


@pytest.mark.parametrize("mode", ["CMYK", "L", "RGBA", "I;16", "P", "LA"])
def test_unusual_modes_become_rgb(tmp_path, demo_data, mode):
    src = Image.open(demo_data / PORTRAIT).convert("RGB")
    if mode == "I;16":
        arr = (np.asarray(src.convert("L"), dtype=np.uint16) * 257)
        img = Image.fromarray(arr)
        path = tmp_path / "deep.png"
    elif mode == "CMYK":
        img, path = src.convert("CMYK"), tmp_path / "cmyk.jpg"
    else:
        img, path = src.convert(mode), tmp_path / f"{mode.replace(';', '')}.png"
    img.save(path)
    decoded = decode(path)
    assert decoded.pixels.dtype == np.uint8 and decoded.pixels.shape == (661, 1126, 3)
    # The picture survives the conversion (not black, not clipped flat).
    assert 40 < decoded.pixels.mean() < 220 and decoded.pixels.std() > 20


def test_large_jpeg_is_decoded_reduced_and_bounded(tmp_path, demo_data):
    big = Image.open(demo_data / PORTRAIT).resize((4504, 2644))
    path = tmp_path / "big.jpg"
    big.save(path, quality=85)
    d = decode(path, max_side=1000)
    assert max(d.pixels.shape[:2]) == 1000
    assert d.geometry.stored_width == 4504 and abs(d.scale - 4.504) < 0.01


def test_orientation_applied_and_remembered(tmp_path, demo_data):
    img = Image.open(demo_data / PORTRAIT)
    rotated = img.transpose(Image.Transpose.ROTATE_90)  # stored 661 wide, 1126 high
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "rot.jpg"
    rotated.save(path, exif=exif)
    d = decode(path)
    assert d.geometry.orientation == 6
    assert d.geometry.stored_width == 661 and d.displayed_size == (1126, 661)
    assert d.pixels.shape[:2] == (661, 1126)


def test_copy_of_real_photo_decodes(tmp_path, demo_data):
    p = tmp_path / "x.jpg"
    shutil.copy(demo_data / PORTRAIT, p)
    assert decode(p).pixels.shape == (661, 1126, 3)
