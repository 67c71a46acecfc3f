# Sourced first by a GPU call: llamalaunch from the work tree, the CUDA toolchain from the carried build
# (.gpucarry/cudabuild.tar.xz.*, packed by an earlier call) or built here (~3.5 min on 16 cores) and then
# packed into $OUT for the next call (the machine stays warm only 30 s between calls).
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 LLAMALAUNCH_CACHE=/tmp/llcache LLAMALAUNCH_HOME=/tmp/llhome
export NCCL_NVLS_ENABLE=0
TC=$LLAMALAUNCH_CACHE/llama.cpp
BIN=$TC/llama-cpp-python-0.3.36-cuda/bin
LL="python3 -m llamalaunch"
[ -d /tmp/llama.cpp ] || tar xzf .gpucarry/llama-src.tar.gz -C /tmp
if [ ! -x $BIN/llama-server ] && ls .gpucarry/cudabuild.tar.xz.* > /dev/null 2>&1; then
    mkdir -p $TC && cat .gpucarry/cudabuild.tar.xz.* | xz -d | tar x -C $TC && echo "carried CUDA build unpacked"
fi
if [ ! -x $BIN/llama-server ]; then
    time python3 -m llamalaunch toolchain install --cuda --sdist /tmp/llama.cpp -j 16 2>&1 | grep -v "^\[" | tail -3
    (cd $TC && tar cf - llama-cpp-python-0.3.36-cuda | xz -T16 -3 > /tmp/cudabuild.tar.xz)
    ls -la /tmp/cudabuild.tar.xz
    [ "$(stat -c %s /tmp/cudabuild.tar.xz)" -lt 47000000 ] && split -b 15M /tmp/cudabuild.tar.xz $OUT/cudabuild.tar.xz.
fi
nvidia-smi --query-gpu=name,memory.total,memory.free,driver_version --format=csv,noheader
