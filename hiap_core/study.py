"""The study behind the notebooks: runs, tables, figures, latency. Notebooks call these and stay thin.

Run folders live in `data/runs/<run>` (DVC-cached); everything a reader looks at goes to `reports/`
(`tables/*.csv|md`, `figures/*.png`, `metrics/*.json|csv`).
"""

from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from .arch import ViTSpec  # noqa: E402
from .bench import alternate  # noqa: E402
from .cost import count_macs  # noqa: E402
from .export import INPUT as ONNX_INPUT, export_onnx, onnx_max_abs_diff, onnx_session  # noqa: E402
from .files import atomic_write  # noqa: E402
from .latency import predict_ms  # noqa: E402
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


def _median_ms(times: dict[str, list[float]]) -> dict[str, float]:
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def latency_table(names: list[str], batches: dict[int, int], threads: int = 2, onnx: bool = True) -> pd.DataFrame:
    """Median latency of each run's extracted model vs the dense run's, measured alternately, in PyTorch
    and (with `onnx`) in onnxruntime on the model exported by `export_onnx` (its largest difference from
    PyTorch in `onnx_max_abs_diff`)."""
    torch.set_num_threads(threads)
    models = {name: load_pruned(RUNS / name / "model") for name in names}
    dense_name = next(n for n in names if run_metrics(n)["method"] == "dense")
    spec = models[dense_name].spec
    sessions, diffs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in (tqdm(models.items(), desc="ONNX export", leave=False) if onnx else ()):
            path = export_onnx(model, Path(tmp) / f"{name}.onnx")
            sessions[name], diffs[name] = onnx_session(path, threads), onnx_max_abs_diff(model, path)
    rows = []
    for batch, runs in batches.items():
        x = torch.randn(batch, spec.in_chans, *spec.img_size)
        feed = {ONNX_INPUT: x.numpy()}
        for name, model in tqdm(models.items(), desc=f"latency, batch {batch}", leave=False):
            with torch.inference_mode():
                ms = _median_ms(alternate({"dense": lambda: models[dense_name](x), "model": lambda m=model: m(x)}, runs, warmup=3))
            if onnx:  # timed apart from PyTorch: the two runtimes' thread pools do not share the cores well
                ms.update(_median_ms(alternate({"ort_dense": lambda: sessions[dense_name].run(None, feed),
                                                "ort_model": lambda s=sessions[name]: s.run(None, feed)}, runs, warmup=3)))
            mac_ratio = count_macs(models[dense_name]) / count_macs(model)
            row = {"run": name, "batch": batch, "runs": runs, "dense_ms": ms["dense"], "model_ms": ms["model"],
                   "speedup": ms["dense"] / ms["model"], "mac_ratio": mac_ratio,
                   "speedup_over_mac_ratio": ms["dense"] / ms["model"] / mac_ratio}
            if onnx:
                row.update(ort_dense_ms=ms["ort_dense"], ort_model_ms=ms["ort_model"],
                           ort_speedup=ms["ort_dense"] / ms["ort_model"], onnx_max_abs_diff=diffs[name])
            rows.append(row)
    return pd.DataFrame(rows)


