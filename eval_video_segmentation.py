"""Video object segmentation on DAVIS 2017 by propagating first-frame masks with frozen DINO patch features.

Writes each video's masks as DAVIS palette PNGs to --output_dir/<video>/, and, where the ground truth covers
the frames, DAVIS's J (region IoU), F (boundary F-measure) and J&F means to --output_dir/metrics.json.
Results are written to --output_dir/.incomplete/ and moved into place when every video is done, so a run that
stops leaves the previous complete results as they were.
"""
import argparse
import json
import os
import shutil
from collections import deque

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from skimage.morphology import disk
from tqdm import tqdm

import evaluation
import imagedata
import outputdir
import utils

# The original normalises frames with this std (0.228, not ImageNet's 0.229 for red).
FRAME_MEAN, FRAME_STD = (0.485, 0.456, 0.406), (0.228, 0.224, 0.225)
SHORT_SIDE = 480
AFFINITY_TEMPERATURE = 0.1
TARGET_CHUNK = 1024  # target patches whose affinities are held in memory at once
STAGING = '.incomplete'  # the folder inside --output_dir where a run writes until it completes


def get_args_parser():
    parser = argparse.ArgumentParser('Evaluation with video object segmentation on DAVIS 2017')
    utils.add_model_args(parser, arch='vit_small', patch_size=16)
    parser.add_argument('--output_dir', default='.', type=utils.path_arg,
                        help='Where the segmentations and metrics.json go.')
    outputdir.add_overwrite_arg(parser)
    parser.add_argument('--data_path', default='/path/to/davis/', type=utils.path_arg, help="""DAVIS 2017 folder holding
        JPEGImages/480p, Annotations/480p and ImageSets/2017/val.txt.""")
    parser.add_argument('--n_last_frames', type=int, default=7, help='Number of preceding frames used as context.')
    parser.add_argument('--size_mask_neighborhood', default=12, type=int, help="""Restrict the source patches
        of a target patch to this many patches around its position (0: no restriction).""")
    parser.add_argument('--topk', type=int, default=5, help='Accumulate labels from the top k neighbours.')
    parser.add_argument('--bs', type=int, default=6, help='Frames per forward pass; reduce if out of memory.')
    utils.add_device_args(parser)
    return parser


def eval_davis(args):
    device = utils.start_run(args, join_group=False)
    videos = list_videos(args.data_path)
    names = [name for name, _, _ in videos]
    outputdir.check_replaceable(args.output_dir, [*names, 'metrics.json'], '--output_dir', args.overwrite)
    model = evaluation.load_frozen_vit(args, device)
    color_palette = davis_palette()
    staging = start_staging(args.output_dir)

    scores = {}
    for name, frame_list, annotation_dir in tqdm(videos, desc='Videos', unit='video'):
        first_seg, seg_ori = read_seg(annotation_path(annotation_dir, frame_list[0]), args.patch_size)
        video_folder = os.path.join(staging, name)
        predictions = eval_video_tracking_davis(args, model, frame_list, video_folder, first_seg, seg_ori,
                                                color_palette, device)
        gt_paths = [annotation_path(annotation_dir, frame) for frame in frame_list[1:-1]]
        if not gt_paths or not all(os.path.isfile(p) for p in gt_paths):
            tqdm.write(f"{name}: masks done (no ground truth for every frame: not scored)")
            continue
        scores[name] = evaluate_video(gt_paths, predictions[1:-1], n_objects=int(seg_ori.max()))
        tqdm.write(f"{name}: {format_scores(scores[name])}")
        write_metrics(scores, os.path.join(staging, 'metrics.json'))
    publish(staging, args.output_dir, names)
    outputdir.record_written(args.output_dir, [*names, *(['metrics.json'] if scores else [])])
    print(f"Masks written to {args.output_dir}")
    if scores:
        print(f"DAVIS 2017 over {len(scores)} videos: {format_scores(overall_scores(scores))}")
        print(f"Scores written to {os.path.join(args.output_dir, 'metrics.json')}")


# ============ label propagation ============

