/* Fused CPU quantize for the fp8 per-(token, kv-head) formats (e4m3fn and e4m3fnuz), bf16 scales.
 *
 * Bit-exact with the torch reference in fp8.py (tests compare both on random, heavy-tailed, edge
 * and scale-boundary inputs, with and without the AVX-512 path, and on the golden vectors): one
 * pass per row (token, kv-head) finds its amax, writes the bf16 scale and the codes. Portable C
 * that gcc vectorizes (-O3 -march=native), plus an AVX-512 path for bf16 rows; OpenMP over rows.
 *
 * x      [rows, head_dim]  bf16 (as uint16) or fp32, contiguous (rows = tokens * kv_heads)
 * data   [rows, head_dim]  uint8 codes (out)
 * scale  [rows]            bf16 scale s (out, as uint16): s = max(bf16_up(fp32(amax / clamp)), s_min)
 * clamp, s_min, bias  448, 2^-126, 7 (fn) or 224, 2^-125, 8 (fnuz)
 * codes = RNE_fp8(fp32(x * fp32(1 / s)))
 * Returns the number of rows holding a non-finite or |x| > 2^64 input (the caller then raises;
 * the outputs are undefined).
 */
#include <stdint.h>
#include <string.h>
#include <math.h>

static inline uint32_t f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f;
}

/* |y| <= 448 (fn) / 224 (fnuz), times (1 + 2^-22) at most, -> e4m3 code, RNE, zero always 0x00. emin = 1 - bias is the exponent
 * of the smallest normal (-6 fn, -7 fnuz). Every code's value is n * 2^(E - 3) with
 * E = max(floor(log2|y|), emin) and n in 0..16, and code = n + 8 (E - emin). Adding 2^(E + 20) to
 * |y| makes the fp32 adder round |y| to a multiple of 2^(E - 3) (the sum's ulp), ties to even, and
 * leaves n in the sum's low mantissa bits: one rounding for normals and subnormals alike (n = 16
 * is a carry into the next binade, which the formula absorbs). */
static inline uint8_t encode(float y, uint32_t emin_bits, uint32_t code_sub) {
    uint32_t yb = f32_bits(y);
    uint32_t ab = yb & 0x7FFFFFFFu;
    uint32_t eb = ab & 0x7F800000u;                 /* 2^floor(log2|y|), as bits */
    eb = eb > emin_bits ? eb : emin_bits;            /* 2^E */
    uint32_t sb = f32_bits(bits_f32(ab) + bits_f32(eb + (20u << 23)));
    uint32_t code = sb - eb + (eb >> 20) - code_sub; /* n + 8 (E + 127) - 8 (emin + 127) */
    uint32_t sign = (yb >> 24) & 0x80u;
    return (uint8_t)(code | (code ? sign : 0u));
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
/* AVX-512 path for one bf16 row of a length that is a multiple of 16: ``encode(x * mul)`` on 16
 * fp32 lanes per step, the same operations as the scalar code (widen bf16 exactly, one fp32
 * multiply, the rounding add, integer code arithmetic), so the same bytes. */
static inline int quant_row_bf16_avx512(const uint16_t *x, uint8_t *out, int64_t dim, float mul,
                                        uint32_t emin_bits, uint32_t code_sub) {
    if (dim & 15) return 0;
    const __m512 vmul = _mm512_set1_ps(mul);
    const __m512i abs32 = _mm512_set1_epi32(0x7FFFFFFF), exp32 = _mm512_set1_epi32(0x7F800000);
    const __m512i vemin = _mm512_set1_epi32((int)emin_bits), v20 = _mm512_set1_epi32(20 << 23);
    const __m512i vsub = _mm512_set1_epi32((int)code_sub), sign32 = _mm512_set1_epi32(0x80);
    for (int64_t i = 0; i < dim; i += 16) {
        __m512i w = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(x + i))), 16);
        __m512i yb = _mm512_castps_si512(_mm512_mul_ps(_mm512_castsi512_ps(w), vmul));
        __m512i ab = _mm512_and_si512(yb, abs32);
        __m512i eb = _mm512_max_epu32(_mm512_and_si512(ab, exp32), vemin);
        __m512i sb = _mm512_castps_si512(_mm512_add_ps(_mm512_castsi512_ps(ab),
                                                       _mm512_castsi512_ps(_mm512_add_epi32(eb, v20))));
        __m512i code = _mm512_sub_epi32(_mm512_add_epi32(_mm512_sub_epi32(sb, eb), _mm512_srli_epi32(eb, 20)), vsub);
        __mmask16 nz = _mm512_test_epi32_mask(code, code);
        code = _mm512_mask_or_epi32(code, nz, code, _mm512_and_si512(_mm512_srli_epi32(yb, 24), sign32));
        _mm_storeu_si128((__m128i *)(out + i), _mm512_cvtepi32_epi8(code));
    }
    return 1;
}
#define FAST_BF16(off, out, dim, mul) quant_row_bf16_avx512(x + (off), out, dim, mul, emin_bits, code_sub)
#else
#define FAST_BF16(off, out, dim, mul) 0
#endif
#define FAST_NONE(off, out, dim, mul) 0

