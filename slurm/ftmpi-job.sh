# shellcheck shell=bash disable=SC2034  # PYTHON, TRAINER_ARGV... are read by the sbatch scripts
# Shared by the sbatch scripts in this directory (sourced, never run on its own).
#
#   ftmpi_setup             the checkout and its venv
#   ftmpi_training_setup    run directory, resume switch, rank counts, trainer command line
#   ftmpi_supervise CMD...  run the training command and look after it until it ends:
#                           - SIGUSR1 to the batch script (preemption, time limit): forward it
#                             to the MPI launcher, wait until the training reports a durable
#                             checkpoint, then `scontrol requeue` this job (not once training
#                             has finished);
#                           - training ended (summary.json written) but the MPI job does not
#                             exit: stop it after EXIT_GRACE seconds;
#                           - its status is the run's outcome (ftmpi_finished): 0 exactly when
#                             the run's record says every worker finished training, whatever
#                             the launcher returned; otherwise non-zero. A re-run of a job whose
#                             training had finished ends at once with 0.
#   ftmpi_finished          whether the run's record says training finished
#
# Variables a site or a submission may set (sbatch --export=ALL,NAME=VALUE):
#   FTMPI_HOME       the ftmpi checkout (default: the directory sbatch was run from)
#   FTMPI_VENV       its Python environment (default: $FTMPI_HOME/.venv)
#   RUNS_DIR         where run directories go (default: $FTMPI_HOME/runs); must be shared by
#                    all nodes and survive the job, because a requeued run resumes from it
#   CHECKPOINT_WAIT  seconds to wait for the checkpoint after SIGUSR1 (default 90)
#   EXIT_GRACE       seconds a finished training may take to exit (default 60)

ftmpi_log() {
    printf '[ftmpi-slurm %(%H:%M:%S)T] %s\n' -1 "$*"
}

ftmpi_die() {
    ftmpi_log "error: $*" >&2
    exit 1
}

# Resolve the checkout and its venv, put the venv first on PATH, enter the checkout.
ftmpi_setup() {
    FTMPI_HOME=${FTMPI_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}
    FTMPI_VENV=${FTMPI_VENV:-$FTMPI_HOME/.venv}
    [[ -x $FTMPI_VENV/bin/ftmpi-run ]] ||
        ftmpi_die "no ftmpi-run in $FTMPI_VENV/bin; run 'make setup' in the checkout, or set" \
            "FTMPI_HOME / FTMPI_VENV (sbatch --export=ALL,FTMPI_VENV=/path/to/venv)"
    export PATH=$FTMPI_VENV/bin:$PATH
    export PYTHONUNBUFFERED=1
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
    PYTHON=$FTMPI_VENV/bin/python
    cd "$FTMPI_HOME" || ftmpi_die "cannot enter FTMPI_HOME=$FTMPI_HOME"
    ftmpi_log "job ${SLURM_JOB_ID:-?} on ${SLURM_JOB_NODELIST:-?}: ${SLURM_NTASKS:-?} task(s)," \
        "SLURM_RESTART_COUNT=${SLURM_RESTART_COUNT:-0}, ftmpi from $FTMPI_HOME"
}

# One training run per job: name the run after the job, switch on resuming in a re-run (a
# requeued job keeps its SLURM_JOB_ID, so the re-run finds the same run directory), and set
# the rank counts and the trainer's command line:
#   SERVERS (default 1), WORKERS (default: the job's tasks minus SERVERS),
#   TRAINER (default examples/paper_trainer.py), TRAINER_ARGS (default "--steps 300").
ftmpi_training_setup() {
    export FTMPI_RUN_ID=${FTMPI_RUN_ID:-slurm-${SLURM_JOB_ID:?not inside a Slurm job}}
    export FTMPI_RUN_DIR=${FTMPI_RUN_DIR:-${RUNS_DIR:-$FTMPI_HOME/runs}/$FTMPI_RUN_ID}
    if ((${SLURM_RESTART_COUNT:-0} > 0)); then
        export FTMPI_RESUME=1
        ftmpi_log "re-run: resuming from the newest snapshot in $FTMPI_RUN_DIR (FTMPI_RESUME=1)"
    fi
    SERVERS=${SERVERS:-1}
    WORKERS=${WORKERS:-$((${SLURM_NTASKS:-$((SERVERS + 1))} - SERVERS))}
    TRAINER=${TRAINER:-examples/paper_trainer.py}
    read -r -a TRAINER_ARGV <<<"${TRAINER_ARGS:---steps 300}"
    ftmpi_log "$WORKERS worker(s) + $SERVERS server(s), run directory $FTMPI_RUN_DIR"
}

# Whether the run's record says every worker finished training: `launch.rundir.is_finished`
# (summary.json with "finished": true), the rule ftmpi-run's own exit status follows.
ftmpi_finished() {
    "$PYTHON" -c 'import sys
from launch.rundir import is_finished
sys.exit(0 if is_finished(sys.argv[1]) else 1)' "$FTMPI_RUN_DIR"
}

# The number of `EVENT` records in the run's events.jsonl.
_ftmpi_count_events() {
    local n
    n=$(grep -c "\"event\": \"$1\"" "$FTMPI_RUN_DIR/events.jsonl" 2>/dev/null) || n=0
    echo "$n"
}

