"""Export a DINO ViT backbone for timm, Hugging Face transformers or ONNX runtimes: the network of a training
checkpoint (or a released DINO backbone file), its position embedding resized for --img_size by DINO's rule, so
that each computes this repository's [CLS] features of --img_size images. --format picks one or more of:
  - timm (default): the state dict of timm's VisionTransformer with num_classes=0, in backbone.safetensors (and
    backbone.pth), with backbone.json beside it, and the timm.create_model(...) call that loads it;
  - transformers: config.json, model.safetensors and preprocessor_config.json, the folder that
    ViTModel.from_pretrained loads, with the image processor of the evaluations' resize, crop and normalisation;
  - onnx: backbone.onnx, a fixed image size and any batch size, giving the [CLS] features (or the last block's
    attention maps), checked with onnxruntime when it is installed.

    python tools/export_backbone.py --pretrained_weights ./dino_vit_small/checkpoint.pth --output_dir ./export
    python tools/export_backbone.py --pretrained_weights ./dino_vit_small/checkpoint.pth --output_dir ./export \
        --format timm transformers onnx
"""
import argparse
import contextlib
import importlib.metadata
import importlib.util
import io
import json
import os
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import evaluation  # noqa: E402
import outputdir  # noqa: E402
import utils  # noqa: E402

# the names timm registers for DINO's ViTs; the others are the patch-16 model with its patch_size overridden
# (timm has no vit_tiny_patch8_224)
TIMM_MODELS = {'vit_tiny_patch16_224', 'vit_small_patch16_224', 'vit_small_patch8_224', 'vit_base_patch16_224',
               'vit_base_patch8_224'}
# the files each format writes, which a run replaces only where an export wrote them (or with --overwrite)
EXPORT_FILES = {'timm': ('backbone.safetensors', 'backbone.pth', 'backbone.json'),
                'transformers': ('config.json', 'model.safetensors', 'preprocessor_config.json'),
                'onnx': ('backbone.onnx',)}
STORED_IMAGE_SIZE = 224  # DINO's ViTs keep their position embedding for a 224-pixel image
FORMATS = ('timm', 'transformers', 'onnx')
# per format: the packages it needs, and what the missing-package line says about each
NEEDED = {'timm': {'safetensors': "the export is written with safetensors, which is not installed; pip install "
                                  "safetensors (timm, which loads the export, depends on it too)"},
          'transformers': {'transformers': "--format transformers needs transformers (it writes the image "
                                           "processor and checks the export); pip install transformers",
                           'safetensors': "--format transformers writes model.safetensors with safetensors, which "
                                          "is not installed; pip install safetensors"},
          'onnx': {'onnx': "--format onnx needs the onnx package, which torch.onnx writes the model with; "
                           "pip install onnx (and onnxruntime to check the export)"}}
NOT_A_VIT = {'timm': "timm's VisionTransformer has models for DINO's ViTs only",
             'transformers': "transformers' ViTModel holds DINO's ViTs only",
             'onnx': "the ONNX export is of DINO's ViTs only"}
CHECK_IMAGES = 3  # random images the transformers and ONNX exports are checked on (a batch of another size
EXPORT_BATCH = 2  # than the one traced, so that the ONNX model's dynamic batch dimension is checked too)
# our parameter names -> transformers' ViTModel's (as the hub's facebook/dino-vit* checkpoints store them);
# blocks.N.attn.qkv is split into the query, key and value of layer N
TRANSFORMERS_NAMES = {'cls_token': 'embeddings.cls_token', 'pos_embed': 'embeddings.position_embeddings',
                      'patch_embed.proj': 'embeddings.patch_embeddings.projection', 'norm': 'layernorm',
                      'norm1': 'layernorm_before', 'attn.proj': 'attention.output.dense', 'norm2': 'layernorm_after',
                      'mlp.fc1': 'intermediate.dense', 'mlp.fc2': 'output.dense'}


