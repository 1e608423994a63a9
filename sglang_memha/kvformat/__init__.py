"""The KV page format: what the bytes look like, on both ends of a PD transfer.

Path of one page: prefill ``codec.quantize_into`` (or the Triton ``quantize_to_slots``) writes
data + scale rows into its pool -> pages travel as raw bytes (``PageGeometry`` says where) ->
decode checks ``FormatDescriptor.check_compatible`` at handshake, applies any ``Bridge`` -> pool
stores bytes as is -> attention reads them through ``codec.gather_dequantize`` (or the Triton
``dequantize_pages``). Imports neither SGLang nor a GPU.

Modules: ``spec`` (enum, per-format facts, page geometry, version), ``descriptor`` (handshake),
``base`` (codec interface, registry), ``identity``/``fp8``/``intq``/``bfp``/``kivi`` (codecs),
``transforms`` (Hadamard K rotation), ``triton_kernels`` (GPU), ``golden`` (test vectors).
"""

from __future__ import annotations

from sglang_memha.kvformat.base import KVCodec, get_codec
from sglang_memha.kvformat.descriptor import SENDER_BRIDGES, Bridge, FormatDescriptor, FormatMismatchError
from sglang_memha.kvformat.spec import (
    FORMAT_SPECS,
    FORMAT_VERSION,
    FORMAT_VERSION_HISTORY,
    SIDE_FORMATS,
    TOKEN_LOCAL_FORMATS,
    FormatSpec,
    KVFormat,
    PageGeometry,
    format_spec,
    kv_bytes_per_token,
    page_geometry,
    row_bytes,
    side_format,
)

__all__ = [
    "FORMAT_SPECS",
    "FORMAT_VERSION",
    "FORMAT_VERSION_HISTORY",
    "SIDE_FORMATS",
    "TOKEN_LOCAL_FORMATS",
    "SENDER_BRIDGES",
    "Bridge",
    "FormatDescriptor",
    "FormatMismatchError",
    "FormatSpec",
    "KVCodec",
    "KVFormat",
    "PageGeometry",
    "format_spec",
    "get_codec",
    "kv_bytes_per_token",
    "page_geometry",
    "row_bytes",
    "side_format",
]
