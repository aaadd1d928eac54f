"""The layouts of the compatibility suite (tests/test_compat.py) and the renderer of its report.

A :class:`Layout` is a set of objects stored under a root (a bucket, a container, a docroot, a
local directory, a Hub repository) and the path below that root which the URI names. The same
layout is uploaded to every backend's real local server; both the stock KServe initializer and
ours download it, and the trees are compared file by file.

Render the table of an actual run (the test module appends one JSON line per case to the file
named by ``COMPAT_REPORT``)::

    COMPAT_REPORT=.work/compat.jsonl python -m pytest tests/test_compat.py
    python -m tests.compat_layouts .work/compat.jsonl     # Markdown on stdout
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers import pattern, tar_bytes, zip_bytes


@dataclass(frozen=True)
class Layout:
    """Objects under a root and the path (below the root) that the URI names."""

    name: str
    description: str
    #: ``{key relative to the root: content}``.
    files: Mapping[str, bytes]
    #: What the URI names below the root: a directory prefix or one object.
    target: str = "model"
    #: Extra environment for both tools (allow/ignore patterns).
    env: Mapping[str, str] = field(default_factory=dict)

    @property
    def target_is_file(self) -> bool:
        return self.target in self.files

    def below_target(self) -> dict[str, bytes]:
        """The files under the target directory, relative to it (what a Hub repo holds)."""
        prefix = self.target.rstrip("/") + "/"
        return {k[len(prefix) :]: v for k, v in self.files.items() if k.startswith(prefix)}


def _nested() -> dict[str, bytes]:
    return {
        "model/config.json": b'{"layers": 2}\n',
        "model/weights/model.bin": pattern(20_000, 1),
        "model/weights/extra/tokenizer.json": b'{"vocab": ["a", "b"]}\n',
        "model/weights/extra/merges.txt": pattern(777, 2),
        "model/README.md": b"# a model\n",
    }


def _archive_members() -> dict[str, bytes]:
    return {
        "config.json": b'{"archived": true}\n',
        "weights/model.bin": pattern(12_345, 3),
        "weights/deep/er/vocab.txt": pattern(99, 4),
    }


LAYOUTS: tuple[Layout, ...] = (
    Layout("nested", "nested directories below a prefix", _nested()),
    Layout(
        "single-object",
        "the URI names one object (its key is the whole prefix)",
        {"model/weights.bin": pattern(5_000, 5), "model/weights.bin.sha256": b"abc\n"},
        target="model/weights.bin",
    ),
    Layout(
        "single-json",
        "the URI names one JSON file (served as application/json over HTTP)",
        {"model/config.json": b'{"single": true}\n', "model/other.json": b"{}\n"},
        target="model/config.json",
    ),
    Layout(
        "archive-tgz",
        "the URI names a single .tar.gz archive",
        {"model.tar.gz": tar_bytes(_archive_members(), "w:gz")},
        target="model.tar.gz",
    ),
    Layout(
        "archive-zip",
        "the URI names a single .zip archive",
        {"model.zip": zip_bytes(_archive_members())},
        target="model.zip",
    ),
    Layout(
        "sibling-v2",
        "prefix model with a sibling prefix model-v2 (kserve#3776)",
        {
            "model/config.json": b'{"v": 1}\n',
            "model/weights.bin": pattern(3_000, 6),
            "model-v2/config.json": b'{"v": 2}\n',
            "model-v2/weights.bin": pattern(3_000, 7),
        },
    ),
    Layout(
        "unicode-spaces",
        "unicode and spaces in directory and file names",
        {
            "model/données/poids é.bin": pattern(4_000, 8),
            "model/with space/a b.txt": b"spaces\n",
            "model/日本語.json": '{"名前": "モデル"}\n'.encode(),
            "model/plus+and%percent.txt": b"reserved characters\n",
        },
    ),
    Layout(
        "deep",
        "a file nine directories deep, next to shallower ones",
        {
            "model/a/b/c/d/e/f/g/h/i/deep.bin": pattern(2_048, 9),
            "model/a/b/c/mid.txt": b"mid\n",
            "model/top.txt": b"top\n",
        },
    ),
    Layout(
        "many-small",
        "200 small files in two directories",
        {
            f"model/{'shards' if i % 2 else 'vocab'}/part-{i:03d}.txt": pattern(16 + i, 100 + i)
            for i in range(200)
        },
    ),
    Layout(
        "zero-byte",
        "a zero-byte object next to regular ones",
        {
            "model/config.json": b"{}\n",
            "model/empty.txt": b"",
            "model/sub/also-empty": b"",
            "model/weights.bin": pattern(1_000, 10),
        },
    ),
    Layout(
        "allow-patterns",
        'STORAGE_ALLOW_PATTERNS=["*.json", "weights/*.bin"] on the nested layout',
        _nested(),
        env={"STORAGE_ALLOW_PATTERNS": '["*.json", "weights/*.bin"]'},
    ),
    Layout(
        "ignore-patterns",
        "STORAGE_IGNORE_PATTERNS=*.txt,README.md (comma-separated) on the nested layout",
        _nested(),
        env={"STORAGE_IGNORE_PATTERNS": "*.txt,README.md"},
    ),
)

BY_NAME: dict[str, Layout] = {layout.name: layout for layout in LAYOUTS}


def content_id(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:12]


# -- the report -----------------------------------------------------------------------------

_RESULT_TEXT = {
    "same": "same",
    "difference": "documented difference",
    "stock-fails": "stock fails",
    "bug": "**differs: bug of ours**",
}


def render(lines: list[dict[str, object]]) -> str:
    """Markdown: a layouts × backends table, then the counts per backend."""
    cells: dict[tuple[str, str], str] = {}
    backends: list[str] = []
    counts: dict[str, Counter[str]] = defaultdict(Counter)
    for line in lines:
        backend, layout, result = str(line["backend"]), str(line["layout"]), str(line["result"])
        if backend not in backends:
            backends.append(backend)
        refs = line.get("differences") or []
        text = _RESULT_TEXT.get(result, result)
        if refs:
            text += " (" + ", ".join(f"[{ref}](#{ref})" for ref in refs) + ")"  # type: ignore[union-attr]
        cells[(layout, backend)] = text
        counts[backend][result] += 1
    out = ["| layout | " + " | ".join(backends) + " |", "|---|" + "---|" * len(backends)]
    for layout in LAYOUTS:
        row = [cells.get((layout.name, b), "n/a") for b in backends]
        out.append(f"| `{layout.name}` | " + " | ".join(row) + " |")
    out += [
        "",
        "| backend | same | documented difference | stock fails | bug of ours | total |",
        "|---|---|---|---|---|---|",
    ]
    total: Counter[str] = Counter()
    for backend in backends:
        c = counts[backend]
        total.update(c)
        out.append(
            f"| {backend} | {c['same']} | {c['difference']} | {c['stock-fails']} | {c['bug']} "
            f"| {sum(c.values())} |"
        )
    out.append(
        f"| **all** | {total['same']} | {total['difference']} | {total['stock-fails']} "
        f"| {total['bug']} | {sum(total.values())} |"
    )
    return "\n".join(out) + "\n"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m tests.compat_layouts REPORT.jsonl", file=sys.stderr)
        return 2
    lines = [json.loads(t) for t in Path(argv[0]).read_text().splitlines() if t.strip()]
    sys.stdout.write(render(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
