"""A TCP proxy that delays each direction by a fixed time: WAN latency on loopback.

tc netem would need a network namespace; this adds ``--delay-ms`` to every byte in each
direction (10 ms each way = 20 ms round trip) without limiting bandwidth. Every chunk
read is stamped with its due time and written, in order, when that time comes, so a
pipelining client keeps many chunks in flight exactly as over a real long link.

    python -m bench.latency_proxy --listen 127.0.0.1:PORT --target 127.0.0.1:110 --delay-ms 10
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time

__all__ = ["serve"]


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
    queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

    async def sender() -> None:
        while True:
            due, data = await queue.get()
            if not data:
                break
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
        # Pass the half-close on, also delayed, so QUIT's reply is not cut.
        with contextlib.suppress(OSError):
            if writer.can_write_eof():
                writer.write_eof()

    task = asyncio.create_task(sender())
    try:
        while True:
            data = await reader.read(65536)
            queue.put_nowait((time.monotonic() + delay, data))
            if not data:
                break
        await task
    except (ConnectionError, OSError):
        task.cancel()


async def serve(listen: tuple[str, int], target: tuple[str, int], delay: float) -> None:
    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(*target)
        except OSError:
            client_w.close()
            return
        await asyncio.sleep(delay)  # the SYN's trip, roughly
        try:
            await asyncio.gather(_pump(client_r, server_w, delay),
                                 _pump(server_r, client_w, delay))
        finally:
            server_w.close()
            client_w.close()

    server = await asyncio.start_server(handle, *listen)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", required=True)
    parser.add_argument("--target", required=True)
    parser.add_argument("--delay-ms", type=float, default=10.0)
    args = parser.parse_args()
    lhost, lport = args.listen.rsplit(":", 1)
    thost, tport = args.target.rsplit(":", 1)
    coro = serve((lhost, int(lport)), (thost, int(tport)), args.delay_ms / 1000)
    try:
        import uvloop

        uvloop.run(coro)
    except ImportError:
        asyncio.run(coro)


if __name__ == "__main__":
    main()
