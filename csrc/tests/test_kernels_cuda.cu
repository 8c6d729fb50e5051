// CUDA kernels against the CPU kernels (themselves tested against a scalar reference): quantize and dequantize
// bit-identical, the fused matmul within float tolerance of a double-precision product of the CPU-dequantized
// weight. Covers every kernel path (fast and generic quantize, dequantize with aligned and byte-wise rows, fused
// matmul fast path per precision with one or several K splits and both prefetch depths, generic matmul) and
// corrupt metadata (skipped and counted, never followed); `compute-sanitizer --tool memcheck` runs this binary.
// Exit code 77 (ctest SKIP_RETURN_CODE) when no GPU is present.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdio.h>

#include <algorithm>
#include <numeric>
#include <random>
#include <vector>

#include "common.h"

#include "tests/check.h"

#define CUDA_OK(call) CHECK((call) == cudaSuccess, "%s: %s", #call, cudaGetErrorString(cudaGetLastError()))

template <typename T>
static T* to_device(const std::vector<T>& v) {
  T* d = nullptr;
  CUDA_OK(cudaMalloc(&d, std::max<size_t>(1, v.size()) * sizeof(T)));
  CUDA_OK(cudaMemcpy(d, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice));
  return d;
}
template <typename T>
static std::vector<T> to_host(const T* d, size_t n) {
  std::vector<T> v(n);
  CUDA_OK(cudaMemcpy(v.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost));
  return v;
}

static uint16_t f2h(float x) {
  __half h = __float2half_rn(x);
  return *(uint16_t*)&h;
}
static uint16_t f2bf(float x) {
  __nv_bfloat16 b = __float2bfloat16_rn(x);
  return *(uint16_t*)&b;
}
static float h2f(uint16_t u) { return __half2float(*(__half*)&u); }
static float bf2f(uint16_t u) { return __bfloat162float(*(__nv_bfloat16*)&u); }

struct Case {
  int64_t rows, cols, bs, pc, nb;
  std::vector<uint8_t> bits;
  std::vector<int64_t> off;
  std::vector<uint16_t> thr, code;
};

static Case make_case(int64_t rows, int64_t cols, int64_t bs, std::mt19937& rng, std::vector<uint8_t> mix = {1, 2, 4}) {
  Case c{rows, cols, bs, lowra::padded_cols(cols, bs), 0, {}, {0}, {}, {}};
  c.nb = c.pc / bs;
  c.thr.assign(rows * 15, 0x7c00);
  c.code.assign(rows * 16, 0);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t b = mix[rng() % mix.size()];
    c.bits.push_back(b);
    c.off.push_back(c.off.back() + c.pc * b / 8);
    const int n = 1 << b;
    std::vector<float> v(n);
    for (auto& x : v) x = u(rng);
    std::sort(v.begin(), v.end());
    for (int k = 0; k < n; ++k) c.code[r * 16 + k] = f2h(v[k]);
    for (int k = 0; k + 1 < n; ++k) c.thr[r * 15 + k] = f2h((v[k] + v[k + 1]) / 2);
  }
  return c;
}

