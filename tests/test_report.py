import math

import pytest
import torch
from torch import nn

import momos
from momos import MoMosConfig, MoMosStateError


def test_report_counts_bits_exactly_for_tensor_scope():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(30, 10, bias=False))  # n=300
    prepared = momos.prepare(model, MoMosConfig(block_size=4, num_motifs=9, scope="tensor", motif_dtype="float16"))
    stats = momos.refresh(prepared)
    rep = momos.report(momos.convert(prepared))
    (row,) = rep.tensors
    m, k, s, q = 75, 9, 4, 16
    assert (row.numel, row.num_blocks, row.num_motifs, row.shape) == (300, m, k, (10, 30))
    assert row.bits_per_weight == pytest.approx((k * s * q + m * math.ceil(math.log2(k))) / 300)
    assert row.ratio_to_float32 == pytest.approx(row.bits_per_weight / 32)
    assert row.rmse == pytest.approx(math.sqrt(stats.distortion / 300), rel=1e-6)
    assert "0.weight" in str(rep) and "total" in str(rep)


def test_report_shares_the_global_table_and_agrees_before_and_after_convert():
    torch.manual_seed(0)
    prepared = momos.prepare(nn.Sequential(nn.Linear(20, 8), nn.Linear(8, 3)), MoMosConfig(capacity=0.1, targets="all"))
    momos.refresh(prepared)
    before, after = momos.report(prepared), momos.report(momos.convert(prepared))
    assert before.to_dict() == after.to_dict()
    k, s, q = before.tensors[0].num_motifs, 4, 16  # float16 motifs, the default
    assert before.bits == pytest.approx(k * s * q + sum(t.mosaic_bits for t in before.tensors))
    assert sum(t.table_bits for t in before.tensors) == pytest.approx(k * s * q)
    assert before.to_dict()["total"]["numel"] == 20 * 8 + 8 + 8 * 3 + 3


def test_report_of_a_plain_model_is_an_error():
    with pytest.raises(MoMosStateError):
        momos.report(nn.Linear(2, 2))
