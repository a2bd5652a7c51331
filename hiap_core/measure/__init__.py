"""The study layer, part 2: the machine a timing ran on (`timing`; the timing itself is `core.timing`),
random gate states (`states`), the latency cost table (`cost_table`, CLI `python -m
hiap_core.measure.cost_table`) and the benchmarks (`bench`, CLI `python -m hiap_core.measure.bench`).
Built on `hiap_core.core` and `hiap_core.train`."""
