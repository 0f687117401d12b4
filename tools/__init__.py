"""Entry points beside the paper, `python -m tools.NAME` (README "The layout"); a package so no installed `tools`
shadows it."""
