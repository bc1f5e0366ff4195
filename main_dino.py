"""DINO self-supervised training (Caron et al., 2021) on HPU, CUDA or CPU."""
import argparse
import dataclasses
import datetime
import importlib.util
import json
import math
import os
import sys
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoints
import evaluation
import imagedata
import multicrop
import outputdir
import utils
from vision_transformer import DINOHead


def get_args_parser():
    parser = argparse.ArgumentParser('DINO', add_help=False)

    # Model parameters
    utils.add_model_args(parser, arch='vit_small', patch_size=16, weights=False)
    parser.add_argument('--out_dim', default=65536, type=int, help="""Output dimension of the DINO head.""")
    parser.add_argument('--norm_last_layer', default=True, type=utils.bool_flag,
                        help="""Weight-normalise the last layer of the DINO head with its norm fixed to 1.
        False works better with vit_small but can be less stable.""")
    parser.add_argument('--momentum_teacher', default=0.996, type=float, help="""Base EMA parameter of the
        teacher update, raised to 1 with a cosine schedule. Use e.g. 0.9995 with small batches.""")
    parser.add_argument('--use_bn_in_head', default=False, type=utils.bool_flag,
                        help="Use batch normalisation in the projection head.")

    # Temperature teacher parameters
    parser.add_argument('--warmup_teacher_temp', default=0.04, type=float,
                        help="Initial teacher temperature (lower it if the loss does not decrease).")
    parser.add_argument('--teacher_temp', default=0.04, type=float,
                        help="Teacher temperature after the linear warm-up (above 0.07 is unstable).")
    parser.add_argument('--warmup_teacher_temp_epochs', default=0, type=int,
                        help='Number of warm-up epochs for the teacher temperature.')

    # Training/Optimization parameters
    parser.add_argument('--use_fp16', type=utils.bool_flag, default=True, help="""CUDA only: fp16 mixed
        precision with a gradient scaler, as in the original (ignored on HPU and CPU; see --autocast).""")
    parser.add_argument('--weight_decay', type=float, default=0.04, help="Initial weight decay.")
    parser.add_argument('--weight_decay_end', type=float, default=0.4, help="""Final weight decay
        (cosine schedule from --weight_decay).""")
    parser.add_argument('--clip_grad', type=float, default=3.0, help="""Maximal gradient norm of each
        parameter; 0 disables clipping.""")
    parser.add_argument('--batch_size_per_device', '--batch_size_per_gpu', dest='batch_size_per_device',
                        default=32, type=int, help='Images per device and step.')
    parser.add_argument('--epochs', default=100, type=int, help='Number of epochs of training.')
    parser.add_argument('--freeze_last_layer', default=1, type=int, help="""Number of epochs during which
        the output layer is kept fixed.""")
    parser.add_argument("--lr", default=0.0005, type=float, help="""Peak learning rate (after warm-up)
        for a batch of 256; scaled linearly with the global batch size.""")
    parser.add_argument("--warmup_epochs", default=10, type=int, help="Epochs of linear learning-rate warm-up.")
    parser.add_argument('--min_lr', type=float, default=1e-6, help="Learning rate at the end of the cosine.")
    parser.add_argument('--optimizer', default='adamw', type=str, choices=['adamw', 'sgd', 'lars'],
                        help="Optimizer; adamw is recommended for ViTs.")
    parser.add_argument('--drop_path_rate', type=float, default=0.1, help="Stochastic depth rate.")
    parser.add_argument('--compile', default=None, type=utils.bool_flag, help="""Compile the transformer blocks
        of student and teacher with torch.compile, during the first iteration of each process: the same numbers
        within float rounding, faster. Default: true on CUDA; false on HPU, where lazy mode compiles the step's
        graph itself (true is refused there), and on a CPU, where the compiled step is hardly faster and needs
        a C++ compiler. ViTs only. On CUDA it also compiles the multi-crop render of --augment_on device
        (false: both eager).""")

    # Multi-crop parameters
    parser.add_argument('--global_crops_scale', type=float, nargs='+', default=(0.4, 1.),
                        help="Scale range of the two global crops relative to the image.")
    parser.add_argument('--local_crops_number', type=int, default=8, help="""Number of small local crops;
        0 disables multi-crop (then use e.g. --global_crops_scale 0.14 1).""")
    parser.add_argument('--local_crops_scale', type=float, nargs='+', default=(0.05, 0.4),
                        help="Scale range of the local crops relative to the image.")
    parser.add_argument('--global_crops_size', type=int, default=224, help="Side in pixels of global crops.")
    parser.add_argument('--local_crops_size', type=int, default=96, help="Side in pixels of local crops.")
    parser.add_argument('--augment_on', default='auto', choices=['auto', 'cpu', 'device'], help="""Where the
        views are rendered. cpu: in the DataLoader workers, as the original does. device: the workers only
        decode the image and draw the views' random parameters (the same draws, so the same views); crop,
        resize, flip, colour jitter, grayscale, blur, solarisation and normalisation then run batched on
        the training device. auto (default): device on HPU/CUDA, cpu on a CPU.""")

    # Misc
    parser.add_argument('--data_path', default='/path/to/imagenet/train/', type=str,
                        help="""Training images: a folder of images at any depth (an ImageFolder keeps its order),
        a text file listing image paths (one per line, absolute or relative to the file's folder; blank lines
        and # comments skipped), 'synthetic' for the built-in shapes, or 'fashion-mnist' for Fashion-MNIST's
        60,000 training images (Debian's dataset-fashion-mnist, else downloaded; or a folder of its idx files).""")
    parser.add_argument('--output_dir', default=".", type=str, help='Where logs and checkpoints go.')
    parser.add_argument('--saveckp_freq', default=20, type=int, help='Keep checkpointNNNN.pth every x epochs.')
    parser.add_argument('--saveckp_every_iters', default=0, type=int, help="""Also write checkpoint.pth every N
        iterations of an epoch (counted from its start), resumable at that iteration, so that a killed job loses
        at most N iterations of work. 0 (default): at the end of each epoch only, as the original.
        checkpointNNNN.pth files are still written at epoch ends only (--saveckp_freq).""")
    parser.add_argument('--seed', default=0, type=int, help='Random seed.')
    parser.add_argument('--num_workers', default=10, type=int, help='Data loading workers per device.')
    parser.add_argument("--data_limit", default=None, type=int, help="Use only this many images (for tests).")
    parser.add_argument('--strict_data', default=False, type=utils.bool_flag, nargs='?', const=True,
                        help="""Stop at the first unreadable image. By default each unreadable file is reported
        once and replaced by the next readable image of the dataset, and a count is printed every epoch.""")
    parser.add_argument('--collapse_window', default=100, type=int, help="""Collapse warning: print one line
        naming the mode and the flags to change when, after the warm-ups (--warmup_epochs,
        --warmup_teacher_temp_epochs), the teacher's entropy averaged over this many iterations comes within
        --collapse_margin * log(out_dim) of log(out_dim) (uniform outputs), or of 0 with the teacher-student KL
        also below that margin (one dominant dimension). Once per mode; training never stops for it. 0 turns
        the warning off.""")
    parser.add_argument('--collapse_margin', default=0.1, type=float, help="""Collapse warning: margin as a
        fraction of log(out_dim), the entropy of a uniform output. Runs on the built-in data that collapse to
        uniform settle at about 95%% of log(out_dim), so a margin of 0.05 would sit on their noise.""")
    parser.add_argument('--knn_every', default=0, type=int, help="""k-NN monitor: log the teacher's weighted
        20-NN top-1 on --knn_data, at the training resolution, before the first step (the random initialisation:
        the baseline to beat) and every this many epochs, to log.txt, TensorBoard and one line; a warning says
        what to try when the run is not above its baseline after half of its epochs. 0 (default): off.""")
    parser.add_argument('--knn_data', default=None, type=str, help="""k-NN monitor's labelled images: a folder
        with train/ and val/ ImageFolders, 'synthetic' or 'fashion-mnist'. Default: --data_path when it is
        'synthetic' or 'fashion-mnist'.""")
    parser.add_argument('--knn_limit', default=1000, type=int, help="""k-NN monitor: at most this many images of
        each split (a fixed random subset), which keeps each measurement to a few percent of an epoch.""")
    utils.add_distributed_args(parser)
    utils.add_device_args(parser)
    return parser


