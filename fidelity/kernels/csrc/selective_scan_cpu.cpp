// Fused selective scan for CPU (Mamba-1 recurrence), forward and backward.
//
// For every (batch b, channel d) row and state n:
//   dt_t   = softplus(delta_t + bias)            (bias and softplus optional)
//   h_t[n] = exp(dt_t * A[n]) * h_{t-1}[n] + dt_t * u_t * B_t[n]
//   y_t    = sum_n C_t[n] h_t[n] + D u_t,        out_t = y_t * silu(z_t)   (z optional)
//
// Work runs in parallel on ATen's OpenMP pool. Time is walked in blocks of `every` steps: the
// step sizes of a block are computed first and its gate applied last, both as vectorised
// loops. Both directions put a group of channels in the vector lanes (one lane per channel)
// and loop over the d_state states, so every update is a full-width vector operation. The
// exponential and logarithm are written out here because libm's are opaque calls that stop
// vectorisation.
//
// Layouts (all contiguous, one floating dtype, float32 or float64):
//   u, delta, z, out           (batch, dim, len)
//   A                          (dim, nst)
//   B, C (each)                (batch, len, nst) when it varies over time, else (dim, nst)
//   D, bias                    (dim)
//   h0, h_last                 (batch, dim, nst)
//   checkpoints                (batch, dim, ceil(len / every), nst): state before step j*every
//
// Backward walks the blocks in reverse: it recomputes a block's states from its checkpoint
// into per-thread (step, state, lane) tiles, then runs the adjoint recurrence
//   g_t = g_{t+1} * exp(dt_{t+1} A) + dL/dy_t * C_t
// backwards through the block, so memory is O(len / every) states per row, not O(len).

#include <torch/extension.h>

#include <ATen/Parallel.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

