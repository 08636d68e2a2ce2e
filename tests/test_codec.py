"""Tests for tfsplit.codec: layout, quantization, byte counts, rejections, TF parity."""

import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tfsplit import codec
from tfsplit.codec import wire

import tensorflow as tf  # isort: skip  (after tfsplit, which selects Keras 2)

PROPERTY_SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def _values(rng, shape, pattern="normal", magnitude=1.0):
    """Test tensors, including the ones that break naive quantizers (zeros, constants, one sign)."""
    if pattern == "zeros":
        return np.zeros(shape, np.float32)
    if pattern == "constant":
        return np.full(shape, magnitude, np.float32)
    x = (rng.standard_normal(shape) * magnitude).astype(np.float32)
    if pattern == "positive":
        return np.abs(x)
    if pattern == "negative":
        return -np.abs(x)
    return x


@st.composite
def payload_args(draw):
    """Random shapes, dtypes, kinds, labels and index subsets within the brief's ranges."""
    batch, height, width = draw(st.integers(1, 4)), draw(st.integers(1, 8)), draw(st.integers(1, 8))
    channels = draw(st.integers(1, 64))
    k = draw(st.integers(1, channels))
    indices = np.array(draw(st.permutations(range(channels)))[:k], np.int64)
    kind = draw(st.sampled_from(codec.KINDS))
    dtype = draw(st.sampled_from(codec.WIRE_DTYPES))
    with_labels = kind == "activations" and draw(st.booleans())
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    pattern = draw(st.sampled_from(["normal", "zeros", "constant", "positive", "negative"]))
    magnitude = draw(st.sampled_from([1e-6, 1e-2, 1.0, 300.0, 1e4]))
    values = _values(rng, (batch, height, width, k), pattern, magnitude)
    labels = rng.integers(-(2**31), 2**31, size=batch) if with_labels else None
    return dict(
        values=values, indices=indices, channels=channels, dtype=dtype, kind=kind, labels=labels
    )


def _encode(values=None, indices=(5, 2), channels=8, dtype="float32", **kwargs):
    if values is None:
        values = np.array([[[[1.0, -2.0]]]], np.float32)
    return codec.encode(values, indices, channels, dtype, **kwargs)


def _in_given_order(payload, indices):
    """The payload's wire values in the sender's index order (a full payload is in channel order)."""
    position = np.empty(payload.channels, np.int64)
    position[payload.indices] = np.arange(payload.indices.size)
    return payload.values[..., position[np.asarray(indices)]]


def _assert_round_trip(values, real, dtype, scale):
    """float32 is exact, float16 exact to the float16 cast, int8 within half a step (0 exact).

    The int8 step bound holds up to float32 rounding: of x / scale before rounding to an integer
    and of the product scale * (q - zero_point), each at most half an ulp of the value.
    """
    assert real.dtype == np.float32 and real.shape == values.shape
    if dtype == "float32":
        np.testing.assert_array_equal(real, values)
    elif dtype == "float16":
        np.testing.assert_array_equal(real, values.astype(np.float16).astype(np.float32))
    else:
        eps = np.finfo(np.float32).eps
        rounding = eps * (np.abs(values.astype(np.float64)) + np.abs(real.astype(np.float64)))
        error = np.abs(real.astype(np.float64) - values.astype(np.float64))
        assert np.all(error <= scale / 2 + rounding)
        assert np.all(real[values == 0] == 0)


# ---------------------------------------------------------------- layout and hand-computed numbers


def test_layout_is_byte_exact():
    data = _encode(kind="activations", labels=[7])
    expected = (
        b"TFSP"
        + bytes([1, 1, 1, 1])  # version, kind=activations, dtype=float32, flags=labels
        + struct.pack("<IHHHH", 1, 1, 1, 8, 2)  # N, H, W, channels, k
        + struct.pack("<HH", 5, 2)  # indices, order kept
        + struct.pack("<i", 7)  # labels
        + struct.pack("<ff", 1.0, -2.0)  # values
    )
    assert data == expected


