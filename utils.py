"""Helpers shared by the DINO training and evaluation scripts.

Sections: argument checking; shared flags, devices and precision; distributed runs; models;
optimisation, schedules and seeds; checkpoints; stopping on signals and the fault hook; released
weights and pretrained backbones; logging and metrics; training augmentation; datasets and image
loading; evaluation data and feature extraction; retrieval metrics; frozen ViT and attention maps.
"""
import argparse
import atexit
import builtins
import contextlib
import datetime
import errno
import importlib.util
import itertools
import math
import multiprocessing
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections import defaultdict, deque
from typing import NamedTuple

import cv2
import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFile, ImageFilter, ImageOps, UnidentifiedImageError

import vision_transformer as vits

REPO_DIR = os.path.dirname(os.path.abspath(__file__))
# safe_globals (restricted checkpoint loading) arrived in 2.5; scaled_dot_product_attention(scale=) in 2.1
MIN_TORCH_VERSION = (2, 5)


def fail(message):
    """Stop with one line on stderr and exit status 1 (for user mistakes, never a traceback)."""
    raise SystemExit(f"error: {message}")


def check_torch_version(version=None):
    """Stop with one line when the installed PyTorch is older than MIN_TORCH_VERSION."""
    version = version or torch.__version__
    found = tuple(int(part) for part in re.findall(r'\d+', version.split('+')[0])[:2])
    if found < MIN_TORCH_VERSION:
        wanted = '.'.join(map(str, MIN_TORCH_VERSION))
        fail(f"PyTorch {version} is too old: this DINO port needs PyTorch {wanted} or newer (Habana's SynapseAI "
             f"1.6.0 stack ships PyTorch 1.12, which cannot run it); use a newer Habana container or pip install torch")


check_torch_version()


# =====================================================================================
# Argument checking (every script's check_args runs these before any work or output)
# =====================================================================================

def parse_checked_args(parser, check_args, argv=None):
    """A script's command line: parsed, --arch/--patch_size completed from a training checkpoint given as
    --pretrained_weights, then checked by the script's own check_args (one error line, before any work)."""
    args = parser.parse_args(argv)
    if hasattr(args, 'pretrained_weights'):
        take_model_from_checkpoint(parser, args, argv)
    check_args(args)
    return args


def check_output_dir(path, flag='--output_dir'):
    """Stop unless `path` is a folder this process can write in, or one it can create; creates nothing."""
    path = os.path.abspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        fail(f"{flag} {path} is a file, not a folder; pass a folder (it is created if missing)")
    existing = path
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        fail(f"{flag} {path} cannot be created: {existing} is a file, not a folder; pass another path")
    try:  # an unnamed file (O_TMPFILE on Linux): nothing appears in the folder
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as exc:
        fail(f"{flag} {path}: cannot write in {existing} ({exc.strerror}); pass a folder you can write to")


def check_input_file(path, flag):
    """Stop unless `path` is a readable file."""
    if not os.path.isfile(path):
        what = 'a folder' if os.path.isdir(path) else 'not found'
        fail(f"{flag} {path}: {what}; pass an existing file")
    if not os.access(path, os.R_OK):
        fail(f"{flag} {path} cannot be read (permission denied)")


def check_input_folder(path, flag):
    """Stop unless `path` is a readable folder."""
    if not os.path.isdir(path):
        what = 'a file' if os.path.exists(path) else 'not found'
        fail(f"{flag} {path}: {what}; pass an existing folder")
    if not os.access(path, os.R_OK | os.X_OK):
        fail(f"{flag} {path} cannot be read (permission denied)")


def check_at_least(args, minimum, *names):
    """Stop unless every named number argument (when given; each value of a list) is at least `minimum`."""
    for name in names:
        values = getattr(args, name, None)
        for value in values if isinstance(values, (list, tuple)) else [values]:
            if value is not None and value < minimum:
                fail(f"--{name} must be at least {minimum}, got {value}")


def check_image_size(size, patch_size, flag):
    """A side the ViT cuts into patch_size patches must hold at least one patch."""
    if size < patch_size:
        fail(f"{flag} {size} is smaller than one {patch_size}-pixel patch (--patch_size {patch_size}); "
             f"use at least {patch_size}")


def check_vit_arch(args, why):
    """Stop unless --arch is one of this repository's ViTs (`why`: what the script needs a ViT for)."""
    if args.arch not in VIT_ARCHS:
        fail(f"--arch {args.arch}: {why}; choose one of {', '.join(VIT_ARCHS)}")


def check_common_args(args):
    """Checks of the flags most scripts share (each only where the script has it)."""
    check_at_least(args, 1, 'patch_size', 'batch_size_per_device', 'batch_size', 'dist_timeout')
    check_at_least(args, 0, 'num_workers')
    if not 0 <= getattr(args, 'seed', 0) < 2 ** 32:  # NumPy's range
        fail(f"--seed must be between 0 and 2**32 - 1, got {args.seed}")
    if getattr(args, 'pretrained_weights', ''):
        check_input_file(args.pretrained_weights, '--pretrained_weights')


# =====================================================================================
# Shared flags, devices and precision (every script; bool_flag is the flags' true/false type)
# =====================================================================================

_mark_step_enabled = False


def bool_flag(s):
    """argparse type for true/false values written as on/off, true/false or 1/0."""
    if s.lower() in {'off', 'false', '0'}:
        return False
    if s.lower() in {'on', 'true', '1'}:
        return True
    raise argparse.ArgumentTypeError('invalid value for a boolean flag (use true/false)')


def add_extraction_args(parser):
    """The flags of the scripts that extract frozen features: where they are kept, and the loader workers."""
    parser.add_argument('--store_on_device', '--use_cuda', dest='store_on_device', default=True,
                        type=bool_flag, help="""Keep the extracted features on the device (else in host memory);
        set false if the device runs out of memory.""")
    parser.add_argument('--num_workers', default=10, type=int, help='Data loading workers per device.')


def add_model_args(parser, arch, patch_size, weights=True):
    """--arch and --patch_size with this script's defaults (the original's), and with `weights` the flags
    naming the weights to load: --pretrained_weights and --checkpoint_key."""
    parser.add_argument('--arch', default=arch, type=str, help="""Architecture: vit_tiny, vit_small, vit_base
        (deit_tiny/deit_small are aliases); scripts that do not need a ViT also take a torchvision network
        such as resnet50.""")
    parser.add_argument('--patch_size', default=patch_size, type=int, help="""Size in pixels of the square input
        patches of a ViT (16 or 8). Smaller patches work better but cost more memory and time.""")
    if weights:
        parser.add_argument('--pretrained_weights', default='', type=str, help="""Weights to load: a backbone file
            or a DINO training checkpoint (whose --arch/--patch_size are then used); empty: DINO's released
            weights for --arch/--patch_size (image retrieval: vit_small/16 gets the Google Landmarks v2 ones).""")
        parser.add_argument('--checkpoint_key', default='teacher', type=str,
                            help='Network to take from a DINO checkpoint ("teacher" or "student").')
    return parser


def add_device_args(parser):
    """Device and mixed-precision flags shared by every script."""
    parser.add_argument('--device', default='auto', choices=['auto', 'hpu', 'cuda', 'cpu'],
                        help='Device to run on; auto picks HPU, then CUDA, then CPU.')
    parser.add_argument('--autocast', '--hmp', dest='autocast', action='store_true',
                        help='Run forward passes (and the loss) under bf16 autocast (HPU, CUDA or CPU).')
    parser.add_argument('--hmp-bf16', '--hmp_bf16', dest='hmp_bf16', default=os.path.join(REPO_DIR, 'ops_bf16.txt'),
                        help='HPU autocast: file listing the ops to run in bf16.')
    parser.add_argument('--hmp-fp32', '--hmp_fp32', dest='hmp_fp32', default=os.path.join(REPO_DIR, 'ops_fp32.txt'),
                        help='HPU autocast: file listing the ops kept in fp32.')
    parser.add_argument('--lazy_mode', default=True, type=bool_flag,
                        help='HPU only: run in lazy mode with mark_step() between phases (default true).')
    return parser


def _habana_present():
    return importlib.util.find_spec('habana_frameworks') is not None


def _set_hpu_environment(args):
    """Environment Habana reads when its modules are imported, so it must be set first."""
    os.environ['PT_HPU_LAZY_MODE'] = '1' if args.lazy_mode else '0'
    if getattr(args, 'autocast', False):
        for path in (args.hmp_bf16, args.hmp_fp32):
            if not os.path.isfile(path):
                fail(f"autocast op list {path} not found; pass an existing file with --hmp-bf16/--hmp-fp32")
        # older releases read LOWER_LIST/FP32_LIST, newer ones the PT_HPU_AUTOCAST_* names
        os.environ['LOWER_LIST'] = os.environ['PT_HPU_AUTOCAST_LOWER_PRECISION_OPS_LIST'] = args.hmp_bf16
        os.environ['FP32_LIST'] = os.environ['PT_HPU_AUTOCAST_FP32_OPS_LIST'] = args.hmp_fp32


def _hpu_available():
    import habana_frameworks.torch.hpu as hthpu
    return hthpu.is_available()


def resolve_device_name(requested):
    """'auto' -> the best device present; an explicit device that is absent stops with one line."""
    if requested == 'hpu':
        if not _habana_present():
            fail("--device hpu needs Habana's PyTorch packages (habana_frameworks), which are not installed; "
                 "run on a Gaudi image or choose --device cuda/cpu")
        if not _hpu_available():
            fail("--device hpu: habana_frameworks is installed but no Gaudi device was found; "
                 "choose --device cuda/cpu")
        return 'hpu'
    if requested == 'cuda':
        if not torch.cuda.is_available():
            fail("--device cuda: no CUDA GPU is visible to PyTorch (or this torch build has no CUDA); "
                 "choose --device cpu or install a CUDA build of torch")
        return 'cuda'
    if requested == 'cpu':
        return 'cpu'
    if _habana_present() and _hpu_available():
        return 'hpu'
    return 'cuda' if torch.cuda.is_available() else 'cpu'


def setup_device(args):
    """Resolve args.device in place, prepare HPU specifics, and return the device type name.

    Call once, before init_distributed_mode and before any model is built.
    """
    global _mark_step_enabled
    if args.device in ('auto', 'hpu') and _habana_present():
        _set_hpu_environment(args)
    args.device = resolve_device_name(args.device)
    if args.device == 'hpu':
        import habana_frameworks.torch.core  # noqa: F401  (registers the device)
        _mark_step_enabled = bool(args.lazy_mode)
    else:
        _mark_step_enabled = False
    if getattr(args, 'use_fp16', False) and args.device != 'cuda':
        args.use_fp16 = False  # fp16 + GradScaler is the CUDA-only path, as in the original
    return args.device


def mark_step():
    """Cut the lazy HPU graph here; a no-op on every other device or in eager mode."""
    if _mark_step_enabled:
        import habana_frameworks.torch.core as htcore
        htcore.mark_step()


def synchronize(device_type):
    """Wait for queued device work (for timing)."""
    if device_type == 'cuda':
        torch.cuda.synchronize()
    elif device_type == 'hpu':
        import habana_frameworks.torch.hpu as hthpu
        hthpu.synchronize()


def autocast_context(device_type, autocast=False, use_fp16=False):
    """bf16 autocast when --autocast, fp16 autocast on CUDA when --use_fp16, else nothing."""
    if device_type == 'cuda' and use_fp16:
        return torch.autocast(device_type='cuda', dtype=torch.float16)
    if autocast:
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# =====================================================================================
# Distributed runs (every script): process group, collectives, start of a run, one-line failure reports
# =====================================================================================

def is_dist_avail_and_initialized():
    return dist.is_available() and dist.is_initialized()


def get_world_size():
    return dist.get_world_size() if is_dist_avail_and_initialized() else 1


def get_rank():
    return dist.get_rank() if is_dist_avail_and_initialized() else 0


def is_main_process():
    return get_rank() == 0


def add_distributed_args(parser):
    parser.add_argument('--dist_url', default='env://', type=str,
                        help='URL used to set up distributed training (see torch.distributed).')
    # torch.distributed.launch passes one of these spellings; torchrun uses LOCAL_RANK instead
    parser.add_argument('--local_rank', '--local-rank', dest='local_rank', default=0, type=int,
                        help=argparse.SUPPRESS)
    parser.add_argument('--dist_timeout', default=1800, type=int, help='''Seconds a process waits for the
        others in a collective operation before giving up, so that a dead or stuck process stops the whole
        job instead of hanging it (default 1800, as in PyTorch).''')
    return parser


# each process-group backend and the device type its collectives take their tensors on
BACKEND_DEVICE_TYPES = {'nccl': 'cuda', 'hccl': 'hpu', 'gloo': 'cpu'}


def _backend_for(device_type):
    if device_type == 'hpu':
        import habana_frameworks.torch.distributed.hccl  # noqa: F401  (registers the hccl backend)
    return {device: backend for backend, device in BACKEND_DEVICE_TYPES.items()}[device_type]


