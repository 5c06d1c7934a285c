// embedding_cpu.cpp -- see embedding_cpu.h.
//
// Plan: (1) a stable LSD radix sort of (row, lookup index) pairs on 32-bit keys; (2) the runs of
// equal rows are split into one contiguous range per thread; (3) each run's gradient rows are
// summed left to right, 16 or 8 lanes at a time, and consumed at once (written out, or applied to the
// row's weight and Adagrad state) without a [U, D] temporary. Rows are unique across runs, so
// threads never write the same row and the bits do not depend on the thread count. The table
// rows of the runs ahead are prefetched: the step is bound by random row reads, not arithmetic.
#include "embedding_cpu.h"

#include <math.h>

#include <algorithm>
#include <atomic>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
// GCC 12's own AVX-512 headers trip this (the _mm512_undefined_* idiom in the masked loads)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define FASTKD_HAVE_SIMD_PATHS 1
#define FASTKD_AVX512 __attribute__((target("avx512f")))
#define FASTKD_AVX2 __attribute__((target("avx2,fma")))
#endif

namespace fastkd {
namespace {

constexpr int RADIX_BITS = 11;
constexpr uint32_t RADIX = 1u << RADIX_BITS;
// Runs looked ahead for prefetching (a row of 64 floats is 4 cache lines).
constexpr int64_t PREFETCH_RUNS = 8;
// Below this many lookups per thread a thread costs more to start (~20 us) than it saves.
constexpr int64_t MIN_LOOKUPS_PER_THREAD = 16384;

enum Op : int { OP_MERGE = 0, OP_SGD = 1, OP_ADAGRAD = 2 };

int best_simd_level() {
#if defined(FASTKD_HAVE_SIMD_PATHS)
  if (__builtin_cpu_supports("avx512f")) return SIMD_AVX512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return SIMD_AVX2;
#endif
  return SIMD_PORTABLE;
}

std::atomic<int> g_simd{best_simd_level()};

struct Job {
  const SortedRows* s;
  const float* grad;  // [n, dim]
  int64_t dim;
  int64_t* out_rows;  // OP_MERGE: [U]
  float* out;         // OP_MERGE: merged [U, dim]; else the weight [num_rows, dim]
  float* state;       // OP_ADAGRAD: [num_rows, dim]
  float lr, eps;
};

inline void prefetch_row(const float* p, int64_t dim, bool write) {
  for (int64_t d = 0; d < dim; d += 16) {
    if (write)
      __builtin_prefetch(p + d, 1, 1);
    else
      __builtin_prefetch(p + d, 0, 1);
  }
}

inline void prefetch_run(const Job& j, int64_t u, int op) {
  const SortedRows& s = *j.s;
  const int64_t b = s.starts[u];
  prefetch_row(j.grad + (int64_t)s.idx[b] * j.dim, j.dim, false);
  if (op != OP_MERGE) prefetch_row(j.out + (int64_t)s.keys[b] * j.dim, j.dim, true);
  if (op == OP_ADAGRAD) prefetch_row(j.state + (int64_t)s.keys[b] * j.dim, j.dim, true);
}

// Portable loops: one run at a time through a dim-sized scratch row.
template <int OP>
void runs_scalar(const Job& j, int64_t u0, int64_t u1) {
  const SortedRows& s = *j.s;
  const int64_t dim = j.dim;
  std::vector<float> scratch(dim);
  for (int64_t u = u0; u < u1; ++u) {
    if (u + PREFETCH_RUNS < u1) prefetch_run(j, u + PREFETCH_RUNS, OP);
    const int64_t a = s.starts[u], e = s.starts[u + 1];
    const int64_t row = s.keys[a];
    float* __restrict acc = OP == OP_MERGE ? j.out + u * dim : scratch.data();
    // Sums start from +0, as embedding_bag's do: a lone -0.0 gradient comes out as +0.0
    const float* __restrict first = j.grad + (int64_t)s.idx[a] * dim;
    for (int64_t d = 0; d < dim; ++d) acc[d] = 0.0f + first[d];
    for (int64_t k = a + 1; k < e; ++k) {
      const float* __restrict src = j.grad + (int64_t)s.idx[k] * dim;
      for (int64_t d = 0; d < dim; ++d) acc[d] += src[d];
    }
    if (OP == OP_MERGE) {
      j.out_rows[u] = row;
      continue;
    }
    float* __restrict w = j.out + row * dim;
    if (OP == OP_SGD) {
      for (int64_t d = 0; d < dim; ++d) w[d] = fmaf(-j.lr, acc[d], w[d]);
    } else {
      float* __restrict st = j.state + row * dim;
      for (int64_t d = 0; d < dim; ++d) {
        const float g = acc[d];
        const float sv = st[d] + g * g;  // built with -ffp-contract=off: g*g rounds first
        st[d] = sv;
        w[d] = fmaf(-j.lr, g / (sqrtf(sv) + j.eps), w[d]);
      }
    }
  }
}

#if defined(FASTKD_HAVE_SIMD_PATHS)
// The same arithmetic 16 lanes at a time (lane-wise, so the same bits): each 16-wide slice of a
// row is summed over the run and applied before the next slice, with no scratch row.
template <int OP>
FASTKD_AVX512 void runs_avx512(const Job& j, int64_t u0, int64_t u1) {
  const SortedRows& s = *j.s;
  const int64_t dim = j.dim;
  const __m512 neg_lr = _mm512_set1_ps(-j.lr), eps = _mm512_set1_ps(j.eps);
  for (int64_t u = u0; u < u1; ++u) {
    if (u + PREFETCH_RUNS < u1) prefetch_run(j, u + PREFETCH_RUNS, OP);
    const int64_t a = s.starts[u], e = s.starts[u + 1];
    const int64_t row = s.keys[a];
    const float* g0 = j.grad + (int64_t)s.idx[a] * dim;
    float* dst = OP == OP_MERGE ? j.out + u * dim : j.out + row * dim;
    float* st = OP == OP_ADAGRAD ? j.state + row * dim : nullptr;
    for (int64_t d = 0; d < dim; d += 16) {
      const __mmask16 m = dim - d >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (dim - d)) - 1);
      __m512 g = _mm512_add_ps(_mm512_setzero_ps(), _mm512_maskz_loadu_ps(m, g0 + d));  // from +0
      for (int64_t k = a + 1; k < e; ++k)
        g = _mm512_add_ps(g, _mm512_maskz_loadu_ps(m, j.grad + (int64_t)s.idx[k] * dim + d));
      if (OP == OP_MERGE) {
        _mm512_mask_storeu_ps(dst + d, m, g);
        continue;
      }
      if (OP == OP_ADAGRAD) {
        const __m512 sv = _mm512_add_ps(_mm512_maskz_loadu_ps(m, st + d), _mm512_mul_ps(g, g));
        _mm512_mask_storeu_ps(st + d, m, sv);
        g = _mm512_div_ps(g, _mm512_add_ps(_mm512_sqrt_ps(sv), eps));
      }
      _mm512_mask_storeu_ps(dst + d, m, _mm512_fmadd_ps(neg_lr, g, _mm512_maskz_loadu_ps(m, dst + d)));
    }
    if (OP == OP_MERGE) j.out_rows[u] = row;
  }
}