namespace {

// ---------------------------------------------------------------------------------------------
// Vectorisable elementary functions.

template <typename scalar_t>
struct FloatTraits;

template <>
struct FloatTraits<float> {
  using bits_t = uint32_t;
  using int_t = int32_t;
  static constexpr int mantissa_bits = 23;
  static constexpr int exponent_bias = 127;
  static constexpr float two_to_mantissa = 8388608.0f;
  // exp: below exp_lo the result is flushed to 0 (true value < 5e-38), above exp_hi it is inf.
  static constexpr float exp_lo = -86.0f;
  static constexpr float exp_hi = 88.72283935546875f;
  // ln2 = ln2_hi + ln2_lo with ln2_hi short enough that k * ln2_hi is exact.
  static constexpr float ln2_hi = 0.693359375f;
  static constexpr float ln2_lo = -2.12194440e-4f;
  static constexpr int exp_degree = 7;  // |r|^8 / 8! < 6e-9 for |r| <= ln2/2
  static constexpr int log_terms = 5;   // s^10 / 11 < 3e-9 for |s| <= 0.1716
};

template <>
struct FloatTraits<double> {
  using bits_t = uint64_t;
  using int_t = int64_t;
  static constexpr int mantissa_bits = 52;
  static constexpr int exponent_bias = 1023;
  static constexpr double two_to_mantissa = 4503599627370496.0;
  static constexpr double exp_lo = -708.0;
  static constexpr double exp_hi = 709.782712893384;
  static constexpr double ln2_hi = 6.93147180369123816490e-01;
  static constexpr double ln2_lo = 1.90821492927058770002e-10;
  static constexpr int exp_degree = 13;  // |r|^14 / 14! < 5e-18
  static constexpr int log_terms = 10;   // s^20 / 21 < 3e-17
};

template <typename to_t, typename from_t>
inline to_t bit_cast(from_t value) {
  static_assert(sizeof(to_t) == sizeof(from_t));
  to_t out;
  std::memcpy(&out, &value, sizeof(out));
  return out;
}

// 1 / i! for i = 0..13, computed at compile time.
struct InverseFactorials {
  double value[14];
  constexpr InverseFactorials() : value() {
    double term = 1.0;
    for (int i = 0; i < 14; ++i) {
      term /= i > 0 ? i : 1;
      value[i] = term;
    }
  }
};
constexpr InverseFactorials kInverseFactorials{};

// e^x: x = k ln2 + r, |r| <= ln2/2, e^r by its Taylor polynomial, 2^k through the exponent
// bits. Relative error below one ulp on the whole range (checked against long double).
template <typename scalar_t>
inline scalar_t vexp(scalar_t x) {
  using K = FloatTraits<scalar_t>;
  const scalar_t log2e = static_cast<scalar_t>(1.4426950408889634074);
  scalar_t xc = x < K::exp_lo ? K::exp_lo : x;
  xc = xc > K::exp_hi ? K::exp_hi : xc;
  // Round to nearest by adding and removing 1.5 * 2^mantissa_bits (std::floor may become a
  // library call, which stops vectorisation).
  const scalar_t shifter = static_cast<scalar_t>(1.5) * K::two_to_mantissa;
  const scalar_t k = (xc * log2e + shifter) - shifter;
  const scalar_t r = (xc - k * K::ln2_hi) - k * K::ln2_lo;
  // Horner form of sum_{i <= degree} r^i / i!: one fused multiply-add per degree (the loop
  // unrolls and the coefficients fold to constants).
  static_assert(K::exp_degree < 14, "extend kInverseFactorials");
  scalar_t p = static_cast<scalar_t>(kInverseFactorials.value[K::exp_degree]);
  for (int i = K::exp_degree - 1; i >= 0; --i) {
    p = p * r + static_cast<scalar_t>(kInverseFactorials.value[i]);
  }
  // 2^(k-1), then *2: keeps the exponent field in range up to the overflow limit.
  const auto exponent = static_cast<typename K::int_t>(k) - 1 + K::exponent_bias;
  const scalar_t scale =
      bit_cast<scalar_t>(static_cast<typename K::bits_t>(exponent) << K::mantissa_bits);
  scalar_t result = p * scale * 2;
  result = x < K::exp_lo ? static_cast<scalar_t>(0) : result;
  result = x > K::exp_hi ? std::numeric_limits<scalar_t>::infinity() : result;
  return x != x ? x : result;
}

// log(w) for positive, normal, finite w: w = m 2^k with m in [sqrt(1/2), sqrt(2)),
// log(m) = 2 atanh(s) = 2 (s + s^3/3 + s^5/5 + ...) with s = (m - 1) / (m + 1), |s| <= 0.1716.
template <typename scalar_t>
inline scalar_t vlog(scalar_t w) {
  using K = FloatTraits<scalar_t>;
  using bits_t = typename K::bits_t;
  const bits_t bits = bit_cast<bits_t>(w);
  const bits_t mantissa_mask = (bits_t(1) << K::mantissa_bits) - 1;
  const scalar_t exponent = static_cast<scalar_t>(
      static_cast<typename K::int_t>(bits >> K::mantissa_bits) - K::exponent_bias);
  scalar_t m = bit_cast<scalar_t>((bits & mantissa_mask) |
                                  (static_cast<bits_t>(K::exponent_bias) << K::mantissa_bits));
  const bool high = m > static_cast<scalar_t>(1.41421356237309504880);
  m = high ? m * static_cast<scalar_t>(0.5) : m;
  const scalar_t k = high ? exponent + 1 : exponent;
  const scalar_t s = (m - 1) / (m + 1);
  const scalar_t s2 = s * s;
  scalar_t p = static_cast<scalar_t>(1) / static_cast<scalar_t>(2 * K::log_terms - 1);
  for (int j = K::log_terms - 2; j >= 0; --j) {
    p = static_cast<scalar_t>(1) / static_cast<scalar_t>(2 * j + 1) + s2 * p;
  }
  return k * K::ln2_hi + (k * K::ln2_lo + 2 * s * p);
}

// softplus with PyTorch's (and mamba_ssm's) threshold: x above 20, else log1p(exp(x)), given
// e = exp(min(x, 20)). (Split from the exponential because GCC does not vectorise a loop
// with both inlined.) log1p(e) is computed as log(1 + e) * e / ((1 + e) - 1), which cancels
// the rounding of 1 + e; both branches are computed and one selected, so the division is
// never guarded (its denominator is never 0).
template <typename scalar_t>
inline scalar_t softplus_from_exp(scalar_t x, scalar_t e) {
  const scalar_t w = 1 + e;
  const scalar_t denominator = (w - 1) + (w == 1 ? static_cast<scalar_t>(1) : 0);
  const scalar_t corrected = vlog(w) * (e / denominator);
  const scalar_t log1p_e = w == 1 ? e : corrected;
  const scalar_t result = x > 20 ? x : log1p_e;
  return x != x ? x : result;  // NaN stays NaN
}

template <typename scalar_t>
inline scalar_t sigmoid(scalar_t x) {
  return 1 / (1 + vexp(-x));
}

// ---------------------------------------------------------------------------------------------
// The inputs.

struct Options {
  bool has_D;
  bool has_z;
  bool has_bias;
  bool softplus;
};

template <typename scalar_t>
struct Inputs {
  const scalar_t* u;
  const scalar_t* delta;
  const scalar_t* z;
  const scalar_t* A;
  const scalar_t* B;
  const scalar_t* C;
  const scalar_t* D;
  const scalar_t* bias;
  int64_t batch, dim, len, nst;
  bool B_vary;  // B is (batch, len, nst), not (dim, nst)
  bool C_vary;
  Options options;
};

template <typename scalar_t>
const scalar_t* optional_data(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr<scalar_t>() : nullptr;
}

template <typename scalar_t>
Inputs<scalar_t> make_inputs(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                             const at::Tensor& B, const at::Tensor& C,
                             const std::optional<at::Tensor>& D,
                             const std::optional<at::Tensor>& z,
                             const std::optional<at::Tensor>& bias, bool softplus) {
  return {u.data_ptr<scalar_t>(),
          delta.data_ptr<scalar_t>(),
          optional_data<scalar_t>(z),
          A.data_ptr<scalar_t>(),
          B.data_ptr<scalar_t>(),
          C.data_ptr<scalar_t>(),
          optional_data<scalar_t>(D),
          optional_data<scalar_t>(bias),
          u.size(0),
          u.size(1),
          u.size(2),
          A.size(1),
          B.dim() == 3,
          C.dim() == 3,
          {D.has_value(), z.has_value(), bias.has_value(), softplus}};
}

// Rows per parallel task: enough that a task does at least ~64k state updates (tens of
// microseconds), so small problems run on the calling thread instead of waking the pool.
template <typename scalar_t>
int64_t rows_per_task(const Inputs<scalar_t>& in) {
  constexpr int64_t min_updates = 1 << 16;
  return std::max<int64_t>(1, min_updates / std::max<int64_t>(1, in.len * in.nst));
}

// ---------------------------------------------------------------------------------------------
// Forward: vectorised across channels. A group of kLanes channels (one 512-bit vector) walks
// time together, so every state update is a full-width vector operation and the output needs
// no horizontal sum. Each block of `every` steps is transposed into (step, lane) tiles first;
// lanes past the last channel compute on zeros and are never written back.

// 512-bit vectors for these loops where the compiler would otherwise prefer 256-bit ones.
#if defined(__GNUC__) && !defined(__clang__) && defined(__AVX512F__)
#define FIDELITY_WIDE_VECTORS __attribute__((target("prefer-vector-width=512")))
#else
#define FIDELITY_WIDE_VECTORS
#endif

template <typename scalar_t>
constexpr int64_t kLanes = 64 / sizeof(scalar_t);

// Per-thread tiles of one channel group: index [step * kLanes + lane] or [state * kLanes + lane].
template <typename scalar_t>
struct GroupScratch {
  std::vector<scalar_t> h, A, B, C, u, dt, z, y;
  GroupScratch(int64_t every, int64_t nst)
      : h(nst * kLanes<scalar_t>), A(nst * kLanes<scalar_t>), B(nst * kLanes<scalar_t>),
        C(nst * kLanes<scalar_t>), u(every * kLanes<scalar_t>), dt(every * kLanes<scalar_t>),
        z(every * kLanes<scalar_t>), y(every * kLanes<scalar_t>) {}
};

// The state recurrence over n steps of one group: h, A, dt, u, y tiles as in GroupScratch;
// B_t, C_t read from the (batch, len, nst) rows when they vary, else from the (state, lane)
// tiles. Writes y[i, lane] = sum_n C_t[n] h_t[n].
template <typename scalar_t, bool B_vary, bool C_vary>
FIDELITY_WIDE_VECTORS void group_recurrence(GroupScratch<scalar_t>& s, const scalar_t* B_steps,
                                            const scalar_t* C_steps, int64_t t0, int64_t n,
                                            int64_t nst) {
  constexpr int64_t W = kLanes<scalar_t>;
  scalar_t* __restrict__ h = s.h.data();
  const scalar_t* __restrict__ A = s.A.data();
  for (int64_t i = 0; i < n; ++i) {
    const scalar_t* __restrict__ dt = s.dt.data() + i * W;
    const scalar_t* __restrict__ u = s.u.data() + i * W;
    scalar_t* __restrict__ y = s.y.data() + i * W;
    alignas(64) scalar_t drive[W];
    alignas(64) scalar_t acc[W];
#pragma omp simd
    for (int64_t c = 0; c < W; ++c) {
      drive[c] = dt[c] * u[c];
      acc[c] = 0;
    }
    for (int64_t k = 0; k < nst; ++k) {
      const scalar_t B_shared = B_vary ? B_steps[(t0 + i) * nst + k] : scalar_t(0);
      const scalar_t C_shared = C_vary ? C_steps[(t0 + i) * nst + k] : scalar_t(0);
      const scalar_t* __restrict__ B_lane = s.B.data() + k * W;
      const scalar_t* __restrict__ C_lane = s.C.data() + k * W;
      scalar_t* __restrict__ h_k = h + k * W;
      const scalar_t* __restrict__ A_k = A + k * W;
#pragma omp simd simdlen(W)
      for (int64_t c = 0; c < W; ++c) {
        const scalar_t B_val = B_vary ? B_shared : B_lane[c];
        const scalar_t C_val = C_vary ? C_shared : C_lane[c];
        const scalar_t h_new = vexp(dt[c] * A_k[c]) * h_k[c] + drive[c] * B_val;
        h_k[c] = h_new;
        acc[c] += C_val * h_new;
      }
    }
#pragma omp simd
    for (int64_t c = 0; c < W; ++c) {
      y[c] = acc[c];
    }
  }
}

// Step sizes, then the gate, over a whole (step, lane) tile of n steps.
template <typename scalar_t>
FIDELITY_WIDE_VECTORS void group_step_sizes(GroupScratch<scalar_t>& s, const scalar_t* bias,
                                            bool use_softplus, int64_t n) {
  constexpr int64_t W = kLanes<scalar_t>;
  scalar_t* __restrict__ dt = s.dt.data();  // holds delta on entry
  if (!use_softplus) {
    for (int64_t i = 0; i < n; ++i) {
#pragma omp simd
      for (int64_t c = 0; c < W; ++c) {
        dt[i * W + c] += bias[c];
      }
    }
    return;
  }
  scalar_t* __restrict__ e = s.y.data();  // scratch until the recurrence writes y
  for (int64_t i = 0; i < n; ++i) {
#pragma omp simd
    for (int64_t c = 0; c < W; ++c) {
      const scalar_t x = dt[i * W + c] + bias[c];
      dt[i * W + c] = x;
      e[i * W + c] = vexp(x < 20 ? x : static_cast<scalar_t>(20));
    }
  }
#pragma omp simd
  for (int64_t j = 0; j < n * W; ++j) {
    dt[j] = softplus_from_exp(dt[j], e[j]);
  }
}

template <typename scalar_t>
FIDELITY_WIDE_VECTORS void group_gate(GroupScratch<scalar_t>& s, const scalar_t* D, bool has_z,
                                      int64_t n) {
  constexpr int64_t W = kLanes<scalar_t>;
  scalar_t* __restrict__ y = s.y.data();
  const scalar_t* __restrict__ u = s.u.data();
  const scalar_t* __restrict__ z = s.z.data();
  for (int64_t i = 0; i < n; ++i) {
#pragma omp simd simdlen(W)
    for (int64_t c = 0; c < W; ++c) {
      y[i * W + c] += D[c] * u[i * W + c];
    }
  }
  if (has_z) {
#pragma omp simd simdlen(W)
    for (int64_t j = 0; j < n * W; ++j) {
      y[j] *= z[j] * sigmoid(z[j]);
    }
  }
}

// Prefetch the cache lines of row[0, count) (for writing when `write`).
template <typename scalar_t>
inline void prefetch_row(const scalar_t* row, int64_t count, bool write) {
  constexpr int64_t per_line = 64 / sizeof(scalar_t);
#if defined(__GNUC__)
  for (int64_t i = 0; i < count; i += per_line) {
    if (write) {
      __builtin_prefetch(row + i, 1);
    } else {
      __builtin_prefetch(row + i, 0);
    }
  }
#endif
}

// A 16 x 16 float32 block between rows and (step, lane) tiles with AVX-512 shuffles: 16 vector
// loads, 64 shuffles and 16 vector stores instead of 256 scalar loads and stores.
// dst[j * dst_stride + i] = src[i * src_stride + j] for i, j < 16. With `stream` the stores
// are non-temporal (dst and dst_stride must keep every row 64-byte aligned): each is a whole
// cache line, so memory is written without first being read into the cache.
#if defined(__AVX512F__)
constexpr bool kBlockTranspose = true;

template <bool stream = false>
inline void transpose_16x16(const float* src, int64_t src_stride, float* dst,
                            int64_t dst_stride) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) {
    r[i] = _mm512_loadu_ps(src + i * src_stride);
  }
  for (int i = 0; i < 8; ++i) {  // within 128-bit lanes: pairs of rows interleaved
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
  for (int j = 0; j < 4; ++j) {  // lane L of r[4j + m]: column 4L + m of rows 4j .. 4j + 3
    r[4 * j] = _mm512_shuffle_ps(t[4 * j], t[4 * j + 2], 0x44);
    r[4 * j + 1] = _mm512_shuffle_ps(t[4 * j], t[4 * j + 2], 0xEE);
    r[4 * j + 2] = _mm512_shuffle_ps(t[4 * j + 1], t[4 * j + 3], 0x44);
    r[4 * j + 3] = _mm512_shuffle_ps(t[4 * j + 1], t[4 * j + 3], 0xEE);
  }
  for (int m = 0; m < 4; ++m) {  // then across the four 128-bit lanes, twice
    t[m] = _mm512_shuffle_f32x4(r[m], r[4 + m], 0x88);
    t[4 + m] = _mm512_shuffle_f32x4(r[m], r[4 + m], 0xDD);
    t[8 + m] = _mm512_shuffle_f32x4(r[8 + m], r[12 + m], 0x88);
    t[12 + m] = _mm512_shuffle_f32x4(r[8 + m], r[12 + m], 0xDD);
  }
  const auto store = [](float* to, __m512 value) {
    if constexpr (stream) {
      _mm512_stream_ps(to, value);
    } else {
      _mm512_storeu_ps(to, value);
    }
  };
  for (int m = 0; m < 4; ++m) {
    store(dst + m * dst_stride, _mm512_shuffle_f32x4(t[m], t[8 + m], 0x88));
    store(dst + (m + 8) * dst_stride, _mm512_shuffle_f32x4(t[m], t[8 + m], 0xDD));
    store(dst + (m + 4) * dst_stride, _mm512_shuffle_f32x4(t[4 + m], t[12 + m], 0x88));
    store(dst + (m + 12) * dst_stride, _mm512_shuffle_f32x4(t[4 + m], t[12 + m], 0xDD));
  }
}

