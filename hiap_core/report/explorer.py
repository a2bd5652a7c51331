"""The gate-evolution explorer of `03_gate_evolution.ipynb`: any study run by name, epoch by epoch, alone
or beside another. Every run folder `data/runs/<name>/` holds `history.csv` and `model/`; HiAP runs add
`gates.csv` (the hardened structure per epoch, epoch 0 = start) and budget-exact runs `budget.csv`.
Baselines and dense have no gate history: their structure is the final one at every epoch.

`explore` adds dropdowns and an epoch slider when ipywidgets is installed; without it, the same figures
are drawn once for the runs the notebook's parameters name."""

from __future__ import annotations

import json
from dataclasses import dataclass

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.ticker import MaxNLocator

from ..core.extract import structure_summary
from ..core.pruned import load_pruned
from ..core.spec import ViTSpec
from ..train.paths import RUNS

KINDS = (("heads", "heads"), ("value_dims_total", "value dims"), ("neurons", "FFN neurons"))


@dataclass
class Run:
    """One study run as the explorer reads it."""

    name: str
    history: pd.DataFrame  # per epoch: val_acc, lr, and for HiAP tau, expected_macs, hard_macs
    gates: pd.DataFrame  # per epoch and layer: heads, value_dims_total, neurons (final structure if not HiAP)
    budget: pd.DataFrame | None  # per step, budget-exact runs only
    metrics: dict
    spec: ViTSpec  # the final (extracted) architecture

    @property
    def dense_macs(self) -> int:
        return self.metrics["dense_macs"]

    @property
    def epochs(self) -> list[int]:
        return sorted(self.gates["epoch"].unique())

    def full(self, kind: str) -> int:
        """The dense count of a unit kind per layer."""
        return {"heads": self.spec.num_heads, "value_dims_total": self.spec.num_heads * self.spec.head_dim}.get(
            kind, self.spec.mlp_hidden_dense
        )


def run_names() -> list[str]:
    """Every finished run of the study (a folder with metrics.json), sorted."""
    return sorted(p.parent.name for p in RUNS.glob("*/metrics.json"))


def load_run(name: str) -> Run:
    folder = RUNS / name
    if not (folder / "metrics.json").is_file():
        raise FileNotFoundError(f"{folder} is not a finished run; finished runs: {', '.join(run_names()) or 'none'}")
    spec = load_pruned(folder / "model").spec
    history = pd.read_csv(folder / "history.csv")
    if (folder / "gates.csv").is_file():
        gates = pd.read_csv(folder / "gates.csv")
    else:  # a run without gates: its final structure at every epoch
        final = structure_summary(spec).iloc[:-1]
        gates = pd.concat([final.assign(epoch=e) for e in [0, *history["epoch"]]], ignore_index=True)
    gates = gates[["epoch", "layer", "heads", "value_dims_total", "neurons"]].astype(int)
    budget = pd.read_csv(folder / "budget.csv") if (folder / "budget.csv").is_file() else None
    metrics = json.loads((folder / "metrics.json").read_text())
    return Run(name, history, gates, budget, metrics, spec)


def _cost_fractions(run: Run) -> pd.DataFrame:
    """Expected and hard cost per epoch as fractions of dense (a run without gates: its final MACs)."""
    h = run.history
    if "hard_macs" in h:
        expected, hard = h["expected_macs"] / run.dense_macs, h["hard_macs"] / run.dense_macs
        return pd.DataFrame({"epoch": h["epoch"], "expected": expected, "hard": hard})
    return pd.DataFrame({"epoch": h["epoch"], "expected": float("nan"), "hard": run.metrics["macs_fraction"]})


def evolution_plot(run: Run, epoch: int | None = None):
    """Per epoch: units kept per layer (one line per layer, each kind as a fraction of dense), expected vs
    hard cost, test accuracy, and temperature and learning rate. `epoch`: a vertical marker (the slider)."""
    fig, axes = plt.subplots(2, 3, figsize=(15, 7))
    layers = sorted(run.gates["layer"].unique())
    colors = plt.cm.viridis([i / max(1, len(layers) - 1) for i in range(len(layers))])
    for ax, (kind, label) in zip(axes[0], KINDS):
        for color, layer in zip(colors, layers):
            rows = run.gates[run.gates["layer"] == layer]
            ax.plot(rows["epoch"], rows[kind], "o-", color=color, label=f"layer {layer}")
        ax.set_ylim(-0.05 * run.full(kind), 1.05 * run.full(kind))
        ax.set_title(f"{label} kept per layer (of {run.full(kind)})")
    axes[0][0].legend(fontsize=7, ncol=2)
    cost = _cost_fractions(run)
    axes[1][0].plot(cost["epoch"], cost["expected"], "o-", label="expected (gate probabilities)")
    axes[1][0].plot(cost["epoch"], cost["hard"], "s-", label="hard (hardened gates)")
    if (run.metrics.get("target_macs") or 2) <= 1:  # a fraction of dense (above 1: MACs)
        axes[1][0].axhline(run.metrics["target_macs"], color="tab:gray", ls="--", label="target")
    axes[1][0].set(title="cost, fraction of dense MACs", ylim=(0, 1.05))
    axes[1][0].legend(fontsize=7)
    axes[1][1].plot(run.history["epoch"], 100 * run.history["val_acc"], "o-")
    axes[1][1].set_title(f"validation accuracy (%); final test {100 * run.metrics['test_acc']:.2f}")
    _schedule_panel(axes[1][2], run)
    for ax in axes.flat:
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if epoch is not None:
            ax.axvline(epoch, color="tab:red", lw=1)
    m = run.metrics
    fig.suptitle(f"{run.name}: {m['method']}, {m['macs'] / 1e6:.2f}M MACs ({m['reduction_pct']:.1f}% cut)")
    fig.tight_layout()
    return fig


