"""What the ssh provider runs on a host, as data: root shell scripts (their arguments are passed
as $1..., never spliced into the text) and the Debian facts they report."""
from __future__ import annotations

import subprocess
from dataclasses import dataclass

from fabula.providers.base import SYSTEM_PATH

# the Debian release the hosts must run: its package names and versions are what the roles use
DEBIAN_VERSION = "12"
# what every host needs besides its role's packages: fabula's supervisor and firewall, and the
# tools the transport and the roles' scripts use
BASE_PACKAGES = ("supervisor", "curl", "nftables", "util-linux", "procps", "python3", "tar", "gzip")
# the distribution's own service units of the packages fabula runs itself: they would hold the
# ports of fabula's services (nginx on 80, PostgreSQL on 5432...)
UNITS = {"nginx-light": ("nginx",), "nginx": ("nginx",), "haproxy": ("haproxy",), "pgbouncer": ("pgbouncer",),
         "redis-server": ("redis-server",), "rabbitmq-server": ("rabbitmq-server",),
         "postgresql-15": ("postgresql", "postgresql@15-main"), "supervisor": ("supervisor",)}
LOCK = "/run/fabula-ssh.lock"   # useradd, userdel and the sudoers files, one host-wide change at a time

# one line of facts: ID VERSION_ID architecture python3-version systemd(yes/no)
FACTS = """. /etc/os-release 2>/dev/null
arch=$(dpkg --print-architecture 2>/dev/null || uname -m)
py=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || echo none)
if [ -d /run/systemd/system ]; then sd=yes; else sd=no; fi
echo "${ID:-unknown} ${VERSION_ID:-unknown} $arch $py $sd"
"""


@dataclass(frozen=True)
class HostFacts:
    distribution: str
    version: str
    architecture: str
    python: str
    systemd: bool

    @classmethod
    def parse(cls, line: str) -> HostFacts:
        parts = (line.split() + ["unknown"] * 5)[:5]
        return cls(parts[0], parts[1], parts[2], parts[3], parts[4] == "yes")

    def describe(self) -> str:
        return f"{self.distribution} {self.version}, {self.architecture}, Python {self.python}"


def this_machine() -> HostFacts:
    """The facts of the machine fabula runs on (where releases are built, unless a host builds them)."""
    return HostFacts.parse(subprocess.run(["sh", "-c", FACTS], capture_output=True, text=True,
                                          env={"PATH": SYSTEM_PATH}).stdout)


# $@: packages. Installs the missing ones (waiting for another apt or dpkg to finish, rather than
# failing), with the distribution's services kept from starting meanwhile; prints what it installed.
INSTALL = f"""exec 9>{LOCK}; flock 9
missing=
for p in "$@"; do
  dpkg-query -W -f='${{Status}}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing="$missing $p"
done
[ -n "$missing" ] || exit 0
export DEBIAN_FRONTEND=noninteractive
own_policy=
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\\nexit 101\\n' > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && own_policy=1
fi
trap '[ -z "$own_policy" ] || rm -f /usr/sbin/policy-rc.d' EXIT
apt-get -q -o DPkg::Lock::Timeout=600 update >/dev/null || exit 1
apt-get -q -y -o DPkg::Lock::Timeout=600 install --no-install-recommends $missing || exit 1
echo "installed:$missing"
"""

# $@: units. Stopped, disabled and masked where systemd runs (nothing to do where it does not).
MASK_UNITS = """[ -d /run/systemd/system ] || exit 0
for u in "$@"; do
  systemctl list-unit-files --no-legend "$u.service" 2>/dev/null | grep -q . || continue
  systemctl disable --now "$u.service" >/dev/null 2>&1
  systemctl mask "$u.service" >/dev/null 2>&1 || exit 1
done
"""

# $1 the group, $2 a comment, then the user names: the environment's own system users
ACCOUNTS = f"""exec 9>{LOCK}; flock 9
g=$1 c=$2; shift 2
getent group "$g" >/dev/null || groupadd --system "$g" || exit 1
for u in "$@"; do
  getent passwd "$u" >/dev/null && continue
  useradd --system --gid "$g" --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin \\
    --comment "$c" "$u" || exit 1
done
"""

# $1 the group, then the user names: killed, removed (what is already gone is fine)
REMOVE_ACCOUNTS = f"""exec 9>{LOCK}; flock 9
g=$1; shift
for u in "$@"; do
  getent passwd "$u" >/dev/null || continue
  pkill -KILL -u "$u" 2>/dev/null; i=0
  while pgrep -u "$u" >/dev/null && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
  # a PostgreSQL killed rather than stopped leaves its shared memory segments in /dev/shm
  find /dev/shm -xdev -maxdepth 1 -type f -user "$u" -delete 2>/dev/null
  userdel "$u" || exit 1
done
! getent group "$g" >/dev/null || groupdel "$g"
"""

