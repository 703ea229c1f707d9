// Fused dequantize x GEMV for batch-1 decode, CUDA C++ with explicit register layouts.
//
//     y[r] = (R[r] +) W[r] . x'                      (plain / residual epilogue)
//     y[r] = silu(Wg[r] . x') * (Wu[r] . x')         (SWIGLU)
//
// with x' = x or, with NORM, (x * norm_w) and the dot scaled by rstd = 1/sqrt(mean(x^2) + eps)
// (the same contract as gguflm/quant/triton/gemv.py, whose torch twin checks both).
// W is a GGUF tensor regrouped into field planes (gguflm/quant/triton/planes.py): field f of
// block i lives at byte n_blocks * offset(f) + i * size(f).
//
// Layout of the work. A warp owns R rows (of each of W weights: 2 for SWIGLU) and walks the
// whole row: the row is cut into chunks of 32 values, one 16-byte quant load each (two for
// Q8_0), and lane l takes chunks l, l + 32, ... U chunks are loaded for all rows before the
// first is used, so U * R * W 16-byte loads are in flight per lane. The 32 values of a chunk
// always pair with two runs of 16 activations; each CTA first copies x' into shared memory
// with an XOR swizzle of its 16-byte groups chosen per type so that the 8 lanes of a phase
// of a 128-bit shared load hit 8 different bank groups (no conflicts), and computes
// sum(x^2) on the way. No barrier after that: warps are independent, and every reduction
// (lane sums by a fixed butterfly, the CTA's sum of squares in warp order) has a fixed
// order, so results are bit-identical run to run.
//
// A code q of b bits enters as the float f = 1 + q / 2^b (q placed at the top of the
// mantissa of 1.0: a shift and a LOP3, no conversion), and sum q x = 2^b (sum f x - sum x),
// sum x being shared by all rows of the warp.
//
// Several weights that read the same x (Q, K, V) run in one launch, of two types too (Q4_K
// with Q6_K, Q4_0 with Q8_0): each CTA belongs to one segment (its own planes, type, rows and
// output). One kernel per type (or pair) and launch shape keeps the code small (~1-2k SASS
// instructions; one kernel holding every type was 7k and ran 20-50 % slower inside the decode
// step than alone). Kernels are launched with programmatic dependent launch (PDL): a GEMV
// starts while the kernel before it finishes, issues its first weight loads, and waits
// (griddepcontrol.wait) before it reads x. The output projection can fold the greedy argmax
// into its epilogue (per-CTA partials, reduced in a fixed order by the CTA that ends last).
//
// Several activation rows (x [R, K], the server's batched decode step): gemv_rows_kernel runs
// one or two weight rows per warp over a tile of up to ROWS_NX rows of x per CTA (grid axis
// y), each weight chunk decoded once for the tile, and for each activation row the 1-row
// kernel's float operations in its order, so that row r of the output is bit-identical to the
// 1-row kernel on x[r] alone whatever R, the row's place, the tile and the weight rows per warp
// (the roundings are spelled out below so that nvcc cannot contract differently in the two
// kernels). gemv_tile_kernel (the default for x [R, K]) keeps that contract with the per-row
// work cut to about an FMA per weight and row: each weight code decoded once per tile of up to
// 8 rows of x, each shared-memory read of x serving 4 weight rows, the sums of x's runs once
// per CTA (see its section below).
//
// Built by gguflm/quant/cuda/build.py with nvcc into two shared libraries (the 1-row kernels;
// the rows kernels) called through ctypes.

#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <string.h>
#include <math.h>
#include <stdlib.h>
#include <type_traits>

#define GT_Q4_0 2
#define GT_Q8_0 8
#define GT_Q4_K 12
#define GT_Q6_K 14

// The C entry points of both libraries pick one function per type or pair of types:
// GGUFLM_FNS(X) names them (suffixes), GGUFLM_PICK(ta, tb, SEL) runs SEL(suffix) for (ta, tb).
#define GGUFLM_FNS(X) X(q4_0) X(q8_0) X(q4_k) X(q6_k) X(q4_k_q6_k) X(q4_0_q8_0)
#define GGUFLM_PICK(ta, tb, SEL)                                   \
    if ((ta) == (tb)) {                                             \
        switch (ta) {                                               \
            case GT_Q4_0: SEL(q4_0); break;                         \
            case GT_Q8_0: SEL(q8_0); break;                         \
            case GT_Q4_K: SEL(q4_k); break;                         \
            case GT_Q6_K: SEL(q6_k); break;                         \
        }                                                           \
    } else if ((ta) == GT_Q4_K && (tb) == GT_Q6_K) {                \
        SEL(q4_k_q6_k);                                             \
    } else if ((ta) == GT_Q4_0 && (tb) == GT_Q8_0) {                \
        SEL(q4_0_q8_0);                                             \
    }

#define MAX_SEGS 4

struct Seg {
    const uint8_t* planes;    // field planes of W (SWIGLU: the gate weight)
    const uint8_t* planes2;   // SWIGLU: the up weight (same type and shape), else unused
    long long n_blocks;       // blocks of the whole tensor
    float* out;
    const float* residual;    // may alias out; null: none
    int n_rows;
    int type;
    int cta_begin;            // first CTA of this segment
    int pad_;
};

struct Params {
    Seg seg[MAX_SEGS];
    const float* x;
    const float* norm;        // null: no RMS norm
    float eps;
    int K;                    // row length (values)
    int n_seg;
    int n_cta;                // CTAs of all segments
    // argmax epilogue (one segment, not SWIGLU): argmax_out[0] = the first index of the
    // largest y (NaN counts as largest, as in torch.argmax); null: none
    long long* argmax_out;
    float* part_val;          // [n_cta] each CTA's best, then reduced by the last CTA
    int* part_idx;
    unsigned int* counter;    // 0 before the launch; the last CTA sets it back to 0
    // Several activation rows (gemv_rows_kernel; appended, so the 1-row kernels' parameter
    // offsets are unchanged): x is [n_x, K] with row stride x_ld (floats); CTA column
    // blockIdx.y takes rows [tile * blockIdx.y, + tile); segment i writes row j of its output
    // at out + j * out_ld[i] and reads its residual at residual + j * res_ld[i]; the tile
    // kernel (gemv_tile_kernel): grid (tiles, CTAs), CTA blockIdx.y taking `groups` groups of
    // its warps' weight rows one after the other
    int n_x, x_ld, tile, groups;
    int out_ld[MAX_SEGS], res_ld[MAX_SEGS];
};
// an entry of one type or pair (GGUFLM_PICK): (params, warps, R or 0, U or rows per warp, swiglu, pdl, stream)
typedef int (*GgufFn)(const Params&, int, int, int, int, int, cudaStream_t);

// where activation row j of x, of segment i's output and residual start (shared by the
// rows kernel and the emulation)
#define HDI __host__ __device__ __forceinline__
HDI const float* x_row(const Params& p, int j) { return p.x + (long long)j * p.x_ld; }
HDI float* out_row(const Params& p, int i, int j) { return p.seg[i].out + (long long)j * p.out_ld[i]; }
HDI const float* res_row(const Params& p, int i, int j) {
    return p.seg[i].residual ? p.seg[i].residual + (long long)j * p.res_ld[i] : nullptr;
}

// The per-type code below is host-and-device (HD): gguflm_gemv_emulate runs it on the CPU,
// so that its indexing is tested without a GPU (tests/cuda/test_cuda_gemv.py).
#define HD __host__ __device__ __forceinline__

HD uint4 ld16(const uint8_t* p) {
#ifdef __CUDA_ARCH__
    return __ldg(reinterpret_cast<const uint4*>(p));
#else
    uint4 v;
    memcpy(&v, p, 16);
    return v;
#endif
}
HD uint32_t ld4(const uint8_t* p) {
#ifdef __CUDA_ARCH__
    return __ldg(reinterpret_cast<const uint32_t*>(p));
#else
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
#endif
}
HD int ld_i8(const uint8_t* p) {
#ifdef __CUDA_ARCH__
    return __ldg(reinterpret_cast<const int8_t*>(p));
#else
    return *reinterpret_cast<const int8_t*>(p);
#endif
}
HD float ldh(const uint8_t* p) {
#ifdef __CUDA_ARCH__
    return __half2float(__ldg(reinterpret_cast<const __half*>(p)));
#else
    uint16_t h;
    memcpy(&h, p, 2);
    return __half2float(*reinterpret_cast<const __half*>(&h));
#endif
}

// bits [P, P + B) of w moved to [D, D + B) (the rest cleared), or-ed with 1.0f
template <int P, int D, uint32_t MASK>
HD uint32_t field(uint32_t w) {
    return (P <= D ? (w << (D - P)) : (w >> (P - D))) & MASK;
}
HD float as_f(uint32_t u) {
    u |= 0x3F800000u;
#ifdef __CUDA_ARCH__
    return __uint_as_float(u);
#else
    float f;
    memcpy(&f, &u, 4);
    return f;
#endif
}

// Roundings spelled out: the per-row float operations below are written so that nvcc cannot
// contract a product and a sum differently in the kernel over several activation rows than in
// the 1-row kernel (each is the operation the 1-row kernel's SASS had: the sm_90 build read
// with cuobjdump, 2026-12-05). On the host (the emulation) plain operations: gcc contracts
// nothing without FMA instructions, and build.py passes -ffp-contract=off.
HD float mul_rn(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fmul_rn(a, b);
#else
    return a * b;
#endif
}
HD float add_rn(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fadd_rn(a, b);
#else
    return a + b;
#endif
}
HD float sub_rn(float a, float b) {
#ifdef __CUDA_ARCH__
    return __fsub_rn(a, b);
#else
    return a - b;
#endif
}
// the sum of a run of 16 activations, in the kernel's order
HD float sum16(const float* v) {
    return add_rn(add_rn(add_rn(add_rn(v[0], v[1]), add_rn(v[2], v[3])), add_rn(add_rn(v[4], v[5]), add_rn(v[6], v[7]))),
                  add_rn(add_rn(add_rn(v[8], v[9]), add_rn(v[10], v[11])), add_rn(add_rn(v[12], v[13]), add_rn(v[14], v[15]))));
}

// A row's output from its (lane-reduced) dot products g (and u: SWIGLU) and rstd.
template <bool SWIGLU>
HD float epilogue(float g, float u, float rstd, const float* residual, int row) {
    if (SWIGLU) {
        g = mul_rn(g, rstd);
        u = mul_rn(u, rstd);
        // 1 + expf(-g) stays a plain sum: nvcc fuses it with the last product inside expf (an
        // FFMA ..., 1 in the 1-row kernel's SASS), the same in every kernel using this function
        return mul_rn(g / (1.f + expf(-g)), u);
    }
    const float y = mul_rn(g, rstd);
    return residual ? add_rn(y, residual[row]) : y;
}

// word I of a 16-byte load
template <int I>
HD uint32_t word(const uint4& v) {
    return I == 0 ? v.x : I == 1 ? v.y : I == 2 ? v.z : v.w;
}
// (x & M) | C in one LOP3: C from a register (nvcc emits two LOP3 for two immediates)
template <uint32_t M, uint32_t C>
HD uint32_t and_or(uint32_t x) {
#ifdef __CUDA_ARCH__
    uint32_t c, u;
    asm("mov.b32 %0, %1;" : "=r"(c) : "n"(C));
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(u) : "r"(x), "n"(M), "r"(c));
    return u;
#else
    return (x & M) | C;
