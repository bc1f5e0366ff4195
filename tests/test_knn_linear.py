"""k-NN and linear evaluation of frozen features: eval_knn.py, eval_linear.py, hubconf.py."""
import argparse
import json
import math
import re

import pytest
import torch
import torch.nn.functional as F

import eval_knn
import eval_linear
import evaluation
import imagedata
import utils
import vision_transformer as vits
from conftest import REPO, run_script, run_torchrun

CPU = ['--device', 'cpu', '--num_workers', '0']


def run_inprocess(capsys, script, *args):
    """A script's main() run in this process (no interpreter start-up); returns what it printed."""
    capsys.readouterr()
    script.main([str(a) for a in args])
    return capsys.readouterr().out


def inprocess_error(script, *args):
    """The message a script stops with on bad input (what the command line prints as its last line)."""
    with pytest.raises(SystemExit) as stop:
        script.main([str(a) for a in args])
    message = str(stop.value)
    assert message.startswith('error: ') and '\n' not in message
    return message


KNN_LINE = re.compile(r'^(\d+)-NN classifier result: Top1: ([\d.]+), Top5: ([\d.]+)$', re.M)


def knn_results(stdout):
    return {int(k): (float(t1), float(t5)) for k, t1, t5 in KNN_LINE.findall(stdout)}


# ----------------------------------------------------------------------------------------
# Independent reference: plain Python loops in float64
# ----------------------------------------------------------------------------------------

def brute_force_knn(train, train_labels, test, k, T, num_classes):
    """(neighbours, ranked classes) of every test row. Ties: lower index, then lower class.

    A class's weights are added from the largest down, so that classes holding the same
    similarities get bit-identical votes (an exact tie).
    """
    train, test = train.double().tolist(), test.double().tolist()
    neighbours, rankings = [], []
    for q in test:
        sims = [sum(a * b for a, b in zip(q, row)) for row in train]
        nearest = sorted(range(len(sims)), key=lambda j: (-sims[j], j))[:k]
        per_class = [[] for _ in range(num_classes)]
        for j in nearest:
            per_class[int(train_labels[j])].append(sims[j])
        votes = [sum(math.exp(s / T) for s in sorted(vals, reverse=True)) for vals in per_class]
        neighbours.append(nearest)
        rankings.append(sorted(range(num_classes), key=lambda c: (-votes[c], c)))
    return neighbours, rankings


def accuracies_of(rankings, test_labels, k):
    top1 = sum(r[0] == t for r, t in zip(rankings, test_labels.tolist()))
    top5 = sum(t in r[:min(5, k)] for r, t in zip(rankings, test_labels.tolist()))
    return 100.0 * top1 / len(rankings), 100.0 * top5 / len(rankings)


def check_against_brute_force(train, train_labels, test, test_labels, ks, T, num_classes, chunk_size):
    results = eval_knn.knn_evaluate(train, train_labels, test, test_labels, ks, T, num_classes,
                                    chunk_size=chunk_size)
    for k in ks:
        neighbours, rankings = brute_force_knn(train, train_labels, test, k, T, num_classes)
        sims, indices = evaluation.nearest_neighbours(train, test, k)
        assert indices.tolist() == neighbours
        ranked = evaluation.rank_classes(sims, train_labels[indices], T, num_classes)
        assert ranked[:, :5].tolist() == [r[:5] for r in rankings]
        expected = accuracies_of(rankings, test_labels, k)
        assert results[k] == pytest.approx(expected, abs=1e-9)
        assert eval_knn.knn_classifier(train, train_labels, test, test_labels, k, T, num_classes) == \
            pytest.approx(expected, abs=1e-9)


def test_knn_matches_brute_force_on_clustered_features():
    gen = torch.Generator().manual_seed(0)
    num_classes, dim = 7, 16
    centres = torch.randn(num_classes, dim, generator=gen)
    train_labels = torch.randint(0, num_classes, (300,), generator=gen)
    test_labels = torch.randint(0, num_classes, (53,), generator=gen)
    train = F.normalize(centres[train_labels] + 1.2 * torch.randn(300, dim, generator=gen), dim=1)
    test = F.normalize(centres[test_labels] + 1.2 * torch.randn(53, dim, generator=gen), dim=1)
    # 53 test rows in chunks of 7: the last chunk is partial
    check_against_brute_force(train, train_labels, test, test_labels, [1, 3, 10, 20], 0.07, num_classes, 7)
    top1 = eval_knn.knn_classifier(train, train_labels, test, test_labels, 20, 0.07, num_classes)[0]
    assert 40 < top1 < 100  # informative features, not a trivial case


