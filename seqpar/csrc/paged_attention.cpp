// Varlen causal attention that reads a paged KV pool in place (CPU), for layers/attention.py.
//
// One call serves a step's mixed batch: sequence b's query rows are q[qsl[b]:qsl[b+1]] (one row
// for a decode, a chunk for a prefill), and its keys are the first seq_lens[b] positions of its
// blocks, block_tables[b][p / block_size] at offset p % block_size of the pool. Row i of a chunk
// of n sits at position seq_lens[b] - n + i and sees keys (position - window, position].
//
// Work is split into items (sequence, KV head, tile of up to TILE query rows, part of the keys).
// An item loads the query rows of every query head that shares its KV head (GQA / MQA: each key
// is read once for the whole group, no KV repeat), walks its blocks in order with an online
// softmax, and either writes the finished rows or, when the keys were split into parts (a batch
// too small to keep every thread busy), a partial (max, sum, weighted values) that a second pass
// merges. Arithmetic is float32 whatever the storage (bf16 is widened by a shift), so the kernel
// needs no native bf16; layers/attention_kernels.py builds it for the host's vector units.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int64_t TILE = 16;  // query rows per item of a prefill chunk
constexpr int64_t MIN_PART_BLOCKS = 8;  // a key part spans at least this many blocks

struct Item {
  int64_t seq, kv_head, row_lo, row_hi;  // rows of the sequence's chunk, [row_lo, row_hi)
  int64_t key_lo, key_hi;  // key positions this item reads, [key_lo, key_hi)
  int64_t partial;  // offset of its partial results in the scratch, -1: writes `out` directly
};

struct Group {  // the items that split one (sequence, KV head, tile)'s keys
  int64_t first, count;
};

template <typename T>
inline void widen(const T* __restrict__ src, float* __restrict__ dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// exp(x) for x <= 0 (scores minus their running max), vectorizable: x = n ln2 + r with |r| <=
// ln2 / 2, e^r by its degree-6 Taylor polynomial (relative error < 2e-7), times 2^n built in the
// exponent bits. Below -87 it returns about 1e-38 (callers zero masked keys themselves).
#pragma omp declare simd
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.f);
  const float n = std::floor(x * 1.44269504f + 0.5f);
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // ln2 in two parts
  float e = 1.f / 720;
  e = e * r + 1.f / 120;
  e = e * r + 1.f / 24;
  e = e * r + 1.f / 6;
  e = e * r + 0.5f;
  e = e * r + 1.f;
  e = e * r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return e * scale;
}

