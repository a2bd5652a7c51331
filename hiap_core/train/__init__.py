"""The study layer, part 1: validated run configuration (`config`), datasets (`data`), the training
engine (`engine`, CLI `python -m hiap_core.train`), the study's run folders (`runs`, `paths`) and
parameter profiles (`profiles`). Built on `hiap_core.core`; nothing in the core imports it."""

import warnings

# timm imports huggingface_hub, which imports tqdm.auto: in a notebook kernel without ipywidgets that warns
# once per kernel ("IProgress not found") that it falls back to console bars, noise atop every executed
# notebook. The study's own bars are console bars anyway (tqdm.tqdm).
warnings.filterwarnings("ignore", message="IProgress not found")
