"""The OpenStack token cache (rollout/clouds/token_cache.py): keying, file mode, expiry, a
corrupt or foreign file ignored, the secret check, the opt-out; and, on a real openstacksdk
Connection (no network: nothing is sent before the first API call), that a cached token is
installed into keystoneauth's plugin and a new one saved / a rejected one dropped."""

from __future__ import annotations

import json
import os
import stat
import threading
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import pytest

from rollout.clouds import token_cache as tc

AUTH = {"auth_url": "http://keystone.example:5000/v3", "username": "alice",
        "user_domain_name": "Default", "project_name": "demo",
        "project_domain_name": "Default", "password": "s3cret-pw"}


def state(token: str = "tok-1", *, in_s: float = 3600, v2: bool = False) -> str:
    exp = (datetime.now(timezone.utc) + timedelta(seconds=in_s)).strftime(
        "%Y-%m-%dT%H:%M:%S.000000Z")
    if v2:
        return json.dumps({"auth_token": token,
                           "body": {"access": {"token": {"id": token, "expires": exp}}}})
    body = {"token": {"expires_at": exp, "methods": ["password"],
                      "user": {"id": "u1", "name": "alice",
                               "domain": {"id": "default", "name": "Default"}},
                      "project": {"id": "p1", "name": "demo",
                                  "domain": {"id": "default", "name": "Default"}},
                      "catalog": []}}
    return json.dumps({"auth_token": token, "body": body})


@pytest.fixture
def cache(tmp_path):
    return tc.TokenCache(tmp_path / "modelserve", tc.cache_key(AUTH, "password"))


def test_the_key_names_the_identity_not_the_secret():
    k = tc.cache_key(AUTH, "password")
    assert k == tc.cache_key({**AUTH, "auth_url": AUTH["auth_url"] + "/"}, "password")
    assert k == tc.cache_key({**AUTH, "password": "another"}, "password")
    for field, value in (("auth_url", "http://other:5000/v3"), ("username", "bob"),
                         ("project_name", "prod"), ("user_domain_name", "ldap")):
        assert tc.cache_key({**AUTH, field: value}, "password") != k, field
    assert tc.cache_key(AUTH, "v3applicationcredential") != k
    assert AUTH["password"] not in k


