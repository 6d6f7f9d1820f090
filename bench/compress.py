"""Compression benchmark: DCU's ISA-L gzip against the seed's ``gzip -6``, in one run.

    .venv/bin/python bench/compress.py [--size-mb 200] [--input FILE.tar]

Without ``--input`` it writes a deterministic tar of mixed data (half text-like, half
random, like real image layers) to a temporary directory. Every variant compresses the
same file from the page cache (one warm-up read first); the output is checked with
``gzip -t``. Prints MB/s (10^6 bytes of input per second), the compressed size, and each
variant's speed and size relative to the baseline (``gzip -6``, what the seed's
``docker save | gzip -6`` pipeline runs).
"""

from __future__ import annotations

import argparse
import io
import os
import random
import subprocess
import tarfile
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

from actors.compression import compress_file


def make_input(path: Path, size_mb: int) -> None:
    rng = random.Random(20261127)
    words = [rng.randbytes(rng.randint(2, 9)).hex().encode() for _ in range(4000)]
    with tarfile.open(path, "w") as tar:
        for index in range(max(1, size_mb // 25)):
            text = b" ".join(rng.choice(words) for _ in range(1_600_000))[:12_500_000]
            blob = text + rng.randbytes(12_500_000)
            info = tarfile.TarInfo(f"layer{index}/data.bin")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


def gzip_cli(level: int) -> Callable[[Path, Path], None]:
    def run(src: Path, dest: Path) -> None:
        with src.open("rb") as source, dest.open("wb") as out:
            subprocess.run(["gzip", f"-{level}", "-c"], stdin=source, stdout=out, check=True)

    return run


def stdlib_zlib(level: int) -> Callable[[Path, Path], None]:
    def run(src: Path, dest: Path) -> None:
        compressor = zlib.compressobj(level, zlib.DEFLATED, 31)
        with src.open("rb") as source, dest.open("wb") as out:
            while chunk := source.read(4 << 20):
                out.write(compressor.compress(chunk))
            out.write(compressor.flush())

    return run


def dcu_isal(level: int, threads: int) -> Callable[[Path, Path], None]:
    def run(src: Path, dest: Path) -> None:
        compress_file(src, dest, level=level, threads=threads)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--input", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dcu-bench-") as tmp:
        work = Path(tmp)
        src = args.input or work / "image.tar"
        if args.input is None:
            make_input(src, args.size_mb)
        size = src.stat().st_size
        src.read_bytes()  # warm the page cache so every variant reads from memory
        variants: list[tuple[str, Callable[[Path, Path], None]]] = [
            ("gzip -6 (seed baseline)", gzip_cli(6)),
            ("gzip -1", gzip_cli(1)),
            ("stdlib zlib level 6", stdlib_zlib(6)),
            ("DCU isal level 1, 1 thread", dcu_isal(1, 1)),
            ("DCU isal level 1, 2 threads (default)", dcu_isal(1, 2)),
            ("DCU isal level 2, 2 threads", dcu_isal(2, 2)),
        ]
        results = []
        for name, run in variants:
            dest = work / "out.tar.gz"
            started = time.perf_counter()
            run(src, dest)
            seconds = time.perf_counter() - started
            subprocess.run(["gzip", "-t", str(dest)], check=True)
            results.append((name, seconds, dest.stat().st_size))
            dest.unlink()
        print(f"input: {size / 1e6:.1f} MB, {os.cpu_count()} CPUs")
        base_seconds, base_size = results[0][1], results[0][2]
        print(f"{'variant':40} {'MB/s':>8} {'out MB':>8} {'speed x':>8} {'size x':>7}")
        for name, seconds, out in results:
            print(
                f"{name:40} {size / 1e6 / seconds:8.1f} {out / 1e6:8.1f} "
                f"{base_seconds / seconds:8.2f} {out / base_size:7.3f}"
            )


if __name__ == "__main__":
    main()