#endif
}
// The float with byte E of u as bits 16-23, 0x3F as bits 24-31, zeros below: for a byte
// 0x80 | m << (7 - b) (a code m of b bits) the exponent is 127 and the float 1 + m / 2^b, the
// value as_f(field<...>) gives; one PRMT per code (the field and as_f: a shift and two LOP3)
template <int E>
HD float byte_f(uint32_t u) {
#ifdef __CUDA_ARCH__
    return __uint_as_float(__byte_perm(u, 0x3F000000u, 0x7044 | (E << 8)));
#else
    const uint32_t v = ((u >> (8 * E)) & 0xFFu) << 16 | 0x3F000000u;
    float f;
    memcpy(&f, &v, 4);
    return f;
#endif
}

// ---------------------------------------------------------------------------------------
// Per-type traits: chunks per block (CPB), values per block (QK), the shared-memory swizzle,
// the chunk's raw data, its two activation runs, and acc plus its contribution given those
// runs (dot).
// ---------------------------------------------------------------------------------------

struct Q4_0 {
    static constexpr int ID = GT_Q4_0;
    static constexpr int QK = 32, CPB = 1;
    HD static int swz(int g) { return g ^ ((g >> 3) & 7); }
    struct Raw { uint4 q; float d; };
    HD static uint32_t dep(const Raw& r) { return r.q.x; }
    HD static void load(Raw& r, const uint8_t* P, long long n, long long blk, int) {
        r.q = ld16(P + n * 2 + blk * 16);
        r.d = ldh(P + blk * 2);
    }
    // the tile kernel's load in two: the codes (loaded a chunk ahead) and the scales (at the
    // chunk's start: used after its FMAs)
    HD static void load_q(Raw& r, const uint8_t* P, long long n, long long blk, int) {
        r.q = ld16(P + n * 2 + blk * 16);
    }
    HD static void load_s(Raw& r, const uint8_t* P, long long, long long blk, int) { r.d = ldh(P + blk * 2); }
    HD static void move_q(Raw& d, const Raw& r) { d.q = r.q; }
    HD static int off0(int) { return 0; }
    HD static int off1(int) { return 16; }
    // y = d (q - 8); lo nibble of byte l -> a[l], hi -> b[l]
    HD static float dot(const Raw& r, int, const float* a, const float* b, float xa, float xb, float acc) {
        const uint32_t w[4] = {r.q.x, r.q.y, r.q.z, r.q.w};
        float s = 0.f, t = 0.f;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            s = fmaf(as_f(field<0, 19, 0x780000u>(w[i])), a[4 * i + 0], s);
            s = fmaf(as_f(field<8, 19, 0x780000u>(w[i])), a[4 * i + 1], s);
            s = fmaf(as_f(field<16, 19, 0x780000u>(w[i])), a[4 * i + 2], s);
            s = fmaf(as_f(field<24, 19, 0x780000u>(w[i])), a[4 * i + 3], s);
            t = fmaf(as_f(field<4, 19, 0x780000u>(w[i])), b[4 * i + 0], t);
            t = fmaf(as_f(field<12, 19, 0x780000u>(w[i])), b[4 * i + 1], t);
            t = fmaf(as_f(field<20, 19, 0x780000u>(w[i])), b[4 * i + 2], t);
            t = fmaf(as_f(field<28, 19, 0x780000u>(w[i])), b[4 * i + 3], t);
        }
        const float X = add_rn(xa, xb);
        return fmaf(r.d, fmaf(16.f, add_rn(sub_rn(s, xa), sub_rn(t, xb)), mul_rn(-8.f, X)), acc);
    }
    // the tile kernel's pieces of dot(): the 4 codes at positions 4 I .. 4 I + 3 of run H (0: a,
    // 1: b) as floats, and the tail given the runs' sums s, t (the same operations as dot())
    template <int H, int I>
    HD static void dec4(const Raw& r, int, float* f) {
        const uint32_t w = word<I>(r.q);       // nibble H of each byte -> 0x80 | q << 3
        const uint32_t u = and_or<0x78787878u, 0x80808080u>(H ? w >> 1 : w << 3);
        f[0] = byte_f<0>(u);
        f[1] = byte_f<1>(u);
        f[2] = byte_f<2>(u);
        f[3] = byte_f<3>(u);
    }
    struct Pre { float d; };
    HD static Pre pre(const Raw& r, int) { return {r.d}; }
    HD static float tail(const Pre& q, float s, float t, float xa, float xb, float acc) {
        const float X = add_rn(xa, xb);
        return fmaf(q.d, fmaf(16.f, add_rn(sub_rn(s, xa), sub_rn(t, xb)), mul_rn(-8.f, X)), acc);
    }
};

struct Q8_0 {
    static constexpr int ID = GT_Q8_0;
    static constexpr int QK = 32, CPB = 1;
    HD static int swz(int g) { return g ^ ((g >> 3) & 7); }
    struct Raw { uint4 q0, q1; float d; };
    HD static uint32_t dep(const Raw& r) { return r.q0.x; }
    HD static void load(Raw& r, const uint8_t* P, long long n, long long blk, int) {
        r.q0 = ld16(P + n * 2 + blk * 32);
        r.q1 = ld16(P + n * 2 + blk * 32 + 16);
        r.d = ldh(P + blk * 2);
    }
    // the tile kernel's load in two: the codes (loaded a chunk ahead) and the scales (at the
    // chunk's start: used after its FMAs)
    HD static void load_q(Raw& r, const uint8_t* P, long long n, long long blk, int) {
        r.q0 = ld16(P + n * 2 + blk * 32);
        r.q1 = ld16(P + n * 2 + blk * 32 + 16);
    }
    HD static void load_s(Raw& r, const uint8_t* P, long long, long long blk, int) { r.d = ldh(P + blk * 2); }
    HD static void move_q(Raw& d, const Raw& r) {
        d.q0 = r.q0;
        d.q1 = r.q1;
    }
    HD static int off0(int) { return 0; }
    HD static int off1(int) { return 16; }
    HD static float run(uint4 q, const float* a) {
        const uint32_t w[4] = {q.x ^ 0x80808080u, q.y ^ 0x80808080u, q.z ^ 0x80808080u, q.w ^ 0x80808080u};
        float s = 0.f;
#pragma unroll
        for (int i = 0; i < 4; ++i) {    // u = q + 128 as 1 + u / 256
            s = fmaf(as_f(field<0, 15, 0x7F8000u>(w[i])), a[4 * i + 0], s);
            s = fmaf(as_f(field<8, 15, 0x7F8000u>(w[i])), a[4 * i + 1], s);
            s = fmaf(as_f(field<16, 15, 0x7F8000u>(w[i])), a[4 * i + 2], s);
            s = fmaf(as_f(field<24, 15, 0x7F8000u>(w[i])), a[4 * i + 3], s);
        }
        return s;
    }
    // y = d q = d (u - 128)
    HD static float dot(const Raw& r, int, const float* a, const float* b, float xa, float xb, float acc) {
        const float s = run(r.q0, a), t = run(r.q1, b);
        const float X = add_rn(xa, xb);
        return fmaf(r.d, fmaf(256.f, add_rn(sub_rn(s, xa), sub_rn(t, xb)), mul_rn(-128.f, X)), acc);
    }
    // the tile kernel's pieces of dot() (see Q4_0)
    template <int H, int I>
    HD static void dec4(const Raw& r, int, float* f) {
        const uint32_t w = word<I>(H ? r.q1 : r.q0) ^ 0x80808080u;   // (and_or here: spills at 8 rows)
        f[0] = as_f(field<0, 15, 0x7F8000u>(w));
        f[1] = as_f(field<8, 15, 0x7F8000u>(w));
        f[2] = as_f(field<16, 15, 0x7F8000u>(w));
        f[3] = as_f(field<24, 15, 0x7F8000u>(w));
    }
    struct Pre { float d; };
    HD static Pre pre(const Raw& r, int) { return {r.d}; }
    HD static float tail(const Pre& q, float s, float t, float xa, float xb, float acc) {
        const float X = add_rn(xa, xb);
        return fmaf(q.d, fmaf(256.f, add_rn(sub_rn(s, xa), sub_rn(t, xb)), mul_rn(-128.f, X)), acc);
    }
};

