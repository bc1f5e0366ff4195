"""The HPU code paths, both modes, run on the CPU with a stand-in `habana_frameworks` package placed on sys.path.

The stand-in records what Habana's bridge would be asked: the environment when its modules are imported, the
mark_step calls, its mode query (PT_HPU_LAZY_MODE when set, else the bridge's own default), and the graphs
torch.compile hands its `hpu_backend` (a torch._dynamo backend that records each graph and runs it as it is).
The training steps run on CPU tensors through the HPU policies of utils.RunDevice.
"""
import argparse
import importlib.util
import os
import random
import sys

import pytest
import torch

import imagedata
import main_dino
import multicrop
import utils

# the stand-in would shadow the real package, whose compiled modules cannot be imported twice
pytestmark = pytest.mark.skipif(importlib.util.find_spec('habana_frameworks') is not None,
                                reason="Habana's PyTorch packages are installed here: the real HPU path is used instead")

HPU_ENV = ['PT_HPU_LAZY_MODE', 'LOWER_LIST', 'FP32_LIST', 'PT_HPU_AUTOCAST_LOWER_PRECISION_OPS_LIST',
           'PT_HPU_AUTOCAST_FP32_OPS_LIST']

CORE = '''import os
import habana_frameworks.torch.dynamo  # noqa: F401  (as the bridge does: hpu_backend is known once core is imported)
CALLS = []  # "mark" per mark_step
GRAPHS = []  # the graphs torch.compile handed hpu_backend
ENV_AT_IMPORT = {k: os.environ.get(k) for k in %r}
LAZY = os.environ.get('PT_HPU_LAZY_MODE', '%%s') == '1'  # the mode is fixed when the bridge is loaded


def mark_step():
    CALLS.append("mark")
''' % HPU_ENV

DYNAMO = '''import sys
import torch


def hpu_backend(graph_module, example_inputs):
    """Record the graph (in the stand-in loaded now) and run it as it is."""
    sys.modules['habana_frameworks.torch.core'].GRAPHS.append(graph_module)
    return graph_module.forward


if 'hpu_backend' not in torch._dynamo.list_backends(exclude_tags=()):
    torch._dynamo.register_backend(lambda gm, inputs: sys.modules[__name__].hpu_backend(gm, inputs), 'hpu_backend')
'''

STANDIN_FILES = {
    'habana_frameworks/__init__.py': '',
    'habana_frameworks/torch/__init__.py': '',
    'habana_frameworks/torch/core.py': CORE,
    'habana_frameworks/torch/dynamo.py': DYNAMO,
    'habana_frameworks/torch/hpu.py': 'def is_available():\n    return True\ndef synchronize():\n    pass\n',
    'habana_frameworks/torch/utils/__init__.py': '',
    'habana_frameworks/torch/utils/internal.py': (
        'def is_lazy():\n    import habana_frameworks.torch.core as core\n    return core.LAZY\n'),
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


def install_standin(root, bridge_default_lazy):
    for rel, text in STANDIN_FILES.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text % ('1' if bridge_default_lazy else '0') if rel.endswith('core.py') else text)


@pytest.fixture
def fake_habana(tmp_path, monkeypatch):
    """Install the stand-in; call the returned function with the bridge's default mode (eager unless told)."""
    saved = dict(os.environ)  # setup_device sets the HPU variables; monkeypatch would not undo new ones
    for name in HPU_ENV:
        os.environ.pop(name, None)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(utils, '_run_device', utils.run_device())
    torch._dynamo.reset()

    def install(bridge_default_lazy=False):
        install_standin(tmp_path, bridge_default_lazy)
        for name in list(sys.modules):
            if name.startswith('habana_frameworks'):
                del sys.modules[name]

    install()
    yield install
    restore_environment(saved)
    torch._dynamo.reset()
    for name in list(sys.modules):
        if name.startswith('habana_frameworks'):
            del sys.modules[name]


def device_args(**overrides):
    args = argparse.Namespace(device='auto', autocast=True, lazy_mode=True,
                              hmp_bf16=os.path.join(utils.REPO_DIR, 'ops_bf16.txt'),
                              hmp_fp32=os.path.join(utils.REPO_DIR, 'ops_fp32.txt'))
    vars(args).update(overrides)
    return args


def htcore():
    import habana_frameworks.torch.core as core
    return core


