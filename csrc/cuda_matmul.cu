// Fused y = A W^T (+ bias) on LowRA-packed weights for the decode regime (1 to 16 activation rows), never
// materializing W.
//
// Fast path (fp16/bf16 activations, blocksize a multiple of 64, cols a multiple of 256): rows are taken in the
// order of `row_order` (rows grouped by precision, see matmul_plan in _ops.py), 16 rows of one precision form a
// tile, and tiles are multiplied on tensor cores (mma.m16n8k16, fp32 accumulation) with the decoders of
// matmul_layout.h. A staging pass (matmul_stage) first writes the activations in each present precision's column
// order into the workspace. Then one launch per precision group, each a programmatic dependent of the launch before
// it so that the groups' tails and starts overlap (kPdl* below): a CTA (4 warps) owns a contiguous, cost-balanced
// range of (K split, 4 tiles) items; it copies its K split's slice of the staged activations into shared memory,
// and each warp multiplies one tile of an item over that split. Weights stream through registers with a D-deep
// prefetch ring; every warp reads 16 rows x 256 columns per stage. With several K splits the partial sums go to a
// float32 workspace and a last kernel adds them (deterministic order) and the bias.
// Generic path (anything else: fp32, more rows, odd shapes): one CTA per output channel on CUDA cores.
//
// Nothing here synchronizes the host; rows whose metadata does not fit are skipped (left unwritten) and counted.
#include <stdio.h>

#include <algorithm>
#include <mutex>
#include <utility>
#include <vector>

#include "cuda_common.cuh"
#include "kernels.h"
#include "matmul_layout.h"

