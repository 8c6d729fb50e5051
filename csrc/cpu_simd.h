// Vector decode for the CPU dequantize (cpu_simd.cpp).
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

// The vector decode for a precision and output dtype at the current level, or nullptr (scalar only).
DecodeFn decode_fn(int bits, int dtype);
int cpu_isa();               // the current level
int cpu_set_isa(int isa);    // at most the CPU's best; -1 = the CPU's best. Returns the level now in use.

}  // namespace lowra
