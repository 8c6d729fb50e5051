// CUDA kernels against the CPU kernels (themselves tested against a scalar reference): bit-identical outputs.
// Exit code 77 (ctest SKIP_RETURN_CODE) when no GPU is present.
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdio.h>

#include <algorithm>
#include <random>
#include <vector>

#include "common.h"

static int failures = 0;
#define CHECK(cond, ...)                                     \
  do {                                                       \
    if (!(cond)) {                                           \
      ++failures;                                            \
      fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);   \
      fprintf(stderr, __VA_ARGS__);                          \
      fprintf(stderr, "\n");                                 \
    }                                                        \
  } while (0)

template <typename T>
static T* to_device(const std::vector<T>& v) {
  T* d = nullptr;
  cudaMalloc(&d, std::max<size_t>(1, v.size()) * sizeof(T));
  cudaMemcpy(d, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice);
  return d;
}
template <typename T>
static std::vector<T> to_host(const T* d, size_t n) {
  std::vector<T> v(n);
  cudaMemcpy(v.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost);
  return v;
}

static void test_case(int64_t rows, int64_t cols, int64_t bs, uint32_t seed) {
  std::mt19937 rng(seed);
  const int64_t pc = lowra::padded_cols(cols, bs), nb = pc / bs;
  std::vector<uint8_t> bits(rows);
  std::vector<int64_t> off(1, 0);
  const uint8_t choices[3] = {1, 2, 4};
  for (auto& b : bits) {
    b = choices[rng() % 3];
    off.push_back(off.back() + pc * b / 8);
  }
  std::vector<uint16_t> thr(rows * 15, 0x7c00), code(rows * 16, 0);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  for (int64_t r = 0; r < rows; ++r) {
    int n = 1 << bits[r];
    std::vector<float> c(n);
    for (auto& x : c) x = u(rng);
    std::sort(c.begin(), c.end());
    for (int k = 0; k < n; ++k) {
      __half h = __float2half_rn(c[k]);
      code[r * 16 + k] = *(uint16_t*)&h;
    }
    for (int k = 0; k + 1 < n; ++k) {
      __half h = __float2half_rn((c[k] + c[k + 1]) / 2);
      thr[r * 15 + k] = *(uint16_t*)&h;
    }
  }
  std::normal_distribution<float> g(0.f, 1.f);
  std::vector<float> W(rows * cols);
  for (auto& x : W) x = g(rng);
  const int64_t nbytes = off.back();

  std::vector<uint8_t> packed(nbytes);
  std::vector<float> absmax(rows * nb), out(rows * cols);
  CHECK(lowra_quantize_cpu(W.data(), LOWRA_F32, rows, cols, bs, bits.data(), thr.data(), off.data(), packed.data(),
                           nbytes, absmax.data()) == LOWRA_OK, "cpu quantize");
  CHECK(lowra_dequantize_cpu(packed.data(), nbytes, absmax.data(), bits.data(), code.data(), off.data(), rows, cols,
                             bs, LOWRA_F32, out.data()) == LOWRA_OK, "cpu dequantize");

  float* dW = to_device(W);
  uint8_t* dbits = to_device(bits);
  int64_t* doff = to_device(off);
  uint16_t* dthr = to_device(thr);
  uint16_t* dcode = to_device(code);
  uint8_t* dpacked = to_device(std::vector<uint8_t>(nbytes));
  float* dabsmax = to_device(std::vector<float>(rows * nb));
  float* dout = to_device(std::vector<float>(rows * cols));
  int st = lowra_quantize_cuda(dW, LOWRA_F32, rows, cols, bs, dbits, dthr, doff, dpacked, nbytes, dabsmax, nullptr);
  CHECK(st == LOWRA_OK, "cuda quantize status %d (%s)", st, lowra_last_cuda_error());
  st = lowra_dequantize_cuda(dpacked, nbytes, dabsmax, dbits, dcode, doff, rows, cols, bs, LOWRA_F32, dout, nullptr);
  CHECK(st == LOWRA_OK, "cuda dequantize status %d (%s)", st, lowra_last_cuda_error());
  CHECK(to_host(dpacked, nbytes) == packed, "packed differs rows=%lld cols=%lld", (long long)rows, (long long)cols);
  CHECK(to_host(dabsmax, rows * nb) == absmax, "absmax differs");
  CHECK(to_host(dout, rows * cols) == out, "dequantized output differs");
  // corrupt metadata: an offset beyond the buffer must be reported, never followed
  off[rows] += 64;
  off[rows - 1] = nbytes + 1000;
  int64_t* dbad = to_device(off);
  st = lowra_dequantize_cuda(dpacked, nbytes, dabsmax, dbits, dcode, dbad, rows, cols, bs, LOWRA_F32, dout, nullptr);
  CHECK(st == LOWRA_ERR_OFFSETS, "corrupt offsets not reported: %d", st);
  for (void* p : {(void*)dW, (void*)dbits, (void*)doff, (void*)dthr, (void*)dcode, (void*)dpacked, (void*)dabsmax,
                  (void*)dout, (void*)dbad})
    cudaFree(p);
}

int main() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    printf("test_kernels_cuda: no CUDA device, skipped\n");
    return 77;
  }
  const int64_t shapes[][3] = {{1, 64, 64}, {3, 100, 64}, {17, 576, 64}, {64, 4096, 64}, {5, 8, 8}, {9, 130, 32}};
  uint32_t seed = 11;
  for (auto& s : shapes) test_case(s[0], s[1], s[2], seed++);
  if (failures) {
    fprintf(stderr, "%d failures\n", failures);
    return 1;
  }
  printf("test_kernels_cuda: all checks passed\n");
  return 0;
}
