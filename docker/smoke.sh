#!/usr/bin/env bash
# make docker-smoke: build the image, run it read-only, wait for /readyz, score a demo image, check /metrics,
# send SIGTERM under load and check that no accepted request failed, then remove everything.
# Env: KEEP_IMAGE=1 keeps the image; BASE_IMAGE (default: local/python:3.11-slim when present, else python:3.11-slim), IMAGE, PORT,
#      TORCH_INDEX_URL (default: the CPU index when reachable; otherwise torch comes from a local wheelhouse).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
IMAGE=${IMAGE:-ood-serve:smoke}
NAME=ood-serve-smoke-$$
VOLUME=$NAME-state
PORT=${PORT:-$($PY -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
URL=http://127.0.0.1:$PORT
OUT=build/docker-smoke.json
# the local Docker engine + base-image tool: $LOCAL_DOCKER, else shared/tools/local-docker.sh next to this clone or
# next to any folder above it (a clone in /tmp finds nothing there and falls back to /work/shared)
find_local_docker() {
  local dir
  dir=$(pwd)
  while [ "$dir" != / ]; do
    [ -f "$dir/../shared/tools/local-docker.sh" ] && { echo "$dir/../shared/tools/local-docker.sh"; return; }
    dir=$(dirname "$dir")
  done
  echo /work/shared/tools/local-docker.sh
}
LOCAL_DOCKER=${LOCAL_DOCKER:-$(find_local_docker)}

cleanup() {
  docker rm -f "$NAME" >/dev/null 2>&1 || true
  docker volume rm -f "$VOLUME" >/dev/null 2>&1 || true
  # the image is several GB: keep it only when asked (KEEP_IMAGE=1); always drop the build stage
  [ "${KEEP_IMAGE:-0}" = 1 ] || docker image rm -f "$IMAGE" >/dev/null 2>&1 || true
  docker image prune -f --filter label=org.ood-serve.stage=build >/dev/null 2>&1 || true
  find docker/wheelhouse -type f ! -name README.md -delete 2>/dev/null || true
}
trap cleanup EXIT

if ! docker info >/dev/null 2>&1; then
  [ -x "$LOCAL_DOCKER" ] || [ -f "$LOCAL_DOCKER" ] || { echo "no Docker engine and no $LOCAL_DOCKER" >&2; exit 1; }
  bash "$LOCAL_DOCKER"
fi
if [ -z "${BASE_IMAGE:-}" ]; then
  if docker image inspect local/python:3.11-slim >/dev/null 2>&1; then BASE_IMAGE=local/python:3.11-slim
  elif [ -f "$LOCAL_DOCKER" ] && bash "$LOCAL_DOCKER" >/dev/null; then BASE_IMAGE=local/python:3.11-slim
  else BASE_IMAGE=python:3.11-slim; fi
fi

if [ -z "${TORCH_INDEX_URL+x}" ]; then
  if curl -sf --max-time 5 -o /dev/null https://download.pytorch.org/whl/cpu/torch/; then
    TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
  else
    # no CPU index here: take the pinned torch/torchvision wheels pip already has on this machine
    TORCH_INDEX_URL=
    echo "== CPU index unreachable: torch from a local wheelhouse (PyPI's CUDA-bundled build)"
    # (this machine's platform tags: the image is built for this architecture; an explicit --platform would
    #  exclude the older manylinux tags some of torch's CUDA wheels carry)
    $PY -m pip download --quiet --only-binary=:all: --python-version 3.11 \
      -d docker/wheelhouse torch==2.14.1 torchvision==0.29.1
  fi
fi

echo "== building $IMAGE on $BASE_IMAGE"
start=$(date +%s)
docker build -q -f docker/Dockerfile --build-arg BASE_IMAGE="$BASE_IMAGE" \
  --build-arg TORCH_INDEX_URL="$TORCH_INDEX_URL" -t "$IMAGE" . >/dev/null
build_s=$(( $(date +%s) - start ))
size=$(docker image inspect -f '{{.Size}}' "$IMAGE")
echo "== image $IMAGE: $((size / 1024 / 1024)) MiB, built in ${build_s}s"

docker volume create "$VOLUME" >/dev/null
docker run -d --name "$NAME" --read-only --tmpfs /tmp --cap-drop ALL --security-opt no-new-privileges \
  -v "$VOLUME":/var/lib/ood -p 127.0.0.1:"$PORT":8000 -e OOD_API_KEYS=smoke-key "$IMAGE" >/dev/null

$PY docker/smoke_check.py --url "$URL" --container "$NAME" --image "$IMAGE" --image-bytes "$size" \
  --build-seconds "$build_s" --out "$OUT"