def init_distributed_mode(args):
    """Join the process group set up by torchrun / torch.distributed.launch / SLURM.

    A launched process joins even when it is the only one (as in the original), so that a one-device
    torchrun exercises the real collectives; a lone process (no launcher variables) runs with no
    process group at all. Sets args.rank, args.world_size, args.gpu (local device index) and
    args.distributed (whether a process group was joined).
    """
    if 'RANK' in os.environ and 'WORLD_SIZE' in os.environ:
        args.rank = int(os.environ['RANK'])
        args.world_size = int(os.environ['WORLD_SIZE'])
        args.gpu = int(os.environ.get('LOCAL_RANK', getattr(args, 'local_rank', 0)))
    elif 'SLURM_PROCID' in os.environ and 'SLURM_NTASKS' in os.environ:
        args.rank = int(os.environ['SLURM_PROCID'])
        args.world_size = int(os.environ['SLURM_NTASKS'])
        args.gpu = int(os.environ.get('SLURM_LOCALID', 0))
    else:
        args.rank, args.world_size, args.gpu, args.distributed = 0, 1, 0, False
        if args.device == 'cuda':
            torch.cuda.set_device(0)
        setup_for_distributed(True)
        return
    args.distributed = True
    if args.device == 'cuda':
        torch.cuda.set_device(args.gpu % torch.cuda.device_count())
    # a collective that waits longer than this raises on every surviving process instead of hanging
    timeout = datetime.timedelta(seconds=getattr(args, 'dist_timeout', 1800))
    dist.init_process_group(backend=_backend_for(args.device), world_size=args.world_size, rank=args.rank,
                            timeout=timeout, **_rendezvous(args, timeout))
    barrier()
    setup_for_distributed(args.rank == 0)


def _rendezvous(args, timeout):
    """Where init_process_group meets the other processes: args.dist_url, except in a one-task SLURM job
    and after a torchrun restart.

    Restarted workers share the launcher's key-value store with the attempt that failed, whose stale
    addresses would make them hang; they meet under keys of their own attempt instead.
    """
    if args.world_size == 1 and args.dist_url == 'env://' and 'MASTER_ADDR' not in os.environ:
        return {'store': dist.HashStore()}  # a one-task SLURM job: nobody to meet
    attempt = os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')
    if args.dist_url != 'env://' or attempt == '0' or os.environ.get('TORCHELASTIC_USE_AGENT_STORE') != 'True':
        return {'init_method': args.dist_url}
    store = dist.TCPStore(os.environ['MASTER_ADDR'], int(os.environ['MASTER_PORT']), args.world_size,
                          is_master=False, timeout=timeout)
    return {'store': dist.PrefixStore(f'restart{attempt}', store)}


_builtin_print = builtins.print


def setup_for_distributed(is_master):
    """Make print() silent on every process but rank 0 (unless called with force=True).

    Installed in a lone process too, so that print(..., force=True) works everywhere.
    """
    def print_on_master(*args, **kwargs):
        force = kwargs.pop('force', False)
        if is_master or force:
            _builtin_print(*args, **kwargs)

    builtins.print = print_on_master


def is_peer_failure(exc):
    """Whether an exception comes from a collective whose peers died, hung or timed out."""
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc)
    return any(word in text for word in ('gloo', 'NCCL', 'nccl', 'hccl', 'HCCL', 'Connection closed by peer',
                                         'Connection reset by peer', 'Timed out waiting'))


