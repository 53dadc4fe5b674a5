#!/usr/bin/env bash
# Installs the Debian packages fabula's local provider runs (as root). The machine's own copies of
# these services are not used: fabula runs its own inside each server's namespace, so they are
# kept from starting at install time.
set -euo pipefail
# openssh-server for its sshd binary only: the ssh provider's tests start their own sshd in each
# test namespace (tests/e2e/ssh); the machine's own ssh service is kept off (below); wrk for
# bench/throughput.py's load; python3-venv for the ssh provider's builds on a worker host (its
# namespace shares this machine's packages); debootstrap and systemd-container (systemd-nspawn) for
# the ssh tests' host that boots systemd from a Debian tree of its own
PACKAGES=(haproxy nginx-light pgbouncer redis-server rabbitmq-server postgresql-15 postgresql-client-15
          nftables supervisor iproute2 util-linux git curl ca-certificates openssh-server openssh-client socat sudo
          python3-venv wrk debootstrap systemd-container)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

# Whether the machine's own ssh service runs now (not the tests' sshd processes, which have their
# own pid files): with systemd its unit, without it Debian's init script's pid file.
system_sshd_running() {
  if [ -d /run/systemd/system ]; then
    systemctl -q is-active ssh.service 2>/dev/null
  else
    [ -s /run/sshd.pid ] && kill -0 "$(cat /run/sshd.pid)" 2>/dev/null
  fi
}

# Stops, disables and masks the machine's own ssh service; every step is a no-op the second time.
# /etc/ssh/sshd_not_to_be_run is Debian's own switch: both the systemd unit and the init script
# refuse to start sshd while it exists (a `sshd -f CONFIG` started directly ignores it).
keep_system_sshd_off() {
  touch /etc/ssh/sshd_not_to_be_run
  if [ -d /run/systemd/system ]; then
    systemctl stop ssh.service ssh.socket 2>/dev/null || true
  elif [ -x /etc/init.d/ssh ]; then
    /etc/init.d/ssh stop >/dev/null 2>&1 || true
  fi
  # disable and mask also work where systemd does not run (they edit /etc/systemd/system): the
  # machine booted with systemd later still does not start it
  if command -v systemctl >/dev/null; then
    systemctl disable -q ssh.service ssh.socket 2>/dev/null || true
    systemctl mask -q ssh.service ssh.socket
  fi
  update-rc.d ssh disable >/dev/null 2>&1 || true
}

if [ ${#missing[@]} -eq 0 ]; then
  echo "Debian packages: all present"
else
  if [ "$(id -u)" -ne 0 ]; then
    echo "error: missing Debian packages: ${missing[*]}" >&2
    echo "  fix: run \`sudo make setup\` (installing them needs root)" >&2
    exit 2
  fi
  echo "Debian packages: installing ${missing[*]}"
  policy=/usr/sbin/policy-rc.d
  made_policy=""
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod 755 "$policy" && made_policy=1
  fi
  trap 'if [ -n "$made_policy" ]; then rm -f "$policy"; fi' EXIT
  export DEBIAN_FRONTEND=noninteractive
  if [ -z "${FABULA_SKIP_APT_UPDATE:-}" ]; then apt-get update -q; fi
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# An ssh service that was already running before this script installed anything may be how you reach
# this machine: it is left alone. Otherwise (just installed, or present and stopped) it is kept off.
if [ "$(id -u)" -eq 0 ]; then
  if [[ " ${missing[*]} " == *" openssh-server "* ]] || ! system_sshd_running; then
    keep_system_sshd_off
  else
    echo "note: the machine's own ssh service runs and is left running (fabula's tests use their own sshd)"
  fi
fi
