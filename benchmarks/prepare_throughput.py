"""`prepare`'s throughput and memory against tiktoken's own ceiling, in one run.

Builds a corpus of text documents (one per file, ~20 KB each, cut from the mirrored texts and
numbered so no two are the same) of each size asked for, then for 1 and 2 workers times:
- the ceiling: `encode_ordinary_batch` over the same documents, already in memory, with the same
  number of threads, nothing else;
- `prepare`'s core: `tokenize_part` + `gather_parts` (reading, encoding, writing the shards);
alternately, `--rounds` times, keeping each one's best. Then, in a fresh process each, the whole
`python -m pipeline prepare` command's peak RSS (also with the largest corpus as one file, one
document read in pieces), and the code before this change (`--old-rev`,
taken from git into a temporary directory) on the smallest corpus, for comparison.

    python benchmarks/prepare_throughput.py                 # 100 and 500 MB
    python benchmarks/prepare_throughput.py --sizes 20      # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.data.corpus import CorpusFile  # noqa: E402
from pipeline.data.tokenizer import gpt2_tokenizer  # noqa: E402
from pipeline.data.tokens import gather_parts, tokenize_part  # noqa: E402

DOC_CHARS = 20_000


def build_corpus(directory: Path, mirror: Path, megabytes: int) -> list[Path]:
    """Numbered ~20 KB documents cut from the mirrored texts until `megabytes` are written."""
    sources = [
        (mirror / "tinyshakespeare.txt").read_text(),
        (mirror / "the-verdict.txt").read_text(),
        " ".join(r["output"] for r in json.loads((mirror / "instruction-data.json").read_text())),
    ]
    text = "\n\n".join(sources)
    directory.mkdir(parents=True, exist_ok=True)
    files, written, offset = [], 0, 0
    while written < megabytes * 1_000_000:
        n = len(files)
        start = offset % (len(text) - DOC_CHARS)
        body = f"Document {n}.\n" + text[start : start + DOC_CHARS]
        path = directory / f"doc{n:06d}.txt"
        path.write_text(body)
        files.append(path)
        written += len(body.encode())
        offset += 7919  # a prime stride: documents start at different places
    return files


def ceiling(files: list[Path], tokenizer, workers: int) -> float:
    documents = [p.read_text() for p in files]
    start = time.perf_counter()
    tokenizer.encode_ordinary_batch(documents, num_threads=workers)
    return time.perf_counter() - start


def prepare_core(files: list[Path], out: Path, tokenizer, workers: int) -> float:
    start = time.perf_counter()
    corpus = [CorpusFile(p, "text") for p in files]
    tokenize_part(corpus, out / "part", tokenizer, workers=workers, split="documents",
                  val_fraction=0.1)  # fmt: skip
    gather_parts([out / "part"], out / "tokens", tokenizer, split="documents",
                 val_fraction=0.1, shard_tokens=100_000_000)  # fmt: skip
    return time.perf_counter() - start


def peak_rss_mb(command: list[str], cwd: Path, env: dict | None = None) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of a command, from GNU time."""
    report = cwd / "time.txt"
    start = time.perf_counter()
    subprocess.run(["/usr/bin/time", "-f", "%M", "-o", str(report), *command], cwd=cwd,
                   check=True, env=env, capture_output=True)  # fmt: skip
    seconds = time.perf_counter() - start
    return seconds, int(report.read_text().split()[-1]) / 1024


