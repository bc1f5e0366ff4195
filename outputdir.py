"""Output folders: one writer per folder (a lock the run holds on each folder it writes, from start to end),
the record of the files runs wrote there (a run never replaces a file it cannot show a run of this repository
wrote, unless --overwrite), and the warning when training and evaluation logs share a folder. Used by main_dino
and every script that writes an output folder."""
import contextlib
import fcntl
import fnmatch
import json
import os
import sys

import utils

LOCK_FILE = '.dino.lock'
_held_locks = []  # file descriptors of this process's folder locks


@contextlib.contextmanager
def only_writer(args, *flags):
    """While the block runs, the launcher's main process holds an exclusive lock on each output folder named
    by `flags` (args' names of the flags; empty values skipped): a second run on one of them stops with one line.

    The lock is an flock on LOCK_FILE inside the folder: the kernel releases it when the process dies, so a
    killed run never blocks the next one. A folder is created if missing, and removed at the end if the run
    left it empty. Where the file system cannot lock, a warning says so and the run goes on.
    """
    folders = {}
    for flag in flags:
        if getattr(args, flag):
            folders.setdefault(os.path.abspath(getattr(args, flag)), f'--{flag}')
    with contextlib.ExitStack() as stack:
        for folder, flag in folders.items() if utils.launcher_rank() == 0 else ():
            stack.enter_context(_locked_folder(folder, flag))
        yield


@contextlib.contextmanager
def _locked_folder(folder, flag):
    missing, parent = [], folder  # the folders makedirs creates, deepest first
    while not os.path.isdir(parent):
        missing.append(parent)
        parent = os.path.dirname(parent)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_FILE)
    fd = _lock_or_warn(path, flag)
    try:
        yield
    finally:
        if fd is not None:
            _held_locks.remove(fd)
            with contextlib.suppress(OSError):
                os.remove(path)  # while still locked: a run waiting for this file tries again (see _lock_file)
            os.close(fd)
        for created in missing:
            with contextlib.suppress(OSError):
                os.rmdir(created)


def _lock_or_warn(path, flag):
    """An fd holding the lock on `path`, the lock file of the folder `flag` names, with this process's pid
    written in it; None, after a warning, where the file system does not lock."""
    folder = os.path.dirname(path)
    try:
        fd = _lock_file(path)
    except BlockingIOError:
        utils.fail(f"{flag} {folder} is in use by another run ({_lock_holder(path)}); wait for it to end, or pass "
                   f"another {flag}")
    except OSError as exc:
        utils.warn(f"cannot lock {flag} {folder} ({exc.strerror}): this file system does not support file locks, so "
                   "a second run writing there at the same time would not be stopped")
        with contextlib.suppress(OSError):
            os.remove(path)
        return None
    _held_locks.append(fd)
    return fd


def _lock_file(path, attempts=10):
    """An fd of `path` (created if missing), exclusively flock'ed, holding this process's pid; BlockingIOError
    when another process holds it."""
    for attempt in range(attempts):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            # the run that held it may have removed it meanwhile (then lock the file now at `path`); the last
            # attempt takes it all the same, for file systems whose inode numbers do not compare
            if _same_file(fd, path) or attempt == attempts - 1:
                os.ftruncate(fd, 0)
                os.write(fd, f"pid {os.getpid()}, {os.path.basename(sys.argv[0])}".encode())
                return fd
        except OSError:
            os.close(fd)
            raise
        os.close(fd)


def _same_file(fd, path):
    with contextlib.suppress(FileNotFoundError):
        here, there = os.fstat(fd), os.stat(path)
        return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)
    return False


def _lock_holder(path):
    """'pid N, script.py' of the process holding the lock file at `path`, as it wrote it there."""
    with contextlib.suppress(OSError), open(path) as f:
        return f.read().strip() or 'its pid is not written yet'
    return 'its pid is unknown'


def _close_held_locks():
    """In a forked child (a DataLoader worker): drop the copies of the parent's lock fds, so that the lock
    ends with the parent even while the child lives on a little."""
    for fd in _held_locks:
        with contextlib.suppress(OSError):
            os.close(fd)
    _held_locks.clear()


os.register_at_fork(after_in_child=_close_held_locks)


# =====================================================================================
# What runs wrote: never replace a user's file of the same name
# =====================================================================================

RECORD_FILE = '.dino_outputs.json'  # {name: signature} of the files and folders runs wrote in the folder


def add_overwrite_arg(parser):
    parser.add_argument('--overwrite', action='store_true', help="""Replace files in the output folder that have
        the names of this script's outputs although no run of this repository wrote them (by default the run stops
        and names them).""")


def check_replaceable(folder, patterns, flag, overwrite=False):
    """Stop with one line when `folder` holds a file or folder matching one of `patterns` (the names this run
    writes there, shell patterns allowed) that no run of this repository wrote, or that was changed since;
    nothing is checked with `overwrite`."""
    if overwrite or not os.path.isdir(folder):
        return
    record = _read_record(folder)
    foreign = sorted(name for name in os.listdir(folder) if any(fnmatch.fnmatchcase(name, p) for p in patterns)
                     and record.get(name) != _signature(os.path.join(folder, name)))
    if foreign:
        shown = ', '.join(foreign[:3]) + (f' and {len(foreign) - 3} more' if len(foreign) > 3 else '')
        utils.fail(f"{flag} {folder} holds {shown}, which this run would replace but no run of this repository "
                   f"wrote; pass another {flag}, or --overwrite to replace them")


def record_written(folder, names):
    """Note `names` (files or folders in `folder`) as written by this run: a later run may replace them."""
    record = _read_record(folder)
    record.update({name: _signature(os.path.join(folder, name)) for name in names})
    path = os.path.join(folder, RECORD_FILE)
    tmp = f'{path}.tmp{os.getpid()}'
    with contextlib.suppress(OSError):
        with open(tmp, 'w') as f:
            json.dump(record, f)
        os.replace(tmp, path)


def _read_record(folder):
    with contextlib.suppress(OSError, ValueError), open(os.path.join(folder, RECORD_FILE)) as f:
        record = json.load(f)
        return record if isinstance(record, dict) else {}
    return {}


def _signature(path):
    """What changes when another program replaces or edits the file: its size and modification time."""
    with contextlib.suppress(OSError):
        stat = os.stat(path)
        return [stat.st_size if os.path.isfile(path) else 'folder', stat.st_mtime_ns]
    return None


def is_training_log_entry(entry):
    """Whether a line of a log.txt (parsed) is DINO training's: only main_dino logs a weight decay, train_wd."""
    return isinstance(entry, dict) and 'train_wd' in entry


def warn_if_log_shared(folder, training):
    """Warn when folder/log.txt holds the log of another kind of run than this one (training or not), to
    which this run appends its own lines (as the original does)."""
    path = os.path.join(folder, 'log.txt')
    with contextlib.suppress(OSError, ValueError), open(path) as f:
        if is_training_log_entry(json.loads(f.readline())) != training:
            other, this = ('a linear evaluation (eval_linear.py)', 'training') if training else \
                ('DINO training (main_dino.py)', 'evaluation')
            utils.warn(f"{path} holds the log of {other}: this {this} appends its own lines to it and writes its "
                       "TensorBoard events beside that run's; pass another --output_dir to keep them apart")