@torch.no_grad()
def eval_video_tracking_davis(args, model, frame_list, video_folder, first_seg, seg_ori, color_palette, device):
    """Propagate the first frame's labels through the video; save and return every frame's label map."""
    features = frame_features(args, model, frame_list, device)
    first_feat, (h, w), (ori_h, ori_w) = next(features)
    if tuple(first_seg.shape[-2:]) != (h, w) or seg_ori.shape != (ori_h, ori_w):
        utils.fail(f"the first annotation of {os.path.basename(video_folder)} is {seg_ori.shape[1]}x{seg_ori.shape[0]} "
                   f"but its frames are {ori_w}x{ori_h}; annotations must match the frames")
    first_seg = first_seg.to(device)
    os.makedirs(video_folder, exist_ok=True)
    mask_neighborhood = None
    if args.size_mask_neighborhood > 0:
        mask_neighborhood = restrict_neighborhood(h, w, args.size_mask_neighborhood, device)
    imwrite_indexed(output_path(video_folder, frame_list[0]), seg_ori, color_palette)
    predictions = [seg_ori]
    que = deque(maxlen=args.n_last_frames)  # (features, soft labels) of the preceding frames
    for frame_path, (feat_tar, _, _) in tqdm(zip(frame_list[1:], features), total=len(frame_list) - 1,
                                             desc=os.path.basename(video_folder), unit='frame', leave=False):
        used_frame_feats = [first_feat] + [feat for feat, _ in que]
        used_segs = [first_seg] + [seg for _, seg in que]
        seg_tar = label_propagation(args, feat_tar, used_frame_feats, used_segs, mask_neighborhood)
        que.append((feat_tar, seg_tar))
        labels = upsample_labels(seg_tar, args.patch_size, ori_h, ori_w)
        imwrite_indexed(output_path(video_folder, frame_path), labels, color_palette)
        predictions.append(labels)
    return predictions


def label_propagation(args, feat_tar, list_frame_feats, list_segs, mask_neighborhood=None):
    """Soft labels (1, C, h, w) of the target frame from those of the context frames.

    Each target patch takes its top-k most similar context patches (cosine similarity of the normalised
    features, among the patches of its neighbourhood in every context frame) and averages their labels
    with weights softmax(similarity / 0.1) over those k, i.e. exp(affinity / 0.1) renormalised.
    """
    n_context = len(list_frame_feats)
    _, channels, h, w = list_segs[0].shape
    sources = torch.cat(list_frame_feats)                                           # (n_context*h*w, dim)
    source_labels = torch.cat([seg.flatten(2)[0].T for seg in list_segs])          # (n_context*h*w, C)
    k = min(args.topk, sources.shape[0])
    seg_tar = []
    for rows in torch.arange(h * w, device=feat_tar.device).split(TARGET_CHUNK):
        affinity = (feat_tar[rows] @ sources.T).view(len(rows), n_context, h * w)
        if mask_neighborhood is not None:
            affinity = affinity.masked_fill(~mask_neighborhood[rows].unsqueeze(1), float('-inf'))
        top_affinity, top_index = affinity.flatten(1).topk(k, dim=1)
        weights = (top_affinity / AFFINITY_TEMPERATURE).softmax(dim=1)
        seg_tar.append(torch.einsum('tk,tkc->tc', weights, source_labels[top_index]))
    return torch.cat(seg_tar).T.reshape(1, channels, h, w)


def restrict_neighborhood(h, w, size, device):
    """(h*w, h*w) boolean: target patch i may use source patch j when both grid offsets are at most `size`."""
    rows, cols = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing='ij')
    rows, cols = rows.flatten(), cols.flatten()
    near_rows = (rows[:, None] - rows[None, :]).abs() <= size
    near_cols = (cols[:, None] - cols[None, :]).abs() <= size
    return near_rows & near_cols


def norm_mask(mask):
    """Min-max scale to [0, 1] every channel of (C, H, W) whose maximum is positive (and not constant)."""
    flat = mask.flatten(1)
    low, high = flat.min(dim=1).values[:, None, None], flat.max(dim=1).values[:, None, None]
    scaled = (mask - low) / (high - low).clamp_min(1e-12)
    return torch.where((high > 0) & (high > low), scaled, mask)


def upsample_labels(seg_tar, patch_size, ori_h, ori_w):
    """Soft patch labels -> label map of the original frame size (bilinear x patch, per-channel min-max,
    argmax, then nearest resize)."""
    seg = F.interpolate(seg_tar, scale_factor=patch_size, mode='bilinear', align_corners=False)[0]
    labels = norm_mask(seg).argmax(dim=0).to(torch.uint8).cpu().numpy()
    return np.asarray(Image.fromarray(labels).resize((ori_w, ori_h), Image.NEAREST))


