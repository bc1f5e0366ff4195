"""Core DINO: backbones, head, shared helpers, loss and the training script."""
import argparse
import importlib.util
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

import main_dino
import utils
import vision_transformer as vits
from conftest import TINY_TRAIN_ARGS, run_script, run_torchrun


# ----------------------------------------------------------------------------- backbones

# every size on the smaller networks; vit_base, seconds a pass at 224 pixels, on the non-square one only
@pytest.mark.parametrize('arch,embed_dim,heads,size', [
    *[(arch, dim, heads, size) for arch, dim, heads in [('vit_tiny', 192, 3), ('vit_small', 384, 6)]
      for size in [(224, 224), (96, 96), (64, 96)]],
    ('vit_base', 768, 12, (64, 96))])
def test_vit_output_and_attention_shapes(arch, embed_dim, heads, size):
    torch.manual_seed(0)
    model = vits.__dict__[arch](patch_size=16).eval()
    x = torch.randn(2, 3, *size)
    tokens = 1 + (size[0] // 16) * (size[1] // 16)
    with torch.no_grad():
        assert model(x).shape == (2, embed_dim)
        attn = model.get_last_selfattention(x)
        layers = model.get_intermediate_layers(x, n=4)
    assert attn.shape == (2, heads, tokens, tokens)
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, heads, tokens))
    assert len(layers) == 4 and all(t.shape == (2, tokens, embed_dim) for t in layers)


def test_vit_architecture_constants():
    model = vits.vit_small(patch_size=8)
    assert len(model.blocks) == 12
    block = model.blocks[0]
    assert block.mlp.fc1.out_features == 4 * 384
    assert block.attn.qkv.bias is not None
    assert block.norm1.eps == 1e-6 and model.norm.eps == 1e-6
    assert vits.deit_small is vits.vit_small and vits.deit_tiny is vits.vit_tiny


def _explicit_forward(self, x, return_attention=False):
    out, attn = vits.Attention.forward(self, x, return_attention=True)
    return out, (attn if return_attention else None)


def test_sdpa_and_explicit_attention_agree(monkeypatch):
    torch.manual_seed(0)
    model = vits.vit_small(patch_size=16).eval()
    x = torch.randn(2, 3, 96, 128)
    with torch.no_grad():
        fused = model(x)
        fused_layers = model.get_intermediate_layers(x, n=2)
        for blk in model.blocks:
            monkeypatch.setattr(blk.attn, 'forward', _explicit_forward.__get__(blk.attn))
        explicit = model(x)
        explicit_layers = model.get_intermediate_layers(x, n=2)
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)
    for a, b in zip(fused_layers, explicit_layers):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def bicubic_matrix(size_in, size_out):
    """(size_out, size_in) weights of a 1-D bicubic resize (Keys' kernel, a = -0.75, edges repeated), at
    the original DINO's scale factor (size_out + 0.1) / size_in, with half-pixel centres."""
    def kernel(d, a=-0.75):
        d = abs(d)
        if d <= 1:
            return (a + 2) * d ** 3 - (a + 3) * d ** 2 + 1
        return a * d ** 3 - 5 * a * d ** 2 + 8 * a * d - 4 * a if d < 2 else 0.
    weights = np.zeros((size_out, size_in))
    for i in range(size_out):
        source = (i + 0.5) * size_in / (size_out + 0.1) - 0.5
        left = math.floor(source)
        for j in range(left - 1, left + 3):
            weights[i, min(max(j, 0), size_in - 1)] += kernel(source - j)
    return torch.from_numpy(weights).float()


