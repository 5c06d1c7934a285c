// bindings_cuda.cpp -- pybind11 module fastkd._hashing_cuda: the CUDA launchers behind fastkd.hashing.
//
// Built only when nvcc is available (setup.py). Arguments are raw device addresses and the caller's
// cudaStream_t as integers (from torch tensors' data_ptr() and torch.cuda.current_stream()), so the
// module needs neither torch nor numpy headers; the caller keeps the tensors alive and on `device`.
// Launches are asynchronous on that stream; errors raise RuntimeError.
#include <pybind11/pybind11.h>

#include <string>

#include "hash_cuda.h"

namespace py = pybind11;
using namespace fastkd;

static void check(int err, const char* what) {
  if (err != 0) throw std::runtime_error(std::string(what) + ": " + cuda_error_string(err));
}

// The arguments both launchers share (rows, output, seed, modulus, algorithm, mode), set and checked once.
static void set_launch_args(HashLaunchArgs& a, int64_t n, uintptr_t out, int64_t out_stride, uint64_t seed,
                            uint64_t modulus, int algorithm, int mode) {
  if (modulus < 1 || modulus > (1ULL << 63)) throw py::value_error("modulus out of range [1, 2^63]");
  a.n = n;
  a.out = reinterpret_cast<void*>(out);
  a.out_stride = out_stride;
  a.seed = seed;
  a.fm = make_fastmod(modulus);
  a.algorithm = algorithm;
  a.mode = mode;
}

PYBIND11_MODULE(_hashing_cuda, m) {
  m.doc() = "fastkd native CUDA hashing (private; use fastkd.hashing)";
  // hash_int64(values_addr, n, out_addr, out_stride, seed, modulus, algorithm, mode, device, stream)
  //   values_addr: device int64 [n];  out_addr: device int64 [n] with stride out_stride (elements)
  //   modulus: num_buckets (mode 0) or num_buckets - 1 (mode 1);  algorithm 0 = xxh3, 1 = murmur3
  //   stream: cudaStream_t as an int (0 = legacy default stream; pass torch's current stream)
  m.def("hash_int64", [](uintptr_t values, int64_t n, uintptr_t out, int64_t out_stride, uint64_t seed,
                         uint64_t modulus, int algorithm, int mode, int device, uintptr_t stream) {
    HashIntArgs a;
    set_launch_args(a, n, out, out_stride, seed, modulus, algorithm, mode);
    a.values = reinterpret_cast<const void*>(values);
    check(hash_int64_cuda(a, device, reinterpret_cast<void*>(stream)), "fastkd hash_int64 CUDA launch");
  });
  // hash_offsets(offsets_addr, wide, data_addr, validity_addr, validity_offset, n, out_addr,
  //              out_stride, seed, modulus, algorithm, mode, device, stream)
  //   Arrow string layout on the device: offsets int32 (wide=False) or int64 [n + 1], data bytes,
  //   validity an Arrow bitmap or 0 for no nulls.
  m.def("hash_offsets", [](uintptr_t offsets, bool wide, uintptr_t data, uintptr_t validity,
                           int64_t validity_offset, int64_t n, uintptr_t out, int64_t out_stride, uint64_t seed,
                           uint64_t modulus, int algorithm, int mode, int device, uintptr_t stream) {
    HashOffsetsArgs a;
    set_launch_args(a, n, out, out_stride, seed, modulus, algorithm, mode);
    a.offsets = reinterpret_cast<const void*>(offsets);
    a.wide_offsets = wide;
    a.data = reinterpret_cast<const void*>(data);
    a.validity = reinterpret_cast<const void*>(validity);
    a.validity_offset = validity_offset;
    check(hash_offsets_cuda(a, device, reinterpret_cast<void*>(stream)), "fastkd hash_offsets CUDA launch");
  });
  m.def("runtime_version", &cuda_runtime_version);
}
