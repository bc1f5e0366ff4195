"""Every command line in README.md and in Habana's README runs as written, on fixture data in the READMEs' layouts.

The lines are read from the READMEs' ```bash blocks, so the documents and this test cannot drift apart.
A line is turned into a run here only by the rules in the tables below, applied to its arguments:
  - PATHS: a path the README names is replaced by fixture data laid out the same way (relative paths such
    as ./dino_vit_small/checkpoint.pth are kept: lines run in a folder that holds them);
  - ARCH: --arch values are shrunk to vit_tiny;
  - APPEND: flags appended per script to make the run tiny (argparse keeps the last value of a flag);
  - a line that loads weights without --pretrained_weights (the released weights, downloaded) gets a local
    stand-in of the same patch size (and --arch vit_tiny when it names none);
  - launchers run 2 processes (--nproc_per_node 2) on a free --master_port.
Every line is parsed by its launcher's and its script's own argument parsers. Lines for hardware absent here
(--device hpu, or cuda without a GPU) are only parsed. To keep the suite fast, only the first runnable
one-process line of each script in each README is run, plus the first launcher line of MULTI_PROCESS_SCRIPT
(two processes); the others are parsed. README_COMMANDS=all runs every runnable line.
A line no table covers fails, naming the line and what to add.
"""
import argparse
import contextlib
import importlib
import io
import os
import re
import runpy
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from argparse import Namespace

import pytest
import torch

import checkpoints
import imagedata
import vision_transformer as vits
from conftest import REPO, script_env

READMES = [REPO / 'README.md', REPO / '..' / 'shared' / 'reference' / 'habana-dino-README.md']
SETUP_COMMANDS = ('git clone', 'cd ', 'pip install', 'python -m pip install', 'wget ', 'tar ', 'python -m pytest',
                  'python3 -m venv', '. ', 'tensorboard ')
# README path -> fixture path, relative to the fixture root (the values are built by the `fixtures` fixture)
PATHS = {
    '/data/pytorch/imagenet/ILSVRC2012/train': 'imagenet/train',
    '/data/pytorch/imagenet/ILSVRC2012/': 'imagenet',
    '/data/pytorch/imagenet/ILSVRC2012': 'imagenet',
    '/path/to/imagenet/train': 'imagenet/train',
    '/path/to/imagenet': 'imagenet',
    '/path/to/images': 'imagenet/train',
    '/data/imagenet/train': 'imagenet/train',
    '/data/photos': 'imagenet',  # a folder of images at any depth
    '/data/photos/train.txt': 'train.txt',  # a list file
    '/data/pytorch/copydays': 'copydays',  # original/ and strong/ only: the two archives Habana's README names
    '/data/pytorch/yfcc100m_20k': 'whitening',
    '/data/pytorch/yfcc100m_10k': 'distractors',
    '/data/pytorch/revisitop': 'revisitop',
    '/data/pytorch/davis-2017': 'davis-2017',
    'photo.jpg': 'photo.jpg',
    'boot.png': 'photo.jpg',
    'fashion-mnist': 'imagenet',  # the built-in source, offline here: the same layout of labelled train/ and val/
    'PATH_TO_SOURCE_IMAGE': 'photo.jpg',
    'video.mp4': 'video.mp4',
    'PATH_TO_SOURCE_VIDEO': 'video.mp4',
}
ARCH = {'vit_small': 'vit_tiny', 'vit_base': 'vit_tiny'}
# released DINO backbones the READMEs name, present in the working folder as vit_tiny stand-ins
RELEASED_FILES = {'dino_deitsmall16_pretrain.pth'}
APPEND = {
    'main_dino.py': ['--epochs', '1', '--data_limit', '16', '--batch_size_per_device', '8', '--global_crops_size',
                     '32', '--local_crops_size', '16', '--local_crops_number', '1', '--out_dim', '64',
                     '--num_workers', '0', '--warmup_epochs', '0', '--freeze_last_layer', '0'],
    'eval_knn.py': ['--num_workers', '0', '--batch_size_per_device', '8', '--nb_knn', '5', '--max_batches', '2'],
    'eval_linear.py': ['--num_workers', '0', '--epochs', '1', '--batch_size_per_device', '8'],
    'eval_copy_detection.py': ['--num_workers', '0', '--imsize', '64'],
    'eval_image_retrieval.py': ['--num_workers', '0'],
    'eval_video_segmentation.py': [],
    'visualize_attention.py': ['--image_size', '64'],
    'video_generation.py': [],
    'tools/export_backbone.py': [],
}
LOADS_WEIGHTS = set(APPEND) - {'main_dino.py'}
MULTI_PROCESS_SCRIPT = 'eval_image_retrieval.py'  # leaves its process group at the end
FRAGMENT_SCRIPT = 'main_dino.py'


