/* Fused CPU quantize for the fp8 per-(token, kv-head) formats (e4m3fn and e4m3fnuz), E8M0 scales.
 *
 * Bit-exact with the torch reference in fp8.py (tests compare both on random, heavy-tailed, edge
 * and scale-boundary inputs, with and without the AVX-512 path, and on the golden vectors): one
 * pass per row (token, kv-head) finds its amax, writes the exponent byte and the codes. Portable C
 * that gcc vectorizes (-O3 -march=native), plus an AVX-512 path for bf16 rows; OpenMP over rows.
 *
 * x      [rows, head_dim]  bf16 (as uint16) or fp32, contiguous (rows = tokens * kv_heads)
 * data   [rows, head_dim]  uint8 codes (out)
 * scale  [rows]            uint8 E8M0 exponent e (out): scale 2^(e - 127), k = e - 127 the smallest
 *                          integer with amax <= clamp * 2^k, e clamped to [bias - 7, 254]
 * clamp  448 (fn, bias 7) or 224 (fnuz, bias 8)
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

/* |y| <= 448 (fn) / 224 (fnuz) -> e4m3 code, RNE, zero always 0x00. emin = 1 - bias is the exponent
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
/* AVX-512 path for one bf16 row of a length that is a multiple of 32: the bytes of
 * encode(x * 2^-k), 32 elements per step, without the multiply. In x's own units the row's grid is
 * 2^(E - 3) with E = max(floor(log2|x|), emin + k): adding 2^(E + 20) rounds |x| onto it and
 * leaves n in the sum's low 16 bits, and code = n + 8 (E - emin - k). Scaling by 2^-k commutes
 * with that rounding as long as 2^(emin + k) is a normal fp32, i.e. e >= bias; rows below that
 * (amax <= 448 * 2^-121, about 2^-112) take the portable path. Where the reference's x * 2^-k
 * underflows fp32, both give code 0. All exponent arithmetic runs on the bf16 patterns (16-bit
 * lanes); only the rounding add runs on fp32 lanes, whose patterns are the bf16 ones in the high
 * word.
 * Returns 0 when it did not handle the row. */
static inline int quant_row_bf16_avx512(const uint16_t *x, uint8_t *out, int64_t dim, int32_t e,
                                        int32_t emin) {
    const int32_t rexp = emin + e;  /* biased exponent of 2^(emin + k) */
    if (rexp < 1 || (dim & 31)) return 0;
    const __m512i zero = _mm512_setzero_si512();
    const __m512i abs16 = _mm512_set1_epi16(0x7FFF), exp16 = _mm512_set1_epi16(0x7F80);
    const __m512i rmin16 = _mm512_set1_epi16((short)(rexp << 7));      /* 2^(emin + k) */
    const __m512i radd16 = _mm512_set1_epi16((short)((rexp + 20) << 7));
    const __m512i sign16 = _mm512_set1_epi16(0x80);
    /* unpacklo/hi put elements 8L+0..3 / 8L+4..7 of 128-bit lane L into the dwords of lo / hi;
     * this picks each dword's low word back into element order (lo words 0-31, hi words 32-63) */
    const __m512i low_words = _mm512_set_epi16(
        62, 60, 58, 56, 30, 28, 26, 24, 54, 52, 50, 48, 22, 20, 18, 16,
        46, 44, 42, 40, 14, 12, 10, 8, 38, 36, 34, 32, 6, 4, 2, 0);
    for (int64_t i = 0; i < dim; i += 32) {
        __m512i xb = _mm512_loadu_si512((const void *)(x + i));
        __m512i ab = _mm512_and_si512(xb, abs16);
        /* d = exponent field of 2^E minus that of 2^(emin + k); b = high word of 2^(E + 20) */
        __m512i d = _mm512_sub_epi16(_mm512_max_epu16(_mm512_and_si512(ab, exp16), rmin16), rmin16);
        __m512i b = _mm512_add_epi16(d, radd16);
        __m512 s_lo = _mm512_add_ps(_mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, ab)),
                                    _mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, b)));
        __m512 s_hi = _mm512_add_ps(_mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, ab)),
                                    _mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, b)));
        __m512i n = _mm512_permutex2var_epi16(_mm512_castps_si512(s_lo), low_words,
                                              _mm512_castps_si512(s_hi));
        __m512i code = _mm512_add_epi16(n, _mm512_srli_epi16(d, 4));  /* n + 8 (E - emin - k) */
        /* code | sign (ternary logic A | (B & C)), then min(., code << 8) drops the sign of code 0 */
        __m512i sc = _mm512_ternarylogic_epi32(code, _mm512_srli_epi16(xb, 8), sign16, 0xF8);
        sc = _mm512_min_epu16(sc, _mm512_slli_epi16(code, 8));
        _mm256_storeu_si256((__m256i *)(out + i), _mm512_cvtepi16_epi8(sc));
    }
    return 1;
}
#define FAST_BF16(off, out, dim, e, emin) quant_row_bf16_avx512(x + (off), out, dim, e, emin)
#else
#define FAST_BF16(off, out, dim, e, emin) 0
#endif
#define FAST_NONE(off, out, dim, e, emin) 0

