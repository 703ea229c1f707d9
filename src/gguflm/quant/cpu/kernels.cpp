// Fused CPU kernels for GGUF block-quantized weights (built by gguflm/quant/cpu/build.py).
//
// Every op reads the weight in its GGUF encoding, a [N rows, K] matrix stored row by row,
// each row K / QK blocks of BYTES bytes (ggml-common.h's block_* structs; the Python side
// checks (QK, BYTES) of every type below against gguflm.gguf.types.LAYOUTS at load time).
//
//   qmatmul(x [M, K] f32, w uint8, type, N, K) -> y [M, N] f32,  y = x @ W^T
//     M <= fused_max_m() (128 on AVX-512, 1 on the portable path): fused dequantize x dot,
//       W never materialized. Each block is written w[j] = d * q[j] + m (d, m per group of
//       32, or d per 16 for Q6_K) and every weight enters with that real value, products
//       accumulated in float32, no rounding of the weights at all:
//       1 or 2 rows (row kernels): d * sum_j q[j] x[j] + m * sum_j x[j] per group
//         (Q4_K on AVX-512 VNNI CPUs: sum_j q[j] x[j] in exact integers, x written as 30-bit
//         integers per 32-group, see dot_row_q4k_vnni);
//       3 or more (panel kernels, AVX-512): each weight row is decoded once per product
//         into q[j] * d (exact in float32) and its groups' m, then multiplied with all M
//         rows in register tiles (see decode_panel_avx512).
//     more rows: rows of W dequantized tile by tile into float32 (bit-identical to
//       libggml's to_float) and multiplied with at::mm (MKL/oneDNN sgemm).
//   dequantize_rows(w, type, N, K, rows int64 [R]) -> [R, K] f32, bit-identical to
//     libggml's to_float (the embedding lookup, and the tiles above).
//   block_step(...): a whole decoder block for one step, composed from the architecture's
//     choices passed in (see its comment), so a step costs one call per layer instead of
//     ~40 torch ops.
//
// Two code paths with one result contract: AVX-512 (chosen at run time when the CPU has
// avx512f/bw/vl) and portable C++ (any CPU). The file is compiled with -ffp-contract=off:
// every a*b+c in a dequantizer is two roundings, as in ggml-quants.c; the dot products use
// explicit FMA intrinsics.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/_softmax.h>
#include <ATen/ops/arange.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/scaled_dot_product_attention.h>
#include <ATen/ops/silu.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <tuple>
#include <type_traits>
#include <vector>

#include <sys/mman.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) || defined(_M_X64)
#define GGUFLM_X86 1
#include <immintrin.h>
#endif

namespace {

// Which kernel multiplies M activation rows (measured on SmolLM2's weights, docs/cpu-kernels.md):
// AVX-512: M < kPanelMinM the row kernels, up to kPanelMaxM the panel kernels (1.3-1.5x
// sgemm tiles at 16-64 rows, even at 256), beyond that exact tiles into sgemm; portable
// path: the row kernel up to kPortableFusedMaxM rows, beyond that tiles (2x at M = 2).
constexpr int64_t kPanelMinM = 3;
constexpr int64_t kPanelMaxM = 128;
constexpr int64_t kPortableFusedMaxM = 1;
constexpr int64_t kPanelRows = 4;          // weight rows of one panel
constexpr int64_t kTileRows = 6;           // most activation rows of one register tile (4 x 6 accumulators)
constexpr int64_t kTileElems = 1 << 21;    // float32 elements of one dequantized tile (8 MiB)
constexpr int64_t kGrainElems = 1 << 14;   // weights per thread below which a GEMV stays serial
// Base-256 digits of an activation in the VNNI row kernels (see xint_row_avx512): 4 keeps
// the float32 kernels' accuracy (measured: end-to-end KL vs the float64 reference equal),
// 3 is ~10 % faster on Q4_K with 2.5-7x their KL.
constexpr int kVnniDigits = 4;

bool g_use_simd = true;
// Batch-invariant mode (set_batch_invariant): every row of a product or of attention is
// computed by the same code in the same order whatever the number of rows of its step
// (AVX-512 path: the panel kernels at every M, attention row by row, never SDPA), so a
// sequence's results do not depend on who shares its step or how its prompt was chunked.
bool g_invariant = false;

inline uint16_t rd16(const uint8_t* p) { uint16_t v; std::memcpy(&v, p, 2); return v; }
inline uint32_t rd32(const uint8_t* p) { uint32_t v; std::memcpy(&v, p, 4); return v; }

// ggml's GGML_FP16_TO_FP32 (exact for every finite half; NaN keeps its payload, quieted).
float f16_bits_to_f32(uint32_t h) {
  const uint32_t sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu;
  uint32_t bits;
  if (exp == 0) {
    float v = static_cast<float>(man) * 0x1p-24f;  // subnormal (or zero): exact
    std::memcpy(&bits, &v, 4);
    bits |= sign;
  } else if (exp == 0x1F) {
    bits = sign | 0x7F800000u | (man << 13) | (man ? 0x400000u : 0u);
  } else {
    bits = sign | ((exp + 112) << 23) | (man << 13);
  }
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

// All 65536 halves widened once (256 KiB): in the kernels a scale is one load, which is
// cheaper than F16C's scalar convert (a lane insert plus a convert per value).
struct F16Table {
  float v[65536];
  F16Table() { for (uint32_t h = 0; h < 65536; ++h) v[h] = f16_bits_to_f32(h); }
};
const F16Table kF16;

inline float f16(const uint8_t* p) { return kF16.v[rd16(p)]; }

// The 6-bit scale and min of group j (0..7) of a Q4_K/Q5_K super-block (12 packed bytes).
inline void scale_min_k4(int j, const uint8_t* s, int* sc, int* mn) {
  if (j < 4) {
    *sc = s[j] & 63;
    *mn = s[j + 4] & 63;
  } else {
    *sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
    *mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
}

// ---------------------------------------------------------------------------------------
// Per-type block traits. QK elements in BYTES bytes. MIN: the block has an additive term
// (w = d*q + m). SPLIT: the two 16-element halves of a 32-group have their own d (Q6_K).
// dequant(): the scalar reference, libggml's dequantize_row_* formula for one block.
// ---------------------------------------------------------------------------------------

struct Q4_0 {
  static constexpr int64_t ID = 2, QK = 32, BYTES = 2 + 16;
  static constexpr bool MIN = false, SPLIT = false;
  static void dequant(const uint8_t* b, float* y) {  // y = (q - 8) * d
    const float d = f16(b);
    for (int j = 0; j < 16; ++j) {
      y[j] = static_cast<float>((b[2 + j] & 0xF) - 8) * d;
      y[j + 16] = static_cast<float>((b[2 + j] >> 4) - 8) * d;
    }
  }
};

struct Q4_1 {
  static constexpr int64_t ID = 3, QK = 32, BYTES = 2 + 2 + 16;
  static constexpr bool MIN = true, SPLIT = false;
  static void dequant(const uint8_t* b, float* y) {  // y = q * d + m
    const float d = f16(b), m = f16(b + 2);
    int32_t q[32];
    for (int j = 0; j < 16; ++j) {
      q[j] = b[4 + j] & 0xF;
      q[j + 16] = b[4 + j] >> 4;
    }
    for (int j = 0; j < 32; ++j) y[j] = static_cast<float>(q[j]) * d + m;
  }
};

struct Q5_0 {
  static constexpr int64_t ID = 6, QK = 32, BYTES = 2 + 4 + 16;
  static constexpr bool MIN = false, SPLIT = false;
  static void dequant(const uint8_t* b, float* y) {  // y = (q - 16) * d, q = nibble | qh bit << 4
    const float d = f16(b);
    const uint32_t qh = rd32(b + 2);
    for (int j = 0; j < 16; ++j) {
      const int h0 = ((qh >> j) & 1) << 4, h1 = ((qh >> (j + 16)) & 1) << 4;
      y[j] = static_cast<float>(((b[6 + j] & 0xF) | h0) - 16) * d;
      y[j + 16] = static_cast<float>(((b[6 + j] >> 4) | h1) - 16) * d;
    }
  }
};

struct Q5_1 {
  static constexpr int64_t ID = 7, QK = 32, BYTES = 2 + 2 + 4 + 16;
  static constexpr bool MIN = true, SPLIT = false;
  static void dequant(const uint8_t* b, float* y) {  // y = q * d + m
    const float d = f16(b), m = f16(b + 2);
    const uint32_t qh = rd32(b + 4);
    for (int j = 0; j < 16; ++j) {
      const int h0 = ((qh >> j) & 1) << 4, h1 = ((qh >> (j + 16)) & 1) << 4;
      y[j] = static_cast<float>((b[8 + j] & 0xF) | h0) * d + m;
      y[j + 16] = static_cast<float>((b[8 + j] >> 4) | h1) * d + m;
    }
  }
};

struct Q8_0 {
  static constexpr int64_t ID = 8, QK = 32, BYTES = 2 + 32;
  static constexpr bool MIN = false, SPLIT = false;
  static void dequant(const uint8_t* b, float* y) {  // y = q * d
    const float d = f16(b);
    for (int j = 0; j < 32; ++j) y[j] = static_cast<float>(static_cast<int8_t>(b[2 + j])) * d;
  }
};

struct Q4_K {
  static constexpr int64_t ID = 12, QK = 256, BYTES = 2 + 2 + 12 + 128;
  static constexpr bool MIN = true, SPLIT = false;
  static void dequant(const uint8_t* b, float* y) {  // group g: y = (d*sc_g) * q - dmin*mn_g
    const float d = f16(b), dmin = f16(b + 2);
    const uint8_t* q = b + 16;
    for (int j = 0; j < 4; ++j, q += 32, y += 64) {
      int sc, mn;
      scale_min_k4(2 * j, b + 4, &sc, &mn);
      const float d1 = d * static_cast<float>(sc), m1 = dmin * static_cast<float>(mn);
      scale_min_k4(2 * j + 1, b + 4, &sc, &mn);
      const float d2 = d * static_cast<float>(sc), m2 = dmin * static_cast<float>(mn);
      for (int l = 0; l < 32; ++l) y[l] = d1 * static_cast<float>(q[l] & 0xF) - m1;
      for (int l = 0; l < 32; ++l) y[l + 32] = d2 * static_cast<float>(q[l] >> 4) - m2;
    }
  }
};

struct Q5_K {
  static constexpr int64_t ID = 13, QK = 256, BYTES = 2 + 2 + 12 + 32 + 128;
  static constexpr bool MIN = true, SPLIT = false;
  static void dequant(const uint8_t* b, float* y) {  // as Q4_K, q = nibble + 16 * qh bit
    const float d = f16(b), dmin = f16(b + 2);
    const uint8_t* qh = b + 16;
    const uint8_t* q = b + 48;
    for (int j = 0; j < 4; ++j, q += 32, y += 64) {
      int sc, mn;
      scale_min_k4(2 * j, b + 4, &sc, &mn);
      const float d1 = d * static_cast<float>(sc), m1 = dmin * static_cast<float>(mn);
      scale_min_k4(2 * j + 1, b + 4, &sc, &mn);
      const float d2 = d * static_cast<float>(sc), m2 = dmin * static_cast<float>(mn);
      const int u1 = 1 << (2 * j), u2 = 2 << (2 * j);
      for (int l = 0; l < 32; ++l) y[l] = d1 * static_cast<float>((q[l] & 0xF) + (qh[l] & u1 ? 16 : 0)) - m1;
      for (int l = 0; l < 32; ++l) y[l + 32] = d2 * static_cast<float>((q[l] >> 4) + (qh[l] & u2 ? 16 : 0)) - m2;
    }
  }
};

struct Q6_K {
  static constexpr int64_t ID = 14, QK = 256, BYTES = 128 + 64 + 16 + 2;
  static constexpr bool MIN = false, SPLIT = true;
  static void dequant(const uint8_t* b, float* y) {  // y = (d * sc) * (q - 32), q 6-bit
    const float d = f16(b + 208);
    const uint8_t* ql = b;
    const uint8_t* qh = b + 128;
    const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
    for (int n = 0; n < 2; ++n, ql += 64, qh += 32, sc += 8, y += 128) {
      for (int l = 0; l < 32; ++l) {
        const int is = l / 16;
        const int q1 = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
        const int q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
        const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
        const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
        y[l] = d * static_cast<float>(sc[is]) * static_cast<float>(q1);
        y[l + 32] = d * static_cast<float>(sc[is + 2]) * static_cast<float>(q2);
        y[l + 64] = d * static_cast<float>(sc[is + 4]) * static_cast<float>(q3);
        y[l + 96] = d * static_cast<float>(sc[is + 6]) * static_cast<float>(q4);
      }
    }
  }
};

// Floats in a row of a multi-row decode panel of T (see decode_panel_avx512): the K scaled
// codes, then for MIN types the K/32 group terms, padded to a multiple of 16.
template <class T> constexpr int64_t panel_width(int64_t K) { return K + (T::MIN ? (K / 32 + 15) / 16 * 16 : 0); }

// ---------------------------------------------------------------------------------------
// Portable path: dequantize one block exactly, then dot it with the activations.
// ---------------------------------------------------------------------------------------

// y[n] = W[n] . x for rows n in [n0, n1), one activation row x [K] (the portable path
// fuses single rows only).
template <class T>
void gemv_row_generic(const uint8_t* w, const float* x, int64_t K, int64_t n0, int64_t n1, float* y) {
  const int64_t nb = K / T::QK;
  float blk[T::QK];
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * nb * T::BYTES;
    float acc = 0.0f;
    for (int64_t i = 0; i < nb; ++i) {
      T::dequant(row + i * T::BYTES, blk);
      const float* xi = x + i * T::QK;
      float s[8] = {};  // eight partial sums: a float reduction the compiler may vectorize
      for (int64_t j = 0; j < T::QK; j += 8)
        for (int l = 0; l < 8; ++l) s[l] += blk[j + l] * xi[j + l];
      acc += ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
    }
    y[n] = acc;
  }
}

template <class T>
void dequant_rows_generic(const uint8_t* w, int64_t K, const int64_t* rows, int64_t R, float* out) {
  const int64_t nb = K / T::QK;
  for (int64_t r = 0; r < R; ++r) {
    const uint8_t* row = w + rows[r] * nb * T::BYTES;
    for (int64_t i = 0; i < nb; ++i) T::dequant(row + i * T::BYTES, out + r * K + i * T::QK);
  }
}

// ---------------------------------------------------------------------------------------
// The paged KV cache seen by attention: the keys (or values) of one sequence and one KV
// head. Layer cache [n_blocks, Hkv, bs, D]; key j (counted from `off`, a sliding window's
// first key) lies in block tbl[(off + j) / bs], row (off + j) % bs. A Cursor walks keys
// j, j + 1, ... one block lookup per block, not per key.
// ---------------------------------------------------------------------------------------
struct Pages {
  const float* base;   // the layer's cache
  const int64_t* tbl;  // the sequence's blocks
  int64_t bs, block_stride, head_off, D;  // bs, Hkv * bs * D, hk * bs * D, D
  int64_t off = 0;
  const float* block(int64_t b) const { return base + tbl[b] * block_stride + head_off; }
  const float* row(int64_t j) const { return block((off + j) / bs) + (off + j) % bs * D; }
  Pages from(int64_t lo) const { Pages p = *this; p.off += lo; return p; }
};

struct Cursor {
  const Pages& pg;
  int64_t b, o;
  const float* blk = nullptr;  // block b's rows; fetched when first read (b may lie past the table)
  Cursor(const Pages& p, int64_t j) : pg(p), b((p.off + j) / p.bs), o((p.off + j) % p.bs) {}
  const float* get() {
    if (!blk) blk = pg.block(b);
    return blk + o * pg.D;
  }
  void next() {
    if (++o == pg.bs) { o = 0; ++b; blk = nullptr; }
  }
};

// ---------------------------------------------------------------------------------------
// AVX-512 path. groups(block, f) calls f(g, qlo, qhi, dlo, dhi, m) for each 32-element
// group g of the block: qlo/qhi the integer codes of elements 0..15 / 16..31 as floats,
// w = dlo * qlo + m (dhi for the upper half), with exactly the float32 d and m libggml uses.
// ---------------------------------------------------------------------------------------
#ifdef GGUFLM_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma")

inline __m512i u8x16(const uint8_t* p) { return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline __m512 ps(__m512i v) { return _mm512_cvtepi32_ps(v); }

template <class T> struct Simd;

// f(std::integral_constant<int, I>) for I = 0 .. N-1, unrolled: group indices stay
// compile-time constants, so the accumulators they select stay in registers.
template <int N, int I = 0, class F> [[gnu::always_inline]] inline void static_for(F&& f) {
  if constexpr (I < N) {
    f(std::integral_constant<int, I>{});
    static_for<N, I + 1>(f);
  }
}

// Codes to floats by table lookup: vpermps reads only the low 4 bits of each index lane,
// so a nibble needs no masking; a 5th bit is a masked add of 16.
inline __m512 iota_ps(float first) {
  return _mm512_add_ps(_mm512_set1_ps(first),
                       _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0));
}
inline __m512 lut(__m512i idx, __m512 table) { return _mm512_permutexvar_ps(idx, table); }
inline __m512 lut5(__m512i idx, __mmask16 bit4, __m512 lo_table) {  // + 16 where bit4
  const __m512 v = lut(idx, lo_table);
  return _mm512_mask_add_ps(v, bit4, v, _mm512_set1_ps(16.0f));
}

template <> struct Simd<Q4_0> {
  template <class F> [[gnu::always_inline]] static inline void groups(const uint8_t* b, F&& f) {
    const __m512i v = u8x16(b + 2);
    const __m512 t = iota_ps(-8.0f);
    const float d = f16(b);
    f(std::integral_constant<int, 0>{}, lut(v, t), lut(_mm512_srli_epi32(v, 4), t), d, d, 0.0f);
  }
};

template <> struct Simd<Q4_1> {
  template <class F> [[gnu::always_inline]] static inline void groups(const uint8_t* b, F&& f) {
    const __m512i v = u8x16(b + 4);
    const __m512 t = iota_ps(0.0f);
    const float d = f16(b);
    f(std::integral_constant<int, 0>{}, lut(v, t), lut(_mm512_srli_epi32(v, 4), t), d, d, f16(b + 2));
  }
};

template <> struct Simd<Q5_0> {
  template <class F> [[gnu::always_inline]] static inline void groups(const uint8_t* b, F&& f) {
    const uint32_t qh = rd32(b + 2);
    const __m512i v = u8x16(b + 6);
    const __m512 t0 = iota_ps(-16.0f);
    const float d = f16(b);
    f(std::integral_constant<int, 0>{}, lut5(v, static_cast<__mmask16>(qh), t0),
      lut5(_mm512_srli_epi32(v, 4), static_cast<__mmask16>(qh >> 16), t0), d, d, 0.0f);
  }
};

template <> struct Simd<Q5_1> {
  template <class F> [[gnu::always_inline]] static inline void groups(const uint8_t* b, F&& f) {
    const uint32_t qh = rd32(b + 4);
    const __m512i v = u8x16(b + 8);
    const __m512 t0 = iota_ps(0.0f);
    const float d = f16(b);
    f(std::integral_constant<int, 0>{}, lut5(v, static_cast<__mmask16>(qh), t0),
      lut5(_mm512_srli_epi32(v, 4), static_cast<__mmask16>(qh >> 16), t0), d, d, f16(b + 2));
  }
};

template <> struct Simd<Q8_0> {
  template <class F> [[gnu::always_inline]] static inline void groups(const uint8_t* b, F&& f) {
    const float d = f16(b);
    const __m512 lo = ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 2))));
    const __m512 hi = ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 18))));
    f(std::integral_constant<int, 0>{}, lo, hi, d, d, 0.0f);
  }
};

