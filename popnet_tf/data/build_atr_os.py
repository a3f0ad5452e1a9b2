"""Build the ATR-OS dataset (SPEC §2, §5) from an ATR-layout folder.

Input: any folder in the ATR layout, the real ATR download or the output of
`popnet_tf.data.synth`:

    ROOT/JPEGImages/<id>.jpg            RGB photo (or .png, .webp, .tif, .bmp... any
                                        type Pillow reads; HEIC is refused with a hint)
    ROOT/SegmentationClassAug/<id>.png  single-channel mask (8-bit grey or palette
                                        indices, or 16-bit; or grey saved as opaque
                                        RGB/RGBA/LA), raw ATR ids 0-17, 255 = ignore

Output: `OUT/<split>-NNNNN-of-MMMMM.tfrecord` for the splits q_train, s_train,
q_test and s_test, and `OUT/manifest.json` (docs/DESIGN.md). Each example holds
the JPEG, a PNG of the **merged** ids 0-11 (255 kept) and the merged ids present.

Rules (SPEC §5):
- With id lists (`train_list`/`test_list`): q_train = the first
  `num_query_train` usable ids of the train list, s_train = the rest; q_test = the
  first `num_test_query` usable ids of the test list, s_test = the next
  `num_test_support`. Listed ids missing on disk are rejected with a reason.
- With `split_lists="official"` (the authors' lists in `popnet_tf/atr_os_official/`):
  the release's own split, whatever is missing. q_train = the usable ids among the
  train list's first 7501 (its queries), at most `num_query_train`; s_train = the
  usable ids among the rest (its supports); q_test = the usable ids among the test
  list's first 201, at most `num_test_query`; s_test = the next usable supports,
  at most `num_test_support`.
- Without lists: the sorted usable ids are shuffled with `seed`; the first
  `num_test` form the test list, the others the train list (in that shuffled
  order), then the same rule.
- Ten test supports are chosen from s_test by a greedy set cover of the 11
  foreground classes (most new classes first, ties broken by more classes, then
  by id), filled up to ten with the images holding most classes.

Bad inputs (truncated or unreadable image, non-image file, a file the system
cannot read, a dangling symbolic link, a file name that is not UTF-8, image
without mask or mask without image, mask of another size, mask that is not
single-channel or not 8-bit (a 16-bit colour PNG), label values outside 0-17 and
255) are skipped, listed in the manifest under "rejected" with the file and the
reason, and counted in the log at the end. A photo and its mask whose names
differ only in Unicode normal form (a Mac's NFD) are one id.

EXIF orientation (`exif`, `--exif`): ATR's masks are aligned to the stored pixel
grid, which is also what TensorFlow's `decode_jpeg` returns. A phone photo stored
sideways with an orientation tag may instead have been annotated as seen. With
the default "auto", an image is turned upright only when its mask has the upright
photo's size and not the stored one (tags 5-8, a 90-degree turn); a mask of the
stored size keeps the stored grid, and such images are counted in a warning and
listed in the manifest's "exif" (a mirror or 180-degree turn cannot be told from
the sizes: `--exif=upright` turns every tagged image, `--exif=stored` none).

A valid baseline RGB JPEG kept in its stored grid is stored byte for byte;
anything else (grayscale, 16-bit grey: its high byte, CMYK, progressive, PNG,
WebP, TIFF, palette, alpha, an image turned upright) is re-encoded as RGB JPEG,
quality 95.

The output appears atomically: the build writes into the sibling folder
`OUT.tmp-<pid>` and renames it into place when complete; a previous dataset at
OUT is replaced only then. Temp folders of killed builds are removed (or, for a
build killed while swapping, the previous dataset restored) by the next build.
The same input and flags give byte-identical shards (and manifest hashes) in any
run, whatever the number of worker processes and Python's hash seed.

Example:
    $ python -m popnet_tf.data.build_atr_os --atr_root /data/ATR --out /data/atr_os
    $ python -m popnet_tf.data.build_atr_os --atr_root /data/ATR --out /data/atr_os_official \\
          --split_lists=official

    >>> from popnet_tf.data import build_atr_os
    >>> manifest = build_atr_os.build("/tmp/synth_atr", "/tmp/atr_os",
    ...                               num_query_train=50, num_test_query=20,
    ...                               num_test_support=20)
    >>> manifest["splits"]["q_train"]["count"]
    50
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import hashlib
import importlib.resources
import io
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import time
import unicodedata
import zlib
from typing import NamedTuple, Sequence

import numpy as np
from absl import logging
from PIL import Image, ImageFile, UnidentifiedImageError

from popnet_tf import classes, cli
from popnet_tf.data.images import (COLOUR_MASK_MODES, HEIF_HINT, IMAGE_EXTENSIONS, UPRIGHT,
                                   grey_of_colour_mask, is_heif, load_stored,
                                   sixteen_bit_colour_png, to_rgb, upright_size)

# TensorFlow and Keras are imported inside the functions that need them: worker
# processes are started with "spawn" and import this module, and they only need
# PIL and NumPy (importing TensorFlow there would cost seconds and memory each).

IMAGE_DIR = "JPEGImages"
MASK_DIR = "SegmentationClassAug"
# Any photo type Pillow reads (JPEG, PNG, WebP, TIFF, BMP...); stored as JPEG in the shards.
IMAGE_SUFFIXES = IMAGE_EXTENSIONS
MASK_SUFFIX = ".png"

NUM_TEST_SUPPORTS = 10  # SPEC §5: ten fixed supports of S_test.
JPEG_QUALITY = 95  # Re-encoding quality for images that are not baseline RGB JPEG.
# --exif: which pixel grid a mask is aligned to when its image has an EXIF orientation.
EXIF_MODES = ("auto", "stored", "upright")
MAX_SHARD_EXAMPLES = 1000
MAX_SHARD_BYTES = 100 * 2**20
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
OFFICIAL = "official"
_OFFICIAL_FILES = ("atr_os_official/meta_train_id.txt", "atr_os_official/meta_test_id.txt")
_STAGING_NAME = "staging.bin"
# The authors' loader takes, in each official list, the ids before these indices as
# queries and the rest as supports (atr_os_official/README.md; the indices of the
# release's class lists, meta_*_supports.json, say the same).
OFFICIAL_QUERIES = {"train": 7501, "test": 201}

# Kinds of rejection: the first words of each reason, counted in the summary.
MISSING_IMAGE = "missing image"
MISSING_MASK = "missing mask"
NOT_AN_IMAGE = "not an image"
TRUNCATED_IMAGE = "truncated image"
UNREADABLE_IMAGE = "unreadable image"
UNREADABLE_MASK = "unreadable mask"
MASK_NOT_PNG = "mask not PNG"
MASK_NOT_SINGLE_CHANNEL = "mask not single-channel"
MASK_NOT_8_BIT = "mask not 8-bit"
MASK_SIZE_MISMATCH = "mask size mismatch"
LABEL_OUT_OF_RANGE = "label out of range"
UNEXPECTED_FILE = "unexpected file"
BAD_FILE_NAME = "bad file name"
BROKEN_LINK = "broken link"
DUPLICATE_ID = "duplicate id"

_FOREGROUND = frozenset(range(1, classes.NUM_CLASSES))


class DatasetError(ValueError):
    """The input cannot make the dataset asked for (too few images, bad lists, a
    non-dataset folder at OUT...). The message says what and what to do."""


class _Encoded(NamedTuple):
    """A usable input, ready for features.make_example."""
    source_id: str
    image_jpeg: bytes
    mask_png: bytes
    height: int
    width: int
    classes: tuple[int, ...]  # merged ids present, 0 included, 255 excluded
    exif: str  # "turned_upright", "kept_as_stored" (orientation tag 2-8) or "" (none)


class _Rejection(NamedTuple):
    source_id: str
    path: str  # relative to the ATR root
    kind: str
    detail: str

    def as_manifest(self) -> dict:
        return {"id": self.source_id, "path": self.path,
                "reason": f"{self.kind}: {self.detail}"}


class _Skip(Exception):
    """Raised inside the worker for an input to skip; becomes a _Rejection."""

    def __init__(self, kind: str, path: str, detail: str):
        super().__init__(f"{kind}: {path}: {detail}")
        self.kind, self.path, self.detail = kind, path, detail


class _Task(NamedTuple):
    source_id: str
    root: str
    image: str | None  # paths relative to root; None when the file is absent
    mask: str | None
    exif: str = "auto"  # one of EXIF_MODES


# --------------------------------------------------------------------------
# Worker side: decode, validate, merge, encode. Pure PIL/NumPy.


def _open_fully(data: bytes, path: str, *, is_mask: bool) -> tuple[Image.Image, int]:
    """Opens and fully decodes an image, so truncation is caught here and not
    later in training -> (its pixels as stored, its EXIF orientation). Stored, also for
    a TIFF, which Pillow would turn upright (`images.load_stored`): --exif decides.
    LOAD_TRUNCATED_IMAGES is held off meanwhile: PIL then raises on a short file
    instead of padding it with grey."""
    saved = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        img, orientation = load_stored(Image.open(io.BytesIO(data)))
    except UnidentifiedImageError:
        kind = UNREADABLE_MASK if is_mask else NOT_AN_IMAGE
        hint = f"; {HEIF_HINT}" if is_heif(data) else ""
        raise _Skip(kind, path, f"not an image file (PIL cannot identify it){hint}") from None
    except Exception as err:  # pylint: disable=broad-except
        # PIL reports truncation and corrupt streams as OSError, but malformed
        # headers surface as SyntaxError, ValueError, EOFError, struct.error or
        # DecompressionBombError depending on the plugin: any of them means
        # this file cannot be used.
        if is_mask:
            kind = UNREADABLE_MASK
        elif isinstance(err, OSError) and "truncated" in str(err).lower():
            kind = TRUNCATED_IMAGE
        else:
            kind = UNREADABLE_IMAGE
        raise _Skip(kind, path, f"{type(err).__name__}: {err}") from None
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved
    return img, orientation


def _image_jpeg(data: bytes, img: Image.Image, path: str, orientation: int = 1) -> bytes:
    """The original bytes for a baseline RGB JPEG kept in its stored grid (orientation
    1); otherwise RGB JPEG, quality 95, turned by the EXIF `orientation` when it is 2-8.
    16-bit grey keeps its high byte (Pillow's own conversion would clip it to white)."""
    progressive = "progressive" in img.info or "progression" in img.info
    if img.format == "JPEG" and img.mode == "RGB" and not progressive and orientation == 1:
        return data
    try:
        rgb = to_rgb(img)
        if orientation in UPRIGHT:
            rgb = rgb.transpose(UPRIGHT[orientation])
    except (ValueError, OSError) as err:
        raise _Skip(UNREADABLE_IMAGE, path,
                    f"cannot convert mode {img.mode!r} to RGB ({err})") from None
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


# Single-channel integer modes wider than 8 bits (16-bit PNG masks, as some annotation
# tools write them): accepted when every value is an ATR id or the ignore label.
_WIDE_INTEGER_MODES = ("I", "I;16", "I;16B", "I;16L")


def _narrow_mask(mask: Image.Image, path: str) -> Image.Image:
    """A 16- or 32-bit integer mask -> 'L', or a label-out-of-range skip naming the
    values that do not fit (the same reason an 8-bit mask would get)."""
    values = np.asarray(mask).astype(np.int64)
    found = np.unique(values)
    bad = found[((found < 0) | (found >= classes.NUM_RAW_CLASSES))
                & (found != classes.IGNORE_LABEL)]
    if bad.size:
        raise _out_of_range(path, bad.tolist(), f"; {mask.mode!r} mask")
    return Image.fromarray(values.astype(np.uint8), "L")


def _check_not_wide_colour(data: bytes, path: str) -> None:
    """Refuses a 16-bit PNG of several channels: Pillow reads it as 8-bit RGB(A) keeping
    only each value's high byte, so ATR ids 0-17 stored in it would all read 0 (a mask
    of background only). 16-bit single-channel masks are read whole (_narrow_mask)."""
    kind = sixteen_bit_colour_png(data)
    if kind:
        raise _Skip(MASK_NOT_8_BIT, path,
                    f"mask is a 16-bit {kind} PNG, whose values cannot be read as ATR ids "
                    "(only their high byte is decoded); save it as an 8-bit single-channel "
                    "('L') or palette ('P') PNG")


def _out_of_range(path: str, bad: list[int], note: str = "") -> _Skip:
    """The rejection of a mask holding values that are not raw ATR ids (first 8 named)."""
    shown = ", ".join(map(str, bad[:8])) + (", ..." if len(bad) > 8 else "")
    return _Skip(LABEL_OUT_OF_RANGE, path,
                 f"label values {shown} outside 0-{classes.NUM_RAW_CLASSES - 1} "
                 f"(raw ATR ids; {classes.IGNORE_LABEL} = ignore{note})")


def _merged_mask(img_size: tuple[int, int], mask: Image.Image, path: str,
                 image_path: str, size_hint: str = "") -> tuple[Image.Image, tuple[int, ...]]:
    """Validates a raw ATR mask against the image size it must have; returns (merged
    ids, an 'L' image [H, W], and the merged ids present, 255 excluded). `size_hint`
    is added to a size-mismatch reason."""
    if mask.format != "PNG":
        raise _Skip(MASK_NOT_PNG, path, f"mask is {mask.format} data; save masks as "
                    "lossless 8-bit PNG")
    if mask.mode in _WIDE_INTEGER_MODES:
        mask = _narrow_mask(mask, path)
    if len(mask.getbands()) == 1 and mask.mode not in ("L", "P"):
        raise _Skip(MASK_NOT_8_BIT, path,
                    f"mask has mode {mask.mode!r}; expected a single-channel ('L', or "
                    "16-bit) or palette ('P') PNG whose values are ATR ids")
    if mask.mode in COLOUR_MASK_MODES:  # a grey mask an editor saved in colour is read as grey
        values, why = grey_of_colour_mask(mask)
        if values is None:
            raise _Skip(MASK_NOT_SINGLE_CHANNEL, path,
                        f"mask {why}; expected an 8-bit single-channel ('L') or palette ('P') "
                        "PNG whose values are ATR ids")
        mask = Image.fromarray(values, "L")
    if mask.mode not in ("L", "P"):
        raise _Skip(MASK_NOT_SINGLE_CHANNEL, path,
                    f"mask has mode {mask.mode!r} ({len(mask.getbands())} channel(s)); "
                    "expected an 8-bit single-channel ('L') or palette ('P') PNG "
                    "whose values are ATR ids")
    if mask.size != img_size:
        raise _Skip(MASK_SIZE_MISMATCH, path,
                    f"mask is {mask.size[1]}x{mask.size[0]} (rows x cols) but "
                    f"{image_path} is {img_size[1]}x{img_size[0]}{size_hint}")
    # Palette masks are read as their index values, not their colours.
    raw = mask if mask.mode == "L" else Image.frombytes("L", mask.size, mask.tobytes())
    counts = raw.histogram()  # 256 pixel counts, by value
    present = [v for v, n in enumerate(counts) if n]
    bad = [v for v in present if v >= classes.NUM_RAW_CLASSES and v != classes.IGNORE_LABEL]
    if bad:
        raise _out_of_range(path, bad)
    table = classes.RAW_TO_MERGED_TABLE
    # PIL's point() is the same 256-entry lookup as table[raw], in C and without
    # a NumPy round trip (about 2x faster on 400x600); 255 stays 255.
    merged = raw.point(table.tolist())
    merged_present = sorted({int(table[v]) for v in present} - {classes.IGNORE_LABEL})
    return merged, tuple(merged_present)


def _encode_mask(merged: Image.Image) -> bytes:
    """PNG of the merged mask. zlib's run-length strategy suits label maps: about
    twice as fast as the default and smaller (Pillow reads "compress_type" as
    the zlib strategy). Deterministic for a given zlib."""
    buf = io.BytesIO()
    merged.save(buf, format="PNG", compress_type=zlib.Z_RLE)
    return buf.getvalue()


def _read(root: str, rel: str, kind: str) -> bytes:
    """The bytes of an input file, or a skip naming it when the system cannot read it
    (no permission, removed since the scan, an I/O error)."""
    try:
        with open(os.path.join(root, rel), "rb") as f:
            return f.read()
    except OSError as err:
        raise _Skip(kind, rel, f"cannot read the file ({type(err).__name__}: "
                    f"{err.strerror or err})") from None


def _process(task: _Task) -> _Encoded | _Rejection:
    """One input id -> its encoded example or the reason to skip it."""
    sid = task.source_id
    try:
        if task.image is None:
            raise _Skip(MISSING_IMAGE, task.mask or f"{IMAGE_DIR}/{sid}.jpg",
                        f"no image {IMAGE_DIR}/{sid}.jpg (or .png, .webp, .tif...)" +
                        (" for this mask" if task.mask else
                         f" and no mask {MASK_DIR}/{sid}{MASK_SUFFIX}"))
        if task.mask is None:
            raise _Skip(MISSING_MASK, task.image,
                        f"no mask {MASK_DIR}/{sid}{MASK_SUFFIX} for this image")
        image_data = _read(task.root, task.image, UNREADABLE_IMAGE)
        image, orientation = _open_fully(image_data, task.image, is_mask=False)
        mask_data = _read(task.root, task.mask, UNREADABLE_MASK)
        mask, _ = _open_fully(mask_data, task.mask, is_mask=True)  # a mask's own tag: ignored
        _check_not_wide_colour(mask_data, task.mask)
        turn = _exif_turn(task.exif, orientation, image.size, mask.size)
        size = upright_size(image.size, orientation) if turn else image.size
        merged, present = _merged_mask(size, mask, task.mask, task.image,
                                       _exif_hint(task.exif, orientation, image.size, mask.size))
        jpeg = _image_jpeg(image_data, image, task.image, orientation if turn else 1)
    except _Skip as skip:
        return _Rejection(sid, skip.path, skip.kind, f"{skip.path}: {skip.detail}")
    width, height = size
    exif = "" if orientation == 1 else ("turned_upright" if turn else "kept_as_stored")
    return _Encoded(sid, jpeg, _encode_mask(merged), height, width, present, exif)


def _exif_turn(mode: str, orientation: int, image_size, mask_size) -> bool:
    """Whether to turn the image upright by its EXIF orientation (module docstring):
    always with --exif=upright, never with --exif=stored; with auto, only when the mask
    has the upright photo's size and not the stored one (a 90-degree turn: the mask was
    drawn on the photo as seen). A mask of the stored size keeps ATR's convention."""
    if orientation == 1 or mode == "stored":
        return False
    if mode == "upright":
        return True
    return (tuple(mask_size) != tuple(image_size)
            and tuple(mask_size) == upright_size(image_size, orientation))


def _exif_hint(mode: str, orientation: int, image_size, mask_size) -> str:
    """What to try when the mask's size matches the photo in the grid --exif did not pick."""
    if orientation == 1:
        return ""
    upright = upright_size(image_size, orientation)
    if mode == "stored" and tuple(mask_size) == upright:
        return (f" as stored; the photo has EXIF orientation {orientation} and the mask "
                "matches it upright: build with --exif=auto or --exif=upright")
    if mode == "upright" and tuple(mask_size) == tuple(image_size):
        return (f" when turned upright by its EXIF orientation {orientation}; the mask "
                "matches the stored pixels: build with --exif=auto or --exif=stored")
    if upright != tuple(image_size):  # a 90-degree turn: say what the upright size is
        return f" (EXIF orientation {orientation}: upright {upright[1]}x{upright[0]})"
    return ""


def _ignore_sigint() -> None:
    # Ctrl-C is handled by the parent, which shuts the pool down; workers
    # printing their own KeyboardInterrupt tracebacks would only add noise.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# --------------------------------------------------------------------------
# Inputs: which ids, which files.


def _scan(root: str) -> tuple[dict[str, str], dict[str, str], list[_Rejection]]:
    """Image and mask files of an ATR folder: ({id: rel path}, {id: rel path}, stray)."""
    images, masks, stray = {}, {}, []
    seen: dict[tuple[str, str], str] = {}
    for sub, suffixes, found in ((IMAGE_DIR, IMAGE_SUFFIXES, images),
                                 (MASK_DIR, (MASK_SUFFIX,), masks)):
        folder = os.path.join(root, sub)
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            rel = f"{sub}/{name}"
            path = os.path.join(folder, name)
            if not name.startswith(".") and os.path.islink(path) and not os.path.exists(path):
                # Listed by ls, so "no image <id>.jpg" would puzzle; say what it is.
                stray.append(_Rejection(os.path.splitext(name)[0], rel, BROKEN_LINK,
                                        f"{rel}: a symbolic link to {os.readlink(path)}, "
                                        "which does not exist"))
                continue
            if name.startswith(".") or not os.path.isfile(path):
                continue  # hidden files (.DS_Store) and folders are not inputs
            stem, suffix = os.path.splitext(name)
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:
                # Bytes that are not UTF-8 (a name written in Latin-1 or cp1252 and
                # unpacked here): the id could not be stored; shown with \x escapes.
                shown = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
                rel = f"{sub}/{shown}"
                stray.append(_Rejection(os.path.splitext(shown)[0], rel, BAD_FILE_NAME,
                                        f"{rel}: the file name is not valid UTF-8 (written "
                                        "in another encoding?); rename the file"))
                continue
            if suffix.lower() not in suffixes:
                wanted = ("a photo <id>.jpg (or .png, .webp, .tif, .bmp...: "
                          "popnet_tf.data.images.IMAGE_EXTENSIONS)"
                          if sub == IMAGE_DIR else f"a mask <id>{suffixes[0]}")
                stray.append(_Rejection(stem, rel, UNEXPECTED_FILE,
                                        f"{rel}: expected {wanted} in {sub}/"))
                continue
            # One id for the two Unicode spellings of a name: macOS writes "é" as e +
            # combining accent (NFD), most other systems as one character (NFC), so a
            # photo and its mask from different tools may differ only in that.
            stem = unicodedata.normalize("NFC", stem)
            if (sub, stem) in seen:
                stray.append(_Rejection(stem, rel, DUPLICATE_ID,
                                        f"{rel}: {seen[(sub, stem)]} has the same id; "
                                        "only that one is used"))
                continue
            seen[(sub, stem)] = rel
            found[stem] = rel
    return images, masks, stray


def _refuse_subfolders_only(root: str) -> None:
    """A JPEGImages/ with no photo but subfolders (train/, val/...): the photos are one
    level too deep, and the count error ("0 inputs found") would not say so."""
    folder = os.path.join(root, IMAGE_DIR)
    subs = sorted(n for n in os.listdir(folder)
                  if not n.startswith(".") and os.path.isdir(os.path.join(folder, n)))
    if subs:
        shown = ", ".join(f"{IMAGE_DIR}/{n}/" for n in subs[:5])
        shown += ", ..." if len(subs) > 5 else ""
        raise DatasetError(f"--atr_root {root}: {IMAGE_DIR}/ holds no photo, only the "
                           f"subfolder(s) {shown}; the builder reads {IMAGE_DIR}/<id>.jpg and "
                           f"{MASK_DIR}/<id>.png directly, not in subfolders: point --atr_root "
                           "at a folder laid out so, or move the files up")


def _read_list(path: str, what: str) -> list[str]:
    """Ids of a list file, one per line, blank lines skipped."""
    try:
        # utf-8-sig: Windows editors (Notepad) start a UTF-8 file with a byte-order
        # mark, which would otherwise become part of the first id.
        with open(path, encoding="utf-8-sig") as f:
            lines = f.read().splitlines()
    except OSError as err:
        raise DatasetError(f"{what} {path}: cannot read ({err})") from None
    return _check_ids([unicodedata.normalize("NFC", line.strip()) for line in lines
                       if line.strip()], f"{what} {path}")


def _check_ids(ids: Sequence[str], where: str) -> list[str]:
    ids = list(ids)
    for i, sid in enumerate(ids):
        if "/" in sid or "\\" in sid or sid.startswith("."):
            raise DatasetError(f"{where}: entry {i + 1} {sid!r} is not an ATR id "
                               "(a file stem such as 'fash_97', without folder or suffix)")
        stem, suffix = os.path.splitext(sid)
        if suffix.lower() in IMAGE_SUFFIXES:  # a file name: every entry would be "missing"
            raise DatasetError(f"{where}: entry {i + 1} {sid!r} is a file name, not an ATR id; "
                               f"list the ids without their suffix ({stem!r})")
    dupes = [sid for sid, n in collections.Counter(ids).items() if n > 1]
    if dupes:
        raise DatasetError(f"{where}: ids listed more than once: {dupes[:5]}; "
                           "remove the duplicates")
    if not ids:
        raise DatasetError(f"{where}: the list is empty")
    return ids


def official_lists() -> tuple[list[str], list[str]]:
    """The authors' released ATR-OS train and test id lists (SPEC §5;
    15000 and 2706 ids, see popnet_tf/atr_os_official/README.md).

    Example:
        >>> train_ids, test_ids = official_lists()
        >>> len(train_ids), len(test_ids)
        (15000, 2706)
    """
    package = importlib.resources.files("popnet_tf")
    out = []
    for rel in _OFFICIAL_FILES:
        text = package.joinpath(rel).read_text(encoding="utf-8")
        out.append(_check_ids([s.strip() for s in text.splitlines() if s.strip()],
                              f"popnet_tf/{rel}"))
    return out[0], out[1]


# --------------------------------------------------------------------------
# Output folder: atomic replace and clean-up of killed builds.


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _clean_stale(out_dir: str) -> None:
    """Removes `OUT.tmp-<pid>` folders of builds that died, and puts back an
    `OUT.old-<pid>` whose build died between moving it aside and moving the new
    dataset in."""
    parent, base = os.path.split(out_dir)
    pattern = re.compile(re.escape(base) + r"\.(tmp|old)-(\d+)$")
    for name in sorted(os.listdir(parent)):
        match = pattern.match(name)
        if not match:
            continue
        pid = int(match.group(2))
        if pid == os.getpid() or _pid_alive(pid):
            continue
        path = os.path.join(parent, name)
        if match.group(1) == "old" and not os.path.exists(out_dir):
            logging.warning("Restoring %s from %s, left by a build that was killed "
                            "while replacing it.", out_dir, path)
            os.replace(path, out_dir)
        else:
            logging.info("Removing %s, left by a killed build (pid %d).", path, pid)
            shutil.rmtree(path, ignore_errors=True)


def _check_out_dir(out_dir: str) -> None:
    if not os.path.exists(out_dir):
        return
    if not os.path.isdir(out_dir):
        raise DatasetError(f"--out {out_dir} exists and is not a folder; choose another path")
    entries = os.listdir(out_dir)
    if entries and MANIFEST_NAME not in entries:
        raise DatasetError(
            f"--out {out_dir} exists, is not empty and holds no {MANIFEST_NAME}, so it "
            "is not an ATR-OS dataset; it will not be replaced. Choose another --out "
            "or remove the folder.")


def _swap_in(tmp_dir: str, out_dir: str) -> None:
    """Moves the finished dataset into place, replacing a previous one only now."""
    if os.path.exists(out_dir):
        old = f"{out_dir}.old-{os.getpid()}"
        os.replace(out_dir, old)
        try:
            os.replace(tmp_dir, out_dir)
        except BaseException:
            os.replace(old, out_dir)  # put the previous dataset back
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp_dir, out_dir)
    _fsync_dir(os.path.dirname(out_dir))


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a directory; the rename still happened
    finally:
        os.close(fd)