def frame_features(args, model, frame_list, device):
    """Yield (normalised patch features (h*w, dim), (h, w), (original height, width)) of every frame in order,
    running the model on --bs frames at a time."""
    video_shape = None
    for start in range(0, len(frame_list), args.bs):
        paths = frame_list[start:start + args.bs]
        frames, sizes = zip(*(read_frame(path) for path in paths))
        video_shape = video_shape or frames[0].shape  # also across batches: one grid for the whole video
        if any(frame.shape != video_shape for frame in frames):
            utils.fail(f"frames of one video differ in size (around {paths[0]}); DAVIS videos have one frame size")
        batch = torch.stack(frames).to(device)
        with utils.autocast_context(device.type, args.autocast):
            out = model.get_intermediate_layers(batch, n=1)[0][:, 1:]  # the [CLS] token is dropped
        out = F.normalize(out.float(), dim=-1, p=2)
        utils.mark_step()
        grid = (batch.shape[-2] // args.patch_size, batch.shape[-1] // args.patch_size)
        for feat, size in zip(out, sizes):
            yield feat, grid, size


# ============ DAVIS files ============

def list_videos(data_path):
    """(name, frame paths, annotation folder) of every video in ImageSets/2017/val.txt, checked before any work."""
    if not os.path.isdir(data_path):
        utils.fail(f"--data_path {data_path} is not a folder; pass the DAVIS 2017 folder "
                   "(JPEGImages/480p, Annotations/480p, ImageSets/2017/val.txt)")
    list_file = os.path.join(data_path, 'ImageSets', '2017', 'val.txt')
    if not os.path.isfile(list_file):
        utils.fail(f"{list_file} not found; --data_path must be a DAVIS 2017 folder with ImageSets/2017/val.txt "
                   "listing the videos to segment")
    with open(list_file) as f:
        names = [line.strip() for line in f if line.strip()]
    if not names:
        utils.fail(f"{list_file} lists no videos")
    videos = []
    for name in names:
        frame_list = read_frame_list(os.path.join(data_path, 'JPEGImages', '480p', name))
        annotation_dir = os.path.join(data_path, 'Annotations', '480p', name)
        if not frame_list:
            utils.fail(f"no frames (*.jpg) in {os.path.join(data_path, 'JPEGImages', '480p', name)} for video "
                       f"'{name}' listed in {list_file}; nothing was processed")
        first_annotation = annotation_path(annotation_dir, frame_list[0])
        if not os.path.isfile(first_annotation):
            utils.fail(f"video '{name}' has no first-frame annotation {first_annotation}; add it (an indexed PNG) "
                       "or remove the video from val.txt; nothing was processed")
        check_sizes(name, frame_list, annotation_dir)
        videos.append((name, frame_list, annotation_dir))
    return videos


def check_sizes(name, frame_list, annotation_dir):
    """Every frame of a video has one size, and so has each of its annotations; the first annotation is an
    indexed PNG (only that one is decoded: of the others, only the headers are read)."""
    frame_size = image_size(frame_list[0], 'frame')
    read_annotation(annotation_path(annotation_dir, frame_list[0]))  # an indexed PNG
    for frame in frame_list:
        if image_size(frame, 'frame') != frame_size:
            utils.fail(f"frames of video '{name}' differ in size ({frame} is {size_text(image_size(frame, 'frame'))}, "
                       f"{frame_list[0]} {size_text(frame_size)}); DAVIS videos have one frame size; "
                       "nothing was processed")
        annotation = annotation_path(annotation_dir, frame)
        if os.path.isfile(annotation) and image_size(annotation, 'annotation') != frame_size:
            utils.fail(f"annotation {annotation} is {size_text(image_size(annotation, 'annotation'))} but the frames "
                       f"of video '{name}' are {size_text(frame_size)}; annotations must match the frames; "
                       "nothing was processed")


def image_size(path, what):
    """(width, height) from the file's header."""
    try:
        with Image.open(path) as img:
            return img.size
    except (OSError, ValueError):
        utils.fail(f"cannot read {what} {path} (empty, cut short or not an image); replace the file and run again; "
                   "nothing was processed")


def size_text(size):
    return f"{size[0]}x{size[1]}"


def read_frame_list(video_dir):
    if not os.path.isdir(video_dir):
        return []
    return sorted(os.path.join(video_dir, f) for f in os.listdir(video_dir) if f.lower().endswith('.jpg'))


def annotation_path(annotation_dir, frame_path):
    return os.path.join(annotation_dir, os.path.splitext(os.path.basename(frame_path))[0] + '.png')


def output_path(video_folder, frame_path):
    return os.path.join(video_folder, os.path.splitext(os.path.basename(frame_path))[0] + '.png')


def scaled_size(height, width, short_side=SHORT_SIDE):
    """The original's frame size: short side to 480, long side rounded down to a multiple of 64."""
    if height > width:
        return int((short_side * height / width) // 64 * 64), short_side
    return short_side, int((short_side * width / height) // 64 * 64)


def read_frame(path):
    """Frame as a normalised (3, H, W) RGB tensor at the original's scale, and its original (height, width)."""
    img = cv2.imread(path)
    if img is None:
        utils.fail(f"cannot read frame {path} (missing or not an image); replace the file and run again")
    ori_h, ori_w = img.shape[:2]
    th, tw = scaled_size(ori_h, ori_w)
    img = cv2.cvtColor(cv2.resize(img, (tw, th)), cv2.COLOR_BGR2RGB).astype(np.float32) / 255.
    img = (img - np.asarray(FRAME_MEAN, dtype=np.float32)) / np.asarray(FRAME_STD, dtype=np.float32)
    return torch.from_numpy(img).permute(2, 0, 1).contiguous(), (ori_h, ori_w)


def read_annotation(path):
    """Label map of a DAVIS annotation (indexed PNG); void (255) counts as background, as DAVIS's evaluation does."""
    try:
        with Image.open(path) as img:
            if img.mode not in ('P', 'L'):
                utils.fail(f"annotation {path} is a {img.mode} image; DAVIS annotations are indexed (palette) PNGs")
            labels = np.array(img)
    except (OSError, ValueError) as exc:
        utils.fail(f"cannot read annotation {path}: {exc}")
    labels[labels == 255] = 0
    return labels


def read_seg(seg_path, factor):
    """One-hot first-frame labels on the patch grid (1, C, h, w), and the label map at full size."""
    labels = read_annotation(seg_path)
    th, tw = scaled_size(*labels.shape)
    small = np.asarray(Image.fromarray(labels).resize((tw // factor, th // factor), Image.NEAREST))
    return to_one_hot(torch.from_numpy(small.astype(np.int64)), int(labels.max()) + 1), labels


def to_one_hot(labels, n_dims):
    """(h, w) integer labels -> (1, n_dims, h, w) float one-hot."""
    return F.one_hot(labels, n_dims).permute(2, 0, 1).unsqueeze(0).float()


def davis_palette():
    """The 256-colour palette of DAVIS annotations (PASCAL VOC's): label bits spread over the top bits of R, G, B."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    for label in range(256):
        value = label
        for shift in range(7, -1, -1):
            for channel in range(3):
                palette[label, channel] |= ((value >> channel) & 1) << shift
            value >>= 3
    return palette


def imwrite_indexed(filename, array, color_palette):
    """Save a label map as an indexed PNG with the given palette."""
    img = Image.fromarray(np.asarray(array, dtype=np.uint8))
    img.putpalette(color_palette.ravel().tolist())
    img.save(filename, format='PNG')


# ============ DAVIS metrics (semi-supervised protocol of the DAVIS 2017 benchmark) ============

def db_eval_iou(annotation, segmentation):
    """Region similarity J: intersection over union of two binary masks (1 when both are empty)."""
    annotation, segmentation = annotation.astype(bool), segmentation.astype(bool)
    union = np.logical_or(annotation, segmentation).sum()
    if union == 0:
        return 1.0
    return float(np.logical_and(annotation, segmentation).sum() / union)


def seg2bmap(seg):
    """One-pixel-wide boundary of a binary mask, as DAVIS defines it: a pixel is on the boundary when it
    differs from its right, lower or lower-right neighbour (outside the image counts as background, except
    that the last row only looks right and the last column only looks down)."""
    seg = seg.astype(bool)
    right, down, diagonal = np.zeros_like(seg), np.zeros_like(seg), np.zeros_like(seg)
    right[:, :-1] = seg[:, 1:]
    down[:-1, :] = seg[1:, :]
    diagonal[:-1, :-1] = seg[1:, 1:]
    boundary = (seg ^ right) | (seg ^ down) | (seg ^ diagonal)
    boundary[-1, :] = seg[-1, :] ^ right[-1, :]
    boundary[:, -1] = seg[:, -1] ^ down[:, -1]
    boundary[-1, -1] = False
    return boundary


def f_measure(foreground_mask, gt_mask, bound_th=0.008):
    """Boundary F-measure: boundary pixels match within a disk of ceil(bound_th * image diagonal) pixels."""
    bound_pix = bound_th if bound_th >= 1 else int(np.ceil(bound_th * np.linalg.norm(foreground_mask.shape)))
    fg_boundary, gt_boundary = seg2bmap(foreground_mask), seg2bmap(gt_mask)
    kernel = disk(bound_pix).astype(np.uint8)
    fg_dilated = cv2.dilate(fg_boundary.astype(np.uint8), kernel).astype(bool)
    gt_dilated = cv2.dilate(gt_boundary.astype(np.uint8), kernel).astype(bool)
    n_fg, n_gt = fg_boundary.sum(), gt_boundary.sum()
    if n_fg == 0 or n_gt == 0:
        precision, recall = (1.0, 0.0) if n_gt > 0 else (0.0, 1.0) if n_fg > 0 else (1.0, 1.0)
    else:
        precision = (fg_boundary & gt_dilated).sum() / n_fg
        recall = (gt_boundary & fg_dilated).sum() / n_gt
    if precision + recall == 0:
        return 0.0
    return float(2 * precision * recall / (precision + recall))


def evaluate_video(gt_paths, predictions, n_objects):
    """Per object (labels 1..n_objects, those of the first frame), mean J and F over the given frames."""
    gts = [read_annotation(path) for path in gt_paths]
    objects = {}
    for obj in range(1, n_objects + 1):
        j_values, f_values = [], []
        for path, gt, pred in zip(gt_paths, gts, predictions):
            if gt.shape != pred.shape:
                utils.fail(f"annotation {path} is {gt.shape[1]}x{gt.shape[0]} but its frame is "
                           f"{pred.shape[1]}x{pred.shape[0]}; annotations must match the frames")
            j_values.append(db_eval_iou(gt == obj, pred == obj))
            f_values.append(f_measure(pred == obj, gt == obj))
        objects[str(obj)] = {'J-Mean': float(np.mean(j_values)), 'F-Mean': float(np.mean(f_values))}
    return summarize(objects.values()) | {'objects': objects}


def summarize(object_scores):
    """J, F and J&F means over objects (DAVIS averages objects, not videos)."""
    object_scores = list(object_scores)
    j_mean = float(np.mean([s['J-Mean'] for s in object_scores])) if object_scores else float('nan')
    f_mean = float(np.mean([s['F-Mean'] for s in object_scores])) if object_scores else float('nan')
    return {'J&F-Mean': (j_mean + f_mean) / 2, 'J-Mean': j_mean, 'F-Mean': f_mean}


def overall_scores(scores):
    all_objects = [obj for video in scores.values() for obj in video['objects'].values()]
    return summarize(all_objects) | {'videos': len(scores), 'objects': len(all_objects)}


def format_scores(s):
    return f"J&F-Mean {s['J&F-Mean']:.4f}  J-Mean {s['J-Mean']:.4f}  F-Mean {s['F-Mean']:.4f}"


def write_metrics(scores, path):
    """metrics.json with every video scored so far and the overall means (rewritten after each video)."""
    tmp_path = f"{path}.tmp"
    with open(tmp_path, 'w') as f:
        json.dump({'overall': overall_scores(scores), 'videos': scores}, f, indent=2)
    os.replace(tmp_path, path)


# ============ results folder: nothing of a run replaces earlier results until it completes ============

def start_staging(output_dir):
    """An empty output_dir/.incomplete/ (what an earlier stopped run left there is removed)."""
    staging = os.path.join(output_dir, STAGING)
    shutil.rmtree(staging, ignore_errors=True)
    os.makedirs(staging)
    return staging


def publish(staging, output_dir, names):
    """Move each video's folder and metrics.json from staging into output_dir, replacing the previous ones.

    A metrics.json of an earlier run is removed when this run scored no video: it would describe other masks.
    """
    for name in names:
        target = os.path.join(output_dir, name)
        if os.path.isdir(target):
            os.replace(target, os.path.join(staging, f'{name}.replaced'))
        os.replace(os.path.join(staging, name), target)
    metrics, target = os.path.join(staging, 'metrics.json'), os.path.join(output_dir, 'metrics.json')
    if os.path.isfile(metrics):
        os.replace(metrics, target)
    elif os.path.isfile(target):
        os.remove(target)
    shutil.rmtree(staging)


def check_args(args):
    utils.check_common_args(args)
    utils.check_vit_arch(args, 'the segmentation propagates ViT patch features')
    utils.check_at_least(args, 1, 'topk', 'bs')
    utils.check_at_least(args, 0, 'n_last_frames', 'size_mask_neighborhood')
    imagedata.check_not_synthetic(args.data_path, '--data_path', 'the DAVIS 2017 folder')
    utils.check_input_folder(args.data_path, '--data_path')
    utils.check_output_dir(args.output_dir)


def main(argv=None):
    args = utils.parse_checked_args(get_args_parser(), check_args, argv)
    with outputdir.only_writer(args, 'output_dir'):
        utils.run_reporting_failures(eval_davis, args)


if __name__ == '__main__':
    main()
