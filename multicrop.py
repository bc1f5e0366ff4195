"""DINO's multi-crop training augmentation: the random draws of every view, the CPU render of the views
(--augment_on cpu) and their hand-over to the render on the device (--augment_on device), and the original's PIL
GaussianBlur/Solarization. Used by main_dino and benchmark."""
import functools
import itertools
import math
import random
from typing import NamedTuple

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter, ImageOps

import utils


class GaussianBlur:
    """Blur a PIL image with probability p, radius drawn uniformly in [radius_min, radius_max]."""

    def __init__(self, p=0.5, radius_min=0.1, radius_max=2.):
        self.prob = p
        self.radius_min = radius_min
        self.radius_max = radius_max

    def __call__(self, img):
        if random.random() > self.prob:
            return img
        return img.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.radius_min, self.radius_max)))


class Solarization:
    """Solarize a PIL image (invert pixels >= 128) with probability p."""

    def __init__(self, p):
        self.p = p

    def __call__(self, img):
        return ImageOps.solarize(img) if random.random() < self.p else img


class CropParams(NamedTuple):
    """Random choices of one augmented view (see DinoCropTransform)."""
    box: tuple          # top, left, height, width of the region of the image
    flip: bool
    jitter: tuple       # (operation, factor) pairs in the order applied; empty when not applied
    grayscale: bool
    blur_radius: float  # 0. when not blurred
    solarize: bool


