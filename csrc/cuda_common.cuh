// Device helpers shared by the CUDA kernel files: element conversion, row bound checks, asynchronous error
// reporting and launch-error recording.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <utility>

#include "common.h"

namespace lowra {

int record_cuda(cudaError_t e, const char* what);  // LOWRA_OK or LOWRA_ERR_CUDA (message kept for the C API)
int launch_status(const char* what);                // record_cuda(cudaGetLastError(), what)
int sm_count();                                     // multiprocessors of the current device (cached per device)
bool has_pdl();                                     // programmatic dependent launch (sm_90+; cached per device)

// Rows whose metadata does not fit the buffer are skipped, never followed; the kernels count them here instead of
// synchronizing (lowra_cuda_take_skipped_rows reads and resets the count). Without relocatable device code every
// kernel file has its own counter; take_local_skipped_rows (called after a device synchronize) drains this file's.
static __device__ unsigned long long g_skipped_rows = 0;

__device__ __forceinline__ void count_skipped_row() { atomicAdd(&g_skipped_rows, 1ull); }

static inline int64_t take_local_skipped_rows() {
  unsigned long long n = 0, zero = 0;
  if (record_cuda(cudaMemcpyFromSymbol(&n, g_skipped_rows, sizeof(n)), "read skipped-row count") != LOWRA_OK) return -1;
  if (record_cuda(cudaMemcpyToSymbol(g_skipped_rows, &zero, sizeof(zero)), "reset skipped-row count") != LOWRA_OK)
    return -1;
  return (int64_t)n;
}

__device__ __forceinline__ float load_elem(const void* p, int dtype, int64_t i) {
  if (dtype == LOWRA_F16) return __half2float(((const __half*)p)[i]);
  if (dtype == LOWRA_BF16) return __bfloat162float(((const __nv_bfloat16*)p)[i]);
  return ((const float*)p)[i];
}

__device__ __forceinline__ void store_elem(void* p, int dtype, int64_t i, float v) {
  if (dtype == LOWRA_F16) ((__half*)p)[i] = __float2half_rn(v);
  else if (dtype == LOWRA_BF16) ((__nv_bfloat16*)p)[i] = __float2bfloat16_rn(v);
  else ((float*)p)[i] = v;
}

__device__ __forceinline__ float half_bits_to_float(uint16_t h) { return __half2float(__ushort_as_half(h)); }

// Programmatic dependent launch (sm_90+; a no-op below): a kernel started by launch_dependent may launch once every
// CTA of the stream's previous kernel has run griddep_launch_dependents (or exited), and waits for that kernel's
// completion and memory (griddep_wait) before it reads what that kernel writes. The finalize passes of K splits use
// it, so that their launch and row lookups overlap the main kernel. H200, A B B A: the GEMVs at m = 1 with two K
// splits 4096x11008 5-8% less time, 8192x28672 2-4% (twenty-first round); the tiled matmul at m = 4-16 2-7% less
// on 4096x4096, 4096x11008 and 11008x4096 (twenty-second round; docs/benchmarks.md).
__device__ __forceinline__ void griddep_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void griddep_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
// Grid of a finalize pass over n outputs: 256-thread CTAs striding over them, at most 4 per SM (the matmul's
// shared-memory cap on an early launch relies on that bound).
inline int finalize_grid(int64_t n) {
  const int64_t want = (n + 255) / 256, cap = 4 * (int64_t)sm_count();
  return (int)(want < cap ? want : cap);
}

// `kernel` as a programmatic dependent of the stream's previous kernel (a plain launch where has_pdl() is false).
template <typename... P, typename... A>
cudaError_t launch_dependent(void (*kernel)(P...), int grid, int block, size_t smem, cudaStream_t stream, A&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3((unsigned)grid);
  cfg.blockDim = dim3((unsigned)block);
  cfg.dynamicSmemBytes = smem;
  cfg.stream = stream;
  cudaLaunchAttribute pdl[1];
  pdl[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  pdl[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = pdl;
  cfg.numAttrs = has_pdl() ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, std::forward<A>(args)...);
}

// Row r's bytes are [row_offsets[r], row_offsets[r] + pc * bits / 8) and must lie inside the buffer.
__device__ __forceinline__ bool row_ok(int b, int64_t start, int64_t pc, int64_t packed_bytes) {
  return valid_bits(b) && start >= 0 && start <= packed_bytes - row_bytes(pc, b);
}

// Block scale i (row-major [rows, nblocks] index), in two steps so that a kernel can issue the loads of many scales
// before it waits for any: absmax_issue loads (the float32 scale, or the code and its nested scale), absmax_finish
// decodes. Double-quantized scales decode exactly as the Python reference does: product and sum each rounded (no
// FMA contraction), negative results clamped to 0; the 1 KB code table stays in L1.
struct AbsmaxRaw {
  float v;     // the scale, or the nested scale
  uint32_t q;  // the 8-bit code (double-quantized only)
};

// The double-quantized form alone (kernels specialized on it skip the branch on s.f32).
__device__ __forceinline__ AbsmaxRaw nested_issue(const AbsmaxSrc& s, int64_t i) {
  return AbsmaxRaw{__ldg(s.nested.nested + (i >> s.nested_shift)), (uint32_t)__ldg(s.nested.q + i)};
}

__device__ __forceinline__ float nested_finish(const AbsmaxSrc& s, AbsmaxRaw r) {
  const float v = __fmul_rn(__ldg(s.nested.code + r.q), r.v);
  return fmaxf(__fadd_rn(v, __ldg(s.nested.offset)), 0.0f);
}

__device__ __forceinline__ AbsmaxRaw absmax_issue(const AbsmaxSrc& s, int64_t i) {
  return s.f32 ? AbsmaxRaw{__ldg(s.f32 + i), 0u} : nested_issue(s, i);
}

__device__ __forceinline__ float absmax_finish(const AbsmaxSrc& s, AbsmaxRaw r) {
  return s.f32 ? r.v : nested_finish(s, r);
}

// The operands every fused-matmul launch carries (GvArgs in cuda_gemv.cu, MatmulArgs in cuda_matmul.cu; each sets
// its own form of the scales).
template <typename Args>
inline void set_matmul_operands(Args& a, const void* A, const uint8_t* packed, int64_t packed_bytes,
                                const uint8_t* bits, const uint16_t* codebook, const int64_t* row_offsets,
                                const int32_t* row_order, const void* bias, void* out, void* workspace) {
  a.A = A;
  a.packed = packed;
  a.packed_bytes = packed_bytes;
  a.bits = bits;
  a.codebook = codebook;
  a.row_offsets = row_offsets;
  a.row_order = row_order;
  a.bias = bias;
  a.out = out;
  a.ws = (float*)workspace;
}

}  // namespace lowra
