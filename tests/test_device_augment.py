"""--augment_on device: views drawn in the loader as before, rendered in batches by multicrop.render_views
(on CPU tensors here), equal to today's per-image CPU render."""
import argparse
import random
import signal

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils._python_dispatch import TorchDispatchMode

import benchmark
import imagedata
import main_dino
import multicrop
import utils
from conftest import TINY_TRAIN_ARGS, run_script
from test_speed import assert_view_statistics, vit_tiny_training_flops_per_image

STD = torch.tensor(utils.IMAGENET_STD)[:, None, None]


@pytest.fixture(scope='module')
def photos():
    """Two photograph-like images of different sizes and shapes (the batch pads them to a common size)."""
    shapes = imagedata.SyntheticShapes('train', image_size=500, seed=3)
    return [shapes.render(7).resize((500, 375), Image.BILINEAR), shapes.render(2).resize((300, 420), Image.BILINEAR)]


def both_paths(images, seed, local_crops_number=8, global_crops_size=224, local_crops_size=96):
    """Today's CPU views and the device render of the same draws (same seed per image), in grey levels."""
    cpu = main_dino.DataAugmentationDINO((0.4, 1.), (0.05, 0.4), local_crops_number, global_crops_size,
                                         local_crops_size)
    device = main_dino.DataAugmentationDINO((0.4, 1.), (0.05, 0.4), local_crops_number, global_crops_size,
                                            local_crops_size, augment_on='device')
    expected, handed = [], []
    for i, image in enumerate(images):
        for augmentation, out in ((cpu, expected), (device, handed)):
            torch.manual_seed(seed + i)
            random.seed(seed + i)
            out.append(augmentation(image))
    batch, skipped, notes = multicrop.collate_hand_over([(h, -1, '') for h in handed])
    got = multicrop.render_views(*batch, [t.size for t in device.transforms()])
    assert len(got) == 2 + local_crops_number and skipped.tolist() == [-1] * len(images)
    diffs = []
    for view, rendered in enumerate(got):
        for i in range(len(images)):
            assert rendered[i].shape == expected[i][view].shape
            diffs.append(((rendered[i] - expected[i][view]) * STD * 255).abs())
    return diffs, [p for _, p in handed]


# render_views as on a CPU device (batched resize, OpenCV colour view by view), and the accelerators'
# tensor ops (everything batched), run on CPU tensors
@pytest.mark.parametrize('opencv', [True, False], ids=['cpu_device', 'accelerator_ops'])
def test_device_render_equals_cpu_render(photos, monkeypatch, opencv):
    """Every view of several draws (all flips, jitter orders, grey, blur, solarisation are met): the
    tolerances used against PIL for the resize (mean below 1.5 grey levels, each view below 6). The
    CPU device renders the batch a few images at a time: here 4, then the last 2."""
    monkeypatch.setattr(multicrop, 'CPU_RENDER_CHUNK', 4)
    monkeypatch.setattr(multicrop, 'OPENCV_ON_CPU', opencv)
    diffs, params = both_paths(photos * 3, seed=10)
    per_view = [d.mean().item() for d in diffs]
    assert np.mean(per_view) < 1.5 and max(per_view) < 6
    # the device resize follows PIL's own resampling, so the views are much closer than that (what
    # differs: a whole level here and there where a float lands on the other side of a rounding step)
    assert np.mean(per_view) < 0.05 and max(per_view) < 0.5
    rows = torch.cat(params)
    f = multicrop.VIEW_FIELDS.index
    for field in ('flip', 'grayscale', 'solarize'):
        assert 0 < rows[:, f(field)].sum() < len(rows), field
    assert 0 < (rows[:, f('blur_radius')] > 0).sum() < len(rows)
    assert len(set(map(tuple, rows[:, f('order0'):f('order3') + 1].tolist()))) > 10


class ComputeOps(TorchDispatchMode):
    """Counts the aten operators dispatched (each a kernel launch on an accelerator), leaving out those that
    only describe memory already there: the view operators (view, transpose, t, permute, expand, slice,
    select, unbind, split, unsqueeze, alias, detach, lift_fresh: OpOverload.is_view) and _unsafe_view (the
    reshape of a fresh tensor). Copies (contiguous, to, clone), allocations and fills count."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not (func.is_view or func is torch.ops.aten._unsafe_view.default):
            self.count += 1
        return func(*args, **(kwargs or {}))


def handed_over(images, seed, sizes=(224, 96), local_crops_number=8):
    """A collated hand-over batch of `images` (their draws seeded by `seed`) and the views' sizes."""
    augmentation = main_dino.DataAugmentationDINO((0.4, 1.), (0.05, 0.4), local_crops_number, *sizes,
                                                  augment_on='device')
    torch.manual_seed(seed)
    random.seed(seed)
    batch, _, _ = multicrop.collate_hand_over([(augmentation(image), -1, '') for image in images])
    return (*batch, [t.size for t in augmentation.transforms()])


