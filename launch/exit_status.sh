# Sourced by the launch scripts (bash). torchrun exits 1 for any failed worker and after a preemption, so the
# scripts exit with train.py's own status instead, which rank 0 writes to $MOE_TRAIN_STATUS_FILE.
#
# wait_for_status PID: wait for the background launcher PID (through the scripts' trapped signals, which wake
# `wait` early), then set STATUS to train.py's status, or to PID's own when rank 0 wrote none (it died
# first). It runs in the calling shell, not in $(...): a subshell can neither wait for the script's child nor
# let the script's traps run meanwhile.
wait_for_status() {
  wait "$1"; STATUS=$?
  while ((STATUS > 128)) && kill -0 "$1" 2>/dev/null; do wait "$1"; STATUS=$?; done
  if [[ -s "$MOE_TRAIN_STATUS_FILE" ]]; then STATUS=$(<"$MOE_TRAIN_STATUS_FILE"); fi
}
