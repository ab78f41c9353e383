// The time loops of the fused LSTM, GRU and SimpleRNN kernels (tf_charrnn/kernels.py) as
// TensorFlow CPU ops. tf_charrnn/native.py compiles this file on first use and loads it.
//
// Each op is one loop of kernels.py's _forward_loop or _backward_loop for one cell kind, with the
// same inputs, outputs and arithmetic (the sigmoid gates arrive pre-halved: sigmoid(x) =
// 0.5 + 0.5 tanh(x / 2), the halving folded into the weights). Shapes: T steps, B batch rows,
// H units, G gate width (4H LSTM, 3H GRU, H SimpleRNN); time-major, row-major, float32.
//
// Each thread runs the whole time loop over one block of the state, in one of two ways:
//   rows   Batch rows never interact, so the rows are split between the threads and no thread
//          waits for another. Per step a block does one small GEMM [rows, H] x [H, G] (Product:
//          AVX-512 register tiles, else Eigen; in this thread) and the gate math on data that
//          stays in cache.
//   units  For wide layers (H >= 512) the units are split instead: each thread keeps its own
//          columns of every gate of U (its share of U, which then stays in its cache rather
//          than every thread streaming all of U each step) and the GEMM keeps all the rows,
//          [B, H] x [H, G / threads]. The next step needs every unit of h, so the threads
//          meet at a barrier once per step; they are started per call (not taken from
//          TensorFlow's pool, whose threads may be busy elsewhere and would leave a barrier
//          waiting).
// More ops: TfCharrnnSumById sums the first layer's gate gradients per character id (the
// table source's dTable in kernels.py); TfCharrnnGenerate runs the sampler's whole generation
// loop (sample.py) for a stack of layers, with the cells above, the head and the draw, its
// products in float32 or (precision bfloat16, where the CPU has AMX) on AMX tiles;
// TfCharrnnBfloat16Generation says whether the latter runs here; TfCharrnnDraw runs its draw
// on given logits and uniform numbers (for the tests).

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <new>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include <Eigen/Core>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif
// The bfloat16 generation path needs AVX-512 BF16 (conversions, and dot products where there are
// no tiles; the compiler sets these under -march=native on a CPU that has them); on AMX tiles it
// also needs Linux's permission for the tile state.
#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define TF_CHARRNN_BF16 1
#endif
#if defined(TF_CHARRNN_BF16) && defined(__AMX_TILE__) && defined(__AMX_BF16__) && \
    defined(__linux__)
#define TF_CHARRNN_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/shape_inference.h"
#include "tensorflow/core/util/work_sharder.h"

namespace tf_charrnn {

using tensorflow::DEVICE_CPU;
using tensorflow::OpKernel;
using tensorflow::OpKernelConstruction;
using tensorflow::OpKernelContext;
using tensorflow::Tensor;
using tensorflow::TensorShape;
using tensorflow::shape_inference::DimensionHandle;
using tensorflow::shape_inference::InferenceContext;
using tensorflow::shape_inference::ShapeHandle;

using Matrix = Eigen::Matrix<float, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
using RowVector = Eigen::Matrix<float, 1, Eigen::Dynamic>;
using MatrixMap = Eigen::Map<Matrix>;
using ConstMatrixMap = Eigen::Map<const Matrix>;

// Rows [row, row + rows) of step t of a [T, B, width] tensor (or of a [B, width] one, t = 0).
struct Rows {
  float* data = nullptr;
  int64_t batch = 0, width = 0;

  Rows() = default;
  Rows(Tensor* tensor, int64_t batch, int64_t width)
      : data(tensor->NumElements() ? tensor->flat<float>().data() : nullptr),
        batch(batch), width(width) {}
  Rows(const Tensor& tensor, int64_t batch, int64_t width)
      : Rows(const_cast<Tensor*>(&tensor), batch, width) {}

  bool present() const { return data != nullptr; }
  MatrixMap at(int64_t t, int64_t row, int64_t rows) const {
    return MatrixMap(data + (t * batch + row) * width, rows, width);
  }
  // Row `row` of step t from `column` on; null when the tensor is absent (empty).
  float* Row(int64_t t, int64_t row, int64_t column) const {
    return present() ? data + (t * batch + row) * width + column : nullptr;
  }
};

// Threads that all run at once meet here once per time step (the "units" split).
class SpinBarrier {
 public:
  explicit SpinBarrier(int parties) : parties_(parties) {}

  void Wait() {
    const int generation = generation_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == parties_ - 1) {
      arrived_.store(0, std::memory_order_relaxed);
      generation_.fetch_add(1, std::memory_order_acq_rel);
      return;
    }
    // Steps take tens of microseconds: spin first, then yield in case the machine has more
    // runnable threads than cores.
    for (int spins = 0; generation_.load(std::memory_order_acquire) == generation; ++spins) {
      if (spins > 4000) std::this_thread::yield();
    }
  }

 private:
  const int parties_;
  std::atomic<int> arrived_{0};
  std::atomic<int> generation_{0};
};

// What one thread owns: rows [row, row + rows) and units [unit, unit + units) of the state, and
// its slice of the per-block bias sums.
struct Block {
  int64_t row, rows, unit, units;
  int index;
  SpinBarrier* barrier;  // null when the blocks never wait for each other

  void Sync() const {
    if (barrier != nullptr) barrier->Wait();
  }
};

enum class Split { kAuto, kRows, kUnits };

Split ParseSplit(const std::string& name) {
  return name == "rows" ? Split::kRows : name == "units" ? Split::kUnits : Split::kAuto;
}

struct Plan {
  int blocks;
  bool by_units;
  bool rows_by_16 = false;  // row blocks start on multiples of 16 where the batch allows
};

Plan MakePlan(OpKernelContext* context, int64_t steps, int64_t batch, int64_t units,
              Split split) {
  const int threads = std::max(1, context->device()->tensorflow_cpu_worker_threads()->num_threads);
  // Measured on 2 cores: units ran H = 512 at 1.2x rows, H = 256 at par, H = 128 at 0.7x.
  // Starting threads costs tens of microseconds a call: not for a step or two (sampling).
  const bool by_units = split == Split::kUnits ||
                        (split == Split::kAuto && units >= 512 && steps >= 8);
  // At least 8 rows, or 32 units, a block: below that the per-step GEMM is too small to pay
  // for a thread. A forced split ("units", for tests) takes as many blocks as threads.
  int64_t most = by_units ? (split == Split::kUnits ? units : units / 32) : batch / 8;
  const int blocks = static_cast<int>(std::min<int64_t>(threads, std::max<int64_t>(1, most)));
  return Plan{blocks, by_units && blocks > 1};
}

// Start of block b of `blocks` over n items; aligned: on multiples of 16 (one AVX-512 register
// of floats, for unit blocks: columns) where n allows.
int64_t Cut(int64_t n, int b, int blocks, bool aligned) {
  return aligned && n % 16 == 0 ? 16 * (n / 16 * b / blocks) : n * b / blocks;
}

int64_t RoundUp(int64_t n, int64_t multiple) { return (n + multiple - 1) / multiple * multiple; }

// Runs fn(Block) for the blocks of the plan, covering [0, batch) x [0, units).
template <typename Fn>
void RunBlocks(OpKernelContext* context, int64_t batch, int64_t units, const Plan& plan, Fn fn) {
  if (!plan.by_units) {
    auto run = [&](int64_t first, int64_t last) {
      for (int64_t b = first; b < last; ++b) {
        const int64_t row = Cut(batch, b, plan.blocks, plan.rows_by_16);
        const int64_t end = Cut(batch, b + 1, plan.blocks, plan.rows_by_16);
        fn(Block{row, end - row, 0, units, static_cast<int>(b), nullptr});
      }
    };
    auto* workers = context->device()->tensorflow_cpu_worker_threads();
    // A cost far above the sharder's threshold: every block becomes its own shard.
    tensorflow::Shard(plan.blocks, workers->workers, plan.blocks, int64_t{1} << 40, run);
    return;
  }
  SpinBarrier barrier(plan.blocks);
  auto block = [&](int b) {
    const int64_t unit = Cut(units, b, plan.blocks, true);
    const int64_t end = Cut(units, b + 1, plan.blocks, true);
    return Block{0, batch, unit, end - unit, b, &barrier};
  };
  // The threads start work only once all of them exist: if one cannot be created, the others
  // are told to return and the caller runs the whole loop as one block.
  std::atomic<int> go{0};  // 0 wait, 1 run, -1 give up
  std::vector<std::thread> threads;
  try {
    for (int b = 1; b < plan.blocks; ++b) {
      threads.emplace_back([&, b] {
        while (go.load(std::memory_order_acquire) == 0) std::this_thread::yield();
        if (go.load(std::memory_order_acquire) == 1) fn(block(b));
      });
    }
  } catch (const std::system_error&) {
    go.store(-1, std::memory_order_release);
    for (auto& thread : threads) thread.join();
    fn(Block{0, batch, 0, units, 0, nullptr});
    return;
  }
  go.store(1, std::memory_order_release);
  fn(block(0));
  for (auto& thread : threads) thread.join();
}

// The block's units of each of `gates` gate blocks of a [.., gates * units] matrix, side by side:
// U [H, G] -> [H, gates * n], U^T [G, H] rows kept -> columns [unit, unit + n) of it.
Matrix GateColumns(const ConstMatrixMap& m, int gates, int64_t units, const Block& block) {
  Matrix out(m.rows(), gates * block.units);
  for (int g = 0; g < gates; ++g) {
    out.middleCols(g * block.units, block.units) = m.middleCols(g * units + block.unit,
                                                                block.units);
  }
  return out;
}

// Allocates output `index`; on failure records the error in the context and returns nullptr.
Tensor* Output(OpKernelContext* context, int index, TensorShape shape) {
  Tensor* out = nullptr;
  const auto status = context->allocate_output(index, shape, &out);
  if (!status.ok()) {
    context->SetStatus(status);
    return nullptr;
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// The per-step product c = a b (c += a b when accumulating) of the block loops: a [M, K], b [K, N],
// c [M, N], row-major. Eigen packs b into its own layout on every call, which at these sizes
// (a few dozen rows) costs about as much as the arithmetic; b is already row-major, so with
// AVX-512 a register tile of 5 rows x 64 columns reads it where it lies: per k, four vectors of
// b and five broadcasts of a feed 20 fused multiply-adds. K is taken in chunks of kChunk, so a
// chunk of b's 64 columns (64 KB) stays in cache while every row tile reuses it. Sums run over k
// in order. The backward loops, where only this product changed, against Eigen's
// (benchmarks/native_loops_micro.py, alternating checkouts): LSTM 1.17x at lecture size, 1.16x
// medium, 0.93x large (the units split; each thread's share of U^T, 2 MB, fills its L2);
// GRU 1.12x, 1.15x, 1.0x.

#if defined(__AVX512F__)
constexpr int64_t kChunk = 256;

template <int kRows, int kVectors>
inline void ProductTile(const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
                        int64_t ldc, int64_t depth, bool accumulate) {
  __m512 sum[kRows][kVectors];
  for (int i = 0; i < kRows; ++i) {
    for (int v = 0; v < kVectors; ++v) {
      sum[i][v] = accumulate ? _mm512_loadu_ps(c + i * ldc + 16 * v) : _mm512_setzero_ps();
    }
  }
  for (int64_t p = 0; p < depth; ++p) {
    __m512 b_row[kVectors];
    for (int v = 0; v < kVectors; ++v) b_row[v] = _mm512_loadu_ps(b + p * ldb + 16 * v);
    for (int i = 0; i < kRows; ++i) {
      const __m512 a_ip = _mm512_set1_ps(a[i * lda + p]);
      for (int v = 0; v < kVectors; ++v) sum[i][v] = _mm512_fmadd_ps(a_ip, b_row[v], sum[i][v]);
    }
  }
  for (int i = 0; i < kRows; ++i) {
    for (int v = 0; v < kVectors; ++v) _mm512_storeu_ps(c + i * ldc + 16 * v, sum[i][v]);
  }
}

// All M rows of one column strip of 16 kVectors columns: tiles of 5 rows, then the rest.
template <int kVectors>
void ProductStrip(const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
                  int64_t ldc, int64_t m, int64_t depth, bool accumulate) {
  int64_t i = 0;
  for (; i + 5 <= m; i += 5) {
    ProductTile<5, kVectors>(a + i * lda, lda, b, ldb, c + i * ldc, ldc, depth, accumulate);
  }
  a += i * lda;
  c += i * ldc;
  switch (m - i) {
    case 4: ProductTile<4, kVectors>(a, lda, b, ldb, c, ldc, depth, accumulate); break;
    case 3: ProductTile<3, kVectors>(a, lda, b, ldb, c, ldc, depth, accumulate); break;
    case 2: ProductTile<2, kVectors>(a, lda, b, ldb, c, ldc, depth, accumulate); break;
    case 1: ProductTile<1, kVectors>(a, lda, b, ldb, c, ldc, depth, accumulate); break;
    default: break;
  }
}
#endif

template <typename B>  // Matrix or ConstMatrixMap
void Product(const MatrixMap& a, const B& b, Matrix& c, bool accumulate) {
  const int64_t m = a.rows(), k = a.cols(), n = b.cols();
#if defined(__AVX512F__)
  if (n % 16 == 0 && k > 0) {
    const int64_t lda = a.outerStride(), ldb = b.outerStride(), ldc = c.outerStride();
    for (int64_t p = 0; p < k; p += kChunk) {
      const int64_t depth = std::min(kChunk, k - p);
      const bool add = accumulate || p > 0;
      int64_t j = 0;
      for (; j + 64 <= n; j += 64) {
        ProductStrip<4>(a.data() + p, lda, b.data() + p * ldb + j, ldb, c.data() + j, ldc, m,
                        depth, add);
      }
      for (; j < n; j += 16) {
        ProductStrip<1>(a.data() + p, lda, b.data() + p * ldb + j, ldb, c.data() + j, ldc, m,
                        depth, add);
      }
    }
    return;
  }
#endif
  if (accumulate) {
    c.noalias() += a * b;
  } else {
    c.noalias() = a * b;
  }
}

// ---------------------------------------------------------------------------------------------
// The block loops. `u` and `u_t` arrive as GateColumns of U and U^T: only this block's units.
// Slices of [rows, G] tensors go through Gate (gate g's columns of this block's units), slices of
// [rows, H] ones through Own.

struct Slicer {
  int64_t units;  // H
  const Block& block;

  Eigen::Block<MatrixMap> Gate(MatrixMap& m, int g) const {
    return m.middleCols(g * units + block.unit, block.units);
  }
  Eigen::Block<MatrixMap> Own(MatrixMap& m) const {
    return m.middleCols(block.unit, block.units);
  }
  // m += this block's part of step t of a [T, B, H] gradient, when there is one.
  void AddStep(Matrix& m, const Rows& per_step, int64_t t) const {
    if (!per_step.present()) return;
    MatrixMap step = per_step.at(t, block.row, block.rows);
    m += Own(step);
  }
};

// LSTM (Keras gate order i, f, g, o). Forward inputs: xw [T,B,G] (x W + b, sigmoid columns
// halved), u [H,G] (same halving), u_bias (unused, empty), h0, c0 [B,H]. Per-step factors for the
// backward pass: j [T,B,G], k [T,B,H], f [T,B,H], with dZ = [dc, dc, dc, dh] * j and
// dc = dc_next + dh * k.

// One row's LSTM gate math on `len` (at most 16) of its units, in registers, in one pass: z and
// xw hold the four gates' pre-activations (h U and x W + b, gate g at z + g * z_gate, xw + g *
// xw_gate); writes c, h and, when j is not null, the factors j (gate g at j + g * j_gate), k, f.
// A: 16 lanes (one AVX-512 register) or, for the last units of a row, up to 16.
using Lanes = Eigen::Array<float, 16, 1>;
using FewerLanes = Eigen::Array<float, Eigen::Dynamic, 1, Eigen::ColMajor, 16, 1>;

// Calls cell(r, first, len, lanes) for each of a block's rows r and its n units in chunks of
// 16 from `first`: lanes a Lanes, or a FewerLanes for a row's last len < 16 units.
template <typename Cell>
inline void ForEachChunk(int64_t rows, int64_t n, Cell cell) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t first = 0; first < n; first += 16) {
      const int64_t len = std::min<int64_t>(16, n - first);
      len == 16 ? cell(r, first, len, Lanes()) : cell(r, first, len, FewerLanes());
    }
  }
}