def test_position_embedding_interpolation_against_independent_bicubic():
    torch.manual_seed(0)
    model = vits.vit_tiny(patch_size=16).eval()
    assert model.interpolate_pos_encoding(torch.zeros(1, 197, 192), 224, 224) is model.pos_embed
    grid = model.pos_embed[0, 1:].detach().reshape(14, 14, 192)
    for height, width in [(64, 96), (96, 96), (288, 160)]:
        rows, cols = height // 16, width // 16
        expected = torch.einsum('ri,ijd,cj->rcd', bicubic_matrix(14, rows), grid, bicubic_matrix(14, cols))
        expected = torch.cat([model.pos_embed[0, :1].detach(), expected.reshape(rows * cols, 192)])
        resized = model.interpolate_pos_encoding(torch.zeros(1, 1 + rows * cols, 192), height, width)
        torch.testing.assert_close(resized[0].detach(), expected, atol=1e-5, rtol=1e-4)

        # and the forward pass uses them: patch tokens + [CLS], plus the resized embedding, through the blocks
        x = torch.randn(2, 3, height, width)
        with torch.no_grad():
            tokens = model.patch_embed(x)
            tokens = torch.cat([model.cls_token.expand(2, -1, -1), tokens], dim=1) + expected
            for block in model.blocks:
                tokens = block(tokens)
            torch.testing.assert_close(model(x), model.norm(tokens)[:, 0], atol=1e-5, rtol=1e-4)


def test_drop_path_keeps_expectation():
    torch.manual_seed(0)
    x = torch.ones(20000, 4)
    out = vits.drop_path(x, 0.3, training=True)
    kept = (out[:, 0] != 0).float().mean().item()
    assert abs(kept - 0.7) < 0.02
    assert torch.allclose(out[out != 0], torch.full_like(out[out != 0], 1 / 0.7))
    assert vits.drop_path(x, 0.3, training=False) is x


# ----------------------------------------------------------------------------- state dict names

def expected_vit_keys(depth=12):
    keys = {'cls_token', 'pos_embed', 'patch_embed.proj.weight', 'patch_embed.proj.bias', 'norm.weight', 'norm.bias'}
    for i in range(depth):
        for name in ('norm1', 'norm2', 'attn.qkv', 'attn.proj', 'mlp.fc1', 'mlp.fc2'):
            keys |= {f'blocks.{i}.{name}.weight', f'blocks.{i}.{name}.bias'}
    return keys


def test_vit_state_dict_keys_match_released_checkpoints():
    state = vits.vit_small(patch_size=16).state_dict()
    assert set(state) == expected_vit_keys()
    assert state['pos_embed'].shape == (1, 197, 384)
    assert state['cls_token'].shape == (1, 1, 384)
    assert state['patch_embed.proj.weight'].shape == (384, 3, 16, 16)
    assert state['blocks.0.attn.qkv.weight'].shape == (1152, 384)


def test_dino_head_keys_and_weight_norm():
    head = vits.DINOHead(384, 1000)
    state = head.state_dict()
    assert set(state) == {'mlp.0.weight', 'mlp.0.bias', 'mlp.2.weight', 'mlp.2.bias', 'mlp.4.weight',
                          'mlp.4.bias', 'last_layer.weight_g', 'last_layer.weight_v'}
    assert state['mlp.4.weight'].shape == (256, 2048)
    assert state['last_layer.weight_g'].shape == (1000, 1)
    assert state['last_layer.weight_v'].shape == (1000, 256)
    assert not head.last_layer.weight_g.requires_grad
    assert torch.all(head.last_layer.weight_g == 1)
    # the effective weight is the PyTorch weight-norm reparametrisation g * v / ||v||
    reference = torch._weight_norm(head.last_layer.weight_v, head.last_layer.weight_g, 0)
    torch.testing.assert_close(head.last_layer.weight, reference)
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(1000))
    trainable = vits.DINOHead(384, 10, norm_last_layer=False)
    assert trainable.last_layer.weight_g.requires_grad


def test_dino_head_with_batchnorm_and_depth():
    head = vits.DINOHead(64, 32, use_bn=True, nlayers=4, hidden_dim=128, bottleneck_dim=16)
    kinds = [nn.Linear if isinstance(m, nn.Linear) else type(m) for m in head.mlp]
    assert kinds == [nn.Linear, nn.BatchNorm1d, nn.GELU] * 3 + [nn.Linear]
    out = head(torch.randn(5, 64))
    assert out.shape == (5, 32)


