"""`hiap_core.Pruner`: HiAP added to a plain PyTorch loop in about ten lines."""

import copy
import inspect
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import make_vit, needs_cuda

import hiap_core
from hiap_core.core.budget import projected_fraction
from hiap_core.core.gated_vit import GateConfig, gated_blocks, gates

ROOT = Path(__file__).resolve().parents[1]


def test_a_plain_training_loop_prunes_to_a_budget_with_ten_lines_of_hiap():
    model, teacher = make_vit(seed=1).train(), None
    torch.manual_seed(0)
    batches = [(torch.randn(16, 3, 16, 16), torch.randint(0, 5, (16,))) for _ in range(40)]

    # -- the README's ten lines --
    pruner = hiap_core.Pruner(model, total_steps=len(batches), target=0.6, init_logit=1.0)
    optimizer = torch.optim.AdamW(pruner.param_groups(lr=1e-3, weight_decay=0.05, gate_lr=0.2))
    for step, (x, y) in enumerate(batches):
        pruner.set_step(step)
        loss = pruner.loss(F.cross_entropy(model(x), y))["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        pruner.after_step(step)
    small = pruner.finish()
    # --

    assert teacher is None and isinstance(small, hiap_core.PrunedViT)
    dense_macs = hiap_core.count_macs(small.spec.dense())
    assert abs(hiap_core.count_macs(small) / dense_macs / 0.6 - 1) <= 0.005
    assert len(pruner.budget_rows) == pruner.search_steps == len(batches) // 2  # search, then frozen gates
    assert pruner.rounding["target_fraction"] == 0.6
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model.eval()(x), atol=1e-5, rtol=1e-5)


def test_loss_is_the_task_plus_scaled_cost_penalties_plus_feasibility():
    model = make_vit()
    pruner = hiap_core.Pruner(model, total_steps=10, lambda_macro=0.3, lambda_micro=0.2, lambda_feas=5.0, min_heads=3)
    task = torch.tensor(1.25)
    terms = pruner.loss(task)
    macro, micro = hiap_core.cost_penalties(hiap_core.expected_macs(model))
    feas = hiap_core.feasibility_penalty(model, 3, 0.125, 0.125)
    assert float(feas.detach()) > 0  # 3 heads at p = sigmoid(3) sum to 2.86: just under the minimum
    torch.testing.assert_close(terms["loss"], task + 0.3 * macro + 0.2 * micro + 5.0 * feas)
    assert set(terms) == {"loss", "task", "macro", "micro", "feas", "undecided"} and not terms["macro"].requires_grad
    assert pruner.after_step(0) is None and pruner.penalty_scale == 1.0  # lambda mode


def test_temperature_follows_the_schedule_and_a_gated_model_is_not_gated_twice():
    model = hiap_core.gate_vit(make_vit())
    pruner = hiap_core.Pruner(model, total_steps=4, tau0=2.0, tau_min=0.5)
    assert pruner.model is model
    assert [pruner.set_step(s) for s in (0, 4)] == [2.0, pytest.approx(0.5)]
    taus = [g.tau for g in model.modules() if isinstance(g, hiap_core.GumbelSigmoidGate)]
    assert taus == pytest.approx([0.5] * len(taus))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"total_steps": 0}, "total_steps"),
        ({"total_steps": 5, "target": 1.5e12}, "above the dense model"),
        ({"total_steps": 5, "target": 0.001}, "smallest model the quotas allow"),
        ({"total_steps": 5, "target": 0.5, "lambda_micro": 0.0}, "penalties can reach when they push heads only"),
        ({"total_steps": 5, "target": 0.3, "lambda_macro": 0.0}, "push value dims and neurons only"),
        ({"total_steps": 5, "target": 0.5, "lambda_macro": 0.0, "lambda_micro": 0.0}, "both 0"),
        ({"total_steps": 5, "tau_min": 3.0}, "tau_min"),
    ],
)
def test_impossible_settings_fail_before_any_training(kwargs, match):
    with pytest.raises(ValueError, match=match):
        hiap_core.Pruner(make_vit(), **kwargs)


