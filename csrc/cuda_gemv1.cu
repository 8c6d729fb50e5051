// Batch-1 GEMV (one activation row: the decode step), y = W x, never materializing W.
//
// Each CTA (16 warps, one per SM) owns one K split of at most 8192 columns and first builds two tables of that
// split's activations in shared memory:
//   - for every 4 consecutive columns, the 16 sums of their subsets (entry e = sum of x_i over the set bits i of e).
//     A 1-bit row's 4 columns then cost one lookup, since its codebook is affine in the code:
//     sum_j x_j cb[b_j] = c0 * sum_j x_j + (c1 - c0) * sum_{b_j = 1} x_j;
//   - the activations as float32, for the 2- and 4-bit rows.
// Warps then take tasks of R rows over the whole split with no CTA-wide synchronization (the multi-row kernel in
// cuda_gemv.cu spends much of its time in its per-task barriers): every CTA owns an equal share of every
// precision, and its warps take their next task from a shared counter, costliest first. Lane l covers columns
// 32 l .. 32 l + 31 of every 1024-column step: one 4-, 8- or 16-byte code load per row and step, all in one absmax
// block (blocksize >= 32).
// Per 4 columns: 1 bit, one lookup and an add; 2 bit, two lookups in the row's 16-entry table of code pairs (half2)
// and four FMAs; 4 bit, four lookups in the row's codebook and four FMAs. A byte permute (PRMT) turns a code byte
// into the address of its entry (the row tables are 256-byte aligned), and both activation tables keep lane l's
// entries in bank l, so no lookup conflicts. 1- and 2-bit rows load a step ahead (kDepth).
//
// Wide steps (WIDE; rows grouped by precision with 1- or 2-bit rows, at least kL1WideTasks tasks per warp, blocksize
// >= 64): warps of one precision load 16 bytes of codes per row and lane at a time, four (1 bit) or two (2 bit) times
// the bytes in flight of 1024-column steps, whose loads alone held the kernel near 35 us on 28672x8192 (ablations,
// sixteenth round; ncu, eighteenth: the loads stall on latency, the decode is most of the instructions).
//   - 1-bit rows go in 4096-column steps, lane l on columns 128 l .. 128 l + 127; the subset sums are laid out for
//     them (mixed warps, still in 1024-column steps, read them with 4-way bank conflicts);
//   - 2-bit rows go in 2048-column steps on a third table, the activations as float16 pairs scaled by a power of
//     two (max |x'| in [2^7, 2^8)): a pair lookup times an activation pair is one HFMA2, summed in float16 over a
//     16-column word (8 products per half), then in float32. CPU emulation (bf16 and fp16 x with outlier columns,
//     8192 columns): 5e-4 relative error, against 1e-7 in float32 sums; bf16 outputs round at ~2e-3. Codebooks
//     beyond +-kL1H16MaxCode (or NaN) take the float32 path.
// Per weight, the step loops execute 1.38 (1 bit) and 2.51 (2 bit) instructions instead of 1.77 and 4.13 (make
// sass). The third table and the wide layout cost 1.2-1.9 us more table building per launch (H200, nineteenth
// round), which only layers with several tasks per warp earn back: H200, m = 1, 1.75 bits, us, narrow -> wide:
// 28672x8192 41.4 -> 37.7 (double-quantized scales 44.9 -> 38.4), 8192x28672 43.9 -> 40.8 (46.1 -> 43.3), but
// 4096x4096 8.3 -> 9.6, 4096x11008 17.9 -> 20.9, 11008x4096 16.5 -> 17.4, and all-4-bit layers 4-14% slower.
// Taken automatically for layers of 2^24 (16.8M) weights or more; smaller ones keep the multi-row kernel (unmeasured).
//
// K splits write float32 partial sums that gemv_finalize adds in split order; rows whose metadata does not fit
// are skipped (left unwritten) and counted, as in the other kernels.
#include <mutex>

#include "cuda_gemv.cuh"

