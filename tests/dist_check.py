"""Run under `torchrun --nproc_per_node 2`: DDP with half batches must equal one process on the full batch.

Checks the DINO loss value, its collapse figures, the all-reduced centre and the student gradients, then writes
{'ok': bool, 'details': str} to the path given as the first argument (rank 0). With a second argument
`compile`, the DDP model's blocks are compiled (main_dino --compile true) and the one-process reference is not.
"""
import argparse
import copy
import sys

import torch

import main_dino
import utils
import vision_transformer as vits


def build_inputs(batch):
    generator = torch.Generator().manual_seed(0)
    global_crops = [torch.randn(batch, 3, 32, 32, generator=generator) for _ in range(2)]
    local_crops = [torch.randn(batch, 3, 16, 16, generator=generator) for _ in range(2)]
    return global_crops + local_crops


def all_reduce_mean(tensor):
    """Mean of `tensor` over the processes."""
    return utils.all_reduce(tensor) / utils.get_world_size()


def main(result_path, compiled=False):
    args = argparse.Namespace(device='cpu', dist_url='env://', local_rank=0, lazy_mode=False, autocast=False)
    utils.setup_device(args)
    utils.init_distributed_mode(args)
    rank, world = utils.get_rank(), utils.get_world_size()
    torch.manual_seed(0)
    model = utils.MultiCropWrapper(vits.vit_tiny(patch_size=16), vits.DINOHead(192, 64, norm_last_layer=False))
    reference = copy.deepcopy(model)
    if compiled:
        model.backbone.compile_blocks()
    ddp_model = utils.wrap_ddp(model, args)

    full = build_inputs(batch=16)  # 8 per process: the shapes of tests/test_compile.py, compiled there already
    half = [crop.chunk(world)[rank] for crop in full]
    teacher_full = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    teacher_half = torch.cat([t.chunk(world)[rank] for t in teacher_full.chunk(2)])

    loss_fn = main_dino.DINOLoss(64, 4, 0.04, 0.04, 0, 1)
    loss = loss_fn(ddp_model(half), teacher_half, 0)
    loss.backward()
    mean_loss = all_reduce_mean(loss.detach())

    reference_loss_fn = main_dino.DINOLoss(64, 4, 0.04, 0.04, 0, 1)
    reference_loss = reference_loss_fn(reference(full), teacher_full, 0)
    reference_loss.backward()

    problems = []
    if not torch.allclose(mean_loss, reference_loss.detach(), atol=1e-5):
        problems.append(f'loss {mean_loss.item()} != {reference_loss.item()}')
    # entropy and KL are means over equal halves; the top dimension's mass is summed over the global batch
    figures = torch.cat([all_reduce_mean(loss_fn.figures[:2]), loss_fn.figures[2:]])
    if not torch.allclose(figures, reference_loss_fn.figures, atol=1e-5):
        problems.append(f'collapse figures {figures.tolist()} != {reference_loss_fn.figures.tolist()}')
    if not torch.allclose(loss_fn.center, 0.1 * teacher_full.mean(0, keepdim=True), atol=1e-6):
        problems.append('centre differs from the EMA of the global batch mean')
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        if p.grad is not None and not torch.allclose(p.grad, q.grad, atol=1e-5, rtol=1e-4):
            problems.append(f'gradient of {name} differs')
            break
    if rank == 0:
        torch.save({'ok': not problems, 'details': '; '.join(problems)}, result_path)


if __name__ == '__main__':
    main(sys.argv[1], compiled=sys.argv[2:] == ['compile'])
