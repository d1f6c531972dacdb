import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import momos
from momos import MoMosConfig, MoMosConfigError, MoMosSelectionError, MoMosStateError, MoMosValueError
from momos.api import EMBEDDING_BITS_BELOW, _embedding_bank
from momos.blocks import num_blocks, to_blocks
from momos.nn.parametrize import prepared_tensors


def _mlp(sizes=(13, 9, 5)):
    layers = []
    for a, b in zip(sizes, sizes[1:], strict=False):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def _banks(model):
    return {id(p.bank): p.bank for _, p, _ in prepared_tensors(model)}


@settings(max_examples=25, deadline=None)
@given(s=st.integers(1, 6), c=st.floats(0.01, 1.0), zero=st.booleans(), scope=st.sampled_from(["global", "tensor"]),
       seed=st.integers(0, 50))
def test_refreshed_tensors_are_mosaics_of_their_bank(s, c, zero, scope, seed):
    torch.manual_seed(seed)
    dense = _mlp()
    config = MoMosConfig(block_size=s, capacity=c, force_zero=zero, scope=scope, seed=seed, targets="all")
    blocks_of = {n: num_blocks(w.numel(), s) for n, w in dense.named_parameters()}
    served = blocks_of if scope == "tensor" else {n: sum(blocks_of.values()) for n in blocks_of}
    zero_only = {n for n, m in served.items() if zero and config.num_motifs_for(m) == 1}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", momos.MoMosWarning)
        try:
            model = momos.prepare(dense, config)
        except MoMosSelectionError:
            assert zero_only == set(blocks_of)  # refused only when every tensor would be zeros
            return
    assert {str(w.message).split("'")[1] for w in caught} == zero_only
    for name in zero_only:  # left dense: the tensor keeps its values
        assert torch.equal(model.get_parameter(name), dense.get_parameter(name))
    stats = momos.refresh(model)
    for name, param, weight in prepared_tensors(model):
        motifs = param.bank.motifs
        k, m = motifs.shape[0], param.bank.num_blocks
        assert k == max(1, min(math.floor(c * m + 1e-9), m)) == stats.tensors[name].num_motifs
        if zero:
            assert torch.equal(motifs[0], torch.zeros(s))
        blocks = to_blocks(weight, s)
        real = weight.numel()
        # every real entry equals its block's motif at its offset (padding never leaks in)
        expected = motifs[param.mosaic].reshape(-1)[:real]
        assert torch.equal(weight.reshape(-1), expected)
        # every full block is one of the motifs; the number of distinct blocks is at most k
        full = blocks[: real // s]
        assert all(bool((motifs == b).all(1).any()) for b in full)
        assert len({tuple(b.tolist()) for b in blocks}) <= k + 1  # +1: the padded last block
        assert int(stats.tensors[name].usage.sum()) == param.num_blocks


def test_global_scope_shares_one_bank_and_tensor_scope_does_not():
    g = momos.prepare(_mlp(), MoMosConfig(capacity=0.2, targets="all"))
    t = momos.prepare(_mlp(), MoMosConfig(capacity=0.2, scope="tensor", force_zero=False, targets="all"))
    assert len(_banks(g)) == 1 and len(_banks(t)) == 4
    (bank,) = _banks(g).values()
    assert bank.num_blocks == sum(p.num_blocks for _, p, _ in prepared_tensors(g))
    stats = momos.refresh(g)
    assert list(stats.banks) == ["global"]
    assert stats.banks["global"].usage.sum() == bank.num_blocks
    assert set(momos.refresh(t).banks) == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_refresh_stats_distortion_and_changes_are_measured_on_real_entries():
    torch.manual_seed(0)
    model = momos.prepare(_mlp(), MoMosConfig(block_size=4, capacity=0.3))
    before = {n: w.detach().clone() for n, _, w in prepared_tensors(model)}
    stats = momos.refresh(model)
    for name, _, weight in prepared_tensors(model):
        t = stats.tensors[name]
        assert t.distortion == pytest.approx(float(((before[name] - weight.detach()) ** 2).sum()), rel=1e-6)
        assert t.weights_changed == int((before[name] != weight).sum())
    assert stats.distortion == pytest.approx(sum(t.distortion for t in stats.tensors.values()))
    # a second refresh of already-projected weights can only draw motifs among the motifs
    again = momos.refresh(model)
    assert again.distortion <= stats.distortion * 10


def test_refresh_is_deterministic_for_a_seed():
    def run(seed):
        torch.manual_seed(0)
        model = momos.prepare(_mlp(), MoMosConfig(capacity=0.2, seed=seed))
        momos.refresh(model)
        momos.refresh(model)
        return [w.detach().clone() for _, _, w in prepared_tensors(model)]

    a, b, c = run(1), run(1), run(2)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x, y) for x, y in zip(a, c, strict=True))


