"""The model factory against references: min-char-rnn in numpy (float64), naive LSTM/GRU loops,
finite differences, carried state, init loss, config round trip and bad configs."""

import dataclasses
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from conftest import keras_dtype
from numpy_reference import gru_cell, lstm_cell, rnn_cell
from tf_charrnn.config import ModelConfig, config_from_dict
from tf_charrnn.errors import CharRNNError, UsageError
from tf_charrnn.models import (CharRNN, build_model, count_parameters, export_min_char_rnn,
                               import_min_char_rnn, parameter_count, resolve_kernel)

KERNELS = ["keras", "fused"]


# --- the numpy reference: min-char-rnn's forward, loss and BPTT, float64 -------------------------

def min_char_rnn_loss(inputs, targets, hprev, Wxh, Whh, Why, bh, by):
    """Loss, the five gradients, the last hidden state and the logits of one chunk.

    One-hot x_t; h_t = tanh(Wxh x_t + Whh h_{t-1} + bh); y_t = Why h_t + by; p_t = softmax(y_t);
    loss = sum_t -log p_t[target_t]; gradients by backpropagation through time over the chunk.
    """
    vocab_size = Why.shape[0]
    xs, hs, ps, ys = {}, {-1: hprev.copy()}, {}, {}
    loss = 0.0
    for t, (i, j) in enumerate(zip(inputs, targets)):
        xs[t] = np.zeros((vocab_size, 1))
        xs[t][i] = 1.0
        hs[t] = np.tanh(Wxh @ xs[t] + Whh @ hs[t - 1] + bh)
        ys[t] = Why @ hs[t] + by
        shifted = np.exp(ys[t] - ys[t].max())
        ps[t] = shifted / shifted.sum()
        loss -= np.log(ps[t][j, 0])
    dWxh, dWhh, dWhy = np.zeros_like(Wxh), np.zeros_like(Whh), np.zeros_like(Why)
    dbh, dby = np.zeros_like(bh), np.zeros_like(by)
    dh_next = np.zeros_like(hprev)
    for t in reversed(range(len(inputs))):
        dy = ps[t].copy()
        dy[targets[t]] -= 1.0                   # d loss / d y_t for softmax cross-entropy
        dWhy += dy @ hs[t].T
        dby += dy
        dh = Why.T @ dy + dh_next
        draw = (1.0 - hs[t] ** 2) * dh          # through tanh
        dbh += draw
        dWxh += draw @ xs[t].T
        dWhh += draw @ hs[t - 1].T
        dh_next = Whh.T @ draw
    logits = np.stack([ys[t][:, 0] for t in range(len(inputs))])
    return loss, (dWxh, dWhh, dWhy, dbh, dby), hs[len(inputs) - 1], logits


def random_min_char_weights(rng, vocab_size, hidden_size, scale=0.3):
    return {"Wxh": rng.normal(0, scale, (hidden_size, vocab_size)),
            "Whh": rng.normal(0, scale, (hidden_size, hidden_size)),
            "Why": rng.normal(0, scale, (vocab_size, hidden_size)),
            "bh": rng.normal(0, scale, (hidden_size, 1)),
            "by": rng.normal(0, scale, (vocab_size, 1))}


def min_char_model(kernel, vocab_size, hidden_size):
    config = ModelConfig(cell="rnn", num_layers=1, hidden_size=hidden_size, one_hot=True,
                         embedding_size=0, kernel=kernel)
    return build_model(config, vocab_size)


