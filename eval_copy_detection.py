"""Copy detection with frozen DINO features on Copydays (Douze et al., 2009), with optional distractors."""
import argparse
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from torchvision import transforms

import evaluation
import imagedata
import utils

BLOCKS = (['original', 'strong'] + [f'jpegqual/{q}' for q in (3, 5, 8, 10, 15, 20, 30, 50, 75)]
          + [f'crops/{c}' for c in (10, 15, 20, 30, 40, 50, 60, 70, 80)])
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')
TOP_K = 20  # as the original, each query is scored on its 20 nearest database images
GEM_P = 4


def get_args_parser():
    parser = argparse.ArgumentParser('Copy detection on Copydays', add_help=False)
    parser.add_argument('--data_path', default='/path/to/copydays/', type=utils.path_arg,
                        help="Copydays folder: original/, strong/, jpegqual/<q>/, crops/<c>/.")
    parser.add_argument('--whitening_path', default='/path/to/whitening_data/', type=utils.path_arg,
                        help="""Folder of images to learn the PCA whitening on (the paper uses 20k random
        YFCC100M images); skipped when the folder does not exist.""")
    parser.add_argument('--distractors_path', default='/path/to/distractors/', type=utils.path_arg,
                        help="""Folder of distractor images added to the database (the paper uses 10k random
        YFCC100M images); none when the folder does not exist.""")
    parser.add_argument('--whitening_cov', default='uncentred', choices=['uncentred', 'centred'], help="""Fit the
        whitening PCA on the uncentred second moment F^T F / N of the whitening features (the original's
        computation, default) or on their covariance (centred); their mean is subtracted before projecting
        either way.""")
    parser.add_argument('--imsize', default=320, type=int, help='Image size (square image)')
    parser.add_argument('--batch_size_per_device', '--batch_size_per_gpu', dest='batch_size_per_device',
                        default=16, type=int, help='Images per device and batch.')
    utils.add_model_args(parser, arch='vit_base', patch_size=8)
    utils.add_extraction_args(parser)
    utils.add_distributed_args(parser)
    utils.add_device_args(parser)
    return parser


def eval_copy_detection(args):
    device = utils.start_run(args)

    # ============ checking the data ... ============
    copydays = CopydaysDataset(args.data_path)
    distractors = list_optional_images(args.distractors_path, '--distractors_path', minimum=1)
    whitening_set = list_optional_images(args.whitening_path, '--whitening_path', minimum=2)

    # ============ building network ... ============
    model, embed_dim = utils.build_backbone(args.arch, args.patch_size)
    utils.load_pretrained_weights(model, args.pretrained_weights, args.checkpoint_key, args.arch, args.patch_size)
    model.to(device).eval()
    if whitening_set is not None:
        warn_if_whitening_set_small(len(whitening_set), 2 * embed_dim, args.whitening_cov == 'centred')

    # ============ extracting features ... ============
    queries = extract(model, copydays.query_files(), device, args)
    print(f"Extraction of queries features done. Shape: {tuple(queries.shape)}")
    database = queries[:copydays.num_originals]  # the database is the first query block, the originals
    if distractors is not None:
        print(f"Using {len(distractors)} distractors...")
        database = torch.cat([database, extract(model, distractors, device, args, '--distractors_path')])
    print(f"Database (originals and distractors) shape: {tuple(database.shape)}")
    if whitening_set is not None:
        print(f"Extracting features on {len(whitening_set)} images from {args.whitening_path} "
              "for learning the whitening operator.")
        whitening_features = extract(model, whitening_set, device, args, '--whitening_path')

    # ============ whitening and search (main process) ... ============
    if utils.is_main_process():
        if whitening_set is not None:
            pca = learn_whitening(whitening_features, centred=args.whitening_cov == 'centred')
            queries, database = pca.apply(queries), pca.apply(database)
        queries = F.normalize(queries, dim=1, p=2)
        database = F.normalize(database, dim=1, p=2)
        copydays.evaluate(evaluation.nearest_neighbours(database, queries, TOP_K)[1].cpu().numpy())


