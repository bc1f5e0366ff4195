"""Image data of training and evaluation: the built-in synthetic shapes and Fashion-MNIST, image folders and list
files (the tree scan), PIL loading, resumable seeded sampling, and the unreadable images a run skips. Used by every
script."""
import contextlib
import gzip
import os
import random

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFile, UnidentifiedImageError

import utils


def limit_dataset(dataset, limit):
    """A fixed, class-balanced-in-expectation subset of `limit` samples (every sample if limit is None; a
    limit above the dataset's size is said in a warning)."""
    if limit is not None and limit > len(dataset):
        utils.warn(f"--data_limit {limit} is more than the {len(dataset)} images there are: all {len(dataset)} "
                   "are used")
    if limit is None or limit >= len(dataset):
        return dataset
    if limit <= 0:
        utils.fail(f"--data_limit must be positive, got {limit}")
    generator = torch.Generator().manual_seed(0)
    indices = torch.randperm(len(dataset), generator=generator)[:limit].sort().values.tolist()
    return torch.utils.data.Subset(dataset, indices)


class SyntheticShapes(torch.utils.data.Dataset):
    """Procedural labelled images: one shape class per label, drawn on textured backgrounds.

    Every image is generated on the fly from (seed, split, index), so the dataset is deterministic,
    needs no download and comes at any size. Colours, position, size and rotation are random for
    every class alike, so only the shape tells the classes apart.
    """
    SHAPES = ['disk', 'square', 'triangle', 'cross', 'ring', 'star', 'bar', 'hexagon', 'crescent', 'dots']
    SPLIT_LENGTHS = {'train': 2000, 'val': 500}

    def __init__(self, split='train', length=None, image_size=224, seed=0, transform=None):
        if split not in self.SPLIT_LENGTHS:
            utils.fail(f"unknown synthetic split {split}; use train or val")
        self.split, self.image_size, self.seed, self.transform = split, image_size, seed, transform
        self.length = length or self.SPLIT_LENGTHS[split]
        self.classes = list(self.SHAPES)
        self.targets = [i % len(self.SHAPES) for i in range(self.length)]

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        img = self.render(index)
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]

    def render(self, index):
        rng = np.random.default_rng([self.seed, 1 if self.split == 'val' else 0, index])
        size = self.image_size
        img = self._background(rng, size)
        shape = self.SHAPES[self.targets[index]]
        radius = size * rng.uniform(0.2, 0.35)
        center = rng.uniform(radius, size - radius, 2)
        angle = rng.uniform(0, 2 * np.pi)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        self._draw_shape(ImageDraw.Draw(img), shape, center, radius, angle, colour)
        return img

    @staticmethod
    def _background(rng, size):
        """Two random colours mixed by smooth low-frequency noise."""
        coarse = rng.random((4, 4)).astype(np.float32)
        noise = np.asarray(Image.fromarray((coarse * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC),
                           dtype=np.float32)[..., None] / 255.
        low, high = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
        pixels = low * (1 - noise) + high * noise + rng.normal(0, 8, (size, size, 3))
        return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))

    @staticmethod
    def _polygon(center, radius, angle, corners, inner=None):
        points = []
        for i in range(corners * (2 if inner else 1)):
            r = inner * radius if inner and i % 2 else radius
            a = angle + np.pi * i / corners if inner else angle + 2 * np.pi * i / corners
            points.append((center[0] + r * np.cos(a), center[1] + r * np.sin(a)))
        return points

    def _draw_shape(self, draw, shape, center, radius, angle, colour):
        cx, cy = center
        box = [cx - radius, cy - radius, cx + radius, cy + radius]
        width = max(2, int(radius * 0.3))
        if shape == 'disk':
            draw.ellipse(box, fill=colour)
        elif shape == 'ring':
            draw.ellipse(box, outline=colour, width=width)
        elif shape == 'square':
            draw.polygon(self._polygon(center, radius, angle, 4), fill=colour)
        elif shape == 'triangle':
            draw.polygon(self._polygon(center, radius, angle, 3), fill=colour)
        elif shape == 'hexagon':
            draw.polygon(self._polygon(center, radius, angle, 6), outline=colour, width=width)
        elif shape == 'star':
            draw.polygon(self._polygon(center, radius, angle, 5, inner=0.4), fill=colour)
        elif shape in ('cross', 'bar'):
            directions = [angle, angle + np.pi / 2] if shape == 'cross' else [angle]
            for a in directions:
                dx, dy = radius * np.cos(a), radius * np.sin(a)
                draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=colour, width=width)
        elif shape == 'crescent':
            draw.chord(box, start=np.degrees(angle), end=np.degrees(angle) + 180, fill=colour)
        elif shape == 'dots':
            for corner in self._polygon(center, radius * 0.7, angle, 3):
                r = radius * 0.25
                draw.ellipse([corner[0] - r, corner[1] - r, corner[0] + r, corner[1] + r], fill=colour)


