"""Secure aggregation with no shared key: pairwise masking (Bonawitz et al. 2017) over many
rounds, on ``cryptography``'s X25519, HKDF, ChaCha20(-Poly1305) and PyCryptodome's Shamir.

Once per run (three setup exchanges before round 1; in a deployment the first rides on the
schema query), every hospital u:
  1. makes a channel key pair and, for every planned round r, a mask key pair s_u^r, a
     self-mask seed b_u^r and a one-exchange mask key pair e_u^r, and publishes the public
     keys;
  2. splits each b_u^r and each private s_u^r into Shamir shares (any t of the n hospitals
     recover it, fewer learn nothing), and sends each other hospital its shares, encrypted
     and authenticated under their pairwise channel key (the server only relays them).

In round r, hospital u sends only
    y_u = Q(w_u x_u) + PRG(b_u^r) + sum_{v in U_r, v != u} +-PRG(k_uv^r)   (mod 2^32)
where Q is fixed-point quantisation, x_u its update (and one more value: its weight), and
k_uv^r the key u and v agree on from s_u^r and s_v^r (the signs cancel in the sum). On the
round's evaluation exchange, the server names who it received from (S) and who dropped (D);
each hospital returns its shares of b_u^r for u in S and of s_u^r for u in D, never both for
one u and one round, and only if |S| >= t. The server rebuilds the self masks of S and the
dropped hospitals' mask keys, removes every mask, and obtains sum_{u in S} w_u x_u exactly
(up to quantisation). Recovery rides on the evaluation exchange: two exchanges a round.

One exchange a round (``secagg-one-exchange``, the default) while every hospital answers:
the order says the round is one-exchange, and each hospital of U_r (at least t of them)
masks without the self mask, and with pairwise keys from e_u^r, whose private half is never
shared with anyone: y_u = Q(w_u x_u) + sum_v +-PRG(e_uv^r). With every y_u in, the
pairwise masks cancel in the sum: the model, and the next round's order, follow at once
(the evaluation rides on that order, as in plaintext rounds). Nothing of such a round is
ever revealed, nor can be: no share of e_u^r exists, so even a server that told one hospital
the round is one-exchange and the others it is not, and rebuilt s_u^r from their shares,
rebuilds masks y_u does not carry; each hospital also records that it masked round r this
way and refuses any unmasking request for it. So if one y_u is missing (a drop-out, a
refused vector, a decline) the round's updates stay masked and are discarded (the model
stays), and the server runs two-exchange rounds until CLEAN_ROUNDS of them in a row complete
with nobody missing (twice as many after each further discarded round, so a hospital that
keeps returning to lie or drop out costs fewer and fewer rounds). A hospital masks a round
at most once (two vectors under one round's masks would differ by the difference of its
updates).

What each party learns (the README's argument, tested in tests/unit/test_protocols.py):
  - the server: the sum over S, |S| >= t, and nothing else about any x_u: each y_u is masked
    by PRG(b_u^r), revealed only if u is in S (so its pairwise masks with other members of
    S stay hidden, and cancel only in the sum), and by its pairwise masks, revealed only for
    u in D (whose b_u^r then stays hidden, even if y_u arrives late). Keys are per round, so
    nothing revealed in one round helps unmask another. In a one-exchange round: the sum
    over all of U_r, |U_r| >= t, or nothing; no key of the round is ever revealed, so y_u
    stays masked by its pairs' masks whenever it arrives.
  - a coalition of the server and fewer than t hospitals: the same; its members' shares of
    the other hospitals' secrets number fewer than t. In a one-exchange round, any coalition
    learns only the sum over the honest hospitals of U_r (their pairwise masks with each
    other are known to none of it).
  - hospitals: nothing of each other's updates (they see only shares and the public model).

Secure against an honest-but-curious server (which reports S and D as they are); a server
that tells different hospitals different S and D could learn more (Bonawitz et al.'s
malicious-server variant adds signatures and a consistency round, not implemented). A lying
hospital can corrupt the masked sum (a sum-level check on the count and the update norm then
fails the round); it cannot learn anything.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord

from fedpriv.errors import ConfigError, FedprivError
from fedpriv.privacy.distributed_noise import (
    NoiseSplit,
    default_colluders,
    noise_scale,
    usable_size,
)
from fedpriv.privacy.masking import (
    KEY_BYTES,
    Quantizer,
    agree,
    combine,
    generate_keypair,
    open_share,
    prg_uint32,
    seal_share,
    share,
)
from fedpriv.privacy.update_norm import run_update_bound
from fedpriv.protocols.base import (
    Contribution,
    GlobalWeights,
    HospitalSide,
    Protocol,
    ServerSide,
    Update,
    register_protocol,
)
from fedpriv.protocols.checks import Limits, Rejected, check_count

__all__ = ["MASKED", "UNBOUNDED_MAX_NORM", "SecAggHospital", "SecAggServer", "max_norm"]

logger = logging.getLogger(__name__)

# wire keys
MASKED = "secagg-masked"  # ArrayRecord key: the masked vector (uint32)
RECORD = "secagg"  # ConfigRecord of a setup or unmask reply
PARTICIPANTS = "secagg-participants"  # order key: this round's hospitals (node ids, JSON)
UNMASK = "secagg-unmask"  # order key of the evaluation exchange: {round, survivors, dropped}
SELF_MASKS = "secagg-self-masks"  # order key: false in a one-exchange round (no self masks)
SETUP = "secagg-setup"  # order key of a setup query: its content (JSON)
QUERY_KEYS = "secagg-keys"
QUERY_SHARES = "secagg-shares"
QUERY_DELIVER = "secagg-deliver"
QUERIES = (QUERY_KEYS, QUERY_SHARES, QUERY_DELIVER)
NOISE_COLLUDERS = "secagg-noise-colluders"  # order key: distributed noise's t
NOISE_SCALE = "secagg-noise-scale"  # order key: distributed noise's rho
STATE = "fedpriv-secagg"  # the hospital's context.state record (its secrets, this run only)
#: two-exchange rounds that must complete with nobody missing before one-exchange rounds
#: resume after the first discarded one (doubled after each further one)
CLEAN_ROUNDS = 3

_SEALED = 48 + 16  # one round's shares to one peer (b: 16, s: 32) and the AEAD tag
_CHANNEL = b"fedpriv secagg channel v1"
_MASK = b"fedpriv secagg mask v1"
_MASK_ONE = b"fedpriv secagg one-exchange mask v1"


def _pair_info(label: bytes, nonce: bytes, a: int, b: int, round_: int = 0) -> bytes:
    low, high = sorted((a, b))
    return b"|".join([label, nonce, str(round_).encode(), str(low).encode(), str(high).encode()])


# ---- the hospitals --------------------------------------------------------------------------


class SecAggHospital(HospitalSide):
    """A hospital's side. Its secrets live in Flower's context.state for the run (the
    SuperNode's memory), never in the run directory or any message in the clear."""

    def __init__(
        self,
        *,
        bound: float,
        max_norm: float,
        client_dp: tuple[float, float] | None,
        distributed_noise: bool = False,
        colluders: int = -1,
    ) -> None:
        self.bound = bound
        self.max_norm = max_norm
        #: (clip norm S, noise multiplier z) of distributed client-level DP, or None
        self.client_dp = client_dp
        #: record-level DP noise split across hospitals (fedpriv.privacy.distributed_noise)
        self.distributed_noise = distributed_noise
        self.colluders = colluders
        self._rng = np.random.default_rng(secrets.randbits(128))

    def read(self, order: Any, arrays: ArrayRecord) -> GlobalWeights:
        return GlobalWeights({k: v.numpy() for k, v in arrays.items()})

    # -- setup ------------------------------------------------------------------------------

    def answer(
        self, order: Any, kind: str, query: Mapping[str, Any], node: int, state: Any
    ) -> dict[str, Any]:
        content = json.loads(str(query[SETUP]))
        if kind == QUERY_KEYS:
            return self._keys(content, state)
        stored = _State.load(state)
        if stored is None or stored.nonce.hex() != content["nonce"]:
            raise FedprivError("secure aggregation: a setup step arrived before its keys")
        if kind == QUERY_SHARES:
            return stored.make_shares(content, node, state)
        if kind == QUERY_DELIVER:
            return stored.receive(query, node, state)
        raise FedprivError(f"unknown secure-aggregation query {kind!r}")

    def _keys(self, content: Mapping[str, Any], state: Any) -> dict[str, Any]:
        first, last = int(content["rounds"][0]), int(content["rounds"][1])
        channel_private, channel_public = generate_keypair()
        pairs = [generate_keypair() for _ in range(first, last + 1)]
        # one-exchange rounds' mask keys: never secret-shared, so nothing can rebuild them
        once = [generate_keypair() for _ in range(first, last + 1)]
        record = ConfigRecord(
            {
                "nonce": bytes.fromhex(content["nonce"]),
                "rounds": json.dumps([first, last]),
                "channel": channel_private,
                "mask-private": b"".join(p for p, _ in pairs),
                "one-private": b"".join(p for p, _ in once),
                "self-masks": secrets.token_bytes(16 * len(pairs)),
            }
        )
        state[STATE] = record
        return {
            "channel": channel_public,
            "mask-public": b"".join(p for _, p in pairs),
            "one-public": b"".join(p for _, p in once),
        }

    # -- a round --------------------------------------------------------------------------

    def noise_split(self, order: Any, state: Any) -> NoiseSplit | None:
        """Distributed noise's terms (:mod:`fedpriv.privacy.distributed_noise`): the colluders
        ``c`` and ``rho`` from the server's order, the threshold ``t`` from this hospital's own
        setup record (the one its shares enforce when it unmasks), never from the order."""
        if not self.distributed_noise:
            return None
        stored = _State.load(state)
        if stored is None or not stored.ready:
            raise FedprivError("secure aggregation: this hospital took no part in the run's setup")
        try:
            colluders = int(order.extra[NOISE_COLLUDERS])
            scale = float(order.extra[NOISE_SCALE])
        except (KeyError, TypeError, ValueError):
            raise FedprivError(
                "distributed noise: the server's order does not say how the noise is split"
            ) from None
        if self.colluders >= 0 and colluders != self.colluders:
            raise FedprivError(
                f"distributed noise: the order assumes {colluders} colluders, the run's "
                f"setting is {self.colluders}"
            )
        quantizer = Quantizer(
            bound=float(order.extra["bound"]),
            parties=len(json.loads(str(order.extra[PARTICIPANTS]))),
        )
        return NoiseSplit(
            threshold=stored.threshold,
            colluders=colluders,
            scale=scale,
            rounding=quantizer.step * float(order.extra["weight-unit"]) / order.config.server_lr,
        )

    def encode(
        self, order: Any, update: Update, state: Any
    ) -> tuple[ArrayRecord, dict[str, float]]:
        started = time.perf_counter()
        stored = _State.load(state)
        round_ = int(order.server_round)
        participants = [int(n) for n in json.loads(str(order.extra[PARTICIPANTS]))]
        node = int(order.node)
        if stored is None or not stored.ready:
            raise FedprivError("secure aggregation: this hospital took no part in the run's setup")
        if node not in participants or not set(participants) <= set(stored.participants):
            raise FedprivError("secure aggregation: this round's hospitals are not the setup's")
        one_exchange = not bool(order.extra.get(SELF_MASKS, True))
        if one_exchange and len(participants) < stored.threshold:
            raise FedprivError(
                f"secure aggregation: a one-exchange round of {len(participants)} hospitals, "
                f"fewer than the threshold {stored.threshold}: its sum would expose too few; "
                "this hospital declines the round"
            )
        stored.mark_masked(state, round_, one_exchange=one_exchange)
        delta = np.concatenate([np.ravel(v) for v in update.delta().values()])
        clipped = 0.0
        if self.client_dp is not None:  # distributed DP: clip, then this hospital's noise share
            clip, z = self.client_dp
            norm = float(np.linalg.norm(delta))
            if norm > clip:
                delta, clipped = delta * (clip / norm), 1.0
            threshold = int(order.extra["threshold"])
            delta = delta + self._rng.normal(0.0, z * clip / math.sqrt(threshold), delta.size)
            weight = 1.0
        else:
            delta, clipped = self._within_range(delta, update, order)
            weight = update.num_examples / float(order.extra["weight-unit"])
        vector = np.append(weight * delta, weight)
        quantizer = Quantizer(bound=float(order.extra["bound"]), parties=len(participants))
        try:
            masked = quantizer.encode(vector)
        except OverflowError as exc:
            raise FedprivError(
                f"secure aggregation: {exc}: this hospital declines the round"
            ) from None
        if not one_exchange:  # a one-exchange round's sum is unmasked by the pairs alone
            masked += stored.self_mask(round_, masked.size)
        for peer in participants:
            if peer == node:
                continue
            mask = prg_uint32(
                stored.pair_key(node, peer, round_, one_exchange=one_exchange), masked.size
            )
            if node < peer:
                masked += mask
            else:
                masked -= mask
        record = ArrayRecord({MASKED: Array(masked)})
        return record, {
            "secagg-mask-seconds": time.perf_counter() - started,
            # client-level DP's clip, or the range's (only ever at a DP-SGD hospital)
            "update-clipped": clipped,
        }

    def _within_range(
        self, delta: np.ndarray, update: Update, order: Any
    ) -> tuple[np.ndarray, float]:
        """The update to mask, and 1.0 if it had to be clipped into the run's range.

        Within ``max-norm`` (the server's, the same for every hospital): as it is. Beyond it
        but within what this round's DP-SGD can produce (``update.norm_bound``, exceeded by
        an honest update with probability 1e-9): scaled down to ``max-norm``, which is
        post-processing of the DP output (no patient's guarantee changes), logged here and
        reported in the round's metrics. Beyond both, or not finite: something is broken, an
        error (the hospital declines the round).
        """
        limit = float(order.extra.get("max-norm", self.max_norm))
        norm = float(np.linalg.norm(delta))
        if not math.isfinite(norm) or norm > max(limit, update.norm_bound) * (1 + 1e-9):
            honest = (
                f" and more than DP-SGD can produce ({update.norm_bound:.4g})"
                if update.norm_bound > 0
                else ""
            )
            raise FedprivError(
                f"secure aggregation: this hospital's update has norm {norm:.4g}, more than "
                f"secagg-max-norm {limit:.4g}{honest} (an error, never a silent clip): it "
                "declines the round"
            )
        if norm <= limit:
            return delta, 0.0
        logger.warning(
            "secure aggregation: this hospital's DP update has norm %.4g, more than the run's "
            "secagg-max-norm %.4g: scaled down to it (post-processing: the DP guarantee is "
            "unchanged; recorded as secagg-update-clipped)",
            norm,
            limit,
        )
        return delta * (limit / norm), 1.0

    def unmask(self, request: Mapping[str, Any], node: int, state: Any) -> dict[str, Any]:
        """This hospital's shares for a round's unmasking: of b_u for the survivors, of s_u
        for the dropped; refused when the request could expose one hospital's update."""
        stored = _State.load(state)
        if stored is None or not stored.ready:
            raise FedprivError("secure aggregation: this hospital took no part in the run's setup")
        round_ = int(request["round"])
        survivors = [int(n) for n in request["survivors"]]
        dropped = [int(n) for n in request["dropped"]]
        if round_ in stored.masked(state).get("one", []):
            raise FedprivError(
                f"secure aggregation: round {round_} was masked without self masks (one "
                "exchange): none of its secrets is ever revealed (a late update could be "
                "unmasked)"
            )
        if set(survivors) & set(dropped):
            raise FedprivError("secure aggregation: a hospital is both a survivor and dropped")
        if not set(survivors) | set(dropped) <= set(stored.participants):
            raise FedprivError("secure aggregation: the request names hospitals not in the setup")
        if len(survivors) < stored.threshold:
            raise FedprivError(
                f"secure aggregation: {len(survivors)} survivors, fewer than the threshold "
                f"{stored.threshold}: unmasking would expose too small a sum"
            )
        answered = stored.answered(state)
        key = str(round_)
        mine = {"survivors": sorted(survivors), "dropped": sorted(dropped)}
        if key in answered and answered[key] != mine:
            raise FedprivError(
                "secure aggregation: the server asked twice about this round with different "
                "survivors: refused (it could unmask a hospital)"
            )
        answered[key] = mine
        stored.remember(state, answered)
        reply: dict[str, Any] = {"index": stored.index}
        for u in survivors:
            reply[f"b-{u}"] = stored.share_of(u, round_)[0]
        for u in dropped:
            reply[f"s-{u}"] = stored.share_of(u, round_)[1]
        return reply


class _State:
    """A hospital's secure-aggregation secrets for one run (in context.state)."""

    def __init__(self, record: ConfigRecord) -> None:
        self.record = record
        self.nonce = bytes(record["nonce"])  # type: ignore[arg-type]
        self.first, self.last = json.loads(str(record["rounds"]))
        self.participants: list[int] = json.loads(str(record.get("participants", "[]")))
        self.threshold = int(record.get("threshold", 0))  # type: ignore[arg-type]
        self.index = int(record.get("index", 0))  # type: ignore[arg-type]
        self.ready = bool(record.get("ready", False))

    @classmethod
    def load(cls, state: Any) -> _State | None:
        record = state.config_records.get(STATE) if state is not None else None
        return cls(record) if record is not None else None

    def _slot(self, round_: int) -> int:
        if not self.first <= round_ <= self.last:
            raise FedprivError(f"secure aggregation: round {round_} was not set up")
        return round_ - self.first

    def self_mask(self, round_: int, count: int) -> np.ndarray:
        seed = bytes(self.record["self-masks"])[16 * self._slot(round_) :][:16]  # type: ignore[arg-type]
        return prg_uint32(_expand(seed), count)

    def pair_key(self, me: int, peer: int, round_: int, *, one_exchange: bool = False) -> bytes:
        """The key ``me`` and ``peer`` mask with in ``round_``: from the secret-shared s keys
        (two-exchange rounds) or the never-shared e keys (one-exchange rounds)."""
        slot = self._slot(round_)
        mine, theirs, label = (
            ("one-private", "one-public", _MASK_ONE)
            if one_exchange
            else ("mask-private", "mask-public", _MASK)
        )
        private = bytes(self.record[mine])[KEY_BYTES * slot :][:KEY_BYTES]  # type: ignore[arg-type]
        public = _public_key(
            self.record, peer, slot, self.participants, self.last - self.first + 1, key=theirs
        )
        return agree(private, public, info=_pair_info(label, self.nonce, me, peer, round_))

    def make_shares(self, content: Mapping[str, Any], node: int, state: Any) -> dict[str, Any]:
        participants = [int(n) for n in content["participants"]]
        threshold = int(content["threshold"])
        if node not in participants:
            raise FedprivError("secure aggregation: this hospital is not among the participants")
        if not 2 <= threshold <= len(participants):
            raise FedprivError(f"secure aggregation: threshold {threshold} is not usable")
        index = participants.index(node) + 1
        rounds = self.last - self.first + 1
        channel_public = {int(k): bytes.fromhex(v) for k, v in content["channel"].items()}
        mask_public = b"".join(bytes.fromhex(content["mask"][str(n)]) for n in participants)
        one_public = b"".join(
            bytes.fromhex(content.get("one", {}).get(str(n), "")) for n in participants
        )
        if len(mask_public) != len(participants) * rounds * KEY_BYTES or len(one_public) not in (
            0,
            len(mask_public),
        ):
            raise FedprivError("secure aggregation: the published mask keys are incomplete")
        self.record["one-public"] = one_public
        self.record["participants"] = json.dumps(participants)
        self.record["threshold"] = threshold
        self.record["index"] = index
        self.record["mask-public"] = mask_public
        self.record["channel-public"] = json.dumps(
            {str(k): v.hex() for k, v in channel_public.items()}
        )
        own = bytearray()
        outgoing: dict[int, bytearray] = {
            peer: bytearray() for peer in participants if peer != node
        }
        private_masks = bytes(self.record["mask-private"])  # type: ignore[arg-type]
        seeds = bytes(self.record["self-masks"])  # type: ignore[arg-type]
        channel = bytes(self.record["channel"])  # type: ignore[arg-type]
        keys = {
            peer: agree(
                channel, channel_public[peer], info=_pair_info(_CHANNEL, self.nonce, node, peer)
            )
            for peer in outgoing
        }
        for slot in range(rounds):
            b_shares = share(
                seeds[16 * slot : 16 * slot + 16], threshold=threshold, parties=len(participants)
            )
            s_shares = share(
                private_masks[KEY_BYTES * slot : KEY_BYTES * (slot + 1)],
                threshold=threshold,
                parties=len(participants),
            )
            for position, peer in enumerate(participants):
                payload = b_shares[position] + s_shares[position]
                if peer == node:
                    own += payload
                    continue
                outgoing[peer] += seal_share(
                    keys[peer],
                    payload,
                    round_=self.first + slot,
                    sender=index,
                    receiver=position + 1,
                    aad=self.nonce,
                )
        self.record[f"from-{node}"] = bytes(own)
        state[STATE] = self.record
        return {f"to-{peer}": bytes(blob) for peer, blob in outgoing.items()}

    def receive(self, query: Mapping[str, Any], node: int, state: Any) -> dict[str, Any]:
        rounds = self.last - self.first + 1
        channel = bytes(self.record["channel"])  # type: ignore[arg-type]
        publics = {
            int(k): bytes.fromhex(v)
            for k, v in json.loads(str(self.record["channel-public"])).items()
        }
        failed = []
        for position, sender in enumerate(self.participants):
            if sender == node:
                continue
            blob = query.get(f"from-{sender}")
            key = agree(
                channel, publics[sender], info=_pair_info(_CHANNEL, self.nonce, node, sender)
            )
            try:
                if not isinstance(blob, bytes) or len(blob) != rounds * _SEALED:
                    raise ValueError("missing or mis-sized")
                plain = b"".join(
                    open_share(
                        key,
                        blob[_SEALED * slot : _SEALED * (slot + 1)],
                        round_=self.first + slot,
                        sender=position + 1,
                        receiver=self.index,
                        aad=self.nonce,
                    )
                    for slot in range(rounds)
                )
            except Exception:  # a forged, altered or missing blob: that sender is unusable
                failed.append(sender)
                continue
            self.record[f"from-{sender}"] = plain
        self.record["ready"] = not failed
        state[STATE] = self.record
        return {"failed": json.dumps(failed)}

    def share_of(self, sender: int, round_: int) -> tuple[bytes, bytes]:
        """My shares of ``sender``'s self-mask seed and mask private key for ``round_``."""
        blob = self.record.get(f"from-{sender}")
        if not isinstance(blob, bytes):
            raise FedprivError(f"secure aggregation: no shares from node {sender}")
        start = 48 * self._slot(round_)
        return blob[start : start + 16], blob[start + 16 : start + 48]

    def masked(self, state: Any) -> dict[str, list[int]]:
        """The rounds this hospital has masked an update for: ``{"one": [...], "two":
        [...]}`` (one-exchange rounds, whose secrets are never revealed; the others)."""
        return dict(json.loads(str(self.record.get("masked", '{"one": [], "two": []}'))))

    def mark_masked(self, state: Any, round_: int, *, one_exchange: bool) -> None:
        """Records that this hospital masks an update for ``round_``; refused for a round
        it has masked before (two vectors under one round's masks differ by the difference
        of the updates, which no mask hides)."""
        done = self.masked(state)
        if round_ in done.get("one", []) + done.get("two", []):
            raise FedprivError(
                f"secure aggregation: round {round_} was already masked by this hospital; "
                "a second masked vector under the same keys is refused"
            )
        done.setdefault("one" if one_exchange else "two", []).append(round_)
        self.record["masked"] = json.dumps(done)
        state[STATE] = self.record

    def answered(self, state: Any) -> dict[str, Any]:
        return dict(json.loads(str(self.record.get("answered", "{}"))))

    def remember(self, state: Any, answered: Mapping[str, Any]) -> None:
        self.record["answered"] = json.dumps(answered)
        state[STATE] = self.record


def _expand(seed16: bytes) -> bytes:
    """A 32-byte ChaCha20 key from a 16-byte self-mask seed (HKDF)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(
        algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=b"fedpriv self mask"
    ).derive(seed16)


def _public_key(
    record: Any,
    peer: int,
    slot: int,
    participants: Sequence[int],
    rounds: int,
    *,
    key: str = "mask-public",
) -> bytes:
    blob = bytes(record.get(key, b""))
    if not blob:
        raise FedprivError("secure aggregation: the setup published no one-exchange mask keys")
    position = participants.index(peer)
    start = KEY_BYTES * (position * rounds + slot)
    return blob[start : start + KEY_BYTES]


# ---- the server -----------------------------------------------------------------------------


class SecAggServer(ServerSide):
    """Collects masked vectors; on the evaluation exchange, gathers shares and unmasks.

    It never holds a hospital's vector unmasked: only the masked ones, the shares it is
    given, and the sum over the survivors."""

    def __init__(
        self,
        *,
        limits: Limits,
        threshold: int,
        bound: float,
        max_norm: float,
        client_dp: tuple[float, float] | None,
        weight_unit: float,
        noise: tuple[int, float] | None = None,
        one_exchange: bool = True,
    ) -> None:
        super().__init__()
        #: one-exchange rounds allowed (``secagg-one-exchange``): while every hospital
        #: answers, a round is masked without self masks and unmasked by its own sum; a round
        #: someone misses is discarded and two-exchange rounds follow until enough in a row
        #: complete with nobody missing (:meth:`_needed`)
        self.one_exchange = one_exchange
        self._clean = CLEAN_ROUNDS  # whole two-exchange rounds in a row (enough at the start)
        self._discarded = 0  # one-exchange rounds discarded so far
        #: whether the next round needs its evaluation exchange to finish (two exchanges)
        self.completes_on_evaluate = not one_exchange
        #: distributed noise: (colluders asked for, -1 for the default; rho), or None
        self.noise = noise
        self.colluders = -1
        self.limits = limits
        self.requested_threshold = threshold
        self.threshold = threshold
        self.bound = bound
        self.max_norm = max_norm
        self.client_dp = client_dp
        self.weight_unit = weight_unit
        self.nonce = b""
        self.participants: list[int] = []
        self.names: dict[int, str] = {}
        self.mask_public: dict[int, bytes] = {}
        self.first = self.last = 0
        self._round: dict[str, Any] = {}
        self.failure = ""

    # -- setup ------------------------------------------------------------------------------

    def setup(
        self,
        grid: Any,
        nodes: Sequence[int],
        send: Callable[..., Any],
        early: Mapping[int, tuple[str, Mapping[str, Any]]] | None = None,
        early_query: Mapping[str, Any] | None = None,
    ) -> None:
        """The three setup exchanges; ``send(kind, {node: content})`` returns
        ``{node: (hospital name, reply record)}`` for the nodes that answered. ``early``:
        the key answers that rode on the deployment's schema query (``early_query``, from
        :func:`keys_query`), used when every one of ``nodes`` gave one for this run's rounds
        (then the key exchange is skipped)."""
        keys = _early_keys(early, early_query, nodes, [self.first, self.last])
        if keys is not None:
            self.nonce = bytes.fromhex(str(early_query["nonce"]))  # type: ignore[index]
            logger.info("secure aggregation: the hospitals' keys came with their schemas")
        else:
            self.nonce = secrets.token_bytes(16)
            content = {"nonce": self.nonce.hex(), "rounds": [self.first, self.last]}
            keys = send(QUERY_KEYS, {n: content for n in nodes})
        self.participants = sorted(keys)
        count = len(self.participants)
        self.threshold = self.requested_threshold or count // 2 + 1
        if count < 2 or not 2 <= self.threshold <= count:
            raise FedprivError(
                f"secure aggregation needs at least 2 hospitals and a threshold between 2 and "
                f"their number: {count} answered, threshold {self.threshold}"
            )
        if self.noise is not None:
            requested, _ = self.noise
            self.colluders = (
                requested if requested >= 0 else default_colluders(count, self.threshold)
            )
            if self.colluders >= self.threshold:
                raise FedprivError(
                    f"distributed noise: noise-colluders {self.colluders} is not below the "
                    f"secure-aggregation threshold {self.threshold}"
                )
        self.names = {n: name for n, (name, _) in keys.items()}
        self.mask_public = {n: bytes(record["mask-public"]) for n, (_, record) in keys.items()}
        common = {
            "nonce": self.nonce.hex(),
            "participants": self.participants,
            "threshold": self.threshold,
            "channel": {str(n): bytes(keys[n][1]["channel"]).hex() for n in self.participants},
            "mask": {str(n): self.mask_public[n].hex() for n in self.participants},
        }
        once = {n: bytes(record.get("one-public", b"")) for n, (_, record) in keys.items()}
        if all(once.values()):
            common["one"] = {str(n): once[n].hex() for n in self.participants}
        elif self.one_exchange:  # a hospital on an older fedpriv: it has no one-exchange keys
            logger.warning(
                "secure aggregation: %s published no one-exchange mask keys: every round "
                "takes two exchanges",
                ", ".join(self.names[n] for n in self.participants if not once[n]),
            )
            self.one_exchange, self.completes_on_evaluate = False, True
        shares = send(QUERY_SHARES, {n: common for n in self.participants})
        missing = sorted(set(self.participants) - set(shares))
        if missing:
            raise FedprivError(
                f"secure aggregation setup: nodes {missing} did not send their shares"
            )
        deliveries = {
            receiver: {
                "nonce": self.nonce.hex(),
                **{
                    f"from-{sender}": bytes(shares[sender][1][f"to-{receiver}"])
                    for sender in self.participants
                    if sender != receiver
                },
            }
            for receiver in self.participants
        }
        acks = send(QUERY_DELIVER, deliveries)
        bad = {
            n: json.loads(str(record["failed"]))
            for n, (_, record) in acks.items()
            if json.loads(str(record["failed"]))
        }
        if bad or len(acks) != count:
            raise FedprivError(f"secure aggregation setup failed: shares not verified {bad}")
        logger.info(
            "secure aggregation set up: %d hospitals, threshold %d, rounds %d-%d",
            count,
            self.threshold,
            self.first,
            self.last,
        )
        if self.noise is not None:
            honest = self.threshold - self.colluders
            self.stats.update({"noise_colluders": self.colluders, "noise_honest_shares": honest})
            logger.info(
                "distributed noise: each hospital adds 1/sqrt(%d) of its DP-SGD noise, assuming "
                "at most %d hospitals collude with the server%s",
                honest,
                self.colluders,
                " (no gain: raise secagg-threshold or lower noise-colluders)"
                if honest == 1
                else "",
            )

    def round_extra(self, sampled: Sequence[int]) -> dict[str, Any]:
        participants = sorted(n for n in sampled if n in self.participants)
        return {
            PARTICIPANTS: json.dumps(participants),
            SELF_MASKS: self.completes_on_evaluate,
            "threshold": self.threshold,
            "bound": self.bound,
            "max-norm": self.max_norm,
            "weight-unit": self.weight_unit,
            **(
                {NOISE_COLLUDERS: self.colluders, NOISE_SCALE: self.noise[1]}
                if self.noise is not None
                else {}
            ),
        }

    # -- a round ----------------------------------------------------------------------------

    def aggregate(
        self,
        contributions: Sequence[Contribution],
        *,
        reference: ArrayRecord | None = None,
        gradient: bool = False,
        server_round: int = 0,
    ) -> ArrayRecord | None:
        """Keeps the masked vectors; the model follows from :meth:`complete`."""
        self.rejected = []
        if reference is None:
            raise ValueError("the global model the hospitals started from is needed")
        size = sum(int(np.prod(v.numpy().shape)) for v in reference.values()) + 1
        vectors: dict[int, np.ndarray] = {}
        counts: dict[int, int] = {}
        for c in contributions:
            try:
                count = check_count(c.hospital, c.num_examples, self.limits)
                if list(c.arrays.keys()) != [MASKED]:
                    raise Rejected(f"unexpected arrays {sorted(c.arrays.keys())}")
                vector = c.arrays[MASKED].numpy()
                if vector.dtype != np.uint32 or vector.shape != (size,):
                    raise Rejected(
                        f"masked vector is {vector.dtype}{vector.shape}, expected uint32({size},)"
                    )
                if c.node not in self.participants:
                    raise Rejected("not among the hospitals that set up secure aggregation")
            except Rejected as why:
                self.reject(c.hospital, str(why))
                continue
            vectors[c.node], counts[c.node] = vector, count
        self._round = {
            "round": server_round,
            "vectors": vectors,
            "counts": counts,
            "reference": reference,
            "expected": self._round.get("expected", []),
        }
        if self.completes_on_evaluate:
            return None  # the evaluation exchange brings the shares: complete()
        # one exchange: the pairwise masks cancel in the sum only if every hospital the
        # round was masked for is in it; nothing else is ever revealed to remove them
        self.stats["exchanges"] = 1
        missing = sorted(set(self._round["expected"]) - set(vectors))
        if missing:
            refused = {name for name, _ in self.rejected}
            self.failure = (
                f"nodes {missing} sent no usable masked update"
                + (f" ({', '.join(sorted(refused))} refused)" if refused else "")
                + ": in a one-exchange round their masks cannot be removed; the round's "
                f"updates stay masked and are discarded, and the next rounds take two "
                f"exchanges (recoverable) until {self._needed(self._discarded + 1)} in a row "
                "complete"
            )
            self.stats.update({"survivors": len(vectors), "dropped": len(missing)})
            self._discarded += 1
            self._clean = 0
            self.completes_on_evaluate = True
            return None
        total = np.zeros(size, dtype=np.uint32)
        for vector in vectors.values():
            total += vector
        return self._finish(
            total, survivors=sorted(vectors), dropped=[], started=time.perf_counter()
        )

    @staticmethod
    def _needed(discarded: int) -> int:
        """Whole two-exchange rounds in a row asked for after ``discarded`` one-exchange
        rounds were: CLEAN_ROUNDS after the first, doubled after each further one."""
        return CLEAN_ROUNDS << min(max(discarded - 1, 0), 10)

    def expect(self, sampled: Sequence[int]) -> None:
        self.failure = ""
        self._round = {"expected": sorted(n for n in sampled if n in self.participants)}

    def evaluate_extra(self) -> dict[str, Any]:
        survivors = sorted(self._round.get("vectors", {}))
        dropped = sorted(set(self._round.get("expected", [])) - set(survivors))
        return {
            UNMASK: json.dumps(
                {"round": self._round.get("round", 0), "survivors": survivors, "dropped": dropped}
            )
        }

    def complete(self, replies: Mapping[int, Mapping[str, Any]]) -> ArrayRecord | None:
        """The new global model from the unmasking replies ``{node: reply record}``;
        ``None`` (and ``failure`` says why) when the round cannot be unmasked."""
        self.stats["exchanges"] = 2
        model = self._unmask(replies)
        # one-exchange rounds resume after enough rounds in a row with nobody missing
        expected = set(self._round.get("expected", []))
        whole = model is not None and expected <= set(self._round.get("vectors", {}))
        self._clean = self._clean + 1 if whole else 0
        self.completes_on_evaluate = not (
            self.one_exchange and self._clean >= self._needed(self._discarded)
        )
        return model

    def _unmask(self, replies: Mapping[int, Mapping[str, Any]]) -> ArrayRecord | None:
        started = time.perf_counter()
        self.failure = ""
        state = self._round
        vectors: dict[int, np.ndarray] = state.get("vectors", {})
        survivors = sorted(vectors)
        dropped = sorted(set(state.get("expected", [])) - set(survivors))
        round_ = int(state.get("round", 0))
        if len(survivors) < self.threshold:
            self.failure = (
                f"only {len(survivors)} masked updates, fewer than the threshold {self.threshold}: "
                "the round's updates stay masked and are discarded"
            )
            return None
        total = np.zeros(next(iter(vectors.values())).shape, dtype=np.uint32)
        for vector in vectors.values():
            total += vector
        try:
            for u in survivors:
                seed = self._combine(replies, f"b-{u}")
                total -= prg_uint32(_expand(seed), total.size)
            for u in dropped:
                private = self._combine(replies, f"s-{u}")
                for v in survivors:
                    public = self._public(v, round_)
                    mask = prg_uint32(
                        agree(private, public, info=_pair_info(_MASK, self.nonce, u, v, round_)),
                        total.size,
                    )
                    # v added +mask if v < u, -mask otherwise: take v's term back out
                    if v < u:
                        total -= mask
                    else:
                        total += mask
        except FedprivError as exc:
            self.failure = str(exc)
            return None
        return self._finish(total, survivors=survivors, dropped=dropped, started=started)

    def _finish(
        self, total: np.ndarray, *, survivors: list[int], dropped: list[int], started: float
    ) -> ArrayRecord | None:
        """The model from the round's unmasked sum, once it passes the sum-level checks
        (the weight against the claimed counts, the norm against the range)."""
        state = self._round
        vectors: dict[int, np.ndarray] = state["vectors"]
        quantizer = Quantizer(bound=self.bound, parties=len(state.get("expected", survivors)))
        summed = quantizer.decode(total)
        weight = float(summed[-1])
        counts = state["counts"]
        if self.client_dp is None:
            claimed = sum(counts.values()) / self.weight_unit
        else:
            claimed = float(len(survivors))
        if abs(weight - claimed) > len(survivors) * quantizer.step * 2 + 1e-9:
            self.failure = (
                f"the masked weights add up to {weight:.6g}, the claimed example counts to "
                f"{claimed:.6g}: a hospital misreported its count; the round is discarded"
            )
            return None
        mean = summed[:-1] / weight
        norm = float(np.linalg.norm(mean))
        limit = self.max_norm
        if self.client_dp is not None:  # plus the noise: its norm concentrates at sigma sqrt(d)
            clip, z = self.client_dp
            sigma = z * clip * math.sqrt(len(survivors) / self.threshold) / len(survivors)
            limit += sigma * (math.sqrt(mean.size) + 6.0)
        if not math.isfinite(norm) or norm > limit * (1 + 1e-6):
            self.failure = (
                f"the aggregate update's norm {norm:.4g} exceeds what honest hospitals can "
                f"send ({limit:.4g}): a hospital sent garbage; the round is discarded"
            )
            return None
        reference: ArrayRecord = state["reference"]
        out: dict[str, Array] = {}
        offset = 0
        for name, array in reference.items():
            value = array.numpy()
            count = int(np.prod(value.shape))
            step = mean[offset : offset + count].reshape(value.shape)
            out[name] = Array(np.asarray(value.astype(np.float64) + step, dtype=value.dtype))
            offset += count
        self.stats.update(
            {
                "survivors": len(survivors),
                "dropped": len(dropped),
                "threshold": self.threshold,
                "quantisation_step": quantizer.step,
                "unmask_seconds": time.perf_counter() - started,
                "bytes_in": sum(int(v.nbytes) for v in vectors.values()),
            }
        )
        return ArrayRecord(out)

    def _combine(self, replies: Mapping[int, Mapping[str, Any]], key: str) -> bytes:
        shares = {
            int(record["index"]): bytes(record[key])
            for record in replies.values()
            if key in record and isinstance(record.get(key), bytes)
        }
        if len(shares) < self.threshold:
            raise FedprivError(
                f"only {len(shares)} hospitals returned their share of {key}, fewer than the "
                f"threshold {self.threshold}: the round cannot be unmasked and is discarded"
            )
        chosen = dict(sorted(shares.items())[: self.threshold])
        return combine(chosen)

    def _public(self, node: int, round_: int) -> bytes:
        slot = round_ - self.first
        blob = self.mask_public[node]
        return blob[KEY_BYTES * slot : KEY_BYTES * (slot + 1)]


def keys_query(first: int, last: int) -> dict[str, Any]:
    """The content of the setup's key query for rounds ``first..last``, made before the
    server side exists: a deployment sends it with its schema query, one exchange fewer."""
    return {"nonce": secrets.token_bytes(16).hex(), "rounds": [first, last]}


def _early_keys(
    early: Mapping[int, tuple[str, Mapping[str, Any]]] | None,
    query: Mapping[str, Any] | None,
    nodes: Sequence[int],
    rounds: list[int],
) -> dict[int, tuple[str, Mapping[str, Any]]] | None:
    """The early key answers if they cover ``nodes`` for ``rounds``; otherwise None (the
    key exchange runs as usual: e.g. a hospital that connected after the schema query)."""
    if not early or query is None or list(query.get("rounds", [])) != rounds:
        return None
    if not set(nodes) <= set(early):
        return None
    return {n: early[n] for n in nodes}


# ---- construction ---------------------------------------------------------------------------


def _client_dp(config: Any) -> tuple[float, float] | None:
    if config.client_level_dp:
        return (config.client_clip_norm, config.client_noise_multiplier)
    return None


#: the range when nothing bounds an update (no DP-SGD at the hospitals) and the user set none
UNBOUNDED_MAX_NORM = 10.0


def max_norm(
    config: Any,
    *,
    declared: Mapping[str, int],
    parameters: int,
    patients: Mapping[str, int] | None = None,
) -> tuple[float, str]:
    """The largest update norm a hospital may send under secure aggregation without
    client-level DP, and where it comes from.

    The range does two jobs. It makes the fixed-point sum exact (:class:`Quantizer`: the
    step is ``parties * range / (2^31 - 1)``). And, since the server cannot see any single
    update, it is all that limits how far a lying hospital can move the model: the server
    discards a round whose aggregate's norm exceeds it, so one round moves the model by at
    most the range, whoever lies. Too small, honest DP-SGD updates (mostly noise: with lr 1.0
    and 4 local epochs 10.4-10.9 on breast-cancer) do not fit; too large, a liar gets more
    room and the sum less precision. So:

    - ``secagg-max-norm`` set: that value (``"set"``).
    - 0 under DP-SGD (the default): the largest honest update any declared hospital can
      produce with the run's settings, with probability 1 - 1e-9 a round
      (:mod:`fedpriv.privacy.update_norm`; ``"derived"``): nobody honest is clipped, and a
      liar can do no more than an honest hospital could. A hospital trains its declared
      ``patients`` (one per record when it declared none); hospitals declared with fewer
      than ``min-patients`` patients, or with counts that cannot be, are left out. A
      hospital whose own bound is larger (some patients left out for budget, or merged by
      its ledger) scales its update down to the range, recorded.
    - 0 without DP-SGD: nothing bounds an update; ``UNBOUNDED_MAX_NORM`` (``"fixed"``).
    """
    if config.secagg_max_norm > 0:
        return float(config.secagg_max_norm), "set"
    bounds = []
    patients = patients or {}
    for name, records in declared.items():
        size = usable_size(records, patients.get(name, records))
        if size is None or size[1] < config.min_patients:  # no say in the range (a liar
            continue  # claiming a tiny hospital would widen it for everyone)
        try:
            bound = run_update_bound(config, units=size[1], parameters=parameters)
        except ConfigError:  # this hospital cannot train at all; it says why itself
            continue
        if bound is not None:
            bounds.append(bound.total)
    if not bounds:
        return UNBOUNDED_MAX_NORM, "fixed"
    return max(bounds), "derived"


def _bound(config: Any, max_norm: float) -> float:
    """The per-value range of what a hospital masks, from the clipping settings: under
    client-level DP its clipped update (norm at most S) plus its noise share (8 standard
    deviations); otherwise updates of norm up to ``max_norm``. The weight (count over the
    weight unit, or 1) is at most 1."""
    dp = _client_dp(config)
    if dp is not None:
        clip, z = dp
        return max(1.0, clip + 8.0 * z * clip)
    return max(1.0, max_norm)


def _server(
    config: Any, *, limits: Limits, weight_unit: float = 0.0, length: int = 0, **_: Any
) -> SecAggServer:
    dp = _client_dp(config)
    if dp is not None:
        limit, source = dp[0], "client-clip-norm"
    else:
        limit, source = max_norm(
            config, declared=limits.declared, parameters=length, patients=limits.patients
        )
    server = SecAggServer(
        limits=limits,
        threshold=config.secagg_threshold,
        bound=_bound(config, limit),
        max_norm=limit,
        client_dp=dp,
        weight_unit=weight_unit or float(limits.max_examples),
        noise=(config.noise_colluders, noise_scale(config, limits.declared, limits.patients))
        if config.distributed_noise
        else None,
        one_exchange=config.secagg_one_exchange,
    )
    server.stats.update({"max_norm": limit, "max_norm_from": source})
    if source == "derived":
        logger.info(
            "secure aggregation: updates of norm up to %.4g (derived from the run's DP-SGD "
            "settings and the hospitals' sizes), fixed-point step %.3g",
            limit,
            Quantizer(bound=_bound(config, limit), parties=max(1, len(limits.declared))).step,
        )
    return server


def _hospital(config: Any, node_config: Any) -> SecAggHospital:
    # the range comes with every round's order (the server's, one for all); this is the
    # hospital's own reading of the settings, for an order that carries none
    limit = config.secagg_max_norm or UNBOUNDED_MAX_NORM
    return SecAggHospital(
        bound=_bound(config, limit),
        max_norm=limit,
        client_dp=_client_dp(config),
        distributed_noise=config.distributed_noise,
        colluders=config.noise_colluders,
    )


SECAGG = register_protocol(
    Protocol(
        name="secagg",
        server=_server,
        hospital=_hospital,
        summary="pairwise-masked sums: no key the server or a minority of hospitals can open",
    )
)
