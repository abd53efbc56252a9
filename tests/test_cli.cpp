// The `grove` command-line tool, run as a separate process on checkpoints written here, against
// an independent scalar reference of the Grove layer written in this file (docs/cli.md).
#include <doctest/doctest.h>

#include "support/test_support.hpp"

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <optional>
#include <string>
#include <vector>


#include <grove/io.hpp>
#include <grove/simd/arch.hpp>

#ifndef GROVE_CLI_PATH
#error "tests/test_cli.cpp needs the compile definition GROVE_CLI_PATH=\"<path of the grove binary>\""
#endif

namespace {

namespace fs = std::filesystem;
namespace io = grove::io;
using grove_test::temp_dir;


using grove_test::slurp;
using cli_result = grove_test::command_result;

/// Runs `grove <args>` with stdout and stderr captured in files of `dir`.
cli_result grove_cli(const temp_dir& dir, const std::string& args) {
  return grove_test::run_command(std::string("'") + GROVE_CLI_PATH + "' " + args, dir);
}

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

// ---- the reference: a Grove layer in plain loops, double precision ----

/// splitmix64, so the test data does not depend on the standard library.
class generator {
 public:
  explicit generator(std::uint64_t seed) : state_(seed) {}
  std::uint64_t next() {
    std::uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  /// An integer in [lo, hi].
  int between(int lo, int hi) { return lo + static_cast<int>(next() % static_cast<std::uint64_t>(hi - lo + 1)); }
  /// Uniform in [-1, 1).
  double uniform() { return static_cast<double>(next() >> 11) * 0x1p-52 - 1.0; }

 private:
  std::uint64_t state_;
};

struct mlp {
  std::vector<float> gate, up, down;  // [n, H], [n, H], [H, n]
};

struct ref_layer {
  int H = 24, E = 12, G = 3, I = 10, Ia = 6;
  std::vector<float> router;  // [E, H]
  std::vector<float> bias;    // [E], empty when absent
  std::vector<mlp> experts, adjugates;
};

/// Router entries are multiples of 1/16 in [-1, 1] and inputs multiples of 1/8 in [-2, 2], so
/// every logit is computed exactly in float and in double: selection compares the same numbers
/// on both sides, and the tie made below (experts 2 and 7 share router row and bias) is exact.
/// With `coarse`, expert weights are multiples of 1/128 as well (exact in BF16 and F16).
ref_layer make_layer(std::uint64_t seed, bool with_bias, bool coarse) {
  generator g(seed);
  ref_layer L;
  auto weight = [&] {
    return coarse ? static_cast<float>(g.between(-40, 40)) / 128.0f : static_cast<float>(0.35 * g.uniform());
  };
  auto fill = [&](int n) {
    std::vector<float> v(static_cast<std::size_t>(n));
    for (float& x : v) x = weight();
    return v;
  };
  L.router.resize(static_cast<std::size_t>(L.E * L.H));
  for (float& w : L.router) w = static_cast<float>(g.between(-16, 16)) / 16.0f;
  std::copy_n(L.router.begin() + 2 * L.H, L.H, L.router.begin() + 7 * L.H);
  if (with_bias) {
    for (int e = 0; e < L.E; ++e) L.bias.push_back(static_cast<float>(g.between(-12, 12)) / 64.0f);
    L.bias[7] = L.bias[2];
  }
  for (int e = 0; e < L.E; ++e) L.experts.push_back({fill(L.I * L.H), fill(L.I * L.H), fill(L.H * L.I)});
  for (int j = 0; j < L.G; ++j) L.adjugates.push_back({fill(L.Ia * L.H), fill(L.Ia * L.H), fill(L.H * L.Ia)});
  return L;
}

std::vector<float> make_input(std::uint64_t seed, int T, int H) {
  generator g(seed);
  std::vector<float> x(static_cast<std::size_t>(T * H));
  for (float& v : x) v = static_cast<float>(g.between(-16, 16)) / 8.0f;
  return x;
}

struct ref_output {
  std::vector<double> y, logits, weights;
  std::vector<int> ids;
};

/// down(silu(gate x) ⊙ up x) for an MLP of intermediate size n.
std::vector<double> swiglu(const mlp& m, int n, int H, const float* x) {
  std::vector<double> h(static_cast<std::size_t>(n));
  for (int i = 0; i < n; ++i) {
    double g = 0, u = 0;
    for (int c = 0; c < H; ++c) {
      g += double(m.gate[static_cast<std::size_t>(i * H + c)]) * x[c];
      u += double(m.up[static_cast<std::size_t>(i * H + c)]) * x[c];
    }
    h[static_cast<std::size_t>(i)] = g / (1.0 + std::exp(-g)) * u;
  }
  std::vector<double> out(static_cast<std::size_t>(H), 0.0);
  for (int r = 0; r < H; ++r)
    for (int i = 0; i < n; ++i) out[static_cast<std::size_t>(r)] += double(m.down[static_cast<std::size_t>(r * n + i)]) * h[static_cast<std::size_t>(i)];
  return out;
}

/// The Grove layer token by token (docs/math.md, forward steps 1-6).
/// With `check_ties`, near ties between float and double orderings fail the test (the data must
/// avoid them); finite differences turn it off and compare the picks instead.
ref_output reference(const ref_layer& L, const std::vector<float>& x, int T, int k, double lambda,
                     bool check_ties = true) {
  ref_output r;
  const int group_size = L.E / L.G;
  for (int t = 0; t < T; ++t) {
    const float* xt = &x[static_cast<std::size_t>(t * L.H)];
    std::vector<double> l(static_cast<std::size_t>(L.E)), score(static_cast<std::size_t>(L.E));
    for (int e = 0; e < L.E; ++e) {
      double s = 0;
      for (int c = 0; c < L.H; ++c) s += double(L.router[static_cast<std::size_t>(e * L.H + c)]) * xt[c];
      l[static_cast<std::size_t>(e)] = s;
      score[static_cast<std::size_t>(e)] =
          L.bias.empty() ? s : 1.0 / (1.0 + std::exp(-s)) + double(L.bias[static_cast<std::size_t>(e)]);
      r.logits.push_back(s);
    }
    // Selection: repeatedly the largest remaining score, the lower index on ties.
    std::vector<int> picks;
    std::vector<bool> taken(static_cast<std::size_t>(L.E), false);
    for (int s = 0; s < k; ++s) {
      int best = -1;
      for (int e = 0; e < L.E; ++e)
        if (!taken[static_cast<std::size_t>(e)] && (best < 0 || score[static_cast<std::size_t>(e)] > score[static_cast<std::size_t>(best)])) best = e;
      taken[static_cast<std::size_t>(best)] = true;
      picks.push_back(best);
    }
    // The test data must not hold near-ties that float and double could order differently.
    std::vector<double> sorted = score;
    std::sort(sorted.rbegin(), sorted.rend());
    for (int s = 0; check_ties && s + 1 < std::min(k + 1, L.E); ++s) {
      const double gap = sorted[static_cast<std::size_t>(s)] - sorted[static_cast<std::size_t>(s + 1)];
      REQUIRE_MESSAGE((gap == 0.0 || gap > 1e-5), "test data has a near tie at token " << t);
    }
    double top = l[static_cast<std::size_t>(picks[0])];
    for (int e : picks) top = std::max(top, l[static_cast<std::size_t>(e)]);
    std::vector<double> w;
    double sum = 0;
    for (int e : picks) sum += w.emplace_back(std::exp(l[static_cast<std::size_t>(e)] - top));
    for (double& v : w) v /= sum;

    std::vector<double> y(static_cast<std::size_t>(L.H), 0.0);
    std::vector<double> c(static_cast<std::size_t>(L.G), 0.0);
    std::vector<bool> touched(static_cast<std::size_t>(L.G), false);
    for (int s = 0; s < k; ++s) {
      const int e = picks[static_cast<std::size_t>(s)];
      const auto out = swiglu(L.experts[static_cast<std::size_t>(e)], L.I, L.H, xt);
      for (int h = 0; h < L.H; ++h) y[static_cast<std::size_t>(h)] += w[static_cast<std::size_t>(s)] * out[static_cast<std::size_t>(h)];
      c[static_cast<std::size_t>(e / group_size)] += w[static_cast<std::size_t>(s)];
      touched[static_cast<std::size_t>(e / group_size)] = true;
    }
    for (int j = 0; j < L.G; ++j) {  // each touched group's adjugate once, weighted λ·c_j
      if (!touched[static_cast<std::size_t>(j)]) continue;
      const auto out = swiglu(L.adjugates[static_cast<std::size_t>(j)], L.Ia, L.H, xt);
      for (int h = 0; h < L.H; ++h) y[static_cast<std::size_t>(h)] += lambda * c[static_cast<std::size_t>(j)] * out[static_cast<std::size_t>(h)];
    }
    r.y.insert(r.y.end(), y.begin(), y.end());
    r.ids.insert(r.ids.end(), picks.begin(), picks.end());
    r.weights.insert(r.weights.end(), w.begin(), w.end());
  }
  return r;
}

// ---- checkpoints and inputs ----

/// The layer's tensors under `prefix`, with the names spelled out here.
/// Without `adjugates`, a plain MoE layer (router, experts, bias).
void add_layer_tensors(io::safetensors_writer& w, const ref_layer& L, const std::string& prefix, io::dtype stored,
                       bool adjugates = true) {
  auto add = [&](const std::string& name, std::int64_t rows, std::int64_t cols, const std::vector<float>& v) {
    w.add(prefix + "." + name, {rows, cols}, v, stored);
  };
  add("gate.weight", L.E, L.H, L.router);
  for (int e = 0; e < L.E; ++e) {
    const std::string p = "experts." + std::to_string(e) + ".";
    add(p + "gate_proj.weight", L.I, L.H, L.experts[static_cast<std::size_t>(e)].gate);
    add(p + "up_proj.weight", L.I, L.H, L.experts[static_cast<std::size_t>(e)].up);
    add(p + "down_proj.weight", L.H, L.I, L.experts[static_cast<std::size_t>(e)].down);
  }
  for (int j = 0; adjugates && j < L.G; ++j) {
    const std::string p = "chunk_experts." + std::to_string(j) + ".";
    add(p + "gate_proj.weight", L.Ia, L.H, L.adjugates[static_cast<std::size_t>(j)].gate);
    add(p + "up_proj.weight", L.Ia, L.H, L.adjugates[static_cast<std::size_t>(j)].up);
    add(p + "down_proj.weight", L.H, L.Ia, L.adjugates[static_cast<std::size_t>(j)].down);
  }
  if (!L.bias.empty()) w.add(prefix + ".expert_bias", {L.E}, L.bias, stored);
}

/// Writes layer L under `prefix` to its own file at `path`, stored as `stored`.
void write_layer(const std::string& path, const ref_layer& L, const std::string& prefix, io::dtype stored) {
  io::safetensors_writer w;
  add_layer_tensors(w, L, prefix, stored);
  w.write(path);
}

void write_input(const std::string& path, const std::vector<float>& x, int T, int H, io::dtype stored) {
  io::safetensors_writer w;
  w.add("x", {T, H}, x, stored);
  w.write(path);
}

void check_close(const std::vector<float>& actual, const std::vector<double>& expected, double relative,
                 const char* what) {
  REQUIRE(actual.size() == expected.size());
  double scale = 0;
  for (double v : expected) scale = std::max(scale, std::fabs(v));
  for (std::size_t i = 0; i < actual.size(); ++i) {
    // The floor, 5% of the largest value times `relative` (8 fp32 ulps of it at 1e-5), covers the
    // rounding of sums that cancel down to a small value.
    const double tolerance = relative * (std::fabs(expected[i]) + 0.05 * scale) + 1e-30;
    if (!(std::fabs(double(actual[i]) - expected[i]) <= tolerance))
      FAIL(std::string(what) << "[" << i << "] = " << actual[i] << " but the reference gives " << expected[i]
                             << " (tolerance " << tolerance << ", largest |value| " << scale << ")");
  }
}

/// Runs the checks of one `grove run` output against the reference.
void check_output(const std::string& path, const ref_layer& L, const std::vector<float>& x, int T, int k, double lambda) {
  const ref_output ref = reference(L, x, T, k, lambda);
  const io::safetensors_reader out(path);
  CHECK(out.at("y").type == io::dtype::f32);
  CHECK(out.at("router_logits").type == io::dtype::f32);
  CHECK(out.at("topk_ids").type == io::dtype::i32);
  CHECK(out.at("topk_weights").type == io::dtype::f32);
  CHECK(out.at("y").shape == io::tensor_shape{T, L.H});
  CHECK(out.at("router_logits").shape == io::tensor_shape{T, L.E});
  CHECK(out.at("topk_ids").shape == io::tensor_shape{T, k});
  CHECK(out.at("topk_weights").shape == io::tensor_shape{T, k});

  const auto ids = out.read<std::int32_t>("topk_ids").values;
  CHECK(std::vector<int>(ids.begin(), ids.end()) == ref.ids);
  check_close(out.read<float>("router_logits").values, ref.logits, 1e-6, "router_logits");
  check_close(out.read<float>("topk_weights").values, ref.weights, 1e-5, "topk_weights");
  check_close(out.read<float>("y").values, ref.y, 1e-5, "y");
}

/// How many tokens picked both experts 2 and 7 (the exact tie), and whether 2 always came first.
std::pair<int, bool> tie_order(const std::vector<int>& ids, int k) {
  int both = 0;
  bool lower_first = true;
  for (std::size_t t = 0; t * static_cast<std::size_t>(k) < ids.size(); ++t) {
    const auto begin = ids.begin() + static_cast<std::ptrdiff_t>(t * static_cast<std::size_t>(k));
    const auto two = std::find(begin, begin + k, 2);
    const auto seven = std::find(begin, begin + k, 7);
    if (two != begin + k && seven != begin + k) {
      ++both;
      lower_first = lower_first && two < seven;
    } else if (seven != begin + k) {
      lower_first = false;  // 7 picked without its equal-scored, lower-indexed twin
    }
  }
  return {both, lower_first};
}

constexpr int tokens = 11;

}  // namespace

TEST_CASE("cli: run on a single F32 file with a selection bias matches the reference") {
  temp_dir dir;
  const ref_layer L = make_layer(11, /*with_bias=*/true, /*coarse=*/false);
  write_layer(dir / "w.safetensors", L, "model.layers.0.mlp", io::dtype::f32);
  const auto x = make_input(12, tokens, L.H);
  write_input(dir / "in.safetensors", x, tokens, L.H, io::dtype::f32);

  const auto r = grove_cli(dir, "run --weights '" + dir / "w.safetensors" + "' --prefix model.layers.0.mlp --input '" +
                                    dir / "in.safetensors" + "' --output '" + dir / "out.safetensors" +
                                    "' --top-k 5 --scale 0.1");
  INFO(r.err);
  REQUIRE(r.code == 0);
  CHECK(r.err.empty());
  check_output(dir / "out.safetensors", L, x, tokens, 5, 0.1);

  const auto ids = io::safetensors_reader(dir / "out.safetensors").read<std::int32_t>("topk_ids").values;
  const auto [both, lower_first] = tie_order(std::vector<int>(ids.begin(), ids.end()), 5);
  CHECK(both > 0);  // the data exercises the tie
  CHECK(lower_first);
}

TEST_CASE("cli: run --threads and --isa choose the CPU runner; every choice matches the reference") {
  temp_dir dir;
  const ref_layer L = make_layer(13, /*with_bias=*/true, /*coarse=*/false);
  write_layer(dir / "w.safetensors", L, "model.layers.0.mlp", io::dtype::f32);
  const auto x = make_input(14, tokens, L.H);
  write_input(dir / "in.safetensors", x, tokens, L.H, io::dtype::f32);
  auto run = [&](const std::string& extra) {
    return grove_cli(dir, "run --weights '" + dir / "w.safetensors" + "' --prefix model.layers.0.mlp --input '" +
                              dir / "in.safetensors" + "' --output '" + dir / "out.safetensors" +
                              "' --top-k 5 --scale 0.1 " + extra);
  };
  for (const std::string& extra : {std::string("--threads 1 --isa scalar"), std::string("--threads 3"),
                                   std::string("--isa ") + grove::simd::isa_name(grove::simd::best_isa())}) {
    INFO(extra);
    const auto r = run(extra);
    INFO(r.err);
    REQUIRE(r.code == 0);
    check_output(dir / "out.safetensors", L, x, tokens, 5, 0.1);
    fs::remove(dir / "out.safetensors");
  }
  // Usage errors (exit 2): an unknown level, a thread count below 1.
  for (const std::string& extra : {std::string("--isa sse4"), std::string("--threads 0")}) {
    INFO(extra);
    const auto r = run(extra);
    CHECK(r.code == 2);
    CHECK(r.err.rfind("grove: ", 0) == 0);
    CHECK(!fs::exists(dir / "out.safetensors"));
  }
  // A level this CPU cannot run: a clear error (exit 1), no output.
  for (int level = 0; level < grove::simd::isa_count; ++level) {
    const auto isa = static_cast<grove::simd::isa>(level);
    if (grove::simd::supported(isa)) continue;
    const auto r = run(std::string("--isa ") + grove::simd::isa_name(isa));
    INFO(r.err);
    CHECK(r.code == 1);
    CHECK(contains(r.err, "does not support it"));
    CHECK(!fs::exists(dir / "out.safetensors"));
  }
}

TEST_CASE("cli: run on a sharded checkpoint, F16 input, config.json and overrides") {
  temp_dir dir;
  const ref_layer L0 = make_layer(21, true, false);
  const ref_layer L1 = make_layer(22, /*with_bias=*/false, false);
  // Layer 0 in shard 1; layer 1 split over shards 2 and 3 (experts >= 6 and adjugates in 3).
  const std::string ckpt = dir / "ckpt";
  fs::create_directories(ckpt);
  std::string index = R"({"metadata":{},"weight_map":{)";
  bool first = true;
  auto map = [&](const std::string& name, const char* shard) {
    if (!first) index += ",";
    index += "\"" + name + "\":\"" + shard + "\"";
    first = false;
  };
  io::safetensors_writer s1, s2, s3;
  add_layer_tensors(s1, L0, "model.layers.0.mlp", io::dtype::f32);
  s1.write(ckpt + "/model-00001-of-00003.safetensors");
  const io::safetensors_reader shard1(ckpt + "/model-00001-of-00003.safetensors");
  for (const io::tensor_entry& e : shard1.tensors())
    map(e.name, "model-00001-of-00003.safetensors");
  io::safetensors_writer staging;
  add_layer_tensors(staging, L1, "model.layers.1.mlp", io::dtype::f32);
  staging.write(dir / "staging.safetensors");
  const io::safetensors_reader layer1(dir / "staging.safetensors");
  for (const io::tensor_entry& e : layer1.tensors()) {
    const bool late = contains(e.name, "chunk_experts") ||
                      (contains(e.name, ".experts.") && std::stoi(e.name.substr(e.name.find(".experts.") + 9)) >= 6);
    const auto values = layer1.read<float>(e.name).values;
    (late ? s3 : s2).add(e.name, e.shape, values, io::dtype::f32);
    map(e.name, late ? "model-00003-of-00003.safetensors" : "model-00002-of-00003.safetensors");
  }
  index += "}}";
  s2.write(ckpt + "/model-00002-of-00003.safetensors");
  s3.write(ckpt + "/model-00003-of-00003.safetensors");
  {
    std::ofstream(ckpt + "/model.safetensors.index.json") << index;
    std::ofstream(ckpt + "/config.json") << R"({"hidden_size":24,"num_experts":12,"num_experts_per_tok":4,
        "num_experts_per_group":4,"moe_intermediate_size":10,"small_experts_intermediate_size":6,
        "small_experts_weight":0.2})";
  }

  const auto x = make_input(23, tokens, L1.H);
  write_input(dir / "in.safetensors", x, tokens, L1.H, io::dtype::f16);  // multiples of 1/8: exact in F16
  const std::string base = "run --weights '" + ckpt + "' --prefix model.layers.1.mlp --input '" + dir / "in.safetensors" +
                           "' --output '" + dir / "out.safetensors" + "' --config '" + ckpt + "/config.json'";

  SUBCASE("k and lambda from config.json") {
    const auto r = grove_cli(dir, base);
    INFO(r.err);
    REQUIRE(r.code == 0);
    check_output(dir / "out.safetensors", L1, x, tokens, 4, 0.2);
  }
  SUBCASE("explicit --top-k and --scale override config.json") {
    const auto r = grove_cli(dir, base + " --top-k 6 --scale 0.125");
    INFO(r.err);
    REQUIRE(r.code == 0);
    check_output(dir / "out.safetensors", L1, x, tokens, 6, 0.125);
  }
  SUBCASE("the other layer of the same checkpoint") {
    const auto r = grove_cli(dir, "run --weights '" + ckpt + "' --prefix model.layers.0.mlp --input '" +
                                      dir / "in.safetensors" + "' --output '" + dir / "out.safetensors" + "' --top-k 3");
    INFO(r.err);
    REQUIRE(r.code == 0);
    check_output(dir / "out.safetensors", L0, x, tokens, 3, 0.05);
  }
  SUBCASE("info") {
    const auto r = grove_cli(dir, "info --weights '" + ckpt + "' --prefix model.layers.1.mlp --config '" + ckpt +
                                      "/config.json'");
    INFO(r.err);
    REQUIRE(r.code == 0);
    CHECK(contains(r.out, "H = 24"));
    CHECK(contains(r.out, "E = 12"));
    CHECK(contains(r.out, "G = 3"));
    CHECK(contains(r.out, "group size = 4"));
    CHECK(contains(r.out, "I = 10"));
    CHECK(contains(r.out, "Ia = 6"));
    CHECK(contains(r.out, "k = 4"));
    CHECK(contains(r.out, "lambda = 0.2"));
    CHECK(contains(r.out, "expert_bias: absent"));
    CHECK(contains(r.out, "sharded"));
    // total = E·H + E·3·H·I + G·3·H·Ia; activated = E·H + k·3·H·I + n_g·3·H·Ia, n_g in [1, 3].
    const long total = 12 * 24 + 12 * 3 * 24 * 10 + 3 * 3 * 24 * 6;
    const long fewest = 12 * 24 + 4 * 3 * 24 * 10 + 1 * 3 * 24 * 6;
    const long most = 12 * 24 + 4 * 3 * 24 * 10 + 3 * 3 * 24 * 6;
    CHECK(contains(r.out, "total = " + std::to_string(total)));
    CHECK(contains(r.out, "activated per token = " + std::to_string(fewest) + " .. " + std::to_string(most)));
    CHECK(contains(r.out, "n_g = 1 .. 3"));
  }
  SUBCASE("info without config.json") {
    const auto r = grove_cli(dir, "info --weights '" + ckpt + "' --prefix model.layers.0.mlp");
    INFO(r.err);
    REQUIRE(r.code == 0);
    CHECK(contains(r.out, "k = unknown"));
    CHECK(contains(r.out, "expert_bias: present"));
  }
  SUBCASE("config.json that disagrees with the tensors") {
    std::ofstream(dir / "bad-config.json") << R"({"num_experts": 128, "num_experts_per_tok": 8})";
    const auto r = grove_cli(dir, "run --weights '" + ckpt + "' --prefix model.layers.1.mlp --input '" +
                                      dir / "in.safetensors" + "' --output '" + dir / "out.safetensors" +
                                      "' --config '" + dir / "bad-config.json" + "'");
    CHECK(r.code == 1);
    CHECK(r.err.rfind("grove: ", 0) == 0);
    CHECK(contains(r.err, "num_experts = 128 but the tensors have E = 12"));
    CHECK(!fs::exists(dir / "out.safetensors"));
  }
}

