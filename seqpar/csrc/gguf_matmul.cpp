// Matmuls on GGUF's own quantized blocks of 32 (CPU), for layers/quant.py: y [M, N] = x [M, K] @
// W^T (x of any float dtype, taken as float32; y in x's dtype) for W [N, K] of type Q4_1 (w = d q + m, q 4-bit) or Q8_0 (w = d q, q int8), held exactly as
// the file holds it: w uint8 [N, K / 32 * bytes per block], llama.cpp's block_q4_1 (float16 d, m,
// 16 bytes: element j < 16 in the low nibble of byte j, j + 16 in its high nibble) or block_q8_0
// (float16 d, 32 int8). A thread reads each weight row as one stream, as many bytes as the file's.
//
// The arithmetic is llama.cpp's for these types, so that one file gives the same logits in both
// engines: each row of x is quantized to 8-bit blocks of 32 first (d_x = max|x| / 127 rounded to
// float16, q_x = round-half-even(x * 127 / max|x|); for Q4_1 also s_x = d_x sum(q_x), in float16,
// llama.cpp's Q8_1), a block's dot product is exact in integers, and
//   Q4_1: y = sum_b d_w d_x sum_j(q_w q_x) + m_w s_x          Q8_0: y = sum_b d_w d_x sum_j(q_w q_x)
// in float32. Only the order of the float additions differs from llama.cpp's (a few units in the
// last place).
//
// A tile of MR activation rows x NR weight rows (tiles.h) unpacks each weight block once for MR
// rows and loads each activation block once for NR weights (many rows, a prefill, gain most).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include "tiles.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define SEQPAR_AVX2 1
#endif

namespace {

constexpr int64_t QK = 32;  // values per block
enum Type : int64_t { Q4_1 = 3, Q8_0 = 8 };  // GGML's type ids

inline int64_t block_bytes(int64_t type) { return type == Q4_1 ? 20 : 34; }

inline float half_at(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
}

inline float round_half(float v) { return static_cast<float>(c10::Half(v)); }  // to nearest even

// The activations of one call, quantized: q int8 [M, nb * 32], and per block d (and s).
// Q4_1: each pair of blocks (b, b + 1) is stored as their elements 0..15, then 16..31, so that one
// 256-bit load matches a vector of low nibbles (and the next one the high nibbles) of the weights'
// two blocks; d and s are spread for the vector code: d [M, nb * 4] (each block's d in 4 lanes),
// s [M, nb * 4] (s in the block's first lane, 0 in the others).
// Q8_0: q in element order, d [M, nb]. nb: blocks per row (Q4_1: rounded up to even, zero-filled).
struct Acts {
  std::vector<int8_t> q;
  std::vector<float> d, s;
  int64_t nb;
};

Acts quantize_rows(const float* x, int64_t M, int64_t K, int64_t nb, int64_t type) {
  const bool q41 = type == Q4_1;
  const int64_t spread = q41 ? 4 : 1;
  Acts a{std::vector<int8_t>(M * nb * QK, 0), std::vector<float>(M * nb * spread, 0.f),
         std::vector<float>(q41 ? M * nb * spread : 0, 0.f), nb};
  const int64_t real = K / QK;  // blocks of x; nb - real zero blocks pad each row
  at::parallel_for(0, M * real, 256, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t m = i / real, b = i % real;
      const float* v = x + m * K + b * QK;
      float amax = 0.f;
      for (int64_t j = 0; j < QK; ++j) amax = std::max(amax, std::fabs(v[j]));
      const float d = amax / 127.f;
      const float id = amax != 0.f ? 127.f / amax : 0.f;
      int8_t* q = a.q.data() + (m * nb + b) * QK;
      if (q41) q = a.q.data() + (m * nb + (b & ~int64_t{1})) * QK + (b & 1) * 16;
      int32_t sum = 0;
      for (int64_t j = 0; j < QK; ++j) {
        // Q4_1's pair layout: element j of block b goes to half j / 16 of the pair, slot b % 2.
        const int64_t at = q41 ? (j / 16) * 32 + j % 16 : j;
        q[at] = static_cast<int8_t>(std::nearbyint(v[j] * id));  // default mode: half to even
        sum += q[at];
      }
      float* dd = a.d.data() + (m * nb + b) * spread;
      std::fill(dd, dd + spread, round_half(d));
      if (q41) a.s[(m * nb + b) * spread] = round_half(d * static_cast<float>(sum));
    }
  });
  return a;
}

#ifdef SEQPAR_AVX2
// u8 x s8 -> 8 int32 lanes added to acc, lane l += the sum of bytes 4l..4l+3's products (exact:
// without VNNI the pairs' sums stay below 2^15 for 4-bit x int8 and |int8| x int8).
inline __m256i dot_u8s8(__m256i acc, __m256i u, __m256i s) {
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(acc, u, s);
#elif defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s),
                                                 _mm256_set1_epi16(1)));
#endif
}

