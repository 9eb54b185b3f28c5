# --- Ray bring-up shared by the Slurm and PBS jobs (launchers/common/ray.sh) -------------------------
# Needs: FARM_PYTHON, FARM_JOB_ID, FARM_JOB_DIR, FARM_INTERFACE, FARM_NODE_RESOURCES (one JSON per node
# index), FARM_NODES, FARM_CLUSTER_TIMEOUT_S, FARM_RAY_TMP. Optional: FARM_RAY_START_ARGS, extra flags
# for every `ray start` (e.g. --object-store-memory=...), set with launcher.env.

farm_log() { echo "farm[$(date +%H:%M:%S)]: $*"; }

farm_ip() {
  if [ -n "$FARM_INTERFACE" ]; then
    ip -o -4 addr show dev "$FARM_INTERFACE" | awk '{split($4, a, "/"); print a[1]; exit}'
  else
    "$FARM_PYTHON" -c 'import ray.util; print(ray.util.get_node_ip_address())'
  fi
}

# Ray clusters started by `ray start` require a token from every client. Each job makes its own,
# readable by its user only, on the shared job directory where its workers and driver find it.
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$FARM_JOB_DIR/ray-token-$FARM_JOB_ID"
farm_make_token() {
  (umask 077 && "$FARM_PYTHON" -c 'import secrets; print(secrets.token_hex(32))' > "$RAY_AUTH_TOKEN_PATH")
}

# Run one Ray node in the foreground until it is stopped, in a process group of its own with SIGTERM
# blocked. A requeue, a preemption or `scancel` sends SIGTERM to every process of the job at once;
# the shield keeps Ray serving while farm.launch (not shielded) finishes its step and checkpoints,
# and the queue's SIGKILL after its grace time (KillWait) ends Ray all the same. `--block` keeps the
# raylet and its workers children of this process, so the queue's tracking owns them, and this job
# stops its own Ray by killing that group (never `ray stop`, which stops every Ray on the host).
# Every node takes its own block of ports, chosen from the job id and checked free on this host, so
# two jobs sharing a node do not collide.
farm_ray_node() {  # $1: node index; $2: head address, empty for the head itself; $3 $4: ip, port
  local index=$1 head=${2:-} ip=${3:-} base=${4:-} resources
  [ -n "$ip" ] || ip=$(farm_ip)
  [ -n "$base" ] || base=$("$FARM_PYTHON" -m farm.queue.bringup ports --seed "$FARM_JOB_ID-$index") || return 1
  resources=${FARM_NODE_RESOURCES[$index]:-'{}'}
  local args=(--block --node-ip-address="$ip"
    --node-manager-port=$((base + 1)) --object-manager-port=$((base + 2))
    --dashboard-agent-grpc-port=$((base + 3)) --dashboard-agent-listen-port=$((base + 4))
    --metrics-export-port=$((base + 5)) --runtime-env-agent-port=$((base + 6))
    --min-worker-port=$((base + 10)) --max-worker-port=$((base + FARM_PORT_BLOCK - 1)))
  [ "$resources" != '{}' ] && args+=(--resources="$resources")
  if [ -z "$head" ]; then
    args+=(--head --port="$base" --ray-client-server-port=$((base + 7)) --dashboard-port=$((base + 8))
      --include-dashboard=false --temp-dir="$FARM_RAY_TMP")
  else
    args+=(--address="$head")
  fi
  # shellcheck disable=SC2206  # flags are words on purpose
  [ -n "${FARM_RAY_START_ARGS:-}" ] && args+=($FARM_RAY_START_ARGS)
  exec "$FARM_PYTHON" -m farm.queue.bringup shield -- "$FARM_PYTHON" -m ray.scripts.scripts start "${args[@]}" \
    > "$FARM_JOB_DIR/ray-$FARM_JOB_ID-node$index.log" 2>&1
}

# Start the head (node 0) on this host in the background; sets FARM_HEAD_PID and FARM_RAY_ADDRESS.
# Returns only once the head's GCS answers, and fails within seconds, printing the end of the head's
# log, when its `ray start` exits first (a bad flag, a missing package, a port taken).
farm_start_head() {
  farm_make_token || return 1
  local ip base
  ip=$(farm_ip) && base=$("$FARM_PYTHON" -m farm.queue.bringup ports --seed "$FARM_JOB_ID-0") || return 1
  farm_ray_node 0 "" "$ip" "$base" &
  FARM_HEAD_PID=$!
  FARM_RAY_ADDRESS=$ip:$base
  export FARM_RAY_ADDRESS
  "$FARM_PYTHON" -m farm.queue.bringup wait --address "$FARM_RAY_ADDRESS" --nodes 1 \
    --timeout "$FARM_CLUSTER_TIMEOUT_S" --watch "$FARM_HEAD_PID=$FARM_JOB_DIR/ray-$FARM_JOB_ID-node0.log" \
    --fatal-logs "$FARM_RAY_TMP/session_latest/logs/*.out" || return 1
  farm_log "Ray head on $FARM_RAY_ADDRESS (log: $FARM_JOB_DIR/ray-$FARM_JOB_ID-node0.log)"
}

