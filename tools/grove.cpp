// The `grove` command-line tool (docs/cli.md): runs one Grove MoE layer of a Hugging Face
// checkpoint on inputs from a .safetensors file, and describes a layer's configuration.
//
//   grove run  --weights PATH --prefix PREFIX --input IN.safetensors --output OUT.safetensors
//              [--top-k K] [--scale LAMBDA] [--config config.json] [--backward]
//              [--dtype f32|bf16] [--threads N] [--isa scalar|avx2|avx512|avx512_bf16]
//   grove info --weights PATH --prefix PREFIX [--config config.json]
//   grove upcycle --weights PATH --prefix PREFIX --groups G --adjugate-size Ia --out OUT.safetensors [--seed N]
//
// Errors print one line starting with "grove: " on stderr and exit with 1 (2 for usage errors).
#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <iomanip>
#include <iostream>
#include <limits>
#include <new>
#include <optional>
#include <set>
#include <sstream>
#include <string>
#include <system_error>
#include <utility>
#include <vector>

#include <CLI/CLI.hpp>

#include <grove/io.hpp>
#include <grove/training.hpp>

namespace {

namespace io = grove::io;
using grove::index;
using matrix = grove::row_matrix<float>;
/// The layer the tool runs: every size from the checkpoint, k and λ from the command line or
/// config.json, and no paper bound on λ (a user may study any λ on a real checkpoint).
template <class Format>
using cli_config_in = grove::dynamic_config<Format, grove::unchecked_scale_bound>;
using cli_config = cli_config_in<float>;
using cli_layer = grove::layer<cli_config>;

struct run_options {
  std::string weights, prefix, input, output, config;
  index top_k = 8;
  double scale = 0.05;
  bool top_k_given = false;
  bool scale_given = false;
  bool backward = false;
  std::string dtype = "f32";  ///< the weights in memory: f32 or bf16
  int threads = 0;            ///< 0: every hardware thread
  std::string isa;            ///< empty: the best this machine runs
};

struct info_options {
  std::string weights, prefix, config;
};

struct upcycle_command_options {
  std::string weights, prefix, out;
  index groups = 0;
  index adjugate_size = 0;
  std::uint64_t seed = 0;
};

/// k and λ after combining the defaults, config.json and the command line, with where each came from.
struct routing_choice {
  std::optional<index> top_k;
  std::optional<double> scale;
  std::string top_k_source, scale_source;
};

routing_choice choose_routing(const std::optional<io::hf_config>& config, std::optional<index> cli_top_k,
                              std::optional<double> cli_scale) {
  routing_choice c;
  auto pick = [](auto cli, auto from_config, auto& out, std::string& source) {
    if (cli) {
      out = *cli;
      source = "command line";
    } else if (from_config) {
      out = *from_config;
      source = "config.json";
    }
  };
  pick(cli_top_k, config ? config->top_k : std::nullopt, c.top_k, c.top_k_source);
  pick(cli_scale, config ? config->scale : std::nullopt, c.scale, c.scale_source);
  return c;
}

/// Bytes in MiB with one decimal ("1248.5 MiB").
std::string format_mib(std::size_t bytes) {
  std::ostringstream s;
  s.setf(std::ios::fixed);
  s.precision(1);
  s << static_cast<double>(bytes) / (1024.0 * 1024.0) << " MiB";
  return s.str();
}

/// The shortest decimal that reads back as `v` ("0.05", not "0.050000000000000003").
std::string format_double(double v) {
  std::string text;
  for (int digits = 1; digits <= 17; ++digits) {
    std::ostringstream s;
    s.precision(digits);
    s << v;
    text = s.str();
    if (std::strtod(text.c_str(), nullptr) == v) break;
  }
  return text;
}

/// "'path'". Not named `quoted`: for a std::string argument, argument-dependent lookup would
/// find std::quoted, which writes "path" in double quotes.
std::string in_quotes(const std::filesystem::path& p) { return grove::detail::quoted(p); }

/// A CLI11 transform (a check that may rewrite the value) that the value is a decimal integer that fits T, naming the range otherwise
/// (CLI11 itself clamps 99999999999999999999 to the largest long long, silently). The value is
/// rewritten in plain decimal, so CLI11 converts exactly what was checked ("010" is 10, not
/// octal 8).
template <class T>
CLI::Validator integer_in_range() {
  return CLI::Validator(
      [](std::string& text) -> std::string {
        const char* first = text.data();
        const char* last = first + text.size();
        if (first != last && *first == '+') ++first;  // from_chars takes no '+'
        T value{};
        const auto [end, ec] = std::from_chars(first, last, value);
        const std::string range = "an integer from " + std::to_string(std::numeric_limits<T>::min()) + " to " +
                                  std::to_string(std::numeric_limits<T>::max());
        if (ec == std::errc::result_out_of_range) return grove::detail::excerpt(text) + " is out of range (" + range + ")";
        if (ec != std::errc() || end != last) return grove::detail::excerpt(text) + " is not " + range;
        text = std::to_string(value);
        return {};
      },
      "INT");
}

/// A CLI11 check that a number does not overflow a double (CLI11 reads 1e400 as infinity).
CLI::Validator double_in_range() {
  return CLI::Validator(
      [](std::string& text) -> std::string {
        errno = 0;
        char* end = nullptr;
        const double value = std::strtod(text.c_str(), &end);
        if (end == text.c_str() || *end != '\0') return grove::detail::excerpt(text) + " is not a number";
        if (errno == ERANGE && std::isinf(value))
          return grove::detail::excerpt(text) + " is out of range (beyond the largest double, about 1.8e308)";
        return {};
      },
      "NUMBER");
}


/// A floating [T, cols] tensor of the input file as float; throws naming the file and the shape.
matrix read_rows(const io::safetensors_reader& in, const std::string& name, index cols) {
  const io::tensor_entry* e = in.find(name);
  if (!e) throw grove::error("grove: input " + in_quotes(in.path()) + " has no tensor '" + name + "'");
  const std::string expected = "[T, " + std::to_string(cols) + "]";
  if (e->shape.size() != 2 || e->shape[1] != cols)
    throw grove::error("grove: tensor '" + name + "' in " + in_quotes(in.path()) + " has shape " +
                       grove::detail::shape_string(e->shape) + " but the layer needs " + expected +
                       " (H = " + std::to_string(cols) + ")");
  if (!io::is_floating(e->type))
    throw grove::error("grove: tensor '" + name + "' in " + in_quotes(in.path()) + " has unsupported dtype " +
                       grove::detail::excerpt(e->dtype_name) + " (use F32, BF16 or F16)");
  matrix m(static_cast<index>(e->shape[0]), cols);
  in.read_into(*e, std::span<float>(m.data(), static_cast<std::size_t>(m.size())));
  for (index i = 0; i < m.size(); ++i)
    if (!std::isfinite(m.data()[i]))
      throw grove::error("grove: tensor '" + name + "' in " + in_quotes(in.path()) +
                         " holds a non-finite value at row " + std::to_string(i / cols) + ", column " +
                         std::to_string(i % cols));
  return m;
}

/// The files a checkpoint reads, each with how to name it in a message.
std::vector<std::pair<std::filesystem::path, std::string>> checkpoint_inputs(const io::checkpoint& weights) {
  std::vector<std::pair<std::filesystem::path, std::string>> out;
  for (const std::filesystem::path& file : weights.files())
    out.emplace_back(file, weights.sharded() ? "a file of the checkpoint (--weights)" : "the checkpoint (--weights)");
  return out;
}

/// Refuses to write `output` when it is one of the files the command reads: writing renames a
/// new file over it, which would destroy that input. The same file means the same device and
/// inode after following links, so a hard link or a symlink to an input is refused too.
void require_new_output(const std::filesystem::path& output, const char* option,
                        const std::vector<std::pair<std::filesystem::path, std::string>>& inputs) {
  for (const auto& [input, what] : inputs) {
    std::error_code ec;  // set when either does not exist (a new output): not the same file
    if (std::filesystem::equivalent(output, input, ec))
      throw grove::error("grove: " + std::string(option) + " " + in_quotes(output) + " is the same file as " + what +
                         " " + in_quotes(input) + "; writing it would destroy that input (choose another output)");
  }
}

/// Every result of `grove run` must be finite: finite inputs (checked when read) and weights
/// (checked when loaded) can still overflow float, e.g. x near 3e38 (router logits of inf, then
/// NaN routing weights) or a huge lambda (an infinite y). Names the first token and says why.
void require_finite_outputs(const grove::routing_plan<float>& plan, const matrix& y, const matrix& x,
                            const io::safetensors_reader& in, double scale) {
  try {
    grove::check_finite_output(plan, y);
  } catch (const grove::error& e) {
    throw grove::error(std::string(e.what()) + ", although 'x' in " + in_quotes(in.path()) +
                       " and the weights are finite: the layer overflowed float (largest |x| = " +
                       format_double(static_cast<double>(x.cwiseAbs().maxCoeff())) + ", lambda = " +
                       format_double(scale) + ")");
  }
}

template <class Value>
void add_matrix(io::safetensors_writer& out, const std::string& name, const grove::row_matrix<Value>& m) {
  out.add(name, io::tensor_shape{m.rows(), m.cols()},
          std::span<const Value>(m.data(), static_cast<std::size_t>(m.size())));
}

// ---- backward --------------------------------------------------------------------------------
// `grove run --backward` reads `dy` [T, H] from IN besides `x`, and writes `dx` [T, H] and
// `grad.<full tensor name>` (F32) for every weight read except expert_bias.

struct backward_outputs {
  matrix dx;                                   ///< [T, H]
  grove::layer_parameters<float> gradients;    ///< ∂L/∂W for every trainable tensor (bias untouched)
};

/// The gradients of L = <dy, y> from the same plan the forward used (docs/training.md).
backward_outputs compute_backward(const cli_layer& layer, const grove::routing_plan<float>& plan, const matrix& x,
                                  const matrix& dy) {
  grove::layer_gradients<float> g = grove::gradients<float>(layer.runner(), layer.weights(), plan, x, dy);
  return {std::move(g.input), std::move(g.weights)};
}

void add_backward_outputs(io::safetensors_writer& out, const backward_outputs& b, const std::string& prefix) {
  add_matrix(out, "dx", b.dx);
  io::add_layer(out, b.gradients.view(), "grad." + io::tensor_name(prefix, ""), io::dtype::f32,
                /*include_bias=*/false);
}

// ---- grove run -------------------------------------------------------------------------------

int run_command(const run_options& o) {
  std::optional<io::hf_config> config;
  if (!o.config.empty()) config = io::read_hf_config(o.config);
  const routing_choice routing =
      choose_routing(config, o.top_k_given ? std::optional<index>(o.top_k) : std::nullopt,
                     o.scale_given ? std::optional<double>(o.scale) : std::nullopt);
  const index top_k = routing.top_k.value_or(o.top_k);
  const double scale = routing.scale.value_or(o.scale);

  const io::checkpoint weights(o.weights);
  {
    auto inputs = checkpoint_inputs(weights);
    inputs.emplace_back(o.input, "the input (--input)");
    if (!o.config.empty()) inputs.emplace_back(o.config, "the config (--config)");
    require_new_output(o.output, "--output", inputs);
  }
  const grove::layer_dims dims = io::infer_layer_dims(weights, o.prefix);
  if (config) io::check_hf_config(*config, dims);
  cli_config layer_config(dims, top_k, scale);  // rejects k outside [1, E] and λ < 0 or not finite
  const double bound = static_cast<double>(dims.groups) / static_cast<double>(dims.experts);
  if (scale > bound * (1.0 + 1e-12))
    std::cerr << "grove: warning: the adjugate scale lambda = " << format_double(scale)
              << " exceeds the paper's bound G / E = " << format_double(bound) << "; continuing\n";

  const io::safetensors_reader in(o.input);
  const matrix x = read_rows(in, "x", dims.hidden);
  std::optional<matrix> dy;
  if (o.backward) {
    dy = read_rows(in, "dy", dims.hidden);
    if (dy->rows() != x.rows())
      throw grove::error("grove: 'dy' in " + in_quotes(in.path()) + " has " + std::to_string(dy->rows()) +
                         " rows but 'x' has " + std::to_string(x.rows()));
  }

  grove::cpu_runner_options runner_options;
  runner_options.threads = o.threads;
  if (!o.isa.empty()) runner_options.isa = grove::simd::parse_isa(o.isa);
  auto runner = std::make_shared<grove::cpu_runner>(runner_options);  // throws if this CPU lacks the --isa

  grove::routing_plan<float> plan;
  matrix y(x.rows(), dims.hidden);
  std::optional<backward_outputs> gradients;
  if (o.dtype == "bf16") {
    // BF16 weights, decoded straight from the checkpoint; the router and its logits stay fp32.
    const grove::layer<cli_config_in<grove::bf16>> layer(cli_config_in<grove::bf16>(dims, top_k, scale),
                                                         io::load_layer<grove::bf16>(weights, o.prefix), runner);
    layer.route_into(plan, x);
    layer.forward(plan, x, y);
  } else {
    const cli_layer layer(std::move(layer_config), io::load_layer<float>(weights, o.prefix), runner);
    layer.route_into(plan, x);
    layer.forward(plan, x, y);
    if (o.backward) gradients = compute_backward(layer, plan, x, *dy);
  }
  require_finite_outputs(plan, y, x, in, scale);
  if (gradients) {
    grove::check_finite_rows(gradients->dx, "dx");
    try {
      grove::check_finite(gradients->gradients.view());
    } catch (const grove::error& e) {
      throw grove::error(std::string(e.what()) + " in the gradients (the backward overflowed float)");
    }
  }

  io::safetensors_writer out;
  out.set_metadata("format", "pt");
  out.set_metadata("grove_version", GROVE_VERSION_STRING);
  out.set_metadata("prefix", o.prefix);
  out.set_metadata("top_k", std::to_string(top_k));
  out.set_metadata("scale", format_double(scale));
  add_matrix(out, "y", y);
  add_matrix(out, "router_logits", plan.logits);
  add_matrix(out, "topk_ids", plan.topk_ids);
  add_matrix(out, "topk_weights", plan.topk_weights);
  if (gradients) add_backward_outputs(out, *gradients, o.prefix);
  out.write(o.output);

  std::cout << "grove: wrote " << in_quotes(o.output) << ": y [" << y.rows() << ", " << y.cols()
            << "], router_logits [" << plan.logits.rows() << ", " << plan.logits.cols() << "], topk_ids and topk_weights ["
            << plan.topk_ids.rows() << ", " << plan.topk_ids.cols() << "] (k = " << top_k
            << " from " << (routing.top_k ? routing.top_k_source : "default") << ", lambda = " << format_double(scale)
            << " from " << (routing.scale ? routing.scale_source : "default") << ")\n";
  return 0;
}

// ---- grove info ------------------------------------------------------------------------------

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
    if (!weights.contains(name)) return;  // only the optional bias may be absent here
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

void print_error(const std::string& message) {
  const std::string tag = "grove: ";
  std::cerr << (message.compare(0, tag.size(), tag) == 0 ? message : tag + message) << "\n";
}

}  // namespace

