"""Self-attention videos: the last-block [CLS] attention of a DINO ViT for every frame of a video.

From a video file: frames go to --output_path/frames, attention images (as the original: the [CLS] attention
averaged over heads, in inferno colours; --outline adds the outline of the region holding --threshold of the
attention mass) to --output_path/attention, and the assembled video to --output_path/video.<--video_format>.
From a folder of frames, the frames are read there. With --video_only, --input_path is a folder of attention
images and only the video is made.
"""
import argparse
import os
import re

import cv2
import torch
from PIL import Image
from tqdm import tqdm

import evaluation
import imagedata
import outputdir
import utils

FOURCC = {'mp4': 'mp4v', 'avi': 'XVID'}
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp')
OUTLINE_COLOR = (255, 255, 255)


def get_args_parser():
    parser = argparse.ArgumentParser('Generation self-attention video')
    utils.add_model_args(parser, arch='vit_small', patch_size=8)
    parser.add_argument('--input_path', required=True, type=utils.path_arg, help="""A video file to extract frames from,
        a folder of frames, or with --video_only a folder of attention images.""")
    parser.add_argument('--output_path', default='./', type=utils.path_arg, help="""Where the folders of frames and
        attention images and the video go (default: the current folder).""")
    parser.add_argument('--threshold', type=float, default=0.6, help="""With --outline, outline the region that
        keeps this fraction of the attention mass (0 draws no outline).""")
    parser.add_argument('--outline', default=False, type=utils.bool_flag, help="""Draw a white outline around the
        --threshold mass region on every attention image (default false: the heat map alone, as the original).""")
    parser.add_argument('--renormalise_heads', default=False, type=utils.bool_flag, help="""Average the heads'
        maps after scaling each to sum 1, so every head weighs the same (default false: the raw attention
        rows are averaged, as the original).""")
    parser.add_argument('--resize', default=None, type=int, nargs='+', help="""Resize the frames first:
        one value for the short side or H W, e.g. --resize 512 or --resize 720 1280 (use it if out of memory).""")
    parser.add_argument('--video_only', action='store_true', help="""Only assemble the video from a folder of
        attention images given as --input_path (e.g. ./attention/).""")
    parser.add_argument('--fps', default=30.0, type=float, help="""Frames per second of the video; taken from the
        input video when frames are extracted from one.""")
    parser.add_argument('--video_format', default='mp4', type=str, choices=['mp4', 'avi'],
                        help='Format of the generated video (mp4 or avi).')
    parser.add_argument('--batch_size', default=8, type=int, help='Frames per forward pass.')
    outputdir.add_overwrite_arg(parser)
    utils.add_device_args(parser)
    return parser


def generate(args):
    if args.video_only:
        generate_video_from_images(args.input_path, args.output_path, args)
        outputdir.record_written(args.output_path, output_names(args))
        return
    frames_folder = args.input_path
    if os.path.isfile(args.input_path):
        frames_folder = os.path.join(args.output_path, 'frames')
        args.fps = extract_frames_from_video(args.input_path, frames_folder, args.fps)
    frame_list = images_in_natural_order(frames_folder)
    if not frame_list:
        utils.fail(f"no frames ({', '.join(IMAGE_EXTENSIONS)}) in {frames_folder}")

    device = utils.start_run(args, show_args=False, join_group=False)
    model = evaluation.load_frozen_vit(args, device, attention_weights=True)
    attention_folder = os.path.join(args.output_path, 'attention')
    inference(model, frame_list, attention_folder, args, device)
    generate_video_from_images(attention_folder, args.output_path, args)
    outputdir.record_written(args.output_path, output_names(args))


def extract_frames_from_video(video_path, out_folder, default_fps):
    """Write every frame as out_folder/frame-NNNN.jpg; return the video's frame rate."""
    capture = cv2.VideoCapture(video_path)
    fps = capture.get(cv2.CAP_PROP_FPS) if capture.isOpened() else 0
    success, frame = capture.read()
    if not success:
        utils.fail(f"cannot read video {video_path}: OpenCV decodes no frame from it (not a video, or a codec "
                   "this OpenCV build lacks); pass another file or a folder of frames")
    fps = fps if fps > 0 else default_fps
    print(f"Video: {video_path} ({fps} fps); extracting frames to {out_folder}")
    os.makedirs(out_folder, exist_ok=True)
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    with tqdm(total=total, desc='Extracting frames', unit='frame') as progress:
        count = 0
        while success:
            cv2.imwrite(os.path.join(out_folder, f'frame-{count:04}.jpg'), frame)
            count += 1
            progress.update()
            success, frame = capture.read()
    capture.release()
    return fps


@torch.no_grad()
def inference(model, frame_list, out_folder, args, device):
    """Write out_folder/attn-<frame>.jpg for every frame, running same-size frames in batches."""
    print(f"Generating attention images to {out_folder}")
    os.makedirs(out_folder, exist_ok=True)
    size = None if args.resize is None else args.resize[0] if len(args.resize) == 1 else tuple(args.resize)
    transform = evaluation.attention_transform(size)
    batch, names = [], []
    for path in tqdm(frame_list, desc='Attention', unit='frame'):
        img = evaluation.crop_to_patch_multiple(transform(load_frame(path)), args.patch_size)
        if batch and (len(batch) == args.batch_size or img.shape != batch[0].shape):
            write_attention_images(model, batch, names, out_folder, args, device)
            batch, names = [], []
        batch.append(img)
        names.append(os.path.splitext(os.path.basename(path))[0])
    write_attention_images(model, batch, names, out_folder, args, device)


