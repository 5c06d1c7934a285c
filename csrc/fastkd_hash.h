// fastkd_hash.h -- the hash functions and the exact bucket modulo, written once for host and device.
//
// Everything here is header-only and marked host+device under nvcc, so the CPU extension
// (hash_cpu.cpp) and the CUDA kernels (hash_cuda.cu) compile the very same arithmetic: CPU and
// GPU ids agree bit for bit by construction, and the tests pin both to the PyPI reference packages:
//
//   xxh3_64(p, n, seed)      == xxhash.xxh3_64_intdigest(bytes, seed)       (XXH3-64, any length)
//   murmur3_32(p, n, seed)   == mmh3.hash(bytes, seed, signed=False)       (MurmurHash3 x86_32)
//   FastMod(d).mod(x)        == x % d  for every uint64 x and 1 <= d <= 2^63
//
// Integers are hashed as their 8-byte little-endian representation (the *_u64 helpers are the
// same functions specialised to an 8-byte input). The implementations follow the published
// algorithm descriptions (xxHash's doc/xxhash_spec.md, Appleby's MurmurHash3); the XXH3 default
// secret below is the constant from that spec.
#pragma once

#include <stdint.h>
#include <string.h>

#if defined(__CUDACC__)
#define FASTKD_HD __host__ __device__ __forceinline__
// the > 240-byte path is rare for categorical values: one out-of-line copy keeps kernels small
#define FASTKD_HD_COLD __host__ __device__ __noinline__
#define FASTKD_CONST __device__ __constant__
#else
#define FASTKD_HD inline __attribute__((always_inline))
#define FASTKD_HD_COLD inline __attribute__((noinline))
#define FASTKD_CONST
#endif

