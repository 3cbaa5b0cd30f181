"""A plain DeepSpeed training loop with meft_ds: `meft_ds.initialize` in place of `deepspeed.initialize`. Run it:

    deepspeed --num_gpus 1 launch/examples/deepspeed_loop.py \
        --model HuggingFaceTB/SmolLM2-135M --output_dir out
"""

import argparse
import itertools
from functools import partial

from transformers import AutoModelForCausalLM, AutoTokenizer

import meft_ds
from meft_ds.data import collate, facts_dataset, tokenize_for_training

parser = argparse.ArgumentParser()
parser.add_argument("--model", required=True)
parser.add_argument("--output_dir", required=True)
parser.add_argument("--max_steps", type=int, default=20, help="at most one pass over the data")
parser.add_argument("--save_steps", type=int, default=10)
parser.add_argument("--learning_rate", type=float, default=1e-4)
parser.add_argument("--resume_from_checkpoint", help="a checkpoint-N folder of an earlier run")
parser.add_argument("--local_rank", type=int, default=-1)  # set by the deepspeed launcher
args = parser.parse_args()

config = {  # a DeepSpeed config as usual, plus a "meft" section
    "train_micro_batch_size_per_gpu": 4,
    "gradient_clipping": 1.0,
    "optimizer": {"type": "AdamW", "params": {"lr": args.learning_rate}},
    "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_num_steps": 2, "total_num_steps": args.max_steps}},
    "zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}},
    "meft": {"num_neurons": 4096, "top_k": 64},
}
tokenizer = AutoTokenizer.from_pretrained(args.model)
model = AutoModelForCausalLM.from_pretrained(args.model)
data = tokenize_for_training(facts_dataset(), tokenizer, max_length=64)

engine, _, loader, _ = meft_ds.initialize(  # was: deepspeed.initialize(...)
    model=model, config=config, training_data=data, collate_fn=partial(collate, pad_token_id=tokenizer.eos_token_id)
)
if args.resume_from_checkpoint:
    engine.load_checkpoint(args.resume_from_checkpoint)  # DeepSpeed's state and the row store
start = engine.global_steps  # 0, or the step of the checkpoint
for step, batch in enumerate(itertools.islice(loader, start, args.max_steps), start + 1):
    loss = engine(**{key: value.to(engine.device) for key, value in batch.items()}).loss
    engine.backward(loss)
    engine.step()  # the routers, then the touched key/value rows
    print(f"step {step} loss {loss.item():.4f}")
    if step % args.save_steps == 0:
        engine.save_checkpoint(f"{args.output_dir}/checkpoint-{step}")  # with the row store
# the trained adapter, for inference (MeftModel.from_pretrained): every rank calls it, so that a sharded row store
# (ds_configs/meft_sharded.json) is gathered; rank 0 writes
meft_ds.save_adapter(model, args.output_dir)
