"""The original DINO's numbers by default (whitening, retrieval queries, attention frames), its importable
names, partial Copydays, training checkpoints that name their model, and the torch version check."""
import argparse
import os
import re
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import eval_copy_detection
import eval_image_retrieval
import evaluation
import utils
import vision_transformer as vits
from test_retrieval import CLUTTER, IMSIZE, parse_args, random_crops, write_copydays, write_revisitop


@pytest.fixture(scope='module')
def tiny_vit():
    torch.manual_seed(0)
    return vits.vit_tiny(patch_size=16).eval()


def original_whitening(whitening, rows):
    """The original's whitening, from its definition: PCA of the uncentred second moment F^T F / N (eigenvalues
    floored at 1e-5 of the largest), applied to rows minus the whitening features' mean."""
    whitening, rows = np.asarray(whitening, np.float64), np.asarray(rows, np.float64)
    eigenvalues, eigenvectors = np.linalg.eigh(whitening.T @ whitening / len(whitening))
    eigenvalues = np.maximum(eigenvalues, eigenvalues.max() * 1e-5)
    projection = eigenvectors / np.sqrt(eigenvalues)
    return (rows - whitening.mean(axis=0)) @ projection


def cosine_gram(rows):
    """Cosine similarities between rows: what copy detection ranks by, blind to the PCA's eigenvector signs."""
    rows = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return rows @ rows.T


def test_whitening_default_is_the_originals_and_centred_is_an_option():
    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(24, 24, generator=generator) * torch.logspace(0, -1, 24)
    features = torch.randn(200, 24, generator=generator) @ mixing + 2.
    rows = torch.randn(30, 24, generator=generator) @ mixing + 1.5
    expected = cosine_gram(original_whitening(features, rows))
    ours = eval_copy_detection.learn_whitening(features).apply(rows.double()).numpy()
    np.testing.assert_allclose(cosine_gram(ours), expected, atol=1e-8)

    centred = eval_copy_detection.learn_whitening(features, centred=True).apply(rows.double()).numpy()
    covariance = np.cov(features.double().numpy().T, bias=True)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    by_covariance = (rows.double().numpy() - features.double().numpy().mean(axis=0)) \
        @ (eigenvectors / np.sqrt(eigenvalues))
    np.testing.assert_allclose(cosine_gram(centred), cosine_gram(by_covariance), atol=1e-8)
    assert np.abs(cosine_gram(centred) - expected).max() > 1e-3


def holidays_ap(ranked, positives):
    """Average precision of one query as the Holidays/Copydays package defines it (trapezoids, all positives)."""
    found, area = 0, 0.
    for rank, item in enumerate(ranked):
        if item in positives:
            precision_before = found / rank if rank else 1.
            found += 1
            area += (precision_before + found / (rank + 1)) / 2 / len(positives)
    return area