template <typename A>
inline void LstmCell(const float* z, int64_t z_gate, const float* xw, int64_t xw_gate, float* c,
                     float* h, float* j, int64_t j_gate, float* k, float* f_out, int64_t len) {
  using In = Eigen::Map<const A>;
  using Out = Eigen::Map<A>;
  const A ti = (In(z, len) + In(xw, len)).tanh();
  const A tf = (In(z + z_gate, len) + In(xw + xw_gate, len)).tanh();
  const A tg = (In(z + 2 * z_gate, len) + In(xw + 2 * xw_gate, len)).tanh();
  const A to = (In(z + 3 * z_gate, len) + In(xw + 3 * xw_gate, len)).tanh();
  const A i = 0.5f * ti + 0.5f, f = 0.5f * tf + 0.5f, o = 0.5f * to + 0.5f;
  Out c_now(c, len);
  if (j != nullptr) {  // the forget gate's factor takes the old c: before c is updated
    Out(j + j_gate, len) = c_now * (0.5f - 0.5f * tf.square());
  }
  c_now = f * c_now + i * tg;
  const A tc = c_now.tanh();
  Out(h, len) = o * tc;
  if (j != nullptr) {
    Out(j, len) = tg * (0.5f - 0.5f * ti.square());
    Out(j + 2 * j_gate, len) = i * (1.0f - tg.square());
    Out(j + 3 * j_gate, len) = tc * (0.5f - 0.5f * to.square());
    Out(k, len) = o * (1.0f - tc.square());
    Out(f_out, len) = f;
  }
}

void LstmForwardBlock(const Rows& xw, const Matrix& u, const Rows& h0, const Rows& c0,
                      const Rows& hs, const Rows& h_out, const Rows& c_out, const Rows& j,
                      const Rows& k, const Rows& f_out, int64_t steps, int64_t units,
                      const Block& block) {
  const int64_t rows = block.rows, n = block.units, row = block.row;
  const Slicer s{units, block};
  Matrix z(rows, 4 * n);
  MatrixMap c0_rows = c0.at(0, row, rows);
  Matrix c = s.Own(c0_rows);
  for (int64_t t = 0; t < steps; ++t) {
    MatrixMap h_prev = t ? hs.at(t - 1, row, rows) : h0.at(0, row, rows);
    Product(h_prev, u, z, false);
    ForEachChunk(rows, n, [&](int64_t r, int64_t first, int64_t len, auto lanes) {
      const int64_t i = row + r, column = block.unit + first;
      LstmCell<decltype(lanes)>(z.data() + r * 4 * n + first, n, xw.Row(t, i, column), units,
                                c.data() + r * n + first, hs.Row(t, i, column),
                                j.Row(t, i, column), units, k.Row(t, i, column),
                                f_out.Row(t, i, column), len);
    });
    block.Sync();  // h_t complete before any block reads it
  }
  MatrixMap h_last = steps ? hs.at(steps - 1, row, rows) : h0.at(0, row, rows);
  MatrixMap h_final = h_out.at(0, row, rows), c_final = c_out.at(0, row, rows);
  s.Own(h_final) = s.Own(h_last);
  s.Own(c_final) = c;
}

void LstmBackwardBlock(const Rows& j, const Rows& k, const Rows& f, const Rows& d_hs,
                       const Rows& dh_final, const Rows& dc_final, const Matrix& u_t,
                       const Rows& dz, float* sums, const Rows& dh0, const Rows& dc0,
                       int64_t steps, int64_t units, const Block& block) {
  const int64_t rows = block.rows, n = block.units, row = block.row;
  const Slicer s{units, block};
  MatrixMap dh_rows = dh_final.at(0, row, rows), dc_rows = dc_final.at(0, row, rows);
  Matrix dh = s.Own(dh_rows), dc = s.Own(dc_rows);
  Eigen::Map<RowVector> sum(sums, 4 * units);
  sum.setZero();
  for (int64_t t = steps - 1; t >= 0; --t) {
    s.AddStep(dh, d_hs, t);
    MatrixMap k_t = k.at(t, row, rows), f_t = f.at(t, row, rows);
    dc.array() += dh.array() * s.Own(k_t).array();
    MatrixMap dz_t = dz.at(t, row, rows), j_t = j.at(t, row, rows);
    for (int g = 0; g < 3; ++g) s.Gate(dz_t, g).array() = dc.array() * s.Gate(j_t, g).array();
    s.Gate(dz_t, 3).array() = dh.array() * s.Gate(j_t, 3).array();
    for (int g = 0; g < 4; ++g) {
      sum.segment(g * units + block.unit, n) += s.Gate(dz_t, g).colwise().sum();
    }
    block.Sync();  // every unit's dZ_t written before the product below reads all of them
    Product(dz_t, u_t, dh, false);
    dc.array() *= s.Own(f_t).array();
  }
  MatrixMap dh0_rows = dh0.at(0, row, rows), dc0_rows = dc0.at(0, row, rows);
  s.Own(dh0_rows) = dh;
  s.Own(dc0_rows) = dc;
}

// ---------------------------------------------------------------------------------------------
// GRU, reset_after=True (Keras gate order z, r, h). Forward inputs: xw [T,B,G] (z, r columns
// halved), u [H,G], u_bias [G] (the recurrent bias, same halving), h0 [B,H]. Factors: j_in,
// j_rec [T,B,G] and z [T,B,H]: dZ_in = [dh, dh, dh] * j_in, dZ_rec = [dh, dh, dh] * j_rec,
// dh_prev = dh * z + dZ_rec U^T.

// One row's GRU gate math on `len` (at most 16) of its units, one pass: hu and xw the three gates'
// h U and x W + b (gate g at + g * hu_gate / xw_gate), u_bias the recurrent bias of hu's columns,
// h_prev this row's units of h_{t-1}; writes h and, when j_in is not null, the factors j_in, j_rec
// (gate g at + g * j_gate) and z.
template <typename A>
inline void GruCell(const float* hu, int64_t hu_gate, const float* u_bias, const float* xw,
                    int64_t xw_gate, const float* h_prev, float* h, float* j_in, float* j_rec,
                    int64_t j_gate, float* z_out, int64_t len) {
  using In = Eigen::Map<const A>;
  using Out = Eigen::Map<A>;
  const A hu_z = In(hu, len) + In(u_bias, len);
  const A hu_r = In(hu + hu_gate, len) + In(u_bias + hu_gate, len);
  const A hu_h = In(hu + 2 * hu_gate, len) + In(u_bias + 2 * hu_gate, len);
  const A tz = (In(xw, len) + hu_z).tanh();
  const A tr = (In(xw + xw_gate, len) + hu_r).tanh();
  const A z = 0.5f * tz + 0.5f, r = 0.5f * tr + 0.5f;
  const A hh = (In(xw + 2 * xw_gate, len) + r * hu_h).tanh();
  const A h_minus = In(h_prev, len) - hh;
  Out(h, len) = hh + z * h_minus;
  if (j_in != nullptr) {
    const A k_h = (1.0f - z) * (1.0f - hh.square());
    const A k_r = k_h * hu_h * (0.5f - 0.5f * tr.square());
    const A k_z = h_minus * (0.5f - 0.5f * tz.square());
    Out(j_in, len) = k_z;
    Out(j_in + j_gate, len) = k_r;
    Out(j_in + 2 * j_gate, len) = k_h;
    Out(j_rec, len) = k_z;
    Out(j_rec + j_gate, len) = k_r;
    Out(j_rec + 2 * j_gate, len) = k_h * r;
    Out(z_out, len) = z;
  }
}

void GruForwardBlock(const Rows& xw, const Matrix& u, const RowVector& u_bias, const Rows& h0,
                     const Rows& hs, const Rows& h_out, const Rows& j_in, const Rows& j_rec,
                     const Rows& z_out, int64_t steps, int64_t units, const Block& block) {
  const int64_t rows = block.rows, n = block.units, row = block.row;
  const Slicer s{units, block};
  Matrix hu(rows, 3 * n);
  for (int64_t t = 0; t < steps; ++t) {
    MatrixMap h_prev = t ? hs.at(t - 1, row, rows) : h0.at(0, row, rows);
    Product(h_prev, u, hu, false);
    ForEachChunk(rows, n, [&](int64_t r, int64_t first, int64_t len, auto lanes) {
      const int64_t i = row + r, column = block.unit + first;
      GruCell<decltype(lanes)>(hu.data() + r * 3 * n + first, n, u_bias.data() + first,
                               xw.Row(t, i, column), units,
                               t ? hs.Row(t - 1, i, column) : h0.Row(0, i, column),
                               hs.Row(t, i, column), j_in.Row(t, i, column),
                               j_rec.Row(t, i, column), units, z_out.Row(t, i, column), len);
    });
    block.Sync();
  }
  MatrixMap h_last = steps ? hs.at(steps - 1, row, rows) : h0.at(0, row, rows);
  MatrixMap h_final = h_out.at(0, row, rows);
  s.Own(h_final) = s.Own(h_last);
}

void GruBackwardBlock(const Rows& j_in, const Rows& j_rec, const Rows& z, const Rows& d_hs,
                      const Rows& dh_final, const Matrix& u_t, const Rows& dz_in,
                      const Rows& dz_rec, float* sums_in, float* sums_rec, const Rows& dh0,
                      int64_t steps, int64_t units, const Block& block) {
  const int64_t rows = block.rows, n = block.units, row = block.row;
  const Slicer s{units, block};
  MatrixMap dh_rows = dh_final.at(0, row, rows);
  Matrix dh = s.Own(dh_rows);
  Eigen::Map<RowVector> sum_in(sums_in, 3 * units), sum_rec(sums_rec, 3 * units);
  sum_in.setZero();
  sum_rec.setZero();
  for (int64_t t = steps - 1; t >= 0; --t) {
    s.AddStep(dh, d_hs, t);
    MatrixMap in_t = dz_in.at(t, row, rows), rec_t = dz_rec.at(t, row, rows);
    MatrixMap j_in_t = j_in.at(t, row, rows), j_rec_t = j_rec.at(t, row, rows);
    for (int g = 0; g < 3; ++g) {
      s.Gate(in_t, g).array() = dh.array() * s.Gate(j_in_t, g).array();
      s.Gate(rec_t, g).array() = dh.array() * s.Gate(j_rec_t, g).array();
      sum_in.segment(g * units + block.unit, n) += s.Gate(in_t, g).colwise().sum();
      sum_rec.segment(g * units + block.unit, n) += s.Gate(rec_t, g).colwise().sum();
    }
    MatrixMap z_t = z.at(t, row, rows);
    dh.array() *= s.Own(z_t).array();
    block.Sync();
    Product(rec_t, u_t, dh, true);
  }
  MatrixMap dh0_rows = dh0.at(0, row, rows);
  s.Own(dh0_rows) = dh;
}

