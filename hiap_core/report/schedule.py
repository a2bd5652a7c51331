"""How the ranking moves with schedule length: HiAP, and the methods of `schedule.methods` (Uniform-Ratio and
two-phase at HiAP's compute), at each budget of `schedule.budgets`, with each length of `schedule.epochs`
(epochs of the fine-tuning subset, every method alike), over the study's seeds.

    python -m hiap_core.report.schedule   (make schedule)

Trains `data/runs/schedule_e<epochs>_<method>_<budget>_s<seed>`: HiAP first, then the baselines cut to the
MACs it landed on (two-phase: its units, for its post-freeze epochs), each with its recipe grid pick; a
length equal to the study's own (`hiap.epochs`) reuses the study's runs. Writes `reports/schedule/`:
`runs.csv` (one row per run), `gaps.{csv,md}` (each gap, HiAP minus a method, per budget and length, paired
by seed with its 95% t interval and the total training steps of each side) and `gaps.png`. A finished run
is kept, so a killed study resumes where it stopped."""

from __future__ import annotations

import argparse
import copy

import matplotlib.pyplot as plt
import pandas as pd
from tqdm import tqdm

from ..core.files import atomic_write
from ..train.params import read_params
from ..train.paths import REPORTS
from ..train.runs import run_overrides, study_run
from .stats import paired_differences, seed_runs
from .tables import METHOD_LABELS

FOLDER = "schedule"


def schedule_params(params: dict, epochs: int) -> dict:
    """The study's params with HiAP and the baselines training `epochs` epochs (warmups and the two-phase
    row's post-freeze share follow)."""
    longer = copy.deepcopy(params)
    longer["hiap"]["epochs"] = longer["baselines"]["epochs"] = epochs
    return longer


def schedule_run_name(params: dict, epochs: int, method: str, budget: str, seed: int) -> str:
    """The study's own run at its own length, else `schedule_e<epochs>_<method>_<budget>_s<seed>`."""
    name = f"{method}_{budget}_s{seed}"
    return name if epochs == params["hiap"]["epochs"] else f"schedule_e{epochs}_{name}"


def train_schedule(params: dict) -> dict[tuple[str, str, int, int], str]:
    """Train (or keep) every run of the schedule study; returns {(method label, budget, seed, epochs): run name}."""
    plan = params["schedule"]
    cells = [(e, b, s) for e in plan["epochs"] for b in plan["budgets"] for s in params["seeds"]]
    names = {}
    for epochs, budget, seed in tqdm(cells, desc="schedule"):
        longer = schedule_params(params, epochs)
        hiap = schedule_run_name(params, epochs, "hiap", budget, seed)
        study_run(longer, "hiap", hiap, run_overrides(longer, "hiap", teacher="dense", seed=seed, budget=budget), reports=False)
        names[(METHOD_LABELS["hiap"], budget, seed, epochs)] = hiap
        for method in plan["methods"]:
            name = schedule_run_name(params, epochs, method, budget, seed)
            overrides = run_overrides(longer, method, teacher="dense", seed=seed, match_run=hiap)
            study_run(longer, method, name, overrides, reports=False)
            names[(METHOD_LABELS[method], budget, seed, epochs)] = name
    return names


def schedule_gaps(runs: pd.DataFrame) -> pd.DataFrame:
    """HiAP minus each other method per budget and length, paired by seed (`stats.paired_differences`)."""
    tables = [
        paired_differences(at.assign(budget=budget), METHOD_LABELS["hiap"]).assign(epochs=epochs)
        for (budget, epochs), at in runs.groupby(["budget", "epochs"], sort=False)
    ]
    gaps = pd.concat(tables, ignore_index=True)
    steps = gaps["steps"].str.split(" vs ", expand=True).astype(float)
    return gaps.assign(hiap_steps=steps[0], versus_steps=steps[1]).drop(columns=["family", "p_holm", "significant"])


def gaps_plot(gaps: pd.DataFrame):
    """Each gap against HiAP's total training steps, one panel per budget, with its 95% t interval."""
    budgets = list(dict.fromkeys(gaps["budget"]))
    fig, axes = plt.subplots(1, len(budgets), figsize=(6 * len(budgets), 4), squeeze=False, sharey=True)
    for ax, budget in zip(axes[0], budgets):
        for i, (versus, rows) in enumerate(gaps[gaps["budget"] == budget].groupby("versus", sort=False)):
            rows = rows.sort_values("hiap_steps")
            yerr = [rows["diff_mean"] - rows["ci_low"], rows["ci_high"] - rows["diff_mean"]]
            x, y = rows["hiap_steps"], rows["diff_mean"]
            ax.errorbar(x, y, yerr=yerr, fmt="o-", capsize=3, color=plt.cm.tab10(i), label=versus)
        ax.axhline(0, color="black", lw=1)
        ax.set(xscale="log", xlabel="HiAP's total training steps (equal compute for every row)", title=f"budget {budget}")
        ax.set_ylabel("HiAP minus method (points): paired by seed, 95% t interval")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args(argv)
    params = read_params()
    names = train_schedule(params)
    by_length = [
        seed_runs({key[:3]: name for key, name in names.items() if key[3] == epochs}).assign(epochs=epochs)
        for epochs in params["schedule"]["epochs"]
    ]
    runs = pd.concat(by_length, ignore_index=True)
    gaps = schedule_gaps(runs)
    out = REPORTS / FOLDER
    atomic_write(out / "runs.csv", lambda p: runs.to_csv(p, index=False))
    atomic_write(out / "gaps.csv", lambda p: gaps.to_csv(p, index=False))
    markdown = gaps.to_markdown(index=False, floatfmt=".3g")
    atomic_write(out / "gaps.md", lambda p: p.write_text(markdown + "\n"))
    figure = gaps_plot(gaps)
    atomic_write(out / "gaps.png", lambda p: figure.savefig(p, dpi=120, bbox_inches="tight", format="png"))
    print(markdown)


if __name__ == "__main__":
    main()
