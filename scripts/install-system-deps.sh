#!/usr/bin/env bash
# Installs the Debian packages the test suite and benchmarks need when they are missing:
# openssh-server (real sshd for SFTP tests), prometheus (promtool), rclone (benchmarks).
# Idempotent; does nothing when everything is present. Needs root (CI runs as root).
set -euo pipefail
need=()
[ -x /usr/sbin/sshd ] || need+=(openssh-server)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
if [ "${WITH_BENCH:-0}" = 1 ]; then
  command -v rclone >/dev/null 2>&1 || need+=(rclone)
  command -v wrk >/dev/null 2>&1 || need+=(wrk)
fi
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
if [ "$(id -u)" != 0 ]; then
  echo "missing system packages: ${need[*]} - install them as root: apt-get install -y ${need[*]}" >&2
  exit 1
fi
echo "installing system packages: ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >/dev/null
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# Debian starts services on install; the tests run their own daemons on free ports.
service ssh stop >/dev/null 2>&1 || true
service prometheus stop >/dev/null 2>&1 || true
pkill -x prometheus >/dev/null 2>&1 || true
