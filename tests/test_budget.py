"""Budget-exact mode: the controller, the feasibility floor, rounding to the budget and impossible targets."""

import json
import math

import pytest
import torch
from conftest import TINY_FASHION_MODEL, gate_states, gated_copy, make_vit
from hypothesis import given, strategies as st

import hiap_core
from hiap_core.train import models, pruning
from hiap_core.core.budget import BudgetController, minimum_cost, projected_fraction, round_to_budget
from hiap_core.core.quotas import Quotas, quota_shortfalls, restore_quotas
from hiap_core.core.gated_vit import gates
from hiap_core.train.config import ConfigError, config_from_params

TINY = {
    "data": {"dataset": "fashion_mnist", "train_subset": 256, "test_subset": 128},
    "model": TINY_FASHION_MODEL,
    "hiap": {"epochs": 1, "batch_size": 64, "min_heads": 1, "min_value_fraction": 0.125},
}


def test_projection_looks_ahead_to_the_deadline_then_not():
    controller = BudgetController(target=0.5, deadline=0.7)
    assert controller.steps_to_deadline(0, 100) == 70
    assert controller.steps_to_deadline(69, 100) == 1
    assert controller.steps_to_deadline(70, 100) == controller.steps_to_deadline(100, 100) == 0  # the hardened cost


def test_projected_cost_is_the_hardened_cost_of_the_logits_carried_on():
    gated = gated_copy(make_vit(depth=2, num_heads=3, embed_dim=24))
    costs = hiap_core.unit_costs(hiap_core.describe(gated))
    dense = hiap_core.count_macs(hiap_core.describe(gated).dense())
    before = [g.logits.detach().clone() for g in gates(gated)]
    with torch.no_grad():
        for gate in gates(gated):
            gate.logits.sub_(torch.rand_like(gate.logits))  # each unit falling at its own speed
    now = [g.logits.detach().clone() for g in gates(gated)]
    projected = projected_fraction(gated, costs, dense, before, 4)
    assert all(torch.equal(g.logits, n) for g, n in zip(gates(gated), now))  # the model is left as it was
    with torch.no_grad():
        for gate, b, n in zip(gates(gated), before, now):
            gate.logits.copy_(n + 4 * (n - b))
    assert projected == hiap_core.count_macs(gated) / dense


@given(steps_back=st.integers(1, 6), steps_left=st.integers(0, 40), seed=st.integers(0, 2**16))
def test_a_projection_over_several_steps_carries_each_logit_at_its_mean_velocity(steps_back, steps_left, seed):
    """`budget_velocity_steps`: the logits `steps_back` steps ago and now give the mean velocity, which
    projects as a one-step velocity of that size does (1: the last step's, the default)."""
    gated = gated_copy(make_vit(depth=2, num_heads=3, embed_dim=24))
    costs = hiap_core.unit_costs(hiap_core.describe(gated))
    dense = hiap_core.count_macs(hiap_core.describe(gated).dense())
    generator = torch.Generator().manual_seed(seed)
    velocity = [torch.randn(g.logits.shape, generator=generator) for g in gates(gated)]
    now = [g.logits.detach().clone() for g in gates(gated)]
    past = [n - steps_back * v for n, v in zip(now, velocity)]
    projected = projected_fraction(gated, costs, dense, past, steps_left, steps_back)
    with torch.no_grad():
        for gate, n, v in zip(gates(gated), now, velocity):
            gate.logits.copy_(n + (steps_left / steps_back) * (steps_back * v))
    assert projected == hiap_core.count_macs(gated) / dense


def test_integral_does_not_wind_up_while_the_cost_keeps_pace():
    """Over budget but falling by more than PACE of its gap per step: no more push; stuck: push."""
    falling = BudgetController(target=0.5, lr=0.1, gain=0.0)
    falling.update(0.9)
    grown = falling.log_scale
    for cost in (0.85, 0.8, 0.75):  # 0.05 a step, more than PACE * gap
        falling.update(cost)
    assert falling.log_scale == grown
    stuck = BudgetController(target=0.5, lr=0.1, gain=0.0)
    for _ in range(4):
        stuck.update(0.9)
    assert stuck.log_scale == pytest.approx(4 * 0.1 * 0.8)
    assert stuck.max_scale == pytest.approx(math.exp(stuck.log_scale))


