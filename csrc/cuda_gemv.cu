// Fused y = A W^T (+ bias) for 1 to 4 activation rows (batch-1 decode): a CUDA-core GEMV over the packed codes,
// never materializing W. cuda_matmul.cu tries this path first and keeps its tensor-core path for more rows.
//
// Work: a CTA (8 warps) takes tasks (K split, group of 8 * WR rows). Its warps split the split's columns: WK warps
// per row group, WR = 8 / WK row groups of 8 rows each. Lane l handles 32 consecutive columns of every
// 1024-column step: one 4-, 8- or 16-byte load of each of its 8 rows' 1-, 2- or 4-bit codes and one absmax
// (blocksize is a multiple of 32, so the 32 columns lie in one block). Rows of any precision mix in a warp; the
// branch on a row's precision is warp-uniform.
// Activations of the split are staged once in shared memory (raw 16-bit, laid out so that a warp's 16-byte reads
// are contiguous), converted to float32 8 columns at a time and reused by the warp's 8 rows. Per row, in float32:
//   1 bit: sum_j x_j cb[b_j] = c0 * sum_j x_j + (c1 - c0) * sum_{b_j = 1} x_j  (predicated adds)
//   2 bit: a 16-entry table of codebook pairs, indexed by one nibble (two codes)
//   4 bit: the 16-entry codebook, indexed by one nibble
// and each lane's share of a block is multiplied once by the block's absmax. Row metadata and tables run two
// tasks ahead (three shared-memory slots): while a CTA computes task k, the codes and absmax of task k + 1 are
// prefetched into L2 (so its loads hit L2 instead of waiting on DRAM) and the metadata of task k + 2 is loaded.
// With several K splits the partial
// sums go to a float32 workspace and a finalize kernel adds them in a fixed order.
//
// Nothing here synchronizes the host; rows whose metadata does not fit are skipped (left unwritten) and counted.
#include <stdio.h>

#include <mutex>

#include "cuda_common.cuh"
#include "kernels.h"