def peer_failure_message(exc, args):
    """One line for a job that lost one of its processes."""
    detail = next((line for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
    detail = re.sub(r'^\[[^\]]*\]\s*', '', detail.strip())[:200]  # drop the C++ source location
    return (f"process {getattr(args, 'rank', 0)} lost contact with the other processes of the job ({detail}; "
            f"--dist_timeout is {getattr(args, 'dist_timeout', 1800)} s); stopping. "
            "Restart the job to resume from the last checkpoint")


def run_reporting_failures(pipeline, args, data_hint="remove or fix the file and run again"):
    """pipeline(args), then leave the process group (a process that exits while in one can abort); an
    unreadable image or a lost peer process reported as one error line, and Ctrl-C (where the pipeline does
    not handle it) as one line and exit status 130."""
    try:
        result = pipeline(args)
        leave_process_group()
        return result
    except KeyboardInterrupt:
        _builtin_print("Interrupted (Ctrl-C); the files already written are kept.", file=sys.stderr)
        raise SystemExit(130) from None
    except DataError as exc:
        fail(f"{data_error_message(exc)}; {data_hint}")
    except (RuntimeError, ConnectionError, EOFError) as exc:
        dead_worker = _dead_data_worker(exc)
        if dead_worker:
            fail(dead_worker_message(dead_worker, args))
        if not (isinstance(exc, RuntimeError) and getattr(args, 'distributed', False) and is_peer_failure(exc)):
            raise
        fail(peer_failure_message(exc, args))


# what torch's DataLoader raises when one of its worker processes is killed
DEAD_WORKER = re.compile(r"DataLoader worker \(pid(?:\(s\))? ([\d, ]+)\)[^\n]*?(?:signal: (\w+)|$)", re.M)


def _dead_data_worker(exc):
    """The DEAD_WORKER match for a DataLoader worker that died, named in `exc` or not yet reported, or None.

    A worker killed while handing over a batch breaks the connection before it is seen to be dead:
    then wait for it a little.
    """
    match = DEAD_WORKER.search(str(exc))
    checks = 1 if isinstance(exc, RuntimeError) else 20
    try:
        for _ in range(checks if match is None else 0):
            torch._C._error_if_any_worker_fails()  # what torch's SIGCHLD handler calls
            time.sleep(0.1)
    except RuntimeError as dead:  # raised by that check, or by the handler during the wait
        match = DEAD_WORKER.search(str(dead))
    return match


def dead_worker_message(match, args):
    """One line for a DataLoader worker process that died (the out-of-memory killer, usually)."""
    pids, signame = match.groups()
    how = f"was killed by signal {signame}" if signame else "exited unexpectedly"
    return (f"data loading worker (pid {pids.strip()}) of process {getattr(args, 'rank', 0)} {how}, most likely "
            "by the out-of-memory killer; lower --num_workers or the memory use (e.g. --batch_size_per_device), "
            "then run the same command again (training resumes from its last checkpoint)")


def device_for(args):
    """torch.device of this process."""
    if args.device == 'cuda':
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device(args.device)


def start_run(args, show_args=True, join_group=True):
    """Resolve --device, join the launcher's process group (if any; single-process tools pass
    join_group=False), print the git commit and the arguments; returns this process's torch.device.
    """
    setup_device(args)
    if join_group:
        init_distributed_mode(args)
    if show_args:
        print(f"git:\n  {get_sha()}\n")
        print("\n".join(f"{k}: {v}" for k, v in sorted(vars(args).items())))
    return device_for(args)


class SingleProcess(nn.Module):
    """Stand-in for DistributedDataParallel in a lone process: same `.module`, same state-dict keys."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def wrap_ddp(model, args):
    """DDP across processes (no device_ids on HPU/CPU), or the single-process stand-in."""
    if not getattr(args, 'distributed', False):
        return SingleProcess(model)
    if args.device == 'cuda':
        return nn.parallel.DistributedDataParallel(model, device_ids=[torch.cuda.current_device()])
    return nn.parallel.DistributedDataParallel(model)


# Every collective of the scripts goes through the helpers below. Each hands the backend a copy of its
# tensor on the device the backend works on (nccl: this process's GPU, hccl: the Gaudi, gloo: the CPU), in
# a dtype the backend takes, and returns the result on the caller's tensor's device and in its dtype.

def backend_device(backend):
    """torch.device on which collectives of `backend` ('nccl', 'hccl', 'gloo') take their tensors."""
    device_type = BACKEND_DEVICE_TYPES.get(str(backend).lower(), 'cpu')
    if device_type == 'cuda':
        return torch.device('cuda', torch.cuda.current_device())
    return torch.device(device_type)


def backend_dtype(dtype, backend):
    """The dtype a tensor of `dtype` travels in: HCCL takes 32-bit and 16-bit floats and 32-bit integers only."""
    if str(backend).lower() != 'hccl':
        return dtype
    if dtype.is_floating_point:
        return torch.float32 if dtype == torch.float64 else dtype
    return torch.int32


def _to_backend(tensor, copy=False):
    backend = dist.get_backend()
    return tensor.to(device=backend_device(backend), dtype=backend_dtype(tensor.dtype, backend), copy=copy)


def all_reduce(tensor):
    """Sum of `tensor` over processes, as a new tensor where `tensor` is (`tensor` itself in a lone process)."""
    if not is_dist_avail_and_initialized():
        return tensor
    staged = _to_backend(tensor, copy=True)
    dist.all_reduce(staged)
    return staged.to(device=tensor.device, dtype=tensor.dtype)


def all_gather(tensor):
    """The `tensor`s of all processes (same shape everywhere), concatenated along dim 0 in rank order."""
    if not is_dist_avail_and_initialized():
        return tensor
    staged = _to_backend(tensor).contiguous()
    gathered = [torch.empty_like(staged) for _ in range(get_world_size())]
    dist.all_gather(gathered, staged)
    return torch.cat(gathered).to(device=tensor.device, dtype=tensor.dtype)


def all_gather_object(obj):
    """List of the picklable `obj` of every process, in rank order ([obj] in a lone process).

    torch serialises the objects into byte tensors on the device of the process group's backend.
    """
    if not is_dist_avail_and_initialized():
        return [obj]
    gathered = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def barrier():
    """Wait for every process (no-op in a lone process); NCCL is told which GPU is this process's."""
    if not is_dist_avail_and_initialized():
        return
    if dist.get_backend() == 'nccl':
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def leave_process_group():
    """At the end of a script: wait for every process, then leave the process group (if any)."""
    if is_dist_avail_and_initialized():
        barrier()
        dist.destroy_process_group()


def reduce_dict(input_dict, average=True):
    """The original's helper: every value (a tensor) summed, or averaged, over processes; keys in sorted order."""
    if get_world_size() < 2:
        return input_dict
    names = sorted(input_dict)
    with torch.no_grad():
        values = all_reduce(torch.stack([input_dict[name] for name in names]))
        if average:
            values /= get_world_size()
    return dict(zip(names, values))


def save_on_master(*args, **kwargs):
    if is_main_process():
        save_checkpoint(*args, **kwargs)


# =====================================================================================
# Models: backbones (training and evaluations), the multi-crop wrapper (main_dino)
# =====================================================================================

VIT_ARCHS = ['vit_tiny', 'vit_small', 'vit_base', 'deit_tiny', 'deit_small']
trunc_normal_ = vits.trunc_normal_  # the original kept it here; code written against it imports utils.trunc_normal_


def torchvision_archs():
    from torchvision import models as torchvision_models
    return sorted(name for name in torchvision_models.__dict__
                  if name.islower() and not name.startswith('__') and callable(torchvision_models.__dict__[name]))


def build_backbone(arch, patch_size=16, **vit_kwargs):
    """A ViT of this repository or a torchvision network, with its feature dimension."""
    arch = arch.replace('deit', 'vit')
    if arch in ('vit_tiny', 'vit_small', 'vit_base'):
        model = vits.__dict__[arch](patch_size=patch_size, **vit_kwargs)
        return model, model.embed_dim
    from torchvision import models as torchvision_models
    if arch in torchvision_archs():
        model = torchvision_models.__dict__[arch]()
        if not hasattr(model, 'fc'):
            fail(f"--arch {arch}: only torchvision networks with a final 'fc' layer (ResNets, ...) are supported")
        embed_dim = model.fc.weight.shape[1]
        model.fc = nn.Identity()
        return model, embed_dim
    fail(f"unknown --arch {arch}; choose one of {', '.join(VIT_ARCHS)} or a torchvision network such as resnet50")


class MultiCropWrapper(nn.Module):
    """Backbone once per run of same-resolution crops, then the head once on all outputs.

    Expects a list of crops, grouped by resolution (global crops first, then local ones).
    """

    def __init__(self, backbone, head):
        super().__init__()
        backbone.fc, backbone.head = nn.Identity(), nn.Identity()
        self.backbone = backbone
        self.head = head

    def forward(self, x):
        if not isinstance(x, list):
            x = [x]
        resolutions = torch.tensor([inp.shape[-1] for inp in x])
        group_ends = torch.cumsum(torch.unique_consecutive(resolutions, return_counts=True)[1], 0).tolist()
        outputs, start = [], 0
        for end in group_ends:
            out = self.backbone(torch.cat(x[start:end]))
            if isinstance(out, tuple):
                out = out[0]
            outputs.append(out)
            start = end
        return self.head(torch.cat(outputs))


def has_batchnorms(model):
    bn_types = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
    return any(isinstance(m, bn_types) for m in model.modules())


# =====================================================================================
# Optimisation, schedules and seeds (main_dino, eval_linear, benchmark)
# =====================================================================================

def fix_random_seeds(seed=31):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def cosine_scheduler(base_value, final_value, epochs, niter_per_ep, warmup_epochs=0, start_warmup_value=0):
    """Per-iteration values: linear warm-up to base_value, then a half cosine down to final_value."""
    warmup_iters = warmup_epochs * niter_per_ep
    warmup = np.linspace(start_warmup_value, base_value, warmup_iters) if warmup_iters > 0 else np.array([])
    steps = np.arange(epochs * niter_per_ep - warmup_iters)
    cosine = final_value + 0.5 * (base_value - final_value) * (1 + np.cos(np.pi * steps / len(steps)))
    schedule = np.concatenate((warmup, cosine))
    assert len(schedule) == epochs * niter_per_ep
    return schedule


def get_params_groups(model):
    """Two groups: weights with weight decay, biases and 1-D parameters (norms) without."""
    regularized, not_regularized = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.endswith('.bias') or param.ndim == 1:
            not_regularized.append(param)
        else:
            regularized.append(param)
    return [{'params': regularized}, {'params': not_regularized, 'weight_decay': 0.}]


def clip_gradients(model, clip):
    """Scale each parameter's gradient by min(1, clip / (its norm + 1e-6)), as DINO defines clipping.

    Vectorised over parameters and free of host synchronisation (the coefficient is clamped on
    the device instead of tested on the host). Returns the per-parameter norms (a device tensor).
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(0)
    norms = torch.stack(torch._foreach_norm(grads, 2.0))
    coefficients = (clip / (norms + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, list(coefficients.to(grads[0].dtype).unbind(0)))
    return norms


def cancel_gradients_last_layer(epoch, model, freeze_last_layer):
    """Drop the gradients of the head's last layer during the first `freeze_last_layer` epochs."""
    if epoch >= freeze_last_layer:
        return
    for name, param in model.named_parameters():
        if 'last_layer' in name:
            param.grad = None


class LARS(torch.optim.Optimizer):
    """LARS (SGD with layer-wise trust ratio); 1-D parameters get neither decay nor adaptation."""

    def __init__(self, params, lr=0, weight_decay=0, momentum=0.9, eta=0.001,
                 weight_decay_filter=None, lars_adaptation_filter=None):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta,
                        weight_decay_filter=weight_decay_filter, lars_adaptation_filter=lars_adaptation_filter)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group['params']:
                if p.grad is None:
                    continue
                update = p.grad
                if p.ndim != 1:
                    update = update.add(p, alpha=group['weight_decay'])
                    param_norm, update_norm = torch.norm(p), torch.norm(update)
                    ones = torch.ones_like(param_norm)
                    trust = torch.where(param_norm > 0.,
                                        torch.where(update_norm > 0, group['eta'] * param_norm / update_norm, ones),
                                        ones)
                    update = update.mul(trust)
                state = self.state[p]
                if 'mu' not in state:
                    state['mu'] = torch.zeros_like(p)
                mu = state['mu']
                mu.mul_(group['momentum']).add_(update)
                p.add_(mu, alpha=-group['lr'])


# =====================================================================================
# Checkpoints: atomic writes, checked reads, resume, RNG state (main_dino, eval_linear, eval_knn)
# =====================================================================================

def _numpy_scalar_globals():
    """What unpickling a NumPy number needs (the original DINO stored the scheduled lr as one)."""
    core = np._core if hasattr(np, '_core') else np.core
    dtypes = [getattr(np.dtypes, name) for name in ('Float64DType', 'Float32DType', 'Int64DType', 'Int32DType')
              if hasattr(getattr(np, 'dtypes', None), name)]
    return [core.multiarray.scalar, (core.multiarray.scalar, 'numpy.core.multiarray.scalar'), np.dtype, *dtypes]


# Types besides tensors and containers that DINO checkpoints hold: the run's arguments and NumPy numbers.
SAFE_CHECKPOINT_GLOBALS = [argparse.Namespace, *_numpy_scalar_globals()]


class CheckpointError(Exception):
    """A checkpoint that cannot be used; `unsafe` when it holds objects that could run code when loaded."""

    def __init__(self, message, unsafe=False):
        super().__init__(message)
        self.unsafe = unsafe


def read_checkpoint(path):
    """torch.load restricted to tensors, plain values and SAFE_CHECKPOINT_GLOBALS; CheckpointError otherwise.

    Nothing in the file is executed: a pickle that names any other function or class is refused.
    """
    try:
        with torch.serialization.safe_globals(SAFE_CHECKPOINT_GLOBALS), warnings.catch_warnings():
            warnings.simplefilter('ignore')  # torch warns about pickle protocols before refusing
            return torch.load(path, map_location='cpu', weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} not found") from None
    except Exception as exc:  # refused globals, truncated archives, unpickling errors, ...
        text = str(exc)
        refused = re.search(r"GLOBAL (\S+) was not an allowed global|whose module (\S+) is blocked", text)
        if refused:
            raise CheckpointError(
                f"refusing to load {path}: it refers to {refused.group(1) or refused.group(2)}, which could run "
                "code when unpickled; only checkpoints of tensors and plain values are accepted "
                "(if you trust its source, re-save its state dicts alone)", unsafe=True) from None
        raise CheckpointError(f"{path} is damaged or not a PyTorch checkpoint ({_damage(path, exc)})") from None


def _damage(path, exc):
    """What is wrong with a checkpoint file torch.load could not read, in words (not torch's internals)."""
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        return "the file is empty"
    text = str(exc)
    if isinstance(exc, EOFError) or 'EOF' in text or 'central directory' in text:
        return "the file is cut short: an interrupted write or copy?"
    if isinstance(exc, IsADirectoryError):
        return "it is a folder"
    return "in neither of PyTorch's file formats, zip archive or pickle"


def load_checkpoint_or_exit(path):
    """read_checkpoint, stopping with one clear line when the file is missing, damaged or unsafe."""
    try:
        return read_checkpoint(path)
    except CheckpointError as exc:
        fail(str(exc))


def save_checkpoint(obj, path):
    """Write to a temporary file in the same folder, flush it to disk, then rename it into place.

    A kill or a full disk during the write leaves the previous file at `path` intact.
    A write that fails (a full disk, a quota, an I/O error) stops the run with one line saying how
    much space the checkpoint needs, rather than letting it train on without checkpoints.
    """
    tmp_path = f"{path}.tmp{os.getpid()}"
    failure = None
    try:
        with open(tmp_path, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        fault_point('save')
        os.replace(tmp_path, path)
    except OSError as exc:
        failure = exc
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp_path)
    if failure is not None:
        fail(_write_failure_message(failure, obj, path))
    _fsync_folder(os.path.dirname(os.path.abspath(path)))


def _write_failure_message(exc, obj, path):
    folder = os.path.dirname(os.path.abspath(path))
    space = f"it needs about {_tensor_bytes(obj) / 2 ** 20:.1f} MiB in {folder}"
    with contextlib.suppress(OSError):
        space += f", which has {shutil.disk_usage(folder).free / 2 ** 20:.1f} MiB free"
    return (f"cannot write checkpoint {path} ({exc.strerror or exc}): {space}. Any earlier checkpoint there is "
            "intact; free some space and run the same command to resume from it")


def _tensor_bytes(obj):
    """Bytes of the tensors in a (nested) state dict: close to the size of its checkpoint file."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(map(_tensor_bytes, obj.values()))
    if isinstance(obj, (list, tuple)):
        return sum(map(_tensor_bytes, obj))
    return 0


def _fsync_folder(folder):
    """Make a rename durable (POSIX); a no-op where folders cannot be opened."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def to_cpu(obj):
    """Copy of a (nested) state dict with every tensor on the CPU and NumPy numbers as Python ones."""
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


DEFAULT_MISMATCH_HINT = "was it written with another --arch, --patch_size, --out_dim or optimizer?"


def _load_state_dict_or_fail(module, state_dict, what, path, hint=DEFAULT_MISMATCH_HINT):
    try:
        return module.load_state_dict(state_dict, strict=False)
    except TypeError:
        return module.load_state_dict(state_dict)
    except (RuntimeError, ValueError, KeyError) as exc:
        detail = str(exc).strip().splitlines()
        detail = next((line.strip() for line in detail if 'size mismatch' in line), detail[0] if detail else '')
        fail(f"{path} does not fit this run's {what} ({detail[:200]}); {hint} "
             "Use a matching setting or another --output_dir")


def restart_from_checkpoint(ckp_path, run_variables=None, mismatch_hint=DEFAULT_MISMATCH_HINT, **kwargs):
    """Load each named object (model, optimizer, ...) from the checkpoint if present, and run_variables.

    A damaged checkpoint is reported and the newest intact numbered one beside it (checkpoint0042.pth
    for checkpoint.pth) is used instead; without one the run stops. Unsafe files are always refused.
    `mismatch_hint` names the flags that could make a state dict not fit (in the error line).
    Returns the path actually loaded, or None when there is no checkpoint.
    """
    if is_main_process():
        _remove_interrupted_writes(ckp_path)
    if not os.path.isfile(ckp_path):
        return None
    checkpoint, ckp_path = _read_checkpoint_or_fallback(ckp_path)
    print(f"Found checkpoint at {ckp_path}")
    for key, value in kwargs.items():
        if value is None:
            continue
        if key in checkpoint:
            msg = _load_state_dict_or_fail(value, checkpoint[key], key, ckp_path, mismatch_hint)
            print(f"=> loaded '{key}' from checkpoint '{ckp_path}' with msg {msg}")
        else:
            print(f"=> key '{key}' not found in checkpoint: '{ckp_path}'")
    if run_variables is not None:
        for name in run_variables:
            if name in checkpoint:
                run_variables[name] = checkpoint[name]
    return ckp_path


def numbered_checkpoints(ckp_path):
    """The checkpoints kept beside `ckp_path` (checkpointNNNN.pth for checkpoint.pth), newest first."""
    folder, name = os.path.split(ckp_path)
    stem, dot, ext = name.partition('.')
    pattern = re.compile(rf"{re.escape(stem)}(\d+){re.escape(dot + ext)}")
    found = [(int(m.group(1)), m.group(0)) for m in map(pattern.fullmatch, os.listdir(folder or '.')) if m]
    return [os.path.join(folder, f) for _, f in sorted(found, reverse=True)]


def _read_checkpoint_or_fallback(ckp_path):
    try:
        return read_checkpoint(ckp_path), ckp_path
    except CheckpointError as exc:
        if exc.unsafe:
            fail(str(exc))
        damage = str(exc)
    candidates = numbered_checkpoints(ckp_path)
    if candidates:
        print(f"warning: {damage}; looking for the newest intact numbered checkpoint beside it")
    for candidate in candidates:
        try:
            checkpoint = read_checkpoint(candidate)
        except CheckpointError as exc:
            if exc.unsafe:
                fail(str(exc))
            print(f"warning: {exc}")
            continue
        print(f"Resuming from {candidate} instead, the newest intact numbered checkpoint")
        return checkpoint, candidate
    fail(f"{damage}, and no intact numbered checkpoint was found beside it to resume from; "
         "move it away to start from scratch, or use another --output_dir")


def _remove_interrupted_writes(ckp_path):
    """Delete temporary files that a killed save_checkpoint left beside `ckp_path`."""
    folder, name = os.path.split(ckp_path)
    stem, dot, ext = name.partition('.')
    pattern = re.compile(rf"{re.escape(stem)}\d*{re.escape(dot + ext)}\.tmp\d+")
    if os.path.isdir(folder or '.'):
        for leftover in filter(pattern.fullmatch, os.listdir(folder or '.')):
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, leftover))


