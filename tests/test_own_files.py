"""Nothing a user owns is overwritten, and a resumed run is exactly the run its folder holds, or refused.

Every damage case compares the folder's files (their hashes) before and after: a refused command changes nothing.
"""
import argparse
import json
import os
import re
import shutil

import pytest
import numpy as np
import torch
from PIL import Image

import eval_linear
import evaluation
import imagedata
import main_dino
import utils
import visualize_attention
from conftest import TINY_TRAIN_ARGS, process_state_kept, run_torchrun
from test_bad_input import tree_state

# 2 iterations of 8 images per epoch, 2 epochs: checkpoint0000.pth (after epoch 0), checkpoint0001.pth, checkpoint.pth
ARGS = [*TINY_TRAIN_ARGS, '--global_crops_size', '32', '--local_crops_size', '16', '--out_dim', '64',
        '--batch_size_per_device', '8', '--data_limit', '16', '--epochs', '2', '--saveckp_freq', '1']


def dino(*argv):
    """main_dino.main(argv) in this process: its exit message ('' when it ends normally)."""
    with process_state_kept():
        try:
            main_dino.main([str(a) for a in argv])
        except SystemExit as stop:
            return stop.code if isinstance(stop.code, str) else f'exit {stop.code}'
    return ''


def error_line(*argv):
    message = dino(*argv)
    assert message.startswith('error: ') and '\n' not in message, message
    return message


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp('finished')
    assert dino(*ARGS, '--output_dir', out) == ''
    return out


def copy_of(run, tmp_path, *names):
    out = tmp_path / 'run'
    out.mkdir()
    for name in names:
        shutil.copy2(run / name, out / name)
    return out


def logged_epochs(out):
    return [json.loads(line)['epoch'] for line in (out / 'log.txt').read_text().splitlines()]


def test_a_missing_checkpoint_pth_resumes_from_the_newest_numbered_one_and_keeps_the_earlier_files(
        finished_run, tmp_path, capsys):
    """checkpoint.pth deleted (or never copied back): the run goes on from checkpoint0000.pth (epoch 1), not epoch 0."""
    out = copy_of(finished_run, tmp_path, 'checkpoint0000.pth', 'log.txt')
    before = tree_state(out)
    assert dino(*ARGS, '--output_dir', out) == ''
    assert f"{out / 'checkpoint.pth'} is missing. Resuming from {out / 'checkpoint0000.pth'}" in capsys.readouterr().out
    after = tree_state(out)
    assert after['checkpoint0000.pth'] == before['checkpoint0000.pth']
    assert (out / 'log.txt').read_text().splitlines()[0] == (finished_run / 'log.txt').read_text().splitlines()[0]
    assert logged_epochs(out) == [0, 1]


def test_an_earlier_runs_log_without_any_checkpoint_is_not_replaced(finished_run, tmp_path):
    out = copy_of(finished_run, tmp_path, 'log.txt')
    before = tree_state(out)
    message = error_line(*ARGS, '--output_dir', out)
    assert 'holds 2 epochs of an earlier training run' in message and '--overwrite' in message
    assert tree_state(out) == before


def test_only_damaged_numbered_checkpoints_stop_the_run_with_one_line(finished_run, tmp_path):
    out = copy_of(finished_run, tmp_path, 'log.txt')
    (out / 'checkpoint0001.pth').write_bytes((finished_run / 'checkpoint0001.pth').read_bytes()[:1000])
    before = tree_state(out)
    message = error_line(*ARGS, '--output_dir', out)
    assert f"{out / 'checkpoint.pth'} is missing, and no intact numbered checkpoint" in message
    assert tree_state(out) == before


def test_a_finished_run_says_so_and_writes_nothing(finished_run, capsys):
    before = tree_state(finished_run)
    assert dino(*ARGS, '--output_dir', finished_run) == ''
    assert 'Training is finished' in capsys.readouterr().out
    assert tree_state(finished_run) == before  # no new TensorBoard events file either


