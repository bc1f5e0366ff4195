"""Flags and branches a user can reach, each checked by its effect: tiny in-process runs of the scripts,
several flags per run, with the pieces they should reach recorded on the way."""
import argparse
import json
import math
import os
import re
import signal
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoints
import eval_knn
import eval_linear
import evaluation
import imagedata
import main_dino
import utils
import vision_transformer as vits
from PIL import Image
from conftest import REPO, run_torchrun, script_env, signal_when_waiting

CPU = ['--device', 'cpu', '--num_workers', '0']

# 2 iterations per epoch of 4 images; 32/16-pixel crops
FLAG_TRAIN_ARGS = ['--arch', 'vit_tiny', '--patch_size', '16', '--data_path', 'synthetic', '--global_crops_size', '32',
                   '--local_crops_size', '16', '--local_crops_number', '2', '--out_dim', '64',
                   '--batch_size_per_device', '4', '--data_limit', '8', '--num_workers', '0', '--warmup_epochs', '0',
                   '--lr', '0.01', '--device', 'cpu']


@pytest.fixture(autouse=True)
def keep_signal_handlers():
    """main_dino installs its stop-signal handlers in this process: put pytest's back afterwards."""
    saved = {signum: signal.getsignal(signum) for signum in checkpoints.StopSignal.SIGNALS}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def dino_args(out, *extra):
    parser = argparse.ArgumentParser(parents=[main_dino.get_args_parser()])
    args = parser.parse_args([str(a) for a in [*FLAG_TRAIN_ARGS, '--output_dir', out, *extra]])
    main_dino.check_args(args)
    Path(out).mkdir(parents=True, exist_ok=True)
    return args


def train(out, *extra):
    main_dino.train_dino(dino_args(out, *extra))


class Recorder:
    """Records what main_dino builds and does: the objects made by some of its classes and functions,
    the crops of every step, and the calls of clip_gradients; `on_step(n)` may act at the n-th step."""

    def __init__(self, monkeypatch, on_step=None):
        self.made, self.steps, self.losses, self.clips, self.autocast = {}, [], [], 0, []
        for name in ('DINOLoss', 'DataAugmentationDINO'):
            self.made[name] = []
            monkeypatch.setattr(main_dino, name, self.recording(getattr(main_dino, name), self.made[name]))
        self.made['backbones'] = []
        build_backbone, clip_gradients, train_step = utils.build_backbone, utils.clip_gradients, main_dino.train_step

        def backbone(*args, **kwargs):
            model, dim = build_backbone(*args, **kwargs)
            self.made['backbones'].append(model)
            return model, dim

        def clip(*args):
            self.clips += 1
            return clip_gradients(*args)

        def step(*args):
            self.steps.append([tuple(im.shape) for im in args[1]])
            loss = (on_step and on_step(len(self.steps))) or train_step(*args)
            self.losses.append(loss.item())
            return loss

        monkeypatch.setattr(utils, 'build_backbone', backbone)
        monkeypatch.setattr(utils, 'clip_gradients', clip)
        monkeypatch.setattr(main_dino, 'train_step', step)

    def recording(self, cls, made):
        recorder = self

        class Recorded(cls):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                made.append(self)

            def forward(self, *args, **kwargs):  # DINOLoss: under which autocast the loss is computed
                recorder.autocast.append(torch.is_autocast_enabled('cpu') and torch.get_autocast_dtype('cpu'))
                return super().forward(*args, **kwargs)
        return Recorded