def test_knn_ties_go_to_lower_index_then_lower_class():
    gen = torch.Generator().manual_seed(1)
    # small integer vectors: exact similarities with many ties, also across the k-th place
    train = torch.randint(-1, 2, (400, 4), generator=gen).float()
    test = torch.randint(-1, 2, (37, 4), generator=gen).float()
    train_labels = torch.randint(0, 5, (400,), generator=gen)
    test_labels = torch.randint(0, 5, (37,), generator=gen)
    check_against_brute_force(train, train_labels, test, test_labels, [1, 5, 17], 1.0, 5, 4)

    # hand-worked: two neighbours at the same similarity, labels 2 then 1: the classes tie, 1 wins
    train = torch.tensor([[1., 0.], [1., 0.], [0., 1.]])
    train_labels = torch.tensor([2, 1, 0])
    query = torch.tensor([[1., 0.]])
    sims, indices = evaluation.nearest_neighbours(train, query, 2)
    assert indices.tolist() == [[0, 1]] and sims.tolist() == [[1., 1.]]
    assert evaluation.rank_classes(sims, train_labels[indices], 0.07, 3).tolist() == [[1, 2, 0]]
    assert eval_knn.knn_classifier(train, train_labels, query, torch.tensor([1]), 2, 0.07, 3) == (100., 100.)
    assert eval_knn.knn_classifier(train, train_labels, query, torch.tensor([2]), 2, 0.07, 3) == (0., 100.)
    # k = 1: the tie at the k-th place goes to index 0, label 2
    assert eval_knn.knn_classifier(train, train_labels, query, torch.tensor([2]), 1, 0.07, 3) == (100., 100.)


