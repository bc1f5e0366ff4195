"""Every collective goes through utils' helpers, on the device and in a dtype its backend takes.

A CPU machine runs gloo only, where a tensor on the wrong device cannot show. So the helpers are
exercised here under a recorded two-process "backend" that reports itself as nccl, hccl or gloo and
notes the device and dtype of every tensor handed to it; and the source is read to make sure no
script calls torch.distributed around them.
"""
import argparse
import ast
import json

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import checkpoints
import eval_knn
import imagedata
import main_dino
import utils
from conftest import REPO, TINY_TRAIN_ARGS, run_torchrun

COLLECTIVES = {
    'all_reduce', 'all_gather', 'all_gather_object', 'all_gather_into_tensor', 'all_to_all', 'all_to_all_single',
    'broadcast', 'broadcast_object_list', 'barrier', 'monitored_barrier', 'reduce', 'reduce_scatter',
    'reduce_scatter_tensor', 'gather', 'gather_object', 'scatter', 'scatter_object_list', 'send', 'recv',
    'isend', 'irecv', 'batch_isend_irecv',
}
# the helpers of utils' distributed section: the only functions that call torch.distributed collectives
HELPERS = {'all_reduce', 'all_gather', 'all_gather_object', 'barrier'}
HCCL_DTYPES = {torch.float32, torch.bfloat16, torch.float16, torch.int32}


# ----------------------------------------------------------------------------- reading the source

def collective_calls(tree):
    """(enclosing function, line, call text) of every call to a torch.distributed collective."""
    dist_names = set()  # names bound to the torch.distributed module
    torch_names = set()  # names bound to torch
    direct = {}  # name -> collective imported with `from torch.distributed import ...`
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == 'torch.distributed' and alias.asname:
                    dist_names.add(alias.asname)
                elif alias.name.split('.')[0] == 'torch':
                    torch_names.add(alias.asname or 'torch')
        elif isinstance(node, ast.ImportFrom) and node.module == 'torch':
            dist_names.update(a.asname or a.name for a in node.names if a.name == 'distributed')
        elif isinstance(node, ast.ImportFrom) and node.module == 'torch.distributed':
            direct.update({a.asname or a.name: a.name for a in node.names if a.name in COLLECTIVES})

    def is_dist_module(node):
        if isinstance(node, ast.Name):
            return node.id in dist_names
        return (isinstance(node, ast.Attribute) and node.attr == 'distributed'
                and isinstance(node.value, ast.Name) and node.value.id in torch_names)

    calls = []

    def visit(node, function):
        for child in ast.iter_child_nodes(node):
            inner = child.name if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else function
            if isinstance(child, ast.Call):
                f = child.func
                if ((isinstance(f, ast.Attribute) and f.attr in COLLECTIVES and is_dist_module(f.value))
                        or (isinstance(f, ast.Name) and f.id in direct)):
                    calls.append((function, child.lineno, ast.unparse(f)))
            visit(child, inner)

    visit(tree, None)
    return calls


def test_no_collective_outside_the_helpers_of_utils():
    scripts = sorted(p for p in REPO.glob('*.py') if p.name != 'utils.py')
    assert len(scripts) >= 10
    outside = [f'{p.name}:{line} {text}' for p in scripts
               for _, line, text in collective_calls(ast.parse(p.read_text()))]
    assert not outside, f"collectives called around utils' helpers: {outside}"
    in_utils = collective_calls(ast.parse((REPO / 'utils.py').read_text()))
    assert {function for function, _, _ in in_utils} == HELPERS, in_utils


def test_the_reader_finds_every_spelling():
    source = '''
import torch
import torch.distributed as tdist
from torch import distributed
from torch.distributed import all_gather as gather_all, get_rank
def f(t):
    torch.distributed.all_reduce(t)
    tdist.barrier()
    distributed.broadcast(t, 0)
    gather_all([t], t)
    get_rank()
    t.all_reduce()
'''
    found = [(function, text) for function, _, text in collective_calls(ast.parse(source))]
    assert found == [('f', 'torch.distributed.all_reduce'), ('f', 'tdist.barrier'), ('f', 'distributed.broadcast'),
                     ('f', 'gather_all')]


