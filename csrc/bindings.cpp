// bindings.cpp -- pybind11 module fastkd._hashing: the CPU engine behind fastkd.hashing.
//
// The extension is deliberately not built against torch or numpy headers: fastkd/hashing.py
// unpacks numpy arrays, torch CPU tensors and Arrow arrays into raw buffer addresses (which it keeps
// alive for the call), and this module only reads/writes those buffers. Python str/bytes objects are
// the one input read here, under the GIL, before the GIL is released for the hashing itself.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <vector>

#include "encode_text.h"
#include "hash_cpu.h"

namespace py = pybind11;
using namespace fastkd;

namespace {

template <class T>
T* as_ptr(const py::handle& h) {
  return reinterpret_cast<T*>(static_cast<uintptr_t>(h.cast<unsigned long long>()));
}

// Pointers and lengths of Python str/bytes values, plus the references that keep them alive.
struct ObjectViews {
  std::vector<const uint8_t*> ptrs;
  std::vector<int64_t> lens;
  std::vector<PyObject*> refs;
  ~ObjectViews() {
    if (refs.empty()) return;
    py::gil_scoped_acquire gil;
    for (PyObject* o : refs) Py_DECREF(o);
  }
};

bool is_missing_object(PyObject* o, const py::tuple& missing_objects) {
  if (o == Py_None) return true;
  if (PyFloat_Check(o) && std::isnan(PyFloat_AS_DOUBLE(o))) return true;
  for (const py::handle& m : missing_objects)
    if (o == m.ptr()) return true;
  return false;
}

// Reads items[0..n) (str -> UTF-8 bytes, bytes as they are, missing -> length -1). Anything else
// raises TypeError naming the row.
void read_objects(PyObject* const* items, int64_t n, int64_t row_start, const std::string& where,
                  const py::tuple& missing_objects, ObjectViews& v) {
  v.ptrs.resize(n);
  v.lens.resize(n);
  v.refs.reserve(n);
  for (int64_t i = 0; i < n; ++i) {
    PyObject* o = items[i];
    if (PyUnicode_Check(o)) {
      Py_ssize_t len = 0;
      const char* s = PyUnicode_AsUTF8AndSize(o, &len);  // cached in the object: no copy on re-use
      if (s == nullptr) {
        PyErr_Clear();
        throw py::value_error(where + "row " + std::to_string(row_start + i) +
                              ": string cannot be encoded as UTF-8 (lone surrogate?)");
      }
      v.ptrs[i] = reinterpret_cast<const uint8_t*>(s);
      v.lens[i] = len;
    } else if (PyBytes_Check(o)) {
      v.ptrs[i] = reinterpret_cast<const uint8_t*>(PyBytes_AS_STRING(o));
      v.lens[i] = PyBytes_GET_SIZE(o);
    } else if (is_missing_object(o, missing_objects)) {
      v.ptrs[i] = nullptr;
      v.lens[i] = -1;
      continue;
    } else {
      throw py::type_error(where + "row " + std::to_string(row_start + i) + ": expected str, bytes or None, got " +
                           std::string(Py_TYPE(o)->tp_name));
    }
    Py_INCREF(o);
    v.refs.push_back(o);
  }
}

// The tail shared by Arrow string and int64 chunk tuples, from t[first] on:
// (data_addr, validity_addr, validity_bit_offset, n).
void read_buffer_chunk(const py::tuple& t, size_t first, Chunk& c) {
  if (t.size() != first + 4) throw py::value_error("chunk kind " + std::to_string(c.kind) + " takes " +
                                                   std::to_string(first + 4) + " items");
  c.data = as_ptr<const uint8_t>(t[first]);
  c.validity = as_ptr<const uint8_t>(t[first + 1]);
  c.validity_offset = t[first + 2].cast<int64_t>();
  c.n = t[first + 3].cast<int64_t>();
}

}  // namespace

