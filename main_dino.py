"""DINO self-supervised training (Caron et al., 2021) on HPU, CUDA or CPU."""
import argparse
import contextlib
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


DEFAULT_OUTPUT_DIR = os.path.join('~', 'dino_output')


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
    parser.add_argument('--init_weights', default='', type=utils.path_arg, help="""Start this new run's student and teacher
        from these weights instead of random ones: a backbone file (DINO's released *_pretrain.pth, or
        tools/export_backbone.py's backbone.safetensors or .pth; the DINO heads start fresh), or a full DINO
        checkpoint (a released *_pretrain_full_checkpoint.pth, or a checkpoint.pth of main_dino.py: student and
        teacher with their heads and the loss's centre). Weights only: the optimizer, schedules and epoch start
        fresh. The stored position embedding is resized (bicubic) if it was kept for another image size. A
        checkpoint.pth in --output_dir wins: the run resumes it and this flag is ignored.""")
    parser.add_argument('--init_heads', default=True, type=utils.bool_flag, help="""With a full checkpoint as
        --init_weights, also take its DINO heads (and centre); false: its backbones only, with fresh heads
        (needed for another --out_dim).""")

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
    parser.add_argument('--accum_steps', default=1, type=int, help="""Gradient accumulation: each optimizer step
        takes this many micro-batches of --batch_size_per_device images per device, and computes what one batch of
        accum_steps x batch_size_per_device computes: every micro-batch is centred with the same centre, which
        moves once per step with the mean over all of them; the gradient is clipped once; the schedules count
        steps and the linear lr rule uses the whole batch. Memory is that of one micro-batch. (Stochastic depth
        draws its dropped samples per micro-batch, and batch norms in the head see micro-batch statistics.)""")
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
    parser.add_argument('--grad_checkpointing', default=False, type=utils.bool_flag, help="""Activation
        checkpointing of the student's transformer blocks: each keeps only its input for the backward pass, where
        its forward runs again. The same numbers (stochastic depth draws replayed) for a fraction of the
        activation memory and about a third more compute per step: a larger batch per device. ViTs only;
        composes with --compile and --accum_steps. benchmark.py --mode step gives the peak memory of either.""")
    parser.add_argument('--compile', default=None, type=utils.bool_flag, help="""Compile the transformer blocks
        of student and teacher with torch.compile, during the first iteration of each process: the same numbers
        within float rounding, faster. Default: true on CUDA (inductor) and in HPU eager mode (hpu_backend); false
        in HPU lazy mode, where Habana compiles the step's graph itself (true is refused there), and on a CPU,
        where the compiled step is hardly faster and needs a C++ compiler. ViTs only. On CUDA and HPU it also
        compiles the multi-crop render of --augment_on device (false: both eager).""")

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
    parser.add_argument('--data_path', default='/path/to/imagenet/train/', type=utils.path_arg,
                        help="""Training images: a folder of images at any depth (an ImageFolder keeps its order),
        a text file listing image paths (one per line, absolute or relative to the file's folder; blank lines
        and # comments skipped), 'synthetic' for the built-in shapes, or 'fashion-mnist' for Fashion-MNIST's
        60,000 training images (Debian's dataset-fashion-mnist, else downloaded; or a folder of its idx files).""")
    parser.add_argument('--output_dir', default=None, type=utils.path_arg, help=f"""Where logs and checkpoints go.
        Default:
        {DEFAULT_OUTPUT_DIR} (not the current folder, which may hold the repository or your data); rerunning a
        command resumes the run in its folder when its data and batch are the same, and stops otherwise.""")
    parser.add_argument('--overwrite', action='store_true', help="""Start a new run in an --output_dir that holds
        the log of an earlier run but no checkpoint to resume from (its log.txt lines are replaced).""")
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
        what to try when the run is not above its baseline after three quarters of its epochs. 0 (default): off.""")
    parser.add_argument('--knn_data', default=None, type=utils.path_arg, help="""k-NN monitor's labelled images: a folder
        with train/ and val/ ImageFolders, 'synthetic' or 'fashion-mnist'. Default: --data_path when it is
        'synthetic' or 'fashion-mnist'.""")
    parser.add_argument('--knn_limit', default=1000, type=int, help="""k-NN monitor: at most this many images of
        each split (a fixed random subset), which keeps each measurement to a few percent of an epoch.""")
    utils.add_distributed_args(parser)
    utils.add_device_args(parser)
    return parser


def train_dino(args):
    device = utils.start_run(args)
    print(f"Output folder: {os.path.abspath(args.output_dir)}")
    resolve_augment_on(args)
    resolve_compile(args)
    utils.fix_random_seeds(args.seed)
    # SIGTERM/SIGUSR1/SIGINT: finish the step, write a checkpoint, exit 0 (130 on SIGINT)
    stop = checkpoints.StopSignal()

    # ============ preparing data ... ============
    data_loader = build_data_loader(args)
    print(f"Data loaded: there are {len(data_loader.dataset)} images.")
    args.data_images = len(data_loader.dataset)  # saved with the args: a resume checks it is the same data
    knn_monitor = evaluation.KnnMonitor(args, device, len(data_loader) * args.epochs) if args.knn_every else None

    # ============ building student and teacher networks, loss, optimizer and schedules ... ============
    run = build_training_run(args, device, len(data_loader))
    print(f"Student and Teacher are built: they are both {args.arch} network.")
    print("Loss, optimizer and schedulers ready.")

    # ============ optionally resume training ... ============
    # checkpoints hold the random states, and the iteration reached when a signal stopped the run mid-epoch
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)  # only now: bad input has been rejected
    start_epoch, start_step, epoch_meters = run.resume(os.path.join(args.output_dir, "checkpoint.pth"))
    if start_epoch == 0 and start_step == 0:
        check_fresh_start(args)
    elif start_epoch >= args.epochs:
        print(f"Training is finished: {args.output_dir} holds all {args.epochs} epochs; nothing to do. "
              "Pass another --output_dir for a new run.")
        return
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
        data_loader.sampler.set_epoch(epoch, start=step * images_per_step(args))
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

    Returns the metric logger and the number of iterations of the epoch done so far.
    """
    args = run.args
    metric_logger = utils.MetricLogger("  ", images_per_step(args) * utils.get_world_size(), run.summary_writer)
    restore_meters(metric_logger, meters)
    header = f'Epoch: [{epoch}/{args.epochs}]'
    if start_step:
        print(f"Resuming epoch {epoch} at iteration {start_step}/{run.iters_per_epoch}")
    step = start_step
    for images, skipped_indices, notes in metric_logger.log_every(data_loader, 10, header, epoch):
        run.skipped.note(skipped_indices, notes)
        it = run.iters_per_epoch * epoch + step  # global training iteration
        views = views_on_device(images, args, run.device)
        figures = {}
        loss = train_step(run, views, epoch, it, figures)
        log_step(run, metric_logger, epoch, it, loss, figures)
        step += 1
        if stop_after_iteration(run, data_loader, epoch, step, metric_logger):
            break
    return metric_logger, step


