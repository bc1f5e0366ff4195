"""--accum_steps against one big batch: the training of 2 steps of a vit_tiny DINO run (fp32, CPU) on fixed random
crops, the reference (one process, 32 images per step) and its accumulated twins.

Run under `torchrun --nproc_per_node 2` with a result path: 2 processes of --accum_steps 2 x 8 images, each taking
its half of the reference's 32 images per step; rank 0 writes its run (losses averaged over the processes) there.
"""
import sys

import torch

import main_dino
import utils

STEPS, BATCH = 2, 32
ARGS = ['--arch', 'vit_tiny', '--patch_size', '16', '--global_crops_size', '32', '--local_crops_size', '16',
        '--local_crops_number', '2', '--out_dim', '256', '--device', 'cpu', '--epochs', '1', '--warmup_epochs', '0',
        '--freeze_last_layer', '0', '--drop_path_rate', '0', '--momentum_teacher', '0.9', '--lr', '0.01',
        '--clip_grad', '0.5', '--use_fp16', 'false']


def global_views(step):
    """The step's views of the whole batch (2 global 32-pixel crops, 2 local 16-pixel ones), the same everywhere."""
    generator = torch.Generator().manual_seed(100 + step)
    return [torch.randn(BATCH, 3, size, size, generator=generator) for size in (32, 32, 16, 16)]


def train(accum_steps, batch, naive_centre=False):
    """STEPS training steps of main_dino's run with --accum_steps and --batch_size_per_device `batch`; in a process
    group, each process takes its share of the whole batch. naive_centre: the centre moves after every micro-batch,
    as generic gradient accumulation would have it. Returns the losses (the step's whole batch), the student's
    weights before, and the checkpoint after."""
    args = main_dino.get_args_parser().parse_args(
        [*ARGS, '--accum_steps', str(accum_steps), '--batch_size_per_device', str(batch)])
    utils.setup_device(args)
    utils.init_distributed_mode(args)
    torch.manual_seed(0)
    run = main_dino.build_training_run(args, torch.device('cpu'), iters_per_epoch=STEPS)
    if naive_centre:
        run.dino_loss.accum_steps = 1
    if args.distributed:
        count_gradient_all_reduces(run)
    initial = {name: p.clone() for name, p in run.student.module.state_dict().items()}
    losses = []
    for it in range(STEPS):
        views = [view.chunk(utils.get_world_size())[utils.get_rank()] for view in global_views(it)]
        figures = {}
        loss = main_dino.train_step(run, views, 0, it, figures)
        losses.append(utils.all_reduce(loss) / utils.get_world_size())
    return torch.stack(losses), initial, run.checkpoint_dict(epoch=1)


def count_gradient_all_reduces(run):
    """Note in ALL_REDUCES, at each of DDP's gradient all-reduces, whether it came before the step's last
    micro-batch (the loss then still holds sums of the step's earlier micro-batches)."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    def hook(state, bucket):
        ALL_REDUCES.append('early' if run.dino_loss.step_sums else 'last')
        return default_hooks.allreduce_hook(None, bucket)
    run.student.register_comm_hook(None, hook)


ALL_REDUCES = []

if __name__ == '__main__':
    result = train(accum_steps=2, batch=8)
    if utils.get_rank() == 0:
        torch.save((*result, ALL_REDUCES), sys.argv[1])
