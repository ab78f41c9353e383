"""The fused recurrences against Keras's own layers, finite differences, checkpoints and configs.

Sizes: B=3 rows, T=5 steps, D=4 input features, H=8 units.
"""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_charrnn import kernels, native

B, T, D, H = 3, 5, 4, 8
KINDS = {
    "lstm": (keras.layers.LSTM, kernels.FusedLSTM, 2),
    "gru": (keras.layers.GRU, kernels.FusedGRU, 1),
    "simple_rnn": (keras.layers.SimpleRNN, kernels.FusedSimpleRNN, 1),
}
TOLERANCE = {"float64": 1e-10, "float32": 1e-5}
LOOPS = list(kernels.LOOPS)


def _needs_loops(loops, dtype="float32"):
    if loops == "xla" and not kernels.xla_loops_available():
        pytest.skip("XLA cannot compile on this CPU build")
    if loops == "native":
        if dtype != "float32":
            pytest.skip("the native loops run float32 only")
        if native.library() is None:  # test_native_library_builds_where_there_is_a_compiler
            pytest.skip("the native loops could not be built here")


def _random_weights(layer, rng):
    """Keras's initial weights plus noise, so biases and forget gates are not at their defaults."""
    return [w + 0.3 * rng.standard_normal(w.shape) for w in layer.get_weights()]


def _layer_pair(kind, dtype="float64", seed=0, loops=None, batch=B, **kwargs):
    """(stock, fused) layers of one kind, built, with identical random weights."""
    stock_class, fused_class, _ = KINDS[kind]
    kwargs = dict(dict(return_sequences=True, return_state=True), **kwargs)
    stock, fused = stock_class(H, dtype=dtype, **kwargs), fused_class(H, dtype=dtype, **kwargs)
    fused._fused_loops = loops
    for layer in (stock, fused):
        layer.build((batch, T, D))
    weights = _random_weights(stock, np.random.default_rng(seed))
    stock.set_weights(weights)
    fused.set_weights(weights)
    return stock, fused


def _inputs(kind, dtype, seed=1, steps=T, batch=B):
    """x [B, T, D] and random non-zero initial states [B, H]."""
    rng = np.random.default_rng(seed)
    x = tf.constant(rng.standard_normal((batch, steps, D)), dtype)
    states = [tf.constant(rng.standard_normal((batch, H)), dtype)
              for _ in range(KINDS[kind][2])]
    return x, states


def _loss_weights(results, seed=2):
    """Fixed random cotangents, one per result, so every output carries its own gradient."""
    rng = np.random.default_rng(seed)
    return [tf.constant(rng.standard_normal(r.shape), r.dtype) for r in results]


def _differentiate(layer, x, states, training=False):
    """Outputs, final states and gradients w.r.t. x, initial states and the three weights."""
    with tf.GradientTape() as tape:
        tape.watch([x] + states)
        results = layer(x, initial_state=states, training=training)
        results = list(results) if isinstance(results, (list, tuple)) else [results]
        loss = tf.add_n([tf.reduce_sum(w * r) for w, r in zip(_loss_weights(results), results)])
    return results, tape.gradient(loss, [x] + states + layer.cell.trainable_weights)


def _run(layer, x, states):
    results, grads = _differentiate(layer, x, states)
    return [r.numpy() for r in results], [g.numpy() for g in grads]


