// CPU kernels: one output channel (row) per iteration, rows spread over OpenMP threads.
#include <math.h>

#include <algorithm>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "common.h"
#include "cpu_simd.h"

namespace lowra {

namespace {

// Per-thread float scratch, allocated before the parallel region that uses it: an exception cannot leave an OpenMP
// region (the process terminates), so a failed allocation must happen out here, where the C API turns it into
// LOWRA_ERR_MEMORY. Slices are padded to 64 bytes: threads do not share cache lines.
class ThreadScratch {
 public:
  explicit ThreadScratch(size_t per_thread)
      : per_((per_thread + 15) / 16 * 16), buf_(per_ * (size_t)threads()) {}
  float* mine() { return buf_.data() + per_ * (size_t)thread(); }  // inside the region

 private:
#ifdef _OPENMP
  static int threads() { return omp_get_max_threads(); }  // a region's team is never larger
  static int thread() { return omp_get_thread_num(); }
#else
  static int threads() { return 1; }
  static int thread() { return 0; }
#endif
  size_t per_;
  std::vector<float> buf_;
};

// code = number of used thresholds strictly below v (thresholds sorted ascending).
inline uint32_t encode(float v, const float* t, int n) {
  uint32_t c = 0;
  for (int k = 0; k < n; ++k) c += v > t[k];
  return c;
}

template <int BITS>
void quantize_row(const void* W, int dtype, int64_t r, int64_t cols, int64_t blocksize, int64_t pc,
                  const float* t, uint8_t* out, float* absmax_row) {
  constexpr int n = (1 << BITS) - 1;
  constexpr int per_byte = 8 / BITS;
  const int64_t base = r * cols;
  memset(out, 0, (size_t)row_bytes(pc, BITS));
  for (int64_t b0 = 0; b0 < pc; b0 += blocksize) {
    float amax = 0.0f;
    for (int64_t j = b0; j < b0 + blocksize && j < cols; ++j) amax = fmaxf(amax, fabsf(load_as_float(W, dtype, base + j)));
    absmax_row[b0 / blocksize] = amax;
    for (int64_t j = b0; j < b0 + blocksize; ++j) {
      float v = 0.0f;
      if (j < cols && amax > 0.0f) v = load_as_float(W, dtype, base + j) / amax;
      out[j / per_byte] |= (uint8_t)(encode(v, t, n) << ((j % per_byte) * BITS));
    }
  }
}

template <int D>
inline void store(void* out, int64_t j, float v) {
  if constexpr (D == LOWRA_F16) ((uint16_t*)out)[j] = float_to_half(v);
  else if constexpr (D == LOWRA_BF16) ((uint16_t*)out)[j] = float_to_bf16(v);
  else ((float*)out)[j] = v;
}

// One row of precision BITS into dtype D. Where the vector row decode applies (blocksize a multiple of 16), it takes
// every whole block in one call; other blocks go one at a time: the codebook scaled by the block's absmax (the
// same float product code[c] * absmax the reference takes per element), then the vector decode over the block's
// multiples of 16 elements and a scalar loop, a code byte at a time, over the rest (blocks start on a byte
// boundary: blocksize is a multiple of 8). No division, dtype switch or bounds test per element.
template <int BITS, int D>
void dequantize_row(const uint8_t* in, const float* absmax_row, const float* code, int64_t cols, int64_t blocksize,
                    void* out, DecodeFn vec, DecodeRowFn row_vec) {
  constexpr int n = 1 << BITS, per_byte = 8 / BITS;
  constexpr uint32_t mask = n - 1;
  constexpr int64_t esize = D == LOWRA_F32 ? 4 : 2;
  int64_t b0 = 0, blk = 0;
  if (row_vec && blocksize % 16 == 0 && cols >= blocksize) {
    blk = cols / blocksize;
    row_vec(in, code, absmax_row, blk, blocksize, out);
    b0 = blk * blocksize;
  }
  float scaled[16] = {};  // zero-padded: the vector lookup reads 16 entries
  for (; b0 < cols; b0 += blocksize, ++blk) {
    for (int k = 0; k < n; ++k) scaled[k] = code[k] * absmax_row[blk];
    const int64_t end = b0 + blocksize < cols ? b0 + blocksize : cols;
    const uint8_t* p = in + b0 / per_byte;
    int64_t j = b0;
    if (vec && end - b0 >= 16) {
      const int64_t nv = (end - b0) / 16 * 16;
      vec(p, scaled, nv, (char*)out + j * esize);
      j += nv, p += nv / per_byte;
    }
    for (; j + per_byte <= end; j += per_byte, ++p) {
      const uint32_t v = *p;
      for (int k = 0; k < per_byte; ++k) store<D>(out, j + k, scaled[(v >> (k * BITS)) & mask]);
    }
    for (int k = 0; j < end; ++j, ++k) store<D>(out, j, scaled[(*p >> (k * BITS)) & mask]);  // a partial last byte
  }
}

template <int BITS>
void dequantize_row(const uint8_t* in, const float* absmax_row, const float* code, int64_t cols, int64_t blocksize,
                    int dtype, void* out, DecodeFn vec, DecodeRowFn row_vec) {
  switch (dtype) {
    case LOWRA_F16: dequantize_row<BITS, LOWRA_F16>(in, absmax_row, code, cols, blocksize, out, vec, row_vec); break;
    case LOWRA_BF16: dequantize_row<BITS, LOWRA_BF16>(in, absmax_row, code, cols, blocksize, out, vec, row_vec); break;
    default: dequantize_row<BITS, LOWRA_F32>(in, absmax_row, code, cols, blocksize, out, vec, row_vec);
  }
}

int elem_size(int dtype) { return dtype == LOWRA_F32 ? 4 : 2; }

// Scales first .. first + n - 1 decoded from their double-quantized form into out, as the CUDA kernels do
// (nested_finish): the product and the sum rounded apart (no contraction into a fused multiply-add where the target
// has one), then the maximum with 0 as the reference takes it (NaN -> +0). Neither a volatile round trip nor a libm
// fmaxf call per scale: those cost about as much as the 1.75-bit dot products of a 4096-wide row.
const float* decode_row_scales(const AbsmaxSrc& s, int64_t first, int64_t n, float* out) {
  const LowraNestedAbsmax& d = s.nested;
  const float offset = d.offset[0];
  for (int64_t i = 0; i < n;) {  // runs of one nested scale
    const int64_t g = (first + i) >> s.nested_shift;
    const float nested = d.nested[g];
    const int64_t end = std::min(n, ((g + 1) << s.nested_shift) - first);
    for (; i < end; ++i) {
      float product = d.code[d.q[first + i]] * nested;
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
      asm("" : "+x"(product));  // the product stays a rounded float: the add cannot fuse with it
#elif defined(__GNUC__) && defined(__aarch64__)
      asm("" : "+w"(product));
#else
      product = *static_cast<volatile float*>(&product);
#endif
      const float v = product + offset;
      out[i] = v > 0.0f ? v : 0.0f;
    }
  }
  return out;
}

}  // namespace

int quantize_cpu(const void* W, int dtype, int64_t rows, int64_t cols, int64_t blocksize, const uint8_t* bits,
                 const uint16_t* thresholds, const int64_t* row_offsets, uint8_t* packed, float* absmax) {
  const int64_t pc = padded_cols(cols, blocksize);
  const int64_t nb = pc / blocksize;
#pragma omp parallel for schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    float t[kThresholdSlots];
    halves_to_floats(thresholds + r * kThresholdSlots, t, kThresholdSlots);
    uint8_t* out = packed + row_offsets[r];
    float* am = absmax + r * nb;
    switch (bits[r]) {
      case 1: quantize_row<1>(W, dtype, r, cols, blocksize, pc, t, out, am); break;
      case 2: quantize_row<2>(W, dtype, r, cols, blocksize, pc, t, out, am); break;
      default: quantize_row<4>(W, dtype, r, cols, blocksize, pc, t, out, am); break;
    }
  }
  return LOWRA_OK;
}