def train_step(run, images, epoch, it, figures=None):
    """One DINO iteration, at global iteration `it` (Algorithm 1 of the paper): the teacher sees the 2 global
    views, the student all of them; the student is updated to match the teacher, the teacher follows its EMA.

    Returns the loss; `figures` (a dict), if given, receives the loss's collapse figures by name. Both are
    device tensors: the caller decides when to read them.
    """
    args, student, optimizer, scaler = run.args, run.student, run.optimizer, run.fp16_scaler
    lr_schedule, wd_schedule, momentum_schedule = run.schedules
    set_learning_rate_and_weight_decay(optimizer, float(lr_schedule[it]), float(wd_schedule[it]))
    optimizer.zero_grad(set_to_none=True)
    loss, step_figures = accumulate_gradients(run, images, epoch)
    if args.clip_grad:
        scaler.unscale_(optimizer)
        utils.clip_gradients(student, args.clip_grad)
    utils.cancel_gradients_last_layer(epoch, student, args.freeze_last_layer)
    scaler.step(optimizer)
    scaler.update()

    update_teacher(student, run.teacher_without_ddp, float(momentum_schedule[it]))
    if figures is not None:
        figures.update(step_figures)
    return loss.detach()


def accumulate_gradients(run, images, epoch):
    """Forward and backward passes of the step's --accum_steps micro-batches (one: the whole batch), the student's
    gradients summed to those of the whole batch; DDP all-reduces them once, in the last backward pass.

    Returns the loss of the whole batch and its figures.
    """
    student, scaler, accum_steps = run.student, run.fp16_scaler, run.args.accum_steps
    losses = []
    for micro in range(accum_steps):
        views = [view.chunk(accum_steps)[micro] for view in images]
        with contextlib.nullcontext() if micro == accum_steps - 1 else student.no_sync():
            with utils.run_device().autocast():
                teacher_output = run.teacher(views[:2])  # only the 2 global views pass through the teacher
                student_output = student(views)
                loss, figures = run.dino_loss(student_output, teacher_output, epoch, with_figures=True)
            scaler.scale(loss / accum_steps).backward()  # the scaler is disabled (a no-op) but with CUDA fp16
        losses.append(loss.detach())
    return sum(losses) / accum_steps, figures


def set_learning_rate_and_weight_decay(optimizer, lr, weight_decay):
    for i, param_group in enumerate(optimizer.param_groups):
        param_group["lr"] = lr
        if i == 0:  # only the first group is regularized
            param_group["weight_decay"] = weight_decay


def log_step(run, metric_logger, epoch, it, loss, figures):
    """Read the loss and its figures from the device (once), stop on a non-finite loss, log, watch for collapse."""
    loss_value, *values = torch.stack([loss, *figures.values()]).tolist()
    if not math.isfinite(loss_value):
        print(f"Loss is {loss_value} at epoch {epoch}, iteration {it}: stopping training. "
              f"The last good checkpoint in {run.args.output_dir} is kept; "
              "try a lower --lr, a lower --teacher_temp or --clip_grad.", force=True)
        sys.exit(1)
    figures = dict(zip(figures, values))
    metric_logger.update(loss=loss_value, **figures, lr=run.optimizer.param_groups[0]["lr"],
                         wd=run.optimizer.param_groups[0]["weight_decay"])
    run.collapse_watch.update(epoch, **figures)