// The eight (d * scale, -(dmin * min)) pairs of a Q4_K/Q5_K super-block, as libggml computes
// them (float32 products of the F16 scales and the 6-bit integers of scale_min_k4; exact
// negation). The 12 packed bytes are three little-endian words a, b, c:
//   scales 0..3 = a & 63 (per byte)    scales 4..7 = (c & 15) | (a >> 6) << 4
//   mins   0..3 = b & 63               mins   4..7 = (c >> 4) | (b >> 6) << 4
[[gnu::always_inline]] inline __m256 k4_scales(const uint8_t* b, float* dg, float* mg) {
  const uint32_t a = rd32(b + 4), bb = rd32(b + 8), c = rd32(b + 12);
  const uint64_t sc = (a & 0x3F3F3F3Fu) | static_cast<uint64_t>((c & 0x0F0F0F0Fu) | (((a >> 6) & 0x03030303u) << 4)) << 32;
  const uint64_t mn = (bb & 0x3F3F3F3Fu) | static_cast<uint64_t>(((c >> 4) & 0x0F0F0F0Fu) | (((bb >> 6) & 0x03030303u) << 4)) << 32;
  const __m256 s8 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<int64_t>(sc))));
  const __m256 m8 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<int64_t>(mn))));
  _mm256_store_ps(dg, _mm256_mul_ps(_mm256_set1_ps(f16(b)), s8));
  const __m256 neg_mins = _mm256_xor_ps(_mm256_mul_ps(_mm256_set1_ps(f16(b + 2)), m8), _mm256_set1_ps(-0.0f));
  _mm256_store_ps(mg, neg_mins);
  return neg_mins;
}

// Types whose groups() also hands back the eight group terms m of a block as one vector
// (the K-quants with mins): the row kernels add m * sum(x) per block in one vector FMA
// instead of eight scalar ones.
template <class T> constexpr bool kMins8 = false;

template <> constexpr bool kMins8<Q4_K> = true;
template <> struct Simd<Q4_K> {
  template <class F> [[gnu::always_inline]] static inline void groups(const uint8_t* b, F&& f) {
    __m256 mins;
    groups(b, f, mins);
  }
  template <class F> [[gnu::always_inline]] static inline void groups(const uint8_t* b, F&& f, __m256& mins) {
    alignas(32) float dg[8], mg[8];
    mins = k4_scales(b, dg, mg);
    const __m512 t = iota_ps(0.0f);
    static_for<4>([&](auto J) {
      constexpr int j = J;
      const uint8_t* q = b + 16 + 32 * j;
      const __m512i v0 = u8x16(q), v1 = u8x16(q + 16);
      f(std::integral_constant<int, 2 * j>{}, lut(v0, t), lut(v1, t), dg[2 * j], dg[2 * j], mg[2 * j]);
      f(std::integral_constant<int, 2 * j + 1>{}, lut(_mm512_srli_epi32(v0, 4), t), lut(_mm512_srli_epi32(v1, 4), t),
        dg[2 * j + 1], dg[2 * j + 1], mg[2 * j + 1]);
    });
  }
};

template <> constexpr bool kMins8<Q5_K> = true;
template <> struct Simd<Q5_K> {
  template <class F> [[gnu::always_inline]] static inline void groups(const uint8_t* b, F&& f) {
    __m256 mins;
    groups(b, f, mins);
  }
  template <class F> [[gnu::always_inline]] static inline void groups(const uint8_t* b, F&& f, __m256& mins) {
    alignas(32) float dg[8], mg[8];
    mins = k4_scales(b, dg, mg);
    const __m512 t0 = iota_ps(0.0f);
    const __m512i h0 = u8x16(b + 16), h1 = u8x16(b + 32);
    static_for<4>([&](auto J) {
      constexpr int j = J;
      const uint8_t* q = b + 48 + 32 * j;
      const __m512i v0 = u8x16(q), v1 = u8x16(q + 16);
      const __m512i bit_lo = _mm512_set1_epi32(1 << (2 * j)), bit_hi = _mm512_set1_epi32(2 << (2 * j));
      f(std::integral_constant<int, 2 * j>{}, lut5(v0, _mm512_test_epi32_mask(h0, bit_lo), t0),
        lut5(v1, _mm512_test_epi32_mask(h1, bit_lo), t0), dg[2 * j], dg[2 * j], mg[2 * j]);
      f(std::integral_constant<int, 2 * j + 1>{}, lut5(_mm512_srli_epi32(v0, 4), _mm512_test_epi32_mask(h0, bit_hi), t0),
        lut5(_mm512_srli_epi32(v1, 4), _mm512_test_epi32_mask(h1, bit_hi), t0), dg[2 * j + 1], dg[2 * j + 1],
        mg[2 * j + 1]);
    });
  }
};

// Signed byte codes 16L..16L+15 of a 64-byte vector, as floats.
template <int L> inline __m512 codes16(__m512i c) { return ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(c, L))); }

template <> struct Simd<Q6_K> {
  // Half n (elements 128n..128n+127) in two 64-byte vectors of signed codes q - 32:
  // elements 0..63 of the half take the low nibbles of ql[64n..64n+63] and bits (0,1) / (2,3)
  // of qh[32n + l] for l < 32 / l >= 32; elements 64..127 the high nibbles and bits (4,5) / (6,7).
  // 16-element group e/16 has the scale d * sc[8n + e/16].
  [[gnu::always_inline]] static inline __m512 scales(const uint8_t* b) {  // d * sc of the 16 sub-groups (exact)
    return _mm512_mul_ps(_mm512_set1_ps(f16(b + 208)),
                         _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 192)))));
  }
  [[gnu::always_inline]] static inline void half_codes(const uint8_t* b, int n, __m512i& c0, __m512i& c1) {
    const __m512i m4 = _mm512_set1_epi8(0x0F), m2 = _mm512_set1_epi8(3), c32 = _mm512_set1_epi8(32);
    const __m512i sh_lo = _mm512_set_epi64(0x0002000200020002, 0x0002000200020002, 0x0002000200020002, 0x0002000200020002, 0, 0, 0, 0);
    const __m512i sh_hi = _mm512_add_epi16(sh_lo, _mm512_set1_epi16(4));
    const __m512i L = _mm512_loadu_si512(b + 64 * n);
    const __m512i H = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 128 + 32 * n)));
    c0 = _mm512_sub_epi8(_mm512_or_si512(_mm512_and_si512(L, m4),
        _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi16(H, sh_lo), m2), 4)), c32);
    c1 = _mm512_sub_epi8(_mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(L, 4), m4),
        _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi16(H, sh_hi), m2), 4)), c32);
  }
  template <class F> [[gnu::always_inline]] static inline void groups(const uint8_t* b, F&& f) {
    alignas(64) float ds[16];
    _mm512_store_ps(ds, scales(b));
    static_for<2>([&](auto N) {
      constexpr int n = N;
      __m512i c0, c1;
      half_codes(b, n, c0, c1);
      const float* d = ds + 8 * n;
      f(std::integral_constant<int, 4 * n + 0>{}, codes16<0>(c0), codes16<1>(c0), d[0], d[1], 0.0f);
      f(std::integral_constant<int, 4 * n + 1>{}, codes16<2>(c0), codes16<3>(c0), d[2], d[3], 0.0f);
      f(std::integral_constant<int, 4 * n + 2>{}, codes16<0>(c1), codes16<1>(c1), d[4], d[5], 0.0f);
      f(std::integral_constant<int, 4 * n + 3>{}, codes16<2>(c1), codes16<3>(c1), d[6], d[7], 0.0f);
    });
  }
};