def get_args_parser():
    parser = argparse.ArgumentParser('Export a DINO backbone for timm, transformers or ONNX', add_help=False)
    utils.add_model_args(parser, arch='vit_small', patch_size=16)
    parser.add_argument('--format', default=['timm'], nargs='+', choices=FORMATS, help="""What to write (one or
        more): timm (backbone.safetensors and backbone.json, for timm.create_model), transformers (config.json,
        model.safetensors and preprocessor_config.json, for ViTModel.from_pretrained) or onnx (backbone.onnx).""")
    parser.add_argument('--img_size', default=None, type=int, help="""Side in pixels of the images the exported
        model is for (timm's img_size, transformers' image_size, the ONNX model's input); default 224. At 224 the
        position embedding is written as stored; at another size, resized exactly as this repository's ViT resizes
        it for such images, so that the export computes the same features. For a model trained on small images,
        pass its --global_crops_size.""")
    parser.add_argument('--output_dir', default='.', type=utils.path_arg, help='Folder for the exported files.')
    parser.add_argument('--save_pth', default=False, type=utils.bool_flag,
                        help='timm: also write backbone.pth, the same state dict saved with torch.save.')
    parser.add_argument('--resize', default=None, type=int, help="""transformers: the side the image processor
        resizes the short side of an image to (bicubic) before its centre crop of --img_size; default
        img_size * 256 / 224, the evaluations' default --resize (256 for 224).""")
    parser.add_argument('--onnx_output', default='features', choices=['features', 'attention'], help="""onnx: what
        the model outputs: the [CLS] features (batch, dim), or the last block's attention of the [CLS] token to the
        patches (batch, heads, img_size / patch_size, img_size / patch_size), each map summing to 1, as
        visualize_attention.py shows them.""")
    outputdir.add_overwrite_arg(parser)
    return parser


def export_backbone(args):
    model, embed_dim = load_backbone(args)
    for export_format in args.format:
        EXPORTS[export_format](model, embed_dim, args)


def export_timm(model, embed_dim, args):
    name, overrides = timm_model(args.arch, args.patch_size)
    kwargs = {**overrides, 'num_classes': 0, 'img_size': args.img_size}
    info = {'arch': args.arch.replace('deit', 'vit'), 'patch_size': args.patch_size, 'embed_dim': embed_dim,
            'train_image_size': trained_crop_size(args.pretrained_weights), 'img_size': args.img_size,
            'timm_model': name, 'timm_kwargs': kwargs, 'source': args.pretrained_weights or 'released weights'}
    weights = write_export(timm_state_dict(model, args.img_size), info, args)
    print(f"Wrote {weights} ({name}{' with patch_size ' + str(args.patch_size) if overrides else ''}, "
          f"{args.img_size}-pixel images) and backbone.json beside it; load it in timm with:")
    print(create_model_call(name, kwargs, weights))


def load_backbone(args):
    """The ViT of --arch/--patch_size with every weight from --pretrained_weights, and its feature dimension."""
    model, embed_dim = utils.build_backbone(args.arch, args.patch_size)
    loaded = utils.load_pretrained_weights(model, args.pretrained_weights, args.checkpoint_key, args.arch,
                                           args.patch_size)
    if loaded.missing_keys:
        utils.fail(f"{args.pretrained_weights or 'the released weights'} lacks {len(loaded.missing_keys)} of the "
                   f"backbone's weights (e.g. {loaded.missing_keys[0]}); pass a whole DINO checkpoint or backbone")
    return model.eval(), embed_dim


def write_export(state_dict, info, args):
    """backbone.safetensors (and backbone.pth with --save_pth), then backbone.json; returns the first's path."""
    from safetensors.torch import save
    os.makedirs(args.output_dir, exist_ok=True)
    weights = os.path.join(args.output_dir, 'backbone.safetensors')
    write_atomically(weights, save(state_dict, metadata={'format': 'pt'}))
    if args.save_pth:
        pth = io.BytesIO()
        torch.save(state_dict, pth)
        write_atomically(os.path.join(args.output_dir, 'backbone.pth'), pth.getvalue())
    write_atomically(os.path.join(args.output_dir, 'backbone.json'), (json.dumps(info, indent=2) + '\n').encode())
    return weights