// Weight rows ahead that a tile prefetches (the same blocks of later rows, the next tasks'): at
// one row, SmolLM2's layers took 16.5 ms without it and 11.8 / 11.3 / 11.5 / 11.5 ms at 4 / 8 /
// 16 / 32 rows ahead (AMX host, one thread, CPU time); 32 is what the benchmarks ran.
constexpr int64_t PREFETCH_ROWS = 32;

inline float hsum(__m256 v) {  // (0 + 4, 1 + 5, 2 + 6, 3 + 7), then pairs
  __m128 r = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
  r = _mm_add_ps(r, _mm_movehl_ps(r, r));
  r = _mm_add_ss(r, _mm_movehdup_ps(r));
  return _mm_cvtss_f32(r);
}

#if defined(__AVX512VL__)
constexpr int64_t MR = 4, NR = 4;  // 32 vector registers
#else
constexpr int64_t MR = 2, NR = 4;  // 16
#endif

// Q4_1, TM x TN outputs: two blocks per step; lanes 0-3 hold block b's sums, 4-7 block b + 1's.
// nb: the weight's blocks per row (a last odd block pairs with zeros).
template <int64_t TM, int64_t TN>
inline void tile_q4_1(const Acts& a, const uint8_t* w, int64_t nb, int64_t m0, int64_t n0,
                      float* y, int64_t N) {
  const int64_t bb = 20, na = a.nb;
  const __m256i mask = _mm256_set1_epi8(0x0F);
  const __m256i spread_d = _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2);
  const __m256i spread_m = _mm256_setr_epi32(1, 1, 1, 1, 3, 3, 3, 3);
  __m256 acc[TM][TN];
  for (auto& row : acc)
    for (auto& v : row) v = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; b += 2) {
    const bool two = b + 1 < nb;
    __m256i lo[TN], hi[TN];
    __m256 d[TN], m[TN];
    for (int64_t j = 0; j < TN; ++j) {
      const uint8_t* blk = w + ((n0 + j) * nb + b) * bb;
      _mm_prefetch(reinterpret_cast<const char*>(blk + PREFETCH_ROWS * nb * bb), _MM_HINT_T0);
      const __m128i q0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + 4));
      const __m128i q1 = two ? _mm_loadu_si128(reinterpret_cast<const __m128i*>(blk + bb + 4))
                             : _mm_setzero_si128();
      const __m256i q = _mm256_set_m128i(q1, q0);
      lo[j] = _mm256_and_si256(q, mask);
      hi[j] = _mm256_and_si256(_mm256_srli_epi16(q, 4), mask);
      int32_t dm0, dm1 = 0;  // (d, m) of each block, float16 bits
      std::memcpy(&dm0, blk, 4);
      if (two) std::memcpy(&dm1, blk + bb, 4);
      const __m256 dm = _mm256_castps128_ps256(_mm_cvtph_ps(_mm_setr_epi32(dm0, dm1, 0, 0)));
      d[j] = _mm256_permutevar8x32_ps(dm, spread_d);
      m[j] = _mm256_permutevar8x32_ps(dm, spread_m);
    }
    for (int64_t i = 0; i < TM; ++i) {
      const int64_t at = (m0 + i) * na + b;
      const int8_t* xq = a.q.data() + at * QK;
      const __m256i xa = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq));
      const __m256i xb = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + 32));
      const __m256 dx = _mm256_loadu_ps(a.d.data() + at * 4);
      const __m256 sx = _mm256_loadu_ps(a.s.data() + at * 4);
      for (int64_t j = 0; j < TN; ++j) {
        const __m256i l = dot_u8s8(dot_u8s8(_mm256_setzero_si256(), lo[j], xa), hi[j], xb);
        acc[i][j] = _mm256_fmadd_ps(_mm256_mul_ps(d[j], dx), _mm256_cvtepi32_ps(l), acc[i][j]);
        acc[i][j] = _mm256_fmadd_ps(m[j], sx, acc[i][j]);
      }
    }
  }
  for (int64_t i = 0; i < TM; ++i)
    for (int64_t j = 0; j < TN; ++j) y[(m0 + i) * N + n0 + j] = hsum(acc[i][j]);
}

// Q8_0, TM x TN outputs: one block per step, int8 x int8 as |w| x (x with w's sign).
template <int64_t TM, int64_t TN>
inline void tile_q8_0(const Acts& a, const uint8_t* w, int64_t nb, int64_t m0, int64_t n0,
                      float* y, int64_t N) {
  const int64_t bb = 34;
  __m256 acc[TM][TN];
  for (auto& row : acc)
    for (auto& v : row) v = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m256i q[TN];
    float d[TN];
    for (int64_t j = 0; j < TN; ++j) {
      const uint8_t* blk = w + ((n0 + j) * nb + b) * bb;
      _mm_prefetch(reinterpret_cast<const char*>(blk + PREFETCH_ROWS * nb * bb), _MM_HINT_T0);
      q[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2));
      d[j] = half_at(blk);
    }
    for (int64_t i = 0; i < TM; ++i) {
      const int64_t at = (m0 + i) * nb + b;
      const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.q.data() + at * QK));
      for (int64_t j = 0; j < TN; ++j) {
        const __m256i l = dot_u8s8(_mm256_setzero_si256(), _mm256_sign_epi8(q[j], q[j]),
                                   _mm256_sign_epi8(x, q[j]));
        acc[i][j] = _mm256_fmadd_ps(_mm256_set1_ps(d[j] * a.d[at]), _mm256_cvtepi32_ps(l),
                                    acc[i][j]);
      }
    }
  }
  for (int64_t i = 0; i < TM; ++i)
    for (int64_t j = 0; j < TN; ++j) y[(m0 + i) * N + n0 + j] = hsum(acc[i][j]);
}
#else
constexpr int64_t MR = 1, NR = 1;

