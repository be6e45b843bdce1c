// Non-owning strided views, so adapters can hand over framework memory without copies.
#pragma once

#include <cstdint>

namespace lsoftmax {

template <typename T>
struct MatrixView {
  T* data = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;
  int64_t row_stride = 0;  // in elements
  int64_t col_stride = 1;  // in elements

  T& operator()(int64_t i, int64_t j) const { return data[i * row_stride + j * col_stride]; }

  // The same matrix, read-only.
  MatrixView<const T> as_const() const { return {data, rows, cols, row_stride, col_stride}; }

  static MatrixView contiguous(T* data, int64_t rows, int64_t cols) {
    return MatrixView{data, rows, cols, cols, 1};
  }
};

template <typename L>
struct LabelView {
  const L* data = nullptr;
  int64_t size = 0;
  int64_t stride = 1;  // in elements

  L operator[](int64_t i) const { return data[i * stride]; }
};

}  // namespace lsoftmax
