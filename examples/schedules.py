"""The three refresh schedules on digits, written out as plain training loops.

    .venv/bin/python examples/schedules.py

- per epoch (the reference code): refresh after each epoch's optimizer steps, before evaluating;
- per step (the paper): a hook refreshes after every optimizer step;
- every N steps: the same hook with steps=N.
"""

import torch
from torch import nn

import momos
from momos.apps.data import digits
from momos.apps.models import mlp
from momos.apps.train import evaluate

data = digits()
config = momos.MoMosConfig(block_size=4, capacity=0.05)


def train(schedule: str, epochs: int = 3) -> float:
    torch.manual_seed(0)
    model = momos.prepare(mlp(data.input_shape, data.num_classes), config)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=1e-2)
    if schedule == "step":
        momos.refresh_every(model, opt, steps=1)
    elif schedule == "every-10":
        momos.refresh_every(model, opt, steps=10)
    for _ in range(epochs):
        for batch in torch.randperm(len(data.x_train)).split(64):
            loss = nn.functional.cross_entropy(model(data.x_train[batch]), data.y_train[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if schedule == "epoch":
            momos.refresh(model)
    packed = momos.convert(model)  # refreshes once more if the weights moved since the last refresh
    return evaluate(packed, data.x_test, data.y_test)


if __name__ == "__main__":
    for schedule in ("epoch", "step", "every-10"):
        print(f"{schedule:>9}: test accuracy of the packed model {train(schedule):.3f}")
