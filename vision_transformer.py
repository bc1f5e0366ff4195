"""Vision Transformer backbones and the DINO projection head.

Parameter names and shapes follow the released DINO checkpoints exactly, so
those files load into these modules without any key conversion.
"""
import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F


# a fact of the machine, read once: compiled graphs see a constant (torch.compiler's decorators for this
# would load TorchDynamo at every start-up, seconds of each script's launch)
_CPU_BF16_MATMUL = torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _cpu_has_bf16_matmul():
    return _CPU_BF16_MATMUL


def lower_precision(op, *tensors, **kwargs):
    """op(*tensors, **kwargs) for a matrix operation (linear, convolution, attention), exactly as
    bf16 autocast defines it, but fast on a CPU without bf16 matrix instructions.

    There torch's bf16 matrix kernels fall back to plain loops, 10 to 30 times slower than float32.
    The operands are then rounded to bf16 and multiplied in float32 (the accumulation the bf16
    kernels use anyway) and the result is rounded to bf16: the same numbers, at float32 speed.
    Anywhere else (no autocast, GPUs, HPUs, CPUs with bf16 units) this is op(*tensors, **kwargs).
    """
    if not (tensors[0].device.type == 'cpu' and torch.is_autocast_enabled('cpu')
            and torch.get_autocast_dtype('cpu') == torch.bfloat16 and not _cpu_has_bf16_matmul()):
        return op(*tensors, **kwargs)
    with torch.autocast('cpu', enabled=False):
        out = op(*[None if t is None else t.to(torch.bfloat16).float() for t in tensors], **kwargs)
    return out.to(torch.bfloat16)


class Linear(nn.Linear):
    """nn.Linear (same parameters and state-dict keys) whose product goes through lower_precision."""

    def forward(self, x):
        return lower_precision(F.linear, x, self.weight, self.bias)


def trunc_normal_(tensor, mean=0., std=1., a=-2., b=2.):
    """Fill `tensor` from N(mean, std) truncated to [a, b] (absolute bounds)."""
    return nn.init.trunc_normal_(tensor, mean=mean, std=std, a=a, b=b)


def _init_weights(m):
    """The original's initialisation: linear weights truncated normal (std .02), zero biases, LayerNorm as identity."""
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=.02)
        if m.bias is not None:
            nn.init.constant_(m.bias, 0)
    elif isinstance(m, nn.LayerNorm):
        nn.init.constant_(m.bias, 0)
        nn.init.constant_(m.weight, 1.0)


def drop_path(x, drop_prob: float = 0., training: bool = False):
    """Stochastic depth: zero whole samples of a residual branch with probability `drop_prob`."""
    if drop_prob == 0. or not training:
        return x
    keep_prob = 1 - drop_prob
    mask_shape = (x.shape[0],) + (1,) * (x.ndim - 1)
    keep_mask = x.new_empty(mask_shape).bernoulli_(keep_prob)
    return x * keep_mask / keep_prob


class DropPath(nn.Module):
    def __init__(self, drop_prob=None):
        super().__init__()
        self.drop_prob = drop_prob or 0.

    def forward(self, x):
        return drop_path(x, self.drop_prob, self.training)