def keras_chunk(model, inputs, targets, hprev):
    """Loss (summed over the chunk), min-char-layout gradients, last h and logits from Keras."""
    cell = model.rnn_layers[0].cell
    variables = [cell.kernel, cell.recurrent_kernel, model.head.kernel, cell.bias, model.head.bias]
    dtype = model.state_dtype
    with tf.GradientTape() as tape:
        logits, (h,) = model(tf.constant([inputs]), (tf.constant(hprev.T, dtype),))
        loss = tf.reduce_sum(tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=tf.constant([targets]), logits=logits))
    d_kernel, d_recurrent, d_head, d_bias, d_head_bias = tape.gradient(loss, variables)
    grads = (np.asarray(d_kernel).T, np.asarray(d_recurrent).T, np.asarray(d_head).T,
             np.asarray(d_bias)[:, None], np.asarray(d_head_bias)[:, None])
    return float(loss), grads, np.asarray(h).T, np.asarray(logits)[0]


def assert_close(actual, expected, rtol, name):
    scale = max(np.abs(expected).max(), 1e-12)
    error = np.abs(np.asarray(actual, np.float64) - expected).max() / scale
    assert error <= rtol, f"{name}: max error {error:.2e} relative to max |value| > {rtol:.0e}"


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("precision", ["float64", "float32"])
def test_simple_rnn_equals_min_char_rnn(kernel, precision):
    rng = np.random.default_rng(1)
    vocab_size, hidden_size, seq_length = 11, 16, 25
    with keras_dtype(precision):
        model = min_char_model(kernel, vocab_size, hidden_size)
    weights = random_min_char_weights(rng, vocab_size, hidden_size)
    import_min_char_rnn(model, weights)
    rtol = 1e-6 if precision == "float64" else 1e-4
    hprev = rng.normal(0, 0.5, (hidden_size, 1))
    data = rng.integers(0, vocab_size, size=2 * seq_length + 1)
    for chunk in range(2):  # two consecutive chunks, the hidden state carried between them
        inputs = data[chunk * seq_length:(chunk + 1) * seq_length].tolist()
        targets = data[chunk * seq_length + 1:(chunk + 1) * seq_length + 1].tolist()
        loss, grads, h, logits = min_char_rnn_loss(inputs, targets, hprev, **weights)
        k_loss, k_grads, k_h, k_logits = keras_chunk(model, inputs, targets, hprev)
        assert_close(k_logits, logits, rtol, "logits")
        assert_close(k_loss, loss, rtol, "loss")
        assert_close(k_h, h, rtol, "final hidden state")
        for name, k_grad, grad in zip(("dWxh", "dWhh", "dWhy", "dbh", "dby"), k_grads, grads):
            assert_close(k_grad, grad, rtol, name)
        hprev = h


def test_min_char_rnn_weights_round_trip_through_npz(tmp_path):
    rng = np.random.default_rng(2)
    model = min_char_model("keras", 7, 8)
    weights = random_min_char_weights(rng, 7, 8)
    np.savez(tmp_path / "w.npz", **weights)
    import_min_char_rnn(model, tmp_path / "w.npz")
    exported = export_min_char_rnn(model)
    for key, value in weights.items():
        np.testing.assert_allclose(exported[key], value, rtol=1e-6)
        assert exported[key].shape == value.shape


def test_min_char_rnn_import_errors_name_the_problem():
    model = min_char_model("keras", 7, 8)
    with pytest.raises(CharRNNError, match="lack Why, by"):
        import_min_char_rnn(model, {"Wxh": 0, "Whh": 0, "bh": 0})
    weights = random_min_char_weights(np.random.default_rng(0), 7, 9)
    with pytest.raises(CharRNNError, match="does not fit"):
        import_min_char_rnn(model, weights)
    lstm = build_model(ModelConfig(cell="lstm", hidden_size=8, embedding_size=4), 7)
    with pytest.raises(CharRNNError, match="one-hot, one-layer rnn"):
        export_min_char_rnn(lstm)


# --- LSTM and GRU against naive per-timestep loops built from the layers' own weights ------------

def naive_lstm(x, h, c, kernel, recurrent, bias):
    """Keras's LSTM, one step at a time: gates i, f, c, o."""
    outputs = []
    for t in range(x.shape[1]):
        h, c = lstm_cell(x[:, t] @ kernel + bias, h @ recurrent, c)
        outputs.append(h)
    return np.stack(outputs, 1), [h, c]