// Orders this thread's non-temporal stores before whatever it does next (they are weakly
// ordered); called before a thread's part of a parallel loop returns.
inline void finish_streaming_stores() { _mm_sfence(); }
#else
constexpr bool kBlockTranspose = false;

template <bool stream = false>
inline void transpose_16x16(const float*, int64_t, float*, int64_t) {}

inline void finish_streaming_stores() {}
#endif

// Steps [0, blocked) of a full group go through 16 x 16 blocks (float32 with AVX-512), the
// rest element by element.
template <typename scalar_t>
int64_t blocked_steps(int64_t lanes, int64_t n) {
  constexpr bool fast = kBlockTranspose && std::is_same_v<scalar_t, float>;
  return fast && lanes == kLanes<scalar_t> ? n - n % 16 : 0;
}

// tile[i * kLanes + c] = rows[c * row_stride + i] for i < n and c < lanes; other lanes of the
// tile's first n steps are zeroed.
template <typename scalar_t>
void transpose_in(const scalar_t* rows, int64_t row_stride, int64_t lanes, int64_t n,
                  scalar_t* tile) {
  constexpr int64_t W = kLanes<scalar_t>;
  const int64_t blocked = blocked_steps<scalar_t>(lanes, n);
  if constexpr (std::is_same_v<scalar_t, float>) {
    for (int64_t i = 0; i < blocked; i += 16) {
      transpose_16x16(rows + i, row_stride, tile + i * W, W);
    }
  }
  for (int64_t c = 0; c < lanes; ++c) {
    const scalar_t* __restrict__ row = rows + c * row_stride;
    for (int64_t i = blocked; i < n; ++i) {
      tile[i * W + c] = row[i];
    }
  }
  for (int64_t c = lanes; c < W; ++c) {
    for (int64_t i = 0; i < n; ++i) {
      tile[i * W + c] = 0;
    }
  }
}

template <typename scalar_t, bool B_vary, bool C_vary>
void forward_group(const Inputs<scalar_t>& in, int64_t b, int64_t d0, const scalar_t* h0,
                   int64_t every, scalar_t* out, scalar_t* h_last, scalar_t* checkpoints,
                   GroupScratch<scalar_t>& s) {
  constexpr int64_t W = kLanes<scalar_t>;
  const int64_t nst = in.nst, len = in.len, dim = in.dim;
  const int64_t lanes = std::min(W, dim - d0);  // real channels in this group
  const int64_t n_ckpt = (len + every - 1) / every;
  const int64_t first_row = b * dim + d0;
  alignas(64) scalar_t D[W] = {};
  alignas(64) scalar_t bias[W] = {};
  std::fill(s.h.begin(), s.h.end(), scalar_t(0));
  std::fill(s.A.begin(), s.A.end(), scalar_t(0));
  std::fill(s.B.begin(), s.B.end(), scalar_t(0));
  std::fill(s.C.begin(), s.C.end(), scalar_t(0));
  for (int64_t c = 0; c < lanes; ++c) {
    const int64_t d = d0 + c;
    for (int64_t k = 0; k < nst; ++k) {
      s.A[k * W + c] = in.A[d * nst + k];
      s.h[k * W + c] = h0[(first_row + c) * nst + k];
      s.B[k * W + c] = B_vary ? scalar_t(0) : in.B[d * nst + k];
      s.C[k * W + c] = C_vary ? scalar_t(0) : in.C[d * nst + k];
    }
    D[c] = in.D != nullptr ? in.D[d] : scalar_t(0);
    bias[c] = in.bias != nullptr ? in.bias[d] : scalar_t(0);
  }
  const scalar_t* B_steps = B_vary ? in.B + b * len * nst : nullptr;
  const scalar_t* C_steps = C_vary ? in.C + b * len * nst : nullptr;
  for (int64_t block = 0; block < n_ckpt; ++block) {
    const int64_t t0 = block * every, n = std::min(every, len - t0);
    if (checkpoints != nullptr) {
      for (int64_t c = 0; c < lanes; ++c) {
        for (int64_t k = 0; k < nst; ++k) {
          checkpoints[((first_row + c) * n_ckpt + block) * nst + k] = s.h[k * W + c];
        }
      }
    }
    // The group reads (and writes) many short row segments per block, more streams than the
    // hardware prefetcher follows: ask for the next block's segments while this one computes.
    if (block + 1 < n_ckpt) {
      const int64_t next = t0 + every, count = std::min(every, len - next);
      for (int64_t c = 0; c < lanes; ++c) {
        const int64_t offset = (first_row + c) * len + next;
        prefetch_row(in.u + offset, count, false);
        prefetch_row(in.delta + offset, count, false);
        if (in.z != nullptr) {
          prefetch_row(in.z + offset, count, false);
        }
        prefetch_row(out + offset, count, true);
      }
    }
    // Transpose the block's inputs into (step, lane) tiles; missing lanes stay zero.
    transpose_in(in.u + first_row * len + t0, len, lanes, n, s.u.data());
    transpose_in(in.delta + first_row * len + t0, len, lanes, n, s.dt.data());
    if (in.z != nullptr) {
      transpose_in(in.z + first_row * len + t0, len, lanes, n, s.z.data());
    }
    group_step_sizes(s, bias, in.options.softplus, n);
    group_recurrence<scalar_t, B_vary, C_vary>(s, B_steps, C_steps, t0, n, nst);
    group_gate(s, D, in.z != nullptr, n);
    for (int64_t c = 0; c < lanes; ++c) {  // and the outputs back into rows
      scalar_t* o = out + (first_row + c) * len + t0;
      for (int64_t i = 0; i < n; ++i) {
        o[i] = s.y[i * W + c];
      }
    }
  }
  for (int64_t c = 0; c < lanes; ++c) {
    for (int64_t k = 0; k < nst; ++k) {
      h_last[(first_row + c) * nst + k] = s.h[k * W + c];
    }
  }
}