def test_multicrop_wrapper_equals_per_crop_forward():
    torch.manual_seed(0)
    backbone = vits.vit_tiny(patch_size=16).eval()
    head = vits.DINOHead(192, 64).eval()
    wrapper = utils.MultiCropWrapper(backbone, head)
    crops = [torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64), torch.randn(2, 3, 32, 32)]
    with torch.no_grad():
        grouped = wrapper(crops)
        separate = torch.cat([head(backbone(c)) for c in crops])
    torch.testing.assert_close(grouped, separate, atol=1e-5, rtol=1e-5)


def test_resnet_backbone_in_wrapper_is_torchvisions_network_without_fc():
    from torchvision import models
    torch.manual_seed(0)
    model, dim = utils.build_backbone('resnet18')
    assert dim == 512
    head = vits.DINOHead(dim, 16, use_bn=True)
    wrapper = utils.MultiCropWrapper(model, head).eval()
    reference = models.resnet18().eval()
    missing = reference.load_state_dict(model.state_dict(), strict=False).missing_keys
    assert missing == ['fc.weight', 'fc.bias']
    without_fc = nn.Sequential(*list(reference.children())[:-1], nn.Flatten())  # torchvision's forward up to fc
    crops = [torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64), torch.randn(2, 3, 32, 32)]
    with torch.no_grad():
        features = torch.cat([without_fc(c) for c in crops])
        assert features.shape == (6, 512)
        torch.testing.assert_close(wrapper.backbone(crops[0]), features[:2])
        torch.testing.assert_close(wrapper(crops), head(features), atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- schedules & optimisation

def test_cosine_scheduler_known_points():
    schedule = utils.cosine_scheduler(1.0, 0.1, epochs=4, niter_per_ep=5, warmup_epochs=1)
    assert len(schedule) == 20
    assert schedule[0] == 0.0
    assert schedule[4] == pytest.approx(1.0)            # end of the linear warm-up
    assert schedule[5] == pytest.approx(1.0)            # first cosine step
    assert schedule[5 + 15 // 2] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 7 / 15)))
    assert schedule[-1] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 14 / 15)))
    assert np.all(np.diff(schedule[5:]) <= 0)
    momentum = utils.cosine_scheduler(0.996, 1, epochs=10, niter_per_ep=1)
    assert momentum[0] == pytest.approx(0.996) and momentum[-1] < 1 and momentum[-1] > 0.9999


def test_params_groups_exclude_biases_and_norms():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    regularized, not_regularized = utils.get_params_groups(model)
    assert [p.shape for p in regularized['params']] == [torch.Size([4, 4])]
    assert len(not_regularized['params']) == 3 and not_regularized['weight_decay'] == 0


def test_clip_gradients_matches_per_parameter_definition():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 4))
    for p in model.parameters():
        p.grad = torch.randn_like(p) * torch.rand(()) * 10
    expected = []
    for p in model.parameters():
        norm = p.grad.norm(2)
        coef = 3.0 / (norm + 1e-6)
        expected.append(p.grad * coef if coef < 1 else p.grad.clone())
    norms = utils.clip_gradients(model, 3.0)
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.grad, e)
    assert norms.shape == (4,)
    assert all(p.grad.norm() <= 3.0 + 1e-4 for p in model.parameters())


def test_cancel_gradients_last_layer():
    wrapper = utils.MultiCropWrapper(vits.vit_tiny(), vits.DINOHead(192, 8, norm_last_layer=False))
    for p in wrapper.parameters():
        p.grad = torch.ones_like(p)
    utils.cancel_gradients_last_layer(epoch=1, model=wrapper, freeze_last_layer=1)
    assert wrapper.head.last_layer.weight_v.grad is not None
    utils.cancel_gradients_last_layer(epoch=0, model=wrapper, freeze_last_layer=1)
    assert wrapper.head.last_layer.weight_v.grad is None and wrapper.head.last_layer.weight_g.grad is None
    assert wrapper.head.mlp[0].weight.grad is not None


