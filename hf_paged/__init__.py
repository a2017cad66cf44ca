"""hf_paged: PagedAttention KV cache for Hugging Face Transformers' ``model.generate()``."""
