# Shared settings for tests/cluster/{build,up,down} (and scripts/, and the Rust
# test harness, which asks `bin_path kstatus`). Sourced, not executed.
# shellcheck shell=bash disable=SC2034

CLUSTER_SRC_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=versions.env
source "$CLUSTER_SRC_DIR/versions.env"

LLMOPS_CACHE=${LLMOPS_CACHE:-$HOME/.cache/llmops}
CLUSTER_DIR=${LLMOPS_CLUSTER_DIR:-$LLMOPS_CACHE/cluster}
BIN_ROOT=$LLMOPS_CACHE/bin

# All binaries the scripts use, in build order. kstatus is the tests' health
# helper (tests/kstatus), not part of the cluster, but built the same way.
CLUSTER_BINARIES=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kwok helm kstatus)

# pinned_version_of NAME -> the version versions.env pins for NAME's module
pinned_version_of() {
    case "$1" in
        etcd) echo "$ETCD_VERSION" ;;
        kube-apiserver | kube-controller-manager | kube-scheduler | kubectl) echo "$KUBE_VERSION" ;;
        kwok) echo "$KWOK_VERSION" ;;
        helm) echo "$HELM_VERSION" ;;
        kstatus) echo "$KSTATUS_VERSION" ;;
        *) echo "unknown binary: $1" >&2; return 1 ;;
    esac
}

# version_of NAME -> version of that binary: the pinned one, and for kstatus, whose
# main package lives in this repository, also a hash of its sources, so that an edit
# of tests/kstatus builds a new binary instead of reusing a stale one.
version_of() {
    local v
    v=$(pinned_version_of "$1") || return 1
    if [[ $1 == kstatus ]]; then
        v+=-$(cd "$CLUSTER_SRC_DIR/../kstatus" && cat go.mod go.sum ./*.go | sha256sum | cut -c1-12)
    fi
    echo "$v"
}

# bin_path NAME -> $LLMOPS_CACHE/bin/NAME-VERSION/NAME
bin_path() {
    local v
    v=$(version_of "$1") || return 1
    echo "$BIN_ROOT/$1-$v/$1"
}

log() { echo "[cluster] $*" >&2; }
die() { echo "[cluster] error: $*" >&2; exit 1; }

# Control-plane processes started by `up`, in start order.
CLUSTER_COMPONENTS=(etcd kube-apiserver kube-controller-manager kube-scheduler kwok)

# is_cluster_process PID NAME [EXACT]
# Succeeds if PID is a live (non-zombie) process running one of our built NAME
# binaries (any version under $BIN_ROOT, or with EXACT=1 only the pinned one)
# with $CLUSTER_DIR on its command line, i.e. a process `up` started for this
# cluster directory.
is_cluster_process() {
    local pid=$1 name=$2 exact=${3:-0} exe state
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || return 1
    exe=${exe% (deleted)}
    # /proc/PID/exe is the resolved path: compare against resolved paths, so a cache
    # directory reached through a symbolic link still matches.
    if [[ $exact == 1 ]]; then
        [[ $exe == "$(readlink -f "$(bin_path "$name")")" ]] || return 1
    else
        [[ $exe == "$(readlink -f "$BIN_ROOT")/$name-"*"/$name" ]] || return 1
    fi
    tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$CLUSTER_DIR/" || return 1
    state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || return 1
    [[ $state != Z ]]
}
