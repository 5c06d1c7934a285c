// encode_text.cpp -- see encode_text.h. Work split: the buffer is cut at line ends into one range
// per thread; each thread counts its lines, the counts are summed in order, and each thread then
// writes its rows at its own offset (two passes over bytes that stay in cache per range).
#include "encode_text.h"

#include <math.h>

#include <algorithm>
#include <stdexcept>
#include <thread>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace fastkd {
namespace {

constexpr int MAX_COLS = 1024;
// below this many bytes per thread a thread costs more to start than it saves
constexpr int64_t MIN_BYTES_PER_THREAD = 1 << 20;
enum LineStatus { LINE_OK = 0, LINE_FALLBACK = 1, LINE_EMPTY = 2 };

// Decimal of v into buf (at most 21 bytes); returns the length.
inline int write_decimal(int64_t v, char* buf) {
  char tmp[24];
  int n = 0;
  const bool neg = v < 0;
  uint64_t u = neg ? (uint64_t)(-(v + 1)) + 1 : (uint64_t)v;
  do {
    tmp[n++] = (char)('0' + u % 10);
    u /= 10;
  } while (u);
  int k = 0;
  if (neg) buf[k++] = '-';
  while (n) buf[k++] = tmp[--n];
  return k;
}

// A plain integer token ("-"? then 1..15 digits): exact in a double, as Python's float() reads it.
inline bool parse_int(const uint8_t* a, const uint8_t* b, int64_t* v) {
  bool neg = false;
  if (a < b && *a == '-') {
    neg = true;
    ++a;
  }
  if (a == b || b - a > 15) return false;
  int64_t x = 0;
  for (; a < b; ++a) {
    if (*a < '0' || *a > '9') return false;
    x = x * 10 + (*a - '0');
  }
  *v = neg ? -x : x;
  return true;
}

// The numeric rule's token for a present value (fastkd.data.bucketize_numeric); false when the
// floor of log(v)^2 is too close to call (left to numpy, whose log may differ in the last bit).
inline bool numeric_token(int64_t v, char* buf, int* len) {
  if (v <= 2) {
    buf[0] = 'S';
    buf[1] = 'P';
    *len = 2 + write_decimal(v, buf + 2);
    return true;
  }
  const double d = log((double)v);
  const double q = d * d;
  const double k = floor(q);
  if (q - k < 1e-9 * q || (k + 1) - q < 1e-9 * q) return false;
  *len = write_decimal((int64_t)k, buf);
  return true;
}

// Values whose numeric-rule ids come from tables built once per call (Tables): the common small
// integers, and the bucket numbers floor(log(v)^2) of every v < 10^15 (parse_int's limit; at most 1,193).
constexpr int64_t SP_MIN = -64;           // "SP<v>" tokens tabled for v in [SP_MIN, 2]
constexpr int64_t KV_MAX = 1 << 16;       // floor(log(v)^2) tabled for v in [3, KV_MAX)
constexpr int K_MAX = 1300;               // "<k>" tokens tabled for k in [0, K_MAX)
constexpr uint16_t K_UNSURE = 0xFFFF;

// floor(log(v)^2) for v in [3, KV_MAX), K_UNSURE where it is too close to call (see numeric_token).
const uint16_t* k_of_v() {
  static const std::vector<uint16_t> table = [] {
    std::vector<uint16_t> t(KV_MAX, K_UNSURE);
    char buf[32];
    int len;
    for (int64_t v = 3; v < KV_MAX; ++v)
      if (numeric_token(v, buf, &len)) t[v] = (uint16_t)floor(log((double)v) * log((double)v));
    return t;
  }();
  return table.data();
}

struct Tables {
  std::vector<int64_t> sp, k;  // [F][2 - SP_MIN + 1], [F][K_MAX]; numeric fields only
  const uint16_t* kv = k_of_v();
  Tables(const TextFields& spec) {
    const size_t F = spec.col.size();
    sp.assign(F * (2 - SP_MIN + 1), 0);
    k.assign(F * K_MAX, 0);
    char buf[32];
    for (size_t f = 0; f < F; ++f) {
      if (!spec.numeric[f]) continue;
      for (int64_t v = SP_MIN; v <= 2; ++v) {
        buf[0] = 'S';
        buf[1] = 'P';
        const int len = 2 + write_decimal(v, buf + 2);
        sp[f * (2 - SP_MIN + 1) + (v - SP_MIN)] = bucket<MODE_BUCKET0>(
            xxh3_64(reinterpret_cast<const uint8_t*>(buf), (uint64_t)len, spec.seed[f]), false, spec.fm[f]);
      }
      for (int64_t kk = 0; kk < K_MAX; ++kk) {
        const int len = write_decimal(kk, buf);
        k[f * K_MAX + kk] = bucket<MODE_BUCKET0>(
            xxh3_64(reinterpret_cast<const uint8_t*>(buf), (uint64_t)len, spec.seed[f]), false, spec.fm[f]);
      }
    }
  }
};

// The id of a present numeric token, or -1 to leave the line to Python.
inline int64_t numeric_id(const uint8_t* a, const uint8_t* b, size_t f, const TextFields& sp, const Tables& tb) {
  int64_t v;
  if (!parse_int(a, b, &v)) return -1;
  if (v <= 2 && v >= SP_MIN) return tb.sp[f * (2 - SP_MIN + 1) + (v - SP_MIN)];
  if (v > 2 && v < KV_MAX) {
    const uint16_t kk = tb.kv[v];
    return kk == K_UNSURE ? -1 : tb.k[f * K_MAX + kk];
  }
  char buf[32];
  int len;
  if (!numeric_token(v, buf, &len)) return -1;
  return bucket<MODE_BUCKET0>(xxh3_64(reinterpret_cast<const uint8_t*>(buf), (uint64_t)len, sp.seed[f]), false,
                              sp.fm[f]);
}

inline int parse_line(const uint8_t* s, const uint8_t* e, const TextFields& sp, const Tables& tb, int64_t* out,
                      float* label) {
  while (e > s && (e[-1] == '\r' || e[-1] == '\n')) --e;  // the reader's rstrip("\r\n")
  if (s == e) return LINE_EMPTY;
  const uint8_t* starts[MAX_COLS + 1];
  int n = 0;
  starts[n++] = s;
  const uint8_t* p = s;
#if defined(__SSE2__)
  // 16 bytes at a time: tab positions, and any '\r' or byte >= 0x80 (left to Python)
  const __m128i tab = _mm_set1_epi8('\t'), cr = _mm_set1_epi8('\r');
  for (; p + 16 <= e; p += 16) {
    const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    if (_mm_movemask_epi8(x) | _mm_movemask_epi8(_mm_cmpeq_epi8(x, cr))) return LINE_FALLBACK;
    unsigned m = (unsigned)_mm_movemask_epi8(_mm_cmpeq_epi8(x, tab));
    while (m) {
      if (n > sp.n_cols) return LINE_FALLBACK;
      starts[n++] = p + __builtin_ctz(m) + 1;
      m &= m - 1;
    }
  }
#endif
  for (; p < e; ++p) {
    const uint8_t c = *p;
    if (c == '\t') {
      if (n > sp.n_cols) return LINE_FALLBACK;
      starts[n++] = p + 1;
    } else if (c >= 0x80 || c == '\r') {
      return LINE_FALLBACK;
    }
  }
  if (n != sp.n_cols) return LINE_FALLBACK;
  starts[n] = e + 1;  // so that column k spans [starts[k], starts[k + 1] - 1)
  const uint8_t* la = starts[sp.label_col];
  const uint8_t* lb = starts[sp.label_col + 1] - 1;
  if (lb - la != 1 || (*la != '0' && *la != '1')) return LINE_FALLBACK;
  *label = *la == '1' ? 1.0f : 0.0f;
  const size_t F = sp.col.size();
  for (size_t f = 0; f < F; ++f) {
    const uint8_t* a = starts[sp.col[f]];
    const uint8_t* b = starts[sp.col[f] + 1] - 1;
    if (a == b) {
      out[f] = 0;
      continue;
    }
    if (sp.numeric[f]) {
      const int64_t id = numeric_id(a, b, f, sp, tb);
      if (id < 0) return LINE_FALLBACK;
      out[f] = id;
    } else {
      out[f] = bucket<MODE_BUCKET0>(xxh3_64(a, (uint64_t)(b - a), sp.seed[f]), false, sp.fm[f]);
    }
  }
  return LINE_OK;
}

struct Range {
  int64_t begin = 0, end = 0;   // bytes [begin, end): whole lines
  int64_t lines = 0, rows = 0;  // counted in pass 1
  int64_t first_line = 0, first_row = 0;
  TextResult found;
};

// Next line start at or after `at` (the byte after a '\n'), or len.
int64_t line_start(const uint8_t* buf, int64_t len, int64_t at) {
  if (at <= 0) return 0;
  const void* nl = memchr(buf + at - 1, '\n', (size_t)(len - at + 1));
  return nl ? (const uint8_t*)nl - buf + 1 : len;
}

void count_range(const uint8_t* buf, Range& r) {
  for (int64_t p = r.begin; p < r.end;) {
    const void* nl = memchr(buf + p, '\n', (size_t)(r.end - p));
    const int64_t q = nl ? (const uint8_t*)nl - buf : r.end;
    const uint8_t* s = buf + p;
    const uint8_t* e = buf + q;
    while (e > s && e[-1] == '\r') --e;
    r.lines += 1;
    r.rows += e > s;
    p = q + 1;
  }
}

void encode_range(const uint8_t* buf, const TextFields& sp, const Tables& tb, int64_t* ids, float* labels, Range& r) {
  const int64_t F = (int64_t)sp.col.size();
  int64_t line = r.first_line, row = r.first_row;
  for (int64_t p = r.begin; p < r.end; ++line) {
    const void* nl = memchr(buf + p, '\n', (size_t)(r.end - p));
    const int64_t q = nl ? (const uint8_t*)nl - buf : r.end;
    const int st = parse_line(buf + p, buf + q, sp, tb, ids + row * F, labels + row);
    if (st == LINE_FALLBACK) {
      r.found.fallback.push_back(row);
      r.found.fb_line.push_back(line);
      r.found.fb_start.push_back(p);
      r.found.fb_end.push_back(q);
    }
    row += st != LINE_EMPTY;
    p = q + 1;
  }
}

}  // namespace