namespace fastkd {

// ---------------------------------------------------------------------------------------------
// constants
// ---------------------------------------------------------------------------------------------
enum Algorithm : int { ALGO_XXH3 = 0, ALGO_MURMUR3 = 1 };

// MODE_PLAIN: out = h % d, a missing value hashed as the empty byte string.
// MODE_BUCKET0: missing or empty -> 0, anything else -> 1 + h % (d - 1); the caller passes d - 1.
// The rule itself: bucket<MODE> at the end of this file.
enum Mode : int { MODE_PLAIN = 0, MODE_BUCKET0 = 1 };

constexpr uint64_t P32_1 = 0x9E3779B1ULL;
constexpr uint64_t P32_2 = 0x85EBCA77ULL;
constexpr uint64_t P32_3 = 0xC2B2AE3DULL;
constexpr uint64_t P64_1 = 0x9E3779B185EBCA87ULL;
constexpr uint64_t P64_2 = 0xC2B2AE3D27D4EB4FULL;
constexpr uint64_t P64_3 = 0x165667B19E3779F9ULL;
constexpr uint64_t P64_4 = 0x85EBCA77C2B2AE63ULL;
constexpr uint64_t P64_5 = 0x27D4EB2F165667C5ULL;
constexpr uint64_t PMX_1 = 0x165667919E3779F9ULL;
constexpr uint64_t PMX_2 = 0x9FB21C651E98DF25ULL;

constexpr int XXH3_SECRET_SIZE = 192;

// A macro, not a variable, so host code and the __constant__ device copy share one spelling.
#define FASTKD_XXH3_SECRET_BYTES                                                                      \
  {0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad, 0x1c, \
   0xde, 0xd4, 0x6d, 0xe9, 0x83, 0x90, 0x97, 0xdb, 0x72, 0x40, 0xa4, 0xa4, 0xb7, 0xb3, 0x67, 0x1f, \
   0xcb, 0x79, 0xe6, 0x4e, 0xcc, 0xc0, 0xe5, 0x78, 0x82, 0x5a, 0xd0, 0x7d, 0xcc, 0xff, 0x72, 0x21, \
   0xb8, 0x08, 0x46, 0x74, 0xf7, 0x43, 0x24, 0x8e, 0xe0, 0x35, 0x90, 0xe6, 0x81, 0x3a, 0x26, 0x4c, \
   0x3c, 0x28, 0x52, 0xbb, 0x91, 0xc3, 0x00, 0xcb, 0x88, 0xd0, 0x65, 0x8b, 0x1b, 0x53, 0x2e, 0xa3, \
   0x71, 0x64, 0x48, 0x97, 0xa2, 0x0d, 0xf9, 0x4e, 0x38, 0x19, 0xef, 0x46, 0xa9, 0xde, 0xac, 0xd8, \
   0xa8, 0xfa, 0x76, 0x3f, 0xe3, 0x9c, 0x34, 0x3f, 0xf9, 0xdc, 0xbb, 0xc7, 0xc7, 0x0b, 0x4f, 0x1d, \
   0x8a, 0x51, 0xe0, 0x4b, 0xcd, 0xb4, 0x59, 0x31, 0xc8, 0x9f, 0x7e, 0xc9, 0xd9, 0x78, 0x73, 0x64, \
   0xea, 0xc5, 0xac, 0x83, 0x34, 0xd3, 0xeb, 0xc3, 0xc5, 0x81, 0xa0, 0xff, 0xfa, 0x13, 0x63, 0xeb, \
   0x17, 0x0d, 0xdd, 0x51, 0xb7, 0xf0, 0xda, 0x49, 0xd3, 0x16, 0x55, 0x26, 0x29, 0xd4, 0x68, 0x9e, \
   0x2b, 0x16, 0xbe, 0x58, 0x7d, 0x47, 0xa1, 0xfc, 0x8f, 0xf8, 0xb8, 0xd1, 0x7a, 0xd0, 0x31, 0xce, \
   0x45, 0xcb, 0x3a, 0x8f, 0x95, 0x16, 0x04, 0x28, 0xaf, 0xd7, 0xfb, 0xca, 0xbb, 0x4b, 0x40, 0x7e}

#if defined(__CUDACC__)
FASTKD_CONST uint8_t kXxh3SecretDevice[XXH3_SECRET_SIZE] = FASTKD_XXH3_SECRET_BYTES;
#endif
static const uint8_t kXxh3SecretHost[XXH3_SECRET_SIZE] = FASTKD_XXH3_SECRET_BYTES;

FASTKD_HD const uint8_t* xxh3_default_secret() {
#if defined(__CUDA_ARCH__)
  return kXxh3SecretDevice;
#else
  return kXxh3SecretHost;
#endif
}

// ---------------------------------------------------------------------------------------------
// primitives
// ---------------------------------------------------------------------------------------------
// Little-endian loads from possibly unaligned bytes. memcpy keeps the host version a single mov;
// on the device string starts are unaligned, so bytes are assembled explicitly.
FASTKD_HD uint64_t read64(const uint8_t* p) {
#if defined(__CUDA_ARCH__)
  uint64_t v = 0;
  for (int i = 7; i >= 0; --i) v = (v << 8) | p[i];
  return v;
#else
  uint64_t v;
  memcpy(&v, p, 8);
  return v;  // x86-64 and aarch64 hosts are little-endian
#endif
}

FASTKD_HD uint32_t read32(const uint8_t* p) {
#if defined(__CUDA_ARCH__)
  return (uint32_t)p[0] | ((uint32_t)p[1] << 8) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 24);
#else
  uint32_t v;
  memcpy(&v, p, 4);
  return v;
#endif
}

FASTKD_HD uint64_t rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }
FASTKD_HD uint32_t rotl32(uint32_t x, int r) { return (x << r) | (x >> (32 - r)); }

FASTKD_HD uint64_t bswap64(uint64_t x) {
#if defined(__CUDA_ARCH__)
  return ((uint64_t)__byte_perm((uint32_t)x, 0, 0x0123) << 32) | __byte_perm((uint32_t)(x >> 32), 0, 0x0123);
#else
  return __builtin_bswap64(x);
#endif
}

FASTKD_HD uint32_t bswap32(uint32_t x) {
#if defined(__CUDA_ARCH__)
  return __byte_perm(x, 0, 0x0123);
#else
  return __builtin_bswap32(x);
#endif
}

FASTKD_HD uint64_t mulhi64(uint64_t a, uint64_t b) {
#if defined(__CUDA_ARCH__)
  return __umul64hi(a, b);
#else
  return (uint64_t)(((unsigned __int128)a * b) >> 64);
#endif
}

// 64x64 -> 128-bit product, high half xor low half.
FASTKD_HD uint64_t mul128_fold64(uint64_t a, uint64_t b) { return mulhi64(a, b) ^ (a * b); }

// ---------------------------------------------------------------------------------------------
// XXH3-64
// ---------------------------------------------------------------------------------------------
FASTKD_HD uint64_t xxh64_avalanche(uint64_t h) {
  h ^= h >> 33;
  h *= P64_2;
  h ^= h >> 29;
  h *= P64_3;
  return h ^ (h >> 32);
}

