python3 -m pip install -q --no-index --no-deps --target /tmp/pyd .gpu_wheels/*.whl >/dev/null 2>&1
export PYTHONPATH=$PWD:/tmp/pyd
DATA='data={name: synthetic, num_tasks: 2, classes_per_task: 5, input_shape: [3, 32, 32], samples_per_class: 1000}'
COMMON="model.builder=resnet18 ~model.kwargs training.epochs=3 training.batch_size=256 training.num_threads=8 target.rule=0 output.tensorboard=false output.export_format=none"
for prec in fp32 bf16; do
  timeout 150 python3 -m grownfx run digits_quickstart "$DATA" $COMMON training.precision=$prec --out /tmp/r_$prec > /tmp/log_$prec 2>&1; echo "single $prec rc=$?"
  python3 -c "import json,sys; ev=[json.loads(l) for l in open('/tmp/r_$prec/metrics.jsonl') if 'images_per_s' in l]; print('single-process $prec images/s per epoch:', [round(e['images_per_s']) for e in ev])"
done
timeout 150 torchrun --standalone --nproc-per-node 1 -m grownfx run digits_quickstart "$DATA" $COMMON --out /tmp/r_ddp > /tmp/log_ddp 2>&1; echo "torchrun rc=$?"
python3 -c "import json; ev=[json.loads(l) for l in open('/tmp/r_ddp/metrics.jsonl') if 'images_per_s' in l]; print('torchrun 1 GPU (NCCL) images/s per epoch:', [round(e['images_per_s']) for e in ev])"
tail -3 /tmp/log_ddp
nvidia-smi --query-gpu=name --format=csv,noheader
