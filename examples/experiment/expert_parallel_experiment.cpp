// grove expert-parallel training (docs/distributed.md, "Training"): the Grove run of
// grove_experiment (an input projection, two pre-norm residual MoE blocks, a final RMSNorm and a
// linear head, trained with AdamW and the auxiliary-loss-free bias update on the experiment's
// task) under `mpirun -np P`:
//   - experts are expert-parallel: each rank holds the experts and adjugates of its groups
//     (grove::expert_parallel_layer over a shard of each block's weights) and their AdamW moments;
//   - tokens are data-parallel: each step's batch of T tokens is split into contiguous blocks in
//     rank order;
//   - the dense parts (projections, norm gains, routers, selection biases) are replicated. Their
//     gradients are sums over every token: each rank gathers the rows those sums need from every
//     rank, in rank order, and adds them token by token, so the sum is the same for every P;
//   - the bias update takes the per-expert pick counts of the whole batch (integers, gathered).
// Every row-wise product is a plain loop, so a token's numbers do not depend on which rank or
// batch it is in. So every P prints the same losses as P = 1, bit for bit (tests/mpi checks
// P = 1 … 4 and a save and resume).
//
//   mpirun -np P grove_experiment_ep [--steps N=400] [--tokens T=512] [--seed S=1] [--csv FILE]
//                                    [--save DIR] [--resume DIR]
//
// --save DIR writes, after the last step, one file per rank with its groups' experts, adjugates
// and their AdamW moments (rank-<r>-of-<P>.safetensors), and the replicated parts once
// (replicated.safetensors, by rank 0). --resume DIR continues such a run on as many ranks.
#include <grove/grove.hpp>
#include <grove/io.hpp>
#include <grove/mpi.hpp>
#include <grove/training.hpp>

#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "task.hpp"

namespace {

using experiment::adam;
using experiment::hyper;
using experiment::task;
using grove::index;
using matrix = grove::row_matrix<float>;
using config_t = grove::dynamic_config<float>;
namespace io = grove::io;

// ---- rows across ranks ------------------------------------------------------------------------

/// Rank r's block of a batch's rows (contiguous, nearly equal blocks in rank order).
matrix rows_of_rank(const matrix& all, int P, int r) {
  const index first = grove::first_row_of_rank(all.rows(), P, r);
  return all.middleRows(first, grove::first_row_of_rank(all.rows(), P, r + 1) - first);
}

/// Every rank's rows, in rank order, on every rank.
matrix gather(grove::communicator& comm, const matrix& mine) { return grove::gather_rows_in_rank_order<float>(comm, mine); }

// ---- products in a fixed order ------------------------------------------------------------------

/// out[t, o] = Σ_i a[t, i] · w[o, i] with i ascending: row t's result depends on row t alone.
matrix times_transposed(const matrix& a, const float* w, index outputs) {
  matrix out(a.rows(), outputs);
  for (index t = 0; t < a.rows(); ++t)
    for (index o = 0; o < outputs; ++o) {
      float sum = 0;
      for (index i = 0; i < a.cols(); ++i) sum += a(t, i) * w[o * a.cols() + i];
      out(t, o) = sum;
    }
  return out;
}

/// out[t, i] = Σ_o d[t, o] · w[o, i] with o ascending.
matrix times(const matrix& d, const float* w, index inputs) {
  matrix out(d.rows(), inputs);
  for (index t = 0; t < d.rows(); ++t)
    for (index i = 0; i < inputs; ++i) {
      float sum = 0;
      for (index o = 0; o < d.cols(); ++o) sum += d(t, o) * w[o * inputs + i];
      out(t, i) = sum;
    }
  return out;
}

/// dw[o, i] = Σ_t d[t, o] · a[t, i] with t ascending, over the rows of every rank (gathered).
void outer_sum(const matrix& d, const matrix& a, float* dw) {
  for (index o = 0; o < d.cols(); ++o)
    for (index i = 0; i < a.cols(); ++i) {
      float sum = 0;
      for (index t = 0; t < d.rows(); ++t) sum += d(t, o) * a(t, i);
      dw[o * a.cols() + i] = sum;
    }
}

/// The gain gradient of an RMSNorm over every rank's rows (rms_norm_backward sums tokens in
/// order); this rank's dx comes from its own rows.
void norm_backward(grove::communicator& comm, const matrix& x, std::span<const float> gain, double eps,
                   const matrix& dy, matrix& dx, std::vector<float>& dgain) {
  std::vector<float> unused(gain.size(), 0.0f);
  grove::rms_norm_backward<float>(x, gain, eps, dy, dx, unused);
  const matrix all_x = gather(comm, x), all_dy = gather(comm, dy);
  matrix unused_dx = matrix::Zero(all_x.rows(), all_x.cols());
  std::fill(dgain.begin(), dgain.end(), 0.0f);
  grove::rms_norm_backward<float>(all_x, gain, eps, all_dy, unused_dx, dgain);
}

// ---- the model ----------------------------------------------------------------------------------

struct moe_block {
  grove::layer_parameters<float> params, grads;  // this rank's shard: router, bias, its groups
  std::vector<float> gain, dgain;
  grove::adamw<float> opt = adam(0.0), gain_opt = adam(0.0);  // opt gets hp.weight_decay
  std::optional<grove::expert_parallel_layer<config_t>> layer;  // over params (a view)
  matrix x, normed;                                             // this rank's rows, this step
  grove::expert_parallel_forward<float> forward;
  std::vector<index> counts;  // picks per expert of the whole batch, this step
};

struct model {
  hyper hp;
  grove::communicator& comm;
  grove::layer_dims dims;
  grove::group_placement placement;
  index d_in, d_out;
  std::vector<float> dense, ddense;  // w_in [H, D_in] then w_out [D_out, H]
  std::vector<float> final_gain, dfinal_gain;
  std::vector<std::unique_ptr<moe_block>> blocks;
  grove::adamw<float> dense_opt, gain_opt = adam(0.0);
  matrix x_final, normed_final, out;  // this rank's rows