namespace lowra {

namespace {

using namespace mm;

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kSegQuads = 4;  // groups of 4 tiles (one per warp) whose row metadata is staged at once
constexpr int kSegRows = kSegQuads * 4 * kTileRows;
constexpr int kSmemBudget = 74 * 1024;  // 3 CTAs (12 warps) per H100/H200 multiprocessor
// Items (4 tiles x one K split) per resident CTA that the automatic K split aims for: more balance the CTAs, fewer
// mean longer splits (fewer segment prologues and ring refills). 2 measured worse overall (H200, thirty-third round,
// m = 3-16 against 4: 1.75 bits 3-4% less time on 8192x28672 at m = 3-4 but 2-5% more on 28672x8192; all-4-bit
// 4-27% more on 28672x8192, 4096x11008 and 11008x4096 at several m).
constexpr int kItemsPerCta = 4;
constexpr unsigned kFull = 0xffffffffu;

// Activation rows padded to the mma's n: one 8-row tile up to m = 8, two up to 16. The staging pass, the workspace
// and the kernels' shared memory all size the 1-bit sums S, S2 by it.
constexpr int act_tiles(int64_t m) { return m <= 8 ? 1 : 2; }
constexpr int act_pad(int64_t m) { return 8 * act_tiles(m); }

// Every group's kernel is a programmatic dependent of the launch before it (the staging pass, or the previous
// group), so that a group's CTAs take the SMs the previous group's CTAs leave instead of waiting for its last one.
// The groups write disjoint rows and read only the staging pass's image, so only the first waits for its
// predecessor before it reads (kPdlWaitFirst); a group with a successor group lets it launch as soon as its own CTAs
// run past that point (kPdlTriggerEarly); the later groups wait for their predecessor at their very end
// (kPdlWaitAtEnd), so that the last group's completion, which the finalize pass and the stream wait for, implies
// every group's.
constexpr int kPdlWaitFirst = 1, kPdlTriggerEarly = 2, kPdlWaitAtEnd = 4;

struct RowInfo {
  int64_t off;  // byte offset of the row in `packed` (0 when !ok)
  int32_t row;  // output channel (0 when !ok: a safe index)
  uint32_t ok;
  float c0, dl;  // 1 bit: codebook entry 0 and entry 1 - entry 0
  uint32_t L, H; // 2 bit: byte tables of the four entries in the mma type
};

struct MatmulArgs {
  const void* A;
  int m;
  int64_t rows, cols, nb, blocksize;
  const uint8_t* packed;
  int64_t packed_bytes;
  const float* absmax;
  const uint8_t* bits;
  const uint16_t* codebook;
  const int64_t* row_offsets;
  const int32_t* row_order;
  int64_t grp_start, grp_rows, grp_tiles;  // this launch's precision group: positions in row_order, tiles
  int ks;
  int64_t krange;
  const void* bias;
  void* out;
  float* ws;
  int pdl;                // kPdl* flags: how this group's launch overlaps the launches around it
  const uint16_t* img;    // the activations staged in this precision's column order (matmul_stage), all of K
  const float2* img_ss;   // 1 bit: their per-unit sums S, S2
  int sm_bs, sm_ss, sm_ri, sm_cb, sm_lut;  // shared-memory offsets in bytes
};

template <typename T>
struct MmaType;
template <>
struct MmaType<__half> {
  static constexpr bool kHalf = true;
  static __device__ __forceinline__ void mma(float c[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                             uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint16_t from_f16(uint16_t h) { return h; }
  static __device__ __forceinline__ float to_float(uint16_t u) { return __half2float(__ushort_as_half(u)); }
  static __device__ __forceinline__ void store(void* p, int64_t i, float v) { ((__half*)p)[i] = __float2half_rn(v); }
};
template <>
struct MmaType<__nv_bfloat16> {
  static constexpr bool kHalf = false;
  static __device__ __forceinline__ void mma(float c[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                             uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint16_t from_f16(uint16_t h) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(__half2float(__ushort_as_half(h))));
  }
  static __device__ __forceinline__ float to_float(uint16_t u) { return __bfloat162float(__ushort_as_bfloat16(u)); }
  static __device__ __forceinline__ void store(void* p, int64_t i, float v) {
    ((__nv_bfloat16*)p)[i] = __float2bfloat16_rn(v);
  }
};

// Loads of the packed weight and its absmax. Every warp reads only 16-32 bytes per row per stage, from rows far
// apart; each miss therefore asks L2 for 256 bytes, so the row's next stages hit L2 and DRAM sees whole bursts
// instead of scattered sectors.
__device__ __forceinline__ uint4 ld_w16(const void* p) {
  uint4 v;
  asm("ld.global.nc.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}
__device__ __forceinline__ uint2 ld_w8(const void* p) {
  uint2 v;
  asm("ld.global.nc.L2::256B.v2.u32 {%0,%1}, [%2];" : "=r"(v.x), "=r"(v.y) : "l"(p));
  return v;
}
__device__ __forceinline__ uint32_t ld_w4(const void* p) {
  uint32_t v;
  asm("ld.global.nc.L2::256B.u32 %0, [%1];" : "=r"(v) : "l"(p));
  return v;
}
__device__ __forceinline__ float4 ld_f16B(const float* p) {
  float4 v;
  asm("ld.global.nc.L2::256B.v4.f32 {%0,%1,%2,%3}, [%4];" : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w) : "l"(p));
  return v;
}

// Packed codes of one stage (16 rows x 256 columns, this lane's rows g and g + 8) and their absmax.
template <int P>
struct Stage;
template <>
struct Stage<1> {
  uint4 q[2][2];  // all 32 bytes of the row's stage (every lane column decodes its pairs from them)
  float am[2][4];
};
template <>
struct Stage<2> {
  uint32_t q[2][4];  // word t of each unit
  float am[2][4];
};
template <>
struct Stage<4> {
  uint2 q[2][4];  // bytes 8t..8t+7 of each unit
  float am[2][4];
};

template <typename T, int NT, int D, int P>
struct Fast {
  using M = MmaType<T>;

  const MatmulArgs& a;
  unsigned char* smem;
  int tid, warp, lane, g, t;
  uint32_t magic[4];  // 1 bit: decode1's constants, in registers
  uint32_t bfrag[NT][8] = {};  // the activation fragments of the current unit (zeros for rows past m)

  __device__ Fast(const MatmulArgs& args, unsigned char* s) : a(args), smem(s) {
    tid = threadIdx.x;
    warp = tid >> 5;
    lane = tid & 31;
    g = lane >> 2;
    t = lane & 3;
    // a.m >> 31 is 0 (m >= 1) but unknown to the compiler, which would otherwise fold the constants back into
    // immediates, and (u & mask) | magic takes two LOP3s with two immediates
    const uint32_t opaque_zero = (uint32_t)(a.m >> 31);
#pragma unroll
    for (int i = 0; i < 4; ++i) magic[i] = Magic<M::kHalf>::pow2(4 - i) | opaque_zero;
  }

  __device__ uint16_t* bs() const { return (uint16_t*)(smem + a.sm_bs); }
  __device__ float2* ss() const { return (float2*)(smem + a.sm_ss); }
  __device__ RowInfo* ri() const { return (RowInfo*)(smem + a.sm_ri); }
  __device__ uint16_t* cbs() const { return (uint16_t*)(smem + a.sm_cb); }
  __device__ uint32_t* lut() const { return (uint32_t*)(smem + a.sm_lut) + warp * (kTileRows * 256); }

  // Activations of K split s in the column order of precision P (plus per-unit sums S, S2 for 1-bit tiles): the
  // split's slice of the image matmul_stage wrote, copied as it lies.
  __device__ void stage_activations(int64_t s) {
    if (a.pdl & kPdlWaitFirst) {
      griddep_wait();  // the image is the output of the staging pass, the launch before the first group
      if (a.pdl & kPdlTriggerEarly) griddep_launch_dependents();  // the next group reads the image only once this ran
    }
    const int64_t u0 = s * a.krange / kUnitCols;
    const int nu = (int)(min(a.cols - s * a.krange, a.krange) / kUnitCols);
    const uint4* src = reinterpret_cast<const uint4*>(a.img + u0 * a.m * 64);
    uint4* dst = reinterpret_cast<uint4*>(bs());
#pragma unroll 4
    for (int i = tid; i < nu * a.m * 8; i += kThreads) dst[i] = __ldcg(src + i);  // 8 x 16 bytes per unit and row
    if constexpr (P == 1) {
      const float4* s4 = reinterpret_cast<const float4*>(a.img_ss + u0 * 8 * NT);
      float4* d4 = reinterpret_cast<float4*>(ss());
      for (int i = tid; i < nu * 4 * NT; i += kThreads) d4[i] = __ldcg(s4 + i);
    }
  }

  // Row metadata (bound-checked) of the segment's tiles: local tile lt is tile 4 * q0 + lt of the group.
  __device__ void load_rows(int64_t q0, int ntl) {
    const int64_t pc = a.cols;
    for (int lr = tid; lr < ntl * kTileRows; lr += kThreads) {
      const int64_t local = q0 * 4 * kTileRows + lr;
      RowInfo x = {0, 0, 0u, 0.f, 0.f, 0u, 0u};
      if (local < a.grp_rows) {
        const int64_t r = a.row_order[a.grp_start + local];
        bool ok = r >= 0 && r < a.rows && a.bits[r] == P;
        int64_t off = 0;
        if (ok) {
          off = a.row_offsets[r];
          ok = row_ok(P, off, pc, a.packed_bytes) && ((uintptr_t)(a.packed + off) & 15) == 0;
        }
        if (ok) {
          x.off = off;
          x.row = (int32_t)r;
          x.ok = 1u;
          const uint16_t* cb = a.codebook + r * kCodebookSlots;
          if constexpr (P == 1) {
            const float c0 = half_bits_to_float(cb[0]), c1 = half_bits_to_float(cb[1]);
            x.c0 = c0;
            x.dl = c1 - c0;
          } else if constexpr (P == 2) {
            uint16_t v[4];
            for (int c = 0; c < 4; ++c) v[c] = M::from_f16(cb[c]);
            prmt_tables(v, &x.L, &x.H);
          } else {
            for (int c = 0; c < 16; ++c) cbs()[lr * 16 + c] = M::from_f16(cb[c]);
          }
        } else {
          count_skipped_row();
        }
      }
      if constexpr (P == 4) {
        if (!x.ok)
          for (int c = 0; c < 16; ++c) cbs()[lr * 16 + c] = 0;
      }
      ri()[lr] = x;
    }
  }

  // 4 bit: this warp's lookup table for local tile lt (16 rows x 256 packed-byte entries). Lane l writes entries
  // 4l..4l+3 and 128+4l.. of each row: consecutive 16-byte stores, no bank conflicts.
  __device__ void build_lut(int lt) {
    uint32_t* L = lut();
    const int lo = 4 * (lane & 3), hi = lane >> 2;
#pragma unroll 4
    for (int r = 0; r < kTileRows; ++r) {
      const uint16_t* v = cbs() + (lt * kTileRows + r) * 16;
      const uint2 q = *reinterpret_cast<const uint2*>(v + lo);
      const uint32_t l0 = q.x & 0xffffu, l1 = q.x >> 16, l2 = q.y & 0xffffu, l3 = q.y >> 16;
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        const uint32_t h = (uint32_t)v[8 * k + hi] << 16;
        reinterpret_cast<uint4*>(L + r * 256 + 128 * k)[lane] = make_uint4(l0 | h, l1 | h, l2 | h, l3 | h);
      }
    }
  }

  // Where the prefetcher reads: this lane's two rows of a tile, at the start of the K split.
  struct Ptrs {
    const uint8_t* code[2];
    const float* am[2];
    bool ok[2];
  };

  __device__ __forceinline__ void tile_ptrs(int lt, int64_t k0, Ptrs& p) const {
#pragma unroll
    for (int R = 0; R < 2; ++R) {
      const RowInfo& x = ri()[lt * kTileRows + g + 8 * R];
      p.ok[R] = x.ok != 0u;
      p.code[R] = a.packed + x.off + (k0 * P >> 3);
      p.am[R] = a.absmax + (int64_t)x.row * a.nb;
    }
  }

  __device__ __forceinline__ void load_stage(Stage<P>& S, const Ptrs& p, int st, int64_t k0) const {
#pragma unroll
    for (int R = 0; R < 2; ++R) {
      // rows that failed their checks load nothing (zeros): their results are never stored
      if constexpr (P == 1) {
        const uint4* q = reinterpret_cast<const uint4*>(p.code[R] + st * 32);
        S.q[R][0] = S.q[R][1] = make_uint4(0, 0, 0, 0);
        if (p.ok[R]) {
          S.q[R][0] = ld_w16(q);
          S.q[R][1] = ld_w16(q + 1);
        }
      } else if constexpr (P == 2) {
        const uint32_t* q = reinterpret_cast<const uint32_t*>(p.code[R] + st * 64 + 4 * t);
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          S.q[R][u] = 0u;
          if (p.ok[R]) S.q[R][u] = ld_w4(q + 4 * u);
        }
      } else {
        const uint2* q = reinterpret_cast<const uint2*>(p.code[R] + st * 128 + 8 * t);
#pragma unroll
        for (int u = 0; u < 4; ++u) {
          S.q[R][u] = make_uint2(0, 0);
          if (p.ok[R]) S.q[R][u] = ld_w8(q + 4 * u);
        }
      }
#pragma unroll
      for (int u = 0; u < 4; ++u) S.am[R][u] = 0.f;
      if (p.ok[R]) {
        const int64_t col0 = k0 + (int64_t)st * kStageCols;
        if (a.blocksize == kUnitCols) {
          const float4 v = ld_f16B(p.am[R] + (col0 >> 6));
          S.am[R][0] = v.x, S.am[R][1] = v.y, S.am[R][2] = v.z, S.am[R][3] = v.w;
        } else {
#pragma unroll
          for (int u = 0; u < 4; ++u) S.am[R][u] = __ldg(p.am[R] + (col0 + kUnitCols * u) / a.blocksize);
        }
      }
    }
  }

  // k0[R], k1[R]: per-row constants of the tile (1 bit: c0, dl as float bits; 2 bit: L, H; 4 bit: lut offsets)
  __device__ __forceinline__ void compute_stage(const Stage<P>& S, int st, const uint32_t k0[2],
                                                const uint32_t k1[2], float tot[NT][4]) {
    const int m = a.m;
    const uint16_t* Bst = bs() + (st * kStageUnits * m) * 64 + t * 16;
#pragma unroll
    for (int u = 0; u < kStageUnits; ++u) {
      uint32_t(&bf)[NT][8] = bfrag;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        // lanes past the last activation row load nothing (predicated, not a branch) and keep their zeros
        const int n = g + 8 * nt;
        if (n < m) {
          const uint4* src = reinterpret_cast<const uint4*>(Bst + (u * m + n) * 64);
          const int sw = n & 1;  // stage_word: halves swapped on odd rows
          const uint4 lo = src[sw], hi = src[sw ^ 1];
          bf[nt][0] = lo.x, bf[nt][1] = lo.y, bf[nt][2] = lo.z, bf[nt][3] = lo.w;
          bf[nt][4] = hi.x, bf[nt][5] = hi.y, bf[nt][6] = hi.z, bf[nt][7] = hi.w;
        }
      }
      uint32_t f[2][8];
#pragma unroll
      for (int R = 0; R < 2; ++R) {
        if constexpr (P == 1) {
          const uint4 q = S.q[R][u >> 1];
          decode1<M::kHalf>((u & 1) ? q.z : q.x, (u & 1) ? q.w : q.y, t, f[R], magic);
        } else if constexpr (P == 2) {
          decode2(S.q[R][u], k0[R], k1[R], f[R]);
        } else {
          const uint32_t* L = lut() + k0[R];
          const uint2 q = S.q[R][u];
#pragma unroll
          for (int pi = 0; pi < 8; ++pi) f[R][pi] = L[((pi < 4 ? q.x : q.y) >> (8 * (pi & 3))) & 0xffu];
        }
      }
      // with one activation tile, two accumulator chains (k steps 0,2 and 1,3) halve the dependent mma latency
      constexpr int kChains = NT == 1 ? 2 : 1;
      float acc[kChains][NT][4];
      float4 s[NT];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        if constexpr (P == 1) s[nt] = *reinterpret_cast<const float4*>(ss() + (st * kStageUnits + u) * (8 * NT) + 8 * nt + 2 * t);
#pragma unroll
        for (int c = 0; c < kChains; ++c)
#pragma unroll
          for (int i = 0; i < 4; ++i) acc[c][nt][i] = 0.f;
        if constexpr (P == 1) {  // start from -S2 (the magic offsets' share) of columns n, n + 1
          acc[0][nt][0] = acc[0][nt][2] = -s[nt].y;
          acc[0][nt][1] = acc[0][nt][3] = -s[nt].w;
        }
      }
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
          M::mma(acc[j % kChains][nt], f[0][2 * j], f[1][2 * j], f[0][2 * j + 1], f[1][2 * j + 1], bf[nt][2 * j],
                 bf[nt][2 * j + 1]);
      const float am0 = S.am[0][u], am1 = S.am[1][u];
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        float x[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) x[i] = kChains == 2 ? acc[0][nt][i] + acc[kChains - 1][nt][i] : acc[0][nt][i];
        if constexpr (P == 1) {  // row value = c0 * S + (c1 - c0) * (acc - S2), scaled by the block's absmax
          const float c00 = __uint_as_float(k0[0]), dl0 = __uint_as_float(k1[0]);
          const float c01 = __uint_as_float(k0[1]), dl1 = __uint_as_float(k1[1]);
          tot[nt][0] += am0 * fmaf(dl0, x[0], c00 * s[nt].x);
          tot[nt][1] += am0 * fmaf(dl0, x[1], c00 * s[nt].z);
          tot[nt][2] += am1 * fmaf(dl1, x[2], c01 * s[nt].x);
          tot[nt][3] += am1 * fmaf(dl1, x[3], c01 * s[nt].z);
        } else {
          tot[nt][0] = fmaf(am0, x[0], tot[nt][0]);
          tot[nt][1] = fmaf(am0, x[1], tot[nt][1]);
          tot[nt][2] = fmaf(am1, x[2], tot[nt][2]);
          tot[nt][3] = fmaf(am1, x[3], tot[nt][3]);
        }
      }
    }
  }

