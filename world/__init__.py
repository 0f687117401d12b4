"""
The miniature world: where the whole of Flow-OPD runs on a CPU. Not part of the paper; a reader can skip it.
A leaf: nothing here imports the project outside world/ (tests/test_layout.py).

  toy_world   the words, the three prompt sets (composition, text, scenes) and their fixed train/test splits
  renderer    ground-truth 32x32 images of a record, and the web styles pretraining draws them in
  captions    the imperfect captions of pretraining (a wrong count, a swapped relation, ...)
  judges      the pixel detectors rewards.py scores with (GenEval-like shapes, scene, quality)
  ocr         the world's text reader (a PP-OCR stand-in used by rewards.py)
  styles      tells the web styles apart in samples (a diagnostic)
  compbench   an out-of-domain composition prompt set (a T2I-CompBench stand-in)
  model       the world model's architecture (SD3's structure at toy size)
Pretraining the world's base and calibrating its rewards are tools: tools/pretrain_world.py, tools/calibrate_world.py.
"""