# SIGUSR1 arrived: have the training write a checkpoint now, then requeue this job.
# The launcher's child (mpirun, or srun) forwards SIGUSR1 to every rank; the launcher process
# itself (ftmpi-run, Python) is left alone.
_ftmpi_checkpoint_and_requeue() {
    local before wait_s=${CHECKPOINT_WAIT:-90}
    if ftmpi_finished; then
        ftmpi_log "SIGUSR1: training has finished ($FTMPI_RUN_DIR/summary.json); no checkpoint," \
            "no requeue"
        return
    fi
    before=$(_ftmpi_count_events signal_checkpoint)
    ftmpi_log "SIGUSR1: asking the training for a checkpoint (waiting up to $wait_s s)"
    pkill -USR1 -P "$_ftmpi_launcher" ||
        ftmpi_log "warning: the launcher (pid $_ftmpi_launcher) has no child to signal"
    local deadline=$((SECONDS + wait_s))
    while (($(_ftmpi_count_events signal_checkpoint) <= before)); do
        if ! kill -0 "$_ftmpi_launcher" 2>/dev/null || ((SECONDS >= deadline)); then
            ftmpi_log "warning: no signal_checkpoint event; the re-run resumes from the" \
                "newest periodic snapshot"
            break
        fi
        sleep 1
    done
    if (($(_ftmpi_count_events signal_checkpoint) > before)); then
        ftmpi_log "checkpoint durable: $(grep '"event": "signal_checkpoint"' \
            "$FTMPI_RUN_DIR/events.jsonl" | tail -n 1)"
    fi
    if ftmpi_finished; then
        ftmpi_log "training has finished ($FTMPI_RUN_DIR/summary.json); not requeueing"
        return
    fi
    if scontrol requeue "$SLURM_JOB_ID"; then
        ftmpi_log "requeued job $SLURM_JOB_ID; its re-run resumes from the newest snapshot"
    else
        ftmpi_log "warning: scontrol requeue failed (submit with --requeue); training goes on." \
            "To continue later: sbatch --export=ALL,FTMPI_RESUME=1,FTMPI_RUN_DIR=$FTMPI_RUN_DIR"
    fi
}

# Stop a launcher that has not exited EXIT_GRACE seconds after the training ended.
_ftmpi_stop_hung_launcher() {
    ftmpi_log "training ended ($FTMPI_RUN_DIR/summary.json) but the MPI job has not exited" \
        "after ${EXIT_GRACE:-60} s (Open MPI can hang in MPI_Finalize after a re-spawn); stopping it"
    local children
    children=$(pgrep -P "$_ftmpi_launcher" | tr '\n' ' ')
    kill -TERM "$_ftmpi_launcher" 2>/dev/null
    sleep 5
    # shellcheck disable=SC2086  # a list of pids
    kill -KILL $children "$_ftmpi_launcher" 2>/dev/null
}

# Run "$@" (the launcher command) in the background and look after it; returns the run's
# outcome: 0 exactly when ftmpi_finished, otherwise the launcher's non-zero status (if it exited
# 0, that of `python -m launch.outcome`, which prints the cause). A re-run
# (SLURM_RESTART_COUNT > 0) of a run that had finished returns 0 without running anything.
ftmpi_supervise() {
    if ((${SLURM_RESTART_COUNT:-0} > 0)) && ftmpi_finished; then
        ftmpi_log "training had already finished ($FTMPI_RUN_DIR/summary.json); nothing to run"
        return 0
    fi
    _ftmpi_usr1=0
    trap '_ftmpi_usr1=1' USR1
    "$@" &
    _ftmpi_launcher=$!
    local ended_at="" stopped=0
    while kill -0 "$_ftmpi_launcher" 2>/dev/null; do
        if ((_ftmpi_usr1)); then
            _ftmpi_usr1=0
            _ftmpi_checkpoint_and_requeue
        fi
        if [[ -z $ended_at && -e $FTMPI_RUN_DIR/summary.json ]]; then
            ended_at=$SECONDS
        fi
        if [[ -n $ended_at ]] && ((SECONDS - ended_at > ${EXIT_GRACE:-60})); then
            _ftmpi_stop_hung_launcher
            stopped=1
            break
        fi
        sleep 1 # a trapped USR1 is handled once this returns
    done
    local rc=0
    wait "$_ftmpi_launcher" || rc=$?
    trap - USR1
    local how="exited with status $rc"
    ((stopped)) && how="was stopped after hanging (status $rc)"
    if ftmpi_finished; then
        ftmpi_log "training finished ($FTMPI_RUN_DIR/summary.json); the training command $how;" \
            "the job succeeds"
        return 0
    fi
    if ((rc == 0)); then # the record has the last word: its cause and status
        "$PYTHON" -m launch.outcome "$FTMPI_RUN_DIR" || rc=$?
        ((rc == 0)) && return 0
    fi
    ftmpi_log "training did not finish (no finished summary.json in $FTMPI_RUN_DIR); the" \
        "training command $how; the job fails with status $rc"
    return "$rc"
}
