// The `grove` command-line tool (docs/cli.md): runs one Grove MoE layer of a Hugging Face
// checkpoint on inputs from a .safetensors file, and describes a layer's configuration.
//
//   grove run  --weights PATH --prefix PREFIX --input IN.safetensors --output OUT.safetensors
//              [--top-k K] [--scale LAMBDA] [--config config.json] [--backward]
//              [--dtype f32|bf16|q8|q4] [--threads N] [--isa scalar|avx2|avx512|avx512_bf16]
//              [--quantized-kernels auto|integer|dequantized]
//   grove info --weights PATH --prefix PREFIX [--config config.json] [--ranks P]
//   grove upcycle --weights PATH --prefix PREFIX --groups G --adjugate-size Ia --out OUT.safetensors [--seed N]
//   grove quantize --weights PATH [--prefix PREFIX] --dtype q8|q4 --out OUT.safetensors|DIR
//
// Under mpirun (a build with MPI), `grove run` is one rank of an expert-parallel layer
// (tools/expert_parallel_run.hpp) and writes the same OUT as one process.
//
// Errors print one line starting with "grove: " on stderr and exit with 1 (2 for usage errors).
#include <exception>
#include <iomanip>
#include <new>
#include <set>

#include "cli_support.hpp"
#include "quantize_command.hpp"
#if GROVE_TOOL_MPI
#include "expert_parallel_run.hpp"
#endif

