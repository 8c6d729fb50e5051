// Vector decode for the CPU dequantize (cpu_kernels.cpp), and the CPU matmul's dot products.
// Decode: 16 elements at a time, out[i] = tab[code_i], where tab is the block's codebook already scaled by its
// absmax (16 floats, zero-padded below 4 bits). The codes of 16 elements are 2 * BITS bytes: broadcast into the
// lanes and shifted right by each lane's bit offset, they index the table held in registers (repeated every 2^BITS
// entries, so no mask of the shifted codes); at 1 bit, the 16 code bits select one of two entries (a blend).
// Outputs are rounded as the scalar path does (round to nearest even; bfloat16 NaN kept quiet), so results are
// bit-identical.
//
// Built with per-function target attributes (the library itself targets baseline x86-64) and picked at run time
// from the CPU's features; lowra_cpu_set_isa can force a lower level (tests run every level the CPU has).
#include "cpu_simd.h"

#include <string.h>

#include <atomic>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LOWRA_X86_SIMD 1
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12 reports its own AVX-512 intrinsics (the undefined-vector placeholders in avx512fintrin.h, as in
// _mm512_reduce_add_ps) as (maybe) uninitialized when they are inlined into target("avx512f") functions: a known
// false positive of the header.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
#include <immintrin.h>
#endif

namespace lowra {

#ifdef LOWRA_X86_SIMD
namespace {

// The codes of 16 elements as one 32-bit word (1 and 2 bits) or two (4 bits: elements 0-7, then 8-15).
template <int BITS>
inline void load_codes(const uint8_t* p, uint32_t* lo, uint32_t* hi) {
  *lo = *hi = 0;
  memcpy(lo, p, BITS == 4 ? 4 : 2 * BITS);
  if (BITS == 4) memcpy(hi, p + 4, 4);
}

// ----------------------------------------------------------------------------------------------- AVX-512 (16 lanes)

// A block's scaled codebook as lookup512 reads it (per element 2 uops on ports 0 and 5 at 1 bit, 3 at 2 bits, 4 at 4
// bits, against 5-6 with a permute of masked codes broadcast from a general register):
//   - 1 bit: entries 0 and 1 broadcast; the 16 code bits, loaded into a mask register, blend them;
//   - 2 and 4 bits: the table repeated every 2^BITS entries, so the permute (which reads the low 4 bits of each
//     index) needs no mask of the shifted codes.
struct Table512 {
  __m512 t, t1;  // t1: 1 bit only
};

template <int BITS>
__attribute__((target("avx512f"))) inline Table512 table512(const float* tab) {
  if (BITS == 1) return {_mm512_set1_ps(tab[0]), _mm512_set1_ps(tab[1])};
  const __m512 t = _mm512_loadu_ps(tab);
  if (BITS == 4) return {t, t};
  return {_mm512_permutexvar_ps(_mm512_and_si512(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                                 _mm512_set1_epi32((1 << BITS) - 1)), t), t};
}

// The table scaled by a block's absmax (each entry the float32 product code[k] * absmax, as the scalar path).
template <int BITS>
__attribute__((target("avx512f"))) inline Table512 scaled512(const Table512& c, float absmax) {
  const __m512 a = _mm512_set1_ps(absmax);
  return {_mm512_mul_ps(c.t, a), BITS == 1 ? _mm512_mul_ps(c.t1, a) : c.t1};
}

// tab[code_i] for the 16 elements whose codes start at byte p (little-endian: element i at bits BITS i ..).
template <int BITS>
__attribute__((target("avx512f"))) inline __m512 lookup512(const uint8_t* p, const Table512& tab) {
  if (BITS == 1) {
    // kmovw from memory, a load: GCC's _load_mask16 goes through a general register (port 5). The address goes in
    // as a register, not a memory operand, which made GCC keep the accumulator arrays in memory; the codes are
    // read-only for the whole call, so the asm need not be ordered against any store.
    __mmask16 k;
    asm("kmovw (%1), %0" : "=k"(k) : "r"(p));
    return _mm512_mask_blend_ps(k, tab.t, tab.t1);
  }
  int32_t lo, hi;
  memcpy(&lo, p, 4);  // broadcast from memory: a load, not a port-5 move from a general register
  __m512i w = _mm512_set1_epi32(lo), sh;
  if (BITS == 4) {
    memcpy(&hi, p + 4, 4);
    w = _mm512_mask_blend_epi32((__mmask16)0xFF00, w, _mm512_set1_epi32(hi));
    sh = _mm512_set_epi32(28, 24, 20, 16, 12, 8, 4, 0, 28, 24, 20, 16, 12, 8, 4, 0);
  } else {
    sh = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
  }
  return _mm512_permutexvar_ps(_mm512_srlv_epi32(w, sh), tab.t);
}

template <int D>
__attribute__((target("avx512f"))) inline void store512(void* out, int64_t i, __m512 v) {
  if (D == LOWRA_F32) {
    _mm512_storeu_ps((float*)out + i, v);
  } else if (D == LOWRA_F16) {
    const __m256i h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_storeu_si256((__m256i*)((uint16_t*)out + i), h);
  } else {  // bfloat16: (u + 0x7fff + ((u >> 16) & 1)) >> 16, NaN -> (u >> 16) | 0x40, as float_to_bf16
    const __m512i u = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), odd), 16);
    const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                  _mm512_set1_epi32(0x7f800000));
    r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
    _mm256_storeu_si256((__m256i*)((uint16_t*)out + i), _mm512_cvtepi32_epi16(r));
  }
}