def test_auto_picks_hpu_and_op_lists_reach_environment_before_import(fake_habana):
    args = device_args()
    assert utils.setup_device(args) == 'hpu' and args.device == 'hpu'
    expected = {'PT_HPU_LAZY_MODE': '1', 'LOWER_LIST': args.hmp_bf16, 'FP32_LIST': args.hmp_fp32,
                'PT_HPU_AUTOCAST_LOWER_PRECISION_OPS_LIST': args.hmp_bf16,
                'PT_HPU_AUTOCAST_FP32_OPS_LIST': args.hmp_fp32}
    assert htcore().ENV_AT_IMPORT == expected  # set before Habana's modules were imported
    assert utils.run_device().process_group_backend() == 'hccl'
    assert utils.run_device().collective_dtype(torch.int64) == torch.int32


@pytest.mark.parametrize('flag, variable, bridge_default_lazy, mode', [
    (None, None, False, 'hpu-eager'),   # today's Gaudi software: eager with torch.compile
    (None, None, True, 'hpu-lazy'),     # older releases defaulted to lazy mode
    (None, '1', False, 'hpu-lazy'),     # PT_HPU_LAZY_MODE set by the user
    (None, '0', True, 'hpu-eager'),
    (False, '1', True, 'hpu-eager'),    # --lazy_mode given: it sets PT_HPU_LAZY_MODE
    (True, None, False, 'hpu-lazy'),
])
def test_lazy_mode_left_out_follows_the_environment_then_the_bridge(fake_habana, capsys, flag, variable,
                                                                    bridge_default_lazy, mode):
    fake_habana(bridge_default_lazy)
    if variable is not None:
        os.environ['PT_HPU_LAZY_MODE'] = variable
    args = device_args(device='hpu', lazy_mode=flag, autocast=False)
    utils.start_run(args, join_group=False)
    device = utils.run_device()
    assert device.mode == mode and args.lazy_mode == (mode == 'hpu-lazy')
    assert device.compile_backend == (None if mode == 'hpu-lazy' else 'hpu_backend')
    if flag is not None:
        assert os.environ['PT_HPU_LAZY_MODE'] == ('1' if flag else '0')
    words = 'lazy mode' if mode == 'hpu-lazy' else 'eager mode'
    assert f"Device: hpu, {words}" in capsys.readouterr().out.splitlines()[0]


def test_custom_op_lists_and_no_mark_step_in_eager_mode(fake_habana, tmp_path):
    bf16 = tmp_path / 'my_bf16.txt'
    bf16.write_text('linear\n')
    args = device_args(device='hpu', lazy_mode=False, hmp_bf16=str(bf16))
    utils.setup_device(args)
    assert os.environ['LOWER_LIST'] == str(bf16) and os.environ['PT_HPU_LAZY_MODE'] == '0'
    utils.mark_step()
    utils.run_device().synchronize()
    assert htcore().CALLS == []  # eager mode: no graph to cut


def test_a_mode_the_loaded_bridge_does_not_run_is_one_clear_line(fake_habana):
    utils.setup_device(device_args(device='hpu', lazy_mode=False))
    with pytest.raises(SystemExit, match=r"^error: --lazy_mode true: Habana's bridge runs in eager mode"):
        utils.setup_device(device_args(device='hpu', lazy_mode=True))


def test_missing_op_list_is_one_clear_line(fake_habana, tmp_path):
    with pytest.raises(SystemExit, match='autocast op list .* not found'):
        utils.setup_device(device_args(hmp_fp32=str(tmp_path / 'nope.txt')))


# ----------------------------------------------------------------------------- whole training steps

BATCH = 4


def training_run(*flags):
    """main_dino's run for the command line `flags` (vit_tiny, 2x32 + 2x16 crops rendered on the device), on CPU
    tensors whatever the device, and a function rendering the views of step `it` from its own draws."""
    args = main_dino.get_args_parser().parse_args([
        '--arch', 'vit_tiny', '--out_dim', '64', '--global_crops_size', '32', '--local_crops_size', '16',
        '--local_crops_number', '2', '--batch_size_per_device', str(BATCH), '--warmup_epochs', '0',
        '--augment_on', 'device', *flags])
    utils.setup_device(args)
    args.distributed = False
    main_dino.resolve_compile(args)
    main_dino.resolve_augment_on(args)
    torch.manual_seed(0)
    run = main_dino.build_training_run(args, torch.device('cpu'), iters_per_epoch=8)
    augmentation = main_dino.DataAugmentationDINO(args.global_crops_scale, args.local_crops_scale, 2, 32, 16,
                                                  augment_on='device')
    shapes = imagedata.SyntheticShapes('train', length=64, image_size=48)

    def views(it):
        random.seed(it)
        torch.manual_seed(it)  # each step its own crops, flips, jitter, blur, solarisation
        batch = [(augmentation(shapes.render(BATCH * it + i)), -1, '') for i in range(BATCH)]
        handed, _, _ = multicrop.collate_hand_over(batch)
        return main_dino.views_on_device(handed, args, torch.device('cpu'))

    return args, run, views


