"""The plumbing the paper's files stand on (README "The layout"); a package so no installed `support` shadows it."""
