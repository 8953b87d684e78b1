#!/usr/bin/env bash
# Installs what rmiot needs from the operating system, once, idempotently:
#   Debian packages (PostgreSQL 15 and its server headers, build tools, Mosquitto,
#   Chromium for the dashboard's browser tests)
#   and the TimescaleDB extension (Apache-2 edition), built from Debian trixie's
#   source package against PostgreSQL 15 when the extension is missing.
# Finishes in well under a second when everything is already there.
set -euo pipefail

PG_MAJOR=15
PACKAGES=(
  "postgresql-$PG_MAJOR" "postgresql-server-dev-$PG_MAJOR" postgresql-contrib
  build-essential cmake dpkg-dev mosquitto mosquitto-clients libssl-dev
  chromium  # the dashboard's browser tests (Playwright drives /usr/bin/chromium)
  libpango-1.0-0 libpangoft2-1.0-0  # PDF monthly reports (WeasyPrint)
)
PG_SHAREDIR=$(/usr/lib/postgresql/$PG_MAJOR/bin/pg_config --sharedir 2>/dev/null || echo /usr/share/postgresql/$PG_MAJOR)

log() { printf '[setup-system] %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

missing_packages() {
  local p
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q '^install ok installed$' || echo "$p"
  done
}

install_packages() {
  local missing
  missing=$(missing_packages)
  [ -z "$missing" ] && return 0
  log "installing Debian packages: $(echo $missing)"
  export DEBIAN_FRONTEND=noninteractive
  as_root apt-get update -qq
  # policy-rc.d keeps the packages' own services (a system PostgreSQL cluster, a
  # system Mosquitto) from starting: rmiot runs private instances on ports of its own.
  local policy=/usr/sbin/policy-rc.d created_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | as_root tee "$policy" >/dev/null
    as_root chmod +x "$policy"
    created_policy=1
  fi
  # shellcheck disable=SC2086
  as_root apt-get install -y -qq --no-install-recommends $missing >/dev/null
  [ "$created_policy" = 1 ] && as_root rm -f "$policy"
  return 0
}

# The deb-src entry for trixie is derived from the machine's own Debian sources
# (URIs and Signed-By), so no mirror is named here and the machine's own
# package lists stay on bookworm.
write_trixie_sources() {
  local dir=$1 src=/etc/apt/sources.list.d/debian.sources uri signed
  if [ -f "$src" ]; then
    uri=$(awk '/^URIs:/ && $2 !~ /security/ {print $2; exit}' "$src")
    signed=$(awk '/^Signed-By:/ {print $2; exit}' "$src")
  else
    uri=$(awk '$1 == "deb" && $0 !~ /security/ {for (i = 2; i <= NF; i++) if ($i ~ /:\/\//) {print $i; exit}}' /etc/apt/sources.list)
    signed=/usr/share/keyrings/debian-archive-keyring.gpg
  fi
  [ -n "$uri" ] || { log "cannot find a Debian mirror in the machine's apt sources"; exit 1; }
  {
    echo "Types: deb-src"
    echo "URIs: $uri"
    echo "Suites: trixie"
    echo "Components: main"
    [ -n "$signed" ] && echo "Signed-By: $signed"
  } >"$dir/trixie-src.sources"
}

install_timescaledb() {
  [ -f "$PG_SHAREDIR/extension/timescaledb.control" ] && return 0
  log "building TimescaleDB (Apache-2 edition) from Debian trixie's source package"
  local work
  work=$(mktemp -d /tmp/rmiot-timescaledb.XXXXXX)
  mkdir -p "$work/parts" "$work/lists/partial"
  write_trixie_sources "$work/parts"
  local apt_opts=(-o "APT::Sandbox::User=root" -o "Dir::Etc::SourceList=/dev/null" -o "Dir::Etc::SourceParts=$work/parts"
                  -o "Dir::State::Lists=$work/lists")
  apt-get "${apt_opts[@]}" update -qq
  (cd "$work" && apt-get "${apt_opts[@]}" source --download-only -qq timescaledb)
  (cd "$work" && dpkg-source --no-check -x ./*.dsc src >/dev/null)
  (cd "$work/src" && PATH=/usr/lib/postgresql/$PG_MAJOR/bin:$PATH ./bootstrap \
      -DAPACHE_ONLY=1 -DREGRESS_CHECKS=OFF -DTAP_CHECKS=OFF -DWARNINGS_AS_ERRORS=OFF \
      -DSEND_TELEMETRY_DEFAULT=NO -DPG_CONFIG=/usr/lib/postgresql/$PG_MAJOR/bin/pg_config >/dev/null)
  make -C "$work/src/build" -j"$(nproc)" >/dev/null
  as_root make -C "$work/src/build" install >/dev/null
  rm -rf "$work"
  log "TimescaleDB installed into $PG_SHAREDIR/extension"
}

install_packages
install_timescaledb
