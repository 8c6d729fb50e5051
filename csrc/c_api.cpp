// The C ABI (lowra.h): argument validation, then dispatch to the CPU or CUDA kernels.
#include <new>

#include "common.h"
#include "cpu_simd.h"
#include "kernels.h"

#ifndef LOWRA_VERSION
#define LOWRA_VERSION "unknown"
#endif

namespace {

// Activation rows of a matmul: at least one, at most 2^30, and m x rows outputs countable in int64.
bool activation_rows_ok(int64_t m, int64_t rows) {
  return m > 0 && m <= ((int64_t)1 << 30) && rows > 0 && m <= INT64_MAX / rows;
}

// A kernel call with its C++ exceptions turned into statuses: none may cross the C ABI (ctypes cannot catch one; the
// process would abort). std::bad_alloc is a scratch allocation that failed, anything else a bug. The validation
// around the calls throws nothing, nor do the other entry points (plain reads and stores of settings).
template <typename F>
auto guarded(F&& kernel, decltype(kernel()) memory = LOWRA_ERR_MEMORY,
             decltype(kernel()) internal = LOWRA_ERR_INTERNAL) noexcept -> decltype(kernel()) {
  try {
    return kernel();
  } catch (const std::bad_alloc&) {
    return memory;
  } catch (...) {
    return internal;
  }
}

}  // namespace

