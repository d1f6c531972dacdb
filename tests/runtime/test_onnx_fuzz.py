"""Fuzzing `runtime.inspect` and `runtime.load` with damaged copies of a real exported file.

Every damaged file (forged metadata values of the wrong type, missing keys, invalid JSON, flipped bytes,
truncation) must give a `ModelInfo` whose text and JSON render, or a `MoMosFormatError`: never another
exception, and never a line on stdout (onnxruntime's fallback prints an "EP Error ... retrying" banner there,
which breaks ``momos inspect --json``). The seeds are fixed, so a failure names the case that reproduces it.
"""

from __future__ import annotations

import contextlib
import io
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import momos
from momos import runtime
from momos.errors import MoMosFormatError
from momos.runtime import metadata as meta

# Values of every JSON type and of forms the exporter never writes.
FORGED: list[Any] = [None, 0, -1, 1.5, True, False, "x", "", [], {}, [1], {"a": 1}, [[1]], 2**70, -(2**70), "nan",
                     "\x1b[2J", [2**63, 2], [-1], ["global", [4], "uint8", "extra"]]
# Whole field texts that are not the JSON the exporter writes.
TEXTS = ["", "{", "[1,", "null", "\x00", "1e999", "NaN", "Infinity", "-Infinity", "[" * 100_000, "9" * 5000,
         '{"a": NaN}', "\x1b[31mred\x1b[0m", '"21"', "21.0", " 21 "]
JSON_KEYS = (meta.CONFIGS, meta.BANKS, meta.TENSORS, meta.TIED)


@pytest.fixture(scope="module")
def original(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, dict[str, str]]:
    """The bytes of an exported MLP with two banks and a tied tensor, and its metadata map."""
    torch.manual_seed(0)

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first = nn.Linear(8, 8)
            self.second = nn.Linear(8, 8)
            self.second.weight = self.first.weight
            self.head = nn.Linear(8, 12)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.relu(self.second(torch.relu(self.first(x)))))

    config = momos.MoMosConfig(block_size=4, capacity=0.25, scope="tensor")
    prepared = momos.prepare(Tied(), config)
    momos.refresh(prepared)
    packed = momos.convert(prepared).eval()
    path = tmp_path_factory.mktemp("fuzz") / "tied.onnx"
    momos.export.to_onnx(packed, torch.randn(2, 8), path)
    data = path.read_bytes()
    props = {p.key: p.value for p in onnx.load_from_string(data).metadata_props}
    assert set(meta.KEYS) | {meta.TIED} <= set(props) and len(json.loads(props[meta.BANKS])) > 1
    return data, props


def _with_metadata(data: bytes, props: dict[str, str]) -> bytes:
    model = onnx.load_from_string(data)
    del model.metadata_props[:]
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    return model.SerializeToString()


def _forge(value: Any, rng: random.Random) -> Any:
    """`value` with one nested entry replaced by a forged value, deleted, or renamed (the root: replaced)."""
    places: list[tuple[Any, Any]] = []  # (container, key or index)

    def walk(node: Any) -> None:
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for key, child in items:
            places.append((node, key))
            walk(child)

    walk(value)
    if not places or rng.random() < 0.05:
        return rng.choice(FORGED)
    container, key = rng.choice(places)
    action = rng.random()
    if action < 0.2:
        del container[key]
    elif action < 0.3 and isinstance(container, dict):
        container[rng.choice(["", "x", "\x1b[2J", "global "])] = container.pop(key)
    else:
        container[key] = rng.choice(FORGED)
    return value


def _forged_value(data: bytes, props: dict[str, str], rng: random.Random) -> bytes:
    props = dict(props)
    key = rng.choice(JSON_KEYS)
    props[key] = json.dumps(_forge(json.loads(props[key]), rng))
    return _with_metadata(data, props)


def _forged_field(data: bytes, props: dict[str, str], rng: random.Random) -> bytes:
    props = dict(props)
    key = rng.choice([*meta.KEYS, meta.TIED])
    action = rng.random()
    if action < 0.25:
        del props[key]
    elif action < 0.6:
        props[key] = rng.choice(TEXTS)
    else:
        props[key] = json.dumps(rng.choice(FORGED))
    return _with_metadata(data, props)


def _flipped(data: bytes, props: dict[str, str], rng: random.Random) -> bytes:
    damaged = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        damaged[rng.randrange(len(damaged))] ^= 1 << rng.randrange(8)
    return bytes(damaged)


def _truncated(data: bytes, props: dict[str, str], rng: random.Random) -> bytes:
    return data[:rng.randrange(len(data))]


def _run_inspect(path: Path) -> None:
    info = runtime.inspect(path)
    str(info)
    json.dumps(info.to_dict(), allow_nan=False)


def _run_load(path: Path) -> None:
    session = runtime.load(path, weights="compact")
    session.run({session.input_names[0]: np.zeros((2, 8), np.float32)})


# (mutation, cases, what runs on each damaged file): 1,200 files in all.
CASES: list[tuple[Callable[..., bytes], int, tuple[Callable[[Path], None], ...]]] = [
    (_forged_value, 450, (_run_inspect,)),
    (_forged_field, 250, (_run_inspect,)),
    (_flipped, 300, (_run_inspect, _run_load)),
    (_truncated, 200, (_run_inspect, _run_load)),
]


