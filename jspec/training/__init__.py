"""Training: corpus and tokenizer, pretraining, checkpoints that resume exactly.

Scripts in `train/` are thin command lines over these modules.
"""