extern "C" {

int lowra_abi_version(void) { return LOWRA_ABI_VERSION; }

const char* lowra_version(void) { return LOWRA_VERSION; }

int lowra_has_cuda(void) {
#ifdef LOWRA_WITH_CUDA
  return 1;
#else
  return 0;
#endif
}

int lowra_quantize_cpu(const void* W, int dtype, int64_t rows, int64_t cols, int64_t blocksize, const uint8_t* bits,
                       const uint16_t* thresholds, const int64_t* row_offsets, uint8_t* packed, int64_t packed_bytes,
                       float* absmax) {
  if (!W || !bits || !thresholds || !row_offsets || !packed || !absmax || !lowra::valid_dtype(dtype) ||
      !lowra::data_aligned(dtype, W, nullptr) || !lowra::metadata_aligned(thresholds, row_offsets, absmax, nullptr))
    return LOWRA_ERR_ARGUMENT;
  int st = lowra::check_layout_host(rows, cols, blocksize, bits, row_offsets, packed_bytes);
  if (st != LOWRA_OK) return st;
  return guarded([&] {
    return lowra::quantize_cpu(W, dtype, rows, cols, blocksize, bits, thresholds, row_offsets, packed, absmax);
  });
}

int lowra_dequantize_cpu(const uint8_t* packed, int64_t packed_bytes, const float* absmax,
                         const LowraNestedAbsmax* nested, const uint8_t* bits, const uint16_t* codebook,
                         const int64_t* row_offsets, int64_t rows, int64_t cols, int64_t blocksize, int dtype,
                         void* out) {
  lowra::AbsmaxSrc am;
  if (!packed || !lowra::absmax_src(absmax, nested, &am) || !bits || !codebook || !row_offsets || !out ||
      !lowra::valid_dtype(dtype) || !lowra::data_aligned(dtype, out, nullptr) ||
      !lowra::metadata_aligned(codebook, row_offsets, absmax, nested))
    return LOWRA_ERR_ARGUMENT;
  int st = lowra::check_layout_host(rows, cols, blocksize, bits, row_offsets, packed_bytes);
  if (st != LOWRA_OK) return st;
  return guarded([&] {
    return lowra::dequantize_cpu(packed, am, bits, codebook, row_offsets, rows, cols, blocksize, dtype, out);
  });
}

int lowra_matmul_cpu(const void* A, int dtype, int64_t m, const uint8_t* packed, int64_t packed_bytes,
                     const float* absmax, const LowraNestedAbsmax* nested, const uint8_t* bits,
                     const uint16_t* codebook, const int64_t* row_offsets, int64_t rows, int64_t cols,
                     int64_t blocksize, const void* bias, void* out) {
  lowra::AbsmaxSrc am;
  if (!A || !activation_rows_ok(m, rows) || !packed || !lowra::absmax_src(absmax, nested, &am) || !bits ||
      !codebook || !row_offsets || !out || !lowra::valid_dtype(dtype) || !lowra::data_aligned(dtype, A, out, bias) ||
      !lowra::metadata_aligned(codebook, row_offsets, absmax, nested))
    return LOWRA_ERR_ARGUMENT;
  int st = lowra::check_layout_host(rows, cols, blocksize, bits, row_offsets, packed_bytes);
  if (st != LOWRA_OK) return st;
  return guarded([&] {
    return lowra::matmul_cpu(A, dtype, m, packed, am, bits, codebook, row_offsets, rows, cols, blocksize, bias, out);
  });
}

int lowra_cpu_isa(void) { return lowra::cpu_isa(); }

int lowra_cpu_set_isa(int isa) { return lowra::cpu_set_isa(isa); }

// Device pointers cannot be validated here; the CUDA kernels bound-check every row against packed_bytes.
int lowra_quantize_cuda(const void* W, int dtype, int64_t rows, int64_t cols, int64_t blocksize, const uint8_t* bits,
                        const uint16_t* thresholds, const int64_t* row_offsets, uint8_t* packed, int64_t packed_bytes,
                        float* absmax, void* stream) {
#ifdef LOWRA_WITH_CUDA
  if (!W || !bits || !thresholds || !row_offsets || !packed || !absmax || !lowra::valid_dtype(dtype) ||
      !lowra::shape_ok(rows, cols, blocksize) || packed_bytes < 0 || !lowra::data_aligned(dtype, W, nullptr) ||
      !lowra::metadata_aligned(thresholds, row_offsets, absmax, nullptr))
    return LOWRA_ERR_ARGUMENT;
  return guarded([&] {
    return lowra::quantize_cuda(W, dtype, rows, cols, blocksize, bits, thresholds, row_offsets, packed, packed_bytes,
                                absmax, stream);
  });
#else
  (void)W, (void)dtype, (void)rows, (void)cols, (void)blocksize, (void)bits, (void)thresholds, (void)row_offsets,
      (void)packed, (void)packed_bytes, (void)absmax, (void)stream;
  return LOWRA_ERR_NO_CUDA;
#endif
}

int lowra_dequantize_cuda(const uint8_t* packed, int64_t packed_bytes, const float* absmax,
                          const LowraNestedAbsmax* nested, const uint8_t* bits, const uint16_t* codebook,
                          const int64_t* row_offsets, int64_t rows, int64_t cols, int64_t blocksize, int dtype,
                          void* out, void* stream) {
#ifdef LOWRA_WITH_CUDA
  lowra::AbsmaxSrc am;
  if (!packed || !lowra::absmax_src(absmax, nested, &am) || !bits || !codebook || !row_offsets || !out ||
      !lowra::valid_dtype(dtype) || !lowra::shape_ok(rows, cols, blocksize) || packed_bytes < 0 ||
      !lowra::data_aligned(dtype, out, nullptr) || !lowra::metadata_aligned(codebook, row_offsets, absmax, nested))
    return LOWRA_ERR_ARGUMENT;
  return guarded([&] {
    return lowra::dequantize_cuda(packed, packed_bytes, am, bits, codebook, row_offsets, rows, cols, blocksize, dtype,
                                  out, stream);
  });
#else
  (void)packed, (void)packed_bytes, (void)absmax, (void)nested, (void)bits, (void)codebook, (void)row_offsets,
      (void)rows, (void)cols, (void)blocksize, (void)dtype, (void)out, (void)stream;
  return LOWRA_ERR_NO_CUDA;
#endif
}

int64_t lowra_cuda_take_skipped_rows(void) {
#ifdef LOWRA_WITH_CUDA
  return guarded([] { return lowra::take_skipped_rows(); }, (int64_t)-1, (int64_t)-1);
#else
  return 0;
#endif
}

int lowra_matmul_cuda(const void* A, int dtype, int64_t m, const uint8_t* packed, int64_t packed_bytes,
                      const float* absmax, const LowraNestedAbsmax* nested, const uint8_t* bits,
                      const uint16_t* codebook, const int64_t* row_offsets, int64_t rows, int64_t cols,
                      int64_t blocksize, const int32_t* row_order, const int64_t* group_rows, const void* bias,
                      void* out, void* workspace, int64_t workspace_bytes, void* stream) {
#ifdef LOWRA_WITH_CUDA
  lowra::AbsmaxSrc am;
  if (!A || !packed || !lowra::absmax_src(absmax, nested, &am) || !bits || !codebook || !row_offsets || !out ||
      !lowra::valid_dtype(dtype) || !lowra::shape_ok(rows, cols, blocksize) || !activation_rows_ok(m, rows) ||
      packed_bytes < 0 || (row_order && !group_rows) || workspace_bytes < 0 ||
      !lowra::data_aligned(dtype, A, out, bias) || !lowra::aligned(row_order, 4) ||
      !lowra::metadata_aligned(codebook, row_offsets, absmax, nested))
    return LOWRA_ERR_ARGUMENT;
  return guarded([&] {
    return lowra::matmul_cuda(A, dtype, m, packed, packed_bytes, am, bits, codebook, row_offsets, rows, cols,
                              blocksize, row_order, group_rows, bias, out, workspace, workspace_bytes, stream);
  });
#else
  (void)A, (void)dtype, (void)m, (void)packed, (void)packed_bytes, (void)absmax, (void)nested, (void)bits,
      (void)codebook, (void)row_offsets, (void)rows, (void)cols, (void)blocksize, (void)row_order, (void)group_rows,
      (void)bias, (void)out, (void)workspace, (void)workspace_bytes, (void)stream;
  return LOWRA_ERR_NO_CUDA;
#endif
}

int64_t lowra_matmul_cuda_workspace_size(int dtype, int64_t m, int64_t rows, int64_t cols, int64_t blocksize,
                                         const int64_t* group_rows, int nested) {
#ifdef LOWRA_WITH_CUDA
  if (!group_rows || !lowra::shape_ok(rows, cols, blocksize) || !activation_rows_ok(m, rows)) return 0;
  return guarded(
      [&] { return lowra::matmul_cuda_workspace_size(dtype, m, rows, cols, blocksize, group_rows, nested != 0); },
      (int64_t)-1, (int64_t)-1);
#else
  (void)dtype, (void)m, (void)rows, (void)cols, (void)blocksize, (void)group_rows, (void)nested;
  return 0;
#endif
}

void lowra_matmul_cuda_set_tuning(int ksplit, int ctas_per_sm, int depth, int nested_prepass) {
#ifdef LOWRA_WITH_CUDA
  lowra::matmul_cuda_set_tuning(ksplit, ctas_per_sm, depth, nested_prepass);
#else
  (void)ksplit, (void)ctas_per_sm, (void)depth, (void)nested_prepass;
#endif
}

void lowra_dequantize_cuda_set_tuning(int run, int pdl) {
#ifdef LOWRA_WITH_CUDA
  lowra::dequantize_cuda_set_tuning(run, pdl);
#else
  (void)run, (void)pdl;
#endif
}

void lowra_quantize_cuda_set_tuning(int task_bytes, int run) {
#ifdef LOWRA_WITH_CUDA
  lowra::quantize_cuda_set_tuning(task_bytes, run);
#else
  (void)task_bytes, (void)run;
#endif
}

void lowra_matmul_cuda_set_gemv_tuning(int max_rows, int rows_per_warp, int wk, int batch1, int wide) {
#ifdef LOWRA_WITH_CUDA
  lowra::gemv_set_tuning(max_rows, rows_per_warp, wk, batch1, wide);
#else
  (void)max_rows, (void)rows_per_warp, (void)wk, (void)batch1, (void)wide;
#endif
}

const char* lowra_last_cuda_error(void) {
#ifdef LOWRA_WITH_CUDA
  return lowra::last_cuda_error();
#else
  return "bitsandbytes-lowra was built without CUDA";
#endif
}

}  // extern "C"