def test_int8_layout_carries_scale_and_zero_point():
    data = _encode(np.array([[[[-64.0, 63.5]]]]), dtype="int8", kind="gradients")
    expected = (
        b"TFSP"
        + bytes([1, 2, 3, 0])
        + struct.pack("<IHHHH", 1, 1, 1, 8, 2)
        + struct.pack("<fi", 0.5, 0)
        + struct.pack("<HH", 5, 2)
        + struct.pack("<bb", -128, 127)
    )
    assert data == expected


def test_int8_hand_computed():
    # lo=-1, hi=2: scale=3/255=1/85, zero_point=round(-128 + 85)=-43, q=round(85x)-43.
    q, scale, zero_point = codec.quantize(np.array([-1.0, 0.0, 1.0, 2.0]), "int8")
    assert q.dtype == np.int8
    np.testing.assert_array_equal(q, [-128, -43, 42, 127])
    assert scale == float(np.float32(3 / 255)) and zero_point == -43
    real = codec.dequantize(q, scale, zero_point)
    assert real[1] == 0.0  # zero is always exact
    np.testing.assert_allclose(real, [-1, 0, 1, 2], atol=scale / 2)


def test_int8_hand_computed_ties_round_to_even():
    # lo=-64, hi=63.5: scale=127.5/255=0.5 exactly, zero_point=round(-128 + 128)=0.
    # 1.25/0.5=2.5 -> 2 and 1.75/0.5=3.5 -> 4 (half to even, as tf.round does).
    q, scale, zero_point = codec.quantize(np.array([-64.0, 0.0, 1.25, 1.75, 63.5]), "int8")
    np.testing.assert_array_equal(q, [-128, 0, 2, 4, 127])
    assert (scale, zero_point) == (0.5, 0)
    np.testing.assert_array_equal(codec.dequantize(q, scale, zero_point), [-64, 0, 1, 2, 63.5])


@pytest.mark.parametrize(
    "values, expected_q, expected_scale, expected_zero_point",
    [
        ([0.0, 0.0, 0.0], [-128, -128, -128], 1.0, -128),  # all zero: no division by zero
        ([3.0, 3.0], [127, 127], float(np.float32(3 / 255)), -128),  # constant positive
        ([-2.0, -2.0], [-128, -128], float(np.float32(2 / 255)), 127),  # constant negative
        ([1e-39, -1e-39, 1e-37], [-128, -128, -128], 1.0, -128),  # range too small: all zero
    ],
)
def test_int8_degenerate_ranges(values, expected_q, expected_scale, expected_zero_point):
    q, scale, zero_point = codec.quantize(np.array(values, np.float32), "int8")
    np.testing.assert_array_equal(q, expected_q)
    assert (scale, zero_point) == (expected_scale, expected_zero_point)
    real = codec.dequantize(q, scale, zero_point)
    assert np.all(np.isfinite(real))
    np.testing.assert_allclose(real, values, atol=scale / 2)


def test_float_quantize_is_a_cast():
    x = np.array([0.1, -3.0, 65504.0], np.float32)
    wire, scale, zero_point = codec.quantize(x, "float16")
    assert wire.dtype == np.float16 and (scale, zero_point) == (1.0, 0)
    np.testing.assert_array_equal(wire, x.astype(np.float16))
    wire, scale, zero_point = codec.quantize(x.astype(np.float64), "float32")
    assert wire.dtype == np.float32 and (scale, zero_point) == (1.0, 0)
    np.testing.assert_array_equal(wire, x)