inline float dot(const float* __restrict__ a, const float* __restrict__ b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

struct Params {
  int64_t heads, kv_heads, group, dim, block_size, window, table_stride;
  int64_t q_row_stride, q_head_stride;
  float scale;
  const int32_t *qsl, *seq_lens, *tables;
};

// One item: its query vectors against its keys. Leaves per row r (of R = rows x group) the
// running max m[r], the sum of exp l[r] and the weighted values acc[r][0:D].
template <typename T>
void attend_item(const Params& p, const Item& it, const T* q, const T* k_cache, const T* v_cache,
                 std::vector<float>& qf, std::vector<float>& acc, std::vector<float>& m,
                 std::vector<float>& l, std::vector<float>& kf, std::vector<float>& vf,
                 std::vector<float>& kt, std::vector<float>& s) {
  const int64_t D = p.dim, g = p.group, bs = p.block_size;
  const int64_t rows = it.row_hi - it.row_lo, R = rows * g;
  const int64_t first_row = p.qsl[it.seq];
  const int64_t n = p.qsl[it.seq + 1] - first_row;
  const int64_t pos0 = p.seq_lens[it.seq] - n;  // position of the chunk's first row
  qf.resize(R * D);
  acc.assign(R * D, 0.f);
  m.assign(R, -std::numeric_limits<float>::infinity());
  l.assign(R, 0.f);
  kf.resize(bs * D);
  vf.resize(bs * D);
  kt.resize(bs * D);
  s.resize(R * bs);
  // Query vector r = (row i, head h of the group): q[first_row + row_lo + i][kv_head * g + h].
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t h = 0; h < g; ++h) {
      const T* src = q + (first_row + it.row_lo + i) * p.q_row_stride +
                     (it.kv_head * g + h) * p.q_head_stride;
      float* dst = qf.data() + (i * g + h) * D;
      widen(src, dst, D);
      for (int64_t d = 0; d < D; ++d) dst[d] *= p.scale;
    }
  const int32_t* table = p.tables + it.seq * p.table_stride;
  const int64_t token_stride = p.kv_heads * D;  // between two slots of the pool
  for (int64_t blk = it.key_lo / bs; blk * bs < it.key_hi; ++blk) {
    const int64_t lo = std::max(it.key_lo, blk * bs), hi = std::min(it.key_hi, (blk + 1) * bs);
    const int64_t nk = hi - lo, off = lo - blk * bs;
    const int64_t base = (static_cast<int64_t>(table[blk]) * bs + off) * token_stride +
                         it.kv_head * D;
    for (int64_t j = 0; j < nk; ++j) {
      widen(k_cache + base + j * token_stride, kf.data() + j * D, D);
      widen(v_cache + base + j * token_stride, vf.data() + j * D, D);
    }
    // Scores s [R][nk]. Many rows against a full block of 16: keys transposed once, [D][16],
    // then each row's 16 scores are D broadcast multiply-adds in one vector register (no
    // horizontal sum per key). Few rows (a decode's group): one dot product per key.
    const bool tiled = bs == 16 && nk == 16 && R >= 8;
    if (tiled) {
      for (int64_t j = 0; j < 16; ++j)
        for (int64_t d = 0; d < D; ++d) kt[d * 16 + j] = kf[j * D + d];
      for (int64_t r = 0; r < R; ++r) {
        float lanes[16] = {};
        const float* __restrict__ qr = qf.data() + r * D;
        for (int64_t d = 0; d < D; ++d) {
          const float qd = qr[d];
#pragma omp simd
          for (int64_t j = 0; j < 16; ++j) lanes[j] += qd * kt[d * 16 + j];
        }
        std::copy(lanes, lanes + 16, s.data() + r * nk);
      }
    } else {
      for (int64_t r = 0; r < R; ++r)
        for (int64_t j = 0; j < nk; ++j)
          s[r * nk + j] = dot(qf.data() + r * D, kf.data() + j * D, D);
    }
    for (int64_t r = 0; r < R; ++r) {
      const int64_t pos = pos0 + it.row_lo + r / g;
      float* sr = s.data() + r * nk;
      float block_max = -std::numeric_limits<float>::infinity();
      // Keys this row sees: positions (pos - window, pos].
      const int64_t first = p.window > 0 ? std::max(lo, pos - p.window + 1) : lo;
      const int64_t last = std::min(hi - 1, pos);
      if (first > last) continue;  // nothing visible to this row in this block
      for (int64_t j = first - lo; j <= last - lo; ++j) block_max = std::max(block_max, sr[j]);
      const float m_new = std::max(m[r], block_max);
      const float correction = std::exp(m[r] - m_new);  // 0 on the first visible block
      float* ar = acc.data() + r * D;
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j < nk; ++j) {
        const bool seen = lo + j >= first && lo + j <= last;
        sr[j] = seen ? exp_nonpositive(sr[j] - m_new) : 0.f;
        sum += sr[j];
      }
#pragma omp simd
      for (int64_t d = 0; d < D; ++d) ar[d] *= correction;
      for (int64_t j = 0; j < nk; ++j) {
        const float w = sr[j];
        const float* vj = vf.data() + j * D;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) ar[d] += w * vj[d];
      }
      l[r] = l[r] * correction + sum;
      m[r] = m_new;
    }
  }
}