# --------------------------------------------------------------------------
# Splits and test supports.


def select_test_supports(class_sets: dict[str, Sequence[int]],
                         num: int = NUM_TEST_SUPPORTS) -> tuple[list[str], list[int]]:
    """Picks `num` support ids covering the 11 foreground classes (SPEC §5).

    Greedy set cover: repeatedly the image adding most uncovered foreground
    classes, ties broken by more foreground classes, then the smaller id; then
    filled to `num` with the images holding most foreground classes (then id).
    Greedy covers every class that any `num` images can: after a first pick of
    at least two classes each pick adds at least one.

    Args:
        class_sets: {id: merged class ids present} of the candidate images (S_test).
        num: how many supports.
    Returns:
        (ids in pick order, foreground ids that the picks do not cover).

    Example:
        >>> select_test_supports({"a": [0, 1, 2], "b": [0, 2, 3]}, num=2)
        (['a', 'b'], [4, 5, 6, 7, 8, 9, 10, 11])
    """
    fg = {sid: frozenset(c) & _FOREGROUND for sid, c in class_sets.items()}
    order = sorted(fg)  # id order, so max() below keeps the smallest id on ties
    chosen: list[str] = []
    covered: set[int] = set()
    while len(chosen) < num and covered != _FOREGROUND:
        best, best_key = None, (0, 0)
        for sid in order:
            if sid in chosen:
                continue
            key = (len(fg[sid] - covered), len(fg[sid]))
            if key[0] > 0 and key > best_key:
                best, best_key = sid, key
        if best is None:
            break  # nothing left adds a class
        chosen.append(best)
        covered |= fg[best]
    rest = sorted((sid for sid in order if sid not in chosen), key=lambda s: (-len(fg[s]), s))
    chosen += rest[:num - len(chosen)]
    return chosen, sorted(_FOREGROUND - covered)


