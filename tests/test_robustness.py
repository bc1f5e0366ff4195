"""Training that survives kills and preemption, checkpoints that cannot be half-written or run code,
bad training images, and a distributed job that loses a process."""
import argparse
import io
import json
import math
import os
import pickle
import random
import signal
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoints
import imagedata
import main_dino
import utils
import vision_transformer as vits
from conftest import REPO, TINY_TRAIN_ARGS, run_script, run_torchrun, script_env, signal_when_waiting

# 3 epochs of 4 iterations. One thread: every run must do the very same float arithmetic.
RUN_ARGS = [*TINY_TRAIN_ARGS, '--global_crops_size', '32', '--local_crops_size', '16',
            '--batch_size_per_device', '8', '--data_limit', '32', '--epochs', '3']
ONE_THREAD = {'OMP_NUM_THREADS': '1'}


def train(out, *extra, fault=None, check=True, timeout=300):
    env = dict(ONE_THREAD, DINO_FAULT=fault or '')
    return run_script('main_dino.py', *RUN_ARGS, '--output_dir', out, *extra, env=env, check=check, timeout=timeout)


def killed(proc):
    return proc.returncode == -signal.SIGKILL


@pytest.fixture(scope='module')
def reference(tmp_path_factory):
    """An uninterrupted run (with --num_workers 0)."""
    out = tmp_path_factory.mktemp('reference')
    train(out)
    return out


def assert_same_run(out, ref, epochs=3):
    """log.txt identical line for line, and the final weights, optimizer and centre bit for bit."""
    assert (out / 'log.txt').read_text() == (ref / 'log.txt').read_text()
    assert [json.loads(line)['epoch'] for line in (out / 'log.txt').read_text().splitlines()] == list(range(epochs))
    load = utils.load_checkpoint_or_exit
    got, want = load(out / 'checkpoint.pth'), load(ref / 'checkpoint.pth')
    for key in ('student', 'teacher', 'dino_loss'):
        assert got[key].keys() == want[key].keys()
        for name in want[key]:
            assert torch.equal(got[key][name], want[key][name]), f'{key}.{name} differs'
    for index, state in want['optimizer']['state'].items():
        assert all(torch.equal(got['optimizer']['state'][index][k], v) for k, v in state.items())
    assert not list(out.glob('*.tmp*')), 'an interrupted write was left behind'


# ----------------------------------------------------------------------------- exact resume

