"""The image hygiene scan: what must not ship in a baked image's root filesystem. Used by the
image tier (tests/image/test_bake.py: the LXD bake) and the OpenStack tier
(tests/openstack/test_lxd_release.py: the Packer openstack bake through Nova)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

# a real PEM private key: the header, optional RFC 1421 headers, then base64 lines (code that
# merely mentions the header, like cloud-init's cc_ssh.py, does not match)
PRIVATE_KEY = re.compile(rb"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----\r?\n"
                         rb"(?:[A-Za-z-]+: [^\n]*\n)*\r?\n?(?:[A-Za-z0-9+/=]{40,}\r?\n){2,}")


def scan(rootfs: Path, extra_ca_pem: str) -> list[str]:
    """What is wrong in the image whose files are under ``rootfs`` (empty: nothing).
    ``extra_ca_pem``: the build CA certificates the bake trusted (they must not ship)."""
    ca_lines = [c.split("\n")[2].encode() for c in re.findall(
        r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----",
        extra_ca_pem, re.S)]
    # files byte-identical to what a Debian package shipped are the distribution's, not ours
    # (libgnutls embeds a self-test key); everything else must hold no private key
    shipped: dict[str, str] = {}
    for md5sums in (rootfs / "var/lib/dpkg/info").glob("*.md5sums"):
        for line in md5sums.read_text(errors="replace").splitlines():
            digest, _, rel = line.partition("  ")
            shipped["/" + rel] = digest
    found: list[str] = []
    for path in rootfs.rglob("*"):
        rel = "/" + str(path.relative_to(rootfs))
        if path.is_symlink() or not path.is_file():
            continue
        if path.name in (".bash_history", ".python_history", ".viminfo", ".lesshst"):
            found.append(f"shell history {rel}")
        if path.stat().st_size > 4 << 20 or rel.startswith("/usr/share/"):
            continue
        data = path.read_bytes()
        if PRIVATE_KEY.search(data) and hashlib.md5(data).hexdigest() != shipped.get(rel):
            found.append(f"private key {rel}")
        if any(line in data for line in ca_lines):
            found.append(f"build CA certificate {rel}")
    for rel in ("etc/modelserve/instance.env", "etc/rabbitmq/rabbitmq.conf",
                "var/lib/rabbitmq/.erlang.cookie", "var/lib/rabbitmq/mnesia"):
        if (rootfs / rel).exists():
            found.append(f"instance secret or state /{rel}")
    if "requirepass" in (rootfs / "etc/redis/modelserve.conf").read_text():
        found.append("a Redis password in /etc/redis/modelserve.conf")
    for line in (rootfs / "etc/shadow").read_text().splitlines():
        user, pw = line.split(":")[:2]
        if pw.startswith("$") or pw == "":
            found.append(f"a password (or an empty one) for {user} in /etc/shadow")
    lists = [p.name for p in (rootfs / "var/lib/apt/lists").iterdir()
             if p.name not in ("lock", "partial", "auxfiles")]
    if lists:
        found.append(f"apt lists {lists[:3]}")
    if list((rootfs / "etc/ssh").glob("ssh_host_*")) if (rootfs / "etc/ssh").exists() else []:
        found.append("SSH host keys")
    keys = [f"/{k.relative_to(rootfs)}" for home in ("root", "home/*")
            for k in rootfs.glob(f"{home}/.ssh/authorized_keys") if k.stat().st_size]
    if keys:
        found.append(f"login keys of the build {keys}")
    if (rootfs / "var/lib/cloud/seed/nocloud").exists():
        found.append("the build's NoCloud seed (config drive) /var/lib/cloud/seed/nocloud")
    if (rootfs / "etc/machine-id").read_text().strip():
        found.append("a machine-id")
    if list((rootfs / "usr/local/share/ca-certificates").glob("modelserve-build-*")):
        found.append("build CA files in /usr/local/share/ca-certificates")
    return found
