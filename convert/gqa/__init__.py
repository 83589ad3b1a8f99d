"""MHA/GQA -> GQA/MQA: the plan (validation, config) and the head-merging math."""
