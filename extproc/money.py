"""Money as integer nano-USD (1 USD = 10**9). No floats cross this module.

Prices arrive as decimal strings "USD per 1M tokens"; a token at price P costs
P * 10**9 / 10**6 = P * 1000 nano-USD. Prices with more precision than 1/1000
of a nano-dollar per token are rejected so every charge is an exact integer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

NANO_PER_USD = 10**9
_NANO = Decimal(NANO_PER_USD)
_DECIMAL = re.compile(r"^\d+(\.\d+)?$")


def decimal_str(v: object) -> str:
    """A money amount as written in a policy: a non-negative decimal string or an integer.

    Raises ValueError (pydantic shows it with the field's location)."""
    if isinstance(v, bool) or not isinstance(v, (str, int)):
        raise ValueError("write money as a decimal string such as \"2.50\" (floats are not exact)")
    s = str(v)
    if not _DECIMAL.match(s):
        raise ValueError(f"{s!r} is not a non-negative decimal number")
    return s


def usd_to_nano(value: str | int | Decimal) -> int:
    """Exact conversion of a decimal USD amount; sub-nano precision is an error."""
    if isinstance(value, float):
        raise TypeError("money must not be a float; pass a decimal string")
    try:
        d = Decimal(value) * _NANO
    except InvalidOperation as e:
        raise ValueError(f"not a decimal amount: {value!r}") from e
    if d != d.to_integral_value():
        raise ValueError(f"{value!r} USD has precision below one nano-dollar")
    return int(d)


def nano_to_usd(nano: int) -> str:
    """Render nano-USD as a plain decimal string, e.g. 1234500 -> '0.0012345'."""
    sign = "-" if nano < 0 else ""
    whole, frac = divmod(abs(nano), NANO_PER_USD)
    if not frac:
        return f"{sign}{whole}"
    return f"{sign}{whole}.{frac:09d}".rstrip("0")


@dataclass(frozen=True, slots=True)
class Price:
    """Per-token prices in milli-nano-USD (1e-12 USD) so per-1M prices stay integral.

    `input` applies to uncached input, `cached_input` to cache reads,
    `cache_write` to cache creation, `output` to output (reasoning included).
    """

    input: int
    output: int
    cached_input: int
    cache_write: int

    @classmethod
    def per_million(
        cls,
        input: str | Decimal,
        output: str | Decimal,
        cached_input: str | Decimal | None = None,
        cache_write: str | Decimal | None = None,
    ) -> Price:
        def conv(v: str | Decimal) -> int:
            # USD per 1M tokens -> pico-USD per token: × 1e12 / 1e6 = × 1e6
            d = Decimal(str(v)) * Decimal(10**6)
            if d < 0 or d != d.to_integral_value():
                raise ValueError(f"price {v!r} USD/1M tokens must be >= 0 with at most 6 decimals")
            return int(d)

        inp = conv(input)
        return cls(
            input=inp,
            output=conv(output),
            cached_input=inp if cached_input is None else conv(cached_input),
            cache_write=inp if cache_write is None else conv(cache_write),
        )

    def cost(
        self,
        input_tokens: int = 0,
        output_tokens: int = 0,
        cached_input_tokens: int = 0,
        cache_write_tokens: int = 0,
    ) -> int:
        """Cost in nano-USD, rounded up to the next nano-dollar (never under-charge)."""
        return pico_to_nano(self.pico(input_tokens, output_tokens, cached_input_tokens, cache_write_tokens))

    def pico(
        self,
        input_tokens: int = 0,
        output_tokens: int = 0,
        cached_input_tokens: int = 0,
        cache_write_tokens: int = 0,
    ) -> int:
        """Exact cost in pico-USD (for sums that are rounded once)."""
        return (
            input_tokens * self.input
            + output_tokens * self.output
            + cached_input_tokens * self.cached_input
            + cache_write_tokens * self.cache_write
        )


def pico_to_nano(pico: int) -> int:
    """Round pico-USD up to whole nano-USD (never under-charge)."""
    return -(-pico // 1000)