def stop_after_iteration(run, data_loader, epoch, step, metric_logger):
    """The bookkeeping between two iterations (`step` of `epoch` done): the fault-injection point, the stop
    signal (True: stop here), and checkpoint.pth every --saveckp_every_iters iterations."""
    checkpoints.fault_point('step')
    if step == run.iters_per_epoch:
        return False
    if run.stop.requested(run.device):
        return True
    every = run.args.saveckp_every_iters
    if every and step % every == 0:
        run.skipped.merge(len(data_loader.dataset), run.device)
        save_resumable_checkpoint(run, epoch, step, metric_logger)
    return False


@torch.no_grad()
def update_teacher(student, teacher_without_ddp, momentum):
    """teacher = m * teacher + (1 - m) * student, for all parameters at once (one pass, as a lerp)."""
    student_params = list(student.module.parameters())
    teacher_params = list(teacher_without_ddp.parameters())
    torch._foreach_lerp_(teacher_params, student_params, 1 - momentum)


class DINOLoss(nn.Module):
    # the collapse figures forward returns by name (see collapse_figures), in this order
    FIGURES = ('teacher_entropy', 'teacher_student_kl', 'teacher_top_mass')

    def __init__(self, out_dim, ncrops, warmup_teacher_temp, teacher_temp,
                 warmup_teacher_temp_epochs, nepochs, student_temp=0.1,
                 center_momentum=0.9, accum_steps=1):
        super().__init__()
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.ncrops = ncrops
        self.register_buffer("center", torch.zeros(1, out_dim))
        # --accum_steps: forward sees a step's batch as this many equal micro-batches; the centre stays as it is
        # until the last one, then moves once, with the mean over all of them (step_sums)
        self.accum_steps = accum_steps
        self.step_sums = []
        self.figures = None  # the last forward's figures as one device tensor, in FIGURES order (not a buffer)
        # a too hot teacher at the start makes training unstable, hence the linear warm-up
        self.teacher_temp_schedule = np.concatenate((
            np.linspace(warmup_teacher_temp, teacher_temp, warmup_teacher_temp_epochs),
            np.ones(nepochs - warmup_teacher_temp_epochs) * teacher_temp,
        ))

    def forward(self, student_output, teacher_output, epoch, with_figures=False):
        """Cross-entropy between the sharpened, centred teacher and the student, over all view pairs;
        with_figures: the loss and its collapse figures, {name: 0-dim device tensor} (see collapse_figures).
        With accum_steps K, each call is one of a step's K micro-batches: the figures (and the centre) are the
        step's after its K-th call.

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
        step_figures = self.note_micro_batch(teacher_output, teacher_probs, total_loss.detach())
        if with_figures:  # none before a step's last micro-batch
            return total_loss, {} if step_figures is None else dict(zip(self.FIGURES, step_figures.unbind()))
        return total_loss

    @torch.no_grad()
    def note_micro_batch(self, teacher_output, teacher_probs, loss):
        """Keep the sums of a (micro-)batch that the centre and the figures need; after the step's last, update
        the centre and self.figures with them (the mean over the micro-batches: equal sizes) and return the
        figures (else None)."""
        tiny = torch.finfo(teacher_probs.dtype).tiny  # 0 * log(0) counts as 0
        entropy = -(teacher_probs * teacher_probs.clamp_min(tiny).log()).sum(-1).mean()
        self.step_sums.append((torch.sum(teacher_output.float(), dim=0, keepdim=True),
                               teacher_probs.sum(dim=(0, 1)).unsqueeze(0), torch.stack([entropy, loss])))
        if len(self.step_sums) < self.accum_steps:
            return None
        outputs, probs, means = (sum(parts) for parts in zip(*self.step_sums))
        count = len(teacher_output) * len(self.step_sums)
        self.step_sums = []
        teacher_mass = self.update_center_with_sums(outputs, probs, count)
        entropy, loss = (means / self.accum_steps).unbind()
        self.figures = self.collapse_figures(entropy, loss, teacher_mass)
        return self.figures

    @torch.no_grad()
    def update_center(self, teacher_output, teacher_probs=None):
        """EMA of the mean teacher output over the global batch (all processes).

        With `teacher_probs`, their sum over the global batch rides in the same all-reduce and is returned.
        """
        probs = None if teacher_probs is None else teacher_probs.sum(dim=(0, 1)).unsqueeze(0)
        return self.update_center_with_sums(torch.sum(teacher_output.float(), dim=0, keepdim=True), probs,
                                            len(teacher_output))

    @torch.no_grad()
    def update_center_with_sums(self, output_sum, probs_sum, count):
        """update_center given the sum of this process's `count` teacher outputs (and of their probabilities,
        which ride in the same all-reduce and come back summed over processes; or None)."""
        batch_sums = output_sum if probs_sum is None else torch.cat([output_sum, probs_sum])
        batch_sums = utils.all_reduce(batch_sums)
        batch_center = batch_sums[:1] / (count * utils.get_world_size())
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)
        return batch_sums[1] if probs_sum is not None else None

    @staticmethod
    @torch.no_grad()
    def collapse_figures(entropy, loss, teacher_mass):
        """The paper's two collapse monitors, and the earliest sign of a dominant dimension, from the teacher's mean
        entropy, the loss and the teacher's mass per output dimension over the global batch.

        teacher_entropy: mean entropy of the teacher's distributions (log(out_dim) when uniform, 0 when one-hot).
        teacher_student_kl: mean KL(teacher || student) over the loss's pairs. Every teacher view is in as many
            pairs, so the pairs' mean entropy is the views' mean, and the KL is the loss minus it.
        teacher_top_mass: share of the global batch's teacher mass in its largest output dimension
            (1/out_dim when uniform, 1 when one dimension takes everything).
        """
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

    def update(self, epoch, teacher_entropy, teacher_student_kl, teacher_top_mass):
        if not self.recent.maxlen or epoch < self.first_epoch:
            return
        self.recent.append((teacher_entropy, teacher_student_kl, teacher_top_mass))
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
        args.augment_on = 'device' if utils.run_device().accelerator else 'cpu'
    print(f"Multi-crop views rendered on: {args.augment_on}")


def resolve_compile(args):
    """--compile's default for the device: true on CUDA (with Triton, its code generator) and in HPU eager mode
    (backend hpu_backend), else false; refused in HPU lazy mode, ignored with a warning for other architectures
    than ViTs. Prints which training step runs."""
    device = utils.run_device()
    if args.compile and device.compile_unavailable():
        utils.fail(f"--compile true {device.compile_unavailable()}")
    if args.compile and args.arch not in utils.VIT_ARCHS:
        utils.warn(f"--compile applies to the ViT architectures; --arch {args.arch} trains eagerly")
    if args.compile is None:
        args.compile = device.compiles_by_default()
    args.compile = args.compile and args.arch in utils.VIT_ARCHS
    print("Training step: " + (f"compiled (torch.compile of the transformer blocks with {device.compile_backend}, "
                               "during the first iteration; --compile false runs it eagerly)" if args.compile
                               else "eager"))


def views_on_device(images, args, device):
    """A loader batch as the list of view batches on `device`: moved there, or rendered there."""
    if args.augment_on == 'cpu':
        return [im.to(device, non_blocking=True) for im in images]
    pixels, params = images
    sizes = [args.global_crops_size] * 2 + [args.local_crops_size] * args.local_crops_number
    return multicrop.render_views(pixels.to(device, non_blocking=True), params, sizes, compiled=args.compile)


def images_per_step(args):
    """Images per device and optimizer step: --accum_steps micro-batches of --batch_size_per_device."""
    return args.batch_size_per_device * args.accum_steps


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
    imagedata.warn_if_smaller_than_crops(dataset, args.global_crops_size)
    global_batch = images_per_step(args) * utils.get_world_size()
    if len(dataset) < global_batch:
        utils.fail(f"{len(dataset)} training images are fewer than one global batch ({global_batch}); "
                   "lower --batch_size_per_device or --accum_steps, or add images")
    # augmentations are seeded per (seed, epoch, image): results do not depend on --num_workers and a run
    # resumes exactly, even mid-epoch; unreadable images are replaced unless --strict_data
    dataset = imagedata.ReproducibleSamples(dataset, args.seed, strict=args.strict_data)
    dataset[(0, 0)]  # a dataset of unreadable files fails here, before any output is written
    sampler = imagedata.ResumableSampler(dataset, num_replicas=utils.get_world_size(), rank=utils.get_rank(),
                                         shuffle=True, seed=args.seed)
    return torch.utils.data.DataLoader(
        dataset,
        sampler=sampler,
        batch_size=images_per_step(args),  # cut into --accum_steps micro-batches by the step
        num_workers=args.num_workers,
        pin_memory=utils.run_device().pin_memory,
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
    fp16_scaler: torch.amp.GradScaler  # disabled (a no-op) but with CUDA fp16
    schedules: tuple
    iters_per_epoch: int
    collapse_watch: 'CollapseWatch | None' = None
    skipped: imagedata.SkippedImages = dataclasses.field(default_factory=imagedata.SkippedImages)
    stop: 'checkpoints.StopSignal | None' = None
    summary_writer: object = None

    def state_objects(self):
        """The objects whose state dicts a checkpoint holds, under its keys (the original's)."""
        scaler = self.fp16_scaler if self.fp16_scaler is not None and self.fp16_scaler.is_enabled() else None
        return dict(student=self.student, teacher=self.teacher, optimizer=self.optimizer,
                    fp16_scaler=scaler, dino_loss=self.dino_loss)

    def checkpoint_dict(self, **extra):
        """State dicts, args, the random states (captured now), `extra` and the skipped images, on the CPU."""
        save_dict = {name: obj.state_dict() for name, obj in self.state_objects().items() if obj is not None}
        save_dict.update(args=self.args, rng_state=checkpoints.rng_state(), **extra,
                         skipped_images=self.skipped.state_dict())
        return checkpoints.to_cpu(save_dict)

    def resume(self, path):
        """Load the checkpoint at `path` if there is one (after checking that this run may continue it): state
        dicts, random states, skipped images.

        Returns the epoch and iteration to start at, and the meter states of the epoch's first iterations
        (a checkpoint written mid-epoch), or None.
        """
        to_restore = {"epoch": 0, "step": 0, "rng_state": None, "epoch_meters": None, "skipped_images": None,
                      "args": None}
        loaded = checkpoints.restart_from_checkpoint(path, run_variables=to_restore, **self.state_objects())
        start_epoch, start_step = to_restore["epoch"], to_restore["step"]
        if loaded:
            check_same_run(self.args, to_restore["args"], loaded, start_step)
        restore_random_states(to_restore["rng_state"], resuming=start_epoch > 0 or start_step > 0)
        self.skipped = imagedata.SkippedImages(to_restore["skipped_images"])
        return start_epoch, start_step, to_restore["epoch_meters"]


def build_training_run(args, device, iters_per_epoch):
    """Student and teacher, DINO loss, optimizer, fp16 scaler, schedules and collapse watch, as main_dino
    trains them (benchmark.py times the same)."""
    init = starting_weights(args)
    student, teacher, teacher_without_ddp = build_student_teacher(args, device, init)
    dino_loss = DINOLoss(
        args.out_dim,
        args.local_crops_number + 2,  # 2 global crops + the local crops
        args.warmup_teacher_temp,
        args.teacher_temp,
        args.warmup_teacher_temp_epochs,
        args.epochs,
        accum_steps=args.accum_steps,
    ).to(device)
    if init is not None and init.center is not None:
        dino_loss.center.copy_(init.center)
    optimizer = build_optimizer(args, student)
    utils.run_device().mark_phases([student, teacher, dino_loss], optimizer)  # lazy HPU mode's graph cuts
    fp16_scaler = utils.run_device().grad_scaler()  # always there, enabled for CUDA fp16 only: one step path
    return TrainingRun(args, device, student, teacher, teacher_without_ddp, dino_loss, optimizer, fp16_scaler,
                       build_schedules(args, iters_per_epoch), iters_per_epoch, CollapseWatch(args))


def build_student_teacher(args, device, init=None):
    """The student and teacher networks (DDP-wrapped) and the teacher unwrapped; from random weights, or from
    `init` (InitWeights, --init_weights): the teacher equals the student unless `init` holds a teacher."""
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
    if init is not None:
        student.load_state_dict(init.student, strict=False)  # checked: only the heads may be missing
    student, teacher = student.to(device), teacher.to(device)

    if utils.has_batchnorms(student) and args.distributed:
        if utils.run_device().sync_batch_norm:  # torch's SyncBatchNorm refuses CPU tensors in a process group
            student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
            teacher = nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
        teacher = utils.wrap_ddp(teacher, args)  # synchronised batch norms need the DDP wrapper
        teacher_without_ddp = teacher.module
    else:
        teacher_without_ddp = teacher
    if args.grad_checkpointing:
        student.backbone.set_grad_checkpointing()
    if args.compile:
        student.backbone.compile_blocks(utils.run_device().compile_backend)
        teacher_without_ddp.backbone.compile_blocks(utils.run_device().compile_backend)
    student = utils.wrap_ddp(student, args)
    # teacher and student start with the same weights; the teacher never receives gradients
    teacher_without_ddp.load_state_dict(student.module.state_dict())
    if init is not None and init.teacher is not None:
        teacher_without_ddp.load_state_dict(init.teacher, strict=False)
    for p in teacher.parameters():
        p.requires_grad = False
    return student, teacher, teacher_without_ddp


@dataclasses.dataclass
class InitWeights:
    """What --init_weights gives a new run: state dicts for the student and the teacher (MultiCropWrapper keys;
    teacher None when the file holds one network, which the teacher then copies), the DINO loss's centre (or
    None) and the start-up line saying what was taken."""
    student: dict
    teacher: 'dict | None'
    center: 'torch.Tensor | None'
    description: str


def resumes(args):
    """Whether this run resumes a checkpoint.pth in --output_dir (which wins over --init_weights)."""
    return os.path.isfile(os.path.join(args.output_dir, 'checkpoint.pth'))


def starting_weights(args):
    """The InitWeights of --init_weights, said in one line; None without it or when a checkpoint is resumed."""
    if not getattr(args, 'init_weights', ''):
        return None
    if resumes(args):
        print(f"{os.path.join(args.output_dir, 'checkpoint.pth')} exists: this run resumes it, and --init_weights "
              f"{args.init_weights} is ignored (it only starts new runs)")
        return None
    init = read_init_weights(args)
    print(init.description)
    return init


def read_init_weights(args):
    """--init_weights as InitWeights for this run's networks; one error line for a file that is not weights, or
    whose networks another --arch, --patch_size or --out_dim built."""
    path = args.init_weights
    checkpoint = load_weights_file(path)
    backbone_shapes, head_shapes = network_shapes(args)
    full = {name: checkpoint[name] for name in ('student', 'teacher') if isinstance(checkpoint.get(name), dict)}
    if full:  # a DINO checkpoint: networks of backbone.* and head.* keys
        networks = {name: split_network(weights) for name, weights in full.items()}
    else:
        weights = {k.removeprefix('module.').removeprefix('backbone.'): v for k, v in checkpoint.items()}
        networks = {'student': (weights, {})}
    if not all(torch.is_tensor(v) for backbone, head in networks.values() for v in (*backbone.values(), *head.values())):
        utils.fail(f"--init_weights {path} is not a file of weights: it holds neither a backbone's state dict nor a "
                   f"DINO checkpoint's student and teacher (its keys: {', '.join(map(str, list(checkpoint)[:6]))}); "
                   "pass a backbone file or a DINO checkpoint")
    resized = ''
    for name, (backbone, head) in networks.items():
        check_backbone_weights(backbone, backbone_shapes, args)
        if 'pos_embed' in backbone_shapes and backbone['pos_embed'].shape != backbone_shapes['pos_embed']:
            backbone['pos_embed'], resized = resize_pos_embed(backbone['pos_embed'], backbone_shapes['pos_embed'][1],
                                                              path)
        if args.init_heads and head:
            check_head_weights(head, head_shapes, args)
    take_heads = args.init_heads and all(head for _, head in networks.values())
    state_dicts = {name: {**{f'backbone.{k}': v for k, v in backbone.items() if k in backbone_shapes},
                          **({f'head.{k}': v for k, v in head.items()} if take_heads else {})}
                   for name, (backbone, head) in networks.items()}
    center = (checkpoint.get('dino_loss') or {}).get('center') if take_heads else None
    if center is not None and tuple(center.shape) != (1, args.out_dim):
        center = None
    return InitWeights(state_dicts.get('student', state_dicts.get('teacher')),
                       state_dicts['teacher'] if len(state_dicts) == 2 else None, center,
                       describe_init_weights(path, checkpoint, full, take_heads, center is not None) + resized)


def describe_init_weights(path, checkpoint, full, heads, center):
    if not full:
        return f"Starting from the backbone in {path}: student and teacher start equal, with fresh DINO heads"
    epoch = checkpoint.get('epoch')
    written = f" (written after {epoch} epoch{'s' if epoch != 1 else ''})" if isinstance(epoch, int) else ''
    taken = ' and '.join(full) + (' with their heads' + (' and the centre' if center else '') if heads
                                  else ' backbones, with fresh DINO heads')
    return (f"Starting from the weights of the DINO checkpoint {path}{written}: its {taken}. Weights only: the "
            "optimizer, the schedules and the epoch start fresh, as a new run; this is not a resume (to continue "
            "a run where it stopped, run its own command again with its --output_dir)")


def load_weights_file(path):
    """The dict in a .safetensors file or a PyTorch checkpoint (read safely); one error line when it is neither."""
    utils.check_input_file(path, '--init_weights')
    if path.endswith('.safetensors'):
        if importlib.util.find_spec('safetensors') is None:
            utils.fail(f"--init_weights {path} is a safetensors file, and safetensors is not installed; "
                       "pip install safetensors")
        from safetensors.torch import load_file
        try:
            return load_file(path)
        except Exception as exc:  # safetensors' own error type, or an OSError
            utils.fail(f"--init_weights {path} is not a readable safetensors file ({str(exc).splitlines()[0][:100]})")
    try:
        checkpoint = utils.read_checkpoint(path)
    except utils.CheckpointError as exc:
        utils.fail(f"--init_weights: {exc}")
    if not isinstance(checkpoint, dict):
        utils.fail(f"--init_weights {path} holds a {type(checkpoint).__name__}, not a state dict of weights")
    if utils.is_linear_head_checkpoint(checkpoint):
        utils.fail(f"--init_weights {path} is a linear classifier (eval_linear.py's checkpoint), not a backbone; "
                   "pass the backbone or DINO checkpoint it was trained on")
    return checkpoint


def split_network(state_dict):
    """A DINO checkpoint's network as (backbone weights, head weights), without DDP's 'module.' prefix."""
    backbone, head = {}, {}
    for key, value in state_dict.items():
        key = key.removeprefix('module.')
        if key.startswith('head.'):
            head[key.removeprefix('head.')] = value
        else:
            backbone[key.removeprefix('backbone.')] = value
    return backbone, head


def network_shapes(args):
    """{key: shape} of the state dicts of this run's backbone and DINO head (built without memory)."""
    with torch.device('meta'):
        backbone, embed_dim = utils.build_backbone(args.arch, args.patch_size)
        head = DINOHead(embed_dim, args.out_dim, args.use_bn_in_head)
    backbone.fc, backbone.head = nn.Identity(), nn.Identity()
    return ({k: v.shape for k, v in backbone.state_dict().items()}, {k: v.shape for k, v in head.state_dict().items()})


def check_backbone_weights(weights, shapes, args):
    """Stop with one line unless `weights` hold every weight of --arch/--patch_size's backbone, in its shapes (the
    position embedding's length aside: it is resized)."""
    path = args.init_weights
    if not any(k in shapes for k in weights):
        utils.fail(f"--init_weights {path} holds no weights of a --arch {args.arch} backbone (its keys: "
                   f"{', '.join(list(weights)[:4])}); pass a DINO backbone file or checkpoint")
    for key, shape in shapes.items():
        if key in weights and key != 'pos_embed' and weights[key].shape != shape:
            found = vit_flags(weights)
            utils.fail(f"--init_weights {path} holds a backbone of {found or 'another architecture'}, not of --arch "
                       f"{args.arch} --patch_size {args.patch_size} (shape of {key}: {tuple(weights[key].shape)}, "
                       f"not {tuple(shape)}); pass {found or 'the --arch and --patch_size it was trained with'}")
    missing = [k for k in shapes if k not in weights]
    if missing:
        utils.fail(f"--init_weights {path} lacks {len(missing)} of the --arch {args.arch} backbone's weights (e.g. "
                   f"{missing[0]}); pass a whole backbone or DINO checkpoint")


def vit_flags(weights):
    """'--arch vit_small --patch_size 8' for a DINO ViT's weights (read from their shapes), else None."""
    proj = weights.get('patch_embed.proj.weight')
    arch = {192: 'vit_tiny', 384: 'vit_small', 768: 'vit_base'}.get(proj.shape[0]) if proj is not None else None
    return f"--arch {arch} --patch_size {proj.shape[-1]}" if arch and proj.ndim == 4 else None


def check_head_weights(head, shapes, args):
    path, out_dim = args.init_weights, head.get('last_layer.weight_v', torch.empty(0, 0)).shape[0]
    if out_dim != args.out_dim:
        utils.fail(f"--init_weights {path}: its DINO heads have {out_dim} outputs, not --out_dim {args.out_dim}; "
                   f"pass --out_dim {out_dim} to keep them, or --init_heads false to start fresh heads on its "
                   "backbones")
    if set(head) != set(shapes) or any(head[k].shape != shape for k, shape in shapes.items()):
        utils.fail(f"--init_weights {path}: its DINO heads are not built as this run's (another --use_bn_in_head?); "
                   "pass the flags it was trained with, or --init_heads false to start fresh heads")


def resize_pos_embed(pos_embed, tokens, path):
    """A ViT's position embedding (1, 1 + side * side, dim) resized (bicubic) to `tokens` = 1 + side' * side', and
    a sentence saying so."""
    side, new_side = math.isqrt(pos_embed.shape[1] - 1), math.isqrt(tokens - 1)
    if side * side != pos_embed.shape[1] - 1:
        utils.fail(f"--init_weights {path}: its position embedding ({pos_embed.shape[1]} tokens) is not one of a "
                   "square patch grid; pass a DINO backbone or checkpoint")
    grid = pos_embed[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new_side, new_side), mode='bicubic', align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_side * new_side, -1).to(pos_embed.dtype)
    return torch.cat([pos_embed[:, :1], grid], dim=1), (
        f". Its position embedding was kept for {side}x{side} patches: resized (bicubic) to the {new_side}x{new_side} "
        "this ViT stores")


