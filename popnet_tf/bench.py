r"""Benchmarks (not tests): how fast popnet_tf trains and parses on this machine (issue #6).

    python -m popnet_tf.bench --out docs/bench.json --markdown docs/PERFORMANCE.md

Sections (`--only`, comma-separated; default all). Every time is a median over
`--repeats` timed runs after warm-up (`--model_repeats`, `--model_warmup` for
the model sections), each run with the 1-minute load average beside it: on a
shared machine a figure taken under load is an upper bound. Process CPU time is
reported too; it shows the work done whatever the load.

- peak: the fp32 matrix-multiply peak of this machine, measured in this run
  (median GFLOP/s of a `--matmul_size`³ `tf.linalg.matmul`), against which the
  achieved FLOP/s of the other sections are compared.
- conv: the convolutions of the 512x512 model, fp32, batch 2, forward and
  forward+backward (median of `--repeats` after 2 warm-up calls): the dense ones
  (Xception middle-flow pointwise 1x1 728->728 and ASPP 1x1 2048->256 at 32x32,
  decoder 3x3 304->256 and AGM/decoder 3x3 256->256 at 128x128), and, not dense,
  the first Xception conv (3x3 stride 2, 3->32, 512x512) and a depthwise 3x3
  (728 channels, 32x32). FLOPs from the formula (`conv_flops`), GFLOP/s and
  fraction of the matmul peak per shape, and of the dense shapes together
  (their total FLOPs / total time): the issue's 75 % target where the work is
  dense convolution.
- data: training episodes/s of `episodes.train_episodes` (stage 3, fold 1,
  k-way, batch 2) at 512x512 (ATR's own size) and at the CPU config's size
  (`configs/synthetic_cpu.py`: long side resized, then cropped). Median over
  `--repeats` timed runs of `--steps` batches each, after `--warmup` batches;
  also the process CPU time per episode. Needs a built dataset (`--data`);
  without one the section is reported "not measured".
- flops: FLOPs counted from the graph (TensorFlow's profiler, with the shapes
  the graph ran with where they are only known at run time: the AGM batch of
  present classes; only the ops the runtime runs, not the gradients a tape
  builds toward the frozen KIM stages, which nothing fetches; each conv
  gradient counted as its forward, 2 k² C_in per output-gradient value, where
  TensorFlow's count is wrong for "valid" padding: the small backbone's atrous
  ASPP): one encoder pass (one image), one inference episode (one query and
  its support) with NCM prediction (the default) and with the AGM head over 11
  classes (the reference's work), and one training step. MACs = FLOPs / 2.
- train: seconds per step and episodes/s of the real training step
  (`train_lib.make_train_step`), and the process's peak memory.
- infer: the served path (`serving.OneShotParser`, NCM head): latency of one
  query with its support (11 classes present), and queries/s for
  `--queries` queries sharing one support (one request: the support's
  features are computed once).

Model settings (`--settings`), random weights (speed does not depend on them),
stage 3 (12 classes; training episodes hold the 8 base classes of fold 1):
- oneshot: `configs/paper.py` with `model.kim=False`: one one-shot stage,
  DeepLab v3+ Xception OS16, K = 256, AGM with two 3x3 convs, 512x512, batch
  2: the configuration of the authors' PyTorch reference.
- paper: `configs/paper.py`: stage 3 with stages 1 and 2 frozen inside (KIM).
- cpu: `configs/synthetic_cpu.py`: the small-backbone CPU configuration.

Each model measurement runs in a child process, so its peak memory
(`ru_maxrss`) is its own, and thread settings (`--intra_threads`,
`--inter_threads`) and oneDNN (`--onednn`) apply to it from the start.
`--quick` shrinks every setting to a seconds-long size and runs everything in
this process (the sections then share each model and its traced step): it
checks that the code runs, in under a minute, and measures no target.

The report (`--out`, JSON) holds the machine, every section's figures with
their runs, and `derive`: achieved FLOP/s and fraction of the matmul peak, the
issue's targets (met / not met / not measured, and why) and the GPU rows.
`--markdown FILE` writes its Markdown between the `<!-- bench:begin -->` and
`<!-- bench:end -->` lines of FILE and keeps the rest (the hand-written
"Changes and their effect"); `--summary JSON` makes it from a saved report
(measuring nothing; `--only` does not apply). `--merge` updates the report
already at `--out` with only what this run measures (`merge_reports`), e.g. the
flops section of one setting, and keeps every other figure.

Example:
    $ python -m popnet_tf.bench --quick --out /tmp/bench.json --markdown /tmp/PERF.md
    $ python -m popnet_tf.bench --only data --data tfrecords/synthetic
    data 512x512: 104.2 episodes/s (median of 5), 17.9 ms CPU per episode (load 1.5)
    $ python -m popnet_tf.bench --only peak,train --settings oneshot --out train.json
    $ python -m popnet_tf.bench --only peak,conv,flops --out docs/bench.json --merge \
          --markdown docs/PERFORMANCE.md
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (config module, overrides, what it is) of the model sections.
MODEL_SETTINGS = {
    "oneshot": ("configs.paper", {"model.kim": False},
                "one one-shot stage (no KIM), Xception DeepLab v3+, K=256, AGM 2x3x3 convs "
                "(the reference's configuration)"),
    "paper": ("configs.paper", {}, "configs/paper.py stage 3, stages 1-2 frozen inside (KIM)"),
    "cpu": ("configs.synthetic_cpu", {}, "configs/synthetic_cpu.py stage 3 (small backbone, KIM, batch 8, its train.mixed_precision: bfloat16 where native)"),
}
# --quick: every setting at a seconds-long size (model code paths unchanged).
QUICK_OVERRIDES = {"model.backbone": "small", "model.filters": 16, "model.aspp_filters": 16,
                   "model.low_level_filters": 8, "model.aspp_rates": (2, 4, 6),
                   "data.crop_size": 32, "train.batch_size": 2}
# --quick's default settings: with quick sizes "cpu" is "paper" but for the AGM's
# trunk (0 hidden convs), and every setting costs seconds of tracing.
QUICK_SETTINGS = ("oneshot", "paper")
STAGE = 3
FOLD = 1


# ----------------------------------------------------------------------------- helpers
def _load() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def _time_calls(fn, warmup: int, repeats: int) -> dict:
    """Wall and process-CPU seconds of `fn()`: the first call (tracing included),
    `warmup - 1` more untimed calls, then the median of `repeats` timed ones."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    for _ in range(max(warmup, 1) - 1):
        fn()
    runs = []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        runs.append({"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu,
                     "load_1min": _load()})
    return {"wall_s": statistics.median(r["wall_s"] for r in runs),
            "cpu_s": statistics.median(r["cpu_s"] for r in runs),
            "load_1min": statistics.median(r["load_1min"] for r in runs),
            "first_call_s": first, "warmup": max(warmup, 1), "repeats": repeats, "runs": runs}


def _peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux: ru_maxrss in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def machine() -> dict:
    """What the figures were measured on."""
    info = {"cpus": os.cpu_count(), "cpu_model": _cpu_model(), "platform": platform.platform(),
            "python": platform.python_version(), "load_average": list(os.getloadavg()),
            "TF_ENABLE_ONEDNN_OPTS": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "(unset)")}
    try:
        import keras
        import tensorflow as tf

        info.update(tensorflow=tf.__version__, keras=keras.__version__,
                    gpus=[d.name for d in tf.config.list_physical_devices("GPU")])
    except ImportError:  # pragma: no cover - TensorFlow is a dependency
        pass
    return info


# ----------------------------------------------------------------------------- children
# TF_ENABLE_ONEDNN_OPTS of the child processes (read when TensorFlow is imported).
# TensorFlow turns oneDNN on by default only on some CPUs (AVX-512 VNNI/BF16 or AMX;
# the project's AMD EPYC has it on): "on" makes every machine measure with it, so
# figures compare; "off" measures without it.
ONEDNN = {"on": "1", "off": "0", "inherit": None}
_onednn = "on"


def set_onednn(mode: str) -> None:
    """oneDNN in the child processes: "on" (default), "off", or "inherit" this
    process's TF_ENABLE_ONEDNN_OPTS."""
    global _onednn
    if mode not in ONEDNN:
        raise ValueError(f"onednn must be one of {sorted(ONEDNN)}, got {mode!r}")
    _onednn = mode


