"""Throws malformed input at an agent's control port; run inside a lab namespace by the tests.

    python fuzz_control.py HOST PORT SECRET_FILE N_RAW N_FRAMES SEED

Raw cases are whole connections (bad magic, short handshakes, huge length fields, random bytes);
frame cases are sealed garbage sent after a good handshake, as a peer holding the secret would.
Prints a JSON summary of what it sent.
"""

from __future__ import annotations

import asyncio
import json
import random
import struct
import sys
from pathlib import Path

import msgpack

from weft.mesh.handshake import MAGIC, frame, handshake
from weft.mesh.peer import PeerInfo


async def raw_case(host: str, port: int, rng: random.Random, case: int) -> str:
    kinds = ["bad_magic", "short_handshake", "huge_length", "random", "bad_hello"]
    kind = kinds[case % len(kinds)]
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 3)
    except (OSError, TimeoutError):
        return "refused"
    try:
        if kind == "bad_magic":
            writer.write(b"wave" + bytes([1, 1]) + rng.randbytes(rng.randrange(64)))
        elif kind == "short_handshake":
            writer.write(MAGIC[: rng.randrange(1, 4)])
        elif kind == "huge_length":
            writer.write(MAGIC + bytes([1, 1]) + struct.pack(">I", 0xFFFFFFF0) + rng.randbytes(16))
        elif kind == "random":
            writer.write(rng.randbytes(rng.randrange(1, 256)))
        else:
            body = msgpack.packb({"enc": True, "pub": rng.randbytes(rng.choice([5, 32])), "ids": [1, "x"]})
            writer.write(MAGIC + bytes([1, 1]) + frame(body))
        await writer.drain()
        writer.write_eof()
        await asyncio.wait_for(reader.read(), 3)
    except (OSError, TimeoutError):
        pass
    finally:
        writer.close()
    return kind


def garbage(rng: random.Random) -> bytes:
    choice = rng.randrange(5)
    if choice == 0:
        return rng.randbytes(rng.randrange(0, 200))
    if choice == 1:
        return msgpack.packb(rng.choice([1, "x", [1, 2], None, 3.5, b"\x00"]))
    if choice == 2:
        return msgpack.packb(
            {"t": rng.choice(["g", "gb", "gu", "zz", 7]), "ch": "topology", "d": rng.randbytes(rng.randrange(0, 64))}
        )
    if choice == 3:
        return msgpack.packb({"t": "gb", "ch": "topology", "src": -5, "d": msgpack.packb([[1, 2, 3]])})
    return msgpack.packb({"t": "g", "ch": "topology", "d": msgpack.packb([[0, "x", 1, 1, []]])})[: -rng.randrange(1, 5)]


async def frame_case(host: str, port: int, secret: bytes, n: int, rng: random.Random) -> int:
    reader, writer = await asyncio.open_connection(host, port)
    me = PeerInfo(0x02FFFFFF0001, "fuzzer", rng.getrandbits(63) + 1)
    session = await handshake(reader, writer, outbound=True, ourself=me, secrets=[secret], port=6783, advertise=None)
    assert session.sealer is not None
    for i in range(n):
        writer.write(frame(session.sealer.seal(garbage(rng))))
        if i % 200 == 0:
            await writer.drain()
    await writer.drain()
    # One last frame with a length over the limit: the agent must close this connection.
    writer.write(struct.pack(">I", 0x7FFFFFFF))
    await writer.drain()
    await asyncio.wait_for(reader.read(), 30)  # returns once the agent has closed the connection
    writer.close()
    return n


async def main() -> None:
    host, port, secret_file, n_raw, n_frames, seed = sys.argv[1:7]
    rng = random.Random(int(seed))
    secret = Path(secret_file).read_bytes().strip()
    kinds: dict[str, int] = {}
    for case in range(int(n_raw)):
        kind = await raw_case(host, int(port), rng, case)
        kinds[kind] = kinds.get(kind, 0) + 1
        await asyncio.sleep(0.06)  # stay under the accept rate limit, so every case reaches the decoders
    sent = await frame_case(host, int(port), secret, int(n_frames), rng)
    print(json.dumps({"raw": kinds, "frames": sent}))


if __name__ == "__main__":
    asyncio.run(main())