TEST_CASE("cli: run on BF16 weights and BF16 input with the default k and lambda") {
  temp_dir dir;
  const ref_layer L = make_layer(31, true, /*coarse=*/true);  // BF16-exact weights
  write_layer(dir / "bf16.safetensors", L, "blocks.2.moe", io::dtype::bf16);
  const auto x = make_input(32, tokens, L.H);
  write_input(dir / "in.safetensors", x, tokens, L.H, io::dtype::bf16);

  const auto r = grove_cli(dir, "run --weights '" + dir / "bf16.safetensors" + "' --prefix blocks.2.moe --input '" +
                                    dir / "in.safetensors" + "' --output '" + dir / "out.safetensors" + "'");
  INFO(r.err);
  REQUIRE(r.code == 0);
  check_output(dir / "out.safetensors", L, x, tokens, 8, 0.05);
}

TEST_CASE("cli: run --dtype bf16 keeps the weights in BF16, routes in fp32, and matches the reference") {
  temp_dir dir;
  const ref_layer L = make_layer(33, true, /*coarse=*/true);  // BF16-exact weights: both dtypes hold the same values
  write_layer(dir / "w.safetensors", L, "blocks.2.moe", io::dtype::f32);
  const auto x = make_input(34, tokens, L.H);
  write_input(dir / "in.safetensors", x, tokens, L.H, io::dtype::f32);
  auto run = [&](const std::string& out, const std::string& extra) {
    return grove_cli(dir, "run --weights '" + dir / "w.safetensors" + "' --prefix blocks.2.moe --input '" +
                              dir / "in.safetensors" + "' --output '" + dir / out + "' --top-k 5 --scale 0.1 " + extra);
  };
  const auto f32 = run("f32.safetensors", "--dtype f32");
  INFO(f32.err);
  REQUIRE(f32.code == 0);
  const auto b16 = run("bf16.safetensors", "--dtype bf16");
  INFO(b16.err);
  REQUIRE(b16.code == 0);
  check_output(dir / "f32.safetensors", L, x, tokens, 5, 0.1);

  // Routing is fp32 and the router the same values: logits, picks and weights are the same bits.
  const io::safetensors_reader a(dir / "f32.safetensors"), b(dir / "bf16.safetensors");
  CHECK(a.read<float>("router_logits").values == b.read<float>("router_logits").values);
  CHECK(a.read<std::int32_t>("topk_ids").values == b.read<std::int32_t>("topk_ids").values);
  CHECK(a.read<float>("topk_weights").values == b.read<float>("topk_weights").values);
  // y: the reference within bf16 activation rounding (the kernels may round x and h to bf16).
  const ref_output ref = reference(L, x, tokens, 5, 0.1);
  const auto y = b.read<float>("y").values;
  REQUIRE(y.size() == ref.y.size());
  double scale = 0, worst = 0;
  for (std::size_t i = 0; i < y.size(); ++i) {
    scale = std::max(scale, std::fabs(ref.y[i]));
    worst = std::max(worst, std::fabs(double(y[i]) - ref.y[i]));
  }
  CHECK(scale > 0);
  CHECK(worst <= 0.03 * scale);

  // --backward needs fp32 weights; an unknown dtype is a usage error.
  for (const std::string& extra : {std::string("--dtype bf16 --backward"), std::string("--dtype f16")}) {
    INFO(extra);
    const auto r = run("never.safetensors", extra);
    CHECK(r.code == 2);
    CHECK(r.err.rfind("grove: ", 0) == 0);
    CHECK(!fs::exists(dir / "never.safetensors"));
  }
}

