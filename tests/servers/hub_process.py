"""The test Hub in a process of its own, with its LFS files on a CDN of their own (nginx): the
benchmark's Hub, laid out as the real one is.

Why: run inside the benchmark's process, the Hub shared one GIL with the benchmark and held
the whole model in memory, and every byte left through Python's ``socket.sendall``; that server,
not the tools, bounded the ``hf://`` rows. The real Hub answers the API and small files itself
and redirects LFS downloads to its CDN (``cdn-lfs``), whose answer carries the bytes. So here:

- this process answers the API and ``resolve`` (:class:`tests.servers.hub.HubServer`: the same
  routes, headers and errors as in the tests), holding only the small regular files; an LFS
  file is known by its sha256 and size (:class:`LinkedFile`), and its ``resolve`` is the Hub's
  302 to ``{cdn}/cdn/{sha256}`` with ``X-Linked-Etag``, ``X-Linked-Size``, ``X-Repo-Commit`` and
  ``ETag`` (what huggingface_hub reads from the first answer, before it follows the redirect);
- the CDN is any static server of ``{docroot}/cdn/{sha256}`` (the benchmark's nginx): files from
  disk, ranges, no Python. :func:`layout` links the files there and writes the manifest.

Run: ``python -m tests.servers.hub_process MANIFEST PORT`` (from the repository root); it serves
on 127.0.0.1:PORT until SIGTERM. The manifest (JSON)::

    {"cdn": "http://127.0.0.1:8081", "repos": [{"id": "bench/model", "kind": "models",
     "files": {"config.json": {"path": "/…/config.json"},
               "model.safetensors": {"sha256": "…", "size": 536870912}}}]}
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

from tests.servers.hub import HubFile, HubServer


@dataclass(frozen=True)
class LinkedFile(HubFile):
    """An LFS file known by digest and size only: its bytes are on the CDN, not here."""

    data: bytes = b""
    lfs: bool = True
    digest: str = ""
    length: int = 0

    @property
    def size(self) -> int:
        return self.length

    @property
    def sha256(self) -> str:  # type: ignore[override]
        return self.digest


def layout(
    repo_id: str, files: dict[str, Path], docroot: Path, cdn_url: str, lfs_min: int
) -> dict[str, object]:
    """The manifest of one model repository (``name -> path`` on disk), its files of
    ``lfs_min`` bytes or more as LFS files linked into ``{docroot}/cdn/{sha256}``. Each file
    is hashed once, here, from disk."""
    cdn = docroot / "cdn"
    cdn.mkdir(parents=True, exist_ok=True)
    entries: dict[str, dict[str, object]] = {}
    for name, path in files.items():
        size = path.stat().st_size
        if size < lfs_min:
            entries[name] = {"path": str(path)}
            continue
        with open(path, "rb") as handle:
            digest = hashlib.file_digest(handle, "sha256").hexdigest()
        target = cdn / digest
        if not target.exists():
            try:
                os.link(path, target)
            except OSError:  # another file system: nginx follows a symlink as well
                target.symlink_to(path)
        entries[name] = {"sha256": digest, "size": size}
    return {"cdn": cdn_url, "repos": [{"id": repo_id, "kind": "models", "files": entries}]}


def serve(manifest: dict[str, object], port: int) -> HubServer:
    """A started :class:`HubServer` on ``port`` holding the manifest's repositories."""
    server = HubServer(port=port)
    server.cdn_url = str(manifest["cdn"]).rstrip("/")
    for spec in manifest["repos"]:  # type: ignore[attr-defined]
        repo = server.add_repo(spec["id"], spec.get("kind", "models"))
        content: dict[str, bytes | HubFile] = {}
        for name, entry in spec["files"].items():
            if "sha256" in entry:
                content[name] = LinkedFile(digest=entry["sha256"], length=int(entry["size"]))
            else:
                content[name] = Path(entry["path"]).read_bytes()
        repo.add_commit(content)
    return server.start()


def main(argv: list[str]) -> int:
    manifest = json.loads(Path(argv[0]).read_text())
    server = serve(manifest, int(argv[1]))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while True:
            signal.pause()
    except (SystemExit, KeyboardInterrupt):
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
