"""Fuzzing the image door and every layer: the only outcomes are a result or ValueError/TypeError with a message.

The contract (checked by ``bench.hostile.check_image`` / ``check_layer_call``, shared with bench/hostile.py):

* ``load_image(bytes)``: a fully decoded PIL image within the pixel limit, which ``to_rgb_array`` turns into
  uint8 (H, W, 3), or ValueError/TypeError with a non-empty message;
* a layer call: a tensor of the input's shape and dtype, or ValueError/TypeError with a non-empty message.
  A call that raised leaves every parameter and buffer bit-for-bit unchanged; after a call that returned,
  parameters and buffers are finite. What we accept in the output: sample n may be non-finite only when
  sample n of the input holds NaN/inf or a value beyond 1e15 in magnitude (squares beyond ~1e38 overflow
  float32 statistics), i.e. NaN propagates within its own sample (per-sample layers, eval mode, contexts
  with a single sample) and never to the rest of the batch. A training minibatch whose statistics are not
  finite is refused (ValueError naming the layer) before running statistics / MN's queue are touched.
  float16/bfloat16 output equals the float32 computation on the same values cast to that dtype, so it is
  inf only where the exact value is out of the dtype's range (eval-mode float16 output above 65504).

Hypothesis runs derandomized (the same examples on every run) and bounded, so CI is deterministic.
"""
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench import hostile  # noqa: E402
import cbnorm  # noqa: E402
from cbnorm.images import load_image  # noqa: E402

FUZZ = dict(deadline=None, derandomize=True, database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
SEEDS = hostile.seed_images()
LABELS = sorted(hostile.LAYER_SPECS)
CONTEXT_NORMS = ("cn", "cnx", "cn-embed")
#: layers whose training step updates running statistics or a queue
STATEFUL = ["acn-ma", "bn", "bn-tokens", "cn", "cn-joint", "cn-tokens", "mn", "mn-channel", "mn-tokens", "mode"]
#: layers that refuse a non-finite training batch (the stateful ones, and ACN with learned components)
REFUSING = STATEFUL + ["acn", "acn-channel"]


# ============================================================================================ images
@settings(max_examples=250, **FUZZ)
@given(st.binary(max_size=4096))
def test_random_bytes_are_refused_or_decoded(data):
    assert hostile.check_image(data) in ("accepted", "refused")


@settings(max_examples=250, **FUZZ)
@given(kind=st.sampled_from(sorted(SEEDS)),
       edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=40),
       cut=st.one_of(st.none(), st.floats(0, 1, exclude_max=True)))
def test_flipped_and_truncated_files(kind, edits, cut):
    d = bytearray(SEEDS[kind])
    for pos, byte in edits:
        d[int(pos * len(d))] = byte
    if cut is not None:
        d = d[:int(cut * len(d))]
    assert hostile.check_image(bytes(d)) in ("accepted", "refused")


@settings(max_examples=150, **FUZZ)
@given(kind=st.sampled_from(sorted(SEEDS)), op=st.sampled_from(hostile.IMAGE_MUTATIONS), seed=st.integers(0, 2**32))
def test_mutated_files(kind, op, seed):
    import random

    data = hostile.mutate_image(SEEDS[kind], kind, op, random.Random(seed))
    assert hostile.check_image(data) in ("accepted", "refused")


def test_every_truncation_of_every_file():
    """Exhaustive: each prefix of each valid file (an animated GIF cut inside its frame table used to raise
    struct.error out of load_image)."""
    for kind, data in SEEDS.items():
        assert hostile.check_image(data) == "accepted", kind
        for cut in range(len(data)):
            hostile.check_image(data[:cut])


@pytest.mark.parametrize("kind", sorted(k for k in SEEDS if hostile.claim_size(SEEDS[k], k, 9, 9) is not None))
@pytest.mark.parametrize("side", [20000, 65535, 2**31 - 1])
def test_huge_declared_dimensions_are_refused_before_decoding(kind, side):
    import time

    data = hostile.claim_size(SEEDS[kind], kind, side, side)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="too large|corrupt|truncated|cannot be decoded"):
        load_image(data)
    assert time.perf_counter() - t0 < 2.0