namespace lowra {
namespace gv {
namespace {

constexpr int kL1Threads = 512;
constexpr int kL1Warps = kL1Threads / 32;
constexpr int kL1Step = 1024;       // columns per warp step (32 lanes x 32 columns)
constexpr int kL1MaxSteps = 8;      // steps per K split (20 bytes of tables per column: ~165 KB)
constexpr int kL1LutStep = 16384;   // bytes of subset sums per step: 8 groups x 16 sums x 32 lanes x 4 bytes
constexpr int kL1Wide = 4096;       // columns per wide step (32 lanes x 128 columns)
constexpr int kL1LutWide = 4 * kL1LutStep;
constexpr int kL1XStep = kL1Step * 4;
constexpr int kL1HStep = kL1Step * 2;  // bytes of float16 activation pairs per step
constexpr float kL1H16MaxCode = 16.f;  // 2-bit codebooks beyond +-16 take the float32 path: 8 products < 2^15
constexpr int kL1TabBytes = 256;    // per row: 16 code pairs (2 bit) or the 16-entry codebook (4 bit)
constexpr int kL1WideTasks = 3;     // wide steps from this many tasks per warp (measured: ~1 lost, 3.4-3.9 won)

// The sizes in bytes of a CTA's shared tables with nsteps steps, in their order from the 2048-byte aligned start:
// subset sums (per wide step of 4 steps when wide), activations, lane sums, the float16 pairs (wide only). The
// host sizes the allocation and the kernel places its tables by these same figures.
struct L1Layout {
  int lut, xs, sx, xh;
};
__host__ __device__ constexpr L1Layout l1_layout(int nsteps, bool wide) {
  const int nwide = (nsteps + 3) / 4;
  return {wide ? nwide * kL1LutWide : nsteps * kL1LutStep, nsteps * kL1XStep, wide ? nwide * 512 : nsteps * 128,
          wide ? (nsteps + 1) / 2 * 2 * kL1HStep : 0};
}
// 2048 bytes to align the subset sums, 256 to align the warps' row tables after the other tables.
constexpr size_t smem_bytes(int nsteps, int r, bool wide) {
  const L1Layout l = l1_layout(nsteps, wide);
  return 2048 + (size_t)l.lut + l.xs + l.sx + l.xh + 256 + (size_t)kL1Warps * r * kL1TabBytes;
}
constexpr size_t kL1MaxSmem = smem_bytes(kL1MaxSteps, 4, true);

int g_batch1 = 0;  // 0: automatic; -1: never (the multi-row kernel serves m = 1); 2 or 4: rows per task
int g_wide = 0;    // 0: automatic; 1: wide steps wherever they apply; -1: never

// A warp task's rows, known to every lane.
template <int R>
struct L1Rows {
  uint32_t code[R];   // byte offset in `packed` of the row's codes at this lane's first column of the split
  int32_t am[R];      // index of the row's scale at this lane's first column of the split
  int bits[R];        // 0: nothing to compute (past the end, or metadata that does not fit)
  bool h16;           // every 2-bit row's codebook within +-kL1H16MaxCode (float16 sums cannot overflow)
  float c0[R], dl[R]; // 1 bit: codebook entry 0, entry 1 - entry 0
  int32_t row;        // lane j < R: row j (-1: none), which this lane writes at the end
};

__device__ __forceinline__ float4 lds_f32x4(uint32_t addr) {
  float4 v;
  asm volatile("ld.shared.v4.f32 {%0,%1,%2,%3}, [%4];" : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w) : "r"(addr));
  return v;
}

// Address of the entry a code byte selects: byte k of `codes` (entry index x entry size) as the low byte of a
// 256-byte-aligned table's address.
template <int K>
__device__ __forceinline__ uint32_t entry(uint32_t codes, uint32_t tab) {
  return __byte_perm(codes, tab, 0x7650u | K);
}

// The split's tables: subset sums [step][group j][entry e][lane] (WIDE: [wide step S][group g][entry e][wide lane
// l'], columns 4096 S + 128 l' + 4 g .. + 3) and activations [step][j][lane][4] (columns 1024 st + 32 lane + 4 j ..
// + 3), both float32, then the lanes' sums of their 32 columns [step][lane] (WIDE: of each 32-column word [S][word
// w][l'], columns 4096 S + 128 l' + 32 w .. + 31) and, WIDE only, the activations as scaled float16 pairs
// [2048-column step S2][word k][half i][l'][4 pairs] (columns 2048 S2 + 64 l' + 16 k + 8 i .. + 7). Returns the
// float16 pairs' inverse scale.
template <typename T, bool WIDE>
__device__ __forceinline__ float build_tables(const GvArgs& a, int64_t k0, int klen, int nsteps, float* lut,
                                              float4* xs, float* sx, uint2* xh) {
  __shared__ float wmax[kL1Warps];
  const T* A = static_cast<const T*>(a.A) + k0;
  float mx = 0.f;
  const int nwide = (nsteps + 3) / 4;
  // Consecutive threads take consecutive lanes (WIDE: wide lanes): the subset sums' stores are conflict-free (WIDE:
  // the activations' float4 stores, one in 17 stores, have 4-way conflicts).
  for (int it = threadIdx.x; it < (WIDE ? nwide * 1024 : nsteps * 256); it += kL1Threads) {
    int c, st, l, j, t0;
    if constexpr (WIDE) {
      const int lw = it & 31, gw = (it >> 5) & 31, sw = it >> 10;
      c = sw * kL1Wide + 128 * lw + 4 * gw;
      st = c >> 10, l = (c >> 5) & 31, j = (c >> 2) & 7;
      t0 = (sw * 32 + gw) * 16 * 32 + lw;
    } else {
      l = it & 31, j = (it >> 5) & 7, st = it >> 8;
      c = st * kL1Step + 32 * l + 4 * j;
      t0 = (st * 8 + j) * 16 * 32 + l;
    }
    float e[16];
    e[0] = e[1] = e[2] = e[4] = e[8] = 0.f;
    if (c < klen) {
      const uint2 u = __ldg(reinterpret_cast<const uint2*>(A + c));
      const float2 lo = Cvt<T>::f2(u.x), hi = Cvt<T>::f2(u.y);
      e[1] = lo.x, e[2] = lo.y, e[4] = hi.x, e[8] = hi.y;
    }
    if (!WIDE || st < nsteps) xs[(st * 8 + j) * 32 + l] = make_float4(e[1], e[2], e[4], e[8]);
    if constexpr (WIDE) mx = fmaxf(mx, fmaxf(fmaxf(fabsf(e[1]), fabsf(e[2])), fmaxf(fabsf(e[4]), fabsf(e[8]))));
    e[3] = e[1] + e[2];
#pragma unroll
    for (int i = 5; i < 8; ++i) e[i] = e[4] + e[i - 4];
#pragma unroll
    for (int i = 9; i < 16; ++i) e[i] = e[8] + e[i - 8];
#pragma unroll
    for (int k = 0; k < 16; ++k) lut[t0 + 32 * k] = e[k];
  }
  if constexpr (WIDE) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(kFull, mx, o));
    if ((threadIdx.x & 31) == 0) wmax[threadIdx.x >> 5] = mx;
  }
  __syncthreads();
  // (narrow: i = step * 32 + lane; WIDE: i = (S * 4 + w) * 32 + l'; either way 8 groups of 16 entries per row of 32)
  for (int i = threadIdx.x; i < (WIDE ? nwide * 128 : nsteps * 32); i += kL1Threads) {
    const float* t = lut + (i >> 5) * 8 * 16 * 32 + 15 * 32 + (i & 31);
    float v = 0.f;
#pragma unroll
    for (int j = 0; j < 8; ++j) v += t[j * 16 * 32];
    sx[i] = v;
  }
  if constexpr (!WIDE) {
    __syncthreads();
    return 1.f;
  }
  // The float16 pairs: x 2^s with max |x 2^s| in [2^7, 2^8) (s from max |x|'s exponent; both powers of two normal,
  // so the scaling is exact wherever x 2^s stays a normal float16)
  mx = 0.f;
#pragma unroll
  for (int w = 0; w < kL1Warps; ++w) mx = fmaxf(mx, wmax[w]);
  const int e = min(max(134 - (int)((__float_as_uint(mx) >> 23) & 0xffu) + 127, 1), 253);  // biased exponent of 2^s
  const float sf = __uint_as_float((uint32_t)e << 23), inv = __uint_as_float((uint32_t)(254 - e) << 23);
  for (int g = threadIdx.x; g < nsteps * 256; g += kL1Threads) {
    const int l = g & 31, j = (g >> 5) & 7, st = g >> 8;
    const float4 v = xs[(st * 8 + j) * 32 + l];
    const __half2 lo = __floats2half2_rn(v.x * sf, v.y * sf), hi = __floats2half2_rn(v.z * sf, v.w * sf);
    const int c = st * kL1Step + 32 * l + 4 * j, n = (c & 15) >> 1;  // n: the first pair's index in its word
    const int byte = (c >> 11) * 2 * kL1HStep + ((((c & 63) >> 4) * 2 + (n >> 2)) * 32 + ((c & 2047) >> 6)) * 16;
    xh[byte / 8 + ((n & 3) >> 1)] =
        make_uint2(*reinterpret_cast<const uint32_t*>(&lo), *reinterpret_cast<const uint32_t*>(&hi));
  }
  __syncthreads();
  return inv;
}

