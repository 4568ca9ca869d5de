"""Tests for grailc.outputs: staged output folders and atomic writes."""

from __future__ import annotations

import os
import stat

import pytest

from grailc.errors import GrailcError, OutputExistsError
from grailc.outputs import StagedOutput, atomic_write_bytes, atomic_write_text


def leftovers(parent):
    return sorted(p.name for p in parent.iterdir() if "grailc-" in p.name or p.name.endswith(".tmp"))


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_commit_places_files_and_leaves_nothing_behind(tmp_path):
    out = tmp_path / "nested" / "out"
    with StagedOutput(out) as staged:
        assert staged.staging_dir.parent == out.parent
        assert staged.staging_dir.name.startswith(".out.grailc-staging-")
        staged.path("model.pt2").write_bytes(b"model")
        staged.path("reports/report.json").write_text("{}")
        assert not out.exists()
        assert staged.commit() == out
    assert (out / "model.pt2").read_bytes() == b"model"
    assert (out / "reports" / "report.json").read_text() == "{}"
    assert leftovers(out.parent) == []
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~current_umask()


def test_refuses_existing_output_without_force(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("keep")
    for out in (empty, full):
        with pytest.raises(OutputExistsError) as error:
            StagedOutput(out)
        text = str(error.value)
        assert str(out) in text and "--force" in text
    assert (full / "keep.txt").read_text() == "keep"
    assert leftovers(tmp_path) == []


def test_output_path_that_is_a_file_is_refused_even_with_force(tmp_path):
    target = tmp_path / "out"
    target.write_text("a file")
    for force in (False, True):
        with pytest.raises(OutputExistsError, match="is a file"):
            StagedOutput(target, force=force)
    assert target.read_text() == "a file"


def test_exception_inside_block_leaves_no_output_and_no_staging(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"):
        with StagedOutput(out) as staged:
            staged.path("partial.bin").write_bytes(b"half")
            raise RuntimeError("boom")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_keyboard_interrupt_and_no_commit_discard(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        with StagedOutput(out) as staged:
            staged.path("a").write_text("x")
            raise KeyboardInterrupt
    with StagedOutput(out) as staged:
        staged.path("a").write_text("x")
    assert list(tmp_path.iterdir()) == []


def test_force_replaces_old_contents(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with StagedOutput(out, force=True) as staged:
        staged.path("new.txt").write_text("new")
        assert (out / "old.txt").exists(), "the old output must survive until commit"
        staged.commit()
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert leftovers(tmp_path) == []


def test_force_keeps_old_output_when_the_run_fails(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(ValueError):
        with StagedOutput(out, force=True) as staged:
            staged.path("new.txt").write_text("new")
            raise ValueError("failed run")
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    assert leftovers(tmp_path) == []


def test_output_created_meanwhile_is_not_overwritten(tmp_path):
    out = tmp_path / "out"
    with StagedOutput(out) as staged:
        staged.path("new.txt").write_text("new")
        out.mkdir()
        with pytest.raises(OutputExistsError):
            staged.commit()
    assert list(out.iterdir()) == []
    assert leftovers(tmp_path) == []


def test_path_must_stay_inside_and_object_is_single_use(tmp_path):
    staged = StagedOutput(tmp_path / "out")
    for name in ("../escape.txt", "/abs/path", ".", "a/../../b"):
        with pytest.raises(ValueError):
            staged.path(name)
    staged.commit()
    with pytest.raises(RuntimeError):
        staged.path("late.txt")
    with pytest.raises(RuntimeError):
        staged.commit()
    staged.discard()
    assert (tmp_path / "out").is_dir()


def test_discard_removes_staging(tmp_path):
    staged = StagedOutput(tmp_path / "out")
    staged.path("x").write_text("x")
    staged.discard()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError):
        staged.commit()


def test_atomic_write_text_and_bytes(tmp_path):
    target = tmp_path / "sub" / "report.json"
    atomic_write_text(target, "first ✓")
    assert target.read_text(encoding="utf-8") == "first ✓"
    atomic_write_bytes(target, b"\x00second")
    assert target.read_bytes() == b"\x00second"
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~current_umask()
    assert sorted(p.name for p in target.parent.iterdir()) == ["report.json"]


def test_atomic_write_failure_keeps_old_file_and_cleans_up(tmp_path):
    target = tmp_path / "folder_in_the_way"
    target.mkdir()
    with pytest.raises(GrailcError) as error:
        atomic_write_text(target, "x")
    assert str(target) in str(error.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder_in_the_way"]
