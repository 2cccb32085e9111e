import os
import stat

import pytest

from fedleak.common.io import atomic_write_json, atomic_write_text


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_writes_keep_the_umask_mode_and_leave_no_temp_file(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write_text(tmp_path / "report.html", "<p>x</p>")
        atomic_write_json(tmp_path / "sub" / "results.json", {"a": 1})
    finally:
        os.umask(old)
    for path in (tmp_path / "report.html", tmp_path / "sub" / "results.json"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["report.html", "results.json"]


def test_a_rewrite_replaces_the_file_whole(tmp_path):
    atomic_write_text(tmp_path / "f.txt", "first, longer text")
    atomic_write_text(tmp_path / "f.txt", "second")
    assert (tmp_path / "f.txt").read_text() == "second"


def test_a_folder_under_a_file_is_one_line_naming_it(tmp_path):
    from fedleak.common.errors import FedleakError
    from fedleak.common.io import ensure_writable_dir

    (tmp_path / "file").write_text("x")
    for call in (lambda: ensure_writable_dir(tmp_path / "file" / "out"),
                 lambda: atomic_write_text(tmp_path / "file" / "out" / "report.md", "x")):
        with pytest.raises(FedleakError) as raised:
            call()
        message = str(raised.value)
        assert message.startswith(f"{tmp_path / 'file' / 'out'}: cannot create or write this folder: Not a directory")
        assert message.endswith("pass an output folder you can write (--out), or fix its permissions")
    assert ensure_writable_dir(tmp_path / "new" / "out").is_dir()
    assert [p.name for p in (tmp_path / "new" / "out").iterdir()] == []  # the probe file is gone