TextResult encode_tsv(const uint8_t* buf, int64_t len, const TextFields& sp, int64_t* ids, float* labels,
                      int64_t capacity, int num_threads) {
  if (sp.n_cols < 1 || sp.n_cols > MAX_COLS) throw std::invalid_argument("n_cols out of range");
  const int64_t nt = std::max<int64_t>(1, std::min<int64_t>(num_threads, len / MIN_BYTES_PER_THREAD));
  std::vector<Range> ranges(nt);
  for (int64_t t = 0; t < nt; ++t) {
    ranges[t].begin = line_start(buf, len, len * t / nt);
    ranges[t].end = t + 1 < nt ? line_start(buf, len, len * (t + 1) / nt) : len;
  }
  auto parallel = [&](auto fn) {
    std::vector<std::thread> pool;
    for (int64_t t = 1; t < nt; ++t) pool.emplace_back(fn, t);
    fn(0);
    for (auto& th : pool) th.join();
  };
  parallel([&](int64_t t) { count_range(buf, ranges[t]); });
  TextResult res;
  for (auto& r : ranges) {
    r.first_line = res.lines;
    r.first_row = res.rows;
    res.lines += r.lines;
    res.rows += r.rows;
  }
  if (res.rows > capacity) throw std::invalid_argument("output capacity is smaller than the buffer's rows");
  const Tables tb(sp);
  parallel([&](int64_t t) { encode_range(buf, sp, tb, ids, labels, ranges[t]); });
  for (auto& r : ranges) {
    auto& f = r.found;
    res.fallback.insert(res.fallback.end(), f.fallback.begin(), f.fallback.end());
    res.fb_line.insert(res.fb_line.end(), f.fb_line.begin(), f.fb_line.end());
    res.fb_start.insert(res.fb_start.end(), f.fb_start.begin(), f.fb_start.end());
    res.fb_end.insert(res.fb_end.end(), f.fb_end.begin(), f.fb_end.end());
  }
  return res;
}

}  // namespace fastkd
