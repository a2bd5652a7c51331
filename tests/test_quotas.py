"""The quotas (min_heads, min_value_fraction, min_neuron_fraction) hold for the model that is extracted."""

import pytest
import torch
from conftest import gate_states, gated_copy, make_vit
from hypothesis import given, strategies as st

import hiap_core
from hiap_core import Quotas, quota_shortfalls, restore_quotas
from hiap_core.core.budget import minimum_cost

DIMS = {"depth": 3, "num_heads": 3, "embed_dim": 24}  # head_dim 8, 48 neurons per FFN
STATES = gate_states(depth=3, heads=3, head_dim=8, hidden=48)
MIN_HEADS = st.sampled_from([0, 1, 1.5, 3])
FRACTIONS = st.sampled_from([(0.0, 0.0), (0.125, 0.125), (0.3, 0.5), (1.0, 1.0)])


def _jittered(state) -> torch.nn.Module:
    """A gated model in `state` with distinct logits of the same signs, as a search leaves them."""
    gated = gated_copy(make_vit(**DIMS))
    hiap_core.set_gate_state(gated, state)
    with torch.no_grad():
        for logits in hiap_core.gate_parameters(gated):
            logits.mul_(torch.rand_like(logits) * 0.5 + 1e-3)
    return gated


def _meets(spec: hiap_core.ViTSpec, quotas: Quotas) -> bool:
    """The quotas read off an extracted model's spec, independently of `quota_shortfalls`."""
    return all(
        len(layer.heads) >= quotas.heads
        and all(width >= quotas.value_dims for width in layer.value_dims)
        and (not layer.mlp_hidden or layer.mlp_hidden >= quotas.neurons)
        for layer in spec.layers
    )


def test_quota_counts_round_up_and_keep_a_unit_in_every_live_structure():
    spec = hiap_core.describe(make_vit(**DIMS))
    assert Quotas.of(spec, 1.5, 0.125, 0.125) == Quotas(heads=2, value_dims=1, neurons=6)
    assert Quotas.of(spec, 0, 0.0, 0.0) == Quotas(heads=0, value_dims=1, neurons=1)  # a live structure keeps a unit
    wide = hiap_core.describe(make_vit(depth=1, num_heads=2, embed_dim=60))  # head_dim 30, 120 neurons
    assert Quotas.of(wide, 1, 0.1, 0.1).value_dims == 3  # 0.1 * 30 is 3.0000000000000004 in floats
    for bad, match in (((4, 0.1, 0.1), "min_heads"), ((1, 1.5, 0.1), "min_value_fraction"), ((1, 0.1, -1), "min_neuron")):
        with pytest.raises(ValueError, match=match):
            Quotas.of(spec, *bad)


def test_a_layer_whose_heads_all_closed_at_p_034_gets_its_most_confident_one_back():
    """hiap_harsh_s0's layer 4: sum p(head) >= min_heads held with three heads at p ~0.34, all hardened closed."""
    gated = gated_copy(make_vit(**DIMS))
    attn, mlp = hiap_core.gated_blocks(gated)[1]
    with torch.no_grad():
        attn.head_gate.logits.copy_(torch.tensor([-0.7, -0.6, -0.65]))
        mlp.block_gate.logits.fill_(-2.0)
    assert hiap_core.feasibility_penalty(gated, 1, 0.125, 0.125) == 0  # the probabilities meet the quota
    assert hiap_core.describe(gated).layers[1].heads == ()  # the hardened layer does not
    quotas = Quotas.of(hiap_core.describe(gated), 1, 0.125, 0.125)
    assert quota_shortfalls(gated, quotas) == ["layer 1: 0 live heads, min_heads asks for 1"]
    assert restore_quotas(gated, quotas) == 1
    assert hiap_core.describe(gated).layers[1].heads == (1,) and quota_shortfalls(gated, quotas) == []
    assert not hiap_core.describe(gated).layers[1].mlp_hidden  # a closed FFN block stays closed: it has no quota