def test_copy_detection_on_partial_copydays_with_the_originals_whitening(tmp_path, tiny_vit, capsys):
    # the Copydays archives Habana's README names (original, strong) plus one jpegqual block; more whitening
    # images than feature dimensions (384), so every dimension is whitened as in the original
    write_copydays(tmp_path, whitening_images=0)
    data = tmp_path / 'copydays'
    shutil.rmtree(data / 'crops')
    for q in os.listdir(data / 'jpegqual'):
        if q != '75':
            shutil.rmtree(data / 'jpegqual' / q)
    for i, img in enumerate(random_crops(CLUTTER, 400, 24, seed=3)):
        img.save(tmp_path / 'whitening' / f'{i:05d}.jpg')
    weights = tmp_path / 'checkpoint.pth'
    torch.save({'teacher': tiny_vit.state_dict(), 'args': argparse.Namespace(arch='vit_tiny', patch_size=16)}, weights)
    args = parse_args(eval_copy_detection, '--data_path', data, '--whitening_path', tmp_path / 'whitening',
                      '--distractors_path', tmp_path / 'none', '--arch', 'vit_tiny', '--patch_size', 16,
                      '--imsize', IMSIZE, '--batch_size_per_device', 100, '--pretrained_weights', weights,
                      '--num_workers', 0, '--device', 'cpu')
    capsys.readouterr()
    eval_copy_detection.eval_copy_detection(args)
    out = capsys.readouterr().out
    missing = [line for line in out.splitlines() if 'not evaluated' in line]
    assert len(missing) == 1 and 'crops/10' in missing[0] and 'jpegqual/3' in missing[0] \
        and 'jpegqual/75' not in missing[0] and 'strong' not in missing[0]
    printed = dict(re.findall(r'^eval on (\S+) mAP=([0-9.]+)$', out, flags=re.M))
    assert list(printed) == ['original', 'strong', 'jpegqual/75']
    assert re.search(r'^>> Copydays strong mAP=([0-9.]+)$', out, flags=re.M).group(1) == printed['strong']

    # the same numbers computed here: the script's features, the original's whitening and scoring
    copydays = eval_copy_detection.CopydaysDataset(str(data))
    whitening_files = sorted(str(p) for p in (tmp_path / 'whitening').iterdir())
    queries = eval_copy_detection.extract(tiny_vit, copydays.query_files(), torch.device('cpu'), args).numpy()
    whitening = eval_copy_detection.extract(tiny_vit, whitening_files, torch.device('cpu'), args).numpy()
    assert len(whitening) > whitening.shape[1]
    whitened = original_whitening(whitening, queries)
    whitened /= np.linalg.norm(whitened, axis=1, keepdims=True)
    database = whitened[:copydays.num_originals]
    start = 0
    for block in copydays.blocks:
        rows = whitened[start:start + len(copydays.files[block])]
        start += len(rows)
        ranked = np.argsort(-(rows @ database.T), axis=1)[:, :20]
        aps = [holidays_ap(list(r), set(pos)) for r, pos in zip(ranked, copydays.positives[block])]
        assert float(printed[block]) == pytest.approx(np.mean(aps), abs=0.0011), block

    # without whitening and without distractors: the L2-normalised features of the queries themselves
    args.whitening_path = ''
    eval_copy_detection.eval_copy_detection(args)
    out = capsys.readouterr().out
    assert 'learning the whitening operator' not in out and 'distractors...' not in out
    printed = dict(re.findall(r'^eval on (\S+) mAP=([0-9.]+)$', out, flags=re.M))
    plain = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    start = 0
    for block in copydays.blocks:
        rows = plain[start:start + len(copydays.files[block])]
        start += len(rows)
        ranked = np.argsort(-(rows @ plain[:copydays.num_originals].T), axis=1)[:, :20]
        aps = [holidays_ap(list(r), set(pos)) for r, pos in zip(ranked, copydays.positives[block])]
        assert float(printed[block]) == pytest.approx(np.mean(aps), abs=0.0011), block


def test_partial_copydays_needs_the_originals_and_a_block_of_copies(tmp_path):
    (tmp_path / 'original').mkdir()
    needs = r'^error: .*needs original/ and at least one block of copies.*found original$'
    with pytest.raises(SystemExit, match=needs):
        eval_copy_detection.CopydaysDataset(str(tmp_path))
    os.rename(tmp_path / 'original', tmp_path / 'strong')
    with pytest.raises(SystemExit, match=r'needs original/.*found strong$'):
        eval_copy_detection.CopydaysDataset(str(tmp_path))


# ---------------------------------------------------------------------------------------------
# Image retrieval: whole query images by default
# ---------------------------------------------------------------------------------------------

def test_retrieval_queries_are_whole_images_unless_cropped(tmp_path):
    cfg = write_revisitop(tmp_path)
    cfg['dir_images'] = str(tmp_path / 'roxford5k' / 'jpg')
    args = parse_args(eval_image_retrieval, '--data_path', tmp_path)
    assert args.crop_queries is False
    whole = eval_image_retrieval.OxfordParisDataset(cfg, 'query', imsize=None)
    cropped = eval_image_retrieval.OxfordParisDataset(cfg, 'query', imsize=None, crop=True)
    image = Image.open(tmp_path / 'roxford5k' / 'jpg' / f"{cfg['qimlist'][3]}.jpg").convert('RGB')
    box = tuple(float(c) for c in cfg['gnd'][3]['bbx'])
    assert np.array_equal(np.asarray(whole[3][0]), np.asarray(image))
    assert np.array_equal(np.asarray(cropped[3][0]), np.asarray(image.crop(box)))
    assert cropped[3][0].size != image.size


# ---------------------------------------------------------------------------------------------
# Attention videos: the original's frames by default
# ---------------------------------------------------------------------------------------------