# --------------------------------------------------------------------------
# Writing.


def _num_shards(count: int, nbytes: int, requested: int | None) -> int:
    if requested is not None:
        return max(1, min(requested, count))
    return max(1, min(count, max(math.ceil(count / MAX_SHARD_EXAMPLES),
                                 math.ceil(nbytes / MAX_SHARD_BYTES))))


def _write_shard(path: str, records) -> str:
    """Writes serialized examples to one TFRecord file; returns its sha256."""
    import tensorflow as tf

    with tf.io.TFRecordWriter(path) as writer:
        for record in records:
            writer.write(record)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
        os.fsync(f.fileno())
    return digest.hexdigest()


def _progbar(target: int, enabled: bool, unit: str):
    if not enabled or target == 0:
        return None
    import keras

    return keras.utils.Progbar(target, unit_name=unit)


# --------------------------------------------------------------------------
# The build.


def build(atr_root: str, out_dir: str, **kwargs) -> dict:
    """Builds the ATR-OS dataset from an ATR-layout folder; returns the manifest.
    One build of an --out at a time: a second one (the same command started twice, or
    two trainings building the synthetic default) waits for the first, then builds.
    Without the lock both swapped their folders in at once: one could fail with a
    traceback (its rename onto the other's new folder) and leave `OUT.old-<pid>`, and
    the other's training read the folder between its two renames. Arguments: `_build`'s.
    """
    from popnet_tf import integrity  # here: it imports this module, and TensorFlow

    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(integrity.dataset_lock(out_dir))
        except OSError as e:  # the lock file goes beside OUT: its folder must be writable
            raise DatasetError(f"--out {out_dir}: cannot write in its folder "
                               f"({e.strerror or e}: {e.filename}); choose a writable "
                               "place") from None
        return _build(atr_root, out_dir, **kwargs)