  // Outputs of this lane's rows (row[R], ok[R]) for activation rows n = 8 nt + 2t (+1).
  __device__ __forceinline__ void store_tile(int64_t s, const int32_t row[2], const bool ok[2], float tot[NT][4]) const {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int R = e >> 1, n = 8 * nt + 2 * t + (e & 1);
        if (ok[R] && n < a.m) {
          float v = tot[nt][e];
          if (a.ks == 1) {
            if (a.bias) v += M::to_float(((const uint16_t*)a.bias)[row[R]]);
            M::store(a.out, (int64_t)n * a.rows + row[R], v);
          } else {
            a.ws[(s * a.m + n) * a.rows + row[R]] = v;
          }
        }
        tot[nt][e] = 0.f;
      }
  }

  // This warp's tiles of the segment (local tiles warp, warp + 4, ...), all stages of K split s, with a D-deep
  // register prefetch ring that runs across tile boundaries. No CTA barrier inside.
  __device__ void run(int64_t s, int ntl) {
    const int64_t k0 = s * a.krange;
    const int nst = (int)(min(a.cols - k0, a.krange) / kStageCols);
    const int ntw = ntl > warp ? (ntl - warp + 3) / 4 : 0;
    const int total = ntw * nst;
    if (total == 0) return;
    float tot[NT][4];
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) tot[nt][i] = 0.f;
    // prefetch cursor
    int pti = 0, pj = 0;
    Ptrs pp;
    tile_ptrs(warp, k0, pp);
    Stage<P> ring[D];
