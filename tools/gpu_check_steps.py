"""The Python parts of tools/gpu_check.sh and tools/hpu_check.sh: environment checks, fixtures, and checks of
what a step wrote.

Run as `python tools/gpu_check_steps.py <command> ...` from the repository root (the shell script does).
Every command prints its findings; the last line is what gpu_check.sh shows on the step's PASS/FAIL line.
"""
import importlib
import json
import math
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import unittest.mock
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / 'tests')]

# pip name -> import name, where they differ
IMPORT_NAMES = {'Pillow': 'PIL', 'opencv-python-headless': 'cv2', 'scikit-image': 'skimage',
                'scikit-learn': 'sklearn'}


def gpu():
    import torch
    if not torch.cuda.is_available():
        sys.exit(f"torch {torch.__version__} sees no CUDA GPU (torch.cuda.is_available() is False); "
                 "run this on a machine with an NVIDIA GPU and a CUDA build of torch")
    name = torch.cuda.get_device_name(0)
    memory = torch.cuda.get_device_properties(0).total_memory / 2 ** 30
    print(f"{name}, {memory:.0f} GiB; torch {torch.__version__}, CUDA {torch.version.cuda}, "
          f"Python {sys.version.split()[0]}")


def hpu():
    """The Gaudi, Habana's software and the execution mode its bridge defaults to (PT_HPU_LAZY_MODE unset)."""
    os.environ.pop('PT_HPU_LAZY_MODE', None)
    try:
        import habana_frameworks.torch.core  # noqa: F401
        import habana_frameworks.torch.hpu as hthpu
    except ImportError as exc:
        sys.exit(f"Habana's PyTorch packages do not import ({exc}); run this in a Gaudi software image")
    import torch
    if not hthpu.is_available():
        sys.exit("habana_frameworks imports but sees no Gaudi (hthpu.is_available() is False)")
    sys.path.insert(0, str(REPO))
    import utils
    default = 'lazy' if utils._hpu_is_lazy() else 'eager'
    version = getattr(importlib.import_module('habana_frameworks.torch'), '__version__', 'unknown')
    print(f"{hthpu.get_device_name()} x{hthpu.device_count()}; Habana PyTorch {version}, torch {torch.__version__}, "
          f"Python {sys.version.split()[0]}; the bridge's default mode: {default}")


def requirements():
    wanted = ['torch', 'torchvision']
    for line in (REPO / 'requirements.txt').read_text().splitlines():
        line = line.split('#')[0].strip()
        if line:
            wanted.append(re.split(r'[<>=!~\[; ]', line)[0])
    missing = []
    for package in wanted:
        module = IMPORT_NAMES.get(package, package.replace('-', '_'))
        try:
            importlib.import_module(module)
        except Exception as exc:  # a broken install counts as missing too
            missing.append(f"{package} (import {module}: {type(exc).__name__})")
    if missing:
        sys.exit(f"missing: {', '.join(missing)}; install them (this check installs nothing)")
    print(f"all {len(wanted)} requirements import")


def _render(job):
    """Write images [start, stop) of the synthetic training set as PNGs of an ImageFolder (one class folder)."""
    import imagedata
    root, start, stop, size = job
    shapes = imagedata.SyntheticShapes('train', length=stop, image_size=size)
    for index in range(start, stop):
        shapes.render(index).save(Path(root) / 'all' / f'{index:06d}.png')