def _schedule_panel(ax, run: Run) -> None:
    """Temperature (left axis, HiAP runs) and learning rate (right axis) at the end of each epoch."""
    h = run.history
    if "tau" in h:
        ax.plot(h["epoch"], h["tau"], "o-", color="tab:purple", label="temperature")
        ax.set_ylabel("Gumbel-Sigmoid temperature")
        ax.legend(loc="upper right", fontsize=7)
    lr = ax.twinx()
    lr.plot(h["epoch"], h["lr"], "s--", color="tab:orange", label="learning rate")
    lr.set_ylabel("learning rate")
    lr.legend(loc="lower left", fontsize=7)
    ax.set_title("temperature and learning rate")


def epoch_structure(run: Run, epoch: int) -> pd.DataFrame:
    """Per layer at `epoch`: heads, value dims and neurons kept (the hardened gates then)."""
    rows = run.gates[run.gates["epoch"] == epoch].set_index("layer")
    return rows[["heads", "value_dims_total", "neurons"]].rename(columns={"value_dims_total": "value_dims"})


def comparison_plot(runs: list[Run], epoch: int | None = None):
    """Runs side by side: per layer, the units each kept (at `epoch`, else at the end) as grouped bars, and
    hard cost and accuracy per epoch."""
    fig, axes = plt.subplots(1, 5, figsize=(20, 0.5 * len(runs[0].spec.layers) + 3))
    width = 0.8 / len(runs)
    for i, run in enumerate(runs):
        shown = run.epochs[-1] if epoch is None else min(epoch, run.epochs[-1])
        rows = run.gates[run.gates["epoch"] == shown].sort_values("layer")
        y = [layer + (i - (len(runs) - 1) / 2) * width for layer in rows["layer"]]
        for ax, (kind, label) in zip(axes, KINDS):
            ax.barh(y, rows[kind], height=width, color=plt.cm.tab10(i), label=f"{run.name} (epoch {shown})")
            ax.set_title(f"{label} kept per layer (of {run.full(kind)})")
        cost = _cost_fractions(run)
        axes[3].plot(cost["epoch"], cost["hard"], "o-", color=plt.cm.tab10(i), label=run.name)
        axes[4].plot(run.history["epoch"], 100 * run.history["val_acc"], "o-", color=plt.cm.tab10(i), label=run.name)
    for ax in axes[:3]:
        ax.set_yticks(range(len(runs[0].spec.layers)))
        ax.set_ylabel("layer")
        ax.invert_yaxis()
    axes[0].legend(fontsize=7)
    axes[3].set(title="hard cost, fraction of dense MACs", xlabel="epoch", ylim=(0, 1.05))
    axes[4].set(title="test accuracy (%)", xlabel="epoch")
    for ax in axes[3:]:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
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
    """Dropdowns for one or two runs and a slider over epochs (ipywidgets); None without ipywidgets, in
    which case the notebook's static figures for `first` and `second` are all there is."""
    try:
        import ipywidgets as widgets
    except ImportError:
        print("ipywidgets is not installed: the figures above are static (set run_name / compare_with and rerun)")
        return None
    from IPython.display import display

    names = run_names()
    pick = widgets.Dropdown(options=names, value=first, description="run")
    other = widgets.Dropdown(options=["(none)", *names], value=second or "(none)", description="beside")
    last = load_run(first).epochs[-1]
    epoch = widgets.IntSlider(value=last, min=0, max=last, description="epoch")

    def draw(name, beside, shown):
        run = load_run(name)
        epoch.max = run.epochs[-1]
        display(epoch_structure(run, min(shown, run.epochs[-1])).T)
        figures = [evolution_plot(run, shown)]
        if beside != "(none)":
            runs = [run, load_run(beside)]
            display(comparison_table(runs))
            figures.append(comparison_plot(runs, shown))
        for fig in figures:
            display(fig)
            plt.close(fig)

    output = widgets.interactive_output(draw, {"name": pick, "beside": other, "shown": epoch})
    return widgets.VBox([widgets.HBox([pick, other, epoch]), output])
