"""Weighted k-NN evaluation of frozen DINO features (Caron et al., 2021) on HPU, CUDA or CPU."""
import argparse
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torchvision import datasets

import checkpoints
import evaluation
import imagedata
import outputdir
import utils

FEATURE_FILES = ('trainfeat.pth', 'testfeat.pth', 'trainlabels.pth', 'testlabels.pth')


def get_args_parser():
    parser = argparse.ArgumentParser('Evaluation with weighted k-NN on ImageNet', add_help=False)
    parser.add_argument('--batch_size_per_device', '--batch_size_per_gpu', dest='batch_size_per_device',
                        default=128, type=int, help='Images per device and step of feature extraction.')
    parser.add_argument('--nb_knn', default=[10, 20, 100, 200], nargs='+', type=int,
                        help='Numbers of nearest neighbours to evaluate (20 usually works best).')
    parser.add_argument('--temperature', default=0.07, type=float,
                        help='Temperature T of the neighbour weights exp(similarity / T).')
    utils.add_model_args(parser, arch='vit_small', patch_size=16)
    utils.add_random_weights_args(parser)
    utils.add_extraction_args(parser)
    evaluation.add_eval_size_args(parser)
    parser.add_argument('--dump_features', default=None, type=utils.path_arg,
                        help='Folder where to save the computed features and labels; empty for no saving.')
    parser.add_argument('--load_features', default=None, type=utils.path_arg,
                        help='Folder of features saved earlier with --dump_features: skips the extraction.')
    parser.add_argument('--data_path', default='/path/to/imagenet/', type=utils.path_arg,
                        help="""A folder with train/ and val/ ImageFolders, 'synthetic' for the built-in shapes, or
                        'fashion-mnist' (val: its 10,000 held-out images; see main_dino.py --data_path).""")
    parser.add_argument('--max_batches', default=None, type=int,
                        help='Read only this many batches (per device) of each split; for quick tests.')
    parser.add_argument('--dump_tb_events', default=None, type=utils.path_arg,
                        help='Folder where to write TensorBoard events; empty for none.')
    outputdir.add_overwrite_arg(parser)
    utils.add_distributed_args(parser)
    utils.add_device_args(parser)
    return parser


def eval_knn(args):
    device = utils.start_run(args)

    if args.load_features:
        train_features, test_features, train_labels, test_labels = load_features(args.load_features)
        check_nb_knn(args.nb_knn, len(train_labels))
    else:
        train_features, test_features, train_labels, test_labels = extract_feature_pipeline(args, device)

    storage = device if args.store_on_device else torch.device('cpu')
    train_features, test_features = train_features.to(storage), test_features.to(storage)
    train_labels, test_labels = train_labels.to(storage), test_labels.to(storage)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1

    print("Features are ready!\nStart the k-NN classification.")
    results = knn_evaluate(train_features, train_labels, test_features, test_labels, args.nb_knn,
                           args.temperature, num_classes)
    for k, (top1, top5) in results.items():
        print(f"{k}-NN classifier result: Top1: {top1}, Top5: {top5}")
        writer = tensorboard_writer(args, f'{k}-NN')
        if writer is not None:
            writer.add_scalar('top1', top1, 0)
            writer.add_scalar('top5', top5, 0)
            writer.close()