def test_sigkill_in_a_checkpoint_write_damaged_checkpoint_and_sigkill_mid_epoch_then_restart_is_exact(
        reference, tmp_path):
    # saves: checkpoint0000 (1) and checkpoint.pth (2) after epoch 0, checkpoint.pth (3) after epoch 1
    proc = train(tmp_path, '--num_workers', '0', fault='save:3:kill', check=False)
    assert killed(proc)
    assert list(tmp_path.glob('checkpoint.pth.tmp*')), 'the kill did not come between write and rename'
    assert utils.load_checkpoint_or_exit(tmp_path / 'checkpoint.pth')['epoch'] == 1  # the previous one, intact
    assert len((tmp_path / 'log.txt').read_text().splitlines()) == 2  # epoch 1 was logged before the kill

    # now damage it: cut at half its length, and a newer numbered checkpoint that is empty
    data = (tmp_path / 'checkpoint.pth').read_bytes()
    (tmp_path / 'checkpoint.pth').write_bytes(data[:len(data) // 2])
    (tmp_path / 'checkpoint0001.pth').write_bytes(b'')
    proc = train(tmp_path, '--num_workers', '0', fault='step:3:kill', check=False)  # iteration 2 of epoch 1
    assert killed(proc)
    damaged = [line for line in proc.stdout.splitlines() if 'checkpoint.pth is damaged' in line]
    assert len(damaged) == 1 and damaged[0].startswith('warning: ')
    assert f"Resuming from {tmp_path / 'checkpoint0000.pth'} instead" in proc.stdout

    train(tmp_path, '--num_workers', '0')  # falls back to checkpoint0000.pth again, then trains to the end
    assert_same_run(tmp_path, reference)


def test_sigterm_mid_epoch_with_workers_then_restart_is_exact(reference, tmp_path):
    """SIGTERM to the whole process group, as SLURM sends it (DataLoader workers included).

    The run waits after its 6th iteration (the 2nd of epoch 1) until the signal arrives: the stop point
    does not depend on how fast the machine is.
    """
    cmd = [sys.executable, str(REPO / 'main_dino.py'), *RUN_ARGS, '--num_workers', '2', '--output_dir', tmp_path]
    env = script_env({**ONE_THREAD, 'PYTHONUNBUFFERED': '1', 'DINO_FAULT': 'step:6:wait'})
    output = signal_when_waiting(cmd, env, 'DINO_FAULT: wait at step 6',
                                 lambda proc, line: os.killpg(proc.pid, signal.SIGTERM))
    assert 'Stopped by SIGTERM at epoch 1, iteration 2' in output, output[-3000:]
    checkpoint = utils.load_checkpoint_or_exit(tmp_path / 'checkpoint.pth')
    assert checkpoint['epoch'] == 1 and checkpoint['step'] == 2  # mid-epoch
    assert len((tmp_path / 'log.txt').read_text().splitlines()) == 1

    proc = train(tmp_path, '--num_workers', '2')
    assert "Resuming epoch 1 at iteration 2/4" in proc.stdout
    assert_same_run(tmp_path, reference)


def test_log_is_trimmed_to_the_checkpoint(tmp_path):
    """Training's lines of epochs from the checkpoint's on go, and the cut last one; a linear evaluation's stay."""
    log = tmp_path / 'log.txt'
    log.write_text('{"train_wd": 0.04, "epoch": 0}\n{"train_lr": 0.1, "epoch": 1}\n{"train_wd": 0.05, "epoch": 1}\n'
                   '{"train_wd": 0.06, "ep')
    main_dino.trim_log(log, 1)
    assert log.read_text() == '{"train_wd": 0.04, "epoch": 0}\n{"train_lr": 0.1, "epoch": 1}\n'


def test_random_states_round_trip_through_a_checkpoint(tmp_path):
    utils.fix_random_seeds(3)
    state = checkpoints.rng_state()
    expected = (np.random.rand(), torch.rand(2), random.random())
    checkpoints.save_checkpoint({'rng_state': state}, tmp_path / 'c.pth')
    np.random.rand(5), torch.rand(5)
    checkpoints.set_rng_state(utils.load_checkpoint_or_exit(tmp_path / 'c.pth')['rng_state'])
    got = (np.random.rand(), torch.rand(2), random.random())
    assert got[0] == expected[0] and torch.equal(got[1], expected[1]) and got[2] == expected[2]


def test_augmentations_depend_on_seed_epoch_and_index_only():
    dataset = imagedata.SyntheticShapes('train', length=6, image_size=48,
                                        transform=main_dino.DataAugmentationDINO((0.4, 1), (0.05, 0.4), 2, 32, 16))
    samples = imagedata.ReproducibleSamples(dataset, seed=0)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = samples[(1, 4)][0]
    assert torch.equal(torch.get_rng_state(), before)  # the caller's random states are untouched
    torch.rand(7)
    again, other_epoch = samples[(1, 4)][0], samples[(2, 4)][0]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], other_epoch[0])


def test_resumable_sampler_skips_the_done_part_of_the_epoch():
    sampler = imagedata.ResumableSampler(list(range(10)), num_replicas=2, rank=1, shuffle=True, seed=0)
    sampler.set_epoch(3)
    full = list(sampler)
    sampler.set_epoch(3, start=2)
    assert list(sampler) == full[2:] and len(sampler) == 3 and all(epoch == 3 for epoch, _ in full)


# ----------------------------------------------------------------------------- damaged and unsafe checkpoints