#pragma unroll
    for (int k = 0; k < D; ++k) {
      if (k < total) {
        load_stage(ring[k], pp, pj, k0);
        if (++pj == nst) {
          pj = 0;
          if (++pti < ntw) tile_ptrs(warp + 4 * pti, k0, pp);
        }
      }
    }
    // compute cursor and the current tile's constants
    int ti = 0, j = 0;
    uint32_t kc0[2], kc1[2];
    int32_t row[2];
    bool ok[2];
    auto tile_consts = [&](int i) {
      const int lt = warp + 4 * i;
#pragma unroll
      for (int R = 0; R < 2; ++R) {
        const RowInfo& x = ri()[lt * kTileRows + g + 8 * R];
        row[R] = x.row;
        ok[R] = x.ok != 0u;
        if constexpr (P == 1) {
          kc0[R] = __float_as_uint(x.c0);
          kc1[R] = __float_as_uint(x.dl);
        } else if constexpr (P == 2) {
          kc0[R] = x.L;
          kc1[R] = x.H;
        } else {
          kc0[R] = (uint32_t)((g + 8 * R) * 256);
          kc1[R] = 0u;
        }
      }
      if constexpr (P == 4) {
        __syncwarp();  // every lane is done with the previous tile's table
        build_lut(lt);
        __syncwarp();
      }
    };
    tile_consts(0);
    for (int base = 0; base < total; base += D) {
#pragma unroll
      for (int k = 0; k < D; ++k) {
        if (base + k < total) {
          compute_stage(ring[k], j, kc0, kc1, tot);
          if (base + k + D < total) {
            load_stage(ring[k], pp, pj, k0);
            if (++pj == nst) {
              pj = 0;
              if (++pti < ntw) tile_ptrs(warp + 4 * pti, k0, pp);
            }
          }
          if (++j == nst) {
            store_tile(s, row, ok, tot);
            j = 0;
            if (++ti < ntw) tile_consts(ti);
          }
        }
      }
    }
  }

  __device__ void segment(int64_t s, int64_t q0, int ntl, int64_t& staged_s) {
    __syncthreads();  // the previous segment is done with shared memory
    load_rows(q0, ntl);  // first: it does not wait for the staging pass
    if (staged_s != s) {
      stage_activations(s);
      staged_s = s;
    }
    __syncthreads();
    run(s, ntl);
  }

  // This CTA's contiguous share of the items (K split s, group of 4 tiles), split outermost so that the staged
  // activations change rarely; each warp owns one tile of an item.
  __device__ void operator()() {
    const int64_t quads = (a.grp_tiles + 3) / 4, items = quads * a.ks, C = gridDim.x, c = blockIdx.x;
    const int64_t lo = items * c / C, hi = items * (c + 1) / C;
    int64_t staged_s = -1;
    if ((a.pdl & kPdlTriggerEarly) && !(a.pdl & kPdlWaitFirst)) griddep_launch_dependents();
    for (int64_t l = lo; l < hi;) {
      const int64_t s = l / quads, q0 = l % quads;
      const int nq = (int)min(min(hi - l, quads - q0), (int64_t)kSegQuads);
      const int ntl = (int)min((int64_t)nq * 4, a.grp_tiles - q0 * 4);
      // the last group's successor, the finalize pass (K splits), may launch once every CTA is in its last segment;
      // it waits for this grid to finish. Not earlier: its CTAs would sit resident beside the segments still to run
      if (l + nq >= hi) griddep_launch_dependents();
      segment(s, q0, ntl, staged_s);
      l += nq;
    }
    if (a.pdl & kPdlWaitAtEnd) griddep_wait();  // this grid completes only after the previous group's
  }
};

