"""Training checkpoints: atomic writes, resume (falling back to an intact numbered checkpoint), RNG state,
and the stop signals that end a run at a checkpoint, with the fault hook the robustness tests drive them with.
Used by main_dino, eval_linear and eval_knn; checked reads of checkpoint files are utils' (the evaluations
share them)."""
import atexit
import contextlib
import errno
import hashlib
import multiprocessing
import os
import random
import re
import shutil
import signal
import sys
import time
from collections import defaultdict

import numpy as np
import torch

import utils


def save_on_master(*args, **kwargs):
    if utils.is_main_process():
        save_checkpoint(*args, **kwargs)


def save_checkpoint(obj, path):
    """Write to a temporary file in the same folder, flush it to disk, then rename it into place.

    A kill or a full disk during the write leaves the previous file at `path` intact.
    A write that fails (a full disk, a quota, an I/O error) stops the run with one line saying how
    much space the checkpoint needs, rather than letting it train on without checkpoints.
    """
    tmp_path = f"{path}.tmp{os.getpid()}"
    failure = None
    try:
        with open(tmp_path, 'wb') as f:
            writer = _Writer(f)
            try:
                torch.save(obj, writer)
            except Exception:
                if writer.error is None:
                    raise
                # torch reports what its writer raised as a RuntimeError of its own (inline_container.cc)
                raise writer.error from None
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except OSError as exc:
        failure = exc
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp_path)
    if failure is not None:
        utils.fail(_write_failure_message(failure, obj, path))
    _fsync_folder(os.path.dirname(os.path.abspath(path)))


class _Writer:
    """The file object torch.save writes a checkpoint through: it keeps the OSError of a failed write (a full
    disk), which torch would report as its own RuntimeError, and holds the fault point of the tests, where a
    write fails in earnest (DINO_FAULT=save:...: the first write of a checkpoint)."""

    def __init__(self, f):
        self.f, self.error, self.writes = f, None, 0

    def write(self, data):
        self.writes += 1
        try:
            if self.writes == 1:
                fault_point('save')
            return self.f.write(data)
        except BaseException as exc:  # also the SystemExit of a second Ctrl-C
            self.error = exc
            raise

    def flush(self):
        self.f.flush()


def _write_failure_message(exc, obj, path):
    folder = os.path.dirname(os.path.abspath(path))
    space = f"it needs about {_tensor_bytes(obj) / 2 ** 20:.1f} MiB in {folder}"
    with contextlib.suppress(OSError):
        space += f", which has {shutil.disk_usage(folder).free / 2 ** 20:.1f} MiB free"
    return (f"cannot write checkpoint {path} ({exc.strerror or exc}): {space}. Any earlier checkpoint there is "
            "intact; free some space and run the same command to resume from it")


