"""Fused CPU recurrences behind drop-in subclasses of keras.layers.LSTM, GRU and SimpleRNN.

Shapes: B batch rows, T time steps, D input features, H units, G gate width (4H for LSTM, 3H for
GRU, H for SimpleRNN).

FusedLSTM, FusedGRU and FusedSimpleRNN are the Keras layers with one method replaced
(`inner_loop`), so their weights are Keras's own variables (`cell.kernel` [D, G],
`cell.recurrent_kernel` [H, G], `cell.bias`), get_config() is Keras's, and checkpoints move freely
between a fused layer and the stock one (which runs cuDNN on a GPU). Whatever the fused path does
not cover falls back to the stock Keras loop: a mask, go_backwards, use_bias=False, activations
other than tanh/sigmoid, GRU reset_after=False, dropout or recurrent_dropout while training,
compute dtypes other than float32, float64 and bfloat16 (mixed_float16 runs Keras's loop), and a
visible GPU where Keras would pick cuDNN.

How the recurrence is computed (`fused_rnn`, one tf.custom_gradient function, time-major inside):
  forward   xw = X W + b for all steps as one GEMM [T*B, D] @ [D, G]; then a loop that does only
            h @ U and the gate math, and writes h plus the per-step factors the backward pass
            needs (LSTM: j [B, G], k, f with dZ = [dc, dc, dc, dh] * j, dc = dc_next + dh * k).
  backward  a reverse loop that carries only dh (and dc) and writes dZ, the gradient of the gate
            pre-activations; then dKernel = X^T dZ, dRecurrent = H_prev^T dZ, dX = dZ W^T as GEMMs
            over all steps at once; the bias gradient is summed inside the loop.
  first layer  over an embedding or a one-hot input (CharRNN calls `call_on_ids`) the input
            projection is read from a [V, G] table, E W + b (or W + b): xw is a gather of its
            rows, and backward the rows of dZ summed per id give dTable, then dKernel = E^T
            dTable and dE = dTable W^T; no [B, T, E] input is formed (lecture size: the whole
            train step 1.15x the GEMM path, GRU 1.14x, medium 1.04x). Under mixed_bfloat16
            the table and its gradients are float32 (call_on_ids runs outside Keras's
            autocast). Summing dZ per id with XLA's scatter (0.5 ms against TensorFlow's 1.2
            ms at lecture size, on its own) left the whole step within noise: not kept.
  Sigmoid gates are 0.5 + 0.5 tanh(z / 2) with the halving folded into the weight columns (an
  exact power-of-two scaling), so one tanh covers every gate of a step.
  The loops, fastest first (`choose_loops`; the big GEMMs stay on TensorFlow's oneDNN matmul):
    native  C++ ops (native_loops.cc, compiled on first use by native.py): the batch rows (or,
            from 512 units, the units) split into one block per core, each core running the
            whole time loop over its block with one small GEMM per step; float32 loops only;
            never inside an XLA computation nor in graphs traced under `portable_loops()` (the
            exported SavedModel must load without this package).
    xla     tf.while_loops compiled with XLA (jit_compile=True) where the TensorFlow build can
            (`xla_loops_available()`).
    plain   tf.while_loops.
  An inference call (training=False) skips the per-step factors and recomputes them only if a
  gradient is asked for after all.
  Under a mixed_bfloat16 policy the big GEMMs take bfloat16 operands (oneDNN runs them on AMX or
  AVX-512 BF16 where the CPU has them: 3-5x float32's rate on these shapes here) while the loops,
  the carried state and the gate math stay float32: XLA's CPU dot gains nothing from bfloat16
  (benchmarks/matmul_dtypes.py), and a prototype LSTM step loop in bfloat16 ran at 0.5x float32.

Measured (benchmarks/kernels_micro.py --xla: 2 stacked layers, forward + backward w.r.t. inputs,
initial states and weights, float32, one tf.function step, 5 interleaved rounds, median of the
per-round ratios; TF 2.21 on 2 shared cores of a Xeon with AVX-512, so about +-15%):

    x stock Keras layer        lecture (B=50 T=50 D=128 H=128)   medium (B=64 T=100 D=64 H=256)
    FusedLSTM, native loops    1.58                              1.69
    FusedLSTM, XLA loops       1.06                              1.22
    FusedGRU, native loops     2.09                              1.88
    FusedGRU, XLA loops        1.35                              1.19

The loops on their own at lecture size (one layer, 50 steps): LSTM forward with its factors
2.4 ms, backward 2.8 ms, about 120-140 GFLOP/s on h @ U; the XLA loops ran it at about 65.
Earlier runs of the same benchmark (XLA loops only) also gave: FusedSimpleRNN 2.07x / 1.64x,
plain tf.while_loops 1.16-1.70x, stock Keras under XLA 0.29-0.78x.

Whole train step (tf_charrnn.bench's train call, Adam included), mixed_bfloat16 over float32 with
the fused kernel, same run, on a Xeon with AMX: lecture 1.09x, medium 1.16x, large 1.24x (3x512),
GRU 1.10x.

With the XLA loops the fused LSTM reached about 73 GFLOP/s at lecture size, XLA's CPU dot on the
per-step [50, 128] x [128, 512] product being the bottleneck. The native LSTM loop costs about
40 us a step for a block of 25 rows (44 with the factors written) where a bare Eigen loop of
the same GEMM and gates, on data that stays in cache, took 29-33 us; -ffast-math did not close
that gap. Most of it was Eigen's: its product repacked U on every step, and its gate math ran
as a dozen passes over the block; register tiles over U and a one-pass forward cell made the
forward loops 1.29x (LSTM) and 1.42x (GRU) faster at lecture size
(benchmarks/native_loops_micro.py). Variants tried on prototypes and dropped,
each timed against its rival in the same run:
  - Python-unrolled loops of TensorFlow ops (static T, per-step tensors kept, no stacking): no
    faster than Keras at lecture size (0.98-1.10x).
  - the whole recurrence in one XLA computation, big GEMMs included: 1.26x Keras where the split
    kept here (XLA loops, oneDNN GEMMs) gave 1.66x; XLA's CPU matmuls are the slower ones.
  - XLA over a Python-unrolled loop: forward 9.4 ms against 7.9 ms for the XLA while_loop at
    lecture size, and 5 s to compile at T=50.
  - per-step factors formed after the loops as [T, B, G] tensor ops: each such pass took 0.5-3 ms
    in a profile, as long as a big GEMM; inside the loop they ride on data already in cache.
  - saving only gates and cell states and forming the factors in the backward loop: the two
    loops together 10-15% slower.
  - the two weight gradients as one GEMM, [X | H_prev]^T dZ: whole train step 0.96x (lecture)
    and 0.92x (medium) against two GEMMs; dZ^T X transposed after instead of X^T dZ: 0.98x and
    0.90x. (A profile of the lecture step: the X^T dZ-shaped GEMMs run at about 150 GFLOP/s,
    the forward projection at 250; the native loops take 9.8 of about 25 ms, the GEMMs 14.6.)
  - TensorFlow's BFC allocator on the CPU (TF_CPU_ALLOCATOR_USE_BFC=true), against page faults
    on the large per-step tensors: within noise.
"""

