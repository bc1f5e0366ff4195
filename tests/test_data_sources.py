"""--data_path for training: a folder of images at any depth, a text file listing images, or an ImageFolder."""
import builtins
import json
import math
import signal

import numpy as np
import pytest
import torch
from torchvision import datasets

import checkpoints
import imagedata
import main_dino
import utils
from test_robustness import RUN_ARGS, assert_same_run, killed, noise_image, save, train


def touch(root, *names):
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b'')


def write_images(root, *names):
    rng = np.random.default_rng(len(names))
    for name in names:
        save(noise_image(rng, (12, 12)), root / name)


@pytest.fixture
def train_here(monkeypatch, capsys):
    """Train in this process (faster than a subprocess) on one thread; returns the printed output."""
    monkeypatch.setattr(builtins, 'print', builtins.print)  # start_run replaces it
    handlers = {signum: signal.getsignal(signum) for signum in checkpoints.StopSignal.SIGNALS}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def run(out, *extra):
        args = main_dino.get_args_parser().parse_args([*map(str, RUN_ARGS), '--output_dir', str(out),
                                                       '--epochs', '1', *map(str, extra)])
        main_dino.check_args(args)
        out.mkdir(parents=True, exist_ok=True)
        main_dino.train_dino(args)
        return capsys.readouterr().out

    yield run
    torch.set_num_threads(threads)
    for signum, handler in handlers.items():
        signal.signal(signum, handler)


def epochs_logged(out):
    lines = [json.loads(line) for line in (out / 'log.txt').read_text().splitlines()]
    assert all(math.isfinite(line['train_loss']) for line in lines)
    return [line['epoch'] for line in lines]


# ----------------------------------------------------------------------------- listing

def test_a_nested_folder_gives_every_image_once_in_a_fixed_order_despite_link_loops(tmp_path):
    root = tmp_path / 'photos'
    touch(root, 'top.JPG', 'b.jpeg', 'notes.txt', '2026/cam1/x.png', '2026/cam1/y.WebP', '2026/cam2/z.tif',
          '2026/cam2/anim.gif', '2026/cam2/readme.md', '2026/cam-2/w.bmp', '2026/empty/.keep')
    touch(tmp_path, 'elsewhere/o.png')
    (root / 'linked').symlink_to(tmp_path / 'elsewhere')  # followed
    (root / '2026' / 'cam1' / 'back').symlink_to(root / '2026')  # a loop: listed once
    (root / '2026' / 'again').symlink_to(root / '2026' / 'cam2')  # a second way in: listed once

    dataset, description = imagedata.build_training_images(str(root))
    expected = ['b.jpeg', 'top.JPG', '2026/cam-2/w.bmp', '2026/cam1/x.png', '2026/cam1/y.WebP',
                '2026/cam2/anim.gif', '2026/cam2/z.tif', 'linked/o.png']
    assert dataset.paths == [str(root / name) for name in expected]
    assert description == f"folder of images {root}: 8 images, found at any depth (2 at its top level)"


def test_an_imagefolder_keeps_torchvision_order(tmp_path):
    root = tmp_path / 'train'
    names = ['n1/a.JPEG', 'n1/x/b.png', 'n1/x-y/c.jpg', 'n1/x/z/d.jpg', 'n1/x.y/e.tif', 'n1-b/f.jpg', 'N2/g.jpg',
             'n1/.jpg', 'n1/h.txt', 'n3 c/i.bmp', 'n3 c/j.ppm']
    touch(root, *names)
    dataset, description = imagedata.build_training_images(str(root))
    assert dataset.paths == [path for path, _ in datasets.ImageFolder(str(root)).samples]
    assert description == f"ImageFolder {root}: 10 images in 4 class folders (labels unused)"

    touch(root, 'n1-b/k.gif')  # Pillow reads it, ImageFolder skips it: included, and said so
    dataset, description = imagedata.build_training_images(str(root))
    assert str(root / 'n1-b' / 'k.gif') in dataset.paths and len(dataset) == 11
    assert "1 of them of types torchvision's ImageFolder skips (.gif)" in description