def _in_child(function: str, threads: tuple[int, int] = (0, 0), in_process: bool = False,
              **kwargs) -> dict:
    """Runs `bench.<function>(**kwargs)` in a fresh Python process and returns its
    result dict, with the child's peak memory ("peak_rss_mb") added by the child.

    `threads` = (intra-op, inter-op) TensorFlow threads, 0 = TensorFlow's default.
    `in_process=True` calls it in this process instead (`--quick`: a child costs a
    TensorFlow import, seconds; its peak memory is then this process's so far, and
    `threads` and oneDNN are this process's).
    """
    from absl import logging

    if in_process:
        result = globals()[function](**kwargs)
        result.setdefault("peak_rss_mb", _peak_rss_mb())
        result["in_process"] = True
        return result

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        code = "import sys; from popnet_tf import bench; bench._child_main(*sys.argv[1:])"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_REPO, env.get("PYTHONPATH")) if p)
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        if ONEDNN[_onednn] is not None:
            env["TF_ENABLE_ONEDNN_OPTS"] = ONEDNN[_onednn]
        args = [sys.executable, "-c", code, function, json.dumps(kwargs), out,
                str(threads[0]), str(threads[1])]
        logging.info("bench: %s(%s) in a child process", function, kwargs)
        proc = subprocess.run(args, cwd=_REPO, env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not os.path.exists(out):
            tail = "\n".join((proc.stderr or "").strip().splitlines()[-15:])
            raise RuntimeError(f"popnet_tf/bench.py: {function}({kwargs}) failed in its child "
                               f"process (exit status {proc.returncode}):\n{tail}")
        with open(out) as f:
            return json.load(f)


def _child_main(function: str, kwargs_json: str, out: str, intra: str = "0", inter: str = "0"):
    """Entry point of a child process (see `_in_child`)."""
    import tensorflow as tf

    if int(intra):
        tf.config.threading.set_intra_op_parallelism_threads(int(intra))
    if int(inter):
        tf.config.threading.set_inter_op_parallelism_threads(int(inter))
    result = globals()[function](**json.loads(kwargs_json))
    result.setdefault("peak_rss_mb", _peak_rss_mb())
    result["TF_ENABLE_ONEDNN_OPTS"] = os.environ.get("TF_ENABLE_ONEDNN_OPTS", "(unset)")
    result["threads"] = {"intra_op": tf.config.threading.get_intra_op_parallelism_threads(),
                         "inter_op": tf.config.threading.get_inter_op_parallelism_threads()}
    with open(out, "w") as f:
        json.dump(result, f)


# ----------------------------------------------------------------------------- models
def load_config(setting: str, quick: bool = False):
    """The config of a `MODEL_SETTINGS` entry (with `QUICK_OVERRIDES` if quick)."""
    import importlib

    if setting not in MODEL_SETTINGS:
        raise ValueError(f"unknown model setting {setting!r}; choose from {sorted(MODEL_SETTINGS)}")
    module, overrides, _ = MODEL_SETTINGS[setting]
    config = importlib.import_module(module).get_config()
    for key, value in {**overrides, **(QUICK_OVERRIDES if quick else {})}.items():
        section, name = key.split(".")
        config[section][name] = value
    return config


def build_model(config, stage: int = STAGE):
    """The stage model with the stages it needs (frozen inside), random weights, in the
    config's precision as training would use it (`train.mixed_precision`, "auto" resolved
    for this machine: the CPU config runs bfloat16 where the CPU computes it natively)."""
    import keras

    from popnet_tf import train_lib
    from popnet_tf.models import popnet

    before = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(train_lib.precision_policy(config.train.mixed_precision))
    try:
        previous = None
        for s in popnet.stages_needed(config, stage):
            keras.utils.set_random_seed(config.seed + s)
            model = popnet.build_stage(config, s, previous=previous)
            popnet.build_variables(model, s, 64)
            popnet.configure_batch_norm(model, config.model.bn_momentum)
            previous = model
    finally:  # the layers keep their own policy; later code gets the old default back
        keras.mixed_precision.set_global_policy(before)
    return previous


# --quick runs every section in one process: its sections share each setting's
# model and traced training step (tracing is most of a quick run's time).
_QUICK_MODELS = {}


def _setting_model(setting: str, quick: bool):
    """(config, model) of a `MODEL_SETTINGS` entry; built once per process if quick."""
    if quick and setting in _QUICK_MODELS:
        return _QUICK_MODELS[setting]["config"], _QUICK_MODELS[setting]["model"]
    config = load_config(setting, quick)
    model = build_model(config)
    if quick:
        _QUICK_MODELS[setting] = {"config": config, "model": model}
    return config, model


def _setting_train_step(setting: str, quick: bool):
    """`_train_step` of a setting's model; made (and traced) once per process if quick."""
    config, model = _setting_model(setting, quick)
    if not quick:
        return _train_step(model, config)
    entry = _QUICK_MODELS[setting]
    if "train_step" not in entry:
        entry["train_step"] = _train_step(model, config)
    return entry["train_step"]


def band_mask(size: int, class_ids, shift: float = 0.0):
    """[size, size] int32: horizontal bands of background and each class, so every
    class holds pixels; `shift` (fraction of a band) moves the bands (queries)."""
    import numpy as np

    ids = np.array((0, *class_ids), np.int32)
    rows = (np.arange(size) / size * len(ids) + shift) % len(ids)
    return np.repeat(ids[rows.astype(int)][:, None], size, axis=1)


def synthetic_episode(batch: int, size: int, class_ids, seed: int = 0) -> dict:
    """A training batch: random images, support and query masks holding `class_ids`."""
    import numpy as np

    rng = np.random.default_rng(seed)
    images = lambda: rng.uniform(0, 255, (batch, size, size, 3)).astype(np.float32)  # noqa: E731
    return {"query_image": images(), "support_image": images(),
            "support_mask": np.stack([band_mask(size, class_ids)] * batch),
            "query_mask": np.stack([band_mask(size, class_ids, 0.5)] * batch),
            "class_id": np.full([batch], -1, np.int32)}


def episode_function(model, head: str):
    """One inference episode, `tf.function`: (query [1,S,S,3], support [1,S,S,3],
    support mask [1,S,S]) -> the head's probabilities [1,S,S,C]."""
    import tensorflow as tf

    @tf.function
    def episode(query_image, support_image, support_mask):
        static, presence = model.support_prototypes(support_image, support_mask, training=False)
        prototypes = model.store(static, presence, training=False, use_dynamic=True)
        features = model.infused_features(query_image, training=False)
        out = model.heads(features, prototypes, presence, query_image, compute_agm=head != "ncm")
        return out["ncm_probs" if head == "ncm" else "agm_probs"]

    return episode


# ----------------------------------------------------------------------------- FLOPs
def _register_missing_flops():
    """FLOP counts for ops TensorFlow's profiler does not know: the depthwise conv
    gradients (Xception) and two-operand einsum (cosine maps); and for the conv
    gradients, whose TensorFlow count is wrong for "valid" padding (replaced).
    Registered once."""
    from tensorflow.python.framework import graph_util, ops

    def conv_backprop(graph, node):
        # Each gradient costs what the forward does: 2 k_h k_w C_in per value of the
        # output gradient (= per output value of the forward). TensorFlow counts per
        # value of the forward's *input* over the strides: right for "same" padding,
        # but for "valid" (the space-to-batch convs of atrous convolution: ASPP) it
        # counts the padded input's positions, 2.3-5x the outputs at 32x32, rates 6-18.
        out_grad = graph_util.tensor_shape_from_node_def_name(graph, node.input[2])
        out_grad.assert_is_fully_defined()
        kernel = graph_util.tensor_shape_from_node_def_name(
            graph, node.input[1] if node.op == "Conv2DBackpropInput" else node.name)
        kernel.assert_is_fully_defined()
        k_h, k_w, c_in = (int(d) for d in kernel[:3])
        return ops.OpStats("flops", 2 * out_grad.num_elements() * k_h * k_w * c_in)

    def depthwise_backprop(graph, node):
        # Both gradients cost what the forward does: 2 k_h k_w per output-gradient value.
        out_grad = graph_util.tensor_shape_from_node_def_name(graph, node.input[2])
        out_grad.assert_is_fully_defined()
        filter_shape = graph_util.tensor_shape_from_node_def_name(
            graph, node.input[1] if "Input" in node.op else node.input[0])
        if "Input" in node.op:
            k_h, k_w = int(filter_shape[0]), int(filter_shape[1])
        else:  # the filter's shape is the value of input 1: take it from the output
            k_h, k_w = graph_util.tensor_shape_from_node_def_name(graph, node.name)[:2]
        return ops.OpStats("flops", out_grad.num_elements() * int(k_h) * int(k_w) * 2)

    def einsum(graph, node):
        if len(node.input) != 2:
            return ops.OpStats("flops", None)
        equation = node.attr["equation"].s.decode()
        inputs, _ = equation.split("->")
        sizes = {}
        for term, name in zip(inputs.split(","), node.input):
            shape = graph_util.tensor_shape_from_node_def_name(graph, name)
            shape.assert_is_fully_defined()
            sizes.update(zip(term, shape.as_list()))
        total = 2
        for size in sizes.values():
            total *= size
        return ops.OpStats("flops", total)

    for name, fn in (("DepthwiseConv2dNativeBackpropInput", depthwise_backprop),
                     ("DepthwiseConv2dNativeBackpropFilter", depthwise_backprop),
                     ("Einsum", einsum)):
        try:
            ops.RegisterStatistics(name, "flops")(fn)
        except KeyError:  # already registered (a second call, or a future TensorFlow)
            pass
    # TensorFlow registers these two; its registry has no public way to replace one.
    registered = getattr(getattr(ops, "_stats_registry", None), "_registry", None)
    for name in ("Conv2DBackpropInput", "Conv2DBackpropFilter"):
        key = f"{name},flops"
        if isinstance(registered, dict) and getattr(
                registered.get(key, {}).get("type"), "__name__", None) != "conv_backprop":
            registered.pop(key, None)
        try:
            ops.RegisterStatistics(name, "flops")(conv_backprop)
        except KeyError:  # ours already (a second call), or TensorFlow's if not replaceable
            pass


# Ops whose work lies in another function of the graph's library.
_FUNCTION_CALL_OPS = ("PartitionedCall", "StatefulPartitionedCall", "If", "StatelessIf",
                      "While", "StatelessWhile", "Case", "StatelessCase")


def runtime_graph_def(concrete):
    """(GraphDef, number of ops dropped): the ops of a concrete function's graph
    that its runtime runs.

    The function runtime (`PruneFunctionBody`) keeps the ops that the return
    values and the stateful ops (variable reads and updates, the optimiser's
    assignments) depend on, through data or control inputs, and drops every
    other stateless op. The same here (what `extract_sub_graph`, deprecated,
    does from those ops).

    Example:
        >>> graph_def, dropped = runtime_graph_def(tf.function(f).get_concrete_function(x))
    """
    graph = concrete.graph
    graph_def = graph.as_graph_def()
    nodes = {node.name: node for node in graph_def.node}
    seeds = {t.op.name for t in concrete.outputs}
    seeds.update(op.name for op in graph.control_outputs)
    seeds.update(op.name for op in graph.get_operations()
                 if op.op_def is not None and op.op_def.is_stateful and op.type != "Placeholder")
    kept, stack = set(), [name for name in seeds if name in nodes]
    while stack:
        name = stack.pop()
        if name not in kept:
            kept.add(name)
            # inputs: "op", "op:1", "^op" (control)
            stack.extend(i.lstrip("^").split(":")[0] for i in nodes[name].input)
    pruned = type(graph_def)()
    pruned.versions.CopyFrom(graph_def.versions)
    pruned.library.CopyFrom(graph_def.library)
    pruned.node.extend(node for node in graph_def.node if node.name in kept)
    return pruned, len(graph_def.node) - len(pruned.node)


def count_flops(function, *args) -> dict:
    """FLOPs of one call of a `tf.function` on `args`, counted from its graph.

    TensorFlow's profiler counts the graph's ops from their shapes. Shapes known
    only at run time (the AGM's batch of present classes) are taken from one
    traced run of the graph (a v1 Session over the function's graph with zero
    weights and every graph optimiser off, so every op runs under its own name),
    which is what `tf.compat.v1.profiler` does with a `RunMetadata`.

    Only the ops the function runs are counted (`runtime_graph_def`): a traced
    graph can hold ops that nothing uses, which the runtime prunes, e.g. the
    gradients a `GradientTape` builds toward the frozen stages of a KIM model
    (their Keras variables are not trainable, but the `tf.Variable`s under them
    are, so the tape watches them and back-propagates through the frozen
    encoders; nothing fetches those gradients).

    Returns {"flops": int, "gflop": float, "shapes_from_run": bool,
    "function_calls_not_counted": int (0 for every model here),
    "ops_pruned": int (ops of the traced graph the runtime does not run)}.

    Example:
        >>> count_flops(tf.function(lambda x: x @ x), tf.ones([64, 64]))["flops"]
        524288
    """
    import numpy as np
    import tensorflow as tf
    from absl import logging
    from tensorflow.core.protobuf import config_pb2, rewriter_config_pb2
    from tensorflow.python.profiler import model_analyzer, option_builder

    _register_missing_flops()
    concrete = function.get_concrete_function(*args)
    options = option_builder.ProfileOptionBuilder.float_operation()
    options["output"] = "none"
    variables = {id(v.handle): v for v in concrete.graph.variables}
    flat_args = [a for a in tf.nest.flatten(args)]
    graph_def, pruned = runtime_graph_def(concrete)
    kept = {node.name for node in graph_def.node}
    with tf.Graph().as_default() as graph:
        input_map = {}
        for external, internal in concrete.graph.captures:
            if internal.op.name not in kept:  # used only by pruned ops
                continue
            if external.dtype == tf.resource:  # a variable: zeros of its shape will do
                v = variables[id(external)]
                input_map[internal.name] = tf.Variable(tf.zeros(v.shape, v.dtype)).handle
            else:
                input_map[internal.name] = tf.constant(external.numpy())
        for placeholder, value in zip(concrete.graph.inputs, flat_args):
            if placeholder.op.name in kept:
                input_map[placeholder.name] = tf.constant(np.asarray(value))
        outputs = tf.graph_util.import_graph_def(
            graph_def, input_map=input_map,
            return_elements=[t.name for t in concrete.outputs], name="f")
        static = model_analyzer.profile(graph, options=options)
        # The profiler counts the top-level graph only: ops inside called functions
        # (tf.cond, tf.while_loop, nested tf.functions) would be missed. Say so.
        calls = sum(op.type in _FUNCTION_CALL_OPS for op in graph.get_operations())
        if calls:
            logging.warning("count_flops: %d function-call ops in the graph; the FLOPs "
                            "inside them are not counted", calls)
        # Do the counted shapes hold everything? If not, run once for the shapes.
        incomplete = any(not op.outputs[0].shape.is_fully_defined()
                         for op in graph.get_operations()
                         if op.outputs and op.type in ("Conv2D", "MatMul", "BatchMatMulV2",
                                                       "Conv2DBackpropInput",
                                                       "Conv2DBackpropFilter"))
        if not incomplete:
            return {"flops": int(static.total_float_ops), "gflop": static.total_float_ops / 1e9,
                    "shapes_from_run": False, "function_calls_not_counted": calls,
                    "ops_pruned": pruned}
        # Every optimiser off, so every op runs under its own name and the run
        # metadata names it: grappler (the meta optimizer) and the classic graph
        # optimiser, whose constant folding would otherwise fold the whole graph
        # (its inputs are constants) and leave no trace of the ops to count.
        rewrite = rewriter_config_pb2.RewriterConfig(disable_meta_optimizer=True)
        classic = config_pb2.OptimizerOptions(
            opt_level=config_pb2.OptimizerOptions.L0, do_constant_folding=False,
            do_common_subexpression_elimination=False, do_function_inlining=False)
        config = config_pb2.ConfigProto(graph_options=config_pb2.GraphOptions(
            rewrite_options=rewrite, optimizer_options=classic))
        run_meta = tf.compat.v1.RunMetadata()
        with tf.compat.v1.Session(graph=graph, config=config) as session:
            session.run(tf.compat.v1.global_variables_initializer())
            session.run(outputs, run_metadata=run_meta, options=tf.compat.v1.RunOptions(
                trace_level=tf.compat.v1.RunOptions.FULL_TRACE))
        counted = model_analyzer.profile(graph, run_meta=run_meta, options=options)
    return {"flops": int(counted.total_float_ops), "gflop": counted.total_float_ops / 1e9,
            "shapes_from_run": True, "function_calls_not_counted": calls, "ops_pruned": pruned}


def _flops_child(setting: str, quick: bool = False, with_train: bool = True) -> dict:
    import numpy as np
    import tensorflow as tf

    from popnet_tf import classes

    config, model = _setting_model(setting, quick)
    size, batch = config.data.crop_size, config.train.batch_size
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 255, (1, size, size, 3)).astype(np.float32)
    all_classes = range(1, classes.STAGE_NUM_CLASSES[STAGE])  # 11 foreground classes
    mask = band_mask(size, all_classes)[None]
    encoder = tf.function(lambda x: model.encoder(x, training=False))
    features = tf.function(lambda x: model.infused_features(x, training=False))
    result = {"setting": setting, "size": size, "batch_size": batch,
              "encoder": count_flops(encoder, image),
              # all the stage's encoders and KIMs: what a support or query costs once
              "features": count_flops(features, image),
              "episode_ncm": count_flops(episode_function(model, "ncm"), image, image, mask),
              "episode_agm": count_flops(episode_function(model, "agm"), image, image, mask)}
    result["peak_rss_mb"] = _peak_rss_mb()
    if with_train:
        step, episode = _setting_train_step(setting, quick)
        result["train_step"] = count_flops(step, episode)
        result["train_step"]["per_episode_gflop"] = result["train_step"]["gflop"] / batch
    return result