from __future__ import annotations

import contextlib
import functools
import threading

import keras
import tensorflow as tf
from keras import activations, ops
from tensorflow.python.framework import ops as tf_ops
from tensorflow.python.ops import control_flow_util
from tensorflow.python.saved_model import save_context

from tf_charrnn import native

_TANH = (activations.tanh, tf.tanh, tf.math.tanh, ops.tanh)
_SIGMOID = (activations.sigmoid, tf.sigmoid, tf.math.sigmoid, ops.sigmoid)
# Input dtype -> the dtype the loops run in. bfloat16 (a mixed_bfloat16 policy) keeps its GEMMs in
# bfloat16 and runs the loops, their state and the gate math in float32.
LOOP_DTYPES = {tf.float32: tf.float32, tf.float64: tf.float64, tf.bfloat16: tf.float32}


@functools.lru_cache(maxsize=None)
def xla_loops_available():
    """True when XLA can compile the fused loops on the CPU; False -> plain tf.while_loops."""

    @tf.function(jit_compile=True, autograph=False)
    def probe(x):
        return tf.tanh(x) * 2.0

    try:
        with tf.init_scope(), tf.device("/CPU:0"):  # run it now, even when called while tracing
            probe(tf.zeros([2]))
    except (tf.errors.OpError, ValueError, NotImplementedError):
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Per-cell math. `prepare` runs once per call on the Keras weights; `step` and `back_step` run
# once per time step on [B, ...] tensors inside the loops.


def _blocks(dtype, n, values):
    """[len(values) * n] vector holding each value repeated over one gate block of n units."""
    return tf.concat([tf.fill([n], tf.constant(v, dtype)) for v in values], 0)


