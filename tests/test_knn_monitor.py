"""Seeing a run learn: the k-NN monitor of training (--knn_every), the random baseline of the evaluations
(--random_weights), Fashion-MNIST as a built-in labelled source, and collapse advice that names values."""
import argparse
import gzip
import json
import math
import re

import numpy as np
import pytest
import torch

import eval_knn
import eval_linear
import evaluation
import imagedata
import main_dino
import utils
from conftest import TINY_TRAIN_ARGS, run_script, run_torchrun

MONITOR_ARGS = [*TINY_TRAIN_ARGS, '--global_crops_size', '32', '--local_crops_size', '16', '--out_dim', '256',
                '--data_limit', '64', '--knn_every', '1']
KNN_LINE = re.compile(r'20-NN classifier result: Top1: ([\d.]+)')


def monitor_log(folder):
    """[(epochs trained, top-1)] of the monitor's log.txt lines."""
    entries = [json.loads(line) for line in (folder / 'log.txt').read_text().splitlines()]
    return [(e['knn_epochs_trained'], e['knn_top1']) for e in entries if 'knn_top1' in e]


@pytest.fixture(scope='module')
def labelled_folder(tmp_path_factory):
    """train/ (40) and val/ (20) ImageFolders of the synthetic shapes' 10 classes, 32 pixels."""
    root = tmp_path_factory.mktemp('labelled')
    for split, count in (('train', 40), ('val', 20)):
        shapes = imagedata.SyntheticShapes(split, image_size=32)
        for i in range(count):
            image, label = shapes[i]
            folder = root / split / f'class{label}'
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f'{i:04d}.png')
    return root


def test_monitor_logs_the_random_baseline_then_each_epoch_and_the_baseline_is_eval_knns_random_backbone(
        tmp_path, labelled_folder):
    """The baseline must be what eval_knn.py --random_weights gives for the same seed, at the same size
    (32-pixel crops), on the same images."""
    out = tmp_path / 'run'
    proc = run_script('main_dino.py', *MONITOR_ARGS, '--batch_size_per_device', '16', '--epochs', '1',
                      '--seed', '3', '--knn_data', labelled_folder, '--output_dir', out, timeout=300)
    log = monitor_log(out)
    assert [epochs for epochs, _ in log] == [0, 1]
    lines = [line for line in proc.stdout.splitlines() if line.startswith('k-NN monitor: 20-NN top-1')]
    assert len(lines) == 2 and 'at the random initialisation (the baseline)' in lines[0]
    assert f'after 1/1 epochs (random initialisation {log[0][1]:.1f}%' in lines[1] and '% of an epoch' in lines[1]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out)).Reload()
    assert [(e.step, pytest.approx(e.value)) for e in events.Scalars('knn/20nn_top1')] == log

    knn = run_script('eval_knn.py', '--random_weights', '--seed', '3', '--arch', 'vit_tiny', '--patch_size', '16',
                     '--data_path', labelled_folder, '--crop_size', '32', '--nb_knn', '20', '--device', 'cpu',
                     '--num_workers', '0')
    assert float(KNN_LINE.search(knn.stdout).group(1)) == pytest.approx(log[0][1], abs=1e-9)


def test_two_processes_log_the_figures_of_one(tmp_path):
    common = [*MONITOR_ARGS, '--epochs', '2', '--knn_limit', '100']
    run_script('main_dino.py', *common, '--batch_size_per_device', '16', '--output_dir', tmp_path / 'one')
    two = run_torchrun('main_dino.py', 2, *common, '--batch_size_per_device', '8', '--output_dir', tmp_path / 'two')
    assert two.stdout.count('k-NN monitor: 20-NN top-1') == 3  # the main process alone prints and logs
    one_log, two_log = monitor_log(tmp_path / 'one'), monitor_log(tmp_path / 'two')
    assert [epochs for epochs, _ in one_log] == [0, 1, 2]
    assert two_log == one_log


def test_monitor_flags_are_checked():
    parse = main_dino.get_args_parser().parse_args
    args = parse(['--data_path', 'synthetic', '--knn_every', '2'])
    main_dino.check_args(args)
    assert args.knn_data == 'synthetic'  # a built-in source brings its labels
    for flags, message in [(['--data_path', '/tmp', '--knn_every', '1'], '--knn_every needs labelled images'),
                           (['--data_path', 'synthetic', '--knn_every', '1', '--knn_limit', '5'], '--knn_limit'),
                           (['--data_path', 'synthetic', '--knn_every', '-1'], '--knn_every')]:
        with pytest.raises(SystemExit, match=f'error: .*{message}'):
            main_dino.check_args(parse(flags))


