"""Domain errors raised by graph stores (mapped to gRPC status codes in ``server/``)."""


class GraphStoreError(Exception):
    """Base class of every store error."""


class StoreUnavailableError(GraphStoreError):
    """The store cannot be reached or did not answer in time; nothing was written."""


class StoreRefusedError(StoreUnavailableError):
    """The store answered and refused the service's configuration: the credentials, the
    database name or the URI. Retrying does not help until the configuration changes (a
    start-up that waits for an unreachable store, ``store.open_wait_s``, gives up at once)."""


class CommitOutcomeUnknownError(StoreUnavailableError):
    """A write's commit was sent, but whether it was applied is unknown.

    The write may or may not be stored. Retrying it with the same idempotency key (or the
    same interaction id) is safe: a stored write is then reported as a duplicate, a lost one
    is written; ``delete_user``, ``publish_model`` and ``acquire_lease`` may simply be called
    again. Raised by the Neo4j store for every call whose rows were in the transaction when
    the connection dropped while the commit was in flight
    (``neo4j.exceptions.IncompleteCommit``), and when any attempt of a managed transaction
    got as far as sending its commit and the write then failed anyway (the server answered
    that commit with an error, possibly after applying it, and the driver's retries failed
    too, e.g. could not connect: the final error says nothing of the earlier commit).
    """


class StoreTimeoutError(StoreUnavailableError):
    """A store read did not answer within its time budget (the read was abandoned)."""


class InvalidInteractionError(GraphStoreError, ValueError):
    """An interaction is malformed (e.g. an embedding of the wrong dimension)."""


class IdempotencyConflictError(GraphStoreError, ValueError):
    """An ``idempotency_key`` or ``interaction_id`` is stored already, for a different
    interaction: another user's, or the same user's with other content (see
    :func:`graphstore.interactions.content_fingerprint`). Nothing of the call was written.

    Only a retry, the same user sending the same content again, is a duplicate; anything else
    reusing a stored key or id is a client error (a key reused for a new interaction, or a
    guessed or leaked one), so it is refused instead of being reported as a duplicate, which
    would drop the feedback silently and hand out the stored interaction's id. The message
    starts with the field name (``"idempotency_key: …"`` or ``"interaction_id: …"``) and
    reveals nothing of the stored interaction (neither its id, its user nor its content).

    The server maps it to gRPC ``INVALID_ARGUMENT``, not ``ALREADY_EXISTS``: clients and
    gateways commonly treat ``ALREADY_EXISTS`` on a create as "already done, fine", which is
    exactly the silent loss this error exists to prevent; the request carries a field value
    that must be changed (a new key for a new interaction), which is what
    ``INVALID_ARGUMENT`` with the field name first says everywhere else in the service.

    Attributes:
        field: ``"idempotency_key"`` or ``"interaction_id"``.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
