bash bench/gpu/1b-build-only.sh > /dev/null 2>&1
bash bench/gpu/4-ladder-calibrated.sh
