#!/bin/sh
# Debian's redis-server (7.0, built with TLS): the oldest server in the test matrix (`make
# test-matrix`) and the one the Redis TLS tests use. Downloaded and unpacked into $1 (default
# .redis-debian), not installed, so no service starts and nothing outside $1 changes. `make test`
# runs this; without apt-get (not Debian) it says so, and the TLS tests are skipped.
set -eu
dest="${1:-.redis-debian}"
if [ -x "$dest/redis-server" ]; then exit 0; fi
if ! command -v apt-get >/dev/null 2>&1 || ! command -v dpkg >/dev/null 2>&1; then
  echo "no apt-get here: no Debian redis-server; the Redis TLS tests will be skipped" >&2
  exit 0
fi
rm -rf "$dest"
mkdir -p "$dest/debs"
cd "$dest/debs"
packages="redis-tools libjemalloc2 liblzf1"
# shellcheck disable=SC2086
apt-get download $packages >/dev/null 2>&1 || { apt-get update -qq && apt-get download $packages >/dev/null; }
for deb in *.deb; do dpkg -x "$deb" ..; done
cd ..
rm -rf debs
# redis-check-rdb is the server binary; it acts as the server when called redis-server.
ln -s redis-check-rdb usr/bin/redis-server
cat > redis-server <<'WRAPPER'
#!/bin/sh
here=$(dirname "$(readlink -f "$0")")
LD_LIBRARY_PATH=$(echo "$here"/usr/lib/*-linux-gnu)${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export LD_LIBRARY_PATH
exec "$here/usr/bin/redis-server" "$@"
WRAPPER
chmod +x redis-server
./redis-server --version
