"""One writer per output folder, results of different kinds in one folder, and flags a run does not read.

A folder's lock is an flock held by the running process: a second run stops with one line naming the holder,
a killed run's lock ends with it (also while a forked DataLoader worker of it lives on), and a file system that
cannot lock gets a warning. Flags given on the command line that the chosen mode does not read, a --data_limit
above the data, a tiny image enlarged or a huge one in visualize_attention.py: one `warning:` line each.
"""
import argparse
import contextlib
import errno
import json
import os
import signal
import subprocess
import sys

import pytest
import torch
from PIL import Image

import benchmark
import eval_knn
import eval_linear
import eval_video_segmentation
import main_dino
import outputdir
import utils
import video_generation
import visualize_attention
from conftest import REPO, TINY_TRAIN_ARGS, script_env, signal_when_waiting
from test_bad_input import TINY, tree_state


def error_of(module, argv):
    """The one line with which module.main(argv) stops."""
    with pytest.raises(SystemExit) as stop:
        module.main([str(a) for a in argv])
    assert isinstance(stop.value.code, str) and '\n' not in stop.value.code, stop.value.code
    return stop.value.code


def warnings_in(text):
    return [line for line in text.splitlines() if line.startswith('warning:')]


@pytest.fixture(scope='module')
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp('weights') / 'vit_tiny16.pth'
    torch.save(utils.build_backbone('vit_tiny', 16)[0].state_dict(), path)
    return path


# ---------------------------------------------------------------------------------------------
# One writer per output folder
# ---------------------------------------------------------------------------------------------

def test_a_second_training_on_a_folder_in_use_stops_and_leaves_the_first_ones_files_alone(
        tmp_path, small_image_folder, restored_process_state):
    """The first run trains in a linear evaluation's folder, on 11 images with a --data_limit of 50, one iteration
    per epoch; it waits in epoch 1, after writing epoch 0's log line and checkpoints, while a second one starts."""
    out = tmp_path / 'linear'
    out.mkdir()
    linear_log = [json.dumps({'train_loss': 2.3, 'train_lr': 0.01, 'epoch': e, 'test_acc1': 10.0}) for e in (0, 1)]
    (out / 'log.txt').write_text(''.join(line + '\n' for line in linear_log))
    argv = [*TINY_TRAIN_ARGS, '--data_path', small_image_folder / 'train', '--data_limit', '50', '--epochs', '2',
            '--batch_size_per_device', '8', '--local_crops_number', '0', '--local_crops_scale', '0.1', '0.3',
            '--output_dir', out]
    env = script_env({'PYTHONUNBUFFERED': '1', 'DINO_FAULT': 'step:2:wait'})
    seen = {}

    def second_run(proc, line):
        before = tree_state(out)
        seen['error'] = error_of(main_dino, argv)
        seen['pid'], seen['unchanged'] = proc.pid, tree_state(out) == before
        os.kill(proc.pid, signal.SIGTERM)  # the first run then ends epoch 1 and exits 0

    output = signal_when_waiting([sys.executable, REPO / 'main_dino.py', *argv], env, 'DINO_FAULT: wait', second_run)
    assert seen['error'] == (f"error: --output_dir {out} is in use by another run (pid {seen['pid']}, main_dino.py); "
                             "wait for it to end, or pass another --output_dir")
    assert seen['unchanged'] and 'Stopped by SIGTERM after epoch 1' in output
    assert not (out / outputdir.LOCK_FILE).exists()  # removed at the end of the run
    # the run's own warnings: flags it does not read, more images asked for than there are, another run's log
    assert warnings_in(output) == [
        'warning: --local_crops_scale, --local_crops_size have no effect with --local_crops_number 0',
        'warning: --data_limit 50 is more than the 11 images there are: all 11 are used',
        f"warning: {out / 'log.txt'} holds the log of a linear evaluation (eval_linear.py): this training appends "
        "its own lines to it and writes its TensorBoard events beside that run's; pass another --output_dir to keep "
        "them apart"]
    lines = (out / 'log.txt').read_text().splitlines()
    assert lines[:2] == linear_log and [json.loads(line)['epoch'] for line in lines[2:]] == [0, 1]


