// Torch-free test of the CPU kernel bodies (CMake target tgvkv_kernel_tests; no torch needed).
// Checks: exact fp16/bf16 conversion, the rank key order, budgets on hand-computed cases, the
// second pass of the scoring kernel on a hand case, and select_keep_row on a small case. Exit code 0 on success.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "tgvkv/common.h"
#include "tgvkv/cpu_score.h"
#include "tgvkv/cpu_select.h"

using namespace tgvkv;

static int failures = 0;
#define EXPECT(cond)                                                    \
  do {                                                                  \
    if (!(cond)) {                                                      \
      std::fprintf(stderr, "%s:%d: EXPECT(%s) failed\n", __FILE__, __LINE__, #cond); \
      ++failures;                                                       \
    }                                                                   \
  } while (0)

static float half_ref(uint16_t h) {  // slow, obvious binary16 decoding
  const int s = h >> 15, e = (h >> 10) & 31, m = h & 1023;
  float v;
  if (e == 0) v = std::ldexp(static_cast<float>(m), -24);
  else if (e == 31) v = m ? NAN : INFINITY;
  else v = std::ldexp(static_cast<float>(m + 1024), e - 25);
  return s ? -v : v;
}

static void test_conversions() {
  for (uint32_t h = 0; h < 65536; ++h) {
    const float a = half_bits_to_float(static_cast<uint16_t>(h)), b = half_ref(static_cast<uint16_t>(h));
    EXPECT((std::isnan(a) && std::isnan(b)) || float_to_bits(a) == float_to_bits(b));
  }
  EXPECT(bf16_bits_to_float(0x3F80) == 1.0f);
  EXPECT(bf16_bits_to_float(0xC000) == -2.0f);
}

static void test_rank_key() {
  EXPECT(rank_key(true, -1e30f, 0) > rank_key(false, 1e30f, 5));   // text > vision
  EXPECT(rank_key(false, 0.5f, 0) > rank_key(false, 0.25f, 9));     // higher score
  EXPECT(rank_key(false, -0.5f, 0) < rank_key(false, 0.25f, 0));
  EXPECT(rank_key(false, 0.5f, 7) > rank_key(false, 0.5f, 3));      // later slot wins ties
  EXPECT(rank_key(false, -0.0f, 4) > rank_key(false, 0.0f, 3));     // -0 == +0
  EXPECT(rank_key_slot(rank_key(true, 3.0f, 12345)) == 12345);
}

static void test_budgets() {
  // L = 2, S = (3, 1), kappa = 0.25, N = 100: pi = (0.75, 0.25), r = (0.625, 0.875)
  const float stats[4] = {3.0f, 0.0f, 1.0f, 0.0f};
  int64_t keep[2];
  double frac[2], work[4];
  EXPECT(sample_layer_budgets(2, stats, 2, 1, 100, 4, true, 0.25, kBudgetMass, false, work, keep,
                              1, frac, 1) == 0);
  EXPECT(keep[0] == 100 - 62 && keep[1] == 100 - 88);  // round(62.5) = 62 (half to even)
  EXPECT(frac[0] == 1.0 - 0.625 && frac[1] == 1.0 - 0.875);
  // not evicted
  EXPECT(sample_layer_budgets(2, stats, 2, 1, 7, 4, false, 0.25, kBudgetMass, false, work, keep,
                              1, frac, 1) == 0);
  EXPECT(keep[0] == 7 && keep[1] == 7 && frac[0] == 1.0);
  // clamped layer + redistribute: kappa = 0.75, S = (3, 1): targets (112.5, 37.5) -> (100, 50)
  EXPECT(sample_layer_budgets(2, stats, 2, 1, 100, 4, true, 0.75, kBudgetMass, true, work, keep,
                              1, frac, 1) == 0);
  EXPECT(keep[0] == 100 && keep[1] == 50);
  // non-finite stats
  const float bad[4] = {INFINITY, 0.0f, 1.0f, 0.0f};
  EXPECT(sample_layer_budgets(2, bad, 2, 1, 100, 4, true, 0.25, kBudgetMass, false, work, keep,
                              1, frac, 1) == 1);
  bool ok = false;
  EXPECT(decode_forget(10, 20, 0.45, &ok) == 1 && ok);
  EXPECT(decode_forget(10, 20, 0.55, &ok) == -1 && ok);
}

// The second pass of the scoring kernel (the first pass needs ATen: tested by pytest under every
// CPU capability, tests/test_ops_cpu_capabilities.py).
static void test_finish_scores() {
  // one sample, one guidance row at slot 3; slots: text, vision, vision, text; Hq = 2 heads whose
  // softmax rows sum to A = [0.2, 0.6, 0.8, 0.4] (head mean [0.1, 0.3, 0.4, 0.2])
  const int8_t mod[4] = {kText, kVision, kVision, kText};
  const int64_t qp[1] = {3}, rows[1] = {1};
  float A[4] = {0.2f, 0.6f, 0.8f, 0.4f};
  float scores[4], stats[2];
  cpu::ScoreBatch sb{qp, mod, rows, 1, 1, 4, 1.0f, true};
  cpu::ScoreLayer ly{nullptr, nullptr, cpu::DType::kF32, 2, 1, 8, 0, 0, 0, 0, false, 0, 0, 0, 0,
                     scores, stats};
  double colw[4], cols[4], w[1];
  cpu::finish_scores(ly, sb, 0, A, colw, cols, w);
  auto near = [](float x, double y) { return std::fabs(x - y) <= 1e-6; };
  // text weight w = A[3] = 0.2: vision scores 0.2 * 0.3, 0.2 * 0.4; text: column sums
  EXPECT(near(scores[0], 0.1) && near(scores[1], 0.06) && near(scores[2], 0.08));
  EXPECT(near(scores[3], 0.2));
  EXPECT(near(stats[0], 0.7));   // S: text->vision mass
  EXPECT(near(stats[1], 0.0));   // I: one row, so rows and columns are independent
}

static void test_select() {
  // 10 slots: text 0-1, vision 2-7, text 8-9; sinks = 2; keep 5 -> drop 5 lowest candidates
  const int8_t mod[10] = {1, 1, 2, 2, 2, 2, 2, 2, 1, 1};
  const float sc[10] = {0, 0, 0.5f, 0.1f, 0.5f, 0.9f, 0.2f, 0.3f, 0.0f, 0};
  cpu::SampleInfo si;
  si.n_real = 10;
  si.n_rows = 2;
  si.first_guid = 8;
  si.last_real = 9;
  si.has_vision = true;
  int64_t idx[10], np = 0;
  uint64_t keys[10];
  const int64_t n = cpu::select_keep_row(sc, mod, 10, si, 5, 2, idx, keys, &np);
  // candidates 2..8; drop 5 lowest: 3 (0.1), 6 (0.2), 7 (0.3), 2 (0.5, earlier tie), 4? no:
  // vision ranks: 3 < 6 < 7 < 2 < 4 < 5; text 8 outranks all -> dropped 3, 6, 7, 2, 4
  EXPECT(n == 5);
  const int64_t want[5] = {0, 1, 5, 8, 9};
  for (int i = 0; i < 5; ++i) EXPECT(idx[i] == want[i]);
  EXPECT(idx[5] == -1 && np == 2);
}

int main() {
  test_conversions();
  test_rank_key();
  test_budgets();
  test_finish_scores();
  test_select();
  if (failures) {
    std::fprintf(stderr, "%d failure(s)\n", failures);
    return 1;
  }
  std::printf("tgvkv kernel tests: OK\n");
  return 0;
}