class _LSTMMath:
    """Keras LSTMCell: gates i, f, c, o; c' = f c + i g; h' = o tanh(c')."""

    n_states = 2
    n_jacobian = 3
    separate_recurrent_grad = False

    @staticmethod
    def prepare(kernel, recurrent_kernel, bias):
        n = recurrent_kernel.shape[0]
        scale = _blocks(recurrent_kernel.dtype, n, (0.5, 0.5, 1.0, 0.5))  # [G]
        shift = _blocks(recurrent_kernel.dtype, n, (0.5, 0.5, 0.0, 0.5))
        step_consts = (recurrent_kernel * scale, scale, shift)
        return scale, kernel * tf.cast(scale, kernel.dtype), bias * scale, step_consts

    @staticmethod
    def step(xw_t, states, consts, with_jacobian):
        h, c = states
        u_kernel, scale, shift = consts
        t_all = tf.tanh(xw_t + tf.matmul(h, u_kernel))  # [B, G]
        scaled = t_all * scale
        i, f, g, o = tf.split(scaled + shift, 4, axis=1)
        c_new = f * c + i * g
        tc = tf.tanh(c_new)
        h_new = o * tc
        if not with_jacobian:
            return (h_new, c_new), ()
        # dZ = [dc, dc, dc, dh] * j, where dc already includes dh * k.
        j = tf.concat([g, c, i, tc], 1) * (scale - scaled * t_all)
        k = o - h_new * tc
        return (h_new, c_new), (j, k, f)

    @staticmethod
    def back_step(d_states, jac_t, u_kernel_t):
        dh, dc = d_states
        j, k, f = jac_t
        dc = dc + dh * k
        dz = tf.concat([dc, dc, dc, dh], 1) * j  # [B, G]
        return dz, None, (tf.matmul(dz, u_kernel_t), dc * f)

    @staticmethod
    def bias_grad(scale, sums):
        return sums[0] * scale


class _GRUMath:
    """Keras GRUCell, reset_after=True: gates z, r, h.

    h' = z h + (1 - z) tanh(x W_h + b_h + r (h U_h + b'_h)).
    """

    n_states = 1
    n_jacobian = 3
    separate_recurrent_grad = True

    @staticmethod
    def prepare(kernel, recurrent_kernel, bias):
        n = recurrent_kernel.shape[0]
        scale = _blocks(recurrent_kernel.dtype, n, (0.5, 0.5, 1.0))  # [G]
        scaled_bias = bias * scale  # [2, G]: input bias, recurrent bias
        step_consts = (recurrent_kernel * scale, scaled_bias[1])
        return scale, kernel * tf.cast(scale, kernel.dtype), scaled_bias[0], step_consts

    @staticmethod
    def step(xw_t, states, consts, with_jacobian):
        (h,) = states
        u_kernel, u_bias = consts
        n = h.shape[-1]
        hu = tf.nn.bias_add(tf.matmul(h, u_kernel), u_bias)  # [B, G]
        hu_zr, hu_h = tf.split(hu, [2 * n, n], axis=1)
        xw_zr, xw_h = tf.split(xw_t, [2 * n, n], axis=1)
        t_zr = tf.tanh(xw_zr + hu_zr)  # [B, 2H]
        scaled = 0.5 * t_zr
        z, r = tf.split(scaled + 0.5, 2, axis=1)
        hh = tf.tanh(xw_h + r * hu_h)
        h_minus = h - hh
        h_new = hh + z * h_minus
        if not with_jacobian:
            return (h_new,), ()
        d_zr = 0.5 - scaled * t_zr
        d_z, d_r = tf.split(d_zr, 2, axis=1)
        k_h = (1.0 - z) * (1.0 - hh * hh)
        k_r = k_h * hu_h * d_r
        k_z = h_minus * d_z
        j_in = tf.concat([k_z, k_r, k_h], 1)
        j_rec = tf.concat([k_z, k_r, k_h * r], 1)
        return (h_new,), (j_in, j_rec, z)

    @staticmethod
    def back_step(d_states, jac_t, u_kernel_t):
        (dh,) = d_states
        j_in, j_rec, z = jac_t
        dh3 = tf.concat([dh, dh, dh], 1)
        d_rec = dh3 * j_rec
        return dh3 * j_in, d_rec, (dh * z + tf.matmul(d_rec, u_kernel_t),)

    @staticmethod
    def bias_grad(scale, sums):
        return tf.stack(sums) * scale


