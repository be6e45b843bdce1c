// One build of a function per instruction set, chosen by an ifunc resolver when the library
// loads (GCC on x86-64; elsewhere one build). A file that uses it is compiled with
// -ffp-contract=off: AVX-512 brings FMA, and a contracted multiply-add rounds once where the
// baseline build rounds twice, so the builds would disagree in the last bit.
#pragma once

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LSOFTMAX_ISA_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define LSOFTMAX_ISA_CLONES
#endif

namespace lsoftmax::detail {

// N lanes of T as one SIMD value (GCC/Clang vector extensions), for loops that GCC does not
// vectorize from scalar lane arrays. Each vector operation is the scalar one per lane, so a loop
// written with them gives the scalar loop's results bit for bit. Vectors stay local: passed or
// returned by value they would change the calling convention between the builds.
template <typename T, int N>
struct VectorOf {
  typedef T type __attribute__((vector_size(sizeof(T) * N)));
};

}  // namespace lsoftmax::detail
