"""Throughput of DINO training on HPU, CUDA or CPU.

--mode step (default) times main_dino.train_step on the run main_dino.build_training_run builds (the very
function and objects main_dino.py trains with) on synthetic crops: images/s, s/step, model FLOPs per image,
the device's matmul peak measured here for the active dtype, MFU and peak memory; with --augment_on device
each timed step also renders its views on the device from handed-over images. --mode data times
main_dino's data pipeline (JPEG decoding and multi-crop augmentation) on ImageNet-sized JPEGs written to a
temporary folder: its DataLoader, and side by side on one thread the CPU share per image of the original's
PIL pipeline, of --augment_on cpu and of --augment_on device, and the device share (the batched render) of
the latter. --mode train times main_dino's training loop as a run goes: its DataLoader over --data_path (or
test JPEGs written to a temporary folder), --num_workers loader processes, the views rendered on
--augment_on, train_step and the loss read: images/s end to end and the share of the time spent waiting
for data, beside the step alone on fixed crops, so that one sees whether data or compute sets the speed.

--compile true (the default on CUDA) times the compiled step, and reports the first step's compilation apart
from the steady steps; --profile_steps adds a torch.profiler table of the step's top operators and kernels.
"""
import argparse
import contextlib
import itertools
import json
import os
import statistics
import sys
import tempfile
import time

import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

import imagedata
import main_dino
import multicrop
import utils
import vision_transformer as vits


def get_args_parser():
    parser = argparse.ArgumentParser('DINO benchmark', parents=[main_dino.get_args_parser()])
    parser.add_argument('--mode', default='step', choices=['step', 'data', 'train'],
                        help="""step: time the training step; data: time loading and augmentation; train: time the
        training loop end to end (loader, render, step) beside the step alone.""")
    parser.add_argument('--steps', default=10, type=int, help='Timed steps (data mode: timed batches).')
    parser.add_argument('--warmup_steps', default=3, type=int, help='Untimed steps (batches) run first.')
    parser.add_argument('--json', action='store_true', help='Print one JSON object instead of text.')
    parser.add_argument('--profile_steps', default=0, type=int, help="""Step mode: after the timed steps, run this
        many more under torch.profiler, print its table of the operators and kernels taking the most device
        time (CPU time on a CPU) on stderr, and report the share of a step's time the GPU is busy.""")
    parser.add_argument('--image_width', default=500, type=int, help='Data and train modes: width of the test JPEGs.')
    parser.add_argument('--image_height', default=375, type=int, help='Data and train modes: height of the test JPEGs.')
    # one worker per core is what a per-worker figure is meant for; train mode writes test JPEGs unless
    # --data_path is given
    parser.set_defaults(num_workers=1, data_path=None)
    return parser


