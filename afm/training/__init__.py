"""Making analog foundation models: synthetic data, distillation, checkpoints, runs.

* ``data`` / ``shards`` / ``batches`` — teacher-sampled corpora on disk, batch order;
* ``kd_loss`` — the memory-safe distillation loss;
* ``distill_config`` / ``distill`` / ``step`` / ``progress`` — the distillation trainer;
* ``engines`` / ``checkpoint`` — FSDP / DeepSpeed state and exact-resume checkpoints;
* ``run_config`` / ``run`` / ``report`` — an ``afm-train`` run end to end.
"""
