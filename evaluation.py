"""What the evaluations of frozen features share: evaluation splits and transforms, feature extraction,
nearest neighbours, the retrieval metrics and PCA whitening, the frozen ViT and its attention maps. Used by
eval_knn, eval_linear, eval_copy_detection, eval_image_retrieval, eval_video_segmentation and the attention
scripts."""
import contextlib
import json
import os
import time

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import imagedata
import utils


# Synthetic images are rendered and evaluated at this side (the tests train on 64-pixel crops of
# them); real data keeps the original resize 256 / centre crop 224.
SYNTHETIC_EVAL_SIZE = 64
# Fashion-MNIST's 28-pixel images are evaluated whole, at the 32-pixel global crops of the README's recipe
FASHION_MNIST_EVAL_SIZE = 32


def eval_crop_size(data_path):
    """Side of the evaluation crops: 224, or a built-in source's (SYNTHETIC_EVAL_SIZE, FASHION_MNIST_EVAL_SIZE)."""
    if imagedata.is_synthetic(data_path):
        return SYNTHETIC_EVAL_SIZE
    return FASHION_MNIST_EVAL_SIZE if imagedata.is_fashion_mnist(data_path) else 224


def add_eval_size_args(parser):
    """--resize and --crop_size: the size the evaluations see their images at (the original's 256 and 224)."""
    parser.add_argument('--resize', default=None, type=int, help="""Side in pixels the short side of every image
        is resized to (bicubic) before the centre crop; default crop_size * 256 / 224 (256 for 224, the original's;
        for fashion-mnist, crop_size: the whole image).""")
    parser.add_argument('--crop_size', default=None, type=int, help="""Side in pixels of the square centre crop the
        network sees: 224 by default, as in the original (64 with --data_path synthetic, 32 with fashion-mnist). For
        small images, use the training resolution, e.g. --resize 64 --crop_size 64 for a model trained with
        --global_crops_size 64.""")
    return parser


def check_eval_sizes(args):
    """Fill in the default --crop_size and --resize and check them: a crop must hold one ViT patch and fit in the
    resized image."""
    crop_given = args.crop_size is not None
    if not crop_given:
        args.crop_size = eval_crop_size(args.data_path)
    if args.resize is None:  # Fashion-MNIST's clothes fill the frame: no border is cut off
        args.resize = args.crop_size if imagedata.is_fashion_mnist(args.data_path) else default_resize(args.crop_size)
    utils.check_at_least(args, 1, 'crop_size', 'resize')
    utils.check_crop_size(args.crop_size, args, '--crop_size')
    if args.resize < args.crop_size:
        utils.fail(f"--resize {args.resize} is smaller than --crop_size {args.crop_size}: the centre crop would be "
                   f"padded with black; pass --resize {args.crop_size} or more")
    if not crop_given:
        suggest_training_crop_size(args)


def suggest_training_crop_size(args):
    """One line naming the global crop size of a training checkpoint evaluated at another size."""
    trained = (utils.saved_training_args(args.pretrained_weights) or {}).get('global_crops_size')
    if trained and trained != args.crop_size:
        print(f"Evaluating at --resize {args.resize} --crop_size {args.crop_size}; {args.pretrained_weights} was "
              f"trained on {trained}-pixel global crops: pass --crop_size {trained} to evaluate at that size")


def default_resize(crop_size):
    """The short side resized to before a centre crop of crop_size: the original's 256 for 224, same ratio."""
    return crop_size * 256 // 224


