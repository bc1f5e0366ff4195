"""Faults of a long multi-process run: a killed rank restarted by torchrun, a full disk, a dead loader worker.

Faults are injected through checkpoints.fault_point (DINO_FAULT), at chosen iterations and checkpoint writes.
"""
import argparse
import builtins
import json
import signal

import pytest

import checkpoints
import main_dino
import utils
from conftest import run_torchrun
from test_bad_input import tree_state
from test_robustness import RUN_ARGS, assert_same_run

# 2 epochs of 4 iterations on 2 processes (4 images each per iteration)
TWO_PROCESS_ARGS = [*RUN_ARGS, '--batch_size_per_device', '4', '--epochs', '2']


def test_rank_killed_mid_epoch_is_restarted_by_torchrun_and_ends_as_the_uninterrupted_run(tmp_path):
    """Rank 1 is SIGKILLed after iteration 3 of epoch 0; checkpoint.pth was written after iteration 2."""
    reference, out = tmp_path / 'reference', tmp_path / 'restarted'
    run_torchrun('main_dino.py', 2, *TWO_PROCESS_ARGS, '--output_dir', reference, timeout=240)
    # torchrun reads its --max_restarts from PET_MAX_RESTARTS; the fault fires in the first attempt only
    proc = run_torchrun('main_dino.py', 2, *TWO_PROCESS_ARGS, '--num_workers', '1', '--saveckp_every_iters', '2',
                        '--output_dir', out, env={'PET_MAX_RESTARTS': '1', 'DINO_FAULT': 'step:3:kill:1'},
                        timeout=240)
    output = proc.stdout + proc.stderr
    assert 'DINO_FAULT: kill at step 3' in output
    assert 'error: process 0 lost contact with the other processes of the job' in proc.stderr
    assert 'Resuming epoch 0 at iteration 2/4' in proc.stdout  # the restart, from the mid-epoch checkpoint
    assert_same_run(out, reference, epochs=2)


@pytest.fixture
def train_here(monkeypatch):
    """Run main_dino in this process (no start-up cost), as its command line would; restore what it changes."""
    handlers = {signum: signal.getsignal(signum) for signum in (*checkpoints.StopSignal.SIGNALS, signal.SIGCHLD)}
    monkeypatch.setattr(builtins, 'print', builtins.print)

    def train(out, *extra, fault=''):
        monkeypatch.setenv('DINO_FAULT', fault)
        checkpoints._fault_counts.clear()
        parser = argparse.ArgumentParser(parents=[main_dino.get_args_parser()])
        args = parser.parse_args(list(map(str, [*RUN_ARGS, '--epochs', '2', '--output_dir', out, *extra])))
        main_dino.check_args(args)
        out.mkdir(exist_ok=True)
        try:
            with pytest.raises(SystemExit) as stop:
                utils.run_reporting_failures(main_dino.train_dino, args)
        finally:  # torch's DataLoader leaves a SIGCHLD handler that would raise for its dead worker
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
        return str(stop.value)

    return train


def checkpoint_position(out):
    checkpoint = utils.load_checkpoint_or_exit(out / 'checkpoint.pth')
    return checkpoint['epoch'], checkpoint.get('step', 0)


def logged_epochs(out):
    return [json.loads(line)['epoch'] for line in (out / 'log.txt').read_text().splitlines()]


def test_a_full_disk_stops_the_run_and_keeps_the_last_checkpoint(train_here, tmp_path):
    """ENOSPC in the end-of-epoch write, then (resumed) in the mid-epoch write; then the run completes."""
    # saves: checkpoint.pth at iteration 2 (1), after epoch 0 checkpoint0000.pth (2) and checkpoint.pth (3)
    message = train_here(tmp_path, '--saveckp_every_iters', '2', fault='save:3:enospc')
    assert message.startswith(f"error: cannot write checkpoint {tmp_path / 'checkpoint.pth'} "
                              "(No space left on device): it needs about ")
    assert f'MiB in {tmp_path}, which has ' in message and '\n' not in message
    assert checkpoint_position(tmp_path) == (0, 2)  # the mid-epoch one before it
    assert not list(tmp_path.glob('*.tmp*'))

    # resumed: checkpoint0000.pth (1), checkpoint.pth (2) after epoch 0, then iteration 2 of epoch 1 (3)
    message = train_here(tmp_path, '--saveckp_every_iters', '2', fault='save:3:enospc')
    assert message.startswith(f"error: cannot write checkpoint {tmp_path / 'checkpoint.pth'} (No space")
    assert checkpoint_position(tmp_path) == (1, 0)
    assert not list(tmp_path.glob('*.tmp*')) and logged_epochs(tmp_path) == [0]


def test_a_killed_loader_worker_stops_the_run_with_one_line(train_here, tmp_path):
    """The out-of-memory killer takes a DataLoader worker at iteration 2 of epoch 1."""
    message = train_here(tmp_path, '--num_workers', '1', fault='step:6:kill_worker')
    assert message.startswith('error: data loading worker (pid ') and '\n' not in message
    assert 'of process 0 ' in message and 'lower --num_workers' in message
    assert checkpoint_position(tmp_path) == (1, 0) and logged_epochs(tmp_path) == [0]


def test_a_write_failing_inside_torch_save_stops_with_one_line_and_keeps_the_last_checkpoint(train_here, tmp_path):
    """A real failure of the file system inside torch.save's writer (torch turns it into a RuntimeError of its own):
    a file-size limit (RLIMIT_FSIZE: EFBIG, as a full disk gives ENOSPC) far below a checkpoint's size."""
    import resource
    train_here(tmp_path, '--saveckp_every_iters', '2', fault='save:2:enospc')  # checkpoint.pth at iteration 2
    before = tree_state(tmp_path)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (2 ** 20, hard))
    try:
        message = train_here(tmp_path, '--saveckp_every_iters', '2')  # resumed; then the end of epoch 0's write
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert message.startswith(f"error: cannot write checkpoint {tmp_path / 'checkpoint0000.pth'} (File too large): "
                              "it needs about ") and '\n' not in message
    after = tree_state(tmp_path)
    assert after['checkpoint.pth'] == before['checkpoint.pth'] and 'checkpoint0000.pth' not in after
    assert not list(tmp_path.glob('*.tmp*'))


def test_a_second_ctrl_c_inside_a_checkpoint_write_exits_130_with_one_line(train_here, tmp_path, capfd):
    """Ctrl-C twice during the end-of-epoch write (checkpoint0000.pth): the mid-epoch checkpoint.pth stays."""
    message = train_here(tmp_path, '--saveckp_every_iters', '2', fault='save:2:interrupt')
    assert message == '130'
    err = capfd.readouterr().err
    assert 'Interrupted again: stopping now' in err and 'Traceback' not in err and 'RuntimeError' not in err
    assert checkpoint_position(tmp_path) == (0, 2) and not (tmp_path / 'checkpoint0000.pth').exists()
    assert not list(tmp_path.glob('*.tmp*'))
