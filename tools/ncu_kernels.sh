#!/usr/bin/env bash
# On the GPU machine: Nsight Compute's counters for step kernels launched alone (bench/ncu_kernels.py), one warm
# launch each. Usage (repo root, after `source tools/device_env.sh`):
#   bash tools/ncu_kernels.sh OUTDIR [KERNEL ...]      # default: every kernel `python3 -m bench.ncu_kernels --list` names
# Writes OUTDIR/ncu_KERNEL.txt and prints, per kernel: time, SM / L2 / DRAM throughput, bytes, tensor-pipe activity,
# warps active, registers, and the warp stall reasons above 0.05 (stalled warps per issued instruction).
# The environment passes through, e.g. CNRT_GEGLU_EARLY_BIAS=0 bash tools/ncu_kernels.sh out geglu.
set -uo pipefail
out=${1:?usage: tools/ncu_kernels.sh OUTDIR [KERNEL ...]}
shift
mkdir -p "$out"
NCU=$(command -v ncu || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
[ -n "$NCU" ] || { echo "ncu not found" >&2; exit 1; }
kernels=("$@")
[ ${#kernels[@]} -gt 0 ] || mapfile -t kernels < <(python3 -m bench.ncu_kernels --list | awk '{print $1}')
metrics=gpu__time_duration.sum,sm__throughput.avg.pct_of_peak_sustained_elapsed
metrics+=,lts__throughput.avg.pct_of_peak_sustained_elapsed,dram__throughput.avg.pct_of_peak_sustained_elapsed
metrics+=,lts__t_bytes.sum,dram__bytes.sum,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active
metrics+=,sm__warps_active.avg.pct_of_peak_sustained_active,launch__registers_per_thread
metrics+=,"regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio"
for k in "${kernels[@]}"; do
  pattern=$(python3 -m bench.ncu_kernels --list | awk -v k="$k" '$1 == k {print $3}' | sed "s/^-k //; s/regex://; s/'//g")
  [ -n "$pattern" ] || { echo "== $k: not a bench.ncu_kernels kernel" >&2; continue; }
  timeout 120 "$NCU" --clock-control none --metrics "$metrics" --launch-skip 3 --launch-count 1 -k "regex:$pattern" \
    python3 -m bench.ncu_kernels "$k" > "$out/ncu_$k.txt" 2>&1
  echo "== $k (rc $?)"
  grep -E '^\s+(gpu__|sm__|lts__|dram__|launch__)' "$out/ncu_$k.txt" | grep -v stalled | awk '{print "  " $1, $(NF-1), $NF}'
  grep -E 'stalled' "$out/ncu_$k.txt" | awk '$NF + 0 > 0.05 {print "  stall", $1, $NF}' \
    | sed 's/smsp__average_warps_issue_stalled_//; s/_per_issue_active.ratio//'
done
