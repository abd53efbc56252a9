#pragma once

// What the `grove` tool's commands share (docs/cli.md): the options, the checks of its inputs and
// outputs, and the writing of a run's results. tools/grove.cpp runs the commands in one process;
// tools/expert_parallel_run.hpp runs `grove run` as one rank of many under mpirun.

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <limits>
#include <memory>
#include <optional>
#include <sstream>
#include <string>
#include <system_error>
#include <type_traits>
#include <utility>
#include <vector>

#include <CLI/CLI.hpp>

#include <grove/io.hpp>
#include <grove/training.hpp>

namespace grove_cli {

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
  std::string dtype;          ///< the weights in memory: f32, bf16, q8 or q4; empty: the file's own (run_setup::dtype)
  int threads = 0;            ///< 0: every hardware thread
  std::string isa;            ///< empty: the best this machine runs
  std::string quantized_kernels;  ///< auto, integer or dequantized (q8 and q4 only); empty: auto
};

struct info_options {
  std::string weights, prefix, config;
  int ranks = 0;  ///< --ranks P: also the expert-parallel placement on P ranks
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

inline routing_choice choose_routing(const std::optional<io::hf_config>& config, std::optional<index> cli_top_k,
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
inline std::string format_mib(std::size_t bytes) {
  std::ostringstream s;
  s.setf(std::ios::fixed);
  s.precision(1);
  s << static_cast<double>(bytes) / (1024.0 * 1024.0) << " MiB";
  return s.str();
}

/// The shortest decimal that reads back as `v` ("0.05", not "0.050000000000000003").
inline std::string format_double(double v) {
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
inline std::string in_quotes(const std::filesystem::path& p) { return grove::detail::quoted(p); }

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
inline CLI::Validator double_in_range() {
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
inline matrix read_rows(const io::safetensors_reader& in, const std::string& name, index cols) {
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

/// `dy` [T, H] of the input, as many rows as x (grove run --backward).
inline matrix read_dy(const io::safetensors_reader& in, const matrix& x, index cols) {
  matrix dy = read_rows(in, "dy", cols);
  if (dy.rows() != x.rows())
    throw grove::error("grove: 'dy' in " + in_quotes(in.path()) + " has " + std::to_string(dy.rows()) +
                       " rows but 'x' has " + std::to_string(x.rows()));
  return dy;
}

/// The files a checkpoint reads, each with how to name it in a message.
inline std::vector<std::pair<std::filesystem::path, std::string>> checkpoint_inputs(const io::checkpoint& weights) {
  std::vector<std::pair<std::filesystem::path, std::string>> out;
  for (const std::filesystem::path& file : weights.files())
    out.emplace_back(file, weights.sharded() ? "a file of the checkpoint (--weights)" : "the checkpoint (--weights)");
  return out;
}

/// Refuses to write `output` when it is one of the files the command reads: writing renames a
/// new file over it, which would destroy that input. The same file means the same device and
/// inode after following links, so a hard link or a symlink to an input is refused too.
inline void require_new_output(const std::filesystem::path& output, const char* option,
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
inline void require_finite_outputs(const grove::routing_plan<float>& plan, const matrix& y, const matrix& x,
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
inline backward_outputs compute_backward(const cli_layer& layer, const grove::routing_plan<float>& plan, const matrix& x,
                                  const matrix& dy) {
  grove::layer_gradients<float> g = grove::gradients<float>(layer.runner(), layer.weights(), plan, x, dy);
  return {std::move(g.input), std::move(g.weights)};
}

inline void add_backward_outputs(io::safetensors_writer& out, const backward_outputs& b, const std::string& prefix) {
  add_matrix(out, "dx", b.dx);
  io::add_layer(out, b.gradients.view(), "grad." + io::tensor_name(prefix, ""), io::dtype::f32,
                /*include_bias=*/false);
}

/// What `grove run` settles before it reads x: k and λ (defaults, config.json, command line),
/// the layer's sizes from the checkpoint's headers, and that OUT is none of the inputs.
struct run_setup {
  std::optional<io::hf_config> config;
  routing_choice routing;
  index top_k = 0;
  double scale = 0;
  grove::layer_dims dims;
  std::string dtype;  ///< --dtype, or the file's own format (q8, q4) or f32; f32 with --backward
};

/// Throws grove::error on a bad config.json, a checkpoint without the layer, an OUT that is an
/// input, or k outside [1, E] and λ < 0 or not finite. `warn`: print the warning of a λ above
/// the paper's bound (one rank of many prints it).
inline run_setup prepare_run(const run_options& o, const io::checkpoint& weights, bool warn) {
  run_setup s;
  if (!o.config.empty()) s.config = io::read_hf_config(o.config);
  s.routing = choose_routing(s.config, o.top_k_given ? std::optional<index>(o.top_k) : std::nullopt,
                             o.scale_given ? std::optional<double>(o.scale) : std::nullopt);
  s.top_k = s.routing.top_k.value_or(o.top_k);
  s.scale = s.routing.scale.value_or(o.scale);
  {
    auto inputs = checkpoint_inputs(weights);
    inputs.emplace_back(o.input, "the input (--input)");
    if (!o.config.empty()) inputs.emplace_back(o.config, "the config (--config)");
    require_new_output(o.output, "--output", inputs);
  }
  s.dims = io::infer_layer_dims(weights, o.prefix);
  s.dtype = !o.dtype.empty() ? o.dtype
            : o.backward     ? std::string("f32")
                             : std::string(grove::info_of(io::stored_layer_format(weights, o.prefix)).name);
  if (s.config) io::check_hf_config(*s.config, s.dims);
  (void)cli_config(s.dims, s.top_k, s.scale);  // rejects k outside [1, E] and λ < 0 or not finite
  if (!o.quantized_kernels.empty() && s.dtype != "q8" && s.dtype != "q4")
    throw grove::error("grove: --quantized-kernels chooses how q8 and q4 weights run, but this layer runs in " + s.dtype +
                       " (pass --dtype q8 or q4)");
  const double bound = static_cast<double>(s.dims.groups) / static_cast<double>(s.dims.experts);
  if (warn && s.scale > bound * (1.0 + 1e-12))
    std::cerr << "grove: warning: the adjugate scale lambda = " << format_double(s.scale)
              << " exceeds the paper's bound G / E = " << format_double(bound) << "; continuing\n";
  return s;
}

/// The CPU runner of --threads (0: `default_threads`), --isa and --quantized-kernels; throws if this CPU lacks the --isa.
inline std::shared_ptr<grove::cpu_runner> make_runner(const run_options& o, int default_threads = 0) {
  grove::cpu_runner_options options;
  options.threads = o.threads > 0 ? o.threads : default_threads;
  if (!o.isa.empty()) options.isa = grove::simd::parse_isa(o.isa);
  if (o.quantized_kernels == "integer") options.quantized = grove::quantized_kernels::integer_dots;
  if (o.quantized_kernels == "dequantized") options.quantized = grove::quantized_kernels::dequantized;
  return std::make_shared<grove::cpu_runner>(options);
}

/// Calls `fn.template operator()<Format>()` with the storage type of a `--dtype` (through
/// grove::visit_format, where a format named at run time becomes a type). The tool holds
/// activations in fp32, so it runs no f64 layer; CLI11 lets no "f64" through to here.
template <class Fn>
decltype(auto) with_cli_format(const std::string& dtype, Fn&& fn) {
  using result = decltype(fn.template operator()<float>());
  return grove::visit_format(grove::parse_weight_format(dtype), [&]<class Format>() -> result {
    if constexpr (std::is_same_v<Format, double>)
      throw grove::error("grove: --dtype f64 is not a format the grove tool runs");
    else
      return fn.template operator()<Format>();
  });
}

/// What `grove run` writes, however it was computed (one process, or gathered on rank 0 from
/// many): y, the routing (only the plan's logits, topk_ids and topk_weights are read) and, with
/// --backward, the gradients.
struct run_results {
  matrix y;
  grove::routing_plan<float> routing;
  std::optional<backward_outputs> gradients;
};

/// Checks that every result is finite, then writes OUT (a new file renamed over the old one).
inline void write_run_output(const run_options& o, const run_results& r, const matrix& x,
                             const io::safetensors_reader& in, index top_k, double scale) {
  require_finite_outputs(r.routing, r.y, x, in, scale);
  if (r.gradients) {
    grove::check_finite_rows(r.gradients->dx, "dx");
    try {
      grove::check_finite(r.gradients->gradients.view());
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
  add_matrix(out, "y", r.y);
  add_matrix(out, "router_logits", r.routing.logits);
  add_matrix(out, "topk_ids", r.routing.topk_ids);
  add_matrix(out, "topk_weights", r.routing.topk_weights);
  if (r.gradients) add_backward_outputs(out, *r.gradients, o.prefix);
  out.write(o.output);
}

/// The line `grove run` prints when it wrote OUT.
inline void print_wrote(const run_options& o, const run_results& r, const routing_choice& routing, index top_k,
                        double scale) {
  std::cout << "grove: wrote " << in_quotes(o.output) << ": y [" << r.y.rows() << ", " << r.y.cols()
            << "], router_logits [" << r.routing.logits.rows() << ", " << r.routing.logits.cols()
            << "], topk_ids and topk_weights [" << r.routing.topk_ids.rows() << ", " << r.routing.topk_ids.cols()
            << "] (k = " << top_k << " from " << (routing.top_k ? routing.top_k_source : "default")
            << ", lambda = " << format_double(scale) << " from " << (routing.scale ? routing.scale_source : "default")
            << ")\n";
}

inline void print_error(const std::string& message) {
  const std::string tag = "grove: ";
  std::cerr << (message.compare(0, tag.size(), tag) == 0 ? message : tag + message) << "\n";
}

}  // namespace grove_cli
