// Helpers shared by the CPU and CUDA kernels: element conversion, layout arithmetic, argument validation.
#pragma once
#include <stdint.h>
#include <string.h>

#include "lowra.h"

#if defined(__CUDACC__)
#define LOWRA_HD __host__ __device__ __forceinline__
#else
#define LOWRA_HD inline
#endif

namespace lowra {

constexpr int kCodebookSlots = 16;
constexpr int kThresholdSlots = 15;
// The format's blocksize rule (format.py BLOCKSIZE_RULE): a multiple of 8 in [8, kMaxBlocksize].
constexpr int64_t kMaxBlocksize = 4096;
// Columns of one weight: far beyond any layer, and few enough that a row's element, bit and byte indices (padded to
// the blocksize) cannot overflow, not even where a CUDA kernel keeps them in 32 bits.
constexpr int64_t kMaxCols = ((int64_t)1 << 31) - 1;

LOWRA_HD int64_t padded_cols(int64_t cols, int64_t blocksize) { return (cols + blocksize - 1) / blocksize * blocksize; }
LOWRA_HD bool valid_bits(int b) { return b == 1 || b == 2 || b == 4; }
LOWRA_HD int64_t row_bytes(int64_t pc, int bits) { return pc * bits / 8; }

// Whether p is a multiple of `a` bytes (a power of two). The kernels index typed operands (float32 scales, int64
// offsets, float16 tables, activations), which needs their element's alignment: unaligned, that is undefined
// behaviour on the CPU and a sticky "misaligned address" fault of the CUDA context. Wider vector accesses (16 bytes
// on CUDA) check their own alignment and fall back to narrower ones.
LOWRA_HD bool aligned(const void* p, unsigned a) { return ((uintptr_t)p & (a - 1)) == 0; }
LOWRA_HD bool valid_dtype(int dtype) { return dtype == LOWRA_F32 || dtype == LOWRA_F16 || dtype == LOWRA_BF16; }
LOWRA_HD unsigned dtype_size(int dtype) { return dtype == LOWRA_F32 ? 4u : 2u; }

// Sizes every entry point checks first: at least one row, 1 .. kMaxCols columns, the format's blocksize, and
// rows x padded_cols elements countable in int64 (so every element, scale and code index is).
inline bool shape_ok(int64_t rows, int64_t cols, int64_t blocksize) {
  if (rows <= 0 || cols <= 0 || cols > kMaxCols || blocksize < 8 || blocksize > kMaxBlocksize || blocksize % 8 != 0)
    return false;
  return rows <= INT64_MAX / padded_cols(cols, blocksize);
}

// Activations, weights, outputs and bias of `dtype` at its element's alignment (NULL passes: checked elsewhere).
inline bool data_aligned(int dtype, const void* a, const void* b, const void* c = nullptr) {
  const unsigned es = dtype_size(dtype);
  return aligned(a, es) && aligned(b, es) && aligned(c, es);
}

// The metadata at its elements' alignment: float16 codebooks or thresholds, int64 offsets, float32 scales (plain or
// the nested form's; its 8-bit codes need none).
inline bool metadata_aligned(const uint16_t* tables, const int64_t* row_offsets, const float* absmax,
                             const LowraNestedAbsmax* nested) {
  if (!aligned(tables, 2) || !aligned(row_offsets, 8) || !aligned(absmax, 4)) return false;
  return !nested || (aligned(nested->nested, 4) && aligned(nested->code, 4) && aligned(nested->offset, 4));
}

// Where kernels read the block scales: plain float32 (f32 != NULL) or double-quantized (nested.q != NULL; see
// LowraNestedAbsmax). Built on the host by absmax_src, read on the device by absmax_issue / absmax_finish
// (cuda_common.cuh).
struct AbsmaxSrc {
  const float* f32;
  LowraNestedAbsmax nested;
  int nested_shift;  // log2(nested.blocksize)
};

// false when neither or both forms are given, or the nested blocksize is not a power of two.
inline bool absmax_src(const float* f32, const LowraNestedAbsmax* nested, AbsmaxSrc* out) {
  *out = AbsmaxSrc{};
  out->f32 = f32;
  if (!nested) return f32 != nullptr;
  if (f32 || !nested->q || !nested->nested || !nested->code || !nested->offset || nested->blocksize < 1 ||
      (nested->blocksize & (nested->blocksize - 1)) != 0)
    return false;
  out->nested = *nested;
  while (((int64_t)1 << out->nested_shift) < nested->blocksize) ++out->nested_shift;
  return true;
}

// Host-side layout check shared by the CPU entry points: O(rows), reads host memory only. The offsets are compared
// with their prefix sum, which is checked for overflow (a difference of two stored offsets could itself overflow).
inline int check_layout_host(int64_t rows, int64_t cols, int64_t blocksize, const uint8_t* bits,
                             const int64_t* row_offsets, int64_t packed_bytes) {
  if (!shape_ok(rows, cols, blocksize)) return LOWRA_ERR_ARGUMENT;
  const int64_t pc = padded_cols(cols, blocksize);
  int64_t end = 0;
  if (row_offsets[0] != 0) return LOWRA_ERR_OFFSETS;
  for (int64_t r = 0; r < rows; ++r) {
    if (!valid_bits(bits[r])) return LOWRA_ERR_BITS;
    if (__builtin_add_overflow(end, row_bytes(pc, bits[r]), &end) || row_offsets[r + 1] != end)
      return LOWRA_ERR_OFFSETS;
  }
  return end == packed_bytes ? LOWRA_OK : LOWRA_ERR_OFFSETS;
}

#if !defined(__CUDACC__)
// float32 -> bfloat16 with round-to-nearest-even, NaN kept quiet (matches torch's .to(torch.bfloat16)).
inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}
inline float bf16_to_float(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
// _Float16 (GCC >= 12, clang) converts with IEEE round-to-nearest-even.
inline float half_to_float(uint16_t h) {
  _Float16 x;
  memcpy(&x, &h, 2);
  return (float)x;
}
inline uint16_t float_to_half(float f) {
  _Float16 x = (_Float16)f;
  uint16_t h;
  memcpy(&h, &x, 2);
  return h;
}
inline float load_as_float(const void* p, int dtype, int64_t i) {
  switch (dtype) {
    case LOWRA_F16: return half_to_float(((const uint16_t*)p)[i]);
    case LOWRA_BF16: return bf16_to_float(((const uint16_t*)p)[i]);
    default: return ((const float*)p)[i];
  }
}
#endif

}  // namespace lowra
