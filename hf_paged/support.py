"""Load-time checks: which models hf_paged can serve, decided before any forward pass.

A family hf_paged cannot serve must fail when it is loaded with ``attn_implementation="hf_paged"``
(``from_pretrained``, ``from_config``, ``set_attn_implementation``) with a `NotImplementedError` that says why, not
halfway through ``generate``. The checks are generic, read from the config and the family's modeling code:

* the family builds a cache of its own instead of the default `DynamicCache` (MiniMax, RWKV, xLSTM, ...), so
  ``generate`` would never use a `PagedCache`;
* `check_layer_kinds`: ``config.layer_types`` names a kind of layer whose cache hf_paged does not know, or the
  model has no attention layer at all (a pure state-space model: paged attention has nothing to page);
* `check_cached_kv_use`: an attention module changes the keys or values the cache returned before (or instead of)
  handing them to the attention function: those are then a `PagedCache`'s block pools, not ``[B, Hkv, kv, D]``.

Every refusal ends with `fallback_advice`: an attention implementation the model's class really accepts.
"""

from __future__ import annotations

import ast
import inspect
import sys
import textwrap
from functools import cache

import torch

from . import compat, latent

__all__ = ["ATTENTION_KINDS", "ATTN_IMPLEMENTATION", "STATE_KINDS", "accepted_attention", "check_cached_kv_use",
           "check_layer_kinds", "check_layer_types", "check_model_class", "fallback_advice", "kv_sources",
           "uses_hf_paged"]

# Kinds of layer (values of ``config.layer_types``) whose cache is keys and values that the attention reads.
ATTENTION_KINDS = frozenset({
    "full_attention", "sliding_attention", "chunked_attention", "indexed_attention", "attention", "hybrid",
    "hybrid_sliding",
})
# Kinds whose cache, if any, is a per-row state (convolution, recurrence) or nothing (MLP-only layers).
STATE_KINDS = frozenset({"linear_attention", "mamba", "conv", "recurrent", "mlp", "moe"})


ATTN_IMPLEMENTATION = "hf_paged"


def uses_hf_paged(model) -> bool:
    """Whether `model` was loaded (or switched) with ``attn_implementation="hf_paged"``."""
    return getattr(model.config, "_attn_implementation", None) == ATTN_IMPLEMENTATION


def accepted_attention(model_class: type) -> list[str]:
    """The attention implementations other than hf_paged that Transformers accepts for `model_class` on any machine,
    best first, as its own check decides (``PreTrainedModel.get_correct_attn_implementation``): ``"sdpa"`` only where
    the class declares ``_supports_sdpa`` (Bloom, RWKV, Mamba, Gemma 2, ... do not), and ``"eager"``, which every
    model accepts. (``flash_attention_*`` and ``flex_attention`` need a GPU or a kernel package too: never advised.)"""
    return (["sdpa"] if getattr(model_class, "_supports_sdpa", False) else []) + ["eager"]


def fallback_advice(model_class: type | None) -> str:
    """The sentence ending a refusal: which ``attn_implementation`` to load the model with instead.

    Names what `model_class` accepts (`accepted_attention`). Without a class (a `PagedCache` built from a config),
    it says to leave ``attn_implementation`` out: Transformers' default is ``"sdpa"`` where the model supports it and
    ``"eager"`` otherwise."""
    if model_class is None:
        return ('Load it without attn_implementation="hf_paged" instead (Transformers then picks an attention '
                "implementation the model supports).")
    best, *others = accepted_attention(model_class)
    also = "".join(f' (or "{name}")' for name in others)
    refused = "" if best == "sdpa" else f' ({model_class.__name__} does not support "sdpa")'
    return f'Load it with attn_implementation="{best}"{also} instead{refused}.'


def _refuse(model_class: type, reason: str) -> NotImplementedError:
    return NotImplementedError(
        f'hf_paged: {model_class.__name__} does not support attn_implementation="hf_paged": {reason}. '
        f"{fallback_advice(model_class)}"
    )