def benchmark_step(args):
    """Time main_dino.train_step on fixed synthetic crops (the data pipeline is not involved)."""
    device = utils.start_run(args, show_args=False)
    utils.fix_random_seeds(args.seed)
    dtype = utils.run_device().autocast_dtype or torch.float32
    peak, peak_per_cpu_second = matmul_peak_flops(args, device)
    main_dino.resolve_compile(args)
    step = build_training_step(args, device)
    main_dino.resolve_augment_on(args)
    views = view_source(args, device)

    warmup = StepTimer(utils.run_device())
    for it in range(args.warmup_steps):
        with warmup:  # the first step compiles (--compile)
            step(it, views())
    images = views()
    # counted (the model only), not timed; eagerly: compiled graphs do not run under the counter
    eagerly = torch.compiler.set_stance('force_eager') if args.compile else contextlib.nullcontext()
    with FlopCounterMode(display=False, custom_mapping=cpu_attention_flop_formulas()) as counter, eagerly:
        step(args.warmup_steps, images)
    images_per_step = main_dino.images_per_step(args)
    flops_per_image = counter.get_total_flops() / images_per_step
    peak_reset = utils.run_device().reset_peak_memory()
    timer = StepTimer(utils.run_device())
    for it in range(args.warmup_steps + 1, args.warmup_steps + 1 + args.steps):
        with timer:
            loss = step(it, views())
    seconds = statistics.median(timer.seconds())
    images_per_s = images_per_step / seconds
    result = {
        'mode': 'step', 'device': args.device, 'execution': utils.run_device().mode, 'augment_on': args.augment_on, 'arch': args.arch, 'patch_size': args.patch_size,
        'dtype': str(dtype).replace('torch.', ''), 'batch_size_per_device': args.batch_size_per_device,
        'accum_steps': args.accum_steps, 'grad_checkpointing': args.grad_checkpointing,
        'crops': f"2x{args.global_crops_size} + {args.local_crops_number}x{args.local_crops_size}",
        'out_dim': args.out_dim, 'threads': torch.get_num_threads(), 'steps': args.steps,
        'images_per_s': images_per_s, 'seconds_per_step': seconds,
        'flops_per_image': flops_per_image, 'achieved_flops_per_s': flops_per_image * images_per_s,
        'matmul_peak_flops_per_s': peak, 'mfu': flops_per_image * images_per_s / peak,
        'peak_memory_mb': utils.run_device().peak_memory_mib(),
        'memory_measure': utils.run_device().memory_measure(peak_reset),
        'final_loss': loss.item(), 'compile': args.compile,
        # the first step's time beyond a steady step's: the compilation (with --compile)
        'first_step_seconds': warmup.times[0] if warmup.times else None,
        'compile_seconds': warmup.times[0] - seconds if warmup.times and args.compile else None,
    }
    if args.profile_steps:
        kernel_seconds = profile_steps(step, views, args, args.warmup_steps + 1 + args.steps)
        result['device_busy_fraction'] = kernel_seconds / seconds if kernel_seconds is not None else None
    if not utils.run_device().accelerator:
        # CPU seconds (all threads) do not count time lost to other processes on a shared machine
        cpu_seconds = statistics.median(timer.cpu_seconds())
        result['cpu_seconds_per_step'] = cpu_seconds
        result['mfu_by_cpu_time'] = flops_per_image * images_per_step / cpu_seconds / peak_per_cpu_second
    return result


def build_training_step(args, device):
    """main_dino's training run (main_dino.build_training_run), and step(it, images) running one train_step."""
    # steady state: a single epoch, no warm-up, the head's last layer already trained
    args.epochs, args.warmup_epochs, args.warmup_teacher_temp_epochs, args.freeze_last_layer = 1, 0, 0, 0
    args.init_weights = ''  # the weights' values do not change the speed
    run = main_dino.build_training_run(args, device,
                                       iters_per_epoch=args.warmup_steps + 1 + args.steps + args.profile_steps)
    return lambda it, images: main_dino.train_step(run, images, 0, it)


def profile_steps(step, views, args, first_it):
    """Run --profile_steps steps under torch.profiler and print its table of the operators and kernels that take
    the most device time (CPU time on a CPU) to stderr. Returns the GPU's kernel seconds per step (None on
    other devices)."""
    from torch.profiler import ProfilerActivity, profile
    kernels = utils.run_device().profiles_kernels
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if kernels else [])
    with profile(activities=activities) as profiler:
        for it in range(first_it, first_it + args.profile_steps):
            step(it, views())
        utils.run_device().synchronize()
    events = profiler.key_averages()
    sort_by = 'self_device_time_total' if kernels else 'self_cpu_time_total'
    print(events.table(sort_by=sort_by, row_limit=25), file=sys.stderr)
    if not kernels:
        return None
    kernel_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    return kernel_us / 1e6 / args.profile_steps


def view_source(args, device):
    """views() -> the step's list of view batches: fixed synthetic crops (--augment_on cpu: the loader's
    work is not timed here), or rendered on the device from one handed-over batch of 500x375 images."""
    if args.augment_on == 'cpu':
        images = synthetic_crops(args, device)
        return lambda: images
    augmentation = augmentation_for(args, 'device')
    count = main_dino.images_per_step(args)
    shapes = imagedata.SyntheticShapes('train', length=count, image_size=500, seed=args.seed)
    batch, _, _ = multicrop.collate_hand_over([(augmentation(shapes.render(i).resize((500, 375))), -1, '')
                                               for i in range(count)])
    return lambda: main_dino.views_on_device(batch, args, device)


