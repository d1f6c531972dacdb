"""What MoMos does to a tensor (`MoMosConfig`) and which tensors it does it to (selectors).

Both halves are plain data: `MoMosConfig` is a frozen dataclass validated on construction, and
`resolve` maps a model's parameters to configs with a written precedence:

    exact name  >  regex  >  module type  >  default

An exact name is a parameter's fully-qualified name (``"encoder.0.weight"``) or a module's
(``"encoder.0"``, which selects the parameters that module owns directly). A regex is a compiled
``re.Pattern`` or a string starting with ``"re:"``; it must match a parameter's full name
(``re.fullmatch``). A module type is an ``nn.Module`` subclass and selects the parameters owned by
modules that are instances of it. Within one level an exclusion beats an override, which beats an
inclusion.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from momos.errors import MoMosConfigError, MoMosSelectionError

SCOPES = ("global", "tensor")
MODES = ("hard", "ste")
MOTIF_INITS = ("random", "kmeans")
# What `prepare` selects when no `include` is given: every trainable floating-point parameter with at least two
# dimensions (weight matrices, convolution kernels, embeddings), or every one (the paper's, biases and norms too).
TARGETS = ("matrices", "all")
MOTIF_DTYPES = {"float64": 64, "float32": 32, "float16": 16, "bfloat16": 16}  # motif dtype -> bits per value (q)

# Fields that every tensor sharing one global bank must agree on.
BANK_FIELDS = ("block_size", "capacity", "num_motifs", "bits_per_weight", "force_zero", "motif_init", "kmeans_iters",
               "mode", "motif_dtype", "seed")


@dataclass(frozen=True)
class MoMosConfig:
    """How to turn tensors into a mosaic of motifs.

    Give exactly one of `capacity` (c: the bank holds ``max(1, min(floor(c * m), m))`` motifs for the m
    blocks it serves), `num_motifs` (k, capped at m) or `bits_per_weight` (b: the largest k whose mosaic and
    motif table take at most b bits per weight of the tensors the bank serves, see `num_motifs_for`).
    `targets` is what `prepare` selects when it is given no `include`: ``"matrices"`` (the default) every
    trainable floating-point parameter with at least two dimensions, so biases and norms stay dense; ``"all"``
    every trainable floating-point parameter (the paper's). It is read from the config given to `prepare`, not
    from overrides. `motif_init` is how a refresh draws the bank: ``"kmeans"`` (the default) refines a draw
    of the blocks by `kmeans_iters` Lloyd iterations, ``"random"`` keeps the draw (the paper's).
    `scope="global"` shares one bank among all
    targeted tensors (the reference default); `"tensor"` gives each tensor its own. `mode="hard"` writes
    the projection into the weights at each refresh and trains densely in between (the paper);
    `mode="ste"` makes every forward see the MoMos weight of the latent weights under the current bank,
    with a straight-through gradient. `motif_dtype` (one of `MOTIF_DTYPES`: float64, float32, float16,
    bfloat16) is the dtype the motif table is kept and stored in: float16 by default, whose rounding (a relative
    2^-11) is far below the error of choosing among k motifs and whose table costs half the bits of float32
    (`MoMosConfig.paper()` keeps float32); a motif beyond its range is refused, never made infinite. Casting a
    prepared or converted model (``.half()``, ``.double()``, ``.to(dtype)``) casts its tables, and their
    config's `motif_dtype` follows.
    """

    block_size: int = 4
    capacity: float | None = None
    num_motifs: int | None = None
    bits_per_weight: float | None = None
    force_zero: bool = True
    scope: str = "global"
    targets: str = "matrices"
    motif_init: str = "kmeans"
    kmeans_iters: int = 10
    mode: str = "hard"
    motif_dtype: str = "float16"
    seed: int = 0

    def __post_init__(self) -> None:
        dtype = self.motif_dtype
        if not isinstance(dtype, str):  # accept torch.float16 & co. without importing torch here
            dtype = str(dtype).removeprefix("torch.")
            object.__setattr__(self, "motif_dtype", dtype)
        _check_int("block_size", self.block_size, minimum=1)
        sizes = {"capacity": self.capacity, "num_motifs": self.num_motifs, "bits_per_weight": self.bits_per_weight}
        if sum(v is not None for v in sizes.values()) != 1:
            given = ", ".join(f"{k}={v!r}" for k, v in sizes.items())
            raise MoMosConfigError(f"give exactly one of capacity, num_motifs or bits_per_weight (got {given})")
        if self.capacity is not None:
            c = self.capacity
            if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or not 0 < c <= 1:
                raise MoMosConfigError(f"capacity must be a number in (0, 1], got {c!r}")
        if self.num_motifs is not None:
            _check_int("num_motifs", self.num_motifs, minimum=1)
        b = self.bits_per_weight
        if b is not None and (isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b) or b <= 0):
            raise MoMosConfigError(f"bits_per_weight must be a positive number, got {b!r}")
        _check_choice("scope", self.scope, SCOPES)
        _check_choice("targets", self.targets, TARGETS)
        _check_choice("mode", self.mode, MODES)
        _check_choice("motif_init", self.motif_init, MOTIF_INITS)
        _check_choice("motif_dtype", dtype, tuple(MOTIF_DTYPES))
        _check_int("kmeans_iters", self.kmeans_iters, minimum=0)
        _check_int("seed", self.seed, minimum=0)
        if not isinstance(self.force_zero, bool):
            raise MoMosConfigError(f"force_zero must be a bool, got {self.force_zero!r}")

    @classmethod
    def paper(cls, **changes: Any) -> MoMosConfig:
        """The paper's algorithm: every trainable parameter, s=2, c=5%, forced zero motif, random bank, one global
        bank, hard projection."""
        fields = dict(block_size=2, capacity=0.05, force_zero=True, scope="global", targets="all",
                      motif_init="random", mode="hard", motif_dtype="float32")
        fields.update(changes)
        return cls(**fields)

    @property
    def motif_bits(self) -> int:
        """Bits of one stored motif value (q in the bounds)."""
        return MOTIF_DTYPES[self.motif_dtype]

    def num_motifs_for(self, num_blocks: int, num_weights: int | None = None) -> int:
        """k for a bank serving `num_blocks` blocks of `num_weights` values in all.

        Capacity: ``max(1, min(floor(c*m), m))``; `num_motifs`: k capped at m. `bits_per_weight`: the largest
        ``k <= m`` with ``m * ceil(log2 k) + k * s * q <= b * n`` (mosaic plus motif table, q = `motif_bits`),
        and 1 when not even two motifs fit; `num_weights` (n) is then required.
        """
        if self.num_motifs is not None:
            return max(1, min(self.num_motifs, num_blocks))
        if self.capacity is not None:
            # The tiny epsilon keeps floor(0.05 * 200) == 10 despite binary rounding of c.
            return max(1, min(math.floor(self.capacity * num_blocks + 1e-9), num_blocks))
        if num_weights is None:
            raise MoMosConfigError("bits_per_weight needs the number of weights a bank serves")
        budget = self.bits_per_weight * num_weights
        best = 1
        for bits in range(1, max(1, math.ceil(math.log2(max(num_blocks, 2)))) + 1):
            # Every k in (2^(bits-1), 2^bits] costs m * bits index bits; the table grows with k.
            k = min(2**bits, num_blocks, math.floor((budget - num_blocks * bits) / (self.block_size * self.motif_bits)))
            if k > 2 ** (bits - 1):
                best = max(best, k)
        return best

    def replace(self, **changes: Any) -> MoMosConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MoMosConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise MoMosConfigError(f"unknown config field(s) {sorted(unknown)}")
        return cls(**data)


def index_bits(num_motifs: int) -> int:
    """ceil(log2 k): the bits one mosaic index needs (0 for a single motif)."""
    return math.ceil(math.log2(num_motifs)) if num_motifs > 1 else 0


def _check_int(field: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise MoMosConfigError(f"{field} must be an integer >= {minimum}, got {value!r}")


def _check_choice(field: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise MoMosConfigError(f"{field} must be one of {list(choices)}, got {value!r}")


# ---------------------------------------------------------------------------------------------
# Selection: which parameters get which config.

# Precedence levels, most specific first.
_LEVELS = ("name", "regex", "type")
# Within a level: exclusion beats override beats inclusion.
_KINDS = ("exclude", "override", "include")


@dataclass(frozen=True)
class _Rule:
    level: str
    kind: str
    selector: Any
    config: MoMosConfig | None

    def describe(self) -> str:
        s = self.selector
        if self.level == "type":
            return f"type {s.__name__}"
        if self.level == "regex":
            return f"regex {s.pattern!r}"
        return f"name {s!r}"


def _make_rule(selector: Any, kind: str, config: MoMosConfig | None) -> _Rule:
    if isinstance(selector, re.Pattern):
        return _Rule("regex", kind, selector, config)
    if isinstance(selector, str):
        if selector.startswith("re:"):
            try:
                return _Rule("regex", kind, re.compile(selector[3:]), config)
            except re.error as e:
                raise MoMosSelectionError(f"selector {selector!r} is not a valid regex: {e}") from None
        return _Rule("name", kind, selector, config)
    if isinstance(selector, type):
        return _Rule("type", kind, selector, config)
    raise MoMosSelectionError(
        f"selector {selector!r} must be a name (str), a regex (re.Pattern or 're:...'), or a module type"
    )


def build_rules(config: MoMosConfig, include: Iterable[Any] | None, exclude: Iterable[Any] | None,
                overrides: Mapping[Any, MoMosConfig | None] | None) -> list[_Rule]:
    """Turn prepare()'s selector arguments into rules; `config` is what an inclusion selects with."""
    rules = [_make_rule(s, "include", config) for s in (include or ())]
    rules += [_make_rule(s, "exclude", None) for s in (exclude or ())]
    for selector, cfg in (overrides or {}).items():
        if cfg is not None and not isinstance(cfg, MoMosConfig):
            raise MoMosSelectionError(f"override for {selector!r} must be a MoMosConfig or None, got {cfg!r}")
        rules.append(_make_rule(selector, "override" if cfg is not None else "exclude", cfg))
    return rules


def _matches(rule: _Rule, param_name: str, module_name: str, module: Any) -> bool:
    if rule.level == "name":
        return rule.selector in (param_name, module_name)
    if rule.level == "regex":
        return rule.selector.fullmatch(param_name) is not None
    return isinstance(module, rule.selector)


def resolve(candidates: Iterable[tuple[str, str, Any]], default: MoMosConfig | None,
            rules: list[_Rule], *, targeted: Callable[[str], bool] | None = None) -> dict[str, MoMosConfig]:
    """Map each candidate ``(param_name, module_name, module)`` to its config by the written precedence.

    `default` applies where no rule matches (``None``: not selected), and only to the parameter names
    `targeted` admits when it is given. Every rule must match at least one candidate: a selector the user
    named that matches nothing is an error, not a silent no-op.
    """
    rank = {(lvl, kind): (i, j) for i, lvl in enumerate(_LEVELS) for j, kind in enumerate(_KINDS)}
    used: set[int] = set()
    chosen: dict[str, MoMosConfig] = {}
    for param_name, module_name, module in candidates:
        hits = [(rank[(r.level, r.kind)], i, r) for i, r in enumerate(rules)
                if _matches(r, param_name, module_name, module)]
        used.update(i for _, i, _ in hits)
        if hits:
            config = min(hits, key=lambda h: h[:2])[2].config
        else:
            config = default if targeted is None or targeted(param_name) else None
        if config is not None:
            chosen[param_name] = config
    unmatched = [r.describe() for i, r in enumerate(rules) if i not in used]
    if unmatched:
        raise MoMosSelectionError(f"selector(s) matched no trainable floating-point parameter: {unmatched}")
    return chosen