def cls_gem_features(model, images):
    """Last-block [CLS] output concatenated with the GeM (p=4) pool of its patch outputs."""
    tokens = model.get_intermediate_layers(images, n=1)[0].float()
    gem = tokens[:, 1:].clamp(min=1e-6).pow(GEM_P).mean(dim=1).pow(1. / GEM_P)
    return torch.cat((tokens[:, 0], gem), dim=1)


def extract(model, paths, device, args, optional=None):
    """Features of the images at `paths`. Copydays' own are all needed (the ground truth counts them); the
    unreadable images of an `optional` set (the flag naming it) are left out with a count."""
    transform = transforms.Compose([
        transforms.Resize((args.imsize, args.imsize), interpolation=transforms.InterpolationMode.BICUBIC),
        transforms.ToTensor(),
        transforms.Normalize(utils.IMAGENET_MEAN, utils.IMAGENET_STD),
    ])
    dataset = ImageListDataset(paths, transform)
    options = dict(autocast=args.autocast, store_on_device=args.store_on_device, forward=cls_gem_features)
    if optional:
        return evaluation.extract_readable_features(model, dataset, args, device, optional, **options)[0]
    return evaluation.extract_features(model, evaluation.feature_loader(dataset, args), device, **options)


def warn_if_whitening_set_small(num_images, feature_dim, centred=False):
    """Fewer images than dimensions cannot whiten every dimension: say so before the long extraction."""
    if num_images <= feature_dim:
        print(f"warning: --whitening_path holds {num_images} images, not more than the {feature_dim} feature "
              f"dimensions; falling back to whitening only the PCA dimensions these images span (at most "
              f"{num_images - 1 if centred else num_images}), to which the features are reduced. Use more than "
              f"{feature_dim} images for a full whitening.", file=sys.stderr)


def learn_whitening(features, centred=False):
    """PCA whitening learned on the whitening-set features, whose mean it subtracts before projecting.

    As the original, the PCA is fitted on their uncentred second moment F^T F / N; `centred` fits
    their covariance instead. With more images than dimensions every dimension is kept (tiny
    eigenvalues floored, as the original). With fewer, only the directions the images span are kept:
    the others would hold arbitrary directions, blown up by the floored eigenvalue.
    """
    num_images, dim = features.shape
    features = features.double()
    mean = features.mean(dim=0)
    fitted = features - mean if centred else features
    moment = (fitted.T @ fitted / num_images).cpu().numpy()
    kept = dim
    if num_images <= dim:
        eigenvalues = np.linalg.eigvalsh(moment)
        kept = int((eigenvalues > eigenvalues.max() * 1e-5).sum())
        print(f"Whitening keeps the {kept} of {dim} dimensions spanned by the whitening images.")
    pca = evaluation.PCA(dim=kept, whit=0.5)
    pca.mean = mean.cpu().numpy()
    pca.train_pca(moment)
    return pca


