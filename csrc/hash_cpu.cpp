// hash_cpu.cpp -- multi-threaded CPU hashing of string/int columns into bucket ids.
//
// Work split: the rows 0..n_rows-1 are cut into one contiguous range per thread. A thread walks its
// range in tiles of TILE_ROWS rows and, inside a tile, hashes every column; with many columns
// writing into one row-major [N, F] output this keeps the tile's output rows in cache instead of
// streaming the whole output once per field.
#include "hash_cpu.h"

#include <algorithm>
#include <atomic>
#include <thread>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
// GCC 12's own AVX-512 headers trip this (the _mm512_undefined_* idiom); nothing here is uninitialised
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#define FASTKD_HAVE_AVX512_PATH 1
#define FASTKD_AVX512 __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw")))
#endif

namespace fastkd {
namespace {

// Runtime switch for the AVX-512 paths (on when the CPU has them; tests turn it off to compare).
std::atomic<bool> g_simd{
#if defined(FASTKD_HAVE_AVX512_PATH)
    __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
    __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw")
#else
    false
#endif
};

constexpr int64_t TILE_ROWS = 1024;
// Below this many rows a thread costs more to start (~20 us) than it saves.
constexpr int64_t MIN_ROWS_PER_THREAD = 32768;

inline bool bit_set(const uint8_t* bitmap, int64_t i) { return (bitmap[i >> 3] >> (i & 7)) & 1; }

// Rows [b, e) of one chunk (chunk-local indices); out points at the chunk's row 0.
// NULLS: the chunk has a validity bitmap (a separate instantiation keeps the common no-null loop tight).
template <int ALGO, int MODE, int KIND, bool NULLS>
void run_chunk(const Chunk& chunk, int64_t b, int64_t e, int64_t* out, int64_t stride, uint64_t seed,
               const FastMod& fm_ref) {
  static const uint8_t kEmpty[1] = {0};
  // local copies: stores through the int64_t* out may alias uint64_t fields, which would force a
  // reload of the divisor and the buffer pointers on every row
  const FastMod fm = fm_ref;
  const Chunk c = chunk;
  for (int64_t i = b; i < e; ++i) {
    const bool valid = !NULLS || bit_set(c.validity, c.validity_offset + i);
    uint64_t h;
    bool missing;
    if constexpr (KIND == KIND_INT64) {
      uint64_t v;
      memcpy(&v, c.data + 8 * i, 8);
      missing = !valid;
      h = valid ? hash_int<ALGO>(v, seed) : hash_bytes<ALGO>(kEmpty, 0, seed);
    } else {
      const uint8_t* p;
      int64_t len;
      if constexpr (KIND == KIND_OFFSETS32) {
        const int32_t* o = static_cast<const int32_t*>(c.offsets);
        p = c.data + o[i];
        len = (int64_t)o[i + 1] - o[i];
      } else if constexpr (KIND == KIND_OFFSETS64) {
        const int64_t* o = static_cast<const int64_t*>(c.offsets);
        p = c.data + o[i];
        len = o[i + 1] - o[i];
      } else if constexpr (KIND == KIND_VIEWS) {
        p = c.ptrs[i];
        len = c.lens[i];
      } else {  // KIND_FIXED: numpy drops trailing NULs from 'S' items, so do we
        p = c.data + c.itemsize * i;
        len = c.itemsize;
        while (len > 0 && p[len - 1] == 0) --len;
      }
      if ((NULLS && !valid) || (KIND == KIND_VIEWS && len < 0)) len = 0, p = kEmpty;
      missing = len == 0;
      h = hash_bytes<ALGO>(p, (uint64_t)len, seed);
    }
    out[i * stride] = bucket<MODE>(h, missing, fm);
  }
}

#if defined(FASTKD_HAVE_AVX512_PATH)
// ---------------------------------------------------------------------------------------------
// AVX-512: XXH3 of 8 values at once for the two common shapes, int64 ids and 4..8-byte strings
// (one XXH3 branch, xxh3_4to8). Same arithmetic as fastkd_hash.h lane by lane; tests compare
// both paths with each other and with xxhash.
// ---------------------------------------------------------------------------------------------
FASTKD_AVX512 inline __m512i mulhi_u64x8(__m512i a, __m512i b) {
  // 64x64 -> high 64 bits from four 32x32 -> 64 partial products
  const __m512i lo32 = _mm512_set1_epi64(0xFFFFFFFFLL);
  const __m512i a_hi = _mm512_srli_epi64(a, 32), b_hi = _mm512_srli_epi64(b, 32);
  const __m512i ll = _mm512_mul_epu32(a, b), lh = _mm512_mul_epu32(a, b_hi);
  const __m512i hl = _mm512_mul_epu32(a_hi, b), hh = _mm512_mul_epu32(a_hi, b_hi);
  const __m512i mid = _mm512_add_epi64(_mm512_add_epi64(_mm512_srli_epi64(ll, 32), _mm512_and_si512(lh, lo32)),
                                       _mm512_and_si512(hl, lo32));
  return _mm512_add_epi64(_mm512_add_epi64(hh, _mm512_srli_epi64(lh, 32)),
                          _mm512_add_epi64(_mm512_srli_epi64(hl, 32), _mm512_srli_epi64(mid, 32)));
}

// Divisors in (2^13, 2^52) take a double-precision quotient estimate: x / d is below 2^51, so the
// rounded product x * (1/d) (relative error < 3.1 * 2^-53) is within 0.78 of the true quotient q and
// trunc() - 1 lies in [q - 2, q]; from r = x - (trunc - 1) d in [0, 3d) two conditional subtractions
// give x % d exactly. One 64-bit multiply instead of the five of the multiply-shift below.
constexpr uint64_t FLOAT_MOD_MIN = 1ULL << 13, FLOAT_MOD_MAX = 1ULL << 52;

FASTKD_AVX512 inline __m512i mod_float_x8(__m512i x, const FastMod& fm) {
  const __m512i d = _mm512_set1_epi64((long long)fm.d);
  const __m512d inv = _mm512_set1_pd(1.0 / (double)fm.d);
  const __m512i q = _mm512_cvttpd_epu64(_mm512_mul_pd(_mm512_cvtepu64_pd(x), inv));
  const __m512i q_lo = _mm512_sub_epi64(_mm512_max_epu64(q, _mm512_set1_epi64(1)), _mm512_set1_epi64(1));
  __m512i r = _mm512_sub_epi64(x, _mm512_mullo_epi64(q_lo, d));
  r = _mm512_mask_sub_epi64(r, _mm512_cmpge_epu64_mask(r, d), r, d);
  return _mm512_mask_sub_epi64(r, _mm512_cmpge_epu64_mask(r, d), r, d);
}

template <int MODE>
FASTKD_AVX512 inline __m512i bucket_x8(__m512i h, const FastMod& fm) {
  __m512i r;
  if (fm.pow2) {
    r = _mm512_and_si512(h, _mm512_set1_epi64((long long)(fm.d - 1)));
  } else if (fm.d > FLOAT_MOD_MIN && fm.d < FLOAT_MOD_MAX) {
    r = mod_float_x8(h, fm);
  } else {
    const __m512i t = mulhi_u64x8(h, _mm512_set1_epi64((long long)fm.m));
    const __m512i q = _mm512_srl_epi64(_mm512_add_epi64(t, _mm512_srli_epi64(_mm512_sub_epi64(h, t), 1)),
                                       _mm_cvtsi32_si128(fm.shift));
    r = _mm512_sub_epi64(h, _mm512_mullo_epi64(q, _mm512_set1_epi64((long long)fm.d)));
  }
  // bucket<MODE> (fastkd_hash.h) for 8 lanes; the values reaching here are never missing (no nulls,
  // length >= 4), so only its first id is added
  return first_id<MODE>() == 0 ? r : _mm512_add_epi64(r, _mm512_set1_epi64(first_id<MODE>()));
}

// xxh3_4to8 from the packed input (last + first << 32) and the length, 8 lanes.
FASTKD_AVX512 inline __m512i xxh3_4to8_x8(__m512i in64, __m512i len, __m512i bitflip) {
  const __m512i mx2 = _mm512_set1_epi64((long long)PMX_2);
  __m512i h = _mm512_xor_si512(in64, bitflip);
  h = _mm512_xor_si512(h, _mm512_xor_si512(_mm512_rol_epi64(h, 49), _mm512_rol_epi64(h, 24)));
  h = _mm512_mullo_epi64(h, mx2);
  h = _mm512_xor_si512(h, _mm512_add_epi64(_mm512_srli_epi64(h, 35), len));
  h = _mm512_mullo_epi64(h, mx2);
  return _mm512_xor_si512(h, _mm512_srli_epi64(h, 28));
}

inline uint64_t xxh3_4to8_bitflip(uint64_t seed) {
  seed ^= (uint64_t)bswap32((uint32_t)seed) << 32;
  return (read64(kXxh3SecretHost + 8) ^ read64(kXxh3SecretHost + 16)) - seed;
}

FASTKD_AVX512 inline void store_x8(int64_t* out, int64_t i, int64_t stride, __m512i v) {
  if (stride == 1) {
    _mm512_storeu_si512(out + i, v);
  } else {
    alignas(64) int64_t tmp[8];
    _mm512_store_si512(tmp, v);
    for (int k = 0; k < 8; ++k) out[(i + k) * stride] = tmp[k];
  }
}

// Rows [b, e) of a null-free int64 chunk, 8 at a time; returns the first row left to the scalar loop.
template <int MODE>
FASTKD_AVX512 int64_t simd_xxh3_int64(const Chunk& c, int64_t b, int64_t e, int64_t* out, int64_t stride,
                                      uint64_t seed, const FastMod& fm) {
  const __m512i bitflip = _mm512_set1_epi64((long long)xxh3_4to8_bitflip(seed));
  const __m512i len8 = _mm512_set1_epi64(8);
  const int64_t* v = reinterpret_cast<const int64_t*>(c.data);
  int64_t i = b;
  for (; i + 8 <= e; i += 8) {
    // 8 little-endian bytes: first word = low half, last word = high half -> in64 = rotate by 32
    const __m512i in64 = _mm512_rol_epi64(_mm512_loadu_si512(v + i), 32);
    store_x8(out, i, stride, bucket_x8<MODE>(xxh3_4to8_x8(in64, len8, bitflip), fm));
  }
  return i;
}

template <int ALGO, int MODE, int KIND, bool NULLS>
void run_chunk(const Chunk& chunk, int64_t b, int64_t e, int64_t* out, int64_t stride, uint64_t seed,
               const FastMod& fm_ref);

// Rows [b, e) of a null-free int32-offset string chunk: blocks whose 8 lengths all lie in 4..8 go
// through AVX-512 (two gathers), other blocks through the scalar loop.
template <int MODE>
FASTKD_AVX512 int64_t simd_xxh3_offsets32(const Chunk& c, int64_t b, int64_t e, int64_t* out, int64_t stride,
                                          uint64_t seed, const FastMod& fm) {
  const __m512i bitflip = _mm512_set1_epi64((long long)xxh3_4to8_bitflip(seed));
  const int32_t* o = static_cast<const int32_t*>(c.offsets);
  const int* base = reinterpret_cast<const int*>(c.data);
  const __m256i four = _mm256_set1_epi32(4);
  int64_t i = b;
  for (; i + 8 <= e; i += 8) {
    const __m256i start = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(o + i));
    const __m256i len = _mm256_sub_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(o + i + 1)), start);
    // unsigned (len - 4) <= 4  <=>  4 <= len <= 8
    if (_mm256_cmple_epu32_mask(_mm256_sub_epi32(len, four), four) != 0xFF) {
      run_chunk<ALGO_XXH3, MODE, KIND_OFFSETS32, false>(c, i, i + 8, out, stride, seed, fm);
      continue;
    }
    const __m256i first = _mm256_i32gather_epi32(base, start, 1);
    const __m256i last = _mm256_i32gather_epi32(base, _mm256_sub_epi32(_mm256_add_epi32(start, len), four), 1);
    const __m512i in64 = _mm512_or_si512(_mm512_slli_epi64(_mm512_cvtepu32_epi64(first), 32),
                                         _mm512_cvtepu32_epi64(last));
    store_x8(out, i, stride, bucket_x8<MODE>(xxh3_4to8_x8(in64, _mm512_cvtepu32_epi64(len), bitflip), fm));
  }
  return i;
}
#endif