namespace {

// Decodes whole rows into `dtype`: the codebook, the scales (decoded into `scales` when double-quantized: nb
// floats per thread), then dequantize_row at the row's precision.
struct RowDecoder {
  const uint8_t* packed;
  const AbsmaxSrc& absmax;
  const uint8_t* bits;
  const uint16_t* codebook;
  const int64_t* row_offsets;
  int64_t cols, blocksize, nb;
  int dtype;
  DecodeFn vec[3];  // 1, 2, 4 bits
  DecodeRowFn row_vec[3];

  RowDecoder(const uint8_t* packed_, const AbsmaxSrc& absmax_, const uint8_t* bits_, const uint16_t* codebook_,
             const int64_t* row_offsets_, int64_t cols_, int64_t blocksize_, int dtype_)
      : packed(packed_), absmax(absmax_), bits(bits_), codebook(codebook_), row_offsets(row_offsets_), cols(cols_),
        blocksize(blocksize_), nb(padded_cols(cols_, blocksize_) / blocksize_), dtype(dtype_),
        vec{decode_fn(1, dtype_), decode_fn(2, dtype_), decode_fn(4, dtype_)},
        row_vec{decode_row_fn(1, dtype_), decode_row_fn(2, dtype_), decode_row_fn(4, dtype_)} {}