def bench_flops(settings=("oneshot", "paper", "cpu"), quick: bool = False, threads=(0, 0),
                in_process: bool = False) -> dict:
    """FLOPs counted from the graph per setting: encoder (one image), one inference
    episode (NCM; AGM over 11 classes), one training step (see the module doc).

    Example:
        >>> bench_flops(["oneshot"])["oneshot"]["episode_ncm"]["gflop"]
    """
    return {s: _in_child("_flops_child", threads, in_process, setting=s, quick=quick)
            for s in settings}


# ----------------------------------------------------------------------------- peak
def _peak_child(size: int = 4096, repeats: int = 5) -> dict:
    import tensorflow as tf

    a = tf.random.normal([size, size], seed=1)
    b = tf.random.normal([size, size], seed=2)
    matmul = tf.function(lambda x, y: tf.linalg.matmul(x, y))
    timing = _time_calls(lambda: matmul(a, b).numpy(), 2, repeats)
    flops = 2.0 * size**3
    return {"size": size, "gflops": flops / timing["wall_s"] / 1e9,
            "gflops_per_cpu_s": flops / timing["cpu_s"] / 1e9, **timing}


def bench_peak(size: int = 4096, repeats: int = 5, threads=(0, 0),
               in_process: bool = False) -> dict:
    """The fp32 matmul peak: median GFLOP/s of a size³ `tf.linalg.matmul`.

    Example:
        >>> bench_peak(1024, repeats=3)["gflops"]
    """
    return _in_child("_peak_child", threads, in_process, size=size, repeats=repeats)


# ----------------------------------------------------------------------------- conv
# The convolutions of the 512x512 model (Xception DeepLab v3+ OS16, K = 256), as
# (key, what, input size, C_in, C_out, k, stride, kind). kind "dense": what the
# issue's 75 % target is about; "stem" (3 input channels) and "depthwise" are
# listed to show where a convolution cannot reach the matmul peak.
_CONV_FIELDS = ("key", "what", "size", "cin", "cout", "k", "stride", "kind")
CONV_SHAPES = (
    ("middle_1x1", "Xception middle flow pointwise 1x1 728->728, 32x32", 32, 728, 728, 1, 1,
     "dense"),
    ("aspp_1x1", "ASPP 1x1 2048->256, 32x32", 32, 2048, 256, 1, 1, "dense"),
    ("decoder_3x3", "decoder 3x3 304->256, 128x128", 128, 304, 256, 3, 1, "dense"),
    ("agm_3x3", "AGM / decoder 3x3 256->256, 128x128", 128, 256, 256, 3, 1, "dense"),
    ("stem_3x3_s2", "Xception first conv 3x3 stride 2 3->32, 512x512 in", 512, 3, 32, 3, 2,
     "stem"),
    ("depthwise_3x3", "depthwise 3x3, 728 channels, 32x32", 32, 728, 728, 3, 1, "depthwise"),
)
# --quick: the same kinds of convolution at tiny sizes.
QUICK_CONV_SHAPES = (
    ("middle_1x1", "pointwise 1x1 32->32, 8x8", 8, 32, 32, 1, 1, "dense"),
    ("aspp_1x1", "1x1 64->16, 8x8", 8, 64, 16, 1, 1, "dense"),
    ("decoder_3x3", "3x3 24->16, 16x16", 16, 24, 16, 3, 1, "dense"),
    ("agm_3x3", "3x3 16->16, 16x16", 16, 16, 16, 3, 1, "dense"),
    ("stem_3x3_s2", "3x3 stride 2 3->8, 32x32 in", 32, 3, 8, 3, 2, "stem"),
    ("depthwise_3x3", "depthwise 3x3, 32 channels, 8x8", 8, 32, 32, 3, 1, "depthwise"),
)
CONV_BATCH = 2
CONV_KINDS = {"dense": "dense", "stem": "not dense (3 input channels)",
              "depthwise": "not dense (depthwise: memory-bound)"}