class _SimpleMath:
    """Keras SimpleRNNCell: h' = tanh(x W + b + h U)."""

    n_states = 1
    n_jacobian = 1
    separate_recurrent_grad = False

    @staticmethod
    def prepare(kernel, recurrent_kernel, bias):
        return None, kernel, bias, (recurrent_kernel,)

    @staticmethod
    def step(xw_t, states, consts, with_jacobian):
        (h,) = states
        (u_kernel,) = consts
        h_new = tf.tanh(xw_t + tf.matmul(h, u_kernel))
        return (h_new,), ((1.0 - h_new * h_new,) if with_jacobian else ())

    @staticmethod
    def back_step(d_states, jac_t, u_kernel_t):
        (dh,) = d_states
        (j,) = jac_t
        dz = dh * j
        return dz, None, (tf.matmul(dz, u_kernel_t),)

    @staticmethod
    def bias_grad(scale, sums):
        return sums[0]


_MATHS = {"lstm": _LSTMMath, "gru": _GRUMath, "simple_rnn": _SimpleMath}


# ---------------------------------------------------------------------------------------------
# The two loops, time-major. They are pure functions of tensors so XLA can compile them.


def _forward_loop(math, with_jacobian, xw, states0, consts):
    """xw [T, B, G] -> (hs [T, B, H], final states, Jacobian factors each [T, B, ...] or ())."""
    n_steps = tf.shape(xw)[0]
    dtype = xw.dtype
    hs = tf.TensorArray(dtype, size=n_steps)
    n_jacobian = math.n_jacobian if with_jacobian else 0
    jacs = tuple(tf.TensorArray(dtype, size=n_steps) for _ in range(n_jacobian))

    def body(t, states, hs, jacs):
        states, jac_t = math.step(xw[t], states, consts, with_jacobian)
        jacs = tuple(ta.write(t, value) for ta, value in zip(jacs, jac_t))
        return t + 1, states, hs.write(t, states[0]), jacs

    _, states, hs, jacs = tf.while_loop(
        lambda t, *_: t < n_steps, body, (tf.constant(0), tuple(states0), hs, jacs)
    )
    return hs.stack(), states, tuple(ta.stack() for ta in jacs)


def _backward_loop(math, jacs, d_hs, d_final, u_kernel_t):
    """Reverse loop over the Jacobian factors; d_hs [T, B, H] or None (only final states used).

    Returns (dZ arrays [T, B, G]: one, or input and recurrent for GRU; their sums over T and B,
    which are the bias gradients before scaling; the gradients of the initial states).
    """
    n_steps = tf.shape(jacs[0])[0]
    dtype = jacs[0].dtype
    n_arrays = 2 if math.separate_recurrent_grad else 1
    arrays = tuple(tf.TensorArray(dtype, size=n_steps) for _ in range(n_arrays))
    sums = tuple(tf.zeros([u_kernel_t.shape[0]], dtype) for _ in range(n_arrays))

    def body(t, d_states, arrays, sums):
        if d_hs is not None:
            d_states = (d_states[0] + d_hs[t],) + tuple(d_states[1:])
        d_in, d_rec, d_states = math.back_step(d_states, tuple(j[t] for j in jacs), u_kernel_t)
        grads = (d_in, d_rec)[:n_arrays]
        arrays = tuple(ta.write(t, v) for ta, v in zip(arrays, grads))
        sums = tuple(s + tf.reduce_sum(v, 0) for s, v in zip(sums, grads))
        return t - 1, d_states, arrays, sums

    _, d_states, arrays, sums = tf.while_loop(
        lambda t, *_: t >= 0, body, (n_steps - 1, tuple(d_final), arrays, sums)
    )
    return tuple(ta.stack() for ta in arrays), sums, d_states


# The same two loops as C++ ops (native_loops.cc, built by native.py): (forward, backward) op
# wrapper names per cell kind.
_NATIVE_OPS = {
    "lstm": ("tf_charrnn_lstm_forward", "tf_charrnn_lstm_backward"),
    "gru": ("tf_charrnn_gru_forward", "tf_charrnn_gru_backward"),
    "simple_rnn": ("tf_charrnn_simple_rnn_forward", "tf_charrnn_simple_rnn_backward"),
}


def _native_forward_loop(kind, with_jacobian, xw, states0, consts, split="auto"):
    """_forward_loop on the native op: same arguments, same results (float32 only).

    split: how the threads share the work, "rows", "units" or "auto" (native_loops.cc).
    """
    forward_op = getattr(native.library(), _NATIVE_OPS[kind][0])
    u_bias = consts[1] if kind == "gru" else tf.zeros([0], xw.dtype)
    results = forward_op(xw, consts[0], u_bias, *states0, with_jacobian=with_jacobian,
                         split=split)
    n_states = _MATHS[kind].n_states
    jacs = tuple(results[1 + n_states:]) if with_jacobian else ()
    return results[0], tuple(results[1:1 + n_states]), jacs