def _tensor_bytes(obj):
    """Bytes of the tensors in a (nested) state dict: close to the size of its checkpoint file."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(map(_tensor_bytes, obj.values()))
    if isinstance(obj, (list, tuple)):
        return sum(map(_tensor_bytes, obj))
    return 0


def _fsync_folder(folder):
    """Make a rename durable (POSIX); a no-op where folders cannot be opened."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def file_digest(path):
    """sha256 (hex) of a file's bytes: the identity of a checkpoint, whatever its name or folder."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 22), b''):
            digest.update(block)
    return digest.hexdigest()


def to_cpu(obj):
    """Copy of a (nested) state dict with every tensor on the CPU and NumPy numbers as Python ones."""
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


DEFAULT_MISMATCH_HINT = "was it written with another --arch, --patch_size, --out_dim or optimizer?"


def _load_state_dict_or_fail(module, state_dict, what, path, hint=DEFAULT_MISMATCH_HINT):
    try:
        return module.load_state_dict(state_dict, strict=False)
    except TypeError:
        return module.load_state_dict(state_dict)
    except (RuntimeError, ValueError, KeyError) as exc:
        detail = str(exc).strip().splitlines()
        detail = next((line.strip() for line in detail if 'size mismatch' in line), detail[0] if detail else '')
        utils.fail(f"{path} does not fit this run's {what} ({detail[:200]}); {hint} "
                   "Use a matching setting or another --output_dir")


def restart_from_checkpoint(ckp_path, run_variables=None, mismatch_hint=DEFAULT_MISMATCH_HINT, **kwargs):
    """Load each named object (model, optimizer, ...) from the checkpoint if present, and run_variables.

    A damaged checkpoint is reported and the newest intact numbered one beside it (checkpoint0042.pth
    for checkpoint.pth) is used instead; without one the run stops. Unsafe files are always refused.
    `mismatch_hint` names the flags that could make a state dict not fit (in the error line).
    Returns the path actually loaded, or None when there is no checkpoint.
    """
    if utils.is_main_process():
        _remove_interrupted_writes(ckp_path)
    if os.path.isfile(ckp_path):
        checkpoint, ckp_path = _read_checkpoint_or_fallback(ckp_path)
    elif os.path.isdir(os.path.dirname(ckp_path) or '.') and numbered_checkpoints(ckp_path):
        # deleted, or never copied back: the numbered checkpoints are this run's, never to be started over
        checkpoint, ckp_path = _newest_intact_numbered(ckp_path, f"{ckp_path} is missing")
    else:
        return None
    print(f"Found checkpoint at {ckp_path}")
    for key, value in kwargs.items():
        if value is None:
            continue
        if key in checkpoint:
            msg = _load_state_dict_or_fail(value, checkpoint[key], key, ckp_path, mismatch_hint)
            print(f"=> loaded '{key}' from checkpoint '{ckp_path}' with msg {msg}")
        else:
            print(f"=> key '{key}' not found in checkpoint: '{ckp_path}'")
    if run_variables is not None:
        for name in run_variables:
            if name in checkpoint:
                run_variables[name] = checkpoint[name]
    return ckp_path


def numbered_checkpoints(ckp_path):
    """The checkpoints kept beside `ckp_path` (checkpointNNNN.pth for checkpoint.pth), newest first."""
    folder, name = os.path.split(ckp_path)
    stem, dot, ext = name.partition('.')
    pattern = re.compile(rf"{re.escape(stem)}(\d+){re.escape(dot + ext)}")
    found = [(int(m.group(1)), m.group(0)) for m in map(pattern.fullmatch, os.listdir(folder or '.')) if m]
    return [os.path.join(folder, f) for _, f in sorted(found, reverse=True)]


def _read_checkpoint_or_fallback(ckp_path):
    try:
        return utils.read_checkpoint(ckp_path), ckp_path
    except utils.CheckpointError as exc:
        if exc.unsafe:
            utils.fail(str(exc))
        damage = str(exc)
    return _newest_intact_numbered(ckp_path, damage)


def _newest_intact_numbered(ckp_path, damage):
    """The newest intact numbered checkpoint beside `ckp_path` (loaded) and its path; stops with one line
    (`damage`: what is wrong with ckp_path) when there is none."""
    for candidate in numbered_checkpoints(ckp_path):
        try:
            checkpoint = utils.read_checkpoint(candidate)
        except utils.CheckpointError as exc:
            if exc.unsafe:
                utils.fail(str(exc))
            print(f"warning: {exc}")
            continue
        print(f"warning: {damage}. Resuming from {candidate} instead, the newest intact numbered checkpoint")
        return checkpoint, candidate
    utils.fail(f"{damage}, and no intact numbered checkpoint was found beside it to resume from; "
               "move the checkpoints away to start from scratch, or use another --output_dir")


def _remove_interrupted_writes(ckp_path):
    """Delete temporary files that a killed save_checkpoint left beside `ckp_path`."""
    folder, name = os.path.split(ckp_path)
    stem, dot, ext = name.partition('.')
    pattern = re.compile(rf"{re.escape(stem)}\d*{re.escape(dot + ext)}\.tmp\d+")
    if os.path.isdir(folder or '.'):
        for leftover in filter(pattern.fullmatch, os.listdir(folder or '.')):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, leftover))


def rng_state():
    """Python, NumPy and torch (CPU, and the current CUDA device) random states, storable weights-only."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {'python': random.getstate(), 'torch': torch.get_rng_state(),
             'numpy': (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    """Restore what rng_state() returned."""
    random.setstate(state['python'])
    kind, keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state['cuda'])


# =====================================================================================
# Stopping on signals and the fault hook of the fault tests (main_dino)
# =====================================================================================

