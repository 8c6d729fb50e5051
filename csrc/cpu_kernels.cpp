// CPU kernels: one output channel (row) per iteration, rows spread over OpenMP threads.
#include <math.h>

#include <vector>

#include "common.h"
#include "cpu_simd.h"

namespace lowra {

namespace {

// code = number of used thresholds strictly below v (thresholds sorted ascending).
inline uint32_t encode(float v, const float* t, int n) {
  uint32_t c = 0;
  for (int k = 0; k < n; ++k) c += v > t[k];
  return c;
}

template <int BITS>
void quantize_row(const void* W, int dtype, int64_t r, int64_t cols, int64_t blocksize, int64_t pc,
                  const float* t, uint8_t* out, float* absmax_row) {
  constexpr int n = (1 << BITS) - 1;
  constexpr int per_byte = 8 / BITS;
  const int64_t base = r * cols;
  memset(out, 0, (size_t)row_bytes(pc, BITS));
  for (int64_t b0 = 0; b0 < pc; b0 += blocksize) {
    float amax = 0.0f;
    for (int64_t j = b0; j < b0 + blocksize && j < cols; ++j) amax = fmaxf(amax, fabsf(load_as_float(W, dtype, base + j)));
    absmax_row[b0 / blocksize] = amax;
    for (int64_t j = b0; j < b0 + blocksize; ++j) {
      float v = 0.0f;
      if (j < cols && amax > 0.0f) v = load_as_float(W, dtype, base + j) / amax;
      out[j / per_byte] |= (uint8_t)(encode(v, t, n) << ((j % per_byte) * BITS));
    }
  }
}

template <int D>
inline void store(void* out, int64_t j, float v) {
  if constexpr (D == LOWRA_F16) ((uint16_t*)out)[j] = float_to_half(v);
  else if constexpr (D == LOWRA_BF16) ((uint16_t*)out)[j] = float_to_bf16(v);
  else ((float*)out)[j] = v;
}

// One row of precision BITS into dtype D. Per block, the codebook scaled by the block's absmax (the same float
// product code[c] * absmax the reference takes per element), then the vector decode (cpu_simd.cpp) over the
// block's multiples of 16 elements and a scalar loop, a code byte at a time, over the rest: blocks start on a byte
// boundary (blocksize is a multiple of 8). No division, dtype switch or bounds test per element: the per-element
// loop measured ~3.5 ns per element.
template <int BITS, int D>
void dequantize_row(const uint8_t* in, const float* absmax_row, const float* code, int64_t cols, int64_t blocksize,
                    void* out, DecodeFn vec) {
  constexpr int n = 1 << BITS, per_byte = 8 / BITS;
  constexpr uint32_t mask = n - 1;
  constexpr int64_t esize = D == LOWRA_F32 ? 4 : 2;
  float scaled[16] = {};  // zero-padded: the vector lookup reads 16 entries
  for (int64_t b0 = 0, blk = 0; b0 < cols; b0 += blocksize, ++blk) {
    for (int k = 0; k < n; ++k) scaled[k] = code[k] * absmax_row[blk];
    const int64_t end = b0 + blocksize < cols ? b0 + blocksize : cols;
    const uint8_t* p = in + b0 / per_byte;
    int64_t j = b0;
    if (vec && end - b0 >= 16) {
      const int64_t nv = (end - b0) / 16 * 16;
      vec(p, scaled, nv, (char*)out + j * esize);
      j += nv, p += nv / per_byte;
    }
    for (; j + per_byte <= end; j += per_byte, ++p) {
      const uint32_t v = *p;
      for (int k = 0; k < per_byte; ++k) store<D>(out, j + k, scaled[(v >> (k * BITS)) & mask]);
    }
    for (int k = 0; j < end; ++j, ++k) store<D>(out, j, scaled[(*p >> (k * BITS)) & mask]);  // a partial last byte
  }
}

template <int BITS>
void dequantize_row(const uint8_t* in, const float* absmax_row, const float* code, int64_t cols, int64_t blocksize,
                    int dtype, void* out, DecodeFn vec) {
  switch (dtype) {
    case LOWRA_F16: dequantize_row<BITS, LOWRA_F16>(in, absmax_row, code, cols, blocksize, out, vec); break;
    case LOWRA_BF16: dequantize_row<BITS, LOWRA_BF16>(in, absmax_row, code, cols, blocksize, out, vec); break;
    default: dequantize_row<BITS, LOWRA_F32>(in, absmax_row, code, cols, blocksize, out, vec);
  }
}

int elem_size(int dtype) { return dtype == LOWRA_F32 ? 4 : 2; }

// Scales first .. first + n - 1 decoded from their double-quantized form into out, as the CUDA kernels do
// (nested_finish): the product and the sum rounded apart (volatile: no contraction into a fused multiply-add
// where the target has one), then fmaxf with 0.
const float* decode_row_scales(const AbsmaxSrc& s, int64_t first, int64_t n, float* out) {
  const LowraNestedAbsmax& d = s.nested;
  const float offset = d.offset[0];
  for (int64_t i = 0; i < n; ++i) {
    const int64_t k = first + i;
    volatile float product = d.code[d.q[k]] * d.nested[k >> s.nested_shift];
    out[i] = fmaxf(product + offset, 0.0f);
  }
  return out;
}

}  // namespace

int quantize_cpu(const void* W, int dtype, int64_t rows, int64_t cols, int64_t blocksize, const uint8_t* bits,
                 const uint16_t* thresholds, const int64_t* row_offsets, uint8_t* packed, float* absmax) {
  const int64_t pc = padded_cols(cols, blocksize);
  const int64_t nb = pc / blocksize;
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    float t[kThresholdSlots];
    for (int k = 0; k < kThresholdSlots; ++k) t[k] = half_to_float(thresholds[r * kThresholdSlots + k]);
    uint8_t* out = packed + row_offsets[r];
    float* am = absmax + r * nb;
    switch (bits[r]) {
      case 1: quantize_row<1>(W, dtype, r, cols, blocksize, pc, t, out, am); break;
      case 2: quantize_row<2>(W, dtype, r, cols, blocksize, pc, t, out, am); break;
      default: quantize_row<4>(W, dtype, r, cols, blocksize, pc, t, out, am); break;
    }
  }
  return LOWRA_OK;
}

