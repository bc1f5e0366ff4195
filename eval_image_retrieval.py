"""Landmark retrieval with frozen DINO features on revisited Oxford and Paris (Radenovic et al., 2018)."""
import argparse
import os
import pickle

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile
from torchvision import transforms

import evaluation
import imagedata
import utils

ImageFile.LOAD_TRUNCATED_IMAGES = True  # as the original: read truncated JPEGs rather than stop
DATASETS = ['roxford5k', 'rparis6k']
KAPPAS = [1, 5, 10]


def get_args_parser():
    parser = argparse.ArgumentParser('Image Retrieval on revisited Paris and Oxford', add_help=False)
    parser.add_argument('--data_path', default='/path/to/revisited_paris_oxford/', type=utils.path_arg,
                        help="Folder holding <dataset>/jpg/*.jpg and <dataset>/gnd_<dataset>.pkl.")
    parser.add_argument('--dataset', default='roxford5k', type=str, choices=DATASETS)
    parser.add_argument('--multiscale', default=False, type=utils.bool_flag,
                        help="Average the features of scales 1, 1/sqrt(2) and 1/2.")
    parser.add_argument('--imsize', default=224, type=int,
                        help="Images are shrunk so that their longer side is at most this many pixels.")
    parser.add_argument('--crop_queries', default=False, type=utils.bool_flag, help="""Crop each query image to
        its ground-truth bounding box before shrinking it (the revisited Oxford/Paris protocol); default false:
        whole query images, as the original DINO script (the DINO paper's retrieval figures).""")
    utils.add_model_args(parser, arch='vit_small', patch_size=16)
    utils.add_extraction_args(parser)
    utils.add_distributed_args(parser)
    utils.add_device_args(parser)
    return parser


def eval_retrieval(args):
    device = utils.start_run(args)

    # ============ preparing data ... ============
    cfg = load_ground_truth(args.data_path, args.dataset)
    transform = transforms.Compose([
        transforms.ToTensor(),
        transforms.Normalize(utils.IMAGENET_MEAN, utils.IMAGENET_STD),
    ])
    dataset_db = OxfordParisDataset(cfg, split='database', transform=transform, imsize=args.imsize)
    dataset_query = OxfordParisDataset(cfg, split='query', transform=transform, imsize=args.imsize,
                                       crop=args.crop_queries)
    print(f"train: {len(dataset_db)} imgs / query: {len(dataset_query)} imgs")

    # ============ building network ... ============
    model, _ = utils.build_backbone(args.arch, args.patch_size)
    load_weights(model, args)
    model.to(device).eval()

    # ============ extracting features ... ============
    db_features = extract(model, dataset_db, device, args)
    query_features = extract(model, dataset_query, device, args)

    # ============ ranking and scoring (main process) ... ============
    if utils.is_main_process():
        db_features = F.normalize(db_features, dim=1, p=2)
        query_features = F.normalize(query_features, dim=1, p=2)
        similarity = db_features @ query_features.T
        ranks = torch.argsort(-similarity.cpu(), dim=0, stable=True).numpy()
        report(ranks, cfg['gnd'], args.dataset)


def report(ranks, gnd, dataset):
    """Print mAP and mP@k for the Medium and Hard protocols of the revisited datasets."""
    medium = [{'ok': np.concatenate([g['easy'], g['hard']]), 'junk': np.asarray(g['junk'])} for g in gnd]
    hard = [{'ok': np.asarray(g['hard']), 'junk': np.concatenate([g['junk'], g['easy']])} for g in gnd]
    map_m, _, mpr_m, _ = evaluation.compute_map(ranks, medium, KAPPAS)
    map_h, _, mpr_h, _ = evaluation.compute_map(ranks, hard, KAPPAS)
    print(f">> {dataset}: mAP M: {np.around(map_m * 100, decimals=2)}, H: {np.around(map_h * 100, decimals=2)}")
    print(f">> {dataset}: mP@k{np.array(KAPPAS)} M: {np.around(mpr_m * 100, decimals=2)}, "
          f"H: {np.around(mpr_h * 100, decimals=2)}")


def extract(model, dataset, device, args):
    """Features in dataset order; images differ in size, so one image per batch."""
    return evaluation.extract_features(model, evaluation.feature_loader(dataset, args, batch_size=1), device,
                                       multiscale=args.multiscale, autocast=args.autocast,
                                       store_on_device=args.store_on_device)


def load_weights(model, args):
    """Weights given by the user; else, as the original, DINO's Google Landmarks v2 weights for vit_small/16."""
    if args.pretrained_weights or (args.arch, args.patch_size) != ('vit_small', 16):
        utils.load_pretrained_weights(model, args.pretrained_weights, args.checkpoint_key, args.arch,
                                      args.patch_size)
        return
    print("No --pretrained_weights given: loading DINO vit_small/16 weights trained on Google Landmarks v2.")
    state_dict = utils.download_state_dict_or_exit(utils.RELEASED_WEIGHTS_URL + utils.GLDV2_WEIGHTS,
                                                   "could not download {url}: {reason}; "
                                                   "when offline, pass a local checkpoint with --pretrained_weights")
    print(f"Google Landmarks v2 weights loaded with msg: {model.load_state_dict(state_dict)}")