# ----------------------------------------------------------------------------- a recorded backend

class RecordedBackend:
    """Two processes in one: every collective sees the same tensor from the 'other' process too.

    Notes (operation, device, dtype) of every tensor handed to it. Tensors the helpers send to CUDA or
    HPU stay on the CPU (this machine has neither) but remember the device they were sent to.
    """

    def __init__(self, monkeypatch, backend):
        self.backend, self.calls = backend, []
        real_to = torch.Tensor.to

        def to(tensor, *args, device=None, **kwargs):
            device = torch.device(device) if device is not None else None
            if device is None or device.type == 'cpu':
                return real_to(tensor, *args, **({'device': device} if device else {}), **kwargs)
            moved = real_to(tensor, *args, device='cpu', **kwargs)
            moved.sent_to = device
            return moved

        for name, value in dict(is_initialized=lambda: True, get_backend=lambda group=None: backend,
                                get_world_size=lambda group=None: 2, get_rank=lambda group=None: 0,
                                all_reduce=self.all_reduce, all_gather=self.all_gather,
                                all_gather_object=self.all_gather_object, barrier=self.barrier).items():
            monkeypatch.setattr(dist, name, value)
        monkeypatch.setattr(torch.Tensor, 'to', to)
        monkeypatch.setattr(torch.cuda, 'current_device', lambda: 1)

    def note(self, op, tensor):
        self.calls.append((op, getattr(tensor, 'sent_to', tensor.device), tensor.dtype))

    def all_reduce(self, tensor, op=None, group=None):
        self.note('all_reduce', tensor)
        tensor.mul_(2)

    def all_gather(self, tensors, tensor, group=None):
        self.note('all_gather', tensor)
        for out in tensors:
            out.copy_(tensor)

    def all_gather_object(self, objects, obj, group=None):
        self.calls.append(('all_gather_object', None, None))
        objects[:] = [obj] * len(objects)

    def barrier(self, group=None, device_ids=None):
        self.calls.append(('barrier', device_ids, None))


EXPECTED_DEVICE = {'nccl': torch.device('cuda', 1), 'hccl': torch.device('hpu'), 'gloo': torch.device('cpu')}


def test_backend_to_device_and_dtype(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'current_device', lambda: 3)
    assert utils.backend_device('nccl') == torch.device('cuda', 3)
    assert utils.backend_device('hccl') == torch.device('hpu')
    assert utils.backend_device('gloo') == torch.device('cpu')
    assert utils.backend_dtype(torch.float64, 'hccl') == torch.float32
    assert utils.backend_dtype(torch.int64, 'hccl') == torch.int32
    assert utils.backend_dtype(torch.bfloat16, 'hccl') == torch.bfloat16
    assert utils.backend_dtype(torch.float64, 'nccl') == torch.float64
    assert utils.backend_dtype(torch.int64, 'gloo') == torch.int64


