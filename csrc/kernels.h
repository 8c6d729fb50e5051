// Internal kernel entry points behind the C ABI (c_api.cpp validates before calling them).
#pragma once
#include <stdint.h>

#include "common.h"

namespace lowra {
int quantize_cpu(const void* W, int dtype, int64_t rows, int64_t cols, int64_t blocksize, const uint8_t* bits,
                 const uint16_t* thresholds, const int64_t* row_offsets, uint8_t* packed, float* absmax);
int dequantize_cpu(const uint8_t* packed, const AbsmaxSrc& absmax, const uint8_t* bits, const uint16_t* codebook,
                   const int64_t* row_offsets, int64_t rows, int64_t cols, int64_t blocksize, int dtype, void* out);
int matmul_cpu(const void* A, int dtype, int64_t m, const uint8_t* packed, const AbsmaxSrc& absmax,
               const uint8_t* bits, const uint16_t* codebook, const int64_t* row_offsets, int64_t rows, int64_t cols,
               int64_t blocksize, const void* bias, void* out);
#ifdef LOWRA_WITH_CUDA
int quantize_cuda(const void* W, int dtype, int64_t rows, int64_t cols, int64_t blocksize, const uint8_t* bits,
                  const uint16_t* thresholds, const int64_t* row_offsets, uint8_t* packed, int64_t packed_bytes,
                  float* absmax, void* stream);
void quantize_cuda_set_tuning(int task_bytes, int run);  // as lowra_quantize_cuda_set_tuning
void dequantize_cuda_set_tuning(int run, int pdl);  // as lowra_dequantize_cuda_set_tuning
int dequantize_cuda(const uint8_t* packed, int64_t packed_bytes, const AbsmaxSrc& absmax, const uint8_t* bits,
                    const uint16_t* codebook, const int64_t* row_offsets, int64_t rows, int64_t cols,
                    int64_t blocksize, int dtype, void* out, void* stream);
const char* last_cuda_error();
int64_t take_skipped_rows();
int64_t take_matmul_skipped_rows();  // cuda_matmul.cu's share (after a device synchronize)
// Scales decoded to float32 [n] (for the paths that read them many times per call).
int decode_absmax_cuda(const AbsmaxSrc& absmax, int64_t n, float* out, void* stream);
int matmul_cuda(const void* A, int dtype, int64_t m, const uint8_t* packed, int64_t packed_bytes,
                const AbsmaxSrc& absmax, const uint8_t* bits, const uint16_t* codebook, const int64_t* row_offsets,
                int64_t rows, int64_t cols, int64_t blocksize, const int32_t* row_order, const int64_t* group_rows,
                const void* bias, void* out, void* workspace, int64_t workspace_bytes, void* stream);
int64_t matmul_cuda_workspace_size(int dtype, int64_t m, int64_t rows, int64_t cols, int64_t blocksize,
                                   const int64_t* group_rows, bool nested);
void matmul_cuda_set_tuning(int ks, int ctas_per_sm, int depth, int nested_prepass);
// cuda_gemv.cu: the fused matmul for 1-2 (up to 4) activation rows (one row on large layers: cuda_gemv1.cu); -1
// (gemv_cuda, gemv_workspace_size) when it does not apply.
int gemv_cuda(const void* A, int dtype, int64_t m, const uint8_t* packed, int64_t packed_bytes,
              const AbsmaxSrc& absmax, const uint8_t* bits, const uint16_t* codebook, const int64_t* row_offsets, int64_t rows, int64_t cols,
              int64_t blocksize, const int32_t* row_order, const int64_t* group_rows, const void* bias, void* out,
              void* workspace, int64_t workspace_bytes, void* stream);
int64_t gemv_workspace_size(int dtype, int64_t m, int64_t rows, int64_t cols, int64_t blocksize);
int64_t take_gemv_skipped_rows();
void gemv_set_tuning(int max_rows, int rows_per_warp, int wk, int batch1, int wide);
#endif
}  // namespace lowra
