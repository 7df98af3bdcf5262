"""Edge context policy: which env a client may ask for.

- `open`: any valid env name is honoured.
- `allow-list`: only the envs in --context-allow (and the default env).
- `signed`: an env other than the default needs a token for it, minted with the shared key
  (`stax token`), in `x-stax-env-token` or cookie `stax-env-token`.
Envs marked `private: true` in the graph always need a valid token, whatever the policy.

Token: `<env>.<expiry unix seconds>.<hex HMAC-SHA256(key, "<env>.<expiry>")>`.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from typing import Final

from resolver.errors import Forbidden

from ..request import Request
from .context import cookie_value

_NONE: Final[frozenset[str]] = frozenset()  # the private envs while no graph is loaded


def mint_token(key: bytes, env: str, ttl_s: int, *, now: float | None = None) -> str:
    expiry = int((now if now is not None else time.time()) + ttl_s)
    msg = f"{env}.{expiry}".encode()
    return f"{env}.{expiry}.{hmac.new(key, msg, hashlib.sha256).hexdigest()}"


def token_error(key: bytes | None, token: bytes | None, env: str | None) -> str | None:
    """None when `token` is valid for `env`, else the reason."""
    if key is None:
        return "no env token key is configured at this gateway"
    if not token:
        return f"env {env!r} needs a signed env token (x-stax-env-token or cookie stax-env-token)"
    try:
        t_env, expiry, mac = token.decode("ascii").rsplit(".", 2)
        expiry_i = int(expiry)
    except (UnicodeDecodeError, ValueError):
        return "malformed env token"
    want = hmac.new(key, f"{t_env}.{expiry}".encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(want, mac):
        return "env token signature does not match"
    if t_env != env:
        return f"env token is for {t_env!r}, not {env!r}"
    if expiry_i < time.time():
        return "env token has expired"
    return None


def make_policy(cell, *, policy: str, allow: frozenset, key: bytes | None, default_env):
    def context_policy(req: Request) -> None:
        env = req.env
        snap = cell.current
        private_envs = snap.graph.private_envs if snap is not None else _NONE
        # most graphs have none: then the env name (with 10,000 envs in rotation, memory no
        # other request touches) is not hashed here
        private = bool(private_envs) and env in private_envs
        if not private:
            if policy == "open" or env == default_env(req):
                return
            if policy == "allow-list":
                if env in allow:
                    return
                raise Forbidden(f"env {env!r} is not in this gateway's allow-list")
        token = req.header(b"x-stax-env-token") or cookie_value(req.h_cookie, b"stax-env-token")
        reason = token_error(key, token, env)
        if reason is not None:
            raise Forbidden(reason)

    return context_policy


def load_key(path: str | None) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as f:
        key = f.read().strip()
    if len(key) < 16:
        raise ValueError(f"{path}: env token key must be at least 16 bytes")
    return key
