"""hf_paged: PagedAttention KV cache for Hugging Face Transformers' ``model.generate()``.

``import hf_paged`` registers the attention implementation ``"hf_paged"`` (attention and mask functions) and the
``generate()`` hook; then ``AutoModelForCausalLM.from_pretrained(..., attn_implementation="hf_paged")`` keeps the
KV cache of every ``generate`` call in blocks.
"""

from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from . import compat
from .attention import paged_attention_forward, paged_attention_mask
from .block_manager import BlockManager, OutOfBlocksError
from .cache import CacheStats, PagedCache
from .generation import ATTN_IMPLEMENTATION, install_generate_hook, recorded_stats
from .models import load, load_smollm2
from .prefix import PrefixCache, disable_prefix_caching, enable_prefix_caching

__all__ = [
    "ATTN_IMPLEMENTATION",
    "BlockManager",
    "CacheStats",
    "OutOfBlocksError",
    "PagedCache",
    "PrefixCache",
    "disable_prefix_caching",
    "enable_prefix_caching",
    "load",
    "load_smollm2",
    "recorded_stats",
]
__version__ = "0.1.0"

AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, compat.mask_function(paged_attention_mask))
install_generate_hook()
