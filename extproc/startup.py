"""A server process's start-up without the cyclic garbage collector.

What `extproc serve` (and the mock backend) build before they serve (modules, pydantic models,
the policy, BPE ranks) lives as long as the process, yet every few hundred allocations during
the imports the collector walked it again: ~0.1 CPU-s of a ~1.0 s start to ready (measured on
`extproc serve` with policies/demo.yaml). The collector is off from the command's start until
the process is ready (`collector_paused`), then `settle` collects once, freezes what is left
and turns it back on.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """The collector off inside (until `settle`); on exit it is as it was, for a command that
    returns without serving (a refused setting) in a process that goes on (a test)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def settle() -> None:
    """Ready to serve: one full collection, then what start-up built is frozen, out of the
    collector's sight, so a full collection walks only what calls allocate. Unfrozen, each full
    pass over ~110k start-up objects stalled the loop for tens of ms, every call in flight
    waiting (bench/gc_pauses.py). The collector is on from here."""
    gc.collect()
    gc.freeze()
    gc.enable()