struct Q4_K {
    static constexpr int ID = GT_Q4_K;
    // block: d, dmin, scales[12], qs[128]; chunk c = 2j + h: qs[32j + 16h + l], lo nibble ->
    // value 64j + 16h + l (sub-block 2j), hi -> 64j + 32 + 16h + l (sub-block 2j + 1)
    static constexpr int QK = 256, CPB = 8;
    HD static int swz(int g) { return g ^ ((g >> 4) & 3); }
    struct Raw { uint4 q; uint32_t s0, s1, s2; float d, dmin; };
    HD static uint32_t dep(const Raw& r) { return r.q.x; }
    HD static void load(Raw& r, const uint8_t* P, long long n, long long blk, int c) {
        r.q = ld16(P + n * 16 + blk * 128 + c * 16);
        const uint8_t* sc = P + n * 4 + blk * 12;
        r.s0 = ld4(sc);
        r.s1 = ld4(sc + 4);
        r.s2 = ld4(sc + 8);
        r.d = ldh(P + blk * 2);
        r.dmin = ldh(P + n * 2 + blk * 2);
    }
    // the tile kernel's load in two: the codes (loaded a chunk ahead) and the scales (at the
    // chunk's start: used after its FMAs)
    HD static void load_q(Raw& r, const uint8_t* P, long long n, long long blk, int c) {
        r.q = ld16(P + n * 16 + blk * 128 + c * 16);
    }
    HD static void load_s(Raw& r, const uint8_t* P, long long n, long long blk, int) {
        const uint8_t* sc = P + n * 4 + blk * 12;
        r.s0 = ld4(sc);
        r.s1 = ld4(sc + 4);
        r.s2 = ld4(sc + 8);
        r.d = ldh(P + blk * 2);
        r.dmin = ldh(P + n * 2 + blk * 2);
    }
    HD static void move_q(Raw& d, const Raw& r) { d.q = r.q; }
    HD static int off0(int c) { return 64 * (c >> 1) + 16 * (c & 1); }
    HD static int off1(int c) { return 64 * (c >> 1) + 16 * (c & 1) + 32; }
    // 6-bit scale and min of sub-block s (get_scale_min_k4)
    HD static void scale_min(const Raw& r, int s, float& sc, float& mn) {
        const int sh = 8 * (s & 3);
        uint32_t a, b;
        if (s < 4) {
            a = (r.s0 >> sh) & 63;
            b = (r.s1 >> sh) & 63;
        } else {
            const uint32_t hi = r.s2 >> sh;
            a = (hi & 15) | (((r.s0 >> sh) >> 6 & 3) << 4);
            b = ((hi >> 4) & 15) | (((r.s1 >> sh) >> 6 & 3) << 4);
        }
        sc = (float)a;
        mn = (float)b;
    }
    HD static float dot(const Raw& r, int c, const float* a, const float* b, float xa, float xb, float acc) {
        const uint32_t w[4] = {r.q.x, r.q.y, r.q.z, r.q.w};
        float s = 0.f, t = 0.f;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            s = fmaf(as_f(field<0, 19, 0x780000u>(w[i])), a[4 * i + 0], s);
            s = fmaf(as_f(field<8, 19, 0x780000u>(w[i])), a[4 * i + 1], s);
            s = fmaf(as_f(field<16, 19, 0x780000u>(w[i])), a[4 * i + 2], s);
            s = fmaf(as_f(field<24, 19, 0x780000u>(w[i])), a[4 * i + 3], s);
            t = fmaf(as_f(field<4, 19, 0x780000u>(w[i])), b[4 * i + 0], t);
            t = fmaf(as_f(field<12, 19, 0x780000u>(w[i])), b[4 * i + 1], t);
            t = fmaf(as_f(field<20, 19, 0x780000u>(w[i])), b[4 * i + 2], t);
            t = fmaf(as_f(field<28, 19, 0x780000u>(w[i])), b[4 * i + 3], t);
        }
        const int j = c >> 1;
        float sc0, m0, sc1, m1;
        scale_min(r, 2 * j, sc0, m0);
        scale_min(r, 2 * j + 1, sc1, m1);
        // y = d sc q - dmin m
        const float y = fmaf(mul_rn(r.d, 16.f), fmaf(sc0, sub_rn(s, xa), mul_rn(sc1, sub_rn(t, xb))),
                             -mul_rn(r.dmin, fmaf(m0, xa, mul_rn(m1, xb))));
        return add_rn(acc, y);
    }
    // the tile kernel's pieces of dot() (see Q4_0)
    template <int H, int I>
    HD static void dec4(const Raw& r, int, float* f) {
        const uint32_t w = word<I>(r.q);       // nibble H of each byte -> 0x80 | q << 3
        const uint32_t u = and_or<0x78787878u, 0x80808080u>(H ? w >> 1 : w << 3);
        f[0] = byte_f<0>(u);
        f[1] = byte_f<1>(u);
        f[2] = byte_f<2>(u);
        f[3] = byte_f<3>(u);
    }
    struct Pre { float d16, dmin, sc0, m0, sc1, m1; };
    // scale_min of sub-blocks 2j, 2j + 1 (j = c >> 1): bytes 2j & 3 and the next of each word
    HD static Pre pre(const Raw& r, int c) {
        const int j = c >> 1, sh = 16 * (j & 1);
        const uint32_t A = r.s0 >> sh, B = r.s1 >> sh, C = r.s2 >> sh;
        uint32_t sc0, m0, sc1, m1;
        if (j < 2) {
            sc0 = A & 63;
            m0 = B & 63;
            sc1 = (A >> 8) & 63;
            m1 = (B >> 8) & 63;
        } else {
            sc0 = (C & 15) | ((A >> 2) & 0x30);
            m0 = ((C >> 4) & 15) | ((B >> 2) & 0x30);
            sc1 = ((C >> 8) & 15) | ((A >> 10) & 0x30);
            m1 = ((C >> 12) & 15) | ((B >> 10) & 0x30);
        }
        Pre q;
        q.sc0 = (float)sc0;
        q.m0 = (float)m0;
        q.sc1 = (float)sc1;
        q.m1 = (float)m1;
        q.d16 = mul_rn(r.d, 16.f);
        q.dmin = r.dmin;
        return q;
    }
    HD static float tail(const Pre& q, float s, float t, float xa, float xb, float acc) {
        const float y = fmaf(q.d16, fmaf(q.sc0, sub_rn(s, xa), mul_rn(q.sc1, sub_rn(t, xb))),
                             -mul_rn(q.dmin, fmaf(q.m0, xa, mul_rn(q.m1, xb))));
        return add_rn(acc, y);
    }
};

struct Q6_K {
    static constexpr int ID = GT_Q6_K;
    // block: ql[128], qh[64], scales[16] (int8), d; chunk c = 4n + 2jj + h: ql[64n + 32jj + 16h + l],
    // qh[32n + 16h + l]; t = 0: value 128n + 32jj + 16h + l, q = (ql & 15) | ((qh >> 2jj) & 3) << 4,
    // sub-block 8n + 2jj + h; t = 1: value + 64, q = (ql >> 4) | ((qh >> (2jj + 4)) & 3) << 4,
    // sub-block + 4. y = d sc (q - 32)
    static constexpr int QK = 256, CPB = 8;
    HD static int swz(int g) { return g ^ (((g >> 3) & 1) | ((g >> 4) & 2)); }
    struct Raw { uint4 ql, qh; int sc0, sc1; float d; };
    HD static uint32_t dep(const Raw& r) { return r.ql.x; }
    HD static void load(Raw& r, const uint8_t* P, long long n, long long blk, int c) {
        const int nn = c >> 2, h = c & 1;
        r.ql = ld16(P + blk * 128 + c * 16);
        r.qh = ld16(P + n * 128 + blk * 64 + 32 * nn + 16 * h);
        const uint8_t* sc = P + n * 192 + blk * 16;
        const int s = 8 * nn + 2 * ((c >> 1) & 1) + h;
        r.sc0 = ld_i8(sc + s);
        r.sc1 = ld_i8(sc + s + 4);
        r.d = ldh(P + n * 208 + blk * 2);
    }
    // the tile kernel's load in two: the codes (loaded a chunk ahead) and the scales (at the
    // chunk's start: used after its FMAs)
    HD static void load_q(Raw& r, const uint8_t* P, long long n, long long blk, int c) {
        r.ql = ld16(P + blk * 128 + c * 16);
        r.qh = ld16(P + n * 128 + blk * 64 + 32 * (c >> 2) + 16 * (c & 1));
    }
    HD static void load_s(Raw& r, const uint8_t* P, long long n, long long blk, int c) {
        const uint8_t* sc = P + n * 192 + blk * 16;
        const int s = 8 * (c >> 2) + 2 * ((c >> 1) & 1) + (c & 1);
        r.sc0 = ld_i8(sc + s);
        r.sc1 = ld_i8(sc + s + 4);
        r.d = ldh(P + n * 208 + blk * 2);
    }
    HD static void move_q(Raw& d, const Raw& r) {
        d.ql = r.ql;
        d.qh = r.qh;
    }
    HD static int off0(int c) { return 128 * (c >> 2) + 32 * ((c >> 1) & 1) + 16 * (c & 1); }
    HD static int off1(int c) { return off0(c) + 64; }
    HD static float dot(const Raw& r, int c, const float* a, const float* b, float xa, float xb, float acc) {
        const uint32_t lo[4] = {r.ql.x, r.ql.y, r.ql.z, r.ql.w};
        const int sh = 2 * ((c >> 1) & 1);
        const uint32_t qa[4] = {r.qh.x >> sh, r.qh.y >> sh, r.qh.z >> sh, r.qh.w >> sh};
        const uint32_t qb[4] = {qa[0] >> 4, qa[1] >> 4, qa[2] >> 4, qa[3] >> 4};
        float s = 0.f, t = 0.f;
#pragma unroll
        for (int i = 0; i < 4; ++i) {    // q as 1 + q / 64: nibble -> bits 17..20, 2 high bits -> 21..22
            s = fmaf(as_f(field<0, 17, 0x1E0000u>(lo[i]) | field<0, 21, 0x600000u>(qa[i])), a[4 * i + 0], s);
            s = fmaf(as_f(field<8, 17, 0x1E0000u>(lo[i]) | field<8, 21, 0x600000u>(qa[i])), a[4 * i + 1], s);
            s = fmaf(as_f(field<16, 17, 0x1E0000u>(lo[i]) | field<16, 21, 0x600000u>(qa[i])), a[4 * i + 2], s);
            s = fmaf(as_f(field<24, 17, 0x1E0000u>(lo[i]) | field<24, 21, 0x600000u>(qa[i])), a[4 * i + 3], s);
            t = fmaf(as_f(field<4, 17, 0x1E0000u>(lo[i]) | field<0, 21, 0x600000u>(qb[i])), b[4 * i + 0], t);
            t = fmaf(as_f(field<12, 17, 0x1E0000u>(lo[i]) | field<8, 21, 0x600000u>(qb[i])), b[4 * i + 1], t);
            t = fmaf(as_f(field<20, 17, 0x1E0000u>(lo[i]) | field<16, 21, 0x600000u>(qb[i])), b[4 * i + 2], t);
            t = fmaf(as_f(field<28, 17, 0x1E0000u>(lo[i]) | field<24, 21, 0x600000u>(qb[i])), b[4 * i + 3], t);
        }
        const float da = mul_rn(r.d, (float)r.sc0), db = mul_rn(r.d, (float)r.sc1);
        const float y = fmaf(da, fmaf(64.f, sub_rn(s, xa), mul_rn(-32.f, xa)),
                             mul_rn(db, fmaf(64.f, sub_rn(t, xb), mul_rn(-32.f, xb))));
        return add_rn(acc, y);
    }
    // the tile kernel's pieces of dot() (see Q4_0)
    template <int H, int I>
    HD static void dec4(const Raw& r, int c, float* f) {
        // nibble H of each ql byte and bits 4 H, 4 H + 1 of the qh byte (shifted) -> 0x80 | q << 1
        const uint32_t lo = word<I>(r.ql), qa = word<I>(r.qh) >> (2 * ((c >> 1) & 1));
        const uint32_t u =
            and_or<0x1E1E1E1Eu, 0x80808080u>(H ? lo >> 3 : lo << 1) | ((H ? qa << 1 : qa << 5) & 0x60606060u);
        f[0] = byte_f<0>(u);
        f[1] = byte_f<1>(u);
        f[2] = byte_f<2>(u);
        f[3] = byte_f<3>(u);
    }
    struct Pre { float da, db; };
    HD static Pre pre(const Raw& r, int) { return {mul_rn(r.d, (float)r.sc0), mul_rn(r.d, (float)r.sc1)}; }
    HD static float tail(const Pre& q, float s, float t, float xa, float xb, float acc) {
        const float y = fmaf(q.da, fmaf(64.f, sub_rn(s, xa), mul_rn(-32.f, xa)),
                             mul_rn(q.db, fmaf(64.f, sub_rn(t, xb), mul_rn(-32.f, xb))));
        return add_rn(acc, y);
    }
};

// ---------------------------------------------------------------------------------------

// Programmatic dependent launch (sm_90): a kernel launched with it starts while the one before
// it in the stream finishes; it loads its weights (which no kernel writes), then waits for the
// earlier grid to complete and flush before it reads x, the residual or writes anything.
// ptxas hoists an unconditional griddepcontrol.wait to the kernel's entry, above the weight
// loads; predicated on a loaded word (both ways: it always waits) it stays after them.
__device__ __forceinline__ void pdl_wait(uint32_t dep) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("{\n\t.reg .pred p;\n\tsetp.ne.u32 p, %0, 0x5a5a5a5a;\n\t@p griddepcontrol.wait;\n\t"
                 "@!p griddepcontrol.wait;\n\t}" :: "r"(dep) : "memory");
#endif
}
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}

template <typename T>
__device__ __forceinline__ void run16(const float* sx, int k, float* v, float& sum) {
    const int g0 = k >> 2;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float4 q = *reinterpret_cast<const float4*>(sx + 4 * T::swz(g0 + i));
        v[4 * i] = q.x; v[4 * i + 1] = q.y; v[4 * i + 2] = q.z; v[4 * i + 3] = q.w;
    }
    sum = sum16(v);
}

