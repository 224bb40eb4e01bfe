"""A per-user cache of the OpenStack token, so each ``python -m rollout`` run does not log in
to Keystone again (a rollback is then one process start and a few API calls).

What is cached is keystoneauth's own plugin state (``get_auth_state()``: the token and its
body: catalog, user, project, expiry), installed into the next run's plugin with
``set_auth_state()``; keystoneauth then uses it like a token it fetched itself, and when a
service rejects it (401: revoked) it invalidates it and logs in again, once.

* **Where**: ``$XDG_CACHE_HOME/modelserve/`` (else ``~/.cache/modelserve/``), directory 0700,
  one file 0600 per identity, ``os-token-<key>.json``. A file that is not a regular file of
  this user, or that others can read or write, is ignored (and replaced).
* **Checked with Keystone** (``GET /v3/auth/tokens``: one fast call, no password hashing)
  before use once ``RECHECK_S`` have passed since the file's token was issued or last
  checked; the answer also refreshes the catalog, and a token Keystone does not accept
  (revoked, or another Keystone behind the same URL) is dropped and the run logs in as usual.
  Within ``RECHECK_S`` (the rollback right after a deploy) the token is used unchecked: a
  service that rejects it (401) makes keystoneauth log in again, once, as above.
* **Key**: auth URL + user + user domain + project + project domain (+ auth type); never the
  password. The file does not contain the password either: it holds a salted scrypt
  verifier of it (or of the application credential secret), and a run whose password does
  not match it ignores the file, so a wrong password still fails (I10).
* **Lifetime**: reused until ``MARGIN_S`` before the token's expiry; an unreadable, corrupt,
  foreign or expired file is ignored. A run that ends with no valid token (its token was
  rejected and re-authentication failed) removes the file.
* **Opt-out**: ``MODELSERVE_OS_TOKEN_CACHE=0``.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import hmac
import json
import os
import secrets
import stat
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta, timezone
from pathlib import Path

ENV = "MODELSERVE_OS_TOKEN_CACHE"
MARGIN_S = 300.0  # a token is reused until this long before its expiry
RECHECK_S = 300.0  # a token issued or checked this recently is used without asking Keystone
VERSION = 1
_KEY_FIELDS = ("auth_url", "username", "user_id", "user_domain_name", "user_domain_id",
               "project_name", "project_id", "project_domain_name", "project_domain_id",
               "domain_name", "domain_id", "application_credential_id",
               "application_credential_name")
_SECRET_FIELDS = ("password", "application_credential_secret", "token")


def enabled(environ: Mapping[str, str] | None = None) -> bool:
    """On unless ``MODELSERVE_OS_TOKEN_CACHE`` is 0/false/no/off."""
    value = (environ if environ is not None else os.environ).get(ENV, "").strip().lower()
    return value not in ("0", "false", "no", "off")


def cache_dir(environ: Mapping[str, str] | None = None) -> Path:
    """``$XDG_CACHE_HOME/modelserve`` (an absolute XDG_CACHE_HOME), else ``~/.cache/modelserve``."""
    env = environ if environ is not None else os.environ
    xdg = env.get("XDG_CACHE_HOME", "").strip()
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path(env.get("HOME") or Path.home()) / ".cache"
    return base / "modelserve"


def cache_key(auth: Mapping[str, object], auth_type: str = "") -> str:
    """A stable name for an identity: auth URL (without a trailing /), user, project and their
    domains, auth type. The secret is not part of it."""
    ident = {k: str(auth[k]).rstrip("/") if k == "auth_url" else str(auth[k])
             for k in _KEY_FIELDS if auth.get(k) not in (None, "")}
    ident["auth_type"] = auth_type or ""
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]


def secret_of(auth: Mapping[str, object]) -> str | None:
    """The credential a cached token must be checked against (None: nothing to cache on)."""
    for k in _SECRET_FIELDS:
        if auth.get(k):
            return str(auth[k])
    return None


def verifier(secret: str, salt: bytes) -> str:
    """A salted, slow (scrypt) hash of the secret: proves the same password, reveals nothing."""
    return hashlib.scrypt(secret.encode(), salt=salt, n=2 ** 12, r=8, p=1, dklen=32).hex()


def expires_at(auth_state: str) -> datetime | None:
    """The expiry of a keystoneauth auth state (v3 ``token.expires_at``, v2
    ``access.token.expires``), None when it cannot be read."""
    try:
        body = json.loads(auth_state)["body"]
        text = (body["token"]["expires_at"] if "token" in body
                else body["access"]["token"]["expires"])
        when = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except (ValueError, TypeError, KeyError):
        return None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


class TokenCache:
    """The cache file of one identity."""

    def __init__(self, directory: Path, key: str, *, margin_s: float = MARGIN_S):
        self.directory, self.key, self.margin_s = directory, key, margin_s
        self.path = directory / f"os-token-{key}.json"
        self.checked_at: datetime | None = None  # of the state ``load`` returned last

    def recently_checked(self, *, now: datetime | None = None) -> bool:
        """True if the loaded token was issued or checked with Keystone < RECHECK_S ago."""
        now = now or datetime.now(timezone.utc)
        return (self.checked_at is not None
                and timedelta(0) <= now - self.checked_at < timedelta(seconds=RECHECK_S))

    def _read(self) -> dict | None:
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            return None
        with os.fdopen(fd, "rb") as fh:
            st = os.fstat(fh.fileno())
            if (not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid()
                    or st.st_mode & 0o077):
                return None  # not ours alone: never trusted
            try:
                data = json.loads(fh.read(1 << 20))
            except ValueError:
                return None
        return data if isinstance(data, dict) else None

    def load(self, secret: str, *, now: datetime | None = None) -> str | None:
        """The cached auth state, if the file is ours, for this key and this secret, and its
        token is valid for more than ``margin_s``; else None."""
        self.checked_at = None
        data = self._read()
        if not data or data.get("version") != VERSION or data.get("key") != self.key:
            return None
        state = data.get("auth_state")
        try:
            salt = bytes.fromhex(str(data.get("salt", "")))
        except ValueError:
            return None
        if not isinstance(state, str) or not salt or not hmac.compare_digest(
                str(data.get("verifier", "")), verifier(secret, salt)):
            return None
        end = expires_at(state)
        now = now or datetime.now(timezone.utc)
        if end is None or end - now <= timedelta(seconds=self.margin_s):
            return None
        try:
            self.checked_at = datetime.fromisoformat(str(data.get("checked_at")))
        except ValueError:
            self.checked_at = None  # never checked: ask Keystone
        return state

    def save(self, auth_state: str, secret: str, *, checked_at: datetime | None = None
             ) -> bool:
        """Write the state (atomically, 0600 in a 0700 directory), with when Keystone last
        vouched for it (``checked_at``, default now: a new login or a check); False if it
        has no readable expiry or the write failed (the cache is best effort)."""
        if expires_at(auth_state) is None:
            return False
        salt = secrets.token_bytes(16)
        when = checked_at or datetime.now(timezone.utc)
        data = {"version": VERSION, "key": self.key, "salt": salt.hex(),
                "verifier": verifier(secret, salt), "auth_state": auth_state,
                "checked_at": when.isoformat()}
        tmp = self.directory / f".os-token-{self.key}.{secrets.token_hex(4)}.tmp"
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                json.dump(data, fh)
            os.replace(tmp, self.path)
            return True
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
            return False

    def drop(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()


def validated(session, auth_url: str, auth_state: str, timeout: float = 5.0) -> str | None:
    """Ask Keystone (``GET /v3/auth/tokens``: no password hashing, one fast call) whether the
    cached token is still valid; its answer is the token's current body (catalog included),
    returned as a fresh auth state. None when it is not (revoked, another Keystone behind the
    same URL) or Keystone cannot be asked."""
    token = _token(auth_state)
    base = auth_url.rstrip("/")
    if not token or not base:
        return None
    if not base.endswith("/v3"):
        base += "/v3"
    try:
        resp = session.get(f"{base}/auth/tokens", authenticated=False, raise_exc=False,
                           timeout=timeout,
                           headers={"X-Auth-Token": token, "X-Subject-Token": token})
        body = resp.json() if resp.status_code == 200 else None
    except Exception:  # noqa: BLE001 - any failure: no cached token, a normal login
        return None
    if not isinstance(body, dict) or not isinstance(body.get("token"), dict):
        return None
    fresh = json.dumps({"auth_token": token, "body": body})
    return fresh if expires_at(fresh) is not None else None


def _token(state: str | None) -> str | None:
    try:
        return json.loads(state)["auth_token"] if state else None
    except (ValueError, TypeError, KeyError):
        return None


def attach(conn, environ: Mapping[str, str] | None = None,
           at_exit: Callable[[Callable[[], None]], object] = atexit.register,
           ) -> TokenCache | None:
    """Install a cached token into ``conn``'s (an openstacksdk Connection, not yet used)
    keystoneauth plugin, and save the plugin's state when the process ends if it changed
    (a new login); drop the file when the run ends without a valid token. None when the
    cache is off or the credentials have no secret to check a cached token against."""
    if not enabled(environ):
        return None
    region = conn.config
    auth = dict(region.get_auth_args() or {})
    secret = secret_of(auth)
    plugin = getattr(conn.session, "auth", None)
    if secret is None or plugin is None or not hasattr(plugin, "set_auth_state"):
        return None
    auth_type = str(region.config.get("auth_type") or "")
    cache = TokenCache(cache_dir(environ), cache_key(auth, auth_type))
    loaded = cache.load(secret)
    if loaded and not cache.recently_checked():
        loaded = validated(conn.session, str(auth.get("auth_url") or ""), loaded)
        if loaded is None:
            cache.drop()  # revoked, or another Keystone answers now: log in as usual
        else:
            cache.save(loaded, secret)  # checked now (and its catalog refreshed)
    if loaded:
        plugin.set_auth_state(loaded)

    def persist() -> None:
        try:
            state = plugin.get_auth_state()
        except Exception:  # noqa: BLE001 - the cache never fails a run
            return
        if state is None:
            if loaded:
                cache.drop()  # rejected, and the run could not log in again
        elif _token(state) != _token(loaded):
            cache.save(state, secret)

    at_exit(persist)
    return cache