def rng_state():
    """Python, NumPy and torch (CPU, and the current CUDA device) random states, storable weights-only."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {'python': random.getstate(), 'torch': torch.get_rng_state(),
             'numpy': (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state['cuda'] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state):
    """Restore what rng_state() returned."""
    random.setstate(state['python'])
    kind, keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state['cuda'])


# =====================================================================================
# Stopping on signals and the fault hook of the fault tests (main_dino)
# =====================================================================================

class StopSignal:
    """Turns SIGTERM and SIGUSR1 (what SLURM and Kubernetes send before preempting) and SIGINT (Ctrl-C)
    into a stop request.

    The training loop asks `requested(device)` at step boundaries, so it can finish the step, write a
    checkpoint and exit (0, or 130 after Ctrl-C) instead of dying mid-step or mid-write. A second Ctrl-C
    stops at once (exit 130); a checkpoint write it cuts short leaves the previous checkpoint intact.
    """
    SIGNALS = tuple(getattr(signal, name) for name in ('SIGTERM', 'SIGUSR1', 'SIGINT') if hasattr(signal, name))

    def __init__(self):
        self.received = None
        for signum in self.SIGNALS:
            signal.signal(signum, self._remember)
        atexit.register(_kill_data_workers)

    def _remember(self, signum, frame):
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            _builtin_print("Interrupted again: stopping now, without a new checkpoint; the last one written is "
                           "kept. Run the same command to resume from it.", file=sys.stderr, flush=True)
            raise SystemExit(130)
        self.received = signum

    @property
    def exit_code(self):
        """What the process should exit with once it stopped: 130 after Ctrl-C (as shells do), else 0."""
        return 130 if self.received == signal.SIGINT else 0

    def __str__(self):
        return signal.Signals(self.received).name if self.received else 'a signal to another process'

    def requested(self, device):
        """True on every process once any of them got a signal (a collective when distributed)."""
        if not is_dist_avail_and_initialized():
            return self.received is not None
        flag = torch.tensor([0. if self.received is None else 1.], device=device)
        return all_reduce(flag).item() > 0

    @staticmethod
    def ignore_in_worker(worker_id=None):
        """DataLoader worker_init_fn: workers leave the stop signals to the training process."""
        for signum in StopSignal.SIGNALS:
            signal.signal(signum, signal.SIG_IGN)


def _kill_data_workers():
    """At exit, end DataLoader workers still running (after a crash): they ignore the SIGTERM with which
    multiprocessing would stop them, and would hold the exit forever."""
    if hasattr(signal, 'SIGCHLD'):
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # else torch reports the kill as a worker failure
    for child in multiprocessing.active_children():
        child.kill()


_fault_counts = defaultdict(int)


def fault_point(name):
    """Test hook: with DINO_FAULT=<name>:<n>:<action>[:<rank>], fail the n-th time this process gets here.

    Actions: kill (SIGKILL itself), hang (sleep until killed), wait (until a stop signal arrives, then go
    on), enospc (raise the OSError of a full disk) or kill_worker (SIGKILL a DataLoader worker of this
    process, as the out-of-memory killer would). A fault fires only in the first attempt of a job that
    torchrun restarts. Used by the robustness tests to kill or stop a run at a chosen iteration or inside a
    checkpoint write, and to make one process of a job hang.
    """
    spec = os.environ.get('DINO_FAULT', '').split(':')
    if spec[0] != name or (len(spec) > 3 and int(spec[3]) != get_rank()):
        return
    _fault_counts[name] += 1
    if _fault_counts[name] != int(spec[1]) or os.environ.get('TORCHELASTIC_RESTART_COUNT', '0') != '0':
        return
    if spec[2] == 'wait':
        _wait_for_stop_signal(f"DINO_FAULT: wait at {name} {spec[1]} (pid {os.getpid()})")
        return
    _inject_fault(spec[2], f"{spec[2]} at {name} {spec[1]}")


def _inject_fault(action, description):
    _builtin_print(f"DINO_FAULT: {description}", flush=True)
    if action == 'kill':
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == 'enospc':
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    elif action == 'kill_worker':
        os.kill(multiprocessing.active_children()[0].pid, signal.SIGKILL)
    else:  # hang, until the launcher ends this process
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        while True:
            time.sleep(60)


def _wait_for_stop_signal(announcement):
    """Print `announcement`, then sleep until SIGTERM or SIGUSR1 arrives; the handlers in place run as usual."""
    arrived = []
    handlers = {signum: signal.getsignal(signum) for signum in StopSignal.SIGNALS}

    def note(signum, frame):
        arrived.append(signum)
        if callable(handlers[signum]):
            handlers[signum](signum, frame)
    for signum in handlers:  # before the announcement: a signal sent as soon as it is read is not lost
        signal.signal(signum, note)
    _builtin_print(announcement, flush=True)
    while not arrived:
        time.sleep(0.05)
    for signum, handler in handlers.items():
        signal.signal(signum, handler)


# =====================================================================================
# Released DINO weights and pretrained backbones (evaluations, attention scripts)
# =====================================================================================

RELEASED_WEIGHTS, ATTENTION_WEIGHTS = vits.RELEASED_WEIGHTS, vits.ATTENTION_WEIGHTS  # the original's names
RELEASED_WEIGHTS_URL, GLDV2_WEIGHTS = vits.RELEASED_WEIGHTS_URL, vits.GLDV2_WEIGHTS


def download_state_dict_or_exit(url, failure):
    """vits.download_state_dict(url), or stop with the line `failure`.format(url=..., reason=...)."""
    try:
        return vits.download_state_dict(url)
    except vits.DownloadError as exc:
        fail(failure.format(url=url, reason=exc))


def _released_key(model_name, patch_size):
    return model_name.replace('deit', 'vit'), None if 'resnet' in model_name else patch_size


def released_linear_weights_url(model_name, patch_size):
    """URL of the released linear head trained on the released backbone, or None when there is none."""
    file = RELEASED_WEIGHTS.get(_released_key(model_name, patch_size))
    return file and RELEASED_WEIGHTS_URL + file.replace('_pretrain.pth', '_linearweights.pth')


def load_pretrained_linear_weights(linear_classifier, model_name, patch_size):
    """The original's helper: load the released linear head of (arch, patch size), or keep random weights."""
    url = released_linear_weights_url(model_name, patch_size)
    if url is None:
        print("We use random linear weights.")
        return
    print(f"We load the reference pretrained linear weights from {url}.")
    state_dict = download_state_dict_or_exit(url, "could not download the released linear head ({url}): {reason}")
    linear_classifier.load_state_dict(state_dict['state_dict'], strict=True)


def download_released_weights(model_name, patch_size, released=None):
    """State dict of the released DINO backbone for (arch, patch size); one clear line when offline.

    `released`: the (arch, patch size) -> file table to take it from (default RELEASED_WEIGHTS).
    """
    released = released or RELEASED_WEIGHTS
    key = _released_key(model_name, patch_size)
    if key not in released:
        fail(f"no released DINO weights for {model_name} with patch size {patch_size}; "
             "pass your own with --pretrained_weights")
    return download_state_dict_or_exit(RELEASED_WEIGHTS_URL + released[key],
                                       "could not download the released DINO weights ({url}): {reason}; "
                                       "when offline, pass a local checkpoint with --pretrained_weights")


def load_pretrained_weights(model, pretrained_weights, checkpoint_key, model_name, patch_size, released=None):
    """Load backbone weights from a released backbone file or a full DINO training checkpoint.

    `checkpoint_key` picks 'teacher' or 'student' in a training checkpoint; 'module.' and
    'backbone.' prefixes are stripped. With no path, the released weights are downloaded
    (from the `released` table, see download_released_weights).
    """
    if pretrained_weights:
        if not os.path.isfile(pretrained_weights):
            fail(f"--pretrained_weights {pretrained_weights} not found")
        state_dict = load_checkpoint_or_exit(pretrained_weights)
        source = pretrained_weights
    else:
        print("No --pretrained_weights given: using the released DINO weights for this architecture.")
        state_dict = download_released_weights(model_name, patch_size, released)
        source = f'released {model_name}/{patch_size}'
    if checkpoint_key and isinstance(state_dict, dict) and checkpoint_key in state_dict:
        print(f"Take key {checkpoint_key} in provided checkpoint dict")
        state_dict = state_dict[checkpoint_key]
    elif isinstance(state_dict, dict) and any(isinstance(v, dict) for v in state_dict.values()):
        networks = [k for k, v in state_dict.items() if isinstance(v, dict) and v and all(map(torch.is_tensor, v.values()))]
        fail(f"{source} has no '{checkpoint_key}' network (it holds {', '.join(networks) or 'none'}); "
             "pass --checkpoint_key with one of them")
    if not isinstance(state_dict, dict):
        fail(f"{source} holds a {type(state_dict).__name__}, not a state dict of weights")
    state_dict = {k.removeprefix('module.').removeprefix('backbone.'): v for k, v in state_dict.items()}
    own = model.state_dict()
    mismatched = [k for k, v in state_dict.items() if k in own and k != 'pos_embed' and own[k].shape != v.shape]
    if mismatched or not any(k in own for k in state_dict):
        fail(f"{source} does not match --arch {model_name} --patch_size {patch_size} "
             f"({'shape of ' + mismatched[0] + ' differs' if mismatched else 'no parameter names in common'}); "
             "pass the --arch/--patch_size it was trained with")
    if 'pos_embed' in state_dict and 'pos_embed' in own and state_dict['pos_embed'].shape != own['pos_embed'].shape:
        fail(f"{source} does not match --arch {model_name} --patch_size {patch_size} (pos_embed shape differs); "
             "pass the --arch/--patch_size it was trained with")
    msg = model.load_state_dict(state_dict, strict=False)
    print(f'Pretrained weights found at {source} and loaded with msg: {msg}')
    return msg


def take_model_from_checkpoint(parser, args, argv=None):
    """--arch/--patch_size from a DINO training checkpoint given as --pretrained_weights (it holds its `args`).

    Flags given on the command line (`argv`, default sys.argv[1:], parsed by `parser`) win, but must agree with
    the checkpoint; released backbone files (no `args`) leave the flags as they are.
    """
    trained = _training_args(getattr(args, 'pretrained_weights', ''))
    if not trained or 'arch' not in trained:
        return
    names = ['arch', 'patch_size'] if 'patch_size' in trained and trained['arch'] in VIT_ARCHS else ['arch']
    probe = argparse.Namespace(**{name: _NOT_GIVEN for name in names})
    parser.parse_known_args(argv, namespace=probe)
    taken = []
    for name in names:
        if getattr(probe, name) is _NOT_GIVEN:
            setattr(args, name, trained[name])
            taken.append(f"--{name} {trained[name]}")
        elif getattr(args, name) != trained[name]:
            fail(f"--{name} {getattr(args, name)} contradicts {args.pretrained_weights}, a checkpoint trained with "
                 f"--{name} {trained[name]}; drop --{name} to use the checkpoint's")
    if taken:
        print(f"Taking {' '.join(taken)} from the training arguments saved in {args.pretrained_weights}")


_NOT_GIVEN = object()


def _training_args(path):
    """The `args` saved in a training checkpoint, as a dict; None for other files (their loader reports errors)."""
    if not path or not os.path.isfile(path):
        return None
    try:
        with torch.serialization.safe_globals(SAFE_CHECKPOINT_GLOBALS), warnings.catch_warnings():
            warnings.simplefilter('ignore')
            checkpoint = torch.load(path, map_location='cpu', weights_only=True, mmap=True)  # tensors left unread
    except Exception:
        return None
    trained = checkpoint.get('args') if isinstance(checkpoint, dict) else None
    return vars(trained) if isinstance(trained, argparse.Namespace) else trained if isinstance(trained, dict) else None


# =====================================================================================
# Logging and metrics: MetricLogger, TensorBoard writers, accuracy, git state (main_dino, eval_knn, eval_linear)
# =====================================================================================

def get_sha():
    """The original's run header: 'sha: <commit>, status: clean|has uncommited changes, branch: <name>'."""
    def git(*command):
        return subprocess.check_output(['git', *command], cwd=REPO_DIR, stderr=subprocess.DEVNULL).decode().strip()
    sha, status, branch = 'N/A', 'clean', 'N/A'
    try:
        sha = git('rev-parse', 'HEAD')
        status = 'has uncommited changes' if git('diff-index', 'HEAD') else 'clean'
        branch = git('rev-parse', '--abbrev-ref', 'HEAD')
    except (OSError, subprocess.CalledProcessError):
        pass
    return f"sha: {sha}, status: {status}, branch: {branch}"


def accuracy(output, target, topk=(1,)):
    """Percentage (0-dim tensors) of samples whose label is among the k highest outputs, for each k."""
    ranked = output.topk(max(topk), dim=1).indices
    hits = ranked == target.view(-1, 1)
    return [hits[:, :k].any(dim=1).float().mean() * 100. for k in topk]


def summary_writer(folder):
    """A TensorBoard writer into `folder` on the main process; None on the others."""
    if not is_main_process():
        return None
    from torch.utils.tensorboard import SummaryWriter  # imported here: TensorBoard takes seconds to import
    return SummaryWriter(folder)


class SmoothedValue:
    """Window median/average of a series, plus its global average."""

    def __init__(self, window_size=20, fmt=None):
        self.deque = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt or "{median:.6f} ({global_avg:.6f})"

    def update(self, value, n=1):
        self.deque.append(value)
        self.count += n
        self.total += value * n

    def synchronize_between_processes(self):
        """Sum count and total over processes (window values stay local)."""
        if not is_dist_avail_and_initialized():
            return
        barrier()
        t = all_reduce(torch.tensor([self.count, self.total], dtype=torch.float64))
        self.count = int(t[0].item())
        self.total = t[1].item()

    @property
    def median(self):
        return float(np.median(list(self.deque))) if self.deque else 0.

    @property
    def avg(self):
        return float(np.mean(list(self.deque))) if self.deque else 0.

    @property
    def global_avg(self):
        return self.total / max(self.count, 1)

    @property
    def max(self):
        return max(self.deque) if self.deque else 0.

    @property
    def value(self):
        return self.deque[-1] if self.deque else 0.

    def __str__(self):
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg, max=self.max,
                               value=self.value)


class MetricLogger:
    """Collects meters, prints progress lines with examples/sec, and writes TensorBoard scalars."""

    def __init__(self, delimiter="\t", batch_size=None, summary_writer=None):
        self.meters = defaultdict(SmoothedValue)
        self.delimiter = delimiter
        self.batch_size = batch_size  # global examples per iteration, for the throughput figure
        self.summary_writer = summary_writer

    def update(self, **kwargs):
        for name, value in kwargs.items():
            if isinstance(value, torch.Tensor):
                value = value.item()
            assert isinstance(value, (float, int))
            self.meters[name].update(value)

    def __getattr__(self, attr):
        if attr in self.__dict__.get('meters', {}):
            return self.meters[attr]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{attr}'")

    def __str__(self):
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def synchronize_between_processes(self):
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def add_meter(self, name, meter):
        self.meters[name] = meter

    def log_every(self, iterable, print_freq, header='', epoch=None):
        """Yield from `iterable`, printing a progress line every `print_freq` iterations."""
        total = len(iterable)
        start = end = time.time()
        iter_time, data_time = SmoothedValue(fmt='{avg:.4f}'), SmoothedValue(fmt='{avg:.4f}')
        width = len(str(total))
        for i, obj in enumerate(iterable):
            data_time.update(time.time() - end)
            yield obj
            iter_time.update(time.time() - end)
            if i % print_freq == 0 or i == total - 1:
                self._print_progress(i, total, width, header, iter_time, data_time)
                if epoch is not None:
                    self._write_scalars(epoch * total + i, iter_time)
            end = time.time()
        elapsed = time.time() - start
        print(f"{header} Total time: {datetime.timedelta(seconds=int(elapsed))} ({elapsed / max(total, 1):.4f} s / it)")

    def _examples_per_sec(self, iter_time):
        return self.batch_size / iter_time.avg if self.batch_size and iter_time.avg > 0 else None

    def _print_progress(self, i, total, width, header, iter_time, data_time):
        eta = datetime.timedelta(seconds=int(iter_time.global_avg * (total - i - 1)))
        parts = [header, f"[{i:{width}d}/{total}]", f"eta: {eta}", str(self),
                 f"time: {iter_time}", f"data: {data_time}"]
        throughput = self._examples_per_sec(iter_time)
        if throughput is not None:
            parts.append(f"examples/sec: {throughput:.2f}")
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            parts.append(f"max mem: {torch.cuda.max_memory_allocated() / 2 ** 20:.0f}")
        print(self.delimiter.join(p for p in parts if p))

    def _write_scalars(self, global_step, iter_time):
        if self.summary_writer is None:
            return
        for name, meter in self.meters.items():
            self.summary_writer.add_scalar(name, meter.value, global_step)
        throughput = self._examples_per_sec(iter_time)
        if throughput is not None:
            self.summary_writer.add_scalar('examples/sec', throughput, global_step)


