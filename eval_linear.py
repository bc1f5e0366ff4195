"""Linear evaluation of frozen DINO features (Caron et al., 2021) on HPU, CUDA or CPU."""
import argparse
import json
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision import transforms

import checkpoints
import evaluation
import imagedata
import outputdir
import utils

HEAD_FLAGS_HINT = ("was it trained with another --arch, --patch_size, --n_last_blocks, --avgpool_patchtokens or "
                   "--num_labels?")


def get_args_parser():
    parser = argparse.ArgumentParser('Evaluation with linear classification on ImageNet', add_help=False)
    parser.add_argument('--n_last_blocks', default=4, type=int, help="""Concatenate the [CLS] tokens of
        the last n blocks (the paper uses 4 for ViT-Small and 1 for ViT-Base).""")
    parser.add_argument('--avgpool_patchtokens', default=False, type=utils.bool_flag,
                        help="""Also use the average of the last block's patch tokens (the paper uses it
        with ViT-Base, not with ViT-Small).""")
    utils.add_model_args(parser, arch='vit_small', patch_size=16)
    evaluation.add_eval_size_args(parser)
    parser.add_argument('--epochs', default=100, type=int, help='Number of epochs of training.')
    parser.add_argument('--lr', default=0.001, type=float, help="""Peak learning rate for a batch of 256,
        scaled linearly with the global batch size and decayed to 0 with a cosine; worth tuning per model.""")
    parser.add_argument('--batch_size_per_device', '--batch_size_per_gpu', dest='batch_size_per_device',
                        default=128, type=int, help='Images per device and step.')
    parser.add_argument('--data_path', default='/path/to/imagenet/', type=utils.path_arg,
                        help="""A folder with train/ and val/ ImageFolders, 'synthetic' for the built-in shapes, or
                        'fashion-mnist' (val: its 10,000 held-out images; see main_dino.py --data_path).""")
    parser.add_argument('--data_limit', default=None, type=int, help='Use only this many images of each split.')
    parser.add_argument('--num_workers', default=10, type=int, help='Data loading workers per device.')
    parser.add_argument('--val_freq', default=1, type=int, help='Validate every this many epochs.')
    parser.add_argument('--output_dir', default='.', type=utils.path_arg, help='Where logs and checkpoint.pth.tar go.')
    parser.add_argument('--num_labels', default=1000, type=int, help='Number of outputs of the linear classifier.')
    parser.add_argument('--evaluate', action='store_true', help="""Only evaluate the linear head of
        output_dir/checkpoint.pth.tar (the released head of --arch when there is none).""")
    utils.add_random_weights_args(parser)
    utils.add_distributed_args(parser)
    utils.add_device_args(parser)
    return parser


