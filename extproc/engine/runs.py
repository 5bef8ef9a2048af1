"""A client's request to lower its run's limits, read from request headers.

Lowering is always safe to accept from any client (it can only restrict the
caller), so these headers need no trust. The engine passes the values to the
store as `Line.lower` on every run line of that dimension; the store keeps the
lowest value ever accepted for the run, so a later request that omits the
header cannot raise the limit back, and a value above the policy's limit has
no effect.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from ..errors import BadRequest
from ..money import usd_to_nano

# header -> limit dimension it lowers (cost in USD, the others as integers)
RUN_LOWER_HEADERS: Mapping[str, str] = {
    "x-run-budget-usd": "cost",
    "x-run-max-steps": "requests",
    "x-run-max-seconds": "duration",
    "x-run-max-tokens": "total_tokens",
}

_USD = re.compile(r"^\d{1,12}(\.\d{1,9})?$")
_INT = re.compile(r"^\d{1,15}$")


def run_overrides_from_headers(
    headers: Mapping[str, str], names: Mapping[str, str] = RUN_LOWER_HEADERS
) -> dict[str, int]:
    """{dimension: lowered limit in internal units} from the headers present.

    Raises BadRequest (param = the header) for a malformed value.
    """
    out: dict[str, int] = {}
    for header, dimension in names.items():
        raw = headers.get(header)
        if raw is None or raw == "":
            continue
        value = raw.strip()
        if dimension == "cost":
            if not _USD.match(value):
                raise BadRequest(f"{header} must be a decimal USD amount such as 2.50", param=header)
            amount = usd_to_nano(value)
        else:
            if not _INT.match(value):
                raise BadRequest(f"{header} must be a non-negative integer", param=header)
            amount = int(value)
        out[dimension] = min(amount, out.get(dimension, amount))
    return out