TEST_CASE("cli: run --dtype q8 and q4 quantize at load, route in fp32, and stay near the reference") {
  temp_dir dir;
  const ref_layer L = make_layer(37, true, /*coarse=*/false);
  write_layer(dir / "w.safetensors", L, "blocks.2.moe", io::dtype::f32);
  const auto x = make_input(38, tokens, L.H);
  write_input(dir / "in.safetensors", x, tokens, L.H, io::dtype::f32);
  auto run = [&](const std::string& out, const std::string& extra) {
    return grove_cli(dir, "run --weights '" + dir / "w.safetensors" + "' --prefix blocks.2.moe --input '" +
                              dir / "in.safetensors" + "' --output '" + dir / out + "' --top-k 5 --scale 0.1 " + extra);
  };
  REQUIRE(run("f32.safetensors", "--dtype f32").code == 0);
  const ref_output ref = reference(L, x, tokens, 5, 0.1);
  // The relative error of y against the reference: q8 quantizes weights and activations to 8
  // bits (about 0.4% per value), q4 the weights to 4 bits (about 7%).
  for (const auto& format : {std::pair<std::string, double>{"q8", 0.03}, {"q4", 0.25}}) {
    const std::string& dtype = format.first;  // not a structured binding: clang 14 cannot capture one
    const double bound = format.second;
    INFO(dtype);
    const auto r = run(dtype + ".safetensors", "--dtype " + dtype);
    INFO(r.err);
    REQUIRE(r.code == 0);
    const io::safetensors_reader a(dir / "f32.safetensors"), b(dir / (dtype + ".safetensors"));
    // The router stays fp32: the same logits, picks and weights, to the bit.
    CHECK(a.read<float>("router_logits").values == b.read<float>("router_logits").values);
    CHECK(a.read<std::int32_t>("topk_ids").values == b.read<std::int32_t>("topk_ids").values);
    CHECK(a.read<float>("topk_weights").values == b.read<float>("topk_weights").values);
    const auto y = b.read<float>("y").values;
    REQUIRE(y.size() == ref.y.size());
    double error = 0, norm = 0;
    for (std::size_t i = 0; i < y.size(); ++i) {
      error += (double(y[i]) - ref.y[i]) * (double(y[i]) - ref.y[i]);
      norm += ref.y[i] * ref.y[i];
    }
    CHECK(norm > 0);
    CHECK(std::sqrt(error / norm) <= bound);
    CHECK(std::sqrt(error / norm) > 0);  // it is quantized, not the f32 layer again
    const auto backward = run("never.safetensors", "--dtype " + dtype + " --backward");
    CHECK(backward.code == 2);
    CHECK(contains(backward.err, "no backward for " + dtype));
    // Either kernel path on request: each as near the reference, and not the same bits (so the
    // option reaches the runner); auto is the default.
    std::vector<float> by_path[3];
    for (int p = 0; p < 3; ++p) {
      const std::string path = p == 0 ? "integer" : p == 1 ? "dequantized" : "auto";
      const auto forced = run(dtype + "-" + path + ".safetensors", "--dtype " + dtype + " --quantized-kernels " + path);
      INFO(forced.err);
      REQUIRE(forced.code == 0);
      by_path[p] = io::safetensors_reader(dir / (dtype + "-" + path + ".safetensors")).read<float>("y").values;
      REQUIRE(by_path[p].size() == ref.y.size());
      double e = 0;
      for (std::size_t i = 0; i < y.size(); ++i) e += (double(by_path[p][i]) - ref.y[i]) * (double(by_path[p][i]) - ref.y[i]);
      CHECK(std::sqrt(e / norm) <= bound);
    }
    CHECK(by_path[0] != by_path[1]);
    CHECK(y == by_path[2]);
  }
  // Usage errors (exit 2): an unknown path, and a path for weights that are not q8 or q4.
  for (const std::string& extra : {std::string("--dtype q8 --quantized-kernels fast"),
                                   std::string("--dtype bf16 --quantized-kernels integer")}) {
    INFO(extra);
    const auto r = run("never.safetensors", extra);
    CHECK(r.code == 2);
    CHECK(r.err.rfind("grove: ", 0) == 0);
  }
  // An f32 file without --dtype runs in f32: the option is an error there too (exit 1).
  const auto f32_file = run("never.safetensors", "--quantized-kernels dequantized");
  CHECK(f32_file.code == 1);
  CHECK(contains(f32_file.err, "--quantized-kernels chooses how q8 and q4 weights run"));
  CHECK(!fs::exists(dir / "never.safetensors"));
}