// 1 and 2 bit: 3 CTAs (12 warps) per SM with a 3-deep prefetch ring, 4 (16 warps) with a 2-deep one; 4 bit is
// held to 2 by its per-warp lookup tables anyway
template <typename T, int NT, int D, int P>
__global__ void __launch_bounds__(kThreads, P == 4 ? 2 : (D == 2 ? 4 : 3)) matmul_fast_kernel(const __grid_constant__ MatmulArgs args) {
  extern __shared__ __align__(16) unsigned char smem[];
  Fast<T, NT, D, P>(args, smem)();
}

// The staging pass: the activations (all of K) in each present precision's shared-memory order, [unit][row][64]
// as stage_slot and stage_word place them, and for 1-bit tiles the per-unit sums S, S2 ([unit][npad], rows past m
// zero). Written once per call into the workspace, so that each tiled CTA copies its split's slice instead of
// permuting and summing it again (that took 13-17% of the tiled kernels' instructions at m = 4; thirty-second round).
struct StageArgs {
  const void* A;
  int m, npad;
  int64_t cols;
  uint16_t* img[3];  // per precision group (1, 2, 4 bit); NULL where the group is empty
  float2* ss;        // with img[0]
  int wait_at_end;   // launched as a programmatic dependent of the scales' decode pass: complete only after it
};

constexpr int kStageThreads = 64;

template <typename T>
__global__ void __launch_bounds__(kStageThreads) matmul_stage(const __grid_constant__ StageArgs s) {
  griddep_launch_dependents();  // the first tiled kernel looks up its rows meanwhile, then waits for this pass
  using M = MmaType<T>;
  // 32-bit indices (make_plan keeps m * cols / 8 below 2^30): a 64-bit division would dominate this short pass
  const int c8n = (int)(s.cols >> 3), n_all = s.m * c8n;  // a multiple of 32 (cols % 256 == 0): whole warps below
  for (int ci = blockIdx.x * blockDim.x + threadIdx.x; ci < n_all; ci += gridDim.x * blockDim.x) {
    const int n = ci / c8n, c8 = ci % c8n;
    const int64_t ul = c8 >> 3;
    const int cb = (int)(c8 & 7) * 8;  // first column in the unit
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>((const T*)s.A + (int64_t)n * s.cols) + c8);
    const uint16_t* v = reinterpret_cast<const uint16_t*>(&raw);
#pragma unroll
    for (int p = 0; p < 3; ++p) {
      if (!s.img[p]) continue;
      uint16_t* dst = s.img[p] + (ul * s.m + n) * 64;
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const int slot = stage_slot(1 << p, cb + e);
        dst[stage_word(n, slot >> 4, (slot >> 1) & 7) * 2 + (slot & 1)] = v[e];
      }
    }
    if (s.ss) {  // warp-uniform
      float s1 = 0.f, s2 = 0.f;
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const float x = M::to_float(v[e]);
        s1 += x;
        s2 += s2_weight(cb + e) * x;
      }
#pragma unroll
      for (int o = 1; o < 8; o <<= 1) {  // the 8 lanes of one unit and row
        s1 += __shfl_xor_sync(kFull, s1, o);
        s2 += __shfl_xor_sync(kFull, s2, o);
      }
      if (cb == 0) {
        s.ss[ul * s.npad + n] = make_float2(s1, s2);
        if (n == 0)
          for (int j = s.m; j < s.npad; ++j) s.ss[ul * s.npad + j] = make_float2(0.f, 0.f);
      }
    }
  }
  if (s.wait_at_end) griddep_wait();
}

struct FinalizeArgs {
  const float* ws;
  const int32_t* row_order;
  const uint8_t* bits;
  const int64_t* row_offsets;
  const uint8_t* packed;
  int64_t packed_bytes, m, rows, cols;
  int64_t grp_start[3], grp_rows[3];
  int ks[3];
  const void* bias;
  int dtype;
  void* out;
};

// Rows of groups with several K splits: sums the partial results in a fixed order, adds the bias, converts.
// Rows the main kernel skipped (same checks as load_rows) are skipped here too. A programmatic dependent of the last
// group's kernel (each group's kernel starts after the previous one finished): the row checks and the bias, written
// before those kernels started, load before griddep_wait; the partial sums after it.
__global__ void matmul_finalize(const __grid_constant__ FinalizeArgs f) {
  bool waited = false;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < f.m * f.rows; i += (int64_t)gridDim.x * blockDim.x) {
    const int64_t n = i / f.rows, pos = i % f.rows;
    const int p = pos < f.grp_start[1] ? 0 : pos < f.grp_start[2] ? 1 : 2;
    const int ks = f.ks[p];
    bool ok = ks > 1;
    int64_t r = 0;
    if (ok) {
      r = f.row_order[pos];
      const int b = 1 << p;
      ok = r >= 0 && r < f.rows && f.bits[r] == b;
      if (ok) {
        const int64_t off = f.row_offsets[r];
        ok = row_ok(b, off, f.cols, f.packed_bytes) && ((uintptr_t)(f.packed + off) & 15) == 0;
      }
    }
    const float bias = ok && f.bias ? load_elem(f.bias, f.dtype, r) : 0.f;
    if (!waited) {
      griddep_wait();
      waited = true;
    }
    if (!ok) continue;
    float sum = 0.f;
    for (int k = 0; k < ks; ++k) sum += f.ws[(k * f.m + n) * f.rows + r];
    store_elem(f.out, f.dtype, n * f.rows + r, f.bias ? sum + bias : sum);
  }
  if (!waited) griddep_wait();  // a thread with no element still orders itself after the main kernels
}

// ---------------------------------------------------------------------------------------------------------------
// Generic path: one CTA per output channel, activations in groups of 8 rows, float32 accumulation.

constexpr int kGenericThreads = 128;