// Quantize + dequantize on CPU and GPU, bit-identical; then corrupt metadata must be skipped and counted.
static void test_quant(int64_t rows, int64_t cols, int64_t bs, int dtype, uint32_t seed) {
  std::mt19937 rng(seed);
  Case c = make_case(rows, cols, bs, rng);
  std::normal_distribution<float> g(0.f, 1.f);
  const size_t esz = dtype == LOWRA_F32 ? 4 : 2;
  std::vector<uint8_t> W(rows * cols * esz);
  for (int64_t i = 0; i < rows * cols; ++i) {
    const float x = g(rng);
    if (dtype == LOWRA_F32) memcpy(&W[i * 4], &x, 4);
    else {
      const uint16_t h = dtype == LOWRA_F16 ? f2h(x) : f2bf(x);
      memcpy(&W[i * 2], &h, 2);
    }
  }
  const int64_t nbytes = c.off.back();
  std::vector<uint8_t> packed(nbytes);
  std::vector<float> absmax(rows * c.nb);
  std::vector<uint8_t> out(rows * cols * esz);
  CHECK(lowra_quantize_cpu(W.data(), dtype, rows, cols, bs, c.bits.data(), c.thr.data(), c.off.data(), packed.data(),
                           nbytes, absmax.data()) == LOWRA_OK, "cpu quantize");
  CHECK(lowra_dequantize_cpu(packed.data(), nbytes, absmax.data(), nullptr, c.bits.data(), c.code.data(), c.off.data(), rows,
                             cols, bs, dtype, out.data()) == LOWRA_OK, "cpu dequantize");
  uint8_t* dW = to_device(W);
  uint8_t* dbits = to_device(c.bits);
  int64_t* doff = to_device(c.off);
  uint16_t* dthr = to_device(c.thr);
  uint16_t* dcode = to_device(c.code);
  uint8_t* dpacked = to_device(std::vector<uint8_t>(nbytes));
  float* dabsmax = to_device(std::vector<float>(rows * c.nb));
  uint8_t* dout = to_device(std::vector<uint8_t>(out.size()));
  int st = lowra_quantize_cuda(dW, dtype, rows, cols, bs, dbits, dthr, doff, dpacked, nbytes, dabsmax, nullptr);
  CHECK(st == LOWRA_OK, "cuda quantize status %d (%s)", st, lowra_last_cuda_error());
  st = lowra_dequantize_cuda(dpacked, nbytes, dabsmax, nullptr, dbits, dcode, doff, rows, cols, bs, dtype, dout, nullptr);
  CHECK(st == LOWRA_OK, "cuda dequantize status %d (%s)", st, lowra_last_cuda_error());
  CHECK(to_host(dpacked, nbytes) == packed, "packed differs rows=%lld cols=%lld bs=%lld dtype=%d", (long long)rows,
        (long long)cols, (long long)bs, dtype);
  CHECK(to_host(dabsmax, rows * c.nb) == absmax, "absmax differs");
  CHECK(to_host(dout, out.size()) == out, "dequantized output differs");
  CHECK(lowra_cuda_take_skipped_rows() == 0, "valid metadata reported as skipped");
  // corrupt metadata: an offset beyond the buffer and an impossible precision are skipped, never followed
  std::vector<int64_t> bad = c.off;
  bad[rows - 1] = nbytes + 1000;
  std::vector<uint8_t> bad_bits = c.bits;
  bad_bits[0] = 3;
  int64_t* dbad = to_device(bad);
  uint8_t* dbad_bits = to_device(bad_bits);
  st = lowra_dequantize_cuda(dpacked, nbytes, dabsmax, nullptr, dbad_bits, dcode, dbad, rows, cols, bs, dtype, dout, nullptr);
  CHECK(st == LOWRA_OK, "launch with corrupt offsets: %d", st);
  st = lowra_quantize_cuda(dW, dtype, rows, cols, bs, dbad_bits, dthr, dbad, dpacked, nbytes, dabsmax, nullptr);
  CHECK(st == LOWRA_OK, "launch with corrupt offsets: %d", st);
  const int64_t skipped = lowra_cuda_take_skipped_rows();
  CHECK(skipped == (rows > 1 ? 4 : 2), "skipped rows %lld", (long long)skipped);
  for (void* p : {(void*)dW, (void*)dbits, (void*)doff, (void*)dthr, (void*)dcode, (void*)dpacked, (void*)dabsmax,
                  (void*)dout, (void*)dbad, (void*)dbad_bits})
    CUDA_OK(cudaFree(p));
}