def build_optimizer(args, student):
    params_groups = utils.get_params_groups(student)
    if args.optimizer == "adamw":
        # fused AdamW kernels where torch has them (CPU, CUDA), else the multi-tensor (foreach) path
        return torch.optim.AdamW(params_groups, **({'fused': True} if utils.run_device().fused_optimizers
                                                   else {'foreach': True}))
    if args.optimizer == "sgd":
        return torch.optim.SGD(params_groups, lr=0, momentum=0.9)  # lr is set by the schedule
    return utils.LARS(params_groups)  # for convnets and large batches


def build_schedules(args, iters_per_epoch):
    peak_lr = args.lr * (images_per_step(args) * utils.get_world_size()) / 256.  # linear scaling rule
    if args.min_lr > peak_lr:
        utils.warn(f"--min_lr {args.min_lr:g} is above the peak learning rate {peak_lr:g} (--lr {args.lr:g} x the "
                   f"global batch / 256): the lr rises during training instead of decaying; lower --min_lr")
    lr_schedule = utils.cosine_scheduler(peak_lr, args.min_lr, args.epochs, iters_per_epoch,
                                         warmup_epochs=args.warmup_epochs)
    wd_schedule = utils.cosine_scheduler(args.weight_decay, args.weight_decay_end, args.epochs, iters_per_epoch)
    # the teacher momentum rises to 1 during training with a cosine schedule
    momentum_schedule = utils.cosine_scheduler(args.momentum_teacher, 1, args.epochs, iters_per_epoch)
    return lr_schedule, wd_schedule, momentum_schedule