def timm_state_dict(model, img_size):
    """The backbone's weights under timm's names (DINO's are timm's), with the position embedding of an
    img_size image: what this ViT adds for such an image (its bicubic resize, not timm's antialiased one)."""
    state_dict = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    grid = img_size // model.patch_embed.patch_size
    tokens = torch.empty(1, grid * grid + 1, model.embed_dim)
    with torch.no_grad():
        state_dict['pos_embed'] = model.interpolate_pos_encoding(tokens, img_size, img_size).clone().contiguous()
    return state_dict


def timm_model(arch, patch_size):
    """timm's model name for a DINO ViT, and the create_model keyword arguments it needs on top."""
    arch = arch.replace('deit', 'vit')
    name = f'{arch}_patch{patch_size}_224'
    if name in TIMM_MODELS:
        return name, {}
    return f'{arch}_patch16_224', {'patch_size': patch_size}


def create_model_call(name, kwargs, weights):
    arguments = ', '.join(f'{key}={value!r}' for key, value in {**kwargs, 'checkpoint_path': weights}.items())
    return f"timm.create_model({name!r}, pretrained=False, {arguments})"


def export_transformers(model, embed_dim, args):
    """config.json, model.safetensors and preprocessor_config.json: a ViTModel for --img_size images (loaded and
    checked here) and the ViTImageProcessor of the evaluations' bicubic resize, centre crop and normalisation."""
    import transformers
    from safetensors.torch import save
    resize = args.resize or evaluation.default_resize(args.img_size)
    block = model.blocks[0]
    config = transformers.ViTConfig(
        hidden_size=embed_dim, num_hidden_layers=len(model.blocks), num_attention_heads=block.attn.num_heads,
        intermediate_size=block.mlp.fc1.out_features, hidden_act='gelu', layer_norm_eps=model.norm.eps,
        qkv_bias=block.attn.qkv.bias is not None, image_size=args.img_size, patch_size=args.patch_size,
        encoder_stride=args.patch_size, architectures=['ViTModel'])
    processor = transformers.ViTImageProcessor(
        do_convert_rgb=True, do_resize=True, size={'shortest_edge': resize},
        resample=transformers.image_utils.PILImageResampling.BICUBIC, do_center_crop=True,
        crop_size={'height': args.img_size, 'width': args.img_size}, do_rescale=True, rescale_factor=1 / 255,
        do_normalize=True, image_mean=list(utils.IMAGENET_MEAN), image_std=list(utils.IMAGENET_STD))
    folder = args.output_dir
    os.makedirs(folder, exist_ok=True)
    write_atomically(os.path.join(folder, 'model.safetensors'),
                     save(transformers_state_dict(model, args.img_size), metadata={'format': 'pt'}))
    write_atomically(os.path.join(folder, 'config.json'), config.to_json_string().encode())
    write_atomically(os.path.join(folder, 'preprocessor_config.json'), processor.to_json_string().encode())
    difference = check_transformers(model, folder, args.img_size)
    print(f"Wrote config.json, model.safetensors and preprocessor_config.json in {folder} (ViTModel for "
          f"{args.img_size}-pixel images; its processor resizes the short side to {resize}, bicubic, and crops the "
          f"centre {args.img_size}x{args.img_size}); on {CHECK_IMAGES} random images the [CLS] token of its "
          f"last_hidden_state is at most {difference:.1e} from this repository's features. Load it in transformers "
          "with:")
    print(f"processor = transformers.AutoImageProcessor.from_pretrained({folder!r}, backend='pil')")
    print(f"model = transformers.ViTModel.from_pretrained({folder!r}, add_pooling_layer=False)")


