#pragma once

// A Grove layer spread over the ranks of a communicator (docs/distributed.md): tokens are
// data-parallel (each rank routes its own batch with the replicated router) and experts are
// expert-parallel (each rank holds whole groups). The result on every rank is, bit for bit, what
// the single-process layer gives for that rank's rows of the ranks' batches concatenated in rank
// order, for every rank count and thread count.
//
// One forward:
//   1. route the rank's tokens (batch-invariant logits: the same picks as in one big batch);
//   2. send each token once to every rank that owns one of its picked groups, with those picks;
//   3. each owner runs its local runner on the plan of what it received (plan_from_rows), one
//      local row per (token, group), so that each row's output is the partial p(t, g) and the
//      row's input gradient is g's share of dx;
//   4. the partials travel back, and the token's home rank adds them in ascending group order:
//      the canonical sum of plan/combine.hpp.
// Backward sends dy the same way, runs the fused backward on the owner's plan, brings back g's
// share of dx and the routing-weight gradients of g's picks, and sums them in the same order.
// The router's weight gradient is a sum over every token: each rank gathers every rank's dl and x
// rows in rank order and sums them in the documented order (training/router_backward.hpp).

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "grove/config/layer_config.hpp"
#include "grove/distributed/communicator.hpp"
#include "grove/distributed/placement.hpp"
#include "grove/distributed/rank_rows.hpp"
#include "grove/error.hpp"
#include "grove/formats/format_traits.hpp"
#include "grove/layer/layer.hpp"
#include "grove/plan/dispatch.hpp"
#include "grove/plan/plan_from_rows.hpp"
#include "grove/plan/routing_plan.hpp"
#include "grove/plan/saved_activations.hpp"
#include "grove/router/logits.hpp"
#include "grove/runners/cpu_runner.hpp"
#include "grove/runners/default_runner.hpp"
#include "grove/runners/runner.hpp"
#include "grove/training/router_backward.hpp"
#include "grove/weights/layer_weights.hpp"
#include "grove/weights/tensor_types.hpp"

GROVE_BEGIN_NAMESPACE

/// Bytes this rank sent in the last call's exchanges (both ways: requests out, replies back).
struct expert_parallel_traffic {
  std::size_t request_bytes = 0;  ///< token rows (and their picks) sent to the owners
  std::size_t reply_bytes = 0;    ///< partials (and routing-weight gradients) sent back
  index tokens_sent = 0;          ///< (token, rank) pairs: each token once per owning rank
};

/// What one expert-parallel training forward keeps for its backward, on each rank.
template <class Scalar>
struct expert_parallel_forward {
  // ---- this rank as the home of its tokens ----
  routing_plan<Scalar> plan;          ///< the routing of this rank's batch
  row_matrix<Scalar> y;               ///< [T_r, H]
  std::vector<index> sent_offsets;    ///< [P + 1]: tokens sent to rank q are sent_tokens[offsets[q], offsets[q+1])
  std::vector<std::int32_t> sent_tokens;
  // ---- this rank as the owner of its groups ----
  routing_plan<Scalar> local_plan;    ///< one row per (received token, owned group)
  row_matrix<Scalar> local_x;         ///< [local rows, H]
  std::vector<index> local_offsets;   ///< [P + 1]: local rows of source rank p
  std::vector<index> local_received;  ///< for each local row, its row among the received tokens (all sources)
  std::vector<index> received_offsets;  ///< [P + 1]: received token rows of source rank p
  saved_activations<Scalar> saved;    ///< empty when activations were not kept
};

/// A Grove layer over the ranks of `comm`, each rank holding the groups `placement` gives it.
/// Every call is collective. Errors on any rank (bad input, a missing tensor, a failed
/// allocation) end the call on every rank with one grove::error that names the rank(s).
///
///   grove::mpi_communicator comm;                              // MPI_COMM_WORLD
///   auto placement = grove::group_placement::balanced(dims.groups, comm.size());
///   grove::expert_parallel_layer layer(comm, placement, config, full.only_groups(placement.groups_of(comm.rank())));
///   grove::row_matrix<float> y = layer.forward(x);             // this rank's tokens
///
/// The communicator must outlive the layer. The weights view needs the router (replicated) and
/// the experts and adjugates of this rank's groups; the other groups may be unbound.
template <layer_configuration Config>
class expert_parallel_layer {
 public:
  using weight_type = typename Config::scalar;
  using scalar = activation_t<weight_type>;

