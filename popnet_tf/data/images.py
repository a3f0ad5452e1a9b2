"""Photos as users have them: file types, EXIF orientation, 16-bit grey -> 8-bit RGB.

Pillow only (no TensorFlow), so the dataset builder's worker processes can use it
cheaply; `popnet_tf.predict_lib` reads query and support photos with the same rules.

- `IMAGE_EXTENSIONS`: the file types a folder of photos contributes (HEIC/HEIF are
  listed so that they are reported with a hint rather than skipped silently).
- `exif_orientation` and `UPRIGHT`: the EXIF orientation tag (1-8) and the transpose
  that turns the stored pixels upright (the table of `PIL.ImageOps.exif_transpose`).
- `to_rgb`: any Pillow image -> 8-bit RGB, keeping the high byte of 16-bit grey
  (Pillow's own `convert("RGB")` clips 16-bit values at 255, a white image; TensorFlow's
  PNG decoder keeps the high byte, and so do we).
- `sixteen_bit_colour_png`: whether PNG bytes are 16-bit RGB(A) or grey + alpha, which
  Pillow reads as 8-bit (high byte only): a mask stored so cannot be read.
- `grey_of_colour_mask`: a label mask some editor saved as RGB(A) or LA with equal
  colour channels and no transparency -> its single-channel values.

Example:
    >>> from PIL import Image
    >>> from popnet_tf.data import images
    >>> photo = Image.open("IMG_0042.jpg")        # a phone photo stored sideways
    >>> orientation = images.exif_orientation(photo)                  # 6
    >>> upright = images.to_rgb(photo).transpose(images.UPRIGHT[orientation])
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".bmp", ".dib", ".gif",
                    ".webp", ".tif", ".tiff", ".avif", ".jp2", ".j2k", ".jpx", ".ppm", ".pgm",
                    ".pbm", ".pnm", ".tga", ".qoi", ".heic", ".heif")
HEIF_BRANDS = (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypmsf1", b"ftypheif")
HEIF_HINT = "HEIC/HEIF photos need converting to JPEG first"

EXIF_ORIENTATION_TAG = 0x0112
# EXIF orientation -> the transpose that turns the stored pixels upright.
UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
           4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
           6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
           8: Image.Transpose.ROTATE_90}
# Orientations whose upright photo has width and height swapped.
SWAPS_AXES = frozenset((5, 6, 7, 8))


def is_heif(data: bytes) -> bool:
    """Whether the bytes start like a HEIC/HEIF file (which Pillow cannot read)."""
    return data[4:12] in HEIF_BRANDS


def exif_orientation(image: Image.Image | bytes) -> int:
    """The EXIF orientation tag of an image (or of encoded bytes, reading the header only)
    when it asks for a turn (2-8), else 1: also when the tag is absent, out of range or
    unreadable, since a broken EXIF block is no reason to refuse a photo."""
    try:
        if isinstance(image, (bytes, bytearray)):
            with Image.open(io.BytesIO(image)) as opened:
                value = int(opened.getexif().get(EXIF_ORIENTATION_TAG, 1))
        else:
            value = int(image.getexif().get(EXIF_ORIENTATION_TAG, 1))
    except Exception:  # pylint: disable=broad-except
        return 1
    return value if value in UPRIGHT else 1


def load_stored(image: Image.Image) -> tuple[Image.Image, int]:
    """Decodes an opened image -> (its pixels in the stored grid, its EXIF orientation).

    Pillow turns a TIFF upright while decoding it and drops its orientation tag; that turn
    is undone here, so every format reaches the caller as stored, with its tag, and the
    caller alone decides whether to turn (ATR's masks follow the stored grid).
    """
    orientation = exif_orientation(image)
    image.load()
    if orientation != 1 and exif_orientation(image) == 1:  # Pillow applied the tag itself
        image = image.transpose(UPRIGHT[_UNDO.get(orientation, orientation)])
    return image, orientation


# The transpose that undoes UPRIGHT[o] is UPRIGHT[_UNDO.get(o, o)] (the others are their own inverse).
_UNDO = {6: 8, 8: 6}


def upright_size(size: tuple[int, int], orientation: int) -> tuple[int, int]:
    """(width, height) of the photo as seen, after its EXIF orientation."""
    return (size[1], size[0]) if orientation in SWAPS_AXES else tuple(size)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow image -> 'RGB'. Alpha is dropped (through RGBA, so that palette
    transparency is resolved by Pillow rather than warned about); 16- and 32-bit grey
    keep their high byte; float grey in 0..1 is scaled to 0..255 (Pillow's own
    conversion would make it black). Raises ValueError or OSError for a mode Pillow cannot convert."""
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.asarray(image).astype(np.int64)
        # 'I' holds a 16-bit PNG's values on some Pillow versions: its high byte too.
        shift = 8 if image.mode != "I" or values.max(initial=0) > 255 else 0
        grey = (np.clip(values, 0, 65535) >> shift).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=-1))
    if image.mode == "F":  # float grey (TIFF): 0..1 as most tools write it, else 0..255
        values = np.nan_to_num(np.asarray(image, np.float64))
        scale = 255.0 if values.size and 0 <= values.min() and values.max() <= 1 else 1.0
        grey = np.clip(np.round(values * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(grey[..., None], 3, axis=-1))
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


COLOUR_MASK_MODES = ("RGB", "RGBA", "LA")

# PNG colour types of several channels (IHDR byte 25): grey + alpha, RGB, RGBA.
PNG_MULTI_CHANNEL = {4: "grey + alpha", 2: "RGB", 6: "RGBA"}


def sixteen_bit_colour_png(data: bytes) -> str:
    """"grey + alpha", "RGB" or "RGBA" when `data` is a 16-bit PNG of several channels,
    else "". Pillow decodes such a PNG as 8-bit RGB(A) keeping only the high byte of each
    value, so a grey mask saved that way with values 0-255 reads as all 0: a mask must
    be refused rather than read. (16-bit single-channel PNGs are read whole.)

    Example:
        >>> sixteen_bit_colour_png(open("mask_rgb48.png", "rb").read())
        'RGB'
    """
    if data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR" and len(data) >= 26 \
            and data[24] == 16:
        return PNG_MULTI_CHANNEL.get(data[25], "")
    return ""


def grey_of_colour_mask(image: Image.Image) -> tuple[np.ndarray | None, str]:
    """A mask stored in colour -> (its [H, W] uint8 values, "") when every pixel has equal
    colour channels and full opacity (a grey mask an editor saved as RGB), else (None,
    why not): transparency, or colours, which do not say which value they stand for.
    Only for `COLOUR_MASK_MODES`.

    Example:
        >>> values, why = grey_of_colour_mask(Image.open("mask_saved_as_rgb.png"))
    """
    if image.mode not in COLOUR_MASK_MODES:
        raise ValueError(f"grey_of_colour_mask: mode {image.mode!r} is not one of {COLOUR_MASK_MODES}")
    pixels = np.asarray(image, np.uint8)
    has_alpha = image.mode in ("RGBA", "LA")
    colour = pixels[..., :-1] if has_alpha else pixels
    if has_alpha and (pixels[..., -1] != 255).any():
        return None, "has transparent pixels"
    if (colour != colour[..., :1]).any():
        colours = np.unique(colour.reshape(-1, colour.shape[-1]), axis=0)
        shown = ", ".join(str(tuple(int(v) for v in c)) for c in colours[:4])
        more = f" and {len(colours) - 4} more" if len(colours) > 4 else ""
        return None, (f"is in colour ({len(colours)} colours: {shown}{more}), which does not "
                      "say the class values")
    return np.ascontiguousarray(colour[..., 0]), ""