def _native_backward_loop(kind, jacs, d_hs, d_final, u_kernel_t, split="auto"):
    """_backward_loop on the native op: same arguments, same results (float32 only)."""
    backward_op = getattr(native.library(), _NATIVE_OPS[kind][1])
    if d_hs is None:
        d_hs = tf.zeros([0, 0, 0], u_kernel_t.dtype)  # empty: only the final states were used
    results = backward_op(*jacs, d_hs, *d_final, u_kernel_t, split=split)
    n_arrays = 2 if _MATHS[kind].separate_recurrent_grad else 1
    return (tuple(results[:n_arrays]), tuple(results[n_arrays:2 * n_arrays]),
            tuple(results[2 * n_arrays:]))


def _sum_by_id(values, ids, rows, loops):
    """[rows, G]: row v the sum of the rows of values [N, G] whose id is v. With the native
    loops, their op (both cores); else TensorFlow's unsorted_segment_sum."""
    if loops == "native" and values.dtype == tf.float32:
        return native.library().tf_charrnn_sum_by_id(values, tf.cast(ids, tf.int32),
                                                     tf.cast(rows, tf.int32))
    return tf.math.unsorted_segment_sum(values, ids, rows)


LOOPS = ("native", "xla", "plain")
_portable = threading.local()


@contextlib.contextmanager
def portable_loops():
    """Within it, fused layers trace XLA or plain loops, never the native ops: for graphs that
    must run without this package (tf_charrnn.export's SavedModel)."""
    previous = getattr(_portable, "active", False)
    _portable.active = True
    try:
        yield
    finally:
        _portable.active = previous


def _in_xla_context():
    """True while tracing inside a jit_compile function: XLA cannot compile the native ops."""
    return control_flow_util.GraphOrParentsInXlaContext(tf_ops.get_default_graph())


def choose_loops(loop_dtype):
    """The fastest loops that can run here for this loop dtype: "native", "xla" or "plain"."""
    portable = getattr(_portable, "active", False) or save_context.in_save_context()
    if (loop_dtype == tf.float32 and not portable and not _in_xla_context()
            and native.library() is not None):
        return "native"
    return "xla" if xla_loops_available() else "plain"


@functools.lru_cache(maxsize=None)
def _loops(kind, loops):
    """(forward storing the Jacobian factors, forward without them, backward) for one cell."""
    if loops == "native":
        return (functools.partial(_native_forward_loop, kind, True),
                functools.partial(_native_forward_loop, kind, False),
                functools.partial(_native_backward_loop, kind))
    math = _MATHS[kind]
    functions = (
        functools.partial(_forward_loop, math, True),
        functools.partial(_forward_loop, math, False),
        functools.partial(_backward_loop, math),
    )
    if loops == "xla":
        functions = tuple(tf.function(f, jit_compile=True, autograph=False) for f in functions)
    return functions


def input_table(w_kernel, w_bias, rows=None, dtype=tf.float32):
    """The first layer's input projection for every character, [V, G] in dtype: rows W + b
    for an embedding matrix rows [V, D], W + b for a one-hot input (rows None). w_kernel and
    w_bias as a cell math's `prepare` returns them. Training (source "table"/"one_hot" below)
    and the sampler's step both read their xw rows from it."""
    projected = w_kernel if rows is None else tf.matmul(rows, w_kernel)
    return tf.nn.bias_add(tf.cast(projected, dtype), w_bias)


# How a layer's input reaches the loops (_fused_function's `source`):
#   dense    x [T, B, D]: xw = x W + b, one GEMM; backward dX = dZ W^T and dKernel = X^T dZ.
#   table    ids [T, B] into rows [V, D] (an embedding matrix): x_t W is row ids_t of the
#            [V, G] table rows W, so xw is a gather from it; backward the rows of dZ summed per
#            id, dTable [V, G], then dKernel = rows^T dTable and dRows = dTable W^T: three
#            [T*B]-long GEMMs become a sum and two [V]-long ones.
#   one_hot  ids [T, B] of a one-hot input: the table is W itself, dKernel is dTable.
SOURCES = ("dense", "table", "one_hot")