// ---------------------------------------------------------------------------------------------
// SimpleRNN (tanh). Forward inputs: xw [T,B,H], u [H,H], u_bias (unused, empty), h0 [B,H].
// Factor: j = 1 - h^2 [T,B,H].

void SimpleForwardBlock(const Rows& xw, const Matrix& u, const Rows& h0, const Rows& hs,
                        const Rows& h_out, const Rows& j, int64_t steps, int64_t units,
                        const Block& block) {
  const int64_t rows = block.rows, row = block.row;
  const Slicer s{units, block};
  Matrix z(rows, block.units);
  for (int64_t t = 0; t < steps; ++t) {
    MatrixMap h_prev = t ? hs.at(t - 1, row, rows) : h0.at(0, row, rows);
    Product(h_prev, u, z, false);
    MatrixMap xw_t = xw.at(t, row, rows), h_t = hs.at(t, row, rows);
    z += s.Own(xw_t);
    s.Own(h_t) = z.array().tanh().matrix();
    if (j.present()) {
      MatrixMap j_t = j.at(t, row, rows);
      s.Own(j_t).array() = 1.0f - s.Own(h_t).array().square();
    }
    block.Sync();
  }
  MatrixMap h_last = steps ? hs.at(steps - 1, row, rows) : h0.at(0, row, rows);
  MatrixMap h_final = h_out.at(0, row, rows);
  s.Own(h_final) = s.Own(h_last);
}

void SimpleBackwardBlock(const Rows& j, const Rows& d_hs, const Rows& dh_final,
                         const Matrix& u_t, const Rows& dz, float* sums, const Rows& dh0,
                         int64_t steps, int64_t units, const Block& block) {
  const int64_t rows = block.rows, row = block.row;
  const Slicer s{units, block};
  MatrixMap dh_rows = dh_final.at(0, row, rows);
  Matrix dh = s.Own(dh_rows);
  Eigen::Map<RowVector> sum(sums, units);
  sum.setZero();
  for (int64_t t = steps - 1; t >= 0; --t) {
    s.AddStep(dh, d_hs, t);
    MatrixMap dz_t = dz.at(t, row, rows), j_t = j.at(t, row, rows);
    s.Own(dz_t).array() = dh.array() * s.Own(j_t).array();
    sum.segment(block.unit, block.units) += s.Own(dz_t).colwise().sum();
    block.Sync();
    Product(dz_t, u_t, dh, false);
  }
  MatrixMap dh0_rows = dh0.at(0, row, rows);
  s.Own(dh0_rows) = dh;
}

// ---------------------------------------------------------------------------------------------
// The ops. Forward: (xw, u, u_bias, states0...) -> (hs, final states..., factors...); factors are
// empty [0, 0, 0] tensors when with_jacobian is false. Backward: (factors..., d_hs, d_final...,
// u_t) -> (dZ arrays..., their column sums..., d_states0...); d_hs may be empty (only the final
// states were used).

struct Kind {
  int gates;           // gate blocks of H columns in G
  bool needs_u_bias;   // GRU's recurrent bias
  int states;          // carried states (h, c)
  int arrays;          // dZ arrays the backward pass writes (GRU: input and recurrent)
  std::vector<int> factor_widths;  // per factor: 0 -> G wide, 1 -> H wide
};

const Kind kLstm{4, false, 2, 1, {0, 1, 1}};
const Kind kGru{3, true, 1, 2, {0, 0, 1}};
const Kind kSimple{1, false, 1, 1, {1}};

tensorflow::Status ForwardShape(InferenceContext* c, const Kind& kind) {
  ShapeHandle xw, u;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 3, &xw));
  TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 2, &u));
  bool with_jacobian = false;
  TF_RETURN_IF_ERROR(c->GetAttr("with_jacobian", &with_jacobian));
  DimensionHandle steps = c->Dim(xw, 0), batch = c->Dim(xw, 1), gates = c->Dim(xw, 2);
  DimensionHandle units = c->Dim(u, 0);
  c->set_output(0, c->MakeShape({steps, batch, units}));
  for (int s = 0; s < kind.states; ++s) c->set_output(1 + s, c->MakeShape({batch, units}));
  for (size_t f = 0; f < kind.factor_widths.size(); ++f) {
    c->set_output(1 + kind.states + f,
                  with_jacobian ? c->MakeShape({steps, batch,
                                                kind.factor_widths[f] ? units : gates})
                                : c->MakeShape({0, 0, 0}));
  }
  return tensorflow::OkStatus();
}

tensorflow::Status BackwardShape(InferenceContext* c, const Kind& kind) {
  ShapeHandle j, u_t;
  TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 3, &j));
  const int factors = static_cast<int>(kind.factor_widths.size());
  TF_RETURN_IF_ERROR(c->WithRank(c->input(factors + 1 + kind.states), 2, &u_t));
  DimensionHandle steps = c->Dim(j, 0), batch = c->Dim(j, 1);
  DimensionHandle gates = c->Dim(u_t, 0), units = c->Dim(u_t, 1);
  for (int a = 0; a < kind.arrays; ++a) {
    c->set_output(a, c->MakeShape({steps, batch, gates}));
    c->set_output(kind.arrays + a, c->MakeShape({gates}));
  }
  for (int s = 0; s < kind.states; ++s) {
    c->set_output(2 * kind.arrays + s, c->MakeShape({batch, units}));
  }
  return tensorflow::OkStatus();
}

// How the blocks divide the work (see the top of this file); "auto" picks units for H >= 512.
constexpr char kSplitAttr[] = "split: {'auto', 'rows', 'units'} = 'auto'";

REGISTER_OP("TfCharrnnLstmForward")
    .Attr("with_jacobian: bool").Attr(kSplitAttr)
    .Input("xw: float").Input("u: float").Input("u_bias: float")
    .Input("h0: float").Input("c0: float")
    .Output("hs: float").Output("h: float").Output("c: float")
    .Output("j: float").Output("k: float").Output("f: float")
    .SetShapeFn([](InferenceContext* c) { return ForwardShape(c, kLstm); });

REGISTER_OP("TfCharrnnLstmBackward")
    .Attr(kSplitAttr)
    .Input("j: float").Input("k: float").Input("f: float").Input("d_hs: float")
    .Input("dh: float").Input("dc: float").Input("u_t: float")
    .Output("dz: float").Output("sums: float").Output("dh0: float").Output("dc0: float")
    .SetShapeFn([](InferenceContext* c) { return BackwardShape(c, kLstm); });

REGISTER_OP("TfCharrnnGruForward")
    .Attr("with_jacobian: bool").Attr(kSplitAttr)
    .Input("xw: float").Input("u: float").Input("u_bias: float").Input("h0: float")
    .Output("hs: float").Output("h: float")
    .Output("j_in: float").Output("j_rec: float").Output("z: float")
    .SetShapeFn([](InferenceContext* c) { return ForwardShape(c, kGru); });

REGISTER_OP("TfCharrnnGruBackward")
    .Attr(kSplitAttr)
    .Input("j_in: float").Input("j_rec: float").Input("z: float").Input("d_hs: float")
    .Input("dh: float").Input("u_t: float")
    .Output("dz_in: float").Output("dz_rec: float")
    .Output("sums_in: float").Output("sums_rec: float").Output("dh0: float")
    .SetShapeFn([](InferenceContext* c) { return BackwardShape(c, kGru); });

REGISTER_OP("TfCharrnnSimpleRnnForward")
    .Attr("with_jacobian: bool").Attr(kSplitAttr)
    .Input("xw: float").Input("u: float").Input("u_bias: float").Input("h0: float")
    .Output("hs: float").Output("h: float").Output("j: float")
    .SetShapeFn([](InferenceContext* c) { return ForwardShape(c, kSimple); });

REGISTER_OP("TfCharrnnSimpleRnnBackward")
    .Attr(kSplitAttr)
    .Input("j: float").Input("d_hs: float").Input("dh: float").Input("u_t: float")
    .Output("dz: float").Output("sums: float").Output("dh0: float")
    .SetShapeFn([](InferenceContext* c) { return BackwardShape(c, kSimple); });

// The table source's backward sum (kernels.py): sums [rows, G], row v the sum of the rows i of
// values [N, G] with ids[i] == v. Each thread owns a band of the columns and adds the rows in
// order, so the sums do not depend on the thread count.
REGISTER_OP("TfCharrnnSumById")
    .Input("values: float").Input("ids: int32").Input("rows: int32")
    .Output("sums: float")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle values, ids;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(0), 2, &values));
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1), 1, &ids));
      DimensionHandle rows;
      TF_RETURN_IF_ERROR(c->MakeDimForScalarInput(2, &rows));
      c->set_output(0, c->MakeShape({rows, c->Dim(values, 1)}));
      return tensorflow::OkStatus();
    });

class SumByIdOp : public OpKernel {
 public:
  explicit SumByIdOp(OpKernelConstruction* context) : OpKernel(context) {}

  void Compute(OpKernelContext* context) override {
    const Tensor& values = context->input(0);
    const Tensor& ids = context->input(1);
    const Tensor& rows_tensor = context->input(2);
    OP_REQUIRES(context, values.dims() == 2 && ids.dims() == 1 &&
                             ids.dim_size(0) == values.dim_size(0) && rows_tensor.dims() == 0,
                tensorflow::errors::InvalidArgument(
                    "values must be [N, G], ids [N] and rows a scalar"));
    const int64_t n = values.dim_size(0), width = values.dim_size(1);
    const int64_t rows = rows_tensor.scalar<int32_t>()();
    const int32_t* id = ids.flat<int32_t>().data();
    for (int64_t i = 0; i < n; ++i) {
      OP_REQUIRES(context, id[i] >= 0 && id[i] < rows,
                  tensorflow::errors::InvalidArgument("id ", id[i], " at ", i,
                                                      " is outside [0, ", rows, ")"));
    }
    Tensor* sums = Output(context, 0, TensorShape({rows, width}));
    if (!context->status().ok()) return;
    float* out = sums->flat<float>().data();
    const float* in = values.flat<float>().data();
    std::fill(out, out + rows * width, 0.0f);
    // Bands of 16 columns (one AVX-512 register); the sharder splits them between the threads.
    const int64_t bands = (width + 15) / 16;
    auto run = [&](int64_t first, int64_t last) {
      const int64_t begin = 16 * first, band = std::min(width, 16 * last) - begin;
      for (int64_t i = 0; i < n; ++i) {
        Eigen::Map<RowVector>(out + id[i] * width + begin, band) +=
            Eigen::Map<const RowVector>(in + i * width + begin, band);
      }
    };
    auto* workers = context->device()->tensorflow_cpu_worker_threads();
    tensorflow::Shard(workers->num_threads, workers->workers, bands, 16 * n, run);
  }
};

// What one call of an op works on. Kept out of the OpKernel: Compute may run on several threads
// at once.
struct Call {
  int64_t steps = 0, batch = 0, units = 0, gates = 0;
  std::vector<Rows> states;   // forward: initial states; backward: final-state gradients
  std::vector<Rows> outputs;  // forward: hs, final states, factors; backward: dZ arrays, dstates0
  std::vector<Rows> factors;  // backward: the per-step factors
  Rows d_hs;                  // backward
  const float* u_bias = nullptr;
};

// What the kinds differ in: how one block's share of a call maps onto the block loops above.
// u / u_t: this block's columns of U / U^T (GateColumns); sums: its slices of the bias sums.
using ForwardBlockFn = void (*)(const Call& call, const Rows& xw, const Matrix& u,
                                const Block& block);
using BackwardBlockFn = void (*)(const Call& call, const Matrix& u_t,
                                 const std::vector<float*>& sums, const Block& block);

void LstmForward(const Call& call, const Rows& xw, const Matrix& u, const Block& block) {
  const auto& o = call.outputs;
  LstmForwardBlock(xw, u, call.states[0], call.states[1], o[0], o[1], o[2], o[3], o[4], o[5],
                   call.steps, call.units, block);
}

void GruForward(const Call& call, const Rows& xw, const Matrix& u, const Block& block) {
  const auto& o = call.outputs;
  const ConstMatrixMap u_bias(call.u_bias, 1, call.gates);
  const RowVector u_bias_block = GateColumns(u_bias, 3, call.units, block);
  GruForwardBlock(xw, u, u_bias_block, call.states[0], o[0], o[1], o[2], o[3], o[4], call.steps,
                  call.units, block);
}

void SimpleForward(const Call& call, const Rows& xw, const Matrix& u, const Block& block) {
  const auto& o = call.outputs;
  SimpleForwardBlock(xw, u, call.states[0], o[0], o[1], o[2], call.steps, call.units, block);
}