  /// Collective: checks on every rank that all ranks agree on the layer (H, E, G, I, Ia, k, λ),
  /// the placement and the instruction-set level (the bits depend on it). Over a BF16 view the
  /// selection bias is the view's (none for layer_parameters<bf16>::view(), whose bias is fp32):
  /// pass the layer_parameters instead (the next constructor).
  expert_parallel_layer(communicator& comm, group_placement placement, Config config,
                        weights_view<weight_type> weights, std::shared_ptr<grove::runner> local = default_runner())
      : comm_(&comm), placement_(std::move(placement)) {
    set_up(config.dims(), [&] { local_.emplace(config, weights.only_groups(own_groups_), std::move(local)); });
  }

  /// Same, owning this rank's weights: a shard of its groups (layer_parameters::shard, or
  /// io::load_layer with placement.groups_of(rank)) or the whole layer. For BF16 weights this is
  /// the constructor that keeps the selection bias, which a BF16 view cannot hold (it is fp32).
  expert_parallel_layer(communicator& comm, group_placement placement, Config config,
                        layer_parameters<weight_type> weights, std::shared_ptr<grove::runner> local = default_runner())
      : comm_(&comm), placement_(std::move(placement)) {
    set_up(config.dims(), [&] {
      for (const index j : own_groups_)
        detail::require(weights.view().holds_group(j), "grove: the weights of this rank hold no group ", j,
                        ", which the placement gives it");
      local_.emplace(config, std::move(weights), std::move(local));
    });
  }

  [[nodiscard]] communicator& comm() const { return *comm_; }
  [[nodiscard]] const group_placement& placement() const { return placement_; }
  /// This rank's groups, ascending.
  [[nodiscard]] std::span<const index> own_groups() const { return own_groups_; }
  /// The single-process layer over this rank's shard of the weights (its routing is the whole
  /// layer's; its experts are this rank's groups only).
  [[nodiscard]] const layer<Config>& local_layer() const { return *local_; }
  [[nodiscard]] const layer_dims& dims() const { return local_->dims(); }
  /// What the last forward or backward sent from this rank.
  [[nodiscard]] const expert_parallel_traffic& last_traffic() const { return traffic_; }

  /// y = layer(x) for this rank's tokens x [T_r, H] (T_r may be 0).
  [[nodiscard]] row_matrix<scalar> forward(const_rows_ref<scalar> x) {
    expert_parallel_forward<scalar> f;
    run_forward(x, f, false);
    return std::move(f.y);
  }

  /// y and this rank's routing (router logits, picks, weights: out.plan) in `out`, whose buffers
  /// are reused from call to call; no activations are kept.
  void forward(const_rows_ref<scalar> x, expert_parallel_forward<scalar>& out) { run_forward(x, out, false); }

  /// The training forward: y in the result, and what backward needs.
  [[nodiscard]] expert_parallel_forward<scalar> forward_for_training(const_rows_ref<scalar> x,
                                                                     bool keep_activations = true)
    requires(info_of<weight_type>().trainable)
  {
    expert_parallel_forward<scalar> f;
    run_forward(x, f, keep_activations);
    return f;
  }