def latency_vs_macs_target(macs_run: str, latency_run: str, cost_table: dict, runs: int, threads: int = 2) -> pd.DataFrame:
    """The MACs-targeted and the latency-targeted run side by side: MACs, the cost table's predicted latency,
    latency measured alternately with the dense model (PyTorch, then onnxruntime) at the table's batch size,
    accuracy, and the speedup of each over the MACs-targeted one from the same alternating loop."""
    torch.set_num_threads(threads)
    names = ["dense", macs_run, latency_run]
    models = {name: load_pruned(RUNS / name / "model") for name in names}
    spec = models["dense"].spec
    x = torch.randn(cost_table["batch_size"], spec.in_chans, *spec.img_size)
    with torch.inference_mode():
        torch_ms = _median_ms(alternate({name: lambda m=m: m(x) for name, m in models.items()}, runs, warmup=3))
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {name: onnx_session(export_onnx(m, Path(tmp) / f"{name}.onnx"), threads) for name, m in models.items()}
        feed = {ONNX_INPUT: x.numpy()}
        ort_ms = _median_ms(alternate({name: lambda s=s: s.run(None, feed) for name, s in sessions.items()}, runs, warmup=3))
    rows = []
    for name, target in ((macs_run, "MACs"), (latency_run, "latency")):
        m = run_metrics(name)
        predicted = predict_ms(cost_table["coefficients"], models[name].spec) / cost_table["dense_predicted_ms"]
        rows.append({"run": name, "targets": target, "target_fraction": m["budget"]["target_fraction"],
                     "macs_fraction": m["macs_fraction"], "predicted_latency_fraction": predicted,
                     "measured_latency_fraction": torch_ms[name] / torch_ms["dense"], "ort_latency_fraction": ort_ms[name] / ort_ms["dense"],
                     "model_ms": torch_ms[name], "ort_model_ms": ort_ms[name], "accuracy_pct": 100 * m["test_acc"],
                     "speedup_vs_macs_targeted": torch_ms[macs_run] / torch_ms[name],
                     "ort_speedup_vs_macs_targeted": ort_ms[macs_run] / ort_ms[name]})
    return pd.DataFrame(rows)


def budget_table(targets: dict[str, float], hand_tuned: dict[str, str], hiap: dict) -> pd.DataFrame:
    """Each budget-exact run (`budget_<key>`) against its target, beside the hand-tuned lambda run
    `hiap_<hand_tuned[key]>` of `hiap.budgets` (the paper's way to reach about the same MACs)."""
    rows = []
    for key, target in targets.items():
        lambdas = {f"budget_{key}": (hiap["lambda_macro"], hiap["lambda_micro"])}
        tuned = hiap["budgets"][hand_tuned[key]]
        lambdas[f"hiap_{hand_tuned[key]}"] = (tuned["lambda_macro"], tuned["lambda_micro"])
        for name, (lambda_macro, lambda_micro) in lambdas.items():
            m = run_metrics(name)
            budget = m.get("budget", {})
            scale = budget.get("final_penalty_scale", 1.0)
            rows.append({
                "target": key, "run": name, "mode": "budget-exact" if budget else "hand-tuned lambdas",
                "target_fraction": target, "macs_fraction": m["macs_fraction"],
                "error_pct": 100 * (m["macs_fraction"] / target - 1),
                "before_rounding_fraction": budget.get("cost_fraction_before_rounding", float("nan")),
                "rounded_units": budget.get("rounded_units", float("nan")),
                "final_lambda_macro": scale * lambda_macro, "final_lambda_micro": scale * lambda_micro,
                "accuracy_pct": 100 * m["test_acc"],
            })
    return pd.DataFrame(rows)


def budget_trajectory_plot(names: list[str]):
    """Per step of each budget-exact run: hardened cost vs the moving target (top) and the adapted lambdas (bottom)."""
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
    ax_lambda.set_xlabel("fraction of training")
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
    ax.set_title(f"Linear latency model, batch {table['batch_size']}: held-out R^2 {held_out['r2']:.3f}, "
                 f"max error {100 * held_out['max_relative_error']:.1f}%", fontsize=9)
    ax.set_xlabel("measured (ms)")
    ax.set_ylabel("predicted (ms)")
    ax.grid(alpha=0.3)
    return fig


def latency_plot(table: pd.DataFrame):
    long = table.melt(id_vars=["run", "batch"], value_vars=["speedup", "mac_ratio"], var_name="measure", value_name="x")
    grid = sns.catplot(data=long, x="run", y="x", hue="measure", col="batch", kind="bar", height=3.8, aspect=1.4, sharey=False)
    grid.set_xticklabels(rotation=30, ha="right")
    grid.set_axis_labels("", "x faster than dense")
    grid.figure.suptitle("Measured speedup vs MACs ratio (CPU, 2 threads)", y=1.04)
    return grid.figure