def center_crop_transform(crop_size=224, resize=None):
    """Bicubic resize of the short side to `resize` (default crop_size * 256 / 224), centre crop, ImageNet
    normalisation."""
    from torchvision import transforms
    return transforms.Compose([
        transforms.Resize(resize or default_resize(crop_size), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.CenterCrop(crop_size),
        transforms.ToTensor(),
        transforms.Normalize(utils.IMAGENET_MEAN, utils.IMAGENET_STD),
    ])


def build_eval_split(data_path, split, transform=None, flag='--data_path'):
    """The `split` ('train' or 'val') ImageFolder under data_path, or that split of a built-in source (the
    synthetic shapes; Fashion-MNIST, whose 'val' is its 10,000 held-out images). `flag`: the option that named it."""
    if imagedata.is_builtin(data_path):
        return imagedata.builtin_split(data_path, split, SYNTHETIC_EVAL_SIZE, transform)[0]
    root = os.path.join(data_path, split)
    parent = os.path.dirname(os.path.normpath(data_path))
    if not os.path.isdir(root) and os.path.isdir(os.path.join(parent, split)):
        utils.fail(f"{flag} {data_path} has no {split}/ folder, its parent has: pass {flag} {parent}")
    if not os.path.isdir(root):
        utils.fail(f"{flag} {data_path} has no {split}/ folder; it must hold train/ and val/ ImageFolders "
                   "(one sub-folder of images per class), or be 'synthetic' or 'fashion-mnist'")
    return imagedata.build_image_folder(root, transform, flag)


def dataset_classes(dataset):
    """Class names of an ImageFolder or SyntheticShapes, also through Subset wrappers."""
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    return list(dataset.classes)


def dataset_labels(dataset):
    """Labels of an ImageFolder or a built-in source, also through Subset wrappers."""
    if isinstance(dataset, torch.utils.data.Subset):
        labels = dataset_labels(dataset.dataset)
        return [labels[i] for i in dataset.indices]
    return list(dataset.targets)


def check_matching_classes(dataset_train, dataset_val, data_path, flag='--data_path'):
    """Labels are folder indices, so train/ and val/ must hold the same class folders."""
    train_classes, val_classes = dataset_classes(dataset_train), dataset_classes(dataset_val)
    if len(train_classes) < 2:
        utils.fail(f"{flag} {data_path}: train/ holds a single class ({', '.join(train_classes)}): every "
                   "prediction would be right, 100% whatever the features; an evaluation needs two classes or more")
    if train_classes != val_classes:
        odd = sorted(set(train_classes) ^ set(val_classes))[:3]
        utils.fail(f"{flag} {data_path}: train/ and val/ do not hold the same class folders "
                   f"({len(train_classes)} vs {len(val_classes)}, e.g. {', '.join(odd)}); make them match")


def feature_loader(dataset, args, batch_size=None):
    """Loader for extract_features: dataset order (no shuffling), each process reading its share under
    torchrun. `batch_size` defaults to --batch_size_per_device."""
    distributed = utils.is_dist_avail_and_initialized()
    sampler = torch.utils.data.DistributedSampler(dataset, shuffle=False) if distributed else None
    return torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=batch_size or args.batch_size_per_device,
                                       num_workers=args.num_workers, pin_memory=utils.run_device().pin_memory,
                                       drop_last=False)


def multi_scale(samples, model, scales=(1, 1 / 2 ** 0.5, 1 / 2)):
    """Features averaged over rescaled copies of the input, then L2-normalised."""
    total = None
    for scale in scales:
        inp = samples if scale == 1 else F.interpolate(samples, scale_factor=scale, mode='bilinear',
                                                       align_corners=False)
        feats = model(inp).clone()
        total = feats if total is None else total + feats
    total = total / len(scales)
    return F.normalize(total, dim=-1)


def extract_readable_features(model, dataset, args, device, what, batch_size=None, **kwargs):
    """(features, indices) of the images of `dataset` that can be read, in dataset order, on every process
    (extract_features's `kwargs`). An unreadable image is left out, with a warning naming it and one line with the
    count (`what`: which images, e.g. 'train/'), as training skips them."""
    skipped = imagedata.SkippedImages(fate=imagedata.SkippedImages.EVALUATION)
    dataset = imagedata.SkippingUnreadable(imagedata.ReturnIndexDataset(dataset))
    features = extract_features(model, feature_loader(dataset, args, batch_size), device, skipped=skipped, **kwargs)
    skipped.merge(len(dataset), device)
    readable = skipped.readable(len(dataset))
    count = skipped.end_epoch()
    if count:
        utils.warn(f"{count} unreadable image(s) of {what} skipped, left out of the evaluation: its figures are those "
                   f"of the other {len(readable)}")
    return features[readable.to(features.device)], readable