def check_layer_kinds(model_class: type, config) -> None:
    """Raise `NotImplementedError` if ``config.layer_types`` has a kind hf_paged does not know, or no attention."""
    text_config = compat.text_config(config)
    try:
        layer_types = getattr(text_config, "layer_types", None)
    except Exception:  # a per-layer attribute some configs refuse to read globally
        return
    if not isinstance(layer_types, list | tuple) or not layer_types or not all(isinstance(t, str) for t in layer_types):
        return
    kinds = set(layer_types)
    unknown = sorted(kinds - ATTENTION_KINDS - STATE_KINDS)
    if unknown:
        raise _refuse(model_class, f"its layers of kind {', '.join(map(repr, unknown))} keep a cache hf_paged does "
                                   "not know how to page")
    if not kinds & ATTENTION_KINDS:
        raise _refuse(model_class, f"it has no attention layer (its layers are {', '.join(sorted(kinds))}), so "
                                   "there are no keys and values to page")


def check_cached_kv_use(model_class: type, module_classes) -> None:
    """Raise `NotImplementedError` if one of `module_classes` (the modules of `model_class`'s family) transforms the
    cache's keys or values itself."""
    for module_class in module_classes:
        use = _cached_kv_use(module_class)
        if use is not None:
            raise _refuse(model_class, f"{module_class.__name__}.forward uses the keys/values the cache returns "
                                       f"outside the attention function ({use}), and a PagedCache returns block pools")


def kv_sources(config) -> dict[int, int]:
    """Per layer that stores no keys and values of its own but attends over another layer's (KV sharing), that layer.

    Gemma 3n and Gemma 4 (``num_kv_shared_layers``): each of the last ``num_kv_shared_layers`` layers reads the keys
    and values of the last earlier layer of its own type (sliding or full attention), which the model hands it from
    that layer's ``cache.update`` (``shared_kv_states``; in 5.0 an attribute of the cache). Families that name each
    layer's source (``kv_source_layers``) are read as they say. Such a layer never calls ``cache.update``: its attention
    gets the source layer's pools, read through this step's block tables (`hf_paged.PagedCache.attention_inputs`).
    A model whose layers all read another model's keys (Gemma 4's assistants) gets ``{}``: it has nothing to page.
    """
    text_config = compat.text_config(config)
    num_layers = getattr(text_config, "num_hidden_layers", None)
    sources = getattr(text_config, "kv_source_layers", None)
    if isinstance(sources, list | tuple) and len(sources) == num_layers:
        return {layer: int(source) for layer, source in enumerate(sources) if source != layer}
    shared = getattr(text_config, "num_kv_shared_layers", None)
    layer_types = getattr(text_config, "layer_types", None)
    if not isinstance(shared, int) or shared <= 0 or not isinstance(num_layers, int) or shared >= num_layers:
        return {}
    first = num_layers - shared
    if not isinstance(layer_types, list | tuple) or len(layer_types) != num_layers:
        return {}
    last_of = {kind: layer for layer, kind in enumerate(layer_types[:first])}
    return {layer: last_of[layer_types[layer]] for layer in range(first, num_layers) if layer_types[layer] in last_of}


# Layer types whose attention reads more than the keys and values a PagedCache pages: hf_paged refuses them at load.
_UNSUPPORTED_LAYER_TYPES = {
    "indexed_attention": "its dynamic sparse attention (DeepSeek-V3.2 style) selects keys with an indexer over a 4-D "
                         "mask and passes the top-k indices to the attention, which hf_paged does not apply",
}


# Families whose attention hf_paged does not reproduce yet.
_UNSUPPORTED_MODEL_TYPES = {
    "inkling_text": "its attention adds relative-position logits (`position_bias`) that hf_paged does not apply, and "
                    "its beam search through a PagedCache does not yet give Transformers' results",
}
_UNSUPPORTED_MODEL_TYPES["inkling2_text"] = _UNSUPPORTED_MODEL_TYPES["inkling_text"]


