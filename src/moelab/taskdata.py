"""Local task data: lm-eval's task definitions with the data source switched to files under a data directory.

Offline, each task is lm-eval's installed YAML with only the data source changed (``dataset_path: json|parquet`` +
``data_files`` under a local data directory, see :data:`moelab.tasks.TASKS` and docs/evaluation.md for the file
names). Before lm-eval (and ``datasets``/pyarrow) touch a file, :func:`check_task_data` reads it and checks every
record against the task's ``fields``, so a malformed file is one error naming ``file:line`` and the field, raised
before any model is loaded, instead of a pyarrow message after it — or, for a missing field, a silently empty prompt.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any, Iterator, Sequence

from .errors import DataError
from .tasks import TASKS, TaskSpec, get_task

DATA_EXTENSIONS = (".jsonl", ".json", ".parquet")
_TYPE_NAMES = {str: "a string", list: "a list", int: "an integer", float: "a number", dict: "an object",
               bool: "a boolean"}


# ----------------------------------------------------------------------------------------------------------------------
# Reading records (errors name file:line and field)
# ----------------------------------------------------------------------------------------------------------------------


def read_utf8(path: str | Path) -> str:
    """A text file's contents; a one-line DataError names the file and line of the first byte that is not UTF-8."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start})") from None


def find_data_file(data_dir: str | Path, stem: str, what: str) -> Path:
    """``DATA/stem.{jsonl,json,parquet}``, the first that exists; a one-line DataError names the expected path."""
    data_dir = Path(data_dir)
    for ext in DATA_EXTENSIONS:
        if (data_dir / f"{stem}{ext}").is_file():
            return data_dir / f"{stem}{ext}"
    exts = "|".join(e.lstrip(".") for e in DATA_EXTENSIONS)
    raise DataError(f"{what}: missing data file {data_dir / stem}.{{{exts}}}")