def train_dino(args):
    device = utils.start_run(args)
    resolve_augment_on(args)
    resolve_compile(args)
    utils.fix_random_seeds(args.seed)
    # SIGTERM/SIGUSR1/SIGINT: finish the step, write a checkpoint, exit 0 (130 on SIGINT)
    stop = checkpoints.StopSignal()

    # ============ preparing data ... ============
    data_loader = build_data_loader(args)
    print(f"Data loaded: there are {len(data_loader.dataset)} images.")
    knn_monitor = evaluation.KnnMonitor(args, device, len(data_loader) * args.epochs) if args.knn_every else None

    # ============ building student and teacher networks, loss, optimizer and schedules ... ============
    run = build_training_run(args, device, len(data_loader))
    print(f"Student and Teacher are built: they are both {args.arch} network.")
    print("Loss, optimizer and schedulers ready.")

    # ============ optionally resume training ... ============
    # checkpoints hold the random states, and the iteration reached when a signal stopped the run mid-epoch
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)  # only now: bad input has been rejected
    start_epoch, start_step, epoch_meters = run.resume(os.path.join(args.output_dir, "checkpoint.pth"))
    if utils.is_main_process():
        outputdir.warn_if_log_shared(args.output_dir, training=True)
        trim_log(Path(args.output_dir) / "log.txt", start_epoch)

    run.stop, run.summary_writer = stop, utils.summary_writer(args.output_dir)
    start_time = time.time()
    if knn_monitor and start_epoch == start_step == 0:
        knn_monitor(run.teacher_without_ddp.backbone, 0, run.summary_writer)
    print("Starting DINO training !")
    for epoch in range(start_epoch, args.epochs):
        step = start_step if epoch == start_epoch else 0
        data_loader.sampler.set_epoch(epoch, start=step * args.batch_size_per_device)
        metric_logger, step = train_one_epoch(run, data_loader, epoch, step, epoch_meters if step else None)
        run.skipped.merge(len(data_loader.dataset), device)
        if step < run.iters_per_epoch:
            path = save_resumable_checkpoint(run, epoch, step, metric_logger)
            print(f"Stopped by {stop} at epoch {epoch}, iteration {step}: {path} resumes there; "
                  "run the same command to continue.")
            break
        end_epoch(run, epoch, metric_logger)
        if knn_monitor:
            knn_monitor(run.teacher_without_ddp.backbone, epoch + 1, run.summary_writer)
        if stop.requested(device):
            print(f"Stopped by {stop} after epoch {epoch}; run the same command to resume.")
            break
    total_time = time.time() - start_time
    print(f'Training time {datetime.timedelta(seconds=int(total_time))}')
    if run.summary_writer is not None:
        run.summary_writer.close()
    if stop.exit_code:
        utils.leave_process_group()
        sys.exit(stop.exit_code)


