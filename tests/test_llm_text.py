"""Calibration text sources (a file, a folder, a glob pattern) and the windows drawn from them."""

from __future__ import annotations

import pytest
import torch

from grailc.errors import CalibrationError
from grailc.llm.text import calibration_windows, text_files


def _documents(*lengths):
    """Documents whose ids tell them apart: document i holds i * 1000, i * 1000 + 1, ..."""
    return [torch.arange(i * 1000, i * 1000 + n) for i, n in enumerate(lengths)]


def test_one_document_gives_random_offsets_into_it():
    (doc,) = _documents(500)
    windows = calibration_windows(doc, 64, 32, seed=3)
    assert torch.equal(windows, calibration_windows([doc], 64, 32, seed=3))
    g = torch.Generator().manual_seed(3)  # the offsets a single file always had
    starts = torch.randint(0, 500 - 32 + 1, (64,), generator=g)
    assert torch.equal(windows[:, 0], starts)
    assert torch.equal(windows, windows[:, :1] + torch.arange(32))


def test_windows_never_span_two_documents_and_skip_short_ones():
    docs = _documents(300, 20, 900)
    windows = calibration_windows(docs, 400, 32, seed=0)
    which = windows[:, 0] // 1000
    assert torch.equal(windows // 1000, which[:, None].expand_as(windows))  # one document per window
    assert torch.equal(windows, windows[:, :1] + torch.arange(32))  # contiguous
    counts = torch.bincount(which, minlength=3).tolist()
    assert counts[1] == 0  # 20 tokens: no window of 32 fits
    # uniform over the windows inside a document: 269 in the first, 869 in the third
    assert 0.15 < counts[0] / 400 < 0.4 and counts[2] > counts[0]


def test_documents_all_shorter_than_a_window_are_refused():
    with pytest.raises(CalibrationError, match="the longest of the 2 documents of plays has 20 tokens"):
        calibration_windows(_documents(10, 20), 4, 32, path="plays")


def test_a_folder_gives_its_text_files_sorted(tmp_path):
    for name in ("b.txt", "a.txt", "notes.md"):
        (tmp_path / name).write_text("some words")
    (tmp_path / "sub.txt").mkdir()  # a folder named like a text file is not a document
    assert text_files(tmp_path) == [tmp_path / "a.txt", tmp_path / "b.txt"]
    assert text_files(tmp_path / "b.txt") == [tmp_path / "b.txt"]


def test_a_glob_pattern_gives_the_files_it_matches(tmp_path):
    for name in ("macbeth_gut.txt", "lear_gut.txt", "lear_gut_f.txt"):
        (tmp_path / name).write_text("some words")
    assert text_files(f"{tmp_path}/*_gut.txt") == [tmp_path / "lear_gut.txt", tmp_path / "macbeth_gut.txt"]


@pytest.mark.parametrize("source,message", [
    ("missing.txt", "no text file at"),
    ("empty", "holds no .txt file"),
    ("*.nothing", "no file matches"),
])
def test_a_source_without_text_is_refused(tmp_path, source, message):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CalibrationError, match=message):
        text_files(tmp_path / source if "*" not in source else f"{tmp_path}/{source}")
