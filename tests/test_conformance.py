"""hf_paged against the installed Transformers' own API, so that a new release's change fails CI, not a user.

* Every method of `transformers.Cache`, `CacheLayerMixin` and `LinearAttentionLayer` that hf_paged's cache and layers
  override still accepts every argument the base method accepts (a caller written for the base class works), and
  asks for nothing more; a property stays readable as one.
* Every Transformers method hf_paged wraps (`compat.HOOKS`) still takes, in order, the parameters hf_paged reads.
* The installed release is not newer than the last one the suite passed on (`compat.LAST_TESTED_TRANSFORMERS`);
  where it is, errors from inside hf_paged's hooks say so.
"""

from __future__ import annotations

import functools
import inspect
import re
from pathlib import Path

import pytest
import torch
import transformers
from tiny_models import model_pair
from transformers.cache_utils import Cache, CacheLayerMixin

from hf_paged import PagedCache, compat
from hf_paged.layers import KVSharedLayer, PagedHybridLayer, PagedLayer

OVERRIDES = [(PagedCache, Cache), (PagedLayer, CacheLayerMixin), (KVSharedLayer, CacheLayerMixin)]
if compat.HAS_STATE_LAYERS:
    OVERRIDES.append((PagedHybridLayer, compat.LinearAttentionLayer))
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _overridden(ours: type, base: type) -> list[str]:
    """The attributes `ours` defines itself that `base` (or its bases) defines too."""
    return sorted(name for name in vars(ours) if not name.startswith("__") and hasattr(base, name))


@functools.cache
def _transformers_source() -> str:
    """Every Python source file of the installed Transformers, concatenated."""
    root = Path(transformers.__file__).parent
    return "\n".join(path.read_text(encoding="utf-8", errors="replace") for path in sorted(root.rglob("*.py")))


def _passed_by_keyword(method: str, parameter: str) -> bool:
    """Whether Transformers' own code calls some ``.method(...)`` with ``parameter=`` (a rough but safe scan)."""
    return re.search(rf"\.{method}\([^()]*\b{parameter}\s*=", _transformers_source()) is not None


def _incompatibility(ours: inspect.Signature, base: inspect.Signature, method: str = "") -> str | None:
    """Why a call that `base` accepts could fail on `ours`, or None. A positional parameter named otherwise here
    (``crop(max_length)`` in 5.0, ``crop(tokens_to_remove)`` here) is fine while Transformers passes it by
    position: `method` names the method to look for keyword calls of."""
    mine = list(ours.parameters.values())
    theirs = list(base.parameters.values())
    var_args = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in mine)
    var_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in mine)
    my_positional = [p for p in mine if p.kind in _POSITIONAL]
    names = {p.name for p in mine if p.kind is not inspect.Parameter.POSITIONAL_ONLY}
    for index, parameter in enumerate(p for p in theirs if p.kind in _POSITIONAL):
        if index >= len(my_positional) and not var_args:
            return f"takes no positional argument #{index} ({parameter.name})"
        if parameter.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and parameter.name not in names \
                and not var_kwargs and (not method or _passed_by_keyword(method, parameter.name)):
            return f"takes no keyword argument {parameter.name!r}"
    for parameter in theirs:
        if parameter.kind is inspect.Parameter.VAR_POSITIONAL and not var_args:
            return "takes no *args"
        if parameter.kind is inspect.Parameter.VAR_KEYWORD and not var_kwargs:
            return "takes no **kwargs"
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY and parameter.name not in names and not var_kwargs:
            return f"takes no keyword argument {parameter.name!r}"
    base_positional = sum(p.kind in _POSITIONAL for p in theirs)
    base_names = {p.name for p in theirs}
    for index, parameter in enumerate(my_positional):
        if parameter.default is inspect.Parameter.empty and index >= base_positional:
            return f"requires argument {parameter.name!r}, which callers of the base method do not pass"
    for parameter in mine:
        if parameter.kind is inspect.Parameter.KEYWORD_ONLY and parameter.default is inspect.Parameter.empty \
                and parameter.name not in base_names:
            return f"requires keyword argument {parameter.name!r}"
    return None