@pytest.mark.parametrize('change, expected', [
    (['--epochs', '3'], 'was trained with --epochs 2, not 3'),
    (['--batch_size_per_device', '4'], 'global batch of 8 (8 per device x 1 process(es)), not 4'),
    (['--data_limit', '24'], 'was trained with --data_limit 16, not 24'),
])
def test_a_resume_with_other_settings_is_refused_with_one_line(finished_run, tmp_path, change, expected):
    out = copy_of(finished_run, tmp_path, 'checkpoint0000.pth', 'log.txt')
    (out / 'checkpoint0000.pth').rename(out / 'checkpoint.pth')
    before = tree_state(out)
    assert expected in error_line(*ARGS, *change, '--output_dir', out)
    assert tree_state(out) == before


def test_a_resume_on_other_data_is_refused(finished_run, tmp_path, small_image_folder):
    out = copy_of(finished_run, tmp_path, 'checkpoint0000.pth', 'log.txt')
    (out / 'checkpoint0000.pth').rename(out / 'checkpoint.pth')
    before = tree_state(out)
    message = error_line(*ARGS, '--data_path', small_image_folder / 'train', '--output_dir', out)
    assert 'was trained on --data_path synthetic, not ' in message
    assert tree_state(out) == before


def test_training_without_output_dir_writes_outside_the_current_folder(tmp_path, monkeypatch, capsys):
    here, home = tmp_path / 'here', tmp_path / 'home'
    here.mkdir()
    (here / 'log.txt').write_text('my notes\n')
    monkeypatch.chdir(here)
    monkeypatch.setenv('HOME', str(home))
    before = tree_state(here)
    assert dino(*ARGS, '--epochs', '1', '--data_limit', '8') == ''
    assert f"Output folder: {home / 'dino_output'}" in capsys.readouterr().out
    assert tree_state(here) == before
    assert (home / 'dino_output' / 'checkpoint.pth').is_file()


def test_a_resume_with_another_number_of_processes_and_the_same_global_batch_is_allowed(monkeypatch, capsys):
    args = argparse.Namespace(data_path='synthetic', data_limit=16, data_images=16, batch_size_per_device=8,
                              epochs=2, accum_steps=1)
    saved = dict(vars(args), batch_size_per_device=4, world_size=2)
    main_dino.check_same_run(args, saved, 'checkpoint.pth', start_step=1)
    assert 'written by 2 process(es), this run has 1' in capsys.readouterr().out
    with pytest.raises(SystemExit, match='global batch of 16'):
        main_dino.check_same_run(args, dict(saved, batch_size_per_device=8), 'checkpoint.pth', start_step=1)
    # 2 processes x 2 micro-batches of 2 is the same global batch; --accum_steps counts either way
    main_dino.check_same_run(args, dict(saved, batch_size_per_device=2, accum_steps=2), 'checkpoint.pth', 1)
    with pytest.raises(SystemExit, match=r'global batch of 8 \(4 per device x 2 process\(es\)\), not 16'):
        main_dino.check_same_run(argparse.Namespace(**dict(vars(args), accum_steps=2)), saved, 'checkpoint.pth', 1)
    with pytest.raises(SystemExit, match=r'global batch of 4 \(2 per device x 2 --accum_steps x 1 process\(es\)\), '
                                         r'not 8'):
        main_dino.check_same_run(args, dict(saved, batch_size_per_device=2, accum_steps=2, world_size=1),
                                 'checkpoint.pth', 1)


# ---------------------------------------------------------------------------------------------
# Scripts writing into a folder of the user's (default '.'): never over a file no run wrote
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp('weights') / 'vit_tiny16.pth'
    torch.save(utils.build_backbone('vit_tiny', 16)[0].state_dict(), path)
    return path


