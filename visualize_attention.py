"""Self-attention of the [CLS] token in the last block of a DINO ViT, one map per head, for one image.

Saves the (resized, cropped) input image, each head's map upsampled to the image, and with --threshold the
masks that keep that fraction of each head's attention mass, drawn over the image.
"""
import argparse
import contextlib
import os

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import evaluation
import imagedata
import outputdir
import utils

SAMPLE_IMAGE = 'chelsea'  # scikit-image's sample photograph (a cat), shipped with the package
MAX_ENLARGEMENT = 4  # an image enlarged more than this many times gets a warning
# Above this many tokens a run warns and shows its progress block by block: the attention's time grows with
# their square; vit_small took 68 s for 14,401 tokens (960x960, patch 8) on a shared 2-core CPU.
LARGE_TOKENS = 10_000
# Peak memory of the forward pass per token and embedding dimension (float32), measured as the process's peak
# RSS above the model's at 14,401 tokens: 225 MiB for vit_tiny (192 dimensions), 437 MiB for vit_small (384).
BYTES_PER_TOKEN_DIM = 85


def get_args_parser():
    parser = argparse.ArgumentParser('Visualize Self-Attention maps')
    utils.add_model_args(parser, arch='vit_small', patch_size=8)
    parser.add_argument('--image_path', default=None, type=utils.path_arg, help=f"""Path of the image to visualize;
        without it, scikit-image's sample photograph '{SAMPLE_IMAGE}' is used.""")
    parser.add_argument('--image_size', default=(480, 480), type=int, nargs='+', help="""Resize the image
        to H W (or its short side to one value) before cropping it to a multiple of the patch size.""")
    parser.add_argument('--output_dir', default='.', type=utils.path_arg, help='Where the images go.')
    outputdir.add_overwrite_arg(parser)
    parser.add_argument('--threshold', type=float, default=None, help="""Also save the masks that keep this
        fraction of each head's attention mass (e.g. 0.6), drawn over the image.""")
    utils.add_device_args(parser)
    return parser


def visualize(args):
    device = utils.start_run(args, show_args=False, join_group=False)
    img = load_image(args.image_path)
    model = evaluation.load_frozen_vit(args, device, attention_weights=True)

    size = args.image_size[0] if len(args.image_size) == 1 else tuple(args.image_size)
    width, height = evaluation.resized_shape(img.size, size)
    warn_enlargement(img.size, (width, height))
    large = check_token_count(model, (height, width), args, device)
    img = evaluation.attention_transform(size)(img)
    img = evaluation.crop_to_patch_multiple(img, args.patch_size).unsqueeze(0)
    with utils.autocast_context(device.type, args.autocast), block_progress(model.blocks[:-1], large):
        attentions = model.cls_attention_maps(img.to(device))[0].cpu()  # (heads, h, w)

    os.makedirs(args.output_dir, exist_ok=True)
    image = to_uint8_image(img[0])
    written = ['img.png'] + [f'attn-head{head}.png' for head in range(len(attentions))]
    save(image, os.path.join(args.output_dir, 'img.png'))
    maps = evaluation.upsample_patches(attentions, args.patch_size).numpy()
    for head, head_map in enumerate(maps):
        save(evaluation.colorize(head_map), os.path.join(args.output_dir, f'attn-head{head}.png'))
    if args.threshold is not None:
        masks = evaluation.attention_mass_masks(attentions, args.threshold)
        for head, mask in enumerate(evaluation.upsample_patches(masks, args.patch_size).numpy()):
            written.append(f'mask_th{args.threshold}_head{head}.png')
            save(evaluation.draw_mask(image, mask), os.path.join(args.output_dir, written[-1]))
    outputdir.record_written(args.output_dir, written)


def load_image(image_path):
    """The image to visualize as RGB PIL, or scikit-image's sample photograph when no path is given."""
    if image_path is None:
        from skimage import data
        print(f"No --image_path given: using scikit-image's sample photograph '{SAMPLE_IMAGE}'.")
        return Image.fromarray(getattr(data, SAMPLE_IMAGE)()).convert('RGB')
    if not os.path.isfile(image_path):
        utils.fail(f"--image_path {image_path} is not a file; pass the path of an image")
    try:
        return imagedata.pil_loader(image_path)
    except utils.DataError as exc:
        utils.fail(f"{exc} (is it an image?)")


