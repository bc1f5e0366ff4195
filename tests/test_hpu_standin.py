"""The HPU code path, run on the CPU with a stand-in `habana_frameworks` package placed on sys.path."""
import argparse
import importlib.util
import os
import sys

import pytest
import torch

import main_dino
import utils

# the stand-in would shadow the real package, whose compiled modules cannot be imported twice
pytestmark = pytest.mark.skipif(importlib.util.find_spec('habana_frameworks') is not None,
                                reason="Habana's PyTorch packages are installed here: the real HPU path is used instead")

HPU_ENV = ['PT_HPU_LAZY_MODE', 'LOWER_LIST', 'FP32_LIST', 'PT_HPU_AUTOCAST_LOWER_PRECISION_OPS_LIST',
           'PT_HPU_AUTOCAST_FP32_OPS_LIST']

STANDIN_FILES = {
    'habana_frameworks/__init__.py': '',
    'habana_frameworks/torch/__init__.py': '',
    'habana_frameworks/torch/core.py': (
        'import os\nCALLS = []\nENV_AT_IMPORT = {k: os.environ.get(k) for k in %r}\n'
        'def mark_step():\n    CALLS.append("mark")\n' % HPU_ENV),
    'habana_frameworks/torch/hpu.py': 'def is_available():\n    return True\ndef synchronize():\n    pass\n',
    'habana_frameworks/torch/distributed/__init__.py': '',
    'habana_frameworks/torch/distributed/hccl.py': '',
}


def restore_environment(saved):
    """os.environ exactly as `saved` (but for pytest's own PYTEST_CURRENT_TEST)."""
    for name in set(os.environ) - set(saved) - {'PYTEST_CURRENT_TEST'}:
        del os.environ[name]
    os.environ.update({k: v for k, v in saved.items() if k != 'PYTEST_CURRENT_TEST'})


def environment():
    return {k: v for k, v in os.environ.items() if k != 'PYTEST_CURRENT_TEST'}


@pytest.fixture(scope='module', autouse=True)
def environment_is_left_as_found():
    """Later tests and their script subprocesses must not inherit the HPU variables set here."""
    before = environment()
    yield
    assert environment() == before, 'the HPU tests left environment variables behind'


@pytest.fixture
def fake_habana(tmp_path, monkeypatch):
    for rel, text in STANDIN_FILES.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in list(sys.modules):
        if name.startswith('habana_frameworks'):
            monkeypatch.delitem(sys.modules, name)
    saved = dict(os.environ)  # setup_device sets the HPU variables; monkeypatch would not undo new ones
    for name in HPU_ENV:
        os.environ.pop(name, None)
    monkeypatch.setattr(utils, '_mark_step_enabled', False)
    yield
    restore_environment(saved)
    for name in list(sys.modules):
        if name.startswith('habana_frameworks'):
            del sys.modules[name]


def device_args(**overrides):
    args = argparse.Namespace(device='auto', autocast=True, lazy_mode=True,
                              hmp_bf16=os.path.join(utils.REPO_DIR, 'ops_bf16.txt'),
                              hmp_fp32=os.path.join(utils.REPO_DIR, 'ops_fp32.txt'))
    vars(args).update(overrides)
    return args


def test_auto_picks_hpu_and_op_lists_reach_environment_before_import(fake_habana):
    args = device_args()
    assert utils.setup_device(args) == 'hpu' and args.device == 'hpu'
    import habana_frameworks.torch.core as htcore
    expected = {'PT_HPU_LAZY_MODE': '1', 'LOWER_LIST': args.hmp_bf16, 'FP32_LIST': args.hmp_fp32,
                'PT_HPU_AUTOCAST_LOWER_PRECISION_OPS_LIST': args.hmp_bf16,
                'PT_HPU_AUTOCAST_FP32_OPS_LIST': args.hmp_fp32}
    assert htcore.ENV_AT_IMPORT == expected  # set before Habana's modules were imported
    assert utils._backend_for('hpu') == 'hccl'


def test_custom_op_lists_and_eager_mode(fake_habana, tmp_path):
    bf16 = tmp_path / 'my_bf16.txt'
    bf16.write_text('linear\n')
    args = device_args(device='hpu', lazy_mode=False, hmp_bf16=str(bf16))
    utils.setup_device(args)
    assert os.environ['LOWER_LIST'] == str(bf16) and os.environ['PT_HPU_LAZY_MODE'] == '0'
    import habana_frameworks.torch.core as htcore
    utils.mark_step()
    assert htcore.CALLS == []  # eager mode: no graph to cut


def test_missing_op_list_is_one_clear_line(fake_habana, tmp_path):
    with pytest.raises(SystemExit, match='autocast op list .* not found'):
        utils.setup_device(device_args(hmp_fp32=str(tmp_path / 'nope.txt')))


def test_mark_step_after_each_phase_of_the_training_step(fake_habana):
    args = device_args(clip_grad=3.0, freeze_last_layer=0, use_fp16=False, distributed=False)
    utils.setup_device(args)
    import habana_frameworks.torch.core as htcore
    events = htcore.CALLS  # mark_step() appends "mark" here
    args.device = 'cpu'   # the stand-in has no real device: run the same step on CPU tensors

    torch.manual_seed(0)
    wrap = lambda: utils.MultiCropWrapper(utils.build_backbone('vit_tiny', 16)[0],  # noqa: E731
                                          main_dino.DINOHead(192, 32))
    student, teacher = utils.SingleProcess(wrap()), wrap()
    teacher.load_state_dict(student.module.state_dict())
    for p in teacher.parameters():
        p.requires_grad = False
    dino_loss = main_dino.DINOLoss(32, 4, 0.04, 0.04, 0, 1)
    optimizer = torch.optim.AdamW(utils.get_params_groups(student))
    schedules = [torch.full((4,), 1e-4).numpy(), torch.full((4,), 0.04).numpy(), torch.full((4,), 0.99).numpy()]

    def recorded(name, fn, hook_output=False):
        def run(*a, **k):
            out = fn(*a, **k)
            events.append(name)
            if hook_output:
                out.register_hook(lambda grad: events.append('backward'))
            return out
        return run

    teacher.forward = recorded('teacher', teacher.forward)
    student.forward = recorded('student', student.forward, hook_output=True)
    dino_loss.forward = recorded('loss', dino_loss.forward)
    optimizer.register_step_post_hook(lambda *_: events.append('step'))
    utils.mark_phases([teacher, student, dino_loss], optimizer)
    original_clip = utils.clip_gradients
    utils.clip_gradients = recorded('clip', original_clip)
    try:
        images = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32),
                  torch.randn(2, 3, 16, 16), torch.randn(2, 3, 16, 16)]
        run = main_dino.TrainingRun(args, torch.device('cpu'), student, teacher, teacher, dino_loss, optimizer,
                                    torch.amp.GradScaler('cuda', enabled=False), schedules, 4)
        loss = main_dino.train_step(run, images, 0, 0)
    finally:
        utils.clip_gradients = original_clip
    assert torch.isfinite(loss)
    assert events == ['teacher', 'mark', 'student', 'mark', 'loss', 'mark', 'backward', 'clip', 'mark', 'step',
                      'mark']
