// CUDA quantize / dequantize, bit-identical to the CPU kernels and the Python reference.
//
// Fast paths (the common layouts): one warp owns a segment of one row, so the row's precision is uniform across
// the warp; every lane handles chunks of 8 consecutive elements, which never cross a block (blocksize is a
// multiple of 8) and map to whole packed bytes (8 * bits / 8 = bits bytes), so loads and stores are wide.
// Dequantize looks codebook entries up in a per-warp shared table and streams its output; quantize reduces block absmax with shuffles inside the
// lanes of one block and encodes with a branch-free search over the row's sorted thresholds.
// Dequantize has no other path (chunks of 8 fit every layout; unaligned rows fall back to byte loads and scalar
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
  float am[kSegChunks];
#pragma unroll
  for (int q = 0; q < kSegChunks; ++q) {  // all loads first
    const int64_t j0 = seg * kSegElems + q * 256 + 8 * lane;
    w[q] = 0;
    am[q] = 0.0f;
    if (j0 < cols) {
      w[q] = load_chunk_codes<B>(row, j0 >> 3, al);
      am[q] = load_absmax(amsrc, am_row + block_of(j0, bs_shift, blocksize));
    }
  }
#pragma unroll
  for (int q = 0; q < kSegChunks; ++q) {
    const int64_t j0 = seg * kSegElems + q * 256 + 8 * lane;
    if (j0 >= cols) break;
    float v[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) v[e] = lookup<B>(cb, w[q], e * B) * am[q];
    T* o = out + r * cols + j0;
    if (vec_out) {
      Out8<T>::store(o, v);
    } else {
      for (int e = 0; e < 8 && j0 + e < cols; ++e) o[e] = Out8<T>::cvt(v[e]);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(256) dequantize_fast(const uint8_t* __restrict__ packed, int64_t packed_bytes,
                                                       const AbsmaxSrc absmax, const uint8_t* __restrict__ bits,
                                                       const uint16_t* __restrict__ codebook,
                                                       const int64_t* __restrict__ row_offsets, int64_t rows,
                                                       int64_t cols, int64_t blocksize, int bs_shift, int64_t pc,
                                                       int64_t segs, bool vec_out, T* __restrict__ out) {
  __shared__ __align__(64) float table[8][kCodebookSlots];  // each warp's current codebook (no bank conflicts)
  const int lane = threadIdx.x & 31, wib = threadIdx.x >> 5;
  float* cb = table[wib];
  const uint32_t cb_addr = (uint32_t)__cvta_generic_to_shared(cb);
  const int64_t warps = (int64_t)gridDim.x * (blockDim.x >> 5);
  const int64_t nb = pc / blocksize;
  const int64_t first = (int64_t)blockIdx.x * (blockDim.x >> 5) + wib;
  const int64_t dr = warps / segs, dseg = warps % segs;  // the task stride in (rows, segments)
  int64_t r = first / segs, seg = first % segs;
  for (; r < rows; r += dr, seg += dseg) {
    if (seg >= segs) seg -= segs, ++r;
    if (r >= rows) break;
    const int b = bits[r];
    const int64_t start = row_offsets[r];
    if (!row_ok(b, start, pc, packed_bytes)) {  // warp-uniform
      if (lane == 0 && seg == 0) count_skipped_row();
      continue;
    }
    const uint8_t* row = packed + start;
    const bool al = ((uintptr_t)row & (b - 1)) == 0;
    __syncwarp();  // the previous task's lookups are done
    if (lane < kCodebookSlots) cb[lane] = half_bits_to_float(__ldg(codebook + r * kCodebookSlots + lane));
    __syncwarp();
    const int64_t am_row = r * nb;
    const uint32_t bs = (uint32_t)blocksize;
#define LOWRA_DT(B) dequantize_task<T, B>(row, al, absmax, am_row, cb_addr, r, seg, lane, cols, bs_shift, bs, vec_out, out)
    if (b == 1) LOWRA_DT(1);
    else if (b == 2) LOWRA_DT(2);
    else LOWRA_DT(4);
#undef LOWRA_DT
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Fast quantize: blocksize a power of two in [8, 256] (a block is blocksize / 8 consecutive lanes of a warp), cols
// a multiple of 8 and a 16-byte aligned weight.

template <typename T>
__device__ __forceinline__ void load8(const T* p, float x[8]);
template <>
__device__ __forceinline__ void load8<float>(const float* p, float x[8]) {
  const float4 a = __ldg(reinterpret_cast<const float4*>(p)), b = __ldg(reinterpret_cast<const float4*>(p) + 1);
  x[0] = a.x, x[1] = a.y, x[2] = a.z, x[3] = a.w, x[4] = b.x, x[5] = b.y, x[6] = b.z, x[7] = b.w;
}
template <>
__device__ __forceinline__ void load8<__half>(const __half* p, float x[8]) {
  const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
  const __half2* h = reinterpret_cast<const __half2*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __half22float2(h[i]);
    x[2 * i] = f.x, x[2 * i + 1] = f.y;
  }
}
template <>
__device__ __forceinline__ void load8<__nv_bfloat16>(const __nv_bfloat16* p, float x[8]) {
  const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
  const __nv_bfloat162* h = reinterpret_cast<const __nv_bfloat162*>(&u);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = __bfloat1622float2(h[i]);
    x[2 * i] = f.x, x[2 * i + 1] = f.y;
  }
}

// Number of thresholds strictly below v (thresholds sorted): a binary search written as selects.
template <int B>
__device__ __forceinline__ uint32_t encode(float v, const float t[15]) {
  if (B == 1) return v > t[0];
  if (B == 2) {
    const bool h = v > t[1];
    return 2u * h + (v > (h ? t[2] : t[0]));
  }
  const bool b3 = v > t[7];
  const bool b2 = v > (b3 ? t[11] : t[3]);
  const float t1 = b3 ? (b2 ? t[13] : t[9]) : (b2 ? t[5] : t[1]);
  const bool b1 = v > t1;
  float t0;
  if (b3) t0 = b2 ? (b1 ? t[14] : t[12]) : (b1 ? t[10] : t[8]);
  else t0 = b2 ? (b1 ? t[6] : t[4]) : (b1 ? t[2] : t[0]);
  return 8u * b3 + 4u * b2 + 2u * b1 + (v > t0);
}

// Warp task = (row, segment of kQChunks * 256 elements): lane l quantizes the 8-element chunks
// seg * kQChunks * 256 + q * 256 + 8 l, loading all of them before any use.
constexpr int kQChunks = 2;

template <typename T, int B>
__device__ __forceinline__ void quantize_task(const T* __restrict__ W, int64_t r, int64_t seg, int64_t cols,
                                              int64_t blocksize, int64_t nb, int lane, const float t[15],
                                              uint8_t* __restrict__ row, bool al, float* __restrict__ absmax,
                                              int64_t pc) {
  float x[kQChunks][8];
#pragma unroll
  for (int q = 0; q < kQChunks; ++q) {
    const int64_t j0 = seg * (kQChunks * 256) + q * 256 + 8 * lane;
    if (j0 < cols) {
      load8<T>(W + r * cols + j0, x[q]);
    } else {
#pragma unroll
      for (int e = 0; e < 8; ++e) x[q][e] = 0.0f;
    }
  }
  const int group = (int)(blocksize >> 3);  // lanes per block, a power of two <= 32
#pragma unroll
  for (int q = 0; q < kQChunks; ++q) {
    const int64_t j0 = seg * (kQChunks * 256) + q * 256 + 8 * lane;
    float amax = 0.0f;
#pragma unroll
    for (int e = 0; e < 8; ++e) amax = fmaxf(amax, fabsf(x[q][e]));
    for (int o = 1; o < group; o <<= 1) amax = fmaxf(amax, __shfl_xor_sync(kFull, amax, o));
    if (j0 < pc) {
      if ((lane & (group - 1)) == 0) absmax[r * nb + (j0 >> (31 - __clz(group) + 3))] = amax;  // j0 / blocksize
      uint32_t word = 0;
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const float v = amax > 0.0f ? __fdiv_rn(x[q][e], amax) : 0.0f;
        word |= encode<B>(v, t) << (e * B);
      }
      uint8_t* p = row + (j0 >> 3) * B;
      if (al) {
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

template <typename T>
__global__ void __launch_bounds__(256) quantize_fast(const T* __restrict__ W, int64_t rows, int64_t cols,
                                                     int64_t blocksize, int64_t pc, int64_t segs,
                                                     const uint8_t* __restrict__ bits,
                                                     const uint16_t* __restrict__ thresholds,
                                                     const int64_t* __restrict__ row_offsets, uint8_t* packed,
                                                     int64_t packed_bytes, float* __restrict__ absmax) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = (int64_t)gridDim.x * (blockDim.x >> 5);
  const int64_t nb = pc / blocksize;
  for (int64_t task = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); task < rows * segs; task += warps) {
    const int64_t r = task / segs, seg = task % segs;
    const int b = bits[r];
    const int64_t start = row_offsets[r];
    if (!row_ok(b, start, pc, packed_bytes)) {
      if (lane == 0 && seg == 0) count_skipped_row();
      continue;
    }
    const float tl = lane < kThresholdSlots ? half_bits_to_float(__ldg(thresholds + r * kThresholdSlots + lane)) : 0.0f;
    float t[15];
#pragma unroll
    for (int k = 0; k < 15; ++k) t[k] = __shfl_sync(kFull, tl, k);
    uint8_t* row = packed + start;
    const bool al = ((uintptr_t)row & (b - 1)) == 0;
    if (b == 1) quantize_task<T, 1>(W, r, seg, cols, blocksize, nb, lane, t, row, al, absmax, pc);
    else if (b == 2) quantize_task<T, 2>(W, r, seg, cols, blocksize, nb, lane, t, row, al, absmax, pc);
    else quantize_task<T, 4>(W, r, seg, cols, blocksize, nb, lane, t, row, al, absmax, pc);
  }
}

int grid_for(int64_t tasks, int warps_per_block) {
  const int64_t want = (tasks + warps_per_block - 1) / warps_per_block;
  const int64_t cap = (int64_t)sm_count() * 16;  // enough resident blocks to fill the GPU; the rest loop
  return (int)(want < cap ? (want > 0 ? want : 1) : cap);
}

}  // namespace

int record_cuda(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return LOWRA_OK;
  snprintf(g_last_error, sizeof(g_last_error), "%s: %s", what, cudaGetErrorString(e));
  return LOWRA_ERR_CUDA;
}

int launch_status(const char* what) { return record_cuda(cudaGetLastError(), what); }

int sm_count() {
  static int cache[64] = {0};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return 132;
  if (!cache[dev]) {
    int n = 0;
    cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev);
    cache[dev] = n > 0 ? n : 132;
  }
  return cache[dev];
}

const char* last_cuda_error() { return g_last_error; }

int64_t take_skipped_rows() {
  if (record_cuda(cudaDeviceSynchronize(), "synchronize") != LOWRA_OK) return -1;
  const int64_t a = take_local_skipped_rows(), b = take_matmul_skipped_rows(), c = take_gemv_skipped_rows();
  return a < 0 || b < 0 || c < 0 ? -1 : a + b + c;
}

int quantize_cuda(const void* W, int dtype, int64_t rows, int64_t cols, int64_t blocksize, const uint8_t* bits,
                  const uint16_t* thresholds, const int64_t* row_offsets, uint8_t* packed, int64_t packed_bytes,
                  float* absmax, void* stream_) {
  cudaStream_t stream = (cudaStream_t)stream_;
  const int64_t pc = padded_cols(cols, blocksize);
  const bool pow2 = (blocksize & (blocksize - 1)) == 0;
  if (pow2 && blocksize <= 256 && cols % 8 == 0 && aligned(W, 16)) {
    const int64_t segs = (pc + kQChunks * 256 - 1) / (kQChunks * 256);
    const int grid = grid_for(rows * segs, 8);
#define LOWRA_QF(T) quantize_fast<T><<<grid, 256, 0, stream>>>((const T*)W, rows, cols, blocksize, pc, segs, bits, \
                                                               thresholds, row_offsets, packed, packed_bytes, absmax)
    if (dtype == LOWRA_F16) LOWRA_QF(__half);
    else if (dtype == LOWRA_BF16) LOWRA_QF(__nv_bfloat16);
    else LOWRA_QF(float);
#undef LOWRA_QF
  } else {
    quantize_generic<<<(unsigned)rows, 256, 0, stream>>>(W, dtype, cols, blocksize, pc, bits, thresholds, row_offsets,
                                                         packed, packed_bytes, absmax);
  }
  return launch_status("lowra quantize kernel");
}