def naive_gru(x, h, kernel, recurrent, bias):
    """Keras's GRU with reset_after=True, one step at a time: gates z, r, h."""
    outputs = []
    for t in range(x.shape[1]):
        h = gru_cell(x[:, t] @ kernel + bias[0], h @ recurrent + bias[1], h)
        outputs.append(h)
    return np.stack(outputs, 1), [h]


def naive_rnn(x, h, kernel, recurrent, bias):
    outputs = []
    for t in range(x.shape[1]):
        h = rnn_cell(x[:, t] @ kernel + bias, h @ recurrent)
        outputs.append(h)
    return np.stack(outputs, 1), [h]


def naive_model(model, ids, states):
    """The whole CharRNN in numpy: embedding -> naive layers -> dense."""
    x = np.asarray(model.embedding.embeddings)[ids]
    per_layer, new_states = model.states_per_layer, []
    step = {"lstm": naive_lstm, "gru": naive_gru, "rnn": naive_rnn}[model.cell]
    for index, layer in enumerate(model.rnn_layers):
        cell = layer.cell
        layer_states = [np.asarray(s) for s in states[index * per_layer:(index + 1) * per_layer]]
        x, layer_states = step(x, *layer_states, np.asarray(cell.kernel),
                               np.asarray(cell.recurrent_kernel), np.asarray(cell.bias))
        new_states.extend(layer_states)
    return x @ np.asarray(model.head.kernel) + np.asarray(model.head.bias), new_states


def random_states(model, batch_size, rng):
    return tuple(tf.constant(rng.normal(0, 0.5, (batch_size, model.hidden_size)))
                 for _ in range(model.num_states))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_stacked_layers_match_naive_loop(float64, cell, kernel):
    rng = np.random.default_rng(3)
    model = build_model(ModelConfig(cell=cell, num_layers=2, hidden_size=8, embedding_size=5,
                                    kernel=kernel), 7)
    for variable in model.trainable_variables:  # non-trivial biases too
        variable.assign(rng.normal(0, 0.4, variable.shape))
    ids = rng.integers(0, 7, (3, 6))
    states = random_states(model, 3, rng)
    logits, new_states = model(tf.constant(ids), states)
    expected_logits, expected_states = naive_model(model, ids, states)
    np.testing.assert_allclose(np.asarray(logits), expected_logits, rtol=1e-10, atol=1e-12)
    for actual, expected in zip(new_states, expected_states):
        np.testing.assert_allclose(np.asarray(actual), expected, rtol=1e-10, atol=1e-12)


