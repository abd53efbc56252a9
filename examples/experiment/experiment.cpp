// grove training experiment (docs/training.md, "Experiment").
//
// A small model — input projection, two pre-norm residual MoE blocks, a final RMSNorm and a
// linear head — trained with grove's exact CPU backward and AdamW on a synthetic regression
// task that needs different experts for different inputs: every input belongs to one of C
// clusters and the target is that cluster's own linear map of the input. Cluster frequencies
// follow a Zipf law, so a router left alone piles the frequent clusters onto a few experts.
// Three runs, same data and seeds:
//   (a) grove        Grove layers, auxiliary-loss-free bias update (b -= α (F−Q)/‖F−Q‖)
//   (b) plain-moe    the same without adjugates, I widened so the active parameters per token
//                    are at least Grove's largest, with the same bias update
//   (c) grove-nobal  Grove layers, no load balancing
// Writes <out>/<run>.csv (one row per step) and <out>/experiment.svg (loss, load spread,
// distinct groups per token), and prints progress.
//
//   grove_experiment [out_dir=./experiment_out] [--steps N] [--tokens T] [--seed S] [--save-layers DIR]
//
// --save-layers DIR writes the trained Grove run's MoE layers (DIR/layer-<l>.safetensors, prefix
// "block") and each layer's inputs on the held-out batch (DIR/inputs-<l>.safetensors, "x"): the
// trained weights grove_quantization_accuracy measures the block formats on.

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <grove/training.hpp>
#include <numeric>
#include <span>
#include <string>
#include <vector>

#if __has_include(<nlohmann/json.hpp>)
#include <grove/io.hpp>
#define GROVE_EXPERIMENT_SAVES 1
#else
#define GROVE_EXPERIMENT_SAVES 0
#endif

#include "svg_plot.hpp"
#include "task.hpp"

namespace {

using experiment::hyper;
using experiment::task;
using grove::index;
using matrix = grove::row_matrix<float>;

// ---------------------------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------------------------

struct run_config {
  std::string name;
  std::string label;
  std::string color;
  bool adjugates = true;
  bool balance = true;
};

struct moe_block {
  grove::layer_parameters<float> params, grads;
  std::vector<float> gain, dgain;
  grove::adamw<float> opt, gain_opt;
  // per step
  matrix x, normed, y;
  grove::routing_plan<float> plan;
  grove::saved_activations<float> saved;
};

struct model {
  hyper hp;
  bool adjugates;
  grove::layer_dims dims;
  index d_in, d_out;
  std::vector<float> dense, ddense;  // w_in [H, D_in] then w_out [D_out, H], one optimizer
  std::vector<float> final_gain, dfinal_gain;
  std::vector<moe_block> blocks;
  grove::adamw<float> dense_opt, gain_opt;
  matrix x_final, normed_final, out;

  model(const hyper& h, const task& tk, bool with_adjugates, std::uint64_t seed)
      : hp(h),
        adjugates(with_adjugates),
        d_in(tk.input),
        d_out(tk.output),
        dense_opt(adam(h.weight_decay)),
        gain_opt(adam(0.0)) {
    // Plain MoE: no adjugates; I widened by Ia·min(k, G)/k so that its active parameters per
    // token equal Grove's at the most distinct groups, n_g = min(k, G) (Grove's largest). The
    // one-group, Ia = 1 adjugate it carries is never dispatched (see forward).
    dims = adjugates ? grove::layer_dims{h.hidden, h.experts, h.groups, h.expert_inter, h.adjugate_inter}
                     : grove::layer_dims{h.hidden, h.experts, 1,
                                         h.expert_inter + h.adjugate_inter * std::min(h.top_k, h.groups) / h.top_k, 1};
    dense = experiment::initial_dense(h, d_in, d_out, seed);
    ddense.assign(dense.size(), 0.0f);
    final_gain.assign(static_cast<std::size_t>(h.hidden), 1.0f);
    dfinal_gain.assign(final_gain.size(), 0.0f);
    for (index l = 0; l < h.layers; ++l) {
      blocks.push_back(moe_block{grove::layer_parameters<float>::random(dims, seed + 100 + std::uint64_t(l), 0.15),
                                 grove::layer_parameters<float>(dims),
                                 std::vector<float>(static_cast<std::size_t>(h.hidden), 1.0f),
                                 std::vector<float>(static_cast<std::size_t>(h.hidden), 0.0f),
                                 adam(h.weight_decay),
                                 adam(0.0),
                                 {},
                                 {},
                                 {},
                                 {},
                                 {}});
    }
  }