/* A block of up to BLK rows (token, kv-head). DIM is a compile-time constant in the specialized
 * copies below, so gcc unrolls each row into full vectors with no per-row peeling (the per-row
 * overhead, not the arithmetic, dominated a generic loop over 64- or 128-element rows). Three
 * passes per block: the rows' amax, then their scales and reciprocals (two divisions per row,
 * independent across the block, so they pipeline instead of sitting on each row's critical
 * path), then the codes (the block's rows are still in L1). AMAX sets amax_bits, the bit pattern
 * of the row's max|x|: for non-negative floats integer order is float order, and an integer max
 * reduction vectorizes (a float one does not without -ffast-math). */
#define BLK 16
#define BLOCK_BODY(AMAX, LOAD, FAST, DIM)                                                  \
    {                                                                                      \
        const int64_t nb = rows - r0 < BLK ? rows - r0 : BLK;                              \
        uint32_t amaxes[BLK];                                                              \
        float muls[BLK];                                                                   \
        for (int64_t j = 0; j < nb; j++) {                                                 \
            const int64_t r = r0 + j;                                                      \
            uint32_t amax_bits;                                                            \
            AMAX(DIM)                                                                      \
            /* |x| > 2^64, inf and NaN all have larger patterns than 2^64: a bad row */      \
            bad += amax_bits > 0x5F800000u;                                                \
            amaxes[j] = amax_bits;                                                         \
        }                                                                                  \
        for (int64_t j = 0; j < nb; j++) {                                                 \
            /* s = max(bf16_up(amax / clamp), s_min): round the quotient's bits up to bf16 */ \
            uint32_t sb = (f32_bits(bits_f32(amaxes[j]) / clamp) + 0xFFFFu) & 0xFFFF0000u; \
            sb = sb < smin_bits ? smin_bits : sb;                                          \
            scale[r0 + j] = (uint16_t)(sb >> 16);                                          \
            /* r = fp32(1 / s), finite (s >= 2^-126); |x * r| <= clamp (1 + 2^-22) */        \
            muls[j] = 1.0f / bits_f32(sb);                                                 \
        }                                                                                  \
        for (int64_t j = 0; j < nb; j++) {                                                 \
            const int64_t r = r0 + j;                                                      \
            const float mul = muls[j];                                                     \
            uint8_t *out = data + r * (DIM);                                               \
            if (!FAST(r * (DIM), out, (DIM), mul)) {                                       \
                for (int64_t i = 0; i < (DIM); i++)                                        \
                    out[i] = encode(LOAD(r * (DIM) + i) * mul, emin_bits, code_sub);       \
            }                                                                              \
        }                                                                                  \
    }

/* bf16: the max runs on the 16-bit patterns (twice the lanes per vector) */
#define AMAX_BF16(DIM)                                                                     \
    {                                                                                      \
        uint16_t m = 0;                                                                    \
        for (int64_t i = 0; i < (DIM); i++) {                                              \
            uint16_t b = x[r * (DIM) + i] & 0x7FFFu;                                       \
            m = b > m ? b : m;                                                             \
        }                                                                                  \
        amax_bits = (uint32_t)m << 16;                                                     \
    }
#define AMAX_F32(DIM)                                                                      \
    {                                                                                      \
        uint32_t m = 0;                                                                    \
        for (int64_t i = 0; i < (DIM); i++) {                                              \
            uint32_t b = f32_bits(x[r * (DIM) + i]) & 0x7FFFFFFFu;                         \
            m = b > m ? b : m;                                                             \
        }                                                                                  \
        amax_bits = m;                                                                     \
    }