def test_saved_private_and_without_the_password(cache):
    assert cache.save(state(), AUTH["password"])
    assert stat.S_IMODE(cache.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(cache.directory.stat().st_mode) == 0o700
    assert AUTH["password"] not in cache.path.read_text()
    assert json.loads(cache.load(AUTH["password"]))["auth_token"] == "tok-1"
    assert not [p for p in cache.directory.iterdir() if p.name.endswith(".tmp")]


def test_another_password_does_not_get_the_cached_token(cache):
    cache.save(state(), AUTH["password"])
    assert cache.load("not-the-password") is None
    assert cache.load(AUTH["password"]) is not None


@pytest.mark.parametrize("in_s,usable", [(3600, True), (tc.MARGIN_S + 60, True),
                                         (tc.MARGIN_S - 60, False), (-10, False)])
def test_reused_until_shortly_before_expiry(cache, in_s, usable):
    cache.save(state(in_s=in_s), AUTH["password"])
    assert (cache.load(AUTH["password"]) is not None) is usable


def test_a_v2_token_expiry_is_read_too(cache):
    assert tc.expires_at(state(v2=True)) is not None
    cache.save(state(v2=True), AUTH["password"])
    assert cache.load(AUTH["password"]) is not None


@pytest.mark.parametrize("content", ["", "{not json", "[]", '{"version": 1}',
                                     '{"version": 99, "key": "x"}'])
def test_a_corrupt_file_is_ignored(cache, content):
    cache.directory.mkdir(mode=0o700)
    fd = os.open(cache.path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, content.encode())
    os.close(fd)
    assert cache.load(AUTH["password"]) is None
    assert cache.save(state("tok-2"), AUTH["password"])  # and replaced
    assert json.loads(cache.load(AUTH["password"]))["auth_token"] == "tok-2"


def test_a_tampered_file_is_ignored(cache):
    cache.save(state(), AUTH["password"])
    data = json.loads(cache.path.read_text())
    for field, value in (("key", "0" * 32), ("salt", "zz"), ("verifier", "00"),
                         ("auth_state", "{}")):
        cache.path.write_text(json.dumps({**data, field: value}))
        assert cache.load(AUTH["password"]) is None, field


def test_a_file_others_can_read_is_never_trusted(cache):
    cache.save(state(), AUTH["password"])
    os.chmod(cache.path, 0o644)
    assert cache.load(AUTH["password"]) is None
    os.chmod(cache.path, 0o600)
    assert cache.load(AUTH["password"]) is not None
    target = cache.path.with_name("elsewhere.json")
    cache.path.rename(target)
    cache.path.symlink_to(target)
    assert cache.load(AUTH["password"]) is None  # a symlink is not followed


def test_a_state_without_expiry_is_not_saved(cache):
    assert not cache.save(json.dumps({"auth_token": "t", "body": {}}), AUTH["password"])
    assert not cache.path.exists()


@pytest.mark.parametrize("value,on", [("", True), ("1", True), ("0", False), ("false", False),
                                      ("off", False), ("no", False)])
def test_opt_out(value, on):
    assert tc.enabled({tc.ENV: value} if value else {}) is on


def test_cache_dir_follows_xdg(tmp_path):
    assert tc.cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "modelserve"
    assert tc.cache_dir({"HOME": str(tmp_path)}) == tmp_path / ".cache" / "modelserve"
    assert tc.cache_dir({"HOME": str(tmp_path), "XDG_CACHE_HOME": "rel"}) == (
        tmp_path / ".cache" / "modelserve")


# -- on a real openstacksdk Connection and keystoneauth plugin, against a stand-in Keystone
# (real HTTP on loopback) that answers GET /v3/auth/tokens for the tokens it knows -----------
@pytest.fixture
def keystone():
    valid: set[str] = set()
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            tok = self.headers.get("X-Subject-Token", "")
            seen.append(self.path)
            if self.path == "/v3/auth/tokens" and tok in valid:
                out = json.loads(state(tok))["body"]
                out["token"]["catalog"] = [{"type": "network", "name": "neutron",
                                            "endpoints": []}]
                data, code = json.dumps(out).encode(), 200
            else:
                data, code = b'{"error": {"code": 404}}', 404
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield SimpleNamespace(url=f"http://127.0.0.1:{srv.server_address[1]}/v3", valid=valid,
                          seen=seen)
    srv.shutdown()
    srv.server_close()


def connection(keystone, password: str = AUTH["password"]):
    openstack = pytest.importorskip("openstack")
    return openstack.connect(**{**AUTH, "auth_url": keystone.url, "password": password},
                             load_yaml_config=False, load_envvars=False)


def test_attach_installs_the_cached_token_and_saves_a_new_one(tmp_path, keystone):
    env = {"XDG_CACHE_HOME": str(tmp_path)}
    hooks: list = []
    conn = connection(keystone)
    cache = tc.attach(conn, env, at_exit=hooks.append)
    assert cache is not None and conn.session.auth.get_auth_state() is None  # nothing cached
    conn.session.auth.set_auth_state(state("tok-new"))  # as if keystone answered a login
    hooks.pop()()
    assert json.loads(cache.load(AUTH["password"]))["auth_token"] == "tok-new"

    conn1 = connection(keystone)
    tc.attach(conn1, env, at_exit=hooks.append)
    assert conn1.session.auth.auth_ref.auth_token == "tok-new"  # no login needed ...
    assert keystone.seen == []  # ... nor a check: it was issued moments ago

    keystone.valid.add("tok-new")
    long_ago = datetime.now(timezone.utc) - timedelta(seconds=tc.RECHECK_S + 1)
    cache.save(state("tok-new"), AUTH["password"], checked_at=long_ago)
    conn2 = connection(keystone)
    tc.attach(conn2, env, at_exit=hooks.append)
    ref = conn2.session.auth.auth_ref
    assert ref.auth_token == "tok-new"  # no login needed
    assert [s["type"] for s in ref.service_catalog.catalog] == ["network"]
    assert keystone.seen == ["/v3/auth/tokens"]  # checked, and the catalog refreshed
    assert cache.load(AUTH["password"]) and cache.recently_checked()  # when, saved
    conn2.session.auth.invalidate()  # a service said 401 and the new login failed
    hooks.pop()()
    assert not cache.path.exists()


def test_a_token_checked_recently_is_checked_again_once_the_window_passes(cache):
    cache.save(state(), AUTH["password"])
    assert cache.load(AUTH["password"]) and cache.recently_checked()
    later = datetime.now(timezone.utc) + timedelta(seconds=tc.RECHECK_S + 1)
    assert not cache.recently_checked(now=later)
    raw = json.loads(cache.path.read_text())
    raw.pop("checked_at")  # a file written before the field existed: never checked
    cache.path.write_text(json.dumps(raw))
    assert cache.load(AUTH["password"]) and not cache.recently_checked()


def test_a_token_keystone_no_longer_accepts_is_dropped(tmp_path, keystone):
    env = {"XDG_CACHE_HOME": str(tmp_path)}
    hooks: list = []
    cache = tc.attach(connection(keystone), env, at_exit=hooks.append)
    cache.save(state("tok-revoked"), AUTH["password"],  # keystone does not know it
               checked_at=datetime.now(timezone.utc) - timedelta(seconds=tc.RECHECK_S + 1))
    conn = connection(keystone)
    tc.attach(conn, env, at_exit=hooks.append)
    assert conn.session.auth.get_auth_state() is None  # it logs in as usual
    assert not cache.path.exists()


def test_attach_with_another_password_ignores_and_keeps_the_cache(tmp_path, keystone):
    env = {"XDG_CACHE_HOME": str(tmp_path)}
    hooks: list = []
    keystone.valid.add("tok-good")
    cache = tc.attach(connection(keystone), env, at_exit=hooks.append)
    cache.save(state("tok-good"), AUTH["password"])
    wrong = connection(keystone, "wrong-password")
    tc.attach(wrong, env, at_exit=hooks.append)
    assert wrong.session.auth.get_auth_state() is None  # it must log in (and fail: I10)
    assert keystone.seen == []  # the token was not even offered
    hooks.pop()()
    assert json.loads(cache.load(AUTH["password"]))["auth_token"] == "tok-good"


def test_attach_is_off_when_opted_out(tmp_path, keystone):
    hooks: list = []
    env = {"XDG_CACHE_HOME": str(tmp_path), tc.ENV: "0"}
    assert tc.attach(connection(keystone), env, at_exit=hooks.append) is None
    assert hooks == [] and not (tmp_path / "modelserve").exists()


def test_reads_go_side_by_side_only_once_the_session_holds_a_token(tmp_path, keystone):
    """Without a token each parallel read would log in on its own (a wrong password: one failed
    login per thread, towards a lockout): the OpenStack cloud allows concurrent reads only once
    its session holds a valid token, e.g. the cached one."""
    from rollout.clouds.openstack import OpenStackCloud

    conn = connection(keystone)
    cloud = OpenStackCloud(conn=conn)
    assert not cloud.concurrent_reads  # no token yet: the first read logs in, alone
    conn.session.auth.set_auth_state(state("tok-1"))
    assert cloud.concurrent_reads
    conn.session.auth.set_auth_state(state("tok-2", in_s=10))  # about to expire
    assert not cloud.concurrent_reads
