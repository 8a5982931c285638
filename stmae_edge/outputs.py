"""Output files: checked before long work starts, so a bad --out fails in a second, not after training,
and never one that would replace an input of the same command; written whole or not at all; and the
one digest of a file's bytes (sha256_file) that sidecars, calibration caches and training records keep.

A command that writes many files into a folder (predict, report) writes them into a staging folder
inside it first and moves them into place at the end, with Ctrl-C held for those few renames: an
interrupted or failed run leaves the earlier run's files as they were.

    staging_folder(out) -> files written there -> with signals_held(): move_into_place(...) each
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import secrets
import shutil
import signal
import stat
import threading
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import OutputError, first_line

logger = logging.getLogger(__name__)

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


def sha256_file(path: Path | str) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def same_file(a: Path | str, b: Path | str) -> bool:
    """Whether two paths name one file (through links and relative parts), existing or not."""
    a, b = Path(a), Path(b)
    try:
        if a.exists() and b.exists():
            a_stat, b_stat = a.stat(), b.stat()
            # Some Windows volumes (network, virtual) give every file the ID 0, which samefile would read
            # as one file for any two: those are compared by path
            if a_stat.st_ino and b_stat.st_ino:
                return os.path.samestat(a_stat, b_stat)
        return a.resolve() == b.resolve()
    except OSError:
        return False


def check_writable(path: Path | str, inputs: Iterable[Path | str] = (), option: str = "--out") -> Path:
    """Fail before long work, not after it, when the output cannot be written or is one of `inputs`;
    the message names `option`, the one that chose the path.

    Raises:
        OutputError: the folder cannot be created or written, the path is a folder, or it names an input.
    """
    path = check_not_an_input(path, inputs)
    try:
        make_folders(path.parent)
        probe = partial_name(path)  # the name the write will take: the longest it needs (255 bytes, MAX_PATH)
        with signals_held():  # Ctrl-C between the two would leave the probe beside the output
            probe.touch()
            probe.unlink()
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {failure_reason(exc, path.parent)}; choose another {option}") from exc
    if path.is_dir():
        raise OutputError(f"{path} is a folder; give a file name with --out")
    return path


def check_not_an_input(path: Path | str, inputs: Iterable[Path | str]) -> Path:
    """`path`, after checking that it names none of `inputs` (check_writable's first check, which makes
    no folder).

    Raises:
        OutputError: it does.
    """
    path = Path(path)
    for source in inputs:
        if same_file(path, source):
            raise OutputError(f"{path} is an input of this command and would be replaced; choose another --out")
    return path


def partial_name(target: Path) -> Path:
    """A fresh temporary name beside `target`, 22 characters longer than its name."""
    return target.with_name(f".{target.name}.{secrets.token_hex(6)}.partial")


@contextlib.contextmanager
def written_atomically(path: Path | str, follow_links: bool = True) -> Iterator[Path]:
    """A temporary name beside `path` to write to; flushed to disk and renamed over `path` when the
    block succeeds, removed when it fails or is interrupted. A reader, or a later command, never finds
    a half-written file under the real name, also after a power cut, and a file that was there stays
    whole until the new one replaces it. A symbolic link is kept, and the file it points to replaced
    with its permissions (a model file rewritten in place); with follow_links=False the link itself is
    replaced (outputs written into a folder that others may write to: a planted link must not send
    them elsewhere).

    Raises:
        OutputError: writing or renaming failed (an OSError inside the block, or the rename, or
            torch.save's RuntimeError on a full disk); the old file, if any, is untouched.
    """
    path = Path(path)
    target = path.resolve() if follow_links and path.is_symlink() else path
    # A fresh name, created here and not through a link: a name known in advance could be a link
    # planted in a shared folder, which the writer would follow before the rename replaced it.
    partial = partial_name(target)
    try:
        os.close(os.open(partial, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0), 0o666))
        yield partial
        _sync_file(partial)  # before the target's mode, which may be read-only, is copied onto it
        if target.exists() and not target.is_symlink():
            os.chmod(partial, target.stat().st_mode & 0o7777)
        move_into_place(partial, target)
    except (OSError, RuntimeError) as exc:
        reason = failure_reason(exc, target.parent)
        _remove(partial)
        raise OutputError(f"cannot write {path}: {reason}; nothing was replaced") from exc
    except BaseException:
        _remove(partial)
        raise
    sync_folder(target.parent)


def write_staged(path: Path, data: bytes) -> None:
    """`data` as a new file at `path`, on the disk before this returns: for a staging folder (or a fresh
    temporary name), where nothing reads a file before it is moved into place, so no temporary name of
    its own is needed. Created here, never through a link planted at the name.

    Raises:
        OSError: the file exists, or cannot be written.
    """
    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | getattr(os, "O_NOFOLLOW", 0), 0o666))
    path.write_bytes(data)
    _sync_file(path)


def write_files_together(files: dict[Path, bytes]) -> None:
    """Several files that must match one another (a plan and its sidecar) written whole, then renamed
    into place one after another with Ctrl-C held: an interrupted or failed write leaves the earlier
    ones, all of them, as they were.

    Two processes (or threads) writing pairs to the same names rename theirs one pair after the other,
    their folders held meanwhile: interleaved, they left one's plan beside the other's sidecar.

    Raises:
        OutputError: a write failed (nothing was replaced), or a rename did.
    """
    partials: list[tuple[Path, Path]] = []
    replaced: list[Path] = []
    try:
        for path, data in files.items():
            # as written_atomically: a link is kept and its file replaced, with that file's permissions
            target = path.resolve() if path.is_symlink() else path
            partial = partial_name(target)
            partials.append((partial, target))
            write_staged(partial, data)
            if target.exists():
                os.chmod(partial, target.stat().st_mode & 0o7777)
        with contextlib.ExitStack() as folders:
            for folder in _in_lock_order({target.parent for _, target in partials}):
                folders.enter_context(folder_waited_for(
                    folder, f"waiting for another stmae-edge command to finish writing into {folder}"))
            with signals_held():
                for partial, target in partials:
                    move_into_place(partial, target)
                    replaced.append(target)
    except OSError as exc:
        target = partials[-1][1] if partials else next(iter(files))
        if replaced:  # a rename refused after another was made (a file held open on Windows)
            target = next(t for _, t in partials if t not in replaced)
        reason = failure_reason(exc, target.parent)
        done = (f"{', '.join(str(t) for t in replaced)} replaced, so they do not match: run the command again"
                if replaced else "nothing was replaced")
        raise OutputError(f"cannot write {target}: {reason}; {done}") from exc
    finally:
        for partial, _ in partials:
            _remove(partial)
    for folder in {target.parent for target in files}:
        sync_folder(folder)


def _in_lock_order(folders: Iterable[Path]) -> list[Path]:
    """Folders, each once however its path is spelt (through links, relative parts), in one order for
    every process: by the folder itself (device, inode), so that two writers locking them in turn
    cannot each hold one and wait for the other."""
    found: dict[tuple[int, int], Path] = {}
    for folder in folders:
        try:
            info = folder.stat()
        except OSError:  # not there: nothing to lock (the rename fails and says so)
            continue
        found.setdefault((info.st_dev, info.st_ino), folder)
    return [found[key] for key in sorted(found)]


# Windows refuses to replace a file that another process holds open without sharing its deletion (a
# viewer, the search indexer, a virus scanner reading the new file): such holds last moments, so the
# rename is tried again there. POSIX replaces an open file, and a refusal there is final.
REPLACE_ATTEMPTS = 6 if os.name == "nt" else 1
REPLACE_PAUSE_S = 0.25


def move_into_place(staged: Path, target: Path) -> None:
    """A staged file (or folder) renamed to `target`, replacing a file there (a link itself, never what it
    points to); retried on Windows while another program holds the target. A read-only target is
    replaced there too (Windows refuses that where POSIX asks only the folder); if the rename fails, it
    stays read-only.

    Raises:
        OSError: the rename failed (PermissionError: the target is held open).
    """
    mode_cleared = _clear_read_only(target) if READ_ONLY_REFUSES_REPLACE else None
    try:
        for attempt in range(REPLACE_ATTEMPTS):
            try:
                os.replace(staged, target)
                return
            except PermissionError:
                if attempt == REPLACE_ATTEMPTS - 1:
                    raise
                time.sleep(REPLACE_PAUSE_S * (attempt + 1))
    except OSError:
        if mode_cleared is not None:
            with contextlib.suppress(OSError):
                os.chmod(target, mode_cleared)
        raise


# Windows refuses to replace or remove a read-only file (a model file locked down as README's security
# section suggests; a partial file that took its mode): its read-only bit is cleared first there
READ_ONLY_REFUSES_REPLACE = os.name == "nt"


def _clear_read_only(path: Path) -> int | None:
    """The file at `path` made writable where it was read-only; returns its mode before, or None where
    nothing was changed (no such file, a folder or a link, or already writable)."""
    try:
        mode = os.lstat(path).st_mode
        if not stat.S_ISREG(mode) or mode & stat.S_IWRITE:
            return None
        os.chmod(path, stat.S_IMODE(mode) | stat.S_IWRITE)
        return stat.S_IMODE(mode)
    except OSError:
        return None


def _remove(partial: Path) -> None:
    """The temporary file gone, where it could be made: its removal must not hide why the write failed
    (a name too long for the file system fails both)."""
    if READ_ONLY_REFUSES_REPLACE:
        _clear_read_only(partial)
    with contextlib.suppress(OSError):
        partial.unlink(missing_ok=True)


DISK_NEARLY_FULL_BYTES = 1 << 20
# errors that say their own cause, whatever space the disk has left
NOT_THE_DISKS_SPACE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT, errno.ENOTDIR, errno.EISDIR,
                       errno.EEXIST, errno.ENAMETOOLONG, errno.ELOOP}


def failure_reason(exc: BaseException, folder: Path) -> str:
    """Why a write into `folder` failed, in words: the OS's, or the first line of torch.save's, which
    says a full disk in its own words ("unexpected pos ...")."""
    reason = getattr(exc, "strerror", None) or first_line(exc, 200)
    return f"no space left on the disk ({reason})" if _disk_full(exc, folder) else reason


def _disk_full(exc: BaseException, folder: Path) -> bool:
    """Whether a failed write ran out of space: said so by the error, or by the disk (measured before
    the partial file is removed, while it still fills it)."""
    if getattr(exc, "errno", None) == errno.ENOSPC:
        return True
    if getattr(exc, "errno", None) in NOT_THE_DISKS_SPACE:  # a nearly full disk must not take the blame
        return False
    try:
        return shutil.disk_usage(folder).free < DISK_NEARLY_FULL_BYTES
    except OSError:
        return False


def _sync_file(path: Path) -> None:
    """A file's data on the disk, not only in the page cache. Opened for writing: Windows flushes only
    a handle with write access (FlushFileBuffers; read-only, os.fsync fails there with EBADF)."""
    fd = os.open(path, os.O_RDWR | getattr(os, "O_BINARY", 0))
    try:
        _flush_to_disk(fd)
    finally:
        os.close(fd)


def _flush_to_disk(fd: int) -> None:
    """fsync, and on macOS F_FULLFSYNC: its fsync hands the data to the drive, whose cache may still
    lose it in a power cut (Apple's fsync(2)); F_FULLFSYNC asks the drive to write it. Where a file
    system refuses F_FULLFSYNC (some network ones), fsync is what there is."""
    full_sync = getattr(fcntl, "F_FULLFSYNC", None) if fcntl is not None else None
    if full_sync is not None:
        try:
            fcntl.fcntl(fd, full_sync)
            return
        except OSError:
            pass
    os.fsync(fd)


def sync_folder(folder: Path) -> None:
    """The rename on the disk too, where the system allows it: the file is already in place, so a
    folder that cannot be synced (Windows cannot open one as a file, some file systems refuse) is no
    failure of the write."""
    if os.name == "nt":  # NTFS journals its folder entries; os.open cannot open a folder there
        return
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_bytes_atomically(path: Path | str, data: bytes, follow_links: bool = True) -> None:
    """`data` as the whole of `path`, or nothing (written_atomically)."""
    with written_atomically(path, follow_links) as partial:
        partial.write_bytes(data)


def check_output_folder(out: Path | str, inputs: Iterable[Path | str]) -> Path:
    """An output folder that holds none of the inputs: what a command writes there can neither replace
    an input nor be taken for one by the next run over the input folder.

    Raises:
        OutputError: `out` is the folder of one of the inputs, or cannot be created.
    """
    out = Path(out)
    for source in {Path(s).parent: s for s in inputs}.values():  # one check per input folder
        if same_file(Path(source).parent, out):
            raise OutputError(f"--out {out} is the folder of the input {source}: outputs would sit among (and "
                              "could replace) the inputs; choose another folder")
    try:
        make_folders(out)
    except OSError as exc:
        raise OutputError(f"cannot create {out}: {failure_reason(exc, out.parent)}; choose another --out") from exc
    return out


# The folders the checks above made for outputs, in the order made, while a command runs (None: not
# recorded, as in a host program, whose calls would add to it for ever): a command that then fails
# removes those still empty (remove_folders_left_empty), rather than leave `--out a/b/` behind for nothing
_FOLDERS_MADE: list[Path] | None = None


def make_folders(folder: Path) -> None:
    """`folder` and the folders above it that are missing, made and remembered.

    Raises:
        OSError: one cannot be made.
    """
    missing = []
    above = Path(folder)
    while not os.path.lexists(above) and above != above.parent:
        missing.append(above)
        above = above.parent
    Path(folder).mkdir(parents=True, exist_ok=True)
    if _FOLDERS_MADE is not None:
        _FOLDERS_MADE.extend(reversed(missing))


def remove_folders_left_empty() -> None:
    """The folders make_folders made since record_folders_made that are still empty, deepest first
    (after a command failed)."""
    while _FOLDERS_MADE:
        with contextlib.suppress(OSError):  # not empty: something was written there, and stays
            _FOLDERS_MADE.pop().rmdir()


def record_folders_made() -> None:
    """From now on, the folders made for outputs are remembered for remove_folders_left_empty (a command
    starts); those made before are kept whatever follows."""
    global _FOLDERS_MADE
    _FOLDERS_MADE = []


STAGING_PREFIX = ".stmae-edge-staging-"
# Where a staging folder cannot be locked (Windows; NFS, whose flock needs a file open for writing),
# one untouched this long is an earlier run's, killed; and none this young is taken for one (the moment
# between a run's mkdir and its lock)
STALE_STAGING_S = 24 * 3600
YOUNG_STAGING_S = 60


@contextlib.contextmanager
def staging_folder(out: Path) -> Iterator[Path]:
    """A fresh hidden folder inside `out` for a run's files until they are moved into place; removed,
    with whatever is left in it, however the block ends. Staging folders that earlier runs left (killed
    before they could remove theirs) are removed first, but not one that a running command holds.

    Raises:
        OutputError: the folder cannot be made in `out`.
    """
    remove_stale_staging(out)
    staging = out / f"{STAGING_PREFIX}{secrets.token_hex(6)}"
    try:
        staging.mkdir()
    except OSError as exc:
        raise OutputError(f"cannot write into {out}: {failure_reason(exc, out)}; choose another --out") from exc
    held = None
    try:
        held = _locked(staging)  # while held, a later run knows this one is alive
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if held is not None:
            os.close(held)
        if os.path.lexists(staging):  # a file held open (Windows), a disk gone read-only: it may hold gigabytes
            logger.warning("could not remove %s, a hidden folder of this run's unused files; remove it once "
                           "nothing uses it (the next run into %s removes it when it is old)", staging, out)


def check_names_fit(staging: Path, names: Iterable[str]) -> None:
    """Fail before long work where the longest path a run will write in its staging folder cannot be
    made there (the staging folder adds about 33 characters to a name in `out`: past Windows' 260, or
    the system's limit, the run failed after scoring everything). Tried with a file, then removed.

    Raises:
        OutputError: it cannot be made.
    """
    longest = max(names, key=lambda name: len(str(staging / name)), default=None)
    if longest is None:
        return
    probe = staging / longest
    try:
        write_staged(probe, b"")
        probe.unlink()
    except OSError as exc:
        raise OutputError(f"cannot write {probe}: {failure_reason(exc, staging)}; choose a shorter --out (paths "
                          "of 260 characters and more need long paths enabled on Windows); nothing was scored") from exc


@contextlib.contextmanager
def folder_held(folder: Path, command: str) -> Iterator[None]:
    """`folder` held against another command writing into it at the same time, another process or
    another thread: two runs into one folder mixed their files and records. Not held where the system
    cannot lock a folder (Windows, NFS).

    Raises:
        OutputError: another command holds it (which then has `folder`: a failed command's clean-up,
            remove_folders_left_empty, leaves it).
    """
    try:
        held = _locked(folder, wait=False)
    except BlockingIOError:
        if _FOLDERS_MADE is not None and folder in _FOLDERS_MADE:  # made at once by both: the other's now
            _FOLDERS_MADE.remove(folder)
        # The lock does not say who holds it: another `command`, or a build renaming its plan and sidecar
        # into the folder (write_files_together)
        raise OutputError(f"another stmae-edge run (a {command}, or a build putting its engine there) is writing "
                          f"into {folder}; wait for it to end, or choose another --out") from None
    try:
        yield
    finally:
        if held is not None:
            os.close(held)


@contextlib.contextmanager
def folder_waited_for(folder: Path, waiting: str) -> Iterator[None]:
    """`folder` held while the block runs, once another process or thread that holds it is done (saying
    `waiting` meanwhile): for work that others would otherwise do at the same time into the same folder.
    Not held where the system cannot lock a folder (Windows, NFS)."""
    try:
        held = _locked(folder, wait=False)
    except BlockingIOError:
        logger.warning("%s", waiting)
        held = _locked(folder)
    try:
        yield
    finally:
        if held is not None:
            os.close(held)


def _locked(folder: Path, wait: bool = True) -> int | None:
    """An open descriptor of `folder` holding an exclusive lock on it, or None where the system cannot
    lock a folder (Windows, NFS: then the age rules apply).

    Raises:
        BlockingIOError: with wait=False, another process holds the lock.
    """
    if fcntl is None:
        return None
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        raise
    except OSError:  # EBADF on NFS, ENOLCK: no lock to be had here
        os.close(fd)
        return None
    except BaseException:  # Ctrl-C while waiting: the descriptor is not kept
        os.close(fd)
        raise
    return fd


def remove_stale_staging(out: Path) -> None:
    """Staging folders that earlier runs left in `out` (killed before they could remove theirs) removed,
    but not one that a running command holds or that is younger than YOUNG_STAGING_S."""
    try:
        found = [p for p in out.iterdir() if p.name.startswith(STAGING_PREFIX)]
    except OSError:
        return
    for folder in found:
        with contextlib.suppress(OSError):
            if folder.is_symlink() or not folder.is_dir():
                continue
            age = time.time() - folder.stat().st_mtime
            if age < YOUNG_STAGING_S:
                continue
            try:
                fd = _locked(folder, wait=False)
            except BlockingIOError:  # its run holds it
                continue
            try:
                if fd is not None or age > STALE_STAGING_S:
                    shutil.rmtree(folder, ignore_errors=True)
                    logger.info("removed %s, left by an earlier run that was stopped", folder)
            finally:
                if fd is not None:
                    os.close(fd)


# The signals that stop a command (SIGHUP: its terminal closed; SIGBREAK: Ctrl-Break on Windows, which
# otherwise ends the process with no cleanup); the CLI raises them all as Ctrl-C
STOP_SIGNAL_NAMES = ("SIGINT", "SIGTERM", "SIGHUP", "SIGBREAK")
HELD_SIGNALS = tuple(getattr(signal, name) for name in STOP_SIGNAL_NAMES if hasattr(signal, name))


@contextlib.contextmanager
def signals_held() -> Iterator[list[int]]:
    """Ctrl-C (SIGINT), SIGTERM, SIGHUP and Windows' SIGBREAK put off until the block ends, then delivered
    to the handlers that were there: for the few renames that put a run's files in place, which must not
    stop half-way, or for work that stops itself where it can (a TensorRT build asks its monitor whether
    to go on).
    Yields the list of the signals received so far. A signal the process ignores stays ignored. Only
    the main thread can hold signals; elsewhere (a host program's worker thread) they do not reach the
    block anyway, and the list stays empty."""
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return
    previous: dict[int, object] = {}
    try:
        for signum in HELD_SIGNALS:
            handler = signal.getsignal(signum)
            if handler is None or handler == signal.SIG_IGN:  # installed from C, or ignored: left as it is
                continue
            previous[signum] = handler
            signal.signal(signum, lambda received, frame: caught.append(received))
        yield caught
    finally:
        _restore_handlers(previous)
        if caught:
            signal.raise_signal(caught[0])


def _restore_handlers(previous: dict) -> None:
    """Every handler put back, with the signals blocked meanwhile where the system can (POSIX): one that
    came between two restores would raise from a restored handler and leave the rest unrestored."""
    block = hasattr(signal, "pthread_sigmask") and previous
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, set(previous)) if block else None
    try:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    finally:
        if block:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
