"""Export a DINO ViT backbone for timm: the network of a training checkpoint (or a released DINO backbone file)
as the state dict of timm's VisionTransformer with num_classes=0, in backbone.safetensors (and backbone.pth),
with backbone.json beside it, and the timm.create_model(...) call that loads it.

    python tools/export_backbone.py --pretrained_weights ./dino_vit_small/checkpoint.pth --output_dir ./export
"""
import argparse
import contextlib
import importlib.util
import io
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import outputdir  # noqa: E402
import utils  # noqa: E402

# the names timm registers for DINO's ViTs; the others are the patch-16 model with its patch_size overridden
# (timm has no vit_tiny_patch8_224)
TIMM_MODELS = {'vit_tiny_patch16_224', 'vit_small_patch16_224', 'vit_small_patch8_224', 'vit_base_patch16_224',
               'vit_base_patch8_224'}
EXPORT_FILES = ('backbone.safetensors', 'backbone.pth', 'backbone.json')
STORED_IMAGE_SIZE = 224  # DINO's ViTs keep their position embedding for a 224-pixel image


def get_args_parser():
    parser = argparse.ArgumentParser('Export a DINO backbone for timm', add_help=False)
    utils.add_model_args(parser, arch='vit_small', patch_size=16)
    parser.add_argument('--img_size', default=None, type=int, help="""Side in pixels of the images the timm model
        is created for (its img_size); default 224. At 224 the position embedding is written as stored; at another
        size, resized exactly as this repository's ViT resizes it for such images, so that timm computes the same
        features. For a model trained on small images, pass its --global_crops_size.""")
    parser.add_argument('--output_dir', default='.', type=utils.path_arg,
                        help='Folder for backbone.safetensors, backbone.json (and backbone.pth).')
    parser.add_argument('--save_pth', default=False, type=utils.bool_flag,
                        help='Also write backbone.pth, the same state dict saved with torch.save.')
    outputdir.add_overwrite_arg(parser)
    return parser


def export_backbone(args):
    model, embed_dim = load_backbone(args)
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
    return model, embed_dim


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
    outputdir.record_written(args.output_dir, [name for name in EXPORT_FILES if args.save_pth or name != 'backbone.pth'])
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


def write_atomically(path, data):
    """Write the bytes `data` to a temporary file renamed to `path`: a failed or interrupted export leaves an
    earlier file intact; a failed write is one error line."""
    tmp_path = f"{path}.tmp{os.getpid()}"
    try:
        Path(tmp_path).write_bytes(data)
        os.replace(tmp_path, path)
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
    utils.check_vit_arch(args, "timm's VisionTransformer has models for DINO's ViTs only")
    img_size_given = args.img_size is not None
    if not img_size_given:
        args.img_size = STORED_IMAGE_SIZE
    utils.check_image_size(args.img_size, args.patch_size, '--img_size')
    utils.check_output_dir(args.output_dir)
    outputdir.check_replaceable(args.output_dir, EXPORT_FILES, '--output_dir', args.overwrite)
    if importlib.util.find_spec('safetensors') is None:
        utils.fail("the export is written with safetensors, which is not installed; pip install safetensors "
                   "(timm, which loads the export, depends on it too)")
    trained = trained_crop_size(args.pretrained_weights)
    if trained and not img_size_given and trained != args.img_size:
        print(f"Exporting for {args.img_size}-pixel images; {args.pretrained_weights} was trained on {trained}-pixel "
              f"global crops: pass --img_size {trained} to use it at that size")


def main(argv=None):
    parser = argparse.ArgumentParser('Export a DINO backbone for timm', parents=[get_args_parser()])
    args = utils.parse_checked_args(parser, check_args, argv)
    utils.run_reporting_failures(export_backbone, args)


if __name__ == '__main__':
    main()