  static grove::adamw<float> adam(double wd) { return experiment::adam(wd); }
  grove::matrix_map<float> w_in(std::vector<float>& v) { return {v.data(), hp.hidden, d_in}; }
  grove::matrix_map<float> w_out(std::vector<float>& v) { return {v.data() + hp.hidden * d_in, d_out, hp.hidden}; }

  /// A plain MoE routes with adjugate_mode::none: its plans dispatch to routed experts only (the
  /// one-group, Ia = 1 adjugate it carries is never run).
  grove::routing_options routing() const {
    return {hp.top_k, adjugates ? hp.lambda : 0.0,
            adjugates ? grove::adjugate_mode::once_per_token : grove::adjugate_mode::none};
  }

  /// Forward of a batch, keeping what backward needs. Returns the mean squared error.
  double forward(const matrix& u, const matrix& target) {
    matrix x = u * w_in(dense).transpose();
    for (auto& b : blocks) {
      b.x = x;
      b.normed.resize(x.rows(), x.cols());
      grove::rms_norm<float>(b.x, b.gain, hp.norm_eps, b.normed);
      b.plan = grove::route(b.params.view(), routing(), b.normed);
      b.y.resize(x.rows(), x.cols());
      grove::forward_saving<float>(b.params.view(), b.plan, b.normed, b.y, b.saved);
      x += b.y;
    }
    x_final = x;
    normed_final.resize(x.rows(), x.cols());
    grove::rms_norm<float>(x_final, final_gain, hp.norm_eps, normed_final);
    out = normed_final * w_out(dense).transpose();
    return double((out - target).squaredNorm()) / double(out.size());
  }

  /// Backward of the mean squared error of the last forward into freshly zeroed gradients.
  void backward(const matrix& u, const matrix& target) {
    const matrix dout = (out - target) * (2.0f / float(out.size()));
    w_out(ddense).noalias() = dout.transpose() * normed_final;
    const matrix dnormed = dout * w_out(dense);
    matrix dx = matrix::Zero(x_final.rows(), x_final.cols());
    std::fill(dfinal_gain.begin(), dfinal_gain.end(), 0.0f);
    grove::rms_norm_backward<float>(x_final, final_gain, hp.norm_eps, dnormed, dx, dfinal_gain);
    for (auto it = blocks.rbegin(); it != blocks.rend(); ++it) {
      moe_block& b = *it;
      // x_out = x + MoE(norm(x)): dx passes through the residual; the block adds its part.
      matrix dnorm = matrix::Zero(dx.rows(), dx.cols());
      b.grads.zero_values();
      grove::backward<float>(b.params.view(), b.plan, b.normed, dx, b.grads.span(), dnorm, &b.saved);
      std::fill(b.dgain.begin(), b.dgain.end(), 0.0f);
      grove::rms_norm_backward<float>(b.x, b.gain, hp.norm_eps, dnorm, dx, b.dgain);
    }
    w_in(ddense).noalias() = dx.transpose() * u;
  }

  void update(int step, bool balance) {
    const double lr = experiment::learning_rate(hp, step);
    dense_opt.set_learning_rate(lr);
    gain_opt.set_learning_rate(lr);
    dense_opt.step(dense, ddense);
    gain_opt.step(final_gain, dfinal_gain);
    for (auto& b : blocks) {
      b.opt.set_learning_rate(lr);
      b.gain_opt.set_learning_rate(lr);
      b.opt.step(b.params, b.grads);
      b.gain_opt.step(b.gain, b.dgain);
      // Auxiliary-loss-free balancing: the bias moves selection, never the weights.
      if (balance)
        grove::update_selection_bias(b.params.bias(), b.plan, {hp.bias_rate, grove::bias_update_rule::normalized});
    }
  }