// Row metadata of a task (lanes 0..R-1 look up one row each: task_row, then load_row), loaded one task ahead; the
// rows' codebooks follow once the metadata has landed (load_codebooks, after the current task's first step).
struct L1Pre {
  uint32_t off;  // 32 bits: the plan checks the sizes
  int32_t row, bits;
  uint32_t cb;  // lane l: entries 2 (l & 7), 2 (l & 7) + 1 of row l >> 3's codebook (two halves)
};

// The row of task `task` that lane < R looks up (kNoRow: none; row_order's entries, int32, are checked by load_row).
constexpr int64_t kNoRow = INT64_MIN;

template <int R>
__device__ __forceinline__ int64_t task_row(const GvArgs& a, int task, int lane) {
  const int64_t pos = (int64_t)task * R + lane;
  if (lane >= R || task >= a.ngroups || pos >= a.rows) return kNoRow;
  return a.row_order ? (int64_t)a.row_order[pos] : pos;
}

template <int R>
__device__ __forceinline__ L1Pre load_row(const GvArgs& a, int64_t r, int s, int lane) {
  L1Pre p{0, 0, 0, 0u};
  if (r == kNoRow) return p;
  int b = 0;
  int64_t off = 0;
  if (!gv_row_ok(a, r, &b, &off)) {
    if (s == 0) count_skipped_row();  // counted in the first K split only
    return p;
  }
  p.off = (uint32_t)off;
  p.row = (int32_t)r;
  p.bits = b;
  return p;
}

template <int R>
__device__ __forceinline__ void load_codebooks(const GvArgs& a, L1Pre& p, int lane) {
  const int j = lane >> 3;
  const int b = __shfl_sync(kFull, p.bits, j & (R - 1));
  const int32_t r = __shfl_sync(kFull, p.row, j & (R - 1));
  if (j < R && b) {
    const uint16_t* c = a.codebook + (int64_t)r * kCodebookSlots + 2 * (lane & 7);
    p.cb = (uint32_t)__ldg(c) | (uint32_t)__ldg(c + 1) << 16;
  }
}

// Broadcasts the task's rows and writes their decode tables into the warp's slots (`tab`, 256 bytes per row).
template <int R, bool WIDE>
__device__ __forceinline__ void setup_rows(const GvArgs& a, const L1Pre& p, int64_t k0, int lane, float* tab,
                                           L1Rows<R>& rw) {
  __syncwarp();  // the previous task's lookups are done
  rw.row = p.bits ? p.row : -1;
  rw.h16 = true;
#pragma unroll
  for (int j = 0; j < R; ++j) {
    const int b = __shfl_sync(kFull, p.bits, j);
    const int32_t r = __shfl_sync(kFull, p.row, j);
    const uint32_t off = __shfl_sync(kFull, p.off, j);
    rw.bits[j] = b;
    rw.code[j] = (uint32_t)(off + ((k0 + 32 * lane) * b >> 3));  // 32 bits: the plan checks the sizes
    rw.am[j] = (int32_t)((int64_t)r * a.nb + ((k0 + 32 * lane) >> a.bs_shift));
    const uint32_t two = __shfl_sync(kFull, p.cb, 8 * j + ((lane >> 1) & 7));
    const float v = b && lane < 16 ? half_bits_to_float((uint16_t)(two >> (16 * (lane & 1)))) : 0.f;
    rw.c0[j] = __shfl_sync(kFull, v, 0);
    rw.dl[j] = __shfl_sync(kFull, v, 1) - rw.c0[j];
    if constexpr (WIDE)  // false for NaN entries too
      rw.h16 &= __all_sync(kFull, b != 2 || lane >= 4 || fabsf(v) <= kL1H16MaxCode);
    const float first = __shfl_sync(kFull, v, lane & 3), second = __shfl_sync(kFull, v, (lane >> 2) & 3);
    if (lane < 16) {  // 2 bit: entry n = c_first | c_second << 2 -> (cb[n & 3], cb[n >> 2])
      if (b == 2) reinterpret_cast<__half2*>(tab + j * (kL1TabBytes / 4))[lane] = __floats2half2_rn(first, second);
      else if (b == 4) tab[j * (kL1TabBytes / 4) + lane] = v;
    }
  }
  __syncwarp();
}

// A step's loads for a warp's R rows (lane: 32 columns from split column cl): the codes (P words per row; P = the
// rows' common precision, or 0 for a mix, then 4 words and a warp-uniform branch per row) and the block scales.
template <int R, int P, bool NESTED>
struct L1Loads {
  static constexpr int W = P == 0 ? 4 : P;
  uint32_t q[R][W];
  float am[R];
  AbsmaxRaw ar[NESTED ? R : 1];
};

template <int R, int P, bool NESTED>
__device__ __forceinline__ void issue_step(const GvArgs& a, const L1Rows<R>& rw, int st, int cl, int klen,
                                           L1Loads<R, P, NESTED>& d) {
  constexpr int W = L1Loads<R, P, NESTED>::W;
#pragma unroll
  for (int j = 0; j < R; ++j) {
    const int b = P ? P : rw.bits[j];
    // A skipped slot is never computed with, yet dropping these zeroings measured 5-10% slower (thirteenth round)
#pragma unroll
    for (int i = 0; i < W; ++i) d.q[j][i] = 0u;
    d.am[j] = 0.f;
    if constexpr (NESTED) d.ar[j] = AbsmaxRaw{0.f, 0u};
    if ((P || b) && cl < klen) {
      const uint8_t* p = a.packed + (rw.code[j] + st * (128 * b));
      if (b == 1) {
        d.q[j][0] = ld_cs32(p);
      } else if (b == 2) {
        const uint2 v = ld_cs64(p);
        d.q[j][0] = v.x;
        d.q[j][W > 1 ? 1 : 0] = v.y;
      } else {
        const uint4 v = ld_cs128(p);
        d.q[j][0] = v.x;
        if (W > 3) d.q[j][W > 3 ? 1 : 0] = v.y, d.q[j][W > 3 ? 2 : 0] = v.z, d.q[j][W > 3 ? 3 : 0] = v.w;
      }
      const int ai = rw.am[j] + ((st * kL1Step) >> a.bs_shift);
      if constexpr (NESTED) d.ar[j] = nested_issue(a.am, ai);
      else d.am[j] = __ldg(a.am.f32 + ai);
    }
  }
}

