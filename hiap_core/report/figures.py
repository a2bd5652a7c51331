"""The study's figures (matplotlib and seaborn); `save_figure` writes one to `reports/figures/`.

No backend is forced: in a notebook kernel (JupyterLab, papermill, nbclient) matplotlib's inline backend
shows every figure a cell leaves open as a PNG output, so the executed notebooks carry their figures;
without a display (scripts, tests) matplotlib falls back to Agg by itself."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from ..core.files import atomic_write
from ..core.losses import temperature_at
from ..core.spec import ViTSpec
from ..train.paths import REPORTS, RUNS


def save_figure(fig, name: str) -> Path:
    """Write `fig` to `reports/figures/<name>.png`; the figure stays open, so a notebook shows it too."""
    path = atomic_write(REPORTS / "figures" / f"{name}.png", lambda p: fig.savefig(p, dpi=120, bbox_inches="tight", format="png"))
    return path


def gate_heatmaps(gates: pd.DataFrame, spec: ViTSpec, title: str, freeze_step: int | None = None):
    """Heads, value dims and FFN neurons remaining per layer (rows) over the search's steps (columns, one per
    gate snapshot); darker = more kept. `freeze_step`: where the gates were rounded and frozen (red line)."""
    panels = (
        ("heads", spec.num_heads, "heads"),
        ("value_dims_total", spec.num_heads * spec.head_dim, "value dims"),
        ("neurons", spec.mlp_hidden_dense, "FFN neurons"),
    )
    fig, axes = plt.subplots(3, 1, figsize=(14, 3 * (0.35 * len(spec.layers) + 1.2)))
    for ax, (column, full, label) in zip(axes, panels):
        grid = gates.pivot(index="layer", columns="step", values=column)
        sns.heatmap(grid / full, ax=ax, vmin=0, vmax=1, cmap="Blues", cbar=ax is axes[0], xticklabels=2)
        ax.set_title(f"{label} remaining (of {full}) per layer")
        ax.set_xlabel("optimizer step")
        if freeze_step is not None and freeze_step in grid.columns:  # column i spans [i, i + 1)
            ax.axvline(list(grid.columns).index(freeze_step) + 1, color="tab:red", lw=2, label="gates rounded and frozen")
    if freeze_step is not None:
        axes[0].legend(loc="lower left", fontsize=7)
    fig.suptitle(title, y=1.0)
    fig.tight_layout()
    return fig


def pareto_plot(
    frontier: pd.DataFrame,
    control: tuple[float, float] | None = None,
    teacher: float | None = None,
    floors: dict[str, float] | None = None,
    differences: pd.DataFrame | None = None,
):
    """Accuracy vs MACs, one line per method through its budgets: the mean over seeds with its 95% interval
    (`stats.frontier`), the unpruned control (mean, interval half-width) as a band, the teacher as a line and
    each method's cost floor (`floors`: label -> MACs fraction) as a dotted line in its colour. With
    `differences` (`stats.paired_differences` rows of one reference), a second panel: each method's paired
    difference from the reference at the reference's MACs of each budget, with its 95% t interval."""
    panels = 1 if differences is None else 2
    fig, axes = plt.subplots(1, panels, figsize=(8 * panels, 5), squeeze=False)
    ax = axes[0][0]
    colors = {method: plt.cm.tab10(i % 10) for i, method in enumerate(dict.fromkeys(frontier["method"]))}
    for method, rows in frontier.groupby("method", sort=False):
        rows = rows.sort_values("macs_fraction")
        x, y = 100 * rows["macs_fraction"], rows["acc_mean"]
        ax.errorbar(x, y, yerr=rows["ci_half"], fmt="o-", capsize=3, color=colors[method], label=method)
    for method, floor in (floors or {}).items():
        ax.axvline(100 * floor, color=colors.get(method, "tab:gray"), ls=":", lw=1.2)
    if control is not None:
        mean, half = control
        ax.axhspan(mean - half, mean + half, color="tab:gray", alpha=0.2)
        ax.axhline(mean, color="tab:gray", lw=1, label="unpruned control (KD fine-tune)")
    if teacher is not None:
        ax.axhline(teacher, color="black", ls="--", lw=1, label="teacher (dense)")
    ax.set_xlabel("MACs per image (% of dense); dotted: a method's cost floor")
    ax.set_ylabel("test accuracy (%): mean over seeds, 95% interval")
    ax.set_title("Accuracy vs MACs")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    if differences is not None:
        ax = axes[0][1]
        reference = differences["reference"].iloc[0]
        at = frontier[frontier["method"] == reference].set_index("budget")["macs_fraction"]
        for method, rows in differences.groupby("versus", sort=False):
            x = 100 * rows["budget"].map(at)
            yerr = [rows["diff_mean"] - rows["ci_low"], rows["ci_high"] - rows["diff_mean"]]
            ax.errorbar(x, rows["diff_mean"], yerr=yerr, fmt="o-", capsize=3, color=colors.get(method, "tab:gray"), label=method)
        ax.axhline(0, color="black", lw=1)
        ax.set_xlabel(f"MACs per image (% of dense, {reference}'s)")
        ax.set_ylabel(f"{reference} minus method (points): paired by seed, 95% t interval")
        ax.set_title(f"Difference from {reference} (above 0: {reference} ahead)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def recipe_grid_plot(table: pd.DataFrame):
    """Validation accuracy vs peak learning rate of the recipe grid, one panel per tuned budget and a line per
    method (no warmup); the run with warmup as a ring at its rate, the pick as a star."""
    budgets = list(dict.fromkeys(table["budget"]))
    fig, axes = plt.subplots(1, len(budgets), figsize=(5 * len(budgets), 3.8), squeeze=False)
    for ax, budget in zip(axes[0], budgets):
        at = table[table["budget"] == budget]
        for i, (method, rows) in enumerate(at.groupby("method", sort=False)):
            color = plt.cm.tab10(i)
            plain, warm = rows[rows["warmup"] == 0], rows[rows["warmup"] > 0]
            ax.plot(plain["lr"], plain["val_acc"], "o-", color=color, label=method)
            ax.plot(warm["lr"], warm["val_acc"], "o", mfc="none", ms=10, color=color)
            picked = rows[rows["picked"]]
            ax.plot(picked["lr"], picked["val_acc"], "*", ms=14, color=color)
        ax.set(xscale="log", xlabel="peak learning rate", ylabel="validation accuracy (%)", title=f"budget {budget}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def temperature_plot(tau0: float, tau_min: float, history: pd.DataFrame, search_steps: int):
    """The schedule per step (annealed over the `search_steps` of the structure search, then held), with
    the temperature each epoch of a run ended at."""
    steps_per_epoch = int(history["steps_per_epoch"].iloc[0])
    total = int(history["epoch"].max()) * steps_per_epoch
    steps = list(range(total + 1))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    schedule = [temperature_at(s, search_steps, tau0, tau_min) for s in steps]
    ax.plot([s / steps_per_epoch for s in steps], schedule, label="schedule")
    ax.axvline(search_steps / steps_per_epoch, color="tab:gray", ls="--", label="search ends")
    ends = (history["epoch"] * steps_per_epoch - 1) / steps_per_epoch  # an epoch's last step set its temperature
    ax.plot(ends, history["tau"], "o", label="run (last step of each epoch)")
    ax.legend()
    ax.set_xlabel("epoch")
    ax.set_ylabel("Gumbel-Sigmoid temperature")
    ax.set_title(f"Exponential annealing {tau0} -> {tau_min}")
    ax.grid(alpha=0.3)
    return fig


def learning_curve_plot(history: pd.DataFrame, title: str):
    """Validation accuracy (left) and train / validation loss (right) per epoch of one run."""
    fig, (acc, loss) = plt.subplots(1, 2, figsize=(10, 3.5))
    acc.plot(history["epoch"], 100 * history["val_acc"], "o-")
    acc.set_ylabel("validation accuracy (%)")
    loss.plot(history["epoch"], history["train_loss"], "o-", label="train (augmented, label smoothing)")
    loss.plot(history["epoch"], history["val_loss"], "o-", label="validation")
    loss.set_ylabel("loss")
    loss.legend(fontsize=8)
    for ax in (acc, loss):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    return fig


def macs_trajectory_plot(budget: pd.DataFrame, freeze_step: int | None = None):
    """Per step of a budget-exact search (`budget.csv`): the hardened, expected and projected cost against the
    target (left axis) and the penalty scale (right axis, log); `freeze_step`: where the gates froze."""
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(budget["step"], budget["cost_fraction"], label="hardened (extracted)")
    ax.plot(budget["step"], budget["expected_fraction"], label="expected (gate probabilities)")
    ax.plot(budget["step"], budget["projected_fraction"], lw=1, alpha=0.7, label="projected (what the controller steers)")
    ax.plot(budget["step"], budget["target_fraction"], color="tab:gray", ls="--", label="target")
    if freeze_step is not None:
        ax.axvline(freeze_step, color="tab:red", lw=1.5, label="gates rounded and frozen")
    ax.set(xlabel="optimizer step", ylabel="fraction of dense MACs", ylim=(0, 1.05))
    scale = ax.twinx()
    scale.semilogy(budget["step"], budget["penalty_scale"], color="tab:green", lw=1, label="penalty scale")
    scale.set_ylabel("penalty scale (log)")
    lines, labels = ax.get_legend_handles_labels()
    more, more_labels = scale.get_legend_handles_labels()
    ax.legend(lines + more, labels + more_labels, fontsize=7, loc="upper right")
    ax.grid(alpha=0.3)
    return fig


def architecture_plot(spec: ViTSpec, title: str):
    """The final architecture per layer: each live head as a bar of its value width, FFN neurons beside."""
    fig, (ax_attn, ax_ffn) = plt.subplots(1, 2, figsize=(11, 0.5 * len(spec.layers) + 1.5), sharey=True)
    for i, layer in enumerate(spec.layers):
        left = 0
        for head, width in sorted(zip(layer.heads, layer.value_dims)):
            ax_attn.barh(i, width, left=left, color=plt.cm.tab10(head % 10), edgecolor="white")
            ax_attn.text(left + width / 2, i, f"h{head}:{width}", ha="center", va="center", fontsize=7)
            left += width
        hidden = layer.mlp_hidden
        ax_ffn.barh(i, hidden or 0, color="tab:gray" if hidden is not None else "white")
        ax_ffn.text((hidden or 0) + 5, i, "removed" if hidden is None else str(hidden), va="center", fontsize=8)
    ax_attn.set_xlim(0, spec.num_heads * spec.head_dim)
    ax_ffn.set_xlim(0, spec.mlp_hidden_dense * 1.15)
    ax_attn.set_yticks(range(len(spec.layers)))
    ax_attn.set_yticklabels([f"layer {i}" for i in range(len(spec.layers))])
    ax_attn.invert_yaxis()
    ax_attn.set_xlabel("value dims of live heads (of %d)" % (spec.num_heads * spec.head_dim))
    ax_ffn.set_xlabel(f"FFN neurons (of {spec.mlp_hidden_dense})")
    fig.suptitle(title)
    return fig


def budget_trajectory_plot(names: list[str]):
    """Per step of each budget-exact run: hardened cost vs the target (top) and the adapted lambdas (bottom)."""
    fig, (ax_cost, ax_lambda) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
    for i, name in enumerate(names):
        trajectory = pd.read_csv(RUNS / name / "budget.csv")
        color = plt.cm.tab10(i)
        ax_cost.plot(trajectory["progress"], trajectory["cost_fraction"], color=color, label=f"{name}: hardened cost")
        ax_cost.plot(trajectory["progress"], trajectory["target_fraction"], color=color, ls="--", lw=1, label=f"{name}: target")
        ax_lambda.plot(trajectory["progress"], trajectory["lambda_macro"], color=color, label=f"{name}: lambda_macro")
        ax_lambda.plot(trajectory["progress"], trajectory["lambda_micro"], color=color, ls=":", label=f"{name}: lambda_micro")
    ax_cost.set_ylabel("fraction of dense cost")
    ax_cost.set_title("Budget-exact mode: dual ascent on the penalty scale")
    ax_lambda.set_yscale("log")
    ax_lambda.set_ylabel("penalty weight")
    ax_lambda.set_xlabel("fraction of the structure search")
    for ax in (ax_cost, ax_lambda):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    return fig


def cost_table_plot(samples: pd.DataFrame, table: dict):
    """Measured vs predicted latency of every timed model: the fit set and the held-out random extracted models."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    sns.scatterplot(data=samples, x="ms", y="predicted_ms", hue="role", style="role", s=50, ax=ax)
    lo, hi = samples[["ms", "predicted_ms"]].min().min(), samples[["ms", "predicted_ms"]].max().max()
    ax.plot([lo, hi], [lo, hi], color="gray", lw=1, ls="--")
    held_out = table["evaluation"]
    ax.set_title(
        f"Linear latency model, batch {table['batch_size']}: held-out R^2 {held_out['r2']:.3f}, "
        f"max error {100 * held_out['max_relative_error']:.1f}%",
        fontsize=9,
    )
    ax.set_xlabel("measured (ms)")
    ax.set_ylabel("predicted (ms)")
    ax.grid(alpha=0.3)
    return fig


def latency_plot(table: pd.DataFrame):
    """Speedup over dense (eager PyTorch; optimized vs optimized dense and onnxruntime where measured) beside
    the MACs ratio, per run and batch."""
    measures = [c for c in ("speedup", "optimized_speedup", "ort_speedup", "mac_ratio") if c in table]
    long = table.melt(id_vars=["run", "batch"], value_vars=measures, var_name="measure", value_name="x")
    grid = sns.catplot(data=long, x="run", y="x", hue="measure", col="batch", kind="bar", height=3.8, aspect=1.4, sharey=False)
    grid.set_xticklabels(rotation=30, ha="right")
    grid.set_axis_labels("", "x faster than dense")
    grid.figure.suptitle("Measured speedup vs MACs ratio (CPU, 2 threads)", y=1.04)
    return grid.figure
