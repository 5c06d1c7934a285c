// hash_cpu.h -- the multi-threaded CPU hashing engine (no Python in here; bindings.cpp wraps it).
#pragma once

#include <stdint.h>

#include <vector>

#include "fastkd_hash.h"

namespace fastkd {

// How one chunk of a column stores its values.
enum ChunkKind : int {
  KIND_OFFSETS32 = 0,  // Arrow string/binary: int32 offsets[n + 1] into data
  KIND_OFFSETS64 = 1,  // Arrow large_string/large_binary: int64 offsets[n + 1] into data
  KIND_VIEWS = 2,      // pointer + length per row (built from Python str/bytes objects)
  KIND_INT64 = 3,      // int64 values[n], hashed as their 8 little-endian bytes
  KIND_FIXED = 4,      // numpy 'S' array: n items of itemsize bytes, trailing NULs stripped
};

struct Chunk {
  int kind = KIND_OFFSETS32;
  int64_t n = 0;                        // rows in this chunk
  int64_t row_start = 0;                // first row of the chunk within its column
  const void* offsets = nullptr;        // [n + 1] int32/int64, already advanced by the Arrow array offset
  const uint8_t* data = nullptr;        // OFFSETS*: character bytes; INT64: [n] int64; FIXED: [n, itemsize]
  const uint8_t* const* ptrs = nullptr; // VIEWS: [n] start of each value
  const int64_t* lens = nullptr;        // VIEWS: [n] byte length, < 0 = missing
  const uint8_t* validity = nullptr;    // Arrow validity bitmap (bit set = present), or null = all present
  int64_t validity_offset = 0;          // bit index of row 0 in the bitmap
  int64_t itemsize = 0;                 // FIXED only
};

// One output column: rows 0..n_rows-1 land at out[row * out_stride].
struct Column {
  std::vector<Chunk> chunks;  // consecutive, covering rows 0..n_rows-1
  int64_t* out = nullptr;     // [n_rows] with stride out_stride (elements), int64 ids
  int64_t out_stride = 1;
  uint64_t seed = 0;
  FastMod fm{};  // modulo by num_buckets (MODE_PLAIN) or num_buckets - 1 (MODE_BUCKET0)
};

// Hash every column; one parallel region of up to num_threads threads (the calling thread is one
// of them). Call without the GIL.
void hash_columns_cpu(const std::vector<Column>& cols, int64_t n_rows, int algorithm, int mode, int num_threads);

// The AVX-512 paths (XXH3 of int64 and of 4..8-byte strings) are used when the CPU has them.
// set_simd_enabled(false) forces the scalar code (tests compare the two); returns the new state.
bool set_simd_enabled(bool on);
bool simd_enabled();
// r[k] = x[k] % d through the vector modulo (tests); false when the AVX-512 path is off.
bool simd_mod8(const uint64_t* x, uint64_t d, uint64_t* r);

}  // namespace fastkd