  /// Active parameters per token of the MoE blocks (router + k experts + n_g adjugates).
  [[nodiscard]] double active_parameters(double mean_groups) const {
    const double per_layer = double(grove::activated_parameters(dims, hp.top_k, 0)) +
                             (adjugates ? mean_groups * 3.0 * double(dims.hidden * dims.adjugate_intermediate) : 0.0);
    return per_layer * double(hp.layers);
  }
};

struct step_record {
  int step;
  double loss, eval_loss, load_cv, load_max_over_mean, idle_experts, distinct_groups, tokens_per_s;
};

struct run_result {
  run_config config;
  std::vector<step_record> steps;
  double seconds = 0, final_eval = 0, active_parameters = 0;
};

struct options {
  std::filesystem::path out = "experiment_out";
  std::filesystem::path save_layers;  ///< empty: do not save
  int steps = 400;
  index tokens = 512;
  std::uint64_t seed = 1;
};

// Means over the blocks, for the last forward: load spread, experts that got no pick, distinct
// groups per token.
void routing_metrics(const model& m, double& cv, double& max_over_mean, double& idle, double& groups) {
  cv = max_over_mean = idle = groups = 0;
  for (const auto& b : m.blocks) {
    grove::expert_load_counter load(b.plan.experts);
    load.add(b.plan);
    const auto spread = grove::measure_load_spread(load.counts());
    cv += spread.coefficient_of_variation;
    max_over_mean += spread.max_over_mean;
    idle += double(std::count(load.counts().begin(), load.counts().end(), index(0)));
    const auto& n = b.plan.groups_per_token;
    groups += double(std::accumulate(n.begin(), n.end(), index(0))) / double(n.size());
  }
  const double layers = double(m.blocks.size());
  cv /= layers;
  max_over_mean /= layers;
  idle /= layers;
  groups /= layers;
}

run_result train(const run_config& config, const hyper& hp, const task& tk, const options& opt) {
  run_result r;
  r.config = config;
  model m(hp, tk, config.adjugates, opt.seed * 1000 + 7);
  grove::detail::normal_generator data(opt.seed * 1000 + 1);  // the same batches for every run
  grove::detail::normal_generator eval_data(opt.seed * 1000 + 2);
  matrix u, y, eval_u, eval_y;
  std::vector<int> ids, eval_ids;
  tk.sample(2048, eval_data, eval_u, eval_y, eval_ids);
  std::printf("\n== %s: %s (dims H=%td E=%td G=%td I=%td Ia=%td, k=%td, lambda=%.2f, %s)\n", config.name.c_str(),
              config.label.c_str(), m.dims.hidden, m.dims.experts, m.dims.groups, m.dims.expert_intermediate,
              m.dims.adjugate_intermediate, hp.top_k, m.routing().scale,
              config.balance ? "bias update" : "no balancing");
  double groups_sum = 0;
  const auto start = std::chrono::steady_clock::now();
  for (int step = 0; step < opt.steps; ++step) {
    tk.sample(opt.tokens, data, u, y, ids);
    const auto t0 = std::chrono::steady_clock::now();
    const double loss = m.forward(u, y);
    m.backward(u, y);
    m.update(step, config.balance);
    const double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    step_record rec{step, loss, std::nan(""), 0, 0, 0, 0, double(opt.tokens) / dt};
    routing_metrics(m, rec.load_cv, rec.load_max_over_mean, rec.idle_experts, rec.distinct_groups);
    if (!config.adjugates)
      rec.distinct_groups = std::nan("");  // no adjugates: not meaningful
    else
      groups_sum += rec.distinct_groups;
    if (step % 25 == 0 || step + 1 == opt.steps) rec.eval_loss = m.forward(eval_u, eval_y);
    r.steps.push_back(rec);
    if (step % 25 == 0 || step + 1 == opt.steps) {
      char groups[16] = "-";
      if (config.adjugates) std::snprintf(groups, sizeof groups, "%.2f", rec.distinct_groups);
      std::printf("step %4d  loss %.4f  eval %.4f  load cv %.3f  max/mean %.2f  groups/token %s  %.0f tokens/s\n", step,
                  loss, rec.eval_loss, rec.load_cv, rec.load_max_over_mean, groups, rec.tokens_per_s);
    }
  }
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  r.final_eval = r.steps.back().eval_loss;
  if (!opt.save_layers.empty() && config.name == "grove") {
#if GROVE_EXPERIMENT_SAVES
    // The last forward was the held-out batch's: each block's normed input is that batch's.
    std::filesystem::create_directories(opt.save_layers);
    for (std::size_t l = 0; l < m.blocks.size(); ++l) {
      const moe_block& b = m.blocks[l];
      grove::io::save_layer(opt.save_layers / ("layer-" + std::to_string(l) + ".safetensors"), b.params.view(), "block");
      grove::io::safetensors_writer inputs;
      inputs.add("x", grove::io::tensor_shape{b.normed.rows(), b.normed.cols()},
                 std::span<const float>(b.normed.data(), static_cast<std::size_t>(b.normed.size())));
      inputs.write(opt.save_layers / ("inputs-" + std::to_string(l) + ".safetensors"));
    }
    std::printf("saved the trained layers and their held-out inputs in %s\n", opt.save_layers.string().c_str());
#else
    std::fprintf(stderr, "grove_experiment: --save-layers needs grove::io (nlohmann/json); not saved\n");
#endif
  }
  r.active_parameters = m.active_parameters(config.adjugates ? groups_sum / opt.steps : 0.0);
  return r;
}

void write_csv(const run_result& r, const std::filesystem::path& dir) {
  std::ofstream f(dir / (r.config.name + ".csv"));
  f << "step,loss,eval_loss,load_cv,load_max_over_mean,idle_experts,distinct_groups_per_token,tokens_per_s\n";
  auto num = [](double v) { return std::isfinite(v) ? std::to_string(v) : std::string(); };
  for (const auto& s : r.steps)
    f << s.step << ',' << num(s.loss) << ',' << num(s.eval_loss) << ',' << num(s.load_cv) << ','
      << num(s.load_max_over_mean) << ',' << num(s.idle_experts) << ',' << num(s.distinct_groups) << ','
      << num(s.tokens_per_s) << '\n';
}

void write_plot(const std::vector<run_result>& runs, const hyper& hp, const options& opt,
                const std::filesystem::path& file) {
  plot::panel loss{"Held-out loss (MSE)", "step", "mean squared error", true, {}};
  plot::panel cv{"Expert load spread", "step", "coefficient of variation of picks", false, {}};
  plot::panel peak{"Busiest expert", "step", "max load / mean load", false, {}};
  plot::panel groups{"Distinct groups per token (Grove)", "step", "n_g (1 .. min(k, G))", false, {}};
  for (const auto& r : runs) {
    plot::series l{r.config.label, r.config.color, {}, {}}, c = l, p = l, g = l;
    // Load curves are averaged over 10 steps so that batch noise does not hide the trend.
    const std::size_t window = 10;
    for (std::size_t i = 0; i < r.steps.size(); ++i) {
      const auto& s = r.steps[i];
      if (std::isfinite(s.eval_loss)) {
        l.x.push_back(s.step);
        l.y.push_back(s.eval_loss);
      }
      if ((i + 1) % window == 0) {
        double a = 0, b = 0, d = 0;
        for (std::size_t j = i + 1 - window; j <= i; ++j) {
          a += r.steps[j].load_cv;
          b += r.steps[j].load_max_over_mean;
          d += r.steps[j].distinct_groups;
        }
        const double x = double(r.steps[i].step) - double(window - 1) / 2;
        c.x.push_back(x);
        c.y.push_back(a / window);
        p.x.push_back(x);
        p.y.push_back(b / window);
        g.x.push_back(x);
        g.y.push_back(d / window);
      }
    }
    loss.lines.push_back(l);
    cv.lines.push_back(c);
    peak.lines.push_back(p);
    if (r.config.adjugates) groups.lines.push_back(g);
  }
  char title[256];
  std::snprintf(title, sizeof title, "grove experiment: %td MoE layers, E=%td, k=%td, G=%td, %td tokens/step",
                hp.layers, hp.experts, hp.top_k, hp.groups, opt.tokens);
  std::ofstream(file) << plot::render({loss, cv, peak, groups}, title, 2);
}

options parse(int argc, char** argv) {
  options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) {
        std::fprintf(stderr, "grove_experiment: %s needs a value\n", a.c_str());
        std::exit(2);
      }
      return argv[++i];
    };
    if (a == "--steps")
      o.steps = std::stoi(value());
    else if (a == "--tokens")
      o.tokens = std::stol(value());
    else if (a == "--seed")
      o.seed = std::stoull(value());
    else if (a == "--save-layers")
      o.save_layers = value();
    else if (a == "-h" || a == "--help") {
      std::printf("usage: grove_experiment [out_dir=./experiment_out] [--steps N=400] [--tokens T=512] [--seed S=1] "
                  "[--save-layers DIR]\n");
      std::exit(0);
    } else if (!a.empty() && a[0] == '-') {
      std::fprintf(stderr, "grove_experiment: unknown option %s\n", a.c_str());
      std::exit(2);
    } else
      o.out = a;
  }
  if (o.steps < 1 || o.tokens < 1) {
    std::fprintf(stderr, "grove_experiment: --steps and --tokens must be positive\n");
    std::exit(2);
  }
  return o;
}

}  // namespace

