#!/usr/bin/env bash
# Blue/green slots of one serving host behind nginx, driven over SSM Run Command (tasks/deploy.py).
#
#   rollout.sh deploy   VERSION IMAGE   start VERSION in the idle slot, smoke-test it there (ready,
#                                       /model reports VERSION); no traffic moves. A no-op when the
#                                       live slot already serves VERSION (the rollback slot survives).
#   rollout.sh weight   PERCENT         nginx: PERCENT of requests to the idle slot (0 = live only)
#   rollout.sh mirror   on|off          nginx mirrors every request to the idle slot (shadow)
#   rollout.sh complete VERSION         the slot serving VERSION becomes live, 100 % of the traffic
#   rollout.sh rollback VERSION IMAGE   nginx to the slot that reports VERSION on /model (each slot is
#                                       asked, never "the other one"); none does: IMAGE is pulled
#                                       into the idle slot; that fails: exit 1 (recorded as failed)
#
# Serialised with flock (two deploys never race on the `live` file); each slot keeps a version file.
set -euo pipefail
HOST_DIR=${NS_HOST_DIR:-/opt/ns-serving}
UPSTREAM=${NS_NGINX_UPSTREAM:-/etc/nginx/ns-upstream.conf}
MIRROR=${NS_NGINX_MIRROR:-/etc/nginx/ns-mirror.conf}
IDLE_UPSTREAM=${NS_NGINX_IDLE:-/etc/nginx/ns-idle.conf}
BLUE_PORT=${NS_BLUE_PORT:-8001}
GREEN_PORT=${NS_GREEN_PORT:-8002}
REGION=${REGION:-us-east-1}
READY_ATTEMPTS=${NS_READY_ATTEMPTS:-60}
cd "$HOST_DIR"
exec 9>"$HOST_DIR/rollout.lock"
flock -w 300 9 || { echo "another rollout holds $HOST_DIR/rollout.lock"; exit 1; }

port_of() { [ "$1" = blue ] && echo "$BLUE_PORT" || echo "$GREEN_PORT"; }
other() { [ "$1" = blue ] && echo green || echo blue; }
live() { cat live 2>/dev/null || echo blue; }
# What the slot's server says it serves (empty when it does not answer): the truth, not the file.
serves() {
  curl -fsS -m 5 -H "X-API-Key: $(cat api_key 2>/dev/null)" "http://127.0.0.1:$(port_of "$1")/model" 2>/dev/null \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["model_version"])' 2>/dev/null || true
}
route() { # route LIVE_SLOT IDLE_WEIGHT_PERCENT
  local live_port idle_port
  live_port=$(port_of "$1"); idle_port=$(port_of "$(other "$1")")
  if [ "$2" -le 0 ]; then
    echo "server 127.0.0.1:$live_port;" > "$UPSTREAM.tmp"
  elif [ "$2" -ge 100 ]; then
    echo "server 127.0.0.1:$idle_port;" > "$UPSTREAM.tmp"
  else
    printf 'server 127.0.0.1:%s weight=%s;\nserver 127.0.0.1:%s weight=%s;\n' \
      "$live_port" "$((100 - $2))" "$idle_port" "$2" > "$UPSTREAM.tmp"
  fi
  echo "server 127.0.0.1:$idle_port;" > "$IDLE_UPSTREAM"
  if cmp -s "$UPSTREAM.tmp" "$UPSTREAM" 2>/dev/null; then rm -f "$UPSTREAM.tmp"; return 0; fi
  mv "$UPSTREAM.tmp" "$UPSTREAM"
  nginx -t && nginx -s reload
}
start_slot() { # start_slot SLOT VERSION IMAGE
  local slot=$1 version=$2 image=$3 port
  port=$(port_of "$slot")
  aws ecr get-login-password --region "$REGION" | docker login --username AWS --password-stdin "${image%%/*}"
  docker pull "$image" || { echo "pull of $image failed; slot $slot left as it was"; return 1; }
  docker rm -f "ns-serving-$slot" >/dev/null 2>&1 || true
  rm -f "slot-$slot.version"
  docker run -d --name "ns-serving-$slot" --restart unless-stopped --env-file serving.env \
    -e MODEL_VERSION="$version" -v "$HOST_DIR/api_key:/run/secrets/api_key:ro" \
    -v "$HOST_DIR/admin_api_key:/run/secrets/admin_api_key:ro" -p "127.0.0.1:$port:8000" "$image"
  for attempt in $(seq 1 "$READY_ATTEMPTS"); do
    curl -fsS -m 5 "http://127.0.0.1:$port/ready" >/dev/null 2>&1 && break
    if [ "$attempt" = "$READY_ATTEMPTS" ]; then
      docker logs --tail 50 "ns-serving-$slot" || true; docker rm -f "ns-serving-$slot" || true; return 1
    fi
    sleep 2
  done
  local served; served=$(serves "$slot")
  if [ "$served" != "$version" ]; then
    echo "smoke: slot $slot serves v$served, expected v$version"; docker rm -f "ns-serving-$slot" || true; return 1
  fi
  echo "$version" > "slot-$slot.version"
}

action=${1:?usage: rollout.sh deploy|weight|mirror|complete|rollback ...}
LIVE=$(live); IDLE=$(other "$LIVE")
case "$action" in
  deploy)
    version=${2:?version}; image=${3:?image}
    if [ "$(serves "$LIVE")" = "$version" ]; then
      echo "no-op: live slot $LIVE already serves v$version; slot $IDLE kept for rollback"; exit 0
    fi
    if [ "$(serves "$IDLE")" = "$version" ]; then
      echo "no-op: idle slot $IDLE already serves v$version"; exit 0
    fi
    start_slot "$IDLE" "$version" "$image"
    route "$LIVE" 0
    echo "slot $IDLE serves v$version beside live slot $LIVE (no traffic yet)"
    ;;
  weight)
    percent=${2:?percent}
    route "$LIVE" "$percent"
    echo "$percent % of the traffic to slot $IDLE (v$(serves "$IDLE")), the rest to slot $LIVE"
    ;;
  mirror)
    if [ "${2:?on|off}" = on ]; then echo "mirror /ns_mirror;" > "$MIRROR"; else : > "$MIRROR"; fi
    nginx -t && nginx -s reload
    echo "mirror to slot $IDLE: $2"
    ;;
  complete)
    version=${2:?version}
    for slot in "$LIVE" "$IDLE"; do
      if [ "$(serves "$slot")" = "$version" ]; then
        : > "$MIRROR"; route "$slot" 0; echo "$slot" > live
        echo "slot $slot is live with v$version; slot $(other "$slot") kept for rollback"; exit 0
      fi
    done
    echo "no slot serves v$version: nothing completed"; exit 1
    ;;
  rollback)
    version=${2:?version}; image=${3:-}
    : > "$MIRROR"
    for slot in "$LIVE" "$IDLE"; do
      if [ "$(serves "$slot")" = "$version" ]; then
        route "$slot" 0; echo "$slot" > live
        echo "rolled back: slot $slot serves v$version (asked on /model)"; exit 0
      fi
    done
    if [ -z "$image" ]; then echo "rollback failed: no slot serves v$version and no image to pull"; exit 1; fi
    # Never the live slot: whatever it serves keeps answering until the restored one is ready.
    start_slot "$IDLE" "$version" "$image" || { echo "rollback failed: v$version could not be started"; exit 1; }
    route "$IDLE" 0; echo "$IDLE" > live
    echo "rolled back: slot $IDLE serves v$version (pulled $image)"
    ;;
  *) echo "unknown action $action"; exit 2 ;;
esac