#if defined(FASTKD_HAVE_AVX512_PATH)
FASTKD_AVX512 void simd_mod8_impl(const uint64_t* x, const FastMod& fm, uint64_t* r) {
  _mm512_storeu_si512(r, bucket_x8<MODE_PLAIN>(_mm512_loadu_si512(x), fm));
}
#endif

template <int ALGO, int MODE, int KIND>
void run_kind(const Chunk& c, int64_t b, int64_t e, int64_t* out, int64_t stride, uint64_t seed, const FastMod& fm) {
  if (c.validity != nullptr) return run_chunk<ALGO, MODE, KIND, true>(c, b, e, out, stride, seed, fm);
#if defined(FASTKD_HAVE_AVX512_PATH)
  if (ALGO == ALGO_XXH3 && g_simd.load(std::memory_order_relaxed)) {
    if (KIND == KIND_INT64) b = simd_xxh3_int64<MODE>(c, b, e, out, stride, seed, fm);
    if (KIND == KIND_OFFSETS32) b = simd_xxh3_offsets32<MODE>(c, b, e, out, stride, seed, fm);
  }
#endif
  return run_chunk<ALGO, MODE, KIND, false>(c, b, e, out, stride, seed, fm);
}

template <int ALGO, int MODE>
void run_span(const Chunk& c, int64_t b, int64_t e, int64_t* out, int64_t stride, uint64_t seed, const FastMod& fm) {
  switch (c.kind) {
    case KIND_OFFSETS32: return run_kind<ALGO, MODE, KIND_OFFSETS32>(c, b, e, out, stride, seed, fm);
    case KIND_OFFSETS64: return run_kind<ALGO, MODE, KIND_OFFSETS64>(c, b, e, out, stride, seed, fm);
    case KIND_VIEWS: return run_chunk<ALGO, MODE, KIND_VIEWS, false>(c, b, e, out, stride, seed, fm);
    case KIND_INT64: return run_kind<ALGO, MODE, KIND_INT64>(c, b, e, out, stride, seed, fm);
    default: return run_chunk<ALGO, MODE, KIND_FIXED, false>(c, b, e, out, stride, seed, fm);
  }
}

