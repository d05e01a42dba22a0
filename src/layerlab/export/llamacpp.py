"""llama.cpp's own quantizer (`llama_model_quantize`, through llama-cpp-python) as the K-quant writer.

The input file holds every tensor already in its final type except those llama.cpp must quantize,
which are F32. Each tensor with a known final type gets an exact-name override; llama.cpp copies a
tensor already in its override type byte for byte (`quantize = cur_type != new_type` in
llama-quant.cpp) and quantizes the rest. Tensors without an override (a mixture such as Q4_K_M)
get the type llama.cpp's own rules choose for `ftype`, as `llama-quantize` would give them.
"""

from __future__ import annotations

import ctypes
import os
import re
from collections.abc import Mapping
from pathlib import Path

from gguf import GGMLQuantizationType, LlamaFileType

from ..errors import LayerlabError
from ..quant import require_llama_cpp


def llama_quantize(source: Path, out: Path, ftype: int | None, overrides: Mapping[str, GGMLQuantizationType],
                   threads: int | None = None) -> None:
    """Write `out` from `source` with llama.cpp's quantizer; `overrides` maps tensor names to their types."""
    require_llama_cpp("writing K-quants with llama.cpp's quantizer")
    import llama_cpp
    params = llama_cpp.llama_model_quantize_default_params()
    # overrides apply only under a quantized default type; Q8_0 when the request names none
    params.ftype = int(ftype if ftype is not None else LlamaFileType.MOSTLY_Q8_0)
    params.nthread = threads or min(8, os.cpu_count() or 1)
    patterns = [f"^{re.escape(name)}$".encode() for name in overrides]  # kept alive until the call returns
    table = (llama_cpp.llama_model_tensor_override * (len(patterns) + 1))()
    for row, pattern, kind in zip(table, patterns, overrides.values(), strict=False):
        row.pattern, row.type = pattern, int(kind)
    table[len(patterns)].pattern = None
    params.tt_overrides = ctypes.cast(table, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
    llama_cpp.llama_backend_init()
    with _quiet():
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params))
    if status != 0 or not out.is_file():
        raise LayerlabError(f"llama.cpp's quantizer failed on {source.name} (status {status})")


def _quiet():
    """llama.cpp logs every tensor to stderr; keep the terminal for layerlab's own output."""
    from llama_cpp._utils import suppress_stdout_stderr

    return suppress_stdout_stderr(disable=False)