# =====================================================================================
# Training augmentation: the multi-crop views and their render (main_dino, benchmark); the original's
# PIL GaussianBlur/Solarization (benchmark's reference pipeline; code written against the original imports them)
# =====================================================================================

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class GaussianBlur:
    """Blur a PIL image with probability p, radius drawn uniformly in [radius_min, radius_max]."""

    def __init__(self, p=0.5, radius_min=0.1, radius_max=2.):
        self.prob = p
        self.radius_min = radius_min
        self.radius_max = radius_max

    def __call__(self, img):
        if random.random() > self.prob:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.radius_min, self.radius_max)))


class Solarization:
    """Solarize a PIL image (invert pixels >= 128) with probability p."""

    def __init__(self, p):
        self.p = p

    def __call__(self, img):
        return ImageOps.solarize(img) if random.random() < self.p else img


class CropParams(NamedTuple):
    """Random choices of one augmented view (see DinoCropTransform)."""
    box: tuple          # top, left, height, width of the region of the image
    flip: bool
    jitter: tuple       # (operation, factor) pairs in the order applied; empty when not applied
    grayscale: bool
    blur_radius: float  # 0. when not blurred
    solarize: bool


class DinoCropTransform:
    """One view of DINO's multi-crop augmentation: crop, flip, colour jitter, grayscale, blur, solarise.

    The random choices are those of the original torchvision/PIL pipeline, drawn by torchvision's own
    samplers in the same order from the same generators (torch, then Python's `random` for blur and
    solarisation), so a given seed picks the same views. The region is resized with PIL's bicubic
    filter as before; the colour operations then run with NumPy/OpenCV on float pixels, clipped to
    [0, 255] after every step as PIL's 8-bit images are. The blur is a true Gaussian (PIL
    approximates one with box filters) of the same standard deviation.
    """
    JITTER_OPS = ('brightness', 'contrast', 'saturation', 'hue')
    MEAN = np.array(IMAGENET_MEAN, dtype=np.float32)
    STD = np.array(IMAGENET_STD, dtype=np.float32)

    def __init__(self, size, scale, blur_p, solarize_p=0., flip_p=0.5, jitter_p=0.8, grayscale_p=0.2,
                 blur_radius=(0.1, 2.), ratio=(3. / 4., 4. / 3.)):
        from torchvision import transforms
        self.size, self.scale, self.ratio = size, tuple(scale), ratio
        self.flip_p, self.jitter_p, self.grayscale_p = flip_p, jitter_p, grayscale_p
        self.blur_p, self.blur_radius, self.solarize_p = blur_p, blur_radius, solarize_p
        self.crop_sampler = transforms.RandomResizedCrop.get_params
        self.jitter = transforms.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
        cv2.setNumThreads(1)  # one core per DataLoader worker (forked workers inherit this), as torch does

    def __call__(self, image):
        return self.render(image, self.sample(image))

    def sample(self, image):
        """Draw the view's parameters for a PIL image."""
        box = tuple(self.crop_sampler(image, self.scale, self.ratio))
        flip = bool(torch.rand(1) < self.flip_p)
        jitter = ()
        if not self.jitter_p < torch.rand(1):
            order, *factors = self.jitter.get_params(self.jitter.brightness, self.jitter.contrast,
                                                     self.jitter.saturation, self.jitter.hue)
            jitter = tuple((self.JITTER_OPS[i], float(factors[i])) for i in order.tolist())
        grayscale = bool(torch.rand(1) < self.grayscale_p)
        blur_radius = random.uniform(*self.blur_radius) if not random.random() > self.blur_p else 0.
        solarize = self.solarize_p > 0 and random.random() < self.solarize_p
        return CropParams(box, flip, jitter, grayscale, blur_radius, solarize)

    def render(self, image, params):
        """The normalised (3, size, size) float tensor of the view `params` of a PIL image."""
        top, left, height, width = params.box
        crop = image.resize((self.size, self.size), Image.BICUBIC, box=(left, top, left + width, top + height))
        if params.flip:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        return self.finish(np.asarray(crop, dtype=np.float32), params)

    @classmethod
    def finish(cls, x, params, out=None):
        """The colour operations, grayscale, blur, solarisation and normalisation of a resized view: a
        float32 (H, W, 3) array of whole levels in [0, 255], changed in place. Returns `out` (3, H, W)."""
        for op, factor in params.jitter:
            x = getattr(cls, op)(x, factor)
        if params.grayscale:
            x = cv2.cvtColor(cv2.cvtColor(x, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
        if params.blur_radius:
            x = cv2.GaussianBlur(x, (0, 0), params.blur_radius, borderType=cv2.BORDER_REPLICATE)
        if params.solarize:
            x = np.where(x >= 128, 255. - x, x)
        return cls.normalize(x, out)

    # Colour operations work in place on float32 (H, W, 3) arrays of values in [0, 255]. The blends
    # end like PIL's: clipped to [0, 255] and truncated to whole levels.
    @staticmethod
    def brightness(x, factor):
        np.multiply(x, factor, out=x)
        np.minimum(x, 255., out=x)
        return np.floor(x, out=x)

    @staticmethod
    def contrast(x, factor):
        mean = int(cv2.cvtColor(x, cv2.COLOR_RGB2GRAY).mean() + 0.5)  # PIL blends with the rounded mean
        x = cv2.addWeighted(x, factor, x, 0., mean * (1. - factor), dst=x)
        np.clip(x, 0., 255., out=x)
        return np.floor(x, out=x)

    @staticmethod
    def saturation(x, factor):
        gray = cv2.cvtColor(cv2.cvtColor(x, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
        x = cv2.addWeighted(x, factor, gray, 1. - factor, 0., dst=x)
        np.clip(x, 0., 255., out=x)
        return np.floor(x, out=x)

    @staticmethod
    def hue(x, factor):
        hsv = cv2.cvtColor(x, cv2.COLOR_RGB2HSV)  # hue in degrees, [0, 360)
        # shifted into [0, 720): OpenCV's way back wraps hues above 360 (not negative ones)
        cv2.add(hsv, (factor * 360. + 360., 0., 0., 0.), dst=hsv)
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB, dst=x)

    @classmethod
    def normalize(cls, x, out=None):
        """(x / 255 - mean) / std per channel, as a contiguous (3, H, W) tensor (into `out` if given)."""
        out = torch.empty(3, *x.shape[:2]) if out is None else out
        planes = out.numpy()
        for c in range(3):
            np.multiply(x[..., c], 1. / (255. * cls.STD[c]), out=planes[c])
            planes[c] -= cls.MEAN[c] / cls.STD[c]
        return out


# Multi-crop rendered on the device (--augment_on device). The loader draws every view's parameters
# exactly as DinoCropTransform.sample does and hands over the decoded 8-bit image with the parameters
# packed in one float64 row per view; render_views then resizes all views of one size at once with
# batched tensor ops (embedding_bag for PIL's bicubic taps). On an accelerator the colour operations,
# grayscale, blur, solarisation and normalisation follow as batched tensor ops too (index_select, grouped
# convolutions, elementwise ops). On a CPU device they run view by view with DinoCropTransform's OpenCV
# kernels instead: torch's CPU kernels make a pass over memory per elementwise op (the hue shift alone
# takes 25), OpenCV's one or two, so the batched ops would be slower there than the per-image render.
# The parameters stay on the CPU, so that what decides shapes (tap counts, which views take which
# operation) is known without waiting for the device.
VIEW_FIELDS = ('top', 'left', 'height', 'width', 'image_height', 'image_width', 'flip',
               'order0', 'order1', 'order2', 'order3', 'brightness', 'contrast', 'saturation', 'hue',
               'grayscale', 'blur_radius', 'solarize')
_F = {name: i for i, name in enumerate(VIEW_FIELDS)}
_IDENTITY_FACTORS = (1., 1., 1., 0.)
_GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL and OpenCV use
CPU_RENDER_CHUNK = 8  # images resized together on a CPU device
OPENCV_ON_CPU = True  # False: the accelerators' tensor ops on CPU tensors too (the tests run both)


def hand_over(image, views, max_short_side):
    """What the loader passes on for the device render: (uint8 (H, W, 3) tensor, float64 (views, fields)).

    `views` are CropParams drawn on the PIL `image`. An image whose short side exceeds `max_short_side`
    is first shrunk to it (PIL bicubic, antialiased), and the boxes are scaled with it.
    """
    width, height = image.size
    shrink = max_short_side / min(width, height)
    if shrink < 1:
        image = image.resize((max(1, round(width * shrink)), max(1, round(height * shrink))), Image.BICUBIC)
    scale_x, scale_y = image.size[0] / width, image.size[1] / height
    rows = []
    for view in views:
        top, left, box_height, box_width = view.box
        order = [DinoCropTransform.JITTER_OPS.index(op) for op, _ in view.jitter] or [-1] * 4
        factors = list(_IDENTITY_FACTORS)
        for op, factor in view.jitter:
            factors[DinoCropTransform.JITTER_OPS.index(op)] = factor
        rows.append([top * scale_y, left * scale_x, box_height * scale_y, box_width * scale_x,
                     image.size[1], image.size[0], view.flip, *order, *factors, view.grayscale,
                     view.blur_radius, view.solarize])
    return torch.from_numpy(np.asarray(image).copy()), torch.tensor(rows, dtype=torch.float64)


def collate_hand_over(samples):
    """Batch (hand_over result, skipped_index, note) items: images zero-padded to the largest one."""
    height = max(pixels.shape[0] for (pixels, _), _, _ in samples)
    width = max(pixels.shape[1] for (pixels, _), _, _ in samples)
    batch = torch.empty(len(samples), height, width, 3, dtype=torch.uint8)
    for out, ((pixels, _), _, _) in zip(batch, samples):
        out[:pixels.shape[0], :pixels.shape[1]] = pixels
        out[pixels.shape[0]:] = 0
        out[:pixels.shape[0], pixels.shape[1]:] = 0
    params = torch.stack([views for (_, views), _, _ in samples])
    skipped = torch.tensor([index for _, index, _ in samples])
    return (batch, params), skipped, [note for _, _, note in samples]


def unpack_view(row):
    """The CropParams of one packed row (a list of floats), as render_views reads them."""
    f = _F
    order = [int(i) for i in row[f['order0']:f['order3'] + 1] if i >= 0]
    factors = row[f['brightness']:f['hue'] + 1]
    jitter = tuple((DinoCropTransform.JITTER_OPS[i], factors[i]) for i in order)
    return CropParams(tuple(row[:4]), bool(row[f['flip']]), jitter, bool(row[f['grayscale']]),
                      row[f['blur_radius']], bool(row[f['solarize']]))


def render_views(pixels, params, sizes):
    """The normalised views of a handed-over batch, as a list of (B, 3, size, size) tensors, one per view.

    pixels: (B, H, W, 3) uint8 on the device; params: (B, views, fields) float64 on the CPU; sizes:
    the output side of each view. Consecutive views of the same size are resized together.
    """
    if _opencv_takes(pixels):
        return _render_on_cpu(pixels, params, sizes)
    return _render_batched(pixels, params, sizes)


def _opencv_takes(x):
    return x.device.type == 'cpu' and OPENCV_ON_CPU


def _render_batched(pixels, params, sizes):
    """render_views on an accelerator: every step batched over all views of one size."""
    columns = _columns(pixels)
    views = []
    for start, end, group in _size_groups(params, sizes):
        out = _render_group(columns, group, sizes[start])
        views += list(out.view(len(pixels), end - start, *out.shape[1:]).unbind(1))
    return views


def _render_on_cpu(pixels, params, sizes):
    """A few images at a time (their intermediate images stay small enough to reuse memory), each view
    finished by DinoCropTransform.finish in place, straight into the output."""
    outputs = [torch.empty(len(pixels), 3, size, size) for size in sizes]
    for first in range(0, len(pixels), CPU_RENDER_CHUNK):
        chunk = slice(first, first + CPU_RENDER_CHUNK)
        columns = _columns(pixels[chunk])
        for start, end, group in _size_groups(params[chunk], sizes):
            resized = _resize_views(columns, group, group.float(), sizes[start]).numpy()
            for v, row in enumerate(group.tolist()):
                image, view = divmod(v, end - start)
                DinoCropTransform.finish(resized[v], unpack_view(row), out=outputs[start + view][first + image])
    return outputs


def _size_groups(params, sizes):
    """(start, end, their rows (B * views, fields)) of each run of consecutive views of the same size."""
    start = 0
    for _, run in itertools.groupby(sizes):
        end = start + len(list(run))
        yield start, end, params[:, start:end].reshape(-1, params.shape[-1])
        start = end


def _render_group(columns, params, size):
    """(V, 3, size, size) normalised views; params: (V, fields) float64 on the CPU, V = B * views."""
    device = columns.device
    host = params
    params = params.to(device=device, dtype=torch.float32)
    x = _resize_views(columns, host, params, size).permute(0, 3, 1, 2).contiguous()
    x = _jitter(x, host, params)
    gray = host[:, _F['grayscale']].nonzero().flatten().to(device)
    if len(gray):
        x.index_copy_(0, gray, _gray(x.index_select(0, gray)).expand(-1, 3, -1, -1).contiguous())
    x = _blur(x, host, params)
    solarize = host[:, _F['solarize']].nonzero().flatten().to(device)
    if len(solarize):
        views = x.index_select(0, solarize)
        x.index_copy_(0, solarize, torch.where(views >= 128, 255. - views, views))
    mean = torch.tensor(IMAGENET_MEAN, device=device)[:, None, None]
    std = torch.tensor(IMAGENET_STD, device=device)[:, None, None]
    return x.mul_(1. / (255. * std)).sub_(mean / std)


# --- resize: PIL's antialiased bicubic resampling (a = -0.5, support stretched when shrinking), one axis
# at a time (columns, then rows, rounded to whole levels in between as PIL's 8-bit passes are). Each pass
# is one embedding_bag: an output column (row) is the weighted sum of the input columns (rows) its taps
# read, each a contiguous vector. The first pass reads each channel's columns and writes each view's
# columns, channels interleaved; one 2-D transpose of all of them makes row y of view v one line (its
# pixels with their channels side by side) for the second pass, which so writes (H, W, 3) views.
# On a CPU device OpenCV rounds and transposes (torch's transposing copy is a few times slower), and the
# two largest intermediate images reuse memory from call to call (a fresh one costs as much in page
# faults as the work done on it).

_CPU_SCRATCH = {}


def _scratch(name, shape):
    """A float CPU tensor of `shape` kept under `name` for the next call (its contents are overwritten)."""
    numel = math.prod(shape)
    if name not in _CPU_SCRATCH or _CPU_SCRATCH[name].numel() < numel:
        _CPU_SCRATCH[name] = torch.empty(numel)
    return _CPU_SCRATCH[name][:numel].view(shape)


def _columns(pixels):
    """The columns of (B, H, W, C) images as floats, (B, C, W, H)."""
    if not _opencv_takes(pixels):
        return pixels.permute(0, 3, 2, 1).to(torch.float, memory_format=torch.contiguous_format)
    batch, height, width, channels = pixels.shape
    columns = _scratch('columns', (batch, channels, width, height))
    for image, out in zip(pixels.numpy(), columns.numpy()):
        for plane, channel in zip(cv2.split(cv2.transpose(image)), out):
            np.copyto(channel, plane)
    return columns


def _rounded_transpose(x):
    """The 2-D x clipped to [0, 255], rounded to whole levels (halves to even) and transposed."""
    if not _opencv_takes(x):
        return x.clamp_(0, 255).round_().t().contiguous()
    levels = torch.from_numpy(cv2.transpose(cv2.add(x.numpy(), 0., dtype=cv2.CV_8U)))  # saturating round
    return _scratch('rows', levels.shape).copy_(levels)


def _resize_views(columns, host, params, size):
    """columns: the images' columns, (B, C, W, H) floats; host: (V, fields) float64 rows on the CPU, the
    views of each image in turn; params: the same as float32 on the device. Returns the resized views
    (V, size, size, C) in whole levels."""
    f = _F
    batch, channels, width, height = columns.shape
    device = columns.device
    views = len(params)
    flip = params[:, f['flip']] > 0
    image_of_view = torch.arange(batch, device=device).repeat_interleave(views // batch)
    first = (image_of_view[:, None, None] * channels + torch.arange(channels, device=device)) * width
    out = _resample(columns.view(-1, height), first, 1, host[:, f['width']],
                    params[:, [f['left'], f['width'], f['image_width']]], size, flip)
    rows = _rounded_transpose(out)  # (H, V * size * C): line y * V + v is row y of view v
    first = torch.arange(views, device=device)[:, None, None]
    out = _resample(rows.view(-1, size * channels), first, views, host[:, f['height']],
                    params[:, [f['top'], f['height'], f['image_height']]], size, None)
    return out.clamp_(0, 255).round_().view(views, size, size, channels)


def _resample(lines, first_line, step, host_length, box, size, flip):
    """Resample box v = (start, length, valid length) to `size` outputs, reading line i of the box of
    view v, channel c at lines[first_line[v, 0, c] + i * step] (first_line (V, 1, C), or (V, 1, 1) when a
    line holds all channels). Returns the outputs in the order (view, output, channel)."""
    taps = int(torch.ceil(2. * (host_length / size).clamp(min=1.)).max()) * 2 + 1
    index, weight = _bicubic_taps(box[:, 0], box[:, 1], box[:, 2], size, taps, flip)
    index = index[:, :, None] * step + first_line[..., None]
    weight = weight[:, :, None].expand(index.shape)
    return F.embedding_bag(index.reshape(-1, taps), lines, per_sample_weights=weight.reshape(-1, taps),
                           mode='sum')


def _bicubic_taps(start, length, valid, size, taps, flip=None):
    """Input indices and normalised weights (V, size, taps) of PIL's bicubic resampling of [start, start+length)."""
    device = start.device
    scale = length / size
    stretch = scale.clamp(min=1.)
    support = 2. * stretch
    center = start[:, None] + (torch.arange(size, device=device) + 0.5) * scale[:, None]
    first = (center - support[:, None] + 0.5).trunc().clamp(min=0)
    end = torch.minimum((center + support[:, None] + 0.5).trunc(), valid[:, None])
    position = first[..., None] + torch.arange(taps, device=device)
    t = ((position - center[..., None] + 0.5) / stretch[:, None, None]).abs()
    a = -0.5
    weight = torch.where(t < 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                         torch.where(t < 2, (((t - 5) * t + 8) * t - 4) * a, 0.))
    weight = torch.where(position < end[..., None], weight, 0.)
    weight = weight / weight.sum(-1, keepdim=True)
    index = torch.minimum(position, valid[:, None, None] - 1).long()
    if flip is not None:  # a mirrored view reads its outputs in reverse order
        index = torch.where(flip[:, None, None], index.flip(1), index)
        weight = torch.where(flip[:, None, None], weight.flip(1), weight)
    return index, weight


# --- colour: DinoCropTransform's operations on (V, 3, H, W) batches of values in [0, 255]

def _gray(x):
    r, g, b = x.unbind(1)
    return (_GRAY_WEIGHTS[0] * r + _GRAY_WEIGHTS[1] * g + _GRAY_WEIGHTS[2] * b)[:, None]


def _jitter(x, host, params):
    """The four jitter operations in each view's own order (positions 0..3; views without jitter skip)."""
    f = _F
    for position in range(4):
        order = host[:, f[f'order{position}']]
        for op, name in enumerate(DinoCropTransform.JITTER_OPS):
            chosen = (order == op).nonzero().flatten().to(x.device)
            if len(chosen):
                factor = params.index_select(0, chosen)[:, f[name], None, None, None]
                x.index_copy_(0, chosen, _JITTER[name](x.index_select(0, chosen), factor))
    return x


def _brightness(x, factor):  # the jitter operations work in place on the views selected for them
    return x.mul_(factor).clamp_(max=255.).floor_()


def _contrast(x, factor):
    mean = (_gray(x).mean(dim=(1, 2, 3), keepdim=True) + 0.5).floor()  # PIL blends with the rounded mean
    return x.mul_(factor).add_(mean * (1. - factor)).clamp_(0., 255.).floor_()


def _saturation(x, factor):
    gray = _gray(x).mul_(1. - factor)
    return x.mul_(factor).add_(gray).clamp_(0., 255.).floor_()


def _hue(x, factor):
    """Shift the hue by factor turns through HSV, as OpenCV's float conversions do (not rounded)."""
    r, g, b = x.unbind(1)
    value = x.amax(1)
    spread = value - x.amin(1)
    # hue in sixths of a turn: the sector of the largest channel plus the position within it (grey
    # pixels have spread 0, so any finite hue will do)
    is_r, is_g = value == r, value == g
    sector = torch.where(is_g, 2., 4.).masked_fill_(is_r, 0.)
    within = torch.where(is_r, g - b, torch.where(is_g, b - r, r - g))
    hue = torch.addcmul(sector, within, spread.clamp(min=1e-30).reciprocal_())
    hue = hue.add_(factor[:, 0] * 6.).remainder_(6.)[:, None]
    # HSV to RGB without branches: channel R, G, B falls by the spread as far as the hue is within one
    # sixth of a turn of its opposite (3, 5, 1), less as the hue is within two sixths of it
    distance = (hue - torch.tensor([3., 5., 1.], device=x.device)[:, None, None]).abs_().sub_(3.).abs_()
    return torch.addcmul((value + spread)[:, None], spread[:, None], distance.clamp_(1., 2.), value=-1.)


_JITTER = {'brightness': _brightness, 'contrast': _contrast, 'saturation': _saturation, 'hue': _hue}


def _blur(x, host, params):
    """Gaussian blur of the views with a radius, as OpenCV's on float images: 4 sigma each side, edges
    replicated; one grouped convolution per axis with each view's kernel zero-padded to the largest."""
    chosen = (host[:, _F['blur_radius']] > 0).nonzero().flatten()
    if not len(chosen):
        return x
    sigma_host = host[chosen, _F['blur_radius']]
    half = int(((sigma_host * 8 + 1 + 0.5).floor().long() | 1).max()) // 2
    chosen = chosen.to(x.device)
    sigma = params.index_select(0, chosen)[:, _F['blur_radius'], None]
    own_half = (torch.floor(sigma * 8 + 1 + 0.5).long() | 1) // 2
    offsets = torch.arange(-half, half + 1, device=x.device)
    kernel = torch.where(offsets.abs() <= own_half, torch.exp(-offsets ** 2 / (2 * sigma ** 2)), 0.)
    kernel = (kernel / kernel.sum(-1, keepdim=True)).repeat_interleave(3, dim=0)  # (views*3, taps)
    views = x.index_select(0, chosen)
    n, c, height, width = views.shape
    planes = F.pad(views.reshape(1, n * c, height, width), (half, half, half, half), mode='replicate')
    planes = F.conv2d(planes, kernel[:, None, None, :], groups=n * c)
    planes = F.conv2d(planes, kernel[:, None, :, None], groups=n * c)
    return x.index_copy_(0, chosen, planes.view(n, c, height, width))


# =====================================================================================
# Datasets and image loading: synthetic data, image folders and lists, resumable sampling (every script)
# =====================================================================================

def limit_dataset(dataset, limit):
    """A fixed, class-balanced-in-expectation subset of `limit` samples (every sample if limit is None)."""
    if limit is None or limit >= len(dataset):
        return dataset
    if limit <= 0:
        fail(f"--data_limit must be positive, got {limit}")
    generator = torch.Generator().manual_seed(0)
    indices = torch.randperm(len(dataset), generator=generator)[:limit].sort().values.tolist()
    return torch.utils.data.Subset(dataset, indices)


class SyntheticShapes(torch.utils.data.Dataset):
    """Procedural labelled images: one shape class per label, drawn on textured backgrounds.

    Every image is generated on the fly from (seed, split, index), so the dataset is deterministic,
    needs no download and comes at any size. Colours, position, size and rotation are random for
    every class alike, so only the shape tells the classes apart.
    """
    SHAPES = ['disk', 'square', 'triangle', 'cross', 'ring', 'star', 'bar', 'hexagon', 'crescent', 'dots']
    SPLIT_LENGTHS = {'train': 2000, 'val': 500}

    def __init__(self, split='train', length=None, image_size=224, seed=0, transform=None):
        if split not in self.SPLIT_LENGTHS:
            fail(f"unknown synthetic split {split}; use train or val")
        self.split, self.image_size, self.seed, self.transform = split, image_size, seed, transform
        self.length = length or self.SPLIT_LENGTHS[split]
        self.classes = list(self.SHAPES)
        self.targets = [i % len(self.SHAPES) for i in range(self.length)]

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        img = self.render(index)
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]

    def render(self, index):
        rng = np.random.default_rng([self.seed, 1 if self.split == 'val' else 0, index])
        size = self.image_size
        img = self._background(rng, size)
        shape = self.SHAPES[self.targets[index]]
        radius = size * rng.uniform(0.2, 0.35)
        center = rng.uniform(radius, size - radius, 2)
        angle = rng.uniform(0, 2 * np.pi)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        self._draw_shape(ImageDraw.Draw(img), shape, center, radius, angle, colour)
        return img

    @staticmethod
    def _background(rng, size):
        """Two random colours mixed by smooth low-frequency noise."""
        coarse = rng.random((4, 4)).astype(np.float32)
        noise = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC),
                           dtype=np.float32)[..., None] / 255.
        low, high = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        pixels = low * (1 - noise) + high * noise + rng.normal(0, 8, (size, size, 3))
        return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))

    @staticmethod
    def _polygon(center, radius, angle, corners, inner=None):
        points = []
        for i in range(corners * (2 if inner else 1)):
            r = inner * radius if inner and i % 2 else radius
            a = angle + np.pi * i / corners if inner else angle + 2 * np.pi * i / corners
            points.append((center[0] + r * np.cos(a), center[1] + r * np.sin(a)))
        return points

    def _draw_shape(self, draw, shape, center, radius, angle, colour):
        cx, cy = center
        box = [cx - radius, cy - radius, cx + radius, cy + radius]
        width = max(2, int(radius * 0.3))
        if shape == 'disk':
            draw.ellipse(box, fill=colour)
        elif shape == 'ring':
            draw.ellipse(box, outline=colour, width=width)
        elif shape == 'square':
            draw.polygon(self._polygon(center, radius, angle, 4), fill=colour)
        elif shape == 'triangle':
            draw.polygon(self._polygon(center, radius, angle, 3), fill=colour)
        elif shape == 'hexagon':
            draw.polygon(self._polygon(center, radius, angle, 6), outline=colour, width=width)
        elif shape == 'star':
            draw.polygon(self._polygon(center, radius, angle, 5, inner=0.4), fill=colour)
        elif shape in ('cross', 'bar'):
            directions = [angle, angle + np.pi / 2] if shape == 'cross' else [angle]
            for a in directions:
                dx, dy = radius * np.cos(a), radius * np.sin(a)
                draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=colour, width=width)
        elif shape == 'crescent':
            draw.chord(box, start=np.degrees(angle), end=np.degrees(angle) + 180, fill=colour)
        elif shape == 'dots':
            for corner in self._polygon(center, radius * 0.7, angle, 3):
                r = radius * 0.25
                draw.ellipse([corner[0] - r, corner[1] - r, corner[0] + r, corner[1] + r], fill=colour)


