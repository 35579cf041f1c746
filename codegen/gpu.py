"""Compile a Triton kernel for an NVIDIA GPU without one: TTIR → PTX → cubin through the ptxas that ships with
triton. It catches what the interpreter cannot (types across branches, layouts, shared memory over the limit).

Needs a Python where ``TRITON_INTERPRET`` was unset when the kernels were defined (they are ``@triton.jit``
functions then, not interpreted ones).
"""
from __future__ import annotations


def compile_kernel(fn, pointers: dict[str, str], constexprs: dict, arch: int = 90, num_warps: int = 4,
                   num_stages: int = 2, floats: tuple[str, ...] = ()):
    """Compile ``fn`` for compute capability ``arch``. ``pointers``: argument name -> pointer type ("*fp16");
    ``constexprs``: their values; ``floats``: fp32 scalars; every other argument is an i32 scalar."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if not hasattr(fn, "arg_names"):
        raise RuntimeError("compiling for a GPU needs TRITON_INTERPRET unset (these kernels were made for the "
                           "interpreter)")
    signature = {name: "constexpr" if name in constexprs else pointers.get(name) or ("fp32" if name in floats
                                                                                      else "i32")
                 for name in fn.arg_names}
    source = ASTSource(fn, signature, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})