def transformers_state_dict(model, img_size):
    """The weights of timm_state_dict under the names of transformers' ViTModel (as the hub's DINO checkpoints
    store them, which every transformers version loads), each block's qkv split into query, key and value."""
    renamed = {}
    for name, tensor in timm_state_dict(model, img_size).items():
        stem, dot, param = name.rpartition('.') if name.endswith(('.weight', '.bias')) else (name, '', '')
        if not stem.startswith('blocks.'):
            renamed[TRANSFORMERS_NAMES[stem] + dot + param] = tensor
            continue
        _, index, part = stem.split('.', 2)
        layer = f'encoder.layer.{index}.'
        if part == 'attn.qkv':  # the output rows are the queries, then the keys, then the values
            for role, rows in zip(('query', 'key', 'value'), tensor.chunk(3)):
                renamed[f'{layer}attention.attention.{role}.{param}'] = rows.clone()
        else:
            renamed[f'{layer}{TRANSFORMERS_NAMES[part]}.{param}'] = tensor
    return renamed


def check_transformers(model, folder, img_size):
    """Load the export with ViTModel.from_pretrained (every weight used, none missing); the largest difference of
    its [CLS] token from our features on random images."""
    import transformers
    transformers.utils.logging.disable_progress_bar()
    exported, loading = transformers.ViTModel.from_pretrained(folder, add_pooling_layer=False,
                                                              output_loading_info=True)
    unused = [*loading['missing_keys'], *loading['unexpected_keys'], *loading['mismatched_keys']]
    if unused:
        raise RuntimeError(f"ViTModel does not load {folder} strictly: {unused}")
    images = random_images(img_size, CHECK_IMAGES)
    with torch.no_grad():
        return (exported.eval()(pixel_values=images).last_hidden_state[:, 0] - model(images)).abs().max().item()


class AttentionMaps(torch.nn.Module):
    """The last block's attention of the [CLS] token to the patches, renormalised, as visualize_attention.py
    shows them: (batch, heads, h, w)."""

    def __init__(self, vit):
        super().__init__()
        self.vit = vit

    def forward(self, images):
        return self.vit.cls_attention_maps(images)


def export_onnx(model, embed_dim, args):
    """backbone.onnx for --img_size images and any batch size, checked with onnxruntime when it is installed."""
    sized = model_at_size(model, args)
    module = sized if args.onnx_output == 'features' else AttentionMaps(sized)
    dynamic = {'pixel_values': {0: 'batch'}, args.onnx_output: {0: 'batch'}}
    onnx_model = io.BytesIO()
    with warnings.catch_warnings():
        # the TorchScript-based exporter (deprecated, but it takes seconds where the torch.export-based one takes
        # a minute on 2 cores) warns of it, and of the shape arithmetic it keeps as constants (the size is fixed)
        warnings.simplefilter('ignore')
        torch.onnx.export(module, (random_images(args.img_size, EXPORT_BATCH),), onnx_model, dynamo=False,
                          input_names=['pixel_values'], output_names=[args.onnx_output], dynamic_axes=dynamic)
    os.makedirs(args.output_dir, exist_ok=True)
    path = os.path.join(args.output_dir, 'backbone.onnx')
    write_atomically(path, onnx_model.getvalue())
    grid = args.img_size // args.patch_size
    shape = f'(batch, {embed_dim})' if args.onnx_output == 'features' else \
        f'(batch, {sized.blocks[-1].attn.num_heads}, {grid}, {grid})'
    print(f"Wrote {path} (input 'pixel_values': (batch, 3, {args.img_size}, {args.img_size}) float32 images "
          f"normalised as the evaluations do; output '{args.onnx_output}': {shape} float32)")
    check_onnx(module, path, args)
    print(f"session = onnxruntime.InferenceSession({path!r})")


def model_at_size(model, args):
    """The ViT built for --img_size images, holding the position embedding resized for them: its forward adds
    the embedding as stored, so that no interpolation is traced."""
    sized, _ = utils.build_backbone(args.arch, args.patch_size, img_size=[args.img_size])
    sized.load_state_dict(timm_state_dict(model, args.img_size))
    return sized.eval()


