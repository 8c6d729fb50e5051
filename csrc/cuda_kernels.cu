// CUDA quantize / dequantize, bit-identical to the CPU kernels and the Python reference.
//
// Fast paths (the common layouts): one warp owns a segment of one row, so the row's precision is uniform across
// the warp; every lane handles chunks of 8 consecutive elements, which never cross a block (blocksize is a
// multiple of 8) and map to whole packed bytes (8 * bits / 8 = bits bytes), so loads and stores are wide.
// Dequantize looks codebook entries up in a per-warp shared table (on full segments of 16-bit outputs it scales the
// 1- and 2-bit codebooks once per chunk and selects or byte-permutes the results) and streams its output. On the
// common layout (dequantize_stream) each warp copies its next tasks' codes, scales and codebook into shared
// memory with cp.async while it decodes the current one; elsewhere (dequantize_fast) it
// loads each task's row metadata one task ahead and its codes into registers. Quantize reduces block absmax with
// shuffles inside the lanes of one block, multiplies by its reciprocal and encodes through a per-row lookup table
// of bins (4 bits) or one or two comparisons (1 and 2 bits); the rare element whose code that could get wrong (one
// within 2^-21 of a threshold, 2^-18 at 4 bits) sends its chunk to the exact division and a binary search over the
// thresholds.
// dequantize_fast covers every layout (chunks of 8 fit all; unaligned rows fall back to byte loads and scalar
// stores); quantize keeps a simple one-row-per-CTA kernel for blocksizes the shuffle reduction cannot cover.
//
// No kernel synchronizes the host: rows whose metadata would leave the packed buffer are skipped and counted in
// g_skipped_rows (read with lowra_cuda_take_skipped_rows), so launches are asynchronous and graph-capturable.
#include <stdio.h>

#include "cuda_common.cuh"
#include "kernels.h"