def test_training_flags_sgd_patch8_no_local_crops_and_head_options(tmp_path, monkeypatch):
    """--optimizer sgd --patch_size 8 --local_crops_number 0 --global_crops_scale 0.14 1 --saveckp_freq 2
    --clip_grad 0 --norm_last_layer false --use_bn_in_head true --drop_path_rate 0.3
    --warmup_teacher_temp_epochs 2, in one 3-epoch run."""
    record = Recorder(monkeypatch)
    train(tmp_path, '--optimizer', 'sgd', '--patch_size', '8', '--local_crops_number', '0',
          '--global_crops_scale', '0.14', '1', '--saveckp_freq', '2', '--epochs', '3', '--clip_grad', '0',
          '--norm_last_layer', 'false', '--use_bn_in_head', 'true', '--drop_path_rate', '0.3',
          '--warmup_teacher_temp', '0.04', '--teacher_temp', '0.07', '--warmup_teacher_temp_epochs', '2',
          '--freeze_last_layer', '0')
    checkpoint = utils.load_checkpoint_or_exit(tmp_path / 'checkpoint.pth')
    student = checkpoint['student']
    # --local_crops_number 0: two global views only, in the steps and in the loss; --global_crops_scale
    assert record.steps == [[(4, 3, 32, 32)] * 2] * 6
    loss, = record.made['DINOLoss']
    assert loss.ncrops == 2 and record.made['DataAugmentationDINO'][0].global_transfo1.scale == (0.14, 1.)
    # --warmup_teacher_temp_epochs 2: 0.04 then 0.07
    assert list(loss.teacher_temp_schedule) == pytest.approx([0.04, 0.07, 0.07])
    # --optimizer sgd: SGD with momentum 0.9 (momentum buffers, no Adam moments)
    assert checkpoint['optimizer']['param_groups'][0]['momentum'] == 0.9
    assert all(set(state) == {'momentum_buffer'} for state in checkpoint['optimizer']['state'].values())
    # --patch_size 8
    assert student['module.backbone.patch_embed.proj.weight'].shape == (192, 3, 8, 8)
    # --saveckp_freq 2: checkpoint0000 and checkpoint0002 kept, not checkpoint0001
    assert sorted(p.name for p in tmp_path.glob('checkpoint0*.pth')) == ['checkpoint0000.pth', 'checkpoint0002.pth']
    # --clip_grad 0: no clipping at all
    assert record.clips == 0
    # --norm_last_layer false: the weight-norm scale g is trained (fixed to 1 otherwise)
    assert not torch.all(student['module.head.last_layer.weight_g'] == 1)
    # --use_bn_in_head true: batch norms in the head, updated once per step
    assert student['module.head.mlp.1.num_batches_tracked'] == 6
    assert student['module.head.mlp.1.running_mean'].abs().sum() > 0
    # --drop_path_rate 0.3: in the student only, rising linearly over the blocks to 0.3
    student_backbone, teacher_backbone = record.made['backbones']
    assert [block.drop_path.drop_prob for block in student_backbone.blocks[1:]] == pytest.approx(
        [0.3 * i / 11 for i in range(1, 12)])
    assert all(isinstance(block.drop_path, nn.Identity) for block in teacher_backbone.blocks)


def test_training_defaults_autocast_and_a_non_finite_loss_keep_the_last_good_checkpoint(tmp_path, monkeypatch,
                                                                                       capsys):
    """--saveckp_freq 0, --clip_grad (3.0), --norm_last_layer (true), --autocast; a NaN loss at the first step
    of epoch 1 stops the run with exit status 1, keeping the checkpoint and log of epoch 0."""
    record = Recorder(monkeypatch, on_step=lambda n: torch.tensor(math.nan) if n == 3 else None)
    with pytest.raises(SystemExit) as stop:
        train(tmp_path, '--epochs', '2', '--saveckp_freq', '0', '--autocast', '--freeze_last_layer', '0')
    assert stop.value.code == 1
    assert 'Loss is nan at epoch 1, iteration 2: stopping training' in capsys.readouterr().out
    checkpoint = utils.load_checkpoint_or_exit(tmp_path / 'checkpoint.pth')
    assert checkpoint['epoch'] == 1 and len((tmp_path / 'log.txt').read_text().splitlines()) == 1
    assert not list(tmp_path.glob('checkpoint0*.pth'))  # --saveckp_freq 0: no numbered checkpoints
    assert record.clips == 2  # clipped at each of the two good steps
    assert record.steps[0] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 2
    assert record.autocast == [torch.bfloat16] * 2  # the loss of each step under bf16 autocast
    assert torch.all(checkpoint['student']['module.head.last_layer.weight_g'] == 1)


def test_training_resnet_with_lars_stops_on_sigusr1_and_resumes_without_random_states(tmp_path, monkeypatch,
                                                                                       capsys):
    """A ResNet --arch with --optimizer lars; SIGUSR1 stops it mid-epoch with a checkpoint; a checkpoint
    without random states (older format) still resumes, with a note."""
    def signal_at_third_step(n):
        if n == 3:
            signal.raise_signal(signal.SIGUSR1)
    Recorder(monkeypatch, on_step=signal_at_third_step)
    args = ['--arch', 'resnet18', '--optimizer', 'lars', '--epochs', '2']
    train(tmp_path, *args)
    assert 'Stopped by SIGUSR1 at epoch 1, iteration 1' in capsys.readouterr().out
    checkpoint = utils.load_checkpoint_or_exit(tmp_path / 'checkpoint.pth')
    assert checkpoint['epoch'] == 1 and checkpoint['step'] == 1
    assert 'module.backbone.layer4.1.bn2.running_var' in checkpoint['student']  # torchvision's ResNet
    assert all(set(state) == {'mu'} for state in checkpoint['optimizer']['state'].values())  # LARS

    del checkpoint['rng_state']
    torch.save(checkpoint, tmp_path / 'checkpoint.pth')
    train(tmp_path, *args)
    out = capsys.readouterr().out
    assert 'the checkpoint holds no random states' in out and 'Resuming epoch 1 at iteration 1/2' in out
    assert utils.load_checkpoint_or_exit(tmp_path / 'checkpoint.pth')['epoch'] == 2
    assert len((tmp_path / 'log.txt').read_text().splitlines()) == 2


