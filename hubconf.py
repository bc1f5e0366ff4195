"""torch.hub entry points for the DINO backbones, e.g.

    model = torch.hub.load('/path/to/this/repo', 'dino_vits16', source='local', pretrained=False)

pretrained=True downloads the released weights (the ImageNet k-NN top-1 of each is in its docstring).
Only vision_transformer is imported here, so that a `utils` module of the caller's project cannot clash.
"""
import torch
from torchvision.models import resnet50

import vision_transformer as vits

dependencies = ['torch', 'torchvision']


def _released_weights(name, arch, patch_size):
    url = vits.RELEASED_WEIGHTS_URL + vits.RELEASED_WEIGHTS[arch, patch_size]
    try:
        return vits.download_state_dict(url)
    except vits.DownloadError as exc:
        raise RuntimeError(f"{name}: could not download the released DINO weights from {url} "
                           f"({exc}); when offline, call it with pretrained=False and load a local file "
                           "with model.load_state_dict(...)") from None


def _vit(name, arch, patch_size, pretrained, **kwargs):
    state_dict = _released_weights(name, arch, patch_size) if pretrained else None  # first: fail fast offline
    model = vits.__dict__[arch](patch_size=patch_size, num_classes=0, **kwargs)
    if state_dict is not None:
        model.load_state_dict(state_dict, strict=True)
    return model


def dino_vits16(pretrained=True, **kwargs):
    """ViT-Small/16 trained with DINO: 74.5% k-NN top-1 on ImageNet."""
    return _vit('dino_vits16', 'vit_small', 16, pretrained, **kwargs)


def dino_vits8(pretrained=True, **kwargs):
    """ViT-Small/8 trained with DINO: 78.3% k-NN top-1 on ImageNet."""
    return _vit('dino_vits8', 'vit_small', 8, pretrained, **kwargs)


def dino_vitb16(pretrained=True, **kwargs):
    """ViT-Base/16 trained with DINO: 76.1% k-NN top-1 on ImageNet."""
    return _vit('dino_vitb16', 'vit_base', 16, pretrained, **kwargs)


def dino_vitb8(pretrained=True, **kwargs):
    """ViT-Base/8 trained with DINO: 77.4% k-NN top-1 on ImageNet."""
    return _vit('dino_vitb8', 'vit_base', 8, pretrained, **kwargs)


def dino_resnet50(pretrained=True, **kwargs):
    """ResNet-50 trained with DINO (no classifier: `fc` is the identity); 75.3% linear top-1 on ImageNet."""
    state_dict = _released_weights('dino_resnet50', 'resnet50', None) if pretrained else None
    model = resnet50(weights=None, **kwargs)
    model.fc = torch.nn.Identity()
    if state_dict is not None:
        model.load_state_dict(state_dict, strict=False)  # the released file has no `fc` weights
    return model
