import pytest
import torch
from torch import nn

import momos
from momos import MoMosConfig, MoMosConfigError


def test_refresh_every_n_optimizer_steps_and_remove():
    torch.manual_seed(0)
    model = momos.prepare(nn.Sequential(nn.Linear(6, 4)), MoMosConfig(capacity=0.3, targets="all"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    hook = momos.refresh_every(model, opt, steps=3)
    bank = model[0].parametrizations.weight[0].bank
    for _ in range(7):
        opt.zero_grad()
        model(torch.randn(2, 6)).sum().backward()
        opt.step()
    assert int(bank.refreshes) == 2 and [s for s, _ in hook.history] == [3, 6]
    assert hook.last is not None and hook.last.distortion == hook.history[-1][1]
    hook.remove()
    for _ in range(3):
        opt.step()
    assert int(bank.refreshes) == 2


@pytest.mark.parametrize("steps", [0, -1, 1.5, True])
def test_refresh_every_rejects_bad_steps(steps):
    model = momos.prepare(nn.Linear(8, 2), MoMosConfig(capacity=0.5))
    with pytest.raises(MoMosConfigError, match="steps"):
        momos.refresh_every(model, torch.optim.SGD(model.parameters(), lr=0.1), steps)