def test_kmeans_init_lowers_distortion_against_random():
    torch.manual_seed(0)
    base = _mlp((64, 64, 32))
    rand = momos.refresh(momos.prepare(base, MoMosConfig(capacity=0.05, motif_init="random"))).distortion
    km = momos.refresh(momos.prepare(base, MoMosConfig(capacity=0.05, motif_init="kmeans"))).distortion
    assert km < rand


def test_hard_mode_trains_dense_between_refreshes():
    torch.manual_seed(0)
    model = momos.prepare(_mlp(), MoMosConfig(capacity=0.2))
    momos.refresh(model)
    weight = model[0].weight
    param = model[0].parametrizations.weight.original
    assert torch.equal(weight, param)  # the forward weight is the stored one
    model(torch.randn(3, 13)).sum().backward()
    with torch.no_grad():
        param -= 0.1 * param.grad
    assert torch.equal(model[0].weight, param)


def test_ste_forward_is_always_a_mosaic_and_gradients_reach_latent_weights():
    torch.manual_seed(0)
    model = momos.prepare(_mlp(), MoMosConfig(block_size=3, capacity=0.2, mode="ste"))
    latent = model[0].parametrizations.weight.original
    before = latent.detach().clone()
    momos.refresh(model)
    assert torch.equal(latent, before)  # ste refresh leaves latent weights alone
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(4, 13)).pow(2).sum().backward()
        assert latent.grad is not None and latent.grad.abs().sum() > 0
        opt.step()
        w = model[0].weight
        motifs = model[0].parametrizations.weight[0].bank.motifs
        blocks = to_blocks(w.detach(), 3)
        assert all(bool((motifs == b).all(1).any()) for b in blocks[: w.numel() // 3])
    assert not torch.equal(latent, before)
    # the straight-through gradient of the forward weight is the gradient of the latent weight
    x = torch.randn(2, 13)
    latent.grad = None
    model(x).sum().backward()
    g_latent = latent.grad.clone()
    w = model[0].weight.detach().requires_grad_()
    out = nn.functional.linear(x, w, model[0].bias)
    out = model[1](out)
    out = model[2](out).sum()
    out.backward()
    assert torch.allclose(g_latent, w.grad)


@pytest.mark.parametrize("scope", ["global", "tensor"])
@pytest.mark.parametrize("motif_dtype", ["float32", "float16", "bfloat16"])
def test_convert_matches_the_refreshed_prepared_model(small_model, scope, motif_dtype):
    name, model, make_input = small_model
    prepared = momos.prepare(model, MoMosConfig(block_size=4, capacity=0.1, scope=scope, motif_dtype=motif_dtype))
    momos.refresh(prepared)
    x = make_input(5)
    with torch.no_grad():
        expected = prepared(x)
        packed = momos.convert(prepared)
        got = packed(x)
    assert (got - expected).abs().max() <= 1e-6
    assert not any(p.startswith("parametrizations") for p, _ in packed.named_parameters())
    tables = {id(p.table) for _, p in momos.nn.packed.packed_tensors(packed)}
    assert len(tables) == (1 if scope == "global" else len(list(momos.nn.packed.packed_tensors(packed))))
    # the prepared model is untouched by convert (inplace=False)
    assert len(list(prepared_tensors(prepared))) > 0


def test_convert_refreshes_only_when_weights_moved():
    torch.manual_seed(0)
    model = momos.prepare(_mlp(), MoMosConfig(capacity=0.2))
    momos.refresh(model)
    bank = next(iter(_banks(model).values()))
    packed = momos.convert(model)
    assert torch.equal(next(momos.nn.packed.packed_tensors(packed))[1].table.motifs, bank.motifs)
    assert int(bank.refreshes) == 1
    with torch.no_grad():
        model[0].parametrizations.weight.original.add_(0.01)
    x = torch.randn(2, 13)
    packed = momos.convert(model, inplace=True)
    assert int(bank.refreshes) == 2  # stale weights: one final refresh
    # never refreshed: convert refreshes first, and the result is a mosaic
    fresh = momos.convert(momos.prepare(_mlp(), MoMosConfig(capacity=0.2)))
    assert fresh(x).shape == (2, 5)


def test_convert_of_ste_model_packs_the_weights_its_forward_computes():
    torch.manual_seed(0)
    model = momos.prepare(_mlp(), MoMosConfig(capacity=0.3, mode="ste"))
    momos.refresh(model)
    with torch.no_grad():
        for _, _, w in prepared_tensors(model):
            w.add_(0.05 * torch.randn_like(w))
        x = torch.randn(4, 13)
        assert (momos.convert(model)(x) - model(x)).abs().max() <= 1e-6


@pytest.mark.parametrize("mode", ["hard", "ste"])
def test_state_dict_round_trips_prepared_and_converted_models(mode):
    torch.manual_seed(0)
    cfg = MoMosConfig(capacity=0.2, mode=mode)
    a = momos.prepare(_mlp(), cfg)
    momos.refresh(a)
    b = momos.prepare(_mlp(), cfg)
    b.load_state_dict(a.state_dict())  # a refreshed bank: STE's forward uses it
    x = torch.randn(3, 13)
    assert torch.equal(a(x), b(x))
    momos.refresh(a)
    momos.refresh(b)  # the same next draw: the loaded refresh count seeds it
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    # loaded weights are the refreshed ones: convert packs them without a new draw
    pa, pb = momos.convert(a), momos.convert(b)
    assert torch.equal(pa(x), pb(x))
    c = momos.convert(momos.prepare(_mlp(), cfg))
    c.load_state_dict(pa.state_dict())
    assert torch.equal(c(x), pa(x))
    assert any(k.endswith("mosaic") and v.dtype == torch.uint8 for k, v in pa.state_dict().items())


def test_packed_models_deepcopy_but_refuse_pickle(tmp_path):
    import copy

    packed = momos.convert(momos.prepare(_mlp(), MoMosConfig(capacity=0.2)))
    clone = copy.deepcopy(packed)
    x = torch.randn(2, 13)
    assert torch.equal(clone(x), packed(x))
    with pytest.raises(MoMosStateError, match="momos.save"):
        torch.save(packed, tmp_path / "m.pt")


def test_mosaic_dtype_is_the_smallest_unsigned_that_fits():
    from momos.nn.packed import mosaic_dtype

    assert mosaic_dtype(1) == mosaic_dtype(256) == torch.uint8
    assert mosaic_dtype(257) == mosaic_dtype(65536) == torch.uint16
    assert mosaic_dtype(65537) == torch.uint32
    model = nn.Sequential(nn.Linear(100, 40))
    packed = momos.convert(momos.prepare(model, MoMosConfig(block_size=1, num_motifs=300)))
    assert packed[0].momos_packed.weight.mosaic.dtype == torch.uint16


def test_selection_through_prepare():
    cnn = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 36, 3))
    cfg = MoMosConfig(capacity=0.2, targets="all")
    model = momos.prepare(cnn, cfg, exclude=[nn.BatchNorm2d], overrides={"3.weight": cfg.replace(scope="tensor",
                                                                                                  block_size=2)})
    names = {n: p.bank.name for n, p, _ in prepared_tensors(model)}
    assert names == {"0.weight": "global", "0.bias": "global", "3.weight": "3.weight", "3.bias": "global"}
    only = momos.prepare(cnn, cfg, include=["re:.*weight"], exclude=["1.weight"])
    assert {n for n, _, _ in prepared_tensors(only)} == {"0.weight", "3.weight"}
    frozen = _mlp()
    frozen[0].weight.requires_grad_(False)
    assert "0.weight" not in {n for n, _, _ in prepared_tensors(momos.prepare(frozen, cfg))}


