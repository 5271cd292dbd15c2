"""The run-folder table: every state and request gives the action (or the one-line refusal) it documents."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.rundir import Action, RunFolder, State
from utils.errors import UserError

# state -> the files that make it (relative to the work folder)
FILES = {
    "none": [],
    "untrained": ["step1/config.yaml"],
    "partial": ["step1/last.pt"],
    "finished": ["step1/last.pt", "step1/manifest.json"],
    "replacing": ["step1/last.pt", "step1/manifest.json", "step1.new/last.pt"],
    "replacing-partial": ["step1/last.pt", "step1.new/last.pt"],
}
STATES = {"none": State.FRESH, "untrained": State.FRESH, "partial": State.PARTIAL, "finished": State.FINISHED,
          "replacing": State.REPLACING, "replacing-partial": State.REPLACING}
S, R, K, P, E = Action.START, Action.RESUME, Action.SKIP, Action.REPLACE, None  # E: refused with a UserError
# (resume, overwrite) -> action per folder, in the order of FILES
TABLE = {
    (None, False): (S, S, R, K, R, R),
    (None, True): (S, S, P, P, P, P),
    (True, False): (E, S, R, E, R, R),
    (True, True): (E, S, R, E, R, R),
    (False, False): (S, S, E, E, E, E),
    (False, True): (S, S, P, P, P, P),
}


def _folder(tmp_path: Path, kind: str) -> RunFolder:
    for name in FILES[kind]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("")
    return RunFolder(tmp_path, "step1")


@pytest.mark.parametrize("kind", FILES)
def test_next_action_follows_the_table(tmp_path, kind, capsys):
    folder = _folder(tmp_path, kind)
    assert folder.state is STATES[kind]
    for (resume, overwrite), actions in TABLE.items():
        expected = actions[list(FILES).index(kind)]
        if expected is None:
            with pytest.raises(UserError) as err:
                folder.next_action(resume, overwrite)
            assert "\n" not in str(err.value)
        else:
            assert folder.next_action(resume, overwrite) is expected, (resume, overwrite)


def test_refusals_name_the_way_out(tmp_path):
    assert "--overwrite" in str(pytest.raises(UserError, _folder(tmp_path / "a", "finished").next_action, False).value)
    partial = str(pytest.raises(UserError, _folder(tmp_path / "b", "partial").next_action, False).value)
    assert "unfinished" in partial and "--resume" in partial
    replacing = _folder(tmp_path / "c", "replacing")
    assert str(replacing.staging) in str(pytest.raises(UserError, replacing.next_action, False).value)
    assert "nothing to resume" in str(pytest.raises(UserError, _folder(tmp_path / "d", "finished").next_action,
                                                    True).value)
    assert "no run" in str(pytest.raises(UserError, _folder(tmp_path / "e", "none").next_action, True).value)


def test_a_replacement_trains_in_the_staging_twin_and_is_swapped_in(tmp_path):
    folder = _folder(tmp_path, "replacing")
    assert folder.train_dir(Action.RESUME) == folder.staging == tmp_path / "step1.new"
    assert folder.train_dir(Action.REPLACE) == folder.staging
    (folder.staging / "manifest.json").write_text("new")
    folder.swap_in()
    assert (folder.path / "manifest.json").read_text() == "new" and folder.state is State.FINISHED
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step1"]
    assert _folder(tmp_path / "x", "partial").train_dir(Action.RESUME) == tmp_path / "x" / "step1"


def test_a_swap_cut_short_by_a_crash_is_completed(tmp_path):
    folder = _folder(tmp_path, "replacing")
    (folder.staging / "manifest.json").write_text("new")
    folder.path.rename(tmp_path / "step1.old")  # the crash: after the first rename, before the second
    folder.complete_swap()
    assert (folder.path / "manifest.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step1"]