def test_lars_step_matches_definition():
    p = nn.Parameter(torch.tensor([[3.0, 4.0]]))
    p.grad = torch.tensor([[0.6, 0.8]])
    opt = utils.LARS([p], lr=0.1, weight_decay=0.5, momentum=0.9, eta=0.001)
    opt.step()
    update = torch.tensor([[0.6, 0.8]]) + 0.5 * torch.tensor([[3.0, 4.0]])       # norm 3.5
    expected = torch.tensor([[3.0, 4.0]]) - 0.1 * update * (0.001 * 5.0 / 3.5)
    torch.testing.assert_close(p.data, expected)


def test_bool_flag():
    assert utils.bool_flag('True') and utils.bool_flag('on') and not utils.bool_flag('0')
    with pytest.raises(argparse.ArgumentTypeError):
        utils.bool_flag('maybe')


# ----------------------------------------------------------------------------- DINO loss

def reference_dino_loss(student, teacher, center, ncrops, student_temp, teacher_temp):
    """Straight from the paper's definition, with numpy and explicit loops."""
    student, teacher, center = student.double().numpy(), teacher.double().numpy(), center.double().numpy()
    batch = teacher.shape[0] // 2

    def softmax(z):
        z = z - z.max(-1, keepdims=True)
        e = np.exp(z)
        return e / e.sum(-1, keepdims=True)

    total, terms = 0.0, 0
    for iq in range(2):
        for v in range(ncrops):
            if v == iq:
                continue
            pair = 0.0
            for b in range(batch):
                q = softmax((teacher[iq * batch + b] - center[0]) / teacher_temp)
                log_p = np.log(softmax(student[v * batch + b] / student_temp))
                pair += -(q * log_p).sum()
            total += pair / batch
            terms += 1
    return total / terms


def test_dino_loss_against_hand_computation():
    torch.manual_seed(0)
    ncrops, batch, dim = 4, 3, 7
    loss_fn = main_dino.DINOLoss(dim, ncrops, warmup_teacher_temp=0.04, teacher_temp=0.07,
                                 warmup_teacher_temp_epochs=3, nepochs=5)
    loss_fn.center = torch.randn(1, dim) * 0.1
    center_before = loss_fn.center.clone()
    student, teacher = torch.randn(ncrops * batch, dim), torch.randn(2 * batch, dim)
    epoch = 1
    temp = 0.04 + (0.07 - 0.04) * epoch / 2   # linear warm-up over 3 epochs: 0.04, 0.055, 0.07
    assert loss_fn.teacher_temp_schedule[epoch] == pytest.approx(temp)
    loss = loss_fn(student, teacher, epoch)
    assert loss.item() == pytest.approx(reference_dino_loss(student, teacher, center_before, ncrops, 0.1, temp),
                                        rel=1e-5)
    expected_center = center_before * 0.9 + teacher.mean(0, keepdim=True) * 0.1
    torch.testing.assert_close(loss_fn.center, expected_center)


def test_dino_loss_hand_worked_uniform_case():
    # identical zero logits everywhere: every term is the entropy of a uniform distribution, log(dim)
    loss_fn = main_dino.DINOLoss(5, 3, 0.04, 0.04, 0, 1)
    loss = loss_fn(torch.zeros(6, 5), torch.zeros(4, 5), 0)
    assert loss.item() == pytest.approx(math.log(5))


# ----------------------------------------------------------------------------- devices

@pytest.mark.skipif(importlib.util.find_spec('habana_frameworks') is not None,
                    reason="Habana's PyTorch packages are installed here: --device hpu is not missing")
def test_auto_device_without_habana_and_missing_hpu_is_one_clear_line(tmp_path):
    assert utils.resolve_device_name('auto') == ('cuda' if torch.cuda.is_available() else 'cpu')
    proc = run_script('main_dino.py', '--device', 'hpu', '--data_path', 'synthetic', '--output_dir', tmp_path,
                      check=False, timeout=120)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and 'habana_frameworks' in lines[0] and 'Traceback' not in proc.stderr