@pytest.mark.parametrize('arch, patch_size', [('vit_tiny', 16), ('vit_tiny', 8)])
def test_random_weights_are_a_fresh_backbone_of_the_seed_and_mains_first_teacher(arch, patch_size):
    args = argparse.Namespace(arch=arch, patch_size=patch_size, random_weights=True, seed=5)
    with torch.random.fork_rng():
        model, embed_dim = utils.build_evaluated_backbone(args)
        torch.manual_seed(5)
        fresh, _ = utils.build_backbone(arch, patch_size)
        train_args = main_dino.get_args_parser().parse_args(['--arch', arch, '--patch_size', str(patch_size),
                                                             '--out_dim', '64', '--seed', '5', '--device', 'cpu'])
        train_args.distributed, train_args.compile = False, False
        utils.fix_random_seeds(5)
        _, _, teacher = main_dino.build_student_teacher(train_args, torch.device('cpu'))
        other, _ = utils.build_evaluated_backbone(argparse.Namespace(**{**vars(args), 'seed': 6}))
    state, teacher_state = model.state_dict(), teacher.backbone.state_dict()
    assert embed_dim == 192 and state.keys() == fresh.state_dict().keys() == teacher_state.keys()
    for name, value in state.items():
        assert torch.equal(value, fresh.state_dict()[name]) and torch.equal(value, teacher_state[name]), name
    assert not torch.equal(state['blocks.0.attn.qkv.weight'], other.state_dict()['blocks.0.attn.qkv.weight'])


@pytest.mark.parametrize('script', [eval_knn, eval_linear])
def test_random_weights_and_pretrained_weights_exclude_each_other(script, tmp_path):
    weights = tmp_path / 'w.pth'
    weights.write_bytes(b'')
    with pytest.raises(SystemExit, match='error: --random_weights .*--pretrained_weights'):
        script.main(['--random_weights', '--pretrained_weights', str(weights), '--data_path', 'synthetic',
                     '--device', 'cpu', '--output_dir', str(tmp_path)] if script is eval_linear else
                    ['--random_weights', '--pretrained_weights', str(weights), '--data_path', 'synthetic',
                     '--device', 'cpu'])


# ----------------------------------------------------------------------------------------
# Fashion-MNIST
# ----------------------------------------------------------------------------------------

def write_idx(folder, prefix, images, labels):
    with gzip.open(folder / f'{prefix}-images-idx3-ubyte.gz', 'wb') as f:
        f.write(bytes(16) + images.astype(np.uint8).tobytes())
    (folder / f'{prefix}-labels-idx1-ubyte').write_bytes(bytes(8) + labels.astype(np.uint8).tobytes())


def test_fashion_mnist_from_a_folder_of_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (5, 28, 28)), np.array([3, 1, 4, 1, 5])
    write_idx(tmp_path, 'train', images, labels)  # gzipped images, raw labels: both kinds are read
    write_idx(tmp_path, 't10k', images[:2], labels[:2])
    assert imagedata.is_fashion_mnist(tmp_path) and imagedata.is_builtin('fashion-mnist')
    train = evaluation.build_eval_split(tmp_path, 'train')
    val = evaluation.build_eval_split(tmp_path, 'val')
    assert len(train) == 5 and len(val) == 2 and train.classes[3] == 'Dress'
    image, label = train[2]
    assert label == 4 and image.mode == 'RGB' and image.size == (28, 28)
    assert np.array_equal(np.asarray(image)[..., 0], images[2]) and np.array_equal(np.asarray(image)[..., 2], images[2])
    assert evaluation.eval_crop_size(tmp_path) == 32 and evaluation.eval_resize(tmp_path, 32) == 32


