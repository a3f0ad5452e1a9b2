"""Prediction CLI and library: outputs on disk (label PNG, overlay, areas), local and
served predictions agreeing, one-line errors naming the file, failures in a folder."""

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image, ImageOps

from popnet_tf import export_lib, predict, serving
from popnet_tf.data import show
from tests.test_export import make_workdir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VALUES = (3, 7, 200)   # the support mask's classes (a user's own values)


def save_image(path, pixels, **kwargs):
    Image.fromarray(np.asarray(pixels, np.uint8)).save(path, **kwargs)
    return str(path)


def smooth(shape, seed):
    """A smooth random colour image (JPEG keeps it within a few levels, unlike noise)."""
    small = np.random.default_rng(seed).integers(0, 256, (4, 4, 3)).astype(np.uint8)
    return np.asarray(Image.fromarray(small).resize((shape[1], shape[0]), Image.BILINEAR))


def user_mask(shape, seed=0):
    """Rectangles of VALUES on background with an ignore border, as a palette PNG would hold."""
    mask = np.zeros(shape, np.uint8)
    rng = np.random.default_rng(seed)
    for v in VALUES:
        r, c = rng.integers(0, shape[0] // 2), rng.integers(0, shape[1] // 2)
        mask[r:r + shape[0] // 3, c:c + shape[1] // 3] = v
    mask[:, :2] = 255
    return mask


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A random-weight workdir, its SavedModel, a support (JPEG + palette PNG mask) and a
    query folder with two good images, a corrupt JPEG and a text file."""
    tmp = tmp_path_factory.mktemp("predict")
    workdir, base = str(tmp / "work"), str(tmp / "models")
    make_workdir(workdir)
    export_lib.export_saved_model(workdir, base)
    support = save_image(tmp / "support.jpg", smooth((70, 50), 1), quality=95)
    mask_image = Image.fromarray(user_mask((70, 50)), "P")
    mask_image.putpalette(np.random.default_rng(9).integers(0, 256, 768).tolist())  # colours unrelated to values
    mask_image.save(tmp / "support_mask.png")
    folder = tmp / "photos"
    folder.mkdir()
    queries = {"a": save_image(folder / "a.png", smooth((40, 90), 2)),
               "b": save_image(folder / "b.png", smooth((64, 64), 3))}
    (folder / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (folder / "notes.txt").write_text("not an image")
    queries["extra"] = save_image(tmp / "extra.jpg", smooth((100, 30), 4), quality=95)
    return {"tmp": tmp, "workdir": workdir, "base": base, "support": support,
            "mask": str(tmp / "support_mask.png"), "folder": str(folder), "queries": queries}


def run_cli(args, cwd):
    # TensorFlow's C++ warnings on, as a user sees them (conftest.py turns them off).
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "0"}
    return subprocess.run([sys.executable, "-m", "popnet_tf.predict", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def cli_run(setup):
    out = str(setup["tmp"] / "parsed")
    result = run_cli(["--model", setup["base"], "--support", setup["support"],
                      "--support_mask", setup["mask"], "--query", setup["folder"],
                      setup["queries"]["extra"], "--out", out,
                      "--class_names", '{"3": "jacket", "200": "sneaker"}'], cwd=REPO)
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    return result, out, summary


@pytest.mark.slow
def test_cli_writes_labels_overlays_and_summary(setup, cli_run):
    result, out, summary = cli_run
    assert result.returncode == 1, result.stderr  # one query failed
    assert sorted(os.listdir(out)) == sorted(["a.png", "a_overlay.jpg", "b.png", "b_overlay.jpg",
                                              "extra.png", "extra_overlay.jpg", "summary.json"])
    assert [q["file"] for q in summary["queries"]] == [
        os.path.join(setup["folder"], "a.png"), os.path.join(setup["folder"], "b.png"),
        setup["queries"]["extra"]]
    assert summary["support"]["classes"] == {"jacket": 3, "class 7": 7, "sneaker": 200}
    assert summary["foreground_gate"] is False  # as exported (the config's default)
    palette = predict.palette()
    for entry, name in zip(summary["queries"], ("a", "b", "extra")):
        query = np.asarray(Image.open(setup["queries"][name]).convert("RGB"), np.float32)
        label = Image.open(os.path.join(out, f"{name}.png"))
        assert label.mode == "P" and label.size == (query.shape[1], query.shape[0])
        np.testing.assert_array_equal(np.asarray(label.getpalette(), np.uint8).reshape(-1, 3)[:256],
                                      palette)
        labels = np.asarray(label)
        assert set(np.unique(labels)) <= {0, *VALUES}
        # Areas: pixel counts of the label PNG, counted here with NumPy.
        counts = {v: int((labels == v).sum()) for v in (0, *VALUES)}
        got = {a["value"]: a["pixels"] for a in entry["areas"].values()}
        assert got == counts
        assert set(entry["areas"]) == {"background", "jacket", "class 7", "sneaker"}
        assert sum(a["fraction"] for a in entry["areas"].values()) == pytest.approx(1.0)
        # Overlay: 50% blend of the palette colour on foreground pixels. The JPEG blurs the
        # random model's busy label edges, so: close to the blend, far from the bare photo.
        overlay = np.asarray(Image.open(os.path.join(out, f"{name}_overlay.jpg")), np.float32)
        fg = ((labels != 0) & (labels != 255))[..., None]
        expected = np.where(fg, 0.5 * query + 0.5 * palette[labels], query)
        error = np.abs(overlay - expected).mean()
        assert error < 8.0 and error < np.abs(overlay - query).mean() / 4
    totals = summary["totals"]
    assert totals["jacket"]["pixels"] == sum(q["areas"]["jacket"]["pixels"] for q in summary["queries"])


@pytest.mark.slow
def test_cli_lists_failures_and_skipped(setup, cli_run):
    result, _, summary = cli_run
    broken = os.path.join(setup["folder"], "broken.jpg")
    assert summary["failures"] == [{"file": broken, "error": f"{broken}: the query is not an image "
                                    "file that can be decoded (JPEG, PNG, GIF, BMP, WebP, or another "
                                    "format Pillow reads)"}]
    assert summary["skipped"] == [os.path.join(setup["folder"], "notes.txt")]
    assert summary["skipped_folders"] == []
    assert f"failed: {broken}: the query is not an image" in result.stdout
    # Files TensorFlow cannot decode never reach it: no raw TF log line before ours.
    assert "Unknown image file format" not in result.stderr, result.stderr[-2000:]
    assert "| jacket | 3 |" in result.stdout


@pytest.mark.slow
def test_local_workdir_and_served_model_agree(setup, cli_run):
    """The workdir predictor (the serving function traced here) gives the CLI's labels,
    which came from the SavedModel in another process."""
    _, out, _ = cli_run
    predictor = predict.load_predictor(setup["workdir"])
    support = predict.read_support(setup["support"], setup["mask"], predictor)
    names = ("a", "b")
    result = predictor([open(setup["queries"][n], "rb").read() for n in names],
                       support.image_bytes, support.mask_png)
    np.testing.assert_array_equal(result["class_values"], [0, *VALUES])
    for i, name in enumerate(names):
        h, w = result["image_sizes"][i]
        np.testing.assert_array_equal(result["labels"][i, :h, :w],
                                      np.asarray(Image.open(os.path.join(out, f"{name}.png"))))


@pytest.mark.slow
def test_cli_support_error_is_one_line_naming_the_file(setup):
    bad = save_image(setup["tmp"] / "small_mask.png", np.full((10, 10), 3))
    result = run_cli(["--model", setup["base"], "--support", setup["support"], "--support_mask", bad,
                      "--query", setup["queries"]["extra"], "--out", str(setup["tmp"] / "none")],
                     cwd=REPO)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last == (f"error: {bad}: the mask is 10x10 but the support image {setup['support']} "
                    "is 70x50; they must match")
    assert not os.path.exists(setup["tmp"] / "none")


@pytest.mark.slow
def test_cli_apply_exif_flag(setup):
    """A phone photo stored sideways (40 x 90, EXIF orientation 6): by default its labels
    are the upright photo's size (90 x 40); --noapply_exif keeps the stored grid."""
    sideways = Image.fromarray(smooth((40, 90), 6))
    exif = sideways.getexif()
    exif[0x0112] = 6
    path = str(setup["tmp"] / "sideways.jpg")
    sideways.save(path, quality=95, exif=exif)
    sizes = {}
    for flag in ("--apply_exif", "--noapply_exif"):
        out = str(setup["tmp"] / f"exif{flag}")
        result = run_cli(["--model", setup["base"], "--support", setup["support"],
                          "--support_mask", setup["mask"], "--query", path, "--out", out, flag],
                         cwd=REPO)
        assert result.returncode == 0, result.stderr
        with open(os.path.join(out, "summary.json")) as f:
            query = json.load(f)["queries"][0]
        sizes[flag] = (Image.open(os.path.join(out, "sideways.png")).size,
                       query["exif_orientation"])
    assert sizes == {"--apply_exif": ((40, 90), 6), "--noapply_exif": ((90, 40), 1)}


# ----------------------------------------------------------------------------- support checks
@pytest.fixture
def stub():
    """A predictor of a 12-class user-values model that must not be called."""
    return predict.Predictor(fn=None, num_classes=12, mask_values="user", source="stub")


def _support(tmp_path, mask, image_shape=(20, 30, 3), mask_format="PNG", mode=None):
    image = save_image(tmp_path / "s.png", np.zeros(image_shape))
    path = tmp_path / ("m.jpg" if mask_format == "JPEG" else "m.png")
    image_mask = Image.fromarray(np.asarray(mask, np.uint8), mode)
    if mode == "P":  # a full palette, or PIL renumbers the indices on saving
        image_mask.putpalette(np.random.default_rng(4).integers(0, 256, 768).tolist())
    image_mask.save(path, format=mask_format)
    return image, str(path)


@pytest.mark.parametrize("case, message", [
    ("no_foreground", "the mask has no foreground"),
    ("too_many", "the mask has 12 classes"),
    ("size", "the mask is 20x31 but the support image"),
    ("colour", "the support mask is in colour (2 colours: (0, 0, 0), (255, 0, 0))"),
    ("transparent", "the support mask has transparent pixels"),
    ("cmyk", "the support mask is a CMYK image"),
    ("jpeg", "the support mask is a JPEG"),
])
def test_support_errors_name_the_file(tmp_path, stub, case, message):
    mask = np.zeros((20, 30), np.uint8)
    kwargs = {}
    if case == "too_many":
        mask[:12] = np.arange(1, 13)[:, None]
    elif case == "size":
        mask = np.ones((20, 31), np.uint8)
    elif case == "colour":
        mask = np.zeros((20, 30, 3), np.uint8)
        mask[:5, :, 0] = 255
    elif case == "transparent":
        mask = np.full((20, 30, 4), 1, np.uint8)
        mask[0, 0, 3] = 0
    elif case == "cmyk":
        mask = np.ones((20, 30, 4), np.uint8)
        kwargs["mode"] = "CMYK"
        kwargs["mask_format"] = "TIFF"
    elif case == "jpeg":
        mask[:5] = 1
        kwargs["mask_format"] = "JPEG"
    elif case == "no_foreground":
        mask[:3] = 255
    image, mask_path = _support(tmp_path, mask, **kwargs)
    with pytest.raises(predict.InputError) as error:
        predict.read_support(image, mask_path, stub)
    text = str(error.value)
    assert message in text and text.startswith(mask_path) and "\n" not in text


@pytest.mark.parametrize("channels", [3, 4, 2])  # RGB, RGBA and LA, fully opaque
def test_grey_mask_saved_in_colour_is_read_as_grey(tmp_path, stub, channels):
    grey = np.zeros((20, 30), np.uint8)
    grey[:5], grey[5:9] = 7, 20
    mask = np.repeat(grey[..., None], channels, axis=-1)
    if channels in (2, 4):
        mask[..., -1] = 255
    image, mask_path = _support(tmp_path, mask)
    np.testing.assert_array_equal(predict.read_mask(mask_path), grey)
    assert list(predict.read_support(image, mask_path, stub).class_values) == [7, 20]


def test_unreadable_and_non_image_support(tmp_path, stub):
    missing = str(tmp_path / "missing.jpg")
    with pytest.raises(predict.InputError, match=f"^{missing}: cannot read the support image"):
        predict.read_support(missing, missing, stub)
    text = tmp_path / "support.jpg"
    text.write_text("hello")
    with pytest.raises(predict.InputError, match="the support image is not an image file that can be"):
        predict.read_support(str(text), missing, stub)


def test_palette_mask_values_are_indices_and_merged_limits(tmp_path, stub):
    mask = np.zeros((20, 30), np.uint8)
    mask[:5], mask[5:9] = 11, 254
    image, path = _support(tmp_path, mask, mode="P")
    support = predict.read_support(image, path, stub)
    assert support.class_values == (11, 254)
    # The re-encoded mask is the 8-bit grayscale PNG the serving function reads.
    np.testing.assert_array_equal(serving.decode_mask_png(support.mask_png).numpy(), mask)
    merged = predict.Predictor(fn=None, num_classes=12, mask_values="merged", source="stub")
    with pytest.raises(predict.InputError, match="value 254 is not a merged ATR-OS id 1..11"):
        predict.read_support(image, path, merged)


# ----------------------------------------------------------------------------- reading photos
def asymmetric(shape=(6, 10)):
    """An image that every flip and rotation changes."""
    return np.arange(np.prod(shape) * 3, dtype=np.uint8).reshape(*shape, 3)


@pytest.mark.parametrize("orientation", range(0, 10))
def test_read_photo_turns_exif_orientations_upright(tmp_path, orientation):
    stored = Image.fromarray(asymmetric())
    exif = stored.getexif()
    exif[0x0112] = orientation
    path = str(tmp_path / "p.png")
    stored.save(path, exif=exif)
    photo = predict.read_photo(path)
    # Reference: Pillow's own EXIF transpose of the same file.
    with Image.open(path) as image:
        upright = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    np.testing.assert_array_equal(photo.pixels, upright)
    assert photo.orientation == (orientation if 1 <= orientation <= 8 else 1)  # 0, 9: invalid
    # The model is sent exactly these pixels; an unturned file is sent as it is.
    np.testing.assert_array_equal(serving.decode_image(photo.data).numpy(), upright)
    assert (photo.data == open(path, "rb").read()) == (photo.orientation == 1)
    ignored = predict.read_photo(path, apply_exif=False)
    np.testing.assert_array_equal(ignored.pixels, asymmetric())
    assert ignored.orientation == 1


def test_read_photo_decodes_formats_tensorflow_does_not(tmp_path):
    rgb = asymmetric((12, 9))
    save_image(tmp_path / "rgb.tiff", rgb)
    grey16 = np.arange(12 * 9, dtype=np.uint16).reshape(12, 9) * 601
    Image.fromarray(grey16).save(tmp_path / "grey16.tif")
    save_image(tmp_path / "rgb.ppm", rgb)
    for name, expected in (("rgb.tiff", rgb), ("rgb.ppm", rgb),
                           ("grey16.tif", np.repeat((grey16 >> 8).astype(np.uint8)[..., None], 3, -1))):
        photo = predict.read_photo(str(tmp_path / name))
        np.testing.assert_array_equal(photo.pixels, expected, err_msg=name)
        np.testing.assert_array_equal(serving.decode_image(photo.data).numpy(), expected)
    # Lossy formats Pillow reads: decoded, right size, close to the source.
    smooth_rgb = smooth((24, 16), 5)
    save_image(tmp_path / "s.avif", smooth_rgb, quality=95)
    photo = predict.read_photo(str(tmp_path / "s.avif"))
    assert photo.pixels.shape == (24, 16, 3)
    assert np.abs(photo.pixels.astype(float) - smooth_rgb).mean() < 8


@pytest.mark.parametrize("content, message", [
    (b"", "the query file is empty"),
    (b"hello", "the query is not an image file that can be decoded (JPEG, PNG"),
    (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64),
     "HEIC/HEIF photos need converting to JPEG first"),
    ("truncated", "the query is a damaged or truncated image file (image file is truncated"),
])
def test_read_photo_errors_name_the_file(tmp_path, content, message):
    path = tmp_path / "q.jpg"
    if content == "truncated":
        save_image(path, smooth((60, 40), 6), quality=95)
        content = path.read_bytes()[:-200]
    path.write_bytes(content)
    with pytest.raises(predict.InputError) as error:
        predict.read_photo(str(path))
    text = str(error.value)
    assert text.startswith(f"{path}: ") and message in text and "\n" not in text


def test_support_stored_sideways_takes_an_upright_mask(tmp_path, stub):
    upright_mask = np.zeros((20, 30), np.uint8)
    upright_mask[:5, :10] = 4
    image = Image.fromarray(np.zeros((20, 30, 3), np.uint8)).transpose(Image.Transpose.ROTATE_90)
    exif = image.getexif()
    exif[0x0112] = 6  # stored 30x20; shown 20x30
    image_path = str(tmp_path / "s.jpg")
    image.save(image_path, exif=exif)
    mask_path = save_image(tmp_path / "m.png", upright_mask)
    support = predict.read_support(image_path, mask_path, stub)
    assert support.image_orientation == 6 and support.class_values == (4,)
    assert serving.decode_image(support.image_bytes).shape == (20, 30, 3)
    stored_mask = save_image(tmp_path / "stored.png", upright_mask.T)
    with pytest.raises(predict.InputError, match="the mask matches the stored pixels: turn the mask"):
        predict.read_support(image_path, stored_mask, stub)
    assert predict.read_support(image_path, stored_mask, stub, apply_exif=False).image_orientation == 1


def test_sideways_query_is_parsed_upright(tmp_path):
    image = Image.fromarray(np.zeros((16, 8, 3), np.uint8))
    exif = image.getexif()
    exif[0x0112] = 8
    image.save(tmp_path / "q.jpg", exif=exif)
    support = predict.Support("s", "m", b"", b"", (5, 9))
    summary = predict.predict_files(fake_predictor(), support, [str(tmp_path / "q.jpg")],
                                    str(tmp_path / "out"), progress=False)
    entry = summary["queries"][0]
    assert (entry["height"], entry["width"], entry["exif_orientation"]) == (8, 16, 8)
    assert Image.open(entry["label"]).size == (16, 8)


# ----------------------------------------------------------------------------- predict_files logic
def fake_predictor(values=(5, 9), poison_size=(13, 13)):
    """A serving-shaped function without a model: label = values[(row // 4) % len]; a
    request holding a poison_size image fails as a bad request would."""

    def fn(query_images, support_image, support_mask):
        images = [tf.io.decode_image(q, channels=3).numpy() for q in query_images.numpy()]
        sizes = np.array([im.shape[:2] for im in images], np.int32)
        if any(tuple(s) == poison_size for s in sizes):
            raise tf.errors.InvalidArgumentError(None, None, "assertion failed: [poisoned]\n more")
        h, w = sizes.max(0)
        class_values = np.array([0, *values], np.int32)
        labels = np.full((len(images), h, w), 255, np.int32)
        for i, (ih, iw) in enumerate(sizes):
            labels[i, :ih, :iw] = class_values[1:][(np.arange(ih) // 4) % len(values)][:, None]
        return {"labels": tf.constant(labels), "class_values": tf.constant(class_values),
                "image_sizes": tf.constant(sizes),
                "probabilities": tf.zeros([len(images), h, w, len(class_values)])}

    return predict.Predictor(fn=fn, num_classes=12, mask_values="user", source="fake")


def test_bad_request_in_a_batch_fails_alone(tmp_path):
    folder = tmp_path / "q"
    folder.mkdir()
    for name, size in (("1.png", (16, 8)), ("2.png", (13, 13)), ("3.png", (9, 20)), ("4.png", (8, 8))):
        save_image(folder / name, np.full((*size, 3), 100))
    support = predict.Support("s", "m", b"", b"", (5, 9))
    summary = predict.predict_files(fake_predictor(), support, [str(folder)], str(tmp_path / "out"),
                                    batch_size=3, progress=False)
    assert [os.path.basename(q["file"]) for q in summary["queries"]] == ["1.png", "3.png", "4.png"]
    assert summary["failures"] == [{"file": str(folder / "2.png"), "error": "assertion failed: [poisoned]"}]
    labels = np.asarray(Image.open(tmp_path / "out" / "3.png"))
    expected = np.array([5, 9])[(np.arange(9) // 4) % 2][:, None].repeat(20, 1)
    np.testing.assert_array_equal(labels, expected)
    areas = summary["queries"][1]["areas"]
    assert areas["class 5"]["pixels"] == 5 * 20 and areas["class 9"]["pixels"] == 4 * 20
    assert areas["background"]["pixels"] == 0


def test_same_names_from_two_folders_do_not_overwrite(tmp_path):
    for sub in ("x", "y"):
        (tmp_path / sub).mkdir()
        save_image(tmp_path / sub / "p.png", np.zeros((8, 8, 3)))
    support = predict.Support("s", "m", b"", b"", (5, 9))
    summary = predict.predict_files(fake_predictor(), support, [str(tmp_path / "x"), str(tmp_path / "y")],
                                    str(tmp_path / "out"), progress=False)
    assert [os.path.basename(q["label"]) for q in summary["queries"]] == ["p.png", "p-1.png"]


def test_missing_query_file_is_a_failure(tmp_path):
    support = predict.Support("s", "m", b"", b"", (5, 9))
    missing = str(tmp_path / "gone.jpg")
    summary = predict.predict_files(fake_predictor(), support, [missing], str(tmp_path / "out"),
                                    progress=False)
    assert summary["queries"] == []
    assert summary["failures"][0]["error"].startswith(f"{missing}: cannot read the query")


# ----------------------------------------------------------------------------- small parts
def test_palette_extends_show_palette():
    palette = predict.palette()
    np.testing.assert_array_equal(palette[: len(show.PALETTE)], show.PALETTE)
    np.testing.assert_array_equal(palette[255], show.IGNORE_COLOUR)
    assert len({tuple(c) for c in palette}) == 256  # every value its own colour


def test_class_names(tmp_path):
    path = tmp_path / "names.json"
    path.write_text('{"7": "sneaker"}')
    assert predict.read_class_names(str(path)) == {7: "sneaker"}
    assert predict.read_class_names('["bg", "hat"]') == {0: "bg", 1: "hat"}
    assert predict.read_class_names('{"1": "x"}', default=("background", "hat"))[1] == "x"
    with pytest.raises(predict.InputError, match="not a JSON file or JSON text"):
        predict.read_class_names("{nope")
    with pytest.raises(predict.InputError, match="keys must be mask values"):
        predict.read_class_names('{"hat": "x"}')


def test_collect_queries(tmp_path):
    for name in ("b.JPG", "a.png", "c.txt", ".hidden.png", "d.tiff", "e.heic"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "f.jpg").write_bytes(b"")
    (tmp_path / ".git").mkdir()
    files, skipped, folders = predict.collect_queries([str(tmp_path), "x.xyz"])
    assert files == [str(tmp_path / n) for n in ("a.png", "b.JPG", "d.tiff", "e.heic")] + ["x.xyz"]
    assert skipped == [str(tmp_path / "c.txt")]
    assert folders == [str(tmp_path / "sub")]   # reported, not searched; hidden ones ignored
    line = predict.format_summary({"queries": [], "totals": {}, "failures": [], "skipped": [],
                                   "skipped_folders": folders})
    assert f"give it as a --query of its own): {tmp_path / 'sub'}" in line


def test_saved_model_version_resolution(tmp_path):
    for v in ("1", "3", "10"):
        (tmp_path / v).mkdir()
        if v != "10":
            (tmp_path / v / "saved_model.pb").write_bytes(b"")
    assert predict.saved_model_version(str(tmp_path)) == str(tmp_path / "3")
    assert predict.saved_model_version(str(tmp_path / "1")) == str(tmp_path / "1")
    assert predict.saved_model_version(str(tmp_path / "10")) is None
    with pytest.raises(predict.InputError, match="neither a SavedModel"):
        predict.load_predictor(str(tmp_path / "10"))


def test_16_bit_colour_support_mask_is_refused(tmp_path, stub):
    """A grey mask saved as 16-bit RGB: Pillow decodes its high bytes, all 0, and the
    support was refused with 'the mask has no foreground', which it has."""
    from tests.test_build_atr_os import _png16
    grey = np.zeros((20, 30), np.uint16)
    grey[:5] = 7
    image, mask_path = _support(tmp_path, np.ones((20, 30)))  # then overwritten
    with open(mask_path, "wb") as f:
        f.write(_png16(np.dstack([grey] * 3)))
    with pytest.raises(predict.InputError) as error:
        predict.read_support(image, mask_path, stub)
    assert str(error.value) == (f"{mask_path}: the support mask is a 16-bit RGB PNG, whose values "
                                "cannot be read as classes; save it as an 8-bit grayscale or "
                                "palette PNG with the class values (1-254) as pixels")
