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
#       and at exit; its pid is in ~/contrastive_jax-logs/trainer.pid.
#   bash scripts/tpu_worker.sh status         running (exit 0) or not (exit 3, last exit code)
#   bash scripts/tpu_worker.sh stop [WAIT_S]  SIGTERM: checkpoint and exit 0; waits (120 s)
#   bash scripts/tpu_worker.sh kill [WAIT_S]  SIGKILL: at once, no checkpoint
set -euo pipefail
cd "$(dirname "$0")/.."
logs="$HOME/contrastive_jax-logs"

# The pid of this worker's trainer, from the pid file that `start` writes, if that
# process is alive and is the trainer (never a pattern match: `pkill -f` run through
# ssh also matches the remote shell whose command line holds the pattern).
trainer_pid() {
  local pid
  pid="$(cat "$logs/trainer.pid" 2>/dev/null)" || return 1
  [ -n "$pid" ] && tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "-m contrastive_jax.train " \
    && echo "$pid"
}

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
    if pid="$(trainer_pid)"; then
      echo "a trainer is already running on $(hostname) (pid $pid): stop it first" >&2; exit 1
    fi
    mkdir -p "$logs"
    rm -f "$logs/trainer.pid" "$logs/exit"
    host="$(hostname)"
    # The trainer prints plain progress lines when its output is not a terminal.
    # shellcheck disable=SC2016  # the inner script expands its own variables
    nohup bash -c '
      workdir="$1"; log="$2"; host="$3"; logs="$4"; shift 4
      .venv/bin/python -m contrastive_jax.train --workdir "$workdir" \
        --config.distributed.initialize=True "$@" >>"$log" 2>&1 &
      pid=$!
      echo "$pid" >"$logs/trainer.pid"
      trap "kill -TERM $pid" TERM
      while kill -0 "$pid" 2>/dev/null; do
        gcloud storage cp -q "$log" "$workdir/logs/$host.log" || true
        sleep 60 & wait $!
      done
      wait "$pid"; code=$?
      echo "exit $code" >>"$log"
      echo "$code" >"$logs/exit"
      gcloud storage cp -q "$log" "$workdir/logs/$host.log" || true
    ' _ "$workdir" "$logs/train.log" "$host" "$logs" --config "$config" "$@" >/dev/null 2>&1 &
    for _ in $(seq 50); do  # the trainer's pid appears within a few seconds
      [ -f "$logs/trainer.pid" ] && break
      sleep 0.2
    done
    if pid="$(trainer_pid)"; then
      echo "started on $host (pid $pid): log $logs/train.log, copied to $workdir/logs/$host.log"
    else
      echo "error: the trainer did not start on $host: see $logs/train.log" >&2; exit 1
    fi
    ;;
  status)
    if pid="$(trainer_pid)"; then
      echo "$(hostname): running (pid $pid)"
    else
      echo "$(hostname): not running$( [ -f "$logs/exit" ] && echo " (last exit code $(cat "$logs/exit"))")"
      exit 3
    fi
    ;;
  stop|kill)
    wait_s="${2:-120}"
    if ! pid="$(trainer_pid)"; then
      echo "$(hostname): no trainer running"; exit 0
    fi
    if [ "$1" = stop ]; then sig=TERM; else sig=KILL; fi
    kill -s "$sig" "$pid"
    for _ in $(seq $((wait_s * 5))); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.2
    done
    if kill -0 "$pid" 2>/dev/null; then
      echo "$(hostname): pid $pid still running $wait_s s after SIG$sig: use --action kill" >&2
      exit 1
    fi
    echo "$(hostname): trainer pid $pid ended after SIG$sig"
    ;;
  *)
    sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
