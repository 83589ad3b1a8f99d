"""Print the family x target table that tests/test_real_configs.py asserts (EXPECTED), as markdown
for BENCHMARKS.md, so the table says only what the tests cover; with --readme, README's source table
(tests/test_real_configs.py checks README carries exactly that output).
    python scripts/family_table.py            # BENCHMARKS.md, "Source families x targets"
    python scripts/family_table.py --readme   # README.md, "Sources"
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from real_configs import real_config  # noqa: E402
from test_real_configs import EXPECTED, TARGETS  # noqa: E402

WORDS = {"exact": "exact (logits equal)", "runs": "lossy: loads + generates"}


def cell(v: str) -> str:
    if v.startswith("runs with "):
        return f"lossy with `{v.removeprefix('runs with ')}`: loads + generates (refused without it)"
    return WORDS.get(v) or v.replace("refused: ", "refused (error names `") + "`)"


def benchmarks_table() -> str:
    cols = sorted(TARGETS)
    rows = ["| source config | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    rows += [f"| {name} | " + " | ".join(cell(row[c]) for c in cols) + " |" for name, row in EXPECTED.items()]
    return "\n".join(rows)


def readme_table() -> str:
    """One row per tested config: its model_type and, per target, converts / refused (and why)."""
    def short(v: str) -> str:
        if v.startswith("runs with "):
            return "yes, with " + v.removeprefix("runs with ")
        return {"exact": "yes (exact copy)", "runs": "yes"}.get(v) or "no: " + v.removeprefix("refused: ")

    rows = ["| model_type (tested config) | `--to gqa/mqa --method mean` | `--to gqa/mqa` (calibrated) | `--to mla` | `--to hybrid` |",
            "|---|---|---|---|---|"]
    for name, row in EXPECTED.items():
        mt = real_config(name)["model_type"]
        rows.append(f"| {mt} ({name}) | {short(row['mqa-mean'])} | {short(row['mqa-calibrated'])} | "
                    f"{short(row['mla'])} | {short(row['hybrid'])} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(readme_table() if "--readme" in sys.argv[1:] else benchmarks_table())