#define QUANT_BODY(AMAX, LOAD, FAST)                                                       \
    int64_t bad = 0;                                                                       \
    const int32_t emin = 1 - bias;                                                         \
    const uint32_t emin_bits = (uint32_t)(emin + 127) << 23;                               \
    const uint32_t code_sub = (20u << 23) + (uint32_t)(emin + 127) * 8u;                   \
    const uint32_t smin_bits = f32_bits(s_min);  /* a normal power of two, a bf16 */       \
    if (dim == 128) {                                                                      \
        _Pragma("omp parallel for reduction(+:bad) num_threads(nthreads) schedule(static)") \
        for (int64_t r0 = 0; r0 < rows; r0 += BLK) BLOCK_BODY(AMAX, LOAD, FAST, 128)       \
    } else if (dim == 64) {                                                                \
        _Pragma("omp parallel for reduction(+:bad) num_threads(nthreads) schedule(static)") \
        for (int64_t r0 = 0; r0 < rows; r0 += BLK) BLOCK_BODY(AMAX, LOAD, FAST, 64)        \
    } else {                                                                               \
        _Pragma("omp parallel for reduction(+:bad) num_threads(nthreads) schedule(static)") \
        for (int64_t r0 = 0; r0 < rows; r0 += BLK) BLOCK_BODY(AMAX, LOAD, FAST, dim)       \
    }                                                                                      \
    return bad;

#define LOAD_BF16(k) bf16_to_f32(x[k])
#define LOAD_F32(k) (x[k])

int64_t memha_fp8_quant_bf16(const uint16_t *x, uint8_t *data, uint16_t *scale, int64_t rows,
                             int64_t dim, float clamp, float s_min, int bias, int nthreads) {
    QUANT_BODY(AMAX_BF16, LOAD_BF16, FAST_BF16)
}

int64_t memha_fp8_quant_f32(const float *x, uint8_t *data, uint16_t *scale, int64_t rows,
                            int64_t dim, float clamp, float s_min, int bias, int nthreads) {
    QUANT_BODY(AMAX_F32, LOAD_F32, FAST_NONE)
}

/* Fused CPU dequantize for the same formats, to bf16: out = bf16_rne(fp8(data) * s).
 * Bit-exact with the torch reference (``(data.view(fp8).float() * s.float()).to(bf16)``): codes
 * decode exactly to fp32 through a 256-entry table, the product with the bf16 scale is exact in
 * fp32 (4 x 8 significant bits, never below 2^-149 granularity), and the bf16 rounding is RNE.
 * NaN codes or scales (never written by our encoders) give a NaN (payload unspecified).
 *
 * data   [rows, head_dim] uint8 codes
 * scale  [rows]           bf16 scales (as uint16)
 * out    [rows, head_dim] bf16 (as uint16)
 */
static float decode_code(int code, int bias) {
    int s = code >> 7, e = (code >> 3) & 0xF, m = code & 7;
    if (bias == 8 ? code == 0x80 : (e == 15 && m == 7)) return NAN;
    float mag = e == 0 ? ldexpf((float)m / 8.0f, 1 - bias) : ldexpf(1.0f + (float)m / 8.0f, e - bias);
    return s ? -mag : mag;
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define HAVE_AVX512_DEQUANT 1
/* AVX-512 row decode, 16 codes per step, the same values as the table: a code's 7 magnitude bits
 * moved to fp32's exponent / mantissa position with the exponent rebased from bias to 127 (codes
 * with exponent field 0 instead: float(m) * 2^(1 - bias - 3); both exact), the sign bit OR-ed in,
 * one fp32 multiply by the scale, the same integer RNE to bf16, NaN codes / products -> 0x7FC0. */
static inline int dequant_row_avx512(const uint8_t *d, uint16_t *o, int64_t dim, float s, int bias) {
    if (dim & 15) return 0;
    const __m512 vs = _mm512_set1_ps(s), sub_mul = _mm512_set1_ps(ldexpf(1.0f, -bias - 2));
    const __m512i exp_add = _mm512_set1_epi32((127 - bias) << 23), x7f = _mm512_set1_epi32(0x7F);
    const __m512i x78 = _mm512_set1_epi32(0x78), x7 = _mm512_set1_epi32(7), x80 = _mm512_set1_epi32(0x80);
    const __m512i rnd = _mm512_set1_epi32(0x7FFF), one = _mm512_set1_epi32(1), qnan = _mm512_set1_epi32(0x7FC0);
    for (int64_t i = 0; i < dim; i += 16) {
        __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(d + i)));
        __m512i em = _mm512_and_si512(c, x7f);
        __m512 norm = _mm512_castsi512_ps(_mm512_add_epi32(_mm512_slli_epi32(em, 20), exp_add));
        __m512 sub = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_and_si512(c, x7)), sub_mul);
        __m512 mag = _mm512_mask_blend_ps(_mm512_test_epi32_mask(em, x78), sub, norm);
        __m512i sign = _mm512_slli_epi32(_mm512_and_si512(c, x80), 24);
        __m512 v = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(mag), sign)), vs);
        __m512i b = _mm512_castps_si512(v);
        __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(b, rnd),
                                      _mm512_and_si512(_mm512_srli_epi32(b, 16), one)), 16);
        __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q) |
                        (bias == 8 ? _mm512_cmpeq_epi32_mask(c, x80) : _mm512_cmpeq_epi32_mask(em, x7f));
        r = _mm512_mask_mov_epi32(r, nan, qnan);
        _mm256_storeu_si256((__m256i *)(o + i), _mm512_cvtepi32_epi16(r));
    }
    return 1;
}
#else
#define HAVE_AVX512_DEQUANT 0
static inline int dequant_row_avx512(const uint8_t *d, uint16_t *o, int64_t dim, float s, int bias) {
    (void)d; (void)o; (void)dim; (void)s; (void)bias;
    return 0;
}
#endif

