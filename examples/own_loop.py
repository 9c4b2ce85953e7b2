"""Your own model and your own training loop, recorded for the cbnorm app with one call.

    python examples/own_loop.py --out runs/own-loop       # about a minute on 2 CPU cores
    cbnorm-view runs                                      # the app, on every run under runs/

The model is written here (nothing from cbnorm.models); ``cbnorm.convert`` turns its last BatchNorm into
Mixture Normalization; ``cbnorm.watch`` records every normalization layer on a fixed probe batch every
``--every`` steps (and a few early steps), while the loop logs its scalars. The data is the Fashion-MNIST test
split that ships with cbnorm (9,000 images to train on, 1,000 held out), so the example runs anywhere.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

import cbnorm
from cbnorm.data import load_dataset


class SmallNet(nn.Module):
    """conv-BN-ReLU x 3 with pooling, global average pooling, a linear head: x (N, 1, 28, 28) -> (N, 10)."""

    def __init__(self, classes: int = 10):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.conv2, self.bn2 = nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64)
        self.conv3, self.bn3 = nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64)
        self.head = nn.Linear(64, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        x = F.relu(self.bn3(self.conv3(x)))
        return self.head(x.mean((2, 3)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/own-loop", help="the run directory to write (runs/own-loop)")
    p.add_argument("--norm", default="mn", help="what bn3 becomes: mn, acn, bn, ... (mn)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--every", type=int, default=50, help="steps between probes (50)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.manual_seed(args.seed)

    ds = load_dataset("fashion-mnist", "test")  # shipped with cbnorm
    x = (torch.from_numpy(ds.images).float().div(255).unsqueeze(1) - 0.286) / 0.353
    y = torch.from_numpy(ds.labels).long()
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    held, train = order[:1000], order[1000:]

    model = cbnorm.convert(SmallNet(), args.norm, include="bn3", num_components=3)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    probe = (x[held[:256]], y[held[:256]])  # the fixed batch every probe step runs the model on

    with cbnorm.watch(model, args.out, probe=probe, every=args.every, class_names=ds.class_names,
                      config=vars(args)) as rec:
        for step in range(1, args.steps + 1):
            idx = train[torch.randint(len(train), (args.batch_size,))]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            rec.step(step, loss=loss.item(), lr=args.lr)
            if step % 100 == 0 or step == args.steps:
                model.eval()
                with torch.no_grad():
                    acc = (model(x[held]).argmax(1) == y[held]).float().mean().item()
                model.train()
                rec.log(step, test_acc=acc)
                print(f"step {step}: loss {loss.item():.3f}, held-out accuracy {acc:.3f}", flush=True)
    print(f"recorded into {args.out}; open it with: cbnorm-view {args.out}")


if __name__ == "__main__":
    main()