// One 32-column code word of a 1-bit row: the subset sums of its 8 groups (lut: this step and lane; group g,
// columns 4g..4g+3, at lut + g * 2048 + e * 128) and the row's value am * (c0 * sum x + (c1 - c0) * sum_{b=1} x).
// Addresses by byte permute (8% fewer instructions in the 1-bit loop) measured level: the kernel is co-limited by its
// loads and its decode, each near 35 us alone on 28672x8192 (ablations, sixteenth round), not by issue alone.
__device__ __forceinline__ float word1(uint32_t w, uint32_t lut, float am, float c0, float dl, float sxl, float acc) {
  float m0 = lds_f32(lut | ((w << 7) & 0x780u));
  float m1 = lds_f32((lut | ((w << 3) & 0x780u)) + 2048);
  m0 += lds_f32((lut | ((w >> 1) & 0x780u)) + 4096);
  m1 += lds_f32((lut | ((w >> 5) & 0x780u)) + 6144);
  m0 += lds_f32((lut | ((w >> 9) & 0x780u)) + 8192);
  m1 += lds_f32((lut | ((w >> 13) & 0x780u)) + 10240);
  m0 += lds_f32((lut | ((w >> 17) & 0x780u)) + 12288);
  m1 += lds_f32((lut | ((w >> 21) & 0x780u)) + 14336);
  return fmaf(am * c0, sxl, fmaf(am * dl, m0 + m1, acc));
}

// The 8 table entries selected by a word's nibbles, in nibble order: even nibbles from the bytes of `ev`, odd ones
// from `od` (each byte = nibble x entry size), table t.
__device__ __forceinline__ void lds_entry(uint32_t addr, float& v) { v = lds_f32(addr); }
struct H2 {
  uint32_t u;  // a half2 entry: two float16 codebook values, converted where used
};
__device__ __forceinline__ void lds_entry(uint32_t addr, H2& v) { v.u = __float_as_uint(lds_f32(addr)); }
template <typename V>
__device__ __forceinline__ void lookup8(uint32_t ev, uint32_t od, uint32_t t, V (&v)[8]) {
  lds_entry(entry<0>(ev, t), v[0]), lds_entry(entry<0>(od, t), v[1]);
  lds_entry(entry<1>(ev, t), v[2]), lds_entry(entry<1>(od, t), v[3]);
  lds_entry(entry<2>(ev, t), v[4]), lds_entry(entry<2>(od, t), v[5]);
  lds_entry(entry<3>(ev, t), v[6]), lds_entry(entry<3>(od, t), v[7]);
}

// One word of a 2-bit row (16 columns; nibble n = columns 2n, 2n+1) against x[0..15], through the row's pair
// table t: partial sums p0 (even columns), p1 (odd). The pairs are half2, not float2: a 64-bit lookup costs two
// shared-memory wavefronts, which made 2-bit rows as costly in wavefronts as 4-bit ones. H200, m = 1, 1.75 bits,
// alternated with float2 pairs (sixteenth round): 28672x8192 42.4 -> 41.0 us, 8192x28672 45.9 -> 43.7. Activations
// stored as 16-bit pairs too (half their wavefronts) measured level.
__device__ __forceinline__ void word2(uint32_t w, uint32_t t, const float* x, float& p0, float& p1) {
  H2 h[8];
  lookup8((w << 2) & 0x3c3c3c3cu, (w >> 2) & 0x3c3c3c3cu, t, h);  // nibbles 2i / 2i+1, x 4 bytes
#pragma unroll
  for (int n = 0; n < 8; ++n) {
    const float2 f = Cvt<__half>::f2(h[n].u);  // exact: the entries are float16 codebook values
    p0 = fmaf(f.x, x[2 * n], p0);
    p1 = fmaf(f.y, x[2 * n + 1], p1);
  }
}

// One word of a 2-bit row as word2, against the word's 8 scaled float16 activation pairs xp: each pair entry times
// its activation pair is one HFMA2, summed in float16 over the word, then added to p0, p1 in float32 (the table
// entries are the row's float16 codebook values, exact; the caller keeps them within +-kL1H16MaxCode).
__device__ __forceinline__ void word2h(uint32_t w, uint32_t t, const uint32_t (&xp)[8], float& p0, float& p1) {
  H2 h[8];
  lookup8((w << 2) & 0x3c3c3c3cu, (w >> 2) & 0x3c3c3c3cu, t, h);  // nibbles 2i / 2i+1, x 4 bytes
  auto h2 = [](uint32_t u) { return *reinterpret_cast<const __half2*>(&u); };
  __half2 sum = __hmul2(h2(h[0].u), h2(xp[0]));
#pragma unroll
  for (int n = 1; n < 8; ++n) sum = __hfma2(h2(h[n].u), h2(xp[n]), sum);
  const float2 f = __half22float2(sum);
  p0 += f.x;
  p1 += f.y;
}

// One word of a 4-bit row (8 columns; nibble n = column n) against x[0..7], through the row's codebook t.
__device__ __forceinline__ void word4(uint32_t w, uint32_t t, const float* x, float& p0, float& p1) {
  float v[8];
  lookup8((w << 2) & 0x3c3c3c3cu, (w >> 2) & 0x3c3c3c3cu, t, v);  // nibbles 2i / 2i+1, x 4 bytes
#pragma unroll
  for (int n = 0; n < 8; n += 2) {
    p0 = fmaf(v[n], x[n], p0);
    p1 = fmaf(v[n + 1], x[n + 1], p1);
  }
}