def test_two_processes_batch_norm_head_stop_signal_to_one_rank_then_resume_with_one(tmp_path, monkeypatch, capsys):
    """--use_bn_in_head true under 2 CPU processes runs (torch synchronises batch norms on accelerators only);
    SIGUSR1 to rank 1 alone stops both after their first step; the run then resumes in 1
    process, with the epoch's meters of both ranks merged."""
    flags = ['--use_bn_in_head', 'true', '--data_limit', '16', '--epochs', '1']
    two = tmp_path / 'two'
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
           str(REPO / 'main_dino.py'), *FLAG_TRAIN_ARGS, *flags, '--output_dir', two]
    env = script_env({'OMP_NUM_THREADS': '1', 'PYTHONUNBUFFERED': '1', 'DINO_FAULT': 'step:1:wait:1'})
    output = signal_when_waiting(cmd, env, 'DINO_FAULT: wait at step 1', lambda proc, line: os.kill(
        int(re.search(r'\(pid (\d+)\)', line).group(1)), signal.SIGUSR1))  # rank 1 only
    assert 'Stopped by a signal to another process at epoch 0, iteration 1' in output, output[-3000:]
    stopped = utils.load_checkpoint_or_exit(two / 'checkpoint.pth')
    assert stopped['step'] == 1 and len(stopped['epoch_meters']) == 2
    assert stopped['student']['module.head.mlp.1.num_batches_tracked'] == 1

    record = Recorder(monkeypatch)
    train(two, *flags, '--batch_size_per_device', '8')
    assert 'Resuming epoch 0 at iteration 1/2' in capsys.readouterr().out
    (count0, total0), (count1, total1) = (state['loss'] for state in stopped['epoch_meters'])
    log = [json.loads(line) for line in (two / 'log.txt').read_text().splitlines()]
    assert log[0]['train_loss'] == pytest.approx((total0 + total1 + record.losses[0]) / (count0 + count1 + 1))


def test_seed_and_fewer_images_than_one_batch(tmp_path):
    def first_batch(*extra):
        loader = main_dino.build_data_loader(dino_args(tmp_path, *extra))
        loader.sampler.set_epoch(0)
        return next(iter(loader))[0][0]
    same, again, other = first_batch('--seed', '5'), first_batch('--seed', '5'), first_batch('--seed', '6')
    assert torch.equal(same, again) and not torch.equal(same, other)

    with pytest.raises(SystemExit) as stop:
        main_dino.build_data_loader(dino_args(tmp_path, '--data_limit', '3'))
    assert str(stop.value) == ("error: 3 training images are fewer than one global batch (4); "
                               "lower --batch_size_per_device or --accum_steps, or add images")


def test_resuming_with_fewer_processes_merges_the_epoch_meters():
    """A run stopped mid-epoch under 2 processes, resumed by 1: rank 0 takes the sums of both."""
    logger = utils.MetricLogger()
    main_dino.restore_meters(logger, [{'loss': (3, 6.)}, {'loss': (2, 5.)}])
    assert (logger.meters['loss'].count, logger.meters['loss'].total) == (5, 11.)
    assert logger.meters['loss'].global_avg == pytest.approx(11 / 5)


def reference_lars(params, grads_per_step, lr, weight_decay, momentum, eta):
    """LARS as the original DINO defines it, one parameter at a time, in float64."""
    params = [p.double().clone() for p in params]
    buffers = [torch.zeros_like(p) for p in params]
    for grads in grads_per_step:
        for p, g, mu in zip(params, grads, buffers):
            update = g.double()
            if p.ndim != 1:
                update = update + weight_decay * p
                p_norm, u_norm = p.norm().item(), update.norm().item()
                update = update * (eta * p_norm / u_norm if p_norm > 0 and u_norm > 0 else 1.)
            mu.mul_(momentum).add_(update)
            p.sub_(lr * mu)
    return params