def test_pruner_defaults_are_the_params_yaml_hiap_group():
    hiap = yaml.safe_load((ROOT / "params.yaml").read_text())["hiap"]
    defaults = {n: p.default for n, p in inspect.signature(hiap_core.Pruner).parameters.items() if p.default is not p.empty}
    defaults["init_logit"] = GateConfig().init_logit  # None: the gates' own default
    shared = {n: v for n, v in defaults.items() if n in hiap}
    assert len(shared) == 17  # every setting but `costs` and `target` (hiap.target_macs / target_latency)
    assert shared == {n: hiap[n] for n in shared}


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=needs_cuda)])
def test_gates_freeze_after_the_search_and_stay_frozen(device):
    model = make_vit(seed=2).to(device).train()  # on a GPU: gates, controller, rounding and extraction there
    torch.manual_seed(0)
    batches = [(torch.randn(8, 3, 16, 16, device=device), torch.randint(0, 5, (8,), device=device)) for _ in range(20)]
    pruner = hiap_core.Pruner(model, total_steps=20, target=0.6, init_logit=1.0, search_fraction=0.5)
    optimizer = torch.optim.AdamW(pruner.param_groups(lr=1e-3, weight_decay=0.05, gate_lr=0.3))
    logits_at_freeze = None
    for step, (x, y) in enumerate(batches):
        tau = pruner.set_step(step)
        if step == 10:
            assert pruner.frozen and tau == pytest.approx(0.5)  # annealed over the search, then held
            logits_at_freeze = [g.clone() for g in hiap_core.gate_parameters(model)]
            assert abs(hiap_core.count_macs(model) / hiap_core.count_macs(hiap_core.describe(model).dense()) / 0.6 - 1) <= 0.005
        terms = pruner.loss(F.cross_entropy(model(x), y))
        if pruner.frozen:
            assert terms["loss"] is terms["task"]  # the sub-network trains on the task alone
        optimizer.zero_grad()
        terms["loss"].backward()
        optimizer.step()
        assert pruner.after_step(step) is None or step < 10
    assert all(torch.equal(a, b) for a, b in zip(logits_at_freeze, hiap_core.gate_parameters(model)))
    assert len(pruner.budget_rows) == 10 and 0 < pruner.summary()["settled_step"] <= 10
    small = pruner.finish()
    x = torch.randn(3, 3, 16, 16, device=device)
    with torch.no_grad():
        torch.testing.assert_close(small(x), model.eval()(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("logit", [-2.0, -0.3, 0.0, 0.7, 3.0])
def test_soft_forward_equals_the_hard_one_in_distribution_as_tau_goes_to_zero(logit):
    gate = hiap_core.GumbelSigmoidGate(20_000, init_logit=logit, tau=1e-4).train()
    gate.soft = True
    torch.manual_seed(0)
    soft = gate().detach()
    gate.soft = False
    torch.manual_seed(0)
    hard = gate().detach()
    assert float((soft - hard).abs().gt(1e-3).float().mean()) < 2e-3  # equal but where |a + eps| < ~tau
    p = torch.sigmoid(torch.tensor(logit))
    assert float(soft.mean()) == pytest.approx(float(p), abs=4 * float((p * (1 - p) / 20_000).sqrt()) + 1e-3)
    gate.tau = 2.0
    gate.soft = True
    assert float(gate().detach().sub(0.5).abs().mean()) < 0.45  # at a high temperature the soft gates are not 0/1


def test_invalid_gate_forward_and_search_fraction_are_refused():
    with pytest.raises(ValueError, match="gate forward"):
        hiap_core.Pruner(make_vit(), total_steps=5, gate_forward="fuzzy")
    with pytest.raises(ValueError, match="search_fraction"):
        hiap_core.Pruner(make_vit(), total_steps=5, search_fraction=0.0)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"lambda_macro": -1.0}, "lambda_macro"),
        ({"lambda_micro": float("nan")}, "lambda_micro"),
        ({"min_heads": 7}, "min_heads"),
        ({"init_logit": -3.0}, "init_logit"),
        ({"total_steps": float("nan")}, "total_steps"),
        ({"target": "0.5"}, "target"),
    ],
)
def test_the_pruner_refuses_values_outside_their_sense_in_one_line(kwargs, field):
    arguments = {"total_steps": 10, **kwargs}
    with pytest.raises((ValueError, TypeError), match=field if field != "target" else "target"):
        hiap_core.Pruner(make_vit(), **arguments)


def test_numpy_scalars_are_numbers_too():
    """A value read from a numpy array or a pandas table (np.float32, np.int64) is a number, not "not finite"."""
    pruner = hiap_core.Pruner(
        make_vit(), total_steps=np.int64(10), lambda_macro=np.float32(0.2), min_heads=np.int64(1), target=np.float64(0.6)
    )
    assert pruner.total_steps == 10 and pruner.budget.target == pytest.approx(0.6)
    with pytest.raises(ValueError, match="lambda_micro must be a finite number"):
        hiap_core.Pruner(make_vit(), total_steps=10, lambda_micro=np.bool_(True))


