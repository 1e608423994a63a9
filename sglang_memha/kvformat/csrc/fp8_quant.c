/* Fused CPU quantize for the fp8 per-(token, kv-head) formats (e4m3fn and e4m3fnuz), E8M0 scales.
 *
 * Bit-exact with the torch reference in fp8.py (tests compare both on random, heavy-tailed and
 * edge inputs, and on the golden vectors): one pass reads a row, finds its amax, writes the
 * exponent byte and the codes. Plain C that gcc vectorizes (-O3 -march=native); OpenMP over rows.
 *
 * x      [rows, head_dim]  bf16 (as uint16) or fp32, contiguous (rows = tokens * kv_heads)
 * data   [rows, head_dim]  uint8 codes (out)
 * scale  [rows]            uint8 E8M0 exponent e (out): scale 2^(e - 127), k = e - 127 the smallest
 *                          integer with amax <= clamp * 2^k, e clamped to [bias - 7, 254]
 * Returns the number of non-finite or |x| > 2^64 inputs (the caller raises; outputs undefined).
 */
#include <stdint.h>
#include <string.h>
#include <math.h>

static inline uint32_t f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f;
}

/* bias 7: e4m3fn (subnormal unit 2^-9); bias 8: e4m3fnuz (unit 2^-10). |y| <= 448 / 224. */
static inline uint8_t encode(float y, int bias, float sub_mul, float min_normal) {
    uint32_t bits; memcpy(&bits, &y, 4);
    uint32_t sign = bits >> 31;
    uint32_t mag_bits = bits & 0x7FFFFFFFu;
    float a; memcpy(&a, &mag_bits, 4);
    /* subnormal: code = rint(|y| * 2^(2+bias)) in 0..8 (8 is the smallest normal, code 0x08);
     * adding 2^23 makes the FP adder round to an integer, ties to even, in the low mantissa bits */
    uint32_t sub = f32_bits(a * sub_mul + 8388608.0f) - 0x4B000000u;
    /* normal: round the fp32 mantissa to 3 bits, ties to even, then rebias the exponent */
    uint32_t rounded = mag_bits + 0x7FFFFu + ((mag_bits >> 20) & 1u);
    uint32_t nrm = (rounded >> 20) - ((uint32_t)(127 - bias) << 3);
    uint32_t code = a < min_normal ? sub : nrm;
    return (uint8_t)(code == 0 ? 0 : (code | (sign << 7)));  /* zero is always 0x00 */
}

/* One row (token, kv-head). DIM is a compile-time constant in the specialized copies below, so
 * gcc unrolls the row into full 16-lane vectors with no per-row peeling (the per-row overhead,
 * not the arithmetic, dominated a generic loop over 64- or 128-element rows). */
#define ROW_BODY(LOAD, DIM)                                                                \
    {                                                                                      \
        /* amax on the bit patterns of |x|: for non-negative floats integer order is float   \
         * order, and an integer max reduction vectorizes (a float one does not without      \
         * -ffast-math). |x| > 2^64, inf and NaN all have larger patterns than 2^64 (bad). */ \
        uint32_t amax_bits = 0; int32_t rb = 0;                                            \
        for (int64_t i = 0; i < (DIM); i++) {                                              \
            uint32_t b = f32_bits(LOAD(r * (DIM) + i)) & 0x7FFFFFFFu;                      \
            rb += b > 0x5F800000u;                                                         \
            amax_bits = b > amax_bits ? b : amax_bits;                                     \
        }                                                                                  \
        bad += rb;                                                                         \
        /* e = ((bits + e_add) >> 23) - e_sub, exact (see fp8.e8m0_exponent); <= 248 here */ \
        int32_t e = (int32_t)((amax_bits + e_add) >> 23) - e_sub;                          \
        e = e < e_min ? e_min : (e > 254 ? 254 : e);                                       \
        scale[r] = (uint8_t)e;                                                             \
        /* 2^-k = 2^(127 - e), a normal fp32; |x * 2^-k| <= clamp (no saturation needed) */   \
        const float mul = bits_f32((uint32_t)(254 - e) << 23);                             \
        uint8_t *out = data + r * (DIM);                                                   \
        for (int64_t i = 0; i < (DIM); i++)                                                \
            out[i] = encode(LOAD(r * (DIM) + i) * mul, bias, sub_mul, min_normal);         \
    }

#define QUANT_BODY(LOAD)                                                                   \
    int64_t bad = 0;                                                                       \
    const float sub_mul = bias == 7 ? 512.0f : 1024.0f;                                    \
    const float min_normal = bias == 7 ? 0.015625f : 0.0078125f;                           \
    const uint32_t e_add = 0x7FFFFFu - (f32_bits(clamp) & 0x7FFFFFu);                       \
    const int32_t e_sub = (int32_t)(f32_bits(clamp) >> 23) - 127, e_min = bias - 7;         \
    if (dim == 128) {                                                                      \
        _Pragma("omp parallel for reduction(+:bad) num_threads(nthreads) schedule(static)") \
        for (int64_t r = 0; r < rows; r++) ROW_BODY(LOAD, 128)                             \
    } else if (dim == 64) {                                                                \
        _Pragma("omp parallel for reduction(+:bad) num_threads(nthreads) schedule(static)") \
        for (int64_t r = 0; r < rows; r++) ROW_BODY(LOAD, 64)                              \
    } else {                                                                               \
        _Pragma("omp parallel for reduction(+:bad) num_threads(nthreads) schedule(static)") \
        for (int64_t r = 0; r < rows; r++) ROW_BODY(LOAD, dim)                             \
    }                                                                                      \
    return bad;

#define LOAD_BF16(k) bf16_to_f32(x[k])
#define LOAD_F32(k) (x[k])

int64_t memha_fp8_quant_bf16(const uint16_t *x, uint8_t *data, uint8_t *scale, int64_t rows,
                             int64_t dim, float clamp, int bias, int nthreads) {
    QUANT_BODY(LOAD_BF16)
}

int64_t memha_fp8_quant_f32(const float *x, uint8_t *data, uint8_t *scale, int64_t rows,
                            int64_t dim, float clamp, int bias, int nthreads) {
    QUANT_BODY(LOAD_F32)
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