namespace lowra {

namespace {

thread_local char g_last_error[256] = "";

constexpr unsigned kFull = 0xffffffffu;

// ---------------------------------------------------------------------------------------------------------------
// Generic quantize (any blocksize, odd column counts, unaligned weights): one CTA per row.

__global__ void quantize_generic(const void* W, int dtype, int64_t cols, int64_t blocksize, int64_t pc,
                                 const uint8_t* bits, const uint16_t* thresholds, const int64_t* row_offsets,
                                 uint8_t* packed, int64_t packed_bytes, float* absmax) {
  const int64_t r = blockIdx.x;
  const int b = bits[r];
  if (!row_ok(b, row_offsets[r], pc, packed_bytes)) {
    if (threadIdx.x == 0) count_skipped_row();
    return;
  }
  const int n = (1 << b) - 1;
  const int per_byte = 8 / b;
  __shared__ float t[kThresholdSlots];
  if (threadIdx.x < kThresholdSlots) t[threadIdx.x] = half_bits_to_float(thresholds[r * kThresholdSlots + threadIdx.x]);
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
  const int64_t nb = pc / blocksize;
  const int64_t base = r * cols;
  uint8_t* out = packed + row_offsets[r];
  for (int64_t blk = warp; blk < nb; blk += nwarps) {  // one warp per block of the row
    const int64_t b0 = blk * blocksize;
    float amax = 0.0f;
    for (int64_t j = b0 + lane; j < b0 + blocksize && j < cols; j += 32) amax = fmaxf(amax, fabsf(load_elem(W, dtype, base + j)));
    for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(kFull, amax, o));
    if (lane == 0) absmax[r * nb + blk] = amax;
    const int64_t nbytes = blocksize / per_byte;
    for (int64_t k = lane; k < nbytes; k += 32) {
      uint32_t byte = 0;
      for (int e = 0; e < per_byte; ++e) {
        const int64_t j = b0 + k * per_byte + e;
        float v = 0.0f;
        if (j < cols && amax > 0.0f) v = __fdiv_rn(load_elem(W, dtype, base + j), amax);
        uint32_t c = 0;
        for (int q = 0; q < n; ++q) c += v > t[q];
        byte |= c << (e * b);
      }
      out[b0 / per_byte + k] = (uint8_t)byte;
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Fast dequantize: a warp task is (row, segment of kSegChunks * 256 elements); lane l handles the 8-element chunks
// seg * kSegChunks * 256 + q * 256 + 8 l. Loads for all chunks are issued before any use. Warps walk their tasks
// with a fixed (rows, segments) stride, so no per-task division; codebook lookups address the warp's 64-byte
// table with one shift and one OR.

constexpr int kSegChunks = 8;
constexpr int kSegElems = kSegChunks * 256;

template <typename T>
struct Out8;  // 8 output elements as one or two 16-byte stores
template <>
struct Out8<float> {
  static __device__ __forceinline__ void store(float* p, const float v[8]) {
    __stcs(reinterpret_cast<float4*>(p), make_float4(v[0], v[1], v[2], v[3]));
    __stcs(reinterpret_cast<float4*>(p) + 1, make_float4(v[4], v[5], v[6], v[7]));
  }
  static __device__ __forceinline__ float cvt(float v) { return v; }
};
template <>
struct Out8<__half> {
  static __device__ __forceinline__ void store(__half* p, const float v[8]) {
    uint4 u;
    __half2 h[4] = {__floats2half2_rn(v[0], v[1]), __floats2half2_rn(v[2], v[3]), __floats2half2_rn(v[4], v[5]),
                    __floats2half2_rn(v[6], v[7])};
    memcpy(&u, h, 16);
    __stcs(reinterpret_cast<uint4*>(p), u);
  }
  static __device__ __forceinline__ __half cvt(float v) { return __float2half_rn(v); }
};
template <>
struct Out8<__nv_bfloat16> {
  static __device__ __forceinline__ void store(__nv_bfloat16* p, const float v[8]) {
    uint4 u;
    __nv_bfloat162 h[4] = {__floats2bfloat162_rn(v[0], v[1]), __floats2bfloat162_rn(v[2], v[3]),
                           __floats2bfloat162_rn(v[4], v[5]), __floats2bfloat162_rn(v[6], v[7])};
    memcpy(&u, h, 16);
    __stcs(reinterpret_cast<uint4*>(p), u);
  }
  static __device__ __forceinline__ __nv_bfloat16 cvt(float v) { return __float2bfloat16_rn(v); }
};

// bits * 8 / 8 = bits bytes of packed codes for chunk index ch of a row (aligned loads when the row start is).
template <int B>
__device__ __forceinline__ uint32_t load_chunk_codes(const uint8_t* row, int64_t ch, bool al) {
  const uint8_t* p = row + ch * B;
  if (al) {
    if (B == 4) return __ldg(reinterpret_cast<const uint32_t*>(p));
    if (B == 2) return __ldg(reinterpret_cast<const uint16_t*>(p));
    return __ldg(p);
  }
  uint32_t w = 0;
#pragma unroll
  for (int i = 0; i < B; ++i) w |= (uint32_t)__ldg(p + i) << (8 * i);
  return w;
}

// One warp task of precision B: codebook from the warp's 16-float shared table `cb` (filled by the caller).
// Block of element j: a shift for power-of-two blocksizes (bs_shift >= 0), else a 32-bit division (j < 2^31).
__device__ __forceinline__ uint32_t block_of(int64_t j, int bs_shift, uint32_t blocksize) {
  return bs_shift >= 0 ? (uint32_t)(j >> bs_shift) : (uint32_t)j / blocksize;
}

// Codebook entry of the code at bits [s, s + B) of w, from a 64-byte-aligned shared table at address `base`.
template <int B>
__device__ __forceinline__ float lookup(uint32_t base, uint32_t w, int s) {
  const uint32_t off = (s >= 2 ? w >> (s - 2) : w << (2 - s)) & (((1u << B) - 1) << 2);
  float v;
  asm volatile("ld.shared.f32 %0, [%1];" : "=f"(v) : "r"(base | off));
  return v;
}

template <typename T, int B>
__device__ __forceinline__ void dequantize_task(const uint8_t* __restrict__ row, bool al, const AbsmaxSrc& amsrc,
                                                int64_t am_row, uint32_t cb, int64_t r, int64_t seg, int lane,
                                                int64_t cols,
                                                int bs_shift, uint32_t blocksize, bool vec_out, T* __restrict__ out) {
  uint32_t w[kSegChunks];
  AbsmaxRaw am[kSegChunks];
#pragma unroll
  for (int q = 0; q < kSegChunks; ++q) {  // all loads first
    const int64_t j0 = seg * kSegElems + q * 256 + 8 * lane;
    w[q] = 0;
    am[q] = AbsmaxRaw{0.0f, 0u};
    if (j0 < cols) {
      w[q] = load_chunk_codes<B>(row, j0 >> 3, al);
      am[q] = absmax_issue(amsrc, am_row + block_of(j0, bs_shift, blocksize));
    }
  }
#pragma unroll
  for (int q = 0; q < kSegChunks; ++q) {
    const int64_t j0 = seg * kSegElems + q * 256 + 8 * lane;
    if (j0 >= cols) break;
    const float scale = absmax_finish(amsrc, am[q]);
    float v[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) v[e] = lookup<B>(cb, w[q], e * B) * scale;
    T* o = out + r * cols + j0;
    if (vec_out) {
      Out8<T>::store(o, v);
    } else {
      for (int e = 0; e < 8 && j0 + e < cols; ++e) o[e] = Out8<T>::cvt(v[e]);
    }
  }
}

// Full segments of 16-bit outputs (the common case) take a leaner path than dequantize_task: no per-chunk bounds
// or 64-bit address arithmetic, and per chunk the block's scale is applied to the few codebook entries a low
// precision has instead of to every element. 1 bit: the two scaled entries, one picked per element; 2 bit: the four
// scaled entries rounded into two 16-bit pairs once, each output pair then picked by one byte permute; 4 bit:
// lookups as in dequantize_task. Every output is still (T)(codebook[code] * scale) rounded once, as in the reference.
template <typename T>
struct Pair16;  // two floats -> one 32-bit pair of T (round to nearest even), low half first
template <>
struct Pair16<__half> {
  static __device__ __forceinline__ uint32_t pack(float a, float b) {
    const __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
};
template <>
struct Pair16<__nv_bfloat16> {
  static __device__ __forceinline__ uint32_t pack(float a, float b) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<const uint32_t*>(&h);
  }
};

// Byte-permute selectors of a 2-bit chunk: P[c] = the two selector nibbles (2c, 2c + 1) of the 16-bit value of code
// c in the pool {pair(v0, v1), pair(v2, v3)}; byte c of kPairSel is P[c].
constexpr uint32_t kPairSel = 0x76543210u;

// Loads the compiler keeps where they are written (volatile asm is not reordered against other volatile asm), so
// that a segment's loads are all in flight before its first use.
template <int B>
__device__ __forceinline__ uint32_t ld_codes(const uint8_t* p) {
  uint32_t v;
  if (B == 4) asm volatile("ld.global.nc.u32 %0, [%1];" : "=r"(v) : "l"(p));
  else if (B == 2) asm volatile("ld.global.nc.u16 %0, [%1];" : "=r"(v) : "l"(p));
  else asm volatile("ld.global.nc.u8 %0, [%1];" : "=r"(v) : "l"(p));
  return v;
}
__device__ __forceinline__ float ld_f32(const float* p) {
  float v;
  asm volatile("ld.global.nc.f32 %0, [%1];" : "=f"(v) : "l"(p));
  return v;
}
__device__ __forceinline__ float opaque(float v) {  // keeps a product from being re-derived per element
  asm("mov.b32 %0, %0;" : "+f"(v));
  return v;
}

// The 8 outputs of one chunk (codes w, block scale s) of a full segment as four 16-bit pairs; c: codebook entries
// 0..3, cb: the warp's float table.
template <typename T, int B>
__device__ __forceinline__ uint4 decode_chunk16(uint32_t w, float s, const float (&c)[4], uint32_t cb) {
  if (B == 1) {
    const float v0 = opaque(c[0] * s), v1 = opaque(c[1] * s);
    float v[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) v[e] = (w >> e) & 1u ? v1 : v0;
    return make_uint4(Pair16<T>::pack(v[0], v[1]), Pair16<T>::pack(v[2], v[3]), Pair16<T>::pack(v[4], v[5]),
                      Pair16<T>::pack(v[6], v[7]));
  } else if (B == 2) {
    const uint32_t lo = Pair16<T>::pack(c[0] * s, c[1] * s), hi = Pair16<T>::pack(c[2] * s, c[3] * s);
    // X byte k = P[code 2k], Y byte k = P[code 2k + 1]; output pair k's selector = (X byte k, Y byte k).
    // __byte_perm masks each run-time selector (a LOP3); prmt.b32 without them measured level (thirteenth round).
    const uint32_t X = __byte_perm(kPairSel, 0u, w & 0x3333u), Y = __byte_perm(kPairSel, 0u, (w >> 2) & 0x3333u);
    return make_uint4(__byte_perm(lo, hi, __byte_perm(X, Y, 0x40u)), __byte_perm(lo, hi, __byte_perm(X, Y, 0x51u)),
                      __byte_perm(lo, hi, __byte_perm(X, Y, 0x62u)), __byte_perm(lo, hi, __byte_perm(X, Y, 0x73u)));
  } else {
    float v[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) v[e] = lookup<4>(cb, w, 4 * e) * s;
    return make_uint4(Pair16<T>::pack(v[0], v[1]), Pair16<T>::pack(v[2], v[3]), Pair16<T>::pack(v[4], v[5]),
                      Pair16<T>::pack(v[6], v[7]));
  }
}

template <typename T, int B, bool NESTED>
__device__ __forceinline__ void dequantize_full_seg(const uint8_t* __restrict__ codes, const AbsmaxSrc& amsrc,
                                                    int64_t am_row, uint32_t j0, int bs_shift, uint32_t cb,
                                                    const float (&c)[4], T* __restrict__ o) {
  uint32_t w[kSegChunks];
  AbsmaxRaw am[kSegChunks];
#pragma unroll
  for (int q = 0; q < kSegChunks; ++q) {  // all loads first
    w[q] = ld_codes<B>(codes + 32 * B * q);
    const int64_t i = am_row + ((j0 + 256u * q) >> bs_shift);
    am[q] = NESTED ? nested_issue(amsrc, i) : AbsmaxRaw{ld_f32(amsrc.f32 + i), 0u};
  }
#pragma unroll
  for (int q = 0; q < kSegChunks; ++q) {
    const float s = NESTED ? nested_finish(amsrc, am[q]) : am[q].v;
    __stcs(reinterpret_cast<uint4*>(o + 256 * q), decode_chunk16<T, B>(w[q], s, c, cb));
  }
}

// A warp's walk over (row, segment) tasks: from task `first` on, in steps of the grid's warp count, kept as a
// (rows, segments) stride so that no 64-bit division runs per task.
struct TaskWalk {
  int64_t r, seg;
  int64_t dr, dseg, segs;
  __device__ __forceinline__ TaskWalk(int64_t first, int64_t warps, int64_t segs_)
      : r(first / segs_), seg(first % segs_), dr(warps / segs_), dseg(warps % segs_), segs(segs_) {}
  __device__ __forceinline__ void next() {
    r += dr, seg += dseg;
    if (seg >= segs) seg -= segs, ++r;
  }
};

template <typename T>
__global__ void __launch_bounds__(256) dequantize_fast(const uint8_t* __restrict__ packed, int64_t packed_bytes,
                                                       const AbsmaxSrc absmax, const uint8_t* __restrict__ bits,
                                                       const uint16_t* __restrict__ codebook,
                                                       const int64_t* __restrict__ row_offsets, int64_t rows,
                                                       int64_t cols, int64_t blocksize, int bs_shift, int64_t pc,
                                                       int64_t segs, bool vec_out, bool full_ok,
                                                       T* __restrict__ out) {
  __shared__ __align__(64) float table[8][kCodebookSlots];  // each warp's current codebook (no bank conflicts)
  const int lane = threadIdx.x & 31, wib = threadIdx.x >> 5;
  float* cb = table[wib];
  const uint32_t cb_addr = (uint32_t)__cvta_generic_to_shared(cb);
  const int64_t warps = (int64_t)gridDim.x * (blockDim.x >> 5);
  const int64_t nb = pc / blocksize;
  const int64_t first = (int64_t)blockIdx.x * (blockDim.x >> 5) + wib;
  // A task's row metadata (precision, offset, this lane's codebook entry) is loaded one task ahead, so that a task
  // starts with the loads of its codes instead of a chain of dependent metadata loads.
  TaskWalk nt(first, warps, segs);
  int nbits = 0;
  int64_t nstart = 0;
  uint16_t ncb = 0;
  auto fetch = [&]() {
    if (nt.r >= rows) return;
    nbits = bits[nt.r];
    nstart = row_offsets[nt.r];
    if (lane < kCodebookSlots) ncb = __ldg(codebook + nt.r * kCodebookSlots + lane);
  };
  fetch();
  while (nt.r < rows) {
    const int64_t r = nt.r, seg = nt.seg;
    const int b = nbits;
    const int64_t start = nstart;
    const uint16_t cbh = ncb;
    nt.next();
    fetch();
    if (!row_ok(b, start, pc, packed_bytes)) {  // warp-uniform
      if (lane == 0 && seg == 0) count_skipped_row();
      continue;
    }
    const uint8_t* row = packed + start;
    const bool al = ((uintptr_t)row & (b - 1)) == 0;
    __syncwarp();  // the previous task's lookups are done
    if (lane < kCodebookSlots) cb[lane] = half_bits_to_float(cbh);
    __syncwarp();
    const int64_t am_row = r * nb;
    if constexpr (sizeof(T) == 2) {
      if (full_ok && al && (seg + 1) * kSegElems <= cols) {
        const uint32_t j0 = (uint32_t)(seg * kSegElems) + 8u * lane;
        const float c[4] = {cb[0], cb[1], cb[2], cb[3]};
        const uint8_t* codes = row + ((j0 * (uint32_t)b) >> 3);
        T* o = out + r * cols + j0;
#define LOWRA_FS(B, N) dequantize_full_seg<T, B, N>(codes, absmax, am_row, j0, bs_shift, cb_addr, c, o)
        if (absmax.f32) {
          if (b == 1) LOWRA_FS(1, false);
          else if (b == 2) LOWRA_FS(2, false);
          else LOWRA_FS(4, false);
        } else {
          if (b == 1) LOWRA_FS(1, true);
          else if (b == 2) LOWRA_FS(2, true);
          else LOWRA_FS(4, true);
        }
#undef LOWRA_FS
        continue;
      }
    }
    const uint32_t bs = (uint32_t)blocksize;
#define LOWRA_DT(B) dequantize_task<T, B>(row, al, absmax, am_row, cb_addr, r, seg, lane, cols, bs_shift, bs, vec_out, out)
    if (b == 1) LOWRA_DT(1);
    else if (b == 2) LOWRA_DT(2);
    else LOWRA_DT(4);
#undef LOWRA_DT
  }
}

// Streamed dequantize, the common layout (16-bit outputs, float32 or double-quantized scales, power-of-two blocksizes
// of 32 to 2048, columns a multiple of 256): tasks as in dequantize_fast, but each warp copies the codes, scales and
// codebook of its next kDqStages - 1 tasks into its own shared stages with cp.async while it decodes the current one,
// so the loads in flight hold no registers. H200, bf16 out, us (4-bit / 1.75-bit), against dequantize_fast in the same
// call: 4096x4096 14.5 / 12.5 (15.5 / 13.3), 11008x4096 31.7 / 29.3 (33.9 / 30.7), 4096x11008 33.7 / 30.9 (34.1 /
// 35.4), 28672x8192 162.9 / 148.7 (163.5 / 148.7). 3 stages, 4 at 64 registers, or 3 at 6 CTAs per SM measured level on
// the large layers and up to 8% slower on 11008x4096. Those figures are for an even split over a resident grid; since
// the fortieth round (stream_launch) a warp takes one task, so only its first stage fills unless the knobs ask for more
// tasks per warp. Double-quantized scales (NESTED) are decoded as the task is staged (the loads wait while the codes'
// copies fly) and staged as float32: under the even split, decoding them from the stage had measured 4% slower than
// dequantize_fast on the large layers, but that kernel does not gain from stream_launch (forty-first round: 3-10%
// slower on that launch; docs/benchmarks.md).
constexpr int kDqStages = 4;
// Stage layout: the codes (a 4-bit segment: 1 KB), up to 64 scales, the codebook's 16 halves, and the task's
// precision (0: nothing to write). 5 CTAs of 8 warps fit an SM's shared memory.
constexpr int kStScales = kSegElems / 2;
constexpr int kStCodebook = kStScales + 4 * 64;
constexpr int kStBits = kStCodebook + 2 * kCodebookSlots;
constexpr int kStBytes = kStBits + 16;

__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async4(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;" ::"r"(dst), "l"(src) : "memory");
}
template <typename V>
__device__ __forceinline__ V lds(uint32_t a) {
  uint32_t v;
  if (sizeof(V) == 4) asm volatile("ld.shared.u32 %0, [%1];" : "=r"(v) : "r"(a));
  else if (sizeof(V) == 2) asm volatile("ld.shared.u16 %0, [%1];" : "=r"(v) : "r"(a));
  else asm volatile("ld.shared.u8 %0, [%1];" : "=r"(v) : "r"(a));
  return (V)v;
}

// A stage's chunks of precision B: lane l's chunk q is 8 elements at o + 256 q (q < nq); its scale is entry
// ((j0 + 256 q) >> bs_shift) - b0 of the stage's scales (b0: the task's first block in the row).
template <typename T, int B>
__device__ __forceinline__ void decode_stage(uint32_t stg, int nq, uint32_t j0, uint32_t b0, int bs_shift, int lane,
                                             uint32_t cb, const float (&c)[4], T* __restrict__ o) {
#pragma unroll
  for (int q = 0; q < kSegChunks; ++q) {
    if (q >= nq) break;
    const uint32_t w = B == 4 ? lds<uint32_t>(stg + 128 * q + 4 * lane)
                       : B == 2 ? lds<uint16_t>(stg + 64 * q + 2 * lane)
                                : lds<uint8_t>(stg + 32 * q + lane);
    const float s = __uint_as_float(lds<uint32_t>(stg + kStScales + 4 * (((j0 + 256u * q) >> bs_shift) - b0)));
    __stcs(reinterpret_cast<uint4*>(o + 256 * q), decode_chunk16<T, B>(w, s, c, cb));
  }
}

template <typename T, bool NESTED>
__global__ void __launch_bounds__(256, 5) dequantize_stream(const uint8_t* __restrict__ packed, int64_t packed_bytes,
                                                            const AbsmaxSrc absmax, const uint8_t* __restrict__ bits,
                                                            const uint16_t* __restrict__ codebook,
                                                            const int64_t* __restrict__ row_offsets, int64_t rows,
                                                            int64_t cols, int bs_shift, int64_t pc, int64_t segs,
                                                            T* __restrict__ out) {
  __shared__ __align__(16) unsigned char stages[8][kDqStages][kStBytes];
  __shared__ __align__(64) float table[8][kCodebookSlots];
  // as a programmatic dependent (stream_launch): nothing the previous kernel writes or reads is touched before it
  // completes, so only this grid's launch overlaps that kernel's tail
  griddep_launch_dependents();
  griddep_wait();
  const int lane = threadIdx.x & 31, wib = threadIdx.x >> 5;
  const uint32_t st0 = (uint32_t)__cvta_generic_to_shared(stages[wib][0]);
  const uint32_t cb_addr = (uint32_t)__cvta_generic_to_shared(table[wib]);
  const int64_t warps = (int64_t)gridDim.x * (blockDim.x >> 5), first = (int64_t)blockIdx.x * (blockDim.x >> 5) + wib;
  const int64_t nb = pc >> bs_shift;
  // the next task to copy (cw) and its row's metadata, loaded one copy ahead (loading the first 4 tasks' metadata
  // together measured level or slower, fourteenth round)
  TaskWalk cw(first, warps, segs);
  int cbits = 0;
  int64_t cstart = 0;
  auto fetch = [&]() {
    if (cw.r < rows) cbits = bits[cw.r], cstart = row_offsets[cw.r];
  };
  auto copy_next = [&](uint32_t stg) {
    int b = 0;
    if (cw.r < rows) {
      b = cbits;
      if (!row_ok(b, cstart, pc, packed_bytes)) {  // warp-uniform
        if (lane == 0 && cw.seg == 0) count_skipped_row();
        b = 0;
      } else {
        const int64_t j = cw.seg * kSegElems;
        const int len = (int)min((int64_t)kSegElems, cols - j);  // a multiple of 256
        const uint8_t* src = packed + cstart + ((j * b) >> 3);
        const int nbytes = (len * b) >> 3;
        if (((uintptr_t)src & 15) == 0) {
          for (int i = 16 * lane; i < nbytes; i += 512) cp_async16(stg + i, src + i);
        } else {  // a row off the 16-byte grid (offsets not laid out by row_offsets()): byte copies
          for (int i = lane; i < nbytes; i += 32)
            asm volatile("st.shared.u8 [%0], %1;" ::"r"(stg + i), "r"((uint32_t)__ldg(src + i)));
        }
        const int64_t a0 = cw.r * nb + (j >> bs_shift);
        const int ns = (int)(((j + len - 1) >> bs_shift) - (j >> bs_shift)) + 1;
        if (NESTED) {  // decoded here, into the stage as float32: the loads wait while the codes' copies fly
          for (int i = lane; i < ns; i += 32) {
            const float v = nested_finish(absmax, nested_issue(absmax, a0 + i));
            asm volatile("st.shared.f32 [%0], %1;" ::"r"(stg + kStScales + 4 * i), "f"(v) : "memory");
          }
        } else {
          for (int i = lane; i < ns; i += 32) cp_async4(stg + kStScales + 4 * i, absmax.f32 + a0 + i);
        }
        if (lane < 2) cp_async16(stg + kStCodebook + 16 * lane, codebook + cw.r * kCodebookSlots + 8 * lane);
      }
    }
    if (lane == 0) asm volatile("st.shared.s32 [%0], %1;" ::"r"(stg + kStBits), "r"(b));
    asm volatile("cp.async.commit_group;" ::: "memory");
    cw.next();
    fetch();
  };
  fetch();
#pragma unroll
  for (int k = 0; k < kDqStages - 1; ++k) copy_next(st0 + k * kStBytes);
  TaskWalk dw(first, warps, segs);  // the task decoded now, in stage `slot`
  int slot = 0;
  while (dw.r < rows) {
    __syncwarp();  // every lane is done with the stage (and table) the next copy overwrites
    copy_next(st0 + (slot == 0 ? kDqStages - 1 : slot - 1) * kStBytes);
    asm volatile("cp.async.wait_group %0;" ::"n"(kDqStages - 1) : "memory");  // this lane's copies of the task
    __syncwarp();                                                              // and every lane's have landed
    const uint32_t stg = st0 + slot * kStBytes;
    const int b = lds<uint32_t>(stg + kStBits);
    if (b) {
      if (lane < kCodebookSlots) table[wib][lane] = half_bits_to_float(lds<uint16_t>(stg + kStCodebook + 2 * lane));
      __syncwarp();
      const float c[4] = {table[wib][0], table[wib][1], table[wib][2], table[wib][3]};
      const uint32_t j = (uint32_t)(dw.seg * kSegElems), j0 = j + 8u * lane, b0 = j >> bs_shift;
      const int nq = (int)min((int64_t)kSegChunks, (cols - j) >> 8);
      T* o = out + dw.r * cols + j0;
      if (b == 1) decode_stage<T, 1>(stg, nq, j0, b0, bs_shift, lane, cb_addr, c, o);
      else if (b == 2) decode_stage<T, 2>(stg, nq, j0, b0, bs_shift, lane, cb_addr, c, o);
      else decode_stage<T, 4>(stg, nq, j0, b0, bs_shift, lane, cb_addr, c, o);
    }
    slot = slot + 1 == kDqStages ? 0 : slot + 1;
    dw.next();
  }
  asm volatile("cp.async.wait_group 0;" ::: "memory");  // the copies issued past the last task
}

// ---------------------------------------------------------------------------------------------------------------
// Fast quantize: blocksize a power of two in [8, 256] (a block is blocksize / 8 consecutive lanes of a warp), cols
// a multiple of 8 and a 16-byte aligned weight.

// Warp task = (row, segment of kQChunks<T, LB> * 256 elements): lane l quantizes the 8-element chunks
// seg * kQChunks * 256 + q * 256 + 8 l, loading all of them (LB = 128 or 64 bytes per lane) before any use. Warps
// walk their tasks with a fixed (rows, segments) stride, as dequantize does, and set up a row's thresholds only when
// the row changes.
template <typename T>
struct QIn;  // the raw 16 or 32 bytes of one 8-element chunk, converted to float only when used
template <>
struct QIn<float> {
  float4 a, b;
  __device__ __forceinline__ void load(const float* p) {
    a = __ldcs(reinterpret_cast<const float4*>(p)), b = __ldcs(reinterpret_cast<const float4*>(p) + 1);
  }
  __device__ __forceinline__ void zero() { a = b = make_float4(0.f, 0.f, 0.f, 0.f); }
  __device__ __forceinline__ void get(float x[8]) const {
    x[0] = a.x, x[1] = a.y, x[2] = a.z, x[3] = a.w, x[4] = b.x, x[5] = b.y, x[6] = b.z, x[7] = b.w;
  }
};
template <>
struct QIn<__half> {
  uint4 u;
  __device__ __forceinline__ void load(const __half* p) { u = __ldcs(reinterpret_cast<const uint4*>(p)); }
  __device__ __forceinline__ void zero() { u = make_uint4(0, 0, 0, 0); }
  __device__ __forceinline__ void get(float x[8]) const {
    const __half2* h = reinterpret_cast<const __half2*>(&u);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const float2 f = __half22float2(h[i]);
      x[2 * i] = f.x, x[2 * i + 1] = f.y;
    }
  }
};
template <>
struct QIn<__nv_bfloat16> {
  uint4 u;
  __device__ __forceinline__ void load(const __nv_bfloat16* p) { u = __ldcs(reinterpret_cast<const uint4*>(p)); }
  __device__ __forceinline__ void zero() { u = make_uint4(0, 0, 0, 0); }
  __device__ __forceinline__ void get(float x[8]) const {  // bf16 -> f32 is a 16-bit shift
    const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      uint32_t hi;  // opaque to the compiler, which otherwise rebuilds (hi << 1) from w in three instructions
      asm("and.b32 %0, %1, 0xffff0000;" : "=r"(hi) : "r"(w[i]));
      x[2 * i] = __uint_as_float(w[i] << 16), x[2 * i + 1] = __uint_as_float(hi);
    }
  }
};

// LB = bytes of weights a lane loads per task: 128 (8 chunks of 2-byte weights, 4 of float) when every row has one
// precision, 64 when rows mix precisions. A mix runs three precisions' unrolled bodies on every SM at once and waits
// on instruction fetch (ncu, fourteenth round: 4.0 cycles per issue, 0.2 for all rows 4-bit); 64 bytes per lane
// halves the bodies (fifteenth round: 14-24% off the mix; tenth round: 5-7% onto all-4-bit large layers).
template <typename T, int LB = 128>
constexpr int kQChunks = LB / sizeof(QIn<T>);
// 1- and 2-bit rows encode their chunks in two passes of one unrolled half-body, so that the three precisions'
// hot loops fit the instruction cache together: a mix of precisions was bound by instruction fetch (ncu, sixth
// round), and this took 16-29% off the 1.75-bit mix. 4-bit rows keep one pass: alone (all rows 4-bit) their body
// is the only hot one, and halving it cost them 8-10% (docs/benchmarks.md, tenth round). The mix is still fetch-bound
// (ncu, fourteenth round: 4.0 cycles per issue wait for instructions, against 0.2 for all rows 4-bit).
template <int B, int LB>
constexpr int kQPasses = B <= 2 && LB == 128 ? 2 : 1;
template <typename T, int LB = 128>
constexpr int kQSegElems = kQChunks<T, LB> * 256;
// CTAs of 256 threads per SM: 64-byte tasks fit 64 registers, so 4 (32 warps); 128-byte ones need 80, so 3. H200,
// seventeenth round, A B B A against 3 CTAs: the 1.75-bit mix 2-5% faster on four layers, 3% slower on 4096x4096.
template <int LB>
constexpr int kQBlocksPerSm = LB == 64 ? 4 : 3;

// Encoding. The reference encodes v = RN(x / a) (a = the block's absmax) as #{thresholds t < v}. The fast path never
// forms v, nor even q = x y: with y = rcp.approx(a) once per block (within 1 ulp of 1/a) and a in [2^-120, 2^100],
// the exact product x y lies within 2^-23 of x/a for every |x| <= a (a y = 1 + e with |e| <= 2^-23), and v within
// 2^-25 of x/a. Each comparison with a threshold t is one FMA, d = RN(x y - t), whose sign decides v > t whenever
// |d| > kNear = 2^-21 (kNear4 at 4 bits, below): one instruction per element less than forming q first. A chunk with
// an element nearer than that to a threshold it is compared with (or NaN, or a block maximum outside the range) is
// recomputed exactly: __fdiv_rn, then the binary search of encode4 / encode12.
// Ordinary weights send a few chunks in 10^5 there; the adversarial tests (tests/test_quantize_exact.py) send many.
constexpr float kNear = 0x1p-21f;

// Exact encoding = the number of thresholds strictly below v, found by a binary search over the row's thresholds in
// Eytzinger order (node 1 is the median, node i's children are 2i and 2i + 1; the search ends at node 2^B + code).
// Its comparisons are those of a sorted binary search, so sorted thresholds, duplicates included, give #{t < v}; NaN
// compares false everywhere. For B = 4, nodes 1..3 live in registers, nodes 4..7 come from a shuffle of the lane
// that holds them and nodes 8..15 from the warp's shared table (16 words in 16 banks). Written in PTX so that every
// level is one compare and predicated adds. Returns the table address tab + 2 (16 + code).
__device__ __forceinline__ uint32_t encode4(float v, float n1, float n2, float n3, float node, uint32_t tab) {
  uint32_t a;
  asm("{\n\t.reg .pred p;\n\t.reg .f32 t;\n\t.reg .u32 i;\n\t"
      "setp.gt.f32 p, %1, %2;\n\t"
      "selp.f32 t, %4, %3, p;\n\t"
      "selp.u32 i, 6, 4, p;\n\t"
      "setp.gt.f32 p, %1, t;\n\t"
      "@p add.u32 i, i, 1;\n\t"
      "shfl.sync.idx.b32 t, %5, i, 31, -1;\n\t"
      "setp.gt.f32 p, %1, t;\n\t"
      "mad.lo.u32 %0, i, 8, %6;\n\t"
      "@p add.u32 %0, %0, 4;\n\t"
      "ld.shared.f32 t, [%0];\n\t"
      "setp.gt.f32 p, %1, t;\n\t"
      "@p add.u32 %0, %0, 2;\n\t}"
      : "=r"(a)
      : "f"(v), "f"(n1), "f"(n2), "f"(n3), "f"(node), "r"(tab)
      : "memory");
  return a;
}

// The code of v for B = 1 or 2 (thresholds t0 = node 2 and t2 = node 3 around the median n1 for B = 2).
template <int B>
__device__ __forceinline__ uint32_t encode12(float v, float n1, float n2, float n3) {
  const bool p1 = v > n1;
  if (B == 1) return p1;
  return (p1 ? 2u : 0u) + (v > (p1 ? n3 : n2));
}

// The same code on the fast path, from x and y = ~1/a: each comparison is the sign of RN(x y - t), and `near`
// records whether that difference was within kNear.
template <int B>
__device__ __forceinline__ uint32_t encode12_fast(float x, float y, float n1, float n2, float n3, bool& near) {
  const float d1 = __fmaf_rn(x, y, -n1);
  near |= !(fabsf(d1) > kNear);
  const bool p1 = d1 > 0.0f;
  if (B == 1) return p1;
  const float d2 = __fmaf_rn(x, y, -(p1 ? n3 : n2));
  near |= !(fabsf(d2) > kNear);
  return (p1 ? 2u : 0u) + (d2 > 0.0f);
}

// Fast 4-bit encoding through a per-warp table of kQBins one-word bins, bin k = RN(128 q + 130) with q = x y exact:
// one FMA of x (y 2^-15) onto 2 + 130 2^-22 leaves k in the low bits (the float grid in [2, 4) is 2^-22 apart),
// and the bits of 2.0, 0x40000000, vanish from the bin's byte offset 4 k mod 2^32. Bin k holds the q in
// [L, H] = [(k - 130.5) / 128, (k - 129.5) / 128], so v lies inside (L - kNear, H + kNear). Its word is the bits of
// the only threshold t in [L - kNear, H + kNear) (2^100 when none; NaN when several, which sends the bin's elements
// to the exact path) with base = #{t < L - kNear} in the low 4 bits, where a float16 threshold has 13 zero bits.
// Then code = base + (v > t). Those 4 bits move t by at most 15 ulps (|t| < 1.25 in a bin: under 2^-19), so q
// decides v > t when it is more than kNear4 = 2^-18 from the stored value. |q| <= 1 + 2^-23 keeps k in [2, 258]
// with no clamp: the only other result, a NaN x (or an infinite one, whose block maximum is out of range, so
// y = 0), makes the FMA's canonical NaN 0x7fffffff, word address bins - 4 (the table's last threshold word, in the
// same shared buffer), and its x y - t is NaN, which sends the chunk to the exact path. (y 2^-15 stays normal:
// a <= 2^100.) 288 = 9 bins per lane to build.
constexpr int kQBins = 288;
constexpr float kNear4 = 0x1p-18f;
constexpr uint32_t kNoThreshold = 0x71800000u;  // 2^100: above every q
struct QBins {
  float t[kQBins];     // during the build: each bin's threshold
  uint32_t e[kQBins];  // during the build, counts; then the bins' words
};

// Fill the warp's bins (lane l owns bins 9 l .. 9 l + 8); lane i < 15 holds the row's sorted threshold t_i. Threshold
// i counts in the base of bin k exactly when k >= K_i = floor(128 (t_i + kNear) + 130.5) + 1, and lies inside bins
// kl_i = floor(128 (t_i - kNear) + 129.5) + 1 .. K_i - 1; a bin inside the range of a neighbour too is dense (sorted
// thresholds: only neighbours can share a bin). Both floors are exact: t is clamped to [-2, 2], which changes no
// count, and a t near enough to a bin edge to matter has no bits below 2^-19.
__device__ __forceinline__ void build_bins(QBins& b, float t, int lane) {
  const int k0 = 9 * lane;
#pragma unroll
  for (int s = 0; s < 9; ++s) b.t[k0 + s] = __uint_as_float(kNoThreshold), b.e[k0 + s] = 0u;
  const float c = fminf(fmaxf(t, -2.0f), 2.0f);
  const int K = (int)floorf(__fmaf_rn(128.0f, c, 130.5f + 128.0f * kNear)) + 1;
  const int kl = (int)floorf(__fmaf_rn(128.0f, c, 129.5f - 128.0f * kNear)) + 1;
  const int K_prev = __shfl_up_sync(kFull, K, 1), kl_next = __shfl_down_sync(kFull, kl, 1);
  __syncwarp();
  if (lane < kThresholdSlots) {
    if (K < kQBins) atomicAdd(&b.e[max(K, 0)], 1u);
    for (int k = max(kl, 0); k < min(K, kQBins); ++k) {
      const bool dense = (lane > 0 && k < K_prev) || (lane + 1 < kThresholdSlots && k >= kl_next);
      b.t[k] = dense ? __int_as_float(0x7fc00000) : t;
    }
  }
  __syncwarp();
  uint32_t run = 0, incl[9];  // base = inclusive prefix sum of the counts: a scan of 9 bins per lane, then lanes
#pragma unroll
  for (int s = 0; s < 9; ++s) incl[s] = run += b.e[k0 + s];
  uint32_t lanes = run;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const uint32_t n = __shfl_up_sync(kFull, lanes, o);
    if (lane >= o) lanes += n;
  }
#pragma unroll
  for (int s = 0; s < 9; ++s) b.e[k0 + s] = __float_as_uint(b.t[k0 + s]) | (lanes - run + incl[s]);
}

// The bin words of 8 elements x with y15 = y 2^-15, all loads issued before any is used; `bins` is the warp's word
// table (shared address).
__device__ __forceinline__ void load_bins(const float (&x)[8], float y15, uint32_t bins, uint32_t (&w)[8]) {
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    const float f = __fmaf_rn(x[e], y15, 2.0f + 130.0f * 0x1p-22f);
    asm volatile("ld.shared.u32 %0, [%1];" : "=r"(w[e]) : "r"(__float_as_uint(f) * 4 + bins) : "memory");
  }
}