// Portable: the same integer block sums, float32 products and sums.
template <int64_t TM, int64_t TN>
inline void tile_q4_1(const Acts& a, const uint8_t* w, int64_t nb, int64_t m0, int64_t n0,
                      float* y, int64_t N) {
  float acc = 0.f;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = w + (n0 * nb + b) * 20;
    const int64_t at = m0 * a.nb + b;
    const int8_t* x = a.q.data() + (at & ~int64_t{1}) * QK + (b & 1) * 16;
    int32_t sum = 0;
    for (int64_t j = 0; j < 16; ++j) sum += (blk[4 + j] & 0x0F) * x[j] + (blk[4 + j] >> 4) * x[j + 32];
    acc += half_at(blk) * a.d[at * 4] * static_cast<float>(sum) + half_at(blk + 2) * a.s[at * 4];
  }
  y[m0 * N + n0] = acc;
}

template <int64_t TM, int64_t TN>
inline void tile_q8_0(const Acts& a, const uint8_t* w, int64_t nb, int64_t m0, int64_t n0,
                      float* y, int64_t N) {
  float acc = 0.f;
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* blk = w + (n0 * nb + b) * 34;
    const int8_t* q = reinterpret_cast<const int8_t*>(blk + 2);
    const int8_t* x = a.q.data() + (m0 * nb + b) * QK;
    int32_t sum = 0;
    for (int64_t j = 0; j < QK; ++j) sum += q[j] * x[j];
    acc += half_at(blk) * a.d[m0 * nb + b] * static_cast<float>(sum);
  }
  y[m0 * N + n0] = acc;
}
#endif

template <int64_t TM, int64_t TN>
inline void tile(int64_t type, const Acts& a, const uint8_t* w, int64_t nb, int64_t m0, int64_t n0,
                 float* y, int64_t N) {
  if (type == Q4_1) tile_q4_1<TM, TN>(a, w, nb, m0, n0, y, N);
  else tile_q8_0<TM, TN>(a, w, nb, m0, n0, y, N);
}

at::Tensor gguf_mm(const at::Tensor& x, const at::Tensor& w, int64_t type) {
  TORCH_CHECK(type == Q4_1 || type == Q8_0, "gguf_mm: no kernel for GGML type ", type,
              " (Q4_1 = 3, Q8_0 = 8)");
  TORCH_CHECK(x.dim() == 2 && at::isFloatingType(x.scalar_type()),
              "gguf_mm: x must be a floating [M, K], got ", x.scalar_type(), " ", x.sizes());
  const at::Tensor xf = x.to(at::kFloat).contiguous();  // x itself when it is already
  const int64_t M = x.size(0), K = x.size(1), nb = K / QK, bb = block_bytes(type);
  TORCH_CHECK(K % QK == 0, "gguf_mm: K = ", K, " is not a multiple of the block size 32");
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && w.is_contiguous() &&
              w.size(1) == nb * bb, "gguf_mm: w must be contiguous uint8 [N, ", nb * bb, "] (",
              nb, " blocks of ", bb, " bytes), got ", w.scalar_type(), " ", w.sizes());
  const int64_t N = w.size(0);
  at::Tensor y = at::empty({M, N}, xf.options());
  if (M == 0 || N == 0) return y.to(x.scalar_type());
  const Acts a = quantize_rows(xf.data_ptr<float>(), M, K, type == Q4_1 ? (nb + 1) / 2 * 2 : nb,
                               type);
  const uint8_t* wp = w.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  // 16 activation rows at a time: their blocks (16 rows of K = 576: 18 KB) stay in L1 (measured
  // at 128 rows: 5% faster than 64 at a time).
  for_each_tile<MR, NR, 16>(M, N, [&]<int64_t TM, int64_t TN>(int64_t m0, int64_t n0) {
    tile<TM, TN>(type, a, wp, nb, m0, n0, yp, N);
  });
  return y.to(x.scalar_type());  // y itself for float32 x
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(seqpar_kernels, m) {
  m.def("gguf_mm(Tensor x, Tensor w, int type) -> Tensor");
}

TORCH_LIBRARY_IMPL(seqpar_kernels, CPU, m) { m.impl("gguf_mm", &gguf_mm); }
