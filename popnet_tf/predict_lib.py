"""The library behind `python -m popnet_tf.predict` (see that module for the command
line): load a model (`load_predictor`), read a support and its mask (`read_support`),
read photos as a viewer shows them (`read_photo`), and parse query files and folders
into label maps, overlays and a summary (`predict_files`).

Photos are read as a viewer shows them: turned upright by their EXIF orientation tag.
JPEG, PNG, GIF, BMP and WebP are decoded by the model's own decoder; other formats Pillow
reads (TIFF, AVIF, JPEG 2000, PNM, TGA, ...) are decoded here and sent to the model as PNG.
Bad input raises `InputError`, whose message is one line naming the file.

Example:
    >>> predictor = load_predictor("exported/popnet")
    >>> support = read_support("ref.jpg", "ref.png", predictor)
    >>> summary = predict_files(predictor, support, ["photos/"], "parsed/")
"""

from __future__ import annotations

import dataclasses
import io
import json
import os

import numpy as np
import tensorflow as tf
from keras.utils import Progbar
from PIL import Image, UnidentifiedImageError

from popnet_tf import classes, serving
from popnet_tf.data import images, show

IMAGE_EXTENSIONS = images.IMAGE_EXTENSIONS  # what a query folder contributes
_TF_DECODES = "JPEG, PNG, GIF, BMP, WebP"
# Their leading bytes: only such files go to TensorFlow's decoder, which logs a raw
# C++ warning for anything else before our own one-line error.
# (JPEG XL too: this TensorFlow's decoder reads it, though older ones do not.)
_TF_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM",
                  b"\xff\x0a", b"\x00\x00\x00\x0cJXL \r\n\x87\n")
SUMMARY_FILE = "summary.json"
_OVERLAY_QUALITY = 90
# A request's queries share one size, and hold at most this many pixels together: the
# model pads a batch to its largest height and width and returns full-resolution
# probabilities (4 bytes x classes a pixel), so two 48 MP photos of opposite orientation
# took 11 GB in one batch. Photos larger than this go one by one.
_BATCH_PIXELS = 16_000_000


class InputError(ValueError):
    """A bad input file; the message is one line that names the file."""


# ----------------------------------------------------------------------------- the model
@dataclasses.dataclass
class Predictor:
    """The encoded-bytes serving function and what it needs to know.

    Call: (query bytes list, support image bytes, support mask PNG bytes) ->
    dict of NumPy arrays (`serving` outputs).
    """
    fn: object
    num_classes: int
    mask_values: str
    source: str
    class_names: tuple | None = None
    keep_alive: object = None   # the loaded SavedModel: its functions need it alive
    foreground_gate: bool = False  # whether stage 1's foreground gates the classes

    def __call__(self, queries: list[bytes], support_image: bytes, support_mask: bytes) -> dict:
        out = self.fn(query_images=tf.constant(queries, tf.string),
                      support_image=tf.constant(support_image, tf.string),
                      support_mask=tf.constant(support_mask, tf.string))
        return {k: v.numpy() for k, v in out.items()}


def saved_model_version(path: str) -> str | None:
    """The SavedModel folder of `path`: itself if it holds saved_model.pb, else its
    largest integer-named subfolder that does (an export base folder); None if neither.

    Example:
        >>> saved_model_version("exported/popnet")   # 'exported/popnet/2'
    """
    if os.path.exists(os.path.join(path, "saved_model.pb")):
        return path
    if not os.path.isdir(path):
        return None
    versions = sorted((int(n) for n in os.listdir(path)
                       if n.isdigit() and os.path.exists(os.path.join(path, n, "saved_model.pb"))),
                      reverse=True)
    return os.path.join(path, str(versions[0])) if versions else None


