// `mpirun -np P grove run` against `grove run` in one process (docs/cli.md, "Under mpirun"): the
// same OUT bytes for P = 2, 3 and 4 on a layer whose G is divisible by none of them, forward and
// --backward, f32 and bf16, with a rank that has no tokens; errors on one rank reach every rank,
// exit 1, name the rank and leave no output; `grove info --ranks P`. This test is one process:
// it writes the files and starts `grove` and `mpirun` as commands.
#include <doctest/doctest.h>

#include "support/test_support.hpp"

#include <cstdlib>
#include <filesystem>
#include <string>


#include <grove/io.hpp>

#if !defined(GROVE_CLI_PATH) || !defined(GROVE_MPIEXEC)
#error "tests/mpi/test_cli_ranks.cpp needs GROVE_CLI_PATH and GROVE_MPIEXEC"
#endif

namespace {

namespace io = grove::io;
using grove_test::temp_dir;

using grove_test::slurp;
using result = grove_test::command_result;

/// Runs `grove ARGS` alone (ranks = 0) or under `mpirun -np RANKS`, capturing its output.
result run_grove(const temp_dir& dir, int ranks, const std::string& args) {
  std::string command = "'" + std::string(GROVE_CLI_PATH) + "' " + args;
  if (ranks > 0)
    command = "'" + std::string(GROVE_MPIEXEC) + "' -np " + std::to_string(ranks) +
              " --oversubscribe --bind-to none " + command;
  return grove_test::run_command(command, dir);
}

/// The tensors whose bytes differ between two safetensors files (or that one of them lacks), to
/// say what differs when the files do.
std::string differing_tensors(const std::string& a_path, const std::string& b_path) {
  const io::safetensors_reader a(a_path), b(b_path);
  const std::string a_bytes = slurp(a_path), b_bytes = slurp(b_path);
  std::string out;
  for (const io::tensor_entry& e : a.tensors()) {
    const io::tensor_entry* f = b.find(e.name);
    const auto bytes_of = [](const std::string& file, const io::safetensors_reader& r, const io::tensor_entry& t) {
      return file.substr(8 + r.header_bytes() + t.begin, t.bytes());
    };
    if (f == nullptr || bytes_of(a_bytes, a, e) != bytes_of(b_bytes, b, *f)) out += e.name + " ";
  }
  return out;
}

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

// H = 24, E = 15 experts in G = 5 groups (divisible by none of P = 2, 3, 4), I = 12, Ia = 6.
const grove::layer_dims dims{24, 15, 5, 12, 6};
const std::string prefix = "model.layers.0.mlp";

/// A checkpoint of the layer (with a selection bias, so that routing is not the plain top-k),
/// stored as `stored`; `skip`, when given, is left out.
void write_checkpoint(const std::string& path, io::dtype stored, const std::string& skip = "") {
  auto params = grove::layer_parameters<float>::random(dims, 5, 0.3);
  for (grove::index e = 0; e < dims.experts; ++e) params.bias()[static_cast<std::size_t>(e)] = 0.01f * float(e % 4);
  io::safetensors_writer writer;
  writer.set_metadata("format", "pt");
  params.view().for_each_tensor([&](const grove::tensor_info& info, const float* const& p) {
    const std::string name = io::tensor_name(prefix, info.name);
    if (name == skip) return;
    const bool bias = info.role == grove::tensor_role::selection_bias;
    const io::tensor_shape shape = bias ? io::tensor_shape{info.rows} : io::tensor_shape{info.rows, info.cols};
    writer.add(name, shape, std::span<const float>(p, static_cast<std::size_t>(info.size())), stored);
  });
  writer.write(path);
}

void write_input(const std::string& path, grove::index tokens, grove::index width = dims.hidden) {
  const auto x = grove_test::random_matrix<float>(tokens, width, 11);
  const auto dy = grove_test::random_matrix<float>(tokens, width, 12);
  io::safetensors_writer writer;
  writer.add("x", io::tensor_shape{x.rows(), x.cols()}, std::span<const float>(x.data(), static_cast<std::size_t>(x.size())));
  writer.add("dy", io::tensor_shape{dy.rows(), dy.cols()},
             std::span<const float>(dy.data(), static_cast<std::size_t>(dy.size())));
  writer.write(path);
}

}  // namespace

