#!/usr/bin/env python
"""A second text domain for benchmarks: The Debian Administrator's Handbook (English), from Debian's
``debian-handbook`` package (GPL-2.0+ or CC-BY-SA-3.0; its copyright file is copied beside the data).

System administration prose and shell sessions, far from the Python API docs that calibration and
pydocs-valid come from. Each HTML page becomes one document; pages are split by a hash of their
name, so the split is stable: ``handbook-calib.jsonl`` (~1/3, for calibration experiments only) and
``handbook-valid.jsonl`` (held out, for the reported numbers). Nothing is committed: the text is
rebuilt from the package.

    python scripts/build_second_domain.py --out runs/data     # apt-get installs the package if absent
"""

from __future__ import annotations

import argparse
import hashlib
import html
import json
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

DOC = Path("/usr/share/doc/debian-handbook")
PAGES = DOC / "html" / "en-US"


class _Text(HTMLParser):
    SKIP = {"script", "style", "head", "nav"}

    def __init__(self):
        super().__init__()
        self.parts, self.skip = [], 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skip += 1
        elif tag in ("p", "div", "br", "li", "pre", "h1", "h2", "h3", "h4", "tr"):
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self.skip = max(0, self.skip - 1)

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data)


def page_text(path: Path) -> str:
    p = _Text()
    p.feed(path.read_text(encoding="utf-8", errors="replace"))
    text = html.unescape("".join(p.parts))
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/data")
    args = ap.parse_args()
    if not PAGES.is_dir():
        print("installing Debian's debian-handbook package", file=sys.stderr)
        subprocess.run(["apt-get", "install", "-y", "-qq", "debian-handbook"], check=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    splits = {"calib": [], "valid": []}
    for page in sorted(PAGES.glob("*.html")):
        text = page_text(page)
        if len(text) < 2000:  # tables of contents, index pages
            continue
        split = "calib" if int(hashlib.sha256(page.name.encode()).hexdigest(), 16) % 3 == 0 else "valid"
        splits[split].append({"source": page.name, "text": text})
    for split, rows in splits.items():
        with open(out / f"handbook-{split}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        print(f"{out / f'handbook-{split}.jsonl'}: {len(rows)} documents, {sum(len(r['text']) for r in rows):,} characters")
    shutil.copy(DOC / "copyright", out / "handbook-COPYRIGHT")


if __name__ == "__main__":
    main()
