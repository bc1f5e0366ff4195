"""Helpers shared by the DINO training and evaluation scripts, and the original DINO's utils names.

Sections: argument checking (and the flags a run does not read); shared flags, devices and precision;
distributed runs; models; optimisation, schedules and seeds; checkpoint reads; released weights and
pretrained backbones; logging and metrics. The larger concerns have modules of their own: multicrop (training augmentation),
imagedata (datasets and image loading), evaluation (what the evaluations share), checkpoints
(writes, resume, stop signals) and outputdir (one writer per output folder).
"""
import argparse
import builtins
import contextlib
import datetime
import importlib.util
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import warnings
from collections import defaultdict, deque

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

import vision_transformer as vits

REPO_DIR = os.path.dirname(os.path.abspath(__file__))
# safe_globals (restricted checkpoint loading) arrived in 2.5; scaled_dot_product_attention(scale=) in 2.1
MIN_TORCH_VERSION = (2, 5)


def fail(message, every_rank=False):
    """Stop with one line on stderr and exit status 1 (for user mistakes, never a traceback).

    Under a launcher every process finds the same mistake: its rank 0 alone prints the line, the others exit
    with the same status in silence; `every_rank` for what befell this process alone (its data, its peers).
    """
    if every_rank or launcher_rank() == 0:
        raise SystemExit(f"error: {message}")
    raise SystemExit(1)


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

def parse_checked_args(parser, check_args, argv=None, unread_flags=None):
    """A script's command line: parsed, --arch/--patch_size completed from a training checkpoint given as
    --pretrained_weights, then checked by the script's own check_args (one error line, before any work).

    Flags given on the command line that this run does not read get a warning (unread_shared_flags, and the
    script's `unread_flags(args)`: {flag name: why}); the default --num_workers is capped at the cores.
    """
    args = parser.parse_args(argv)
    given = given_flags(parser, argv)
    if hasattr(args, 'pretrained_weights'):
        take_model_from_checkpoint(parser, args, argv)
    check_args(args)
    warn_unread_flags(given, {**unread_shared_flags(args), **(unread_flags(args) if unread_flags else {})})
    cap_default_workers(args, given)
    return args


def given_flags(parser, argv=None):
    """Names (dests) of the flags given on the command line `argv` (default sys.argv[1:]), whatever their values."""
    probe = argparse.Namespace(**{action.dest: _NOT_GIVEN for action in parser._actions})
    parser.parse_known_args(argv, namespace=probe)  # argparse leaves alone what the namespace holds already
    return {name for name, value in vars(probe).items() if value is not _NOT_GIVEN}


_NOT_GIVEN = object()


def warn(message):
    """One `warning: ...` line on stderr, from the launcher's main process only."""
    if launcher_rank() == 0:
        print_on_every_process(f"warning: {message}", file=sys.stderr)


def warn_unread_flags(given, unread):
    """One warning line per reason for the flags in `given` that this run does not read (`unread`: {name: why})."""
    reasons = defaultdict(list)
    for name, why in unread.items():
        if name in given:
            reasons[why].append(f'--{name}')
    for why, flags in reasons.items():
        warn(f"{', '.join(flags)} {'has' if len(flags) == 1 else 'have'} no effect {why}")


def unread_shared_flags(args):
    """The shared flags (each where the script has it) that this run does not read: {name: why}."""
    unread = {}
    if getattr(args, 'device', None):  # None: a tool without device flags (tools/export_backbone.py)
        unread.update(RunDevice.unread_flags(args))
    if not getattr(args, 'pretrained_weights', True):
        unread['checkpoint_key'] = 'without --pretrained_weights (the released weights hold one network)'
    if getattr(args, 'arch', VIT_ARCHS[0]) not in VIT_ARCHS:
        unread['patch_size'] = f'with --arch {args.arch} (not a ViT)'
    return unread