def test_lars_over_several_steps_with_momentum_1d_and_zero_norm_parameters():
    torch.manual_seed(0)
    params = [torch.randn(4, 3), torch.randn(5), torch.zeros(2, 2), torch.randn(3, 3)]
    # a 1-D parameter (no decay, no trust ratio); a zero matrix (norm 0 at the first step: trust 1); a matrix
    # with zero gradients in a group without weight decay (update norm 0: trust 1, not 0/0)
    grads_per_step = [[torch.randn_like(p) for p in params] for _ in range(3)]
    for grads in grads_per_step:
        grads[3] = torch.zeros(3, 3)
    model_params = [nn.Parameter(p.clone()) for p in params]
    optimizer = utils.LARS([{'params': model_params[:3], 'weight_decay': 0.1}, {'params': model_params[3:]}],
                           lr=0.5, momentum=0.9, eta=0.02)
    for grads in grads_per_step:
        for p, g in zip(model_params, grads):
            p.grad = g.clone()
        optimizer.step()
    expected = reference_lars(params[:3], [g[:3] for g in grads_per_step], 0.5, 0.1, 0.9, 0.02)
    expected += reference_lars(params[3:], [g[3:] for g in grads_per_step], 0.5, 0., 0.9, 0.02)
    for got, want in zip(model_params, expected):
        torch.testing.assert_close(got.detach().double(), want, rtol=1e-6, atol=1e-7)
    assert not torch.equal(model_params[2].detach(), params[2])  # the zero matrix moved with trust 1
    torch.testing.assert_close(model_params[3].detach(), params[3])  # no gradient, no decay: unchanged


# ----------------------------------------------------------------------------- eval_knn.py, eval_linear.py

