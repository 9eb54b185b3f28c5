"""Architecture variants of farm's decoder: the parts that differ between them (norm, RoPE layout).

The model itself (``farm.runtime.model.GPT``) is one class for every layout; ``model.arch`` picks
the variant by name from :data:`farm.model.arch.ARCHS`. docs/huggingface.md says how each variant
maps onto a Hugging Face class.
"""

ARCH_NAMES = ("gpt", "llama")
"""The registered names of ``model.arch``; farm.model.arch.ARCHS holds one entry per name."""