class FashionMNIST(torch.utils.data.Dataset):
    """Zalando's Fashion-MNIST: 28x28 grey photos of clothes in 10 classes, 60,000 to train and 10,000 held out
    (the 'val' split here). Images come as RGB PIL images; labels are the class indices.

    The four idx files (gzipped or not) are read from `root`; see find_fashion_mnist for where they are looked for.
    """
    CLASSES = ['T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag',
               'Ankle boot']
    FILES = {'train': 'train', 'val': 't10k'}

    def __init__(self, root, split='train', transform=None):
        if split not in self.FILES:
            utils.fail(f"unknown Fashion-MNIST split {split}; use train or val")
        self.transform = transform
        self.classes = list(self.CLASSES)
        prefix = os.path.join(root, self.FILES[split])
        self.images = _read_idx(prefix + '-images-idx3-ubyte', header=16).reshape(-1, 28, 28)
        self.targets = _read_idx(prefix + '-labels-idx1-ubyte', header=8).astype(np.int64).tolist()
        if len(self.images) != len(self.targets):
            utils.fail(f"Fashion-MNIST in {root}: the {split} images and labels differ in number; "
                       "fetch the files again")

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        img = Image.fromarray(self.images[index]).convert('RGB')
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]


FASHION_MNIST = 'fashion-mnist'
DEBIAN_FASHION_MNIST = '/usr/share/datasets/fashion-mnist'  # Debian's dataset-fashion-mnist package


def _read_idx(path, header):
    """The bytes after the header of an idx file, as uint8 (path, or path + '.gz')."""
    for candidate, opener in ((path + '.gz', gzip.open), (path, open)):
        if os.path.isfile(candidate):
            try:
                with opener(candidate, 'rb') as f:
                    return np.frombuffer(f.read(), dtype=np.uint8, offset=header)
            except (OSError, EOFError, ValueError) as exc:
                utils.fail(f"cannot read {candidate} ({exc}); fetch the Fashion-MNIST files again")
    utils.fail(f"{path}.gz is missing; a Fashion-MNIST folder holds train- and t10k- images-idx3-ubyte and "
               "labels-idx1-ubyte files (gzipped or not)")


def holds_fashion_mnist(folder):
    """Whether `folder` holds Fashion-MNIST's training images idx file (gzipped or not)."""
    name = os.path.join(os.path.expanduser(str(folder)), 'train-images-idx3-ubyte')
    return os.path.isfile(name) or os.path.isfile(name + '.gz')


def is_fashion_mnist(data_path):
    """'fashion-mnist' (the built-in source), or a folder holding its idx files."""
    return str(data_path).strip().lower() == FASHION_MNIST or holds_fashion_mnist(data_path)


def is_builtin(data_path):
    """A labelled source built in: the synthetic shapes or Fashion-MNIST."""
    return is_synthetic(data_path) or is_fashion_mnist(data_path)


def data_identity(data_path):
    """What a --data_path names, to compare runs: a built-in source's name, else the real path of the file or folder."""
    if is_builtin(data_path) and not os.path.isdir(os.path.expanduser(str(data_path))):
        return str(data_path).strip().lower()
    return os.path.realpath(os.path.expanduser(str(data_path)))