  model(const hyper& h, const task& tk, grove::communicator& c, std::uint64_t seed, int threads)
      : hp(h),
        comm(c),
        dims{h.hidden, h.experts, h.groups, h.expert_inter, h.adjugate_inter},
        placement(grove::group_placement::balanced(h.groups, c.size())),
        d_in(tk.input),
        d_out(tk.output),
        dense_opt(adam(h.weight_decay)) {
    // The same draws as grove_experiment's Grove run.
    dense = experiment::initial_dense(h, d_in, d_out, seed);
    ddense.assign(dense.size(), 0.0f);
    final_gain.assign(static_cast<std::size_t>(h.hidden), 1.0f);
    dfinal_gain.assign(final_gain.size(), 0.0f);
    const std::vector<index> mine = placement.groups_of(comm.rank());
    grove::cpu_runner_options options;
    options.threads = threads;
    const auto runner = std::make_shared<grove::cpu_runner>(options);
    for (index l = 0; l < h.layers; ++l) {
      auto b = std::make_unique<moe_block>();
      // Every rank draws the whole layer (it is small here) and keeps its groups; a large model
      // would load its shard from a checkpoint (io::load_layer with the rank's groups).
      const auto whole = grove::layer_parameters<float>::random(dims, seed + 100 + std::uint64_t(l), 0.15);
      b->params = grove::layer_parameters<float>::from(whole.view().only_groups(mine));
      b->grads = grove::layer_parameters<float>::shard(dims, mine);
      b->opt = adam(h.weight_decay);
      b->gain.assign(static_cast<std::size_t>(h.hidden), 1.0f);
      b->dgain.assign(b->gain.size(), 0.0f);
      b->layer.emplace(comm, placement, config_t(dims, h.top_k, h.lambda), b->params.view(), runner);
      blocks.push_back(std::move(b));
    }
  }

  float* w_in(std::vector<float>& v) { return v.data(); }
  float* w_out(std::vector<float>& v) { return v.data() + hp.hidden * d_in; }