def test_knn_student_key_host_storage_and_temperature(tmp_path, capsys, monkeypatch, small_image_folder):
    """--checkpoint_key student takes the student's backbone; --store_on_device false keeps the features on
    the host; --temperature decides a hand-worked vote; --load_features refuses features and labels that
    do not fit together."""
    torch.manual_seed(0)
    teacher, student = vits.vit_tiny(patch_size=16).eval(), vits.vit_tiny(patch_size=16).eval()
    checkpoint = tmp_path / 'checkpoint.pth'
    torch.save({'teacher': {f'backbone.{k}': v for k, v in teacher.state_dict().items()},
                'student': {f'module.backbone.{k}': v for k, v in student.state_dict().items()}}, checkpoint)
    stored = []
    extract_features = evaluation.extract_features
    monkeypatch.setattr(evaluation, 'extract_features',
                        lambda *a, **k: stored.append(k['store_on_device']) or extract_features(*a, **k))
    eval_knn.main([str(a) for a in ['--arch', 'vit_tiny', '--pretrained_weights', checkpoint, '--checkpoint_key',
                                    'student', '--store_on_device', 'false', '--data_path', small_image_folder,
                                    '--nb_knn', '3', '--dump_features', tmp_path / 'feats', *CPU]])
    assert stored == [False, False]
    from torchvision import datasets
    images = torch.stack([image for image, _ in datasets.ImageFolder(small_image_folder / 'val',
                                                                     evaluation.center_crop_transform(224))])
    with torch.no_grad():
        expected, other = (F.normalize(model(images), dim=1) for model in (student, teacher))
    features = utils.load_checkpoint_or_exit(tmp_path / 'feats' / 'testfeat.pth')
    torch.testing.assert_close(features, expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(features, other, atol=1e-3)

    # the query's neighbours: one of class 0 at similarity 0.9, two of class 1 at 0.8. T = 0.07 weights
    # them e^12.9 against 2 e^11.4 (class 0 wins); T = 1, e^0.9 against 2 e^0.8 (class 1 wins)
    folder = tmp_path / 'hand'
    train = torch.tensor([[0.9, math.sqrt(1 - 0.81), 0.], [0.8, 0., 0.6], [0.8, 0., -0.6]])
    eval_knn.dump_features(folder, train, torch.tensor([[1., 0., 0.]]), torch.tensor([0, 1, 1]), torch.tensor([0]))
    for temperature, top1 in (('0.07', 100.), ('1', 0.)):
        capsys.readouterr()
        eval_knn.main(['--load_features', str(folder), '--nb_knn', '3', '--temperature', temperature, *CPU])
        assert f'3-NN classifier result: Top1: {top1}, Top5: 100.0' in capsys.readouterr().out

    checkpoints.save_checkpoint(torch.tensor([0, 1]), folder / 'trainlabels.pth')  # 3 features, 2 labels
    with pytest.raises(SystemExit, match='the features and labels do not fit together'):
        eval_knn.main(['--load_features', str(folder), '--nb_knn', '1', *CPU])


def test_linear_block_count_and_released_head_offline(tmp_path, monkeypatch):
    """--n_last_blocks larger than the network, and --evaluate with no local head while offline: one line each."""
    weights = tmp_path / 'vit_tiny.pth'
    torch.save(vits.vit_tiny(patch_size=16).state_dict(), weights)
    common = ['--arch', 'vit_tiny', '--pretrained_weights', str(weights), '--data_path', 'synthetic',
              '--data_limit', '4', '--output_dir', str(tmp_path / 'out'), *CPU]
    with pytest.raises(SystemExit, match='^error: --n_last_blocks 13: vit_tiny has only 12 blocks$'):
        eval_linear.main([*common, '--n_last_blocks', '13'])

    def offline(url, **kwargs):
        raise OSError('<urlopen error [Errno -3] Temporary failure in name resolution>')
    monkeypatch.setattr(torch.hub, 'load_state_dict_from_url', offline)
    with pytest.raises(SystemExit, match='no linear head in .* and no released one for vit_tiny/16'):
        eval_linear.main([*common, '--evaluate'])
    small = tmp_path / 'vit_small8.pth'
    torch.save(vits.vit_small(patch_size=8).state_dict(), small)
    with pytest.raises(SystemExit) as stop:
        eval_linear.main([*common, '--evaluate', '--arch', 'vit_small', '--patch_size', '8',
                          '--pretrained_weights', str(small)])
    assert 'could not download the released linear head (https://dl.fbaipublicfiles.com/dino/' \
           'dino_deitsmall8_pretrain/dino_deitsmall8_linearweights.pth)' in str(stop.value)
    assert 'train a head first' in str(stop.value)


# ----------------------------------------------------------------------------- hubconf.py, utils

def test_hub_entry_points_build_their_networks_and_name_the_released_files(monkeypatch):
    import hubconf
    released = {'dino_vits16': ('dino_deitsmall16_pretrain', 384, 16), 'dino_vits8': ('dino_deitsmall8_pretrain', 384, 8),
                'dino_vitb16': ('dino_vitbase16_pretrain', 768, 16), 'dino_vitb8': ('dino_vitbase8_pretrain', 768, 8),
                'dino_resnet50': ('dino_resnet50_pretrain', 2048, None)}
    assert {name for name in dir(hubconf) if name.startswith('dino_')} == set(released)
    urls = []

    def offline(url, **kwargs):
        urls.append(url)
        raise OSError('offline')
    monkeypatch.setattr(torch.hub, 'load_state_dict_from_url', offline)
    for name, (file, dim, patch) in released.items():
        with pytest.raises(RuntimeError, match=name):
            getattr(hubconf, name)(pretrained=True)
        assert urls.pop() == f'https://dl.fbaipublicfiles.com/dino/{file}/{file}.pth'
        model = getattr(hubconf, name)(pretrained=False).eval()
        with torch.no_grad():
            assert model(torch.zeros(1, 3, 32, 32)).shape == (1, dim)
        if patch is None:
            assert isinstance(model.fc, nn.Identity)
        else:
            assert model.patch_embed.patch_size == patch and len(model.blocks) == 12


def test_init_distributed_mode_reads_slurm_variables(monkeypatch):
    for name in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK'):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr('builtins.print', print)  # setup_for_distributed replaces it
    joined = []
    monkeypatch.setattr(torch.distributed, 'init_process_group', lambda **kwargs: joined.append(kwargs))
    monkeypatch.setattr(torch.distributed, 'barrier', lambda *a, **k: None)
    monkeypatch.setenv('SLURM_PROCID', '3')
    monkeypatch.setenv('SLURM_NTASKS', '4')
    monkeypatch.setenv('SLURM_LOCALID', '1')
    args = argparse.Namespace(device='cpu', dist_url='env://', dist_timeout=60, local_rank=0)
    utils.init_distributed_mode(args)
    assert (args.rank, args.world_size, args.gpu, args.distributed) == (3, 4, 1, True)
    assert [(j['rank'], j['world_size'], j['backend']) for j in joined] == [(3, 4, 'gloo')]


# ----------------------------------------------------------------------------- attention images and videos

@pytest.fixture(scope='module')
def tiny_vit_weights(tmp_path_factory):
    torch.manual_seed(0)
    model = vits.vit_tiny(patch_size=16).eval()
    path = tmp_path_factory.mktemp('vit') / 'vit_tiny16.pth'
    torch.save(model.state_dict(), path)
    return path, model


def test_visualize_attention_of_an_image_file_with_one_size_and_no_threshold(tmp_path, tiny_vit_weights):
    import visualize_attention
    weights, model = tiny_vit_weights
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((60, 100, 3)) * 255).astype(np.uint8)).save(tmp_path / 'photo.png')
    args = visualize_attention.get_args_parser().parse_args(
        ['--arch', 'vit_tiny', '--patch_size', '16', '--pretrained_weights', str(weights), '--device', 'cpu',
         '--image_path', str(tmp_path / 'photo.png'), '--image_size', '48', '--output_dir', str(tmp_path / 'out')])
    visualize_attention.check_args(args)
    visualize_attention.visualize(args)
    # no --threshold: no masks; one --image_size value: the short side, 60x100 -> 48x80 (whole patches)
    written = sorted(p.name for p in (tmp_path / 'out').iterdir() if p.name[0] != '.')  # not the record of them
    assert written == ['attn-head0.png', 'attn-head1.png', 'attn-head2.png', 'img.png']
    from torchvision import transforms
    image = transforms.Resize(48, interpolation=transforms.InterpolationMode.BILINEAR)(
        Image.open(tmp_path / 'photo.png'))
    assert image.size == (80, 48)
    x = transforms.functional.normalize(transforms.functional.to_tensor(image), utils.IMAGENET_MEAN, utils.IMAGENET_STD)
    with torch.no_grad():
        maps = model.cls_attention_maps(x[None])[0]
    for head in range(3):
        saved = np.asarray(Image.open(tmp_path / 'out' / f'attn-head{head}.png'))
        assert saved.shape == (48, 80, 3)
        np.testing.assert_array_equal(saved, evaluation.colorize(evaluation.upsample_patches(maps[head], 16).numpy()))


