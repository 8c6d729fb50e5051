// CUDA kernels. One CTA per output channel (row): the row's precision is uniform, so no warp ever diverges on bits.
// Every row is bound-checked against the packed buffer before it is touched (rows with impossible metadata are
// skipped and reported through the error flag), so corrupt metadata can never cause an out-of-bounds access.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdio.h>

#include "common.h"
#include "kernels.h"

namespace lowra {

namespace {

thread_local char g_last_error[256] = "";

int record(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return LOWRA_OK;
  snprintf(g_last_error, sizeof(g_last_error), "%s: %s", what, cudaGetErrorString(e));
  return LOWRA_ERR_CUDA;
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

// Row r's bytes are [row_offsets[r], row_offsets[r] + pc * bits / 8) and must lie inside the buffer.
__device__ __forceinline__ bool row_ok(const uint8_t* bits, const int64_t* row_offsets, int64_t r, int64_t pc,
                                       int64_t packed_bytes) {
  const int b = bits[r];
  if (!valid_bits(b)) return false;
  const int64_t start = row_offsets[r];
  return start >= 0 && start + row_bytes(pc, b) <= packed_bytes;
}

__global__ void quantize_kernel(const void* W, int dtype, int64_t cols, int64_t blocksize, int64_t pc,
                                const uint8_t* bits, const uint16_t* thresholds, const int64_t* row_offsets,
                                uint8_t* packed, int64_t packed_bytes, float* absmax, int* error_flag) {
  const int64_t r = blockIdx.x;
  if (!row_ok(bits, row_offsets, r, pc, packed_bytes)) {
    if (threadIdx.x == 0) atomicExch(error_flag, 1);
    return;
  }
  const int b = bits[r];
  const int n = (1 << b) - 1;
  const int per_byte = 8 / b;
  __shared__ float t[kThresholdSlots];
  if (threadIdx.x < kThresholdSlots)
    t[threadIdx.x] = __half2float(__ushort_as_half(thresholds[r * kThresholdSlots + threadIdx.x]));
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
    for (int o = 16; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
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

__global__ void dequantize_kernel(const uint8_t* packed, int64_t packed_bytes, const float* absmax,
                                  const uint8_t* bits, const uint16_t* codebook, const int64_t* row_offsets,
                                  int64_t cols, int64_t blocksize, int64_t pc, int dtype, void* out, int* error_flag) {
  const int64_t r = blockIdx.x;
  if (!row_ok(bits, row_offsets, r, pc, packed_bytes)) {
    if (threadIdx.x == 0) atomicExch(error_flag, 1);
    return;
  }
  const int b = bits[r];
  const int per_byte = 8 / b;
  const uint32_t mask = (1u << b) - 1;
  __shared__ float code[kCodebookSlots];
  if (threadIdx.x < kCodebookSlots)
    code[threadIdx.x] = __half2float(__ushort_as_half(codebook[r * kCodebookSlots + threadIdx.x]));
  __syncthreads();
  const uint8_t* in = packed + row_offsets[r];
  const int64_t nb = pc / blocksize;
  for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
    const uint32_t c = (in[j / per_byte] >> ((j % per_byte) * b)) & mask;
    store_elem(out, dtype, r * cols + j, code[c] * absmax[r * nb + j / blocksize]);
  }
}

// A device flag reused across launches (allocated once per process) to report skipped rows.
int* error_flag_device() {
  static int* flag = nullptr;
  if (!flag && cudaMalloc(&flag, sizeof(int)) != cudaSuccess) flag = nullptr;
  return flag;
}

int finish(int* flag, cudaStream_t stream, const char* what) {
  int st = record(cudaGetLastError(), what);
  if (st != LOWRA_OK) return st;
  int host_flag = 0;
  st = record(cudaMemcpyAsync(&host_flag, flag, sizeof(int), cudaMemcpyDeviceToHost, stream), "read error flag");
  if (st != LOWRA_OK) return st;
  st = record(cudaStreamSynchronize(stream), what);
  if (st != LOWRA_OK) return st;
  return host_flag ? LOWRA_ERR_OFFSETS : LOWRA_OK;
}

}  // namespace

const char* last_cuda_error() { return g_last_error; }

int quantize_cuda(const void* W, int dtype, int64_t rows, int64_t cols, int64_t blocksize, const uint8_t* bits,
                  const uint16_t* thresholds, const int64_t* row_offsets, uint8_t* packed, int64_t packed_bytes,
                  float* absmax, void* stream_) {
  cudaStream_t stream = (cudaStream_t)stream_;
  int* flag = error_flag_device();
  if (!flag) return record(cudaErrorMemoryAllocation, "allocate error flag");
  int st = record(cudaMemsetAsync(flag, 0, sizeof(int), stream), "reset error flag");
  if (st != LOWRA_OK) return st;
  const int64_t pc = padded_cols(cols, blocksize);
  quantize_kernel<<<(unsigned)rows, 256, 0, stream>>>(W, dtype, cols, blocksize, pc, bits, thresholds, row_offsets,
                                                        packed, packed_bytes, absmax, flag);
  return finish(flag, stream, "lowra quantize kernel");
}

int dequantize_cuda(const uint8_t* packed, int64_t packed_bytes, const float* absmax, const uint8_t* bits,
                    const uint16_t* codebook, const int64_t* row_offsets, int64_t rows, int64_t cols,
                    int64_t blocksize, int dtype, void* out, void* stream_) {
  cudaStream_t stream = (cudaStream_t)stream_;
  int* flag = error_flag_device();
  if (!flag) return record(cudaErrorMemoryAllocation, "allocate error flag");
  int st = record(cudaMemsetAsync(flag, 0, sizeof(int), stream), "reset error flag");
  if (st != LOWRA_OK) return st;
  const int64_t pc = padded_cols(cols, blocksize);
  dequantize_kernel<<<(unsigned)rows, 256, 0, stream>>>(packed, packed_bytes, absmax, bits, codebook, row_offsets,
                                                          cols, blocksize, pc, dtype, out, flag);
  return finish(flag, stream, "lowra dequantize kernel");
}

}  // namespace lowra