def test_visualize_attention_keeps_a_users_file_of_the_same_name_and_replaces_its_own(tmp_path, weights,
                                                                                       monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default --output_dir '.'
    Image.new('RGB', (40, 30), (200, 30, 30)).save(tmp_path / 'img.png')  # the user's own picture
    argv = ['--arch', 'vit_tiny', '--patch_size', '16', '--device', 'cpu', '--pretrained_weights', weights,
            '--image_size', '32']
    before = tree_state(tmp_path)
    with process_state_kept(), pytest.raises(SystemExit) as stop:
        visualize_attention.main(list(map(str, argv)))
    assert stop.value.code == (f"error: --output_dir . holds img.png, which this run would replace but no run of "
                               "this repository wrote; pass another --output_dir, or --overwrite to replace them")
    assert tree_state(tmp_path) == before

    (tmp_path / 'img.png').unlink()
    with process_state_kept():
        visualize_attention.main(list(map(str, argv)))  # writes img.png, attn-head0..2.png
        visualize_attention.main(list(map(str, argv)))  # its own files: replaced without a word
    (tmp_path / 'attn-head1.png').write_bytes(b'edited by the user')
    with process_state_kept(), pytest.raises(SystemExit, match='holds attn-head1.png, which'):
        visualize_attention.main(list(map(str, argv)))
    with process_state_kept():
        visualize_attention.main(list(map(str, argv + ['--overwrite'])))
    assert Image.open(tmp_path / 'attn-head1.png').size[1] == 32  # a PNG again


# ---------------------------------------------------------------------------------------------
# eval_linear: a saved head belongs to its backbone, evaluation size and training flags
# ---------------------------------------------------------------------------------------------

def test_eval_linear_continues_only_its_own_head_and_evaluates_it_only_on_its_backbone(tmp_path, weights, capsys):
    other = tmp_path / 'other.pth'
    torch.save({k: v + 0.01 for k, v in torch.load(weights).items()}, other)
    out = tmp_path / 'linear'
    common = ['--arch', 'vit_tiny', '--patch_size', '16', '--device', 'cpu', '--data_path', 'synthetic',
              '--data_limit', '16', '--batch_size_per_device', '8', '--num_labels', '10', '--num_workers', '0',
              '--epochs', '1', '--crop_size', '32', '--resize', '32', '--output_dir', out]

    def linear(*argv):
        with process_state_kept():
            eval_linear.main(list(map(str, [*common, *argv])))
        return capsys.readouterr().out

    linear('--pretrained_weights', weights)
    before = tree_state(out)
    for argv in (['--pretrained_weights', other, '--lr', '0.01'], ['--pretrained_weights', weights, '--lr', '0.01'],
                 ['--pretrained_weights', other, '--evaluate']):
        with pytest.raises(SystemExit) as stop:
            linear(*argv)
        assert stop.value.code.startswith(f"error: {out / 'checkpoint.pth.tar'} holds a linear head of other "
                                          "inputs: ") and '\n' not in stop.value.code
        assert ('the backbone sha256' in stop.value.code) == (argv[1] == other)
        assert tree_state(out) == before
    assert 'is already trained' in linear('--pretrained_weights', weights)
    assert 'Acc@1' in linear('--pretrained_weights', weights, '--evaluate')
    assert tree_state(out) == before


# ---------------------------------------------------------------------------------------------
# Paths: `~` and environment variables, the same in every path flag of every script
# ---------------------------------------------------------------------------------------------

def test_every_path_flag_of_every_script_expands_home_and_environment_variables(monkeypatch):
    import importlib
    monkeypatch.setenv('HOME', '/home/someone')
    monkeypatch.setenv('DATASETS', '/mnt/data')
    scripts = ['main_dino', 'benchmark', 'eval_knn', 'eval_linear', 'eval_copy_detection', 'eval_image_retrieval',
               'eval_video_segmentation', 'visualize_attention', 'video_generation', 'tools.export_backbone']
    checked = set()
    for name in scripts:
        for action in importlib.import_module(name).get_args_parser()._actions:
            if action.type in (int, float, utils.bool_flag):  # e.g. --drop_path_rate
                continue
            if any(word in action.dest for word in ('path', 'dir', 'weights', 'features', 'events', 'hmp')):
                assert action.type is not None, f"{name} {action.option_strings[0]}"
                assert action.type('~/x/$DATASETS/y') == '/home/someone/x//mnt/data/y', f"{name} {action.dest}"
                checked.add(action.dest)
    assert {'data_path', 'output_dir', 'pretrained_weights', 'load_features', 'image_path', 'input_path',
            'output_path', 'whitening_path', 'hmp_bf16'} <= checked


def test_an_error_under_torchrun_is_printed_once_and_every_rank_exits_with_status_1(tmp_path):
    proc = run_torchrun('main_dino.py', 2, *ARGS, '--lr', '-1', '--output_dir', tmp_path / 'out', check=False)
    assert proc.stderr.count('error: --lr must be positive, got -1.0') == 1, proc.stderr[-2000:]
    # a rank that is slower to find it may be stopped by torchrun first (SIGTERM, -15); none exits otherwise
    codes = re.findall(r'exitcode\s*:\s*(-?\d+)', proc.stderr)
    assert proc.returncode == 1 and '1' in codes and set(codes) <= {'1', '-15'}, codes
    assert not (tmp_path / 'out').exists()


# ---------------------------------------------------------------------------------------------
# Data layouts that are almost certainly mistakes
# ---------------------------------------------------------------------------------------------

def image_tree(root, *relative_paths):
    for relative in relative_paths:
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.new('RGB', (40, 30), (200, 30, 30)).save(root / relative)
    return root


def test_training_on_the_parent_of_train_and_val_is_refused(tmp_path):
    root = image_tree(tmp_path, 'train/cat/0.png', 'train/dog/1.png', 'val/cat/2.png', 'val/dog/3.png')
    with pytest.raises(SystemExit) as stop:
        imagedata.build_training_images(str(root))
    assert stop.value.code == (f"error: --data_path {root} holds train/ and val/: training on it would also train "
                               f"on the val images; pass --data_path {root / 'train'}")
    assert len(imagedata.build_training_images(str(root / 'train'))[0]) == 2


def test_hidden_folders_are_neither_training_images_nor_classes(tmp_path, capsys):
    root = image_tree(tmp_path, 'cat/0.png', 'dog/1.png', '.ipynb_checkpoints/0-checkpoint.png', 'dog/.thumbs/1.png')
    images, _ = imagedata.build_training_images(str(root))
    assert len(images) == 2
    assert 'warning: 2 hidden folder(s) under' in capsys.readouterr().err
    assert imagedata.build_image_folder(str(root)).classes == ['cat', 'dog']
    assert 'not taken as classes (.ipynb_checkpoints)' in capsys.readouterr().err


def test_images_of_formats_not_read_are_counted_with_what_to_do(tmp_path, capsys):
    root = image_tree(tmp_path, 'cat/0.png', 'dog/1.png')
    for name in ('cat/2.HEIC', 'cat/3.heic', 'dog/4.jxl', 'dog/5.gif', 'dog/notes.txt', 'dog/labels.json'):
        (root / name).write_bytes(b'x')
    images, _ = imagedata.build_training_images(str(root))  # reads what Pillow reads (.gif)
    assert len(images) == 3
    assert capsys.readouterr().err.splitlines() == [
        f"warning: {root}: 3 image file(s) left out, of formats not read here: .heic (2), .jxl (1); convert them to "
        "JPEG or PNG to use them (e.g. with Pillow and its pillow-heif plugin, or ImageMagick: magick mogrify -format "
        "jpg *.heic)"]
    assert len(imagedata.build_image_folder(str(root))) == 2  # torchvision's ImageFolder's extensions only
    assert '4 image file(s) left out, of formats not read here: .gif (1), .heic (2), .jxl (1)' in \
        capsys.readouterr().err
    image_tree(tmp_path / 'plain', 'cat/0.png', 'dog/1.jpg')
    imagedata.build_training_images(str(tmp_path / 'plain'))
    imagedata.build_image_folder(str(tmp_path / 'plain'))
    assert capsys.readouterr().err == ''


def test_an_unreadable_class_folder_is_named_with_the_cause(tmp_path, monkeypatch):
    root = image_tree(tmp_path, 'cat/0.png', 'dog/1.png')
    scandir = os.scandir

    def denied(path):  # what a folder without read permission gives a user who is not root
        if os.fspath(path).endswith('dog'):
            raise PermissionError(13, 'Permission denied', os.fspath(path))
        return scandir(path)
    monkeypatch.setattr(os, 'scandir', denied)
    with pytest.raises(SystemExit) as stop:
        imagedata.build_image_folder(str(root))
    assert stop.value.code == (f"error: --data_path {root}: the class folder dog cannot be read (permission denied); "
                               "make it readable, or move it out")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a folder without read permission")
def test_a_class_folder_without_read_permission_is_named(tmp_path):
    root = image_tree(tmp_path, 'cat/0.png', 'dog/1.png')
    (root / 'dog').chmod(0)
    try:
        with pytest.raises(SystemExit, match='the class folder dog cannot be read [(]permission denied[)]'):
            imagedata.build_image_folder(str(root))
    finally:
        (root / 'dog').chmod(0o755)


def test_images_much_smaller_than_the_global_crops_get_one_warning(tmp_path, capsys):
    def warnings(data_path, crop_size):
        args = argparse.ArgumentParser(parents=[main_dino.get_args_parser()]).parse_args(
            [str(a) for a in [*ARGS, '--data_path', data_path, '--global_crops_size', crop_size, '--output_dir',
                              tmp_path / 'out', '--batch_size_per_device', '2', '--data_limit', '20']])
        capsys.readouterr()
        main_dino.build_data_loader(args)
        return [line for line in capsys.readouterr().err.splitlines() if 'short side' in line]
    root = image_tree(tmp_path / 'small', *(f'c/{i}.png' for i in range(40)))  # 40 x 30 pixels
    assert warnings(root, 64) == [
        "warning: the images' short side is typically 30 pixels, under half the 64-pixel global crops "
        "(--global_crops_size): every view is an upsampled blur of a few pixels; pass a --global_crops_size near 30 "
        "(and a smaller --local_crops_size), or use larger images"]
    assert warnings(root, 48) == []  # 30 >= 24
    assert warnings('synthetic', 224) == [] and warnings('synthetic', 32) == []
    fashion = imagedata.FashionMNIST.__new__(imagedata.FashionMNIST)  # 28-pixel images (no files read)
    assert imagedata.typical_short_side(torch.utils.data.Subset(fashion, [0])) == 28
    imagedata.warn_if_smaller_than_crops(fashion, 32)  # the README's recipe: 28 >= 16
    assert capsys.readouterr().err == ''
    imagedata.warn_if_smaller_than_crops(fashion, 224)
    assert 'typically 28 pixels, under half the 224-pixel global crops' in capsys.readouterr().err


def test_an_evaluation_of_a_single_class_is_refused(tmp_path):
    root = image_tree(tmp_path, 'train/cat/0.png', 'val/cat/1.png')
    train, val = (evaluation.build_eval_split(str(root), split) for split in ('train', 'val'))
    with pytest.raises(SystemExit, match=r'train/ holds a single class \(cat\): every prediction would be right'):
        evaluation.check_matching_classes(train, val, root)


def test_a_float_tiff_in_0_1_is_read_as_its_grey_levels_not_black(tmp_path):
    levels = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    Image.fromarray(levels, mode='F').save(tmp_path / 'float.tif')
    rgb = np.asarray(imagedata.pil_loader(tmp_path / 'float.tif'))
    np.testing.assert_array_equal(rgb[..., 0], np.rint(levels * 255).astype(np.uint8))


def test_a_backbone_with_a_resized_position_embedding_is_refused_naming_it(tmp_path):
    """What tools/export_backbone.py --img_size 64 writes, given back to an evaluation with the right --arch."""
    model, _ = utils.build_backbone('vit_tiny', 16)
    state_dict = dict(model.state_dict(), pos_embed=torch.zeros(1, 17, 192))  # 4x4 patches: 64-pixel images
    torch.save(state_dict, tmp_path / 'export.pth')
    with pytest.raises(SystemExit) as stop:
        utils.load_pretrained_weights(model, str(tmp_path / 'export.pth'), 'teacher', 'vit_tiny', 16)
    assert 'has a position embedding for 16 patches (4x4: 64-pixel images at --patch_size 16)' in stop.value.code
    assert 'does not match --arch' not in stop.value.code


def test_an_unset_environment_variable_in_a_path_is_one_line_not_a_folder_named_after_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv('NOT_SET_DATA', raising=False)
    with pytest.raises(SystemExit) as stop:
        main_dino.get_args_parser().parse_args(['--output_dir', '$NOT_SET_DATA/run'])
    assert stop.value.code == ("error: $NOT_SET_DATA/run: the environment variable NOT_SET_DATA is not set; set it, "
                               "or write the path out")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# Issue 33's second probe of a new user's mistakes (the table is in the closing note)
# ---------------------------------------------------------------------------------------------

def test_swapped_crop_sizes_and_a_min_lr_above_the_peak_get_a_warning(capsys):
    def warnings(*argv):
        args = main_dino.get_args_parser().parse_args(['--arch', 'vit_tiny', '--batch_size_per_device', '8', *argv])
        main_dino.check_crop_sizes(args)
        main_dino.build_schedules(args, iters_per_epoch=5)
        return [line for line in capsys.readouterr().err.splitlines() if line.startswith('warning')]
    assert warnings() == []  # the defaults: 224 / 96, --min_lr 1e-6 under 0.0005 x 8 / 256
    assert warnings('--global_crops_size', '32', '--local_crops_size', '64') == [
        "warning: --local_crops_size 64 is larger than --global_crops_size 32: DINO's local views are the small ones "
        "(96 and 224 pixels in the paper); were the two swapped?"]
    assert warnings('--global_crops_size', '32', '--local_crops_size', '64', '--local_crops_number', '0') == []
    assert warnings('--lr', '0.0001', '--min_lr', '0.01') == [
        "warning: --min_lr 0.01 is above the peak learning rate 3.125e-06 (--lr 0.0001 x the global batch / 256): "
        "the lr rises during training instead of decaying; lower --min_lr"]


def test_the_knn_monitors_data_is_named_by_its_own_flag(tmp_path):
    args = argparse.Namespace(global_crops_size=32, knn_data=str(tmp_path), knn_limit=100, knn_every=1, epochs=1,
                              output_dir=str(tmp_path), num_workers=0)
    with pytest.raises(SystemExit, match=f'^error: --knn_data {tmp_path} has no train/ folder'):
        evaluation.KnnMonitor(args, torch.device('cpu'), steps=10)
    image_tree(tmp_path, 'train/cat/0.png', 'val/cat/1.png')
    with pytest.raises(SystemExit, match=f'^error: --knn_data {tmp_path}: train/ holds a single class'):
        evaluation.KnnMonitor(args, torch.device('cpu'), steps=10)


def test_an_evaluation_on_the_train_folder_itself_names_its_parent(tmp_path):
    root = image_tree(tmp_path, 'train/cat/0.png', 'train/dog/1.png', 'val/cat/2.png', 'val/dog/3.png')
    with pytest.raises(SystemExit) as stop:
        evaluation.build_eval_split(str(root / 'train'), 'train')
    assert stop.value.code == f"error: --data_path {root / 'train'} has no train/ folder, its parent has: pass " \
                              f"--data_path {root}"