namespace grove_cli {
namespace {

// ---- grove run -------------------------------------------------------------------------------

template <class Format>
run_results run_in_one_process(const run_options& o, const run_setup& s, const io::checkpoint& weights,
                               const matrix& x, const std::optional<matrix>& dy) {
  const auto runner = make_runner(o);
  run_results r;
  r.y.resize(x.rows(), s.dims.hidden);
  // BF16 weights are decoded straight from the checkpoint; the router and its logits stay fp32.
  const grove::layer<cli_config_in<Format>> layer(cli_config_in<Format>(s.dims, s.top_k, s.scale),
                                                  io::load_layer<Format>(weights, o.prefix), runner);
  layer.route_into(r.routing, x);
  layer.forward(r.routing, x, r.y);
  if constexpr (std::is_same_v<Format, float>)
    if (dy) r.gradients = compute_backward(layer, r.routing, x, *dy);
  return r;
}

int run_command(const run_options& o) {
  const io::checkpoint weights(o.weights);
  const run_setup s = prepare_run(o, weights, /*warn=*/true);
  const io::safetensors_reader in(o.input);
  const matrix x = read_rows(in, "x", s.dims.hidden);
  std::optional<matrix> dy;
  if (o.backward) dy = read_dy(in, x, s.dims.hidden);
  const run_results r = with_cli_format(s.dtype, [&]<class Format>() {
    return run_in_one_process<Format>(o, s, weights, x, dy);
  });
  write_run_output(o, r, x, in, s.top_k, s.scale);
  print_wrote(o, r, s.routing, s.top_k, s.scale);
  return 0;
}

// ---- grove info ----------------------------------------------------------------------------

/// `grove info --ranks P`: the groups each rank of `mpirun -np P grove run` holds (balanced
/// placement) and the memory of its shard of the weights in each format.
void print_placement(const grove::layer_dims& d, int ranks) {
  const grove::group_placement placement = grove::group_placement::balanced(d.groups, ranks);
  std::cout << "expert parallelism on P = " << ranks << " ranks (mpirun -np " << ranks
            << " grove run): groups " << placement.describe() << "\n";
  for (int r = 0; r < ranks; ++r) {
    const std::vector<index> groups = placement.groups_of(r);
    std::cout << "  rank " << r << ": groups " << groups.front() << "-" << groups.back() << " (" << groups.size()
              << "), experts " << groups.front() * d.group_size() << "-" << (groups.back() + 1) * d.group_size() - 1
              << "; weights";
    for (const grove::format_info& format : grove::weight_formats) {
      const std::size_t bytes = grove::visit_format(format.format, [&]<class Storage>() {
        return grove::layer_parameters<Storage>::bytes_for(d, groups);
      });
      std::cout << (format.format == grove::weight_formats[0].format ? " " : ", ") << format.name << " " << bytes
                << " bytes";
    }
    std::cout << "\n";
  }
}
//--------------------------------------------------------------------------

int info_command(const info_options& o) {
  std::optional<io::hf_config> config;
  if (!o.config.empty()) config = io::read_hf_config(o.config);
  const routing_choice routing = choose_routing(config, std::nullopt, std::nullopt);

  const io::checkpoint weights(o.weights);
  const grove::layer_dims d = io::infer_layer_dims(weights, o.prefix);
  io::check_layer_tensors(weights, o.prefix, d);  // headers only: no weight is read
  if (config) io::check_hf_config(*config, d);

  std::set<std::string> dtypes;
  std::set<std::string> files;
  bool has_bias = false;
  grove::weights_view<float>(d).for_each_tensor([&](const grove::tensor_info& t, const float* const&) {
    const std::string name = io::tensor_name(o.prefix, t.name);
    if (!weights.contains(name)) {
      // Stored quantized (checked above), or the optional bias, absent.
      if (const auto format = io::stored_format(weights, name)) {
        dtypes.insert(std::string(grove::info_of(*format).name));
        files.insert(weights.file_of(io::qweight_name(name)).filename().string());
      }
      return;
    }
    if (t.role == grove::tensor_role::selection_bias) has_bias = true;
    dtypes.insert(weights.entry(name).dtype_name);
    files.insert(weights.file_of(name).filename().string());
  });
  auto join = [](const std::set<std::string>& s) {
    std::string out;
    for (const auto& v : s) {
      if (!out.empty()) out += ", ";
      out += v;
    }
    return out;
  };

  std::cout << "grove layer '" << o.prefix << "' in '" << o.weights << "'"
            << (weights.sharded() ? " (sharded; layer in " + std::to_string(files.size()) + " file(s): " + join(files) + ")"
                                  : "")
            << "\n";
  std::cout << "  H = " << d.hidden << "  hidden size\n";
  std::cout << "  E = " << d.experts << "  routed experts\n";
  std::cout << "  G = " << d.groups << "  groups (adjugate experts)\n";
  std::cout << "  group size = " << d.group_size() << "  experts per group (E / G)\n";
  std::cout << "  I = " << d.expert_intermediate << "  routed expert intermediate size\n";
  std::cout << "  Ia = " << d.adjugate_intermediate << "  adjugate intermediate size\n";
  if (routing.top_k)
    std::cout << "  k = " << *routing.top_k << "  experts per token (config.json)\n";
  else
    std::cout << "  k = unknown  (pass --config with num_experts_per_tok)\n";
  if (routing.scale) {
    const double bound = static_cast<double>(d.groups) / static_cast<double>(d.experts);
    std::cout << "  lambda = " << format_double(*routing.scale) << "  adjugate scale (config.json)"
              << (*routing.scale > bound * (1.0 + 1e-12) ? "; exceeds the paper's bound G / E = " + format_double(bound) : "")
              << "\n";
  } else {
    std::cout << "  lambda = unknown  (pass --config with small_experts_weight)\n";
  }
  std::cout << "  weights dtype: " << join(dtypes) << "; expert_bias: " << (has_bias ? "present" : "absent (zeros)")
            << "\n";

  const index router = d.experts * d.hidden;
  const index experts = d.experts * 3 * d.hidden * d.expert_intermediate;
  const index adjugates = d.groups * 3 * d.hidden * d.adjugate_intermediate;
  std::cout << "memory of the weights in each format (grove run --dtype)\n";
  for (const grove::format_info& format : grove::weight_formats) {
    const std::size_t bytes = grove::visit_format(
        format.format, [&]<class Storage>() { return grove::layer_parameters<Storage>::bytes_for(d); });
    std::cout << "  " << std::left << std::setw(5) << format.name << std::right << "= " << bytes << " bytes ("
              << format_mib(bytes) << ")  tensors in " << format.name
              << (format.fp32_routing_copy ? ", plus an fp32 copy of the router and the fp32 bias for routing\n"
                                           : " and the bias\n");
  }
  std::cout << "parameters\n";
  std::cout << "  total = " << grove::total_parameters(d) << "  (router " << router << " + experts " << experts
            << " + adjugates " << adjugates << "; expert_bias not counted)\n";
  if (routing.top_k) {
    const index k = *routing.top_k;
    const index fewest = (k + d.group_size() - 1) / d.group_size();
    const index most = std::min(k, d.groups);
    std::cout << "  activated per token = " << grove::activated_parameters(d, k, fewest) << " .. "
              << grove::activated_parameters(d, k, most) << "  (n_g = " << fewest << " .. " << most
              << " distinct groups among the k = " << k << " picks)\n";
  } else {
    std::cout << "  activated per token = unknown without k  (pass --config)\n";
  }
  if (o.ranks > 0) print_placement(d, o.ranks);
  return 0;
}

// ---- grove upcycle ---------------------------------------------------------------------------

int upcycle_command(const upcycle_command_options& o) {
  grove::upcycle_options options;
  options.groups = o.groups;
  options.adjugate_intermediate = o.adjugate_size;
  options.seed = o.seed;
  const io::checkpoint weights(o.weights);
  require_new_output(o.out, "--out", checkpoint_inputs(weights));
  const grove::layer_parameters<float> grove_layer = io::upcycle_layer<float>(weights, o.prefix, options);
  io::save_layer(o.out, grove_layer.view(), o.prefix);
  const grove::layer_dims& d = grove_layer.dims();
  std::cout << "grove: wrote " << in_quotes(o.out) << ": Grove layer '" << o.prefix << "' with H = " << d.hidden
            << ", E = " << d.experts << ", G = " << d.groups << ", I = " << d.expert_intermediate
            << ", Ia = " << d.adjugate_intermediate << " (adjugate gate/up ~ N(0, " << format_double(options.stddev)
            << "^2), seed " << o.seed << "; down projections zero: the output is unchanged)\n";
  return 0;
}

}  // namespace
}  // namespace grove_cli

