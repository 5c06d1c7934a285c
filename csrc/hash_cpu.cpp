// hash_cpu.cpp -- multi-threaded CPU hashing of string/int columns into bucket ids.
//
// Work split: the rows 0..n_rows-1 are cut into one contiguous range per thread. A thread walks its
// range in tiles of TILE_ROWS rows and, inside a tile, hashes every column; with many columns
// writing into one row-major [N, F] output this keeps the tile's output rows in cache instead of
// streaming the whole output once per field.
#include "hash_cpu.h"

#include <algorithm>
#include <thread>

namespace fastkd {
namespace {

constexpr int64_t TILE_ROWS = 2048;
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

template <int ALGO, int MODE, int KIND>
void run_kind(const Chunk& c, int64_t b, int64_t e, int64_t* out, int64_t stride, uint64_t seed, const FastMod& fm) {
  if (c.validity != nullptr) return run_chunk<ALGO, MODE, KIND, true>(c, b, e, out, stride, seed, fm);
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
