"""
The miniature world: where the whole of Flow-OPD runs on a CPU. Not part of the paper; a reader can skip it.

  toy_world   32x32 images, the three prompt sets (composition, text, scenes) and their renderer
  ocr         the world's text reader (a PP-OCR stand-in used by rewards.py)
  compbench   an out-of-domain composition prompt set (a T2I-CompBench stand-in)
  model       the world model's architecture (SD3's structure at toy size)
  pretrain    pretraining the world's base (`python -m tools.pretrain_world`)
"""