// The decode row kernels prefetch the weight rows kPrefetchBytes ahead (at least the next row),
// block by block as they go: the hardware prefetcher alone left a 1-thread TinyLlama-shape
// decode ~20 % slower than with hot weights (streaming every weight once: Q4_0 61 -> 52 ms,
// Q4_K_M with the VNNI kernel 60 -> 55 ms; 4 KiB ahead or 1 row: 1-4 ms worse).
constexpr int64_t kPrefetchBytes = 2048;

inline int64_t prefetch_rows(int64_t row_bytes) {
  return std::max<int64_t>(1, (kPrefetchBytes + row_bytes - 1) / row_bytes);
}

// y[m * N] = sum over the row of w * x[m], for M (1 or 2) activation rows sharing one
// decode of the weight row. xs[m * K/32 + g]: sum of x[m] over 32-group g (MIN types).
template <class T, int M>
void dot_row_avx512(const uint8_t* row, const float* x, const float* xs, int64_t K, float* y, int64_t N,
                    const uint8_t* pf = nullptr) {
  // Two accumulators per activation row, alternating between consecutive 32-groups, so the
  // loop-carried FMA latency is spread over two chains.
  __m512 acc[2][M];
  float macc[2][M];
  __m256 mvec[M];  // kMins8 types: the group terms, eight groups a vector
  for (int m = 0; m < M; ++m) {
    acc[0][m] = acc[1][m] = _mm512_setzero_ps();
    macc[0][m] = macc[1][m] = 0.0f;
    mvec[m] = _mm256_setzero_ps();
  }
  const int64_t nb = K / T::QK, G = K / 32;
  auto block = [&](int64_t i, auto parity) __attribute__((always_inline)) {
    const int64_t e0 = i * T::QK;
    auto group = [&](auto g, __m512 qlo, __m512 qhi, float dlo, float dhi, float mg) __attribute__((always_inline)) {
      const int64_t e = e0 + 32 * g;
      constexpr int a = (decltype(parity)::value + decltype(g)::value) & 1;
      for (int m = 0; m < M; ++m) {
        const float* xm = x + m * K + e;
        if constexpr (T::SPLIT) {
          acc[a][m] = _mm512_fmadd_ps(_mm512_set1_ps(dlo), _mm512_mul_ps(qlo, _mm512_loadu_ps(xm)), acc[a][m]);
          acc[a][m] = _mm512_fmadd_ps(_mm512_set1_ps(dhi), _mm512_mul_ps(qhi, _mm512_loadu_ps(xm + 16)), acc[a][m]);
        } else {
          const __m512 t = _mm512_fmadd_ps(qhi, _mm512_loadu_ps(xm + 16), _mm512_mul_ps(qlo, _mm512_loadu_ps(xm)));
          acc[a][m] = _mm512_fmadd_ps(_mm512_set1_ps(dlo), t, acc[a][m]);
        }
        if constexpr (T::MIN && !kMins8<T>) macc[a][m] += mg * xs[m * G + e / 32];
      }
    };
    if constexpr (kMins8<T>) {
      static_assert(T::QK == 256, "eight 32-groups a block");
      __m256 mins;
      Simd<T>::groups(row + i * T::BYTES, group, mins);
      for (int m = 0; m < M; ++m) mvec[m] = _mm256_fmadd_ps(mins, _mm256_loadu_ps(xs + m * G + i * 8), mvec[m]);
    } else {
      Simd<T>::groups(row + i * T::BYTES, group);
    }
  };
  int64_t i = 0;
  for (; i + 1 < nb; i += 2) {
    if (pf) {
      const char* p = reinterpret_cast<const char*>(pf + i * T::BYTES);
      _mm_prefetch(p, _MM_HINT_T0);
      if constexpr (2 * T::BYTES > 64) _mm_prefetch(p + 64, _MM_HINT_T0);
      if constexpr (2 * T::BYTES > 128) _mm_prefetch(p + 128, _MM_HINT_T0);
      if constexpr (2 * T::BYTES > 192) _mm_prefetch(p + 192, _MM_HINT_T0);
    }
    block(i, std::integral_constant<int, 0>{});
    block(i + 1, std::integral_constant<int, 1>{});
  }
  if (i < nb) block(i, std::integral_constant<int, 0>{});
  for (int m = 0; m < M; ++m) {
    float mins = macc[0][m] + macc[1][m];
    if constexpr (kMins8<T>) {
      const __m128 h = _mm_add_ps(_mm256_castps256_ps128(mvec[m]), _mm256_extractf128_ps(mvec[m], 1));
      mins = _mm_cvtss_f32(_mm_add_ss(_mm_add_ps(h, _mm_movehl_ps(h, h)), _mm_movehdup_ps(_mm_add_ps(h, _mm_movehl_ps(h, h)))));
    }
    y[m * N] = _mm512_reduce_add_ps(_mm512_add_ps(acc[0][m], acc[1][m])) + mins;
  }
}

// The Q6_K row kernel, x in quad order (q6k_quad_order). A 64-byte vector c of codes holds
// four 16-element sub-groups, one per 128-bit lane; one in-lane byte shuffle puts code
// 16k + 4s + i (k the lane, i < 4) in the top byte of dword 4k + i, so that vector s
// (s < 4) is 16 codes times 2^24 after one int-to-float conversion (exact: 6 bits), without
// the lane extracts and sign extensions of codes16. Lane k of all four vectors shares the
// scale d * sc of sub-group k, so the four products are summed first and scaled once:
// d_k 2^-24 * sum_s (q 2^24) x, the real weights d_k q times x, power-of-two factors exact.
constexpr float kTwoPow24 = 16777216.0f;

inline __m512i q6k_pick(int s) {  // shuffle control of vector s
  alignas(64) int8_t c[64];
  for (int k = 0; k < 4; ++k)
    for (int i = 0; i < 4; ++i)
      for (int j = 0; j < 4; ++j) c[16 * k + 4 * i + j] = j == 3 ? static_cast<int8_t>(4 * s + i) : int8_t(-128);
  return _mm512_load_si512(c);
}

template <int M>
void dot_row_q6k_avx512(const uint8_t* row, const float* xq, int64_t K, float* y, int64_t N, const uint8_t* pf = nullptr) {
  static const __m512i pick[4] = {q6k_pick(0), q6k_pick(1), q6k_pick(2), q6k_pick(3)};
  const __m512 scale_down = _mm512_set1_ps(1.0f / kTwoPow24);
  __m512 acc[2][M];
  for (int m = 0; m < M; ++m) acc[0][m] = acc[1][m] = _mm512_setzero_ps();
  const int64_t nb = K / Q6_K::QK;
  for (int64_t i = 0; i < nb; ++i) {
    const uint8_t* b = row + i * Q6_K::BYTES;
    if (pf) {
      const char* p = reinterpret_cast<const char*>(pf + i * Q6_K::BYTES);
      _mm_prefetch(p, _MM_HINT_T0);
      _mm_prefetch(p + 64, _MM_HINT_T0);
      _mm_prefetch(p + 128, _MM_HINT_T0);
      _mm_prefetch(p + 192, _MM_HINT_T0);
    }
    const __m512 ds = _mm512_mul_ps(Simd<Q6_K>::scales(b), scale_down);  // exact: a power of two
    static_for<2>([&](auto Nh) {
      constexpr int n = Nh;
      __m512i c[2];
      Simd<Q6_K>::half_codes(b, n, c[0], c[1]);
      static_for<2>([&](auto H) {
        constexpr int h = H;  // elements 128n + 64h .. + 63: sub-groups 8n + 4h + k
        const __m512 d = _mm512_permutexvar_ps(_mm512_set_epi32(8 * n + 4 * h + 3, 8 * n + 4 * h + 3, 8 * n + 4 * h + 3, 8 * n + 4 * h + 3,
                                                                8 * n + 4 * h + 2, 8 * n + 4 * h + 2, 8 * n + 4 * h + 2, 8 * n + 4 * h + 2,
                                                                8 * n + 4 * h + 1, 8 * n + 4 * h + 1, 8 * n + 4 * h + 1, 8 * n + 4 * h + 1,
                                                                8 * n + 4 * h, 8 * n + 4 * h, 8 * n + 4 * h, 8 * n + 4 * h), ds);
        const __m512 q0 = _mm512_cvtepi32_ps(_mm512_shuffle_epi8(c[h], pick[0]));
        const __m512 q1 = _mm512_cvtepi32_ps(_mm512_shuffle_epi8(c[h], pick[1]));
        const __m512 q2 = _mm512_cvtepi32_ps(_mm512_shuffle_epi8(c[h], pick[2]));
        const __m512 q3 = _mm512_cvtepi32_ps(_mm512_shuffle_epi8(c[h], pick[3]));
        constexpr int a = h;
        for (int m = 0; m < M; ++m) {
          const float* xm = xq + m * K + i * Q6_K::QK + 128 * n + 64 * h;
          __m512 t = _mm512_mul_ps(q0, _mm512_loadu_ps(xm));
          t = _mm512_fmadd_ps(q1, _mm512_loadu_ps(xm + 16), t);
          t = _mm512_fmadd_ps(q2, _mm512_loadu_ps(xm + 32), t);
          t = _mm512_fmadd_ps(q3, _mm512_loadu_ps(xm + 48), t);
          acc[a][m] = _mm512_fmadd_ps(d, t, acc[a][m]);
        }
      });
    });
  }
  for (int m = 0; m < M; ++m) y[m * N] = _mm512_reduce_add_ps(_mm512_add_ps(acc[0][m], acc[1][m]));
}

// x [M, K] in the order dot_row_q6k_avx512 reads it: within each 64 elements, element
// 16s + 4k + i is x[16k + 4s + i] (a 4 x 4 transpose of 4-element pieces).
void q6k_quad_order(const float* x, int64_t M, int64_t K, float* xq) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t c = 0; c < K; c += 64)
      for (int s = 0; s < 4; ++s)
        for (int k = 0; k < 4; ++k) std::memcpy(xq + m * K + c + 16 * s + 4 * k, x + m * K + c + 16 * k + 4 * s, 4 * sizeof(float));
}

// y[m * N + n] for weight rows n in [n0, n1) and M (1 or 2) activation rows x [M, K]
// (Q6_K: xq, the rows in quad order).
template <class T>
void gemv_rows_avx512(const uint8_t* w, const float* x, const float* xs, const float* xq, int64_t M, int64_t K,
                      int64_t N, int64_t n0, int64_t n1, float* y) {
  const int64_t row_bytes = K / T::QK * T::BYTES;
  const int64_t ahead = prefetch_rows(row_bytes);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* row = w + n * row_bytes;
    const uint8_t* pf = w + std::min(n + ahead, n1 - 1) * row_bytes;
    if constexpr (std::is_same_v<T, Q6_K>) {
      if (M == 1) dot_row_q6k_avx512<1>(row, xq, K, y + n, N, pf);
      else dot_row_q6k_avx512<2>(row, xq, K, y + n, N, pf);
      continue;
    }
    if (M == 1) dot_row_avx512<T, 1>(row, x, xs, K, y + n, N, pf);
    else dot_row_avx512<T, 2>(row, x, xs, K, y + n, N, pf);
  }
}

// Bit-identical to T::dequant: the same float32 products and sums, one rounding each.
template <class T>
void dequant_rows_avx512(const uint8_t* w, int64_t K, const int64_t* rows, int64_t R, float* out) {
  const int64_t nb = K / T::QK;
  for (int64_t r = 0; r < R; ++r) {
    const uint8_t* row = w + rows[r] * nb * T::BYTES;
    for (int64_t i = 0; i < nb; ++i) {
      float* y = out + r * K + i * T::QK;
      Simd<T>::groups(row + i * T::BYTES, [&](auto g, __m512 qlo, __m512 qhi, float dlo, float dhi, float mg) {
        __m512 lo = _mm512_mul_ps(qlo, _mm512_set1_ps(dlo)), hi = _mm512_mul_ps(qhi, _mm512_set1_ps(dhi));
        if constexpr (T::MIN) {
          lo = _mm512_add_ps(lo, _mm512_set1_ps(mg));
          hi = _mm512_add_ps(hi, _mm512_set1_ps(mg));
        }
        _mm512_storeu_ps(y + 32 * g, lo);
        _mm512_storeu_ps(y + 32 * g + 16, hi);
      });
    }
  }
}

// Horizontal sums of four vectors: [sum(a), sum(b), sum(c), sum(d)].
inline __m128 hsum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  auto to4 = [](__m512 v) {
    const __m256 t = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
    return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
  };
  return _mm_hadd_ps(_mm_hadd_ps(to4(a), to4(b)), _mm_hadd_ps(to4(c), to4(d)));
}

