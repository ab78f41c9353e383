"""The model factory: build_model(model_config, vocab_size) -> CharRNN.

Shapes: B batch rows, T time steps, V vocabulary size, E embedding size, H hidden size.

CharRNN maps (ids [B, T], states) -> (logits [B, T, V], new states). The state is passed explicitly,
never kept in the layers, so the same weights serve training batches [B, T] and one-character
sampling [N, 1]. states is a flat tuple of [B, H] tensors: one h per layer for rnn/gru, h and c per
layer for lstm, in layer order.

Which recurrent kernel runs is hidden here: `kernel: keras` uses Keras's layers (cuDNN on a GPU),
`kernel: fused` the project's CPU kernels (tf_charrnn.kernels), which subclass the Keras layers and
keep their weights (kernel, recurrent_kernel, bias), so checkpoints move freely between the two.
`kernel: auto` picks fused on a CPU-only machine and Keras where a GPU is visible.
"""

import keras
import numpy as np
import tensorflow as tf

from tf_charrnn.config import ModelConfig, validate_model
from tf_charrnn.errors import CharRNNError
from tf_charrnn.tfenv import visible_gpus

EMBEDDING_INITIALIZER = {"class_name": "RandomNormal", "config": {"stddev": 1.0}}
STATES_PER_LAYER = {"rnn": 1, "gru": 1, "lstm": 2}
_KERAS_LAYERS = {"rnn": keras.layers.SimpleRNN, "lstm": keras.layers.LSTM, "gru": keras.layers.GRU}


def _fused_layers():
    from tf_charrnn import kernels

    return {"rnn": kernels.FusedSimpleRNN, "lstm": kernels.FusedLSTM, "gru": kernels.FusedGRU}


def resolve_kernel(kernel):
    """'auto' -> 'keras' when a GPU is visible (cuDNN), else 'fused'."""
    if kernel != "auto":
        return kernel
    return "keras" if visible_gpus() else "fused"


def recurrent_layer_class(cell, kernel):
    return (_fused_layers() if resolve_kernel(kernel) == "fused" else _KERAS_LAYERS)[cell]


