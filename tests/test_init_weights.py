"""main_dino --init_weights: a new run started from a backbone file (the original DINO's layout), from a full DINO
checkpoint (student and teacher with heads) or from a checkpoint of this project; one error line for each file
that cannot start the run, and a checkpoint.pth in --output_dir wins."""
import argparse
import os
import shutil

import pytest
import timm
import torch
from safetensors.torch import save_file

import main_dino
import utils
import vision_transformer as vits
from conftest import process_state_kept

RUN = ['--arch', 'vit_tiny', '--patch_size', '16', '--data_path', 'synthetic', '--global_crops_size', '32',
       '--local_crops_size', '16', '--local_crops_number', '1', '--out_dim', '64', '--batch_size_per_device', '8',
       '--data_limit', '16', '--epochs', '1', '--num_workers', '0', '--warmup_epochs', '0', '--freeze_last_layer',
       '0', '--device', 'cpu']


def original_backbone_keys(depth=12):
    """The state-dict keys of the original DINO's VisionTransformer with num_classes=0 (its released
    *_pretrain.pth files), written out from its module names."""
    block = [f'{layer}.{p}' for layer in ('norm1', 'attn.qkv', 'attn.proj', 'norm2', 'mlp.fc1', 'mlp.fc2')
             for p in ('weight', 'bias')]
    return {'cls_token', 'pos_embed', 'patch_embed.proj.weight', 'patch_embed.proj.bias', 'norm.weight',
            'norm.bias'} | {f'blocks.{i}.{key}' for i in range(depth) for key in block}


@pytest.fixture(scope='module')
def original_file(tmp_path_factory):
    """A vit_tiny/16 backbone written by timm's VisionTransformer (an implementation apart from this repository's)
    in the original DINO's layout, and that model, whose features the file's backbone has."""
    torch.manual_seed(3)
    model = timm.create_model('vit_tiny_patch16_224', pretrained=False, num_classes=0).eval()
    state_dict = model.state_dict()
    assert set(state_dict) == original_backbone_keys()
    assert state_dict['pos_embed'].shape == (1, 197, 192)
    path = tmp_path_factory.mktemp('original') / 'dino_vittiny16_pretrain.pth'
    torch.save(state_dict, path)
    return path, model


@pytest.fixture(scope='module')
def trained(original_file, tmp_path_factory):
    """The output folder of a run started from the original-layout file, with a teacher momentum of 1: its teacher
    keeps its step-0 weights to the end."""
    out = tmp_path_factory.mktemp('trained')
    with process_state_kept():
        main_dino.main([str(a) for a in [*RUN, '--init_weights', original_file[0], '--output_dir', out,
                                         '--momentum_teacher', '1', '--lr', '0.01']])
    return out


def build_run(argv):
    """The training run main_dino builds for `argv` (checked as main() checks it), before any step."""
    args = utils.parse_checked_args(main_dino.get_args_parser(), main_dino.check_args, [str(a) for a in argv])
    device = utils.start_run(args, show_args=False)
    return main_dino.build_training_run(args, device, iters_per_epoch=2)


def same_weights(module, state_dict):
    own = module.state_dict()
    return all(torch.equal(own[k], v) for k, v in state_dict.items())