  /// Forward of this rank's rows u [T_r, D_in] (keeping what backward needs when `training`);
  /// returns the mean squared error over every rank's tokens.
  double forward(const matrix& u, const matrix& target, bool training) {
    matrix x = times_transposed(u, w_in(dense), hp.hidden);
    for (auto& b : blocks) {
      b->x = x;
      b->normed.resize(x.rows(), x.cols());
      grove::rms_norm<float>(b->x, b->gain, hp.norm_eps, b->normed);
      if (training) {
        b->forward = b->layer->forward_for_training(b->normed);
      } else {
        b->layer->forward(b->normed, b->forward);
      }
      x += b->forward.y;
    }
    x_final = x;
    normed_final.resize(x.rows(), x.cols());
    grove::rms_norm<float>(x_final, final_gain, hp.norm_eps, normed_final);
    out = times_transposed(normed_final, w_out(dense), d_out);
    // Each token's squared error, then their sum over every rank's tokens in order.
    std::vector<double> errors(static_cast<std::size_t>(out.rows()), 0.0);
    for (index t = 0; t < out.rows(); ++t)
      for (index o = 0; o < d_out; ++o) errors[static_cast<std::size_t>(t)] += std::pow(double(out(t, o) - target(t, o)), 2);
    const std::vector<double> all = grove::gather_in_rank_order(comm, std::span<const double>(errors));
    double sum = 0;
    for (const double e : all) sum += e;
    return sum / double(all.size() * static_cast<std::size_t>(d_out));
  }

  /// Backward of the last training forward's mean squared error over `total` tokens.
  void backward(const matrix& u, const matrix& target, index total) {
    const matrix dout = (out - target) * (2.0f / float(total * d_out));
    outer_sum(gather(comm, dout), gather(comm, normed_final), w_out(ddense));
    const matrix dnormed = times(dout, w_out(dense), hp.hidden);
    matrix dx = matrix::Zero(x_final.rows(), x_final.cols());
    norm_backward(comm, x_final, final_gain, hp.norm_eps, dnormed, dx, dfinal_gain);
    for (auto it = blocks.rbegin(); it != blocks.rend(); ++it) {
      moe_block& b = **it;
      // x_out = x + MoE(norm(x)): dx passes through the residual; the block adds its part.
      matrix dnorm = matrix::Zero(dx.rows(), dx.cols());
      b.grads.zero_values();
      b.layer->backward(b.forward, b.normed, dx, b.grads.span(), dnorm);
      norm_backward(comm, b.x, b.gain, hp.norm_eps, dnorm, dx, b.dgain);
    }
    outer_sum(gather(comm, dx), gather(comm, u), w_in(ddense));
  }