@pytest.mark.parametrize("mutate, cases, calls", CASES, ids=[c[0].__name__.strip("_") for c in CASES])
def test_damaged_files_give_a_model_info_or_a_format_error_and_print_nothing(
        original: tuple[bytes, dict[str, str]], tmp_path: Path, mutate: Callable[..., bytes], cases: int,
        calls: tuple[Callable[[Path], None], ...]) -> None:
    data, props = original
    path = tmp_path / "damaged.onnx"
    failures, refused = [], 0
    for seed in range(cases):
        path.write_bytes(mutate(data, props, random.Random(seed)))
        for call in calls:
            printed = io.StringIO()
            try:
                with contextlib.redirect_stdout(printed):
                    call(path)
            except MoMosFormatError as e:
                refused += 1
                assert repr(str(path)) in str(e) or "feeds" in str(e), str(e)  # names the file or the input
            except Exception as e:  # noqa: BLE001  the finding this test reports
                failures.append(f"{mutate.__name__} seed {seed} {call.__name__}: {type(e).__name__}: {e}"[:300])
            if printed.getvalue():
                failures.append(f"{mutate.__name__} seed {seed} {call.__name__} printed {printed.getvalue()[:200]!r}")
    assert not failures, "\n".join(failures)
    assert refused >= cases // 2  # the mutations do damage the files


BANK = r"momos\.banks\['first\.weight'\]"
HEAD = r"momos\.tensors\['head\.weight'\]"


@pytest.mark.parametrize("key, forged, field", [
    (meta.BANKS, lambda b: b["first.weight"].update(num_motifs="25"), BANK + r"\['num_motifs'\] must be an integer "
                                                                             r">= 1, got '25'"),
    (meta.BANKS, lambda b: b["first.weight"].update(config=7), BANK + r"\['config'\] must index momos\.configs "
                                                                      r"\(of 1\), got 7"),
    (meta.BANKS, lambda b: b["first.weight"].pop("index_bits"), BANK + r"\['index_bits'\] must be an integer >= 0, "
                                                                       r"got None"),
    (meta.CONFIGS, lambda c: c[0].pop("motif_dtype"), r"momos\.configs\[0\]\['motif_dtype'\] must be a printable"),
    (meta.TENSORS, lambda t: t.update({"head.weight": ["nowhere", [3, 8], "uint8"]}),
     HEAD + r" names bank 'nowhere', which momos\.banks lacks"),
    (meta.TENSORS, lambda t: t.update({"head.weight": t["head.weight"][:2]}),
     HEAD + r" must be a list \[bank, shape, storage\]"),
    (meta.TENSORS, lambda t: t["head.weight"].__setitem__(1, [2**40, 2**40]),
     HEAD + r" shape \[1099511627776, 1099511627776\] has more than 2\*\*63 - 1 entries"),
    (meta.TENSORS, lambda t: t["head.weight"].__setitem__(1, [3, True]),
     HEAD + r" shape entry must be an integer >= 0, got True"),
    (meta.TIED, lambda t: t.update({"second.weight": "missing"}), r"momos\.tied\['second\.weight'\] must name a "
                                                                  r"tensor"),
])
def test_a_forged_field_is_named_in_the_error(original: tuple[bytes, dict[str, str]], tmp_path: Path, key: str,
                                              forged: Callable[[Any], None], field: str) -> None:
    data, props = original
    value = json.loads(props[key])
    forged(value)
    (tmp_path / "forged.onnx").write_bytes(_with_metadata(data, {**props, key: json.dumps(value)}))
    with pytest.raises(MoMosFormatError, match=f"has malformed momos metadata: {field}"):
        runtime.inspect(tmp_path / "forged.onnx")


@pytest.mark.parametrize("key, text, message", [
    (meta.OPSET, "21.5", r"momos\.opset must be an integer >= 1, got 21\.5"),
    (meta.OPSET, "Infinity", r"momos\.opset is not valid JSON"),
    (meta.BANKS, "[" * 100_000, r"momos\.banks is not valid JSON"),
    (meta.VERSION, "0.1\x1b[2J", r"momos\.version must be a printable string, got '0\.1\\x1b\[2J'"),
    (meta.TENSORS, '{"a": ["global", [4], "uint8"]', r"momos\.tensors is not valid JSON"),
])
def test_malformed_field_texts_are_named(original: tuple[bytes, dict[str, str]], tmp_path: Path, key: str, text: str,
                                         message: str) -> None:
    data, props = original
    (tmp_path / "forged.onnx").write_bytes(_with_metadata(data, {**props, key: text}))
    with pytest.raises(MoMosFormatError, match=message):
        runtime.inspect(tmp_path / "forged.onnx")


def test_a_name_that_is_not_utf8_is_refused_without_a_banner_on_stdout(
        original: tuple[bytes, dict[str, str]], tmp_path: Path, capfd: pytest.CaptureFixture) -> None:
    """onnxruntime's message about such a name cannot be decoded; its fallback then printed a banner to stdout."""
    data, _ = original
    path = tmp_path / "latin.onnx"
    path.write_bytes(data.replace(b".mosaic", b".mos\xe1ic", 1))  # one node input, as long, so the protobuf parses
    for call in (runtime.inspect, runtime.load):
        with pytest.raises(MoMosFormatError, match="latin.onnx.*'utf-8' codec can't decode"):
            call(path)
    assert capfd.readouterr().out == ""


def test_metadata_that_is_not_utf8_is_refused(original: tuple[bytes, dict[str, str]], tmp_path: Path) -> None:
    data, props = original
    marked = _with_metadata(data, {**props, meta.VERSION: "\u00e9\u00e9"})
    path = tmp_path / "latin.onnx"
    path.write_bytes(marked.replace("\u00e9\u00e9".encode(), b"\xe9" * 4))
    with pytest.raises(MoMosFormatError, match="latin.onnx' has unreadable metadata: 'utf-8' codec"):
        runtime.inspect(path)
