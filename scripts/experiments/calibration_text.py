"""Does calibration text from more than Python docs make the default conversions hold outside them?

Issue 14: with the built-in calibration (6 Python-doc documents, of which the default 8,192 tokens read
the first two), calibrated MQA and MLA -75% lose much more on the Debian handbook than on pydocs-valid.
Each conversion here calibrates on 8,192 tokens (16 windows of 512) unless named otherwise, from:

- ``builtin``: the CLI default (the built-in text, read from its start: its first two documents);
- ``builtin-spread``: the built-in text, at most 3 windows from each of its 6 documents (16 windows in all);
- ``pydocs-spread``: Python docs only, 2 windows from each of the first 8 pydocs-train documents;
- ``pydocs+handbook``: the same 4 Python docs alternating with 4 handbook-calib pages (the handbook's own
  domain, never its valid pages: the most a domain match can buy);
- ``pydocs+manuals``: the same 4 Python docs alternating with 4 pages of two other Debian manuals
  (developers-reference, debian-policy): text outside Python docs that is not the handbook;
- ``pydocs+handbook-16k``: ``pydocs-spread``'s 8 documents alternating with 8 handbook-calib pages, 2 windows
  each: 16,384 tokens, so the Python docs are read as in ``pydocs-spread`` and the handbook is added;
- ``pydocs-spread-16k``: its control, 16,384 tokens of Python docs only (2 windows from each of the first 16).

and, for the long-context recipe (16,384 tokens in 8 windows of 2,048, the README's ``--calib-seq-len 2048
--calib-tokens 16384``; meant for the ``mla75r48`` target):

- ``builtin-2k16k``: the built-in text, as the README's recipe has it;
- ``pydocs-2k16k``: one window from each of 8 pydocs-train documents;
- ``pydocs+handbook-2k16k``: the first 4 of those alternating with 4 handbook-calib pages.

and is scored on pydocs-valid and handbook-valid (512-token windows, against the source), which no
calibration reads. The manuals are read from their Debian packages (``apt-get download``); nothing is
committed.

    python scripts/experiments/calibration_text.py --targets mqa,mla75 --out runs/calib-text

``--long`` converts nothing: it measures retrieval (passkey and multikey, 1K/2K/4K, the long-context bench's
10 prompts per length) and perplexity by position (2 windows of 4,096 tokens of each domain) on the folders an
earlier run wrote, and on the source once, into ``long.json``:

    python scripts/experiments/calibration_text.py --long --targets mqa,mla75 --calibs builtin,pydocs-spread-16k,pydocs+handbook-16k
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_common import run_measured  # noqa: E402
from build_second_domain import page_text  # noqa: E402

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
HANDBOOK = Path("runs/data")
SOURCE = "HuggingFaceTB/SmolLM2-135M-Instruct"
TARGETS = {"mqa": ["--to", "mqa"], "mla50": ["--to", "mla", "--kv-lora-rank", "128", "--rope-dim", "64"],
           "mla75": ["--to", "mla", "--kv-lora-rank", "64", "--rope-dim", "32"],
           # -75% split for long context (README: "at -75% for long context"), calibrated on the *-2k16k texts
           "mla75r48": ["--to", "mla", "--kv-lora-rank", "48", "--rope-dim", "48"]}
DOCS = 4  # documents from each side of a mix
PER_DOC_WINDOWS = 2  # 2 x 512 tokens from each, so 8,192 tokens span 8 documents
MANUALS = ("developers-reference", "debian-policy")


def jsonl(rows: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def require(*paths: Path) -> list[Path]:
    """``paths``, refused with the fix when one is missing."""
    if missing := [str(p) for p in paths if not p.is_file()]:
        raise SystemExit(f"missing {', '.join(missing)}: the handbook comes from `python scripts/build_second_domain.py --out runs/data`")
    return list(paths)


def long_docs(rows: list[dict], n: int, chars: int = 8000) -> list[dict]:
    """The first ``n`` documents of at least ``chars`` characters (~4 a token; the default: two windows of 512)."""
    return [r for r in rows if len(r["text"]) >= chars][:n]


def manual_pages() -> list[dict]:
    """HTML chapters of the Debian manuals, in name order, alternating between the two manuals."""
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["apt-get", "download", *MANUALS], cwd=tmp, check=True, capture_output=True)
        per = []
        for deb in sorted(Path(tmp).glob("*.deb")):
            root = Path(tmp) / deb.stem
            subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
            pages = sorted(p for p in root.rglob("*.html") if p.name.startswith(("ch", "best-", "pkgs", "developer-", "resources", "tools", "new-")))
            per.append([{"source": p.name, "text": page_text(p)} for p in pages])
    mixed = [r for pair in zip(*per) for r in pair]
    return long_docs(mixed, DOCS)


def build(out: Path, names: list[str]) -> dict[str, list[str]]:
    """The ``kvsurgeon convert`` options of each calibration in ``names``; only their texts are written
    (the Debian manuals are downloaded only when asked for)."""
    need = require(SHARED / "pydocs-train.jsonl", HANDBOOK / "handbook-calib.jsonl", HANDBOOK / "handbook-valid.jsonl")
    train = [json.loads(l) for l in need[0].read_text().splitlines() if l.strip()]
    hb = [json.loads(l) for l in need[1].read_text().splitlines() if l.strip()]
    py8 = long_docs(train, 2 * DOCS)
    py4 = py8[:DOCS]
    alt = lambda a, b: [r for pair in zip(a, b) for r in pair]  # noqa: E731
    out.mkdir(parents=True, exist_ok=True)
    spread = ["--calib-windows-per-text", str(PER_DOC_WINDOWS)]
    k16 = ["--calib-tokens", "16384"]
    w2k, one = ["--calib-seq-len", "2048", *k16], ["--calib-windows-per-text", "1"]
    texts = {  # name -> (its documents, extra options); None: the built-in text
        "builtin": (None, []),
        "builtin-spread": (None, ["--calib-windows-per-text", "3"]),
        "pydocs-spread": (lambda: py8, spread),
        "pydocs+handbook": (lambda: alt(py4, long_docs(hb, DOCS)), spread),
        "pydocs+manuals": (lambda: alt(py4, manual_pages()), spread),
        # the 16K control: Python docs only, 2 windows from each of the first 16
        "pydocs-spread-16k": (lambda: long_docs(train, 4 * DOCS), spread + k16),
        # pydocs-spread's 16 windows with 16 handbook windows added: twice the tokens, the same Python docs
        "pydocs+handbook-16k": (lambda: alt(py8, long_docs(hb, 2 * DOCS)), spread + k16),
        # 2,048-token windows, one from each document (12,000 characters hold one)
        "builtin-2k16k": (None, w2k),
        "pydocs-2k16k": (lambda: long_docs(train, 2 * DOCS, 12000), one + w2k),
        "pydocs+handbook-2k16k": (lambda: alt(long_docs(train, DOCS, 12000), long_docs(hb, DOCS, 12000)), one + w2k),
    }
    if unknown := [n for n in names if n not in texts]:
        raise SystemExit(f"--calibs: unknown {', '.join(unknown)}; choose from {', '.join(texts)}")
    opts = {}
    for name in names:
        docs, extra = texts[name]
        opts[name] = ([] if docs is None else ["--calib-data", str(jsonl(docs(), out / f"calib-{name}.jsonl"))]) + extra
    return opts


def eval_json(model: str, *argv: str) -> dict:
    """``kvsurgeon eval MODEL ARGV --json``, in a child process, as a dict."""
    res = subprocess.run([sys.executable, "-m", "kvsurgeon.convert.cli", "eval", model, *argv, "--json"],
                         check=True, capture_output=True, text=True)
    return json.loads(res.stdout)


def long_eval(model: str, domains: dict[str, Path]) -> dict:
    """Retrieval and perplexity by position of ``model``: the bench's prompts (5 depths x 2, seed 0) and, per domain,
    2 windows of 4,096 tokens."""
    def run(*argv: str) -> dict:
        return eval_json(model, *argv)["long_context"][0]
    r = run("--tasks", "passkey,multikey,long-ppl", "--depths", "5", "--samples", "2", "--data", str(domains["pydocs"]))
    row = {k: r[k] for k in ("passkey_by_length", "multikey_by_length", "passkey_logprob_by_length", "long_ppl_buckets")}
    row["long_ppl"] = {"pydocs": r["long_ppl"]}
    for dom, path in domains.items():
        if dom != "pydocs":
            row["long_ppl"][dom] = run("--tasks", "long-ppl", "--data", str(path))["long_ppl"]
    return row


def measure_long(out: Path, targets: list[str], names: list[str], domains: dict[str, Path]) -> None:
    """--long: the folders of an earlier run, and the source, each measured once at long context."""
    folders = {f"{t}-{n}": out / f"{t}-{n}" for t in targets for n in names}
    require(*domains.values())
    if missing := [str(f) for f in folders.values() if not (f / "config.json").is_file()]:
        raise SystemExit(f"--long measures folders an earlier run converted; missing {', '.join(missing)}: run without --long first")
    done = out / "long.json"
    rows = json.loads(done.read_text()) if done.is_file() else {}
    for name, model in {"source": SOURCE, **{k: str(v) for k, v in folders.items()}}.items():
        if name in rows:
            continue  # a model's scores are deterministic: an interrupted run picks up where it stopped
        rows[name] = long_eval(model, domains)
        pk, mk = rows[name]["passkey_by_length"], rows[name]["multikey_by_length"]
        print(f"{name:26s} passkey {' / '.join(f'{v:.0%}' for v in pk.values())}  multikey {' / '.join(f'{v:.0%}' for v in mk.values())}  "
              f"ppl by position {' / '.join(f'{v:.2f}' for v in rows[name]['long_ppl']['pydocs'])}", flush=True)
        done.write_text(json.dumps(rows, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--targets", default="mqa,mla75", help=f"comma-separated: {', '.join(TARGETS)}")
    ap.add_argument("--calibs", default="builtin,builtin-spread,pydocs-spread,pydocs+handbook,pydocs+manuals,pydocs+handbook-16k,pydocs-spread-16k")
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--out", default="runs/calib-text")
    ap.add_argument("--long", action="store_true", help="measure retrieval and ppl by position on an earlier run's folders; convert nothing")
    args = ap.parse_args()
    out = Path(args.out)
    domains = {"pydocs": SHARED / "pydocs-valid.jsonl", "handbook": HANDBOOK / "handbook-valid.jsonl"}
    if args.long:  # the texts are already written and converted: build nothing (pydocs+manuals would download again)
        return measure_long(out, args.targets.split(","), args.calibs.split(","), domains)
    calibs = build(out, args.calibs.split(","))
    done = out / "results.json"
    rows = json.loads(done.read_text()) if done.is_file() else []  # a later run adds its rows to an earlier run's
    for target in args.targets.split(","):
        for name in args.calibs.split(","):
            folder = out / f"{target}-{name}"
            st = run_measured(["convert", SOURCE, *TARGETS[target], *calibs[name], "--out", str(folder), "--overwrite", "--measure", "off"],
                              out / f"{folder.name}.stats.json")
            row = {"target": target, "calib": name, "convert_s": round(st["seconds"]), "command": st["command"]}
            for dom, path in domains.items():
                r = eval_json(str(folder), "--reference", SOURCE, "--data", str(path), "--max-tokens", str(args.eval_tokens))
                row[dom] = {"ppl": r["ppl"], "reference_ppl": r["reference_ppl"], "ratio": r["ppl"] / r["reference_ppl"],
                            "kl": r["kl"], "tokens": r["tokens"]}
            rows = [x for x in rows if (x["target"], x["calib"]) != (target, name)] + [row]
            print(f"{target:6s} {name:16s} pydocs {row['pydocs']['ratio']:.2f}x (KL {row['pydocs']['kl']:.3f})  "
                  f"handbook {row['handbook']['ratio']:.2f}x (KL {row['handbook']['kl']:.3f})  convert {row['convert_s']} s", flush=True)
            (out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
