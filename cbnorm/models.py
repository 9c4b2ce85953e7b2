"""Models used in the papers' experiments, with the normalization layers as a constructor argument.

* ``ShallowCNN`` — the "CIFAR CNN" of mixture-normalization.txt Table 1 (= Table III of
  cluster-based-normalization.txt): four conv+norm+ReLU blocks (64, 128, 128, 256 channels times ``width``),
  3x3/2 max pools, global average pool, linear. ``norm`` replaces the BatchNorm of the blocks named in
  ``norm_layers`` (the papers replace "conv3"; "conv2" is also studied); ``input_norm`` puts a norm on the
  image channels in front (CN-Channels, or the CB-Norm paper's "first layer" placement).
* ``SmallViT`` — a small Vision Transformer whose patch tokens (N, L, D) go through a norm with
  ``channel_last=True`` right after the patch embedding (CN-Patches, context-normalization.txt IV).
* ``DayNightSiamese`` / ``DayNightAutoencoder`` — the day<->night translators of task "daynight" (input-level
  CN in front of a siamese CNN; a conv autoencoder with context norms), in ``DAYNIGHT_MODELS``.

Every model: ``forward(x, context=None)``; context ids are routed to the layers with ``uses_context``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .norms import NORMS, NormBase, accepted_kwargs, build_norm, resolve_name

__all__ = ["ShallowCNN", "SmallViT", "ContextPredictor", "build_model", "MODELS", "norm_layers_of",
           "DayNightSiamese", "DayNightAutoencoder", "DAYNIGHT_MODELS"]

CNN_BLOCKS = ("conv1", "conv2", "conv3", "conv4")


def norm_layers_of(model: nn.Module) -> dict[str, NormBase]:
    """Named cbnorm layers of ``model`` (the places activations are probed)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, NormBase)}


class ContextPredictor(nn.Module):
    """A small CNN that predicts a sample's context from the image: x (N, C, H, W) -> logits (N, K).

    Trained jointly with the classifier (cross-entropy on the training contexts) so that, at test time, a
    context model needs no label-derived context: ``model(x)`` in eval mode feeds the predicted context to
    its context layers ("a context predicted by the model"; honest evaluation, see cbnorm.inference).
    """

    def __init__(self, in_channels: int, num_contexts: int, width: int = 16) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 5, padding=2), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(2 * width, num_contexts)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class _Routed(nn.Module):
    """Base: passes ``context`` to every cbnorm layer that takes one; refuses it when none does.

    With a ``context_predictor`` (``predict_contexts=K``), ``forward(x)`` without ids in eval mode uses the
    predicted context; ``return_context_logits=True`` also returns the predictor's logits (for its loss).
    """

    def _norm(self, layer: NormBase, x: Tensor, context: Optional[Tensor]) -> Tensor:
        return layer(x, context=context if layer.uses_context else None)

    @property
    def uses_context(self) -> bool:
        return any(m.uses_context for m in norm_layers_of(self).values())

    def _check_context(self, context: Optional[Tensor]) -> None:
        if context is not None and not self.uses_context:
            raise ValueError("this model has no context layer; pass context=None")

    def _make_predictor(self, in_channels: int, predict_contexts: Optional[int]) -> None:
        if predict_contexts is None or predict_contexts == 0:
            self.context_predictor = None
            return
        if isinstance(predict_contexts, bool) or not isinstance(predict_contexts, int) or predict_contexts < 1:
            raise ValueError(f"predict_contexts must be a positive int (number of contexts), got {predict_contexts!r}")
        if not self.uses_context:
            raise ValueError("predict_contexts needs a context layer in the model (norm cn, cnx or cn-embed)")
        self.context_predictor = ContextPredictor(in_channels, predict_contexts)

    def _route(self, x: Tensor, context: Optional[Tensor], predict_context: bool = True
               ) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """(context to use, predictor logits or None). ``predict_context=False`` leaves context=None (CN+)."""
        self._check_context(context)
        if getattr(self, "context_predictor", None) is None:
            return context, None
        logits = self.context_predictor(x)
        if context is None and not self.training and predict_context:
            context = logits.argmax(dim=1)
        return context, logits

    def _finish(self, out: Tensor, ctx_logits: Optional[Tensor], return_context_logits: bool):
        if return_context_logits:
            return out, ctx_logits
        return out


def _make_norm(name: str, c: int, kw: dict, channel_last: bool = False) -> NormBase:
    """Build a norm from the model-wide ``norm_kwargs``, keeping only the keywords that layer accepts."""
    cls = NORMS[resolve_name(name)]
    ok = accepted_kwargs(cls)
    return build_norm(cls.names[0], c, channel_last=channel_last, **{k: v for k, v in kw.items() if k in ok})


