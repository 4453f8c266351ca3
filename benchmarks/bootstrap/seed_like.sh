#!/bin/bash
# The seed recipe's start-up loop, re-implemented for comparison (behaviour, not its text):
#   leader: `ray start --head --port=P`, then every 5 s a fresh Python process connects with
#           ray.init() and counts alive nodes, until there are N;
#   worker: `ray start --address=HEAD:P --block`, retried every 5 s until it succeeds.
# Usage: seed_like.sh leader PORT N TIMEOUT | seed_like.sh worker HEAD PORT TIMEOUT
set -u
role=$1
case "$role" in
  leader)
    port=$2 size=$3 timeout=$4
    ray start --head --port="$port" >/dev/null
    waited=0
    while [ "$waited" -lt "$timeout" ]; do
      alive=$(python3 -c 'import ray; ray.init(); print(sum(1 for n in ray.nodes() if n["Alive"]))' 2>/dev/null)
      if [ "${alive:-0}" -eq "$size" ]; then
        exit 0
      fi
      sleep 5
      waited=$((waited + 5))
    done
    exit 1
    ;;
  worker)
    head=$2 port=$3 timeout=$4
    waited=0
    while [ "$waited" -lt "$timeout" ]; do
      if ray start --address="$head:$port" --block; then
        exit 0
      fi
      sleep 5
      waited=$((waited + 5))
    done
    exit 1
    ;;
esac
exit 2