def augmentation_for(args, augment_on):
    return main_dino.DataAugmentationDINO(args.global_crops_scale, args.local_crops_scale, args.local_crops_number,
                                          args.global_crops_size, args.local_crops_size, augment_on)


def synthetic_crops(args, device):
    generator = torch.Generator().manual_seed(args.seed)
    shapes = [args.global_crops_size] * 2 + [args.local_crops_size] * args.local_crops_number
    return [torch.randn(main_dino.images_per_step(args), 3, s, s, generator=generator).to(device) for s in shapes]


def matmul_peak_flops(args, device):
    """Best FLOP/s of square matrix products in the active dtype on this device, measured now.

    The products run as the model's do: under the same autocast, through vision_transformer's
    lower_precision (which, for bf16 on a CPU without bf16 units, multiplies bf16 operands in
    float32). Both operand layouts of linear layers are tried (some kernels differ a lot between
    them). The size doubles until one product takes a fifth of a second (or reaches the largest
    size for the device); the best of three repetitions counts. Returns FLOP per second of wall
    time and FLOP per second of process CPU time.
    """
    largest = 8192 if utils.run_device().accelerator else 2048
    best = best_per_cpu_second = 0.
    for transposed in (False, True):
        size = 256
        while True:
            a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
            rhs = b.t() if transposed else b
            timer = StepTimer(utils.run_device())
            for _ in range(3):
                with timer, utils.run_device().autocast():
                    vits.lower_precision(torch.mm, a, rhs)
            seconds = min(timer.seconds())
            if seconds >= 0.2 or size >= largest:
                break
            size *= 2
        best = max(best, 2 * size ** 3 / seconds)
        best_per_cpu_second = max(best_per_cpu_second, 2 * size ** 3 / max(min(timer.cpu_seconds()), 1e-9))
    return best, best_per_cpu_second


def cpu_attention_flop_formulas():
    """FlopCounterMode knows the CUDA attention kernels; count the CPU ones with torch's same formulas."""
    aten, counter = torch.ops.aten, torch.utils.flop_counter

    def forward(query, key, value, *args, out_shape=None, **kwargs):
        return counter.sdpa_flop_count(query, key, value)

    def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs):
        return counter.sdpa_backward_flop_count(grad_out, query, key, value)

    return {aten._scaled_dot_product_flash_attention_for_cpu: forward,
            aten._scaled_dot_product_flash_attention_for_cpu_backward: backward}


class StepTimer:
    """Context manager collecting the duration of device work on `device` (a utils.RunDevice; None: host work):
    CUDA events on CUDA, else a synchronised wall clock; also the process CPU time (all threads) of each
    timed block."""

    def __init__(self, device=None):
        self.device = device or utils.RunDevice('cpu')
        self.events, self.times, self.cpu_times = [], [], []

    def __enter__(self):
        self.device.synchronize()
        if self.device.timing_events:
            self.events.append((torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)))
            self.events[-1][0].record()
        self.start, self.cpu_start = time.perf_counter(), time.process_time()

    def __exit__(self, *exc):
        self.device.mark_step()
        if self.device.timing_events:
            self.events[-1][1].record()
        self.device.synchronize()
        self.times.append(time.perf_counter() - self.start)
        self.cpu_times.append(time.process_time() - self.cpu_start)

    def seconds(self):
        if self.device.timing_events:
            return [start.elapsed_time(end) / 1000 for start, end in self.events]
        return self.times

    def cpu_seconds(self):
        return self.cpu_times