def is_synthetic(data_path):
    return str(data_path).strip().lower() == 'synthetic'


class DataError(Exception):
    """An image file that cannot be read."""


def to_rgb(img):
    """8-bit RGB version of a PIL image of any mode.

    16-bit grey levels are scaled down (PIL would clip them to 255), and transparent pixels are
    composited on white (PIL would keep whatever colour lies under them, often black).
    """
    if img.mode.startswith('I'):  # I;16*, or I as 16-bit PNGs load in some Pillow versions
        levels = np.asarray(img, dtype=np.float64).clip(0, 65535) / 257
        img = Image.fromarray(np.rint(levels).astype(np.uint8))
    if img.mode in ('RGBA', 'LA', 'PA') or (img.mode == 'P' and 'transparency' in img.info):
        img = img.convert('RGBA')
        white = Image.new('RGBA', img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img).convert('RGB')
    return img.convert('RGB')


def pil_loader(path):
    """Open an image file as 8-bit RGB, naming the file when it cannot be read (DataError)."""
    try:
        with Image.open(path) as img:
            img.load()  # decode now, so that truncated files fail here
            return to_rgb(img)
    except UnidentifiedImageError:
        raise DataError(f"cannot read image {path}: empty, or not in an image format Pillow knows") from None
    except Exception as exc:
        raise DataError(f"cannot read image {path}: {exc}") from None