def check_args(args):
    """Every flag against its meaningful range and every path against what it must be, before any work."""
    if args.output_dir is None:
        args.output_dir = utils.path_arg(DEFAULT_OUTPUT_DIR)
    check_numbers(args)
    utils.check_arch(args.arch)
    utils.check_output_dir(args.output_dir)  # --data_path is checked when the data is listed, before any output
    check_resumed_optimizer(args)
    if args.init_weights and not resumes(args):
        read_init_weights(args)


def check_resumed_optimizer(args):
    """The optimizer state in output_dir/checkpoint.pth only fits the --optimizer that wrote it."""
    path = os.path.join(args.output_dir, 'checkpoint.pth')
    saved = (utils.saved_training_args(path) or {}).get('optimizer', args.optimizer)
    if saved != args.optimizer:
        utils.fail(f"{path} was written with --optimizer {saved}, not {args.optimizer}: resume with --optimizer "
                   f"{saved}, or pass another --output_dir to start a new run")


def check_same_run(args, saved, path, start_step):
    """Stop with one line when this command cannot continue the run of the checkpoint at `path` exactly (its
    `saved` args): other data, another global batch or --epochs (schedules laid out anew would jump)."""
    saved = vars(saved) if isinstance(saved, argparse.Namespace) else saved or {}
    again = "rerun with the checkpoint's settings, or pass another --output_dir for a new run"
    if 'data_path' in saved and not same_data_path(saved['data_path'], args.data_path):
        utils.fail(f"{path} was trained on --data_path {saved['data_path']}, not {args.data_path}; {again}")
    if saved.get('data_limit') != args.data_limit and 'data_limit' in saved:
        utils.fail(f"{path} was trained with --data_limit {saved['data_limit']}, not {args.data_limit}; {again}")
    if saved.get('data_images', args.data_images) != args.data_images:
        utils.fail(f"{path} was trained on {saved['data_images']} images of {args.data_path}, which now holds "
                   f"{args.data_images}: the epochs and schedules would not continue; {again}")
    world, saved_world = utils.get_world_size(), saved.get('world_size', 1)
    batch, accum = saved.get('batch_size_per_device', args.batch_size_per_device), saved.get('accum_steps', 1)
    if batch * accum * saved_world != images_per_step(args) * world:
        steps = f" x {accum} --accum_steps" if accum > 1 else ''
        utils.fail(f"{path} was trained with a global batch of {batch * accum * saved_world} ({batch} per device"
                   f"{steps} x {saved_world} process(es)), not {images_per_step(args) * world}: the images of the "
                   f"epoch and the lr would not continue; {again}")
    if saved.get('epochs', args.epochs) != args.epochs:
        utils.fail(f"{path} was trained with --epochs {saved['epochs']}, not {args.epochs}: the lr, weight decay and "
                   f"teacher momentum schedules are laid out over --epochs and would jump. Resume with --epochs "
                   f"{saved['epochs']}; for a longer run, start a new one with --epochs {args.epochs} in another "
                   "--output_dir (--pretrained_weights of eval scripts take its checkpoint)")
    if saved_world != world:
        where = f" at iteration {start_step}" if start_step else ''
        print(f"Note: {path} was written by {saved_world} process(es), this run has {world}; the global batch is "
              f"the same, so the epoch continues with the same images{where}.")