void LstmBackward(const Call& call, const Matrix& u_t, const std::vector<float*>& sums,
                  const Block& block) {
  const auto& f = call.factors;
  const auto& o = call.outputs;
  LstmBackwardBlock(f[0], f[1], f[2], call.d_hs, call.states[0], call.states[1], u_t, o[0],
                    sums[0], o[1], o[2], call.steps, call.units, block);
}

void GruBackward(const Call& call, const Matrix& u_t, const std::vector<float*>& sums,
                 const Block& block) {
  const auto& f = call.factors;
  const auto& o = call.outputs;
  GruBackwardBlock(f[0], f[1], f[2], call.d_hs, call.states[0], u_t, o[0], o[1], sums[0],
                   sums[1], o[2], call.steps, call.units, block);
}

void SimpleBackward(const Call& call, const Matrix& u_t, const std::vector<float*>& sums,
                    const Block& block) {
  const auto& o = call.outputs;
  SimpleBackwardBlock(call.factors[0], call.d_hs, call.states[0], u_t, o[0], sums[0], o[1],
                      call.steps, call.units, block);
}

// Checks the shapes every op shares, allocates the outputs and runs the blocks.
class ForwardOp : public OpKernel {
 public:
  ForwardOp(OpKernelConstruction* context, const Kind& kind, ForwardBlockFn run_block)
      : OpKernel(context), kind_(kind), run_block_(run_block) {
    OP_REQUIRES_OK(context, context->GetAttr("with_jacobian", &with_jacobian_));
    std::string split;
    OP_REQUIRES_OK(context, context->GetAttr("split", &split));
    split_ = ParseSplit(split);
  }

  void Compute(OpKernelContext* context) override {
    const Tensor& xw = context->input(0);
    const Tensor& u = context->input(1);
    OP_REQUIRES(context, xw.dims() == 3 && u.dims() == 2 && u.dim_size(1) == xw.dim_size(2),
                tensorflow::errors::InvalidArgument("xw must be [T, B, G] and u [H, G]"));
    Call call;
    call.steps = xw.dim_size(0);
    call.batch = xw.dim_size(1);
    call.units = u.dim_size(0);
    call.gates = u.dim_size(1);
    const int64_t steps = call.steps, batch = call.batch, units = call.units;
    OP_REQUIRES(context, call.gates == kind_.gates * units,
                tensorflow::errors::InvalidArgument("u must be [H, G] with G = gates * H"));
    const Tensor& u_bias = context->input(2);
    OP_REQUIRES(context, u_bias.NumElements() == (kind_.needs_u_bias ? call.gates : 0),
                tensorflow::errors::InvalidArgument("u_bias must be [G] for GRU, else empty"));
    call.u_bias = u_bias.NumElements() ? u_bias.flat<float>().data() : nullptr;
    for (int s = 0; s < kind_.states; ++s) {
      const Tensor& state = context->input(3 + s);
      OP_REQUIRES(context, state.shape() == TensorShape({batch, units}),
                  tensorflow::errors::InvalidArgument("initial states must be [B, H]"));
      call.states.emplace_back(state, batch, units);
    }
    Tensor* hs = Output(context, 0, TensorShape({steps, batch, units}));
    if (!context->status().ok()) return;
    call.outputs.emplace_back(hs, batch, units);
    for (int s = 0; s < kind_.states; ++s) {
      Tensor* state = Output(context, 1 + s, TensorShape({batch, units}));
      if (!context->status().ok()) return;
      call.outputs.emplace_back(state, batch, units);
    }
    for (size_t f = 0; f < kind_.factor_widths.size(); ++f) {
      const int64_t width = kind_.factor_widths[f] ? units : call.gates;
      Tensor* factor = Output(context, 1 + kind_.states + static_cast<int>(f),
                              with_jacobian_ ? TensorShape({steps, batch, width})
                                             : TensorShape({0, 0, 0}));
      if (!context->status().ok()) return;
      call.outputs.emplace_back(factor, batch, width);
    }
    const ConstMatrixMap u_map(u.flat<float>().data(), units, call.gates);
    const Rows xw_rows(xw, batch, call.gates);
    RunBlocks(context, batch, units, MakePlan(context, steps, batch, units, split_),
              [&](const Block& block) {
                run_block_(call, xw_rows, GateColumns(u_map, kind_.gates, units, block), block);
              });
  }

 private:
  const Kind& kind_;
  const ForwardBlockFn run_block_;
  bool with_jacobian_ = false;
  Split split_ = Split::kAuto;
};

class BackwardOp : public OpKernel {
 public:
  BackwardOp(OpKernelConstruction* context, const Kind& kind, BackwardBlockFn run_block)
      : OpKernel(context), kind_(kind), run_block_(run_block) {
    std::string split;
    OP_REQUIRES_OK(context, context->GetAttr("split", &split));
    split_ = ParseSplit(split);
  }

  void Compute(OpKernelContext* context) override {
    const int factors = static_cast<int>(kind_.factor_widths.size());
    const Tensor& first = context->input(0);
    const Tensor& u_t = context->input(factors + 1 + kind_.states);
    OP_REQUIRES(context, first.dims() == 3 && u_t.dims() == 2,
                tensorflow::errors::InvalidArgument("factors must be [T, B, G] and u_t [G, H]"));
    Call call;
    call.steps = first.dim_size(0);
    call.batch = first.dim_size(1);
    call.gates = u_t.dim_size(0);
    call.units = u_t.dim_size(1);
    OP_REQUIRES(context, call.gates == kind_.gates * call.units,
                tensorflow::errors::InvalidArgument("u_t must be [G, H] with G = gates * H"));
    const int64_t steps = call.steps, batch = call.batch, units = call.units;
    const int64_t gates = call.gates;
    for (int f = 0; f < factors; ++f) {
      const int64_t width = kind_.factor_widths[f] ? units : gates;
      const Tensor& factor = context->input(f);
      OP_REQUIRES(context, factor.shape() == TensorShape({steps, batch, width}),
                  tensorflow::errors::InvalidArgument("per-step factors disagree in shape"));
      call.factors.emplace_back(factor, batch, width);
    }
    const Tensor& d_hs = context->input(factors);
    OP_REQUIRES(context, d_hs.NumElements() == 0 ||
                             d_hs.shape() == TensorShape({steps, batch, units}),
                tensorflow::errors::InvalidArgument("d_hs must be [T, B, H] or empty"));
    call.d_hs = Rows(d_hs, batch, units);
    for (int s = 0; s < kind_.states; ++s) {
      const Tensor& d = context->input(factors + 1 + s);
      OP_REQUIRES(context, d.shape() == TensorShape({batch, units}),
                  tensorflow::errors::InvalidArgument("final-state gradients must be [B, H]"));
      call.states.emplace_back(d, batch, units);
    }
    for (int a = 0; a < kind_.arrays; ++a) {
      Tensor* array = Output(context, a, TensorShape({steps, batch, gates}));
      if (!context->status().ok()) return;
      call.outputs.emplace_back(array, batch, gates);
    }
    for (int s = 0; s < kind_.states; ++s) {
      Tensor* d = Output(context, 2 * kind_.arrays + s, TensorShape({batch, units}));
      if (!context->status().ok()) return;
      call.outputs.emplace_back(d, batch, units);
    }
    // Each block sums its own rows into its own slice; the slices are added up after.
    const Plan plan = MakePlan(context, steps, batch, units, split_);
    const int blocks = plan.blocks;
    // On Eigen's aligned heap: a std::vector's start moved within a cache line from call to call,
    // and Eigen's vectorised column sums peel their first columns to alignment as scalar sums in
    // another order, so the same inputs gave bias gradients differing in their last bits.
    Matrix partial = Matrix::Zero(blocks * kind_.arrays, gates);
    auto slice = [&](int block, int array) {
      return partial.row(block * kind_.arrays + array).data();
    };
    const ConstMatrixMap u_t_map(u_t.flat<float>().data(), gates, units);
    RunBlocks(context, batch, units, plan, [&](const Block& block) {
      std::vector<float*> sums;
      for (int a = 0; a < kind_.arrays; ++a) sums.push_back(slice(block.index, a));
      run_block_(call, GateColumns(u_t_map, 1, units, block), sums, block);
    });
    for (int a = 0; a < kind_.arrays; ++a) {
      Tensor* sums = Output(context, kind_.arrays + a, TensorShape({gates}));
      if (!context->status().ok()) return;
      Eigen::Map<RowVector> total(sums->flat<float>().data(), gates);
      total.setZero();
      for (int b = 0; b < blocks; ++b) total += Eigen::Map<RowVector>(slice(b, a), gates);
    }
  }

 private:
  const Kind& kind_;
  const BackwardBlockFn run_block_;
  Split split_ = Split::kAuto;
};

// One registered kernel class per op: the shared op with its kind and block function.
template <const Kind& kKind, ForwardBlockFn kRunBlock>
class ForwardOpOf : public ForwardOp {
 public:
  explicit ForwardOpOf(OpKernelConstruction* context) : ForwardOp(context, kKind, kRunBlock) {}
};

template <const Kind& kKind, BackwardBlockFn kRunBlock>
class BackwardOpOf : public BackwardOp {
 public:
  explicit BackwardOpOf(OpKernelConstruction* context)
      : BackwardOp(context, kKind, kRunBlock) {}
};

using LstmForwardOp = ForwardOpOf<kLstm, LstmForward>;
using LstmBackwardOp = BackwardOpOf<kLstm, LstmBackward>;
using GruForwardOp = ForwardOpOf<kGru, GruForward>;
using GruBackwardOp = BackwardOpOf<kGru, GruBackward>;
using SimpleForwardOp = ForwardOpOf<kSimple, SimpleForward>;
using SimpleBackwardOp = BackwardOpOf<kSimple, SimpleBackward>;

REGISTER_KERNEL_BUILDER(Name("TfCharrnnLstmForward").Device(DEVICE_CPU), LstmForwardOp);
REGISTER_KERNEL_BUILDER(Name("TfCharrnnLstmBackward").Device(DEVICE_CPU), LstmBackwardOp);
REGISTER_KERNEL_BUILDER(Name("TfCharrnnGruForward").Device(DEVICE_CPU), GruForwardOp);
REGISTER_KERNEL_BUILDER(Name("TfCharrnnGruBackward").Device(DEVICE_CPU), GruBackwardOp);
REGISTER_KERNEL_BUILDER(Name("TfCharrnnSimpleRnnForward").Device(DEVICE_CPU), SimpleForwardOp);
REGISTER_KERNEL_BUILDER(Name("TfCharrnnSimpleRnnBackward").Device(DEVICE_CPU), SimpleBackwardOp);
REGISTER_KERNEL_BUILDER(Name("TfCharrnnSumById").Device(DEVICE_CPU), SumByIdOp);


// ---------------------------------------------------------------------------------------------
// Generation (tf_charrnn/sample.py): the sampler's whole loop for a stack of layers as one op.
// Per step and row: the first layer's input projection is a row of the [V, G] table (the
// previous character's id), each deeper layer's x W + b one product; h U, the cell math above,
// the head's logits, then one draw. Rows never interact, so the rows are split between the
// threads as in training; one stream runs on one thread, where the weights (about 0.8 MB for the
// lecture model) stay in its cache from step to step.

// The draw's uniform number for (seed, position, row): a counter-based hash (splitmix64's
// finaliser, three rounds), so the draws depend on the seed, the character's position and the
// row only, not on how the positions are split between calls.
inline uint64_t Mix(uint64_t x) {
  x += 0x9e3779b97f4a7c15ULL;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ULL;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebULL;
  return x ^ (x >> 31);
}

inline float Uniform(int64_t seed, int64_t position, int64_t row) {
  const uint64_t bits = Mix(Mix(Mix(static_cast<uint64_t>(seed)) ^ static_cast<uint64_t>(position))
                            ^ static_cast<uint64_t>(row));
  return static_cast<float>(bits >> 40) * (1.0f / 16777216.0f);  // 24 bits: [0, 1)
}

struct DrawOptions {
  float temperature;
  int64_t top_k;  // 0: off
  float top_p;    // 1: off
};

// The draw from scaled logits [V] (the largest 0; cut ones -inf), which it overwrites with their
// weights exp(scaled): the first id where the running sum of the weights passes uniform x their
// total. sums: [V rounded up to 16s] scratch.
#if defined(__AVX512F__)
// In blocks of 16 ids: each block's running sums in one register (a log-step scan), the blocks'
// totals added in order; then the block the point falls in, and the id within it. Per row this
// is a few dozen vector instructions where a sequential running sum is a chain of V adds.
// The scan adds in a tree, so rounding can leave neighbouring running sums a float out of order,
// and where the point falls between two such the count can stop on an id that weighs nothing
// (cut, or its exp below float's range). That id is then passed on to the next one with weight
// (WeightedFrom), so an id that weighs nothing is never drawn.
// The first min(count, 16) lanes of a register.
inline __mmask16 FirstLanes(int64_t count) {
  return _cvtu32_mask16(count >= 16 ? 0xffffu : (1u << count) - 1u);
}

// id if weighs(id), else the next id after it that weighs(), else the last one before it.
template <typename Weighs>
int64_t WeightedFrom(int64_t id, int64_t vocab, Weighs weighs) {
  if (weighs(id)) return id;
  for (int64_t next = id + 1; next < vocab; ++next) {
    if (weighs(next)) return next;
  }
  for (int64_t before = id - 1; before >= 0; --before) {
    if (weighs(before)) return before;
  }
  return id;  // nothing weighs anything (NaN logits)
}