TEST_CASE("cli: quantize writes a layer in q8 and q4 that runs as quantizing at load does, bit for bit") {
  temp_dir dir;
  const ref_layer L = make_layer(39, true, /*coarse=*/false);
  write_layer(dir / "w.safetensors", L, "blocks.2.moe", io::dtype::bf16);  // a BF16 source, as released
  const auto x = make_input(40, tokens, L.H);
  write_input(dir / "in.safetensors", x, tokens, L.H, io::dtype::f32);
  const auto run = [&](const std::string& weights, const std::string& out, const std::string& extra) {
    return grove_cli(dir, "run --weights '" + dir / weights + "' --prefix blocks.2.moe --input '" + dir / "in.safetensors" +
                              "' --output '" + dir / out + "' --top-k 5 --scale 0.1 " + extra);
  };
  const auto blocks = [](long n) { return (n + 31) / 32; };
  for (const std::string dtype : {"q8", "q4"}) {
    INFO(dtype);
    const std::string file = dtype + ".safetensors";
    const auto q = grove_cli(dir, "quantize --weights '" + dir / "w.safetensors" + "' --prefix blocks.2.moe --dtype " +
                                      dtype + " --out '" + dir / file + "'");
    INFO(q.err);
    REQUIRE(q.code == 0);
    CHECK(contains(q.out, "grove: wrote '" + dir / file + "': Grove layer 'blocks.2.moe' in " + dtype));
    // The documented layout: values and scales per quantized tensor, the router and bias F32.
    const io::safetensors_reader r(dir / file);
    CHECK(r.metadata().at("grove_quantization") == dtype);
    const std::string p = "blocks.2.moe.experts.3.down_proj.";
    CHECK(!r.contains(p + "weight"));
    CHECK(r.at(p + "qweight").type == (dtype == "q8" ? io::dtype::i8 : io::dtype::u8));
    CHECK(r.at(p + "qweight").shape == io::tensor_shape{L.H, blocks(L.I) * (dtype == "q8" ? 32 : 16)});
    CHECK(r.at(p + "scales").type == io::dtype::f16);
    CHECK(r.at(p + "scales").shape == io::tensor_shape{L.H, blocks(L.I)});
    CHECK(r.at("blocks.2.moe.gate.weight").type == io::dtype::f32);
    CHECK(r.at("blocks.2.moe.expert_bias").type == io::dtype::f32);
    CHECK(r.tensors().size() == 2 + 2 * 3 * std::size_t(L.E + L.G));
    // Run from the file (in its own format by default), and quantizing the source at load: the
    // same blocks, so the same bytes out.
    const auto from_file = run(file, "from-" + file, "");
    INFO(from_file.err);
    REQUIRE(from_file.code == 0);
    const auto at_load = run("w.safetensors", "at-load-" + file, "--dtype " + dtype);
    REQUIRE(at_load.code == 0);
    CHECK(slurp(dir / ("from-" + file)) == slurp(dir / ("at-load-" + file)));
    // Other formats read it too (its values, exactly, then held as asked).
    CHECK(run(file, "f32-" + file, "--dtype f32").code == 0);
    const std::string other = dtype == "q8" ? "q4" : "q8";
    CHECK(run(file, "other-" + file, "--dtype " + other).code == 0);
    // info: the format and the memory of each.
    const auto info = grove_cli(dir, "info --weights '" + dir / file + "' --prefix blocks.2.moe");
    INFO(info.err);
    REQUIRE(info.code == 0);
    CHECK(contains(info.out, "weights dtype: F32, " + dtype));
    // Quantizing a quantized file, and refusing to write over the input.
    CHECK(grove_cli(dir, "quantize --weights '" + dir / file + "' --prefix blocks.2.moe --dtype q4 --out '" +
                             dir / ("again-" + file) + "'")
              .code == 0);
    const auto over = grove_cli(dir, "quantize --weights '" + dir / file + "' --prefix blocks.2.moe --dtype " + dtype +
                                         " --out '" + dir / file + "'");
    CHECK(over.code == 1);
    CHECK(contains(over.err, "is the same file as the checkpoint"));
  }
}

TEST_CASE("cli: corrupt or inconsistent quantized files get an error naming the tensor") {
  temp_dir dir;
  const ref_layer L = make_layer(43, true, false);
  write_layer(dir / "w.safetensors", L, "m", io::dtype::f32);
  write_input(dir / "in.safetensors", make_input(44, tokens, L.H), tokens, L.H, io::dtype::f32);
  REQUIRE(grove_cli(dir, "quantize --weights '" + dir / "w.safetensors" + "' --prefix m --dtype q8 --out '" +
                             dir / "q8.safetensors" + "'")
              .code == 0);
  const io::safetensors_reader good(dir / "q8.safetensors");
  // A copy of the good file with one change.
  const auto variant = [&](const std::string& file, const std::string& tag, const std::string& changed,
                           const io::tensor_shape& shape, std::vector<std::byte> bytes, io::dtype type) {
    io::safetensors_writer w;
    w.set_metadata("grove_quantization", tag);
    for (const auto& e : good.tensors()) {
      if (e.name == changed) {
        if (!bytes.empty()) w.add_bytes(e.name, type, shape, std::move(bytes));
        continue;
      }
      w.add_bytes(e.name, e.type, e.shape, good.read_bytes(e));
    }
    w.write(dir / file);
  };
  const std::string scales = "m.experts.1.up_proj.scales", values = "m.experts.2.down_proj.qweight";
  const io::tensor_entry& s = good.at(scales);
  const io::tensor_entry& v = good.at(values);
  variant("bad-scales.safetensors", "q8", scales, {s.shape[0], s.shape[1] + 1},
          std::vector<std::byte>(static_cast<std::size_t>(2 * s.shape[0] * (s.shape[1] + 1))), io::dtype::f16);
  variant("short.safetensors", "q8", values, {v.shape[0], v.shape[1] - 1},
          std::vector<std::byte>(static_cast<std::size_t>(v.shape[0] * (v.shape[1] - 1))), io::dtype::i8);
  variant("tag.safetensors", "q5", "", {}, {}, io::dtype::i8);
  variant("no-scales.safetensors", "q8", scales, {}, {}, io::dtype::f16);
  std::vector<std::byte> minus128 = good.read_bytes(v);
  minus128[5] = std::byte{0x80};
  variant("minus128.safetensors", "q8", values, v.shape, minus128, io::dtype::i8);
  const std::pair<std::string, std::string> cases[] = {
      {"bad-scales.safetensors", "quantized scales 'm.experts.1.up_proj.scales'"},
      {"short.safetensors", "wrong shape for quantized tensor 'm.experts.2.down_proj.qweight'"},
      {"tag.safetensors", "unknown quantization format 'q5'"},
      {"no-scales.safetensors", "missing tensor 'm.experts.1.up_proj.scales'"},
      {"minus128.safetensors", "'m.experts.2.down_proj.qweight'"},
  };
  for (const auto& c : cases) {
    const std::string& file = c.first;  // not a structured binding: clang 14 cannot capture one
    const std::string& message = c.second;
    INFO(file);
    const auto r = grove_cli(dir, "run --weights '" + dir / file + "' --prefix m --input '" + dir / "in.safetensors" +
                                      "' --output '" + dir / "out.safetensors" + "' --top-k 3");
    INFO(r.err);
    CHECK(r.code == 1);
    CHECK(contains(r.err, message));
    CHECK(!fs::exists(dir / "out.safetensors"));
    // info checks the same headers.
    if (file != "minus128.safetensors")
      CHECK(grove_cli(dir, "info --weights '" + dir / file + "' --prefix m").code == 1);
  }
}

