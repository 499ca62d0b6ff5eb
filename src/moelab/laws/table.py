"""Tables of runs for the laws: reading a CSV/parquet, mapping its columns to roles, validating the numbers.

Roles (``--columns ROLE=COLUMN``; defaults: a column named like the role): ``N`` total parameters, ``N_active``
active parameters, ``D`` training tokens, ``C`` training compute (FLOPs; the compute frontier), ``loss``, ``E``
experts, ``k`` active experts per token, ``S`` sparsity (1 − k/E; derived from ``E`` and ``k`` when the table has
no ``S`` column), ``task_loss`` and ``acc`` for the
two-step ladder. A study's table (``moelab.analysis.build_table``) maps through :data:`STUDY_COLUMNS`.

Every problem is one line naming the file, the column and the row: a missing column, a value that is not a number,
a missing value, a non-positive size or loss, a sparsity outside [0, 1), an accuracy outside [0, 1].
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Iterable

import numpy as np
import pandas as pd

from ..errors import DataError
from .base import Data

ROLES: dict[str, str] = {
    "N": "total parameters", "N_active": "active parameters", "D": "training tokens", "C": "training compute (FLOPs)",
    "loss": "loss",
    "E": "experts", "k": "active experts per token", "S": "sparsity 1 - k/E", "task_loss": "task loss",
    "acc": "accuracy",
}
POSITIVE = ("N", "N_active", "D", "C", "loss", "E", "k", "task_loss")
STUDY_COLUMNS: dict[str, str] = {
    "N": "total_params", "N_active": "active_params", "D": "train_tokens", "C": "train_flops", "loss": "val_loss",
    "E": "n_experts", "k": "top_k", "S": "sparsity",
}


def parse_columns(text: str | None, allowed: Iterable[str] | None = None) -> dict[str, str]:
    """``N=total,D=tokens`` -> {"N": "total", "D": "tokens"}; a one-line error for anything else. ``allowed``: the
    roles accepted (default :data:`ROLES`; a registered form's own roles extend it)."""
    roles = list(ROLES) if allowed is None else list(dict.fromkeys(allowed))
    out: dict[str, str] = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        role, sep, col = (s.strip() for s in part.partition("="))
        if not sep or not role or not col:
            raise DataError(f"--columns: expected ROLE=COLUMN pairs separated by commas (got {part.strip()!r})")
        if role not in roles:
            raise DataError(f"--columns: unknown role {role!r} (roles: {', '.join(roles)})")
        if role in out:
            raise DataError(f"--columns: role {role!r} given twice")
        out[role] = col
    return out


def read_table(path: str | Path) -> pd.DataFrame:
    """A CSV (UTF-8; leading ``#`` lines are comments, e.g. a dataset's source) or parquet file as a DataFrame."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such file (give a .csv or .parquet table, or a study directory)")
    suffix = p.suffix.lower()
    if suffix in (".parquet", ".pq"):
        try:
            return pd.read_parquet(p)
        except Exception as e:  # pyarrow raises several types for a corrupt file
            why = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
            raise DataError(f"{p}: not a readable parquet file ({why})") from None
    if suffix not in (".csv", ".tsv", ".txt"):
        raise DataError(f"{p}: unsupported table type {suffix or '(none)'!r} (use .csv or .parquet)")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{p}:{line}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start})") from None
    lines = text.splitlines()
    skip = next((i for i, ln in enumerate(lines) if not ln.lstrip().startswith("#")), len(lines))
    try:
        df = pd.read_csv(io.StringIO("\n".join(lines[skip:])), sep="\t" if suffix == ".tsv" else ",")
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise DataError(f"{p}: not a readable CSV table ({str(e).splitlines()[0][:200]})") from None
    df.attrs["first_data_line"] = skip + 2  # file line of the first data row (after comments and the header)
    return df


def _role_values(df: pd.DataFrame, role: str, col: str, where: str) -> np.ndarray:
    raw = df[col]
    vals = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=float)
    bad = np.flatnonzero(np.isnan(vals) & raw.notna().to_numpy())
    if len(bad):
        raise DataError(f"{where}: column {col!r} ({role}) row {bad[0] + 1}: not a number ({raw.iloc[bad[0]]!r})")
    return vals


def law_data(df: pd.DataFrame, roles: tuple[str, ...], columns: dict[str, str] | None = None, *,
             defaults: dict[str, str] | None = None, where: str = "table",
             drop_incomplete: bool = False) -> tuple[Data, dict]:
    """The roles' values (one float per run) and how they were read: {"columns": role -> column, "n_dropped"}.

    ``defaults`` maps roles to columns before ``columns`` (e.g. :data:`STUDY_COLUMNS`); ``drop_incomplete`` skips
    runs with a missing value (a study's unfinished runs) instead of failing on them.
    """
    mapping = {r: r for r in (*ROLES, *roles)} | (defaults or {}) | (columns or {})
    used: dict[str, str] = {}
    vals: dict[str, np.ndarray] = {}
    for role in roles:
        col = mapping[role]
        if col in df.columns:
            vals[role], used[role] = _role_values(df, role, col, where), col
        elif role == "S" and mapping["E"] in df.columns and mapping["k"] in df.columns:
            e, k = (_role_values(df, r, mapping[r], where) for r in ("E", "k"))
            vals[role], used[role] = 1.0 - k / e, f"1 - {mapping['k']}/{mapping['E']}"
        else:
            shown = ", ".join(map(str, df.columns[:12])) + (", ..." if len(df.columns) > 12 else "")
            raise DataError(f"{where}: no column {col!r} for {role} ({ROLES.get(role, 'input')}); columns: {shown}; "
                            f"map one with --columns {role}=COLUMN")
    M = np.column_stack([vals[r] for r in roles]) if roles else np.zeros((len(df), 0))
    missing = np.isnan(M)
    n_dropped = 0
    if missing.any():
        if not drop_incomplete:
            i, j = map(int, np.argwhere(missing)[0])
            raise DataError(f"{where}: column {used[roles[j]]!r} ({roles[j]}) row {i + 1}: missing value (NaN)")
        keep = ~missing.any(axis=1)
        n_dropped = int((~keep).sum())
        vals = {r: v[keep] for r, v in vals.items()}
    for role, v in vals.items():
        _check_range(role, used[role], v, where)
    return vals, {"columns": used, "n_dropped": n_dropped}


def _check_range(role: str, col: str, v: np.ndarray, where: str) -> None:
    if role in POSITIVE:
        bad, need = ~(np.isfinite(v) & (v > 0)), "> 0"
    elif role == "S":
        bad, need = ~((v >= 0) & (v < 1)), "in [0, 1)"
    elif role == "acc":
        bad, need = ~((v >= 0) & (v <= 1)), "in [0, 1] (an accuracy, not a percentage)"
    else:
        return
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise DataError(f"{where}: column {col!r} ({role}) row {i + 1}: must be {need} (got {v[i]:g})")