template <typename scalar_t, bool B_vary, bool C_vary>
void scan_forward_groups(const Inputs<scalar_t>& in, const scalar_t* h0, int64_t every,
                         scalar_t* out, scalar_t* h_last, scalar_t* checkpoints) {
  constexpr int64_t W = kLanes<scalar_t>;
  const int64_t groups = (in.dim + W - 1) / W;
  const int64_t grain = std::max<int64_t>(1, rows_per_task(in) / W);
  at::parallel_for(0, in.batch * groups, grain, [&](int64_t begin, int64_t end) {
    GroupScratch<scalar_t> scratch(every, in.nst);
    for (int64_t index = begin; index < end; ++index) {
      forward_group<scalar_t, B_vary, C_vary>(in, index / groups, (index % groups) * W, h0,
                                              every, out, h_last, checkpoints, scratch);
    }
  });
}

template <typename scalar_t>
void scan_forward(const Inputs<scalar_t>& in, const scalar_t* h0, int64_t every, scalar_t* out,
                  scalar_t* h_last, scalar_t* checkpoints) {
  if (in.B_vary && in.C_vary) {
    scan_forward_groups<scalar_t, true, true>(in, h0, every, out, h_last, checkpoints);
  } else if (in.B_vary) {
    scan_forward_groups<scalar_t, true, false>(in, h0, every, out, h_last, checkpoints);
  } else if (in.C_vary) {
    scan_forward_groups<scalar_t, false, true>(in, h0, every, out, h_last, checkpoints);
  } else {
    scan_forward_groups<scalar_t, false, false>(in, h0, every, out, h_last, checkpoints);
  }
}

// ---------------------------------------------------------------------------------------------
// Backward: vectorised across channels like the forward. A group of kLanes channels walks each
// block of `every` steps three times: recompute the states from the block's checkpoint (the
// forward's recurrence, keeping states and decays), the gate, then the adjoint recurrence in
// reverse. Per-channel sums (dL/du, dL/d dt, D, bias, A, time-invariant B and C) stay in their
// lanes. Time-varying B and C are shared by all channels, so their gradients are sums over
// channels: a thread runs the current block for all its groups one after another, adding
// each group's contributions lane-wise into (step, state, lane) tiles, and sums the lanes of
// those tiles once per block (a horizontal sum per step, state and group would cost more than
// the recurrence). Lanes past the last channel hold zeros (zero inputs, zero output gradient,
// zero adjoint), so they add nothing to those sums.

template <typename scalar_t>
struct Grads {
  scalar_t* u;
  scalar_t* delta;
  scalar_t* A;
  scalar_t* B;  // time-varying: (batch, len, nst), filled from per-thread partial sums
  scalar_t* C;
  scalar_t* D;  // nullptr when D is absent
  scalar_t* z;  // nullptr when z is absent
  scalar_t* bias;
  scalar_t* h0;
};

// Per-thread tiles for the block being walked: [step * kLanes + lane], [state * kLanes + lane]
// or [(step * nst + state) * kLanes + lane].
template <typename scalar_t>
struct BackwardScratch {
  std::vector<scalar_t> h_start;                                         // (state, lane)
  std::vector<scalar_t> u, dt, slope, z, g_out, y, grad_y, g_u, g_dt, g_z, via_B,
      via_decay;                                                         // (step, lane)
  std::vector<scalar_t> states, decays, gB_lanes, gC_lanes;              // (step, state, lane)
  BackwardScratch(int64_t every, int64_t nst)
      : h_start(nst * kLanes<scalar_t>), u(every * kLanes<scalar_t>),
        dt(every * kLanes<scalar_t>), slope(every * kLanes<scalar_t>),
        z(every * kLanes<scalar_t>), g_out(every * kLanes<scalar_t>), y(every * kLanes<scalar_t>),
        grad_y(every * kLanes<scalar_t>), g_u(every * kLanes<scalar_t>),
        g_dt(every * kLanes<scalar_t>), g_z(every * kLanes<scalar_t>),
        via_B(every * kLanes<scalar_t>), via_decay(every * kLanes<scalar_t>),
        states(every * nst * kLanes<scalar_t>), decays(every * nst * kLanes<scalar_t>),
        gB_lanes(every * nst * kLanes<scalar_t>), gC_lanes(every * nst * kLanes<scalar_t>) {}
};

// What a channel group carries from block to block: its parameters, its adjoint and its
// per-channel gradient sums; (state, lane) or (lane) tiles.
template <typename scalar_t>
struct GroupCarry {
  int64_t d0 = 0, lanes = 0;
  std::vector<scalar_t> A, B, C, adjoint, gA, gB, gC, D, bias, gD, g_bias;
  explicit GroupCarry(int64_t nst)
      : A(nst * kLanes<scalar_t>), B(nst * kLanes<scalar_t>), C(nst * kLanes<scalar_t>),
        adjoint(nst * kLanes<scalar_t>), gA(nst * kLanes<scalar_t>), gB(nst * kLanes<scalar_t>),
        gC(nst * kLanes<scalar_t>), D(kLanes<scalar_t>), bias(kLanes<scalar_t>),
        gD(kLanes<scalar_t>), g_bias(kLanes<scalar_t>) {}
};

// Step sizes and their slopes d dt / d delta over a (step, lane) tile of n steps; dt holds
// delta on entry.
template <typename scalar_t>
FIDELITY_WIDE_VECTORS void group_step_slopes(BackwardScratch<scalar_t>& s, const scalar_t* bias,
                                             bool use_softplus, int64_t n) {
  constexpr int64_t W = kLanes<scalar_t>;
  scalar_t* __restrict__ dt = s.dt.data();
  scalar_t* __restrict__ slope = s.slope.data();
  scalar_t* __restrict__ e = s.grad_y.data();  // scratch until the gate writes grad_y
  for (int64_t i = 0; i < n; ++i) {
#pragma omp simd
    for (int64_t c = 0; c < W; ++c) {
      dt[i * W + c] += bias[c];
    }
  }
  if (!use_softplus) {
    std::fill(slope, slope + n * W, static_cast<scalar_t>(1));
    return;
  }
#pragma omp simd
  for (int64_t j = 0; j < n * W; ++j) {
    const scalar_t x = dt[j];
    e[j] = vexp(x < 20 ? x : static_cast<scalar_t>(20));
  }
#pragma omp simd
  for (int64_t j = 0; j < n * W; ++j) {  // sigmoid(x) = e / (1 + e) below the threshold
    slope[j] = dt[j] > 20 ? static_cast<scalar_t>(1) : e[j] / (1 + e[j]);
  }
#pragma omp simd
  for (int64_t j = 0; j < n * W; ++j) {
    dt[j] = softplus_from_exp(dt[j], e[j]);
  }
}

// The block's states and decays from its checkpoint (s.h_start), as the forward computes them,
// and with a gate (with_y) the outputs before it, y = sum_n C_t[n] h_t[n] + D u, into s.y.
template <typename scalar_t, bool B_vary, bool C_vary, bool with_y>
FIDELITY_WIDE_VECTORS void group_recompute(BackwardScratch<scalar_t>& s,
                                           const GroupCarry<scalar_t>& g,
                                           const scalar_t* B_steps, const scalar_t* C_steps,
                                           int64_t t0, int64_t n, int64_t nst) {
  constexpr int64_t W = kLanes<scalar_t>;
  const scalar_t* __restrict__ A = g.A.data();
  const scalar_t* __restrict__ D = g.D.data();
  for (int64_t i = 0; i < n; ++i) {
    const scalar_t* __restrict__ dt = s.dt.data() + i * W;
    const scalar_t* __restrict__ u = s.u.data() + i * W;
    const scalar_t* __restrict__ h_prev =
        i == 0 ? s.h_start.data() : s.states.data() + (i - 1) * nst * W;
    scalar_t* __restrict__ h_t = s.states.data() + i * nst * W;
    scalar_t* __restrict__ dA_t = s.decays.data() + i * nst * W;
    alignas(64) scalar_t drive[W];
    alignas(64) scalar_t y[W];
#pragma omp simd
    for (int64_t c = 0; c < W; ++c) {
      drive[c] = dt[c] * u[c];
      y[c] = D[c] * u[c];
    }
    for (int64_t k = 0; k < nst; ++k) {
      const scalar_t B_shared = B_vary ? B_steps[(t0 + i) * nst + k] : scalar_t(0);
      const scalar_t C_shared = C_vary ? C_steps[(t0 + i) * nst + k] : scalar_t(0);
      const scalar_t* __restrict__ B_lane = g.B.data() + k * W;
      const scalar_t* __restrict__ C_lane = g.C.data() + k * W;
#pragma omp simd simdlen(W)
      for (int64_t c = 0; c < W; ++c) {
        const scalar_t B_val = B_vary ? B_shared : B_lane[c];
        const scalar_t decay = vexp(dt[c] * A[k * W + c]);
        const scalar_t h_new = decay * h_prev[k * W + c] + drive[c] * B_val;
        dA_t[k * W + c] = decay;
        h_t[k * W + c] = h_new;
        if (with_y) {
          y[c] += (C_vary ? C_shared : C_lane[c]) * h_new;
        }
      }
    }
    if (with_y) {
      scalar_t* __restrict__ y_out = s.y.data() + i * W;
#pragma omp simd
      for (int64_t c = 0; c < W; ++c) {
        y_out[c] = y[c];
      }
    }
  }
}

