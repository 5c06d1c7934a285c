// hash_cuda.cu -- CUDA kernels for fastkd hashing: one thread per value, grid-stride loops.
//
// The arithmetic is fastkd_hash.h, the same header the CPU engine compiles, so CUDA and CPU ids
// agree bit for bit. Launchers take raw device pointers and a cudaStream_t passed in from Python
// (torch.cuda.current_stream().cuda_stream): the extension is not built against torch, and work is
// always queued on the caller's stream, never on the legacy default stream.
#include <cuda_runtime.h>

#include "fastkd_hash.h"
#include "hash_cuda.h"

namespace fastkd {
namespace {

constexpr int THREADS = 256;
constexpr int64_t MAX_BLOCKS = 65535;

// out[i * out_stride] = bucket(hash(values[i] as 8 LE bytes)); ints are never missing here.
template <int ALGO, int MODE>
__global__ void hash_int64_kernel(const int64_t* __restrict__ values,  // [n] int64
                                  int64_t n,
                                  int64_t* __restrict__ out,  // [n] int64, stride out_stride
                                  int64_t out_stride, uint64_t seed, FastMod fm) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const uint64_t h = hash_int<ALGO>((uint64_t)values[i], seed);
    out[i * out_stride] = bucket<MODE>(h, false, fm);
  }
}

// Arrow (large_)string layout on the device: value i is data[offsets[i] : offsets[i + 1]].
template <int ALGO, int MODE, typename OffT>
__global__ void hash_offsets_kernel(const OffT* __restrict__ offsets,     // [n + 1] int32 / int64
                                    const uint8_t* __restrict__ data,     // [offsets[n]] bytes
                                    const uint8_t* __restrict__ validity, // [ceil((voff + n) / 8)] or null
                                    int64_t validity_offset, int64_t n,
                                    int64_t* __restrict__ out,  // [n] int64, stride out_stride
                                    int64_t out_stride, uint64_t seed, FastMod fm) {
  const uint8_t empty = 0;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t vb = validity_offset + i;
    const bool valid = validity == nullptr || ((validity[vb >> 3] >> (vb & 7)) & 1);
    const int64_t begin = (int64_t)offsets[i];
    const int64_t len = valid ? (int64_t)offsets[i + 1] - begin : 0;
    const uint8_t* p = len > 0 ? data + begin : &empty;
    const uint64_t h = hash_bytes<ALGO>(p, (uint64_t)len, seed);
    out[i * out_stride] = bucket<MODE>(h, len == 0, fm);
  }
}

inline unsigned blocks_for(int64_t n) {
  const int64_t b = (n + THREADS - 1) / THREADS;
  return (unsigned)(b < MAX_BLOCKS ? (b > 0 ? b : 1) : MAX_BLOCKS);
}

template <int ALGO, int MODE>
void launch_int64(const HashIntArgs& a, cudaStream_t s) {
  hash_int64_kernel<ALGO, MODE><<<blocks_for(a.n), THREADS, 0, s>>>(
      static_cast<const int64_t*>(a.values), a.n, static_cast<int64_t*>(a.out), a.out_stride, a.seed, a.fm);
}

template <int ALGO, int MODE>
void launch_offsets(const HashOffsetsArgs& a, cudaStream_t s) {
  const unsigned blocks = blocks_for(a.n);
  const uint8_t* data = static_cast<const uint8_t*>(a.data);
  const uint8_t* validity = static_cast<const uint8_t*>(a.validity);
  int64_t* out = static_cast<int64_t*>(a.out);
  if (a.wide_offsets)
    hash_offsets_kernel<ALGO, MODE, int64_t><<<blocks, THREADS, 0, s>>>(
        static_cast<const int64_t*>(a.offsets), data, validity, a.validity_offset, a.n, out, a.out_stride, a.seed, a.fm);
  else
    hash_offsets_kernel<ALGO, MODE, int32_t><<<blocks, THREADS, 0, s>>>(
        static_cast<const int32_t*>(a.offsets), data, validity, a.validity_offset, a.n, out, a.out_stride, a.seed, a.fm);
}

template <class Args, void (*L00)(const Args&, cudaStream_t), void (*L01)(const Args&, cudaStream_t),
          void (*L10)(const Args&, cudaStream_t), void (*L11)(const Args&, cudaStream_t)>
int dispatch(const Args& a, int device, void* stream) {
  cudaError_t err = cudaSetDevice(device);  // this runtime's per-thread device, not torch's
  if (err != cudaSuccess) return (int)err;
  if (a.n <= 0) return 0;
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const bool murmur = a.algorithm == ALGO_MURMUR3, bucket0 = a.mode == MODE_BUCKET0;
  (murmur ? (bucket0 ? L11 : L10) : (bucket0 ? L01 : L00))(a, s);
  return (int)cudaGetLastError();
}

}  // namespace

int hash_int64_cuda(const HashIntArgs& a, int device, void* stream) {
  return dispatch<HashIntArgs, launch_int64<ALGO_XXH3, MODE_PLAIN>, launch_int64<ALGO_XXH3, MODE_BUCKET0>,
                  launch_int64<ALGO_MURMUR3, MODE_PLAIN>, launch_int64<ALGO_MURMUR3, MODE_BUCKET0>>(a, device, stream);
}

int hash_offsets_cuda(const HashOffsetsArgs& a, int device, void* stream) {
  return dispatch<HashOffsetsArgs, launch_offsets<ALGO_XXH3, MODE_PLAIN>, launch_offsets<ALGO_XXH3, MODE_BUCKET0>,
                  launch_offsets<ALGO_MURMUR3, MODE_PLAIN>, launch_offsets<ALGO_MURMUR3, MODE_BUCKET0>>(a, device,
                                                                                                      stream);
}

const char* cuda_error_string(int err) { return cudaGetErrorString((cudaError_t)err); }

int cuda_runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return v;
}

}  // namespace fastkd
