"""Output paths refused before any work: under a file, of the wrong kind, existing without --overwrite."""

from __future__ import annotations

from pathlib import Path

import pytest

import utils.paths
from utils.errors import UserError
from utils.paths import check_output_files, check_output_folder


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_writable_places_pass_and_nothing_is_created(tmp_path, monkeypatch):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "results.md").write_text("earlier")
    before = _listing(tmp_path)
    assert check_output_folder(tmp_path / "new" / "deeper", "--out") == tmp_path / "new" / "deeper"
    check_output_folder(tmp_path / "old", "--out")  # a tool that writes into a folder keeps what it holds
    check_output_folder(tmp_path / "old", "--out", overwrite=True)
    check_output_files([tmp_path / "old" / "results.md", tmp_path / "a" / "b.json"], "--out", overwrite=True)
    check_output_files([tmp_path / "old" / "results.md"], "--json")  # None: the tool replaces its file freely
    monkeypatch.chdir(tmp_path)
    check_output_files(["out.json"], "--json")
    assert _listing(tmp_path) == before


def test_a_path_under_a_file_names_the_file(tmp_path):
    (tmp_path / "a-file").write_text("in the way")
    for check in (lambda p: check_output_folder(p, "--work-dir"), lambda p: check_output_files([p], "--json")):
        with pytest.raises(UserError, match=r"a-file is a file, not a folder") as err:
            check(tmp_path / "a-file" / "x" / "y")
        assert str(tmp_path / "a-file" / "x" / "y") in str(err.value) and "\n" not in str(err.value)


def test_a_path_of_the_wrong_kind_is_refused(tmp_path):
    (tmp_path / "a-file").write_text("in the way")
    (tmp_path / "a-folder").mkdir()
    with pytest.raises(UserError, match="is a file; choose a folder"):
        check_output_folder(tmp_path / "a-file", "--out")
    with pytest.raises(UserError, match="is a folder, not a file"):
        check_output_files([tmp_path / "a-folder"], "--json", overwrite=True)


def test_existing_outputs_need_overwrite_where_the_tool_keeps_them(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.md").write_text("a")
    (out / "b.csv").write_text("b")
    with pytest.raises(UserError, match=r"already holds files; pass --overwrite"):
        check_output_folder(out, "--out", overwrite=False)
    check_output_folder(tmp_path / "empty", "--out", overwrite=False)
    with pytest.raises(UserError, match=r"a\.md exists \(2 of the outputs exist\); pass --overwrite") as err:
        check_output_files([out / "a.md", out / "b.csv", out / "c.png"], "--out", overwrite=False)
    assert "choose another --out" in str(err.value)
    with pytest.raises(UserError, match=r"b\.csv exists; pass --overwrite"):
        check_output_files([out / "b.csv"], "--out", overwrite=False)


def test_a_folder_that_cannot_be_written_is_refused(tmp_path, monkeypatch):
    # chmod does not stop root, so the permission test answers as a read-only folder would.
    monkeypatch.setattr(utils.paths.os, "access", lambda path, mode: Path(path) != tmp_path)
    with pytest.raises(UserError, match=f"permission denied in {tmp_path}"):
        check_output_files([tmp_path / "x" / "out.json"], "--json")
    with pytest.raises(UserError, match="permission denied; choose a folder you can write to"):
        check_output_folder(tmp_path, "--out")
    check_output_folder(tmp_path.parent / "elsewhere", "--out")  # a writable parent passes