def test_errors_of_the_lifecycle():
    cfg = MoMosConfig(capacity=0.2, targets="all")
    model = momos.prepare(_mlp(), cfg)
    with pytest.raises(MoMosStateError, match="already prepared"):
        momos.prepare(model, cfg)
    with pytest.raises(MoMosStateError, match="already prepared or converted"):
        momos.prepare(momos.convert(model), cfg)
    with pytest.raises(MoMosStateError, match="not prepared"):
        momos.refresh(_mlp())
    with pytest.raises(MoMosStateError, match="not prepared"):
        momos.convert(_mlp())
    with pytest.raises(MoMosStateError, match="converted"):
        momos.refresh(momos.convert(model))
    with pytest.raises(MoMosSelectionError, match="no tensor selected"):
        momos.prepare(nn.ReLU(), cfg)
    with pytest.raises(MoMosSelectionError, match="matched no"):
        momos.prepare(_mlp(), cfg, exclude=["encoder.weight"])
    with pytest.raises(MoMosConfigError, match="config"):
        momos.prepare(_mlp(), {"capacity": 0.1})
    with pytest.raises(MoMosConfigError, match="block_size"):
        momos.prepare(_mlp(), cfg, overrides={"0.weight": cfg.replace(block_size=8)})
    with torch.no_grad():
        model[2].parametrizations.bias.original[1] = float("nan")
    with pytest.raises(MoMosValueError, match="2.bias"):
        momos.refresh(model)