def eval_linear(args):
    device = utils.start_run(args)

    # ============ building network ... ============
    model, embed_dim = utils.build_evaluated_backbone(args)  # seeds the random states (0, or --seed)
    if is_vit(model):
        if args.n_last_blocks > len(model.blocks):
            utils.fail(f"--n_last_blocks {args.n_last_blocks}: {args.arch} has only {len(model.blocks)} blocks")
        embed_dim *= args.n_last_blocks + int(args.avgpool_patchtokens)
    model.requires_grad_(False)
    model.to(device).eval()
    print(f"Model {args.arch} built.")
    linear_classifier = utils.wrap_ddp(LinearClassifier(embed_dim, num_labels=args.num_labels).to(device), args)

    # ============ preparing data ... ============
    val_transform = evaluation.center_crop_transform(args.crop_size, args.resize)
    dataset_val = evaluation.build_eval_split(args.data_path, 'val', val_transform)
    dataset_val = imagedata.limit_dataset(dataset_val, args.data_limit)
    check_num_labels(dataset_val, args)
    val_loader = make_val_loader(imagedata.SkippingUnreadable(dataset_val), args)
    # unreadable images are left out, each named once (skipped_count says how many at every pass)
    unreadable_train, unreadable_val = (imagedata.SkippedImages(fate=imagedata.SkippedImages.EVALUATION)
                                        for _ in range(2))

    inputs = head_inputs(args)
    if args.evaluate:
        load_linear_head(linear_classifier, args, inputs)
        test_stats = validate_network(val_loader, model, linear_classifier, args, unreadable_val)
        print(f"Accuracy of the network on the {test_stats['images']} test images: {test_stats['acc1']:.1f}%")
        return

    train_transform = transforms.Compose([
        transforms.RandomResizedCrop(args.crop_size),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(utils.IMAGENET_MEAN, utils.IMAGENET_STD),
    ])
    dataset_train = evaluation.build_eval_split(args.data_path, 'train', train_transform)
    dataset_train = imagedata.limit_dataset(dataset_train, args.data_limit)
    evaluation.check_matching_classes(dataset_train, dataset_val, args.data_path)
    check_num_labels(dataset_train, args)
    sampler = torch.utils.data.DistributedSampler(dataset_train, num_replicas=utils.get_world_size(),
                                                  rank=utils.get_rank(), shuffle=True)
    train_loader = torch.utils.data.DataLoader(imagedata.SkippingUnreadable(dataset_train), sampler=sampler,
                                               batch_size=args.batch_size_per_device,
                                               num_workers=args.num_workers, pin_memory=utils.run_device().pin_memory)
    print(f"Data loaded with {len(dataset_train)} train and {len(dataset_val)} val imgs.")

    # ============ optimizer, schedule, resuming ... ============
    global_batch = args.batch_size_per_device * utils.get_world_size()
    optimizer = torch.optim.SGD(
        linear_classifier.parameters(),
        args.lr * global_batch / 256.,  # linear scaling rule
        momentum=0.9,
        weight_decay=0,  # no weight decay for the linear head
    )
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs, eta_min=0)
    checkpoint_path = os.path.join(args.output_dir, 'checkpoint.pth.tar')
    to_restore = {'epoch': 0, 'best_acc': 0., 'inputs': None}
    check_saved_head(checkpoint_path, inputs, TRAINING_INPUTS)  # before anything is loaded or written
    Path(args.output_dir).mkdir(parents=True, exist_ok=True)  # only now: bad input has been rejected
    outputdir.warn_if_log_shared(args.output_dir, training=False)
    checkpoints.restart_from_checkpoint(checkpoint_path, run_variables=to_restore, state_dict=linear_classifier,
                                        optimizer=optimizer, scheduler=scheduler, mismatch_hint=HEAD_FLAGS_HINT)
    start_epoch, best_acc = to_restore['epoch'], to_restore['best_acc']
    if start_epoch >= args.epochs:
        print(f"The linear head in {checkpoint_path} is already trained ({args.epochs} epochs, the same backbone "
              "and flags); nothing to train.")

    # ============ training ... ============
    summary_writer = utils.summary_writer(args.output_dir) if start_epoch < args.epochs else None
    for epoch in range(start_epoch, args.epochs):
        train_loader.sampler.set_epoch(epoch)
        train_stats = train(model, linear_classifier, optimizer, train_loader, epoch, args, summary_writer,
                            unreadable_train)
        scheduler.step()
        log_stats = {**{f'train_{k}': v for k, v in train_stats.items()}, 'epoch': epoch}
        if epoch % args.val_freq == 0 or epoch == args.epochs - 1:
            test_stats = validate_network(val_loader, model, linear_classifier, args, unreadable_val)
            print(f"Accuracy at epoch {epoch} of the network on the {test_stats['images']} test images: "
                  f"{test_stats['acc1']:.1f}%")
            best_acc = max(best_acc, test_stats['acc1'])
            print(f'Max accuracy so far: {best_acc:.2f}%')
            log_stats.update({f'test_{k}': v for k, v in test_stats.items() if k != 'images'})
        if utils.is_main_process():
            write_logs(log_stats, epoch, args.output_dir, summary_writer)
        save_dict = {
            'epoch': epoch + 1,
            'state_dict': linear_classifier.state_dict(),
            'optimizer': optimizer.state_dict(),
            'scheduler': scheduler.state_dict(),
            'best_acc': best_acc,
            'inputs': inputs,
        }
        checkpoints.save_on_master(checkpoints.to_cpu(save_dict), checkpoint_path)
    if summary_writer is not None:
        summary_writer.close()
    print("Training of the supervised linear classifier on frozen features completed.\n"
          f"Top-1 test accuracy: {best_acc:.1f}")


