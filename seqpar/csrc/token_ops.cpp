// The token-wise glue between the matmuls of a decoder layer (CPU), for seqpar/layers/norm.py,
// rotary.py and models/llama.py: RMSNorm with its residual add, rotary embedding in place, and
// SiLU-and-mul, each one pass over its rows instead of the 5-10 torch ops (and float32
// temporaries) of the torch code they replace. At a decode step the rows are few and the ops
// small, so what they save is mostly the per-op dispatch: ~360 ops a SmolLM2 step.
//
// Numerics: math in float32, rounded to the storage dtype exactly where the torch code rounds its
// intermediate tensors (RMSNorm's normalized row before the weight multiplies it, as HF's
// LlamaRMSNorm; each product of the rotary's x * cos + rotate_half(x) * sin; silu before the
// multiply), so in bfloat16 results match the torch code but for summation order (the norm's
// mean of squares) and the exp of silu (a polynomial here, Sleef's in torch): float rounding.
// In float32 the compiler may also contract a product and a sum into one FMA.
//
// Rows: a [rows, D] or [A, B, D] tensor (e.g. the q heads of a fused qkv row, [T, hq, D]) with
// its last dimension contiguous and any strides before it.
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

// 512-bit vectors on AVX-512 hosts (GCC's -march=native prefers 256): silu_and_mul at 2048 rows
// ran 1.7x faster so, ahead of torch's F.silu + mul instead of behind it.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#pragma GCC target("prefer-vector-width=512")
#endif

namespace {

constexpr int64_t GRAIN_ELEMENTS = 16384;  // per thread chunk: a decode step's rows stay inline

struct Rows {
  char* base;
  int64_t inner, outer_stride, inner_stride, count, dim;  // strides in elements

  Rows(const at::Tensor& t, const char* op, const char* name) {
    TORCH_CHECK((t.dim() == 2 || t.dim() == 3) && t.stride(-1) == 1, op, ": ", name,
                " must be [rows, D] or [A, B, D] with a contiguous last dimension, got shape ",
                t.sizes(), " strides ", t.strides());
    base = static_cast<char*>(t.data_ptr());
    dim = t.size(-1);
    inner = t.dim() == 3 ? t.size(1) : 1;
    inner_stride = t.dim() == 3 ? t.stride(1) : 0;
    outer_stride = t.stride(0);
    count = t.size(0) * inner;
  }

  template <typename T>
  T* row(int64_t r) const {
    return reinterpret_cast<T*>(base) + (r / inner) * outer_stride + (r % inner) * inner_stride;
  }
};

void check_same(const at::Tensor& a, const at::Tensor& b, const char* op, const char* names) {
  TORCH_CHECK(a.sizes() == b.sizes() && a.scalar_type() == b.scalar_type(), op, ": ", names,
              " must have one shape and dtype, got ", a.sizes(), " ", a.scalar_type(), " and ",
              b.sizes(), " ", b.scalar_type());
}

// Storage types: load widens an element to float32, store rounds one back (to nearest even).
// bfloat16 is handled as its bits, so that loops over it vectorize.
struct Float32 {
  using T = float;
  static float load(float v) { return v; }
  static float store(float v) { return v; }
};

struct BFloat16 {
  using T = uint16_t;
  static float load(uint16_t v) {
    const uint32_t bits = static_cast<uint32_t>(v) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
  }
  static uint16_t store(float f) {
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof bits);
    const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    return (bits & 0x7fffffffu) > 0x7f800000u ? uint16_t{0x7fc0} : static_cast<uint16_t>(rounded);
  }
};

struct Float16 {  // c10's conversions (not vectorized: float16 is rare on a CPU)
  using T = c10::Half;
  static float load(c10::Half v) { return static_cast<float>(v); }
  static c10::Half store(float f) { return c10::Half(f); }
};

// Runs f(S{}) for the storage type S of a float32, bfloat16 or float16 tensor.
template <typename F>
void dispatch(at::ScalarType type, const char* op, F&& f) {
  switch (type) {
    case at::kFloat: f(Float32{}); break;
    case at::kBFloat16: f(BFloat16{}); break;
    case at::kHalf: f(Float16{}); break;
    default: TORCH_CHECK(false, op, ": float32, bfloat16 or float16, got ", type);
  }
}

// x rounded to the storage dtype and back: where the torch code keeps an intermediate tensor.
template <typename S>
inline float round_to(float x) {
  return S::load(S::store(x));
}