template <int BITS, int D>
__attribute__((target("avx512f"))) void decode_row_avx512(const uint8_t* p, const float* code, const float* absmax,
                                                          int64_t nblocks, int64_t blocksize, void* out) {
  const Table512 c = table512<BITS>(code);
  for (int64_t b = 0, i = 0; b < nblocks; ++b) {
    const Table512 t = scaled512<BITS>(c, absmax[b]);
    for (int64_t e = 0; e < blocksize; e += 16, i += 16, p += 2 * BITS) store512<D>(out, i, lookup512<BITS>(p, t));
  }
}

// K independent accumulation chains per activation row (4 for one row, 2 for two, else one each), so that the FMA
// latency is covered; chunks of 16 elements go round the chains.
template <int BITS, int M>
__attribute__((target("avx512f"))) void decode_dot_avx512(const uint8_t* p, const float* code, const float* absmax,
                                                          int64_t nblocks, int64_t blocksize, const float* a,
                                                          int64_t lda, float* acc) {
  constexpr int K = M == 1 ? 4 : M == 2 ? 2 : 1;
  const Table512 c = table512<BITS>(code);
  __m512 s[M][K];
  for (int i = 0; i < M; ++i)
    for (int k = 0; k < K; ++k) s[i][k] = _mm512_setzero_ps();
  int64_t j = 0;
  for (int64_t b = 0; b < nblocks; ++b) {
    const Table512 t = scaled512<BITS>(c, absmax[b]);
    int64_t e = 0;
    for (; e + 16 * K <= blocksize; e += 16 * K) {
#pragma GCC unroll 4
      for (int k = 0; k < K; ++k, j += 16, p += 2 * BITS) {
        const __m512 v = lookup512<BITS>(p, t);
#pragma GCC unroll 8
        for (int i = 0; i < M; ++i) s[i][k] = _mm512_fmadd_ps(v, _mm512_loadu_ps(a + i * lda + j), s[i][k]);
      }
    }
    for (; e < blocksize; e += 16, j += 16, p += 2 * BITS) {
      const __m512 v = lookup512<BITS>(p, t);
#pragma GCC unroll 8
      for (int i = 0; i < M; ++i) s[i][0] = _mm512_fmadd_ps(v, _mm512_loadu_ps(a + i * lda + j), s[i][0]);
    }
  }
  for (int i = 0; i < M; ++i) {
    __m512 u = s[i][0];
    for (int k = 1; k < K; ++k) u = _mm512_add_ps(u, s[i][k]);
    acc[i] = _mm512_reduce_add_ps(u);
  }
}

