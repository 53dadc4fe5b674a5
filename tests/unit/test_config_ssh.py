"""`provider: ssh` in fabula.yml: the inventory (`hosts:`), the `ssh:` section, admin sources and
sysadmin users, each mistake refused with one message naming the key."""
from __future__ import annotations

from pathlib import Path

import pytest

from fabula.config import load_config
from tests.unit.test_config import error_for, write

SSH = """\
project: shop
app:
  wsgi: shop.wsgi:application
  settings: shop.settings
environments:
  production:
    provider: ssh
    ssh: {user: deploy, port: 2222, jump: admin@bastion.example.com:22}
    hosts:
      lb1:     {role: lb, address: 203.0.113.5}
      web1:    {role: web, address: 10.0.0.11}
      web2:    {role: web, address: 10.0.0.12}
      worker1: {role: worker, address: 10.0.0.21}
      cache1:  {role: cache, address: 10.0.0.31}
      db1:     {role: db-primary, address: 10.0.0.41}
      db2:     {role: db-replica, address: db2.internal.example}
    lb: {https_port: 443, http_port: 80}
    admin_sources: [198.51.100.0/24, "2001:db8::/32"]
    domains: [shop.example.com]
    users:
      - {name: alice, keys: ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ8uXq0aPzb alice@laptop"]}
"""


def test_the_issues_example_is_valid(tmp_path: Path):
    env = load_config(write(tmp_path, SSH)).environment("production")
    assert env.provider == "ssh" and env.fixed_inventory
    assert env.ssh is not None and (env.ssh.user, env.ssh.port, env.ssh.jump) == (
        "deploy", 2222, "admin@bastion.example.com:22")
    # the counts fabula plans with come from the inventory
    assert env.servers.by_role() == {"db-primary": 1, "db-replica": 1, "cache": 1, "worker": 1, "web": 2}
    assert env.hosts["db2"].address == "db2.internal.example"
    assert [u.name for u in env.users] == ["alice"]


def test_the_ssh_section_is_optional(tmp_path: Path):
    text = SSH.replace("    ssh: {user: deploy, port: 2222, jump: admin@bastion.example.com:22}\n", "")
    env = load_config(write(tmp_path, text)).environment("production")
    assert env.ssh is not None and (env.ssh.user, env.ssh.port, env.ssh.key) == ("root", 22, None)


def test_a_key_is_made_absolute_and_must_exist(tmp_path: Path):
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "id").write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    text = SSH.replace("port: 2222,", "port: 2222, key: keys/id,")
    env = load_config(write(tmp_path, text)).environment("production")
    assert env.ssh is not None and env.ssh.key == tmp_path / "keys" / "id"
    message = error_for(tmp_path, SSH.replace("port: 2222,", "port: 2222, key: keys/nope,"))
    assert "ssh.key" in message and "no such file" in message and "fix:" in message


@pytest.mark.parametrize(("change", "expected"), [
    (("web2:    {role: web,", "web2:    {role: [web, worker],"), "a host carries one role"),
    (("address: 10.0.0.12", "address: 10.0.0.11"), "same address"),
    (("      lb1:     {role: lb, address: 203.0.113.5}\n", ""), "role lb"),
    (("db2:     {role: db-replica", "db2:     {role: db-primary"), "role db-primary"),
    (("role: web, address: 10.0.0.11", "role: web, address: '10.0.0.11\\n[x]'"), "hosts.web1.address"),
    (("    provider: ssh\n", "    provider: ssh\n    autoscaling: {min: 1, max: 4}\n"), "cannot scale"),
    (("    provider: ssh\n", "    provider: ssh\n    servers: {web: 3}\n"), "leave `servers:` out"),
    (("    provider: ssh\n", "    provider: ssh\n    local: {bind: 127.0.0.1}\n"), "keys of `provider: local`"),
    (("    provider: ssh\n", "    provider: local\n"), "is a key of `provider: ssh`"),
    (("jump: admin@bastion.example.com:22", "jump: 'a b'"), "ssh.jump"),
    (("user: deploy", "user: 'de ploy'"), "ssh.user"),
    (("198.51.100.0/24", "198.51.100.0/33"), "admin_sources"),
    (("name: alice", "name: root"), "system user"),
    (("name: alice", "name: fb-x"), "system user"),
    (('"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ8uXq0aPzb alice@laptop"', '"ssh-ed25519 AAAA\\nx"'), "users[0].keys[0]"),
    (('"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ8uXq0aPzb alice@laptop"', '"ssh-dss AAAAB3NzaC1kc3MAAACBAP"'),
     "public key"),
])
def test_inventory_mistakes_are_refused(tmp_path: Path, change: tuple[str, str], expected: str):
    old, new = change
    assert old in SSH
    message = error_for(tmp_path, SSH.replace(old, new))
    assert expected in message and "fix:" in message


def test_hosts_as_a_list_is_still_read_as_domains(tmp_path: Path):
    text = SSH.replace("provider: ssh", "provider: local").split("    ssh:")[0] + "    hosts: [shop.example.com]\n"
    env = load_config(write(tmp_path, text)).environment("production")
    assert env.domains == ["shop.example.com"] and env.hosts == {}


def with_backups(db: str) -> str:
    return SSH.replace("    lb: {https_port: 443", f"    db: {db}\n    lb: {{https_port: 443")


def test_backups_kept_on_a_host_of_the_inventory(tmp_path: Path):
    env = load_config(write(tmp_path, with_backups("{backups_host: db2}"))).environment("production")
    assert (env.db.backups_host, env.db.backups) == ("db2", None)
    # db.backups is then the folder on that host: not made nor checked on this machine (a folder
    # here that others may write to would be refused as a folder of this machine's backups)
    open_here = tmp_path / "open"
    open_here.mkdir()
    open_here.chmod(0o777)
    env = load_config(write(tmp_path, with_backups(f"{{backups_host: db1, backups: {open_here}/b}}"))
                      ).environment("production")
    assert env.db.backups == open_here / "b" and not (open_here / "b").exists()
    assert "writable by others" in error_for(tmp_path, with_backups(f"{{backups: {open_here}/b}}"))


@pytest.mark.parametrize(("db", "expected"), [
    ("{backups_host: db9}", "db9 is not a host of `hosts:`"),
    ("{backups_host: lb1}", "lb1 is the load balancer's host, the one the internet reaches"),
    ("{backups_host: 'db 2'}", "a server name"),
    ("{backups_host: db2, backups: backups}", "an absolute path on the backups host"),
    ("{backups_host: db2, backups: /etc/fabula}", "system directory"),
    ("{backups_host: db2, backups: /srv/x/../../etc}", "without `..`"),
    ("{backups_host: db2, backups: /srv/fabula/shop/production}", "inside fabula's tree on the hosts"),
])
def test_a_wrong_backups_host_is_refused_naming_the_key(tmp_path: Path, db: str, expected: str):
    message = error_for(tmp_path, with_backups(db))
    assert expected in message
    key = "db.backups" if "backups:" in db else "db.backups_host"
    assert f"fix: correct `environments.production.{key}`" in message


def test_a_backups_host_is_refused_on_another_provider(tmp_path: Path):
    text = """\
project: shop
app: {wsgi: shop.wsgi:application, settings: shop.settings}
environments:
  staging:
    db: {backups_host: db2}
"""
    message = error_for(tmp_path, text)
    assert "`db.backups_host` is a key of `provider: ssh`" in message and "local" in message
    assert "fix: correct `environments.staging.db.backups_host`" in message