def with_views(params, **fields):
    """The packed rows with these fields set in every view (order: the jitter order of all four positions)."""
    params, f = params.clone(), multicrop.VIEW_FIELDS.index
    for name, value in fields.items():
        at = slice(f('order0'), f('order3') + 1) if name == 'order' else f(name)
        params[..., at] = torch.tensor(value, dtype=params.dtype)
    return params


def test_accelerator_render_runs_a_fixed_schedule(photos, monkeypatch):
    """The accelerators' eager render dispatches the same operators, at most 250, for any draws (random
    ones; no view jittered, blurred, grey or solarised; every view all of these), batch size (8 and 32
    images) and view sizes (the number of sizes decides it), counted once the batch shape's layout is
    cached (its first batch also sends it)."""
    monkeypatch.setattr(multicrop, 'OPENCV_ON_CPU', False)
    small = [photo.resize((96, 72)) for photo in photos]
    pixels, params, sizes = handed_over(small * 4, seed=0, sizes=(32, 16))
    batches = [handed_over(photos * 4, seed=1), (pixels, params, sizes),
               (pixels, with_views(params, order=[-1] * 4, grayscale=0, blur_radius=0, solarize=0), sizes),
               (pixels, with_views(params, order=[3, 0, 2, 1], grayscale=1, blur_radius=2, solarize=1), sizes),
               handed_over(small * 16, seed=2, sizes=(32, 16))]
    counts, shapes = [], set()
    for batch in batches:
        if (len(batch[0]), tuple(batch[2])) not in shapes:  # caches the layout
            shapes.add((len(batch[0]), tuple(batch[2])))
            multicrop.render_views(*batch)
        with ComputeOps() as ops:
            multicrop.render_views(*batch)
        counts.append(ops.count)
    assert counts == [counts[0]] * len(batches) and counts[0] <= 250, counts


def test_compiled_render_equals_eager(monkeypatch, capsys):
    """On CUDA and HPU the render's chain after the resize runs compiled (with the run device's backend; HPU lazy
    mode refuses --compile), never on a CPU device, which renders with OpenCV. Compiled by inductor on CPU tensors here: the
    views equal the eager ones to float rounding (fused kernels round differently, so a floored level may
    fall the other way now and then), and a batch of other draws reuses the compiled graph."""
    assert multicrop.COMPILE_ON == ('cuda', 'hpu')
    monkeypatch.setattr(multicrop, 'OPENCV_ON_CPU', False)
    shapes = imagedata.SyntheticShapes('train', image_size=64, seed=3)
    images = [shapes.render(i) for i in range(4)]
    graphs = torch._dynamo.utils.counters['stats']['unique_graphs']
    for seed in range(2):
        batch = handed_over(images, seed, sizes=(32, 16), local_crops_number=2)
        monkeypatch.setattr(multicrop, 'COMPILE_ON', ())
        eager = multicrop.render_views(*batch)
        monkeypatch.setattr(multicrop, 'COMPILE_ON', ('cpu',))
        compiled = multicrop.render_views(*batch)
        levels = [((a - b) * STD * 255).abs() for a, b in zip(compiled, eager)]  # in grey levels
        assert (torch.cat([d.flatten() for d in levels]) > 0.01).float().mean() < 0.01
        assert max(d.mean() for d in levels) < 0.05
    assert torch._dynamo.utils.counters['stats']['unique_graphs'] == graphs + 1
    assert 'warning:' not in capsys.readouterr().err


