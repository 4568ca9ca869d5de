"""Writing outputs so that nothing is lost: a run either leaves a complete output folder or none.

Every file goes into a hidden staging folder beside the output folder; ``commit()`` renames it into place
(one atomic rename on the same filesystem). With ``force``, the old output folder is first renamed aside and
only removed once the new one is in place.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from grailc.errors import GrailcError, OutputExistsError


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def default_file_mode() -> int:
    """The mode a new file gets under the user's umask (libraries that write through private temp files leave
    0600 behind)."""
    return 0o666 & ~_UMASK


class StagedOutput:
    """Outputs written into a hidden staging folder beside ``out_dir``; ``commit()`` renames it into place.

    Used as a context manager, the staging folder is discarded on leaving the block unless ``commit()`` was
    called, including when the block raised (``KeyboardInterrupt`` too).
    """

    def __init__(self, out_dir, *, force: bool = False):
        self.out_dir = Path(os.path.abspath(out_dir))  # '.' has no name to stage beside
        self.force = force
        self.committed = False
        self._discarded = False
        _check_output_target(self.out_dir, force)
        _check_not_a_working_folder(self.out_dir)
        parent = self.out_dir.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            staging = tempfile.mkdtemp(prefix=f".{self.out_dir.name}.grailc-staging-", dir=parent)
        except OSError as e:
            raise GrailcError(
                f"cannot create the output folder's parent or a staging folder in it ({e.strerror})",
                where=str(parent),
                fix="check that the folder is writable, or choose another output path",
            ) from e
        self.staging_dir = Path(staging)

    def path(self, name: str) -> Path:
        """A path inside the staging folder (sub-folders are created); ``name`` must stay inside it."""
        self._check_open()
        target = self.staging_dir / name
        root = self.staging_dir.resolve()
        if Path(name).is_absolute() or not target.resolve().is_relative_to(root) or target.resolve() == root:
            raise ValueError(f"output name {name!r} must be a relative path inside the output folder")
        target.parent.mkdir(parents=True, exist_ok=True)
        return target

    def commit(self) -> Path:
        """Move the staging folder to ``out_dir`` and return ``out_dir``."""
        self._check_open()
        _check_output_target(self.out_dir, self.force)
        os.chmod(self.staging_dir, 0o777 & ~_UMASK)
        fsync_tree(self.staging_dir)

        aside = None
        if os.path.lexists(self.out_dir):
            aside = self.out_dir.with_name(f".{self.out_dir.name}.grailc-old-{uuid.uuid4().hex[:12]}")
            try:
                os.rename(self.out_dir, aside)
            except OSError as e:
                raise GrailcError(
                    f"cannot move the old output folder aside ({e.strerror}); nothing was changed",
                    where=str(self.out_dir),
                    fix="check permissions, or choose another output path",
                ) from e
        try:
            os.rename(self.staging_dir, self.out_dir)
        except OSError as e:
            restored = ""
            if aside is not None:
                try:
                    os.rename(aside, self.out_dir)
                    restored = "; the old output was kept"
                except OSError:
                    restored = f"; the old output is at {aside}"
            raise GrailcError(
                f"cannot move the finished output into place ({e.strerror}){restored}",
                where=str(self.out_dir),
                fix="check permissions and free space, then run again",
            ) from e
        self.committed = True
        fsync_dir(self.out_dir.parent)
        if aside is not None:
            _remove(aside)
        return self.out_dir

    def discard(self) -> None:
        """Remove the staging folder (nothing happens after ``commit()``)."""
        if self.committed or self._discarded:
            return
        self._discarded = True
        shutil.rmtree(self.staging_dir, ignore_errors=True)

    def __enter__(self) -> StagedOutput:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.discard()
        return False

    def _check_open(self) -> None:
        if self.committed:
            raise RuntimeError("StagedOutput was already committed")
        if self._discarded:
            raise RuntimeError("StagedOutput was discarded")


def check_output_folder(out_dir, force: bool = False) -> None:
    """Refuse, before any work, an output folder that ``StagedOutput`` would refuse at the end."""
    out_dir = Path(os.path.abspath(out_dir))
    _check_output_target(out_dir, force)
    _check_not_a_working_folder(out_dir)


def _check_output_target(out_dir: Path, force: bool) -> None:
    if not os.path.lexists(out_dir):
        return
    if not out_dir.is_dir():
        raise OutputExistsError(
            "the output path exists and is a file, not a folder",
            where=str(out_dir),
            fix="choose a folder path for the output (--force does not replace files)",
        )
    if not force:
        raise OutputExistsError(
            "the output folder already exists",
            where=str(out_dir),
            fix="choose a new output folder, or pass --force to replace it",
        )


def _check_not_a_working_folder(out_dir: Path) -> None:
    """Replacing the current folder (or one holding it, or the root) would pull the ground from under the run."""
    try:
        cwd = Path.cwd()
    except OSError:  # the current folder was deleted: nothing to protect
        return
    if out_dir == cwd or out_dir in cwd.parents or out_dir.parent == out_dir:
        raise OutputExistsError(
            "the output folder is the current folder, one that holds it, or the root",
            where=str(out_dir),
            fix="choose a dedicated output folder, e.g. --out grailc-out",
        )


def _remove(path: Path) -> None:
    if path.is_symlink() or not path.is_dir():
        with contextlib.suppress(OSError):
            path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file and folder under ``root`` to disk before it is renamed into place."""
    for folder, _, files in os.walk(root):
        for name in files:
            with contextlib.suppress(OSError):
                fd = os.open(os.path.join(folder, name), os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        fsync_dir(Path(folder))


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same folder, fsync and ``os.replace``."""
    target = Path(path)
    tmp_name = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, 0o666 & ~_UMASK)
        os.replace(tmp_name, target)
        tmp_name = None
    except OSError as e:
        raise GrailcError(
            f"cannot write file ({e.strerror})",
            where=str(target),
            fix="check that the folder is writable and the disk has space",
        ) from e
    finally:
        if tmp_name is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
    fsync_dir(target.parent)


def atomic_write_text(path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically, like :func:`atomic_write_bytes`."""
    atomic_write_bytes(path, text.encode("utf-8"))


__all__ = ["StagedOutput", "atomic_write_bytes", "atomic_write_text"]
