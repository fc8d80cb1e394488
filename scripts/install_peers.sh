#!/usr/bin/env bash
# Installs the benchmark's peer systems into a virtualenv of their own, outside the repo: AutoGen's
# gRPC worker runtime (autogen-core and autogen-ext[grpc] 0.7.5), which pins grpcio 1.70 and
# protobuf 5.29 — older than the project's, so it can never share the project's virtualenv.
#
#   scripts/install_peers.sh [PEERS_VENV]
#
# Default: ${ROUNDTABLE_PEERS_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/roundtable/peers-venv} (the path
# bench/peer_autogen.py looks in). Idempotent: a venv holding exactly these versions is left as it is.
set -euo pipefail

AUTOGEN_VERSION=0.7.5
# autogen-ext 0.7.5's grpc extra asks for grpcio~=1.70.0 and autogen-core for protobuf~=5.29.3; pinned
# exactly so every machine measures the same peer.
GRPCIO_VERSION=1.70.0
PROTOBUF_VERSION=5.29.5
PYTHON=${PYTHON:-python3}
VENV=${1:-${ROUNDTABLE_PEERS_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/roundtable/peers-venv}}

installed() {
  [ -x "$VENV/bin/python" ] || return 1
  "$VENV/bin/python" - "$AUTOGEN_VERSION" "$GRPCIO_VERSION" "$PROTOBUF_VERSION" <<'PY'
import importlib.metadata as metadata
import sys

wanted = {"autogen-core": sys.argv[1], "autogen-ext": sys.argv[1], "grpcio": sys.argv[2], "protobuf": sys.argv[3]}
for name, version in wanted.items():
    try:
        if metadata.version(name) != version:
            sys.exit(1)
    except metadata.PackageNotFoundError:
        sys.exit(1)
PY
}

mkdir -p "$(dirname "$VENV")"
# One install at a time per venv (CI next to a developer's bench may ask at once).
exec 9>"$VENV.lock"
flock 9

if installed; then
  echo "install_peers: autogen $AUTOGEN_VERSION (grpcio $GRPCIO_VERSION, protobuf $PROTOBUF_VERSION) already in $VENV"
  exit 0
fi

rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet \
  "autogen-core==$AUTOGEN_VERSION" \
  "autogen-ext[grpc]==$AUTOGEN_VERSION" \
  "grpcio==$GRPCIO_VERSION" \
  "protobuf==$PROTOBUF_VERSION"
installed || { echo "install_peers: $VENV does not hold the pinned versions after the install" >&2; exit 1; }
echo "install_peers: installed autogen $AUTOGEN_VERSION (grpcio $GRPCIO_VERSION, protobuf $PROTOBUF_VERSION) into $VENV"