template <typename T>
void run(const Params& p, const std::vector<Item>& items, const std::vector<Group>& groups,
         int64_t scratch_floats, const T* q, const T* k_cache, const T* v_cache, T* out) {
  const int64_t D = p.dim, g = p.group;
  std::vector<float> scratch(scratch_floats);
  auto out_row = [&](const Item& it, int64_t r) {  // query vector r of an item -> its out row
    const int64_t row = p.qsl[it.seq] + it.row_lo + r / g;
    return out + (row * p.heads + it.kv_head * g + r % g) * D;
  };
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf, acc, m, l, kf, vf, kt, s;
    for (int64_t i = begin; i < end; ++i) {
      const Item& it = items[i];
      attend_item(p, it, q, k_cache, v_cache, qf, acc, m, l, kf, vf, kt, s);
      const int64_t R = (it.row_hi - it.row_lo) * g;
      if (it.partial < 0) {
        for (int64_t r = 0; r < R; ++r) {
          T* o = out_row(it, r);
          const float inv = 1.f / l[r];  // every row sees at least its own key
          for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(acc[r * D + d] * inv);
        }
      } else {  // [R] max, [R] sum, [R, D] weighted values
        float* dst = scratch.data() + it.partial;
        std::copy(m.begin(), m.end(), dst);
        std::copy(l.begin(), l.end(), dst + R);
        std::copy(acc.begin(), acc.end(), dst + 2 * R);
      }
    }
  });
  if (groups.empty()) return;
  at::parallel_for(0, static_cast<int64_t>(groups.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> merged(D);
    for (int64_t gi = begin; gi < end; ++gi) {
      const Group& grp = groups[gi];
      const Item& head = items[grp.first];
      const int64_t R = (head.row_hi - head.row_lo) * g;
      for (int64_t r = 0; r < R; ++r) {
        float top = -std::numeric_limits<float>::infinity();
        for (int64_t c = 0; c < grp.count; ++c)
          top = std::max(top, scratch[items[grp.first + c].partial + r]);
        float total = 0.f;
        std::fill(merged.begin(), merged.end(), 0.f);
        for (int64_t c = 0; c < grp.count; ++c) {
          const float* part = scratch.data() + items[grp.first + c].partial;
          const float w = std::exp(part[r] - top);  // 0 for a part with no visible key
          total += w * part[R + r];
          const float* a = part + 2 * R + r * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) merged[d] += w * a[d];
        }
        T* o = out_row(head, r);
        const float inv = 1.f / total;
        for (int64_t d = 0; d < D; ++d) o[d] = static_cast<T>(merged[d] * inv);
      }
    }
  });
}

