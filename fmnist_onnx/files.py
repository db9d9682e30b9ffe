"""The one write policy, for every file any command writes, and checksums.

- An existing file is replaced only with ``overwrite`` (the commands' ``--overwrite``): ``check_output``
  says so before any work, and ``atomic_write`` holds to it at the moment of the rename too.
- Replacement is atomic: the content goes to a temporary file with an unpredictable name (``mkstemp``, created
  exclusively, so never through a planted link) in the same folder, handed to the writer as an open file (never
  re-opened by path), then renamed onto the name. A symlink at the name is replaced itself, never its target.
- No output may be one of the command's own inputs, even with ``overwrite`` (``check_output(inputs=...)``).
- One run per output at a time: ``OutputLock`` holds an OS lock beside it for the whole run (a SIGKILLed holder
  releases it by itself) with the holder's process id in it, and a second run is refused naming that id. The
  lock file is the only one it writes: anything else found at its name (a hard link, a FIFO, other content) is
  refused, and a lock removed under a run stops it before anything more is published (``LockLost``).

Library functions take an explicit ``overwrite``; the commands decide it. No torch here: the inference path
uses this module.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import stat
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, NoReturn

from fmnist_onnx.errors import UserError

LOCK_SUFFIX = ".lock"
OUTPUT_FAILED = 4  # the exit code of an OutputError
_HELD: dict[tuple[int, int], OutputLock] = {}  # the locks this process holds, by their file's (device, inode):
# POSIX locks do not conflict within one process, so a second holder here is refused from this table


def check_output(path: str | Path, overwrite: bool, inputs: Iterable[str | Path] = (), what: str = "") -> Path:
    """UserError (exit 2) unless ``path`` may be written by a command: its folder exists and can be written, it
    is no folder, device or FIFO, it is none of ``inputs`` (even with ``overwrite``), and it does not exist
    unless ``overwrite``. Called before any work. ``what`` names the option in the message (``--report``)."""
    path = Path(path)
    name = f"{what} {path}" if what else str(path)
    for i in inputs:
        if same_file(path, i):
            raise UserError(f"{name} is also an input of this command ({i}); write it elsewhere")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise UserError(f"{name}: {e.strerror}") from None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise UserError(f"{name} is a folder; give a file name")
    if st is not None and not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
        raise UserError(f"{name} is not a regular file; only regular files are written or replaced")
    check_folder(path, name)
    if st is not None and not overwrite:
        raise UserError(f"{name} exists; use --overwrite to replace it")
    return path


def check_folder(path: Path, name: str) -> None:
    """UserError unless the folder of ``path`` exists and can be written."""
    folder = path.parent
    if not folder.is_dir():
        raise UserError(f"{name}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK | os.X_OK):
        read_only = os.statvfs(folder).f_flag & os.ST_RDONLY
        raise UserError(f"{name}: folder {folder} cannot be written "
                        f"({'read-only file system' if read_only else 'permission denied'})")


_KINDS = {stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device", stat.S_IFIFO: "a FIFO",
          stat.S_IFSOCK: "a socket"}


def check_place(output: Path, beside: Iterable[Path] = ()) -> None:
    """UserError unless ``output`` (and the files a run keeps ``beside`` it: its journal) can be written there:
    a file name in a folder that exists and is writable, and no device, FIFO or socket by that name (only
    regular files are replaced; a symbolic link is replaced itself, never followed)."""
    if output.is_dir():
        raise UserError(f"--output {output} is a folder; give a file name")
    for path in (output, *beside):
        try:
            mode = os.lstat(path).st_mode
        except OSError:  # not there
            continue
        if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
            kind = _KINDS.get(stat.S_IFMT(mode), "not a regular file")
            raise UserError(f"--output {output}: {path} is {kind}; only regular files are written or replaced "
                            "(for stdout, use -o -)")
    check_folder(output, f"--output {output}")  # exists, and can be written


def remove_own(path: Path) -> None:
    """Remove a run's own file (a journal, a run record): a symbolic link there is removed itself, never its
    target (unlink(2) does not follow links)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise UserError(f"cannot remove {path}: {why(e)}") from None


def why(e: OSError) -> str:
    """The OS's words for an error ("No space left on device"), also for pyarrow's wordier OSErrors."""
    return os.strerror(e.errno) if e.errno else str(e)


def check_distinct(paths: Iterable[str | Path]) -> None:
    """UserError when two outputs of one run are the same file (``--report preds.csv -o preds.csv``)."""
    seen: list[Path] = []
    for p in map(Path, paths):
        for q in seen:
            if os.path.abspath(p) == os.path.abspath(q) or same_file(p, q):
                raise UserError(f"{p} is named for two outputs of this run; give each its own name")
        seen.append(p)


