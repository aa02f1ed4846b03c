#!/usr/bin/env bash
# The whole test suite: installs the system packages the tests use if they are missing
# (coturn for an external STUN client, nftables and iproute2 for the namespace lab, ffmpeg for
# real media through a call, tcpdump for the on-the-wire capture), then runs every test of the
# workspace.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v turnutils_stunclient >/dev/null || need+=(coturn)
command -v nft >/dev/null || need+=(nftables)
command -v ip >/dev/null || need+=(iproute2)
command -v ffprobe >/dev/null || need+=(ffmpeg)
command -v tcpdump >/dev/null || need+=(tcpdump)
if [ ${#need[@]} -gt 0 ]; then
    echo "installing ${need[*]}" >&2
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# The end-to-end tests run the real binaries: build them first.
cargo build --workspace --bins --locked
cargo test --workspace --locked "$@"
