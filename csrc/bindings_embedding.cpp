// bindings_embedding.cpp -- pybind11 module fastkd._embedding: the CPU engine behind
// MultiFieldEmbedding's sparse and fused-optimizer backward (fastkd/_embedding_native.py).
//
// Like fastkd._hashing it is not built against torch: the Python side checks dtypes, shapes and
// contiguity, keeps the tensors alive for the call, and passes their data addresses; the work
// runs without the GIL. Two steps, so that the caller can size the merged output exactly:
//   s = sort_rows(rows, n, num_rows)            group the lookups by row (s.num_unique = U)
//   s.merge(grad, dim, out_rows, out_merged, t)  or  s.fused_update(grad, dim, weight, state, lr, eps, t)
#include <pybind11/pybind11.h>

#include <memory>
#include <string>

#include "embedding_cpu.h"

namespace py = pybind11;
using namespace fastkd;

namespace {

constexpr int64_t LIMIT_32 = int64_t(1) << 32;

template <class T>
T* as_ptr(uint64_t addr) {
  return reinterpret_cast<T*>(static_cast<uintptr_t>(addr));
}

void check_positive(const char* name, int64_t v) {
  if (v <= 0) throw py::value_error(std::string(name) + " must be positive, got " + std::to_string(v));
}

void check_nonnull(const char* name, uint64_t addr) {
  if (addr == 0) throw py::value_error(std::string(name) + " must be a non-null address");
}

}  // namespace

PYBIND11_MODULE(_embedding, m) {
  m.doc() = "fastkd native CPU embedding backward (private; used by fastkd.MultiFieldEmbedding)";
  py::class_<SortedRows, std::shared_ptr<SortedRows>>(m, "SortedRows")
      .def_property_readonly("num_unique", &SortedRows::num_unique)
      .def_property_readonly("num_lookups", [](const SortedRows& s) { return (int64_t)s.keys.size(); })
      // grad float32 [n, dim]; out_rows int64 [U]; out_merged float32 [U, dim]
      .def(
          "merge",
          [](const SortedRows& s, uint64_t grad, int64_t dim, uint64_t out_rows, uint64_t out_merged,
             int num_threads) {
            check_positive("dim", dim);
            if (s.num_unique() == 0) return;
            check_nonnull("grad", grad);
            check_nonnull("out_rows", out_rows);
            check_nonnull("out_merged", out_merged);
            py::gil_scoped_release nogil;
            merge_rows_cpu(s, as_ptr<const float>(grad), dim, as_ptr<int64_t>(out_rows), as_ptr<float>(out_merged),
                           std::max(1, num_threads));
          },
          py::arg("grad"), py::arg("dim"), py::arg("out_rows"), py::arg("out_merged"), py::arg("num_threads"))
      // grad float32 [n, dim]; weight float32 [num_rows, dim]; state float32 [num_rows, dim] or 0 (SGD)
      .def(
          "fused_update",
          [](const SortedRows& s, uint64_t grad, int64_t dim, uint64_t weight, uint64_t state, double lr, double eps,
             int num_threads) {
            check_positive("dim", dim);
            if (s.num_unique() == 0) return;
            check_nonnull("grad", grad);
            check_nonnull("weight", weight);
            py::gil_scoped_release nogil;
            fused_update_cpu(s, as_ptr<const float>(grad), dim, as_ptr<float>(weight), as_ptr<float>(state),
                             (float)lr, (float)eps, std::max(1, num_threads));
          },
          py::arg("grad"), py::arg("dim"), py::arg("weight"), py::arg("state"), py::arg("lr"), py::arg("eps"),
          py::arg("num_threads"));
  // rows int64 [n]; a value outside [0, num_rows) raises IndexError (std::out_of_range)
  m.def(
      "sort_rows",
      [](uint64_t rows, int64_t n, int64_t num_rows) {
        if (n < 0 || n >= LIMIT_32) throw py::value_error("n (lookups) must lie in [0, 2^32), got " + std::to_string(n));
        if (num_rows <= 0 || num_rows > LIMIT_32)
          throw py::value_error("num_rows must lie in [1, 2^32], got " + std::to_string(num_rows));
        if (n > 0) check_nonnull("rows", rows);
        auto s = std::make_shared<SortedRows>();
        {
          py::gil_scoped_release nogil;
          sort_rows_cpu(as_ptr<const int64_t>(rows), n, num_rows, *s);
        }
        return s;
      },
      py::arg("rows"), py::arg("n"), py::arg("num_rows"));
  m.def("set_simd_level", &set_simd_level, py::arg("level"),
        "cap the row kernels: 0 portable, 1 AVX2+FMA, 2 AVX-512 (clamped to the CPU); returns the level in use");
  m.def("simd_level", &simd_level);
}