// One thread's share: rows [lo, hi) of every column.
template <int ALGO, int MODE>
void run_rows(const std::vector<Column>& cols, int64_t lo, int64_t hi) {
  std::vector<size_t> cursor(cols.size(), 0);
  for (int64_t t0 = lo; t0 < hi; t0 += TILE_ROWS) {
    const int64_t t1 = std::min(hi, t0 + TILE_ROWS);
    for (size_t f = 0; f < cols.size(); ++f) {
      const Column& col = cols[f];
      size_t& k = cursor[f];
      for (int64_t r = t0; r < t1;) {
        const Chunk& c = col.chunks[k];
        if (r >= c.row_start + c.n) {
          ++k;
          continue;
        }
        const int64_t e = std::min(t1, c.row_start + c.n);
        run_span<ALGO, MODE>(c, r - c.row_start, e - c.row_start, col.out + c.row_start * col.out_stride,
                             col.out_stride, col.seed, col.fm);
        r = e;
      }
    }
  }
}

template <int ALGO, int MODE>
void run_parallel(const std::vector<Column>& cols, int64_t n_rows, int num_threads) {
  const int64_t work = n_rows * (int64_t)std::max<size_t>(cols.size(), 1);
  int64_t nt = std::max<int64_t>(1, std::min<int64_t>(num_threads, work / MIN_ROWS_PER_THREAD));
  nt = std::min<int64_t>(nt, std::max<int64_t>(n_rows, 1));
  if (nt <= 1) return run_rows<ALGO, MODE>(cols, 0, n_rows);
  std::vector<std::thread> pool;
  pool.reserve(nt - 1);
  for (int64_t t = 1; t < nt; ++t)
    pool.emplace_back(run_rows<ALGO, MODE>, std::cref(cols), n_rows * t / nt, n_rows * (t + 1) / nt);
  run_rows<ALGO, MODE>(cols, 0, n_rows / nt);
  for (auto& th : pool) th.join();
}

}  // namespace