def readme_lines():
    """(readme name, command) for every command of every ```bash block, continuation lines joined."""
    lines = []
    for readme in READMES:
        text = readme.read_text()
        for block in re.findall(r'```bash\n(.*?)```', text, flags=re.S):
            for command in block.replace('\\\n', ' ').splitlines():
                for part in command.split(' && '):
                    if part.strip():
                        lines.append((readme.name, ' '.join(part.split())))
    return lines


LINES = readme_lines()


def parse_line(line):
    """{'launcher': None|'torchrun'|'launch', 'launcher_args', 'script', 'args'}; None for setup commands.

    A line of flags alone (e.g. `--data_path /data/photos  # a folder`) shows FRAGMENT_SCRIPT's flags: it is parsed.
    """
    tokens = shlex.split(line.replace('$PYTHON', 'python'), comments=True)
    if line.replace('$PYTHON', 'python').startswith(SETUP_COMMANDS):
        return None
    if tokens[0].startswith('--'):
        return {'launcher': None, 'launcher_args': [], 'script': FRAGMENT_SCRIPT, 'args': tokens, 'fragment': True}
    if tokens[0] == 'torchrun':
        launcher, rest = 'torchrun', tokens[1:]
    elif tokens[:3] == ['python', '-m', 'torch.distributed.launch']:
        launcher, rest = 'launch', tokens[3:]
    elif tokens[:3] == ['python', '-m', 'torch.distributed.run']:
        launcher, rest = 'torchrun', tokens[3:]
    elif tokens[0] == 'python' and len(tokens) > 1 and tokens[1].endswith('.py'):
        launcher, rest = None, tokens[1:]
    else:
        pytest.fail(f"unknown command in a README: `{line}`; extend parse_line/SETUP_COMMANDS in {__file__}")
    position = next((i for i, t in enumerate(rest) if t.endswith('.py')), None)
    if position is None or rest[position] not in APPEND:
        pytest.fail(f"README line `{line}` runs no script this test knows; add it to APPEND in {__file__}")
    return {'launcher': launcher, 'launcher_args': rest[:position], 'script': rest[position],
            'args': rest[position + 1:]}


def launcher_namespace(command):
    """The launcher's own parser reads its arguments (e.g. --nproc_per_node, --max_restarts) as torchrun would."""
    import torch.distributed.run as run
    parser = run.get_args_parser()
    if command['launcher'] == 'launch':
        parser.add_argument('--use-env', '--use_env', action='store_true')
    return parser.parse_args(command['launcher_args'] + [command['script']])


def script_parser(script):
    module = importlib.import_module(script[:-3].replace('/', '.'))
    parser = module.get_args_parser()
    return parser if parser.add_help else argparse.ArgumentParser(parents=[parser])


def parse_with(parser, argv, line):
    """Parse as the script would; a rejected argument fails the test with the line and argparse's message."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            return parser.parse_args(argv)
        except SystemExit as stop:
            if stop.code == 0:  # --help
                return None
            pytest.fail(f"README line `{line}` does not parse: {err.getvalue().strip().splitlines()[-1]}")


def map_arguments(args, line, root):
    """The line's arguments with PATHS and ARCH applied; an absolute path no table knows fails the test."""
    mapped = []
    for i, arg in enumerate(args):
        if arg in PATHS:
            mapped.append(str(root / PATHS[arg]))
        elif i > 0 and args[i - 1] == '--arch':
            mapped.append(ARCH.get(arg, arg))
        elif arg.startswith('/'):
            pytest.fail(f"README line `{line}` names {arg}, which this test cannot lay out; add it to PATHS "
                        f"in {__file__}")
        else:
            mapped.append(arg)
    return mapped


def weights_stand_in(script, args, argv, root):
    """Flags giving a line that would download released weights a local stand-in of the same patch size, and
    --arch vit_tiny to a line using a stand-in (RELEASED_FILES, or that one) that names no --arch."""
    if script not in LOADS_WEIGHTS or args is None or getattr(args, 'load_features', None) or \
            getattr(args, 'video_only', False) or args.pretrained_weights not in RELEASED_FILES | {''}:
        return []
    extra = [] if args.pretrained_weights else ['--pretrained_weights',
                                                str(root / f'released_vit_tiny{args.patch_size}.pth')]
    return extra if '--arch' in argv else extra + ['--arch', 'vit_tiny']