// The activations of columns 4 i0 .. 4 (i0 + n) - 1 of this lane's 32 (xs: this step and lane).
template <int N>
__device__ __forceinline__ void load_x(uint32_t xs, int i0, float* x) {
#pragma unroll
  for (int i = 0; i < N; ++i) {
    const float4 v = lds_f32x4(xs + (i0 + i) * 512);
    x[4 * i] = v.x, x[4 * i + 1] = v.y, x[4 * i + 2] = v.z, x[4 * i + 3] = v.w;
  }
}

// One 1024-column step on loads `d` (lut / xs / sx: this step's and lane's table addresses; tab: the warp's row
// tables). Rows of one precision go word by word, all rows per word, so that only one word's activations are
// live; a mixed warp goes row by row.
template <int R, int P, bool NESTED>
__device__ __forceinline__ void compute_step(const GvArgs& a, const L1Rows<R>& rw, L1Loads<R, P, NESTED>& d,
                                             uint32_t lut, uint32_t xs, uint32_t sx, uint32_t tab, float (&acc)[R]) {
  auto& q = d.q;
  auto& am = d.am;
  if constexpr (NESTED) {
#pragma unroll
    for (int j = 0; j < R; ++j)
      if (P || rw.bits[j]) am[j] = nested_finish(a.am, d.ar[j]);
  }
  if constexpr (P == 1) {
    const float sxl = lds_f32(sx);
#pragma unroll
    for (int j = 0; j < R; ++j) acc[j] = word1(q[j][0], lut, am[j], rw.c0[j], rw.dl[j], sxl, acc[j]);
  } else if constexpr (P == 2 || P == 4) {
    constexpr int kCols = 32 / P;  // columns per code word
    float p0[R], p1[R];
#pragma unroll
    for (int j = 0; j < R; ++j) p0[j] = p1[j] = 0.f;
#pragma unroll
    for (int k = 0; k < P; ++k) {
      float x[kCols];
      load_x<kCols / 4>(xs, k * kCols / 4, x);
#pragma unroll
      for (int j = 0; j < R; ++j) {
        if constexpr (P == 2) word2(q[j][k], tab + j * kL1TabBytes, x, p0[j], p1[j]);
        else word4(q[j][k], tab + j * kL1TabBytes, x, p0[j], p1[j]);
      }
    }
#pragma unroll
    for (int j = 0; j < R; ++j) acc[j] = fmaf(am[j], p0[j] + p1[j], acc[j]);
  } else {
    float x[32];
    load_x<8>(xs, 0, x);
    const float sxl = lds_f32(sx);
#pragma unroll
    for (int j = 0; j < R; ++j) {
      const int b = rw.bits[j];
      const uint32_t t = tab + j * kL1TabBytes;
      float p0 = 0.f, p1 = 0.f;
      if (b == 1) {
        acc[j] = word1(q[j][0], lut, am[j], rw.c0[j], rw.dl[j], sxl, acc[j]);
      } else if (b == 2) {
        word2(q[j][0], t, x, p0, p1);
        word2(q[j][1], t, x + 16, p0, p1);
        acc[j] = fmaf(am[j], p0 + p1, acc[j]);
      } else if (b == 4) {
#pragma unroll
        for (int k = 0; k < 4; ++k) word4(q[j][k], t, x + 8 * k, p0, p1);
        acc[j] = fmaf(am[j], p0 + p1, acc[j]);
      }
    }
  }
}

// Steps of loads in the ring: 2 for 1- and 2-bit rows (the step computed and the next), 1 for 4-bit and mixed rows
// (each step loaded just before it). The ring shifts by register moves, and a move waits for its load: the loads
// must land within the step computed after they are issued whatever the depth (SASS: the moves of the previous
// iteration's loads open the loop body), so a third slot only costs registers and moves. H200, m = 1, us (1.75 bits
// on 28672x8192 / 8192x28672; all rows 4-bit; 1.75 bits on double-quantized scales), libraries alternated in one
// call, means of two runs: 1-bit rows at depth 3 (before) 42.4 / 46.4, 65.5 / 62.5, 45.4 / 47.7; at depth 2
// 42.4 / 46.0, 63.8 / 61.6, 44.9 / 47.4; at depth 1 (next call: 43.7 / 46.9 against 42.7 / 46.3 at 2) the loads
// wait. 4-bit rows at depth 2 too: 4-bit 61.0 / 58.9, but the 1.75-bit mix 43.6 / 44.8 (+2.5% on the larger
// layer), and double-quantized scales then spill (53.7 / 52.9; 44.9 / 47.5 with those kept at depth 1). Eighth
// session: 3 / 1 / 1 44.6 / 46.4, 4 / 2 / 1 42.9 / 47.0; a ring unrolled by its depth (no moves, one copy of the
// step body per slot) measured slower at every depth (47.0 at 3 / 1 / 1).
template <int P>
constexpr int kDepth = P == 1 || P == 2 ? 2 : 1;

// A task's steps, through a ring of kDepth<P> steps of loads. After the first step, the next task's metadata
// (`pre`, loaded before it) has landed: its codebooks are loaded then.
template <int R, int P, bool NESTED, bool WIDE>
__device__ __forceinline__ void run_steps(const GvArgs& a, const L1Rows<R>& rw, int klen, int nsteps, int lane,
                                          uint32_t lut, uint32_t xs, uint32_t sx, uint32_t tab, float (&acc)[R],
                                          L1Pre& pre) {
  constexpr int D = kDepth<P>;
  L1Loads<R, P, NESTED> ring[D];
#pragma unroll
  for (int i = 0; i < D - 1; ++i)
    if (i < nsteps) issue_step<R, P, NESTED>(a, rw, i, i * kL1Step + 32 * lane, klen, ring[i]);
#pragma unroll 1
  for (int st = 0; st < nsteps; ++st) {
    const int cl = st * kL1Step + 32 * lane;
    if (st + D - 1 < nsteps) issue_step<R, P, NESTED>(a, rw, st + D - 1, cl + (D - 1) * kL1Step, klen, ring[D - 1]);
    // this step's and lane's subset sums and lane sums (WIDE, in the wide layout of build_tables: wide lane
    // 8 (st % 4) + lane / 4, groups from 8 (lane % 4), word lane % 4)
    const uint32_t lw = 4 * (8 * (st & 3) + (lane >> 2));
    const uint32_t lut_st =
        WIDE ? lut + (st >> 2) * kL1LutWide + (lane & 3) * 16384 + lw : lut + st * kL1LutStep + 4 * lane;
    const uint32_t sx_st = WIDE ? sx + ((st >> 2) * 4 + (lane & 3)) * 128 + lw : sx + st * 128 + 4 * lane;
    if (cl < klen)  // false only in the last step of a split whose columns are not a multiple of 1024
      compute_step<R, P, NESTED>(a, rw, ring[0], lut_st, xs + st * kL1XStep + 16 * lane, sx_st, tab, acc);
    if (st == 0) load_codebooks<R>(a, pre, lane);
#pragma unroll
    for (int i = 0; i < D - 1; ++i) ring[i] = ring[i + 1];
  }
}