static inline void dequant_row(const uint8_t *d, uint16_t *o, int64_t dim, float s, int bias, const float *lut) {
    if (dequant_row_avx512(d, o, dim, s, bias)) return;
    for (int64_t i = 0; i < dim; i++) {
        float v = lut[d[i]] * s;
        uint32_t b = f32_bits(v);
        uint16_t rne = (uint16_t)((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
        o[i] = v != v ? (uint16_t)0x7FC0 : rne;
    }
}

void memha_fp8_dequant_bf16(const uint8_t *data, const uint16_t *scale, uint16_t *out, int64_t rows,
                            int64_t dim, int bias, int nthreads) {
    float lut[256];
    for (int c = 0; c < 256; c++) lut[c] = decode_code(c, bias);
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < rows; r++)
        dequant_row(data + r * dim, out + r * dim, dim, bf16_to_f32(scale[r]), bias, lut);
}

/* Gather + dequantize straight from pool rows (what attention reads), one pass, no temporaries.
 * Format v4 pool rows: codes and bf16 scales in two buffers.
 *
 * data   [num_slots, heads, dim] uint8 fp8 codes
 * scales [num_slots, heads] bf16 scales (as uint16)
 * slots  [n] int64 slot ids
 * out    [n, heads, dim] bf16 (as uint16) = dequantize(data[slots], scales[slots])
 * Returns -1 (out untouched) when a slot is outside [0, num_slots), else 0.
 *
 * A decode step calls this once per request, layer and K/V (torch_native attention), often for a
 * few hundred rows: the per-call cost matters as much as the per-row one. So the range check is a
 * pass here instead of two torch reductions in Python, the scalar table is built only where the
 * AVX-512 path does not serve (dim % 16), and one thread runs outside any OpenMP region. */
static void gather_rows(const uint8_t *data, const uint16_t *scales, const int64_t *slots, int64_t i0,
                        int64_t i1, int64_t heads, int64_t dim, uint16_t *out, int bias, const float *lut) {
    for (int64_t i = i0; i < i1; i++) {
        for (int64_t h = 0; h < heads; h++) {
            int64_t r = slots[i] * heads + h;
            dequant_row(data + r * dim, out + (i * heads + h) * dim, dim, bf16_to_f32(scales[r]), bias, lut);
        }
    }
}

int memha_fp8_gather_dequant_bf16(const uint8_t *data, const uint16_t *scales, const int64_t *slots, int64_t n,
                                  int64_t num_slots, int64_t heads, int64_t dim, uint16_t *out, int bias,
                                  int nthreads) {
    for (int64_t i = 0; i < n; i++)
        if (slots[i] < 0 || slots[i] >= num_slots) return -1;
    float lut_store[256];
    const float *lut = NULL;  /* only the scalar fallback of dequant_row reads it */
    if (!HAVE_AVX512_DEQUANT || (dim & 15)) {
        for (int c = 0; c < 256; c++) lut_store[c] = decode_code(c, bias);
        lut = lut_store;
    }
    if (nthreads <= 1) {
        gather_rows(data, scales, slots, 0, n, heads, dim, out, bias, lut);
        return 0;
    }
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t i = 0; i < n; i++)
        gather_rows(data, scales, slots, i, i + 1, heads, dim, out, bias, lut);
    return 0;
}
