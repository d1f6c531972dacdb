"""Export a packed (converted) model to ONNX with its weights still compressed in the file.

Every MoMos tensor becomes a small decode subgraph in front of its consumer::

    mosaic initializer -> [unpack: Gather/BitShift/BitwiseOr/BitwiseAnd] -> Cast int32
        -> Gather over the bank's motif initializer -> Reshape [-> Slice (drop padding) -> Reshape] -> consumer

One motif initializer per bank (one for the whole model in global scope). Mosaic layouts:

- ``"packed"`` (default): the indices as ``ceil(log2 k)``-bit fields in uint32 words, unpacked in the
  graph with integer ops (opset 18+). The words form groups of ``32/g`` fields in ``b/g`` words
  (``g = gcd(b, 32)``), each group a little-endian bit stream, so field j of every group sits at a fixed
  bit offset; the words are stored plane-major (word w of every group is one row), so the unpack is a
  handful of whole-row ops with tiny constant operands. Where b is 8, 16 or 32 the native array is
  already b bits wide, and no unpack is emitted.
- ``"native"``: the narrowest unsigned type onnxruntime casts from (UINT2 from opset 25, UINT4 from
  opset 21, else uint8/uint16/uint32), decoded by Cast alone.

Motif lookups (``motif_lookup``):

- ``"gather"`` (default): the motif initializer is (k, s) and one ``Gather(axis=0)`` copies a row per
  index; onnxruntime's Gather costs the same per index whatever the row width.
- ``"planes"``: the motif initializer is stored transposed, (s, k), and ``ai.onnx.ml.ArrayFeatureExtractor``
  looks each index up in the s planes (a plain element loop, cheaper than Gather's per-index copy), then
  a Transpose restores (m, s). A weight whose only consumer is ``Gemm(A, W, transB=1)``
  (nn.Linear) skips that Transpose: its mosaic is stored in block-column order (index of block (o, q)
  at ``q * out + o``), so the planes reshape straight to a (in, out) matrix with rows ordered (c, q),
  and the Gemm takes ``transB=0`` and its input A with columns permuted the same way (Reshape,
  Transpose, Reshape of the activations). Same file size; for compact sessions only: onnxruntime's
  ConstantFolding does not fold ai.onnx.ml ops, so a "planes" file decodes at every run even when
  loaded with ``weights="folded"``, at compact latency. Export with "gather" for folding.

The lookup is a Gather of motif rows by the mosaic: one row read per block, whatever the table's size, and
the same graph for int32 and int64 indices. The alternatives weighed and their measurements: docs/onnx.md
and docs/benchmarks.md (ONNX compact lookups).

How folding is prevented: the model is exported by ``torch.onnx.export(dynamo=True, optimize=False)``
with dense stand-ins for the MoMos tensors (named by their fully-qualified names), the stand-ins are
swapped for decode subgraphs with onnx-ir, and onnxscript's optimizer then cleans the rest of the graph
while the mosaic and motif initializers are hidden from it as graph inputs, so nothing downstream of
them can be folded; they become initializers again before saving. onnxruntime folds them at load time
only when asked to (``momos.runtime.load(path, weights="folded")``).

Everything but the payload counts against the file-size goal, and on a small model the graph's own bytes
are a visible share of the file (docs/benchmarks.md). So the file carries no exporter provenance, node
names or default-valued attributes, decoder values have short names, equal constants are one
initializer, and the metadata stores each tensor's k and bits once per bank.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ml_dtypes
import numpy as np
import onnx
import onnx_ir as ir
import torch
from onnxscript import optimizer
from torch import nn
from torch.nn.utils import parametrize
from torch.utils import _pytree as pytree

from momos.config import index_bits
from momos.errors import MoMosExportError
from momos.nn.packed import MotifTable, PackedTensor, dense_copy, packed_tensors, tied_tensors
from momos.runtime import metadata as meta

__all__ = ["ALL_AXES", "DEFAULT_OPSET", "LAYOUTS", "LOOKUPS", "MIN_OPSET", "pack_indices", "require_runtime",
           "to_onnx", "unpack_indices"]

LAYOUTS = ("packed", "native")
LOOKUPS = ("gather", "planes")
_ML_DOMAIN, _ML_OPSET = "ai.onnx.ml", 3
DEFAULT_OPSET = 21
MIN_OPSET = 18  # BitwiseAnd/BitwiseOr
ALL_AXES = "all"  # dynamic_shapes: every axis of every input that the model lets vary


_MOTIF_DTYPES = {"float64": ir.DataType.DOUBLE, "float32": ir.DataType.FLOAT, "float16": ir.DataType.FLOAT16,
                 "bfloat16": ir.DataType.BFLOAT16}
_TORCH_DTYPES = {torch.float32: ir.DataType.FLOAT, torch.float16: ir.DataType.FLOAT16,
                 torch.bfloat16: ir.DataType.BFLOAT16, torch.float64: ir.DataType.DOUBLE}
_FEATURE_DTYPES = (ir.DataType.FLOAT, ir.DataType.DOUBLE)  # what ArrayFeatureExtractor looks up
_WORD_BITS = 32
_UNPACK_NODE_BYTES = 300  # what the unpack nodes of one tensor add to the file (12-bit fields: 6 nodes)


def to_onnx(packed_model: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor],
            path: str | os.PathLike, *, mosaic_layout: str = "packed", input_names: Sequence[str] | None = None,
            output_names: Sequence[str] | None = None, opset: int = DEFAULT_OPSET,
            motif_lookup: str = "gather", dynamic_shapes: Any = None) -> onnx.ModelProto:
    """Write `packed_model` (the result of `momos.convert`) to `path` as ONNX and return the model proto.

    The file passes onnx.checker, carries the lowest IR version that holds `opset`, and is checked to load
    in the installed onnxruntime. A tied tensor (one packed tensor read under several names) is stored and
    decoded once.

    Args:
        packed_model: a converted model.
        example_inputs: the positional tensor inputs of one forward call.
        path: where to write the file.
        mosaic_layout: how mosaics are stored, one of `LAYOUTS` (see the module doc).
        input_names: the inputs' names (default ``input``, or ``input_0, input_1, ...``).
        output_names: the outputs' names (default: the keys of a dict or ModelOutput, the fields of a
            NamedTuple, joined with ``.`` where nested; ``output``, or ``output_0, output_1, ...`` for plain
            tensors and sequences).
        opset: the ONNX opset, at least `MIN_OPSET`.
        motif_lookup: the decode op, one of `LOOKUPS` (see the module doc).
        dynamic_shapes: which input axes may vary, as in ``torch.onnx.export(dynamo=True)`` (torch.export's
            format: per input a dict or sequence of axis -> ``torch.export.Dim`` or a name string, which
            becomes the ONNX dim's name). None (default): dimension 0 of every input, named ``batch``.
            `ALL_AXES` (``"all"``): every axis of every input that the model lets vary (the others stay
            fixed), named ``batch`` for dimension 0 and ``<input>_dim<i>`` otherwise. With None and
            ``"all"`` a batch of 1 is traced as 2; trace every other dynamic axis with a size of at least 2,
            since torch.export fixes axes of size 1.

    Returns:
        The model proto written.

    Raises:
        MoMosExportError: a model that is not converted, inputs that do not fit its forward, an invalid
            argument, or an opset/IR this onnxruntime cannot read.
    """
    if mosaic_layout not in LAYOUTS:
        raise MoMosExportError(f"mosaic_layout must be one of {list(LAYOUTS)}, got {mosaic_layout!r}")
    if motif_lookup not in LOOKUPS:
        raise MoMosExportError(f"motif_lookup must be one of {list(LOOKUPS)}, got {motif_lookup!r}")
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise MoMosExportError(f"opset must be an integer >= {MIN_OPSET} (BitwiseAnd/BitwiseOr), got {opset!r}")
    tensors = _check_converted(packed_model)
    named_axes = dynamic_shapes is None or (isinstance(dynamic_shapes, str) and dynamic_shapes == ALL_AXES)
    if isinstance(dynamic_shapes, str) and not named_axes:
        raise MoMosExportError(f"dynamic_shapes must be None, {ALL_AXES!r} or torch.export's dynamic shapes, "
                               f"got {dynamic_shapes!r}")
    inputs, output = _check_inputs(packed_model, example_inputs, needs_batch=dynamic_shapes is None)
    input_names = _names(input_names, len(inputs), "input")
    if dynamic_shapes is None:
        dynamic_shapes = tuple({0: torch.export.Dim.DYNAMIC} for _ in inputs)
    elif named_axes:  # AUTO: an axis the model does not let vary stays fixed instead of failing the export
        dynamic_shapes = tuple({axis: torch.export.Dim.AUTO for axis in range(x.dim())} for x in inputs)
    if named_axes:
        inputs = _batch_of_two(inputs)

    # Decoded weights named by their fully-qualified names, which is how the decoders find them; on the CPU,
    # since an ONNX file holds no device.
    dense = dense_copy(packed_model).cpu().eval()
    try:
        program = torch.onnx.export(
            dense, tuple(x.cpu() for x in inputs), dynamo=True, optimize=False, opset_version=opset,
            input_names=input_names, output_names=list(output_names) if output_names is not None else None,
            dynamic_shapes=dynamic_shapes, verbose=False,
        )
    except Exception as e:  # the exporter raises many types; all mean "this forward cannot be exported"
        raise MoMosExportError(f"torch.onnx.export failed for {type(packed_model).__name__}: {e}") from e
    model = program.model
    num_outputs = len(model.graph.outputs)
    if output_names is None:
        for value, name in zip(model.graph.outputs, _output_names(output, num_outputs), strict=True):
            value.name = name
    elif len(output_names) != num_outputs:
        raise MoMosExportError(f"output_names has {len(output_names)} names, the model has {num_outputs} outputs")

    _fix_pinned_dims(model.graph, program.exported_program)
    if named_axes:
        _name_dims(model.graph)
    hidden = _insert_decoders(model.graph, tensors, tied_tensors(packed_model), mosaic_layout, opset,
                              motif_lookup)
    if motif_lookup == "planes":
        model.opset_imports[_ML_DOMAIN] = _ML_OPSET
    _optimize_around(model, hidden)
    model.metadata_props.update(_metadata(tensors, tied_tensors(packed_model), mosaic_layout, opset))
    model.ir_version = onnx.helper.find_min_ir_version_for(
        [onnx.helper.make_opsetid("", opset)], ignore_unknown=True)
    if any(v.const_value is not None and v.const_value.dtype in (ir.DataType.UINT4, ir.DataType.UINT2)
           for v in model.graph.initializers.values()):
        model.ir_version = max(model.ir_version, 10 if opset < 25 else 11)

    proto = ir.to_proto(model)
    _strip_annotations(proto)
    _drop_default_attributes(proto)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as e:
        raise MoMosExportError(f"the exported graph fails onnx.checker: {e}") from e
    require_runtime(proto)
    with open(path, "wb") as f:
        f.write(proto.SerializeToString())
    return proto


def require_runtime(proto: onnx.ModelProto) -> None:
    """Raise `MoMosExportError` unless the installed onnxruntime can load `proto` (opset and IR version)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        # No provider fallback: on a model it cannot load, it prints a banner to stdout and retries the same provider.
        ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"],
                             enable_fallback=0)
    except Exception as e:  # onnxruntime raises its own exception types per binding
        opsets = {o.domain or "ai.onnx": o.version for o in proto.opset_import}
        if "implementation" in str(e).lower():  # a kernel missing for an op at this dtype (bfloat16 Gemm on CPU)
            fix = "onnxruntime has no kernel for an op of the model at its dtype: export a float32 or float16 copy"
        else:
            fix = "upgrade onnxruntime or export with a lower opset"
        raise MoMosExportError(
            f"onnxruntime {ort.__version__} cannot load the exported model (ir_version={proto.ir_version}, "
            f"opsets={opsets}): {fix}. onnxruntime said: {e}"
        ) from e


