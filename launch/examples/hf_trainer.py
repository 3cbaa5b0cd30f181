"""The Hugging Face Trainer with meft_ds: `meft_ds.hf.MeftTrainer` in place of `Trainer`, DeepSpeed on. Run it:

    deepspeed --num_gpus 1 launch/examples/hf_trainer.py --deepspeed ds_configs/meft.json \
        --model HuggingFaceTB/SmolLM2-135M --output_dir out --max_steps 20 --learning_rate 1e-4
"""

from functools import partial

from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, TrainingArguments

from meft_ds.data import collate, facts_dataset, tokenize_for_training
from meft_ds.hf import MeftTrainer

parser = HfArgumentParser(TrainingArguments)
parser.add_argument("--model", required=True)
training_args, extra = parser.parse_args_into_dataclasses()

tokenizer = AutoTokenizer.from_pretrained(extra.model)
model = AutoModelForCausalLM.from_pretrained(extra.model)
data = tokenize_for_training(facts_dataset(), tokenizer, max_length=64)

trainer = MeftTrainer(  # was: Trainer(...); the adapters come from the config's "meft" section
    model=model,
    args=training_args,
    train_dataset=data,
    data_collator=partial(collate, pad_token_id=tokenizer.eos_token_id),
    processing_class=tokenizer,  # saved with the adapter
)
trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)  # checkpoints hold the row store
trainer.save_model()  # the trained adapter, for inference (meft_ds.MeftModel.from_pretrained), from every rank