def test_integral_raises_the_scale_over_budget_and_lowers_it_under():
    controller = BudgetController(target=0.5, lr=0.1, gain=0.0)
    up = controller.update(0.75)  # 50% over: log scale += 0.05
    assert up == pytest.approx(math.exp(0.05))
    controller.update(0.25)  # 50% under: back to 1
    assert controller.scale == pytest.approx(1.0)
    for _ in range(10_000):
        controller.update(1.0)
    assert controller.log_scale == BudgetController.MAX_LOG_SCALE  # bounded, stays finite


def test_proportional_term_follows_the_current_overshoot_at_once():
    controller = BudgetController(target=0.5, lr=0.1, gain=20.0)
    assert controller.update(0.55) == pytest.approx(math.exp(0.1 * 0.1 + 20 * 0.1))  # 10% over
    assert controller.update(0.45) == pytest.approx(math.exp(0.0 + 20 * -0.1))  # 10% under: scale falls at once
    restored = BudgetController(target=0.5, lr=0.1, gain=20.0)
    restored.load_state_dict(controller.state_dict())
    assert restored.scale == controller.scale and restored.max_scale == controller.max_scale


def test_controller_lands_on_the_target_of_a_simple_plant():
    """A cost that follows the penalty scale with a lag (cost relaxes toward 1 / (1 + s)) settles on target."""
    controller, cost = BudgetController(target=0.6, lr=0.2), 1.0
    for _ in range(2000):
        controller.update(cost)
        cost += 0.05 * (1.0 / (1.0 + controller.scale) * 1.2 - cost)
    assert cost == pytest.approx(0.6, rel=0.01)


def test_controller_lands_on_the_target_of_a_sign_driven_plant():
    """Adam-like gates: the cost moves at a fixed speed (with momentum) in the direction the scale decides,
    down while the scale exceeds what the remaining units' task gradient outweighs (which grows as they
    get fewer); the controller sees the cost its velocity projects to the deadline, as `budget_step` does."""
    controller, cost, velocity, above, steps = BudgetController(target=0.6), 0.95, 0.0, 0.0, 400
    for step in range(steps):
        controller.update(cost - 0.004 * velocity * controller.steps_to_deadline(step, steps))
        balance = math.exp(4 * (0.75 - cost))  # the scale the task gradient of the remaining units outweighs
        velocity = 0.9 * velocity + 0.1 * math.copysign(1.0, math.log(controller.scale / balance))
        cost = min(max(cost - 0.004 * velocity, 0.1), 1.0)
        above = max(above, controller.scale / balance)
    assert cost == pytest.approx(0.6, rel=0.02)
    assert above < 10  # never far past the balance: no windup (the previous controller's gain 20 reached 500x)


def test_minimum_cost_is_the_cheapest_feasible_architecture():
    model = make_vit(depth=2, num_heads=3, embed_dim=24)  # head_dim 8
    spec = hiap_core.describe(model)
    costs = hiap_core.unit_costs(spec)
    gated = gated_copy(model)
    state = [
        {"heads": torch.tensor([True, False, False]), "values": torch.tensor([[True] + [False] * 7] * 3), "ffn": False}
        for _ in range(2)
    ]
    hiap_core.set_gate_state(gated, state)
    assert minimum_cost(spec, costs, Quotas.of(spec, 1, 0.125, 0.125)) == hiap_core.count_macs(gated)
    assert minimum_cost(spec, costs, Quotas.of(spec, 0, 0.125, 0.125)) == costs.static


@pytest.mark.parametrize(
    ("heads", "micro", "layer_state"),
    [
        # lambda_micro = 0: only heads fall (to min_heads); every value dim and neuron stays
        (True, False, {"heads": torch.tensor([True, False, False])}),
        # lambda_macro = 0: every head stays, each down to its minimum value dims, and the FFNs close
        (False, True, {"values": torch.tensor([[True] + [False] * 7] * 3), "ffn": False}),
    ],
)
def test_minimum_cost_with_one_penalty_is_what_that_gate_kind_alone_reaches(heads, micro, layer_state):
    model = make_vit(depth=2, num_heads=3, embed_dim=24)  # head_dim 8
    spec = hiap_core.describe(model)
    costs = hiap_core.unit_costs(spec)
    gated = gated_copy(model)
    hiap_core.set_gate_state(gated, [layer_state] * 2)
    assert minimum_cost(spec, costs, Quotas.of(spec, 1, 0.125, 0.125), heads=heads, micro=micro) == hiap_core.count_macs(gated)


