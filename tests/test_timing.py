"""`core.timing.alternate`: every callable runs once per round, in turn, so drift hits all alike."""

import time

import pytest

from hiap_core.core.timing import alternate, median_ms


def test_callables_alternate_within_each_round_after_the_warmup():
    calls = []
    fns = {name: (lambda n=name: calls.append(n)) for name in "abc"}
    times = alternate(fns, rounds=4, warmup=2)
    assert calls == list("abc") * 6  # two warm-up rounds, then four timed, never two in a row of one name
    assert {name: len(t) for name, t in times.items()} == {"a": 4, "b": 4, "c": 4}


def test_median_ms_reads_the_median_in_milliseconds():
    times = alternate({"sleep": lambda: time.sleep(0.002), "noop": lambda: None}, rounds=5, warmup=0)
    ms = median_ms(times)
    assert ms["sleep"] >= 2.0 > ms["noop"]
    assert median_ms({"x": [0.001, 0.003, 0.1]}) == {"x": pytest.approx(3.0)}
