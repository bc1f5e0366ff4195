"""Shared test helpers: run the repository's scripts as a user would, and a tiny trained checkpoint."""
import builtins
import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

if os.environ.get('PYTEST_XDIST_WORKER'):
    torch.set_num_threads(1)

# Small, fast settings for a vit_tiny DINO run on the built-in synthetic data.
TINY_TRAIN_ARGS = [
    '--arch', 'vit_tiny', '--patch_size', '16', '--data_path', 'synthetic',
    '--global_crops_size', '64', '--local_crops_size', '32', '--local_crops_number', '2',
    '--out_dim', '1024', '--batch_size_per_device', '16', '--num_workers', '0',
    '--warmup_epochs', '0', '--lr', '0.002', '--device', 'cpu',
]


def script_env(extra=None):
    env = dict(os.environ)
    env['PYTHONPATH'] = str(REPO) + os.pathsep + env.get('PYTHONPATH', '')
    # one thread per process: the suite runs two test workers on two cores (pytest -n 2), and OpenMP
    # threads competing for a busy core slow tiny models down tenfold
    env.setdefault('OMP_NUM_THREADS', '1')
    env.update(extra or {})
    return env


def run_script(script, *args, env=None, timeout=300, check=True, cwd=None):
    """Run `python <script> args...` from the repository; return the CompletedProcess (text output)."""
    cmd = [sys.executable, str(REPO / script), *map(str, args)]
    proc = subprocess.run(cmd, cwd=cwd or REPO, env=script_env(env), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def run_torchrun(script, nproc, *args, env=None, timeout=300, check=True):
    """Run a script under `torchrun --standalone --nproc_per_node nproc` (gloo on CPU)."""
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}',
           str(REPO / script), *map(str, args)]
    proc = subprocess.run(cmd, cwd=REPO, env=script_env({'OMP_NUM_THREADS': '1', **(env or {})}),
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"torchrun {script} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-3000:]}")
    return proc


def read_until(proc, marker, timeout):
    """proc's output up to and including the first line starting with `marker` (fails after `timeout` s)."""
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout] + [lines.put(None)],
                     daemon=True).start()
    output, deadline = '', time.monotonic() + timeout
    while True:
        try:
            line = lines.get(timeout=max(deadline - time.monotonic(), 0))
        except queue.Empty:
            line = None
        if line is None:
            raise AssertionError(f"no line starting with {marker!r} within {timeout} s:\n{output[-3000:]}")
        output += line
        if line.startswith(marker):
            return output, lines


def signal_when_waiting(cmd, env, marker, send, timeout=300):
    """Run cmd in its own process group until it prints a line starting with `marker` (a DINO_FAULT wait),
    call send(proc, that line), and return all its output once it has exited with status 0."""
    proc = subprocess.Popen(list(map(str, cmd)), cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, lines = read_until(proc, marker, timeout)
        send(proc, output.splitlines()[-1])
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
    while (line := lines.get(timeout=60)) is not None:
        output += line
    return output


@contextlib.contextmanager
def process_state_kept():
    """Put back what main() of the training and evaluation scripts changes in this process: the signal handlers
    and the print for rank 0 they install."""
    import checkpoints
    handlers = {signum: signal.getsignal(signum) for signum in checkpoints.StopSignal.SIGNALS}
    saved_print = builtins.print
    try:
        yield
    finally:
        builtins.print = saved_print
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


@pytest.fixture(autouse=True)
def run_device_kept():
    """setup_device resolves the process's device once per run: every test starts from the same (the CPU's)."""
    import utils
    saved = utils._run_device
    yield
    utils._run_device = saved


@pytest.fixture
def restored_process_state():
    with process_state_kept():
        yield


@pytest.fixture(scope='module')
def small_image_folder(tmp_path_factory):
    """train/ (11 images) and val/ (7 images) ImageFolders of 2 classes: odd sizes on purpose."""
    import imagedata
    root = tmp_path_factory.mktemp('folder')
    shapes = imagedata.SyntheticShapes('train', image_size=48)
    for split, count in (('train', 11), ('val', 7)):
        for i in range(count):
            label = i % 2
            folder = root / split / f'class{label}'
            folder.mkdir(parents=True, exist_ok=True)
            shapes.render(100 * (split == 'val') + i).save(folder / f'{i:03d}.png')
    return root


@pytest.fixture(scope='session')
def tiny_dino_checkpoint(tmp_path_factory):
    """A vit_tiny/16 DINO checkpoint trained briefly on synthetic data (shared by the evaluation tests)."""
    out = tmp_path_factory.mktemp('tiny_dino')
    run_script('main_dino.py', *TINY_TRAIN_ARGS, '--epochs', '1', '--data_limit', '64',
               '--output_dir', out, timeout=600)
    return out / 'checkpoint.pth'