TEST_CASE("cli: quantize without --prefix converts every layer of a checkpoint and copies the rest") {
  temp_dir dir;
  const ref_layer L = make_layer(45, true, false);
  fs::create_directories(dir / "ckpt");
  // Two shards: layer 0's MLP with an attention tensor and the embedding; layer 1's MLP.
  const std::vector<float> attention(static_cast<std::size_t>(L.H * L.H), 0.25f), embedding(static_cast<std::size_t>(7 * L.H), -1.5f);
  {
    io::safetensors_writer w;
    add_layer_tensors(w, L, "model.layers.0.mlp", io::dtype::bf16, true);
    w.add("model.layers.0.self_attn.q_proj.weight", {L.H, L.H}, attention, io::dtype::bf16);
    w.add("model.embed_tokens.weight", {7, L.H}, embedding, io::dtype::bf16);
    w.write(dir / "ckpt/a.safetensors");
  }
  {
    io::safetensors_writer w;
    add_layer_tensors(w, L, "model.layers.1.mlp", io::dtype::f32, true);
    w.write(dir / "ckpt/b.safetensors");
  }
  {
    std::string index = R"({"weight_map":{)";
    bool first = true;
    for (const char* shard : {"a.safetensors", "b.safetensors"}) {
      const io::safetensors_reader reader(dir / ("ckpt/" + std::string(shard)));
      for (const auto& e : reader.tensors()) {
        index += (first ? "\"" : ",\"") + e.name + "\":\"" + shard + "\"";
        first = false;
      }
    }
    std::ofstream(dir / "ckpt/model.safetensors.index.json") << index << "}}";
    std::ofstream(dir / "ckpt/config.json") << R"({"num_experts_per_tok": 3, "small_experts_weight": 0.1})";
  }
  const auto q = grove_cli(dir, "quantize --weights '" + dir / "ckpt" + "' --dtype q4 --out '" + dir / "q4" + "'");
  INFO(q.err);
  REQUIRE(q.code == 0);
  CHECK(contains(q.err, "grove: quantize: layer 1 of 2 ('model.layers.0.mlp')"));
  CHECK(contains(q.err, "grove: quantize: layer 2 of 2 ('model.layers.1.mlp')"));
  CHECK(contains(q.out, "2 Grove layer(s) in q4, 3 shard(s)"));
  CHECK(fs::exists(dir / "q4/config.json"));
  const io::checkpoint out(dir / "q4");
  // The other tensors, unchanged (dtype and bytes).
  const io::checkpoint in(dir / "ckpt");
  for (const std::string name : {"model.layers.0.self_attn.q_proj.weight", "model.embed_tokens.weight"}) {
    INFO(name);
    CHECK(out.entry(name).type == io::dtype::bf16);
    CHECK(out.read_bytes(name) == in.read_bytes(name));
  }
  // The attention tensor lies in its block's shard, with that block's Grove layer.
  CHECK(out.file_of("model.layers.0.self_attn.q_proj.weight") == out.file_of("model.layers.0.mlp.gate.weight"));
  // Each layer runs from the output as one layer quantized on its own would.
  write_input(dir / "in.safetensors", make_input(46, tokens, L.H), tokens, L.H, io::dtype::f32);
  for (const std::string layer : {"model.layers.0.mlp", "model.layers.1.mlp"}) {
    INFO(layer);
    const auto a = grove_cli(dir, "run --weights '" + dir / "q4" + "' --prefix " + layer + " --top-k 3 --scale 0.1 --input '" +
                                      dir / "in.safetensors" + "' --output '" + dir / "a.safetensors" + "'");
    INFO(a.err);
    REQUIRE(a.code == 0);
    const auto b = grove_cli(dir, "run --weights '" + dir / "ckpt" + "' --prefix " + layer + " --top-k 3 --scale 0.1 --input '" +
                                      dir / "in.safetensors" + "' --output '" + dir / "b.safetensors" + "' --dtype q4");
    REQUIRE(b.code == 0);
    CHECK(slurp(dir / "a.safetensors") == slurp(dir / "b.safetensors"));
  }
  // Never into the input, nor into a directory that holds something.
  CHECK(grove_cli(dir, "quantize --weights '" + dir / "ckpt" + "' --dtype q8 --out '" + dir / "ckpt" + "'").code == 1);
  const auto full = grove_cli(dir, "quantize --weights '" + dir / "ckpt" + "' --dtype q8 --out '" + dir / "q4" + "'");
  CHECK(full.code == 1);
  CHECK(contains(full.err, "exists and is not an empty directory"));
}

TEST_CASE("cli: info prints the memory of the weights in each format") {
  temp_dir dir;
  const ref_layer L = make_layer(35, true, false);
  write_layer(dir / "w.safetensors", L, "m", io::dtype::f32);
  const auto r = grove_cli(dir, "info --weights '" + dir / "w.safetensors" + "' --prefix m");
  INFO(r.err);
  REQUIRE(r.code == 0);
  // Written out from the sizes here: f32 holds every parameter and the bias in 4 bytes; bf16
  // holds the parameters in 2 bytes plus the fp32 router copy (E·H) and the fp32 bias (E).
  const long params = static_cast<long>(L.E) * L.H + 3L * L.E * L.H * L.I + 3L * L.G * L.H * L.Ia;
  CHECK(contains(r.out, "f32  = " + std::to_string(4 * (params + L.E)) + " bytes"));
  CHECK(contains(r.out, "bf16 = " + std::to_string(2 * params + 4L * (static_cast<long>(L.E) * L.H + L.E)) + " bytes"));
  // q8 and q4: every row in blocks of 32 values (34 and 18 bytes each), plus the fp32 router
  // copy and bias.
  const auto blocks = [](long n) { return (n + 31) / 32; };
  const long rows_of_h = static_cast<long>(L.E) + 2L * L.E * L.I + 2L * L.G * L.Ia;  // rows of H inputs
  const long block_rows = rows_of_h * blocks(L.H) + static_cast<long>(L.E) * L.H * blocks(L.I) +
                          static_cast<long>(L.G) * L.H * blocks(L.Ia);
  CHECK(contains(r.out, "q8   = " + std::to_string(34 * block_rows + 4L * (static_cast<long>(L.E) * L.H + L.E)) + " bytes"));
  CHECK(contains(r.out, "q4   = " + std::to_string(18 * block_rows + 4L * (static_cast<long>(L.E) * L.H + L.E)) + " bytes"));
}

