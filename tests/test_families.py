"""Every causal-LM type of the installed Transformers: hf_paged gives eager's output, or refuses at load.

One test per ``model_type`` of ``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`` (see `families` for the tiny configs and the
comparison): a family a new Transformers release adds is walked without a change here.
"""

from __future__ import annotations

import pytest
from families import REFERENCE_BROKEN, check_family, families

from hf_paged import compat

# The tiny configs are derived from 5.17+'s config classes (5.0's lack attributes such as pad_token_id on several
# families, so their eager reference cannot be built there); the walk runs on 5.17 and later.
pytestmark = pytest.mark.skipif(compat.TRANSFORMERS_VERSION < (5, 17),
                                reason="the family walk's tiny configs need Transformers 5.17 or later")


@pytest.mark.parametrize("model_type", list(families()))
def test_family_matches_eager_or_refuses_at_load(model_type):
    outcome = check_family(model_type)
    if outcome.status == "reference":
        assert model_type in REFERENCE_BROKEN, (
            f"eager {model_type} cannot be built or run on its tiny config: {outcome.detail}. Fix the tiny config "
            "(families.OVERRIDES) or, if Transformers itself is broken, list it in families.REFERENCE_BROKEN."
        )
        pytest.skip(f"reference broken: {REFERENCE_BROKEN[model_type]} ({outcome.detail})")
    assert outcome.status in ("match", "refused"), f"{model_type}: {outcome.status}: {outcome.detail}"


def test_reference_broken_list_stays_short():
    assert len(REFERENCE_BROKEN) <= 15
    if compat.TRANSFORMERS_VERSION >= (5, 24):  # the release the list is kept for (older ones lack newer families)
        assert set(REFERENCE_BROKEN) <= set(families()), "drop families Transformers no longer has"


@pytest.mark.parametrize("model_type", ["diffllama", "mamba"])
def test_refusal_also_when_switching_a_loaded_model(model_type):
    """``set_attn_implementation("hf_paged")`` on a model loaded with eager refuses as loading would."""
    import torch
    from families import _architecture, tiny_config

    torch.manual_seed(0)
    model = _architecture(model_type)._from_config(tiny_config(model_type), attn_implementation="eager")
    with pytest.raises(NotImplementedError, match=r'^hf_paged: .* does not support attn_implementation="hf_paged"'):
        model.set_attn_implementation("hf_paged")