@torch.no_grad()
def extract_features(model, data_loader, device, multiscale=False, autocast=False, store_on_device=False,
                     forward=None, summary_writer=None, this_process_only=False, skipped=None):
    """Features of every sample of `data_loader.dataset`, in dataset order, on every process.

    The loader must yield (images, indices) (see ReturnIndexDataset) and may use a
    DistributedSampler: samples it repeats to even out processes are written once.
    A loader of imagedata.SkippingUnreadable items also yields the skipped indices and notes, which
    `skipped` (imagedata.SkippedImages) records; the rows of those images are left zero.
    `forward(model, images)` overrides the plain `model(images)` call. With a
    summary_writer, the throughput is also written as TensorBoard scalars.
    `this_process_only`: the loader reads the whole dataset in this process, which neither
    talks to the others nor prints progress (the training's k-NN monitor).
    """
    global_batch = (data_loader.batch_size or 1) * utils.get_world_size()
    metric_logger = utils.MetricLogger(delimiter="  ", batch_size=global_batch, summary_writer=summary_writer)
    features = None
    forward = forward or (lambda m, x: multi_scale(x, m) if multiscale else m(x))
    epoch = 0 if summary_writer is not None else None
    batches = data_loader if this_process_only else metric_logger.log_every(data_loader, 10, 'Extracting features',
                                                                            epoch)
    for samples, index, *unreadable in batches:
        if unreadable:
            skipped.note(*unreadable)
        samples = samples.to(device, non_blocking=True)
        index = index.to(device, non_blocking=True)
        with utils.autocast_context(device.type, autocast):
            feats = forward(model, samples)
        feats = feats.float()
        utils.mark_step()
        if features is None:
            storage = device if store_on_device else 'cpu'
            features = torch.zeros(len(data_loader.dataset), feats.shape[-1], device=storage)
            if not this_process_only:
                print(f"Storing features into tensor of shape {tuple(features.shape)}")
        if not this_process_only:
            feats, index = utils.all_gather(feats), utils.all_gather(index)
        features.index_copy_(0, index.to(features.device), feats.to(features.device))
    return features


# =====================================================================================
# Retrieval metrics and PCA whitening (eval_image_retrieval: revisited Oxford/Paris; eval_copy_detection)
# =====================================================================================

def nearest_neighbours(database, queries, k):
    """(similarities, indices) of the k most similar database rows of each query (dot product), nearest first.

    Rows whose k-th similarity is shared with rows left out (then the (k+1)-th equals the k-th)
    are redone exactly, so that equal similarities always go to the lower database index,
    whatever the device's top-k does.
    """
    similarity = queries @ database.t()
    values, indices = similarity.topk(min(k + 1, similarity.shape[1]), dim=1)
    tied_rows = (values[:, k] == values[:, k - 1]) if values.shape[1] > k else torch.zeros(0, dtype=torch.bool)
    values, indices = values[:, :k], indices[:, :k]
    kth = values[:, -1:]
    for row in tied_rows.nonzero().flatten().tolist():
        above = (similarity[row] > kth[row]).nonzero().flatten()
        level = (similarity[row] == kth[row]).nonzero().flatten()[:k - len(above)]
        indices[row] = torch.cat((above, level))
        values[row] = similarity[row, indices[row]]
    # order: decreasing similarity, then increasing index
    indices, order = indices.sort(dim=1)
    values, order = values.gather(1, order).sort(dim=1, descending=True, stable=True)
    return values, indices.gather(1, order)


def rank_classes(similarities, labels, T, num_classes):
    """Classes of each row ranked by their summed neighbour weights exp(similarity / T)."""
    weights = (similarities / T).exp()
    one_hot = torch.zeros(*labels.shape, num_classes, dtype=weights.dtype, device=weights.device)
    one_hot.scatter_(2, labels.unsqueeze(-1), weights.unsqueeze(-1))
    votes = one_hot.sum(1)
    return votes.sort(dim=1, descending=True, stable=True).indices


