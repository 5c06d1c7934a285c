// encode_text.h -- tab-separated CTR text (Criteo's layout) straight to hashed ids, many threads.
//
// The fast path of fastkd.data's hashing encoder for `criteo` files: each line
// `label<TAB>col1<TAB>...` is split, its label read, and every selected column hashed into its
// field's bucket exactly as the Python path does (FeatureEncoder(kind="hash") on the criteo reader's
// tokens), so the two agree bit for bit:
//   categorical token t (bytes as in the file): id = bucket<MODE_BUCKET0>(xxh3_64(t, seed_f)), "" -> 0;
//   numeric token (Criteo's I1..I13): v = int(t); token "SP<v>" if v <= 2 else "<floor(log(v)^2)>",
//   then hashed as above; "" -> 0.
// A line the fast path cannot decide with certainty -- a byte >= 0x80, a '\r' inside it, a column
// count other than n_cols, a label other than "0"/"1", a numeric token that is not a plain integer
// of at most 15 digits, log(v)^2 within 1e-9 of an integer -- is not guessed at: its row is marked
// for the Python reader, which gives the exact id or the malformed-row reason.
#pragma once

#include <stdint.h>

#include <vector>

#include "fastkd_hash.h"

namespace fastkd {

struct TextFields {
  int n_cols = 0;                 // columns per line, label included
  int label_col = 0;              // the label's column
  std::vector<int> col;           // output field f reads column col[f]
  std::vector<uint8_t> numeric;   // field f follows the numeric bucketing rule
  std::vector<uint64_t> seed;     // xxh3 seed of field f
  std::vector<FastMod> fm;        // modulo by num_buckets[f] - 1 (ids 1..num_buckets-1; 0 = missing)
};

// What one call found; rows are the buffer's non-empty lines, in order.
struct TextResult {
  int64_t lines = 0;                 // '\n'-terminated lines seen (plus a last unterminated one)
  int64_t rows = 0;                  // non-empty lines = rows written to ids/labels
  std::vector<int64_t> fallback;     // rows the Python reader must decide
  std::vector<int64_t> fb_line;      // their 0-based line index within the buffer
  std::vector<int64_t> fb_start;     // their byte range [start, end) in the buffer
  std::vector<int64_t> fb_end;
};

// Encode every non-empty line of buf[0, len) into ids[rows, F] (row-major) and labels[rows];
// capacity must be at least the buffer's line count ('\n' count + 1). Call without the GIL.
TextResult encode_tsv(const uint8_t* buf, int64_t len, const TextFields& spec, int64_t* ids, float* labels,
                      int64_t capacity, int num_threads);

}  // namespace fastkd
