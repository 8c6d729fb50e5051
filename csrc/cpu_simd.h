// Vector decode for the CPU dequantize and dot products for the CPU matmul (cpu_simd.cpp).
#pragma once
#include <stdint.h>

#include "common.h"

namespace lowra {

// Instruction-set levels of the CPU paths, lowest first.
constexpr int kIsaScalar = 0;
constexpr int kIsaAvx2 = 1;    // AVX2 + F16C
constexpr int kIsaAvx512 = 2;  // AVX-512F

// Decodes n elements (a multiple of 16) whose codes start at byte p: out[i] = tab[code_i], rounded to the output
// dtype; tab holds 16 floats (the block's scaled codebook, zero-padded).
using DecodeFn = void (*)(const uint8_t* p, const float* tab, int64_t n, void* out);

// Decodes nblocks whole blocks of blocksize elements (a multiple of 16) whose codes start at byte p, block b scaled
// by absmax[b]: out[i] = code[c_i] * absmax[i / blocksize] (the float32 product), rounded to the output dtype. code
// holds 16 floats; entries above 2^bits - 1 are never selected. One call per row: no per-block call or table.
using DecodeRowFn = void (*)(const uint8_t* p, const float* code, const float* absmax, int64_t nblocks,
                             int64_t blocksize, void* out);

// The vector decodes for a precision and output dtype at the current level, or nullptr (scalar only).
DecodeFn decode_fn(int bits, int dtype);
DecodeRowFn decode_row_fn(int bits, int dtype);

// acc[i] = sum_{j < n} w[j] * a[i * lda + j] for i < m, in float32 (the summation order is fixed for a level).
using DotFn = void (*)(const float* w, const float* a, int64_t lda, int m, int64_t n, float* acc);

// out[i] = the float16 h[i] as float32, i < n (exact). With F16C where the current level has it: GCC's _Float16
// conversion on baseline x86-64 is a library call per value, which a row's 16 codebook entries paid every row.
void halves_to_floats(const uint16_t* h, float* out, int64_t n);

// The dot products at the current level (never nullptr: a scalar loop below AVX2).
DotFn dot_fn();

// Decode and dot in one pass, for nblocks whole blocks (blocksize a multiple of 16) of one row:
// acc[i] = sum_j (code[c_j] * absmax[j / blocksize]) * a[i * lda + j], i < m, the weight never stored. The
// products are the dequantize's; the sums are float32 in an order fixed for a level and m.
using DecodeDotFn = void (*)(const uint8_t* p, const float* code, const float* absmax, int64_t nblocks,
                             int64_t blocksize, const float* a, int64_t lda, float* acc);

// For a precision and m activation rows (1 to kMaxDecodeDotRows) at the current level, or nullptr.
constexpr int kMaxDecodeDotRows = 8;
DecodeDotFn decode_dot_fn(int bits, int m);
int cpu_isa();               // the current level
int cpu_set_isa(int isa);    // at most the CPU's best; -1 = the CPU's best. Returns the level now in use.

}  // namespace lowra
