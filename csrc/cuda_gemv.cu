// Fused y = A W^T (+ bias) for 1 or 2 (up to 4 by a knob) activation rows (batch-1 decode): a CUDA-core GEMV,
// never materializing W. cuda_matmul.cu tries this path first and keeps its tensor-core path for more rows.
// One activation row on a large layer goes to the batch-1 kernel instead (cuda_gemv1.cu; gemv_cuda picks).
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

#include "cuda_gemv.cuh"
#include "kernels.h"

namespace lowra {

namespace {

using namespace gv;

constexpr int kGvThreads = 256;
constexpr int kGvWarps = kGvThreads / 32;
constexpr int kGvMaxRows = 64;       // rows per task at most (WR = 8 / WK row groups of R <= 8 rows)
constexpr int kGvStep = 1024;        // columns per warp step (32 lanes x 32 columns)
constexpr int kGvXBudget = 48 * 1024; // shared memory for the staged activations (3-4 CTAs per SM)
constexpr int kGvTab = 32;           // floats of decode table per row (2 bit: 16 pairs; 4 bit: 16 values)
constexpr int kGvSlots = 3;          // row metadata of the current task and the two next ones
constexpr int kGvMaxSmem = 96 * 1024; // above any plan: activations + 3 slots of metadata and tables + reduction

struct GvRow {
  int64_t off;  // byte offset of the row's codes in `packed`
  int32_t row;  // output channel
  int32_t bits; // 1, 2 or 4; 0: nothing to compute (past the end, or metadata that does not fit)
  float c0, dl; // 1 bit: codebook entry 0 and entry 1 - entry 0
  int32_t pad[2];
};
static_assert(sizeof(GvRow) == 32, "GvRow is 32 bytes");

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
  // the split's scales: 4 bytes per block, or 1 (the codes) when double-quantized
  const int64_t i0 = x.row * a.nb + b0;
  const uint8_t* am = a.am.f32 ? reinterpret_cast<const uint8_t*>(a.am.f32 + i0) : a.am.nested.q + i0;
  const int64_t alen = (b1 - b0) * (a.am.f32 ? 4 : 1);
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
// (w >> s) & m for a compile-time s that may be negative (a left shift)
template <int S>
__device__ __forceinline__ uint32_t shr(uint32_t w) {
  return S >= 0 ? w >> (S >= 0 ? S : 0) : w << (S < 0 ? -S : 0);
}

// Activations of quad qd (8 columns) of this lane's 32, as float32, and their sum (for 1-bit rows).
template <typename T, int M>
__device__ __forceinline__ void load_x(const uint4* xq, int qd, float x[M][8], float sx[M]) {
#pragma unroll
  for (int n = 0; n < M; ++n) {
    const uint4 u = xq[(n * 4 + qd) * 32];
    const uint32_t w4[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const float2 f = Cvt<T>::f2(w4[e]);
      x[n][2 * e] = f.x, x[n][2 * e + 1] = f.y;
    }
    sx[n] = ((x[n][0] + x[n][1]) + (x[n][2] + x[n][3])) + ((x[n][4] + x[n][5]) + (x[n][6] + x[n][7]));
  }
}

// One row, 8 columns. 1 bit: byte = the 8 codes, s0 = absmax * c0, s1 = absmax * (c1 - c0).
template <int M>
__device__ __forceinline__ void row1(uint32_t byte, float s0, float s1, const float x[M][8], const float sx[M],
                                     float acc[M]) {
#pragma unroll
  for (int n = 0; n < M; ++n) {
    float ms = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e)
      if (byte & (1u << e)) ms += x[n][e];
    acc[n] = fmaf(s0, sx[n], fmaf(s1, ms, acc[n]));
  }
}
// 2 bit: w = 16 bits of codes, tab = the row's 16-pair table.
template <int M>
__device__ __forceinline__ void row2(uint32_t w, uint32_t tab, float am, const float x[M][8], float acc[M]) {
  float p[M][2];
#pragma unroll
  for (int n = 0; n < M; ++n) p[n][0] = p[n][1] = 0.f;
  float2 t[4];
  t[0] = lds_f32x2(tab | (shr<-3>(w) & 0x78u));
  t[1] = lds_f32x2(tab | (shr<1>(w) & 0x78u));
  t[2] = lds_f32x2(tab | (shr<5>(w) & 0x78u));
  t[3] = lds_f32x2(tab | (shr<9>(w) & 0x78u));
#pragma unroll
  for (int k = 0; k < 4; ++k)
#pragma unroll
    for (int n = 0; n < M; ++n) {
      p[n][k & 1] = fmaf(t[k].x, x[n][2 * k], p[n][k & 1]);
      p[n][k & 1] = fmaf(t[k].y, x[n][2 * k + 1], p[n][k & 1]);
    }
#pragma unroll
  for (int n = 0; n < M; ++n) acc[n] = fmaf(am, p[n][0] + p[n][1], acc[n]);
}
// 4 bit: w = 32 bits of codes, tab = the row's 16-entry codebook.
template <int M>
__device__ __forceinline__ void row4(uint32_t w, uint32_t tab, float am, const float x[M][8], float acc[M]) {
  float v[8];
  v[0] = lds_f32(tab | (shr<-2>(w) & 0x3cu));
  v[1] = lds_f32(tab | (shr<2>(w) & 0x3cu));
  v[2] = lds_f32(tab | (shr<6>(w) & 0x3cu));
  v[3] = lds_f32(tab | (shr<10>(w) & 0x3cu));
  v[4] = lds_f32(tab | (shr<14>(w) & 0x3cu));
  v[5] = lds_f32(tab | (shr<18>(w) & 0x3cu));
  v[6] = lds_f32(tab | (shr<22>(w) & 0x3cu));
  v[7] = lds_f32(tab | (shr<26>(w) & 0x3cu));
#pragma unroll
  for (int n = 0; n < M; ++n) {
    float p0 = 0.f, p1 = 0.f;
#pragma unroll
    for (int e = 0; e < 8; e += 2) {
      p0 = fmaf(v[e], x[n][e], p0);
      p1 = fmaf(v[e + 1], x[n][e + 1], p1);
    }
    acc[n] = fmaf(am, p0 + p1, acc[n]);
  }
}

// One 1024-column step of a warp's R rows (32 columns per lane, starting at column `col`). P = the rows' common
// precision, or 0 for a mix (then a warp-uniform branch per row). All loads of the step are issued first.
template <typename T, int M, int R, int P, bool NESTED>
__device__ __forceinline__ void gv_step(const GvArgs& a, const GvRow* mr, uint32_t tb, const uint4* xq, int64_t col,
                                        int64_t blk, float (&acc)[R][M]) {
  constexpr int W = P == 0 ? 4 : P;  // code words per row
  uint32_t q[R][W];
  AbsmaxRaw ar[NESTED ? R : 1];
  float am[R];
#pragma unroll
  for (int j = 0; j < R; ++j) {
    const GvRow x = mr[j];
    const int b = P == 0 ? x.bits : P;
#pragma unroll
    for (int i = 0; i < W; ++i) q[j][i] = 0u;
    am[j] = 0.f;
    if constexpr (NESTED) ar[j] = AbsmaxRaw{0.f, 0u};
    if (P != 0 || b) {
      const uint8_t* p = a.packed + x.off + ((col * b) >> 3);
      if (b == 1) {
        q[j][0] = ld_cs32(p);
      } else if (b == 2) {
        const uint2 v = ld_cs64(p);
        q[j][0] = v.x;
        if (W > 1) q[j][W > 1 ? 1 : 0] = v.y;
      } else {
        const uint4 v = ld_cs128(p);
        q[j][0] = v.x;
        if (W > 3) q[j][W > 3 ? 1 : 0] = v.y, q[j][W > 3 ? 2 : 0] = v.z, q[j][W > 3 ? 3 : 0] = v.w;
      }
      const int64_t ai = (int64_t)x.row * a.nb + blk;
      if constexpr (NESTED) ar[j] = nested_issue(a.am, ai);
      else am[j] = __ldg(a.am.f32 + ai);
    }
  }
  if constexpr (NESTED) {  // every row's loads are in flight: now wait for the codes and look the scales up
#pragma unroll
    for (int j = 0; j < R; ++j)
      if (P != 0 || mr[j].bits) am[j] = nested_finish(a.am, ar[j]);
  }
  float s1[P == 1 ? R : 1];
  if constexpr (P == 1) {
#pragma unroll
    for (int j = 0; j < R; ++j) {
      s1[j] = am[j] * mr[j].dl;
      am[j] *= mr[j].c0;
    }
  }
  if constexpr (P == 1) {
#pragma unroll
    for (int qd = 0; qd < 4; ++qd) {
      float x[M][8], sx[M];
      load_x<T, M>(xq, qd, x, sx);
#pragma unroll
      for (int j = 0; j < R; ++j) row1<M>(q[j][0] >> (8 * qd), am[j], s1[j], x, sx, acc[j]);
    }
  } else {
#pragma unroll 1
    for (int qd = 0; qd < 4; ++qd) {
      float x[M][8], sx[M];
      load_x<T, M>(xq, qd, x, sx);
#pragma unroll
      for (int j = 0; j < R; ++j) {
        const int b = P == 0 ? mr[j].bits : P;
        const uint32_t rt = tb + j * kGvTab * 4;
        if (P == 2 || (P == 0 && b == 2)) {
          const uint32_t w = ((qd & 2) ? q[j][W > 1 ? 1 : 0] : q[j][0]) >> (16 * (qd & 1));
          row2<M>(w, rt, am[j], x, acc[j]);
        } else if (P == 4 || (P == 0 && b == 4)) {
          const uint32_t lo = (qd & 2) ? q[j][W > 3 ? 2 : 0] : q[j][0];
          const uint32_t hi = (qd & 2) ? q[j][W > 3 ? 3 : 0] : q[j][W > 1 ? 1 : 0];
          row4<M>((qd & 1) ? hi : lo, rt, am[j], x, acc[j]);
        } else if (P == 0 && b == 1) {
          row1<M>(q[j][0] >> (8 * qd), am[j] * mr[j].c0, am[j] * mr[j].dl, x, sx, acc[j]);
        }
      }
    }
  }
}

// NESTED: the scales are double-quantized (decoded where read); a separate instantiation keeps the float32 path as
// lean as it was (a runtime branch per scale cost it registers and ~10% on 28672x8192).
template <typename T, int M, int R, bool NESTED>
__global__ void __launch_bounds__(kGvThreads, R == 4 && M <= 2 ? 3 : 2) gemv_kernel(const __grid_constant__ GvArgs a) {
  constexpr int kGvR = R;
  griddep_launch_dependents();  // the finalize pass (K splits) may launch now; it waits for this grid to finish
  extern __shared__ __align__(16) unsigned char smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int WK = a.wk, nr = R * (kGvWarps / WK);
  const int wk = warp % WK, wr = warp / WK;
  uint4* xs = reinterpret_cast<uint4*>(smem);
  GvRow* meta = reinterpret_cast<GvRow*>(smem + a.sm_meta);         // [2][kGvMaxRows]
  // [kGvSlots][kGvMaxRows][kGvTab], 128-byte aligned in the shared window (lookups OR into a row's table)
  float* tab = reinterpret_cast<float*>(meta + kGvSlots * kGvMaxRows);
  tab += ((128u - ((uint32_t)__cvta_generic_to_shared(tab) & 127u)) & 127u) / 4;
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

    // Warps whose 8 rows share one precision (the usual case with rows grouped by precision) take a branch-free
    // path for it; mixed warps branch per row.
    int uni = rb[0];
#pragma unroll
    for (int j = 1; j < kGvR; ++j) uni = rb[j] == uni ? uni : 0;
    const uint32_t tb_addr = (uint32_t)__cvta_generic_to_shared(tb);
    for (int st = wk; st < nsteps; st += WK) {
      const int c = st * kGvStep + 32 * lane;  // column inside the split
      if (c >= klen) continue;
      const int64_t col = k0 + c;
      const int64_t blk = col >> a.bs_shift;
      const uint4* xq = xs + st * M * 4 * 32 + lane;
      if (uni == 1) gv_step<T, M, R, 1, NESTED>(a, mr, tb_addr, xq, col, blk, acc);
      else if (uni == 2) gv_step<T, M, R, 2, NESTED>(a, mr, tb_addr, xq, col, blk, acc);
      else if (uni == 4) gv_step<T, M, R, 4, NESTED>(a, mr, tb_addr, xq, col, blk, acc);
      else gv_step<T, M, R, 0, NESTED>(a, mr, tb_addr, xq, col, blk, acc);
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

int g_gemv_max_rows = 0;  // benchmark knob: 0 automatic (gemv_takes), -1 none, 1-4: up to this many rows
int g_gemv_r = 0, g_gemv_wk = 0;  // benchmark knobs: rows per warp (4 or 8), warps along K (0: automatic)

using GvFn = void (*)(const GvArgs);

template <typename T, int R>
GvFn pick(int m, bool nested) {
  if (nested)
    return m == 1 ? gemv_kernel<T, 1, R, true> : m == 2 ? gemv_kernel<T, 2, R, true>
           : m == 3 ? gemv_kernel<T, 3, R, true> : gemv_kernel<T, 4, R, true>;
  return m == 1 ? gemv_kernel<T, 1, R, false> : m == 2 ? gemv_kernel<T, 2, R, false>
         : m == 3 ? gemv_kernel<T, 3, R, false> : gemv_kernel<T, 4, R, false>;
}
template <typename T>
GvFn pick(int m, int r, bool nested) {
  return r == 4 ? pick<T, 4>(m, nested) : pick<T, 8>(m, nested);
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
  // one limit for every plan (lowering it to a smaller plan's size would break a cached larger one)
  if (cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, kGvMaxSmem) != cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, fn, kGvThreads, smem) != cudaSuccess) {
    cudaGetLastError();  // a failed query must not leak into the next launch check
    occ = 0;
  }
  if (n < 64) cache[n++] = Entry{fn, smem, dev, occ};
  return occ;
}

// K splits of this kernel's staged activations (m rows of 16-bit values, at most kGvXBudget bytes per split):
// spl 1024-column steps per split, ks splits.
struct GvSplit {
  int64_t spl, ks;
};
GvSplit gemv_split(int64_t m, int64_t cols) {
  const int64_t steps = (cols + kGvStep - 1) / kGvStep;
  const int64_t steps_max = kGvXBudget / (m * 32 * 4 * 16);  // staged bytes per step: m * 4 quads * 32 lanes * 16
  const int64_t ks = (steps + steps_max - 1) / steps_max;
  const int64_t spl = (steps + ks - 1) / ks;
  return {spl, (cols + spl * kGvStep - 1) / (spl * kGvStep)};
}

// Whether this kernel takes m activation rows; otherwise the tensor-core path runs. 3-4 rows go to the tensor cores
// on large layers (28672x8192, m = 4: 102 us vs 154-180, eighth round; 1.75-bit mix 82 vs 131, thirty-third), but
// on layers of at most 2^24 weights their fixed costs (the staging pass, a launch per precision group, the K-split
// finalize) outweigh them. H200, 4096x4096, m = 3 / 4, tensor cores vs here, us (thirty-third round): 1.75-bit mix
// 19.0 / 19.8 vs 14.2 / 16.0, all 4-bit 18.1 / 18.2 vs 16.2 / 17.3; at 11008x4096 the mix was already 4-19% slower
// here. Two rows on a large layer stay here while their activations fit two K splits: each split re-reads every
// row's metadata and their sums need a finalize pass. H200, m = 2, 1.75-bit mix, here vs tensor cores, us
// (thirty-ninth round, bench.dispatch): 28672x8192 (1 split) 70.4 vs 84.3, 5120x13824 (2) 36.4 vs 42.1,
// 4096x14336 (2) 29.1 vs 32.8, 8192x28672 (3) 94.9 vs 79.0; all rows 4-bit at 3 splits 116.9 vs 124.4.
bool gemv_takes(int64_t m, int64_t rows, int64_t cols) {
  if (g_gemv_max_rows != 0) return g_gemv_max_rows > 0 && m <= g_gemv_max_rows;
  if (rows * cols <= ((int64_t)1 << 24)) return m <= 4;
  return m <= 2 && gemv_split(m, cols).ks <= 2;
}

struct GvPlan {
  GvArgs a{};
  size_t smem = 0;
  int r = 8;  // rows per warp
};

bool gemv_plan(int dtype, int64_t m, int64_t rows, int64_t cols, int64_t blocksize, const void* A,
               const uint8_t* packed, const uint16_t* codebook, GvPlan* plan) {
  if (dtype != LOWRA_F16 && dtype != LOWRA_BF16) return false;
  if (m < 1 || m > 4 || !gemv_takes(m, rows, cols)) return false;
  if (cols % 128 != 0 || blocksize < 32 || (blocksize & (blocksize - 1)) != 0 || cols % blocksize != 0) return false;
  if (!aligned(A, 16) || !aligned(packed, 16) || !aligned(codebook, 8) || cols > ((int64_t)1 << 30)) return false;
  GvArgs& a = plan->a;
  const GvSplit split = gemv_split(m, cols);
  const int64_t spl = split.spl, ks = split.ks;
  a.krange = spl * kGvStep;
  a.ks = (int)ks;
  plan->r = g_gemv_r == 4 || g_gemv_r == 8 ? g_gemv_r : (m <= 2 ? 8 : 4);  // 8 rows spill with 3-4 activations
  // Warps along K: as few as leave each CTA slot (~2 per SM) 6 or more tasks, for balance; fewer K warps mean
  // more steps per warp between the per-task reductions and barriers (on 28672x8192, m = 1: 4 warps 83 us,
  // 8 warps 99 us).
  a.wk = 0;
  for (int wk = 2; wk <= 8 && !a.wk; wk *= 2) {
    const int64_t groups = (rows + plan->r * (kGvWarps / wk) - 1) / (plan->r * (kGvWarps / wk));
    if (spl >= wk && ks * groups >= 12 * (int64_t)sm_count()) a.wk = wk;
  }
  if (!a.wk) a.wk = spl >= 8 ? 8 : spl >= 4 ? 4 : spl >= 2 ? 2 : 1;
  if (g_gemv_wk == 1 || g_gemv_wk == 2 || g_gemv_wk == 4 || g_gemv_wk == 8) a.wk = g_gemv_wk;
  const int nr = plan->r * (kGvWarps / a.wk);
  a.ngroups = (rows + nr - 1) / nr;
  a.m = (int)m;
  a.rows = rows;
  a.cols = cols;
  a.nb = cols / blocksize;
  a.bs_shift = 0;
  while (((int64_t)1 << a.bs_shift) < blocksize) ++a.bs_shift;
  a.sm_meta = (int)(spl * m * 32 * 4 * 16);
  plan->smem = (size_t)a.sm_meta + kGvSlots * kGvMaxRows * (sizeof(GvRow) + kGvTab * sizeof(float)) + 128 +
               kGvWarps * plan->r * m * sizeof(float);
  return true;
}

}  // namespace

