"""grove_torch against the tests' plain-autograd reference of the released block
(released_block.py), finite differences (gradcheck) and its own contract (docs/torch.md)."""

import pytest
import torch

import grove_torch
from released_block import ReleasedGroveBlock, released_load_balancing_loss

CONFIG = dict(
    hidden_size=32,
    num_experts=12,
    num_experts_per_tok=3,
    num_experts_per_group=3,  # G = 4
    moe_intermediate_size=16,
    small_experts_intermediate_size=8,
    small_experts_weight=0.2,
)


def make_pair(config=CONFIG, seed=0, dtype=torch.float32):
    """A reference block with random weights and a GroveMoE loaded from its state_dict."""
    torch.manual_seed(seed)
    ref = ReleasedGroveBlock(**config)
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.3)
    ref = ref.to(dtype)
    block = grove_torch.GroveMoE(**config, dtype=dtype)
    block.load_state_dict(ref.state_dict())
    return ref, block


def test_forward_matches_the_released_block():
    ref, block = make_pair()
    x = torch.randn(3, 7, CONFIG["hidden_size"])
    y_ref, logits_ref = ref(x)
    y, logits = block(x)
    assert y.shape == x.shape and logits.shape == (21, CONFIG["num_experts"])
    assert torch.equal(block.route(x)[0], ref.picks(x))
    torch.testing.assert_close(logits, logits_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    assert y.abs().max() > 0.1  # not a trivial output


def test_a_two_dimensional_input_and_an_empty_batch():
    ref, block = make_pair()
    x = torch.randn(5, CONFIG["hidden_size"])
    torch.testing.assert_close(block(x)[0], ref(x)[0], rtol=1e-4, atol=1e-5)
    y, logits = block(torch.zeros(0, 4, CONFIG["hidden_size"]))
    assert y.shape == (0, 4, CONFIG["hidden_size"]) and logits.shape == (0, CONFIG["num_experts"])


def test_every_gradient_matches_the_released_block():
    ref, block = make_pair(seed=1)
    x = torch.randn(4, 6, CONFIG["hidden_size"])
    r = torch.randn_like(x)
    grads = []
    for model in (ref, block):
        xi = x.clone().requires_grad_(True)
        y, logits = model(xi)
        # The auxiliary loss makes router_logits' gradient take part too.
        aux = released_load_balancing_loss(logits, CONFIG["num_experts"], CONFIG["num_experts_per_tok"])
        ((y * r).sum() + 0.5 * aux).backward()
        grads.append({"x": xi.grad, **{n: p.grad for n, p in model.named_parameters()}})
    ref_grads, grove_grads = grads
    assert ref_grads.keys() == grove_grads.keys()
    compared = 0
    for name, expected in ref_grads.items():
        got = grove_grads[name]
        if expected is None:  # an expert no token picked
            assert got is None or torch.count_nonzero(got) == 0, name
            continue
        torch.testing.assert_close(got, expected, rtol=2e-4, atol=2e-5, msg=lambda m: f"{name}: {m}")
        compared += expected.abs().max() > 0
    assert compared > 20


def test_the_auxiliary_loss_is_the_released_one():
    torch.manual_seed(3)
    logits = torch.randn(40, 12, dtype=torch.float64, requires_grad=True)
    expected = released_load_balancing_loss(logits, 12, 3)
    (g_expected,) = torch.autograd.grad(expected, logits)
    got = grove_torch.load_balancing_loss(logits, 3)
    (g_got,) = torch.autograd.grad(got, logits)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(g_got, g_expected)


def margin_inputs(block, tokens, seed, margin=1e-2):
    """Tokens whose k-th and (k+1)-th selection scores differ by at least `margin`, so that
    gradcheck's perturbations cannot flip a pick."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    while len(rows) < tokens:
        x = torch.randn(1, block.hidden_size, generator=gen, dtype=torch.float64)
        logits = (x @ block.gate.weight.detach().T)[0]
        top = torch.sort(logits, descending=True).values
        if top[block.top_k - 1] - top[block.top_k] > margin:
            rows.append(x)
    return torch.cat(rows)


def test_gradcheck_in_double():
    config = dict(CONFIG, hidden_size=6, num_experts=4, num_experts_per_tok=2, num_experts_per_group=2,
                  moe_intermediate_size=4, small_experts_intermediate_size=3)
    _, block = make_pair(config, seed=4, dtype=torch.float64)
    x = margin_inputs(block, tokens=5, seed=5).requires_grad_(True)
    experts, adjugates = block._tensors()
    n = len(experts)

    def layer(x, router, *weights):
        y, logits, _, topk_weights = grove_torch.grove_layer(
            x, router, block.expert_bias, list(weights[:n]), list(weights[n:]), block.top_k, block.scale)
        return y, logits, topk_weights

    inputs = (x, block.gate.weight, *experts, *adjugates)
    assert torch.autograd.gradcheck(layer, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


def test_bitwise_the_same_for_one_and_two_threads():
    _, block = make_pair(seed=6)
    x = torch.randn(2, 40, CONFIG["hidden_size"])
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            block.zero_grad()
            xi = x.clone().requires_grad_(True)
            y, logits = block(xi)
            (y.square().sum() + logits.sum()).backward()
            results.append([y.detach(), xi.grad] + [p.grad.clone() for p in block.parameters() if p.grad is not None])
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_state_dict_round_trips():
    ref, block = make_pair(seed=7)
    assert set(block.state_dict()) == set(ref.state_dict())
    assert "chunk_experts.3.down_proj.weight" in block.state_dict() and "expert_bias" in block.state_dict()
    again = grove_torch.GroveMoE(**CONFIG)
    again.load_state_dict(block.state_dict())
    x = torch.randn(9, CONFIG["hidden_size"])
    assert torch.equal(again(x)[0], block(x)[0])
    back = ReleasedGroveBlock(**CONFIG)
    back.load_state_dict(again.state_dict())
    torch.testing.assert_close(back(x)[0], ref(x)[0])


def test_from_config_ignores_unknown_fields():
    released = dict(CONFIG, model_type="grove_moe", num_hidden_layers=48, rope_theta=1e6)
    block = grove_torch.GroveMoE(**released)
    assert block.num_groups == 4 and block.top_k == 3
    assert grove_torch.GroveMoE.from_config({"text_config": released}).num_experts == 12


def test_the_selection_bias_and_its_update():
    ref, block = make_pair(seed=8)
    bias = torch.zeros(CONFIG["num_experts"])
    bias[5] = 0.9  # a large bias forces expert 5 into every token's picks
    block.expert_bias.copy_(bias)
    ref.expert_bias.copy_(bias)
    x = torch.randn(10, CONFIG["hidden_size"])
    ids = block.route(x)[0]
    assert torch.equal(ids, ref.picks(x)) and bool((ids == 5).any(dim=1).all())
    torch.testing.assert_close(block(x)[0], ref(x)[0], rtol=1e-4, atol=1e-5)

    block.train()
    block.expert_load.zero_()  # forget the forwards above (a module starts in training mode)
    block(x)
    load = torch.bincount(ids.reshape(-1), minlength=12).double()
    assert torch.equal(block.expert_load, load.long())
    f_minus_q = load / load.sum() - 1.0 / 12
    expected = bias.double() - 0.01 * f_minus_q / f_minus_q.norm()
    assert block.update_bias(rate=0.01)
    torch.testing.assert_close(block.expert_bias.double(), expected, rtol=0, atol=1e-7)
    assert int(block.expert_load.sum()) == 0
    assert not block.update_bias()  # no picks since the last update


def test_bfloat16_runs_forward_and_refuses_backward():
    ref, block = make_pair(seed=9)
    with torch.no_grad():  # the reference on the same bf16-rounded weights, in fp32
        for p in ref.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))
    block = block.to(torch.bfloat16)
    x = torch.randn(6, CONFIG["hidden_size"])
    y, logits = block(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, ref(x)[0], rtol=2e-2, atol=2e-2)
    y16, _ = block(x.to(torch.bfloat16))
    assert y16.dtype == torch.bfloat16
    with pytest.raises(RuntimeError, match="no backward for bfloat16"):
        block(x)[0].sum().backward()


def test_a_short_training_loop_lowers_the_loss():
    torch.manual_seed(10)
    block = grove_torch.GroveMoE(**CONFIG)
    target = ReleasedGroveBlock(**CONFIG)
    x = torch.randn(64, CONFIG["hidden_size"])
    with torch.no_grad():
        y_target = target(x)[0]
    optimizer = torch.optim.Adam(block.parameters(), lr=3e-3)
    losses = []
    block.train()
    for _ in range(60):
        optimizer.zero_grad()
        y, logits = block(x)
        mse = torch.nn.functional.mse_loss(y, y_target)
        (mse + 0.01 * block.load_balancing_loss(logits)).backward()
        optimizer.step()
        block.update_bias(rate=0.001)
        losses.append(mse.item())
    assert losses[-1] < 0.5 * losses[0]


def test_errors_name_the_problem():
    _, block = make_pair()
    H = CONFIG["hidden_size"]
    with pytest.raises(ValueError, match="last dimension must be hidden_size = 32"):
        block(torch.randn(2, H + 1))
    with pytest.raises(TypeError, match="float64 but the layer's weights are torch.float32"):
        block(torch.randn(2, H, dtype=torch.float64))
    with pytest.raises(ValueError, match="must divide num_experts"):
        grove_torch.GroveMoE(**dict(CONFIG, num_experts_per_group=5))
    with pytest.raises(ValueError, match="exceeds num_experts"):
        grove_torch.GroveMoE(**dict(CONFIG, num_experts_per_tok=13))
    with pytest.raises(ValueError, match="positive integer"):
        grove_torch.GroveMoE(**dict(CONFIG, hidden_size=0))

    experts, adjugates = block._tensors()
    args = (block.gate.weight, block.expert_bias)
    x = torch.randn(4, H)
    with pytest.raises(RuntimeError, match="'experts.0.gate_proj.weight' is not contiguous"):
        bad = [experts[0].T.contiguous().T] + experts[1:]
        grove_torch.grove_layer(x, *args, bad, adjugates, 3, 0.2)
    with pytest.raises(RuntimeError, match=r"'chunk_experts.1.up_proj.weight' has shape \[8, 31\] but must be \[8, 32\]"):
        bad = list(adjugates)
        bad[4] = torch.zeros(8, 31)
        grove_torch.grove_layer(x, *args, experts, bad, 3, 0.2)
    with pytest.raises(RuntimeError, match="'experts.2.down_proj.weight' has dtype Double but must be Float"):
        bad = list(experts)
        bad[8] = bad[8].double()
        grove_torch.grove_layer(x, *args, bad, adjugates, 3, 0.2)
    with pytest.raises(RuntimeError, match="3·E = 36 expert tensors are needed; got 35"):
        grove_torch.grove_layer(x, *args, experts[:-1], adjugates, 3, 0.2)
    with pytest.raises(RuntimeError, match=r"k = 13 must lie in \[1, E = 12\]"):
        grove_torch.grove_layer(x, *args, experts, adjugates, 13, 0.2)
    with pytest.raises(RuntimeError, match="is on meta"):
        grove_torch.GroveMoE(**CONFIG, device="meta")(torch.zeros(2, H, device="meta"))
    with pytest.raises(RuntimeError, match="rule is 'normalized' or 'sign'"):
        block.update_bias(rule="bogus")


def test_the_benchmark_script_runs(tmp_path):
    import json
    import pathlib
    import subprocess
    import sys

    script = pathlib.Path(__file__).resolve().parents[1] / "bench" / "bench_torch.py"
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, str(script), "--shape", "tiny", "--tokens", "8", "--threads", "1",
                    "--repetitions", "1", "--json", str(out)], check=True, capture_output=True)
    rows = json.loads(out.read_text())["results"]
    assert len(rows) == 2 and all(r["grove_ms"] > 0 and r["loop_ms"] > 0 for r in rows)


def test_the_package_imported_is_the_one_under_test():
    # CTest names the directory the package must come from: the staged one in the build, or the
    # prefix `cmake --install --component grove_torch` wrote (torch_installed_package). A stray
    # grove_torch earlier on sys.path would otherwise be tested instead.
    import os
    import pathlib

    root = os.environ.get("GROVE_TORCH_PACKAGE_ROOT")
    assert root, "GROVE_TORCH_PACKAGE_ROOT is not set (CTest sets it)"
    package = pathlib.Path(grove_torch.__file__).resolve().parent
    assert package == pathlib.Path(root).resolve() / "grove_torch"
    assert any(package.glob("libgrove_torch_ops*.so"))