FASTKD_HD uint64_t xxh3_avalanche(uint64_t h) {
  h ^= h >> 37;
  h *= PMX_1;
  return h ^ (h >> 32);
}

FASTKD_HD uint64_t xxh3_rrmxmx(uint64_t h, uint64_t len) {
  h ^= rotl64(h, 49) ^ rotl64(h, 24);
  h *= PMX_2;
  h ^= (h >> 35) + len;
  h *= PMX_2;
  return h ^ (h >> 28);
}

FASTKD_HD uint64_t xxh3_mix16(const uint8_t* in, const uint8_t* sec, uint64_t seed) {
  return mul128_fold64(read64(in) ^ (read64(sec) + seed), read64(in + 8) ^ (read64(sec + 8) - seed));
}

// 4..8 input bytes, given as the first and the last 4-byte words (they overlap below 8 bytes).
FASTKD_HD uint64_t xxh3_4to8(uint32_t first, uint32_t last, uint64_t len, uint64_t seed, const uint8_t* s) {
  seed ^= (uint64_t)bswap32((uint32_t)seed) << 32;
  const uint64_t bitflip = (read64(s + 8) ^ read64(s + 16)) - seed;
  const uint64_t in64 = (uint64_t)last + ((uint64_t)first << 32);
  return xxh3_rrmxmx(in64 ^ bitflip, len);
}

FASTKD_HD uint64_t xxh3_0to16(const uint8_t* p, uint64_t len, uint64_t seed, const uint8_t* s) {
  if (len > 8) {
    const uint64_t flip1 = (read64(s + 24) ^ read64(s + 32)) + seed;
    const uint64_t flip2 = (read64(s + 40) ^ read64(s + 48)) - seed;
    const uint64_t lo = read64(p) ^ flip1;
    const uint64_t hi = read64(p + len - 8) ^ flip2;
    return xxh3_avalanche(len + bswap64(lo) + hi + mul128_fold64(lo, hi));
  }
  if (len >= 4) return xxh3_4to8(read32(p), read32(p + len - 4), len, seed, s);
  if (len > 0) {
    const uint32_t combined = ((uint32_t)p[0] << 16) | ((uint32_t)p[len >> 1] << 24) | (uint32_t)p[len - 1] |
                              ((uint32_t)len << 8);
    const uint64_t flip = (uint64_t)(read32(s) ^ read32(s + 4)) + seed;
    return xxh64_avalanche((uint64_t)combined ^ flip);
  }
  return xxh64_avalanche(seed ^ read64(s + 56) ^ read64(s + 64));
}

FASTKD_HD uint64_t xxh3_17to128(const uint8_t* p, uint64_t len, uint64_t seed, const uint8_t* s) {
  uint64_t acc = len * P64_1;
  if (len > 32) {
    if (len > 64) {
      if (len > 96) {
        acc += xxh3_mix16(p + 48, s + 96, seed);
        acc += xxh3_mix16(p + len - 64, s + 112, seed);
      }
      acc += xxh3_mix16(p + 32, s + 64, seed);
      acc += xxh3_mix16(p + len - 48, s + 80, seed);
    }
    acc += xxh3_mix16(p + 16, s + 32, seed);
    acc += xxh3_mix16(p + len - 32, s + 48, seed);
  }
  acc += xxh3_mix16(p, s, seed);
  acc += xxh3_mix16(p + len - 16, s + 16, seed);
  return xxh3_avalanche(acc);
}

FASTKD_HD_COLD uint64_t xxh3_129to240(const uint8_t* p, uint64_t len, uint64_t seed, const uint8_t* s) {
  uint64_t acc = len * P64_1;
  const int rounds = (int)(len / 16);
  for (int i = 0; i < 8; ++i) acc += xxh3_mix16(p + 16 * i, s + 16 * i, seed);
  acc = xxh3_avalanche(acc);
  // rounds 8.. reuse the secret from byte 3 on; the last 16 input bytes use secret[136 - 17 ..]
  for (int i = 8; i < rounds; ++i) acc += xxh3_mix16(p + 16 * i, s + 16 * (i - 8) + 3, seed);
  acc += xxh3_mix16(p + len - 16, s + 136 - 17, seed);
  return xxh3_avalanche(acc);
}

// One 64-byte stripe into the 8 accumulators.
FASTKD_HD void xxh3_accumulate512(uint64_t* acc, const uint8_t* in, const uint8_t* sec) {
  for (int i = 0; i < 8; ++i) {
    const uint64_t v = read64(in + 8 * i);
    const uint64_t k = v ^ read64(sec + 8 * i);
    acc[i ^ 1] += v;
    acc[i] += (k & 0xFFFFFFFFULL) * (k >> 32);
  }
}