namespace lowra {

namespace {

constexpr int kGvThreads = 256;
constexpr int kGvWarps = kGvThreads / 32;
constexpr int kGvMaxRows = 64;       // rows per task at most (WR = 8 / WK row groups of R <= 8 rows)
constexpr int kGvStep = 1024;        // columns per warp step (32 lanes x 32 columns)
constexpr int kGvXBudget = 48 * 1024; // shared memory for the staged activations (3-4 CTAs per SM)
constexpr int kGvTab = 32;           // floats of decode table per row (2 bit: 16 pairs; 4 bit: 16 values)
constexpr int kGvSlots = 3;          // row metadata of the current task and the two next ones
constexpr unsigned kFull = 0xffffffffu;

struct GvRow {
  int64_t off;  // byte offset of the row's codes in `packed`
  int32_t row;  // output channel
  int32_t bits; // 1, 2 or 4; 0: nothing to compute (past the end, or metadata that does not fit)
  float c0, dl; // 1 bit: codebook entry 0 and entry 1 - entry 0
  int32_t pad[2];
};
static_assert(sizeof(GvRow) == 32, "GvRow is 32 bytes");

struct GvArgs {
  const void* A;
  int m;
  int64_t rows, cols, nb;
  int bs_shift;  // log2(blocksize)
  const uint8_t* packed;
  int64_t packed_bytes;
  const float* absmax;
  const uint8_t* bits;
  const uint16_t* codebook;
  const int64_t* row_offsets;
  const int32_t* row_order;  // NULL: natural order
  int wk;                    // warps per row group along K (1, 2, 4, 8)
  int ks;                    // K splits
  int64_t krange;            // columns per split (a multiple of kGvStep)
  int64_t ngroups;           // row groups of 8 * (8 / wk) rows
  int sm_meta;               // shared-memory offset of the row metadata (after the activations)
  const void* bias;
  void* out;
  float* ws;
};

template <typename T>
struct Cvt;
template <>
struct Cvt<__half> {
  static __device__ __forceinline__ float2 f2(uint32_t u) { return __half22float2(*reinterpret_cast<const __half2*>(&u)); }
  static __device__ __forceinline__ void store(void* p, int64_t i, float v) { ((__half*)p)[i] = __float2half_rn(v); }
  static __device__ __forceinline__ float load(const void* p, int64_t i) { return __half2float(((const __half*)p)[i]); }
};
template <>
struct Cvt<__nv_bfloat16> {
  static __device__ __forceinline__ float2 f2(uint32_t u) {
    return make_float2(__uint_as_float(u << 16), __uint_as_float(u & 0xffff0000u));
  }
  static __device__ __forceinline__ void store(void* p, int64_t i, float v) {
    ((__nv_bfloat16*)p)[i] = __float2bfloat16_rn(v);
  }
  static __device__ __forceinline__ float load(const void* p, int64_t i) {
    return __bfloat162float(((const __nv_bfloat16*)p)[i]);
  }
};

// Streaming loads of the packed codes (read once per call: keep them out of L1).
__device__ __forceinline__ uint32_t ld_cs32(const void* p) {
  uint32_t v;
  asm volatile("ld.global.nc.L1::no_allocate.u32 %0, [%1];" : "=r"(v) : "l"(p));
  return v;
}
__device__ __forceinline__ uint2 ld_cs64(const void* p) {
  uint2 v;
  asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0,%1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
  return v;
}
__device__ __forceinline__ uint4 ld_cs128(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// Row check shared by the main and the finalize kernel: in range, valid bits, inside the buffer, 16-byte aligned.
__device__ __forceinline__ bool gv_row_ok(const GvArgs& a, int64_t r, int* b, int64_t* off) {
  if (r < 0 || r >= a.rows) return false;
  *b = a.bits[r];
  if (!valid_bits(*b)) return false;
  *off = a.row_offsets[r];
  return row_ok(*b, *off, a.cols, a.packed_bytes) && ((uintptr_t)(a.packed + *off) & 15) == 0;
}

// One thread's share of a task's row metadata: row i = tid / 4 of the group, codebook quarter j = tid % 4.
struct Pre {
  int64_t off;
  int32_t row, bits;
  uint2 cb_lo, cb_j;  // codebook entries 0..3 and 4j..4j+3 (float16 bits)
};

__device__ __forceinline__ void load_pre(const GvArgs& a, int64_t task, int nr, Pre& p) {
  p.bits = 0;
  p.row = 0;
  p.off = 0;
  p.cb_lo = p.cb_j = make_uint2(0, 0);
  const int i = threadIdx.x >> 2, j = threadIdx.x & 3;
  const int64_t tasks = (int64_t)a.ks * a.ngroups;
  if (task >= tasks || i >= nr) return;
  const int64_t grp = task % a.ngroups;
  const int64_t pos = grp * nr + i;
  if (pos >= a.rows) return;
  const int64_t r = a.row_order ? (int64_t)a.row_order[pos] : pos;
  int b = 0;
  int64_t off = 0;
  if (!gv_row_ok(a, r, &b, &off)) {
    if (j == 0 && task < a.ngroups) count_skipped_row();  // counted in the first K split only
    return;
  }
  p.bits = b;
  p.row = (int32_t)r;
  p.off = off;
  const uint2* cb = reinterpret_cast<const uint2*>(a.codebook + r * kCodebookSlots);  // 32-byte rows
  p.cb_lo = __ldg(cb);
  p.cb_j = __ldg(cb + j);
}

__device__ __forceinline__ float h2f(uint32_t word, int hi) {
  return half_bits_to_float((uint16_t)(hi ? word >> 16 : word & 0xffffu));
}

__device__ __forceinline__ void store_pre(const Pre& p, int nr, GvRow* meta, float* tab) {
  const int i = threadIdx.x >> 2, j = threadIdx.x & 3;
  if (i >= nr) return;
  const float c[4] = {h2f(p.cb_lo.x, 0), h2f(p.cb_lo.x, 1), h2f(p.cb_lo.y, 0), h2f(p.cb_lo.y, 1)};
  const float cj[4] = {h2f(p.cb_j.x, 0), h2f(p.cb_j.x, 1), h2f(p.cb_j.y, 0), h2f(p.cb_j.y, 1)};
  if (j == 0) {
    GvRow x;
    x.off = p.off;
    x.row = p.row;
    x.bits = p.bits;
    x.c0 = c[0];
    x.dl = c[1] - c[0];
    x.pad[0] = x.pad[1] = 0;
    meta[i] = x;
  }
  float* t = tab + i * kGvTab;
  if (p.bits == 2) {  // nibble n = c_first | c_second << 2 -> (cb[n & 3], cb[n >> 2]); this thread: n = 4j..4j+3
    const float second = c[j];
    reinterpret_cast<float4*>(t)[2 * j] = make_float4(c[0], second, c[1], second);
    reinterpret_cast<float4*>(t)[2 * j + 1] = make_float4(c[2], second, c[3], second);
  } else if (p.bits == 4) {
    reinterpret_cast<float4*>(t)[j] = make_float4(cj[0], cj[1], cj[2], cj[3]);
  }
}

__device__ __forceinline__ void prefetch_l2(const void* p) { asm volatile("prefetch.global.L2 [%0];" ::"l"(p)); }

// L2 prefetch of a task's codes and absmax (bytes [start, start + len) of each row, 128-byte lines, 4 threads per
// row): issued one task ahead, so that the task's own loads find their lines in L2.
__device__ __forceinline__ void prefetch_task(const GvArgs& a, int64_t task, int nr, const GvRow* meta) {
  const int i = threadIdx.x >> 2, j = threadIdx.x & 3;
  if (task >= (int64_t)a.ks * a.ngroups || i >= nr) return;
  const GvRow x = meta[i];
  if (!x.bits) return;
  const int64_t k0 = task / a.ngroups * a.krange, klen = min(a.cols - k0, a.krange);
  const uint8_t* code = a.packed + x.off + (k0 * x.bits >> 3);
  const int64_t clen = klen * x.bits >> 3;
  for (int64_t o = 128 * j; o < clen; o += 512) prefetch_l2(code + o);
  const int64_t b0 = k0 >> a.bs_shift, b1 = ((k0 + klen - 1) >> a.bs_shift) + 1;  // blocks of the split
  const uint8_t* am = reinterpret_cast<const uint8_t*>(a.absmax + x.row * a.nb + b0);
  const int64_t alen = (b1 - b0) * 4;
  for (int64_t o = 128 * j; o < alen; o += 512) prefetch_l2(am + o);
  if (j == 0) prefetch_l2(am + alen - 1);  // the last line when the row does not start on a line
}

// Activations of K split s, raw 16-bit: chunk (step, activation row n, quad qd of 8 columns, lane) at uint4 index
// ((step * M + n) * 4 + qd) * 32 + lane, so a warp reading one (step, n, qd) touches 512 contiguous bytes.
template <typename T, int M>
__device__ __forceinline__ void stage_x(const GvArgs& a, int64_t s, uint4* xs) {
  const int64_t k0 = s * a.krange;
  const int klen = (int)min(a.cols - k0, a.krange);
  const int c8n = klen >> 3;
  const uint4* src = reinterpret_cast<const uint4*>((const T*)a.A + k0);
  const int64_t stride = a.cols >> 3;
  for (int i = threadIdx.x; i < M * c8n; i += kGvThreads) {
    const int n = i / c8n, c8 = i - n * c8n;
    const uint4 v = __ldg(src + n * stride + c8);
    xs[(((c8 >> 7) * M + n) * 4 + (c8 & 3)) * 32 + ((c8 >> 2) & 31)] = v;
  }
}

// R rows per warp: 8 rows reuse each converted activation twice as often as 4, 4 rows leave registers for
// 3 CTAs (24 warps) per SM.
template <typename T, int M, int R>
__global__ void __launch_bounds__(kGvThreads, R == 4 && M <= 2 ? 3 : 2) gemv_kernel(const __grid_constant__ GvArgs a) {
  constexpr int kGvR = R;
  extern __shared__ __align__(16) unsigned char smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int WK = a.wk, nr = R * (kGvWarps / WK);
  const int wk = warp % WK, wr = warp / WK;
  uint4* xs = reinterpret_cast<uint4*>(smem);
  GvRow* meta = reinterpret_cast<GvRow*>(smem + a.sm_meta);         // [2][kGvMaxRows]
  float* tab = reinterpret_cast<float*>(meta + kGvSlots * kGvMaxRows);  // [kGvSlots][kGvMaxRows][kGvTab]
  float* red = tab + kGvSlots * kGvMaxRows * kGvTab;                     // [kGvWarps][R * M]

  const int64_t tasks = (int64_t)a.ks * a.ngroups;
  int64_t task = blockIdx.x;
  if (task >= tasks) return;
  Pre pre;
  load_pre(a, task, nr, pre);
  store_pre(pre, nr, meta, tab);
  load_pre(a, task + gridDim.x, nr, pre);
  store_pre(pre, nr, meta + kGvMaxRows, tab + kGvMaxRows * kGvTab);
  load_pre(a, task + 2 * (int64_t)gridDim.x, nr, pre);  // stored at the end of the first task
  int64_t staged = -1;
  for (int buf = 0; task < tasks; task += gridDim.x, buf = buf == kGvSlots - 1 ? 0 : buf + 1) {
    const int64_t s = task / a.ngroups;
    __syncthreads();  // meta[buf] and meta[buf + 1] are written; the previous task is done with xs and red
    const int nbuf = buf == kGvSlots - 1 ? 0 : buf + 1, wbuf = nbuf == kGvSlots - 1 ? 0 : nbuf + 1;
    prefetch_task(a, task + gridDim.x, nr, meta + nbuf * kGvMaxRows);
    if (s != staged) {
      stage_x<T, M>(a, s, xs);
      staged = s;
      __syncthreads();
    }

    const GvRow* mr = meta + buf * kGvMaxRows + wr * kGvR;
    const float* tb = tab + (buf * kGvMaxRows + wr * kGvR) * kGvTab;
    const int64_t k0 = s * a.krange;
    const int klen = (int)min(a.cols - k0, a.krange);
    const int nsteps = (klen + kGvStep - 1) / kGvStep;
    float acc[kGvR][M];
#pragma unroll
    for (int j = 0; j < kGvR; ++j)
#pragma unroll
      for (int n = 0; n < M; ++n) acc[j][n] = 0.f;
    int rb[kGvR];
#pragma unroll
    for (int j = 0; j < kGvR; ++j) rb[j] = mr[j].bits;

    for (int st = wk; st < nsteps; st += WK) {
      const int c = st * kGvStep + 32 * lane;  // column inside the split
      const bool on = c < klen;
      const int64_t col = k0 + c;
      const int64_t blk = col >> a.bs_shift;
      uint4 q[kGvR];
      float am[kGvR];
#pragma unroll
      for (int j = 0; j < kGvR; ++j) {  // all loads of the step first
        const int b = rb[j];
        q[j] = make_uint4(0, 0, 0, 0);
        am[j] = 0.f;
        if (b && on) {
          const GvRow x = mr[j];
          const uint8_t* p = a.packed + x.off + ((col * b) >> 3);
          if (b == 1) {
            q[j].x = ld_cs32(p);
          } else if (b == 2) {
            const uint2 v = ld_cs64(p);
            q[j].x = v.x, q[j].y = v.y;
          } else {
            q[j] = ld_cs128(p);
          }
          am[j] = __ldg(a.absmax + (int64_t)x.row * a.nb + blk);
        }
      }
      if (!on) continue;
#pragma unroll 1
      for (int qd = 0; qd < 4; ++qd) {
        float x[M][8], sx[M];
#pragma unroll
        for (int n = 0; n < M; ++n) {
          const uint4 u = xs[((st * M + n) * 4 + qd) * 32 + lane];
          const uint32_t w4[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float2 f = Cvt<T>::f2(w4[e]);
            x[n][2 * e] = f.x, x[n][2 * e + 1] = f.y;
          }
          sx[n] = ((x[n][0] + x[n][1]) + (x[n][2] + x[n][3])) + ((x[n][4] + x[n][5]) + (x[n][6] + x[n][7]));
        }
#pragma unroll
        for (int j = 0; j < kGvR; ++j) {
          const int b = rb[j];
          if (b == 1) {
            const uint32_t byte = q[j].x >> (8 * qd);
            const float s0 = am[j] * mr[j].c0, s1 = am[j] * mr[j].dl;
#pragma unroll
            for (int n = 0; n < M; ++n) {
              float ms = 0.f;
#pragma unroll
              for (int e = 0; e < 8; ++e)
                if (byte & (1u << e)) ms += x[n][e];
              acc[j][n] = fmaf(s0, sx[n], fmaf(s1, ms, acc[j][n]));
            }
          } else if (b == 2) {
            const uint32_t w = ((qd & 2) ? q[j].y : q[j].x) >> (16 * (qd & 1));
            const float2* t2 = reinterpret_cast<const float2*>(tb + j * kGvTab);
            float p[M];
#pragma unroll
            for (int n = 0; n < M; ++n) p[n] = 0.f;
#pragma unroll
            for (int k = 0; k < 4; ++k) {
              const float2 t = t2[(w >> (4 * k)) & 15u];
#pragma unroll
              for (int n = 0; n < M; ++n) p[n] = fmaf(t.x, x[n][2 * k], fmaf(t.y, x[n][2 * k + 1], p[n]));
            }
#pragma unroll
            for (int n = 0; n < M; ++n) acc[j][n] = fmaf(am[j], p[n], acc[j][n]);
          } else if (b == 4) {
            const uint32_t w = qd == 0 ? q[j].x : qd == 1 ? q[j].y : qd == 2 ? q[j].z : q[j].w;
            const float* t4 = tb + j * kGvTab;
            float p[M];
#pragma unroll
            for (int n = 0; n < M; ++n) p[n] = 0.f;
#pragma unroll
            for (int e = 0; e < 8; ++e) {
              const float v = t4[(w >> (4 * e)) & 15u];
#pragma unroll
              for (int n = 0; n < M; ++n) p[n] = fmaf(v, x[n][e], p[n]);
            }
#pragma unroll
            for (int n = 0; n < M; ++n) acc[j][n] = fmaf(am[j], p[n], acc[j][n]);
          }
        }
      }
    }
    // task + 2 * grid into the slot read by the previous task; then the metadata of task + 3 * grid
    store_pre(pre, nr, meta + wbuf * kGvMaxRows, tab + wbuf * kGvMaxRows * kGvTab);
    load_pre(a, task + 3 * (int64_t)gridDim.x, nr, pre);

    // lane sums -> per-warp sums -> the WK warps of a row group
#pragma unroll
    for (int j = 0; j < kGvR; ++j)
#pragma unroll
      for (int n = 0; n < M; ++n) {
        float v = acc[j][n];
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
        acc[j][n] = v;
      }
    if (lane == 0)
#pragma unroll
      for (int j = 0; j < kGvR; ++j)
#pragma unroll
        for (int n = 0; n < M; ++n) red[warp * (kGvR * M) + j * M + n] = acc[j][n];
    __syncthreads();
    if (threadIdx.x < nr * M) {
      const int i = threadIdx.x / M, n = threadIdx.x % M;
      const GvRow& x = meta[buf * kGvMaxRows + i];
      if (x.bits) {
        const int g = i / kGvR, j = i % kGvR;
        float sum = 0.f;
        for (int k = 0; k < WK; ++k) sum += red[(g * WK + k) * (kGvR * M) + j * M + n];
        if (a.ks == 1) {
          if (a.bias) sum += Cvt<T>::load(a.bias, x.row);
          Cvt<T>::store(a.out, (int64_t)n * a.rows + x.row, sum);
        } else {
          a.ws[(s * a.m + n) * a.rows + x.row] = sum;
        }
      }
    }
  }
}

// Several K splits: adds the partial sums in split order, adds the bias, converts (rows skipped above stay so).
template <typename T>
__global__ void gemv_finalize(const __grid_constant__ GvArgs a) {
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < a.m * a.rows;
       i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t n = i / a.rows, pos = i % a.rows;
    const int64_t r = a.row_order ? (int64_t)a.row_order[pos] : pos;
    int b = 0;
    int64_t off = 0;
    if (!gv_row_ok(a, r, &b, &off)) continue;
    float sum = 0.f;
    for (int k = 0; k < a.ks; ++k) sum += a.ws[(k * a.m + n) * a.rows + r];
    if (a.bias) sum += Cvt<T>::load(a.bias, r);
    Cvt<T>::store(a.out, n * a.rows + r, sum);
  }
}

int g_gemv_max_rows = 4;
int g_gemv_r = 0, g_gemv_wk = 0;  // benchmark knobs: rows per warp (4 or 8), warps along K (0: automatic)

using GvFn = void (*)(const GvArgs);

template <typename T, int R>
GvFn pick(int m) {
  return m == 1 ? gemv_kernel<T, 1, R> : m == 2 ? gemv_kernel<T, 2, R> : m == 3 ? gemv_kernel<T, 3, R> : gemv_kernel<T, 4, R>;
}
template <typename T>
GvFn pick(int m, int r) {
  return r == 4 ? pick<T, 4>(m) : pick<T, 8>(m);
}

// Resident CTAs per SM at a shared-memory size (cached per kernel, size and device).
int gemv_occupancy(GvFn fn, size_t smem) {
  struct Entry {
    GvFn fn;
    size_t smem;
    int dev, occ;
  };
  static Entry cache[64];
  static int n = 0;
  static std::mutex mu;
  std::lock_guard<std::mutex> lock(mu);
  int dev = 0;
  cudaGetDevice(&dev);
  for (int i = 0; i < n; ++i)
    if (cache[i].fn == fn && cache[i].smem == smem && cache[i].dev == dev) return cache[i].occ;
  int occ = 0;
  if (cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem) != cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, fn, kGvThreads, smem) != cudaSuccess) {
    cudaGetLastError();  // a failed query must not leak into the next launch check
    occ = 0;
  }
  if (n < 64) cache[n++] = Entry{fn, smem, dev, occ};
  return occ;
}