def _build(atr_root: str, out_dir: str, *, train_list: str | None = None,
          test_list: str | None = None, split_lists: str | None = None,
          num_test: int | None = None, num_query_train: int = 8000,
          num_test_query: int = 500, num_test_support: int = 500,
          num_shards: int | None = None, seed: int = 0, exif: str = "auto",
          num_workers: int | None = None, progress: bool = True) -> dict:
    """Builds the ATR-OS dataset from an ATR-layout folder; returns the manifest.

    Args:
        atr_root: folder with JPEGImages/<id>.jpg and SegmentationClassAug/<id>.png.
        out_dir: dataset folder to create (or replace, if it holds a dataset).
        train_list, test_list: files of ids, one per line, used in list order.
            Give both or neither.
        split_lists: "official" for the authors' lists packaged in
            popnet_tf/atr_os_official/ (instead of train_list/test_list).
        num_test: without lists, how many images are held out for test
            (default num_test_query + num_test_support).
        num_query_train: size of q_train; s_train is the rest of the train ids.
        num_test_query, num_test_support: sizes of q_test and s_test.
        num_shards: shards per split (capped at the split's size); default: up
            to 1000 examples and about 100 MB a shard.
        seed: permutation seed of the held-out split (unused with lists).
        exif: for images with an EXIF orientation tag, the pixel grid their masks
            follow: "auto" (the upright photo's when only its size matches the mask,
            else the stored pixels'), "stored" (ATR's convention) or "upright".
        num_workers: decoding processes; 0 decodes in this process; default
            all available cores.
        progress: show a progress bar.
    Returns:
        The manifest dict, also written to out_dir/manifest.json.
    Raises:
        DatasetError: unusable input (too few usable images for the numbers
            asked, bad list, non-dataset folder at out_dir...).

    Example:
        >>> m = build("/tmp/synth_atr", "/tmp/atr_os", num_query_train=50,
        ...           num_test_query=20, num_test_support=20, num_workers=0)
        >>> len(m["test_supports"]), m["splits"]["s_train"]["count"] > 0
        (10, True)
    """
    start = time.time()
    _check_numbers(num_query_train, num_test_query, num_test_support, num_test, num_shards)
    if exif not in EXIF_MODES:
        raise DatasetError(f"exif must be one of {', '.join(EXIF_MODES)}, got {exif!r}")
    atr_root = os.path.abspath(atr_root)
    out_dir = os.path.abspath(out_dir)
    if not os.path.isdir(os.path.join(atr_root, IMAGE_DIR)):
        raise DatasetError(f"--atr_root {atr_root}: no {IMAGE_DIR}/ folder; expected "
                           f"ROOT/{IMAGE_DIR}/<id>.jpg and ROOT/{MASK_DIR}/<id>.png")
    if not os.path.isdir(os.path.join(atr_root, MASK_DIR)):
        raise DatasetError(f"--atr_root {atr_root}: no {MASK_DIR}/ folder; expected "
                           f"ROOT/{IMAGE_DIR}/<id>.jpg and ROOT/{MASK_DIR}/<id>.png")
    if split_lists in ("", "none"):
        split_lists = None
    lists = _resolve_lists(train_list, test_list, split_lists)
    if lists is not None and num_test is not None:
        # With lists the test images are the test list's: a held-out count would be ignored.
        raise DatasetError(f"num_test={num_test} applies only without split lists; with "
                           "lists the test ids are the test list's (size q_test and s_test "
                           "with num_test_query and num_test_support)")
    num_test_eff = None
    if lists is None:
        num_test_eff = num_test if num_test is not None else num_test_query + num_test_support
        if num_test_eff < num_test_query + num_test_support:
            raise DatasetError(f"num_test={num_test_eff} is smaller than num_test_query + "
                               f"num_test_support = {num_test_query + num_test_support}")
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    _clean_stale(out_dir)
    _check_out_dir(out_dir)

    images, masks, stray = _scan(atr_root)
    if not images:
        _refuse_subfolders_only(atr_root)
    if lists is None:
        ids = sorted(set(images) | set(masks))
        needed = num_test_eff + num_query_train + 1
        if len(ids) < needed:
            raise DatasetError(_too_few_msg(atr_root, len(ids), needed, num_test_eff,
                                            num_query_train))
        tasks = [_Task(i, atr_root, images.get(i), masks.get(i), exif) for i in ids]
        prior = stray
    else:
        train_ids, test_ids = lists[0], lists[1]
        overlap = sorted(set(train_ids) & set(test_ids))
        if overlap:
            raise DatasetError(f"ids in both the train and the test list: {overlap[:5]} "
                               f"({len(overlap)} in all); a test image must not be trained on")
        _precheck_list("train", len(train_ids), num_query_train + 1, lists[2])
        _precheck_list("test", len(test_ids), num_test_query + num_test_support, lists[3])
        tasks = [_Task(i, atr_root, images.get(i), masks.get(i), exif)
                 for i in train_ids + test_ids]
        prior = []  # stray files beside unlisted ids are not inputs of this build

    tmp_dir = f"{out_dir}.tmp-{os.getpid()}"
    shutil.rmtree(tmp_dir, ignore_errors=True)
    os.makedirs(tmp_dir)
    try:
        staged, rejected, exif_notes = _process_all(
            tasks, os.path.join(tmp_dir, _STAGING_NAME), num_workers, progress)
        rejected = prior + rejected
        num_inputs = len(tasks) + len(prior)
        try:
            splits = _make_splits(staged, lists, tasks, num_test_eff, num_query_train,
                                  num_test_query, num_test_support, seed, atr_root,
                                  official=split_lists == OFFICIAL)
        except DatasetError:
            _log_skipped(rejected, num_inputs)  # the error refers to these
            raise
        if not any(set(staged[sid][2]) & _FOREGROUND for sid in splits["q_test"]):
            raise DatasetError(
                f"q_test: none of its {len(splits['q_test'])} images holds a foreground class "
                "(every mask is background or ignore), so the test has no person to parse and "
                "every class would score 0. Put images with people (labelled masks) into the "
                "test images" + (" (--test_list)" if lists else " or change --seed") + ".")
        with_person = [sid for sid in splits["s_test"] if set(staged[sid][2]) & _FOREGROUND]
        if len(with_person) < NUM_TEST_SUPPORTS:
            # A support without a foreground class makes pairs whose truth and prediction
            # are background alone: they would inflate background IoU and overall accuracy.
            raise DatasetError(
                f"s_test: only {len(with_person)} of its {len(splits['s_test'])} images hold a "
                f"foreground class (the others' masks are background or ignore), but the "
                f"{NUM_TEST_SUPPORTS} fixed test supports must each hold one. Put more images "
                "with people (labelled masks) into the test images"
                + (" (--test_list)" if lists else "") + " or raise --num_test_support.")
        supports, missing = select_test_supports(
            {sid: staged[sid][2] for sid in splits["s_test"]})
        if missing:
            logging.warning(
                "The %d test supports do not cover the classes %s: s_test (%d images) "
                "holds too few images of them. Recorded in the manifest under "
                "'test_supports_missing_classes'.", NUM_TEST_SUPPORTS,
                [classes.MERGED_NAMES[c] for c in missing], len(splits["s_test"]))
        split_manifest = _write_splits(tmp_dir, splits, staged, num_shards, progress)
        os.remove(os.path.join(tmp_dir, _STAGING_NAME))
        manifest = {
            "format_version": FORMAT_VERSION,
            "class_names": list(classes.MERGED_NAMES),
            "splits": split_manifest,
            "test_supports": supports,
            "test_supports_missing_classes": [classes.MERGED_NAMES[c] for c in missing],
            "folds": {name: {str(fold): list(names) for fold, names in folds.items()}
                      for name, folds in classes.FOLDS.items()},
            "rejected": [r.as_manifest() for r in rejected],
            "exif": {"mode": exif, **exif_notes},
            "source": {
                "atr_root": atr_root,
                "train_list": lists[2] if lists else None,
                "test_list": lists[3] if lists else None,
                "split_lists": split_lists,
                "num_test": num_test_eff,
                "seed": seed,
                "exif": exif,
                "num_query_train": num_query_train,
                "num_test_query": num_test_query,
                "num_test_support": num_test_support,
                "num_shards": num_shards,
            },
        }
        manifest_path = os.path.join(tmp_dir, MANIFEST_NAME)
        with open(manifest_path, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp_dir)
        _swap_in(tmp_dir, out_dir)
    except BaseException:
        # Exceptions and Ctrl-C: leave OUT as it was. (A SIGKILL cannot be
        # caught; the next build removes the temp folder.)
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    _log_skipped(rejected, num_inputs)
    _log_exif(exif_notes, exif)
    _log_unlabelled(splits, staged)
    counts = ", ".join(f"{s} {len(splits[s])}" for s in splits)
    logging.info("Wrote ATR-OS to %s in %.1f s: %s; test supports %s.", out_dir,
                 time.time() - start, counts, supports)
    return manifest