class StopSignal:
    """Turns SIGTERM and SIGUSR1 (what SLURM and Kubernetes send before preempting) and SIGINT (Ctrl-C)
    into a stop request.

    The training loop asks `requested(device)` at step boundaries, so it can finish the step, write a
    checkpoint and exit (0, or 130 after Ctrl-C) instead of dying mid-step or mid-write. A second Ctrl-C
    stops at once (exit 130); a checkpoint write it cuts short leaves the previous checkpoint intact.
    """
    SIGNALS = tuple(getattr(signal, name) for name in ('SIGTERM', 'SIGUSR1', 'SIGINT') if hasattr(signal, name))

    def __init__(self):
        self.received = None
        for signum in self.SIGNALS:
            signal.signal(signum, self._remember)
        atexit.register(_kill_data_workers)

    def _remember(self, signum, frame):
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            utils.print_on_every_process("Interrupted again: stopping now, without a new checkpoint; the last one "
                                         "written is kept. Run the same command to resume from it.",
                                         file=sys.stderr, flush=True)
            raise SystemExit(130)
        self.received = signum

    @property
    def exit_code(self):
        """What the process should exit with once it stopped: 130 after Ctrl-C (as shells do), else 0."""
        return 130 if self.received == signal.SIGINT else 0

    def __str__(self):
        return signal.Signals(self.received).name if self.received else 'a signal to another process'

    def requested(self, device):
        """True on every process once any of them got a signal (a collective when distributed)."""
        if not utils.is_dist_avail_and_initialized():
            return self.received is not None
        flag = torch.tensor([0. if self.received is None else 1.], device=device)
        return utils.all_reduce(flag).item() > 0

    @staticmethod
    def ignore_in_worker(worker_id=None):
        """DataLoader worker_init_fn: workers leave the stop signals to the training process."""
        for signum in StopSignal.SIGNALS:
            signal.signal(signum, signal.SIG_IGN)


def _kill_data_workers():
    """At exit, end DataLoader workers still running (after a crash): they ignore the SIGTERM with which
    multiprocessing would stop them, and would hold the exit forever."""
    if hasattr(signal, 'SIGCHLD'):
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # else torch reports the kill as a worker failure
    for child in multiprocessing.active_children():
        child.kill()


_fault_counts = defaultdict(int)


def fault_point(name):
    """Test hook: with DINO_FAULT=<name>:<n>:<action>[:<rank>], fail the n-th time this process gets here.

    Actions: kill (SIGKILL itself), hang (sleep until killed), wait (until a stop signal arrives, then go
    on), enospc (raise the OSError of a full disk), interrupt (Ctrl-C twice: SIGINT to itself, twice) or
    kill_worker (SIGKILL a DataLoader worker of this process, as the out-of-memory killer would). A fault fires only in the first attempt of a job that
    torchrun restarts. Used by the robustness tests to kill or stop a run at a chosen iteration or inside a
    checkpoint write, and to make one process of a job hang.
    """
    spec = os.environ.get('DINO_FAULT', '').split(':')
    if spec[0] != name or (len(spec) > 3 and int(spec[3]) != utils.get_rank()):
        return
    _fault_counts[name] += 1
    if _fault_counts[name] != int(spec[1]) or os.environ.get('TORCHELASTIC_RESTART_COUNT', '0') != '0':
        return
    if spec[2] == 'wait':
        _wait_for_stop_signal(f"DINO_FAULT: wait at {name} {spec[1]} (pid {os.getpid()})")
        return
    _inject_fault(spec[2], f"{spec[2]} at {name} {spec[1]}")


def _inject_fault(action, description):
    utils.print_on_every_process(f"DINO_FAULT: {description}", flush=True)
    if action == 'kill':
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == 'enospc':
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    elif action == 'interrupt':
        signal.raise_signal(signal.SIGINT)
        signal.raise_signal(signal.SIGINT)
    elif action == 'kill_worker':
        os.kill(multiprocessing.active_children()[0].pid, signal.SIGKILL)
    else:  # hang, until the launcher ends this process
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        while True:
            time.sleep(60)


def _wait_for_stop_signal(announcement):
    """Print `announcement`, then sleep until SIGTERM or SIGUSR1 arrives; the handlers in place run as usual."""
    arrived = []
    handlers = {signum: signal.getsignal(signum) for signum in StopSignal.SIGNALS}

    def note(signum, frame):
        arrived.append(signum)
        if callable(handlers[signum]):
            handlers[signum](signum, frame)
    for signum in handlers:  # before the announcement: a signal sent as soon as it is read is not lost
        signal.signal(signum, note)
    utils.print_on_every_process(announcement, flush=True)
    while not arrived:
        time.sleep(0.05)
    for signum, handler in handlers.items():
        signal.signal(signum, handler)