def model_loss(model, ids, targets, states):
    logits, _ = model(ids, states)
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels=targets,
                                                                         logits=logits))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_gradients_match_finite_differences(float64, cell, kernel):
    rng = np.random.default_rng(4)
    model = build_model(ModelConfig(cell=cell, num_layers=2, hidden_size=4, embedding_size=3,
                                    kernel=kernel), 5)
    ids = tf.constant(rng.integers(0, 5, (2, 4)))
    targets = tf.constant(rng.integers(0, 5, (2, 4)))
    states = random_states(model, 2, rng)
    with tf.GradientTape() as tape:
        loss = model_loss(model, ids, targets, states)
    grads = tape.gradient(loss, model.trainable_variables)
    eps = 1e-6
    for variable, grad in zip(model.trainable_variables, grads):
        grad = tf.convert_to_tensor(grad).numpy().reshape(-1)
        flat = variable.numpy().reshape(-1)
        for index in rng.choice(flat.size, size=min(4, flat.size), replace=False):
            original = flat[index]
            values = []
            for delta in (eps, -eps):
                flat[index] = original + delta
                variable.assign(flat.reshape(variable.shape))
                values.append(float(model_loss(model, ids, targets, states)))
            flat[index] = original
            variable.assign(flat.reshape(variable.shape))
            numeric = (values[0] - values[1]) / (2 * eps)
            assert abs(numeric - grad[index]) <= 1e-6 + 1e-5 * abs(numeric), \
                f"{variable.path}[{index}]: analytic {grad[index]} vs numeric {numeric}"


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_two_chunks_with_carried_state_equal_one_long_chunk(float64, cell, kernel):
    rng = np.random.default_rng(5)
    model = build_model(ModelConfig(cell=cell, num_layers=2, hidden_size=8, embedding_size=4,
                                    kernel=kernel), 9)
    ids = tf.constant(rng.integers(0, 9, (2, 10)))
    states = random_states(model, 2, rng)
    whole, whole_states = model(ids, states)
    first, carried = model(ids[:, :5], states)
    second, final_states = model(ids[:, 5:], carried)
    np.testing.assert_allclose(np.concatenate([first, second], 1), whole, rtol=1e-12, atol=1e-13)
    for actual, expected in zip(final_states, whole_states):
        np.testing.assert_allclose(actual, expected, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
def test_loss_at_initialisation_is_close_to_log_vocab(cell):
    keras.utils.set_random_seed(0)
    vocab_size = 65
    model = build_model(ModelConfig(cell=cell, num_layers=2, hidden_size=128), vocab_size)
    rng = np.random.default_rng(6)
    ids = tf.constant(rng.integers(0, vocab_size, (8, 50)))
    targets = tf.constant(rng.integers(0, vocab_size, (8, 50)))
    loss = float(model_loss(model, ids, targets, model.zero_states(8)))
    assert abs(loss - math.log(vocab_size)) < 0.05 * math.log(vocab_size), loss


def test_the_same_weights_serve_batches_and_single_characters():
    model = build_model(ModelConfig(hidden_size=8, embedding_size=4), 7)
    ids = tf.constant(np.arange(12).reshape(3, 4) % 7)
    logits, _ = model(ids, model.zero_states(3))
    states = model.zero_states(3)
    for t in range(4):  # [N, 1] steps, as the sampler feeds them
        step_logits, states = model(ids[:, t:t + 1], states)
        np.testing.assert_allclose(step_logits[:, 0], logits[:, t], rtol=1e-5, atol=1e-6)


def test_zero_states_are_tensors_of_the_right_shape():
    lstm = build_model(ModelConfig(cell="lstm", num_layers=3, hidden_size=8, embedding_size=4), 7)
    states = lstm.zero_states(5)
    assert len(states) == 6 and all(isinstance(s, tf.Tensor) for s in states)
    assert all(tuple(s.shape) == (5, 8) for s in states)
    gru = build_model(ModelConfig(cell="gru", num_layers=3, hidden_size=8, embedding_size=4), 7)
    assert len(gru.zero_states(2)) == 3


def test_dropout_is_active_in_training_only():
    keras.utils.set_random_seed(1)
    model = build_model(ModelConfig(hidden_size=16, embedding_size=8, dropout=0.5), 7)
    ids = tf.constant(np.arange(20).reshape(2, 10) % 7)
    states = model.zero_states(2)
    eval_a, _ = model(ids, states, training=False)
    eval_b, _ = model(ids, states, training=False)
    train_a, _ = model(ids, states, training=True)
    np.testing.assert_array_equal(eval_a, eval_b)
    assert not np.allclose(eval_a, train_a)


def test_dropout_masks_follow_the_seed_and_split_by_rows():
    model = build_model(ModelConfig(hidden_size=16, embedding_size=8, dropout=0.5), 7)
    ids = tf.constant(np.arange(40).reshape(4, 10) % 7)
    states = model.zero_states(4)
    seed = tf.constant([3, 5], tf.int64)
    full, _ = model(ids, states, training=True, dropout_seed=seed)
    again, _ = model(ids, states, training=True, dropout_seed=seed)
    other, _ = model(ids, states, training=True, dropout_seed=tf.constant([3, 6], tf.int64))
    np.testing.assert_array_equal(full, again)
    assert not np.allclose(full, other)
    halves = [model(ids[start:start + 2], tuple(s[start:start + 2] for s in states),
                    training=True, dropout_seed=seed, rows=(start, 4))[0] for start in (0, 2)]
    np.testing.assert_allclose(np.concatenate(halves), full, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("precision", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_keeps_logits_and_state_in_float32(precision):
    model = build_model(ModelConfig(hidden_size=8, embedding_size=4, precision=precision,
                                    kernel="keras"), 7)
    logits, states = model(tf.zeros([2, 3], tf.int32), model.zero_states(2))
    assert logits.dtype == tf.float32
    assert all(state.dtype == tf.float32 for state in states)
    compute = {"mixed_bfloat16": "bfloat16", "mixed_float16": "float16"}[precision]
    assert model.rnn_layers[0].compute_dtype == compute


def test_config_round_trip_and_checkpoint_restore_give_identical_logits(tmp_path):
    keras.utils.set_random_seed(2)
    model = build_model(ModelConfig(cell="gru", num_layers=2, hidden_size=8, embedding_size=4,
                                    dropout=0.2), 7)
    prefix = tf.train.Checkpoint(model=model).write(str(tmp_path / "ckpt"))
    rebuilt = CharRNN.from_config(model.get_config()).build_weights()
    assert rebuilt.get_config() == model.get_config()
    tf.train.Checkpoint(model=rebuilt).read(prefix).assert_existing_objects_matched()
    ids = tf.constant([[1, 2, 3, 4]])
    np.testing.assert_array_equal(model(ids, model.zero_states(1))[0],
                                  rebuilt(ids, rebuilt.zero_states(1))[0])


def test_checkpoints_move_between_keras_and_fused_kernels(tmp_path):
    keras.utils.set_random_seed(3)
    config = dict(cell="lstm", num_layers=2, hidden_size=8, embedding_size=4)
    stock = build_model(ModelConfig(kernel="keras", **config), 7)
    prefix = tf.train.Checkpoint(model=stock).write(str(tmp_path / "ckpt"))
    fused = build_model(ModelConfig(kernel="fused", **config), 7)
    tf.train.Checkpoint(model=fused).read(prefix).assert_existing_objects_matched()
    ids = tf.constant([[1, 2, 3, 4, 5]])
    np.testing.assert_allclose(stock(ids, stock.zero_states(1))[0],
                               fused(ids, fused.zero_states(1))[0], rtol=1e-5, atol=1e-6)


def test_auto_kernel_is_fused_on_a_cpu_only_machine():
    if tf.config.list_logical_devices("GPU"):
        assert resolve_kernel("auto") == "keras"
    else:
        assert resolve_kernel("auto") == "fused"
    assert resolve_kernel("keras") == "keras"


@pytest.mark.parametrize("one_hot", [False, True])
def test_fused_first_layer_reads_its_input_projection_from_a_table(monkeypatch, one_hot):
    """The fused kernel's first layer runs on the ids (kernels.fused_rnn_on_ids), the others on
    sequences, in float32 and mixed_bfloat16; mixed_float16 runs Keras's loops. Its results are
    held to the references by the tests above, which build models the same way."""
    from tf_charrnn import kernels

    calls = []
    for name in ("fused_rnn", "fused_rnn_on_ids"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, _real=real, _name=name, **k: (
            calls.append(_name), _real(*a, **k))[1])
    for precision, expected in (("float32", ["fused_rnn_on_ids", "fused_rnn"]),
                                ("mixed_bfloat16", ["fused_rnn_on_ids", "fused_rnn"]),
                                ("mixed_float16", [])):
        model = build_model(ModelConfig(num_layers=2, hidden_size=8,
                                        embedding_size=0 if one_hot else 4, one_hot=one_hot,
                                        precision=precision, kernel="fused"), 5)
        calls.clear()
        model(tf.zeros([2, 3], tf.int32), model.zero_states(2), training=True)
        assert calls == expected, precision


def test_summary_line_names_cell_sizes_and_parameter_count():
    model = build_model(ModelConfig(cell="gru", num_layers=2, hidden_size=8, embedding_size=4,
                                    kernel="keras"), 7)
    line = model.summary_line()
    assert "gru 2x8" in line and "embedding 4" in line and "keras kernel" in line
    count = sum(int(np.prod(v.shape)) for v in model.trainable_variables)
    assert f"{count:,} parameters" in line


@pytest.mark.parametrize("cell", ["rnn", "lstm", "gru"])
@pytest.mark.parametrize("layers, one_hot", [(1, True), (3, False)])
def test_parameter_count_from_the_config_equals_the_built_models(cell, layers, one_hot):
    """What train's memory check counts before building equals what build_model creates."""
    config = ModelConfig(cell=cell, num_layers=layers, hidden_size=9, one_hot=one_hot,
                         embedding_size=0 if one_hot else 5)
    for kernel in KERNELS:
        model = build_model(dataclasses.replace(config, kernel=kernel), 11)
        assert parameter_count(config, 11) == count_parameters(model) > 0


def test_summary_line_says_which_loops_the_fused_kernel_runs():
    from tf_charrnn.kernels import choose_loops

    model = build_model(ModelConfig(cell="lstm", num_layers=1, hidden_size=8, embedding_size=4,
                                    kernel="fused"), 7)
    assert f"fused ({choose_loops(tf.float32)} loops) kernel" in model.summary_line()


@pytest.mark.parametrize("model_values, message", [
    ({"cell": "transformer"}, "model.cell must be one of rnn, lstm, gru"),
    ({"hidden_size": 0}, "model.hidden_size must be positive"),
    ({"num_layers": -1}, "model.num_layers must be positive"),
    ({"embedding_size": 0}, "model.embedding_size must be positive"),
    ({"dropout": 1.0}, r"model.dropout must be in \[0, 1\)"),
    ({"dropout": -0.1}, r"model.dropout must be in \[0, 1\)"),
    ({"one_hot": True, "embedding_size": 16}, "model.embedding_size must be 0 when model.one_hot"),
    ({"precision": "float8"}, "model.precision must be one of"),
    ({"hidden_size": "big"}, "model.hidden_size must be int"),
])
def test_bad_model_config_names_the_field(model_values, message):
    with pytest.raises(UsageError, match=message):
        config_from_dict({"model": model_values})


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn"])
def test_a_keras_file_round_trip_keeps_every_weight(cell, tmp_path):
    """model.save("x.keras") / keras.models.load_model: the loaded model is built before its
    weights are read in (it was left empty, with fresh random weights on its first call)."""
    import warnings

    model = build_model(ModelConfig(cell=cell, num_layers=2, hidden_size=16, embedding_size=8), 11)
    model.save(tmp_path / "model.keras")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Keras warns when a model cannot be built from config
        loaded = keras.models.load_model(tmp_path / "model.keras")
    assert len(loaded.weights) == len(model.weights)
    ids, states = tf.constant([[1, 2, 3]]), model.zero_states(1)
    np.testing.assert_array_equal(loaded(ids, states)[0], model(ids, states)[0])


@pytest.mark.parametrize("changes, message", [
    ({"dropout": -0.5}, r"model.dropout must be in \[0, 1\), got -0.5"),
    ({"kernel": "cudnn"}, "model.kernel must be one of"),
    ({"cell": "LSTM"}, "model.cell must be one of"),
    ({"one_hot": True}, "model.embedding_size must be 0 when model.one_hot is true"),
])
def test_build_model_checks_a_model_config_of_its_own(changes, message):
    with pytest.raises(UsageError, match=message):
        build_model(dataclasses.replace(ModelConfig(), **changes), 11)