// Through the gate: grad_y = dL/dy and g_z = dL/dz over the block (y from group_recompute).
template <typename scalar_t>
FIDELITY_WIDE_VECTORS void group_gate_backward(BackwardScratch<scalar_t>& s, bool has_z,
                                               int64_t n) {
  constexpr int64_t W = kLanes<scalar_t>;
  if (!has_z) {
    std::copy(s.g_out.begin(), s.g_out.begin() + n * W, s.grad_y.begin());
    return;
  }
  for (int64_t i = 0; i < n; ++i) {
    const scalar_t* __restrict__ y = s.y.data() + i * W;
    const scalar_t* __restrict__ z = s.z.data() + i * W;
    const scalar_t* __restrict__ g_out = s.g_out.data() + i * W;
    scalar_t* __restrict__ grad_y = s.grad_y.data() + i * W;
    scalar_t* __restrict__ g_z = s.g_z.data() + i * W;
#pragma omp simd simdlen(W)
    for (int64_t c = 0; c < W; ++c) {
      const scalar_t sig = sigmoid(z[c]);
      grad_y[c] = g_out[c] * z[c] * sig;
      g_z[c] = g_out[c] * y[c] * sig * (1 + z[c] * (1 - sig));
    }
  }
}

// One 512-bit vector of a group's lanes (GCC / Clang vector extension): locals of this type
// stay in registers, which arrays indexed by lane inside `omp simd` loops may not.
template <typename scalar_t>
struct LaneVector {
  typedef scalar_t type __attribute__((vector_size(64)));
  // The same vector for loads and stores through scalar_t pointers: it may alias them and
  // needs only scalar_t's alignment (a plain memcpy may alias anything, so the compiler would
  // reload every pointer it keeps in memory after each store).
  typedef scalar_t unaligned __attribute__((vector_size(64), aligned(alignof(scalar_t)),
                                            may_alias));
};

template <typename scalar_t>
inline typename LaneVector<scalar_t>::type load_lanes(const scalar_t* p) {
  return *reinterpret_cast<const typename LaneVector<scalar_t>::unaligned*>(p);
}

template <typename scalar_t>
inline void store_lanes(scalar_t* p, typename LaneVector<scalar_t>::type v) {
  *reinterpret_cast<typename LaneVector<scalar_t>::unaligned*>(p) = v;
}

// `value` in every lane: one broadcast with AVX-512 (`V{} + value` adds a zero first).
template <typename scalar_t>
inline typename LaneVector<scalar_t>::type broadcast_lanes(scalar_t value) {
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<scalar_t, float>) {
    return _mm512_set1_ps(value);
  } else {
    return _mm512_set1_pd(value);
  }
#else
  return typename LaneVector<scalar_t>::type{} + value;
#endif
}

// States per pass of the adjoint: their adjoints and dL/dA sums stay in registers while the
// pass walks the block's steps, so per step and state it stores only the B and C gradients.
constexpr int64_t kAdjointStates = 8;

// The adjoint recurrence backwards through the block for states [k0, k0 + K):
//   dL/dh_t = adjoint + grad_y_t C_t,   adjoint <- dL/dh_t * decay_t   (= dL/dh_{t-1}).
// Adds the states' shares of dL/du (via B) and dL/d dt (via the decay) into the s.via_B and
// s.via_decay (step, lane) tiles, and adds to gA and the B, C gradients (time-varying ones into
// the scratch's lane tiles, which it overwrites instead when `first_group`: the first group of
// a sweep starts the block's lane sums). Every pointer is offset to state k0 up front, so the
// unrolled states address memory at constant offsets.
template <typename scalar_t, int64_t K, bool B_vary, bool C_vary, bool first_group>
FIDELITY_WIDE_VECTORS void adjoint_states(BackwardScratch<scalar_t>& s, GroupCarry<scalar_t>& g,
                                          const scalar_t* B_steps, const scalar_t* C_steps,
                                          int64_t t0, int64_t n, int64_t nst, int64_t k0) {
  using V = typename LaneVector<scalar_t>::type;
  constexpr int64_t W = kLanes<scalar_t>;
  const int64_t stride = nst * W;  // between steps of the (step, state, lane) tiles
  const scalar_t* __restrict__ A = g.A.data() + k0 * W;
  const scalar_t* __restrict__ B_lanes = g.B.data() + k0 * W;
  const scalar_t* __restrict__ C_lanes = g.C.data() + k0 * W;
  const scalar_t* __restrict__ B_row = B_vary ? B_steps + t0 * nst + k0 : nullptr;
  const scalar_t* __restrict__ C_row = C_vary ? C_steps + t0 * nst + k0 : nullptr;
  const scalar_t* __restrict__ h_start = s.h_start.data() + k0 * W;
  const scalar_t* __restrict__ states = s.states.data() + k0 * W;
  const scalar_t* __restrict__ decays = s.decays.data() + k0 * W;
  scalar_t* __restrict__ gB = (B_vary ? s.gB_lanes.data() : g.gB.data()) + k0 * W;
  scalar_t* __restrict__ gC = (C_vary ? s.gC_lanes.data() : g.gC.data()) + k0 * W;
  const scalar_t* __restrict__ dt_steps = s.dt.data();
  const scalar_t* __restrict__ gy_steps = s.grad_y.data();
  const scalar_t* __restrict__ u_steps = s.u.data();
  scalar_t* __restrict__ via_B_steps = s.via_B.data();
  scalar_t* __restrict__ via_decay_steps = s.via_decay.data();
  // Time-varying B and C: accumulate into the lane tiles, or start them (first group).
  constexpr bool add_B = !B_vary || !first_group, add_C = !C_vary || !first_group;
  V adjoint[K], gA[K];
#pragma GCC unroll 16
  for (int64_t q = 0; q < K; ++q) {
    adjoint[q] = load_lanes(g.adjoint.data() + (k0 + q) * W);
    gA[q] = load_lanes(g.gA.data() + (k0 + q) * W);
  }
  for (int64_t i = n - 1; i >= 0; --i) {
    const V dt = load_lanes(dt_steps + i * W);
    const V gy = load_lanes(gy_steps + i * W);
    const V drive = dt * load_lanes(u_steps + i * W);
    const scalar_t* __restrict__ h_t = states + i * stride;
    const scalar_t* __restrict__ h_prev = i == 0 ? h_start : h_t - stride;
    const scalar_t* __restrict__ dA_t = decays + i * stride;
    scalar_t* __restrict__ gB_t = B_vary ? gB + i * stride : gB;
    scalar_t* __restrict__ gC_t = C_vary ? gC + i * stride : gC;
    V via_B = load_lanes(via_B_steps + i * W);
    V via_decay = load_lanes(via_decay_steps + i * W);
#pragma GCC unroll 16
    for (int64_t q = 0; q < K; ++q) {
      const int64_t j = q * W;
      const V B_val = B_vary ? broadcast_lanes(B_row[i * nst + q]) : load_lanes(B_lanes + j);
      const V C_val = C_vary ? broadcast_lanes(C_row[i * nst + q]) : load_lanes(C_lanes + j);
      const V g_k = adjoint[q] + gy * C_val;  // dL/dh_t
      const V gC_add = gy * load_lanes(h_t + j);
      const V gB_add = g_k * drive;
      store_lanes(gC_t + j, add_C ? load_lanes(gC_t + j) + gC_add : gC_add);
      store_lanes(gB_t + j, add_B ? load_lanes(gB_t + j) + gB_add : gB_add);
      via_B += g_k * B_val;
      adjoint[q] = g_k * load_lanes(dA_t + j);  // dL/dh_{t-1}
      const V through_decay = adjoint[q] * load_lanes(h_prev + j);
      via_decay += through_decay * load_lanes(A + j);
      gA[q] += through_decay * dt;
    }
    store_lanes(via_B_steps + i * W, via_B);
    store_lanes(via_decay_steps + i * W, via_decay);
  }
#pragma GCC unroll 16
  for (int64_t q = 0; q < K; ++q) {
    store_lanes(g.adjoint.data() + (k0 + q) * W, adjoint[q]);
    store_lanes(g.gA.data() + (k0 + q) * W, gA[q]);
  }
}