int64_t take_gemv_skipped_rows() {
  const int64_t a = take_local_skipped_rows(), b = take_gemv1_skipped_rows();
  return a < 0 || b < 0 ? -1 : a + b;
}

void gemv_set_tuning(int max_rows, int rows_per_warp, int wk, int batch1, int wide) {
  g_gemv_max_rows = max_rows < 0 ? -1 : max_rows;
  g_gemv_r = rows_per_warp;
  g_gemv_wk = wk;
  gemv1_set_tuning(batch1, wide);
}

int64_t gemv_workspace_size(int dtype, int64_t m, int64_t rows, int64_t cols, int64_t blocksize) {
  const void* p16 = (const void*)(uintptr_t)256;  // alignment does not change the plans' shapes
  // the larger of the two kernels' needs: gemv_cuda falls back to the multi-row kernel where the batch-1 kernel
  // does not apply to the actual operands
  GvArgs a1{};
  size_t smem1 = 0;
  const int64_t b1 = gemv1_plan(dtype, m, rows, cols, blocksize, p16, (const uint8_t*)p16, nullptr, &a1, &smem1)
                         ? (a1.ks > 1 ? (int64_t)a1.ks * rows * 4 : 0) : -1;
  GvPlan plan;
  if (!gemv_plan(dtype, m, rows, cols, blocksize, p16, (const uint8_t*)p16, (const uint16_t*)p16, &plan)) return b1;
  const int64_t mr = plan.a.ks > 1 ? (int64_t)plan.a.ks * m * rows * 4 : 0;
  return b1 > mr ? b1 : mr;
}