  void update(int step) {
    const double lr = experiment::learning_rate(hp, step);
    dense_opt.set_learning_rate(lr);
    gain_opt.set_learning_rate(lr);
    dense_opt.step(dense, ddense);
    gain_opt.step(final_gain, dfinal_gain);
    for (auto& b : blocks) {
      b->opt.set_learning_rate(lr);
      b->gain_opt.set_learning_rate(lr);
      b->opt.step(b->params, b->grads);  // the router (replicated, same gradient) and this rank's groups
      b->gain_opt.step(b->gain, b->dgain);
      // The picks per expert of the whole batch: every rank's counts, summed (exactly).
      std::vector<index> own(static_cast<std::size_t>(dims.experts));
      for (index e = 0; e < dims.experts; ++e) own[static_cast<std::size_t>(e)] = b->forward.plan.expert_load(e);
      const std::vector<index> all = grove::gather_in_rank_order(comm, std::span<const index>(own));
      b->counts.assign(own.size(), 0);
      for (std::size_t i = 0; i < all.size(); ++i) b->counts[i % own.size()] += all[i];
      grove::update_selection_bias(b->params.bias(), std::span<const index>(b->counts),
                                   {hp.bias_rate, grove::bias_update_rule::normalized});
    }
  }
};

// ---- saving and resuming ------------------------------------------------------------------------

/// The tensors of a block shard's layout (its values, or an AdamW moment of them) under the
/// checkpoint names "<prefix>.<tensor>": the router into `replicated`, the groups' into `own`.
void add_shard(io::safetensors_writer* replicated, io::safetensors_writer& own, const model& m,
               std::span<const float> flat, const std::string& prefix) {
  auto layout = grove::layer_parameters<float>::shard(m.dims, m.placement.groups_of(m.comm.rank()));
  std::copy(flat.begin(), flat.end(), layout.values().begin());
  layout.view().for_each_tensor([&](const grove::tensor_info& info, const float* const& p) {
    if (p == nullptr || info.role == grove::tensor_role::selection_bias) return;
    io::safetensors_writer* to = info.role == grove::tensor_role::router ? replicated : &own;
    if (to != nullptr)
      to->add(prefix + "." + info.name, io::tensor_shape{info.rows, info.cols},
              std::span<const float>(p, static_cast<std::size_t>(info.size())));
  });
}

/// The flat vector of a shard's layout read back from the two files (add_shard's names).
std::vector<float> read_shard(const io::safetensors_reader& replicated, const io::safetensors_reader& own,
                              const model& m, const std::string& prefix) {
  auto layout = grove::layer_parameters<float>::shard(m.dims, m.placement.groups_of(m.comm.rank()));
  layout.span().for_each_tensor([&](const grove::tensor_info& info, float* const& p) {
    if (p == nullptr || info.role == grove::tensor_role::selection_bias) return;
    const io::safetensors_reader& from = info.role == grove::tensor_role::router ? replicated : own;
    from.read_into(from.at(prefix + "." + info.name), std::span<float>(p, static_cast<std::size_t>(info.size())));
  });
  return {layout.values().begin(), layout.values().end()};
}

std::string block_name(std::size_t l) { return "blocks." + std::to_string(l); }

void add_vector(io::safetensors_writer& w, const std::string& name, std::span<const float> v) {
  w.add(name, io::tensor_shape{static_cast<std::int64_t>(v.size())}, v);
}
std::vector<float> read_vector(const io::safetensors_reader& r, const std::string& name) {
  const io::tensor_entry& e = r.at(name);
  std::vector<float> v(static_cast<std::size_t>(e.elements));
  r.read_into(e, std::span<float>(v));
  return v;
}

std::filesystem::path rank_file(const std::filesystem::path& dir, int rank, int ranks) {
  return dir / ("rank-" + std::to_string(rank) + "-of-" + std::to_string(ranks) + ".safetensors");
}

/// Writes the run after `steps` steps: each rank its groups, rank 0 the replicated parts too.
void save(const model& m, const std::filesystem::path& dir, int steps) {
  const bool root = m.comm.rank() == 0;
  io::safetensors_writer replicated, own;
  own.set_metadata("rank", std::to_string(m.comm.rank()));
  own.set_metadata("ranks", std::to_string(m.comm.size()));
  replicated.set_metadata("steps", std::to_string(steps));
  replicated.set_metadata("ranks", std::to_string(m.comm.size()));
  replicated.set_metadata("dense_optimizer_steps", std::to_string(m.dense_opt.steps()));
  add_vector(replicated, "dense", m.dense);
  add_vector(replicated, "dense.exp_avg", m.dense_opt.first_moment());
  add_vector(replicated, "dense.exp_avg_sq", m.dense_opt.second_moment());
  add_vector(replicated, "final_norm.weight", m.final_gain);
  add_vector(replicated, "final_norm.exp_avg", m.gain_opt.first_moment());
  add_vector(replicated, "final_norm.exp_avg_sq", m.gain_opt.second_moment());
  for (std::size_t l = 0; l < m.blocks.size(); ++l) {
    const moe_block& b = *m.blocks[l];
    const std::string name = block_name(l);
    add_shard(&replicated, own, m, b.params.values(), name);
    add_shard(&replicated, own, m, b.opt.first_moment(), name + ".exp_avg");
    add_shard(&replicated, own, m, b.opt.second_moment(), name + ".exp_avg_sq");
    add_vector(replicated, name + ".expert_bias", b.params.bias());
    add_vector(replicated, name + ".norm.weight", b.gain);
    add_vector(replicated, name + ".norm.exp_avg", b.gain_opt.first_moment());
    add_vector(replicated, name + ".norm.exp_avg_sq", b.gain_opt.second_moment());
  }
  m.comm.step("saving the run", [&] {
    std::filesystem::create_directories(dir);
    own.write(rank_file(dir, m.comm.rank(), m.comm.size()));
    if (root) replicated.write(dir / "replicated.safetensors");
  });
}

/// Reads a run saved by save() on as many ranks; returns the steps it had taken.
int resume(model& m, const std::filesystem::path& dir) {
  int steps = 0;
  m.comm.step("resuming the run", [&] {
    const io::safetensors_reader replicated(dir / "replicated.safetensors");
    const auto ranks = replicated.metadata().find("ranks");
    if (ranks == replicated.metadata().end() || ranks->second != std::to_string(m.comm.size()))
      throw grove::error("grove_experiment_ep: " + dir.string() + " holds a run on " +
                         (ranks == replicated.metadata().end() ? std::string("an unknown number of") : ranks->second) +
                         " ranks; resume it on as many");
    const io::safetensors_reader own(rank_file(dir, m.comm.rank(), m.comm.size()));
    steps = std::stoi(replicated.metadata().at("steps"));
    const std::int64_t optimizer_steps = std::stoll(replicated.metadata().at("dense_optimizer_steps"));
    m.dense = read_vector(replicated, "dense");
    m.dense_opt.restore(optimizer_steps, read_vector(replicated, "dense.exp_avg"),
                        read_vector(replicated, "dense.exp_avg_sq"));
    m.final_gain = read_vector(replicated, "final_norm.weight");
    m.gain_opt.restore(optimizer_steps, read_vector(replicated, "final_norm.exp_avg"),
                       read_vector(replicated, "final_norm.exp_avg_sq"));
    for (std::size_t l = 0; l < m.blocks.size(); ++l) {
      moe_block& b = *m.blocks[l];
      const std::string name = block_name(l);
      const std::vector<float> values = read_shard(replicated, own, m, name);
      std::copy(values.begin(), values.end(), b.params.values().begin());  // in place: the layer views them
      const std::vector<float> bias = read_vector(replicated, name + ".expert_bias");
      std::copy(bias.begin(), bias.end(), b.params.bias().begin());
      b.opt.restore(optimizer_steps, read_shard(replicated, own, m, name + ".exp_avg"),
                    read_shard(replicated, own, m, name + ".exp_avg_sq"));
      b.gain = read_vector(replicated, name + ".norm.weight");
      b.gain_opt.restore(optimizer_steps, read_vector(replicated, name + ".norm.exp_avg"),
                         read_vector(replicated, name + ".norm.exp_avg_sq"));
    }
  });
  return steps;
}

// ---- the run ------------------------------------------------------------------------------------

struct options {
  int steps = 400;
  index tokens = 512;
  std::uint64_t seed = 1;
  std::string csv, save_dir, resume_dir;
};

options parse(int argc, char** argv, bool speaks) {
  options o;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw grove::error("grove_experiment_ep: " + a + " needs a value");
      return argv[++i];
    };
    if (a == "--steps")
      o.steps = std::stoi(value());
    else if (a == "--tokens")
      o.tokens = std::stol(value());
    else if (a == "--seed")
      o.seed = std::stoull(value());
    else if (a == "--csv")
      o.csv = value();
    else if (a == "--save")
      o.save_dir = value();
    else if (a == "--resume")
      o.resume_dir = value();
    else if (a == "-h" || a == "--help") {
      if (speaks)
        std::printf("usage: mpirun -np P grove_experiment_ep [--steps N=400] [--tokens T=512] [--seed S=1] "
                    "[--csv FILE] [--save DIR] [--resume DIR]\n");
      std::exit(0);
    } else {
      throw grove::error("grove_experiment_ep: unknown option " + a);
    }
  }
  if (o.steps < 1 || o.tokens < 1) throw grove::error("grove_experiment_ep: --steps and --tokens must be positive");
  return o;
}

