"""The production graph store: Neo4j over Bolt, with the async driver.

Schema (``docs/neo4j.md`` has the full table and ready Cypher queries):

Nodes
    ``(:User {user_id, version})`` — ``version`` counts the interactions written for the user.
    ``(:LLM {name})``.
    ``(:Query {interaction_id, idempotency_key, user_id, session_id, turn_index, text,
    embedding, model, response, rating, winner_model, loser_model, tie, ts, query_key,
    fingerprint})`` — one per recorded interaction; it carries the interaction-level
    properties (there is no separate ``Interaction`` label). ``embedding`` is little-endian
    float32 bytes (``4·D`` bytes); ``fingerprint`` is
    :func:`graphstore.interactions.content_fingerprint` (absent on queries written before it
    existed: a retry of those is recognised by its user alone).
    ``(:Response {response_id, llm, outcome, text})`` — one per turn; ``response_id`` equals
    the turn id; ``text`` is the response text on the response of ``Query.model``.
    ``(:Turn {turn_id, interaction_id, user_id, session_id, turn_index, llm, outcome, ts})`` —
    the seed's virtual turn node, one per outcome (``turn_id = "<interaction_id>:<llm>"``).
    ``(:PairCount {model_a, model_b, wins_a, wins_b})`` — Bradley–Terry pair counts,
    ``model_a < model_b``, ties add 0.5 to each side.

Relationships
    ``(:User)-[:SUBMITTED]->(:Query)``, ``(:Query)-[:RECEIVED]->(:Response)``,
    ``(:Response)-[:GENERATED_BY]->(:LLM)``, ``(:Turn)-[:OF_USER]->(:User)``,
    ``(:Turn)-[:ASKED]->(:Query)``, ``(:Turn)-[:ANSWERED_BY]->(:LLM)``,
    ``(:Turn)-[:HAS_RESPONSE]->(:Response)``, ``(:Turn)-[:FOLLOWS]->(:Turn)`` (the previous
    turn of the same user and session, by the rule of
    :func:`graphstore.neighbourhood.link_previous_turns`, kept up to date on every write),
    ``(:PairCount)-[:MODEL_A]->(:LLM)``, ``(:PairCount)-[:MODEL_B]->(:LLM)``.

Online learning (``graphstore/registry.py``), outside the interaction graph
    ``(:ModelWeights {version, base_version, seq, interactions, created_at, metrics, blob})`` —
    published fine-tuned weights (``blob``: checkpoint bytes); ``(:ModelRegistry {name, seq})``
    numbers the publications; ``(:TrainerLease {name, holder, expires_at})`` elects the trainer
    (``expires_at`` in ms of the database's clock).

Uniqueness constraints (created idempotently by :meth:`Neo4jGraphStore.open`) on
``User.user_id``, ``LLM.name``, ``Query.interaction_id``, ``Query.idempotency_key``,
``Response.response_id``, ``Turn.turn_id`` and ``PairCount(model_a, model_b)``; range indexes
on ``Turn.ts``, ``Turn(user_id, ts)``, ``Turn(llm, ts)``, ``Turn(user_id, session_id)``,
``Query.user_id``, ``Query(query_key, ts)`` and ``Query(user_id, ts)``.

Writes: concurrent :meth:`~Neo4jGraphStore.record` calls are grouped into one managed write
transaction (group commit); a call returns once the transaction holding its rows has
committed, and up to :data:`MAX_CONCURRENT_WRITES` such transactions are in flight at once.
A transaction runs one statement in the common case: a group with no id or key twice and
with new turns of one ``turn_index`` per session (one record per conversation in flight, as
a gateway sends them). It locks the user nodes in sorted order and bumps their versions,
reads the last turns of every session it touches with one index seek each (and so notes
the sessions whose stored turns already reach the new index: a late turn), creates queries,
turns and responses with ``UNWIND``, links each new turn to its previous turn among the
stored turns of its session (the rule of :func:`graphstore.neighbourhood.link_previous_turns`;
outside a late session that turn is among the last ones read) and updates the pair counts (a
``PairCount`` gets its ``MODEL_A``/``MODEL_B`` edges when it is created); in sessions with
a late turn, every turn whose previous turn changed is re-linked by the same statement. Being
one statement, it runs through the driver's ``execute_query``, which sends BEGIN with RUN
and PULL (two round trips per transaction instead of three). There is no duplicate check
in it: a key or id stored already (a retried record, or another replica's) fails a
uniqueness constraint, the transaction rolls back, and the group is written again the other
way.

The other way, two statements. The first reads which keys and ids are stored already
(``idempotency_key``, then ``interaction_id``, as the SQLite store does), with the user and
fingerprint of their queries, and the last turns of every session the group touches. The
second locks the user nodes, reads those session tails again under the locks, creates the
rows and the ``FOLLOWS`` edges planned from the tails, and updates the pair counts. A call
whose key or id is stored for a different interaction (another user's, or other content:
:func:`graphstore.interactions.is_retry_of`) is refused with
:class:`~graphstore.errors.IdempotencyConflictError` and nothing of it is written; the other
calls of the group are written as usual, in the same transaction. A session that got a late
turn, or whose tail changed between the two statements (another writer), is re-linked as a
whole in the same transaction. A concurrent writer (another replica) racing on the same id
or key hits a uniqueness constraint; the transaction rolls back and is run again, where the
duplicate check now sees the other writer's row.

Commit outcome: every write transaction notes whether any of the driver's attempts got as
far as sending COMMIT (its transaction function, or ``execute_query``'s result transformer,
returned). A write that then fails anyway (say, the server answered that COMMIT with a
transient error while shutting down, possibly after applying it, and the retries could not
connect) raises :class:`~graphstore.errors.CommitOutcomeUnknownError`, never the "nothing was
written" :class:`~graphstore.errors.StoreUnavailableError`.

Reads: :meth:`~Neo4jGraphStore.neighbourhood` runs every hop in one read transaction and
feeds :func:`graphstore.neighbourhood.assemble_neighbourhood`, as the SQLite store does, so
both stores give the same subgraph for the same interactions.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Concatenate, NamedTuple, ParamSpec, TypeVar

import numpy as np
from neo4j import (
    AsyncDriver,
    AsyncGraphDatabase,
    AsyncManagedTransaction,
    AsyncResult,
    AsyncSession,
    Record,
    RoutingControl,
)
from neo4j import exceptions as neo4j_errors
from neo4j.api import AsyncBookmarkManager

from graphstore.errors import (
    CommitOutcomeUnknownError,
    IdempotencyConflictError,
    StoreRefusedError,
    StoreUnavailableError,
)
from graphstore.factory import Neo4jCredentials
from graphstore.interactions import (
    Interaction,
    PairCount,
    RecordedComparison,
    RecordResult,
    UserComparison,
    check_interaction,
    content_fingerprint,
    idempotency_conflict,
    is_retry_of,
    pair_counts_from,
    pair_deltas,
)
from graphstore.neighbourhood import (
    Neighbourhood,
    TurnRow,
    assemble_neighbourhood,
    check_sampling,
    link_previous_turns,
    whole_interactions,
)
from graphstore.registry import KEEP_PUBLISHED, PublishedModel
from graphstore.store import EMPTY_PAIR_GAMES, CallResult, GraphStore, settle_call

log = logging.getLogger(__name__)

#: Constraints and indexes, each idempotent (``IF NOT EXISTS``).
SCHEMA: tuple[str, ...] = (
    "CREATE CONSTRAINT user_id IF NOT EXISTS FOR (u:User) REQUIRE u.user_id IS UNIQUE",
    "CREATE CONSTRAINT llm_name IF NOT EXISTS FOR (m:LLM) REQUIRE m.name IS UNIQUE",
    "CREATE CONSTRAINT query_interaction_id IF NOT EXISTS "
    "FOR (q:Query) REQUIRE q.interaction_id IS UNIQUE",
    "CREATE CONSTRAINT query_idempotency_key IF NOT EXISTS "
    "FOR (q:Query) REQUIRE q.idempotency_key IS UNIQUE",
    "CREATE CONSTRAINT response_id IF NOT EXISTS FOR (r:Response) REQUIRE r.response_id IS UNIQUE",
    "CREATE CONSTRAINT turn_id IF NOT EXISTS FOR (t:Turn) REQUIRE t.turn_id IS UNIQUE",
    "CREATE CONSTRAINT pair_count_models IF NOT EXISTS "
    "FOR (p:PairCount) REQUIRE (p.model_a, p.model_b) IS UNIQUE",
    "CREATE INDEX turn_ts IF NOT EXISTS FOR (t:Turn) ON (t.ts)",
    "CREATE INDEX turn_user_ts IF NOT EXISTS FOR (t:Turn) ON (t.user_id, t.ts)",
    "CREATE INDEX turn_llm_ts IF NOT EXISTS FOR (t:Turn) ON (t.llm, t.ts)",
    "CREATE INDEX turn_user_session IF NOT EXISTS FOR (t:Turn) ON (t.user_id, t.session_id)",
    "CREATE INDEX query_user IF NOT EXISTS FOR (q:Query) ON (q.user_id)",
    # per-query evidence (query_pair_counts): newest comparisons of one key first
    "CREATE INDEX query_key_ts IF NOT EXISTS FOR (q:Query) ON (q.query_key, q.ts)",
    # per-user evidence (user_comparisons): the user's newest comparisons first
    "CREATE INDEX query_user_ts IF NOT EXISTS FOR (q:Query) ON (q.user_id, q.ts)",
    # online learning (graphstore/registry.py)
    "CREATE INDEX query_ts IF NOT EXISTS FOR (q:Query) ON (q.ts)",
    "CREATE CONSTRAINT model_weights_version IF NOT EXISTS "
    "FOR (w:ModelWeights) REQUIRE w.version IS UNIQUE",
    "CREATE INDEX model_weights_seq IF NOT EXISTS FOR (w:ModelWeights) ON (w.seq)",
    "CREATE CONSTRAINT trainer_lease_name IF NOT EXISTS "
    "FOR (l:TrainerLease) REQUIRE l.name IS UNIQUE",
    "CREATE CONSTRAINT model_registry_name IF NOT EXISTS "
    "FOR (r:ModelRegistry) REQUIRE r.name IS UNIQUE",
)

_TURN_MAP = "{.turn_id, .interaction_id, .user_id, .session_id, .turn_index, .llm, .outcome, .ts}"

# The write path's statements are large: planning one takes seconds on a busy machine, and
# Neo4j re-plans a cached query whenever the store's statistics drift (often while the graph
# is young). Their plans do not depend on statistics (every lookup is a unique-constraint seek
# or a hinted index seek), so they keep the first plan. Their inputs travel as one map ``$p``:
# Neo4j caches a plan per parameter types, and an empty list is not typed like a list of maps,
# so separate list parameters that are sometimes empty would each need a plan of their own.
_NO_REPLAN = "CYPHER replan=skip"

# The last turns of a session: how many turns it has, the greatest ``turn_index`` and the
# turns at that index. A turn appended after them (a greater index) links to one of them and
# changes no other turn's previous turn. Runs per row of ``s`` ({user_id, session_id}).
_SESSION_TAIL = f"""  CALL (s) {{
    OPTIONAL MATCH (t:Turn {{user_id: s.user_id, session_id: s.session_id}})
      USING INDEX t:Turn(user_id, session_id)
    WITH count(t) AS n, max(t.turn_index) AS top, collect(t) AS turns
    RETURN n, top, [x IN turns WHERE x.turn_index = top | x {_TURN_MAP}] AS tail
  }}
  RETURN collect({{user_id: s.user_id, session_id: s.session_id, n: n, top: top, tail: tail}})"""

# First statement of a write: which keys and ids are stored already (with the user and the
# content fingerprint of their queries: only a retry is a duplicate), and the tails of the
# sessions the batch touches (to link appended turns without reading whole sessions).
_READ_STATE = f"""{_NO_REPLAN}
CALL () {{
  UNWIND $p.keys AS key
  MATCH (q:Query {{idempotency_key: key}})
  RETURN collect([key, q.interaction_id, q.user_id, q.fingerprint]) AS by_key
}}
CALL () {{
  UNWIND $p.ids AS id
  MATCH (q:Query {{interaction_id: id}})
  RETURN collect([id, q.interaction_id, q.user_id, q.fingerprint]) AS known_ids
}}
CALL () {{
  UNWIND $p.sessions AS s
{_SESSION_TAIL} AS tails
}}
RETURN by_key, known_ids, tails
"""

# The parts of a write. User nodes are locked first, in the order given (sorted), so that two
# writers touching one user are serialised. Pair counts come last (every writer updates the
# same few nodes: their locks are held for the shortest time); a new PairCount gets its
# MODEL_A/MODEL_B edges, an existing one is only updated.
_LOCK_USERS = """CALL () {
  UNWIND $p.users AS row
  MERGE (u:User {user_id: row.user_id})
    ON CREATE SET u.version = 0
  // Take the node's write lock before reading the version (Neo4j operations manual, "lost
  // updates"): two writers that read first would both write the same version + n.
  SET u._lock = true
  WITH u, row
  SET u.version = u.version + row.writes
  REMOVE u._lock
}
CALL () {
  UNWIND $p.names AS name
  MERGE (:LLM {name: name})
}"""

# One turn of a row: its Turn and Response nodes and their relationships (the user u, the
# query q, the row, the turn's map and its LLM node m in scope). Both write statements use it.
_CREATE_TURN = """  CREATE (t:Turn)
  SET t = turn
  CREATE (r:Response {response_id: turn.turn_id, llm: turn.llm, outcome: turn.outcome})
  SET r.text = row.texts[turn.llm]
  CREATE (q)-[:RECEIVED]->(r),
         (r)-[:GENERATED_BY]->(m),
         (t)-[:OF_USER]->(u),
         (t)-[:ASKED]->(q),
         (t)-[:ANSWERED_BY]->(m),
         (t)-[:HAS_RESPONSE]->(r)"""

_CREATE_ROWS = f"""CALL () {{
  UNWIND $p.rows AS row
  MATCH (u:User {{user_id: row.query.user_id}})
  CREATE (q:Query)
  SET q = row.query
  CREATE (u)-[:SUBMITTED]->(q)
  WITH u, q, row
  UNWIND row.turns AS turn
  MATCH (m:LLM {{name: turn.llm}})
{_CREATE_TURN}
}}"""

_UPDATE_PAIRS = """CALL () {
  UNWIND $p.pairs AS pair
  MERGE (p:PairCount {model_a: pair.model_a, model_b: pair.model_b})
    ON CREATE SET p.wins_a = pair.wins_a, p.wins_b = pair.wins_b
    ON MATCH SET p.wins_a = p.wins_a + pair.wins_a, p.wins_b = p.wins_b + pair.wins_b
  WITH p, pair
  WHERE NOT EXISTS { (p)-[:MODEL_A]->(:LLM) }
  MATCH (a:LLM {name: pair.model_a}), (b:LLM {name: pair.model_b})
  CREATE (p)-[:MODEL_A]->(a), (p)-[:MODEL_B]->(b)
}"""

# Second statement: everything else, in one round trip. The tails of the appended sessions
# are read again under the users' locks (a concurrent writer may have added a turn since the
# first statement: the caller then re-links that session).
_WRITE = f"""{_NO_REPLAN}
{_LOCK_USERS}
CALL () {{
  UNWIND $p.appends AS s
{_SESSION_TAIL} AS tails
}}
{_CREATE_ROWS}
CALL () {{
  UNWIND $p.links AS link
  MATCH (t:Turn {{turn_id: link.turn_id}}), (p:Turn {{turn_id: link.prev_id}})
  CREATE (t)-[:FOLLOWS]->(p)
}}
{_UPDATE_PAIRS}
RETURN tails
"""

# The previous turn of turn t among the turns of its session s, by the rule of
# graphstore.neighbourhood.link_previous_turns: the greatest turn_index below t's, then the
# same LLM, then the newest, then the greatest turn_id (the order _previous_turns gives ties).
_PREVIOUS_TURN = """
    MATCH (p:Turn {user_id: s.user_id, session_id: s.session_id})
      USING INDEX p:Turn(user_id, session_id)
    WHERE p.turn_index < t.turn_index
    WITH t, p
    ORDER BY p.turn_index DESC, p.llm = t.llm DESC, p.ts DESC, p.turn_id DESC
    LIMIT 1"""

# The whole write in one statement (see Neo4jGraphStore._write_group for when it is used):
# no duplicate check (the uniqueness constraints reject a duplicate: the caller writes again
# with the two statements above), and every session gets new turns of one turn_index only,
# so the previous turn of each new turn is among the stored turns of its session. Sessions
# whose stored turns already reach the new index (a late turn: a stored turn's previous turn
# may now be a new one) are found under the users' locks before the new rows exist, and every
# turn of them whose previous turn changed is re-linked at the end. One statement, so the
# driver sends BEGIN, RUN and PULL at once and COMMIT next: two round trips in all.
#
# Each session's stored turns are read once, by one index seek: their greatest turn_index and
# the turns at it (the tail). In a session that is not late, the previous turn of a new turn
# is one of the tail (the greatest index below the new one is the tail's), so it is picked
# from that short list when the turn is created, instead of by a seek and sort per new turn
# (session 14: Neo4j's Bolt worker CPU per 16-record group 9.4 -> 7.8 ms in process). The new
# turns of a late session keep the seek (_PREVIOUS_TURN). The user and LLM nodes locked or
# merged first are reused by position (rows carry ``ui``, ``si`` and ``mis``: indexes into
# $p.users, $p.sessions and $p.names, -1 for no session) instead of looked up again per row.
_WRITE_APPENDS = f"""{_NO_REPLAN}
CALL () {{
  UNWIND range(0, size($p.users) - 1) AS i
  WITH i, $p.users[i] AS row
  MERGE (u:User {{user_id: row.user_id}})
    ON CREATE SET u.version = 0
  // as in _LOCK_USERS (keep the two alike): take the node's write lock before reading the
  // version (Neo4j operations manual, "lost updates")
  SET u._lock = true
  WITH i, u, row
  SET u.version = u.version + row.writes
  REMOVE u._lock
  WITH i, u ORDER BY i
  RETURN collect(u) AS users
}}
CALL () {{
  UNWIND range(0, size($p.names) - 1) AS i
  WITH i, $p.names[i] AS name
  MERGE (m:LLM {{name: name}})
  WITH i, m ORDER BY i
  RETURN collect(m) AS llms
}}
CALL () {{
  UNWIND range(0, size($p.sessions) - 1) AS i
  WITH i, $p.sessions[i] AS s
  OPTIONAL MATCH (t:Turn {{user_id: s.user_id, session_id: s.session_id}})
    USING INDEX t:Turn(user_id, session_id)
  WITH i, s, max(t.turn_index) AS top, collect(t) AS turns
  WITH i, s, coalesce(top >= s.turn_index, false) AS late,
       [x IN turns WHERE x.turn_index = top] AS tail
  ORDER BY i
  RETURN collect({{late: late, tail: tail}}) AS tails,
         collect(CASE WHEN late THEN
           {{user_id: s.user_id, session_id: s.session_id, turn_index: s.turn_index}}
         END) AS late_sessions
}}
CALL (users, llms, tails) {{
  UNWIND $p.rows AS row
  WITH users[row.ui] AS u, row, llms, tails
  CREATE (q:Query)
  SET q = row.query
  CREATE (u)-[:SUBMITTED]->(q)
  WITH u, q, row, llms, tails
  UNWIND range(0, size(row.turns) - 1) AS k
  WITH u, q, row, row.turns[k] AS turn, llms[row.mis[k]] AS m, tails
{_CREATE_TURN}
  WITH t, turn, CASE WHEN row.si >= 0 THEN tails[row.si] END AS tl
  WHERE tl IS NOT NULL AND NOT tl.late AND size(tl.tail) > 0
  CALL (t, turn, tl) {{
    UNWIND tl.tail AS p
    WITH t, p
    ORDER BY p.llm = turn.llm DESC, p.ts DESC, p.turn_id DESC
    LIMIT 1
    CREATE (t)-[:FOLLOWS]->(p)
  }}
}}
CALL (tails) {{
  UNWIND range(0, size($p.sessions) - 1) AS i
  WITH $p.sessions[i] AS s, tails[i] AS tl
  WHERE tl.late
  UNWIND s.turn_ids AS turn_id
  MATCH (t:Turn {{turn_id: turn_id}})
  CALL (s, t) {{{_PREVIOUS_TURN}
    CREATE (t)-[:FOLLOWS]->(p)
  }}
}}
CALL (late_sessions) {{
  UNWIND late_sessions AS s
  MATCH (t:Turn {{user_id: s.user_id, session_id: s.session_id}})
    USING INDEX t:Turn(user_id, session_id)
  // only a turn above the new index can have a new turn as its previous one, and it always
  // has a previous turn (a new one at least)
  WHERE t.turn_index > s.turn_index
  CALL (s, t) {{
    CALL (s, t) {{{_PREVIOUS_TURN}
      RETURN p AS wanted
    }}
    OPTIONAL MATCH (t)-[f:FOLLOWS]->(current:Turn)
    WITH t, wanted, f, current
    WHERE current IS NULL OR current <> wanted
    DELETE f
    CREATE (t)-[:FOLLOWS]->(wanted)
  }}
}}
{_UPDATE_PAIRS}
RETURN size(late_sessions) AS relinked
"""

_SESSION_TURNS = f"""
UNWIND $sessions AS s
MATCH (t:Turn {{user_id: s.user_id, session_id: s.session_id}})
OPTIONAL MATCH (t)-[:FOLLOWS]->(p:Turn)
RETURN t {_TURN_MAP} AS turn, p.turn_id AS prev
"""

_DROP_FOLLOWS = """
UNWIND $turn_ids AS id
MATCH (:Turn {turn_id: id})-[f:FOLLOWS]->()
DELETE f
"""

_ADD_FOLLOWS = """
UNWIND $links AS link
MATCH (t:Turn {turn_id: link.turn_id}), (p:Turn {turn_id: link.prev_id})
CREATE (t)-[:FOLLOWS]->(p)
"""

# Sampling reads the denormalised Turn properties through the (user_id, ts) and (llm, ts)
# range indexes: ordering by the index's own keys lets the planner read newest-first from the
# index and stop after LIMIT (PartialTop: turn_id only breaks ties within one ts), so the cost
# follows the fan-out, not the user's or the LLM's degree. Each query also returns the
# embeddings of its turns' queries (one round trip less).
_WITH_EMBEDDINGS = """
CALL (turns) {
  UNWIND turns AS turn
  WITH DISTINCT turn.interaction_id AS id
  MATCH (q:Query {interaction_id: id})
  RETURN collect([id, q.embedding]) AS embeddings
}"""

_SEED_TURNS = f"""
OPTIONAL MATCH (u:User {{user_id: $user_id}})
CALL () {{
  MATCH (t:Turn)
  WHERE t.user_id = $user_id AND t.ts IS NOT NULL
  WITH t ORDER BY t.user_id DESC, t.ts DESC, t.turn_id DESC LIMIT $limit
  RETURN collect(t {_TURN_MAP}) AS turns
}}
{_WITH_EMBEDDINGS}
RETURN coalesce(u.version, 0) AS version, turns, embeddings
"""

_OTHER_TURNS = f"""
UNWIND $llms AS name
CALL (name) {{
  MATCH (t:Turn)
  WHERE t.llm = name AND t.ts IS NOT NULL AND t.user_id <> $user_id
  WITH t ORDER BY t.llm DESC, t.ts DESC, t.turn_id DESC LIMIT $limit
  RETURN collect(t {_TURN_MAP}) AS turns
}}
{_WITH_EMBEDDINGS}
RETURN name, turns, embeddings
ORDER BY name
"""

_USER_VERSION = """
OPTIONAL MATCH (u:User {user_id: $user_id})
RETURN coalesce(u.version, 0) AS version
"""

_COUNTS = """
RETURN COUNT { (:User) } AS user,
       COUNT { (:LLM) } AS llm,
       COUNT { (:Query) } AS query,
       COUNT { (:Response) } AS response,
       COUNT { (:Turn) } AS turn
