"""
Entry points beside the paper, each run from the repository root as `python -m tools.NAME` with train.py's
flags (support/config.py) and its own (--help):

  paper_tables     the whole pipeline for one seed and the paper's tables in miniature (results/)
  grpo_snr         how much of one GRPO gradient is signal (kappa): a cheap pilot before a teacher run
  pretrain_world   pretraining the miniature world's base (checkpoints/base)
  calibrate_world  the world's rewards against its own autoencoder
  infer            images from a prompt with a base and a LoRA, as one labelled grid
  bench            one distillation iteration timed: ours (train.opd_iteration), the released loop structure
                   (released), the floor of bare transformer passes (floor), the GPU check (gpu_check), with
                   bench_kit's backbones and timers; memory_plan (analytic) and memory_check (measured)
  estimator_step   the OPD estimators' gradients and first steps from the cold start
  main_job_seeds   the main job over three seeds, paired
Only tools import train.py; nothing outside tools/ imports a tool (tests/test_layout.py).
"""
