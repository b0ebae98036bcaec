#!/bin/sh
# The SuperNode image's entrypoint: start the site's warm worker beside the SuperNode, then
# become the SuperNode (same process id, so the worker stops when it does).
#
#   fedpriv-supernode [flower-supernode's arguments, --node-config among them]
#
# The worker (fedpriv/client/warm.py) imports PyTorch and fedpriv while the SuperNode
# connects, so the federation's first round does not wait for it. It starts in the
# background: the SuperNode starts at once, and a first message that comes before the worker
# listens waits for it (the workers' lock file). Without --node-config, or if the worker
# cannot start, the SuperNode runs as before (its ClientApp processes start the worker).
set -eu

node_config=""
take_next=0
for arg in "$@"; do
    if [ "$take_next" = 1 ]; then
        node_config="$arg"
        take_next=0
        continue
    fi
    case "$arg" in
        --node-config) take_next=1 ;;
        --node-config=*) node_config="${arg#--node-config=}" ;;
    esac
done

if [ -n "$node_config" ] && [ "${FEDPRIV_WARM_WORKER:-1}" != "0" ]; then
    # $$ is this shell's id, which exec below hands to the SuperNode
    # --if-enabled: a site with warm-worker = false gets a note, not an error line
    fedpriv site warm --node-config "$node_config" --watch-pid "$$" --if-enabled >&2 &
fi
exec flower-supernode "$@"