def test_video_generation_from_a_folder_of_frames_resized_without_outline(tmp_path, tiny_vit_weights):
    import video_generation
    weights, model = tiny_vit_weights
    frames = tmp_path / 'frames'
    frames.mkdir()
    for t in range(11):  # frame-2 comes before frame-10 (natural order)
        frame = np.full((64, 96, 3), 20 + 20 * t, np.uint8)
        frame[20:40, 5 + 7 * t:25 + 7 * t] = (230, 40, 40)
        Image.fromarray(frame).save(frames / f'frame-{t}.png')
    args = video_generation.get_args_parser().parse_args(
        ['--arch', 'vit_tiny', '--patch_size', '16', '--pretrained_weights', str(weights), '--device', 'cpu',
         '--input_path', str(frames), '--output_path', str(tmp_path / 'out'), '--resize', '32',
         '--threshold', '0', '--batch_size', '4', '--fps', '5'])
    video_generation.check_args(args)
    video_generation.generate(args)
    assert not (tmp_path / 'out' / 'frames').exists()  # read in place
    attention = tmp_path / 'out' / 'attention'
    assert sorted(p.name for p in attention.iterdir()) == sorted(f'attn-frame-{t}.jpg' for t in range(11))
    from torchvision import transforms
    video = cv2.VideoCapture(str(tmp_path / 'out' / 'video.mp4'))
    for t in range(11):
        # --resize 32: the short side, 64x96 -> 32x48; --threshold 0: the map alone, no outline
        image = transforms.Resize(32, interpolation=transforms.InterpolationMode.BILINEAR)(
            Image.open(frames / f'frame-{t}.png'))
        x = transforms.functional.normalize(transforms.functional.to_tensor(image), utils.IMAGENET_MEAN,
                                            utils.IMAGENET_STD)
        with torch.no_grad():
            mean_map = model.cls_attention_maps(x[None])[0].mean(0)
        expected = evaluation.colorize(evaluation.upsample_patches(mean_map, 16).numpy(), 'inferno').astype(np.float32)
        saved = np.asarray(Image.open(attention / f'attn-frame-{t}.jpg')).astype(np.float32)
        assert saved.shape == (32, 48, 3) and np.abs(saved - expected).mean() < 4  # JPEG noise only
        ok, frame = video.read()  # the video holds the frames in natural order
        assert ok and np.abs(frame[..., ::-1].astype(np.float32) - saved).mean() < 8
    assert not video.read()[0]
    video.release()


# ----------------------------------------------------------------------------- eval_video_segmentation.py

class PatchColours(nn.Module):
    """Stand-in ViT for label propagation: each 16-pixel patch's feature is its mean colour."""

    def get_intermediate_layers(self, x, n=1):
        patches = F.avg_pool2d(x, 16).flatten(2).transpose(1, 2)
        return [torch.cat([patches.mean(1, keepdim=True), patches], dim=1)]


def write_video(folder, sizes):
    """Frames 00000.jpg... of the given (height, width): a red square moving right over a grey gradient."""
    folder.mkdir(parents=True)
    for t, (height, width) in enumerate(sizes):
        frame = np.tile(np.linspace(60, 160, width, dtype=np.uint8)[None, :, None], (height, 1, 3))
        frame[16:40, 8 + 6 * t:32 + 6 * t] = (40, 40, 220)  # BGR
        cv2.imwrite(str(folder / f'{t:05d}.jpg'), frame)
    return sorted(str(p) for p in folder.iterdir())


