"""Task code built on the library: T5 label-word classification (GLUE) and encoder classifiers (BERT)."""
