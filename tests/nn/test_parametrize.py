"""`momos.nn.parametrize`: the bank each refresh draws."""

from __future__ import annotations

import itertools

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import momos
from momos import MoMosConfig
from momos.nn.parametrize import prepared_tensors


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_each_refresh_draws_a_new_bank(seed: int) -> None:
    # STE mode leaves the latent weights alone, so every refresh draws from the same blocks: only the refresh
    # count in the draw's seed can change the bank. Zero and 7 of 42 blocks: two equal draws have a chance
    # under 1e-7.
    torch.manual_seed(0)
    model = momos.prepare(nn.Linear(20, 8), MoMosConfig(block_size=4, num_motifs=8, mode="ste", seed=seed))
    (bank,) = {id(p.bank): p.bank for _, p, _ in prepared_tensors(model)}.values()
    banks = []
    for _ in range(3):
        momos.refresh(model)
        banks.append(bank.motifs.clone())
    assert bank.refresh_count == 3
    for (i, a), (j, b) in itertools.combinations(enumerate(banks), 2):
        assert not torch.equal(a, b), f"refreshes {i + 1} and {j + 1} drew the same bank"