// x' into shared memory (swizzled), returns rstd (1 without norm); all threads of the CTA
template <typename T>
static __device__ float stage(const Params& p, float* sx, float* red, uint32_t dep) {
    const int n4 = p.K >> 2;
    const float4* x4 = reinterpret_cast<const float4*>(p.x);
    const float4* w4 = reinterpret_cast<const float4*>(p.norm);
    pdl_wait(dep);
    float ss = 0.f;
    // all of a thread's loads first (one L2 round trip for rows up to 4 * 4 * blockDim values)
    constexpr int UNR = 4;
    for (int g0 = threadIdx.x; g0 < n4; g0 += UNR * blockDim.x) {
        float4 v[UNR], w[UNR];
#pragma unroll
        for (int u = 0; u < UNR; ++u) {
            const int g = g0 + u * blockDim.x;
            if (g < n4) {
                v[u] = x4[g];
                if (p.norm) w[u] = w4[g];
            }
        }
#pragma unroll
        for (int u = 0; u < UNR; ++u) {
            const int g = g0 + u * blockDim.x;
            if (g < n4) {
                if (p.norm) {
                    ss = fmaf(v[u].x, v[u].x, fmaf(v[u].y, v[u].y, fmaf(v[u].z, v[u].z, fmaf(v[u].w, v[u].w, ss))));
                    v[u].x *= w[u].x; v[u].y *= w[u].y; v[u].z *= w[u].z; v[u].w *= w[u].w;
                }
                *reinterpret_cast<float4*>(sx + 4 * T::swz(g)) = v[u];
            }
        }
    }
    if (!p.norm) {
        __syncthreads();
        return 1.f;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) ss += __shfl_xor_sync(0xffffffffu, ss, o);
    if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = ss;
    __syncthreads();
    float tot = 0.f;
    for (int i = 0; i < (int)(blockDim.x >> 5); ++i) tot += red[i];
    return rsqrtf(tot / (float)p.K + p.eps);
}

// (v, i) beats (bv, bi): larger value, NaN above all, the smaller index on ties. Rows past
// the end carry index INT_MAX, so they never win against a real row.
__device__ __forceinline__ bool beats(float v, int i, float bv, int bi) {
    const bool n = v != v, bn = bv != bv;
    if (n || bn) return n && (!bn || i < bi);
    return v > bv || (v == bv && i < bi);
}
__device__ __forceinline__ void warp_best(float& v, int& i) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, v, o);
        const int oi = __shfl_xor_sync(0xffffffffu, i, o);
        if (beats(ov, oi, v, i)) { v = ov; i = oi; }
    }
}

// Each CTA's best row into part_*[cta]; the CTA that finishes last reduces all parts in
// a fixed order (which CTA that is does not change the result) and resets the counter.
static __device__ void argmax_epilogue(const Params& p, int cta, float v, int i) {
    __shared__ float bv[32];
    __shared__ int bi[32];
    __shared__ bool last;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    if (i == 0x7fffffff) v = -INFINITY;
    warp_best(v, i);
    if (lane == 0) { bv[warp] = v; bi[warp] = i; }
    __syncthreads();
    if (threadIdx.x == 0) {
        float b = bv[0];
        int k = bi[0];
        for (int w = 1; w < warps; ++w)
            if (beats(bv[w], bi[w], b, k)) { b = bv[w]; k = bi[w]; }
        p.part_val[cta] = b;
        p.part_idx[cta] = k;
        __threadfence();
        last = atomicAdd(p.counter, 1u) == (unsigned)p.n_cta - 1;
    }
    __syncthreads();
    if (!last) return;
    __threadfence();
    float b = -INFINITY;
    int k = 0x7fffffff;
#pragma unroll 8
    for (int c = threadIdx.x; c < p.n_cta; c += blockDim.x) {
        const float cv = __ldcg(p.part_val + c);
        const int ci = __ldcg(p.part_idx + c);
        if (beats(cv, ci, b, k)) { b = cv; k = ci; }
    }
    warp_best(b, k);
    __syncthreads();
    if (lane == 0) { bv[warp] = b; bi[warp] = k; }
    __syncthreads();
    if (threadIdx.x == 0) {
        for (int w = 1; w < warps; ++w)
            if (beats(bv[w], bi[w], bv[0], bi[0])) { bv[0] = bv[w]; bi[0] = bi[w]; }
        p.argmax_out[0] = bi[0] == 0x7fffffff ? 0 : bi[0];
        *p.counter = 0u;
    }
}

template <typename T, int R, int U, bool SWIGLU>
__device__ void run_seg(const Params& p, const Seg& s, int cta, float* sx, float* red) {
    constexpr int W = SWIGLU ? 2 : 1;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int warps = blockDim.x >> 5;
    const int row0 = (cta * warps + warp) * R;
    const int nbpr = p.K / T::QK;
    const int nch = nbpr * T::CPB;
    long long rowblk[R];
#pragma unroll
    for (int r = 0; r < R; ++r) rowblk[r] = (long long)min(row0 + r, s.n_rows - 1) * nbpr;
    const uint8_t* P[2] = {s.planes, s.planes2};

    float acc[W][R];
#pragma unroll
    for (int w = 0; w < W; ++w)
#pragma unroll
        for (int r = 0; r < R; ++r) acc[w][r] = 0.f;

    typename T::Raw raw[U][W][R];
    // first loads before the staging barrier: they fly while x is copied
#pragma unroll
    for (int u = 0; u < U; ++u) {
        const int ch = min(lane + 32 * u, nch - 1);
        const int b = ch / T::CPB, c = ch % T::CPB;
#pragma unroll
        for (int w = 0; w < W; ++w)
#pragma unroll
            for (int r = 0; r < R; ++r) T::load(raw[u][w][r], P[w], s.n_blocks, rowblk[r] + b, c);
    }
    const float rstd = stage<T>(p, sx, red, T::dep(raw[0][0][0]));
    pdl_trigger();

    for (int base = 0; base < nch; base += 32 * U) {
        if (base > 0) {
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int ch = min(base + lane + 32 * u, nch - 1);
                const int b = ch / T::CPB, c = ch % T::CPB;
#pragma unroll
                for (int w = 0; w < W; ++w)
#pragma unroll
                    for (int r = 0; r < R; ++r) T::load(raw[u][w][r], P[w], s.n_blocks, rowblk[r] + b, c);
            }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int ch = base + lane + 32 * u;
            if (ch < nch) {
                const int b = ch / T::CPB, c = ch % T::CPB;
                float a[16], bb[16], xa, xb;
                run16<T>(sx, b * T::QK + T::off0(c), a, xa);
                run16<T>(sx, b * T::QK + T::off1(c), bb, xb);
#pragma unroll
                for (int w = 0; w < W; ++w)
#pragma unroll
                    for (int r = 0; r < R; ++r) acc[w][r] = T::dot(raw[u][w][r], c, a, bb, xa, xb, acc[w][r]);
            }
        }
    }
#pragma unroll
    for (int w = 0; w < W; ++w)
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) acc[w][r] += __shfl_xor_sync(0xffffffffu, acc[w][r], o);
    float yv = 0.f;
    int yrow = 0x7fffffff;
    if (lane < R) {
        // lane r stores row r (unrolled select keeps acc in registers)
        float g = acc[0][0], u = SWIGLU ? acc[W - 1][0] : 0.f;
#pragma unroll
        for (int r = 1; r < R; ++r)
            if (lane == r) { g = acc[0][r]; u = acc[W - 1][r]; }
        const int row = row0 + lane;
        if (row < s.n_rows) {
            const float y = epilogue<SWIGLU>(g, u, rstd, s.residual, row);
            s.out[row] = y;
            yv = y;
            yrow = row;
        }
    }
    if (!SWIGLU && p.argmax_out) argmax_epilogue(p, cta, yv, yrow);
}

// One kernel per type, or per pair of types (a mixed Q/K/V): small code, each CTA takes the
// branch of its segment's type.
template <typename TA, typename TB, int R, int U, bool SWIGLU>
__global__ void __launch_bounds__(256) gemv_kernel(const __grid_constant__ Params p) {
    extern __shared__ float4 smem4[];
    float* sx = reinterpret_cast<float*>(smem4);
    __shared__ float red[32];
    int i = 0;
#pragma unroll
    for (int k = 1; k < MAX_SEGS; ++k)
        if (k < p.n_seg && (int)blockIdx.x >= p.seg[k].cta_begin) i = k;
    const Seg& s = p.seg[i];
    const int cta = blockIdx.x - s.cta_begin;
    if constexpr (std::is_same<TA, TB>::value) {
        run_seg<TA, R, U, SWIGLU>(p, s, cta, sx, red);
    } else {
        if (s.type == TA::ID) run_seg<TA, R, U, SWIGLU>(p, s, cta, sx, red);
        else run_seg<TB, R, U, SWIGLU>(p, s, cta, sx, red);
    }
}


// ---------------------------------------------------------------------------------------
// Several activation rows per launch: each CTA takes one tile of up to NX rows of x and the
// weight rows of its warps (one per warp), decodes each weight chunk once and runs, for every
// activation row, exactly the 1-row kernel's float operations: the same chunk order per lane,
// the same lane butterfly, the same sum of squares (thread partition and warp order: launch
// with the 1-row kernel's warps), so row j of the output is bit-identical to the 1-row
// kernel's output for x[j] alone, whatever the number of rows and the row's place.
// ---------------------------------------------------------------------------------------

// x rows [x0, x0 + nh) into shared memory (row j at sx + j K, swizzled) and the warps' sums
// of squares of row j into red[32 j + warp]: the per-row code of stage(), row after row; one
// barrier. rstd_rows() then reduces a row's sums as stage() does.
// With n_stage > nh, rows nh .. n_stage - 1 repeat row nh - 1 (the tile kernel's padding);
// S > 0: the tile kernel's layout, 16-byte group g of row j at float4 slot T::swz(g) S + j.
template <typename T, int S = 0>
static __device__ void stage_rows(const Params& p, float* sx, float* red, int x0, int nh, uint32_t dep,
                                  int n_stage) {
    const int n4 = p.K >> 2;
    const float4* w4 = reinterpret_cast<const float4*>(p.norm);
    pdl_wait(dep);
    constexpr int UNR = 4;
    for (int j = 0; j < n_stage; ++j) {
        const float4* x4 = reinterpret_cast<const float4*>(x_row(p, x0 + min(j, nh - 1)));
        float* sxj = sx + j * p.K;
        float ss = 0.f;
        for (int g0 = threadIdx.x; g0 < n4; g0 += UNR * blockDim.x) {
            float4 v[UNR], w[UNR];
#pragma unroll
            for (int u = 0; u < UNR; ++u) {
                const int g = g0 + u * blockDim.x;
                if (g < n4) {
                    v[u] = x4[g];
                    if (p.norm) w[u] = w4[g];
                }
            }
#pragma unroll
            for (int u = 0; u < UNR; ++u) {
                const int g = g0 + u * blockDim.x;
                if (g < n4) {
                    if (p.norm) {
                        ss = fmaf(v[u].x, v[u].x, fmaf(v[u].y, v[u].y, fmaf(v[u].z, v[u].z, fmaf(v[u].w, v[u].w, ss))));
                        v[u].x = mul_rn(v[u].x, w[u].x); v[u].y = mul_rn(v[u].y, w[u].y);
                        v[u].z = mul_rn(v[u].z, w[u].z); v[u].w = mul_rn(v[u].w, w[u].w);
                    }
                    *reinterpret_cast<float4*>(S ? sx + 4 * (T::swz(g) * S + j) : sxj + 4 * T::swz(g)) = v[u];
                }
            }
        }
        if (p.norm) {
#pragma unroll
            for (int o = 16; o > 0; o >>= 1) ss = add_rn(ss, __shfl_xor_sync(0xffffffffu, ss, o));
            if ((threadIdx.x & 31) == 0) red[32 * j + (threadIdx.x >> 5)] = ss;
        }
    }
    __syncthreads();
}
static __device__ float rstd_rows(const Params& p, const float* red, int j) {
    if (!p.norm) return 1.f;
    float tot = 0.f;
    for (int i = 0; i < (int)(blockDim.x >> 5); ++i) tot = add_rn(tot, red[32 * j + i]);
    return rsqrtf(tot / (float)p.K + p.eps);
}