def train_one_epoch(run, data_loader, epoch, start_step, meters):
    """Train from iteration `start_step` of `epoch` to its end, or until a stop signal.

    `meters` holds the meter states of the iterations before `start_step` (a mid-epoch checkpoint's).
    Every --saveckp_every_iters iterations, checkpoint.pth is written (save_resumable_checkpoint).

    Returns the metric logger and the number of iterations of the epoch done so far.
    """
    args, device, iters_per_epoch = run.args, run.device, run.iters_per_epoch
    metric_logger = utils.MetricLogger("  ", args.batch_size_per_device * utils.get_world_size(), run.summary_writer)
    restore_meters(metric_logger, meters)
    header = f'Epoch: [{epoch}/{args.epochs}]'
    if start_step:
        print(f"Resuming epoch {epoch} at iteration {start_step}/{iters_per_epoch}")
    step = start_step
    for images, skipped_indices, notes in metric_logger.log_every(data_loader, 10, header, epoch):
        run.skipped.note(skipped_indices, notes)
        it = iters_per_epoch * epoch + step  # global training iteration
        images = views_on_device(images, args, device)
        loss = train_step(run, images, epoch, it)
        loss_value, *figures = torch.cat([loss.view(1), run.dino_loss.figures]).tolist()  # one read from the device
        if not math.isfinite(loss_value):
            print(f"Loss is {loss_value} at epoch {epoch}, iteration {it}: stopping training. "
                  f"The last good checkpoint in {args.output_dir} is kept; "
                  "try a lower --lr, a lower --teacher_temp or --clip_grad.", force=True)
            sys.exit(1)
        metric_logger.update(loss=loss_value, **dict(zip(DINOLoss.FIGURES, figures)),
                             lr=run.optimizer.param_groups[0]["lr"], wd=run.optimizer.param_groups[0]["weight_decay"])
        run.collapse_watch.update(epoch, *figures)
        step += 1
        checkpoints.fault_point('step')
        if step < iters_per_epoch and run.stop.requested(device):
            break
        if args.saveckp_every_iters and step % args.saveckp_every_iters == 0 and step < iters_per_epoch:
            run.skipped.merge(len(data_loader.dataset), device)
            save_resumable_checkpoint(run, epoch, step, metric_logger)
    return metric_logger, step


def train_step(run, images, epoch, it):
    """One DINO iteration (global iteration `it`): schedules, forward passes, loss, student update, teacher EMA.

    Returns the loss (a device tensor; the caller decides when to read it).
    """
    args, student, optimizer, fp16_scaler = run.args, run.student, run.optimizer, run.fp16_scaler
    lr_schedule, wd_schedule, momentum_schedule = run.schedules
    for i, param_group in enumerate(optimizer.param_groups):
        param_group["lr"] = float(lr_schedule[it])
        if i == 0:  # only the first group is regularized
            param_group["weight_decay"] = float(wd_schedule[it])

    with utils.autocast_context(args.device, args.autocast, args.use_fp16):
        teacher_output = run.teacher(images[:2])  # only the 2 global views pass through the teacher
        utils.mark_step()
        student_output = student(images)
        utils.mark_step()
        loss = run.dino_loss(student_output, teacher_output, epoch)
    utils.mark_step()

    optimizer.zero_grad(set_to_none=True)
    if fp16_scaler is None:
        loss.backward()
        utils.mark_step()
        if args.clip_grad:
            utils.clip_gradients(student, args.clip_grad)
        utils.cancel_gradients_last_layer(epoch, student, args.freeze_last_layer)
        optimizer.step()
    else:
        fp16_scaler.scale(loss).backward()
        if args.clip_grad:
            fp16_scaler.unscale_(optimizer)
            utils.clip_gradients(student, args.clip_grad)
        utils.cancel_gradients_last_layer(epoch, student, args.freeze_last_layer)
        fp16_scaler.step(optimizer)
        fp16_scaler.update()
    utils.mark_step()

    update_teacher(student, run.teacher_without_ddp, float(momentum_schedule[it]))
    utils.mark_step()
    return loss.detach()


@torch.no_grad()
def update_teacher(student, teacher_without_ddp, momentum):
    """teacher = m * teacher + (1 - m) * student, for all parameters at once (one pass, as a lerp)."""
    student_params = list(student.module.parameters())
    teacher_params = list(teacher_without_ddp.parameters())
    torch._foreach_lerp_(teacher_params, student_params, 1 - momentum)