// The adjoint over all states (in passes of kAdjointStates, the rest one by one), then per
// step: writes the g_u and g_dt tiles and adds to gD and the bias gradient.
template <typename scalar_t, bool B_vary, bool C_vary>
FIDELITY_WIDE_VECTORS void group_adjoint(BackwardScratch<scalar_t>& s, GroupCarry<scalar_t>& g,
                                         const scalar_t* B_steps, const scalar_t* C_steps,
                                         int64_t t0, int64_t n, int64_t nst, bool first_group) {
  constexpr int64_t W = kLanes<scalar_t>;
  std::fill(s.via_B.begin(), s.via_B.begin() + n * W, scalar_t(0));
  std::fill(s.via_decay.begin(), s.via_decay.begin() + n * W, scalar_t(0));
  const auto states = [&](auto first) {  // first: std::bool_constant, the first group or not
    int64_t k0 = 0;
    for (; k0 + kAdjointStates <= nst; k0 += kAdjointStates) {
      adjoint_states<scalar_t, kAdjointStates, B_vary, C_vary, first()>(s, g, B_steps, C_steps,
                                                                         t0, n, nst, k0);
    }
    for (; k0 < nst; ++k0) {
      adjoint_states<scalar_t, 1, B_vary, C_vary, first()>(s, g, B_steps, C_steps, t0, n, nst,
                                                           k0);
    }
  };
  if constexpr (B_vary || C_vary) {  // only time-varying lane tiles are started or added to
    if (first_group) {
      states(std::true_type{});
    } else {
      states(std::false_type{});
    }
  } else {
    states(std::false_type{});
  }
  scalar_t* __restrict__ gD = g.gD.data();
  const scalar_t* __restrict__ D = g.D.data();
  for (int64_t i = n - 1; i >= 0; --i) {
    const scalar_t* __restrict__ dt = s.dt.data() + i * W;
    const scalar_t* __restrict__ u = s.u.data() + i * W;
    const scalar_t* __restrict__ gy = s.grad_y.data() + i * W;
    const scalar_t* __restrict__ via_B = s.via_B.data() + i * W;
    const scalar_t* __restrict__ via_decay = s.via_decay.data() + i * W;
    scalar_t* __restrict__ g_u = s.g_u.data() + i * W;
    scalar_t* __restrict__ g_dt = s.g_dt.data() + i * W;
    const scalar_t* __restrict__ slope = s.slope.data() + i * W;
    scalar_t* __restrict__ g_bias = g.g_bias.data();
#pragma omp simd
    for (int64_t c = 0; c < W; ++c) {
      g_u[c] = via_B[c] * dt[c] + gy[c] * D[c];
      const scalar_t g_delta = (via_B[c] * u[c] + via_decay[c]) * slope[c];
      g_dt[c] = g_delta;  // dL/d delta
      g_bias[c] += g_delta;
      gD[c] += gy[c] * u[c];
    }
  }
}

// Whether transpose_out writes these rows' 16 x 16 blocks with non-temporal stores: float32
// with AVX-512, 64-byte aligned rows and a row stride that keeps them aligned.
template <typename scalar_t>
bool streamed_rows(const scalar_t* rows, int64_t row_stride) {
  return kBlockTranspose && std::is_same_v<scalar_t, float> &&
         reinterpret_cast<uintptr_t>(rows) % 64 == 0 && row_stride % 16 == 0;
}

// rows[c * row_stride + i] = tile[i * kLanes + c] for i < n and c < lanes. The 16 x 16 blocks
// of a full float32 group are stored non-temporally when every row they write starts on a
// cache line (64-byte aligned rows and row_stride a multiple of 16): the backward's gradient
// rows are written once and not read again here, so they need not pass through the cache.
template <typename scalar_t>
void transpose_out(const scalar_t* tile, int64_t lanes, int64_t n, scalar_t* rows,
                   int64_t row_stride) {
  constexpr int64_t W = kLanes<scalar_t>;
  const int64_t blocked = blocked_steps<scalar_t>(lanes, n);
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (streamed_rows(rows, row_stride)) {
      for (int64_t i = 0; i < blocked; i += 16) {
        transpose_16x16<true>(tile + i * W, W, rows + i, row_stride);
      }
    } else {
      for (int64_t i = 0; i < blocked; i += 16) {
        transpose_16x16(tile + i * W, W, rows + i, row_stride);
      }
    }
  }
  for (int64_t c = 0; c < lanes; ++c) {
    scalar_t* __restrict__ row = rows + c * row_stride;
    for (int64_t i = blocked; i < n; ++i) {
      row[i] = tile[i * W + c];
    }
  }
}

// A group's parameters and starting adjoint (from dL/dh_last) into its carry.
template <typename scalar_t, bool B_vary, bool C_vary>
void group_begin(const Inputs<scalar_t>& in, int64_t b, int64_t d0,
                 const scalar_t* grad_h_last, GroupCarry<scalar_t>& g) {
  constexpr int64_t W = kLanes<scalar_t>;
  const int64_t nst = in.nst;
  g.d0 = d0;
  g.lanes = std::min(W, in.dim - d0);
  for (auto* tile : {&g.A, &g.B, &g.C, &g.adjoint, &g.gA, &g.gB, &g.gC, &g.D, &g.bias, &g.gD,
                     &g.g_bias}) {
    std::fill(tile->begin(), tile->end(), scalar_t(0));
  }
  for (int64_t c = 0; c < g.lanes; ++c) {
    const int64_t d = d0 + c;
    for (int64_t k = 0; k < nst; ++k) {
      g.A[k * W + c] = in.A[d * nst + k];
      g.adjoint[k * W + c] = grad_h_last[(b * in.dim + d) * nst + k];
      g.B[k * W + c] = B_vary ? scalar_t(0) : in.B[d * nst + k];
      g.C[k * W + c] = C_vary ? scalar_t(0) : in.C[d * nst + k];
    }
    g.D[c] = in.D != nullptr ? in.D[d] : scalar_t(0);
    g.bias[c] = in.bias != nullptr ? in.bias[d] : scalar_t(0);
  }
}

// One block of one group: steps [t0, t0 + n) backwards; the first group of a sweep starts the
// block's time-varying B and C lane tiles, the others add to them.
template <typename scalar_t, bool B_vary, bool C_vary>
void group_block(const Inputs<scalar_t>& in, int64_t b, int64_t block, int64_t every,
                 const scalar_t* checkpoints, int64_t n_ckpt, const scalar_t* grad_out,
                 const Grads<scalar_t>& grads, GroupCarry<scalar_t>& g,
                 BackwardScratch<scalar_t>& s, bool first_group) {
  constexpr int64_t W = kLanes<scalar_t>;
  const int64_t nst = in.nst, len = in.len;
  const int64_t t0 = block * every, n = std::min(every, len - t0);
  const int64_t first_row = b * in.dim + g.d0, offset = first_row * len + t0;
  const scalar_t* B_steps = B_vary ? in.B + b * len * nst : nullptr;
  const scalar_t* C_steps = C_vary ? in.C + b * len * nst : nullptr;
  const bool has_z = in.z != nullptr;
  std::fill(s.h_start.begin(), s.h_start.end(), scalar_t(0));
  for (int64_t c = 0; c < g.lanes; ++c) {
    for (int64_t k = 0; k < nst; ++k) {
      s.h_start[k * W + c] = checkpoints[((first_row + c) * n_ckpt + block) * nst + k];
    }
  }
  transpose_in(in.u + offset, len, g.lanes, n, s.u.data());
  transpose_in(in.delta + offset, len, g.lanes, n, s.dt.data());
  transpose_in(grad_out + offset, len, g.lanes, n, s.g_out.data());
  if (has_z) {
    transpose_in(in.z + offset, len, g.lanes, n, s.z.data());
  }
  group_step_slopes(s, g.bias.data(), in.options.softplus, n);
  if (has_z) {
    group_recompute<scalar_t, B_vary, C_vary, true>(s, g, B_steps, C_steps, t0, n, nst);
  } else {
    group_recompute<scalar_t, B_vary, C_vary, false>(s, g, B_steps, C_steps, t0, n, nst);
  }
  group_gate_backward(s, has_z, n);
  group_adjoint<scalar_t, B_vary, C_vary>(s, g, B_steps, C_steps, t0, n, nst, first_group);
  transpose_out(s.g_u.data(), g.lanes, n, grads.u + offset, len);
  transpose_out(s.g_dt.data(), g.lanes, n, grads.delta + offset, len);
  if (has_z) {
    transpose_out(s.g_z.data(), g.lanes, n, grads.z + offset, len);
  }
}