def train(model, linear_classifier, optimizer, loader, epoch, args, summary_writer, skipped):
    linear_classifier.train()
    device = utils.device_for(args)
    metric_logger = utils.MetricLogger("  ", args.batch_size_per_device * utils.get_world_size(), summary_writer)
    metric_logger.add_meter('lr', utils.SmoothedValue(window_size=1, fmt='{value:.6f}'))
    for inp, target, skipped_index, notes in metric_logger.log_every(loader, 20, f'Epoch: [{epoch}]', epoch):
        skipped.note(skipped_index, notes)
        inp = inp.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        with torch.no_grad(), utils.autocast_context(device.type, args.autocast):
            features = frozen_features(model, inp, args.n_last_blocks, args.avgpool_patchtokens)
        output = linear_classifier(features.float())
        loss = readable_loss(output, target, skipped_index)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        utils.mark_step()
        optimizer.step()
        utils.mark_step()
        metric_logger.update(loss=loss.item())
        metric_logger.update(lr=optimizer.param_groups[0]['lr'])
    metric_logger.synchronize_between_processes()
    print("Averaged stats:", metric_logger)
    count = skipped_count(skipped, len(loader.dataset), device)
    if count:
        utils.warn(f"epoch {epoch}: {count} unreadable training image(s) skipped, left out of the loss")
    return {k: meter.global_avg for k, meter in metric_logger.meters.items()}


def readable_loss(output, target, skipped_index):
    """The cross-entropy averaged over the batch's readable images (the others, see imagedata.SkippingUnreadable,
    weigh nothing; a batch of none gives 0 and no gradient)."""
    readable = skipped_index < 0
    if readable.all():
        return F.cross_entropy(output, target)
    weights = readable.to(output.device, output.dtype)
    return (F.cross_entropy(output, target, reduction='none') * weights).sum() / max(1, int(readable.sum()))


def skipped_count(skipped, dataset_size, device):
    """Distinct unreadable images all processes met (a collective when distributed)."""
    skipped.merge(dataset_size, device)
    return skipped.end_epoch()


@torch.no_grad()
def validate_network(val_loader, model, linear_classifier, args, skipped):
    """Loss, top-1 and top-5 accuracy (%) over the validation set's readable images (all processes), and their
    number ('images'); `skipped` (imagedata.SkippedImages) records the others."""
    linear_classifier.eval()
    device = utils.device_for(args)
    topk = (1, 5) if args.num_labels >= 5 else (1,)
    metric_logger = utils.MetricLogger("  ", args.batch_size_per_device * utils.get_world_size())
    for name in ['loss'] + [f'acc{k}' for k in topk]:  # same meters on every process, even one without images
        metric_logger.add_meter(name, utils.SmoothedValue())
    for inp, target, skipped_index, notes in metric_logger.log_every(val_loader, 20, 'Test:'):
        skipped.note(skipped_index, notes)
        inp = inp.to(device, non_blocking=True)
        target = target.to(device, non_blocking=True)
        with utils.autocast_context(device.type, args.autocast):
            features = frozen_features(model, inp, args.n_last_blocks, args.avgpool_patchtokens)
        output = linear_classifier(features.float())
        readable = skipped_index < 0
        if not readable.all():  # the unreadable images' rows (another image's) are left out
            readable = readable.to(device)
            output, target = output[readable], target[readable]
            if not len(target):
                continue
        metric_logger.update(loss=F.cross_entropy(output, target).item())
        for k, acc in zip(topk, utils.accuracy(output, target, topk)):
            metric_logger.meters[f'acc{k}'].update(acc.item(), n=len(target))
    metric_logger.synchronize_between_processes()
    count = skipped_count(skipped, len(val_loader.dataset), device)
    images = len(val_loader.dataset) - count
    if count:
        utils.warn(f"{count} unreadable val image(s) skipped, left out of the evaluation: its figures are those of "
                   f"the other {images}")
    top5 = f" Acc@5 {metric_logger.acc5.global_avg:.3f}" if 5 in topk else ''
    print(f"* Acc@1 {metric_logger.acc1.global_avg:.3f}{top5} loss {metric_logger.loss.global_avg:.3f}")
    return {'images': images, **{k: meter.global_avg for k, meter in metric_logger.meters.items()}}