class DINOLoss(nn.Module):
    # what self.figures holds after each forward pass (see collapse_figures)
    FIGURES = ('teacher_entropy', 'teacher_student_kl', 'teacher_top_mass')

    def __init__(self, out_dim, ncrops, warmup_teacher_temp, teacher_temp,
                 warmup_teacher_temp_epochs, nepochs, student_temp=0.1,
                 center_momentum=0.9):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.ncrops = ncrops
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.figures = None  # a device tensor, read with the loss (not a buffer: checkpoints keep their keys)
        # a too hot teacher at the start makes training unstable, hence the linear warm-up
        self.teacher_temp_schedule = np.concatenate((
            np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
            np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp,
        ))

    def forward(self, student_output, teacher_output, epoch):
        """Cross-entropy between the sharpened, centred teacher and the student, over all view pairs.

        Averages -<q_iq, log p_v> over the batch and over the pairs of a teacher view iq (global crop)
        and a different student view v, without a loop over pairs: the sum over all pairs is
        <sum_iq q_iq, sum_v log p_v>, minus the pairs where both saw the same view.
        """
        student_logp = F.log_softmax(student_output.float() / self.student_temp, dim=-1)
        student_logp = student_logp.view(self.ncrops, -1, student_logp.shape[-1])
        temp = self.teacher_temp_schedule[epoch]
        teacher_probs = F.softmax((teacher_output.float() - self.center) / temp, dim=-1).detach()
        teacher_probs = teacher_probs.view(2, -1, teacher_probs.shape[-1])

        all_pairs = (teacher_probs.sum(0) * student_logp.sum(0)).sum(-1)
        same_view = (teacher_probs * student_logp[:2]).sum(dim=(0, 2))
        n_loss_terms = 2 * (self.ncrops - 1)
        total_loss = (same_view - all_pairs).mean() / n_loss_terms
        teacher_mass = self.update_center(teacher_output, teacher_probs)
        self.figures = self.collapse_figures(teacher_probs, total_loss.detach(), teacher_mass)
        return total_loss

    @torch.no_grad()
    def update_center(self, teacher_output, teacher_probs=None):
        """EMA of the mean teacher output over the global batch (all processes).

        With `teacher_probs`, their sum over the global batch rides in the same all-reduce and is returned.
        """
        batch_sums = torch.sum(teacher_output.float(), dim=0, keepdim=True)
        if teacher_probs is not None:
            batch_sums = torch.cat([batch_sums, teacher_probs.sum(dim=(0, 1)).unsqueeze(0)])
        batch_sums = utils.all_reduce(batch_sums)
        batch_center = batch_sums[:1] / (len(teacher_output) * utils.get_world_size())
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)
        return batch_sums[1] if teacher_probs is not None else None

    @staticmethod
    @torch.no_grad()
    def collapse_figures(teacher_probs, loss, teacher_mass):
        """The paper's two collapse monitors, and the earliest sign of a dominant dimension.

        teacher_entropy: mean entropy of the teacher's distributions (log(out_dim) when uniform, 0 when one-hot).
        teacher_student_kl: mean KL(teacher || student) over the loss's pairs. Every teacher view is in as many
            pairs, so the pairs' mean entropy is the views' mean, and the KL is the loss minus it.
        teacher_top_mass: share of the global batch's teacher mass in its largest output dimension
            (1/out_dim when uniform, 1 when one dimension takes everything).
        """
        tiny = torch.finfo(teacher_probs.dtype).tiny  # 0 * log(0) counts as 0
        entropy = -(teacher_probs * teacher_probs.clamp_min(tiny).log()).sum(-1).mean()
        top_mass = teacher_mass.max() / teacher_mass.sum()
        return torch.stack([entropy, loss - entropy, top_mass])


class CollapseWatch:
    """Warns once per mode when the teacher's figures show one of the paper's two collapses (section 5.3).

    Too little sharpening: the teacher's outputs become uniform (entropy near log(out_dim)).
    Too little centring: one dimension dominates (entropy near 0 and the KL to the student near 0).
    """

    MODES = ('uniform', 'dominant')

    def __init__(self, args):
        self.args = args
        self.max_entropy = math.log(args.out_dim)
        self.margin = args.collapse_margin * self.max_entropy
        self.first_epoch = max(args.warmup_epochs, args.warmup_teacher_temp_epochs)
        self.recent = deque(maxlen=args.collapse_window)  # (entropy, kl, top_mass) of the last iterations
        self.warned = set()

    def update(self, epoch, entropy, kl, top_mass):
        if not self.recent.maxlen or epoch < self.first_epoch:
            return
        self.recent.append((entropy, kl, top_mass))
        if len(self.recent) < self.recent.maxlen:
            return
        entropy, kl, top_mass = np.mean(self.recent, axis=0)  # single steps are noisy: judge the window's mean
        modes = {'uniform': entropy >= self.max_entropy - self.margin,
                 'dominant': entropy <= self.margin and kl <= self.margin}
        for mode in self.MODES:
            if modes[mode] and mode not in self.warned:
                self.warned.add(mode)
                print(f"Warning: collapse at epoch {epoch}: {self.advice(mode)}. Over the last {len(self.recent)} "
                      f"iterations: teacher entropy {entropy:.3f} (log(out_dim) = {self.max_entropy:.3f}), "
                      f"teacher-student KL {kl:.3f}, top dimension {100 * top_mass:.1f}% of the teacher mass. "
                      "See README, 'My loss does not decrease'; training continues.")

    def advice(self, mode):
        """What the warning of `mode` says, with the next values of the flags computed from this run's.

        The temperature steps (x 0.75 against uniform outputs, x 1.25 against a dominant dimension) do not undo
        each other: a run that follows one advice and meets the opposite collapse is sent between the two values.
        """
        args = self.args
        if mode == 'uniform':
            temp = 0.75 * args.teacher_temp
            smaller = f" --out_dim {args.out_dim // 4}" if args.out_dim > 4096 else ""
            return (f"the teacher's outputs are becoming uniform (too little sharpening): rerun with --teacher_temp "
                    f"{temp:.3g} --warmup_teacher_temp {min(temp, args.warmup_teacher_temp):.3g}{smaller}")
        temp = min(1.25 * args.teacher_temp, 0.07)  # the paper finds teachers above 0.07 unstable
        return (f"one output dimension dominates the teacher (too little centring): rerun with --teacher_temp "
                f"{temp:.3g} --warmup_teacher_temp {min(temp, args.warmup_teacher_temp):.3g} --lr {args.lr / 2:.3g}"
                f" (or more --local_crops_number, a larger batch: more diverse targets)")