def test_plugin_exceptions_become_value_errors():
    dds = hostile.dds_unknown_flags()
    if dds is None:
        pytest.skip("this PIL cannot write DDS")
    with pytest.raises(ValueError, match=r"corrupt or unsupported .*NotImplementedError"):
        load_image(dds)


# ============================================================================================ layers
@st.composite
def layer_cases(draw, kind="chaos"):
    """Keywords of hostile.run_layer_case. ``kind``: "chaos" (every argument may be hostile: shapes, dtypes,
    non-tensors, contexts, values), "values" (a well-formed call with hostile values: NaN, +-inf, 1e30,
    zeros, constants, any float dtype), "well_formed" (finite values from 1e-30 to 1e15)."""
    label = draw(st.sampled_from(LABELS))
    c = draw(st.sampled_from([2, 3, 4]))
    tokens = bool(hostile.LAYER_SPECS[label][1].get("channel_last"))
    case = dict(label=label, c=c, warm=draw(st.booleans()), train=draw(st.booleans()),
                rank=3 if tokens else draw(st.integers(2, 5)), n=7, c_in=c,
                dims=draw(st.tuples(*[st.integers(1, 3)] * 3)), dtype=draw(st.sampled_from(hostile.FLOAT_DTYPES)),
                scale=draw(st.sampled_from([1e-30, 1e-8, 1.0, 1e4, 1e15])), offset=draw(st.sampled_from([0.0, 3.0])),
                seed=draw(st.integers(0, 2**31)))
    if kind == "well_formed":
        return case
    case.update(n=draw(st.sampled_from([7, 2, 1])), scale=draw(st.sampled_from(hostile.SCALES)),
                constant=draw(st.booleans()),
                inject=tuple(draw(st.lists(st.tuples(st.sampled_from(["nan", "inf", "-inf"]),
                                                     st.floats(0, 1, exclude_max=True)), max_size=3))),
                context_kind=draw(st.sampled_from(["auto", "valid"])) if hostile.LAYER_SPECS[label][0] in CONTEXT_NORMS
                else "auto")
    if kind == "values":
        return case
    case.update(rank=draw(st.integers(1, 5)), n=draw(st.sampled_from([0, 1, 2, 7])),
                c_in=draw(st.sampled_from([c, c - 1, c + 1])),
                dtype=draw(st.sampled_from(hostile.FLOAT_DTYPES + hostile.OTHER_DTYPES)),
                x_kind=draw(st.sampled_from(["tensor", "tensor", "list", "ndarray", "none"])),
                context_kind=draw(st.sampled_from(hostile.CONTEXT_KINDS)))
    return case


@settings(max_examples=250, **FUZZ)
@given(layer_cases("chaos"))
def test_layers_survive_hostile_calls(case):
    assert hostile.run_layer_case(**case) in ("accepted", "refused")


@settings(max_examples=500, **FUZZ)
@given(layer_cases("values"))
def test_layers_survive_hostile_values(case):
    assert hostile.run_layer_case(**case) in ("accepted", "refused")


@settings(max_examples=150, **FUZZ)
@given(layer_cases("well_formed"))
def test_well_formed_finite_input_is_accepted_and_finite(case):
    """Valid shapes and contexts with finite values from 1e-30 to 1e15 are never refused, and the output is
    finite except float16 values beyond 65504 (checked equal to the float32 computation by the oracle)."""
    layer = hostile.build_layer(case["label"], case["c"], case["seed"])
    if case["warm"]:
        hostile.warm_up(layer, case["c"], case["seed"])
    layer.train(case["train"])
    kw = {k: v for k, v in case.items() if k not in ("label", "c", "warm", "train")}
    x, ctx = hostile.make_layer_input(layer, **kw)
    assert hostile.check_layer_call(layer, x, ctx, seed=case["seed"]) == "accepted"
    if x.dtype != torch.float16:
        torch.manual_seed(case["seed"])
        assert torch.isfinite(layer(x, context=ctx)).all()