def test_video_frames_are_the_originals_head_mean_of_raw_attention(tmp_path, tiny_vit, monkeypatch):
    import video_generation
    frames = tmp_path / 'frames'
    frames.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)).save(frames / 'frame-0000.jpg')
    args = video_generation.get_args_parser().parse_args(['--input_path', str(frames), '--patch_size', '16'])
    assert (args.outline, args.renormalise_heads) == (False, False)
    coloured, colorize = [], evaluation.colorize
    monkeypatch.setattr(evaluation, 'colorize', lambda values, *a: coloured.append(values) or colorize(values, *a))
    video_generation.inference(tiny_vit, [str(frames / 'frame-0000.jpg')], str(tmp_path / 'attention'), args,
                               torch.device('cpu'))
    saved = np.asarray(Image.open(tmp_path / 'attention' / 'attn-frame-0000.jpg')).astype(np.float32)

    # the original: [CLS] rows of get_last_selfattention, nearest-upsampled, averaged over heads, inferno
    img = evaluation.attention_transform()(Image.open(frames / 'frame-0000.jpg').convert('RGB'))[None]
    with torch.no_grad():
        rows = tiny_vit.get_last_selfattention(img)[0, :, 0, 1:].reshape(-1, 3, 4)
    expected = F.interpolate(rows[None], scale_factor=16, mode='nearest')[0].mean(dim=0).numpy()
    np.testing.assert_allclose(coloured[0], expected, rtol=1e-5, atol=1e-8)
    renormalised = (rows / rows.sum(dim=(1, 2), keepdim=True)).mean(dim=0).repeat_interleave(16, 0)
    assert not np.allclose(coloured[0], renormalised.repeat_interleave(16, 1).numpy(), rtol=1e-3)
    assert np.abs(saved - colorize(expected, 'inferno')).mean() < 4  # JPEG noise; no outline drawn


# ---------------------------------------------------------------------------------------------
# Training checkpoints name their model
# ---------------------------------------------------------------------------------------------

def test_arch_and_patch_size_come_from_a_training_checkpoint(tmp_path, capsys):
    training = tmp_path / 'checkpoint.pth'
    torch.save({'teacher': {}, 'args': argparse.Namespace(arch='vit_tiny', patch_size=16, epochs=3)}, training)
    released = tmp_path / 'backbone.pth'
    torch.save({'cls_token': torch.zeros(1, 1, 192)}, released)
    parser = argparse.ArgumentParser(parents=[eval_copy_detection.get_args_parser()])

    def resolve(*argv):
        argv = [str(a) for a in argv]
        args = parser.parse_args(argv)
        utils.take_model_from_checkpoint(parser, args, argv)
        return args.arch, args.patch_size

    capsys.readouterr()
    assert resolve('--pretrained_weights', training) == ('vit_tiny', 16)
    assert capsys.readouterr().out.strip() == \
        f"Taking --arch vit_tiny --patch_size 16 from the training arguments saved in {training}"
    assert resolve('--pretrained_weights', training, '--patch_size', 16) == ('vit_tiny', 16)
    assert resolve('--pretrained_weights', released) == ('vit_base', 8)  # no args: the flags' defaults
    with pytest.raises(SystemExit, match=r'^error: --arch vit_base contradicts .*checkpoint.pth, a checkpoint '
                                         r'trained with --arch vit_tiny; drop --arch'):
        resolve('--pretrained_weights', training, '--arch', 'vit_base')
    with pytest.raises(SystemExit, match=r'^error: --patch_size 8 contradicts'):
        resolve('--pretrained_weights', training, '--patch_size', 8)


# ---------------------------------------------------------------------------------------------
# The original's importable names, and the torch version check
# ---------------------------------------------------------------------------------------------