def same_data_path(saved, given):
    """Whether two --data_path values name the same data (the built-in data, or the same file or folder)."""
    return imagedata.data_identity(saved) == imagedata.data_identity(given)


def check_fresh_start(args):
    """A new run (epoch 0) must not replace the log of an earlier one in --output_dir, unless --overwrite.

    A log.txt holding training epochs from 1 on, with no checkpoint to resume, is another run's (a run killed
    before its first checkpoint logged epoch 0 at most, which it repeats).
    """
    path = os.path.join(args.output_dir, 'log.txt')
    with contextlib.suppress(OSError):
        with open(path) as f:
            entries = [entry for entry in map(parse_log_line, f) if outputdir.is_training_log_entry(entry)]
        epochs = [entry.get('epoch', 0) for entry in entries]
        if max(epochs, default=0) > 0 and not args.overwrite:
            utils.fail(f"{path} holds {len(epochs)} epochs of an earlier training run, but {args.output_dir} has no "
                       "checkpoint.pth or numbered checkpoint to resume it from; pass another --output_dir, or "
                       "--overwrite to start a new run there (its log lines are replaced)")


def parse_log_line(line):
    with contextlib.suppress(ValueError):
        return json.loads(line)
    return None


def unread_flags(args):
    """The flags this run does not read, with why: {name: why} (given on the command line, they get a warning)."""
    unread = {}
    if not args.local_crops_number:
        unread.update(dict.fromkeys(['local_crops_scale', 'local_crops_size'], 'with --local_crops_number 0'))
    if not args.warmup_teacher_temp_epochs:
        unread['warmup_teacher_temp'] = 'with --warmup_teacher_temp_epochs 0 (no warm-up)'
    if not args.collapse_window:
        unread['collapse_margin'] = 'with --collapse_window 0 (no collapse warning)'
    if not args.init_weights:
        unread['init_heads'] = 'without --init_weights'
    if not args.knn_every:
        unread.update(dict.fromkeys(['knn_data', 'knn_limit'], 'with --knn_every 0 (no k-NN monitor)'))
    if imagedata.is_builtin(args.data_path):
        unread['strict_data'] = f'on --data_path {args.data_path} (its images are always readable)'
    return unread


def check_numbers(args):
    utils.check_common_args(args)
    utils.check_at_least(args, 1, 'epochs', 'out_dim', 'data_limit', 'accum_steps')
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
    if args.grad_checkpointing and args.arch not in utils.VIT_ARCHS:
        utils.fail(f"--grad_checkpointing checkpoints the blocks of a ViT; --arch {args.arch} is not one: leave "
                   "it out, or lower --batch_size_per_device to fit the memory")
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
    if args.local_crops_number and args.local_crops_size > args.global_crops_size:
        utils.warn(f"--local_crops_size {args.local_crops_size} is larger than --global_crops_size "
                   f"{args.global_crops_size}: DINO's local views are the small ones (96 and 224 pixels in the paper); "
                   "were the two swapped?")


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