def load_predictor(model: str, mask_values: str | None = None, head: str | None = None,
                   foreground_gate: bool | None = None) -> Predictor:
    """A Predictor from an exported SavedModel (base or version folder) or a workdir.

    Args:
        model: the folder.
        mask_values: for a workdir, "user" (default) or "merged"; for a SavedModel it
            is fixed at export and a different value is an error.
        head: for a workdir, the served head (default: the config's eval.head).
        foreground_gate: for a workdir, gate the head by stage 1's human probability
            (default: the config's eval.foreground_gate); fixed at export otherwise.
    """
    version_dir = saved_model_version(model)
    if version_dir is not None:
        metadata = serving.read_metadata(version_dir)
        exported = metadata.get("mask_values", "user")
        if mask_values and mask_values != exported:
            raise InputError(f"{version_dir}: exported with mask values {exported!r}, not "
                             f"{mask_values!r}; re-export with --mask_values={mask_values}")
        if head and head != metadata.get("head", head):
            raise InputError(f"{version_dir}: exported with head {metadata.get('head')!r}; "
                             "--head only applies to a workdir")
        gated = bool(metadata.get("foreground_gate", False))
        if foreground_gate is not None and foreground_gate != gated:
            raise InputError(f"{version_dir}: exported {'with' if gated else 'without'} the "
                             "foreground gate; --foreground_gate only applies to a workdir "
                             "(re-export with or without --foreground_gate)")
        loaded = tf.saved_model.load(version_dir)
        names = metadata.get("class_names")
        return Predictor(fn=loaded.signatures[serving.SIGNATURE_ENCODED],
                         num_classes=int(metadata.get("num_classes", classes.NUM_CLASSES)),
                         mask_values=exported, source=version_dir,
                         class_names=tuple(names) if names else None, keep_alive=loaded,
                         foreground_gate=gated)
    if os.path.exists(os.path.join(model, "run.json")):
        from popnet_tf import export_lib  # training code: only for a workdir

        mask_values = mask_values or "user"
        restored, config, stage, _ = export_lib.restore_model(model)
        if foreground_gate is None:
            foreground_gate = bool(config.eval.get("foreground_gate", False))
        parser = serving.OneShotParser(restored, eval_size=config.data.eval_size,
                                       mask_values=mask_values, head=head or config.eval.head,
                                       foreground_gate=foreground_gate)
        names = classes.STAGE_CLASS_NAMES[stage] if mask_values == "merged" else None
        return Predictor(fn=parser.function(serving.SIGNATURE_ENCODED),
                         num_classes=parser.num_classes, mask_values=mask_values,
                         source=f"{model} (stage {stage})", class_names=names, keep_alive=parser,
                         foreground_gate=parser.foreground_gate)
    raise InputError(f"{model}: neither a SavedModel (saved_model.pb, or version folders holding "
                     "one) nor a training workdir (run.json)")


# ----------------------------------------------------------------------------- inputs
@dataclasses.dataclass
class Support:
    """A checked support: the image bytes sent to the model (see `Photo.data`), its mask
    re-encoded as the 8-bit grayscale PNG the serving function reads, its class values
    (sorted, background excluded) and the EXIF orientation applied to the image."""
    image_path: str
    mask_path: str
    image_bytes: bytes
    mask_png: bytes
    class_values: tuple
    image_orientation: int = 1


