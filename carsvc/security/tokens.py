"""Bearer tokens: reading them from files and the environment, and checking a
presented token against a set in constant time. No grpc imports.

A token file holds one token per line; blank lines and lines whose first
non-blank character is `#` are ignored. A token is printable ASCII without
spaces (it travels as gRPC metadata). Tokens are never logged or echoed in
error messages: a bad line is named by its number.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

__all__ = ["TokenSet", "check_token", "parse_token_file", "parse_token_list", "read_token_file"]

# Tokens shorter than this are accepted but reported at startup (see
# carsvc.security.server): a short shared secret is easy to guess.
SHORT_TOKEN = 16


def check_token(token: str, where: str = "token") -> str:
    """`token` if it can travel as a bearer token; ValueError naming `where`
    (never echoing the token) otherwise."""
    if not token or not token.isascii() or not token.isprintable() or any(c.isspace() for c in token):
        raise ValueError(f"{where} is not a valid token: tokens are printable ASCII without spaces")
    return token


def parse_token_file(text: str, source: str) -> list[str]:
    """The tokens in a token file's text; `source` names the file in errors."""
    tokens = []
    for number, line in enumerate(text.splitlines(), 1):
        token = line.strip()
        if token and not token.startswith("#"):
            tokens.append(check_token(token, f"{source} line {number}"))
    return tokens


def parse_token_list(value: str, source: str) -> list[str]:
    """The tokens of a comma-separated list (an environment variable)."""
    tokens = []
    for number, item in enumerate(value.split(","), 1):
        token = item.strip()
        if token:
            tokens.append(check_token(token, f"{source} entry {number}"))
    return tokens


def read_token_file(path: str, setting: str) -> list[str]:
    """Reads a token file; an unreadable file or one without a token is a
    ValueError naming `setting` and the path."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as err:
        raise ValueError(f"{setting} {path!r} cannot be read: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{setting} {path!r} is not a UTF-8 text file") from None
    tokens = parse_token_file(text, f"{setting} {path!r}")
    if not tokens:
        raise ValueError(f"{setting} {path!r} holds no token (one token per line, # starts a comment)")
    return tokens


def _digest(token: str | bytes) -> bytes:
    data = token.encode("utf-8", "surrogateescape") if isinstance(token, str) else token
    return hashlib.sha256(data).digest()


class TokenSet:
    """The tokens of one scope. Only their SHA-256 digests are kept, and a check
    compares the presented token's digest with every one of them using
    hmac.compare_digest, so its time depends neither on which token matched nor
    on how long the tokens are."""

    __slots__ = ("_digests",)

    def __init__(self, tokens: Iterable[str] = ()) -> None:
        self._digests = tuple(dict.fromkeys(_digest(t) for t in tokens))

    def __len__(self) -> int:
        return len(self._digests)

    def __bool__(self) -> bool:
        return bool(self._digests)

    def __repr__(self) -> str:
        return f"TokenSet(<{len(self._digests)} token(s)>)"

    def contains(self, token: str | bytes) -> bool:
        presented = _digest(token)
        found = False
        for digest in self._digests:
            found |= hmac.compare_digest(presented, digest)
        return found

    def overlaps(self, other: TokenSet) -> bool:
        return not set(self._digests).isdisjoint(other._digests)