def find_fashion_mnist(data_path, download_root=os.path.join('~', '.cache', 'dino', 'fashion-mnist')):
    """The folder of the Fashion-MNIST idx files: `data_path` itself when it holds them; for 'fashion-mnist',
    Debian's dataset-fashion-mnist location, else a copy torchvision downloaded into `download_root` (downloaded
    now where the network allows)."""
    if holds_fashion_mnist(data_path):
        return os.path.expanduser(str(data_path))
    if holds_fashion_mnist(DEBIAN_FASHION_MNIST):
        return DEBIAN_FASHION_MNIST
    root = os.path.expanduser(download_root)
    raw = os.path.join(root, 'FashionMNIST', 'raw')
    if not holds_fashion_mnist(raw):
        from torchvision import datasets
        print(f"Fashion-MNIST: not in {DEBIAN_FASHION_MNIST}; downloading it into {root}")
        try:
            for train in (True, False):
                datasets.FashionMNIST(root, train=train, download=True)
        except (OSError, RuntimeError) as exc:
            utils.fail(f"--data_path fashion-mnist: not installed and cannot be downloaded "
                       f"({str(exc).splitlines()[0]}); install Debian's package (apt-get install "
                       "dataset-fashion-mnist), or download its four idx files from "
                       "https://github.com/zalandoresearch/fashion-mnist and pass --data_path <that folder>")
    return raw


def builtin_split(data_path, split, image_size, transform=None, seed=0):
    """The `split` ('train' or 'val') of a built-in labelled source (see is_builtin), and one line describing it.
    `image_size` is the side the synthetic shapes are drawn at (Fashion-MNIST's are 28 pixels)."""
    if is_synthetic(data_path):
        dataset = SyntheticShapes(split, image_size=image_size, seed=seed, transform=transform)
        return dataset, f"synthetic shapes ({split}): {len(dataset)} images"
    root = find_fashion_mnist(data_path)
    dataset = FashionMNIST(root, split, transform)
    return dataset, f"Fashion-MNIST ({split}) from {root}: {len(dataset)} images in {len(dataset.classes)} classes"


def is_synthetic(data_path):
    return str(data_path).strip().lower() == 'synthetic'


def check_not_synthetic(path, flag, wanted):
    """Stop when a script that reads real data only (`wanted`: what it reads) is given 'synthetic'."""
    if is_synthetic(path) and not os.path.exists(path):
        utils.fail(f"{flag} synthetic: the built-in synthetic images serve training (main_dino.py), k-NN and "
                   f"linear evaluation (eval_knn.py, eval_linear.py) only; pass {wanted}")


def to_rgb(img):
    """8-bit RGB version of a PIL image of any mode.

    16-bit grey levels are scaled down (PIL would clip them to 255), and transparent pixels are
    composited on white (PIL would keep whatever colour lies under them, often black).
    """
    if img.mode.startswith('I'):  # I;16*, or I as 16-bit PNGs load in some Pillow versions
        levels = np.asarray(img, dtype=np.float64).clip(0, 65535) / 257
        img = Image.fromarray(np.rint(levels).astype(np.uint8))
    if img.mode == 'F':  # 32-bit float (a float TIFF): levels in [0, 1] are scaled up (PIL would make them black)
        levels = np.nan_to_num(np.asarray(img, dtype=np.float64))
        levels = levels * 255 if levels.max(initial=0) <= 1 else levels
        img = Image.fromarray(np.rint(levels.clip(0, 255)).astype(np.uint8))
    if img.mode in ('RGBA', 'LA', 'PA') or (img.mode == 'P' and 'transparency' in img.info):
        img = img.convert('RGBA')
        white = Image.new('RGBA', img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img).convert('RGB')
    return img.convert('RGB')


def pil_loader(path):
    """Open an image file as 8-bit RGB, naming the file when it cannot be read (DataError)."""
    try:
        with Image.open(path) as img:
            img.load()  # decode now, so that truncated files fail here
            return to_rgb(img)
    except UnidentifiedImageError:
        raise utils.DataError(f"cannot read image {path}: empty, or not in an image format Pillow knows") from None
    except Exception as exc:
        raise utils.DataError(f"cannot read image {path}: {exc}") from None


