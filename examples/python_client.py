"""Call a running gmtrouter from Python: Select, then RecordResponse with the user's verdict.

.venv/bin/gmtrouter serve &               # embedded store, 127.0.0.1:50051
.venv/bin/python examples/python_client.py [HOST:PORT]

RecordResponse is retried with the same idempotency key when the call fails UNAVAILABLE or
runs out of time (README → Reliability → Faults): a write that did commit is then answered
``duplicate=True`` instead of being stored twice. The first write into a fresh Neo4j plans
the write statements, which can take a few seconds.
"""

from __future__ import annotations

import sys
import time
import uuid

import grpc

from gmtrouter.v1 import router_pb2 as pb
from gmtrouter.v1 import router_pb2_grpc

#: Per-attempt deadline of a call, in seconds.
TIMEOUT_S = 10.0
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


def record(
    stub: router_pb2_grpc.RouterServiceStub, req: pb.RecordResponseRequest, attempts: int = 4
) -> pb.RecordResponseResponse:
    """RecordResponse, retried on UNAVAILABLE / DEADLINE_EXCEEDED with backoff (0.5, 1, 2 s).

    Raises:
        grpc.RpcError: another status, or the last attempt's error.
    """
    for attempt in range(attempts):
        try:
            return stub.RecordResponse(req, timeout=TIMEOUT_S)
        except grpc.RpcError as err:
            if err.code() not in RETRYABLE or attempt == attempts - 1:
                raise
            print(f"RecordResponse: {err.code().name}, retrying with the same key")
            time.sleep(0.5 * 2**attempt)
    raise AssertionError("unreachable")


def main(target: str = "127.0.0.1:50051") -> None:
    session = f"chat-{uuid.uuid4().hex[:8]}"  # a new conversation on every run
    query = "Prove that the square root of 2 is irrational."
    with grpc.insecure_channel(target) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        choice = stub.Select(
            pb.SelectRequest(
                user_id="alice",
                session_id=session,
                query=query,
                candidate_models=[
                    pb.CandidateModel(model="gpt-4"),
                    pb.CandidateModel(model="claude-3-opus"),
                ],
            ),
            timeout=TIMEOUT_S,
        )
        print(f"{choice.selected_model} ({choice.method}): {choice.reasoning}")
        other = next(m for m in choice.all_scores if m != choice.selected_model)
        ack = record(
            stub,
            pb.RecordResponseRequest(
                interaction_id=choice.interaction_id,
                user_id="alice",
                session_id=session,
                turn_index=0,
                query=query,
                model=choice.selected_model,
                response="Suppose sqrt(2) = p/q in lowest terms ...",
                idempotency_key=f"alice/{session}/0",
                comparison=pb.Comparison(winner_model=choice.selected_model, loser_model=other),
            ),
        )
        print(f"recorded {ack.interaction_id} (duplicate={ack.duplicate})")


if __name__ == "__main__":
    main(*sys.argv[1:2])