struct GvPlan {
  GvArgs a{};
  size_t smem = 0;
  int r = 8;  // rows per warp
};

bool gemv_plan(int dtype, int64_t m, int64_t rows, int64_t cols, int64_t blocksize, const void* A,
               const uint8_t* packed, const uint16_t* codebook, GvPlan* plan) {
  if (dtype != LOWRA_F16 && dtype != LOWRA_BF16) return false;
  if (m < 1 || m > 4 || m > g_gemv_max_rows) return false;
  if (cols % 128 != 0 || blocksize < 32 || (blocksize & (blocksize - 1)) != 0 || cols % blocksize != 0) return false;
  if (!aligned(A, 16) || !aligned(packed, 16) || !aligned(codebook, 8) || cols > ((int64_t)1 << 30)) return false;
  GvArgs& a = plan->a;
  const int64_t steps = (cols + kGvStep - 1) / kGvStep;
  const int64_t steps_max = kGvXBudget / (m * 32 * 4 * 16);  // staged bytes per step: m * 4 quads * 32 lanes * 16
  int64_t ks = (steps + steps_max - 1) / steps_max;
  const int64_t spl = (steps + ks - 1) / ks;
  a.krange = spl * kGvStep;
  ks = (cols + a.krange - 1) / a.krange;
  a.ks = (int)ks;
  a.wk = spl >= 8 ? 8 : spl >= 4 ? 4 : spl >= 2 ? 2 : 1;
  if (g_gemv_wk == 1 || g_gemv_wk == 2 || g_gemv_wk == 4 || g_gemv_wk == 8) a.wk = g_gemv_wk;
  plan->r = g_gemv_r == 4 || g_gemv_r == 8 ? g_gemv_r : (m <= 2 ? 8 : 4);  // 8 rows spill with 3-4 activations
  const int nr = plan->r * (kGvWarps / a.wk);
  a.ngroups = (rows + nr - 1) / nr;
  a.m = (int)m;
  a.rows = rows;
  a.cols = cols;
  a.nb = cols / blocksize;
  a.bs_shift = 0;
  while (((int64_t)1 << a.bs_shift) < blocksize) ++a.bs_shift;
  a.sm_meta = (int)(spl * m * 32 * 4 * 16);
  plan->smem = (size_t)a.sm_meta + kGvSlots * kGvMaxRows * (sizeof(GvRow) + kGvTab * sizeof(float)) +
               kGvWarps * plan->r * m * sizeof(float);
  return true;
}

}  // namespace

