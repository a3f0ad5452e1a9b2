"""Export: SavedModel layout and versions, signatures (saved_model_cli), outputs of the
loaded SavedModel in a fresh process against the Keras model, the one-shot class
mapping, bad requests, and TF Serving requests (gRPC PredictRequest, REST JSON).

The workdir is made from randomly initialised smoke-config stages (no training): the
comparisons only need fixed weights, and random ones give non-trivial outputs.
"""

import base64
import http.server
import io
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
from concurrent import futures

import grpc

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from tensorflow_serving.apis import predict_pb2, prediction_service_pb2_grpc

from configs import synthetic_cpu
from popnet_tf import classes, export_lib, serving, train_lib
from popnet_tf.models import popnet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEEN_BASE = (1, 3)     # store entries set as "seen" in the fake stage 3 (5 stays unseen)
TOL = 1e-5


def make_workdir(path: str):
    """A workdir in train_lib's layout with random-weight stages 1-3 (smoke config).

    Stage 3's prototype store holds random prototypes for SEEN_BASE, marked seen, so the
    dynamic (merged) path differs from the static one. Returns (config, stage-3 model).
    """
    config = synthetic_cpu.get_config("smoke")
    keras.utils.set_random_seed(7)
    previous = None
    for stage in (1, 2, 3):
        model = popnet.build_stage(config, stage, previous=previous)
        popnet.build_variables(model, stage, config.data.crop_size)
        if stage == 3:
            rng = np.random.default_rng(3)
            store = np.zeros(model.store.prototypes.shape, np.float32)
            seen = np.zeros(model.store.seen.shape, np.float32)
            store[list(SEEN_BASE)] = rng.normal(size=(len(SEEN_BASE), store.shape[1]))
            seen[list(SEEN_BASE)] = 1
            model.store.prototypes.assign(store)
            model.store.seen.assign(seen)
        tf.train.Checkpoint(model=model).save(
            os.path.join(train_lib.checkpoint_dir(path, stage), "ckpt"))
        train_lib.write_json_atomic(os.path.join(train_lib.stage_dir(path, stage), "result.json"),
                                    {"stage": stage})
        previous = model
    train_lib.write_json_atomic(os.path.join(path, "run.json"),
                                {"fold": 1, "fold_set": "paper", "config": config.to_dict()})
    return config, previous


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The fake workdir exported twice into one base folder: 1 = user mask values (the
    whole path: restore from the checkpoints, export), 2 = merged ids (the in-memory
    model, whose weights the checkpoints hold, written by write_version)."""
    tmp = tmp_path_factory.mktemp("export")
    workdir, base = str(tmp / "work"), str(tmp / "models")
    config, model = make_workdir(workdir)
    user = export_lib.export_saved_model(workdir, base)
    parser = serving.OneShotParser(model, config.data.eval_size, mask_values="merged")
    merged = export_lib.write_version(parser, base, info={"stage": 3})
    return {"tmp": tmp, "workdir": workdir, "base": base, "config": config, "model": model,
            "user": user, "merged": merged, "E": config.data.eval_size}


# ----------------------------------------------------------------------------- helpers
def keras_probs(model, queries, support, mask, use_dynamic):
    """The Keras model's prediction-head probabilities [N, H, W, C] for N queries of the
    model's input size against one support (tiled to the batch, as model.call needs)."""
    n = len(queries)
    out = model({"query_image": np.asarray(queries, np.float32),
                 "support_image": np.repeat(np.asarray(support, np.float32)[None], n, 0),
                 "support_mask": np.repeat(np.asarray(mask, np.int32)[None], n, 0)},
                training=False, use_dynamic=use_dynamic)
    return out["probs"].numpy()


