"""What verifying a checkpoint costs: seconds per GB for the checksum the commit records and every load
compares (`moe_train.checkpoint.integrity.file_checksum`, CRC-32), beside the stdlib's cryptographic hashes.

Why: a commit reads every file back and a resume reads every file again, so the checksum's speed is paid twice
per checkpoint; this is the number docs/checkpoints.md states. The file is read from the page cache (it was
just written), as the read-back after a save mostly is: the figure is CPU time, not disk time.

  python bench/checksum_cost.py [--gib 1] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from moe_train.checkpoint.integrity import file_checksum  # noqa: E402

CHUNK = 8 << 20


def _hashlib(name: str):
    def run(path: str) -> None:
        h = hashlib.new(name)
        with open(path, "rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)

    return run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gib", type=float, default=1.0)
    ap.add_argument("--dir", default=tempfile.gettempdir())
    args = ap.parse_args()
    size = int(args.gib * 2**30)
    fd, path = tempfile.mkstemp(dir=args.dir, suffix=".bin")
    try:
        with os.fdopen(fd, "wb") as f:
            block = os.urandom(CHUNK)
            for _ in range(size // CHUNK):
                f.write(block)
        print("| checksum | s/GB | GB/s |\n|---|---|---|")
        for name, fn in [("crc32 (file_checksum)", file_checksum)] + [
            (n, _hashlib(n)) for n in ("sha256", "blake2b", "md5")
        ]:
            fn(path)  # warm: the page cache holds the file, as after a save
            t0 = time.perf_counter()
            fn(path)
            per_gb = (time.perf_counter() - t0) / (size / 1e9)
            print(f"| {name} | {per_gb:.3f} | {1 / per_gb:.2f} |", flush=True)
    finally:
        os.remove(path)


if __name__ == "__main__":
    main()