def test_tied_parameters_are_prepared_once():
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    model = nn.Sequential(emb, head)
    prepared = momos.prepare(model, MoMosConfig(capacity=0.5))
    assert [n for n, _, _ in prepared_tensors(prepared)] == ["0.weight"]


def test_padding_with_numel_not_a_multiple_of_block_size():
    model = nn.Sequential(nn.Linear(7, 3))  # 21 weights, 3 biases
    prepared = momos.prepare(model, MoMosConfig(block_size=5, num_motifs=3))
    momos.refresh(prepared)
    p = prepared[0].parametrizations.weight[0]
    assert p.num_blocks == num_blocks(21, 5) == 5
    x = torch.randn(2, 7)
    assert (momos.convert(prepared)(x) - prepared(x)).abs().max() == 0


def test_hard_mode_fast_property_defers_to_torch_when_another_parametrization_joins():
    from torch.nn.utils import parametrize

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    model = momos.prepare(_mlp(), MoMosConfig(capacity=0.2))
    original = model[0].parametrizations.weight.original
    assert model[0].weight is original  # the identity forward costs no module call
    parametrize.register_parametrization(model[0], "weight", Double())
    assert torch.equal(model[0].weight, 2 * original)


def test_ste_fast_property_defers_to_torch_when_caching_or_another_parametrization_joins():
    from torch.nn.utils import parametrize

    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    model = momos.prepare(_mlp(), MoMosConfig(capacity=0.2, mode="ste"))
    momos.refresh(model)
    plist = model[0].parametrizations.weight
    momos_weight = plist[0](plist.original)
    assert torch.equal(model[0].weight, momos_weight)
    assert model[0].weight is not model[0].weight  # computed on each access
    with parametrize.cached():  # torch's cache: one tensor for every access inside
        assert model[0].weight is model[0].weight
    parametrize.register_parametrization(model[0], "weight", Double())
    assert torch.equal(model[0].weight, 2 * momos_weight)


def test_a_tensor_whose_bank_is_only_the_zero_motif_is_left_dense_with_a_warning():
    model = nn.Sequential(nn.Linear(384, 384), nn.LayerNorm(384))
    model[1].weight.data.uniform_(0.5, 1)
    config = MoMosConfig(block_size=4, capacity=0.01, scope="tensor", targets="all")
    with pytest.warns(momos.MoMosWarning) as caught:
        prepared = momos.prepare(model, config)
    left = sorted(str(w.message).split("'")[1] for w in caught)
    assert left == ["0.bias", "1.bias", "1.weight"]
    assert "k=1" in str(caught[0].message) and "capacity=0.01" in str(caught[0].message)
    momos.refresh(prepared)
    packed = momos.convert(prepared)
    assert torch.equal(packed[1].weight, model[1].weight) and torch.equal(packed[0].bias, model[0].bias)
    x = torch.randn(8, 384)
    assert torch.isfinite(packed(x)).all() and packed(x).abs().sum() > 0
    report = momos.report(packed)
    assert [t.name for t in report.tensors] == ["0.weight"]
    assert [d.name for d in report.dense] == ["0.bias", "1.weight", "1.bias"]
    assert "dense" in str(report)
    with pytest.raises(MoMosSelectionError, match="no tensor left to compress"), pytest.warns(momos.MoMosWarning):
        momos.prepare(model, config, include=[nn.LayerNorm])
    # One motif besides the zero, or no forced zero, is an approximation of the tensor: it is compressed.
    for config in (MoMosConfig(block_size=4, num_motifs=2, scope="tensor", targets="all"),
                   MoMosConfig(block_size=4, capacity=0.01, scope="tensor", force_zero=False, targets="all")):
        packed = momos.convert(momos.prepare(model, config))
        assert len(momos.report(packed).tensors) == 4
        assert packed[1].weight.abs().min() > 0.4