/* One row (token, kv-head). DIM is a compile-time constant in the specialized copies below, so
 * gcc unrolls the row into full vectors with no per-row peeling (the per-row overhead, not the
 * arithmetic, dominated a generic loop over 64- or 128-element rows). AMAX sets amax_bits, the
 * bit pattern of the row's max|x|: for non-negative floats integer order is float order, and an
 * integer max reduction vectorizes (a float one does not without -ffast-math). */
#define ROW_BODY(AMAX, LOAD, FAST, DIM)                                                    \
    {                                                                                      \
        uint32_t amax_bits;                                                                \
        AMAX(DIM)                                                                          \
        /* |x| > 2^64, inf and NaN all have larger patterns than 2^64: a bad row */          \
        bad += amax_bits > 0x5F800000u;                                                    \
        /* e = ((bits + e_add) >> 23) - e_sub, exact (see fp8.e8m0_exponent); <= 248 here */ \
        int32_t e = (int32_t)((amax_bits + e_add) >> 23) - e_sub;                          \
        e = e < e_min ? e_min : (e > 254 ? 254 : e);                                       \
        scale[r] = (uint8_t)e;                                                             \
        uint8_t *out = data + r * (DIM);                                                   \
        if (!FAST(r * (DIM), out, (DIM), e, emin)) {                                       \
            /* 2^-k = 2^(127 - e), a normal fp32; |x * 2^-k| <= clamp (nothing saturates) */  \
            const float mul = bits_f32((uint32_t)(254 - e) << 23);                         \
            for (int64_t i = 0; i < (DIM); i++)                                            \
                out[i] = encode(LOAD(r * (DIM) + i) * mul, emin_bits, code_sub);           \
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
    const uint32_t e_add = 0x7FFFFFu - (f32_bits(clamp) & 0x7FFFFFu);                       \
    const int32_t e_sub = (int32_t)(f32_bits(clamp) >> 23) - 127, e_min = bias - 7;         \
    if (dim == 128) {                                                                      \
        _Pragma("omp parallel for reduction(+:bad) num_threads(nthreads) schedule(static)") \
        for (int64_t r = 0; r < rows; r++) ROW_BODY(AMAX, LOAD, FAST, 128)                 \
    } else if (dim == 64) {                                                                \
        _Pragma("omp parallel for reduction(+:bad) num_threads(nthreads) schedule(static)") \
        for (int64_t r = 0; r < rows; r++) ROW_BODY(AMAX, LOAD, FAST, 64)                  \
    } else {                                                                               \
        _Pragma("omp parallel for reduction(+:bad) num_threads(nthreads) schedule(static)") \
        for (int64_t r = 0; r < rows; r++) ROW_BODY(AMAX, LOAD, FAST, dim)                 \
    }                                                                                      \
    return bad;

#define LOAD_BF16(k) bf16_to_f32(x[k])
#define LOAD_F32(k) (x[k])

int64_t memha_fp8_quant_bf16(const uint16_t *x, uint8_t *data, uint8_t *scale, int64_t rows,
                             int64_t dim, float clamp, int bias, int nthreads) {
    QUANT_BODY(AMAX_BF16, LOAD_BF16, FAST_BF16)
}

int64_t memha_fp8_quant_f32(const float *x, uint8_t *data, uint8_t *scale, int64_t rows,
                            int64_t dim, float clamp, int bias, int nthreads) {
    QUANT_BODY(AMAX_F32, LOAD_F32, FAST_NONE)
}

/* Fused CPU dequantize for the same formats, to bf16: out = bf16_rne(fp8(data) * 2^(e - 127)).
 * Bit-exact with the torch reference (``(data.view(fp8).float() * e8m0_to_f32(e)).to(bf16)``):
 * codes decode exactly to fp32 through a 256-entry table, the product with the power of two is
 * exact, and the bf16 rounding is RNE. NaN codes and e = 255 (never written by our encoders) give
 * a NaN (payload unspecified).
 *
 * data   [rows, head_dim] uint8 codes
 * scale  [rows]           uint8 E8M0 exponents
 * out    [rows, head_dim] bf16 (as uint16)
 */
static float decode_code(int code, int bias) {
    int s = code >> 7, e = (code >> 3) & 0xF, m = code & 7;
    if (bias == 8 ? code == 0x80 : (e == 15 && m == 7)) return NAN;
    float mag = e == 0 ? ldexpf((float)m / 8.0f, 1 - bias) : ldexpf(1.0f + (float)m / 8.0f, e - bias);
    return s ? -mag : mag;
}

static float e8m0_value(int e) {
    return e == 255 ? NAN : (e == 0 ? bits_f32(0x00400000u) : bits_f32((uint32_t)e << 23));
}

void memha_fp8_dequant_bf16(const uint8_t *data, const uint8_t *scale, uint16_t *out, int64_t rows,
                            int64_t dim, int bias, int nthreads) {
    float lut[256];
    for (int c = 0; c < 256; c++) lut[c] = decode_code(c, bias);
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float s = e8m0_value(scale[r]);
        const uint8_t *d = data + r * dim;
        uint16_t *o = out + r * dim;
        for (int64_t i = 0; i < dim; i++) {
            float v = lut[d[i]] * s;
            uint32_t b = f32_bits(v);
            uint16_t rne = (uint16_t)((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
            o[i] = v != v ? (uint16_t)0x7FC0 : rne;
        }
    }
}