def iter_records(path: str | Path) -> Iterator[tuple[str, Any]]:
    """(location, record) of a .jsonl (``file:line``), .json list or .parquet file (``file: record i``)."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as e:  # noqa: BLE001 - pyarrow's error types vary; the file is what the user must fix
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(f"{path}: not a readable parquet file ({first})") from None
        for i, r in enumerate(rows):
            yield f"{path}: record {i}", r
        return
    text = read_utf8(path)
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
        for i, r in enumerate(data):
            yield f"{path}: record {i}", r
        return
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield f"{path}:{i}", json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i}: invalid JSON ({e.msg})") from None


def read_records(path: str | Path) -> list[Any]:
    """Records of a .jsonl, .json (a list) or .parquet file; errors name the file (and line)."""
    return [r for _, r in iter_records(path)]


def _lookup(record: dict, dotted: str) -> tuple[bool, Any]:
    value: Any = record
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return False, None
        value = value[part]
    return True, value


def _kind(t: type | tuple[type, ...]) -> str:
    types = t if isinstance(t, tuple) else (t,)
    return " or ".join(_TYPE_NAMES.get(x, x.__name__) for x in types)


def check_records(path: str | Path, fields: dict[str, type | tuple[type, ...]]) -> int:
    """Check every record of ``path`` is an object with ``fields`` (dotted paths into nested objects) of the given
    types; returns the number of records. The first problem is a one-line DataError naming file:line and field."""
    n = 0
    for where, rec in iter_records(path):
        if not isinstance(rec, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
        for name, want in fields.items():
            found, value = _lookup(rec, name)
            if not found:
                raise DataError(f"{where}: missing field {name!r}")
            types = want if isinstance(want, tuple) else (want,)
            if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):  # True is an int
                raise DataError(f"{where}: field {name!r} must be {_kind(want)} (got {type(value).__name__})")
        n += 1
    if n == 0:
        raise DataError(f"{path}: no records")
    return n


# ----------------------------------------------------------------------------------------------------------------------
# lm-eval task configs over local files
# ----------------------------------------------------------------------------------------------------------------------


def lm_eval_tasks_dir() -> Path:
    import lm_eval.tasks

    return Path(lm_eval.tasks.__file__).parent


def resolve_task_files(spec: TaskSpec, data_dir: str | Path, num_fewshot: int) -> tuple[str, dict[str, str]]:
    """(datasets builder, {split: path}) for ``spec`` under ``data_dir``; a one-line DataError names a missing file."""
    found: dict[str, str] = {}
    for split, stem in spec.files.items():
        if split in spec.fewshot_only and num_fewshot == 0:
            continue
        need = " (few-shot exemplars)" if split in spec.fewshot_only else ""
        try:
            hit = find_data_file(data_dir, stem, f"task {spec.name}")
        except DataError as e:
            raise DataError(f"{e}{need}") from None
        found[split] = str(hit.resolve())
    kinds = {"parquet" if p.endswith(".parquet") else "json" for p in found.values()}
    if len(kinds) > 1:
        raise DataError(f"task {spec.name}: mix of parquet and json files {sorted(found.values())}; "
                        "use one format per task")
    return kinds.pop(), found


def task_overrides(
    name: str, data_dir: str | Path, num_fewshot: int | None = None
) -> tuple[str | None, dict[str, Any]]:
    """(lm-eval YAML path or None, the config keys moelab changes): the data source, splits and few-shot count.

    Prompt, targets, filters, metrics and generation settings stay lm-eval's.
    """
    spec = get_task(name)
    k = spec.num_fewshot if num_fewshot is None else num_fewshot
    builder, files = resolve_task_files(spec, data_dir, k)
    over: dict[str, Any] = dict(spec.config)
    over.update(task=name, dataset_path=builder, dataset_name=None, dataset_kwargs={"data_files": files}, num_fewshot=k)
    if k == 0 and spec.fewshot_only:  # no exemplars: the split that only feeds the few-shot sampler is not loaded
        over.update(training_split=None, fewshot_split=None)
    yaml_path = str(lm_eval_tasks_dir() / spec.yaml) if spec.yaml else None
    return yaml_path, over


def _substitute_functions(node: Any, replacements: dict[str, Any], where: str) -> Any:
    """``node`` with every unresolved ``!function`` path (``<lm_eval/tasks/...>/utils.f``) swapped for its stand-in."""
    if isinstance(node, dict):
        return {k: _substitute_functions(v, replacements, where) for k, v in node.items()}
    if isinstance(node, list):
        return [_substitute_functions(v, replacements, where) for v in node]
    if isinstance(node, str) and node.startswith(str(lm_eval_tasks_dir())):
        ref = Path(node).name
        if ref not in replacements:
            raise DataError(f"{where}: !function {ref} has no moelab stand-in (an lm-eval version moelab does not "
                            "know)")
        return replacements[ref]
    return node


def lm_eval_task_config(name: str, data_dir: str | Path, num_fewshot: int | None = None) -> dict[str, Any]:
    """The complete lm-eval task config dict: lm-eval's installed YAML + :func:`task_overrides`.

    For the code tasks (``functions="codeeval"``) the YAML is read without importing its ``utils.py`` and its
    ``!function`` entries become :data:`moelab.codeeval.REPLACEMENTS` (sandboxed pass@k; docs/evaluation.md §Code).
    """
    from lm_eval.tasks._yaml_loader import load_yaml

    yaml_path, over = task_overrides(name, data_dir, num_fewshot)
    spec = get_task(name)
    if yaml_path and spec.functions == "codeeval":
        from .codeeval import REPLACEMENTS

        cfg = _substitute_functions(load_yaml(yaml_path, resolve_func=False), REPLACEMENTS, yaml_path)
    else:
        cfg = load_yaml(yaml_path, resolve_func=True) if yaml_path else {}
    for key in ("tag", "group"):
        cfg.pop(key, None)
    cfg.update(over)
    return cfg


def export_task_yamls(
    out_dir: str | Path, data_dir: str | Path, names: Sequence[str] | None = None, num_fewshot: int | None = None
) -> list[Path]:
    """Write one YAML per task for ``lm_eval --include_path out_dir``: ``include:`` of lm-eval's own YAML plus
    the local-data overrides. Tasks whose files are missing under ``data_dir`` are skipped when ``names`` is None,
    and so are the code tasks (their lm-eval YAML cannot be loaded offline; named, they are an error)."""
    import yaml

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name in names or [n for n, t in TASKS.items() if t.functions is None]:
        if TASKS.get(name) is not None and TASKS[name].functions is not None:
            raise DataError(f"task {name}: lm-eval's own YAML for it imports a Hub download at load time; "
                            "evaluate it with moelab eval (sandboxed pass@k), not through an exported YAML")
        try:
            yaml_path, over = task_overrides(name, data_dir, num_fewshot)
        except DataError:
            if names is None:
                continue
            raise
        doc = ({"include": yaml_path} if yaml_path else {}) | over
        path = out / f"{name}.yaml"
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        written.append(path)
    return written


def _fewshot_split(cfg: dict[str, Any]) -> str | None:
    """The split lm-eval draws exemplars from: fewshot_split, else training, validation, test (its own rule)."""
    for key in ("fewshot_split", "training_split", "validation_split", "test_split"):
        if cfg.get(key):
            return cfg[key]
    return None


def check_task_data(name: str, cfg: dict[str, Any], fewshot_flag: bool = False) -> dict[str, int]:
    """Check a task's local files (:func:`lm_eval_task_config` output) before lm-eval loads them: every record has
    the task's ``fields``, and the few-shot pool holds ``num_fewshot`` exemplars (lm-eval leaves out the question
    itself when exemplars come from the evaluated split). Returns {split: records}."""
    spec = get_task(name)
    files: dict[str, str] = cfg["dataset_kwargs"]["data_files"]
    counts = {split: check_records(path, spec.fields) for split, path in files.items()}
    k = int(cfg.get("num_fewshot") or 0)
    split = _fewshot_split(cfg)
    fixed = (cfg.get("fewshot_config") or {}).get("samples") is not None  # exemplars given by the task (MBPP)
    if k > 0 and split in counts and not fixed:
        eval_split = cfg.get("test_split") or cfg.get("validation_split")
        pool = counts[split] - (1 if split == eval_split else 0)
        if k > pool:
            why = f"--num-fewshot {k}" if fewshot_flag else f"{k}-shot (the paper's; set --num-fewshot)"
            raise DataError(f"task {name}: {why} needs {k} exemplars but {files[split]} has {pool}")
    return counts


@contextlib.contextmanager
def quiet_datasets(progress: bool):
    """Without progress: no ``datasets`` progress bars (Generating/Map) and only its errors, for the block."""
    if progress:
        yield
        return
    import datasets

    bars = not datasets.are_progress_bars_disabled()
    level = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        yield
    finally:
        datasets.logging.set_verbosity(level)
        if bars:
            datasets.enable_progress_bars()


def load_lm_eval_tasks(configs: dict[str, dict[str, Any]], progress: bool = True) -> tuple[Any, dict[str, Any]]:
    """(TaskManager, {name: lm-eval Task}) for checked configs; a loading failure names the task and its files."""
    from lm_eval.tasks import TaskManager

    from .errors import MoelabError

    if not progress:
        logging.getLogger("lm_eval").setLevel(logging.WARNING)
    tm = TaskManager(include_defaults=False)  # indexing lm-eval's 14k built-in tasks takes ~40 s; we pass configs
    tasks = {}
    with quiet_datasets(progress):
        for name, cfg in configs.items():
            try:
                tasks[name] = tm.load([cfg])["tasks"][name]
            except MoelabError:
                raise
            except Exception as e:  # noqa: BLE001 - datasets' errors on files that passed our checks
                files = ", ".join(cfg["dataset_kwargs"]["data_files"].values())
                msg = str(e).splitlines()[0] if str(e) else ""
                raise DataError(f"task {name}: cannot load {files} ({type(e).__name__}: {msg})") from None
    return tm, tasks


__all__ = [
    "DATA_EXTENSIONS",
    "check_records",
    "check_task_data",
    "export_task_yamls",
    "find_data_file",
    "iter_records",
    "lm_eval_task_config",
    "lm_eval_tasks_dir",
    "load_lm_eval_tasks",
    "quiet_datasets",
    "read_records",
    "read_utf8",
    "resolve_task_files",
    "task_overrides",
]