// Four accumulators per activation row: independent FMA chains.
__attribute__((target("avx512f"))) void dot_avx512(const float* w, const float* a, int64_t lda, int m, int64_t n,
                                                   float* acc) {
  for (int i = 0; i < m; ++i) {
    const float* x = a + i * lda;
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps(), s2 = _mm512_setzero_ps(), s3 = _mm512_setzero_ps();
    int64_t j = 0;
    for (; j + 64 <= n; j += 64) {
      s0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + j), _mm512_loadu_ps(x + j), s0);
      s1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + j + 16), _mm512_loadu_ps(x + j + 16), s1);
      s2 = _mm512_fmadd_ps(_mm512_loadu_ps(w + j + 32), _mm512_loadu_ps(x + j + 32), s2);
      s3 = _mm512_fmadd_ps(_mm512_loadu_ps(w + j + 48), _mm512_loadu_ps(x + j + 48), s3);
    }
    for (; j + 16 <= n; j += 16) s0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + j), _mm512_loadu_ps(x + j), s0);
    float s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
    for (; j < n; ++j) s += w[j] * x[j];
    acc[i] = s;
  }
}

template <int BITS, int D>
__attribute__((target("avx512f"))) void decode_avx512(const uint8_t* p, const float* tab, int64_t n, void* out) {
  const Table512 t = table512<BITS>(tab);
  for (int64_t i = 0; i < n; i += 16, p += 2 * BITS) store512<D>(out, i, lookup512<BITS>(p, t));
}

// ------------------------------------------------------------------------------------------- AVX2 + F16C (8 lanes)

// The sum of the 8 lanes (a fixed order: halves, then pairs, then the last two).
__attribute__((target("avx2"))) inline float hsum256(__m256 v) {
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1)));
}

// A block's scaled codebook as lookup256 reads it, none of which needs a mask of the shifted codes (the permute reads
// their low 3 bits, the blend only the sign):
//   - 1 bit: entries 0 and 1 broadcast; the code bit, shifted into the sign, selects with one blend;
//   - 2 bits: the table repeated every 4 entries, one permute;
//   - 4 bits: entries 0-7 and 8-15, two permutes and a blend on code bit 3.
struct Table256 {
  __m256 t0, t1;
};

template <int BITS>
__attribute__((target("avx2"))) inline Table256 table256(const float* tab) {
  if (BITS == 1) return {_mm256_set1_ps(tab[0]), _mm256_set1_ps(tab[1])};
  const __m256 t0 = _mm256_loadu_ps(tab);
  if (BITS == 2) return {_mm256_permutevar8x32_ps(t0, _mm256_set_epi32(3, 2, 1, 0, 3, 2, 1, 0)), t0};
  return {t0, _mm256_loadu_ps(tab + 8)};
}

// The table scaled by a block's absmax (each entry the float32 product code[k] * absmax, as the scalar path).
template <int BITS>
__attribute__((target("avx2"))) inline Table256 scaled256(const Table256& c, float absmax) {
  const __m256 a = _mm256_set1_ps(absmax);
  return {_mm256_mul_ps(c.t0, a), BITS == 2 ? c.t1 : _mm256_mul_ps(c.t1, a)};
}

