"""Speed work keeps the numbers: each optimised piece against a plain computation, and benchmark.py."""
import argparse
import json
import random
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter, ImageOps
from torchvision.transforms import functional as TF

import imagedata
import main_dino
import multicrop
import utils
import vision_transformer as vits
from benchmark import original_augmentation
from conftest import run_script


# ----------------------------------------------------------------------------- training step

def tiny_vit():
    return vits.VisionTransformer(patch_size=16, embed_dim=192, depth=2, num_heads=3, qkv_bias=True)


def pairwise_dino_loss(student_output, teacher_output, center, ncrops, student_temp, teacher_temp):
    """DINO's loss written as the paper's double loop over (teacher view, other student view) pairs."""
    student_chunks = (student_output / student_temp).chunk(ncrops)
    teacher_chunks = F.softmax((teacher_output - center) / teacher_temp, dim=-1).chunk(2)
    terms = []
    for iq, q in enumerate(teacher_chunks):
        for v, s in enumerate(student_chunks):
            if v != iq:
                terms.append(torch.sum(-q * F.log_softmax(s, dim=-1), dim=-1).mean())
    return sum(terms) / len(terms)


@pytest.mark.parametrize('ncrops, out_dim, spread', [(2, 64, 3.), (5, 64, 3.), (10, 4096, 30.)])
def test_dino_loss_equals_pairwise_loop(ncrops, out_dim, spread):
    """Same loss, gradient and centre as the double loop (computed in float64), also for very peaked
    outputs where the all-pairs-minus-same-view sum has the most cancellation."""
    torch.manual_seed(0)
    batch = 3
    loss_fn = main_dino.DINOLoss(out_dim, ncrops, 0.04, 0.07, 2, 5)
    loss_fn.center = torch.randn(1, out_dim) * 0.1
    center = loss_fn.center.clone()
    student = (torch.randn(ncrops * batch, out_dim) * spread).requires_grad_()
    teacher = torch.randn(2 * batch, out_dim) * spread

    loss = loss_fn(student, teacher, epoch=1)
    loss.backward()
    student64 = student.detach().double().requires_grad_()
    reference = pairwise_dino_loss(student64, teacher.double(), center.double(), ncrops, 0.1,
                                   loss_fn.teacher_temp_schedule[1])
    reference.backward()

    torch.testing.assert_close(loss.double(), reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(student.grad.double(), student64.grad, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(loss_fn.center, 0.9 * center + 0.1 * teacher.mean(0, keepdim=True))


def test_weight_norm_linear_equals_normalised_weight():
    torch.manual_seed(0)
    layer = vits.WeightNormLinear(16, 40)
    torch.nn.init.normal_(layer.weight_v)
    with torch.no_grad():
        layer.weight_g.uniform_(0.5, 2.)
    x = torch.randn(5, 16, requires_grad=True)
    out = layer(x)
    grads = torch.autograd.grad(out.pow(2).sum(), [x, layer.weight_v, layer.weight_g])
    v, g = layer.weight_v.detach().requires_grad_(), layer.weight_g.detach().requires_grad_()
    reference = x @ (g * v / v.norm(dim=1, keepdim=True)).t()
    reference_grads = torch.autograd.grad(reference.pow(2).sum(), [x, v, g])
    torch.testing.assert_close(out, reference)
    for got, expected in zip(grads, reference_grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_teacher_update_is_the_ema():
    torch.manual_seed(0)
    student, teacher = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    expected = [0.99 * t.detach() + 0.01 * s.detach() for t, s in zip(teacher.parameters(), student.parameters())]
    main_dino.update_teacher(utils.SingleProcess(student), teacher, 0.99)
    for got, want in zip(teacher.parameters(), expected):
        torch.testing.assert_close(got.detach(), want)


def test_fused_adamw_follows_plain_adamw():
    """Fed the same gradients, main_dino's (fused) AdamW moves every parameter as the textbook loop does."""
    torch.manual_seed(0)
    fast, plain = tiny_vit(), tiny_vit()
    plain.load_state_dict(fast.state_dict())
    fast_opt = main_dino.build_optimizer(argparse.Namespace(optimizer='adamw', device='cpu'), fast)
    plain_opt = torch.optim.AdamW(utils.get_params_groups(plain), foreach=False)
    for step in range(3):
        fast_opt.zero_grad()
        fast(torch.randn(2, 3, 32, 32)).pow(2).sum().backward()
        for p, q in zip(fast.parameters(), plain.parameters()):
            q.grad = p.grad.clone()
        for opt in (fast_opt, plain_opt):
            for group in opt.param_groups:
                group['lr'] = 1e-3 * (step + 1)
            opt.param_groups[0]['weight_decay'] = 0.04 * (step + 1)
            opt.step()
    for (name, got), want in zip(fast.named_parameters(), plain.parameters()):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7, msg=name)


def test_state_dict_keys_unchanged():
    """Released DINO checkpoints keep loading: same key names, and linear layers are still nn.Linear."""
    model = vits.vit_small()
    keys = set(model.state_dict())
    for key in ['cls_token', 'pos_embed', 'patch_embed.proj.weight', 'blocks.11.attn.qkv.weight',
                'blocks.11.attn.proj.bias', 'blocks.0.mlp.fc1.weight', 'blocks.0.mlp.fc2.bias', 'norm.weight']:
        assert key in keys
    assert len(keys) == 4 + 12 * 12 + 2
    head_keys = set(vits.DINOHead(384, 1000).state_dict())
    assert head_keys == {'mlp.0.weight', 'mlp.0.bias', 'mlp.2.weight', 'mlp.2.bias', 'mlp.4.weight', 'mlp.4.bias',
                         'last_layer.weight_g', 'last_layer.weight_v'}
    assert isinstance(model.blocks[0].attn.qkv, torch.nn.Linear)


# ----------------------------------------------------------------------------- bf16 on CPUs without bf16 units

def bf16_forward_backward(model, x, native, monkeypatch):
    # forced either way, so that both paths run on every CPU: native = torch's own bf16 kernels
    # (plain loops where the processor has no bf16 units), emulated = lower_precision's rounding
    monkeypatch.setattr(vits, '_cpu_has_bf16_matmul', lambda: native)
    model.zero_grad()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = model(x)
    out.float().pow(2).mean().backward()
    monkeypatch.undo()
    return out, [p.grad.clone() for p in model.parameters() if p.requires_grad]


def test_emulated_bf16_is_as_accurate_as_native_bf16(monkeypatch):
    """lower_precision gives bf16 results as close to float32 as torch's bf16 kernels do (over a few
    random models: single draws favour either by chance)."""
    def error(a, b):
        return ((a.float() - b).norm() / b.norm()).item()

    errors = np.zeros((2, 2))  # (emulated, native) x (output, gradients)
    for seed in range(4):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(tiny_vit(), vits.DINOHead(192, 256, nlayers=2, hidden_dim=64))
        x = torch.randn(2, 3, 32, 32)
        reference = model(x)
        reference.pow(2).mean().backward()
        reference_grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
        for row, native in enumerate([False, True]):
            out, grads = bf16_forward_backward(model, x, native, monkeypatch)
            assert out.dtype == torch.float32  # the head's last layer rescales in float32
            errors[row] += [error(out, reference.detach()), sum(map(error, grads, reference_grads))]
    emulated, native = errors
    assert np.all(emulated < 1.3 * native)
    assert np.all(emulated > 0)  # bf16 rounding did happen


def test_lower_precision_rounds_like_bf16_autocast(monkeypatch):
    monkeypatch.setattr(vits, '_cpu_has_bf16_matmul', lambda: False)  # the emulation, even on CPUs with bf16 units
    torch.manual_seed(0)
    x, w = torch.randn(4, 8), torch.randn(5, 8)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = vits.lower_precision(F.linear, x, w)
    assert out.dtype == torch.bfloat16
    expected = (x.bfloat16().double() @ w.bfloat16().double().t()).bfloat16()  # exact products, one rounding
    # at most one bf16 rounding step (2**-8 relative) apart, and most results identical
    torch.testing.assert_close(out, expected, rtol=2 ** -8, atol=0.)
    assert (out == expected).float().mean() > 0.8
    assert vits.lower_precision(F.linear, x, w).dtype == torch.float32  # no autocast: untouched


# ----------------------------------------------------------------------------- augmentation

@pytest.fixture(scope='module')
def photo():
    """A 500x375 image with texture, edges and colour, like an ImageNet photograph."""
    return imagedata.SyntheticShapes('train', image_size=500, seed=3).render(7).resize((500, 375), Image.BILINEAR)


def test_views_match_original_pipeline_for_the_same_seed(photo):
    """Same seed, same views: the random choices coincide and the pixels agree to about a grey level."""
    fast = main_dino.DataAugmentationDINO((0.4, 1.), (0.05, 0.4), 4)
    original = original_augmentation((0.4, 1.), (0.05, 0.4), 4)
    std = torch.tensor(utils.IMAGENET_STD)[:, None, None]
    per_view = []
    for seed in range(6):
        torch.manual_seed(seed)
        random.seed(seed)
        expected = [t(photo) for t in original]
        torch.manual_seed(seed)
        random.seed(seed)
        got = fast(photo)
        for a, b in zip(got, expected):
            assert a.shape == b.shape and a.dtype == b.dtype
            per_view.append(((a - b) * std * 255).abs().mean().item())  # in 8-bit grey levels
    assert np.mean(per_view) < 1.5
    assert max(per_view) < 6


@pytest.mark.parametrize('op, factors', [('brightness', [0.6, 1.4]), ('contrast', [0.6, 1.4]),
                                         ('saturation', [0.8, 1.2]), ('hue', [-0.1, 0.04, 0.1])])
def test_colour_operations_match_pil(photo, op, factors):
    image = photo.resize((96, 96), Image.BICUBIC)
    pixels = np.asarray(image, dtype=np.float32)
    reference = getattr(TF, f'adjust_{op}')
    for factor in factors:
        got = getattr(multicrop.DinoCropTransform, op)(pixels.copy(), factor)
        diff = np.abs(got - np.asarray(reference(image, factor), dtype=np.float32))
        assert diff.mean() < (1.5 if op == 'hue' else 1.0), (op, factor)


def test_blur_grayscale_solarize_match_pil(photo):
    image = photo.resize((96, 96), Image.BICUBIC)
    transform = multicrop.DinoCropTransform(96, (1., 1.), blur_p=0.)
    std = torch.tensor(utils.IMAGENET_STD)[:, None, None]
    box = (0, 0, 96, 96)
    cases = [(dict(blur_radius=1.5), image.filter(ImageFilter.GaussianBlur(1.5))),
             (dict(grayscale=True), image.convert('L').convert('RGB')),
             (dict(solarize=True), ImageOps.solarize(image))]
    for change, expected in cases:
        params = multicrop.CropParams(box, False, (), False, 0., False)._replace(**change)
        got = transform.render(image, params)
        assert ((got - TF.normalize(TF.to_tensor(expected), utils.IMAGENET_MEAN, utils.IMAGENET_STD))
                * std * 255).abs().mean() < 0.6, change


def rate_is(flags, p):
    """The observed frequency is within 4 standard errors of p."""
    return abs(np.mean(flags) - p) <= 4 * np.sqrt(p * (1 - p) / len(flags)) + 1e-12


def uniform_in(values, low, high, slack=0.):
    """Values lie in [low, high] (give or take `slack`, for crops rounded to whole pixels) with the
    mean and spread of a uniform distribution (within 4 standard errors)."""
    values, width = np.asarray(values), high - low
    n = len(values)
    return (values.min() >= low - slack and values.max() <= high + slack
            and abs(values.mean() - (low + high) / 2) <= 4 * width / np.sqrt(12 * n)
            and abs(values.std() - width / np.sqrt(12)) <= 4 * width / np.sqrt(12 * 2 * n) * 1.2)


def test_augmentation_statistics(photo):
    """Instrumented draws over many views: every rate and range is the one DINO specifies."""
    torch.manual_seed(0)
    random.seed(0)
    augmentation = main_dino.DataAugmentationDINO((0.4, 1.), (0.05, 0.4), 8)
    views = {'global1': (augmentation.global_transfo1, 1.0, 0.),
             'global2': (augmentation.global_transfo2, 0.1, 0.2),
             'local': (augmentation.local_transfo, 0.5, 0.)}
    n = 2000
    area = photo.size[0] * photo.size[1]
    for name, (transform, blur_p, solarize_p) in views.items():
        assert_view_statistics(name, [transform.sample(photo) for _ in range(n)], area, transform.scale, blur_p,
                               solarize_p)


def assert_view_statistics(name, draws, area, scale, blur_p, solarize_p):
    """The CropParams `draws` of one view of DINO's multi-crop have the rates and ranges DINO specifies."""
    scales = np.array([p.box[2] * p.box[3] / area for p in draws])
    ratios = np.array([p.box[3] / p.box[2] for p in draws])
    low, high = scale
    assert scales.min() >= low * 0.97 and scales.max() <= high * 1.01, name
    assert ratios.min() >= 0.74 and ratios.max() <= 1.35, name
    if name == 'local':  # no rejected draws: area uniform in the scale range, log-ratio symmetric
        assert uniform_in(scales, low, high, slack=0.01)
        assert uniform_in(np.log(ratios), np.log(3 / 4), np.log(4 / 3), slack=0.01)
    assert rate_is([p.flip for p in draws], 0.5), name
    assert rate_is([bool(p.jitter) for p in draws], 0.8), name
    assert rate_is([p.grayscale for p in draws], 0.2), name
    assert rate_is([p.blur_radius > 0 for p in draws], blur_p), name
    assert rate_is([p.solarize for p in draws], solarize_p), name
    assert uniform_in([p.blur_radius for p in draws if p.blur_radius > 0], 0.1, 2.0), name
    factors = {op: [f for p in draws for o, f in p.jitter if o == op] for op in multicrop.DinoCropTransform.JITTER_OPS}
    for op, (lo, hi) in {'brightness': (0.6, 1.4), 'contrast': (0.6, 1.4), 'saturation': (0.8, 1.2),
                         'hue': (-0.1, 0.1)}.items():
        assert len(factors[op]) == sum(bool(p.jitter) for p in draws)  # all four, when jitter applies
        assert uniform_in(factors[op], lo, hi), (name, op)
    orders = Counter(tuple(o for o, _ in p.jitter) for p in draws if p.jitter)
    assert len(orders) == 24 and min(orders.values()) > 0.5 * len(draws) * 0.8 / 24  # random order


def test_rendered_views_apply_their_parameters(photo):
    """Rendering follows the drawn parameters: flips mirror, grayscale views have equal channels."""
    transform = multicrop.DinoCropTransform(96, (0.3, 0.3), blur_p=0.)
    base = multicrop.CropParams((50, 60, 200, 200), False, (), False, 0., False)
    plain = transform.render(photo, base)
    flipped = transform.render(photo, base._replace(flip=True))
    torch.testing.assert_close(flipped, plain.flip(-1), atol=1e-5, rtol=0)
    gray = transform.render(photo, base._replace(grayscale=True))
    mean, std = torch.tensor(utils.IMAGENET_MEAN)[:, None, None], torch.tensor(utils.IMAGENET_STD)[:, None, None]
    levels = gray * std + mean
    torch.testing.assert_close(levels[0], levels[1], atol=1e-5, rtol=0)
    assert plain.shape == (3, 96, 96) and plain.is_contiguous()


# ----------------------------------------------------------------------------- benchmark.py

def vit_tiny_training_flops_per_image(global_size, local_size, local_number, out_dim, patch=16):
    """FLOPs of one image's DINO step worked out by hand: matrix products of the student's forward and
    backward passes and of the teacher's forward pass."""
    dim, depth, hidden, bottleneck = 192, 12, 2048, 256

    def forward(size):  # (everything, attention, patch embedding)
        patches = (size // patch) ** 2
        tokens = patches + 1
        attention = depth * 4 * tokens ** 2 * dim  # q @ k.T and attn @ v
        linear = depth * 2 * tokens * (dim * 3 * dim + dim * dim + 2 * dim * 4 * dim)
        conv = 2 * patches * 3 * patch ** 2 * dim
        head = 2 * (dim * hidden + hidden * hidden + hidden * bottleneck + bottleneck * out_dim)
        return attention + linear + conv + head, attention, conv

    def student(size):
        total, attention, conv = forward(size)
        # backward: two products per forward product, except that the images need no gradient,
        # and torch also counts attention's recomputed scores (half its forward)
        return 3 * total - conv + attention // 2

    crops = [global_size] * 2 + [local_size] * local_number
    return sum(student(s) for s in crops) + 2 * forward(global_size)[0]


STEP_FIELDS = ['images_per_s', 'seconds_per_step', 'flops_per_image', 'matmul_peak_flops_per_s', 'mfu',
               'peak_memory_mb', 'achieved_flops_per_s']


@pytest.mark.parametrize('extra', [[], ['--autocast']])
def test_benchmark_step_reports_its_figures(extra):
    args = ['--arch', 'vit_tiny', '--device', 'cpu', '--batch_size_per_device', '2', '--global_crops_size', '32',
            '--local_crops_size', '16', '--local_crops_number', '2', '--out_dim', '256', '--steps', '2',
            '--warmup_steps', '1', '--json', *extra]
    proc = run_script('benchmark.py', *args, env={'OMP_NUM_THREADS': '1'}, timeout=300)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for field in STEP_FIELDS:
        assert result[field] > 0, field
    assert result['flops_per_image'] == vit_tiny_training_flops_per_image(32, 16, 2, 256)
    assert result['dtype'] == ('bfloat16' if extra else 'float32')
    assert result['images_per_s'] == pytest.approx(2 / result['seconds_per_step'])
    assert result['mfu'] == pytest.approx(result['flops_per_image'] * result['images_per_s']
                                          / result['matmul_peak_flops_per_s'])
    assert np.isfinite(result['final_loss'])


def test_benchmark_data_reports_its_figures():
    args = ['--mode', 'data', '--num_workers', '0', '--batch_size_per_device', '2', '--steps', '2',
            '--warmup_steps', '1', '--local_crops_number', '2', '--image_width', '160', '--image_height', '120',
            '--json']
    result = json.loads(run_script('benchmark.py', *args, timeout=300).stdout.strip().splitlines()[-1])
    for field in ['images_per_s', 'one_thread_images_per_s', 'one_thread_images_per_cpu_second']:
        assert result[field] > 0, field
    assert result['images_per_s_per_worker'] == pytest.approx(result['images_per_s'])
    assert result['image_size'] == [160, 120]


def test_benchmark_rejects_bad_arguments():
    proc = run_script('benchmark.py', '--steps', '0', check=False)
    assert proc.returncode != 0 and proc.stderr.strip().startswith('error:')
    assert 'Traceback' not in proc.stderr