def compute_ap(ranks, nres):
    """Average precision of one query: trapezoidal area under its precision-recall curve.

    `ranks`: sorted 0-based positions of the positives that were retrieved; `nres`: number of
    positives in the database (retrieved or not), so a positive missing from `ranks` lowers the AP.
    This is the AP of the revisited Oxford/Paris and INRIA Holidays evaluation packages.
    """
    ranks = np.asarray(ranks, dtype=np.float64)
    found_before = np.arange(len(ranks))
    precision_left = np.where(ranks == 0, 1., found_before / np.maximum(ranks, 1.))
    precision_right = (found_before + 1) / (ranks + 1)
    return float(np.sum(precision_left + precision_right) / (2. * nres))


def compute_map(ranks, gnd, kappas=()):
    """Mean average precision and mean precision at `kappas`, as the revisited Oxford/Paris authors define them.

    `ranks`: (database size x number of queries) array, column i the database indices in the order
    retrieved for query i. `gnd[i]['ok']` lists the positives of query i, `gnd[i]['junk']` images
    that are dropped from its ranking before scoring. Following the authors' code, precision at k
    is measured at min(k, position of the last positive retrieved). Queries without positives get
    NaN in `aps`/`prs` and are left out of the means. Returns (map, aps, pr, prs).
    """
    ranks = np.asarray(ranks)
    aps = np.full(len(gnd), np.nan)
    prs = np.full((len(gnd), len(kappas)), np.nan)
    for i, query_gnd in enumerate(gnd):
        positives = np.asarray(query_gnd['ok'])
        if positives.size == 0:
            continue
        positions = np.flatnonzero(np.isin(ranks[:, i], positives))
        junk = np.flatnonzero(np.isin(ranks[:, i], np.asarray(query_gnd.get('junk', []))))
        positions = positions - np.searchsorted(junk, positions)  # junk ranked earlier does not count
        aps[i] = compute_ap(positions, len(positives))
        prs[i] = _precision_at(positions + 1, kappas)
    scored = ~np.isnan(aps)
    if not scored.any():
        return float('nan'), aps, np.full(len(kappas), np.nan), prs
    return float(aps[scored].mean()), aps, prs[scored].mean(axis=0), prs


def _precision_at(positions, kappas):
    """Precision at each k of 1-based positive positions, cut at the last positive as the authors do."""
    if positions.size == 0:
        return np.zeros(len(kappas))
    cuts = np.minimum(positions.max(), np.asarray(kappas))
    return np.array([(positions <= cut).sum() / cut for cut in cuts])


class PCA:
    """PCA (whitening) learned from a covariance matrix; keeps the `dim` leading components.

    Components are scaled by eigenvalue ** -whit: whit=0.5 whitens fully, whit=0 only rotates.
    Eigenvalues below 1e-5 of the largest are raised to that floor, as in the original. `mean`,
    when set, is subtracted before projecting.
    """

    def __init__(self, dim=256, whit=0.5):
        self.dim = dim
        self.whit = whit
        self.mean = None

    def train_pca(self, cov):
        eigenvalues, eigenvectors = np.linalg.eigh(cov)
        eigenvalues = np.maximum(eigenvalues, eigenvalues.max() * 1e-5)
        order = np.argsort(eigenvalues)[::-1][:self.dim]
        print(f"keeping {eigenvalues[order].sum() / eigenvalues.sum() * 100:.2f} % of the energy")
        self.dvt = (eigenvectors[:, order] / eigenvalues[order] ** self.whit).T

    def apply(self, x):
        """Project rows of a numpy array or a torch tensor (any device), returning the same kind."""
        if isinstance(x, np.ndarray):
            mean = 0 if self.mean is None else np.asarray(self.mean)
            return (x - mean) @ self.dvt.T.astype(x.dtype)
        dvt = torch.as_tensor(self.dvt, dtype=x.dtype, device=x.device)
        if self.mean is not None:
            x = x - torch.as_tensor(self.mean, dtype=x.dtype, device=x.device)
        return x @ dvt.T


# =====================================================================================
# Frozen ViT (attention scripts, eval_video_segmentation) and attention maps (visualize_attention, video_generation)
# =====================================================================================