def test_fashion_mnist_offline_and_not_installed_is_one_line(tmp_path, monkeypatch):
    from torchvision import datasets

    def offline(*args, **kwargs):
        raise RuntimeError('Error downloading train-images-idx3-ubyte.gz')
    monkeypatch.setattr(imagedata, 'DEBIAN_FASHION_MNIST', str(tmp_path / 'none'))
    monkeypatch.setattr(datasets, 'FashionMNIST', offline)
    with pytest.raises(SystemExit, match='error: --data_path fashion-mnist: not installed and cannot be downloaded '
                                         r'.*apt-get install dataset-fashion-mnist'):
        imagedata.find_fashion_mnist('fashion-mnist', download_root=str(tmp_path / 'cache'))


# ----------------------------------------------------------------------------------------
# Collapse advice
# ----------------------------------------------------------------------------------------

def watch_args(**flags):
    args = main_dino.get_args_parser().parse_args(['--data_path', 'synthetic', '--warmup_epochs', '0',
                                                   '--collapse_window', '3'])
    vars(args).update(flags)
    return args


def collapse_warnings(watch, capsys, entropy, kl, epoch=1):
    for _ in range(3):
        watch.update(epoch, entropy, kl, 0.5)
    return [line for line in capsys.readouterr().out.splitlines() if 'Warning: collapse' in line]


def test_collapse_advice_names_the_next_values_both_ways(capsys):
    args = watch_args(out_dim=65536, teacher_temp=0.04, warmup_teacher_temp=0.04, lr=0.0005)
    watch = main_dino.CollapseWatch(args)
    [uniform] = collapse_warnings(watch, capsys, 0.99 * math.log(65536), 0.1)
    assert '--teacher_temp 0.03 --warmup_teacher_temp 0.03' in uniform and '--out_dim 16384' in uniform
    # the opposite collapse later in the same run warns again, with values that do not undo the first advice
    [dominant] = collapse_warnings(watch, capsys, 0.01, 0.01)
    assert 'one output dimension dominates' in dominant
    assert '--teacher_temp 0.05 --warmup_teacher_temp 0.04' in dominant and '--lr 0.00025' in dominant
    assert collapse_warnings(watch, capsys, 0.01, 0.01) == []  # once per mode

    # following the uniform advice, then meeting the dominant collapse: the next temperature lies between the two
    followed = main_dino.CollapseWatch(watch_args(out_dim=16384, teacher_temp=0.03, warmup_teacher_temp=0.03))
    [dominant] = collapse_warnings(followed, capsys, 0.01, 0.01)
    assert '--teacher_temp 0.0375' in dominant


def test_not_learning_advice_names_values_computed_from_the_run():
    args = argparse.Namespace(momentum_teacher=0.996, warmup_epochs=10, epochs=10, out_dim=65536)
    advice = evaluation.not_learning_advice(args, steps=310)
    assert '--momentum_teacher 0.968 (the teacher\'s horizon of 250 steps is long against this run\'s 310)' in advice
    assert '--warmup_epochs 1' in advice and '--out_dim 4096' in advice and '--epochs 20' in advice
    args = argparse.Namespace(momentum_teacher=0.9, warmup_epochs=1, epochs=10, out_dim=1024)
    assert evaluation.not_learning_advice(args, steps=310) == 'more iterations (--epochs 20, or more images)'


def test_not_learning_warning_waits_for_three_quarters_of_the_run_and_spares_a_horizon_near_a_tenth(capsys):
    """The README's recipe (6 epochs of 156 iterations, momentum 0.99) is below its baseline until epoch 4 of 6, then
    above: no warning; a run still below after 5 of 6 epochs is warned once, without a momentum it already has."""
    args = argparse.Namespace(momentum_teacher=0.99, warmup_epochs=1, epochs=6, out_dim=1024)
    monitor = argparse.Namespace(args=args, baseline=53.7, warned=False, steps=936,
                                 WARN_AFTER=evaluation.KnnMonitor.WARN_AFTER)
    for epochs, top1 in [(1, 52.2), (2, 51.5), (3, 52.9), (4, 54.0)]:
        evaluation.KnnMonitor.warn_if_not_learning(monitor, top1, epochs)
    assert capsys.readouterr().out == ''
    for epochs, top1 in [(4, 53.0), (5, 53.1), (6, 53.2)]:
        evaluation.KnnMonitor.warn_if_not_learning(monitor, top1, epochs)
    [warning] = capsys.readouterr().out.splitlines()
    assert warning.startswith('Warning: after 5 of 6 epochs') and warning.endswith(
        "Try more iterations (--epochs 12, or more images). See README, 'My loss does not decrease'.")