// hash_columns(columns, n_rows, algorithm, mode, num_threads, missing_objects) -> None
//
//   columns:   list of (chunks, out_addr, out_stride, seed, modulus), one per output column
//     chunks:  list of chunk tuples covering rows 0..n_rows-1 in order, each one of
//       (0 | 1, offsets_addr, data_addr, validity_addr, validity_bit_offset, n)   Arrow (large_)string;
//                offsets_addr already points at the array's first offset, validity_addr 0 = no nulls
//       (2, list_or_tuple)                                                    Python str/bytes/None
//       (5, items_addr, n)      contiguous numpy object array data (PyObject*[n]), kept alive by caller
//       (3, values_addr, validity_addr, validity_bit_offset, n)              int64, little-endian
//       (4, data_addr, itemsize, n)                                           numpy 'S<itemsize>'
//     out_addr:   int64 [n_rows] with stride out_stride (elements), written in place
//     seed:       uint64 (murmur3 uses the low 32 bits; the caller checks the range)
//     modulus:    num_buckets (mode 0) or num_buckets - 1 (mode 1); 1 <= modulus <= 2^63
//   algorithm: 0 = xxh3, 1 = murmur3;  mode: 0 = h % nb, 1 = missing/empty -> 0 else 1 + h % (nb - 1)
//   missing_objects: extra singletons (pandas.NA, ...) treated like None in object inputs
static void hash_columns(const py::list& columns, int64_t n_rows, int algorithm, int mode, int num_threads,
                         const py::tuple& missing_objects) {
  if (algorithm != ALGO_XXH3 && algorithm != ALGO_MURMUR3) throw py::value_error("unknown algorithm id");
  if (mode != MODE_PLAIN && mode != MODE_BUCKET0) throw py::value_error("unknown mode id");
  std::vector<Column> cols;
  std::vector<std::unique_ptr<ObjectViews>> views;  // destroyed (and decref'd) after hashing
  cols.reserve(columns.size());
  for (const py::handle& spec_h : columns) {
    py::tuple spec = py::reinterpret_borrow<py::tuple>(spec_h);
    if (spec.size() != 5) throw py::value_error("column spec must have 5 items");
    Column col;
    col.out = as_ptr<int64_t>(spec[1]);
    col.out_stride = spec[2].cast<int64_t>();
    col.seed = spec[3].cast<uint64_t>();
    const uint64_t modulus = spec[4].cast<uint64_t>();
    if (modulus < 1 || modulus > (1ULL << 63)) throw py::value_error("modulus out of range [1, 2^63]");
    col.fm = make_fastmod(modulus);
    int64_t row = 0;
    for (const py::handle& ch_h : py::reinterpret_borrow<py::list>(spec[0])) {
      py::tuple t = py::reinterpret_borrow<py::tuple>(ch_h);
      Chunk c;
      c.kind = t[0].cast<int>();
      c.row_start = row;
      switch (c.kind) {
        case KIND_OFFSETS32:
        case KIND_OFFSETS64:
          c.offsets = as_ptr<const void>(t[1]);
          read_buffer_chunk(t, 2, c);
          break;
        case KIND_INT64:
          read_buffer_chunk(t, 1, c);
          break;
        case KIND_FIXED:
          c.data = as_ptr<const uint8_t>(t[1]);
          c.itemsize = t[2].cast<int64_t>();
          c.n = t[3].cast<int64_t>();
          break;
        case KIND_VIEWS:
        case 5: {
          PyObject* const* items;
          if (c.kind == 5) {
            items = as_ptr<PyObject* const>(t[1]);
            c.n = t[2].cast<int64_t>();
          } else if (PyList_Check(t[1].ptr()) || PyTuple_Check(t[1].ptr())) {
            items = PySequence_Fast_ITEMS(t[1].ptr());  // the list's own item array, no copy
            c.n = PySequence_Fast_GET_SIZE(t[1].ptr());
          } else {
            throw py::type_error("object chunk must be a list or tuple");
          }
          views.emplace_back(new ObjectViews());
          // name the field too when several columns are hashed together (FeatureHasher.transform)
          const std::string where = columns.size() > 1 ? "field " + std::to_string(cols.size()) + ", " : "";
          read_objects(items, c.n, row, where, missing_objects, *views.back());
          c.kind = KIND_VIEWS;
          c.ptrs = views.back()->ptrs.data();
          c.lens = views.back()->lens.data();
          break;
        }
        default:
          throw py::value_error("unknown chunk kind " + std::to_string(c.kind));
      }
      row += c.n;
      col.chunks.push_back(c);
    }
    if (row != n_rows) throw py::value_error("chunks cover " + std::to_string(row) + " rows, expected " +
                                             std::to_string(n_rows));
    cols.push_back(std::move(col));
  }
  {
    py::gil_scoped_release nogil;
    hash_columns_cpu(cols, n_rows, algorithm, mode, std::max(1, num_threads));
  }
}

