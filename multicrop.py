"""DINO's multi-crop training augmentation: the random draws of every view, the CPU render of the views
(--augment_on cpu) and their hand-over to the render on the device (--augment_on device), and the original's PIL
GaussianBlur/Solarization. Used by main_dino and benchmark."""
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
# packed in one float64 row per view; render_views then resizes all views of one size at once with
# batched tensor ops (embedding_bag for PIL's bicubic taps). On an accelerator the colour operations,
# grayscale, blur, solarisation and normalisation follow as batched tensor ops too (index_select, grouped
# convolutions, elementwise ops). On a CPU device they run view by view with DinoCropTransform's OpenCV
# kernels instead: torch's CPU kernels make a pass over memory per elementwise op (the hue shift alone
# takes 25), OpenCV's one or two, so the batched ops would be slower there than the per-image render.
# The parameters stay on the CPU, so that what decides shapes (tap counts, which views take which
# operation) is known without waiting for the device.
VIEW_FIELDS = ('top', 'left', 'height', 'width', 'image_height', 'image_width', 'flip',
               'order0', 'order1', 'order2', 'order3', 'brightness', 'contrast', 'saturation', 'hue',
               'grayscale', 'blur_radius', 'solarize')
_F = {name: i for i, name in enumerate(VIEW_FIELDS)}
_IDENTITY_FACTORS = (1., 1., 1., 0.)
_GRAY_WEIGHTS = (0.299, 0.587, 0.114)  # ITU-R 601-2 luma, as PIL and OpenCV use
CPU_RENDER_CHUNK = 8  # images resized together on a CPU device
OPENCV_ON_CPU = True  # False: the accelerators' tensor ops on CPU tensors too (the tests run both)


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


def render_views(pixels, params, sizes):
    """The normalised views of a handed-over batch, as a list of (B, 3, size, size) tensors, one per view.

    pixels: (B, H, W, 3) uint8 on the device; params: (B, views, fields) float64 on the CPU; sizes:
    the output side of each view. Consecutive views of the same size are resized together.
    """
    if _opencv_takes(pixels):
        return _render_on_cpu(pixels, params, sizes)
    return _render_batched(pixels, params, sizes)


def _opencv_takes(x):
    return x.device.type == 'cpu' and OPENCV_ON_CPU


def _render_batched(pixels, params, sizes):
    """render_views on an accelerator: every step batched over all views of one size."""
    columns = _columns(pixels)
    views = []
    for start, end, group in _size_groups(params, sizes):
        out = _render_group(columns, group, sizes[start])
        views += list(out.view(len(pixels), end - start, *out.shape[1:]).unbind(1))
    return views


def _render_on_cpu(pixels, params, sizes):
    """A few images at a time (their intermediate images stay small enough to reuse memory), each view
    finished by DinoCropTransform.finish in place, straight into the output."""
    outputs = [torch.empty(len(pixels), 3, size, size) for size in sizes]
    for first in range(0, len(pixels), CPU_RENDER_CHUNK):
        chunk = slice(first, first + CPU_RENDER_CHUNK)
        columns = _columns(pixels[chunk])
        for start, end, group in _size_groups(params[chunk], sizes):
            resized = _resize_views(columns, group, group.float(), sizes[start]).numpy()
            for v, row in enumerate(group.tolist()):
                image, view = divmod(v, end - start)
                DinoCropTransform.finish(resized[v], unpack_view(row), out=outputs[start + view][first + image])
    return outputs


def _size_groups(params, sizes):
    """(start, end, their rows (B * views, fields)) of each run of consecutive views of the same size."""
    start = 0
    for _, run in itertools.groupby(sizes):
        end = start + len(list(run))
        yield start, end, params[:, start:end].reshape(-1, params.shape[-1])
        start = end


def _render_group(columns, params, size):
    """(V, 3, size, size) normalised views; params: (V, fields) float64 on the CPU, V = B * views."""
    device = columns.device
    host = params
    params = params.to(device=device, dtype=torch.float32)
    x = _resize_views(columns, host, params, size).permute(0, 3, 1, 2).contiguous()
    x = _jitter(x, host, params)
    gray = host[:, _F['grayscale']].nonzero().flatten().to(device)
    if len(gray):
        x.index_copy_(0, gray, _gray(x.index_select(0, gray)).expand(-1, 3, -1, -1).contiguous())
    x = _blur(x, host, params)
    solarize = host[:, _F['solarize']].nonzero().flatten().to(device)
    if len(solarize):
        views = x.index_select(0, solarize)
        x.index_copy_(0, solarize, torch.where(views >= 128, 255. - views, views))
    mean = torch.tensor(utils.IMAGENET_MEAN, device=device)[:, None, None]
    std = torch.tensor(utils.IMAGENET_STD, device=device)[:, None, None]
    return x.mul_(1. / (255. * std)).sub_(mean / std)