bool set_simd_enabled(bool on) {
#if defined(FASTKD_HAVE_AVX512_PATH)
  const bool supported = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw");
  g_simd.store(on && supported);
  return on && supported;
#else
  (void)on;
  return false;
#endif
}

bool simd_enabled() { return g_simd.load(); }

bool simd_mod8(const uint64_t* x, uint64_t d, uint64_t* r) {
#if defined(FASTKD_HAVE_AVX512_PATH)
  if (!g_simd.load()) return false;
  simd_mod8_impl(x, make_fastmod(d), r);
  return true;
#else
  (void)x, (void)d, (void)r;
  return false;
#endif
}

void hash_columns_cpu(const std::vector<Column>& cols, int64_t n_rows, int algorithm, int mode, int num_threads) {
  if (n_rows <= 0 || cols.empty()) return;
  if (algorithm == ALGO_XXH3) {
    if (mode == MODE_BUCKET0) return run_parallel<ALGO_XXH3, MODE_BUCKET0>(cols, n_rows, num_threads);
    return run_parallel<ALGO_XXH3, MODE_PLAIN>(cols, n_rows, num_threads);
  }
  if (mode == MODE_BUCKET0) return run_parallel<ALGO_MURMUR3, MODE_BUCKET0>(cols, n_rows, num_threads);
  return run_parallel<ALGO_MURMUR3, MODE_PLAIN>(cols, n_rows, num_threads);
}

}  // namespace fastkd
