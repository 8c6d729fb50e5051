// Pieces shared by the two GEMV kernels: launch arguments, 16-bit activation conversion, streaming loads,
// shared-memory lookups, the row check and the K-split finalize. cuda_gemv.cu: 1-4 activation rows; cuda_gemv1.cu:
// one row through subset-sum tables.
#pragma once
#include "cuda_common.cuh"

namespace lowra {
namespace gv {

constexpr unsigned kFull = 0xffffffffu;

struct GvArgs {
  const void* A;
  int m;
  int64_t rows, cols, nb;
  int bs_shift;  // log2(blocksize)
  const uint8_t* packed;
  int64_t packed_bytes;
  AbsmaxSrc am;  // block scales, float32 or double-quantized (decoded where read)
  const uint8_t* bits;
  const uint16_t* codebook;
  const int64_t* row_offsets;
  const int32_t* row_order;  // NULL: natural order
  int wk;                    // cuda_gemv.cu: warps per row group along K (1, 2, 4, 8); cuda_gemv1.cu: rows per task
  int ks;                    // K splits
  int64_t krange;            // columns per split (a multiple of 1024)
  int64_t ngroups;           // row groups (tasks per K split)
  int sm_meta;               // cuda_gemv.cu: shared-memory offset of the row metadata (after the activations)
  bool wide;                 // cuda_gemv1.cu: wide steps (its WIDE kernels)
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
  *off = a.row_offsets[r];  // loaded beside the bits, not after their check (row_ok checks them): one latency
  return row_ok(*b, *off, a.cols, a.packed_bytes) && ((uintptr_t)(a.packed + *off) & 15) == 0;
}


// Shared-memory lookups at a 32-bit shared address (tables aligned so that base | offset is the entry).
__device__ __forceinline__ float lds_f32(uint32_t addr) {
  float v;
  asm volatile("ld.shared.f32 %0, [%1];" : "=f"(v) : "r"(addr));
  return v;
}
__device__ __forceinline__ float2 lds_f32x2(uint32_t addr) {
  float2 v;
  asm volatile("ld.shared.v2.f32 {%0,%1}, [%2];" : "=f"(v.x), "=f"(v.y) : "r"(addr));
  return v;
}

// Several K splits: adds the partial sums in split order, adds the bias, converts (rows skipped above stay so).
// Launched as the GEMV's programmatic dependent: everything read before griddep_wait (row order, metadata, bias)
// was written before the GEMV started; the partial sums only after it.
template <typename T>
__global__ void gemv_finalize(const __grid_constant__ GvArgs a) {
  const int64_t n_all = a.m * a.rows, stride = (int64_t)gridDim.x * blockDim.x;
  bool waited = false;
  for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n_all; i += stride) {
    const int64_t n = i / a.rows, pos = i % a.rows;
    const int64_t r = a.row_order ? (int64_t)a.row_order[pos] : pos;
    int b = 0;
    int64_t off = 0;
    const bool ok = gv_row_ok(a, r, &b, &off);
    const float bias = ok && a.bias ? Cvt<T>::load(a.bias, r) : 0.f;
    if (!waited) {
      griddep_wait();
      waited = true;
    }
    if (!ok) continue;
    float sum = 0.f;
    for (int k = 0; k < a.ks; ++k) sum += a.ws[(k * a.m + n) * a.rows + r];
    Cvt<T>::store(a.out, n * a.rows + r, a.bias ? sum + bias : sum);
  }
  if (!waited) griddep_wait();  // a thread with no element still orders itself after the GEMV
}

// cuda_gemv1.cu, the batch-1 kernel. gemv1_plan fills the shape fields of `a` (K splits included) and the shared
// memory size when it applies (m = 1, 16-bit activations, aligned operands), and picks wide steps from the layer's
// shape and group_rows (host int64[3]: its 1-, 2- and 4-bit rows; NULL: rows in natural order, no wide steps unless
// forced); gemv1_launch starts it once the operands are set (the caller adds the finalize launch when a.ks > 1).
bool gemv1_plan(int dtype, int64_t m, int64_t rows, int64_t cols, int64_t blocksize, const void* A,
                const uint8_t* packed, const int64_t* group_rows, GvArgs* a, size_t* smem);
int gemv1_launch(const GvArgs& a, int dtype, bool nested, size_t smem, cudaStream_t stream);
int64_t take_gemv1_skipped_rows();
// batch1: 0 automatic, -1 never, 2 or 4 rows per warp task; wide: 0 automatic, 1 wide steps wherever the batch-1
// kernel runs, -1 never
void gemv1_set_tuning(int batch1, int wide);

}  // namespace gv
}  // namespace lowra