// RW weight rows per warp (the activation runs read from shared memory once for all of them)
template <typename T, int U, bool SWIGLU, int NX, int RW>
__device__ void run_rows(const Params& p, int si, int cta, float* sx, float* red) {
    constexpr int W = SWIGLU ? 2 : 1;
    const Seg& s = p.seg[si];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int row0 = (cta * (int)(blockDim.x >> 5) + warp) * RW;
    const int x0 = blockIdx.y * p.tile, nh = min(p.tile, p.n_x - x0);
    const int nbpr = p.K / T::QK;
    const int nch = nbpr * T::CPB;
    long long rowblk[RW];
#pragma unroll
    for (int r = 0; r < RW; ++r) rowblk[r] = (long long)min(row0 + r, s.n_rows - 1) * nbpr;
    const uint8_t* P[2] = {s.planes, s.planes2};

    float acc[NX][W][RW];
#pragma unroll
    for (int j = 0; j < NX; ++j)
#pragma unroll
        for (int w = 0; w < W; ++w)
#pragma unroll
            for (int r = 0; r < RW; ++r) acc[j][w][r] = 0.f;

    typename T::Raw raw[U][W][RW];
#pragma unroll
    for (int u = 0; u < U; ++u) {
        const int ch = min(lane + 32 * u, nch - 1);
#pragma unroll
        for (int w = 0; w < W; ++w)
#pragma unroll
            for (int r = 0; r < RW; ++r)
                T::load(raw[u][w][r], P[w], s.n_blocks, rowblk[r] + ch / T::CPB, ch % T::CPB);
    }
    stage_rows<T>(p, sx, red, x0, nh, T::dep(raw[0][0][0]), nh);
    pdl_trigger();

    for (int base = 0; base < nch; base += 32 * U) {
        if (base > 0) {
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int ch = min(base + lane + 32 * u, nch - 1);
#pragma unroll
                for (int w = 0; w < W; ++w)
#pragma unroll
                    for (int r = 0; r < RW; ++r)
                        T::load(raw[u][w][r], P[w], s.n_blocks, rowblk[r] + ch / T::CPB, ch % T::CPB);
            }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int ch = base + lane + 32 * u;
            if (ch < nch) {
                const int b = ch / T::CPB, c = ch % T::CPB;
#pragma unroll
                for (int j = 0; j < NX; ++j) {
                    if (j < nh) {
                        float a[16], bb[16], xa, xb;
                        run16<T>(sx + j * p.K, b * T::QK + T::off0(c), a, xa);
                        run16<T>(sx + j * p.K, b * T::QK + T::off1(c), bb, xb);
#pragma unroll
                        for (int w = 0; w < W; ++w)
#pragma unroll
                            for (int r = 0; r < RW; ++r)
                                acc[j][w][r] = T::dot(raw[u][w][r], c, a, bb, xa, xb, acc[j][w][r]);
                    }
                }
            }
        }
    }
#pragma unroll
    for (int j = 0; j < NX; ++j)
#pragma unroll
        for (int w = 0; w < W; ++w)
#pragma unroll
            for (int r = 0; r < RW; ++r)
#pragma unroll
                for (int o = 16; o > 0; o >>= 1)
                    acc[j][w][r] = add_rn(acc[j][w][r], __shfl_xor_sync(0xffffffffu, acc[j][w][r], o));
    if (lane < nh) {
        // lane j stores activation row j (unrolled select keeps acc in registers)
        const float rs = rstd_rows(p, red, lane);
        float* out = out_row(p, si, x0 + lane);
        const float* res = res_row(p, si, x0 + lane);
#pragma unroll
        for (int r = 0; r < RW; ++r) {
            float g = acc[0][0][r], u = acc[0][W - 1][r];
#pragma unroll
            for (int j = 1; j < NX; ++j)
                if (lane == j) { g = acc[j][0][r]; u = acc[j][W - 1][r]; }
            const int row = row0 + r;
            if (row < s.n_rows) out[row] = epilogue<SWIGLU>(g, u, rs, res, row);
        }
    }
}

template <typename TA, typename TB, int U, bool SWIGLU, int NX, int RW>
__global__ void __launch_bounds__(256) gemv_rows_kernel(const __grid_constant__ Params p) {
    extern __shared__ float4 smem4[];
    float* sx = reinterpret_cast<float*>(smem4);
    __shared__ float red[32 * NX];
    int i = 0;
#pragma unroll
    for (int k = 1; k < MAX_SEGS; ++k)
        if (k < p.n_seg && (int)blockIdx.x >= p.seg[k].cta_begin) i = k;
    const int cta = blockIdx.x - p.seg[i].cta_begin;
    if constexpr (std::is_same<TA, TB>::value) {
        run_rows<TA, U, SWIGLU, NX, RW>(p, i, cta, sx, red);
    } else {
        if (p.seg[i].type == TA::ID) run_rows<TA, U, SWIGLU, NX, RW>(p, i, cta, sx, red);
        else run_rows<TB, U, SWIGLU, NX, RW>(p, i, cta, sx, red);
    }
}

// ---------------------------------------------------------------------------------------
// The tile kernel (gemv_tile_kernel): gemv_rows_kernel's contract (row j of the output
// bit-identical to the 1-row kernel on x[j] alone) with each weight code decoded once per
// tile of x rows and each shared-memory read of x shared by several weight rows. A CTA stages
// a tile of NX rows of x' (a short tile repeats its last row; the repeats' outputs are dropped)
// and, per row and chunk, the sums of the chunk's two runs of 16 activations (the 1-row
// kernel's sum16 on the same values: once per CTA instead of once per chunk, row and warp).
// Then each warp takes RW output rows (W = 2 weights each for SWIGLU: W RW = TILE_WR weight
// rows) per group, p.groups groups per CTA (a staged tile serves several groups). Per chunk
// and lane: for each 4 positions of each run, the 4 codes of each weight row are decoded once
// (T::dec4), then for each row j of the tile one 128-bit read of x feeds 4 FMAs into each
// weight row's run sum (s, t: the 1-row kernel's chains, in position order), and the chunk's
// tail (T::tail: T::dot's operations after the chains, given the weight row's scales T::pre
// decoded once per chunk) adds it to acc[j][w][r] in chunk order. The lane butterfly, rstd
// and the epilogue are the 1-row kernel's.
// Shared memory: 16-byte group g of x row j at float4 slot swz(g) S + j (S = NX + 1: the
// rows of a group side by side, so that the rows' reads of one group differ by immediate
// offsets; the odd stride keeps the type's swizzle conflict-free: the 8 lanes of a phase hit
// 8 different bank groups); a chunk's 4 groups g + I of a run at swz(g + I) = g + o_I, o_I
// the same for all of a lane's chunks (the swizzles read chunk bits that a stride of 32
// chunks keeps), taken from the lane's first chunk; chunk ch's sums at float2 slot ch S + j.
// ---------------------------------------------------------------------------------------

constexpr int TILE_WR = 4;                 // weight rows per warp (W RW)

// the sums of the two runs of each chunk of rows 0 .. NX - 1 (tile layout) into xs
template <typename T, int NX>
static __device__ void chunk_sums(const Params& p, const float* sx, float2* xs) {
    constexpr int S = NX + 1;
    const int nch = p.K / T::QK * T::CPB;
    for (int i = threadIdx.x; i < NX * nch; i += blockDim.x) {
        const int ch = i / NX, j = i - ch * NX, b = ch / T::CPB, c = ch % T::CPB;
        float v[2][16];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int g = (b * T::QK + (h ? T::off1(c) : T::off0(c))) >> 2;
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                const float4 q = *reinterpret_cast<const float4*>(sx + 4 * (T::swz(g + k) * S + j));
                v[h][4 * k] = q.x; v[h][4 * k + 1] = q.y; v[h][4 * k + 2] = q.z; v[h][4 * k + 3] = q.w;
            }
        }
        xs[ch * S + j] = make_float2(sum16(v[0]), sum16(v[1]));
    }
    __syncthreads();
}

// positions 4 I .. 4 I + 3 of a run (x of row 0 at float `at`, row j 4 j further) for every
// weight row and row of the tile: decode once, one LDS.128 per row of x
template <typename T, int H, int I, int NX, int W, int RW>
__device__ __forceinline__ void tile_step(const typename T::Raw (&raw)[W][RW], int c, const float* sx, int at,
                                          float (&s)[NX][W][RW]) {
    float f[W][RW][4];
#pragma unroll
    for (int w = 0; w < W; ++w)
#pragma unroll
        for (int r = 0; r < RW; ++r) T::template dec4<H, I>(raw[w][r], c, f[w][r]);
#pragma unroll
    for (int j = 0; j < NX; ++j) {
        const float4 q = *reinterpret_cast<const float4*>(sx + at + 4 * j);
#pragma unroll
        for (int w = 0; w < W; ++w)
#pragma unroll
            for (int r = 0; r < RW; ++r) {
                float a = s[j][w][r];
                a = fmaf(f[w][r][0], q.x, a);
                a = fmaf(f[w][r][1], q.y, a);
                a = fmaf(f[w][r][2], q.z, a);
                s[j][w][r] = fmaf(f[w][r][3], q.w, a);
            }
    }
}

// a lane's offsets o_I of the tile layout (floats): swz(g + I) - g for the group g of run H
// of its first chunk, the same for all its chunks
template <typename T, int S>
__device__ __forceinline__ void tile_offsets(int lane, int (&o)[2][4]) {
    const int b = lane / T::CPB, c = lane % T::CPB;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int g = (b * T::QK + (h ? T::off1(c) : T::off0(c))) >> 2;
#pragma unroll
        for (int i = 0; i < 4; ++i) o[h][i] = 4 * S * (T::swz(g + i) - g);
    }
}