def extract_feature_pipeline(args, device):
    # ============ preparing data ... ============
    transform = evaluation.center_crop_transform(args.crop_size, args.resize)
    dataset_train = first_batches(evaluation.build_eval_split(args.data_path, 'train', transform), args)
    dataset_val = first_batches(evaluation.build_eval_split(args.data_path, 'val', transform), args)
    evaluation.check_matching_classes(dataset_train, dataset_val, args.data_path)
    check_nb_knn(args.nb_knn, len(dataset_train))
    print(f"Data loaded with {len(dataset_train)} train and {len(dataset_val)} val imgs.")

    # ============ building network ... ============
    model, _ = utils.build_evaluated_backbone(args)
    model.to(device).eval()
    print(f"Model {args.arch} {args.patch_size}x{args.patch_size} built.")

    # ============ extract features ... ============
    features, labels = [], []
    for name, dataset, split in (('train', dataset_train, 'train/'), ('test', dataset_val, 'val/')):
        print(f"Extracting features for {name} set...")
        writer = tensorboard_writer(args, f'{name}_features')
        feats, readable = evaluation.extract_readable_features(model, dataset, args, device, split,
                                                               autocast=args.autocast,
                                                               store_on_device=args.store_on_device,
                                                               summary_writer=writer)
        if writer is not None:
            writer.close()
        features.append(F.normalize(feats, dim=1, p=2))
        labels.append(torch.tensor(evaluation.dataset_labels(dataset), dtype=torch.long)[readable])
    train_features, test_features = features
    train_labels, test_labels = labels
    check_nb_knn(args.nb_knn, len(train_labels))
    if args.dump_features and utils.is_main_process():
        dump_features(args.dump_features, train_features, test_features, train_labels, test_labels)
    return train_features, test_features, train_labels, test_labels


@torch.no_grad()
def knn_classifier(train_features, train_labels, test_features, test_labels, k, T, num_classes=1000):
    """Top-1 and top-5 accuracy (%) of the weighted k-NN classifier of DINO.

    Features are rows, L2-normalised; each test sample takes its k most similar training
    samples, each voting for its label with weight exp(similarity / T).
    """
    return knn_evaluate(train_features, train_labels, test_features, test_labels, [k], T, num_classes)[k]


@torch.no_grad()
def knn_evaluate(train_features, train_labels, test_features, test_labels, ks, T, num_classes=1000,
                 chunk_size=None):
    """{k: (top1, top5)} for every k in ks, from one neighbour search for the largest k.

    The test samples are processed in chunks (bounded memory), shared out among processes.
    Ties in similarity go to the lower training index, ties in votes to the lower class.
    """
    ks, k_max = list(ks), max(ks)
    world = utils.get_world_size()
    share = math.ceil(len(test_labels) / world)  # so that every process gets work
    chunk_size = chunk_size or max(1, min(default_chunk_size(len(train_features), k_max, num_classes), share))
    correct = torch.zeros(len(ks), 2, dtype=torch.float64)
    starts = range(utils.get_rank() * chunk_size, len(test_labels), chunk_size * world)
    metric_logger = utils.MetricLogger(delimiter="  ")
    for start in metric_logger.log_every(starts, 10, 'k-NN'):
        queries = test_features[start:start + chunk_size]
        targets = test_labels[start:start + chunk_size].view(-1, 1)
        similarities, indices = evaluation.nearest_neighbours(train_features, queries, k_max)
        neighbour_labels = train_labels[indices]
        for i, k in enumerate(ks):
            ranked = evaluation.rank_classes(similarities[:, :k], neighbour_labels[:, :k], T, num_classes)
            hits = ranked[:, :min(5, k)] == targets  # top-5 is only meaningful when k >= 5
            correct[i, 0] += hits[:, 0].sum().item()
            correct[i, 1] += hits.sum().item()
    correct = utils.all_reduce(correct)
    total = len(test_labels)
    return {k: (correct[i, 0].item() * 100.0 / total, correct[i, 1].item() * 100.0 / total)
            for i, k in enumerate(ks)}