// Multi-row decode (M >= kPanelMinM activation rows): each weight row is decoded once per
// product into a panel and multiplied with all M rows from there, in register blocks.
//
// Panel rows are Kp floats apart (Kp = K + the K/32 group terms padded to 16); a row holds
//   [0, K)           q * d of every weight: the code times its float32 scale, exact (their
//                    significant bits add up to at most 23: Q6_K's 5-bit codes times its
//                    18-bit d * sub-scale; Q8_0's 7-bit codes times an F16 scale: 18);
//   [K, K + K/32)    the additive term m of each 32-group (MIN types only), so that
//                    q * d + m is each weight's real value;
//   up to Kp         zeros (never written: the scratch starts zeroed).
// The activations get the matching layout (gemv_multi): x, then its sums over each 32-group,
// then zeros. A row of the product is then one dot product over panel_width<T>(K) columns,
// the sum sum_g (sum_j q_j d x_j + m_g sum_j x_j) of the row kernels in another order.
template <class T>
void decode_panel_avx512(const uint8_t* w, int64_t K, int64_t Kp, int64_t n0, int64_t nr, float* panel) {
  const int64_t nb = K / T::QK, row_bytes = nb * T::BYTES;
  for (int64_t r = 0; r < nr; ++r) {
    const uint8_t* row = w + (n0 + r) * row_bytes;
    float* p = panel + r * Kp;
    for (int64_t i = 0; i < nb; ++i) {
      float* y = p + i * T::QK;
      Simd<T>::groups(row + i * T::BYTES, [&](auto g, __m512 qlo, __m512 qhi, float dlo, float dhi, float mg) {
        _mm512_storeu_ps(y + 32 * g, _mm512_mul_ps(qlo, _mm512_set1_ps(dlo)));
        _mm512_storeu_ps(y + 32 * g + 16, _mm512_mul_ps(qhi, _mm512_set1_ps(dhi)));
        if constexpr (T::MIN) p[K + i * (T::QK / 32) + g] = mg;
      });
    }
  }
}

// y[m * N + r] = panel row r . xa row m over Kw columns, for r < nr (<= kPanelRows) and the
// MR rows of xa (row stride ldx); panel rows have stride ldp. kPanelRows x MR accumulators,
// one FMA chain each: every panel vector is loaded once per MR rows, every x vector once
// per kPanelRows weight rows. (The empty asm keeps each loaded vector in a register: GCC
// would otherwise fold the loads into the FMAs, four or MR loads where one suffices, and
// the tile would be bound by loads instead of FMAs.)
template <int MR>
void panel_tile_avx512(const float* panel, int64_t ldp, const float* xa, int64_t ldx, int64_t Kw, int64_t nr,
                       float* y, int64_t N) {
  static_assert(kPanelRows == 4, "the tile reduces four weight rows at once (hsum4)");
  __m512 acc[MR][4];
  for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = acc[m][2] = acc[m][3] = _mm512_setzero_ps();
  for (int64_t k = 0; k < Kw; k += 16) {
    __m512 w0 = _mm512_loadu_ps(panel + k), w1 = _mm512_loadu_ps(panel + ldp + k),
           w2 = _mm512_loadu_ps(panel + 2 * ldp + k), w3 = _mm512_loadu_ps(panel + 3 * ldp + k);
    asm("" : "+v"(w0), "+v"(w1), "+v"(w2), "+v"(w3));
    for (int m = 0; m < MR; ++m) {
      __m512 xv = _mm512_loadu_ps(xa + m * ldx + k);
      asm("" : "+v"(xv));
      acc[m][0] = _mm512_fmadd_ps(w0, xv, acc[m][0]);
      acc[m][1] = _mm512_fmadd_ps(w1, xv, acc[m][1]);
      acc[m][2] = _mm512_fmadd_ps(w2, xv, acc[m][2]);
      acc[m][3] = _mm512_fmadd_ps(w3, xv, acc[m][3]);
    }
  }
  for (int m = 0; m < MR; ++m) {
    alignas(16) float s[4];
    _mm_store_ps(s, hsum4(acc[m][0], acc[m][1], acc[m][2], acc[m][3]));
    for (int64_t r = 0; r < nr; ++r) y[m * N + r] = s[r];
  }
}

// y[m, n] for weight rows [n0, n1) and all M rows of xa [M, ldx] (the panel layout, see
// decode_panel_avx512), kPanelRows weight rows at a time; panel: scratch of
// kPanelRows * ldx zeros (in a last, partial panel the rows past nr keep earlier values,
// whose sums are not stored). The M rows are split into ceil(M / kTileRows) tiles of
// nearly equal height (M >= 3: every tile has at least 3 rows, enough accumulators to keep
// the FMA units busy).
template <class T>
void panel_rows_avx512(const uint8_t* w, const float* xa, int64_t M, int64_t K, int64_t ldx, int64_t N, int64_t n0,
                       int64_t n1, float* panel, float* y) {
  const int64_t Kw = panel_width<T>(K), row_bytes = K / T::QK * T::BYTES, n_tiles = (M + kTileRows - 1) / kTileRows;
  for (int64_t n = n0; n < n1; n += kPanelRows) {
    const int64_t nr = std::min<int64_t>(kPanelRows, n1 - n);
    decode_panel_avx512<T>(w, K, ldx, n, nr, panel);
    // The panel after next is fetched into L2 while this one is multiplied: the compute
    // phases between decodes leave the hardware prefetcher idle, and the decodes would
    // stall on memory (cold 49152 x 576 Q8_0 at M = 4: 5.5 ms without, 4.3 ms with).
    const int64_t ahead = n + nr + kPanelRows;
    const uint8_t* next = w + ahead * row_bytes;
    for (int64_t b = 0; b < std::min<int64_t>(kPanelRows, n1 - ahead) * row_bytes; b += 64)
      _mm_prefetch(reinterpret_cast<const char*>(next + b), _MM_HINT_T1);
    for (int64_t t = 0, m = 0; t < n_tiles; ++t) {
      const int64_t rows = (M - m) / (n_tiles - t);  // nearly equal heights, at most kTileRows
      const float* xt = xa + m * ldx;
      float* yt = y + m * N + n;
      static_assert(kPanelMinM >= 3 && kTileRows == 6, "tiles of 3 to 6 rows (1 or 2 when M is, batch-invariant mode)");
      switch (rows) {  // each row's sums are the same in every tile height
        case 1: panel_tile_avx512<1>(panel, ldx, xt, ldx, Kw, nr, yt, N); break;
        case 2: panel_tile_avx512<2>(panel, ldx, xt, ldx, Kw, nr, yt, N); break;
        case 3: panel_tile_avx512<3>(panel, ldx, xt, ldx, Kw, nr, yt, N); break;
        case 4: panel_tile_avx512<4>(panel, ldx, xt, ldx, Kw, nr, yt, N); break;
        case 5: panel_tile_avx512<5>(panel, ldx, xt, ldx, Kw, nr, yt, N); break;
        default: panel_tile_avx512<6>(panel, ldx, xt, ldx, Kw, nr, yt, N); break;
      }
      m += rows;
    }
  }
}

// Attention inner loops (see scores_rows / weighted_values), D a multiple of 16; the G query
// heads of a KV head share each key/value load.
void scores_rows_avx512(const float* q, const Pages& keys, int64_t j0, int64_t j1, int64_t n, int64_t S, int64_t D,
                        int64_t G, float scale, float* sc) {
  const __m128 s4 = _mm_set1_ps(scale);
  const int64_t jn = std::min(j1, n);
  int64_t j = j0;
  Cursor c(keys, j0);
  for (; j + 4 <= jn; j += 4) {  // four keys at a time: one shared reduction tree
    const float* k0 = c.get();
    c.next();
    const float* k1 = c.get();
    c.next();
    const float* k2 = c.get();
    c.next();
    const float* k3 = c.get();
    c.next();
    for (int64_t g = 0; g < G; ++g) {
      __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
      for (int64_t i = 0; i < D; i += 16) {
        const __m512 qv = _mm512_loadu_ps(q + g * D + i);
        a0 = _mm512_fmadd_ps(qv, _mm512_loadu_ps(k0 + i), a0);
        a1 = _mm512_fmadd_ps(qv, _mm512_loadu_ps(k1 + i), a1);
        a2 = _mm512_fmadd_ps(qv, _mm512_loadu_ps(k2 + i), a2);
        a3 = _mm512_fmadd_ps(qv, _mm512_loadu_ps(k3 + i), a3);
      }
      _mm_storeu_ps(sc + g * S + j, _mm_mul_ps(hsum4(a0, a1, a2, a3), s4));
    }
  }
  for (; j < jn; ++j)
    for (int64_t g = 0; g < G; ++g) {
      __m512 acc = _mm512_setzero_ps();
      for (int64_t i = 0; i < D; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + g * D + i), _mm512_loadu_ps(keys.row(j) + i), acc);
      sc[g * S + j] = _mm512_reduce_add_ps(acc) * scale;
    }
  for (int64_t g = 0; g < G; ++g) std::fill(sc + g * S + std::max(j0, jn), sc + g * S + j1, -INFINITY);
}

void weighted_values_avx512(const float* p, const Pages& values, int64_t n, int64_t S, int64_t D, int64_t G, int64_t i0,
                            int64_t i1, float* out) {
  for (int64_t g = 0; g < G; ++g)
    for (int64_t i = i0; i < i1; i += 16) {
      __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
      int64_t j = 0;
      Cursor v(values, 0);
      for (; j + 4 <= n; j += 4)  // four independent chains
        for (int c = 0; c < 4; ++c, v.next())
          acc[c] = _mm512_fmadd_ps(_mm512_set1_ps(p[g * S + j + c]), _mm512_loadu_ps(v.get() + i), acc[c]);
      for (; j < n; ++j, v.next()) acc[0] = _mm512_fmadd_ps(_mm512_set1_ps(p[g * S + j]), _mm512_loadu_ps(v.get() + i), acc[0]);
      _mm512_storeu_ps(out + g * D + i, _mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])));
    }
}

#pragma GCC pop_options

// ---------------------------------------------------------------------------------------
// AVX-512 VNNI row kernels (decode, 1-2 activation rows): the weights' integer codes times
// the activations written EXACTLY enough as integers, with vpdpbusd (u8 x s8, four
// products summed per int32 lane).
//
// Activations (xint_row_avx512): each 32-group g of a row gets a power-of-two scale
// S_g = 2^(E_g - P), 2^E_g > max |x| over the group, and the integers X = round(x / S_g),
// |X| <= 2^P, written as ND balanced base-256 digits X = sum_i D_i 256^(ND-1-i),
// D_i in [-128, 127] (int8). P = 22 (ND = 3) or 30 (ND = 4): each x is replaced by a value
// within 2^-(P+1) * 2^E_g <= 2^-P * max_g |x| of it (float32 itself keeps 2^-24 of each
// element); the integer products and sums after that are exact.
// Per group the kernel sums q * D_i over the 32 elements in int32 lanes (4 products a lane),
// shifting by 8 between digits: |sum| <= 4 * 15 * 2^22 < 2^31 for 3 digits; with 4 digits
// the top digit (|D_0| <= 64) has its own lane sum and the lower three are chained
// (|sum| <= 4 * 15 * 128 * (2^16 + 2^8 + 1) < 2^29). The int32 lanes go to float once per
// group (rounding there: 2^-24 relative, as a float32 accumulation would), times the group's
// float scale d * sc * S_g (exact: S_g a power of two, unless the product is subnormal).
// A row with an infinite or NaN activation takes the float kernels (the product is not
// finite either way; they give the IEEE result).
// ---------------------------------------------------------------------------------------
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,fma")

// x [K] (K a multiple of 256) -> digits (K * ND int8, see below) and scales [K/32]; false when
// x has an infinite or NaN element.
template <int ND>
bool xint_row_avx512(const float* x, int64_t K, int8_t* dig, float* scl) {
  constexpr int P = ND == 3 ? 22 : 30;
  const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
  const __m512i c128 = _mm512_set1_epi32(128), c255 = _mm512_set1_epi32(255);
  for (int64_t g = 0; g < K / 32; ++g) {
    const __m512 a = _mm512_loadu_ps(x + 32 * g), b = _mm512_loadu_ps(x + 32 * g + 16);
    if (_mm512_fpclass_ps_mask(a, 0x99) | _mm512_fpclass_ps_mask(b, 0x99)) return false;  // NaN or inf
    const float mx = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_and_ps(a, absmask), _mm512_and_ps(b, absmask)));
    int E = 0;
    if (mx > 0.0f) std::frexp(mx, &E);  // mx < 2^E
    E = std::max(E, P - 120);           // tiny groups: 2^(P - E) stays a finite float, S_g a normal one
    scl[g] = std::ldexp(1.0f, E - P);
    const __m512 up = _mm512_set1_ps(std::ldexp(1.0f, P - E));  // exact scaling by a power of two
    // Pairs of groups (0, 2), (1, 3), (4, 6), (5, 7) of each 256 (the order of Q4_K's codes in
    // dot_row_q4k_vnni): pair p, digit i at 64 (ND p + i), the pair's first group in bytes
    // 0-31, its second in 32-63.
    const int64_t gb = g % 8, pr = gb / 4 * 2 + gb % 2, half = gb / 2 % 2;
    int8_t* dg = dig + (g - gb) * ND * 32 + pr * ND * 64 + half * 32;
    for (int h = 0; h < 2; ++h) {
      __m512i X = _mm512_cvtps_epi32(_mm512_mul_ps(h ? b : a, up));  // round to nearest: |X| <= 2^P
      __m512i d[ND];
      for (int i = ND - 1; i > 0; --i) {  // low digits in [-128, 127], the rest carried up exactly
        d[i] = _mm512_sub_epi32(_mm512_and_si512(_mm512_add_epi32(X, c128), c255), c128);
        X = _mm512_srai_epi32(_mm512_sub_epi32(X, d[i]), 8);
      }
      d[0] = X;  // |X| <= 2^(P - 8 (ND - 1)) = 64
      for (int i = 0; i < ND; ++i) _mm_storeu_si128(reinterpret_cast<__m128i*>(dg + 64 * i + 16 * h), _mm512_cvtepi32_epi8(d[i]));
    }
  }
  return true;
}

