"""Models of the papers' experiments, their normalization layers chosen by name and module path.

* ``ShallowCNN`` (``shallow_cnn``): the MN / CB-Norm papers' four-block CNN (cbnorm.models.cnn);
* ``SmallViT`` (``vit``): a small ViT with a norm on its patch tokens (cbnorm.models.vit);
* ``CifarResNet`` (``resnet20``, ``resnet56``): He et al.'s CIFAR ResNets, Mode Normalization's models;
* ``DenseNet`` (``densenet40``, ``densenet_bc100``): the MN paper's DenseNets (cbnorm.models.densenet);
* ``DayNightSiamese`` / ``DayNightAutoencoder``: the day<->night translators (``DAYNIGHT_MODELS``);
* ``DCGANGenerator`` / ``DCGANDiscriminator``: the GAN experiments' DCGAN (``GAN_MODELS``, cbnorm.models.dcgan).

Every classifier: ``forward(x, context=None)``, the ids routed to its context layers for that call.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from .base import ContextPredictor, RoutedModel, make_norm, norm_layers_of, place_norm
from .cnn import CNN_BLOCKS, ShallowCNN
from .daynight import DAYNIGHT_MODELS, DayNightAutoencoder, DayNightSiamese
from .dcgan import GAN_MODELS, DCGANDiscriminator, DCGANGenerator  # task "gan": generator name -> constructor
from .densenet import DenseNet, densenet40, densenet_bc100
from .resnet import CifarResNet, resnet20, resnet56
from .vit import SmallViT

__all__ = ["ShallowCNN", "SmallViT", "CifarResNet", "DenseNet", "ContextPredictor", "RoutedModel", "build_model",
           "MODELS", "PATH_MODELS", "norm_layers_of", "make_norm", "place_norm", "CNN_BLOCKS", "resnet20",
           "resnet56", "densenet40", "densenet_bc100", "DayNightSiamese", "DayNightAutoencoder",
           "DAYNIGHT_MODELS", "GAN_MODELS", "DCGANGenerator", "DCGANDiscriminator"]

#: classifier name -> constructor (keywords: in_channels, num_classes, norm, norm_kwargs, ...)
MODELS: dict[str, Callable[..., nn.Module]] = {
    "shallow_cnn": ShallowCNN, "vit": SmallViT, "resnet20": resnet20, "resnet56": resnet56,
    "densenet40": densenet40, "densenet_bc100": densenet_bc100,
}
#: models whose norm layers are chosen by fnmatch patterns on module paths (``norm_layers``)
PATH_MODELS = ("resnet20", "resnet56", "densenet40", "densenet_bc100")


def build_model(name: str, **kwargs) -> nn.Module:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    return MODELS[name](**kwargs)
