// embedding_cpu.h -- the CPU backward of fastkd.MultiFieldEmbedding: merge duplicate rows, or apply
// a fused SGD/Adagrad step to the touched rows, without a table-sized or [U, D] temporary.
// (No Python in here; bindings_embedding.cpp wraps it.)
#pragma once

#include <stdint.h>

#include <vector>

namespace fastkd {

// The lookups of one batch grouped by table row: a stable sort of (row, lookup index) pairs.
struct SortedRows {
  std::vector<uint32_t> keys;    // [n] table rows, ascending
  std::vector<uint32_t> idx;     // [n] lookup index of each key, ascending within equal keys
  std::vector<int64_t> starts;   // [U + 1] first position of each run of equal keys, then n
  int64_t num_unique() const { return starts.empty() ? 0 : (int64_t)starts.size() - 1; }
};

// rows [n] int64; needs n < 2^32 and num_rows <= 2^32 (checked by the caller). A row outside
// [0, num_rows) throws std::out_of_range naming it (nothing has been written by then).
// LSD radix sort with 11-bit digits: ceil(log2(num_rows) / 11) passes over the n pairs.
void sort_rows_cpu(const int64_t* rows, int64_t n, int64_t num_rows, SortedRows& out);

// Gradient of each unique row = the sum of its lookups' rows of grad [n, dim], left to right
// (the order of a stable sort). out_rows [U] int64 ascending, out_merged [U, dim] fp32.
void merge_rows_cpu(const SortedRows& s, const float* grad, int64_t dim, int64_t* out_rows, float* out_merged,
                    int num_threads);

// In place on the touched rows only, with g = the merged gradient of a row (summed as above):
//   SGD      w <- w - lr * g
//   Adagrad  s <- s + g*g;  w <- w - lr * g / (sqrt(s) + eps)
// as torch computes them in fp32 (g*g rounded before the add; the weight step one fused
// multiply-add, like torch's add_(x, alpha=-lr)). state == nullptr selects SGD.
void fused_update_cpu(const SortedRows& s, const float* grad, int64_t dim, float* weight, float* state, float lr,
                      float eps, int num_threads);

// Row kernels: AVX-512 (16 lanes), AVX2 + FMA (8 lanes) or portable loops, all with the same
// lane-wise arithmetic and so the same bits. The best the CPU has is used; set_simd_level caps it
// (the tests compare the three) and returns the level now in use.
enum SimdLevel : int { SIMD_PORTABLE = 0, SIMD_AVX2 = 1, SIMD_AVX512 = 2 };
int set_simd_level(int level);
int simd_level();

}  // namespace fastkd