def test_a_failed_compile_leaves_the_render_eager(photos, monkeypatch, capsys):
    """If torch.compile fails, one warning line, and the views of the eager render from then on."""
    def failing(*args):
        raise RuntimeError('no compiler here\nsecond line')

    monkeypatch.setattr(multicrop, 'OPENCV_ON_CPU', False)
    monkeypatch.setattr(multicrop, '_compiled_finish', lambda backend: failing)
    monkeypatch.setattr(multicrop, 'COMPILE_ON', ('cpu',))
    batch = handed_over([photo.resize((96, 72)) for photo in photos], seed=0, sizes=(32, 16), local_crops_number=2)
    got = multicrop.render_views(*batch)
    assert multicrop.COMPILE_ON == ()
    assert capsys.readouterr().err == ("warning: the multi-crop render runs eager on cpu: torch.compile failed "
                                       "(RuntimeError: no compiler here)\n")
    for a, b in zip(got, multicrop.render_views(*batch)):
        assert torch.equal(a, b)


def test_compile_false_renders_eagerly(photos, monkeypatch):
    """main_dino's --compile false runs the render's chain eagerly too (where it would run compiled)."""
    monkeypatch.setattr(multicrop, 'OPENCV_ON_CPU', False)
    monkeypatch.setattr(multicrop, 'COMPILE_ON', ('cpu',))
    calls = []
    monkeypatch.setattr(multicrop, '_finish_compiled', lambda *args: calls.append(1) or multicrop._finish(*args))
    pixels, params, sizes = handed_over(photos, seed=0, sizes=(32, 16), local_crops_number=2)
    for compiled in (False, True):
        args = argparse.Namespace(augment_on='device', compile=compiled, global_crops_size=32, local_crops_size=16,
                                  local_crops_number=2)
        views = main_dino.views_on_device((pixels, params), args, torch.device('cpu'))
        assert [v.shape[-1] for v in views] == sizes and len(calls) == int(compiled)


def test_large_images_are_handed_over_shrunk(photos):
    """An image above the cap (short side 2x the global size) travels shrunk, its boxes scaled with it;
    the views stay within the tolerances of the direct render."""
    big = photos[0].resize((1000, 750), Image.BICUBIC)
    diffs, params = both_paths([big], seed=3, local_crops_number=2, global_crops_size=96, local_crops_size=48)
    per_view = [d.mean().item() for d in diffs]
    assert np.mean(per_view) < 1.5 and max(per_view) < 6
    f = multicrop.VIEW_FIELDS.index
    assert params[0][0, f('image_height')] == 192 and params[0][0, f('image_width')] == 256


def test_packed_rows_read_back_as_the_drawn_views(photos):
    """hand_over's rows, read back by unpack_view (as the CPU device's render does), are the very
    CropParams drawn, for an image below the size cap."""
    augmentation = main_dino.DataAugmentationDINO((0.4, 1.), (0.05, 0.4), 2, augment_on='device')
    for seed in range(20):
        torch.manual_seed(seed)
        random.seed(seed)
        drawn = [t.sample(photos[0]) for t in augmentation.transforms()]
        rows = multicrop.hand_over(photos[0], drawn, augmentation.max_short_side)[1]
        assert [multicrop.unpack_view(row) for row in rows.tolist()] == drawn


def test_device_path_statistics(photos):
    """The parameters the device render reads, unpacked, over 2000 images: the statistics test's checks."""
    photo = photos[0]
    torch.manual_seed(0)
    random.seed(0)
    augmentation = main_dino.DataAugmentationDINO((0.4, 1.), (0.05, 0.4), 1, augment_on='device')
    draws = [[multicrop.unpack_view(row) for row in augmentation(photo)[1].tolist()] for _ in range(2000)]
    area = photo.size[0] * photo.size[1]
    views = {'global1': (0, (0.4, 1.), 1.0, 0.), 'global2': (1, (0.4, 1.), 0.1, 0.2), 'local': (2, (0.05, 0.4), 0.5, 0.)}
    for name, (position, scale, blur_p, solarize_p) in views.items():
        assert_view_statistics(name, [d[position] for d in draws], area, scale, blur_p, solarize_p)


# ----------------------------------------------------------------------------- training with --augment_on device

RUN_ARGS = [*TINY_TRAIN_ARGS, '--global_crops_size', '32', '--local_crops_size', '16', '--batch_size_per_device', '8',
            '--data_limit', '16', '--epochs', '2', '--augment_on', 'device']


def train(out, *extra, fault=None, check=True):
    env = {'OMP_NUM_THREADS': '1', 'DINO_FAULT': fault or ''}
    return run_script('main_dino.py', *RUN_ARGS, '--output_dir', out, *extra, env=env, check=check, timeout=300)


