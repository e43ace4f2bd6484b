"""The pretraining corpus: which files `prepare.corpus` names, and their documents, streamed.

A corpus entry is a `data.sources` name (a checksummed download in data/raw) or a local `path`:
a file, a directory (every corpus file below it) or a glob (`**` recurses). By suffix, a file is
- `.txt` / `.md`: one document per file;
- `.jsonl`: one document per line, the string under `field` (default `text`);
- `.parquet`: one document per row, the string in `column` (default `text`);
each optionally `.gz` or `.zst` compressed (not parquet, which compresses inside). An entry's
`format` reads every file it matches so, whatever the suffix (a `.gz`/`.zst` one still
decompressed): `{path: docs, format: text}` takes LICENSE and README too. Files are read
as streams: a JSONL or parquet file is never held whole in memory, and a text document of more
than `PIECE_CHARS` characters comes in pieces, cut only where neither split pattern (GPT-2's,
GPT-4's: pipeline/data/tokenizer.py) joins across: before a whitespace character other than a
newline between two non-whitespace ones, or before a newline that follows a letter or digit
(GPT-4's keeps punctuation with the newlines after it). So encoding the pieces one by one gives
exactly the ids of the whole (tested for both patterns).

A record that is not what is expected (not UTF-8, not JSON, no such field or column, an empty
file, corrupt .gz/.zst data, a file that is no parquet...) is an `InputError` naming the file
and line or row, or, with `on_bad_record: skip`, skipped and counted per file (by reason). What
is wrong with an entry rather than a file (a glob that matches nothing) is an error either way.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import io
import json
import re
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import InputError
from pipeline.paths import Paths
from pipeline.settings import CorpusPath, PrepareSettings

if TYPE_CHECKING:
    from zstandard import ZstdDecompressionReader

TEXT_SUFFIXES = (".txt", ".md")
FORMATS = {".txt": "text", ".md": "text", ".jsonl": "jsonl", ".parquet": "parquet"}
COMPRESSIONS = (".gz", ".zst")
PIECE_CHARS = 1 << 20
"""A text document is read and encoded in pieces of about this many characters."""
_READ_BYTES = 1 << 20
_CUT = re.compile(r"(?<=\S)[^\S\r\n\x1c-\x1f](?=\S)|(?<=[^\W_])[\r\n](?=\S)")
"""Where a long text may be cut. \\x1c-\\x1f are whitespace to Python, not to the tokenizer's
regex (a cut before one could split a chunk such as `.\\x1c`)."""


@dataclass(frozen=True)
class CorpusFile:
    """One input file and how its documents are read."""

    path: Path
    format: str
    """text | jsonl | parquet"""
    key: str = "text"
    """The JSONL field or parquet column holding a document."""
    entry: str = ""
    """The config key it came from (prepare.corpus.<i>), for errors."""

    @property
    def compression(self) -> str | None:
        suffix = self.path.suffix
        return suffix if suffix in COMPRESSIONS else None


@dataclass
class FileReport:
    """What reading one file gave: documents, and bad records skipped (by reason)."""

    documents: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def file_format(path: Path) -> tuple[str, str | None] | None:
    """(format, compression) from the suffixes, or None for a file that is no corpus file."""
    suffixes = path.suffixes[-2:]
    compression = suffixes[-1] if suffixes and suffixes[-1] in COMPRESSIONS else None
    base = (suffixes[0] if compression and len(suffixes) == 2 else path.suffix) or ""
    if compression and not (len(suffixes) == 2 and base in FORMATS):
        return None
    kind = FORMATS.get(base)
    if kind is None or (kind == "parquet" and compression):
        return None
    return kind, compression


_EXPECTED = (f"{', '.join(FORMATS)}, optionally .gz/.zst; or give the files' format: "
             "{path: ..., format: text}")  # fmt: skip


def _expand(pattern: str, entry: str, any_file: bool = False) -> list[Path]:
    """The corpus files a path entry names, sorted: a file, everything below a directory, or
    a glob's matches; with `any_file` (the entry gives a format), every file, else only those
    whose suffix says a format."""

    def wanted(p: Path) -> bool:
        return p.is_file() and (any_file or file_format(p) is not None)

    path = Path(pattern)
    if path.is_file():
        return [path]
    if path.is_dir():
        found = [p for p in sorted(path.rglob("*")) if wanted(p)]
        if not found:
            what = "file" if any_file else "corpus file (expected " + _EXPECTED + ")"
            raise InputError(f"{entry}: directory {path} holds no {what}")
        return found
    matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True))
    files = [p for p in matches if wanted(p)]
    if not files:
        what = "matches nothing" if not matches else "matches no corpus file"
        expected = "" if any_file else f" (expected files ending in {_EXPECTED})"
        raise InputError(f"{entry}: {pattern!r} {what}{expected}")
    return files


def corpus_files(corpus: Sequence[str | CorpusPath], paths: Paths) -> list[CorpusFile]:
    """Every input file of `corpus` (the `prepare.corpus` setting), in corpus order (entries in
    order, each entry's files sorted): the order documents are joined in. A `data.sources` name
    is one text document whatever its suffix, as before local paths existed."""
    files: list[CorpusFile] = []
    for i, item in enumerate(corpus):
        entry = f"prepare.corpus.{i}"
        if isinstance(item, str):
            path = paths.source(item)
            kind = (file_format(path) or ("text", None))[0]
            files.append(CorpusFile(path, kind, "text", entry))
            continue
        for path in _expand(item.path, entry, any_file=item.format is not None):
            kind = item.format or _format_by_suffix(path, entry)
            if kind == "parquet" and path.suffix in COMPRESSIONS:
                raise InputError(f"{entry}: {path}: a parquet file is read as it is, not "
                                 f"decompressed (parquet compresses inside)")  # fmt: skip
            key = item.column if kind == "parquet" else item.field
            files.append(CorpusFile(path, kind, key, entry))
    return files


def _format_by_suffix(path: Path, entry: str) -> str:
    found = file_format(path)
    if found is None:  # a file named directly, whatever its suffix
        raise InputError(f"{entry}: {path} is no corpus file (expected a file ending in "
                         f"{_EXPECTED})")  # fmt: skip
    return found[0]


def _open_text(path: Path) -> gzip.GzipFile | ZstdDecompressionReader | io.BufferedReader:
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    if path.suffix == ".zst":
        import zstandard  # deferred: only .zst corpora need zstandard

        return zstandard.ZstdDecompressor().stream_reader(open(path, "rb"), closefd=True)  # noqa: SIM115
    return open(path, "rb")  # noqa: SIM115


def read_documents(
    file: CorpusFile, report: FileReport, skip_bad: bool = False
) -> Iterator[tuple[str, bool]]:
    """The documents of one file, streamed, as (text, starts a document): a long text document
    comes in pieces, the first True. Bad records raise or, with `skip_bad`, are counted in
    `report` and skipped."""
    if file.format == "text":
        pieces = _text_pieces(file, report, skip_bad)
    else:
        reader = _jsonl_documents if file.format == "jsonl" else _parquet_documents
        pieces = ((text, True) for text in reader(file, report, skip_bad))
    for piece, starts in pieces:
        report.documents += starts
        yield piece, starts
    if report.documents == 0 and not report.skipped:
        _bad(report, skip_bad, "empty", f"{file.path}: empty (no document in it)")


def _bad(report: FileReport, skip_bad: bool, reason: str, message: str) -> None:
    if not skip_bad:
        raise InputError(message + " (or set prepare.on_bad_record: skip)")
    report.skip(reason)


def _corrupt_data_errors(path: Path) -> tuple[type[Exception], ...]:
    """What reading `path` raises on corrupt or truncated compressed data (none for a plain
    file: an error reading one is no bad record). A truncated .zst file is not detected:
    zstandard's stream reader ends quietly where the data does."""
    if path.suffix == ".gz":
        return (gzip.BadGzipFile, EOFError, zlib.error)
    if path.suffix == ".zst":
        import zstandard  # deferred: only .zst corpora need zstandard

        return (zstandard.ZstdError,)
    return ()


def _corrupt(file: CorpusFile, report: FileReport, skip_bad: bool, where: str, exc: Exception
             ) -> None:  # fmt: skip
    suffix = file.path.suffix
    _bad(report, skip_bad, f"corrupt {suffix}", f"{file.path}{where}: corrupt {suffix} data "
         f"({str(exc) or type(exc).__name__})")  # fmt: skip


def _text_pieces(
    file: CorpusFile, report: FileReport, skip_bad: bool
) -> Iterator[tuple[str, bool]]:
    """A text file, one document, checked to be UTF-8 before any of it is used (so a bad file
    is skipped whole), then decoded a block at a time and cut into pieces."""
    try:
        problem = _utf8_problem(file.path)
    except _corrupt_data_errors(file.path) as exc:
        _corrupt(file, report, skip_bad, "", exc)
        return
    if problem is not None:
        _bad(report, skip_bad, "not UTF-8", f"{file.path}:{problem}")
        return
    decoder = codecs.getincrementaldecoder("utf-8")()
    pending, starts = "", True
    with _open_text(file.path) as handle:
        while block := handle.read(_READ_BYTES):
            pending += decoder.decode(block)
            if len(pending) >= PIECE_CHARS and (cut := _last_cut(pending)):
                yield pending[:cut], starts
                pending, starts = pending[cut:], False
    pending += decoder.decode(b"", final=True)
    if pending:
        yield pending, starts


def _last_cut(text: str) -> int:
    """The last place in `text`'s second half where it can be cut (0: none)."""
    cuts = [m.start() for m in _CUT.finditer(text, len(text) // 2)]
    return cuts[-1] if cuts else 0


def _utf8_problem(path: Path) -> str | None:
    """`<line>: not UTF-8 (...)` for a file that does not decode, else None."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    line, offset = 1, 0  # offset: bytes before `block`
    with _open_text(path) as handle:
        while True:
            block = handle.read(_READ_BYTES)
            held = len(decoder.getstate()[0])  # an unfinished character's bytes, no newline
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as exc:
                line += block[: max(0, exc.start - held)].count(b"\n")
                return f"{line}: not UTF-8 ({exc.reason} at byte {offset - held + exc.start})"
            if not block:
                return None
            line += block.count(b"\n")
            offset += len(block)


def _lines(file: CorpusFile, report: FileReport, skip_bad: bool) -> Iterator[tuple[int, bytes]]:
    """The file's lines, numbered from 1; corrupt compressed data ends them, a bad record at
    the first line not read whole (the lines before it are kept)."""
    number = 0
    with _open_text(file.path) as raw:
        try:
            for number, line in enumerate(io.BufferedReader(raw), start=1):
                yield number, line
        except _corrupt_data_errors(file.path) as exc:
            _corrupt(file, report, skip_bad, f":{number + 1}", exc)


def _jsonl_documents(file: CorpusFile, report: FileReport, skip_bad: bool) -> Iterator[str]:
    for number, line in _lines(file, report, skip_bad):
        where = f"{file.path}:{number}"
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except UnicodeDecodeError as exc:
            _bad(report, skip_bad, "not UTF-8", f"{where}: not UTF-8 ({exc.reason})")
            continue
        except json.JSONDecodeError as exc:
            _bad(report, skip_bad, "not JSON", f"{where}: not a JSON line ({exc.msg})")
            continue
        text = record.get(file.key) if isinstance(record, dict) else None
        if not isinstance(text, str):
            what = (
                "has no"
                if not isinstance(record, dict) or file.key not in record
                else ("has a non-string")
            )
            _bad(report, skip_bad, f"no {file.key!r}",
                 f"{where}: the record {what} {file.key!r} field; expected a JSON object "
                 f"with a string {file.key!r} (set field: in the corpus entry)")  # fmt: skip
            continue
        if text:
            yield text


def _parquet_documents(file: CorpusFile, report: FileReport, skip_bad: bool) -> Iterator[str]:
    import pyarrow as pa  # deferred: pyarrow takes ~0.2 s; only parquet corpora need it
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(file.path)
    except Exception as exc:  # pyarrow raises its own types for a file that is no parquet
        _bad(report, skip_bad, "not parquet", f"{file.path}: not a parquet file ({exc})")
        return
    names = parquet.schema_arrow.names
    if file.key not in names:
        _bad(report, skip_bad, f"no column {file.key!r}",
             f"{file.path}: no column {file.key!r} (columns: {', '.join(names)}); set column: "
             "in the corpus entry")  # fmt: skip
        return
    row = 0
    batches = parquet.iter_batches(batch_size=4096, columns=[file.key])
    while True:
        try:
            batch = next(batches, None)
        except (OSError, pa.ArrowException) as exc:  # a corrupt page; the rows before are kept
            _bad(report, skip_bad, "corrupt parquet",
                 f"{file.path}: row {row + 1}: unreadable ({exc})")  # fmt: skip
            return
        if batch is None:
            return
        for text in batch.column(0).to_pylist():
            row += 1
            if not isinstance(text, str):
                _bad(report, skip_bad, "not a string",
                     f"{file.path}: row {row}: {file.key!r} is {text!r}, not a string")  # fmt: skip
                continue
            if text:
                yield text


def split_mode(section: PrepareSettings, files: list[CorpusFile]) -> str:
    """`auto` is `tail` for one text document (Tiny Shakespeare), `documents` otherwise."""
    mode = section.val_split
    if mode != "auto":
        return mode
    return "tail" if len(files) == 1 and files[0].format == "text" else "documents"


def split_into_parts(files: Sequence[CorpusFile], parts: int) -> list[list[CorpusFile]]:
    """`files` in `parts` contiguous groups of about equal bytes (so joining the parts' outputs
    in order is the whole corpus in order); a group may be empty when files are few."""
    sizes = [f.path.stat().st_size if f.path.exists() else 0 for f in files]
    total = sum(sizes) or 1
    groups: list[list[CorpusFile]] = [[] for _ in range(parts)]
    done = 0
    for file, size in zip(files, sizes, strict=True):
        index = min(parts - 1, int(parts * (done + size / 2) / total))
        groups[index].append(file)
        done += size
    return groups