def build_image_folder(root, transform=None, flag='--data_path'):
    """torchvision ImageFolder (hidden folders left out) with a clear error when the folder is missing, holds no
    images or a class folder that cannot be read (`flag`: the option that named it)."""
    if not os.path.isdir(root):
        utils.fail(f"{flag} {root} is not a folder; pass an ImageFolder (one sub-folder of images per class) "
                   "or 'synthetic'")
    with os.scandir(root) as entries:
        folders = sorted((entry for entry in entries if entry.is_dir()), key=lambda entry: entry.name)
    for entry in folders:  # torchvision's scan would take an unreadable one for a folder without images
        reason = _cannot_list(entry.path)
        if reason:
            utils.fail(f"{flag} {root}: the class folder {entry.name} cannot be read ({reason}); make it "
                       "readable, or move it out")
    hidden = [entry.name for entry in folders if entry.name.startswith('.')]
    if hidden:
        utils.warn(f"{root}: {len(hidden)} hidden folder(s) left out, not taken as classes ({', '.join(hidden[:3])})")
    left_out = LeftOutFormats(TORCHVISION_IMAGE_EXTENSIONS)  # torchvision's ImageFolder's, as the original's
    try:
        return _visible_image_folder()(root, transform=transform, loader=pil_loader, is_valid_file=left_out.used_file)
    except (FileNotFoundError, RuntimeError) as exc:
        utils.fail(f"{flag} {root}: {str(exc).splitlines()[0].strip()} (image files: "
                   f"{', '.join(TORCHVISION_IMAGE_EXTENSIONS)}); expected one sub-folder of images per class")
    finally:
        left_out.warn(root)


def _cannot_list(folder):
    """Why the files of `folder` cannot be listed, or None."""
    if not os.access(folder, os.R_OK | os.X_OK):
        return 'permission denied'
    try:
        with os.scandir(folder) as entries:
            next(entries, None)
    except OSError as exc:
        return (exc.strerror or str(exc)).lower()
    return None


def _visible_image_folder():
    from torchvision import datasets

    class VisibleImageFolder(datasets.ImageFolder):
        """ImageFolder whose classes leave out hidden folders (.ipynb_checkpoints, .git, .DS_Store's kin)."""

        def find_classes(self, directory):
            classes, _ = super().find_classes(directory)
            classes = [name for name in classes if not name.startswith('.')]
            if not classes:
                raise FileNotFoundError(f"Couldn't find any class folder in {directory}.")
            return classes, {name: index for index, name in enumerate(classes)}
    return VisibleImageFolder


# Training images come from an ImageFolder, a folder of images at any depth, or a text file listing
# image paths. All three become ImageFiles in one fixed order, so that runs and resumes are reproducible.

# torchvision's ImageFolder extensions, in case this Pillow lacks one of the formats (e.g. WebP)
TORCHVISION_IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.ppm', '.bmp', '.pgm', '.tif', '.tiff', '.webp')
_IDENTIFY_ONLY_FORMATS = {'MPEG'}  # Pillow reads their size but cannot decode their pixels


def image_extensions():
    """Lower-case extensions of the formats this Pillow can decode (plugins registered so far included)."""
    Image.init()
    decodable = {fmt for fmt, (factory, _) in Image.OPEN.items() if fmt not in _IDENTIFY_ONLY_FORMATS
                 and not (isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile))}
    pillow = {ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in decodable}
    return tuple(sorted(pillow.union(TORCHVISION_IMAGE_EXTENSIONS)))


def _extension(name):
    return name[name.rfind('.'):].lower()


# photo formats a dataset may hold that a Pillow without their plugin cannot read (HEIF, AVIF, JPEG XL, camera raw,
# vector and HDR formats): their files are counted when left out, the others (.txt, .json, ...) are not
IMAGE_LIKE_EXTENSIONS = ('.heic', '.heif', '.hif', '.avif', '.jxl', '.jp2', '.j2k', '.jpf', '.jpx', '.webp', '.gif',
                         '.dng', '.cr2', '.cr3', '.crw', '.nef', '.nrw', '.arw', '.srf', '.sr2', '.orf', '.rw2', '.raf',
                         '.pef', '.srw', '.raw', '.3fr', '.erf', '.kdc', '.mrw', '.x3f', '.svg', '.psd', '.exr',
                         '.hdr', '.jfif', '.tga', '.ico')


class LeftOutFormats:
    """Counts the image-like files (IMAGE_LIKE_EXTENSIONS, or formats Pillow reads) a folder scan leaves out because
    their extension is not among `used`; `warn` says how many, of which formats, and what to do."""

    def __init__(self, used):
        self.used = tuple(used)
        self.image_like = tuple(set(IMAGE_LIKE_EXTENSIONS).union(image_extensions()) - set(self.used))
        self.counts = {}

    def used_file(self, name):
        """Whether the scan uses the file `name`; counts it when it is an image left out."""
        if name.lower().endswith(self.used):
            return True
        if name.lower().endswith(self.image_like):
            extension = _extension(name)
            self.counts[extension] = self.counts.get(extension, 0) + 1
        return False

    def warn(self, root):
        if self.counts:
            kinds = ', '.join(f"{ext} ({count})" for ext, count in sorted(self.counts.items()))
            utils.warn(f"{root}: {sum(self.counts.values())} image file(s) left out, of formats not read here: "
                       f"{kinds}; "
                       "convert them to JPEG or PNG to use them (e.g. with Pillow and its pillow-heif plugin, or "
                       f"ImageMagick: magick mogrify -format jpg *{max(self.counts, key=self.counts.get)})")