def test_payload_nbytes_hand_computed():
    # header 20 + indices 2*3 + labels 4*2 + values 2*4*4*3*2 bytes.
    assert codec.payload_nbytes(2, 4, 4, 3, "float16", True) == 20 + 6 + 8 + 192
    # header 20 + int8 params 8 + one index 2 + one value 1.
    assert codec.payload_nbytes(1, 1, 1, 1, "int8", False) == 31
    assert codec.payload_nbytes(np.int64(16), 8, 8, 16, "float32", False) == 20 + 32 + 65536


# ------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("dtype", codec.WIRE_DTYPES)
def test_round_trip_fixed(dtype):
    rng = np.random.default_rng(0)
    values = rng.standard_normal((3, 5, 4, 6)).astype(np.float32)
    indices = np.array([9, 0, 4, 2, 11, 7])
    data = codec.encode(values, indices, 12, dtype, labels=[0, 9, 3])
    payload = codec.decode(data, expect_kind="activations", expect_dtype=dtype, max_channels=12)
    assert (payload.kind, payload.dtype, payload.channels) == ("activations", dtype, 12)
    assert payload.indices.dtype == np.int32 and payload.labels.dtype == np.int32
    np.testing.assert_array_equal(payload.indices, indices)
    np.testing.assert_array_equal(payload.labels, [0, 9, 3])
    assert payload.values.dtype == np.dtype(dtype)
    _assert_round_trip(values, payload.dequantized(), dtype, payload.scale)


def test_int8_error_past_half_a_step_is_float32_rounding():
    # Found by the property below: x / scale is just under 64.5 exactly but rounds to the tie in
    # float32, so q = 64 and the error is scale / 2 plus about 2e-15, within half an ulp of x.
    values = np.array([8.4483855e-07, 3.3400593e-06], np.float32)
    q, scale, zero_point = codec.quantize(values, "int8")
    assert q.tolist() == [-64, 127]
    real = codec.dequantize(q, scale, zero_point)
    assert abs(float(real[0]) - float(values[0])) > scale / 2
    _assert_round_trip(values, real, "int8", scale)


@PROPERTY_SETTINGS
@given(payload_args())
def test_round_trip_property(args):
    data = codec.encode(**args)
    payload = codec.decode(data, expect_kind=args["kind"], expect_dtype=args["dtype"])
    batch, height, width, k = args["values"].shape
    has_labels = args["labels"] is not None
    assert len(data) == codec.payload_nbytes(
        batch, height, width, k, args["dtype"], has_labels, channels=args["channels"]
    )
    if k == args["channels"]:  # every channel: sent in channel order, no index list.
        np.testing.assert_array_equal(payload.indices, np.arange(k))
    else:
        np.testing.assert_array_equal(payload.indices, args["indices"])
    if has_labels:
        np.testing.assert_array_equal(payload.labels, args["labels"])
    else:
        assert payload.labels is None
    real = codec.dequantize(
        _in_given_order(payload, args["indices"]), payload.scale, payload.zero_point
    )
    _assert_round_trip(args["values"], real, args["dtype"], payload.scale)
    expected_full = np.zeros((batch, height, width, args["channels"]), np.float32)
    expected_full[..., args["indices"]] = real
    np.testing.assert_array_equal(payload.scatter(), expected_full)


@PROPERTY_SETTINGS
@given(payload_args())
def test_pre_quantized_int8_is_sent_as_is(args):
    q, scale, zero_point = codec.quantize(args["values"], "int8")
    quantized_here = codec.encode(**dict(args, dtype="int8"))
    data = codec.encode(**dict(args, values=q, dtype="int8", scale=scale, zero_point=zero_point))
    assert data == quantized_here
    payload = codec.decode(data)
    np.testing.assert_array_equal(_in_given_order(payload, args["indices"]), q)
    assert (payload.scale, payload.zero_point) == (scale, zero_point)