template <typename T, bool SWIGLU, int NX>
__device__ void run_tile(const Params& p, int si, int cta, float* sx, float2* xs, float* red) {
    constexpr int W = SWIGLU ? 2 : 1, RW = TILE_WR / W;
    const Seg& s = p.seg[si];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    const int x0 = blockIdx.x * p.tile, nh = min(p.tile, p.n_x - x0);
    const int nbpr = p.K / T::QK, nch = nbpr * T::CPB;
    const uint8_t* P[2] = {s.planes, s.planes2};
    int row0 = (cta * p.groups * warps + warp) * RW;
    typename T::Raw raw[W][RW];
    long long rowblk[RW];
    // a lane's chunks base + lane (base: multiples of 32) are chunk c of blocks base / CPB + lb:
    // c, and what depends on it, is the same for all of them; a lane past the end loads block
    // nbpr - 1 (valid, unused)
    const int c = lane % T::CPB, lb = lane / T::CPB;
    // the first group's first chunks fly while x is staged
#pragma unroll
    for (int r = 0; r < RW; ++r) rowblk[r] = (long long)min(row0 + r, s.n_rows - 1) * nbpr;
#pragma unroll
    for (int w = 0; w < W; ++w)
#pragma unroll
        for (int r = 0; r < RW; ++r) T::load(raw[w][r], P[w], s.n_blocks, rowblk[r] + min(lb, nbpr - 1), c);
    constexpr int S = NX + 1;
    stage_rows<T, S>(p, sx, red, x0, nh, T::dep(raw[0][0]), NX);
    chunk_sums<T, NX>(p, sx, xs);
    pdl_trigger();
    int o[2][4];
    tile_offsets<T, S>(lane, o);
    const int o0 = 4 * S * (T::off0(c) >> 2), o1 = 4 * S * (T::off1(c) >> 2);
    const float rs = rstd_rows(p, red, lane < NX ? lane : 0);     // lane j: row j's

    for (int g = 0; g < p.groups && row0 < s.n_rows; ++g, row0 += warps * RW) {
        if (g > 0) {
#pragma unroll
            for (int r = 0; r < RW; ++r) rowblk[r] = (long long)min(row0 + r, s.n_rows - 1) * nbpr;
#pragma unroll
            for (int w = 0; w < W; ++w)
#pragma unroll
                for (int r = 0; r < RW; ++r) T::load(raw[w][r], P[w], s.n_blocks, rowblk[r] + min(lb, nbpr - 1), c);
        }
        float acc[NX][W][RW];
#pragma unroll
        for (int j = 0; j < NX; ++j)
#pragma unroll
            for (int w = 0; w < W; ++w)
#pragma unroll
                for (int r = 0; r < RW; ++r) acc[j][w][r] = 0.f;
        for (int base = 0; base < nch; base += 32) {
            const int b = base / T::CPB + lb;     // the lane's chunk: c of block b
            if (base > 0) {               // the chunk's scales (its codes came with the last chunk)
                const int bs = min(b, nbpr - 1);
#pragma unroll
                for (int w = 0; w < W; ++w)
#pragma unroll
                    for (int r = 0; r < RW; ++r) T::load_s(raw[w][r], P[w], s.n_blocks, rowblk[r] + bs, c);
            }
            typename T::Raw nxt[W][RW];
            if (base + 32 < nch) {        // the codes of the lane's next chunk
                const int bn = min(b + 32 / T::CPB, nbpr - 1);
#pragma unroll
                for (int w = 0; w < W; ++w)
#pragma unroll
                    for (int r = 0; r < RW; ++r) T::load_q(nxt[w][r], P[w], s.n_blocks, rowblk[r] + bn, c);
            }
            if (b < nbpr) {
                const int a0 = 4 * S * (b * (T::QK / 4)) + o0, a1 = 4 * S * (b * (T::QK / 4)) + o1;
                float sa[NX][W][RW], sb[NX][W][RW];
#pragma unroll
                for (int j = 0; j < NX; ++j)
#pragma unroll
                    for (int w = 0; w < W; ++w)
#pragma unroll
                        for (int r = 0; r < RW; ++r) sa[j][w][r] = sb[j][w][r] = 0.f;
                tile_step<T, 0, 0>(raw, c, sx, a0 + o[0][0], sa);
                tile_step<T, 0, 1>(raw, c, sx, a0 + o[0][1], sa);
                tile_step<T, 0, 2>(raw, c, sx, a0 + o[0][2], sa);
                tile_step<T, 0, 3>(raw, c, sx, a0 + o[0][3], sa);
                tile_step<T, 1, 0>(raw, c, sx, a1 + o[1][0], sb);
                tile_step<T, 1, 1>(raw, c, sx, a1 + o[1][1], sb);
                tile_step<T, 1, 2>(raw, c, sx, a1 + o[1][2], sb);
                tile_step<T, 1, 3>(raw, c, sx, a1 + o[1][3], sb);
                typename T::Pre q[W][RW];
#pragma unroll
                for (int w = 0; w < W; ++w)
#pragma unroll
                    for (int r = 0; r < RW; ++r) q[w][r] = T::pre(raw[w][r], c);
#pragma unroll
                for (int j = 0; j < NX; ++j) {
                    const float2 xab = xs[(b * T::CPB + c) * S + j];
#pragma unroll
                    for (int w = 0; w < W; ++w)
#pragma unroll
                        for (int r = 0; r < RW; ++r)
                            acc[j][w][r] = T::tail(q[w][r], sa[j][w][r], sb[j][w][r], xab.x, xab.y, acc[j][w][r]);
                }
            }
#pragma unroll
            for (int w = 0; w < W; ++w)
#pragma unroll
                for (int r = 0; r < RW; ++r) T::move_q(raw[w][r], nxt[w][r]);
        }
#pragma unroll
        for (int j = 0; j < NX; ++j)
#pragma unroll
            for (int w = 0; w < W; ++w)
#pragma unroll
                for (int r = 0; r < RW; ++r)
#pragma unroll
                    for (int o = 16; o > 0; o >>= 1)
                        acc[j][w][r] = add_rn(acc[j][w][r], __shfl_xor_sync(0xffffffffu, acc[j][w][r], o));
        if (lane < nh) {
            // lane j stores row j of the tile (unrolled select keeps acc in registers)
            float* out = out_row(p, si, x0 + lane);
            const float* res = res_row(p, si, x0 + lane);
#pragma unroll
            for (int r = 0; r < RW; ++r) {
                float g = acc[0][0][r], u = acc[0][W - 1][r];
#pragma unroll
                for (int j = 1; j < NX; ++j)
                    if (lane == j) { g = acc[j][0][r]; u = acc[j][W - 1][r]; }
                const int row = row0 + r;
                if (row < s.n_rows) out[row] = epilogue<SWIGLU>(g, u, rs, res, row);
            }
        }
    }
}

// grid (tiles of x rows, CTAs of weight rows): the tiles of one CTA's weight rows run side by
// side (their weights read from L2 rather than again from memory)
template <typename TA, typename TB, bool SWIGLU, int NX>
__global__ void __launch_bounds__(256) gemv_tile_kernel(const __grid_constant__ Params p) {
    extern __shared__ float4 smem4[];
    float* sx = reinterpret_cast<float*>(smem4);
    float2* xs = reinterpret_cast<float2*>(sx + (NX + 1) * p.K);
    __shared__ float red[32 * NX];
    int i = 0;
#pragma unroll
    for (int k = 1; k < MAX_SEGS; ++k)
        if (k < p.n_seg && (int)blockIdx.y >= p.seg[k].cta_begin) i = k;
    const int cta = blockIdx.y - p.seg[i].cta_begin;
    if constexpr (std::is_same<TA, TB>::value) {
        run_tile<TA, SWIGLU, NX>(p, i, cta, sx, xs, red);
    } else {
        if (p.seg[i].type == TA::ID) run_tile<TA, SWIGLU, NX>(p, i, cta, sx, xs, red);
        else run_tile<TB, SWIGLU, NX>(p, i, cta, sx, xs, red);
    }
}

// the rows kernel's instances: up to NX rows of x per tile; one weight row per warp with 2
// chunks per lane in flight, or two with one (RW = 2: half the shared-memory reads of x per
// product, for many rows of x)
constexpr int ROWS_NX = 8;

template <typename TA, typename TB, int R, int U, bool SWIGLU>
static int launch(const Params& p, int warps, int pdl, cudaStream_t stream) {
    const size_t smem = (size_t)p.K * sizeof(float);
    auto fn = gemv_kernel<TA, TB, R, U, SWIGLU>;
    if (smem > 48 * 1024) {
        cudaError_t e = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
        if (e != cudaSuccess) return (int)e;
    }
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(p.n_cta);
    cfg.blockDim = dim3(32 * warps);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = pdl ? 1 : 0;
    cudaError_t e = cudaLaunchKernelEx(&cfg, fn, p);
    if (e != cudaSuccess) return (int)e;
    return (int)cudaGetLastError();
}

template <typename TA, typename TB, bool SWIGLU, int RW>
static int launch_rows(const Params& p, int warps, int pdl, cudaStream_t stream) {
    const size_t smem = (size_t)p.tile * p.K * sizeof(float);
    auto fn = gemv_rows_kernel<TA, TB, RW == 1 ? 2 : 1, SWIGLU, ROWS_NX, RW>;
    if (p.tile < 1 || p.tile > ROWS_NX || p.n_x < 1) return -1;
    if (smem > 48 * 1024) {
        cudaError_t e = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
        if (e != cudaSuccess) return (int)e;
    }
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(p.n_cta, (p.n_x + p.tile - 1) / p.tile);
    cfg.blockDim = dim3(32 * warps);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = pdl ? 1 : 0;
    cudaError_t e = cudaLaunchKernelEx(&cfg, fn, p);
    if (e != cudaSuccess) return (int)e;
    return (int)cudaGetLastError();
}

