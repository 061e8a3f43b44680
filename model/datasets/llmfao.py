"""Reader for LLMFAO crowd comparisons (Ustalov 2023; CC BY 4.0).

``crowd-comparisons.csv`` holds one vote per row (``id,prompt,model_x,model_y,worker,winner,
left,right``; ``winner`` ∈ {left, right, tie}; ``left``/``right`` are the names of
``model_x``/``model_y``). Prompt texts come from ``prompts.jsonl`` and response texts from
``pairs-crowd.jsonl`` when those files are present. Single turn: one session per vote.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from model.datasets.records import Outcome, PreferenceRecord

_WINNER: dict[str, Outcome] = {"left": "a", "right": "b", "tie": "tie"}


def _jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def read_llmfao(path: str | Path) -> list[PreferenceRecord]:
    """Read LLMFAO crowd votes into canonical records (one per vote, file order).

    Args:
        path: The LLMFAO folder, or its ``crowd-comparisons.csv``.

    Returns:
        One :class:`PreferenceRecord` per vote: ``user_id`` = ``worker``, ``session_id`` =
        ``"<worker>/<row>"``, ``turn_index`` = 0, ``query_id`` = prompt id, ``model_a`` =
        ``left`` (model_x name), ``model_b`` = ``right``; ``category`` = prompt type.

    Raises:
        FileNotFoundError: missing folder or csv.
        ValueError: a malformed row (names the row number).
    """
    p = Path(path)
    csv_file = p / "crowd-comparisons.csv" if p.is_dir() else p
    if not csv_file.is_file():
        raise FileNotFoundError(f"LLMFAO comparisons file {csv_file} does not exist")
    folder = csv_file.parent
    prompts = {str(r["id"]): r for r in _jsonl(folder / "prompts.jsonl")}
    pairs = {str(r["id"]): r for r in _jsonl(folder / "pairs-crowd.jsonl")}
    records: list[PreferenceRecord] = []
    with csv_file.open(encoding="utf-8", newline="") as fh:
        for i, row in enumerate(csv.DictReader(fh)):
            try:
                pid, prompt = str(row["id"]), str(row["prompt"])
                worker = str(row["worker"])
                outcome = _WINNER[str(row["winner"])]
                left, right = str(row["left"]), str(row["right"])
            except (KeyError, TypeError) as exc:
                raise ValueError(f"{csv_file}: row {i} lacks or has a bad field: {exc!r}") from exc
            pr = prompts.get(prompt, {})
            pair = pairs.get(pid, {})
            text = str(pr.get("text") or pair.get("text") or "")
            category = pr.get("type") or pair.get("type")
            records.append(
                PreferenceRecord(
                    user_id=worker,
                    session_id=f"{worker}/{i}",
                    turn_index=0,
                    query_id=prompt,
                    query_text=text,
                    model_a=left,
                    model_b=right,
                    outcome=outcome,
                    response_a=str(pair.get("result_x") or ""),
                    response_b=str(pair.get("result_y") or ""),
                    category=str(category) if category is not None else None,
                    extra={"row": str(i), "pair_id": pid},
                )
            )
    return records
