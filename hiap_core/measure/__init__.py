"""The study layer, part 2: fair timing (`timing`), random gate states (`states`), the latency cost
table (`cost_table`, CLI `python -m hiap_core.measure.cost_table`) and the benchmarks (`bench`, CLI
`python -m hiap_core.measure.bench`). Built on `hiap_core.core` and `hiap_core.train`."""
