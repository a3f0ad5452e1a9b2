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

from popnet_tf import export_lib, predict, predict_lib, serving
from popnet_tf.data import images, show
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
    palette = predict_lib.palette()
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
    predictor = predict_lib.load_predictor(setup["workdir"])
    support = predict_lib.read_support(setup["support"], setup["mask"], predictor)
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
    return predict_lib.Predictor(fn=None, num_classes=12, mask_values="user", source="stub")


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
    with pytest.raises(predict_lib.InputError) as error:
        predict_lib.read_support(image, mask_path, stub)
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
    np.testing.assert_array_equal(predict_lib.read_mask(mask_path), grey)
    assert list(predict_lib.read_support(image, mask_path, stub).class_values) == [7, 20]


def test_unreadable_and_non_image_support(tmp_path, stub):
    missing = str(tmp_path / "missing.jpg")
    with pytest.raises(predict_lib.InputError, match=f"^{missing}: cannot read the support image"):
        predict_lib.read_support(missing, missing, stub)
    text = tmp_path / "support.jpg"
    text.write_text("hello")
    with pytest.raises(predict_lib.InputError, match="the support image is not an image file that can be"):
        predict_lib.read_support(str(text), missing, stub)


def test_palette_mask_values_are_indices_and_merged_limits(tmp_path, stub):
    mask = np.zeros((20, 30), np.uint8)
    mask[:5], mask[5:9] = 11, 254
    image, path = _support(tmp_path, mask, mode="P")
    support = predict_lib.read_support(image, path, stub)
    assert support.class_values == (11, 254)
    # The re-encoded mask is the 8-bit grayscale PNG the serving function reads.
    np.testing.assert_array_equal(serving.decode_mask_png(support.mask_png).numpy(), mask)
    merged = predict_lib.Predictor(fn=None, num_classes=12, mask_values="merged", source="stub")
    with pytest.raises(predict_lib.InputError, match="value 254 is not a merged ATR-OS id 1..11"):
        predict_lib.read_support(image, path, merged)
    # The message named an export even for a workdir, and not the likely cause.
    with pytest.raises(predict_lib.InputError, match="a raw ATR mask, ids 0-17, must be merged"):
        predict_lib.read_support(image, path, merged)


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
    photo = predict_lib.read_photo(path)
    # Reference: Pillow's own EXIF transpose of the same file.
    with Image.open(path) as image:
        upright = np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    np.testing.assert_array_equal(photo.pixels, upright)
    assert photo.orientation == (orientation if 1 <= orientation <= 8 else 1)  # 0, 9: invalid
    # The model is sent exactly these pixels; an unturned file is sent as it is.
    np.testing.assert_array_equal(serving.decode_image(photo.data).numpy(), upright)
    assert (photo.data == open(path, "rb").read()) == (photo.orientation == 1)
    ignored = predict_lib.read_photo(path, apply_exif=False)
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
        photo = predict_lib.read_photo(str(tmp_path / name))
        np.testing.assert_array_equal(photo.pixels, expected, err_msg=name)
        np.testing.assert_array_equal(serving.decode_image(photo.data).numpy(), expected)
    # Lossy formats Pillow reads: decoded, right size, close to the source.
    smooth_rgb = smooth((24, 16), 5)
    save_image(tmp_path / "s.avif", smooth_rgb, quality=95)
    photo = predict_lib.read_photo(str(tmp_path / "s.avif"))
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
    with pytest.raises(predict_lib.InputError) as error:
        predict_lib.read_photo(str(path))
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
    support = predict_lib.read_support(image_path, mask_path, stub)
    assert support.image_orientation == 6 and support.class_values == (4,)
    assert serving.decode_image(support.image_bytes).shape == (20, 30, 3)
    stored_mask = save_image(tmp_path / "stored.png", upright_mask.T)
    with pytest.raises(predict_lib.InputError, match="the mask matches the stored pixels: turn the mask"):
        predict_lib.read_support(image_path, stored_mask, stub)
    assert predict_lib.read_support(image_path, stored_mask, stub, apply_exif=False).image_orientation == 1