// The codes of 8 bin words as one packed word (nibble e = element e): bits 4-12 of a word are zero (the
// threshold is a float16's float32 bits), so w0 + (w1 << 4) has both bases in its low byte, and three byte permutes
// gather the four bytes. 7 instructions instead of a mask and a shift-add per element: 4-bit quantize 7-8% faster.
__device__ __forceinline__ uint32_t pack_bases(const uint32_t (&w)[8]) {
  const uint32_t x01 = w[0] + (w[1] << 4), x23 = w[2] + (w[3] << 4);
  const uint32_t x45 = w[4] + (w[5] << 4), x67 = w[6] + (w[7] << 4);
  return __byte_perm(__byte_perm(x01, x23, 0x40u), __byte_perm(x45, x67, 0x40u), 0x5410u);
}

// The bin word w with its base raised to the code: + 1 where x y is above the bin's threshold t, which is the sign
// bit of t - x y (one LEA.HI; a zero or NaN difference is near). The bits above the base stay those of t.
__device__ __forceinline__ uint32_t encode4_fast(float x, float y, uint32_t w, bool& near) {
  const float d = __fmaf_rn(-x, y, __uint_as_float(w));
  near |= !(fabsf(d) > kNear4);
  return w + (__float_as_uint(d) >> 31);
}

