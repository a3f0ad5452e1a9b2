"""popnet_tf.bench: every section runs at a tiny size and returns its keys; the FLOP
counter and the derived figures against hand-computed values. The measurements
themselves are not tested (they depend on the machine and its load)."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from popnet_tf import bench

TIMING_KEYS = {"wall_s", "cpu_s", "load_1min", "first_call_s", "runs"}


# ---------------------------------------------------------------- FLOP counter
def test_count_flops_matmul_is_two_n_cubed():
    n = 32
    counted = bench.count_flops(tf.function(lambda a, b: tf.linalg.matmul(a, b)),
                                np.ones((n, n), np.float32), np.ones((n, n), np.float32))
    assert counted["flops"] == 2 * n**3 and not counted["shapes_from_run"]


def test_count_flops_takes_run_time_shapes():
    """Rows picked by tf.where (unknown count in the graph) times a [4, 5] weight:
    2 * rows * 4 * 5, rows known only when the graph runs."""
    weight = tf.Variable(tf.ones([4, 5]))

    @tf.function
    def picked_product(x, keep):
        rows = tf.gather_nd(x, tf.where(keep))  # [rows, 4]
        return tf.linalg.matmul(rows, weight)

    keep = np.array([True, False, True, True, False, True, True])
    counted = bench.count_flops(picked_product, np.ones((7, 4), np.float32), keep)
    assert counted["shapes_from_run"]
    assert counted["flops"] == 2 * keep.sum() * 4 * 5


def test_count_flops_reports_function_calls_it_cannot_see_into():
    """A tf.cond on a tensor becomes an If op whose branches the profiler skips."""

    @tf.function
    def branchy(a, flag):
        return tf.cond(flag, lambda: tf.linalg.matmul(a, a), lambda: a)

    counted = bench.count_flops(branchy, np.ones((8, 8), np.float32), np.array(True))
    assert counted["function_calls_not_counted"] == 1
    plain = bench.count_flops(tf.function(lambda a: tf.linalg.matmul(a, a)),
                              np.ones((8, 8), np.float32))
    assert plain["function_calls_not_counted"] == 0


def test_count_flops_counts_depthwise_gradients():
    """The profiler knows the depthwise forward (2 k² per output value); the bench
    adds both gradients at the same cost each."""
    x = np.ones((1, 6, 6, 3), np.float32)
    kernel = tf.Variable(tf.ones([3, 3, 3, 1]))

    @tf.function
    def grads(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.nn.depthwise_conv2d(x, kernel, [1, 1, 1, 1], "SAME")
            loss = tf.reduce_sum(tf.square(y))  # dL/dy = 2y: the forward runs too
        return tape.gradient(loss, [x, kernel])

    forward = 2 * 3 * 3 * (6 * 6 * 3)  # 2 k_h k_w per output value
    counted = bench.count_flops(grads, x)["flops"]
    assert 3 * forward <= counted <= 3 * forward + 4 * x.size  # + a few elementwise ops


@pytest.mark.parametrize("padding,stride,dilation", [("VALID", 1, 1), ("VALID", 2, 1),
                                                    ("SAME", 2, 1), ("SAME", 1, 3)])
def test_count_flops_conv_gradients_cost_the_forward_each(padding, stride, dilation):
    """Each conv gradient costs 2 k² C_in per value of the output gradient, what
    the forward costs. TensorFlow's own count goes by the forward's input over
    the strides: with "valid" padding, as in the space-to-batch convs of an atrous
    conv (dilation 3 here; the small backbone's ASPP), it counted 1.3-2.8x that
    (a gradient step of 3.6-6.6x the forward here), and with a stride that does
    not divide the size, less (2.7x)."""
    x = np.ones((2, 9, 9, 4), np.float32)
    kernel = tf.Variable(tf.ones([3, 3, 4, 5]))

    def conv(x):
        return tf.nn.convolution(x, kernel, strides=stride, padding=padding,
                                 dilations=dilation)

    @tf.function
    def grads(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.square(conv(x)))  # dL/dy = 2y: the forward runs too
        return tape.gradient(loss, [x, kernel])

    forward = bench.count_flops(tf.function(conv), x)["flops"]
    out = tf.function(conv)(x)
    if dilation == 1:  # a plain Conv2D: 2 k² C_in per output value
        assert forward == 2 * 3 * 3 * 4 * out.shape.num_elements()
    counted = bench.count_flops(grads, x)["flops"]
    assert 3 * forward <= counted <= 3 * forward + 4 * out.shape.num_elements()


def test_count_flops_skips_ops_nothing_uses():
    """An expensive matmul whose result is dropped is pruned by the runtime: only
    the cheap one returned is counted."""

    @tf.function
    def cheap(a, b):
        unused = tf.linalg.matmul(b, b)  # 2 * 128^3, never run  # noqa: F841
        return tf.linalg.matmul(a, a)

    counted = bench.count_flops(cheap, np.ones((4, 4), np.float32),
                                np.ones((128, 128), np.float32))
    assert counted["flops"] == 2 * 4**3 and counted["ops_pruned"] >= 1


def test_count_flops_gradients_of_some_variables_only():
    """A tape watches both weights (tf.Variables are trainable, as under a frozen
    Keras layer: the bench's KIM stages) and builds gradients through both; only
    dL/dw2 is fetched, so the runtime runs the forward pass and h^T dy, not
    dy w2^T nor x^T dh."""
    w1, w2 = tf.Variable(tf.ones([16, 32])), tf.Variable(tf.ones([32, 4]))

    @tf.function
    def grad_w2(x):
        with tf.GradientTape() as tape:
            y = tf.linalg.matmul(tf.linalg.matmul(x, w1), w2)  # h = x w1 [8, 32]; y [8, 4]
            loss = tf.reduce_sum(tf.square(y))  # dL/dy = 2y: the forward runs too
        return tape.gradient(loss, [w2])

    forward = 2 * 8 * 16 * 32 + 2 * 8 * 32 * 4
    needed = forward + 2 * 32 * 8 * 4                    # + dL/dw2 = h^T dy
    built = needed + 2 * 8 * 4 * 32 + 2 * 16 * 8 * 32    # + dL/dh, dL/dw1 (never run)
    graph = grad_w2.get_concrete_function(np.ones((8, 16), np.float32)).graph
    assert sum(op.type == "MatMul" for op in graph.get_operations()) == 5  # built: 5...
    counted = bench.count_flops(grad_w2, np.ones((8, 16), np.float32))
    assert needed <= counted["flops"] <= needed + 4 * 8 * 4 < built  # ...run: 3 (+ y²)
    assert counted["ops_pruned"] > 0


# ---------------------------------------------------------------- helpers
def test_band_mask_holds_every_class():
    mask = bench.band_mask(48, (1, 2, 3, 4, 6, 8, 10, 11))
    assert mask.shape == (48, 48) and mask.dtype == np.int32
    assert set(np.unique(mask)) == {0, 1, 2, 3, 4, 6, 8, 10, 11}
    shifted = bench.band_mask(48, (1, 2, 3, 4, 6, 8, 10, 11), 0.5)
    assert set(np.unique(shifted)) == set(np.unique(mask)) and (shifted != mask).any()


def test_load_config_overrides():
    config = bench.load_config("oneshot")
    assert not config.model.kim and config.model.backbone == "xception"
    assert config.model.agm_hidden_convs == 2 and config.data.crop_size == 512
    assert config.train.batch_size == 2
    quick = bench.load_config("paper", quick=True)
    assert quick.model.kim and quick.model.backbone == "small" and quick.data.crop_size == 32
    with pytest.raises(ValueError, match="unknown model setting"):
        bench.load_config("nope")


def _timing(wall_s, cpu_s, runs=(None,)):
    return {"wall_s": wall_s, "cpu_s": cpu_s, "load_1min": 0.5, "first_call_s": 2 * wall_s,
            "warmup": 1, "repeats": len(runs),
            "runs": [{"wall_s": wall_s, "cpu_s": cpu_s, "load_1min": 0.5} for _ in runs]}


def _conv_row(key, kind, forward, forward_backward):
    """A conv section row: forward and forward_backward as (GFLOP, median s)."""
    row = {"key": key, "what": f"{key} conv", "kind": kind, "batch": 2, "size": 32,
           "out_size": 32, "cin": 8, "cout": 8, "k": 3, "stride": 1}
    for name, (gflop, wall_s) in (("forward", forward), ("forward_backward", forward_backward)):
        row[name] = {"flops": int(gflop * 1e9), "gflop": gflop, "gflops": gflop / wall_s,
                     "gflops_per_cpu_s": gflop / wall_s / 2, **_timing(wall_s, 2 * wall_s)}
    return row


def fake_conv_section():
    """Dense: 60 GFLOP fwd+bwd in 0.7 s and 6 in 0.1 s, together 66 / 0.8 = 82.5
    GFLOP/s; forward 20 in 0.25 s and 2 in 0.05 s, 22 / 0.3. The stem and the
    depthwise conv are slow (with them the dense figure would fall below 75%)."""
    rows = [_conv_row("decoder_3x3", "dense", (20.0, 0.25), (60.0, 0.7)),
            _conv_row("middle_1x1", "dense", (2.0, 0.05), (6.0, 0.1)),
            _conv_row("stem_3x3_s2", "stem", (0.2, 0.1), (0.4, 0.2)),
            _conv_row("depthwise_3x3", "depthwise", (0.02, 0.01), (0.06, 0.03))]
    return {"batch": 2, "dtype": "float32", "quick": False,
            "shapes": {r["key"]: r for r in rows}}


def fake_report(size=512, quick=False, queries=16, gpus=()):
    """A report as main() builds it, with round numbers: peak 100 GFLOP/s; oneshot
    training step 500 GFLOP in 10 s; one query 90 GFLOP (features 40) in 3 s; 4 or
    16 queries sharing a support; convolutions: `fake_conv_section`."""
    return {
        "command": "python -m popnet_tf.bench", "date": "2026-01-01 00:00 UTC", "quick": quick,
        "machine": {"cpus": 2, "cpu_model": "test CPU", "platform": "Linux", "python": "3.11",
                    "tensorflow": "2.21.0", "keras": "3", "gpus": list(gpus),
                    "load_average": [0.5, 0.5, 0.5], "onednn_in_children": "on"},
        "settings": {"oneshot": "one one-shot stage"}, "skipped": {},
        "sections": {
            "peak": {"gflops": 100.0, "gflops_per_cpu_s": 50.0, "size": 4096,
                     **_timing(1.37, 2.7, runs=(1, 2, 3))},
            "conv": fake_conv_section(),
            "data": {"512x512": {"episodes_per_s": 120.0, "runs": [110.0, 120.0, 130.0],
                                 "cpu_ms_per_episode": 9.0, "load_1min": 0.5},
                     "112x112": {"episodes_per_s": 80.0, "runs": [80.0],
                                 "cpu_ms_per_episode": 3.0, "load_1min": 0.5}},
            "flops": {"oneshot": {"size": size, "batch_size": 2,
                                  "encoder": {"gflop": 30.0}, "features": {"gflop": 40.0},
                                  "episode_ncm": {"gflop": 90.0},
                                  "episode_agm": {"gflop": 120.0},
                                  "train_step": {"gflop": 500.0}}},
            "train": {"oneshot": {"size": size, "batch_size": 2, "episodes_per_s": 0.2,
                                  "peak_rss_mb": 4096.0, **_timing(10.0, 20.0)}},
            "infer": {"oneshot": {
                "size": size, "head": "ncm", "present_classes": 11,
                "one_query": {"latency_s": 3.0, **_timing(3.0, 6.0)},
                "shared_support": {"queries": queries, "queries_per_s": queries / 5.0,
                                   "s_per_query": 5.0 / queries, **_timing(5.0, 10.0)}}}}}


def test_achieved_flops_fraction_of_peak():
    achieved = bench.derive(fake_report(queries=4))["achieved"]
    assert achieved["train/oneshot"]["gflops"] == pytest.approx(50.0)
    assert achieved["train/oneshot"]["fraction_of_peak"] == pytest.approx(0.5)
    assert achieved["train/oneshot"]["gflops_per_cpu_s"] == pytest.approx(25.0)
    assert achieved["infer/oneshot/one_query"]["gflops"] == pytest.approx(30.0)
    # 4 queries + 1 support: 5 feature passes (200) + 4 heads (4 * 10) = 240 GFLOP.
    assert achieved["infer/oneshot/shared_support"]["gflop"] == pytest.approx(240.0)
    assert achieved["infer/oneshot/shared_support"]["fraction_of_peak"] == pytest.approx(0.48)


def test_achieved_flops_pairs_only_counts_of_the_same_size_and_batch():
    """A train figure at batch 2 with a FLOP count at batch 8 (a merged report, or
    a config changed between runs) is no achieved figure."""
    report = fake_report()
    report["sections"]["flops"]["oneshot"]["batch_size"] = 8
    achieved = bench.derive(report)["achieved"]
    assert "train/oneshot" not in achieved and "infer/oneshot/one_query" in achieved
    report["sections"]["flops"]["oneshot"]["size"] = 112
    targets = {t["key"]: t["status"] for t in bench.derive(report)["targets"]}
    assert not bench.derive(report)["achieved"]
    assert targets["train_fraction_of_peak"] == ("not measured (needs the peak section and a "
                                                 "flops count of the same size and batch)")


def test_targets_met_not_met():
    targets = bench.derive(fake_report())["targets"]
    status = {t["target"]: t["status"] for t in targets}
    assert {t["key"] for t in targets} == {key for key, *_ in bench.TARGETS}
    assert all(s in ("met", "not met") for s in status.values()), status
    assert status["training step, one one-shot stage, batch 2"] == "met"         # 10 s <= 21
    assert status["inference (NCM), one query alone"] == "not met"               # 3 s > 2
    assert status["inference (NCM), 16 queries sharing a support, per query"] == "met"
    # 16 queries: 16 * 90 - 15 * 40 = 840 GFLOP in 5 s = 168 GFLOP/s > the 100 peak.
    shared = [t for t in targets if t["key"] == "infer_fraction_of_peak"][0]
    assert shared["value"] == pytest.approx(1.68) and shared["status"] == "met"
    assert shared["goal"] == ">= 75%"
    data = {t["target"]: t["status"] for t in targets if t["key"] == "data_episodes_per_s"}
    assert data == {"data pipeline, training episodes/s at 512x512": "met",
                    "data pipeline, training episodes/s at 112x112": "not met"}


@pytest.mark.parametrize("wall_s,status", [(21.0, "met"), (21.5, "not met")])
def test_train_step_target_is_21_s(wall_s, status):
    report = fake_report()
    report["sections"]["train"]["oneshot"]["wall_s"] = wall_s
    row = [t for t in bench.derive(report)["targets"] if t["key"] == "train_step_s"][0]
    assert row["status"] == status and row["goal"] == "<= 21 s" and row["value"] == wall_s


def test_targets_not_measured_and_why():
    report = fake_report(size=32, quick=True)
    quick = {t["key"]: t["status"] for t in bench.derive(report)["targets"]}
    assert quick["train_step_s"] == "not measured (measured at 32x32, the target is at 512x512)"
    assert quick["data_episodes_per_s"] == "not measured (--quick: one short run)"
    eight = {t["key"]: t["status"] for t in bench.derive(fake_report(queries=8))["targets"]}
    assert eight["infer_shared_s_per_query"].startswith("not measured (8 queries")
    assert eight["infer_one_query_s"] == "not met"
    report = fake_report()
    del report["sections"]["train"], report["sections"]["peak"], report["sections"]["data"]
    report["skipped"]["data"] = "no dataset at nowhere"
    missing = {t["key"]: t["status"] for t in bench.derive(report)["targets"]}
    assert missing["train_step_s"] == ("not measured (the train section (oneshot) "
                                       "was not run)")
    assert missing["infer_fraction_of_peak"] == ("not measured (needs the peak section and a "
                                                 "flops count of the same size and batch)")
    assert missing["data_episodes_per_s"] == "not measured (no dataset at nowhere)"


def test_gpu_rows():
    rows = bench.derive(fake_report())["gpu"]
    assert rows and all(r["status"] == "not measured (no GPU lent to this task)" for r in rows)
    with_gpu = bench.derive(fake_report(gpus=["/physical_device:GPU:0"]))["gpu"]
    assert all("GPU:0" in r["status"] for r in with_gpu)


def test_conv_efficiency_dense_row():
    report = fake_report()
    conv = bench.derive(report)["conv"]
    dense = conv["dense"]
    assert dense["shapes"] == ["decoder_3x3", "middle_1x1"]  # not the stem, not depthwise
    assert dense["forward_backward"]["gflop"] == pytest.approx(66.0)
    assert dense["forward_backward"]["wall_s"] == pytest.approx(0.8)
    assert dense["forward_backward"]["fraction_of_peak"] == pytest.approx(0.825)
    assert dense["forward"]["gflops"] == pytest.approx(22.0 / 0.3)
    assert conv["shapes"]["stem_3x3_s2"]["forward_backward"]["fraction_of_peak"] == (
        pytest.approx(0.02))
    row = [t for t in bench.derive(report)["targets"]
           if t["key"] == "conv_dense_fraction_of_peak"][0]
    assert row["status"] == "met" and row["goal"] == ">= 75%"
    assert row["value"] == pytest.approx(0.825)
    assert row["target"].startswith("dense convolution (the model's dense conv shapes, "
                                    "forward+backward)")
    # Slower dense convs: 66 GFLOP in 1.0 s = 66% of the 100 GFLOP/s peak.
    report["sections"]["conv"]["shapes"]["decoder_3x3"]["forward_backward"]["wall_s"] = 0.9
    row = [t for t in bench.derive(report)["targets"]
           if t["key"] == "conv_dense_fraction_of_peak"][0]
    assert row["status"] == "not met" and row["value"] == pytest.approx(0.66)


def test_conv_target_not_measured_and_why():
    def status(report):
        return [t["status"] for t in bench.derive(report)["targets"]
                if t["key"] == "conv_dense_fraction_of_peak"][0]

    report = fake_report()
    del report["sections"]["peak"]
    assert status(report) == "not measured (needs the peak section)"
    assert bench.derive(report)["conv"]["dense"]["forward"]["fraction_of_peak"] is None
    del report["sections"]["conv"]
    assert status(report) == "not measured (the conv section was not run)"
    assert bench.derive(report)["conv"] == {}
    report = fake_report()
    report["sections"]["conv"]["quick"] = True
    assert status(report) == "not measured (measured at --quick's tiny shapes)"


def test_conv_flops_formula_matches_the_counter():
    """2·H·W·C_in·C_out·k² per image forward (depthwise: C_out = 1), each gradient
    as much (the stem: the filter gradient only), against the graph's count."""
    for shape in bench.conv_shapes(quick=True):
        formula = bench.conv_flops(shape)
        (forward, args), (forward_backward, fb_args) = bench.conv_functions(shape)
        assert bench.count_flops(forward, *args)["flops"] == formula["forward"], shape["key"]
        assert (bench.count_flops(forward_backward, *fb_args)["flops"]
                == formula["forward_backward"]), shape["key"]
    full = {s["key"]: s for s in bench.conv_shapes()}
    assert bench.conv_flops(full["middle_1x1"])["forward"] == 2 * 2 * 32 * 32 * 728 * 728
    assert bench.conv_flops(full["decoder_3x3"])["forward_backward"] == (
        3 * 2 * 2 * 128 * 128 * 304 * 256 * 9)
    stem = bench.conv_flops(full["stem_3x3_s2"])
    assert stem["out_size"] == 256 and stem["forward_backward"] == 2 * stem["forward"]
    assert bench.conv_flops(full["depthwise_3x3"])["forward"] == 2 * 2 * 32 * 32 * 728 * 9
    assert [s["kind"] for s in full.values()].count("dense") == 4


def test_merge_reports_replaces_only_what_was_measured():
    old = fake_report()
    old["settings"]["paper"] = "paper"
    old["sections"]["flops"]["paper"] = {**old["sections"]["flops"]["oneshot"],
                                         "train_step": {"gflop": 5844.0}}
    new = {"command": "python -m popnet_tf.bench --only flops --settings paper --merge",
           "date": "2026-01-02 00:00 UTC", "quick": False, "machine": {"cpus": 2},
           "settings": {"paper": "paper"}, "skipped": {"data": "no dataset at nowhere"},
           "sections": {"flops": {"paper": {**old["sections"]["flops"]["oneshot"],
                                            "train_step": {"gflop": 3734.0}}},
                        "peak": {**old["sections"]["peak"], "gflops": 200.0}}}
    merged = bench.merge_reports(old, new)
    assert merged["sections"]["flops"]["paper"]["train_step"]["gflop"] == 3734.0
    assert merged["sections"]["flops"]["oneshot"] == old["sections"]["flops"]["oneshot"]
    assert merged["sections"]["train"] == old["sections"]["train"]
    assert merged["sections"]["data"] == old["sections"]["data"]  # kept: skipped this time
    assert "data" not in merged["skipped"] and merged["sections"]["peak"]["gflops"] == 200.0
    assert merged["command"] == old["command"] and merged["machine"] == old["machine"]
    assert merged["updates"][-1]["sections"] == {"flops": ["paper"], "peak": None}
    # derive is recomputed with the new peak: 500 GFLOP in 10 s = 25% of 200.
    assert merged["derive"]["achieved"]["train/oneshot"]["fraction_of_peak"] == (
        pytest.approx(0.25))
    assert old["sections"]["flops"]["paper"]["train_step"]["gflop"] == 5844.0  # not mutated
    text = bench.summary_markdown(merged)
    assert ("Updated by `python -m popnet_tf.bench --only flops --settings paper --merge` on "
            "2026-01-02 00:00 UTC: flops (paper); peak.") in text
    with pytest.raises(ValueError, match="--quick"):
        bench.merge_reports(old, {**new, "quick": True})


def test_summary_markdown_tables():
    text = bench.summary_markdown(fake_report())
    for heading in ("fp32 matrix-multiply peak", "Convolutions", "Data pipeline", "FLOPs",
                    "Training", "Inference", "Achieved FLOP/s", "Targets", "GPU"):
        assert f"### {heading}" in text, heading
    # decoder: 20 GFLOP in 250 ms = 80 GFLOP/s; 60 in 700 ms = 85.7 GFLOP/s.
    assert "| decoder_3x3 conv | dense | 20 | 250 | 80 | 80% | 60 | 700 | 85.7 | 86% |" in text
    assert "| stem_3x3_s2 conv | not dense (3 input channels) |" in text
    assert ("Dense shapes together (their total FLOPs / their total time): forward 73.3 "
            "GFLOP/s (73% of the matmul peak), forward+backward 82.5 GFLOP/s (82%).") in text
    assert ("| dense convolution (the model's dense conv shapes, forward+backward): achieved "
            "/ matmul peak | >= 75% | 82% | met |") in text
    assert "| 4096^3 fp32 | 100 |" in text  # median of 3 runs
    assert "| oneshot | 512x512 | 15 | 20 | 45 | 60 | 250 (125 per episode) |" in text  # GMACs
    assert "| inference (NCM), one query alone | <= 2 s | 3 s | not met |" in text
    assert "not measured (no GPU lent to this task)" in text
    assert "--quick" not in text and "--quick" in bench.summary_markdown(fake_report(quick=True))


def test_write_markdown_keeps_the_hand_written_part(tmp_path):
    path = tmp_path / "docs" / "PERFORMANCE.md"
    bench.write_markdown(str(path), fake_report())  # a new file: the template
    text = path.read_text()
    assert text.count(bench.BEGIN) == 1 and text.count(bench.END) == 1
    assert text.index(bench.BEGIN) < text.index("### Targets") < text.index(bench.END)
    assert text.index(bench.END) < text.index("## Changes and their effect")
    # The lead writes above and below the markers; a second run replaces only between.
    text = text.replace("## Changes and their effect",
                        "## Changes and their effect\n\n- AGM shared first conv: 30 s -> 20 s")
    path.write_text("Intro by hand.\n" + text)
    bench.write_markdown(str(path), fake_report(quick=True))
    again = path.read_text()
    assert again.startswith("Intro by hand.\n")
    assert "- AGM shared first conv: 30 s -> 20 s" in again
    assert again.count(bench.BEGIN) == 1 and again.count("### Targets") == 1
    assert "--quick" in again.split(bench.BEGIN)[1].split(bench.END)[0]
    assert again.split(bench.END)[1] == text.split(bench.END)[1]


def test_write_markdown_appends_markers_or_refuses_broken_ones(tmp_path):
    path = tmp_path / "notes.md"
    path.write_text("# Notes\n\nkept\n")
    bench.write_markdown(str(path), fake_report())
    text = path.read_text()
    assert text.startswith("# Notes\n\nkept\n\n" + bench.BEGIN) and text.endswith(bench.END + "\n")
    path.write_text(f"{bench.END}\n{bench.BEGIN}\n")
    with pytest.raises(ValueError, match="markers"):
        bench.write_markdown(str(path), fake_report())
    assert path.read_text() == f"{bench.END}\n{bench.BEGIN}\n"  # left as it was


# ---------------------------------------------------------------- sections (child processes)
def test_peak_section():
    r = bench.bench_peak(size=128, repeats=1)
    assert TIMING_KEYS <= r.keys() and {"gflops", "gflops_per_cpu_s", "peak_rss_mb"} <= r.keys()
    assert r["gflops"] > 0 and r["size"] == 128


def test_flops_section_quick():
    r = bench.bench_flops(["oneshot"], quick=True)["oneshot"]
    for key in ("encoder", "features", "episode_ncm", "episode_agm", "train_step"):
        assert r[key]["flops"] > 0, key
    # One query and its support: two feature passes plus the heads; the AGM adds work.
    assert r["episode_ncm"]["gflop"] > 2 * r["features"]["gflop"]
    assert r["episode_agm"]["gflop"] > r["episode_ncm"]["gflop"]
    assert r["train_step"]["shapes_from_run"]  # the AGM's present-class batch


@pytest.mark.benchmark  # 48 s: run with `python -m pytest -m benchmark tests/test_bench.py`
def test_flops_paper_train_step_is_oneshot_plus_frozen_forwards():
    """configs/paper.py stage 3 trains what the oneshot setting trains, plus its
    KIM (forward and backward), plus forward passes of the frozen stages 1-2 on
    its 4 images (2 queries, 2 supports); no backward through the frozen stages.
    features(paper) = 3 encoders + 2 KIMs; features(oneshot) = 1 encoder."""
    r = bench.bench_flops(["oneshot", "paper"], quick=True)
    one, paper = r["oneshot"], r["paper"]
    kim = (paper["features"]["flops"] - 3 * paper["encoder"]["flops"]) / 2
    frozen = paper["features"]["flops"] - one["features"]["flops"] - kim  # 2 enc + KIM 2
    images = 2 * paper["batch_size"]
    expected = one["train_step"]["flops"] + images * (frozen + 3 * kim)
    assert paper["train_step"]["flops"] == pytest.approx(expected, rel=0.01)
    assert paper["train_step"]["ops_pruned"] > one["train_step"]["ops_pruned"]


def test_train_and_infer_sections_quick():
    train = bench.bench_train(["oneshot"], quick=True, repeats=1)["oneshot"]
    assert TIMING_KEYS <= train.keys()
    assert {"episodes_per_s", "peak_rss_mb", "rss_before_steps_mb", "batch_size"} <= train.keys()
    assert train["present_classes"] == 8 and train["episodes_per_s"] > 0
    infer = bench.bench_infer(["oneshot"], quick=True, repeats=1, queries=3)["oneshot"]
    assert TIMING_KEYS <= infer["one_query"].keys() and infer["one_query"]["latency_s"] > 0
    assert infer["shared_support"]["queries"] == 3
    assert infer["shared_support"]["queries_per_s"] == pytest.approx(
        3 / infer["shared_support"]["wall_s"])


def test_conv_section_quick():
    r = bench.bench_conv(quick=True, repeats=1, warmup=1, in_process=True)
    assert r["batch"] == 2 and r["dtype"] == "float32" and r["quick"]
    assert list(r["shapes"]) == [s["key"] for s in bench.conv_shapes(quick=True)]
    for key, row in r["shapes"].items():
        assert row["kind"] in bench.CONV_KINDS, key
        for name in ("forward", "forward_backward"):
            assert TIMING_KEYS <= row[name].keys(), (key, name)
            assert row[name]["flops"] == bench.conv_flops(row)[name]
            assert row[name]["gflops"] == pytest.approx(row[name]["gflop"] / row[name]["wall_s"])
    derived = bench.conv_efficiency({"sections": {"conv": r, "peak": {"gflops": 100.0}}})
    assert derived["dense"]["shapes"] == ["middle_1x1", "aspp_1x1", "decoder_3x3", "agm_3x3"]


def test_child_failure_names_the_function():
    with pytest.raises(RuntimeError, match="_train_child"):
        bench._in_child("_train_child", setting="nope")


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    from popnet_tf.data import build_atr_os, synth

    raw = str(tmp_path_factory.mktemp("atr"))
    out = str(tmp_path_factory.mktemp("atr_os"))
    synth.generate(raw, 40, seed=0, progress=False)
    build_atr_os.build(raw, out, num_query_train=10, num_test_query=10, num_test_support=10,
                       num_workers=0, progress=False)
    return out


def test_data_section(tiny_dataset):
    r = bench.bench_data(tiny_dataset, steps=1, repeats=1, warmup=1)
    from configs import synthetic_cpu

    crop = synthetic_cpu.get_config().data.crop_size
    assert set(r) == {"512x512", f"{crop}x{crop}"}
    for name, entry in r.items():
        assert {"episodes_per_s", "runs", "cpu_ms_per_episode", "load_1min"} <= entry.keys()
        assert entry["episodes_per_s"] > 0, name


def test_cli_writes_json_and_markdown(tmp_path):
    out, md = tmp_path / "bench.json", tmp_path / "PERF.md"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run([sys.executable, "-m", "popnet_tf.bench", "--only", "peak,data",
                           "--quick", "--data", str(tmp_path / "none"), "--out", str(out),
                           "--markdown", str(md)], cwd=bench._REPO, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "peak:" in proc.stdout and "data: no dataset at" in proc.stdout
    report = json.loads(out.read_text())
    assert {"machine", "sections", "derive", "quick", "command", "date"} <= report.keys()
    assert report["machine"]["cpus"] == os.cpu_count() and "gflops" in report["sections"]["peak"]
    assert report["sections"]["peak"]["repeats"] == len(report["sections"]["peak"]["runs"]) == 1
    assert {"achieved", "targets", "gpu"} <= report["derive"].keys()
    assert all(t["status"].startswith("not measured") for t in report["derive"]["targets"])
    text = md.read_text()
    assert "### fp32 matrix-multiply peak" in text and "no dataset at" in text
    # --summary rewrites the Markdown from the JSON without measuring.
    md.write_text(text.replace("## Changes and their effect", "## Changes and their effect\n- x"))
    proc = subprocess.run([sys.executable, "-m", "popnet_tf.bench", "--summary", str(out),
                           "--markdown", str(md)], cwd=bench._REPO, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "### Targets" in proc.stdout and "\n- x\n" in md.read_text()


def test_cli_merge_updates_only_the_sections_run(tmp_path):
    """--only peak --merge into a saved report: the new peak replaces the old one,
    every other section stays, derive is recomputed, the run is listed."""
    out, md = tmp_path / "bench.json", tmp_path / "PERF.md"
    saved = fake_report(size=32, quick=True)
    out.write_text(json.dumps(saved))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.run([sys.executable, "-m", "popnet_tf.bench", "--quick", "--only", "peak",
                           "--out", str(out), "--merge", "--markdown", str(md)],
                          cwd=bench._REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"merged into {out}: peak" in proc.stdout
    report = json.loads(out.read_text())
    assert report["sections"]["peak"]["size"] == 256  # --quick's matmul, not the saved 4096
    for name in ("conv", "data", "flops", "train", "infer"):
        assert report["sections"][name] == saved["sections"][name], name
    assert report["command"] == saved["command"]
    assert report["updates"][0]["sections"] == {"peak": None}
    peak = report["sections"]["peak"]["gflops"]
    assert report["derive"]["achieved"]["train/oneshot"]["fraction_of_peak"] == (
        pytest.approx(50.0 / peak))
    assert "Updated by `python -m popnet_tf.bench --quick --only peak" in md.read_text()
    # A full-size run does not merge into a --quick report; --merge needs --out.
    proc = subprocess.run([sys.executable, "-m", "popnet_tf.bench", "--only", "peak",
                           "--matmul_size", "64", "--repeats", "1", "--out", str(out),
                           "--merge"], cwd=bench._REPO, env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "--quick" in proc.stderr
    assert json.loads(out.read_text()) == report  # left as it was
    proc = subprocess.run([sys.executable, "-m", "popnet_tf.bench", "--only", "peak", "--merge"],
                          cwd=bench._REPO, env=env, capture_output=True, text=True)
    assert proc.returncode != 0 and "--merge needs --out" in proc.stderr


def test_help_explains_every_flag():
    proc = subprocess.run([sys.executable, "-m", "popnet_tf.bench", "--helpshort"],
                          cwd=bench._REPO, capture_output=True, text=True)
    assert "Benchmarks" in proc.stdout, proc.stderr[-2000:]  # absl exits 1 after help
    for flag in ("only", "settings", "quick", "data", "steps", "repeats", "warmup",
                 "cache_decoded", "model_repeats", "model_warmup", "queries", "matmul_size",
                 "intra_threads", "inter_threads", "onednn", "out", "markdown", "summary",
                 "merge"):
        # Every flag with a sentence of help ("--f: Text", "--[no]f: Text", "--f: <a|b>: Text").
        assert re.search(rf"--(\[no\])?{flag}: (<[a-z|]+>: )?[A-Z]\w+", proc.stdout), flag


def _flags(**changes):
    import types

    values = {"steps": 50, "repeats": 5, "warmup": 20, "model_repeats": 3, "model_warmup": 1,
              "queries": 16, "matmul_size": 4096, "intra_threads": 0, "inter_threads": 0,
              "out": None, "markdown": None, "merge": False}
    return types.SimpleNamespace(**{**values, **changes})


@pytest.mark.parametrize("changes, error, message", [
    ({"repeats": 0}, ValueError, "--repeats=0: must be >= 1"),     # StatisticsError traceback
    ({"steps": 0}, ValueError, "--steps=0"),                        # measured nothing, rc 0
    ({"out": "DIR"}, IsADirectoryError, "--out=.*is a folder"),     # traceback after measuring
    ({"markdown": "DIR"}, IsADirectoryError, "--markdown=.*is a folder"),
    ({"out": "FILE/bench.json"}, OSError, "--out=.*cannot write"),
    ({"markdown": "BROKEN"}, ValueError, "expected one"),
    ({"out": "DAMAGED", "merge": True}, ValueError, "--out=.*not a bench JSON report"),
])
def test_flags_are_checked_before_measuring(tmp_path, changes, error, message):
    (tmp_path / "FILE").write_text("")
    (tmp_path / "BROKEN").write_text(f"{bench.END}\n{bench.BEGIN}\n")
    (tmp_path / "DAMAGED").write_text('{"quick": tru')
    paths = {"DIR": str(tmp_path), "FILE/bench.json": str(tmp_path / "FILE" / "bench.json")}
    changes = {k: paths.get(v, str(tmp_path / v)) if isinstance(v, str) else v
               for k, v in changes.items()}
    with pytest.raises(error, match=message):
        bench.check_flags(_flags(**changes))
    assert bench.check_flags(_flags(out=str(tmp_path / "new" / "b.json"))) is None


def test_summary_of_a_missing_report_names_the_flag(tmp_path):
    with pytest.raises(FileNotFoundError):
        bench.read_report(str(tmp_path / "none.json"), "--summary")
    (tmp_path / "x.json").write_text("[]")
    with pytest.raises(ValueError, match="--summary=.*not a bench JSON report"):
        bench.read_report(str(tmp_path / "x.json"), "--summary")
