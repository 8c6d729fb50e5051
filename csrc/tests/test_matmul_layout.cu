// CPU emulation of one warp of the fused matmul's tensor-core path (csrc/matmul_layout.h): decodes packed codes of
// a 16-row tile into mma fragments exactly as the kernel does, stages activations in the kernel's shared-memory
// order, emulates mma.m16n8k16 with the PTX fragment layout, and compares with the plain dot product. Needs no GPU,
// so the bit tricks and the column mapping are checked on every machine that has nvcc.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdio.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "matmul_layout.h"

using namespace lowra::mm;

static int failures = 0;

static uint16_t to_bits(float x, bool half) {
  if (half) {
    __half h = __float2half_rn(x);
    return *(uint16_t*)&h;
  }
  __nv_bfloat16 b = __float2bfloat16_rn(x);
  return *(uint16_t*)&b;
}
static float from_bits(uint16_t u, bool half) {
  if (half) return __half2float(*(__half*)&u);
  return __bfloat162float(*(__nv_bfloat16*)&u);
}

template <bool kHalf>
static void check(int P, int m, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-1.f, 1.f);
  const int R = kTileRows;
  // codebooks (float16 storage), codes, packed unit bytes
  std::vector<float> cb(R * 16);
  std::vector<int> code(R * kUnitCols);
  std::vector<uint8_t> packed(R * 32, 0);
  for (int r = 0; r < R; ++r) {
    for (int c = 0; c < 16; ++c) cb[r * 16 + c] = __half2float(__float2half_rn(u(rng)));
    for (int j = 0; j < kUnitCols; ++j) {
      const int c = (int)(rng() % (1u << P));
      code[r * kUnitCols + j] = c;
      packed[r * 32 + j * P / 8] |= (uint8_t)(c << ((j * P) % 8));
    }
  }
  std::vector<float> A(m * kUnitCols);
  for (auto& x : A) x = from_bits(to_bits(u(rng) * 4, kHalf), kHalf);

  // activations staged as the kernel does: 32 words per activation row
  std::vector<uint16_t> Bs(m * 64, 0);
  std::vector<double> S(m, 0), S2(m, 0);
  for (int n = 0; n < m; ++n)
    for (int cu = 0; cu < kUnitCols; ++cu) {
      const int slot = stage_slot(P, cu);
      const int t = slot / 16, pi = (slot / 2) % 8, h = slot % 2;
      if (unit_col(P, t, pi, h) != cu) {
        ++failures;
        fprintf(stderr, "FAIL P=%d: unit_col(stage_slot(%d)) != %d\n", P, cu, cu);
      }
      Bs[n * 64 + stage_word(n, t, pi) * 2 + h] = to_bits(A[n * kUnitCols + cu], kHalf);
      S[n] += A[n * kUnitCols + cu];
      S2[n] += s2_weight(cu) * A[n * kUnitCols + cu];
    }

  // fragments of every lane
  uint32_t magic[4];
  for (int i = 0; i < 4; ++i) magic[i] = Magic<kHalf>::pow2(4 - i);
  double Wm[16][16][4];  // [row][kslot][mma j]
  double Bm[16][8][4];   // [kslot][n][mma j]
  for (int lane = 0; lane < 32; ++lane) {
    const int g = lane / 4, t = lane % 4;
    uint32_t f[2][8];
    for (int half_row = 0; half_row < 2; ++half_row) {
      const int r = g + 8 * half_row;
      const uint8_t* p = &packed[r * 32];
      auto word = [&](int i) { return (uint32_t)p[4 * i] | (uint32_t)p[4 * i + 1] << 8 | (uint32_t)p[4 * i + 2] << 16 | (uint32_t)p[4 * i + 3] << 24; };
      uint16_t v[16];
      for (int c = 0; c < 16; ++c) v[c] = to_bits(cb[r * 16 + c], kHalf);
      if (P == 1) {
        decode1<kHalf>(word(0), word(1), t, f[half_row], magic);
      } else if (P == 2) {
        uint32_t L, H;
        prmt_tables(v, &L, &H);
        decode2(word(t), L, H, f[half_row]);
      } else {
        const uint32_t lo = word(2 * t), hi = word(2 * t + 1);
        for (int pi = 0; pi < 8; ++pi) f[half_row][pi] = lut_entry(v, ((pi < 4 ? lo : hi) >> (8 * (pi & 3))) & 0xff);
      }
    }
    uint32_t b[8];
    for (int pi = 0; pi < 8; ++pi) {
      b[pi] = 0;
      if (g < m) b[pi] = (uint32_t)Bs[g * 64 + stage_word(g, t, pi) * 2] | (uint32_t)Bs[g * 64 + stage_word(g, t, pi) * 2 + 1] << 16;
    }
    for (int j = 0; j < 4; ++j) {
      // a0: (g, 2t..2t+1) a1: (g+8, 2t..) a2: (g, 2t+8..) a3: (g+8, 2t+8..); b0: (2t.., n=g) b1: (2t+8.., n=g)
      const uint32_t a[4] = {f[0][2 * j], f[1][2 * j], f[0][2 * j + 1], f[1][2 * j + 1]};
      for (int q = 0; q < 4; ++q)
        for (int h = 0; h < 2; ++h) {
          const int row = g + 8 * (q & 1), k = 2 * t + h + 8 * (q >> 1);
          Wm[row][k][j] = from_bits((uint16_t)(a[q] >> (16 * h)), kHalf);
        }
      for (int q = 0; q < 2; ++q)
        for (int h = 0; h < 2; ++h) Bm[2 * t + h + 8 * q][g][j] = from_bits((uint16_t)(b[2 * j + q] >> (16 * h)), kHalf);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int n = 0; n < m; ++n) {
      double acc = 0;
      for (int j = 0; j < 4; ++j)
        for (int k = 0; k < 16; ++k) acc += Wm[r][k][j] * Bm[k][n][j];
      double got;
      if (P == 1) {
        const double c0 = cb[r * 16], c1 = cb[r * 16 + 1];
        got = c0 * S[n] + (c1 - c0) * (acc - S2[n]);
      } else {
        got = acc;
      }
      double want = 0, mag = 0;
      for (int j = 0; j < kUnitCols; ++j) {
        const int c = code[r * kUnitCols + j];
        // 2- and 4-bit tiles feed the codebook to the mma in its own type (bf16 rounds), 1-bit ones in fp32
        const double w = P == 1 ? cb[r * 16 + c] : from_bits(to_bits(cb[r * 16 + c], kHalf), kHalf);
        want += w * A[n * kUnitCols + j];
        mag += std::fabs(w * A[n * kUnitCols + j]);
      }
      if (std::fabs(got - want) > 1e-9 * (1 + mag)) {
        ++failures;
        if (failures < 20)
          fprintf(stderr, "FAIL P=%d half=%d m=%d row %d n %d: got %.9g want %.9g\n", P, (int)kHalf, m, r, n, got, want);
      }
    }
}

int main() {
  uint32_t seed = 1;
  for (int P : {1, 2, 4})
    for (int m : {1, 3, 8}) {
      check<true>(P, m, seed++);
      check<false>(P, m, seed++);
    }
  if (failures) {
    fprintf(stderr, "%d failures\n", failures);
    return 1;
  }
  printf("test_matmul_layout: fragment mapping and decoders agree with the dot product\n");
  return 0;
}