// A row's encoding state: the Eytzinger nodes 1..3, the lane's own node, the node table and the 4-bit bins.
struct QRow {
  float n1, n2, n3, node;
  uint32_t tab, tab_sum;  // the table's shared address; encode4's table terms over a chunk (mod 2^32)
  uint32_t bins;          // the bins' words (shared address)
};

struct F8 {
  float v[8];
};

// The packed codes of a chunk from the exact quotients. Rare, so out of line: the three precisions' unrolled fast
// paths then share the instruction cache. The whole warp calls it (encode4 shuffles).
template <int B>
__device__ __noinline__ uint32_t encode_exact(F8 x, float amax, QRow s) {
  F8 v;
#pragma unroll
  for (int e = 0; e < 8; ++e) v.v[e] = amax > 0.0f ? __fdiv_rn(x.v[e], amax) : 0.0f;
  uint32_t word = 0;
  if (B == 4) {  // sum of (tab + 2 (16 + code_e)) << (4 e - 1), less the table terms
    word = encode4(v.v[0], s.n1, s.n2, s.n3, s.node, s.tab) >> 1;
#pragma unroll
    for (int e = 1; e < 8; ++e) word += encode4(v.v[e], s.n1, s.n2, s.n3, s.node, s.tab) << (4 * e - 1);
    word -= s.tab_sum;
  } else {
#pragma unroll
    for (int e = 0; e < 8; ++e) word |= encode12<B>(v.v[e], s.n1, s.n2, s.n3) << (e * B);
  }
  return word;
}

