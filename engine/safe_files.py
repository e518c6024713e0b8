"""Writing outputs without ever destroying a user's file.

Three tools, all free of QGIS:

* :func:`atomic_output` writes through a hidden temporary file next to the target and renames it
  onto the target only when the writer succeeded, so an existing file is only replaced by a
  complete one. The temporary file is created with mode ``0o666`` minus the umask, like any
  other program's files (``tempfile.mkstemp`` would make every output 0600, unreadable to the
  rest of a shared machine).
* :class:`OutputLedger` remembers, for every file a run is about to write (and its ``.qml`` and
  ``.aux.xml`` sidecars), whether it existed before. A failed run rolls back: files it created
  are removed, files that existed are restored from a backup taken before the run touched them
  (a hard link, so no data is copied, when the writer replaces the file by renaming). A
  successful run drops the backups.
* :func:`cleanup_on_termination` makes SIGTERM/SIGHUP (a killed ``qgis_process``, a closed
  terminal) remove the live temporary files and roll back the active runs before the process
  dies as it would have without us.

:func:`probe_folder` checks that a folder really takes a new file by creating and removing one
(``os.access`` says yes to root even under ``/proc``) and tells whether its file names are
case-insensitive; :func:`file_identity` is what "the same file" means for paths (symlinks,
relative paths, hard links, case on case-insensitive file systems).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

SIDECAR_SUFFIXES = (".qml", ".aux.xml")

_LOCK = threading.RLock()
_TEMPORARIES: set[Path] = set()
_ROLLBACKS: list[Callable[[], None]] = []
_PREVIOUS_HANDLERS: dict[int, object] = {}
_INSTALLED_DEPTH = 0


def termination_signals() -> list[int]:
    names = ("SIGTERM", "SIGHUP", "SIGBREAK")
    return [getattr(signal, name) for name in names if hasattr(signal, name)]


# ------------------------------------------------------------------------------ temporaries


def _absolute(path: str | os.PathLike) -> Path:
    return Path(os.path.abspath(os.fspath(path)))


def sidecars(path: str | os.PathLike) -> list[Path]:
    """The files QGIS and GDAL keep beside ``path``: its style and its PAM metadata."""
    target = Path(path)
    return [target.with_suffix(".qml"), Path(f"{target}.aux.xml")]


def create_temporary(target: str | os.PathLike, tag: str = "") -> Path:
    """A new hidden, empty file ``.<stem>-<random><suffix>`` beside ``target``, registered for
    removal on termination signals. Its mode is 0o666 minus the umask."""
    target = _absolute(target)
    for _ in range(100):
        candidate = target.parent / f".{target.stem}-{tag}{secrets.token_hex(4)}{target.suffix}"
        try:
            handle = os.open(candidate, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            continue
        os.close(handle)
        with _LOCK:
            _TEMPORARIES.add(candidate)
        return candidate
    raise FileExistsError(errno.EEXIST, "no free temporary name", str(target.parent))


def discard_temporary(temporary: Path) -> None:
    """Remove a temporary file (and the sidecars GDAL may have written beside it)."""
    with _LOCK:
        _TEMPORARIES.discard(temporary)
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()
    for sidecar in temporary.parent.glob(f"{temporary.name}.*"):  # .aux.xml, -journal, ...
        with contextlib.suppress(FileNotFoundError):
            sidecar.unlink()
    for suffix in ("-journal", "-wal", "-shm"):  # SQLite (GeoPackage) companions
        with contextlib.suppress(FileNotFoundError):
            Path(f"{temporary}{suffix}").unlink()


def check_output_folder(target: str | os.PathLike) -> Path:
    """The target's folder; ValueError when it is missing or not writable."""
    folder = _absolute(target).parent
    if not folder.is_dir():
        raise ValueError(
            f"The output folder '{folder}' does not exist. Choose an existing folder."
        )
    if not os.access(folder, os.W_OK):
        raise ValueError(
            f"The output folder '{folder}' is not writable. Choose a folder you can write to."
        )
    return folder


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; rename it onto ``path`` only on success.

    On any failure (or a cancel) the temporary file is removed and an existing ``path`` is left
    as it was.
    """
    target = _absolute(path)
    check_output_folder(target)
    temporary = create_temporary(target)
    try:
        yield temporary
        os.replace(temporary, target)
    finally:
        discard_temporary(temporary)


# ------------------------------------------------------------------------------ probing


@dataclass(frozen=True)
class FolderProbe:
    """What creating a file in a folder showed."""

    folder: Path
    case_insensitive: bool


def probe_folder(folder: str | os.PathLike) -> FolderProbe:
    """Create and remove a file in ``folder`` (OSError when that fails); also tell whether the
    folder's file names ignore case."""
    folder = _absolute(folder)
    name = f".hsi-cluster-probe-{secrets.token_hex(4)}-x"
    probe = folder / name
    handle = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
    os.close(handle)
    try:
        case_insensitive = (folder / name.upper()).exists()
    finally:
        probe.unlink()
    return FolderProbe(folder, case_insensitive)


def file_identity(path: str | os.PathLike,
                  case_insensitive: bool | None = None) -> tuple:
    """A key equal for two paths exactly when they name the same file.

    An existing file is its (device, inode): symlinks, relative paths, hard links and case on
    case-insensitive systems all resolve to it. A file that does not exist yet is its folder's
    (device, inode) plus its name (case-folded when the folder ignores case; probed when
    ``case_insensitive`` is None and the folder exists).
    """
    target = _absolute(path)
    with contextlib.suppress(OSError):
        status = os.stat(target)
        return ("file", status.st_dev, status.st_ino)
    folder = target.parent
    try:
        status = os.stat(folder)
    except OSError:
        return ("path", os.path.normcase(os.path.realpath(target)))
    if case_insensitive is None:
        try:
            case_insensitive = probe_folder(folder).case_insensitive
        except OSError:
            case_insensitive = False
    name = target.name.casefold() if case_insensitive else target.name
    return ("new", status.st_dev, status.st_ino, name)