void paged_attention(at::Tensor& out, const at::Tensor& q, const at::Tensor& k_cache,
                     const at::Tensor& v_cache, const at::Tensor& query_start_loc,
                     const at::Tensor& seq_lens, const at::Tensor& block_tables, int64_t window,
                     double scale) {
  TORCH_CHECK(q.dim() == 3 && q.stride(2) == 1, "paged_attention: q must be [T, heads, D] with "
              "contiguous rows, got shape ", q.sizes(), " strides ", q.strides());
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.is_contiguous() && v_cache.sizes() == k_cache.sizes()
              && v_cache.is_contiguous(), "paged_attention: k_cache and v_cache must be contiguous "
              "[num_blocks, block_size, kv_heads, D], got ", k_cache.sizes(), " and ",
              v_cache.sizes());
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && v_cache.scalar_type() == q.scalar_type()
              && out.scalar_type() == q.scalar_type(), "paged_attention: q, caches and out must "
              "share a dtype, got ", q.scalar_type(), ", ", k_cache.scalar_type(), ", ",
              v_cache.scalar_type(), ", ", out.scalar_type());
  TORCH_CHECK(out.sizes() == q.sizes() && out.is_contiguous(),
              "paged_attention: out must be contiguous and shaped like q ", q.sizes());
  const int64_t heads = q.size(1), kv_heads = k_cache.size(2), dim = q.size(2);
  TORCH_CHECK(k_cache.size(3) == dim && heads % kv_heads == 0, "paged_attention: q [T, ", heads,
              ", ", dim, "] does not fit a cache of ", kv_heads, " KV heads of dim ",
              k_cache.size(3));
  for (const at::Tensor* t : {&query_start_loc, &seq_lens, &block_tables})
    TORCH_CHECK(t->scalar_type() == at::kInt && t->is_contiguous(),
                "paged_attention: query_start_loc, seq_lens and block_tables must be contiguous "
                "int32 tensors");
  const int64_t B = seq_lens.size(0);
  TORCH_CHECK(query_start_loc.size(0) == B + 1 && block_tables.dim() == 2 &&
              block_tables.size(0) == B, "paged_attention: ", B, " sequences but query_start_loc ",
              query_start_loc.sizes(), " and block_tables ", block_tables.sizes());
  const int32_t* qsl = query_start_loc.data_ptr<int32_t>();
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  TORCH_CHECK(qsl[0] == 0 && qsl[B] == q.size(0), "paged_attention: query_start_loc must run "
              "from 0 to the ", q.size(0), " query rows, got ", qsl[0], "..", qsl[B]);
  const int64_t bs = k_cache.size(1);
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = qsl[b + 1] - qsl[b];
    TORCH_CHECK(n >= 1 && lens[b] >= n && (lens[b] + bs - 1) / bs <= block_tables.size(1),
                "paged_attention: sequence ", b, " has ", n, " query rows, ", lens[b],
                " keys and a table of ", block_tables.size(1), " blocks of ", bs);
  }

  Params p{heads, kv_heads, heads / kv_heads, dim, bs, window, block_tables.size(1),
           q.stride(0), q.stride(1), static_cast<float>(scale), qsl, lens,
           block_tables.data_ptr<int32_t>()};
  // Items without splitting; when they are too few to keep every thread busy, each one's keys
  // are cut into parts of at least MIN_PART_BLOCKS blocks.
  int64_t base = 0;
  for (int64_t b = 0; b < B; ++b) base += kv_heads * ((qsl[b + 1] - qsl[b] + TILE - 1) / TILE);
  const int64_t want = 4 * at::get_num_threads();
  const int64_t parts = base >= want ? 1 : (want + base - 1) / base;
  std::vector<Item> items;
  std::vector<Group> groups;
  int64_t scratch = 0;
  for (int64_t b = 0; b < B; ++b) {
    const int64_t n = qsl[b + 1] - qsl[b], pos0 = lens[b] - n;
    for (int64_t h = 0; h < kv_heads; ++h)
      for (int64_t lo = 0; lo < n; lo += TILE) {
        const int64_t hi = std::min(n, lo + TILE);
        const int64_t key_hi = pos0 + hi;  // the tile's last row sees up to its own position
        const int64_t key_lo = window > 0 ? std::max<int64_t>(0, pos0 + lo - window + 1) : 0;
        const int64_t span = key_hi - key_lo;
        int64_t part = (span + parts - 1) / parts;
        part = std::max((part + bs - 1) / bs, MIN_PART_BLOCKS) * bs;
        if (part >= span) {
          items.push_back({b, h, lo, hi, key_lo, key_hi, -1});
          continue;
        }
        groups.push_back({static_cast<int64_t>(items.size()), 0});
        const int64_t R = (hi - lo) * p.group;
        for (int64_t k = key_lo; k < key_hi; k += part) {
          items.push_back({b, h, lo, hi, k, std::min(key_hi, k + part), scratch});
          scratch += R * (dim + 2);
          ++groups.back().count;
        }
      }
  }
  if (q.scalar_type() == at::kFloat) {
    run<float>(p, items, groups, scratch, q.data_ptr<float>(), k_cache.data_ptr<float>(),
               v_cache.data_ptr<float>(), out.data_ptr<float>());
  } else {
    TORCH_CHECK(q.scalar_type() == at::kBFloat16, "paged_attention: float32 or bfloat16, got ",
                q.scalar_type());
    using bf16 = c10::BFloat16;
    run<bf16>(p, items, groups, scratch, q.data_ptr<bf16>(), k_cache.data_ptr<bf16>(),
              v_cache.data_ptr<bf16>(), out.data_ptr<bf16>());
  }
}

}  // namespace

TORCH_LIBRARY(seqpar_kernels, m) {
  m.def("paged_attention(Tensor(a!) out, Tensor q, Tensor k_cache, Tensor v_cache, "
        "Tensor query_start_loc, Tensor seq_lens, Tensor block_tables, int window, float scale) "
        "-> ()");
}

TORCH_LIBRARY_IMPL(seqpar_kernels, CPU, m) { m.impl("paged_attention", &paged_attention); }