def fixtures(work, learn_images):
    """Evaluation fixtures from the test helpers, random backbones, and the learning run's ImageFolder."""
    work, learn_images = Path(work), int(learn_images)
    try:
        import pytest  # noqa: F401  (the test modules only need its decorators at import)
    except ImportError:
        sys.modules['pytest'] = unittest.mock.MagicMock()
    import torch

    import test_retrieval
    import test_video_attention
    import utils
    for patch_size in (16, 8):
        torch.manual_seed(0)
        model, _ = utils.build_backbone('vit_tiny', patch_size)
        torch.save(model.state_dict(), work / f'random_vit_tiny{patch_size}.pth')
    test_retrieval.write_revisitop(work / 'revisitop')
    test_retrieval.write_copydays(work / 'copydays_root')
    test_video_attention.write_davis_video(work / 'davis', 'shapes')
    test_video_attention.write_test_video(work / 'video.mp4')
    test_retrieval.photo('astronaut', 128).save(work / 'photo.png')

    (work / 'learn_data' / 'all').mkdir(parents=True)
    cores = os.cpu_count() or 1
    bounds = [learn_images * i // cores for i in range(cores + 1)]
    with multiprocessing.Pool(cores) as pool:
        pool.map(_render, [(work / 'learn_data', a, b, 64) for a, b in zip(bounds, bounds[1:]) if b > a])
    print(f"fixtures in {work}: revisitop, copydays, davis, video, photo, random vit_tiny/16 and /8, "
          f"{learn_images} training images")


def _read_log(out):
    return [json.loads(line) for line in (Path(out) / 'log.txt').read_text().splitlines()]


def training_run(out, epochs):
    """A torchrun training run: one log line per epoch with finite figures, its checkpoint, its process group."""
    import utils
    log = _read_log(out)
    assert [entry['epoch'] for entry in log] == list(range(int(epochs))), f"log.txt epochs {log}"
    assert all(math.isfinite(entry['train_loss']) for entry in log), f"non-finite loss in {log}"
    checkpoint = utils.load_checkpoint_or_exit(Path(out) / 'checkpoint.pth')
    args = checkpoint['args']
    assert checkpoint['epoch'] == int(epochs), f"checkpoint epoch {checkpoint['epoch']}"
    assert args.distributed and args.world_size == 1, "the torchrun process did not join a process group"
    scaler = checkpoint.get('fp16_scaler')
    # setup_device clears --use_fp16 off CUDA, and a checkpoint keeps an enabled scaler only
    assert (scaler is not None) == args.use_fp16, f"fp16_scaler {scaler}"
    precision = 'fp16 + GradScaler' if scaler else ('bf16 autocast' if args.autocast else 'fp32')
    print(f"{precision}: losses {[round(entry['train_loss'], 4) for entry in log]}, checkpoint epoch "
          f"{checkpoint['epoch']}, process group joined (world size 1)")


def sigterm_resume(reference, out, *command):
    """SIGTERM to the job's process group (as SLURM sends it) mid-epoch 1, resume, compare with `reference`."""
    import utils
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    output = ''
    for line in proc.stdout:
        output += line
        if line.startswith('Epoch: [1/2]  [0/'):  # printed after the first iteration of epoch 1
            os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=120)  # torchrun itself ends non-zero on a signal; its worker saved and exited 0
    assert 'Stopped by SIGTERM at epoch 1' in output, output[-2000:]
    stopped = utils.load_checkpoint_or_exit(Path(out) / 'checkpoint.pth')
    assert stopped['epoch'] == 1 and stopped['step'] > 0, f"epoch {stopped['epoch']} step {stopped['step']}"
    assert len(_read_log(out)) == 1

    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert f"Resuming epoch 1 at iteration {stopped['step']}/" in resumed.stdout
    got, want = _read_log(out), _read_log(reference)
    assert [e['epoch'] for e in got] == [0, 1]
    loss_gap = abs(got[1]['train_loss'] - want[1]['train_loss']) / abs(want[1]['train_loss'])
    assert loss_gap < 1e-2, f"epoch 1 loss {got[1]['train_loss']} vs uninterrupted {want[1]['train_loss']}"
    got_w = utils.load_checkpoint_or_exit(Path(out) / 'checkpoint.pth')['teacher']
    want_w = utils.load_checkpoint_or_exit(Path(reference) / 'checkpoint.pth')['teacher']
    gap = max((got_w[k].float() - want_w[k].float()).abs().max().item() for k in want_w)
    exact = 'bit-exact' if gap == 0 else f"teacher weights within {gap:.2g}"
    print(f"stopped at iteration {stopped['step']} of epoch 1, resumed: epoch-1 loss within {loss_gap:.1e} "
          f"of the uninterrupted run, {exact}")