def same_file(a: str | Path, b: str | Path) -> bool:
    """Whether ``a`` and ``b`` name one file: the same path once links are resolved, or the same inode."""
    try:
        if os.path.realpath(a) == os.path.realpath(b):
            return True
        return os.path.samefile(a, b)
    except (OSError, ValueError):  # one of them does not exist (yet), or holds a NUL (no file has that name)
        return False


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object], overwrite: bool = False) -> Path:
    """Call ``write(f)`` on a new temporary file beside ``path``, open for binary writing, then give it
    ``path``'s name: complete or not at all. Without ``overwrite`` an existing ``path`` (even one that appeared
    meanwhile) is left alone (UserError); with it, ``path`` is replaced by rename, a symlink there included
    (the link itself, never its target). Writers that pick a format from the name must be told it (Pillow's
    ``format=``, matplotlib's ``format=``): the temporary name is not the final one."""
    path = Path(path)
    with temp_beside(path) as (tmp, f):
        write(f)
        publish(tmp, f, path, overwrite)
    return path


@contextmanager
def temp_beside(path: str | Path) -> Iterator[tuple[Path, BinaryIO]]:
    """A new temporary file in ``path``'s folder (an unpredictable name, created exclusively), open for binary
    writing, removed on the way out unless ``publish`` gave it its name. For writers that need the file by name
    as well (a session that checks it before it is published), the path comes too."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with open(fd, "wb") as f:
            f.raw.name = tmp  # as open(tmp) would name it: writers that look at f.name (onnx) find a path
            yield Path(tmp), f
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


def publish(tmp: Path, f: BinaryIO, path: str | Path, overwrite: bool) -> None:
    """Give the temporary file ``tmp`` (open as ``f``) the name ``path``, durably: see ``atomic_write``."""
    path = Path(path)
    check_locks()  # never under a lock that is no longer ours
    f.flush()
    os.fsync(f.fileno())
    os.fchmod(f.fileno(), 0o644 & ~_umask())
    if overwrite:
        os.replace(tmp, path)
    else:
        _link_new(tmp, path)
    fsync_dir(path.parent)


def _link_new(tmp: Path, path: Path) -> None:
    """``tmp`` gets the name ``path`` only if no file has it: link(2) fails rather than replace; then the
    temporary name goes. A file system without hard links gets a rename after a check."""
    try:
        os.link(tmp, path, follow_symlinks=False)
    except FileExistsError:
        raise UserError(f"{path} exists; use --overwrite to replace it") from None
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP):
            raise
        if os.path.lexists(path):
            raise UserError(f"{path} exists; use --overwrite to replace it") from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str, overwrite: bool = False) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode()), overwrite)


def atomic_write_bytes(path: str | Path, data: bytes, overwrite: bool = False) -> Path:
    return atomic_write(path, lambda f: f.write(data), overwrite)


def fsync_dir(folder: str | Path) -> None:
    """Make a rename in ``folder`` durable (best effort: some file systems refuse)."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def open_new(path: str | Path, flags: int = os.O_WRONLY) -> int:
    """A file descriptor on a new file at ``path``, created exclusively (never through a link): a run's own
    state (journal, record). FileExistsError when something, a link included, is there."""
    return os.open(path, flags | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)


def open_existing(path: str | Path, flags: int = os.O_RDONLY) -> int:
    """A file descriptor on the regular file at ``path``, refusing a symlink (UserError) or anything else that
    is not a regular file: a run's own state read back on --resume."""
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UserError(f"{path} is a symbolic link; a run's own files are never read or written through "
                            "one (remove it, or use --overwrite to start over)") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise UserError(f"{path} is not a regular file; remove it, or use --overwrite to start over")
    os.set_blocking(fd, True)
    return fd


class OutputError(UserError):
    """The output could not be written mid-run (a full disk, an I/O error): exit 4. The journal keeps the
    rows written so far; the same command with --resume finishes once the cause is fixed."""

    exit_code = OUTPUT_FAILED


def lock_path(output: str | Path) -> Path:
    output = Path(output)
    return output.with_name(output.name + LOCK_SUFFIX)


class LockLost(UserError):
    """This run's lock file was removed or replaced under it: another run may be writing the same output, so
    nothing more is published and nothing of the run's state is renamed or removed (exit 2)."""