def test_video_segmentation_context_queue_neighbourhood_batches_and_frame_sizes(tmp_path, monkeypatch):
    """--n_last_frames 2 (the queue drops older frames), --size_mask_neighborhood 0 (no restriction), --bs 2
    (batches smaller than the video give the same masks), --topk 1; frames or annotations of another size
    stop with one line."""
    import eval_video_segmentation as evs
    frames = write_video(tmp_path / 'video', [(64, 96)] * 6)
    labels = np.zeros((64, 96), np.uint8)
    labels[16:40, 8:32] = 1
    evs.imwrite_indexed(tmp_path / 'first.png', labels, evs.davis_palette())
    first_seg, seg_ori = evs.read_seg(str(tmp_path / 'first.png'), 16)
    contexts, masks = [], []
    propagate = evs.label_propagation

    def recorded(args, feat_tar, feats, segs, mask=None):
        contexts.append(len(feats))
        masks.append(mask)
        return propagate(args, feat_tar, feats, segs, mask)
    monkeypatch.setattr(evs, 'label_propagation', recorded)

    def track(frame_list, bs, seg=(first_seg, seg_ori), **flags):
        args = argparse.Namespace(patch_size=16, n_last_frames=2, size_mask_neighborhood=0, topk=5, bs=bs,
                                  autocast=False, **flags)
        return evs.eval_video_tracking_davis(args, PatchColours(), frame_list, str(tmp_path / f'out{bs}'), *seg,
                                             evs.davis_palette(), torch.device('cpu'))

    in_batches, at_once = track(frames, bs=2), track(frames, bs=6)
    assert contexts[:5] == [1, 2, 3, 3, 3]  # the first frame and at most 2 preceding ones
    assert all(mask is None for mask in masks)
    for a, b in zip(in_batches, at_once):
        np.testing.assert_array_equal(a, b)
    assert (in_batches[-1] == 1).any()  # the square is followed

    # --topk 1: every patch takes the labels of its single most similar context patch
    feats = [F.normalize(torch.randn(6, 8), dim=1) for _ in range(2)]
    target, segs = F.normalize(torch.randn(6, 8), dim=1), [torch.rand(1, 3, 2, 3) for _ in range(2)]
    nearest = (target @ torch.cat(feats).T).argmax(dim=1)
    expected = torch.cat([seg.flatten(2)[0].T for seg in segs])[nearest].T.reshape(1, 3, 2, 3)
    torch.testing.assert_close(propagate(argparse.Namespace(topk=1), target, feats, segs), expected)

    odd = write_video(tmp_path / 'odd', [(64, 96)] * 3 + [(64, 128)] * 3)  # the size changes in the 2nd batch
    with pytest.raises(SystemExit, match='^error: frames of one video differ in size'):
        track(odd, bs=3)
    small_labels = np.zeros((32, 48), np.uint8)
    evs.imwrite_indexed(tmp_path / 'small.png', small_labels, evs.davis_palette())
    with pytest.raises(SystemExit, match='annotations must match the frames'):
        track(frames, bs=2, seg=evs.read_seg(str(tmp_path / 'small.png'), 16))


# ----------------------------------------------------------------------------- benchmark.py

def test_benchmark_text_reports_and_data_mode_with_workers(capsys):
    import benchmark
    threads = torch.get_num_threads()
    parser = benchmark.get_args_parser()
    try:
        step_args = parser.parse_args(['--arch', 'vit_tiny', '--device', 'cpu', '--batch_size_per_device', '2',
                                       '--global_crops_size', '32', '--local_crops_size', '16', '--local_crops_number',
                                       '1', '--out_dim', '64', '--steps', '1', '--warmup_steps', '0'])
        data_args = parser.parse_args(['--mode', 'data', '--num_workers', '2', '--batch_size_per_device', '2',
                                       '--steps', '2', '--warmup_steps', '1', '--local_crops_number', '1',
                                       '--image_width', '80', '--image_height', '60'])
        results = [benchmark.benchmark_step(step_args), benchmark.benchmark_data(data_args)]
    finally:
        torch.set_num_threads(threads)
    capsys.readouterr()
    for result in results:
        benchmark.print_report(result)
    report = capsys.readouterr().out
    step, data = results
    assert f"vit_tiny/16 on cpu (float32, views rendered on cpu, {step['threads']} threads), 2 images/step" in report
    assert f"images/s (median of 1 steps): {step['images_per_s']:.2f}" in report
    assert f"model GFLOP/image: {step['flops_per_image'] / 1e9:.2f}" in report
    assert f"MFU {100 * step['mfu']:.1f}%" in report
    # data mode: two DataLoader workers, and the per-worker figure is the total over 2
    assert data['num_workers'] == 2 and data['images_per_s_per_worker'] == pytest.approx(data['images_per_s'] / 2)
    assert "data pipeline, 2x224 + 1x96 crops of 80x60 JPEGs" in report
    assert (f"DataLoader (--augment_on cpu), 2 worker(s): {data['images_per_s']:.1f} images/s "
            f"({data['images_per_s_per_worker']:.1f} per worker)") in report


