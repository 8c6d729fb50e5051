// bitsandbytes-lowra native library: the C ABI loaded through ctypes (see bitsandbytes_lowra/_native.py).
//
// Storage format (docs/format.md is the normative description):
//   W[rows, cols] -> each row r has bits[r] in {1, 2, 4}; the row is padded to `padded_cols` (a multiple of
//   `blocksize`) and cut into blocks of `blocksize` elements; every block is normalized by its absmax
//   (float32, absmax[r * nblocks + b]). The codes of a row are packed little-endian within bytes
//   (element j lives in byte row_offsets[r] + (j * bits) / 8 at bit (j * bits) % 8), rows are stored in order,
//   row r starts at byte row_offsets[r] (row_offsets[r + 1] - row_offsets[r] == padded_cols * bits[r] / 8).
//   Codebooks are float16 [rows, 16] (slot c of row r is the value of code c), thresholds float16 [rows, 15];
//   only the first 2^bits - 1 thresholds of a row are used, sorted ascending.
//   absmax = the largest |w| of the block's elements that are not NaN (fmaxf; 0 when there are none).
//   code(v) = number of used thresholds t with v > t, where v = w / absmax (IEEE float32 division; v = 0 when
//   absmax == 0), so a NaN element gets code 0. Dequantize: out = (T)(codebook[r][code] * absmax) computed in float32, rounded to nearest even.
//
// Every function validates what it can cheaply (sizes, bits values, offsets) and returns a LowraStatus; the
// Python side validates everything before calling, so a non-zero status is a bug or a corrupt state. Typed pointers
// (float32 scales, int64 offsets, float16 tables, activations and outputs of `dtype`) must be aligned to their
// element: a misaligned one is LOWRA_ERR_ARGUMENT (the CPU kernels' vector loads take any address, but their
// typed scalar accesses do not; the CUDA vector paths check their own 16-byte alignment and fall back).
//
// Validation at each layer (docs/format.md, "Validation at each layer"; "-": not checked there):
//   check                         | C API (this file)              | _ops.py (every backend)  | functional, format.py
//   ------------------------------+--------------------------------+--------------------------+----------------------
//   null pointers, dtype code     | yes                            | dtypes, shapes, devices  | the same, on states
//   blocksize (8 | b, <= 4096)    | yes (kMaxBlocksize)            | yes (ValueError)         | yes (LowRAFormatError)
//   sizes: 1..2^31-1 cols, int64  | yes                            | cols (ValueError, named) | cols (format.MAX_COLS)
//   element alignment             | yes (LOWRA_ERR_ARGUMENT)       | operand buffer: 16 bytes | -
//   bits in {1, 2, 4}             | CPU: yes; CUDA: row skipped    | quantize: yes            | yes (state, load)
//   row offsets = prefix sum      | CPU: yes (overflow-checked);   | quantize: yes, before    | yes (state, load)
//                                 | CUDA: each row bound-checked,  | allocating               |
//                                 | skipped and counted            |                          |
//   out= overlapping an input     | -                              | yes, named               | -
//   empty shapes (0 rows / cols)  | refused                        | empty results (backends) | quantize_lowra refuses
//   C++ exceptions                | statuses 6 and 7               | -                        | -
//   codebooks, thresholds, absmax | -                              | -                        | finite, sorted, >= 0
//   non-finite weights            | not refused: NaN -> code 0;    | -                        | check_weight refuses
//                                 | +-inf -> its block's absmax is |                          |
//                                 | inf, the block decodes to      |                          |
//                                 | +-inf or NaN                   |                          |
// The CUDA kernels never synchronize, so a row whose metadata does not fit is skipped without an error status (only
// lowra_cuda_take_skipped_rows counts it): the Python checks above are what keeps such rows from reaching them.
#pragma once
#include <stdint.h>

#if defined(_WIN32)
#define LOWRA_API __declspec(dllexport)
#else
#define LOWRA_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
  LOWRA_OK = 0,
  LOWRA_ERR_ARGUMENT = 1,     // null pointer, bad sizes (1 .. 2^31 - 1 columns), blocksize (multiple of 8, <= 4096)
  LOWRA_ERR_BITS = 2,         // a row's bits is not 1, 2 or 4
  LOWRA_ERR_OFFSETS = 3,      // row_offsets inconsistent with bits / buffer size
  LOWRA_ERR_CUDA = 4,         // a CUDA call failed (lowra_last_cuda_error tells which)
  LOWRA_ERR_NO_CUDA = 5,      // library built without CUDA
  LOWRA_ERR_MEMORY = 6,       // a host allocation failed (std::bad_alloc: scratch buffers)
  LOWRA_ERR_INTERNAL = 7,     // any other C++ exception: a bug (no exception ever crosses this ABI)
} LowraStatus;