TEST_CASE("cli: errors give a message and a non-zero exit, never a crash") {
  temp_dir dir;
  const ref_layer L = make_layer(41, true, false);
  write_layer(dir / "w.safetensors", L, "model.layers.0.mlp", io::dtype::f32);
  write_input(dir / "in.safetensors", make_input(42, 4, L.H), 4, L.H, io::dtype::f32);
  write_input(dir / "narrow.safetensors", make_input(43, 4, L.H - 1), 4, L.H - 1, io::dtype::f32);
  const std::string out = dir / "out.safetensors";
  auto run = [&](const std::string& weights, const std::string& prefix, const std::string& input,
                 const std::string& extra) {
    return grove_cli(dir, "run --weights '" + weights + "' --prefix " + prefix + " --input '" + input + "' --output '" +
                              out + "' " + extra);
  };
  auto expect_error = [&](const cli_result& r, const std::string& message) {
    INFO(r.err);
    CHECK(r.code == 1);
    CHECK(r.err.rfind("grove: ", 0) == 0);
    CHECK(contains(r.err, message));
    CHECK(!fs::exists(out));
  };
  const std::string weights = dir / "w.safetensors";
  const std::string input = dir / "in.safetensors";

  expect_error(run(dir / "missing.safetensors", "model.layers.0.mlp", input, ""), "does not exist");
  expect_error(run(dir.operator/("nodir") + "/", "model.layers.0.mlp", input, ""), "does not exist");
  expect_error(run(weights, "model.layers.5.mlp", input, ""), "missing tensor 'model.layers.5.mlp.gate.weight'");
  expect_error(run(weights, "model.layers.0.mlp", dir / "missing-input.safetensors", ""), "no such file");
  expect_error(run(weights, "model.layers.0.mlp", dir / "narrow.safetensors", ""),
               "tensor 'x' in '" + dir / "narrow.safetensors" + "' has shape [4, 23] but the layer needs [T, 24]");
  expect_error(run(weights, "model.layers.0.mlp", weights, ""), "has no tensor 'x'");
  expect_error(run(weights, "model.layers.0.mlp", input, "--top-k 13"), "exceeds the expert count E = 12");
  expect_error(run(weights, "model.layers.0.mlp", input, "--top-k 0"), "top-k must be at least 1");
  expect_error(run(weights, "model.layers.0.mlp", input, "--scale -1"), "must be finite and >= 0");
  {
    std::ofstream(dir / "garbage.safetensors") << "this is not a safetensors file at all";
    expect_error(run(dir / "garbage.safetensors", "model.layers.0.mlp", input, ""), "goes beyond the end of the file");
  }
  expect_error(run(weights, "model.layers.0.mlp", input, "--backward"), "has no tensor 'dy'");
  expect_error(grove_cli(dir, "info --weights '" + weights + "' --prefix model.mlp"), "missing tensor 'model.mlp.gate.weight'");

  // Usage errors: exit 2, a "grove: " message.
  for (const std::string& args : {std::string(""), std::string("run --weights '") + weights + "'", std::string("frobnicate"),
                                 std::string("run --weights a --prefix b --input c --output d --top-k many")}) {
    const auto r = grove_cli(dir, args);
    INFO(args);
    CHECK(r.code == 2);
    CHECK(r.err.rfind("grove: ", 0) == 0);
  }
  {
    const auto r = grove_cli(dir, "run --help");
    CHECK(r.code == 0);
    CHECK(contains(r.out, "--top-k"));
  }

  // lambda above G / E = 0.25 is allowed with a warning.
  {
    const auto r = run(weights, "model.layers.0.mlp", input, "--top-k 5 --scale 0.5");
    INFO(r.err);
    CHECK(r.code == 0);
    CHECK(r.err.rfind("grove: warning:", 0) == 0);
    CHECK(contains(r.err, "exceeds the paper's bound G / E = 0.25"));
    REQUIRE(fs::exists(out));
    check_output(out, L, make_input(42, 4, L.H), 4, 5, 0.5);
  }
}

// ---- backward and upcycling ----

namespace {

/// Every float weight of the reference layer with its checkpoint name relative to the prefix.
std::vector<std::pair<std::string, std::vector<float>*>> named_weights(ref_layer& L) {
  std::vector<std::pair<std::string, std::vector<float>*>> out{{"gate.weight", &L.router}};
  const char* proj[3] = {"gate_proj", "up_proj", "down_proj"};
  auto add = [&](const std::string& family, std::vector<mlp>& mlps) {
    for (std::size_t i = 0; i < mlps.size(); ++i) {
      std::vector<float>* parts[3] = {&mlps[i].gate, &mlps[i].up, &mlps[i].down};
      for (int p = 0; p < 3; ++p) out.emplace_back(family + "." + std::to_string(i) + "." + proj[p] + ".weight", parts[p]);
    }
  };
  add("experts", L.experts);
  add("chunk_experts", L.adjugates);
  return out;
}

/// L = <dy, y> of the reference, and the picks it made.
std::pair<double, std::vector<int>> loss(const ref_layer& L, const std::vector<float>& x, const std::vector<float>& dy,
                                         int T, int k, double lambda) {
  const ref_output r = reference(L, x, T, k, lambda, /*check_ties=*/false);
  double sum = 0;
  for (std::size_t i = 0; i < r.y.size(); ++i) sum += double(dy[i]) * r.y[i];
  return {sum, r.ids};
}

/// Central difference of the reference loss in one float entry `v`, with the steps actually
/// representable in float; nullopt when the perturbation changes the picks (the loss is not
/// differentiable across a change of selection).
template <class Loss>
std::optional<double> central_difference(float& v, Loss&& loss_of, const std::vector<int>& picks) {
  const float original = v;
  const float up = original + 0x1p-12f, down = original - 0x1p-12f;
  v = up;
  const auto [plus, plus_ids] = loss_of();
  v = down;
  const auto [minus, minus_ids] = loss_of();
  v = original;
  if (plus_ids != picks || minus_ids != picks) return std::nullopt;
  return (plus - minus) / (double(up) - double(down));
}

}  // namespace

TEST_CASE("cli: run --backward writes dx and every weight's gradient, matching finite differences") {
  temp_dir dir;
  ref_layer L = make_layer(51, /*with_bias=*/true, /*coarse=*/false);
  const int T = 5, k = 4;
  const double lambda = 0.2;
  write_layer(dir / "w.safetensors", L, "model.layers.3.mlp", io::dtype::f32);
  std::vector<float> x = make_input(52, T, L.H);
  std::vector<float> dy(static_cast<std::size_t>(T * L.H));
  generator g(53);
  for (float& v : dy) v = static_cast<float>(g.uniform());
  {
    io::safetensors_writer in;
    in.add("x", {T, L.H}, x, io::dtype::f32);
    in.add("dy", {T, L.H}, dy, io::dtype::f32);
    in.write(dir / "in.safetensors");
  }
  const auto r = grove_cli(dir, "run --weights '" + dir / "w.safetensors" + "' --prefix model.layers.3.mlp --input '" +
                                    dir / "in.safetensors" + "' --output '" + dir / "out.safetensors" +
                                    "' --top-k 4 --scale 0.2 --backward");
  INFO(r.err);
  REQUIRE(r.code == 0);
  check_output(dir / "out.safetensors", L, x, T, k, lambda);

  const io::safetensors_reader out(dir / "out.safetensors");
  const auto picks = reference(L, x, T, k, lambda).ids;
  auto loss_now = [&] { return loss(L, x, dy, T, k, lambda); };
  double scale = 0;
  auto check_entry = [&](const std::string& what, float actual, float& entry) {
    const auto fd = central_difference(entry, loss_now, picks);
    if (!fd) return false;
    INFO(what);
    CHECK(std::fabs(double(actual) - *fd) <= 2e-3 * std::fabs(*fd) + 1e-4 * scale);
    return true;
  };

  // dx: every entry.
  REQUIRE(out.contains("dx"));
  CHECK(out.at("dx").type == io::dtype::f32);
  CHECK(out.at("dx").shape == io::tensor_shape{T, L.H});
  const auto dx = out.read<float>("dx").values;
  for (float v : dx) scale = std::max(scale, double(std::fabs(v)));
  int checked = 0;
  for (std::size_t i = 0; i < dx.size(); ++i) checked += check_entry("dx[" + std::to_string(i) + "]", dx[i], x[i]);
  CHECK(checked >= int(dx.size()) * 3 / 4);  // the rest sit on exact logit ties (the data is on a 1/128 grid)

  // Every weight read except expert_bias has grad.<full name>, F32, its shape; sampled entries
  // agree with finite differences.
  CHECK(!out.contains("grad.model.layers.3.mlp.expert_bias"));
  const io::safetensors_reader weights_file(dir / "w.safetensors");
  for (auto& [name, values] : named_weights(L)) {
    const std::string grad = "grad.model.layers.3.mlp." + name;
    REQUIRE_MESSAGE(out.contains(grad), grad);
    CHECK(out.at(grad).type == io::dtype::f32);
    CHECK(out.at(grad).shape == weights_file.at("model.layers.3.mlp." + name).shape);
    const auto gv = out.read<float>(grad).values;
    REQUIRE(gv.size() == values->size());
    double tensor_scale = 0;
    for (float v : gv) tensor_scale = std::max(tensor_scale, double(std::fabs(v)));
    scale = std::max(tensor_scale, 1e-3);
    for (std::size_t i = 0; i < gv.size(); i += 1 + gv.size() / 7)
      check_entry(grad + "[" + std::to_string(i) + "]", gv[i], (*values)[i]);
  }
  // Output layout: nothing else besides the forward outputs, dx and the gradients.
  CHECK(out.tensors().size() == 4 + 1 + 1 + 3 * std::size_t(L.E + L.G));
}