def block_mask(shape, values, seed):
    """A mask of rectangles of the given values on background, plus an ignore band."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(shape, np.int32)
    for v in values:
        r, c = rng.integers(0, shape[0] - 12), rng.integers(0, shape[1] - 12)
        mask[r:r + rng.integers(8, 20), c:c + rng.integers(8, 20)] = v
    mask[-3:] = 255
    return mask


def png_bytes(array, mode=None):
    buf = io.BytesIO()
    Image.fromarray(np.asarray(array, np.uint8), mode).save(buf, format="PNG")
    return buf.getvalue()


def assert_labels_match(labels, probs, values, margin=1e-4):
    """labels == values[argmax(probs)] wherever the top two probabilities are apart."""
    top2 = np.sort(probs, axis=-1)[..., -2:]
    clear = top2[..., 1] - top2[..., 0] > margin
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(labels[clear], np.asarray(values)[probs.argmax(-1)][clear])


# ----------------------------------------------------------------------------- layout
@pytest.mark.slow
def test_versioned_layout_and_metadata(exported):
    base = exported["base"]
    assert sorted(os.listdir(base)) == ["1", "2"]  # nothing else: no temporary folder left
    for name in ("1", "2"):
        assert os.path.exists(os.path.join(base, name, "saved_model.pb"))
        assert os.path.isdir(os.path.join(base, name, "variables"))
    meta = serving.read_metadata(exported["merged"])
    assert meta["mask_values"] == "merged" and meta["stage"] == 3
    assert meta["num_classes"] == classes.NUM_CLASSES and meta["eval_size"] == exported["E"]
    assert meta["class_names"] == list(classes.MERGED_NAMES)
    assert serving.read_metadata(exported["user"])["class_names"] is None
    assert meta["foreground_gate"] is False  # the config's default: SPEC §6's NCM prediction
    from popnet_tf import predict_lib  # a SavedModel's gate is fixed at export
    with pytest.raises(predict_lib.InputError, match="exported without the foreground gate"):
        predict_lib.load_predictor(exported["user"], foreground_gate=True)


def test_next_version(tmp_path):
    assert export_lib.next_version(str(tmp_path / "missing")) == 1
    for name in ("1", "3", "10", "notes", "7.bak", ".tmp-11-5"):
        (tmp_path / name).mkdir()
    (tmp_path / "12").write_text("a file, not a version")
    assert export_lib.next_version(str(tmp_path)) == 11


@pytest.mark.slow
def test_existing_version_refused_and_failed_write_leaves_nothing(exported, monkeypatch):
    with pytest.raises(FileExistsError, match="version 1 exists"):
        export_lib.export_saved_model(exported["workdir"], exported["base"], version=1)

    class Broken:
        def write_out(self, path, **kwargs):
            os.makedirs(os.path.join(path, "variables"))
            with open(os.path.join(path, "saved_model.pb"), "w") as f:
                f.write("half")
            raise OSError("disk full")

    monkeypatch.setattr(export_lib, "build_archive", lambda parser: Broken())
    parser = serving.OneShotParser(exported["model"], exported["E"])
    with pytest.raises(OSError, match="disk full"):
        export_lib.write_version(parser, exported["base"])
    assert sorted(os.listdir(exported["base"])) == ["1", "2"]


def test_workdir_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="run.json"):
        export_lib.export_saved_model(str(tmp_path), str(tmp_path / "out"))
    with pytest.raises(ValueError, match="mask_values"):
        export_lib.export_saved_model(str(tmp_path), str(tmp_path / "out"), mask_values="raw")


# ----------------------------------------------------------------------------- signatures
@pytest.mark.slow
def test_saved_model_cli_lists_signatures(exported):
    result = subprocess.run(["saved_model_cli", "show", "--dir", exported["user"], "--all"],
                            capture_output=True, text=True, check=True, timeout=120)
    text = result.stdout
    expected = {
        "serving_default": {"query_images": ("DT_STRING", "(-1)"), "support_image": ("DT_STRING", "()"),
                            "support_mask": ("DT_STRING", "()")},
        "parse_images": {"query_images": ("DT_FLOAT", "(-1, -1, -1, 3)"),
                         "support_image": ("DT_FLOAT", "(-1, -1, 3)"),
                         "support_mask": ("DT_INT32", "(-1, -1)")},
    }
    outputs = {"labels": ("DT_INT32", "(-1, -1, -1)"), "probabilities": ("DT_FLOAT", "(-1, -1, -1, -1)"),
               "class_values": ("DT_INT32", "(-1)"), "image_sizes": ("DT_INT32", "(-1, 2)")}
    for name, inputs in expected.items():
        block = text.split(f"signature_def['{name}']:")[1].split("signature_def[")[0]
        assert "Method name is: tensorflow/serving/predict" in block
        for kind, specs in (("inputs", inputs), ("outputs", outputs)):
            for key, (dtype, shape) in specs.items():
                entry = block.split(f"{kind}['{key}'] tensor_info:")[1]
                lines = [ln.strip() for ln in entry.splitlines()[1:3]]
                assert lines == [f"dtype: {dtype}", f"shape: {shape}"], (name, key, lines)


FRESH = textwrap.dedent("""
    # Runs the exported signatures without popnet_tf: what TF Serving has.
    import json, sys
    import numpy as np
    import tensorflow as tf
    spec = json.load(open(sys.argv[1]))
    arrays = np.load(spec["arrays"])
    models = {k: tf.saved_model.load(v) for k, v in spec["models"].items()}
    out = {}
    for case in spec["cases"]:
        fn = models[case["model"]].signatures[case["signature"]]
        inputs = {}
        for name, src in case["inputs"].items():
            if "array" in src:
                inputs[name] = tf.constant(arrays[src["array"]])
            elif "files" in src:
                inputs[name] = tf.constant([open(p, "rb").read() for p in src["files"]])
            else:
                inputs[name] = tf.constant(open(src["file"], "rb").read())
        for key, value in fn(**inputs).items():
            out[case["name"] + "/" + key] = value.numpy()
    assert not [m for m in sys.modules if m.startswith("popnet_tf")]
    np.savez(spec["out"], **out)
""")


@pytest.fixture(scope="module")
def fresh_outputs(exported):
    """Inputs, written to disk, and what the SavedModels return for them in a fresh
    Python process that never imports popnet_tf."""
    tmp, E = exported["tmp"], exported["E"]
    rng = np.random.default_rng(0)
    a = {
        "queries": rng.uniform(0, 255, (2, E, E, 3)).astype(np.float32),
        "support": rng.uniform(0, 255, (E, E, 3)).astype(np.float32),
        "user_mask": block_mask((E, E), (5, 9, 200), seed=1),
        "merged_mask": block_mask((E, E), (1, 3, 5), seed=2),
        "tall_query": rng.uniform(0, 255, (1, 96, 40, 3)).astype(np.float32),
        "wide_support": rng.uniform(0, 255, (50, 80, 3)).astype(np.float32),
        "wide_mask": block_mask((50, 80), (4, 11), seed=3),
    }
    np.savez(tmp / "arrays.npz", **a)
    files = {"q0": rng.integers(0, 256, (E, E, 3)), "q1": rng.integers(0, 256, (E // 2, E, 3)),
             "s": rng.integers(0, 256, (E, E, 3))}
    paths = {}
    for name, pixels in files.items():
        paths[name] = str(tmp / f"{name}.png")
        with open(paths[name], "wb") as f:
            f.write(png_bytes(pixels))
        a[name] = pixels
    paths["mask"] = str(tmp / "mask.png")
    with open(paths["mask"], "wb") as f:
        f.write(png_bytes(a["user_mask"], "L"))

    def arr(q, s, m):
        return {"query_images": {"array": q}, "support_image": {"array": s},
                "support_mask": {"array": m}}

    spec = {
        "arrays": str(tmp / "arrays.npz"), "out": str(tmp / "fresh.npz"),
        "models": {"user": exported["user"], "merged": exported["merged"]},
        "cases": [
            {"name": "user", "model": "user", "signature": "parse_images",
             "inputs": arr("queries", "support", "user_mask")},
            {"name": "merged", "model": "merged", "signature": "parse_images",
             "inputs": arr("queries", "support", "merged_mask")},
            {"name": "resized", "model": "user", "signature": "parse_images",
             "inputs": arr("tall_query", "wide_support", "wide_mask")},
            {"name": "encoded", "model": "user", "signature": "serving_default",
             "inputs": {"query_images": {"files": [paths["q0"], paths["q1"]]},
                        "support_image": {"file": paths["s"]}, "support_mask": {"file": paths["mask"]}}},
        ],
    }
    with open(tmp / "spec.json", "w") as f:
        json.dump(spec, f)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, "-c", FRESH, str(tmp / "spec.json")], cwd=str(tmp), env=env,
                   check=True, timeout=300)
    out = np.load(spec["out"])
    return a, paths, {k: out[k] for k in out.files}


@pytest.mark.slow
def test_fresh_process_matches_keras_user_values(exported, fresh_outputs):
    """Mask values 5, 9, 200 take slots 1, 2, 3 (NumPy remap), static prototypes;
    outputs name the user's values."""
    a, _, out = fresh_outputs
    slot_mask = np.select([a["user_mask"] == 5, a["user_mask"] == 9, a["user_mask"] == 200],
                          [1, 2, 3], a["user_mask"])
    probs = keras_probs(exported["model"], a["queries"], a["support"], slot_mask, use_dynamic=False)
    np.testing.assert_array_equal(out["user/class_values"], [0, 5, 9, 200])
    np.testing.assert_allclose(out["user/probabilities"], probs[..., :4], atol=TOL)
    np.testing.assert_allclose(probs[..., 4:], 0, atol=1e-6)  # unused slots carry nothing
    assert_labels_match(out["user/labels"], probs[..., :4], [0, 5, 9, 200])
    assert set(np.unique(out["user/labels"])) <= {0, 5, 9, 200}
    np.testing.assert_array_equal(out["user/image_sizes"], [[64, 64], [64, 64]])