template <bool TAIL>
FASTKD_AVX2 inline __m256 load8(const float* p, __m256i m) {
  return TAIL ? _mm256_maskload_ps(p, m) : _mm256_loadu_ps(p);
}

template <bool TAIL>
FASTKD_AVX2 inline void store8(float* p, __m256i m, __m256 v) {
  if (TAIL)
    _mm256_maskstore_ps(p, m, v);
  else
    _mm256_storeu_ps(p, v);
}

// 8 lanes of a row: full blocks use plain loads and stores (AVX2's masked stores are slow);
// only a row's last, partial block is masked.
template <int OP, bool TAIL>
FASTKD_AVX2 inline void block_avx2(const Job& j, const uint32_t* idx, int64_t len, const float* g0, float* dst,
                                   float* st, int64_t d, __m256i m, __m256 neg_lr, __m256 eps) {
  const int64_t dim = j.dim;
  __m256 g = _mm256_add_ps(_mm256_setzero_ps(), load8<TAIL>(g0 + d, m));  // sums start from +0
  for (int64_t k = 1; k < len; ++k) g = _mm256_add_ps(g, load8<TAIL>(j.grad + (int64_t)idx[k] * dim + d, m));
  if (OP == OP_MERGE) {
    store8<TAIL>(dst + d, m, g);
    return;
  }
  if (OP == OP_ADAGRAD) {
    const __m256 sv = _mm256_add_ps(load8<TAIL>(st + d, m), _mm256_mul_ps(g, g));
    store8<TAIL>(st + d, m, sv);
    g = _mm256_div_ps(g, _mm256_add_ps(_mm256_sqrt_ps(sv), eps));
  }
  store8<TAIL>(dst + d, m, _mm256_fmadd_ps(neg_lr, g, load8<TAIL>(dst + d, m)));
}

// The same again 8 lanes wide for CPUs with AVX2 and FMA but no AVX-512.
template <int OP>
FASTKD_AVX2 void runs_avx2(const Job& j, int64_t u0, int64_t u1) {
  const SortedRows& s = *j.s;
  const int64_t dim = j.dim;
  const __m256 neg_lr = _mm256_set1_ps(-j.lr), eps = _mm256_set1_ps(j.eps);
  const __m256i tail = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(dim % 8)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  const int64_t full = dim - dim % 8;
  for (int64_t u = u0; u < u1; ++u) {
    if (u + PREFETCH_RUNS < u1) prefetch_run(j, u + PREFETCH_RUNS, OP);
    const int64_t a = s.starts[u], len = s.starts[u + 1] - a;
    const int64_t row = s.keys[a];
    const uint32_t* idx = s.idx.data() + a;
    const float* g0 = j.grad + (int64_t)idx[0] * dim;
    float* dst = OP == OP_MERGE ? j.out + u * dim : j.out + row * dim;
    float* st = OP == OP_ADAGRAD ? j.state + row * dim : nullptr;
    for (int64_t d = 0; d < full; d += 8) block_avx2<OP, false>(j, idx, len, g0, dst, st, d, tail, neg_lr, eps);
    if (full < dim) block_avx2<OP, true>(j, idx, len, g0, dst, st, full, tail, neg_lr, eps);
    if (OP == OP_MERGE) j.out_rows[u] = row;
  }
}
#endif