def load_frozen_vit(args, device, attention_weights=False):
    """The ViT of --arch/--patch_size with --pretrained_weights (--checkpoint_key), frozen, in eval mode.

    `attention_weights`: without --pretrained_weights, download the released weights the original's attention
    scripts show (ATTENTION_WEIGHTS) rather than those its evaluations use.
    """
    model, _ = utils.build_backbone(args.arch, args.patch_size)
    print(f"Model {args.arch} {args.patch_size}x{args.patch_size} built.")
    utils.load_pretrained_weights(model, args.pretrained_weights, args.checkpoint_key, args.arch, args.patch_size,
                                  released=utils.ATTENTION_WEIGHTS if attention_weights else None)
    for param in model.parameters():
        param.requires_grad = False
    return model.eval().to(device)


def attention_transform(size=None):
    """PIL image -> ImageNet-normalised (3, H, W) tensor, as torchvision's Resize, ToTensor and Normalize.

    `size`: None keeps the image, one int sets the short side (aspect kept), (h, w) the exact size; bilinear.
    (Written with PIL and numpy: importing torchvision costs these small scripts seconds.)
    """
    mean, std = np.asarray(utils.IMAGENET_MEAN, dtype=np.float32), np.asarray(utils.IMAGENET_STD, dtype=np.float32)

    def transform(img):
        if size is not None:
            img = img.resize(resized_shape(img.size, size), Image.BILINEAR)
        pixels = (np.asarray(img.convert('RGB'), dtype=np.float32) / 255. - mean) / std
        return torch.from_numpy(pixels.transpose(2, 0, 1).copy())
    return transform


def resized_shape(image_size, size):
    """(width, height) after a torchvision-style Resize(size) of an image of (width, height) image_size."""
    width, height = image_size
    if not isinstance(size, int):
        return size[1], size[0]
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def crop_to_patch_multiple(images, patch_size):
    """Drop the bottom rows and right columns that do not fill a whole patch."""
    height, width = images.shape[-2:]
    return images[..., :height - height % patch_size, :width - width % patch_size]


def attention_mass_masks(maps, threshold):
    """Per map, the highest-attention patches that together hold `threshold` of its mass (boolean, same shape).

    As in the original: sort ascending and keep the patches where the cumulative share exceeds 1 - threshold.
    """
    flat = maps.flatten(-2)
    values, order = torch.sort(flat, dim=-1)
    share = torch.cumsum(values / values.sum(dim=-1, keepdim=True), dim=-1)
    keep = torch.zeros_like(flat, dtype=torch.bool).scatter(-1, order, share > 1 - threshold)
    return keep.reshape(maps.shape)


def upsample_patches(maps, patch_size):
    """Patch-grid maps (..., h, w) -> pixel maps (..., h * patch_size, w * patch_size), nearest neighbour."""
    return maps.repeat_interleave(patch_size, dim=-2).repeat_interleave(patch_size, dim=-1)


def colorize(values, colormap='viridis'):
    """A 2-D map min-max scaled and coloured (RGB uint8), as matplotlib's imsave does."""
    values = np.asarray(values, dtype=np.float32)
    span = values.max() - values.min()
    scaled = (values - values.min()) / span if span > 0 else np.zeros_like(values)
    gray = np.clip(scaled * 256, 0, 255).astype(np.uint8)
    code = {'viridis': cv2.COLORMAP_VIRIDIS, 'inferno': cv2.COLORMAP_INFERNO}[colormap]
    return cv2.cvtColor(cv2.applyColorMap(gray, code), cv2.COLOR_BGR2RGB)


def draw_mask(image, mask, color=(255, 0, 0), alpha=0.5, fill=True):
    """Copy of an RGB uint8 image with `mask` blended in `color` (when fill) and its outline drawn."""
    out = image.copy()
    if fill:
        out[mask] = (out[mask] * (1 - alpha) + np.asarray(color) * alpha).astype(np.uint8)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(out, contours, -1, color, 1)
    return out


# =====================================================================================
# k-NN monitor of a training run (main_dino --knn_every)
# =====================================================================================

def eval_resize(data_path, crop_size):
    """The side resized to before the centre crop: the whole image for Fashion-MNIST (its clothes fill the frame),
    else the original's ratio (default_resize)."""
    return crop_size if imagedata.is_fashion_mnist(data_path) else default_resize(crop_size)


