#!/usr/bin/env bash
# Installs the Debian packages the test suite needs when they are missing:
# openssh-server (a real sshd for the SFTP tests), rclone (`rclone serve sftp`, the
# password-authentication SFTP server of the tests; also a benchmark peer) and
# prometheus (promtool). With WITH_BENCH=1 also wrk (API benchmark).
#
# Idempotent: does nothing when everything is present. Needs root (CI runs as root).
# It never stops, kills or reconfigures anything already running: the packages'
# services are kept from starting at install time (a policy-rc.d for the duration of
# the install, only when the machine has none of its own); the tests run their own
# daemons on free ports of 127.0.0.1.
set -euo pipefail
need=()
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v rclone >/dev/null 2>&1 || need+=(rclone)
if [ "${WITH_BENCH:-0}" = 1 ]; then
  command -v wrk >/dev/null 2>&1 || need+=(wrk)
fi
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" != 0 ]; then
  echo "missing system packages: ${need[*]} - install them as root: apt-get install -y ${need[*]}" >&2
  exit 1
fi
echo "installing system packages: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
policy=/usr/sbin/policy-rc.d
own_policy=0
if [ ! -e "$policy" ]; then
  # exit code 101: "action forbidden", so invoke-rc.d starts none of the new services
  printf '#!/bin/sh\nexit 101\n' >"$policy"
  chmod 755 "$policy"
  own_policy=1
  trap 'rm -f "$policy"' EXIT
fi
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
if [ "$own_policy" = 1 ]; then rm -f "$policy"; trap - EXIT; fi