inline int32_t DrawScaled(float* scaled, int64_t vocab, float uniform, float* sums) {
  const int64_t blocks = (vocab + 15) / 16;
  const __m512 zero = _mm512_setzero_ps();
  const __m512 minus_infinity = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  float total = 0.0f;
  for (int64_t b = 0; b < blocks; ++b) {
    const __mmask16 valid = FirstLanes(vocab - 16 * b);
    const __m512 x = _mm512_mask_loadu_ps(minus_infinity, valid, scaled + 16 * b);
    const __mmask16 weighted = _mm512_cmp_ps_mask(x, minus_infinity, _CMP_NEQ_OQ);
    __m512 sum = _mm512_maskz_mov_ps(weighted, Eigen::internal::pexp(x));  // cut ids weigh 0
    _mm512_mask_storeu_ps(scaled + 16 * b, valid, sum);
    // Running sums within the block: lane i adds lane i - 1, then i - 2, i - 4, i - 8.
    sum = _mm512_add_ps(sum, _mm512_castsi512_ps(_mm512_alignr_epi32(
                                 _mm512_castps_si512(sum), _mm512_castps_si512(zero), 15)));
    sum = _mm512_add_ps(sum, _mm512_castsi512_ps(_mm512_alignr_epi32(
                                 _mm512_castps_si512(sum), _mm512_castps_si512(zero), 14)));
    sum = _mm512_add_ps(sum, _mm512_castsi512_ps(_mm512_alignr_epi32(
                                 _mm512_castps_si512(sum), _mm512_castps_si512(zero), 12)));
    sum = _mm512_add_ps(sum, _mm512_castsi512_ps(_mm512_alignr_epi32(
                                 _mm512_castps_si512(sum), _mm512_castps_si512(zero), 8)));
    _mm512_storeu_ps(sums + 16 * b, sum);
    total += sums[16 * b + 15];
  }
  // Strictly below the total, so the draw never runs past the last id with any weight.
  const float point = std::min(uniform * total, std::nextafter(total, 0.0f));
  float before = 0.0f;
  int64_t b = 0;
  while (b < blocks - 1 && before + sums[16 * b + 15] <= point) before += sums[16 * b + 15], ++b;
  const __mmask16 passed = _mm512_cmp_ps_mask(
      _mm512_add_ps(_mm512_set1_ps(before), _mm512_loadu_ps(sums + 16 * b)),
      _mm512_set1_ps(point), _CMP_LE_OQ);
  // The block's running sums rise (but for rounding), so the ids at or under the point come first.
  const int64_t id = std::min(16 * b + _mm_popcnt_u32(_cvtmask16_u32(passed)), vocab - 1);
  return static_cast<int32_t>(
      WeightedFrom(id, vocab, [&](int64_t v) { return scaled[v] > 0.0f; }));
}
#else
// A sequential running sum: it never falls, and an id that weighs nothing sums what the id
// before it does, so the first id past the point has weight.
inline int32_t DrawScaled(float* scaled, int64_t vocab, float uniform, float* sums) {
  using Array = Eigen::Array<float, Eigen::Dynamic, 1>;
  Eigen::Map<Array>(scaled, vocab) = Eigen::Map<const Array>(scaled, vocab).exp();
  std::copy(scaled, scaled + vocab, sums);
  for (int64_t v = 1; v < vocab; ++v) sums[v] += sums[v - 1];
  const float total = sums[vocab - 1];
  // Strictly below the total, so the draw never runs past the last id with any weight.
  const float point = std::min(uniform * total, std::nextafter(total, 0.0f));
  int64_t id = 0;
  while (id < vocab - 1 && sums[id] <= point) ++id;
  return static_cast<int32_t>(id);
}
#endif

// One row's draw from logits [V], by sample.py's rules (filter_logits, then draw): logits
// shifted to a maximum of 0 and divided by the temperature; top_k > 0 keeps the logits at least
// the k-th largest; top_p < 1 then keeps the largest ones while the probability before them is
// under top_p; the id is where the cumulative weights first pass uniform x their total
// (DrawScaled). scaled: [V] scratch, ordered: [V rounded up to 16s] scratch, both on Eigen's
// aligned heap: Eigen computes an unaligned array's first elements one by one, and its scalar exp
// is not its vector one, so where a buffer started would change the weights' last bits.
int32_t DrawRow(const float* logits, int64_t vocab, const DrawOptions& options, float uniform,
                float* scaled, float* ordered) {
  using Array = Eigen::Array<float, Eigen::Dynamic, 1>;
  Eigen::Map<const Array> in(logits, vocab);
  Eigen::Map<Array> out(scaled, vocab);
  out = (in - in.maxCoeff()) / options.temperature;
  if (options.top_k > 0 || options.top_p < 1.0f) {
    std::copy(scaled, scaled + vocab, ordered);
    std::sort(ordered, ordered + vocab, [](float a, float b) { return a > b; });
    const int64_t k = options.top_k > 0 ? std::min(options.top_k, vocab) : vocab;
    const float kth = ordered[k - 1];
    int64_t kept = 0;
    float total = 0.0f;
    for (; kept < vocab && ordered[kept] >= kth; ++kept) total += std::exp(ordered[kept]);
    int64_t count = kept;
    if (options.top_p < 1.0f) {
      float before = 0.0f;
      count = 0;
      while (count < kept && before < options.top_p) before += std::exp(ordered[count++]) / total;
    }
    const float threshold = ordered[std::max<int64_t>(count, 1) - 1];
    out = (out < threshold).select(-std::numeric_limits<float>::infinity(), out);
  }
  return DrawScaled(scaled, vocab, uniform, ordered);
}

#if defined(__AVX512F__)
// Draws for 16 rows at once, one row per lane: DrawRow's arithmetic without top-k or top-p,
// operation for operation (the same shift, division, exp, scan within each block of 16 ids, block
// totals added in order, point and search), so a row draws the same id either way and a stream's
// text does not depend on how many rows run beside it (for finite logits: a NaN, from a diverged
// model, drops out of this max but not out of DrawRow's). Where DrawRow reduces and scans along a
// row, with shuffles in the registers and a branch per block, here each step is one vector
// operation on 16 rows: at V = 65 about 2.6x fewer cycles a row in a standalone test.
constexpr int64_t kLaneRows = 16;