__global__ void __launch_bounds__(kGenericThreads) matmul_generic(const void* __restrict__ A, int dtype, int64_t m,
                                                                   const uint8_t* __restrict__ packed,
                                                                   int64_t packed_bytes, const float* __restrict__ absmax,
                                                                   const uint8_t* __restrict__ bits,
                                                                   const uint16_t* __restrict__ codebook,
                                                                   const int64_t* __restrict__ row_offsets,
                                                                   int64_t rows, int64_t cols, int64_t blocksize,
                                                                   int64_t pc, const void* bias, void* out) {
  const int64_t r = blockIdx.x;
  const int b = bits[r];
  const int64_t start = row_offsets[r];
  if (!row_ok(b, start, pc, packed_bytes)) {
    if (threadIdx.x == 0) count_skipped_row();
    return;
  }
  __shared__ float code[kCodebookSlots];
  __shared__ float part[kGenericThreads / 32][8];
  if (threadIdx.x < kCodebookSlots) code[threadIdx.x] = half_bits_to_float(codebook[r * kCodebookSlots + threadIdx.x]);
  __syncthreads();
  const uint8_t* in = packed + start;
  const int per_byte = 8 / b;
  const uint32_t mask = (1u << b) - 1;
  const int64_t nb = pc / blocksize;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int64_t n0 = 0; n0 < m; n0 += 8) {
    float acc[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
    for (int64_t j = threadIdx.x; j < cols; j += kGenericThreads) {
      const uint32_t c = (in[j / per_byte] >> ((j % per_byte) * b)) & mask;
      const float w = code[c] * absmax[r * nb + j / blocksize];
#pragma unroll
      for (int q = 0; q < 8; ++q)
        if (n0 + q < m) acc[q] += load_elem(A, dtype, (n0 + q) * cols + j) * w;
    }
#pragma unroll
    for (int q = 0; q < 8; ++q)
      for (int o = 16; o > 0; o >>= 1) acc[q] += __shfl_xor_sync(kFull, acc[q], o);
    __syncthreads();  // `part` of the previous group is consumed
    if (lane == 0)
      for (int q = 0; q < 8; ++q) part[warp][q] = acc[q];
    __syncthreads();
    if (threadIdx.x < 8 && n0 + threadIdx.x < m) {
      float s = 0.f;
      for (int w = 0; w < kGenericThreads / 32; ++w) s += part[w][threadIdx.x];
      if (bias) s += load_elem(bias, dtype, r);
      store_elem(out, dtype, (n0 + threadIdx.x) * rows + r, s);
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Host side: choosing the fast path and its launch shapes (one launch per non-empty precision group: the three
// decoders in one kernel need more registers than each alone).

struct Tuning {
  int ks = 0, ctas_per_sm = 0, depth = 0;  // 0: automatic
  bool nested_prepass = false;  // GEMV: decode double-quantized scales in a pass of their own, not in the kernel
};
Tuning g_tuning;

using KernelFn = void (*)(const MatmulArgs);

template <typename T, int P>
KernelFn pick_kernel(int nt, int depth) {
  if (nt == 1) return depth == 2 ? matmul_fast_kernel<T, 1, 2, P> : matmul_fast_kernel<T, 1, 3, P>;
  return depth == 2 ? matmul_fast_kernel<T, 2, 2, P> : matmul_fast_kernel<T, 2, 3, P>;
}

template <typename T>
KernelFn pick_kernel(int p, int nt, int depth) {
  return p == 0 ? pick_kernel<T, 1>(nt, depth) : p == 1 ? pick_kernel<T, 2>(nt, depth) : pick_kernel<T, 4>(nt, depth);
}

// Resident CTAs per SM of a kernel at a shared-memory size (cached: the query is not free; 0 when it cannot run).
// The kernel's dynamic shared-memory limit is raised once to the most any plan may ask for (make_plan refuses
// more), or to what the device allows.
constexpr int kMaxSmem = 200 * 1024;

int occupancy(KernelFn fn, size_t smem) {
  static std::mutex mu;
  static std::vector<std::pair<std::pair<KernelFn, size_t>, int>> cache;
  static std::vector<std::pair<KernelFn, int>> raised;  // (kernel, device)
  int dev = 0;
  cudaGetDevice(&dev);
  const size_t key = smem * 64 + (size_t)dev;
  std::lock_guard<std::mutex> lock(mu);
  for (auto& e : cache)
    if (e.first.first == fn && e.first.second == key) return e.second;
  bool done = false;
  for (auto& e : raised) done = done || (e.first == fn && e.second == dev);
  if (!done) {
    int optin = 0;  // 227 KB on H100/H200 and A100, ~99 KB on sm_86 / sm_89
    cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev);
    const int limit = optin > 0 && optin < kMaxSmem ? optin : kMaxSmem;
    if (cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, limit) != cudaSuccess) {
      cudaGetLastError();  // a failed attribute call must not leak into the next launch check
      return 0;
    }
    raised.push_back({fn, dev});
  }
  int occ = 0;
  if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, fn, kThreads, smem) != cudaSuccess) {
    cudaGetLastError();
    occ = 0;
  }
  cache.push_back({{fn, key}, occ});
  return occ;
}

struct GroupPlan {
  KernelFn fn = nullptr;
  int ks = 1, nctas = 0;
  int64_t krange = 0;
  size_t smem = 0;
  MatmulArgs args{};
};

struct Plan {
  GroupPlan grp[3];
  int ks_max = 1;
};