def _read_bytes(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise InputError(f"{path}: cannot read the {what}: {e.strerror or e}") from None


@dataclasses.dataclass
class Photo:
    """An image file as the model will see it.

    data: the bytes sent to the model: the file itself when TensorFlow decodes it and
        no EXIF turn is needed, else a PNG of `pixels` (lossless).
    pixels: [H, W, 3] uint8, upright.
    orientation: the EXIF orientation applied (1: none).
    """
    data: bytes
    pixels: np.ndarray
    orientation: int = 1


def read_photo(path: str, what: str = "query", apply_exif: bool = True) -> Photo:
    """Reads an image file for the model; one-line InputError naming the file otherwise.

    Example:
        >>> photo = read_photo("IMG_0042.jpg")   # a phone photo stored sideways
        >>> photo.orientation, photo.pixels.shape   # (6, (4032, 3024, 3)): upright
    """
    data = _read_bytes(path, what)
    if not data:
        raise InputError(f"{path}: the {what} file is empty")
    pixels = None
    if _tf_decodes(data):  # the serving decoder first, so files it reads reach the model unchanged
        try:
            pixels, reencode = serving.decode_image(data).numpy(), False
        except (tf.errors.InvalidArgumentError, tf.errors.UnknownError):
            pass  # damaged: Pillow says how
    if pixels is None:  # as stored, whatever the format (images.load_stored)
        pixels, reencode = _decode_with_pillow(path, data, what), True
    orientation = images.exif_orientation(data) if apply_exif else 1
    if orientation in images.UPRIGHT:
        pixels = np.asarray(Image.fromarray(pixels).transpose(images.UPRIGHT[orientation]))
        reencode = True
    if reencode:
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
        data = buffer.getvalue()
    return Photo(data, pixels, orientation)


def _tf_decodes(data: bytes) -> bool:
    """Whether the bytes start like a format TensorFlow's image decoder reads, except the
    variants it gets wrong or refuses (those go to Pillow): BMPs of 1-16 bits per pixel
    (TensorFlow reads an 8-bit palette BMP's indices as grey levels and refuses the
    others with a raw C++ warning) and animated WebP (refused)."""
    if data.startswith(b"BM"):
        header_size = int.from_bytes(data[14:18], "little")
        bits = int.from_bytes(data[28:30], "little") if header_size >= 40 else 0
        return bits in (24, 32)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        animated = data[12:16] == b"VP8X" and len(data) > 20 and data[20] & 0x02
        return not animated
    # A truncated JPEG or PNG (no end marker; trailing bytes after one are fine, such as
    # the video a phone's motion photo appends) goes to Pillow, which says "truncated",
    # without TensorFlow's raw C++ log lines first.
    if data.startswith(b"\xff\xd8\xff"):
        return b"\xff\xd9" in data[-4096:] or _jpeg_has_end(data)
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return b"IEND" in data[-4096:] or _png_has_end(data)
    return data.startswith(_TF_SIGNATURES)


def _jpeg_has_end(data: bytes) -> bool:
    """Whether a JPEG's end marker follows its first scan: the segments before it are
    skipped by their lengths (an EXIF thumbnail's own end marker is inside one), and in
    the entropy-coded data a 0xFF byte is never followed by 0xD9 but at the end."""
    i = 2
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker == 0xDA:  # start of scan
            return data.find(b"\xff\xd9", i) != -1
        elif 0xD0 <= marker <= 0xD7 or marker == 0x01:  # no length
            i += 2
        else:
            i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return False


def _png_has_end(data: bytes) -> bool:
    """Whether a PNG's chunks, followed by their lengths, reach IEND."""
    i = 8
    while i + 8 <= len(data):
        if data[i + 4:i + 8] == b"IEND":
            return True
        i += 12 + int.from_bytes(data[i:i + 4], "big")
    return False


def _decode_with_pillow(path: str, data: bytes, what: str) -> np.ndarray:
    """Formats TensorFlow does not decode (TIFF, AVIF, ...) -> [H, W, 3] uint8 as stored
    (a TIFF's EXIF turn, which Pillow applies while decoding, undone)."""
    try:
        with Image.open(io.BytesIO(data)) as opened:
            image, _ = images.load_stored(opened)
            return np.asarray(images.to_rgb(image))  # 16-bit grey: the high byte, as TF
    except UnidentifiedImageError:
        hint = (f": {images.HEIF_HINT}"
                if images.is_heif(data)
                else f" ({_TF_DECODES}, or another format Pillow reads)")
        raise InputError(f"{path}: the {what} is not an image file that can be "
                         f"decoded{hint}") from None
    except Image.DecompressionBombError as e:
        raise InputError(f"{path}: the {what} is too large to decode safely ({e})") from None
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError... for damaged files
        raise InputError(f"{path}: the {what} is a damaged or truncated image file "
                         f"({_error_line(e)})") from None


def _webp_chunks(data: bytes) -> list[bytes]:
    """The FourCCs of a WebP file's top-level chunks."""
    names, offset = [], 12
    while offset + 8 <= len(data):
        names.append(data[offset:offset + 4])
        size = int.from_bytes(data[offset + 4:offset + 8], "little")
        offset += 8 + size + (size & 1)
    return names


def _lossy_format(image: Image.Image, data: bytes) -> str:
    """What makes a mask file lossy ("" when it is not): smeared values would become
    classes of their own. AVIF and JPEG 2000 are taken as lossy (as they mostly are)."""
    if image.format == "WEBP" and b"VP8 " in _webp_chunks(data):
        return "a lossy WebP"
    if image.format in ("AVIF", "JPEG2000", "HEIF"):
        return f"a{'n' if image.format == 'AVIF' else ''} {image.format} image (a lossy format)"
    if image.format == "TIFF" and image.info.get("compression") in ("jpeg", "tiff_jpeg"):
        return "a JPEG-compressed TIFF"
    return ""


def _check_grey_palette(path: str, image: Image.Image, indices: np.ndarray):
    """A palette mask whose used colours are all grey, at levels other than their indices,
    is ambiguous: it looks like a grey mask (GIF writers, Pillow's too, renumber a grey
    image's levels into indices 0, 1, 2...), yet a palette's indices are its values."""
    used = np.unique(indices)
    palette = np.asarray(image.getpalette("RGB") or [], np.uint8).reshape(-1, 3)
    if used.max(initial=0) >= len(palette):
        return
    colours = palette[used]
    grey = (colours == colours[:, :1]).all()
    if grey and (colours[:, 0] != used).any():
        shown = ", ".join(f"{i} (grey {g})" for i, g in zip(used[:4], colours[:4, 0]))
        raise InputError(f"{path}: the support mask is a palette image of grey colours whose "
                         f"indices are not their grey levels ({shown}): it is unclear which "
                         "are the class values; save it as a grayscale PNG of the values")


def read_mask(path: str) -> np.ndarray:
    """A mask file -> [H, W] uint8 of its class values (a palette PNG's indices)."""
    data = _read_bytes(path, "support mask")
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception:  # PIL raises many types for a corrupt or foreign file
        raise InputError(f"{path}: the support mask is not a readable image") from None
    if image.format in ("JPEG", "MPO"):
        raise InputError(f"{path}: the support mask is a JPEG, whose lossy values are not exact "
                         "classes; save it as PNG")
    lossy = _lossy_format(image, data)
    if lossy:
        raise InputError(f"{path}: the support mask is {lossy}, whose values are not exact "
                         "classes; save it as PNG")
    wide = images.sixteen_bit_colour_png(data)
    if wide:  # Pillow would read its values' high byte only: all 0, "no foreground"
        raise InputError(f"{path}: the support mask is a 16-bit {wide} PNG, whose values "
                         "cannot be read as classes; save it as an 8-bit grayscale or palette "
                         "PNG with the class values (1-254) as pixels")
    if image.mode == "P":
        values = np.asarray(image, np.uint8)
        _check_grey_palette(path, image, values)
        return values
    if image.mode == "L":
        return np.asarray(image, np.uint8)
    if image.mode == "1":
        return np.asarray(image, np.uint8)  # 0/1: background and class 1
    if image.mode in ("I", "I;16", "I;16B", "I;16L"):
        values = np.asarray(image)
        if values.min() < 0 or values.max() > 255:
            raise InputError(f"{path}: the support mask has values outside 0..255 "
                             f"({values.min()}..{values.max()}); classes must be 1..254")
        return values.astype(np.uint8)
    if image.mode in images.COLOUR_MASK_MODES:  # a grey mask an editor saved in colour
        values, why = images.grey_of_colour_mask(image)
        if values is None:
            raise InputError(f"{path}: the support mask {why}; save it as a grayscale or "
                             "palette PNG with the class values (1-254) as pixels")
        return values
    raise InputError(f"{path}: the support mask is a {image.mode} image; a mask must be "
                     "single-channel (grayscale or palette PNG) with the class values as pixels")


def read_support(image_path: str, mask_path: str, predictor: Predictor,
                 apply_exif: bool = True) -> Support:
    """Reads and checks a support image and mask before any work (one-line InputErrors).

    Example:
        >>> support = read_support("ref.jpg", "ref_mask.png", predictor)
        >>> support.class_values   # (3, 7, 200)
    """
    photo = read_photo(image_path, "support image", apply_exif)
    mask = read_mask(mask_path)
    if mask.shape != photo.pixels.shape[:2]:
        raise InputError(_size_mismatch(mask_path, mask.shape, image_path, photo))
    values = np.unique(mask)
    values = tuple(int(v) for v in values if v not in (serving.BACKGROUND, serving.IGNORE))
    if not values:
        raise InputError(f"{mask_path}: the mask has no foreground: label your classes with "
                         "values 1..254 (0 is background, 255 ignore)")
    limit = predictor.num_classes - 1
    if predictor.mask_values == "user" and len(values) > limit:
        raise InputError(f"{mask_path}: the mask has {len(values)} classes ({list(values)}) but "
                         f"the model allows at most {limit}; merge some")
    if predictor.mask_values == "merged" and max(values) > limit:
        # Predicting from a workdir, --mask_values is the user's flag, not an export's; and
        # the likely cause is a raw ATR mask (ids 0-17: 12-17 are left/right parts, scarf).
        names = classes.STAGE_CLASS_NAMES.get(
            {n: s for s, n in classes.STAGE_NUM_CLASSES.items()}.get(predictor.num_classes), ())
        meaning = ", ".join(f"{i} {n}" for i, n in enumerate(names) if i)
        raise InputError(f"{mask_path}: value {max(values)} is not a merged ATR-OS id 1..{limit}; "
                         f"with --mask_values=merged the mask holds this model's ids ({meaning}); "
                         "a raw ATR mask, ids 0-17, must be merged first (SPEC §2)")
    buffer = io.BytesIO()
    Image.fromarray(mask, "L").save(buffer, format="PNG")
    return Support(image_path, mask_path, photo.data, buffer.getvalue(), values, photo.orientation)


def _size_mismatch(mask_path, mask_shape, image_path, photo: Photo) -> str:
    h, w = photo.pixels.shape[:2]
    text = (f"{mask_path}: the mask is {mask_shape[0]}x{mask_shape[1]} but the support image "
            f"{image_path} is {h}x{w}")
    if photo.orientation >= 5 and tuple(mask_shape) == (w, h):
        return (text + f" once turned upright by its EXIF orientation ({photo.orientation}); the "
                "mask matches the stored pixels: turn the mask the same way, or pass --noapply_exif")
    return text + "; they must match"


def collect_queries(paths: list[str]) -> tuple[list[str], list[str], list[str]]:
    """(query files, skipped files, skipped folders): files are taken as given; folders
    contribute their files with an image extension, sorted. Other files, and the folders
    inside a query folder (not searched: a nested album should not be parsed by
    surprise), are skipped and reported. Hidden entries (.DS_Store, .git) are ignored.

    Example:
        >>> collect_queries(["photos/", "extra.jpg"])   # (['photos/a.jpg', 'extra.jpg'], [], [])
    """
    files, skipped, folders = [], [], []
    for path in paths:
        if os.path.isdir(path):
            for name in sorted(os.listdir(path)):
                full = os.path.join(path, name)
                if name.startswith("."):
                    continue
                if os.path.isdir(full):
                    folders.append(full)
                elif os.path.isfile(full):
                    (files if name.lower().endswith(IMAGE_EXTENSIONS) else skipped).append(full)
        else:
            files.append(path)  # a missing file is reported as a failure
    return files, skipped, folders


def read_class_names(arg: str | None, default=None) -> dict[int, str]:
    """--class_names: a JSON file or inline JSON, {"7": "sneaker", ...} or a list
    (index = value). Values without a name are called "class <value>".

    Example:
        >>> read_class_names('{"7": "sneaker"}')   # {7: 'sneaker'}
    """
    names = {i: n for i, n in enumerate(default)} if default else {}
    if not arg:
        return names
    text = arg
    if os.path.exists(arg):
        try:
            with open(arg, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            why = e.strerror if isinstance(e, OSError) and e.strerror else f"not UTF-8 text ({e.reason})" \
                if isinstance(e, UnicodeDecodeError) else str(e)
            raise InputError(f"--class_names: {arg}: cannot read it: {why}") from None
    try:
        parsed = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(f"--class_names: {arg}: not a JSON file or JSON text ({e.msg})") from None
    if isinstance(parsed, list):
        parsed = dict(enumerate(parsed))
    if not isinstance(parsed, dict):
        raise InputError(f"--class_names: {arg}: expected an object {{value: name}} or a list")
    try:
        names.update({int(k): str(v) for k, v in parsed.items()})
    except ValueError:
        raise InputError(f"--class_names: {arg}: keys must be mask values (integers)") from None
    return names


# ----------------------------------------------------------------------------- outputs
def palette() -> np.ndarray:
    """[256, 3] uint8: `show.PALETTE` for values 0-11 (the merged classes' colours),
    white for 255, and distinct generated colours (the PASCAL VOC bit pattern) for
    the other values a user's mask may hold."""
    out = np.zeros((256, 3), np.uint8)
    for value in range(256):
        v, colour = value, [0, 0, 0]
        for bit in range(8):
            for channel in range(3):
                colour[channel] |= ((v >> channel) & 1) << (7 - bit)
            v >>= 3
        out[value] = colour
    out[: len(show.PALETTE)] = show.PALETTE
    out[classes.IGNORE_LABEL] = show.IGNORE_COLOUR
    return out


_PALETTE = palette()


def label_image(labels: np.ndarray) -> Image.Image:
    """[H, W] class values -> palette PNG image (pixel value = class value).

    Example:
        >>> label_image(out["labels"][0]).save("photo.png")
    """
    image = Image.fromarray(labels.astype(np.uint8), "P")
    image.putpalette(_PALETTE.reshape(-1).tolist())
    return image


def overlay_image(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Blends the classes' colours into the image on foreground pixels, as
    `show.overlay` does, with the 256-value palette."""
    image = image.astype(np.float32)
    fg = ((labels != serving.BACKGROUND) & (labels != serving.IGNORE))[..., None]
    colours = _PALETTE[labels].astype(np.float32)
    blended = (1 - show.OVERLAY_ALPHA) * image + show.OVERLAY_ALPHA * colours
    return np.where(fg, blended, image).round().astype(np.uint8)


def class_areas(labels: np.ndarray, values, names: dict[int, str]) -> dict:
    """{name: {"value", "pixels", "fraction"}} for background and each class value."""
    counts = np.bincount(labels.reshape(-1).astype(np.int64), minlength=256)
    total = labels.size
    return {_name(v, names): {"value": int(v), "pixels": int(counts[v]),
                              "fraction": float(counts[v] / total) if total else 0.0}
            for v in (serving.BACKGROUND, *values)}


def _name(value: int, names: dict[int, str]) -> str:
    if value == serving.BACKGROUND:
        return names.get(value, "background")
    return names.get(value, f"class {value}")


def _unique_stem(path: str, used: set, taken=lambda name: False) -> str:
    """A stem not used yet in this run, and for which `taken(stem)` is false."""
    stem = os.path.splitext(os.path.basename(path))[0] or "query"
    name, k = stem, 1
    while name in used or taken(name):
        name, k = f"{stem}-{k}", k + 1
    used.add(name)
    return name


def _error_line(error: Exception) -> str:
    text = getattr(error, "message", None) or str(error)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0] if lines else type(error).__name__


# ----------------------------------------------------------------------------- the run
def make_output_folder(out_dir: str):
    """Creates --out (and its parents); one-line InputError when it cannot be a folder."""
    try:
        os.makedirs(out_dir, exist_ok=True)
    except OSError as e:
        raise InputError(f"{out_dir}: cannot create the output folder: "
                         f"{e.strerror or e}") from None


def joins_batch(batch: list[Photo], photo: Photo, batch_size: int) -> bool:
    """Whether `photo` can go in the same model request as `batch` (non-empty): the
    request would stay within `batch_size` queries and `_BATCH_PIXELS` pixels, and every
    query has the same size, so no padding is computed."""
    h, w = photo.pixels.shape[:2]
    return (len(batch) < batch_size and batch[0].pixels.shape[:2] == (h, w)
            and (len(batch) + 1) * h * w <= _BATCH_PIXELS)


def predict_files(predictor: Predictor, support: Support, queries: list[str], out_dir: str, *,
                  class_names: dict[int, str] | None = None, batch_size: int = 4,
                  progress: bool = True, apply_exif: bool = True) -> dict:
    """Parses query files and folders, writes label PNGs, overlays and summary.json.

    Each request to the model carries the support and up to `batch_size` consecutive
    queries of one size (`joins_batch`).
    A query that cannot be read or decoded is listed in "failures" and the others
    still run. With `apply_exif`, queries are turned upright by their EXIF orientation
    (`read_photo`) and their outputs are upright too. Returns the summary (also written
    to out_dir/summary.json).
    """
    make_output_folder(out_dir)
    names = class_names if class_names is not None else read_class_names(None, predictor.class_names)
    files, skipped, skipped_folders = collect_queries(queries)
    results, failures, used = [], [], set()
    # Never write over a query: --out may be (or hold) a query folder.
    inputs = {os.path.realpath(p) for p in files}

    def overwrites_a_query(stem):
        return any(os.path.realpath(os.path.join(out_dir, stem + suffix)) in inputs
                   for suffix in (".png", "_overlay.jpg"))

    bar = Progbar(len(files), unit_name="image") if progress and len(files) > 1 else None
    done = 0

    def run(batch):
        """[(path, Photo)] -> outputs per query, or an error line per query."""
        try:
            out = predictor([photo.data for _, photo in batch], support.image_bytes,
                            support.mask_png)
            return [{k: (v[i] if k not in ("class_values",) else v) for k, v in out.items()}
                    for i in range(len(batch))]
        except tf.errors.OpError as e:
            if len(batch) == 1:
                return [e]
            return [r for item in batch for r in run([item])]

    def write(path, photo, out):
        h, w = (int(s) for s in out["image_sizes"])
        labels = out["labels"][:h, :w]
        stem = _unique_stem(path, used, overwrites_a_query)
        label_path = os.path.join(out_dir, f"{stem}.png")
        overlay_path = os.path.join(out_dir, f"{stem}_overlay.jpg")
        label_image(labels).save(label_path)
        Image.fromarray(overlay_image(photo.pixels, labels)).save(overlay_path,
                                                                  quality=_OVERLAY_QUALITY)
        values = [int(v) for v in out["class_values"][1:]]
        results.append({"file": path, "height": h, "width": w,
                        "exif_orientation": photo.orientation, "label": label_path,
                        "overlay": overlay_path, "areas": class_areas(labels, values, names)})

    batch = []

    def flush():
        nonlocal done
        for (path, photo), out in zip(batch, run(batch)):
            if isinstance(out, Exception):
                failures.append({"file": path, "error": _error_line(out)})
            else:
                write(path, photo, out)
        done += len(batch)
        batch.clear()
        if bar:
            bar.update(done)

    for path in files:
        try:
            photo = read_photo(path, "query", apply_exif)
        except InputError as e:
            failures.append({"file": path, "error": str(e)})
            done += 1
            if bar:
                bar.update(done)
        else:
            if batch and not joins_batch([p for _, p in batch], photo, batch_size):
                flush()
            batch.append((path, photo))
    if batch:
        flush()

    summary = {
        "model": predictor.source,
        "foreground_gate": predictor.foreground_gate,
        "support": {"image": support.image_path, "mask": support.mask_path,
                    "exif_orientation": support.image_orientation,
                    "classes": {_name(v, names): v for v in support.class_values}},
        "queries": results,
        "totals": _totals(results),
        "failures": failures,
        "skipped": skipped,
        "skipped_folders": skipped_folders,
    }
    with open(os.path.join(out_dir, SUMMARY_FILE), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def _totals(results: list[dict]) -> dict:
    """Per class: images where found, pixels, and mean area fraction over the images."""
    totals: dict[str, dict] = {}
    for r in results:
        for name, a in r["areas"].items():
            t = totals.setdefault(name, {"value": a["value"], "images": 0, "pixels": 0,
                                         "mean_fraction": 0.0})
            t["images"] += int(a["pixels"] > 0)
            t["pixels"] += a["pixels"]
            t["mean_fraction"] += a["fraction"] / len(results)
    return totals


def format_summary(summary: dict) -> str:
    """A Markdown table of the class areas, then the failures, one per line."""
    n = len(summary["queries"])
    lines = [f"| class | value | images where found (of {n}) | mean area |", "|---|---|---|---|"]
    for name, t in summary["totals"].items():
        lines.append(f"| {name} | {t['value']} | {t['images']} | {100 * t['mean_fraction']:.1f}% |")
    for f in summary["failures"]:
        lines.append(f"failed: {f['error']}" if f["error"].startswith(f["file"])
                     else f"failed: {f['file']}: {f['error']}")
    for s in summary["skipped"]:
        lines.append(f"skipped (not an image extension): {s}")
    for s in summary.get("skipped_folders", []):
        lines.append(f"skipped folder (folders inside a query folder are not searched; "
                     f"give it as a --query of its own): {s}")
    return "\n".join(lines)
