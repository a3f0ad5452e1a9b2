"""popnet_tf/data/images.py: Pillow modes -> 8-bit RGB, EXIF orientation, upright sizes."""

import io

import numpy as np
import pytest
from PIL import Image

from popnet_tf.data import images


def _grey3(values):
    return np.repeat(np.asarray(values, np.uint8)[..., None], 3, axis=-1)


def test_to_rgb_keeps_the_high_byte_of_wide_grey():
    wide = np.array([[0, 255, 256, 65535]], np.int32)
    # 'I;16' (a 16-bit PNG) and 'I' holding 16-bit values: the high byte, as TF decodes PNG.
    i16 = Image.fromarray(wide.astype(np.uint16))
    assert i16.mode == "I;16"
    np.testing.assert_array_equal(np.asarray(images.to_rgb(i16)), _grey3([[0, 0, 1, 255]]))
    np.testing.assert_array_equal(np.asarray(images.to_rgb(Image.fromarray(wide))),
                                  _grey3([[0, 0, 1, 255]]))
    # 'I' whose values all fit in 8 bits is taken as they are; negatives clip to 0.
    np.testing.assert_array_equal(
        np.asarray(images.to_rgb(Image.fromarray(np.array([[-5, 7, 200]], np.int32)))),
        _grey3([[0, 7, 200]]))


def test_to_rgb_drops_alpha_and_resolves_palettes():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[..., :3] = [10, 20, 30]
    rgba[..., 3] = 0  # fully transparent: the colour is kept, alpha dropped
    np.testing.assert_array_equal(np.asarray(images.to_rgb(Image.fromarray(rgba))),
                                  np.full((2, 2, 3), [10, 20, 30], np.uint8))
    palette = Image.new("P", (2, 1))
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.putpixel((1, 0), 1)
    np.testing.assert_array_equal(np.asarray(images.to_rgb(palette)),
                                  [[[255, 0, 0], [0, 0, 255]]])


@pytest.mark.parametrize("tag, expected", [(None, 1), (1, 1), (6, 6), (8, 8), (0, 1), (9, 1)])
def test_exif_orientation_from_bytes_and_images(tag, expected):
    image = Image.new("RGB", (4, 2))
    kwargs = {}
    if tag is not None:
        exif = Image.Exif()
        exif[images.EXIF_ORIENTATION_TAG] = tag
        kwargs["exif"] = exif
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **kwargs)
    data = buffer.getvalue()
    assert images.exif_orientation(data) == expected
    assert images.exif_orientation(Image.open(io.BytesIO(data))) == expected
    assert images.exif_orientation(b"not an image") == 1  # unreadable: no turn, no error


def test_upright_size_swaps_for_quarter_turns_only():
    assert [images.upright_size((40, 30), o) for o in range(1, 9)] == \
        [(40, 30)] * 4 + [(30, 40)] * 4
    assert images.is_heif(b"\0\0\0\x18ftypheic") and not images.is_heif(b"\xff\xd8\xff")


def test_grey_of_colour_mask():
    grey = np.arange(12, dtype=np.uint8).reshape(3, 4)
    rgb = Image.fromarray(np.dstack([grey] * 3))
    values, why = images.grey_of_colour_mask(rgb)
    np.testing.assert_array_equal(values, grey)
    assert why == ""
    la = Image.fromarray(np.dstack([grey, np.full_like(grey, 255)]), "LA")
    np.testing.assert_array_equal(images.grey_of_colour_mask(la)[0], grey)
    see_through = np.dstack([grey] * 3 + [np.full_like(grey, 255)])
    see_through[0, 0, 3] = 10
    assert images.grey_of_colour_mask(Image.fromarray(see_through)) == (None, "has transparent pixels")
    coloured = np.dstack([grey] * 3)
    coloured[..., 1] = 0                       # 12 distinct colours, 4 named
    values, why = images.grey_of_colour_mask(Image.fromarray(coloured))
    assert values is None
    assert why.startswith("is in colour (12 colours: (0, 0, 0), (1, 0, 1), (2, 0, 2), (3, 0, 3) "
                          "and 8 more)")
    with pytest.raises(ValueError, match="not one of"):
        images.grey_of_colour_mask(Image.fromarray(grey))


def test_sixteen_bit_colour_png():
    """16-bit PNGs of several channels are named (Pillow reads their high byte only);
    8-bit colour, 16-bit grey and other files are not."""
    from tests.test_build_atr_os import _png16
    values = np.array([[0, 3], [17, 255]], np.uint16)
    assert images.sixteen_bit_colour_png(_png16(np.dstack([values] * 3))) == "RGB"
    assert images.sixteen_bit_colour_png(_png16(np.dstack([values] * 4))) == "RGBA"
    assert images.sixteen_bit_colour_png(_png16(np.dstack([values] * 2))) == "grey + alpha"
    for other in (Image.fromarray(np.dstack([values.astype(np.uint8)] * 3)),  # 8-bit RGB
                  Image.fromarray(values)):                                    # 16-bit grey
        buf = io.BytesIO()
        other.save(buf, format="PNG")
        assert images.sixteen_bit_colour_png(buf.getvalue()) == ""
    assert images.sixteen_bit_colour_png(b"\xff\xd8\xff\xe0" + bytes(40)) == ""
    assert images.sixteen_bit_colour_png(b"") == ""


@pytest.mark.parametrize("fmt", ["TIFF", "JPEG", "PNG"])
def test_load_stored_gives_the_stored_grid_and_the_tag(fmt):
    """Pillow turns a TIFF upright while decoding it (and drops the tag); load_stored
    undoes that, so every format arrives as stored with its orientation."""
    stored = np.zeros((6, 10, 3), np.uint8)
    stored[0, 0] = 255                                 # a corner that shows any turn
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.fromarray(stored).save(buffer, format=fmt, exif=exif, **({"quality": 100} if fmt == "JPEG" else {}))
    image, orientation = images.load_stored(Image.open(io.BytesIO(buffer.getvalue())))
    assert orientation == 6
    pixels = np.asarray(image.convert("RGB"))
    assert pixels.shape == (6, 10, 3)
    assert pixels[0, 0, 0] > 200 and pixels[-1, -1, 0] < 50