// Per lane, sum q * X over four elements, as a float (ND digits of X at xd, 64 bytes each;
// q unsigned codes). A 512-bit vector holds two 32-groups (lanes 0-7 and 8-15).
template <int ND>
[[gnu::always_inline]] inline __m512 pair_dot_vnni(__m512i q, const int8_t* xd) {
  auto ld = [&](int i) { return _mm512_loadu_si512(xd + 64 * i); };
  const __m512i z = _mm512_setzero_si512();
  if constexpr (ND == 3) {
    __m512i t = _mm512_dpbusd_epi32(z, q, ld(0));
    t = _mm512_dpbusd_epi32(_mm512_slli_epi32(t, 8), q, ld(1));
    t = _mm512_dpbusd_epi32(_mm512_slli_epi32(t, 8), q, ld(2));
    return _mm512_cvtepi32_ps(t);
  } else {
    const __m512i hi = _mm512_dpbusd_epi32(z, q, ld(0));
    __m512i t = _mm512_dpbusd_epi32(z, q, ld(1));
    t = _mm512_dpbusd_epi32(_mm512_slli_epi32(t, 8), q, ld(2));
    t = _mm512_dpbusd_epi32(_mm512_slli_epi32(t, 8), q, ld(3));
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(hi), _mm512_set1_ps(16777216.0f), _mm512_cvtepi32_ps(t));
  }
}

// Q4_K: y[m * N] = row . x[m] for M (1 or 2) rows: per block the eight d * sc_g (k4_scales)
// times the rows' group scales S_g; the 128 code bytes in two 512-bit vectors whose low /
// high nibbles are the unsigned codes of groups (0, 2) / (1, 3) and (4, 6) / (5, 7) (x's
// digits laid out to match), each pair's sums by pair_dot_vnni times its two groups' scales;
// the mins as in dot_row_avx512: one FMA of the eight -dmin * mn_g against the exact float
// group sums of x. (256-bit vectors, one group each: 12-15 % slower, the same pipe work in
// twice the instructions. Not inlined: inlined into gemv_multi's loop it ran 20 % slower.)
template <int M, int ND>
[[gnu::noinline]] void dot_row_q4k_vnni(const uint8_t* row, const int8_t* xd, const float* xsc, const float* xs, int64_t K, float* y,
                      int64_t N, const uint8_t* pf) {
  const int64_t nb = K / 256, G = K / 32;
  __m512 acc[2][M];
  __m256 mvec[M];
  for (int m = 0; m < M; ++m) {
    acc[0][m] = acc[1][m] = _mm512_setzero_ps();
    mvec[m] = _mm256_setzero_ps();
  }
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  const __m512i sel[4] = {_mm512_set_epi32(2, 2, 2, 2, 2, 2, 2, 2, 0, 0, 0, 0, 0, 0, 0, 0),
                          _mm512_set_epi32(3, 3, 3, 3, 3, 3, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1),
                          _mm512_set_epi32(6, 6, 6, 6, 6, 6, 6, 6, 4, 4, 4, 4, 4, 4, 4, 4),
                          _mm512_set_epi32(7, 7, 7, 7, 7, 7, 7, 7, 5, 5, 5, 5, 5, 5, 5, 5)};
  for (int64_t i = 0; i < nb; ++i) {
    const uint8_t* b = row + i * Q4_K::BYTES;
    const char* p = reinterpret_cast<const char*>(pf + i * Q4_K::BYTES);  // the next row, block by block
    _mm_prefetch(p, _MM_HINT_T0);
    _mm_prefetch(p + 64, _MM_HINT_T0);
    _mm_prefetch(p + 128, _MM_HINT_T0);
    alignas(32) float dg[8], mg[8];
    const __m256 mins = k4_scales(b, dg, mg);
    const __m256 dv = _mm256_load_ps(dg);
    __m512 s[M];
    for (int m = 0; m < M; ++m) {
      s[m] = _mm512_castps256_ps512(_mm256_mul_ps(dv, _mm256_loadu_ps(xsc + m * G + 8 * i)));
      mvec[m] = _mm256_fmadd_ps(mins, _mm256_loadu_ps(xs + m * G + 8 * i), mvec[m]);
    }
    static_for<2>([&](auto H) {
      constexpr int h = H;
      const __m512i qb = _mm512_loadu_si512(b + 16 + 64 * h);
      const __m512i q[2] = {_mm512_and_si512(qb, m4), _mm512_and_si512(_mm512_srli_epi16(qb, 4), m4)};
      static_for<2>([&](auto L) {
        constexpr int l = L, pr = 2 * h + l;  // pair pr: groups (4h + l, 4h + l + 2)
        for (int m = 0; m < M; ++m) {
          const __m512 f = pair_dot_vnni<ND>(q[l], xd + (m * G + 8 * i) * ND * 32 + pr * ND * 64);
          acc[l][m] = _mm512_fmadd_ps(f, _mm512_permutexvar_ps(sel[pr], s[m]), acc[l][m]);
        }
      });
    });
  }
  for (int m = 0; m < M; ++m) {
    const __m512 t = _mm512_add_ps(acc[0][m], acc[1][m]);
    alignas(32) float mm[8];
    _mm256_store_ps(mm, mvec[m]);
    const float sm = ((mm[0] + mm[1]) + (mm[2] + mm[3])) + ((mm[4] + mm[5]) + (mm[6] + mm[7]));
    y[m * N] = _mm512_reduce_add_ps(t) + sm;
  }
}

template <int M>
void gemv_rows_q4k_vnni(const uint8_t* w, const int8_t* xd, const float* xsc, const float* xs, int64_t K,
                        int64_t N, int64_t n0, int64_t n1, float* y) {
  const int64_t row_bytes = K / 256 * Q4_K::BYTES, ahead = prefetch_rows(row_bytes);
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* pf = w + std::min(n + ahead, n1 - 1) * row_bytes;
    dot_row_q4k_vnni<M, kVnniDigits>(w + n * row_bytes, xd, xsc, xs, K, y + n, N, pf);
  }
}

bool xint_rows_avx512(const float* x, int64_t M, int64_t K, int8_t* dig, float* scl) {
  for (int64_t m = 0; m < M; ++m)
    if (!xint_row_avx512<kVnniDigits>(x + m * K, K, dig + m * K * kVnniDigits, scl + m * (K / 32))) return false;
  return true;
}

#pragma GCC pop_options

bool cpu_has_vnni() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512vnni");
}

bool cpu_has_avx512() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma");
}
#else
bool cpu_has_avx512() { return false; }
bool cpu_has_vnni() { return false; }
#endif

bool simd_active() {
  static const bool has = cpu_has_avx512();
  return has && g_use_simd;
}

bool g_use_vnni = true;  // use_vnni(): the VNNI row kernels where the CPU has them

bool vnni_active() {
  static const bool has = cpu_has_avx512() && cpu_has_vnni();
  return has && g_use_vnni && simd_active();
}

// ---------------------------------------------------------------------------------------
// Threads. The decode-step loops (GEMVs, attention) run in parallel_range: at most
// thread_budget() threads (torch's count, capped by set_thread_limit, which the adaptive
// thread governor of gguflm.kernels.cpu.threads sets when another process keeps a core
// busy), work handed out in chunks from a shared counter, so a thread that starts late
// (descheduled, or waking up) finds less left to do instead of half the loop.
// ---------------------------------------------------------------------------------------

int g_thread_limit = 0;  // 0: no cap

int thread_budget() {
  const int nt = std::max(1, at::get_num_threads());
  return g_thread_limit > 0 ? std::min(nt, g_thread_limit) : nt;
}

// Threads for n units, at most ceil(n / grain) (as at::parallel_for) (1 inside another parallel region).
int parallel_threads(int64_t n, int64_t grain) {
#ifdef _OPENMP
  if (omp_in_parallel()) return 1;
#endif
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(thread_budget(), (n + std::max<int64_t>(grain, 1) - 1) / std::max<int64_t>(grain, 1))));
}

// f(b, e, tid) over [0, n) on nt threads (tid < nt), in chunks of about n / (4 nt) units
// (at least grain) claimed from a counter; every unit runs exactly once, so results do not
// depend on which thread ran what. f must not throw.
template <class F> void parallel_range(int nt, int64_t n, int64_t grain, const F& f) {
  if (n <= 0) return;
#ifdef _OPENMP
  if (nt > 1) {
    const int64_t chunk = std::max<int64_t>(std::max<int64_t>(grain, 1), (n + 4 * nt - 1) / (4 * nt));
    std::atomic<int64_t> next{0};
#pragma omp parallel num_threads(nt)
    {
      const int tid = omp_get_thread_num();
      for (int64_t b; (b = next.fetch_add(chunk, std::memory_order_relaxed)) < n;) f(b, std::min(n, b + chunk), tid);
    }
    return;
  }
#endif
  f(0, n, 0);
}

template <class F> void parallel_range(int64_t n, int64_t grain, const F& f) {
  parallel_range(parallel_threads(n, grain), n, grain, f);
}

// Cap the threads of the kernels' loops (0: none); returns the previous cap.
int64_t set_thread_limit(int64_t n) {
  TORCH_CHECK(n >= 0, "thread limit must be >= 0");
  const int64_t old = g_thread_limit;
  g_thread_limit = static_cast<int>(n);
  return old;
}

// ---------------------------------------------------------------------------------------
// Type dispatch and matrix products.
// ---------------------------------------------------------------------------------------

template <class F> auto with_type(int64_t type, F&& f) {
  switch (type) {
    case Q4_0::ID: return f(Q4_0{});
    case Q4_1::ID: return f(Q4_1{});
    case Q5_0::ID: return f(Q5_0{});
    case Q5_1::ID: return f(Q5_1{});
    case Q8_0::ID: return f(Q8_0{});
    case Q4_K::ID: return f(Q4_K{});
    case Q5_K::ID: return f(Q5_K{});
    case Q6_K::ID: return f(Q6_K{});
    default: TORCH_CHECK(false, "gguflm CPU kernels: no kernel for ggml type id ", type);
  }
}

// A quantized [N, K] weight: N rows of K / QK blocks.
struct QW {
  const uint8_t* data;
  int64_t type, N, K;
};

QW make_qw(const at::Tensor& w, int64_t type, int64_t N, int64_t K) {
  with_type(type, [&](auto t) {
    using T = decltype(t);
    TORCH_CHECK(N >= 0 && K > 0 && K % T::QK == 0, "row length ", K, " is not a multiple of ", T::QK);
    TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == at::kByte && w.is_contiguous(), "weight must be contiguous CPU uint8");
    TORCH_CHECK(w.numel() == N * (K / T::QK) * T::BYTES, "weight has ", w.numel(), " bytes, expected ",
                N * (K / T::QK) * T::BYTES);
    return 0;
  });
  return QW{w.data_ptr<uint8_t>(), type, N, K};
}

// Rows up to which a product takes the fused kernels (see kPanelMinM); beyond, exact
// tiles into sgemm.
int64_t fused_max_m() {
  if (simd_active() && g_invariant) return std::numeric_limits<int64_t>::max();
  return simd_active() ? kPanelMaxM : kPortableFusedMaxM;
}

// The row kernels, for M < kPanelMinM (AVX-512) or M <= kPortableFusedMaxM (portable).
// xi: the activations as integer digits (VNNI kernels; nd = 0: none).
struct XInt {
  const int8_t* dig = nullptr;  // [M][K/32][kVnniDigits][32]
  const float* scl = nullptr;   // [M][K/32]
  bool ok = false;
};

// Types with a VNNI row kernel.
bool has_vnni_kernel(int64_t type) { return type == Q4_K::ID; }

void rows_kernel(const QW& w, const float* x, const float* xs, const float* xq, const XInt& xi, int64_t M, int64_t n0,
                 int64_t n1, float* y) {
  with_type(w.type, [&](auto t) {
    using T = decltype(t);
#ifdef GGUFLM_X86
    if (simd_active()) {
      TORCH_INTERNAL_ASSERT(M < kPanelMinM);
      if constexpr (std::is_same_v<T, Q4_K>) {
        if (xi.ok) {
          if (M == 1) gemv_rows_q4k_vnni<1>(w.data, xi.dig, xi.scl, xs, w.K, w.N, n0, n1, y);
          else gemv_rows_q4k_vnni<2>(w.data, xi.dig, xi.scl, xs, w.K, w.N, n0, n1, y);
          return 0;
        }
      }
      gemv_rows_avx512<T>(w.data, x, xs, xq, M, w.K, w.N, n0, n1, y);
      return 0;
    }
#endif
    static_assert(kPortableFusedMaxM == 1, "the portable row kernel takes one activation row");
    TORCH_INTERNAL_ASSERT(M == 1);
    gemv_row_generic<T>(w.data, x, w.K, n0, n1, y);
    return 0;
  });
}