def benchmark_data(args):
    """Images/s of main_dino's data pipeline (JPEG decoding, multi-crop augmentation): through its
    DataLoader (--augment_on's path), and image by image on one thread, as in a DataLoader worker, for
    the original's PIL pipeline and both paths; then the device share of --augment_on device."""
    device = utils.start_run(args, show_args=False, join_group=False)
    main_dino.resolve_augment_on(args)
    with tempfile.TemporaryDirectory() as root:
        paths = write_test_jpegs(root, (args.warmup_steps + args.steps) * args.batch_size_per_device, args)
        loader_images_per_s = time_data_loader(args, root)
        torch.set_num_threads(1)
        original = original_augmentation(args.global_crops_scale, args.local_crops_scale, args.local_crops_number,
                                         args.global_crops_size, args.local_crops_size)
        cpu, on_device = augmentation_for(args, 'cpu'), augmentation_for(args, 'device')
        shares = {
            'decode_only': time_per_image(paths, lambda image: image),
            'original': time_per_image(paths, lambda image: [t(image) for t in original]),
            'cpu': time_per_image(paths, cpu),
            'device': time_per_image(paths, on_device, collate=multicrop.collate_hand_over),
        }
        device_share, cpu_render_images_per_s = time_renders(args, device, paths, cpu, on_device)
    chosen = shares[args.augment_on]
    return {
        'mode': 'data', 'augment_on': args.augment_on, 'num_workers': args.num_workers,
        'image_size': [args.image_width, args.image_height],
        'crops': f"2x{args.global_crops_size} + {args.local_crops_number}x{args.local_crops_size}",
        'images_per_s': loader_images_per_s, 'images_per_s_per_worker': loader_images_per_s / max(args.num_workers, 1),
        'one_thread_images_per_s': chosen['images_per_s'],
        # CPU seconds do not count time lost to other processes on a shared machine
        'one_thread_images_per_cpu_second': chosen['images_per_cpu_second'],
        'cpu_share': shares,
        'device': args.device, 'device_share': device_share,
        'cpu_render_only_images_per_cpu_second': cpu_render_images_per_s,
    }


def benchmark_train(args):
    """Images/s of main_dino's training loop end to end, the share of its time spent waiting for the
    DataLoader, and images/s of the step alone on fixed crops already on the device."""
    device = utils.start_run(args, show_args=False)
    main_dino.resolve_augment_on(args)
    main_dino.resolve_compile(args)
    utils.fix_random_seeds(args.seed)
    step = build_training_step(args, device)
    data = args.data_path or f"{args.image_width}x{args.image_height} test JPEGs"
    with tempfile.TemporaryDirectory() as root:
        if args.data_path is None:
            write_test_jpegs(root, (args.warmup_steps + args.steps) * main_dino.images_per_step(args), args)
            args.data_path = root
        seconds, waiting = time_training_loop(args, device, step)
    images = args.steps * main_dino.images_per_step(args)
    step_seconds = time_step_alone(args, device, step)
    return {
        'mode': 'train', 'device': args.device, 'augment_on': args.augment_on, 'num_workers': args.num_workers,
        'arch': args.arch, 'patch_size': args.patch_size, 'batch_size_per_device': args.batch_size_per_device,
        'crops': f"2x{args.global_crops_size} + {args.local_crops_number}x{args.local_crops_size}", 'data': data,
        'steps': args.steps, 'images_per_s': images / seconds, 'data_wait_share': waiting / seconds,
        'step_images_per_s': images / step_seconds, 'ratio_to_step': step_seconds / seconds,
    }


def time_training_loop(args, device, step):
    """Seconds of the timed iterations of main_dino's loop (next batch from the DataLoader, views on the
    device, train_step, the loss read), and of them the seconds spent waiting for the batch."""
    batches = loader_batches(main_dino.build_data_loader(args))
    seconds = waiting = 0.
    for it in range(args.warmup_steps + args.steps):  # the warm-up also starts the workers
        start = time.perf_counter()
        images, _, _ = next(batches)
        fetched = time.perf_counter()
        step(it, main_dino.views_on_device(images, args, device)).item()
        if it >= args.warmup_steps:
            seconds += time.perf_counter() - start
            waiting += fetched - start
    batches.close()  # stops the workers
    return seconds, waiting


def loader_batches(loader):
    """The loader's batches, epoch after epoch."""
    for epoch in itertools.count():
        loader.sampler.set_epoch(epoch)
        yield from loader


def time_step_alone(args, device, step):
    """Seconds of --steps training steps on fixed crops already on the device (after one untimed step)."""
    images = synthetic_crops(args, device)
    step(0, images).item()
    start = time.perf_counter()
    for it in range(1, args.steps + 1):
        step(it, images).item()
    return time.perf_counter() - start