# ----------------------------------------------------------------------------------------
# Feature extraction across processes
# ----------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def random_vit_tiny(tmp_path_factory):
    """A freshly initialised vit_tiny/16 backbone saved as a state dict (the untrained baseline)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp('random_vit') / 'vit_tiny_random.pth'
    torch.save(vits.vit_tiny(patch_size=16).state_dict(), path)
    return path


BROKEN = ('train/class0/004.png', 'val/class1/003.png')


@pytest.fixture
def broken_and_pruned(tmp_path, small_image_folder):
    """The small folder with two files made unreadable ('broken'), and without them ('pruned')."""
    import shutil
    for name in ('broken', 'pruned'):
        shutil.copytree(small_image_folder, tmp_path / name)
    for relative in BROKEN:
        (tmp_path / 'broken' / relative).write_bytes(b'not an image')
        (tmp_path / 'pruned' / relative).unlink()
    return tmp_path / 'broken', tmp_path / 'pruned'


def test_two_process_extraction_matches_one_process_and_dataset_order(tmp_path, capsys, random_vit_tiny,
                                                                     broken_and_pruned):
    """Two processes extract what one does, unreadable images left out as when the folder lacks them."""
    broken, pruned = broken_and_pruned
    common = ['--arch', 'vit_tiny', '--pretrained_weights', random_vit_tiny, '--batch_size_per_device', '3',
              '--nb_knn', '3', *CPU]
    expected = knn_results(run_inprocess(capsys, eval_knn, *common, '--data_path', pruned,
                                         '--dump_features', tmp_path / 'pruned'))
    eval_knn.main([str(a) for a in (*common, '--data_path', broken, '--dump_features', tmp_path / 'one')])
    one = capsys.readouterr()
    two = run_torchrun('eval_knn.py', 2, *common, '--data_path', broken, '--dump_features', tmp_path / 'two')
    # the k-NN search is shared out between the processes too, with the same result
    load = utils.load_checkpoint_or_exit
    for name, stdout in (('one', one.out), ('two', two.stdout)):
        assert knn_results(stdout) == expected and set(expected) == {3}
        for feature_file in eval_knn.FEATURE_FILES:  # the rows and labels of the folder without the files
            torch.testing.assert_close(load(tmp_path / name / feature_file), load(tmp_path / 'pruned' / feature_file),
                                       atol=1e-5, rtol=1e-4)
    assert [len(load(tmp_path / 'two' / name)) for name in ('trainlabels.pth', 'testlabels.pth')] == [10, 6]
    for output in (one.out + one.err, two.stdout + two.stderr):
        lines = output.splitlines()
        for relative in BROKEN:  # each file named once, then the count
            assert sum(line.startswith(f"warning: cannot read image {broken / relative}") for line in lines) == 1
        for split, others in (('train', 10), ('val', 6)):
            assert lines.count(f"warning: 1 unreadable image(s) of {split}/ skipped, left out of the evaluation: its "
                               f"figures are those of the other {others}") == 1

    # independently: the model applied image by image, in ImageFolder order, then L2-normalised
    from torchvision import datasets
    model = vits.vit_tiny(patch_size=16).eval()
    model.load_state_dict(torch.load(random_vit_tiny))
    folder = datasets.ImageFolder(pruned / 'val', transform=evaluation.center_crop_transform(224))
    with torch.no_grad():
        expected = F.normalize(torch.cat([model(img[None]) for img, _ in folder]), dim=1)
    torch.testing.assert_close(load(tmp_path / 'two' / 'testfeat.pth'), expected, atol=1e-5, rtol=1e-4)
    assert load(tmp_path / 'two' / 'testlabels.pth').tolist() == folder.targets


# ----------------------------------------------------------------------------------------
# End to end on synthetic data
# ----------------------------------------------------------------------------------------

def test_knn_end_to_end_on_synthetic_and_load_features(tmp_path, capsys, tiny_dino_checkpoint, random_vit_tiny):
    """eval_knn on the tiny DINO checkpoint and on a random backbone; --load_features reproduces the run.

    Both results are printed (pytest -s shows them). The fixture's short DINO run does not give
    the trained features a margin over random ones on this data, so no margin is asserted.
    """
    common = ['--arch', 'vit_tiny', '--data_path', 'synthetic', '--max_batches', '2', '--nb_knn', '10', '20', *CPU]
    trained = run_script('eval_knn.py', *common, '--pretrained_weights', tiny_dino_checkpoint,
                         '--dump_features', tmp_path / 'feats', '--dump_tb_events', tmp_path / 'tb')
    random = run_inprocess(capsys, eval_knn, *common, '--pretrained_weights', random_vit_tiny)
    trained_res, random_res = knn_results(trained.stdout), knn_results(random)
    with capsys.disabled():
        print(f"\nk-NN on synthetic (256 train / 256 val), top-1/top-5: trained {trained_res}, random {random_res}")
    for results in (trained_res, random_res):
        assert set(results) == {10, 20} and all(0 <= t1 <= t5 <= 100 for t1, t5 in results.values())

    # the features are those of the checkpoint's teacher on 64-pixel crops (resized to 73, bicubic)
    load = utils.load_checkpoint_or_exit
    train_feats, test_feats, train_labels, test_labels = [load(tmp_path / 'feats' / n) for n in eval_knn.FEATURE_FILES]
    assert train_feats.shape == test_feats.shape == (256, 192)
    assert train_labels.tolist() == [i % 10 for i in range(256)]
    teacher = {k.removeprefix('backbone.'): v for k, v in load(tiny_dino_checkpoint)['teacher'].items()
               if k.startswith('backbone.')}
    torch.testing.assert_close(test_feats[:6], synthetic_val_features(teacher, 73, 64, 6), atol=1e-5, rtol=1e-4)

    reloaded = run_inprocess(capsys, eval_knn, '--load_features', tmp_path / 'feats', '--nb_knn', '10', '20', *CPU)
    assert knn_results(reloaded) == trained_res
    assert eval_knn.knn_classifier(train_feats, train_labels, test_feats, test_labels, 20, 0.07) == \
        pytest.approx(trained_res[20], abs=1e-9)
    assert {p.name for p in (tmp_path / 'tb').iterdir()} == {'train_features', 'test_features', '10-NN', '20-NN'}


def synthetic_val_features(state_dict, resize, crop, count):
    """Independently: the first `count` 64-pixel synthetic val renders, short side resized to `resize` (bicubic),
    centre-cropped to `crop`, through a vit_tiny/16 with `state_dict`, L2-normalised."""
    from torchvision import transforms
    model = vits.vit_tiny(patch_size=16).eval()
    model.load_state_dict(state_dict)
    transform = transforms.Compose([
        transforms.Resize(resize, interpolation=transforms.InterpolationMode.BICUBIC), transforms.CenterCrop(crop),
        transforms.ToTensor(), transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    shapes = imagedata.SyntheticShapes('val', image_size=64)
    with torch.no_grad():
        return F.normalize(model(torch.stack([transform(shapes.render(i)) for i in range(count)])), dim=1)


def test_linear_eval_logs_resumes_and_evaluates(tmp_path, capsys, tiny_dino_checkpoint):
    """The plumbing: log, checkpoint, schedule, --evaluate and resuming (that the head learns is checked
    on separable features below)."""
    out = tmp_path / 'linear'
    common = ['--arch', 'vit_tiny', '--pretrained_weights', tiny_dino_checkpoint, '--data_path', 'synthetic',
              '--data_limit', '192', '--batch_size_per_device', '64', '--num_labels', '10', '--lr', '0.05',
              '--output_dir', out, *CPU]
    first = run_script('eval_linear.py', *common, '--epochs', '2')
    accs = [float(a) for a in re.findall(r'^\* Acc@1 ([\d.]+) Acc@5 [\d.]+ loss', first.stdout, re.M)]
    assert len(accs) == 2 and 'Top-1 test accuracy' in first.stdout
    logs = [json.loads(line) for line in (out / 'log.txt').read_text().splitlines()]
    assert [entry['epoch'] for entry in logs] == [0, 1]
    base_lr = 0.05 * 64 / 256
    # cosine to 0 over --epochs, stepped once per epoch
    assert [entry['train_lr'] for entry in logs] == pytest.approx([base_lr, base_lr / 2])
    assert [entry['test_acc1'] for entry in logs] == pytest.approx(accs, abs=1e-3)
    checkpoint = utils.load_checkpoint_or_exit(out / 'checkpoint.pth.tar')
    assert checkpoint['epoch'] == 2 and checkpoint['best_acc'] == pytest.approx(max(accs), abs=1e-3)
    assert checkpoint['state_dict']['module.linear.weight'].shape == (10, 4 * 192)

    # --evaluate reproduces the last validation of the saved head
    evaluated = run_inprocess(capsys, eval_linear, *common, '--evaluate')
    assert float(re.search(r'^\* Acc@1 ([\d.]+)', evaluated, re.M).group(1)) == pytest.approx(accs[-1])

    # a finished run resumes to nothing left to train, with its best accuracy restored
    resumed = run_inprocess(capsys, eval_linear, *common, '--epochs', '2')
    assert 'Found checkpoint' in resumed and 'Epoch: [' not in resumed
    assert f'Top-1 test accuracy: {max(accs):.1f}' in resumed
    assert len((out / 'log.txt').read_text().splitlines()) == 2


@pytest.fixture(scope='module')
def colour_folder(tmp_path_factory):
    """train/ (2 images per class) and val/ (1 per class) of 4 classes, each one plain colour: any crop of an
    image is the same picture, so a frozen network gives one feature vector per class (separable)."""
    from PIL import Image
    root = tmp_path_factory.mktemp('colours')
    for label, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200), (128, 128, 128)]):
        for split, count in (('train', 2), ('val', 1)):
            folder = root / split / f'class{label}'
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new('RGB', (40 + 8 * i, 32), colour).save(folder / f'{i}.png')
    return root


def test_linear_head_learns_separable_features_with_avgpool_one_block_and_val_freq(tmp_path, capsys,
                                                                                  random_vit_tiny, colour_folder):
    out = tmp_path / 'linear'
    run_inprocess(capsys, eval_linear, '--arch', 'vit_tiny', '--pretrained_weights', random_vit_tiny,
                  '--data_path', colour_folder, '--batch_size_per_device', '8', '--num_labels', '4', '--lr', '10',
                  '--epochs', '5', '--n_last_blocks', '1', '--avgpool_patchtokens', 'true', '--val_freq', '2',
                  '--output_dir', out, *CPU)
    logs = [json.loads(line) for line in (out / 'log.txt').read_text().splitlines()]
    # the head learns: the loss falls from log(4) (untrained head), and every class is told apart (chance: 25%)
    assert logs[0]['train_loss'] == pytest.approx(math.log(4), abs=0.05)
    assert logs[-1]['train_loss'] < 0.3 * logs[0]['train_loss'] and logs[-1]['test_acc1'] == 100.
    # --val_freq 2: validated at epochs 0, 2 and at the last one
    assert [entry['epoch'] for entry in logs if 'test_acc1' in entry] == [0, 2, 4]
    # --n_last_blocks 1 --avgpool_patchtokens: [CLS] and mean patch token of the last block, interleaved
    head = utils.load_checkpoint_or_exit(out / 'checkpoint.pth.tar')['state_dict']
    assert head['module.linear.weight'].shape == (4, 384)
    model = vits.vit_tiny(patch_size=16).eval()
    model.load_state_dict(torch.load(random_vit_tiny))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens = model.prepare_tokens(x)
        for block in model.blocks:
            tokens = block(tokens)
        tokens = model.norm(tokens)
        features = eval_linear.frozen_features(model, x, 1, True)
    torch.testing.assert_close(features[:, 0::2], tokens[:, 0])
    torch.testing.assert_close(features[:, 1::2], tokens[:, 1:].mean(1))


# ----------------------------------------------------------------------------------------
# Evaluation size: --resize and --crop_size
# ----------------------------------------------------------------------------------------

def parsed(script, *argv):
    parser = argparse.ArgumentParser(parents=[script.get_args_parser()])
    return utils.parse_checked_args(parser, script.check_args, [str(a) for a in argv])


def test_default_sizes_are_the_originals_and_a_checkpoint_names_its_training_size(tmp_path, capsys,
                                                                                 small_image_folder):
    for script, extra in ((eval_knn, []), (eval_linear, ['--output_dir', tmp_path])):
        args = parsed(script, '--data_path', small_image_folder, *extra)
        assert (args.resize, args.crop_size) == (256, 224)  # the original's Resize(256), CenterCrop(224)
        args = parsed(script, '--data_path', 'synthetic', *extra)
        assert (args.resize, args.crop_size) == (73, 64)
        assert parsed(script, '--crop_size', 96, '--data_path', small_image_folder, *extra).resize == 109
    parsed(eval_knn, '--crop_size', 40, '--data_path', small_image_folder)
    assert capsys.readouterr().err.splitlines() == ["warning: --crop_size 40 is not a multiple of --patch_size 16: "
                                                    "the ViT ignores the last 8 pixel rows and columns"]
    checkpoint = tmp_path / 'checkpoint.pth'
    torch.save({'teacher': {}, 'args': argparse.Namespace(arch='vit_tiny', patch_size=16, global_crops_size=64)},
               checkpoint)
    capsys.readouterr()
    args = parsed(eval_knn, '--pretrained_weights', checkpoint, '--data_path', small_image_folder)
    assert (args.resize, args.crop_size) == (256, 224)  # suggested, not taken
    assert (f"Evaluating at --resize 256 --crop_size 224; {checkpoint} was trained on 64-pixel global crops: "
            "pass --crop_size 64 to evaluate at that size") in capsys.readouterr().out.splitlines()
    args = parsed(eval_linear, '--pretrained_weights', checkpoint, '--data_path', small_image_folder,
                  '--crop_size', 64, '--resize', 64, '--output_dir', tmp_path)
    assert (args.resize, args.crop_size) == (64, 64) and 'global crops' not in capsys.readouterr().out


def test_knn_at_32_pixels_extracts_features_of_32_pixel_crops(tmp_path, capsys, random_vit_tiny):
    common = ['--arch', 'vit_tiny', '--pretrained_weights', random_vit_tiny, '--data_path', 'synthetic',
              '--max_batches', '1', '--batch_size_per_device', '8', '--nb_knn', '5', *CPU]
    run_inprocess(capsys, eval_knn, *common, '--dump_features', tmp_path / 'default')
    run_inprocess(capsys, eval_knn, *common, '--resize', '32', '--crop_size', '32', '--dump_features', tmp_path / '32')
    default, small = (utils.load_checkpoint_or_exit(tmp_path / name / 'testfeat.pth') for name in ('default', '32'))
    assert (default - small).abs().max() > 0.1

    expected = synthetic_val_features(torch.load(random_vit_tiny), 32, 32, 8)
    torch.testing.assert_close(small, expected, atol=1e-5, rtol=1e-4)


def test_linear_trains_and_validates_at_the_crop_size(tmp_path, capsys, monkeypatch, random_vit_tiny):
    from torchvision import transforms
    built = {}
    build_eval_split = evaluation.build_eval_split

    def recording(data_path, split, transform=None):
        built[split] = [t for t in transform.transforms if not isinstance(t, (transforms.ToTensor,
                                                                               transforms.Normalize))]
        return build_eval_split(data_path, split, transform)
    monkeypatch.setattr(evaluation, 'build_eval_split', recording)
    run_inprocess(capsys, eval_linear, '--arch', 'vit_tiny', '--pretrained_weights', random_vit_tiny, '--data_path',
                  'synthetic', '--data_limit', '8', '--batch_size_per_device', '8', '--num_labels', '10',
                  '--epochs', '1', '--resize', '40', '--crop_size', '32', '--output_dir', tmp_path, *CPU)
    resize, crop = built['val']
    assert (resize.size, resize.interpolation, crop.size) == (40, transforms.InterpolationMode.BICUBIC, (32, 32))
    random_crop, flip = built['train']
    assert random_crop.size == (32, 32) and random_crop.scale == (0.08, 1.0) and flip.p == 0.5


# ----------------------------------------------------------------------------------------
# Unreadable images: left out of the evaluations, as training skips them
# ----------------------------------------------------------------------------------------

def test_linear_eval_leaves_unreadable_images_out(tmp_path, capsys, random_vit_tiny, broken_and_pruned):
    broken, pruned = broken_and_pruned
    common = ['--arch', 'vit_tiny', '--pretrained_weights', random_vit_tiny, '--crop_size', '32', '--num_labels', '2',
              '--batch_size_per_device', '4', '--epochs', '1', '--output_dir', tmp_path / 'head', *CPU]
    trained = run_inprocess(capsys, eval_linear, *common, '--data_path', pruned)
    accuracy = re.compile(r'^\* Acc@1 [\d.]+ loss [\d.]+$', re.M)
    expected = accuracy.search(trained).group(0)  # the saved head's, on the 6 readable val images
    out = run_inprocess(capsys, eval_linear, *common, '--data_path', broken, '--evaluate')
    assert accuracy.search(out).group(0) == expected and 'on the 6 test images' in out
    # training on it: the unreadable image weighs nothing in its batch's loss (readable_loss), and is counted
    eval_linear.main([str(a) for a in (*common, '--data_path', broken, '--output_dir', tmp_path / 'head2')])
    trained = capsys.readouterr()
    assert 'warning: epoch 0: 1 unreadable training image(s) skipped, left out of the loss' in trained.err
    assert 'Accuracy at epoch 0 of the network on the 6 test images' in trained.out


@pytest.mark.parametrize('cached', [True, False])
def test_training_knn_monitor_leaves_unreadable_images_out(tmp_path, capsys, monkeypatch, broken_and_pruned, cached):
    if not cached:
        monkeypatch.setattr(evaluation.KnnMonitor, 'CACHE_BYTES', 0)
    torch.manual_seed(0)
    backbone = vits.vit_tiny(patch_size=16)
    top1 = {}
    for folder in broken_and_pruned:
        args = argparse.Namespace(global_crops_size=32, knn_data=str(folder), knn_limit=100, knn_every=1, epochs=1,
                                  output_dir=str(tmp_path), num_workers=0)
        monitor = evaluation.KnnMonitor(args, torch.device('cpu'), steps=10)
        assert monitor.cached == cached
        top1[folder.name] = [monitor.measure(backbone) for _ in range(2)]
    assert top1['broken'] == top1['pruned'] and len(set(top1['broken'])) == 1
    warnings = [line for line in capsys.readouterr().out.splitlines() if line.startswith('warning')]
    assert len(warnings) == 2 and all('left out of the k-NN monitor' in line for line in warnings)


def test_readable_loss_is_the_cross_entropy_of_the_readable_rows():
    torch.manual_seed(0)
    output, target = torch.randn(5, 3), torch.tensor([0, 2, 1, 1, 0])
    skipped = torch.tensor([-1, 1, -1, 3, -1])
    readable = [0, 2, 4]
    assert torch.allclose(eval_linear.readable_loss(output, target, skipped),
                          F.cross_entropy(output[readable], target[readable]))
    assert torch.equal(eval_linear.readable_loss(output, target, torch.full((5,), -1)), F.cross_entropy(output, target))
    nothing = eval_linear.readable_loss(output.requires_grad_(), target, torch.arange(5))
    nothing.backward()
    assert nothing.item() == 0 and not output.grad.any()


# ----------------------------------------------------------------------------------------
# Bad input: one line, non-zero exit
# ----------------------------------------------------------------------------------------

def test_bad_input_gives_one_clear_line(tmp_path, random_vit_tiny, small_image_folder):
    # on the command line: exit status 1 and the message as the only line on stderr, no traceback
    (tmp_path / 'only_val' / 'val' / 'a').mkdir(parents=True)
    proc = run_script('eval_knn.py', '--data_path', tmp_path / 'only_val', *CPU, check=False)
    assert proc.returncode == 1 and 'Traceback' not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: --data_path {tmp_path / 'only_val'} has no train/ folder; it must hold train/ and val/ "
        "ImageFolders (one sub-folder of images per class), or be 'synthetic' or 'fashion-mnist'"]

    knn = ['--arch', 'vit_tiny', '--pretrained_weights', random_vit_tiny, '--data_path', small_image_folder, *CPU]
    assert '--nb_knn 20' in inprocess_error(eval_knn, *knn, '--nb_knn', '10', '20')
    assert '11 training images' in inprocess_error(eval_knn, *knn, '--nb_knn', '10', '20')
    assert 'does not match --arch vit_small' in inprocess_error(eval_knn, *knn, '--arch', 'vit_small', '--nb_knn', '3')
    message = inprocess_error(eval_knn, '--load_features', tmp_path, *CPU)
    assert 'trainfeat.pth' in message and '--dump_features' in message
    image = (small_image_folder / 'val' / 'class0' / '000.png').read_bytes()
    for split, classes in (('train', ['class0', 'class1']), ('val', ['class0', 'class2'])):
        for name in classes:
            (tmp_path / 'other_classes' / split / name).mkdir(parents=True)
            (tmp_path / 'other_classes' / split / name / 'x.png').write_bytes(image)
    message = inprocess_error(eval_knn, *knn, '--data_path', tmp_path / 'other_classes', '--nb_knn', '1')
    assert 'train/ and val/ do not hold the same class folders' in message and 'class1, class2' in message

    linear = ['--arch', 'vit_tiny', '--pretrained_weights', random_vit_tiny, '--output_dir', tmp_path / 'lin', *CPU]
    message = inprocess_error(eval_linear, *linear, '--patch_size', '8', '--data_path', 'synthetic')
    assert 'does not match' in message and '--patch_size 8' in message
    message = inprocess_error(eval_linear, *linear, '--data_path', small_image_folder, '--num_labels', '1')
    assert '--num_labels 1' in message and '2 classes' in message


# ----------------------------------------------------------------------------------------
# torch.hub entry points
# ----------------------------------------------------------------------------------------

def test_hub_entry_points_offline(monkeypatch):
    model = torch.hub.load(str(REPO), 'dino_vits16', source='local', pretrained=False)
    assert model.embed_dim == 384 and model.patch_embed.patch_size == 16
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 384)
    resnet = torch.hub.load(str(REPO), 'dino_resnet50', source='local', pretrained=False)
    assert resnet(torch.zeros(2, 3, 32, 32)).shape == (2, 2048)

    # pretrained=True: the released file at the original URL is loaded strictly into the model
    released = model.state_dict()
    urls = []
    monkeypatch.setattr(torch.hub, 'load_state_dict_from_url', lambda url, **kw: urls.append(url) or released)
    reloaded = torch.hub.load(str(REPO), 'dino_vits16', source='local', pretrained=True)
    assert urls == ['https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth']
    for name, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, released[name])

    def offline(url, **kwargs):
        raise OSError('<urlopen error [Errno -3] Temporary failure in name resolution>')
    monkeypatch.setattr(torch.hub, 'load_state_dict_from_url', offline)
    for entry in ('dino_vits8', 'dino_vitb16', 'dino_vitb8', 'dino_resnet50'):
        with pytest.raises(RuntimeError, match=f'{entry}: could not download.*pretrained=False'):
            torch.hub.load(str(REPO), entry, source='local', pretrained=True)