# Wait for every node; a node whose `ray start` exits (its srun/pbsdsh/mpiexec step ends) fails the
# bring-up at once with the end of the node logs instead of a wait for the timeout.
farm_wait_cluster() {
  local watch=(--watch "$FARM_HEAD_PID=$FARM_JOB_DIR/ray-$FARM_JOB_ID-node0.log") pid
  for pid in ${FARM_WORKER_PIDS:-}; do watch+=(--watch "$pid=$FARM_JOB_DIR/ray-$FARM_JOB_ID-node*.log"); done
  "$FARM_PYTHON" -m farm.queue.bringup wait --address "$FARM_RAY_ADDRESS" --nodes "$FARM_NODES" \
    --timeout "$FARM_CLUSTER_TIMEOUT_S" --log-dir "$FARM_JOB_DIR" "${watch[@]}"
}

# The driver runs in the background so that this shell can take signals while it trains: bash runs
# a trap only between commands, and `wait` is the one command a trap interrupts. It is shielded like
# Ray (its W&B service aside): SIGTERM blocked, so that a queue's SIGTERM to every process reaches it
# once, from this shell, as SIGUSR1; and SIGUSR1 ignored until farm's controller listens for it,
# so that an early one does not kill it (this shell repeats it until farm has stopped).
# A signal that came during the bring-up means there is nothing to train: the driver is not started.
farm_run_driver() {
  [ -z "$FARM_SIGNAL" ] || return 0
  "$FARM_PYTHON" -m farm.queue.bringup shield --ignore-usr1 -- \
    "$FARM_PYTHON" -m farm.launch "${FARM_LAUNCH[@]}" "run.ray_address=$FARM_RAY_ADDRESS" &
  FARM_DRIVER_PID=$!
  while kill -0 "$FARM_DRIVER_PID" 2>/dev/null; do wait "$FARM_DRIVER_PID"; done
  wait "$FARM_DRIVER_PID"
}

# SIGUSR1 (time limit near, or `scancel -b -s USR1`): checkpoint, stop, requeue.
# SIGTERM (`scancel`, a requeue, a preemption): checkpoint and stop; a requeue is the queue's call.
# Either way farm.launch gets SIGUSR1 (it blocks SIGTERM), finishes its step and checkpoints.
farm_on_signal() {
  FARM_SIGNAL=$1
  farm_log "got SIG$1; asking farm to checkpoint and stop"
  if [ -n "${FARM_DRIVER_PID:-}" ] && [ -z "${FARM_NAG_PID:-}" ]; then
    ( trap '' TERM; while kill -USR1 "$FARM_DRIVER_PID" 2>/dev/null; do sleep 5; done ) &
    FARM_NAG_PID=$!
  fi
}

# SIGKILL, since the Ray nodes block SIGTERM; the head's group holds its raylet, GCS and agents, and
# its workers exit when their raylet goes. The workers' nodes are the queue's (farm_stop_workers).
farm_stop_ray() {
  if [ -n "${FARM_NAG_PID:-}" ]; then pkill -P "$FARM_NAG_PID"; kill "$FARM_NAG_PID" 2>/dev/null; fi
  FARM_NAG_PID=""
  farm_stop_workers
  if [ -n "${FARM_HEAD_PID:-}" ]; then
    # (Before its exec the head is not yet a group leader: then the process alone.)
    kill -KILL -- "-$FARM_HEAD_PID" 2>/dev/null || kill -KILL "$FARM_HEAD_PID" 2>/dev/null
    wait "$FARM_HEAD_PID" 2>/dev/null
  fi
  FARM_HEAD_PID=""
  rm -rf "$FARM_RAY_TMP" "$RAY_AUTH_TOKEN_PATH"
}

# farm.launch exits 128 + N when signal N stopped it after its checkpoint (farm.errors.Preempted); here it
# only ever gets SIGUSR1: 138. The job did what the queue asked, so it ends 0 (COMPLETED); whether the
# run goes on is the requeue's call (farm_unfinished).
FARM_EXIT_STOPPED=138
farm_job_exit() {  # $1: farm.launch's exit code; prints the job's
  if [ "$1" -eq "$FARM_EXIT_STOPPED" ]; then echo 0; else echo "$1"; fi
}

# Whether the run has yet to reach train.steps (and so should continue), from its events.jsonl.
farm_unfinished() {
  [ "$("$FARM_PYTHON" -m farm.queue.bringup status --run-dir "$FARM_RUN_DIR")" != done ]
}