class Mlp(nn.Module):
    def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU, drop=0.):
        super().__init__()
        out_features = out_features or in_features
        hidden_features = hidden_features or in_features
        self.fc1 = Linear(in_features, hidden_features)
        self.act = act_layer()
        self.fc2 = Linear(hidden_features, out_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Attention(nn.Module):
    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0., proj_drop=0.):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = qk_scale or head_dim ** -0.5
        self.qkv = Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def heads_qkv(self, x):
        """(batch, tokens, dim) -> (3, batch, heads, tokens, head_dim): queries, keys and values per head."""
        batch, tokens, dim = x.shape
        return self.qkv(x).reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)

    def cls_attention(self, x):
        """Attention of the [CLS] query (token 0) to every token, in float32: (batch, heads, tokens).

        The [CLS] row of the full attention matrix, without computing the other rows.
        """
        q, k, _ = self.heads_qkv(x).float().unbind(0)
        return ((q[:, :, :1] @ k.transpose(-2, -1)).squeeze(2) * self.scale).softmax(dim=-1)

    def forward(self, x, return_attention=False):
        batch, tokens, dim = x.shape
        q, k, v = self.heads_qkv(x).unbind(0)
        if return_attention:
            attn = (q @ k.transpose(-2, -1)) * self.scale
            attn = self.attn_drop(attn.softmax(dim=-1))
            out = attn @ v
        else:
            # fused kernel: the (tokens x tokens) matrix is never kept for backward
            dropout_p = self.attn_drop.p if self.training else 0.
            out = lower_precision(F.scaled_dot_product_attention, q, k, v, dropout_p=dropout_p, scale=self.scale)
            attn = None
        out = out.transpose(1, 2).reshape(batch, tokens, dim)
        out = self.proj_drop(self.proj(out))
        return out, attn


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio=4., qkv_bias=False, qk_scale=None, drop=0., attn_drop=0.,
                 drop_path=0., act_layer=nn.GELU, norm_layer=nn.LayerNorm):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale,
                              attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer, drop=drop)
        self.compiled_branches = None  # VisionTransformer.compile_blocks sets it

    def forward(self, x, return_attention=False):
        if self.compiled_branches is not None and not return_attention:
            return self.compiled_branches(self, x, *self.drop_path_scales(x))
        attn_out, attn = self.attn(self.norm1(x), return_attention=return_attention)
        if return_attention:
            return attn
        x = x + self.drop_path(attn_out)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x

    def residual_branches(self, x, attn_scale, mlp_scale):
        """forward(x) with stochastic depth given as per-sample factors of the two branches (drop_path_scales).

        Free of random draws and of the block's drop rate, so that one compiled graph serves every block.
        """
        x = x + self.attn(self.norm1(x))[0] * attn_scale
        return x + self.mlp(self.norm2(x)) * mlp_scale

    def drop_path_scales(self, x):
        """Stochastic depth of forward(x) as factors of its two branches: per sample, 0 or 1 / keep probability
        in training, else 1. Drawn by the calls forward makes, in the same order and in the branches' dtype
        (autocast's), so the same samples are dropped; a kept branch is then multiplied by the rounded
        1 / keep probability where forward divides by the keep probability (the last bit may differ)."""
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        # two tensors, also where drop_path returns its input: one compiled graph serves both cases
        return tuple(self.drop_path(x.new_ones(shape, dtype=dtype)) for _ in range(2))


