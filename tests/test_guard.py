"""A non-finite training batch leaves parameters, optimizer state and buffers as they were (``StepGuard``, as
GradScaler skips a step with inf gradients): with the layers' checks deferred (NaN output, no raise) and done
at once (``NonFiniteError`` after an earlier torch BatchNorm took the batch), in a user's loop and in our
trainer."""
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import cbnorm
from cbnorm.train import classify


def make_model(validate: str) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 6, 3),
                         cbnorm.build_norm("mn", 6, num_components=2, validate=validate), nn.ReLU(),
                         nn.Flatten(), nn.Linear(6 * 3 * 3, 4))


def state(model, opt) -> dict:
    out = {f"p.{k}": v.detach().clone() for k, v in model.named_parameters()}
    out.update({f"b.{k}": v.detach().clone() for k, v in model.named_buffers()})
    for i, s in enumerate(opt.state.values()):
        out.update({f"o{i}.{k}": torch.as_tensor(v).clone() for k, v in s.items()})
    return out


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, equal_nan=False, msg=lambda m: f"{k}: {m}")


def one_step(model, opt, guard, x, y) -> bool:
    guard.begin()
    try:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
    except cbnorm.NonFiniteError:
        guard.skip(opt)
        return False
    if guard.finite(loss):
        opt.step()
        return True
    guard.skip(opt)
    return False


@pytest.mark.parametrize("validate", ["deferred", "now"])
def test_a_nan_batch_leaves_parameters_optimizer_state_and_buffers_as_they_were(validate):
    model = make_model(validate).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    guard = cbnorm.StepGuard(model)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 3, 7, 7, generator=g), torch.randint(0, 4, (16,), generator=g)
    assert one_step(model, opt, guard, x, y)
    before = state(model, opt)
    bad = x.clone()
    bad[3, 1, 2, 2] = float("nan")  # reaches every channel's statistics after the first conv's mixing
    assert not one_step(model, opt, guard, bad, y)
    assert_same(state(model, opt), before)  # torch's BatchNorm took the batch before MN refused it: put back
    assert guard.skipped == 1 and guard.consecutive == 1
    cbnorm.norms.check_deferred(model)  # the skipped batch was dealt with: nothing left to report
    assert one_step(model, opt, guard, x, y) and guard.consecutive == 0  # training goes on
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_without_the_guard_a_deferred_nan_batch_poisons_the_parameters():
    """What the guard prevents: the deferred check leaves MN's buffers alone, but the NaN output's gradients
    reach every parameter before the next check_deferred."""
    model = make_model("deferred").train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(16, 3, 7, 7)
    x[0, 0, 0, 0] = float("nan")
    F.cross_entropy(model(x), torch.zeros(16, dtype=torch.long)).backward()
    opt.step()
    assert not torch.isfinite(model[0].weight).all()
    with pytest.raises(cbnorm.NonFiniteError, match="restore from the last good checkpoint"):
        cbnorm.norms.check_deferred(model)


def test_too_many_skipped_steps_in_a_row_stop_with_a_clear_error():
    model = make_model("deferred").train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    guard = cbnorm.StepGuard(model, max_consecutive=3)
    x = torch.full((8, 3, 7, 7), float("nan"))
    y = torch.zeros(8, dtype=torch.long)
    assert not one_step(model, opt, guard, x, y)
    assert not one_step(model, opt, guard, x, y)
    with pytest.raises(cbnorm.NonFiniteError, match="3 training steps in a row had non-finite values"):
        one_step(model, opt, guard, x, y)
    with pytest.raises(ValueError, match="max_consecutive"):
        cbnorm.StepGuard(model, max_consecutive=0)


@pytest.mark.parametrize("validate", ["deferred", "now"])
def test_the_trainer_skips_a_nan_batch_and_goes_on(tmp_path, monkeypatch, validate):
    real = classify.preprocess_images
    calls = {"n": 0}

    def poisoned(images, *args, **kwargs):
        x = real(images, *args, **kwargs)
        calls["n"] += x.shape[0] == 32  # training batches only (not the recorder's probe batch)
        if calls["n"] == 3 and x.shape[0] == 32:  # the third training batch
            x = x.clone()
            x[0] = float("nan")
        return x

    monkeypatch.setattr(classify, "preprocess_images", poisoned)
    out = classify.train(dict(dataset="digits", norm="mn", components=2, width=0.125, epochs=1, batch_size=32,
                              limit_train=192, quiet=True, snapshot_every=0, device="cpu", eval_batch_size=512,
                              norm_kwargs=json.dumps({"validate": validate}), out=str(tmp_path / "run")))
    m = json.loads((out / "metrics.json").read_text())
    assert m["skipped_steps"] == [3]
    assert [s for s, _ in m["loss"]] == [1, 2, 4, 5, 6]  # no loss recorded for the skipped step
    run = cbnorm.load_run(out)  # refuses NaN weights: the skipped step wrote none
    assert all(torch.isfinite(p).all() for p in run.model.parameters())
