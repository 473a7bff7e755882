#!/bin/sh
# gpu_carry.sh: build g3n and the CUDA test binaries for the H100 only (sm_90a:
# small binaries) into build/exp, strip them, and pack them with the shared
# libraries the GPU machine lacks (cJSON, libgomp, libmicrohttpd and its TLS
# chain) into carry/c.tar.xz, under the device tool's 64 MiB limit. Then run
# there with carry ["carry"]:
#   mkdir -p /tmp/cx && tar -C /tmp/cx -xJf carry/c.tar.xz
#   export LD_LIBRARY_PATH=/tmp/cx/lib
#   G3N_REQUIRE_CUDA=1 /tmp/cx/bin/test_ops && /tmp/cx/bin/test_model
#   /tmp/cx/bin/g3n bench -m /tmp/g3n-e4b -p 512 -n 128
#   sh tools/gpu_ab.sh g3n-e2b e4b-q4 -- prev=/tmp/px/bin/g3n new=/tmp/cx/bin/g3n
# (carry/ must be ignored: echo /carry/ >> .git/info/exclude)
set -eu
make -s CUDA=1 REL=build/exp CUDA_ARCH="-gencode arch=compute_90a,code=sm_90a" -j2 \
    g3n build/exp/tests/test_ops build/exp/tests/test_model
rm -rf carry/pack && mkdir -p carry/pack/bin carry/pack/lib
strip -o carry/pack/bin/g3n g3n
strip -o carry/pack/bin/test_ops build/exp/tests/test_ops
strip -o carry/pack/bin/test_model build/exp/tests/test_model
for l in $(ldd g3n | awk '$3 ~ /^\// {print $3}' | grep -v -e /usr/local/cuda -e 'lib\(c\|m\|dl\|rt\|pthread\|stdc++\|gcc_s\)\.so'); do
    cp -L "$l" carry/pack/lib/
done
tar -C carry/pack -cf - bin lib | xz -T2 -6 > carry/c.tar.xz
rm -rf carry/pack
ls -la carry/c.tar.xz
