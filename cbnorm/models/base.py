"""What every cbnorm model shares: context routing, the optional context predictor, norm placement by path.

Every classifier here has ``forward(x, context=None, return_context_logits=False, predict_context=True)``;
``context`` (N,) long is handed to the model's context layers for the call by ``cbnorm.convert.route_contexts``
(the same mechanism ``cbnorm.ContextModel`` gives any other model), so layers are called as ``layer(x)``.
"""
from __future__ import annotations

from typing import Optional, Sequence

from torch import Tensor, nn

from ..convert import convert, route_contexts, select_layers
from ..norms import NORMS, NormBase, accepted_kwargs, build_norm, resolve_name

__all__ = ["ContextPredictor", "RoutedModel", "make_norm", "norm_layers_of", "place_norm"]


def norm_layers_of(model: nn.Module) -> dict[str, NormBase]:
    """Named cbnorm layers of ``model`` (the places activations are probed)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, NormBase)}


def filtered_kwargs(name: str, kw: Optional[dict]) -> dict:
    """The model-wide ``norm_kwargs`` that the layer ``name`` accepts (num_contexts means nothing to MN)."""
    ok = accepted_kwargs(NORMS[resolve_name(name)])
    return {k: v for k, v in (kw or {}).items() if k in ok}


def make_norm(name: str, c: int, kw: Optional[dict], channel_last: bool = False) -> NormBase:
    """Build a norm from the model-wide ``norm_kwargs``, keeping only the keywords that layer accepts."""
    return build_norm(resolve_name(name), c, channel_last=channel_last, **filtered_kwargs(name, kw))


def place_norm(model: nn.Module, norm: str, patterns: Sequence[str] | str, kw: Optional[dict]) -> list[str]:
    """Replace the norm layers of ``model`` whose paths match ``patterns`` by ``norm`` (``cbnorm.convert``
    with the model-wide keywords the layer accepts); returns the replaced paths. Bad patterns raise the
    ``ValueError`` of ``cbnorm.convert.select_layers`` (listing the layers)."""
    paths = select_layers(model, include=patterns)
    if resolve_name(norm) == "bn" and all(type(model.get_submodule(p)).__name__ == "BatchNorm" for p in paths):
        return paths  # already there
    convert(model, norm, include=patterns, **filtered_kwargs(norm, kw))
    return paths


class ContextPredictor(nn.Module):
    """A small CNN that predicts a sample's context from the image: x (N, C, H, W) -> logits (N, K).

    Trained jointly with the classifier (cross-entropy on the training contexts) so that, at test time, a
    context model needs no label-derived context: ``model(x)`` in eval mode feeds the predicted context to
    its context layers ("a context predicted by the model"; honest evaluation, see cbnorm.evaluate).
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


class RoutedModel(nn.Module):
    """Base of the classifiers: checks ``x``, routes ``context`` to the context layers, runs ``body(x)``.

    With a ``context_predictor`` (``predict_contexts=K``), ``forward(x)`` without ids in eval mode uses the
    predicted context; ``return_context_logits=True`` also returns the predictor's logits (for its loss);
    ``predict_context=False`` leaves context=None (CN+ mixing).
    """

    in_channels: int

    def body(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"x must be (N, {self.in_channels}, H, W), got shape {shape}")

    @property
    def uses_context(self) -> bool:
        return any(m.uses_context for m in norm_layers_of(self).values())

    def _make_predictor(self, in_channels: int, predict_contexts: Optional[int]) -> None:
        if predict_contexts is None or predict_contexts == 0:
            self.context_predictor = None
            return
        if isinstance(predict_contexts, bool) or not isinstance(predict_contexts, int) or predict_contexts < 1:
            raise ValueError(f"predict_contexts must be a positive int (number of contexts), got {predict_contexts!r}")
        if not self.uses_context:
            raise ValueError("predict_contexts needs a context layer in the model (norm cn, cnx or cn-embed)")
        self.context_predictor = ContextPredictor(in_channels, predict_contexts)

    def forward(self, x: Tensor, context: Optional[Tensor] = None, return_context_logits: bool = False,
                predict_context: bool = True):
        self.check_input(x)
        if context is not None and not self.uses_context:
            raise ValueError("this model has no context layer; pass context=None")
        logits = None
        if getattr(self, "context_predictor", None) is not None:
            logits = self.context_predictor(x)
            if context is None and not self.training and predict_context:
                context = logits.argmax(dim=1)
        with route_contexts(self, context):
            out = self.body(x)
        return (out, logits) if return_context_logits else out