def test_original_names_import_and_work(tmp_path, tiny_vit, monkeypatch, capsys):
    import eval_knn
    from torchvision import transforms
    for i in range(3):
        (tmp_path / 'data' / f'c{i % 2}').mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((32, 32, 3), 60 * i, np.uint8)).save(tmp_path / 'data' / f'c{i % 2}' / f'{i}.png')
    dataset = eval_knn.ReturnIndexDataset(str(tmp_path / 'data'), transform=transforms.ToTensor())
    assert dataset[2][1] == 2 and dataset[2][0].shape == (3, 32, 32)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2)
    features = eval_knn.extract_features(tiny_vit, loader, use_cuda=False)
    with torch.no_grad():
        direct = tiny_vit(torch.stack([dataset[i][0] for i in range(3)]))
    torch.testing.assert_close(features, direct, atol=1e-5, rtol=1e-5)

    output = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.05, 0.15], [0.2, 0.3, 0.5]])
    top1, top2 = utils.accuracy(output, torch.tensor([1, 2, 2]), topk=(1, 2))
    assert top1.item() == pytest.approx(200 / 3) and top2.item() == pytest.approx(100.)

    tensor = torch.empty(2000)
    assert utils.trunc_normal_(tensor, std=1., a=-2., b=2.) is tensor and tensor.abs().max() <= 2.
    assert re.fullmatch(r'sha: ([0-9a-f]{40}|N/A), status: (clean|has uncommited changes|N/A), branch: \S+',
                        utils.get_sha())
    values = {'loss': torch.tensor(2.), 'acc': torch.tensor(50.)}
    assert utils.reduce_dict(values) == values  # one process: unchanged

    head = torch.nn.Linear(4, 3)
    before = head.weight.clone()
    capsys.readouterr()
    utils.load_pretrained_linear_weights(head, 'vit_tiny', 16)
    assert 'We use random linear weights.' in capsys.readouterr().out and torch.equal(head.weight, before)
    released = {'weight': torch.ones(3, 4), 'bias': torch.zeros(3)}
    urls = []
    monkeypatch.setattr(torch.hub, 'load_state_dict_from_url',
                        lambda url, **kwargs: urls.append(url) or {'state_dict': released})
    utils.load_pretrained_linear_weights(head, 'vit_small', 16)
    assert urls == ['https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_linearweights.pth']
    assert torch.equal(head.weight, released['weight'])
    # the attention scripts' default model is the paper's 300-epoch vit_small/8, as in the original
    utils.download_released_weights('vit_small', 8, utils.ATTENTION_WEIGHTS)
    utils.download_released_weights('vit_small', 8)
    assert urls[1:] == ['https://dl.fbaipublicfiles.com/dino/dino_deitsmall8_300ep_pretrain/'
                        'dino_deitsmall8_300ep_pretrain.pth',
                        'https://dl.fbaipublicfiles.com/dino/dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth']


# every public name of the original DINO's utils.py
ORIGINAL_UTILS_NAMES = [
    'GaussianBlur', 'Solarization', 'load_pretrained_weights', 'load_pretrained_linear_weights', 'clip_gradients',
    'cancel_gradients_last_layer', 'restart_from_checkpoint', 'cosine_scheduler', 'bool_flag', 'fix_random_seeds',
    'SmoothedValue', 'reduce_dict', 'MetricLogger', 'get_sha', 'is_dist_avail_and_initialized', 'get_world_size',
    'get_rank', 'is_main_process', 'save_on_master', 'setup_for_distributed', 'init_distributed_mode', 'accuracy',
    'trunc_normal_', 'LARS', 'MultiCropWrapper', 'get_params_groups', 'has_batchnorms', 'PCA', 'compute_ap',
    'compute_map', 'multi_scale']


def test_every_original_utils_name_imports_from_utils():
    import checkpoints
    import multicrop
    namespace = {}
    exec(f"from utils import {', '.join(ORIGINAL_UTILS_NAMES)}", namespace)
    assert all(callable(namespace[name]) for name in ORIGINAL_UTILS_NAMES)
    # names whose code lives in another module are that module's objects, not copies
    assert utils.GaussianBlur is multicrop.GaussianBlur and utils.PCA is evaluation.PCA
    assert utils.restart_from_checkpoint is checkpoints.restart_from_checkpoint
    with pytest.raises(AttributeError, match="module 'utils' has no attribute 'render_views'"):
        utils.render_views  # noqa: B018  (moved, but not one of the original's names)


def test_torch_older_than_the_minimum_stops_with_one_line():
    with pytest.raises(SystemExit) as stop:
        utils.check_torch_version('1.12.0a0+git')
    message = str(stop.value.code)
    assert message.startswith('error: PyTorch 1.12.0a0+git is too old') and 'PyTorch 2.5 or newer' in message
    assert '\n' not in message
    utils.check_torch_version('2.5.0+cpu')
    utils.check_torch_version('2.14.1+cu130')
