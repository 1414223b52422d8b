#!/usr/bin/env bash
# Runs one config on a Cloud TPU VM or pod slice, detached, with a gs:// workdir
# (docs/tpu.md walks through it). From a machine with gcloud:
#
#   bash scripts/launch_tpu.sh --repo https://github.com/ME/contrastive_jax.git \
#     --name cj --zone us-central2-b --tpu v4-32 --workdir gs://BUCKET/runs/a \
#     --config configs/mnist_gamma.py [--data-dir gs://BUCKET/tfds] [--ref main] \
#     [--project P] [--spot] [--dry-run] [-- --config.batch_size=4096 ...]
#
# Steps: create the TPU (if absent; runtime version from the TPU generation), install a
# Python 3.11 environment and the project on every worker (scripts/tpu_worker.sh setup),
# start the trainer detached on every worker (scripts/tpu_worker.sh start; its log goes
# to WORKDIR/logs/). --dry-run prints the gcloud commands and runs nothing.
# Afterwards, with the same --name/--zone: --action log | status | stop | kill | delete
# (stop: checkpoint and exit 0 on every worker; kill: SIGKILL at once).
set -euo pipefail

usage() { sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "launch_tpu.sh: $*" >&2; exit 2; }

repo="" name="" zone="" tpu="" workdir="" config="" data_dir="" ref="main" project=""
spot=0 dry=0 action="launch" ssh_timeout_s=180
while [ $# -gt 0 ]; do
  case "$1" in
    --repo) repo="$2"; shift 2 ;;
    --name) name="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --tpu) tpu="$2"; shift 2 ;;
    --workdir) workdir="$2"; shift 2 ;;
    --config) config="$2"; shift 2 ;;
    --data-dir) data_dir="$2"; shift 2 ;;
    --ref) ref="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --spot) spot=1; shift ;;
    --action) action="$2"; shift 2 ;;
    --dry-run) dry=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown argument $1 (see --help)" ;;
  esac
done
trainer_flags=("$@")

if [ "$action" = launch ] && [ -z "$repo" ]; then
  die "--repo is required (the git URL of your contrastive_jax)"
fi
[ -n "$name" ] || die "--name is required (the TPU's name)"
[ -n "$zone" ] || die "--zone is required (e.g. us-central2-b)"

# The TPU software (runtime) version of each generation, for JAX (cloud.google.com/tpu/docs/runtimes).
runtime_version() {
  case "$1" in
    v2-*|v3-*|v4-*) echo "tpu-ubuntu2204-base" ;;
    v5litepod-*|v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) return 1 ;;
  esac
}

gc=(gcloud compute tpus tpu-vm)
where=(--zone "$zone")
[ -z "$project" ] || where+=(--project "$project")

show() {  # a command as one line a shell can take back (arguments with spaces in '...')
  local out="" a
  for a in "$@"; do
    if [[ "$a" =~ [[:space:]\;\&\|\'\"\$\(\)] ]]; then out+="'${a//\'/\'\\\'\'}' "; else out+="$a "; fi
  done
  echo "${out% }"
}

run() {  # prints the command; runs it unless --dry-run
  show "$@"
  [ "$dry" = 1 ] || "$@"
}

on_workers() {  # runs a shell command on every worker of the TPU
  run "${gc[@]}" ssh "$name" "${where[@]}" --worker=all --command "$1"
}

case "$action" in
  log)
    run "${gc[@]}" ssh "$name" "${where[@]}" --worker=0 --command "tail -n 40 -F ~/contrastive_jax-logs/train.log"
    exit 0 ;;
  status|stop|kill)
    # stop: SIGTERM, every process checkpoints the same step and exits 0 (launching again
    # resumes); kill: SIGKILL, at once (the last checkpoint stays). Each worker signals the
    # pid its `start` recorded, never a pattern (a pattern also matches the ssh shell).
    # A worker that does not answer within ssh_timeout_s is reported, not waited for.
    if ! run timeout "$ssh_timeout_s" "${gc[@]}" ssh "$name" "${where[@]}" --worker=all \
        --command "cd contrastive_jax && bash scripts/tpu_worker.sh $action"; then
      echo "launch_tpu.sh: $action did not succeed on every worker (see above)" >&2
      exit 1
    fi
    exit 0 ;;
  delete)
    run "${gc[@]}" delete "$name" "${where[@]}" --quiet
    exit 0 ;;
  launch) ;;
  *) die "unknown --action $action: use launch, log, status, stop, kill or delete" ;;
