#!/usr/bin/env bash
# Runs on the GPU machine (device tool), from the repository root, after
# connectors/bench/build_gpu_payload.sh built .gpu/ here and
# ../shared/gpu-vllm/build_payload.sh split vLLM 0.25.1 into .vllm1/ .vllm2/.
# The machine takes 64 MiB per call, so this runs in two calls:
#   1. carry [.gpu, .vllm1]:  bash connectors/bench/gpu_run.sh copy-bench
#      (throughput and lookup latency; no vLLM needed; CHUNK_MBS="0 64" runs
#      the throughput bench once per copy_chunk_mb)
#   2. carry [.vllm2]:        bash connectors/bench/gpu_run.sh vllm
#      (contract tests on CUDA, get_num_new_matched_tokens latency, TTFT in a
#      real vLLM engine); `gpu_run.sh vllm tiers` runs vllm_tiers.py alone
#      (TIERS_ARGS="--modes ..." picks modes); `gpu_run.sh vllm tests` the
#      contract tests alone (TESTS="connectors/tests/test_x.py" picks files)
set -u
mode=${1:?stage, copy-bench or vllm}
KV=/tmp/kvgpu        # survives between calls while the machine is warm
SITE=/tmp/site       # vLLM payload + kvtier + pytest
mkdir -p /tmp/parts $KV
for d in .vllm1 .vllm2; do [ -d $d ] && cp -n $d/* /tmp/parts/; done
[ -d .gpu ] && cp -r .gpu/. $KV/
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
export PYTHONUNBUFFERED=1
case $mode in
stage) ;;  # only copy the carried parts (first of two calls)
copy-bench)
  rm -rf /tmp/kvsite && mkdir -p /tmp/kvsite
  python3 -m zipfile -e $KV/kvtier-*.whl /tmp/kvsite
  cp connectors/python/kvtier/*.py /tmp/kvsite/kvtier/  # this checkout's sources
  export PYTHONPATH=/tmp/kvsite
  for mb in ${CHUNK_MBS:-64}; do  # the connector's copy_chunk_mb
    python3 connectors/bench/gpu_throughput.py --kvbm $KV/kvbm --chunk-mb $mb
  done
  python3 connectors/bench/lookup_latency.py --kvbm $KV/kvbm --iters 3000
  ;;
vllm)
  if [ ! -f $SITE/.done ]; then
    mkdir -p $SITE
    t0=$SECONDS
    cat /tmp/parts/payload.tar.xz.* | xz -dc -T0 | tar -C $SITE -xf - || exit 3
    for w in $KV/kvtier-*.whl $KV/py/*.whl; do python3 -m zipfile -e "$w" $SITE; done
    touch $SITE/.done
    echo "extract_s $((SECONDS-t0))"
  fi
  # The package's Python sources from this checkout (fixes travel with the
  # working tree); the compiled extension from the wheel.
  cp connectors/python/kvtier/*.py $SITE/kvtier/
  export PYTHONPATH=$SITE HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 \
    VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_USE_FLASHINFER_SAMPLER=0 \
    PYTHONHASHSEED=0 KVTIER_BIN_DIR=$KV
  python3 -c "import torch, vllm; print('torch', torch.__version__, 'vllm', vllm.__version__)"
  if [ "${2:-}" = tests ]; then  # contract tests on CUDA alone (TESTS picks files)
    KVTIER_TEST_DEVICE=cuda timeout 400 python3 -m pytest -q -p no:cacheprovider ${TESTS:-connectors/tests} 2>&1 | tail -25
    exit 0
  fi
  if [ "${2:-}" = tiers ]; then  # the tier benchmark alone (vllm_tiers.py)
    timeout 560 python3 connectors/bench/vllm_tiers.py --kvbm $KV/kvbm --workdir /tmp ${TIERS_ARGS:-} \
      > ${OUT:-/tmp}/tiers.log 2>&1
    echo "tiers exit $?"
    grep -E '^(SUMMARY|RATIOS)' ${OUT:-/tmp}/tiers.log
    grep -v '^{' ${OUT:-/tmp}/tiers.log | grep -iE 'error|Traceback|File ' | tail -30
    exit 0
  fi
  [ "${2:-}" = ttft-only ] || KVTIER_TEST_DEVICE=cuda timeout 300 python3 -m pytest -q -p no:cacheprovider connectors/tests 2>&1 | tail -25
  [ "${2:-}" = ttft-only ] || python3 connectors/bench/latency.py --iters 3000 2>&1 | grep "^{"
  timeout 420 python3 connectors/bench/vllm_ttft.py --kvbm $KV/kvbm ${TTFT_ARGS:-} > ${OUT:-/tmp}/ttft.log 2>&1
  echo "ttft exit $?"
  grep '^{' ${OUT:-/tmp}/ttft.log
  grep -v '^{' ${OUT:-/tmp}/ttft.log | grep -iE 'kvtier|error|Traceback|File ' | tail -40
  ;;
esac