def cap_default_workers(args, given):
    """The default --num_workers capped at the CPU cores this process may use (torch warns on every run
    otherwise), said in one line; a value given on the command line is kept."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1
    if 'num_workers' in given or getattr(args, 'num_workers', 0) <= cores:
        return
    if launcher_rank() == 0:
        print(f"--num_workers: the default {args.num_workers} is capped at the {cores} CPU cores available "
              f"(pass --num_workers to choose)")
    args.num_workers = cores


def path_arg(value):
    """The argparse type of every path flag: `~` and environment variables expanded, as a shell does outside
    quotes (a path given quoted, or passed on by a launcher or a job file, arrives unexpanded)."""
    expanded = os.path.expandvars(os.path.expanduser(value))
    unset = re.search(r'\$(\w+|\{[^}]*\})', expanded)
    if unset and not os.path.exists(expanded):  # left as typed: a folder named '$DATA' would be created
        fail(f"{value}: the environment variable {unset.group(1).strip('{}')} is not set; set it, or write the path out")
    return expanded


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


def check_crop_size(size, args, flag):
    """A square crop the network sees (--arch, --patch_size in args): at least one ViT patch; a warning where
    the ViT leaves out the pixels past its last whole patch."""
    vit = args.arch in VIT_ARCHS
    check_image_size(size, args.patch_size if vit else 1, flag)
    if vit and size % args.patch_size:
        warn(f"{flag} {size} is not a multiple of --patch_size {args.patch_size}: the ViT ignores the last "
             f"{size % args.patch_size} pixel rows and columns")


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
        parser.add_argument('--pretrained_weights', default='', type=path_arg, help="""Weights to load: a backbone file
            or a DINO training checkpoint (whose --arch/--patch_size are then used); empty: DINO's released
            weights for --arch/--patch_size (image retrieval: vit_small/16 gets the Google Landmarks v2 ones).""")
        parser.add_argument('--checkpoint_key', default='teacher', type=str,
                            help='Network to take from a DINO checkpoint ("teacher" or "student").')
    return parser


def add_random_weights_args(parser):
    """--random_weights and --seed: evaluate a random initialisation, the baseline a trained backbone must beat."""
    parser.add_argument('--random_weights', default=False, type=bool_flag, nargs='?', const=True,
                        help="""Evaluate a randomly initialised backbone of --arch/--patch_size drawn with --seed
        instead of loading weights: the baseline a trained backbone must beat. It equals the teacher of
        main_dino.py before its first step with the same --seed.""")
    parser.add_argument('--seed', default=0, type=int, help='Seed of the --random_weights initialisation.')


def build_evaluated_backbone(args):
    """The frozen backbone an evaluation measures, with its feature dimension: --arch/--patch_size with
    --pretrained_weights, or with --random_weights the random initialisation of --seed."""
    fix_random_seeds(args.seed if args.random_weights else 0)
    model, embed_dim = build_backbone(args.arch, args.patch_size)
    if args.random_weights:
        print(f"Random weights: {args.arch} initialised with --seed {args.seed} (the random baseline)")
    else:
        load_pretrained_weights(model, args.pretrained_weights, args.checkpoint_key, args.arch, args.patch_size)
    return model, embed_dim


def check_random_weights(args):
    if args.random_weights and args.pretrained_weights:
        fail("--random_weights evaluates a random initialisation: leave out --pretrained_weights, or --random_weights "
             "to evaluate those weights")


def random_weights_unread(args):
    """The flags that --random_weights (or its absence) leaves unread: {name: why}."""
    if args.random_weights:
        return {'checkpoint_key': 'with --random_weights (no weights are loaded)'}
    return {'seed': 'without --random_weights (it seeds the random initialisation)'}


def add_device_args(parser):
    """Device and mixed-precision flags shared by every script."""
    parser.add_argument('--device', default='auto', choices=['auto', 'hpu', 'cuda', 'cpu'],
                        help='Device to run on; auto picks HPU, then CUDA, then CPU.')
    parser.add_argument('--autocast', '--hmp', dest='autocast', action='store_true',
                        help='Run forward passes (and the loss) under bf16 autocast (HPU, CUDA or CPU).')
    parser.add_argument('--hmp-bf16', '--hmp_bf16', type=path_arg, dest='hmp_bf16',
                        default=os.path.join(REPO_DIR, 'ops_bf16.txt'),
                        help='HPU autocast: file listing the ops to run in bf16.')
    parser.add_argument('--hmp-fp32', '--hmp_fp32', type=path_arg, dest='hmp_fp32',
                        default=os.path.join(REPO_DIR, 'ops_fp32.txt'),
                        help='HPU autocast: file listing the ops kept in fp32.')
    parser.add_argument('--lazy_mode', default=None, type=bool_flag, help="""HPU only: true runs Habana's lazy
        mode (the graph of each phase is built op by op and cut by mark_step; torch.compile is refused), false
        its eager mode (torch.compile with backend hpu_backend compiles the ViT blocks and the render). Default:
        PT_HPU_LAZY_MODE if set, else the installed Gaudi software's default (eager since the stacks that ship
        PyTorch 2.5 or newer).""")
    return parser


class RunDevice:
    """The device of this run and what it means for the code, resolved once (setup_device): the scripts ask it
    instead of comparing device names.

    type: 'hpu', 'cuda' or 'cpu'; mode: 'hpu-lazy', 'hpu-eager', 'cuda' or 'cpu'. autocast_dtype: bf16 with
    --autocast, fp16 on CUDA with --use_fp16 (the original's path, with a gradient scaler), else None.
    """

    PROCESS_GROUP_BACKENDS = {'cuda': 'nccl', 'hpu': 'hccl', 'cpu': 'gloo'}

    def __init__(self, device_type='cpu', lazy=False, autocast=False, use_fp16=False):
        self.type = device_type
        self.mode = ('hpu-lazy' if lazy else 'hpu-eager') if device_type == 'hpu' else device_type
        self.lazy = self.mode == 'hpu-lazy'
        self.accelerator = device_type != 'cpu'
        fp16 = device_type == 'cuda' and use_fp16
        self.autocast_dtype = torch.float16 if fp16 else torch.bfloat16 if autocast else None
        # torch.compile: inductor where it generates code (CUDA with Triton, a CPU with a C++ compiler), Habana's
        # backend in eager mode; lazy mode builds its graphs itself and takes no torch.compile
        self.compile_backend = {'hpu-lazy': None, 'hpu-eager': 'hpu_backend'}.get(self.mode, 'inductor')
        self.pin_memory = device_type == 'cuda'
        self.fused_optimizers = device_type in ('cpu', 'cuda')  # torch's fused AdamW kernels
        self.sync_batch_norm = device_type != 'cpu'  # torch's SyncBatchNorm refuses CPU tensors
        self.timing_events = self.profiles_kernels = device_type == 'cuda'

    def __repr__(self):
        return f"RunDevice({self.mode}, autocast {self.autocast_dtype})"

    @classmethod
    def resolve(cls, args):
        """The run's device from its flags: args.device resolved in place ('auto' -> the best present), the HPU
        environment set before Habana is imported, args.lazy_mode set to the mode Habana's bridge runs in,
        args.use_fp16 cleared off CUDA (fp16 with a gradient scaler is the original's CUDA path)."""
        if args.device in ('auto', 'hpu') and _habana_present():
            _set_hpu_environment(args)
        args.device = cls.resolve_name(args.device)
        lazy = False
        if args.device == 'hpu':
            import habana_frameworks.torch.core  # noqa: F401  (registers the device and torch.compile's hpu_backend)
            asked, lazy = getattr(args, 'lazy_mode', None), _hpu_is_lazy()
            if asked is not None and asked != lazy:
                fail(f"--lazy_mode {str(asked).lower()}: Habana's bridge runs in {'lazy' if lazy else 'eager'} mode "
                     "(PT_HPU_LAZY_MODE is read once, when it is loaded, and not every release has both modes); "
                     "leave --lazy_mode out to run in the bridge's mode")
            args.lazy_mode = lazy
        if getattr(args, 'use_fp16', False) and args.device != 'cuda':
            args.use_fp16 = False
        return cls(args.device, lazy, getattr(args, 'autocast', False), getattr(args, 'use_fp16', False))

    @staticmethod
    def resolve_name(requested):
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

    @staticmethod
    def unread_flags(args):
        """The device flags that a run with args.device (not resolved yet) does not read: {name: why}."""
        unread, device = {}, args.device
        if device in ('cpu', 'cuda') or not _habana_present():
            unread.update(dict.fromkeys(['lazy_mode', 'hmp_bf16', 'hmp_fp32'], 'off HPU'))
        elif not args.autocast:
            unread.update(dict.fromkeys(['hmp_bf16', 'hmp_fp32'], 'without --autocast'))
        if hasattr(args, 'use_fp16') and not (device == 'cuda' or device == 'auto' and torch.cuda.is_available()):
            unread['use_fp16'] = 'off CUDA (fp16 with a gradient scaler is the CUDA path; see --autocast)'
        return unread

    def describe(self):
        """The start-up line's words for the execution mode."""
        return {'hpu-lazy': "hpu, lazy mode (PT_HPU_LAZY_MODE=1: graphs built op by op and cut by mark_step; "
                            "no torch.compile)",
                'hpu-eager': "hpu, eager mode (PT_HPU_LAZY_MODE=0: torch.compile with backend hpu_backend)",
                }.get(self.mode, self.mode)

    @property
    def torch_device(self):
        """This process's torch.device."""
        if self.type == 'cuda':
            return torch.device('cuda', torch.cuda.current_device())
        return torch.device(self.type)

    def compile_unavailable(self):
        """Why torch.compile cannot run here, as the end of a sentence starting '--compile true', or None."""
        if self.compile_backend is None:
            return ("is not supported in HPU lazy mode: lazy mode already compiles the training step's graph; "
                    "leave --compile out, or pass --lazy_mode false (eager mode with torch.compile)")
        if self.type == 'cuda' and importlib.util.find_spec('triton') is None:
            return ("on CUDA needs Triton (torch.compile's GPU code generator), which is not installed; "
                    "pip install triton, or pass --compile false")
        return None

    def compiles_by_default(self):
        """--compile's default: on the accelerators where it can (CUDA with Triton, HPU eager mode); not on a CPU,
        where the compiled step is hardly faster and needs a C++ compiler."""
        return self.accelerator and self.compile_unavailable() is None

    def autocast(self):
        """The forward passes' autocast context (nothing without --autocast or CUDA fp16). On HPU, the op
        lists were handed to Habana (PT_HPU_AUTOCAST_*) before its modules were imported."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.type, dtype=self.autocast_dtype)

    def grad_scaler(self):
        """A gradient scaler for the step's one optimizer path: enabled for CUDA fp16 only, a no-op otherwise."""
        return torch.amp.GradScaler('cuda', enabled=self.autocast_dtype == torch.float16)

    def mark_step(self):
        """Cut the lazy HPU graph here; a no-op on every other device and in eager mode."""
        if self.lazy:
            import habana_frameworks.torch.core as htcore
            htcore.mark_step()

    def mark_phases(self, modules, optimizer):
        """Lazy HPU mode: cut the graph after each forward pass of `modules`, before the optimizer step (the
        backward pass, clipping and freezing are done) and after it. Nothing elsewhere."""
        if not self.lazy:
            return
        for module in modules:
            module.register_forward_hook(lambda *_: self.mark_step())
        optimizer.register_step_pre_hook(lambda *_: self.mark_step())
        optimizer.register_step_post_hook(lambda *_: self.mark_step())

    def synchronize(self):
        """Wait for queued device work (for timing); lazy mode first runs the pending graph."""
        self.mark_step()
        if self.type == 'cuda':
            torch.cuda.synchronize()
        elif self.type == 'hpu':
            import habana_frameworks.torch.hpu as hthpu
            hthpu.synchronize()

    def set_local_device(self, local_index):
        """Bind this process to its GPU (CUDA; the other devices pick theirs themselves)."""
        if self.type == 'cuda':
            torch.cuda.set_device(local_index % torch.cuda.device_count())

    def ddp_device_ids(self):
        return [torch.cuda.current_device()] if self.type == 'cuda' else None

    def reset_peak_memory(self):
        """Start the peak memory anew; False where it cannot be (a CPU whose kernel does not let the process reset
        its peak RSS: peak_memory_mib then gives the peak since the process started)."""
        if self.type == 'cuda':
            torch.cuda.reset_peak_memory_stats()
        elif self.type == 'hpu':
            import habana_frameworks.torch.hpu as hthpu
            hthpu.reset_peak_memory_stats()
        else:
            try:  # Linux: resets the kernel's high-water mark of the resident set (VmHWM) to the current RSS
                with open('/proc/self/clear_refs', 'w') as f:
                    f.write('5')
            except OSError:
                return False
        return True

    def peak_memory_mib(self):
        """Peak device memory allocated by torch (MiB); on a CPU, the process's peak resident memory."""
        if self.type == 'cuda':
            return torch.cuda.max_memory_allocated() / 2 ** 20
        if self.type == 'hpu':
            import habana_frameworks.torch.hpu as hthpu
            return hthpu.max_memory_allocated() / 2 ** 20
        return _resident_high_water_mark_kib() / 2 ** 10

    def memory_measure(self, reset=True):
        """What peak_memory_mib measures, in words (`reset`: what reset_peak_memory returned)."""
        return {'cuda': 'torch.cuda.max_memory_allocated during the timed steps',
                'hpu': 'hpu max_memory_allocated during the timed steps'}.get(
            self.type, 'process peak RSS during the timed steps' if reset else
            'process peak RSS since it started: this system does not let it be reset before the timed steps')

    def free_memory(self):
        """Bytes a computation may take: the CPU's physical memory, the GPU's free memory; None on HPU."""
        if self.type == 'cpu':
            return os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES')
        if self.type == 'cuda':
            return torch.cuda.mem_get_info(self.torch_device)[0]
        return None

    def process_group_backend(self):
        """The backend of this device's process group (HPU: hccl, which importing Habana's module registers)."""
        if self.type == 'hpu':
            import habana_frameworks.torch.distributed.hccl  # noqa: F401
        return self.PROCESS_GROUP_BACKENDS[self.type]

    def collective_dtype(self, dtype):
        """The dtype a tensor of `dtype` travels in through this device's collectives: HCCL takes 32-bit and
        16-bit floats and 32-bit integers only."""
        if self.type != 'hpu':
            return dtype
        if dtype.is_floating_point:
            return torch.float32 if dtype == torch.float64 else dtype
        return torch.int32


def _resident_high_water_mark_kib():
    """The process's peak RSS since its start or the last reset (Linux's VmHWM), else the lifetime maximum."""
    try:
        with open('/proc/self/status') as f:
            return next(int(line.split()[1]) for line in f if line.startswith('VmHWM:'))
    except (OSError, StopIteration):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux


_run_device = RunDevice()  # until setup_device resolves the run's (tests and library use: the CPU, no autocast)


def run_device():
    """The RunDevice of this process (setup_device resolves it)."""
    return _run_device


def _habana_present():
    return importlib.util.find_spec('habana_frameworks') is not None


def _set_hpu_environment(args):
    """Environment Habana reads when its modules are imported, so it must be set first: the execution mode
    when --lazy_mode is given (else PT_HPU_LAZY_MODE or the bridge's default rules), and the autocast op lists."""
    if getattr(args, 'lazy_mode', None) is not None:
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


def _hpu_is_lazy():
    """The mode Habana's bridge runs in (asked once its modules are imported)."""
    try:
        from habana_frameworks.torch.utils.internal import is_lazy
    except ImportError:  # a bridge without the query: releases before eager mode existed ran lazy
        return os.environ.get('PT_HPU_LAZY_MODE', '1') != '0'
    return bool(is_lazy())


def resolve_device_name(requested):
    """'auto' -> the best device present; an explicit device that is absent stops with one line."""
    return RunDevice.resolve_name(requested)


def setup_device(args):
    """Resolve the run's device once: args.device (and args.lazy_mode on HPU) in place, the HPU environment
    set before Habana is imported, and the RunDevice that the code asks (run_device()). Returns the device
    type name. Call once, before init_distributed_mode and before any model is built.
    """
    global _run_device
    _run_device = RunDevice.resolve(args)
    return args.device


def mark_step():
    """Cut the lazy HPU graph here; a no-op on every other device or in eager mode."""
    _run_device.mark_step()


def autocast_context(device_type, autocast=False, use_fp16=False):
    """bf16 autocast when --autocast, fp16 autocast on CUDA when --use_fp16, else nothing."""
    return RunDevice(device_type, autocast=autocast, use_fp16=use_fp16).autocast()


# =====================================================================================
# Distributed runs (every script): process group, collectives, start of a run, one-line failure reports
# =====================================================================================

def launcher_rank():
    """This process's rank as its launcher set it (torchrun, torch.distributed.launch, SLURM), known before
    the process group is joined; 0 in a process no launcher started."""
    if 'RANK' in os.environ and 'WORLD_SIZE' in os.environ:
        return int(os.environ['RANK'])
    if 'SLURM_PROCID' in os.environ and 'SLURM_NTASKS' in os.environ:
        return int(os.environ['SLURM_PROCID'])
    return 0


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
        _run_device.set_local_device(0)
        setup_for_distributed(True)
        return
    args.distributed = True
    _run_device.set_local_device(args.gpu)
    # a collective that waits longer than this raises on every surviving process instead of hanging
    timeout = datetime.timedelta(seconds=getattr(args, 'dist_timeout', 1800))
    dist.init_process_group(backend=_run_device.process_group_backend(), world_size=args.world_size, rank=args.rank,
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


# print() of every process, also once setup_for_distributed silenced print() on all but rank 0
print_on_every_process = builtins.print


def setup_for_distributed(is_master):
    """Make print() silent on every process but rank 0 (unless called with force=True).

    Installed in a lone process too, so that print(..., force=True) works everywhere.
    """
    def print_on_master(*args, **kwargs):
        force = kwargs.pop('force', False)
        if is_master or force:
            print_on_every_process(*args, **kwargs)

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


class DataError(Exception):
    """An image file that cannot be read."""


def data_error_message(exc):
    """The one useful line of a DataError re-raised from a DataLoader worker."""
    lines = [line for line in str(exc).splitlines() if 'cannot read image' in line]
    return (lines[-1].split('DataError: ')[-1] if lines else str(exc).splitlines()[-1]).strip()


def run_reporting_failures(pipeline, args, data_hint="remove or fix the file and run again"):
    """pipeline(args), then leave the process group (a process that exits while in one can abort); an
    unreadable image or a lost peer process reported as one error line, and Ctrl-C (where the pipeline does
    not handle it) as one line and exit status 130."""
    try:
        result = pipeline(args)
        leave_process_group()
        return result
    except KeyboardInterrupt:
        print_on_every_process("Interrupted (Ctrl-C); the files already written are kept.", file=sys.stderr)
        raise SystemExit(130) from None
    except DataError as exc:
        fail(f"{data_error_message(exc)}; {data_hint}", every_rank=True)
    except (RuntimeError, ConnectionError, EOFError) as exc:
        dead_worker = _dead_data_worker(exc)
        if dead_worker:
            fail(dead_worker_message(dead_worker, args), every_rank=True)
        if not (isinstance(exc, RuntimeError) and getattr(args, 'distributed', False) and is_peer_failure(exc)):
            raise
        fail(peer_failure_message(exc, args), every_rank=True)


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
    """torch.device of this process (of the device setup_device resolved from args)."""
    return _run_device.torch_device


def start_run(args, show_args=True, join_group=True):
    """Resolve --device, join the launcher's process group (if any; single-process tools pass
    join_group=False), print the git commit and the arguments; returns this process's torch.device.
    """
    setup_device(args)
    if join_group:
        init_distributed_mode(args)
    if show_args:
        print(f"Device: {_run_device.describe()}")
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

    def no_sync(self):
        """DDP's context of backward passes whose gradients are not all-reduced: nothing to do in one process."""
        return contextlib.nullcontext()


def wrap_ddp(model, args):
    """DDP across processes (no device_ids on HPU/CPU), or the single-process stand-in."""
    if not getattr(args, 'distributed', False):
        return SingleProcess(model)
    return nn.parallel.DistributedDataParallel(model, device_ids=_run_device.ddp_device_ids())


# Every collective of the scripts goes through the helpers below. Each hands the backend a copy of its
# tensor on the device the backend works on (nccl: this process's GPU, hccl: the Gaudi, gloo: the CPU), in
# a dtype the backend takes, and returns the result on the caller's tensor's device and in its dtype.

def backend_device(backend):
    """torch.device on which collectives of `backend` ('nccl', 'hccl', 'gloo') take their tensors."""
    return RunDevice(BACKEND_DEVICE_TYPES.get(str(backend).lower(), 'cpu')).torch_device


def backend_dtype(dtype, backend):
    """The dtype a tensor of `dtype` travels in through `backend` (RunDevice.collective_dtype of its device)."""
    return RunDevice(BACKEND_DEVICE_TYPES.get(str(backend).lower(), 'cpu')).collective_dtype(dtype)


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


# =====================================================================================
# Models: backbones (training and evaluations), the multi-crop wrapper (main_dino)
# =====================================================================================

VIT_ARCHS = ['vit_tiny', 'vit_small', 'vit_base', 'deit_tiny', 'deit_small']
trunc_normal_ = vits.trunc_normal_  # the original kept it here; code written against it imports utils.trunc_normal_
# the normalisation of every image a network sees (training views, evaluations, attention maps)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def torchvision_archs():
    from torchvision import models as torchvision_models
    return sorted(name for name in torchvision_models.__dict__
                  if name.islower() and not name.startswith('__') and callable(torchvision_models.__dict__[name]))


def check_arch(arch):
    """Stop unless build_backbone can build `arch` (checked at start-up, before any data is listed)."""
    if arch.replace('deit', 'vit') not in ('vit_tiny', 'vit_small', 'vit_base') and arch not in torchvision_archs():
        fail(f"unknown --arch {arch}; choose one of {', '.join(VIT_ARCHS)} or a torchvision network such as resnet50")


def build_backbone(arch, patch_size=16, **vit_kwargs):
    """A ViT of this repository or a torchvision network, with its feature dimension."""
    check_arch(arch)
    vit = arch.replace('deit', 'vit')
    if vit in ('vit_tiny', 'vit_small', 'vit_base'):
        model = vits.__dict__[vit](patch_size=patch_size, **vit_kwargs)
        return model, model.embed_dim
    from torchvision import models as torchvision_models
    model = torchvision_models.__dict__[arch]()
    if not hasattr(model, 'fc'):
        fail(f"--arch {arch}: only torchvision networks with a final 'fc' layer (ResNets, ...) are supported")
    embed_dim = model.fc.weight.shape[1]
    model.fc = nn.Identity()
    return model, embed_dim


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
# Checkpoint reads: tensors and plain values only (resume, evaluations, released weights)
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
    if is_linear_head_checkpoint(state_dict):
        fail(f"{source} is a linear classifier (eval_linear.py's checkpoint.pth.tar: the head trained on frozen "
             "features), not a backbone; pass the backbone it was trained on, i.e. the --pretrained_weights given "
             "to eval_linear.py (e.g. a DINO training run's checkpoint.pth, or released weights)")
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
        theirs, ours = state_dict['pos_embed'].shape, own['pos_embed'].shape
        if theirs[-1] == ours[-1] and mismatched == []:  # the right network, its position embedding resized
            side = round((theirs[1] - 1) ** 0.5)
            fail(f"{source} has a position embedding for {theirs[1] - 1} patches ({side}x{side}: {side * patch_size}-"
                 f"pixel images at --patch_size {patch_size}), where DINO's ViTs keep theirs for 224-pixel images "
                 f"({ours[1] - 1} patches), as tools/export_backbone.py --img_size {side * patch_size} writes it; pass "
                 "the DINO checkpoint it was exported from, or an export made without --img_size")
        fail(f"{source} does not match --arch {model_name} --patch_size {patch_size} (pos_embed shape differs); "
             "pass the --arch/--patch_size it was trained with")
    msg = model.load_state_dict(state_dict, strict=False)
    print(f'Pretrained weights found at {source} and loaded with msg: {msg}')
    return msg


def is_linear_head_checkpoint(checkpoint):
    """Whether a loaded checkpoint is eval_linear's (or a released linear head): a 'state_dict' of linear.* only."""
    head = checkpoint.get('state_dict') if isinstance(checkpoint, dict) else None
    return isinstance(head, dict) and bool(head) and all(k.removeprefix('module.').startswith('linear.') for k in head)


def take_model_from_checkpoint(parser, args, argv=None):
    """--arch/--patch_size from a DINO training checkpoint given as --pretrained_weights (it holds its `args`).

    Flags given on the command line (`argv`, default sys.argv[1:], parsed by `parser`) win, but must agree with
    the checkpoint; released backbone files (no `args`) leave the flags as they are.
    """
    trained = saved_training_args(getattr(args, 'pretrained_weights', ''))
    if not trained or 'arch' not in trained:
        return
    names = ['arch', 'patch_size'] if 'patch_size' in trained and trained['arch'] in VIT_ARCHS else ['arch']
    given = given_flags(parser, argv)
    taken = []
    for name in names:
        if name not in given:
            setattr(args, name, trained[name])
            taken.append(f"--{name} {trained[name]}")
        elif getattr(args, name) != trained[name]:
            fail(f"--{name} {getattr(args, name)} contradicts {args.pretrained_weights}, a checkpoint trained with "
                 f"--{name} {trained[name]}; drop --{name} to use the checkpoint's")
    if taken:
        print(f"Taking {' '.join(taken)} from the training arguments saved in {args.pretrained_weights}")


def saved_training_args(path):
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
# The original DINO's utils names whose code now lives in a module of its own: code written against the
# original imports them from utils as before; this repository's scripts import them from their modules.
# =====================================================================================

ORIGINAL_NAMES_ELSEWHERE = {
    'GaussianBlur': 'multicrop', 'Solarization': 'multicrop',
    'restart_from_checkpoint': 'checkpoints', 'save_on_master': 'checkpoints',
    'PCA': 'evaluation', 'compute_ap': 'evaluation', 'compute_map': 'evaluation', 'multi_scale': 'evaluation',
}


def __getattr__(name):
    """utils.<name> for the names above, taken from their module when first asked for (importing those
    modules here, at the top, would be an import loop: each of them imports utils)."""
    if name in ORIGINAL_NAMES_ELSEWHERE:
        return getattr(importlib.import_module(ORIGINAL_NAMES_ELSEWHERE[name]), name)
    raise AttributeError(f"module 'utils' has no attribute '{name}'")