class KnnMonitor:
    """The teacher's weighted 20-NN top-1 during training: before the first step (the random initialisation,
    the baseline) and every --knn_every epochs, at the training resolution (--global_crops_size), on at most
    --knn_limit images of each split of --knn_data.

    The main process computes it alone, in its own order, so that any number of processes logs the figure of one.
    Once the run has done WARN_AFTER of its epochs without beating its baseline, one warning says what to try.
    """
    K, T = 20, 0.07  # eval_knn.py's 20-NN and temperature
    WARN_AFTER = 0.75  # the README's Fashion-MNIST recipe dips below its baseline and crosses it at 2/3 of its run
    CACHE_BYTES = 2 ** 28

    def __init__(self, args, device, steps):
        self.args, self.device, self.steps = args, device, steps  # steps: the run's number of iterations
        transform = center_crop_transform(args.global_crops_size, eval_resize(args.knn_data, args.global_crops_size))
        self.splits = [build_eval_split(args.knn_data, split, transform, '--knn_data') for split in ('train', 'val')]
        check_matching_classes(*self.splits, args.knn_data, '--knn_data')
        self.num_classes = len(dataset_classes(self.splits[0]))
        self.splits = [imagedata.limit_dataset(ds, min(args.knn_limit, len(ds))) for ds in self.splits]
        self.labels = [torch.tensor(dataset_labels(ds)) for ds in self.splits]
        pixels = sum(len(ds) for ds in self.splits) * 3 * args.global_crops_size ** 2
        self.cached = pixels * 4 <= self.CACHE_BYTES
        # unreadable images are left out, each named once
        self.skipped = [imagedata.SkippedImages(fate="left out of the k-NN monitor") for _ in self.splits]
        if self.cached:  # small images: decoded and transformed once, not at every measurement
            self.splits, self.labels = zip(*(self._decoded(ds, skipped) for ds, skipped in zip(self.splits,
                                                                                                 self.skipped)))
        self.baseline = logged_baseline(args.output_dir)
        self.warned = False
        self.clock = None  # (time, epochs trained) at the end of the last measurement
        print(f"k-NN monitor of the teacher's {self.K}-NN top-1 on {len(self.splits[0])} train and "
              f"{len(self.splits[1])} val images of {args.knn_data} at {args.global_crops_size} pixels, every "
              f"{args.knn_every} epoch(s)")

    def due(self, epochs_trained):
        return epochs_trained == 0 or epochs_trained % self.args.knn_every == 0 or epochs_trained == self.args.epochs

    def __call__(self, teacher_backbone, epochs_trained, summary_writer=None):
        """Measure (when due) and log the teacher's k-NN top-1 after `epochs_trained` epochs (0: the baseline)."""
        if not self.due(epochs_trained):
            return
        if utils.is_main_process():
            started = time.time()
            top1 = self.measure(teacher_backbone)
            self.log(top1, epochs_trained, time.time() - started, summary_writer)
            self.clock = (time.time(), epochs_trained)
        utils.barrier()

    @torch.no_grad()
    def measure(self, backbone):
        was_training = backbone.training
        backbone.eval()
        (train, train_labels), (val, val_labels) = (self._features(backbone, *split) for split in
                                                    zip(self.splits, self.labels, self.skipped))
        backbone.train(was_training)
        similarities, indices = nearest_neighbours(train, val, self.K)
        ranked = rank_classes(similarities, train_labels[indices], self.T, self.num_classes)
        return 100. * (ranked[:, 0] == val_labels).double().mean().item()

    def _features(self, backbone, dataset, labels, skipped):
        """L2-normalised features and labels of the readable images of `dataset`."""
        loader = torch.utils.data.DataLoader(imagedata.SkippingUnreadable(imagedata.ReturnIndexDataset(dataset)),
                                             batch_size=128,
                                             num_workers=0 if self.cached else min(self.args.num_workers, 2))
        features = extract_features(backbone, loader, self.device, this_process_only=True, skipped=skipped)
        readable = skipped.readable(len(dataset))
        skipped.end_epoch()
        return F.normalize(features[readable.to(features.device)], dim=1), labels[readable]

    @staticmethod
    def _decoded(dataset, skipped):
        """A TensorDataset of the readable images of `dataset`, decoded and transformed, and their labels."""
        dataset = imagedata.SkippingUnreadable(dataset)
        items = [dataset[index] for index in range(len(dataset))]
        skipped.note(torch.tensor([item[2] for item in items]), [item[3] for item in items])
        readable = [item for item in items if item[2] < 0]
        labels = torch.tensor([item[1] for item in readable])
        skipped.end_epoch()
        return torch.utils.data.TensorDataset(torch.stack([item[0] for item in readable]), labels), labels

    def log(self, top1, epochs_trained, seconds, summary_writer):
        args = self.args
        cost = f"{seconds:.1f} s"
        if self.clock is not None and epochs_trained > self.clock[1]:
            epoch_seconds = (time.time() - seconds - self.clock[0]) / (epochs_trained - self.clock[1])
            cost += f", {100 * seconds / epoch_seconds:.0f}% of an epoch"
        if epochs_trained == 0:
            self.baseline = top1
            print(f"k-NN monitor: {self.K}-NN top-1 {top1:.1f}% at the random initialisation (the baseline) ({cost})")
        else:
            versus = '' if self.baseline is None else \
                f" (random initialisation {self.baseline:.1f}%, {top1 - self.baseline:+.1f})"
            print(f"k-NN monitor: {self.K}-NN top-1 {top1:.1f}% after {epochs_trained}/{args.epochs} epochs{versus} "
                  f"({cost})")
        with open(os.path.join(args.output_dir, 'log.txt'), 'a') as f:
            f.write(json.dumps({'knn_top1': top1, 'knn_epochs_trained': epochs_trained}) + '\n')
        if summary_writer is not None:
            summary_writer.add_scalar(f'knn/{self.K}nn_top1', top1, epochs_trained)
        self.warn_if_not_learning(top1, epochs_trained)

    def warn_if_not_learning(self, top1, epochs_trained):
        args = self.args
        if self.baseline is None or self.warned or epochs_trained < self.WARN_AFTER * args.epochs \
                or top1 > self.baseline:
            return
        self.warned = True
        print(f"Warning: after {epochs_trained} of {args.epochs} epochs the teacher's k-NN top-1 ({top1:.1f}%) is "
              f"not above its random initialisation's ({self.baseline:.1f}%): it is not learning. "
              f"Try {not_learning_advice(args, self.steps)}. See README, 'My loss does not decrease'.")


