"""The gate-evolution explorer of `03_gate_evolution.ipynb`: any study run by name, step by step, alone
or beside another. A run is read from its folder `data/runs/<name>/` where it is there (trained on this
machine), else from the copies the study commits in `reports/metrics/` (a fresh clone: nothing to train).
Either way: `history.csv`, `metrics.json` and the extracted architecture; HiAP runs add `gates.csv` (the
hardened structure every 5 steps of the search, step 0 = start, and once frozen) and budget-exact runs
`budget.csv` (cost and penalty scale per step). Baselines and dense have no gate history: their structure
is the final one at every step.

`explore` adds dropdowns and a step slider when ipywidgets is installed; without it, the same figures
are drawn once for the runs the notebook's parameters name."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from ..core.extract import structure_summary
from ..core.pruned import load_spec
from ..core.spec import ViTSpec
from ..train.paths import REPORTS, RUNS
from ..train.runs import REPORT_FILES

COMMITTED = REPORTS / "metrics"  # the study's copies of every run's files (runs.REPORT_FILES)

KINDS = (("heads", "heads"), ("value_dims_total", "value dims"), ("neurons", "FFN neurons"))


@dataclass
class Run:
    """One study run as the explorer reads it."""

    name: str
    history: pd.DataFrame  # per epoch: val_acc, lr, and for HiAP tau, expected_macs, hard_macs; `step` added
    gates: pd.DataFrame  # per snapshot step and layer: heads, value_dims_total, neurons (final structure if not HiAP)
    budget: pd.DataFrame | None  # per step, budget-exact runs only
    metrics: dict
    spec: ViTSpec  # the final (extracted) architecture

    @property
    def dense_macs(self) -> int:
        return self.metrics["dense_macs"]

    @property
    def steps(self) -> list[int]:
        """The steps with a gate snapshot."""
        return sorted(self.gates["step"].unique())

    @property
    def total_steps(self) -> int:
        return int(self.history["step"].iloc[-1])

    def full(self, kind: str) -> int:
        """The dense count of a unit kind per layer."""
        return {"heads": self.spec.num_heads, "value_dims_total": self.spec.num_heads * self.spec.head_dim}.get(
            kind, self.spec.mlp_hidden_dense
        )


def run_names() -> list[str]:
    """Every finished run of the study: a folder with metrics.json, or a committed run (its metrics and
    architecture in reports/metrics), sorted."""
    committed = {p.name.removesuffix(".json") for p in COMMITTED.glob("*.json")}
    committed &= {p.name.removesuffix("_architecture.json") for p in COMMITTED.glob("*_architecture.json")}
    return sorted({p.parent.name for p in RUNS.glob("*/metrics.json")} | committed)


def run_files(name: str) -> dict[str, Path]:
    """Where the explorer reads run `name`: {file in its run folder: path}, the folder's own files if the run
    is finished there, else their committed copies."""
    folder = RUNS / name
    if (folder / "metrics.json").is_file():
        return {source: folder / source for source, _ in REPORT_FILES}
    return {source: COMMITTED / target.format(name) for source, target in REPORT_FILES}


def load_run(name: str) -> Run:
    files = run_files(name)
    if not (files["metrics.json"].is_file() and files["model/architecture.json"].is_file()):
        raise FileNotFoundError(
            f"{name} is neither a finished run in {RUNS} nor committed in {COMMITTED}; runs: {', '.join(run_names()) or 'none'}"
        )
    spec = load_spec(files["model/architecture.json"])
    history = pd.read_csv(files["history.csv"])
    history["step"] = history["epoch"] * history["steps_per_epoch"]
    if files["gates.csv"].is_file():
        gates = pd.read_csv(files["gates.csv"])
    else:  # a run without gates: its final structure at every step
        final = structure_summary(spec).iloc[:-1]
        gates = pd.concat([final.assign(step=s) for s in (0, int(history["step"].iloc[-1]))], ignore_index=True)
    gates = gates[["step", "layer", "heads", "value_dims_total", "neurons"]].astype(int)
    budget = pd.read_csv(files["budget.csv"]) if files["budget.csv"].is_file() else None
    metrics = json.loads(files["metrics.json"].read_text())
    return Run(name, history, gates, budget, metrics, spec)


def _cost_fractions(run: Run) -> pd.DataFrame:
    """Expected and hard cost per step as fractions of dense: every step of a budget-exact search, else at
    the end of each epoch (a run without gates: its final MACs)."""
    if run.budget is not None:
        b = run.budget
        return pd.DataFrame({"step": b["step"], "expected": b["expected_fraction"], "hard": b["cost_fraction"]})
    h = run.history
    if "hard_macs" in h:
        expected, hard = h["expected_macs"] / run.dense_macs, h["hard_macs"] / run.dense_macs
        return pd.DataFrame({"step": h["step"], "expected": expected, "hard": hard})
    return pd.DataFrame({"step": h["step"], "expected": float("nan"), "hard": run.metrics["macs_fraction"]})


def evolution_plot(run: Run, step: int | None = None):
    """Over the steps: units kept per layer (one line per layer, each kind as a fraction of dense), expected
    vs hard cost with the penalty scale, validation accuracy, and temperature and learning rate; the end of
    the search dashed, `step` (the slider) a red line."""
    fig, axes = plt.subplots(2, 3, figsize=(15, 7))
    layers = sorted(run.gates["layer"].unique())
    colors = plt.cm.viridis([i / max(1, len(layers) - 1) for i in range(len(layers))])
    for ax, (kind, label) in zip(axes[0], KINDS):
        for color, layer in zip(colors, layers):
            rows = run.gates[run.gates["layer"] == layer]
            ax.plot(rows["step"], rows[kind], ".-", color=color, label=f"layer {layer}")
        ax.set_ylim(-0.05 * run.full(kind), 1.05 * run.full(kind))
        ax.set_title(f"{label} kept per layer (of {run.full(kind)})")
    axes[0][0].legend(fontsize=7, ncol=2)
    cost = _cost_fractions(run)
    axes[1][0].plot(cost["step"], cost["expected"], "-", label="expected (gate probabilities)")
    axes[1][0].plot(cost["step"], cost["hard"], "-", label="hard (hardened gates)")
    if (run.metrics.get("target_macs") or 2) <= 1:  # a fraction of dense (above 1: MACs)
        axes[1][0].axhline(run.metrics["target_macs"], color="tab:gray", ls="--", label="target")
    axes[1][0].set(title="cost, fraction of dense MACs", ylim=(0, 1.05))
    if run.budget is not None:
        scale = axes[1][0].twinx()
        scale.semilogy(run.budget["step"], run.budget["penalty_scale"], color="tab:green", lw=1, label="penalty scale")
        scale.set_ylabel("penalty scale (log)")
        scale.legend(loc="lower left", fontsize=7)
    axes[1][0].legend(fontsize=7)
    axes[1][1].plot(run.history["step"], 100 * run.history["val_acc"], "o-")
    axes[1][1].set_title(f"validation accuracy (%); final test {100 * run.metrics['test_acc']:.2f}")
    _schedule_panel(axes[1][2], run)
    search_end = run.metrics.get("structure", {}).get("search_steps")
    for ax in axes.flat:
        ax.set_xlabel("step")
        ax.set_xlim(0, run.total_steps)
        ax.grid(alpha=0.3)
        if search_end is not None:
            ax.axvline(search_end, color="tab:gray", ls=":", lw=1)
        if step is not None:
            ax.axvline(step, color="tab:red", lw=1)
    m = run.metrics
    fig.suptitle(
        f"{run.name}: {m['method']}, {m['macs'] / 1e6:.2f}M MACs ({m['reduction_pct']:.1f}% cut); dotted: the gates freeze"
    )
    fig.tight_layout()
    return fig


def _schedule_panel(ax, run: Run) -> None:
    """Temperature (left axis, HiAP runs) and learning rate (right axis) at the end of each epoch."""
    h = run.history
    if "tau" in h:
        ax.plot(h["step"], h["tau"], "o-", color="tab:purple", label="temperature")
        ax.set_ylabel("Gumbel-Sigmoid temperature")
        ax.legend(loc="upper right", fontsize=7)
    lr = ax.twinx()
    lr.plot(h["step"], h["lr"], "s--", color="tab:orange", label="learning rate")
    lr.set_ylabel("learning rate")
    lr.legend(loc="lower left", fontsize=7)
    ax.set_title("temperature and learning rate")


def step_structure(run: Run, step: int) -> pd.DataFrame:
    """Per layer at `step`: heads, value dims and neurons kept (the last snapshot at or before it)."""
    shown = max(s for s in run.steps if s <= step) if step >= 0 else run.steps[0]
    rows = run.gates[run.gates["step"] == shown].set_index("layer")
    return rows[["heads", "value_dims_total", "neurons"]].rename(columns={"value_dims_total": "value_dims"})


def comparison_plot(runs: list[Run], step: int | None = None):
    """Runs side by side: per layer, the units each kept (at `step`, else at the end) as grouped bars on a
    row of three, and below the hard cost and the validation accuracy over the steps."""
    fig = plt.figure(figsize=(15, 0.5 * len(runs[0].spec.layers) + 7))
    grid = fig.add_gridspec(2, 6)
    bars = [fig.add_subplot(grid[0, 2 * i : 2 * i + 2]) for i in range(3)]
    cost_ax, acc_ax = fig.add_subplot(grid[1, :3]), fig.add_subplot(grid[1, 3:])
    width = 0.8 / len(runs)
    for i, run in enumerate(runs):
        shown = run.total_steps if step is None else min(step, run.total_steps)
        rows = step_structure(run, shown).reset_index().sort_values("layer")
        y = [layer + (i - (len(runs) - 1) / 2) * width for layer in rows["layer"]]
        for ax, (kind, label) in zip(bars, KINDS):
            ax.barh(y, rows[kind.replace("_total", "")], height=width, color=plt.cm.tab10(i), label=f"{run.name} (step {shown})")
            ax.set_xlim(0, run.full(kind))
            ax.set_title(f"{label} kept per layer (of {run.full(kind)})")
        cost = _cost_fractions(run)
        cost_ax.plot(cost["step"], cost["hard"], "-", color=plt.cm.tab10(i), label=run.name)
        acc_ax.plot(run.history["step"], 100 * run.history["val_acc"], "o-", color=plt.cm.tab10(i), label=run.name)
    for ax in bars:
        ax.set_yticks(range(len(runs[0].spec.layers)))
        ax.set_ylabel("layer")
        ax.invert_yaxis()
    fig.legend(*bars[0].get_legend_handles_labels(), loc="upper center", ncol=len(runs), fontsize=8)
    cost_ax.set(title="hard cost, fraction of dense MACs", xlabel="step", ylim=(0, 1.05))
    acc_ax.set(title="validation accuracy (%)", xlabel="step")
    for ax in (cost_ax, acc_ax):
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return fig


def comparison_table(runs: list[Run]) -> pd.DataFrame:
    """Final numbers of each run, one column per run."""
    rows = {
        run.name: {
            "method": run.metrics["method"],
            "test accuracy (%)": round(100 * run.metrics["test_acc"], 2),
            "MACs (M)": round(run.metrics["macs"] / 1e6, 3),
            "MACs cut (%)": round(run.metrics["reduction_pct"], 1),
            "target (fraction of dense)": run.metrics.get("target_macs"),
            "params (M)": round(run.metrics["params"] / 1e6, 3),
            "heads": sum(len(layer.heads) for layer in run.spec.layers),
            "value dims": sum(sum(layer.value_dims) for layer in run.spec.layers),
            "FFN neurons": sum(layer.mlp_hidden or 0 for layer in run.spec.layers),
            "epochs": run.metrics["epochs"],
        }
        for run in runs
    }
    return pd.DataFrame(rows)


def explore(first: str, second: str | None = None):
    """Dropdowns for one or two runs and a slider over steps (ipywidgets); None without ipywidgets, in which
    case the notebook's static figures for `first` and `second` are all there is. One change of a control
    draws the output once (`draws` counts them): a new run first moves the slider into its range, quietly."""
    try:
        import ipywidgets as widgets
    except ImportError:
        print("ipywidgets is not installed: the figures above are static (set run_name / compare_with and rerun)")
        return None
    from IPython.core.interactiveshell import InteractiveShell

    def shown(item) -> dict:  # the display_data output `display(item)` would give
        data, metadata = InteractiveShell.instance().display_formatter.format(item)
        return {"output_type": "display_data", "data": data, "metadata": metadata}

    names = run_names()
    pick = widgets.Dropdown(options=names, value=first, description="run")
    other = widgets.Dropdown(options=["(none)", *names], value=second or "(none)", description="beside")
    last = load_run(first).total_steps
    # a drag draws once, on release, and the lock keeps two draws apart: in JupyterLab (headless Chromium,
    # ipykernel 7, which may handle widget messages beside a running one) a drag broke matplotlib's shared
    # mathtext parser in the middle of a draw
    step = widgets.IntSlider(value=last, min=0, max=last, description="step", continuous_update=False)
    output = widgets.Output()
    box = widgets.VBox([widgets.HBox([pick, other, step]), output])
    box.draws, quiet, drawing = 0, [False], threading.Lock()

    def draw(_=None):
        if quiet[0]:
            return
        run = load_run(pick.value)
        with drawing:
            tables, figures = [step_structure(run, step.value).T], [evolution_plot(run, step.value)]
            if other.value != "(none)":
                runs = [run, load_run(other.value)]
                tables.append(comparison_table(runs))
                figures.append(comparison_plot(runs, step.value))
            # set as the widget's state, never captured: DESIGN.md, "The explorer's widgets under papermill"
            output.outputs = tuple(shown(item) for item in tables + figures)
            for fig in figures:
                plt.close(fig)
        box.draws += 1

    def new_run(_):
        quiet[0] = True  # moving the slider into the new run's range must not draw a second time
        try:
            step.max = load_run(pick.value).total_steps
        finally:
            quiet[0] = False
        draw()

    pick.observe(new_run, names="value")
    other.observe(draw, names="value")
    step.observe(draw, names="value")
    draw()
    return box