// out = weight * round(x / rms(x)): x is read before out is written, so out may be x.
template <typename S, typename T = typename S::T>
inline void norm_row(const T* x, const T* weight, T* out, int64_t d, float eps) {
  float squares = 0.f;
#pragma omp simd reduction(+ : squares)
  for (int64_t i = 0; i < d; ++i) {
    const float v = S::load(x[i]);
    squares += v * v;
  }
  const float inv_rms = 1.f / std::sqrt(squares / static_cast<float>(d) + eps);
#pragma omp simd
  for (int64_t i = 0; i < d; ++i)
    out[i] = S::store(S::load(weight[i]) * round_to<S>(S::load(x[i]) * inv_rms));
}

template <typename F>
void over_rows(int64_t rows, int64_t dim, F&& f) {
  at::parallel_for(0, rows, std::max<int64_t>(1, GRAIN_ELEMENTS / std::max<int64_t>(dim, 1)), f);
}

void check_weight(const at::Tensor& weight, const at::Tensor& x, const char* op) {
  TORCH_CHECK(weight.dim() == 1 && weight.is_contiguous() && weight.size(0) == x.size(-1) &&
                  weight.scalar_type() == x.scalar_type(),
              op, ": weight must be contiguous [", x.size(-1), "] ", x.scalar_type(), ", got ",
              weight.sizes(), " ", weight.scalar_type());
}

// out = RMSNorm(x) (out may be x).
void rms_norm(at::Tensor out, const at::Tensor& x, const at::Tensor& weight, double eps) {
  const char* op = "rms_norm";
  check_same(out, x, op, "out and x");
  check_weight(weight, x, op);
  const Rows xs(x, op, "x"), outs(out, op, "out");
  dispatch(x.scalar_type(), op, [&](auto storage) {
    using S = decltype(storage);
    using T = typename S::T;
    const T* w = static_cast<const T*>(weight.data_ptr());
    over_rows(xs.count, xs.dim, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        norm_row<S>(xs.row<T>(r), w, outs.row<T>(r), xs.dim, static_cast<float>(eps));
    });
  });
}

// residual += x (rounded to the dtype, as torch's in-place add), then out = RMSNorm(residual).
// out may be x: a row of x is read whole before that row of out is written.
void add_rms_norm(at::Tensor out, at::Tensor residual, const at::Tensor& x,
                  const at::Tensor& weight, double eps) {
  const char* op = "add_rms_norm";
  check_same(out, x, op, "out and x");
  check_same(residual, x, op, "residual and x");
  check_weight(weight, x, op);
  const Rows xs(x, op, "x"), res(residual, op, "residual"), outs(out, op, "out");
  dispatch(x.scalar_type(), op, [&](auto storage) {
    using S = decltype(storage);
    using T = typename S::T;
    const T* w = static_cast<const T*>(weight.data_ptr());
    const int64_t d = xs.dim;
    over_rows(xs.count, d, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const T* xr = xs.row<T>(r);
        T* rr = res.row<T>(r);
#pragma omp simd
        for (int64_t i = 0; i < d; ++i)
          rr[i] = S::store(S::load(rr[i]) + S::load(xr[i]));
        norm_row<S>(rr, w, outs.row<T>(r), d, static_cast<float>(eps));
      }
    });
  });
}

