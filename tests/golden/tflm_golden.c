/*
 * Generator for tests/tests/golden.rs: TFLite Micro's int8 arithmetic written
 * out in C from its published formulas, independent of the Rust crate.
 *
 * - SaturatingRoundingDoublingHighMul, RoundingDivideByPOT:
 *   gemmlowp fixedpoint/fixedpoint.h (as vendored by TFLM).
 * - MultiplyByQuantizedMultiplier (double rounding, the default build):
 *   tensorflow/lite/kernels/internal/common.{h,cc}.
 * - QuantizeMultiplier: tensorflow/lite/kernels/internal/quantization_util.cc.
 * - int8 ADD: tensorflow/lite/micro/kernels/add_common.cc (CalculateOpDataAdd)
 *   and tensorflow/lite/kernels/internal/reference/integer_ops/add.h
 *   (AddElementwise).
 *
 * Build and run: cc -O1 -o /tmp/g tflm_golden.c -lm && /tmp/g
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>

static int32_t srdhm(int32_t a, int32_t b) {
  int overflow = a == b && a == INT32_MIN;
  int64_t ab_64 = (int64_t)a * (int64_t)b;
  int32_t nudge = ab_64 >= 0 ? (1 << 30) : (1 - (1 << 30));
  int32_t ab_x2_high32 = (int32_t)((ab_64 + nudge) / (1ll << 31));
  return overflow ? INT32_MAX : ab_x2_high32;
}

static int32_t rdbpot(int32_t x, int exponent) {
  const int32_t mask = (int32_t)((1ll << exponent) - 1);
  const int32_t zero = 0, one = 1;
  const int32_t remainder = x & mask;
  const int32_t threshold = (mask >> 1) + ((x < zero) ? one : zero);
  return (x >> exponent) + ((remainder > threshold) ? one : zero);
}

static int32_t mbqm(int32_t x, int32_t quantized_multiplier, int shift) {
  int left_shift = shift > 0 ? shift : 0;
  int right_shift = shift > 0 ? 0 : -shift;
  return rdbpot(srdhm((int32_t)((uint32_t)x << left_shift), quantized_multiplier), right_shift);
}

static void quantize_multiplier(double m, int32_t *q, int *shift) {
  if (m == 0.) { *q = 0; *shift = 0; return; }
  const double frac = frexp(m, shift);
  int64_t q_fixed = (int64_t)round(frac * (1ll << 31));
  if (q_fixed == (1ll << 31)) { q_fixed /= 2; ++*shift; }
  if (*shift < -31) { *shift = 0; q_fixed = 0; }
  if (*shift > 30) { *shift = 30; q_fixed = (1ll << 31) - 1; }
  *q = (int32_t)q_fixed;
}

struct add_params {
  int32_t in1_off, in1_mul, in1_shift, in2_off, in2_mul, in2_shift;
  int left_shift;
  int32_t out_mul, out_shift, out_off, act_min, act_max;
};

static struct add_params add_prepare(float s1, int z1, float s2, int z2, float so, int zo, int relu) {
  struct add_params p;
  p.in1_off = -z1; p.in2_off = -z2; p.out_off = zo; p.left_shift = 20;
  const double twice_max = 2 * (double)(s1 > s2 ? s1 : s2);
  int sh;
  quantize_multiplier((double)s1 / twice_max, &p.in1_mul, &sh); p.in1_shift = sh;
  quantize_multiplier((double)s2 / twice_max, &p.in2_mul, &sh); p.in2_shift = sh;
  quantize_multiplier(twice_max / ((1 << p.left_shift) * (double)so), &p.out_mul, &sh); p.out_shift = sh;
  p.act_min = relu ? zo : -128; p.act_max = 127;
  return p;
}

static int8_t add_one(const struct add_params *p, int8_t a, int8_t b) {
  const int32_t v1 = p->in1_off + a, v2 = p->in2_off + b;
  const int32_t s1 = v1 * (1 << p->left_shift), s2 = v2 * (1 << p->left_shift);
  const int32_t r1 = rdbpot(srdhm(s1, p->in1_mul), -p->in1_shift);
  const int32_t r2 = rdbpot(srdhm(s2, p->in2_mul), -p->in2_shift);
  const int32_t raw = rdbpot(srdhm(r1 + r2, p->out_mul), -p->out_shift) + p->out_off;
  return (int8_t)(raw < p->act_min ? p->act_min : raw > p->act_max ? p->act_max : raw);
}

int main(void) {
  const int32_t xs[] = {0, 1, -1, 100, -100, 12345, -12345, 1 << 20, -(1 << 20), INT32_MAX, INT32_MIN};
  const int32_t ms[] = {1 << 30, 1518500250, INT32_MAX, 1073741825};
  const int shifts[] = {-31, -20, -7, -1, 0, 1, 5};
  printf("// (x, multiplier, shift, MultiplyByQuantizedMultiplier)\n");
  for (unsigned i = 0; i < sizeof xs / sizeof *xs; i++)
    for (unsigned j = 0; j < sizeof ms / sizeof *ms; j++)
      for (unsigned k = 0; k < sizeof shifts / sizeof *shifts; k++) {
        if (shifts[k] > 0 && (xs[i] > (1 << 20) || xs[i] < -(1 << 20))) continue;
        printf("(%d, %d, %d, %d),\n", xs[i], ms[j], shifts[k], mbqm(xs[i], ms[j], shifts[k]));
      }
  printf("// (real, quantized_multiplier, shift)\n");
  const double reals[] = {0.5, 0.75, 1.0, 1.5, 0.1, 0.003921568859368563, 1e-5, 2.3283064365386963e-10, 1e-12, 3.0e9, 0.9999999999};
  for (unsigned i = 0; i < sizeof reals / sizeof *reals; i++) {
    int32_t q; int s; quantize_multiplier(reals[i], &q, &s);
    printf("(%.17e, %d, %d),\n", reals[i], q, s);
  }
  printf("// add: (s1, z1, s2, z2, so, zo, relu) params then (a, b, out) rows\n");
  const float cases[][7] = {
      {0.05f, -3, 0.02f, 10, 0.06f, -7, 0}, {0.0235f, -128, 0.0471f, 5, 0.0392f, -128, 1},
      {0.1f, 0, 0.1f, 0, 0.1f, 0, 0}, {0.5f, -100, 0.004f, -128, 0.8f, -20, 1}};
  const int8_t vals[] = {-128, -77, -1, 0, 1, 63, 127};
  for (unsigned c = 0; c < 4; c++) {
    const float *k = cases[c];
    struct add_params p = add_prepare(k[0], (int)k[1], k[2], (int)k[3], k[4], (int)k[5], (int)k[6]);
    printf("params %d %d %d | %d %d %d | %d %d %d %d %d %d\n", p.in1_off, p.in1_mul, p.in1_shift, p.in2_off,
           p.in2_mul, p.in2_shift, p.left_shift, p.out_mul, p.out_shift, p.out_off, p.act_min, p.act_max);
    for (unsigned i = 0; i < 7; i++)
      for (unsigned j = 0; j < 7; j++) printf("%d ", add_one(&p, vals[i], vals[j]));
    printf("\n");
  }
  return 0;
}