# ---------------------------------------------------------------------------------------------
# Checks on the torch side.

def _check_converted(model: nn.Module) -> list[tuple[str, PackedTensor]]:
    prepared = [n for n, m in model.named_modules() if parametrize.is_parametrized(m)]
    if prepared:
        raise MoMosExportError(f"model is prepared but not converted (parametrized module {prepared[0]!r}): "
                               "call momos.convert(model) before exporting")
    tensors = list(packed_tensors(model))
    if not tensors:
        raise MoMosExportError("model has no MoMos tensors: prepare, train and momos.convert it before exporting")
    return tensors


def _check_inputs(model: nn.Module, example_inputs: torch.Tensor | Sequence[torch.Tensor],
                  needs_batch: bool) -> tuple[tuple[torch.Tensor, ...], Any]:
    """(the inputs as a tuple, the model's output on them)."""
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    if not inputs or not all(isinstance(x, torch.Tensor) for x in inputs):
        kinds = [type(x).__name__ for x in inputs]
        raise MoMosExportError(f"example_inputs must be one tensor or a sequence of tensors, got {kinds}")
    if needs_batch and any(x.dim() == 0 for x in inputs):
        raise MoMosExportError("every example input needs a batch dimension (dim 0); got a 0-d tensor")
    try:
        with torch.no_grad():
            output = model(*inputs)
    except Exception as e:  # whatever the forward raises means the signature does not fit
        shapes = [f"{tuple(x.shape)} {x.dtype}" for x in inputs]
        raise MoMosExportError(f"example_inputs {shapes} do not fit the forward of "
                               f"{type(model).__name__}: {type(e).__name__}: {e}") from e
    return inputs, output


