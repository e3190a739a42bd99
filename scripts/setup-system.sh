#!/usr/bin/env bash
# Installs the Debian packages the test suite drives for real: independent POP3
# clients (curl, fetchmail, mpop, getmail6; gsasl for SASL), Postfix in front of the LMTP listener,
# Dovecot as the reference server for the collector and the benchmarks (and its IMAP
# server as the IMAP sink's destination), and PostgreSQL
# and HAProxy for the scale-out backend and the load balancer in front of it, Chromium
# and its WebDriver for the archive's web page, and notmuch (with its Python bindings for the
# system python3, which bench.archive queries it through) to measure its search against.
# Services are never started by the packages: the tests start their own instances
# on loopback ports with their own configuration.
set -euo pipefail

PACKAGES=(curl ca-certificates fetchmail mpop getmail6 gsasl postfix dovecot-core dovecot-pop3d dovecot-lmtpd dovecot-imapd
          postgresql haproxy
          chromium chromium-driver notmuch python3-notmuch2
          iproute2 procps)

missing=()
for pkg in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
        || missing+=("$pkg")
done
[ ${#missing[@]} -eq 0 ] && exit 0

if [ "$(id -u)" -ne 0 ]; then
    echo "setup-system: missing Debian packages: ${missing[*]}" >&2
    echo "setup-system: run as root or: sudo apt-get install ${missing[*]}" >&2
    exit 1
fi

# Keep package scripts from starting system-wide daemons (postfix, dovecot) on
# their default ports: the tests run private instances.
policy=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy"
    chmod 755 "$policy"
    created_policy=1
fi
export DEBIAN_FRONTEND=noninteractive
echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
echo "postfix postfix/mailname string localhost" | debconf-set-selections
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
[ "$created_policy" -eq 1 ] && rm -f "$policy"
exit 0