@pytest.mark.slow
def test_fresh_process_matches_keras_merged_values(exported, fresh_outputs):
    """Merged ids are their own slots; seen base classes use the store (dynamic)."""
    a, _, out = fresh_outputs
    probs = keras_probs(exported["model"], a["queries"], a["support"], a["merged_mask"], use_dynamic=True)
    static = keras_probs(exported["model"], a["queries"], a["support"], a["merged_mask"], use_dynamic=False)
    assert np.abs(probs - static).max() > 1e-3  # the store matters here
    np.testing.assert_array_equal(out["merged/class_values"], [0, 1, 3, 5])
    np.testing.assert_allclose(out["merged/probabilities"], probs[..., [0, 1, 3, 5]], atol=TOL)
    assert_labels_match(out["merged/labels"], probs[..., [0, 1, 3, 5]], [0, 1, 3, 5])


@pytest.mark.slow
def test_fresh_process_resizes_like_evaluation(exported, fresh_outputs):
    """A 96x40 query and a 50x80 support: aspect-preserving fit into 64x64, padding,
    and probabilities resized back to 96x40 (expected built here with TF image ops)."""
    a, _, out = fresh_outputs
    E = exported["E"]
    query = tf.image.resize(a["tall_query"][0], (64, 27), method="bilinear", antialias=True)  # 40*64/96 = 26.7
    query = np.pad(query.numpy(), [[0, 0], [0, E - 27], [0, 0]])
    support = tf.image.resize(a["wide_support"], (40, 64), method="bilinear",
                              antialias=True).numpy()  # 50*64/80
    support = np.pad(support, [[0, E - 40], [0, 0], [0, 0]])
    rows = np.minimum(((np.arange(40) + 0.5) * 50 / 40).astype(int), 49)  # nearest, half-pixel
    cols = np.minimum(((np.arange(64) + 0.5) * 80 / 64).astype(int), 79)
    mask = np.pad(a["wide_mask"][rows][:, cols], [[0, E - 40], [0, 0]], constant_values=255)
    slot_mask = np.select([mask == 4, mask == 11], [1, 2], mask)
    probs = keras_probs(exported["model"], query[None], support, slot_mask, use_dynamic=False)
    probs = tf.image.resize(probs[0, :, :27, :3], (96, 40), method="bilinear").numpy()
    assert out["resized/probabilities"].shape == (1, 96, 40, 3)
    np.testing.assert_allclose(out["resized/probabilities"][0], probs, atol=TOL)
    np.testing.assert_array_equal(out["resized/image_sizes"], [[96, 40]])
    assert_labels_match(out["resized/labels"][0], probs, [0, 4, 11])