def _names(names: Sequence[str] | None, count: int, stem: str) -> list[str]:
    if names is None:
        return [stem] if count == 1 else [f"{stem}_{i}" for i in range(count)]
    if len(names) != count or len(set(names)) != count:
        raise MoMosExportError(f"{stem}_names must be {count} distinct names, got {list(names)!r}")
    return list(names)


def _output_names(output: Any, count: int) -> list[str]:
    """The names of the `count` graph outputs flattened from the forward's `output`: a dict's (or
    ModelOutput's) keys, a NamedTuple's fields, joined with ``.`` where nested; the positions of a sequence
    as ``output_<i>``; ``output`` for one tensor. Where the tensors do not match the graph's outputs one to
    one (an output the exporter drops or adds), ``output_<i>`` for each."""
    paths = [path for path, leaf in pytree.tree_flatten_with_path(output)[0] if isinstance(leaf, torch.Tensor)]
    names = []
    for path in paths:
        parts = [str(k.key) if isinstance(k, pytree.MappingKey) else k.name if isinstance(k, pytree.GetAttrKey)
                 else str(k.idx) if isinstance(k, pytree.SequenceKey) else str(k) for k in path]
        if path and isinstance(path[0], pytree.SequenceKey):
            parts[0] = f"output_{parts[0]}"
        names.append(".".join(parts) or "output")
    if len(names) != count or len(set(names)) != count:
        return _names(None, count, "output")
    return names


