import math

import pytest
import torch

from hiap_core import GumbelSigmoidGate, temperature_at


def test_eval_is_deterministic_threshold_at_zero():
    gate = GumbelSigmoidGate(4).eval()
    with torch.no_grad():
        gate.logits.copy_(torch.tensor([-2.0, -1e-3, 1e-3, 2.0]))
    assert gate().tolist() == [0.0, 0.0, 1.0, 1.0]
    assert gate.hard().tolist() == [False, False, True, True]


@pytest.mark.parametrize("tau", [2.0, 0.5])
def test_training_samples_are_exactly_binary_and_match_probs(tau):
    torch.manual_seed(0)
    gate = GumbelSigmoidGate(5, tau=tau).train()
    with torch.no_grad():
        gate.logits.copy_(torch.tensor([-3.0, -1.0, 0.0, 0.7, 2.5]))
    samples = torch.stack([gate().detach() for _ in range(20000)])
    assert set(samples.unique().tolist()) <= {0.0, 1.0}
    p = gate.probs().detach()
    # P(on) = sigmoid(logit), whatever tau: within 5 standard errors.
    assert torch.all((samples.mean(0) - p).abs() <= 5 * torch.sqrt(p * (1 - p) / len(samples)) + 1e-3)


def test_straight_through_gradient_reaches_every_logit():
    torch.manual_seed(0)
    gate = GumbelSigmoidGate(64, init_logit=0.0, tau=1.0).train()
    weights = torch.randn(64)
    (gate() * weights).sum().backward()
    assert torch.all(gate.logits.grad != 0)  # closed samples included


def test_invalid_configuration_raises_clear_errors():
    with pytest.raises(ValueError, match="temperature"):
        GumbelSigmoidGate(3, tau=-1.0)
    gate = GumbelSigmoidGate(3)
    for bad in (0.0, -0.5, math.nan, math.inf):
        with pytest.raises(ValueError, match="temperature"):
            gate.tau = bad
    with pytest.raises(ValueError, match="num_units"):
        GumbelSigmoidGate(0)
    with pytest.raises(ValueError, match="init_logit"):
        GumbelSigmoidGate(2, init_logit=math.nan)


def test_temperature_schedule_is_exponential_from_tau0_to_tau_min():
    assert temperature_at(0, 100) == pytest.approx(2.0)
    assert temperature_at(50, 100) == pytest.approx(1.0)  # geometric mean of 2.0 and 0.5
    assert temperature_at(100, 100) == pytest.approx(0.5)
    assert temperature_at(250, 100) == pytest.approx(0.5)
    values = [temperature_at(s, 100) for s in range(101)]
    ratios = [b / a for a, b in zip(values, values[1:])]
    assert max(ratios) == pytest.approx(min(ratios))
    with pytest.raises(ValueError, match="tau_min"):
        temperature_at(0, 10, tau0=0.5, tau_min=2.0)
    with pytest.raises(ValueError, match="total_steps"):
        temperature_at(0, 0)
    with pytest.raises(ValueError, match="> 0"):
        temperature_at(0, 10, tau0=-1.0)


@pytest.mark.parametrize("soft", [False, True])
def test_samples_stay_fp32_under_mixed_precision(soft):
    """Near s = 0.5 a bf16 sample would round onto the threshold: gates sample in fp32 inside autocast too."""
    gate = GumbelSigmoidGate(1000, init_logit=0.0, tau=2.0).train()
    gate.soft = soft
    torch.manual_seed(0)
    full = gate()
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = gate()
    assert mixed.dtype == torch.float32 and torch.equal(mixed, full)


def test_a_compiled_gated_model_is_not_recompiled_as_the_temperature_anneals():
    import hiap_core
    from conftest import make_vit
    from hiap_core.core.gated_vit import gates

    torch._dynamo.reset()
    pruner = hiap_core.Pruner(make_vit().train(), total_steps=20)
    compiled = torch.compile(pruner.model, backend="eager")  # the guards, not the code generator, decide
    x = torch.randn(2, 3, 16, 16)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for step in range(6):  # a new tau at every step of the search
            assert pruner.set_step(step) == pytest.approx(temperature_at(step, pruner.search_steps, 2.0, 0.5))
            compiled(x).sum().backward()
    assert all(gate.temperature.item() == pytest.approx(gate.tau) for gate in gates(pruner.model))