class ShallowCNN(_Routed):
    """CIFAR CNN (Table 1 / Table III). x (N, in_channels, H, W) -> logits (N, num_classes)."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, *, width: float = 1.0, norm: str = "bn",
                 norm_layers: Sequence[str] = ("conv3",), norm_kwargs: Optional[dict] = None,
                 input_norm: Optional[str] = None, base_norm: str = "bn",
                 predict_contexts: Optional[int] = None) -> None:
        super().__init__()
        if isinstance(norm_layers, str):
            norm_layers = (norm_layers,)
        if not (isinstance(width, (int, float)) and width > 0):
            raise ValueError(f"width must be a positive number, got {width!r}")
        if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be a positive int, got {in_channels!r}")
        unknown = set(norm_layers) - set(CNN_BLOCKS)
        if unknown:
            raise ValueError(f"norm_layers must be among {CNN_BLOCKS}, got {sorted(unknown)}")
        kw = dict(norm_kwargs or {})
        widths = [max(4, int(round(c * width))) for c in (64, 128, 128, 256)]
        kernels = (5, 5, 5, 3)
        self.input_norm = _make_norm(input_norm, in_channels, kw) if input_norm else None
        blocks = []
        c_in = in_channels
        for name, c, k in zip(CNN_BLOCKS, widths, kernels):
            layer = _make_norm(norm if name in norm_layers else base_norm, c, kw)
            blocks.append(nn.ModuleDict({"conv": nn.Conv2d(c_in, c, k, padding=k // 2, bias=False), "norm": layer}))
            c_in = c
        self.blocks = nn.ModuleDict(dict(zip(CNN_BLOCKS, blocks)))
        self.pool = nn.MaxPool2d(3, 2)
        self.head = nn.Linear(c_in, num_classes)
        self.widths = widths
        self.in_channels = in_channels
        self.norm_layers = tuple(n for n in CNN_BLOCKS if n in norm_layers)
        self._make_predictor(in_channels, predict_contexts)

    def forward(self, x: Tensor, context: Optional[Tensor] = None, return_context_logits: bool = False,
                predict_context: bool = True):
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be (N, {self.in_channels}, H, W), got shape {tuple(x.shape)}")
        context, ctx_logits = self._route(x, context, predict_context)
        if self.input_norm is not None:
            x = self._norm(self.input_norm, x, context)
        for i, name in enumerate(CNN_BLOCKS):
            block = self.blocks[name]
            x = torch.relu(self._norm(block["norm"], block["conv"](x), context))
            if i < 3:
                x = self.pool(x) if min(x.shape[-2:]) >= 3 else x
        return self._finish(self.head(x.mean(dim=(2, 3))), ctx_logits, return_context_logits)


class SmallViT(_Routed):
    """A small ViT. x (N, C, H, W) -> patches (N, L, D) -> ``patch_norm`` (channel_last) -> encoder -> logits."""

    def __init__(self, in_channels: int = 3, num_classes: int = 10, *, image_size: int = 32, patch_size: int = 4,
                 dim: int = 64, depth: int = 4, heads: int = 4, mlp_ratio: float = 2.0, patch_norm: str = "ln",
                 norm_kwargs: Optional[dict] = None, dropout: float = 0.0,
                 predict_contexts: Optional[int] = None) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size={image_size} must be a multiple of patch_size={patch_size}")
        self.embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        n_patches = (image_size // patch_size) ** 2
        self.patch_norm = _make_norm(patch_norm, dim, dict(norm_kwargs or {}), channel_last=True)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(torch.randn(1, n_patches + 1, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, int(dim * mlp_ratio), dropout, batch_first=True,
                                           norm_first=True, activation="gelu")
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.image_size, self.in_channels = image_size, in_channels
        self._make_predictor(in_channels, predict_contexts)

    def forward(self, x: Tensor, context: Optional[Tensor] = None, return_context_logits: bool = False,
                predict_context: bool = True):
        if x.dim() != 4 or x.shape[1] != self.in_channels or tuple(x.shape[-2:]) != (self.image_size,) * 2:
            raise ValueError(f"x must be (N, {self.in_channels}, {self.image_size}, {self.image_size}), "
                             f"got shape {tuple(x.shape)}")
        context, ctx_logits = self._route(x, context, predict_context)
        tokens = self.embed(x).flatten(2).transpose(1, 2)  # (N, L, D)
        tokens = self._norm(self.patch_norm, tokens, context)  # CN-Patches
        tokens = torch.cat([self.cls.expand(tokens.shape[0], -1, -1), tokens], dim=1) + self.pos
        return self._finish(self.head(self.norm(self.encoder(tokens)[:, 0])), ctx_logits, return_context_logits)


MODELS = {"shallow_cnn": ShallowCNN, "vit": SmallViT}


def build_model(name: str, **kwargs) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](**kwargs)


# ============================================================================ day <-> night (cbnorm.transfer)
class DayNightSiamese(nn.Module):
    """Input-level translator (context-normalization.txt IV-E, "American night"): a context norm on the 3 image
    channels (CN-Channels; ``input_norm``, context 0 = day, 1 = night) in front of a small CNN that embeds a
    crop; two crops go through the same network (siamese) and a contrastive loss pulls the embeddings of the
    same scene in both contexts together. x (N, 3, H, W) in [0, 1] -> embeddings (N, embed_dim).

    After training, the per-context (mean, var) of ``input_norm`` translate an image between the contexts
    (cbnorm.transfer). No other normalization layer, and embeddings are not length-normalized, so that the
    network cannot become blind to brightness and colour by itself: the input norm has to align the contexts.
    """

    def __init__(self, in_channels: int = 3, *, num_contexts: int = 2, input_norm: str = "cnx",
                 norm_kwargs: Optional[dict] = None, width: int = 16, embed_dim: int = 32) -> None:
        super().__init__()
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be a positive int, got {width!r}")
        kw = {"num_contexts": num_contexts, **dict(norm_kwargs or {})}
        self.input_norm = _make_norm(input_norm, in_channels, kw)
        if not self.input_norm.uses_context:
            raise ValueError(f"input_norm must be a context layer (cn, cnx, cn-embed), got {input_norm!r}")
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, w, 5, stride=2, padding=2), nn.ReLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4 * w, embed_dim)
        self.in_channels, self.num_contexts = in_channels, num_contexts
        self.norm_layers = ("input_norm",)
        self.uses_context = True

    def forward(self, x: Tensor, context: Optional[Tensor] = None) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"x must be (N, {self.in_channels}, H, W), got shape {tuple(x.shape)}")
        return self.head(self.features(self.input_norm(x, context=context)))


class DayNightAutoencoder(nn.Module):
    """Feature-level translator: a small convolutional U-Net-style autoencoder whose normalization layers are
    context layers. The encoder's layers (``enc1..enc3``) normalize with the *source* context, the decoder's
    (``dec2, dec1``) with the *target* context: ``forward(x, context=src, target_context=tgt)``; the default
    target is the source (reconstruction). x (N, 3, H, W) in [0, 1] -> (N, 3, H, W) in [0, 1] units (not
    clamped). H and W must be multiples of 4 (cbnorm.transfer pads).
    """

    ENCODER = ("enc1", "enc2", "enc3")
    DECODER = ("dec2", "dec1")

    def __init__(self, in_channels: int = 3, *, num_contexts: int = 2, norm: str = "cn",
                 norm_kwargs: Optional[dict] = None, width: int = 16) -> None:
        super().__init__()
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be a positive int, got {width!r}")
        kw = {"num_contexts": num_contexts, **dict(norm_kwargs or {})}
        w = width
        conv = {"enc1": nn.Conv2d(in_channels, w, 3, padding=1, bias=False),
                "enc2": nn.Conv2d(w, 2 * w, 3, stride=2, padding=1, bias=False),
                "enc3": nn.Conv2d(2 * w, 2 * w, 3, stride=2, padding=1, bias=False),
                "dec2": nn.Conv2d(4 * w, 2 * w, 3, padding=1, bias=False),
                "dec1": nn.Conv2d(3 * w, w, 3, padding=1, bias=False)}
        chans = {"enc1": w, "enc2": 2 * w, "enc3": 2 * w, "dec2": 2 * w, "dec1": w}
        self.blocks = nn.ModuleDict({k: nn.ModuleDict({"conv": conv[k], "norm": _make_norm(norm, chans[k], kw)})
                                     for k in self.ENCODER + self.DECODER})
        if not all(b["norm"].uses_context for b in self.blocks.values()):
            raise ValueError(f"norm must be a context layer (cn, cnx, cn-embed), got {norm!r}")
        self.out = nn.Conv2d(w, in_channels, 3, padding=1)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.in_channels, self.num_contexts = in_channels, num_contexts
        self.norm_layers = tuple(f"blocks.{k}.norm" for k in self.ENCODER + self.DECODER)
        self.uses_context = True

    def _block(self, name: str, x: Tensor, context: Optional[Tensor]) -> Tensor:
        b = self.blocks[name]
        return torch.relu(b["norm"](b["conv"](x), context=context))

    def encode(self, x: Tensor, context: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        if x.dim() != 4 or x.shape[1] != self.in_channels or x.shape[-1] % 4 or x.shape[-2] % 4:
            raise ValueError(f"x must be (N, {self.in_channels}, H, W) with H, W multiples of 4, "
                             f"got shape {tuple(x.shape)}")
        e1 = self._block("enc1", x, context)
        e2 = self._block("enc2", e1, context)
        return e1, e2, self._block("enc3", e2, context)

    def decode(self, feats: tuple[Tensor, Tensor, Tensor], context: Optional[Tensor]) -> Tensor:
        e1, e2, e3 = feats
        d2 = self._block("dec2", torch.cat([self.up(e3), e2], dim=1), context)
        d1 = self._block("dec1", torch.cat([self.up(d2), e1], dim=1), context)
        return self.out(d1)

    def forward(self, x: Tensor, context: Optional[Tensor] = None, target_context: Optional[Tensor] = None
                ) -> Tensor:
        return self.decode(self.encode(x, context), context if target_context is None else target_context)


#: models of task "daynight" (cbnorm.runs, cbnorm.train_daynight)
DAYNIGHT_MODELS = {"daynight_siamese": DayNightSiamese, "daynight_ae": DayNightAutoencoder}
