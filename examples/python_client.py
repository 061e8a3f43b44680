"""Call a running gmtrouter from Python: Select, then RecordResponse with the user's verdict.

.venv/bin/gmtrouter serve &               # embedded store, 127.0.0.1:50051
.venv/bin/python examples/python_client.py [HOST:PORT]
"""

from __future__ import annotations

import sys

import grpc

from gmtrouter.v1 import router_pb2 as pb
from gmtrouter.v1 import router_pb2_grpc


def main(target: str = "127.0.0.1:50051") -> None:
    with grpc.insecure_channel(target) as channel:
        stub = router_pb2_grpc.RouterServiceStub(channel)
        choice = stub.Select(
            pb.SelectRequest(
                user_id="alice",
                session_id="chat-1",
                query="Prove that the square root of 2 is irrational.",
                candidate_models=[
                    pb.CandidateModel(model="gpt-4"),
                    pb.CandidateModel(model="claude-3-opus"),
                ],
            ),
            timeout=2.0,
        )
        print(f"{choice.selected_model} ({choice.method}): {choice.reasoning}")
        other = next(m for m in choice.all_scores if m != choice.selected_model)
        ack = stub.RecordResponse(
            pb.RecordResponseRequest(
                interaction_id=choice.interaction_id,
                user_id="alice",
                session_id="chat-1",
                turn_index=0,
                query="Prove that the square root of 2 is irrational.",
                model=choice.selected_model,
                response="Suppose sqrt(2) = p/q in lowest terms ...",
                idempotency_key=f"alice/chat-1/0/{choice.interaction_id}",
                comparison=pb.Comparison(winner_model=choice.selected_model, loser_model=other),
            ),
            timeout=2.0,
        )
        print(f"recorded {ack.interaction_id} (duplicate={ack.duplicate})")


if __name__ == "__main__":
    main(*sys.argv[1:2])
