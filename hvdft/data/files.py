"""Reading the user's files: encodings, formats, folders, Hub ids, and this rank's shard.

Tasks parse rows into examples; this module finds and decodes the rows. Every error
names the file and, where there is one, the line.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hvdft.errors import HvdftError

SPLIT_NAMES = {
    "train": ("train",),
    "validation": ("validation", "valid", "dev", "val", "eval"),
    "test": ("test",),
}
EXTENSIONS = (".txt", ".conll", ".conllu", ".iob", ".bio", ".tsv", ".csv", ".jsonl", ".json")


@dataclass
class Split:
    """This rank's part of one split: global count plus the examples it owns."""

    name: str
    source: str
    total: int
    ids: list[int] = field(default_factory=list)  # global index of each owned example
    examples: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class Shard:
    """Which examples this rank reads: strided sharding, example i belongs to rank i % world.

    Strided rather than contiguous so that every rank gets examples from the whole file
    (files are often sorted by length or source).
    """

    rank: int = 0
    world: int = 1

    def owns(self, index: int) -> bool:
        return index % self.world == self.rank


def hub_rows(dataset: Any, shard: Shard) -> Iterator[tuple[int, dict[str, Any]]]:
    """(global index, row) of this rank's rows of a Hugging Face dataset."""
    part = dataset.shard(num_shards=shard.world, index=shard.rank, contiguous=False)
    return zip(range(shard.rank, len(dataset), shard.world), part, strict=True)


def require_columns(columns: list[str], needed: list[tuple[str | None, str]], source: Any, line: int | None) -> None:
    """Each (column, option) of `needed` is among `columns` (None: not asked for).

    Raises HvdftError "no column 'x' (columns: a, b); use --text-column" at file:line.
    """
    for column, option_name in needed:
        if column is not None and column not in columns:
            raise HvdftError(
                f"no column '{column}' (columns: {', '.join(map(str, columns))}); use {option_name}", source, line
            )


def read_lines(path: str | Path, encoding: str = "utf-8") -> list[str]:
    """The file's lines (newlines stripped), with decode errors reported by line number."""
    p = Path(path)
    if not p.exists():
        raise HvdftError("file not found", p)
    if p.is_dir():
        raise HvdftError("is a folder, expected a file", p)
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise HvdftError(f"cannot read: {exc.strerror}", p) from None
    if data.startswith(b"\xef\xbb\xbf") and encoding.replace("-", "").lower() == "utf8":
        data = data[3:]
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise HvdftError(
            f"byte 0x{data[exc.start]:02x} is not valid {encoding} "
            "(pass --encoding if the file uses another one)",
            p,
            line,
        ) from None
    except LookupError:
        raise HvdftError(f"unknown encoding '{encoding}'") from None
    # splitlines() would also split on U+2028, U+0085 ...: only \n (and \r\n) end a line.
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def file_format(path: str | Path) -> str:
    """'jsonl', 'csv', 'tsv' or 'conll' from the file name."""
    suffix = Path(path).suffix.lower()
    if suffix in (".jsonl", ".json"):
        return "jsonl"
    if suffix == ".csv":
        return "csv"
    if suffix == ".tsv":
        return "tsv"
    return "conll"


def iter_table_rows(
    path: str | Path, fmt: str, encoding: str = "utf-8", header: bool = True
) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) for each record of a JSON-lines, CSV or TSV file."""
    lines = read_lines(path, encoding)
    if fmt == "jsonl":
        text = "\n".join(lines).strip()
        if text.startswith("["):  # a plain JSON array of records is accepted too
            try:
                records = json.loads(text)
            except json.JSONDecodeError as exc:
                raise HvdftError(f"invalid JSON: {exc.msg}", path, exc.lineno) from None
            for i, rec in enumerate(records):
                yield 1, _record(rec, path, 1, i)
            return
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise HvdftError(f"invalid JSON: {exc.msg}", path, number) from None
            yield number, _record(rec, path, number)
        return
    delimiter = "\t" if fmt == "tsv" else ","
    # TSV corpora (GLUE) are not quoted; a stray '"' must stay part of the text.
    quoting = csv.QUOTE_NONE if fmt == "tsv" else csv.QUOTE_MINIMAL
    reader = csv.reader(io.StringIO("\n".join(lines) + "\n"), delimiter=delimiter, quoting=quoting)
    try:
        names: list[str] | None = None
        for row in reader:
            number = reader.line_num
            if not any(cell.strip() for cell in row):
                continue
            if names is None:
                if header:
                    names = [c.strip() for c in row]
                    continue
                names = [str(i) for i in range(len(row))]
            if len(row) != len(names):
                raise HvdftError(
                    f"expected {len(names)} fields ({', '.join(names)}), found {len(row)}",
                    path,
                    number,
                )
            yield number, dict(zip(names, row, strict=True))
    except csv.Error as exc:
        raise HvdftError(f"malformed {fmt.upper()}: {exc}", path, reader.line_num) from None


def _record(rec: Any, path: str | Path, line: int, index: int | None = None) -> dict[str, Any]:
    if not isinstance(rec, dict):
        what = f"record {index}" if index is not None else "line"
        raise HvdftError(f"{what} is not a JSON object", path, line)
    return rec


def find_split_files(folder: str | Path) -> dict[str, Path]:
    """train / validation / test files in a folder, by their usual names."""
    folder = Path(folder)
    found: dict[str, Path] = {}
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in EXTENSIONS)
    for split, stems in SPLIT_NAMES.items():
        for p in files:
            stem = p.stem.lower()
            if stem in stems or any(stem.endswith(("_" + s, "-" + s, "." + s)) for s in stems):
                found[split] = p
                break
    if "train" not in found:
        raise HvdftError(
            f"no training file found (expected train{{{','.join(EXTENSIONS)}}})", folder
        )
    return found


def load_hub_dataset(name: str, config: str | None) -> Any:
    """A Hugging Face Hub dataset (rank 0 downloads first; the others read its cache).

    Raises HvdftError for a dataset that cannot be loaded, and says what to use instead of
    a script-based dataset, which `datasets` >= 4 no longer runs.
    """
    import datasets

    from hvdft import dist

    def load() -> Any:
        try:
            return datasets.load_dataset(name, config)
        except Exception as exc:  # noqa: BLE001 - any loader failure is a user-facing error
            first = (str(exc).splitlines() or [type(exc).__name__])[0]
            if "scripts are no longer supported" in first:
                hint = SCRIPT_DATASET_MIRRORS.get(name)
                instead = f"use --dataset {hint}, " if hint else "use a Parquet copy of it on the Hub, "
                raise HvdftError(
                    f"dataset '{name}' is script-based, which datasets {datasets.__version__} cannot load: "
                    f"{instead}or download its files and pass --dataset FOLDER or --train-file/--validation-file"
                ) from None
            raise HvdftError(f"cannot load dataset '{name}': {first}") from None

    return dist.main_first(load)


# Script-based Hub datasets and the Parquet copies that Hugging Face's own examples use now.
SCRIPT_DATASET_MIRRORS = {
    "conll2003": "tomaarsen/conll2003",  # transformers' examples/pytorch/token-classification
}