def time_data_loader(args, root):
    """Images/s of main_dino's DataLoader (the CPU share of --augment_on's path)."""
    args.data_path, args.data_limit = root, None
    loader = main_dino.build_data_loader(args)
    iterator = iter(loader)
    for _ in range(args.warmup_steps):  # also starts the workers
        next(iterator)
    start = time.perf_counter()
    for _ in range(args.steps):
        next(iterator)
    seconds = time.perf_counter() - start
    del iterator  # stops the workers
    return args.steps * args.batch_size_per_device / seconds


def time_per_image(paths, transform, collate=None):
    """Median images/s (wall and CPU time) of decoding and transforming one image; with `collate`, the
    batching of the results counts too, shared out over its images."""
    timer, outputs = StepTimer(), []
    for path in paths:
        with timer:
            outputs.append(transform(imagedata.pil_loader(path)))
    seconds, cpu_seconds = statistics.median(timer.seconds()), statistics.median(timer.cpu_seconds())
    if collate is not None:
        timer = StepTimer()
        with timer:
            collate([(out, -1, '') for out in outputs])
        seconds += timer.seconds()[0] / len(outputs)
        cpu_seconds += timer.cpu_seconds()[0] / len(outputs)
    return {'images_per_s': 1 / seconds, 'images_per_cpu_second': 1 / max(cpu_seconds, 1e-9)}


def time_renders(args, device, paths, cpu, on_device):
    """Images/s of the batched device render (median over batches, on `device`; also per CPU second on a
    CPU; where it runs compiled, the eager render's too), and of today's per-image CPU render of the same
    views (CPU time, one thread; parameters drawn beforehand)."""
    images = [imagedata.pil_loader(path) for path in paths]
    handed = [(on_device(image), -1, '') for image in images]
    sizes = [t.size for t in on_device.transforms()]
    render = time_device_render(args, device, handed, sizes)
    if utils.run_device().type in multicrop.COMPILE_ON:
        render['eager_images_per_s'] = time_device_render(args, device, handed, sizes, False)['images_per_s']
    timer = StepTimer()
    transforms = cpu.transforms()
    for image in images:
        views = [t.sample(image) for t in transforms]
        with timer:
            for t, view in zip(transforms, views):
                t.render(image, view)
    return render, 1 / statistics.median(timer.cpu_seconds())


def time_device_render(args, device, handed, sizes, compiled=True):
    """Images/s of multicrop.render_views on `device` (median over batches; per CPU second too on a CPU)."""
    timer = StepTimer(utils.run_device())
    batch = args.batch_size_per_device
    for i in range(args.warmup_steps + args.steps):
        pixels, params = multicrop.collate_hand_over(handed[i * batch:(i + 1) * batch])[0]
        pixels = pixels.to(device)
        if i < args.warmup_steps:
            multicrop.render_views(pixels, params, sizes, compiled)
            continue
        with timer:
            multicrop.render_views(pixels, params, sizes, compiled)
    render = {'images_per_s': batch / statistics.median(timer.seconds())}
    if not utils.run_device().accelerator:
        render['images_per_cpu_second'] = batch / statistics.median(timer.cpu_seconds())
    return render


def original_augmentation(global_crops_scale, local_crops_scale, local_crops_number, global_crops_size=224,
                          local_crops_size=96):
    """The original DINO's torchvision/PIL multi-crop pipeline, as a list of per-view transforms."""
    from torchvision import transforms
    flip_and_color_jitter = transforms.Compose([
        transforms.RandomHorizontalFlip(p=0.5),
        transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
        transforms.RandomGrayscale(p=0.2),
    ])
    normalize = transforms.Compose([transforms.ToTensor(), transforms.Normalize(utils.IMAGENET_MEAN,
                                                                                utils.IMAGENET_STD)])

    def view(size, scale, *extra):
        crop = transforms.RandomResizedCrop(size, scale=scale, interpolation=transforms.InterpolationMode.BICUBIC)
        return transforms.Compose([crop, flip_and_color_jitter, *extra, normalize])
    return ([view(global_crops_size, global_crops_scale, multicrop.GaussianBlur(1.0)),
             view(global_crops_size, global_crops_scale, multicrop.GaussianBlur(0.1), multicrop.Solarization(0.2))]
            + [view(local_crops_size, local_crops_scale, multicrop.GaussianBlur(p=0.5))] * local_crops_number)


