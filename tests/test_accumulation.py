"""--accum_steps K: 2 steps of K micro-batches of B images compute what 2 steps of one K x B batch compute (fp32,
CPU, vit_tiny): losses within 1e-5 (relative), each parameter's update within 1% of its size, centres within 1e-6;
also with 2 processes. Generic accumulation, which moves the centre after every micro-batch, fails the centres'."""
import pytest
import torch

import main_dino
from accum_check import train
from conftest import process_state_kept, run_torchrun


@pytest.fixture(scope='module')
def reference():
    with process_state_kept():
        return train(accum_steps=1, batch=32)


def assert_same_training(got, want):
    (got_losses, initial, got_state), (want_losses, _, want_state) = got, want
    torch.testing.assert_close(got_losses, want_losses, rtol=1e-5, atol=0)
    for network in ('student', 'teacher'):
        for name, want_weights in want_state[network].items():
            update = want_weights - initial[name.removeprefix('module.')]
            error = (got_state[network][name] - want_weights).norm()
            assert error <= 1e-2 * update.norm(), f"{network}.{name}: {error} vs update {update.norm()}"
    torch.testing.assert_close(got_state['dino_loss']['center'], want_state['dino_loss']['center'], rtol=0, atol=1e-6)


def test_four_micro_batches_of_8_equal_one_batch_of_32(reference, restored_process_state):
    assert_same_training(train(accum_steps=4, batch=8), reference)


def test_two_processes_of_two_micro_batches_equal_one_process(reference, tmp_path):
    run_torchrun('tests/accum_check.py', 2, tmp_path / 'accumulated.pt')
    *accumulated, all_reduces = torch.load(tmp_path / 'accumulated.pt', weights_only=False)
    assert_same_training(accumulated, reference)
    # DDP all-reduces the gradients in the step's last backward pass only (no_sync before it)
    assert all_reduces and set(all_reduces) == {'last'}, all_reduces


def test_a_centre_moved_after_every_micro_batch_is_not_the_big_batchs(reference, restored_process_state):
    _, _, naive = train(accum_steps=4, batch=8, naive_centre=True)
    _, _, want = reference
    assert (naive['dino_loss']['center'] - want['dino_loss']['center']).abs().max() > 1e-5
    with pytest.raises(AssertionError):
        assert_same_training(train(accum_steps=4, batch=8, naive_centre=True), reference)


def test_schedules_count_steps_and_the_lr_rule_uses_the_whole_batch():
    args = main_dino.get_args_parser().parse_args(['--batch_size_per_device', '8', '--accum_steps', '4', '--epochs',
                                                   '2', '--warmup_epochs', '1', '--lr', '0.0005'])
    lr, wd, momentum = main_dino.build_schedules(args, iters_per_epoch=5)
    assert len(lr) == len(wd) == len(momentum) == 10  # optimizer steps, not micro-batches
    assert lr.max() == pytest.approx(0.0005 * 32 / 256)