// One warp task of precision B. `out` and `am` point at the lane's first chunk's codes and block maximum; `left` is
// the number of padded columns from the lane's first chunk on (chunks at or past the padding write nothing; their
// encoding is not skipped: a per-chunk break measured 2-7% slower everywhere but on short last segments, and 64
// bytes per lane for rows whose last segment is mostly padding 1% slower on 4096x11008, fifteenth round).
// GS = log2(lanes per block) when fixed at compile time (3: blocksize 64), else -1 and group_shift has it.
template <typename T, int LB, int B, int GS, bool AL>
__device__ __forceinline__ void quantize_task(QIn<T> (&in)[kQChunks<T, LB>], int lane, int group_shift,
                                              const QRow& s, uint8_t* __restrict__ out,
                                              float* __restrict__ am, int64_t left) {
  if (GS >= 0) group_shift = GS;
  const int group = 1 << group_shift;  // lanes per block
  constexpr int kPer = kQChunks<T, LB> / kQPasses<B, LB>;
#pragma unroll 1
  for (int h = 0; h < kQPasses<B, LB>; ++h) {
    if (h) {  // the next kPer chunks move down (register moves), so one unrolled body serves every pass
#pragma unroll
      for (int q = 0; q + kPer < kQChunks<T, LB>; ++q) in[q] = in[q + kPer];
      out += kPer * 32 * B;
      am += kPer << (5 - group_shift);
      left -= kPer * 256;
    }
#pragma unroll
    for (int q = 0; q < kPer; ++q) {
      F8 x;
      in[q].get(x.v);
      float amax = 0.0f;
#pragma unroll
      for (int e = 0; e < 8; ++e) amax = fmaxf(amax, fabsf(x.v[e]));
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        if (GS >= 0 && o >= group) break;
        const float other = __shfl_xor_sync(kFull, amax, o);  // every lane shuffles: no branch when GS < 0
        if (o < group) amax = fmaxf(amax, other);
      }
      float y;  // ftz changes nothing for the normal amax the fast path uses
      asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(amax));
      const bool in_range = amax >= 0x1p-120f && amax <= 0x1p100f;
      if (!in_range) y = 0.0f;  // x y = 0 (exactly v when amax = 0, as in padding), or NaN; either stays in the bins
      bool near = !in_range && amax != 0.0f;
      uint32_t word = 0;
      if (B == 4) {
        uint32_t w[8];
        load_bins(x.v, y * 0x1p-15f, s.bins, w);
#pragma unroll
        for (int e = 0; e < 8; ++e) w[e] = encode4_fast(x.v[e], y, w[e], near);
        word = pack_bases(w);
      } else {
#pragma unroll
        for (int e = 0; e < 8; ++e) word |= encode12_fast<B>(x.v[e], y, s.n1, s.n2, s.n3, near) << (e * B);
      }
      if (__any_sync(kFull, near)) {
        const uint32_t exact = encode_exact<B>(x, amax, s);
        if (near) word = exact;
      }
      if (q * 256 < left) {
        if ((lane & (group - 1)) == 0) am[q << (5 - group_shift)] = amax;
        uint8_t* p = out + q * 32 * B;
        if (AL) {
          if (B == 4) *reinterpret_cast<uint32_t*>(p) = word;
          else if (B == 2) *reinterpret_cast<uint16_t*>(p) = (uint16_t)word;
          else *p = (uint8_t)word;
        } else {
#pragma unroll
          for (int i = 0; i < B; ++i) p[i] = (uint8_t)(word >> (8 * i));
        }
      }
    }
  }
}

