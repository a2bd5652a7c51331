"""The latency cost table: the linear fit, its quality measures, a real (tiny) measurement, and its use as a cost."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import flop_counter_macs, gate_states, gated_copy, make_vit
from hypothesis import given, strategies as st

import hiap_core
from hiap_core.core import timing
from hiap_core.measure import cost_table as latency
from hiap_core.measure.states import random_feasible_state


def synthetic_samples(coefficients: dict, n: int, seed: int = 0) -> pd.DataFrame:
    gen = np.random.default_rng(seed)
    samples = pd.DataFrame(
        {"heads": gen.integers(1, 36, n), "value_dims": gen.integers(8, 2300, n), "neurons": gen.integers(0, 9000, n)}
    )
    samples["ms"] = (
        coefficients["static"]
        + coefficients["head"] * samples["heads"]
        + coefficients["value_dim"] * samples["value_dims"]
        + coefficients["neuron"] * samples["neurons"]
    )
    return samples


@given(static=st.floats(0, 50), head=st.floats(0, 2), value_dim=st.floats(0, 0.05), neuron=st.floats(0, 0.05))
def test_fit_recovers_the_coefficients_of_a_linear_latency(static, head, value_dim, neuron):
    truth = {"static": static, "head": head, "value_dim": value_dim, "neuron": neuron}
    fitted = latency.fit_linear(synthetic_samples(truth, 30))
    assert fitted == pytest.approx(truth, abs=1e-6)


def test_a_negative_unit_cost_is_fixed_at_zero_and_the_rest_refitted():
    samples = synthetic_samples({"static": 5.0, "head": 0.0, "value_dim": 0.01, "neuron": 0.002}, 30)
    samples["ms"] -= 0.05 * samples["heads"]  # heads look like they save time: noise, not a cost
    fitted = latency.fit_linear(samples)
    assert fitted["head"] == 0.0 and all(v >= 0 for v in fitted.values())


def test_prediction_quality_measures():
    perfect = latency.prediction_quality([1.0, 2.0, 4.0], [1.0, 2.0, 4.0])
    assert perfect == {"r2": 1.0, "max_relative_error": 0.0, "mean_relative_error": 0.0}
    off = latency.prediction_quality([1.0, 2.0, 4.0], [1.1, 2.0, 3.0])
    assert off["max_relative_error"] == pytest.approx(0.25) and off["r2"] < 1


def flops_as_seconds(calls, runs, **_):
    """Stands in for `alternate`: a tiny model's unit costs are below timing noise (a real run once fitted them
    all to 0), so each call "takes" 1 ms plus its FLOPs at 1 TFLOP/s, which is linear in the units."""
    from torch.utils.flop_counter import FlopCounterMode

    times = {}
    for name, fn in calls.items():
        with FlopCounterMode(display=False) as counter:
            fn()
        times[name] = [1e-3 + counter.get_total_flops() * 1e-12] * runs
    return times


def test_measured_table_is_a_cost_for_the_same_architecture(tmp_path, monkeypatch):
    monkeypatch.setattr(timing, "alternate", flops_as_seconds)  # what `models_ms` times with
    dense = make_vit(depth=2, num_heads=3, embed_dim=24)
    table, samples = latency.measure_cost_table(dense, batch_size=4, fit_models=6, eval_models=3, runs=2, progress=False)
    assert list(samples["role"]) == ["fit"] * 6 + ["eval"] * 3 and (samples["ms"] > 0).all()
    assert set(table["coefficients"]) == {"static", "head", "value_dim", "neuron"}
    assert all(v >= 0 for v in table["coefficients"].values())
    assert {"r2", "max_relative_error"} <= set(table["evaluation"]) and table["evaluation"]["models"] == 3
    assert table["device"] and table["unit"] == "ms"
    path = tmp_path / "cost_table.json"
    latency.write_cost_table(table, path)
    spec = hiap_core.describe(dense)
    costs = hiap_core.load_cost_table(path, spec)
    assert hiap_core.spec_cost(spec, costs) == pytest.approx(table["dense_predicted_ms"])
    # predictions use the same linear structure as the penalties
    gated = hiap_core.gate_vit(dense)
    hiap_core.set_gate_state(gated, [{}, {}], magnitude=40.0)  # every gate open with p = 1 - 4e-18
    assert float(hiap_core.expected_cost(gated, costs).total.detach()) == pytest.approx(table["dense_predicted_ms"], rel=1e-6)
    assert hiap_core.ViTSpec.from_dict(json.loads(path.read_text())["spec"]) == spec.dense()


def flat_then_flops(flat_timings: int):
    """Stands in for `alternate`: every model "takes" 2 ms (all noise, no width effect) for the first
    `flat_timings` timings, then its FLOPs' time (`flops_as_seconds`); records the rounds asked each time."""
    asked = []

    def timing(calls, runs, **kwargs):
        asked.append(runs)
        if len(asked) <= flat_timings:
            return {name: [2e-3] * runs for name in calls}
        return flops_as_seconds(calls, runs, **kwargs)

    return timing, asked