@given(
    state=gate_states(depth=2, heads=3, head_dim=8, hidden=48),
    target=st.floats(0.2, 1.0),
    min_heads=st.sampled_from([0, 1, 2]),
    fractions=st.sampled_from([(0.0, 0.0), (0.125, 0.125), (0.3, 0.5)]),
)
def test_round_to_budget_lands_within_one_unit_of_the_target_and_keeps_the_quotas(state, target, min_heads, fractions):
    gated = gated_copy(make_vit(depth=2, num_heads=3, embed_dim=24))
    hiap_core.set_gate_state(gated, state)
    with torch.no_grad():  # distinct logits near the threshold, same signs
        for gate in hiap_core.gate_parameters(gated):
            gate.mul_(torch.rand_like(gate) * 0.5 + 1e-3)
    quotas = Quotas.of(hiap_core.describe(gated), min_heads, *fractions)
    restore_quotas(gated, quotas)
    before = hiap_core.describe(gated)
    costs = hiap_core.unit_costs(before)
    target_cost = target * hiap_core.count_macs(before.dense())
    start = hiap_core.count_macs(before)
    flipped = round_to_budget(gated, costs, target_cost, tolerance=0.005, quotas=quotas)
    after = hiap_core.describe(gated)
    cost = hiap_core.count_macs(gated)
    assert quota_shortfalls(gated, quotas) == []
    if abs(start / target_cost - 1) <= 0.005:
        assert flipped == 0 and cost == start
        return
    for old, new in zip(before.layers, after.layers):  # over budget units only close, under it they only open
        if start > target_cost:
            assert set(new.heads) <= set(old.heads) and (new.mlp_hidden or 0) <= (old.mlp_hidden or 0)
        else:
            assert set(new.heads) >= set(old.heads) and (new.mlp_hidden or 0) >= (old.mlp_hidden or 0)
    step = max(costs.beta, costs.gamma)
    floor = all(
        len(layer.heads) == quotas.heads and all(v == quotas.value_dims for v in layer.value_dims) and not layer.mlp_hidden
        for layer in after.layers
    )
    ceiling = all(
        len(layer.heads) == 3 and all(v == 8 for v in layer.value_dims) and layer.mlp_hidden in (0, 48) for layer in after.layers
    )
    assert cost <= target_cost * 1.005 or floor  # never over budget unless the quotas' floor is
    # a head or a whole FFN block (the coarse steps) may fall short where no live head or FFN has a unit to open
    no_fine_step_up = all(all(v == 8 for v in layer.value_dims) and layer.mlp_hidden in (None, 0, 48) for layer in after.layers)
    coarse = max(costs.gamma * 48, costs.alpha + costs.beta * 8)
    assert (
        abs(cost - target_cost) < step
        or abs(cost / target_cost - 1) <= 0.005
        or (floor and cost > target_cost)
        or ceiling
        or (no_fine_step_up and 0 < target_cost - cost <= coarse)
    )
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():  # the extracted model still equals the hardened gated model
        torch.testing.assert_close(hiap_core.extract(gated)(x), gated(x), atol=1e-5, rtol=1e-5)


def test_round_to_budget_closes_heads_when_value_dims_and_neurons_are_not_enough():
    model = make_vit(depth=2, num_heads=3, embed_dim=24)
    gated = gated_copy(model)
    spec = hiap_core.describe(model)
    costs = hiap_core.UnitCosts(alpha=10.0, beta=0.01, gamma=0.01, static=1.0, unit="ms")  # heads are dear
    dense = hiap_core.spec_cost(spec, costs)
    round_to_budget(gated, costs, 0.5 * dense, tolerance=0.005, quotas=Quotas.of(spec, 1, 0.125, 0.125))
    after = hiap_core.describe(gated)
    assert abs(hiap_core.spec_cost(after, costs) / (0.5 * dense) - 1) <= 0.005
    assert all(1 <= len(layer.heads) < 3 for layer in after.layers)