def conv_shapes(quick: bool = False) -> list[dict]:
    """The conv section's shapes as dicts (`CONV_SHAPES`, or `QUICK_CONV_SHAPES`)."""
    return [dict(zip(_CONV_FIELDS, row)) for row in (QUICK_CONV_SHAPES if quick else CONV_SHAPES)]


def conv_flops(shape: dict, batch: int = CONV_BATCH) -> dict:
    """FLOPs of one conv from the formula: forward 2·H·W·C_in·C_out·k² per image
    (H, W: the output's size, "same" padding; depthwise: C_out = 1 per channel);
    each gradient costs what the forward does. The stem's backward is the filter
    gradient only (the image needs none: the model never computes it), the
    others' both gradients (backward = 2 x forward).

    Example:
        >>> conv_flops(conv_shapes()[0])["forward"]  # batch 2: 2 * 2 * 32² * 728²
        2170814464
    """
    out = -(-shape["size"] // shape["stride"])
    per_image = 2 * out * out * shape["cin"] * shape["k"] ** 2
    forward = batch * per_image * (1 if shape["kind"] == "depthwise" else shape["cout"])
    gradients = 1 if shape["kind"] == "stem" else 2
    return {"out_size": out, "forward": forward, "forward_backward": (1 + gradients) * forward}


def conv_functions(shape: dict, batch: int = CONV_BATCH, seed: int = 0):
    """((forward, args), (forward_backward, args)) of a conv shape: `tf.function`s
    and their (tensor) arguments, fp32. Each returns a corner of every result, so
    the runtime computes every result in full and copies out almost nothing;
    forward_backward returns the forward's too (the gradients of a conv do not
    need its output: without it the runtime would skip the forward)."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(seed)
    k, stride, cin = shape["k"], shape["stride"], shape["cin"]
    depthwise = shape["kind"] == "depthwise"
    out = conv_flops(shape, batch)["out_size"]
    x = tf.constant(rng.standard_normal((batch, shape["size"], shape["size"], cin), np.float32))
    w = tf.constant(rng.standard_normal((k, k, cin, 1 if depthwise else shape["cout"]),
                                        np.float32) / np.float32(np.sqrt(k * k * cin)))
    dy = tf.constant(rng.standard_normal((batch, out, out, shape["cout"]), np.float32))
    input_grad = shape["kind"] != "stem"

    def conv(x, w):
        if depthwise:
            return tf.nn.depthwise_conv2d(x, w, [1, stride, stride, 1], "SAME")
        return tf.nn.conv2d(x, w, stride, "SAME")

    def corner(t):
        return t[:1, :1, :1, :1]

    @tf.function
    def forward(x, w):
        return corner(conv(x, w))

    @tf.function
    def forward_backward(x, w, dy):
        with tf.GradientTape() as tape:
            tape.watch([x, w] if input_grad else [w])
            y = conv(x, w)
        grads = tape.gradient(y, [x, w] if input_grad else [w], output_gradients=dy)
        return [corner(y), *(corner(g) for g in grads)]

    return (forward, (x, w)), (forward_backward, (x, w, dy))


def _conv_child(quick: bool = False, repeats: int = 5, warmup: int = 2) -> dict:
    import tensorflow as tf

    def call(fn, args):
        return lambda: [t.numpy() for t in tf.nest.flatten(fn(*args))]

    shapes = {}
    for shape in conv_shapes(quick):
        flops = conv_flops(shape)
        row = {**shape, "batch": CONV_BATCH, "out_size": flops["out_size"]}
        for name, (fn, args) in zip(("forward", "forward_backward"), conv_functions(shape)):
            timing = _time_calls(call(fn, args), warmup, repeats)
            row[name] = {"flops": flops[name], "gflop": flops[name] / 1e9,
                         "gflops": flops[name] / timing["wall_s"] / 1e9,
                         "gflops_per_cpu_s": flops[name] / timing["cpu_s"] / 1e9
                         if timing["cpu_s"] else None, **timing}
        shapes[shape["key"]] = row
    return {"batch": CONV_BATCH, "dtype": "float32", "quick": quick, "shapes": shapes}


def bench_conv(quick: bool = False, repeats: int = 5, warmup: int = 2, threads=(0, 0),
               in_process: bool = False) -> dict:
    """Convolutions of the 512x512 model, fp32, batch 2: median time and GFLOP/s
    of each shape's forward and forward+backward (`CONV_SHAPES`; FLOPs from
    `conv_flops`). Fractions of the matmul peak: `conv_efficiency`.

    Example:
        >>> bench_conv(repeats=3)["shapes"]["decoder_3x3"]["forward_backward"]["gflops"]
    """
    return _in_child("_conv_child", threads, in_process, quick=quick, repeats=repeats,
                     warmup=warmup)


# ----------------------------------------------------------------------------- train
def _train_step(model, config):
    """The real training step (`train_lib.make_train_step`) and a batch for it."""
    import tensorflow as tf

    from popnet_tf import classes, train_lib

    optimizer = train_lib.make_optimizer(config, total_steps=1000)
    optimizer.build(model.trainable_variables)
    beta = tf.Variable(0.5, trainable=False)  # both heads weigh in the loss
    use_dynamic = tf.Variable(True, trainable=False)
    step = train_lib.make_train_step(model, optimizer, tf.distribute.get_strategy(), STAGE,
                                     config.train.batch_size, beta, use_dynamic,
                                     config.train.jit_compile)
    episode = synthetic_episode(config.train.batch_size, config.data.crop_size,
                                classes.base_ids(STAGE, FOLD))
    return step, {k: tf.constant(v) for k, v in episode.items()}


def _train_child(setting: str, quick: bool = False, warmup: int = 1, repeats: int = 3) -> dict:
    from popnet_tf import classes

    config, model = _setting_model(setting, quick)
    step, episode = _setting_train_step(setting, quick)
    rss_model = _rss_mb()
    timing = _time_calls(lambda: step(episode)["loss"].numpy(), warmup, repeats)
    batch = config.train.batch_size
    return {"setting": setting, "size": config.data.crop_size, "batch_size": batch,
            "present_classes": len(classes.base_ids(STAGE, FOLD)),
            "jit_compile": bool(config.train.jit_compile),
            "episodes_per_s": batch / timing["wall_s"], "rss_before_steps_mb": rss_model,
            "peak_rss_mb": _peak_rss_mb(), **timing}


def bench_train(settings=("oneshot", "paper", "cpu"), quick: bool = False, warmup: int = 1,
                repeats: int = 3, threads=(0, 0), in_process: bool = False) -> dict:
    """Training episodes/s and peak memory of the real step, per model setting.

    Example:
        >>> bench_train(["cpu"], repeats=3)["cpu"]["episodes_per_s"]
    """
    return {s: _in_child("_train_child", threads, in_process, setting=s, quick=quick,
                         warmup=warmup, repeats=repeats) for s in settings}


# ----------------------------------------------------------------------------- infer
def _infer_child(setting: str, quick: bool = False, warmup: int = 1, repeats: int = 3,
                 queries: int = 16, head: str = "ncm") -> dict:
    import numpy as np
    import tensorflow as tf

    from popnet_tf import classes, serving

    config, model = _setting_model(setting, quick)
    size = config.data.crop_size
    parser = serving.OneShotParser(model, eval_size=size, head=head)
    parse = parser.function(serving.SIGNATURE_IMAGES)
    rng = np.random.default_rng(0)
    query_images = tf.constant(rng.uniform(0, 255, (queries, size, size, 3)).astype(np.float32))
    support = tf.constant(rng.uniform(0, 255, (size, size, 3)).astype(np.float32))
    mask = tf.constant(band_mask(size, range(1, classes.STAGE_NUM_CLASSES[STAGE])))  # 11 classes
    single = _time_calls(lambda: parse(query_images[:1], support, mask)["labels"].numpy(),
                         warmup, repeats)
    shared = _time_calls(lambda: parse(query_images, support, mask)["labels"].numpy(),
                         warmup, repeats)
    return {"setting": setting, "size": size, "head": head, "present_classes": 11,
            "one_query": {"latency_s": single["wall_s"], **single},
            "shared_support": {"queries": queries, "queries_per_s": queries / shared["wall_s"],
                               "s_per_query": shared["wall_s"] / queries, **shared}}


def bench_infer(settings=("oneshot", "paper", "cpu"), quick: bool = False, warmup: int = 1,
                repeats: int = 3, queries: int = 16, head: str = "ncm", threads=(0, 0),
                in_process: bool = False) -> dict:
    """Served inference per model setting: one query with its support, and
    `queries` queries sharing one support (one request).

    Example:
        >>> bench_infer(["oneshot"])["oneshot"]["shared_support"]["s_per_query"]
    """
    return {s: _in_child("_infer_child", threads, in_process, setting=s, quick=quick,
                         warmup=warmup, repeats=repeats, queries=queries, head=head)
            for s in settings}


# ----------------------------------------------------------------------------- data
def _cpu_data_setting() -> tuple[str, int, int | None]:
    from configs import synthetic_cpu

    d = synthetic_cpu.get_config().data
    return f"{d.crop_size}x{d.crop_size}", d.crop_size, d.resize_long_side or None


def data_settings() -> tuple:
    """(name, crop_size, resize_long_side) of the data section: ATR's 512x512 and
    the CPU config's size."""
    return (("512x512", 512, None), _cpu_data_setting())