def knn_top1(log_path, k='20'):
    text = Path(log_path).read_text()
    match = re.search(rf'^{k}-NN classifier result: Top1: ([\d.]+)', text, re.M)
    if not match:
        sys.exit(f"no {k}-NN result in {log_path}")
    return float(match.group(1))


def learning(trained_log, random_log, learn_out, train_log):
    """Both k-NN figures, and whether training lifted the teacher clearly above the random backbone."""
    import utils
    trained, random_init = knn_top1(trained_log), knn_top1(random_log)
    checkpoint = utils.load_checkpoint_or_exit(Path(learn_out) / 'checkpoint.pth')
    args = checkpoint['args']
    iters_per_epoch = len(list(Path(args.data_path).glob('*/*.png'))) // args.batch_size_per_device
    iterations = checkpoint['epoch'] * iters_per_epoch + checkpoint.get('step', 0)
    capped = ' (stopped by the time cap)' if 'Stopped by SIGTERM' in Path(train_log).read_text() else ''
    losses = [round(entry['train_loss'], 3) for entry in _read_log(learn_out)]
    summary = (f"20-NN top-1 on synthetic val: trained teacher {trained:.1f}%, random init {random_init:.1f}% "
               f"(chance 10%), after {iterations} iterations{capped}; epoch losses {losses[:2]}...{losses[-2:]}")
    if trained < random_init + 5:
        sys.exit(summary + "; training did not lift k-NN top-1 5 points above the random backbone")
    print(summary)


def _last_json(path):
    return json.loads([line for line in Path(path).read_text().splitlines() if line.startswith('{')][-1])


def benchmark(json_log):
    r = _last_json(json_log)
    step = f"compiled in {r['compile_seconds']:.0f} s" if r['compile'] else 'eager'
    busy = f", GPU busy {100 * r['device_busy_fraction']:.0f}%" if r.get('device_busy_fraction') else ''
    print(f"{r['arch']}/{r['patch_size']} {r['dtype']} batch {r['batch_size_per_device']} {step}: "
          f"{r['images_per_s']:.0f} images/s, {r['achieved_flops_per_s'] / 1e12:.1f} TFLOP/s = MFU "
          f"{100 * r['mfu']:.1f}% of the measured matmul peak {r['matmul_peak_flops_per_s'] / 1e12:.0f} TFLOP/s, "
          f"peak memory {r['peak_memory_mb'] / 1024:.1f} GiB{busy}")


def train(json_log):
    """benchmark.py --mode train's figures in one line: the loop end to end beside the step alone."""
    r = _last_json(json_log)
    print(f"--augment_on {r['augment_on']}, {r['num_workers']} workers, {r['arch']}/{r['patch_size']} batch "
          f"{r['batch_size_per_device']}: {r['images_per_s']:.0f} images/s end to end, "
          f"{100 * r['data_wait_share']:.0f}% waiting for data; step alone {r['step_images_per_s']:.0f} images/s "
          f"(end to end {r['ratio_to_step']:.2f}x of it)")


def found(log_path, pattern):
    """The first line of the log that matches `pattern` (a regular expression), or a failure."""
    for line in Path(log_path).read_text().splitlines():
        if re.search(pattern, line):
            print(line.strip())
            return
    sys.exit(f"no line matching {pattern!r} in {log_path}")


COMMANDS = {'gpu': gpu, 'hpu': hpu, 'requirements': requirements, 'fixtures': fixtures, 'training_run': training_run,
            'sigterm_resume': sigterm_resume, 'learning': learning, 'benchmark': benchmark, 'train': train,
            'found': found}

if __name__ == '__main__':
    try:
        COMMANDS[sys.argv[1]](*sys.argv[2:])
    except AssertionError as exc:
        sys.exit(f"check failed: {exc}")