def test_sideways_query_is_parsed_upright(tmp_path):
    image = Image.fromarray(np.zeros((16, 8, 3), np.uint8))
    exif = image.getexif()
    exif[0x0112] = 8
    image.save(tmp_path / "q.jpg", exif=exif)
    support = predict_lib.Support("s", "m", b"", b"", (5, 9))
    summary = predict_lib.predict_files(fake_predictor(), support, [str(tmp_path / "q.jpg")],
                                    str(tmp_path / "out"), progress=False)
    entry = summary["queries"][0]
    assert (entry["height"], entry["width"], entry["exif_orientation"]) == (8, 16, 8)
    assert Image.open(entry["label"]).size == (16, 8)


# ----------------------------------------------------------------------------- predict_files logic
def fake_predictor(values=(5, 9), poison_value=13, calls=None):
    """A serving-shaped function without a model: label = values[(row // 4) % len]; a
    request holding an image whose first pixel is poison_value fails as a bad request
    would. Each request's query sizes are appended to `calls`."""

    def fn(query_images, support_image, support_mask):
        images = [tf.io.decode_image(q, channels=3).numpy() for q in query_images.numpy()]
        sizes = np.array([im.shape[:2] for im in images], np.int32)
        if calls is not None:
            calls.append([tuple(int(v) for v in size) for size in sizes])
        if any(im[0, 0, 0] == poison_value for im in images):
            raise tf.errors.InvalidArgumentError(None, None, "assertion failed: [poisoned]\n more")
        h, w = sizes.max(0)
        class_values = np.array([0, *values], np.int32)
        labels = np.full((len(images), h, w), 255, np.int32)
        for i, (ih, iw) in enumerate(sizes):
            labels[i, :ih, :iw] = class_values[1:][(np.arange(ih) // 4) % len(values)][:, None]
        return {"labels": tf.constant(labels), "class_values": tf.constant(class_values),
                "image_sizes": tf.constant(sizes),
                "probabilities": tf.zeros([len(images), h, w, len(class_values)])}

    return predict_lib.Predictor(fn=fn, num_classes=12, mask_values="user", source="fake")


def test_bad_request_in_a_batch_fails_alone(tmp_path):
    folder = tmp_path / "q"
    folder.mkdir()
    for name, value in (("1.png", 100), ("2.png", 13), ("3.png", 100), ("4.png", 100)):
        save_image(folder / name, np.full((9, 20, 3), value))
    support = predict_lib.Support("s", "m", b"", b"", (5, 9))
    calls = []
    summary = predict_lib.predict_files(fake_predictor(calls=calls), support, [str(folder)],
                                    str(tmp_path / "out"), batch_size=3, progress=False)
    assert [len(c) for c in calls] == [3, 1, 1, 1, 1]   # the failed request, then one by one
    assert [os.path.basename(q["file"]) for q in summary["queries"]] == ["1.png", "3.png", "4.png"]
    assert summary["failures"] == [{"file": str(folder / "2.png"), "error": "assertion failed: [poisoned]"}]
    labels = np.asarray(Image.open(tmp_path / "out" / "3.png"))
    expected = np.array([5, 9])[(np.arange(9) // 4) % 2][:, None].repeat(20, 1)
    np.testing.assert_array_equal(labels, expected)
    areas = summary["queries"][1]["areas"]
    assert areas["class 5"]["pixels"] == 5 * 20 and areas["class 9"]["pixels"] == 4 * 20
    assert areas["background"]["pixels"] == 0


def test_a_request_holds_consecutive_queries_of_one_size_within_the_pixel_budget(tmp_path, monkeypatch):
    """The model pads a request to its largest photo at full resolution: mixed sizes go in
    separate requests, and a request stays within _BATCH_PIXELS (memory stays bounded)."""
    folder = tmp_path / "q"
    folder.mkdir()
    sizes = [(8, 8), (8, 8), (8, 12), (8, 12), (8, 12), (8, 8), (4, 4), (4, 4), (4, 4), (4, 4), (4, 4)]
    for i, size in enumerate(sizes):
        save_image(folder / f"{i:02d}.png", np.full((*size, 3), 100))
    monkeypatch.setattr(predict_lib, "_BATCH_PIXELS", 3 * 4 * 4)
    calls = []
    summary = predict_lib.predict_files(fake_predictor(calls=calls), predict_lib.Support("s", "m", b"", b"", (5, 9)),
                                    [str(folder)], str(tmp_path / "out"), batch_size=2, progress=False)
    assert calls == [[(8, 8)], [(8, 8)], [(8, 12)], [(8, 12)], [(8, 12)], [(8, 8)],
                     [(4, 4)] * 2, [(4, 4)] * 2, [(4, 4)]]
    assert [(q["height"], q["width"]) for q in summary["queries"]] == sizes
    monkeypatch.setattr(predict_lib, "_BATCH_PIXELS", 16_000_000)
    calls.clear()
    predict_lib.predict_files(fake_predictor(calls=calls), predict_lib.Support("s", "m", b"", b"", (5, 9)),
                          [str(folder)], str(tmp_path / "out2"), batch_size=3, progress=False)
    assert [len(c) for c in calls] == [2, 3, 1, 3, 2]


def test_same_names_from_two_folders_do_not_overwrite(tmp_path):
    for sub in ("x", "y"):
        (tmp_path / sub).mkdir()
        save_image(tmp_path / sub / "p.png", np.zeros((8, 8, 3)))
    support = predict_lib.Support("s", "m", b"", b"", (5, 9))
    summary = predict_lib.predict_files(fake_predictor(), support, [str(tmp_path / "x"), str(tmp_path / "y")],
                                    str(tmp_path / "out"), progress=False)
    assert [os.path.basename(q["label"]) for q in summary["queries"]] == ["p.png", "p-1.png"]


def test_missing_query_file_is_a_failure(tmp_path):
    support = predict_lib.Support("s", "m", b"", b"", (5, 9))
    missing = str(tmp_path / "gone.jpg")
    summary = predict_lib.predict_files(fake_predictor(), support, [missing], str(tmp_path / "out"),
                                    progress=False)
    assert summary["queries"] == []
    assert summary["failures"][0]["error"].startswith(f"{missing}: cannot read the query")


# ----------------------------------------------------------------------------- small parts
def test_palette_extends_show_palette():
    palette = predict_lib.palette()
    np.testing.assert_array_equal(palette[: len(show.PALETTE)], show.PALETTE)
    np.testing.assert_array_equal(palette[255], show.IGNORE_COLOUR)
    assert len({tuple(c) for c in palette}) == 256  # every value its own colour


def test_class_names(tmp_path):
    path = tmp_path / "names.json"
    path.write_text('{"7": "sneaker"}')
    assert predict_lib.read_class_names(str(path)) == {7: "sneaker"}
    assert predict_lib.read_class_names('["bg", "hat"]') == {0: "bg", 1: "hat"}
    assert predict_lib.read_class_names('{"1": "x"}', default=("background", "hat"))[1] == "x"
    with pytest.raises(predict_lib.InputError, match="not a JSON file or JSON text"):
        predict_lib.read_class_names("{nope")
    with pytest.raises(predict_lib.InputError, match="keys must be mask values"):
        predict_lib.read_class_names('{"hat": "x"}')


def test_collect_queries(tmp_path):
    for name in ("b.JPG", "a.png", "c.txt", ".hidden.png", "d.tiff", "e.heic"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "f.jpg").write_bytes(b"")
    (tmp_path / ".git").mkdir()
    files, skipped, folders = predict_lib.collect_queries([str(tmp_path), "x.xyz"])
    assert files == [str(tmp_path / n) for n in ("a.png", "b.JPG", "d.tiff", "e.heic")] + ["x.xyz"]
    assert skipped == [str(tmp_path / "c.txt")]
    assert folders == [str(tmp_path / "sub")]   # reported, not searched; hidden ones ignored
    line = predict_lib.format_summary({"queries": [], "totals": {}, "failures": [], "skipped": [],
                                   "skipped_folders": folders})
    assert f"give it as a --query of its own): {tmp_path / 'sub'}" in line


def test_saved_model_version_resolution(tmp_path):
    for v in ("1", "3", "10"):
        (tmp_path / v).mkdir()
        if v != "10":
            (tmp_path / v / "saved_model.pb").write_bytes(b"")
    assert predict_lib.saved_model_version(str(tmp_path)) == str(tmp_path / "3")
    assert predict_lib.saved_model_version(str(tmp_path / "1")) == str(tmp_path / "1")
    assert predict_lib.saved_model_version(str(tmp_path / "10")) is None
    with pytest.raises(predict_lib.InputError, match="neither a SavedModel"):
        predict_lib.load_predictor(str(tmp_path / "10"))


# ----------------------------------------------------------------------------- audit B
@pytest.mark.parametrize("orientation", range(1, 9))
def test_tiff_with_exif_orientation_is_turned_once(tmp_path, orientation):
    # Pillow turns a TIFF upright itself while loading it: read_photo must not turn it again.
    stored = asymmetric()
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = orientation
    path = str(tmp_path / "p.tif")
    image.save(path, exif=exif)
    upright = (stored if orientation == 1 else
               np.asarray(Image.fromarray(stored).transpose(images.UPRIGHT[orientation])))
    photo = predict_lib.read_photo(path)
    np.testing.assert_array_equal(photo.pixels, upright)
    np.testing.assert_array_equal(serving.decode_image(photo.data).numpy(), upright)
    assert photo.orientation == orientation
    np.testing.assert_array_equal(predict_lib.read_photo(path, apply_exif=False).pixels, stored)


@pytest.mark.parametrize("mode", ["P", "L", "1", "RGB", "RGBA"])
def test_bmp_of_every_depth_reaches_the_model_as_its_colours(tmp_path, mode):
    # TensorFlow reads an 8-bit palette BMP's indices as grey levels: such files go to Pillow.
    image = Image.fromarray(asymmetric((12, 9))).convert(mode)
    if mode == "P":  # a palette unrelated to the indices
        image.putpalette(np.random.default_rng(5).integers(0, 256, 768).tolist())
    path = str(tmp_path / f"{mode}.bmp")
    image.save(path)
    with Image.open(path) as saved:
        expected = np.asarray(saved.convert("RGB"))
    photo = predict_lib.read_photo(path)
    np.testing.assert_array_equal(photo.pixels, expected)
    np.testing.assert_array_equal(serving.decode_image(photo.data).numpy(), expected)


def test_animated_webp_is_its_first_frame_without_tensorflow_warnings(tmp_path):
    frames = [Image.fromarray(np.roll(asymmetric((12, 9)), 40 * k)) for k in range(3)]
    path = str(tmp_path / "anim.webp")
    frames[0].save(path, save_all=True, append_images=frames[1:], lossless=True)
    assert not predict_lib._tf_decodes(open(path, "rb").read())  # TF refuses it with a C++ warning
    with Image.open(path) as image:
        first = np.asarray(image.convert("RGB"))
    np.testing.assert_array_equal(predict_lib.read_photo(path).pixels, first)


@pytest.mark.parametrize("name, kwargs, message", [
    ("m.webp", {"quality": 80}, "is a lossy WebP"),
    ("m.avif", {"quality": 60}, "is an AVIF image (a lossy format)"),
    ("m.jp2", {"quality_mode": "rates", "quality_layers": [40]}, "is a JPEG2000 image"),
    ("m.tif", {"compression": "jpeg"}, "is a JPEG-compressed TIFF"),
])
def test_lossy_support_masks_are_refused(tmp_path, stub, name, kwargs, message):
    # Smeared values would be classes of their own (a 2-class mask read as 5 to 12 classes).
    mask = np.zeros((20, 30), np.uint8)
    mask[3:12, 4:20], mask[12:18, 10:25] = 3, 7
    image = save_image(tmp_path / "s.png", np.zeros((20, 30, 3)))
    path = str(tmp_path / name)
    Image.fromarray(mask if name != "m.tif" else np.repeat(mask[..., None], 3, -1)).save(path, **kwargs)
    with pytest.raises(predict_lib.InputError) as error:
        predict_lib.read_support(image, path, stub)
    text = str(error.value)
    assert text.startswith(f"{path}: the support mask {message}") and "save it as PNG" in text


def test_lossless_webp_mask_is_read(tmp_path, stub):
    mask = np.zeros((20, 30), np.uint8)
    mask[3:12, 4:20], mask[12:18, 10:25] = 3, 7
    image = save_image(tmp_path / "s.png", np.zeros((20, 30, 3)))
    path = str(tmp_path / "m.webp")
    Image.fromarray(mask).save(path, lossless=True)
    assert predict_lib.read_support(image, path, stub).class_values == (3, 7)


def test_output_folder_that_cannot_be_made_is_one_line(tmp_path):
    blocker = tmp_path / "taken"
    blocker.write_text("a file")
    for out in (blocker, blocker / "sub"):
        with pytest.raises(predict_lib.InputError) as error:
            predict_lib.make_output_folder(str(out))
        text = str(error.value)
        assert text.startswith(f"{out}: cannot create the output folder: ") and "\n" not in text


@pytest.mark.slow
def test_cli_unusable_out_is_one_line(setup):
    blocker = setup["tmp"] / "out_is_a_file"
    blocker.write_text("a file")
    result = run_cli(["--model", setup["base"], "--support", setup["support"],
                      "--support_mask", setup["mask"], "--query", setup["queries"]["extra"],
                      "--out", str(blocker)], cwd=REPO)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {blocker}: cannot create the output folder: File exists")


@pytest.mark.parametrize("encoding", ["utf-8", "ascii"])
def test_summary_with_a_non_utf8_file_name_is_printed(encoding):
    name = b"/photos/caf\xe9.jpg".decode("utf-8", "surrogateescape")  # a Latin-1 name
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding=encoding, errors="strict")  # as under en_US.UTF-8
    predict.write_text(f"failed: {name}: the query file is empty\nnaïve\n", stream)
    stream.flush()
    out = raw.getvalue()
    assert out.startswith(b"failed: /photos/caf") and b"the query file is empty" in out
    if encoding == "utf-8":
        assert b"caf\xe9.jpg" in out and "naïve".encode() in out  # the name's own bytes


def test_grey_gif_mask_whose_levels_were_renumbered_is_refused(tmp_path, stub):
    # Pillow (like most GIF writers) stores a grey 0/3/7 mask as indices 0/1/2 of a grey
    # palette: reading the indices would silently turn classes 3 and 7 into 1 and 2.
    mask = np.zeros((20, 30), np.uint8)
    mask[3:12, 4:20], mask[12:18, 10:25] = 3, 7
    image = save_image(tmp_path / "s.png", np.zeros((20, 30, 3)))
    path = str(tmp_path / "m.gif")
    Image.fromarray(mask, "L").save(path)
    with pytest.raises(predict_lib.InputError) as error:
        predict_lib.read_support(image, path, stub)
    text = str(error.value)
    assert text.startswith(f"{path}: the support mask is a palette image of grey colours whose "
                           "indices are not their grey levels (0 (grey 0), 1 (grey 3), 2 (grey 7))")
    # A grey palette whose indices are its levels is unambiguous.
    same = Image.fromarray(mask, "P")
    same.putpalette([c for v in range(256) for c in (v, v, v)])
    same.save(tmp_path / "same.png")
    assert predict_lib.read_support(image, str(tmp_path / "same.png"), stub).class_values == (3, 7)


def test_class_names_file_that_cannot_be_read_is_one_line(tmp_path):
    folder = tmp_path / "names"
    folder.mkdir()
    binary = tmp_path / "names.json"
    binary.write_bytes(b'\xff\xfe{"3": "jacket"}')
    for arg, why in ((folder, "cannot read it: Is a directory"),
                     (binary, "cannot read it: not UTF-8 text (invalid start byte)")):
        with pytest.raises(predict_lib.InputError) as error:
            predict_lib.read_class_names(str(arg))
        assert str(error.value) == f"--class_names: {arg}: {why}"


def test_out_in_the_query_folder_never_overwrites_a_photo(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    photo = save_image(folder / "a.png", smooth((20, 30), 1))
    before = open(photo, "rb").read()
    predictor = predict_lib.Predictor(fn=_fake_model, num_classes=12, mask_values="user", source="fake")
    support = predict_lib.Support("s.png", "m.png", b"", b"", (3,))
    summary = predict_lib.predict_files(predictor, support, [str(folder)], str(folder), progress=False)
    assert open(photo, "rb").read() == before  # the user's photo, not its label map
    assert summary["queries"][0]["label"] == str(folder / "a-1.png")


def _fake_model(query_images, support_image, support_mask):
    n = int(query_images.shape[0])
    sizes = [tf.shape(tf.io.decode_image(q, channels=3))[:2] for q in tf.unstack(query_images)]
    h, w = (int(max(s[i] for s in sizes)) for i in (0, 1))
    return {"labels": tf.fill([n, h, w], 3), "probabilities": tf.zeros([n, h, w, 2]),
            "class_values": tf.constant([0, 3]), "image_sizes": tf.stack(sizes)}


@pytest.mark.parametrize("scale", [1.0, 255.0])
def test_float_tiff_is_not_black(tmp_path, scale):
    grey = (np.arange(12 * 9).reshape(12, 9) * 2).astype(np.uint8)
    path = str(tmp_path / "f.tif")
    Image.fromarray(grey.astype(np.float32) / 255 * scale).save(path)  # 0..1, or 0..255
    photo = predict_lib.read_photo(path)
    np.testing.assert_array_equal(photo.pixels, np.repeat(grey[..., None], 3, -1))


@pytest.mark.slow
def test_cli_truncated_queries_print_no_tensorflow_log_lines(setup):
    folder = setup["tmp"] / "truncated"
    folder.mkdir()
    for name, kwargs in (("t.jpg", {"quality": 90}), ("t.png", {})):
        path = save_image(folder / f"full_{name}", smooth((60, 40), 7), **kwargs)
        data = open(path, "rb").read()
        os.remove(path)
        (folder / name).write_bytes(data[: len(data) // 2])
    result = run_cli(["--model", setup["base"], "--support", setup["support"],
                      "--support_mask", setup["mask"], "--query", str(folder),
                      "--out", str(setup["tmp"] / "parsed_truncated")], cwd=REPO)
    assert result.returncode == 1
    assert f"failed: {folder / 't.jpg'}: the query is a damaged or truncated image file" in result.stdout
    assert f"failed: {folder / 't.png'}: the query is a damaged or truncated image file" in result.stdout
    assert "jpeg_mem.cc" not in result.stderr and "local_rendezvous" not in result.stderr


def test_cli_choices_are_servings():
    """The CLI lists the mask-value modes and heads itself (it imports serving, and
    TensorFlow, only after parsing its flags); the lists must agree."""
    assert predict.MASK_VALUES == list(serving.MASK_VALUES)
    assert predict.HEADS == list(serving.HEADS)


def test_16_bit_colour_support_mask_is_refused(tmp_path, stub):
    """A grey mask saved as 16-bit RGB: Pillow decodes its high bytes, all 0, and the
    support was refused with 'the mask has no foreground', which it has."""
    from tests.test_build_atr_os import _png16
    grey = np.zeros((20, 30), np.uint16)
    grey[:5] = 7
    image, mask_path = _support(tmp_path, np.ones((20, 30)))  # then overwritten
    with open(mask_path, "wb") as f:
        f.write(_png16(np.dstack([grey] * 3)))
    with pytest.raises(predict_lib.InputError) as error:
        predict_lib.read_support(image, mask_path, stub)
    assert str(error.value) == (f"{mask_path}: the support mask is a 16-bit RGB PNG, whose values "
                                "cannot be read as classes; save it as an 8-bit grayscale or "
                                "palette PNG with the class values (1-254) as pixels")


@pytest.mark.parametrize("name, kwargs", [("motion.jpg", {"quality": 90}),
                                          ("motion.jpg", {"quality": 90, "progressive": True}),
                                          ("trailer.png", {})])
def test_whole_photo_with_a_long_trailer_reaches_the_model_as_served(tmp_path, name, kwargs):
    """A phone's motion photo appends a video after the JPEG's end marker (and some tools
    append data after a PNG's IEND). Such a whole file is decoded by TensorFlow, as
    `serving_default` and evaluation decode it, and sent unchanged; with the end marker
    more than 4 KB before the end it went to Pillow (the accurate DCT: pixels up to a few
    levels apart, so labels unlike the served model's) and was re-encoded as PNG."""
    rng = np.random.default_rng(4)
    pixels = rng.integers(0, 256, (48, 40, 3))
    path = save_image(tmp_path / name, pixels, **kwargs)
    with open(path, "rb") as f:
        photo_bytes = f.read()
    data = photo_bytes + b"\x00\x00\x00\x1cftypmp42" + rng.bytes(20_000)
    with open(path, "wb") as f:
        f.write(data)
    photo = predict_lib.read_photo(path)
    assert photo.data == data
    np.testing.assert_array_equal(photo.pixels, serving.decode_image(data).numpy())
    # Cut short (the video's bytes gone with the image's end), it still goes to Pillow.
    assert not predict_lib._tf_decodes(photo_bytes[: len(photo_bytes) // 2])
