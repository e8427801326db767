"""The numpy reference of every prefixkv op: what each op means, and what every backend is
tested against. Clear rather than fast; float64 accumulation for attention, exact for copies,
writes and hashes."""

from .attention import merge_attention_states_reference as merge_attention_states_reference
from .attention import paged_attention_reference as paged_attention_reference
from .attention import shared_prefix_attention_reference as shared_prefix_attention_reference
from .cache import copy_blocks_reference as copy_blocks_reference
from .cache import dequantize_fp8_reference as dequantize_fp8_reference
from .cache import gather_blocks_reference as gather_blocks_reference
from .cache import quantize_fp8_reference as quantize_fp8_reference
from .cache import scatter_blocks_reference as scatter_blocks_reference
from .cache import write_kv_reference as write_kv_reference
from .hashing import hash_blocks_reference as hash_blocks_reference