// The panel kernels (AVX-512 only): see panel_rows_avx512.
void panel_kernel(const QW& w, const float* xa, int64_t M, int64_t ldx, int64_t n0, int64_t n1, float* panel,
                  float* y) {
#ifdef GGUFLM_X86
  with_type(w.type, [&](auto t) {
    panel_rows_avx512<decltype(t)>(w.data, xa, M, w.K, ldx, w.N, n0, n1, panel, y);
    return 0;
  });
#else
  TORCH_CHECK(false, "the panel kernels need AVX-512");
#endif
}

// A float buffer of n zeros whose data starts on a 64-byte boundary (whole cache lines for
// the panel kernels' vector loads).
class AlignedFloats {
 public:
  explicit AlignedFloats(int64_t n) : buf_(n + 15, 0.0f) {
    const auto a = reinterpret_cast<std::uintptr_t>(buf_.data());
    data_ = buf_.data() + ((64 - a % 64) % 64) / sizeof(float);
  }
  float* data() { return data_; }

 private:
  std::vector<float> buf_;
  float* data_;
};

// Fused products for few rows: ys[i] [M, N_i] = x [M, K] @ W_i^T for weights sharing K.
// The rows of all the weights are split among the threads in one parallel region, one
// weight row at a time for the row kernels, kPanelRows rows for the panel kernels
// (AVX-512, M >= kPanelMinM), which decode each weight row once for all M rows.
void gemv_multi(const float* x, int64_t M, const std::vector<std::pair<QW, float*>>& outs) {
  const int64_t K = outs.begin()->first.K, G = K / 32;
  for (const auto& o : outs) TORCH_CHECK(o.first.K == K, "weights of one product must share K");
  bool panels = false;
#ifdef GGUFLM_X86
  panels = simd_active() && (M >= kPanelMinM || g_invariant);
#endif
  std::vector<float> xs(M * G);  // sum of x over each 32-group (the m * sum(x) term)
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      float s = 0.0f;
      for (int j = 0; j < 32; ++j) s += x[m * K + 32 * g + j];
      xs[m * G + g] = s;
    }
  // The panel kernels read x in the panel layout: [x | group sums | zeros], ldx floats a row.
  const int64_t ldx = panels ? K + (G + 15) / 16 * 16 : 0;
  AlignedFloats xa(M * ldx);
  for (int64_t m = 0; m < M && panels; ++m) {
    std::memcpy(xa.data() + m * ldx, x + m * K, K * sizeof(float));
    std::memcpy(xa.data() + m * ldx + K, xs.data() + m * G, G * sizeof(float));
  }
  std::vector<int8_t> xdig;  // VNNI row kernels: x as integer digits
  std::vector<float> xscl;
  XInt xi;
  auto any_type = [&](int64_t type) { return std::any_of(outs.begin(), outs.end(), [&](const auto& o) { return o.first.type == type; }); };
#ifdef GGUFLM_X86
  if (!panels && vnni_active() && std::any_of(outs.begin(), outs.end(), [](const auto& o) { return has_vnni_kernel(o.first.type); })) {
    xdig.resize(M * K * kVnniDigits);
    xscl.resize(M * G);
    if (xint_rows_avx512(x, M, K, xdig.data(), xscl.data())) xi = XInt{xdig.data(), xscl.data(), true};
  }
#endif
  std::vector<float> xq;  // Q6_K float row kernels: x in quad order
#ifdef GGUFLM_X86
  if (simd_active() && !panels && any_type(Q6_K::ID)) {
    xq.resize(M * K);
    q6k_quad_order(x, M, K, xq.data());
  }
#endif
  const int64_t unit = panels ? kPanelRows : 1;  // weight rows of one task
  int64_t total = 0;
  for (const auto& o : outs) total += (o.first.N + unit - 1) / unit;
  const int64_t grain = std::max<int64_t>(1, kGrainElems / (K * unit));
  const int nt = parallel_threads(total, grain);
  std::vector<AlignedFloats> panel;  // one per thread
  panel.reserve(nt);
  for (int t = 0; t < nt; ++t) panel.emplace_back(panels ? kPanelRows * ldx : 0);
  parallel_range(nt, total, grain, [&](int64_t b, int64_t e, int tid) {
    int64_t off = 0;
    for (const auto& o : outs) {
      const int64_t units = (o.first.N + unit - 1) / unit;
      const int64_t u0 = std::max(b, off) - off, u1 = std::min(e, off + units) - off;
      if (u0 < u1) {
        const int64_t n0 = u0 * unit, n1 = std::min(u1 * unit, o.first.N);
        if (panels) panel_kernel(o.first, xa.data(), M, ldx, n0, n1, panel[tid].data(), o.second);
        else rows_kernel(o.first, x, xs.data(), xq.data(), xi, M, n0, n1, o.second);
      }
      off += units;
    }
  });
}

// rows [n0, n1) of W, dequantized into out [n1 - n0, K]; threads split the rows.
void dequant_range(const QW& w, int64_t n0, int64_t n1, float* out) {
  const int64_t K = w.K;
  at::parallel_for(n0, n1, std::max<int64_t>(1, kGrainElems / K), [&](int64_t a, int64_t b) {
    std::vector<int64_t> rows(b - a);
    for (int64_t r = a; r < b; ++r) rows[r - a] = r;
    with_type(w.type, [&](auto t) {
      using T = decltype(t);
#ifdef GGUFLM_X86
      if (simd_active()) { dequant_rows_avx512<T>(w.data, K, rows.data(), b - a, out + (a - n0) * K); return 0; }
#endif
      dequant_rows_generic<T>(w.data, K, rows.data(), b - a, out + (a - n0) * K);
      return 0;
    });
  });
}

// Rows of W dequantized at once for a product of many rows (a tile of at most kTileElems floats).
int64_t tile_rows(const QW& w) { return std::max<int64_t>(1, std::min<int64_t>(w.N, kTileElems / w.K)); }

// y [M, N] = x [M, K] @ W^T: fused for M <= fused_max_m(), else exact float tiles into sgemm.
// ``y`` (contiguous [M, N]) and ``tile`` (at least tile_rows(w) * K floats), where defined,
// are the caller's memory (a block step's workspace); else they are allocated here.
at::Tensor matmul(const at::Tensor& x, const QW& w, at::Tensor y = {}, const at::Tensor& tile_buf = {}) {
  const int64_t M = x.size(0), N = w.N, K = w.K;
  if (M == 0) return at::empty({0, N}, x.options());  // no rows (the kernels assume at least one)
  if (M > fused_max_m()) {
    const int64_t tile = tile_rows(w);
    at::Tensor buf = tile_buf.defined() ? tile_buf.narrow(0, 0, tile * K).view({tile, K}) : at::empty({tile, K}, x.options());
    if (!y.defined()) y = at::empty({M, N}, x.options());
    if (tile == N) {
      dequant_range(w, 0, N, buf.data_ptr<float>());
      return at::mm_out(y, x, buf.t());
    }
    for (int64_t n0 = 0; n0 < N; n0 += tile) {
      const int64_t t = std::min(tile, N - n0);
      dequant_range(w, n0, n0 + t, buf.data_ptr<float>());
      y.narrow(1, n0, t).copy_(at::mm(x, buf.narrow(0, 0, t).t()));
    }
    return y;
  }
  if (!y.defined()) y = at::empty({M, N}, x.options());
  gemv_multi(x.data_ptr<float>(), M, {{w, y.data_ptr<float>()}});
  return y;
}

void check_x(const at::Tensor& x, int64_t K) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(1) == K &&
              x.is_contiguous(), "x must be a contiguous float32 [M, ", K, "] CPU tensor");
}

// ---------------------------------------------------------------------------------------
// One decoder block in one call: decode steps (fused GEMVs) and prefill (GEMM tiles, SDPA).
// ---------------------------------------------------------------------------------------

constexpr int64_t kRowGrain = 16;              // rows per thread for the elementwise parts of a step
constexpr int64_t kSdpaMinRows = 9;            // rows of a one-sequence step from which attention is ATen's SDPA
constexpr int64_t kAttnGrainFlops = 1 << 16;   // query-key products below which attention stays serial
constexpr int64_t kKeyBlock = 64;              // keys per attention-score task
constexpr int64_t kAttnRows = 256;             // rows whose scores the row-by-row attention holds at once

// y = x / sqrt(mean(x^2) + eps) * w, as (x * r) * w with r = 1 / sqrt(mean + eps).
// The sum of squares in sixteen partial sums, which the compiler vectorizes (one chain of
// E dependent adds took ~0.7 us a row at E = 576).
void rms_norm(const float* x, const float* w, int64_t E, float eps, float* y) {
  float part[16] = {};
  int64_t i = 0;
  for (; i + 16 <= E; i += 16)
    for (int l = 0; l < 16; ++l) part[l] += x[i + l] * x[i + l];
  float ss = 0.0f;
  for (; i < E; ++i) ss += x[i] * x[i];
  for (int l = 0; l < 16; ++l) ss += part[l];
  const float r = 1.0f / std::sqrt(ss / static_cast<float>(E) + eps);
  for (int64_t i = 0; i < E; ++i) y[i] = (x[i] * r) * w[i];
}

// Rotate the D-wide head vectors of one row by position p: NORM pairs (2i, 2i+1), NEOX
// pairs (i, i + D/2); cos/sin rows [D/2] of the table (they carry the attention factor).
void rope(float* v, int64_t n_heads, int64_t D, const float* c, const float* s, bool neox) {
  const int64_t half = D / 2;
  for (int64_t h = 0; h < n_heads; ++h) {
    float* x = v + h * D;
    for (int64_t i = 0; i < half; ++i) {
      const int64_t i0 = neox ? i : 2 * i, i1 = neox ? i + half : 2 * i + 1;
      const float x0 = x[i0], x1 = x[i1];
      x[i0] = x0 * c[i] - x1 * s[i];
      x[i1] = x0 * s[i] + x1 * c[i];
    }
  }
}

// Attention of the G query heads q [G, D] sharing one KV head, over keys/values [n, D]:
// scores_rows fills sc [G, S] for key columns j0 <= j < j1: q . k_j * scale where lo <= j < n,
// -inf elsewhere (lo > 0: a sliding window; then softmax over S); weighted_values fills out
// [G, D] columns i0 <= i < i1 with sum_{j < n} p [G, S] * v_j. Tasks split keys (scores) or
// head dimensions (values).
void scores_rows_from(const float* q, const Pages& keys, int64_t j0, int64_t j1, int64_t n, int64_t S, int64_t D,
                      int64_t G, float scale, float* sc) {
#ifdef GGUFLM_X86
  if (simd_active() && D % 16 == 0) { scores_rows_avx512(q, keys, j0, j1, n, S, D, G, scale, sc); return; }
#endif
  for (int64_t g = 0; g < G; ++g)
    for (int64_t j = j0; j < j1; ++j) {
      float d = 0.0f;
      if (j < n)
        for (int64_t i = 0; i < D; ++i) d += q[g * D + i] * keys.row(j)[i];
      sc[g * S + j] = j < n ? d * scale : -INFINITY;
    }
}

void scores_rows(const float* q, const Pages& keys, int64_t j0, int64_t j1, int64_t lo, int64_t n, int64_t S,
                 int64_t D, int64_t G, float scale, float* sc) {
  const int64_t a = std::min(std::max(j0, lo), j1);
  for (int64_t g = 0; g < G; ++g) std::fill(sc + g * S + j0, sc + g * S + a, -INFINITY);
  scores_rows_from(q, keys, a, j1, n, S, D, G, scale, sc);
}

void weighted_values(const float* p, const Pages& values, int64_t n, int64_t S, int64_t D, int64_t G, int64_t i0,
                     int64_t i1, float* out) {
#ifdef GGUFLM_X86
  if (simd_active() && D % 16 == 0) { weighted_values_avx512(p, values, n, S, D, G, i0, i1, out); return; }
#endif
  for (int64_t g = 0; g < G; ++g) {
    float* o = out + g * D;
    std::fill(o + i0, o + i1, 0.0f);
    for (int64_t j = 0; j < n; ++j) {
      const float* v = values.row(j);
      for (int64_t i = i0; i < i1; ++i) o[i] += p[g * S + j] * v[i];
    }
  }
}

// Products of one step: out_i [R, N_i] = x [R, K] @ W_i^T (+ bias_i). Few rows: the fused
// GEMVs, all weights in one parallel region; many rows: exact float tiles into sgemm. An
// out_i already defined is where its product goes; ``tile``: matmul's (see there).
void project(const at::Tensor& x, std::initializer_list<std::tuple<QW, at::Tensor*, const std::optional<at::Tensor>*>> outs,
             const at::Tensor& tile = {}) {
  const int64_t R = x.size(0);
  if (R <= fused_max_m()) {
    std::vector<std::pair<QW, float*>> targets;
    for (const auto& [w, out, bias] : outs) {
      if (!out->defined()) *out = at::empty({R, w.N}, x.options());
      targets.emplace_back(w, out->data_ptr<float>());
    }
    gemv_multi(x.data_ptr<float>(), R, targets);
  } else {
    for (const auto& [w, out, bias] : outs) *out = matmul(x, w, *out, tile);
  }
  for (const auto& [w, out, bias] : outs)
    if (bias->has_value()) out->add_(**bias);
}

