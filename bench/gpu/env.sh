# Sourced by the GPU-machine scripts: carried wheels, the llama.cpp tree, llamalaunch from the work tree.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
[ -d /tmp/llama.cpp ] || tar xzf .gpucarry/llama-src.tar.gz -C /tmp
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export LLAMALAUNCH_CACHE=/tmp/llcache LLAMALAUNCH_HOME=/tmp/llhome
export NCCL_NVLS_ENABLE=0
BIN=$LLAMALAUNCH_CACHE/llama.cpp/llama-cpp-python-0.3.36-cuda/bin
LL="python3 -m llamalaunch"
wait_for() { for _ in $(seq 1 "$3"); do grep -qE "$2" "$1" 2>/dev/null && return 0; sleep 1; done; return 1; }
