"""argon2id for passwords; HMAC-SHA256 under a server-side pepper for API key secrets.

Passwords are chosen by people, so they are guessable: they get argon2id, a deliberately slow hash.
Parameters are OWASP's argon2id minimum (19 MiB, t=2, p=1), about 30 ms here, rather than
argon2-cffi's default (64 MiB, t=3, p=4), about 190 ms and four threads: under gevent a hash
blocks the worker's hub, and p=4 would also take every core. `needs_rehash` lets a login upgrade
old hashes if these parameters change.

API key secrets are 256 random bits (`secrets.token_urlsafe(32)`): nobody can enumerate them, so a
slow hash buys nothing against a stolen table and costs 30 ms of CPU per verification. They are
stored as `hmac-sha256$<pepper id>$<hex digest>`, the HMAC-SHA256 of the secret under the pepper,
a server-side secret that never enters the database (API_KEY_PEPPER, or derived from SECRET_KEY).
A stolen table without the pepper gives nothing to test guesses against; with it, a guess still
has to hit 2^256. Verification is about a microsecond and compared with `hmac.compare_digest`.

The pepper id (the first 8 hex digits of SHA-256 over the pepper) names which pepper made a hash,
so rotation needs no guessing: API_KEY_PEPPERS_PREVIOUS lists retired peppers that still verify,
and a key verified under one is rehashed under the current pepper on its next use. Keys hashed
with argon2 before this scheme verify with argon2 once and are rehashed the same way.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

_hasher = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)
# Verified against when a username does not exist, so a miss costs as much as a wrong password.
_DUMMY_HASH = _hasher.hash("no-such-user")

KEY_SCHEME = "hmac-sha256"


def hash_secret(secret: str) -> str:
    return _hasher.hash(secret)


def verify_secret(stored_hash: str | None, secret: str) -> bool:
    try:
        return _hasher.verify(stored_hash or _DUMMY_HASH, secret) and stored_hash is not None
    except (VerificationError, InvalidHashError):
        return False


def needs_rehash(stored_hash: str) -> bool:
    return _hasher.check_needs_rehash(stored_hash)


def pepper_id(pepper: str) -> str:
    return hashlib.sha256(pepper.encode()).hexdigest()[:8]


class KeyHasher:
    """HMAC-SHA256 of API key secrets under the current pepper; retired peppers still verify."""

    def __init__(self, pepper: str, previous: Iterable[str] = ()) -> None:
        if not pepper:
            raise ValueError("the API key pepper must not be empty")
        self._current = pepper_id(pepper)
        self._peppers = {pepper_id(p): p.encode() for p in (*previous, pepper) if p}

    def hash(self, secret: str) -> str:
        return self._hash(self._current, secret)

    def _hash(self, kid: str, secret: str) -> str:
        digest = hmac.new(self._peppers[kid], secret.encode(), hashlib.sha256).hexdigest()
        return f"{KEY_SCHEME}${kid}${digest}"

    @staticmethod
    def is_hmac(stored_hash: str) -> bool:
        return stored_hash.startswith(KEY_SCHEME + "$")

    def verify(self, stored_hash: str, secret: str) -> bool:
        """An HMAC hash under a pepper this server knows; False for anything else."""
        _, _, rest = stored_hash.partition("$")
        kid, _, _ = rest.partition("$")
        if not self.is_hmac(stored_hash) or kid not in self._peppers:
            return False
        return hmac.compare_digest(self._hash(kid, secret), stored_hash)

    def is_current(self, stored_hash: str) -> bool:
        """Whether the hash is already under the current pepper (else: rehash it on success)."""
        return stored_hash.startswith(f"{KEY_SCHEME}${self._current}$")