int run(grove::mpi_communicator& comm, const options& opt) {
  const int P = comm.size(), rank = comm.rank();
  const bool speaks = rank == 0;
  const hyper hp;
  const task tk(opt.seed);
  const int threads = std::max(1, static_cast<int>(std::thread::hardware_concurrency()) / comm.ranks_on_this_node());
  model m(hp, tk, comm, opt.seed * 1000 + 7, threads);
  const int first = opt.resume_dir.empty() ? 0 : resume(m, opt.resume_dir);

  grove::detail::normal_generator eval_data(opt.seed * 1000 + 2);
  matrix u, y, eval_u, eval_y;
  std::vector<int> ids;
  tk.sample(2048, eval_data, eval_u, eval_y, ids);
  const matrix own_eval_u = rows_of_rank(eval_u, P, rank), own_eval_y = rows_of_rank(eval_y, P, rank);
  if (speaks)
    std::printf("grove_experiment_ep: Grove run of grove_experiment on %d rank(s), groups %s, %td tokens/step%s\n", P,
                m.placement.describe().c_str(), opt.tokens,
                first > 0 ? (", resumed at step " + std::to_string(first)).c_str() : "");
  std::ofstream csv;
  if (speaks && !opt.csv.empty()) {
    csv.open(opt.csv);
    if (!csv) throw grove::error("grove_experiment_ep: cannot write " + opt.csv);
    csv << "step,loss,eval_loss\n";
  }
  // grove_experiment's data: one stream of batches, the same on every rank (and for every P);
  // each rank takes its rows of each batch. A resumed run replays the stream to its step.
  grove::detail::normal_generator data(opt.seed * 1000 + 1);
  for (int step = 0; step < first; ++step) tk.sample(opt.tokens, data, u, y, ids);
  for (int step = first; step < opt.steps; ++step) {
    tk.sample(opt.tokens, data, u, y, ids);
    const matrix own_u = rows_of_rank(u, P, rank), own_y = rows_of_rank(y, P, rank);
    const double loss = m.forward(own_u, own_y, true);
    m.backward(own_u, own_y, opt.tokens);
    m.update(step);
    const bool report = step % 25 == 0 || step + 1 == opt.steps;
    const double eval = report ? m.forward(own_eval_u, own_eval_y, false) : std::nan("");
    if (!speaks) continue;
    if (report) {
      // grove_experiment's columns (the load over the whole batch, averaged over the blocks).
      double cv = 0, max_over_mean = 0;
      for (const auto& b : m.blocks) {
        const grove::load_spread spread = grove::measure_load_spread(b->counts);
        cv += spread.coefficient_of_variation / double(m.blocks.size());
        max_over_mean += spread.max_over_mean / double(m.blocks.size());
      }
      std::printf("step %4d  loss %.4f  eval %.4f  load cv %.3f  max/mean %.2f\n", step, loss, eval, cv, max_over_mean);
    }
    if (csv.is_open()) {
      char line[96];
      std::snprintf(line, sizeof line, "%d,%.17g,%.17g\n", step, loss, eval);
      csv << line;
    }
  }
  if (!opt.save_dir.empty()) {
    save(m, opt.save_dir, opt.steps);
    if (speaks) std::printf("saved the run after step %d in %s\n", opt.steps - 1, opt.save_dir.c_str());
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int code = 1;
  bool speaks = true;
  try {
    grove::mpi_communicator comm;
    speaks = comm.rank() == 0;
    code = run(comm, parse(argc, argv, speaks));
  } catch (const std::exception& e) {
    // Errors in collective steps are agreed on every rank and name the rank: rank 0 prints them.
    if (speaks) std::fprintf(stderr, "%s\n", e.what());
    code = 1;
  }
  MPI_Finalize();
  return code;
}