class OutputLock:
    """``with OutputLock(output):`` one run at a time on ``output``. The lock file ``<output>.lock`` is this
    tool's own and nothing else is ever written: it is created exclusively, or the file found there is opened as
    it is (not truncated, not through a link, not blocking on a FIFO) and taken only if it is a regular file with
    one link, empty or holding a process id (what a killed holder leaves); anything else is refused naming it.
    It is locked with fcntl (POSIX record locks: released when the holder exits, SIGKILL included, and not
    inherited by forked workers) and then holds the holder's process id. A run that finds it held is refused
    (UserError, exit 2) naming that process. ``check_held`` says whether the file at the name is still the one
    locked (a lock removed under a run lets a second run in); every ``publish`` checks it, and so does the end
    of the block. The file is removed on release, if it is still ours."""

    def __init__(self, output: str | Path) -> None:
        self.output = Path(output)
        self.path = lock_path(output)
        self.fd = -1

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, exc_type, *exc) -> None:
        try:
            if exc_type is None:
                self.check_held()  # a block that ends well has published under its lock: say if it was lost
        finally:
            self.release()

    def acquire(self) -> None:
        check_folder(self.output, str(self.output))  # a missing folder said as such, not as a lock file's error
        while True:  # until the file we lock is the one at the name (a releasing holder may unlink it meanwhile)
            fd = self._open()
            try:
                key = self._check_kind(fd)
                if key in _HELD:
                    raise BlockingIOError(errno.EAGAIN, "held by this process")
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _read_pid(fd)
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise UserError(f"cannot lock {self.path}: {e.strerror}") from None
                who = f"process {holder}" if holder else "another process"
                raise UserError(f"{self.output} is being written by another run ({who} holds {self.path}); "
                                "wait for it to end, or stop it") from None
            except BaseException:
                os.close(fd)
                raise
            if self._at_name(key):
                break
            os.close(fd)
        try:
            self._check_content(fd)  # locked: no run of ours writes it now
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)  # ours: created here, or proven a lock file left by a run of this tool
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        _HELD[key] = self
        self.fd = fd

    def _open(self) -> int:
        """A descriptor on a new lock file (created exclusively), or on the file at the name as it is: O_NONBLOCK
        so that a FIFO there never blocks, O_NOCTTY so that a terminal there is not taken."""
        flags = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY
        while True:
            try:
                return os.open(self.path, flags | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                pass
            except OSError as e:
                raise UserError(f"cannot create {self.path}: {e.strerror}") from None
            try:
                return os.open(self.path, flags | os.O_NONBLOCK)
            except FileNotFoundError:  # removed by its releasing holder meanwhile: create it
                continue
            except OSError as e:
                if e.errno == errno.ELOOP:
                    raise UserError(f"{self.path} is a symbolic link; remove it (a lock is never taken through "
                                    "one)") from None
                kind = _kind_at(self.path)
                if kind is None:  # a regular file that cannot be opened, or gone again
                    raise UserError(f"cannot open {self.path}: {e.strerror}") from None
                self._refuse(kind)

    def _check_kind(self, fd: int) -> tuple[int, int]:
        """The (device, inode) of the file open at ``fd``, refused unless a regular file with one link: a hard
        link planted at the name would make the lock write into the file it shares."""
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            self._refuse(_kind(st.st_mode))
        if st.st_nlink != 1:
            self._refuse(f"a file with {st.st_nlink} names (a hard link)")
        return _key(st)

    def _check_content(self, fd: int) -> None:
        """Refused unless empty or a process id and a newline: what a run of this tool leaves, killed or not."""
        data = os.pread(fd, 32, 0)
        if data and not (data.endswith(b"\n") and data[:-1].isdigit() and len(data) <= 21):
            self._refuse("a file with other content")

    def _refuse(self, what: str) -> NoReturn:
        raise UserError(f"{self.path} is {what}, not a lock file of this tool; it is left as it is: move it away "
                        f"to write {self.output}")

    def _at_name(self, key: tuple[int, int]) -> bool:
        try:
            return _key(os.lstat(self.path)) == key
        except FileNotFoundError:
            return False

    def check_held(self) -> None:
        """LockLost unless the lock file at the name is still the one this run holds."""
        if self.fd >= 0 and not self._at_name(_key(os.fstat(self.fd))):
            raise LockLost(f"{self.path} was removed or replaced during this run: another run may be writing "
                           f"{self.output}; stopped, leaving the run's files as they are")

    def release(self) -> None:
        if self.fd < 0:
            return
        key = _key(os.fstat(self.fd))
        _HELD.pop(key, None)
        if self._at_name(key):  # never another run's lock (ours was removed, and it made its own)
            try:
                os.unlink(self.path)  # while still held: whoever opens the name next makes a new file
            except OSError:
                pass
        os.close(self.fd)
        self.fd = -1


def check_locks() -> None:
    """LockLost if a lock this process holds was removed or replaced: nothing is published under it then."""
    for lock in list(_HELD.values()):
        lock.check_held()


def _key(st: os.stat_result) -> tuple[int, int]:
    return st.st_dev, st.st_ino


def _kind(mode: int) -> str:
    kinds = {stat.S_ISDIR: "a folder", stat.S_ISFIFO: "a FIFO", stat.S_ISCHR: "a character device",
             stat.S_ISBLK: "a block device", stat.S_ISSOCK: "a socket"}
    return next((name for test, name in kinds.items() if test(mode)), "a special file")


def _kind_at(path: Path) -> str | None:
    """What is at ``path`` when it is no regular file; None for a regular file, or nothing."""
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return None
    return None if stat.S_ISREG(mode) else _kind(mode)


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB pieces: names the exact weights a model was exported from."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@contextmanager
def locked(*outputs: str | Path | None) -> Iterator[None]:
    """``OutputLock`` on each output named (None: skipped) for the length of the block."""
    from contextlib import ExitStack

    with ExitStack() as stack:
        for o in outputs:
            if o is not None:
                stack.enter_context(OutputLock(o))
        yield