@keras.saving.register_keras_serializable(package="tf_charrnn")
class CharRNN(keras.Model):
    """Embedding (or one-hot) -> stacked SimpleRNN/LSTM/GRU -> Dense logits."""

    def __init__(self, vocab_size, cell="lstm", num_layers=2, hidden_size=128, one_hot=False,
                 embedding_size=128, dropout=0.0, precision="float32", kernel="auto", **kwargs):
        super().__init__(**kwargs)
        self.vocab_size, self.cell, self.num_layers = vocab_size, cell, num_layers
        self.hidden_size, self.one_hot, self.embedding_size = hidden_size, one_hot, embedding_size
        self.dropout, self.precision, self.kernel = dropout, precision, kernel
        policy = None if precision == "float32" else precision
        # Unit-variance embeddings (Keras's default is uniform +-0.05): the LSTM sees inputs of
        # useful size from step one. On tiny-shakespeare this alone lowered the validation loss
        # after 120 s of training from 1.73 to 1.62 (lecture size) and 1.85 to 1.74 (medium).
        self.embedding = None if one_hot else keras.layers.Embedding(
            vocab_size, embedding_size, embeddings_initializer=EMBEDDING_INITIALIZER,
            dtype=policy, name="embedding")
        layer_class = recurrent_layer_class(cell, kernel)
        # Default activations, no recurrent dropout and reset_after=True (GRU's default) keep
        # Keras's cuDNN kernel eligible on a GPU. Each layer is its own attribute (rnn_0, ...)
        # because tf.train.Checkpoint does not look inside plain lists on a Keras model.
        self.rnn_layers = []
        for index in range(num_layers):
            layer = layer_class(hidden_size, return_sequences=True, return_state=True,
                                dtype=policy, name=f"{cell}_{index}")
            setattr(self, f"rnn_{index}", layer)
            self.rnn_layers.append(layer)
        # Logits, loss and the carried state stay in full precision under a mixed policy.
        self.state_dtype = "float32" if policy else keras.config.floatx()
        self.head = keras.layers.Dense(vocab_size, dtype=self.state_dtype, name="logits")

    @property
    def states_per_layer(self):
        return STATES_PER_LAYER[self.cell]

    @property
    def num_states(self):
        return self.num_layers * self.states_per_layer

    def zero_states(self, batch_size):
        """The initial state for batch_size rows: a tuple of zero tensors [B, H]."""
        return tuple(tf.zeros([batch_size, self.hidden_size], dtype=self.state_dtype)
                     for _ in range(self.num_states))

    def call(self, ids, states, training=False, dropout_seed=None, rows=None):
        """(ids [B, T], states) -> (logits [B, T, V], new states).

        Dropout (training only) draws from dropout_seed, a stateless seed [2], when given: the
        trainer folds the step into it, so a resumed run draws the same masks. rows = [offset,
        total] says that these B rows are rows offset.. of a global batch of `total` rows; the
        mask is drawn for the global batch and sliced, so replicas that split a batch apply the
        masks one device would. Without a seed the masks are drawn from the global RNG.
        """
        ids = tf.cast(ids, tf.int32)
        first = self.rnn_layers[0]
        embeddings = (None if self.one_hot or not self.embedding.built
                      else self.embedding.embeddings)  # [V, E]
        # A fused first layer reads its input projection from a [V, G] table (kernels.SOURCES):
        # same results, without the [B, T, E] input and its three GEMMs. Keras's build pass
        # (the first call, layers not yet built) takes the plain path, which creates them.
        on_ids = (hasattr(first, "call_on_ids") and (self.one_hot or embeddings is not None)
                  and first.accepts_ids(embeddings, training))
        if on_ids:
            x = None
        elif self.one_hot:
            x = tf.one_hot(ids, self.vocab_size, dtype=first.compute_dtype)  # [B, T, V]
        else:
            x = self.embedding(ids)  # [B, T, E]
        new_states = []
        per_layer = self.states_per_layer
        for index, layer in enumerate(self.rnn_layers):
            layer_states = list(states[index * per_layer:(index + 1) * per_layer])
            if x is None:
                x, *layer_states = layer.call_on_ids(ids, embeddings, layer_states, training)
            else:
                x, *layer_states = layer(x, initial_state=layer_states, training=training)
            # x: [B, T, H]
            new_states.extend(tf.cast(state, self.state_dtype) for state in layer_states)
            if training and self.dropout > 0:
                x = self._dropout(x, index, dropout_seed, rows)
        return self.head(x), tuple(new_states)  # [B, T, V]

    def _dropout(self, x, index, dropout_seed, rows):
        offset, total = (rows[0], rows[1]) if rows is not None else (0, tf.shape(x)[0])
        shape = tf.concat([[total], tf.shape(x)[1:]], 0)  # the global batch's [B, T, H]
        if dropout_seed is None:
            noise = tf.random.uniform(shape)
        else:
            seed = tf.random.experimental.stateless_fold_in(
                tf.cast(dropout_seed, tf.int64), index)
            noise = tf.random.stateless_uniform(shape, seed)
        keep = noise[offset:offset + tf.shape(x)[0]] >= self.dropout  # this call's rows
        return tf.where(keep, x / tf.cast(1.0 - self.dropout, x.dtype), tf.zeros_like(x))

    def build_weights(self):
        """Create every variable by running one tiny batch."""
        self(tf.zeros([1, 1], tf.int32), self.zero_states(1), training=False)
        return self

    def get_config(self):
        return {"vocab_size": self.vocab_size, "cell": self.cell, "num_layers": self.num_layers,
                "hidden_size": self.hidden_size, "one_hot": self.one_hot,
                "embedding_size": self.embedding_size, "dropout": self.dropout,
                "precision": self.precision, "kernel": self.kernel, "name": self.name}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def get_build_config(self):
        return {"built": True}  # the config alone gives every variable's shape

    def build_from_config(self, config):
        """keras.models.load_model: create the variables before the weights are read in."""
        self.build_weights()

    def summary_line(self):
        inputs = "one-hot" if self.one_hot else f"embedding {self.embedding_size}"
        kernel = resolve_kernel(self.kernel)
        if kernel == "fused" and self.precision != "mixed_float16":  # float16 runs Keras's loop
            from tf_charrnn.kernels import choose_loops

            kernel = f"fused ({choose_loops(tf.float32)} loops)"
        return (f"model: {self.cell} {self.num_layers}x{self.hidden_size}, {inputs}, "
                f"vocab {self.vocab_size}, dropout {self.dropout}, {self.precision}, "
                f"{kernel} kernel, {count_parameters(self):,} parameters")


