// Host driver of the tgvkv CUDA kernels (csrc/include/tgvkv/cuda/*.cuh) under the emulator in
// fake/ (see README.md). One process runs one op on the files of a case directory:
//
//   emu <op> <dir>     op: score | textmass | budgets | select | evict | compact | decode | append
//
// <dir>/meta.txt holds "key value" lines (sizes, flags, scalars); inputs are raw little-endian
// arrays <name>.bin (C order, the dtype the op expects); outputs are written as <name>.out.
// The launchers (grids, block sizes, dynamic shared memory, the order of the launches, the
// empty-input branches) are the extension's own: the kernel headers define them
// (csrc/include/tgvkv/cuda/launch.cuh declares them) and build.py rewrites each kernel launch
// (triple-chevron syntax) in the staged headers into an emulated one. What this driver adds
// is the glue of csrc/cuda/*.cu that needs torch: workspace carving, layer groups, views.
#include <algorithm>
#include <fstream>
#include <map>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "tgvkv/cuda/compact.cuh"
#include "tgvkv/cuda/decode.cuh"
#include "tgvkv/cuda/score.cuh"
#include "tgvkv/cuda/select.cuh"
#include "tgvkv/cuda/text_mass.cuh"

using namespace tgvkv::cuda;

namespace {

// A 256-byte aligned byte buffer (device allocations are at least that aligned) of exactly the
// requested size, so that an address sanitizer build (build.py sanitize=True) sees overruns.
struct Buf {
  std::unique_ptr<char, void (*)(void*)> p{nullptr, std::free};
  size_t n = 0;
  explicit Buf(size_t bytes = 0, int fill = 0) : n(bytes) {
    void* q = nullptr;
    if (posix_memalign(&q, 256, bytes > 0 ? bytes : 1) != 0) throw std::bad_alloc();
    p.reset(static_cast<char*>(q));
    std::memset(p.get(), fill, bytes);
  }
  char* data() const { return p.get(); }
  template <typename T>
  T* as() const { return reinterpret_cast<T*>(p.get()); }
};

struct Case {
  std::string dir;
  std::map<std::string, std::string> meta;