def build_image_folder(root, transform=None):
    """torchvision ImageFolder with a clear error when the folder is missing or holds no images."""
    from torchvision import datasets
    if not os.path.isdir(root):
        fail(f"--data_path {root} is not a folder; pass an ImageFolder (one sub-folder of images per class) "
             "or 'synthetic'")
    try:
        return datasets.ImageFolder(root, transform=transform, loader=pil_loader)
    except (FileNotFoundError, RuntimeError) as exc:
        fail(f"--data_path {root}: {str(exc).splitlines()[0]}; expected one sub-folder of images per class")


# Training images come from an ImageFolder, a folder of images at any depth, or a text file listing
# image paths. All three become ImageFiles in one fixed order, so that runs and resumes are reproducible.

# torchvision's ImageFolder extensions, in case this Pillow lacks one of the formats (e.g. WebP)
TORCHVISION_IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')
_IDENTIFY_ONLY_FORMATS = {'MPEG'}  # Pillow reads their size but cannot decode their pixels


def image_extensions():
    """Lower-case extensions of the formats this Pillow can decode (plugins registered so far included)."""
    Image.init()
    decodable = {fmt for fmt, (factory, _) in Image.OPEN.items() if fmt not in _IDENTIFY_ONLY_FORMATS
                 and not (isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile))}
    pillow = {ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in decodable}
    return tuple(sorted(pillow.union(TORCHVISION_IMAGE_EXTENSIONS)))


def _extension(name):
    return name[name.rfind('.'):].lower()


def scan_image_tree(root):
    """Image files under `root` at any depth, as {folder relative to root: [file names]}.

    One os.scandir per folder and no stat per file. Symbolic links are followed; a folder reached
    again (through a link loop, or a second link to it) is listed once, under its own path where it
    has one inside root. Unreadable folders are reported, not silently left out.
    """
    extensions = image_extensions()
    found, seen, pending, linked = {}, set(), [('', root)], []
    while pending or linked:  # depth first, sub-folders by name, so that the result never varies
        if not pending:  # folders reached through links come after all the others
            pending, linked = linked[::-1], []
        relative, folder = pending.pop()
        try:
            identity = os.stat(folder)
            if (identity.st_dev, identity.st_ino) in seen:
                continue
            seen.add((identity.st_dev, identity.st_ino))
            names, subfolders, links = [], [], []
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.is_dir():
                        (links if entry.is_symlink() else subfolders).append(
                            (os.path.join(relative, entry.name), entry.path))
                    elif entry.name.lower().endswith(extensions):
                        names.append(entry.name)
        except OSError as exc:
            print(f"warning: cannot list folder {folder} ({exc.strerror}); its images are left out", flush=True)
            continue
        if names:
            found[relative] = names
        pending.extend(sorted(subfolders, reverse=True))
        linked.extend(sorted(links))
    return found


def _class_folder(relative):
    return relative.split(os.sep, 1)[0]


def imagefolder_order(root, found):
    """Paths of scan_image_tree's images in ImageFolder's order: by class folder, then folder path, then
    file name (images at the top level first)."""
    paths = []
    for relative in sorted(found, key=lambda relative: (_class_folder(relative), relative)):
        prefix = os.path.join(root, relative, '')
        paths.extend([prefix + name for name in sorted(found[relative])])
    return paths


class ImageFiles(torch.utils.data.Dataset):
    """Images at the given paths, as (image, 0) pairs: training ignores labels."""

    def __init__(self, paths, transform=None):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        img = pil_loader(self.paths[index])
        return (img if self.transform is None else self.transform(img)), 0


def build_training_images(data_path, transform=None):
    """ImageFiles of a folder of images (at any depth) or of a list file, and one line saying what was found."""
    data_path = os.path.expanduser(data_path)
    if os.path.isdir(data_path):
        paths, description = _folder_images(data_path)
    elif os.path.isfile(data_path):
        paths, description = _listed_images(data_path)
    else:
        fail(f"--data_path {data_path} is not a folder or a file (it does not exist); pass a folder of images, "
             "a text file listing image paths, or 'synthetic'")
    return ImageFiles(paths, transform), description


def _folder_images(root):
    found = scan_image_tree(root)
    paths = imagefolder_order(root, found)
    if not paths:
        fail(f"--data_path {root} holds no image files, neither at its top level nor in any sub-folder (looked "
             f"for {', '.join(TORCHVISION_IMAGE_EXTENSIONS)} and the other formats Pillow reads)")
    classes = {_class_folder(relative) for relative in found if relative}
    with os.scandir(root) as entries:
        subfolders = sum(1 for entry in entries if entry.is_dir())
    if '' in found or len(classes) < subfolders:
        return paths, (f"folder of images {root}: {len(paths)} images, found at any depth "
                       f"({len(found.get('', ()))} at its top level)")
    description = f"ImageFolder {root}: {len(paths)} images in {len(classes)} class folders (labels unused)"
    others = [name for names in found.values() for name in names
              if not name.lower().endswith(TORCHVISION_IMAGE_EXTENSIONS)]
    if others:  # earlier versions read the folder with torchvision's ImageFolder
        kinds = ', '.join(sorted({_extension(name) for name in others}))
        description += (f", {len(others)} of them of types torchvision's ImageFolder skips ({kinds}): runs begun "
                        "before this version had fewer images and do not resume exactly")
    return paths, description


def _listed_images(list_path):
    """Paths of a text file: one per line, absolute or relative to the file's folder; blank lines and #
    comments skipped. Listed files that are missing are kept: they count as unreadable images."""
    if list_path.lower().endswith(image_extensions()):
        fail(f"--data_path {list_path} is an image; pass the folder holding the images, a text file listing "
             "image paths, or 'synthetic'")
    try:
        with open(list_path, encoding='utf-8-sig') as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError:
        fail(f"--data_path {list_path} is a file but not a text list of image paths (not UTF-8 text); pass a "
             "folder of images, a text file with one image path per line, or 'synthetic'")
    except OSError as exc:
        fail(f"--data_path {list_path}: cannot read it ({exc.strerror})")
    folder = os.path.dirname(os.path.abspath(list_path))
    paths = [os.path.join(folder, line) for line in map(str.strip, lines) if line and not line.startswith('#')]
    if not paths:
        fail(f"--data_path {list_path} lists no image paths; write one path per line (relative to the list's "
             "folder or absolute)")
    return paths, f"list file {list_path}: {len(paths)} images listed"


def data_error_message(exc):
    """The one useful line of a DataError re-raised from a DataLoader worker."""
    lines = [line for line in str(exc).splitlines() if 'cannot read image' in line]
    return (lines[-1].split('DataError: ')[-1] if lines else str(exc).splitlines()[-1]).strip()


class ResumableSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler that yields (epoch, index) pairs and can start an epoch part-way through.

    Passing the epoch with each index lets ReproducibleSamples seed its augmentations without any
    state in the DataLoader workers.
    """

    def __init__(self, dataset, **kwargs):
        super().__init__(dataset, **kwargs)
        self.start = 0

    def set_epoch(self, epoch, start=0):
        """Shuffle for `epoch` and skip this process's first `start` samples of it."""
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self):
        indices = list(super().__iter__())[self.start:]
        return iter([(self.epoch, index) for index in indices])

    def __len__(self):
        return self.num_samples - self.start


class ReproducibleSamples(torch.utils.data.Dataset):
    """Items of `dataset` for keys (epoch, index), with the augmentation randomness seeded by them.

    Each item is (image, skipped_index, note). Seeding per (seed, epoch, index) makes training
    independent of the number of DataLoader workers and lets a run resume exactly mid-epoch; the
    caller's random states are left untouched. An unreadable image is replaced by the next readable
    one of the dataset, and reported as skipped_index with the reason in note (-1 and '' otherwise);
    with strict=True its DataError is raised instead.
    """

    def __init__(self, dataset, seed, strict=False):
        self.dataset, self.seed, self.strict = dataset, seed, strict

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        note = ''
        with _random_states_kept():
            for offset in range(len(self.dataset)):
                _seed_random_states(self.seed, epoch, index)
                try:
                    image = self.dataset[(index + offset) % len(self.dataset)][0]
                    return image, (index if note else -1), note
                except DataError as exc:
                    if self.strict:
                        raise
                    note = note or str(exc)
        raise DataError(f"none of the {len(self.dataset)} images of the dataset can be read (the first: {note}); "
                        "check --data_path")


@contextlib.contextmanager
def _random_states_kept():
    states = random.getstate(), np.random.get_state(), torch.default_generator.get_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.default_generator.set_state(states[2])


def _seed_random_states(*keys):
    """Seed Python, NumPy and the torch CPU generator (only: CUDA's serves the model) from `keys`."""
    words = np.random.SeedSequence(keys).generate_state(2)
    seed = int(words[0]) << 32 | int(words[1])
    random.seed(seed)
    np.random.seed(words[0])
    torch.default_generator.manual_seed(seed)


class SkippedImages:
    """Unreadable training images: one warning per file, and a count per epoch over workers and processes."""

    def __init__(self, state=None):
        state = state or {}
        self.warned = set(state.get('warned', ()))
        self.this_epoch = set(state.get('this_epoch', ()))

    def note(self, indices, notes):
        """Record a batch's (skipped_index, note) pairs as ReproducibleSamples returned them."""
        for index, note in zip(indices.tolist(), notes):
            if index < 0:
                continue
            self.this_epoch.add(index)
            if index not in self.warned:
                self.warned.add(index)
                _builtin_print(f"warning: {note}; skipped (another image of the dataset takes its place; "
                               "--strict_data stops instead)", flush=True)

    def merge(self, dataset_size, device):
        """Share what every process met (a collective when distributed)."""
        if not is_dist_avail_and_initialized():
            return
        mask = torch.zeros(dataset_size, dtype=torch.int32, device=device)
        mask[sorted(self.this_epoch)] = 1
        mask = all_reduce(mask)
        self.this_epoch = set(mask.nonzero().flatten().tolist())
        self.warned |= self.this_epoch

    def end_epoch(self):
        """Number of distinct unreadable images met this epoch (call merge first); starts a new count."""
        count, self.this_epoch = len(self.this_epoch), set()
        return count

    def state_dict(self):
        return {'warned': sorted(self.warned), 'this_epoch': sorted(self.this_epoch)}