# ------------------------------------------------------------------------------ a run's files


@dataclass
class _Claim:
    path: Path
    existed: bool
    backup: Path | None = None
    moved_aside: bool = False


class OutputLedger:
    """The files one run writes: created ones are removed on failure, existing ones restored.

    ``claim`` a path before anything writes it. Existing main files are backed up by a hard link
    (``replaced_by_rename=True``: the writer renames a new file onto the name, so the old inode
    is untouched) or by a copy (writers that rewrite the file in place); existing sidecars are
    moved aside, since a stale ``.aux.xml`` or ``.qml`` would otherwise describe the new file.
    """

    def __init__(self) -> None:
        self._claims: dict[Path, _Claim] = {}
        self._finished = False

    @property
    def paths(self) -> list[Path]:
        return [claim.path for claim in self._claims.values()]

    def created(self) -> list[Path]:
        return [c.path for c in self._claims.values() if not c.existed and c.path.exists()]

    def claim(self, path: str | os.PathLike, replaced_by_rename: bool = True,
              with_sidecars: bool = True) -> None:
        target = _absolute(path)
        self._claim_one(target, move_aside=False, link=replaced_by_rename)
        if with_sidecars:
            for sidecar in sidecars(target):
                self._claim_one(sidecar, move_aside=True, link=False)

    def _claim_one(self, path: Path, move_aside: bool, link: bool) -> None:
        with _LOCK:
            if path in self._claims:
                return
            existed = path.is_file()
            claim = _Claim(path, existed)
            if existed:
                backup = create_temporary(path, tag="backup-")
                if move_aside:
                    os.replace(path, backup)
                    claim.moved_aside = True
                else:
                    backup.unlink()
                    try:
                        if not link:
                            raise OSError("copy wanted")
                        os.link(path, backup)
                    except OSError:
                        shutil.copy2(path, backup)
                claim.backup = backup
            self._claims[path] = claim

    def commit(self) -> None:
        """The run succeeded: drop the backups."""
        with _LOCK:
            for claim in self._claims.values():
                if claim.backup is not None:
                    discard_temporary(claim.backup)
            self._finished = True

    def rollback(self) -> None:
        """The run failed: remove what it created, put back what existed."""
        with _LOCK:
            if self._finished:
                return
            for claim in reversed(list(self._claims.values())):
                with contextlib.suppress(OSError):
                    self._roll_back_one(claim)
            self._finished = True

    @staticmethod
    def _roll_back_one(claim: _Claim) -> None:
        if not claim.existed:
            if claim.path.is_file():
                claim.path.unlink()
            return
        backup = claim.backup
        if backup is None or not backup.exists():
            return
        if claim.path.exists() and os.path.samefile(claim.path, backup):
            discard_temporary(backup)  # never replaced: the hard link is all that was added
            return
        os.replace(backup, claim.path)
        with _LOCK:
            _TEMPORARIES.discard(backup)

    @contextlib.contextmanager
    def active(self) -> Iterator[OutputLedger]:
        """Commit on success, roll back on any exception; termination signals roll back too."""
        with _LOCK:
            _ROLLBACKS.append(self.rollback)
        try:
            yield self
        except BaseException:
            self.rollback()
            raise
        else:
            self.commit()
        finally:
            with _LOCK:
                with contextlib.suppress(ValueError):
                    _ROLLBACKS.remove(self.rollback)


# ------------------------------------------------------------------------------ signals


def clean_up_now() -> None:
    """Roll back the active runs and remove every live temporary file (signal handler work)."""
    with _LOCK:
        rollbacks = list(_ROLLBACKS)
        temporaries = list(_TEMPORARIES)
    for rollback in reversed(rollbacks):
        with contextlib.suppress(Exception):
            rollback()
    for temporary in temporaries:
        with contextlib.suppress(Exception):
            discard_temporary(temporary)


def _on_termination(signum, frame) -> None:
    clean_up_now()
    previous = _PREVIOUS_HANDLERS.get(signum, signal.SIG_DFL)
    if callable(previous):
        previous(signum, frame)
        return
    # Die of the same signal as we would have without the handler (exit status 128 + signum).
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


@contextlib.contextmanager
def cleanup_on_termination() -> Iterator[None]:
    """While active, termination signals clean up before the process ends.

    Python runs signal handlers in the main thread only, so this only acts there (qgis_process,
    scripts, a worker process); in another thread it does nothing. Handlers set by C code
    (``signal.getsignal`` gives None) and ignored signals are left alone.
    """
    global _INSTALLED_DEPTH
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    installed: list[int] = []
    with _LOCK:
        if _INSTALLED_DEPTH == 0:
            for signum in termination_signals():
                try:
                    current = signal.getsignal(signum)
                    if current is None or current == signal.SIG_IGN:
                        continue
                    _PREVIOUS_HANDLERS[signum] = current
                    signal.signal(signum, _on_termination)
                    installed.append(signum)
                except (ValueError, OSError):
                    continue
        _INSTALLED_DEPTH += 1
    try:
        yield
    finally:
        with _LOCK:
            _INSTALLED_DEPTH -= 1
            for signum in installed:
                with contextlib.suppress(ValueError, OSError):
                    signal.signal(signum, _PREVIOUS_HANDLERS.pop(signum, signal.SIG_DFL))