FASTKD_HD void xxh3_scramble(uint64_t* acc, const uint8_t* sec) {
  for (int i = 0; i < 8; ++i) {
    uint64_t a = acc[i];
    a ^= a >> 47;
    a ^= read64(sec + 8 * i);
    acc[i] = a * P32_1;
  }
}

// > 240 bytes: the seed is folded into a 192-byte secret first, then the striped loop runs.
FASTKD_HD_COLD uint64_t xxh3_long(const uint8_t* p, uint64_t len, uint64_t seed, const uint8_t* ks) {
  uint8_t secret_buf[XXH3_SECRET_SIZE];
  const uint8_t* s = ks;
  if (seed != 0) {
    for (int i = 0; i < XXH3_SECRET_SIZE / 16; ++i) {
      const uint64_t lo = read64(ks + 16 * i) + seed;
      const uint64_t hi = read64(ks + 16 * i + 8) - seed;
      for (int b = 0; b < 8; ++b) {
        secret_buf[16 * i + b] = (uint8_t)(lo >> (8 * b));
        secret_buf[16 * i + 8 + b] = (uint8_t)(hi >> (8 * b));
      }
    }
    s = secret_buf;
  }
  uint64_t acc[8] = {P32_3, P64_1, P64_2, P64_3, P64_4, P32_2, P64_5, P32_1};
  const uint64_t stripes_per_block = (XXH3_SECRET_SIZE - 64) / 8;  // 16
  const uint64_t block_len = 64 * stripes_per_block;               // 1024
  const uint64_t nb_blocks = (len - 1) / block_len;
  for (uint64_t b = 0; b < nb_blocks; ++b) {
    for (uint64_t st = 0; st < stripes_per_block; ++st)
      xxh3_accumulate512(acc, p + b * block_len + st * 64, s + st * 8);
    xxh3_scramble(acc, s + XXH3_SECRET_SIZE - 64);
  }
  const uint64_t last_stripes = ((len - 1) - block_len * nb_blocks) / 64;
  for (uint64_t st = 0; st < last_stripes; ++st) xxh3_accumulate512(acc, p + nb_blocks * block_len + st * 64, s + st * 8);
  xxh3_accumulate512(acc, p + len - 64, s + XXH3_SECRET_SIZE - 64 - 7);
  uint64_t h = len * P64_1;
  for (int i = 0; i < 4; ++i)
    h += mul128_fold64(acc[2 * i] ^ read64(s + 11 + 16 * i), acc[2 * i + 1] ^ read64(s + 11 + 16 * i + 8));
  return xxh3_avalanche(h);
}

// Inputs over 16 bytes, out of line: keeping only the 0..16-byte code in a caller's loop keeps the
// typical categorical token (a few bytes) on a short, register-friendly path.
FASTKD_HD_COLD uint64_t xxh3_over16(const uint8_t* p, uint64_t len, uint64_t seed, const uint8_t* s) {
  if (len <= 128) return xxh3_17to128(p, len, seed, s);
  if (len <= 240) return xxh3_129to240(p, len, seed, s);
  return xxh3_long(p, len, seed, s);
}

FASTKD_HD uint64_t xxh3_64(const uint8_t* p, uint64_t len, uint64_t seed) {
  const uint8_t* s = xxh3_default_secret();
  if (len <= 16) return xxh3_0to16(p, len, seed, s);
  return xxh3_over16(p, len, seed, s);
}

// xxh3_64 of the 8 little-endian bytes of v, without going through memory.
FASTKD_HD uint64_t xxh3_64_u64(uint64_t v, uint64_t seed) {
  return xxh3_4to8((uint32_t)v, (uint32_t)(v >> 32), 8, seed, xxh3_default_secret());
}

// ---------------------------------------------------------------------------------------------
// MurmurHash3 x86_32
// ---------------------------------------------------------------------------------------------
FASTKD_HD uint32_t murmur3_mixk(uint32_t k) {
  k *= 0xcc9e2d51u;
  k = rotl32(k, 15);
  return k * 0x1b873593u;
}

FASTKD_HD uint32_t murmur3_fmix(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85ebca6bu;
  h ^= h >> 13;
  h *= 0xc2b2ae35u;
  return h ^ (h >> 16);
}