def test_pre_quantized_scale_is_sent_as_float32():
    q = np.array([[[[-3, 0, 100]]]], np.int8)
    payload = codec.decode(_encode(q, (0, 1, 2), 3, "int8", scale=0.1, zero_point=-3))
    assert payload.scale == float(np.float32(0.1)) and payload.zero_point == -3
    np.testing.assert_array_equal(payload.values, q)
    np.testing.assert_array_equal(
        payload.dequantized(), (q.astype(np.float32) + 3) * np.float32(0.1)
    )


def test_scatter_places_channels_at_their_indices():
    values = np.arange(2 * 2 * 2 * 2, dtype=np.float32).reshape(2, 2, 2, 2) + 1
    full = codec.decode(codec.encode(values, [3, 0], 5, "float32")).scatter()
    assert full.shape == (2, 2, 2, 5) and full.dtype == np.float32
    np.testing.assert_array_equal(full[..., 3], values[..., 0])
    np.testing.assert_array_equal(full[..., 0], values[..., 1])
    np.testing.assert_array_equal(full[..., [1, 2, 4]], 0)


def test_decode_accepts_bytearray_and_memoryview():
    data = _encode(dtype="float16")
    for buffer in (bytearray(data), memoryview(data)):
        np.testing.assert_array_equal(codec.decode(buffer).dequantized(), [[[[1.0, -2.0]]]])


def test_payload_reads_as_documented():
    payload = codec.decode(_encode(dtype="int8", kind="gradients"))
    assert payload.kind == "gradients" and payload.labels is None
    assert payload.values.shape == (1, 1, 1, 2) and payload.values.dtype == np.int8


# ------------------------------------------------------------------------ decode rejections


def _patched(data, fmt, offset, *fields):
    buffer = bytearray(data)
    struct.pack_into(fmt, buffer, offset, *fields)
    return bytes(buffer)


_FLOAT_PAYLOAD = _encode(kind="activations", labels=[7])
_INT8_PAYLOAD = _encode(dtype="int8")


@pytest.mark.parametrize("data", [_FLOAT_PAYLOAD, _INT8_PAYLOAD], ids=["float32", "int8"])
def test_decode_rejects_every_truncation(data):
    for cut in range(len(data)):
        with pytest.raises(codec.PayloadError, match="short|Truncated"):
            codec.decode(data[:cut])


@pytest.mark.parametrize(
    "data, message",
    [
        (_FLOAT_PAYLOAD[:7], "too short for its header: expected at least 20 bytes, found 7"),
        (b"XXXX" + _FLOAT_PAYLOAD[4:], "Bad magic"),
        (_patched(_FLOAT_PAYLOAD, "<B", 4, 2), "format version: expected 1, found 2"),
        (_patched(_FLOAT_PAYLOAD, "<B", 5, 0), "Unknown kind code"),
        (_patched(_FLOAT_PAYLOAD, "<B", 6, 9), "Unknown dtype code"),
        (_patched(_FLOAT_PAYLOAD, "<B", 7, 4), "Unknown flag bits"),
        (_patched(_FLOAT_PAYLOAD, "<B", 7, 2), "Inconsistent all-channels flag"),
        (_patched(_FLOAT_PAYLOAD, "<I", 8, 0), "expected batch >= 1, found 0"),
        (_patched(_FLOAT_PAYLOAD, "<H", 12, 0), "expected height >= 1"),
        (_patched(_FLOAT_PAYLOAD, "<H", 18, 0), "k <= channels=8, found k=0"),
        (_patched(_FLOAT_PAYLOAD, "<H", 18, 9), "k <= channels=8, found k=9"),
        (_patched(_FLOAT_PAYLOAD, "<B", 5, 2), "Labels are only allowed on activations"),
        (_FLOAT_PAYLOAD[:-1], "Truncated payload: expected 36 bytes, found 35"),
        (_FLOAT_PAYLOAD + b"\0", "Trailing bytes: expected 36 bytes, found 37"),
        (_patched(_FLOAT_PAYLOAD, "<H", 20, 8), "expected every index < channels=8, found 8"),
        (_patched(_FLOAT_PAYLOAD, "<H", 22, 5), "distinct; channel 5 appears more than once"),
        (_patched(_FLOAT_PAYLOAD, "<f", 28, np.nan), "Non-finite values"),
        (_patched(_FLOAT_PAYLOAD, "<f", 32, np.inf), "Non-finite values"),
        (_patched(_INT8_PAYLOAD, "<f", 20, np.nan), "Bad int8 scale"),
        (_patched(_INT8_PAYLOAD, "<f", 20, np.inf), "Bad int8 scale"),
        (_patched(_INT8_PAYLOAD, "<f", 20, 0.0), "Bad int8 scale"),
        (_patched(_INT8_PAYLOAD, "<f", 20, -1.0), "Bad int8 scale"),
        (_patched(_INT8_PAYLOAD, "<i", 24, 128), "Bad int8 zero point"),
        (_INT8_PAYLOAD[:24], "Truncated int8 payload"),
        ("not bytes", "must be bytes"),
    ],
)
def test_decode_rejects(data, message):
    with pytest.raises(codec.PayloadError, match=message):
        codec.decode(data)


