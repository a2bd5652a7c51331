import subprocess
import sys

import pytest
import torch

from hiap_core.core import torchvision_compat


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_timm_and_torchvision_import_after_hiap_core():
    result = run_python("import hiap_core, timm, torchvision; print('ok', torchvision.__version__)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")


def test_shim_acts_only_when_the_extension_fails():
    # In a fresh interpreter: decide, then check the operators exist exactly when the shim acted.
    code = (
        "import torch\n"
        "from hiap_core.core import torchvision_compat as c\n"
        "path = c.torchvision_extension_path()\n"
        "acted = c._fragment is not None\n"
        "print(path is not None, acted, hasattr(torch.ops.torchvision, 'nms'), hasattr(torch.ops.torchvision, 'qnms'))\n"
    )
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    has_tv, acted, has_nms, has_qnms = (s == "True" for s in result.stdout.split())
    assert has_tv
    assert has_nms and has_qnms  # either the real extension loaded or the shim defined them
    if acted:
        assert not torchvision_compat.extension_loads(torchvision_compat.torchvision_extension_path())


def test_shim_is_a_no_op_when_the_extension_loads(monkeypatch):
    monkeypatch.setattr(torchvision_compat, "_fragment", None)
    monkeypatch.setattr(torchvision_compat, "extension_loads", lambda path: True)
    monkeypatch.delitem(sys.modules, "torchvision", raising=False)
    defined = []
    monkeypatch.setattr(torch.library, "Library", lambda *a, **k: defined.append(a))
    assert torchvision_compat.ensure_torchvision_importable() is False
    assert defined == [] and torchvision_compat._fragment is None


def test_shim_is_a_no_op_without_torchvision(monkeypatch):
    monkeypatch.setattr(torchvision_compat, "_fragment", None)
    monkeypatch.setattr(torchvision_compat, "torchvision_extension_path", lambda: None)
    monkeypatch.delitem(sys.modules, "torchvision", raising=False)
    assert torchvision_compat.ensure_torchvision_importable() is False


def test_calling_a_stub_operator_fails_clearly_rather_than_silently():
    import torchvision  # noqa: F401

    if torchvision_compat._fragment is None:
        pytest.skip("torchvision's compiled extension loaded: the shim did not act")
    with pytest.raises(Exception):
        torch.ops.torchvision.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)