int64_t take_gemv_skipped_rows() { return take_local_skipped_rows(); }

void gemv_set_tuning(int max_rows, int rows_per_warp, int wk) {
  g_gemv_max_rows = max_rows < 0 ? 0 : max_rows == 0 ? 4 : max_rows;
  g_gemv_r = rows_per_warp;
  g_gemv_wk = wk;
}

int64_t gemv_workspace_size(int dtype, int64_t m, int64_t rows, int64_t cols, int64_t blocksize) {
  GvPlan plan;
  const void* p16 = (const void*)(uintptr_t)256;  // alignment does not change the plan's shape
  if (!gemv_plan(dtype, m, rows, cols, blocksize, p16, (const uint8_t*)p16, (const uint16_t*)p16, &plan)) return -1;
  return plan.a.ks > 1 ? (int64_t)plan.a.ks * m * rows * 4 : 0;
}

int gemv_cuda(const void* A, int dtype, int64_t m, const uint8_t* packed, int64_t packed_bytes, const float* absmax,
              const uint8_t* bits, const uint16_t* codebook, const int64_t* row_offsets, int64_t rows, int64_t cols,
              int64_t blocksize, const int32_t* row_order, const void* bias, void* out, void* workspace,
              int64_t workspace_bytes, void* stream_) {
  GvPlan plan;
  if (!gemv_plan(dtype, m, rows, cols, blocksize, A, packed, codebook, &plan)) return -1;
  GvArgs& a = plan.a;
  if (a.ks > 1 && (!workspace || workspace_bytes < (int64_t)a.ks * m * rows * 4 || !aligned(workspace, 4)))
    return LOWRA_ERR_ARGUMENT;
  const GvFn fn = dtype == LOWRA_F16 ? pick<__half>((int)m, plan.r) : pick<__nv_bfloat16>((int)m, plan.r);
  const int occ = gemv_occupancy(fn, plan.smem);
  if (occ < 1) return -1;
  a.A = A;
  a.packed = packed;
  a.packed_bytes = packed_bytes;
  a.absmax = absmax;
  a.bits = bits;
  a.codebook = codebook;
  a.row_offsets = row_offsets;
  a.row_order = row_order;
  a.bias = bias;
  a.out = out;
  a.ws = (float*)workspace;
  const int64_t tasks = (int64_t)a.ks * a.ngroups;
  const int64_t cap = (int64_t)sm_count() * occ;
  const int grid = (int)(tasks < cap ? tasks : cap);
  cudaStream_t stream = (cudaStream_t)stream_;
  fn<<<grid, kGvThreads, plan.smem, stream>>>(a);
  int st = launch_status("lowra matmul kernel (gemv)");
  if (st != LOWRA_OK || a.ks == 1) return st;
  const int64_t n = m * rows;
  const int fgrid = (int)((n + 255) / 256 < 4 * sm_count() ? (n + 255) / 256 : 4 * sm_count());
  if (dtype == LOWRA_F16) gemv_finalize<__half><<<fgrid, 256, 0, stream>>>(a);
  else gemv_finalize<__nv_bfloat16><<<fgrid, 256, 0, stream>>>(a);
  return launch_status("lowra matmul finalize kernel (gemv)");
}

}  // namespace lowra