def test_bits_per_weight_bounds_the_report_and_the_file(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
    for b in (2.0, 3.0, 4.0):
        config = MoMosConfig(block_size=4, bits_per_weight=b)
        packed = momos.convert(momos.prepare(model, config, include=[nn.Linear]))
        report = momos.report(packed)
        assert report.tensors[0].num_motifs == config.num_motifs_for(report.num_blocks, report.numel)
        assert b - 0.5 < report.bits_per_weight <= b
        path = tmp_path / f"{b}.momos"
        momos.save(packed, path, coding="packed")
        info = momos.inspect(path)
        stored = sum(t.nbytes for t in info.tensors) + sum(bank.nbytes for bank in info.banks)
        assert stored * 8 <= b * report.numel + 8 * len(info.tensors)  # mosaics are padded to whole bytes


def test_targets_pick_what_prepare_selects_without_include():
    model = nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.LayerNorm(8), nn.Conv1d(8, 4, 3))
    matrices = momos.prepare(model, MoMosConfig(capacity=0.2))
    assert [n for n, _, _ in prepared_tensors(matrices)] == ["0.weight", "1.weight", "3.weight"]
    assert {d.name for d in momos.report(momos.convert(matrices)).dense} == {"1.bias", "2.weight", "2.bias", "3.bias"}
    every = momos.prepare(model, MoMosConfig.paper(capacity=0.2))
    assert len(list(prepared_tensors(every))) == len(list(model.parameters()))
    # an override selects what it names, targeted or not; include replaces the targets
    cfg = MoMosConfig(capacity=0.2)
    with_norm = momos.prepare(model, cfg, overrides={"2.weight": cfg.replace(scope="tensor", capacity=1.0)})
    assert "2.weight" in {n for n, _, _ in prepared_tensors(with_norm)}
    only_bias = momos.prepare(model, cfg.replace(capacity=1.0), include=["1.bias"])
    assert [n for n, _, _ in prepared_tensors(only_bias)] == ["1.bias"]
    with pytest.raises(MoMosSelectionError, match="targets='matrices'.*include="):
        momos.prepare(nn.Sequential(nn.LayerNorm(8)), cfg)


def _embedding_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(500, 16), nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 8))


@settings(max_examples=15, deadline=None)
@given(b=st.floats(2.0, 6.0), share=st.floats(0.3, 0.9))
def test_embedding_bits_split_one_budget(b, share):
    model = _embedding_model()
    config = MoMosConfig(block_size=4, bits_per_weight=b)
    packed = momos.compress(model, config, embedding_bits=share * b)
    report = momos.report(packed)
    assert report.bits_per_weight <= b + 1e-9  # the whole budget holds over every compressed weight
    tensors = {t.name: t for t in report.tensors}
    embedding = tensors["0.weight"]
    assert embedding.bank == "0.weight"  # a bank of its own, sized by embedding_bits
    assert embedding.num_motifs == config.replace(bits_per_weight=share * b).num_motifs_for(2000, 8000)
    # the matrices share one bank, the largest that the rest of the budget holds
    k = tensors["1.weight"].num_motifs
    assert tensors["3.weight"].bank == tensors["1.weight"].bank == "global"
    blocks = 256 + 128
    spent = embedding.table_bits + embedding.mosaic_bits
    if k < blocks:
        bigger = k + 1
        assert spent + blocks * math.ceil(math.log2(bigger)) + bigger * 4 * config.motif_bits > b * (8000 + 1536)


