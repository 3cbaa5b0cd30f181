"""An Accelerate training loop with meft_ds: `meft_ds.attach(model)` after `accelerator.prepare(...)`. Run it:

    accelerate launch --config_file launch/examples/accelerate.yaml launch/examples/accelerate_loop.py \
        --model HuggingFaceTB/SmolLM2-135M --output_dir out
"""

import argparse
import itertools
from functools import partial

from accelerate import Accelerator
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoTokenizer

import meft_ds
from meft_ds.data import collate, facts_dataset, tokenize_for_training
from meft_ds.ds_config import resolve_auto

parser = argparse.ArgumentParser()
parser.add_argument("--model", required=True)
parser.add_argument("--output_dir", required=True)
parser.add_argument("--max_steps", type=int, default=20, help="at most one pass over the data")
parser.add_argument("--save_steps", type=int, default=10)
parser.add_argument("--learning_rate", type=float, default=1e-4)
parser.add_argument("--resume_from_checkpoint", help="a checkpoint-N folder of an earlier run")
args = parser.parse_args()

accelerator = Accelerator()  # DeepSpeed with ds_configs/meft.json, from the accelerate config file
ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
meft_settings = ds_config.pop("meft")  # for meft_ds, not for DeepSpeed
# fill the "auto" values Accelerate does not
resolve_auto(ds_config, max_steps=args.max_steps, lr=args.learning_rate, micro_batch_size=4)

tokenizer = AutoTokenizer.from_pretrained(args.model)
model = meft_ds.inject(AutoModelForCausalLM.from_pretrained(args.model), meft_settings)
data = tokenize_for_training(facts_dataset(), tokenizer, max_length=64)
loader = DataLoader(data, batch_size=4, collate_fn=partial(collate, pad_token_id=tokenizer.eos_token_id))

model, loader = accelerator.prepare(model, loader)  # model is now a DeepSpeed engine (optimizer from the config)
meft_ds.attach(model)
if args.resume_from_checkpoint:
    accelerator.load_state(args.resume_from_checkpoint)  # with the row store
start = model.global_steps  # 0, or the step of the checkpoint
for step, batch in enumerate(itertools.islice(loader, start, args.max_steps), start + 1):
    loss = model(**batch).loss
    accelerator.backward(loss)  # DeepSpeed's backward and step: the routers, then the touched key/value rows
    accelerator.print(f"step {step} loss {loss.item():.4f}")
    if step % args.save_steps == 0:
        accelerator.save_state(f"{args.output_dir}/checkpoint-{step}")  # with the row store
# the trained adapter, for inference (MeftModel.from_pretrained): every process calls it, so that a sharded row store
# (ds_configs/meft_sharded.json) is gathered; the main process writes
meft_ds.save_adapter(accelerator.unwrap_model(model), args.output_dir)
accelerator.end_training()  # process groups closed while the interpreter is whole (gloo's threads may abort otherwise)
