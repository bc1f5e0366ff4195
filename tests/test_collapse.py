"""Collapse monitors: the teacher's entropy, the teacher-student KL and the top dimension's mass, and the warning.

The 2-process figures are checked by tests/dist_check.py (run from test_core).
"""
import argparse
import json
import math

import numpy as np
import pytest
import torch

import main_dino
from conftest import TINY_TRAIN_ARGS, run_script


def reference_figures(student, teacher, center, ncrops, student_temp, teacher_temp):
    """Mean entropy of the teacher rows, mean KL(teacher || student) over the loss's pairs, top-dimension
    mass: in float64, pair by pair."""
    student, teacher, center = (t.double().numpy() for t in (student, teacher, center))
    batch = len(teacher) // 2

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    log_q = log_softmax((teacher - center) / teacher_temp).reshape(2, batch, -1)
    log_p = log_softmax(student / student_temp).reshape(ncrops, batch, -1)
    q = np.exp(log_q)
    entropy = -(q * log_q).sum(-1).mean()
    kls = [(q[iq] * (log_q[iq] - log_p[v])).sum(-1).mean() for iq in range(2) for v in range(ncrops) if v != iq]
    mass = q.sum(axis=(0, 1))
    return entropy, np.mean(kls), mass.max() / mass.sum()


@pytest.mark.parametrize('case', ['random', 'uniform', 'one_hot'])
def test_figures_against_float64_computation(case):
    ncrops, batch, dim = 4, 3, 64
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(ncrops * batch, dim, generator=generator)
    teacher = torch.randn(2 * batch, dim, generator=generator)
    if case == 'uniform':
        teacher = torch.full((2 * batch, dim), 0.3)
    elif case == 'one_hot':  # each teacher row puts all its mass on one dimension; dimension 5 takes half the rows
        teacher = torch.zeros(2 * batch, dim)
        teacher[torch.arange(2 * batch), torch.tensor([5, 5, 5, 7, 8, 9])] = 10.
    loss_fn = main_dino.DINOLoss(dim, ncrops, 0.04, 0.04, 0, 1)
    loss_fn.center = torch.randn(1, dim, generator=generator) * 0.01 if case == 'random' else torch.zeros(1, dim)
    expected = reference_figures(student, teacher, loss_fn.center, ncrops, 0.1, 0.04)

    loss = loss_fn(student, teacher, 0)
    entropy, kl, top_mass = loss_fn.figures.tolist()
    assert main_dino.DINOLoss.FIGURES == ('teacher_entropy', 'teacher_student_kl', 'teacher_top_mass')
    assert entropy == pytest.approx(expected[0], rel=1e-5, abs=1e-6)
    assert kl == pytest.approx(expected[1], rel=1e-5, abs=1e-5)
    assert kl == pytest.approx(loss.item() - entropy, abs=1e-6)
    assert top_mass == pytest.approx(expected[2], rel=1e-6)
    if case == 'uniform':
        assert entropy == pytest.approx(math.log(dim), rel=1e-6) and top_mass == pytest.approx(1 / dim)
    if case == 'one_hot':
        assert entropy == pytest.approx(0, abs=1e-6) and top_mass == pytest.approx(0.5)


def train_tiny(tmp_path, *extra):
    """A few seconds of the quick start's recipe, shrunk (32/16-pixel crops), with a short collapse window."""
    args = [*TINY_TRAIN_ARGS, '--global_crops_size', '32', '--local_crops_size', '16', '--batch_size_per_device', '8',
            '--data_limit', '64', '--epochs', '1', '--lr', '0.01', '--momentum_teacher', '0.99',
            '--freeze_last_layer', '0', '--collapse_window', '5', '--output_dir', tmp_path, *extra]
    proc = run_script('main_dino.py', *args, timeout=300)
    log = [json.loads(line) for line in (tmp_path / 'log.txt').read_text().splitlines()]
    return proc.stdout, log


def test_uniform_collapse_warns_once_and_a_sharp_teacher_does_not(tmp_path):
    # too little sharpening: a teacher temperature above the paper's stable range (0.04-0.07)
    stdout, log = train_tiny(tmp_path / 'hot', '--warmup_teacher_temp', '0.1', '--teacher_temp', '0.1')
    warnings = [line for line in stdout.splitlines() if 'Warning: collapse' in line]
    assert len(warnings) == 1, stdout
    assert "outputs are becoming uniform" in warnings[0] and '--teacher_temp' in warnings[0]
    assert 'teacher_entropy:' in stdout and 'teacher_student_kl:' in stdout and 'teacher_top_mass:' in stdout
    assert [entry['epoch'] for entry in log] == [0]
    assert all(entry['train_teacher_entropy'] > 0.95 * math.log(1024) for entry in log)
    for entry in log:
        assert entry['train_teacher_student_kl'] == pytest.approx(
            entry['train_loss'] - entry['train_teacher_entropy'], abs=1e-5)
    assert 1 / 1024 <= log[-1]['train_teacher_top_mass'] < 0.01

    stdout, log = train_tiny(tmp_path / 'sharp', '--warmup_teacher_temp', '0.01', '--teacher_temp', '0.01')
    assert 'outputs are becoming uniform' not in stdout
    assert all(entry['train_teacher_entropy'] < 0.8 * math.log(1024) for entry in log)


@pytest.mark.parametrize('flags', [['--collapse_margin', '0.7'], ['--collapse_window', '-1']])
def test_bad_collapse_flags_are_one_clear_line(flags):
    args = main_dino.get_args_parser().parse_args(['--data_path', 'synthetic', *flags])
    with pytest.raises(SystemExit, match=f'error: .*{flags[0]}'):
        main_dino.check_args(args)


def test_collapse_watch_modes_window_and_warm_ups(capsys):
    args = argparse.Namespace(collapse_window=3, collapse_margin=0.1, out_dim=1024, warmup_epochs=1,
                              warmup_teacher_temp_epochs=0, teacher_temp=0.04, warmup_teacher_temp=0.04, lr=0.0005)
    watch = main_dino.CollapseWatch(args)
    near_uniform, healthy = 0.97 * math.log(1024), 5.0  # the warning needs a mean of 0.9 * log(1024) = 6.24
    for epoch, entropy in [(0, near_uniform)] * 5 + [(1, near_uniform)] * 2 + [(1, healthy)] + [(2, near_uniform)] * 2:
        watch.update(epoch, entropy, 0.1, 0.001)  # the warm-up epoch is not watched; the window's mean stays below
    assert capsys.readouterr().out == ''
    for _ in range(4):
        watch.update(2, near_uniform, 0.1, 0.001)
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and 'becoming uniform' in out[0] and 'epoch 2' in out[0], out
    for kl in [0.01, 0.01, 3.0, 0.01, 0.01]:  # a one-hot teacher the student does not follow is not the dominant mode
        watch.update(3, 0.01, kl, 0.9)
    assert capsys.readouterr().out == ''
    for _ in range(4):
        watch.update(3, 0.01, 0.01, 0.9)
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and 'one output dimension dominates' in out[0] and '90.0%' in out[0], out
    args.collapse_window = 0
    watch = main_dino.CollapseWatch(args)
    for _ in range(10):
        watch.update(5, near_uniform, 0.1, 0.001)
    assert capsys.readouterr().out == ''