def warn_enlargement(image_size, resized):
    """(width, height) before and after the resize: a tiny image blown up shows the enlargement, not its content."""
    factor = max(new / old for new, old in zip(resized, image_size))
    if factor > MAX_ENLARGEMENT:
        utils.warn(f"the image is {image_size[0]}x{image_size[1]} pixels: --image_size enlarges it {factor:.0f} times "
                   f"(to {resized[0]}x{resized[1]}), so its attention maps show little of it; pass a larger image "
                   "or a smaller --image_size")


def check_token_count(model, image_shape, args, device):
    """Warn before more than LARGE_TOKENS tokens (an image of (height, width) image_shape), saying their memory
    and work; refuse a count whose memory exceeds the device's. Returns whether the count is that large."""
    patch = args.patch_size
    tokens = (image_shape[0] // patch) * (image_shape[1] // patch) + 1
    if tokens <= LARGE_TOKENS:
        return False
    needed = tokens * model.embed_dim * BYTES_PER_TOKEN_DIM
    size = f"--image_size {' '.join(map(str, args.image_size))} makes {tokens:,} tokens (patch {patch})"
    available = memory_available(device)
    if available is not None and needed > available:
        utils.fail(f"{size}, whose forward pass needs about {needed / 2 ** 20:,.0f} MiB, more than the "
                   f"{available / 2 ** 20:,.0f} MiB of the {device.type}; pass a smaller --image_size")
    work = (tokens / ((480 // patch) ** 2 + 1)) ** 2
    utils.warn(f"{size}: about {needed / 2 ** 20:,.0f} MiB of memory, and {work:,.0f} times the attention work of "
               "--image_size 480 480 (it grows with the square of the tokens); progress is shown block by block")
    return True


def memory_available(device):
    """Bytes the forward pass may use: the CPU's physical memory, a GPU's free memory; None elsewhere."""
    return utils.run_device().free_memory()


@contextlib.contextmanager
def block_progress(blocks, show):
    """With `show`, a progress bar that each of `blocks` advances as its forward pass ends."""
    if not show:
        yield
        return
    with tqdm(total=len(blocks), desc='Attention blocks', unit='block') as bar:
        def advance(*_):  # a forward hook returning a value would replace the block's output
            bar.update()
        hooks = [block.register_forward_hook(advance) for block in blocks]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()


def to_uint8_image(img):
    """(3, H, W) normalised tensor -> RGB uint8 array, min-max scaled as torchvision's save_image(normalize=True)."""
    img = (img - img.min()) / (img.max() - img.min()).clamp_min(1e-5)
    return img.mul(255).add(0.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def save(array, path):
    Image.fromarray(np.ascontiguousarray(array)).save(path)
    print(f"{path} saved.")


def check_args(args):
    utils.check_common_args(args)
    utils.check_vit_arch(args, 'the attention maps are those of a ViT')
    if len(args.image_size) not in (1, 2):
        utils.fail("--image_size takes one value (short side) or two (height width)")
    for side in args.image_size:
        utils.check_image_size(side, args.patch_size, '--image_size')
    if args.threshold is not None and not 0 < args.threshold <= 1:
        utils.fail(f"--threshold is a fraction of the attention mass in (0, 1], got {args.threshold}")
    if args.image_path is not None:
        utils.check_input_file(args.image_path, '--image_path')
    utils.check_output_dir(args.output_dir)
    masks = [] if args.threshold is None else [f'mask_th{args.threshold}_head*.png']
    outputdir.check_replaceable(args.output_dir, ['img.png', 'attn-head*.png', *masks], '--output_dir', args.overwrite)


def main(argv=None):
    args = utils.parse_checked_args(get_args_parser(), check_args, argv)
    with outputdir.only_writer(args, 'output_dir'):
        utils.run_reporting_failures(visualize, args)


if __name__ == '__main__':
    main()