int main(int argc, char** argv) {
  using namespace grove_cli;
  CLI::App app{"grove: run and inspect Grove MoE layers of Hugging Face checkpoints (docs/cli.md)", "grove"};
  app.require_subcommand(1);

  run_options run;
  CLI::App* run_cmd = app.add_subcommand("run", "Run one layer on x from a .safetensors file; write y and the routing");
  run_cmd->add_option("--weights", run.weights, "checkpoint: a .safetensors file or a sharded checkpoint directory")
      ->required();
  run_cmd->add_option("--prefix", run.prefix, "layer prefix, e.g. model.layers.0.mlp")->required();
  run_cmd->add_option("--input", run.input, "input .safetensors holding x [T, H] (F32, BF16 or F16)")->required();
  run_cmd->add_option("--output", run.output, "output .safetensors: y, router_logits, topk_ids, topk_weights")
      ->required();
  CLI::Option* top_k_opt =
      run_cmd->add_option("--top-k", run.top_k, "experts per token k (default 8)")->transform(integer_in_range<grove::index>());
  CLI::Option* scale_opt =
      run_cmd->add_option("--scale", run.scale, "adjugate scale lambda (default 0.05)")->check(double_in_range());
  run_cmd->add_option("--config", run.config, "Hugging Face config.json: k and lambda when present there");
  run_cmd->add_flag("--backward", run.backward, "also compute dx and weight gradients from dy in the input");
  run_cmd->add_option("--dtype", run.dtype,
                      "weights in memory: f32, bf16 (half the bytes), or q8 or q4 (quantized at load; "
                      "docs/quantization.md). Default: the file's own q8 or q4, else f32; --backward needs f32")
      ->check(CLI::IsMember({"f32", "bf16", "q8", "q4"}));
  run_cmd->add_option("--threads", run.threads, "threads of the CPU runner (default: every hardware thread)")
      ->transform(integer_in_range<int>())
      ->check(CLI::Range(1, 4096));
  run_cmd->add_option("--isa", run.isa, "instruction set of the kernels (default: the best this CPU runs)")
      ->check(CLI::IsMember({"scalar", "avx2", "avx512", "avx512_bf16"}));
  run_cmd->add_option("--quantized-kernels", run.quantized_kernels,
                      "how q8 and q4 weights run: integer (int8 dots), dequantized (each tile converted to bf16 or "
                      "fp32), or auto (by rows per expert; the default). docs/quantization.md")
      ->check(CLI::IsMember({"auto", "integer", "dequantized"}));

  info_options info;
  CLI::App* info_cmd = app.add_subcommand("info", "Print a layer's configuration and parameter counts");
  info_cmd->add_option("--weights", info.weights, "checkpoint: a .safetensors file or a sharded checkpoint directory")
      ->required();
  info_cmd->add_option("--prefix", info.prefix, "layer prefix, e.g. model.layers.0.mlp")->required();
  info_cmd->add_option("--config", info.config, "Hugging Face config.json (k and lambda)");
  info_cmd->add_option("--ranks", info.ranks, "also print the groups and weight memory of each rank of mpirun -np P grove run")
      ->transform(integer_in_range<int>())
      ->check(CLI::Range(1, 1 << 20));

  upcycle_command_options upcycle;
  CLI::App* upcycle_cmd =
      app.add_subcommand("upcycle", "Turn a plain MoE layer (router + experts) into a Grove layer with zero-output adjugates");
  upcycle_cmd->add_option("--weights", upcycle.weights, "checkpoint: a .safetensors file or a sharded checkpoint directory")
      ->required();
  upcycle_cmd->add_option("--prefix", upcycle.prefix, "layer prefix, e.g. model.layers.0.mlp")->required();
  upcycle_cmd->add_option("--groups", upcycle.groups, "group count G (must divide the expert count E)")
      ->required()
      ->transform(integer_in_range<grove::index>());
  upcycle_cmd->add_option("--adjugate-size", upcycle.adjugate_size, "adjugate intermediate size Ia")
      ->required()
      ->transform(integer_in_range<grove::index>());
  upcycle_cmd->add_option("--out", upcycle.out, "output .safetensors with the Grove layer (F32)")->required();
  upcycle_cmd->add_option("--seed", upcycle.seed, "seed of the adjugates' gate/up draws (default 0)")
      ->transform(integer_in_range<std::uint64_t>());

#if GROVE_TOOL_MPI
  // Under mpirun every rank runs this program; rank 0 speaks for all of them.
  const grove_cli::mpi_session mpi(argc, argv);
  const bool speaks = mpi.rank() == 0;
#else
  const bool speaks = true;
#endif
  quantize_options quantize;
  CLI::App* quantize_cmd = app.add_subcommand(
      "quantize", "Write Grove layers in q8 or q4: one layer (--prefix) into a file, or a whole checkpoint into a directory");
  quantize_cmd->add_option("--weights", quantize.weights, "checkpoint: a .safetensors file or a sharded checkpoint directory")
      ->required();
  quantize_cmd->add_option("--prefix", quantize.prefix,
                           "the layer to quantize, e.g. model.layers.0.mlp (default: every Grove layer, into a directory)");
  quantize_cmd->add_option("--dtype", quantize.dtype, "q8 or q4 (docs/quantization.md)")
      ->required()
      ->check(CLI::IsMember({"q8", "q4"}));
  quantize_cmd->add_option("--out", quantize.out,
                           "with --prefix: the .safetensors file to write; without: a new (or empty) directory")
      ->required();

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == static_cast<int>(CLI::ExitCodes::Success)) return speaks ? app.exit(e) : 0;  // --help
    if (speaks) {
      print_error(std::string("usage: ") + e.what());
      std::cerr << "Run 'grove --help' or 'grove <run|info|upcycle|quantize> --help' for the options.\n";
    }
    return 2;
  }

  try {
    if (run_cmd->parsed()) {
      if (!run.quantized_kernels.empty() && (run.dtype == "f32" || run.dtype == "bf16")) {
        if (speaks) {
          print_error("usage: --quantized-kernels applies to --dtype q8 or q4, not " + run.dtype);
          std::cerr << "Run 'grove run --help' for the options.\n";
        }
        return 2;
      }
      if (run.backward && !run.dtype.empty() && run.dtype != "f32") {
        if (speaks) {
          print_error("usage: --backward needs --dtype f32 (grove has no backward for " + run.dtype + " weights)");
          std::cerr << "Run 'grove run --help' for the options.\n";
        }
        return 2;
      }
      run.top_k_given = top_k_opt->count() > 0;
      run.scale_given = scale_opt->count() > 0;
#if GROVE_TOOL_MPI
      if (mpi.size() > 1) return run_expert_parallel(run);
#endif
      return run_command(run);
    }
    const auto command = [&] {
      if (quantize_cmd->parsed()) return quantize_command(quantize);
      return upcycle_cmd->parsed() ? upcycle_command(upcycle) : info_command(info);
    };
#if GROVE_TOOL_MPI
    if (mpi.size() > 1) return run_on_rank_zero(command);
#endif
    return command();
  } catch (const std::bad_alloc&) {
    if (speaks) print_error("out of memory");
  } catch (const std::exception& e) {
    // Under mpirun the errors of grove run and of rank 0's command are agreed on every rank
    // (they name the rank that failed): rank 0 prints them once.
    if (speaks) print_error(e.what());
  } catch (...) {
    if (speaks) print_error("unknown error");
  }
  return 1;
}
