import os
import stat

from hiap_core.core.files import atomic_write, remove_leftover_temporaries


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


def test_leftover_temporaries_of_killed_writes_are_removed_and_nothing_else(tmp_path):
    kept = atomic_write(tmp_path / "checkpoint.pt", lambda p: p.write_bytes(b"x"))
    (tmp_path / "model").mkdir()
    leftovers = [tmp_path / ".checkpoint.k2j3.tmp.pt", tmp_path / "model" / ".model.q9.tmp.safetensors"]
    for path in leftovers:
        path.write_bytes(b"half")
    (tmp_path / "notes.tmp.txt").write_text("a user's file, not a hidden temporary")
    assert sorted(remove_leftover_temporaries(tmp_path)) == sorted(leftovers)
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["checkpoint.pt", "notes.tmp.txt"]
    assert kept.read_bytes() == b"x"