def logged_baseline(output_dir):
    """The k-NN monitor's baseline logged in output_dir/log.txt by the run being resumed, or None."""
    baseline = None
    with contextlib.suppress(OSError), open(os.path.join(output_dir, 'log.txt')) as f:
        for line in f:
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict) and entry.get('knn_epochs_trained') == 0:
                    baseline = entry['knn_top1']
    return baseline


def not_learning_advice(args, steps):
    """Flag values, computed from the run's, for a run of `steps` iterations whose teacher does not beat its random
    initialisation (README, 'My loss does not decrease', says why each matters on small data)."""
    tries = []
    momentum = max(0.9, round(1 - HORIZONS_PER_RUN / steps, 3))  # the teacher must follow the student's progress
    if 1 / (1 - args.momentum_teacher) > 2 * steps / HORIZONS_PER_RUN:  # not for a horizon already near a tenth
        tries.append(f"--momentum_teacher {momentum:g} (the teacher's horizon of {1 / (1 - args.momentum_teacher):.0f} "
                     f"steps is long against this run's {steps})")
    warmup = max(1, args.epochs // 10)
    if args.warmup_epochs > warmup:
        tries.append(f"--warmup_epochs {warmup}")
    if args.out_dim > SMALL_RUN_OUT_DIM:
        tries.append(f"--out_dim {SMALL_RUN_OUT_DIM}")
    tries.append(f"more iterations (--epochs {2 * args.epochs}, or more images)")
    return ', '.join(tries)


# README, 'Why the paper's ImageNet defaults do not carry over to 2,000 images'
HORIZONS_PER_RUN = 10  # the teacher's EMA horizon 1 / (1 - momentum): at most a tenth of the run
SMALL_RUN_OUT_DIM = 4096
