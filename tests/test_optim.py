"""cbnorm.param_groups: weight decay on conv / linear weights only (timm's param_groups_weight_decay), never on
a normalization layer's parameters (affine, ACN's components, CN-X's learned statistics) or on biases."""
import pytest
import torch
from torch import nn

import cbnorm


def test_param_groups_leave_norm_parameters_and_biases_undecayed():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), cbnorm.build_norm("acn", 4, num_components=2), nn.BatchNorm2d(4),
                          cbnorm.build_norm("cnx", 4, num_contexts=2), nn.Flatten(), nn.Linear(4, 2))
    groups = cbnorm.param_groups(model, 5e-4)
    decay, keep = ({id(p) for p in g["params"]} for g in groups)
    assert [g["weight_decay"] for g in groups] == [5e-4, 0.0]
    assert decay == {id(model[0].weight), id(model[5].weight)}
    for i in (1, 2, 3):
        assert {id(p) for p in model[i].parameters()} <= keep  # acn logits/mean/log_var, bn affine, cnx stats
    assert id(model[0].bias) in keep and id(model[5].bias) in keep
    assert len(decay) + len(keep) == len(list(model.parameters()))
    # an optimizer takes them, and a decayed step leaves ACN's means where the gradient alone puts them
    opt = torch.optim.SGD(groups, lr=0.1, weight_decay=0.5)
    before = model[1].mean.detach().clone()
    model[1].mean.grad = torch.zeros_like(before)
    opt.step()
    assert torch.equal(model[1].mean.detach(), before)


def test_param_groups_checks_its_arguments():
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="weight_decay must be"):
        cbnorm.param_groups(model, -1)
    with pytest.raises(ValueError, match=r"no_decay names parameters that model does not have: \['nope'\]"):
        cbnorm.param_groups(model, 0.1, no_decay=["nope"])
    groups = cbnorm.param_groups(model, 0.1, no_decay=["weight"])
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.0