// x [T, heads, D] rotated in place at positions [T] (int64) by the float32 tables cos, sin
// [max_positions, D] (rotate-half layout: i pairs with i + D/2). The table rows are rounded to
// x's dtype first, as the torch code casts them.
void rotary_embedding(at::Tensor x, const at::Tensor& positions, const at::Tensor& cos,
                      const at::Tensor& sin) {
  const char* op = "rotary_embedding";
  TORCH_CHECK(x.dim() == 3, op, ": x must be [T, heads, D], got ", x.sizes());
  const Rows xs(x, op, "x");
  const int64_t d = xs.dim, half = d / 2, heads = xs.inner;
  TORCH_CHECK(d % 2 == 0, op, ": head size ", d, " is odd");
  TORCH_CHECK(positions.dim() == 1 && positions.size(0) == x.size(0) &&
                  positions.scalar_type() == at::kLong && positions.is_contiguous(),
              op, ": positions must be contiguous int64 [", x.size(0), "], got ",
              positions.sizes(), " ", positions.scalar_type());
  for (const at::Tensor* t : {&cos, &sin})
    TORCH_CHECK(t->dim() == 2 && t->size(1) == d && t->scalar_type() == at::kFloat &&
                    t->is_contiguous(),
                op, ": cos and sin must be contiguous float32 [positions, ", d, "], got ",
                t->sizes(), " ", t->scalar_type());
  const int64_t* pos = positions.data_ptr<int64_t>();
  const int64_t table_rows = cos.size(0);
  for (int64_t t = 0; t < x.size(0); ++t)
    TORCH_CHECK(pos[t] >= 0 && pos[t] < table_rows, op, ": position ", pos[t], " of token ", t,
                " is outside the table's ", table_rows, " positions");
  const float* cos_table = cos.data_ptr<float>();
  const float* sin_table = sin.data_ptr<float>();
  dispatch(x.scalar_type(), op, [&](auto storage) {
    using S = decltype(storage);
    using T = typename S::T;
    over_rows(xs.count, d, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        T* row = xs.row<T>(r);
        const float* c = cos_table + pos[r / heads] * d;
        const float* s = sin_table + pos[r / heads] * d;
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = S::load(row[i]), x2 = S::load(row[i + half]);
          // x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1]; each product rounded
          const float lo = round_to<S>(x1 * round_to<S>(c[i])) +
                           round_to<S>(-x2 * round_to<S>(s[i]));
          const float hi = round_to<S>(x2 * round_to<S>(c[i + half])) +
                           round_to<S>(x1 * round_to<S>(s[i + half]));
          row[i] = S::store(lo);
          row[i + half] = S::store(hi);
        }
      }
    });
  });
}

// e^x over float32's range, vectorizable (std::exp is not, without -ffast-math): x = n ln2 + r,
// |r| <= ln2 / 2, e^r by a degree-6 Taylor polynomial (relative error < 2e-7), 2^n put in the
// exponent bits; above 88.7 it is +inf, below -87.3 about 1e-38 (silu's -x: x or 0 either way).
inline float exp_float(float x) {
  x = std::min(std::max(x, -87.3f), 88.8f);
  // nearbyint (the default rounding mode: to nearest), not floor(x + 0.5): GCC vectorizes it
  const float n = std::nearbyint(x * 1.44269504f);  // -126 .. 128 (128: 2^n is +inf)
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  const float e = 1.f + r * (1.f + r * (0.5f + r * (1.f / 6 + r * (1.f / 24 + r * (1.f / 120 +
                                                                                  r / 720.f)))));
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return e * scale;
}

// out [T, I] = silu(gate) * up for x [T, 2I] = [gate | up] (silu rounded to the dtype first, as
// F.silu's output is). out may be x's gate half (x[:, :I]).
void silu_and_mul(at::Tensor out, const at::Tensor& x) {
  const char* op = "silu_and_mul";
  TORCH_CHECK(x.dim() == 2 && out.dim() == 2 && x.size(1) % 2 == 0 &&
                  out.size(0) == x.size(0) && out.size(1) == x.size(1) / 2 &&
                  out.scalar_type() == x.scalar_type(),
              op, ": x [T, 2I] and out [T, I] of one dtype, got x ", x.sizes(), " ",
              x.scalar_type(), ", out ", out.sizes(), " ", out.scalar_type());
  const Rows xs(x, op, "x"), outs(out, op, "out");
  const int64_t width = outs.dim;
  dispatch(x.scalar_type(), op, [&](auto storage) {
    using S = decltype(storage);
    using T = typename S::T;
    over_rows(xs.count, xs.dim, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const T* gate = xs.row<T>(r);
        const T* up = gate + width;
        T* o = outs.row<T>(r);
#pragma omp simd
        for (int64_t i = 0; i < width; ++i) {
          const float g = S::load(gate[i]);
          o[i] = S::store(round_to<S>(g / (1.f + exp_float(-g))) * S::load(up[i]));
        }
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(seqpar_kernels, m) {
  m.def("rms_norm(Tensor(a!) out, Tensor x, Tensor weight, float eps) -> ()");
  m.def("add_rms_norm(Tensor(a!) out, Tensor(b!) residual, Tensor x, Tensor weight, float eps) "
        "-> ()");
  m.def("rotary_embedding(Tensor(a!) x, Tensor positions, Tensor cos, Tensor sin) -> ()");
  m.def("silu_and_mul(Tensor(a!) out, Tensor x) -> ()");
}

TORCH_LIBRARY_IMPL(seqpar_kernels, CPU, m) {
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("rotary_embedding", &rotary_embedding);
  m.impl("silu_and_mul", &silu_and_mul);
}