def scan_image_tree(root):
    """Image files under `root` at any depth, as {folder relative to root: [file names]}.

    One os.scandir per folder and no stat per file. Symbolic links are followed; a folder reached
    again (through a link loop, or a second link to it) is listed once, under its own path where it
    has one inside root. Unreadable folders are reported, not silently left out.
    """
    left_out = LeftOutFormats(image_extensions())
    found, seen, pending, linked, hidden = {}, set(), [('', root)], [], []
    while pending or linked:  # depth first, sub-folders by name, so that the result never varies
        if not pending:  # folders reached through links come after all the others
            pending, linked = linked[::-1], []
        relative, folder = pending.pop()
        try:
            identity = os.stat(folder)
            if (identity.st_dev, identity.st_ino) in seen:
                continue
            seen.add((identity.st_dev, identity.st_ino))
            names, subfolders, links = [], [], []
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.is_dir() and entry.name.startswith('.'):
                        hidden.append(entry.path)
                    elif entry.is_dir():
                        (links if entry.is_symlink() else subfolders).append(
                            (os.path.join(relative, entry.name), entry.path))
                    elif left_out.used_file(entry.name):
                        names.append(entry.name)
        except OSError as exc:
            print(f"warning: cannot list folder {folder} ({exc.strerror}); its images are left out", flush=True)
            continue
        if names:
            found[relative] = names
        pending.extend(sorted(subfolders, reverse=True))
        linked.extend(sorted(links))
    if hidden:  # tools' folders (.ipynb_checkpoints, .git, .thumbnails) hold copies or no images of the data
        utils.warn(f"{len(hidden)} hidden folder(s) under {root} left out ({', '.join(sorted(hidden)[:3])})")
    left_out.warn(root)
    return found


def found_under(found, folder):
    """Whether scan_image_tree's `found` holds images in `folder` (relative to its root) or below it."""
    return any(relative == folder or relative.startswith(folder + os.sep) for relative in found)


def _class_folder(relative):
    return relative.split(os.sep, 1)[0]


def imagefolder_order(root, found):
    """Paths of scan_image_tree's images in ImageFolder's order: by class folder, then folder path, then
    file name (images at the top level first)."""
    paths = []
    for relative in sorted(found, key=lambda relative: (_class_folder(relative), relative)):
        prefix = os.path.join(root, relative, '')
        paths.extend([prefix + name for name in sorted(found[relative])])
    return paths


class ImageFiles(torch.utils.data.Dataset):
    """Images at the given paths, as (image, 0) pairs: training ignores labels."""

    def __init__(self, paths, transform=None):
        self.paths, self.transform = paths, transform

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        img = pil_loader(self.paths[index])
        return (img if self.transform is None else self.transform(img)), 0


def build_training_images(data_path, transform=None):
    """ImageFiles of a folder of images (at any depth) or of a list file, and one line saying what was found."""
    data_path = os.path.expanduser(data_path)
    if os.path.isdir(data_path):
        paths, description = _folder_images(data_path)
    elif os.path.isfile(data_path):
        paths, description = _listed_images(data_path)
    else:
        utils.fail(f"--data_path {data_path} is not a folder or a file (it does not exist); pass a folder of images, "
                   "a text file listing image paths, or 'synthetic'")
    return ImageFiles(paths, transform), description


