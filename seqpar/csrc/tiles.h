// The work split shared by seqpar's matmul kernels (gguf_matmul.cpp, int8_matmul.cpp).
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

// Calls f.template operator()<TM, TN>(m0, n0) for every tile of y [M, N]: TM activation rows from
// m0 by TN weight rows from n0, MR x NR where they fit, then 1 x NR, then 1 x 1 at the edges.
// Threads split the weight rows (each reads only its share of the weights); each thread walks
// the activation rows MC at a time, so that those stay in L1 while it walks its weight rows.
template <int64_t MR, int64_t NR, int64_t MC, typename F>
void for_each_tile(int64_t M, int64_t N, const F& f) {
  at::parallel_for(0, (N + NR - 1) / NR, 1, [&](int64_t begin, int64_t end) {
    for (int64_t mc = 0; mc < M; mc += MC) {
      const int64_t mhi = std::min(M, mc + MC);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n0 = t * NR;
        if (n0 + NR > N) {  // the last weight rows, one at a time
          for (int64_t n = n0; n < N; ++n)
            for (int64_t i = mc; i < mhi; ++i) f.template operator()<1, 1>(i, n);
          continue;
        }
        int64_t i = mc;
        for (; i + MR <= mhi; i += MR) f.template operator()<MR, NR>(i, n0);
        for (; i < mhi; ++i) f.template operator()<1, NR>(i, n0);
      }
    }
  });
}