// A group's per-channel gradients from its carry.
template <typename scalar_t, bool B_vary, bool C_vary>
void group_finish(const Inputs<scalar_t>& in, int64_t b, const GroupCarry<scalar_t>& g,
                  const Grads<scalar_t>& grads) {
  constexpr int64_t W = kLanes<scalar_t>;
  const int64_t nst = in.nst;
  for (int64_t c = 0; c < g.lanes; ++c) {
    const int64_t d = g.d0 + c;
    for (int64_t k = 0; k < nst; ++k) {
      grads.h0[(b * in.dim + d) * nst + k] = g.adjoint[k * W + c];
      grads.A[d * nst + k] += g.gA[k * W + c];
      if (!B_vary) {
        grads.B[d * nst + k] += g.gB[k * W + c];
      }
      if (!C_vary) {
        grads.C[d * nst + k] += g.gC[k * W + c];
      }
    }
    if (grads.D != nullptr) {
      grads.D[d] += g.gD[c];
    }
    if (grads.bias != nullptr) {
      grads.bias[d] += g.g_bias[c];
    }
  }
}

// Groups a thread walks together through the blocks (all of them, block by block, then the
// next sweep): the time-varying B and C lane tiles are summed once per block and sweep, and a
// sweep's row segments (7 streams x 16 rows x kGroupsPerSweep groups per block) stay within
// the TLB and L2, which walking all of a thread's groups per block did not.
constexpr int64_t kGroupsPerSweep = 4;

// Ask for the row segments of `block` of one group (inputs for reading, gradients for
// writing unless transpose_out streams them) while the current block computes: the
// block-by-block walk jumps between rows, so the hardware prefetcher does not follow it.
template <typename scalar_t>
void prefetch_block(const Inputs<scalar_t>& in, int64_t b, const GroupCarry<scalar_t>& g,
                    int64_t block, int64_t every, const scalar_t* grad_out,
                    const Grads<scalar_t>& grads) {
  const int64_t t0 = block * every, count = std::min(every, in.len - t0);
  const bool full = g.lanes == kLanes<scalar_t>;
  const bool has_z = in.z != nullptr;
  const scalar_t* reads[] = {in.u, in.delta, grad_out, in.z};
  const scalar_t* writes[] = {grads.u, grads.delta, grads.z};
  for (int64_t c = 0; c < g.lanes; ++c) {
    const int64_t offset = (b * in.dim + g.d0 + c) * in.len + t0;
    for (int64_t r = 0; r < (has_z ? 4 : 3); ++r) {
      prefetch_row(reads[r] + offset, count, false);
    }
    for (int64_t w = 0; w < (has_z ? 3 : 2); ++w) {
      if (!full || !streamed_rows(writes[w], in.len)) {
        prefetch_row(writes[w] + offset, count, true);
      }
    }
  }
}

// out[j] += sum over lanes of tile[j * kLanes + lane], for j < rows.
template <typename scalar_t>
void sum_lanes(const scalar_t* tile, int64_t rows, scalar_t* out) {
  constexpr int64_t W = kLanes<scalar_t>;
  int64_t j = 0;
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (kBlockTranspose) {  // 16 rows at a time: transpose, then add the 16 lane vectors
      alignas(64) float columns[16 * 16];
      for (; j + 16 <= rows; j += 16) {
        transpose_16x16(tile + j * W, W, columns, 16);
#pragma omp simd
        for (int64_t r = 0; r < 16; ++r) {
          float sum = 0;
          for (int64_t c = 0; c < 16; ++c) {
            sum += columns[c * 16 + r];
          }
          out[j + r] += sum;
        }
      }
    }
  }
  for (; j < rows; ++j) {
    scalar_t sum = 0;
#pragma omp simd reduction(+ : sum)
    for (int64_t c = 0; c < W; ++c) {
      sum += tile[j * W + c];
    }
    out[j] += sum;
  }
}

template <typename scalar_t>
void sum_partials(const std::vector<scalar_t>& partials, int64_t n_threads, int64_t slice,
                  scalar_t* out);

template <typename scalar_t, bool B_vary, bool C_vary>
void scan_backward_groups(const Inputs<scalar_t>& in, const scalar_t* checkpoints,
                          int64_t n_ckpt, int64_t every, const scalar_t* grad_out,
                          const scalar_t* grad_h_last, const Grads<scalar_t>& grads) {
  // Time-varying B and C gradients: each thread sums into its own (len, nst) slice, reduced
  // afterwards.
  constexpr int64_t W = kLanes<scalar_t>;
  const int64_t n_threads = at::get_num_threads();
  const int64_t nst = in.nst, slice = in.len * nst;
  const int64_t groups = (in.dim + W - 1) / W;
  const int64_t grain = std::max<int64_t>(1, rows_per_task(in) / W);
  std::vector<scalar_t> partial_B(B_vary ? n_threads * slice : 0);
  std::vector<scalar_t> partial_C(C_vary ? n_threads * slice : 0);

  // Batch elements one after another, channel groups in parallel: within a batch element
  // every thread owns whole channels, so the per-channel gradients (A, D, bias,
  // time-invariant B and C) are written by one thread only. A thread walks the blocks
  // backwards, each block for all its groups, so that the lane tiles of time-varying B and
  // C gradients are summed once per block.
  for (int64_t b = 0; b < in.batch; ++b) {
    std::fill(partial_B.begin(), partial_B.end(), scalar_t(0));
    std::fill(partial_C.begin(), partial_C.end(), scalar_t(0));
    at::parallel_for(0, groups, grain, [&](int64_t begin, int64_t end) {
      const int64_t tid = at::get_thread_num();
      TORCH_CHECK(tid < n_threads, "selective_scan_cpu: unexpected thread id");
      BackwardScratch<scalar_t> s(every, nst);
      std::vector<GroupCarry<scalar_t>> carries(end - begin, GroupCarry<scalar_t>(nst));
      for (int64_t group = begin; group < end; ++group) {
        group_begin<scalar_t, B_vary, C_vary>(in, b, group * W, grad_h_last,
                                              carries[group - begin]);
      }
      scalar_t* own_B = B_vary ? partial_B.data() + tid * slice : nullptr;
      scalar_t* own_C = C_vary ? partial_C.data() + tid * slice : nullptr;
      const int64_t n_carries = static_cast<int64_t>(carries.size());
      for (int64_t first = 0; first < n_carries; first += kGroupsPerSweep) {
        const int64_t last = std::min(n_carries, first + kGroupsPerSweep);
        for (int64_t block = n_ckpt - 1; block >= 0; --block) {
          const int64_t t0 = block * every, n = std::min(every, in.len - t0);
          for (int64_t index = first; index < last; ++index) {
            if (block > 0) {
              prefetch_block(in, b, carries[index], block - 1, every, grad_out, grads);
            }
            group_block<scalar_t, B_vary, C_vary>(in, b, block, every, checkpoints, n_ckpt,
                                                  grad_out, grads, carries[index], s,
                                                  index == first);
          }
          if (B_vary) {
            sum_lanes(s.gB_lanes.data(), n * nst, own_B + t0 * nst);
          }
          if (C_vary) {
            sum_lanes(s.gC_lanes.data(), n * nst, own_C + t0 * nst);
          }
        }
      }
      for (const auto& carry : carries) {
        group_finish<scalar_t, B_vary, C_vary>(in, b, carry, grads);
      }
      finish_streaming_stores();
    });
    sum_partials(partial_B, n_threads, slice, grads.B + b * slice);
    sum_partials(partial_C, n_threads, slice, grads.C + b * slice);
  }
}

template <typename scalar_t>
void scan_backward(const Inputs<scalar_t>& in, const scalar_t* checkpoints, int64_t n_ckpt,
                   int64_t every, const scalar_t* grad_out, const scalar_t* grad_h_last,
                   const Grads<scalar_t>& grads) {
  if (in.B_vary && in.C_vary) {
    scan_backward_groups<scalar_t, true, true>(in, checkpoints, n_ckpt, every, grad_out,
                                               grad_h_last, grads);
  } else if (in.B_vary) {
    scan_backward_groups<scalar_t, true, false>(in, checkpoints, n_ckpt, every, grad_out,
                                                grad_h_last, grads);
  } else if (in.C_vary) {
    scan_backward_groups<scalar_t, false, true>(in, checkpoints, n_ckpt, every, grad_out,
                                                grad_h_last, grads);
  } else {
    scan_backward_groups<scalar_t, false, false>(in, checkpoints, n_ckpt, every, grad_out,
                                                 grad_h_last, grads);
  }
}