template <typename TA, typename TB, bool SWIGLU, int NX>
static int launch_tile(const Params& p, int warps, int pdl, cudaStream_t stream) {
    const size_t smem = (size_t)(NX + 1) * p.K * sizeof(float) + (size_t)(NX + 1) * (p.K / 32) * sizeof(float2);
    auto fn = gemv_tile_kernel<TA, TB, SWIGLU, NX>;
    if (p.tile < 1 || p.tile > NX || p.n_x < 1 || p.groups < 1) return -1;
    if (smem > 48 * 1024) {
        cudaError_t e = cudaFuncSetAttribute(fn, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
        if (e != cudaSuccess) return (int)e;
    }
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3((p.n_x + p.tile - 1) / p.tile, p.n_cta);
    cfg.blockDim = dim3(32 * warps);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = attr;
    cfg.numAttrs = pdl ? 1 : 0;
    cudaError_t e = cudaLaunchKernelEx(&cfg, fn, p);
    if (e != cudaSuccess) return (int)e;
    return (int)cudaGetLastError();
}

// the tile kernel: NX (TILE_NX) rows of x per tile
template <typename TA, typename TB>
static int dispatch_tile(const Params& p, int warps, int nx, int swiglu, int pdl, cudaStream_t st) {
#define CASE(NX_)                                                                              \
    if (nx == NX_) {                                                                           \
        if (!swiglu) return launch_tile<TA, TB, false, NX_>(p, warps, pdl, st);                \
        if constexpr (std::is_same<TA, TB>::value) return launch_tile<TA, TB, true, NX_>(p, warps, pdl, st); \
    }
    CASE(4) CASE(8)
#undef CASE
    return -1;
}

// several activation rows (p.n_x), RW weight rows per warp
template <typename TA, typename TB, int RW>
static int dispatch_rows(const Params& p, int warps, int swiglu, int pdl, cudaStream_t st) {
    if (!swiglu) return launch_rows<TA, TB, false, RW>(p, warps, pdl, st);
    if constexpr (std::is_same<TA, TB>::value) return launch_rows<TA, TB, true, RW>(p, warps, pdl, st);
    return -1;
}

// the 1-row kernels of one type (or pair) and one epilogue (SWIGLU): one function of its own
// part each (the (R, U) instances of a pair: no SWIGLU)
template <typename TA, typename TB, bool SWIGLU>
static int dispatch_ru(const Params& p, int warps, int R, int U, int pdl, cudaStream_t st) {
#define CASE(R_, U_) \
    if (R == R_ && U == U_) return launch<TA, TB, R_, U_, SWIGLU>(p, warps, pdl, st);
    if constexpr (std::is_same<TA, TB>::value) {
        CASE(1, 1) CASE(1, 2) CASE(2, 1) CASE(2, 2) CASE(1, 3) CASE(1, 6)
    } else if constexpr (!SWIGLU) {
        CASE(1, 2) CASE(2, 1)
    }
#undef CASE
    return -1;
}

// The kernel's arithmetic on the CPU, operation for operation: the sum of squares of a CTA
// of `warps` warps (each thread's groups in order, the lane butterfly, the warps in order),
// each lane's chunks l, l + 32, ... then the lane butterfly, the same epilogue. Only rsqrtf
// (1 / sqrtf here) and expf may round differently from the GPU's.
template <typename T>
static float emulate_stage(const Params& p, const float* x, float* sx, int warps) {
    const int n4 = p.K / 4, nt = 32 * warps;
    float tot = 0.f;
    for (int w = 0; w < warps; ++w) {
        float ss[32];
        for (int l = 0; l < 32; ++l) {
            float a = 0.f;
            for (int g = 32 * w + l; g < n4; g += nt) {
                float v[4] = {x[4 * g], x[4 * g + 1], x[4 * g + 2], x[4 * g + 3]};
                if (p.norm) {
                    a = fmaf(v[0], v[0], fmaf(v[1], v[1], fmaf(v[2], v[2], fmaf(v[3], v[3], a))));
                    for (int e = 0; e < 4; ++e) v[e] = mul_rn(v[e], p.norm[4 * g + e]);
                }
                for (int e = 0; e < 4; ++e) sx[4 * T::swz(g) + e] = v[e];
            }
            ss[l] = a;
        }
        for (int o = 16; o > 0; o >>= 1) {
            float t[32];
            for (int l = 0; l < 32; ++l) t[l] = add_rn(ss[l], ss[l ^ o]);
            memcpy(ss, t, sizeof(t));
        }
        tot = add_rn(tot, ss[0]);
    }
    return p.norm ? 1.f / sqrtf(tot / (float)p.K + p.eps) : 1.f;
}

template <typename T>
static float emulate_dot(const Params& p, const uint8_t* P, long long n_blocks, int row, const float* sx) {
    const int nbpr = p.K / T::QK, nch = nbpr * T::CPB;
    float lanes[32] = {0.f};
    for (int ch = 0; ch < nch; ++ch) {
        const int b = ch / T::CPB, c = ch % T::CPB;
        typename T::Raw raw;
        T::load(raw, P, n_blocks, (long long)row * nbpr + b, c);
        float a[16], bb[16];
        for (int half = 0; half < 2; ++half) {
            const int k = b * T::QK + (half ? T::off1(c) : T::off0(c));
            float* v = half ? bb : a;
            for (int i = 0; i < 16; ++i) v[i] = sx[4 * T::swz((k + i) >> 2) + ((k + i) & 3)];
        }
        lanes[ch & 31] = T::dot(raw, c, a, bb, sum16(a), sum16(bb), lanes[ch & 31]);
    }
    for (int o = 16; o > 0; o >>= 1) {
        float t[32];
        for (int l = 0; l < 32; ++l) t[l] = add_rn(lanes[l], lanes[l ^ o]);
        memcpy(lanes, t, sizeof(t));
    }
    return lanes[0];
}

// every activation row of every tile (as the rows kernel's CTA columns), through the same
// row addressing (x_row, out_row, res_row) as the kernel
template <typename T, bool SWIGLU>
static int emulate_seg(const Params& p, int si, int warps) {
    const Seg& s = p.seg[si];
    float* sx = (float*)malloc(sizeof(float) * p.K);
    if (!sx) return 2;
    for (int x0 = 0; x0 < p.n_x; x0 += p.tile)
        for (int j = x0; j < p.n_x && j < x0 + p.tile; ++j) {
            const float rstd = emulate_stage<T>(p, x_row(p, j), sx, warps);
            for (int row = 0; row < s.n_rows; ++row) {
                const float g = emulate_dot<T>(p, s.planes, s.n_blocks, row, sx);
                const float u = SWIGLU ? emulate_dot<T>(p, s.planes2, s.n_blocks, row, sx) : 0.f;
                out_row(p, si, j)[row] = epilogue<SWIGLU>(g, u, rstd, res_row(p, si, j), row);
            }
        }
    free(sx);
    return 0;
}

template <typename T>
static int emulate_any(const Params& p, int si, int swiglu, int warps) {
    return swiglu ? emulate_seg<T, true>(p, si, warps) : emulate_seg<T, false>(p, si, warps);
}

// The tile kernel's arithmetic on the CPU: per tile of p.tile rows of x (staged as the
// kernel does, nx rows in its layout, the short tile's last row repeated), the chunk sums
// once per row, then per weight row, row of x and lane: the chunks' runs through T::dec4 in
// position order, read at the lane's offsets o_I (taken from its first chunk, as
// tile_offsets), T::pre and T::tail, the lane butterfly, the epilogue.
template <typename T>
static void emulate_chains(const typename T::Raw& raw, int c, const float* xj, const int* at, float& s, float& t) {
    float f[8][4];
    T::template dec4<0, 0>(raw, c, f[0]); T::template dec4<0, 1>(raw, c, f[1]);
    T::template dec4<0, 2>(raw, c, f[2]); T::template dec4<0, 3>(raw, c, f[3]);
    T::template dec4<1, 0>(raw, c, f[4]); T::template dec4<1, 1>(raw, c, f[5]);
    T::template dec4<1, 2>(raw, c, f[6]); T::template dec4<1, 3>(raw, c, f[7]);
    s = t = 0.f;
    for (int i = 0; i < 4; ++i)
        for (int e = 0; e < 4; ++e) {
            s = fmaf(f[i][e], xj[at[i] + e], s);
            t = fmaf(f[4 + i][e], xj[at[4 + i] + e], t);
        }
}

template <typename T>
static float emulate_tile_dot(const Params& p, const uint8_t* P, long long n_blocks, int row, const float* xj,
                              const float* xsj, int S) {
    const int nbpr = p.K / T::QK, nch = nbpr * T::CPB;
    float lanes[32] = {0.f};
    for (int ch = 0; ch < nch; ++ch) {
        const int b = ch / T::CPB, c = ch % T::CPB, lane = ch & 31;
        const int lb = lane / T::CPB, lc = lane % T::CPB;          // the lane's first chunk
        typename T::Raw raw, codes;                              // the kernel's two loads
        T::load_q(codes, P, n_blocks, (long long)row * nbpr + b, c);
        T::load_s(raw, P, n_blocks, (long long)row * nbpr + b, c);
        T::move_q(raw, codes);
        int at[8];
        for (int h = 0; h < 2; ++h) {
            const int g1st = (lb * T::QK + (h ? T::off1(lc) : T::off0(lc))) >> 2;
            const int g = (b * T::QK + (h ? T::off1(c) : T::off0(c))) >> 2;
            for (int i = 0; i < 4; ++i) at[4 * h + i] = 4 * S * g + 4 * S * (T::swz(g1st + i) - g1st);
        }
        float s, t;
        emulate_chains<T>(raw, c, xj, at, s, t);
        lanes[lane] = T::tail(T::pre(raw, c), s, t, xsj[2 * S * ch], xsj[2 * S * ch + 1], lanes[lane]);
    }
    for (int o = 16; o > 0; o >>= 1) {
        float t[32];
        for (int l = 0; l < 32; ++l) t[l] = add_rn(lanes[l], lanes[l ^ o]);
        memcpy(lanes, t, sizeof(t));
    }
    return lanes[0];
}

template <typename T, bool SWIGLU>
static int emulate_tile_seg(const Params& p, int si, int warps, int nx) {
    const Seg& s = p.seg[si];
    const int nch = p.K / T::QK * T::CPB, S = nx + 1, n4 = p.K / 4;
    float* row = (float*)malloc(sizeof(float) * (size_t)p.K);
    float* xt = (float*)malloc(sizeof(float) * (size_t)S * p.K);          // the tile layout
    float* xs = (float*)malloc(sizeof(float) * 2 * (size_t)S * nch);
    float rstd[8];
    if (!row || !xt || !xs) {
        free(row);
        free(xt);
        free(xs);
        return 2;
    }
    for (int x0 = 0; x0 < p.n_x; x0 += p.tile) {
        const int nh = p.n_x - x0 < p.tile ? p.n_x - x0 : p.tile;
        for (int j = 0; j < nx; ++j) {
            rstd[j] = emulate_stage<T>(p, x_row(p, x0 + (j < nh ? j : nh - 1)), row, warps);   // swizzled
            for (int g = 0; g < n4; ++g)            // the row's slot g -> slot g S + j
                memcpy(xt + 4 * ((size_t)g * S + j), row + 4 * g, 16);
            for (int ch = 0; ch < nch; ++ch) {
                const int b = ch / T::CPB, c = ch % T::CPB;
                float v[16];
                for (int half = 0; half < 2; ++half) {
                    const int k = b * T::QK + (half ? T::off1(c) : T::off0(c));
                    for (int i = 0; i < 16; ++i) v[i] = row[4 * T::swz((k + i) >> 2) + ((k + i) & 3)];
                    xs[2 * ((size_t)ch * S + j) + half] = sum16(v);
                }
            }
        }
        for (int j = 0; j < nh; ++j) {
            for (int r = 0; r < s.n_rows; ++r) {
                const float g = emulate_tile_dot<T>(p, s.planes, s.n_blocks, r, xt + 4 * j, xs + 2 * j, S);
                const float u = SWIGLU ? emulate_tile_dot<T>(p, s.planes2, s.n_blocks, r, xt + 4 * j, xs + 2 * j, S)
                                       : 0.f;
                out_row(p, si, x0 + j)[r] = epilogue<SWIGLU>(g, u, rstd[j], res_row(p, si, x0 + j), r);
            }
        }
    }
    free(row);
    free(xt);
    free(xs);
    return 0;
}

template <typename T>
static int emulate_tile_any(const Params& p, int si, int swiglu, int warps, int nx) {
    return swiglu ? emulate_tile_seg<T, true>(p, si, warps, nx) : emulate_tile_seg<T, false>(p, si, warps, nx);
}

// The kernels of one type (or pair), behind one function each. build.py compiles the file
// once per part (-DGGUFLM_PART=k, in parallel) and links the parts of each library: the
// 1-row library is parts 0-9: part 0 the C entry points (and the CPU emulation), parts 1-4
// the 1-row kernels of one type without SWIGLU (6 (R, U) instances each), parts 5-8 the same
// with SWIGLU, part 9 those of the two pairs (2 instances each): parts of 6 kernels or fewer,
// so that the concurrent build takes about as long as its longest part (one part per type
// took 3.3 s for Q6_K's 12 kernels against 1.6 s for a pair's 2; now 1.5-2.3 s: nvcc 13.0,
// one process at a time on a 2-core host). The rows library is parts 10-28: parts 10-15 the rows kernels of
// one weight row per warp of one type or pair, 16-21 those of two, part 22 their C entry
// points, 23-28 the tile kernels of one type or pair (4 and 8 rows of x per tile; 3.0-4.5 s
// each here). Without GGUFLM_PART the file is the whole of both in one translation unit.
#define GGUFLM_DISPATCH(NAME, TA, TB, SWIGLU)                                                  \
    int NAME(const Params& p, int warps, int R, int U, int, int pdl, cudaStream_t st) {        \
        return dispatch_ru<TA, TB, SWIGLU>(p, warps, R, U, pdl, st);                            \
    }
#define GGUFLM_ROWS(NAME, TA, TB, RW)                                                          \
    int NAME(const Params& p, int warps, int, int, int swiglu, int pdl, cudaStream_t st) {     \
        return dispatch_rows<TA, TB, RW>(p, warps, swiglu, pdl, st);                            \
    }
#define GGUFLM_TILE(NAME, TA, TB)                                                              \
    int NAME(const Params& p, int warps, int nx, int, int swiglu, int pdl, cudaStream_t st) {  \
        return dispatch_tile<TA, TB>(p, warps, nx, swiglu, pdl, st);                            \
    }
#if !defined(GGUFLM_PART) || GGUFLM_PART == 1
GGUFLM_DISPATCH(gguflm_dispatch_q4_0, Q4_0, Q4_0, false)
#endif
#if !defined(GGUFLM_PART) || GGUFLM_PART == 2
GGUFLM_DISPATCH(gguflm_dispatch_q8_0, Q8_0, Q8_0, false)
#endif
#if !defined(GGUFLM_PART) || GGUFLM_PART == 3
GGUFLM_DISPATCH(gguflm_dispatch_q4_k, Q4_K, Q4_K, false)
#endif
#if !defined(GGUFLM_PART) || GGUFLM_PART == 4
GGUFLM_DISPATCH(gguflm_dispatch_q6_k, Q6_K, Q6_K, false)
#endif
#if !defined(GGUFLM_PART) || GGUFLM_PART == 5
GGUFLM_DISPATCH(gguflm_glu_q4_0, Q4_0, Q4_0, true)
#endif
#if !defined(GGUFLM_PART) || GGUFLM_PART == 6
GGUFLM_DISPATCH(gguflm_glu_q8_0, Q8_0, Q8_0, true)
#endif
#if !defined(GGUFLM_PART) || GGUFLM_PART == 7
GGUFLM_DISPATCH(gguflm_glu_q4_k, Q4_K, Q4_K, true)
#endif
#if !defined(GGUFLM_PART) || GGUFLM_PART == 8
GGUFLM_DISPATCH(gguflm_glu_q6_k, Q6_K, Q6_K, true)
#endif
#if !defined(GGUFLM_PART) || GGUFLM_PART == 9
GGUFLM_DISPATCH(gguflm_dispatch_q4_k_q6_k, Q4_K, Q6_K, false)
GGUFLM_DISPATCH(gguflm_glu_q4_k_q6_k, Q4_K, Q6_K, true)          // no instances: -1
GGUFLM_DISPATCH(gguflm_dispatch_q4_0_q8_0, Q4_0, Q8_0, false)
GGUFLM_DISPATCH(gguflm_glu_q4_0_q8_0, Q4_0, Q8_0, true)          // no instances: -1
#endif
#if !defined(GGUFLM_PART) || GGUFLM_PART == 10
GGUFLM_ROWS(gguflm_rows_q4_0, Q4_0, Q4_0, 1)
#endif
#if !defined(GGUFLM_PART) || GGUFLM_PART == 11
GGUFLM_ROWS(gguflm_rows_q8_0, Q8_0, Q8_0, 1)
#endif
#if !defined(GGUFLM_PART) || GGUFLM_PART == 12
GGUFLM_ROWS(gguflm_rows_q4_k, Q4_K, Q4_K, 1)
#endif
#if !defined(GGUFLM_PART) || GGUFLM_PART == 13
GGUFLM_ROWS(gguflm_rows_q6_k, Q6_K, Q6_K, 1)
#endif
#if !defined(GGUFLM_PART) || GGUFLM_PART == 14
GGUFLM_ROWS(gguflm_rows_q4_k_q6_k, Q4_K, Q6_K, 1)
#endif
#if !defined(GGUFLM_PART) || GGUFLM_PART == 15
GGUFLM_ROWS(gguflm_rows_q4_0_q8_0, Q4_0, Q8_0, 1)
#endif
#if !defined(GGUFLM_PART) || GGUFLM_PART == 16
GGUFLM_ROWS(gguflm_rows2_q4_0, Q4_0, Q4_0, 2)
#endif
#if !defined(GGUFLM_PART) || GGUFLM_PART == 17
GGUFLM_ROWS(gguflm_rows2_q8_0, Q8_0, Q8_0, 2)
#endif
#if !defined(GGUFLM_PART) || GGUFLM_PART == 18
GGUFLM_ROWS(gguflm_rows2_q4_k, Q4_K, Q4_K, 2)
#endif
#if !defined(GGUFLM_PART) || GGUFLM_PART == 19
GGUFLM_ROWS(gguflm_rows2_q6_k, Q6_K, Q6_K, 2)
#endif
#if !defined(GGUFLM_PART) || GGUFLM_PART == 20
GGUFLM_ROWS(gguflm_rows2_q4_k_q6_k, Q4_K, Q6_K, 2)
#endif
#if !defined(GGUFLM_PART) || GGUFLM_PART == 21
GGUFLM_ROWS(gguflm_rows2_q4_0_q8_0, Q4_0, Q8_0, 2)
#endif

#if !defined(GGUFLM_PART) || GGUFLM_PART == 23
GGUFLM_TILE(gguflm_tile_q4_0, Q4_0, Q4_0)
#endif
#if !defined(GGUFLM_PART) || GGUFLM_PART == 24
GGUFLM_TILE(gguflm_tile_q8_0, Q8_0, Q8_0)
#endif
#if !defined(GGUFLM_PART) || GGUFLM_PART == 25
GGUFLM_TILE(gguflm_tile_q4_k, Q4_K, Q4_K)
#endif
#if !defined(GGUFLM_PART) || GGUFLM_PART == 26
GGUFLM_TILE(gguflm_tile_q6_k, Q6_K, Q6_K)
#endif
#if !defined(GGUFLM_PART) || GGUFLM_PART == 27
GGUFLM_TILE(gguflm_tile_q4_k_q6_k, Q4_K, Q6_K)
#endif
#if !defined(GGUFLM_PART) || GGUFLM_PART == 28
GGUFLM_TILE(gguflm_tile_q4_0_q8_0, Q4_0, Q8_0)
#endif

#if !defined(GGUFLM_PART) || GGUFLM_PART == 0
#ifdef GGUFLM_PART
#define GGUFLM_DECL(N) int gguflm_dispatch_##N(const Params&, int, int, int, int, int, cudaStream_t); \
                       int gguflm_glu_##N(const Params&, int, int, int, int, int, cudaStream_t);
GGUFLM_FNS(GGUFLM_DECL)
#undef GGUFLM_DECL
#endif

extern "C" {

// 0 on success, a cudaError_t code otherwise; -1: no such (R, U) instance
// ta, tb: the GGML types of the segments (tb = ta for one type); pdl: programmatic launch
int gguflm_gemv(const Params* p, int ta, int tb, int warps, int R, int U, int swiglu, int pdl, void* stream) {
    GgufFn fn = nullptr;
#define SEL(N) fn = swiglu ? gguflm_glu_##N : gguflm_dispatch_##N
    GGUFLM_PICK(ta, tb, SEL)
#undef SEL
    return fn ? fn(*p, warps, R, U, swiglu, pdl, (cudaStream_t)stream) : -1;
}

// The same per-type code on the CPU in the kernel's order (host pointers; x of p.n_x rows):
// what a CTA of `warps` warps computes, up to rsqrtf and expf. For the tests of the indexing.
int gguflm_gemv_emulate(const Params* p, int swiglu, int warps) {
    if (warps < 1 || warps > 8 || p->tile < 1 || p->n_x < 1) return -1;
    for (int i = 0; i < p->n_seg; ++i) {
        int rc = -1;
        switch (p->seg[i].type) {
            case GT_Q4_0: rc = emulate_any<Q4_0>(*p, i, swiglu, warps); break;
            case GT_Q8_0: rc = emulate_any<Q8_0>(*p, i, swiglu, warps); break;
            case GT_Q4_K: rc = emulate_any<Q4_K>(*p, i, swiglu, warps); break;
            case GT_Q6_K: rc = emulate_any<Q6_K>(*p, i, swiglu, warps); break;
        }
        if (rc) return rc;
    }
    return 0;
}

// The tile kernel's arithmetic on the CPU (gemv_tile_kernel with nx rows of x per tile
// at most, p->tile per CTA column): for the tests, as gguflm_gemv_emulate.
int gguflm_gemv_emulate_tile(const Params* p, int swiglu, int warps, int nx) {
    if (warps < 1 || warps > 8 || nx < 1 || nx > 8 || p->tile < 1 || p->tile > nx || p->n_x < 1) return -1;
    for (int i = 0; i < p->n_seg; ++i) {
        int rc = -1;
        switch (p->seg[i].type) {
            case GT_Q4_0: rc = emulate_tile_any<Q4_0>(*p, i, swiglu, warps, nx); break;
            case GT_Q8_0: rc = emulate_tile_any<Q8_0>(*p, i, swiglu, warps, nx); break;
            case GT_Q4_K: rc = emulate_tile_any<Q4_K>(*p, i, swiglu, warps, nx); break;
            case GT_Q6_K: rc = emulate_tile_any<Q6_K>(*p, i, swiglu, warps, nx); break;
        }
        if (rc) return rc;
    }
    return 0;
}

int gguflm_params_size(void) { return (int)sizeof(Params); }

const char* gguflm_error_string(int code) { return cudaGetErrorString((cudaError_t)code); }
}
#endif  // part 0

// The rows kernels' library (build.py's "rows" kind: parts 10-28, built apart from the 1-row
// kernels so that generate()'s cold start never compiles them).
#if !defined(GGUFLM_PART) || GGUFLM_PART == 22
#ifdef GGUFLM_PART
#define GGUFLM_DECL(N) int gguflm_rows_##N(const Params&, int, int, int, int, int, cudaStream_t); \
                       int gguflm_rows2_##N(const Params&, int, int, int, int, int, cudaStream_t); \
                       int gguflm_tile_##N(const Params&, int, int, int, int, int, cudaStream_t);
GGUFLM_FNS(GGUFLM_DECL)
#undef GGUFLM_DECL
#endif

extern "C" {

// 0 on success, a cudaError_t code otherwise; -1: no such instance. x of p->n_x rows; rw: 1
// or 2 weight rows per warp; ta, tb, warps, swiglu, pdl as gguflm_gemv
int gguflm_gemv_rows(const Params* p, int ta, int tb, int warps, int rw, int swiglu, int pdl, void* stream) {
    if (rw != 1 && rw != 2) return -1;
    GgufFn fn = nullptr;
#define SEL(N) fn = rw == 1 ? gguflm_rows_##N : gguflm_rows2_##N
    GGUFLM_PICK(ta, tb, SEL)
#undef SEL
    return fn ? fn(*p, warps, 0, rw, swiglu, pdl, (cudaStream_t)stream) : -1;
}

// the tile kernel: nx (4 or 8) rows of x per tile at most (p->tile of them per CTA column),
// p->groups groups of weight rows per CTA; otherwise as gguflm_gemv_rows
int gguflm_gemv_tile(const Params* p, int ta, int tb, int warps, int nx, int swiglu, int pdl, void* stream) {
    GgufFn fn = nullptr;
#define SEL(N) fn = gguflm_tile_##N
    GGUFLM_PICK(ta, tb, SEL)
#undef SEL
    return fn ? fn(*p, warps, nx, 0, swiglu, pdl, (cudaStream_t)stream) : -1;
}

int gguflm_rows_params_size(void) { return (int)sizeof(Params); }
}
#endif  // part 22
