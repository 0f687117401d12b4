"""
What the paper's files stand on, and a reader of the paper can skip: the plumbing of the two training loops.

  config           the one dataclass of every flag, its --help and checks (a leaf: imports nothing of the project)
  resolve          what the flags point to: the model, adapter folders and LoRAs, prompt files, the reward registry
  models           the T2IModel interface: the world's model or SD3.5 through diffusers, LoRA adapters via PEFT
  rollouts         sampling helpers both trainers share: prompt draws, SDE rollouts, the micro-step iterator
  teachers         which reward and prompts each Flow-GRPO teacher has; loading teachers for distillation
  checkpoint       atomic checkpoints, bit-exact resume, the EMA, the diffusers LoRA export
  distributed      torchrun: process groups, gradient averaging
  metrics          per-prompt statistics, paired differences, tables, JSON logs
  prompts          flow_grpo's prompt files (txt and GenEval jsonl), checked line by line
  reward_backends  real-image rewards (RapidOCR, PickScore); reward_servers: GenEval and DeQA over HTTP
  figures          sample grids, training curves and bar charts (matplotlib)
  hub              what to do when a hub model is gated or unreachable
It never imports train.py, eval.py or a tool (tests/test_layout.py).
"""