def _batch_of_two(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Trace with batch 2: torch.export specialises a batch of 1 to a constant."""
    return tuple(torch.cat([x, x]) if x.dim() and x.shape[0] == 1 else x for x in inputs)


# ---------------------------------------------------------------------------------------------
# Mosaic layouts (numpy encode, graph decode).

@dataclass(frozen=True)
class _FieldLayout:
    """Where field j of each group of the packed stream sits: group = `fields` fields in `words` words."""

    bits: int
    fields: int
    words: int

    @classmethod
    def for_bits(cls, bits: int) -> _FieldLayout:
        g = math.gcd(bits, _WORD_BITS)
        return cls(bits, _WORD_BITS // g, bits // g)

    def offsets(self) -> tuple[np.ndarray, np.ndarray]:
        """(word index, bit shift) of each field within its group."""
        start = np.arange(self.fields) * self.bits
        return start // _WORD_BITS, start % _WORD_BITS

    @property
    def crosses(self) -> bool:
        """Whether some field spans two words (bits does not divide 32)."""
        return _WORD_BITS % self.bits != 0


def pack_indices(indices: np.ndarray, bits: int) -> np.ndarray:
    """The uint32 words of `indices` as `bits`-bit fields in planes (zero-padded to whole groups).

    With ``F`` fields in ``W`` words per group and ``G = ceil(n / F)`` groups, index ``i`` is field
    ``i // G`` of group ``i % G``, and the words form a (W, G) array: row w holds word w of every group.
    Each group is a little-endian bit stream of its F fields over its W words. Field j of all groups
    is one contiguous plane, so the graph unpacks it with whole-row operations (no per-element gathers,
    no short broadcasts).
    """
    layout = _FieldLayout.for_bits(bits)
    groups = -(-indices.size // layout.fields)
    fields = np.zeros(groups * layout.fields, dtype=np.uint64)
    fields[:indices.size] = indices
    fields = fields.reshape(layout.fields, groups)
    words = np.zeros((layout.words, groups), dtype=np.uint64)
    word, shift = layout.offsets()
    for j in range(layout.fields):
        words[word[j]] |= (fields[j] << np.uint64(shift[j])) & np.uint64(0xFFFFFFFF)
        if shift[j] + bits > _WORD_BITS:
            words[word[j] + 1] |= fields[j] >> np.uint64(_WORD_BITS - shift[j])
    return words.astype(np.uint32).reshape(-1)


def unpack_indices(words: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of `pack_indices` (numpy mirror of the graph's unpack): the first `count` indices as int64."""
    layout = _FieldLayout.for_bits(bits)
    grid = words.astype(np.uint64).reshape(layout.words, -1)
    word, shift = layout.offsets()
    hi = np.minimum(word + 1, layout.words - 1)
    lo_part = grid[word] >> shift.astype(np.uint64)[:, None]
    hi_shift = np.minimum(_WORD_BITS - shift, _WORD_BITS - 1).astype(np.uint64)
    hi_part = (grid[hi] << hi_shift[:, None]) & np.uint64(0xFFFFFFFF)
    values = (lo_part | hi_part) & np.uint64((1 << bits) - 1)
    return values.reshape(-1)[:count].astype(np.int64)


def _bit_packs(count: int, bits: int, layout: str) -> bool:
    """Whether a mosaic of `count` `bits`-bit indices is stored as a packed stream (else as a native array).

    Layout "packed" packs wherever that makes the file smaller: not where the native array is already
    exactly b bits wide, and not for tensors so small that the unpack nodes cost more than they save.
    """
    if layout == "native" or bits in (8, 16, 32):
        return False
    native_bits = 8 if bits < 8 else 16 if bits < 16 else 32
    return count * (native_bits - bits) // 8 > _UNPACK_NODE_BYTES


def _native_dtype(bits: int, opset: int) -> tuple[ir.DataType, Any]:
    """(ONNX type, numpy type) of the narrowest unsigned array onnxruntime casts from at `opset`."""
    if bits <= 2 and opset >= 25:
        return ir.DataType.UINT2, ml_dtypes.uint2
    if bits <= 4 and opset >= 21:
        return ir.DataType.UINT4, ml_dtypes.uint4
    for width, onnx_type, np_type in ((8, ir.DataType.UINT8, np.uint8), (16, ir.DataType.UINT16, np.uint16)):
        if bits <= width:
            return onnx_type, np_type
    return ir.DataType.UINT32, np.uint32


# ---------------------------------------------------------------------------------------------
# Graph rewriting.

class _Builder:
    """Appends one tensor's decode nodes to a list; small constants are initializers shared graph-wide.

    Value names cost file bytes twice (producer and consumer), so they are short: ``m<position>.<step>``
    for the tensor's values, ``m.<name>`` for the constants, made unique against `names` (all names taken).
    """

    def __init__(self, graph: ir.Graph, position: int, constants: dict[tuple[bytes, str, tuple[int, ...]], ir.Value],
                 names: set[str]) -> None:
        self.graph = graph
        self.prefix = f"m{position}"
        self.constants = constants
        self.names = names
        self.nodes: list[ir.Node] = []

    def op(self, op_type: str, inputs: Sequence[ir.Value], name: str, domain: str = "", **attributes: Any) -> ir.Value:
        node = ir.node(op_type, inputs, attributes or None, domain=domain)
        node.outputs[0].name = _unique_name(self.names, f"{self.prefix}.{name}")
        self.nodes.append(node)
        return node.outputs[0]

    def const(self, values: np.ndarray, name: str) -> ir.Value:
        """The initializer holding `values`, shared with every earlier use of equal values (named by the first)."""
        key = (values.tobytes(), str(values.dtype), values.shape)
        if key not in self.constants:
            self.constants[key] = _initializer(self.graph, _unique_name(self.names, f"m.{name}"), values)
        return self.constants[key]


def _initializer(graph: ir.Graph, name: str, array: np.ndarray, dtype: ir.DataType | None = None) -> ir.Value:
    tensor = ir.tensor(array, dtype=dtype, name=name)
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(tensor.dtype),
                     const_value=tensor)
    graph.register_initializer(value)
    return value