@functools.lru_cache(maxsize=None)
def _fused_function(kind, loops, return_sequences, training, source="dense"):
    math = _MATHS[kind]
    forward_with_jacobian, forward_only, backward_loop = _loops(kind, loops)
    n_inputs = 2 if source == "table" else 1  # (x,) / (ids, rows) / (ids,)

    @tf.custom_gradient
    def fused(*args):
        # Eager custom_gradient keeps the tape recording inside; cut it so the compiled loops are
        # traced as plain functions, not as differentiable ones.
        args = tuple(tf.stop_gradient(t) for t in args)
        inputs, (kernel, recurrent_kernel, bias) = args[:n_inputs], args[n_inputs:n_inputs + 3]
        states0 = args[n_inputs + 3:]
        # The GEMMs run in the inputs' dtype (bfloat16 under a mixed policy: oneDNN's
        # AMX/AVX-512 BF16 path); the loops and their state in LOOP_DTYPES of it (float32 for
        # bfloat16).
        gemm_dtype = _gemm_dtype(source, args)
        loop_dtype = LOOP_DTYPES[gemm_dtype]
        in_dtypes = [t.dtype for t in args]

        def to_gemm(t):
            return tf.cast(t, gemm_dtype)

        def to_loop(t):
            return tf.cast(t, loop_dtype)

        n_units = recurrent_kernel.shape[0]
        scale, w_kernel, w_bias, consts = math.prepare(
            to_gemm(kernel), to_loop(recurrent_kernel), to_loop(bias))
        loop_states0 = tuple(to_loop(t) for t in states0)
        g = w_kernel.shape[-1]
        if source == "dense":
            x_tm = inputs[0]
            n_steps, batch, d = tf.shape(x_tm)[0], tf.shape(x_tm)[1], x_tm.shape[-1]
            x2 = tf.reshape(x_tm, [-1, d])  # [T*B, D]
            xw = tf.nn.bias_add(to_loop(tf.matmul(x2, w_kernel)), w_bias)
            xw = tf.reshape(xw, [n_steps, batch, g])
        else:
            ids_tm = inputs[0]  # [T, B]
            table = input_table(w_kernel, w_bias, inputs[1] if source == "table" else None,
                                loop_dtype)  # [V, G]
            xw = tf.gather(table, ids_tm)  # [T, B, G]
        if training:
            hs, states, jacs = forward_with_jacobian(xw, loop_states0, consts)
        else:
            hs, states, _ = forward_only(xw, loop_states0, consts)
            jacs = None
        outputs = ((tf.cast(hs, gemm_dtype),) if return_sequences else ()) + tuple(
            tf.cast(state, t.dtype) for state, t in zip(states, states0))

        def input_grads(dz_in2):
            """dZ [T*B, G] of the input projection -> (gradients of inputs, dKernel unscaled)."""
            if source == "dense":
                dz_in2 = to_gemm(dz_in2)
                d_kernel = tf.matmul(x2, dz_in2, transpose_a=True)
                dx = tf.matmul(dz_in2, w_kernel, transpose_b=True)
                return (tf.reshape(dx, tf.shape(x_tm)),), d_kernel
            d_table = _sum_by_id(dz_in2, tf.reshape(ids_tm, [-1]), tf.shape(table)[0],
                                 loops)  # [V, G], loop dtype
            if source == "one_hot":
                return (None,), d_table
            rows = inputs[1]
            d_kernel = tf.matmul(rows, to_gemm(d_table), transpose_a=True)
            return (None, tf.matmul(to_gemm(d_table), w_kernel, transpose_b=True)), d_kernel

        def grad(*upstream):
            factors = jacs
            if factors is None:  # a gradient of an inference call: recompute the forward pass
                _, _, factors = forward_with_jacobian(xw, loop_states0, consts)
            upstream = [tf.zeros(tf.shape(o), loop_dtype) if u is None else to_loop(u)
                        for u, o in zip(upstream, outputs)]
            d_final = tuple(upstream[1:] if return_sequences else upstream)
            d_hs = upstream[0] if return_sequences else None
            dzs, sums, d_states0 = backward_loop(factors, d_hs, d_final, tf.transpose(consts[0]))
            dz_rec = to_gemm(dzs[-1])  # [T, B, G]
            # H_prev^T dZ without building H_prev: h0 pairs with step 0, hs[t-1] with step t.
            h_prev2 = tf.reshape(to_gemm(hs[:-1]), [-1, n_units])  # [(T-1)*B, H]
            d_recurrent = to_loop(tf.matmul(h_prev2, tf.reshape(dz_rec[1:], [-1, g]),
                                            transpose_a=True))
            d_recurrent += to_loop(tf.matmul(to_gemm(loop_states0[0]), dz_rec[0],
                                             transpose_a=True))
            d_inputs, d_kernel = input_grads(tf.reshape(dzs[0], [-1, g]))
            d_kernel = to_loop(d_kernel)
            d_bias = math.bias_grad(scale, sums)
            if scale is not None:
                d_kernel, d_recurrent = d_kernel * scale, d_recurrent * scale
            grads = d_inputs + (d_kernel, d_recurrent, d_bias) + tuple(d_states0)
            return tuple(None if t is None else tf.cast(t, dtype)
                         for t, dtype in zip(grads, in_dtypes))

        return outputs, grad

    return fused