  explicit Case(std::string d) : dir(std::move(d)) {
    std::ifstream f(dir + "/meta.txt");
    if (!f) throw std::runtime_error("cannot read " + dir + "/meta.txt");
    std::string k, v;
    while (f >> k >> v) meta[k] = v;
  }
  bool has(const std::string& k) const { return meta.count(k) != 0; }
  double num(const std::string& k) const {
    auto it = meta.find(k);
    if (it == meta.end()) throw std::runtime_error("meta.txt lacks '" + k + "'");
    return std::stod(it->second);
  }
  int64_t i64(const std::string& k) const { return int64_t(num(k)); }
  int64_t i64(const std::string& k, int64_t dflt) const { return has(k) ? i64(k) : dflt; }
  // Reads <name>.bin, which must hold exactly `bytes` bytes.
  Buf read(const std::string& name, size_t bytes) const {
    Buf b(bytes);
    std::ifstream f(dir + "/" + name + ".bin", std::ios::binary);
    if (!f) throw std::runtime_error("cannot read " + name + ".bin");
    f.read(b.data(), std::streamsize(bytes));
    if (size_t(f.gcount()) != bytes || f.peek() != std::char_traits<char>::eof())
      throw std::runtime_error(name + ".bin does not hold " + std::to_string(bytes) + " bytes");
    return b;
  }
  void write(const std::string& name, const void* data, size_t bytes) const {
    std::ofstream f(dir + "/" + name + ".out", std::ios::binary);
    f.write(static_cast<const char*>(data), std::streamsize(bytes));
    if (!f) throw std::runtime_error("cannot write " + name + ".out");
  }
};

DType dtype_of(const Case& c) { return DType(int(c.i64("dtype"))); }

// A launcher's error code (the fake runtime reports launch errors by aborting, so this is a
// cudaSuccess check of the code path the extension takes).
void check(cudaError_t e) {
  if (e != cudaSuccess) throw std::runtime_error("launcher returned CUDA error " + std::to_string(e));
}

// q: L layers of [B, Hq, T, D] (contiguous, concatenated); k: L layers of [B, Hkv, N, D], or of
// [B, N, Hkv, D] storage (kt = 1: a transposed view, as k.transpose(1, 2) of that).
struct ScoreInputs {
  int64_t L, B, Hq, Hkv, T, D, N;
  int es;
  Buf q, k, q_pos, modality;
};

ScoreInputs read_score_inputs(const Case& c) {
  ScoreInputs in{c.i64("L"), c.i64("B"), c.i64("Hq"), c.i64("Hkv"), c.i64("T"), c.i64("D"), c.i64("N"),
                 dtype_size(dtype_of(c)), Buf(), Buf(), Buf(), Buf()};
  in.q = c.read("q", size_t(in.L * in.B * in.Hq * in.T * in.D) * in.es);
  in.k = c.read("k", size_t(in.L * in.B * in.Hkv * in.N * in.D) * in.es);
  in.q_pos = c.read("q_pos", size_t(in.B * in.T) * 8);
  in.modality = c.read("modality", size_t(in.B * in.N));
  return in;
}

// Fills the per-layer views of layers [l0, l0 + p.L) as the .cu glue does (view4 + vec16_ok).
void set_score_views(score::Params& p, const ScoreInputs& in, int64_t l0, bool kt, bool novec) {
  const int64_t qn = in.B * in.Hq * in.T * in.D, kn = in.B * in.Hkv * in.N * in.D;
  p.vec_q = p.vec_k = !novec;
  for (int i = 0; i < p.L; ++i) {
    const char* qb = in.q.data() + size_t(l0 + i) * qn * in.es;
    const char* kb = in.k.data() + size_t(l0 + i) * kn * in.es;
    p.q[i] = View4{qb, in.Hq * in.T * in.D, in.T * in.D, in.D, 1};
    p.k[i] = kt ? View4{kb, in.N * in.Hkv * in.D, in.D, in.Hkv * in.D, 1}
                : View4{kb, in.Hkv * in.N * in.D, in.N * in.D, in.D, 1};
    p.vec_q = p.vec_q && vec16_ok(p.q[i], p.D, in.es);
    p.vec_k = p.vec_k && vec16_ok(p.k[i], p.D, in.es);
  }
}

// Scores [L, B, N] and stats [L, B, 2] of all layers, in groups of kMaxLayers (evict_cuda).
void run_scores(const Case& c, const ScoreInputs& in, float* scores, float* stats) {
  const bool kt = c.i64("kt", 0) != 0, novec = c.i64("novec", 0) != 0;
  score::Params p{};
  p.B = int(in.B);
  p.Hq = int(in.Hq);
  p.Hkv = int(in.Hkv);
  p.T = int(in.T);
  p.D = int(in.D);
  p.N = in.N;
  p.scale = float(c.num("scale"));
  p.q_pos = in.q_pos.as<int64_t>();
  p.modality = in.modality.as<int8_t>();
  p.L = int(std::min<int64_t>(kMaxLayers, in.L));
  Buf ws(score::plan(p, nullptr), 0x7f);  // poisoned: every workspace entry is written first
  for (int64_t l0 = 0; l0 < in.L; l0 += kMaxLayers) {
    p.L = int(std::min<int64_t>(kMaxLayers, in.L - l0));
    score::plan(p, ws.data());
    set_score_views(p, in, l0, kt, novec);
    p.scores = scores + l0 * in.B * in.N;
    p.stats = stats + l0 * in.B * 2;
    check(launch_score(p, dtype_of(c), nullptr));
  }
}

void op_score(const Case& c) {
  const ScoreInputs in = read_score_inputs(c);
  std::vector<float> scores(size_t(in.L * in.B * in.N), -7.f), stats(size_t(in.L * in.B * 2), -7.f);
  run_scores(c, in, scores.data(), stats.data());
  c.write("scores", scores.data(), scores.size() * 4);
  c.write("stats", stats.data(), stats.size() * 4);
}

// ---------------------------------------------------------------------------------------------
// text_score="all_queries": launch_text_mass as run_text_mass (csrc/cuda/glue.cuh) runs it after
// launch_score. q: L layers of [B, Hq, N, D] full query states; k as for "score" (kt, novec);
// scores.bin [L, B, N]: the scores it starts from (only the text slots are overwritten).
// ---------------------------------------------------------------------------------------------
void op_textmass(const Case& c) {
  const int64_t L = c.i64("L"), B = c.i64("B"), Hq = c.i64("Hq"), Hkv = c.i64("Hkv"),
                D = c.i64("D"), N = c.i64("N");
  const int es = dtype_size(dtype_of(c));
  const bool kt = c.i64("kt", 0) != 0, novec = c.i64("novec", 0) != 0;
  const Buf q = c.read("q", size_t(L * B * Hq * N * D) * es);
  const Buf k = c.read("k", size_t(L * B * Hkv * N * D) * es);
  const Buf modality = c.read("modality", size_t(B * N));
  const Buf s_in = c.read("scores", size_t(L * B * N) * 4);
  std::vector<float> scores(size_t(L * B * N));
  std::memcpy(scores.data(), s_in.data(), s_in.n);
  // text slots ascending then -1 (the glue's text_slots())
  std::vector<int64_t> ts(size_t(B * N), -1);
  const int8_t* mod = modality.as<int8_t>();
  for (int64_t b = 0; b < B; ++b) {
    int64_t n = 0;
    for (int64_t j = 0; j < N; ++j)
      if (mod[b * N + j] == tgvkv::kText) ts[size_t(b * N + n++)] = j;
  }
  textmass::Params p{};
  p.B = int(B);
  p.Hq = int(Hq);
  p.Hkv = int(Hkv);
  p.D = int(D);
  p.N = N;
  p.scale = float(c.num("scale"));
  p.modality = mod;
  p.text_slots = ts.data();
  p.L = int(std::min<int64_t>(kMaxLayers, L));
  Buf ws(textmass::plan(p, nullptr), 0x7f);  // poisoned: every entry read is written first
  const int64_t qn = B * Hq * N * D, kn = B * Hkv * N * D;
  for (int64_t l0 = 0; l0 < L; l0 += kMaxLayers) {
    p.L = int(std::min<int64_t>(kMaxLayers, L - l0));
    textmass::plan(p, ws.data());
    p.vec_q = p.vec_k = !novec;
    for (int i = 0; i < p.L; ++i) {
      const char* qb = q.data() + size_t(l0 + i) * qn * es;
      const char* kb = k.data() + size_t(l0 + i) * kn * es;
      p.q[i] = View4{qb, Hq * N * D, N * D, D, 1};
      p.k[i] = kt ? View4{kb, N * Hkv * D, D, Hkv * D, 1} : View4{kb, Hkv * N * D, N * D, D, 1};
      p.vec_q = p.vec_q && vec16_ok(p.q[i], p.D, es);
      p.vec_k = p.vec_k && vec16_ok(p.k[i], p.D, es);
    }
    p.scores = scores.data() + l0 * B * N;
    check(launch_text_mass(p, dtype_of(c), nullptr));
  }
  c.write("scores", scores.data(), scores.size() * 4);
}

// ---------------------------------------------------------------------------------------------
// Budgets and selection (csrc/cuda/select_keep.cu, layer_budgets.cu)
// ---------------------------------------------------------------------------------------------
select::Params select_params(const Case& c, const Buf& q_pos, const Buf& modality) {
  select::Params p{};
  p.L = int(c.i64("L"));
  p.B = int(c.i64("B"));
  p.T = int(c.i64("T"));
  p.N = c.i64("N");
  p.n_sink = c.i64("n_sink");
  p.keep_ratio = c.has("keep_ratio") ? c.num("keep_ratio") : 1.0;
  p.budget_mode = int(c.i64("mode", 0));
  p.redistribute = c.i64("redistribute", 0) != 0;
  p.q_pos = q_pos.as<int64_t>();
  p.modality = modality.as<int8_t>();
  return p;
}

void op_budgets(const Case& c) {
  const int64_t L = c.i64("L"), B = c.i64("B"), T = c.i64("T"), N = c.i64("N");
  const Buf q_pos = c.read("q_pos", size_t(B * T) * 8), mod = c.read("modality", size_t(B * N));
  const Buf stats = c.read("stats", size_t(L * B * 2) * 4);
  select::Params p = select_params(c, q_pos, mod);
  std::vector<int64_t> keep(size_t(L * B), -7);
  std::vector<double> frac(size_t(L * B), -7);
  p.stats = stats.as<float>();
  p.keep_out = keep.data();
  p.keep_fraction = frac.data();
  check(launch_budgets(p, nullptr));
  c.write("keep", keep.data(), keep.size() * 8);
  c.write("keep_fraction", frac.data(), frac.size() * 8);
}

void op_select(const Case& c) {
  const int64_t L = c.i64("L"), B = c.i64("B"), T = c.i64("T"), N = c.i64("N");
  const Buf q_pos = c.read("q_pos", size_t(B * T) * 8), mod = c.read("modality", size_t(B * N));
  const Buf scores = c.read("scores", size_t(L * B * N) * 4), keep = c.read("keep", size_t(L * B) * 8);
  select::Params p = select_params(c, q_pos, mod);
  std::vector<int64_t> idx(size_t(L * B * N), -7), nprot(size_t(L * B), -7);
  p.scores = scores.as<float>();
  p.keep = keep.as<int64_t>();
  p.keep_idx = idx.data();
  p.n_protected = nprot.data();
  check(launch_select(p, nullptr));
  c.write("keep_idx", idx.data(), idx.size() * 8);
  c.write("n_protected", nprot.data(), nprot.size() * 8);
}

// ---------------------------------------------------------------------------------------------
// Compaction: launch_compact's use by compact_cuda / evict_tail (csrc/cuda/compact.cu, evict.cu)
// ---------------------------------------------------------------------------------------------
// k / v: L layers of [B, H, N, D] (kt = 1: of [B, N, H, D] storage), concatenated; compacted in
// place in groups of kMaxLayers; n_kept_in: [L, B] or nullptr (then n_kept_out [L, B] is filled).
void run_compact(const Case& c, int64_t L, int64_t B, int64_t H, int64_t N, Buf& k, Buf& v,
                 const int64_t* keep_idx, const int64_t* n_kept_in, int64_t* n_kept_out) {
  const int64_t Dk = c.i64("Dk"), Dv = c.i64("Dv"), es = dtype_size(dtype_of(c));
  const bool kt = c.i64("kt", 0) != 0;
  const int sms = int(c.i64("sms", 132));
  if (B == 0) return;
  for (int64_t l0 = 0; l0 < L; l0 += kMaxLayers) {
    const int n = int(std::min<int64_t>(kMaxLayers, L - l0));
    compact::Params p{};
    p.B = int(B);
    p.H = int(H > 0 ? H : 1);
    p.N = N;
    p.keep_idx = keep_idx + l0 * B * N;
    p.n_kept_in = n_kept_in ? n_kept_in + l0 * B : nullptr;
    p.n_kept_out = n_kept_in ? nullptr : n_kept_out + l0 * B;
    compact::Layer layers[kMaxLayers];
    for (int i = 0; i < n; ++i) {
      char* kb = k.data() + size_t((l0 + i) * B * H * N * Dk * es);
      char* vb = v.data() + size_t((l0 + i) * B * H * N * Dv * es);
      auto strides = [&](int64_t D, int64_t* s) {
        s[0] = H * N * D;
        s[1] = kt ? D : N * D;
        s[2] = kt ? H * D : D;
      };
      layers[i] = compact::Layer{kb, {}, es, H > 0 ? Dk : 0, vb, {}, es, H > 0 ? Dv : 0};
      strides(Dk, layers[i].ks);
      strides(Dv, layers[i].vs);
    }
    const int ub = compact::plan(p, layers, n, sms);
    check(launch_compact(p, ub, nullptr));
  }
}

void op_compact(const Case& c) {
  const int64_t L = c.i64("L", 1), B = c.i64("B"), H = c.i64("H"), N = c.i64("N");
  const int64_t es = dtype_size(dtype_of(c));
  Buf k = c.read("k", size_t(L * B * H * N * c.i64("Dk") * es));
  Buf v = c.read("v", size_t(L * B * H * N * c.i64("Dv") * es));
  const Buf idx = c.read("keep_idx", size_t(L * B * N) * 8);
  std::vector<int64_t> n_kept(size_t(L * B), -7);
  run_compact(c, L, B, H, N, k, v, idx.as<int64_t>(), nullptr, n_kept.data());
  c.write("k", k.data(), k.n);
  c.write("v", v.data(), v.n);
  c.write("n_kept", n_kept.data(), n_kept.size() * 8);
}

// ---------------------------------------------------------------------------------------------
// evict / evict_from_scores (csrc/cuda/evict.cu: evict_cuda + evict_tail)
//   from_scores = 0: scoring of q.bin / k.bin (zeros when keep_ratio >= 1), as evict;
//   from_scores = 1: scores.bin [L, B, N] and stats.bin [L, B, 2] given, as evict_from_scores;
// then budgets inside the selection blocks, and (cache = 1) the compaction of k.bin / v.bin
// (L layers of [B, Hkv, N, Dk|Dv], kt = 1: [B, N, Hkv, D] storage) with the selected n_kept.
// ---------------------------------------------------------------------------------------------
void op_evict(const Case& c) {
  const int64_t L = c.i64("L"), B = c.i64("B"), N = c.i64("N"), T = c.i64("T");
  const bool from_scores = c.i64("from_scores", 0) != 0, cache = c.i64("cache", 1) != 0;
  const double keep_ratio = c.num("keep_ratio");
  std::vector<float> scores(size_t(L * B * N), -7.f), stats(size_t(L * B * 2), -7.f);
  Buf q_pos, modality;
  if (from_scores) {
    q_pos = c.read("q_pos", size_t(B * T) * 8);
    modality = c.read("modality", size_t(B * N));
    const Buf s = c.read("scores", scores.size() * 4), t = c.read("stats", stats.size() * 4);
    std::memcpy(scores.data(), s.data(), s.n);
    std::memcpy(stats.data(), t.data(), t.n);
  } else {
    ScoreInputs in = read_score_inputs(c);
    if (L > 0 && B > 0) {
      if (keep_ratio >= 1.0) {  // nothing is evicted: the scores are not needed
        std::fill(scores.begin(), scores.end(), 0.f);
        std::fill(stats.begin(), stats.end(), 0.f);
      } else {
        run_scores(c, in, scores.data(), stats.data());
      }
    }
    q_pos = std::move(in.q_pos);
    modality = std::move(in.modality);
  }
  select::Params p = select_params(c, q_pos, modality);
  std::vector<int64_t> idx(size_t(L * B * N), -7), n_kept(size_t(L * B), -7), nprot(size_t(L * B), -7);
  std::vector<double> frac(size_t(L * B), -7);
  p.scores = scores.data();
  p.keep = nullptr;  // budgets in the block
  p.stats = stats.data();
  p.keep_idx = idx.data();
  p.n_protected = nprot.data();
  p.n_kept = n_kept.data();
  p.keep_fraction = frac.data();
  check(launch_select(p, nullptr));
  c.write("scores", scores.data(), scores.size() * 4);
  c.write("stats", stats.data(), stats.size() * 4);
  c.write("keep_idx", idx.data(), idx.size() * 8);
  c.write("n_kept", n_kept.data(), n_kept.size() * 8);
  c.write("n_protected", nprot.data(), nprot.size() * 8);
  c.write("keep_fraction", frac.data(), frac.size() * 8);
  if (cache) {
    const int64_t H = c.i64("Hkv"), es = dtype_size(dtype_of(c));
    Buf k = c.read("k", size_t(L * B * H * N * c.i64("Dk") * es));
    Buf v = c.read("v", size_t(L * B * H * N * c.i64("Dv") * es));
    run_compact(c, L, B, H, N, k, v, idx.data(), n_kept.data(), nullptr);
    c.write("k", k.data(), k.n);
    c.write("v", v.data(), v.n);
  }
}

// ---------------------------------------------------------------------------------------------
// decode_evict_ / decode_evict_layers_: the layer groups and workspaces of run_decode
// (decode_evict.cu). meta: L (default 1) layers of capacity S (one layer) or S0..S{L-1}; inputs
// k, v: the layers' [B, Hkv, S_l, D] concatenated; pos: [B, S_l] concatenated; length,
// keep_fraction, n_protected: [L, B]; q: [L, B, Hq, D]; n_seen: [B].
// ---------------------------------------------------------------------------------------------
void op_decode(const Case& c) {
  const int64_t L = c.i64("L", 1);
  const int64_t B = c.i64("B"), Hq = c.i64("Hq"), Hkv = c.i64("Hkv"), D = c.i64("D"), Dv = c.i64("Dv");
  const int64_t es = dtype_size(dtype_of(c));
  std::vector<int64_t> S(static_cast<size_t>(L));
  int64_t sum_s = 0;
  for (int64_t l = 0; l < L; ++l) {
    S[l] = L == 1 && c.has("S") ? c.i64("S") : c.i64("S" + std::to_string(l));
    sum_s += S[l];
  }
  Buf k = c.read("k", size_t(B * Hkv * sum_s * D * es)), v = c.read("v", size_t(B * Hkv * sum_s * Dv * es));
  Buf pos = c.read("pos", size_t(B * sum_s) * 8), length = c.read("length", size_t(L * B) * 8);
  const Buf q = c.read("q", size_t(L * B * Hq * D * es)), n_seen = c.read("n_seen", size_t(B) * 8),
            kf = c.read("keep_fraction", size_t(L * B) * 8), np = c.read("n_protected", size_t(L * B) * 8);
  std::vector<int64_t> evicted(size_t(L * B), -7);
  const size_t smem1 = decode::smem_bytes(Hq, D);
  std::vector<int64_t> off(static_cast<size_t>(L) + 1, 0);  // slot offset of each layer
  for (int64_t l = 0; l < L; ++l) off[l + 1] = off[l] + S[l];
  for (int64_t l0 = 0; l0 < L && B > 0; l0 += decode::kMaxLayers) {
    const int n = int(std::min<int64_t>(decode::kMaxLayers, L - l0));
    decode::Params p{};
    p.L = n;
    p.B = int(B);
    p.Hq = int(Hq);
    p.Hkv = int(Hkv);
    p.D = int(D);
    p.Dv = int(Dv);
    p.scale = float(c.num("scale"));
    p.n_sink = c.i64("n_sink");
    p.span = c.i64("span");  // kDecodeSpan of decode_evict.cu (smaller in tests: more splits)
    p.length = length.as<int64_t>() + l0 * B;
    p.ls0 = B;
    p.ls1 = 1;
    p.n_seen = n_seen.as<int64_t>();
    p.keep_fraction = kf.as<double>() + l0 * B;
    p.n_protected = np.as<int64_t>() + l0 * B;
    p.evicted = evicted.data() + l0 * B;
    for (int i = 0; i < n; ++i) {
      const int64_t l = l0 + i, Sl = S[l];
      decode::Layer& ly = p.layers[i];
      ly.k = k.data() + size_t(B * Hkv * off[l] * D * es);
      ly.ks0 = Hkv * Sl * D; ly.ks1 = Sl * D; ly.ks2 = D; ly.ks3 = 1;
      ly.v = v.data() + size_t(B * Hkv * off[l] * Dv * es);
      ly.vs0 = Hkv * Sl * Dv; ly.vs1 = Sl * Dv; ly.vs2 = Dv; ly.vs3 = 1;
      ly.pos = pos.as<int64_t>() + B * off[l];
      ly.ps0 = Sl; ly.ps1 = 1;
      ly.q = q.data() + size_t(l * B * Hq * D * es);
      ly.S = Sl;
    }
    Buf ws(decode::plan(p, nullptr), 0x7f);
    decode::plan(p, ws.data());
    check(launch_decode(p, dtype_of(c), smem1, nullptr));
  }
  c.write("k", k.data(), k.n);
  c.write("v", v.data(), v.n);
  c.write("pos", pos.data(), pos.n);
  c.write("length", length.data(), length.n);
  c.write("evicted", evicted.data(), evicted.size() * 8);
}

// ---------------------------------------------------------------------------------------------
// decode_append_ (decode_append_cuda of decode_evict.cu). meta: B Hkv S D Dv M position; inputs
// k [B, Hkv, S, D], v [B, Hkv, S, Dv], k_new [B, Hkv, 1, D], v_new, pos [B, S], length [B],
// mask [B, M] (one byte per bool), all contiguous.
// ---------------------------------------------------------------------------------------------
void op_append(const Case& c) {
  const int64_t B = c.i64("B"), H = c.i64("Hkv"), S = c.i64("S"), D = c.i64("D"), Dv = c.i64("Dv"),
                M = c.i64("M");
  const int64_t es = dtype_size(dtype_of(c));
  Buf k = c.read("k", size_t(B * H * S * D * es)), v = c.read("v", size_t(B * H * S * Dv * es));
  const Buf kn = c.read("k_new", size_t(B * H * D * es)), vn = c.read("v_new", size_t(B * H * Dv * es));
  Buf pos = c.read("pos", size_t(B * S) * 8), length = c.read("length", size_t(B) * 8),
      mask = c.read("mask", size_t(B * M));
  append::Params p{};
  p.B = int(B); p.Hkv = int(H); p.D = int(D); p.Dv = int(Dv); p.S = S; p.M = M;
  p.k = k.data(); p.ks0 = H * S * D; p.ks1 = S * D; p.ks2 = D; p.ks3 = 1;
  p.v = v.data(); p.vs0 = H * S * Dv; p.vs1 = S * Dv; p.vs2 = Dv; p.vs3 = 1;
  p.k_new = kn.data(); p.kn0 = H * D; p.kn1 = D; p.kn3 = 1;
  p.v_new = vn.data(); p.vn0 = H * Dv; p.vn1 = Dv; p.vn3 = 1;
  p.pos = pos.as<int64_t>(); p.ps0 = S; p.ps1 = 1;
  p.length = length.as<int64_t>(); p.ls0 = 1;
  p.mask = reinterpret_cast<bool*>(mask.data()); p.ms0 = M; p.ms1 = 1;
  p.position = c.i64("position");
  check(launch_append(p, int(es), nullptr));
  c.write("k", k.data(), k.n);
  c.write("v", v.data(), v.n);
  c.write("pos", pos.data(), pos.n);
  c.write("length", length.data(), length.n);
  c.write("mask", mask.data(), mask.n);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s score|textmass|budgets|select|evict|compact|decode|append <case dir>\n", argv[0]);
    return 2;
  }
  const std::string op = argv[1];
  try {
    const Case c(argv[2]);
    if (op == "score") op_score(c);
    else if (op == "textmass") op_textmass(c);
    else if (op == "budgets") op_budgets(c);
    else if (op == "select") op_select(c);
    else if (op == "evict") op_evict(c);
    else if (op == "compact") op_compact(c);
    else if (op == "decode") op_decode(c);
    else if (op == "append") op_append(c);
    else throw std::runtime_error("unknown op '" + op + "'");
  } catch (const std::exception& e) {
    std::fprintf(stderr, "emu %s: %s\n", op.c_str(), e.what());
    return 1;
  }
  return 0;
}