class LinearClassifier(nn.Module):
    """A linear layer trained on top of frozen features."""

    def __init__(self, dim, num_labels=1000):
        super().__init__()
        self.num_labels = num_labels
        self.linear = nn.Linear(dim, num_labels)
        self.linear.weight.data.normal_(mean=0.0, std=0.01)
        self.linear.bias.data.zero_()

    def forward(self, x):
        return self.linear(x.flatten(1))


def is_vit(model):
    return hasattr(model, 'get_intermediate_layers')


def frozen_features(model, images, n_last_blocks, avgpool):
    """[CLS] tokens of the last n blocks (and the mean patch token), or a convnet's pooled output."""
    if not is_vit(model):
        return model(images)
    blocks = model.get_intermediate_layers(images, n_last_blocks)
    cls_tokens = [x[:, 0] for x in blocks]
    if not avgpool:
        return torch.cat(cls_tokens, dim=-1)
    # interleaved channel by channel: the layout the released ViT-B (n_last_blocks=1) linear heads expect
    return torch.stack(cls_tokens + [blocks[-1][:, 1:].mean(dim=1)], dim=-1).flatten(1)


def make_val_loader(dataset, args):
    # each process evaluates every world_size-th image, with no padding, so every image counts once
    indices = range(utils.get_rank(), len(dataset), utils.get_world_size())
    return torch.utils.data.DataLoader(dataset, sampler=indices, batch_size=args.batch_size_per_device,
                                       num_workers=args.num_workers, pin_memory=utils.run_device().pin_memory)


def check_num_labels(dataset, args):
    num_classes = len(evaluation.dataset_classes(dataset))
    if num_classes > args.num_labels:
        utils.fail(f"--num_labels {args.num_labels} is smaller than the {num_classes} classes found in "
                   f"{args.data_path}; pass --num_labels {num_classes} (or more)")


def load_linear_head(linear_classifier, args, inputs):
    """The head trained in output_dir on this backbone, or else the released one for --arch/--patch_size."""
    path = os.path.join(args.output_dir, 'checkpoint.pth.tar')
    if os.path.isfile(path):
        checkpoint = check_saved_head(path, inputs, FEATURE_INPUTS)
        if not isinstance(checkpoint, dict) or 'state_dict' not in checkpoint:
            utils.fail(f"{path} holds no linear head ('state_dict'); train one first (without --evaluate)")
        state_dict, source = checkpoint['state_dict'], path
    else:
        print(f"No {path}: evaluating the released linear head of {args.arch}/{args.patch_size}.")
        if args.pretrained_weights:
            utils.warn(f"the released linear head was trained on the released {args.arch}/{args.patch_size} backbone: "
                       f"on {args.pretrained_weights} its accuracy is that backbone's only if this is the same file")
        state_dict, source = download_linear_head(args), 'the released linear head'
    try:
        linear_classifier.load_state_dict(state_dict)
    except RuntimeError as exc:
        detail = next((line.strip() for line in str(exc).splitlines() if 'size mismatch' in line),
                      str(exc).splitlines()[0])
        utils.fail(f"{source} does not fit this linear classifier ({detail[:200]}); {HEAD_FLAGS_HINT} "
                   "Use the ones it was trained with")
    print(f"Linear head loaded from {source}")


# what a saved head belongs to: the features it was trained on, then the flags of its training
FEATURE_INPUTS = ('backbone', 'arch', 'patch_size', 'n_last_blocks', 'avgpool_patchtokens', 'num_labels')
TRAINING_INPUTS = FEATURE_INPUTS + ('crop_size', 'resize', 'data_path', 'data_limit', 'epochs', 'lr', 'global_batch')