def test_round_to_budget_reopens_closed_ffn_blocks_when_the_run_undershot():
    model = make_vit(depth=2, num_heads=3, embed_dim=24)
    gated = gated_copy(model)
    hiap_core.set_gate_state(gated, [{"ffn": False}, {"ffn": False, "neurons": False}])  # both FFNs closed
    costs = hiap_core.unit_costs(hiap_core.describe(model))
    dense = hiap_core.count_macs(model)
    assert hiap_core.count_macs(gated) / dense < 0.7
    round_to_budget(gated, costs, 0.9 * dense, 0.005, Quotas.of(hiap_core.describe(model), 1, 0.125, 0.125))
    assert abs(hiap_core.count_macs(gated) / (0.9 * dense) - 1) <= 0.005
    assert all(layer.mlp_hidden for layer in hiap_core.describe(gated).layers)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"target_macs": 1.5e12}, "above the dense model"),
        ({"target_macs": 0.01}, "below .* the smallest model the quotas allow"),
        ({"hiap.cost": "latency", "hiap.cost_table": "/nonexistent.json", "hiap.target_latency": 0.5}, "cost_table"),
    ],
)
def test_impossible_targets_are_refused_before_training(overrides, match, tmp_path):
    cfg = config_from_params(TINY, "hiap", {"teacher": "t", "out": str(tmp_path), **overrides})
    dense = models.build_dense_model(cfg)
    with pytest.raises(ConfigError, match=match):
        pruning.make_pruner(cfg, dense, total_steps=10)


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"target_macs": 0.0}, "target_macs"),
        ({"hiap.cost": "flops"}, "hiap.cost"),
        ({"hiap.cost": "latency", "hiap.cost_table": None}, "hiap.cost_table"),
        ({"hiap.target_latency": 0.5}, "hiap.target_latency"),
        ({"hiap.cost": "latency", "hiap.cost_table": "t.json", "target_macs": 0.5}, "target_macs"),
        ({"hiap.budget_deadline": 0.0}, "hiap.budget_deadline"),
        ({"hiap.budget_velocity_steps": 0}, "hiap.budget_velocity_steps"),
        ({"hiap.budget_velocity_steps": 1.5}, "hiap.budget_velocity_steps"),
        ({"hiap.budget_gain": -1.0}, "hiap.budget_gain"),
        ({"hiap.budget_tolerance": 0.2}, "hiap.budget_tolerance"),
    ],
)
def test_invalid_budget_settings_name_the_field(overrides, field):
    with pytest.raises(ConfigError) as err:
        config_from_params(TINY, "hiap", {"teacher": "t", **overrides})
    assert f"{field} = " in str(err.value) and "\n" not in str(err.value)


def test_latency_cost_table_must_match_the_architecture(tmp_path):
    spec = hiap_core.describe(make_vit())
    table = {
        "unit": "ms",
        "spec": spec.dense().to_dict(),
        "coefficients": {"static": 1.0, "head": 0.5, "value_dim": 0.01, "neuron": 0.02},
    }
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table))
    costs = hiap_core.load_cost_table(path, spec)
    assert (costs.alpha, costs.beta, costs.gamma, costs.static, costs.unit) == (0.5, 0.01, 0.02, 1.0, "ms")
    with pytest.raises(ValueError, match="another architecture"):
        hiap_core.load_cost_table(path, hiap_core.describe(make_vit(depth=3)))
    with pytest.raises(FileNotFoundError, match="hiap_core.measure.cost_table"):
        hiap_core.load_cost_table(tmp_path / "missing.json", spec)


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda t: t["coefficients"].update(neuron=float("nan")), "finite numbers >= 0"),
        (lambda t: t["coefficients"].update(head=-0.5), "finite numbers >= 0"),  # a unit that pays for being kept
        (lambda t: t["coefficients"].update(head=0.0, value_dim=0.0, neuron=0.0), "some unit must cost more than 0"),
        (lambda t: t["coefficients"].pop("neuron"), "no valid 'neuron' entry"),
        (lambda t: t.pop("spec"), "no valid 'spec' entry: not a table written by hiap_core.measure.cost_table"),
        (lambda t: t.update(coefficients=[1, 2]), "no valid"),
    ],
    ids=["nan", "negative", "all zero", "missing coefficient", "wrong content", "coefficients not a mapping"],
)
def test_a_bad_latency_cost_table_is_refused_naming_what_is_wrong(tmp_path, edit, match):
    spec = hiap_core.describe(make_vit())
    table = {
        "unit": "ms",
        "spec": spec.dense().to_dict(),
        "coefficients": {"static": 1.0, "head": 0.5, "value_dim": 0.01, "neuron": 0.02},
    }
    edit(table)
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table))
    with pytest.raises(ValueError, match=match) as err:
        hiap_core.load_cost_table(path, spec)
    assert "\n" not in str(err.value)


def test_the_proportional_term_is_bounded_so_a_far_target_does_not_blow_the_scale_up():
    controller = BudgetController(target=0.2, lr=0.1, gain=2.0)
    assert controller.update(1.0) <= math.exp(0.1 * 4.0 + 2.0)  # 400% over: the P term counts 100%
