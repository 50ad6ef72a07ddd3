#!/usr/bin/env bash
# textmill serving node boot script for Compute Engine (metadata key `startup-script-url`).
#
# 1. install textmill[serve] into a venv (CUDA torch wheel when an NVIDIA GPU is present), or pull a container image;
# 2. fill the model cache from the bucket with `textmill sync` (so the server starts from a warm cache);
# 3. run `textmill serve` under systemd with Restart=always (or in the foreground with --foreground).
#
# Settings, each from the environment first, then the instance metadata attribute, then the default:
#   TEXTMILL_ROOT       textmill-root        registry root, e.g. gs://my-bucket/models            (required)
#   TEXTMILL_MODELS     textmill-models      comma-separated models (default: all in the registry)
#   TEXTMILL_PORT       textmill-port        8000
#   TEXTMILL_HOST       textmill-host        0.0.0.0
#   TEXTMILL_DEVICE     textmill-device      auto (cuda when a GPU is visible)
#   TEXTMILL_CACHE_DIR  textmill-cache-dir   /var/cache/textmill/models
#   TEXTMILL_CACHE_URL  textmill-cache-url   '' (node-local dedup cache) or redis://HOST:6379/0 (fleet-wide)
#   TEXTMILL_DRAIN_TIMEOUT textmill-drain-timeout 30 (seconds; systemd's stop timeout is set above it)
#   TEXTMILL_PACKAGE    textmill-package     pip requirement to install, e.g. 'textmill[serve] @ git+https://...'
#                                             or a wheel copied from the bucket (gs://... is fetched with gcloud)
#   TEXTMILL_IMAGE      textmill-image       a container image to pull and run instead of installing (COS, docker)
#
# Flags: --skip-install (textmill is already on PATH or in the prefix), --foreground (exec the server instead of
# installing a unit: containers and CI), --no-metadata (do not ask the metadata server), --prefix DIR (/opt/textmill),
# --unit-dir DIR (/etc/systemd/system), --env-file FILE (/etc/textmill/serve.env).
# The TEXTMILL_* settings are assigned indirectly (printf -v in setting()), which shellcheck cannot follow.
# shellcheck disable=SC2153
set -euo pipefail

SKIP_INSTALL=0
FOREGROUND=0
NO_METADATA=0
PREFIX=/opt/textmill
UNIT_DIR=/etc/systemd/system
ENV_FILE=/etc/textmill/serve.env
SERVICE=textmill-serve.service
METADATA_URL=http://metadata.google.internal/computeMetadata/v1/instance/attributes
TORCH_VERSION=2.13.0

log() { echo "textmill-startup: $*" >&2; }
die() { log "error: $*"; exit 1; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    --skip-install) SKIP_INSTALL=1 ;;
    --foreground) FOREGROUND=1 ;;
    --no-metadata) NO_METADATA=1 ;;
    --prefix) PREFIX=${2:?--prefix needs a folder}; shift ;;
    --unit-dir) UNIT_DIR=${2:?--unit-dir needs a folder}; shift ;;
    --env-file) ENV_FILE=${2:?--env-file needs a path}; shift ;;
    -h|--help) sed -n '2,/^# --unit-dir/p' "$0"; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
  shift
done

# metadata ATTRIBUTE: the instance attribute's value, or nothing (no metadata server, or not set)
metadata() {
  [[ $NO_METADATA == 1 ]] && return 0
  curl -fsS --max-time 2 -H 'Metadata-Flavor: Google' "$METADATA_URL/$1" 2>/dev/null || true
}

# setting VAR ATTRIBUTE DEFAULT: sets VAR from the environment, else the metadata attribute, else DEFAULT
setting() {
  local var=$1 attr=$2 default=$3 value
  value=${!var:-}
  [[ -n $value ]] || value=$(metadata "$attr")
  [[ -n $value ]] || value=$default
  printf -v "$var" '%s' "$value"
  export "${var?}"
}

setting TEXTMILL_ROOT textmill-root ""
setting TEXTMILL_MODELS textmill-models ""
setting TEXTMILL_PORT textmill-port 8000
setting TEXTMILL_HOST textmill-host 0.0.0.0
setting TEXTMILL_DEVICE textmill-device auto
setting TEXTMILL_CACHE_DIR textmill-cache-dir /var/cache/textmill/models
setting TEXTMILL_CACHE_URL textmill-cache-url ""
setting TEXTMILL_DRAIN_TIMEOUT textmill-drain-timeout 30
setting TEXTMILL_PACKAGE textmill-package "textmill[serve]"
setting TEXTMILL_IMAGE textmill-image ""
[[ -n $TEXTMILL_ROOT ]] || die "no registry root: set the instance metadata 'textmill-root' (gs://BUCKET/PREFIX) or TEXTMILL_ROOT"
[[ $TEXTMILL_PORT =~ ^[0-9]+$ ]] || die "TEXTMILL_PORT=$TEXTMILL_PORT is not a port number"
[[ $TEXTMILL_DRAIN_TIMEOUT =~ ^[0-9]+([.][0-9]+)?$ ]] || die "TEXTMILL_DRAIN_TIMEOUT=$TEXTMILL_DRAIN_TIMEOUT is not a number of seconds"

has_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