// Warps take contiguous runs of (row, segment) tasks, so a warp sets a row up (thresholds, and the bins for 4 bits)
// about once per row rather than once per task: runs of `run` tasks (warp w: tasks w run .. w run + run - 1), or
// with run = 0 an even split of the tasks over the grid's warps (quantize_grid picks).
template <typename T, int GS, int LB>
__global__ void __launch_bounds__(256, kQBlocksPerSm<LB>)
    quantize_fast(const T* __restrict__ W, int64_t rows, int64_t cols, int64_t blocksize, int64_t pc, int64_t segs,
                  int64_t run, const uint8_t* __restrict__ bits, const uint16_t* __restrict__ thresholds,
                  const int64_t* __restrict__ row_offsets, uint8_t* packed, int64_t packed_bytes,
                  float* __restrict__ absmax) {
  __shared__ float table[8][kCodebookSlots];  // each warp's current thresholds in Eytzinger order (slot 0 unused)
  __shared__ QBins bins[8];
  const int lane = threadIdx.x & 31, wib = threadIdx.x >> 5;
  QRow s;
  s.tab = (uint32_t)__cvta_generic_to_shared(table[wib]);
  s.tab_sum = (s.tab / 2 + 16) * 0x11111111u;
  s.bins = (uint32_t)__cvta_generic_to_shared(bins[wib].e);
  s.n1 = s.n2 = s.n3 = s.node = 0.0f;
  const int64_t nb = pc / blocksize;
  const int group_shift = 28 - __clz((int)blocksize);  // log2(blocksize / 8)
  const int64_t tasks = rows * segs, warps = (int64_t)gridDim.x * (blockDim.x >> 5);
  const int64_t w = (int64_t)blockIdx.x * (blockDim.x >> 5) + wib, per = tasks / warps, extra = tasks % warps;
  const int64_t first = run ? w * run : w * per + min(w, extra);
  // 32-bit loop counters (a warp's task count needs a weight of over 2^44 elements to overflow): the registers they
  // save keep pack_bases from spilling loop state at every task, which cost the 1.75-bit mix 3-4% (fourteenth round).
  int n = (int)(run ? max(min(run, tasks - first), (int64_t)0) : per + (w < extra ? 1 : 0));
  int seg = (int)(first % segs);
  int64_t r = first / segs, cur = -1;
  for (; n > 0; --n, seg = seg + 1 == segs ? (++r, 0) : seg + 1) {
    const int b = bits[r];
    const int64_t start = row_offsets[r];
    if (!row_ok(b, start, pc, packed_bytes)) {  // warp-uniform
      if (lane == 0 && seg == 0) count_skipped_row();
      continue;
    }
    const int64_t j_seg = seg * kQSegElems<T, LB>;
    QIn<T> in[kQChunks<T, LB>];
#pragma unroll
    for (int q = 0; q < kQChunks<T, LB>; ++q) {  // all loads first (before the metadata, or L2 prefetch: not faster)
      const int64_t j0 = j_seg + q * 256 + 8 * lane;
      if (j0 < cols) in[q].load(W + r * cols + j0);
      else in[q].zero();
    }
    if (r != cur) {  // lane i (1 <= i < 2^b) holds node i: sorted index (2k + 1) 2^(b - 1 - L) - 1, i = 2^L + k
      cur = r;
      s.node = 0.0f;
      if (lane >= 1 && lane < (1 << b)) {
        const int L = 31 - __clz(lane);
        const int idx = ((2 * (lane - (1 << L)) + 1) << (b - 1 - L)) - 1;
        s.node = half_bits_to_float(__ldg(thresholds + r * kThresholdSlots + idx));
      }
      __syncwarp();  // the previous row's lookups are done
      if (lane < kCodebookSlots) table[wib][lane] = s.node;
      if (b == 4) {
        const float t = lane < kThresholdSlots ? half_bits_to_float(__ldg(thresholds + r * kThresholdSlots + lane))
                                               : __int_as_float(0x7f800000);
        build_bins(bins[wib], t, lane);
      }
      __syncwarp();
      s.n1 = __shfl_sync(kFull, s.node, 1), s.n2 = __shfl_sync(kFull, s.node, 2), s.n3 = __shfl_sync(kFull, s.node, 3);
    }
    uint8_t* row = packed + start;
    const bool al = ((uintptr_t)row & (b - 1)) == 0;
    const int64_t j = j_seg + 8 * lane;  // the lane's first element
    uint8_t* out = row + (j >> 3) * b;
    float* am = absmax + r * nb + (j >> (group_shift + 3));
    const int64_t left = pc - j;
    // aligned rows (all of them in the usual layouts) get bodies without the byte-store fallback: 7 predicated
    // instructions per chunk that issue even when their predicate is off
    if (b == 1) quantize_task<T, LB, 1, GS, true>(in, lane, group_shift, s, out, am, left);
    else if (b == 2 && al) quantize_task<T, LB, 2, GS, true>(in, lane, group_shift, s, out, am, left);
    else if (b == 2) quantize_task<T, LB, 2, GS, false>(in, lane, group_shift, s, out, am, left);
    else if (al) quantize_task<T, LB, 4, GS, true>(in, lane, group_shift, s, out, am, left);
    else quantize_task<T, LB, 4, GS, false>(in, lane, group_shift, s, out, am, left);
  }
}

// Enough CTAs to fill every multiprocessor once at the kernel's occupancy; warps then loop over their tasks.
template <typename K>
int resident_grid(K kernel, int64_t tasks, int warps_per_block) {
  int per_sm = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, warps_per_block * 32, 0) != cudaSuccess ||
      per_sm < 1) {
    cudaGetLastError();  // a failed query must not leak into the launch check
    per_sm = 1;
  }
  const int64_t want = (tasks + warps_per_block - 1) / warps_per_block;
  const int64_t cap = (int64_t)sm_count() * per_sm;
  return (int)(want < cap ? (want > 0 ? want : 1) : cap);
}

}  // namespace

int record_cuda(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return LOWRA_OK;
  snprintf(g_last_error, sizeof(g_last_error), "%s: %s", what, cudaGetErrorString(e));
  return LOWRA_ERR_CUDA;
}

int launch_status(const char* what) { return record_cuda(cudaGetLastError(), what); }

namespace {
// Attribute `attr` of the current device, read once per device into `cache` (device attributes do not change while
// the process runs); `fallback` where there is no current device or the attribute cannot be read.
int device_attribute(cudaDeviceAttr attr, int (&cache)[64], int fallback) {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return fallback;
  if (!cache[dev]) {
    int v = 0;
    cudaDeviceGetAttribute(&v, attr, dev);
    cache[dev] = v > 0 ? v : fallback;
  }
  return cache[dev];
}
}  // namespace

int sm_count() {
  static int cache[64] = {0};
  return device_attribute(cudaDevAttrMultiProcessorCount, cache, 132);
}

bool has_pdl() {
  static int cache[64] = {0};
  return device_attribute(cudaDevAttrComputeCapabilityMajor, cache, 0) >= 9;
}

