"""CPU of the Azure Blob provider's read() alone, lean GET against the SDK pipeline.

    PYTHONPATH=. taskset -c 1 python scripts/bench_azure_read.py [--rounds 3]

No engine, no hashing, no writes: what a GET costs in this process. Starts Azurite (as the tests
do, tests/servers/azurite.py), uploads one 256 MiB blob and 100 blobs of 64 KiB, then reads
the large one in four 64 MiB ranges and every small one whole, through each path in turn
(``STORAGE_INITIALIZER_AZURE_LEAN`` true / false), and prints the medians of
``time.process_time``. Printed, never asserted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from storage_initializer import uri as uri_module
from storage_initializer.providers import open_source
from storage_initializer.settings import Settings
from tests.servers import azurite as azurite_server

MIB = 1 << 20
RANGE = 64 * MIB


def measure(uri: str, lean: str) -> tuple[float, float]:
    """CPU seconds for the large blob's ranges, and per small blob."""
    os.environ["STORAGE_INITIALIZER_AZURE_LEAN"] = lean
    source = open_source(uri_module.parse(uri), Settings())
    assert (getattr(source, "_lean", None) is not None) == (lean == "true")
    files = source.list().files
    big = next(f for f in files if f.path == "big.bin")
    small = [f for f in files if f.path.startswith("small/")]
    assert big.size is not None
    started = time.process_time()
    got = 0
    for start in range(0, big.size, RANGE):
        for block in source.read(big, start, min(start + RANGE, big.size)):
            got += len(block)
    large = time.process_time() - started
    assert got == big.size
    started = time.process_time()
    for item in small:
        for _block in source.read(item):
            pass
    per_file = (time.process_time() - started) / len(small)
    source.close()
    return large, per_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    location = tempfile.mkdtemp(prefix="azure-read-")
    server = azurite_server.start_azurite(location)
    try:
        container = "read"
        block = os.urandom(MIB)
        files = {"m/big.bin": block * 256}
        files.update({f"m/small/{i}.bin": os.urandom(64 * 1024) for i in range(100)})
        server.upload(container, files)
        os.environ["AZURE_STORAGE_BLOB_ENDPOINT"] = server.endpoint
        os.environ["AZURE_STORAGE_ACCESS_KEY"] = server.key
        uri = server.uri(container, "m")
        results: dict[str, list[tuple[float, float]]] = {"true": [], "false": []}
        for _ in range(args.rounds):
            for lean in results:
                results[lean].append(measure(uri, lean))
        for lean, rounds in results.items():
            large = statistics.median(r[0] for r in rounds)
            small = statistics.median(r[1] for r in rounds)
            name = "lean GET" if lean == "true" else "SDK pipeline"
            print(
                f"{name:13} 256 MiB in 64 MiB ranges: {large:.3f} CPU-s "
                f"({large * 4:.2f} CPU-s/GiB); 64 KiB blob: {small * 1000:.2f} ms CPU each"
            )
    finally:
        azurite_server.stop(server.process)
        shutil.rmtree(location, ignore_errors=True)


if __name__ == "__main__":
    main()
