"""tools/export_backbone.py: a DINO backbone exported for timm loads into timm's VisionTransformer with no missing
or unexpected keys and gives the [CLS] features of this repository's ViT, at 224 pixels and at the size the
export was written for."""
import json

import pytest
import timm
import torch
from safetensors.torch import load_file

import main_dino
import utils
import vision_transformer as vits
from conftest import process_state_kept
from tools import export_backbone

# the size of the non-default export, for each patch size (4x4 and 5x5 patches)
SMALL_SIZE = {16: 64, 8: 40}


@pytest.fixture(scope='module')
def sources(tmp_path_factory):
    """(path, checkpoint key) per (source, patch size): a freshly initialised backbone file (the layout of the
    released DINO weights) and a main_dino checkpoint after 2 iterations (its teacher for /16, student for /8),
    trained with a large lr and a low teacher momentum so that every weight has moved off its initial value."""
    root = tmp_path_factory.mktemp('export_sources')
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    found = {}
    try:
        with process_state_kept():
            for patch_size, key in ((16, 'teacher'), (8, 'student')):
                torch.manual_seed(patch_size)
                torch.save(vits.vit_tiny(patch_size=patch_size).state_dict(), root / f'fresh{patch_size}.pth')
                found['fresh', patch_size] = (root / f'fresh{patch_size}.pth', 'teacher')
                main_dino.main([str(a) for a in [
                    '--arch', 'vit_tiny', '--patch_size', patch_size, '--data_path', 'synthetic', '--epochs', 1,
                    '--data_limit', 16, '--batch_size_per_device', 8, '--global_crops_size', 32,
                    '--local_crops_size', 16, '--local_crops_number', 1, '--out_dim', 64, '--num_workers', 0,
                    '--warmup_epochs', 0, '--freeze_last_layer', 0, '--lr', 1, '--momentum_teacher', 0.5,
                    '--device', 'cpu', '--output_dir', root / f'trained{patch_size}']])
                found['trained', patch_size] = (root / f'trained{patch_size}' / 'checkpoint.pth', key)
    finally:
        torch.set_num_threads(threads)
    return found


def export(capsys, out, path, key, patch_size, *extra):
    """Run the export; returns its JSON and the create_model line it printed."""
    capsys.readouterr()
    export_backbone.main([str(a) for a in ['--pretrained_weights', path, '--checkpoint_key', key, '--arch',
                                           'vit_tiny', '--patch_size', patch_size, '--output_dir', out, *extra]])
    printed = capsys.readouterr().out.splitlines()
    return json.loads((out / 'backbone.json').read_text()), printed[-1]


@pytest.mark.parametrize('patch_size', [16, 8])
@pytest.mark.parametrize('source', ['fresh', 'trained'])
def test_export_loads_in_timm_with_the_same_features(source, patch_size, sources, tmp_path, capsys):
    path, key = sources[source, patch_size]
    ours = vits.vit_tiny(patch_size=patch_size).eval()
    utils.load_pretrained_weights(ours, str(path), key, 'vit_tiny', patch_size)
    if source == 'trained':  # every LayerNorm has moved off its initial weight 1
        assert min((m.weight - 1).abs().max().item() for m in ours.modules()
                   if isinstance(m, torch.nn.LayerNorm)) > 1e-3
    generator = torch.Generator().manual_seed(0)
    for size in (224, SMALL_SIZE[patch_size]):
        info, call = export(capsys, tmp_path / str(size), path, key, patch_size,
                            *(['--img_size', size] if size != 224 else []))
        name = 'vit_tiny_patch16_224'  # timm has no vit_tiny_patch8_224: the patch size is overridden
        assert info == {'arch': 'vit_tiny', 'patch_size': patch_size, 'embed_dim': 192,
                        'train_image_size': 32 if source == 'trained' else None, 'img_size': size,
                        'timm_model': name, 'source': str(path),
                        'timm_kwargs': {**({'patch_size': 8} if patch_size == 8 else {}), 'num_classes': 0,
                                        'img_size': size}}
        weights = tmp_path / str(size) / 'backbone.safetensors'
        # the printed line is the one call that creates the model and loads the file (strictly)
        assert call == (f"timm.create_model({name!r}, pretrained=False, "
                        f"{'patch_size=8, ' if patch_size == 8 else ''}num_classes=0, img_size={size}, "
                        f"checkpoint_path={str(weights)!r})")
        model = eval(call, {'timm': timm}).eval()
        exported = load_file(weights)
        loaded = model.load_state_dict(exported, strict=False)
        assert loaded.missing_keys == [] and loaded.unexpected_keys == []
        assert all(torch.equal(v, exported[k]) for k, v in model.state_dict().items())
        images = torch.randn(2, 3, size, size, generator=generator)
        with torch.no_grad():
            assert (model(images) - ours(images)).abs().max() <= 1e-5


def test_timm_names_and_pth_export(sources, tmp_path, capsys):
    registered = set(timm.list_models('vit_*_patch*_224'))
    assert export_backbone.TIMM_MODELS <= registered and 'vit_tiny_patch8_224' not in registered
    path, key = sources['trained', 16]
    export(capsys, tmp_path, path, key, 16, '--save_pth', 'true', '--img_size', 64)
    safetensors = load_file(tmp_path / 'backbone.safetensors')
    pth = torch.load(tmp_path / 'backbone.pth', weights_only=True)
    assert safetensors.keys() == pth.keys() and all(torch.equal(pth[k], v) for k, v in safetensors.items())
    assert safetensors['pos_embed'].shape == (1, 17, 192)


def test_without_safetensors_one_line_and_a_training_size_is_suggested(sources, tmp_path, capsys, monkeypatch):
    path, _ = sources['trained', 8]
    args = ['--pretrained_weights', str(path), '--output_dir', str(tmp_path / 'out')]
    utils.parse_checked_args(export_backbone.get_args_parser(), export_backbone.check_args, args)
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"Exporting for 224-pixel images; {path} was trained on 32-pixel global crops: pass --img_size 32 to use it "
        "at that size")

    find_spec = export_backbone.importlib.util.find_spec
    monkeypatch.setattr(export_backbone.importlib.util, 'find_spec',
                        lambda name, *a: None if name == 'safetensors' else find_spec(name, *a))
    with pytest.raises(SystemExit) as stop:
        export_backbone.main(args)
    assert str(stop.value) == ("error: the export is written with safetensors, which is not installed; pip install "
                               "safetensors (timm, which loads the export, depends on it too)")
    assert not (tmp_path / 'out').exists()