@pytest.mark.parametrize('backend', ['nccl', 'hccl', 'gloo'])
def test_every_collective_of_the_scripts_reaches_its_backend_on_its_device(monkeypatch, tmp_path, backend):
    recorded = RecordedBackend(monkeypatch, backend)

    # main_dino.end_epoch: the meters' sums (the collective that stopped multi-card runs after epoch 0)
    logger = utils.MetricLogger()
    logger.update(loss=1.5)
    logger.update(loss=0.5)
    skipped = imagedata.SkippedImages({'this_epoch': [3]})
    skipped.merge(8, 'cpu')
    args = argparse.Namespace(output_dir=str(tmp_path), saveckp_freq=0)
    run = main_dino.TrainingRun(args, 'cpu', nn.Linear(2, 2), None, None, None, None, None, None, 1, skipped=skipped)
    main_dino.end_epoch(run, 0, logger)
    assert (logger.loss.count, logger.loss.total) == (4, 4.0)
    assert json.loads((tmp_path / 'log.txt').read_text())['train_loss'] == 1.0
    assert utils.load_checkpoint_or_exit(tmp_path / 'checkpoint.pth')['skipped_images']['warned'] == [3]

    # the rest of the training loop: stop requests, the DINO centre, meter states of a stopped epoch
    stop = checkpoints.StopSignal.__new__(checkpoints.StopSignal)  # no signal handlers installed in the test process
    stop.received = None
    assert stop.requested('cpu') is False
    loss = main_dino.DINOLoss(4, 2, 0.04, 0.04, 0, 1, center_momentum=0.)
    loss.update_center(torch.ones(2, 4))
    torch.testing.assert_close(loss.center, torch.ones(1, 4))  # sum over 2 x 2 rows / global batch of 4
    assert main_dino.meter_states(logger) == [{'loss': (4, 4.0)}] * 2

    # evaluations: feature gathering, k-NN vote counts, means
    features = torch.eye(3)
    index = torch.arange(3)
    assert utils.all_gather(index).tolist() == [0, 1, 2, 0, 1, 2]
    assert utils.all_gather(features).dtype == torch.float32
    labels = torch.tensor([0, 1, 2])
    top1 = eval_knn.knn_evaluate(features, labels, features, labels, [1], 0.07, 3, chunk_size=3)[1][0]
    assert top1 == 200.  # 3 hits counted twice (both 'processes') over 3 test images
    assert utils.all_reduce(torch.tensor([3.])).item() / utils.get_world_size() == 3.

    expected = EXPECTED_DEVICE[backend]
    tensors = [(op, device, dtype) for op, device, dtype in recorded.calls if dtype is not None]
    assert len(tensors) == 8 and {device for _, device, _ in tensors} == {expected}, recorded.calls
    dtypes = [dtype for _, _, dtype in tensors]
    if backend == 'hccl':
        assert set(dtypes) <= HCCL_DTYPES, dtypes
    else:  # smoothed-value sums and k-NN counts keep float64, indices int64
        assert dtypes.count(torch.float64) == 2 and torch.int64 in dtypes, dtypes
    barriers = [device_ids for op, device_ids, _ in recorded.calls if op == 'barrier']
    assert barriers == [[1] if backend == 'nccl' else None]
    assert ('all_gather_object', None, None) in recorded.calls


# ----------------------------------------------------------------------------- joining the process group

def test_a_launched_process_joins_a_group_even_alone(monkeypatch):
    """A bare process has no group; a one-task SLURM job (no MASTER_ADDR) and torchrun's one process join one."""
    for name in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'SLURM_PROCID', 'SLURM_NTASKS', 'MASTER_ADDR'):
        monkeypatch.delenv(name, raising=False)
    args = argparse.Namespace(device='cpu', dist_url='env://', local_rank=0, dist_timeout=60)
    utils.init_distributed_mode(args)
    assert args.distributed is False and not dist.is_initialized()

    monkeypatch.setenv('SLURM_PROCID', '0')
    monkeypatch.setenv('SLURM_NTASKS', '1')
    try:
        utils.init_distributed_mode(args)
        assert args.distributed and dist.is_initialized() and dist.get_world_size() == 1
        assert utils.all_reduce(torch.tensor([2.])).item() == 2.
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_one_process_torchrun_training_runs_in_a_process_group(tmp_path):
    # batch norms in the head: the teacher is wrapped for DDP as with several processes
    proc = run_torchrun('main_dino.py', 1, *TINY_TRAIN_ARGS, '--data_limit', '16', '--batch_size_per_device', '8',
                        '--local_crops_number', '0', '--use_bn_in_head', 'true', '--epochs', '1',
                        '--output_dir', tmp_path)
    assert 'distributed: True' in proc.stdout and 'world_size: 1' in proc.stdout
    assert [json.loads(line)['epoch'] for line in (tmp_path / 'log.txt').read_text().splitlines()] == [0]
    checkpoint = utils.load_checkpoint_or_exit(tmp_path / 'checkpoint.pth')
    assert checkpoint['epoch'] == 1 and checkpoint['args'].distributed