def count_parameters(model):
    return int(sum(np.prod(variable.shape) for variable in model.trainable_variables))


GATES = {"rnn": 1, "gru": 3, "lstm": 4}


def parameter_count(model_config: ModelConfig, vocab_size):
    """The number of weights build_model(model_config, vocab_size) creates, without building it:
    Keras's layouts (kernel [I, gH], recurrent_kernel [H, gH], bias [gH]; the GRU's bias is
    [2, 3H] with reset_after) plus the embedding and the head."""
    hidden, gates = model_config.hidden_size, GATES[model_config.cell]
    bias_rows = 2 if model_config.cell == "gru" else 1
    count = 0 if model_config.one_hot else vocab_size * model_config.embedding_size
    inputs = vocab_size if model_config.one_hot else model_config.embedding_size
    for _ in range(model_config.num_layers):
        count += gates * hidden * (inputs + hidden + bias_rows)
        inputs = hidden
    return count + hidden * vocab_size + vocab_size


def build_model(model_config: ModelConfig, vocab_size):
    """A built CharRNN (all variables created) for model_config and vocab_size."""
    validate_model(model_config)
    if vocab_size < 1:
        raise CharRNNError("vocabulary is empty: train on a corpus with some text")
    return CharRNN(vocab_size, cell=model_config.cell, num_layers=model_config.num_layers,
                   hidden_size=model_config.hidden_size, one_hot=model_config.one_hot,
                   embedding_size=model_config.embedding_size, dropout=model_config.dropout,
                   precision=model_config.precision, kernel=model_config.kernel).build_weights()


MIN_CHAR_RNN_KEYS = ("Wxh", "Whh", "Why", "bh", "by")


def _check_min_char_rnn_model(model):
    if model.cell != "rnn" or model.num_layers != 1 or not model.one_hot:
        raise CharRNNError("min-char-rnn weights need a one-hot, one-layer rnn model "
                           "(cell: rnn, num_layers: 1, one_hot: true)")


def export_min_char_rnn(model):
    """The weights in min-char-rnn's layout: column-vector biases, W @ x products."""
    _check_min_char_rnn_model(model)
    cell = model.rnn_layers[0].cell
    return {"Wxh": np.asarray(cell.kernel).T, "Whh": np.asarray(cell.recurrent_kernel).T,
            "bh": np.asarray(cell.bias)[:, None], "Why": np.asarray(model.head.kernel).T,
            "by": np.asarray(model.head.bias)[:, None]}


def import_min_char_rnn(model, arrays):
    """Load {Wxh, Whh, Why, bh, by} (a dict or an .npz path) into a one-hot rnn model."""
    _check_min_char_rnn_model(model)
    if not isinstance(arrays, dict):
        with np.load(arrays) as npz:
            arrays = {key: npz[key] for key in npz.files}
    missing = [key for key in MIN_CHAR_RNN_KEYS if key not in arrays]
    if missing:
        raise CharRNNError(f"min-char-rnn weights lack {', '.join(missing)}: an .npz needs keys "
                           f"{', '.join(MIN_CHAR_RNN_KEYS)}")
    cell = model.rnn_layers[0].cell
    pairs = [(cell.kernel, arrays["Wxh"].T), (cell.recurrent_kernel, arrays["Whh"].T),
             (cell.bias, arrays["bh"].reshape(-1)), (model.head.kernel, arrays["Why"].T),
             (model.head.bias, arrays["by"].reshape(-1))]
    for variable, value in pairs:
        if tuple(variable.shape) != value.shape:
            raise CharRNNError(f"min-char-rnn weight of shape {value.shape} does not fit the "
                               f"model's {tuple(variable.shape)}: check hidden_size and the vocab")
        variable.assign(value.astype(variable.dtype))
    return model