// The workspace of a prefill's block steps (see block_step): anonymous memory of its own, not
// the allocator's, kept from one layer's call to the next (faulted in once per step) and
// unmapped after the model's last layer (or by a step of few rows, which needs none).
struct Workspace {
  float* p = nullptr;
  size_t bytes = 0;
  ~Workspace() { release(); }
  void release() {
    if (p) munmap(p, bytes);
    p = nullptr, bytes = 0;
  }
  float* get(int64_t n) {
    const size_t need = static_cast<size_t>(n) * sizeof(float);
    if (need > bytes) {
      release();
      void* m = mmap(nullptr, need, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      TORCH_CHECK(m != MAP_FAILED, "cannot map a workspace of ", need, " bytes");
      p = static_cast<float*>(m), bytes = need;
    }
    return p;
  }
};
thread_local Workspace t_workspace;

// Roles of the seven weights and the six norms, in the order the op receives them (the
// slots a program's instructions name); the gated activations (gguflm.model.arch.Activation).
enum Role { WQ, WK, WV, WO, WGATE, WUP, WDOWN, N_ROLES };
enum Norm { ATTN_NORM, FFN_NORM, Q_NORM, K_NORM, ATTN_POST_NORM, FFN_POST_NORM, N_NORMS };
enum Act { SILU, GELU_TANH };
// A block's program: the ops of gguflm.model.decoder's composition in the order it calls
// them, recorded by gguflm.kernels.cpu.block (kInstr ints each: op, dst, src, norm, a, b, c;
// -1 where unused). dst/src name registers (a value: q, k, v; an attention output; a gated
// activation); norm/a/b/c name norm and weight slots.
enum Op { NORM_LINEAR, HEAD_NORM, ATTENTION, LINEAR_ADD, NORM_GATED, N_OPS };
constexpr int64_t kInstr = 7, kRegs = 8;

// x [B, T, E]: T new tokens of B sequences, at positions pos [B, T] (< 0: padding, rotated
// as position 0, attends to key 0, not cached) in cache slots slot [B]; k_all, v_all: the
// paged KV cache [n_layer, n_blocks, Hkv, bs, D], of which layer `layer` is read and
// written; table [n_slots, blocks per slot]: position p of slot s lies in block
// table[s, p / bs], row p % bs (a cache of one block per slot: table[s] = {s}, bs = n_ctx).
// Returns the block output [B, T, E]: `program` run over the residual stream x, its ops
// (the provider of gguflm.model.decoder's ops):
//   NORM_LINEAR dst norm a b c   dst = (W_a n, W_b n, W_c n) (+ biases), n = norm(x)
//   HEAD_NORM dst src norm a     per-head RMSNorm of src's q (norm) and k (a)
//   ATTENTION dst src            q, k = rope(q), rope(k); k, v into the cache; dst = attn(q, k, v)
//   LINEAR_ADD src norm a        x += norm(W_a src) (norm -1: x += W_a src)
//   NORM_GATED dst norm a b c    dst = act_c(W_a n) * W_b n, n = norm(x), act SiLU or GELU-tanh
// Every key/value of this step is written to the cache before any query attends; a row
// at position p attends to keys max(0, p - n_swa + 1)..max(p, 0) of its slot (n_swa 0: from
// key 0), scores scaled by `scale`; cos/sin: this layer's RoPE table (a local layer's own).
at::Tensor block_step(const at::Tensor& x3, const at::Tensor& pos, const at::Tensor& slots, const at::Tensor& k_all,
                      const at::Tensor& v_all, const at::Tensor& table, int64_t layer, const at::Tensor& cos,
                      const at::Tensor& sin, const at::Tensor& program_t,
                      const c10::List<std::optional<at::Tensor>>& norms, double eps, at::TensorList weights,
                      at::IntArrayRef types, const c10::List<std::optional<at::Tensor>>& biases, int64_t n_head,
                      int64_t n_head_kv, int64_t ff, bool neox, double scale_, int64_t n_swa) {
  TORCH_CHECK(x3.dim() == 3 && pos.dim() == 2 && pos.size(0) == x3.size(0) && pos.size(1) == x3.size(1) &&
              slots.dim() == 1 && slots.size(0) == x3.size(0), "x [B, T, E], positions [B, T], slots [B]");
  TORCH_CHECK(weights.size() == N_ROLES && types.size() == N_ROLES && biases.size() == N_ROLES, "seven weights");
  TORCH_CHECK(norms.size() == N_NORMS && n_swa >= 0, "six norms");
  TORCH_CHECK(program_t.device().is_cpu() && program_t.scalar_type() == at::kLong && program_t.dim() == 1 &&
              program_t.is_contiguous() && program_t.numel() % kInstr == 0, "the program: int64 [n * ", kInstr, "]");
  const int64_t* program = program_t.data_ptr<int64_t>();
  TORCH_CHECK(k_all.dim() == 5 && k_all.sizes() == v_all.sizes() && k_all.is_contiguous() && v_all.is_contiguous() &&
              k_all.scalar_type() == at::kFloat && v_all.scalar_type() == at::kFloat && layer >= 0 &&
              layer < k_all.size(0), "bad KV cache");
  const at::Tensor x = x3.reshape({-1, x3.size(2)});
  const at::Tensor kc = k_all.select(0, layer), vc = v_all.select(0, layer);  // [n_blocks, Hkv, bs, D]
  const int64_t R = x.size(0), E = x.size(1), T = x3.size(1);
  TORCH_CHECK(R > 0, "a step of no rows");
  TORCH_CHECK(table.device().is_cpu() && table.scalar_type() == at::kLong && table.dim() == 2 && table.is_contiguous(),
              "the block table must be a contiguous int64 [n_slots, blocks] CPU tensor");
  const int64_t n_blocks = kc.size(0), bs = kc.size(2), D = kc.size(3), G = n_head / n_head_kv;
  const int64_t n_slots = table.size(0), n_bps = table.size(1);
  const int64_t n_ctx = std::min<int64_t>(n_bps * bs, cos.size(0));  // positions a slot can hold
  TORCH_CHECK(kc.size(1) == n_head_kv && n_head % n_head_kv == 0 && cos.size(1) * 2 == D &&
              cos.is_contiguous() && sin.is_contiguous() && cos.scalar_type() == at::kFloat &&
              sin.scalar_type() == at::kFloat, "bad attention shapes");
  TORCH_CHECK(pos.scalar_type() == at::kLong && pos.is_contiguous() && slots.scalar_type() == at::kLong &&
              slots.is_contiguous(), "positions/slots must be contiguous int64");
  check_x(x, E);
  const int64_t QD = n_head * D, KD = n_head_kv * D;
  const int64_t n_in[N_ROLES] = {E, E, E, QD, E, E, ff};
  const int64_t n_out[N_ROLES] = {QD, KD, KD, E, ff, ff, E};
  QW w[N_ROLES];
  for (int r = 0; r < N_ROLES; ++r) {
    w[r] = make_qw(weights[r], types[r], n_out[r], n_in[r]);
    if (biases[r].has_value()) {
      const at::Tensor& b = *biases[r];
      TORCH_CHECK(b.scalar_type() == at::kFloat && b.is_contiguous() && b.numel() == n_out[r], "bad bias");
    }
  }
  const std::optional<at::Tensor> bias[N_ROLES] = {biases[0], biases[1], biases[2], biases[3],
                                                   biases[4], biases[5], biases[6]};
  // The norm weight of slot n, of `size` floats (an instruction's operand: it must be there).
  auto norm_w = [&](int64_t n, int64_t size) {
    TORCH_CHECK(n >= 0 && n < N_NORMS && norms[n].has_value(), "the program names norm ", n, ", which is absent");
    const at::Tensor t = *norms[n];
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == size, "bad norm weight ", n);
    return t.data_ptr<float>();
  };
  auto role = [&](int64_t r) { TORCH_CHECK(r >= 0 && r < N_ROLES, "bad weight slot ", r); return r; };
  const int64_t* pp = pos.data_ptr<int64_t>();
  std::vector<int64_t> slot_of_row(R);  // row r = (b, t) lives in slot slots[b]
  for (int64_t r = 0; r < R; ++r) slot_of_row[r] = slots.data_ptr<int64_t>()[r / T];
  const int64_t* sp = slot_of_row.data();
  bool one_sequence = true;  // one slot, positions p0, p0 + 1, ... (a prefill)
  const int64_t* tp = table.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r) {
    TORCH_CHECK(pp[r] < n_ctx && sp[r] >= 0 && sp[r] < n_slots, "position/slot outside the cache");
    for (int64_t b = 0; b <= std::max<int64_t>(pp[r], 0) / bs; ++b)  // the blocks row r reads (and writes)
      TORCH_CHECK(tp[sp[r] * n_bps + b] >= 0 && tp[sp[r] * n_bps + b] < n_blocks, "block table entry outside the cache");
    one_sequence = one_sequence && sp[r] == sp[0] && pp[r] == pp[0] + r && pp[0] >= 0;
  }
  const float fe = static_cast<float>(eps);
  auto rows = [&](auto&& f) { at::parallel_for(0, R, kRowGrain, [&](int64_t b, int64_t e) { for (int64_t r = b; r < e; ++r) f(r); }); };
  float* kcp = kc.data_ptr<float>();
  float* vcp = vc.data_ptr<float>();
  const float scale = static_cast<float>(scale_);
  auto first_key = [&](int64_t r) { return n_swa > 0 ? std::max<int64_t>(0, pp[r] - n_swa + 1) : int64_t(0); };

  // Many rows (a prefill): the step's intermediates in one workspace (t_workspace), not a
  // dozen buffers per layer that the allocator interleaves with the long-lived ones (a
  // 512-token SmolLM2 prefill held about twice its live bytes that way). Layout: [a: a
  // norm's output, then a residual's addend] [b: q k v att, or g u] [the dequantized weight
  // tile of matmul]. Region b is only handed out while no other value is live (as in the
  // decoder's order); otherwise a value is allocated.
  at::Tensor ws, tile;
  const int64_t ws_a = R * E, ws_b = std::max(R * (2 * QD + 2 * KD), 2 * R * ff);
  auto part = [&](int64_t off, int64_t cols) {
    return ws.defined() ? ws.narrow(0, off, R * cols).view({R, cols}) : at::empty({R, cols}, x.options());
  };
  if (R > fused_max_m()) {
    int64_t n_tile = 0;
    for (int r = 0; r < N_ROLES; ++r) n_tile = std::max(n_tile, tile_rows(w[r]) * w[r].K);
    ws = at::from_blob(t_workspace.get(ws_a + ws_b + n_tile), {ws_a + ws_b + n_tile}, x.options());
    tile = ws.narrow(0, ws_a + ws_b, n_tile);
  } else {
    t_workspace.release();
  }
  // Registers: each value is read once, and freed as it is read.
  std::vector<at::Tensor> reg[kRegs];
  auto take = [&](int64_t i, size_t n) {
    TORCH_CHECK(i >= 0 && i < kRegs && reg[i].size() == n, "register ", i, " does not hold ", n, " values");
    return std::move(reg[i]);
  };
  auto put = [&](int64_t i, std::vector<at::Tensor> v) {
    TORCH_CHECK(i >= 0 && i < kRegs, "bad register ", i);
    reg[i] = std::move(v);
  };
  at::Tensor a_buf;  // region a when there is no workspace (one buffer for the step)
  auto region_a = [&]() {
    if (ws.defined()) return part(0, E);
    if (!a_buf.defined()) a_buf = at::empty({R, E}, x.options());
    return a_buf;
  };
  auto region_b = [&](int64_t off, int64_t cols) {  // part of region b, or a fresh value if one is live
    for (const auto& r : reg)
      if (!r.empty()) return at::empty({R, cols}, x.options());
    return part(ws_a + off, cols);
  };

  // The ops. `stream` is the residual stream [R, E]: the input until the first LINEAR_ADD,
  // then that add's own buffer (x += y computed as y += x into y's buffer), never the workspace.
  at::Tensor stream = x;
  auto normed = [&](int64_t n) {  // [R, E] norm(stream), in region a
    const float* nw = norm_w(n, E);
    const float* xs = stream.data_ptr<float>();
    at::Tensor xn = region_a();
    float* xnp = xn.data_ptr<float>();
    rows([&](int64_t r) { rms_norm(xs + r * E, nw, E, fe, xnp + r * E); });
    return xn;
  };
  auto attention = [&](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
    rows([&](int64_t r) {
      const int64_t p = std::max<int64_t>(pp[r], 0);
      const float* c = cos.data_ptr<float>() + p * (D / 2);
      const float* s = sin.data_ptr<float>() + p * (D / 2);
      float* kr = k.data_ptr<float>() + r * KD;
      rope(q.data_ptr<float>() + r * QD, n_head, D, c, s, neox);
      rope(kr, n_head_kv, D, c, s, neox);
      if (pp[r] < 0) return;
      for (int64_t h = 0; h < n_head_kv; ++h) {
        const int64_t dst = ((tp[sp[r] * n_bps + pp[r] / bs] * n_head_kv + h) * bs + pp[r] % bs) * D;
        std::memcpy(kcp + dst, kr + h * D, D * sizeof(float));
        std::memcpy(vcp + dst, v.data_ptr<float>() + r * KD + h * D, D * sizeof(float));
      }
    });
    at::Tensor att = region_b(R * (QD + 2 * KD), QD);  // after q k v
    if (R >= kSdpaMinRows && one_sequence && !g_invariant) {  // prefill: fused attention over the slot's cache
      const int64_t S = pp[0] + R;
      at::Tensor qh = q.view({1, R, n_head, D}).transpose(1, 2);                      // [1, H, R, D]
      const int64_t nb = (S + bs - 1) / bs;  // the slot's blocks in order, as one [Hkv, S, D] sequence
      auto gather = [&](const at::Tensor& c) {
        if (nb == 1) return c.select(0, tp[sp[0] * n_bps]).narrow(1, 0, S).unsqueeze(0);  // a view
        return c.index_select(0, table.select(0, sp[0]).narrow(0, 0, nb)).transpose(0, 1)
            .reshape({n_head_kv, nb * bs, D}).narrow(1, 0, S).unsqueeze(0);
      };
      at::Tensor keys = gather(kc), values = gather(vc);                               // [1, Hkv, S, D]
      const at::Tensor key_pos = at::arange(S, pos.options()).unsqueeze(0), q_pos = pos.reshape({R, 1});
      at::Tensor allowed = key_pos.le(q_pos);                                         // [R, S]
      if (n_swa > 0) allowed.logical_and_(q_pos.sub(key_pos).lt(n_swa));
      at::Tensor o = at::scaled_dot_product_attention(qh, keys, values, allowed, 0.0, false, scale_, n_head != n_head_kv);
      att.view({1, R, n_head, D}).transpose(1, 2).copy_(o);                        // [R, H * D]
      return att;
    }
    // per row: scores q . K[lo..p] * scale (masked elsewhere), softmax, then . V[lo..p]
    const float* qp = q.data_ptr<float>();
    float* ap = att.data_ptr<float>();
    auto kv_base = [&](int64_t r, int64_t hk, const float* cache) {
      return Pages{cache, tp + sp[r] * n_bps, bs, n_head_kv * bs * D, hk * bs * D, D};
    };
    for (int64_t c0 = 0; c0 < R; c0 += kAttnRows) {  // rows in chunks: scores [rows, H, S] stay small
      const int64_t c1 = std::min(R, c0 + kAttnRows), Rc = c1 - c0;
      int64_t S = 1;
      for (int64_t r = c0; r < c1; ++r) S = std::max<int64_t>(S, pp[r] + 1);
      // Batch-invariant: whole 16-float vectors, so that ATen's softmax takes its vector
      // path with key j in lane j % 16 for any S (a shorter row goes a scalar way).
      if (g_invariant) S = (S + 15) / 16 * 16;
      at::Tensor scores = at::empty({Rc, n_head, S}, x.options());                  // [Rc, H, S]
      float* scp = scores.data_ptr<float>();
      // Tasks: (row, KV head, block of kKeyBlock keys) for the scores, (row, KV head, 16 head
      // dimensions) for the values; a short decode step's attention stays on one thread.
      const bool threads = Rc * n_head * S * D >= kAttnGrainFlops;
      const int64_t n_kb = (S + kKeyBlock - 1) / kKeyBlock, n_db = (D + 15) / 16;
      parallel_range(Rc * n_head_kv * n_kb, threads ? 1 : Rc * n_head_kv * n_kb, [&](int64_t b, int64_t e, int) {
        for (int64_t t = b; t < e; ++t) {
          const int64_t i = t / (n_head_kv * n_kb), r = c0 + i, hk = t / n_kb % n_head_kv, kb = t % n_kb;
          scores_rows(qp + r * QD + hk * G * D, kv_base(r, hk, kcp), kb * kKeyBlock, std::min(S, (kb + 1) * kKeyBlock),
                      first_key(r), std::max<int64_t>(pp[r], 0) + 1, S, D, G, scale, scp + (i * n_head + hk * G) * S);
        }
      });
      at::Tensor probs = at::_softmax(scores, -1, false);  // -inf outside a row's keys: exact zeros
      const float* pr = probs.data_ptr<float>();
      parallel_range(Rc * n_head_kv * n_db, threads ? 1 : Rc * n_head_kv * n_db, [&](int64_t b, int64_t e, int) {
        for (int64_t t = b; t < e; ++t) {
          const int64_t i = t / (n_head_kv * n_db), r = c0 + i, hk = t / n_db % n_head_kv, db = t % n_db;
          const int64_t lo = first_key(r);
          weighted_values(pr + (i * n_head + hk * G) * S + lo, kv_base(r, hk, vcp).from(lo),
                          std::max<int64_t>(pp[r], 0) + 1 - lo, S, D, G, db * 16, std::min(D, (db + 1) * 16),
                          ap + r * QD + hk * G * D);
        }
      });
    }
    return att;
  };

  for (int64_t pc = 0; pc < program_t.numel(); pc += kInstr) {
    const int64_t op = program[pc], dst = program[pc + 1], src = program[pc + 2], nrm = program[pc + 3];
    const int64_t a = program[pc + 4], b = program[pc + 5], c = program[pc + 6];
    switch (op) {
      case NORM_LINEAR: {  // the q, k, v roles (their shapes are those of WQ, WK, WV)
        TORCH_CHECK(a == WQ && b == WK && c == WV, "NORM_LINEAR projects q, k, v");
        std::vector<at::Tensor> out = {region_b(0, QD), region_b(R * QD, KD), region_b(R * (QD + KD), KD)};
        project(normed(nrm), {{w[a], &out[0], &bias[a]}, {w[b], &out[1], &bias[b]}, {w[c], &out[2], &bias[c]}}, tile);
        put(dst, std::move(out));
        break;
      }
      case HEAD_NORM: {  // in place
        std::vector<at::Tensor> qkv = take(src, 3);
        const float* qn = norm_w(nrm, D);
        const float* kn = norm_w(a, D);
        float* qp = qkv[0].data_ptr<float>();
        float* kp = qkv[1].data_ptr<float>();
        rows([&](int64_t r) {
          for (int64_t h = 0; h < n_head; ++h) rms_norm(qp + r * QD + h * D, qn, D, fe, qp + r * QD + h * D);
          for (int64_t h = 0; h < n_head_kv; ++h) rms_norm(kp + r * KD + h * D, kn, D, fe, kp + r * KD + h * D);
        });
        put(dst, std::move(qkv));
        break;
      }
      case ATTENTION: {
        at::Tensor att;
        {
          const std::vector<at::Tensor> qkv = take(src, 3);
          att = attention(qkv[0], qkv[1], qkv[2]);
        }
        put(dst, {att});
        break;
      }
      case LINEAR_ADD: {  // x += post(W a): y = post(W a), then y += x into y (the new stream) or x += y
        TORCH_CHECK(role(a) == WO || a == WDOWN, "LINEAR_ADD projects by Wo or Wdown");
        const bool first = stream.data_ptr() == x.data_ptr();  // the input is not ours to write
        at::Tensor y = first ? at::empty({R, E}, x.options()) : region_a();
        {
          const at::Tensor in = take(src, 1)[0];
          TORCH_CHECK(in.dim() == 2 && in.size(0) == R && in.size(1) == w[a].K, "LINEAR_ADD: a value of the wrong width");
          project(in, {{w[a], &y, &bias[a]}}, tile);
        }
        const float* post = nrm < 0 ? nullptr : norm_w(nrm, E);
        float* yp = y.data_ptr<float>();
        float* xp = stream.data_ptr<float>();
        rows([&](int64_t r) {
          if (post) rms_norm(yp + r * E, post, E, fe, yp + r * E);
          if (first)
            for (int64_t i = r * E; i < (r + 1) * E; ++i) yp[i] += xp[i];
        });
        if (first) stream = y;
        else stream.add_(y);
        break;
      }
      case NORM_GATED: {
        TORCH_CHECK(a == WGATE && b == WUP && (c == SILU || c == GELU_TANH), "NORM_GATED: Wgate, Wup, act 0 or 1");
        at::Tensor g = region_b(0, ff), u = region_b(R * ff, ff);
        project(normed(nrm), {{w[a], &g, &bias[a]}, {w[b], &u, &bias[b]}}, tile);
        // ATen's vectorized activations (the twin's F.silu / F.gelu(approximate="tanh")): a
        // scalar exp loop cost ~0.1 ms a layer at 16 rows
        (c == SILU ? at::silu_(g) : at::gelu_(g, "tanh")).mul_(u);
        u.reset();
        put(dst, {g});
        break;
      }
      default:
        TORCH_CHECK(false, "bad op ", op);
    }
  }
  TORCH_CHECK(stream.data_ptr() != x.data_ptr(), "a program that adds nothing to the stream");
  if (layer == k_all.size(0) - 1) t_workspace.release();  // the model's last block: the step is over
  return stream.view(x3.sizes());
}