  /// Backward of forward_for_training's call on this rank's x and dy = ∂L/∂y [T_r, H]:
  ///   - the gradients of this rank's experts and adjugates are ADDED to `grads` (the full
  ///     layer's dims; the other groups' tensors may be unbound and are not touched);
  ///   - the router's gradient over every rank's tokens is ADDED to grads.router() on every
  ///     rank (the router is replicated, and so is its gradient);
  ///   - ∂L/∂x of this rank's tokens is ADDED to dx [T_r, H].
  /// Each is bit for bit what grove::backward gives in one process on the concatenated batch.
  void backward(const expert_parallel_forward<scalar>& f, const_rows_ref<scalar> x, const_rows_ref<scalar> dy,
                const weights_span<scalar>& grads, rows_ref<scalar> dx)
    requires(info_of<weight_type>().trainable)
  {
    const index H = dims().hidden;
    const int P = comm_->size();
    std::vector<std::byte> send, recv;
    std::vector<std::size_t> send_counts, recv_counts;
    traffic_ = {};

    // 1. Home: dy rows to the owners, in the forward's order.
    comm_->step("expert-parallel backward", [&] {
      require_rows("output gradient dy", dy, f.plan.tokens);
      require_rows("input gradient dx", dx, f.plan.tokens);
      detail::require(x.rows() == f.plan.tokens && x.cols() == H, "grove: x is [", x.rows(), ", ", x.cols(),
                      "] but the forward was given [", f.plan.tokens, ", ", H, "]");
      detail::require(grads.dims() == dims(), "grove: the gradient buffers have other dimensions than the layer");
      detail::require(grads.router().data() != nullptr, "grove: missing tensor 'gate.weight' in the gradients");
      send_counts.assign(static_cast<std::size_t>(P), 0);
      for (int q = 0; q < P; ++q) {
        const std::size_t before = send.size();
        for (index i = f.sent_offsets[static_cast<std::size_t>(q)]; i < f.sent_offsets[static_cast<std::size_t>(q) + 1]; ++i)
          detail::append_values(send, row_of(dy, f.sent_tokens[static_cast<std::size_t>(i)]));
        send_counts[static_cast<std::size_t>(q)] = send.size() - before;
      }
      traffic_.request_bytes = send.size();
    });
    comm_->all_to_all_v(send, send_counts, recv, recv_counts);

    // 2. Owner: the fused backward on the local plan; back go g's share of dx and the routing-
    //    weight gradients of g's picks, for each local row.
    comm_->step("expert-parallel backward", [&] {
      const index received = f.received_offsets.back();
      detail::require(recv.size() == static_cast<std::size_t>(received * H) * sizeof(scalar),
                      "grove: received ", recv.size(), " bytes of dy, expected ", received, " rows of H = ", H);
      row_matrix<scalar> received_dy(received, H);
      if (received > 0) std::memcpy(received_dy.data(), recv.data(), recv.size());
      const index rows = f.local_plan.tokens;
      row_matrix<scalar> local_dy(rows, H);
      for (index r = 0; r < rows; ++r) local_dy.row(r) = received_dy.row(f.local_received[static_cast<std::size_t>(r)]);
      row_matrix<scalar> local_dx = row_matrix<scalar>::Zero(rows, H);
      row_matrix<scalar> local_dw;
      local_->runner().backward(expert_backward<scalar>{local_->weights(), f.local_plan, f.local_x, local_dy,
                                                        f.saved.empty() ? nullptr : &f.saved, grads, local_dx,
                                                        local_dw});
      send.clear();
      send_counts.assign(static_cast<std::size_t>(P), 0);
      for (int p = 0; p < P; ++p) {
        const std::size_t before = send.size();
        const index begin = f.local_offsets[static_cast<std::size_t>(p)], end = f.local_offsets[static_cast<std::size_t>(p) + 1];
        for (index r = begin; r < end; ++r) detail::append_values(send, row_of(local_dx, r));
        for (index r = begin; r < end; ++r)
          for (index s = 0; s < f.local_plan.top_k; ++s)
            if (f.local_plan.topk_ids(r, s) >= 0) detail::append_value(send, local_dw(r, s));
        send_counts[static_cast<std::size_t>(p)] = send.size() - before;
      }
      traffic_.reply_bytes = send.size();
    });
    comm_->all_to_all_v(send, send_counts, recv, recv_counts);

    // 3. Home: dx in the canonical order, dw, dl, and the router's share of dx.
    row_matrix<scalar> dl;
    comm_->step("expert-parallel backward", [&] {
      std::vector<detail::byte_reader> replies = readers(recv, recv_counts);
      // Each reply holds its dx rows first, then its dw values: two cursors per rank.
      std::vector<std::size_t> dx_rows(static_cast<std::size_t>(P), 0);
      for (index t = 0; t < f.plan.tokens; ++t)
        for (const index g : sorted_groups(f.plan, t)) ++dx_rows[static_cast<std::size_t>(placement_.owner_of(g))];
      std::vector<detail::byte_reader> dw_readers;
      for (int q = 0; q < P; ++q) {
        detail::byte_reader skip = replies[static_cast<std::size_t>(q)];
        std::vector<scalar> rows(dx_rows[static_cast<std::size_t>(q)] * static_cast<std::size_t>(H));
        skip.read(std::span<scalar>(rows));
        dw_readers.push_back(skip);
      }
      row_matrix<scalar> dw = row_matrix<scalar>::Zero(f.plan.tokens, f.plan.top_k);
      std::vector<scalar> partial(static_cast<std::size_t>(H));
      for (index t = 0; t < f.plan.tokens; ++t) {
        scalar* out = dx.data() + t * dx.outerStride();
        for (const index g : sorted_groups(f.plan, t)) {
          const auto q = static_cast<std::size_t>(placement_.owner_of(g));
          replies[q].read(std::span<scalar>(partial));
          for (index c = 0; c < H; ++c) out[c] = out[c] + partial[static_cast<std::size_t>(c)];
          for (index s = 0; s < f.plan.top_k; ++s)
            if (f.plan.topk_ids(t, s) / f.plan.group_size == g) dw(t, s) = dw_readers[q].template read<scalar>();
        }
      }
      for (int q = 0; q < P; ++q)
        detail::require(dw_readers[static_cast<std::size_t>(q)].done(), "grove: rank ", q,
                        " sent back more gradients than this rank's tokens have");
      routing_logit_gradient(f.plan, dw, dl);
      router_input_gradient<scalar>(local_->weights(), dl, dx);
    });

    // 4. Every rank: the router's weight gradient over every rank's tokens, in token order.
    const row_matrix<scalar> gathered_dl = gather_rows_in_rank_order<scalar>(*comm_, dl);
    const row_matrix<scalar> gathered_x = gather_rows_in_rank_order<scalar>(*comm_, x);
    comm_->step("expert-parallel backward", [&] {
      detail::require(gathered_dl.rows() == gathered_x.rows() && gathered_dl.cols() == dims().experts,
                      "grove: the ranks sent ", gathered_dl.size(), " logit gradients for ", gathered_x.rows(),
                      " tokens of E = ", dims().experts);
      router_weight_gradient<scalar>(gathered_x, gathered_dl, grads);
    });
  }