namespace {

bool workspace_ok(const GvArgs& a, void* workspace, int64_t workspace_bytes) {
  return a.ks == 1 || (workspace && workspace_bytes >= (int64_t)a.ks * a.m * a.rows * 4 && aligned(workspace, 4));
}

// K splits: the partial sums in split order, plus the bias, into the output.
int launch_finalize(const GvArgs& a, int dtype, cudaStream_t stream) {
  const int fgrid = finalize_grid(a.m * a.rows);
  const cudaError_t e = dtype == LOWRA_F16 ? launch_dependent(gemv_finalize<__half>, fgrid, 256, 0, stream, a)
                                           : launch_dependent(gemv_finalize<__nv_bfloat16>, fgrid, 256, 0, stream, a);
  return record_cuda(e, "lowra matmul finalize kernel (gemv)");
}

}  // namespace

int gemv_cuda(const void* A, int dtype, int64_t m, const uint8_t* packed, int64_t packed_bytes, const AbsmaxSrc& absmax,
              const uint8_t* bits, const uint16_t* codebook, const int64_t* row_offsets, int64_t rows, int64_t cols,
              int64_t blocksize, const int32_t* row_order, const int64_t* group_rows, const void* bias, void* out,
              void* workspace, int64_t workspace_bytes, void* stream_) {
  cudaStream_t stream = (cudaStream_t)stream_;
  const bool nested = absmax.f32 == nullptr;
  GvArgs a1{};
  size_t smem1 = 0;
  if (packed_bytes < ((int64_t)1 << 32) &&  // one activation row (32-bit row offsets)
      gemv1_plan(dtype, m, rows, cols, blocksize, A, packed, row_order ? group_rows : nullptr, &a1, &smem1)) {
    if (!workspace_ok(a1, workspace, workspace_bytes)) return LOWRA_ERR_ARGUMENT;
    set_matmul_operands(a1, A, packed, packed_bytes, bits, codebook, row_offsets, row_order, bias, out, workspace);
    a1.am = absmax;
    const int st = gemv1_launch(a1, dtype, nested, smem1, stream);
    return st != LOWRA_OK || a1.ks == 1 ? st : launch_finalize(a1, dtype, stream);
  }
  GvPlan plan;
  if (!gemv_plan(dtype, m, rows, cols, blocksize, A, packed, codebook, &plan)) return -1;
  GvArgs& a = plan.a;
  if (!workspace_ok(a, workspace, workspace_bytes)) return LOWRA_ERR_ARGUMENT;
  const GvFn fn = dtype == LOWRA_F16 ? pick<__half>((int)m, plan.r, nested)
                                     : pick<__nv_bfloat16>((int)m, plan.r, nested);
  const int occ = gemv_occupancy(fn, plan.smem);
  if (occ < 1) return -1;
  set_matmul_operands(a, A, packed, packed_bytes, bits, codebook, row_offsets, row_order, bias, out, workspace);
  a.am = absmax;
  const int64_t tasks = (int64_t)a.ks * a.ngroups;
  const int64_t cap = (int64_t)sm_count() * occ;
  const int grid = (int)(tasks < cap ? tasks : cap);
  fn<<<grid, kGvThreads, plan.smem, stream>>>(a);
  const int st = launch_status("lowra matmul kernel (gemv)");
  return st != LOWRA_OK || a.ks == 1 ? st : launch_finalize(a, dtype, stream);
}

}  // namespace lowra