TEST_CASE("cli: upcycle turns a plain MoE layer into a Grove layer with the same output") {
  temp_dir dir;
  const ref_layer L = make_layer(61, /*with_bias=*/true, /*coarse=*/false);
  {
    io::safetensors_writer w;
    add_layer_tensors(w, L, "model.layers.1.mlp", io::dtype::bf16, /*adjugates=*/false);
    w.write(dir / "plain.safetensors");
  }
  const std::string up = dir / "grove.safetensors";
  const auto r = grove_cli(dir, "upcycle --weights '" + dir / "plain.safetensors" +
                                    "' --prefix model.layers.1.mlp --groups 4 --adjugate-size 5 --out '" + up + "' --seed 9");
  INFO(r.err);
  REQUIRE(r.code == 0);

  const io::safetensors_reader grove_layer(up);
  const io::safetensors_reader plain(dir / "plain.safetensors");
  // Router, experts and bias are carried over exactly (BF16 -> F32 is exact).
  for (const auto& entry : plain.tensors()) {
    INFO(entry.name);
    REQUIRE(grove_layer.contains(entry.name));
    CHECK(grove_layer.read<float>(entry.name).values == plain.read<float>(entry.name).values);
  }
  // Adjugates: gate/up ~ N(0, 0.006^2), down exactly zero.
  double sum_sq = 0;
  std::size_t count = 0;
  for (int j = 0; j < 4; ++j) {
    const std::string p = "model.layers.1.mlp.chunk_experts." + std::to_string(j) + ".";
    CHECK(grove_layer.at(p + "gate_proj.weight").shape == io::tensor_shape{5, L.H});
    CHECK(grove_layer.at(p + "down_proj.weight").shape == io::tensor_shape{L.H, 5});
    for (const char* part : {"gate_proj.weight", "up_proj.weight"})
      for (float v : grove_layer.read<float>(p + part).values) {
        sum_sq += double(v) * v;
        ++count;
      }
    for (float v : grove_layer.read<float>(p + "down_proj.weight").values) CHECK(v == 0.0f);
  }
  const double stddev = std::sqrt(sum_sq / double(count));
  CHECK(stddev > 0.0054);
  CHECK(stddev < 0.0066);

  // The Grove layer's output equals the plain MoE's, bit for bit, whatever lambda.
  const auto x = make_input(62, tokens, L.H);
  write_input(dir / "in.safetensors", x, tokens, L.H, io::dtype::f32);
  auto run_with = [&](const std::string& scale, const std::string& output) {
    const auto result = grove_cli(dir, "run --weights '" + up + "' --prefix model.layers.1.mlp --input '" +
                                           dir / "in.safetensors" + "' --output '" + dir / output +
                                           "' --top-k 3 --scale " + scale);
    INFO(result.err);
    REQUIRE(result.code == 0);
    return io::safetensors_reader(dir / output).read<float>("y").values;
  };
  const auto y_plain = run_with("0", "plain-out.safetensors");
  const auto y_grove = run_with("0.3", "grove-out.safetensors");
  CHECK(y_plain == y_grove);
  // The plain MoE: the reference with λ = 0, on the weights as BF16 stored them.
  ref_layer reference_layer = L;
  for (auto& e : reference_layer.experts)
    for (auto* v : {&e.gate, &e.up, &e.down})
      for (float& f : *v) f = io::bf16_to_float(io::float_to_bf16(f));
  for (float& f : reference_layer.router) f = io::bf16_to_float(io::float_to_bf16(f));
  for (float& f : reference_layer.bias) f = io::bf16_to_float(io::float_to_bf16(f));
  check_close(y_grove, reference(reference_layer, x, tokens, 3, 0.0).y, 1e-5, "y");

  // Errors: G must divide E; a Grove layer is not upcycled twice.
  const auto bad = grove_cli(dir, "upcycle --weights '" + dir / "plain.safetensors" +
                                      "' --prefix model.layers.1.mlp --groups 5 --adjugate-size 5 --out '" + dir / "x.safetensors" + "'");
  CHECK(bad.code == 1);
  CHECK(contains(bad.err, "does not divide expert count E = 12"));
  const auto twice = grove_cli(dir, "upcycle --weights '" + up + "' --prefix model.layers.1.mlp --groups 4 --adjugate-size 5 --out '" +
                                        dir / "x.safetensors" + "'");
  CHECK(twice.code == 1);
  CHECK(contains(twice.err, "already has adjugate experts"));
  CHECK(!fs::exists(dir / "x.safetensors"));
}

// ---- hostile and huge inputs ----

TEST_CASE("cli: JSON nested a million levels deep gives a message, not a crash") {
  temp_dir dir;
  const ref_layer L = make_layer(71, true, false);
  write_layer(dir / "w.safetensors", L, "m", io::dtype::f32);
  write_input(dir / "in.safetensors", make_input(72, 2, L.H), 2, L.H, io::dtype::f32);
  const std::string deep = std::string(1'000'000, '[') + std::string(1'000'000, ']');
  {
    const std::string header = R"({"x":{"dtype":"F32","shape":)" + deep + R"(,"data_offsets":[0,0]}})";
    std::string bytes(8, '\0');
    for (int i = 0; i < 8; ++i) bytes[static_cast<std::size_t>(i)] = static_cast<char>((header.size() >> (8 * i)) & 0xFF);
    std::ofstream(dir / "deep.safetensors", std::ios::binary) << bytes << header;
    std::ofstream(dir / "config.json") << R"({"num_experts_per_tok":)" << deep << "}";
  }
  const std::string out = dir / "out.safetensors";
  // A header is read by events: its nesting is refused at the first level no header has
  // (a "shape" holding arrays); config.json is scanned for depth before it is parsed.
  for (const std::string& args :
       {"info --weights '" + dir / "deep.safetensors" + "' --prefix m",
        "run --weights '" + dir / "deep.safetensors" + "' --prefix m --input '" + dir / "in.safetensors" + "' --output '" + out + "'",
        "run --weights '" + dir / "w.safetensors" + "' --prefix m --input '" + dir / "deep.safetensors" + "' --output '" + out + "'",
        "run --weights '" + dir / "w.safetensors" + "' --prefix m --input '" + dir / "in.safetensors" + "' --output '" + out +
            "' --config '" + dir / "config.json" + "'",
        "info --weights '" + dir / "w.safetensors" + "' --prefix m --config '" + dir / "config.json" + "'"}) {
    const auto r = grove_cli(dir, args);
    INFO(args.substr(0, 120), r.err.substr(0, 400));
    CHECK(r.code == 1);
    CHECK(r.err.rfind("grove: ", 0) == 0);
    CHECK((contains(r.err, "config.json' nests arrays and objects deeper than 64 levels") ||
           contains(r.err, "deep.safetensors': tensor 'x': \"shape\" holds a non-integer (an array)")));
    CHECK(r.err.size() < 600);
    CHECK(!fs::exists(out));
  }
}

TEST_CASE("cli: sizes that overflow, and numbers out of range, are errors with a message") {
  temp_dir dir;
  const ref_layer L = make_layer(73, true, false);
  {
    io::safetensors_writer w;
    add_layer_tensors(w, L, "m", io::dtype::f32, /*adjugates=*/false);
    w.write(dir / "plain.safetensors");
  }
  write_layer(dir / "w.safetensors", L, "m", io::dtype::f32);
  write_input(dir / "in.safetensors", make_input(74, 2, L.H), 2, L.H, io::dtype::f32);
  const std::string out = dir / "out.safetensors";
  auto upcycle = [&](const std::string& extra) {
    return grove_cli(dir, "upcycle --weights '" + dir / "plain.safetensors" + "' --prefix m --out '" + out + "' " + extra);
  };
  auto run = [&](const std::string& extra) {
    return grove_cli(dir, "run --weights '" + dir / "w.safetensors" + "' --prefix m --input '" + dir / "in.safetensors" +
                              "' --output '" + out + "' " + extra);
  };
  {
    // G · 3 · H · Ia wrapped 64 bits in 0.1, and the write ran past a heap buffer.
    const auto r = upcycle("--groups 1 --adjugate-size 1537228672809129302");
    INFO(r.err);
    CHECK(r.code == 1);
    CHECK(contains(r.err, "grove: adjugate intermediate size Ia = 1537228672809129302 is too large"));
    CHECK(!fs::exists(out));
  }
  {
    // In the type's range, but no size: exit 1. (A size that fits but asks for terabytes,
    // --adjugate-size 2147483647, is the caller's request: "out of memory", or an abort under
    // AddressSanitizer, which does not throw bad_alloc; not tested here.)
    const auto r = upcycle("--groups 4 --adjugate-size -5");
    INFO(r.err);
    CHECK(r.code == 1);
    CHECK(contains(r.err, "grove: adjugate intermediate size Ia must be positive, got -5"));
    CHECK(!fs::exists(out));
  }
  // Out of the option's type: usage errors (exit 2) naming the option and the range.
  const std::vector<std::pair<cli_result, std::string>> usage_errors{
      {run("--top-k 99999999999999999999"), "--top-k"},
      {run("--top-k -99999999999999999999"), "--top-k"},
      {run("--scale 1e400"), "--scale"},
      {run("--threads 99999999999999999999"), "--threads"},
      {upcycle("--groups 99999999999999999999 --adjugate-size 2"), "--groups"},
      {upcycle("--groups 4 --adjugate-size 2 --seed -1"), "--seed"},
      {upcycle("--groups 4 --adjugate-size 18446744073709551616"), "--adjugate-size"}};
  for (const auto& usage_error : usage_errors) {
    const cli_result& r = usage_error.first;  // not a structured binding: clang 14 cannot capture one
    const std::string& option = usage_error.second;
    INFO(r.err);
    CHECK(r.code == 2);
    CHECK(r.err.rfind("grove: usage: " + option, 0) == 0);
    CHECK(!fs::exists(out));
  }
  CHECK(contains(run("--top-k 99999999999999999999").err,
                 "99999999999999999999 is out of range (an integer from -9223372036854775808 to 9223372036854775807)"));
  // Decimal, whatever the leading zeros: 010 is k = 10, not octal 8.
  {
    const auto r = run("--top-k 010");
    INFO(r.err, r.out);
    CHECK(r.code == 0);
    CHECK(contains(r.out, "(k = 10 from command line"));
  }
}

