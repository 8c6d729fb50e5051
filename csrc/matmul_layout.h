// Register layout of the fused matmul's tensor-core path (cuda_matmul.cu), shared with a CPU emulation test
// (tests/test_matmul_layout.cu) that checks the bit tricks and the fragment/column mapping without a GPU.
//
// The kernel multiplies 16-row tiles of one precision with mma.m16n8k16 (rows = M, activations = N, columns = K).
// Within a 64-column unit (one absmax block when blocksize is 64) each lane column t (0..3) owns 16 columns,
// as 8 "pairs" pi of two columns that land in one 32-bit register (two fp16/bf16 halves). The mma only needs
// every k slot to be the same column in the weight fragment and in the activation fragment, so the column order
// inside a unit is free: each precision uses the order that is cheapest to decode from the packed bytes, and the
// activations are staged in shared memory in that same order (stage_col below).
//
//   1 bit : "magic number" planes. A pair is bits s and s+16 of a 32-bit word moved to mantissa position s; ORed
//           with the pattern of 2^E (E = M - s) the half becomes 2^E + bit. So the mma yields
//           sum_k 2^E(k) A_k + sum_k bit_k A_k; the first sum (S2) depends on activations only, and with
//           S = sum_k A_k the row's value is  c0 * S + (c1 - c0) * (acc - S2)  (a 1-bit codebook is affine).
//   2 bit : PRMT lookup. The four codebook entries' low bytes form one register, their high bytes another;
//           a selector [c, c+4, c', c'+4] built from two codes picks the two halves in one byte permute.
//   4 bit : per-row lookup table in shared memory, one 32-bit entry (two halves) per packed byte.
#pragma once
#include <stdint.h>

#include "common.h"

#if defined(__CUDA_ARCH__)
#define LOWRA_UNROLL _Pragma("unroll")
#else
#define LOWRA_UNROLL
#endif