// out[i] = sum over threads k of partials[k * slice + i] (nothing when partials is empty).
template <typename scalar_t>
void sum_partials(const std::vector<scalar_t>& partials, int64_t n_threads, int64_t slice,
                  scalar_t* out) {
  if (partials.empty()) {
    return;
  }
  at::parallel_for(0, slice, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      scalar_t sum = 0;
      for (int64_t k = 0; k < n_threads; ++k) {
        sum += partials[k * slice + i];
      }
      out[i] = sum;
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Entry points. The Python wrapper validates user input; these checks guard the kernel.

void check_inputs(const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A,
                  const at::Tensor& B, const at::Tensor& C, const std::optional<at::Tensor>& D,
                  const std::optional<at::Tensor>& z, const std::optional<at::Tensor>& bias,
                  const at::Tensor& h0) {
  std::vector<const at::Tensor*> all = {&u, &delta, &A, &B, &C, &h0};
  for (const auto* opt : {&D, &z, &bias}) {
    if (opt->has_value()) {
      all.push_back(&opt->value());
    }
  }
  for (const at::Tensor* t : all) {
    TORCH_CHECK(t->device().is_cpu(), "selective_scan_cpu: tensors must be on the CPU");
    TORCH_CHECK(t->is_contiguous(), "selective_scan_cpu: tensors must be contiguous");
    TORCH_CHECK(t->scalar_type() == u.scalar_type(),
                "selective_scan_cpu: all tensors must share one dtype");
  }
  TORCH_CHECK(u.scalar_type() == at::kFloat || u.scalar_type() == at::kDouble,
              "selective_scan_cpu: dtype must be float32 or float64");
  TORCH_CHECK(u.dim() == 3 && delta.sizes() == u.sizes(),
              "selective_scan_cpu: u, delta must be (batch, dim, len)");
  const int64_t batch = u.size(0), dim = u.size(1), len = u.size(2);
  TORCH_CHECK(A.dim() == 2 && A.size(0) == dim, "selective_scan_cpu: A must be (dim, nst)");
  const int64_t nst = A.size(1);
  for (const at::Tensor* t : {&B, &C}) {
    const std::vector<int64_t> shape = t->dim() == 3 ? std::vector<int64_t>{batch, len, nst}
                                                     : std::vector<int64_t>{dim, nst};
    TORCH_CHECK(t->sizes() == shape,
                "selective_scan_cpu: B, C must be (batch, len, nst) or (dim, nst)");
  }
  TORCH_CHECK(!z.has_value() || z->sizes() == u.sizes(), "selective_scan_cpu: z like u");
  TORCH_CHECK(!D.has_value() || (D->dim() == 1 && D->size(0) == dim),
              "selective_scan_cpu: D must be (dim)");
  TORCH_CHECK(!bias.has_value() || (bias->dim() == 1 && bias->size(0) == dim),
              "selective_scan_cpu: bias must be (dim)");
  TORCH_CHECK(h0.dim() == 3 && h0.size(0) == batch && h0.size(1) == dim && h0.size(2) == nst,
              "selective_scan_cpu: h0 must be (batch, dim, nst)");
}

// Returns (out, h_last, checkpoints); checkpoints is empty unless save_checkpoints.
std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& u, const at::Tensor& delta, const at::Tensor& A, const at::Tensor& B,
    const at::Tensor& C, const std::optional<at::Tensor>& D, const std::optional<at::Tensor>& z,
    const std::optional<at::Tensor>& bias, bool softplus, const at::Tensor& h0,
    bool save_checkpoints, int64_t every) {
  check_inputs(u, delta, A, B, C, D, z, bias, h0);
  TORCH_CHECK(every >= 1, "selective_scan_cpu: checkpoint interval must be >= 1");
  const int64_t n_ckpt = (u.size(2) + every - 1) / every;
  at::Tensor out = at::empty_like(u);
  at::Tensor h_last = at::empty_like(h0);
  at::Tensor checkpoints = save_checkpoints
                               ? at::empty({u.size(0), u.size(1), n_ckpt, A.size(1)}, u.options())
                               : at::empty({0}, u.options());
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_cpu_forward", [&] {
    const auto in = make_inputs<scalar_t>(u, delta, A, B, C, D, z, bias, softplus);
    scan_forward<scalar_t>(in, h0.data_ptr<scalar_t>(), every, out.data_ptr<scalar_t>(),
                           h_last.data_ptr<scalar_t>(),
                           save_checkpoints ? checkpoints.data_ptr<scalar_t>() : nullptr);
  });
  return {out, h_last, checkpoints};
}

// Returns [grad_u, grad_delta, grad_A, grad_B, grad_C, grad_D, grad_z, grad_bias, grad_h0];
// the gradients of absent optional inputs are empty tensors.
std::vector<at::Tensor> backward(const at::Tensor& u, const at::Tensor& delta,
                                 const at::Tensor& A, const at::Tensor& B, const at::Tensor& C,
                                 const std::optional<at::Tensor>& D,
                                 const std::optional<at::Tensor>& z,
                                 const std::optional<at::Tensor>& bias, bool softplus,
                                 const at::Tensor& h0, const at::Tensor& checkpoints,
                                 int64_t every, const at::Tensor& grad_out,
                                 const at::Tensor& grad_h_last) {
  check_inputs(u, delta, A, B, C, D, z, bias, h0);
  const int64_t n_ckpt = (u.size(2) + every - 1) / every;
  TORCH_CHECK(every >= 1 && checkpoints.dim() == 4 && checkpoints.size(2) == n_ckpt &&
                  checkpoints.is_contiguous() && checkpoints.scalar_type() == u.scalar_type(),
              "selective_scan_cpu: checkpoints do not match the inputs");
  TORCH_CHECK(grad_out.sizes() == u.sizes() && grad_out.is_contiguous() &&
                  grad_out.scalar_type() == u.scalar_type(),
              "selective_scan_cpu: grad_out must match u");
  TORCH_CHECK(grad_h_last.sizes() == h0.sizes() && grad_h_last.is_contiguous() &&
                  grad_h_last.scalar_type() == u.scalar_type(),
              "selective_scan_cpu: grad_h_last must match h0");
  const auto empty = at::empty({0}, u.options());
  at::Tensor g_u = at::empty_like(u), g_delta = at::empty_like(delta);
  at::Tensor g_A = at::zeros_like(A), g_B = at::zeros_like(B), g_C = at::zeros_like(C);
  at::Tensor g_D = D.has_value() ? at::zeros_like(*D) : empty;
  at::Tensor g_z = z.has_value() ? at::empty_like(*z) : empty;
  at::Tensor g_bias = bias.has_value() ? at::zeros_like(*bias) : empty;
  at::Tensor g_h0 = at::empty_like(h0);
  AT_DISPATCH_FLOATING_TYPES(u.scalar_type(), "selective_scan_cpu_backward", [&] {
    const auto in = make_inputs<scalar_t>(u, delta, A, B, C, D, z, bias, softplus);
    const Grads<scalar_t> grads{g_u.data_ptr<scalar_t>(),
                                g_delta.data_ptr<scalar_t>(),
                                g_A.data_ptr<scalar_t>(),
                                g_B.data_ptr<scalar_t>(),
                                g_C.data_ptr<scalar_t>(),
                                D.has_value() ? g_D.data_ptr<scalar_t>() : nullptr,
                                z.has_value() ? g_z.data_ptr<scalar_t>() : nullptr,
                                bias.has_value() ? g_bias.data_ptr<scalar_t>() : nullptr,
                                g_h0.data_ptr<scalar_t>()};
    scan_backward<scalar_t>(in, checkpoints.data_ptr<scalar_t>(), n_ckpt, every,
                            grad_out.data_ptr<scalar_t>(), grad_h_last.data_ptr<scalar_t>(),
                            grads);
  });
  return {g_u, g_delta, g_A, g_B, g_C, g_D, g_z, g_bias, g_h0};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused selective scan (Mamba-1 recurrence) for CPU: forward and backward.";
  m.def("forward", &forward, "Selective scan forward -> (out, h_last, checkpoints)",
        py::arg("u"), py::arg("delta"), py::arg("A"), py::arg("B"), py::arg("C"), py::arg("D"),
        py::arg("z"), py::arg("delta_bias"), py::arg("delta_softplus"), py::arg("h0"),
        py::arg("save_checkpoints"), py::arg("every"),
        py::call_guard<py::gil_scoped_release>());
  m.def("backward", &backward,
        "Selective scan backward -> [grad_u, grad_delta, grad_A, grad_B, grad_C, grad_D, "
        "grad_z, grad_delta_bias, grad_h0]",
        py::arg("u"), py::arg("delta"), py::arg("A"), py::arg("B"), py::arg("C"), py::arg("D"),
        py::arg("z"), py::arg("delta_bias"), py::arg("delta_softplus"), py::arg("h0"),
        py::arg("checkpoints"), py::arg("every"), py::arg("grad_out"), py::arg("grad_h_last"),
        py::call_guard<py::gil_scoped_release>());
}
