"""How decided the gates are at the freeze (`polarisation`), and the polarising term (`hiap.lambda_polarise`)."""

import math

import pandas as pd
import pytest
import torch
from conftest import gated_copy, make_vit

import hiap_core
from hiap_core.core.polarisation import polarisation, undecided_term
from hiap_core.train.search_levers import freeze_figures, merged


def _hand_made() -> torch.nn.Module:
    """One layer, 3 heads of 8 value dims, 48 neurons, with logits chosen by hand."""
    gated = gated_copy(make_vit(depth=1, num_heads=3, embed_dim=24))
    attn, mlp = hiap_core.gated_blocks(gated)[0]
    with torch.no_grad():
        attn.head_gate.logits.copy_(torch.tensor([2.0, -1.0, 0.5]))
        attn.value_gate.logits.fill_(3.0)
        attn.value_gate.logits[:4] = -0.25
        mlp.block_gate.logits.fill_(4.0)
        mlp.neuron_gate.logits.fill_(-3.0)
        mlp.neuron_gate.logits[:12] = 0.2
    return gated


def test_disagreement_and_the_undecided_share_follow_their_definitions():
    gated = _hand_made()
    costs = hiap_core.unit_costs(hiap_core.describe(gated))
    a, b, g = costs.alpha, costs.beta, costs.gamma

    def sig(x):
        return 1 / (1 + math.exp(-x))

    total = 3 * a + 24 * b + 48 * g + 48 * g  # the block gate carries its 48 neurons once more
    open_side = (
        a * (1 - sig(2.0)) + a * (1 - sig(0.5)) + 20 * b * (1 - sig(3.0)) + 48 * g * (1 - sig(4.0)) + 12 * g * (1 - sig(0.2))
    )
    closed_side = a * sig(-1.0) + 4 * b * sig(-0.25) + 36 * g * sig(-3.0)
    undecided = (a + 4 * b + 12 * g) / total  # |logit| < 1: the head at 0.5, 4 value dims at -0.25, 12 neurons at 0.2
    measured = polarisation(gated, costs)
    assert measured["disagreement_open"] == pytest.approx(open_side / total)
    assert measured["disagreement_closed"] == pytest.approx(closed_side / total)
    assert measured["disagreement"] == pytest.approx((open_side + closed_side) / total)
    assert measured["undecided_share"] == pytest.approx(undecided)
    opened = torch.tensor([2.0, 0.5] + [3.0] * 20 + [4.0] + [0.2] * 12, dtype=torch.double)
    closed = torch.tensor([-1.0] + [-0.25] * 4 + [-3.0] * 36, dtype=torch.double)
    quartiles = torch.tensor([0.25, 0.5, 0.75], dtype=torch.double)
    assert measured["open_logit_quartiles"] == pytest.approx(torch.quantile(opened, quartiles).tolist())
    assert measured["closed_logit_quartiles"] == pytest.approx(torch.quantile(closed, quartiles).tolist())
    assert measured["units"] == 3 + 24 + 1 + 48


def test_fully_decided_gates_disagree_nowhere_and_one_side_has_no_quartiles():
    gated = gated_copy(make_vit(depth=1, num_heads=3, embed_dim=24))
    with torch.no_grad():
        for logits in hiap_core.gate_parameters(gated):
            logits.fill_(40.0)
    measured = polarisation(gated, hiap_core.unit_costs(hiap_core.describe(gated)))
    assert measured["disagreement"] < 1e-15 and measured["undecided_share"] == 0
    assert measured["closed_logit_quartiles"] is None  # no closed gate


def test_the_polarising_term_pushes_open_gates_up_and_closed_gates_down():
    gated = _hand_made()
    term = undecided_term(gated, hiap_core.unit_costs(hiap_core.describe(gated)))
    assert 0 < float(term.detach()) <= 0.25
    term.backward()
    for logits in hiap_core.gate_parameters(gated):
        descent = -logits.grad  # the direction a gradient step moves the logit
        assert bool((descent[logits.detach() > 0] > 0).all() and (descent[logits.detach() < 0] < 0).all())


def test_the_pruner_polarises_only_from_the_deadline_and_records_the_gates_at_the_freeze():
    pruner = hiap_core.Pruner(
        make_vit(depth=1, num_heads=3, embed_dim=24), total_steps=20, lambda_polarise=2.0, budget_deadline=0.6
    )  # search 10 steps: the term acts from step 6
    task = torch.tensor(1.0)
    pruner.set_step(5)
    before = pruner.loss(task)
    pruner.set_step(6)
    after = pruner.loss(task)
    base = before["task"] + pruner.lambda_macro * before["macro"] + pruner.lambda_micro * before["micro"]
    assert float(before["loss"]) == pytest.approx(float(base + pruner.lambda_feas * before["feas"]))
    assert float(after["loss"] - before["loss"]) == pytest.approx(2.0 * float(after["undecided"]))
    expected = polarisation(pruner.model, pruner.costs)
    pruner.set_step(pruner.search_steps)
    assert pruner.frozen and pruner.summary()["at_freeze"] == expected


def test_lever_figures_read_the_freeze_and_name_each_missed_target():
    metrics = {
        "budget": {"target_fraction": 0.5, "cost_fraction_before_rounding": 0.504, "rounded_units": 30},
        "structure": {
            "quota_units_restored": 2,
            "at_freeze": {
                "disagreement": 0.03,
                "disagreement_open": 0.02,
                "disagreement_closed": 0.01,
                "undecided_share": 0.005,
                "units": 1000,
            },
        },
    }
    figures = freeze_figures(metrics)
    assert figures["D_pct"] == pytest.approx(3.0) and figures["undecided_pct"] == pytest.approx(0.5)
    assert figures["miss_before_rounding_pct"] == pytest.approx(0.8) and figures["rounded_pct"] == pytest.approx(3.0)
    assert figures["misses"] == "D, rounded"  # the miss (0.8%) and the undecided share (0.5%) are on target


def test_a_new_round_of_levers_replaces_its_own_rows_and_keeps_the_others():
    def rows(levers, acc):
        return pd.DataFrame(
            [{"lever": lever, "budget": b, "seed": 0, "val_acc": acc} for lever in levers for b in ("moderate", "harsh")]
        )

    earlier = rows(["defaults", "polarise 5"], 80.0)
    table = merged(rows(["polarise 1", "defaults"], 90.0), earlier)
    assert list(table["lever"]) == ["defaults"] * 2 + ["polarise 5"] * 2 + ["polarise 1"] * 2  # LEVERS' order
    assert list(table["val_acc"]) == [90.0, 90.0, 80.0, 80.0, 90.0, 90.0]