namespace lowra {
namespace mm {

constexpr int kUnitCols = 64;     // columns per decode unit (= per mma group of 4 k16 steps)
constexpr int kStageUnits = 4;    // units fetched together by one lane-column (one "stage")
constexpr int kStageCols = kUnitCols * kStageUnits;
constexpr int kTileRows = 16;

// Mantissa position of the first 1-bit pair: fp16 has 10 mantissa bits, bf16 7; E = 4 - i for pair i % 4.
template <bool kHalf>
struct Magic {
  static constexpr int kBase = kHalf ? 6 : 3;
  // bit pattern of 2^e in both halves
  static LOWRA_HD uint32_t pow2(int e) {
    const uint32_t h = kHalf ? (uint32_t)(15 + e) << 10 : (uint32_t)(127 + e) << 7;
    return h | (h << 16);
  }
};

// Byte permute: bytes 0-3 of a and 4-7 of b, picked by the low 16 bits of s. Selector nibbles must be 0..7: the
// device form is the raw PRMT, whose bit 3 replicates a sign, where __byte_perm would cost a LOP3 per call to clear it.
LOWRA_HD uint32_t prmt(uint32_t a, uint32_t b, uint32_t s) {
#if defined(__CUDA_ARCH__)
  uint32_t r;
  asm("prmt.b32 %0, %1, %2, %3;" : "=r"(r) : "r"(a), "r"(b), "r"(s));
  return r;
#else
  const uint64_t pool = (uint64_t)a | ((uint64_t)b << 32);
  uint32_t r = 0;
  for (int i = 0; i < 4; ++i) r |= (uint32_t)((pool >> (8 * ((s >> (4 * i)) & 7))) & 0xff) << (8 * i);
  return r;
#endif
}

LOWRA_HD uint32_t rotr(uint32_t x, int r) {
#if defined(__CUDA_ARCH__)
  return __funnelshift_r(x, x, (unsigned)r);
#else
  r &= 31;
  return r ? (x >> r) | (x << (32 - r)) : x;
#endif
}

// Column (0..63) of the unit held by lane column t, pair pi, half h (0 = low half) for precision P.
LOWRA_HD int unit_col(int P, int t, int pi, int h) {
  if (P == 1) return 32 * (pi >> 2) + 4 * t + (pi & 3) + 16 * h;
  if (P == 2) return 16 * t + (pi >> 1) + 4 * (2 * (pi & 1) + h);
  return 16 * t + 2 * pi + h;
}

// Inverse of unit_col: where column cu of a unit goes. Returns t * 16 + pi * 2 + h.
LOWRA_HD int stage_slot(int P, int cu) {
  int t, pi, h;
  if (P == 1) {
    const int p = cu & 31;
    h = p >> 4;
    t = (p & 15) >> 2;
    pi = 4 * (cu >> 5) + (p & 3);
  } else if (P == 2) {
    const int r = cu & 15, blk = r >> 2;
    t = cu >> 4;
    pi = 2 * (r & 3) + (blk >> 1);
    h = blk & 1;
  } else {
    t = cu >> 4;
    pi = (cu & 15) >> 1;
    h = cu & 1;
  }
  return t * 16 + pi * 2 + h;
}

// Word (of the 32 per unit and activation row n) where lane column t finds pair pi. The two 16-byte halves are
// swapped on odd rows so that the 128-bit loads of rows n and n+1 hit different banks.
LOWRA_HD int stage_word(int n, int t, int pi) { return t * 8 + (pi ^ ((n & 1) << 2)); }

// Weight of column cu in S2 for 1-bit tiles: 2^E with E = 4 - (cu % 4).
LOWRA_HD float s2_weight(int cu) { return (float)(16 >> (cu & 3)); }

// 1 bit: w0 = packed bits of columns 0..31 of the unit, w1 = columns 32..63. f[pi] = half2 of pair pi.
// magic[i] = Magic<kHalf>::pow2(4 - i). A kernel passes them in registers: (u & mask) | magic is then one LOP3, where
// two immediates take two.
template <bool kHalf>
LOWRA_HD void decode1(uint32_t w0, uint32_t w1, int t, uint32_t f[8], const uint32_t magic[4]) {
  const int rot = (4 * t - Magic<kHalf>::kBase) & 31;
  const uint32_t u0 = rotr(w0, rot), u1 = rotr(w1, rot);
LOWRA_UNROLL
  for (int i = 0; i < 4; ++i) {
    const uint32_t mask = 0x10001u << (Magic<kHalf>::kBase + i);
    f[i] = (u0 & mask) | magic[i];
    f[4 + i] = (u1 & mask) | magic[i];
  }
}

// 2 bit: w = the lane column's 32-bit word of the unit (columns 16t..16t+15); L / H = low / high bytes of the
// four codebook halves.
LOWRA_HD void decode2(uint32_t w, uint32_t L, uint32_t H, uint32_t f[8]) {
LOWRA_UNROLL
  for (int i = 0; i < 4; ++i) {
    // each code byte c becomes the selector byte (c, c + 4): one multiply-add for four codes; the second pair's
    // selector is the upper half (selector nibbles stay within 0..7)
    const uint32_t sel = ((w >> (2 * i)) & 0x03030303u) * 0x11u + 0x40404040u;
    f[2 * i] = prmt(L, H, sel);
    f[2 * i + 1] = prmt(L, H, sel >> 16);
  }
}

// Byte tables of a 2-bit row: v[c] are the four codebook entries as 16-bit patterns of the mma type.
LOWRA_HD void prmt_tables(const uint16_t v[4], uint32_t* L, uint32_t* H) {
  *L = (uint32_t)(v[0] & 0xff) | (uint32_t)(v[1] & 0xff) << 8 | (uint32_t)(v[2] & 0xff) << 16 |
       (uint32_t)(v[3] & 0xff) << 24;
  *H = (uint32_t)(v[0] >> 8) | (uint32_t)(v[1] >> 8) << 8 | (uint32_t)(v[2] >> 8) << 16 | (uint32_t)(v[3] >> 8) << 24;
}

// 4 bit: lut entry of a packed byte: low half = entry of the low nibble (the earlier column).
LOWRA_HD uint32_t lut_entry(const uint16_t v[16], int byte) { return (uint32_t)v[byte & 15] | (uint32_t)v[byte >> 4] << 16; }

}  // namespace mm
}  // namespace lowra