HOLDER = """
import argparse, os, sys, time
import outputdir
lock = outputdir.only_writer(argparse.Namespace(output_dir=sys.argv[1]), 'output_dir')
lock.__enter__()
worker = os.fork()  # as a DataLoader worker: it inherits the lock's file descriptor
if worker == 0:
    time.sleep(600)
print(worker, flush=True)
time.sleep(600)
"""


def test_a_killed_runs_lock_does_not_block_the_next_run_even_while_its_worker_lives(tmp_path):
    holder = subprocess.Popen([sys.executable, '-c', HOLDER, tmp_path], cwd=REPO, env=script_env(),
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        worker = int(holder.stdout.readline())
        folder = argparse.Namespace(output_dir=str(tmp_path))
        with pytest.raises(SystemExit, match=rf'is in use by another run \(pid {holder.pid}, -c\)'):
            with outputdir.only_writer(folder, 'output_dir'):
                pass
        holder.kill()
        holder.wait(timeout=60)
        os.kill(worker, 0)  # still alive
        with outputdir.only_writer(folder, 'output_dir'):
            assert (tmp_path / outputdir.LOCK_FILE).read_text() == f'pid {os.getpid()}, {os.path.basename(sys.argv[0])}'
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(holder.pid, signal.SIGKILL)
        holder.wait(timeout=60)
    assert not (tmp_path / outputdir.LOCK_FILE).exists()


def test_every_script_that_writes_a_folder_takes_its_lock(tmp_path, restored_process_state):
    out = tmp_path / 'out'
    runs = {main_dino: [*TINY_TRAIN_ARGS, '--output_dir', out],
            eval_linear: [*TINY, '--data_path', 'synthetic', '--output_dir', out],
            eval_knn: [*TINY, '--data_path', 'synthetic', '--dump_tb_events', tmp_path / 'tb', '--dump_features', out],
            eval_video_segmentation: [*TINY, '--data_path', tmp_path, '--output_dir', out],
            visualize_attention: [*TINY, '--output_dir', out],
            video_generation: [*TINY, '--input_path', tmp_path, '--output_path', out]}
    with outputdir.only_writer(argparse.Namespace(output_dir=str(out)), 'output_dir'):
        before = tree_state(tmp_path)
        for module, argv in runs.items():
            flag = '--output_path' if module is video_generation else '--dump_features' if module is eval_knn \
                else '--output_dir'
            assert error_of(module, argv).startswith(f'error: {flag} {out} is in use by another run (pid {os.getpid()}')
        assert tree_state(tmp_path) == before


def test_a_file_system_that_cannot_lock_gets_a_warning_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    def refuse(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))
    monkeypatch.setattr(outputdir.fcntl, 'flock', refuse)
    with outputdir.only_writer(argparse.Namespace(output_dir=str(tmp_path / 'new')), 'output_dir'):
        (tmp_path / 'new' / 'result.txt').write_text('written')
    assert warnings_in(capsys.readouterr().err) == [
        f"warning: cannot lock --output_dir {tmp_path / 'new'} (No locks available): this file system does not "
        "support file locks, so a second run writing there at the same time would not be stopped"]
    assert os.listdir(tmp_path / 'new') == ['result.txt']


# ---------------------------------------------------------------------------------------------
# Results of different kinds in one folder, and flags that are not read
# ---------------------------------------------------------------------------------------------

def test_a_linear_evaluation_into_a_training_folder_warns(tmp_path, weights, restored_process_state, capsys):
    out = tmp_path / 'training'
    out.mkdir()
    training_line = json.dumps({'train_loss': 6.9, 'train_lr': 0.001, 'train_wd': 0.04, 'epoch': 0})
    (out / 'log.txt').write_text(training_line + '\n')
    eval_linear.main([*TINY, '--pretrained_weights', str(weights), '--data_path', 'synthetic', '--data_limit', '10',
                      '--num_labels', '10', '--epochs', '1', '--batch_size_per_device', '10', '--num_workers', '0',
                      '--output_dir', str(out)])
    assert warnings_in(capsys.readouterr().err) == [
        f"warning: {out / 'log.txt'} holds the log of DINO training (main_dino.py): this evaluation appends its own "
        "lines to it and writes its TensorBoard events beside that run's; pass another --output_dir to keep them apart"]
    lines = (out / 'log.txt').read_text().splitlines()
    assert lines[0] == training_line and 'test_acc1' in json.loads(lines[1])