# --- resize: PIL's antialiased bicubic resampling (a = -0.5, support stretched when shrinking), one axis
# at a time (columns, then rows, rounded to whole levels in between as PIL's 8-bit passes are). Each pass
# is one embedding_bag: an output column (row) is the weighted sum of the input columns (rows) its taps
# read, each a contiguous vector. The first pass reads each channel's columns and writes each view's
# columns, channels interleaved; one 2-D transpose of all of them makes row y of view v one line (its
# pixels with their channels side by side) for the second pass, which so writes (H, W, 3) views.
# On a CPU device OpenCV rounds and transposes (torch's transposing copy is a few times slower), and the
# two largest intermediate images reuse memory from call to call (a fresh one costs as much in page
# faults as the work done on it).

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
        return x.clamp_(0, 255).round_().t().contiguous()
    levels = torch.from_numpy(cv2.transpose(cv2.add(x.numpy(), 0., dtype=cv2.CV_8U)))  # saturating round
    return _scratch('rows', levels.shape).copy_(levels)


def _resize_views(columns, host, params, size):
    """columns: the images' columns, (B, C, W, H) floats; host: (V, fields) float64 rows on the CPU, the
    views of each image in turn; params: the same as float32 on the device. Returns the resized views
    (V, size, size, C) in whole levels."""
    f = _F
    batch, channels, width, height = columns.shape
    device = columns.device
    views = len(params)
    flip = params[:, f['flip']] > 0
    image_of_view = torch.arange(batch, device=device).repeat_interleave(views // batch)
    first = (image_of_view[:, None, None] * channels + torch.arange(channels, device=device)) * width
    out = _resample(columns.view(-1, height), first, 1, host[:, f['width']],
                    params[:, [f['left'], f['width'], f['image_width']]], size, flip)
    rows = _rounded_transpose(out)  # (H, V * size * C): line y * V + v is row y of view v
    first = torch.arange(views, device=device)[:, None, None]
    out = _resample(rows.view(-1, size * channels), first, views, host[:, f['height']],
                    params[:, [f['top'], f['height'], f['image_height']]], size, None)
    return out.clamp_(0, 255).round_().view(views, size, size, channels)


def _resample(lines, first_line, step, host_length, box, size, flip):
    """Resample box v = (start, length, valid length) to `size` outputs, reading line i of the box of
    view v, channel c at lines[first_line[v, 0, c] + i * step] (first_line (V, 1, C), or (V, 1, 1) when a
    line holds all channels). Returns the outputs in the order (view, output, channel)."""
    taps = int(torch.ceil(2. * (host_length / size).clamp(min=1.)).max()) * 2 + 1
    index, weight = _bicubic_taps(box[:, 0], box[:, 1], box[:, 2], size, taps, flip)
    index = index[:, :, None] * step + first_line[..., None]
    weight = weight[:, :, None].expand(index.shape)
    return F.embedding_bag(index.reshape(-1, taps), lines, per_sample_weights=weight.reshape(-1, taps),
                           mode='sum')


def _bicubic_taps(start, length, valid, size, taps, flip=None):
    """Input indices and normalised weights (V, size, taps) of PIL's bicubic resampling of [start, start+length)."""
    device = start.device
    scale = length / size
    stretch = scale.clamp(min=1.)
    support = 2. * stretch
    center = start[:, None] + (torch.arange(size, device=device) + 0.5) * scale[:, None]
    first = (center - support[:, None] + 0.5).trunc().clamp(min=0)
    end = torch.minimum((center + support[:, None] + 0.5).trunc(), valid[:, None])
    position = first[..., None] + torch.arange(taps, device=device)
    t = ((position - center[..., None] + 0.5) / stretch[:, None, None]).abs()
    a = -0.5
    weight = torch.where(t < 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                         torch.where(t < 2, (((t - 5) * t + 8) * t - 4) * a, 0.))
    weight = torch.where(position < end[..., None], weight, 0.)
    weight = weight / weight.sum(-1, keepdim=True)
    index = torch.minimum(position, valid[:, None, None] - 1).long()
    if flip is not None:  # a mirrored view reads its outputs in reverse order
        index = torch.where(flip[:, None, None], index.flip(1), index)
        weight = torch.where(flip[:, None, None], weight.flip(1), weight)
    return index, weight


# --- colour: DinoCropTransform's operations on (V, 3, H, W) batches of values in [0, 255]

def _gray(x):
    r, g, b = x.unbind(1)
    return (_GRAY_WEIGHTS[0] * r + _GRAY_WEIGHTS[1] * g + _GRAY_WEIGHTS[2] * b)[:, None]


def _jitter(x, host, params):
    """The four jitter operations in each view's own order (positions 0..3; views without jitter skip)."""
    f = _F
    for position in range(4):
        order = host[:, f[f'order{position}']]
        for op, name in enumerate(DinoCropTransform.JITTER_OPS):
            chosen = (order == op).nonzero().flatten().to(x.device)
            if len(chosen):
                factor = params.index_select(0, chosen)[:, f[name], None, None, None]
                x.index_copy_(0, chosen, _JITTER[name](x.index_select(0, chosen), factor))
    return x


def _brightness(x, factor):  # the jitter operations work in place on the views selected for them
    return x.mul_(factor).clamp_(max=255.).floor_()


def _contrast(x, factor):
    mean = (_gray(x).mean(dim=(1, 2, 3), keepdim=True) + 0.5).floor()  # PIL blends with the rounded mean
    return x.mul_(factor).add_(mean * (1. - factor)).clamp_(0., 255.).floor_()


def _saturation(x, factor):
    gray = _gray(x).mul_(1. - factor)
    return x.mul_(factor).add_(gray).clamp_(0., 255.).floor_()


def _hue(x, factor):
    """Shift the hue by factor turns through HSV, as OpenCV's float conversions do (not rounded)."""
    r, g, b = x.unbind(1)
    value = x.amax(1)
    spread = value - x.amin(1)
    # hue in sixths of a turn: the sector of the largest channel plus the position within it (grey
    # pixels have spread 0, so any finite hue will do)
    is_r, is_g = value == r, value == g
    sector = torch.where(is_g, 2., 4.).masked_fill_(is_r, 0.)
    within = torch.where(is_r, g - b, torch.where(is_g, b - r, r - g))
    hue = torch.addcmul(sector, within, spread.clamp(min=1e-30).reciprocal_())
    hue = hue.add_(factor[:, 0] * 6.).remainder_(6.)[:, None]
    # HSV to RGB without branches: channel R, G, B falls by the spread as far as the hue is within one
    # sixth of a turn of its opposite (3, 5, 1), less as the hue is within two sixths of it
    distance = (hue - torch.tensor([3., 5., 1.], device=x.device)[:, None, None]).abs_().sub_(3.).abs_()
    return torch.addcmul((value + spread)[:, None], spread[:, None], distance.clamp_(1., 2.), value=-1.)


_JITTER = {'brightness': _brightness, 'contrast': _contrast, 'saturation': _saturation, 'hue': _hue}


def _blur(x, host, params):
    """Gaussian blur of the views with a radius, as OpenCV's on float images: 4 sigma each side, edges
    replicated; one grouped convolution per axis with each view's kernel zero-padded to the largest."""
    chosen = (host[:, _F['blur_radius']] > 0).nonzero().flatten()
    if not len(chosen):
        return x
    sigma_host = host[chosen, _F['blur_radius']]
    half = int(((sigma_host * 8 + 1 + 0.5).floor().long() | 1).max()) // 2
    chosen = chosen.to(x.device)
    sigma = params.index_select(0, chosen)[:, _F['blur_radius'], None]
    own_half = (torch.floor(sigma * 8 + 1 + 0.5).long() | 1) // 2
    offsets = torch.arange(-half, half + 1, device=x.device)
    kernel = torch.where(offsets.abs() <= own_half, torch.exp(-offsets ** 2 / (2 * sigma ** 2)), 0.)
    kernel = (kernel / kernel.sum(-1, keepdim=True)).repeat_interleave(3, dim=0)  # (views*3, taps)
    views = x.index_select(0, chosen)
    n, c, height, width = views.shape
    planes = F.pad(views.reshape(1, n * c, height, width), (half, half, half, half), mode='replicate')
    planes = F.conv2d(planes, kernel[:, None, None, :], groups=n * c)
    planes = F.conv2d(planes, kernel[:, None, :, None], groups=n * c)
    return x.index_copy_(0, chosen, planes.view(n, c, height, width))