def _time_batches(iterator, steps: int) -> tuple[float, float]:
    """Wall and process-CPU seconds to pull `steps` batches."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        next(iterator)
    return time.perf_counter() - wall, time.process_time() - cpu


def bench_data(data_dir: str, *, steps: int = 50, repeats: int = 5, warmup: int = 20,
               batch_size: int = 2, cache_decoded: bool = False, seed: int = 0) -> dict:
    """Training-episode throughput at each of `data_settings()`.

    Returns:
        {"512x512": {"episodes_per_s": median, "runs": [...], "cpu_ms_per_episode": median,
        ...}, ...}.

    Example:
        >>> bench_data("tfrecords/synthetic", steps=10, repeats=3)["512x512"]["episodes_per_s"]
    """
    from popnet_tf.data import episodes

    if not data_dir:
        raise ValueError("the data section needs --data: a built ATR-OS dataset folder "
                         "(python -m popnet_tf.data.build_atr_os)")
    results = {}
    for name, crop_size, long_side in data_settings():
        ds = episodes.train_episodes(data_dir, stage=3, fold=1, way="kway", batch_size=batch_size,
                                     crop_size=crop_size, resize_long_side=long_side, seed=seed,
                                     cache_decoded=cache_decoded)
        iterator = iter(ds)
        _time_batches(iterator, warmup)   # fills shuffle buffers, tunes parallelism
        runs, cpu, loads = [], [], []
        for _ in range(repeats):
            wall, used = _time_batches(iterator, steps)
            runs.append(steps * batch_size / wall)
            cpu.append(1000.0 * used / (steps * batch_size))
            loads.append(_load())
        results[name] = {
            "episodes_per_s": statistics.median(runs),
            "runs": runs,
            "cpu_ms_per_episode": statistics.median(cpu),
            "load_1min": statistics.median(loads),
            "crop_size": crop_size, "resize_long_side": long_side,
            "batch_size": batch_size, "steps": steps, "warmup": warmup, "repeats": repeats,
            "cache_decoded": cache_decoded,
        }
    return results


# ----------------------------------------------------------------------------- derive
# The targets (2-core CPU, 512x512): (key, what, goal, "max" or "min", unit).
TARGETS = (
    ("train_step_s", "training step, one one-shot stage, batch 2", 21.0, "max", "s"),
    ("infer_one_query_s", "inference (NCM), one query alone", 2.0, "max", "s"),
    ("infer_shared_s_per_query", "inference (NCM), 16 queries sharing a support, per query",
     1.0, "max", "s"),
    ("train_fraction_of_peak", "training step, one one-shot stage: achieved FLOP/s / matmul peak",
     0.75, "min", "of peak"),
    ("infer_fraction_of_peak", "16 queries sharing a support, one one-shot stage: achieved "
     "FLOP/s / matmul peak", 0.75, "min", "of peak"),
    ("data_episodes_per_s", "data pipeline, training episodes/s", 100.0, "min", "episodes/s"),
    ("conv_dense_fraction_of_peak", "dense convolution (the model's dense conv shapes, "
     "forward+backward): achieved / matmul peak", 0.75, "min", "of peak"),
)
TARGET_SIZE = 512     # the targets are at 512x512
TARGET_QUERIES = 16   # and for 16 queries sharing a support
TARGET_SETTING = "oneshot"
# FLOPs per episode at 512x512 to compare with (the issue): the paper's and the
# authors' PyTorch reference's count.
PAPER_EPISODE_GMACS = 100.4
REFERENCE_EPISODE_GMACS = 325.0
# Figures on a GPU (the issue asks for them where a GPU is lent).
GPU_FIGURES = ("training step, one one-shot stage, batch 2, 512x512",
               "training step, configs/paper.py stage 3, 512x512",
               "inference, one query, 512x512", "inference, 16 queries sharing a support")
NO_GPU = "not measured (no GPU lent to this task)"


def achieved_flops(report: dict) -> dict:
    """Achieved GFLOP/s and fraction of the matmul peak of each train/infer figure,
    from the flops and peak sections of the same report. A figure is paired only
    with a FLOP count of the same size (and, for training, batch): a report
    updated with --merge, or a config changed between runs, can hold both.

    n queries sharing a support cost n + 1 feature passes and n heads, i.e.
    n · episode − (n − 1) · features.

    Example:
        >>> achieved_flops(report)["train/oneshot"]["fraction_of_peak"]
    """
    sections = report["sections"]
    peak = sections.get("peak", {}).get("gflops")
    flops = sections.get("flops", {})
    achieved = {}

    def entry(gflop, timing, wall_s=None):
        wall_s = timing["wall_s"] if wall_s is None else wall_s
        return {"gflop": gflop, "wall_s": wall_s, "gflops": gflop / wall_s,
                "fraction_of_peak": gflop / wall_s / peak if peak else None,
                "gflops_per_cpu_s": gflop / timing["cpu_s"] if timing["cpu_s"] else None}

    def same(count, r, *keys):
        return all(count.get(k) == r.get(k) for k in keys)

    for setting, r in sections.get("train", {}).items():
        f = flops.get(setting, {}).get("train_step")
        if f and same(flops[setting], r, "size", "batch_size"):
            achieved[f"train/{setting}"] = entry(f["gflop"], r)
    for setting, r in sections.get("infer", {}).items():
        f = flops.get(setting, {})
        if "episode_ncm" in f and "features" in f and same(f, r, "size"):
            one = f["episode_ncm"]["gflop"]
            n = r["shared_support"]["queries"]
            shared = n * one - (n - 1) * f["features"]["gflop"]
            achieved[f"infer/{setting}/one_query"] = entry(one, r["one_query"])
            achieved[f"infer/{setting}/shared_support"] = entry(shared, r["shared_support"])
    return achieved


def conv_efficiency(report: dict) -> dict:
    """The conv section against the matmul peak of the same report: GFLOP/s and
    fraction of the peak of each shape and pass, and of the dense shapes together
    (their total FLOPs over their total median time, per pass: the stem and the
    depthwise conv are left out, they are not dense).

    Returns {} without a conv section, else {"shapes": {key: {"kind", "forward":
    {"gflops", "fraction_of_peak"}, "forward_backward": {...}}}, "dense":
    {"forward": {"gflop", "wall_s", "gflops", "fraction_of_peak"},
    "forward_backward": {...}, "shapes": [keys]}}.

    Example:
        >>> conv_efficiency(report)["dense"]["forward_backward"]["fraction_of_peak"]
    """
    conv = report["sections"].get("conv")
    if not conv:
        return {}
    peak = report["sections"].get("peak", {}).get("gflops")

    def fraction(gflops):
        return gflops / peak if peak else None

    passes = ("forward", "forward_backward")
    shapes = {key: {"kind": r["kind"],
                    **{p: {"gflops": r[p]["gflops"], "fraction_of_peak": fraction(r[p]["gflops"])}
                       for p in passes}}
              for key, r in conv["shapes"].items()}
    dense_keys = [key for key, r in conv["shapes"].items() if r["kind"] == "dense"]
    dense = {"shapes": dense_keys}
    for p in passes:
        gflop = sum(conv["shapes"][key][p]["gflop"] for key in dense_keys)
        wall_s = sum(conv["shapes"][key][p]["wall_s"] for key in dense_keys)
        gflops = gflop / wall_s if wall_s else None
        dense[p] = {"gflop": gflop, "wall_s": wall_s, "gflops": gflops,
                    "fraction_of_peak": fraction(gflops) if gflops else None}
    return {"shapes": shapes, "dense": dense}


def _target_values(report: dict, achieved: dict) -> dict:
    """key -> [(label, value or None, why not measured)] of each target."""
    sections, skipped = report["sections"], report.get("skipped", {})

    def model(section, pick, queries=False):
        r = sections.get(section, {}).get(TARGET_SETTING)
        if r is None:
            why = skipped.get(section) or f"the {section} section ({TARGET_SETTING}) was not run"
            return None, why
        if r["size"] != TARGET_SIZE:
            return None, f"measured at {r['size']}x{r['size']}, the target is at 512x512"
        if queries and r["shared_support"]["queries"] != TARGET_QUERIES:
            return None, f"{r['shared_support']['queries']} queries, the target is for 16"
        return pick(r), ""

    def fraction(key, section):
        value, why = model(section, lambda r: None, queries=section == "infer")
        if why:
            return None, why
        a = achieved.get(key)
        if a is None or a["fraction_of_peak"] is None:
            return None, ("needs the peak section and a flops count of the same size and "
                          "batch")
        return a["fraction_of_peak"], ""

    values = {
        "train_step_s": [("", *model("train", lambda r: r["wall_s"]))],
        "infer_one_query_s": [("", *model("infer", lambda r: r["one_query"]["wall_s"]))],
        "infer_shared_s_per_query": [("", *model(
            "infer", lambda r: r["shared_support"]["s_per_query"], queries=True))],
        "train_fraction_of_peak": [("", *fraction(f"train/{TARGET_SETTING}", "train"))],
        "infer_fraction_of_peak": [("", *fraction(f"infer/{TARGET_SETTING}/shared_support",
                                                  "infer"))],
    }
    conv = conv_efficiency(report)
    if not conv:
        why = skipped.get("conv") or "the conv section was not run"
        values["conv_dense_fraction_of_peak"] = [("", None, why)]
    elif report["sections"]["conv"].get("quick"):
        values["conv_dense_fraction_of_peak"] = [("", None, "measured at --quick's tiny shapes")]
    elif not conv["dense"]["shapes"]:
        values["conv_dense_fraction_of_peak"] = [("", None, "no dense shape was measured")]
    elif conv["dense"]["forward_backward"]["fraction_of_peak"] is None:
        values["conv_dense_fraction_of_peak"] = [("", None, "needs the peak section")]
    else:
        values["conv_dense_fraction_of_peak"] = [
            ("", conv["dense"]["forward_backward"]["fraction_of_peak"], "")]
    data = sections.get("data") or {}
    if data:
        values["data_episodes_per_s"] = [(f"at {name}", r["episodes_per_s"], "")
                                         for name, r in data.items()]
    else:
        values["data_episodes_per_s"] = [("", None, skipped.get("data")
                                          or "the data section was not run")]
    return values


def check_targets(report: dict, achieved: dict | None = None) -> list[dict]:
    """Every target of the issue against this report: status "met", "not met" or
    "not measured (why)". A --quick run measures none of them (its sizes differ).

    Example:
        >>> [t["status"] for t in check_targets(report)]
        ['met', 'not met', ...]
    """
    achieved = achieved_flops(report) if achieved is None else achieved
    values = _target_values(report, achieved)
    rows = []
    for key, what, goal, kind, unit in TARGETS:
        for label, value, why in values[key]:
            if value is None:
                status = f"not measured ({why})"
            elif report.get("quick"):
                status = "not measured (--quick: one short run)"
            else:
                status = "met" if (value <= goal if kind == "max" else value >= goal) else "not met"
            shown = f"{100 * goal:g}%" if unit == "of peak" else f"{goal:g} {unit}"
            rows.append({"key": key, "target": f"{what} {label}".strip(),
                         "goal": f"{'<=' if kind == 'max' else '>='} {shown}".strip(),
                         "value": value, "unit": unit, "status": status})
    return rows


def gpu_rows(report: dict) -> list[dict]:
    """The GPU figures: not measured unless TensorFlow saw a GPU in this run."""
    gpus = report.get("machine", {}).get("gpus") or []
    status = NO_GPU if not gpus else (f"the figures above ran with {', '.join(gpus)} visible "
                                      "to TensorFlow: read them as GPU figures")
    return [{"figure": f, "status": status} for f in GPU_FIGURES]


def derive(report: dict) -> dict:
    """The report's `derive` section: achieved FLOP/s and fraction of the matmul
    peak (whole steps and requests; each convolution and the dense ones
    together), the target checks, and the GPU rows.

    Example:
        >>> derive(report)["targets"][0]["status"]
        'met'
    """
    achieved = achieved_flops(report)
    return {"achieved": achieved, "conv": conv_efficiency(report),
            "targets": check_targets(report, achieved), "gpu": gpu_rows(report)}


# ----------------------------------------------------------------------------- Markdown
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"
MARKDOWN_TEMPLATE = f"""# Performance (issue #6)