def _motif_array(table: MotifTable) -> np.ndarray:
    motifs = table.stored_motifs().cpu()
    if motifs.dtype == torch.bfloat16:
        return motifs.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return motifs.numpy()


def _insert_decoders(graph: ir.Graph, tensors: list[tuple[str, PackedTensor]], tied: dict[str, str], layout: str,
                     opset: int, lookup: str) -> list[ir.Value]:
    """Replace each MoMos tensor's dense initializer by its decode subgraph; return the compressed initializers.

    The exporter names a tied tensor's one initializer by one of its names (`tied`: further name -> first),
    not necessarily the first; its decoder takes the first name."""
    hidden: list[ir.Value] = []
    tables: dict[int, ir.Value] = {}
    constants: dict[tuple[bytes, str, tuple[int, ...]], ir.Value] = {}
    first_use: dict[str, ir.Node] = {}  # decoders go right before their first consumer: short-lived in compact mode
    names = {value.name for value in [*graph.inputs, *graph.initializers.values()]}
    for node in graph:
        names.update(value.name for value in node.outputs)
        for value in node.inputs:
            if value is not None and value.is_initializer():
                first_use.setdefault(value.name, node)
    aliases: dict[str, list[str]] = {}
    for name, first in tied.items():
        aliases.setdefault(first, []).append(name)
    for position, (fqn, packed) in enumerate(tensors):
        exported = next((n for n in [fqn, *aliases.get(fqn, [])] if n in graph.initializers), fqn)
        if exported != fqn:  # the decoder finds and replaces the initializer under the tensor's first name
            value = graph.initializers.pop(exported)
            value.name = fqn
            graph.register_initializer(value)
            if exported in first_use:
                first_use[fqn] = first_use.pop(exported)
        dense = graph.initializers.get(fqn)
        if dense is None:
            raise MoMosExportError(f"the exported graph has no initializer {fqn!r} for MoMos tensor {fqn!r}")
        table = packed.table
        if id(table) not in tables:
            name = _unique_name(names, f"momos.motifs.{table.name}")
            motifs = _motif_array(table)
            tables[id(table)] = _initializer(graph, name, motifs.T.copy() if lookup == "planes" else motifs,
                                             _MOTIF_DTYPES[table.config.motif_dtype])
            hidden.append(tables[id(table)])
        if fqn not in first_use:  # an unused parameter: drop it from the file
            graph.initializers.pop(fqn)
            continue
        b = _Builder(graph, position, constants, names)
        motifs = tables[id(table)]
        target = _TORCH_DTYPES[packed.dtype]
        # ArrayFeatureExtractor takes float/double only: half-width planes are looked up in float32 (exact).
        lookup_type = target if lookup == "gather" or target in _FEATURE_DTYPES else ir.DataType.FLOAT
        if motifs.dtype != lookup_type:
            motifs = b.op("Cast", [motifs], "mcast", to=lookup_type)
        index_type = ir.DataType.INT64 if lookup == "planes" else ir.DataType.INT32
        gemm = _linear_gemm(dense, packed) if lookup == "planes" and lookup_type == target else None
        order = packed.mosaic.detach().cpu().numpy().astype(np.int64)
        if gemm is not None:  # block-column order: block (o, q) at q * out + o
            order = order.reshape(packed.shape[0], -1).T.reshape(-1)
        indices, mosaic = _indices(graph, b, fqn, order, packed.table.num_motifs, layout, opset, index_type)
        hidden.append(mosaic)
        if gemm is not None:
            planes = b.op("ArrayFeatureExtractor", [motifs, indices], "planes", domain=_ML_DOMAIN)
            decoded = b.op("Reshape", [planes, b.const(np.array([-1, packed.shape[0]], np.int64), "in_out")],
                           "w")
            _permute_gemm_input(b, gemm, packed)
            graph.insert_before(gemm, b.nodes)
            dense.replace_all_uses_with(decoded)
            graph.initializers.pop(fqn)
            decoded.name = fqn
            continue
        if lookup == "planes":
            planes = b.op("ArrayFeatureExtractor", [motifs, indices], "planes", domain=_ML_DOMAIN)
            blocks = b.op("Transpose", [planes], "blocks", perm=[1, 0])
        else:
            blocks = b.op("Gather", [motifs, indices], "rows", axis=0)
        if lookup_type != target:
            blocks = b.op("Cast", [blocks], "rcast", to=target)
        padded = packed.num_blocks * table.block_size != packed.numel
        if padded:
            flat = b.op("Reshape", [blocks, b.const(np.array([-1], np.int64), "flat")], "flat")
            blocks = b.op("Slice", [flat, b.const(np.array([0], np.int64), "zero"),
                                    b.const(np.array([packed.numel], np.int64), "numel")], "cut")
        if padded and len(packed.shape) == 1:
            decoded = blocks
        else:  # dim 0 as -1: weights that differ only there (and all 1-D tensors) share one shape constant
            shape = [-1, *packed.shape[1:]] if packed.shape else []
            decoded = b.op("Reshape", [blocks, b.const(np.array(shape, np.int64), "shape")], "w")
        graph.insert_before(first_use[fqn], b.nodes)
        dense.replace_all_uses_with(decoded)
        graph.initializers.pop(fqn)
        decoded.name = fqn  # the decoded tensor takes the dense initializer's place and name
    return hidden


