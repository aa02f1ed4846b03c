#!/usr/bin/env bash
# The whole test suite: installs the system packages the tests use if they are missing
# (coturn for an external STUN client and the side-by-side bench, nftables and iproute2 for the
# namespace lab, ffmpeg for real media through a call, tcpdump for the on-the-wire capture, tmux
# for what a person sees on a terminal, miniupnpd for the lab's router that maps ports on
# request, redis-server for the cluster tests (each starts its own on a loopback port and stops
# it), a font for the bench's chart), then runs every test of the workspace and the bench's
# smoke test.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v turnutils_stunclient >/dev/null || need+=(coturn)
command -v nft >/dev/null || need+=(nftables)
command -v ip >/dev/null || need+=(iproute2)
command -v ffprobe >/dev/null || need+=(ffmpeg)
command -v tcpdump >/dev/null || need+=(tcpdump)
command -v tmux >/dev/null || need+=(tmux)
[ -x /usr/sbin/miniupnpd ] || need+=(miniupnpd-nftables)
command -v redis-server >/dev/null || need+=(redis-server)
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || need+=(fonts-dejavu-core)
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

# Smoke test of the benchmarks (not a measurement: tiny counts, no timing thresholds): every
# comparison with natcall and coturn runs once on the debug binaries built above and must
# deliver packets and print figures; it fails (non-zero) otherwise.
chart_dir=$(mktemp -d)
trap 'rm -rf "$chart_dir"' EXIT
cargo run -q --locked -p natcall-bench -- compare --quick --chart "$chart_dir/chart.png"
test -s "$chart_dir/chart.png"
# Room fan-out: one room of three for a second; fails if no copy was delivered.
cargo run -q --locked -p natcall-bench -- room --rooms 1 --members 3 --rate 20 --seconds 1
echo "bench-smoke: 2 passed, 0 failed"
