// The chunked linear loss's kernel gradient from bfloat16 operands on CPUs with AVX512_BF16:
// acc += a^T b by vdpbf16ps (two bfloat16 products added to a float32 lane per instruction: twice
// the multiply-adds of float32 FMAs a cycle). Included by the AVX-512 build only (kld_cpu_avx512.cc
// via distill_cpu_impl.h); the functions carry their own target, so that build's flags stay those of
// every AVX-512 CPU and the caller picks them only where the CPU has the instruction.
#ifndef TF_KLD_CC_KERNELS_LINEAR_BF16_DP_H_
#define TF_KLD_CC_KERNELS_LINEAR_BF16_DP_H_

#include <immintrin.h>

#include <cstdint>

namespace tf_kld {
namespace cpu {
namespace {  // internal linkage: the including ISA object exports nothing of it
namespace bf16dp {

#define TF_KLD_BF16DP __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"), always_inline)) inline

constexpr int64_t kPanel = 256;  // columns a block holds (distill::kRankPanel)
constexpr int64_t kBlockPairs = 64;  // pairs of b's rows a block holds (128 rows: 64 KiB, in L2)

// The bfloat16 pairs' bits as vdpbf16ps's operand type (GCC 12: shorts; later: __bf16).
TF_KLD_BF16DP __m512bh AsBh(__m512i v) { return reinterpret_cast<__m512bh&>(v); }

// acc[(i + r) * n + c + 16 v + l] += scale * sum over the block's pairs q of
//   a[2q][i + r] * b[2q][block_c + 16 v + l] + a[2q + 1][i + r] * b[2q + 1][block_c + 16 v + l]
// for a tile of kRows rows of acc and kVecs vectors of 16 columns (the last vector's lanes outside
// `last` left alone). The sums start from 0 in registers; acc is read and written once, at the end.
template <int kRows, int kVecs>
TF_KLD_BF16DP void Tile(const uint32_t* ap, const uint32_t* block, float* acc, int64_t pairs,
                        int64_t m, int64_t n, int64_t i, int64_t c, int64_t block_c, __mmask16 last,
                        __m512 scale) {
  __m512 t[kRows][kVecs];
  for (int r = 0; r < kRows; ++r) {
    for (int v = 0; v < kVecs; ++v) t[r][v] = _mm512_setzero_ps();
  }
  for (int64_t q = 0; q < pairs; ++q) {
    __m512i bv[kVecs];
    for (int v = 0; v < kVecs; ++v) bv[v] = _mm512_load_si512(block + q * kPanel + block_c + 16 * v);
    const uint32_t* aq = ap + q * m + i;
    for (int r = 0; r < kRows; ++r) {
      const __m512i s = _mm512_set1_epi32(static_cast<int>(aq[r]));
      for (int v = 0; v < kVecs; ++v) t[r][v] = _mm512_dpbf16_ps(t[r][v], AsBh(s), AsBh(bv[v]));
    }
  }
  for (int r = 0; r < kRows; ++r) {
    for (int v = 0; v < kVecs; ++v) {
      const __mmask16 mask = v == kVecs - 1 ? last : 0xffff;
      float* dst = acc + (i + r) * n + c + 16 * v;
      _mm512_mask_storeu_ps(dst, mask, _mm512_fmadd_ps(scale, t[r][v], _mm512_maskz_loadu_ps(mask, dst)));
    }
  }
}

// The tiles of kRows rows from row i across the panel's width columns (from acc's column p):
// vectors of 64 columns, then of 16, the last one masked.
template <int kRows>
TF_KLD_BF16DP void RowTiles(const uint32_t* ap, const uint32_t* block, float* acc, int64_t pairs,
                            int64_t m, int64_t n, int64_t i, int64_t p, int64_t width, __m512 scale) {
  int64_t c = 0;
  for (; c + 64 <= width; c += 64) Tile<kRows, 4>(ap, block, acc, pairs, m, n, i, p + c, c, 0xffff, scale);
  for (; c < width; c += 16) {
    const __mmask16 last = width - c >= 16 ? 0xffff : static_cast<__mmask16>((1u << (width - c)) - 1);
    Tile<kRows, 1>(ap, block, acc, pairs, m, n, i, p + c, c, last, scale);
  }
}

// acc[i][c] += scale * sum_j a[j][i] * b[j][c] for every i < m and c in [col_begin, col_end), the
// sum over j < k: a given as pairs of its rows, ap[q][i] = a[2q][i] | a[2q + 1][i] << 16
// ([(k + 1) / 2, m]; for odd k the last pair's upper half 0), b [k, n] bfloat16, acc [m, n]
// float32, row-major. Per panel of kPanel columns, b's rows are interleaved in pairs into a block
// in cache (a pair's two values side by side, as vdpbf16ps takes them), kBlockPairs pairs at a
// time; a tile of 6 rows x 4 vectors of sums stays in registers while the block's pairs go by, and
// is added to acc times scale in one multiply-add. Tiles go a row group at a time across the panel
// (each acc row's panel one contiguous run), the next group's runs fetched meanwhile. Each column's
// arithmetic depends only on its panel's position: split the columns at multiples of kPanel and
// results never depend on the split. (vdpbf16ps takes subnormal inputs and results as 0: terms under
// 2^-126, far below a float32 sum's resolution at any normal size.)
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) inline void LinearGradsBf16(
    const uint32_t* ap, const uint16_t* b, float* acc, int64_t k, int64_t m, int64_t n,
    int64_t col_begin, int64_t col_end, float scale) {
  alignas(64) uint32_t block[kBlockPairs * kPanel];
  const __m512 vscale = _mm512_set1_ps(scale);
  const int64_t all_pairs = (k + 1) / 2;
  for (int64_t p = col_begin; p < col_end; p += kPanel) {
    const int64_t width = p + kPanel < col_end ? kPanel : col_end - p;
    for (int64_t q0 = 0; q0 < all_pairs; q0 += kBlockPairs) {
      const int64_t pairs = all_pairs - q0 < kBlockPairs ? all_pairs - q0 : kBlockPairs;
      for (int64_t q = 0; q < pairs; ++q) {
        const int64_t j = 2 * (q0 + q);
        const uint16_t* r0 = b + j * n + p;
        const uint16_t* r1 = j + 1 < k ? r0 + n : nullptr;
        for (int64_t c = 0; c < width; c += 16) {
          const __mmask16 mask = width - c >= 16 ? 0xffff : static_cast<__mmask16>((1u << (width - c)) - 1);
          __m512i v = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, r0 + c));
          if (r1 != nullptr) {
            const __m512i hi = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, r1 + c));
            v = _mm512_or_si512(v, _mm512_slli_epi32(hi, 16));
          }
          _mm512_store_si512(block + q * kPanel + c, v);
        }
      }
      const uint32_t* aq = ap + q0 * m;
      auto fetch_rows = [&](int64_t from, int64_t to) {  // acc's runs of rows [from, to) in this panel
        for (int64_t r = from; r < to && r < m; ++r) {
          for (int64_t c = 0; c < width; c += 16) {
            _mm_prefetch(reinterpret_cast<const char*>(acc + r * n + p + c), _MM_HINT_T0);
          }
        }
      };
      int64_t i = 0;
      for (; i + 6 <= m; i += 6) {
        fetch_rows(i + 6, i + 12);
        RowTiles<6>(aq, block, acc, pairs, m, n, i, p, width, vscale);
      }
      for (; i + 2 <= m; i += 2) RowTiles<2>(aq, block, acc, pairs, m, n, i, p, width, vscale);
      for (; i < m; ++i) RowTiles<1>(aq, block, acc, pairs, m, n, i, p, width, vscale);
    }
  }
}

#undef TF_KLD_BF16DP

}  // namespace bf16dp
}  // namespace
}  // namespace cpu
}  // namespace tf_kld

#endif  // TF_KLD_CC_KERNELS_LINEAR_BF16_DP_H_