int main(int argc, char** argv) {
  const options opt = parse(argc, argv);
  const hyper hp;
  const task tk(opt.seed);
  std::filesystem::create_directories(opt.out);

  const std::vector<run_config> configs = {
      {"grove", "(a) Grove + bias update", "#1f77b4", true, true},
      {"plain-moe", "(b) plain MoE (same active params) + bias update", "#2ca02c", false, true},
      {"grove-nobal", "(c) Grove, no balancing", "#d62728", true, false},
  };
  std::vector<run_result> runs;
  for (const auto& c : configs) {
    runs.push_back(train(c, hp, tk, opt));
    write_csv(runs.back(), opt.out);
  }
  write_plot(runs, hp, opt, opt.out / "experiment.svg");

  std::printf("\nlast 50 steps (routing) and final held-out loss:\n");
  std::printf("%-13s %11s %9s %9s %6s %13s %14s %8s\n", "run", "final eval", "load cv", "max/mean", "idle",
              "groups/token", "active params", "seconds");
  for (const auto& r : runs) {
    // Routing metrics averaged over the last 50 steps.
    const std::size_t from = r.steps.size() > 50 ? r.steps.size() - 50 : 0;
    double cv = 0, mm = 0, idle = 0, g = 0;
    for (std::size_t i = from; i < r.steps.size(); ++i) {
      cv += r.steps[i].load_cv;
      mm += r.steps[i].load_max_over_mean;
      idle += r.steps[i].idle_experts;
      g += r.steps[i].distinct_groups;
    }
    const double n = double(r.steps.size() - from);
    char groups[16] = "-";
    if (r.config.adjugates) std::snprintf(groups, sizeof groups, "%.2f", g / n);
    std::printf("%-13s %11.4f %9.3f %9.2f %6.2f %13s %14.0f %8.1f\n", r.config.name.c_str(), r.final_eval, cv / n,
                mm / n, idle / n, groups, r.active_parameters, r.seconds);
  }
  std::printf("\nwrote %s/{grove,plain-moe,grove-nobal}.csv and %s/experiment.svg\n", opt.out.string().c_str(),
              opt.out.string().c_str());
  return 0;
}