// ---------------------------------------------------------------------------------------
// The ops.
// ---------------------------------------------------------------------------------------

at::Tensor qmatmul(const at::Tensor& x, const at::Tensor& w, int64_t type, int64_t N, int64_t K) {
  const QW qw = make_qw(w, type, N, K);
  check_x(x, K);
  return matmul(x, qw);
}

at::Tensor dequantize_rows(const at::Tensor& w, int64_t type, int64_t N, int64_t K, const at::Tensor& rows) {
  const QW qw = make_qw(w, type, N, K);
  TORCH_CHECK(rows.device().is_cpu() && rows.scalar_type() == at::kLong && rows.dim() == 1 && rows.is_contiguous(),
              "rows must be a contiguous int64 vector");
  const int64_t R = rows.numel();
  const int64_t* rp = rows.data_ptr<int64_t>();
  for (int64_t r = 0; r < R; ++r) TORCH_CHECK(rp[r] >= 0 && rp[r] < N, "row ", rp[r], " out of range [0, ", N, ")");
  at::Tensor out = at::empty({R, K}, w.options().dtype(at::kFloat));
  float* op = out.data_ptr<float>();
  // Rows are independent: split large lookups (a whole tensor) across threads, which also
  // spreads the first-touch page faults of a fresh output buffer.
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(K, 1));
  with_type(type, [&](auto t) {
    using T = decltype(t);
    at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
#ifdef GGUFLM_X86
      if (simd_active()) { dequant_rows_avx512<T>(qw.data, K, rp + r0, r1 - r0, op + r0 * K); return; }
#endif
      dequant_rows_generic<T>(qw.data, K, rp + r0, r1 - r0, op + r0 * K);
    });
    return 0;
  });
  return out;
}

// [type id, elements per block, bytes per block] of every type with a kernel.
std::vector<int64_t> kernel_types() {
  std::vector<int64_t> out;
  for (int64_t id : {Q4_0::ID, Q4_1::ID, Q5_0::ID, Q5_1::ID, Q8_0::ID, Q4_K::ID, Q5_K::ID, Q6_K::ID})
    with_type(id, [&](auto t) {
      using T = decltype(t);
      out.insert(out.end(), {T::ID, T::QK, T::BYTES});
      return 0;
    });
  return out;
}

// Select the AVX-512 path (when the CPU has it) or the portable one; returns the old choice.
bool use_simd(bool enable) {
  const bool old = g_use_simd;
  g_use_simd = enable;
  return old;
}

bool simd_available() { return cpu_has_avx512(); }

// Select the VNNI row kernels (when the CPU has them and the AVX-512 path is on) or the
// float ones; returns the old choice.
bool use_vnni(bool enable) {
  const bool old = g_use_vnni;
  g_use_vnni = enable;
  return old;
}

bool vnni_available() { return cpu_has_avx512() && cpu_has_vnni(); }


// Turn the batch-invariant mode (see g_invariant) on or off; returns the old setting.
bool set_batch_invariant(bool enable) {
  const bool old = g_invariant;
  g_invariant = enable;
  return old;
}

}  // namespace

TORCH_LIBRARY(gguflm_cpu, m) {
  m.def("qmatmul(Tensor x, Tensor w, int type, int n_out, int n_in) -> Tensor", &qmatmul);
  m.def("dequantize_rows(Tensor w, int type, int n_out, int n_in, Tensor rows) -> Tensor", &dequantize_rows);
  m.def("block_step(Tensor x, Tensor positions, Tensor slots, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor table, "
        "int layer, "
        "Tensor cos, Tensor sin, Tensor program, Tensor?[] norms, float eps, Tensor[] weights, int[] types, "
        "Tensor?[] biases, int n_head, int n_head_kv, int n_ff, bool neox, float scale, int n_swa) -> Tensor", &block_step);
  m.def("kernel_types() -> int[]", &kernel_types);
  m.def("use_simd(bool enable) -> bool", &use_simd);
  m.def("set_batch_invariant(bool enable) -> bool", &set_batch_invariant);
  m.def("simd_available() -> bool", &simd_available);
  m.def("use_vnni(bool enable) -> bool", &use_vnni);
  m.def("vnni_available() -> bool", &vnni_available);
  m.def("fused_max_m() -> int", &fused_max_m);
  m.def("set_thread_limit(int n) -> int", &set_thread_limit);
}