def test_decode_rejects_float16_nan():
    data = _encode(dtype="float16")
    with pytest.raises(codec.PayloadError, match="Non-finite"):
        codec.decode(data[:-2] + np.float16(np.nan).tobytes())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(expect_kind="gradients"), "Unexpected kind: expected 'gradients', found 'activ"),
        (dict(expect_dtype="int8"), "Unexpected dtype: expected 'int8', found 'float32'"),
        (dict(max_channels=4), "Too many channels: expected at most 4, found 8"),
        (dict(expect_kind="labels"), "expect_kind"),
        (dict(expect_dtype="bfloat16"), "expect_dtype"),
        (dict(max_channels=0), "max_channels"),
    ],
)
def test_decode_rejects_unexpected(kwargs, message):
    with pytest.raises(codec.PayloadError, match=message):
        codec.decode(_FLOAT_PAYLOAD, **kwargs)


def test_payload_error_is_a_value_error():
    assert issubclass(codec.PayloadError, ValueError)


# ------------------------------------------------------------------------ encode rejections

_X = np.ones((1, 2, 2, 2), np.float32)
_Q = np.ones((1, 2, 2, 2), np.int8)


@pytest.mark.parametrize(
    "args, kwargs, message",
    [
        ((_X[0], [0, 1], 4, "float32"), {}, "rank 4"),
        ((np.ones((1, 0, 2, 2)), [0, 1], 4, "float32"), {}, "dimension H"),
        ((np.ones((1, 2**16, 1, 1)), [0], 4, "float32"), {}, "dimension H"),
        ((_X, [0, 1, 2], 4, "float32"), {}, "length k=2"),
        ((_X, [[0, 1]], 4, "float32"), {}, "1-D integer"),
        ((_X, [0.0, 1.0], 4, "float32"), {}, "1-D integer"),
        ((_X, [0, 4], 4, "float32"), {}, r"\[0, channels=4\)"),
        ((_X, [-1, 0], 4, "float32"), {}, r"\[0, channels=4\)"),
        ((_X, [2, 2], 4, "float32"), {}, "channel 2 appears more than once"),
        ((_X, [0, 1], 0, "float32"), {}, "channels"),
        ((_X, [0, 1], 2**16, "float32"), {}, "channels"),
        ((_X, [0, 1], 4, "bfloat16"), {}, "dtype"),
        ((_X, [0, 1], 4, "float32"), dict(kind="weights"), "kind"),
        ((_X, [0, 1], 4, "float32"), dict(labels=[1, 2]), "length N=1"),
        ((_X, [0, 1], 4, "float32"), dict(labels=[1.0]), "integer"),
        ((_X, [0, 1], 4, "float32"), dict(labels=[2**31]), "int32"),
        ((_X, [0, 1], 4, "float32"), dict(labels=[-(2**31) - 1]), "int32"),
        ((_X, [0, 1], 4, "float32"), dict(kind="gradients", labels=[1]), "Only activations"),
        ((_X * np.nan, [0, 1], 4, "float32"), {}, "finite"),
        ((_X * np.inf, [0, 1], 4, "float16"), {}, "finite"),
        ((-_X * np.inf, [0, 1], 4, "int8"), {}, "finite"),
        ((np.full(_X.shape, 1e39), [0, 1], 4, "float32"), {}, "finite"),
        ((_X * 1e5, [0, 1], 4, "float16"), {}, "float16 range"),
        ((_X.astype(bool), [0, 1], 4, "float32"), {}, "real numeric"),
        ((_Q, [0, 1], 4, "int8"), {}, "Pre-quantized"),
        ((_Q, [0, 1], 4, "int8"), dict(scale=0.5), "Pre-quantized"),
        ((_Q, [0, 1], 4, "int8"), dict(zero_point=0), "Pre-quantized"),
        ((_Q, [0, 1], 4, "float16"), dict(scale=0.5, zero_point=0), "Pre-quantized"),
        ((_X, [0, 1], 4, "int8"), dict(scale=0.5, zero_point=0), "Pre-quantized"),
        ((_Q, [0, 1], 4, "int8"), dict(scale=0.0, zero_point=0), "scale"),
        ((_Q, [0, 1], 4, "int8"), dict(scale=np.nan, zero_point=0), "scale"),
        ((_Q, [0, 1], 4, "int8"), dict(scale=1e39, zero_point=0), "scale"),
        ((_Q, [0, 1], 4, "int8"), dict(scale=0.5, zero_point=128), "zero_point"),
        ((_Q, [0, 1], 4, "int8"), dict(scale=0.5, zero_point=1.0), "zero_point"),
    ],
)
def test_encode_rejects(args, kwargs, message):
    with pytest.raises(codec.PayloadError, match=message):
        codec.encode(*args, **kwargs)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: codec.quantize(np.zeros(0), "int8"), "empty"),
        (lambda: codec.quantize([1.0], "int4"), "dtype"),
        (lambda: codec.dequantize(np.ones(2, np.float16), 2.0, 0), "scale=1.0"),
        (lambda: codec.dequantize(np.ones(2, np.int32), 1.0, 0), "float32, float16 or int8"),
        (lambda: codec.dequantize(np.ones(2, np.int8), -1.0, 0), "scale"),
        (lambda: codec.payload_nbytes(0, 1, 1, 1, "int8", False), "batch"),
        (lambda: codec.payload_nbytes(1, 1, 1, 2**16, "int8", False), "k"),
        (lambda: codec.payload_nbytes(1, 1.0, 1, 1, "int8", False), "height"),
        (lambda: codec.payload_nbytes(1, 1, 1, 1, "int16", False), "dtype"),
        (lambda: codec.payload_nbytes(1, 1, 1, 1, "int8", 1), "with_labels"),
        (lambda: wire.fake_quantize(tf.ones(2), "uint8"), "dtype"),
        (lambda: wire.fake_quantize(tf.ones(2, tf.int32), "int8"), "floating"),
    ],
)
def test_helpers_reject(call, message):
    with pytest.raises(codec.PayloadError, match=message):
        call()


