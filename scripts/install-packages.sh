#!/usr/bin/env bash
# Installs the Debian packages fabula's local provider runs (as root). The machine's own copies of
# these services are not used: fabula runs its own inside each server's namespace, so they are
# kept from starting at install time.
set -euo pipefail
PACKAGES=(haproxy nginx-light pgbouncer redis-server rabbitmq-server postgresql-15 postgresql-client-15
          nftables supervisor iproute2 util-linux git curl ca-certificates)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "Debian packages: all present"
  exit 0
fi
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