// 16 x 16 floats in place: lane j of rows[i] and lane i of rows[j] trade places.
inline void Transpose16(__m512* rows) {
  __m512 t[16];
  for (int i = 0; i < 16; i += 2) {  // pairs of rows: 2 x 2 blocks
    t[i] = _mm512_unpacklo_ps(rows[i], rows[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(rows[i], rows[i + 1]);
  }
  const auto low = [](__m512 a, __m512 b) {
    return _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
  };
  const auto high = [](__m512 a, __m512 b) {
    return _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(a), _mm512_castps_pd(b)));
  };
  for (int i = 0; i < 16; i += 4) {  // 4 x 4 blocks within each 128-bit lane
    rows[i] = low(t[i], t[i + 2]);
    rows[i + 1] = high(t[i], t[i + 2]);
    rows[i + 2] = low(t[i + 1], t[i + 3]);
    rows[i + 3] = high(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 4; ++i) {  // then the 128-bit lanes, in two rounds
    t[i] = _mm512_shuffle_f32x4(rows[i], rows[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_f32x4(rows[i], rows[i + 4], 0xdd);
    t[i + 8] = _mm512_shuffle_f32x4(rows[i + 8], rows[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_f32x4(rows[i + 8], rows[i + 12], 0xdd);
  }
  for (int i = 0; i < 4; ++i) {
    rows[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    rows[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
    rows[i + 4] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0x88);
    rows[i + 12] = _mm512_shuffle_f32x4(t[i + 4], t[i + 12], 0xdd);
  }
}

// ids[0, count) for rows [0, count) (count <= 16) of logits (row stride `stride`), with
// uniforms[0, count) and temperature; sums: scratch of V rounded up to 16s registers, one per id,
// weighted: as many masks (the rows where the id has weight).
void DrawLaneRows(const float* logits, int64_t stride, int64_t count, int64_t vocab,
                  float temperature, const float* uniforms, __m512* sums, __mmask16* weighted,
                  int32_t* ids) {
  const int64_t blocks = (vocab + 15) / 16;
  const __m512 zero = _mm512_setzero_ps();
  const __m512 minus_infinity = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  // The logits turned so that register v holds id v's logit of every row; ids past V are -inf,
  // rows past count 0 (their draws are not kept).
  __m512 largest = minus_infinity;
  for (int64_t b = 0; b < blocks; ++b) {
    const __mmask16 valid = FirstLanes(vocab - 16 * b);
    __m512* x = sums + 16 * b;
    for (int64_t r = 0; r < 16; ++r) {
      x[r] = r < count ? _mm512_mask_loadu_ps(minus_infinity, valid, logits + r * stride + 16 * b)
                       : zero;
    }
    Transpose16(x);
    for (int i = 0; i < 16; ++i) largest = _mm512_max_ps(largest, x[i]);
  }
  // Weights and their running sums within each block (DrawScaled's scan: lane i adds lane i - 1,
  // then i - 2, i - 4, i - 8; here register i adds register i - 1, ...).
  const __m512 divisor = _mm512_set1_ps(temperature);
  __m512 total = zero;
  for (int64_t b = 0; b < blocks; ++b) {
    __m512* s = sums + 16 * b;
    const int64_t ids_here = std::min<int64_t>(16, vocab - 16 * b);
    for (int64_t i = ids_here; i < 16; ++i) s[i] = zero;  // past V: weight 0
    for (int64_t i = 0; i < ids_here; ++i) {
      __m512 x = _mm512_sub_ps(s[i], largest);
      if (temperature != 1.0f) x = _mm512_div_ps(x, divisor);  // x / 1 is x
      const __mmask16 finite = _mm512_cmp_ps_mask(x, minus_infinity, _CMP_NEQ_OQ);
      s[i] = _mm512_maskz_mov_ps(finite, Eigen::internal::pexp(x));
      weighted[16 * b + i] = _mm512_cmp_ps_mask(s[i], zero, _CMP_GT_OQ);
    }
    for (int shift = 1; shift < 16; shift *= 2) {
      for (int i = 15; i >= shift; --i) s[i] = _mm512_add_ps(s[i], s[i - shift]);
    }
    total = _mm512_add_ps(total, s[15]);
  }
  // point = min(uniform x total, the float below total); total > 0 where the logits are finite.
  const __m512 below = _mm512_castsi512_ps(
      _mm512_sub_epi32(_mm512_castps_si512(total), _mm512_set1_epi32(1)));
  const __m512 nearest = _mm512_mask_blend_ps(
      _mm512_cmp_ps_mask(total, zero, _CMP_GT_OQ), total, below);
  const __m512 point = _mm512_min_ps(
      _mm512_mul_ps(_mm512_maskz_loadu_ps(FirstLanes(count), uniforms), total), nearest);
  // DrawScaled's search: whole blocks while their last running sum is at or under the point
  // (never the last block), then the ids at or under it in the block where a row stops.
  const __m512i one = _mm512_set1_epi32(1), sixteen = _mm512_set1_epi32(16);
  __m512 before = zero;
  __m512i id = _mm512_setzero_si512();
  __mmask16 searching = 0xffff;
  for (int64_t b = 0; b < blocks && searching != 0; ++b) {
    const __m512* s = sums + 16 * b;
    const __mmask16 passes = b + 1 < blocks ? _mm512_mask_cmp_ps_mask(
        searching, _mm512_add_ps(before, s[15]), point, _CMP_LE_OQ) : 0;
    const __mmask16 stops = searching & ~passes;
    for (int i = 0; i < 16; ++i) {
      const __mmask16 under = _mm512_mask_cmp_ps_mask(stops, _mm512_add_ps(before, s[i]), point,
                                                       _CMP_LE_OQ);
      id = _mm512_mask_add_epi32(id, under, id, one);
    }
    id = _mm512_mask_add_epi32(id, passes, id, sixteen);
    searching = passes;
    before = _mm512_add_ps(before, s[15]);
  }
  id = _mm512_min_epi32(id, _mm512_set1_epi32(static_cast<int32_t>(vocab - 1)));
  _mm512_mask_storeu_epi32(ids, FirstLanes(count), id);
  for (int64_t r = 0; r < count; ++r) {  // DrawScaled's last step
    ids[r] = static_cast<int32_t>(WeightedFrom(ids[r], vocab, [&](int64_t v) {
      return (_cvtmask16_u32(weighted[v]) >> r & 1u) != 0;
    }));
  }
}

// ids[0, rows) for rows [0, rows) of logits (row stride `stride`) in groups of 16 rows
// (DrawLaneRows; the last group may be shorter), uniform(r) each row's uniform number; sums and
// weighted: DrawLaneRows's scratch.
template <typename UniformOf>
void DrawLaneGroups(const float* logits, int64_t stride, int64_t rows, int64_t vocab,
                    float temperature, UniformOf uniform, __m512* sums, __mmask16* weighted,
                    int32_t* ids) {
  for (int64_t r = 0; r < rows; r += kLaneRows) {
    const int64_t count = std::min(kLaneRows, rows - r);
    float uniforms[kLaneRows];
    for (int64_t i = 0; i < count; ++i) uniforms[i] = uniform(r + i);
    DrawLaneRows(logits + r * stride, stride, count, vocab, temperature, uniforms, sums,
                 weighted, ids + r);
  }
}

#endif  // __AVX512F__

// ---------------------------------------------------------------------------------------------
// bfloat16 products for the generation loop (precision "bfloat16"), on AMX tiles where the CPU
// has them, else with AVX-512 BF16 dot products (DotProduct). A tile multiply takes [16, 32] x
// [32, 16] bfloat16 and adds the float32 products into a [16, 16] float32 tile: up to 16 times
// the float32 FMA rate per core, which pays most where the rows are many (at lecture size 64
// streams run the step's products at about 450 flop a cycle against float32's 60; one stream
// gains less, from reading half the bytes of weights). vdpbf16ps, without tiles, runs twice the
// float32 FMA rate. The weights are rounded to bfloat16 (to nearest even) once per call and laid
// out as the tiles read them (the dot products read the same layout); each layer's new h is
// rounded once per step; sums, cell math and draw are float32.

// Whether this library was built with the AMX path and Linux lets this process use the tiles
// (asked once; the permission is the whole process's).
bool AmxReady() {
#ifdef TF_CHARRNN_AMX
  static const bool ready = [] {
    constexpr long kRequestPermission = 0x1023;  // ARCH_REQ_XCOMP_PERM
    constexpr long kTileData = 18;               // XFEATURE_XTILEDATA
    return syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
  }();
  return ready;
#else
  return false;
#endif
}

// Whether precision bfloat16 runs here: on AMX tiles, else with AVX-512 BF16 dot products.
bool Bfloat16Ready() {
#ifdef TF_CHARRNN_BF16
  return true;
#else
  return false;
#endif
}

inline uint16_t RoundToBfloat16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  bits += 0x7fffu + ((bits >> 16) & 1u);  // to nearest, ties to even
  return static_cast<uint16_t>(bits >> 16);
}

constexpr int64_t kTileRows = 16;     // rows of an A or C tile
constexpr int64_t kTileDepth = 32;    // bfloat16 elements of k per A row / B tile
constexpr int64_t kTileColumns = 16;  // float32 columns of a C tile
constexpr int64_t kTileElements = kTileRows * kTileDepth;

// Memory the tiles read and write, on 64-byte boundaries: a tile row that straddles two cache
// lines costs two accesses (a large std::vector sits 16 bytes off one; the products then ran
// 2.5x slower in a standalone test, the whole 64-stream loop 1.3x).
template <typename T>
struct CacheLineAllocator {
  using value_type = T;
  CacheLineAllocator() = default;
  template <typename U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}  // NOLINT: the allocator's conversion
  T* allocate(size_t n) {
    return static_cast<T*>(::operator new(n * sizeof(T), std::align_val_t(64)));
  }
  void deallocate(T* p, size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <typename U>
  bool operator==(const CacheLineAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const CacheLineAllocator<U>&) const { return false; }
};
template <typename T>
using TileVector = std::vector<T, CacheLineAllocator<T>>;

// B [K, N] (row-major, float32) as bfloat16 B tiles: K padded with zeros to 32s, N to 16s; tile
// (column block nb, depth block kb) at (nb * depth_blocks + kb) * 512, its row r holding the pairs
// (B[32 kb + 2r, n], B[32 kb + 2r + 1, n]) for its 16 columns n (the layout the tiles multiply).
struct PackedWeights {
  int64_t depth_blocks = 0, column_blocks = 0;
  TileVector<uint16_t> tiles;
};

PackedWeights PackWeights(const float* b, int64_t k, int64_t n) {
  PackedWeights packed;
  packed.depth_blocks = RoundUp(k, kTileDepth) / kTileDepth;
  packed.column_blocks = RoundUp(n, kTileColumns) / kTileColumns;
  packed.tiles.assign(packed.depth_blocks * packed.column_blocks * kTileElements, 0);
  uint16_t* out = packed.tiles.data();
  for (int64_t nb = 0; nb < packed.column_blocks; ++nb) {
    for (int64_t kb = 0; kb < packed.depth_blocks; ++kb) {
      for (int64_t r = 0; r < kTileRows; ++r) {
        for (int64_t col = 0; col < kTileColumns; ++col) {
          for (int64_t pair = 0; pair < 2; ++pair, ++out) {
            const int64_t i = kb * kTileDepth + 2 * r + pair, j = nb * kTileColumns + col;
            if (i < k && j < n) *out = RoundToBfloat16(b[i * n + j]);
          }
        }
      }
    }
  }
  return packed;
}

#ifdef TF_CHARRNN_AMX
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t bytes_per_row[16] = {};
  uint8_t rows[16] = {};
};

// Tiles 0-7 of 16 rows x 64 bytes, the rest unused. A constant in static storage: the compiler
// does not see ldtilecfg read its operand, and may drop the stores that build one on the stack
// (it did: the unused tiles' fields kept stack garbage and ldtilecfg faulted).
constexpr TileConfig MakeTileConfig() {
  TileConfig config;
  for (int tile = 0; tile < 8; ++tile) {
    config.rows[tile] = kTileRows;
    config.bytes_per_row[tile] = 64;
  }
  return config;
}
constexpr TileConfig kTileConfig = MakeTileConfig();

// One register block of c = a b (+ bias): up to 2 x 2 C tiles (tiles 0-3) over 32 rows and 32
// columns, A tiles 4-5, B tiles 6-7. a: bfloat16 rows of lda elements, from the block's first
// row; b: the block's first column block's tiles; bias: null, or float32 [>= 32] from the
// block's first column, loaded into every row of the C tiles (a tile load with stride 0).
template <bool kTwoRowTiles, bool kTwoColumnTiles>
inline void TileBlock(const uint16_t* a, int64_t lda, const uint16_t* b, int64_t depth_blocks,
                      const float* bias, float* c, int64_t ldc) {
  const int64_t a_stride = lda * 2, c_stride = ldc * 4;
  const uint16_t* b_next = b + depth_blocks * kTileElements;  // the next column block's tiles
  if (bias != nullptr) {
    _tile_loadd(0, bias, 0);
    if constexpr (kTwoColumnTiles) _tile_loadd(1, bias + kTileColumns, 0);
    if constexpr (kTwoRowTiles) _tile_loadd(2, bias, 0);
    if constexpr (kTwoRowTiles && kTwoColumnTiles) _tile_loadd(3, bias + kTileColumns, 0);
  } else {
    _tile_zero(0);
    if constexpr (kTwoColumnTiles) _tile_zero(1);
    if constexpr (kTwoRowTiles) _tile_zero(2);
    if constexpr (kTwoRowTiles && kTwoColumnTiles) _tile_zero(3);
  }
  for (int64_t kb = 0; kb < depth_blocks; ++kb) {
    // The B tiles of the next depth block (or the next column blocks' first) on their way to
    // L1 while these multiply: the weights stream from L2 once per step.
    const bool last = kb + 1 == depth_blocks;
    const uint16_t* b_ahead = last ? b + 2 * depth_blocks * kTileElements
                                   : b + (kb + 1) * kTileElements;
    const uint16_t* b_next_ahead = last ? b + 3 * depth_blocks * kTileElements
                                        : b_next + (kb + 1) * kTileElements;
    for (int line = 0; line < kTileRows; ++line) {
      _mm_prefetch(reinterpret_cast<const char*>(b_ahead + line * 32), _MM_HINT_T0);
      if constexpr (kTwoColumnTiles) {
        _mm_prefetch(reinterpret_cast<const char*>(b_next_ahead + line * 32), _MM_HINT_T0);
      }
    }
    _tile_loadd(4, a + kb * kTileDepth, a_stride);
    if constexpr (kTwoRowTiles) _tile_loadd(5, a + kTileRows * lda + kb * kTileDepth, a_stride);
    _tile_loadd(6, b + kb * kTileElements, 64);
    if constexpr (kTwoColumnTiles) _tile_loadd(7, b_next + kb * kTileElements, 64);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (kTwoColumnTiles) _tile_dpbf16ps(1, 4, 7);
    if constexpr (kTwoRowTiles) _tile_dpbf16ps(2, 5, 6);
    if constexpr (kTwoRowTiles && kTwoColumnTiles) _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, c, c_stride);
  if constexpr (kTwoColumnTiles) _tile_stored(1, c + kTileColumns, c_stride);
  if constexpr (kTwoRowTiles) _tile_stored(2, c + kTileRows * ldc, c_stride);
  if constexpr (kTwoRowTiles && kTwoColumnTiles) {
    _tile_stored(3, c + kTileRows * ldc + kTileColumns, c_stride);
  }
}

// c [rows, 16 column_blocks] = a [rows, 32 depth_blocks] b (+ bias), rows a multiple of 16.
void TileProduct(const uint16_t* a, int64_t lda, int64_t rows, const PackedWeights& b,
                 const float* bias, float* c, int64_t ldc) {
  for (int64_t row = 0; row < rows; row += 2 * kTileRows) {
    const bool two_rows = row + kTileRows < rows;
    for (int64_t nb = 0; nb < b.column_blocks; nb += 2) {
      const bool two_columns = nb + 1 < b.column_blocks;
      const uint16_t* a_block = a + row * lda;
      const uint16_t* b_block = b.tiles.data() + nb * b.depth_blocks * kTileElements;
      const float* bias_block = bias == nullptr ? nullptr : bias + nb * kTileColumns;
      float* c_block = c + row * ldc + nb * kTileColumns;
      if (two_rows && two_columns) {
        TileBlock<true, true>(a_block, lda, b_block, b.depth_blocks, bias_block, c_block, ldc);
      } else if (two_rows) {
        TileBlock<true, false>(a_block, lda, b_block, b.depth_blocks, bias_block, c_block, ldc);
      } else if (two_columns) {
        TileBlock<false, true>(a_block, lda, b_block, b.depth_blocks, bias_block, c_block, ldc);
      } else {
        TileBlock<false, false>(a_block, lda, b_block, b.depth_blocks, bias_block, c_block, ldc);
      }
    }
  }
}
#endif  // TF_CHARRNN_AMX

#ifdef TF_CHARRNN_BF16
// n floats -> bfloat16, to nearest even; out past n is left as it is.
inline void ToBfloat16(const float* in, int64_t n, uint16_t* out) {
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 lanes = FirstLanes(n - i);
    const __m256bh packed = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(lanes, in + i));
    _mm256_mask_storeu_epi16(out + i, lanes, reinterpret_cast<const __m256i&>(packed));
  }
}

// The same products without tiles, for CPUs with AVX-512 BF16 but no AMX: vdpbf16ps adds, in
// each float32 lane, the products of one pair of k. A B tile's row r holds that pair (k = 2r,
// 2r + 1) for its 16 columns, which is one register's operand here, and the A side is the
// row's pair broadcast to every lane. One register block: kRows rows x kColumns column blocks
// of 16, the accumulators in registers through all of k; c = a b (+ bias).
template <int kRows, int kColumns>
inline void DotBlock(const uint16_t* a, int64_t lda, const uint16_t* b, int64_t depth_blocks,
                     const float* bias, float* c, int64_t ldc) {
  __m512 sums[kRows][kColumns];
  for (int j = 0; j < kColumns; ++j) {
    const __m512 start = bias == nullptr ? _mm512_setzero_ps() : _mm512_loadu_ps(bias + 16 * j);
    for (int i = 0; i < kRows; ++i) sums[i][j] = start;
  }
  const int64_t column_stride = depth_blocks * kTileElements;  // between column blocks' tiles
  for (int64_t kb = 0; kb < depth_blocks; ++kb) {
    const uint16_t* tile = b + kb * kTileElements;
    for (int64_t r = 0; r < kTileRows; ++r) {
      __m512bh w[kColumns];
      for (int j = 0; j < kColumns; ++j) {
        const __m512i bits = _mm512_load_si512(tile + j * column_stride + r * 2 * kTileColumns);
        w[j] = reinterpret_cast<const __m512bh&>(bits);
      }
      const int64_t k = kb * kTileDepth + 2 * r;
      for (int i = 0; i < kRows; ++i) {
        int32_t pair;
        std::memcpy(&pair, a + i * lda + k, sizeof pair);
        const __m512i broadcast = _mm512_set1_epi32(pair);
        const __m512bh x = reinterpret_cast<const __m512bh&>(broadcast);
        for (int j = 0; j < kColumns; ++j) sums[i][j] = _mm512_dpbf16_ps(sums[i][j], x, w[j]);
      }
    }
  }
  for (int i = 0; i < kRows; ++i) {
    for (int j = 0; j < kColumns; ++j) _mm512_storeu_ps(c + i * ldc + 16 * j, sums[i][j]);
  }
}

template <int kRows>
inline void DotRows(const uint16_t* a, int64_t lda, const PackedWeights& b, int64_t nb,
                    const float* bias, float* c, int64_t ldc) {
  const uint16_t* tiles = b.tiles.data() + nb * b.depth_blocks * kTileElements;
  const float* bias_block = bias == nullptr ? nullptr : bias + nb * kTileColumns;
  float* c_block = c + nb * kTileColumns;
  switch (std::min<int64_t>(4, b.column_blocks - nb)) {
    case 4: DotBlock<kRows, 4>(a, lda, tiles, b.depth_blocks, bias_block, c_block, ldc); break;
    case 3: DotBlock<kRows, 3>(a, lda, tiles, b.depth_blocks, bias_block, c_block, ldc); break;
    case 2: DotBlock<kRows, 2>(a, lda, tiles, b.depth_blocks, bias_block, c_block, ldc); break;
    default: DotBlock<kRows, 1>(a, lda, tiles, b.depth_blocks, bias_block, c_block, ldc); break;
  }
}

// c [rows, 16 column_blocks] = a [rows, 32 depth_blocks] b (+ bias), TileProduct's contract
// (any number of rows). Four column blocks at a time, outermost: their weights (16 KB at depth
// 128) stay in L1 while every row block passes.
void DotProduct(const uint16_t* a, int64_t lda, int64_t rows, const PackedWeights& b,
                const float* bias, float* c, int64_t ldc) {
  for (int64_t nb = 0; nb < b.column_blocks; nb += 4) {
    for (int64_t row = 0; row < rows; row += 4) {
      const uint16_t* a_rows = a + row * lda;
      float* c_rows = c + row * ldc;
      switch (std::min<int64_t>(4, rows - row)) {
        case 4: DotRows<4>(a_rows, lda, b, nb, bias, c_rows, ldc); break;
        case 3: DotRows<3>(a_rows, lda, b, nb, bias, c_rows, ldc); break;
        case 2: DotRows<2>(a_rows, lda, b, nb, bias, c_rows, ldc); break;
        default: DotRows<1>(a_rows, lda, b, nb, bias, c_rows, ldc); break;
      }
    }
  }
}
#endif  // TF_CHARRNN_BF16

// What one call of the generation op works on; the states are the outputs, holding the initial
// states at the start and updated in place.
struct Generation {
  const Kind* kind;
  int64_t layers, units, gates, vocab, batch, steps;
  const float* table = nullptr;        // [V, G]: layer 0's x W + b per id
  std::vector<ConstMatrixMap> kernels;  // layers 1..: W [H, G] (layer 0's is empty)
  std::vector<RowVector> biases;       // layers 1..: b [G], zeros after G up to a 16s
  std::vector<ConstMatrixMap> recurrent;  // U [H, G]
  std::vector<RowVector> recurrent_biases;  // GRU: [G]
  Matrix head;                         // [H, V16]: the head's kernel, columns padded to 16s
  RowVector head_bias;                 // [V16]
  const int32_t* ids;                  // [B]: each row's last character, not yet fed
  std::vector<float*> states;          // [B, H] each, layer by layer
  int32_t* drawn;                      // [B, steps]
  int64_t seed, position;
  DrawOptions options;
  bool bfloat16 = false;  // the products in bfloat16 (the packed weights below)
  bool tiles = false;     // on AMX tiles, else AVX-512 BF16 dot products
  std::vector<PackedWeights> packed_kernels, packed_recurrent;  // layer 0's kernel: empty
  PackedWeights packed_head;
};

// One block's draws per step: DrawLaneRows for groups of at least 8 rows where the options
// allow (no top-k or top-p; argmax is top-k 1), DrawRow for the others. Either gives a row the
// same id (for finite logits).
class Draws {
 public:
  Draws(const Generation& g, int64_t rows)
      : g_(g), rows_(rows), scaled_(g.vocab), ordered_(RoundUp(g.vocab, 16)) {
#if defined(__AVX512F__)
    if (g.options.top_k == 0 && g.options.top_p >= 1.0f) {
      lane_rows_ = rows - (rows % kLaneRows < kMinLaneRows ? rows % kLaneRows : 0);
      sums_.resize(RoundUp(g.vocab, 16));
      weighted_.resize(RoundUp(g.vocab, 16));
    }
#endif
  }
  // ids[0, rows) = the draws of step t from logits [rows, V] (row stride `stride`) of the rows
  // from `row` on.
  void Step(const float* logits, int64_t stride, int64_t row, int64_t t, int32_t* ids) {
#if defined(__AVX512F__)
    DrawLaneGroups(logits, stride, lane_rows_, g_.vocab, g_.options.temperature,
                   [&](int64_t i) { return Uniform(g_.seed, g_.position + t, row + i); },
                   sums_.data(), weighted_.data(), ids);
#endif
    for (int64_t r = lane_rows_; r < rows_; ++r) {  // lane_rows_ is 0 without AVX-512
      ids[r] = DrawRow(logits + r * stride, g_.vocab, g_.options,
                       Uniform(g_.seed, g_.position + t, row + r), scaled_.data(),
                       ordered_.data());
    }
  }

 private:
  static constexpr int64_t kMinLaneRows = 8;  // fewer: the rows' own draws cost less
  const Generation& g_;
  int64_t rows_, lane_rows_ = 0;
  Eigen::ArrayXf scaled_, ordered_;  // aligned: DrawRow's scratch
#if defined(__AVX512F__)
  std::vector<__m512> sums_;
  std::vector<__mmask16> weighted_;
#endif
};

// The products of one block's generation step in float32 (Product: AVX-512 register tiles).
// Layer l's pre-activations: z = h U into Z(), and for l > 0 xw = x W + b into XW(); the head's
// logits x Wy + by into Logits(); each a [rows, *] matrix with the row stride the *Stride()
// functions give.
class FloatProducts {
 public:
  FloatProducts(const Generation& g, int64_t rows)
      : g_(g), rows_(rows), z_(rows, g.gates), xw_(rows, g.gates), logits_(rows, g.head.cols()) {}
  void Layer(int64_t l, float* x, float* h) {
    if (l > 0) {
      xw_.rowwise() = g_.biases[l].leftCols(g_.gates);
      Product(MatrixMap(x, rows_, g_.units), g_.kernels[l], xw_, true);
    }
    Product(MatrixMap(h, rows_, g_.units), g_.recurrent[l], z_, false);
  }
  void Updated(int64_t, const float*) {}  // layer l's h has its new values
  void Head(float* x) {
    logits_.rowwise() = g_.head_bias;
    Product(MatrixMap(x, rows_, g_.units), g_.head, logits_, true);
  }
  const float* Z() const { return z_.data(); }
  const float* XW() const { return xw_.data(); }
  int64_t Stride() const { return g_.gates; }
  const float* Logits() const { return logits_.data(); }
  int64_t LogitsStride() const { return logits_.cols(); }

 private:
  const Generation& g_;
  int64_t rows_;
  Matrix z_, xw_, logits_;
};

#ifdef TF_CHARRNN_BF16
// The same products in bfloat16, on AMX tiles (kTiles) or with AVX-512 BF16 dot products: the
// block's rows padded to 16s (zero rows, for the tiles), each layer's h kept as bfloat16 rows of
// depth padded to 32s, rounded once when it changes.
template <bool kTiles>
class Bfloat16Products {
 public:
  Bfloat16Products(const Generation& g, int64_t rows)
      : g_(g), rows_(rows), padded_rows_(RoundUp(rows, kTileRows)),
        product_rows_(kTiles ? padded_rows_ : rows_), depth_(RoundUp(g.units, kTileDepth)), stride_(RoundUp(g.gates, kTileColumns)),
        logits_stride_(g.head.cols()),
        h_(g.layers, TileVector<uint16_t>(padded_rows_ * depth_, 0)),
        z_(padded_rows_ * stride_), xw_(padded_rows_ * stride_),
        logits_(padded_rows_ * logits_stride_) {
#ifdef TF_CHARRNN_AMX
    if constexpr (kTiles) _tile_loadconfig(&kTileConfig);
#endif
  }
  ~Bfloat16Products() {
#ifdef TF_CHARRNN_AMX
    if constexpr (kTiles) _tile_release();
#endif
  }
  Bfloat16Products(const Bfloat16Products&) = delete;
  Bfloat16Products& operator=(const Bfloat16Products&) = delete;

  void Layer(int64_t l, float*, float*) {
    if (l > 0) {
      Multiply(h_[l - 1].data(), depth_, product_rows_, g_.packed_kernels[l],
               g_.biases[l].data(), xw_.data(), stride_);
    }
    Multiply(h_[l].data(), depth_, product_rows_, g_.packed_recurrent[l], nullptr, z_.data(),
             stride_);
  }
  void Updated(int64_t l, const float* h) {  // the rows' padding columns stay 0
    for (int64_t r = 0; r < rows_; ++r) {
      ToBfloat16(h + r * g_.units, g_.units, h_[l].data() + r * depth_);
    }
  }
  void Head(float*) {
    Multiply(h_[g_.layers - 1].data(), depth_, product_rows_, g_.packed_head,
             g_.head_bias.data(), logits_.data(), logits_stride_);
  }
  const float* Z() const { return z_.data(); }
  const float* XW() const { return xw_.data(); }
  int64_t Stride() const { return stride_; }
  const float* Logits() const { return logits_.data(); }
  int64_t LogitsStride() const { return logits_stride_; }

 private:
  // c [rows, *] = a b (+ bias): the product of TileProduct's contract, by this class's means.
  void Multiply(const uint16_t* a, int64_t lda, int64_t rows, const PackedWeights& b,
                const float* bias, float* c, int64_t ldc) const {
#ifdef TF_CHARRNN_AMX
    if constexpr (kTiles) return TileProduct(a, lda, rows, b, bias, c, ldc);
#endif
    DotProduct(a, lda, rows, b, bias, c, ldc);
  }

  const Generation& g_;
  // The tiles multiply 16 rows at a time (the padding rows are zeros); the dot products take
  // the block's own.
  int64_t rows_, padded_rows_, product_rows_, depth_, stride_, logits_stride_;
  std::vector<TileVector<uint16_t>> h_;  // per layer: [padded rows, depth] bfloat16
  TileVector<float> z_, xw_, logits_;
};
#endif  // TF_CHARRNN_BF16

template <typename Products>
void GenerateBlockWith(const Generation& g, const Block& block) {
  const int64_t rows = block.rows, row = block.row, units = g.units;
  const int per_layer = g.kind->states;
  Products products(g, rows);
  std::vector<int32_t> ids(g.ids + row, g.ids + row + rows);
  Draws draws(g, rows);
  auto state = [&](int64_t l, int which) { return g.states[l * per_layer + which] + row * units; };
  for (int64_t l = 0; l < g.layers; ++l) products.Updated(l, state(l, 0));  // the initial h
  const int64_t stride = products.Stride();
  for (int64_t t = 0; t < g.steps; ++t) {
    float* x = nullptr;  // this block's rows of the layer below's new h
    for (int64_t l = 0; l < g.layers; ++l) {
      float* h = state(l, 0);
      float* c = per_layer > 1 ? state(l, 1) : nullptr;
      products.Layer(l, x, h);
      const float* z = products.Z();
      auto xw_row = [&](int64_t r) {
        return l == 0 ? g.table + ids[r] * g.gates : products.XW() + r * stride;
      };
      if (g.kind == &kLstm) {
        ForEachChunk(rows, units, [&](int64_t r, int64_t first, int64_t len, auto lanes) {
          LstmCell<decltype(lanes)>(z + r * stride + first, units, xw_row(r) + first, units,
                                    c + r * units + first, h + r * units + first, nullptr, 0,
                                    nullptr, nullptr, len);
        });
      } else if (g.kind == &kGru) {
        ForEachChunk(rows, units, [&](int64_t r, int64_t first, int64_t len, auto lanes) {
          float* h_row = h + r * units + first;
          GruCell<decltype(lanes)>(z + r * stride + first, units,
                                   g.recurrent_biases[l].data() + first, xw_row(r) + first,
                                   units, h_row, h_row, nullptr, nullptr, 0, nullptr, len);
        });
      } else {
        for (int64_t r = 0; r < rows; ++r) {
          Eigen::Map<RowVector>(h + r * units, units) =
              (Eigen::Map<const RowVector>(z + r * stride, units) +
               Eigen::Map<const RowVector>(xw_row(r), units)).array().tanh().matrix();
        }
      }
      products.Updated(l, h);
      x = h;
    }
    products.Head(x);
    draws.Step(products.Logits(), products.LogitsStride(), row, t, ids.data());
    for (int64_t r = 0; r < rows; ++r) g.drawn[(row + r) * g.steps + t] = ids[r];
  }
}

void GenerateBlock(const Generation& g, const Block& block) {
#ifdef TF_CHARRNN_BF16
  if (g.bfloat16 && g.tiles) return GenerateBlockWith<Bfloat16Products<true>>(g, block);
  if (g.bfloat16) return GenerateBlockWith<Bfloat16Products<false>>(g, block);
#endif
  GenerateBlockWith<FloatProducts>(g, block);
}

// (table [V, G], kernels, biases, recurrent, recurrent_biases: one per layer, head kernel
// [H, V], head bias [V], ids [B], states [B, H] (layer by layer), seed, position, temperature,
// top_k, top_p) -> (drawn [B, num_steps], states after feeding all but the last drawn id).
// Layer 0's kernel and bias are empty (the table holds them); recurrent_biases are GRU's, empty
// for the other kinds. The weights are prepared as for the loops above (sigmoid columns halved).
REGISTER_OP("TfCharrnnGenerate")
    .Attr("kind: {'lstm', 'gru', 'simple_rnn'}")
    .Attr("num_steps: int >= 0")
    .Attr("layers: int >= 1")
    .Attr("num_states: int >= 1")
    .Attr("precision: {'float32', 'bfloat16'} = 'float32'")
    .Input("table: float")
    .Input("kernels: layers * float").Input("biases: layers * float")
    .Input("recurrent: layers * float").Input("recurrent_biases: layers * float")
    .Input("head_kernel: float").Input("head_bias: float")
    .Input("ids: int32").Input("states: num_states * float")
    .Input("seed: int32").Input("position: int32").Input("temperature: float")
    .Input("top_k: int32").Input("top_p: float")
    .Output("drawn: int32").Output("new_states: num_states * float")
    .SetShapeFn([](InferenceContext* c) {
      int64_t steps = 0;
      int layers = 0, num_states = 0;
      TF_RETURN_IF_ERROR(c->GetAttr("num_steps", &steps));
      TF_RETURN_IF_ERROR(c->GetAttr("layers", &layers));
      TF_RETURN_IF_ERROR(c->GetAttr("num_states", &num_states));
      ShapeHandle ids;
      TF_RETURN_IF_ERROR(c->WithRank(c->input(1 + 4 * layers + 2), 1, &ids));
      c->set_output(0, c->MakeShape({c->Dim(ids, 0), steps}));
      for (int s = 0; s < num_states; ++s) {
        c->set_output(1 + s, c->input(1 + 4 * layers + 3 + s));
      }
      return tensorflow::OkStatus();
    });

class GenerateOp : public OpKernel {
 public:
  explicit GenerateOp(OpKernelConstruction* context) : OpKernel(context) {
    std::string kind;
    OP_REQUIRES_OK(context, context->GetAttr("kind", &kind));
    kind_ = kind == "lstm" ? &kLstm : kind == "gru" ? &kGru : &kSimple;
    OP_REQUIRES_OK(context, context->GetAttr("num_steps", &steps_));
    OP_REQUIRES_OK(context, context->GetAttr("layers", &layers_));
    OP_REQUIRES_OK(context, context->GetAttr("num_states", &num_states_));
    std::string precision;
    OP_REQUIRES_OK(context, context->GetAttr("precision", &precision));
    bfloat16_ = precision == "bfloat16";
    OP_REQUIRES(context, !bfloat16_ || Bfloat16Ready(),
                tensorflow::errors::FailedPrecondition(
                    "bfloat16 generation needs AVX-512 BF16 (or AMX tiles): use precision "
                    "float32"));
    OP_REQUIRES(context, num_states_ == layers_ * kind_->states,
                tensorflow::errors::InvalidArgument("num_states must be layers x the kind's "
                                                    "states per layer"));
  }

  void Compute(OpKernelContext* context) override {
    using tensorflow::errors::InvalidArgument;
    const int layers = layers_;
    auto input = [&](int index) -> const Tensor& { return context->input(index); };
    auto list = [&](int which, int l) -> const Tensor& { return input(1 + which * layers + l); };
    const int head_at = 1 + 4 * layers, ids_at = head_at + 2, states_at = ids_at + 1;
    const int options_at = states_at + num_states_;
    Generation g;
    g.kind = kind_;
    g.layers = layers;
    g.steps = steps_;
    const Tensor& table = input(0);
    const Tensor& first_u = list(2, 0);
    OP_REQUIRES(context, table.dims() == 2 && first_u.dims() == 2,
                InvalidArgument("table must be [V, G] and recurrent kernels [H, G]"));
    g.vocab = table.dim_size(0);
    g.units = first_u.dim_size(0);
    g.gates = kind_->gates * g.units;
    const int64_t units = g.units, gates = g.gates, vocab = g.vocab;
    OP_REQUIRES(context, table.dim_size(1) == gates && vocab > 0,
                InvalidArgument("table must be [V, G] with G = gates * H and V > 0"));
    g.table = table.flat<float>().data();
    const TensorShape weight({units, gates}), row({gates}), empty({0});
    for (int l = 0; l < layers; ++l) {
      OP_REQUIRES(context, list(2, l).shape() == weight,
                  InvalidArgument("recurrent kernel ", l, " must be [H, G]"));
      g.recurrent.emplace_back(list(2, l).flat<float>().data(), units, gates);
      const bool gru = kind_->needs_u_bias;
      OP_REQUIRES(context, list(3, l).shape() == (gru ? row : empty),
                  InvalidArgument("recurrent bias ", l, " must be [G] for GRU, else [0]"));
      g.recurrent_biases.push_back(
          gru ? RowVector(Eigen::Map<const RowVector>(list(3, l).flat<float>().data(), gates))
              : RowVector());
      if (l == 0) {
        OP_REQUIRES(context, list(0, 0).NumElements() == 0 && list(1, 0).NumElements() == 0,
                    InvalidArgument("layer 0's kernel and bias must be empty (the table)"));
        g.kernels.emplace_back(nullptr, 0, 0);
        g.biases.emplace_back();
        continue;
      }
      OP_REQUIRES(context, list(0, l).shape() == weight && list(1, l).shape() == row,
                  InvalidArgument("layer ", l, "'s kernel must be [H, G] and bias [G]"));
      g.kernels.emplace_back(list(0, l).flat<float>().data(), units, gates);
      g.biases.push_back(RowVector::Zero(RoundUp(gates, 16)));  // whole registers and tiles
      g.biases.back().leftCols(gates) =
          Eigen::Map<const RowVector>(list(1, l).flat<float>().data(), gates);
    }
    const Tensor& head = input(head_at);
    const Tensor& head_bias = input(head_at + 1);
    OP_REQUIRES(context, head.shape() == TensorShape({units, vocab}) &&
                             head_bias.shape() == TensorShape({vocab}),
                InvalidArgument("the head's kernel must be [H, V] and its bias [V]"));
    const int64_t padded = (vocab + 15) / 16 * 16;  // whole registers: Product's tiles
    g.head = Matrix::Zero(units, padded);
    g.head.leftCols(vocab) = ConstMatrixMap(head.flat<float>().data(), units, vocab);
    g.head_bias = RowVector::Zero(padded);
    g.head_bias.leftCols(vocab) = Eigen::Map<const RowVector>(head_bias.flat<float>().data(),
                                                              vocab);
    if (bfloat16_) {
      g.bfloat16 = true;
      g.tiles = AmxReady();
      for (int l = 0; l < layers; ++l) {
        g.packed_recurrent.push_back(PackWeights(g.recurrent[l].data(), units, gates));
        g.packed_kernels.push_back(l == 0 ? PackedWeights()
                                          : PackWeights(g.kernels[l].data(), units, gates));
      }
      g.packed_head = PackWeights(g.head.data(), units, g.head.cols());
    }
    const Tensor& ids = input(ids_at);
    OP_REQUIRES(context, ids.dims() == 1, InvalidArgument("ids must be [B]"));
    g.batch = ids.dim_size(0);
    g.ids = ids.flat<int32_t>().data();
    for (int64_t i = 0; i < g.batch; ++i) {
      OP_REQUIRES(context, g.ids[i] >= 0 && g.ids[i] < vocab,
                  InvalidArgument("id ", g.ids[i], " at ", i, " is outside [0, ", vocab, ")"));
    }
    g.seed = input(options_at).scalar<int32_t>()();
    g.position = input(options_at + 1).scalar<int32_t>()();
    g.options = DrawOptions{input(options_at + 2).scalar<float>()(),
                            input(options_at + 3).scalar<int32_t>()(),
                            input(options_at + 4).scalar<float>()()};
    OP_REQUIRES(context, g.options.temperature > 0.0f && g.options.top_k >= 0 &&
                             g.options.top_p > 0.0f && g.options.top_p <= 1.0f,
                InvalidArgument("temperature must be > 0, top_k >= 0 and top_p in (0, 1]"));
    for (int s = 0; s < num_states_; ++s) {
      const Tensor& state = input(states_at + s);
      OP_REQUIRES(context, state.shape() == TensorShape({g.batch, units}),
                  InvalidArgument("states must be [B, H]"));
      Tensor* out = Output(context, 1 + s, state.shape());
      if (!context->status().ok()) return;
      std::copy_n(state.flat<float>().data(), state.NumElements(), out->flat<float>().data());
      g.states.push_back(out->flat<float>().data());
    }
    Tensor* drawn = Output(context, 0, TensorShape({g.batch, g.steps}));
    if (!context->status().ok()) return;
    g.drawn = drawn->flat<int32_t>().data();
    Plan plan = MakePlan(context, g.steps, g.batch, units, Split::kRows);
    if (g.tiles) {  // a tile multiplies 16 rows: no block of fewer where the batch has more
      plan.blocks = static_cast<int>(std::min<int64_t>(plan.blocks,
                                                       std::max<int64_t>(1, g.batch / 16)));
      plan.rows_by_16 = true;
    }
    RunBlocks(context, g.batch, units, plan,
              [&](const Block& block) { GenerateBlock(g, block); });
  }

 private:
  const Kind* kind_ = nullptr;
  int64_t steps_ = 0;
  int layers_ = 0, num_states_ = 0;
  bool bfloat16_ = false;
};

REGISTER_KERNEL_BUILDER(Name("TfCharrnnGenerate").Device(DEVICE_CPU), GenerateOp);

// (logits [N, V], uniforms [N], temperature, top_k, top_p) -> ids [N]: the generation op's draw
// on given logits and uniform numbers, by_lanes (16 rows a group, as the op draws where it can;
// no top-k or top-p; an error where the library has no AVX-512) or row by row. For the tests,
// which hold the two to the same ids near every boundary of the cumulative weights.
REGISTER_OP("TfCharrnnDraw")
    .Attr("by_lanes: bool")
    .Input("logits: float").Input("uniforms: float").Input("temperature: float")
    .Input("top_k: int32").Input("top_p: float")
    .Output("ids: int32")
    .SetShapeFn([](InferenceContext* c) {
      c->set_output(0, c->Vector(c->Dim(c->input(0), 0)));
      return tensorflow::OkStatus();
    });

class DrawOp : public OpKernel {
 public:
  explicit DrawOp(OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, context->GetAttr("by_lanes", &by_lanes_));
  }
  void Compute(OpKernelContext* context) override {
    const Tensor& logits = context->input(0);
    const Tensor& uniforms = context->input(1);
    OP_REQUIRES(context, logits.dims() == 2 && logits.dim_size(1) > 0 && uniforms.dims() == 1 &&
                             uniforms.dim_size(0) == logits.dim_size(0),
                tensorflow::errors::InvalidArgument("logits must be [N, V > 0], uniforms [N]"));
    OP_REQUIRES(context, context->input(2).dims() == 0 && context->input(3).dims() == 0 &&
                             context->input(4).dims() == 0,
                tensorflow::errors::InvalidArgument("temperature, top_k and top_p are scalars"));
    const int64_t rows = logits.dim_size(0), vocab = logits.dim_size(1);
    const DrawOptions options{context->input(2).scalar<float>()(),
                              context->input(3).scalar<int32_t>()(),
                              context->input(4).scalar<float>()()};
    OP_REQUIRES(context, options.temperature > 0.0f && options.top_k >= 0 &&
                             options.top_p > 0.0f && options.top_p <= 1.0f,
                tensorflow::errors::InvalidArgument(
                    "temperature must be > 0, top_k >= 0 and top_p in (0, 1]"));
    Tensor* ids_tensor = Output(context, 0, TensorShape({rows}));
    if (ids_tensor == nullptr) return;
    int32_t* ids = ids_tensor->flat<int32_t>().data();
    const float* in = logits.flat<float>().data();
    const float* u = uniforms.flat<float>().data();
    if (by_lanes_) {
#if defined(__AVX512F__)
      OP_REQUIRES(context, options.top_k == 0 && options.top_p >= 1.0f,
                  tensorflow::errors::InvalidArgument("lanes draw without top-k or top-p"));
      std::vector<__m512> sums(RoundUp(vocab, 16));
      std::vector<__mmask16> weighted(RoundUp(vocab, 16));
      DrawLaneGroups(in, vocab, rows, vocab, options.temperature,
                     [&](int64_t r) { return u[r]; }, sums.data(), weighted.data(), ids);
#else
      context->SetStatus(tensorflow::errors::Unimplemented("built without AVX-512"));
#endif
      return;
    }
    Eigen::ArrayXf scaled(vocab), ordered(RoundUp(vocab, 16));  // aligned: DrawRow's scratch
    for (int64_t r = 0; r < rows; ++r) {
      ids[r] = DrawRow(in + r * vocab, vocab, options, u[r], scaled.data(), ordered.data());
    }
  }

 private:
  bool by_lanes_ = false;
};

REGISTER_KERNEL_BUILDER(Name("TfCharrnnDraw").Device(DEVICE_CPU), DrawOp);

// () -> whether TfCharrnnGenerate runs with precision bfloat16 here (see Bfloat16Ready).
REGISTER_OP("TfCharrnnBfloat16Generation")
    .Output("ready: bool")
    .SetShapeFn([](InferenceContext* c) {
      c->set_output(0, c->Scalar());
      return tensorflow::OkStatus();
    });

class Bfloat16GenerationOp : public OpKernel {
 public:
  using OpKernel::OpKernel;
  void Compute(OpKernelContext* context) override {
    Tensor* ready = Output(context, 0, TensorShape({}));
    if (ready != nullptr) ready->scalar<bool>()() = Bfloat16Ready();
  }
};

REGISTER_KERNEL_BUILDER(Name("TfCharrnnBfloat16Generation").Device(DEVICE_CPU),
                        Bfloat16GenerationOp);

}  // namespace tf_charrnn