const char* last_cuda_error() { return g_last_error; }

int64_t take_skipped_rows() {
  if (record_cuda(cudaDeviceSynchronize(), "synchronize") != LOWRA_OK) return -1;
  const int64_t a = take_local_skipped_rows(), b = take_matmul_skipped_rows(), c = take_gemv_skipped_rows();
  return a < 0 || b < 0 || c < 0 ? -1 : a + b + c;
}

namespace {
int g_quantize_task_bytes = 0;  // 0: automatic; 64 or 128 forced (quantize_cuda_set_tuning)
int g_quantize_run = 0;         // 0: automatic; -1: the resident grid's even split; n > 0: runs of n tasks

// Grid and run length of quantize_fast (run 0: an even split over a resident grid). A layer of one precision keeps
// the even split: its tasks cost alike. A mix's do not (a 4-bit row's task costs several 1-bit ones), so equal runs
// leave SMs idle at the end; short runs on a grid of several waves let the block scheduler hand CTAs to SMs as they
// free up. Runs of about an eighth of an even share, 2 to 8 tasks (powers of two; at least two waves). H200, bf16,
// 1.75-bit mix, eighteenth round, time against the even split's (A B B A) with runs of 2 / 4 / 8 tasks: 11008x4096
// 0.97 / 0.98 / 0.99, 4096x11008 0.96 / 0.97 / 1.02, 28672x8192 0.96 / 0.94 / 0.93, 8192x28672 0.90 / 0.86 / 0.86,
// 4096x4096 0.94 (2 tasks: two waves). For one precision, whole rows per warp (one row setup each) measured level on
// 4096x4096 and 2% slower on 4096x11008; runs of 1 or 2 tasks 5-31% slower (a row setup per run).
template <typename K>
void quantize_grid(K kernel, int64_t rows, int64_t segs, bool uniform, int* grid, int64_t* run) {
  const int64_t tasks = rows * segs;
  *grid = resident_grid(kernel, tasks, 8);
  const int64_t warps = (int64_t)*grid * 8;  // resident (fewer where the tasks are fewer)
  int64_t r = g_quantize_run;
  if (r == 0 && !uniform) {
    const int64_t eighth = (tasks + 8 * warps - 1) / (8 * warps);
    r = eighth <= 2 ? 2 : eighth <= 4 ? 4 : 8;
    r = std::min(r, (tasks + 2 * warps - 1) / (2 * warps));
  }
  *run = r > 0 ? r : 0;
  if (r > 0) *grid = (int)std::min<int64_t>((tasks + 8 * r - 1) / (8 * r), 0x7fffffff);
}
}  // namespace

void quantize_cuda_set_tuning(int task_bytes, int run) {
  g_quantize_task_bytes = task_bytes == 64 || task_bytes == 128 ? task_bytes : 0;
  g_quantize_run = run >= -1 ? run : 0;
}

int quantize_cuda(const void* W, int dtype, int64_t rows, int64_t cols, int64_t blocksize, const uint8_t* bits,
                  const uint16_t* thresholds, const int64_t* row_offsets, uint8_t* packed, int64_t packed_bytes,
                  float* absmax, void* stream_) {
  cudaStream_t stream = (cudaStream_t)stream_;
  const int64_t pc = padded_cols(cols, blocksize);
  const bool pow2 = (blocksize & (blocksize - 1)) == 0;
  if (pow2 && blocksize <= 256 && cols % 8 == 0 && aligned(W, 16)) {
    // One precision for every row, as far as the buffer size tells (the byte count of all rows at 4, 2 or 1 bits, or
    // a larger buffer): 128 bytes per lane, else 64 (see kQChunks). A mix taken for uniform keeps the wide layout.
    const int64_t bytes4 = rows * (pc / 2);
    const bool uniform = packed_bytes >= bytes4 || packed_bytes * 2 == bytes4 || packed_bytes * 4 == bytes4;
    // A uniform layer with fewer than 8 wide tasks per resident warp takes 64-byte tasks too: shorter tasks at the
    // end of the launch, and 32 warps per SM (kQBlocksPerSm). All rows 4-bit, H200, seventeenth round: 4096x4096
    // 8-9% less time, 4096x11008 5-6% less, 11008x4096 1% more; the large layers (37 tasks per warp) lost 3%.
    const int64_t seg128 = dtype == LOWRA_F32 ? kQSegElems<float, 128> : kQSegElems<__half, 128>;
    const bool many = rows * ((pc + seg128 - 1) / seg128) >= 8 * (int64_t)sm_count() * kQBlocksPerSm<128> * 8;
    const bool wide = g_quantize_task_bytes ? g_quantize_task_bytes == 128 : uniform && many;
#define LOWRA_QF3(T, GS, LB)                                                                                         \
  do {                                                                                                               \
    const int64_t segs = (pc + kQSegElems<T, LB> - 1) / kQSegElems<T, LB>;                                           \
    int grid;                                                                                                        \
    int64_t run;                                                                                                     \
    quantize_grid(quantize_fast<T, GS, LB>, rows, segs, uniform, &grid, &run);                                       \
    quantize_fast<T, GS, LB><<<grid, 256, 0, stream>>>((const T*)W, rows, cols, blocksize, pc, segs, run, bits,      \
                                                       thresholds, row_offsets, packed, packed_bytes, absmax);       \
  } while (0)
#define LOWRA_QF2(T, GS)                                                                                             \
  do {                                                                                                               \
    if (wide) LOWRA_QF3(T, GS, 128);                                                                                 \
    else LOWRA_QF3(T, GS, 64);                                                                                       \
  } while (0)
#define LOWRA_QF(T)                                                                                                  \
  do {                                                                                                               \
    if (blocksize == 64) LOWRA_QF2(T, 3);                                                                            \
    else LOWRA_QF2(T, -1);                                                                                           \
  } while (0)
    if (dtype == LOWRA_F16) LOWRA_QF(__half);
    else if (dtype == LOWRA_BF16) LOWRA_QF(__nv_bfloat16);
    else LOWRA_QF(float);
#undef LOWRA_QF
#undef LOWRA_QF2
#undef LOWRA_QF3
  } else {
    quantize_generic<<<(unsigned)rows, 256, 0, stream>>>(W, dtype, cols, blocksize, pc, bits, thresholds, row_offsets,
                                                         packed, packed_bytes, absmax);
  }
  return launch_status("lowra quantize kernel");
}

namespace {
__global__ void decode_absmax_kernel(const AbsmaxSrc src, int64_t n, float* __restrict__ out) {
  const int64_t stride = (int64_t)gridDim.x * blockDim.x * 4;
  for (int64_t i = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) * 4; i < n; i += stride) {
    AbsmaxRaw r[4];  // four independent load chains in flight per thread
#pragma unroll
    for (int k = 0; k < 4; ++k) r[k] = i + k < n ? absmax_issue(src, i + k) : AbsmaxRaw{0.0f, 0u};
#pragma unroll
    for (int k = 0; k < 4; ++k)
      if (i + k < n) out[i + k] = absmax_finish(src, r[k]);
  }
}
}  // namespace

namespace {
// Double-quantized scales, 4 per thread and item: a warp's 4-byte code loads read 128 contiguous bytes and its
// 16-byte stores write 512, both whole lines; each thread issues its items' loads (kDecodeItems) before any store.
// The nested scale once per item where its block holds all 4 (ONE_NEST: nested blocksize >= 4); the code table in
// shared memory; the arithmetic is nested_finish's (bit-identical). The last n % 4 scales go in the first thread.
// H200, 28672x8192 (3.67 M scales), ncu: 6.7 us, against 18.9 for one 4-byte store per scale (decode_absmax_kernel)
// and 12.6 for 16 scales per thread, whose 16-byte stores wrote each line in quarters (thirty-fourth round).
constexpr int kDecodeItems = 4;
template <bool ONE_NEST>
__global__ void decode_absmax_vec4(const AbsmaxSrc src, int64_t n, float* __restrict__ out) {
  // the tiled matmul's staging pass (which does not read the scales) may launch now; it waits for this grid at its
  // end, so the first group, which waits for it, reads the scales decoded
  griddep_launch_dependents();
  __shared__ float code[256];
  for (int i = threadIdx.x; i < 256; i += blockDim.x) code[i] = __ldg(src.nested.code + i);
  const float off = __ldg(src.nested.offset);
  __syncthreads();
  const int64_t n4 = n / 4, stride = (int64_t)gridDim.x * blockDim.x;
  const int sh = src.nested_shift;
  const uint32_t* q4 = reinterpret_cast<const uint32_t*>(src.nested.q);
  float4* o4 = reinterpret_cast<float4*>(out);
  auto finish = [&](uint32_t q, float nest) { return fmaxf(__fadd_rn(__fmul_rn(code[q], nest), off), 0.0f); };
  for (int64_t t0 = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; t0 < n4; t0 += kDecodeItems * stride) {
    uint32_t w[kDecodeItems];
    float nest[kDecodeItems][ONE_NEST ? 1 : 4];
#pragma unroll
    for (int k = 0; k < kDecodeItems; ++k) {
      const int64_t t = t0 + k * stride;
      if (t < n4) {
        w[k] = __ldg(q4 + t);
#pragma unroll
        for (int j = 0; j < (ONE_NEST ? 1 : 4); ++j) nest[k][j] = __ldg(src.nested.nested + ((4 * t + j) >> sh));
      }
    }
#pragma unroll
    for (int k = 0; k < kDecodeItems; ++k) {
      const int64_t t = t0 + k * stride;
      if (t < n4) {
        float v[4];
#pragma unroll
        for (int j = 0; j < 4; ++j) v[j] = finish((w[k] >> (8 * j)) & 0xffu, nest[k][ONE_NEST ? 0 : j]);
        o4[t] = make_float4(v[0], v[1], v[2], v[3]);
      }
    }
  }
  if (blockIdx.x == 0 && threadIdx.x == 0)
    for (int64_t i = n4 * 4; i < n; ++i) out[i] = finish(__ldg(src.nested.q + i), __ldg(src.nested.nested + (i >> sh)));
}
}  // namespace