// Fused matmul against a double-precision product of the CPU-dequantized weight; returns the output's bytes.
static std::vector<uint8_t> test_matmul(int64_t rows, int64_t cols, int64_t bs, int dtype, int64_t m,
                                        std::vector<uint8_t> mix, uint32_t seed, int ks = 0, int depth = 0,
                                        bool plan = true, int gemv = 0, int gemv_r = 0, int gemv_wk = 0,
                                        int batch1 = 0, int wide = 0) {
  std::mt19937 rng(seed);
  Case c = make_case(rows, cols, bs, rng, mix);
  std::normal_distribution<float> g(0.f, 1.f);
  std::vector<float> W(rows * cols);
  for (auto& x : W) x = g(rng);
  const int64_t nbytes = c.off.back();
  std::vector<uint8_t> packed(nbytes);
  std::vector<float> absmax(rows * c.nb), Wd(rows * cols);
  CHECK(lowra_quantize_cpu(W.data(), LOWRA_F32, rows, cols, bs, c.bits.data(), c.thr.data(), c.off.data(),
                           packed.data(), nbytes, absmax.data()) == LOWRA_OK, "cpu quantize");
  CHECK(lowra_dequantize_cpu(packed.data(), nbytes, absmax.data(), nullptr, c.bits.data(), c.code.data(), c.off.data(), rows,
                             cols, bs, LOWRA_F32, Wd.data()) == LOWRA_OK, "cpu dequantize");
  const size_t esz = dtype == LOWRA_F32 ? 4 : 2;
  auto enc = [&](float x, uint8_t* p) {
    if (dtype == LOWRA_F32) memcpy(p, &x, 4);
    else {
      const uint16_t h = dtype == LOWRA_F16 ? f2h(x) : f2bf(x);
      memcpy(p, &h, 2);
    }
  };
  auto dec = [&](const uint8_t* p) {
    if (dtype == LOWRA_F32) {
      float x;
      memcpy(&x, p, 4);
      return x;
    }
    uint16_t h;
    memcpy(&h, p, 2);
    return dtype == LOWRA_F16 ? h2f(h) : bf2f(h);
  };
  std::vector<uint8_t> A(m * cols * esz), bias(rows * esz);
  for (int64_t i = 0; i < m * cols; ++i) enc(2 * g(rng), &A[i * esz]);
  for (int64_t r = 0; r < rows; ++r) enc(g(rng), &bias[r * esz]);
  double err = 0, norm = 0;
  std::vector<double> ref(m * rows);
  for (int64_t n = 0; n < m; ++n)
    for (int64_t r = 0; r < rows; ++r) {
      double s = dec(&bias[r * esz]);
      for (int64_t j = 0; j < cols; ++j) s += (double)dec(&A[(n * cols + j) * esz]) * Wd[r * cols + j];
      ref[n * rows + r] = s;
      norm += s * s;
    }
  // row grouping by precision (stable), as bitsandbytes_lowra._ops.matmul_plan builds it
  std::vector<int32_t> order(rows);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return c.bits[a] < c.bits[b]; });
  int64_t groups[3] = {0, 0, 0};
  for (auto b : c.bits) groups[b == 1 ? 0 : b == 2 ? 1 : 2]++;

  uint8_t* dA = to_device(A);
  uint8_t* dbias = to_device(bias);
  uint8_t* dpacked = to_device(packed);
  float* dabsmax = to_device(absmax);
  uint8_t* dbits = to_device(c.bits);
  uint16_t* dcode = to_device(c.code);
  int64_t* doff = to_device(c.off);
  int32_t* dorder = to_device(order);
  std::vector<uint8_t> poison(m * rows * esz, 0xff);  // NaN in every float type: every output must be written
  uint8_t* dout = to_device(poison);
  lowra_matmul_cuda_set_tuning(ks, 0, depth, 0);
  lowra_matmul_cuda_set_gemv_tuning(gemv, gemv_r, gemv_wk, batch1, wide);
  const int64_t ws_bytes = lowra_matmul_cuda_workspace_size(dtype, m, rows, cols, bs, groups, 0);
  float* dws = nullptr;
  if (ws_bytes > 0) CUDA_OK(cudaMalloc(&dws, ws_bytes));
  const int st = lowra_matmul_cuda(dA, dtype, m, dpacked, nbytes, dabsmax, nullptr, dbits, dcode, doff, rows, cols, bs,
                                   plan ? dorder : nullptr, plan ? groups : nullptr, dbias, dout, dws, ws_bytes,
                                   nullptr);
  CHECK(st == LOWRA_OK, "cuda matmul status %d (%s)", st, lowra_last_cuda_error());
  const std::vector<uint8_t> out = to_host(dout, m * rows * esz);
  for (int64_t i = 0; i < m * rows; ++i) {
    const double d = dec(&out[i * esz]) - ref[i];
    err += d * d;
  }
  const double rel = sqrt(err / (norm > 0 ? norm : 1));
  const double tol = dtype == LOWRA_BF16 ? 8e-3 : dtype == LOWRA_F16 ? 2e-3 : 1e-5;
  CHECK(rel < tol, "matmul rows=%lld cols=%lld bs=%lld dtype=%d m=%lld ks=%d depth=%d plan=%d gemv=%d/%d/%d/%d/%d: rel err %g",
        (long long)rows, (long long)cols, (long long)bs, dtype, (long long)m, ks, depth, (int)plan, gemv, gemv_r,
        gemv_wk, batch1, wide, rel);
  CHECK(lowra_cuda_take_skipped_rows() == 0, "valid metadata reported as skipped");
  if (plan && m <= 16 && dtype != LOWRA_F32 && cols % 256 == 0 && bs % 64 == 0) {  // the fast path reads row_order
    // a row_order naming an out-of-range row and a row of the wrong precision: skipped, counted, in bounds
    std::vector<int32_t> bad = order;
    bad[0] = (int32_t)(rows + 7);
    if (groups[1] > 0 && groups[2] > 0) bad[rows - 1] = order[groups[0]];
    int32_t* dbad = to_device(bad);
    const int st2 = lowra_matmul_cuda(dA, dtype, m, dpacked, nbytes, dabsmax, nullptr, dbits, dcode, doff, rows, cols, bs, dbad,
                                      groups, dbias, dout, dws, ws_bytes, nullptr);
    CHECK(st2 == LOWRA_OK, "launch with corrupt row order: %d", st2);
    CHECK(lowra_cuda_take_skipped_rows() >= 1, "corrupt row order not counted");
    CUDA_OK(cudaFree(dbad));
  }
  lowra_matmul_cuda_set_tuning(0, 0, 0, 0);  // after the last call sized by this tuning's workspace
  lowra_matmul_cuda_set_gemv_tuning(0, 0, 0, 0, 0);
  for (void* p : {(void*)dA, (void*)dbias, (void*)dpacked, (void*)dabsmax, (void*)dbits, (void*)dcode, (void*)doff,
                  (void*)dorder, (void*)dout, (void*)dws})
    CUDA_OK(cudaFree(p));
  return out;
}