def _auto_reference(config, target, numel, rows):
    """`_embedding_bank`'s rule, by enumeration: every (block size, index width) whose table qualifies."""
    found = []
    for s in [4] + [s for s in range(5, 17) if all(row % s == 0 for row in rows)]:
        blocks = num_blocks(numel, s)
        for width in range(1, math.ceil(target * s - 1e-9) + 1):
            k = min(2 ** width, blocks)
            if k >= 2 and k <= 2 ** 16 and k * s * config.motif_bits <= 0.05 * blocks * math.ceil(math.log2(k)):
                found.append((math.log2(k) / s, s, k))
    above = [f for f in found if f[0] >= target - 1e-12]
    if above:
        rate = min(f[0] for f in above)
        return max((f for f in above if abs(f[0] - rate) <= 1e-12), key=lambda f: f[1])[1:]
    if found:
        rate = max(f[0] for f in found)
        return max((f for f in found if abs(f[0] - rate) <= 1e-12), key=lambda f: f[1])[1:]
    return None, None


def test_auto_embedding_bank_worked_examples_at_minilm_size():
    """all-MiniLM-L6-v2's word table (30,522 x 384): the splits docs/accuracy.md gives for each budget."""
    numel, rows = 30522 * 384, [384, 384, 384]
    for b, expected in [(2.96, (6, 4096)), (4.06, (4, 8192)), (1.96, (8, 256)), (3.96, (4, 4096))]:
        config = MoMosConfig(block_size=4, bits_per_weight=b)
        assert _embedding_bank(config, max(1.0, b - EMBEDDING_BITS_BELOW), numel, rows, None) == expected
    assert _embedding_bank(MoMosConfig(bits_per_weight=3.0), 2.0, 500 * 16, [16], None) == (None, None)


@settings(max_examples=60, deadline=None)
@given(target=st.floats(1.0, 7.0), vocabulary=st.integers(100, 200_000), dim=st.sampled_from([16, 24, 48, 384]),
       dtype=st.sampled_from(["float16", "float32"]))
def test_auto_embedding_bank_is_the_nearest_qualifying_width(target, vocabulary, dim, dtype):
    config = MoMosConfig(block_size=4, bits_per_weight=3.0, motif_dtype=dtype)
    got = _embedding_bank(config, target, vocabulary * dim, [dim], None)
    assert got == _auto_reference(config, target, vocabulary * dim, [dim])


def test_auto_embedding_bits_split_one_budget():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(4096, 48), nn.Linear(48, 192), nn.ReLU(), nn.Linear(192, 48))
    config = MoMosConfig(block_size=4, bits_per_weight=3.0)
    packed = momos.compress(model, config)  # embedding_bits="auto" is the default
    report = momos.report(packed)
    assert report.bits_per_weight <= 3.0 + 1e-9  # the whole budget holds
    tensors = {t.name: t for t in report.tensors}
    s, k = _embedding_bank(config, 2.0, 4096 * 48, [48], None)
    assert (tensors["0.weight"].bank, tensors["0.weight"].block_size, tensors["0.weight"].num_motifs) == \
        ("0.weight", s, k)
    assert tensors["1.weight"].bank == tensors["3.weight"].bank == "global"
    assert tensors["1.weight"].bits_per_weight > tensors["0.weight"].bits_per_weight  # the matrices get more
    assert momos.report(momos.compress(model, config, embedding_bits="auto")).to_dict() == report.to_dict()


def test_auto_embedding_bits_keep_one_bank_where_there_is_nothing_to_split():
    model = _embedding_model()
    one_bank = {t.name: t.bank for t in momos.report(momos.compress(model, MoMosConfig(num_motifs=16))).tensors}
    assert set(one_bank.values()) == {"global"}  # no bits_per_weight budget
    assert momos.report(momos.compress(_mlp(), MoMosConfig(bits_per_weight=3.0))).tensors[0].bank == "global"
    tied = nn.Sequential(nn.Embedding(40, 16), nn.Linear(16, 40, bias=False))
    tied[1].weight = tied[0].weight
    assert {t.bank for t in momos.report(momos.compress(tied, MoMosConfig(bits_per_weight=3.0))).tensors} == {"global"}
    small = momos.report(momos.compress(model, MoMosConfig(bits_per_weight=3.0)))  # 500 rows: a table would cost more
    assert {t.bank for t in small.tensors} == {"global"}
    split = momos.report(momos.compress(model, MoMosConfig(bits_per_weight=3.0), embedding_bits=None))
    assert {t.bank for t in split.tensors} == {"global"}  # None asks for one bank
    with pytest.raises(MoMosConfigError, match="'auto' or None"):
        momos.compress(model, MoMosConfig(bits_per_weight=3.0), embedding_bits="half")