class ReturnIndexDataset(torch.utils.data.Dataset):
    """Wraps a dataset so that items are (image, index) instead of (image, label)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, idx):
        img, _ = self.dataset[idx]
        return img, idx


# =====================================================================================
# Evaluation data and feature extraction (eval_knn, eval_linear, eval_image_retrieval, eval_copy_detection)
# =====================================================================================

# Synthetic images are rendered and evaluated at this side (the tests train on 64-pixel crops of
# them); real data keeps the original resize 256 / centre crop 224.
SYNTHETIC_EVAL_SIZE = 64


def eval_crop_size(data_path):
    """Side of the evaluation crops: 224, or SYNTHETIC_EVAL_SIZE for the built-in synthetic data."""
    return SYNTHETIC_EVAL_SIZE if is_synthetic(data_path) else 224


def center_crop_transform(crop_size=224):
    """Bicubic resize of the short side to crop_size * 256 / 224, centre crop, ImageNet normalisation."""
    from torchvision import transforms
    return transforms.Compose([
        transforms.Resize(crop_size * 256 // 224, interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(crop_size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])


def build_eval_split(data_path, split, transform=None):
    """The `split` ('train' or 'val') ImageFolder under data_path, or that split of the synthetic data."""
    if is_synthetic(data_path):
        return SyntheticShapes(split, image_size=SYNTHETIC_EVAL_SIZE, transform=transform)
    root = os.path.join(data_path, split)
    if not os.path.isdir(root):
        fail(f"--data_path {data_path} has no {split}/ folder; it must hold train/ and val/ ImageFolders "
             "(one sub-folder of images per class), or be 'synthetic'")
    return build_image_folder(root, transform)


def dataset_classes(dataset):
    """Class names of an ImageFolder or SyntheticShapes, also through Subset wrappers."""
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    return list(dataset.classes)


def check_matching_classes(dataset_train, dataset_val, data_path):
    """Labels are folder indices, so train/ and val/ must hold the same class folders."""
    train_classes, val_classes = dataset_classes(dataset_train), dataset_classes(dataset_val)
    if train_classes != val_classes:
        odd = sorted(set(train_classes) ^ set(val_classes))[:3]
        fail(f"--data_path {data_path}: train/ and val/ do not hold the same class folders "
             f"({len(train_classes)} vs {len(val_classes)}, e.g. {', '.join(odd)}); make them match")


def feature_loader(dataset, args, batch_size=None):
    """Loader for extract_features: dataset order (no shuffling), each process reading its share under
    torchrun. `batch_size` defaults to --batch_size_per_device."""
    sampler = torch.utils.data.DistributedSampler(dataset, shuffle=False) if is_dist_avail_and_initialized() else None
    return torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=batch_size or args.batch_size_per_device,
                                       num_workers=args.num_workers, pin_memory=args.device == 'cuda',
                                       drop_last=False)


def multi_scale(samples, model, scales=(1, 1 / 2 ** 0.5, 1 / 2)):
    """Features averaged over rescaled copies of the input, then L2-normalised."""
    total = None
    for scale in scales:
        inp = samples if scale == 1 else F.interpolate(samples, scale_factor=scale, mode='bilinear',
                                                       align_corners=False)
        feats = model(inp).clone()
        total = feats if total is None else total + feats
    total = total / len(scales)
    return F.normalize(total, dim=-1)


@torch.no_grad()
def extract_features(model, data_loader, device, multiscale=False, autocast=False, store_on_device=False,
                     forward=None, summary_writer=None):
    """Features of every sample of `data_loader.dataset`, in dataset order, on every process.

    The loader must yield (images, indices) (see ReturnIndexDataset) and may use a
    DistributedSampler: samples it repeats to even out processes are written once.
    `forward(model, images)` overrides the plain `model(images)` call. With a
    summary_writer, the throughput is also written as TensorBoard scalars.
    """
    global_batch = (data_loader.batch_size or 1) * get_world_size()
    metric_logger = MetricLogger(delimiter="  ", batch_size=global_batch, summary_writer=summary_writer)
    features = None
    forward = forward or (lambda m, x: multi_scale(x, m) if multiscale else m(x))
    epoch = 0 if summary_writer is not None else None
    for samples, index in metric_logger.log_every(data_loader, 10, 'Extracting features', epoch):
        samples = samples.to(device, non_blocking=True)
        index = index.to(device, non_blocking=True)
        with autocast_context(device.type, autocast):
            feats = forward(model, samples)
        feats = feats.float()
        mark_step()
        if features is None:
            storage = device if store_on_device else 'cpu'
            features = torch.zeros(len(data_loader.dataset), feats.shape[-1], device=storage)
            print(f"Storing features into tensor of shape {tuple(features.shape)}")
        feats, index = all_gather(feats), all_gather(index)
        features.index_copy_(0, index.to(features.device), feats.to(features.device))
    return features


# =====================================================================================
# Retrieval metrics and PCA whitening (eval_image_retrieval: revisited Oxford/Paris; eval_copy_detection)
# =====================================================================================

def nearest_neighbours(database, queries, k):
    """(similarities, indices) of the k most similar database rows of each query (dot product), nearest first.

    Rows whose k-th similarity is shared with rows left out (then the (k+1)-th equals the k-th)
    are redone exactly, so that equal similarities always go to the lower database index,
    whatever the device's top-k does.
    """
    similarity = queries @ database.t()
    values, indices = similarity.topk(min(k + 1, similarity.shape[1]), dim=1)
    tied_rows = (values[:, k] == values[:, k - 1]) if values.shape[1] > k else torch.zeros(0, dtype=torch.bool)
    values, indices = values[:, :k], indices[:, :k]
    kth = values[:, -1:]
    for row in tied_rows.nonzero().flatten().tolist():
        above = (similarity[row] > kth[row]).nonzero().flatten()
        level = (similarity[row] == kth[row]).nonzero().flatten()[:k - len(above)]
        indices[row] = torch.cat((above, level))
        values[row] = similarity[row, indices[row]]
    # order: decreasing similarity, then increasing index
    indices, order = indices.sort(dim=1)
    values, order = values.gather(1, order).sort(dim=1, descending=True, stable=True)
    return values, indices.gather(1, order)


def compute_ap(ranks, nres):
    """Average precision of one query: trapezoidal area under its precision-recall curve.

    `ranks`: sorted 0-based positions of the positives that were retrieved; `nres`: number of
    positives in the database (retrieved or not), so a positive missing from `ranks` lowers the AP.
    This is the AP of the revisited Oxford/Paris and INRIA Holidays evaluation packages.
    """
    ranks = np.asarray(ranks, dtype=np.float64)
    found_before = np.arange(len(ranks))
    precision_left = np.where(ranks == 0, 1., found_before / np.maximum(ranks, 1.))
    precision_right = (found_before + 1) / (ranks + 1)
    return float(np.sum(precision_left + precision_right) / (2. * nres))


def compute_map(ranks, gnd, kappas=()):
    """Mean average precision and mean precision at `kappas`, as the revisited Oxford/Paris authors define them.

    `ranks`: (database size x number of queries) array, column i the database indices in the order
    retrieved for query i. `gnd[i]['ok']` lists the positives of query i, `gnd[i]['junk']` images
    that are dropped from its ranking before scoring. Following the authors' code, precision at k
    is measured at min(k, position of the last positive retrieved). Queries without positives get
    NaN in `aps`/`prs` and are left out of the means. Returns (map, aps, pr, prs).
    """
    ranks = np.asarray(ranks)
    aps = np.full(len(gnd), np.nan)
    prs = np.full((len(gnd), len(kappas)), np.nan)
    for i, query_gnd in enumerate(gnd):
        positives = np.asarray(query_gnd['ok'])
        if positives.size == 0:
            continue
        positions = np.flatnonzero(np.isin(ranks[:, i], positives))
        junk = np.flatnonzero(np.isin(ranks[:, i], np.asarray(query_gnd.get('junk', []))))
        positions = positions - np.searchsorted(junk, positions)  # junk ranked earlier does not count
        aps[i] = compute_ap(positions, len(positives))
        prs[i] = _precision_at(positions + 1, kappas)
    scored = ~np.isnan(aps)
    if not scored.any():
        return float('nan'), aps, np.full(len(kappas), np.nan), prs
    return float(aps[scored].mean()), aps, prs[scored].mean(axis=0), prs


def _precision_at(positions, kappas):
    """Precision at each k of 1-based positive positions, cut at the last positive as the authors do."""
    if positions.size == 0:
        return np.zeros(len(kappas))
    cuts = np.minimum(positions.max(), np.asarray(kappas))
    return np.array([(positions <= cut).sum() / cut for cut in cuts])


class PCA:
    """PCA (whitening) learned from a covariance matrix; keeps the `dim` leading components.

    Components are scaled by eigenvalue ** -whit: whit=0.5 whitens fully, whit=0 only rotates.
    Eigenvalues below 1e-5 of the largest are raised to that floor, as in the original. `mean`,
    when set, is subtracted before projecting.
    """

    def __init__(self, dim=256, whit=0.5):
        self.dim = dim
        self.whit = whit
        self.mean = None

    def train_pca(self, cov):
        eigenvalues, eigenvectors = np.linalg.eigh(cov)
        eigenvalues = np.maximum(eigenvalues, eigenvalues.max() * 1e-5)
        order = np.argsort(eigenvalues)[::-1][:self.dim]
        print(f"keeping {eigenvalues[order].sum() / eigenvalues.sum() * 100:.2f} % of the energy")
        self.dvt = (eigenvectors[:, order] / eigenvalues[order] ** self.whit).T

    def apply(self, x):
        """Project rows of a numpy array or a torch tensor (any device), returning the same kind."""
        if isinstance(x, np.ndarray):
            mean = 0 if self.mean is None else np.asarray(self.mean)
            return (x - mean) @ self.dvt.T.astype(x.dtype)
        dvt = torch.as_tensor(self.dvt, dtype=x.dtype, device=x.device)
        if self.mean is not None:
            x = x - torch.as_tensor(self.mean, dtype=x.dtype, device=x.device)
        return x @ dvt.T


# =====================================================================================
# Frozen ViT (attention scripts, eval_video_segmentation) and attention maps (visualize_attention, video_generation)
# =====================================================================================

def load_frozen_vit(args, device, attention_weights=False):
    """The ViT of --arch/--patch_size with --pretrained_weights (--checkpoint_key), frozen, in eval mode.

    `attention_weights`: without --pretrained_weights, download the released weights the original's attention
    scripts show (ATTENTION_WEIGHTS) rather than those its evaluations use.
    """
    model, _ = build_backbone(args.arch, args.patch_size)
    print(f"Model {args.arch} {args.patch_size}x{args.patch_size} built.")
    load_pretrained_weights(model, args.pretrained_weights, args.checkpoint_key, args.arch, args.patch_size,
                            released=ATTENTION_WEIGHTS if attention_weights else None)
    for param in model.parameters():
        param.requires_grad = False
    return model.eval().to(device)


def attention_transform(size=None):
    """PIL image -> ImageNet-normalised (3, H, W) tensor, as torchvision's Resize, ToTensor and Normalize.

    `size`: None keeps the image, one int sets the short side (aspect kept), (h, w) the exact size; bilinear.
    (Written with PIL and numpy: importing torchvision costs these small scripts seconds.)
    """
    mean, std = np.asarray(IMAGENET_MEAN, dtype=np.float32), np.asarray(IMAGENET_STD, dtype=np.float32)

    def transform(img):
        if size is not None:
            img = img.resize(resized_shape(img.size, size), Image.BILINEAR)
        pixels = (np.asarray(img.convert('RGB'), dtype=np.float32) / 255. - mean) / std
        return torch.from_numpy(pixels.transpose(2, 0, 1).copy())
    return transform


def resized_shape(image_size, size):
    """(width, height) after a torchvision-style Resize(size) of an image of (width, height) image_size."""
    width, height = image_size
    if not isinstance(size, int):
        return size[1], size[0]
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def crop_to_patch_multiple(images, patch_size):
    """Drop the bottom rows and right columns that do not fill a whole patch."""
    height, width = images.shape[-2:]
    return images[..., :height - height % patch_size, :width - width % patch_size]


def attention_mass_masks(maps, threshold):
    """Per map, the highest-attention patches that together hold `threshold` of its mass (boolean, same shape).

    As in the original: sort ascending and keep the patches where the cumulative share exceeds 1 - threshold.
    """
    flat = maps.flatten(-2)
    values, order = torch.sort(flat, dim=-1)
    share = torch.cumsum(values / values.sum(dim=-1, keepdim=True), dim=-1)
    keep = torch.zeros_like(flat, dtype=torch.bool).scatter(-1, order, share > 1 - threshold)
    return keep.reshape(maps.shape)


def upsample_patches(maps, patch_size):
    """Patch-grid maps (..., h, w) -> pixel maps (..., h * patch_size, w * patch_size), nearest neighbour."""
    return maps.repeat_interleave(patch_size, dim=-2).repeat_interleave(patch_size, dim=-1)


def colorize(values, colormap='viridis'):
    """A 2-D map min-max scaled and coloured (RGB uint8), as matplotlib's imsave does."""
    values = np.asarray(values, dtype=np.float32)
    span = values.max() - values.min()
    scaled = (values - values.min()) / span if span > 0 else np.zeros_like(values)
    gray = np.clip(scaled * 256, 0, 255).astype(np.uint8)
    code = {'viridis': cv2.COLORMAP_VIRIDIS, 'inferno': cv2.COLORMAP_INFERNO}[colormap]
    return cv2.cvtColor(cv2.applyColorMap(gray, code), cv2.COLOR_BGR2RGB)


def draw_mask(image, mask, color=(255, 0, 0), alpha=0.5, fill=True):
    """Copy of an RGB uint8 image with `mask` blended in `color` (when fill) and its outline drawn."""
    out = image.copy()
    if fill:
        out[mask] = (out[mask] * (1 - alpha) + np.asarray(color) * alpha).astype(np.uint8)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, color, 1)
    return out
