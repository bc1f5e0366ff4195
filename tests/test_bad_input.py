"""User mistakes: each gives one `error:` line and a non-zero exit, with no traceback, and creates or changes
nothing (the test's folder is hashed before and after). Most are caught by a script's check_args and run
in this process through its main(argv); Ctrl-C needs a real process."""
import argparse
import hashlib
import os
import pickle
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import benchmark
import eval_copy_detection
import eval_image_retrieval
import eval_knn
import eval_linear
import eval_video_segmentation
import main_dino
import utils
import video_generation
import visualize_attention
from conftest import REPO, TINY_TRAIN_ARGS, script_env
from tools import export_backbone
from test_video_attention import write_davis_video

TINY = ['--arch', 'vit_tiny', '--patch_size', '16', '--device', 'cpu']


@pytest.fixture(scope='module')
def weights(tmp_path_factory):
    model, _ = utils.build_backbone('vit_tiny', 16)
    path = tmp_path_factory.mktemp('weights') / 'vit_tiny16.pth'
    torch.save(model.state_dict(), path)
    return path


def tree_state(root):
    """Every folder and file under root, with a hash of each file's bytes."""
    state = {}
    for folder, dirs, files in os.walk(root):
        state[os.path.relpath(folder, root)] = 'folder'
        for name in files:
            path = os.path.join(folder, name)
            with open(path, 'rb') as f:
                state[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return state


def write_ground_truth(root, bbx=(0, 0, 10, 10), easy=(0,)):
    folder = root / 'roxford5k'
    (folder / 'jpg').mkdir(parents=True)
    gnd = {'imlist': ['db0', 'db1'], 'qimlist': ['q0'],
           'gnd': [{'bbx': list(bbx), 'easy': np.array(easy), 'hard': np.array([1]), 'junk': np.array([], int)}]}
    with open(folder / 'gnd_roxford5k.pkl', 'wb') as f:
        pickle.dump(gnd, f)
    return root


# Each case: (tmp_path, weights) -> (script module, arguments, fragments the error line must hold or, starting
# with '!', must not hold).

def video_segmentation_into_earlier_results(tmp, weights):
    """Second video's first annotation has another size than its frames; earlier results must stay."""
    davis = tmp / 'davis'
    write_davis_video(davis, 'first', n_frames=3)
    write_davis_video(davis, 'second', n_frames=3, seed=1)
    Image.new('P', (32, 32)).save(davis / 'Annotations/480p/second/00000.png')
    out = tmp / 'out'
    (out / 'first').mkdir(parents=True)
    (out / 'first' / '00000.png').write_bytes(b'earlier mask')
    (out / 'metrics.json').write_text('{"overall": {"J&F-Mean": 0.5}}')
    return eval_video_segmentation, [*TINY, '--pretrained_weights', weights, '--data_path', davis,
                                     '--output_dir', out], ['32x32', 'second/00000.png', 'nothing was processed']


def output_dir_is_a_file(tmp, weights):
    (tmp / 'file').write_text('keep me')
    return main_dino, [*TINY_TRAIN_ARGS, '--output_dir', tmp / 'file'], ['is a file, not a folder']


def output_dir_cannot_be_created(tmp, weights):
    (tmp / 'file').write_text('keep me')
    return main_dino, [*TINY_TRAIN_ARGS, '--output_dir', tmp / 'file' / 'run'], ['cannot be created', 'is a file']


def output_dir_not_writable(tmp, weights):
    folder = tmp / 'read_only'
    folder.mkdir()
    folder.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere but in /sys
        folder = '/sys/dino_run'
    return main_dino, [*TINY_TRAIN_ARGS, '--output_dir', folder], ['cannot write in']


def every_image_unreadable(tmp, weights):
    for i in range(2):
        (tmp / 'data' / 'class0').mkdir(parents=True, exist_ok=True)
        (tmp / 'data' / 'class0' / f'{i}.jpg').write_bytes(b'not an image')
    return main_dino, [*TINY_TRAIN_ARGS, '--batch_size_per_device', '2', '--data_path', tmp / 'data',
                       '--output_dir', tmp / 'out'], ['none of the 2 images', 'check --data_path', '!strict_data']


def linear_head_of_other_n_last_blocks(tmp, weights):
    out = tmp / 'linear'
    out.mkdir()
    head = utils.SingleProcess(eval_linear.LinearClassifier(192 * 4, num_labels=10))  # --n_last_blocks 4
    torch.save({'epoch': 1, 'state_dict': head.state_dict()}, out / 'checkpoint.pth.tar')
    return eval_linear, [*TINY, '--pretrained_weights', weights, '--data_path', 'synthetic', '--num_labels', '10',
                         '--n_last_blocks', '1', '--num_workers', '0', '--output_dir', out], \
        ['--n_last_blocks', '--avgpool_patchtokens', '--num_labels', '!--out_dim']


def ground_truth_not_a_pickle(tmp, weights):
    root = write_ground_truth(tmp)
    (root / 'roxford5k' / 'gnd_roxford5k.pkl').write_text('not a pickle')
    return eval_image_retrieval, [*TINY, '--data_path', root], ['it must be the pickled ground truth']


def bad_bounding_box(tmp, weights):
    return eval_image_retrieval, [*TINY, '--data_path', write_ground_truth(tmp, bbx=(10, 0, 5, 10))], \
        ['bounding box of query 0', 'left < right']


def ground_truth_beyond_database(tmp, weights):
    return eval_image_retrieval, [*TINY, '--data_path', write_ground_truth(tmp, easy=(0, 7))], \
        ['index 7', 'imlist holds 2 database images']


def damaged_weights(tmp, weights):
    (tmp / 'weights.pth').write_bytes(b'\x80\x02 not a checkpoint')
    return eval_knn, [*TINY, '--pretrained_weights', tmp / 'weights.pth', '--data_path', 'synthetic',
                      '--num_workers', '0'], ['is damaged or not a PyTorch checkpoint', "PyTorch's file formats"]


def knn_checkpoint_key_absent(tmp, weights):
    torch.save({'teacher': torch.load(weights), 'epoch': 1}, tmp / 'checkpoint.pth')
    return eval_knn, [*TINY, '--pretrained_weights', tmp / 'checkpoint.pth', '--checkpoint_key', 'student',
                      '--data_path', 'synthetic', '--num_workers', '0', '--nb_knn', '1'], \
        ["has no 'student' network (it holds teacher)", '--checkpoint_key']


EXPORT_TINY = ['--arch', 'vit_tiny', '--patch_size', '16']  # the export runs on the CPU: no --device


def export_file(tmp, contents, *argv):
    torch.save(contents, tmp / 'in.pth')
    return export_backbone, ['--pretrained_weights', tmp / 'in.pth', '--output_dir', tmp / 'out', *argv]


def export_not_a_checkpoint(tmp, weights):
    (tmp / 'notes.pth').write_text('not a checkpoint')
    return export_backbone, ['--pretrained_weights', tmp / 'notes.pth', '--output_dir', tmp / 'out'], \
        ['notes.pth is damaged or not a PyTorch checkpoint']


def export_linear_head(tmp, weights):
    head = utils.SingleProcess(eval_linear.LinearClassifier(192, num_labels=10))
    return (*export_file(tmp, {'epoch': 1, 'state_dict': head.state_dict()}, *EXPORT_TINY),
            ['is a linear classifier', 'not a backbone'])


def export_part_of_a_backbone(tmp, weights):
    part = {k: v for k, v in torch.load(weights).items() if not k.startswith('blocks.11.')}
    return (*export_file(tmp, part, *EXPORT_TINY), ['lacks 12 of the backbone', 'blocks.11.'])


def export_resnet_checkpoint(tmp, weights):
    return (*export_file(tmp, {'teacher': {}, 'args': argparse.Namespace(arch='resnet50')}),
            ['--arch resnet50', "timm's VisionTransformer has models for DINO's ViTs only"])


def resume_with_another_optimizer(tmp, weights):
    """An AdamW run's folder resumed with --optimizer sgd (its state has no 'momentum')."""
    (tmp / 'run').mkdir()
    args = main_dino.get_args_parser().parse_args(TINY_TRAIN_ARGS)
    torch.save({'epoch': 1, 'optimizer': {'state': {}, 'param_groups': []}, 'args': args},
               tmp / 'run' / 'checkpoint.pth')
    return main_dino, [*TINY_TRAIN_ARGS, '--optimizer', 'sgd', '--output_dir', tmp / 'run'], \
        ['checkpoint.pth was written with --optimizer adamw, not sgd', 'resume with --optimizer adamw']


def knn_on_a_linear_head(tmp, weights, key='teacher'):
    """eval_linear's checkpoint.pth.tar holds the head alone, under 'state_dict'."""
    head = utils.SingleProcess(eval_linear.LinearClassifier(192 * 4, num_labels=10))
    torch.save({'epoch': 1, 'state_dict': head.state_dict(), 'optimizer': {}, 'best_acc': 10.},
               tmp / 'checkpoint.pth.tar')
    return eval_knn, [*TINY, '--pretrained_weights', tmp / 'checkpoint.pth.tar', '--checkpoint_key', key,
                      '--data_path', 'synthetic', '--num_workers', '0', '--max_batches', '1', '--nb_knn', '1'], \
        ['is a linear classifier', 'not a backbone', '--pretrained_weights given to eval_linear.py', '!--arch']


SYNTHETIC_SERVES = '--data_path synthetic: the built-in synthetic images serve training (main_dino.py), k-NN and linear'
# issue 24: hints that lead somewhere
GUIDED = {
    'main_dino_resume_with_another_optimizer': resume_with_another_optimizer,
    'knn_on_a_linear_head_checkpoint': knn_on_a_linear_head,
    'knn_on_a_linear_head_checkpoint_key_state_dict': lambda tmp, w: knn_on_a_linear_head(tmp, w, 'state_dict'),
    'copy_detection_synthetic': lambda tmp, w: (eval_copy_detection, [*TINY, '--data_path', 'synthetic'],
                                                [SYNTHETIC_SERVES, 'the Copydays folder']),
    'retrieval_synthetic': lambda tmp, w: (eval_image_retrieval, [*TINY, '--data_path', 'synthetic'],
                                           [SYNTHETIC_SERVES, 'revisited Oxford and Paris']),
    'video_segmentation_synthetic': lambda tmp, w: (eval_video_segmentation, [*TINY, '--data_path', 'synthetic',
                                                                              '--output_dir', tmp / 'o'],
                                                    [SYNTHETIC_SERVES, 'DAVIS 2017']),
    'video_generation_synthetic': lambda tmp, w: (video_generation, [*TINY, '--input_path', 'synthetic',
                                                                     '--output_path', tmp / 'o'],
                                                  [SYNTHETIC_SERVES.replace('--data_path', '--input_path'),
                                                   'a video file']),
}

CASES = {
    'video_segmentation_into_earlier_results': video_segmentation_into_earlier_results,
    'main_dino_local_crops_number_-1': lambda tmp, w: (main_dino, [*TINY_TRAIN_ARGS, '--local_crops_number', '-1',
                                                                   '--output_dir', tmp / 'o'], ['--local_crops_number']),
    'main_dino_out_dim_0': lambda tmp, w: (main_dino, [*TINY_TRAIN_ARGS, '--out_dim', '0', '--output_dir', tmp / 'o'],
                                           ['--out_dim must be at least 1']),
    'main_dino_output_dir_is_a_file': output_dir_is_a_file,
    'main_dino_output_dir_cannot_be_created': output_dir_cannot_be_created,
    'main_dino_output_dir_not_writable': output_dir_not_writable,
    'copy_detection_imsize_below_patch': lambda tmp, w: (eval_copy_detection, [*TINY, '--imsize', '8', '--data_path',
                                                                               tmp], ['--imsize 8', '16-pixel patch']),
    'retrieval_imsize_below_patch': lambda tmp, w: (eval_image_retrieval, [*TINY, '--imsize', '10', '--data_path', tmp],
                                                    ['--imsize 10', '16-pixel patch']),
    'visualize_image_size_below_patch': lambda tmp, w: (visualize_attention, [*TINY, '--image_size', '8',
                                                                              '--output_dir', tmp / 'o'],
                                                        ['--image_size 8', '16-pixel patch']),
    'retrieval_bounding_box_right_of_left': bad_bounding_box,
    'benchmark_data_zero_image_width': lambda tmp, w: (benchmark, ['--mode', 'data', '--image_width', '0'],
                                                       ['--image_width must be at least 1']),
    'main_dino_negative_lr': lambda tmp, w: (main_dino, [*TINY_TRAIN_ARGS, '--lr', '-1', '--output_dir', tmp / 'o'],
                                             ['--lr must be positive']),
    'copy_detection_whitening_path_is_a_file': lambda tmp, w: (
        eval_copy_detection, [*TINY, '--data_path', tmp, '--whitening_path', w], ['--whitening_path', 'a file']),
    'retrieval_ground_truth_beyond_database': ground_truth_beyond_database,
    'main_dino_every_image_unreadable': every_image_unreadable,
    'linear_resume_with_other_n_last_blocks': linear_head_of_other_n_last_blocks,
    'retrieval_ground_truth_not_a_pickle': ground_truth_not_a_pickle,
    'knn_damaged_weights': damaged_weights,
}
# the mistakes tried beyond the list (see the report of issue 13)
FURTHER = {
    'main_dino_teacher_temp_0': lambda tmp, w: (main_dino, [*TINY_TRAIN_ARGS, '--teacher_temp', '0', '--output_dir',
                                                            tmp / 'o'], ['--teacher_temp must be positive']),
    'main_dino_momentum_above_1': lambda tmp, w: (main_dino, [*TINY_TRAIN_ARGS, '--momentum_teacher', '1.5',
                                                              '--output_dir', tmp / 'o'], ['--momentum_teacher']),
    'main_dino_one_crop_scale': lambda tmp, w: (main_dino, [*TINY_TRAIN_ARGS, '--global_crops_scale', '0.4',
                                                            '--output_dir', tmp / 'o'], ['--global_crops_scale']),
    'main_dino_missing_data_path': lambda tmp, w: (main_dino, [*TINY_TRAIN_ARGS, '--data_path', tmp / 'none',
                                                               '--output_dir', tmp / 'o'], ['--data_path', 'does not exist']),
    'main_dino_crop_below_patch': lambda tmp, w: (main_dino, [*TINY_TRAIN_ARGS, '--local_crops_size', '8',
                                                              '--output_dir', tmp / 'o'], ['--local_crops_size 8']),
    'knn_nb_knn_0': lambda tmp, w: (eval_knn, [*TINY, '--nb_knn', '0', '--data_path', 'synthetic'], ['--nb_knn']),
    'knn_load_features_missing': lambda tmp, w: (eval_knn, [*TINY, '--load_features', tmp / 'none'],
                                                 ['--load_features', 'not found']),
    'linear_weights_missing': lambda tmp, w: (eval_linear, [*TINY, '--pretrained_weights', tmp / 'none.pth',
                                                            '--data_path', 'synthetic', '--output_dir', tmp / 'o'],
                                              ['--pretrained_weights', 'not found']),
    'visualize_image_path_is_a_folder': lambda tmp, w: (visualize_attention, [*TINY, '--image_path', tmp,
                                                                              '--output_dir', tmp / 'o'],
                                                        ['--image_path', 'a folder']),
    'video_segmentation_topk_0': lambda tmp, w: (eval_video_segmentation, [*TINY, '--topk', '0', '--data_path', tmp,
                                                                           '--output_dir', tmp / 'o'], ['--topk']),
    'main_dino_infinite_lr': lambda tmp, w: (main_dino, [*TINY_TRAIN_ARGS, '--lr', 'inf', '--output_dir', tmp / 'o'],
                                             ['--lr must be a finite number']),
    'knn_checkpoint_key_absent': knn_checkpoint_key_absent,
    'main_dino_negative_seed': lambda tmp, w: (main_dino, [*TINY_TRAIN_ARGS, '--seed', '-1', '--output_dir', tmp / 'o'],
                                               ['--seed must be between 0 and 2**32 - 1']),
    'retrieval_multiscale_half_below_patch': lambda tmp, w: (eval_image_retrieval, [
        *TINY, '--imsize', '24', '--multiscale', 'true', '--data_path', tmp], ['--multiscale', 'at least 32']),
    # the ViT-only scripts share one check (utils.check_vit_arch)
    'copy_detection_resnet_arch': lambda tmp, w: (eval_copy_detection, [*TINY, '--arch', 'resnet18',
                                                                        '--data_path', tmp],
                                                  ['--arch resnet18', 'ViT patch tokens', 'vit_small']),
    'visualize_resnet_arch': lambda tmp, w: (visualize_attention, [*TINY, '--arch', 'resnet18',
                                                                   '--output_dir', tmp / 'o'],
                                             ['--arch resnet18', 'attention maps', 'vit_small']),
    # evaluation sizes (issue 25)
    'knn_crop_below_patch': lambda tmp, w: (eval_knn, [*TINY, '--crop_size', '8', '--data_path', 'synthetic'],
                                            ['--crop_size 8 is smaller than one 16-pixel patch']),
    'linear_resize_below_crop': lambda tmp, w: (eval_linear, [*TINY, '--resize', '48', '--crop_size', '64',
                                                              '--data_path', 'synthetic', '--output_dir', tmp / 'o'],
                                                ['--resize 48 is smaller than --crop_size 64', 'padded']),
    # the timm export (issue 25)
    'export_not_a_checkpoint': export_not_a_checkpoint,
    'export_linear_head_checkpoint': export_linear_head,
    'export_part_of_a_backbone': export_part_of_a_backbone,
    'export_resnet_checkpoint': export_resnet_checkpoint,
    'export_img_size_below_patch': lambda tmp, w: (export_backbone, [*EXPORT_TINY, '--pretrained_weights', w,
                                                                     '--img_size', '8', '--output_dir', tmp / 'o'],
                                                   ['--img_size 8', '16-pixel patch']),
}


@pytest.mark.parametrize('case', [*CASES, *FURTHER, *GUIDED])
def test_mistake_gives_one_error_line_and_changes_nothing(case, tmp_path, weights, restored_process_state, capsys):
    module, argv, fragments = {**CASES, **FURTHER, **GUIDED}[case](tmp_path, weights)
    before = tree_state(tmp_path)
    with pytest.raises(SystemExit) as stop:
        module.main([str(a) for a in argv])
    message = stop.value.code
    assert isinstance(message, str) and message.startswith('error: ') and '\n' not in message, message
    for fragment in fragments:  # '!text': advice that would mislead here
        assert (fragment[1:] not in message) if fragment.startswith('!') else (fragment in message), message
    assert 'Traceback' not in capsys.readouterr().err
    assert tree_state(tmp_path) == before


def test_crop_sizes_that_are_no_multiple_of_the_patch_size_are_named(capsys):
    args = main_dino.get_args_parser().parse_args([*TINY_TRAIN_ARGS, '--patch_size', '7'])
    main_dino.check_args(args)
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith('warning:')]
    assert len(warnings) == 2
    assert '--global_crops_size 64' in warnings[0] and 'last 1 pixel' in warnings[0]
    assert '--local_crops_size 32' in warnings[1] and 'last 4 pixel' in warnings[1]


