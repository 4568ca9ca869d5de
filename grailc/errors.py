"""User-facing errors.

Every failure a user can cause (a bad file, a bad flag, a model the compiler cannot handle) is raised as a
:class:`GrailcError`: one line that says what failed, where, and what to do. The CLI prints that line and exits
non-zero; ``--debug`` adds the traceback. Anything else escaping the compiler is a bug in grailc.
"""

from __future__ import annotations

import difflib


class GrailcError(Exception):
    """A clear, one-line error: ``what`` failed, ``where`` (node, module, file) and ``fix`` (what to do)."""

    exit_code = 2

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None):
        self.what, self.where, self.fix = what, where, fix
        super().__init__(self.line())

    def line(self) -> str:
        text = self.what
        if self.where:
            text += f" (at {self.where})"
        if self.fix:
            text += f": {self.fix}"
        return text


class UntrustedFileError(GrailcError):
    """Loading the file would run arbitrary code (a full pickle) and the user did not allow it."""


class TraceError(GrailcError):
    """The model could not be captured as a graph."""


class CalibrationError(GrailcError):
    """Calibration data is missing, unreadable, of the wrong shape, or produced non-finite activations."""


class RecipeError(GrailcError):
    """A recipe or flag value is invalid."""


class VerificationError(GrailcError):
    """The compressed model failed its own checks; the report says why and no model is written."""

    exit_code = 3


class OutputExistsError(GrailcError):
    """The output folder exists and ``--force`` was not given."""


def did_you_mean(name: str, choices) -> str:
    """A ' (did you mean X?)' suffix for the closest of ``choices``, or '' when nothing is close."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_choice(kind: str, name: str, choices) -> None:
    """Raise a RecipeError with a did-you-mean when ``name`` is not one of ``choices``."""
    if name not in choices:
        raise RecipeError(
            f"unknown {kind} {name!r}{did_you_mean(name, choices)}",
            fix=f"choose one of: {', '.join(sorted(choices))}",
        )