esac

[ -n "$tpu" ] || die "--tpu is required (e.g. v4-32, v5litepod-16, v5p-8, v6e-8)"
version="$(runtime_version "$tpu")" || die "unknown TPU generation in --tpu $tpu: use v4-N, v5litepod-N, v5p-N or v6e-N"
[ -n "$config" ] || die "--config is required (e.g. configs/mnist_gamma.py)"
case "$workdir" in
  gs://*) ;;
  *) die "--workdir must be a gs:// path that every worker can reach (got '${workdir}')" ;;
esac

echo "plan: $tpu ($version) '$name' in $zone; workdir $workdir; $repo@$ref; $config"
create=("${gc[@]}" create "$name" "${where[@]}" --accelerator-type "$tpu" --version "$version")
[ "$spot" = 0 ] || create+=(--spot)
if [ "$dry" = 1 ] || ! "${gc[@]}" describe "$name" "${where[@]}" >/dev/null 2>&1; then
  run "${create[@]}"
fi

# On every worker: clone (or update) the repo at ref, then install Python 3.11, the
# pinned project and the TPU runtime of the pinned jax.
q() { printf '%q' "$1"; }
on_workers "set -e; if [ ! -d contrastive_jax ]; then git clone $(q "$repo") contrastive_jax; fi; \
cd contrastive_jax && git fetch -q origin && git checkout -q $(q "$ref") && \
(git pull -q --ff-only origin $(q "$ref") || true) && bash scripts/tpu_worker.sh setup"

# Start detached on every worker: it survives a dropped SSH; its log goes to the workdir.
start="cd contrastive_jax && bash scripts/tpu_worker.sh start $(q "$workdir") $(q "$config")"
[ -z "$data_dir" ] || start+=" $(q "--config.data_dir=$data_dir")"
for flag in ${trainer_flags[@]+"${trainer_flags[@]}"}; do start+=" $(q "$flag")"; done
started=1
on_workers "$start" || started=0

if [ "$dry" = 1 ]; then
  echo "dry run: nothing was run"
  exit 0
fi
# Every worker must run a trainer: one that never started (its ssh dropped) would leave the
# others waiting for it until --config.distributed.timeout_s, then exiting with one line.
if [ "$started" = 0 ] || ! timeout "$ssh_timeout_s" "${gc[@]}" ssh "$name" "${where[@]}" \
    --worker=all --command "cd contrastive_jax && bash scripts/tpu_worker.sh status"; then
  cat >&2 <<EOF
launch_tpu.sh: the trainer is not running on every worker (see above). The others exit on
their own once --config.distributed.timeout_s passes; to start again at once:
  bash scripts/launch_tpu.sh --name $name --zone $zone --action kill
  then this same launch command (it resumes from $workdir)
EOF
  exit 1
fi
cat <<EOF
started. Follow it:  bash scripts/launch_tpu.sh --name $name --zone $zone --action log
logs of every worker: gcloud storage cat $workdir/logs/WORKER.log
status of every worker:  bash scripts/launch_tpu.sh --name $name --zone $zone --action status
stop (checkpoint, exit 0):  bash scripts/launch_tpu.sh --name $name --zone $zone --action stop
kill (at once, no checkpoint):  bash scripts/launch_tpu.sh --name $name --zone $zone --action kill
resume: run this same launch command again (the trainer resumes from $workdir)
EOF