def test_a_table_with_no_unit_cost_is_timed_again_with_twice_the_runs(monkeypatch):
    timing_fn, asked = flat_then_flops(flat_timings=2)
    monkeypatch.setattr(timing, "alternate", timing_fn)
    table, _ = latency.measure_cost_table(
        make_vit(depth=2, embed_dim=24), batch_size=4, fit_models=6, eval_models=3, runs=2, progress=False
    )
    assert asked == [2, 4, 8] and table["runs_per_model"] == 8
    assert any(table["coefficients"][c] > 0 for c in ("head", "value_dim", "neuron"))


def test_timings_that_never_resolve_a_unit_cost_are_refused_naming_the_fix(monkeypatch):
    timing_fn, asked = flat_then_flops(flat_timings=100)
    monkeypatch.setattr(timing, "alternate", timing_fn)
    with pytest.raises(ValueError, match=r"with up to 16 runs per model: .*raise cost_table.batch_size or cost_table.runs"):
        latency.measure_cost_table(
            make_vit(depth=2, embed_dim=24), batch_size=4, fit_models=6, eval_models=3, runs=2, progress=False
        )
    assert asked == [2, 4, 8, 16]


def test_too_few_models_to_fit_is_a_clear_error():
    with pytest.raises(ValueError, match="fit_models >= 4"):
        latency.measure_cost_table(make_vit(), fit_models=3, progress=False)


def test_random_width_states_keep_every_layer_alive():
    gated = hiap_core.gate_vit(make_vit(depth=3))
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        hiap_core.set_gate_state(gated, latency.random_width_state(gated, gen))
        spec = hiap_core.describe(gated)
        assert all(len(layer.heads) >= 1 and min(layer.value_dims) >= 1 for layer in spec.layers)


def test_the_benchmark_floor_is_the_model_with_nothing_prunable_and_bounds_the_efficiency():
    """`make bench` prints beside each speedup / MACs-ratio the best one reachable: the floor model (every
    head and FFN removed) has exactly the static MACs, equals the gated model in that state, and a model
    whose time falls with its MACs down to that floor reaches the bound."""
    import copy

    from hiap_core.core.cost import static_macs
    from hiap_core.measure import bench, states

    dense = make_vit().eval()
    gated = hiap_core.gate_vit(copy.deepcopy(dense)).eval()
    hiap_core.set_gate_state(gated, states.empty_state(gated))
    floor = hiap_core.extract(gated)
    assert hiap_core.count_macs(floor) == static_macs(hiap_core.describe(dense))
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(floor(x), gated(x))
    assert bench.best_efficiency(1.0, 0.02, 0.1) == pytest.approx(1.0)  # dense: nothing gained, nothing lost
    assert bench.best_efficiency(0.56, 0.02, 0.0) == pytest.approx(0.56 / (0.54 / 0.98))  # no floor time: MACs alone
    assert bench.best_efficiency(0.56, 0.02, 0.189) < bench.best_efficiency(0.56, 0.02, 0.089) < 1


@given(state=gate_states(depth=2, heads=3, head_dim=8, hidden=48), padded=st.booleans())
def test_the_executed_macs_of_either_attention_layout_equal_an_independent_count(state, padded):
    """`count_macs` stays the model's own MACs; the benchmark's executed count adds what the padded layout
    multiplies by its zero columns, and both equal FlopCounterMode's count of that layout's forward."""
    from hiap_core.measure import bench

    gated = gated_copy(make_vit())
    hiap_core.set_gate_state(gated, state)
    pruned = hiap_core.extract(gated)
    own = hiap_core.count_macs(pruned)
    hiap_core.set_padded_attention(pruned, padded)
    assert bench.executed_macs(pruned) == flop_counter_macs(pruned, (16, 16))
    assert hiap_core.count_macs(pruned) == own <= bench.executed_macs(pruned)


def test_the_latency_table_times_optimized_models_beside_eager_ones():
    from hiap_core.report import latency as report_latency

    dense = hiap_core.extract(gated_copy(make_vit()))
    gated = gated_copy(make_vit())
    hiap_core.set_gate_state(gated, random_feasible_state(gated, 0.5))
    models = {"dense": dense, "pruned": hiap_core.extract(gated)}
    table = report_latency.latency_table(models, None, {2: 2}, threads=2, optimize=True)
    assert list(table["run"]) == ["dense", "pruned"]
    assert (table["optimized_max_abs_diff"] <= 1e-4).all() and (table["optimized_speedup"] > 0).all()
    assert table.loc[0, "optimized_layout"] == "n/a" and table.loc[1, "optimized_layout"] in ("per_head", "padded")
    np.testing.assert_allclose(table["optimized_speedup_over_mac_ratio"], table["optimized_speedup"] / table["mac_ratio"])