def _folder_images(root):
    found = scan_image_tree(root)
    paths = imagefolder_order(root, found)
    if not paths:
        utils.fail(f"--data_path {root} holds no image files, neither at its top level nor in any sub-folder (looked "
                   f"for {', '.join(TORCHVISION_IMAGE_EXTENSIONS)} and the other formats Pillow reads)")
    classes = {_class_folder(relative) for relative in found if relative}
    with os.scandir(root) as entries:
        names = {entry.name for entry in entries if entry.is_dir() and not entry.name.startswith('.')}
    subfolders = len(names)
    split = next((name for name in ('val', 'validation', 'test') if name in names), None)
    if 'train' in names and split and found_under(found, split):
        utils.fail(f"--data_path {root} holds train/ and {split}/: training on it would also train on the "
                   f"{split} images; pass --data_path {os.path.join(root, 'train')}")
    if '' in found or len(classes) < subfolders:
        return paths, (f"folder of images {root}: {len(paths)} images, found at any depth "
                       f"({len(found.get('', ()))} at its top level)")
    description = f"ImageFolder {root}: {len(paths)} images in {len(classes)} class folders (labels unused)"
    others = [name for names in found.values() for name in names
              if not name.lower().endswith(TORCHVISION_IMAGE_EXTENSIONS)]
    if others:  # earlier versions read the folder with torchvision's ImageFolder
        kinds = ', '.join(sorted({_extension(name) for name in others}))
        description += (f", {len(others)} of them of types torchvision's ImageFolder skips ({kinds}): runs begun "
                        "before this version had fewer images and do not resume exactly")
    return paths, description


def _listed_images(list_path):
    """Paths of a text file: one per line, absolute or relative to the file's folder; blank lines and #
    comments skipped. Listed files that are missing are kept: they count as unreadable images."""
    if list_path.lower().endswith(image_extensions()):
        utils.fail(f"--data_path {list_path} is an image; pass the folder holding the images, a text file listing "
                   "image paths, or 'synthetic'")
    try:
        with open(list_path, encoding='utf-8-sig') as f:
            lines = f.read().splitlines()
    except UnicodeDecodeError:
        utils.fail(f"--data_path {list_path} is a file but not a text list of image paths (not UTF-8 text); pass a "
                   "folder of images, a text file with one image path per line, or 'synthetic'")
    except OSError as exc:
        utils.fail(f"--data_path {list_path}: cannot read it ({exc.strerror})")
    folder = os.path.dirname(os.path.abspath(list_path))
    paths = [os.path.join(folder, line) for line in map(str.strip, lines) if line and not line.startswith('#')]
    if not paths:
        utils.fail(f"--data_path {list_path} lists no image paths; write one path per line (relative to the list's "
                   "folder or absolute)")
    return paths, f"list file {list_path}: {len(paths)} images listed"


