# Shared settings for tests/cluster/{build,up,down}. Sourced, not executed.
# shellcheck shell=bash disable=SC2034

CLUSTER_SRC_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=versions.env
source "$CLUSTER_SRC_DIR/versions.env"

LLMOPS_CACHE=${LLMOPS_CACHE:-$HOME/.cache/llmops}
CLUSTER_DIR=${LLMOPS_CLUSTER_DIR:-$LLMOPS_CACHE/cluster}
BIN_ROOT=$LLMOPS_CACHE/bin

# All binaries the scripts use, in build order.
CLUSTER_BINARIES=(etcd kube-apiserver kube-controller-manager kube-scheduler kubectl kwok helm)

# version_of NAME -> pinned version of that binary
version_of() {
    case "$1" in
        etcd) echo "$ETCD_VERSION" ;;
        kube-apiserver | kube-controller-manager | kube-scheduler | kubectl) echo "$KUBE_VERSION" ;;
        kwok) echo "$KWOK_VERSION" ;;
        helm) echo "$HELM_VERSION" ;;
        *) echo "unknown binary: $1" >&2; return 1 ;;
    esac
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