// Wide steps of P-bit rows (P = 1 or 2, blocksize >= 64): lane l covers columns kWideCols<P> l .. of each step of
// 32 kWideCols<P> columns (kL1Wide for 1 bit, half that for 2), 16 bytes of codes per row (words 0-3).
template <int P>
constexpr int kWideCols = (P == 1 ? kL1Wide : kL1Wide / 2) / 32;

// A wide step's loads for R rows: the codes, and the scales of each 64 columns (one block at least) as loaded.
template <int R, int P>
struct L1Wide {
  uint4 q[R];
  AbsmaxRaw ar[R][kWideCols<P> / 64];
};

template <int R, int P, bool NESTED>
__device__ __forceinline__ void issue_wide(const GvArgs& a, const L1Rows<R>& rw, const int32_t (&amrow)[R], int64_t k0,
                                           int sw, int klen, int lane, L1Wide<R, P>& d) {
  constexpr int kCols = kWideCols<P>, kH = kCols / 64;
  const int cw = sw * 32 * kCols + kCols * lane;  // the lane's first column in the split
#pragma unroll
  for (int j = 0; j < R; ++j) {
    d.q[j] = make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
    for (int h = 0; h < kH; ++h) d.ar[j][h] = AbsmaxRaw{0.f, 0u};
    if (rw.bits[j] && cw < klen) {
      // rw.code[j]: the row's codes at column 32 lane of the split
      d.q[j] = ld_cs128(a.packed + (rw.code[j] + (kCols - 32) * P / 8 * lane + sw * (32 * kCols * P / 8)));
#pragma unroll
      for (int h = 0; h < kH; ++h) {
        const int32_t ai = amrow[j] + (int32_t)((k0 + cw + 64 * h) >> a.bs_shift);
        if constexpr (NESTED) d.ar[j][h] = nested_issue(a.am, ai);
        else d.ar[j][h] = AbsmaxRaw{__ldg(a.am.f32 + ai), 0u};
      }
    }
  }
}

// 1 bit: t0 = lut, t1 = sx (this wide step's and lane's subset sums and word sums); word w uses the scale of its
// 64-column half.
// 2 bit: t0 = xh (this step's and lane's float16 pairs), t1 = tab (the warp's row tables); the sums are in units of
// the pairs' scale 2^s.
template <int R, int P, bool NESTED>
__device__ __forceinline__ void compute_wide(const GvArgs& a, const L1Rows<R>& rw, const L1Wide<R, P>& d, uint32_t t0,
                                             uint32_t t1, float (&acc)[R]) {
  constexpr int kH = kWideCols<P> / 64;
  auto word = [&](int j, int k) { return k == 0 ? d.q[j].x : k == 1 ? d.q[j].y : k == 2 ? d.q[j].z : d.q[j].w; };
  float am[R][kH];
#pragma unroll
  for (int j = 0; j < R; ++j)
#pragma unroll
    for (int h = 0; h < kH; ++h) am[j][h] = NESTED && rw.bits[j] ? nested_finish(a.am, d.ar[j][h]) : d.ar[j][h].v;
  if constexpr (P == 1) {
#pragma unroll
    for (int w = 0; w < 4; ++w) {
      const float sxl = lds_f32(t1 + w * 128);
#pragma unroll
      for (int j = 0; j < R; ++j)
        acc[j] = word1(word(j, w), t0 + w * 16384, am[j][w >> 1], rw.c0[j], rw.dl[j], sxl, acc[j]);
    }
  } else {
    float p0[R], p1[R];
#pragma unroll
    for (int j = 0; j < R; ++j) p0[j] = p1[j] = 0.f;
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      uint32_t xp[8];
      asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(xp[0]), "=r"(xp[1]), "=r"(xp[2]), "=r"(xp[3])
                   : "r"(t0 + k * 1024));
      asm volatile("ld.shared.v4.u32 {%0,%1,%2,%3}, [%4];" : "=r"(xp[4]), "=r"(xp[5]), "=r"(xp[6]), "=r"(xp[7])
                   : "r"(t0 + k * 1024 + 512));
#pragma unroll
      for (int j = 0; j < R; ++j) word2h(word(j, k), t1 + j * kL1TabBytes, xp, p0[j], p1[j]);
    }
#pragma unroll
    for (int j = 0; j < R; ++j) acc[j] = fmaf(am[j][0], p0[j] + p1[j], acc[j]);
  }
}

// A task of P-bit rows in wide steps (2 bit: codebooks within +-kL1H16MaxCode; its sums come out scaled by 2^s, which
// the caller undoes), through a ring of two steps of loads; one for 1-bit rows on double-quantized scales (a second
// step's raw scales spilled: 72 bytes, some inside the 4-bit step loop).
template <int R, int P, bool NESTED>
__device__ __forceinline__ void run_wide(const GvArgs& a, const L1Rows<R>& rw, int64_t k0, int klen, int lane,
                                         uint32_t lut, uint32_t sx, uint32_t xh, uint32_t tab, float (&acc)[R],
                                         L1Pre& pre) {
  constexpr int kCols = kWideCols<P>, kStep = 32 * kCols, D = P == 1 && NESTED ? 1 : 2;
  const int nw = (klen + kStep - 1) / kStep;
  int32_t amrow[R];  // the rows' first scale index
#pragma unroll
  for (int j = 0; j < R; ++j) amrow[j] = rw.am[j] - (int32_t)((k0 + 32 * lane) >> a.bs_shift);
  L1Wide<R, P> ring[D];
  if (D > 1) issue_wide<R, P, NESTED>(a, rw, amrow, k0, 0, klen, lane, ring[0]);
#pragma unroll 1
  for (int sw = 0; sw < nw; ++sw) {
    if (sw + D - 1 < nw) issue_wide<R, P, NESTED>(a, rw, amrow, k0, sw + D - 1, klen, lane, ring[D - 1]);
    if (sw * kStep + kCols * lane < klen) {
      if constexpr (P == 1)
        compute_wide<R, P, NESTED>(a, rw, ring[0], lut + sw * kL1LutWide + 4 * lane, sx + sw * 512 + 4 * lane, acc);
      else
        compute_wide<R, P, NESTED>(a, rw, ring[0], xh + sw * 2 * kL1HStep + 16 * lane, tab, acc);
    }
    if (sw == 0) load_codebooks<R>(a, pre, lane);
#pragma unroll
    for (int i = 0; i < D - 1; ++i) ring[i] = ring[i + 1];
  }
}

