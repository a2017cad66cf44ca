"""Layer kinds: what each layer of a model keeps in a `PagedCache`, and for how long.

A layer's `LayerKind` says whether it has a pool (its `attention` part), Transformers' per-row states (linear
attention, Mamba: `states`), or reads another layer's keys (`source`, KV sharing). Its attention part is one of:

    * `FullAttention`: every key, from each row's first real token on.
    * `ChunkedAttention` (Llama 4): stored as full attention; its chunks start at each row's first real token, which
      the tables' positions must keep, so it never drops keys.
    * `SlidingWindow`: the keys Transformers' own `DynamicCache` keeps for the layer (``window - 1`` of them,
      `hf_paged.masks.cache_windows`); blocks wholly out of the window are released as decoding advances.
    * `LatentAttention` (multi-head latent attention: DeepSeek-V2/V3, Kimi, ...): the compressed latents, which the
      model reads whole and expands itself.

Layers whose attention parts are equal share block tables (one `hf_paged.groups.LayerGroup` each): this module is
the only one that asks which kind a group is; everything else asks the kind (`first_seen`, `releases`,
`slack_per_row`, `trims`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers.cache_utils import CacheLayerMixin

from . import compat, masks, support
from .compat import DYNAMIC_LAYER_TYPE_MAPPING, LinearAttentionCacheLayerMixin, get_layer_types_and_kwargs

__all__ = ["AttentionKind", "ChunkedAttention", "FullAttention", "LatentAttention", "LayerKind", "SlidingWindow",
           "plan_layers"]

# A growable pool's slack per row that takes blocks in a step, at most (see `AttentionKind.slack_per_row`).
SLACK_BLOCKS_PER_ROW = 4


@dataclass(frozen=True)
class AttentionKind:
    """What a layer's pool holds; layers of equal kinds share block tables."""

    @property
    def window(self) -> int | None:
        """The sliding window a group of this kind keeps (None: every key)."""
        return None

    @property
    def drops_keys(self) -> bool:
        """Whether rows keep only the keys their last query still sees (`first_seen`)."""
        return False

    @property
    def trims(self) -> bool:
        """Whether a step's tables may leave out the leading blocks no row reads (False where the model reads each
        row's whole cache itself)."""
        return True

    def first_seen(self, length: int) -> int:
        """The first key position a query at position ``length - 1`` still needs (a row of `length` tokens)."""
        return 0

    def releases(self, recording: bool) -> bool:
        """Whether blocks before `first_seen` are given back as rows grow (never while past steps are being
        recorded for a rollback, `PagedCache.activate_past_recording`)."""
        return self.drops_keys and not recording

    def slack_per_row(self, total_tokens: int, rows: int, block_size: int, recording: bool) -> int:
        """Blocks of slack a growing pool adds per row that takes blocks in a step (see `hf_paged.kv_pool.KVPool`):
        a quarter of a row's blocks, 1 to `SLACK_BLOCKS_PER_ROW`: short rows waste little, long ones make few
        slabs."""
        return min(SLACK_BLOCKS_PER_ROW, max(1, total_tokens // (4 * block_size * max(rows, 1))))


@dataclass(frozen=True)
class FullAttention(AttentionKind):
    pass


@dataclass(frozen=True)
class ChunkedAttention(FullAttention):
    """Stored as full attention (one group with it): `group_kind` is `FullAttention`."""


@dataclass(frozen=True)
class LatentAttention(AttentionKind):
    @property
    def trims(self) -> bool:
        return False  # the model expands every row's latents from position 0 itself


@dataclass(frozen=True)
class SlidingWindow(AttentionKind):
    size: int = 0

    @property
    def window(self) -> int | None:
        return self.size

    @property
    def drops_keys(self) -> bool:
        return True

    def first_seen(self, length: int) -> int:
        return max(length - self.size + 1, 0)

    def slack_per_row(self, total_tokens: int, rows: int, block_size: int, recording: bool) -> int:
        if recording:
            return super().slack_per_row(total_tokens, rows, block_size, recording)
        return 1  # its rows reuse the blocks they release


def group_kind(kind: AttentionKind) -> AttentionKind:
    """The kind of the group a layer of `kind` joins (chunked layers join the full-attention group)."""
    return FullAttention() if isinstance(kind, ChunkedAttention) else kind


@dataclass(frozen=True)
class LayerKind:
    """One layer of a `PagedCache`.

    Attributes:
        attention: what its pool holds (None: no pool of its own).
        states: Transformers' linear-attention / Mamba states it keeps per row (their ``number_of_states``), or
            None.
        source: for a layer that reads another layer's keys and values (`hf_paged.support.kv_sources`), that layer.
        layer_kwargs: the keyword arguments of Transformers' cache layer class for it.
    """

    attention: AttentionKind | None
    states: int | None = None
    source: int | None = None
    layer_kwargs: dict = field(default_factory=dict, compare=False)


def plan_layers(config, one_group: bool = False) -> list[LayerKind]:
    """Per layer of a model with `config`, its `LayerKind`, read from the config's ``layer_types`` as `DynamicCache`
    does. `one_group`: every attention layer full (one pool given for all of them)."""
    text_config = compat.text_config(config)
    latent = getattr(text_config, "kv_lora_rank", None) is not None
    transformers_kinds, layer_kwargs = _transformers_kinds(text_config)
    layer_types = getattr(text_config, "layer_types", None) or []
    windows = () if one_group or latent else masks.cache_windows(config)  # one DynamicCache asked, not one per layer
    plan = []
    for layer, (kind, kwargs) in enumerate(zip(transformers_kinds, layer_kwargs, strict=True)):
        states = kwargs.get("number_of_states", 1) if kind in ("state", "hybrid") else None
        if kind == "state":
            plan.append(LayerKind(None, states, layer_kwargs=kwargs))
            continue
        if latent:
            attention = LatentAttention()
        elif not one_group and layer < len(layer_types) and "chunk" in str(layer_types[layer]):
            attention = ChunkedAttention()
        elif layer < len(windows) and windows[layer] is not None:
            attention = SlidingWindow(windows[layer])
        else:
            attention = FullAttention()
        plan.append(LayerKind(attention, states, layer_kwargs=kwargs))
    for layer, source in support.kv_sources(config).items():
        if (layer < len(plan) and source < len(plan) and plan[source].attention is not None
                and plan[source].states is None):
            plan[layer] = LayerKind(None, source=source, layer_kwargs={"source": source})
    return plan


def _transformers_kinds(text_config) -> tuple[list[str], list[dict]]:
    """Per layer ``"paged"``, ``"state"`` or ``"hybrid"`` (attention and states) and its layer class's kwargs."""
    num_layers = getattr(text_config, "num_hidden_layers", None)
    try:
        layer_types, layer_kwargs = get_layer_types_and_kwargs(text_config)
    except Exception:  # a config Transformers' own helper cannot read: every layer is plain attention
        layer_types, layer_kwargs = [], []
    if not isinstance(num_layers, int) or len(layer_types) != num_layers:
        count = num_layers if isinstance(num_layers, int) and num_layers > 0 else 0
        return ["paged"] * count, [{} for _ in range(count)]
    kinds = []
    for layer_type in layer_types:
        cls = DYNAMIC_LAYER_TYPE_MAPPING.get(layer_type)
        if isinstance(cls, type) and issubclass(cls, LinearAttentionCacheLayerMixin):
            kinds.append("hybrid" if issubclass(cls, CacheLayerMixin) else "state")
        else:
            kinds.append("paged")
    if isinstance(layer_kwargs, dict):  # 5.17 and before: one dict for every layer
        layer_kwargs = [layer_kwargs] * len(kinds)
    return kinds, [dict(kwargs) for kwargs in layer_kwargs]
