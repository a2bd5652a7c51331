"""The study layer, part 1: validated run configuration (`config`), datasets (`data`), the training
engine (`engine`, CLI `python -m hiap_core.train`), the study's run folders (`runs`, `paths`) and
parameter profiles (`profiles`). Built on `hiap_core.core`; nothing in the core imports it."""
