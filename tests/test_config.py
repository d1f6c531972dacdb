import math
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from momos import MoMosConfig, MoMosConfigError, MoMosSelectionError
from momos.config import build_rules, resolve


@given(m=st.integers(1, 100_000), c=st.floats(1e-4, 1.0))
def test_num_motifs_follows_the_formula(m, c):
    k = MoMosConfig(capacity=c).num_motifs_for(m)
    assert 1 <= k <= m
    assert k == max(1, min(math.floor(c * m + 1e-9), m))


def test_num_motifs_exact_cases():
    assert MoMosConfig(capacity=0.05).num_motifs_for(200) == 10
    assert MoMosConfig(capacity=0.05).num_motifs_for(19) == 1
    assert MoMosConfig(capacity=1.0).num_motifs_for(7) == 7
    assert MoMosConfig(num_motifs=16).num_motifs_for(7) == 7
    assert MoMosConfig(num_motifs=16).num_motifs_for(700) == 16


def _description_bits(k: int, m: int, s: int, q: int) -> int:
    return m * (math.ceil(math.log2(k)) if k > 1 else 0) + k * s * q


@given(m=st.integers(1, 3000), extra=st.integers(0, 3), s=st.sampled_from([1, 2, 4, 8]),
       dtype=st.sampled_from(["float32", "float16"]), b=st.floats(0.05, 40.0))
def test_bits_per_weight_picks_the_largest_k_within_the_budget(m, extra, s, dtype, b):
    n = max(1, m * s - extra)  # padding: the last block of a tensor may be partly empty
    config = MoMosConfig(block_size=s, bits_per_weight=b, motif_dtype=dtype)
    k = config.num_motifs_for(m, n)
    assert 1 <= k <= m
    fits = [j for j in range(2, m + 1) if _description_bits(j, m, s, config.motif_bits) <= b * n]
    assert k == max(fits, default=1)


def test_bits_per_weight_exact_cases():
    # 2.7M blocks of 4 at 3 bits a weight cannot pay 12-bit indices plus a table: 11 bits and 2,048 motifs.
    m = 2_700_000
    assert MoMosConfig(block_size=4, bits_per_weight=3.0).num_motifs_for(m, 4 * m) == 2048
    # At 4.06 bits: 15-bit indices leave 0.31 bits per weight of table: 26,156 float32 motifs, or every one of the
    # 32,768 that 15 bits address in float16 (the default).
    assert MoMosConfig(block_size=4, bits_per_weight=4.06, motif_dtype="float32").num_motifs_for(m, 4 * m) == 26156
    assert MoMosConfig(block_size=4, bits_per_weight=4.06).num_motifs_for(m, 4 * m) == 32768
    with pytest.raises(MoMosConfigError, match="number of weights"):
        MoMosConfig(bits_per_weight=3.0).num_motifs_for(100)


@pytest.mark.parametrize("kwargs, field", [
    (dict(block_size=0, capacity=0.1), "block_size"),
    (dict(block_size=2.5, capacity=0.1), "block_size"),
    (dict(capacity=0.0), "capacity"),
    (dict(capacity=1.5), "capacity"),
    (dict(capacity=float("nan")), "capacity"),
    (dict(num_motifs=0), "num_motifs"),
    (dict(capacity=0.1, num_motifs=4), "capacity"),
    (dict(num_motifs=4, bits_per_weight=3.0), "bits_per_weight"),
    (dict(bits_per_weight=0.0), "bits_per_weight"),
    (dict(bits_per_weight=float("inf")), "bits_per_weight"),
    (dict(bits_per_weight=True), "bits_per_weight"),
    (dict(), "capacity"),
    (dict(capacity=0.1, scope="layer"), "scope"),
    (dict(capacity=0.1, mode="soft"), "mode"),
    (dict(capacity=0.1, motif_init="pca"), "motif_init"),
    (dict(capacity=0.1, targets="linear"), "targets"),
    (dict(capacity=0.1, motif_dtype="int8"), "motif_dtype"),
    (dict(capacity=0.1, seed=-1), "seed"),
])
def test_bad_fields_name_field_and_value(kwargs, field):
    with pytest.raises(MoMosConfigError, match=field):
        MoMosConfig(**kwargs)