def check_layer_types(config, model_class: type | None = None) -> None:
    """Raise `NotImplementedError` naming hf_paged for a model whose cache layers hf_paged cannot serve; its advice
    names what `model_class` accepts (`fallback_advice`), when given."""
    text_config = compat.text_config(config)
    model_type = getattr(text_config, "model_type", None)
    if model_type in _UNSUPPORTED_MODEL_TYPES:
        raise NotImplementedError(
            f"hf_paged: {type(text_config).__name__} is not supported: {_UNSUPPORTED_MODEL_TYPES[model_type]}. "
            f"{fallback_advice(model_class)}"
        )
    for layer_type in dict.fromkeys(getattr(text_config, "layer_types", None) or []):
        if layer_type in _UNSUPPORTED_LAYER_TYPES:
            raise NotImplementedError(
                f"hf_paged: {type(config).__name__} has {layer_type!r} layers: {_UNSUPPORTED_LAYER_TYPES[layer_type]}. "
                f"{fallback_advice(model_class)}"
            )


def check_model_class(model_class: type, config) -> None:
    """All load-time checks for `model_class` built from `config` (see the module docstring)."""
    supports_cache = getattr(model_class, "_supports_default_dynamic_cache", None)
    if supports_cache is not None and not supports_cache():
        raise _refuse(model_class, "it keeps its cache in a class of its own instead of a Transformers Cache that "
                                   "hf_paged can replace")
    check_layer_kinds(model_class, config)
    check_layer_types(config, model_class)
    text_config = compat.text_config(config)
    family_module = sys.modules.get(model_class.__module__)
    if compat.TRANSFORMERS_VERSION < (5, 17) and hasattr(family_module, "create_bidirectional_mask"):
        # Encoder families with a decoder mode (BERT, RoBERTa, ELECTRA, ... as causal LMs): the family walk
        # (tests/test_families.py) measured other tokens than eager through hf_paged on 5.0; from 5.17 they match.
        raise _refuse(model_class, f"on Transformers {compat.transformers_version_text()}, encoder families used as "
                                   "decoders do not give eager's tokens through hf_paged (they do from Transformers "
                                   "5.17 on)")
    try:
        mla = getattr(text_config, "kv_lora_rank", None)
    except Exception:  # per-layer (some layers MLA)
        mla = True
    if mla:
        latent.prepare_family(model_class)  # MLA: expand_kv lets a PagedCache's latent pools through (latent.py)
        return  # MLA: the module expands cached latents into keys and values; the MLA support decides about those
    module = sys.modules.get(model_class.__module__)
    classes = [value for value in vars(module).values()
               if isinstance(value, type) and issubclass(value, torch.nn.Module)
               and value.__module__ == model_class.__module__] if module is not None else []
    check_cached_kv_use(model_class, classes)


@cache
def _cached_kv_use(module_class: type) -> str | None:
    """The first expression of ``module_class.forward`` that uses the keys or values a cache ``update`` returned
    other than as an argument of the attention function (a call whose name mentions attention), or None."""
    forward = module_class.__dict__.get("forward")
    if forward is None:
        return None
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(forward)))
    except (OSError, TypeError, SyntaxError):
        return None
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)
                and isinstance(node.value.func, ast.Attribute) and node.value.func.attr == "update"
                and len(node.value.args) >= 3 and isinstance(node.targets[0], ast.Tuple)):
            continue
        names = {target.id for target in node.targets[0].elts if isinstance(target, ast.Name)}
        for use in ast.walk(tree):
            if (isinstance(use, ast.Name) and use.id in names and isinstance(use.ctx, ast.Load)
                    and use.lineno > node.end_lineno and not _is_attention_argument(use, parents)):
                return ast.unparse(parents.get(use, use))
    return None


def _is_attention_argument(name: ast.Name, parents: dict) -> bool:
    """Whether this use of the cached keys/values is harmless: an argument of the attention function, metadata
    (``.shape``, ``.dtype``, ``.device``), or packed into a tuple (layers that share their keys with later ones)."""
    parent = parents.get(name)
    if isinstance(parent, ast.Attribute) and parent.attr in ("shape", "dtype", "device"):
        return True
    if isinstance(parent, ast.Tuple | ast.List | ast.Compare):
        return True
    if isinstance(parent, ast.keyword):
        parent = parents.get(parent)
    if not isinstance(parent, ast.Call):
        return False
    func = parent.func
    called = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
    return "attention" in called or "attn" in called