def typical_short_side(dataset, sample=32):
    """The median short side in pixels of up to `sample` images spread over `dataset` (read from the files' headers,
    not decoded), or None where not known."""
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    if isinstance(dataset, SyntheticShapes):
        return dataset.image_size
    if isinstance(dataset, FashionMNIST):
        return 28
    if not isinstance(dataset, ImageFiles) or not dataset.paths:
        return None
    sides = []
    for path in dataset.paths[::max(1, len(dataset.paths) // sample)][:sample]:
        with contextlib.suppress(Exception), Image.open(path) as img:  # an unreadable file is met, and said, later
            sides.append(min(img.size))
    return int(np.median(sides)) if sides else None


def warn_if_smaller_than_crops(dataset, crop_size):
    """A warning when the images are typically less than half as large as the global crops: every view would be an
    upsampled blur."""
    side = typical_short_side(dataset)
    if side is not None and side < crop_size / 2:
        utils.warn(f"the images' short side is typically {side} pixels, under half the {crop_size}-pixel global crops "
                   "(--global_crops_size): every view is an upsampled blur of a few pixels; pass a --global_crops_size "
                   f"near {side} (and a smaller --local_crops_size), or use larger images")


class ResumableSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler that yields (epoch, index) pairs and can start an epoch part-way through.

    Passing the epoch with each index lets ReproducibleSamples seed its augmentations without any
    state in the DataLoader workers.
    """

    def __init__(self, dataset, **kwargs):
        super().__init__(dataset, **kwargs)
        self.start = 0

    def set_epoch(self, epoch, start=0):
        """Shuffle for `epoch` and skip this process's first `start` samples of it."""
        super().set_epoch(epoch)
        self.start = start

    def __iter__(self):
        indices = list(super().__iter__())[self.start:]
        return iter([(self.epoch, index) for index in indices])

    def __len__(self):
        return self.num_samples - self.start


class ReproducibleSamples(torch.utils.data.Dataset):
    """Items of `dataset` for keys (epoch, index), with the augmentation randomness seeded by them.

    Each item is (image, skipped_index, note). Seeding per (seed, epoch, index) makes training
    independent of the number of DataLoader workers and lets a run resume exactly mid-epoch; the
    caller's random states are left untouched. An unreadable image is replaced by the next readable
    one of the dataset, and reported as skipped_index with the reason in note (-1 and '' otherwise);
    with strict=True its DataError is raised instead.
    """

    def __init__(self, dataset, seed, strict=False):
        self.dataset, self.seed, self.strict = dataset, seed, strict

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        with _random_states_kept():
            item, note = readable_item(self.dataset, index, self.strict,
                                       before_each=lambda: _seed_random_states(self.seed, epoch, index))
        return item[0], (index if note else -1), note


class SkippingUnreadable(torch.utils.data.Dataset):
    """Items (image, label, skipped_index, note) of a dataset of (image, label) pairs, for the evaluations: an
    unreadable image's item is the next readable one's, with its own index as skipped_index and the reason in note
    (-1 and '' otherwise), so that batches keep their size and a consumer leaves such items out (SkippedImages
    counts them)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        if not 0 <= index < len(self.dataset):  # iteration ends here (readable_item would wrap around)
            raise IndexError(index)
        (image, label), note = readable_item(self.dataset, index)
        return image, label, (index if note else -1), note


def readable_item(dataset, index, strict=False, before_each=None):
    """(dataset[index], '') or, where that image cannot be read, (the item of the next readable image, the reason);
    `before_each()` is called before each try; strict=True raises the DataError instead."""
    note = ''
    for offset in range(len(dataset)):
        if before_each is not None:
            before_each()
        try:
            return dataset[(index + offset) % len(dataset)], note
        except utils.DataError as exc:
            if strict:
                raise
            note = note or str(exc)
    raise utils.DataError(f"none of the {len(dataset)} images of the dataset can be read (the first: {note}); "
                          "check --data_path")


@contextlib.contextmanager
def _random_states_kept():
    states = random.getstate(), np.random.get_state(), torch.default_generator.get_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.default_generator.set_state(states[2])


def _seed_random_states(*keys):
    """Seed Python, NumPy and the torch CPU generator (only: CUDA's serves the model) from `keys`."""
    words = np.random.SeedSequence(keys).generate_state(2)
    seed = int(words[0]) << 32 | int(words[1])
    random.seed(seed)
    np.random.seed(words[0])
    torch.default_generator.manual_seed(seed)


class SkippedImages:
    """Unreadable images met (of training, or of an evaluation): one warning per file saying what became of it
    (`fate`), and a count per epoch over workers and processes."""

    TRAINING = "another image of the dataset takes its place; --strict_data stops instead"
    EVALUATION = "left out of the evaluation"

    def __init__(self, state=None, fate=TRAINING):
        state = state or {}
        self.fate = fate
        self.warned = set(state.get('warned', ()))
        self.this_epoch = set(state.get('this_epoch', ()))

    def note(self, indices, notes):
        """Record a batch's (skipped_index, note) pairs as ReproducibleSamples returned them."""
        for index, note in zip(indices.tolist(), notes):
            if index < 0:
                continue
            self.this_epoch.add(index)
            if index not in self.warned:
                self.warned.add(index)
                utils.print_on_every_process(f"warning: {note}; skipped ({self.fate})", flush=True)

    def merge(self, dataset_size, device):
        """Share what every process met (a collective when distributed)."""
        if not utils.is_dist_avail_and_initialized():
            return
        mask = torch.zeros(dataset_size, dtype=torch.int32, device=device)
        mask[sorted(self.this_epoch)] = 1
        mask = utils.all_reduce(mask)
        self.this_epoch = set(mask.nonzero().flatten().tolist())
        self.warned |= self.this_epoch

    def readable(self, dataset_size):
        """Indices of the dataset's images not met unreadable this epoch (call merge first)."""
        keep = torch.ones(dataset_size, dtype=torch.bool)
        keep[sorted(self.this_epoch)] = False
        return keep.nonzero().flatten()

    def end_epoch(self):
        """Number of distinct unreadable images met this epoch (call merge first); starts a new count."""
        count, self.this_epoch = len(self.this_epoch), set()
        return count

    def state_dict(self):
        return {'warned': sorted(self.warned), 'this_epoch': sorted(self.this_epoch)}


class ReturnIndexDataset(torch.utils.data.Dataset):
    """Wraps a dataset so that items are (image, index) instead of (image, label)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, idx):
        img, _ = self.dataset[idx]
        return img, idx
