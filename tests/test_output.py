"""moekit.output: a failed run never costs the user the output they had."""

from __future__ import annotations

import pytest

from moekit.errors import OutputError
from moekit.output import staged_output


@pytest.mark.parametrize("writer", [staged_output])
def test_failed_overwrite_keeps_the_old_output(tmp_path, writer):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), writer(out, overwrite=True) as directory:
        (directory / "new.txt").write_text("half")
        raise RuntimeError("interrupted")
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing staged or set aside is left


@pytest.mark.parametrize("writer", [staged_output])
def test_finished_overwrite_replaces_the_old_output(tmp_path, writer):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with writer(out, overwrite=True) as directory:
        (directory / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_refuses_a_non_empty_output_without_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(OutputError, match="not empty"), staged_output(out, overwrite=False):
        pytest.fail("the body must not run")
    assert (out / "old.txt").read_text() == "old"


def test_move_into_place_replaces_an_empty_output_and_refuses_one_that_appeared(tmp_path):
    """The one move used by staged outputs and by the fine-tune's OUT.partial: an empty OUT (made by the user
    meanwhile) is replaced and nothing staged is left; a non-empty one is kept, and so is the staged run."""
    from moekit.output import move_into_place

    out, staging = tmp_path / "out", tmp_path / "out.partial"
    out.mkdir()
    staging.mkdir()
    (staging / "adapter.txt").write_text("trained")
    move_into_place(staging, out, overwrite=False)
    assert [p.name for p in out.iterdir()] == ["adapter.txt"] and sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    staging.mkdir()
    (staging / "adapter.txt").write_text("again")
    with pytest.raises(OutputError, match="appeared while it was being written"):
        move_into_place(staging, out, overwrite=False)
    assert (out / "adapter.txt").read_text() == "trained" and (staging / "adapter.txt").read_text() == "again"
