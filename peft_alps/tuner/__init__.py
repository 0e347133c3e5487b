"""The HEADMASK PEFT method: its config, the layer that wraps a projection, the tuner that wraps a model, GMT
gradient masking, mixed-adapter batches and the complete-load guarantee."""