FASTKD_HD uint32_t murmur3_32(const uint8_t* p, uint64_t len, uint32_t seed) {
  uint32_t h = seed;
  const uint64_t nblocks = len / 4;
  for (uint64_t i = 0; i < nblocks; ++i) {
    h ^= murmur3_mixk(read32(p + 4 * i));
    h = rotl32(h, 13);
    h = h * 5 + 0xe6546b64u;
  }
  const uint8_t* tail = p + 4 * nblocks;
  uint32_t k = 0;
  switch (len & 3) {
    case 3: k ^= (uint32_t)tail[2] << 16;  // fall through
    case 2: k ^= (uint32_t)tail[1] << 8;   // fall through
    case 1: k ^= tail[0]; h ^= murmur3_mixk(k);
  }
  // the reference mixes a 32-bit length; inputs >= 4 GiB wrap exactly as mmh3 does
  return murmur3_fmix(h ^ (uint32_t)len);
}

FASTKD_HD uint32_t murmur3_32_u64(uint64_t v, uint32_t seed) {
  uint32_t h = seed;
  h ^= murmur3_mixk((uint32_t)v);
  h = rotl32(h, 13) * 5 + 0xe6546b64u;
  h ^= murmur3_mixk((uint32_t)(v >> 32));
  h = rotl32(h, 13) * 5 + 0xe6546b64u;
  return murmur3_fmix(h ^ 8u);
}

// ---------------------------------------------------------------------------------------------
// Exact x % d without a hardware divide (a 64-bit div costs 30-90 cycles, more than the hash).
// ---------------------------------------------------------------------------------------------
// Round-up multiply-shift (Granlund & Montgomery 1994, Hacker's Delight 10-8): with
// l = ceil(log2 d) and m = floor(2^64 (2^l - d) / d) + 1, the quotient of any 64-bit x is
//   t = mulhi(m, x);  q = (t + ((x - t) >> 1)) >> (l - 1)
// and the remainder is x - q d. Powers of two (d = 1 included) take a mask instead: no multiply,
// which matters because the hash already keeps the multiplier port busy. The host precomputes m.
struct FastMod {
  uint64_t d;
  uint64_t m;
  int shift;  // l - 1; unused for powers of two
  bool pow2;

  FASTKD_HD uint64_t mod(uint64_t x) const {
    if (pow2) return x & (d - 1);
    const uint64_t t = mulhi64(m, x);
    const uint64_t q = (t + ((x - t) >> 1)) >> shift;
    return x - q * d;
  }
};

// Host only (uses a 128-bit division once per call). d must be in [1, 2^63].
inline FastMod make_fastmod(uint64_t d) {
  FastMod f;
  f.d = d;
  f.m = 0;
  f.shift = 0;
  f.pow2 = (d & (d - 1)) == 0;  // d >= 1 here
  if (f.pow2) return f;
  const int l = 64 - __builtin_clzll(d - 1);  // ceil(log2 d), 1..63
  const unsigned __int128 num = ((unsigned __int128)(((uint64_t)1 << l) - d)) << 64;
  f.m = (uint64_t)(num / d) + 1;
  f.shift = l - 1;
  return f;
}

// ---------------------------------------------------------------------------------------------
// value -> bucket id, shared by the CPU loops and the CUDA kernels
// ---------------------------------------------------------------------------------------------
template <int ALGO>
FASTKD_HD uint64_t hash_bytes(const uint8_t* p, uint64_t len, uint64_t seed) {
  if (ALGO == ALGO_XXH3) return xxh3_64(p, len, seed);
  return murmur3_32(p, len, (uint32_t)seed);
}

template <int ALGO>
FASTKD_HD uint64_t hash_int(uint64_t v, uint64_t seed) {
  if (ALGO == ALGO_XXH3) return xxh3_64_u64(v, seed);
  return murmur3_32_u64(v, (uint32_t)seed);
}

// The bucket rule, its one C++ copy (CPU loops, AVX-512 paths, CUDA kernels; the Python one is
// fastkd.reference.hashing.bucket_id_ref). `missing`: a null or, in MODE_BUCKET0, an empty value; fm
// divides by num_buckets (MODE_PLAIN) or num_buckets - 1 (MODE_BUCKET0, whose ids start at 1).
template <int MODE>
FASTKD_HD constexpr int64_t first_id() { return MODE == MODE_BUCKET0 ? 1 : 0; }

template <int MODE>
FASTKD_HD int64_t bucket(uint64_t h, bool missing, const FastMod& fm) {
  if (MODE == MODE_BUCKET0 && missing) return 0;
  return first_id<MODE>() + (int64_t)fm.mod(h);
}

}  // namespace fastkd