class MakesMarker:
    """Unpickling this creates a file: stands for any code a crafted checkpoint could run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, 'w')


def write_malicious(path, marker, fmt):
    payload = {'student': MakesMarker(marker), 'teacher': {}, 'epoch': 1}
    if fmt == 'zip':
        torch.save(payload, path)
    elif fmt == 'legacy':
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    else:
        with open(path, 'wb') as f:
            pickle.dump(payload, f, protocol=int(fmt[-1]))


@pytest.mark.parametrize('fmt', ['zip', 'legacy', 'pickle2', 'pickle4'])
def test_malicious_pickle_is_refused_by_every_loading_path(tmp_path, fmt):
    marker = tmp_path / 'marker'
    path = tmp_path / 'checkpoint.pth'
    write_malicious(path, marker, fmt)
    with pytest.raises(SystemExit) as load:
        utils.load_checkpoint_or_exit(path)
    with pytest.raises(SystemExit) as pretrained:
        utils.load_pretrained_weights(torch.nn.Linear(1, 1), str(path), 'teacher', 'vit_tiny', 16)
    with pytest.raises(SystemExit) as resume:
        checkpoints.restart_from_checkpoint(str(path), run_variables={'epoch': 0}, student=torch.nn.Linear(1, 1))
    for exc in (load, pretrained, resume):
        message = str(exc.value)
        assert message.startswith('error: ') and '\n' not in message
        assert ('refusing to load' in message) if fmt != 'pickle4' else ('not a PyTorch checkpoint' in message)
    assert not marker.exists()
    assert path.exists()  # left for the user to inspect


def test_released_checkpoint_formats_still_load(tmp_path):
    """Plain backbone state dicts, and full checkpoints whose optimizer holds NumPy numbers, as DINO wrote."""
    torch.manual_seed(0)
    source, target = vits.vit_tiny(patch_size=16), vits.vit_tiny(patch_size=16)
    torch.save(source.state_dict(), tmp_path / 'backbone.pth')
    full = {'teacher': {f'module.backbone.{k}': v for k, v in source.state_dict().items()}, 'epoch': 100,
            'optimizer': {'param_groups': [{'lr': np.float64(1e-4), 'weight_decay': np.float64(0.4)}]},
            'args': argparse.Namespace(arch='vit_small', global_crops_scale=(0.4, 1.0))}
    torch.save(full, tmp_path / 'full.pth')
    for name in ('backbone.pth', 'full.pth'):
        target.load_state_dict({k: torch.zeros_like(v) for k, v in target.state_dict().items()})
        msg = utils.load_pretrained_weights(target, str(tmp_path / name), 'teacher', 'vit_tiny', 16)
        assert not msg.missing_keys
        assert all(torch.equal(v, target.state_dict()[k]) for k, v in source.state_dict().items())
    loaded = utils.load_checkpoint_or_exit(tmp_path / 'full.pth')
    assert loaded['optimizer']['param_groups'][0]['lr'] == 1e-4 and loaded['args'].global_crops_scale == (0.4, 1.0)


def test_truncated_checkpoint_without_fallback_stops_and_keeps_files(tmp_path):
    path = tmp_path / 'checkpoint.pth'
    checkpoints.save_checkpoint({'epoch': 3, 'student': torch.nn.Linear(4, 4).state_dict()}, path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(SystemExit) as exc:
        checkpoints.restart_from_checkpoint(str(path), run_variables={'epoch': 0})
    message = str(exc.value)
    assert 'is damaged' in message and 'no intact numbered checkpoint' in message and '\n' not in message
    assert path.read_bytes() == data[:len(data) // 2]


def test_fallback_refuses_an_unsafe_numbered_checkpoint(tmp_path):
    marker = tmp_path / 'marker'
    checkpoints.save_checkpoint({'epoch': 1}, tmp_path / 'checkpoint0000.pth')
    write_malicious(tmp_path / 'checkpoint0002.pth', marker, 'zip')
    (tmp_path / 'checkpoint.pth').write_bytes(b'PK\x03\x04 cut short')
    with pytest.raises(SystemExit) as exc:
        checkpoints.restart_from_checkpoint(str(tmp_path / 'checkpoint.pth'), run_variables={'epoch': 0})
    assert str(exc.value).startswith(f"error: refusing to load {tmp_path / 'checkpoint0002.pth'}")
    assert not marker.exists()


# ----------------------------------------------------------------------------- bad training images

def save(img, path, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **kwargs)


def noise_image(rng, size=(40, 40)):
    return Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8))


def make_bad_image_folder(root):
    """24 images: 15 plain JPEGs, 6 convertible ones and 3 unreadable ones; returns the unreadable paths."""
    rng = np.random.default_rng(0)
    for i in range(15):
        save(noise_image(rng), root / f'class{i % 2}' / f'plain{i}.jpg')
    rgba = np.dstack([rng.integers(0, 256, (40, 40, 3)), np.tile(np.arange(40) * 6, (40, 1))]).astype(np.uint8)
    save(Image.fromarray(rgba, 'RGBA'), root / 'class0' / 'alpha.png')
    save(Image.fromarray(rgba[..., [0, 3]], 'LA'), root / 'class0' / 'grey_alpha.png')
    save(noise_image(rng).convert('P', palette=Image.ADAPTIVE), root / 'class1' / 'palette.png', transparency=0)
    save(Image.fromarray((rng.integers(0, 65536, (40, 40))).astype(np.uint16)), root / 'class1' / 'grey16.png')
    save(noise_image(rng).convert('CMYK'), root / 'class0' / 'cmyk.jpg')
    save(noise_image(rng, (3, 2)), root / 'class1' / 'tiny.png')
    buffer = io.BytesIO()
    noise_image(rng).save(buffer, format='JPEG')
    bad = [root / 'class0' / 'truncated.jpg', root / 'class1' / 'empty.jpg', root / 'class1' / 'garbage.png']
    bad[0].write_bytes(buffer.getvalue()[:len(buffer.getvalue()) // 2])
    bad[1].write_bytes(b'')
    bad[2].write_bytes(rng.integers(0, 256, 300, dtype=np.uint8).tobytes())
    return bad


def test_convertible_images_become_rgb_with_the_right_pixels(tmp_path):
    def load(img, name, **kwargs):
        save(img, tmp_path / name, **kwargs)
        return imagedata.pil_loader(tmp_path / name)

    rgba = Image.new('RGBA', (2, 1))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    rgba.putpixel((1, 0), (0, 0, 255, 0))  # fully transparent: white, not the hidden blue
    assert np.asarray(load(rgba, 'a.png')).tolist() == [[[0, 0, 255], [255, 255, 255]]]
    half = Image.new('LA', (1, 1), (0, 128))  # black at alpha 128/255 over white: 255 * 127/255
    assert load(half, 'la.png').getpixel((0, 0)) == (127, 127, 127)
    grey16 = Image.fromarray(np.array([[65535, 257 * 100, 0]], dtype=np.uint16))
    assert np.asarray(load(grey16, 'g16.png')).tolist() == [[[255] * 3, [100] * 3, [0] * 3]]  # PIL alone clips
    palette = Image.new('P', (1, 1), 0)
    palette.putpalette([10, 20, 30] * 256)
    assert load(palette, 'p.png', transparency=0).getpixel((0, 0)) == (255, 255, 255)
    assert load(palette, 'p2.png').getpixel((0, 0)) == (10, 20, 30)
    cmyk = load(Image.new('CMYK', (4, 4), (0, 255, 0, 0)), 'c.jpg')
    assert cmyk.mode == 'RGB' and cmyk.getpixel((0, 0))[1] < 30 and min(cmyk.getpixel((0, 0))[::2]) > 220


def test_tiny_image_gives_full_size_crops(tmp_path):
    transform = main_dino.DataAugmentationDINO((0.4, 1), (0.05, 0.4), 2, 32, 16)
    save(noise_image(np.random.default_rng(0), (3, 2)), tmp_path / 't.png')
    crops = transform(imagedata.pil_loader(tmp_path / 't.png'))
    assert [tuple(c.shape) for c in crops] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 2
    assert all(torch.isfinite(c).all() for c in crops)


def test_bad_images_are_skipped_warned_once_and_counted(tmp_path):
    bad = make_bad_image_folder(tmp_path / 'data')
    out = tmp_path / 'out'
    args = ['--data_path', tmp_path / 'data', '--data_limit', '1000', '--epochs', '2', '--num_workers', '2']
    proc = train(out, *args)
    warnings = [line for line in proc.stdout.splitlines() if line.startswith('warning: cannot read image')]
    assert sorted(w.split('cannot read image ')[1].split(':')[0] for w in warnings) == sorted(map(str, bad))
    for epoch in (0, 1):
        assert f'Epoch {epoch}: 3 unreadable image(s) skipped' in proc.stdout
    assert [json.loads(line)['epoch'] for line in (out / 'log.txt').read_text().splitlines()] == [0, 1]
    assert all(math.isfinite(json.loads(line)['train_loss']) for line in (out / 'log.txt').read_text().splitlines())

    proc = train(tmp_path / 'strict', *args, '--strict_data', check=False)
    assert proc.returncode == 1 and 'Traceback' not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith('error: cannot read image ') and any(str(path) in last for path in bad)
    assert not (tmp_path / 'strict' / 'checkpoint.pth').exists()


# ----------------------------------------------------------------------------- distributed failure

def test_a_hanging_process_makes_the_job_exit_within_the_timeout(tmp_path):
    """Rank 1 stops answering after its 2nd iteration: rank 0 gives up after --dist_timeout, the job ends."""
    start = time.time()
    proc = run_torchrun('main_dino.py', 2, *RUN_ARGS, '--epochs', '1', '--batch_size_per_device', '4',
                        '--dist_timeout', '5', '--output_dir', tmp_path, env={'DINO_FAULT': 'step:2:hang:1'},
                        check=False, timeout=240)
    assert proc.returncode != 0
    assert 'DINO_FAULT: hang at step 2' in proc.stdout + proc.stderr
    assert 'error: process 0 lost contact with the other processes of the job' in proc.stderr
    assert 'Timed out' in proc.stderr
    assert time.time() - start < 200


def test_malicious_files_are_refused_by_the_evaluation_scripts(tmp_path):
    """eval_knn.py --load_features and eval_linear.py's resume / --evaluate read through the same safe path."""
    import eval_knn
    marker = tmp_path / 'marker'
    features = tmp_path / 'features'
    features.mkdir()
    for name in eval_knn.FEATURE_FILES:
        write_malicious(features / name, marker, 'zip')
    proc = run_script('eval_knn.py', '--load_features', features, '--device', 'cpu', check=False)
    assert proc.returncode != 0 and proc.stderr.strip().splitlines()[-1].startswith('error: refusing to load')
    assert 'Traceback' not in proc.stderr

    linear_dir = tmp_path / 'linear'
    linear_dir.mkdir()
    write_malicious(linear_dir / 'checkpoint.pth.tar', marker, 'legacy')
    import eval_linear
    with pytest.raises(SystemExit, match='refusing to load'):
        eval_linear.load_linear_head(torch.nn.Linear(1, 1), argparse.Namespace(output_dir=str(linear_dir)), {})
    assert not marker.exists()