 private:
  static std::span<const scalar> row_of(const_rows_ref<scalar> m, index r) {
    return std::span<const scalar>(m.data() + r * m.outerStride(), static_cast<std::size_t>(m.cols()));
  }

  void require_rows(const char* what, const_rows_ref<scalar> m, index tokens) const {
    detail::require(m.rows() == tokens && m.cols() == dims().hidden, "grove: ", what, " is [", m.rows(), ", ",
                    m.cols(), "] but must be [T, H] = [", tokens, ", ", dims().hidden, "]");
  }

  /// The distinct groups token t picked, ascending (the order of the canonical sum).
  static std::vector<index> sorted_groups(const routing_plan<scalar>& plan, index t) {
    std::vector<index> groups;
    for (index at = 0; at < plan.groups_per_token[static_cast<std::size_t>(t)]; ++at)
      groups.push_back(plan.token_groups(t, at));
    std::sort(groups.begin(), groups.end());
    return groups;
  }

  static std::vector<detail::byte_reader> readers(const std::vector<std::byte>& recv,
                                                  const std::vector<std::size_t>& counts) {
    std::vector<detail::byte_reader> out;
    std::size_t at = 0;
    for (const std::size_t n : counts) {
      out.emplace_back(std::span<const std::byte>(recv).subspan(at, n));
      at += n;
    }
    return out;
  }

  /// The constructors' collective part: `make_local` builds the local layer once the placement
  /// is checked, then every rank compares its signature with rank 0's.
  template <class MakeLocal>
  void set_up(const layer_dims& dims, MakeLocal&& make_local) {
    comm_->step("expert-parallel layer setup", [&] {
      detail::require(placement_.ranks() == comm_->size(), "grove: the placement is for ", placement_.ranks(),
                      " ranks but the communicator has ", comm_->size());
      detail::require(placement_.groups() == dims.groups, "grove: the placement places ", placement_.groups(),
                      " groups but the layer has G = ", dims.groups);
      own_groups_ = placement_.groups_of(comm_->rank());
      make_local();
    });
    // Rank 0's signature, on every rank: each compares its own with it, so the error names
    // the ranks that differ.
    const std::string own = signature();
    const std::uint64_t own_length = own.size();
    const std::vector<std::uint64_t> lengths = gather_in_rank_order(*comm_, std::span<const std::uint64_t>(&own_length, 1));
    const std::vector<char> all = gather_in_rank_order(*comm_, std::span<const char>(own.data(), own.size()));
    const std::string first(all.data(), std::min<std::size_t>(all.size(), lengths.empty() ? 0 : lengths[0]));
    comm_->agree("expert-parallel layer setup",
                 own == first ? std::string()
                              : "this rank's layer is " + own + " but rank 0's is " + first);
  }

