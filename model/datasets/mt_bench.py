"""Reader for MT-Bench human judgments (Zheng et al. 2023) in the upstream HF layout.

Rows have ``question_id, model_a, model_b, winner, judge, conversation_a, conversation_b,
turn`` (``winner`` ∈ {model_a, model_b, tie}; each conversation holds both turns as
``[{"role", "content"}, ...]``, or is null when the text is missing). Accepted inputs: a
``.jsonl`` file, a ``.parquet`` file (needs ``pyarrow``), or a folder holding
``human_judgments_full.jsonl`` (or ``human.parquet`` / any ``*.parquet``). When a
conversation is null the question text comes from ``question.jsonl`` next to the file.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from model.datasets.records import Outcome, PreferenceRecord

_WINNER: dict[str, Outcome] = {"model_a": "a", "model_b": "b", "tie": "tie"}
_JSONL_NAMES = ("human_judgments_full.jsonl", "human_judgments.jsonl", "human.jsonl")


def _resolve(path: Path) -> Path:
    if path.is_file():
        return path
    if path.is_dir():
        for name in _JSONL_NAMES:
            if (path / name).is_file():
                return path / name
        parquets = sorted(path.glob("*.parquet")) + sorted(path.glob("data/*.parquet"))
        human = [p for p in parquets if "human" in p.name]
        if human or parquets:
            return (human or parquets)[0]
        raise FileNotFoundError(
            f"no MT-Bench judgments file in {path} "
            f"(looked for {', '.join(_JSONL_NAMES)}, *.parquet)"
        )
    raise FileNotFoundError(f"MT-Bench data path {path} does not exist")


def _rows_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{n}: invalid JSON ({exc})") from exc
    return rows


def _rows_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        import pyarrow.parquet as pq  # type: ignore[import-not-found,unused-ignore]
    except ImportError as exc:
        raise RuntimeError(
            f"reading {path} needs the optional package 'pyarrow' (not installed); "
            "install it or use the .jsonl layout"
        ) from exc
    table = pq.read_table(path)
    return list(table.to_pylist())


def _questions(folder: Path) -> dict[int, list[str]]:
    qfile = folder / "question.jsonl"
    if not qfile.is_file():
        return {}
    out: dict[int, list[str]] = {}
    for row in _rows_jsonl(qfile):
        out[int(row["question_id"])] = [str(t) for t in row.get("turns", [])]
    return out


def _user_messages(conv: Iterable[Mapping[str, Any]] | None) -> list[str]:
    if conv is None:
        return []
    return [str(m.get("content", "")) for m in conv if m.get("role") == "user"]


def _assistant_messages(conv: Iterable[Mapping[str, Any]] | None) -> list[str]:
    if conv is None:
        return []
    return [str(m.get("content", "")) for m in conv if m.get("role") == "assistant"]


def read_mt_bench(path: str | Path) -> list[PreferenceRecord]:
    """Read MT-Bench human judgments into canonical records (one per vote, file order).

    Args:
        path: A folder, a ``.jsonl`` file or a ``.parquet`` file (see the module docstring).

    Returns:
        One :class:`PreferenceRecord` per vote: ``user_id`` = judge, ``session_id`` =
        ``"<judge>/<question_id>"``, ``turn_index`` = turn − 1, ``query_id`` =
        ``"<question_id>:<turn>"``.

    Raises:
        FileNotFoundError: no such file / no judgments file in the folder.
        RuntimeError: a parquet file without ``pyarrow`` installed.
        ValueError: a malformed row (names the row number and field).
    """
    file = _resolve(Path(path))
    rows = _rows_parquet(file) if file.suffix == ".parquet" else _rows_jsonl(file)
    questions = _questions(file.parent)
    records: list[PreferenceRecord] = []
    for i, row in enumerate(rows):
        try:
            qid = int(row["question_id"])
            judge = str(row["judge"])
            winner = _WINNER[str(row["winner"])]
            model_a, model_b = str(row["model_a"]), str(row["model_b"])
        except (KeyError, ValueError, TypeError) as exc:
            raise ValueError(f"{file}: row {i} lacks or has a bad field: {exc!r}") from exc
        turn_raw = row.get("turn")
        unknown = turn_raw is None
        turn = 1 if turn_raw is None else int(turn_raw)
        if turn not in (1, 2):
            raise ValueError(f"{file}: row {i} has turn (got {turn_raw!r}); expected 1 or 2")
        conv_a, conv_b = row.get("conversation_a"), row.get("conversation_b")
        users = _user_messages(conv_a) or _user_messages(conv_b) or questions.get(qid, [])
        query = users[turn - 1] if len(users) >= turn else ""
        ans_a, ans_b = _assistant_messages(conv_a), _assistant_messages(conv_b)
        extra = {"row": str(i)}
        if unknown:
            extra["turn_unknown"] = "1"
        if conv_a is None or conv_b is None:
            extra["missing_text"] = "1"
        category = row.get("category")
        records.append(
            PreferenceRecord(
                user_id=judge,
                session_id=f"{judge}/{qid}",
                turn_index=turn - 1,
                query_id=f"{qid}:{turn}",
                query_text=query,
                model_a=model_a,
                model_b=model_b,
                outcome=winner,
                response_a=ans_a[turn - 1] if len(ans_a) >= turn else "",
                response_b=ans_b[turn - 1] if len(ans_b) >= turn else "",
                category=str(category) if category is not None else None,
                extra=extra,
            )
        )
    return records
