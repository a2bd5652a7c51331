"""The ImageNet DeiT-S part of the study (paper Table 2), off by default (`imagenet.enabled`).

`run` launches the HiAP recipe with torchrun (KD from the pretrained DeiT-S, which is also the student's
initialisation), `table2` puts our row beside the paper's peers, or marks it "not run"."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import yaml

from ..train.paths import IMAGENET_RUN
from .tables import PAPER_TABLE2


def run(settings: dict) -> dict:
    """Train HiAP on ImageNet with `settings` (the `imagenet` group of params.yaml); returns its metrics."""
    out = IMAGENET_RUN
    out.mkdir(parents=True, exist_ok=True)
    params_file = out / "params.yaml"
    params_file.write_text(yaml.safe_dump({"data": settings["data"], "model": settings["model"], "hiap": settings["hiap"]}))
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [
        str(torchrun),
        "--standalone",
        f"--nproc_per_node={settings['nproc_per_node']}",
        "-m",
        "hiap_core.train",
        "--params",
        str(params_file),
        "--method",
        "hiap",
        "--out",
        str(out),
        "--set",
        "progress=false",
    ]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-5:])
        raise RuntimeError(f"the ImageNet run failed ({' '.join(command)}):\n{tail}")
    return json.loads((out / "metrics.json").read_text())


def table2(result: dict | None) -> pd.DataFrame:
    """The paper's Table 2 with a row for this repository's run (or "not run")."""
    table = PAPER_TABLE2.astype(object).copy()
    if result is None:
        ours = {"method": "HiAP (this repo)", "params_M": "not run", "flops_G": "not run", "top1_pct": "not run"}
    else:
        ours = {
            "method": "HiAP (this repo)",
            "params_M": round(result["params"] / 1e6, 1),
            "flops_G": round(result["macs"] / 1e9, 2),
            "top1_pct": round(100 * result["test_acc"], 2),
        }
    table = pd.concat([table, pd.DataFrame([ours])], ignore_index=True)
    dense_top1 = float(PAPER_TABLE2["top1_pct"].iloc[0])
    table["change_pct"] = [f"{v - dense_top1:+.2f}" if isinstance(v, float) else "-" for v in table["top1_pct"]]
    table.loc[0, "change_pct"] = "-"
    return table
