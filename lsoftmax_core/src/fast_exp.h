// exp for the streaming log-sum-exp loops of the fused loss: branch-free (clamp, Cody-Waite
// range reduction, polynomial, 2^k from the exponent bits) so the compiler vectorizes the loops
// over a block of logits (GCC if-converts the clamps only under -fno-trapping-math, which the
// files that use it are compiled with); std::exp does not vectorize and would cost more than the
// GEMM. Errors are within 2 ulp of the type. NaN in gives NaN out; the arguments of the fused
// loss are <= 0, and results below the clamp (e^-87 in float, e^-708 in double) are negligible
// next to the e^0 = 1 that every row's sum holds.
#pragma once

#include <cstdint>
#include <cstring>

namespace lsoftmax::detail {

inline float exp_fast(float x) {
  x = x < -87.0f ? -87.0f : x;  // comparisons with NaN are false: NaN passes through
  x = x > 88.0f ? 88.0f : x;
  constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const float kf_biased = x * 1.44269504088896341f + kMagic;
  uint32_t k_bits;
  std::memcpy(&k_bits, &kf_biased, sizeof(k_bits));
  const float kf = kf_biased - kMagic;
  float r = x - kf * 0.693359375f;  // ln 2 in two parts (Cephes)
  r = r - kf * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  // k = k_bits - bits(kMagic); 2^k has exponent field k + 127 (unsigned: no UB for NaN).
  const uint32_t scale_bits = (k_bits - 0x4B400000u + 127u) << 23;
  float scale;
  std::memcpy(&scale, &scale_bits, sizeof(scale));
  return p * scale;
}

inline double exp_fast(double x) {
  x = x < -708.0 ? -708.0 : x;
  x = x > 709.0 ? 709.0 : x;
  constexpr double kMagic = 6755399441055744.0;  // 1.5 * 2^52
  const double kf_biased = x * 1.4426950408889634074 + kMagic;
  uint64_t k_bits;
  std::memcpy(&k_bits, &kf_biased, sizeof(k_bits));
  const double kf = kf_biased - kMagic;
  double r = x - kf * 6.93145751953125e-1;
  r = r - kf * 1.42860682030941723212e-6;
  // Taylor to degree 13 on |r| <= ln(2)/2: truncation error below 2e-16.
  double p = 1.0 / 6227020800.0;
  p = p * r + 1.0 / 479001600.0;
  p = p * r + 1.0 / 39916800.0;
  p = p * r + 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * (r * r) + r + 1.0;
  const uint64_t scale_bits = (k_bits - 0x4338000000000000ull + 1023ull) << 52;
  double scale;
  std::memcpy(&scale, &scale_bits, sizeof(scale));
  return p * scale;
}

}  // namespace lsoftmax::detail
