"""Key layout, URL parsing and the job record of the NATS JetStream broker (see nats.py).

Everything lives in one JetStream Key-Value bucket (history 1), whose keys are NATS subjects, so a
key family can be scanned with a subject filter:

    j.<id>                                   the job record (`Record`, JSON), CAS'd by revision
    w.<queue>.<prio>.<seq>.<run_at_ms>.<id>  ready index (transport=stream: also the body and
                                             Nats-Msg-Id of the job's ready-stream message)
    t.<queue>.<prio>.<seq>.<run_at_ms>.<id>  delayed index (eta or retry delay), made a w. key when due
    r.<queue>.<id>                           running index; value = lease expiry (epoch seconds)
    d.<queue>.<id>                           dead-letter index; value = time of death
    x.<id>                                   finished-record expiry; value = end of its result TTL
    i.<sha256 of key>                        idempotency claim; value = {"job": id, "exp": t}
    q.<queue>                                known queue; value = max_depth ("" for unbounded)

A second bucket, `<bucket>_drain` with a 60 s TTL, holds one key per finished job,
`<queue>.<finished_ms>.<nonce>`: counting them gives the drain rate.
"""

from __future__ import annotations

import hashlib
import os
import re
from urllib.parse import parse_qs, urlsplit

import msgspec

from offload.brokers.nats_tls import TLS_OPTIONS, wants_tls
from offload.errors import ConfigurationError

OPTIONS = ("bucket", "replicas", "transport", "ack_wait", "max_deliver", *TLS_OPTIONS)
# transport=stream: the ready-stream consumers' ack wait (seconds) and MaxDeliver (see nats_stream)
DEFAULT_ACK_WAIT = 2.0
DEFAULT_MAX_DELIVER = 1000

_PLAIN = re.compile(r"[-_a-zA-Z0-9]+")
_BUCKET = re.compile(r"[-_a-zA-Z0-9]+")
PRIO_BASE = 1_000_000  # prio token = PRIO_BASE - priority, zero padded: higher priority sorts first