def cli_prepare(corpus: Path, work: Path, mirror: Path, workers: int) -> tuple[float, float]:
    config = {
        "paths": {"data": str(work / "data")},
        "data": {"mirrors": [str(mirror)]},
        "prepare": {"corpus": [{"path": str(corpus)}], "workers": workers},
        "tracking": {"uri": f"sqlite:///{work / 'mlflow.db'}"},
    }
    (work / "data" / "raw").mkdir(parents=True, exist_ok=True)
    for name in ("encoder.json", "vocab.bpe"):
        (work / "data" / "raw" / "gpt2-bpe").mkdir(exist_ok=True)
        (work / "data" / "raw" / "gpt2-bpe" / name).write_bytes(
            (mirror / "gpt2-bpe" / name).read_bytes()
        )
    (work / "bench.yaml").write_text(yaml.safe_dump(config))
    command = [sys.executable, "-m", "pipeline", "prepare", "--config",
               str(REPO / "config.yaml"), "--config", "bench.yaml"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return peak_rss_mb(command, work, env)


OLD_SCRIPT = """
import sys
from pathlib import Path
from pipeline.data.tokenizer import gpt2_tokenizer
from pipeline.data.tokens import prepare_corpus
files = sorted(Path(sys.argv[1]).glob("*.txt"))
prepare_corpus(files, Path(sys.argv[2]), gpt2_tokenizer(Path(sys.argv[3])), 0.1)
"""


def old_prepare(rev: str, corpus: Path, work: Path, mirror: Path) -> tuple[float, float]:
    """Today's path before this change: the old package from git, in a process of its own."""
    old = work / "old"
    old.mkdir()
    archive = subprocess.run(["git", "archive", rev, "pipeline"], cwd=REPO, check=True,
                             capture_output=True).stdout  # fmt: skip
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True)
    (old / "run.py").write_text(textwrap.dedent(OLD_SCRIPT))
    env = {**os.environ, "PYTHONPATH": str(old)}
    command = [sys.executable, str(old / "run.py"), str(corpus), str(work / "old-tokens"),
               str(mirror / "gpt2-bpe")]  # fmt: skip
    return peak_rss_mb(command, work, env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 500], help="MB of text")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--mirror", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--old-rev", default="3f19857", help="git revision of the old prepare")
    parser.add_argument("--scratch", type=Path, default=None, help="where to build the corpora")
    parser.add_argument(
        "--commands-only", action="store_true", help="skip the throughput table (memory only)"
    )
    args = parser.parse_args()
    tokenizer = gpt2_tokenizer(args.mirror / "gpt2-bpe")
    flags = sorted({f for f in Path("/proc/cpuinfo").read_text().split() if f.startswith(("avx2",
                   "avx512"))})  # fmt: skip
    print(f"CPU flags: {' '.join(flags)}; {os.cpu_count()} CPUs; load {os.getloadavg()[0]:.2f}")
    with tempfile.TemporaryDirectory(dir=args.scratch) as tmp:
        root = Path(tmp)
        print("| corpus | workers | ceiling MB/s | prepare MB/s | prepare / ceiling |")
        print("|---|---:|---:|---:|---:|")
        corpora = {}
        for size in args.sizes:
            files = corpora[size] = build_corpus(root / f"corpus-{size}", args.mirror, size)
            mb = sum(p.stat().st_size for p in files) / 1e6
            for workers in [] if args.commands_only else args.workers:
                best_ceiling = best_prepare = float("inf")
                for r in range(args.rounds):
                    best_ceiling = min(best_ceiling, ceiling(files, tokenizer, workers))
                    out = root / f"out-{size}-{workers}-{r}"
                    best_prepare = min(best_prepare, prepare_core(files, out, tokenizer, workers))
                print(f"| {mb:.0f} MB, {len(files)} docs | {workers} | {mb / best_ceiling:.2f} "
                      f"| {mb / best_prepare:.2f} | {best_ceiling / best_prepare:.2f}x |",
                      flush=True)  # fmt: skip
        print("\n| command | corpus | seconds | peak RSS MB |")
        print("|---|---|---:|---:|")
        for size, files in corpora.items():
            work = root / f"cli-{size}"
            work.mkdir()
            seconds, rss = cli_prepare(files[0].parent, work, args.mirror, max(args.workers))
            print(f"| python -m pipeline prepare ({max(args.workers)} workers) | {size} MB "
                  f"| {seconds:.1f} | {rss:.0f} |", flush=True)  # fmt: skip
        largest = max(corpora)
        single = root / "one-file"  # the largest corpus as one document: streamed in pieces
        single.mkdir()
        with open(single / "all.txt", "wb") as out:
            for path in corpora[largest]:
                out.write(path.read_bytes())
        work = root / "cli-one-file"
        work.mkdir()
        seconds, rss = cli_prepare(single, work, args.mirror, max(args.workers))
        print(f"| python -m pipeline prepare ({max(args.workers)} workers) | {largest} MB in one "
              f"file | {seconds:.1f} | {rss:.0f} |", flush=True)  # fmt: skip
        smallest = min(corpora)
        work = root / "old-run"
        work.mkdir()
        seconds, rss = old_prepare(args.old_rev, corpora[smallest][0].parent, work, args.mirror)
        print(f"| the old prepare ({args.old_rev}, one process) | {smallest} MB | {seconds:.1f} "
              f"| {rss:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