  /// What every rank must agree on: the layer, the placement and the instruction-set levels.
  std::string signature() const {
    if (!local_) return "(no layer)";
    const layer_dims& d = dims();
    std::string level = "routing " + std::string(simd::isa_name(detail::routing_isa()));
    if (const auto* cpu = dynamic_cast<const cpu_runner*>(&local_->runner()))
      level += ", experts " + std::string(simd::isa_name(cpu->isa()));
    else
      level += ", runner " + local_->runner().name();
    return "(H, E, G, I, Ia) = (" + std::to_string(d.hidden) + ", " + std::to_string(d.experts) + ", " +
           std::to_string(d.groups) + ", " + std::to_string(d.expert_intermediate) + ", " +
           std::to_string(d.adjugate_intermediate) + "), k = " + std::to_string(local_->config().top_k()) +
           ", scale " + std::to_string(local_->config().scale()) + ", groups " + placement_.describe() + ", " +
           level;
  }

  void run_forward(const_rows_ref<scalar> x, expert_parallel_forward<scalar>& f, bool keep_activations) {
    const int P = comm_->size();
    const index H = dims().hidden;
    const index k = local_->config().top_k();
    std::vector<std::byte> send, recv;
    std::vector<std::size_t> send_counts, recv_counts;
    traffic_ = {};

    // 1. Home: route, then one request per owner: its tokens' rows and their picks there.
    comm_->step("expert-parallel forward", [&] {
      detail::require(x.cols() == H, "grove: input x has ", x.cols(), " columns, expected H = ", H);
      local_->route_into(f.plan, x);
      f.sent_offsets.assign(static_cast<std::size_t>(P) + 1, 0);
      f.sent_tokens.clear();
      send_counts.assign(static_cast<std::size_t>(P), 0);
      std::vector<routed_row<scalar>> picks;
      for (int q = 0; q < P; ++q) {
        picks.clear();
        const std::size_t first = f.sent_tokens.size();
        for (index t = 0; t < f.plan.tokens; ++t) {
          bool sent = false;
          for (index s = 0; s < k; ++s) {
            const std::int32_t e = f.plan.topk_ids(t, s);
            if (placement_.owner_of(e / f.plan.group_size) != q) continue;
            if (!sent) f.sent_tokens.push_back(static_cast<std::int32_t>(t));
            sent = true;
            picks.push_back({static_cast<std::int32_t>(f.sent_tokens.size() - 1 - first), static_cast<std::int32_t>(s),
                             e, f.plan.topk_weights(t, s)});
          }
        }
        f.sent_offsets[static_cast<std::size_t>(q) + 1] = static_cast<index>(f.sent_tokens.size());
        const std::size_t before = send.size();
        detail::append_value(send, static_cast<std::int64_t>(f.sent_tokens.size() - first));
        detail::append_value(send, static_cast<std::int64_t>(picks.size()));
        for (std::size_t i = first; i < f.sent_tokens.size(); ++i) detail::append_values(send, row_of(x, f.sent_tokens[i]));
        detail::append_values(send, std::span<const routed_row<scalar>>(picks));
        send_counts[static_cast<std::size_t>(q)] = send.size() - before;
      }
      traffic_.request_bytes = send.size();
      traffic_.tokens_sent = static_cast<index>(f.sent_tokens.size());
    });
    comm_->all_to_all_v(send, send_counts, recv, recv_counts);

    // 2. Owner: one local row per (received token, owned group), the plan of their picks, the
    //    local runner; back go the rows' outputs, which are the partials p(t, g).
    comm_->step("expert-parallel forward", [&] {
      std::vector<detail::byte_reader> requests = readers(recv, recv_counts);
      const index group_size = dims().group_size();
      std::vector<routed_row<scalar>> local_picks;
      std::vector<scalar> received_x;
      f.local_offsets.assign(static_cast<std::size_t>(P) + 1, 0);
      f.received_offsets.assign(static_cast<std::size_t>(P) + 1, 0);
      f.local_received.clear();
      std::vector<routed_row<scalar>> picks;
      for (int p = 0; p < P; ++p) {
        detail::byte_reader& in = requests[static_cast<std::size_t>(p)];
        const auto tokens = in.template read<std::int64_t>();
        const auto pick_count = in.template read<std::int64_t>();
        detail::require(tokens >= 0 && pick_count >= tokens && pick_count <= tokens * k, "grove: rank ", p,
                        " sent a request of ", tokens, " tokens and ", pick_count, " picks");
        const std::size_t at = received_x.size();
        received_x.resize(at + static_cast<std::size_t>(tokens * H));
        in.read(std::span<scalar>(received_x).subspan(at));
        picks.resize(static_cast<std::size_t>(pick_count));
        in.read(std::span<routed_row<scalar>>(picks));
        detail::require(in.done(), "grove: rank ", p, "'s request is longer than its header says");
        const index base = f.received_offsets[static_cast<std::size_t>(p)];
        f.received_offsets[static_cast<std::size_t>(p) + 1] = base + tokens;
        // The picks come token by token, slots ascending; each token's are split by group,
        // groups ascending, each group a local row.
        std::size_t i = 0;
        while (i < picks.size()) {
          const std::int32_t token = picks[i].token;
          detail::require(token >= 0 && token < tokens && (i == 0 || token > picks[i - 1].token), "grove: rank ", p,
                          " sent a pick of token ", token, " out of order");
          std::size_t end = i;
          while (end < picks.size() && picks[end].token == token) ++end;
          for (std::size_t a = i; a < end; ++a) {
            const std::int32_t e = picks[a].expert;
            detail::require(e >= 0 && e < dims().experts && placement_.owner_of(e / group_size) == comm_->rank(),
                            "grove: rank ", p, " sent a pick of expert ", e, ", which this rank does not hold");
          }
          for (index g : own_groups_) {
            bool any = false;
            for (std::size_t a = i; a < end; ++a) {
              if (picks[a].expert / group_size != g) continue;
              if (!any) f.local_received.push_back(base + token);
              any = true;
              routed_row<scalar> row = picks[a];
              row.token = static_cast<std::int32_t>(f.local_received.size() - 1);
              local_picks.push_back(row);
            }
          }
          i = end;
        }
        f.local_offsets[static_cast<std::size_t>(p) + 1] = static_cast<index>(f.local_received.size());
      }
      const auto rows = static_cast<index>(f.local_received.size());
      f.local_x.resize(rows, H);
      for (index r = 0; r < rows; ++r)
        std::memcpy(f.local_x.data() + r * H,
                    received_x.data() + static_cast<std::size_t>(f.local_received[static_cast<std::size_t>(r)] * H),
                    sizeof(scalar) * static_cast<std::size_t>(H));
      plan_from_rows_into(f.local_plan, dims(), rows, k, local_->config().scale(),
                          std::span<const routed_row<scalar>>(local_picks), f.plan.adjugates);
      row_matrix<scalar> local_y(rows, H);
      if constexpr (info_of<weight_type>().trainable) {
        if (keep_activations) {
          local_->forward_saving(f.local_plan, f.local_x, local_y, f.saved);
        } else {
          local_->forward(f.local_plan, f.local_x, local_y);
        }
      } else {
        (void)keep_activations;
        local_->forward(f.local_plan, f.local_x, local_y);
      }
      send.clear();
      send_counts.assign(static_cast<std::size_t>(P), 0);
      for (int p = 0; p < P; ++p) {
        const std::size_t before = send.size();
        for (index r = f.local_offsets[static_cast<std::size_t>(p)]; r < f.local_offsets[static_cast<std::size_t>(p) + 1]; ++r)
          detail::append_values(send, row_of(local_y, r));
        send_counts[static_cast<std::size_t>(p)] = send.size() - before;
      }
      traffic_.reply_bytes = send.size();
    });
    comm_->all_to_all_v(send, send_counts, recv, recv_counts);

    // 3. Home: y_t = (…((+0 + p(t, g1)) + p(t, g2)) + …) over t's groups ascending.
    comm_->step("expert-parallel forward", [&] {
      std::vector<detail::byte_reader> replies = readers(recv, recv_counts);
      f.y.setZero(f.plan.tokens, H);
      std::vector<scalar> partial(static_cast<std::size_t>(H));
      for (index t = 0; t < f.plan.tokens; ++t) {
        scalar* out = f.y.data() + t * H;
        for (const index g : sorted_groups(f.plan, t)) {
          replies[static_cast<std::size_t>(placement_.owner_of(g))].read(std::span<scalar>(partial));
          for (index c = 0; c < H; ++c) out[c] = out[c] + partial[static_cast<std::size_t>(c)];
        }
      }
      for (int q = 0; q < P; ++q)
        detail::require(replies[static_cast<std::size_t>(q)].done(), "grove: rank ", q,
                        " sent back more partials than this rank's tokens have");
    });
  }

  communicator* comm_;
  group_placement placement_;
  std::vector<index> own_groups_;
  std::optional<layer<Config>> local_;
  expert_parallel_traffic traffic_;
};

GROVE_END_NAMESPACE