@pytest.mark.parametrize('presses', [1, 2])
def test_ctrl_c_saves_a_resumable_checkpoint_or_stops_at_once(presses, tmp_path):
    """Ctrl-C sends SIGINT to the whole foreground process group (DataLoader workers included).

    Once: the step finishes, checkpoint.pth resumes there, one line, exit 130. Twice (while the run waits
    in its first step, held there by the DINO_FAULT hook): it stops at once, exit 130, no checkpoint.
    """
    args = [*TINY_TRAIN_ARGS, '--global_crops_size', '32', '--local_crops_size', '16', '--batch_size_per_device', '8',
            '--data_limit', '32', '--epochs', '2', '--num_workers', str(2 - presses), '--output_dir', tmp_path]
    env = {'PYTHONUNBUFFERED': '1', 'DINO_FAULT': 'step:1:hang' if presses == 2 else ''}
    proc = subprocess.Popen([sys.executable, str(REPO / 'main_dino.py'), *map(str, args)], cwd=REPO,
                            env=script_env(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    ready = 'DINO_FAULT: hang at step 1' if presses == 2 else 'Epoch: [0/2]  [0/4]'
    for line in proc.stdout:
        if line.startswith(ready):
            for _ in range(presses):
                os.killpg(proc.pid, signal.SIGINT)
                time.sleep(0.5)  # two signals sent at once may arrive as one
            break
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 130, stdout[-2000:] + stderr[-2000:]
    assert 'Traceback' not in stderr and 'KeyboardInterrupt' not in stderr, stderr[-2000:]
    if presses == 1:
        stopped = [line for line in stdout.splitlines() if line.startswith('Stopped by SIGINT')]
        assert len(stopped) == 1 and 'run the same command to continue' in stopped[0]
        checkpoint = utils.load_checkpoint_or_exit(tmp_path / 'checkpoint.pth')
        assert checkpoint['epoch'] == 0 and 0 < checkpoint['step'] < 4
    else:
        assert stderr.strip().splitlines()[-1].startswith('Interrupted again: stopping now')
        assert not (tmp_path / 'checkpoint.pth').exists() and not list(tmp_path.glob('*.tmp*'))


def test_ctrl_c_in_an_evaluation_is_one_line_and_exit_130(capsys):
    """eval_knn and eval_linear run through utils.run_reporting_failures (torch's DataLoader workers stay quiet)."""
    def interrupted(args):
        raise KeyboardInterrupt

    try:
        with pytest.raises(SystemExit) as stop:
            utils.run_reporting_failures(interrupted, None)
    except KeyboardInterrupt:  # would end the whole pytest session
        pytest.fail("Ctrl-C escaped run_reporting_failures")
    assert stop.value.code == 130
    assert capsys.readouterr().err.strip().splitlines() == ["Interrupted (Ctrl-C); the files already written are kept."]
