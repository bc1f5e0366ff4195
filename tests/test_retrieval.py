"""Image retrieval (revisited Oxford/Paris) and copy detection (Copydays): metrics, whitening, end to end."""
import argparse
import io
import os
import pickle
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from skimage import data as skdata

import eval_copy_detection
import eval_image_retrieval
import evaluation
import utils
import vision_transformer as vits
from conftest import run_torchrun

# Photographs shipped with scikit-image: copies of the first ones are searched, the others are clutter.
PHOTOS = ['astronaut', 'coffee', 'chelsea', 'rocket', 'hubble_deep_field', 'immunohistochemistry']
CLUTTER = ['camera', 'coins', 'moon', 'page', 'text', 'brick', 'grass', 'gravel', 'cell', 'clock', 'retina',
           'colorwheel']
IMSIZE = 64


# ---------------------------------------------------------------------------------------------
# Fixture data in the published layouts
# ---------------------------------------------------------------------------------------------

def photo(name, side=96):
    """The central square of a scikit-image photograph, resized (one size keeps the tests fast)."""
    img = Image.fromarray(getattr(skdata, name)()).convert('RGB')
    w, h = img.size
    short = min(w, h)
    img = img.crop(((w - short) // 2, (h - short) // 2, (w - short) // 2 + short, (h - short) // 2 + short))
    return img.resize((side, side), Image.Resampling.LANCZOS)


def jpeg(img, quality):
    """The image after a round trip through JPEG at this quality."""
    buffer = io.BytesIO()
    img.save(buffer, format='JPEG', quality=quality)
    buffer.seek(0)
    return Image.open(buffer).convert('RGB')


def crop_fraction(img, fraction_kept, corner=False):
    w, h = img.size
    cw, ch = round(w * fraction_kept ** 0.5), round(h * fraction_kept ** 0.5)
    left, top = (0, 0) if corner else ((w - cw) // 2, (h - ch) // 2)
    return img.crop((left, top, left + cw, top + ch))


def random_crops(names, count, size, seed):
    """`count` random square crops of the named photos, resized to `size` pixels."""
    rng = np.random.default_rng(seed)
    sources = [photo(name, 128) for name in names]
    crops = []
    for i in range(count):
        img = sources[i % len(sources)]
        side = int(rng.integers(40, min(img.size)))
        left, top = rng.integers(0, img.size[0] - side + 1), rng.integers(0, img.size[1] - side + 1)
        crops.append(img.crop((left, top, left + side, top + side)).resize((size, size)))
    return crops


def write_revisitop(root, dataset='roxford5k'):
    """<root>/<dataset>/jpg/*.jpg and gnd_<dataset>.pkl: queries are database images; each has an exact JPEG
    copy (easy), a blurred corner crop (hard) and itself as junk. Returns (cfg, full-image query ids)."""
    jpg_dir = root / dataset / 'jpg'
    jpg_dir.mkdir(parents=True)
    imlist, images = [], {}
    for name in PHOTOS[:4]:
        img = photo(name)
        images[f'{name}_a'] = img
        images[f'{name}_jpeg'] = jpeg(img, 40)
        images[f'{name}_hard'] = crop_fraction(img, 0.6, corner=True).filter(ImageFilter.GaussianBlur(1.5))
    for name in CLUTTER[:4]:
        images[f'{name}_a'] = photo(name)
    for name, img in images.items():
        img.save(jpg_dir / f'{name}.jpg', quality=95)
        imlist.append(name)
    qimlist, gnd = [], []
    for k, name in enumerate(PHOTOS[:4]):
        w, h = images[f'{name}_a'].size
        bbx = [0., 0., float(w), float(h)] if k < 3 else [w * 0.1, h * 0.1, w * 0.9, h * 0.95]
        qimlist.append(f'{name}_a')
        gnd.append({'bbx': np.array(bbx), 'easy': [imlist.index(f'{name}_jpeg')],
                    'hard': [imlist.index(f'{name}_hard')], 'junk': [imlist.index(f'{name}_a')]})
    cfg = {'imlist': imlist, 'qimlist': qimlist, 'gnd': gnd}
    with open(root / dataset / f'gnd_{dataset}.pkl', 'wb') as f:
        pickle.dump(cfg, f)
    return cfg


def write_copydays(root, whitening_images=48):
    """Copydays blocks (original, strong, jpegqual/<q>, crops/<c>) plus distractors and whitening folders."""
    originals = {f'{2000 + i}00.jpg': photo(name) for i, name in enumerate(PHOTOS[:5])}
    blocks = {'original': {n: img for n, img in originals.items()}, 'strong': {}}
    for n, img in originals.items():
        blocks['strong'][n[:4] + '01.jpg'] = crop_fraction(img, 0.5, corner=True).filter(ImageFilter.GaussianBlur(2))
        blocks['strong'][n[:4] + '02.jpg'] = img.rotate(8).convert('L').convert('RGB')
    for q in (3, 5, 8, 10, 15, 20, 30, 50, 75):
        blocks[f'jpegqual/{q}'] = {n: jpeg(img, q) for n, img in originals.items()}
    for c in (10, 15, 20, 30, 40, 50, 60, 70, 80):
        blocks[f'crops/{c}'] = {n: crop_fraction(img, 1 - c / 100) for n, img in originals.items()}
    for block, files in blocks.items():
        (root / 'copydays' / block).mkdir(parents=True)
        for n, img in files.items():
            img.save(root / 'copydays' / block / n, quality=95 if block == 'original' else 90)
    (root / 'distractors').mkdir()
    for i, img in enumerate(random_crops(CLUTTER, 8, 96, seed=1)):
        img.save(root / 'distractors' / f'{i:05d}.jpg')
    (root / 'whitening').mkdir()
    for i, img in enumerate(random_crops(CLUTTER + PHOTOS[5:], whitening_images, 40, seed=2)):
        img.save(root / 'whitening' / f'{i:05d}.jpg')
    return root / 'copydays'


@pytest.fixture(scope='module', autouse=True)
def one_thread():
    """The tensors here are tiny: a second thread only adds synchronisation (costly when the cores are shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope='module')
def random_vit_weights(tmp_path_factory):
    """A randomly initialised vit_tiny/16, saved as a DINO training checkpoint (teacher, backbone. prefix)."""
    torch.manual_seed(0)
    model = vits.vit_tiny(patch_size=16)
    path = tmp_path_factory.mktemp('weights') / 'checkpoint.pth'
    torch.save({'teacher': {f'backbone.{k}': v for k, v in model.state_dict().items()}}, path)
    return path, model.eval()


@pytest.fixture(scope='module')
def revisitop(tmp_path_factory):
    root = tmp_path_factory.mktemp('revisitop')
    return root, write_revisitop(root)


@pytest.fixture(scope='module')
def copydays(tmp_path_factory):
    root = tmp_path_factory.mktemp('copydays_data')
    return root, write_copydays(root)


def parse_args(module, *argv):
    parser = argparse.ArgumentParser(parents=[module.get_args_parser()])
    return parser.parse_args([str(a) for a in argv])


def run_in_process(pipeline, module, argv, capsys):
    """The single-process run, in this process (it saves a second import of torch): (stdout, stderr)."""
    capsys.readouterr()
    pipeline(parse_args(module, *argv))
    return capsys.readouterr()


def fails_with(function, args, *fragments):
    """Run a script's pipeline in-process and check it stops with one `error:` line naming `fragments`."""
    with pytest.raises(SystemExit) as stop:
        function(args)
    message = str(stop.value.code)
    assert message.startswith('error: ') and '\n' not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------

def naive_map(ranks, gnd, kappas):
    """Straight from the definitions: drop junk from each ranking, walk it, add one trapezoid per positive."""
    aps, prs = [], []
    for i, g in enumerate(gnd):
        ok, junk = set(np.asarray(g['ok']).tolist()), set(np.asarray(g['junk']).tolist())
        if not ok:
            continue
        ranking = [int(x) for x in ranks[:, i] if int(x) not in junk]
        ap, found, hit_positions = 0., 0, []
        for position, item in enumerate(ranking):
            if item in ok:
                precision_before = found / position if position > 0 else 1.
                found += 1
                ap += (precision_before + found / (position + 1)) / 2 / len(ok)
                hit_positions.append(position + 1)
        aps.append(ap)
        precisions = []
        for k in kappas:
            cut = min(k, hit_positions[-1]) if hit_positions else k
            precisions.append(sum(p <= cut for p in hit_positions) / cut)
        prs.append(precisions)
    return np.mean(aps), np.array(aps), np.mean(prs, axis=0)


def test_compute_ap_hand_worked():
    assert evaluation.compute_ap([0, 1], 2) == pytest.approx(1.)
    # one positive at position 2 (0-based 1): trapezoid between precision 0 and 1/2 over recall 0..1
    assert evaluation.compute_ap([1], 1) == pytest.approx(0.25)
    # reversed ranking of 5 with positives last: (0 + 1/4)/2 * 1/2 + (1/4 + 2/5)/2 * 1/2
    assert evaluation.compute_ap([3, 4], 2) == pytest.approx(0.225)
    # a positive never retrieved still counts in the recall step
    assert evaluation.compute_ap([0], 2) == pytest.approx(0.5)
    assert evaluation.compute_ap([], 3) == 0.


def test_compute_map_hand_worked():
    kappas = [1, 5, 10]
    perfect = np.array([[0, 1, 2, 3, 4]]).T
    reversed_ = perfect[::-1]
    with_junk = np.array([[9, 0, 7, 1, 2]]).T
    truncated = np.array([[0, 5, 6]]).T  # positive 1 missing from a top-3 ranking
    gnd = [{'ok': [0, 1], 'junk': []}]
    mean_ap, aps, pr, prs = evaluation.compute_map(perfect, gnd, kappas)
    assert mean_ap == pytest.approx(1.) and pr == pytest.approx([1., 1., 1.])
    mean_ap, _, pr, _ = evaluation.compute_map(reversed_, gnd, kappas)
    # positives at 1-based positions 4 and 5; precision at k is cut at the last positive (5), as the authors do
    assert mean_ap == pytest.approx(0.225) and pr == pytest.approx([0., 0.4, 0.4])
    mean_ap, _, pr, _ = evaluation.compute_map(with_junk, [{'ok': [0, 1], 'junk': [9, 7]}], kappas)
    assert mean_ap == pytest.approx(1.) and pr == pytest.approx([1., 1., 1.])
    mean_ap, _, pr, _ = evaluation.compute_map(with_junk, gnd, kappas)  # same ranking, junk counted as wrong
    assert mean_ap == pytest.approx(((0 + 1 / 2) / 2 + (1 / 3 + 2 / 4) / 2) / 2)  # positions 1 and 3
    mean_ap, _, pr, _ = evaluation.compute_map(truncated, gnd, kappas)
    assert mean_ap == pytest.approx(0.5) and pr == pytest.approx([1., 1., 1.])
    mean_ap, _, pr, _ = evaluation.compute_map(np.array([[5, 6, 7]]).T, gnd, kappas)
    assert mean_ap == 0. and pr == pytest.approx([0., 0., 0.])
    # a query without positives is excluded from the means
    two = np.array([[0, 1, 2, 3, 4], [4, 3, 2, 1, 0]]).T
    mean_ap, aps, pr, prs = evaluation.compute_map(two, [{'ok': [], 'junk': [1]}, {'ok': [4], 'junk': []}], kappas)
    assert np.isnan(aps[0]) and np.isnan(prs[0]).all() and mean_ap == pytest.approx(1.) and aps[1] == 1.


def test_compute_map_matches_naive_implementation_on_random_rankings():
    rng = np.random.default_rng(0)
    kappas = [1, 5, 10]
    for trial in range(20):
        db, nq = int(rng.integers(5, 40)), int(rng.integers(1, 8))
        depth = db if trial % 2 else int(rng.integers(1, db + 1))  # odd trials: full rankings; even: top-k only
        ranks = np.stack([rng.permutation(db)[:depth] for _ in range(nq)], axis=1)
        gnd = []
        for _ in range(nq):
            labels = rng.choice(3, size=db, p=[0.6, 0.25, 0.15])  # 0 negative, 1 positive, 2 junk
            gnd.append({'ok': np.flatnonzero(labels == 1), 'junk': np.flatnonzero(labels == 2)})
        if all(len(g['ok']) == 0 for g in gnd):
            continue
        mean_ap, aps, pr, _ = evaluation.compute_map(ranks, gnd, kappas)
        expected_map, expected_aps, expected_pr = naive_map(ranks, gnd, kappas)
        assert mean_ap == pytest.approx(expected_map)
        assert aps[~np.isnan(aps)] == pytest.approx(expected_aps)
        assert pr == pytest.approx(expected_pr)


# ---------------------------------------------------------------------------------------------
# Whitening
# ---------------------------------------------------------------------------------------------

def check_whitened(pca, features):
    """Whitened features have identity covariance over the kept dims; returns how many dims were kept."""
    whitened = pca.apply(features).double()
    whitened = whitened - whitened.mean(dim=0)
    covariance = (whitened.T @ whitened / len(features)).numpy()
    assert covariance == pytest.approx(np.eye(len(covariance)), abs=1e-4)
    return len(covariance)


@pytest.mark.parametrize('num_images, dim', [(300, 32), (20, 32)])
def test_whitening_gives_identity_covariance_over_kept_dims(num_images, dim):
    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(dim, dim, generator=generator) * torch.logspace(0, -1, dim)
    features = torch.randn(num_images, dim, generator=generator) @ mixing + 3.
    pca = eval_copy_detection.learn_whitening(features, centred=True)
    assert check_whitened(pca, features) == min(dim, num_images - 1)


def test_whitening_of_real_features_with_fewer_images_than_dims(copydays, random_vit_weights, capsys):
    root, _ = copydays
    _, model = random_vit_weights
    args = parse_args(eval_copy_detection, '--imsize', IMSIZE, '--batch_size_per_device', 32, '--num_workers', 0,
                      '--store_on_device', 'false', '--device', 'cpu')
    paths = sorted(str(p) for p in (root / 'whitening').iterdir())
    features = eval_copy_detection.extract(model, paths, torch.device('cpu'), args)
    assert features.shape == (len(paths), 2 * model.embed_dim) and len(paths) <= features.shape[1]
    eval_copy_detection.warn_if_whitening_set_small(len(paths), features.shape[1], centred=True)
    warning = capsys.readouterr().err
    assert f"falling back to whitening only the PCA dimensions these images span (at most {len(paths) - 1})" in warning
    pca = eval_copy_detection.learn_whitening(features, centred=True)
    # n images span n - 1 directions, less one: the LayerNorm'ed [CLS] half always sums to the same value
    assert check_whitened(pca, features) == len(paths) - 2


# ---------------------------------------------------------------------------------------------
# eval_image_retrieval.py end to end
# ---------------------------------------------------------------------------------------------

def retrieval_metrics(stdout):
    """{'mAP': (M, H), 'mP@k': ([M...], [H...])} from the two result lines."""
    map_line = re.search(r'>> roxford5k: mAP M: (\S+), H: (\S+)\n', stdout)
    pr_line = re.search(r'>> roxford5k: mP@k\[ 1  5 10\] M: \[([^\]]*)\], H: \[([^\]]*)\]', stdout)
    assert map_line and pr_line, stdout[-2000:]
    return {'mAP': tuple(float(v) for v in map_line.groups()),
            'mP@k': tuple(tuple(float(v) for v in group.split()) for group in pr_line.groups())}


def independent_retrieval(model, root, cfg, crop=False):
    """Rankings computed here from the published layout: queries (cropped to their box with `crop`), shrunk to
    IMSIZE, [CLS], cosine."""
    def features(names, boxes):
        feats = []
        for name, box in zip(names, boxes):
            img = Image.open(root / 'roxford5k' / 'jpg' / f'{name}.jpg').convert('RGB')
            img = img.crop(tuple(box)) if box is not None else img
            img.thumbnail((IMSIZE, IMSIZE), Image.Resampling.LANCZOS)
            x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.).permute(2, 0, 1)
            x = (x - torch.tensor(utils.IMAGENET_MEAN)[:, None, None]) / torch.tensor(utils.IMAGENET_STD)[:, None, None]
            with torch.no_grad():
                feats.append(F.normalize(model(x[None]), dim=1)[0])
        return torch.stack(feats)

    db = features(cfg['imlist'], [None] * len(cfg['imlist']))
    queries = features(cfg['qimlist'], [g['bbx'] if crop else None for g in cfg['gnd']])
    return np.argsort(-(db @ queries.T).numpy(), axis=0, kind='stable')


def test_retrieval_end_to_end_one_and_two_processes(revisitop, random_vit_weights, capsys):
    root, cfg = revisitop
    weights, model = random_vit_weights
    args = ['--data_path', root, '--dataset', 'roxford5k', '--arch', 'vit_tiny', '--patch_size', 16,
            '--imsize', IMSIZE, '--pretrained_weights', weights, '--num_workers', 0, '--device', 'cpu']
    single = retrieval_metrics(run_in_process(eval_image_retrieval.eval_retrieval, eval_image_retrieval, args,
                                              capsys).out)
    double = retrieval_metrics(run_torchrun('eval_image_retrieval.py', 2, *args).stdout)
    assert single == double

    ranks = independent_retrieval(model, root, cfg)
    for i, g in enumerate(cfg['gnd'][:3]):  # full-image queries: the exact JPEG copy comes first after the query
        assert ranks[0, i] == g['junk'][0] and ranks[1, i] == g['easy'][0]
    medium = [{'ok': g['easy'] + g['hard'], 'junk': g['junk']} for g in cfg['gnd']]
    hard = [{'ok': g['hard'], 'junk': g['junk'] + g['easy']} for g in cfg['gnd']]
    (map_m, _, pr_m), (map_h, _, pr_h) = naive_map(ranks, medium, [1, 5, 10]), naive_map(ranks, hard, [1, 5, 10])
    assert single['mAP'] == pytest.approx((round(map_m * 100, 2), round(map_h * 100, 2)), abs=0.011)
    assert single['mP@k'][0] == pytest.approx(np.round(pr_m * 100, 2), abs=0.011)
    assert single['mP@k'][1] == pytest.approx(np.round(pr_h * 100, 2), abs=0.011)


def test_retrieval_bad_input(revisitop, tmp_path):
    root, cfg = revisitop
    run = eval_image_retrieval.eval_retrieval
    common = ['--dataset', 'roxford5k', '--arch', 'vit_tiny', '--device', 'cpu', '--num_workers', 0]
    fails_with(run, parse_args(eval_image_retrieval, '--data_path', tmp_path, *common),
               'gnd_roxford5k.pkl', 'not found')
    (tmp_path / 'roxford5k').mkdir()
    os.symlink(root / 'roxford5k' / 'gnd_roxford5k.pkl', tmp_path / 'roxford5k' / 'gnd_roxford5k.pkl')
    (tmp_path / 'roxford5k' / 'jpg').mkdir()
    for name in cfg['imlist']:
        if name != cfg['qimlist'][1]:
            os.symlink(root / 'roxford5k' / 'jpg' / f'{name}.jpg', tmp_path / 'roxford5k' / 'jpg' / f'{name}.jpg')
    fails_with(run, parse_args(eval_image_retrieval, '--data_path', tmp_path, *common),
               f"query image {cfg['qimlist'][1]}.jpg", 'missing')
    os.remove(tmp_path / 'roxford5k' / 'gnd_roxford5k.pkl')
    with open(tmp_path / 'roxford5k' / 'gnd_roxford5k.pkl', 'wb') as f:
        pickle.dump({'imlist': cfg['imlist'], 'qimlist': cfg['qimlist'], 'gnd': cfg['gnd'], 'x': os.system}, f)
    fails_with(run, parse_args(eval_image_retrieval, '--data_path', tmp_path, *common), 'cannot read', 'system')


# ---------------------------------------------------------------------------------------------
# eval_copy_detection.py end to end
# ---------------------------------------------------------------------------------------------

def copy_detection_metrics(stdout):
    maps = dict(re.findall(r'^eval on (\S+) mAP=([0-9.]+)$', stdout, flags=re.M))
    assert list(maps) == eval_copy_detection.BLOCKS, stdout[-2000:]
    headline = re.search(r'^>> Copydays strong mAP=([0-9.]+)$', stdout, flags=re.M)
    assert headline and headline.group(1) == maps['strong']
    return {block: float(value) for block, value in maps.items()}


def test_copy_detection_end_to_end_one_and_two_processes(copydays, random_vit_weights, capsys):
    root, data = copydays
    weights, _ = random_vit_weights
    args = ['--data_path', data, '--distractors_path', root / 'distractors', '--whitening_path', root / 'whitening',
            '--arch', 'vit_tiny', '--patch_size', 16, '--imsize', IMSIZE, '--batch_size_per_device', 32,
            '--pretrained_weights', weights, '--num_workers', 0, '--device', 'cpu']
    single = run_in_process(eval_copy_detection.eval_copy_detection, eval_copy_detection, args, capsys)
    double = run_torchrun('eval_copy_detection.py', 2, *args)
    maps = copy_detection_metrics(single.out)
    assert maps == copy_detection_metrics(double.stdout)
    assert maps['original'] == 1. and maps['jpegqual/75'] == 1.  # exact and JPEG-recompressed copies at rank 1
    assert all(0. < v <= 1. for v in maps.values())
    assert 'Using 8 distractors' in single.out and 'Database (originals and distractors) shape: (13, 384)' in single.out
    assert 'falling back to whitening only the PCA dimensions these images span (at most 48)' in single.err
    assert 'Whitening keeps the 47 of 384 dimensions' in single.out


def test_copy_detection_leaves_unreadable_distractors_out_and_needs_every_copydays_image(copydays, random_vit_weights,
                                                                                          tmp_path, capsys):
    root, data = copydays
    _, model = random_vit_weights
    args = parse_args(eval_copy_detection, '--data_path', data, '--arch', 'vit_tiny', '--patch_size', 16,
                      '--imsize', 32, '--num_workers', 0, '--device', 'cpu')
    readable = sorted(str(p) for p in (root / 'distractors').iterdir())[:3]
    (tmp_path / 'broken.jpg').write_bytes(b'\xff\xd8 truncated')
    broken = str(tmp_path / 'broken.jpg')
    paths = readable[:1] + [broken] + readable[1:]
    device = torch.device('cpu')
    features = eval_copy_detection.extract(model, paths, device, args, '--distractors_path')
    expected = eval_copy_detection.extract(model, readable, device, args, '--distractors_path')
    assert features.shape == (3, 384) and torch.allclose(features, expected, atol=1e-5)
    assert "1 unreadable image(s) of --distractors_path skipped, left out of the evaluation" in capsys.readouterr().err
    with pytest.raises(utils.DataError, match='broken.jpg'):  # a query or an original: the ground truth needs it
        eval_copy_detection.extract(model, paths, device, args)


def test_copydays_ground_truth_and_features(copydays, random_vit_weights):
    _, data = copydays
    _, model = random_vit_weights
    dataset = eval_copy_detection.CopydaysDataset(str(data))
    assert dataset.files['strong'][:3] == ['200001.jpg', '200002.jpg', '200101.jpg']
    assert dataset.positives['strong'][:3] == [[0], [0], [1]] and dataset.positives['crops/50'][4] == [4]
    assert len(dataset.query_files()) == 19 * 5 + 10
    # [CLS] + GeM computed the original's way: patch tokens on their grid, average-pooled powers
    images = torch.randn(2, 3, 48, 32)
    with torch.no_grad():
        feats = eval_copy_detection.cls_gem_features(model, images)
        tokens = model.get_intermediate_layers(images, n=1)[0]
    grid = tokens[:, 1:].reshape(2, 3, 2, -1).permute(0, 3, 1, 2).clamp(min=1e-6)
    gem = F.avg_pool2d(grid.pow(4), (3, 2)).pow(1 / 4).flatten(1)
    assert torch.allclose(feats, torch.cat((tokens[:, 0], gem), dim=1), atol=1e-6)


def test_copy_detection_bad_input(copydays, tmp_path):
    root, data = copydays
    run = eval_copy_detection.eval_copy_detection
    common = ['--arch', 'vit_tiny', '--patch_size', 16, '--device', 'cpu', '--whitening_path', root / 'whitening']
    (tmp_path / 'empty').mkdir()
    fails_with(run, parse_args(eval_copy_detection, '--data_path', data, '--distractors_path', tmp_path / 'empty',
                               *common), '--distractors_path', 'holds 0 image(s)')
    (tmp_path / 'one').mkdir()
    os.symlink(root / 'whitening' / '00000.jpg', tmp_path / 'one' / '00000.jpg')
    fails_with(run, parse_args(eval_copy_detection, '--data_path', data, '--whitening_path', tmp_path / 'one',
                               '--distractors_path', tmp_path / 'none', '--device', 'cpu'),
               '--whitening_path', 'at least 2')
    fails_with(run, parse_args(eval_copy_detection, '--data_path', tmp_path, *common),
               'needs original/ and at least one block of copies', 'found none of them')
    fails_with(eval_copy_detection.check_args, parse_args(eval_copy_detection, '--data_path', data, '--arch',
                                                          'resnet50', '--device', 'cpu'), '--arch resnet50')
