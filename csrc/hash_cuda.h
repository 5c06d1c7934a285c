// hash_cuda.h -- host-side declarations of the CUDA launchers (hash_cuda.cu). Free of CUDA headers
// so that bindings_cuda.cpp compiles with the plain host compiler.
#pragma once

#include <stdint.h>

#include "fastkd_hash.h"

namespace fastkd {

// What every launch takes besides its input: the rows, where the ids go, and how they are computed.
struct HashLaunchArgs {
  int64_t n = 0;                 // rows
  void* out = nullptr;           // device [n] int64, stride out_stride (elements)
  int64_t out_stride = 1;
  uint64_t seed = 0;
  FastMod fm{};                  // num_buckets (MODE_PLAIN) or num_buckets - 1 (MODE_BUCKET0)
  int algorithm = ALGO_XXH3;
  int mode = MODE_PLAIN;
};

struct HashIntArgs : HashLaunchArgs {
  const void* values = nullptr;  // device [n] int64
};

struct HashOffsetsArgs : HashLaunchArgs {
  const void* offsets = nullptr;   // device [n + 1] int32 (wide_offsets = false) or int64
  const void* data = nullptr;      // device bytes
  const void* validity = nullptr;  // device Arrow bitmap or null (all present)
  int64_t validity_offset = 0;
  bool wide_offsets = false;
};

// Queue the kernel on `stream` (a cudaStream_t) of `device`; returns a cudaError_t code (0 = ok).
int hash_int64_cuda(const HashIntArgs& args, int device, void* stream);
int hash_offsets_cuda(const HashOffsetsArgs& args, int device, void* stream);
const char* cuda_error_string(int err);
int cuda_runtime_version();

}  // namespace fastkd
