"""--compile: the compiled training step computes what the eager step computes, a compiled run resumes bit for bit
after a kill, 2 processes equal 1, and checkpoints keep their keys.

Every compiled run here has the shapes of test_robustness's runs (vit_tiny, batch 8, 2x32 + 2x16 crops): the first
test compiles the blocks' graphs (three: student global and local crops, teacher), the others find them in
inductor's cache.
"""
import argparse

import pytest
import torch

import benchmark
import main_dino
import utils
from conftest import run_torchrun
from test_grad_checkpointing import assert_same_training
from test_grad_checkpointing import train_in_process as train_checkpointed
from test_robustness import RUN_ARGS, assert_same_run, killed, train
from test_speed import vit_tiny_training_flops_per_image

STEPS = 10


def train_in_process(compiled, steps=STEPS):
    """main_dino's run (RUN_ARGS) trained `steps` iterations on fixed random crops: the losses, and the
    student's weights before training and the checkpoint after."""
    args = main_dino.get_args_parser().parse_args([*RUN_ARGS, '--compile', str(compiled)])
    utils.setup_device(args)
    args.distributed = False
    main_dino.resolve_compile(args)
    torch.manual_seed(0)
    run = main_dino.build_training_run(args, torch.device('cpu'), iters_per_epoch=steps)
    initial = {name: p.clone() for name, p in run.student.module.state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    losses = []
    for it in range(steps):
        views = [torch.randn(8, 3, size, size, generator=generator) for size in (32, 32, 16, 16)]
        losses.append(main_dino.train_step(run, views, 0, it).item())
    return losses, initial, run.checkpoint_dict(epoch=1)


@pytest.fixture(scope='module', autouse=True)
def fresh_dynamo():
    """Compiled code of this module's models does not stay in the process (nor count towards recompile limits)."""
    yield
    torch._dynamo.reset()


@pytest.fixture(scope='module')
def eager_and_compiled():
    return train_in_process(False), train_in_process(True)


def test_compiled_step_equals_eager_step(eager_and_compiled):
    """Losses within 1e-5 (relative) at every step (2e-7 measured). The weights move as the eager ones do
    within 1% of each tensor's change (0.14% measured): AdamW divides each gradient element by its running
    size, so rounding-level differences in near-zero gradients move weights by a sizable part of a step."""
    (eager_losses, initial, eager), (compiled_losses, _, compiled) = eager_and_compiled
    for step, (want, got) in enumerate(zip(eager_losses, compiled_losses)):
        assert abs(got - want) <= 1e-5 * abs(want), f"step {step}: loss {got} vs eager {want}"
    for network in ('student', 'teacher'):
        for name, want in eager[network].items():
            moved = (want - initial[name.removeprefix('module.')]).norm()
            assert (compiled[network][name] - want).norm() <= 1e-2 * moved, f"{network}.{name}"
    torch.testing.assert_close(compiled['dino_loss']['center'], eager['dino_loss']['center'], rtol=1e-4, atol=1e-6)


def test_compiled_checkpoints_have_the_eager_keys(eager_and_compiled):
    (_, _, eager), (_, _, compiled) = eager_and_compiled
    assert compiled.keys() == eager.keys()
    for key in ('student', 'teacher', 'optimizer', 'dino_loss'):
        assert list(compiled[key]) == list(eager[key]), key
    assert not [name for name in compiled['student'] if '_orig_mod' in name]
    assert compiled['args'].compile and not eager['args'].compile


def test_checkpointed_compiled_blocks_train_as_the_compiled_ones(eager_and_compiled):
    """--grad_checkpointing composes with --compile: 3 steps with stochastic depth on (the graphs compiled for the
    fixture serve both runs: its draws enter them as inputs)."""
    assert_same_training(train_checkpointed('--grad_checkpointing', 'true', '--compile', 'true'),
                         train_checkpointed('--compile', 'true'))


def test_compiled_run_resumes_exactly_after_a_kill(tmp_path):
    """2 epochs of 4 iterations, killed at iteration 3 of epoch 1, after the mid-epoch checkpoint of iteration 2:
    the resumed run ends with the log and the weights of an uninterrupted compiled run, bit for bit."""
    reference, out = tmp_path / 'reference', tmp_path / 'killed'
    compiled = ['--compile', 'true', '--epochs', '2', '--saveckp_every_iters', '2']
    proc = train(reference, *compiled)
    assert 'Training step: compiled' in proc.stdout
    assert killed(train(out, *compiled, fault='step:7:kill', check=False))
    proc = train(out, *compiled)
    assert 'Resuming epoch 1 at iteration 2/4' in proc.stdout
    assert_same_run(out, reference, epochs=2)


def test_two_processes_with_compiled_blocks_equal_one_eager_process(tmp_path):
    run_torchrun('tests/dist_check.py', 2, tmp_path / 'dist.pt', 'compile')
    result = torch.load(tmp_path / 'dist.pt')
    assert result['ok'], result


def test_benchmark_reports_compile_time_and_counts_the_eager_flops():
    torch._dynamo.reset()  # compile again (from inductor's cache) rather than reuse this process's graphs
    args = benchmark.get_args_parser().parse_args(
        [*RUN_ARGS, '--compile', 'true', '--steps', '2', '--warmup_steps', '1', '--out_dim', '256'])
    result = benchmark.benchmark_step(args)
    assert result['compile'] and result['first_step_seconds'] > result['compile_seconds'] > 0
    assert result['flops_per_image'] == vit_tiny_training_flops_per_image(32, 16, 2, 256)


@pytest.mark.parametrize('device, given, triton, expected', [
    ('cuda', None, True, True), ('cuda', None, False, False), ('cuda', False, True, False), ('cpu', None, True, False),
    ('cpu', True, False, True), ('hpu-lazy', None, True, False), ('hpu-eager', None, False, True),
    ('hpu-eager', False, True, False)])
def test_compile_default_per_device(monkeypatch, device, given, triton, expected):
    monkeypatch.setattr(utils.importlib.util, 'find_spec', lambda name: object() if triton else None)
    monkeypatch.setattr(utils, '_run_device', utils.RunDevice(device.split('-')[0], lazy=device == 'hpu-lazy'))
    args = argparse.Namespace(compile=given, arch='vit_small')
    main_dino.resolve_compile(args)
    assert args.compile is expected


def test_compile_refused_in_hpu_lazy_mode_and_without_triton_and_ignored_for_resnets(monkeypatch, capsys):
    monkeypatch.setattr(utils, '_run_device', utils.RunDevice('hpu', lazy=True))
    with pytest.raises(SystemExit, match='--compile true is not supported in HPU lazy mode'):
        main_dino.resolve_compile(argparse.Namespace(compile=True, arch='vit_small'))
    monkeypatch.setattr(utils.importlib.util, 'find_spec', lambda name: None)
    monkeypatch.setattr(utils, '_run_device', utils.RunDevice('cuda'))
    with pytest.raises(SystemExit, match='--compile true on CUDA needs Triton'):
        main_dino.resolve_compile(argparse.Namespace(compile=True, arch='vit_small'))
    monkeypatch.setattr(utils, '_run_device', utils.RunDevice('cpu'))
    args = argparse.Namespace(compile=True, arch='resnet50')
    main_dino.resolve_compile(args)
    assert args.compile is False
    output = capsys.readouterr()
    assert output.err.startswith('warning: --compile applies to the ViT') and 'Training step: eager' in output.out