TEST_SUITE("mpi") {
  TEST_CASE("mpirun -np P grove run writes the bytes grove run writes alone") {
    const temp_dir dir;
    write_checkpoint(dir / "w.safetensors", io::dtype::f32);
    write_checkpoint(dir / "w-bf16.safetensors", io::dtype::bf16);
    for (const grove::index tokens : {grove::index(13), grove::index(3)}) {  // T = 3 < P = 4: a rank with no tokens
      CAPTURE(tokens);
      write_input(dir / "in.safetensors", tokens);
      struct mode {
        const char* weights;
        const char* options;
      };
      for (const mode m : {mode{"w.safetensors", ""}, mode{"w.safetensors", " --backward"},
                           mode{"w-bf16.safetensors", " --dtype bf16"}, mode{"w-bf16.safetensors", ""}}) {
        CAPTURE(m.weights);
        CAPTURE(m.options);
        const std::string args = "run --weights '" + (dir / m.weights) + "' --prefix " + prefix + " --input '" +
                                 (dir / "in.safetensors") + "' --top-k 4 --scale 0.2 --threads 1" + m.options;
        const result alone = run_grove(dir, 0, args + " --output '" + (dir / "alone.safetensors") + "'");
        REQUIRE_MESSAGE(alone.code == 0, alone.err);
        const std::string want = slurp(dir / "alone.safetensors");
        for (const int P : {2, 3, 4}) {
          CAPTURE(P);
          const std::string out = dir / ("ranks-" + std::to_string(P) + ".safetensors");
          const result ranks = run_grove(dir, P, args + " --output '" + out + "'");
          REQUIRE_MESSAGE(ranks.code == 0, ranks.err);
          CHECK_MESSAGE(slurp(out) == want, "differing tensors: " << differing_tensors(dir / "alone.safetensors", out));
          // Rank 0 alone prints "grove: wrote 'OUT': …", the line of one process.
          std::string line = ranks.out;
          line.replace(line.find(out), out.size(), dir / "alone.safetensors");
          CHECK(line == alone.out);
        }
      }
    }
  }

  TEST_CASE("without --threads each rank runs a share of the node's threads, with the same bytes") {
    const temp_dir dir;
    write_checkpoint(dir / "w.safetensors", io::dtype::f32);
    write_input(dir / "in.safetensors", 9);
    const std::string args = "run --weights '" + (dir / "w.safetensors") + "' --prefix " + prefix + " --input '" +
                             (dir / "in.safetensors") + "' --top-k 3";
    REQUIRE(run_grove(dir, 0, args + " --output '" + (dir / "a.safetensors") + "'").code == 0);
    const result ranks = run_grove(dir, 2, args + " --output '" + (dir / "b.safetensors") + "'");
    REQUIRE_MESSAGE(ranks.code == 0, ranks.err);
    CHECK(slurp(dir / "a.safetensors") == slurp(dir / "b.safetensors"));
  }

  TEST_CASE("an error on one rank ends grove run on every rank, names the rank, and writes nothing") {
    const temp_dir dir;
    write_input(dir / "in.safetensors", 8);
    // Expert 10 is in group 3 (experts 9-11). On 3 ranks the balanced placement is 0-1 | 2-3 | 4
    // (the first G mod P ranks hold one group more), so rank 1 alone reads it.
    write_checkpoint(dir / "w.safetensors", io::dtype::f32, prefix + ".experts.10.up_proj.weight");
    const std::string out = dir / "out.safetensors";
    const std::string args = "run --weights '" + (dir / "w.safetensors") + "' --prefix " + prefix + " --input '" +
                             (dir / "in.safetensors") + "' --output '" + out + "' --top-k 4 --threads 1";
    const result missing = run_grove(dir, 3, args);
    CHECK(missing.code == 1);
    CHECK(contains(missing.err, "failed on rank 1"));
    CHECK(contains(missing.err, "experts.10.up_proj.weight"));
    CHECK_FALSE(contains(missing.err, "on rank 0"));
    CHECK_FALSE(std::filesystem::exists(out));

    // Alone, the same checkpoint fails too: the ranks do not hide an error.
    CHECK(run_grove(dir, 0, args).code == 1);

    // x of the wrong width is read by rank 0 only.
    write_checkpoint(dir / "w.safetensors", io::dtype::f32);
    write_input(dir / "in.safetensors", 8, dims.hidden + 1);
    const result width = run_grove(dir, 2, args);
    CHECK(width.code == 1);
    CHECK(contains(width.err, "failed on rank 0"));
    CHECK(contains(width.err, "'x'"));
    CHECK_FALSE(std::filesystem::exists(out));

    // More ranks than groups.
    write_input(dir / "in.safetensors", 8);
    const result too_many = run_grove(dir, 6, args);
    CHECK(too_many.code == 1);
    CHECK(contains(too_many.err, "ranks"));
    CHECK_FALSE(std::filesystem::exists(out));

    // A usage error is one message and exit 2.
    const result usage = run_grove(dir, 2, "run --weights x");
    CHECK(usage.code == 2);
    CHECK(usage.err.find("usage") == usage.err.rfind("usage"));
  }

  TEST_CASE("grove info --ranks P prints each rank's groups and memory") {
    const temp_dir dir;
    write_checkpoint(dir / "w.safetensors", io::dtype::f32);
    const result info = run_grove(dir, 0, "info --weights '" + (dir / "w.safetensors") + "' --prefix " + prefix + " --ranks 3");
    REQUIRE_MESSAGE(info.code == 0, info.err);
    CHECK(contains(info.out, "groups 0-1 | 2-3 | 4"));
    // Rank 2 holds one group: the router (15 x 24) and one group's 3 experts and adjugate,
    // 360 + 3·3·24·12 + 3·24·6 = 3384 floats, plus the bias: 13,596 bytes in f32.
    const std::size_t f32 = grove::layer_parameters<float>::bytes_for(dims, std::vector<grove::index>{4});
    CHECK(f32 == (360 + 3 * 3 * 24 * 12 + 3 * 24 * 6) * 4 + 15 * 4);
    CHECK(contains(info.out, "rank 2: groups 4-4 (1), experts 12-14; weights f32 13596 bytes"));
    CHECK(run_grove(dir, 0, "info --weights '" + (dir / "w.safetensors") + "' --prefix " + prefix + " --ranks 6").code == 1);
  }
}
