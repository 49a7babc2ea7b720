"""Reading raw records: local json/jsonl/parquet/csv files, `save_to_disk` folders and hub datasets.

Everything goes through Hugging Face `datasets`; this module turns its failures into one `DataError` that names the
file and, for JSON, the line (datasets' own message hides it). `where` gives the same file:line (or record number)
for errors found later, while tokenizing a record.
"""

from __future__ import annotations

import codecs
import errno
import json
import os

import datasets

from jaxlora.training.data.config import DataError

_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def _looks_local(path: str) -> bool:
    """Whether a non-existent path was meant as a local file rather than a hub name."""
    return (
        os.path.isabs(path)
        or path.startswith((".", "~"))
        or os.path.splitext(path)[1].lower() in _FILE_BUILDERS
    )


def load_records(path: str, split: str = "train", cache_dir: str | None = None) -> datasets.Dataset:
    """Loads raw records from a local file, a save_to_disk folder or the hub.

    Args:
        path: ``.json`` (JSON lines or one JSON array), ``.jsonl``, ``.parquet``
            or ``.csv`` file; a ``datasets.save_to_disk`` folder; or a hub
            dataset name.
        split: split to take from a hub dataset or a saved ``DatasetDict``.
        cache_dir: passed to ``datasets.load_dataset`` (where it keeps the
            Arrow conversion of files); None = datasets' default.

    Returns:
        The records as a ``datasets.Dataset``.

    Raises:
        DataError: missing file, unsupported extension, malformed JSON
            (naming file and line), unknown split, or a failed hub load.
    """
    if not path:
        raise DataError("no data path given (DataConfig.path is empty)")
    local = os.path.expanduser(path)
    if os.path.isdir(local):
        return _load_from_disk(local, split)
    if os.path.isfile(local):
        return _load_file(local, cache_dir)
    if _looks_local(path):
        raise DataError(f"{path}: no such file or directory")
    try:  # Hub dataset name; not reachable from tests (no network there).
        return datasets.load_dataset(path, split=split, cache_dir=cache_dir)
    except Exception as err:  # noqa: BLE001 - hub errors come in many types
        raise DataError(f"could not load dataset {path!r} (split {split!r}) from the hub: {err}") from err


def _load_from_disk(path: str, split: str) -> datasets.Dataset:
    """Loads a save_to_disk folder, picking ``split`` from a DatasetDict."""
    try:
        loaded = datasets.load_from_disk(path)
    except Exception as err:  # noqa: BLE001
        raise DataError(f"{path}: not a datasets.save_to_disk folder: {err}") from err
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{path}: no split {split!r}; splits are {sorted(loaded)}")
        return loaded[split]
    return loaded


def _load_file(path: str, cache_dir: str | None) -> datasets.Dataset:
    """Loads one local data file with the datasets builder for its extension."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in _FILE_BUILDERS:
        raise DataError(f"{path}: unsupported file type {ext!r}; use one of {sorted(_FILE_BUILDERS)}")
    if os.path.getsize(path) == 0 or (ext in (".json", ".jsonl") and not _has_content(path)):
        raise DataError(f"{path}: the file is empty (no records)")
    if ext != ".parquet" and not _is_utf8(path):  # pyarrow reads bad bytes and fails later, far from the file
        _raise_encoding_error(path)
    try:
        return datasets.load_dataset(
            _FILE_BUILDERS[ext], data_files=path, split="train", cache_dir=cache_dir
        )
    except Exception as err:  # noqa: BLE001
        if "Not enough disk space" in str(err) or getattr(err, "errno", None) == errno.ENOSPC:
            where = cache_dir or datasets.config.HF_DATASETS_CACHE
            raise OSError(errno.ENOSPC, "No space left on device", str(where)) from None  # the CLI says it in one line
        if _FILE_BUILDERS[ext] == "json":
            _raise_json_error(path)  # datasets' own message hides the line; find it ourselves
        raise DataError(f"{path}: could not load as {ext[1:]}: {str(err) or type(err).__name__}") from err


def _has_content(path: str) -> bool:
    """Whether a text file holds anything but whitespace (read in blocks: data files can be large)."""
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            if block.strip():
                return True
    return False


def _is_utf8(path: str) -> bool:
    """Whether a text file decodes as UTF-8 (read in blocks)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with open(path, "rb") as f:
            while block := f.read(1 << 20):
                decoder.decode(block)
        decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def _raise_encoding_error(path: str) -> None:
    """Raises DataError at the first line of a text data file that is not UTF-8, naming line and byte."""
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{path}:{lineno}: not UTF-8 text (byte 0x{line[err.start]:02x} at column "
                                f"{err.start + 1}); save the file as UTF-8") from None


def _raise_json_error(path: str) -> None:
    """Scans a JSON / JSON-lines file and raises DataError at the first bad line."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{err.lineno}: not valid JSON: {err.msg}") from None
        for i, rec in enumerate(records):
            if not isinstance(rec, dict):
                raise DataError(f"{path}: array element {i}: expected a JSON object, got {type(rec).__name__}")
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{lineno}: not valid JSON: {err}") from None
        if not isinstance(rec, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")


def _jsonl_line_of(path: str, record_index: int) -> int | None:
    """1-based line of the ``record_index``-th (0-based) non-blank line of a JSON-lines file."""
    seen = -1
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                seen += 1
                if seen == record_index:
                    return lineno
    return None


def where(path: str, record_index: int) -> str:
    """``file:line`` for JSON-lines files, else ``file: record N`` (1-based)."""
    local = os.path.expanduser(path)
    if os.path.isfile(local) and local.lower().endswith((".jsonl", ".json")):
        with open(local, encoding="utf-8") as f:
            is_array = f.read(4096).lstrip().startswith("[")
        if not is_array:
            line = _jsonl_line_of(local, record_index)
            if line is not None:
                return f"{path}:{line}"
    return f"{path}: record {record_index + 1}"
