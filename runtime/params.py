"""The value types every parameter model uses (rewrite params, recipe fields), defined once.

``Int``: an integer (a bool or a float is refused, so ``true`` is not 1 and ``1e30`` is not an int) that fits the
kernels' 32-bit integers (``Integer``: the same without the bound, for a field that checks its own, e.g. the
bytes it allocates). ``Tokens``: a length in tokens (window, sinks, chunk, block), at most ``MAX_TOKENS`` so
a position plus a length still fits in 32 bits. ``Seed``: a non-negative 32-bit seed (numpy refuses negative
ones). ``Float``: a finite number (``.inf`` and ``.nan`` are refused), not a bool. Strings that spell a number
(``"1e-6"``, as YAML reads that literal, or ``autotune --params window=512``) are parsed as before.
"""
from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, AllowInfNan, BeforeValidator

INT32_MAX = 2 ** 31 - 1
MAX_TOKENS = 2 ** 30  # longest sequence (and window, chunk, block): position + length < 2**31


def _integer(v):
    if isinstance(v, bool):
        raise ValueError(f"expected an integer, not a boolean ({str(v).lower()})")
    if isinstance(v, float):
        raise ValueError(f"expected an integer, not the float {v:g}")
    return v


def _number(v):
    if isinstance(v, bool):
        raise ValueError(f"expected a number, not a boolean ({str(v).lower()})")
    return v


def _within(lo: int, hi: int, why: str) -> AfterValidator:
    def check(v: int) -> int:
        if v > hi or v < lo:
            raise ValueError(f"must be at {'most' if v > hi else 'least'} {hi if v > hi else lo} ({why})")
        return v

    return AfterValidator(check)


Integer = Annotated[int, BeforeValidator(_integer)]  # for a field bounded by its own check (e.g. bytes)
Int = Annotated[int, BeforeValidator(_integer), _within(-INT32_MAX - 1, INT32_MAX, "the kernels use 32-bit integers")]
Tokens = Annotated[int, BeforeValidator(_integer), _within(-INT32_MAX - 1, MAX_TOKENS,
                                                            f"the longest supported context is {MAX_TOKENS} tokens")]
Seed = Annotated[int, BeforeValidator(_integer), _within(0, 2 ** 32 - 1, "seeds are 32-bit and not negative")]
Float = Annotated[float, BeforeValidator(_number), AllowInfNan(False)]