def test_a_motif_beyond_float16_range_is_refused_not_made_infinite():
    model = nn.Sequential(nn.Linear(32, 32))
    with torch.no_grad():
        model[0].weight.fill_(1e6)
    with pytest.raises(MoMosValueError, match="overflows motif_dtype='float16'.*float32"):
        momos.compress(model, MoMosConfig(num_motifs=16))
    packed = momos.compress(model, MoMosConfig(num_motifs=16, motif_dtype="float32"))
    assert torch.equal(packed[0].weight, model[0].weight)


def test_embedding_bits_refuses_what_it_cannot_split():
    model = _embedding_model()
    with pytest.raises(MoMosConfigError, match="bits_per_weight"):
        momos.compress(model, MoMosConfig(block_size=4, num_motifs=16), embedding_bits=2.0)
    with pytest.raises(MoMosConfigError, match="embedding_bits"):
        momos.compress(model, MoMosConfig(block_size=4, bits_per_weight=3.0), embedding_bits=-1.0)
    with pytest.raises(MoMosConfigError, match="no budget"):
        momos.compress(model, MoMosConfig(block_size=4, bits_per_weight=2.0), embedding_bits=10.0)
    with pytest.raises(MoMosSelectionError, match="no untied nn.Embedding"):
        momos.compress(_mlp(), MoMosConfig(block_size=4, bits_per_weight=3.0), embedding_bits=2.0)
    # a tied embedding is also an output matrix: it stays with the matrices, and nothing is left to split
    tied = nn.Sequential(nn.Embedding(40, 16), nn.Linear(16, 40, bias=False))
    tied[1].weight = tied[0].weight
    with pytest.raises(MoMosSelectionError, match="no untied nn.Embedding"):
        momos.compress(tied, MoMosConfig(block_size=4, bits_per_weight=3.0), embedding_bits=2.0)


def test_embedding_bits_give_every_embedding_the_largest_one_s_motifs():
    """BERT-like: a small token-type table, read by every token, gets as many motifs as the word table (capped at
    its blocks), not the few its own share of the budget would buy."""
    torch.manual_seed(0)

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.words, self.types, self.proj = nn.Embedding(500, 16), nn.Embedding(2, 16), nn.Linear(16, 8)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            return self.proj(self.words(ids) + self.types(torch.zeros_like(ids)))

    config = MoMosConfig(block_size=4, bits_per_weight=4.0)
    report = momos.report(momos.compress(Encoder(), config, embedding_bits=3.0))
    k = {t.name: t.num_motifs for t in report.tensors}
    assert k["words.weight"] == config.replace(bits_per_weight=3.0).num_motifs_for(2000, 8000)
    assert k["types.weight"] == 8  # all of its 8 blocks: the table is exact
    assert report.bits_per_weight <= 4.0


def test_embedding_block_size_gives_the_embeddings_longer_blocks_within_the_same_budget():
    model = _embedding_model()
    config = MoMosConfig(block_size=4, bits_per_weight=3.0)
    packed = momos.compress(model, config, embedding_bits=2.0, embedding_block_size=8)
    report = momos.report(packed)
    tensors = {t.name: t for t in report.tensors}
    assert tensors["0.weight"].block_size == 8 and tensors["1.weight"].block_size == 4
    own = config.replace(bits_per_weight=2.0, block_size=8)
    assert tensors["0.weight"].num_motifs == own.num_motifs_for(1000, 8000)
    assert report.bits_per_weight <= 3.0
    x = torch.randint(0, 500, (3, 5))
    torch.testing.assert_close(packed[0](x), packed[0].weight[x])  # decodes like any other packed tensor
    with pytest.raises(MoMosConfigError, match="embedding_block_size"):
        momos.compress(model, config, embedding_bits=None, embedding_block_size=8)
    for bad in (0, 2.5, True):
        with pytest.raises(MoMosConfigError, match="embedding_block_size"):
            momos.compress(model, config, embedding_bits=2.0, embedding_block_size=bad)