def check_onnx(module, path, args):
    """The largest difference of onnxruntime's output from PyTorch's on random images, printed."""
    if importlib.util.find_spec('onnxruntime') is None:
        print("onnxruntime is not installed, so the export was not run; pip install onnxruntime to check it")
        return
    import onnxruntime
    session = onnxruntime.InferenceSession(path, providers=['CPUExecutionProvider'])
    images = random_images(args.img_size, CHECK_IMAGES)
    output = torch.from_numpy(session.run(None, {'pixel_values': images.numpy()})[0])
    with torch.no_grad():
        difference = (output - module(images)).abs().max().item()
    print(f"onnxruntime on {CHECK_IMAGES} random images: {args.onnx_output} at most {difference:.1e} from PyTorch's")


def random_images(img_size, count):
    return torch.randn(count, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))


EXPORTS = {'timm': export_timm, 'transformers': export_transformers, 'onnx': export_onnx}


def write_atomically(path, data):
    """Write the bytes `data` to a temporary file renamed to `path`, noted as this repository's (a later export
    may replace it): a failed or interrupted export leaves an earlier file intact; a failed write is one error line."""
    tmp_path = f"{path}.tmp{os.getpid()}"
    try:
        Path(tmp_path).write_bytes(data)
        os.replace(tmp_path, path)
        outputdir.record_written(os.path.dirname(path), [os.path.basename(path)])
    except OSError as exc:
        utils.fail(f"cannot write {path} ({exc.strerror or exc}); any earlier file there is intact: free some space "
                   "or pass another --output_dir")
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp_path)


def trained_crop_size(path):
    """--global_crops_size of the training checkpoint at `path`; None for other files."""
    return (utils.saved_training_args(path) or {}).get('global_crops_size')


def check_args(args):
    utils.check_common_args(args)
    args.format = list(dict.fromkeys(args.format))
    utils.check_vit_arch(args, NOT_A_VIT[args.format[0]])
    img_size_given = args.img_size is not None
    if not img_size_given:
        args.img_size = STORED_IMAGE_SIZE
    utils.check_image_size(args.img_size, args.patch_size, '--img_size')
    if args.resize is not None and args.resize < args.img_size:
        utils.fail(f"--resize {args.resize} is smaller than --img_size {args.img_size}: the processor's centre crop "
                   f"would be padded with black; pass --resize {args.img_size} or more")
    utils.check_output_dir(args.output_dir)
    outputdir.check_replaceable(args.output_dir, [name for export_format in args.format
                                                  for name in EXPORT_FILES[export_format]], '--output_dir', args.overwrite)
    for export_format in args.format:
        for package, message in NEEDED[export_format].items():
            if importlib.util.find_spec(package) is None:
                utils.fail(message)
    if 'transformers' in args.format and int(importlib.metadata.version('transformers').split('.')[0]) < 5:
        utils.fail(f"--format transformers needs transformers 5 or newer (its ViTImageProcessor with a centre "
                   f"crop), found {importlib.metadata.version('transformers')}; pip install -U transformers")
    trained = trained_crop_size(args.pretrained_weights)
    if trained and not img_size_given and trained != args.img_size:
        print(f"Exporting for {args.img_size}-pixel images; {args.pretrained_weights} was trained on {trained}-pixel "
              f"global crops: pass --img_size {trained} to use it at that size")


def unread_flags(args):
    """The format-specific flags a run without that format does not read: {name: why}."""
    return {name: f'without --format {export_format}' for name, export_format in
            (('save_pth', 'timm'), ('resize', 'transformers'), ('onnx_output', 'onnx'))
            if export_format not in args.format}


def main(argv=None):
    parser = argparse.ArgumentParser('Export a DINO backbone for timm, transformers or ONNX',
                                     parents=[get_args_parser()])
    args = utils.parse_checked_args(parser, check_args, argv, unread_flags)
    utils.run_reporting_failures(export_backbone, args)


if __name__ == '__main__':
    main()