def write_test_jpegs(root, count, args):
    """Photograph-like JPEGs (smooth colour fields, shapes, sensor noise) at ImageNet quality."""
    folder = os.path.join(root, 'images')
    os.makedirs(folder)
    side = max(args.image_width, args.image_height)
    shapes = imagedata.SyntheticShapes('train', length=count, image_size=side, seed=args.seed)
    paths = [os.path.join(folder, f'{i:05d}.jpg') for i in range(count)]
    for i, path in enumerate(paths):
        shapes.render(i).resize((args.image_width, args.image_height), Image.BILINEAR).save(path, quality=90)
    return paths


def print_report(result):
    if result['mode'] == 'train':
        print(f"training loop, {result['arch']}/{result['patch_size']} on {result['device']}, views rendered on "
              f"{result['augment_on']}, {result['num_workers']} loader worker(s), {result['batch_size_per_device']} "
              f"images/step, crops {result['crops']}, data: {result['data']}")
        print(f"  end to end: {result['images_per_s']:.1f} images/s over {result['steps']} steps, "
              f"{100 * result['data_wait_share']:.0f}% of the time waiting for data")
        print(f"  step alone (fixed crops on the device): {result['step_images_per_s']:.1f} images/s; "
              f"end to end is {result['ratio_to_step']:.2f}x of it")
        print(f"  limited by {training_limit(result)}")
        return
    if result['mode'] == 'data':
        print(f"data pipeline, {result['crops']} crops of {result['image_size'][0]}x{result['image_size'][1]} JPEGs")
        print(f"  DataLoader (--augment_on {result['augment_on']}), {result['num_workers']} worker(s): "
              f"{result['images_per_s']:.1f} images/s ({result['images_per_s_per_worker']:.1f} per worker)")
        print("  CPU share per image, one thread (decode included):")
        for name, share in result['cpu_share'].items():
            print(f"    {name:12s}: {share['images_per_s']:7.1f} images/s, {share['images_per_cpu_second']:7.1f} "
                  "per CPU second")
        share = result['device_share']
        print(f"  device share of --augment_on device (batched render on {result['device']}): "
              f"{share['images_per_s']:.1f} images/s" + (f", {share['images_per_cpu_second']:.1f} per CPU second"
                                                         if 'images_per_cpu_second' in share else '')
              + (f" (compiled; eager: {share['eager_images_per_s']:.1f})" if 'eager_images_per_s' in share else ''))
        print(f"  today's per-image CPU render alone (draws and decode excluded): "
              f"{result['cpu_render_only_images_per_cpu_second']:.1f} images per CPU second")
        return
    print(f"{result['arch']}/{result['patch_size']} on {result['device']} ({result['dtype']}, "
          f"views rendered on {result['augment_on']}, "
          f"{result['threads']} threads), {result['batch_size_per_device'] * result['accum_steps']} images/step, "
          f"crops {result['crops']}, "
          f"out_dim {result['out_dim']}")
    if result['accum_steps'] > 1 or result['grad_checkpointing']:
        print(f"  {result['accum_steps']} micro-batch(es) of {result['batch_size_per_device']} images per step, "
              f"activation checkpointing {'on' if result['grad_checkpointing'] else 'off'}")
    print(f"  images/s (median of {result['steps']} steps): {result['images_per_s']:.2f}")
    print(f"  seconds/step: {result['seconds_per_step']:.3f}")
    print(f"  model GFLOP/image: {result['flops_per_image'] / 1e9:.2f}")
    print(f"  matmul peak ({result['dtype']}, measured): {result['matmul_peak_flops_per_s'] / 1e9:.1f} GFLOP/s")
    print(f"  achieved: {result['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s, MFU {100 * result['mfu']:.1f}%")
    if 'mfu_by_cpu_time' in result:
        print(f"  CPU seconds/step: {result['cpu_seconds_per_step']:.3f}, "
              f"MFU by CPU time: {100 * result['mfu_by_cpu_time']:.1f}% (ignores time taken by other processes)")
    print(f"  peak memory: {result['peak_memory_mb']:.0f} MiB ({result['memory_measure']})")
    if result['compile']:
        compile_seconds = 'not measured (--warmup_steps 0)' if result['compile_seconds'] is None else \
            f"{result['compile_seconds']:.1f} s (first step {result['first_step_seconds']:.1f} s)"
        print(f"  training step compiled (--compile true): compilation {compile_seconds}")
    else:
        print("  training step eager (--compile false)")
    if result.get('device_busy_fraction') is not None:
        print(f"  GPU busy {100 * result['device_busy_fraction']:.0f}% of a step (kernel time, profiled steps)")