class PatchEmbed(nn.Module):
    """Split an image into non-overlapping patches and project each one linearly."""

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768):
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.num_patches = (img_size // patch_size) * (img_size // patch_size)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        x = lower_precision(F.conv2d, x, self.proj.weight, self.proj.bias, stride=self.proj.stride)
        return x.flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    """Vision Transformer returning the [CLS] token output."""

    def __init__(self, img_size=[224], patch_size=16, in_chans=3, num_classes=0, embed_dim=768, depth=12,
                 num_heads=12, mlp_ratio=4., qkv_bias=False, qk_scale=None, drop_rate=0., attn_drop_rate=0.,
                 drop_path_rate=0., norm_layer=nn.LayerNorm, **kwargs):
        super().__init__()
        self.num_features = self.embed_dim = embed_dim
        self.patch_embed = PatchEmbed(img_size=img_size[0], patch_size=patch_size, in_chans=in_chans,
                                      embed_dim=embed_dim)
        num_patches = self.patch_embed.num_patches

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        self.pos_drop = nn.Dropout(p=drop_rate)

        # numbers drawn on the CPU, also when the model is built on the meta device (main_dino checks shapes so)
        drop_path_rates = [r.item() for r in torch.linspace(0, drop_path_rate, depth, device='cpu')]
        self.blocks = nn.ModuleList([
            Block(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale,
                  drop=drop_rate, attn_drop=attn_drop_rate, drop_path=drop_path_rates[i], norm_layer=norm_layer)
            for i in range(depth)])
        self.norm = norm_layer(embed_dim)
        self.head = Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.grad_checkpointing = False  # set_grad_checkpointing

        trunc_normal_(self.pos_embed, std=.02)
        trunc_normal_(self.cls_token, std=.02)
        self.apply(_init_weights)

    def compile_blocks(self, backend='inductor'):
        """Compile the transformer blocks in place with torch.compile, for training: parameters, state-dict keys
        and the other methods stay as they are; forward runs the compiled graph of Block.residual_branches.

        One graph per input shape and grad mode serves all blocks (compiled when first met: the global and the
        local crops of the student, the teacher's global crops); attention maps are still computed eagerly.
        """
        compiled = torch.compile(Block.residual_branches, dynamic=False, fullgraph=True, backend=backend)
        for block in self.blocks:
            block.compiled_branches = compiled

    def set_grad_checkpointing(self, enable=True):
        """Activation checkpointing of the blocks while gradients are computed: each block keeps only its input for
        the backward pass and runs its forward again there. The same numbers (stochastic depth's random draws are
        replayed: the random state is restored for the second run) for about one more forward pass of time, and
        the blocks' activations no longer held in memory."""
        self.grad_checkpointing = enable

    def interpolate_pos_encoding(self, x, w, h):
        """Position embedding resized (bicubic) to the patch grid of a w x h input."""
        num_patches = x.shape[1] - 1
        num_stored = self.pos_embed.shape[1] - 1
        if num_patches == num_stored and w == h:
            return self.pos_embed
        class_pos_embed = self.pos_embed[:, :1]
        patch_pos_embed = self.pos_embed[:, 1:]
        dim = x.shape[-1]
        grid_w = w // self.patch_embed.patch_size
        grid_h = h // self.patch_embed.patch_size
        stored_side = int(math.sqrt(num_stored))
        # the small offset avoids a floating point error in the interpolation's output size
        grid_w, grid_h = grid_w + 0.1, grid_h + 0.1
        patch_pos_embed = F.interpolate(
            patch_pos_embed.reshape(1, stored_side, stored_side, dim).permute(0, 3, 1, 2),
            scale_factor=(grid_w / stored_side, grid_h / stored_side),
            mode='bicubic',
        )
        assert int(grid_w) == patch_pos_embed.shape[-2] and int(grid_h) == patch_pos_embed.shape[-1]
        patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).reshape(1, -1, dim)
        return torch.cat((class_pos_embed, patch_pos_embed), dim=1)

    def prepare_tokens(self, x):
        batch, _, w, h = x.shape
        x = self.patch_embed(x)
        x = torch.cat((self.cls_token.expand(batch, -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(x, w, h)
        return self.pos_drop(x)

    def forward(self, x):
        x = self.prepare_tokens(x)
        checkpointed = self.grad_checkpointing and torch.is_grad_enabled()
        if checkpointed:  # imported here: torch.utils.checkpoint loads TorchDynamo, seconds at every start-up
            from torch.utils.checkpoint import checkpoint
        for blk in self.blocks:
            x = checkpoint(blk, x, use_reentrant=False, preserve_rng_state=True) if checkpointed else blk(x)
        x = self.norm(x)
        return x[:, 0]

    def last_block_input(self, x):
        """Tokens entering the last block."""
        x = self.prepare_tokens(x)
        for blk in self.blocks[:-1]:
            x = blk(x)
        return x

    def get_last_selfattention(self, x):
        """The last block's full attention matrices: (batch, heads, tokens, tokens)."""
        return self.blocks[-1](self.last_block_input(x), return_attention=True)

    @torch.no_grad()
    def cls_attention_maps(self, images, renormalise=True):
        """Last-block attention of the [CLS] query to every patch: (batch, heads, h, w), each map summing to 1.

        The same numbers as get_last_selfattention(images)[:, :, 0, 1:] (renormalised over the patches unless
        `renormalise` is false), but only the [CLS] row is computed, so memory grows linearly (not
        quadratically) with the number of patches.
        """
        last = self.blocks[-1]
        patches = last.attn.cls_attention(last.norm1(self.last_block_input(images)))[..., 1:]
        if renormalise:
            patches = patches / patches.sum(dim=-1, keepdim=True)
        patch_size = self.patch_embed.patch_size
        return patches.reshape(*patches.shape[:2], images.shape[-2] // patch_size, images.shape[-1] // patch_size)

    def get_intermediate_layers(self, x, n=1):
        """Normalised outputs of the last `n` blocks (all tokens)."""
        x = self.prepare_tokens(x)
        outputs = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if len(self.blocks) - i <= n:
                outputs.append(self.norm(x))
        return outputs


def vit_tiny(patch_size=16, **kwargs):
    return VisionTransformer(patch_size=patch_size, embed_dim=192, depth=12, num_heads=3, mlp_ratio=4,
                             qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)


def vit_small(patch_size=16, **kwargs):
    return VisionTransformer(patch_size=patch_size, embed_dim=384, depth=12, num_heads=6, mlp_ratio=4,
                             qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)


def vit_base(patch_size=16, **kwargs):
    return VisionTransformer(patch_size=patch_size, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4,
                             qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), **kwargs)


# DeiT-Ti/S are the same networks as ViT-Ti/S; the original accepts both names.
deit_tiny = vit_tiny
deit_small = vit_small


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight = g * v / ||v|| (one norm per output row).

    Stores `weight_g` (out, 1) and `weight_v` (out, in) like `torch.nn.utils.weight_norm`
    did, so DINO checkpoints keep their `last_layer.weight_g` / `last_layer.weight_v` keys.
    """

    def __init__(self, in_features, out_features):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))

    @property
    def weight(self):
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)

    def forward(self, x):
        # x @ (g * v / ||v||).T computed as (x @ v.T) * (g / ||v||).T: the same numbers without
        # materialising the (out, in) normalised weight, forward or backward
        scale = (self.weight_g / self.weight_v.norm(dim=1, keepdim=True)).t()
        return lower_precision(F.linear, x, self.weight_v) * scale


class DINOHead(nn.Module):
    def __init__(self, in_dim, out_dim, use_bn=False, norm_last_layer=True, nlayers=3, hidden_dim=2048,
                 bottleneck_dim=256):
        super().__init__()
        nlayers = max(nlayers, 1)
        if nlayers == 1:
            self.mlp = Linear(in_dim, bottleneck_dim)
        else:
            layers = [Linear(in_dim, hidden_dim)]
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            for _ in range(nlayers - 2):
                layers.append(Linear(hidden_dim, hidden_dim))
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers.append(nn.GELU())
            layers.append(Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        self.apply(_init_weights)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        # the original keeps nn.Linear's default initialisation for this layer
        nn.init.kaiming_uniform_(self.last_layer.weight_v, a=math.sqrt(5))
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad = False

    def forward(self, x):
        x = self.mlp(x)
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x)


# Released DINO weights: the one table and download, shared by hubconf.py (which imports this module
# alone) and utils.load_pretrained_weights and the evaluations.
RELEASED_WEIGHTS_URL = 'https://dl.fbaipublicfiles.com/dino/'
RELEASED_WEIGHTS = {
    ('vit_small', 16): 'dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth',
    ('vit_small', 8): 'dino_deitsmall8_pretrain/dino_deitsmall8_pretrain.pth',
    ('vit_base', 16): 'dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth',
    ('vit_base', 8): 'dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth',
    ('resnet50', None): 'dino_resnet50_pretrain/dino_resnet50_pretrain.pth',
}
# the attention scripts' default, vit_small/8, shows the 300-epoch model of the paper's figures, as the original
ATTENTION_WEIGHTS = {**RELEASED_WEIGHTS,
                     ('vit_small', 8): 'dino_deitsmall8_300ep_pretrain/dino_deitsmall8_300ep_pretrain.pth'}
# image retrieval's default: vit_small/16 trained on Google Landmarks v2
GLDV2_WEIGHTS = 'dino_vitsmall16_googlelandmark_pretrain/dino_vitsmall16_googlelandmark_pretrain.pth'


class DownloadError(Exception):
    """Released weights that could not be downloaded; the message is the reason, in one short line."""


def download_state_dict(url):
    """The state dict at `url` (torch.hub's cached download, loaded on the CPU); DownloadError when it fails."""
    try:
        return torch.hub.load_state_dict_from_url(url, map_location='cpu', weights_only=True)
    except Exception as exc:
        raise DownloadError(str(exc).splitlines()[0][:150]) from None