# ---------------------------------------------------------------------------------------------
# Fixture data in the READMEs' layouts
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def fixtures(tmp_path_factory):
    """Data in the READMEs' layouts, stand-ins for the released weights, and the working folder in which
    the evaluation lines run: the checkpoint.pth of ./dino_vit_small, ./output_quickstart and ./output_fashion
    (training checkpoints, with their args), dino_deitsmall16_pretrain.pth, ./features and ./linear_vit_small
    written by earlier README lines."""
    from PIL import Image
    from test_retrieval import write_copydays, write_revisitop
    from test_video_attention import write_davis_video, write_test_video

    root = tmp_path_factory.mktemp('readme_data')
    shapes = imagedata.SyntheticShapes('train', length=40, image_size=32)
    for split, indices in (('train', range(32)), ('val', range(32, 40))):
        for i in indices:
            img, label = shapes[i]
            folder = root / 'imagenet' / split / f'class{label % 2}'
            folder.mkdir(parents=True, exist_ok=True)
            img.save(folder / f'{i:03d}.png')
    write_copydays(root, whitening_images=8)
    for partial in ('jpegqual', 'crops'):
        shutil.rmtree(root / 'copydays' / partial)
    for dataset in ('roxford5k', 'rparis6k'):
        write_revisitop(root / 'revisitop', dataset)
    write_davis_video(root / 'davis-2017', 'disks', n_frames=3)
    (root / 'train.txt').write_text(''.join(f'{p}\n' for p in sorted((root / 'imagenet' / 'train').rglob('*.png'))))
    Image.open(root / 'imagenet' / 'train' / 'class0' / os.listdir(root / 'imagenet' / 'train' / 'class0')[0]) \
        .resize((48, 40)).save(root / 'photo.jpg')
    write_test_video(root / 'video.mp4', n_frames=3, size=(48, 32))

    torch.manual_seed(0)
    for patch_size in (16, 8):
        torch.save(vits.vit_tiny(patch_size=patch_size).state_dict(), root / f'released_vit_tiny{patch_size}.pth')
    work = root / 'work'
    (work / 'dino_vit_small').mkdir(parents=True)
    for name in RELEASED_FILES:
        shutil.copy(root / f"released_vit_tiny{re.search(r'(8|16)_pretrain', name).group(1)}.pth", work / name)
    backbone = {f'backbone.{k}': v for k, v in vits.vit_tiny(patch_size=16).state_dict().items()}
    torch.save({'teacher': backbone, 'student': backbone, 'epoch': 1,
                'args': Namespace(arch='vit_tiny', patch_size=16)}, work / 'dino_vit_small' / 'checkpoint.pth')
    (work / 'output_quickstart').mkdir()  # what the quick start's training writes
    torch.save({'teacher': backbone, 'student': backbone, 'epoch': 3,
                'args': Namespace(arch='vit_tiny', patch_size=16, global_crops_size=64)},
               work / 'output_quickstart' / 'checkpoint.pth')
    (work / 'output_fashion').mkdir()  # what the next step's training writes
    fashion = {f'backbone.{k}': v for k, v in vits.vit_tiny(patch_size=8).state_dict().items()}
    torch.save({'teacher': fashion, 'student': fashion, 'epoch': 7,
                'args': Namespace(arch='vit_tiny', patch_size=8, global_crops_size=32)},
               work / 'output_fashion' / 'checkpoint.pth')
    (work / 'features').mkdir()
    for name, tensor in zip(('trainfeat.pth', 'testfeat.pth', 'trainlabels.pth', 'testlabels.pth'),
                            (torch.nn.functional.normalize(torch.randn(200, 8), dim=1),
                             torch.nn.functional.normalize(torch.randn(10, 8), dim=1),
                             torch.arange(200) % 2, torch.arange(10) % 2)):
        torch.save(tensor, work / 'features' / name)
    (work / 'linear_vit_small').mkdir()
    head = torch.nn.Linear(4 * 192, 1000)
    torch.save({'state_dict': {f'module.linear.{k}': v for k, v in head.state_dict().items()}},
               work / 'linear_vit_small' / 'checkpoint.pth.tar')
    return root


def free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def run_in_process(script, argv, cwd, line):
    """The script as `python script argv` would run it, in this process (saves starting Python and torch)."""
    old_argv, old_cwd, out = sys.argv, os.getcwd(), io.StringIO()
    handlers = {signum: signal.getsignal(signum) for signum in checkpoints.StopSignal.SIGNALS}  # training sets its own
    sys.argv = [str(REPO / script), *argv]
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(str(REPO / script), run_name='__main__')
    except SystemExit as stop:
        if stop.code not in (None, 0):
            pytest.fail(f"README line `{line}` failed: {stop.code}\n{out.getvalue()[-2000:]}")
    finally:
        sys.argv = old_argv
        os.chdir(old_cwd)
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    return out.getvalue()


