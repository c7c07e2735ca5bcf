"""The fused M scan's kernels (`moe_core/scan_fused.py`) compiled for sm_90 without a GPU,
through Triton's ahead-of-time path (its own ptxas), and a digest of each one's SASS with
addresses, encodings and line info left out: two trees whose digests agree run the same
machine code on a Hopper GPU. For refactors of the kernels made where no GPU is at hand.

    pip install --no-deps --target /tmp/trsite triton==3.5.0   # Triton is not in the venv
    PYTHONPATH=/tmp/trsite:. .venv/bin/python bench/scan_fused_sass.py

Shapes: 16 states, the module's CHUNK and BLOCK_W, 32 chunks; inputs in fp32 and in bf16.
"""

from __future__ import annotations

import hashlib
import inspect
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from moe_core import scan_fused

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
INPUTS = ("x_ptr", "dt_ptr", "B_ptr", "C_ptr", "dy_ptr")  # the pointers that follow the dtype


def compiled(fn: Any, dtype: str, consts: dict[str, int]) -> bytes:
    params = list(inspect.signature(fn.fn).parameters)
    signature, constexprs = {}, {}
    for i, p in enumerate(params):
        if p in consts:
            signature[p] = "constexpr"
            constexprs[(i,)] = consts[p]
        elif p.endswith("_ptr"):
            signature[p] = "*" + (dtype if p in INPUTS else "fp32")
        else:
            signature[p] = "i32"
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    return bytes(triton.compile(src, target=GPUTarget("cuda", 90, 32)).asm["cubin"])


def sass(cubin: bytes) -> list[str]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [str(CUOBJDUMP), "-sass", f.name], capture_output=True, text=True, check=True
        ).stdout
    lines = [line for line in text.splitlines() if re.match(r"\s+/\*[0-9a-f]{4}\*/", line)]
    return [re.sub(r"\s+", " ", re.sub(r"/\*[^*]*\*/", "", line)).strip() for line in lines]


def main() -> None:
    consts = {
        "n_chunks": 32,
        "N": 16,
        "NP": 16,
        "CH": scan_fused.CHUNK,
        "BW": scan_fused.BLOCK_W,
    }
    print(f"triton {triton.__version__}, sm_90, {consts}")
    for dtype in ("fp32", "bf16"):
        for name, fn in (("fwd", scan_fused._scan_fwd), ("bwd", scan_fused._scan_bwd)):
            code = sass(compiled(fn, dtype, consts))
            digest = hashlib.sha256("\n".join(code).encode()).hexdigest()[:16]
            print(f"{name} {dtype}: {len(code)} SASS instructions, digest {digest}")


if __name__ == "__main__":
    main()