class Record(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A job's record: its envelope, state, counters, current lease and outcome."""

    queue: str
    task: str
    state: str
    prio: int = 0
    created: float = 0.0
    run_at: float = 0.0
    lease: float = 30.0  # lease length, fixed at enqueue from the task's timeout
    maxd: int = 5
    ttl: float = 86_400.0
    deliv: int = 0
    att: int = 0
    token: int = 0
    lease_exp: float = 0.0
    started: float | None = None
    finished: float | None = None
    ikey: str | None = None
    index: str = ""  # the index key (w./r./d./x.) that currently points at this record
    # While running: the ready key it was claimed from. A claim cut off after its CAS (an outage
    # between its writes) leaves that key; the lease recovery that must follow deletes it.
    src: str = ""
    # transport=stream: the stream sequence of the ready message it was last claimed from. That
    # message stays un-acked while the job runs (its redelivery brings back a crashed worker's
    # job); a ready message at or below this sequence that the record no longer runs from is stale.
    mseq: int = 0
    body: bytes = b""
    result: bytes | None = None
    error: str | None = None


class Claim(msgspec.Struct):
    job: str
    exp: float


_rec_encoder = msgspec.json.Encoder()
_rec_decoder = msgspec.json.Decoder(Record)
_claim_decoder = msgspec.json.Decoder(Claim)


def dump(value: Record | Claim) -> bytes:
    return _rec_encoder.encode(value)


def load(data: bytes | None) -> Record:
    return _rec_decoder.decode(data or b"")


def load_claim(data: bytes | None) -> Claim:
    return _claim_decoder.decode(data or b"")


def qkey(queue: str) -> str:
    """A queue name as one key token: as is when it is plain, else '=' + hex."""
    if _PLAIN.fullmatch(queue):
        return queue
    return "=" + queue.encode().hex()


def qname(token: str) -> str:
    return bytes.fromhex(token[1:]).decode() if token.startswith("=") else token


def job(job_id: str) -> str:
    return f"j.{job_id}"


def prio_token(priority: int) -> str:
    return f"{PRIO_BASE - priority:07d}"


def waiting(queue: str, priority: int, seq: str, run_at: float, job_id: str, family: str = "w") -> str:
    """A waiting job's index key: `w.` (ready) or `t.` (delayed until run_at)."""
    return f"{family}.{qkey(queue)}.{prio_token(priority)}.{seq}.{int(run_at * 1000):013d}.{job_id}"


def parse_waiting(key: str) -> tuple[tuple[str, str], float, str]:
    """(sort key, run_at, job id) of a w. or t. key."""
    _, _, prio, seq, run_ms, job_id = key.split(".", 5)
    return (prio, seq), int(run_ms) / 1000, job_id


def consumer_name(queue_key: str, token: str) -> str:
    """The durable pull consumer of one queue (as its key token) and priority class."""
    return f"w_{queue_key}_{token}"


def parse_consumer(name: str) -> tuple[str, str] | None:
    """(queue key token, prio token) of a consumer made by consumer_name, else None."""
    if not name.startswith("w_") or len(name) < 11 or name[-8] != "_" or not name[-7:].isdigit():
        return None
    return name[2:-8], name[-7:]


def signal_payload(eta: float | None, tokens: set[str]) -> bytes:
    """A wake-up signal: the earliest new eta (if any) and the priority classes with new work."""
    return f"{'' if eta is None else repr(eta)}|{','.join(sorted(tokens))}".encode()


def parse_signal(data: bytes) -> tuple[float | None, list[str]]:
    eta, _, tokens = data.decode().partition("|")
    return (float(eta) if eta else None), [t for t in tokens.split(",") if t]


def running(queue: str, job_id: str) -> str:
    return f"r.{qkey(queue)}.{job_id}"


def dead(queue: str, job_id: str) -> str:
    return f"d.{qkey(queue)}.{job_id}"


def expiring(job_id: str) -> str:
    return f"x.{job_id}"


def idem(key: str) -> str:
    return "i." + hashlib.sha256(key.encode()).hexdigest()


def queue_meta(queue: str) -> str:
    return f"q.{qkey(queue)}"


def last_token(key: str) -> str:
    return key.rsplit(".", 1)[1]


def parse_nats_url(url: str) -> tuple[list[str], str, int]:
    """nats://[user:pass@]host:4222[,host2:4222]?bucket=offload&replicas=1 -> (servers, bucket, R).
    With TLS options (nats_tls) the servers are tls:// addresses."""
    parts = urlsplit(url)
    if parts.scheme != "nats":
        raise ConfigurationError(f"not a NATS URL: {url!r}")
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    unknown = set(query) - set(OPTIONS)
    if unknown:
        raise ConfigurationError(
            f"unknown option(s) {sorted(unknown)} in NATS broker URL; known: {', '.join(OPTIONS)}"
        )
    bucket = query.get("bucket", "offload")
    if not _BUCKET.fullmatch(bucket):
        raise ConfigurationError(f"bucket={bucket!r}: use letters, digits, '-' and '_' only")
    try:
        replicas = int(query.get("replicas", "1"))
    except ValueError:
        raise ConfigurationError("replicas= must be an integer (1, 3 or 5)") from None
    netloc = parts.netloc
    auth = ""
    if "@" in netloc:
        auth, netloc = netloc.rsplit("@", 1)
        auth += "@"
    hosts = [h for h in netloc.split(",") if h] or ["127.0.0.1:4222"]
    scheme = "tls" if wants_tls(url) else "nats"  # tls://: TLS or nothing (see nats_tls)
    servers = [f"{scheme}://{auth}{h}" for h in hosts]
    return servers, bucket, replicas


def parse_transport(url: str) -> str:
    """How fetches find ready jobs: `stream` (pull them from a work-queue stream; the default) or
    `kv` (scan the index keys). The URL's `transport=` wins over OFFLOAD_NATS_TRANSPORT."""
    query = {k: v[-1] for k, v in parse_qs(urlsplit(url).query).items()}
    transport = query.get("transport") or os.environ.get("OFFLOAD_NATS_TRANSPORT") or "stream"
    if transport not in ("kv", "stream"):
        raise ConfigurationError(f"transport={transport!r}: use kv or stream")
    return transport


def parse_stream_options(url: str) -> tuple[float, int]:
    """transport=stream: (ack_wait, max_deliver) of the ready stream's consumers, from the URL's
    `ack_wait=` (seconds) and `max_deliver=` options."""
    query = {k: v[-1] for k, v in parse_qs(urlsplit(url).query).items()}
    try:
        ack_wait = float(query.get("ack_wait", DEFAULT_ACK_WAIT))
    except ValueError:
        raise ConfigurationError("ack_wait= must be a number of seconds") from None
    if not 0.5 <= ack_wait <= 3600:
        raise ConfigurationError(f"ack_wait={ack_wait}: use 0.5 to 3600 seconds")
    try:
        max_deliver = int(query.get("max_deliver", DEFAULT_MAX_DELIVER))
    except ValueError:
        raise ConfigurationError("max_deliver= must be an integer") from None
    if max_deliver < 1:
        raise ConfigurationError(f"max_deliver={max_deliver}: use 1 or more")
    return ack_wait, max_deliver
