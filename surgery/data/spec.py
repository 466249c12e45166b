"""Dataset SPEC strings (what `--dataset` and recipe files name) and loading them through `datasets`.

    SPEC := SOURCE [":" SPLIT] ["@" CONFIG] ["#" KEY=VALUE ("," KEY=VALUE)*]

SOURCE is a local `.jsonl`/`.json`/`.parquet`/`.csv` file, a directory (written by
`Dataset.save_to_disk`, or a folder of data files), `builtin` (the offline default corpus; `builtin:code`,
`builtin:docs`, `builtin:tools` for one part), or a hub dataset id resolved by `datasets.load_dataset`.
Options: `samples=N` (documents, or packed rows, for this spec), `format=text|chat|alpaca|xlam|swe-smith`,
`name=CATEGORY`, `field=COLUMN` (the text column), and `split=` / `config=` (the same as `:` / `@`, for
sources whose names contain those characters). A SOURCE that exists on disk is always taken whole.

Every file is read by `datasets` (never parsed here), so what works with `load_dataset` works here, and a
hub id honours the local cache and HF_HUB_OFFLINE / HF_DATASETS_OFFLINE. Offline, a dataset fetched with
`huggingface-cli download --repo-type dataset NAME` (hub cache) is found as well as one that
`load_dataset` prepared before (datasets cache).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from surgery.data.formats import normalize_format
from surgery.data.tokenizer import first_line
from surgery.errors import SurgeryError

if TYPE_CHECKING:
    from datasets import Dataset

LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
OPTION_KEYS = ("samples", "format", "name", "field", "split", "config")
BUILTIN = "builtin"
BUILTIN_PARTS = ("code", "docs", "tools")
SAVE_TO_DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


class MissingDatasetError(SurgeryError):
    """A hub dataset that is not cached while offline; `repo_id` is what to download."""

    def __init__(self, repo_id: str, spec: str) -> None:
        self.repo_id = repo_id
        super().__init__("not in the local Hugging Face cache and offline (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE); "
                         f"fetch it where there is network: {download_hint(repo_id)}", spec)


@dataclass(frozen=True)
class DatasetSpec:
    """One parsed SPEC; `text` is the string it came from (the key for reports and hashes)."""

    source: str
    split: str | None = None
    config: str | None = None
    samples: int | None = None
    format: str | None = None
    name: str | None = None
    field: str | None = None
    text: str = ""

    @property
    def is_builtin(self) -> bool:
        return self.source == BUILTIN

    @property
    def local_path(self) -> Path | None:
        """The file or directory this spec reads, or None for a hub id / the builtin corpus."""
        if self.is_builtin:
            return None
        path = Path(self.source).expanduser()
        return path if path.exists() else None

    @property
    def category(self) -> str:
        """The name statistics are reported under: `name=`, else the dataset's own short name."""
        if self.name:
            return self.name
        if self.is_builtin:
            return f"builtin-{self.split}" if self.split else BUILTIN
        base = Path(self.source.rstrip("/")).name
        for suffix in LOCAL_BUILDERS:
            base = base.removesuffix(suffix)
        return base + (f"-{self.config}" if self.config else "")

    @property
    def sampling_key(self) -> str:
        """What seeds this spec's shuffle besides the seed: the data's identity only, so that the same
        rows are drawn whatever the sample count, the category name, or the directory a file lives in."""
        source = Path(self.source).name if self.local_path is not None else self.source
        return f"{source}|{self.split or ''}|{self.config or ''}|{self.field or ''}"

    def to_string(self) -> str:
        """A SPEC string that `parse_spec` turns back into this spec."""
        simple = not any(c in self.source for c in ":@#,")
        head, opts = self.source, []
        if simple and self.split and "@" not in self.split and "#" not in self.split and "," not in self.split:
            head += f":{self.split}"
        elif self.split:
            opts.append(f"split={self.split}")
        if simple and self.config and not any(c in self.config for c in ":#,"):
            head += f"@{self.config}"
        elif self.config:
            opts.append(f"config={self.config}")
        for key in ("samples", "format", "name", "field"):
            value = getattr(self, key)
            if value is not None:
                opts.append(f"{key}={value}")
        return head + ("#" + ",".join(opts) if opts else "")