template <int OP>
void runs(const Job& j, int64_t u0, int64_t u1) {
#if defined(FASTKD_HAVE_SIMD_PATHS)
  const int level = g_simd.load(std::memory_order_relaxed);
  if (level == SIMD_AVX512) return runs_avx512<OP>(j, u0, u1);
  if (level == SIMD_AVX2) return runs_avx2<OP>(j, u0, u1);
#endif
  runs_scalar<OP>(j, u0, u1);
}

template <int OP>
void run_parallel(const Job& j, int num_threads) {
  const int64_t U = j.s->num_unique();
  const int64_t n = j.s->keys.size();
  int64_t nt = std::max<int64_t>(1, std::min<int64_t>(num_threads, n / MIN_LOOKUPS_PER_THREAD));
  nt = std::min<int64_t>(nt, std::max<int64_t>(U, 1));
  if (nt <= 1) return runs<OP>(j, 0, U);
  std::vector<std::thread> pool;
  pool.reserve(nt - 1);
  int64_t t = 1;
  try {
    for (; t < nt; ++t) pool.emplace_back(runs<OP>, std::cref(j), U * t / nt, U * (t + 1) / nt);
  } catch (const std::system_error&) {
    // No thread to be had (a process limit): the calling thread takes the ranges left over.
    // The ranges are disjoint sets of rows, so the result is the same.
    for (; t < nt; ++t) runs<OP>(j, U * t / nt, U * (t + 1) / nt);
  }
  runs<OP>(j, 0, U / nt);
  for (auto& th : pool) th.join();
}

}  // namespace

void sort_rows_cpu(const int64_t* rows, int64_t n, int64_t num_rows, SortedRows& s) {
  s.keys.resize(n);
  s.idx.resize(n);
  // One unsigned compare also catches negative ids; the first bad lookup is named after the loop
  // so that the copy stays branch-light.
  bool bad = false;
  for (int64_t i = 0; i < n; ++i) {
    bad |= (uint64_t)rows[i] >= (uint64_t)num_rows;
    s.keys[i] = (uint32_t)rows[i];
    s.idx[i] = (uint32_t)i;
  }
  if (bad) {
    int64_t i = 0;
    while ((uint64_t)rows[i] < (uint64_t)num_rows) ++i;
    throw std::out_of_range("row id " + std::to_string(rows[i]) + " at lookup " + std::to_string(i) +
                            " is outside the table's " + std::to_string(num_rows) + " rows");
  }
  int bits = 0;
  while (bits < 32 && (uint64_t(1) << bits) < (uint64_t)num_rows) ++bits;
  std::vector<uint32_t> k2(n), i2(n);
  std::vector<int64_t> count(RADIX);
  for (int shift = 0; shift < bits; shift += RADIX_BITS) {
    std::fill(count.begin(), count.end(), 0);
    for (int64_t i = 0; i < n; ++i) ++count[(s.keys[i] >> shift) & (RADIX - 1)];
    int64_t pos = 0;
    for (uint32_t b = 0; b < RADIX; ++b) {
      const int64_t c = count[b];
      count[b] = pos;
      pos += c;
    }
    for (int64_t i = 0; i < n; ++i) {
      const int64_t p = count[(s.keys[i] >> shift) & (RADIX - 1)]++;
      k2[p] = s.keys[i];
      i2[p] = s.idx[i];
    }
    s.keys.swap(k2);
    s.idx.swap(i2);
  }
  s.starts.clear();
  s.starts.reserve(n + 1);
  for (int64_t i = 0; i < n; ++i)
    if (i == 0 || s.keys[i] != s.keys[i - 1]) s.starts.push_back(i);
  s.starts.push_back(n);
}

void merge_rows_cpu(const SortedRows& s, const float* grad, int64_t dim, int64_t* out_rows, float* out_merged,
                    int num_threads) {
  if (s.num_unique() == 0 || dim <= 0) return;
  const Job j{&s, grad, dim, out_rows, out_merged, nullptr, 0.f, 0.f};
  run_parallel<OP_MERGE>(j, num_threads);
}

void fused_update_cpu(const SortedRows& s, const float* grad, int64_t dim, float* weight, float* state, float lr,
                      float eps, int num_threads) {
  if (s.num_unique() == 0 || dim <= 0) return;
  const Job j{&s, grad, dim, nullptr, weight, state, lr, eps};
  if (state == nullptr)
    run_parallel<OP_SGD>(j, num_threads);
  else
    run_parallel<OP_ADAGRAD>(j, num_threads);
}

int set_simd_level(int level) {
  const int l = std::max<int>(SIMD_PORTABLE, std::min<int>(level, best_simd_level()));
  g_simd.store(l);
  return l;
}

int simd_level() { return g_simd.load(); }

}  // namespace fastkd