"""

# delete_user, in one write transaction: lock the user node (a concurrent record of the same
# user waits), read the user's comparisons, subtract them from the pair counts, then delete
# responses, turns (with their FOLLOWS edges), queries and the user node.
_LOCK_USER = """
MATCH (u:User {user_id: $user_id})
SET u.version = u.version
"""

_USER_COMPARISONS = """
MATCH (q:Query {user_id: $user_id})
WHERE q.winner_model IS NOT NULL AND q.loser_model IS NOT NULL
RETURN q.winner_model AS winner, q.loser_model AS loser, coalesce(q.tie, false) AS tie
"""

_SUB_PAIR_COUNTS = """
UNWIND $pairs AS pair
MATCH (p:PairCount {model_a: pair.model_a, model_b: pair.model_b})
SET p.wins_a = p.wins_a - pair.wins_a, p.wins_b = p.wins_b - pair.wins_b
WITH p
WHERE p.wins_a <= $empty AND p.wins_b <= $empty
DETACH DELETE p
"""

_DELETE_USER = """
CALL () {
  MATCH (q:Query {user_id: $user_id})-[:RECEIVED]->(r:Response)
  DETACH DELETE r
}
CALL () {
  MATCH (t:Turn)
  WHERE t.user_id = $user_id
  DETACH DELETE t
}
CALL () {
  MATCH (q:Query {user_id: $user_id})
  DETACH DELETE q
  RETURN count(*) AS deleted
}
CALL () {
  OPTIONAL MATCH (u:User {user_id: $user_id})
  DETACH DELETE u
}
RETURN deleted
"""

_Pending = tuple[list[Interaction], asyncio.Future[list[RecordResult]]]

#: (user_id, session_id) of a session.
_SessionKey = tuple[str, str]


class _Tail(NamedTuple):
    """A session's stored turns as :data:`_SESSION_TAIL` reads them.

    ``n`` turns in all, ``top`` the greatest ``turn_index`` (0 when ``n`` is 0) and ``turns``
    the turns at that index, sorted by ``turn_id``.
    """

    n: int
    top: int
    turns: tuple[TurnRow, ...]


_EMPTY_TAIL = _Tail(0, 0, ())


def _tails(records: list[dict[str, Any]]) -> dict[_SessionKey, _Tail]:
    out: dict[_SessionKey, _Tail] = {}
    for r in records:
        turns = tuple(sorted((_turn_row(t) for t in r["tail"]), key=lambda t: t.turn_id))
        top = int(r["top"]) if r["top"] is not None else 0
        out[(r["user_id"], r["session_id"])] = _Tail(int(r["n"]), top, turns)
    return out


#: A group commit takes whole ``record`` calls until it holds at least this many interactions.
MAX_GROUP_INTERACTIONS = 2000

#: Write transactions (group commits) one store keeps in flight at once. Two in flight made no
#: measurable difference with 32 closed-loop clients (which settle into two alternating groups
#: of ≈ 16 with one in flight; README → Performance). (A
#: kill-Neo4j test that once seemed to find a user's version at half its query count with two
#: had grouped two users with equal versions into one row; the test now groups by user.)
MAX_CONCURRENT_WRITES = 1

#: Attempts of one schema statement at open() when it fails transiently (replicas creating
#: the schema of a fresh database at once deadlock in Neo4j).
#: Neo4j status codes that refuse the configuration when the store opens (a wrong database
#: name, a user without the rights): start-up gives up at once instead of retrying for
#: ``store.open_wait_s``. Anything else that fails at open (rate-limited logins, a terminated
#: or timed-out schema transaction) may pass, and is retried. Wrong credentials
#: (``AuthError``) are refused too, in every operation. A database that a cluster is still
#: creating counts as not found: the pod exits and Kubernetes restarts it.
_REFUSED_AT_OPEN = frozenset(
    {
        "Neo.ClientError.Database.DatabaseNotFound",
        "Neo.ClientError.Security.Forbidden",
    }
)

_SCHEMA_ATTEMPTS = 8

#: Attempts of one write group when a concurrent writer wins a uniqueness race.
_CONSTRAINT_ATTEMPTS = 3


class _Blob(bytes):
    """Bytes whose ``repr`` is only their length.

    The driver formats every RUN message's parameters for its debug log before it checks the
    log level (``neo4j/_async/io/_bolt/_bolt5.py``, 6.4.1): for a group commit of 32
    interactions that is a 170,000-character ``repr`` of the embeddings on the event loop
    (in process, a transaction's Python CPU went 6.4 → 5.8 ms without it). The driver packs a
    ``bytes`` subclass like ``bytes`` (the Rust codec too), and Neo4j stores the same byte
    array.
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return f"<{len(self)} bytes>"


class _Parameters(dict[str, Any]):
    """A statement's parameter map whose ``repr`` is only its keys.

    For the same reason as :class:`_Blob`: the driver's debug-log line of a RUN message
    formats the whole map (every row of a group commit) even when debug logging is off. The
    driver packs a ``dict`` subclass like a ``dict`` (the Rust codec too).
    """

    __slots__ = ()

    def __repr__(self) -> str:
        return f"<parameters {sorted(self)}>"


def rust_codec_active() -> bool:
    """True when the driver packs/unpacks Bolt messages with the ``neo4j-rust-ext`` codec."""
    from neo4j._codec.packstream import v1

    return getattr(v1, "_rust_pack", None) is not None


def _appends_only(items: list[Interaction]) -> bool:
    """Whether a write group may use the one-statement write (:data:`_WRITE_APPENDS`): no id
    or idempotency key twice in the group, and one ``turn_index`` per session."""
    ids = {it.interaction_id for it in items}
    keys = [it.idempotency_key for it in items if it.idempotency_key]
    if len(ids) < len(items) or len(set(keys)) < len(keys):
        return False
    index: dict[_SessionKey, int] = {}
    for it in items:
        if it.session_id and index.setdefault((it.user_id, it.session_id), it.turn_index) != (
            it.turn_index
        ):
            return False
    return True


_P = ParamSpec("_P")
_R = TypeVar("_R")


class _CommitWatch:
    """Whether any attempt of one managed write transaction got as far as COMMIT.

    The driver commits a managed transaction right after its transaction function returns
    (``execute_write``), and ``execute_query`` right after its result transformer returns
    (the transformer runs inside the transaction function). Wrapped by :meth:`work` or
    :meth:`transformer`, they set :attr:`reached` just before the driver sends COMMIT. An
    attempt whose COMMIT is answered with a retryable error (a server shutting down may have
    applied it first) is retried by the driver; when the retries fail too, the final error
    tells only of the last attempt, and :attr:`reached` is what says the write may be stored.
    """

    def __init__(self) -> None:
        self.reached = False

    def work(
        self, fn: Callable[Concatenate[AsyncManagedTransaction, _P], Awaitable[_R]]
    ) -> Callable[Concatenate[AsyncManagedTransaction, _P], Awaitable[_R]]:
        """``fn`` as a transaction function that notes its return."""

        async def run(tx: AsyncManagedTransaction, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
            out = await fn(tx, *args, **kwargs)
            self.reached = True
            return out

        return run

    def transformer(
        self, fn: Callable[[AsyncResult], Awaitable[_R]]
    ) -> Callable[[AsyncResult], Awaitable[_R]]:
        """``fn`` as an ``execute_query`` result transformer that notes its return."""

        async def run(result: AsyncResult) -> _R:
            out = await fn(result)
            self.reached = True
            return out

        return run


#: What to tell the caller of a write whose commit outcome is unknown, by operation.
_RETRY_HINTS = {
    "record": "retry with the same idempotency key (or interaction id)",
    "delete_user": "delete_user is idempotent: call it again",
    "publish_model": "publishing the same version again is idempotent",
    "acquire_lease": "call it again",
}


async def _single_record(result: AsyncResult) -> Record:
    """``execute_query`` result transformer: the one record of a statement that returns one.

    Raises:
        neo4j.exceptions.ResultNotSingleError: no record, or more than one.
    """
    return await result.single(strict=True)


def _turn_row(d: dict[str, Any]) -> TurnRow:
    return TurnRow(
        turn_id=d["turn_id"],
        interaction_id=d["interaction_id"],
        user_id=d["user_id"],
        session_id=d["session_id"],
        turn_index=int(d["turn_index"]),
        llm=d["llm"],
        outcome=float(d["outcome"]),
        ts=float(d["ts"]),
    )


def _previous_turns(turns: list[TurnRow]) -> dict[str, str | None]:
    """turn_id → previous turn_id (or None) among the turns of whole sessions."""
    ordered = sorted(turns, key=lambda t: (t.ts, t.turn_id), reverse=True)
    users = {u: i for i, u in enumerate(dict.fromkeys(t.user_id for t in ordered))}
    llms = {m: i for i, m in enumerate(sorted({t.llm for t in ordered}))}
    prev = link_previous_turns(
        np.array([users[t.user_id] for t in ordered], dtype=np.int64),
        [t.session_id for t in ordered],
        np.array([t.turn_index for t in ordered], dtype=np.int64),
        np.array([llms[t.llm] for t in ordered], dtype=np.int64),
        np.array([t.ts for t in ordered], dtype=np.float64),
    )
    return {
        t.turn_id: (ordered[int(p)].turn_id if p >= 0 else None)
        for t, p in zip(ordered, prev, strict=True)
    }


class _Stored(NamedTuple):
    """A stored (or planned) query found by its idempotency key or interaction id."""

    interaction_id: str
    user_id: str
    #: :func:`~graphstore.interactions.content_fingerprint`; None on a query written before
    #: fingerprints existed.
    fingerprint: str | None


class _Plan:
    """What one write transaction does: per-call results and the rows to create.

    Args:
        batches: The ``record`` calls of the group, in order.
        by_key: Stored queries by idempotency key (updated with the planned ones).
        known: Stored queries by interaction id (updated with the planned ones).
    """

    def __init__(
        self,
        batches: list[list[Interaction]],
        by_key: dict[str, _Stored],
        known: dict[str, _Stored],
    ) -> None:
        self.results: list[CallResult] = []
        self.new: list[Interaction] = []
        #: content_fingerprint of each of ``new``.
        self.fingerprints: list[str] = []
        for batch in batches:
            keys: dict[str, _Stored] = {}
            ids: dict[str, _Stored] = {}
            new: list[tuple[Interaction, str]] = []
            results: list[RecordResult] = []
            try:
                for position, it in enumerate(batch):
                    fp = content_fingerprint(it)
                    key = it.idempotency_key
                    hit = (keys.get(key) or by_key.get(key)) if key else None
                    field = "idempotency_key"
                    if hit is None:
                        hit = ids.get(it.interaction_id) or known.get(it.interaction_id)
                        field = "interaction_id"
                    if hit is not None:
                        if not is_retry_of(hit.user_id, hit.fingerprint, it, fp):
                            value = key if field == "idempotency_key" else it.interaction_id
                            raise idempotency_conflict(field, value, position, len(batch))
                        results.append(RecordResult(hit.interaction_id, duplicate=True))
                        continue
                    planned = _Stored(it.interaction_id, it.user_id, fp)
                    if key:
                        keys[key] = planned
                    ids[it.interaction_id] = planned
                    new.append((it, fp))
                    results.append(RecordResult(it.interaction_id, duplicate=False))
            except IdempotencyConflictError as exc:
                # The whole call is refused: none of its rows are planned.
                self.results.append(exc)
                continue
            by_key.update(keys)
            known.update(ids)
            self.new += [it for it, _ in new]
            self.fingerprints += [fp for _, fp in new]
            self.results.append(results)

    def users(self) -> list[dict[str, Any]]:
        writes = Counter(it.user_id for it in self.new)
        return [{"user_id": u, "writes": n} for u, n in sorted(writes.items())]

    def llms(self) -> list[str]:
        return sorted({m for it in self.new for m in it.models()})

    def rows(self) -> list[dict[str, Any]]:
        rows = []
        for it, fp in zip(self.new, self.fingerprints, strict=True):
            c = it.comparison
            ts = float(it.timestamp_s)
            rows.append(
                {
                    "query": {
                        "interaction_id": it.interaction_id,
                        "idempotency_key": it.idempotency_key or None,
                        "user_id": it.user_id,
                        "session_id": it.session_id,
                        "turn_index": int(it.turn_index),
                        "text": it.query,
                        "embedding": _Blob(it.query_embedding.astype("<f4").tobytes()),
                        "model": it.model,
                        "response": it.response,
                        "rating": None if it.rating is None else float(it.rating),
                        "winner_model": c.winner_model if c else None,
                        "loser_model": c.loser_model if c else None,
                        "tie": c.tie if c else None,
                        "ts": ts,
                        "query_key": it.query_key,
                        "fingerprint": fp,
                    },
                    "turns": [
                        {
                            "turn_id": f"{it.interaction_id}:{o.model}",
                            "interaction_id": it.interaction_id,
                            "user_id": it.user_id,
                            "session_id": it.session_id,
                            "turn_index": int(it.turn_index),
                            "llm": o.model,
                            "outcome": float(o.value),
                            "ts": ts,
                        }
                        for o in it.outcomes()
                    ],
                    "texts": {it.model: it.response} if it.model else {},
                }
            )
        return rows

    def pairs(self) -> list[dict[str, Any]]:
        return [
            {"model_a": p.model_a, "model_b": p.model_b, "wins_a": p.wins_a, "wins_b": p.wins_b}
            for p in sorted(pair_counts_from(self.new), key=lambda p: (p.model_a, p.model_b))
        ]

    def link(self, rows: list[dict[str, Any]], tails: dict[_SessionKey, _Tail]) -> None:
        """Plan the ``FOLLOWS`` edges of the new turns from the tails of their sessions.

        A session whose new turns all have a greater ``turn_index`` than every stored turn is
        an append: its new turns link among themselves and to the stored turns at the greatest
        index (:func:`_previous_turns` over those, the rule the whole session would give), and
        no stored turn's previous turn changes. Any other session is re-linked as a whole
        after the write (:attr:`relink`).
        """
        new_turns: dict[_SessionKey, list[TurnRow]] = {}
        for row in rows:
            for turn in row["turns"]:
                if turn["session_id"]:
                    key = (turn["user_id"], turn["session_id"])
                    new_turns.setdefault(key, []).append(_turn_row(turn))
        #: Sessions linked here, with the tail they were linked against (checked under lock).
        self.appends: dict[_SessionKey, _Tail] = {}
        #: Sessions to re-link as a whole (read every turn, fix what differs).
        self.relink: set[_SessionKey] = set()
        #: FOLLOWS edges to create: {turn_id, prev_id}.
        self.links: list[dict[str, str]] = []
        for key in sorted(new_turns):
            turns = new_turns[key]
            tail = tails.get(key, _EMPTY_TAIL)
            if tail.n and min(t.turn_index for t in turns) <= tail.top:
                self.relink.add(key)
                continue
            self.appends[key] = tail
            prev = _previous_turns([*tail.turns, *turns])
            for t in turns:
                p = prev[t.turn_id]
                if p is not None:
                    self.links.append({"turn_id": t.turn_id, "prev_id": p})


class Neo4jGraphStore(GraphStore):
    """Graph store on a Neo4j 5 database (Community or Enterprise, single instance or cluster).

    Args:
        uri: ``neo4j://``, ``neo4j+s://``, ``bolt://`` … URI of the server.
        credentials: User, password ("" = authentication off) and database name.
        embedding_dim: Query-embedding dimension ``D``; every interaction must match it.
        max_transaction_retry_time_s: How long a managed transaction retries transient
            errors (lost leader, deadlock, connection dropped) before giving up.
        connection_timeout_s: TCP connect timeout per attempt, in seconds.
        connection_acquisition_timeout_s: Longest wait for a connection from the pool
            (connecting included), in seconds; past it the call fails with
            :class:`StoreUnavailableError` instead of waiting (the driver's default is 60 s).

    Errors: every failure is a :class:`StoreUnavailableError` (nothing of the call was
    written), except a write whose commit was sent but not confirmed (the connection dropped
    while it was in flight, or an attempt's COMMIT got an error and the driver's retries
    failed too): :class:`CommitOutcomeUnknownError` (the write may or may not be stored;
    retry with the same idempotency key). ``record`` also raises
    :class:`~graphstore.errors.IdempotencyConflictError` (see :meth:`GraphStore.record`).
    """

    def __init__(
        self,
        uri: str,
        credentials: Neo4jCredentials,
        embedding_dim: int,
        *,
        max_transaction_retry_time_s: float = 15.0,
        connection_timeout_s: float = 5.0,
        connection_acquisition_timeout_s: float = 60.0,
    ) -> None:
        self.uri = uri
        self.credentials = credentials
        self.database = credentials.database or "neo4j"
        self.embedding_dim = embedding_dim
        self.max_transaction_retry_time_s = max_transaction_retry_time_s
        self.connection_timeout_s = connection_timeout_s
        self.connection_acquisition_timeout_s = connection_acquisition_timeout_s
        #: Write transactions committed so far (one per group commit); for tests and metrics.
        self.write_transactions = 0
        #: One-statement writes rolled back on a stored key or id and written again with the
        #: duplicate check (a retried record, or another replica's); for tests and metrics.
        self.one_statement_fallbacks = 0
        #: Sessions whose FOLLOWS edges one-statement writes re-checked (and re-linked where
        #: a previous turn changed) because a turn came late (its turn_index not above every
        #: stored one); for tests and metrics.
        self.relinked_sessions = 0
        #: Whether the database enforces unique ``Query.interaction_id`` and
        #: ``Query.idempotency_key`` (checked by :meth:`open`). The one-statement write has no
        #: duplicate check of its own, so without them every group takes the two statements.
        self.unique_ids_enforced = False
        self._driver: AsyncDriver | None = None
        self._bookmarks: AsyncBookmarkManager | None = None
        self._pending: list[_Pending] = []
        #: Group commits in flight at once (see MAX_CONCURRENT_WRITES).
        self.max_concurrent_writes = MAX_CONCURRENT_WRITES
        self._flushes: set[asyncio.Task[None]] = set()

    def __repr__(self) -> str:  # never shows the password
        return (
            f"Neo4jGraphStore(uri={self.uri!r}, user={self.credentials.user!r}, "
            f"database={self.database!r}, embedding_dim={self.embedding_dim})"
        )

    # -- lifecycle ---------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect, check the credentials, create constraints and indexes. Idempotent."""
        if self._driver is not None:
            return
        creds = self.credentials
        auth = (creds.user or "neo4j", creds.password) if creds.password else None
        try:
            driver = AsyncGraphDatabase.driver(
                self.uri,
                auth=auth,
                connection_timeout=self.connection_timeout_s,
                connection_acquisition_timeout=self.connection_acquisition_timeout_s,
                max_transaction_retry_time=self.max_transaction_retry_time_s,
                user_agent="gmtrouter-graphstore",
                # No notifications: nothing reads them, and the server would send the ones
                # it cached with a plan (a fresh database's "property key does not exist",
                # the write statement's cartesian products) with every write transaction.
                notifications_min_severity="OFF",
            )
        except (neo4j_errors.ConfigurationError, ValueError) as exc:
            raise StoreRefusedError(f"invalid Neo4j URI {self.uri!r}: {exc}") from exc
        try:
            await driver.verify_connectivity()
            async with driver.session(database=self.database) as session:
                for statement in SCHEMA:
                    await self._create_schema(session, statement)
                await (await session.run("CALL db.awaitIndexes(300)")).consume()
                enforced = await self._unique_ids_enforced(session)
        except BaseException as exc:
            await driver.close()
            if isinstance(exc, neo4j_errors.Neo4jError | neo4j_errors.DriverError):
                raise self._unavailable(exc, "open") from exc
            raise
        self._driver = driver
        self._bookmarks = AsyncGraphDatabase.bookmark_manager()
        self.unique_ids_enforced = enforced
        if not enforced:
            log.warning(
                "Neo4j at %s lacks a uniqueness constraint on Query.interaction_id or "
                "Query.idempotency_key (an index on the same property blocks creating it?); "
                "every write checks for duplicates with an extra statement",
                self.uri,
            )
        log.info("opened %r (rust codec: %s)", self, rust_codec_active())

    @staticmethod
    async def _unique_ids_enforced(session: AsyncSession) -> bool:
        """Whether uniqueness constraints (or node keys) cover ``Query.interaction_id`` and
        ``Query.idempotency_key`` each on its own (``SHOW CONSTRAINTS``)."""
        result = await session.run("SHOW CONSTRAINTS YIELD type, labelsOrTypes, properties")
        unique = {
            (tuple(r["labelsOrTypes"] or ()), tuple(r["properties"] or ()))
            async for r in result
            if "UNIQUENESS" in r["type"] or "KEY" in r["type"]
            if "RELATIONSHIP" not in r["type"]
        }
        return {(("Query",), ("interaction_id",)), (("Query",), ("idempotency_key",))} <= unique

    @staticmethod
    async def _create_schema(session: AsyncSession, statement: str) -> None:
        """Run one idempotent schema statement; tolerate replicas opening at once.

        Raises:
            neo4j.exceptions.Neo4jError: an error other than "already exists", or a transient
                one (a deadlock between replicas creating the schema) past
                :data:`_SCHEMA_ATTEMPTS` attempts.
        """
        for attempt in range(_SCHEMA_ATTEMPTS):
            try:
                await (await session.run(statement)).consume()
                return
            except neo4j_errors.ClientError as exc:
                # Two replicas opening at once: the other one created it first.
                if "AlreadyExists" not in (exc.code or ""):
                    raise
                return
            except neo4j_errors.TransientError:
                # e.g. Neo.TransientError.Transaction.DeadlockDetected: two replicas creating
                # constraints on one fresh database at once. The statement is idempotent.
                if attempt == _SCHEMA_ATTEMPTS - 1:
                    raise
                await asyncio.sleep(0.05 * 2**attempt * (1 + random.random()))

    async def close(self) -> None:
        """Commit whatever is pending, then close the driver. Safe to call twice."""
        while self._flushes:
            await asyncio.shield(asyncio.wait(set(self._flushes)))
        if self._driver is not None:
            driver, self._driver = self._driver, None
            await driver.close()

    def _session(self) -> AsyncSession:
        if self._driver is None:
            raise StoreUnavailableError("the Neo4j store is not open")
        return self._driver.session(database=self.database, bookmark_manager=self._bookmarks)

    def _unavailable(
        self, exc: BaseException, what: str, *, committing: bool = False
    ) -> StoreUnavailableError:
        """The store error for a driver error ``exc`` of operation ``what``.

        Args:
            committing: Whether an attempt of the failed write got as far as sending COMMIT
                (:class:`_CommitWatch`): the error is then :class:`CommitOutcomeUnknownError`,
                whatever the final error was.
        """
        where = f"Neo4j at {self.uri} (database {self.database!r})"
        hint = _RETRY_HINTS.get(what, "retry")
        # IncompleteCommit is a ServiceUnavailable: it must be told apart first.
        if isinstance(exc, neo4j_errors.IncompleteCommit):
            return CommitOutcomeUnknownError(
                f"{where}: the connection dropped while committing ({what}); the write may or "
                f"may not be stored, {hint}"
            )
        if committing:
            return CommitOutcomeUnknownError(
                f"{where}: a commit of {what} was sent and not confirmed, then the write "
                f"failed ({type(exc).__name__}: {exc}); the write may or may not be stored, "
                f"{hint}"
            )
        if isinstance(exc, neo4j_errors.AuthError):
            return StoreRefusedError(
                f"{where} refused the credentials of user {self.credentials.user!r} "
                f"during {what}; check NEO4J_USER / NEO4J_PASSWORD "
                f"({type(exc).__name__}: {getattr(exc, 'code', None) or 'auth failed'})"
            )
        if what == "open" and getattr(exc, "code", None) in _REFUSED_AT_OPEN:
            return StoreRefusedError(
                f"{where} refused {what}: {getattr(exc, 'code', None) or type(exc).__name__}: "
                f"{getattr(exc, 'message', None) or exc}"
            )
        if isinstance(
            exc,
            neo4j_errors.ServiceUnavailable
            | neo4j_errors.SessionExpired
            | neo4j_errors.DatabaseUnavailable,
        ):
            return StoreUnavailableError(
                f"{where} is unavailable during {what}: {type(exc).__name__}: {exc}"
            )
        return StoreUnavailableError(f"{where} failed during {what}: {type(exc).__name__}: {exc}")

    # -- writes ------------------------------------------------------------------------------

    async def record(self, interactions: Sequence[Interaction]) -> list[RecordResult]:
        """See :meth:`GraphStore.record`. Concurrent calls share one transaction; a call
        refused with :class:`IdempotencyConflictError` does not stop the others."""
        batch = list(interactions)
        for it in batch:
            check_interaction(it, self.embedding_dim)
        if not batch:
            return []
        if self._driver is None:
            raise StoreUnavailableError("the Neo4j store is not open")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[list[RecordResult]] = loop.create_future()
        self._pending.append((batch, fut))
        self._start_flushes()
        return await asyncio.shield(fut)

    def _take_group(self) -> list[_Pending]:
        group: list[_Pending] = []
        size = 0
        while self._pending and size < MAX_GROUP_INTERACTIONS:
            entry = self._pending.pop(0)
            group.append(entry)
            size += len(entry[0])
        return group

    def _start_flushes(self) -> None:
        """Start flush tasks for the pending calls, up to ``max_concurrent_writes`` at once."""
        while self._pending and len(self._flushes) < max(self.max_concurrent_writes, 1):
            task = asyncio.create_task(self._flush_loop())
            self._flushes.add(task)
            task.add_done_callback(self._flushes.discard)

    async def _flush_loop(self) -> None:
        # A task takes its group when it first runs, so that the calls made meanwhile (in the
        # same event-loop turn) join it.
        while self._pending:
            await self._flush(self._take_group())

    async def _flush(self, group: list[_Pending]) -> None:
        """Write one group; each call's future gets its results, its
        IdempotencyConflictError, or StoreUnavailableError."""
        try:
            results = await self._write_group([batch for batch, _ in group])
        except Exception as exc:
            err = self._as_unavailable(exc)
            if len(group) > 1 and self._is_batch_error(err):
                # Not a connectivity problem: one call's rows may be at fault. Write the
                # calls one by one so that the others still go through.
                await self._write_each(group, isinstance(err, CommitOutcomeUnknownError))
                return
            for _, fut in group:
                if not fut.done():
                    fut.set_exception(err)
            return
        for (_, fut), res in zip(group, results, strict=True):
            settle_call(fut, res)

    def _as_unavailable(self, exc: Exception) -> StoreUnavailableError:
        if isinstance(exc, StoreUnavailableError):
            return exc
        err = StoreUnavailableError(f"Neo4j write failed: {type(exc).__name__}: {exc}")
        err.__cause__ = exc
        return err

    @staticmethod
    def _is_batch_error(exc: StoreUnavailableError) -> bool:
        cause = exc.__cause__
        if isinstance(cause, neo4j_errors.Neo4jError | neo4j_errors.DriverError):
            return isinstance(cause, neo4j_errors.ClientError) and not isinstance(
                cause, neo4j_errors.AuthError
            )
        return cause is not None  # an unexpected error raised by our own code

    async def _write_each(self, group: list[_Pending], group_committing: bool) -> None:
        """Write the calls of a failed group one by one.

        Args:
            group_committing: The group's own write may have been committed (it failed with
                :class:`CommitOutcomeUnknownError`): a call that now fails is then reported
                as of unknown outcome too, never as not written.
        """
        for batch, fut in group:
            try:
                [res] = await self._write_group([batch])
            except Exception as exc:
                err = self._as_unavailable(exc)
                if group_committing and not isinstance(err, CommitOutcomeUnknownError):
                    unknown = CommitOutcomeUnknownError(
                        f"{err}; but an earlier transaction holding this call sent its "
                        f"commit: the write may or may not be stored, retry with the same "
                        f"idempotency key (or interaction id)"
                    )
                    unknown.__cause__ = err.__cause__ or err
                    err = unknown
                if not fut.done():
                    fut.set_exception(err)
                continue
            settle_call(fut, res)

    async def _write_group(self, batches: list[list[Interaction]]) -> list[CallResult]:
        """Write the batches in one transaction; per batch, its results or the
        IdempotencyConflictError that refused it (nothing of it written).

        A group without duplicates among its own ids and keys, whose sessions each get new
        turns of one ``turn_index``, is first written in one statement (:data:`_WRITE_APPENDS`,
        the common case: BEGIN pipelined with it, two round trips fewer) when the database
        enforces unique ids and keys (:attr:`unique_ids_enforced`). When a uniqueness
        constraint rejects it (a key or id is stored already: a retried record, or another
        replica's), it is written again with the duplicate check (:meth:`_write_tx`), which
        has its own :data:`_CONSTRAINT_ATTEMPTS`.

        Raises:
            StoreUnavailableError: nothing of the group was written.
            CommitOutcomeUnknownError: an attempt sent its COMMIT (:class:`_CommitWatch`)
                and the write failed nonetheless: the group may or may not be stored.
        """
        items = [it for batch in batches for it in batch]
        one_statement = self.unique_ids_enforced and _appends_only(items)
        # One watch for every transaction of the group: a one-statement attempt may have
        # been committed before the fallback runs.
        watch = _CommitWatch()
        attempt = 0
        while True:
            try:
                if one_statement:
                    results = await self._write_appends(batches, watch)
                else:
                    async with self._session() as session:
                        results = await session.execute_write(watch.work(self._write_tx), batches)
                break
            except neo4j_errors.ConstraintError as exc:
                if one_statement:
                    # A key or id is stored already: write again with the duplicate check.
                    self.one_statement_fallbacks += 1
                    one_statement = False
                    continue
                attempt += 1
                if attempt == _CONSTRAINT_ATTEMPTS:
                    raise self._unavailable(exc, "record", committing=watch.reached) from exc
                log.info("write group lost a uniqueness race (attempt %d); retrying", attempt)
            except (neo4j_errors.Neo4jError, neo4j_errors.DriverError) as exc:
                raise self._unavailable(exc, "record", committing=watch.reached) from exc
            except Exception as exc:
                if watch.reached:
                    raise self._unavailable(exc, "record", committing=True) from exc
                raise
        self.write_transactions += 1
        return results

    @staticmethod
    async def _write_tx(
        tx: AsyncManagedTransaction, batches: list[list[Interaction]]
    ) -> list[CallResult]:
        """Two statements in the common case: read the state, then write (module docstring)."""
        items = [it for batch in batches for it in batch]
        keys = sorted({it.idempotency_key for it in items if it.idempotency_key})
        ids = sorted({it.interaction_id for it in items})
        sessions = sorted({(it.user_id, it.session_id) for it in items if it.session_id})
        record = await (
            await tx.run(
                _READ_STATE,
                p={
                    "keys": keys,
                    "ids": ids,
                    "sessions": [{"user_id": u, "session_id": s} for u, s in sessions],
                },
            )
        ).single(strict=True)
        by_key = {k: _Stored(i, u, f) for k, i, u, f in record["by_key"]}
        known = {k: _Stored(i, u, f) for k, i, u, f in record["known_ids"]}
        plan = _Plan(batches, by_key, known)
        if not plan.new:
            return plan.results
        rows = plan.rows()
        plan.link(rows, _tails(record["tails"]))
        appends = [{"user_id": u, "session_id": s} for u, s in plan.appends]
        written = await (
            await tx.run(
                _WRITE,
                p={
                    "users": plan.users(),
                    "appends": appends,
                    "names": plan.llms(),
                    "rows": rows,
                    "links": plan.links,
                    "pairs": plan.pairs(),
                },
            )
        ).single(strict=True)
        relink = set(plan.relink)
        for key, tail in _tails(written["tails"]).items():
            if tail != plan.appends[key]:
                # Another writer added to the session between the two statements.
                relink.add(key)
        if relink:
            await Neo4jGraphStore._relink_sessions(
                tx, [{"user_id": u, "session_id": s} for u, s in sorted(relink)]
            )
        return plan.results

    async def _write_appends(
        self, batches: list[list[Interaction]], watch: _CommitWatch
    ) -> list[CallResult]:
        """The group in one statement (:data:`_WRITE_APPENDS`, which also re-links the
        sessions that got a late turn), as one managed write transaction of the driver's
        ``execute_query``: BEGIN is sent with RUN and PULL, so the transaction takes two round
        trips instead of three. Only for groups that :func:`_appends_only` accepts. ``watch``
        notes when an attempt reaches COMMIT.

        Raises:
            StoreUnavailableError: the store is not open.
            neo4j.exceptions.ConstraintError: a key or id is stored already (nothing written).
            neo4j.exceptions.Neo4jError, neo4j.exceptions.DriverError: as ``execute_query``
                raises them once its retries are spent.
        """
        if self._driver is None:
            raise StoreUnavailableError("the Neo4j store is not open")
        plan = _Plan(batches, {}, {})  # no key or id twice: every interaction is new
        rows = plan.rows()
        sessions: dict[_SessionKey, dict[str, Any]] = {}
        for row in rows:
            for turn in row["turns"]:
                if turn["session_id"]:
                    key = (turn["user_id"], turn["session_id"])
                    entry = sessions.setdefault(
                        key,
                        {
                            "user_id": key[0],
                            "session_id": key[1],
                            "turn_index": turn["turn_index"],
                            "turn_ids": [],
                        },
                    )
                    entry["turn_ids"].append(turn["turn_id"])
        users = plan.users()
        names = plan.llms()
        order = sorted(sessions)
        user_index = {u["user_id"]: i for i, u in enumerate(users)}
        name_index = {n: i for i, n in enumerate(names)}
        session_index = {k: i for i, k in enumerate(order)}
        for row in rows:
            q = row["query"]
            row["ui"] = user_index[q["user_id"]]
            row["si"] = session_index.get((q["user_id"], q["session_id"]), -1)
            row["mis"] = [name_index[t["llm"]] for t in row["turns"]]
        written: Record = await self._driver.execute_query(
            _WRITE_APPENDS,
            {
                "p": _Parameters(
                    {
                        "users": users,
                        "names": names,
                        "sessions": [sessions[k] for k in order],
                        "rows": rows,
                        "pairs": plan.pairs(),
                    }
                )
            },
            routing_=RoutingControl.WRITE,
            database_=self.database,
            bookmark_manager_=self._bookmarks,
            result_transformer_=watch.transformer(_single_record),
        )
        self.relinked_sessions += int(written["relinked"])
        return plan.results

    @staticmethod
    async def _relink_sessions(tx: AsyncManagedTransaction, sessions: list[dict[str, str]]) -> None:
        """Bring the FOLLOWS edges of whole sessions up to date (a turn came late)."""
        result = await tx.run(_SESSION_TURNS, sessions=sessions)
        turns: list[TurnRow] = []
        current: dict[str, str | None] = {}
        async for rec in result:
            row = _turn_row(rec["turn"])
            turns.append(row)
            current[row.turn_id] = rec["prev"]
        wanted = _previous_turns(turns)
        changed = [tid for tid, prev in wanted.items() if current.get(tid) != prev]
        if not changed:
            return
        linked = [tid for tid in changed if current.get(tid) is not None]
        if linked:
            await (await tx.run(_DROP_FOLLOWS, turn_ids=linked)).consume()
        links = [
            {"turn_id": tid, "prev_id": wanted[tid]} for tid in changed if wanted[tid] is not None
        ]
        if links:
            await (await tx.run(_ADD_FOLLOWS, links=links)).consume()

    async def delete_user(self, user_id: str) -> int:
        """See :meth:`GraphStore.delete_user`. One write transaction (atomic)."""

        async def work(tx: AsyncManagedTransaction) -> int:
            await (await tx.run(_LOCK_USER, user_id=user_id)).consume()
            result = await tx.run(_USER_COMPARISONS, user_id=user_id)
            comparisons = [(r["winner"], r["loser"], bool(r["tie"])) async for r in result]
            pairs = [
                {"model_a": p.model_a, "model_b": p.model_b, "wins_a": p.wins_a, "wins_b": p.wins_b}
                for p in pair_deltas(comparisons)
            ]
            if pairs:
                await (
                    await tx.run(_SUB_PAIR_COUNTS, pairs=pairs, empty=EMPTY_PAIR_GAMES)
                ).consume()
            rec = await (await tx.run(_DELETE_USER, user_id=user_id)).single(strict=True)
            return int(rec["deleted"])

        watch = _CommitWatch()
        try:
            async with self._session() as session:
                deleted: int = await session.execute_write(watch.work(work))
        except (neo4j_errors.Neo4jError, neo4j_errors.DriverError) as exc:
            raise self._unavailable(exc, "delete_user", committing=watch.reached) from exc
        self.write_transactions += 1
        return deleted

    # -- reads -------------------------------------------------------------------------------

    async def neighbourhood(
        self, user_id: str, hops: int = 2, fan_out: Sequence[int] = (64, 8, 16, 8)
    ) -> Neighbourhood:
        """See :meth:`GraphStore.neighbourhood`. All hops run in one read transaction."""
        caps = check_sampling(hops, fan_out)

        async def work(
            tx: AsyncManagedTransaction,
        ) -> tuple[int, list[TurnRow], dict[str, bytes]]:
            rec = await (await tx.run(_SEED_TURNS, user_id=user_id, limit=caps[0] + 1)).single(
                strict=True
            )
            version = int(rec["version"])
            turns = whole_interactions([_turn_row(t) for t in rec["turns"]], caps[0])
            embeddings = {i: bytes(e) for i, e in rec["embeddings"]}
            if hops >= 3 and turns:
                llms = sorted({t.llm for t in turns})
                result = await tx.run(_OTHER_TURNS, llms=llms, user_id=user_id, limit=caps[2])
                async for r in result:
                    turns += [_turn_row(t) for t in r["turns"]]
                    embeddings.update((i, bytes(e)) for i, e in r["embeddings"])
            return version, turns, embeddings

        version, turns, embeddings = await self._read(work, "neighbourhood")
        return assemble_neighbourhood(user_id, version, turns, embeddings, self.embedding_dim)

    async def _read(self, work: Any, what: str) -> Any:
        try:
            async with self._session() as session:
                return await session.execute_read(work)
        except (neo4j_errors.Neo4jError, neo4j_errors.DriverError) as exc:
            raise self._unavailable(exc, what) from exc

    async def user_version(self, user_id: str) -> int:
        """See :meth:`GraphStore.user_version`.

        One auto-commit read (a single idempotent statement needs no managed transaction: one
        round trip less per call), run once more after a transient error or a lost connection
        (what the driver marks retryable).
        """
        for attempt in (1, 2):
            try:
                async with self._session() as session:
                    result = await session.run(_USER_VERSION, user_id=user_id)
                    rec = await result.single(strict=True)
                return int(rec["version"])
            except (neo4j_errors.Neo4jError, neo4j_errors.DriverError) as exc:
                if attempt == 1 and exc.is_retryable():
                    log.info("user_version: %s; retrying once", type(exc).__name__)
                    continue
                raise self._unavailable(exc, "user_version") from exc
        raise AssertionError("unreachable")

    async def list_models(self) -> list[str]:
        """See :meth:`GraphStore.list_models`."""

        async def work(tx: AsyncManagedTransaction) -> list[str]:
            return [r["name"] async for r in await tx.run("MATCH (m:LLM) RETURN m.name AS name")]

        return sorted(await self._read(work, "list_models"))

    async def query_pair_counts(self, query_key: str, limit: int) -> list[PairCount]:
        """See :meth:`GraphStore.query_pair_counts` (a seek on the ``(query_key, ts)`` index,
        newest first, stopping after ``limit``)."""
        if limit < 1:
            raise ValueError(f"limit (got {limit}) must be >= 1")
        if not query_key:
            return []

        async def work(tx: AsyncManagedTransaction) -> list[PairCount]:
            result = await tx.run(
                "MATCH (q:Query) USING INDEX q:Query(query_key, ts) "
                "WHERE q.query_key = $key AND q.ts IS NOT NULL AND q.winner_model IS NOT NULL "
                "AND q.loser_model IS NOT NULL "
                "WITH q ORDER BY q.ts DESC LIMIT $limit "
                "RETURN q.winner_model AS w, q.loser_model AS l, q.tie AS tie",
                key=query_key,
                limit=limit,
            )
            return pair_deltas([(r["w"], r["l"], bool(r["tie"])) async for r in result])

        rows: list[PairCount] = await self._read(work, "query_pair_counts")
        return rows

    async def user_comparisons(self, user_id: str, limit: int) -> list[UserComparison]:
        """See :meth:`GraphStore.user_comparisons` (a seek on the ``(user_id, ts)`` index,
        newest first, stopping after ``limit``)."""
        if limit < 1:
            raise ValueError(f"limit (got {limit}) must be >= 1")

        async def work(tx: AsyncManagedTransaction) -> list[UserComparison]:
            result = await tx.run(
                "MATCH (q:Query) USING INDEX q:Query(user_id, ts) "
                "WHERE q.user_id = $user AND q.ts IS NOT NULL AND q.winner_model IS NOT NULL "
                "AND q.loser_model IS NOT NULL "
                "WITH q ORDER BY q.ts DESC, q.interaction_id DESC LIMIT $limit "
                "RETURN q.winner_model AS w, q.loser_model AS l, q.tie AS tie, "
                "coalesce(q.query_key, '') AS k",
                user=user_id,
                limit=limit,
            )
            return [UserComparison(r["w"], r["l"], bool(r["tie"]), r["k"]) async for r in result]

        rows: list[UserComparison] = await self._read(work, "user_comparisons")
        return rows

    async def pair_counts(self) -> list[PairCount]:
        """See :meth:`GraphStore.pair_counts`."""

        async def work(tx: AsyncManagedTransaction) -> list[PairCount]:
            result = await tx.run(
                "MATCH (p:PairCount) RETURN p.model_a AS a, p.model_b AS b, "
                "p.wins_a AS wa, p.wins_b AS wb"
            )
            return [PairCount(r["a"], r["b"], float(r["wa"]), float(r["wb"])) async for r in result]

        rows: list[PairCount] = await self._read(work, "pair_counts")
        return sorted(rows, key=lambda p: (p.model_a, p.model_b))

    async def counts(self) -> dict[str, int]:
        """See :meth:`GraphStore.counts`."""

        async def work(tx: AsyncManagedTransaction) -> dict[str, int]:
            rec = await (await tx.run(_COUNTS)).single(strict=True)
            return {k: int(rec[k]) for k in ("user", "llm", "query", "response", "turn")}

        out: dict[str, int] = await self._read(work, "counts")
        out["interaction"] = out["query"]
        return out

    # -- online learning ---------------------------------------------------------------------

    async def _write(self, work: Any, what: str) -> Any:
        watch = _CommitWatch()
        try:
            async with self._session() as session:
                return await session.execute_write(watch.work(work))
        except (neo4j_errors.Neo4jError, neo4j_errors.DriverError) as exc:
            raise self._unavailable(exc, what, committing=watch.reached) from exc

    async def recent_comparisons(self, limit: int) -> list[RecordedComparison]:
        """See :meth:`GraphStore.recent_comparisons` (the ``Query.ts`` index orders them)."""
        if limit < 1:
            raise ValueError(f"limit (got {limit}) must be >= 1")

        async def work(tx: AsyncManagedTransaction) -> list[RecordedComparison]:
            result = await tx.run(_RECENT_COMPARISONS, limit=limit)
            return [
                RecordedComparison(
                    interaction_id=r["id"],
                    user_id=r["user_id"],
                    session_id=r["session_id"],
                    turn_index=int(r["turn_index"]),
                    query_embedding=np.frombuffer(bytes(r["embedding"]), dtype="<f4").astype(
                        np.float32
                    ),
                    winner_model=r["winner"],
                    loser_model=r["loser"],
                    tie=bool(r["tie"]),
                    timestamp_s=float(r["ts"]),
                )
                async for r in result
            ]

        rows: list[RecordedComparison] = await self._read(work, "recent_comparisons")
        return rows

    @staticmethod
    def _published(r: Any) -> PublishedModel:
        return PublishedModel(
            version=r["version"],
            base_version=r["base_version"],
            seq=int(r["seq"]),
            interactions=int(r["interactions"]),
            created_at_s=float(r["created_at"]),
            metrics=r["metrics"],
        )

    async def publish_model(self, model: PublishedModel, blob: bytes) -> PublishedModel:
        """See :meth:`GraphStore.publish_model`. The registry node serialises publishers."""

        async def work(tx: AsyncManagedTransaction) -> PublishedModel:
            rec = await (
                await tx.run(
                    _PUBLISH_MODEL,
                    version=model.version,
                    base_version=model.base_version,
                    interactions=model.interactions,
                    metrics=model.metrics,
                    blob=blob,
                    keep=KEEP_PUBLISHED,
                )
            ).single(strict=True)
            return self._published(rec)

        published: PublishedModel = await self._write(work, "publish_model")
        return published

    async def latest_model(self) -> PublishedModel | None:
        """See :meth:`GraphStore.latest_model`."""

        async def work(tx: AsyncManagedTransaction) -> PublishedModel | None:
            rec = await (await tx.run(_LATEST_MODEL)).single()
            return None if rec is None else self._published(rec)

        latest: PublishedModel | None = await self._read(work, "latest_model")
        return latest

    async def load_model(self, version: str) -> bytes | None:
        """See :meth:`GraphStore.load_model`."""

        async def work(tx: AsyncManagedTransaction) -> bytes | None:
            rec = await (
                await tx.run(
                    "MATCH (w:ModelWeights {version: $version}) RETURN w.blob AS blob",
                    version=version,
                )
            ).single()
            return None if rec is None else bytes(rec["blob"])

        blob: bytes | None = await self._read(work, "load_model")
        return blob

    async def acquire_lease(self, name: str, holder: str, ttl_s: float) -> bool:
        """See :meth:`GraphStore.acquire_lease` (expiry by the database's clock)."""
        if ttl_s <= 0:
            raise ValueError(f"ttl_s (got {ttl_s}) must be > 0")

        async def work(tx: AsyncManagedTransaction) -> bool:
            rec = await (
                await tx.run(_ACQUIRE_LEASE, name=name, holder=holder, ttl_ms=int(ttl_s * 1000))
            ).single(strict=True)
            return bool(rec["mine"])

        mine: bool = await self._write(work, "acquire_lease")
        return mine


_RECENT_COMPARISONS = """
MATCH (q:Query)
WHERE q.ts IS NOT NULL AND q.winner_model IS NOT NULL AND q.loser_model IS NOT NULL
RETURN q.interaction_id AS id, q.user_id AS user_id, q.session_id AS session_id,
       q.turn_index AS turn_index, q.embedding AS embedding, q.winner_model AS winner,
       q.loser_model AS loser, q.tie AS tie, q.ts AS ts
ORDER BY q.ts DESC, q.interaction_id DESC
LIMIT $limit
"""

_PUBLISHED_FIELDS = (
    "w.version AS version, w.base_version AS base_version, w.seq AS seq, "
    "w.interactions AS interactions, w.created_at AS created_at, w.metrics AS metrics"
)

# Lock the registry node first (MERGE + SET takes its write lock), so concurrent publishers
# are serialised and sequence numbers never repeat; an existing version is returned as is.
_PUBLISH_MODEL = f"""
MERGE (r:ModelRegistry {{name: 'gmtrouter'}})
ON CREATE SET r.seq = 0
SET r.locked_at = timestamp()
WITH r
OPTIONAL MATCH (old:ModelWeights {{version: $version}})
CALL (r, old) {{
  WITH r, old WHERE old IS NULL
  SET r.seq = r.seq + 1
  CREATE (w:ModelWeights {{version: $version, base_version: $base_version, seq: r.seq,
          interactions: $interactions, created_at: timestamp() / 1000.0, metrics: $metrics,
          blob: $blob}})
  WITH r
  MATCH (stale:ModelWeights) WHERE stale.seq <= r.seq - $keep
  DETACH DELETE stale
}}
MATCH (w:ModelWeights {{version: $version}})
RETURN {_PUBLISHED_FIELDS}
"""

_LATEST_MODEL = f"""
MATCH (w:ModelWeights) WHERE w.seq IS NOT NULL
RETURN {_PUBLISHED_FIELDS}
ORDER BY w.seq DESC LIMIT 1
"""

# Taken when free, expired or already the caller's. MERGE alone does not lock an existing
# node: the SET of locked_at takes its write lock first, so the holder and expiry read after
# it are the latest committed ones and concurrent callers queue behind each other.
_ACQUIRE_LEASE = """
MERGE (l:TrainerLease {name: $name})
ON CREATE SET l.holder = $holder, l.expires_at = 0
SET l.locked_at = timestamp()
WITH l, timestamp() AS now
WITH l, now, (l.holder = $holder OR l.expires_at < now) AS take
SET l.holder = CASE WHEN take THEN $holder ELSE l.holder END,
    l.expires_at = CASE WHEN take THEN now + $ttl_ms ELSE l.expires_at END
RETURN l.holder = $holder AS mine
"""