def parse_spec(text: str, base: Path | None = None) -> DatasetSpec:
    """Parse a SPEC string (see the module docstring); raises SurgeryError naming the spec. A relative
    local path is looked up under `base` first (a recipe's directory), then the working directory."""
    raw = text.strip()
    if not raw:
        raise SurgeryError("empty dataset spec")
    head, options = raw, {}
    if "#" in raw:
        before, _, tail = raw.rpartition("#")
        if tail and all("=" in part for part in tail.split(",")):
            head, options = before, _parse_options(tail, raw)
    fields: dict[str, str | None] = {"split": None, "config": None}
    whole = _existing(head, base) if head != BUILTIN else None
    if whole is not None:
        source = whole
    else:
        source, fields = _split_head(head, raw, base)
    for key in ("split", "config"):
        if key in options:
            fields[key] = options.pop(key)
    samples = options.pop("samples", None)
    spec = DatasetSpec(
        source=source,
        split=fields["split"] or None,
        config=fields["config"] or None,
        samples=_positive_int(samples, "samples", raw) if samples is not None else None,
        format=normalize_format(options["format"], raw) if "format" in options else None,
        name=options.get("name") or None,
        field=options.get("field") or None,
        text=raw,
    )
    _check_source(spec)
    return spec


def expand_builtin(spec: DatasetSpec) -> list[DatasetSpec]:
    """`builtin` stands for its three parts; each part is sampled and reported on its own."""
    if not spec.is_builtin or spec.split:
        return [spec]
    parts = [replace(spec, split=part, name=f"{spec.name}-{part}" if spec.name else None) for part in BUILTIN_PARTS]
    return [replace(part, text=part.to_string()) for part in parts]


def load_rows(spec: DatasetSpec) -> Dataset:
    """The spec's rows as a `datasets.Dataset` (local file, saved directory or hub id)."""
    import datasets

    path = spec.local_path
    try:
        if path is not None and path.is_file():
            builder = LOCAL_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise SurgeryError(f"unsupported file type {path.suffix!r} (use one of "
                                   f"{', '.join(LOCAL_BUILDERS)}, or a directory)", spec.text)
            return datasets.load_dataset(builder, data_files=str(path), split=spec.split or "train")
        if path is not None:
            if any((path / marker).is_file() for marker in SAVE_TO_DISK_MARKERS):
                return _pick_split(datasets.load_from_disk(str(path)), spec)
            return datasets.load_dataset(str(path), name=spec.config, split=spec.split or "train")
        return _load_hub(spec)
    except SurgeryError:
        raise
    except Exception as exc:  # noqa: BLE001 - datasets raises many types for unreadable data
        raise SurgeryError(f"cannot load with datasets: {first_line(exc)}", spec.text) from None