def test_a_list_file_reads_relative_and_absolute_paths_and_skips_comments(tmp_path):
    write_images(tmp_path / 'data', 'a.png', 'sub/b.jpg')
    (tmp_path / 'data' / 'list.txt').write_text(
        f"# my images\na.png\n\n  sub/b.jpg  \n{tmp_path / 'data' / 'a.png'}\nmissing.jpg\r\n")
    dataset, description = imagedata.build_training_images(str(tmp_path / 'data' / 'list.txt'))
    assert dataset.paths == [str(tmp_path / 'data' / name) for name in ('a.png', 'sub/b.jpg', 'a.png', 'missing.jpg')]
    assert description == f"list file {tmp_path / 'data' / 'list.txt'}: 4 images listed"
    with pytest.raises(utils.DataError, match='missing.jpg'):  # --strict_data stops there
        imagedata.ReproducibleSamples(dataset, seed=0, strict=True)[(0, 3)]
    assert dataset[1][0].size == (12, 12)


# ----------------------------------------------------------------------------- training

def test_one_epoch_from_a_nested_tree_a_list_file_and_an_imagefolder(tmp_path, train_here):
    tree = tmp_path / 'tree'
    write_images(tree, *[f'top{i}.jpg' for i in range(4)], *[f'2026/cam{i % 2}/{i}.png' for i in range(12)])
    output = train_here(tmp_path / 'out_tree', '--data_path', tree)
    assert f"Data source: folder of images {tree}: 16 images, found at any depth (4 at its top level)" in output
    assert "Data loaded: there are 16 images." in output and epochs_logged(tmp_path / 'out_tree') == [0]

    listed = tmp_path / 'listed.txt'
    entries = [f'tree/2026/cam{i % 2}/{i}.png' for i in range(12)] + ['tree/gone.jpg', 'tree/top0.jpg', 'tree/top1.jpg',
                                                                     'tree/top2.jpg']
    listed.write_text('# 15 images and a missing one\n' + '\n'.join(entries))
    output = train_here(tmp_path / 'out_list', '--data_path', listed)
    assert f"Data source: list file {listed}: 16 images listed" in output
    assert f"warning: cannot read image {tmp_path / 'tree' / 'gone.jpg'}" in output
    assert "Epoch 0: 1 unreadable image(s) skipped" in output and epochs_logged(tmp_path / 'out_list') == [0]

    imagefolder = tree / '2026'
    output = train_here(tmp_path / 'out_imagefolder', '--data_path', imagefolder)
    assert f"Data source: ImageFolder {imagefolder}: 12 images in 2 class folders (labels unused)" in output
    assert epochs_logged(tmp_path / 'out_imagefolder') == [0]


def test_a_flat_folder_resumes_exactly_after_a_kill(tmp_path):
    flat = tmp_path / 'flat'
    write_images(flat, *[f'img{i:02d}.{"jpg" if i % 3 else "PNG"}' for i in range(24)])  # 3 iterations an epoch
    reference = train(tmp_path / 'reference', '--data_path', flat)
    assert f"Data source: folder of images {flat}: 24 images, found at any depth (24 at its top level)" in (
        reference.stdout)
    proc = train(tmp_path / 'out', '--data_path', flat, fault='step:5:kill', check=False)  # in epoch 1
    assert killed(proc)
    train(tmp_path / 'out', '--data_path', flat)
    assert_same_run(tmp_path / 'out', tmp_path / 'reference')


def test_unusable_data_paths_are_one_clear_line(tmp_path):
    write_images(tmp_path, 'photo.jpg')
    (tmp_path / 'empty').mkdir()
    (tmp_path / 'archive.tar').write_bytes(bytes(range(256)))
    (tmp_path / 'comments.txt').write_text('# nothing yet\n\n')
    for path, message in [('nowhere', 'is not a folder or a file'), ('empty', 'holds no image files'),
                          ('photo.jpg', 'is an image; pass the folder'), ('archive.tar', 'not UTF-8 text'),
                          ('comments.txt', 'lists no image paths')]:
        with pytest.raises(SystemExit, match=f'^error: --data_path {tmp_path / path} .*{message}'):
            imagedata.build_training_images(str(tmp_path / path))