int dequantize_cpu(const uint8_t* packed, const AbsmaxSrc& absmax, const uint8_t* bits, const uint16_t* codebook,
                   const int64_t* row_offsets, int64_t rows, int64_t cols, int64_t blocksize, int dtype, void* out) {
  const int64_t nb = padded_cols(cols, blocksize) / blocksize;
  const DecodeFn vec1 = decode_fn(1, dtype), vec2 = decode_fn(2, dtype), vec4 = decode_fn(4, dtype);
#pragma omp parallel
  {
    std::vector<float> scales(absmax.f32 ? 0 : (size_t)nb);  // a row's decoded scales (double-quantized only)
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      float code[kCodebookSlots];
      for (int k = 0; k < kCodebookSlots; ++k) code[k] = half_to_float(codebook[r * kCodebookSlots + k]);
      const float* am = absmax.f32 ? absmax.f32 + r * nb : decode_row_scales(absmax, r * nb, nb, scales.data());
      const uint8_t* in = packed + row_offsets[r];
      char* out_row = (char*)out + r * cols * elem_size(dtype);
      switch (bits[r]) {
        case 1: dequantize_row<1>(in, am, code, cols, blocksize, dtype, out_row, vec1); break;
        case 2: dequantize_row<2>(in, am, code, cols, blocksize, dtype, out_row, vec2); break;
        default: dequantize_row<4>(in, am, code, cols, blocksize, dtype, out_row, vec4); break;
      }
    }
  }
  return LOWRA_OK;
}

}  // namespace lowra