// dtype codes shared with Python (bitsandbytes_lowra/_native.py)
typedef enum { LOWRA_F32 = 0, LOWRA_F16 = 1, LOWRA_BF16 = 2 } LowraDtype;

// Bumped whenever an entry point's arguments change: the Python side refuses a library of another ABI (a stale
// build) instead of calling it with the wrong arguments. Exception: the *_set_tuning knobs (benchmarks and tests)
// are only extended by trailing int arguments, which an older build ignores, so that bench.ab can still time builds
// from before such a change against the current package.
#define LOWRA_ABI_VERSION 3
LOWRA_API int lowra_abi_version(void);
LOWRA_API const char* lowra_version(void);
LOWRA_API int lowra_has_cuda(void);

// Double-quantized absmax (bitsandbytes' nested quantization of the block scales, as quantize_4bit with
// compress_statistics=True): scale i = max(code[q[i]] * nested[i / blocksize] + offset[0], 0), the product and
// the sum each rounded to float32 (no fused multiply-add). The kernels (CPU and CUDA) decode it where they read a
// scale, so the float32 scales are never materialized (4x fewer scale bytes read). Pass it instead of a float32
// absmax (absmax == NULL); NULL when the scales are plain float32.
typedef struct {
  const uint8_t* q;     // [rows * nblocks] 8-bit codes, row-major like absmax
  const float* nested;  // [ceil(rows * nblocks / blocksize)] scales of the codes
  const float* code;    // [256] the code table
  const float* offset;  // [1] added after scaling (the mean of the original scales)
  int64_t blocksize;    // codes per nested scale, a power of two
} LowraNestedAbsmax;

// ---- CPU (always built) ----
// W: rows x cols of `dtype`, row-major contiguous. thresholds: uint16 (float16 bits) [rows, 15].
// packed: row_offsets[rows] bytes. absmax: float32 [rows, padded_cols / blocksize].
LOWRA_API int lowra_quantize_cpu(const void* W, int dtype, int64_t rows, int64_t cols, int64_t blocksize,
                       const uint8_t* bits, const uint16_t* thresholds, const int64_t* row_offsets,
                       uint8_t* packed, int64_t packed_bytes, float* absmax);

// out: rows x cols of `dtype`. codebook: uint16 (float16 bits) [rows, 16]. Block scales: float32 `absmax`, or
// `nested` (double-quantized; absmax NULL then), as lowra_dequantize_cuda takes them.
LOWRA_API int lowra_dequantize_cpu(const uint8_t* packed, int64_t packed_bytes, const float* absmax,
                                   const LowraNestedAbsmax* nested, const uint8_t* bits, const uint16_t* codebook,
                                   const int64_t* row_offsets, int64_t rows, int64_t cols, int64_t blocksize,
                                   int dtype, void* out);

// y = A W^T (+ bias) without materializing W, for a few activation rows (decoding on the CPU). A: [m, cols] of
// `dtype`, contiguous; out: [m, rows] of `dtype`; bias: [rows] of `dtype` or NULL. W's entries are the float32
// products lowra_dequantize_cpu gives; products and sums in float32, rounded once to `dtype`.
LOWRA_API int lowra_matmul_cpu(const void* A, int dtype, int64_t m, const uint8_t* packed, int64_t packed_bytes,
                               const float* absmax, const LowraNestedAbsmax* nested, const uint8_t* bits,
                               const uint16_t* codebook, const int64_t* row_offsets, int64_t rows, int64_t cols,
                               int64_t blocksize, const void* bias, void* out);

// Instruction-set level of the CPU dequantize and matmul: 0 scalar, 1 AVX2 + F16C, 2 AVX-512F. lowra_cpu_set_isa
// takes at most the CPU's best (-1: the best, the default) and returns the level now in use. Dequantize results are
// identical at every level; the matmul's float32 sums are ordered per level (tests run each one).
LOWRA_API int lowra_cpu_isa(void);
LOWRA_API int lowra_cpu_set_isa(int isa);

// ---- CUDA (built when nvcc is found; pointers are device pointers, `stream` a cudaStream_t) ----

LOWRA_API int lowra_quantize_cuda(const void* W, int dtype, int64_t rows, int64_t cols, int64_t blocksize,
                        const uint8_t* bits, const uint16_t* thresholds, const int64_t* row_offsets,
                        uint8_t* packed, int64_t packed_bytes, float* absmax, void* stream);

