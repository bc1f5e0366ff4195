"""tools/export_backbone.py --format transformers and --format onnx: the exported ViTModel (loaded strictly by
the printed lines) gives this repository's [CLS] features, its image processor with it gives eval_knn.py's
features of the same image files, and onnxruntime gives PyTorch's features or attention maps; vit_tiny/16 and /8,
at 224 pixels and at a small training size (the position embedding resized by DINO's rule)."""
import json
from argparse import Namespace

import onnxruntime
import pytest
import skimage.data
import torch
import torch.nn.functional as F
import transformers
from PIL import Image

import eval_knn
import evaluation
import utils
import vision_transformer as vits
from conftest import process_state_kept
from tools import export_backbone

SMALL_SIZE = {16: 64, 8: 40}  # 4x4 and 5x5 patches


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
    """Per patch size, a training checkpoint (teacher backbone, the run's args) whose every weight has moved off
    the ViT's initial values (LayerNorms off 1 and 0, biases off 0), and the ViT holding those weights."""
    root = tmp_path_factory.mktemp('export_formats')
    found = {}
    for patch_size in (16, 8):
        torch.manual_seed(patch_size)
        model = vits.vit_tiny(patch_size=patch_size).eval()
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.05 * torch.randn_like(param))
        path = root / f'checkpoint{patch_size}.pth'
        torch.save({'teacher': {f'backbone.{k}': v for k, v in model.state_dict().items()}, 'epoch': 1,
                    'args': Namespace(arch='vit_tiny', patch_size=patch_size,
                                      global_crops_size=SMALL_SIZE[patch_size])}, path)
        found[patch_size] = path, model
    return found


@pytest.fixture(scope='module')
def photos(tmp_path_factory):
    """train/ and val/ ImageFolders of scikit-image's sample photographs (colour and grey, landscape, portrait
    and square), cut to sizes where torchvision's centre crop (offset rounded half to even) and transformers'
    (rounded down) take the same pixels at every size tested: see the README's export section."""
    root = tmp_path_factory.mktemp('photos')
    cat, coffee, astronaut, camera = (skimage.data.chelsea(), skimage.data.coffee(), skimage.data.astronaut(),
                                      skimage.data.camera())
    images = {'train/cat/0.png': cat[:300, :446], 'train/cat/1.png': astronaut,
              'train/other/0.png': coffee[:300, :400], 'train/other/1.png': camera,
              'val/cat/0.png': cat[:320, 100:400], 'val/other/0.png': coffee[50:386, 100:400]}
    for name, pixels in images.items():
        height, width = pixels.shape[:2]
        assert all(same_centre_crop(height, width, default_crop) for default_crop in (224, *SMALL_SIZE.values()))
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(root / name)
    return root