int main() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    printf("test_kernels_cuda: no CUDA device, skipped\n");
    return 77;
  }
  const int64_t shapes[][3] = {{1, 64, 64},  {3, 100, 64}, {17, 576, 64}, {64, 4096, 64}, {5, 8, 8},
                               {9, 130, 32}, {4, 200, 24}, {3, 1000, 512}, {2, 33, 8}, {40, 2048, 256},
                               {9, 2056, 8}};
  uint32_t seed = 11;
  for (auto& s : shapes)
    for (int dtype : {LOWRA_F32, LOWRA_F16, LOWRA_BF16}) test_quant(s[0], s[1], s[2], dtype, seed++);
  const std::vector<std::vector<uint8_t>> mixes = {{1}, {2}, {4}, {1, 2, 4}};
  for (int dtype : {LOWRA_F16, LOWRA_BF16})
    for (const auto& mix : mixes)
      for (int64_t m : {1, 9}) test_matmul(70, 1024, 64, dtype, m, mix, seed++);
  test_matmul(33, 2048, 128, LOWRA_BF16, 16, {1, 2, 4}, seed++, /*ks=*/1, /*depth=*/2);
  test_matmul(33, 2048, 128, LOWRA_BF16, 5, {1, 2, 4}, seed++, /*ks=*/2, /*depth=*/3);
  test_matmul(40, 1024, 64, LOWRA_F16, 4, {1, 2, 4}, seed++, 0, 0, /*plan=*/false, /*gemv=*/-1);  // generic kernel
  test_matmul(40, 1024, 64, LOWRA_F16, 4, {1, 2, 4}, seed++, 0, 0, /*plan=*/false, 4);  // GEMV, natural row order
  // GEMV (1-4 activation rows, forced up to 4): every precision mix, partial steps (cols not a multiple of 1024), K splits through
  // the workspace (28672 columns), both rows-per-warp variants and every split of the warps along K; and the
  // tensor-core path at the same m
  for (int dtype : {LOWRA_F16, LOWRA_BF16})
    for (const auto& mix : mixes)
      for (int64_t m : {1, 2, 3, 4}) test_matmul(45, 2304, 128, dtype, m, mix, seed++, 0, 0, true, 4);
  for (int64_t m : {1, 4}) test_matmul(9, 28672, 64, LOWRA_BF16, m, {1, 2, 4}, seed++, 0, 0, true, 4);
  test_matmul(130, 128, 32, LOWRA_F16, 2, {1, 2, 4}, seed++);
  for (int r : {4, 8})
    for (int wk : {1, 2, 4, 8})
      for (int64_t m : {1, 3}) test_matmul(77, 4096, 64, LOWRA_BF16, m, {1, 2, 4}, seed++, 0, 0, true, 4, r, wk);
  // m = 1 on the multi-row kernel (the batch-1 kernel off), and the batch-1 kernel at every rows-per-task setting:
  // partial steps, K splits, natural row order, a mixed warp (rows not grouped), blocksize 32 and 256; in 1024-column
  // steps and in wide steps
  for (int b1 : {-1, 2, 4})
    for (int wide : {-1, 1})
      for (const auto& mix : mixes)
        test_matmul(45, 2304, 128, LOWRA_BF16, 1, mix, seed++, 0, 0, true, 0, 0, 0, b1, wide);
  for (int b1 : {2, 4})
    for (int wide : {-1, 1}) {
      test_matmul(9, 28672, 64, LOWRA_F16, 1, {1, 2, 4}, seed++, 0, 0, true, 0, 0, 0, b1, wide);
      test_matmul(37, 3200, 32, LOWRA_BF16, 1, {1, 2, 4}, seed++, 0, 0, /*plan=*/false, 0, 0, 0, b1, wide);
      test_matmul(21, 9216, 256, LOWRA_F16, 1, {4, 1}, seed++, 0, 0, true, 0, 0, 0, b1, wide);
    }
  {  // the automatic step kind on a large layer (10240 tasks of 4 rows: >= 3 per warp up to 213 SMs): wide steps for
     // rows grouped by precision, 1024-column steps in natural row order, where tasks mix precisions
    const auto run = [&](bool plan, int wide) {
      return test_matmul(40960, 1024, 64, LOWRA_BF16, 1, {1, 2, 4}, 1234, 0, 0, plan, 0, 0, 0, 0, wide);
    };
    CHECK(run(true, 0) == run(true, 1), "grouped rows: the automatic step kind is not wide steps");
    CHECK(run(false, 0) == run(false, -1), "natural row order: the automatic step kind is not 1024-column steps");
    CHECK(run(false, 1) != run(false, -1), "both step kinds give the same bytes: the two checks above prove nothing");
  }
  for (int64_t m : {1, 4}) test_matmul(70, 1024, 64, LOWRA_BF16, m, {1, 2, 4}, seed++, 0, 0, true, /*gemv=*/-1);
  test_matmul(24, 576, 64, LOWRA_BF16, 3, {1, 2, 4}, seed++);                         // generic: odd width
  test_matmul(12, 300, 32, LOWRA_F32, 20, {1, 2, 4}, seed++);                          // generic: fp32, many rows
  if (failures) {
    fprintf(stderr, "%d failures\n", failures);
    return 1;
  }
  printf("test_kernels_cuda: all checks passed\n");
  return 0;
}