class DataAugmentationDINO(object):
    """Two global views (always blurred; rarely blurred and sometimes solarised) and local views.

    With augment_on='device' the views are only drawn here: the call returns the image and their
    parameters (multicrop.hand_over), which views_on_device renders on the training device.
    """

    def __init__(self, global_crops_scale, local_crops_scale, local_crops_number,
                 global_crops_size=224, local_crops_size=96, augment_on='cpu'):
        self.global_transfo1 = multicrop.DinoCropTransform(global_crops_size, global_crops_scale, blur_p=1.0)
        self.global_transfo2 = multicrop.DinoCropTransform(global_crops_size, global_crops_scale, blur_p=0.1,
                                                           solarize_p=0.2)
        self.local_crops_number = local_crops_number
        self.local_transfo = multicrop.DinoCropTransform(local_crops_size, local_crops_scale, blur_p=0.5)
        self.augment_on = augment_on
        # images are handed over with the short side at most twice the global crop size: the smallest
        # regions drawn (40% of the area for a global crop, 5% for a local one, of a 448-pixel side) still
        # cover at least their output size (283 > 224 and 100 > 96 pixels), so no view is enlarged
        self.max_short_side = 2 * global_crops_size

    def transforms(self):
        return [self.global_transfo1, self.global_transfo2] + [self.local_transfo] * self.local_crops_number

    def __call__(self, image):
        if self.augment_on == 'device':
            return multicrop.hand_over(image, [t.sample(image) for t in self.transforms()], self.max_short_side)
        return [t(image) for t in self.transforms()]


def resolve_augment_on(args):
    if args.augment_on == 'auto':
        args.augment_on = 'cpu' if args.device == 'cpu' else 'device'
    print(f"Multi-crop views rendered on: {args.augment_on}")


def resolve_compile(args):
    """--compile's default for the device: true on CUDA (with Triton, its code generator), else false; refused
    on HPU, ignored with a warning for other architectures than ViTs. Prints which training step runs."""
    has_triton = importlib.util.find_spec('triton') is not None
    if args.compile and args.device == 'hpu':
        utils.fail("--compile true is not supported on HPU: its lazy mode already compiles the training step's "
                   "graph; leave --compile out (false on HPU)")
    if args.compile and args.device == 'cuda' and not has_triton:
        utils.fail("--compile true on CUDA needs Triton (torch.compile's GPU code generator), which is not "
                   "installed; pip install triton, or pass --compile false")
    if args.compile and args.arch not in utils.VIT_ARCHS:
        utils.warn(f"--compile applies to the ViT architectures; --arch {args.arch} trains eagerly")
    if args.compile is None:
        args.compile = args.device == 'cuda' and has_triton
    args.compile = args.compile and args.arch in utils.VIT_ARCHS
    print("Training step: " + ("compiled (torch.compile of the transformer blocks, during the first iteration; "
                               "--compile false runs it eagerly)" if args.compile else "eager"))


def views_on_device(images, args, device):
    """A loader batch as the list of view batches on `device`: moved there, or rendered there."""
    if args.augment_on == 'cpu':
        return [im.to(device, non_blocking=True) for im in images]
    pixels, params = images
    sizes = [args.global_crops_size] * 2 + [args.local_crops_size] * args.local_crops_number
    return multicrop.render_views(pixels.to(device, non_blocking=True), params, sizes, compiled=args.compile)


def build_data_loader(args):
    transform = DataAugmentationDINO(args.global_crops_scale, args.local_crops_scale, args.local_crops_number,
                                     args.global_crops_size, args.local_crops_size, args.augment_on)
    if imagedata.is_builtin(args.data_path):
        dataset, description = imagedata.builtin_split(args.data_path, 'train', max(args.global_crops_size, 64),
                                                       transform, args.seed)
    else:
        dataset, description = imagedata.build_training_images(args.data_path, transform)
    print(f"Data source: {description}")
    dataset = imagedata.limit_dataset(dataset, args.data_limit)
    global_batch = args.batch_size_per_device * utils.get_world_size()
    if len(dataset) < global_batch:
        utils.fail(f"{len(dataset)} training images are fewer than one global batch ({global_batch}); "
                   "lower --batch_size_per_device or add images")
    # augmentations are seeded per (seed, epoch, image): results do not depend on --num_workers and a run
    # resumes exactly, even mid-epoch; unreadable images are replaced unless --strict_data
    dataset = imagedata.ReproducibleSamples(dataset, args.seed, strict=args.strict_data)
    dataset[(0, 0)]  # a dataset of unreadable files fails here, before any output is written
    sampler = imagedata.ResumableSampler(dataset, num_replicas=utils.get_world_size(), rank=utils.get_rank(),
                                         shuffle=True, seed=args.seed)
    return torch.utils.data.DataLoader(
        dataset,
        sampler=sampler,
        batch_size=args.batch_size_per_device,
        num_workers=args.num_workers,
        pin_memory=args.device == 'cuda',
        drop_last=True,
        persistent_workers=False,
        worker_init_fn=checkpoints.StopSignal.ignore_in_worker,
        generator=torch.Generator().manual_seed(args.seed),  # worker seeds, drawn apart from the model's RNG
        collate_fn=multicrop.collate_hand_over if args.augment_on == 'device' else None,
    )