def _unique_name(names: set[str], name: str) -> str:
    """`name`, or `name` with the first free numeric suffix; recorded in `names` as taken."""
    suffix = 1
    unique = name
    while unique in names:
        unique, suffix = f"{name}{suffix}", suffix + 1
    names.add(unique)
    return unique


def _linear_gemm(dense: ir.Value, packed: PackedTensor) -> ir.Node | None:
    """The node consuming `dense` when that is its only use and it is ``Gemm(A, dense, transB=1, transA=0)``
    over a 2-D weight whose rows hold whole blocks; else None."""
    uses = list(dense.uses())
    if len(uses) != 1 or len(packed.shape) != 2 or packed.shape[1] % packed.table.block_size:
        return None
    node, index = uses[0]
    attributes = node.attributes
    trans_a = attributes["transA"].value if "transA" in attributes else 0
    trans_b = attributes["transB"].value if "transB" in attributes else 0
    if node.op_type != "Gemm" or node.domain not in ("", "ai.onnx") or index != 1 or trans_a or not trans_b:
        return None
    return node


def _permute_gemm_input(b: _Builder, gemm: ir.Node, packed: PackedTensor) -> None:
    """Make `gemm` take W as (in, out) with rows ordered (c, q): A's columns 4q + c move to c * Q + q."""
    s = packed.table.block_size
    in_features = packed.shape[1]
    grouped = b.op("Reshape", [gemm.inputs[0], b.const(np.array([-1, in_features // s, s], np.int64),
                                                        f"by_block{in_features}")], "a_blocks")
    swapped = b.op("Transpose", [grouped], "a_planes", perm=[0, 2, 1])
    permuted = b.op("Reshape", [swapped, b.const(np.array([-1, in_features], np.int64), f"rows{in_features}")],
                    "a_permuted")
    gemm.replace_input_with(0, permuted)
    gemm.attributes["transB"] = ir.AttrInt64("transB", 0)


def _indices(graph: ir.Graph, b: _Builder, fqn: str, mosaic: np.ndarray, num_motifs: int, layout: str,
             opset: int, index_type: ir.DataType) -> tuple[ir.Value, ir.Value]:
    """(index value of shape (m,) and type `index_type`, the initializer that stores `mosaic` (int64 indices))."""
    bits = max(1, index_bits(num_motifs))
    if not _bit_packs(mosaic.size, bits, layout):
        onnx_type, np_type = _native_dtype(bits, opset if layout == "native" else 0)
        stored = _initializer(graph, f"{fqn}.mosaic", mosaic.astype(np_type), onnx_type)
        return b.op("Cast", [stored], "idx", to=index_type), stored

    fields = _FieldLayout.for_bits(bits)
    grid = _initializer(graph, f"{fqn}.mosaic", pack_indices(mosaic, bits).reshape(fields.words, -1))
    word, shift = fields.offsets()
    # Planes: row j of (F, G) is field j of every group; shifts are (F, 1) columns, so each broadcast spans a row.
    lo = b.op("Gather", [grid, b.const(word.astype(np.int32), f"lo_word{bits}")], "lo", axis=0)
    value = b.op("BitShift", [lo, b.const(shift.astype(np.uint32)[:, None], f"lo_shift{bits}")], "lo_s",
                 direction="RIGHT")
    if fields.crosses:
        # A field's high part: hi << (32 - shift). Fields that do not cross take shift 31 instead of 32 (which
        # BitShift leaves undefined): any shift >= bits puts hi above the mask.
        hi_word = np.minimum(word + 1, fields.words - 1).astype(np.int32)
        hi = b.op("Gather", [grid, b.const(hi_word, f"hi_word{bits}")], "hi", axis=0)
        hi_shift = np.minimum(_WORD_BITS - shift, _WORD_BITS - 1).astype(np.uint32)[:, None]
        hi = b.op("BitShift", [hi, b.const(hi_shift, f"hi_shift{bits}")], "hi_s", direction="LEFT")
        value = b.op("BitwiseOr", [value, hi], "or")
    value = b.op("BitwiseAnd", [value, b.const(np.array((1 << bits) - 1, np.uint32), f"mask{bits}")], "and")
    if mosaic.size % fields.fields:  # else the (F, G) planes, read row-major, are the stream as they stand
        value = b.op("Reshape", [value, b.const(np.array([-1], np.int64), "flat")], "flat")
        value = b.op("Slice", [value, b.const(np.array([0], np.int64), "zero"),
                               b.const(np.array([mosaic.size], np.int64), "num_blocks")], "used")
    return b.op("Cast", [value], "idx", to=index_type), grid


def _optimize_around(model: ir.Model, hidden: list[ir.Value]) -> None:
    """Run onnxscript's optimizer on everything but the decoders: compressed initializers become inputs meanwhile."""
    graph = model.graph
    tensors = {}
    for value in hidden:
        tensors[value.name] = value.const_value
        graph.initializers.pop(value.name)
        value.const_value = None
        graph.inputs.append(value)
    optimizer.optimize_ir(model)
    for value in hidden:
        graph.inputs.remove(value)
        value.const_value = tensors[value.name]
        graph.register_initializer(value)


def _fix_pinned_dims(graph: ir.Graph, program: torch.export.ExportedProgram) -> None:
    """Write as a number each input and output dim whose symbol torch.export pinned to one value (a feature
    axis that ``Dim.AUTO`` let the exporter keep symbolic, though the weights fix its size)."""
    pinned = {str(symbol): int(bounds.lower) for symbol, bounds in program.range_constraints.items()
              if bounds.is_int and bounds.lower == bounds.upper}
    for value in [*graph.inputs, *graph.outputs]:
        if value.shape is not None:
            value.shape = ir.Shape([pinned.get(str(d), d) if isinstance(d, ir.SymbolicDim) else d
                                    for d in value.shape])


def _name_dims(graph: ir.Graph) -> None:
    """Name the exporter's symbols for the inputs' dynamic axes wherever inputs and outputs use them: "batch"
    for dimension 0, else ``<input>_dim<i>`` of the first input axis that has it."""
    names: dict[str, str] = {}
    for value in graph.inputs:
        for axis, dim in enumerate(value.shape or []):
            if isinstance(dim, ir.SymbolicDim) and dim.value is not None:
                names.setdefault(str(dim), "batch" if axis == 0 else f"{value.name}_dim{axis}")
    for value in [*graph.inputs, *graph.outputs]:
        if value.shape is not None:
            value.shape = ir.Shape([names.get(str(d), d) if isinstance(d, ir.SymbolicDim) else d
                                    for d in value.shape])


def _strip_annotations(proto: onnx.ModelProto) -> None:
    """Drop the exporter's provenance (stack traces, module paths, graph signature), node names and value_info.

    They are several times larger than a small model's compressed weights; onnxruntime names nodes and
    re-infers shapes itself.
    """
    del proto.graph.metadata_props[:]
    for node in proto.graph.node:
        del node.metadata_props[:]
        node.ClearField("name")
    for value in [*proto.graph.input, *proto.graph.output, *proto.graph.initializer]:
        del value.metadata_props[:]
    del proto.graph.value_info[:]


def _drop_default_attributes(proto: onnx.ModelProto) -> None:
    """Remove attributes that restate their schema default (the exporter writes Gemm's alpha, beta, transA)."""
    opsets = {o.domain: o.version for o in proto.opset_import}
    for node in proto.graph.node:
        try:
            schema = onnx.defs.get_schema(node.op_type, opsets.get(node.domain, 1), node.domain)
        except onnx.defs.SchemaError:  # an op onnx does not know: keep what it says
            continue
        kept = []
        for attribute in node.attribute:
            default = schema.attributes[attribute.name].default_value if attribute.name in schema.attributes else None
            if default is None or not default.name or default.type != attribute.type or \
                    onnx.helper.get_attribute_value(default) != onnx.helper.get_attribute_value(attribute):
                kept.append(attribute)
        if len(kept) < len(node.attribute):
            del node.attribute[:]
            node.attribute.extend(kept)


def _metadata(tensors: list[tuple[str, PackedTensor]], tied: dict[str, str], layout: str,
              opset: int) -> dict[str, str]:
    """Compact JSON: distinct configs once, banks (k, s, bits) pointing at them, each tensor as the list of its
    `TENSOR_FIELDS` (bank, shape, storage); `momos.runtime.inspect` restores its k and bits from the bank.
    Ties (further name -> first name), where there are any."""
    from momos import __version__

    configs: list[dict[str, Any]] = []
    banks: dict[str, dict[str, Any]] = {}
    per_tensor: dict[str, list[Any]] = {}
    for fqn, packed in tensors:
        table = packed.table
        k = table.num_motifs
        if table.name not in banks:
            config = table.config.to_dict()
            if config not in configs:
                configs.append(config)
            banks[table.name] = {"config": configs.index(config), "num_motifs": k,
                                 "block_size": table.block_size, "index_bits": index_bits(k)}
        bits = max(1, index_bits(k))
        if not _bit_packs(packed.num_blocks, bits, layout):
            storage = _native_dtype(bits, opset if layout == "native" else 0)[0].name.lower()
        else:
            storage = f"uint32x{bits}"
        fields = {"bank": table.name, "shape": list(packed.shape), "storage": storage}
        per_tensor[fqn] = [fields[name] for name in meta.TENSOR_FIELDS]
    compact = {"separators": (",", ":")}
    props = {meta.VERSION: __version__, meta.LAYOUT: layout, meta.OPSET: str(opset),
             meta.CONFIGS: json.dumps(configs, **compact), meta.BANKS: json.dumps(banks, **compact),
             meta.TENSORS: json.dumps(per_tensor, **compact)}
    if tied:
        props[meta.TIED] = json.dumps(tied, **compact)
    return props