def same_centre_crop(height, width, crop):
    """Whether torchvision and transformers cut the same centre crop from the image resized as evaluated."""
    resize = evaluation.default_resize(crop)
    short, long = min(height, width), max(height, width)
    return all(round((side - crop) / 2) == (side - crop) // 2 for side in (resize, int(resize * long / short)))


def export(capsys, path, patch_size, out, *extra):
    """Run the export; returns the lines it printed."""
    capsys.readouterr()
    export_backbone.main([str(a) for a in ['--pretrained_weights', path, '--arch', 'vit_tiny', '--patch_size',
                                           patch_size, '--output_dir', out, *extra]])
    return capsys.readouterr().out.splitlines()


def random_images(count, size, seed=0):
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def knn_features(photos, checkpoint, patch_size, size, dump):
    """eval_knn.py's (normalised) features of the photos, train then val, and the photo files in that order."""
    with process_state_kept():
        eval_knn.main([str(a) for a in [
            '--pretrained_weights', checkpoint, '--arch', 'vit_tiny', '--patch_size', patch_size, '--data_path',
            photos, '--crop_size', size, '--nb_knn', 1, '--num_workers', 0, '--dump_features', dump,
            '--device', 'cpu']])
    features = torch.cat([torch.load(dump / name) for name in ('trainfeat.pth', 'testfeat.pth')])
    files = [path for split in ('train', 'val') for path, _ in evaluation.build_eval_split(photos, split).samples]
    return features, files


def opened(path):
    with Image.open(path) as img:
        img.load()
        return img.copy()


@pytest.mark.parametrize('patch_size', [16, 8])
def test_transformers_export_gives_our_features_and_eval_knns(patch_size, checkpoints, photos, tmp_path, capsys):
    path, ours = checkpoints[patch_size]
    for size in (224, SMALL_SIZE[patch_size]):
        out = tmp_path / str(size)
        printed = export(capsys, path, patch_size, out, '--format', 'transformers',
                         *(['--img_size', size] if size != 224 else []))
        assert printed[-2:] == [
            f"processor = transformers.AutoImageProcessor.from_pretrained({str(out)!r}, backend='pil')",
            f"model = transformers.ViTModel.from_pretrained({str(out)!r}, add_pooling_layer=False)"]
        loaded = {'transformers': transformers}
        exec('\n'.join(printed[-2:]), loaded)
        processor, model = loaded['processor'], loaded['model'].eval()
        _, loading = transformers.ViTModel.from_pretrained(out, add_pooling_layer=False, output_loading_info=True)
        assert not any(loading[k] for k in ('missing_keys', 'unexpected_keys', 'mismatched_keys'))
        config = json.loads((out / 'config.json').read_text())
        assert config.items() >= {'model_type': 'vit', 'hidden_size': 192, 'num_hidden_layers': 12,
                                  'num_attention_heads': 3, 'intermediate_size': 768, 'hidden_act': 'gelu',
                                  'qkv_bias': True, 'layer_norm_eps': 1e-6, 'patch_size': patch_size,
                                  'image_size': size}.items()
        grid = size // patch_size
        assert model.embeddings.position_embeddings.shape == (1, grid * grid + 1, 192)
        images = random_images(2, size)
        with torch.no_grad():
            assert (model(pixel_values=images).last_hidden_state[:, 0] - ours(images)).abs().max() <= 1e-5

        assert processor.backend == 'pil' and processor.crop_size.height == processor.crop_size.width == size
        expected, files = knn_features(photos, path, patch_size, size, tmp_path / f'features{size}')
        pixels = processor(images=[opened(file) for file in files], return_tensors='pt')['pixel_values']
        with torch.no_grad():
            features = F.normalize(model(pixel_values=pixels).last_hidden_state[:, 0], dim=1)
        assert (features - expected).abs().max() <= 1e-4


@pytest.mark.parametrize('patch_size', [16, 8])
def test_onnx_export_gives_our_features_and_attention_maps(patch_size, checkpoints, tmp_path, capsys):
    path, ours = checkpoints[patch_size]
    small = SMALL_SIZE[patch_size]
    for size, output in ((224, 'features'), (small, 'features'), (small, 'attention')):
        out = tmp_path / f'{size}{output}'
        printed = export(capsys, path, patch_size, out, '--format', 'onnx', '--img_size', size,
                         *(['--onnx_output', output] if output != 'features' else []))
        assert printed[-1] == f"session = onnxruntime.InferenceSession({str(out / 'backbone.onnx')!r})"
        assert printed[-2].startswith(f'onnxruntime on 3 random images: {output} at most ')
        loaded = {'onnxruntime': onnxruntime}
        exec(printed[-1], loaded)
        session = loaded['session']
        assert [(i.name, i.shape) for i in session.get_inputs()] == [('pixel_values', ['batch', 3, size, size])]
        for count in (1, 5):  # the export traced a batch of 2
            images = random_images(count, size, seed=count)
            got = torch.from_numpy(session.run(None, {'pixel_values': images.numpy()})[0])
            with torch.no_grad():
                if output == 'features':
                    expected = ours(images)
                else:  # the [CLS] row of the full attention matrices, renormalised over the patches
                    rows = ours.get_last_selfattention(images)[:, :, 0, 1:]
                    expected = (rows / rows.sum(-1, keepdim=True)).reshape(count, 3, size // patch_size, -1)
            assert got.shape == expected.shape and (got - expected).abs().max() <= 1e-4


def test_every_format_writes_its_own_files_and_onnx_without_onnxruntime(checkpoints, tmp_path, capsys,
                                                                         monkeypatch):
    path, _ = checkpoints[16]
    find_spec = export_backbone.importlib.util.find_spec
    monkeypatch.setattr(export_backbone.importlib.util, 'find_spec',
                        lambda name, *a: None if name == 'onnxruntime' else find_spec(name, *a))
    printed = export(capsys, path, 16, tmp_path, '--img_size', 64, '--format', 'timm', 'transformers', 'onnx',
                     'timm')
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith('.')) == ['backbone.json', 'backbone.onnx', 'backbone.safetensors',
                                                         'config.json', 'model.safetensors',
                                                         'preprocessor_config.json']
    assert sum(line.startswith('timm.create_model(') for line in printed) == 1
    assert printed[-2] == ("onnxruntime is not installed, so the export was not run; pip install onnxruntime to "
                           "check it")
    processor = json.loads((tmp_path / 'preprocessor_config.json').read_text())
    assert processor.items() >= {'image_processor_type': 'ViTImageProcessor', 'size': {'shortest_edge': 73},
                                 'crop_size': {'height': 64, 'width': 64}, 'do_center_crop': True, 'resample': 3,
                                 'image_mean': list(utils.IMAGENET_MEAN),
                                 'image_std': list(utils.IMAGENET_STD)}.items()


MISSING = {'transformers': ['transformers', 'pip install transformers'], 'onnx': ['onnx', 'pip install onnx']}


@pytest.mark.parametrize('export_format', ['transformers', 'onnx'])
@pytest.mark.parametrize('mistake', ['missing_package', 'resnet', 'output_dir_under_a_file'])
def test_bad_input_is_one_line_before_any_work(export_format, mistake, checkpoints, tmp_path, monkeypatch):
    path, _ = checkpoints[16]
    (tmp_path / 'file').write_text('kept')
    argv = ['--pretrained_weights', str(path), '--format', export_format, '--output_dir', str(tmp_path / 'out')]
    if mistake == 'missing_package':
        package, advice = MISSING[export_format]
        find_spec = export_backbone.importlib.util.find_spec
        monkeypatch.setattr(export_backbone.importlib.util, 'find_spec',
                            lambda name, *a: None if name == package else find_spec(name, *a))
        fragments = [advice]
    elif mistake == 'resnet':  # a training checkpoint of a ResNet
        torch.save({'teacher': {}, 'args': Namespace(arch='resnet50')}, tmp_path / 'file')
        argv[1] = str(tmp_path / 'file')
        fragments = ['--arch resnet50', export_backbone.NOT_A_VIT[export_format]]
    else:
        argv[-1] = str(tmp_path / 'file' / 'out')
        fragments = ['cannot be created', 'is a file']
    kept = (tmp_path / 'file').read_bytes()
    with pytest.raises(SystemExit) as stop:
        export_backbone.main(argv)
    message = stop.value.code
    assert isinstance(message, str) and message.startswith('error: ') and '\n' not in message
    assert all(fragment in message for fragment in fragments), message
    assert sorted(p.name for p in tmp_path.iterdir()) == ['file'] and (tmp_path / 'file').read_bytes() == kept

