# One bench_system run on the device (see the device command in bench/README.md): TAG names the files, T bounds it
# (s), LV the streaming levels, EXTRA more bench_system flags; nvidia-smi dmon samples the GPU beside it.
mkdir -p /tmp/site && tar xJf .whl/site.tar.xz -C /tmp/site; export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH CHATTERBOX_WATERMARK=false HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
[ -d /tmp/ckpt ] || python3 -m serve_app.cli make-checkpoint /tmp/ckpt --preset full >/tmp/ck.log 2>&1
export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps CUDA_MPS_LOG_DIRECTORY=/tmp/mpslog; mkdir -p /tmp/mps /tmp/mpslog /tmp/res_$TAG; pgrep -f nvidia-cuda-mps-control >/dev/null || nvidia-cuda-mps-control -d
nvidia-smi dmon -s u -d 1 > $OUT/dmon_$TAG.txt 2>&1 & DM=$!
timeout $T python3 -m bench.bench_system --checkpoint /tmp/ckpt --out /tmp/res_$TAG --levels $LV --nostream-levels 64 --duration-s 15 --upstream-requests 2 --max-wall-s $((T-10)) $EXTRA > /tmp/res_$TAG.log 2>&1
kill $DM; grep -E "INFO bench_system|Error|error" /tmp/res_$TAG.log | tail -30; cp /tmp/res_$TAG/bench_system.json $OUT/bench_system_$TAG.json; cp /tmp/res_$TAG/bench_system.md $OUT/bench_system_$TAG.md; cp /tmp/res_$TAG.log $OUT/; cp /tmp/res_$TAG/*.png $OUT/ 2>/dev/null || true