def training_limit(result):
    """What sets the speed of the training loop, by its figures."""
    if result['data_wait_share'] > 0.1:
        return "data loading: more --num_workers (cores), or the other --augment_on"
    if result['ratio_to_step'] >= 0.9:
        return "the step"
    render = result['augment_on'] == 'device'
    if not utils.run_device().accelerator:
        return "the CPU time the loader's processes take from the step" + (", and the render" if render else "")
    return "the render on the device" if render else "moving the views to the device"


def check_args(args):
    main_dino.check_numbers(args)
    utils.check_at_least(args, 1, 'steps', 'image_width', 'image_height')
    utils.check_at_least(args, 0, 'warmup_steps', 'profile_steps')


# the flags of main_dino's parser that each mode does not read, and why
UNREAD = {
    'step': ("in --mode step (it times training steps on crops made in memory, at the schedules' steady state, "
             "and writes nothing)",
             ['data_path', 'data_limit', 'strict_data', 'num_workers', 'output_dir', 'saveckp_freq',
              'saveckp_every_iters', 'epochs', 'warmup_epochs', 'warmup_teacher_temp_epochs', 'warmup_teacher_temp',
              'freeze_last_layer', 'collapse_window', 'collapse_margin', 'image_width', 'image_height',
              'init_weights', 'init_heads']),
    'data': ("in --mode data (it times the data pipeline on JPEGs it writes to a temporary folder, and builds no "
             "model)",
             ['data_path', 'data_limit', 'output_dir', 'saveckp_freq', 'saveckp_every_iters', 'collapse_window',
              'collapse_margin', 'arch', 'patch_size', 'out_dim', 'norm_last_layer', 'momentum_teacher',
              'use_bn_in_head', 'warmup_teacher_temp', 'teacher_temp', 'warmup_teacher_temp_epochs', 'use_fp16',
              'weight_decay', 'weight_decay_end', 'clip_grad', 'epochs', 'freeze_last_layer', 'lr', 'warmup_epochs',
              'min_lr', 'optimizer', 'drop_path_rate', 'autocast', 'profile_steps',
              'compile', 'init_weights', 'init_heads', 'accum_steps', 'grad_checkpointing']),
    'train': ("in --mode train (it times training iterations at the schedules' steady state, and writes nothing)",
              ['output_dir', 'saveckp_freq', 'saveckp_every_iters', 'epochs', 'warmup_epochs',
               'warmup_teacher_temp_epochs', 'warmup_teacher_temp', 'freeze_last_layer', 'collapse_window',
               'collapse_margin', 'profile_steps', 'init_weights', 'init_heads']),
}


def unread_flags(args):
    why, names = UNREAD[args.mode]
    unread = {**main_dino.unread_flags(args), **dict.fromkeys(names, why)}
    if args.mode == 'train' and args.data_path is not None:
        unread.update(dict.fromkeys(['image_width', 'image_height'], 'with --data_path (its images are timed)'))
    return unread


def main(argv=None):
    args = utils.parse_checked_args(get_args_parser(), check_args, argv, unread_flags)
    result = {'step': benchmark_step, 'data': benchmark_data, 'train': benchmark_train}[args.mode](args)
    if args.json:
        print(json.dumps(result))
    else:
        print_report(result)


if __name__ == '__main__':
    main()