def write_attention_images(model, batch, names, out_folder, args, device):
    with utils.autocast_context(device.type, args.autocast):
        attentions = model.cls_attention_maps(torch.stack(batch).to(device), args.renormalise_heads)
    utils.mark_step()
    mean_maps = attentions.mean(dim=1).cpu()  # (batch, h, w): average over heads
    masks = evaluation.attention_mass_masks(mean_maps, args.threshold) if args.outline and args.threshold > 0 else None
    for i, name in enumerate(names):
        image = evaluation.colorize(evaluation.upsample_patches(mean_maps[i], args.patch_size).numpy(), 'inferno')
        if masks is not None:
            mask = evaluation.upsample_patches(masks[i], args.patch_size).numpy()
            image = evaluation.draw_mask(image, mask, color=OUTLINE_COLOR, fill=False)
        Image.fromarray(image).save(os.path.join(out_folder, f'attn-{name}.jpg'))


def generate_video_from_images(attention_folder, out_folder, args):
    """Assemble attention_folder/attn-*.jpg (in natural order) into out_folder/video.<format>."""
    images = [path for path in images_in_natural_order(attention_folder) if os.path.basename(path).startswith('attn-')]
    if not images:
        utils.fail(f"no attention images (attn-*.jpg) in {attention_folder}")
    first = read_bgr(images[0])
    size = (first.shape[1], first.shape[0])
    video_path = os.path.join(out_folder, f'video.{args.video_format}')
    os.makedirs(out_folder, exist_ok=True)
    print(f"Generating video {size} at {args.fps} fps to {video_path}")
    writer = cv2.VideoWriter(video_path, cv2.VideoWriter_fourcc(*FOURCC[args.video_format]), args.fps, size)
    if not writer.isOpened():
        utils.fail(f"OpenCV cannot write {video_path} ({FOURCC[args.video_format]} codec); try --video_format "
                   f"{'avi' if args.video_format == 'mp4' else 'mp4'}")
    for path in tqdm(images, desc='Writing video', unit='frame'):
        frame = read_bgr(path)
        if (frame.shape[1], frame.shape[0]) != size:  # a video has one frame size
            frame = cv2.resize(frame, size)
        writer.write(frame)
    writer.release()
    print(f"Done: {video_path}")


def images_in_natural_order(folder):
    """Image files of a folder in natural order (frame2 before frame10)."""
    names = [f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS)]
    return [os.path.join(folder, name) for name in sorted(names, key=natural_key)]


def natural_key(name):
    return [int(part) if part.isdigit() else part for part in re.split(r'(\d+)', name)]


def load_frame(path):
    try:
        return imagedata.pil_loader(path)
    except utils.DataError as exc:
        utils.fail(f"{exc}; remove or replace the frame")


def read_bgr(path):
    frame = cv2.imread(path)
    if frame is None:
        utils.fail(f"cannot read image {path}; remove or replace it")
    return frame


def check_args(args):
    utils.check_common_args(args)
    utils.check_vit_arch(args, 'the attention maps are those of a ViT')
    if args.resize is not None:
        if len(args.resize) not in (1, 2):
            utils.fail("--resize takes one value (short side) or two (height width)")
        for side in args.resize:
            utils.check_image_size(side, args.patch_size, '--resize')
    if not 0 <= args.threshold <= 1:
        utils.fail(f"--threshold is a fraction of the attention mass in [0, 1], got {args.threshold}")
    if not 0 < args.fps < float('inf'):
        utils.fail(f"--fps must be positive, got {args.fps}")
    imagedata.check_not_synthetic(args.input_path, '--input_path', 'a video file or a folder of frames')
    if not os.path.exists(args.input_path):
        utils.fail(f"--input_path {args.input_path} does not exist; pass a video file or a folder of frames")
    if args.video_only and not os.path.isdir(args.input_path):
        utils.fail("--video_only needs --input_path to be a folder of attention images (attn-*.jpg)")
    utils.check_output_dir(args.output_path, '--output_path')
    outputdir.check_replaceable(args.output_path, output_names(args), '--output_path', args.overwrite)


def output_names(args):
    """The files and folders this run writes in --output_path."""
    names = [f'video.{args.video_format}']
    if not args.video_only:
        names += ['attention'] + (['frames'] if os.path.isfile(args.input_path) else [])
    return names


def unread_flags(args):
    """The flags this run does not read, with why: {name: why} (given on the command line, they get a warning)."""
    if args.video_only:
        return dict.fromkeys(['arch', 'patch_size', 'pretrained_weights', 'checkpoint_key', 'threshold', 'outline',
                              'renormalise_heads', 'resize', 'batch_size', 'autocast'],
                             'with --video_only (no attention is computed)')
    unread = {} if args.outline else {'threshold': 'without --outline true (it sets the outlined region)'}
    if os.path.isfile(args.input_path):
        unread['fps'] = "on a video file (the video's own frame rate is used)"
    return unread


def main(argv=None):
    args = utils.parse_checked_args(get_args_parser(), check_args, argv, unread_flags)
    with outputdir.only_writer(args, 'output_path'):
        utils.run_reporting_failures(generate, args)


if __name__ == '__main__':
    main()