TEST_CASE("cli: an output that is one of the inputs is refused, through links too") {
  temp_dir dir;
  const ref_layer L = make_layer(75, true, false);
  write_layer(dir / "w.safetensors", L, "m", io::dtype::f32);
  write_input(dir / "in.safetensors", make_input(76, 3, L.H), 3, L.H, io::dtype::f32);
  std::ofstream(dir / "config.json") << R"({"num_experts_per_tok": 4})";
  {
    io::safetensors_writer w;
    add_layer_tensors(w, L, "m", io::dtype::f32, /*adjugates=*/false);
    w.write(dir / "plain.safetensors");
  }
  // A sharded copy: the layer in one shard, the index beside it.
  fs::create_directory(dir / "ckpt");
  fs::copy_file(dir / "w.safetensors", dir / "ckpt/model-00001-of-00001.safetensors");
  {
    std::string index = R"({"weight_map":{)";
    bool comma = false;
    const io::safetensors_reader layer_file(dir / "w.safetensors");
    for (const auto& e : layer_file.tensors()) {
      index += (comma ? ",\"" : "\"") + e.name + R"(":"model-00001-of-00001.safetensors")";
      comma = true;
    }
    std::ofstream(dir / "ckpt/model.safetensors.index.json") << index << "}}";
  }
  fs::create_hard_link(dir / "w.safetensors", dir / "hard-w.safetensors");
  fs::create_symlink(dir / "in.safetensors", dir / "link-in.safetensors");
  fs::create_hard_link(dir / "plain.safetensors", dir / "hard-plain.safetensors");
  fs::create_symlink(dir / "plain.safetensors", dir / "link-plain.safetensors");
  const std::string before_w = slurp(dir / "w.safetensors"), before_in = slurp(dir / "in.safetensors"),
                    before_plain = slurp(dir / "plain.safetensors"),
                    before_shard = slurp(dir / "ckpt/model-00001-of-00001.safetensors"),
                    before_config = slurp(dir / "config.json");

  auto run = [&](const std::string& weights, const std::string& output) {
    return grove_cli(dir, "run --weights '" + weights + "' --prefix m --input '" + dir / "in.safetensors" + "' --output '" +
                              output + "' --config '" + dir / "config.json" + "'");
  };
  auto refused = [&](const cli_result& r, const std::string& what) {
    INFO(r.err);
    CHECK(r.code == 1);
    CHECK(contains(r.err, "is the same file as " + what));
    CHECK(contains(r.err, "writing it would destroy that input"));
  };
  refused(run(dir / "w.safetensors", dir / "in.safetensors"), "the input (--input)");
  refused(run(dir / "w.safetensors", dir / "w.safetensors"), "the checkpoint (--weights)");
  refused(run(dir / "w.safetensors", dir / "hard-w.safetensors"), "the checkpoint (--weights)");
  refused(run(dir / "w.safetensors", dir / "link-in.safetensors"), "the input (--input)");
  refused(run(dir / "w.safetensors", dir / "config.json"), "the config (--config)");
  refused(run(dir / "ckpt", dir / "ckpt/model-00001-of-00001.safetensors"), "a file of the checkpoint (--weights)");
  refused(run(dir / "ckpt", dir / "ckpt/model.safetensors.index.json"), "a file of the checkpoint (--weights)");
  refused(run(dir / "ckpt", dir / "ckpt/./model-00001-of-00001.safetensors"), "a file of the checkpoint (--weights)");
  auto upcycle = [&](const std::string& output) {
    return grove_cli(dir, "upcycle --weights '" + dir / "plain.safetensors" + "' --prefix m --groups 4 --adjugate-size 2 --out '" +
                              output + "'");
  };
  refused(upcycle(dir / "plain.safetensors"), "the checkpoint (--weights)");
  refused(upcycle(dir / "hard-plain.safetensors"), "the checkpoint (--weights)");
  refused(upcycle(dir / "link-plain.safetensors"), "the checkpoint (--weights)");

  CHECK(slurp(dir / "w.safetensors") == before_w);
  CHECK(slurp(dir / "in.safetensors") == before_in);
  CHECK(slurp(dir / "plain.safetensors") == before_plain);
  CHECK(slurp(dir / "ckpt/model-00001-of-00001.safetensors") == before_shard);
  CHECK(slurp(dir / "config.json") == before_config);
  CHECK(fs::is_symlink(dir / "link-in.safetensors"));

  // A new output beside them is fine, and the summary quotes it as the docs show.
  const auto ok = run(dir / "ckpt", dir / "out.safetensors");
  INFO(ok.err);
  CHECK(ok.code == 0);
  CHECK(ok.out.rfind("grove: wrote '" + dir / "out.safetensors" + "': y [3, 24]", 0) == 0);
  const auto up = upcycle(dir / "up.safetensors");
  CHECK(up.code == 0);
  CHECK(up.out.rfind("grove: wrote '" + dir / "up.safetensors" + "': Grove layer 'm'", 0) == 0);
}

TEST_CASE("cli: a link planted at the old temporary name is not followed") {
  temp_dir dir;
  const ref_layer L = make_layer(77, true, false);
  write_layer(dir / "w.safetensors", L, "m", io::dtype::f32);
  write_input(dir / "in.safetensors", make_input(78, 2, L.H), 2, L.H, io::dtype::f32);
  std::ofstream(dir / "victim") << "precious";
  const std::string out = dir / "out.safetensors";
  fs::create_symlink(dir / "victim", out + ".grove-partial");
  const auto r = grove_cli(dir, "run --weights '" + dir / "w.safetensors" + "' --prefix m --input '" + dir / "in.safetensors" +
                                    "' --output '" + out + "' --top-k 4");
  INFO(r.err);
  CHECK(r.code == 0);
  CHECK(slurp(dir / "victim") == "precious");
  CHECK(io::safetensors_reader(out).contains("y"));
  int temporaries = 0;
  for (const auto& entry : fs::directory_iterator(dir.path()))
    temporaries += entry.path().filename().string().find(".grove-partial") != std::string::npos;
  CHECK(temporaries == 1);  // the planted link, untouched
}

TEST_CASE("cli: non-finite outputs from finite inputs are an error naming the first token") {
  temp_dir dir;
  const ref_layer L = make_layer(79, true, false);
  write_layer(dir / "w.safetensors", L, "m", io::dtype::f32);
  std::vector<float> x = make_input(80, 4, L.H);
  write_input(dir / "in.safetensors", x, 4, L.H, io::dtype::f32);
  std::fill(x.begin() + 2 * L.H, x.begin() + 3 * L.H, 3e38f);  // token 2: finite, near the largest float
  write_input(dir / "huge.safetensors", x, 4, L.H, io::dtype::f32);
  const std::string out = dir / "out.safetensors";
  auto run = [&](const std::string& input, const std::string& extra) {
    return grove_cli(dir, "run --weights '" + dir / "w.safetensors" + "' --prefix m --input '" + input + "' --output '" +
                              out + "' --top-k 4 " + extra);
  };
  // The router refuses a NaN logit itself; an infinite one gets as far as the outputs' check.
  // Either way the message names token 2.
  for (const char* dtype : {"f32", "bf16"}) {
    const auto r = run(dir / "huge.safetensors", std::string("--dtype ") + dtype);
    INFO(r.err);
    CHECK(r.code == 1);
    CHECK((contains(r.err, "grove: router logit of token 2 ") ||
           (r.err.rfind("grove: non-finite output: ", 0) == 0 && contains(r.err, "at token 2, column") &&
            contains(r.err, "although 'x' in '" + dir / "huge.safetensors" + "' and the weights are finite") &&
            contains(r.err, "largest |x| = 3e+38"))));
    CHECK(!fs::exists(out));
  }
  {
    const auto r = run(dir / "in.safetensors", "--scale 1e308");
    INFO(r.err);
    CHECK(r.code == 1);
    CHECK(contains(r.err, "grove: non-finite output: y holds"));
    CHECK(contains(r.err, "at token 0, column"));
    CHECK(contains(r.err, "lambda = 1e+308"));
    CHECK(!fs::exists(out));
  }
  {
    std::vector<float> dy(static_cast<std::size_t>(4 * L.H), 1.0f);
    io::safetensors_writer w;
    w.add("x", {4, L.H}, make_input(80, 4, L.H));
    w.add("dy", {4, L.H}, dy);
    w.write(dir / "huge-dy.safetensors");
    const auto r = run(dir / "huge-dy.safetensors", "--backward --scale 1e308");
    INFO(r.err);
    CHECK(r.code == 1);
    CHECK(contains(r.err, "grove: non-finite output: y holds"));
    CHECK(!fs::exists(out));
  }
}

TEST_CASE("cli: error messages quote a bounded excerpt of what a file holds") {
  temp_dir dir;
  const std::string name(1 << 20, 'w');
  {
    io::safetensors_writer w;
    w.add(name, {2}, std::vector<float>{1, 2});
    w.write(dir / "names.safetensors");
  }
  std::ofstream(dir / "config.json") << R"({"small_experts_weight": ")" << name << "\"}";
  const auto r = grove_cli(dir, "info --weights '" + dir / "names.safetensors" + "' --prefix " + name.substr(0, 100));
  INFO(r.err.substr(0, 400));
  CHECK(r.code == 1);
  CHECK(r.err.size() < 1000);
  const auto c = grove_cli(dir, "info --weights '" + dir / "names.safetensors" + "' --prefix m --config '" + dir / "config.json" + "'");
  INFO(c.err.substr(0, 400));
  CHECK(c.code == 1);
  CHECK(contains(c.err, "\"small_experts_weight\" must be a finite number >= 0, got \"wwww"));
  CHECK(c.err.size() < 1000);
}
