"""The front door stays true: every path, module, `hiap_core.<name>`, make target and config field that
README.md and reports/README.md name exists (a path under reports/ may be a stage output not yet made)."""

import importlib.util
import re
from pathlib import Path

import pytest
from test_dvc import stage_outputs

import hiap_core
from hiap_core.train.config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "reports" / "README.md"]
PATH = re.compile(r"(?<![\w./-])((?:hiap_core|notebooks|reports|tests|data|figures|tables|metrics|benchmarks)/[\w./<>*-]*[\w/])")


def named_paths(doc: Path) -> set[str]:
    """Paths the document names in backticks or links (patterns such as `data/runs/<name>/` left out)."""
    text = doc.read_text()
    found = set(PATH.findall(text)) | {m for m in re.findall(r"\]\(([^)#]+)\)", text) if "://" not in m}
    return {p.rstrip("/") for p in found if "<" not in p and "*" not in p}


def is_output(path: str, outputs: set[str]) -> bool:
    return any(path == o or path.startswith(o + "/") or o.startswith(path + "/") for o in outputs)


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: str(d.relative_to(ROOT)))
def test_every_path_a_readme_names_exists_or_is_a_stage_output(doc):
    outputs, missing = stage_outputs(), []
    for path in sorted(named_paths(doc)):
        # reports/README.md links relative to reports/, and names root paths (`data/runs/`) too
        candidates = [path] if doc.parent == ROOT else [f"reports/{path}", path]
        if not any((ROOT / c).exists() or is_output(c, outputs) for c in candidates):
            missing.append(path)
    assert missing == [], f"{doc.name} names paths that neither exist nor are stage outputs: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: str(d.relative_to(ROOT)))
def test_every_module_symbol_and_make_target_a_readme_names_exists(doc):
    text = doc.read_text()
    for module in re.findall(r"python -m ([\w.]+)", text):
        assert importlib.util.find_spec(module) is not None, f"{doc.name}: python -m {module}: no such module"
    for name in re.findall(r"hiap_core\.([a-z_]\w*)\(", text):
        assert hasattr(hiap_core, name), f"{doc.name}: hiap_core.{name} does not exist"
    makefile = (ROOT / "Makefile").read_text()
    for target in re.findall(r"`make ([\w-]+)", text):
        assert re.search(rf"^{re.escape(target)}:", makefile, re.M), f"{doc.name}: make {target}: no such target"


def test_every_field_the_readme_sets_on_the_command_line_is_a_config_field():
    text = (ROOT / "README.md").read_text()
    fields = {f for line in re.findall(r"--set (.*)", text) for f in re.findall(r"([\w.]+)=", line)} - {
        "field"
    }  # the syntax line
    assert fields, "README shows no --set example"
    for field in fields:
        section, _, name = field.rpartition(".")
        target = getattr(RunConfig(), section) if section else RunConfig()
        assert hasattr(target, name), f"README sets {field}, which is not a config field"