# ------------------------------------------------------------------------ fake_quantize parity


def _numpy_round_trip(x, dtype):
    return codec.dequantize(*codec.quantize(x, dtype))


_COMPILED = {
    dtype: tf.function(
        lambda x, dtype=dtype: wire.fake_quantize(x, dtype),
        input_signature=[tf.TensorSpec(None, tf.float32)],
        autograph=False,
    )
    for dtype in codec.WIRE_DTYPES
}

_SPECIAL = {
    "hand": np.array([-1.0, 0.0, 1.0, 2.0], np.float32),
    "ties": np.array([-64.0, 0.0, 1.25, 1.75, 63.5], np.float32),
    "zeros": np.zeros((2, 3), np.float32),
    "constant": np.full((4,), -2.0, np.float32),
    "subnormal": np.array([1e-39, -3e-39, 1e-37, 0.0], np.float32),
    "subnormal_and_normal": np.array([1e-39, -3e-39, 2e-36, -1e-30, 5e-30], np.float32),
    "float16_edges": np.array([65504.0, -65519.0, 6e-8, 1e-8, 0.1], np.float32),
    "wide": np.array([-3e38, 3e38, 1.0], np.float32),
}


@pytest.mark.parametrize("dtype", codec.WIRE_DTYPES)
@pytest.mark.parametrize("name", sorted(_SPECIAL))
def test_fake_quantize_matches_numpy_on_edge_cases(name, dtype):
    x = _SPECIAL[name]
    if dtype == "float16" and np.abs(x).max() > 65519:  # would round to inf: encode refuses it
        pytest.skip("beyond float16 range")
    expected = _numpy_round_trip(x, dtype)
    eager = wire.fake_quantize(tf.constant(x), dtype)
    compiled = _COMPILED[dtype](tf.constant(x))
    assert eager.dtype == compiled.dtype == tf.float32
    np.testing.assert_array_equal(eager.numpy(), expected)
    np.testing.assert_array_equal(compiled.numpy(), expected)