def test_autocast_context_dtypes():
    with utils.autocast_context('cpu', autocast=True):
        assert (torch.randn(2, 2) @ torch.randn(2, 2)).dtype == torch.bfloat16
    with utils.autocast_context('cpu', autocast=False):
        assert (torch.randn(2, 2) @ torch.randn(2, 2)).dtype == torch.float32


def test_ops_lists_are_habanas():
    bf16 = open(utils.REPO_DIR + '/ops_bf16.txt').read().split()
    fp32 = open(utils.REPO_DIR + '/ops_fp32.txt').read().split()
    assert bf16 == ['add', 'addmm', 'bmm', 'dot', 'dropout', 'iadd', 'layer_norm', 'linear', 'matmul', 'mean',
                    'mm', 'mul', 'rsub']
    assert fp32 == ['binary_cross_entropy', 'cross_entropy', 'embedding', 'log_softmax', 'softmax']


# ----------------------------------------------------------------------------- checkpoints

def test_load_pretrained_weights_from_full_training_checkpoint(tmp_path):
    torch.manual_seed(0)
    source = vits.vit_tiny(patch_size=16)
    wrapped = utils.SingleProcess(utils.MultiCropWrapper(source, vits.DINOHead(192, 32)))
    path = tmp_path / 'checkpoint.pth'
    torch.save({'teacher': wrapped.state_dict(), 'student': {}, 'args': argparse.Namespace(arch='vit_tiny')}, path)
    target = vits.vit_tiny(patch_size=16)
    msg = utils.load_pretrained_weights(target, str(path), 'teacher', 'vit_tiny', 16)
    assert not msg.missing_keys
    for k, v in source.state_dict().items():
        torch.testing.assert_close(target.state_dict()[k], v)


def test_released_weights_offline_is_one_clear_line(monkeypatch):
    def offline(*args, **kwargs):
        raise OSError('network is unreachable')
    monkeypatch.setattr(torch.hub, 'load_state_dict_from_url', offline)
    with pytest.raises(SystemExit) as exc:
        utils.load_pretrained_weights(vits.vit_small(patch_size=16), '', 'teacher', 'vit_small', 16)
    assert 'dino_deitsmall16_pretrain.pth' in str(exc.value) and '--pretrained_weights' in str(exc.value)


def test_launcher_local_rank_spellings():
    parser = main_dino.get_args_parser()
    assert parser.parse_args(['--local-rank', '3']).local_rank == 3
    assert parser.parse_args(['--local_rank', '2']).local_rank == 2
    assert parser.parse_args(['--batch_size_per_gpu', '7']).batch_size_per_device == 7
    assert parser.parse_args(['--hmp']).autocast


def test_load_pretrained_weights_wrong_arch_is_clear(tmp_path):
    path = tmp_path / 'small.pth'
    torch.save(vits.vit_small(patch_size=16).state_dict(), path)
    with pytest.raises(SystemExit) as exc:
        utils.load_pretrained_weights(vits.vit_tiny(patch_size=16), str(path), 'teacher', 'vit_tiny', 16)
    assert 'does not match --arch vit_tiny' in str(exc.value)


# ----------------------------------------------------------------------------- training runs

# the tiny run at 32/16-pixel crops: what these tests check does not depend on the crops' size
SMALL_CROPS = [*TINY_TRAIN_ARGS, '--global_crops_size', '32', '--local_crops_size', '16']


def read_log(out_dir):
    return [json.loads(line) for line in (out_dir / 'log.txt').read_text().splitlines()]