namespace {
__global__ void decode_absmax_kernel(const AbsmaxSrc src, int64_t n, float* __restrict__ out) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    out[i] = load_absmax(src, i);
}
}  // namespace

int decode_absmax_cuda(const AbsmaxSrc& absmax, int64_t n, float* out, void* stream) {
  const int64_t want = (n + 255) / 256, cap = 4 * (int64_t)sm_count();
  decode_absmax_kernel<<<(int)(want < cap ? (want > 0 ? want : 1) : cap), 256, 0, (cudaStream_t)stream>>>(absmax, n, out);
  return launch_status("lowra absmax decode kernel");
}

int dequantize_cuda(const uint8_t* packed, int64_t packed_bytes, const AbsmaxSrc& absmax, const uint8_t* bits,
                    const uint16_t* codebook, const int64_t* row_offsets, int64_t rows, int64_t cols,
                    int64_t blocksize, int dtype, void* out, void* stream_) {
  cudaStream_t stream = (cudaStream_t)stream_;
  const int64_t pc = padded_cols(cols, blocksize);
  const int64_t segs = (cols + kSegElems - 1) / kSegElems;
  const int grid = grid_for(rows * segs, 8);
  const bool vec = cols % 8 == 0 && aligned(out, 16);
  int bs_shift = -1;
  for (int k = 3; k < 13; ++k)
    if (blocksize == (int64_t)1 << k) bs_shift = k;
#define LOWRA_DF(T) dequantize_fast<T><<<grid, 256, 0, stream>>>(packed, packed_bytes, absmax, bits, codebook, \
                                                                 row_offsets, rows, cols, blocksize, bs_shift, pc, segs, \
                                                                 vec, (T*)out)
  if (dtype == LOWRA_F16) LOWRA_DF(__half);
  else if (dtype == LOWRA_BF16) LOWRA_DF(__nv_bfloat16);
  else LOWRA_DF(float);
#undef LOWRA_DF
  return launch_status("lowra dequantize kernel");
}

}  // namespace lowra