# $1 the user, $2 the sudoers file, $3 the authorized_keys content (one key a line): a sysadmin
# with a home, a login shell, these keys only and passwordless sudo
SYSADMIN = f"""exec 9>{LOCK}; flock 9
u=$1 f=$2 keys=$3
getent passwd "$u" >/dev/null || useradd --create-home --shell /bin/bash --comment "sysadmin (fabula)" "$u" || exit 1
# no password, but not a locked account: sshd refuses a locked one even its keys (without PAM)
usermod -p '*' "$u" || exit 1
h=$(getent passwd "$u" | cut -d: -f6)
install -d -m 700 -o "$u" -g "$(id -gn "$u")" "$h/.ssh" || exit 1
t=$(mktemp "$h/.ssh/.authorized_keys.XXXXXX") || exit 1
printf '%s\\n' "$keys" > "$t" && chown "$u:" "$t" && chmod 600 "$t" && mv -f "$t" "$h/.ssh/authorized_keys" || exit 1
t=$(mktemp /etc/sudoers.d/.fabula.XXXXXX) || exit 1
printf '%s ALL=(ALL:ALL) NOPASSWD: ALL\\n' "$u" > "$t" && chmod 440 "$t" && visudo -cqf "$t" && mv -f "$t" "$f" \\
  || {{ rm -f "$t"; exit 1; }}
"""

# $1 the user, $2 its sudoers file: a sysadmin fabula made, removed with its home
REMOVE_SYSADMIN = f"""exec 9>{LOCK}; flock 9
u=$1 f=$2
rm -f -- "$f"
getent passwd "$u" >/dev/null || exit 0
pkill -KILL -u "$u" 2>/dev/null; sleep 0.2
userdel --remove "$u" 2>/dev/null || userdel "$u"
"""

# $1 the table, $2 the new ruleset's file, $3 where the current one is saved, $4 seconds: the new
# ruleset checked, then applied atomically, with a timer that restores the former one unless
# CANCEL_ROLLBACK runs first (if fabula loses the host after applying it, the host is not left
# with rules that may lock its operators out)
APPLY_FIREWALL = """t=$1 new=$2 saved=$3 wait=$4
nft -c -f "$new" || exit 2
if nft list table inet "$t" > "$saved.tmp" 2>/dev/null; then mv -f "$saved.tmp" "$saved"
else rm -f "$saved.tmp" "$saved"; fi
setsid sh -c 'sleep "$1"; nft flush table inet "$3"
  if [ -s "$2" ]; then nft -f "$2"; else nft delete table inet "$3"; fi' \
  rollback "$wait" "$saved" "$t" </dev/null >/dev/null 2>&1 &
echo $! > "$saved.pid"
nft -f "$new"
"""

# $1 where the former ruleset was saved: the timer is stopped, the new ruleset kept
CANCEL_ROLLBACK = """pid=$(cat "$1.pid" 2>/dev/null) && kill "$pid" 2>/dev/null
rm -f "$1.pid"
exit 0
"""

# $1 the table, $2 the rollback file: the firewall removed, its timer too
REMOVE_FIREWALL = """pid=$(cat "$2.pid" 2>/dev/null) && kill "$pid" 2>/dev/null
rm -f "$2" "$2.pid"
! nft list table inet "$1" >/dev/null 2>&1 || nft delete table inet "$1"
"""

# $1 the environment's tree, $2 the server's directory: its supervisord stopped, and every process
# still running from the server's directory killed. Where systemd runs supervisord, its unit is
# stopped first (Preparation.remove_boot_unit): a supervisord this shut down would come back
STOP_SERVER = """tree=$1 dir=$2
conf=$dir/supervisor/supervisord.conf
[ ! -f "$conf" ] || supervisorctl -c "$conf" shutdown >/dev/null 2>&1
i=0
while pids=$(pgrep -f -- "$dir/") && [ -n "$pids" ] && [ $i -lt 100 ]; do
  [ $i -lt 50 ] && kill -TERM $pids 2>/dev/null || kill -KILL $pids 2>/dev/null
  sleep 0.2; i=$((i+1))
done
"""

# $1 the login user fabula uses, $2 the mark that names fabula's line (its comment), $3 the line
# (empty: the line is removed): fabula's program's key in the user's authorized_keys, with the
# user's own lines, owner and mode kept
AUTHORIZE = f"""exec 9>{LOCK}; flock 9
set -e
user=$1 mark=$2 line=$3
home=$(getent passwd "$user" | cut -d: -f6)
[ -n "$home" ] && [ -d "$home" ] || {{ echo "no home folder for user $user" >&2; exit 1; }}
dir=$home/.ssh file=$home/.ssh/authorized_keys
if [ ! -d "$dir" ]; then [ -n "$line" ] || exit 0; mkdir -m 700 "$dir"; chown "$user:" "$dir"; fi
if [ ! -f "$file" ]; then
  [ -n "$line" ] || exit 0
  install -m 600 -o "$user" -g "$(id -g "$user")" /dev/null "$file"
fi
tmp=$(mktemp "$dir/.fabula-keys.XXXXXX")
grep -v -F -e " $mark" "$file" >"$tmp" || true
[ -z "$line" ] || printf '%s\\n' "$line" >>"$tmp"
chown --reference="$file" "$tmp"; chmod --reference="$file" "$tmp"
if cmp -s "$tmp" "$file"; then rm -f "$tmp"; else mv -f "$tmp" "$file"; fi
"""
