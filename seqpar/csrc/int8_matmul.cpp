// Weight-only int8 matmul (CPU) for layers/quant.py Int8PerChannel: y [M, N] = x [M, K] @ W^T with
// W = scale[n] * q[n, k], q int8 [N, K], scale float32 [N]; x float32 or bfloat16, y in x's dtype.
// Activations are not rounded: each weight is widened to float32 and multiplied in float32
// (y[m, n] = scale[n] * sum_k q[n, k] x[m, k]), so the result is F.linear on the dequantized
// weights up to the order of float32 sums.
//
// Why not torch's _weight_int8pack_mm: measured on the AMX host at one thread, SmolLM2's 30 layers
// at one row took it 27 ms (bfloat16 activations, 225 us a call), while their 106 MB of int8 stream
// from memory in a few ms; this reads each weight once per tile of MR rows, widening 16 (AVX-512)
// or 8 (AVX2) at a time.
//
// A tile is MR activation rows x NR weight rows (tiles.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "tiles.h"

#include <algorithm>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#define SEQPAR_W 16
using VecF = __m512;
inline VecF vzero() { return _mm512_setzero_ps(); }
inline VecF vload(const float* p) { return _mm512_loadu_ps(p); }
inline VecF vwiden(const int8_t* q) {  // 16 int8 -> 16 float32
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q))));
}
inline VecF vfma(VecF a, VecF b, VecF c) { return _mm512_fmadd_ps(a, b, c); }
inline float vsum(VecF v) { return _mm512_reduce_add_ps(v); }
constexpr int64_t MR = 4, NR = 4;
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define SEQPAR_W 8
using VecF = __m256;
inline VecF vzero() { return _mm256_setzero_ps(); }
inline VecF vload(const float* p) { return _mm256_loadu_ps(p); }
inline VecF vwiden(const int8_t* q) {  // 8 int8 -> 8 float32
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q))));
}
inline VecF vfma(VecF a, VecF b, VecF c) { return _mm256_fmadd_ps(a, b, c); }
inline float vsum(VecF v) {
  __m128 r = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
  r = _mm_add_ps(r, _mm_movehl_ps(r, r));
  return _mm_cvtss_f32(_mm_add_ss(r, _mm_movehdup_ps(r)));
}
constexpr int64_t MR = 2, NR = 4;
#else
#define SEQPAR_W 1
using VecF = float;
inline VecF vzero() { return 0.f; }
inline VecF vload(const float* p) { return *p; }
inline VecF vwiden(const int8_t* q) { return static_cast<float>(*q); }
inline VecF vfma(VecF a, VecF b, VecF c) { return a * b + c; }
inline float vsum(VecF v) { return v; }
constexpr int64_t MR = 1, NR = 1;
#endif

namespace {

constexpr int64_t W = SEQPAR_W;

// y[m0 + i][n0 + j] for i < TM, j < TN; x float32 [M, K], q int8 [N, K].
template <int64_t TM, int64_t TN>
inline void tile(const float* x, const int8_t* q, const float* scale, int64_t K, int64_t m0,
                 int64_t n0, float* y, int64_t N) {
  VecF acc[TM][TN];
  for (auto& row : acc)
    for (auto& v : row) v = vzero();
  const int64_t body = K / W * W;
  for (int64_t k = 0; k < body; k += W) {
    VecF w[TN];
    for (int64_t j = 0; j < TN; ++j) {
      const int8_t* p = q + (n0 + j) * K + k;
      __builtin_prefetch(p + 8 * K);  // the same columns NR rows later: the next tasks' rows
      w[j] = vwiden(p);
    }
    for (int64_t i = 0; i < TM; ++i) {
      const VecF a = vload(x + (m0 + i) * K + k);
      for (int64_t j = 0; j < TN; ++j) acc[i][j] = vfma(w[j], a, acc[i][j]);
    }
  }
  for (int64_t i = 0; i < TM; ++i)
    for (int64_t j = 0; j < TN; ++j) {
      float s = vsum(acc[i][j]);
      for (int64_t k = body; k < K; ++k) s += q[(n0 + j) * K + k] * x[(m0 + i) * K + k];
      y[(m0 + i) * N + n0 + j] = s * scale[n0 + j];
    }
}

at::Tensor int8_mm(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale) {
  TORCH_CHECK(x.dim() == 2 && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "int8_mm: x must be float32 or bfloat16 [M, K], got ", x.scalar_type(), " ",
              x.sizes());
  TORCH_CHECK(q.dim() == 2 && q.scalar_type() == at::kChar && q.is_contiguous() &&
              q.size(1) == x.size(1), "int8_mm: q must be contiguous int8 [N, ", x.size(1),
              "], got ", q.scalar_type(), " ", q.sizes());
  TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() &&
              scale.numel() == q.size(0), "int8_mm: scale must be float32 [", q.size(0), "]");
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  at::Tensor y = at::empty({M, N}, xf.options());
  if (M > 0 && N > 0) {
    const float* xp = xf.data_ptr<float>();
    const int8_t* qp = q.data_ptr<int8_t>();
    const float* sp = scale.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    // 16 activation rows at a time: 16 rows of K = 576 (36 KB) stay in L1 (measured at 128
    // rows: 8% faster than 64 at a time).
    for_each_tile<MR, NR, 16>(M, N, [&]<int64_t TM, int64_t TN>(int64_t m0, int64_t n0) {
      tile<TM, TN>(xp, qp, sp, K, m0, n0, yp, N);
    });
  }
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(seqpar_kernels, m) {
  m.def("int8_mm(Tensor x, Tensor q, Tensor scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(seqpar_kernels, CPU, m) { m.impl("int8_mm", &int8_mm); }
