// Packing planner: deterministic first-fit-decreasing of sequence lengths into rows of at most
// max_tokens, over a seeded shuffle window. The Python twin (mpo/data/plan.py) implements the
// same steps and must return identical rows:
//   1. order = 0..n-1, Fisher-Yates shuffled with splitmix64(seed) (no shuffle when seeded = false):
//      for i = n-1 .. 1: j = next() % (i + 1); swap(order[i], order[j]).
//   2. for each window of `window` consecutive entries of order: stable-sort by length, longest
//      first; place each item in the first row (in opening order) with room, opening a new row
//      when none has; emit the window's rows in opening order, items in placement order.
// First fit is found in O(log window) with a max segment tree over row capacities whose unopened
// leaves hold max_tokens: the leftmost leaf with room is exactly the first-fit row, and a new row
// is "opened" when the search lands on the first unopened leaf.
// Input errors throw std::invalid_argument, which pybind11 raises as ValueError.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace py = pybind11;

namespace {

struct SplitMix64 {
  uint64_t state;
  uint64_t next() {
    uint64_t z = (state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
  }
};

class CapacityTree {
 public:
  CapacityTree(int64_t leaves, int64_t capacity) : size_(1) {
    while (size_ < leaves) size_ <<= 1;
    tree_.assign(2 * size_, capacity);
  }
  // Leftmost leaf whose capacity is >= need (the root is known to have room).
  int64_t first_fit(int64_t need) const {
    int64_t node = 1;
    while (node < size_) node = tree_[2 * node] >= need ? 2 * node : 2 * node + 1;
    return node - size_;
  }
  void take(int64_t leaf, int64_t amount) {
    int64_t node = leaf + size_;
    tree_[node] -= amount;
    for (node >>= 1; node >= 1; node >>= 1) tree_[node] = std::max(tree_[2 * node], tree_[2 * node + 1]);
  }

 private:
  int64_t size_;
  std::vector<int64_t> tree_;
};

// Rows as one flat array of items plus row offsets (row r = items[offsets[r] .. offsets[r+1])).
struct Rows {
  std::vector<int64_t> items;
  std::vector<int64_t> offsets{0};
};

Rows plan(const std::vector<int64_t>& lengths, int64_t max_tokens, bool seeded, uint64_t seed, int64_t window) {
  const int64_t n = static_cast<int64_t>(lengths.size());
  std::vector<int64_t> order(n);
  for (int64_t i = 0; i < n; ++i) order[i] = i;
  if (seeded) {
    SplitMix64 rng{seed};
    for (int64_t i = n - 1; i > 0; --i) std::swap(order[i], order[rng.next() % static_cast<uint64_t>(i + 1)]);
  }
  Rows rows;
  rows.items.resize(n);
  std::vector<std::pair<int64_t, int64_t>> items;  // (length, index): sorted without random reads
  std::vector<int64_t> leaf_of, fill;
  for (int64_t lo = 0; lo < n; lo += window) {
    const int64_t hi = std::min(lo + window, n);
    items.clear();
    for (int64_t k = lo; k < hi; ++k) items.emplace_back(lengths[order[k]], order[k]);
    std::stable_sort(items.begin(), items.end(), [](const auto& a, const auto& b) { return a.first > b.first; });
    CapacityTree tree(hi - lo, max_tokens);
    leaf_of.assign(items.size(), 0);
    int64_t opened = 0;
    for (size_t k = 0; k < items.size(); ++k) {
      const int64_t leaf = tree.first_fit(items[k].first);
      tree.take(leaf, items[k].first);
      leaf_of[k] = leaf;
      opened = std::max(opened, leaf + 1);
    }
    // Counting sort by row keeps each row's items in placement order.
    fill.assign(opened + 1, 0);
    for (int64_t leaf : leaf_of) ++fill[leaf + 1];
    for (int64_t r = 0; r < opened; ++r) fill[r + 1] += fill[r];
    const int64_t base = rows.offsets.back();
    for (int64_t r = 1; r <= opened; ++r) rows.offsets.push_back(base + fill[r]);
    for (size_t k = 0; k < items.size(); ++k) rows.items[base + fill[leaf_of[k]]++] = items[k].second;
  }
  return rows;
}

py::list plan_packing(py::array_t<int64_t, py::array::c_style | py::array::forcecast> lengths, int64_t max_tokens,
                      py::object seed, int64_t window) {
  if (lengths.ndim() != 1) throw std::invalid_argument("lengths must be one-dimensional");
  if (max_tokens <= 0) throw std::invalid_argument("max_tokens must be > 0, got " + std::to_string(max_tokens));
  if (window <= 0) throw std::invalid_argument("window must be > 0, got " + std::to_string(window));
  const bool seeded = !seed.is_none();
  const uint64_t seed_value = seeded ? seed.cast<uint64_t>() : 0;
  std::vector<int64_t> values(lengths.data(), lengths.data() + lengths.size());
  for (size_t i = 0; i < values.size(); ++i) {
    if (values[i] <= 0 || values[i] > max_tokens)
      throw std::invalid_argument("length " + std::to_string(values[i]) + " at index " + std::to_string(i) +
                                  " is outside 1.." + std::to_string(max_tokens) + " (max_tokens)");
  }
  Rows rows;
  {
    py::gil_scoped_release release;
    rows = plan(values, max_tokens, seeded, seed_value, window);
  }
  // Millions of small objects: the raw C API (PyList_SET_ITEM steals the new references) is
  // several times faster than pybind11's checked item assignment, and pausing the cyclic GC
  // stops generational collections from rescanning the growing set of new lists.
  const bool gc_was_enabled = PyGC_Disable();
  const size_t n_rows = rows.offsets.size() - 1;
  PyObject* out = PyList_New(static_cast<Py_ssize_t>(n_rows));
  for (size_t r = 0; out && r < n_rows; ++r) {
    const int64_t lo = rows.offsets[r], hi = rows.offsets[r + 1];
    PyObject* row = PyList_New(hi - lo);
    if (!row) {
      Py_CLEAR(out);
      break;
    }
    PyList_SET_ITEM(out, r, row);  // owned by `out` from here, freed with it on failure
    for (int64_t k = lo; k < hi; ++k) {
      PyObject* item = PyLong_FromLongLong(rows.items[k]);
      if (!item) {
        Py_CLEAR(out);
        break;
      }
      PyList_SET_ITEM(row, k - lo, item);
    }
  }
  if (gc_was_enabled) PyGC_Enable();
  if (!out) throw py::error_already_set();
  return py::reinterpret_steal<py::list>(out);
}

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() = "Native helpers of mpo: the packing planner";
  m.def("plan_packing", &plan_packing, py::arg("lengths"), py::arg("max_tokens"), py::arg("seed"),
        py::arg("window"), "First-fit-decreasing rows over a seeded shuffle window (see mpo.data.plan_packing)");
}
