"""Print the family x target table that tests/test_real_configs.py asserts (EXPECTED), as markdown
for BENCHMARKS.md, so the table says only what the tests cover.
    python scripts/family_table.py"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_real_configs import EXPECTED, TARGETS  # noqa: E402

WORDS = {"exact": "exact (logits equal)", "runs": "lossy: loads + generates"}
cols = sorted(TARGETS)
print("| source config | " + " | ".join(cols) + " |")
print("|---|" + "---|" * len(cols))
for name, row in EXPECTED.items():
    cells = [WORDS.get(row[c], row[c].replace("refused: ", "refused (error names `") + ("`)" if row[c].startswith("refused") else "")) for c in cols]
    print(f"| {name} | " + " | ".join(cells) + " |")