def test_init_logit_on_a_model_gated_already_is_refused_not_ignored():
    gated = hiap_core.gate_vit(make_vit(), init_logit=3.0)
    with pytest.raises(ValueError, match="already gated .*leave init_logit unset"):
        hiap_core.Pruner(gated, total_steps=10, init_logit=1.0)
    pruner = hiap_core.Pruner(gated, total_steps=10)  # its logits kept
    assert all(float(g.logits.min()) == 3.0 for g in hiap_core.core.gated_vit.gates(pruner.model))
    fresh = hiap_core.Pruner(make_vit(), total_steps=10, init_logit=1.0)
    assert all(float(g.logits.max()) == 1.0 for g in hiap_core.core.gated_vit.gates(fresh.model))


def test_the_projection_reads_the_logits_of_budget_velocity_steps_ago_and_resumes_with_them():
    """With `budget_velocity_steps` 3 the controller projects each step from the logits 3 steps back (fewer at
    the start); a pruner restored from `state_dict` mid-search continues with the same window."""
    torch.manual_seed(0)
    batches = [(torch.randn(8, 3, 16, 16), torch.randint(0, 5, (8,))) for _ in range(16)]

    def search(pruner, optimizer, steps, snapshots):
        for step in steps:
            x, y = batches[step]
            torch.manual_seed(step)  # the gate noise of the step, as the engine seeds it: the same after a resume
            pruner.set_step(step)
            loss = pruner.loss(F.cross_entropy(pruner.model(x), y))["loss"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            back = min(3, step + 1)
            row = pruner.after_step(step)
            ahead = pruner.budget.steps_to_deadline(step + 1, pruner.search_steps)
            expected = projected_fraction(pruner.model, pruner.costs, pruner.dense_cost, snapshots[-back], ahead, back)
            assert row["projected_fraction"] == (expected if ahead else row["cost_fraction"])
            snapshots.append([g.logits.detach().clone() for g in gates(pruner.model)])

    def made():
        model = make_vit(seed=1).train()
        pruner = hiap_core.Pruner(model, total_steps=32, target=0.6, init_logit=1.0, budget_velocity_steps=3)
        return pruner, torch.optim.AdamW(pruner.param_groups(lr=1e-3, weight_decay=0.05, gate_lr=0.2))

    pruner, optimizer = made()
    snapshots = [[g.logits.detach().clone() for g in gates(pruner.model)]]
    search(pruner, optimizer, range(8), snapshots)
    state = copy.deepcopy((pruner.model.state_dict(), optimizer.state_dict(), pruner.state_dict()))  # a checkpoint
    search(pruner, optimizer, range(8, 16), snapshots)
    resumed, resumed_optimizer = made()
    resumed.model.load_state_dict(state[0])
    resumed_optimizer.load_state_dict(state[1])
    resumed.load_state_dict(state[2])
    search(resumed, resumed_optimizer, range(8, 16), snapshots[:9])
    assert resumed.budget_rows == pruner.budget_rows
    with pytest.raises(ValueError, match="budget_velocity_steps must be an integer >= 1"):
        hiap_core.Pruner(make_vit(), total_steps=10, budget_velocity_steps=0)


def test_slower_macro_gates_take_their_own_group_at_the_scaled_rate():
    """`macro_gate_lr_scale`: the head and FFN-block gates in a second gate group at scale x gate_lr; at 1 one
    gate group, as before the lever existed."""
    pruner = hiap_core.Pruner(make_vit(), total_steps=10)
    one = pruner.param_groups(lr=1e-3, weight_decay=0.05, gate_lr=0.2)
    assert [g.get("gates", False) for g in one] == [False, False, True] and one[2]["lr"] == 0.2
    two = pruner.param_groups(lr=1e-3, weight_decay=0.05, gate_lr=0.2, macro_gate_lr_scale=0.5)
    micro, macro = two[2], two[3]
    assert micro["gates"] and macro["gates"] and (micro["lr"], macro["lr"]) == (0.2, 0.1)
    blocks = gated_blocks(pruner.model)
    assert {id(p) for p in macro["params"]} == {id(g.logits) for a, m in blocks for g in (a.head_gate, m.block_gate)}
    assert len(micro["params"]) + len(macro["params"]) == len(one[2]["params"])
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="macro_gate_lr_scale must be a finite number > 0"):
            pruner.param_groups(lr=1e-3, weight_decay=0.05, gate_lr=0.2, macro_gate_lr_scale=bad)
