"""After training: merge an adapter into a base checkpoint file to file, or export it as a stock PEFT LoRA."""
