"""A `write()` per journal record against group commit (the records of one event-loop iteration in
one `write()`, each operation awaiting it), CPU per operation. What the journal store chose from.

    python -m bench.group_commit
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time

N = 20_000
RECORD = b"x" * 1200 + b"\n"  # about one journal line (reserve or settle)


async def per_op(fd: int) -> None:
    for _ in range(N):
        os.write(fd, RECORD)


async def grouped(fd: int, concurrency: int) -> None:
    loop = asyncio.get_running_loop()
    buf: list[bytes] = []
    waiters: list[asyncio.Future[None]] = []

    def flush() -> None:
        os.write(fd, b"".join(buf))
        buf.clear()
        for w in waiters:
            w.set_result(None)
        waiters.clear()

    async def op() -> None:
        if not buf:
            loop.call_soon(flush)
        buf.append(RECORD)
        done = loop.create_future()
        waiters.append(done)
        await done

    async def worker(n: int) -> None:
        for _ in range(n):
            await op()

    await asyncio.gather(*(worker(N // concurrency) for _ in range(concurrency)))


async def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        fd = os.open(f"{tmp}/journal", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        for name, run in [("write per operation", lambda: per_op(fd)),
                          ("group commit, 1 writer", lambda: grouped(fd, 1)),
                          ("group commit, 16 writers", lambda: grouped(fd, 16))]:  # fmt: skip
            t0 = time.process_time()
            await run()
            print(f"{name}: {(time.process_time() - t0) / N * 1e6:.2f} µs CPU per operation")
        os.close(fd)


if __name__ == "__main__":
    asyncio.run(main())
