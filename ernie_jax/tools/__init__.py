"""Reports about a model rather than parts of it: the AOT pod-readiness reports for training and decode, the HLO
statistics they read, and the install check against transformers."""