class OxfordParisDataset(torch.utils.data.Dataset):
    """Database or query images of a revisited dataset, as (image, index).

    With `crop`, queries are cropped to their bounding box; every image is then shrunk (aspect kept)
    so its longer side is at most `imsize`.
    """

    def __init__(self, cfg, split, transform=None, imsize=None, crop=False):
        self.dir_images = cfg['dir_images']
        self.samples = cfg['qimlist'] if split == 'query' else cfg['imlist']
        self.boxes = [g['bbx'] for g in cfg['gnd']] if split == 'query' and crop else None
        self.transform = transform
        self.imsize = imsize

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        img = imagedata.pil_loader(os.path.join(self.dir_images, self.samples[index] + '.jpg'))
        if self.boxes is not None:
            img = img.crop(tuple(float(c) for c in self.boxes[index]))
        if self.imsize is not None:
            img.thumbnail((self.imsize, self.imsize), Image.Resampling.LANCZOS)
        if self.transform is not None:
            img = self.transform(img)
        return img, index


class _GroundTruthUnpickler(pickle.Unpickler):
    """Unpickles lists, dicts, strings, numbers and numpy arrays only: a ground-truth file runs no code."""
    ALLOWED = {('numpy', 'ndarray'), ('numpy', 'dtype'), ('numpy.core.multiarray', '_reconstruct'),
               ('numpy._core.multiarray', '_reconstruct'), ('numpy.core.multiarray', 'scalar'),
               ('numpy._core.multiarray', 'scalar')}

    def find_class(self, module, name):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"unexpected object {module}.{name}")
        return super().find_class(module, name)


def load_ground_truth(data_path, dataset):
    """The dataset's gnd_<dataset>.pkl, checked, with the image folder added as cfg['dir_images']."""
    gnd_path = os.path.join(data_path, dataset, f'gnd_{dataset}.pkl')
    if not os.path.isfile(gnd_path):
        utils.fail(f"ground truth {gnd_path} not found; --data_path must hold {dataset}/gnd_{dataset}.pkl and "
                   f"{dataset}/jpg/ as published by the revisited Oxford/Paris authors")
    try:
        with open(gnd_path, 'rb') as f:
            cfg = _GroundTruthUnpickler(f).load()
    except Exception as exc:
        utils.fail(f"cannot read {gnd_path} ({type(exc).__name__}: {str(exc).splitlines()[0][:100] if str(exc) else ''}); "
                   f"it must be the pickled ground truth gnd_{dataset}.pkl (a dict of imlist, qimlist, gnd) as "
                   "published by the revisited Oxford/Paris authors; download it again")
    check_ground_truth(cfg, gnd_path)
    cfg['dir_images'] = os.path.join(data_path, dataset, 'jpg')
    for split, names in (('query', cfg['qimlist']), ('database', cfg['imlist'])):
        missing = [n for n in names if not os.path.isfile(os.path.join(cfg['dir_images'], n + '.jpg'))]
        if missing:
            utils.fail(f"{split} image {missing[0]}.jpg listed in {gnd_path} is missing from {cfg['dir_images']} "
                       f"({len(missing)} of {len(names)} {split} images missing); restore the dataset's jpg/ folder")
    return cfg


def check_ground_truth(cfg, gnd_path):
    if not isinstance(cfg, dict) or not {'imlist', 'qimlist', 'gnd'} <= set(cfg):
        utils.fail(f"{gnd_path} is not a revisited Oxford/Paris ground truth (expected keys imlist, qimlist, gnd)")
    if len(cfg['gnd']) != len(cfg['qimlist']):
        utils.fail(f"{gnd_path}: gnd has {len(cfg['gnd'])} entries but qimlist has {len(cfg['qimlist'])} queries")
    num_images = len(cfg['imlist'])
    for i, g in enumerate(cfg['gnd']):
        absent = [key for key in ('bbx', 'easy', 'hard', 'junk') if key not in g]
        if absent:
            utils.fail(f"{gnd_path}: ground truth of query {i} lacks {', '.join(absent)}")
        try:
            box = np.asarray(g['bbx'], dtype=float).ravel()
        except (TypeError, ValueError):
            box = np.zeros(0)
        if len(box) != 4 or not (np.isfinite(box).all() and box[0] < box[2] and box[1] < box[3]):
            utils.fail(f"{gnd_path}: bounding box of query {i} is {np.asarray(g['bbx']).tolist()}; expected "
                       "[left, top, right, bottom] with left < right and top < bottom")
        for key in ('easy', 'hard', 'junk'):
            indices = np.asarray(g[key]).ravel()
            if len(indices) and (indices.min() < 0 or indices.max() >= num_images):
                utils.fail(f"{gnd_path}: '{key}' images of query {i} include index {int(indices.max())} but "
                           f"imlist holds {num_images} database images (indices 0 to {num_images - 1}); "
                           "the ground truth does not belong to this image list")


def check_args(args):
    utils.check_common_args(args)
    utils.check_at_least(args, 1, 'imsize')
    if args.arch in utils.VIT_ARCHS:
        # --multiscale also runs the model on the images shrunk to half their size
        smallest = args.imsize // 2 if args.multiscale else args.imsize
        if smallest < args.patch_size:
            utils.fail(f"--imsize {args.imsize}{' with --multiscale (scales down to 1/2)' if args.multiscale else ''} "
                       f"makes images smaller than one {args.patch_size}-pixel patch (--patch_size "
                       f"{args.patch_size}); use at least {args.patch_size * (2 if args.multiscale else 1)}")
    imagedata.check_not_synthetic(args.data_path, '--data_path', 'the folder of revisited Oxford and Paris')
    utils.check_input_folder(args.data_path, '--data_path')


def main(argv=None):
    parser = argparse.ArgumentParser('Image Retrieval on revisited Paris and Oxford', parents=[get_args_parser()])
    args = utils.parse_checked_args(parser, check_args, argv)
    utils.run_reporting_failures(eval_retrieval, args, "restore or replace the file and run again")


if __name__ == '__main__':
    main()
