import numpy as np
import pytest
from PIL import Image

import shared.preprocess
from shared.preprocess import decode_image

from datagen import make_odd_images


@pytest.fixture
def odd(tmp_path, monkeypatch):
    monkeypatch.setattr(shared.preprocess, "MAX_MEGAPIXELS", 2)
    return tmp_path / "odd", make_odd_images(tmp_path / "odd")


def test_every_readable_mode_decodes_to_rgb_at_the_requested_size(odd):
    folder, cases = odd
    for name, error in cases.items():
        if error is None:
            out = decode_image(folder / name, 32)
            assert out.shape == (3, 32, 32) and out.dtype == np.uint8, name


def test_unreadable_files_raise_what_the_callers_catch(odd):
    folder, cases = odd
    for name, error in cases.items():
        if error is not None:
            with pytest.raises((OSError, ValueError)):
                decode_image(folder / name, 32)


def test_exif_rotated_photos_are_decoded_upright(tmp_path):
    stored = np.zeros((40, 40, 3), np.uint8)
    stored[:20, :20] = 255  # bright top-left quadrant as stored in the file
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    Image.fromarray(stored).save(tmp_path / "rotated.jpg", exif=exif, quality=95)
    decoded = decode_image(tmp_path / "rotated.jpg", 40).astype(int)
    upright = np.rot90(stored, k=-1).transpose(2, 0, 1).astype(int)  # bright quadrant top-right
    as_stored = stored.transpose(2, 0, 1).astype(int)
    assert np.abs(decoded - upright).mean() < 5 < np.abs(decoded - as_stored).mean()


def test_transparent_pixels_become_white(tmp_path):
    Image.new("RGBA", (8, 8), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    assert (decode_image(tmp_path / "clear.png", 8) == 255).all()


def test_sixteen_bit_images_keep_their_full_range(tmp_path):
    Image.fromarray(np.full((8, 8), 65535, np.uint16)).save(tmp_path / "white16.png")
    assert (decode_image(tmp_path / "white16.png", 8) == 255).all()


def test_non_square_images_are_center_cropped(tmp_path):
    img = np.zeros((10, 30, 3), np.uint8)
    img[:, 10:20] = 255  # a white square in the middle third
    Image.fromarray(img).save(tmp_path / "wide.png")
    assert (decode_image(tmp_path / "wide.png", 10) == 255).all()