def head_inputs(args):
    """What the head this run trains or evaluates belongs to (saved with it as 'inputs'): the backbone (the
    sha256 of --pretrained_weights and its --checkpoint_key, or the released weights), the evaluation size
    and the flags of its training."""
    if args.pretrained_weights:
        backbone = f"sha256 {checkpoints.file_digest(args.pretrained_weights)} [{args.checkpoint_key}]"
    else:
        backbone = f"released {args.arch}/{args.patch_size}"
    inputs = {name: getattr(args, name) for name in TRAINING_INPUTS if hasattr(args, name)}
    inputs.update(backbone=backbone, data_path=imagedata.data_identity(args.data_path),
                  global_batch=args.batch_size_per_device * utils.get_world_size())
    return inputs


def check_saved_head(path, inputs, names):
    """The checkpoint at `path` (None when missing) after checking that its head belongs to `inputs` (the
    entries `names`): one error line naming what differs otherwise; a head of an older version (no record) gets a
    warning."""
    if not os.path.isfile(path):
        return None
    checkpoint = utils.load_checkpoint_or_exit(path)
    saved = checkpoint.get('inputs') if isinstance(checkpoint, dict) else None
    if not isinstance(saved, dict):
        utils.warn(f"{path} does not record the backbone and flags its head was trained with (an older version); "
                   "it is taken as theirs")
        return checkpoint
    differ = [name for name in names if saved.get(name) != inputs.get(name)]
    if differ:
        what = '; '.join(f"{'the backbone' if n == 'backbone' else '--' + n} {saved.get(n)} (this run: {inputs.get(n)})"
                         for n in differ)
        utils.fail(f"{path} holds a linear head of other inputs: {what}; pass another --output_dir to train a head "
                   "for these, or the head's own backbone and flags")
    return checkpoint


def download_linear_head(args):
    url = utils.released_linear_weights_url(args.arch, args.patch_size)
    if url is None:
        utils.fail(f"no linear head in {args.output_dir} and no released one for {args.arch}/{args.patch_size}; "
                   "train one first (without --evaluate)")
    released = utils.download_state_dict_or_exit(url, "could not download the released linear head ({url}): {reason}; "
                                                       "when offline, train a head first (without --evaluate)")
    return released['state_dict']


def write_logs(log_stats, epoch, output_dir, summary_writer):
    with (Path(output_dir) / 'log.txt').open('a') as f:
        f.write(json.dumps(log_stats) + '\n')
    if summary_writer is not None:
        for name, value in log_stats.items():
            if name != 'epoch':
                summary_writer.add_scalar(name, float(value), epoch)


def check_args(args):
    utils.check_common_args(args)
    utils.check_at_least(args, 1, 'epochs', 'n_last_blocks', 'val_freq', 'num_labels', 'data_limit')
    utils.check_random_weights(args)
    if not 0 < args.lr < float('inf'):
        utils.fail(f"--lr must be positive, got {args.lr}")
    if not imagedata.is_builtin(args.data_path):
        utils.check_input_folder(args.data_path, '--data_path')
    evaluation.check_eval_sizes(args)
    utils.check_output_dir(args.output_dir)


def unread_flags(args):
    """The flags --evaluate does not read (it trains no head), and those of the weights not loaded: {name: why}."""
    unread = utils.random_weights_unread(args)
    if args.evaluate:
        unread.update(dict.fromkeys(['epochs', 'lr', 'val_freq'], 'with --evaluate (no head is trained)'))
    return unread


def main(argv=None):
    parser = argparse.ArgumentParser('Evaluation with linear classification on ImageNet',
                                     parents=[get_args_parser()])
    args = utils.parse_checked_args(parser, check_args, argv, unread_flags)
    with outputdir.only_writer(args, 'output_dir'):
        utils.run_reporting_failures(eval_linear, args)


if __name__ == '__main__':
    main()