class CopydaysDataset:
    """Copydays file lists and ground truth: every block present is queried against the originals.

    As in the original evaluation, query i of a block is a copy of original i (blocks list the
    same names), except in `strong`, whose copies share the 4-character name prefix of their original.
    Copydays is distributed in parts (e.g. copydays_original and copydays_strong alone): the blocks
    present are evaluated, given original/ (the database) and at least one other block.
    """

    def __init__(self, root):
        if not os.path.isdir(root):
            utils.fail(f"--data_path {root} is not a folder; pass the Copydays folder "
                       "(original/, strong/, jpegqual/<q>/, crops/<c>/)")
        self.blocks = [block for block in BLOCKS if os.path.isdir(os.path.join(root, block))]
        if 'original' not in self.blocks or len(self.blocks) < 2:
            utils.fail(f"--data_path {root} needs original/ and at least one block of copies (strong/, "
                       f"jpegqual/<q>/ or crops/<c>/); found {', '.join(self.blocks) or 'none of them'}")
        missing = [block for block in BLOCKS if block not in self.blocks]
        if missing:
            print(f"Copydays blocks not in {root}, not evaluated: {', '.join(missing)}")
        self.root = root
        self.files = {block: sorted(f for f in os.listdir(os.path.join(root, block)) if f.endswith('.jpg'))
                      for block in self.blocks}
        self.num_originals = len(self.files['original'])
        self.positives = {block: self._positives(block) for block in self.blocks}

    def _positives(self, block):
        originals, queries = self.files['original'], self.files[block]
        if not queries:
            utils.fail(f"Copydays block {os.path.join(self.root, block)} holds no .jpg images")
        if block == 'strong':
            positives = [[j for j, name in enumerate(originals) if name[:4] == query[:4]] for query in queries]
            lonely = [query for query, pos in zip(queries, positives) if not pos]
            if lonely:
                utils.fail(f"Copydays strong/{lonely[0]} has no original sharing its 4-character prefix in original/")
            return positives
        if len(queries) != len(originals):
            utils.fail(f"Copydays block {block} holds {len(queries)} images but original/ holds {len(originals)}; "
                       "each block must hold one copy of every original")
        return [[i] for i in range(len(queries))]

    def query_files(self):
        return [os.path.join(self.root, block, name) for block in self.blocks for name in self.files[block]]

    def evaluate(self, ids):
        """Print the mAP of each block from the database ids retrieved for each query; return them."""
        maps, start = {}, 0
        for block in self.blocks:
            rows = ids[start:start + len(self.files[block])]
            start += len(rows)
            aps = [evaluation.compute_ap(np.flatnonzero(np.isin(row, pos)), len(pos))
                   for row, pos in zip(rows, self.positives[block])]
            maps[block] = float(np.mean(aps))
            print(f"eval on {block} mAP={maps[block]:.3f}")
        if 'strong' in maps:
            print(f">> Copydays strong mAP={maps['strong']:.3f}")
        return maps


class ImageListDataset(torch.utils.data.Dataset):
    """Images read from a list of paths, as (image, index)."""

    def __init__(self, paths, transform=None):
        self.paths = paths
        self.transform = transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        img = imagedata.pil_loader(self.paths[index])
        return (self.transform(img) if self.transform is not None else img), index


def list_optional_images(folder, flag, minimum):
    """Image files directly inside `folder`, sorted; None when it is not a folder (the option is then unused)."""
    if not os.path.isdir(folder):
        print(f"{flag} {folder} is not a folder: not used.")
        return None
    images = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
    if len(images) < minimum:
        utils.fail(f"{flag} {folder} holds {len(images)} image(s) directly inside it, at least {minimum} needed; "
                   "add images (not in sub-folders) or pass '' to go without")
    return images


def check_args(args):
    utils.check_common_args(args)
    utils.check_vit_arch(args, 'copy detection pools ViT patch tokens')
    utils.check_at_least(args, 1, 'imsize')
    utils.check_image_size(args.imsize, args.patch_size, '--imsize')
    imagedata.check_not_synthetic(args.data_path, '--data_path', 'the Copydays folder')
    utils.check_input_folder(args.data_path, '--data_path')
    defaults = get_args_parser()
    for flag in ('whitening_path', 'distractors_path'):
        path = getattr(args, flag)
        if path and path != defaults.get_default(flag):  # only the default may be absent ('' for none)
            utils.check_input_folder(path, f'--{flag}')


def main(argv=None):
    parser = argparse.ArgumentParser('Copy detection on Copydays', parents=[get_args_parser()])
    args = utils.parse_checked_args(parser, check_args, argv)
    utils.run_reporting_failures(eval_copy_detection, args, "restore or replace the file and run again")


if __name__ == '__main__':
    main()