// Launch shapes of the fast path; false when the generic kernel must run.
bool make_plan(const void* A, int dtype, int64_t m, const uint8_t* packed, const float* absmax, int64_t rows,
               int64_t cols, int64_t blocksize, const int32_t* row_order, const int64_t* group_rows, Plan* plan) {
  if (dtype != LOWRA_F16 && dtype != LOWRA_BF16) return false;
  if (m < 1 || m > 16 || blocksize % kUnitCols != 0 || cols % kStageCols != 0 || cols % blocksize != 0) return false;
  if (m * (cols / 8) >= ((int64_t)1 << 30)) return false;  // matmul_stage indexes its chunks in 32 bits
  if (!row_order || !group_rows || !aligned(A, 16) || !aligned(packed, 16) || !aligned(absmax, 16)) return false;
  int64_t sum = 0;
  for (int p = 0; p < 3; ++p) {
    if (group_rows[p] < 0) return false;
    sum += group_rows[p];
  }
  if (sum != rows) return false;
  const int nt = act_tiles(m), npad = act_pad(m);
  const int sms = sm_count();
  const int depth = g_tuning.depth == 2 ? 2 : 3;
  int64_t start = 0;
  for (int p = 0; p < 3; ++p) {
    GroupPlan& gp = plan->grp[p];
    MatmulArgs& a = gp.args;
    a.grp_start = start;
    a.grp_rows = group_rows[p];
    a.grp_tiles = (group_rows[p] + kTileRows - 1) / kTileRows;
    start += group_rows[p];
    if (a.grp_tiles == 0) continue;
    // fixed shared memory: row metadata; 4 bit: codebooks and one lookup table per warp
    const int ri_bytes = kSegRows * (int)sizeof(RowInfo);
    const int cb_bytes = p == 2 ? kSegRows * 16 * 2 : 0;
    const int lut_bytes = p == 2 ? kWarps * kTileRows * 256 * 4 : 0;
    const int64_t fixed = ri_bytes + cb_bytes + lut_bytes;
    const int64_t per64 = 2 * m * 64 + (p == 0 ? npad * 8 : 0);  // per 64 staged columns: activations + S/S2
    int64_t kmax = (kSmemBudget + lut_bytes - fixed) / per64 * 64 / kStageCols * kStageCols;
    if (kmax < kStageCols) kmax = kStageCols;
    gp.fn = dtype == LOWRA_F16 ? pick_kernel<__half>(p, nt, depth) : pick_kernel<__nv_bfloat16>(p, nt, depth);
    const int64_t quads = (a.grp_tiles + 3) / 4;
    int ks = (int)((cols + kmax - 1) / kmax);
    if (g_tuning.ks > 0) {
      ks = g_tuning.ks;
    } else {
      // enough items (4 tiles x one K split) for ~kItemsPerCta per resident CTA, keeping >= 512 columns per split
      const int occ0 = occupancy(gp.fn, (size_t)(fixed + (cols < kmax ? cols : kmax) / 64 * per64));
      const int64_t want = (int64_t)kItemsPerCta * sms * (occ0 > 0 ? occ0 : 1);
      while ((int64_t)ks * quads < want && cols / (ks + 1) >= 2 * kStageCols) ++ks;
    }
    int64_t krange = ((cols + ks - 1) / ks + kStageCols - 1) / kStageCols * kStageCols;
    ks = (int)((cols + krange - 1) / krange);
    const size_t smem = (size_t)(fixed + krange / 64 * per64);
    if (smem > (size_t)kMaxSmem) return false;
    int occ = occupancy(gp.fn, smem);
    if (occ < 1) return false;
    if (g_tuning.ctas_per_sm > 0 && g_tuning.ctas_per_sm < occ) occ = g_tuning.ctas_per_sm;
    const int64_t items = quads * ks;
    gp.ks = ks;
    gp.krange = krange;
    gp.smem = smem;
    gp.nctas = (int)(items < (int64_t)sms * occ ? items : (int64_t)sms * occ);
    a.m = (int)m;
    a.ks = ks;
    a.krange = krange;
    a.sm_bs = 0;
    a.sm_ss = (int)(krange * 2 * m);
    a.sm_ri = a.sm_ss + (int)(p == 0 ? krange / 64 * npad * 8 : 0);
    a.sm_cb = a.sm_ri + ri_bytes;
    a.sm_lut = a.sm_cb + cb_bytes;
    if (ks > plan->ks_max) plan->ks_max = ks;
  }
  return true;
}

// The tiled path's workspace (after any decoded scales): the K splits' partial sums, then the staged activations of
// each present precision group (matmul_stage), then the 1-bit sums; offsets 256-byte aligned, -1 where absent.
struct TiledWorkspace {
  int64_t img[3], ss, total;
};

TiledWorkspace tiled_workspace(const Plan& plan, int64_t m, int64_t rows, int64_t cols) {
  auto up = [](int64_t x) { return (x + 255) / 256 * 256; };
  TiledWorkspace w{};
  int64_t at = up(plan.ks_max > 1 ? (int64_t)plan.ks_max * m * rows * 4 : 0);
  for (int p = 0; p < 3; ++p) {
    w.img[p] = plan.grp[p].fn ? at : -1;
    if (plan.grp[p].fn) at += up(cols * m * 2);
  }
  w.ss = plan.grp[0].fn ? at : -1;
  if (plan.grp[0].fn) at += up(cols / kUnitCols * act_pad(m) * (int64_t)sizeof(float2));
  w.total = at;
  return w;
}

}  // namespace

int64_t take_matmul_skipped_rows() { return take_local_skipped_rows(); }

void matmul_cuda_set_tuning(int ks, int ctas_per_sm, int depth, int nested_prepass) {
  g_tuning.ks = ks;
  g_tuning.ctas_per_sm = ctas_per_sm;
  g_tuning.depth = depth;
  g_tuning.nested_prepass = nested_prepass > 0;
}

// Double-quantized scales are decoded into the front of the workspace for the tensor-core and generic paths, which
// read every scale once per activation-row tile; the GEMV decodes them where it reads them (unless a knob asks for
// the decode pass there too, to compare).
int64_t decoded_absmax_bytes(int64_t rows, int64_t cols, int64_t blocksize) {
  return (rows * (padded_cols(cols, blocksize) / blocksize) * 4 + 255) / 256 * 256;
}

int64_t matmul_cuda_workspace_size(int dtype, int64_t m, int64_t rows, int64_t cols, int64_t blocksize,
                                   const int64_t* group_rows, bool nested) {
  const int64_t gv = gemv_workspace_size(dtype, m, rows, cols, blocksize);
  const bool decode = nested && (gv < 0 || g_tuning.nested_prepass);
  const int64_t dec = decode ? decoded_absmax_bytes(rows, cols, blocksize) : 0;
  if (gv >= 0) return dec + gv;
  Plan plan;
  // alignment and pointers do not change the plan's shape: stand-ins that pass the checks
  const void* p16 = (const void*)(uintptr_t)256;
  static const int32_t stand_in_order = 0;
  if (!make_plan(p16, dtype, m, (const uint8_t*)p16, (const float*)p16, rows, cols, blocksize, &stand_in_order,
                 group_rows, &plan))
    return dec;
  return dec + tiled_workspace(plan, m, rows, cols).total;
}

