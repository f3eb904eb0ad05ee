#!/usr/bin/env python3
"""Writes a GGUF in another weight format with llama.cpp's own quantizer
(`llama_model_quantize`, through the llama-cpp-python bindings that
bench/llamacpp/setup.sh installs), so llama.cpp runs BF16, F16, Q8_0 or Q4_0 weights
made its own way from the same F32 GGUF our engine's weights came from.

    .cache/bench-venv/bin/python bench/llamacpp/quantize.py IN.f32.gguf OUT.gguf {bf16,f16,q8_0,q4_0}

llama.cpp's choices apply: 1-D tensors (norms) stay F32; for Q8_0 the token
embedding (and so the tied output projection) is Q8_0 as well; for Q4_0 the
output projection (the tied embedding, for SmolLM2) is Q6_K, llama.cpp's rule
for its 4-bit types.
"""

import argparse
import ctypes
import os
import sys

import llama_cpp

FTYPES = {
    "f32": llama_cpp.LLAMA_FTYPE_ALL_F32,
    "f16": llama_cpp.LLAMA_FTYPE_MOSTLY_F16,
    "bf16": llama_cpp.LLAMA_FTYPE_MOSTLY_BF16,
    "q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0,
    "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0,
}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("format", choices=sorted(FTYPES))
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = FTYPES[args.format]
    params.nthread = args.threads
    tmp = args.dst + ".tmp"
    rc = llama_cpp.llama_model_quantize(args.src.encode(), tmp.encode(), ctypes.byref(params))
    if rc != 0:
        print(f"quantize.py: llama_model_quantize returned {rc}", file=sys.stderr)
        return 1
    os.replace(tmp, args.dst)
    print(f"wrote {args.dst} ({args.format})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