  size_t scale_buffer() const { return absmax.f32 ? 0 : (size_t)nb; }

  // Row r's codebook (16 floats into code).
  void codebook_of(int64_t r, float* code) const {
    halves_to_floats(codebook + r * kCodebookSlots, code, kCodebookSlots);
  }

  // The scales of row r's blocks b0 .. b0 + n - 1 (decoded into `scales` when double-quantized).
  const float* scales_of(int64_t r, int64_t b0, int64_t n, float* scales) const {
    return absmax.f32 ? absmax.f32 + r * nb + b0 : decode_row_scales(absmax, r * nb + b0, n, scales);
  }

  // Row r's codebook and all its block scales.
  const float* tables(int64_t r, float* scales, float* code) const {
    codebook_of(r, code);
    return scales_of(r, 0, nb, scales);
  }

  void operator()(int64_t r, float* scales, void* out_row) const {
    float code[kCodebookSlots];
    const float* am = tables(r, scales, code);
    const uint8_t* in = packed + row_offsets[r];
    switch (bits[r]) {
      case 1: dequantize_row<1>(in, am, code, cols, blocksize, dtype, out_row, vec[0], row_vec[0]); break;
      case 2: dequantize_row<2>(in, am, code, cols, blocksize, dtype, out_row, vec[1], row_vec[1]); break;
      default: dequantize_row<4>(in, am, code, cols, blocksize, dtype, out_row, vec[2], row_vec[2]); break;
    }
  }
};

void store_as(void* out, int dtype, int64_t i, float v) {
  switch (dtype) {
    case LOWRA_F16: store<LOWRA_F16>(out, i, v); break;
    case LOWRA_BF16: store<LOWRA_BF16>(out, i, v); break;
    default: store<LOWRA_F32>(out, i, v);
  }
}

}  // namespace

int dequantize_cpu(const uint8_t* packed, const AbsmaxSrc& absmax, const uint8_t* bits, const uint16_t* codebook,
                   const int64_t* row_offsets, int64_t rows, int64_t cols, int64_t blocksize, int dtype, void* out) {
  const RowDecoder decode(packed, absmax, bits, codebook, row_offsets, cols, blocksize, dtype);
  ThreadScratch scratch(decode.scale_buffer());
#pragma omp parallel
  {
    float* scales = scratch.mine();
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) decode(r, scales, (char*)out + r * cols * elem_size(dtype));
  }
  return LOWRA_OK;
}