def _check_numbers(num_query_train, num_test_query, num_test_support, num_test, num_shards):
    for name, value in (("num_query_train", num_query_train),
                        ("num_test_query", num_test_query)):
        if value < 1:
            raise DatasetError(f"{name} must be at least 1, got {value}")
    if num_test_support < NUM_TEST_SUPPORTS:
        raise DatasetError(f"num_test_support must be at least {NUM_TEST_SUPPORTS} (the "
                           f"fixed test supports are drawn from s_test), got {num_test_support}")
    if num_test is not None and num_test < 1:
        raise DatasetError(f"num_test must be positive, got {num_test}")
    if num_shards is not None and num_shards < 1:
        raise DatasetError(f"num_shards must be at least 1, got {num_shards}")


def _resolve_lists(train_list, test_list, split_lists):
    """None, or (train ids, test ids, train list source, test list source)."""
    if split_lists not in (None, "", "none", OFFICIAL):
        raise DatasetError(f"split_lists must be {OFFICIAL!r} or None, got {split_lists!r}")
    if split_lists == OFFICIAL:
        if train_list or test_list:
            raise DatasetError("give either split_lists='official' or train_list/test_list, "
                               "not both")
        train_ids, test_ids = official_lists()
        return train_ids, test_ids, f"popnet_tf/{_OFFICIAL_FILES[0]}", \
            f"popnet_tf/{_OFFICIAL_FILES[1]}"
    if bool(train_list) != bool(test_list):
        raise DatasetError("give both train_list and test_list, or neither (then a "
                           "seeded held-out split is made)")
    if not train_list:
        return None
    train_path, test_path = os.path.abspath(train_list), os.path.abspath(test_list)
    return (_read_list(train_path, "train list"), _read_list(test_path, "test list"),
            train_path, test_path)