template <int BITS>
__attribute__((target("avx2"))) inline __m256 pick256(__m256i idx, const Table256& t) {
  const __m256 v0 = _mm256_permutevar8x32_ps(t.t0, idx);
  if (BITS < 4) return v0;
  return _mm256_blendv_ps(v0, _mm256_permutevar8x32_ps(t.t1, idx), _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

// tab[code_i] for the 16 elements whose codes start at byte p: elements 0-7 into *a, 8-15 into *b.
template <int BITS>
__attribute__((target("avx2"))) inline void lookup256(const uint8_t* p, const Table256& t, __m256* a, __m256* b) {
  uint32_t lo, hi;
  load_codes<BITS>(p, &lo, &hi);
  const __m256i step = _mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0);
  const __m256i w = _mm256_set1_epi32((int)lo);
  if (BITS == 1) {  // bit i into the sign: shift left by 31 - i
    const __m256i sh = _mm256_sub_epi32(_mm256_set1_epi32(31), step);
    const __m256i sh8 = _mm256_sub_epi32(sh, _mm256_set1_epi32(8));
    *a = _mm256_blendv_ps(t.t0, t.t1, _mm256_castsi256_ps(_mm256_sllv_epi32(w, sh)));
    *b = _mm256_blendv_ps(t.t0, t.t1, _mm256_castsi256_ps(_mm256_sllv_epi32(w, sh8)));
  } else if (BITS == 2) {
    const __m256i sh = _mm256_slli_epi32(step, 1);
    *a = pick256<BITS>(_mm256_srlv_epi32(w, sh), t);
    *b = pick256<BITS>(_mm256_srlv_epi32(w, _mm256_add_epi32(sh, _mm256_set1_epi32(16))), t);
  } else {
    const __m256i sh = _mm256_slli_epi32(step, 2);
    *a = pick256<BITS>(_mm256_srlv_epi32(w, sh), t);
    *b = pick256<BITS>(_mm256_srlv_epi32(_mm256_set1_epi32((int)hi), sh), t);
  }
}

template <int D>
__attribute__((target("avx2,f16c"))) inline void store256(void* out, int64_t i, __m256 v) {
  if (D == LOWRA_F32) {
    _mm256_storeu_ps((float*)out + i, v);
  } else if (D == LOWRA_F16) {
    _mm_storeu_si128((__m128i*)((uint16_t*)out + i), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  } else {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), odd), 16);
    // |u| > inf as signed 32-bit: both sides are below 2^31
    const __m256i nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                           _mm256_set1_epi32(0x7f800000));
    r = _mm256_blendv_epi8(r, _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40)), nan);
    // 8 x 32 -> 8 x 16 bits: pack within 128-bit lanes, then gather the two low quarters
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08);
    _mm_storeu_si128((__m128i*)((uint16_t*)out + i), _mm256_castsi256_si128(packed));
  }
}

template <int BITS, int D>
__attribute__((target("avx2,f16c"))) void decode_avx2(const uint8_t* p, const float* tab, int64_t n, void* out) {
  const Table256 t = table256<BITS>(tab);
  for (int64_t i = 0; i < n; i += 16, p += 2 * BITS) {
    __m256 a, b;
    lookup256<BITS>(p, t, &a, &b);
    store256<D>(out, i, a);
    store256<D>(out, i + 8, b);
  }
}

template <int BITS, int D>
__attribute__((target("avx2,f16c"))) void decode_row_avx2(const uint8_t* p, const float* code, const float* absmax,
                                                           int64_t nblocks, int64_t blocksize, void* out) {
  const Table256 c = table256<BITS>(code);
  for (int64_t b = 0, i = 0; b < nblocks; ++b) {
    const Table256 t = scaled256<BITS>(c, absmax[b]);
    for (int64_t e = 0; e < blocksize; e += 16, i += 16, p += 2 * BITS) {
      __m256 x, y;
      lookup256<BITS>(p, t, &x, &y);
      store256<D>(out, i, x);
      store256<D>(out, i + 8, y);
    }
  }
}

__attribute__((target("avx2,f16c"))) void halves_to_floats_f16c(const uint16_t* h, float* out, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(h + i))));
  for (; i < n; ++i) out[i] = _cvtsh_ss(h[i]);
}