def _gemm_dtype(source, args):
    """The dtype a _fused_function's GEMMs run in: the input's, the rows', or the kernel's."""
    return args[{"dense": 0, "table": 1, "one_hot": 1}[source]].dtype


def _check_loops(gemm_dtype, loops):
    loop_dtype = LOOP_DTYPES[tf.as_dtype(gemm_dtype)]
    if loops is None:
        loops = choose_loops(loop_dtype)
    if loops not in LOOPS:
        raise ValueError(f"loops must be one of {LOOPS} or None, not {loops!r}")
    if loops == "native" and (loop_dtype != tf.float32 or native.library() is None):
        raise ValueError("the native loops need float32 loops and a built native library")
    return loops


def _run_fused(fused, inputs, batch, steps, initial_states, weights, return_sequences):
    """Call a _fused_function with time-major inputs; (outputs [B, T, H] or None, states)."""
    results = fused(*inputs, *weights, *[tf.convert_to_tensor(s) for s in initial_states])
    # The loops' TensorArrays lose the static shapes; Keras layers downstream want them back.
    units = weights[1].shape[0]
    states = list(results[1:] if return_sequences else results)
    for state in states:
        state.set_shape([batch, units])
    if not return_sequences:
        return None, states
    outputs = tf.transpose(results[0], [1, 0, 2])  # [B, T, H]
    outputs.set_shape([batch, steps, units])
    return outputs, states


def fused_rnn(kind, inputs, initial_states, kernel, recurrent_kernel, bias,
              return_sequences=True, training=True, loops=None):
    """Run one fused recurrence, differentiable with respect to every tensor argument.

    kind: "lstm", "gru" (reset_after=True) or "simple_rnn"; inputs [B, T, D]; initial_states a
    list of [B, H] tensors (h, c for LSTM); weights in Keras's layout and gate order. Returns
    (outputs [B, T, H] or None when return_sequences is False, [final states [B, H]]).
    training: True stores the backward pass's per-step factors during the forward pass; False
        runs a lighter forward pass and recomputes them only if a gradient is asked for.
    loops: "native" (C++ ops, float32 loops only), "xla" (tf.while_loops compiled with XLA),
        "plain" (tf.while_loops); None -> choose_loops(), the fastest available.
    """
    loops = _check_loops(inputs.dtype, loops)
    fused = _fused_function(kind, loops, bool(return_sequences), bool(training))
    weights = [tf.convert_to_tensor(w) for w in (kernel, recurrent_kernel, bias)]
    return _run_fused(fused, [tf.transpose(inputs, [1, 0, 2])], inputs.shape[0],
                      inputs.shape[1], initial_states, weights, return_sequences)


def fused_rnn_on_ids(kind, ids, rows, initial_states, kernel, recurrent_kernel, bias,
                     return_sequences=True, training=True, loops=None):
    """fused_rnn on the input rows[ids] (rows [V, D], an embedding matrix), or on one_hot(ids)
    when rows is None, without forming that input: the input projection is a [V, G] table
    (see SOURCES). ids [B, T] int; the other arguments and the results as fused_rnn's; the
    gradient with respect to rows is dense [V, D]."""
    weights = [tf.convert_to_tensor(w) for w in (kernel, recurrent_kernel, bias)]
    source = "one_hot" if rows is None else "table"
    ids_tm = tf.transpose(tf.cast(ids, tf.int32))  # [T, B]
    inputs = [ids_tm] if rows is None else [ids_tm, tf.convert_to_tensor(rows)]
    loops = _check_loops(_gemm_dtype(source, inputs + weights), loops)
    fused = _fused_function(kind, loops, bool(return_sequences), bool(training), source)
    return _run_fused(fused, inputs, ids.shape[0], ids.shape[1], initial_states, weights,
                      return_sequences)


# ---------------------------------------------------------------------------------------------
# The layers.