def _assert_all_close(actual, expected, tolerance):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(a, e, rtol=tolerance, atol=tolerance)


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the calls that reach the fused recurrence (the rest ran Keras's loop)."""
    calls = []
    real = kernels.fused_rnn

    def counting(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(kernels, "fused_rnn", counting)
    return calls


# The native loops run float32 only: no float64 case for them.
DTYPE_LOOPS = [(dtype, loops) for dtype in ("float64", "float32") for loops in LOOPS
               if not (dtype == "float64" and loops == "native")]


@pytest.mark.parametrize("dtype, loops", DTYPE_LOOPS)
@pytest.mark.parametrize("return_sequences", [True, False])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_fused_layer_equals_keras_layer_outputs_states_and_gradients(
        kind, dtype, return_sequences, loops, fused_calls):
    _needs_loops(loops, dtype)
    stock, fused = _layer_pair(kind, dtype, loops=loops, return_sequences=return_sequences)
    x, states = _inputs(kind, dtype)
    expected_results, expected_grads = _run(stock, x, states)
    results, grads = _run(fused, x, states)
    assert fused_calls == [kind]
    _assert_all_close(results, expected_results, TOLERANCE[dtype])
    _assert_all_close(grads, expected_grads, TOLERANCE[dtype])


V = 6  # vocabulary of the id inputs: fewer ids than the B*T=15 positions, so some repeat


def _differentiate_on_ids(layer, ids, rows, states, training=False):
    """call_on_ids: outputs, final states and gradients w.r.t. rows (when given), initial
    states and the three weights."""
    sources = ([] if rows is None else [rows]) + states
    with tf.GradientTape() as tape:
        tape.watch(sources)
        results = layer.call_on_ids(ids, rows, states, training=training)
        results = list(results) if isinstance(results, (list, tuple)) else [results]
        loss = tf.add_n([tf.reduce_sum(w * r) for w, r in zip(_loss_weights(results), results)])
    grads = tape.gradient(loss, sources + layer.cell.trainable_weights)
    return [r.numpy() for r in results], [tf.convert_to_tensor(g).numpy() for g in grads]


@pytest.mark.parametrize("dtype, loops", DTYPE_LOOPS)
@pytest.mark.parametrize("source", ["table", "one_hot"])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_call_on_ids_equals_the_keras_layer_on_embedded_and_one_hot_ids(kind, source, dtype,
                                                                        loops):
    """The input projection read from a [V, G] table: the same outputs, states and gradients
    (the rows' included) as Keras's layer on rows[ids] or one_hot(ids)."""
    _needs_loops(loops, dtype)
    width = D if source == "table" else V
    stock_class, fused_class, n_states = KINDS[kind]
    stock = stock_class(H, dtype=dtype, return_sequences=True, return_state=True)
    fused = fused_class(H, dtype=dtype, return_sequences=True, return_state=True)
    fused._fused_loops = loops
    for layer in (stock, fused):
        layer.build((B, T, width))
    weights = _random_weights(stock, np.random.default_rng(0))
    stock.set_weights(weights)
    fused.set_weights(weights)
    rng = np.random.default_rng(1)
    ids = tf.constant(rng.integers(0, V, (B, T)), tf.int32)
    rows = tf.constant(rng.standard_normal((V, D)), dtype) if source == "table" else None
    states = [tf.constant(rng.standard_normal((B, H)), dtype) for _ in range(n_states)]
    assert fused.accepts_ids(rows, training=False)

    x = tf.gather(rows, ids) if source == "table" else tf.one_hot(ids, V, dtype=dtype)
    expected_results, expected_grads = _run(stock, x, states)
    if rows is not None:  # dL/dx of the stock layer carried back to the rows by the gather
        d_x = tf.constant(expected_grads[0])
        expected_grads[0] = tf.math.unsorted_segment_sum(
            tf.reshape(d_x, [-1, D]), tf.reshape(ids, [-1]), V).numpy()
    else:
        expected_grads = expected_grads[1:]
    results, grads = _differentiate_on_ids(fused, ids, rows, states)
    _assert_all_close(results, expected_results, TOLERANCE[dtype])
    _assert_all_close(grads, expected_grads, TOLERANCE[dtype])


def test_call_on_ids_is_declined_where_the_fused_path_does_not_run():
    """An unbuilt layer, a rows dtype unlike the weights', dropout while training, float16."""
    rows = tf.zeros([V, D])
    layer = kernels.FusedLSTM(H, return_sequences=True, return_state=True)
    assert not layer.accepts_ids(rows)  # not built
    layer.build((B, T, D))
    assert layer.accepts_ids(rows) and layer.accepts_ids(None, training=True)
    assert not layer.accepts_ids(tf.zeros([V, D], tf.float64))
    for policy, accepted in (("mixed_bfloat16", True), ("mixed_float16", False)):
        mixed = kernels.FusedLSTM(H, dtype=policy, return_sequences=True)
        mixed.build((B, T, D))
        assert mixed.accepts_ids(rows) == accepted, policy
    dropped = kernels.FusedGRU(H, dropout=0.5, return_sequences=True)
    dropped.build((B, T, D))
    assert dropped.accepts_ids(rows) and not dropped.accepts_ids(rows, training=True)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_call_on_ids_under_mixed_bfloat16_answers_in_bfloat16_close_to_float32(kind):
    """Under mixed_bfloat16 the table is float32 (call_on_ids runs outside Keras's autocast);
    outputs and states come back in bfloat16, as the layer's call returns them."""
    reference, _ = _layer_pair(kind, "float32")
    mixed = KINDS[kind][1](H, dtype="mixed_bfloat16", return_sequences=True, return_state=True)
    mixed.build((B, T, D))
    mixed.set_weights(reference.get_weights())
    rng = np.random.default_rng(1)
    ids = tf.constant(rng.integers(0, V, (B, T)), tf.int32)
    rows = tf.constant(rng.standard_normal((V, D)), tf.float32)
    states = [tf.constant(rng.standard_normal((B, H)), tf.float32)
              for _ in range(KINDS[kind][2])]
    expected_results, expected_grads = _run(reference, tf.gather(rows, ids), states)
    results, grads = _differentiate_on_ids(mixed, ids, rows, states)
    assert all(r.dtype.name == "bfloat16" for r in results)
    _assert_close_in_bfloat16([r.astype(np.float32) for r in results], expected_results)
    _assert_close_in_bfloat16(grads[1:], expected_grads[1:])  # states and weights


@pytest.mark.parametrize("batch", [1, 19])
@pytest.mark.parametrize("return_sequences", [True, False])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_native_loops_split_batch_rows_and_equal_keras(kind, return_sequences, batch):
    """19 rows run as two blocks of rows on two threads (one row: one block, no split)."""
    _needs_loops("native")
    stock, fused = _layer_pair(kind, "float32", loops="native", batch=batch,
                               return_sequences=return_sequences)
    x, states = _inputs(kind, "float32", batch=batch)
    expected_results, expected_grads = _run(stock, x, states)
    results, grads = _run(fused, x, states)
    _assert_all_close(results, expected_results, TOLERANCE["float32"])
    _assert_all_close(grads, expected_grads, TOLERANCE["float32"])


@pytest.mark.parametrize("units", [32, 40, 80])  # 16-aligned unit blocks, not, wide
@pytest.mark.parametrize("split", ["rows", "units", "auto"])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_native_loops_equal_xla_loops_for_each_way_of_splitting_the_work(kind, split, units):
    """The loops alone, on random factors: rows (19 rows: two blocks) and units (each thread a
    share of every gate's units, a barrier per step) against the XLA loops, with and without
    per-step output gradients."""
    _needs_loops("native")
    _needs_loops("xla")
    if tf.config.threading.get_intra_op_parallelism_threads() == 1 or os.cpu_count() < 2:
        pytest.skip("one thread: every split is one block")
    math = kernels._MATHS[kind]
    rng = np.random.default_rng(5)
    steps, batch = 6, 19
    gates = {"lstm": 4, "gru": 3, "simple_rnn": 1}[kind] * units

    def normal(*shape, scale=1.0):
        return tf.constant(scale * rng.standard_normal(shape), tf.float32)

    bias = normal(2, gates) if kind == "gru" else normal(gates)
    # U at 1.7 / sqrt(H): the pre-activations, and the float32 rounding the two loops differ by,
    # keep one size at every width.
    u = normal(units, gates, scale=1.7 / units ** 0.5)
    _, _, _, consts = math.prepare(normal(D, gates), u, bias)
    xw = normal(steps, batch, gates)
    states0 = tuple(normal(batch, units) for _ in range(math.n_states))
    d_hs, d_final = normal(steps, batch, units), tuple(normal(batch, units) for _ in states0)
    u_t = tf.transpose(consts[0])
    xla_forward, _, xla_backward = kernels._loops(kind, "xla")
    expected = xla_forward(xw, states0, consts)
    actual = kernels._native_forward_loop(kind, True, xw, states0, consts, split=split)
    _assert_all_close(tf.nest.flatten(actual), tf.nest.flatten(expected), 1e-5)
    for upstream in (d_hs, None):
        expected_grads = xla_backward(expected[2], upstream, d_final, u_t)
        actual_grads = kernels._native_backward_loop(kind, actual[2], upstream, d_final, u_t,
                                                     split=split)
        (dzs, sums, d_states0), (want_dzs, want_sums, want_states0) = actual_grads, expected_grads
        _assert_all_close(dzs + d_states0, want_dzs + want_states0, 1e-5)
        # The bias sums add T * B = 114 terms of order one in another order: float32 rounding
        # of 1e-5 is their share, not a difference in the loops.
        _assert_all_close(sums, want_sums, 1e-4)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_native_backward_loop_gives_the_same_bits_every_call(kind):
    """A seed's run repeats bit for bit only if the loops do. The op's scratch (the blocks' bias
    sums) lands wherever the heap has room, which the arrays kept between calls move; where it
    once sat in a std::vector, Eigen's vectorised sums started at its first aligned column, and
    the bias gradients' last bits changed with it from call to call."""
    _needs_loops("native")
    math = kernels._MATHS[kind]
    rng = np.random.default_rng(9)
    steps, batch, units = 7, 24, 40
    gates = {"lstm": 4, "gru": 3, "simple_rnn": 1}[kind] * units
    bias = rng.standard_normal((2, gates) if kind == "gru" else gates)
    _, _, _, consts = math.prepare(tf.constant(rng.standard_normal((D, gates)), tf.float32),
                                   tf.constant(rng.standard_normal((units, gates)) / 4,
                                               tf.float32),
                                   tf.constant(bias, tf.float32))
    xw = tf.constant(rng.standard_normal((steps, batch, gates)), tf.float32)
    states0 = tuple(tf.constant(rng.standard_normal((batch, units)), tf.float32)
                    for _ in range(math.n_states))
    d_hs = tf.constant(rng.standard_normal((steps, batch, units)), tf.float32)
    _, _, jacs = kernels._native_forward_loop(kind, True, xw, states0, consts)
    u_t = tf.transpose(consts[0])
    kept = []  # the heap moves under the op's allocations: arrays of odd sizes, kept
    first = None
    for call in range(24):
        kept.append(np.empty(int(rng.integers(1, 3000)), np.uint8))
        results = [t.numpy() for t in tf.nest.flatten(
            kernels._native_backward_loop(kind, jacs, d_hs, states0, u_t))]
        if first is None:
            first = results
        for got, want in zip(results, first):
            np.testing.assert_array_equal(got, want, err_msg=f"call {call}")


def test_native_ops_reject_inconsistent_shapes_and_take_empty_sequences():
    _needs_loops("native")
    library = native.library()
    zeros = tf.zeros([B, H])
    with pytest.raises(tf.errors.InvalidArgumentError, match="G = gates"):
        library.tf_charrnn_lstm_forward(tf.zeros([T, B, 3 * H]), tf.zeros([H, 3 * H]),
                                        tf.zeros([0]), zeros, zeros, with_jacobian=True)
    with pytest.raises(tf.errors.InvalidArgumentError, match="u_bias must be"):
        library.tf_charrnn_gru_forward(tf.zeros([T, B, 3 * H]), tf.zeros([H, 3 * H]),
                                       tf.zeros([0]), zeros, with_jacobian=True)
    hs, h, c, *factors = library.tf_charrnn_lstm_forward(
        tf.zeros([0, B, 4 * H]), tf.zeros([H, 4 * H]), tf.zeros([0]), zeros + 1.0, zeros + 2.0,
        with_jacobian=True)
    assert hs.shape == (0, B, H) and [f.shape[0] for f in factors] == [0, 0, 0]
    np.testing.assert_array_equal(h.numpy(), 1.0)
    np.testing.assert_array_equal(c.numpy(), 2.0)


@pytest.mark.parametrize("width", [1, 48, 520])  # under one band of 16 columns; bands; a tail
def test_native_sum_by_id_equals_unsorted_segment_sum_and_rejects_bad_ids(width):
    _needs_loops("native")
    library = native.library()
    rng = np.random.default_rng(11)
    values = tf.constant(rng.standard_normal((300, width)), tf.float32)
    ids = tf.constant(rng.integers(0, 7, 300), tf.int32)  # ids 7..9 get nothing: zero rows
    sums = library.tf_charrnn_sum_by_id(values, ids, 10)
    assert sums.shape == (10, width)
    np.testing.assert_allclose(sums.numpy(), tf.math.unsorted_segment_sum(values, ids, 10),
                               rtol=1e-6, atol=1e-5)
    np.testing.assert_array_equal(sums.numpy()[7:], 0.0)
    with pytest.raises(tf.errors.InvalidArgumentError, match="id 7 at .* outside"):
        library.tf_charrnn_sum_by_id(values, tf.where(ids == 3, 7, ids), 7)
    with pytest.raises(tf.errors.InvalidArgumentError, match="ids \\[N\\]"):
        library.tf_charrnn_sum_by_id(values, ids[1:], 10)


def test_native_loops_are_kept_out_of_xla_float64_and_portable_graphs():
    _needs_loops("native")
    assert kernels.choose_loops(tf.float64) != "native"
    with kernels.portable_loops():
        assert kernels.choose_loops(tf.float32) != "native"
    assert kernels.choose_loops(tf.float32) == "native"
    chosen = []
    tf.function(lambda: chosen.append(kernels.choose_loops(tf.float32)) or tf.constant(0),
                jit_compile=True, autograph=False)()
    assert len(chosen) == 1 and chosen[0] != "native"


@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_train_step_in_tf_function_equals_keras(kind, jit_compile):
    stock, fused = _layer_pair(kind, "float32")
    x, states = _inputs(kind, "float32")

    def step(layer):
        return tf.function(lambda: _differentiate(layer, x, states, training=True),
                           jit_compile=jit_compile)

    (results, grads), (expected_results, expected_grads) = step(fused)(), step(stock)()
    _assert_all_close(results + grads, expected_results + expected_grads, TOLERANCE["float32"])


def test_unknown_batch_and_time_dimensions_trace_once_and_equal_keras():
    stock, fused = _layer_pair("lstm", "float64")
    spec = [tf.TensorSpec([None, None, D], tf.float64), tf.TensorSpec([None, H], tf.float64),
            tf.TensorSpec([None, H], tf.float64)]
    run_stock = tf.function(lambda x, h, c: stock(x, initial_state=[h, c]), input_signature=spec)
    run_fused = tf.function(lambda x, h, c: fused(x, initial_state=[h, c]), input_signature=spec)
    for steps in (1, T, 2 * T):
        x, states = _inputs("lstm", "float64", steps=steps)
        _assert_all_close(run_fused(x, *states), run_stock(x, *states), TOLERANCE["float64"])
    assert run_fused.experimental_get_tracing_count() == 1


def _stack(layer_class, dtype, seed=0):
    """Two layers of one class; the weights depend only on the seed."""
    rng = np.random.default_rng(seed)
    layers = [layer_class(H, return_sequences=True, return_state=True, dtype=dtype)
              for _ in range(2)]
    for layer, features in zip(layers, (D, H)):
        layer.build((B, T, features))
        layer.set_weights(_random_weights(layer, rng))
    return layers


def _run_stack(layers, x, states):
    """states: one list per layer -> (outputs of the top layer, final states per layer)."""
    final = []
    for layer, layer_states in zip(layers, states):
        x, *new_states = layer(x, initial_state=layer_states)
        final.append(new_states)
    return x, final


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_state_carried_across_two_chunks_equals_one_long_chunk(kind):
    layers = _stack(KINDS[kind][1], "float64")
    x, _ = _inputs(kind, "float64", steps=2 * T)
    states = [_inputs(kind, "float64", seed=10 + i)[1] for i in range(2)]
    weights = [w for layer in layers for w in layer.trainable_weights]

    def loss_and_grads(chunks):
        with tf.GradientTape() as tape:
            tape.watch([x] + states[0] + states[1])
            carried, outputs = states, []
            for chunk in chunks:
                out, carried = _run_stack(layers, x[:, chunk], carried)
                outputs.append(out)
            out = tf.concat(outputs, axis=1)
            loss = tf.reduce_sum(tf.sin(out)) + sum(
                tf.reduce_sum(s * s) for layer_states in carried for s in layer_states)
        grads = tape.gradient(loss, [x] + states[0] + states[1] + weights)
        return [out] + [s for layer_states in carried for s in layer_states], grads

    one_results, one_grads = loss_and_grads([slice(0, 2 * T)])
    two_results, two_grads = loss_and_grads([slice(0, T), slice(T, 2 * T)])
    _assert_all_close(two_results, one_results, 1e-12)
    _assert_all_close(two_grads, one_grads, 1e-12)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_fused_gradients_match_central_differences(kind):
    _, fused = _layer_pair(kind, "float64", return_sequences=True)
    x, states = _inputs(kind, "float64")
    cotangents = None

    def loss():
        nonlocal cotangents
        results = fused(x, initial_state=states)
        if cotangents is None:
            cotangents = _loss_weights(results)
        return tf.add_n([tf.reduce_sum(w * r) for w, r in zip(cotangents, results)])

    with tf.GradientTape() as tape:
        value = loss()
    variables = fused.cell.trainable_weights
    grads = tape.gradient(value, variables)
    rng = np.random.default_rng(3)
    eps = 1e-6
    for variable, grad in zip(variables, grads):
        for _ in range(3):
            index = tuple(int(rng.integers(n)) for n in variable.shape)
            original = variable.numpy()
            shifted = original.copy()
            shifted[index] += eps
            variable.assign(shifted)
            up = float(loss())
            shifted[index] -= 2 * eps
            variable.assign(shifted)
            down = float(loss())
            variable.assign(original)
            numeric = (up - down) / (2 * eps)
            assert grad.numpy()[index] == pytest.approx(numeric, rel=1e-6, abs=1e-8), (
                variable.path, index)


def _model(layer_classes, dtype):
    """Functional model: x [B, T, D] -> LSTM -> GRU -> SimpleRNN -> [B, T, H]."""
    inputs = keras.Input((T, D), dtype=dtype)
    x = inputs
    for name, layer_class in zip(("lstm", "gru", "rnn"), layer_classes):
        x = layer_class(H, return_sequences=True, dtype=dtype, name=name)(x)
    return keras.Model(inputs, x)


@pytest.mark.parametrize("direction", ["stock_to_fused", "fused_to_stock"])
def test_checkpoint_moves_between_keras_and_fused_layers(tmp_path, direction):
    stock_classes = [KINDS[k][0] for k in ("lstm", "gru", "simple_rnn")]
    fused_classes = [KINDS[k][1] for k in ("lstm", "gru", "simple_rnn")]
    if direction == "fused_to_stock":
        stock_classes, fused_classes = fused_classes, stock_classes
    source = _model(stock_classes, "float64")
    rng = np.random.default_rng(4)
    source.set_weights([w + 0.3 * rng.standard_normal(w.shape) for w in source.get_weights()])
    prefix = tf.train.Checkpoint(model=source).write(str(tmp_path / "ckpt"))
    target = _model(fused_classes, "float64")
    tf.train.Checkpoint(model=target).read(prefix).assert_existing_objects_matched()
    for a, b in zip(source.weights, target.weights):
        assert a.path == b.path
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    x, _ = _inputs("lstm", "float64")
    _assert_all_close([target(x).numpy()], [source(x).numpy()], TOLERANCE["float64"])


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_get_config_round_trips_between_fused_and_keras_layers(kind):
    stock_class, fused_class, _ = KINDS[kind]
    fused = fused_class(H, return_sequences=True, return_state=True, name="rec")
    config = fused.get_config()
    assert fused_class.from_config(config).get_config() == config
    assert stock_class.from_config(config).get_config() == config
    assert fused_class.from_config(stock_class.from_config(config).get_config()).get_config() \
        == config
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(fused))
    assert type(restored) is fused_class
    assert restored.get_config() == config


FALLBACKS = {
    "relu activation": ("lstm", dict(activation="relu"), {}),
    "hard_sigmoid gates": ("gru", dict(recurrent_activation="hard_sigmoid"), {}),
    "reset_after=False": ("gru", dict(reset_after=False), {}),
    "go_backwards": ("lstm", dict(go_backwards=True), {}),
    "use_bias=False": ("simple_rnn", dict(use_bias=False), {}),
    "mask": ("lstm", {}, dict(mask=tf.constant(np.arange(T) < np.array([[T], [T - 1], [2]])))),
}


@pytest.mark.parametrize("name", sorted(FALLBACKS))
def test_unsupported_configurations_run_keras_loop(name, fused_calls):
    kind, layer_kwargs, call_kwargs = FALLBACKS[name]
    stock, fused = _layer_pair(kind, "float64", **layer_kwargs)
    x, states = _inputs(kind, "float64")
    expected = stock(x, initial_state=states, **call_kwargs)
    actual = fused(x, initial_state=states, **call_kwargs)
    assert fused_calls == []
    _assert_all_close([a.numpy() for a in actual], [e.numpy() for e in expected], 1e-12)


def test_dropout_runs_keras_loop_only_while_training(fused_calls):
    _, fused = _layer_pair("lstm", "float64", dropout=0.5, recurrent_dropout=0.5)
    x, states = _inputs("lstm", "float64")
    fused(x, initial_state=states, training=True)
    assert fused_calls == []
    fused(x, initial_state=states, training=False)
    assert fused_calls == ["lstm"]


def _assert_close_in_bfloat16(actual, expected):
    """bfloat16 keeps 8 bits of mantissa: errors of a few parts in a thousand per product."""
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        scale = np.max(np.abs(e)) + 1e-3
        assert np.max(np.abs(a - e)) <= 0.03 * scale, (np.max(np.abs(a - e)), scale)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_mixed_bfloat16_runs_the_fused_kernel_close_to_float32(kind, fused_calls):
    """bfloat16 GEMMs and float32 loops: outputs and gradients within bfloat16 rounding of the
    float32 layer with the same weights, and at least as close as Keras's own bfloat16 loop."""
    reference, _ = _layer_pair(kind, "float32")
    stock, fused = _layer_pair(kind, "mixed_bfloat16")
    for layer in (stock, fused):
        layer.set_weights(reference.get_weights())
    x, states = _inputs(kind, "float32")
    expected_results, expected_grads = _run(reference, x, states)
    results, grads = _run(fused, x, states)
    assert fused_calls == [kind]
    assert results[0].dtype.name == "bfloat16"
    _assert_close_in_bfloat16([r.astype(np.float32) for r in results], expected_results)
    _assert_close_in_bfloat16(grads, expected_grads)
    stock_results, stock_grads = _run(stock, x, states)
    fused_error = max(np.max(np.abs(g - e)) for g, e in zip(grads, expected_grads))
    stock_error = max(np.max(np.abs(g - e)) for g, e in zip(stock_grads, expected_grads))
    assert fused_error <= 2 * stock_error, (fused_error, stock_error)


def test_float16_runs_keras_loop(fused_calls):
    stock = keras.layers.GRU(H, return_sequences=True, dtype="mixed_float16")
    fused = kernels.FusedGRU(H, return_sequences=True, dtype="mixed_float16")
    for layer in (stock, fused):
        layer.build((B, T, D))
    fused.set_weights(stock.get_weights())
    x, _ = _inputs("gru", "float32")
    np.testing.assert_array_equal(fused(x).numpy(), stock(x).numpy())
    assert fused_calls == []