int main(int argc, char** argv) {
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
  run_cmd->add_option("--dtype", run.dtype, "weights in memory: f32 (default) or bf16 (half the bytes; no --backward)")
      ->check(CLI::IsMember({"f32", "bf16"}));
  run_cmd->add_option("--threads", run.threads, "threads of the CPU runner (default: every hardware thread)")
      ->transform(integer_in_range<int>())
      ->check(CLI::Range(1, 4096));
  run_cmd->add_option("--isa", run.isa, "instruction set of the kernels (default: the best this CPU runs)")
      ->check(CLI::IsMember({"scalar", "avx2", "avx512", "avx512_bf16"}));

  info_options info;
  CLI::App* info_cmd = app.add_subcommand("info", "Print a layer's configuration and parameter counts");
  info_cmd->add_option("--weights", info.weights, "checkpoint: a .safetensors file or a sharded checkpoint directory")
      ->required();
  info_cmd->add_option("--prefix", info.prefix, "layer prefix, e.g. model.layers.0.mlp")->required();
  info_cmd->add_option("--config", info.config, "Hugging Face config.json (k and lambda)");

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

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == static_cast<int>(CLI::ExitCodes::Success)) return app.exit(e);  // --help
    print_error(std::string("usage: ") + e.what());
    std::cerr << "Run 'grove --help' or 'grove <run|info|upcycle> --help' for the options.\n";
    return 2;
  }

  try {
    if (run_cmd->parsed()) {
      if (run.backward && run.dtype != "f32") {
        print_error("usage: --backward needs --dtype f32 (grove has no BF16 backward yet)");
        std::cerr << "Run 'grove run --help' for the options.\n";
        return 2;
      }
      run.top_k_given = top_k_opt->count() > 0;
      run.scale_given = scale_opt->count() > 0;
      return run_command(run);
    }
    if (upcycle_cmd->parsed()) return upcycle_command(upcycle);
    return info_command(info);
  } catch (const std::bad_alloc&) {
    print_error("out of memory");
  } catch (const std::exception& e) {
    print_error(e.what());
  } catch (...) {
    print_error("unknown error");
  }
  return 1;
}