@pytest.mark.parametrize("label", REFUSING)
@pytest.mark.parametrize("bad", ["nan", "inf", "huge"])
def test_training_on_a_bad_batch_is_refused_and_loses_nothing(label, bad):
    """NaN/inf, or float32 activations whose squares overflow (1e20), used to put NaN/inf into the running
    statistics (bn, mode, cn, acn moving_average) or MN's queue, and ACN with learned components let them
    through unrefused; now a NonFiniteError (a ValueError) naming the layer, with every buffer unchanged, and
    the next good batch trains normally."""
    c = 4
    layer = hostile.warm_up(hostile.build_layer(label, c), c)
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    good, ctx = hostile.make_layer_input(layer, rank=3 if layer.channel_last else 4, n=7, c_in=c, dims=(2, 2),
                                         dtype="float32", scale=1.0, offset=0.0)
    x = good.clone()
    if bad == "huge":
        x = x * 1e20
    else:
        x.view(-1)[5] = float(bad)
    with pytest.raises(cbnorm.NonFiniteError, match=type(layer).__name__):
        layer(x, context=ctx)
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), k
    layer(good, context=ctx)
    if label in STATEFUL:
        assert int(layer.num_batches_tracked) == int(before["num_batches_tracked"]) + 1
    for k, v in layer.state_dict().items():
        assert not v.is_floating_point() or torch.isfinite(v).all(), k


def test_float64_statistics_too_large_for_float32_buffers_are_refused():
    layer = hostile.warm_up(hostile.build_layer("bn", 4), 4)
    with pytest.raises(ValueError, match="BatchNorm: .*non-finite statistics"):
        layer(torch.randn(8, 4, 2, 2, dtype=torch.float64) * 1e30)
    assert torch.isfinite(layer.running_var).all()


@pytest.mark.parametrize("label", LABELS)
def test_nan_stays_in_its_own_sample(label):
    """Every layer in eval mode, and in train mode those that do not refuse a non-finite batch: a NaN sample
    gives a NaN output for that sample only. (The refusing ones are tested in test_nan_training_batch_...)"""
    c = 4
    for train in (False,) if label in REFUSING else (True, False):
        layer = hostile.warm_up(hostile.build_layer(label, c), c).train(train)
        x, ctx = hostile.make_layer_input(layer, rank=3 if layer.channel_last else 4, n=7, c_in=c, dims=(2, 2),
                                          dtype="float32", scale=1.0, offset=0.0)
        x[2].view(-1)[1] = float("nan")
        y = layer(x, context=ctx)
        assert not torch.isfinite(y[2]).all()
        assert torch.isfinite(torch.cat([y[:2], y[3:]])).all()


@pytest.mark.parametrize("label", LABELS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("magnitude", ["huge", "tiny"])
def test_autocast_with_huge_or_tiny_activations_stays_finite(label, dtype, magnitude):
    """Trained and evaluated under autocast on activations of 2e4 (float16) / 1e15 (bfloat16), or 1e-6 /
    1e-30: outputs and buffers stay finite (statistics in float32, log-space posteriors, eps floors)."""
    y_train, y_eval = hostile.autocast_case(label, dtype, magnitude)
    assert y_train.dtype == dtype and y_eval.dtype == dtype
    assert torch.isfinite(y_train).all() and torch.isfinite(y_eval).all()


@pytest.mark.parametrize("label", ["cn", "cnx", "cn-embed", "cn-tokens", "bn"])
@pytest.mark.parametrize("train", [True, False])
def test_context_ids_of_every_kind(label, train):
    """Ids in and out of range, of the wrong length, float, bool, 2-D, lists, arrays, strings, [None, ...]
    (torch.as_tensor raised RuntimeError on the last): a result or ValueError/TypeError, for a valid x."""
    c = 4
    for kind in hostile.CONTEXT_KINDS:
        layer = hostile.warm_up(hostile.build_layer(label, c), c).train(train)
        x, ctx = hostile.make_layer_input(layer, rank=3 if layer.channel_last else 4, n=7, c_in=c, dims=(2, 2),
                                          dtype="float32", scale=1.0, offset=0.0, context_kind=kind)
        outcome = hostile.check_layer_call(layer, x, ctx)
        if kind in ("out_of_range", "negative", "wrong_length", "float", "bool", "2d", "str", "none_list"):
            assert outcome == "refused", kind
