#!/usr/bin/env bash
# Runs on each Cloud TPU VM worker, from the repo's root (scripts/launch_tpu.sh calls it
# over `gcloud ... ssh --worker=all`):
#
#   bash scripts/tpu_worker.sh setup
#       Python 3.11 (TPU images ship 3.10) through uv, then .venv with the pinned project
#       ('.[train,gcs]', constraints.txt) and the TPU runtime of the pinned jax.
#   bash scripts/tpu_worker.sh start gs://BUCKET/run configs/X.py [--config.FIELD=V ...]
#       Starts the trainer detached (nohup; a dropped SSH does not stop it). Its log is
#       ~/contrastive_jax-logs/train.log, copied to gs://BUCKET/run/logs/HOST.log every 60 s
#       and at exit.
set -euo pipefail
cd "$(dirname "$0")/.."
logs="$HOME/contrastive_jax-logs"

case "${1:-}" in
  setup)
    if [ ! -x .venv/bin/python ]; then
      python3 -m pip install -q --user uv
      "$HOME/.local/bin/uv" venv -q --seed --python 3.11 .venv
    fi
    CJ_EXTRAS=train,gcs bash scripts/env.sh
    .venv/bin/python -m pip install -q -c constraints.txt "jax[tpu]"
    .venv/bin/python -c "import jax; print(jax.process_index(), jax.local_devices())"
    ;;
  start)
    workdir="$2"; config="$3"; shift 3
    if pgrep -f contrastive_jax.train >/dev/null; then
      echo "a trainer is already running on $(hostname): stop it first" >&2; exit 1
    fi
    mkdir -p "$logs"
    host="$(hostname)"
    # The trainer prints plain progress lines when its output is not a terminal.
    # shellcheck disable=SC2016  # the inner script expands its own variables
    nohup bash -c '
      workdir="$1"; log="$2"; host="$3"; shift 3
      .venv/bin/python -m contrastive_jax.train --workdir "$workdir" \
        --config.distributed.initialize=True "$@" >>"$log" 2>&1 &
      pid=$!
      trap "kill -TERM $pid" TERM
      while kill -0 "$pid" 2>/dev/null; do
        gcloud storage cp -q "$log" "$workdir/logs/$host.log" || true
        sleep 60 & wait $!
      done
      wait "$pid"; code=$?
      echo "exit $code" >>"$log"
      gcloud storage cp -q "$log" "$workdir/logs/$host.log" || true
    ' _ "$workdir" "$logs/train.log" "$host" --config "$config" "$@" >/dev/null 2>&1 &
    echo "started on $host: log $logs/train.log, copied to $workdir/logs/$host.log"
    ;;
  *)
    sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