@pytest.mark.parametrize("ours, base", OVERRIDES, ids=lambda cls: cls.__name__)
def test_overrides_accept_what_the_base_accepts(ours, base):
    problems = []
    for name in _overridden(ours, base):
        mine, theirs = inspect.getattr_static(ours, name), inspect.getattr_static(base, name)
        if isinstance(theirs, property) and callable(mine) and not isinstance(mine, property):
            problems.append(f"{name}: a property in {base.__name__}, a method here")
        if not inspect.isfunction(theirs):
            continue  # a plain attribute or a property: read the same way as any attribute or property here
        if not inspect.isfunction(mine):
            problems.append(f"{name}: a method in {base.__name__}, {type(mine).__name__} here")
            continue
        reason = _incompatibility(inspect.signature(mine), inspect.signature(theirs), name)
        if reason is not None:
            problems.append(f"{ours.__name__}.{name}{inspect.signature(mine)} {reason} (the base: "
                            f"{base.__name__}.{name}{inspect.signature(theirs)})")
    assert not problems, "\n".join(problems)


def test_the_check_catches_a_missing_keyword():
    """The comparison itself: the 5.25 break (``activate_past_recording(recurrent_states_to_keep=...)`` on a method
    that took no argument) is found, and so is a new required argument."""

    def base(self, **kwargs): ...

    def old(self): ...

    def needy(self, extra, **kwargs): ...

    def renamed(self, layer_index): ...

    def named(self, layer_idx): ...

    assert "**kwargs" in _incompatibility(inspect.signature(old), inspect.signature(base))
    assert "extra" in _incompatibility(inspect.signature(needy), inspect.signature(base))
    assert _incompatibility(inspect.signature(base), inspect.signature(base)) is None
    assert "layer_idx" in _incompatibility(inspect.signature(renamed), inspect.signature(named))
    # Renamed is fine only where Transformers never passes the parameter by keyword.
    assert _passed_by_keyword("get_seq_length", "layer_idx") != (
        _incompatibility(inspect.signature(renamed), inspect.signature(named), "get_seq_length") is None)


@pytest.mark.parametrize("feature", list(compat.HOOKS))
def test_wrapped_transformers_methods_keep_the_parameters_hf_paged_reads(feature):
    owner, name, parameters = compat.HOOKS[feature]
    method = getattr(compat.hook_owner(owner), name)
    assert getattr(method, "_hf_paged_hook", False), f"{owner}.{name} is not wrapped"
    original = inspect.unwrap(method)
    leading = list(inspect.signature(original).parameters)[1:1 + len(parameters)]
    assert leading == list(parameters), (
        f"Transformers {compat.transformers_version_text()} changed {owner}.{name}: hf_paged reads {parameters} "
        f"as its first parameters, it now takes {leading}")


def test_the_installed_release_was_tested():
    tested = ".".join(map(str, compat.LAST_TESTED_TRANSFORMERS))
    assert compat.TRANSFORMERS_VERSION <= compat.LAST_TESTED_TRANSFORMERS, (
        f"Transformers {compat.transformers_version_text()} is newer than {tested}, the last release the suite "
        "passed on. Once the rest of the suite passes on it, raise compat.LAST_TESTED_TRANSFORMERS (and the README's "
        "tested range) to it.")


@pytest.mark.skipif(not hasattr(BaseException, "add_note"), reason="exception notes need Python 3.11")
@pytest.mark.parametrize("newer", [False, True], ids=["tested", "newer"])
def test_errors_from_the_hooks_say_when_the_release_is_untested(monkeypatch, newer):
    _, paged = model_pair("llama")
    if newer:
        monkeypatch.setattr(compat, "LAST_TESTED_TRANSFORMERS", (5, -1))
    cache = PagedCache(paged.config)
    ids = torch.randint(3, 90, (1, 6))
    paged.generate(ids, max_new_tokens=2, do_sample=False, **compat.cache_kwargs(cache))
    with pytest.raises(ValueError, match="already holds") as info:  # raised inside the wrapped _prefill
        paged.generate(ids[:, :3], max_new_tokens=2, do_sample=False, **compat.cache_kwargs(cache))
    notes = getattr(info.value, "__notes__", [])
    if newer:
        assert len(notes) == 1 and "last release hf_paged was tested with" in notes[0], notes
        assert compat.transformers_version_text() in notes[0]
    else:
        assert not notes