template <typename T, int R, bool NESTED, bool WIDE>
__global__ void __launch_bounds__(kL1Threads, 1) gemv1_kernel(const __grid_constant__ GvArgs a) {
  extern __shared__ __align__(16) unsigned char smem[];
  griddep_launch_dependents();  // the finalize pass (K splits) may launch now; it waits for this grid to finish
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int s = blockIdx.x % a.ks;  // this CTA's K split
  const int64_t k0 = (int64_t)s * a.krange;
  const int klen = (int)min(a.cols - k0, a.krange);
  const int nsteps = (klen + kL1Step - 1) / kL1Step;
  // shared addresses (l1_layout): subset sums (2048-byte aligned, so that lane | entry | group is one OR),
  // activations, lane sums, WIDE the float16 pairs, then the warps' row tables (256-byte aligned)
  const uint32_t base = (uint32_t)__cvta_generic_to_shared(smem);
  const uint32_t lut = (base + 2047u) & ~2047u;
  const L1Layout lay = l1_layout(nsteps, WIDE);
  const uint32_t xs = lut + lay.lut;
  const uint32_t sx = xs + lay.xs;
  const uint32_t xh = sx + lay.sx;
  const uint32_t tab = ((xh + lay.xh + 255u) & ~255u) + warp * R * kL1TabBytes;
  // This CTA's tasks are bi + nbs i (i = 0 .. n - 1): an equal share of every precision for every CTA. Its warps
  // take them through a shared counter, costliest first (rows are ordered 1, 2, then 4 bits: descending i), so
  // that warps finishing early take more and the last tasks taken are short. Static strides left up to a quarter
  // more work on some SMs than on others.
  __shared__ int taken;  // tasks handed out so far (each warp starts on task `warp`)
  const int ntasks = (int)a.ngroups, nbs = gridDim.x / a.ks, bi = blockIdx.x / a.ks;  // int: rows < 2^31
  const int n = ntasks > bi ? (ntasks - 1 - bi) / nbs + 1 : 0;
  auto task_at = [&](int j) { return j < n ? bi + nbs * (n - 1 - j) : ntasks; };
  if (threadIdx.x == 0) taken = kL1Warps;
  int task = task_at(warp);
  // The first task's row index loads beside the tables' activation loads; its bits, offset and codebook after them.
  // Checking the rows before the tables held the warps on three dependent loads first (twentieth round, m = 1: 1-4%
  // less time on four of the five benchmark layers, 11008x4096 at 4 bits 2.7% more). Batching build_tables'
  // activation loads, and issuing the first task's codebooks and an L2 prefetch of its first step before it,
  // measured level (fourteenth round; 11008x4096 alone gained 12% at 1.75 bits, 4-bit rows lost).
  const int64_t first = task_row<R>(a, task, lane);
  const float inv = build_tables<T, WIDE>(
      a, k0, klen, nsteps, reinterpret_cast<float*>(smem + (lut - base)), reinterpret_cast<float4*>(smem + (xs - base)),
      reinterpret_cast<float*>(smem + (sx - base)), reinterpret_cast<uint2*>(smem + (xh - base)));
  L1Pre pre = load_row<R>(a, first, s, lane);
  load_codebooks<R>(a, pre, lane);

  while (task < ntasks) {
    L1Rows<R> rw;
    setup_rows<R, WIDE>(a, pre, k0, lane, reinterpret_cast<float*>(smem + (tab - base)), rw);
    int got = 0;
    if (lane == 0) got = atomicAdd(&taken, 1);
    const int next = task_at(__shfl_sync(kFull, got, 0));
    pre = load_row<R>(a, task_row<R>(a, next, lane), s, lane);  // the next task's rows, used a task later
    int uni = rw.bits[0];
#pragma unroll
    for (int j = 1; j < R; ++j) uni = rw.bits[j] == uni ? uni : 0;
    float acc[R];
#pragma unroll
    for (int j = 0; j < R; ++j) acc[j] = 0.f;
    if (WIDE && uni == 1 && a.bs_shift >= 6) {
      run_wide<R, 1, NESTED>(a, rw, k0, klen, lane, lut, sx, xh, tab, acc, pre);
    } else if (uni == 1) {
      run_steps<R, 1, NESTED, WIDE>(a, rw, klen, nsteps, lane, lut, xs, sx, tab, acc, pre);
    } else if (WIDE && uni == 2 && rw.h16 && a.bs_shift >= 6) {
      run_wide<R, 2, NESTED>(a, rw, k0, klen, lane, lut, sx, xh, tab, acc, pre);
#pragma unroll
      for (int j = 0; j < R; ++j) acc[j] *= inv;  // the float16 pairs were scaled by 2^s
    } else if (uni == 2) {  // (WIDE: codebooks too large for float16 sums, or blocksize 32)
      run_steps<R, 2, NESTED, WIDE>(a, rw, klen, nsteps, lane, lut, xs, sx, tab, acc, pre);
    } else if (uni == 4) {
      run_steps<R, 4, NESTED, WIDE>(a, rw, klen, nsteps, lane, lut, xs, sx, tab, acc, pre);
    } else {
      run_steps<R, 0, NESTED, WIDE>(a, rw, klen, nsteps, lane, lut, xs, sx, tab, acc, pre);
    }
#pragma unroll
    for (int j = 0; j < R; ++j) {
      float v = acc[j];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
      if (lane == j && rw.row >= 0) {
        if (a.ks == 1) {
          if (a.bias) v += Cvt<T>::load(a.bias, rw.row);
          Cvt<T>::store(a.out, rw.row, v);
        } else {
          a.ws[(int64_t)s * a.rows + rw.row] = v;
        }
      }
    }
    task = next;
  }
}

