"""argon2id for passwords and API key secrets.

Parameters are OWASP's argon2id minimum (19 MiB, t=2, p=1), about 30 ms here, rather than
argon2-cffi's default (64 MiB, t=3, p=4), about 190 ms and four threads: under gevent a hash
blocks the worker's hub, and p=4 would also take every core. `needs_rehash` lets a login upgrade
old hashes if these parameters change.
"""

from __future__ import annotations

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

_hasher = PasswordHasher(time_cost=2, memory_cost=19 * 1024, parallelism=1)
# Verified against when a username does not exist, so a miss costs as much as a wrong password.
_DUMMY_HASH = _hasher.hash("no-such-user")


def hash_secret(secret: str) -> str:
    return _hasher.hash(secret)


def verify_secret(stored_hash: str | None, secret: str) -> bool:
    try:
        return _hasher.verify(stored_hash or _DUMMY_HASH, secret) and stored_hash is not None
    except (VerificationError, InvalidHashError):
        return False


def needs_rehash(stored_hash: str) -> bool:
    return _hasher.check_needs_rehash(stored_hash)