@given(state=STATES, min_heads=MIN_HEADS, fractions=FRACTIONS)
def test_restore_quotas_reopens_only_what_a_quota_needs_most_confident_first(state, min_heads, fractions):
    gated = _jittered(state)
    quotas = Quotas.of(hiap_core.describe(gated), min_heads, *fractions)
    before = [logits.detach().clone() for logits in hiap_core.gate_parameters(gated)]
    reopened = restore_quotas(gated, quotas)
    after = hiap_core.gate_parameters(gated)
    assert quota_shortfalls(gated, quotas) == [] and _meets(hiap_core.describe(gated), quotas)
    changed = [(b != a.detach()) for b, a in zip(before, after)]
    assert sum(int(c.sum()) for c in changed) == reopened
    for old, new, flips in zip(before, after, changed):
        assert bool((old[flips] <= 0).all() and (new.detach()[flips] > 0).all())  # only closed units, only opened
    assert restore_quotas(gated, quotas) == 0  # nothing more to give back
    for (attn, _), old_heads in zip(hiap_core.gated_blocks(gated), before[0::4]):
        reopened_heads = (old_heads <= 0) & attn.head_gate.hard()
        still_closed = ~attn.head_gate.hard()
        if reopened_heads.any() and still_closed.any():  # the head gate's own confidence chose them
            assert float(old_heads[reopened_heads].min()) >= float(old_heads[still_closed].max())


@given(
    state=STATES,
    target=st.one_of(st.none(), st.floats(0.0, 1.0)),
    min_heads=MIN_HEADS,
    fractions=FRACTIONS,
    search_to_the_end=st.booleans(),
)
def test_every_model_a_pruner_extracts_meets_its_quotas(state, target, min_heads, fractions, search_to_the_end):
    """Random searches (gate states at the freeze) under random budgets (None: lambda mode), in both ways a
    search can end: frozen by `set_step` part way, or at `finish` (search_fraction 1)."""
    gated = _jittered(state)
    spec = hiap_core.describe(gated)
    quotas = Quotas.of(spec, min_heads, *fractions)
    costs = hiap_core.unit_costs(spec)
    dense = hiap_core.spec_cost(spec.dense(), costs)
    floor = minimum_cost(spec.dense(), costs, quotas) / dense
    if target is not None:
        target = floor + target * (1 - floor)  # a feasible budget: an infeasible one is refused before training
    pruner = hiap_core.Pruner(
        gated,
        total_steps=4,
        target=target,
        min_heads=min_heads,
        min_value_fraction=fractions[0],
        min_neuron_fraction=fractions[1],
        search_fraction=1.0 if search_to_the_end else 0.5,
    )
    if not search_to_the_end:
        pruner.set_step(pruner.search_steps)
        assert pruner.frozen
    small = pruner.finish()
    assert _meets(small.spec, quotas)
    assert pruner.summary()["quota_units_restored"] >= 0
    if target is not None:  # on budget, or at the floor, and never more than one coarse unit (head, FFN) below it
        cost = hiap_core.spec_cost(small.spec, costs) / dense
        assert cost <= target * 1.005 or abs(cost - floor) < 1e-9
        assert (target - cost) * dense <= costs.alpha + costs.beta * spec.head_dim + costs.gamma * spec.mlp_hidden_dense
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(small(x), gated.eval()(x), atol=1e-5, rtol=1e-5)


def test_min_heads_0_lets_a_layer_go_whole():
    gated = gated_copy(make_vit(**DIMS))
    hiap_core.set_gate_state(gated, [{}, {"heads": False, "ffn": False}, {}])
    quotas = Quotas.of(hiap_core.describe(gated), 0, 0.125, 0.125)
    assert restore_quotas(gated, quotas) == 0 and quota_shortfalls(gated, quotas) == []
    small = hiap_core.extract(gated)
    assert small.spec.layers[1].heads == () and small.spec.layers[1].mlp_hidden is None
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(small(x), gated(x), atol=1e-5, rtol=1e-5)


def test_a_pruner_restores_and_records_the_quota_units_across_a_resume():
    model = make_vit(**DIMS)
    pruner = hiap_core.Pruner(model, total_steps=4, min_heads=1)
    with torch.no_grad():
        for attn, _ in hiap_core.gated_blocks(pruner.model):
            attn.head_gate.logits.fill_(-1.0)  # every head closed: 3 layers need one each
    state = pruner.state_dict()
    assert state["quota_units_restored"] is None  # not yet frozen
    pruner.set_step(pruner.search_steps)
    assert pruner.summary()["quota_units_restored"] == 3
    resumed = hiap_core.Pruner(make_vit(**DIMS), total_steps=4, min_heads=1)
    resumed.model.load_state_dict(pruner.model.state_dict())
    resumed.load_state_dict(pruner.state_dict())
    assert resumed.summary()["quota_units_restored"] == 3
    legacy = {k: v for k, v in pruner.state_dict().items() if k != "quota_units_restored"}
    with pytest.raises(ValueError, match="before the quotas were enforced"):
        resumed.load_state_dict(legacy)