class _FusedInnerLoop:
    """Mixin that routes Keras's RNN.inner_loop through fused_rnn when the layer allows it."""

    _fused_kind = None
    # None: the fastest loops available (choose_loops); or one of LOOPS (tests, benchmarks).
    _fused_loops = None

    def _cell_supported(self, dtype, training):
        """Whether the fused path covers this layer's cell for inputs of dtype; training: a
        Python bool here (inner_loop resolves symbolic flags to True)."""
        cell = self.cell
        if self.go_backwards or not cell.use_bias:
            return False
        if cell.activation not in _TANH:
            return False
        if hasattr(cell, "recurrent_activation") and cell.recurrent_activation not in _SIGMOID:
            return False
        if training and (cell.dropout or cell.recurrent_dropout):
            return False
        dtype = tf.as_dtype(dtype)
        return dtype in LOOP_DTYPES and tf.as_dtype(cell.kernel.dtype) == dtype

    def _fused_supported(self, sequences, mask, training):
        if mask is not None or not self._cell_supported(sequences.dtype, training):
            return False
        return sequences.shape.rank == 3 and sequences.shape[-1] is not None

    def _cudnn_preferred(self):
        use_cudnn = getattr(self, "use_cudnn", False)
        if use_cudnn not in ("auto", True):
            return False
        return bool(tf.config.list_logical_devices("GPU"))

    def inner_loop(self, sequences, initial_state, mask, training=False):
        flat_mask = mask[0] if isinstance(mask, (list, tuple)) else mask
        is_training = _training_flag(training)
        fused = not self._cudnn_preferred() and self._fused_supported(sequences, flat_mask,
                                                                       is_training)
        if not fused:
            return super().inner_loop(sequences, initial_state, mask=mask, training=training)
        if not isinstance(initial_state, (list, tuple)):
            initial_state = [initial_state]
        cell = self.cell
        outputs, states = fused_rnn(
            self._fused_kind, sequences, list(initial_state),
            cell.kernel, cell.recurrent_kernel, cell.bias,
            return_sequences=self.return_sequences, training=is_training,
            loops=self._fused_loops,
        )
        last_output = states[0]
        if outputs is None:
            outputs = last_output[:, None, :]
        return last_output, outputs, states

    def accepts_ids(self, rows, training=False):
        """Whether call_on_ids can stand in for calling this layer on rows[ids] (rows [V, D], an
        embedding matrix) or on one_hot(ids) (rows None): a built layer on the fused path whose
        rows and weights share a dtype. Under a mixed_bfloat16 policy call_on_ids runs outside
        Keras's autocast, so the table and its gradient are float32 where the input GEMM would
        have been bfloat16; float16 runs Keras's loop, as in inner_loop."""
        if not self.built or self._cudnn_preferred():
            return False
        dtype = tf.as_dtype(self.cell.kernel.dtype)
        return (tf.as_dtype(self.compute_dtype) in LOOP_DTYPES
                and (rows is None or tf.as_dtype(rows.dtype) == dtype)
                and self._cell_supported(dtype, _training_flag(training)))

    def call_on_ids(self, ids, rows, initial_state, training=False):
        """self(rows[ids] or one_hot(ids), initial_state, training=training) for ids [B, T]
        without forming that input (fused_rnn_on_ids: its projection is a [V, G] table); where
        accepts_ids(rows, training). Returns what the call would, in the compute dtype: the
        outputs (all steps or the last, as return_sequences says), then the final states when
        return_state."""
        cell = self.cell
        states = [tf.cast(state, self.compute_dtype) for state in initial_state]  # as RNN.call
        outputs, states = fused_rnn_on_ids(
            self._fused_kind, ids, rows, states, cell.kernel, cell.recurrent_kernel, cell.bias,
            return_sequences=self.return_sequences, training=_training_flag(training),
            loops=self._fused_loops,
        )
        outputs = tf.cast(states[0] if outputs is None else outputs, self.compute_dtype)
        return (outputs, *states) if self.return_state else outputs


def _training_flag(training):
    """A Python bool for a layer's training argument: a symbolic flag may turn out True, so
    plan for it (dropout, stored factors)."""
    return training if isinstance(training, bool) else training is not None


@keras.saving.register_keras_serializable(package="tf_charrnn")
class FusedLSTM(_FusedInnerLoop, keras.layers.LSTM):
    """keras.layers.LSTM with the fused CPU recurrence; same constructor, weights and config."""

    _fused_kind = "lstm"


@keras.saving.register_keras_serializable(package="tf_charrnn")
class FusedGRU(_FusedInnerLoop, keras.layers.GRU):
    """keras.layers.GRU with the fused CPU recurrence (reset_after=True; else Keras's loop)."""

    _fused_kind = "gru"

    def _cell_supported(self, dtype, training):
        return self.cell.reset_after and super()._cell_supported(dtype, training)


@keras.saving.register_keras_serializable(package="tf_charrnn")
class FusedSimpleRNN(_FusedInnerLoop, keras.layers.SimpleRNN):
    """keras.layers.SimpleRNN (tanh) with the fused CPU recurrence."""

    _fused_kind = "simple_rnn"
