"""The study's places, anchored at the project root (the folder holding params.yaml), not at the
working directory."""

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PARAMS = PROJECT_ROOT / "params.yaml"
RAW_DATA = PROJECT_ROOT / "data" / "raw"  # datasets downloaded by the loaders
RUNS = PROJECT_ROOT / "data" / "runs"  # one folder per study run (DVC outputs)
IMAGENET_RUN = PROJECT_ROOT / "data" / "imagenet" / "hiap"  # outside RUNS: the report stages depend on RUNS whole
REPORTS = PROJECT_ROOT / "reports"
