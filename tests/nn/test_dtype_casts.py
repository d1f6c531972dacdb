"""Casting a prepared or converted model casts its motif tables and decoded weights, and the configs follow."""

from __future__ import annotations

import pytest
import torch
from conftest import small_mlp

import momos
from momos.errors import MoMosStateError
from momos.nn.packed import motif_tables, packed_tensors
from momos.nn.parametrize import MotifBank


def _prepared() -> torch.nn.Module:
    torch.manual_seed(0)
    prepared = momos.prepare(small_mlp(), momos.MoMosConfig(block_size=4, capacity=0.2, motif_dtype="float32"))
    momos.refresh(prepared)
    return prepared


@pytest.mark.parametrize(("cast", "dtype"), [("half", torch.float16), ("bfloat16", torch.bfloat16),
                                             ("double", torch.float64), ("float", torch.float32)])
def test_a_cast_of_a_prepared_model_casts_its_banks_and_their_configs_follow(cast: str, dtype: torch.dtype) -> None:
    prepared = getattr(_prepared(), cast)()
    (bank,) = [m for m in prepared.modules() if isinstance(m, MotifBank)]
    assert bank.motifs.dtype == dtype and bank.config.motif_dtype == str(dtype).removeprefix("torch.")
    assert bank.refreshed  # the cast keeps the bank it had


@pytest.mark.parametrize(("cast", "dtype"), [("half", torch.float16), ("bfloat16", torch.bfloat16),
                                             ("double", torch.float64)])
def test_a_cast_of_a_converted_model_casts_tables_and_decoded_weights(cast: str, dtype: torch.dtype) -> None:
    packed = momos.convert(_prepared())
    before = {name: p().clone() for name, p in packed_tensors(packed)}
    packed = getattr(packed, cast)()
    (table,) = motif_tables(packed)
    assert table.motifs.dtype == dtype and table.config.motif_dtype == str(dtype).removeprefix("torch.")
    for name, p in packed_tensors(packed):
        assert p.dtype == dtype and p().dtype == dtype
        assert torch.equal(p(), before[name].to(dtype))  # the cast of the decoded weight, exactly
    x = torch.randn(2, 1, 8, 8, dtype=dtype)
    assert packed(x).dtype == dtype  # the forward runs in the new dtype


def test_a_move_keeps_the_dtypes_and_a_dtype_no_file_stores_is_refused_by_save(tmp_path) -> None:
    packed = momos.convert(_prepared()).to("cpu")
    assert {p.dtype for _, p in packed_tensors(packed)} == {torch.float32}
    odd = packed.to(torch.float8_e4m3fn)
    (table,) = motif_tables(odd)
    assert table.config.motif_dtype == "float32"  # not a motif dtype: the config stays, and save names it
    with pytest.raises(MoMosStateError, match=r"decodes to float8_e4m3fn; a .momos file stores MoMos tensors of"):
        momos.save(odd, tmp_path / "m.momos")
    assert list(tmp_path.iterdir()) == []