namespace {

// The fused path's working set: each pass over a tile of weight rows covers as many whole blocks as keep the m
// activation rows' share of them within this many bytes (about a core's L1 data cache). 8 rows of a 4096-wide layer
// are 128 KB: dotted a whole row at a time, every weight row streamed them again from L2 (1.1x bitsandbytes' CPU
// time at 8 rows, twenty-sixth round).
constexpr int64_t kActivationPassBytes = 32 * 1024;
constexpr int64_t kTileRows = 16;  // weight rows per tile: the threads' static share; a pass reuses the activations

// Weight row r's m dot products (acc) plus its bias, into column r of out [m, rows] in the activations' dtype.
void store_row_results(const float* acc, int64_t m, int64_t r, int64_t rows, const void* bias, int dtype, void* out) {
  const float b = bias ? load_as_float(bias, dtype, r) : 0.0f;
  for (int64_t i = 0; i < m; ++i) store_as(out, dtype, i * rows + r, acc[i] + b);
}

// The vector pass for whole blocks: rows in tiles, each tile in passes of `chunk` blocks. Where one pass covers the
// row (one activation row, or narrow layers) the sums are the one-pass sums exactly; otherwise a row's pass sums are
// added in pass order.
void matmul_fused_rows(const RowDecoder& decode, const DecodeDotFn fused[3], const float* a, int64_t m, int64_t rows,
                       const void* bias, int dtype, void* out) {
  const int64_t cols = decode.cols, bs = decode.blocksize, nb = decode.nb;
  const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(nb, kActivationPassBytes / (m * bs * 4)));
  const size_t nscales = decode.scale_buffer(), ncode = kTileRows * kCodebookSlots, nacc = (size_t)(kTileRows * m);
  ThreadScratch scratch(nscales + ncode + nacc + (size_t)m);
#pragma omp parallel
  {
    float* const scales = scratch.mine();
    float* const code = scales + nscales;
    float* const acc = code + ncode;
    float* const part = acc + nacc;
#pragma omp for schedule(static)
    for (int64_t t0 = 0; t0 < rows; t0 += kTileRows) {
      const int64_t t1 = std::min(rows, t0 + kTileRows);
      for (int64_t r = t0; r < t1; ++r) decode.codebook_of(r, &code[(r - t0) * kCodebookSlots]);
      for (int64_t b0 = 0; b0 < nb; b0 += chunk) {
        const int64_t n = std::min(chunk, nb - b0);
        for (int64_t r = t0; r < t1; ++r) {
          const int bits = decode.bits[r];
          const DecodeDotFn f = fused[bits == 1 ? 0 : bits == 2 ? 1 : 2];
          const float* am = decode.scales_of(r, b0, n, scales);
          float* row_acc = &acc[(r - t0) * m];
          f(decode.packed + decode.row_offsets[r] + b0 * bs * bits / 8, &code[(r - t0) * kCodebookSlots], am, n, bs,
            a + b0 * bs, cols, b0 == 0 ? row_acc : part);
          if (b0 != 0)
            for (int64_t i = 0; i < m; ++i) row_acc[i] += part[i];
        }
      }
      for (int64_t r = t0; r < t1; ++r) store_row_results(&acc[(r - t0) * m], m, r, rows, bias, dtype, out);
    }
  }
}

}  // namespace

// Each row decoded and dotted with the m activation rows in one vector pass where the layout allows (blocks of a
// multiple of 16 elements, no partial last block; up to kMaxDecodeDotRows rows; matmul_fused_rows); otherwise decoded
// to float32 into a per-thread buffer (the same products as dequantize), then its dot products. The weight is never
// written out.
int matmul_cpu(const void* A, int dtype, int64_t m, const uint8_t* packed, const AbsmaxSrc& absmax,
               const uint8_t* bits, const uint16_t* codebook, const int64_t* row_offsets, int64_t rows, int64_t cols,
               int64_t blocksize, const void* bias, void* out) {
  std::vector<float> a16(dtype == LOWRA_F32 ? 0 : (size_t)(m * cols));  // 16-bit activations as float32
  for (int64_t i = 0; i < (int64_t)a16.size(); ++i) a16[i] = load_as_float(A, dtype, i);
  const float* a = dtype == LOWRA_F32 ? (const float*)A : a16.data();
  const RowDecoder decode(packed, absmax, bits, codebook, row_offsets, cols, blocksize, LOWRA_F32);
  const bool whole_blocks = blocksize % 16 == 0 && cols % blocksize == 0 && m <= kMaxDecodeDotRows;
  const DecodeDotFn fused[3] = {whole_blocks ? decode_dot_fn(1, (int)m) : nullptr,
                                whole_blocks ? decode_dot_fn(2, (int)m) : nullptr,
                                whole_blocks ? decode_dot_fn(4, (int)m) : nullptr};
  if (fused[0]) {  // one vector level serves all three precisions
    matmul_fused_rows(decode, fused, a, m, rows, bias, dtype, out);
    return LOWRA_OK;
  }
  const DotFn dot = dot_fn();
  const size_t nscales = decode.scale_buffer();
  ThreadScratch scratch(nscales + (size_t)cols + (size_t)m);
#pragma omp parallel
  {
    float* const scales = scratch.mine();
    float* const w = scales + nscales;
    float* const acc = w + cols;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      decode(r, scales, w);
      dot(w, a, cols, (int)m, cols, acc);
      store_row_results(acc, m, r, rows, bias, dtype, out);
    }
  }
  return LOWRA_OK;
}

}  // namespace lowra