@dataclasses.dataclass
class TrainingRun:
    """What a DINO training run carries from step to step, and the checkpoints' view of it.

    student and teacher are the DDP-wrapped networks (utils.SingleProcess in one process; the teacher is
    wrapped only with synchronised batch norms); schedules holds the lr, weight decay and teacher momentum
    of every global iteration. train_step needs no more; the fields after iters_per_epoch serve the epoch
    loop (build_training_run adds the collapse watch, resume the skipped images, train_dino the stop signal
    and the TensorBoard writer).
    """
    args: argparse.Namespace
    device: torch.device
    student: nn.Module
    teacher: nn.Module
    teacher_without_ddp: nn.Module
    dino_loss: 'DINOLoss'
    optimizer: torch.optim.Optimizer
    fp16_scaler: 'torch.amp.GradScaler | None'
    schedules: tuple
    iters_per_epoch: int
    collapse_watch: 'CollapseWatch | None' = None
    skipped: imagedata.SkippedImages = dataclasses.field(default_factory=imagedata.SkippedImages)
    stop: 'checkpoints.StopSignal | None' = None
    summary_writer: object = None

    def state_objects(self):
        """The objects whose state dicts a checkpoint holds, under its keys (the original's)."""
        return dict(student=self.student, teacher=self.teacher, optimizer=self.optimizer,
                    fp16_scaler=self.fp16_scaler, dino_loss=self.dino_loss)

    def checkpoint_dict(self, **extra):
        """State dicts, args, the random states (captured now), `extra` and the skipped images, on the CPU."""
        save_dict = {name: obj.state_dict() for name, obj in self.state_objects().items() if obj is not None}
        save_dict.update(args=self.args, rng_state=checkpoints.rng_state(), **extra,
                         skipped_images=self.skipped.state_dict())
        return checkpoints.to_cpu(save_dict)

    def resume(self, path):
        """Load the checkpoint at `path` if there is one: state dicts, random states, skipped images.

        Returns the epoch and iteration to start at, and the meter states of the epoch's first iterations
        (a checkpoint written mid-epoch), or None.
        """
        to_restore = {"epoch": 0, "step": 0, "rng_state": None, "epoch_meters": None, "skipped_images": None}
        checkpoints.restart_from_checkpoint(path, run_variables=to_restore, **self.state_objects())
        start_epoch, start_step = to_restore["epoch"], to_restore["step"]
        restore_random_states(to_restore["rng_state"], resuming=start_epoch > 0 or start_step > 0)
        self.skipped = imagedata.SkippedImages(to_restore["skipped_images"])
        return start_epoch, start_step, to_restore["epoch_meters"]


def build_training_run(args, device, iters_per_epoch):
    """Student and teacher, DINO loss, optimizer, fp16 scaler, schedules and collapse watch, as main_dino
    trains them (benchmark.py times the same)."""
    student, teacher, teacher_without_ddp = build_student_teacher(args, device)
    dino_loss = DINOLoss(
        args.out_dim,
        args.local_crops_number + 2,  # 2 global crops + the local crops
        args.warmup_teacher_temp,
        args.teacher_temp,
        args.warmup_teacher_temp_epochs,
        args.epochs,
    ).to(device)
    optimizer = build_optimizer(args, student)
    fp16_scaler = torch.amp.GradScaler('cuda') if args.use_fp16 else None
    return TrainingRun(args, device, student, teacher, teacher_without_ddp, dino_loss, optimizer, fp16_scaler,
                       build_schedules(args, iters_per_epoch), iters_per_epoch, CollapseWatch(args))


