"""--grad_checkpointing: the student's blocks recomputed in the backward pass give the same losses and weights as
the plain step (stochastic depth on: its draws are replayed), and keep less in memory (with --compile: tests/test_compile.py, whose compiled graphs it reuses)."""
import pytest
import torch

import main_dino
import utils
import vision_transformer as vits
from test_robustness import RUN_ARGS

STEPS = 3


def train_in_process(*flags, steps=STEPS):
    """main_dino's run (RUN_ARGS, stochastic depth 0.5: about half the residual branches of a sample dropped)
    trained `steps` iterations on fixed random crops: the losses and the checkpoint after."""
    args = main_dino.get_args_parser().parse_args([*RUN_ARGS, '--drop_path_rate', '0.5', *flags])
    utils.setup_device(args)
    args.distributed = False
    main_dino.resolve_compile(args)
    torch.manual_seed(0)
    run = main_dino.build_training_run(args, torch.device('cpu'), iters_per_epoch=steps)
    generator = torch.Generator().manual_seed(0)
    losses = []
    for it in range(steps):
        views = [torch.randn(8, 3, size, size, generator=generator) for size in (32, 32, 16, 16)]
        losses.append(main_dino.train_step(run, views, 0, it).item())
    return losses, run.checkpoint_dict(epoch=1)


def assert_same_training(got, want):
    (got_losses, got_state), (want_losses, want_state) = got, want
    assert got_losses == pytest.approx(want_losses, rel=1e-6, abs=0)
    for key in ('student', 'teacher'):
        for name, value in want_state[key].items():
            torch.testing.assert_close(got_state[key][name], value, rtol=1e-5, atol=1e-6, msg=f'{key}.{name}')
    torch.testing.assert_close(got_state['dino_loss']['center'], want_state['dino_loss']['center'], rtol=0, atol=1e-6)


def test_checkpointed_blocks_train_as_the_plain_ones():
    assert_same_training(train_in_process('--grad_checkpointing', 'true'), train_in_process())


def saved_bytes(model, images):
    """Bytes of the tensors the autograd graph keeps for the backward pass of model(images).sum()."""
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(images).sum()
    return total


def test_checkpointing_keeps_only_the_blocks_inputs():
    model = vits.vit_tiny(patch_size=16, drop_path_rate=0.1)
    images = torch.randn(4, 3, 64, 64)
    plain = saved_bytes(model, images)
    model.set_grad_checkpointing()
    checkpointed = saved_bytes(model, images)
    block_inputs = len(model.blocks) * images.shape[0] * 17 * 192 * 4  # (batch, 1 + 4x4 tokens, 192) float32
    assert checkpointed < plain / 5 and checkpointed < 2 * block_inputs + plain / 20, (checkpointed, plain)
    with torch.no_grad():  # no gradients: nothing to checkpoint, the features are the same
        model.eval().set_grad_checkpointing(False)
        plain_features = model(images)
        model.set_grad_checkpointing()
        torch.testing.assert_close(model(images), plain_features, rtol=0, atol=0)


def test_grad_checkpointing_is_refused_for_another_arch():
    args = main_dino.get_args_parser().parse_args(['--arch', 'resnet18', '--grad_checkpointing', 'true'])
    with pytest.raises(SystemExit, match='--grad_checkpointing checkpoints the blocks of a ViT; --arch resnet18'):
        main_dino.check_numbers(args)


def test_benchmark_reports_images_and_peak_memory_with_both_options(restored_process_state):
    import benchmark
    args = benchmark.get_args_parser().parse_args(
        [*RUN_ARGS, '--batch_size_per_device', '4', '--accum_steps', '2', '--grad_checkpointing', 'true',
         '--steps', '1', '--warmup_steps', '0', '--out_dim', '256'])
    result = benchmark.benchmark_step(args)
    assert result['accum_steps'] == 2 and result['grad_checkpointing']
    assert result['images_per_s'] == pytest.approx(2 * 4 / result['seconds_per_step'])  # the step's 2 x 4 images
    assert result['peak_memory_mb'] > 0 and result['memory_measure'] == 'process peak RSS during the timed steps'