int decode_absmax_cuda(const AbsmaxSrc& absmax, int64_t n, float* out, void* stream) {
  if (!absmax.f32 && aligned(absmax.nested.q, 4) && aligned(out, 16) && n >= 4) {
    // kDecodeItems items of 4 scales per thread, up to 8 CTAs per SM, then a grid-stride loop
    const int64_t want = (n / 4 + 256 * kDecodeItems - 1) / (256 * kDecodeItems), cap = 8 * (int64_t)sm_count();
    const int grid = (int)(want < cap ? want : cap);
    if (absmax.nested_shift >= 2) decode_absmax_vec4<true><<<grid, 256, 0, (cudaStream_t)stream>>>(absmax, n, out);
    else decode_absmax_vec4<false><<<grid, 256, 0, (cudaStream_t)stream>>>(absmax, n, out);
    return launch_status("lowra absmax decode kernel");
  }
  // 4 scales per thread (a grid-stride loop only past 2^32 of them): each decode is a chain of two dependent loads,
  // so many chains in flight, not a loop per thread, hide the latency
  const int64_t want = (n + 1023) / 1024, cap = (int64_t)1 << 22;
  const int grid = (int)(want < cap ? (want > 0 ? want : 1) : cap);
  decode_absmax_kernel<<<grid, 256, 0, (cudaStream_t)stream>>>(absmax, n, out);
  return launch_status("lowra absmax decode kernel");
}

namespace {
int g_dq_run = 0;  // 0: automatic; -1: a resident grid; n > 0: n tasks per warp (dequantize_cuda_set_tuning)
int g_dq_pdl = 0;  // 0: automatic; 1: launched as a programmatic dependent; -1: not

// Grid of the streamed dequantize, and whether it launches as a programmatic dependent of the stream's previous
// kernel. One task per warp on as many CTAs as that takes, not an even split over a resident grid whose warps walk
// ~tasks / warps each: the block scheduler then hands CTAs to SMs as they free up, and SMs that stream faster take
// more. PDL where the grid is more than one resident wave: its CTAs then launch into the SMs that the previous
// kernel's tail frees. H200, bf16, us, even split -> one task per warp -> and PDL (the automatic choice), one process,
// best of two rounds (fortieth round, bench.dequant_launch's launches): 28672x8192 4-bit 167.6 -> 153.8 -> 153.1,
// 1.75-bit mix 153.9 -> 138.3 -> 137.5; 13824x5120 54.5 -> 48.7 -> 47.9; 4096x11008 35.9 -> 32.1 -> 31.5;
// 4096x4096 13.8 -> 13.8 -> 13.0; 2048x2048 (256 CTAs, no PDL) 5.5 -> 5.5. PDL on that single wave measured
// 5.5 -> 6.4 us, and on resident grids level to 1.1x slower; 16-chunk tasks and 2 stages level to 2% slower.
struct StreamLaunch {
  int grid;
  bool pdl;
};
template <typename K>
StreamLaunch stream_launch(K kernel, int64_t tasks) {
  const int64_t wave = resident_grid(kernel, INT64_MAX / 2, 8);  // CTAs resident at once
  const int64_t even = std::max<int64_t>(1, (tasks + 8 * wave - 1) / (8 * wave));  // tasks per warp, resident
  const int64_t run = g_dq_run < 0 ? even : g_dq_run > 0 ? g_dq_run : 1;
  const int grid = (int)std::max<int64_t>(1, std::min<int64_t>((tasks + 8 * run - 1) / (8 * run), INT32_MAX));
  return {grid, g_dq_pdl > 0 || (g_dq_pdl == 0 && grid > wave)};
}

// dequantize_stream's operands, and its launch on stream_launch's grid.
struct StreamArgs {
  const uint8_t* packed;
  int64_t packed_bytes;
  AbsmaxSrc absmax;
  const uint8_t* bits;
  const uint16_t* codebook;
  const int64_t* row_offsets;
  int64_t rows, cols;
  int bs_shift;
  int64_t pc, segs;
  void* out;
};
template <typename T, bool NESTED>
int launch_stream(const StreamArgs& a, cudaStream_t stream) {
  const StreamLaunch l = stream_launch(dequantize_stream<T, NESTED>, a.rows * a.segs);
  if (l.pdl)
    return record_cuda(launch_dependent(dequantize_stream<T, NESTED>, l.grid, 256, 0, stream, a.packed,
                                        a.packed_bytes, a.absmax, a.bits, a.codebook, a.row_offsets, a.rows, a.cols,
                                        a.bs_shift, a.pc, a.segs, (T*)a.out),
                       "lowra dequantize kernel");
  dequantize_stream<T, NESTED><<<l.grid, 256, 0, stream>>>(a.packed, a.packed_bytes, a.absmax, a.bits, a.codebook,
                                                           a.row_offsets, a.rows, a.cols, a.bs_shift, a.pc, a.segs,
                                                           (T*)a.out);
  return LOWRA_OK;
}
}  // namespace

void dequantize_cuda_set_tuning(int run, int pdl) {
  g_dq_run = run >= -1 ? run : 0;
  g_dq_pdl = pdl == 1 || pdl == -1 ? pdl : 0;
}

int dequantize_cuda(const uint8_t* packed, int64_t packed_bytes, const AbsmaxSrc& absmax, const uint8_t* bits,
                    const uint16_t* codebook, const int64_t* row_offsets, int64_t rows, int64_t cols,
                    int64_t blocksize, int dtype, void* out, void* stream_) {
  cudaStream_t stream = (cudaStream_t)stream_;
  const int64_t pc = padded_cols(cols, blocksize);
  const int64_t segs = (cols + kSegElems - 1) / kSegElems;
  const bool vec = cols % 8 == 0 && aligned(out, 16);
  int bs_shift = -1;
  for (int k = 3; k < 13; ++k)
    if (blocksize == (int64_t)1 << k) bs_shift = k;
  // the full-segment path: 32-bit element indices, power-of-two blocks, 16-byte stores
  const bool full_ok = vec && bs_shift >= 3 && cols < ((int64_t)1 << 31) - kSegElems;
  // the streamed kernel where the layout allows (16-byte aligned codebook rows for its 16-byte copies)
  if (dtype != LOWRA_F32 && vec && bs_shift >= 5 && bs_shift <= 11 && cols % 256 == 0 &&
      cols < ((int64_t)1 << 31) - kSegElems && aligned(codebook, 16)) {
    const StreamArgs a{packed, packed_bytes, absmax, bits, codebook, row_offsets, rows, cols, bs_shift, pc, segs, out};
    const int rc = dtype == LOWRA_F16 ? (absmax.f32 ? launch_stream<__half, false>(a, stream)
                                                    : launch_stream<__half, true>(a, stream))
                                      : (absmax.f32 ? launch_stream<__nv_bfloat16, false>(a, stream)
                                                    : launch_stream<__nv_bfloat16, true>(a, stream));
    return rc != LOWRA_OK ? rc : launch_status("lowra dequantize kernel");
  }
  // no more CTAs than are resident: every warp walks several tasks, each one's metadata loaded during the previous
  // one, instead of CTAs of one task each running in waves (the streamed kernel above measured the opposite since:
  // stream_launch; here unmeasured)
  const int grid = dtype == LOWRA_F16 ? resident_grid(dequantize_fast<__half>, rows * segs, 8)
                   : dtype == LOWRA_BF16 ? resident_grid(dequantize_fast<__nv_bfloat16>, rows * segs, 8)
                                         : resident_grid(dequantize_fast<float>, rows * segs, 8);
#define LOWRA_DF(T) dequantize_fast<T><<<grid, 256, 0, stream>>>(packed, packed_bytes, absmax, bits, codebook, \
                                                                 row_offsets, rows, cols, blocksize, bs_shift, pc, segs, \
                                                                 vec, full_ok, (T*)out)
  if (dtype == LOWRA_F16) LOWRA_DF(__half);
  else if (dtype == LOWRA_BF16) LOWRA_DF(__nv_bfloat16);
  else LOWRA_DF(float);
#undef LOWRA_DF
  return launch_status("lowra dequantize kernel");
}

}  // namespace lowra