def is_offline() -> bool:
    """Whether the user has turned the hub off (read from the libraries, which read the environment)."""
    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return True
    except ImportError:  # pragma: no cover - huggingface_hub comes with datasets
        pass
    return any(os.environ.get(v, "").upper() in ("1", "ON", "YES", "TRUE")
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def download_hint(repo_id: str) -> str:
    return f"huggingface-cli download --repo-type dataset {repo_id}"


def _load_hub(spec: DatasetSpec) -> Dataset:
    """`load_dataset` first (the datasets cache, then the hub unless offline); if the dataset cannot be
    reached, the snapshot `huggingface-cli download` left in the hub cache; else a one-line error."""
    import datasets

    split = spec.split or "train"
    try:
        return datasets.load_dataset(spec.source, name=spec.config, split=split)
    except OSError as exc:  # unreachable or not found (ConnectionError, FileNotFoundError, hub HTTP errors)
        failure: OSError = exc
    snapshot = _hub_snapshot(spec.source)
    if snapshot is not None:
        return datasets.load_dataset(str(snapshot), name=spec.config, split=split)
    if is_offline():
        raise MissingDatasetError(spec.source, spec.text)
    raise SurgeryError(f"cannot load from the hub ({first_line(failure)}); fetch it with "
                       f"`{download_hint(spec.source)}` (gated datasets: accept the terms on the hub and "
                       "`huggingface-cli login` first)", spec.text)


def _hub_snapshot(repo_id: str) -> Path | None:
    """The dataset's snapshot in the hub cache (as `huggingface-cli download` leaves it), if any."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, repo_type="dataset", local_files_only=True))
    except Exception:  # noqa: BLE001 - LocalEntryNotFoundError, or an invalid repo id
        return None


def _pick_split(obj, spec: DatasetSpec) -> Dataset:
    """A `save_to_disk` directory holds a Dataset or a DatasetDict; choose the split of the latter."""
    from datasets import DatasetDict

    if not isinstance(obj, DatasetDict):
        if spec.split:
            raise SurgeryError(f"split {spec.split!r} given, but the directory holds a single dataset", spec.text)
        return obj
    names = list(obj.keys())
    split = spec.split or ("train" if "train" in names else names[0] if len(names) == 1 else None)
    if split not in obj:
        raise SurgeryError(f"choose a split with :SPLIT; the directory has {', '.join(names)}", spec.text)
    return obj[split]


def _existing(source: str, base: Path | None) -> str | None:
    """`source` as an existing local path (absolute when found under `base`), or None."""
    path = Path(source).expanduser()
    if base is not None and not path.is_absolute() and (base / path).exists():
        return str((base / path).resolve())
    return source if path.exists() else None


def _split_head(head: str, raw: str, base: Path | None) -> tuple[str, dict[str, str | None]]:
    """SOURCE, then `:SPLIT` and `@CONFIG` in either order (a split may hold `:` for slicing). SOURCE ends
    at the first `:`/`@`, or at a later one if what comes before it is an existing path."""
    cuts = [i for i, c in enumerate(head) if c in ":@"]
    cut = cuts[0] if cuts else len(head)
    for i in reversed(cuts):
        if _existing(head[:i], base) is not None:
            cut = i
            break
    source, rest = head[:cut], head[cut:]
    if not source:
        raise SurgeryError("no dataset before ':' or '@'", raw)
    if source != BUILTIN:
        source = _existing(source, base) or source
    fields: dict[str, str | None] = {"split": None, "config": None}
    while rest:
        key, stop = ("split", "@") if rest[0] == ":" else ("config", ":")
        end = rest.find(stop, 1)
        end = len(rest) if end < 0 else end
        if fields[key] is not None:
            raise SurgeryError(f"{key} given twice", raw)
        fields[key] = rest[1:end]
        rest = rest[end:]
    return source, fields


def _parse_options(tail: str, raw: str) -> dict[str, str]:
    options: dict[str, str] = {}
    for part in tail.split(","):
        key, _, value = part.partition("=")
        key = key.strip().lower()
        if key not in OPTION_KEYS:
            raise SurgeryError(f"unknown option {key!r} (known: {', '.join(OPTION_KEYS)})", raw)
        options[key] = value.strip()
    return options


def _positive_int(value: str, key: str, raw: str) -> int:
    try:
        number = int(value)
    except ValueError:
        number = 0
    if number <= 0:
        raise SurgeryError(f"{key} must be a positive integer, not {value!r}", raw)
    return number


def _check_source(spec: DatasetSpec) -> None:
    if spec.is_builtin:
        if spec.split and spec.split not in BUILTIN_PARTS:
            raise SurgeryError(f"unknown builtin part {spec.split!r} (known: {', '.join(BUILTIN_PARTS)})",
                               spec.text)
        if spec.format is not None or spec.field is not None or spec.config is not None:
            raise SurgeryError("the builtin corpus takes only samples= and name=", spec.text)
        return
    if spec.local_path is not None:
        return
    src = spec.source
    looks_local = (Path(src).suffix.lower() in LOCAL_BUILDERS or src.startswith(("/", "./", "../", "~"))
                   or src.count("/") > 1 or "\\" in src)
    if looks_local:
        raise SurgeryError("no such file or directory", src)