def default_chunk_size(num_train, k, num_classes, budget=2 ** 26):
    """Test samples per chunk so that the similarity and vote matrices stay under `budget` elements."""
    return max(1, budget // max(num_train, k * num_classes))


def check_nb_knn(nb_knn, num_train):
    for k in nb_knn:
        if not 1 <= k <= num_train:
            utils.fail(f"--nb_knn {k} is not possible with {num_train} training images; "
                       f"choose values between 1 and {num_train}")


def first_batches(dataset, args):
    """With --max_batches, only the images of the first max_batches batches of every process."""
    if args.max_batches is None:
        return dataset
    count = args.max_batches * args.batch_size_per_device * utils.get_world_size()
    return torch.utils.data.Subset(dataset, range(min(count, len(dataset))))


# ============ the original's importable names (for code written against it; these scripts do not use them) ============

def extract_features(model, data_loader, use_cuda=True, multiscale=False):
    """The original's signature: features of a loader of (images, indices), on the model's device (on the host
    when use_cuda is false), in dataset order."""
    device = next(model.parameters()).device
    return evaluation.extract_features(model, data_loader, device, multiscale=multiscale, store_on_device=use_cuda)


class ReturnIndexDataset(datasets.ImageFolder):
    """The original's ImageFolder whose items are (image, index)."""

    def __getitem__(self, idx):
        img, _ = super().__getitem__(idx)
        return img, idx


def dump_features(folder, train_features, test_features, train_labels, test_labels):
    Path(folder).mkdir(parents=True, exist_ok=True)
    for name, tensor in zip(FEATURE_FILES, (train_features, test_features, train_labels, test_labels)):
        checkpoints.save_checkpoint(tensor.cpu(), os.path.join(folder, name))
    outputdir.record_written(folder, FEATURE_FILES)
    print(f"Features and labels saved in {folder}")


def load_features(folder):
    paths = [os.path.join(folder, name) for name in FEATURE_FILES]
    missing = [name for name, path in zip(FEATURE_FILES, paths) if not os.path.isfile(path)]
    if missing:
        utils.fail(f"--load_features {folder} lacks {', '.join(missing)}; "
                   "pass a folder written by --dump_features")
    train_features, test_features, train_labels, test_labels = (utils.load_checkpoint_or_exit(p) for p in paths)
    if not all(torch.is_tensor(t) for t in (train_features, test_features, train_labels, test_labels)) \
            or train_features.ndim != 2 or test_features.ndim != 2 \
            or len(train_features) != len(train_labels) or len(test_features) != len(test_labels) \
            or train_features.shape[1] != test_features.shape[1]:
        utils.fail(f"--load_features {folder}: the features and labels do not fit together; "
                   "dump them again with --dump_features")
    print(f"Loaded {len(train_labels)} train and {len(test_labels)} val features from {folder}")
    return train_features.float(), test_features.float(), train_labels.long(), test_labels.long()


def tensorboard_writer(args, subdir):
    return utils.summary_writer(os.path.join(args.dump_tb_events, subdir)) if args.dump_tb_events else None


def check_args(args):
    utils.check_common_args(args)
    utils.check_at_least(args, 1, 'max_batches', 'nb_knn')
    utils.check_random_weights(args)
    if not 0 < args.temperature < float('inf'):
        utils.fail(f"--temperature must be positive, got {args.temperature}")
    if args.load_features:
        utils.check_input_folder(args.load_features, '--load_features')
    elif not imagedata.is_builtin(args.data_path):
        utils.check_input_folder(args.data_path, '--data_path')
    evaluation.check_eval_sizes(args)
    for flag in ('dump_features', 'dump_tb_events'):
        if getattr(args, flag):
            utils.check_output_dir(getattr(args, flag), f'--{flag}')
    if args.dump_features and not args.load_features:
        outputdir.check_replaceable(args.dump_features, FEATURE_FILES, '--dump_features', args.overwrite)


def unread_flags(args):
    """The flags --load_features does not read (no features are extracted), and those of the weights not
    loaded: {name: why}."""
    if not args.load_features:
        return utils.random_weights_unread(args)
    return dict.fromkeys(['pretrained_weights', 'checkpoint_key', 'arch', 'patch_size', 'data_path', 'max_batches',
                          'batch_size_per_device', 'num_workers', 'dump_features', 'autocast', 'random_weights',
                          'seed'], 'with --load_features (no features are extracted)')


def main(argv=None):
    parser = argparse.ArgumentParser('Evaluation with weighted k-NN on ImageNet', parents=[get_args_parser()])
    args = utils.parse_checked_args(parser, check_args, argv, unread_flags)
    with outputdir.only_writer(args, 'dump_features', 'dump_tb_events'):
        utils.run_reporting_failures(eval_knn, args)


if __name__ == '__main__':
    main()