def test_a_file_in_the_original_layout_trains_and_its_teacher_starts_with_its_features(
        original_file, trained, tmp_path, restored_process_state, capsys):
    path, model = original_file
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(images)
    run = build_run([*RUN, '--init_weights', path, '--output_dir', tmp_path / 'o'])
    assert 'Starting from the backbone in' in capsys.readouterr().out
    with torch.no_grad():
        torch.testing.assert_close(run.teacher_without_ddp.backbone(images), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(run.student.module.backbone.eval()(images), expected, atol=1e-5, rtol=1e-5)
    # the teacher equals the student at step 0, heads included (the heads start fresh)
    assert same_weights(run.teacher_without_ddp, run.student.module.state_dict())

    # the whole run trains from it; with a teacher momentum of 1 the teacher keeps its step-0 weights to the end
    checkpoint = torch.load(trained / 'checkpoint.pth', weights_only=False)
    assert checkpoint['epoch'] == 1
    teacher, _ = utils.build_backbone('vit_tiny', 16)
    teacher.load_state_dict({k.removeprefix('backbone.'): v for k, v in checkpoint['teacher'].items()
                             if k.startswith('backbone.')})
    with torch.no_grad():
        torch.testing.assert_close(teacher.eval()(images), expected, atol=1e-5, rtol=1e-5)
    student = checkpoint['student']['module.backbone.blocks.0.attn.qkv.weight']
    assert not torch.equal(student, model.state_dict()['blocks.0.attn.qkv.weight'])  # the student trained


def full_checkpoint(tmp_path, out_dim=64):
    """A released-style full checkpoint (*_pretrain_full_checkpoint.pth): a DDP student, a teacher apart from it,
    the loss's centre, epoch and args."""
    networks = {}
    for seed, name in ((1, 'student'), (2, 'teacher')):
        torch.manual_seed(seed)
        networks[name] = utils.MultiCropWrapper(vits.vit_tiny(patch_size=16), vits.DINOHead(192, out_dim)).state_dict()
    path = tmp_path / 'dino_vittiny16_pretrain_full_checkpoint.pth'
    torch.save({'student': {f'module.{k}': v for k, v in networks['student'].items()}, 'teacher': networks['teacher'],
                'dino_loss': {'center': torch.randn(1, out_dim)}, 'epoch': 100,
                'args': argparse.Namespace(arch='vit_tiny', patch_size=16, out_dim=out_dim)}, path)
    return path, networks


def test_a_full_checkpoint_gives_student_teacher_heads_and_centre(tmp_path, restored_process_state, capsys):
    path, networks = full_checkpoint(tmp_path)
    run = build_run([*RUN, '--init_weights', path, '--output_dir', tmp_path / 'o'])
    assert same_weights(run.student.module, networks['student'])
    assert same_weights(run.teacher_without_ddp, networks['teacher'])
    assert torch.equal(run.dino_loss.center, torch.load(path, weights_only=False)['dino_loss']['center'])
    out = capsys.readouterr().out
    assert 'its student and teacher with their heads and the centre' in out and 'not a resume' in out

    # --init_heads false: the backbones only; the heads start fresh, the teacher's a copy of the student's
    run = build_run([*RUN, '--init_weights', path, '--out_dim', '32', '--init_heads', 'false',
                     '--output_dir', tmp_path / 'o'])
    backbones = {name: {k: v for k, v in weights.items() if k.startswith('backbone.')}
                 for name, weights in networks.items()}
    assert same_weights(run.student.module, backbones['student'])
    assert same_weights(run.teacher_without_ddp, backbones['teacher'])
    head = run.student.module.head.state_dict()
    assert same_weights(run.teacher_without_ddp.head, head) and head['last_layer.weight_v'].shape == (32, 256)
    assert not run.dino_loss.center.any()


def test_a_checkpoint_of_this_project_starts_a_new_run_and_its_size_is_resized(
        trained, tmp_path, restored_process_state, capsys):
    first = torch.load(trained / 'checkpoint.pth', weights_only=False)
    # weights only: the new run starts at epoch 0 with a fresh optimizer (a resume would have nothing left to do)
    main_dino.main([str(a) for a in [*RUN, '--init_weights', trained / 'checkpoint.pth',
                                     '--output_dir', tmp_path / 'second']])
    out = capsys.readouterr().out
    assert 'Weights only: the optimizer, the schedules and the epoch start fresh' in out and 'not a resume' in out
    assert 'Epoch: [0/1]' in out and 'Found checkpoint' not in out
    second = torch.load(tmp_path / 'second' / 'checkpoint.pth', weights_only=False)
    assert second['epoch'] == 1 and second['optimizer']['state'][0]['step'] == first['optimizer']['state'][0]['step']

    # tools/export_backbone.py's file for 64-pixel images: its 4x4 position embedding is resized to the 14x14 stored
    backbone = {k.removeprefix('backbone.'): v for k, v in first['teacher'].items() if k.startswith('backbone.')}
    pos_embed = backbone['pos_embed']
    backbone['pos_embed'] = torch.cat([pos_embed[:, :1], torch.full((1, 16, 192), 0.5)], dim=1)
    save_file(backbone, tmp_path / 'backbone.safetensors')
    run = build_run([*RUN, '--init_weights', tmp_path / 'backbone.safetensors', '--output_dir', tmp_path / 'o'])
    assert 'resized (bicubic) to the 14x14 this ViT stores' in capsys.readouterr().out
    resized = run.teacher_without_ddp.backbone.pos_embed
    assert torch.equal(resized[:, :1], pos_embed[:, :1])
    torch.testing.assert_close(resized[:, 1:], torch.full((1, 196, 192), 0.5))  # a constant field stays constant


def bad_file(kind, tmp_path, original):
    """(file, flags, fragments of the error line) of each file that cannot start a run."""
    if kind == 'another_arch':
        torch.save(vits.vit_small(patch_size=16).state_dict(), tmp_path / 'small.pth')
        return tmp_path / 'small.pth', [], ['holds a backbone of --arch vit_small --patch_size 16',
                                            'not of --arch vit_tiny --patch_size 16', 'pass --arch vit_small']
    if kind == 'another_patch_size':
        torch.save(vits.vit_tiny(patch_size=8).state_dict(), tmp_path / 'tiny8.pth')
        return tmp_path / 'tiny8.pth', [], ['--arch vit_tiny --patch_size 8', 'pass --arch vit_tiny --patch_size 8']
    if kind == 'head_out_dim':
        path, _ = full_checkpoint(tmp_path, out_dim=128)
        return path, [], ['heads have 128 outputs, not --out_dim 64', 'pass --out_dim 128',
                          '--init_heads false to start fresh heads']
    if kind == 'text_file':
        (tmp_path / 'notes.txt').write_text('not weights')
        return tmp_path / 'notes.txt', [], ['not a PyTorch checkpoint']
    if kind == 'linear_head':
        torch.save({'state_dict': {'module.linear.weight': torch.zeros(10, 192)}}, tmp_path / 'linear.pth')
        return tmp_path / 'linear.pth', [], ['is a linear classifier', 'not a backbone']
    if kind == 'no_weights':
        torch.save({'epoch': 3, 'note': 'hello'}, tmp_path / 'plain.pth')
        return tmp_path / 'plain.pth', [], ['is not a file of weights']
    if kind == 'part_of_a_backbone':
        state_dict = torch.load(original)
        del state_dict['blocks.11.mlp.fc2.bias']
        torch.save(state_dict, tmp_path / 'part.pth')
        return tmp_path / 'part.pth', [], ['lacks 1 of the --arch vit_tiny backbone', 'blocks.11.mlp.fc2.bias']
    if kind == 'missing':
        return tmp_path / 'missing.pth', [], ['--init_weights', 'not found']
    if kind == 'damaged_safetensors':
        (tmp_path / 'cut.safetensors').write_bytes(b'\x10\x00')
        return tmp_path / 'cut.safetensors', [], ['not a readable safetensors file']


@pytest.mark.parametrize('kind', ['another_arch', 'another_patch_size', 'head_out_dim', 'text_file', 'linear_head',
                                  'no_weights', 'part_of_a_backbone', 'missing', 'damaged_safetensors'])
def test_a_file_that_cannot_start_the_run_is_one_line_before_any_work(kind, original_file, tmp_path,
                                                                      restored_process_state, capsys):
    path, flags, fragments = bad_file(kind, tmp_path, original_file[0])
    with pytest.raises(SystemExit) as stop:
        main_dino.main([str(a) for a in [*RUN, *flags, '--init_weights', path, '--output_dir', tmp_path / 'o']])
    message = stop.value.code
    assert isinstance(message, str) and message.startswith('error: ') and '\n' not in message, message
    for fragment in fragments:
        assert fragment in message, message
    assert 'Traceback' not in capsys.readouterr().err
    assert not os.path.exists(tmp_path / 'o')  # before any work: nothing written


def test_a_checkpoint_in_the_output_dir_wins_over_init_weights(trained, tmp_path, restored_process_state, capsys):
    out = tmp_path / 'o'
    out.mkdir()
    shutil.copy(trained / 'checkpoint.pth', out / 'checkpoint.pth')
    written = (out / 'checkpoint.pth').stat().st_mtime_ns
    (tmp_path / 'notes.txt').write_text('not weights: never read, since the run resumes')
    main_dino.main([str(a) for a in [*RUN, '--init_weights', tmp_path / 'notes.txt', '--output_dir', out]])
    printed = capsys.readouterr().out
    assert f"{out / 'checkpoint.pth'} exists: this run resumes it, and --init_weights" in printed
    assert 'Found checkpoint' in printed and 'Starting from' not in printed
    assert (out / 'checkpoint.pth').stat().st_mtime_ns == written  # all epochs done: nothing more to train
