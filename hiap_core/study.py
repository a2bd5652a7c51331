"""The study behind the notebooks: runs, tables, figures, latency. Notebooks call these and stay thin.

Run folders live in `data/runs/<run>` (DVC-cached); everything a reader looks at goes to `reports/`
(`tables/*.csv|md`, `figures/*.png`, `metrics/*.json|csv`).
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
import torch  # noqa: E402

from .arch import ViTSpec  # noqa: E402
from .bench import alternate  # noqa: E402
from .cost import count_macs  # noqa: E402
from .files import atomic_write  # noqa: E402
from .losses import temperature_at  # noqa: E402
from .pruned import load_pruned  # noqa: E402
from .train import RUNS  # noqa: E402

REPORTS = Path("reports")

# The paper's own numbers (DESIGN.md, "Paper facts"): CIFAR-10 ViT-Tiny, Table 3.
PAPER_TABLE3 = pd.DataFrame(
    [
        ("Dense", "-", 174.0, 0.0, 90.50),
        ("Uniform-Ratio", "moderate", 116.6, 33.0, 86.63),
        ("L1-Structured (FFN)", "moderate", 116.5, 33.0, 87.15),
        ("HiAP", "moderate", 116.3, 33.1, 87.56),
        ("L1-Structured (FFN)", "aggressive", 87.3, 49.8, 86.80),
        ("HiAP", "aggressive", 87.1, 49.9, 87.25),
    ],
    columns=["method", "budget", "macs_M", "reduction_pct", "accuracy_pct"],
)
# ImageNet DeiT-S, Table 2: params (M), FLOPs (G), top-1 (%).
PAPER_TABLE2 = pd.DataFrame(
    [
        ("Dense Baseline", 22.1, 4.6, 79.85), ("WDPruning", 15.0, 3.1, 78.55), ("WDPruning", 13.3, 2.6, 78.38),
        ("S2ViT", 15.3, 3.1, 79.22), ("S2ViT", 13.5, 2.8, 78.44), ("ViT-Slim", 15.6, 3.1, 79.90),
        ("ViT-Slim", 13.5, 2.8, 79.50), ("GOHSP", 14.4, 3.0, 79.98), ("GOHSP", 11.1, 2.8, 79.86),
        ("HiAP (paper)", 15.0, 3.1, 79.10), ("HiAP (paper)", 12.3, 2.5, 77.95),
    ],
    columns=["method", "params_M", "flops_G", "top1_pct"],
)
METHOD_LABELS = {"dense": "Dense", "uniform": "Uniform-Ratio", "l1_ffn": "L1-Structured (FFN)", "hiap": "HiAP"}


def run_metrics(name: str) -> dict:
    return json.loads((RUNS / name / "metrics.json").read_text())


def results_table(names: list[str]) -> pd.DataFrame:
    """One row per run: method, MACs (both conventions, millions), reduction, params, accuracy."""
    rows = []
    for name in names:
        m = run_metrics(name)
        rows.append({
            "run": name,
            "method": METHOD_LABELS[m["method"]],
            "macs_M": m["macs"] / 1e6,
            "macs_no_attn_matmul_M": m["macs_no_attn_matmul"] / 1e6,
            "reduction_pct": m["reduction_pct"],
            "params_M": m["params"] / 1e6,
            "accuracy_pct": 100 * m["test_acc"],
        })
    return pd.DataFrame(rows)


def write_table(table: pd.DataFrame, name: str, floatfmt: str = ".2f") -> None:
    atomic_write(REPORTS / "tables" / f"{name}.csv", lambda p: table.to_csv(p, index=False))
    atomic_write(REPORTS / "tables" / f"{name}.md", lambda p: p.write_text(table.to_markdown(index=False, floatfmt=floatfmt) + "\n"))


def save_figure(fig, name: str) -> Path:
    path = atomic_write(REPORTS / "figures" / f"{name}.png", lambda p: fig.savefig(p, dpi=120, bbox_inches="tight", format="png"))
    return path


def gate_heatmaps(gates: pd.DataFrame, spec: ViTSpec, title: str):
    """Heads, value dims and FFN neurons remaining per layer (rows) over epochs (columns); darker = more kept."""
    panels = (("heads", spec.num_heads, "heads"), ("value_dims_total", spec.num_heads * spec.head_dim, "value dims"),
              ("neurons", spec.mlp_hidden_dense, "FFN neurons"))
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.45 * len(spec.layers) + 2))
    for ax, (column, full, label) in zip(axes, panels):
        grid = gates.pivot(index="layer", columns="epoch", values=column)
        sns.heatmap(grid / full, ax=ax, vmin=0, vmax=1, cmap="Blues", annot=grid, fmt="g", cbar=ax is axes[-1],
                    annot_kws={"fontsize": 7})
        ax.set_title(f"{label} remaining (of {full})")
        ax.set_xlabel("epoch")
    fig.suptitle(title, y=1.04)
    return fig


def pareto_plot(table: pd.DataFrame):
    """Accuracy vs MACs of every run of the study; HiAP runs labelled by name."""
    fig, ax = plt.subplots(figsize=(7, 5))
    sns.scatterplot(data=table, x="macs_M", y="accuracy_pct", hue="method", style="method", s=90, ax=ax)
    for _, row in table.iterrows():
        ax.annotate(row["run"], (row["macs_M"], row["accuracy_pct"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xlabel("MACs per image (M)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Accuracy vs MACs, all runs")
    ax.grid(alpha=0.3)
    return fig


def temperature_plot(tau0: float, tau_min: float, history: pd.DataFrame):
    """The schedule per step, with the temperature each epoch of a run ended at."""
    steps_per_epoch = int(history["steps_per_epoch"].iloc[0])
    total = int(history["epoch"].max()) * steps_per_epoch
    steps = list(range(total + 1))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([s / steps_per_epoch for s in steps], [temperature_at(s, total, tau0, tau_min) for s in steps], label="schedule")
    ax.plot(history["epoch"], history["tau"], "o", label="run (end of epoch)")
    ax.legend()
    ax.set_xlabel("epoch")
    ax.set_ylabel("Gumbel-Sigmoid temperature")
    ax.set_title(f"Exponential annealing {tau0} -> {tau_min}")
    ax.grid(alpha=0.3)
    return fig


def macs_trajectory_plot(history: pd.DataFrame, dense_macs: int):
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(history["epoch"], history["expected_macs"] / dense_macs, marker="o", label="expected (soft gates)")
    ax.plot(history["epoch"], history["hard_macs"] / dense_macs, marker="s", label="hard (hardened gates)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("fraction of dense MACs")
    ax.set_ylim(0, 1.05)
    ax.legend()
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


def latency_table(names: list[str], batches: dict[int, int], threads: int = 2) -> pd.DataFrame:
    """Median latency of each run's extracted model vs the dense run's, measured alternately."""
    torch.set_num_threads(threads)
    models = {name: load_pruned(RUNS / name / "model") for name in names}
    dense_name = next(n for n in names if run_metrics(n)["method"] == "dense")
    spec = models[dense_name].spec
    rows = []
    for batch, runs in batches.items():
        x = torch.randn(batch, spec.in_chans, *spec.img_size)
        with torch.inference_mode():
            for name, model in models.items():
                times = alternate({"dense": lambda: models[dense_name](x), "model": lambda m=model: m(x)}, runs, warmup=3)
                dense_ms, model_ms = (1e3 * statistics.median(times[k]) for k in ("dense", "model"))
                mac_ratio = count_macs(models[dense_name]) / count_macs(model)
                rows.append({"run": name, "batch": batch, "runs": runs, "dense_ms": dense_ms, "model_ms": model_ms,
                             "speedup": dense_ms / model_ms, "mac_ratio": mac_ratio,
                             "speedup_over_mac_ratio": dense_ms / model_ms / mac_ratio})
    return pd.DataFrame(rows)


def latency_plot(table: pd.DataFrame):
    long = table.melt(id_vars=["run", "batch"], value_vars=["speedup", "mac_ratio"], var_name="measure", value_name="x")
    grid = sns.catplot(data=long, x="run", y="x", hue="measure", col="batch", kind="bar", height=3.8, aspect=1.4, sharey=False)
    grid.set_xticklabels(rotation=30, ha="right")
    grid.set_axis_labels("", "x faster than dense")
    grid.figure.suptitle("Measured speedup vs MACs ratio (CPU, 2 threads)", y=1.04)
    return grid.figure