def _precheck_list(which: str, listed: int, needed: int, source: str) -> None:
    if listed < needed:
        asked = ("num_query_train + 1 (at least one support)" if which == "train"
                 else "num_test_query + num_test_support")
        raise DatasetError(f"{which} list {source} has {listed} ids but {asked} = {needed} "
                           f"are needed; lower the numbers or use a longer list")


def _too_few_msg(root, found, needed, num_test, num_query_train, usable=None) -> str:
    have = (f"{found} inputs found" if usable is None else
            f"{usable} usable images ({found} inputs found, {found - usable} rejected, "
            "see the log)")
    return (f"{root}: {have} but the split asks for {needed}: num_test={num_test} test "
            f"images + num_query_train={num_query_train} training queries + at least 1 "
            "training support. Lower the numbers or add images.")


def _process_all(tasks, staging_path, num_workers, progress):
    """Decodes every task (in worker processes), stores each usable example
    serialized in a staging file. Returns ({id: (offset, length, classes)},
    rejections, {exif note: ids}), all in task order whatever the worker count."""
    from popnet_tf.data import features

    if num_workers is None:
        num_workers = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
            else (os.cpu_count() or 1)
    num_workers = max(0, min(num_workers, len(tasks)))
    staged: dict[str, tuple[int, int, tuple[int, ...]]] = {}
    rejected: list[_Rejection] = []
    exif: dict[str, list[str]] = {"turned_upright": [], "kept_as_stored": []}
    bar = _progbar(len(tasks), progress, "image")
    pool = None
    if num_workers > 0:
        # "spawn": the parent has TensorFlow loaded (threads), and forking a
        # multi-threaded process can deadlock. Workers need only PIL and NumPy.
        # concurrent.futures rather than multiprocessing.Pool: when a worker dies
        # (the kernel's OOM killer on a huge photo, a segfault in a decoder), Pool
        # replaces it and waits forever for its lost tasks; the executor raises
        # BrokenProcessPool, which ends the build in one line.
        pool = concurrent.futures.ProcessPoolExecutor(
            num_workers, mp_context=multiprocessing.get_context("spawn"),
            initializer=_ignore_sigint)
    try:
        chunksize = max(1, min(32, len(tasks) // (8 * max(1, num_workers))))
        # map keeps task order, so the staging file and every shard come out
        # the same whatever the number of workers.
        results = pool.map(_process, tasks, chunksize=chunksize) if pool else map(_process, tasks)
        with open(staging_path, "wb") as staging:
            for i, result in enumerate(results):
                if isinstance(result, _Rejection):
                    rejected.append(result)
                else:
                    # deterministic: otherwise the feature map's order follows the
                    # process's hash seed, and shards differ from run to run.
                    record = features.make_example(
                        result.image_jpeg, result.mask_png, source_id=result.source_id,
                        height=result.height, width=result.width,
                        classes=result.classes).SerializeToString(deterministic=True)
                    staged[result.source_id] = (staging.tell(), len(record), result.classes)
                    staging.write(record)
                    if result.exif:
                        exif[result.exif].append(result.source_id)
                if bar is not None:
                    bar.update(i + 1)
    except concurrent.futures.BrokenExecutor:  # BrokenProcessPool
        done = len(staged) + len(rejected)
        raise DatasetError(
            f"a worker process reading the images died after {done} of {len(tasks)} were "
            f"read (killed by the system, e.g. out of memory on a very large photo, or a "
            f"crash in an image decoder), near {tasks[min(done, len(tasks) - 1)].source_id!r}. Rerun with "
            "--num_workers=0 to read them in this process and see which file it is.") from None
    finally:
        if pool:
            # Waits for the chunks already running (a second or so) after an error or
            # Ctrl-C; the queued ones are dropped.
            pool.shutdown(wait=True, cancel_futures=True)
    return staged, rejected, exif


def _log_exif(exif: dict[str, list[str]], mode: str) -> None:
    """Says which images were turned by their EXIF orientation and which were not."""
    turned, kept = exif["turned_upright"], exif["kept_as_stored"]
    if turned:
        logging.info("%d image(s) turned upright by their EXIF orientation (--exif=%s), as "
                     "their masks are: %s%s", len(turned), mode, turned[:5],
                     " ..." if len(turned) > 5 else "")
    if kept:
        logging.warning(
            "%d image(s) carry an EXIF orientation tag but were used in their stored pixel "
            "grid, to which their masks are taken to be aligned (as ATR's are; --exif=%s): "
            "%s%s. If the masks were drawn on the photos as seen (upright), rebuild with "
            "--exif=upright. Listed in the manifest under 'exif'.", len(kept), mode,
            kept[:5], " ..." if len(kept) > 5 else "")


def _log_unlabelled(splits: dict[str, list[str]], staged: dict) -> None:
    """Warns of kept images whose masks hold no labelled pixel (all 255, ignore).

    They are valid ATR files, so they are kept, but they add nothing to training or
    testing, and a whole mask of 255 usually means a conversion went wrong (a palette
    or colour mask mapped to ignore)."""
    unlabelled = sorted(sid for ids in splits.values() for sid in ids if not staged[sid][2])
    if unlabelled:
        logging.warning(
            "%d image(s) have masks with no labelled pixel (every pixel 255, ignore): kept, "
            "but they add nothing to training or testing. Check how their masks were made: "
            "%s%s", len(unlabelled), unlabelled[:5], " ..." if len(unlabelled) > 5 else "")


def _log_skipped(rejected: list[_Rejection], num_inputs: int) -> None:
    if not rejected:
        logging.info("All %d inputs usable.", num_inputs)
        return
    kinds = collections.Counter(r.kind for r in rejected)
    summary = ", ".join(f"{n} {kind}" for kind, n in
                        sorted(kinds.items(), key=lambda kv: (-kv[1], kv[0])))
    logging.warning("skipped %d of %d inputs: %s (each listed with its reason in "
                    "the manifest's 'rejected').", len(rejected), num_inputs, summary)
    # Files that are there but unusable first: with lists (the official ones name 17706
    # ids) most rejections are ids with neither file here, which would hide them.
    shown = sorted(rejected, key=_absent_id)[:20]
    for r in shown:
        logging.info("  skipped %s: %s: %s", r.source_id, r.kind, r.detail)


def _absent_id(r: _Rejection) -> bool:
    """Whether a rejection is an id with neither image nor mask (a listed id not in the
    folder): its path is then the image it lacks (`_process`)."""
    return r.kind == MISSING_IMAGE and r.path.startswith(f"{IMAGE_DIR}/")


def _make_splits(staged, lists, tasks, num_test, num_query_train, num_test_query,
                 num_test_support, seed, atr_root, official=False) -> dict[str, list[str]]:
    """{split: ids in file order} by the rules of SPEC §5 (module docstring)."""
    if lists is None:
        usable = sorted(staged)
        needed = num_test + num_query_train + 1
        if len(usable) < needed:
            raise DatasetError(_too_few_msg(atr_root, len(tasks), needed, num_test,
                                            num_query_train, usable=len(usable)))
        order = np.random.default_rng(seed).permutation(len(usable))
        shuffled = [usable[i] for i in order]
        test_ids, train_ids = shuffled[:num_test], shuffled[num_test:]
    elif official:
        return _official_splits(staged, lists, num_query_train, num_test_query,
                                num_test_support)
    else:
        train_ids = [i for i in lists[0] if i in staged]
        test_ids = [i for i in lists[1] if i in staged]
        for which, ids, listed, needed, source in (
                ("train", train_ids, lists[0], num_query_train + 1, lists[2]),
                ("test", test_ids, lists[1], num_test_query + num_test_support, lists[3])):
            if len(ids) < needed:
                raise DatasetError(
                    f"{which} list {source}: {len(ids)} usable images ({len(listed)} "
                    f"listed, {len(listed) - len(ids)} rejected, see the log) but "
                    f"{needed} are needed ("
                    + ("num_query_train + at least 1 support" if which == "train"
                       else "num_test_query + num_test_support")
                    + "). Lower the numbers or provide the missing images.")
    q_train, s_train = train_ids[:num_query_train], train_ids[num_query_train:]
    q_test = test_ids[:num_test_query]
    s_test = test_ids[num_test_query:num_test_query + num_test_support]
    unused = len(test_ids) - len(q_test) - len(s_test)
    if unused:
        logging.info("%d usable test images beyond num_test_query + num_test_support "
                     "are not used.", unused)
    return {"q_train": q_train, "s_train": s_train, "q_test": q_test, "s_test": s_test}


def _official_splits(staged, lists, num_query_train, num_test_query,
                     num_test_support) -> dict[str, list[str]]:
    """Splits of the authors' lists: the release's query ids (the first
    OFFICIAL_QUERIES[list] of each list) form q_train / q_test and its support ids
    s_train / s_test, usable ids in list order, q_train, q_test and s_test capped by
    their numbers. The first-N rule of other lists would move supports of the release
    into q_train / q_test whenever N is not the release's count (the defaults 8000 and
    500 are not) or ids are missing."""
    train, test = lists[0], lists[1]
    end = OFFICIAL_QUERIES
    usable = lambda ids: [i for i in ids if i in staged]  # noqa: E731
    splits = {"q_train": usable(train[:end["train"]])[:num_query_train],
              "s_train": usable(train[end["train"]:]),
              "q_test": usable(test[:end["test"]])[:num_test_query],
              "s_test": usable(test[end["test"]:])[:num_test_support]}
    parts = {"q_train": (lists[2], f"0-{end['train'] - 1}", 1),
             "s_train": (lists[2], f"{end['train']}-{len(train) - 1}", 1),
             "q_test": (lists[3], f"0-{end['test'] - 1}", 1),
             "s_test": (lists[3], f"{end['test']}-{len(test) - 1}", NUM_TEST_SUPPORTS)}
    for split, (source, lines, needed) in parts.items():
        if len(splits[split]) < needed:
            raise DatasetError(
                f"{split}: {len(splits[split])} usable images among the release's "
                f"{'queries' if split.startswith('q') else 'supports'} (entries {lines} of "
                f"{source}) but at least {needed} are needed; the other listed ids are "
                "missing from --atr_root or rejected (see the log). Provide the missing images.")
    for split, asked in (("q_train", num_query_train), ("q_test", num_test_query),
                         ("s_test", num_test_support)):
        if len(splits[split]) < asked:
            logging.info("Official lists: %s holds %d images, all the usable ones of the "
                         "release's part, fewer than the %d asked.", split, len(splits[split]),
                         asked)
    return splits


def _write_splits(tmp_dir, splits, staged, num_shards, progress) -> dict:
    """Writes each split's shards from the staging file; returns the manifest's
    "splits" entry (count, images per class, sha256 per shard)."""
    from popnet_tf.data import features

    total = sum(len(ids) for ids in splits.values())
    bar = _progbar(total, progress, "example")
    done = 0
    out = {}
    with open(os.path.join(tmp_dir, _STAGING_NAME), "rb") as staging:

        def records(ids):
            nonlocal done
            for sid in ids:
                offset, length, _ = staged[sid]
                staging.seek(offset)
                yield staging.read(length)
                done += 1
                if bar is not None:
                    bar.update(done)

        for split, ids in splits.items():
            nbytes = sum(staged[sid][1] for sid in ids)
            n = _num_shards(len(ids), nbytes, num_shards)
            per_class = collections.Counter(c for sid in ids for c in staged[sid][2])
            shards = {}
            for k in range(n):
                name = features.shard_name(split, k, n)
                # Contiguous slices: reading shards in name order gives list order.
                part = ids[k * len(ids) // n:(k + 1) * len(ids) // n]
                shards[name] = _write_shard(os.path.join(tmp_dir, name), records(part))
            out[split] = {
                "count": len(ids),
                "per_class": {name: per_class.get(c, 0)
                              for c, name in enumerate(classes.MERGED_NAMES)},
                "shards": shards,
            }
    return out


# --------------------------------------------------------------------------
# CLI.


def _define_flags():
    # Defined only when run as a script: worker processes import this module
    # (spawn) and must not register the flags a second time.
    from absl import flags

    flags.DEFINE_string("atr_root", None, "ATR-layout folder: JPEGImages/<id>.jpg (or "
                        ".png, .webp, .tif... any photo type Pillow reads) and "
                        "SegmentationClassAug/<id>.png (raw ATR ids 0-17, 255 ignore).")
    flags.DEFINE_string("out", None, "Dataset folder to write (atomically). An existing "
                        "ATR-OS dataset there is replaced once the new one is complete.")
    flags.DEFINE_string("train_list", None, "File of training ids, one per line: the "
                        "first --num_query_train usable ones form q_train, the rest s_train.")
    flags.DEFINE_string("test_list", None, "File of test ids, one per line: the first "
                        "--num_test_query usable ones form q_test, the next "
                        "--num_test_support s_test.")
    flags.DEFINE_enum("split_lists", None, [OFFICIAL], "'official': use the authors' "
                      "released lists (popnet_tf/atr_os_official/) and their split into queries "
                      "and supports, instead of --train_list/--test_list.")
    flags.DEFINE_integer("num_test", None, "Without lists: images held out for test "
                         "(default --num_test_query + --num_test_support).")
    flags.DEFINE_integer("num_query_train", 8000, "Size of q_train (SPEC §5: 8000; with "
                         "--split_lists=official at most the release's 7501 queries).")
    flags.DEFINE_integer("num_test_query", 500, "Size of q_test (SPEC §5: 500; with "
                         "--split_lists=official at most the release's 201 queries).")
    flags.DEFINE_integer("num_test_support", 500, "Size of s_test (SPEC §5: 500); the "
                         f"{NUM_TEST_SUPPORTS} fixed test supports come from it.")
    flags.DEFINE_integer("num_shards", None, "Shards per split (default: up to 1000 "
                         "examples and ~100 MB a shard).")
    flags.DEFINE_integer("seed", 0, "Seed of the held-out split when no lists are given.")
    flags.DEFINE_enum("exif", "auto", list(EXIF_MODES), "Images with an EXIF orientation "
                      "tag (phone photos): 'stored' takes every mask as aligned to the stored "
                      "pixels (ATR's convention), 'upright' to the photo as seen (turned by "
                      "the tag), 'auto' turns an image only when its mask has the upright "
                      "photo's size and not the stored one (a 90-degree turn).")
    flags.DEFINE_integer("num_workers", None, "Decoding processes (default: all cores; "
                         "0: decode in the main process).")
    flags.DEFINE_boolean("progress", True, "Show a progress bar.")
    flags.mark_flags_as_required(["atr_root", "out"])
    return flags.FLAGS


def main(argv):
    from absl import flags

    if len(argv) > 1:
        raise SystemExit(f"unexpected arguments: {argv[1:]}")
    FLAGS = flags.FLAGS
    if FLAGS["seed"].present and (FLAGS.split_lists or FLAGS.train_list or FLAGS.test_list):
        logging.warning("--seed is not used with split lists: the lists fix every split.")
    try:
        build(FLAGS.atr_root, FLAGS.out, train_list=FLAGS.train_list,
              test_list=FLAGS.test_list, split_lists=FLAGS.split_lists,
              num_test=FLAGS.num_test, num_query_train=FLAGS.num_query_train,
              num_test_query=FLAGS.num_test_query, num_test_support=FLAGS.num_test_support,
              num_shards=FLAGS.num_shards, seed=FLAGS.seed, exif=FLAGS.exif,
              num_workers=FLAGS.num_workers,
              progress=FLAGS.progress)
    except DatasetError as err:
        logging.error("%s", err)
        raise SystemExit(1) from None


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main, flags_parser=cli.parse_flags)