def test_training_writes_logs_checkpoints_and_events_and_resumes(tmp_path):
    """The plumbing of a run: log lines, checkpoints, TensorBoard scalars, resuming where it stopped.

    Whether the network learns is not judged here: a falling loss would not show it (the loss of a
    collapsing run falls too).
    """
    args = [*SMALL_CROPS, '--data_limit', '32', '--output_dir', tmp_path]
    run_script('main_dino.py', *args, '--epochs', '2')
    log = read_log(tmp_path)
    assert [entry['epoch'] for entry in log] == [0, 1]
    assert all(math.isfinite(entry['train_loss']) for entry in log)
    assert (tmp_path / 'checkpoint.pth').exists() and (tmp_path / 'checkpoint0000.pth').exists()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert {'loss', 'lr', 'wd', 'examples/sec'} <= set(events.Tags()['scalars'])
    checkpoint = utils.load_checkpoint_or_exit(tmp_path / 'checkpoint.pth')
    assert checkpoint['epoch'] == 2
    assert all(t.device.type == 'cpu' for t in checkpoint['teacher'].values())
    assert set(checkpoint) >= {'student', 'teacher', 'optimizer', 'epoch', 'args', 'dino_loss'}

    # more --epochs would lay the schedules out anew (the lr would jump): refused, the run's files kept
    before = {path.name: path.read_bytes() for path in tmp_path.iterdir() if path.is_file()}
    proc = run_script('main_dino.py', *args, '--epochs', '3', check=False)
    assert_one_clear_line(proc, 'was trained with --epochs 2, not 3')
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir() if path.is_file()} == before
    proc = run_script('main_dino.py', *args, '--epochs', '2')
    assert 'Training is finished' in proc.stdout and 'Epoch: [' not in proc.stdout
    assert {path.name: path.read_bytes() for path in tmp_path.iterdir() if path.is_file()} == before


def test_two_process_torchrun_matches_one_process_gradients(tmp_path):
    """DDP over 2 gloo processes with half batches gives the full-batch DINO loss center and a working run."""
    out = tmp_path / 'run'
    proc = run_torchrun('main_dino.py', 2, *SMALL_CROPS, '--data_limit', '32', '--batch_size_per_device', '8',
                        '--epochs', '1', '--output_dir', out)
    assert 'world_size: 2' in proc.stdout
    assert [entry['epoch'] for entry in read_log(out)] == [0]
    checkpoint = utils.load_checkpoint_or_exit(out / 'checkpoint.pth')
    assert checkpoint['args'].world_size == 2
    proc = run_torchrun('tests/dist_check.py', 2, tmp_path / 'dist.pt')
    single = torch.load(tmp_path / 'dist.pt')
    assert single['ok'], single


# ----------------------------------------------------------------------------- bad input

def assert_one_clear_line(proc, *fragments):
    assert proc.returncode != 0
    assert 'Traceback' not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith('error: ')
    for fragment in fragments:
        assert fragment in last, last


@pytest.mark.parametrize('case', ['missing', 'empty', 'arch'])
def test_bad_input_is_one_clear_line(tmp_path, case):
    args = [*TINY_TRAIN_ARGS, '--epochs', '1', '--output_dir', tmp_path / 'out']
    if case == 'missing':
        args += ['--data_path', tmp_path / 'nowhere']
        expected = 'is not a folder'
    elif case == 'empty':
        (tmp_path / 'empty').mkdir()
        args += ['--data_path', tmp_path / 'empty']
        expected = 'sub-folder'
    else:
        args += ['--arch', 'vit_gigantic']
        expected = 'unknown --arch vit_gigantic'
    assert_one_clear_line(run_script('main_dino.py', *args, check=False, timeout=120), expected)


def test_checkpoint_from_another_arch_is_refused_and_kept(tmp_path):
    run_script('main_dino.py', *SMALL_CROPS, '--data_limit', '16', '--epochs', '1', '--output_dir', tmp_path)
    before = (tmp_path / 'checkpoint.pth').read_bytes()
    proc = run_script('main_dino.py', *SMALL_CROPS, '--data_limit', '16', '--epochs', '2', '--arch', 'vit_small',
                      '--output_dir', tmp_path, check=False)
    assert_one_clear_line(proc, 'does not fit')
    assert (tmp_path / 'checkpoint.pth').read_bytes() == before
    assert len(read_log(tmp_path)) == 1
