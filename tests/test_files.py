import os
import stat

from hiap_core.core.files import atomic_write


def test_atomic_write_gives_files_the_umask_mode_not_mkstemps_0600(tmp_path):
    old = os.umask(0o022)
    try:
        shared = atomic_write(tmp_path / "shared.json", lambda p: p.write_text("{}"))
        os.umask(0o077)
        private = atomic_write(tmp_path / "private.json", lambda p: p.write_text("{}"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(shared.stat().st_mode) == 0o644
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["private.json", "shared.json"]  # no temporary file left
