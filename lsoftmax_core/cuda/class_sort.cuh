// The stable radix sort of rows by class that the deterministic gradient scatters of both cores
// (margin_cuda.cu, lgm_cuda.cu) run before summing each class's rows in sample order.
#pragma once

#include <cub/device/device_radix_sort.cuh>

#include <cstddef>
#include <cstdint>

#include "cuda_common.cuh"

namespace lsoftmax::cuda::detail {

// Bits the sort needs for keys in [0, c] (c marks rows that are skipped).
inline int key_bits(int64_t c) {
  int bits = 1;
  while (bits < 32 && (int64_t{1} << bits) <= c) ++bits;
  return bits;
}

// Sorts n (key, row) pairs by key, keeping sample order within a key; with storage == nullptr,
// only sets `bytes` to the temporary storage the sort needs.
inline cudaError_t sort_rows_by_class(void* storage, size_t& bytes, const uint32_t* keys_in,
                                      uint32_t* keys_out, const int32_t* rows_in,
                                      int32_t* rows_out, int64_t n, int64_t c,
                                      cudaStream_t stream) {
  return cub::DeviceRadixSort::SortPairs(storage, bytes, keys_in, keys_out, rows_in, rows_out,
                                         static_cast<int>(n), 0, key_bits(c), stream);
}

// The temporary storage sort_rows_by_class needs for n rows and keys in [0, c].
inline Status sort_storage_bytes(int64_t n, int64_t c, size_t* bytes) {
  *bytes = 0;
  return cuda_status(sort_rows_by_class(nullptr, *bytes, nullptr, nullptr, nullptr, nullptr, n, c,
                                        cudaStream_t{}),
                     "cub::DeviceRadixSort (workspace query)");
}

}  // namespace lsoftmax::cuda::detail