@pytest.mark.slow
def test_fresh_process_encoded_batch_of_two_sizes(exported, fresh_outputs):
    """PNG queries of 64x64 and 32x64 in one request: one support, outputs padded to
    64x64 with label 255 / probability 0 beyond the smaller query."""
    a, _, out = fresh_outputs
    E = exported["E"]
    q1 = np.zeros((E, E, 3), np.float32)
    q1[: E // 2] = a["q1"]
    slot_mask = np.select([a["user_mask"] == 5, a["user_mask"] == 9, a["user_mask"] == 200],
                          [1, 2, 3], a["user_mask"])
    probs = keras_probs(exported["model"], np.stack([a["q0"], q1]).astype(np.float32), a["s"],
                        slot_mask, use_dynamic=False)[..., :4]
    np.testing.assert_array_equal(out["encoded/image_sizes"], [[E, E], [E // 2, E]])
    np.testing.assert_array_equal(out["encoded/class_values"], [0, 5, 9, 200])
    np.testing.assert_allclose(out["encoded/probabilities"][0], probs[0], atol=TOL)
    np.testing.assert_allclose(out["encoded/probabilities"][1, : E // 2], probs[1, : E // 2], atol=TOL)
    assert np.all(out["encoded/probabilities"][1, E // 2:] == 0)
    assert np.all(out["encoded/labels"][1, E // 2:] == 255)
    assert_labels_match(out["encoded/labels"][0], probs[0], [0, 5, 9, 200])
    assert_labels_match(out["encoded/labels"][1, : E // 2], probs[1, : E // 2], [0, 5, 9, 200])


# ----------------------------------------------------------------------------- TF Serving requests
@pytest.fixture(scope="module")
def loaded(exported):
    return tf.saved_model.load(exported["user"])


@pytest.mark.slow
def test_grpc_predict_request_decodes_through_signature(loaded, fresh_outputs):
    """The README's gRPC request: tensors packed with tf.make_tensor_proto into a
    PredictRequest, serialised, parsed back and unpacked with tf.make_ndarray, as TF
    Serving does, reproduce the direct call."""
    a, paths, out = fresh_outputs
    files = {n: open(paths[n], "rb").read() for n in ("q0", "q1", "s", "mask")}
    request = predict_pb2.PredictRequest()
    request.model_spec.name = "popnet"
    request.model_spec.signature_name = "serving_default"
    request.inputs["query_images"].CopyFrom(tf.make_tensor_proto([files["q0"], files["q1"]]))
    request.inputs["support_image"].CopyFrom(tf.make_tensor_proto(files["s"]))
    request.inputs["support_mask"].CopyFrom(tf.make_tensor_proto(files["mask"]))
    request.output_filter.extend(["labels", "class_values", "image_sizes"])
    received = predict_pb2.PredictRequest.FromString(request.SerializeToString())

    fn = loaded.signatures[received.model_spec.signature_name]
    assert set(received.inputs) == set(fn.structured_input_signature[1])
    for name, proto in received.inputs.items():
        spec = fn.structured_input_signature[1][name]
        assert tf.dtypes.as_dtype(proto.dtype) == spec.dtype
        assert len(proto.tensor_shape.dim) == spec.shape.rank
    result = fn(**{k: tf.constant(tf.make_ndarray(v)) for k, v in received.inputs.items()})
    for key in received.output_filter:
        np.testing.assert_array_equal(result[key].numpy(), out[f"encoded/{key}"])


def readme_block(first_line: str) -> str:
    """The README's code from `first_line` to the end of its fenced block."""
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    start = readme.index(first_line)
    return readme[start:readme.index("```", start)]


def _from_rest_json(value):
    """TF Serving's JSON -> tensor rule for binary data: {"b64": ...} is bytes."""
    if isinstance(value, dict):
        return base64.b64decode(value["b64"])
    return [_from_rest_json(v) for v in value]


@pytest.fixture
def readme_files(exported, fresh_outputs, tmp_path):
    """A folder with the README's file names holding the encoded case's images (the
    decoder reads the format from the bytes, PNG here)."""
    _, paths, _ = fresh_outputs
    for readme_name, ours in (("photo1.jpg", "q0"), ("photo2.jpg", "q1"), ("reference.jpg", "s"),
                              ("reference_mask.png", "mask")):
        (tmp_path / readme_name).write_bytes(open(paths[ours], "rb").read())
    return tmp_path


@pytest.mark.slow
def test_readme_rest_request_against_a_stand_in_server(loaded, fresh_outputs, readme_files):
    """The README's REST lines (heredoc with base64, curl, reading the answer) run as
    written against a stand-in for TF Serving's REST predict API that turns the JSON
    into tensors as TF Serving does ({"b64": ...} -> bytes), runs the signature and
    answers {"outputs": ...}."""
    _, _, out = fresh_outputs
    requests = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            requests.append((self.path, body))
            fn = loaded.signatures[body.get("signature_name", "serving_default")]
            result = fn(**{k: tf.constant(_from_rest_json(v)) for k, v in body["inputs"].items()})
            payload = json.dumps({"outputs": {k: v.numpy().tolist() for k, v in result.items()}})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(payload.encode())

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        commands = readme_block("cat > request.json <<EOF").replace(
            "localhost:8501", f"127.0.0.1:{server.server_address[1]}")
        result = subprocess.run(["bash", "-e", "-c", commands], cwd=str(readme_files),
                                capture_output=True, text=True, timeout=120)
    finally:
        server.shutdown()
    assert result.returncode == 0, result.stderr
    (path, body), = requests
    assert path == "/v1/models/popnet:predict"
    assert set(body["inputs"]) == set(serving.INPUT_NAMES)
    with open(readme_files / "response.json") as f:
        outputs = json.load(f)["outputs"]
    for key in serving.OUTPUT_NAMES:
        np.testing.assert_allclose(np.array(outputs[key]), out[f"encoded/{key}"], atol=1e-6)
    assert result.stdout.strip() == f"{[0, 5, 9, 200]} {[[64, 64], [32, 64]]}"


@pytest.mark.slow
def test_readme_grpc_request_against_a_stand_in_server(loaded, fresh_outputs, readme_files,
                                                       monkeypatch):
    """The README's gRPC client code runs as written against a stand-in
    PredictionService (tensorflow-serving-api's own servicer base) that unpacks the
    request's tensors with tf.make_ndarray, runs the signature and packs the filtered
    outputs, as TF Serving does."""
    _, _, out = fresh_outputs
    seen = []

    class Servicer(prediction_service_pb2_grpc.PredictionServiceServicer):
        def Predict(self, request, context):
            seen.append(request)
            fn = loaded.signatures[request.model_spec.signature_name]
            assert set(request.inputs) == set(fn.structured_input_signature[1])
            result = fn(**{k: tf.constant(tf.make_ndarray(v)) for k, v in request.inputs.items()})
            response = predict_pb2.PredictResponse()
            for key in request.output_filter or result:
                response.outputs[key].CopyFrom(tf.make_tensor_proto(result[key].numpy()))
            return response

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    prediction_service_pb2_grpc.add_PredictionServiceServicer_to_server(Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        code = readme_block("import grpc\n").replace("localhost:8500", f"127.0.0.1:{port}")
        monkeypatch.chdir(readme_files)
        namespace = {}
        exec(compile(code, "README.md (gRPC example)", "exec"), namespace)
    finally:
        server.stop(None)
    request, = seen
    assert request.model_spec.name == "popnet" and list(request.output_filter) == [
        "labels", "class_values", "image_sizes"]
    np.testing.assert_array_equal(namespace["labels"], out["encoded/labels"])
    np.testing.assert_array_equal(namespace["sizes"], out["encoded/image_sizes"])


# ----------------------------------------------------------------------------- bad requests
@pytest.mark.parametrize("mask_values, values, message", [
    ("user", (0, 255), "no foreground"),
    ("user", tuple(range(1, 13)), "more classes than the 11 the model has"),
    ("user", (3, 256), "values must lie in 0..255"),
    ("user", (3, -1), "values must lie in 0..255"),
    ("merged", (3, 12), "merged ATR-OS ids 0..11"),
])
def test_bad_support_masks(mask_values, values, message):
    mask = np.zeros((32, 32), np.int32)
    for i, v in enumerate(values):
        mask[i * 2:(i + 1) * 2] = v
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        serving.class_mapping(tf.constant(mask), 12, mask_values)


@pytest.mark.parametrize("pixels, message", [
    (np.full((4, 4, 3), 0.5), "looks normalised"),       # float image from 0..1 tools
    (np.linspace(-1.0, 1.0, 48).reshape(4, 4, 3), "looks normalised"),
    (np.linspace(-124.0, 131.0, 48).reshape(4, 4, 3), "must hold RGB pixel values in 0..255"),  # mean subtracted
    (np.full((4, 4, 3), 4095.0), "must hold RGB pixel values in 0..255"),              # 12/16-bit data
    (np.linspace(-2.1, 2.6, 48).reshape(4, 4, 3), "looks normalised"),  # standardised
    (np.array([[[np.nan, 0.0, 3.0]]]), "holds NaN or infinite values"),
    (np.array([[[np.inf, 0.0, 3.0]]]), "holds NaN or infinite values"),
])
def test_decoded_pixels_outside_0_255_are_refused(pixels, message):
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        serving.check_pixels(tf.constant(pixels, tf.float32), "query_images")


@pytest.mark.parametrize("pixels", [
    np.zeros((4, 4, 3)),                       # a black image
    np.ones((4, 4, 3)),                        # nearly black, but whole numbers: 0..255 data
    np.full((4, 4, 3), 255.0),
    np.full((4, 4, 3), 127.5),                 # resized pixels are fractional, and fine
    np.array([[[-9.5, 0.0, 264.25]]]),         # bicubic overshoot at an edge
    np.zeros((0, 4, 4, 3)),                    # empty: the query count check names it
    np.zeros((2, 0, 4, 3)),                    # no pixels: nothing to check
])
def test_decoded_pixels_in_0_255_pass(pixels):
    serving.check_pixels(tf.constant(pixels, tf.float32), "query_images")


def test_one_normalised_image_in_a_batch_is_named():
    """Checked image by image: one 0..1 image among 0..255 ones is found and named."""
    batch = np.full((3, 4, 4, 3), 90.0, np.float32)
    batch[1] = np.linspace(0.0, 1.0, 48).reshape(4, 4, 3)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"(?s)query_images\[1\].*looks normalised"):
        serving.check_pixels(tf.constant(batch), "query_images")
    serving.check_pixels(tf.constant(batch[[0, 2]]), "query_images")


def test_bicubic_resampling_of_a_photo_passes():
    """The slack covers what a user's resize does to a real 0..255 image."""
    edges = np.zeros((32, 32, 3), np.float32)
    edges[:, ::2] = 255.0                      # the sharpest edges there are
    for method in ("bicubic", "lanczos3", "lanczos5", "mitchellcubic"):
        resized = tf.image.resize(edges[None], [45, 45], method=method)
        serving.check_pixels(resized, "query_images")


@pytest.mark.slow
def test_served_model_reports_bad_requests(loaded):
    """The checks survive export: the served signature answers InvalidArgument with them."""
    fn = loaded.signatures["parse_images"]
    with pytest.raises(tf.errors.InvalidArgumentError, match="no foreground"):
        fn(query_images=tf.zeros([1, 16, 16, 3]), support_image=tf.zeros([8, 8, 3]),
           support_mask=tf.fill([8, 8], 255))
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="support_mask must have the height and width of support_image"):
        fn(query_images=tf.zeros([1, 16, 16, 3]), support_image=tf.zeros([32, 32, 3]),
           support_mask=tf.ones([32, 30], tf.int32))
    with pytest.raises(tf.errors.InvalidArgumentError, match="query_images is empty"):
        fn(query_images=tf.zeros([0, 16, 16, 3]), support_image=tf.zeros([8, 8, 3]),
           support_mask=tf.ones([8, 8], tf.int32))
    # Pixels scaled to 0..1 would give wrong labels silently: refused, naming the input.
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"(?s)query_images\[0\].*looks normalised"):
        fn(query_images=tf.fill([1, 16, 16, 3], 0.4), support_image=tf.fill([8, 8, 3], 90.0),
           support_mask=tf.ones([8, 8], tf.int32))
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"(?s)support_image.*must hold RGB pixel values in 0..255"):
        fn(query_images=tf.fill([1, 16, 16, 3], 90.0), support_image=tf.fill([8, 8, 3], -100.0),
           support_mask=tf.ones([8, 8], tf.int32))
    # The encoded signature names the input that cannot be decoded.
    encoded = loaded.signatures["serving_default"]
    photo = png_bytes(np.full((8, 8, 3), 90))
    mask = png_bytes(np.ones((8, 8)), "L")
    for queries, support, message in [
            ([photo, b"not an image"], photo, r"query_images\[1\] is not a JPEG, PNG, GIF, BMP or WebP file"),
            ([b"", photo], photo, r"query_images\[0\] is empty"),
            ([photo], b"", r"support_image is empty")]:
        with pytest.raises(tf.errors.InvalidArgumentError, match=message):
            encoded(query_images=tf.constant(queries), support_image=tf.constant(support),
                    support_mask=tf.constant(mask))


@pytest.mark.parametrize("kind, message", [
    ("palette", "(?s)colour type.*3"),
    ("rgb", "(?s)colour type.*2"),
    ("jpeg", "not a PNG"),
    ("short", "not a PNG"),
])
def test_encoded_mask_must_be_grayscale_png(kind, message):
    """A palette/RGB PNG would decode to colours or luminance, not class values."""
    mask = np.zeros((8, 8), np.uint8)
    mask[:4] = 3
    if kind == "palette":
        data = png_bytes(mask, "P")
    elif kind == "rgb":
        data = png_bytes(np.stack([mask] * 3, -1))
    elif kind == "jpeg":
        buf = io.BytesIO()
        Image.fromarray(mask, "L").save(buf, format="JPEG")
        data = buf.getvalue()
    else:
        data = b"\x89P"
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        serving.decode_mask_png(tf.constant(data))


def test_decode_mask_png_keeps_values():
    mask = np.random.default_rng(2).choice([0, 1, 77, 254, 255], size=(9, 13)).astype(np.uint8)
    np.testing.assert_array_equal(serving.decode_mask_png(tf.constant(png_bytes(mask, "L"))), mask)


def test_serving_imports_no_training_code():
    code = ("import sys, popnet_tf.serving\n"
            "bad = [m for m in ('popnet_tf.train_lib', 'popnet_tf.eval_lib', 'popnet_tf.data.episodes',"
            " 'popnet_tf.export_lib') if m in sys.modules]\n"
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


def test_class_mapping_numpy_reference():
    rng = np.random.default_rng(5)
    mask = rng.choice([0, 17, 42, 254, 255], size=(20, 30))
    slot_mask, values, slots = serving.class_mapping(tf.constant(mask, tf.int32), 12)
    expected = np.select([mask == 17, mask == 42, mask == 254], [1, 2, 3], mask)
    np.testing.assert_array_equal(slot_mask.numpy(), expected)
    np.testing.assert_array_equal(values.numpy(), [0, 17, 42, 254])
    np.testing.assert_array_equal(slots.numpy(), [0, 1, 2, 3])
    slot_mask, values, slots = serving.class_mapping(tf.constant([[0, 7], [2, 255]]), 12, "merged")
    np.testing.assert_array_equal(slot_mask.numpy(), [[0, 7], [2, 255]])
    np.testing.assert_array_equal(values.numpy(), [0, 2, 7])
    np.testing.assert_array_equal(slots.numpy(), [0, 2, 7])


def test_fit_and_pad_geometry():
    """Long side to E, short side rounded half up, antialiased shrink, padding
    bottom/right with 0."""
    image = np.random.default_rng(1).uniform(0, 255, (30, 100, 3)).astype(np.float32)
    padded, valid = serving.fit_and_pad(image, 64)
    np.testing.assert_array_equal(valid.numpy(), [19, 64])  # 30*64/100 = 19.2
    expected = tf.image.resize(image, (19, 64), method="bilinear", antialias=True).numpy()
    np.testing.assert_allclose(padded.numpy()[:19], expected, atol=1e-4)
    assert np.all(padded.numpy()[19:] == 0)
    batch, valid = serving.fit_and_pad(np.stack([image, image]), 64)
    np.testing.assert_allclose(batch.numpy()[1], padded.numpy(), atol=1e-6)


@pytest.fixture(scope="module")
def stage2():
    """A random-weight smoke stage 2 (5 classes: 4 slots), stage 1 inside."""
    config = synthetic_cpu.get_config("smoke")
    keras.utils.set_random_seed(11)
    s1 = popnet.build_stage(config, 1)
    popnet.build_variables(s1, 1, config.data.crop_size)
    s2 = popnet.build_stage(config, 2, previous=s1)
    popnet.build_variables(s2, 2, config.data.crop_size)
    return s2


def test_mean_head_and_stage2_slots(stage2):
    """head="mean" serves (AGM + NCM) / 2 of the Keras model; stage 2 has 4 class slots."""
    E = 32
    rng = np.random.default_rng(4)
    queries = rng.uniform(0, 255, (1, E, E, 3)).astype(np.float32)
    support = rng.uniform(0, 255, (E, E, 3)).astype(np.float32)
    mask = block_mask((E, E), (20, 40), seed=5)
    fn = serving.OneShotParser(stage2, E, head="mean").function(serving.SIGNATURE_IMAGES)
    out = fn(queries, support, mask)
    slot_mask = np.select([mask == 20, mask == 40], [1, 2], mask)
    batch = {"query_image": queries, "support_image": support[None], "support_mask": slot_mask[None]}
    static, presence = stage2.support_prototypes(batch["support_image"], batch["support_mask"])
    features = stage2.infused_features(queries)
    ref = stage2.heads(features, static, presence, queries, compute_agm=True)
    probs = 0.5 * (ref["agm_probs"].numpy() + ref["ncm_probs"].numpy())
    np.testing.assert_allclose(out["probabilities"].numpy(), probs[..., :3], atol=TOL)
    np.testing.assert_array_equal(out["class_values"].numpy(), [0, 20, 40])
    five = np.zeros((E, E), np.int32)
    five[:5] = np.arange(1, 6)[:, None]
    with pytest.raises(tf.errors.InvalidArgumentError, match="more classes than the 4 the model has"):
        fn(queries, support, five)


def test_foreground_gate_serves_gated_probabilities(stage2):
    """foreground_gate=True serves the NCM probabilities gated by stage 1's human
    probability (stages.gate_by_foreground); a baseline without stage 1 is refused."""
    from popnet_tf.models.stages import gate_by_foreground

    E = 32
    rng = np.random.default_rng(6)
    queries = rng.uniform(0, 255, (2, E, E, 3)).astype(np.float32)
    support = rng.uniform(0, 255, (E, E, 3)).astype(np.float32)
    mask = block_mask((E, E), (20, 40), seed=7)
    plain = serving.OneShotParser(stage2, E).function(serving.SIGNATURE_IMAGES)
    gated = serving.OneShotParser(stage2, E, foreground_gate=True).function(serving.SIGNATURE_IMAGES)
    ncm = plain(queries, support, mask)["probabilities"].numpy()  # [N, E, E, 3]: bg, 20, 40
    stage1 = stage2.previous
    human = stage1(queries, training=False)["probs"].numpy()[..., 1:]
    expected = np.asarray(gate_by_foreground(ncm, human))
    np.testing.assert_allclose(gated(queries, support, mask)["probabilities"].numpy(), expected,
                               atol=TOL)
    assert not np.allclose(expected, ncm, atol=1e-3)  # the random stage 1 is far from 0 and 1
    with pytest.raises(ValueError, match="foreground_gate needs a POPNet stage"):
        serving.OneShotParser(object.__new__(type("Baseline", (), {"num_classes": 12})), E,
                              foreground_gate=True)


def test_stale_temporaries_of_killed_exports_are_removed(tmp_path):
    """A killed export leaves `.tmp-<version>-<pid>`; the next export removes it, but not
    a folder of a running process or anything else."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".tmp-4-{dead.pid}"
    running = tmp_path / f".tmp-5-{os.getpid()}"
    other = tmp_path / ".tmp-notes"
    for path in (stale, running, other, tmp_path / "3"):
        path.mkdir()
    (stale / "saved_model.pb").write_bytes(b"half")
    removed = export_lib.remove_stale_temporaries(str(tmp_path))
    assert removed == [str(stale)]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [running.name, other.name, "3"])


# ----------------------------------------------------------------------------- audit B
@pytest.fixture(scope="module")
def fake_workdir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("damaged") / "work")
    make_workdir(path)
    return path


def _copy_workdir(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return str(dst)


def test_damaged_checkpoint_is_one_line_error(fake_workdir, tmp_path):
    workdir = _copy_workdir(fake_workdir, tmp_path / "work")
    latest = tf.train.latest_checkpoint(train_lib.checkpoint_dir(workdir, 3))
    data = latest + ".data-00000-of-00001"
    with open(data, "rb") as f:
        head = f.read(1000)
    with open(data, "wb") as f:
        f.write(head)  # truncated, as by a full disk or an interrupted copy
    with pytest.raises(ValueError) as error:
        export_lib.export_saved_model(workdir, str(tmp_path / "out"))
    text = str(error.value)
    assert text.startswith(f"{latest}: cannot restore stage 3 from this checkpoint") and "\n" not in text
    assert not os.path.exists(tmp_path / "out" / "1")


def test_latest_stage3_checkpoint_missing_files_does_not_fall_back_to_stage2(fake_workdir, tmp_path):
    workdir = _copy_workdir(fake_workdir, tmp_path / "work")
    latest = tf.train.latest_checkpoint(train_lib.checkpoint_dir(workdir, 3))
    os.remove(latest + ".index")
    with pytest.raises(ValueError, match="the latest stage 3 checkpoint .* has missing or incomplete"):
        export_lib.last_trained_stage(workdir)
    # Without stage 3 at all, stage 2 is the last trained one, as before.
    import shutil
    shutil.rmtree(train_lib.stage_dir(workdir, 3))
    assert export_lib.last_trained_stage(workdir) == 2


def test_out_that_cannot_be_a_folder_is_refused_before_the_restore(tmp_path, monkeypatch):
    blocker = tmp_path / "taken"
    blocker.write_text("a file")
    for out in (blocker, blocker / "sub"):
        # No workdir at all: the out folder is checked first, before the slow restore.
        with pytest.raises(NotADirectoryError, match=f"{blocker} is a file, not a folder"):
            export_lib.export_saved_model(str(tmp_path / "no_workdir"), str(out))
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # as a non-root user sees it
    with pytest.raises(PermissionError, match="is not writable"):
        export_lib.export_saved_model(str(tmp_path / "no_workdir"), str(tmp_path / "models"))


def test_cli_unusable_out_is_one_line(tmp_path):
    blocker = tmp_path / "taken"
    blocker.write_text("a file")
    result = subprocess.run([sys.executable, "-m", "popnet_tf.export", "--workdir", str(tmp_path),
                             "--out", str(blocker / "sub")], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {blocker / 'sub'}: cannot export there: {blocker} is a file, not a folder")


def test_default_version_skips_a_file_of_that_name(tmp_path):
    (tmp_path / "1").mkdir()
    (tmp_path / "2").write_text("not a version, but the name is taken")
    assert export_lib._version_dir(str(tmp_path), None) == (3, str(tmp_path / "3"))
    with pytest.raises(FileExistsError, match="version 2 exists"):
        export_lib._version_dir(str(tmp_path), 2)


@pytest.mark.parametrize("mode", ["P", "1", "RGB", "RGBA"])
def test_served_decoder_refuses_bmps_it_would_misread(mode):
    # TensorFlow reads an 8-bit palette BMP's indices as grey levels: refused, not misread.
    rgb = np.arange(6 * 10 * 3, dtype=np.uint8).reshape(6, 10, 3)
    image = Image.fromarray(rgb).convert(mode)
    if mode == "P":
        image.putpalette(np.random.default_rng(5).integers(0, 256, 768).tolist())
    buf = io.BytesIO()
    image.save(buf, format="BMP")
    decode = tf.function(serving.decode_image, input_signature=[tf.TensorSpec([], tf.string)])
    if mode in ("RGB", "RGBA"):
        np.testing.assert_array_equal(decode(buf.getvalue()).numpy(),
                                      np.asarray(image.convert("RGB")))
    else:
        with pytest.raises(tf.errors.InvalidArgumentError, match="a BMP image must have 24 or 32 bits"):
            decode(buf.getvalue())


def test_cli_error_line_of_system_and_own_errors():
    from popnet_tf import export as export_cli
    assert export_cli._one_line(FileExistsError(17, "File exists", "/m/1")) == "/m/1: File exists"
    assert export_cli._one_line(PermissionError(13, "Permission denied")) == "Permission denied"
    assert export_cli._one_line(FileExistsError("version 2 exists")) == "version 2 exists"
    assert export_cli._one_line(ValueError("stage must be 2 or 3")) == "stage must be 2 or 3"


def test_export_records_the_checkpoint_it_restored_while_a_training_saves(exported, tmp_path,
                                                                          monkeypatch):
    """The export's popnet_export.json named the latest checkpoint read after the restore:
    a save landing during the restore was recorded, another checkpoint exported."""
    work = str(tmp_path / "work")
    shutil.copytree(exported["workdir"], work)
    directory = train_lib.checkpoint_dir(work, 3)
    restore, restored, written = train_lib.restore_stage, [], []

    def restore_while_a_training_saves(*args, **kwargs):
        model = restore(*args, **kwargs)
        latest = tf.train.latest_checkpoint(directory)
        restored.append(latest if "checkpoint" not in kwargs else kwargs["checkpoint"])
        newer = f"{latest}0"  # a newer checkpoint appears, and the state file names it
        for path in tf.io.gfile.glob(f"{latest}.*"):
            shutil.copy(path, newer + path[len(latest):])
        tf.compat.v1.train.update_checkpoint_state(directory, newer,
                                         all_model_checkpoint_paths=[latest, newer])
        return model

    monkeypatch.setattr(train_lib, "restore_stage", restore_while_a_training_saves)
    monkeypatch.setattr(export_lib, "write_version",
                        lambda parser, out, version=None, info=None: written.append(info))
    export_lib.export_saved_model(work, str(tmp_path / "models"))
    assert written[0]["checkpoint"] == restored[0] != tf.train.latest_checkpoint(directory)


# ----------------------------------------------------------------------------- audit K
@pytest.mark.parametrize("name", ["sgone", "panet", "amp", "finetune"])
def test_baselines_are_refused_by_the_parser(name):
    """Serving runs POPNet's store and heads; a baseline has neither (its probabilities are
    "probs", PANet's and AMP's prototypes are not plain pooling, Fine-tune tunes on each
    support), so it is refused up front rather than failing while tracing (KeyError)."""
    import importlib

    config = importlib.import_module(f"configs.baselines.{name}").get_config("smoke")
    model = popnet.build_stage(config, 3)
    for head in ("ncm", "agm", "mean"):
        with pytest.raises(ValueError, match=f"the {name} baseline cannot be exported or served"):
            serving.OneShotParser(model, config.data.eval_size, head=head)


def test_baseline_workdir_export_and_predict_are_one_line_errors(tmp_path):
    """A baseline's workdir: export (default head, the config's "model", and --head ncm,
    which used to end in a KeyError traceback) and predict say what is wrong."""
    from configs.baselines import panet
    from popnet_tf import predict_lib

    config = panet.get_config("smoke")
    workdir = str(tmp_path / "work")
    keras.utils.set_random_seed(7)
    model = popnet.build_stage(config, 3)
    popnet.build_variables(model, 3, config.data.crop_size)
    tf.train.Checkpoint(model=model).save(os.path.join(train_lib.checkpoint_dir(workdir, 3), "ckpt"))
    train_lib.write_json_atomic(os.path.join(train_lib.stage_dir(workdir, 3), "result.json"),
                                {"stage": 3})
    train_lib.write_json_atomic(os.path.join(workdir, "run.json"),
                                {"fold": 1, "fold_set": "paper", "config": config.to_dict()})
    for head in (None, "ncm"):
        with pytest.raises(ValueError, match="the panet baseline cannot be exported or served"):
            export_lib.export_saved_model(workdir, str(tmp_path / "out"), head=head)
    assert not os.path.exists(tmp_path / "out")
    with pytest.raises(ValueError, match="the panet baseline cannot be exported or served"):
        predict_lib.load_predictor(workdir, head="ncm")


def test_served_labels_are_evaluations_predictions(exported):
    """The same (query, support) pair through evaluate's own code (the dataset's decoding
    and eval_resize, `test_prototypes`, the k-way scorer, the crop and resize to the label)
    and through `serving_default` (JPEG bytes, a merged-id mask): the same label map. With
    merged ids the base classes use the dynamic store as evaluate does; with a user's own
    values (here the merged ids + 100) the static prototypes, as a store-less evaluation."""
    from popnet_tf import eval_lib
    from popnet_tf.data import episodes

    model, E = exported["model"], exported["E"]
    rng = np.random.default_rng(11)

    def jpeg(h, w):
        small = rng.uniform(0, 255, (h // 8, w // 8, 3))
        image = tf.image.resize(small, (h, w), method="bilinear").numpy().astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, format="JPEG", quality=90)
        return buf.getvalue()

    query, support = jpeg(90, 60), jpeg(56, 88)
    mask = block_mask((56, 88), (*SEEN_BASE, 5, 9), seed=12)
    table = classes.merged_to_stage_table(3)

    def example(data, label):
        return episodes._eval_example({"image": tf.io.decode_jpeg(data, channels=3),
                                       "mask": tf.constant(label, tf.uint8), "source_id": "x"},
                                      table, E)

    s, q = example(support, mask), example(query, np.zeros((90, 60), np.uint8))
    for mask_values, offset, dynamic in (("merged", 0, True), ("user", 100, False)):
        static, presence = model.support_prototypes(s["image"][None], s["mask"][None])
        prototypes = model.store(static, presence, training=False, use_dynamic=dynamic)
        probs = eval_lib._kway_scorer(model, "ncm")(q["image"][None], prototypes, presence)
        expected, _ = eval_lib._example_pair(probs[0, 0], q["valid_size"], q["label"], presence[0])
        user_mask = np.where((mask > 0) & (mask < 255), mask + offset, mask)
        fn = serving.OneShotParser(model, E, mask_values).function(serving.SIGNATURE_ENCODED)
        out = fn(query_images=tf.constant([query]), support_image=tf.constant(support),
                 support_mask=tf.constant(png_bytes(user_mask)))
        labels = out["labels"].numpy()[0]
        expected = np.where(expected.numpy() > 0, expected.numpy() + offset, 0)
        assert labels.shape == (90, 60)
        assert np.mean(labels != expected) <= 1 / 90 / 60, mask_values  # a tie at most
        np.testing.assert_array_equal(out["class_values"], [0] + [v + offset for v in (*SEEN_BASE, 5, 9)])


def test_metadata_records_the_precision_exported(exported):
    """The export record names the dtype policy traced into the SavedModel (float32 for
    the smoke config; mixed_bfloat16 for an "auto" training exported on a bfloat16 machine)."""
    for name in ("user", "merged"):
        meta = serving.read_metadata(exported[name])
        assert meta["precision"] == exported["model"].dtype_policy.name == "float32", name