# ----------------------------------------------------------------------------- eval_image_retrieval.py

def test_retrieval_on_rparis6k_multiscale_with_the_default_imsize(tmp_path, monkeypatch, tiny_vit_weights):
    """--dataset rparis6k reads rparis6k/; --multiscale true averages scales 1, 1/sqrt(2), 1/2; without --imsize
    the longer side is shrunk to 224 (smaller images are kept)."""
    import pickle
    import eval_image_retrieval
    weights, model = tiny_vit_weights
    folder = tmp_path / 'rparis6k' / 'jpg'
    folder.mkdir(parents=True)
    shapes = imagedata.SyntheticShapes('train', image_size=64)
    sizes = [(300, 200), (64, 48), (48, 64), (80, 80), (64, 64), (96, 64)]
    names = [f'paris_{i}' for i in range(len(sizes))]
    for i, (name, size) in enumerate(zip(names, sizes)):
        shapes.render(i).resize(size, Image.BICUBIC).save(folder / f'{name}.jpg', quality=95)
    gnd = [{'bbx': [0, 0, w, h], 'easy': [k], 'hard': [], 'junk': []} for k, (w, h) in enumerate(sizes[:2])]
    with open(tmp_path / 'rparis6k' / 'gnd_rparis6k.pkl', 'wb') as f:
        pickle.dump({'imlist': names, 'qimlist': names[:2], 'gnd': gnd}, f)
    extracted, reported = [], []
    extract_features = evaluation.extract_features
    monkeypatch.setattr(evaluation, 'extract_features', lambda *a, **k: extracted.append(extract_features(*a, **k))
                        or extracted[-1])
    monkeypatch.setattr(eval_image_retrieval, 'report', lambda ranks, gnd, dataset: reported.append(dataset))
    parser = argparse.ArgumentParser(parents=[eval_image_retrieval.get_args_parser()])
    eval_image_retrieval.eval_retrieval(parser.parse_args(
        ['--data_path', str(tmp_path), '--dataset', 'rparis6k', '--multiscale', 'true', '--arch', 'vit_tiny',
         '--patch_size', '16', '--pretrained_weights', str(weights), '--num_workers', '0', '--device', 'cpu']))
    assert reported == ['rparis6k']

    def expected_features(image):
        if max(image.size) > 224:
            image = image.resize((224, round(224 * image.size[1] / image.size[0])), Image.LANCZOS)
        x = transforms.functional.normalize(transforms.functional.to_tensor(image), utils.IMAGENET_MEAN,
                                            utils.IMAGENET_STD)[None]
        with torch.no_grad():
            single = model(x)
            scaled = [model(F.interpolate(x, scale_factor=s, mode='bilinear', align_corners=False))
                      for s in (2 ** -0.5, 0.5)]
        return F.normalize((single + sum(scaled)) / 3, dim=1)[0], F.normalize(single, dim=1)[0]
    from torchvision import transforms
    expected, single_scale = zip(*(expected_features(Image.open(folder / f'{n}.jpg').convert('RGB')) for n in names))
    db, queries = extracted
    torch.testing.assert_close(db, torch.stack(expected), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(queries, torch.stack(expected[:2]), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(db, torch.stack(single_scale), atol=1e-3)


def test_linear_two_processes_with_a_rank_without_validation_images_match_one(tmp_path, tiny_vit_weights):
    """The 2-process path (DDP head, gathered meters): one image in each split, so rank 1 validates nothing;
    both processes train on that same image (the sampler pads), so the head and the log equal 1 process's."""
    weights, _ = tiny_vit_weights
    common = ['--arch', 'vit_tiny', '--pretrained_weights', weights, '--data_path', 'synthetic', '--data_limit', '1',
              '--num_labels', '10', '--epochs', '2', '--lr', '1', *CPU]
    # the same global batch (it scales the learning rate)
    eval_linear.main([str(a) for a in [*common, '--batch_size_per_device', 4, '--output_dir', tmp_path / 'one']])
    run_torchrun('eval_linear.py', 2, *common, '--batch_size_per_device', 2, '--output_dir', tmp_path / 'two')
    logs = [[json.loads(line) for line in (tmp_path / name / 'log.txt').read_text().splitlines()]
            for name in ('one', 'two')]
    assert len(logs[0]) == len(logs[1]) == 2
    for one, two in zip(*logs):
        assert one.keys() == two.keys() and all(two[k] == pytest.approx(v, rel=1e-4, abs=1e-6) for k, v in one.items())
    heads = [utils.load_checkpoint_or_exit(tmp_path / name / 'checkpoint.pth.tar')['state_dict']
             for name in ('one', 'two')]
    for name, value in heads[0].items():
        torch.testing.assert_close(heads[1][name], value, rtol=1e-4, atol=1e-6)
