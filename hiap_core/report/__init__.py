"""The study layer, part 3: what the report notebooks show. Tables (`tables`), seed statistics (`stats`), figures (`figures`),
latency of the extracted models (`latency`) and the ImageNet part (`imagenet`); the notebooks use the
names re-exported here (`from hiap_core import report`). Built on the core, `train` and `measure`."""

from ..train.paths import PROJECT_ROOT, REPORTS, RUNS
from ..train.runs import run_metrics
from . import explorer
from .figures import (
    architecture_plot,
    budget_trajectory_plot,
    cost_table_plot,
    gate_heatmaps,
    latency_plot,
    learning_curve_plot,
    macs_trajectory_plot,
    pareto_plot,
    recipe_grid_plot,
    save_figure,
    temperature_plot,
)
from .importance import closing_vs_importance, dense_teacher, search_table, teacher_scores
from .latency import latency_table, latency_vs_macs_target, load_models, onnx_runtimes
from .tables import METHOD_LABELS, PAPER_TABLE2, PAPER_TABLE3, budget_table, cost_floors, results_table, write_table

__all__ = [
    "METHOD_LABELS",
    "PAPER_TABLE2",
    "PAPER_TABLE3",
    "PROJECT_ROOT",
    "REPORTS",
    "RUNS",
    "architecture_plot",
    "budget_table",
    "budget_trajectory_plot",
    "closing_vs_importance",
    "cost_floors",
    "cost_table_plot",
    "dense_teacher",
    "explorer",
    "gate_heatmaps",
    "latency_plot",
    "learning_curve_plot",
    "latency_table",
    "latency_vs_macs_target",
    "load_models",
    "macs_trajectory_plot",
    "onnx_runtimes",
    "pareto_plot",
    "recipe_grid_plot",
    "results_table",
    "run_metrics",
    "save_figure",
    "search_table",
    "teacher_scores",
    "temperature_plot",
    "write_table",
]