class DinoCropTransform:
    """One view of DINO's multi-crop augmentation: crop, flip, colour jitter, grayscale, blur, solarise.

    The random choices are those of the original torchvision/PIL pipeline, drawn by torchvision's own
    samplers in the same order from the same generators (torch, then Python's `random` for blur and
    solarisation), so a given seed picks the same views. The region is resized with PIL's bicubic
    filter as before; the colour operations then run with NumPy/OpenCV on float pixels, clipped to
    [0, 255] after every step as PIL's 8-bit images are. The blur is a true Gaussian (PIL
    approximates one with box filters) of the same standard deviation.
    """
    JITTER_OPS = ('brightness', 'contrast', 'saturation', 'hue')
    MEAN = np.array(utils.IMAGENET_MEAN, dtype=np.float32)
    STD = np.array(utils.IMAGENET_STD, dtype=np.float32)

    def __init__(self, size, scale, blur_p, solarize_p=0., flip_p=0.5, jitter_p=0.8, grayscale_p=0.2,
                 blur_radius=(0.1, 2.), ratio=(3. / 4., 4. / 3.)):
        from torchvision import transforms
        self.size, self.scale, self.ratio = size, tuple(scale), ratio
        self.flip_p, self.jitter_p, self.grayscale_p = flip_p, jitter_p, grayscale_p
        self.blur_p, self.blur_radius, self.solarize_p = blur_p, blur_radius, solarize_p
        self.crop_sampler = transforms.RandomResizedCrop.get_params
        self.jitter = transforms.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)
        cv2.setNumThreads(1)  # one core per DataLoader worker (forked workers inherit this), as torch does

    def __call__(self, image):
        return self.render(image, self.sample(image))

    def sample(self, image):
        """Draw the view's parameters for a PIL image."""
        box = tuple(self.crop_sampler(image, self.scale, self.ratio))
        flip = bool(torch.rand(1) < self.flip_p)
        jitter = ()
        if not self.jitter_p < torch.rand(1):
            order, *factors = self.jitter.get_params(self.jitter.brightness, self.jitter.contrast,
                                                     self.jitter.saturation, self.jitter.hue)
            jitter = tuple((self.JITTER_OPS[i], float(factors[i])) for i in order.tolist())
        grayscale = bool(torch.rand(1) < self.grayscale_p)
        blur_radius = random.uniform(*self.blur_radius) if not random.random() > self.blur_p else 0.
        solarize = self.solarize_p > 0 and random.random() < self.solarize_p
        return CropParams(box, flip, jitter, grayscale, blur_radius, solarize)

    def render(self, image, params):
        """The normalised (3, size, size) float tensor of the view `params` of a PIL image."""
        top, left, height, width = params.box
        crop = image.resize((self.size, self.size), Image.BICUBIC, box=(left, top, left + width, top + height))
        if params.flip:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        return self.finish(np.asarray(crop, dtype=np.float32), params)

    @classmethod
    def finish(cls, x, params, out=None):
        """The colour operations, grayscale, blur, solarisation and normalisation of a resized view: a
        float32 (H, W, 3) array of whole levels in [0, 255], changed in place. Returns `out` (3, H, W)."""
        for op, factor in params.jitter:
            x = getattr(cls, op)(x, factor)
        if params.grayscale:
            x = cv2.cvtColor(cv2.cvtColor(x, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
        if params.blur_radius:
            x = cv2.GaussianBlur(x, (0, 0), params.blur_radius, borderType=cv2.BORDER_REPLICATE)
        if params.solarize:
            x = np.where(x >= 128, 255. - x, x)
        return cls.normalize(x, out)

    # Colour operations work in place on float32 (H, W, 3) arrays of values in [0, 255]. The blends
    # end like PIL's: clipped to [0, 255] and truncated to whole levels.
    @staticmethod
    def brightness(x, factor):
        np.multiply(x, factor, out=x)
        np.minimum(x, 255., out=x)
        return np.floor(x, out=x)

    @staticmethod
    def contrast(x, factor):
        mean = int(cv2.cvtColor(x, cv2.COLOR_RGB2GRAY).mean() + 0.5)  # PIL blends with the rounded mean
        x = cv2.addWeighted(x, factor, x, 0., mean * (1. - factor), dst=x)
        np.clip(x, 0., 255., out=x)
        return np.floor(x, out=x)

    @staticmethod
    def saturation(x, factor):
        gray = cv2.cvtColor(cv2.cvtColor(x, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)
        x = cv2.addWeighted(x, factor, gray, 1. - factor, 0., dst=x)
        np.clip(x, 0., 255., out=x)
        return np.floor(x, out=x)

    @staticmethod
    def hue(x, factor):
        hsv = cv2.cvtColor(x, cv2.COLOR_RGB2HSV)  # hue in degrees, [0, 360)
        # shifted into [0, 720): OpenCV's way back wraps hues above 360 (not negative ones)
        cv2.add(hsv, (factor * 360. + 360., 0., 0., 0.), dst=hsv)
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB, dst=x)

    @classmethod
    def normalize(cls, x, out=None):
        """(x / 255 - mean) / std per channel, as a contiguous (3, H, W) tensor (into `out` if given)."""
        out = torch.empty(3, *x.shape[:2]) if out is None else out
        planes = out.numpy()
        for c in range(3):
            np.multiply(x[..., c], 1. / (255. * cls.STD[c]), out=planes[c])
            planes[c] -= cls.MEAN[c] / cls.STD[c]
        return out


# Multi-crop rendered on the device (--augment_on device). The loader draws every view's parameters
# exactly as DinoCropTransform.sample does and hands over the decoded 8-bit image with the parameters
# packed in one float64 row per view; render_views then renders the views of a batch with batched tensor
# ops. On an accelerator the draws only fill per-view tables (built with NumPy on the host, sent in one
# copy), never choose which operators run: each batch runs the same fixed schedule of about 170 operators
# (no host-device synchronisation, one graph for graph-mode backends): one resize of all views
# (embedding_bag with PIL's bicubic taps), the colour operations on the pixels of all views at once
# (every jitter slot and grayscale applied to every view, with identity parameters where a view skips
# it), then blur, solarisation and normalisation per view size (a grouped convolution). On a CPU device
# the resize is the same (the views of one size at a time, their taps fewer), and each view's colour
# operations, grayscale, blur, solarisation and normalisation then run view by view with
# DinoCropTransform's OpenCV kernels: torch's CPU kernels make a pass over memory per elementwise op (the
# hue shift alone takes 18), OpenCV's one or two, so the batched ops would be slower there than the
# per-image render.
VIEW_FIELDS = ('top', 'left', 'height', 'width', 'image_height', 'image_width', 'flip',
               'order0', 'order1', 'order2', 'order3', 'brightness', 'contrast', 'saturation', 'hue',
               'grayscale', 'blur_radius', 'solarize')
_F = {name: i for i, name in enumerate(VIEW_FIELDS)}
_IDENTITY_FACTORS = (1., 1., 1., 0.)
_GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL and OpenCV use
CPU_RENDER_CHUNK = 8  # images resized together on a CPU device
OPENCV_ON_CPU = True  # False: the accelerators' tensor ops on CPU tensors too (the tests run both)
# device types on which the render's fixed chain after the resize runs compiled (torch.compile with the run
# device's backend, static shapes, fused kernels); with --compile, which HPU lazy mode refuses
COMPILE_ON = ('cuda', 'hpu')


def hand_over(image, views, max_short_side):
    """What the loader passes on for the device render: (uint8 (H, W, 3) tensor, float64 (views, fields)).

    `views` are CropParams drawn on the PIL `image`. An image whose short side exceeds `max_short_side`
    is first shrunk to it (PIL bicubic, antialiased), and the boxes are scaled with it.
    """
    width, height = image.size
    shrink = max_short_side / min(width, height)
    if shrink < 1:
        image = image.resize((max(1, round(width * shrink)), max(1, round(height * shrink))), Image.BICUBIC)
    scale_x, scale_y = image.size[0] / width, image.size[1] / height
    rows = []
    for view in views:
        top, left, box_height, box_width = view.box
        order = [DinoCropTransform.JITTER_OPS.index(op) for op, _ in view.jitter] or [-1] * 4
        factors = list(_IDENTITY_FACTORS)
        for op, factor in view.jitter:
            factors[DinoCropTransform.JITTER_OPS.index(op)] = factor
        rows.append([top * scale_y, left * scale_x, box_height * scale_y, box_width * scale_x,
                     image.size[1], image.size[0], view.flip, *order, *factors, view.grayscale,
                     view.blur_radius, view.solarize])
    return torch.from_numpy(np.asarray(image).copy()), torch.tensor(rows, dtype=torch.float64)


def collate_hand_over(samples):
    """Batch (hand_over result, skipped_index, note) items: images zero-padded to the largest one."""
    height = max(pixels.shape[0] for (pixels, _), _, _ in samples)
    width = max(pixels.shape[1] for (pixels, _), _, _ in samples)
    batch = torch.empty(len(samples), height, width, 3, dtype=torch.uint8)
    for out, ((pixels, _), _, _) in zip(batch, samples):
        out[:pixels.shape[0], :pixels.shape[1]] = pixels
        out[pixels.shape[0]:] = 0
        out[:pixels.shape[0], pixels.shape[1]:] = 0
    params = torch.stack([views for (_, views), _, _ in samples])
    skipped = torch.tensor([index for _, index, _ in samples])
    return (batch, params), skipped, [note for _, _, note in samples]


def unpack_view(row):
    """The CropParams of one packed row (a list of floats), as render_views reads them."""
    f = _F
    order = [int(i) for i in row[f['order0']:f['order3'] + 1] if i >= 0]
    factors = row[f['brightness']:f['hue'] + 1]
    jitter = tuple((DinoCropTransform.JITTER_OPS[i], factors[i]) for i in order)
    return CropParams(tuple(row[:4]), bool(row[f['flip']]), jitter, bool(row[f['grayscale']]),
                      row[f['blur_radius']], bool(row[f['solarize']]))


def render_views(pixels, params, sizes, compiled=True):
    """The normalised views of a handed-over batch, as a list of (B, 3, size, size) tensors, one per view.

    pixels: (B, H, W, 3) uint8 on the device; params: (B, views, fields) float64 on the CPU; sizes:
    the output side of each view. Consecutive views of the same size are resized together. compiled: where the
    run's device type is in COMPILE_ON, run the chain after the resize compiled (False: eager).
    """
    if _opencv_takes(pixels):
        return _render_on_cpu(pixels, params, sizes)
    return _render_batched(pixels, params, sizes, compiled)


def _opencv_takes(x):
    return x.device.type == 'cpu' and OPENCV_ON_CPU


def _render_batched(pixels, params, sizes, compiled):
    """render_views on an accelerator: the same operators for every batch, whatever the draws."""
    batch = len(pixels)
    layout = _layout(batch, tuple(sizes), pixels.device)
    rows = params.numpy()[layout.row_image, layout.row_view]
    resample, taps = _resample_table(rows, layout, pixels.shape)
    resample, colour = _to_device(pixels.device, resample, _colour_table(rows))
    resized = _resize(_columns(pixels), resample, layout, taps)
    if compiled and utils.run_device().type in COMPILE_ON:
        finished = _finish_compiled(resized, colour, layout)
    else:
        finished = _finish(resized, colour, layout)
    return [view for views in finished for view in views.view(batch, -1, *views.shape[1:]).unbind(1)]


def _render_on_cpu(pixels, params, sizes):
    """A few images at a time and the views of one size together (their intermediate images stay small
    enough to reuse memory), each view finished by DinoCropTransform.finish in place, straight into the
    output."""
    outputs = [torch.empty(len(pixels), 3, size, size) for size in sizes]
    for first in range(0, len(pixels), CPU_RENDER_CHUNK):
        images = pixels[first:first + CPU_RENDER_CHUNK]
        columns = _columns(images)
        for start, end in _runs(sizes):
            layout = _layout(len(images), tuple(sizes[start:end]), images.device)
            rows = params[first:first + CPU_RENDER_CHUNK, start:end].numpy()[layout.row_image, layout.row_view]
            resample, taps = _resample_table(rows, layout, images.shape)
            views, = _resize(columns, *_to_device(images.device, resample), layout, taps)
            for r, view in enumerate(_whole_levels(views).numpy()):
                out = outputs[start + layout.row_view[r]][first + layout.row_image[r]]
                DinoCropTransform.finish(view, unpack_view(rows[r].tolist()), out=out)
    return outputs


def _runs(sizes):
    """(start, end) of each run of consecutive views of the same size."""
    start = 0
    for _, run in itertools.groupby(sizes):
        end = start + len(list(run))
        yield start, end
        start = end


def _whole_levels(x):
    return x.clamp_(0, 255).round_()


def _to_device(device, *tables):
    """Dicts of arrays as dicts of float32 tensors on `device`, all sent in one copy."""
    arrays = [a for table in tables for a in table.values()]
    flat = torch.from_numpy(np.concatenate([a.ravel() for a in arrays]).astype(np.float32)).to(device)
    parts = iter(torch.split(flat, [a.size for a in arrays]))
    return [{name: next(parts).view(a.shape) for name, a in table.items()} for table in tables]


class _Group(NamedTuple):
    """A run of views of one size: its rows (image by image, the views of each), its pixels in the
    flattened views ((rows, size, size) in turn) and its output rows among the resampling positions."""
    size: int
    rows: slice
    pixels: slice
    positions: slice


class _Layout(NamedTuple):
    """Where the batched render puts each view; it depends on the batch size and the view sizes only.

    The resampling positions are the output columns of every view, then the output rows of every view.
    Each run of views of one size has its columns start at a multiple of the size, and the columns
    (padding included) are a multiple of every size, so that the second pass reads row y of a view as
    one line of the first pass's transposed output. The colour operations see the pixels of all views as
    blocks of `block` pixels, each of one view.
    """
    groups: tuple
    row_image: np.ndarray       # (V,) the image of each row,
    row_view: np.ndarray        # its view (index in `sizes`)
    row_sizes: np.ndarray       # and its size
    columns: int
    column_offset: np.ndarray   # (V,) first output column of each view
    position_row: torch.Tensor  # (P,) the resampling-table row of each position (V column rows, V row rows)
    half_pixel: torch.Tensor    # (P,) j + 0.5 at output position j of its view
    block: int
    view_of_block: torch.Tensor


@functools.lru_cache(maxsize=8)
def _layout(batch, sizes, device):
    groups, row_image, row_view = [], [], []
    for start, end in _runs(sizes):
        row_image.append(np.repeat(np.arange(batch), end - start))
        row_view.append(np.tile(np.arange(start, end), batch))
        groups.append((sizes[start], (end - start) * batch))
    row_sizes = np.repeat(*zip(*groups))
    views = len(row_sizes)
    starts = np.cumsum(row_sizes) - row_sizes
    view = np.repeat(np.arange(views), row_sizes)  # of each output column (row), in turn
    j = np.arange(len(view)) - starts[view]
    column_offset, columns = _column_offsets(row_sizes, sizes)
    column_row, column_half = np.zeros(columns, np.int64), np.full(columns, .5)  # the padding reads row 0
    column_row[column_offset[view] + j] = view
    column_half[column_offset[view] + j] = j + .5
    block = math.gcd(*(size ** 2 for size in sizes))
    tensor = functools.partial(torch.as_tensor, device=device)
    return _Layout(tuple(_groups(groups, columns)), np.concatenate(row_image), np.concatenate(row_view), row_sizes,
                   columns, column_offset, tensor(np.concatenate([column_row, views + view])),
                   tensor(np.concatenate([column_half, j + .5]), dtype=torch.float),
                   block, tensor(np.repeat(np.arange(views), row_sizes ** 2 // block)))


def _groups(runs, columns):
    """The _Group of each (size, rows) run; the output rows come after the `columns` output columns."""
    row = pixel = position = 0
    for size, rows in runs:
        yield _Group(size, slice(row, row + rows), slice(pixel, pixel + rows * size ** 2),
                     slice(columns + position, columns + position + rows * size))
        row, pixel, position = row + rows, pixel + rows * size ** 2, position + rows * size


def _column_offsets(row_sizes, sizes):
    """The first output column of each view, the views of one size starting at multiples of it, and the
    number of columns, a multiple of every size."""
    offsets, columns = np.empty(len(row_sizes), np.int64), 0
    for row, size in enumerate(row_sizes):
        columns += -columns % size
        offsets[row] = columns
        columns += size
    return offsets, columns + -columns % math.lcm(*sizes)


# --- resize: PIL's antialiased bicubic resampling (a = -0.5, support stretched when shrinking), one axis
# at a time (columns, then rows, rounded to whole levels in between as PIL's 8-bit passes are). Each pass
# is one embedding_bag: an output column (row) is the weighted sum of the input columns (rows) its taps
# read, each a contiguous line. The first pass reads each channel's columns and writes the columns of
# every view, channels interleaved; one 2-D transpose of all of them makes row y of view v one line (its
# pixels with their channels side by side) for the second pass, one per view size, which so writes
# (V, size, size, 3) views. The taps of both passes and all views come from one table of per-view
# parameters; their line indices are computed in float32 (exact below 2 ** 24).
# On a CPU device OpenCV rounds and transposes (torch's transposing copy is a few times slower), and the
# two largest intermediate images reuse memory from call to call (a fresh one costs as much in page
# faults as the work done on it).

def _resample_table(rows, layout, shape):
    """Float64 resampling parameters: 'rows' (2V, 9), of the views' output columns then of their output rows
    (see _bicubic_taps), and 'channel_lines' (C,), the first line of each channel's columns; and the
    number of taps they need. `shape` is the pixels' (B, H, W, C)."""
    f, sizes = _F, layout.row_sizes
    _, height, width, channels = shape
    lines_per_row = layout.columns // sizes  # second-pass lines per line of the transposed first pass
    if max(len(rows) * channels * width, height * lines_per_row.max()) >= 2 ** 24:
        raise ValueError("too many images in one batch for the device render's float32 line indices")
    table = np.concatenate([
        _axis_table(rows[:, f['left']], rows[:, f['width']], rows[:, f['image_width']], sizes, rows[:, f['flip']],
                    1, layout.row_image * channels * width),
        _axis_table(rows[:, f['top']], rows[:, f['height']], rows[:, f['image_height']], sizes, 0, lines_per_row,
                    layout.column_offset // sizes)])
    stretch = np.maximum(rows[:, [f['width'], f['height']]] / sizes[:, None], 1.)
    return {'rows': table, 'channel_lines': np.arange(channels) * width}, int(np.ceil(2 * stretch).max()) * 2 + 1


def _axis_table(start, length, valid, size, flip, line_step, line_offset):
    """Rows of the resampling table along one axis: output j of a view has its taps' centre at
    origin + (j + 0.5) * step in pixel indices (PIL's centre less half a pixel: a mirrored view's output j
    is the unmirrored one's size - 1 - j), reaches back and forth (support - 1, support + 1, PIL's rounding
    included), and reads input line i (below `valid`) as line i * line_step + line_offset of its pass."""
    scale = length / size
    stretch = np.maximum(scale, 1.)
    origin = start - .5 + flip * length
    columns = (origin, np.where(flip, -scale, scale), 2 * stretch - 1, 2 * stretch + 1, 1 / stretch, valid,
               valid - 1, line_step, line_offset)
    return np.stack(np.broadcast_arrays(*columns), axis=1)


def _bicubic_taps(table, layout, taps):
    """Line indices (float) and normalised weights (P, taps) of PIL's bicubic resampling at every position."""
    origin, step, reach_back, reach, inverse_stretch, valid, last, line_step, line_offset = \
        table.index_select(0, layout.position_row).unbind(1)
    center = torch.addcmul(origin, layout.half_pixel, step)
    first = (center - reach_back).trunc_().clamp_(min=0)
    end = torch.minimum((center + reach).trunc_(), valid)
    position = first[:, None] + torch.arange(taps, device=first.device)
    t = (position - center[:, None]).abs_().mul_(inverse_stretch[:, None])
    # PIL's bicubic filter (a = -0.5): 1.5 t^3 - 2.5 t^2 + 1 within one, -0.5 (t - 1)(t - 2)^2 within two
    far = t.clamp(max=2.)
    far = (far - 2.).square_().mul_(1. - far).mul_(.5)
    weight = torch.where(t < 1, t.square().mul_(t * 1.5 - 2.5).add_(1.), far)
    weight = weight.masked_fill_(position >= end[:, None], 0.)
    weight = weight.div_(weight.sum(-1, keepdim=True))
    return torch.addcmul(line_offset[:, None], torch.minimum(position, last[:, None]), line_step[:, None]), weight


def _resize(columns, table, layout, taps):
    """The views resized from the images' columns (_columns), before the last rounding: a (rows, size,
    size, C) float tensor per group."""
    _, channels, _, height = columns.shape
    index, weight = _bicubic_taps(table['rows'], layout, taps)
    first = _weighted_sum((index[:layout.columns, None] + table['channel_lines'][:, None]).long(),
                          weight[:layout.columns, None].expand(-1, channels, -1), columns.view(-1, height))
    lines = _rounded_transpose(first)
    index = index.long()
    return [_weighted_sum(index[g.positions], weight[g.positions], lines.view(-1, g.size * channels))
            .view(-1, g.size, g.size, channels) for g in layout.groups]


def _weighted_sum(index, weight, lines):
    """Row i of the result is the sum over t of weight[i, t] * lines[index[i, t]] (i: all dimensions but
    the last, t: the last)."""
    return F.embedding_bag(index.reshape(-1, index.shape[-1]), lines, mode='sum',
                           per_sample_weights=weight.reshape(-1, weight.shape[-1]))


_CPU_SCRATCH = {}


def _scratch(name, shape):
    """A float CPU tensor of `shape` kept under `name` for the next call (its contents are overwritten)."""
    numel = math.prod(shape)
    if name not in _CPU_SCRATCH or _CPU_SCRATCH[name].numel() < numel:
        _CPU_SCRATCH[name] = torch.empty(numel)
    return _CPU_SCRATCH[name][:numel].view(shape)


def _columns(pixels):
    """The columns of (B, H, W, C) images as floats, (B, C, W, H)."""
    if not _opencv_takes(pixels):
        return pixels.permute(0, 3, 2, 1).to(torch.float, memory_format=torch.contiguous_format)
    batch, height, width, channels = pixels.shape
    columns = _scratch('columns', (batch, channels, width, height))
    for image, out in zip(pixels.numpy(), columns.numpy()):
        for plane, channel in zip(cv2.split(cv2.transpose(image)), out):
            np.copyto(channel, plane)
    return columns


def _rounded_transpose(x):
    """The 2-D x clipped to [0, 255], rounded to whole levels (halves to even) and transposed."""
    if not _opencv_takes(x):
        return _whole_levels(x).t().contiguous()
    levels = torch.from_numpy(cv2.transpose(cv2.add(x.numpy(), 0., dtype=cv2.CV_8U)))  # saturating round
    return _scratch('rows', levels.shape).copy_(levels)


# --- colour, grayscale, blur, solarisation, normalisation: DinoCropTransform.finish on every view at once.
# The jitter runs as a fixed schedule: three blend slots, the hue, three blend slots. A view's operations
# before its hue shift take the first blend slots, those after it the last ones, the others leave it
# unchanged. Brightness, contrast and saturation are one blend, x * f + g * (1 - f) clipped and floored,
# with g = 0, the view's rounded mean gray, or its gray image.

_HUE_SLOT = 3


def _table_columns(**widths):
    """{name: its slice of columns} of a table whose columns hold the named fields of these widths in turn."""
    ends = itertools.accumulate(widths.values())
    return {name: slice(end - width, end) for (name, width), end in zip(widths.items(), ends)}


# the colour parameters read at every pixel: per slot of the schedule the blend's factor, gray weight and
# whether it applies; the hue shift's flag and channel offsets; grayscale's flag
_PER_PIXEL = _table_columns(factor=7, gray_weight=7, active=7, hue=1, hue_offset=3, grayscale=1)


def _colour_table(rows):
    """Float64 arrays of the views' colour parameters: 'per_pixel' (V, 26) (the columns of _PER_PIXEL), read
    at every pixel, and per view the blends' mean weights, blur, solarisation and normalisation."""
    f, views, ops = _F, len(rows), DinoCropTransform.JITTER_OPS
    order = rows[:, f['order0']:f['order3'] + 1].astype(np.int64)  # -1: no jitter
    factors = rows[:, f['brightness']:f['hue'] + 1]
    hue_at = np.argmax(order == ops.index('hue'), axis=1)[:, None]
    slot = np.arange(4)
    slot = np.where(slot < hue_at, slot, slot + _HUE_SLOT - hue_at)
    view, position = np.nonzero((order >= 0) & (order != ops.index('hue')))
    op, slot = order[view, position], slot[view, position]
    factor = factors[view, op]
    pixel = {'factor': np.ones((views, 7)), 'gray_weight': np.zeros((views, 7)), 'active': np.zeros((views, 7))}
    mean_weight = np.zeros((views, 7))
    pixel['factor'][view, slot] = factor
    pixel['gray_weight'][view, slot] = np.where(op == ops.index('saturation'), 1 - factor, 0.)
    mean_weight[view, slot] = np.where(op == ops.index('contrast'), 1 - factor, 0.)
    pixel['active'][view, slot] = 1.
    pixel['hue'] = order[:, :1] >= 0
    # channel c falls as far as the shifted hue is near its opposite, k_c = 3, 5, 1 sixths of a turn
    pixel['hue_offset'] = np.mod(6 * factors[:, 3:] - (3., 5., 1.), 6.)
    pixel['grayscale'] = rows[:, f['grayscale'], None]
    table = {'per_pixel': np.concatenate([pixel[name] for name in _PER_PIXEL], axis=1), 'mean_weight': mean_weight,
             'blur': rows[:, f['blur_radius']] > 0, 'kernel': _blur_kernels(rows[:, f['blur_radius']]).repeat(3, 0),
             'solarize_from': np.where(rows[:, f['solarize']] > 0, 128., np.inf),
             'gray_weights': np.array(_GRAY_WEIGHTS), 'scale': 1 / (255 * np.array(utils.IMAGENET_STD)),
             'shift': -np.array(utils.IMAGENET_MEAN) / utils.IMAGENET_STD}
    return {name: np.asarray(a, dtype=np.float64) for name, a in table.items()}


def _blur_kernels(sigma):
    """(V, taps) Gaussian kernels of OpenCV's size for float images (4 sigma each side), zero-padded to at
    least 17 taps (the largest at sigma 2), so that the taps do not vary from batch to batch; identity where
    sigma is 0."""
    half = (np.floor(sigma * 8 + 1.5).astype(np.int64) | 1) // 2
    offsets = np.arange(-max(8, half.max()), max(8, half.max()) + 1)
    safe_sigma = np.where(sigma > 0, sigma, 1.)[:, None]
    kernel = np.where(np.abs(offsets) <= half[:, None], np.exp(-offsets ** 2 / (2 * safe_sigma ** 2)), 0.)
    return kernel / kernel.sum(1, keepdims=True)


def _finish(resized, table, layout):
    """DinoCropTransform.finish of every resized view (a list of (rows, size, size, 3) per group, not yet
    rounded to whole levels): (rows, 3, size, size) per group."""
    x = _whole_levels(torch.cat([views.flatten() for views in resized]))
    x = _colour(x.view(-1, layout.block, 3), table, layout).flatten()
    return [_blur_solarize_normalize(x[g.pixels.start * 3:g.pixels.stop * 3].view(-1, g.size, g.size, 3), table,
                                     g.rows) for g in layout.groups]


def _finish_compiled(resized, table, layout):
    """_finish compiled (once per batch shape); eager for the rest of the process if compiling fails."""
    global COMPILE_ON
    try:
        return _compiled_finish(utils.run_device().compile_backend)(resized, table, layout)
    except Exception as exc:  # noqa: BLE001 (a compiler's failure must not stop a training run)
        device_type = utils.run_device().type
        COMPILE_ON = tuple(t for t in COMPILE_ON if t != device_type)
        utils.warn(f"the multi-crop render runs eager on {device_type}: torch.compile failed "
                   f"({type(exc).__name__}: {(str(exc).splitlines() or [''])[0]})")
        return _finish(resized, table, layout)


@functools.cache
def _compiled_finish(backend):
    return torch.compile(_finish, dynamic=False, backend=backend)


def _colour(x, table, layout):
    """The jitter schedule, then grayscale, on x (blocks, block pixels, 3) whole levels (each block of one view)."""
    per_pixel = table['per_pixel'].index_select(0, layout.view_of_block)[:, None]

    def column(name, i=0, width=1):
        at = _PER_PIXEL[name].start + i
        return per_pixel[..., at:at + width]

    for slot in range(7):
        if slot == _HUE_SLOT:
            x = torch.lerp(x, _hue(x, column('hue_offset', width=3)), column('hue'))
            continue
        gray = _gray(x, table['gray_weights'])
        mean = _view_means(gray, layout).add_(.5).floor_()  # PIL blends with the rounded mean
        mean = (mean * table['mean_weight'][:, slot]).index_select(0, layout.view_of_block)
        blend = torch.addcmul(mean[:, None, None], x, column('factor', slot))
        blend = blend.addcmul_(gray, column('gray_weight', slot)).clamp_(0., 255.).floor_()
        # after the hue shift levels are not whole: a slot a view skips must not floor them
        x = blend if slot < _HUE_SLOT else torch.lerp(x, blend, column('active', slot))
    return torch.lerp(x, _gray(x, table['gray_weights']), column('grayscale'))


def _gray(x, weights):
    return (x * weights).sum(-1, keepdim=True)


def _view_means(gray, layout):
    flat = gray.view(-1)
    return torch.cat([flat[g.pixels].view(g.rows.stop - g.rows.start, -1).mean(1) for g in layout.groups])


def _hue(x, offsets):
    """Shift the hue of (..., 3) pixels through HSV as OpenCV's float conversions do (not rounded); offsets:
    (the shift - k_c) mod 6 of each channel c, in sixths of a turn."""
    value, largest = x.max(-1, keepdim=True)
    spread = value - x.amin(-1, keepdim=True)
    # hue: twice the index of the largest channel plus (the next channel - the one after) / spread (grey
    # pixels have spread 0, so any finite hue will do)
    following = x.roll(-1, -1)
    within = (following - following.roll(-1, -1)).gather(-1, largest)
    hue = torch.addcmul(largest * 2., within, spread.clamp(min=1e-30).reciprocal_())
    # HSV to RGB without branches: channel c falls by the spread as far as the shifted hue is within one
    # sixth of a turn of k_c, less as it is within two
    distance = (hue + offsets).remainder_(6.).sub_(3.).abs_().clamp_(1., 2.)
    return torch.addcmul(value + spread, spread, distance, value=-1.)


def _blur_solarize_normalize(x, table, rows):
    """Blur (as OpenCV's on float images: edges replicated), solarisation and normalisation of the views
    `rows` (a slice of the table's rows): x (V, size, size, 3) to (V, 3, size, size). Every view goes through
    one grouped convolution per axis with its own kernel; the unblurred keep their pixels."""
    views, size, _, channels = x.shape
    kernel = table['kernel'][rows.start * channels:rows.stop * channels]
    planes = x.permute(0, 3, 1, 2).contiguous()
    half = kernel.shape[1] // 2
    blurred = F.pad(planes.view(1, -1, size, size), (half,) * 4, mode='replicate')
    blurred = F.conv2d(blurred, kernel[:, None, None], groups=views * channels)
    blurred = F.conv2d(blurred, kernel[:, None, :, None], groups=views * channels)
    x = torch.lerp(planes, blurred.view_as(planes), table['blur'][rows, None, None, None])
    x = torch.where(x >= table['solarize_from'][rows, None, None, None], 255. - x, x)
    return torch.addcmul(table['shift'][:, None, None], x, table['scale'][:, None, None])