How fast popnet_tf trains and parses on the project's machine. The part between the
`bench` markers is written by `python -m popnet_tf.bench --out docs/bench.json
--markdown docs/PERFORMANCE.md` (or, from a saved JSON, `python -m popnet_tf.bench
--summary docs/bench.json --markdown docs/PERFORMANCE.md`); the rest of this file is
written by hand and kept as it is.

{BEGIN}
{END}

## Changes and their effect

Each change with the figures before and after it (same command, same machine, load
noted):

- _(to fill)_ change (commit): figure, before -> after (`python -m popnet_tf.bench ...`).
"""


def _g(x) -> str:
    """A number with 3 significant digits, or none after the point from 100 up."""
    if x is None:
        return "-"
    return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"


def _table(header, rows) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(str(c) for c in row) + " |" for row in rows), ""]


def _runs(r, key="wall_s") -> str:
    return ", ".join(_g(run[key]) for run in r["runs"])


def summary_markdown(report: dict) -> str:
    """The Markdown of a bench report: machine, a table per section, achieved
    FLOP/s, the targets (met / not met / not measured) and the GPU rows.

    Example:
        >>> print(summary_markdown(json.load(open("docs/bench.json"))))
    """
    sec = report["sections"]
    d = report.get("derive") or derive(report)
    skipped = report.get("skipped", {})
    m = report["machine"]
    lines = ["## Measurements", ""]
    if report.get("quick"):
        lines += ["**A `--quick` run: tiny sizes (small backbone, 32x32 crops) and single "
                  "runs. It checks that every section runs; its figures are not comparable "
                  "with the targets.**", ""]
    lines += [f"Generated by `{report.get('command', 'python -m popnet_tf.bench')}` on "
              f"{report.get('date', '?')}.", ""]
    for update in report.get("updates", []):
        what = "; ".join(name + (f" ({', '.join(settings)})" if settings else "")
                         for name, settings in update["sections"].items()) or "nothing"
        lines += [f"Updated by `{update['command']}` on {update['date']}: {what}.", ""]
    lines += [f"Machine: {m['cpus']} CPUs ({m['cpu_model']}), {m['platform']}, Python "
              f"{m['python']}, TensorFlow {m.get('tensorflow')}, Keras {m.get('keras')}, "
              f"GPUs: {', '.join(m.get('gpus') or []) or 'none'}; oneDNN in the measuring "
              f"processes: {m.get('onednn_in_children', '?')}; load average at the start "
              f"{' / '.join(f'{x:.1f}' for x in m['load_average'])} (1 / 5 / 15 min).", "",
              "Every time is the median of the runs listed, after warm-up (the first call, "
              "which traces the graph, is never timed). The 1-minute load average is given "
              "beside each: on a shared machine a figure taken under load is an upper bound; "
              "the CPU time shows the work done whatever the load.", ""]

    settings = report.get("settings", {})
    if settings:
        lines += ["Model settings (stage 3, random weights: speed does not depend on them):", "",
                  *(f"- {s}: {what}" for s, what in settings.items()), ""]

    def not_run(name):
        return [f"Not measured: {skipped[name]}.", ""] if name in skipped else []

    peak = sec.get("peak")
    lines += ["### fp32 matrix-multiply peak", ""]
    if peak:
        lines += _table(
            ["matmul", f"GFLOP/s (median of {peak['repeats']})", "runs (s)",
             "GFLOP per CPU-second", "load"],
            [[f"{peak['size']}^3 fp32", _g(peak["gflops"]), _runs(peak),
              _g(peak["gflops_per_cpu_s"]), f"{peak['load_1min']:.1f}"]])
    lines += not_run("peak")

    conv = sec.get("conv")
    if conv:
        eff = d.get("conv") or conv_efficiency(report)
        repeats = next(iter(conv["shapes"].values()))["forward"]["repeats"]
        lines += [f"### Convolutions ({conv['dtype']}, batch {conv['batch']}, the 512x512 "
                  "model's shapes)", "",
                  "FLOPs from the formula: forward 2·H·W·C_in·C_out·k² per image (H, W of the "
                  "output; depthwise: C_out = 1), each gradient as much again (the stem: the "
                  "filter gradient only, as in the model). Times: median of "
                  f"{repeats} after warm-up.", ""]

        def pct(x):
            return f"{100 * x:.0f}%" if x is not None else "-"

        rows = []
        for key, r in conv["shapes"].items():
            f, fb = eff["shapes"][key]["forward"], eff["shapes"][key]["forward_backward"]
            rows.append([r["what"], CONV_KINDS.get(r["kind"], r["kind"]),
                         _g(r["forward"]["gflop"]), _g(1000 * r["forward"]["wall_s"]),
                         _g(f["gflops"]), pct(f["fraction_of_peak"]),
                         _g(r["forward_backward"]["gflop"]),
                         _g(1000 * r["forward_backward"]["wall_s"]), _g(fb["gflops"]),
                         pct(fb["fraction_of_peak"]), f"{r['forward_backward']['load_1min']:.1f}"])
        lines += _table(["conv", "kind", "forward GFLOP", "ms", "GFLOP/s", "of peak",
                         "forward+backward GFLOP", "ms", "GFLOP/s", "of peak", "load"], rows)
        dense = eff["dense"]
        if dense["shapes"]:
            lines += ["Dense shapes together (their total FLOPs / their total time): forward "
                      f"{_g(dense['forward']['gflops'])} GFLOP/s "
                      f"({pct(dense['forward']['fraction_of_peak'])} of the matmul peak), "
                      f"forward+backward {_g(dense['forward_backward']['gflops'])} GFLOP/s "
                      f"({pct(dense['forward_backward']['fraction_of_peak'])}).", ""]

    lines += ["### Data pipeline (training episodes, stage 3, fold 1, k-way, batch 2)", ""]
    if sec.get("data"):
        repeats = len(next(iter(sec["data"].values()))["runs"])
        lines += _table(
            ["size", f"episodes/s (median of {repeats})", "runs (episodes/s)",
             "CPU ms per episode", "load"],
            [[name, _g(r["episodes_per_s"]), ", ".join(_g(x) for x in r["runs"]),
              _g(r["cpu_ms_per_episode"]), f"{r['load_1min']:.1f}"]
             for name, r in sec["data"].items()])
    lines += not_run("data")

    lines += ["### FLOPs, counted from the graph (MACs = FLOPs / 2)", ""]
    if sec.get("flops"):
        rows = []
        for setting, f in sec["flops"].items():
            train = f.get("train_step")
            rows.append([setting, f"{f['size']}x{f['size']}", _g(f["encoder"]["gflop"] / 2),
                         _g(f["features"]["gflop"] / 2), _g(f["episode_ncm"]["gflop"] / 2),
                         _g(f["episode_agm"]["gflop"] / 2),
                         f"{_g(train['gflop'] / 2)} ({_g(train['gflop'] / 2 / f['batch_size'])}"
                         f" per episode)" if train else "-"])
        lines += _table(["setting", "size", "encoder, one image (GMACs)",
                         "features of one image, all stages (GMACs)",
                         "inference episode, NCM (GMACs)",
                         "inference episode, AGM over 11 classes (GMACs)",
                         "training step (GMACs)"], rows)
        lines += [f"An inference episode is one query and its support. To compare at "
                  f"512x512: the paper gives {PAPER_EPISODE_GMACS} GMACs, the authors' "
                  f"PyTorch reference counts {REFERENCE_EPISODE_GMACS:g} GMACs.", ""]
    lines += not_run("flops")

    lines += ["### Training (the real step, `train_lib.make_train_step`)", ""]
    if sec.get("train"):
        lines += _table(
            ["setting", "batch, size", "s/step (median)", "runs (s)", "episodes/s",
             "CPU s/step", "peak memory", "first call (traces)", "load"],
            [[s, f"{r['batch_size']}, {r['size']}x{r['size']}",
              _g(r["wall_s"]), _runs(r), _g(r["episodes_per_s"]), _g(r["cpu_s"]),
              f"{r['peak_rss_mb'] / 1024:.2f} GiB", f"{r['first_call_s']:.1f} s",
              f"{r['load_1min']:.1f}"] for s, r in sec["train"].items()])
    lines += not_run("train")

    lines += ["### Inference (`serving.OneShotParser`, 11 classes present)", ""]
    if sec.get("infer"):
        rows = []
        for s, r in sec["infer"].items():
            one, shared = r["one_query"], r["shared_support"]
            rows.append([s, f"{r['size']}x{r['size']}, {r['head'].upper()}",
                         _g(one["latency_s"]), _runs(one), shared["queries"],
                         _g(shared["s_per_query"]), _g(shared["queries_per_s"]),
                         _g(shared["cpu_s"] / shared["queries"]),
                         f"{shared['load_1min']:.1f}"])
        lines += _table(["setting", "size, head", "one query: latency s (median)", "runs (s)",
                         "queries sharing a support", "s/query (median)", "queries/s",
                         "CPU s/query", "load"], rows)
    lines += not_run("infer")

    lines += ["### Achieved FLOP/s", "",
              "Counted FLOPs of the whole step or request over its median wall time, and "
              "over its CPU time.", ""]
    if d["achieved"]:
        lines += _table(
            ["figure", "GFLOP", "GFLOP/s", "of the matmul peak", "GFLOP per CPU-second"],
            [[k, _g(a["gflop"]), _g(a["gflops"]),
              f"{100 * a['fraction_of_peak']:.0f}%" if a["fraction_of_peak"] else "-",
              _g(a["gflops_per_cpu_s"])] for k, a in d["achieved"].items()])
    else:
        lines += ["Not measured: needs the flops section and the train or infer section.", ""]

    lines += ["### Targets (2-core CPU, 512x512)", ""]
    lines += _table(["target", "goal", "measured", "status"],
                    [[t["target"], t["goal"],
                      "-" if t["value"] is None else
                      (f"{100 * t['value']:.0f}%" if t["unit"] == "of peak" else
                       f"{_g(t['value'])} {t['unit']}"), t["status"]] for t in d["targets"]])

    lines += ["### GPU", ""]
    lines += _table(["figure", "status"], [[g["figure"], g["status"]] for g in d["gpu"]])
    return "\n".join(lines).rstrip() + "\n"


def _markdown_frame(path: str) -> tuple[str, int, int]:
    """(text, begin, end) of the Markdown file to write into: its text (the template for
    a new file, markers appended to a file without them) and the markers' offsets.
    Raises ValueError for broken markers (main checks it before measuring)."""
    text = MARKDOWN_TEMPLATE
    if os.path.exists(path):
        with open(path) as f:
            text = f.read()
    begin, end = text.find(BEGIN), text.find(END)
    if begin < 0 and end < 0:
        text = text.rstrip("\n") + f"\n\n{BEGIN}\n{END}\n"
        begin, end = text.find(BEGIN), text.find(END)
    elif begin < 0 or end < begin or text.count(BEGIN) > 1 or text.count(END) > 1:
        raise ValueError(f"{path}: expected one {BEGIN} line before one {END} line; fix the "
                         "markers (the generated part goes between them)")
    return text, begin, end


def write_markdown(path: str, report: dict) -> None:
    """Writes the report's Markdown between the `BEGIN` and `END` markers of `path`,
    leaving the rest of the file as it is (the hand-written "Changes and their
    effect"). A new file gets `MARKDOWN_TEMPLATE`; a file without markers gets them
    appended.

    Example:
        >>> write_markdown("docs/PERFORMANCE.md", json.load(open("docs/bench.json")))
    """
    text, begin, end = _markdown_frame(path)
    text = text[:begin] + f"{BEGIN}\n{summary_markdown(report)}{END}" + text[end + len(END):]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


# ----------------------------------------------------------------------------- merge
def merge_reports(old: dict, new: dict) -> dict:
    """`old` with what `new` measured: each section of `new` replaces the same
    section of `old`, but for the sections keyed by model setting (flops, train,
    infer), where only the settings measured are replaced. A section `new`
    skipped keeps `old`'s figures if it has some. `derive` is recomputed; the
    first run's command, date and machine stay, and `new`'s are added to
    "updates" with the sections (and settings) it replaced.

    Example:
        >>> merged = merge_reports(json.load(open("docs/bench.json")), flops_only_report)
    """
    import copy

    if bool(old.get("quick")) != bool(new.get("quick")):
        raise ValueError("--merge: one report is a --quick run and the other is not; their "
                         "figures do not mix (write this run to another --out)")
    merged = copy.deepcopy(old)
    sections, skipped = merged.setdefault("sections", {}), merged.setdefault("skipped", {})
    replaced = {}
    for name, section in new["sections"].items():
        if name in MODEL_SECTIONS and isinstance(sections.get(name), dict):
            sections[name].update(copy.deepcopy(section))
            replaced[name] = sorted(section)
        else:
            sections[name] = copy.deepcopy(section)
            replaced[name] = None
        skipped.pop(name, None)
    for name, why in new.get("skipped", {}).items():
        if name not in sections:
            skipped[name] = why
    merged["settings"] = {**old.get("settings", {}), **new.get("settings", {})}
    merged.setdefault("updates", []).append(
        {"command": new.get("command"), "date": new.get("date"), "sections": replaced,
         "skipped": dict(new.get("skipped", {})), "machine": new.get("machine")})
    merged["derive"] = derive(merged)
    return merged


# ----------------------------------------------------------------------------- CLI
SECTIONS = ("peak", "conv", "data", "flops", "train", "infer")
# Sections keyed by model setting: --merge replaces the settings measured, keeps the others.
MODEL_SECTIONS = ("flops", "train", "infer")


def _define_flags():
    from absl import flags

    flags.DEFINE_list("only", list(SECTIONS),
                      f"Sections to run, comma-separated, of {list(SECTIONS)}: peak (fp32 "
                      "matmul GFLOP/s), conv (the model's convolutions, GFLOP/s), data "
                      "(training episodes/s), flops (counted from the graph), train (training "
                      "step time and peak memory), infer (latency, queries/s).")
    flags.DEFINE_list("settings", list(MODEL_SETTINGS),
                      "Model settings of the flops, train and infer sections: "
                      + "; ".join(f"{k}: {v[2]}" for k, v in MODEL_SETTINGS.items())
                      + f". Default: all; with --quick {','.join(QUICK_SETTINGS)}.")
    flags.DEFINE_bool("quick", False,
                      "Tiny sizes (small backbone, 32x32 crops), a 256^3 matmul, single runs, "
                      "all in this process (no child processes), settings "
                      f"{','.join(QUICK_SETTINGS)} unless --settings is given, data section "
                      "2 batches: checks in under a minute that every section runs. Its "
                      "figures are checked against no target.")
    flags.DEFINE_string("data", "tfrecords/synthetic",
                        "Data section: a built ATR-OS dataset folder (python -m "
                        "popnet_tf.data.build_atr_os, or any training run builds "
                        "tfrecords/synthetic). Missing: the section is reported not measured.")
    flags.DEFINE_integer("steps", 50, "Data section: batches (of 2 episodes) per timed run.")
    flags.DEFINE_integer("repeats", 5, "Data, peak and conv sections: timed runs; the median "
                         "is reported with every run.")
    flags.DEFINE_integer("warmup", 20, "Data section: batches pulled before timing (fills "
                         "shuffle buffers, lets tf.data tune its parallelism).")
    flags.DEFINE_bool("cache_decoded", False, "Data section: keep decoded images in memory "
                      "(episodes.train_episodes(cache_decoded=True)).")
    flags.DEFINE_integer("model_repeats", 3, "Train and infer sections: timed calls; the "
                         "median is reported with every call.")
    flags.DEFINE_integer("model_warmup", 1, "Train and infer sections: untimed calls before "
                         "timing (the first one traces the graph).")
    flags.DEFINE_integer("queries", 16, "Infer section: queries sharing one support in one "
                         "request (the target is for 16).")
    flags.DEFINE_integer("matmul_size", 4096, "Peak section: n of the n x n x n fp32 matmul.")
    flags.DEFINE_integer("intra_threads", 0, "TensorFlow intra-op threads of the measuring "
                         "processes (0: TensorFlow's default, one per core).")
    flags.DEFINE_integer("inter_threads", 0, "TensorFlow inter-op threads of the measuring "
                         "processes (0: TensorFlow's default).")
    flags.DEFINE_enum("onednn", "on", sorted(ONEDNN),
                      "TF_ENABLE_ONEDNN_OPTS of the measuring child processes: on (1), off (0), "
                      "or inherit this process's environment. Not applied with --quick.")
    flags.DEFINE_string("out", None, "Write the report as JSON to this file: machine, "
                        "sections (every figure with its runs), derive (fractions of peak, "
                        "target checks, GPU rows).")
    flags.DEFINE_string("markdown", None, "Write the Markdown summary into this file (e.g. "
                        "docs/PERFORMANCE.md) between the <!-- bench:begin --> and "
                        "<!-- bench:end --> lines, keeping the rest of the file.")
    flags.DEFINE_string("summary", None, "Measure nothing: read this bench JSON and print its "
                        "Markdown (and write it with --markdown). --only does not apply.")
    flags.DEFINE_bool("merge", False, "With --out: read the report already at --out and "
                      "replace only what this run measures (the --only sections; in flops, "
                      "train and infer only the --settings measured), keep the rest, and "
                      "recompute derive; the run is listed in the report's updates. Refuses "
                      "to mix --quick and full-size figures.")
    return flags.FLAGS


# Counts a run needs, with their least value: 0 repeats ended the peak section in a
# StatisticsError traceback, 0 steps measured nothing and reported it.
_LEAST = {"steps": 1, "repeats": 1, "warmup": 0, "model_repeats": 1, "model_warmup": 0,
          "queries": 1, "matmul_size": 1, "intra_threads": 0, "inter_threads": 0}


def read_report(path: str, flag: str) -> dict:
    """A bench JSON report; missing or damaged: an OSError / ValueError naming the flag."""
    try:
        with open(path) as f:
            report = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{flag}={path}: not a bench JSON report ({e})") from None
    if not isinstance(report, dict) or "sections" not in report:
        raise ValueError(f"{flag}={path}: not a bench JSON report (no 'sections')")
    return report


def check_writable(path: str, flag: str) -> None:
    """Refuses an output file that cannot be written, before hours of measuring (they
    used to end in an IsADirectoryError or PermissionError traceback)."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"{flag}={path}: is a folder; give a file name")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise OSError(f"{flag}={path}: cannot write there ({e.strerror or e})") from None


def check_flags(f) -> dict | None:
    """Every flag value checked before measuring (counts, --out, --markdown and its
    markers, the report --merge reads). Returns that report (None without --merge)."""
    for name, least in _LEAST.items():
        value = getattr(f, name)
        if value < least:
            raise ValueError(f"--{name}={value}: must be >= {least}")
    for flag in ("out", "markdown"):
        if getattr(f, flag):
            check_writable(getattr(f, flag), f"--{flag}")
    if f.markdown:
        _markdown_frame(f.markdown)
    if f.merge and os.path.exists(f.out):
        return read_report(f.out, "--out")
    return None


def _command_line() -> str:
    return " ".join(["python -m popnet_tf.bench", *sys.argv[1:]])


def main(argv):
    del argv
    if FLAGS.summary:
        try:
            report = read_report(FLAGS.summary, "--summary")
            if FLAGS.markdown:
                check_writable(FLAGS.markdown, "--markdown")
                _markdown_frame(FLAGS.markdown)
        except (OSError, ValueError) as e:
            raise SystemExit(f"FATAL {type(e).__name__}: {e}") from None
        report["derive"] = derive(report)  # the current rules, on the stored figures
        print(summary_markdown(report))
        if FLAGS.markdown:
            write_markdown(FLAGS.markdown, report)
        return
    if FLAGS.merge and not FLAGS.out:
        raise SystemExit("--merge needs --out: the report to update")
    try:  # checked before hours of measuring
        saved = check_flags(FLAGS)
    except (OSError, ValueError) as e:
        raise SystemExit(f"FATAL {type(e).__name__}: {e}") from None
    if saved is not None:
        if bool(saved.get("quick")) != FLAGS.quick:
            raise SystemExit(f"--merge: {FLAGS.out} is {'' if saved.get('quick') else 'not '}"
                             "a --quick report and this run is "
                             f"{'' if FLAGS.quick else 'not '}--quick; their figures do not "
                             "mix (write this run to another --out)")
    unknown = [s for s in FLAGS.only if s not in SECTIONS]
    if unknown:
        raise SystemExit(f"--only: unknown sections {unknown}; choose from {list(SECTIONS)}")
    bad = [s for s in FLAGS.settings if s not in MODEL_SETTINGS]
    if bad:
        raise SystemExit(f"--settings: unknown {bad}; choose from {sorted(MODEL_SETTINGS)}")
    set_onednn(FLAGS.onednn)
    quick = FLAGS.quick
    settings = FLAGS.settings if FLAGS["settings"].present or not quick else list(QUICK_SETTINGS)
    common = dict(threads=(FLAGS.intra_threads, FLAGS.inter_threads), in_process=quick)
    model = dict(quick=quick, warmup=FLAGS.model_warmup,
                 repeats=1 if quick else FLAGS.model_repeats, **common)
    report = {"command": _command_line(),
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": {**machine(), "onednn_in_children": "this process's (--quick)" if quick
                          else FLAGS.onednn},
              "quick": quick, "settings": {s: MODEL_SETTINGS[s][2] for s in settings},
              "sections": {}, "skipped": {}}
    sections = report["sections"]
    # A CLI's result lines: stdout is the interface here.
    if "peak" in FLAGS.only:
        sections["peak"] = bench_peak(256 if quick else FLAGS.matmul_size,
                                      1 if quick else FLAGS.repeats, **common)
        print(f"peak: {sections['peak']['gflops']:.1f} GFLOP/s fp32 matmul "
              f"(load {sections['peak']['load_1min']:.1f})")
    if "conv" in FLAGS.only:
        sections["conv"] = bench_conv(quick, 1 if quick else FLAGS.repeats,
                                      warmup=1 if quick else 2, **common)
        for key, r in sections["conv"]["shapes"].items():
            print(f"conv {key} ({r['kind']}): forward {_g(r['forward']['gflops'])}, "
                  f"forward+backward {_g(r['forward_backward']['gflops'])} GFLOP/s "
                  f"(load {r['forward_backward']['load_1min']:.1f})")
    if "data" in FLAGS.only:
        if not os.path.isdir(FLAGS.data):
            report["skipped"]["data"] = (f"no dataset at {FLAGS.data} (build one with python -m "
                                         "popnet_tf.data.build_atr_os, or pass --data)")
            print(f"data: {report['skipped']['data']}")
        else:
            data = bench_data(FLAGS.data, steps=2 if quick else FLAGS.steps,
                              repeats=1 if quick else FLAGS.repeats,
                              warmup=1 if quick else FLAGS.warmup,
                              cache_decoded=FLAGS.cache_decoded)
            sections["data"] = data
            for name, r in data.items():
                print(f"data {name}: {r['episodes_per_s']:.1f} episodes/s (median of "
                      f"{len(r['runs'])}), {r['cpu_ms_per_episode']:.1f} ms CPU per episode "
                      f"(load {r['load_1min']:.1f})")
    if "flops" in FLAGS.only:
        sections["flops"] = bench_flops(settings, quick, **common)
        for s, r in sections["flops"].items():
            train = r.get("train_step", {}).get("gflop")
            print(f"flops {s}: encoder {_g(r['encoder']['gflop'] / 2)}, inference episode NCM "
                  f"{_g(r['episode_ncm']['gflop'] / 2)}, AGM {_g(r['episode_agm']['gflop'] / 2)}"
                  f", training step {_g(train / 2 if train else None)} GMACs")
    if "train" in FLAGS.only:
        sections["train"] = bench_train(settings, **model)
        for s, r in sections["train"].items():
            print(f"train {s}: {_g(r['wall_s'])} s/step, {_g(r['episodes_per_s'])} episodes/s, "
                  f"{_g(r['cpu_s'])} CPU s, peak {r['peak_rss_mb']:.0f} MiB "
                  f"(load {r['load_1min']:.1f})")
    if "infer" in FLAGS.only:
        sections["infer"] = bench_infer(settings, queries=FLAGS.queries, **model)
        for s, r in sections["infer"].items():
            print(f"infer {s}: one query {_g(r['one_query']['latency_s'])} s, "
                  f"{r['shared_support']['queries']} sharing a support "
                  f"{_g(r['shared_support']['s_per_query'])} s/query "
                  f"(load {r['shared_support']['load_1min']:.1f})")
    report["derive"] = derive(report)
    if saved is not None:
        report = merge_reports(saved, report)
        print(f"merged into {FLAGS.out}: {', '.join(sections) or 'nothing measured'}")
    for key, a in report["derive"]["achieved"].items():
        frac = a["fraction_of_peak"]
        print(f"{key}: {_g(a['gflops'])} GFLOP/s"
              + (f" = {100 * frac:.0f}% of peak" if frac else ""))
    dense = report["derive"]["conv"].get("dense") if report["derive"]["conv"] else None
    for name in ("forward", "forward_backward") if dense and dense["shapes"] else ():
        frac = dense[name]["fraction_of_peak"]
        print(f"conv/dense/{name}: {_g(dense[name]['gflops'])} GFLOP/s"
              + (f" = {100 * frac:.0f}% of peak" if frac else ""))
    for t in report["derive"]["targets"]:
        print(f"target: {t['target']} {t['goal']}: {t['status']}")
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(report, f, indent=2)
    if FLAGS.markdown:
        write_markdown(FLAGS.markdown, report)


if __name__ == "__main__":
    from absl import app

    FLAGS = _define_flags()
    from popnet_tf import cli
    app.run(main, flags_parser=cli.parse_flags)