def test_torch_dtype_is_accepted_and_normalised():
    import torch

    assert MoMosConfig(capacity=0.1, motif_dtype=torch.bfloat16).motif_dtype == "bfloat16"
    assert MoMosConfig(capacity=0.1, motif_dtype="float16").motif_bits == 16


def test_paper_preset_and_round_trip():
    paper = MoMosConfig.paper()
    assert (paper.block_size, paper.capacity, paper.motif_init, paper.mode, paper.targets) == \
        (2, 0.05, "random", "hard", "all")
    assert MoMosConfig.from_dict(paper.to_dict()) == paper
    # the defaults (docs/accuracy.md has the study); a config dict without `targets` reads with the default
    default = MoMosConfig(capacity=0.05)
    assert (default.motif_init, default.targets) == ("kmeans", "matrices")
    old = {k: v for k, v in default.to_dict().items() if k != "targets"}
    assert MoMosConfig.from_dict(old) == default
    with pytest.raises(MoMosConfigError, match="bogus"):
        MoMosConfig.from_dict({**paper.to_dict(), "bogus": 1})


class _Owner(nn.Linear):
    pass


def _candidates():
    lin, own, norm = nn.Linear(1, 1), _Owner(1, 1), nn.LayerNorm(1)
    return [("enc.0.weight", "enc.0", lin), ("enc.0.bias", "enc.0", lin), ("enc.1.weight", "enc.1", own),
            ("norm.weight", "norm", norm)]


def test_precedence_name_beats_regex_beats_type_beats_default():
    base, a, b, c = (MoMosConfig(block_size=s, capacity=0.1) for s in (1, 2, 3, 4))
    rules = build_rules(base, None, None, {nn.Linear: a, re.compile(r"enc\..*weight"): b, "enc.0.weight": c})
    chosen = resolve(_candidates(), base, rules)
    assert chosen["enc.0.weight"] is c  # name
    assert chosen["enc.1.weight"] is b  # regex over type
    assert chosen["enc.0.bias"] is a  # type
    assert chosen["norm.weight"] is base  # default


def test_exclude_beats_override_within_a_level_and_module_names_select_owned_params():
    base = MoMosConfig(capacity=0.1)
    rules = build_rules(base, None, ["enc.0"], {"enc.0": MoMosConfig(block_size=2, capacity=0.1)})
    chosen = resolve(_candidates(), base, rules)
    assert "enc.0.weight" not in chosen and "enc.0.bias" not in chosen
    assert set(chosen) == {"enc.1.weight", "norm.weight"}


def test_include_restricts_selection_and_re_prefix_strings_are_regexes():
    base = MoMosConfig(capacity=0.1)
    rules = build_rules(base, ["re:.*bias", nn.LayerNorm], None, None)
    assert set(resolve(_candidates(), None, rules)) == {"enc.0.bias", "norm.weight"}


@pytest.mark.parametrize("selector", ["nope.weight", re.compile("zzz.*"), nn.Conv2d])
def test_a_named_selector_that_matches_nothing_is_an_error(selector):
    base = MoMosConfig(capacity=0.1)
    with pytest.raises(MoMosSelectionError, match="matched no"):
        resolve(_candidates(), base, build_rules(base, None, [selector], None))


def test_bad_selectors():
    base = MoMosConfig(capacity=0.1)
    with pytest.raises(MoMosSelectionError, match="42"):
        build_rules(base, [42], None, None)
    with pytest.raises(MoMosSelectionError, match="regex"):
        build_rules(base, ["re:("], None, None)
    with pytest.raises(MoMosSelectionError, match="MoMosConfig"):
        build_rules(base, None, None, {"a": 3})