int matmul_cuda(const void* A, int dtype, int64_t m, const uint8_t* packed, int64_t packed_bytes,
                const AbsmaxSrc& amsrc, const uint8_t* bits, const uint16_t* codebook, const int64_t* row_offsets,
                int64_t rows, int64_t cols, int64_t blocksize, const int32_t* row_order, const int64_t* group_rows,
                const void* bias, void* out, void* workspace, int64_t workspace_bytes, void* stream_) {
  cudaStream_t stream = (cudaStream_t)stream_;
  AbsmaxSrc src = amsrc;
  const bool gemv = gemv_workspace_size(dtype, m, rows, cols, blocksize) >= 0;
  const bool decode = !src.f32 && (!gemv || g_tuning.nested_prepass);
  if (decode) {  // decode once into the workspace's front, the rest after
    const int64_t dec = decoded_absmax_bytes(rows, cols, blocksize);
    if (!workspace || workspace_bytes < dec || !aligned(workspace, 256)) return LOWRA_ERR_ARGUMENT;
    const int st = decode_absmax_cuda(amsrc, rows * (padded_cols(cols, blocksize) / blocksize), (float*)workspace,
                                      stream_);
    if (st != LOWRA_OK) return st;
    src = AbsmaxSrc{};
    src.f32 = (const float*)workspace;
    workspace = (char*)workspace + dec;
    workspace_bytes -= dec;
  }
  const int gv = gemv_cuda(A, dtype, m, packed, packed_bytes, src, bits, codebook, row_offsets, rows, cols,
                           blocksize, row_order, group_rows, bias, out, workspace, workspace_bytes, stream_);
  if (gv >= 0) return gv;  // 1-4 activation rows where gemv_takes: the CUDA-core GEMV (cuda_gemv.cu)
  const float* absmax = src.f32;
  Plan plan;
  if (make_plan(A, dtype, m, packed, absmax, rows, cols, blocksize, row_order, group_rows, &plan)) {
    const TiledWorkspace w = tiled_workspace(plan, m, rows, cols);
    if (!workspace || workspace_bytes < w.total || !aligned(workspace, 16)) return LOWRA_ERR_ARGUMENT;
    char* ws = (char*)workspace;
    StageArgs sa{A, (int)m, act_pad(m), cols, {}, w.ss >= 0 ? (float2*)(ws + w.ss) : nullptr, decode};
    for (int p = 0; p < 3; ++p) sa.img[p] = w.img[p] >= 0 ? (uint16_t*)(ws + w.img[p]) : nullptr;
    // small CTAs spread the pass over more SMs: at m = 4 on 8192 columns it took 3.2 us under ncu in 64-thread CTAs,
    // 4.1 in 16 CTAs of 256 threads (thirty-second round)
    const int64_t chunks = m * (cols / 8);
    const int sgrid = (int)std::min<int64_t>((chunks + kStageThreads - 1) / kStageThreads, 16 * (int64_t)sm_count());
    // After the scales' decode pass the staging pass runs beside it (it reads only A, complete before that pass
    // started) and completes after it (wait_at_end). H200, 28672x8192 at m = 4, 1.75 bits, double-quantized: see
    // docs/benchmarks.md, thirty-fourth round.
    auto stage = dtype == LOWRA_F16 ? matmul_stage<__half> : matmul_stage<__nv_bfloat16>;
    const char* what = "lowra matmul staging kernel";
    int st;
    if (decode) {
      st = record_cuda(launch_dependent(stage, sgrid, kStageThreads, 0, stream, sa), what);
    } else {
      stage<<<sgrid, kStageThreads, 0, stream>>>(sa);
      st = launch_status(what);
    }
    if (st != LOWRA_OK) return st;
    bool first = true;  // the first group's kernel waits for the staging pass; the others start early (kPdl*)
    FinalizeArgs f{};
    for (int p = 0; p < 3; ++p) {
      GroupPlan& gp = plan.grp[p];
      MatmulArgs& a = gp.args;
      f.grp_start[p] = a.grp_start;
      f.grp_rows[p] = a.grp_rows;
      f.ks[p] = gp.fn ? gp.ks : 1;
      if (!gp.fn) continue;
      set_matmul_operands(a, A, packed, packed_bytes, bits, codebook, row_offsets, row_order, bias, out, workspace);
      a.rows = rows;
      a.cols = cols;
      a.blocksize = blocksize;
      a.nb = cols / blocksize;
      a.absmax = absmax;
      a.img = sa.img[p];
      a.img_ss = sa.ss;
      bool more = false;  // a later group follows
      for (int q = p + 1; q < 3; ++q) more |= plan.grp[q].fn != nullptr;
      a.pdl = (first ? kPdlWaitFirst : kPdlWaitAtEnd) | (more ? kPdlTriggerEarly : 0);
      first = false;
      st = record_cuda(launch_dependent(gp.fn, gp.nctas, kThreads, gp.smem, stream, a), "lowra matmul kernel");
      if (st != LOWRA_OK) return st;
    }
    if (plan.ks_max == 1) return LOWRA_OK;
    f.ws = (const float*)workspace;
    f.row_order = row_order;
    f.bits = bits;
    f.row_offsets = row_offsets;
    f.packed = packed;
    f.packed_bytes = packed_bytes;
    f.m = m;
    f.rows = rows;
    f.cols = cols;
    f.bias = bias;
    f.dtype = dtype;
    f.out = out;
    const int grid = finalize_grid(m * rows);
    // Launched early (programmatic dependent), its CTAs get 48 KB of unused shared memory each: at most 4 per SM,
    // as many as finalize_grid sizes it for, so the grid spreads over every SM instead of piling onto the SMs that
    // free up first. Without the cap 28672x8192 and 8192x28672 at m = 16 lost 1.4-2.3%; with it the first is level
    // (twenty-second round). A plain launch (below sm_90) needs no cap.
    const size_t spread_smem = has_pdl() ? 48 * 1024 : 0;
    return record_cuda(launch_dependent(matmul_finalize, grid, 256, spread_smem, stream, f),
                       "lowra matmul finalize kernel");
  }
  const int64_t pc = padded_cols(cols, blocksize);
  matmul_generic<<<(unsigned)rows, kGenericThreads, 0, stream>>>(A, dtype, m, packed, packed_bytes, absmax, bits,
                                                                 codebook, row_offsets, rows, cols, blocksize, pc,
                                                                 bias, out);
  return launch_status("lowra matmul kernel (generic)");
}

}  // namespace lowra