def run_launched(command, argv, cwd, line):
    """The launcher line with 2 processes on a free port (gloo on CPU)."""
    launcher = ['-m', 'torch.distributed.run'] if command['launcher'] == 'torchrun' else \
        ['-m', 'torch.distributed.launch']
    given = command['launcher_args']
    nproc = [i for i, a in enumerate(given) if re.match(r'--nproc[_-]per[_-]node', a)]
    dropped = {i + 1 for i in nproc if '=' not in given[i]} | set(nproc)
    launcher_args = [a for i, a in enumerate(given) if i not in dropped]
    cmd = [sys.executable, *launcher, *launcher_args, '--nproc_per_node', '2', '--master_port', str(free_port()),
           str(REPO / command['script']), *argv]
    proc = subprocess.run(cmd, cwd=cwd, env=script_env({'OMP_NUM_THREADS': '1'}), capture_output=True, text=True,
                          timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"README line `{line}` failed with 2 processes:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return proc.stdout


def plan():
    """For each line, 'setup', 'parse' or 'run' (the first runnable line of each script, see the module doc)."""
    run_all = os.environ.get('README_COMMANDS') == 'all'
    seen, decisions = set(), []
    for readme, line in LINES:
        command = parse_line(line)
        if command is None:
            decisions.append('setup')
            continue
        hardware = re.search(r'--device[ =](hpu|cuda)', line)
        absent = hardware and (hardware.group(1) == 'hpu' or not torch.cuda.is_available())
        # one process: the first line of each script in each README; launched: the first of MULTI_PROCESS_SCRIPT
        kind = (command['script'], readme) if not command['launcher'] else command['script']
        wanted = not command['launcher'] or command['script'] == MULTI_PROCESS_SCRIPT
        if absent or '--help' in command['args'] or command.get('fragment') or \
                not (run_all or wanted and kind not in seen):
            decisions.append('parse')
        else:
            seen.add(kind)
            decisions.append('run')
    return decisions


PLAN = plan()


def test_every_script_runs_at_least_once():
    ran = {parse_line(line)['script'] for (_, line), what in zip(LINES, PLAN) if what == 'run'}
    assert set(APPEND) <= ran, f"no runnable README line for {sorted(set(APPEND) - ran)}"
    assert any(what == 'run' and parse_line(line)['launcher'] for (_, line), what in zip(LINES, PLAN))


@pytest.mark.parametrize('readme, line, what', [(r, l, w) for (r, l), w in zip(LINES, PLAN)],
                         ids=[f'{r}:{i}' for i, (r, _) in enumerate(LINES)])
def test_readme_line(readme, line, what, fixtures, tmp_path):
    if what == 'setup':
        return
    command = parse_line(line)
    if command['launcher']:
        assert launcher_namespace(command).nproc_per_node
    argv = map_arguments(command['args'], line, fixtures)
    parser = script_parser(command['script'])
    args = parse_with(parser, argv, line)
    if what == 'parse':
        return
    argv = argv + weights_stand_in(command['script'], args, argv, fixtures) + APPEND[command['script']]
    parse_with(parser, argv, line)
    # training writes to its own fresh folder; evaluations run where the earlier lines' outputs are
    cwd = tmp_path if command['script'] == 'main_dino.py' else fixtures / 'work'
    if command['launcher']:
        run_launched(command, argv, cwd, line)
    else:
        run_in_process(command['script'], argv, cwd, line)


def test_ci_runs_the_readme_test_command():
    """.ci/run installs and tests exactly as README.md's test command does (e.g. timm next to pytest)."""
    readme = [line for block in re.findall(r'```bash\n(.*?)```', (REPO / 'README.md').read_text(), flags=re.S)
              for line in block.splitlines() if 'python -m pytest' in line]
    ci = [line for line in (REPO / '.ci' / 'run').read_text().splitlines() if 'python -m pytest' in line]
    assert len(readme) == 1 and ci == readme


def test_a_line_no_table_covers_fails_naming_it(tmp_path):
    with pytest.raises(pytest.fail.Exception, match=r'unknown command in a README: `bash tools/gpu_check.sh`'):
        parse_line('bash tools/gpu_check.sh')
    with pytest.raises(pytest.fail.Exception, match=r'runs no script this test knows; add it to APPEND'):
        parse_line('python new_script.py --data_path /data/x')
    with pytest.raises(pytest.fail.Exception, match=r'names /data/pytorch/lists/train.txt, .* add it to PATHS'):
        map_arguments(['--data_path', '/data/pytorch/lists/train.txt'], 'python main_dino.py ...', tmp_path)