install_textmill() {
  log "installing $TEXTMILL_PACKAGE into $PREFIX/venv"
  if ! command -v python3 >/dev/null || ! python3 -m venv --help >/dev/null 2>&1; then
    apt-get update && apt-get install -y --no-install-recommends python3 python3-venv
  fi
  python3 -m venv "$PREFIX/venv"
  local index=https://download.pytorch.org/whl/cpu package=$TEXTMILL_PACKAGE
  # cu126: the torch build that still runs Pascal (P100) as well as T4/V100/A100/L4/H100 (see docs/deploy.md)
  if has_gpu; then index=https://download.pytorch.org/whl/cu126; fi
  "$PREFIX/venv/bin/pip" install -q --index-url "$index" "torch==$TORCH_VERSION"
  if [[ $package == gs://* ]]; then
    gcloud storage cp "$package" "$PREFIX/" && package="$PREFIX/$(basename "$package")"
  fi
  "$PREFIX/venv/bin/pip" install -q "$package"
  id -u textmill >/dev/null 2>&1 || useradd --system --home-dir "$PREFIX" --shell /usr/sbin/nologin textmill
}

pull_image() {
  log "pulling $TEXTMILL_IMAGE"
  command -v docker >/dev/null || die "TEXTMILL_IMAGE is set but docker is not installed (use a Container-Optimized OS image)"
  docker pull "$TEXTMILL_IMAGE"
}

find_textmill() {
  if [[ -x $PREFIX/venv/bin/textmill ]]; then echo "$PREFIX/venv/bin/textmill"; return; fi
  command -v textmill || die "textmill is not installed (drop --skip-install, or put textmill on PATH)"
}

write_env_file() {
  mkdir -p "$(dirname "$ENV_FILE")" "$TEXTMILL_CACHE_DIR"
  local tmp
  tmp=$(mktemp "$ENV_FILE.XXXXXX")
  {
    echo "# written by deploy/gce/startup.sh; read by $SERVICE"
    for var in TEXTMILL_ROOT TEXTMILL_MODELS TEXTMILL_PORT TEXTMILL_HOST TEXTMILL_DEVICE TEXTMILL_CACHE_DIR \
               TEXTMILL_CACHE_URL TEXTMILL_DRAIN_TIMEOUT; do
      [[ -n ${!var} ]] && printf '%s=%s\n' "$var" "${!var}"
    done
    echo "HF_HUB_OFFLINE=1"
  } >"$tmp"
  chmod 0644 "$tmp"
  mv "$tmp" "$ENV_FILE"
}

# The unit: Restart=always brings a crashed or /live-failed node back; the stop timeout exceeds the drain timeout.
write_unit() {
  local exec_start=$1 stop_timeout tmp
  stop_timeout=$(( ${TEXTMILL_DRAIN_TIMEOUT%.*} + 15 ))
  mkdir -p "$UNIT_DIR"
  tmp=$(mktemp "$UNIT_DIR/$SERVICE.XXXXXX")
  cat >"$tmp" <<UNIT
[Unit]
Description=textmill serving node (OpenAI-compatible completions from the bucket's models)
Documentation=https://github.com/textmill/textmill/blob/main/docs/deploy.md
Wants=network-online.target
After=network-online.target

[Service]
Type=exec
EnvironmentFile=$ENV_FILE
ExecStart=$exec_start
Restart=always
RestartSec=5
KillSignal=SIGTERM
TimeoutStopSec=$stop_timeout
LimitNOFILE=65536

[Install]
WantedBy=multi-user.target
UNIT
  if [[ -z $TEXTMILL_IMAGE ]]; then
    sed -i '/^\[Service\]/a User=textmill\nGroup=textmill' "$tmp"
  fi
  chmod 0644 "$tmp"
  mv "$tmp" "$UNIT_DIR/$SERVICE"
  log "wrote $UNIT_DIR/$SERVICE"
}

sync_models() {
  # exit 1 = a model failed to sync (the server retries it every poll); 2 = a usage mistake (stop here)
  local rc=0
  "$@" || rc=$?
  case $rc in
    0) log "model cache filled in $TEXTMILL_CACHE_DIR" ;;
    1) log "warning: some models did not sync; textmill serve will keep retrying" ;;
    *) die "textmill sync failed with exit code $rc" ;;
  esac
}

write_env_file
if [[ -n $TEXTMILL_IMAGE ]]; then
  [[ $SKIP_INSTALL == 1 ]] || pull_image
  gpu_flag=()
  if has_gpu; then gpu_flag=(--gpus all); fi
  docker_run=(docker run --rm --env-file "$ENV_FILE" -e TEXTMILL_CACHE_DIR=/models -v "$TEXTMILL_CACHE_DIR:/models" "${gpu_flag[@]}")
  sync_models "${docker_run[@]}" --entrypoint textmill "$TEXTMILL_IMAGE" sync
  serve_cmd=("${docker_run[@]}" --name textmill-serve -p "$TEXTMILL_PORT:$TEXTMILL_PORT" "$TEXTMILL_IMAGE")
else
  [[ $SKIP_INSTALL == 1 ]] || install_textmill
  textmill_bin=$(find_textmill)
  id -u textmill >/dev/null 2>&1 && chown -R textmill: "$TEXTMILL_CACHE_DIR"
  sync_models "$textmill_bin" sync
  serve_cmd=("$textmill_bin" serve)
fi

write_unit "${serve_cmd[*]}"
if [[ $FOREGROUND == 1 ]]; then
  log "serving in the foreground on $TEXTMILL_HOST:$TEXTMILL_PORT"
  exec "${serve_cmd[@]}"
fi
systemctl daemon-reload
systemctl enable --now "$SERVICE"
log "$SERVICE started; health: curl -fsS http://127.0.0.1:$TEXTMILL_PORT/ready"