def test_device_augmented_training_resumes_exactly_after_a_kill(tmp_path):
    """Killed in epoch 1 (2 iterations per epoch), then run again: the same weights, bit for bit, as an
    uninterrupted run; the loader's workers hand over images and parameters, the step renders them."""
    reference, resumed = tmp_path / 'reference', tmp_path / 'resumed'
    proc = train(reference, '--num_workers', '1')
    assert 'Multi-crop views rendered on: device' in proc.stdout
    proc = train(resumed, '--num_workers', '0', fault='step:3:kill', check=False)
    assert proc.returncode == -signal.SIGKILL
    assert utils.load_checkpoint_or_exit(resumed / 'checkpoint.pth')['epoch'] == 1
    train(resumed, '--num_workers', '0')
    assert (resumed / 'log.txt').read_text() == (reference / 'log.txt').read_text()
    load = utils.load_checkpoint_or_exit
    got, want = load(resumed / 'checkpoint.pth'), load(reference / 'checkpoint.pth')
    for key in ('student', 'teacher', 'dino_loss'):
        for name in want[key]:
            assert torch.equal(got[key][name], want[key][name]), f'{key}.{name} differs'


# ----------------------------------------------------------------------------- benchmark.py

def test_benchmark_reports_both_paths_side_by_side():
    """--mode data: the original, cpu and device CPU shares and the device share; --mode step
    --augment_on device: the step with its render (the model FLOPs are those of the plain step)."""
    threads = torch.get_num_threads()
    try:
        args = benchmark.get_args_parser().parse_args(
            ['--mode', 'data', '--num_workers', '0', '--batch_size_per_device', '2', '--steps', '1',
             '--warmup_steps', '1', '--local_crops_number', '1', '--global_crops_size', '64', '--local_crops_size',
             '32', '--image_width', '120', '--image_height', '90', '--augment_on', 'device', '--device', 'cpu'])
        result = benchmark.benchmark_data(args)
        assert result['augment_on'] == 'device' and result['images_per_s'] > 0
        assert set(result['cpu_share']) == {'decode_only', 'original', 'cpu', 'device'}
        for share in [*result['cpu_share'].values(), result['device_share']]:
            assert share['images_per_s'] > 0 and share['images_per_cpu_second'] > 0
        assert result['one_thread_images_per_s'] == result['cpu_share']['device']['images_per_s']
        assert result['cpu_render_only_images_per_cpu_second'] > 0
        args = benchmark.get_args_parser().parse_args(
            ['--arch', 'vit_tiny', '--device', 'cpu', '--batch_size_per_device', '2', '--global_crops_size', '32',
             '--local_crops_size', '16', '--local_crops_number', '2', '--out_dim', '256', '--steps', '1',
             '--warmup_steps', '1', '--augment_on', 'device'])
        result = benchmark.benchmark_step(args)
    finally:
        torch.set_num_threads(threads)
    assert result['augment_on'] == 'device' and result['images_per_s'] > 0
    assert result['flops_per_image'] == vit_tiny_training_flops_per_image(32, 16, 2, 256)
    assert np.isfinite(result['final_loss'])


def test_benchmark_train_mode_reports_the_loop_beside_the_step(capsys):
    """--mode train: main_dino's loader over test JPEGs (one worker process), the device render and the
    step, end to end, beside the step alone."""
    threads = torch.get_num_threads()
    try:
        args = benchmark.get_args_parser().parse_args(
            ['--mode', 'train', '--device', 'cpu', '--augment_on', 'device', '--num_workers', '1', '--arch', 'vit_tiny',
             '--batch_size_per_device', '2', '--global_crops_size', '32', '--local_crops_size', '16',
             '--local_crops_number', '1', '--out_dim', '256', '--steps', '1', '--warmup_steps', '1', '--image_width',
             '120', '--image_height', '90'])
        result = benchmark.benchmark_train(args)
    finally:
        torch.set_num_threads(threads)
    assert (result['mode'], result['augment_on'], result['num_workers']) == ('train', 'device', 1)
    assert result['images_per_s'] > 0 and result['step_images_per_s'] > 0 and 0 <= result['data_wait_share'] < 1
    assert result['ratio_to_step'] == pytest.approx(result['images_per_s'] / result['step_images_per_s'])
    assert result['data'] == '120x90 test JPEGs'
    benchmark.print_report(result)
    report = capsys.readouterr().out
    assert 'end to end:' in report and 'waiting for data' in report and 'step alone' in report
    assert 'limited by' in report