LOWRA_API int lowra_dequantize_cuda(const uint8_t* packed, int64_t packed_bytes, const float* absmax,
                                    const LowraNestedAbsmax* nested, const uint8_t* bits, const uint16_t* codebook,
                                    const int64_t* row_offsets, int64_t rows, int64_t cols, int64_t blocksize,
                                    int dtype, void* out, void* stream);

LOWRA_API const char* lowra_last_cuda_error(void);

// The CUDA kernels never synchronize the host: a row whose metadata would leave the packed buffer (or, for the
// fused matmul, does not match its precision group) is skipped and counted. This synchronizes the device, returns
// the number of skips since the last call and resets it (-1 on a CUDA error or a failed allocation; 0 without CUDA).
LOWRA_API int64_t lowra_cuda_take_skipped_rows(void);

// Fused y = A W^T (+ bias) without materializing W (the decode regime: few activation rows).
// A: [m, cols] of `dtype`, contiguous; out: [m, rows] of `dtype`; bias: [rows] of `dtype` or NULL.
// row_order: device int32 [rows], the output channels sorted by precision (all 1-bit rows, then 2-bit, then 4-bit;
// any order inside a group), and group_rows: HOST int64[3], the number of 1-, 2- and 4-bit rows. Both are derived
// from `bits` (bitsandbytes_lowra._ops.matmul_plan); with row_order == NULL the generic kernel runs.
// workspace: device scratch of at least lowra_matmul_cuda_workspace_size(...) bytes (NULL when that is 0; the size
// is 0 for sizes the matmul refuses, -1 when a host allocation failed).
// nested: as for dequantize (absmax NULL then); the GEMV decodes it in the kernel, the other paths into workspace.
// Fast path: fp16/bf16, 1 <= m <= 16, blocksize a multiple of 64, cols a multiple of 256 and of blocksize,
// 16-byte aligned A / packed / absmax; otherwise a generic kernel (any dtype, m, shape) computes the same product.
LOWRA_API int lowra_matmul_cuda(const void* A, int dtype, int64_t m, const uint8_t* packed, int64_t packed_bytes,
                                const float* absmax, const LowraNestedAbsmax* nested, const uint8_t* bits,
                                const uint16_t* codebook, const int64_t* row_offsets, int64_t rows, int64_t cols,
                                int64_t blocksize, const int32_t* row_order, const int64_t* group_rows,
                                const void* bias, void* out, void* workspace, int64_t workspace_bytes, void* stream);
LOWRA_API int64_t lowra_matmul_cuda_workspace_size(int dtype, int64_t m, int64_t rows, int64_t cols,
                                                   int64_t blocksize, const int64_t* group_rows, int nested);
// Benchmark knobs of the fused matmul's fast path (0 = automatic): K splits, resident CTAs per SM, prefetch depth
// (2 or 3 stages); nested_prepass = 1: the GEMV too takes double-quantized scales decoded in a pass of their own.
// Process-wide; not for production use.
LOWRA_API void lowra_matmul_cuda_set_tuning(int ksplit, int ctas_per_sm, int depth, int nested_prepass);
// Knobs of the GEMV path (1 to 4 activation rows): max_rows = the most rows it takes (0: automatic, gemv_takes in
// cuda_gemv.cu; -1: none, every m takes the tensor-core path), rows_per_warp 4 or 8 (0: 8 for 1-2 rows, else 4),
// wk = warps along K (1, 2, 4, 8; 0: automatic),
// batch1 = the one-row kernel (0: automatic, -1: off, 2 or 4: rows per warp task), wide = its wide steps (0: automatic,
// 1: wherever it runs, -1: never). Process-wide; for benchmarks and tests.
LOWRA_API void lowra_matmul_cuda_set_gemv_tuning(int max_rows, int rows_per_warp, int wk, int batch1, int wide);
// Knobs of the fast quantize: bytes of weights per lane and task (0: automatic; 64 or 128 forced, for any mix of
// precisions); tasks per warp run (0: automatic; -1: an even split over a resident grid; n > 0: runs of n tasks).
// Process-wide; for benchmarks and tests.
LOWRA_API void lowra_quantize_cuda_set_tuning(int task_bytes, int run);
// Knobs of the streamed dequantize (16-bit outputs, float32 or double-quantized scales): tasks per warp (0:
// automatic, one; -1: an even split over a resident grid; n > 0: n tasks per warp on as many CTAs as that takes);
// pdl (0: automatic, where the grid is more than one resident wave; 1: always a programmatic dependent of the
// stream's previous kernel; -1: never). Every setting writes the same output. Process-wide; for benchmarks and tests.
LOWRA_API void lowra_dequantize_cuda_set_tuning(int run, int pdl);

#ifdef __cplusplus
}
#endif