def train_steps(steps, *flags):
    """The losses of `steps` steps, and the number of graphs hpu_backend received after each."""
    args, run, views = training_run(*flags)
    losses, graphs = [], []
    for it in range(steps):
        losses.append(main_dino.train_step(run, views(it), 0, it).item())
        graphs.append(len(htcore().GRAPHS) if 'habana_frameworks.torch.core' in sys.modules else 0)
    return args, losses, graphs


@pytest.fixture
def accelerator_render(monkeypatch):
    """The render's tensor path (the accelerators'), not OpenCV, on the stand-in's CPU tensors."""
    monkeypatch.setattr(multicrop, 'OPENCV_ON_CPU', False)


def test_eager_mode_compiles_blocks_and_render_once_with_hpu_backend_and_matches_the_cpu(fake_habana,
                                                                                        accelerator_render):
    """--device hpu --lazy_mode false: --compile defaults to true, with hpu_backend. Each graph is compiled
    when first met: the render's colour chain (one batch shape), the student's blocks on global and on local
    crops, the teacher's blocks (no gradients); the later steps, with other augmentation draws, compile
    nothing. The losses are the CPU's (the stand-in runs the graphs on CPU tensors)."""
    args, losses, graphs = train_steps(4, '--device', 'hpu', '--lazy_mode', 'false')
    assert args.compile and utils.run_device().mode == 'hpu-eager'
    assert graphs == [4] * 4
    assert htcore().CALLS == []
    utils.setup_device(argparse.Namespace(device='cpu'))
    _, cpu_losses, _ = train_steps(4, '--device', 'cpu', '--compile', 'false')
    assert losses == pytest.approx(cpu_losses, rel=1e-5)


def test_compile_true_is_accepted_in_eager_mode_and_refused_in_lazy_mode_with_one_line(fake_habana, capsys):
    args = main_dino.get_args_parser().parse_args(['--device', 'hpu', '--lazy_mode', 'false', '--compile', 'true'])
    utils.setup_device(args)
    main_dino.resolve_compile(args)
    assert args.compile and 'with hpu_backend' in capsys.readouterr().out
    fake_habana()  # a new process: the bridge's mode is fixed once it is loaded
    args = main_dino.get_args_parser().parse_args(['--device', 'hpu', '--lazy_mode', 'true', '--compile', 'true'])
    utils.setup_device(args)
    with pytest.raises(SystemExit, match=r'^error: --compile true is not supported in HPU lazy mode: .*\n?$'):
        main_dino.resolve_compile(args)


def test_lazy_mode_cuts_the_graph_at_the_phase_boundaries_and_compiles_nothing(fake_habana, accelerator_render,
                                                                              monkeypatch):
    """mark_step after the teacher, the student and the loss, before the optimizer step (backward, clipping
    and freezing done) and after it; nothing compiled; the losses are the CPU's."""
    args, run, views = training_run('--device', 'hpu', '--lazy_mode', 'true', '--autocast')
    assert not args.compile and utils.run_device().mode == 'hpu-lazy'
    events, weight, before = [], next(run.student.parameters()), {}
    monkeypatch.setattr(htcore(), 'mark_step',
                        lambda: events.append('mark' if torch.equal(weight, before['weight']) else 'mark, updated'))
    for name, module in (('teacher', run.teacher), ('student', run.student), ('loss', run.dino_loss)):
        module.register_forward_hook(lambda *_, name=name: events.append(name), prepend=True)
    weight.register_post_accumulate_grad_hook(lambda _: events.append('backward'))
    clip = utils.clip_gradients
    monkeypatch.setattr(utils, 'clip_gradients', lambda *a: events.append('clip') or clip(*a))
    losses = []
    for it in range(2):
        views_of_step = views(it)
        before['weight'] = weight.detach().clone()
        losses.append(main_dino.train_step(run, views_of_step, 0, it).item())
    phases = ['teacher', 'mark', 'student', 'mark', 'loss', 'mark', 'backward', 'clip', 'mark', 'mark, updated']
    assert events == phases * 2
    assert htcore().GRAPHS == []

    utils.setup_device(argparse.Namespace(device='cpu'))
    _, cpu_losses, _ = train_steps(2, '--device', 'cpu', '--compile', 'false')
    assert losses == pytest.approx(cpu_losses, rel=1e-5)