def build_student_teacher(args, device):
    student, embed_dim = utils.build_backbone(args.arch, args.patch_size, drop_path_rate=args.drop_path_rate)
    teacher, _ = utils.build_backbone(args.arch, args.patch_size)
    # the multi-crop wrapper runs the backbone once per crop resolution
    student = utils.MultiCropWrapper(student, DINOHead(
        embed_dim,
        args.out_dim,
        use_bn=args.use_bn_in_head,
        norm_last_layer=args.norm_last_layer,
    ))
    teacher = utils.MultiCropWrapper(teacher, DINOHead(embed_dim, args.out_dim, args.use_bn_in_head))
    student, teacher = student.to(device), teacher.to(device)

    if utils.has_batchnorms(student) and args.distributed:
        if args.device != 'cpu':  # torch's SyncBatchNorm refuses CPU tensors in a process group
            student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
            teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
        teacher = utils.wrap_ddp(teacher, args)  # synchronised batch norms need the DDP wrapper
        teacher_without_ddp = teacher.module
    else:
        teacher_without_ddp = teacher
    if args.compile:
        student.backbone.compile_blocks()
        teacher_without_ddp.backbone.compile_blocks()
    student = utils.wrap_ddp(student, args)
    # teacher and student start with the same weights; the teacher never receives gradients
    teacher_without_ddp.load_state_dict(student.module.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    return student, teacher, teacher_without_ddp


def build_optimizer(args, student):
    params_groups = utils.get_params_groups(student)
    if args.optimizer == "adamw":
        return torch.optim.AdamW(params_groups, **fast_optimizer_kwargs(args.device))
    if args.optimizer == "sgd":
        return torch.optim.SGD(params_groups, lr=0, momentum=0.9)  # lr is set by the schedule
    return utils.LARS(params_groups)  # for convnets and large batches


def fast_optimizer_kwargs(device_type):
    """Fused AdamW kernels where torch has them (CPU, CUDA), else the multi-tensor (foreach) path."""
    return {'fused': True} if device_type in ('cpu', 'cuda') else {'foreach': True}


def build_schedules(args, iters_per_epoch):
    lr_schedule = utils.cosine_scheduler(
        args.lr * (args.batch_size_per_device * utils.get_world_size()) / 256.,  # linear scaling rule
        args.min_lr, args.epochs, iters_per_epoch, warmup_epochs=args.warmup_epochs)
    wd_schedule = utils.cosine_scheduler(args.weight_decay, args.weight_decay_end, args.epochs, iters_per_epoch)
    # the teacher momentum rises to 1 during training with a cosine schedule
    momentum_schedule = utils.cosine_scheduler(args.momentum_teacher, 1, args.epochs, iters_per_epoch)
    return lr_schedule, wd_schedule, momentum_schedule


def check_args(args):
    """Every flag against its meaningful range and every path against what it must be, before any work."""
    check_numbers(args)
    utils.check_output_dir(args.output_dir)  # --data_path is checked when the data is listed, before any output
    check_resumed_optimizer(args)


def check_resumed_optimizer(args):
    """The optimizer state in output_dir/checkpoint.pth only fits the --optimizer that wrote it."""
    path = os.path.join(args.output_dir, 'checkpoint.pth')
    saved = (utils.saved_training_args(path) or {}).get('optimizer', args.optimizer)
    if saved != args.optimizer:
        utils.fail(f"{path} was written with --optimizer {saved}, not {args.optimizer}: resume with --optimizer "
                   f"{saved}, or pass another --output_dir to start a new run")


def unread_flags(args):
    """The flags this run does not read, with why: {name: why} (given on the command line, they get a warning)."""
    unread = {}
    if not args.local_crops_number:
        unread.update(dict.fromkeys(['local_crops_scale', 'local_crops_size'], 'with --local_crops_number 0'))
    if not args.warmup_teacher_temp_epochs:
        unread['warmup_teacher_temp'] = 'with --warmup_teacher_temp_epochs 0 (no warm-up)'
    if not args.collapse_window:
        unread['collapse_margin'] = 'with --collapse_window 0 (no collapse warning)'
    if not args.knn_every:
        unread.update(dict.fromkeys(['knn_data', 'knn_limit'], 'with --knn_every 0 (no k-NN monitor)'))
    if imagedata.is_builtin(args.data_path):
        unread['strict_data'] = f'on --data_path {args.data_path} (its images are always readable)'
    return unread


def check_numbers(args):
    utils.check_common_args(args)
    utils.check_at_least(args, 1, 'epochs', 'out_dim', 'data_limit')
    utils.check_at_least(args, 0, 'local_crops_number', 'warmup_epochs', 'warmup_teacher_temp_epochs',
                         'freeze_last_layer', 'saveckp_freq')
    for name in ('lr', 'min_lr', 'weight_decay', 'weight_decay_end', 'clip_grad', 'momentum_teacher', 'teacher_temp',
                 'warmup_teacher_temp', 'drop_path_rate'):
        if not math.isfinite(getattr(args, name)):
            utils.fail(f"--{name} must be a finite number, got {getattr(args, name)}")
    if args.warmup_teacher_temp_epochs > args.epochs:
        utils.fail("--warmup_teacher_temp_epochs cannot exceed --epochs")
    if args.warmup_epochs > args.epochs:
        utils.fail("--warmup_epochs cannot exceed --epochs")
    for name in ('lr', 'teacher_temp', 'warmup_teacher_temp'):
        if not getattr(args, name) > 0:
            utils.fail(f"--{name} must be positive, got {getattr(args, name)}")
    for name in ('min_lr', 'weight_decay', 'weight_decay_end', 'clip_grad'):
        if not getattr(args, name) >= 0:
            utils.fail(f"--{name} must be 0 or more, got {getattr(args, name)}")
    if not 0 <= args.momentum_teacher <= 1:
        utils.fail(f"--momentum_teacher is an EMA factor in [0, 1] (e.g. 0.996), got {args.momentum_teacher}")
    if not 0 <= args.drop_path_rate < 1:
        utils.fail(f"--drop_path_rate is a probability in [0, 1), got {args.drop_path_rate}")
    for name in ('global_crops_scale', 'local_crops_scale'):
        scale = getattr(args, name)
        if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
            utils.fail(f"--{name} takes two fractions of the image area, 0 < min <= max <= 1 (e.g. 0.4 1), "
                       f"got {' '.join(map(str, scale))}")
    if args.collapse_window < 0 or not 0 < args.collapse_margin < 0.5:
        utils.fail("--collapse_window must be 0 (off) or more and --collapse_margin between 0 and 0.5")
    if args.saveckp_every_iters < 0:
        utils.fail("--saveckp_every_iters must be 0 (off) or a number of iterations")
    check_crop_sizes(args)
    check_knn_monitor(args)


def check_knn_monitor(args):
    """--knn_every's flags; --knn_data defaults to a built-in --data_path (its labels)."""
    if args.knn_every < 0:
        utils.fail("--knn_every must be 0 (off) or a number of epochs")
    if not args.knn_every:
        return
    if args.knn_limit < evaluation.KnnMonitor.K:
        utils.fail(f"--knn_limit must be at least {evaluation.KnnMonitor.K}, the monitor's number of neighbours")
    if args.knn_data is None:
        if not imagedata.is_builtin(args.data_path):
            utils.fail("--knn_every needs labelled images: pass --knn_data, a folder with train/ and val/ ImageFolders "
                       "(one sub-folder per class), or 'fashion-mnist' or 'synthetic'")
        args.knn_data = args.data_path
    elif not imagedata.is_builtin(args.knn_data):
        utils.check_input_folder(args.knn_data, '--knn_data')


def check_crop_sizes(args):
    """A ViT cuts crops into patches: each crop must hold one; the pixels past the last whole patch are ignored."""
    crops = [('--global_crops_size', args.global_crops_size)]
    if args.local_crops_number:
        crops.append(('--local_crops_size', args.local_crops_size))
    for flag, size in crops:
        utils.check_crop_size(size, args, flag)


def end_epoch(run, epoch, metric_logger):
    """Log the epoch, then write the checkpoints.

    log.txt is written first: a run killed before its checkpoint repeats the epoch, and the resume
    trims the stale line (see trim_log), so the log never misses or repeats an epoch.
    """
    args = run.args
    metric_logger.synchronize_between_processes()
    print("Averaged stats:", metric_logger)
    count = run.skipped.end_epoch()
    if count:
        print(f"Epoch {epoch}: {count} unreadable image(s) skipped, each replaced by another image of the dataset")
    log_stats = {**{f'train_{k}': meter.global_avg for k, meter in metric_logger.meters.items()}, 'epoch': epoch}
    save_dict = run.checkpoint_dict(epoch=epoch + 1)
    if utils.is_main_process():
        with (Path(args.output_dir) / "log.txt").open("a") as f:
            f.write(json.dumps(log_stats) + "\n")
    if args.saveckp_freq and epoch % args.saveckp_freq == 0:
        checkpoints.save_on_master(save_dict, os.path.join(args.output_dir, f'checkpoint{epoch:04}.pth'))
    checkpoints.save_on_master(save_dict, os.path.join(args.output_dir, 'checkpoint.pth'))


def save_resumable_checkpoint(run, epoch, step, metric_logger):
    """checkpoint.pth resuming at iteration `step` of `epoch` (a stop signal, or --saveckp_every_iters).

    Every process takes part (the meters are gathered); the main process alone builds and writes the
    checkpoint, the others wait for it at their next collective. Returns the checkpoint's path.
    """
    epoch_meters = meter_states(metric_logger)
    path = os.path.join(run.args.output_dir, 'checkpoint.pth')
    if utils.is_main_process():
        checkpoints.save_checkpoint(run.checkpoint_dict(epoch=epoch, step=step, epoch_meters=epoch_meters), path)
    return path


def restore_random_states(state, resuming):
    if state is not None:
        checkpoints.set_rng_state(state)
    elif resuming:
        print("Note: the checkpoint holds no random states (older format); training continues, but will not "
              "repeat an uninterrupted run bit for bit.")


def meter_states(metric_logger):
    """(count, total) of each meter on every process, so that a resumed epoch averages like an uninterrupted one."""
    return utils.all_gather_object({name: (meter.count, meter.total) for name, meter in metric_logger.meters.items()})


def restore_meters(metric_logger, states):
    if not states:
        return
    world_size, rank = utils.get_world_size(), utils.get_rank()
    if len(states) != world_size:  # resumed with another number of processes: rank 0 takes the sums
        merged = {name: tuple(map(sum, zip(*(s[name] for s in states)))) for name in states[0]}
        states = [merged] + [{}] * (world_size - 1)
    for name, (count, total) in states[rank].items():
        metric_logger.meters[name].count, metric_logger.meters[name].total = count, total


def trim_log(path, start_epoch):
    """Drop the log.txt lines of training epochs from `start_epoch` on (written just before a kill, or cut by
    one); the lines of other runs in the same folder are kept."""
    if not path.exists():
        return
    text = path.read_text()
    kept = ''
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not outputdir.is_training_log_entry(entry) or entry.get('epoch', -1) < start_epoch:
            kept += line + '\n'
    if kept != text:
        tmp = path.with_name(path.name + '.tmp')
        tmp.write_text(kept)
        os.replace(tmp, path)


def main(argv=None):
    parser = argparse.ArgumentParser('DINO', parents=[get_args_parser()], epilog="""Preemption: SIGTERM or
        SIGUSR1 makes training finish the current iteration, write checkpoint.pth and exit 0; running the
        same command resumes at that iteration, with the same results as an uninterrupted run. Ctrl-C
        (SIGINT) does the same and exits 130; a second Ctrl-C stops at once.""")
    args = utils.parse_checked_args(parser, check_args, argv, unread_flags)
    hint = ("remove or fix the file and run again (training resumes from the last checkpoint), "
            "or leave out --strict_data to skip such files") if args.strict_data else \
        "remove or fix the file and run again (training resumes from the last checkpoint)"
    with outputdir.only_writer(args, 'output_dir'):
        utils.run_reporting_failures(train_dino, args, hint)


if __name__ == '__main__':
    main()