def test_benchmark_step_mode_names_the_flags_it_does_not_read(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(benchmark, 'benchmark_step', lambda args: {})  # the flags are read before it runs
    benchmark.main(['--arch', 'vit_tiny', '--device', 'cpu', '--batch_size_per_device', '2', '--global_crops_size',
                    '32', '--local_crops_number', '0', '--out_dim', '64', '--steps', '1', '--warmup_steps', '0',
                    '--json', '--epochs', '20', '--data_path', str(tmp_path / 'none'), '--output_dir',
                    str(tmp_path / 'out')])
    assert warnings_in(capsys.readouterr().err) == [
        "warning: --data_path, --output_dir, --epochs have no effect in --mode step (it times training steps on "
        "crops made in memory, at the schedules' steady state, and writes nothing)"]
    assert os.listdir(tmp_path) == []


def test_shared_flags_off_their_device_and_the_default_workers_capped_at_the_cores(monkeypatch, capsys):
    monkeypatch.setattr(os, 'sched_getaffinity', lambda pid: {0, 1, 2})
    parser = argparse.ArgumentParser(parents=[main_dino.get_args_parser()])

    workers = TINY_TRAIN_ARGS.index('--num_workers')
    default_workers = TINY_TRAIN_ARGS[:workers] + TINY_TRAIN_ARGS[workers + 2:]

    def parse(*argv):
        return utils.parse_checked_args(parser, main_dino.check_args, [*default_workers, *argv], main_dino.unread_flags)
    assert parse('--device', 'cpu', '--lazy_mode', 'false', '--use_fp16', 'true').num_workers == 3
    out, err = capsys.readouterr()
    assert out == ('--num_workers: the default 10 is capped at the 3 CPU cores available '
                   '(pass --num_workers to choose)\n')
    assert warnings_in(err) == ['warning: --lazy_mode has no effect off HPU',
                                'warning: --use_fp16 has no effect off CUDA (fp16 with a gradient scaler is the CUDA '
                                'path; see --autocast)']
    assert parse('--num_workers', '10').num_workers == 10
    assert capsys.readouterr().out == ''


# ---------------------------------------------------------------------------------------------
# visualize_attention.py: a tiny image enlarged, and a huge --image_size
# ---------------------------------------------------------------------------------------------

def test_visualize_attention_warns_of_an_enlarged_image_and_of_many_tokens_and_shows_progress(
        tmp_path, weights, monkeypatch, capsys):
    Image.new('RGB', (2, 2), (200, 30, 30)).save(tmp_path / 'tiny.png')
    monkeypatch.setattr(visualize_attention, 'LARGE_TOKENS', 500)  # instead of 10,000: the test stays fast
    visualize_attention.main([*TINY, '--pretrained_weights', str(weights), '--image_path', str(tmp_path / 'tiny.png'),
                              '--image_size', '480', '--output_dir', str(tmp_path / 'out')])
    err = capsys.readouterr().err
    assert warnings_in(err) == [
        'warning: the image is 2x2 pixels: --image_size enlarges it 240 times (to 480x480), so its attention maps show '
        'little of it; pass a larger image or a smaller --image_size',
        'warning: --image_size 480 makes 901 tokens (patch 16): about 14 MiB of memory, and 1 times the attention '
        'work of --image_size 480 480 (it grows with the square of the tokens); progress is shown block by block']
    assert 'Attention blocks: 100%' in err and '11/11' in err
    assert (tmp_path / 'out' / 'attn-head2.png').is_file()


def test_visualize_attention_refuses_a_size_beyond_the_memory(tmp_path, weights, monkeypatch):
    monkeypatch.setattr(visualize_attention, 'LARGE_TOKENS', 100)
    monkeypatch.setattr(visualize_attention, 'memory_available', lambda device: 2 ** 28)
    message = error_of(visualize_attention, [*TINY, '--pretrained_weights', weights, '--image_size', '3000', '3200',
                                             '--output_dir', tmp_path / 'out'])
    assert message == ('error: --image_size 3000 3200 makes 37,401 tokens (patch 16), whose forward pass needs about '
                       '582 MiB, more than the 256 MiB of the cpu; pass a smaller --image_size')
    assert os.listdir(tmp_path) == []