// 8 lanes: each 16-element chunk is two lookups; multiply-add without FMA (see dot_avx2). One chain per row and
// half-chunk (16 registers: 8 rows x 2 would not leave room for the tables).
template <int BITS, int M>
__attribute__((target("avx2,f16c"))) void decode_dot_avx2(const uint8_t* p, const float* code, const float* absmax,
                                                           int64_t nblocks, int64_t blocksize, const float* a,
                                                           int64_t lda, float* acc) {
  const Table256 c = table256<BITS>(code);
  __m256 s[M];
  for (int i = 0; i < M; ++i) s[i] = _mm256_setzero_ps();
  int64_t j = 0;
  for (int64_t b = 0; b < nblocks; ++b) {
    const Table256 t = scaled256<BITS>(c, absmax[b]);
    for (int64_t e = 0; e < blocksize; e += 16, j += 16, p += 2 * BITS) {
      __m256 v, w;
      lookup256<BITS>(p, t, &v, &w);
#pragma GCC unroll 8
      for (int i = 0; i < M; ++i) {
        s[i] = _mm256_add_ps(s[i], _mm256_mul_ps(v, _mm256_loadu_ps(a + i * lda + j)));
        s[i] = _mm256_add_ps(s[i], _mm256_mul_ps(w, _mm256_loadu_ps(a + i * lda + j + 8)));
      }
    }
  }
  for (int i = 0; i < M; ++i) {
    acc[i] = hsum256(s[i]);
  }
}

// FMA is a separate feature from AVX2; multiply-add keeps this level at AVX2 + F16C.
__attribute__((target("avx2"))) void dot_avx2(const float* w, const float* a, int64_t lda, int m, int64_t n,
                                              float* acc) {
  for (int i = 0; i < m; ++i) {
    const float* x = a + i * lda;
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps(), s2 = _mm256_setzero_ps(), s3 = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 32 <= n; j += 32) {
      s0 = _mm256_add_ps(s0, _mm256_mul_ps(_mm256_loadu_ps(w + j), _mm256_loadu_ps(x + j)));
      s1 = _mm256_add_ps(s1, _mm256_mul_ps(_mm256_loadu_ps(w + j + 8), _mm256_loadu_ps(x + j + 8)));
      s2 = _mm256_add_ps(s2, _mm256_mul_ps(_mm256_loadu_ps(w + j + 16), _mm256_loadu_ps(x + j + 16)));
      s3 = _mm256_add_ps(s3, _mm256_mul_ps(_mm256_loadu_ps(w + j + 24), _mm256_loadu_ps(x + j + 24)));
    }
    for (; j + 8 <= n; j += 8) s0 = _mm256_add_ps(s0, _mm256_mul_ps(_mm256_loadu_ps(w + j), _mm256_loadu_ps(x + j)));
    float s = hsum256(_mm256_add_ps(_mm256_add_ps(s0, s1), _mm256_add_ps(s2, s3)));
    for (; j < n; ++j) s += w[j] * x[j];
    acc[i] = s;
  }
}

int detected_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return kIsaAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c")) return kIsaAvx2;
  return kIsaScalar;
}

// fn<BITS, D> for the output dtype
#define LOWRA_BY_DTYPE(fn, BITS) \
  (dtype == LOWRA_F16 ? fn<BITS, LOWRA_F16> : dtype == LOWRA_BF16 ? fn<BITS, LOWRA_BF16> : fn<BITS, LOWRA_F32>)

template <int BITS>
DecodeRowFn pick_row_dtype(int isa, int dtype) {
  return isa == kIsaAvx512 ? LOWRA_BY_DTYPE(decode_row_avx512, BITS) : LOWRA_BY_DTYPE(decode_row_avx2, BITS);
}

template <int BITS>
DecodeFn pick_dtype(int isa, int dtype) {
  return isa == kIsaAvx512 ? LOWRA_BY_DTYPE(decode_avx512, BITS) : LOWRA_BY_DTYPE(decode_avx2, BITS);
}
#undef LOWRA_BY_DTYPE

template <int BITS, int M>
DecodeDotFn pick_dot_rows(int isa) {
  return isa == kIsaAvx512 ? decode_dot_avx512<BITS, M> : decode_dot_avx2<BITS, M>;
}