// Tab-separated lines -> hashed ids (encode_text.h). Buffers are raw addresses kept alive by the
// caller (fastkd.data.readers.native): buf [length] bytes, ids [capacity, F] int64, labels [capacity] float32.
py::dict encode_tsv_py(uint64_t buf, int64_t length, int n_cols, int label_col, const std::vector<int>& cols,
                       const std::vector<int>& numeric, const std::vector<uint64_t>& seeds,
                       const std::vector<uint64_t>& num_buckets, uint64_t ids, uint64_t labels, int64_t capacity,
                       int num_threads) {
  const size_t F = cols.size();
  if (numeric.size() != F || seeds.size() != F || num_buckets.size() != F)
    throw py::value_error("encode_tsv: cols, numeric, seeds and num_buckets must have one entry per field");
  TextFields sp;
  sp.n_cols = n_cols;
  sp.label_col = label_col;
  if (label_col < 0 || label_col >= n_cols) throw py::value_error("encode_tsv: label_col out of range");
  for (size_t f = 0; f < F; ++f) {
    if (cols[f] < 0 || cols[f] >= n_cols) throw py::value_error("encode_tsv: cols[" + std::to_string(f) + "] out of range");
    if (num_buckets[f] < 2) throw py::value_error("encode_tsv: num_buckets must be >= 2");
    sp.col.push_back(cols[f]);
    sp.numeric.push_back(numeric[f] != 0);
    sp.seed.push_back(seeds[f]);
    sp.fm.push_back(make_fastmod(num_buckets[f] - 1));
  }
  TextResult r;
  {
    py::gil_scoped_release nogil;
    r = encode_tsv(reinterpret_cast<const uint8_t*>(buf), length, sp, reinterpret_cast<int64_t*>(ids),
                   reinterpret_cast<float*>(labels), capacity, std::max(1, num_threads));
  }
  py::dict d;
  d["lines"] = r.lines;
  d["rows"] = r.rows;
  d["fallback"] = r.fallback;
  d["fb_line"] = r.fb_line;
  d["fb_start"] = r.fb_start;
  d["fb_end"] = r.fb_end;
  return d;
}

PYBIND11_MODULE(_hashing, m) {
  m.doc() = "fastkd native CPU hashing (private; use fastkd.hashing)";
  m.def("hash_columns", &hash_columns, py::arg("columns"), py::arg("n_rows"), py::arg("algorithm"),
        py::arg("mode"), py::arg("num_threads"), py::arg("missing_objects"));
  m.def("encode_tsv", &encode_tsv_py, py::arg("buf"), py::arg("length"), py::arg("n_cols"), py::arg("label_col"),
        py::arg("cols"), py::arg("numeric"), py::arg("seeds"), py::arg("num_buckets"), py::arg("ids"),
        py::arg("labels"), py::arg("capacity"), py::arg("num_threads"));
  // One value at a time: the exactness tests compare these with xxhash/mmh3 and Python's %.
  m.def("xxh3_64", [](const py::bytes& b, uint64_t seed) {
    std::string_view s = b;
    return xxh3_64(reinterpret_cast<const uint8_t*>(s.data()), s.size(), seed);
  });
  m.def("murmur3_32", [](const py::bytes& b, uint32_t seed) {
    std::string_view s = b;
    return murmur3_32(reinterpret_cast<const uint8_t*>(s.data()), s.size(), seed);
  });
  m.def("xxh3_64_int", [](int64_t v, uint64_t seed) { return xxh3_64_u64((uint64_t)v, seed); });
  m.def("murmur3_32_int", [](int64_t v, uint32_t seed) { return murmur3_32_u64((uint64_t)v, seed); });
  m.def("set_simd", &set_simd_enabled, "use the AVX-512 paths when the CPU has them (else scalar); returns the state");
  m.def("simd_enabled", &simd_enabled);
  m.def("fastmod_simd", [](const std::vector<uint64_t>& x, uint64_t d) -> py::object {
    if (x.size() != 8) throw py::value_error("fastmod_simd takes 8 values");
    if (d < 1 || d > (1ULL << 63)) throw py::value_error("d out of range [1, 2^63]");
    uint64_t r[8];
    if (!simd_mod8(x.data(), d, r)) return py::none();
    return py::cast(std::vector<uint64_t>(r, r + 8));
  });
  m.def("fastmod", [](uint64_t x, uint64_t d) {
    if (d < 1 || d > (1ULL << 63)) throw py::value_error("d out of range [1, 2^63]");
    return make_fastmod(d).mod(x);
  });
}