@PROPERTY_SETTINGS
@given(payload_args())
def test_fake_quantize_matches_numpy_property(args):
    x, dtype = args["values"], args["dtype"]
    payload = codec.decode(codec.encode(**args))
    expected = codec.dequantize(
        _in_given_order(payload, args["indices"]), payload.scale, payload.zero_point
    )
    np.testing.assert_array_equal(wire.fake_quantize(x, dtype).numpy(), expected)
    np.testing.assert_array_equal(_COMPILED[dtype](tf.constant(x)).numpy(), expected)


def test_fake_quantize_accepts_other_float_dtypes_and_returns_float32():
    x = np.array([[0.5, -1.5, 3.0]], np.float64)
    result = wire.fake_quantize(tf.constant(x), "int8")
    assert result.dtype == tf.float32
    np.testing.assert_array_equal(result.numpy(), _numpy_round_trip(x, "int8"))
    assert wire.fake_quantize(tf.constant(x, tf.float16), "float32").dtype == tf.float32


def test_fake_quantize_inside_tf_data():
    x = _SPECIAL["ties"]
    dataset = tf.data.Dataset.from_tensors(x).map(lambda t: wire.fake_quantize(t, "int8"))
    np.testing.assert_array_equal(next(iter(dataset)).numpy(), _numpy_round_trip(x, "int8"))


def test_all_channels_are_sent_in_channel_order_without_an_index_list():
    values = np.arange(2 * 3, dtype=np.float32).reshape(1, 1, 2, 3)
    data = codec.encode(values, [2, 0, 1], 3, "float32")
    assert len(data) == codec.HEADER_NBYTES + values.nbytes
    assert len(data) == codec.payload_nbytes(1, 1, 2, 3, "float32", False, channels=3)
    assert codec.payload_nbytes(1, 1, 2, 3, "float32", False, channels=4) == len(data) + 6
    payload = codec.decode(data)
    np.testing.assert_array_equal(payload.indices, [0, 1, 2])
    np.testing.assert_array_equal(payload.values, values[..., [1, 2, 0]])
    full = np.zeros((1, 1, 2, 3), np.float32)
    full[..., [2, 0, 1]] = values
    np.testing.assert_array_equal(payload.scatter(), full)
    with pytest.raises(codec.PayloadError, match="`k` must be <= channels"):
        codec.payload_nbytes(1, 1, 1, 4, "float32", False, channels=3)