template <int BITS>
DecodeDotFn pick_dot(int isa, int m) {
  static_assert(kMaxDecodeDotRows == 8, "one instantiation per row count");
  switch (m) {
    case 1: return pick_dot_rows<BITS, 1>(isa);
    case 2: return pick_dot_rows<BITS, 2>(isa);
    case 3: return pick_dot_rows<BITS, 3>(isa);
    case 4: return pick_dot_rows<BITS, 4>(isa);
    case 5: return pick_dot_rows<BITS, 5>(isa);
    case 6: return pick_dot_rows<BITS, 6>(isa);
    case 7: return pick_dot_rows<BITS, 7>(isa);
    case 8: return pick_dot_rows<BITS, 8>(isa);
    default: return nullptr;
  }
}

}  // namespace
#else
namespace {
int detected_isa() { return kIsaScalar; }
}  // namespace
#endif

namespace {
std::atomic<int> g_isa{-1};

void dot_scalar(const float* w, const float* a, int64_t lda, int m, int64_t n, float* acc) {
  for (int i = 0; i < m; ++i) {
    const float* x = a + i * lda;
    float s[4] = {0.f, 0.f, 0.f, 0.f};
    int64_t j = 0;
    for (; j + 4 <= n; j += 4)
      for (int k = 0; k < 4; ++k) s[k] += w[j + k] * x[j + k];
    float t = (s[0] + s[1]) + (s[2] + s[3]);
    for (; j < n; ++j) t += w[j] * x[j];
    acc[i] = t;
  }
}  // -1: not chosen yet (the CPU's best on first use); calls may come from many threads
}

int cpu_isa() {
  int isa = g_isa.load(std::memory_order_relaxed);
  if (isa < 0) g_isa.store(isa = detected_isa(), std::memory_order_relaxed);
  return isa;
}

int cpu_set_isa(int isa) {
  const int best = detected_isa();
  const int use = isa < 0 || isa > best ? best : isa;
  g_isa.store(use, std::memory_order_relaxed);
  return use;
}

// pick<bits>(level, arg) at the current vector level; nullptr at the scalar level or without x86 SIMD.
#ifdef LOWRA_X86_SIMD
namespace {
template <typename Fn, Fn (*P1)(int, int), Fn (*P2)(int, int), Fn (*P4)(int, int)>
Fn vector_fn(int bits, int arg) {
  const int isa = cpu_isa();
  if (isa == kIsaScalar) return nullptr;
  return bits == 1 ? P1(isa, arg) : bits == 2 ? P2(isa, arg) : P4(isa, arg);
}
}  // namespace
#define LOWRA_VECTOR_FN(Fn, pick, bits, arg) vector_fn<Fn, pick<1>, pick<2>, pick<4>>(bits, arg)
#else
#define LOWRA_VECTOR_FN(Fn, pick, bits, arg) ((void)(bits), (void)(arg), (Fn) nullptr)
#endif

DecodeFn decode_fn(int bits, int dtype) { return LOWRA_VECTOR_FN(DecodeFn, pick_dtype, bits, dtype); }

DecodeRowFn decode_row_fn(int bits, int dtype) { return LOWRA_VECTOR_FN(DecodeRowFn, pick_row_dtype, bits, dtype); }

DecodeDotFn decode_dot_fn(int bits, int m) { return LOWRA_VECTOR_FN(DecodeDotFn, pick_dot, bits, m); }
#undef LOWRA_VECTOR_FN

void halves_to_floats(const uint16_t* h, float* out, int64_t n) {
#ifdef LOWRA_X86_SIMD
  if (cpu_isa() != kIsaScalar) return halves_to_floats_f16c(h, out, n);  // both vector levels have F16C
#endif
  for (int64_t i = 0; i < n; ++i) out[i] = half_to_float(h[i]);
}

DotFn dot_fn() {
#ifdef LOWRA_X86_SIMD
  const int isa = cpu_isa();
  if (isa == kIsaAvx512) return dot_avx512;
  if (isa == kIsaAvx2) return dot_avx2;
#endif
  return dot_scalar;
}

}  // namespace lowra