using L1Fn = void (*)(const GvArgs);

template <typename T, int R, bool WIDE>
L1Fn pick(bool nested) {
  return nested ? gemv1_kernel<T, R, true, WIDE> : gemv1_kernel<T, R, false, WIDE>;
}
template <typename T>
L1Fn pick(int r, bool nested, bool wide) {
  if (wide) return r == 2 ? pick<T, 2, true>(nested) : pick<T, 4, true>(nested);
  return r == 2 ? pick<T, 2, false>(nested) : pick<T, 4, false>(nested);
}

// CTAs of a launch with ks K splits: one per SM, the same number on every split.
int grid_ctas(int ks) { return ks * (sm_count() / ks); }

// 4 rows per task, or 2 where 4 would leave fewer than 3 tasks per 4 warps. H200, m = 1, 1.75 bits (us, 4 / 2
// rows): 4096x4096 (0.48 tasks per warp at 4 rows) 10.3 / 8.3; 4096x11008 (0.97) 18.2 / 19.6; 11008x4096 (1.30)
// 16.5 / 17.4; 8192x8192 (0.97) 19.2 / 20.8. Extra K splits for small layers measured slower: each adds a
// finalize pass and shortens the tasks that hide the loads' latency. 2-row tasks on 24 warps per SM (80 registers;
// branch gemv1-768) took 9% off 11008x4096 but added 9-12% on 4096x11008 and 8192x8192 (thirteenth round).
int rows_per_task(int64_t rows, int64_t ks) {
  if (g_batch1 == 2 || g_batch1 == 4) return g_batch1;
  return 4 * ((rows + 3) / 4 * ks) < 3 * kL1Warps * (int64_t)sm_count() ? 2 : 4;
}

}  // namespace

int64_t take_gemv1_skipped_rows() { return take_local_skipped_rows(); }

void gemv1_set_tuning(int batch1, int wide) { g_batch1 = batch1, g_wide = wide; }

bool gemv1_plan(int dtype, int64_t m, int64_t rows, int64_t cols, int64_t blocksize, const void* A,
                const uint8_t* packed, const int64_t* group_rows, GvArgs* a, size_t* smem) {
  if (g_batch1 < 0 || m != 1 || (dtype != LOWRA_F16 && dtype != LOWRA_BF16)) return false;
  // Automatic from 2^24 weights. H200, 1.75 bits, against the multi-row kernel (us): 4096x4096 8.3 / 8.8,
  // 11008x4096 16.5 / 18.6, 4096x11008 18.2 / 18.5, 8192x8192 19.2 / 24.1, 28672x8192 42.2 / 55.8. Smaller layers
  // (the table building weighs more there) keep the multi-row kernel: unmeasured.
  if (g_batch1 == 0 && rows * cols < ((int64_t)1 << 24)) return false;
  if (cols % 128 != 0 || blocksize < 32 || (blocksize & (blocksize - 1)) != 0 || cols % blocksize != 0) return false;
  // 32-bit row offsets and scale indices in the kernel
  if (!aligned(A, 16) || !aligned(packed, 16) || cols > ((int64_t)1 << 30) || rows > ((int64_t)1 << 31) - 1 ||
      rows * (cols / blocksize) >= ((int64_t)1 << 31))
    return false;
  const int64_t steps = (cols + kL1Step - 1) / kL1Step, sms = sm_count();
  const int64_t ks = (steps + kL1MaxSteps - 1) / kL1MaxSteps;  // as few K splits as the tables' space allows
  const int64_t spl = (steps + ks - 1) / ks;
  a->krange = spl * kL1Step;
  a->ks = (int)((cols + a->krange - 1) / a->krange);
  if (a->ks > sms) return false;
  const int r = rows_per_task(rows, a->ks);
  const int64_t ngroups = (rows + r - 1) / r;
  a->m = 1;
  a->rows = rows;
  a->cols = cols;
  a->nb = cols / blocksize;
  a->bs_shift = 0;
  while (((int64_t)1 << a->bs_shift) < blocksize) ++a->bs_shift;
  a->ngroups = ngroups;
  a->wk = r;  // rows per task: the launch picks the kernel the shared-memory size was planned for
  a->sm_meta = 0;
  // Wide steps where their costlier table building is earned back: layers with 1- or 2-bit rows and several tasks per
  // warp (class comment). Not without group_rows (rows in natural order): nearly every task would then mix
  // precisions and read the wide subset sums with 4-way bank conflicts.
  const bool low_bits = group_rows && group_rows[0] + group_rows[1] > 0;
  const int64_t warps = (int64_t)grid_ctas(a->ks) * kL1Warps;
  a->wide = g_wide > 0 || (g_wide == 0 && blocksize >= 64 && low_bits && ngroups * a->ks >= kL1WideTasks * warps);
  *smem = smem_bytes((int)spl, r, a->wide);
  return true;
}

int gemv1_launch(const GvArgs& a, int dtype, bool nested, size_t smem, cudaStream_t stream) {
  const int r = a.wk;
  const L1Fn fn = dtype == LOWRA_F16 ? pick<__half>(r, nested, a.wide) : pick<__nv_bfloat16>(r, nested, a.wide);
  {  // the shared-memory opt-in, once per kernel and device
    static std::mutex mu;
    static L1Fn done_fn[64];
    static int done_dev[64], n = 0;
    std::lock_guard<std::mutex> lock(mu);
    int dev = 0;
    cudaGetDevice(&dev);
    bool done = false;
    for (int i = 0; i < n && !done; ++i) done = done_fn[i] == fn && done_dev[i] == dev;
    if (!done) {
      const int st = record_cuda(cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)kL1MaxSmem),
                                 "lowra batch-1 gemv: shared-memory opt-in");
      if (st != LOWRA_OK) return st;
      if (n < 64) done_fn[n] = fn, done_dev[n++] = dev;
    }
  }
  const int grid = grid_ctas(a.ks);
  fn<<<grid, kL1Threads, smem, stream>>>(a);
  return launch_status("lowra matmul kernel (batch-1 gemv)");
}

}  // namespace gv
}  // namespace lowra
